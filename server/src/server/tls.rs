//! TLS termination for the proxy's `--https-addr`: certificates chosen by SNI, HTTP/2 or
//! HTTP/1.1 by ALPN, the ACME challenge answers (HTTP-01 tokens for the HTTP listener,
//! TLS-ALPN-01 certificates for this one) and on-demand issuance.
//!
//! The handshake path ([`Tls::accept`]): the ClientHello is read first (rustls'
//! `LazyConfigAcceptor`), so that
//! 1. an `acme-tls/1` hello gets the challenge certificate for its name and nothing else;
//! 2. a name with no certificate yet waits (a bounded time) for an order in flight, or, with
//!    on-demand issuance, for one the allow-rule permits; a name nobody allowed never orders;
//! 3. the handshake then completes with the shared config, whose resolver picks the exact
//!    name, then a `*.` wildcard (uploaded certificates), then the default certificate.
//!
//! Architecture Invariant: a handshake never waits on the database; it reads the in-memory
//! maps below, which the ACME manager and the certs API fill. Replacing a certificate swaps an
//! `Arc`: connections that are open keep theirs, the next handshake gets the new one.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub mod acme;
pub mod store;

pub use store::{Cert, Source, Store};

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// The path prefix of HTTP-01 (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Which names may be ordered during their first handshake.
#[derive(Debug, Clone, Default)]
pub struct OnDemand {
    /// Names or `*.` patterns allowed outright.
    pub allow: Vec<String>,
    /// A URL asked `?domain=NAME`; 200 allows.
    pub ask: Option<String>,
}

impl OnDemand {
    pub fn enabled(&self) -> bool {
        !self.allow.is_empty() || self.ask.is_some()
    }
}

/// What the API shows of one name's certificate.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct CertStatus {
    pub host: String,
    /// `valid`, `pending` (no certificate yet, an order is on its way), `failed` (the last
    /// order failed; `error` says why, `next_attempt` when it is retried) or `none`.
    pub status: &'static str,
    pub source: Option<Source>,
    /// Seconds since the epoch.
    pub not_after: Option<u64>,
    /// When the renewal starts (seconds since the epoch), for an issued certificate.
    pub renew_at: Option<u64>,
    pub fingerprint: Option<String>,
    pub error: Option<String>,
    pub next_attempt: Option<u64>,
    /// Failed orders in a row.
    pub failures: u32,
}

/// A failed name's retry, as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Retry {
    failures: u32,
    next_attempt: u64,
    error: String,
}

/// The ACME side of one name.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub ordering: bool,
    pub error: Option<String>,
    pub failures: u32,
    pub next_attempt: Option<SystemTime>,
    pub renew_at: Option<SystemTime>,
    /// The fingerprint `renew_at` was drawn for.
    pub renew_for: String,
}

pub struct Tls {
    pub store: Store,
    /// Certificates by exact name (issued ones and uploaded ones; uploaded win).
    issued: DashMap<String, Arc<Cert>>,
    uploaded: DashMap<String, Arc<Cert>>,
    default: RwLock<Arc<CertifiedKey>>,
    /// The name whose certificate becomes the default one (the control host).
    default_name: String,
    http01: DashMap<String, String>,
    alpn01: DashMap<String, Arc<CertifiedKey>>,
    pub progress: DashMap<String, Progress>,
    pub on_demand: OnDemand,
    /// Names an on-demand handshake asked for (allowed ones only).
    pub on_demand_names: DashMap<String, ()>,
    ask_cache: DashMap<String, (bool, Instant)>,
    /// Wakes the ACME manager.
    pub wake: tokio::sync::Notify,
    /// Tells handshakes waiting for a name that something changed.
    changed: tokio::sync::watch::Sender<u64>,
    config: RwLock<Option<Arc<ServerConfig>>>,
    /// Whether an ACME CA is configured (else nothing is ever ordered).
    pub acme_enabled: bool,
    /// The CA is a public one (Let's Encrypt): names under special-use TLDs (`localhost`,
    /// `.local`, `.test`, ...) are never ordered, as it would refuse them.
    pub public_ca: bool,
    ask_client: reqwest::Client,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("default_name", &self.default_name).finish_non_exhaustive()
    }
}

