//! The OCI distribution client: resolves references to image manifests (picking the host's
//! platform from an index), streams blobs into the blob store, and pushes blobs and manifests.
//!
//! Reads try each configured mirror in order and fall back to the registry itself. Loopback
//! and `insecure` registries are spoken to in plain HTTP. Authentication starts anonymous and
//! answers the `WWW-Authenticate` challenge (Basic with the configured credentials, or a Bearer
//! token from the challenge's realm), caching tokens per (host, repository, actions).

mod auth;
pub mod manifest;

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode, Url};

use crate::config::Config;
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::{self, Store};

pub use auth::{parse_challenges, Challenge};
pub use manifest::{Descriptor, Index, Manifest, Platform};

/// Manifests larger than this are refused (containerd uses the same bound): they are read
/// into memory.
const MAX_MANIFEST: usize = 4 << 20;
/// How much of an error body is kept for the message.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Docker Hub's API lives on another host than its name.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A manifest resolved for one platform.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The digest of the image manifest (not of the index it was picked from).
    pub digest: Digest,
    pub media_type: String,
    /// The manifest exactly as served: its digest is `digest`.
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
    /// The index the manifest was picked from, if the reference named one.
    pub index: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {detail}")]
    Transport { what: String, detail: String },
    #[error("{what}: the registry answered {status}{}", suffix(detail))]
    Status { what: String, status: StatusCode, detail: String },
    #[error("{what}: manifest unknown: {reference} does not exist in the registry")]
    ManifestUnknown { what: String, reference: String },
    #[error("{what}: blob unknown to the registry")]
    BlobUnknown { what: String },
    #[error(
        "{what}: unauthorized: {registry} refused access ({}){}",
        credentials_note(registry, username),
        suffix(detail)
    )]
    Unauthorized { what: String, registry: String, username: Option<String>, detail: String },
    #[error("{what}: getting a token from {realm}: {detail}")]
    Token { what: String, realm: String, detail: String },
    #[error("{what}: the registry sent content with digest {actual}, expected {expected}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("{what}: schema1 manifests are not supported (push the image again with a current tool to get a schema2/OCI manifest)")]
    Schema1 { what: String },
    #[error("{what}: no manifest for platform {platform} (the index has: {available})")]
    NoPlatform { what: String, platform: String, available: String },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("{what}: writing to the blob store: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {source}")]
    Store { what: String, source: store::Error },
    #[error("setting up the HTTP client: {0}")]
    Setup(String),
}

fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn credentials_note(registry: &str, username: &Option<String>) -> String {
    match username {
        Some(u) => format!("with the configured credentials of user {u:?}"),
        None => format!("no credentials are configured for {registry}; the repository may be private, or not exist"),
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Where requests for one repository go: a mirror or the registry itself.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `host[:port]` as connected to; also the token cache's key.
    host: String,
    /// `http://host[:port]` or `https://…`.
    base: String,
    /// A mirror's path prefix, with a trailing '/' (or empty).
    prefix: String,
    skip_tls_verify: bool,
    credentials: Option<(String, String)>,
    mirror: bool,
}

impl Endpoint {
    fn repository(&self, repository: &str) -> String {
        format!("{}{repository}", self.prefix)
    }

    fn url(&self, repository: &str, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository(repository))
    }
}

/// True for `localhost`, `127.0.0.0/8` and `[::1]`, with or without a port.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || name.parse::<std::net::Ipv6Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The root cause of a transport error, which is what a person can act on ("connection
/// refused"), rather than reqwest's "error sending request for url (…)".
fn describe(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let mut s = cause.to_string();
    if e.is_timeout() && !s.contains("timed out") {
        s = format!("timed out ({s})");
    }
    // "Connection refused (os error 111)" → "connection refused (os error 111)", but keep
    // acronyms ("TLS …") as they are.
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(a), Some(b)) if a.is_ascii_uppercase() && b.is_ascii_lowercase() => {
            a.to_ascii_lowercase().to_string() + &s[1..]
        }
        _ => s,
    }
}

