//! The ACME manager: one task that keeps a valid certificate for every name the proxy answers
//! (the control host, `<service>.<domain>`, tag names, custom domains and allowed on-demand
//! names), ordering each name's certificate on its own (RFC 8555, with instant-acme).
//!
//! - A name without a valid certificate is ordered at once; an issued one is renewed from two
//!   thirds of its lifetime (plus a random part of another twelfth, so that certificates issued
//!   together are not renewed together).
//! - A failed order is retried after `--acme-retry`, doubled each failure in a row up to a day
//!   (at least an hour after a rate limit); the CA's message is kept for the API and logged.
//! - Certificates are stored before they are served: a restart loads them and orders only
//!   what is missing or due.
//! - At most [`PARALLEL`] orders run at once.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use super::{Cert, Source, Tls};

/// Let's Encrypt's production directory: the default `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
const PARALLEL: usize = 4;
const MAX_BACKOFF: Duration = Duration::from_secs(86400);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    Http01,
    TlsAlpn01,
}

impl Challenge {
    pub fn parse(s: &str) -> Result<Challenge, String> {
        match s {
            "http-01" => Ok(Challenge::Http01),
            "tls-alpn-01" => Ok(Challenge::TlsAlpn01),
            _ => Err(format!("--acme-challenge {s:?}: expected http-01 or tls-alpn-01")),
        }
    }

    fn kind(self) -> ChallengeType {
        match self {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub directory: String,
    pub email: Option<String>,
    pub ca_root: Option<PathBuf>,
    pub challenge: Challenge,
    /// The delay before the first retry of a failed order.
    pub retry: Duration,
}

/// The stored account: its credentials and the directory they belong to.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// instant-acme's HTTP over our reqwest client (rustls with ring, the machine's roots plus
/// `--acme-ca-root`).
struct Http(reqwest::Client);

impl instant_acme::HttpClient for Http {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(never) => match never {},
            };
            let resp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let mut head = http::Response::new(());
            *head.status_mut() = resp.status();
            *head.headers_mut() = resp.headers().clone();
            let bytes = resp.bytes().await.map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            Ok(BytesResponse { parts: head.into_parts().0, body: Box::new(bytes) })
        })
    }
}

fn http_client(cfg: &Config) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30)).user_agent("berth");
    if let Some(root) = &cfg.ca_root {
        let pem = std::fs::read(root)?;
        for c in reqwest::Certificate::from_pem_bundle(&pem)? {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b.build()?)
}

/// Validates `--acme-ca-root` before anything starts.
pub fn check_ca_root(path: &std::path::Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("--acme-ca-root {}: {e}", path.display()))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(v) if !v.is_empty() => {}
        _ => return Err(format!("--acme-ca-root {}: no PEM certificate in it", path.display())),
    }
    // The certificates must also parse as X.509: build the client that will use them.
    let cfg = Config {
        directory: String::new(),
        email: None,
        ca_root: Some(path.to_path_buf()),
        challenge: Challenge::Http01,
        retry: Duration::from_secs(60),
    };
    http_client(&cfg).map(|_| ()).map_err(|e| {
        let s = crate::server::proxy::error_chain(&*e);
        format!("--acme-ca-root {}: not a usable certificate ({s})", path.display())
    })
}

/// An error as the CA (or the network) put it: the problem's detail and type.
fn describe(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => problem(p),
        instant_acme::Error::Other(e) => crate::server::proxy::error_chain(&**e),
        e => e.to_string(),
    }
}

fn problem(p: &instant_acme::Problem) -> String {
    let mut s = p.detail.clone().unwrap_or_else(|| "the CA gave no detail".into());
    if let Some(t) = &p.r#type {
        s.push_str(&format!(" ({})", t.trim_start_matches("urn:ietf:params:acme:error:")));
    }
    for sp in &p.subproblems {
        if let Some(d) = &sp.detail {
            s.push_str(&format!("; {d}"));
        }
    }
    s
}

struct Manager {
    tls: Arc<Tls>,
    cfg: Config,
    http: reqwest::Client,
    account: tokio::sync::Mutex<Option<Arc<Account>>>,
    slots: tokio::sync::Semaphore,
}