/// How long a handshake waits for an order of its name.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(30);

impl Tls {
    pub fn new(
        store: Store,
        default_name: &str,
        on_demand: OnDemand,
        acme_directory: Option<&str>,
    ) -> anyhow::Result<Arc<Tls>> {
        let fallback = store.default_cert(default_name)?;
        let tls = Arc::new(Tls {
            issued: DashMap::new(),
            uploaded: DashMap::new(),
            default: RwLock::new(fallback.key.clone()),
            default_name: default_name.to_string(),
            http01: DashMap::new(),
            alpn01: DashMap::new(),
            progress: DashMap::new(),
            on_demand,
            on_demand_names: DashMap::new(),
            ask_cache: DashMap::new(),
            wake: tokio::sync::Notify::new(),
            changed: tokio::sync::watch::channel(0).0,
            config: RwLock::new(None),
            acme_enabled: acme_directory.is_some(),
            public_ca: acme_directory == Some(acme::LETS_ENCRYPT),
            ask_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            store,
        });
        for (name, c) in tls.store.load_all(Source::Uploaded) {
            tls.uploaded.insert(name, Arc::new(c));
        }
        for (name, c) in tls.store.load_all(Source::Acme) {
            tls.issued.insert(name, Arc::new(c));
        }
        tls.load_retries();
        tls.refresh_default();
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(tls.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
        *tls.config.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(cfg));
        Ok(tls)
    }