fn transport(what: &str) -> impl FnOnce(reqwest::Error) -> Error + '_ {
    move |e| Error::Transport { what: what.to_string(), detail: describe(&e) }
}

/// The registry's error message out of an error body (`{"errors":[{"code","message"}]}`), or
/// the start of the body.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        return e
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (false, true) => e.code.clone(),
                _ => e.message.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text.chars().take(200).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

async fn read_limited(resp: Response, limit: usize, what: &str) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(Error::Invalid { what: what.into(), detail: format!("the response is larger than {limit} bytes") });
    }
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(transport(what))?;
        if out.len() + chunk.len() > limit {
            return Err(Error::Invalid {
                what: what.into(),
                detail: format!("the response is larger than {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The media type from a Content-Type header, without parameters.
fn content_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let v = v.split(';').next().unwrap_or("").trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// A request body streaming a file (so that pushing a layer never holds it in memory).
fn file_body(file: std::fs::File) -> reqwest::Body {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::from_std(file);
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, io::Error>(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    reqwest::Body::wrap_stream(stream)
}

type Build<'a> = dyn Fn(&reqwest::Client) -> Result<RequestBuilder> + Send + Sync + 'a;

/// The registry client. Cheap to share (`&Client` across tasks); it keeps connection pools and
/// the token cache.
#[derive(Debug)]
pub struct Client {
    config: Config,
    http: reqwest::Client,
    /// For registries with `skip_tls_verify`.
    http_unverified: reqwest::Client,
    tokens: auth::Cache,
}

impl Client {
    pub fn new(config: &Config) -> Result<Client> {
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(30))
                // Per read, not per request: a layer may take long, a stalled one must not hang.
                .read_timeout(Duration::from_secs(120))
        };
        let http = builder().build().map_err(|e| Error::Setup(describe(&e)))?;
        let http_unverified =
            builder().danger_accept_invalid_certs(true).build().map_err(|e| Error::Setup(describe(&e)))?;
        Ok(Client { config: config.clone(), http, http_unverified, tokens: auth::Cache::default() })
    }

    /// The registry itself, for a reference's registry host.
    fn upstream(&self, registry: &str) -> Endpoint {
        let rc = self.config.registry(registry);
        let host = if registry == DOCKER_HUB { DOCKER_HUB_API } else { registry };
        let plain = rc.insecure || is_loopback(registry);
        Endpoint {
            host: host.to_string(),
            base: format!("{}://{host}", if plain { "http" } else { "https" }),
            prefix: String::new(),
            skip_tls_verify: rc.skip_tls_verify,
            credentials: rc.username.clone().map(|u| (u, rc.password.clone().unwrap_or_default())),
            mirror: false,
        }
    }

    /// A mirror entry: `[http[s]://]host[:port][/prefix]`, with its own settings (plain HTTP,
    /// TLS, credentials) from the registry entry of its host, if any.
    fn mirror(&self, entry: &str) -> Endpoint {
        let (scheme, rest) = match entry.split_once("://") {
            Some((s, rest)) => (Some(s.to_ascii_lowercase()), rest),
            None => (None, entry),
        };
        let rest = rest.trim_end_matches('/');
        let (host, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("{}/", p.trim_matches('/'))),
            None => (rest, String::new()),
        };
        let mc = self.config.registry(host);
        let plain = match scheme.as_deref() {
            Some("http") => true,
            Some(_) => false,
            None => mc.insecure || is_loopback(host),
        };
        Endpoint {
            host: host.to_string(),
            base: format!("{}://{host}", if plain { "http" } else { "https" }),
            prefix,
            skip_tls_verify: mc.skip_tls_verify,
            credentials: mc.username.clone().map(|u| (u, mc.password.clone().unwrap_or_default())),
            mirror: true,
        }
    }

    /// Where reads go, in order: the mirrors, then the registry.
    fn read_endpoints(&self, r: &Reference) -> Vec<Endpoint> {
        let rc = self.config.registry(r.registry());
        let mut eps: Vec<Endpoint> =
            rc.mirrors.iter().filter(|m| !m.trim().is_empty()).map(|m| self.mirror(m.trim())).collect();
        eps.push(self.upstream(r.registry()));
        eps
    }

    /// Sends a request, answering one authentication challenge: anonymous (or with a cached
    /// token) first; on 401, authenticate as the challenge asks and retry once. `build` is
    /// called per attempt, so a streamed body is recreated.
    async fn send(
        &self,
        ep: &Endpoint,
        repository: &str,
        actions: &str,
        what: &str,
        build: &Build<'_>,
    ) -> Result<Response> {
        let client = if ep.skip_tls_verify { &self.http_unverified } else { &self.http };
        let key = auth::Key { host: ep.host.clone(), repository: repository.to_string(), actions: actions.to_string() };
        let mut req = build(client)?;
        if let Some(value) = self.tokens.get(&key) {
            req = req.header(AUTHORIZATION, value);
        }
        let resp = req.send().await.map_err(transport(what))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let detail = error_detail(&resp.bytes().await.unwrap_or_default());
        let value = self.authenticate(ep, repository, actions, &challenges, what, detail).await?;
        self.tokens.insert(key.clone(), value.0.clone(), value.1);
        let resp = build(client)?.header(AUTHORIZATION, value.0).send().await.map_err(transport(what))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.tokens.remove(&key);
        }
        Ok(resp)
    }

    /// The `Authorization` value answering `challenges`, and how long it may be reused.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        repository: &str,
        actions: &str,
        challenges: &[Challenge],
        what: &str,
        detail: String,
    ) -> Result<(String, Option<Duration>)> {
        let unauthorized = |detail: String| Error::Unauthorized {
            what: what.into(),
            registry: ep.host.clone(),
            username: ep.credentials.as_ref().map(|c| c.0.clone()),
            detail,
        };
        let basic = ep
            .credentials
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = c.param("realm").filter(|r| !r.is_empty()) else {
                return Err(unauthorized("the registry's Bearer challenge names no realm".into()));
            };
            let mut url = Url::parse(realm).map_err(|e| Error::Token {
                what: what.into(),
                realm: realm.into(),
                detail: format!("invalid realm URL: {e}"),
            })?;
            {
                let mut q = url.query_pairs_mut();
                if let Some(service) = c.param("service").filter(|s| !s.is_empty()) {
                    q.append_pair("service", service);
                }
                // The challenge's scope, plus ours: a challenge may be for less than we are
                // about to do (pull, when we push next), or absent.
                let ours = auth::scope(repository, actions);
                if let Some(theirs) = c.param("scope").filter(|s| !s.is_empty() && *s != ours) {
                    q.append_pair("scope", theirs);
                }
                q.append_pair("scope", &ours);
            }
            let client = if ep.skip_tls_verify { &self.http_unverified } else { &self.http };
            let mut req = client.get(url.clone());
            if let Some(b) = &basic {
                req = req.header(AUTHORIZATION, b);
            }
            let token_err = |detail: String| Error::Token { what: what.into(), realm: realm.into(), detail };
            let resp = req.send().await.map_err(|e| token_err(describe(&e)))?;
            let status = resp.status();
            let body = read_limited(resp, MAX_ERROR_BODY, what).await?;
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(unauthorized(format!(
                    "the token service {realm} answered {status}{}",
                    suffix(&error_detail(&body))
                )));
            }
            if !status.is_success() {
                return Err(token_err(format!("answered {status}{}", suffix(&error_detail(&body)))));
            }
            let token = auth::parse_token(&body).map_err(token_err)?;
            tracing::debug!(host = %ep.host, repository, actions, lifetime = ?token.expires_in, "got a registry token");
            return Ok((format!("Bearer {}", token.token), Some(token.expires_in)));
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            return match basic {
                Some(b) => Ok((b, None)),
                None => Err(unauthorized(detail)),
            };
        }
        let schemes: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        Err(unauthorized(if schemes.is_empty() {
            "no WWW-Authenticate challenge".into()
        } else {
            format!("unsupported authentication scheme {}", schemes.join(", "))
        }))
    }

    /// Turns a non-success answer into an error (401/403 into Unauthorized).
    async fn check(&self, ep: &Endpoint, resp: Response, what: &str) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = read_limited(resp, MAX_ERROR_BODY, what).await.unwrap_or_default();
        let detail = error_detail(&body);
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Error::Unauthorized {
                what: what.into(),
                registry: ep.host.clone(),
                username: ep.credentials.as_ref().map(|c| c.0.clone()),
                detail,
            });
        }
        Err(Error::Status { what: what.into(), status, detail })
    }

    /// Resolves `r` to an image manifest for `platform`: by digest if it has one (verified),
    /// else by tag; through an index if the registry serves one.
    pub async fn resolve(&self, r: &Reference, platform: &Platform) -> Result<Resolved> {
        let eps = self.read_endpoints(r);
        let last = eps.len() - 1;
        for (i, ep) in eps.iter().enumerate() {
            match self.resolve_on(ep, r, platform).await {
                Ok(res) => return Ok(res),
                Err(e) if i < last => log_mirror_failure(ep, r, &e),
                Err(e) => return Err(e),
            }
        }
        unreachable!("the registry itself is always the last endpoint")
    }

    async fn resolve_on(&self, ep: &Endpoint, r: &Reference, platform: &Platform) -> Result<Resolved> {
        let what = if ep.mirror {
            format!("pulling manifest of {r} from mirror {}", ep.host)
        } else {
            format!("pulling manifest of {r}")
        };
        let (bytes, media_type, digest) = self.get_manifest(ep, r, &r.manifest_ref(), r.digest(), &what).await?;
        if manifest::is_schema1(&media_type) {
            return Err(Error::Schema1 { what });
        }
        if manifest::is_index(&media_type) {
            let index: Index = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Invalid { what: what.clone(), detail: format!("malformed image index: {e}") })?;
            let Some(desc) = manifest::select(&index, platform) else {
                let mut available: Vec<String> =
                    index.manifests.iter().filter_map(|d| d.platform.as_ref()).map(|p| p.to_string()).collect();
                available.dedup();
                return Err(Error::NoPlatform {
                    what,
                    platform: platform.to_string(),
                    available: if available.is_empty() { "no platforms".into() } else { available.join(", ") },
                });
            };
            let what = format!("{what} ({platform}: sha256:{})", desc.digest.short());
            let (bytes, media_type, digest_child) =
                self.get_manifest(ep, r, desc.digest.as_str(), Some(&desc.digest), &what).await?;
            if bytes.len() as u64 != desc.size {
                return Err(Error::Invalid {
                    what,
                    detail: format!("the manifest is {} bytes, the index says {}", bytes.len(), desc.size),
                });
            }
            let manifest = parse_manifest(&bytes, &media_type, &what)?;
            return Ok(Resolved { digest: digest_child, media_type, bytes, manifest, index: Some(digest) });
        }
        let manifest = parse_manifest(&bytes, &media_type, &what)?;
        Ok(Resolved { digest, media_type, bytes, manifest, index: None })
    }

    /// GETs `/manifests/<reference>`, returning the bytes, media type and (verified) digest.
    async fn get_manifest(
        &self,
        ep: &Endpoint,
        r: &Reference,
        reference: &str,
        expected: Option<&Digest>,
        what: &str,
    ) -> Result<(Vec<u8>, String, Digest)> {
        let repo = ep.repository(r.repository());
        let url = ep.url(r.repository(), &format!("manifests/{reference}"));
        let accept = manifest::ACCEPTED.join(", ");
        let resp = self.send(ep, &repo, "pull", what, &|c| Ok(c.get(&url).header(ACCEPT, &accept))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::ManifestUnknown { what: what.into(), reference: r.to_string() });
        }
        let resp = self.check(ep, resp, what).await?;
        let header_type = content_type(resp.headers());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = read_limited(resp, MAX_MANIFEST, what).await?;
        let actual = Digest::of(&bytes);
        // By digest: the bytes must be what was asked for. By tag: what the registry says it
        // sent (a proxy mangling a manifest would otherwise go unnoticed).
        if let Some(expected) = expected.or(header_digest.as_ref()) {
            if *expected != actual {
                return Err(Error::DigestMismatch { what: what.into(), expected: expected.clone(), actual });
            }
        }
        let known = |t: &str| manifest::ACCEPTED.contains(&t) || manifest::is_schema1(t);
        let media_type = match header_type {
            Some(t) if known(&t) => t,
            // No or a generic Content-Type (application/json, text/plain): the body says.
            _ => manifest::sniff_media_type(&bytes).ok_or_else(|| Error::Invalid {
                what: what.into(),
                detail: "the registry sent something that is not a manifest".into(),
            })?,
        };
        Ok((bytes, media_type, actual))
    }

    /// Streams the blob `digest` of `r`'s repository into `store` (never whole in memory),
    /// verifying its digest (and size, if given). `progress` gets the bytes received so far.
    /// Does nothing if the store already has the blob.
    pub async fn fetch_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        size: Option<u64>,
        store: &Store,
        progress: impl Fn(u64),
    ) -> Result<()> {
        if store.has(digest) {
            return Ok(());
        }
        let eps = self.read_endpoints(r);
        let last = eps.len() - 1;
        for (i, ep) in eps.iter().enumerate() {
            match self.fetch_blob_on(ep, r, digest, size, store, &progress).await {
                Ok(()) => return Ok(()),
                Err(e) if i < last => log_mirror_failure(ep, r, &e),
                Err(e) => return Err(e),
            }
        }
        unreachable!("the registry itself is always the last endpoint")
    }

    async fn fetch_blob_on(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &Digest,
        size: Option<u64>,
        store: &Store,
        progress: &impl Fn(u64),
    ) -> Result<()> {
        let what = if ep.mirror {
            format!("pulling blob sha256:{} of {r} from mirror {}", digest.short(), ep.host)
        } else {
            format!("pulling blob sha256:{} of {r}", digest.short())
        };
        let repo = ep.repository(r.repository());
        let url = ep.url(r.repository(), &format!("blobs/{digest}"));
        // Redirects (to a CDN or object store) are followed by reqwest, which drops the
        // Authorization header when the host or port changes.
        let resp = self.send(ep, &repo, "pull", &what, &|c| Ok(c.get(&url))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::BlobUnknown { what });
        }
        let resp = self.check(ep, resp, &what).await?;
        if let (Some(want), Some(len)) = (size, resp.content_length()) {
            if want != len {
                return Err(Error::Invalid {
                    what,
                    detail: format!("the registry announced {len} bytes, the manifest says {want}"),
                });
            }
        }
        let mut ingest = store.ingest(digest, size).map_err(|source| Error::Store { what: what.clone(), source })?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(transport(&what))?;
            if let Err(e) = ingest.write_all(&chunk) {
                return Err(if e.kind() == io::ErrorKind::InvalidData {
                    Error::Invalid { what, detail: e.to_string() }
                } else {
                    Error::Io { what, source: e }
                });
            }
            progress(ingest.written());
        }
        // The fsync in commit may take a while: not on the async workers.
        let committed = tokio::task::spawn_blocking(move || ingest.commit())
            .await
            .map_err(|e| Error::Io { what: what.clone(), source: io::Error::other(e.to_string()) })?;
        match committed {
            Ok(_) => Ok(()),
            Err(store::Error::DigestMismatch { expected, actual }) => {
                Err(Error::DigestMismatch { what, expected, actual })
            }
            Err(source) => Err(Error::Store { what, source }),
        }
    }

    /// Uploads the blob `digest` from `store` to `r`'s repository, unless the registry has it:
    /// HEAD, else POST an upload and PUT the whole blob to its location.
    pub async fn push_blob(&self, r: &Reference, digest: &Digest, store: &Store) -> Result<()> {
        let ep = self.upstream(r.registry());
        let repo = ep.repository(r.repository());
        let what = format!("pushing blob sha256:{} to {}", digest.short(), r.name());
        let actions = "pull,push";

        let url = ep.url(r.repository(), &format!("blobs/{digest}"));
        let resp = self.send(&ep, &repo, actions, &what, &|c| Ok(c.head(&url))).await?;
        if resp.status().is_success() {
            tracing::debug!(%digest, reference = %r, "blob already in the registry");
            return Ok(());
        }
        if resp.status() != StatusCode::NOT_FOUND {
            self.check(&ep, resp, &what).await?;
        }

        let size = store.size(digest).map_err(|source| Error::Store { what: what.clone(), source })?;
        let start = ep.url(r.repository(), "blobs/uploads/");
        let resp = self.send(&ep, &repo, actions, &what, &|c| Ok(c.post(&start).header(CONTENT_LENGTH, 0))).await?;
        let resp = self.check(&ep, resp, &what).await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Invalid { what: what.clone(), detail: "the upload answer has no Location".into() })?;
        // Location may be absolute or relative to the request.
        let mut upload = Url::parse(&start).and_then(|base| base.join(location)).map_err(|e| Error::Invalid {
            what: what.clone(),
            detail: format!("invalid upload location {location:?}: {e}"),
        })?;
        upload.query_pairs_mut().append_pair("digest", digest.as_str());

        let path = store.path(digest);
        let resp = self
            .send(&ep, &repo, actions, &what, &|c| {
                let file = std::fs::File::open(&path).map_err(|e| Error::Io { what: what.clone(), source: e })?;
                Ok(c.put(upload.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size)
                    .body(file_body(file)))
            })
            .await?;
        self.check(&ep, resp, &what).await?;
        Ok(())
    }

    /// Uploads a manifest as-is (so its digest is kept) under `r`'s tag (or digest); returns
    /// its digest.
    pub async fn push_manifest(&self, r: &Reference, bytes: &[u8], media_type: &str) -> Result<Digest> {
        let ep = self.upstream(r.registry());
        let repo = ep.repository(r.repository());
        let what = format!("pushing manifest to {r}");
        let digest = Digest::of(bytes);
        if let Some(want) = r.digest() {
            if *want != digest {
                return Err(Error::DigestMismatch { what, expected: want.clone(), actual: digest });
            }
        }
        let target = r.tag().map(str::to_string).unwrap_or_else(|| digest.to_string());
        let url = ep.url(r.repository(), &format!("manifests/{target}"));
        let body = bytes.to_vec();
        let resp = self
            .send(&ep, &repo, "pull,push", &what, &|c| {
                Ok(c.put(&url).header(CONTENT_TYPE, media_type).body(body.clone()))
            })
            .await?;
        let resp = self.check(&ep, resp, &what).await?;
        if let Some(theirs) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok())
        {
            if theirs != digest {
                return Err(Error::DigestMismatch { what, expected: digest, actual: theirs });
            }
        }
        Ok(digest)
    }
}

fn parse_manifest(bytes: &[u8], media_type: &str, what: &str) -> Result<Manifest> {
    if manifest::is_schema1(media_type) {
        return Err(Error::Schema1 { what: what.into() });
    }
    if !manifest::is_manifest(media_type) {
        return Err(Error::Invalid {
            what: what.into(),
            detail: format!("unsupported manifest media type {media_type:?}"),
        });
    }
    let m: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::Invalid { what: what.into(), detail: format!("malformed image manifest: {e}") })?;
    if m.schema_version != 2 {
        return Err(Error::Invalid {
            what: what.into(),
            detail: format!("unsupported manifest schemaVersion {}", m.schema_version),
        });
    }
    Ok(m)
}

fn log_mirror_failure(ep: &Endpoint, r: &Reference, e: &Error) {
    // A mirror lacking something is routine; anything else deserves a look.
    if matches!(e, Error::ManifestUnknown { .. } | Error::BlobUnknown { .. }) {
        tracing::debug!(mirror = %ep.host, reference = %r, "mirror does not have it, trying the next source: {e}");
    } else {
        tracing::warn!(mirror = %ep.host, reference = %r, "mirror failed, trying the next source: {e}");
    }
}

#[cfg(test)]
pub(crate) mod tests;