/// Runs the manager until the process ends. `names` lists the names the proxy answers now.
pub async fn run(tls: Arc<Tls>, cfg: Config, names: impl Fn() -> Vec<String> + Send + 'static) {
    let http = match http_client(&cfg) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "ACME: cannot build the HTTP client; no certificates will be ordered");
            return;
        }
    };
    let m = Arc::new(Manager {
        tls: tls.clone(),
        cfg,
        http,
        account: tokio::sync::Mutex::new(None),
        slots: tokio::sync::Semaphore::new(PARALLEL),
    });
    loop {
        let now = SystemTime::now();
        let mut wanted = names();
        wanted.extend(tls.on_demand_names.iter().map(|e| e.key().clone()));
        wanted.sort();
        wanted.dedup();
        // New names (a service created, a domain added) are noticed within two seconds.
        let mut next = now + Duration::from_secs(2);
        for name in wanted {
            if !tls.orders_for(&name) {
                continue;
            }
            let issued = tls.issued(&name);
            let mut p = tls.progress.entry(name.clone()).or_default();
            if p.ordering {
                continue;
            }
            let due = match &issued {
                Some(c) if c.not_after > now => {
                    let fp = c.fingerprint();
                    if p.renew_for != fp || p.renew_at.is_none() {
                        p.renew_at = Some(renew_at(c, &fp));
                        p.renew_for = fp;
                    }
                    p.renew_at.expect("set above")
                }
                _ => now,
            };
            let at = due.max(p.next_attempt.unwrap_or(now));
            if at <= now {
                p.ordering = true;
                drop(p);
                let m = m.clone();
                tokio::spawn(async move { m.order(name).await });
            } else {
                next = next.min(at);
            }
        }
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default().max(Duration::from_millis(50));
        tokio::select! {
            _ = tls.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// From two thirds of the lifetime, plus up to another twelfth: a part drawn from the
/// certificate's fingerprint, so it is the same after a restart and differs between
/// certificates issued together.
fn renew_at(c: &Cert, fingerprint: &str) -> SystemTime {
    let life = c.lifetime();
    let seed = u64::from_str_radix(fingerprint.get(..13).unwrap_or("0"), 16).unwrap_or(0);
    let unit = seed as f64 / (1u64 << 52) as f64;
    let jitter = life.mul_f64(unit / 12.0);
    c.not_before + life * 2 / 3 + jitter
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Manager {
    async fn account(&self) -> Result<Arc<Account>, String> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let path = self.tls.store.account();
        let stored: Option<StoredAccount> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let builder = || Account::builder_with_http(Box::new(Http(self.http.clone())));
        let account = match stored.filter(|s| s.directory == self.cfg.directory) {
            Some(s) => builder().from_credentials(s.credentials).await.map_err(|e| describe(&e))?,
            None => {
                let contact = self.cfg.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) = builder()
                    .create(&new, self.cfg.directory.clone(), None)
                    .await
                    .map_err(|e| format!("creating the ACME account: {}", describe(&e)))?;
                let stored = StoredAccount { directory: self.cfg.directory.clone(), credentials };
                let json = serde_json::to_vec_pretty(&stored).map_err(|e| e.to_string())?;
                super::Store::write_private(&path, &json).map_err(|e| format!("storing {}: {e}", path.display()))?;
                tracing::info!(directory = %self.cfg.directory, id = %account.id(), "ACME account created");
                account
            }
        };
        let account = Arc::new(account);
        *slot = Some(account.clone());
        Ok(account)
    }

    async fn order(self: Arc<Self>, name: String) {
        let _slot = self.slots.acquire().await;
        let started = std::time::Instant::now();
        let renewal = self.tls.issued(&name).is_some();
        let result = self.try_order(&name).await;
        let mut p = self.tls.progress.entry(name.clone()).or_default();
        p.ordering = false;
        match result {
            Ok(cert) => {
                let stored = self.tls.store.save(Source::Acme, &name, &cert);
                if let Err(e) = &stored {
                    tracing::error!(host = %name, error = %e, "storing an issued certificate (it is served, but a restart orders again)");
                }
                tracing::info!(
                    host = %name,
                    renewal,
                    not_after = %rfc3339(cert.not_after),
                    ms = started.elapsed().as_millis() as u64,
                    "certificate issued"
                );
                p.error = None;
                p.failures = 0;
                p.next_attempt = None;
                p.renew_at = None;
                drop(p);
                self.tls.install_issued(&name, cert);
                self.tls.save_retries();
            }
            Err(e) => {
                if e.contains("(accountDoesNotExist)") {
                    // The CA forgot the account (a test CA restarted, an account deactivated):
                    // the next attempt registers a new one.
                    drop(p);
                    *self.account.lock().await = None;
                    let _ = std::fs::remove_file(self.tls.store.account());
                    tracing::warn!(directory = %self.cfg.directory, "the ACME CA no longer knows our account; a new one will be made");
                    p = self.tls.progress.entry(name.clone()).or_default();
                }
                p.failures += 1;
                let mut delay = self.cfg.retry.saturating_mul(1 << (p.failures - 1).min(20)).min(MAX_BACKOFF);
                if e.contains("(rateLimited)") {
                    delay = delay.max(Duration::from_secs(3600));
                }
                let delay = delay.mul_f64(0.9 + random_unit() * 0.2);
                p.next_attempt = Some(SystemTime::now() + delay);
                p.error = Some(e.clone());
                let failures = p.failures;
                drop(p);
                self.tls.save_retries();
                tracing::warn!(
                    host = %name,
                    error = %e,
                    failures,
                    retry_in_s = delay.as_secs_f64().round() as u64,
                    "certificate order failed"
                );
                self.tls.order_ended();
            }
        }
        self.tls.wake.notify_one();
    }

    async fn try_order(&self, name: &str) -> Result<Cert, String> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(name.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(|e| describe(&e))?;
        let challenge = self.cfg.challenge;
        let mut tokens = Vec::new();
        let mut set = Vec::new();
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(|e| describe(&e))?;
                match a.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    s => return Err(format!("the CA's authorization for {name} is {s:?}")),
                }
                let mut ch = a
                    .challenge(challenge.kind())
                    .ok_or_else(|| format!("the CA offers no {} challenge for {name}", challenge.name()))?;
                let ka = ch.key_authorization();
                match challenge {
                    Challenge::Http01 => {
                        self.tls.set_http01(&ch.token, ka.as_str());
                        tokens.push(ch.token.clone());
                    }
                    Challenge::TlsAlpn01 => {
                        let key = alpn_cert(name, ka.digest().as_ref())?;
                        self.tls.set_alpn01(name, key);
                        set.push(name.to_string());
                    }
                }
                ch.set_ready().await.map_err(|e| describe(&e))?;
            }
        }
        let status = order.poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90))).await;
        for t in &tokens {
            self.tls.clear_http01(t);
        }
        for n in &set {
            self.tls.clear_alpn01(n);
        }
        match status {
            Ok(OrderStatus::Ready) => {}
            Ok(_) | Err(instant_acme::Error::Api(_)) => {
                let mut why = match &status {
                    Err(e) => describe(e),
                    Ok(s) => format!("the order is {s:?}"),
                };
                // The reason is on the failed challenge.
                let mut authzs = order.authorizations();
                while let Some(Ok(mut a)) = authzs.next().await {
                    if let Ok(st) = a.refresh().await {
                        if let Some(p) = st.challenges.iter().find_map(|c| c.error.as_ref()) {
                            why = problem(p);
                        }
                    }
                }
                return Err(format!("{} validation of {name} failed: {why}", challenge.name()));
            }
            Err(e) => return Err(format!("waiting for the CA to validate {name}: {}", describe(&e))),
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
        order.finalize_csr(csr.der()).await.map_err(|e| format!("finalizing the order: {}", describe(&e)))?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .map_err(|e| format!("fetching the certificate: {}", describe(&e)))?;
        Cert::from_pem(&chain, &key.serialize_pem(), Source::Acme).map_err(|e| format!("the CA's certificate: {e}"))
    }
}