    /// Failed orders survive a restart (`tls/retry.json`): a server restarting in a loop must
    /// not retry a failing name at each start and run into the CA's failed-validation limits.
    pub fn save_retries(&self) {
        let now = SystemTime::now();
        let map: std::collections::BTreeMap<String, Retry> = self
            .progress
            .iter()
            .filter_map(|e| {
                let p = e.value();
                let at = p.next_attempt.filter(|t| *t > now && p.error.is_some())?;
                Some((
                    e.key().clone(),
                    Retry {
                        failures: p.failures,
                        next_attempt: store::unix(at),
                        error: p.error.clone().unwrap_or_default(),
                    },
                ))
            })
            .collect();
        let path = self.store.retries();
        let result = match map.is_empty() {
            true => std::fs::remove_file(&path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
            false => Store::write_private(&path, &serde_json::to_vec_pretty(&map).unwrap_or_default()),
        };
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e, "storing the ACME retry times");
        }
    }

    fn load_retries(&self) {
        let Ok(bytes) = std::fs::read(self.store.retries()) else { return };
        let Ok(map) = serde_json::from_slice::<std::collections::BTreeMap<String, Retry>>(&bytes) else { return };
        for (name, r) in map {
            self.progress.insert(
                name,
                Progress {
                    error: Some(r.error),
                    failures: r.failures,
                    next_attempt: Some(std::time::UNIX_EPOCH + Duration::from_secs(r.next_attempt)),
                    ..Progress::default()
                },
            );
        }
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone().expect("set in new")
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The certificate a handshake for `name` gets, if one names it (not the default).
    pub fn lookup(&self, name: &str) -> Option<Arc<Cert>> {
        let now = SystemTime::now();
        let fresh = |c: &Arc<Cert>| c.not_after > now;
        if let Some(c) = self.uploaded.get(name).map(|c| c.clone()).filter(fresh) {
            return Some(c);
        }
        if let Some(c) = self.issued.get(name).map(|c| c.clone()).filter(fresh) {
            return Some(c);
        }
        // An uploaded wildcard: `*.example.com` for `a.example.com`.
        let (_, parent) = name.split_once('.')?;
        self.uploaded.get(&format!("*.{parent}")).map(|c| c.clone()).filter(fresh)
    }

    pub fn issued(&self, name: &str) -> Option<Arc<Cert>> {
        self.issued.get(name).map(|c| c.clone())
    }

    pub fn uploaded(&self, name: &str) -> Option<Arc<Cert>> {
        self.uploaded.get(name).map(|c| c.clone())
    }

    /// True if an uploaded certificate (exact or wildcard) covers `name` and is still valid:
    /// then nothing is ordered for it.
    pub fn has_uploaded(&self, name: &str) -> bool {
        self.lookup(name).is_some_and(|c| c.source == Source::Uploaded)
    }

    /// Puts an issued certificate in service (after it was stored).
    pub fn install_issued(&self, name: &str, cert: Cert) {
        self.issued.insert(name.to_string(), Arc::new(cert));
        self.refresh_default();
        self.notify();
    }

    pub fn install_uploaded(&self, name: &str, cert: Cert) {
        self.uploaded.insert(name.to_string(), Arc::new(cert));
        if let Some(mut p) = self.progress.get_mut(name) {
            p.error = None;
            p.failures = 0;
            p.next_attempt = None;
        }
        self.save_retries();
        self.refresh_default();
        self.notify();
    }

    pub fn remove_uploaded(&self, name: &str) -> bool {
        let had = self.uploaded.remove(name).is_some();
        self.refresh_default();
        self.wake.notify_one();
        had
    }

    pub fn uploaded_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.uploaded.iter().map(|e| e.key().clone()).collect();
        v.sort();
        v
    }

    pub fn issued_names(&self) -> Vec<String> {
        self.issued.iter().map(|e| e.key().clone()).collect()
    }

    fn refresh_default(&self) {
        if let Some(c) = self.lookup(&self.default_name) {
            *self.default.write().unwrap_or_else(|e| e.into_inner()) = c.key.clone();
        }
    }

    pub fn set_http01(&self, token: &str, key_authorization: &str) {
        self.http01.insert(token.to_string(), key_authorization.to_string());
    }

    pub fn clear_http01(&self, token: &str) {
        self.http01.remove(token);
    }

    /// The key authorization for an HTTP-01 token, if one is being validated.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.get(token).map(|v| v.clone())
    }

    pub fn set_alpn01(&self, name: &str, key: Arc<CertifiedKey>) {
        self.alpn01.insert(name.to_string(), key);
    }

    pub fn clear_alpn01(&self, name: &str) {
        self.alpn01.remove(name);
    }

    /// Would the ACME manager order a certificate for `name` (when it needs one)?
    pub fn orders_for(&self, name: &str) -> bool {
        self.acme_enabled && !(self.public_ca && special_use(name)) && !self.has_uploaded(name)
    }

    /// The status of a name the proxy answers at, for the API.
    pub fn status(&self, name: &str) -> CertStatus {
        self.status_of(name, true)
    }

    /// The status of `name`; `wanted`: the proxy answers at it (else nothing is ordered).
    pub fn status_of(&self, name: &str, wanted: bool) -> CertStatus {
        let cert = self.lookup(name);
        let mut p = self.progress.get(name).map(|p| p.clone()).unwrap_or_default();
        if cert.as_ref().is_some_and(|c| c.source != Source::Acme) {
            // An uploaded certificate serves it: what ACME did before does not matter.
            p = Progress::default();
        }
        let status = match (&cert, &p) {
            (Some(_), _) => "valid",
            (None, p) if p.error.is_some() && wanted => "failed",
            (None, _) if wanted && self.orders_for(name) => "pending",
            _ => "none",
        };
        CertStatus {
            host: name.to_string(),
            status,
            source: cert.as_ref().map(|c| c.source),
            not_after: cert.as_ref().map(|c| store::unix(c.not_after)),
            renew_at: cert.as_ref().filter(|c| c.source == Source::Acme).and(p.renew_at).map(store::unix),
            fingerprint: cert.as_ref().map(|c| c.fingerprint()),
            error: p.error.clone(),
            next_attempt: p.next_attempt.filter(|_| p.error.is_some()).map(store::unix),
            failures: p.failures,
        }
    }

    /// Is `name` allowed an on-demand order? The list first, then the ask URL (cached a minute).
    async fn on_demand_allows(&self, name: &str) -> bool {
        if self.on_demand.allow.iter().any(|p| p == name || store::wildcard_match(p, name)) {
            return true;
        }
        let Some(ask) = &self.on_demand.ask else { return false };
        if let Some((ok, at)) = self.ask_cache.get(name).map(|e| *e) {
            if at.elapsed() < Duration::from_secs(60) {
                return ok;
            }
        }
        let ok = match self.ask_client.get(ask).query(&[("domain", name)]).send().await {
            Ok(r) => r.status() == reqwest::StatusCode::OK,
            Err(e) => {
                tracing::warn!(host = %name, error = %e, "the on-demand TLS ask URL did not answer; not ordering");
                false
            }
        };
        self.ask_cache.insert(name.to_string(), (ok, Instant::now()));
        ok
    }

    /// Waits until `name` has a certificate, or its order failed, or `deadline`.
    async fn wait_for(&self, name: &str, deadline: tokio::time::Instant) {
        let mut rx = self.changed.subscribe();
        loop {
            if self.lookup(name).is_some() {
                return;
            }
            let p = self.progress.get(name).map(|p| p.clone()).unwrap_or_default();
            if !p.ordering && p.error.is_some() {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Tells handshakes waiting for `name` that its order ended (in failure).
    pub fn order_ended(&self) {
        self.notify();
    }

    /// The TLS handshake of one connection: `Ok(None)` for a TLS-ALPN-01 validation (done once
    /// the handshake is), else the stream and whether the client chose HTTP/2.
    pub async fn accept(
        self: &Arc<Self>,
        tcp: TcpStream,
        wanted: impl Fn(&str) -> bool,
    ) -> std::io::Result<Option<(TlsStream<TcpStream>, bool)>> {
        let start = tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        let hello = start.client_hello();
        let name = hello.server_name().map(normalize);
        let acme_alpn = hello.alpn().is_some_and(|mut a| a.any(|p| p == ACME_TLS_ALPN));
        if acme_alpn {
            let key = name.as_deref().and_then(|n| self.alpn01.get(n).map(|k| k.clone()));
            let Some(key) = key else {
                return Err(std::io::Error::other("an acme-tls/1 handshake for a name with no challenge"));
            };
            let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(std::io::Error::other)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(key)));
            cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            let mut s = start.into_stream(Arc::new(cfg)).await?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
            return Ok(None);
        }
        if let Some(name) = name.as_deref() {
            if self.lookup(name).is_none() && self.orders_for(name) {
                let deadline = tokio::time::Instant::now() + HANDSHAKE_WAIT;
                if wanted(name) {
                    // An order for it is on its way (or failed, and the default cert it is).
                    self.wake.notify_one();
                    self.wait_for(name, deadline).await;
                } else if self.on_demand.enabled() && self.on_demand_allows(name).await {
                    if self.on_demand_names.insert(name.to_string(), ()).is_none() {
                        tracing::info!(host = %name, "on-demand certificate requested by a handshake");
                    }
                    self.wake.notify_one();
                    self.wait_for(name, deadline).await;
                }
            }
        }
        let stream = start.into_stream(self.config()).await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Some((stream, h2)))
    }
}

/// Names a public CA never issues for (RFC 6761, RFC 6762, RFC 8375, .internal).
pub fn special_use(name: &str) -> bool {
    let tld = name.rsplit('.').next().unwrap_or(name);
    matches!(tld, "localhost" | "local" | "test" | "invalid" | "example" | "internal" | "lan")
        || name.ends_with(".home.arpa")
}

/// Host names as the proxy compares them: lowercase, no trailing dot, internationalised names
/// in punycode (`bücher.example` is `xn--bcher-kva.example`). Ports are not part of it.
pub fn normalize(name: &str) -> String {
    let name = name.trim();
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_ascii() {
        return name.to_ascii_lowercase();
    }
    idna::domain_to_ascii(name).unwrap_or_else(|_| name.to_lowercase())
}

#[derive(Debug)]
struct Resolver(Arc<Tls>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            if let Some(c) = self.0.lookup(&normalize(name)) {
                return Some(c.key.clone());
            }
        }
        Some(self.0.default.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercased_undotted_and_punycoded() {
        assert_eq!(normalize("App.Example.COM."), "app.example.com");
        assert_eq!(normalize("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(normalize("BÜCHER.example."), "xn--bcher-kva.example");
    }
}