/// The self-signed certificate TLS-ALPN-01 wants (RFC 8737 §3): the name, and the SHA-256 of
/// the key authorization in the critical acmeIdentifier extension.
fn alpn_cert(name: &str, digest: &[u8]) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer)))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_starts_between_two_thirds_and_three_quarters_of_the_lifetime() {
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now;
        p.not_after = now + time::Duration::days(90);
        let c = Cert::from_pem(&p.self_signed(&k).unwrap().pem(), &k.serialize_pem(), Source::Acme).unwrap();
        let mut seen = std::collections::HashSet::new();
        let fp = c.fingerprint();
        assert_eq!(renew_at(&c, &fp), renew_at(&c, &fp), "the same after a restart");
        for i in 0..50u32 {
            use sha2::Digest;
            let other = hex::encode(sha2::Sha256::digest(i.to_le_bytes()));
            let at = renew_at(&c, &other).duration_since(c.not_before).unwrap().as_secs();
            assert!((60 * 86400..=60 * 86400 + 90 * 86400 / 12).contains(&at), "{at}");
            seen.insert(at);
        }
        assert!(seen.len() > 40, "jittered: {}", seen.len());
    }

    #[test]
    fn problems_read_as_the_ca_put_them() {
        let p: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:connection",
            "detail": "127.0.0.1: Connection refused",
            "status": 400
        }))
        .unwrap();
        assert_eq!(problem(&p), "127.0.0.1: Connection refused (connection)");
        assert_eq!(
            Challenge::parse("dns-01").unwrap_err(),
            "--acme-challenge \"dns-01\": expected http-01 or tls-alpn-01"
        );
    }
}
