//! The reverse proxy on `--http-addr`: routes by Host to a service's instances (or the control
//! host to the API), holds requests while an instance starts or thaws, and forwards them with
//! streaming bodies both ways, keep-alive and protocol upgrades (WebSockets).
//!
//! The life of a request (one task per connection, hyper's HTTP/1.1 server):
//! 1. framing checked (Content-Length together with Transfer-Encoding is refused), Host
//!    normalised and routed ([`Platform::route`]): unknown hosts get 404 `unknown-host`;
//! 2. [`Service::acquire`] gives a lease on a ready instance at once, or a place in the
//!    service's bounded queue; while held, the request body is read into memory up to
//!    `--hold-body-limit` so the client can finish sending; the wait ends with a lease, a refusal
//!    (503) or the request timeout (504);
//! 3. hop-by-hop headers are removed, `X-Forwarded-*` set, and the request goes to
//!    `instance_ip:port` over a pooled HTTP/1.1 connection; the response streams back frame by
//!    frame, and the lease is held until its body ends (or, for an upgrade, until the tunnel
//!    closes), so in-flight work always counts as activity.
//!
//! Errors are one fixed set, each with a `berth-error` header naming the cause: 404
//! `unknown-host`, 400 `bad-request`, 502 `upstream-failed`, 503 `queue-full` / `start-failed` /
//! `not-deployed` (with `Retry-After`), 504 `cold-start-timeout` / `upstream-timeout`.
//!
//! Architecture Invariant: nothing here touches the database or the engine; a request waits
//! only on the service's in-memory state and the instance itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt;

mod framing;

use super::platform::{Acquired, Lease, Platform, Refusal, Route, Service};
use super::settings::Cidr;
use super::tls::Tls;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResolveFn = fn(Name) -> std::future::Ready<Result<std::iter::Once<SocketAddr>, std::io::Error>>;
type Resolver = tower::util::ServiceFn<ResolveFn>;

/// The host name an instance's upstream connections are pooled under: unique per instance
/// (service id and slot), with the address in it. Pooling by `ip:port` alone could hand a
/// connection opened to a stopped instance to a new one that got the same address.
fn instance_authority(service: i64, lease: &Lease) -> String {
    let SocketAddr::V4(a) = lease.addr else { return lease.addr.to_string() };
    let [o1, o2, o3, o4] = a.ip().octets();
    format!("s{service}-i{}-{o1}-{o2}-{o3}-{o4}.instance:{}", lease.slot(), a.port())
}

/// The address in an [`instance_authority`] name (the connector takes the port from the URI).
fn instance_addr(name: &str) -> Option<SocketAddr> {
    let host = name.strip_suffix(".instance")?;
    let mut parts = host.rsplitn(5, '-');
    let o4 = parts.next()?.parse().ok()?;
    let o3 = parts.next()?.parse().ok()?;
    let o2 = parts.next()?.parse().ok()?;
    let o1 = parts.next()?.parse().ok()?;
    Some(SocketAddr::new(std::net::Ipv4Addr::new(o1, o2, o3, o4).into(), 0))
}

fn resolve(name: Name) -> std::future::Ready<Result<std::iter::Once<SocketAddr>, std::io::Error>> {
    std::future::ready(
        instance_addr(name.as_str())
            .map(std::iter::once)
            .ok_or_else(|| std::io::Error::other(format!("{} is not an instance name", name.as_str()))),
    )
}
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Request heads larger than this are refused (431) by the HTTP parser.
const MAX_HEAD: usize = 64 * 1024;

pub struct Proxy {
    platform: Arc<Platform>,
    client: Client<HttpConnector<Resolver>, Body>,
    /// HTTP/2 connections to instances of services that speak h2c, one per instance (it
    /// multiplexes), by [`instance_authority`].
    h2c: dashmap::DashMap<String, hyper::client::conn::http2::SendRequest<Body>>,
    control: axum::Router,
    trusted: Vec<Cidr>,
    hold_body_limit: usize,
    header_timeout: Duration,
    /// Containers' subnet: they are not let through to the control host.
    containers: berth_agent::network::Subnet,
    /// TLS on `--https-addr`: certificates and the ACME challenges.
    tls: Option<Arc<Tls>>,
    /// The port HTTPS redirects name (omitted when it is 443).
    https_port: Option<u16>,
    /// Where the control host's requests (the API, dashboard, git) run: the server's main
    /// runtime, so that what they start outlives a proxy thread's runtime. None: right here.
    control_rt: Option<tokio::runtime::Handle>,
}

impl Proxy {
    pub fn new(
        platform: Arc<Platform>,
        control: axum::Router,
        trusted: Vec<Cidr>,
        hold_body_limit: usize,
        header_timeout: Duration,
        containers: berth_agent::network::Subnet,
        https: Option<(Arc<Tls>, u16)>,
    ) -> Proxy {
        let (tls, https_port) = match https {
            Some((t, p)) => (Some(t), Some(p)),
            None => (None, None),
        };
        let mut http = HttpConnector::new_with_resolver(tower::service_fn(resolve as ResolveFn));
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(http);
        let h2c = dashmap::DashMap::new();
        Proxy {
            platform,
            client,
            h2c,
            control,
            trusted,
            hold_body_limit,
            header_timeout,
            containers,
            tls,
            https_port,
            control_rt: None,
        }
    }

    /// Runs the control host's requests on `rt` instead of the runtime serving the connection.
    pub fn with_control_runtime(mut self, rt: tokio::runtime::Handle) -> Proxy {
        self.control_rt = Some(rt);
        self
    }

    /// Serves one TLS connection: the handshake picks the certificate (see [`Tls::accept`]),
    /// then HTTP/2 or HTTP/1.1 as ALPN chose.
    pub async fn tls_conn(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let Some(tls) = self.tls.clone() else { return };
        let _ = stream.set_nodelay(true);
        let me = self;
        let platform = me.platform.clone();
        let wanted = move |name: &str| !matches!(platform.route(name, false), Route::Unknown(_));
        let handshake = tokio::time::timeout(Duration::from_secs(40), tls.accept(stream, wanted)).await;
        let (stream, h2) = match handshake {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let timeout = me.header_timeout;
        if h2 {
            // Streams open now, and when the last one ended: an HTTP/2 connection with
            // none for H2_IDLE is closed (GOAWAY), as an idle HTTP/1.1 one is.
            let idle = Arc::new(Idle { open: AtomicUsize::new(0), since: Mutex::new(Instant::now()) });
            let idle2 = idle.clone();
            let svc = hyper::service::service_fn(move |req| {
                let me = me.clone();
                let guard = Stream::open(idle2.clone());
                async move {
                    let resp = me.handle(req, peer, framing::Note::default(), true).await;
                    Ok::<_, Infallible>(resp.map(|b| Counted { inner: b, _guard: guard }.boxed_unsync()))
                }
            });
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_header_list_size(MAX_HEAD as u32)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20));
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let mut check = tokio::time::interval(Duration::from_secs(1));
            let mut closing: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = check.tick() => match closing {
                        None if idle.is_idle(timeout * H2_IDLE) => {
                            closing = Some(Instant::now());
                            conn.as_mut().graceful_shutdown();
                        }
                        // A client that never sent its preface (hyper only closes after
                        // the handshake), or that ignores GOAWAY: dropped.
                        Some(t) if t.elapsed() >= timeout.max(Duration::from_secs(2)) && idle.is_idle(Duration::ZERO) => break,
                        _ => {}
                    },
                }
            }
        } else {
            let flags = framing::Flags::default();
            let io = TokioIo::new(framing::Watched::new(stream, flags.clone(), MAX_HEAD));
            let svc = hyper::service::service_fn(move |req| {
                let me = me.clone();
                let note = flags.lock().unwrap_or_else(|e| e.into_inner()).pop_front().unwrap_or_default();
                async move { Ok::<_, Infallible>(me.handle(req, peer, note, true).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(2 * MAX_HEAD);
            let _ = b.serve_connection(io, svc).with_upgrades().await;
        }
    }

    /// Accepts plain HTTP connections until `shutdown` resolves, serving them on this runtime.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        accept_loop(&listener, "proxy accept failed", shutdown, |stream, peer| {
            tokio::spawn(self.clone().http_conn(stream, peer));
        })
        .await
    }

    /// Serves one plain HTTP/1.1 connection.
    pub async fn http_conn(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let timeout = self.header_timeout;
        let me = self;
        let flags = framing::Flags::default();
        let io = TokioIo::new(framing::Watched::new(stream, flags.clone(), MAX_HEAD));
        let svc = hyper::service::service_fn(move |req| {
            let me = me.clone();
            let note = flags.lock().unwrap_or_else(|e| e.into_inner()).pop_front().unwrap_or_default();
            async move { Ok::<_, Infallible>(me.handle(req, peer, note, false).await) }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        // hyper's buffer is larger than MAX_HEAD so that the scanner's limit, with a berth-error
        // answer, is the one clients meet.
        b.timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(2 * MAX_HEAD);
        let _ = b.serve_connection(io, svc).with_upgrades().await;
    }

    /// `note`: what the connection's scanner saw in this request's head (hyper resolves a
    /// Content-Length + Transfer-Encoding conflict itself, so only the scanner can tell).
    /// `https`: the request came over TLS.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        note: framing::Note,
        https: bool,
    ) -> Response<Body> {
        let close = |mut r: Response<Body>| {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        };
        if note.too_large {
            return close(error(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header-too-large",
                format!("the request head is larger than {} KiB", MAX_HEAD / 1024),
            ));
        }
        let h = req.headers();
        if note.cl_and_te || (h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING)) {
            return close(error(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "a request must not carry both Content-Length and Transfer-Encoding".into(),
            ));
        }
        let codings: Vec<String> = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        if codings.iter().any(|c| c != "chunked") {
            return close(error(
                StatusCode::NOT_IMPLEMENTED,
                "bad-request",
                format!("transfer coding {:?} is not supported: only chunked", codings.join(", ")),
            ));
        }
        if h.get_all(header::HOST).iter().count() > 1 {
            return close(error(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "the request has more than one Host header".into(),
            ));
        }
        if req.method() == http::Method::OPTIONS && req.uri() == "*" {
            // Server-wide OPTIONS: answered here, there is no resource to ask an instance about.
            let mut r = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed_unsync());
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
            return r;
        }
        // An absolute-form target names the host, and Host must say the same (RFC 9112 §3.2.2).
        if let Some(auth) = req.uri().authority().map(|a| a.as_str().to_string()) {
            if let Ok(v) = HeaderValue::from_str(&auth) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string);
        let Some(host) = host else {
            return error(StatusCode::BAD_REQUEST, "bad-request", "the request has no Host header".into());
        };
        let from_container =
            matches!(peer.ip().to_canonical(), std::net::IpAddr::V4(ip) if self.containers.contains(ip));
        // An ACME HTTP-01 validation: answered here, before routing and never redirected.
        if let (false, Some(tls), Some(token)) =
            (https, &self.tls, req.uri().path().strip_prefix(super::tls::HTTP01_PREFIX))
        {
            if let Some(ka) = tls.http01(token) {
                let mut r = Response::new(Full::new(Bytes::from(ka)).map_err(|n| match n {}).boxed_unsync());
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                return r;
            }
        }
        match self.platform.route(&host, from_container) {
            Route::Control => {
                if from_container {
                    return error(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "containers may not reach the control host".into(),
                    );
                }
                let call = self.control.clone().oneshot(req.map(axum::body::Body::new));
                let resp = match &self.control_rt {
                    Some(rt) => match rt.spawn(call).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "a control-host request failed");
                            return error(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "internal",
                                "the server failed to answer this request".into(),
                            );
                        }
                    },
                    None => call.await,
                };
                let resp = match resp {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                resp.map(|b| b.map_err(BoxError::from).boxed_unsync())
            }
            Route::Unknown(host) => {
                error(StatusCode::NOT_FOUND, "unknown-host", format!("no service answers at {host:?}"))
            }
            Route::Service(svc, tag) => {
                let settings = svc.https();
                // Only a path that can be a challenge (one token of base64url characters) is
                // exempt: `/.well-known/acme-challenge/../x` is redirected like any other.
                let challenge = req.uri().path().strip_prefix(super::tls::HTTP01_PREFIX).is_some_and(|t| {
                    !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
                if !https && settings.redirect && !challenge && !from_container && self.https_port.is_some() {
                    return self.redirect(&host, &req);
                }
                let mut resp = self.forward(svc, tag, req, peer, &host, https).await;
                if let (true, Some(age)) = (https, settings.hsts_max_age) {
                    if let Ok(v) = HeaderValue::from_str(&format!("max-age={age}")) {
                        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, v);
                    }
                }
                resp
            }
        }
    }

    /// 308 to the same URL over HTTPS (the method and body are kept by the client).
    fn redirect(&self, host: &str, req: &Request<Incoming>) -> Response<Body> {
        let name = super::platform::normalize_host(host);
        let authority = match self.https_port {
            Some(443) | None => name,
            Some(p) => format!("{name}:{p}"),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{authority}{path}");
        let mut r = error(
            StatusCode::PERMANENT_REDIRECT,
            "https-redirect",
            format!("this service is served over HTTPS: {location}"),
        );
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    async fn forward(
        &self,
        svc: Arc<Service>,
        tag: Option<String>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        host: &str,
        https: bool,
    ) -> Response<Body> {
        let timeout = Duration::from_millis(svc.scaling().request_timeout_ms);
        let deadline = Instant::now() + timeout;
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, mut incoming) = req.into_parts();
        let mut held = Vec::new();
        let mut body_done = incoming.is_end_stream();
        let lease = match svc.acquire(tag.as_deref()) {
            Acquired::Now(l) => l,
            Acquired::Refused(r) => return refusal(&svc, r),
            Acquired::Held(mut rx) => {
                let mut size = 0usize;
                let sleep = tokio::time::sleep_until(deadline);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut rx => match r {
                            Ok(Ok(l)) => break l,
                            Ok(Err(r)) => return refusal(&svc, r),
                            Err(_) => return refusal(&svc, Refusal::Deleted),
                        },
                        f = incoming.frame(), if !body_done && size < self.hold_body_limit => match f {
                            Some(Ok(frame)) => {
                                size += frame.data_ref().map_or(0, |d| d.len());
                                held.push(frame);
                            }
                            Some(Err(e)) => {
                                // The client went away (or sent a broken body) while held.
                                return error(StatusCode::BAD_REQUEST, "bad-request", format!("reading the request body: {e}"));
                            }
                            None => body_done = true,
                        },
                        _ = &mut sleep => {
                            return error(
                                StatusCode::GATEWAY_TIMEOUT,
                                "cold-start-timeout",
                                format!(
                                    "service {} had no ready instance within the request timeout ({})",
                                    svc.name,
                                    super::scaling::format_duration(timeout.as_millis() as u64)
                                ),
                            );
                        }
                    }
                }
            }
        };

        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        parts.uri = match Uri::try_from(format!("http://{}{path}", instance_authority(svc.id, &lease))) {
            Ok(u) => u,
            Err(_) => {
                return error(StatusCode::BAD_REQUEST, "bad-request", "the request target is not a valid path".into())
            }
        };
        parts.version = http::Version::HTTP_11;
        let upgrade_proto = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::EXPECT);
        if let (true, Some(p)) = (upgrade, upgrade_proto) {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, p);
        }
        self.set_forwarded(&mut parts.headers, peer, host, https);
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let body: Body = if held.is_empty() && !body_done {
            incoming.map_err(BoxError::from).boxed_unsync()
        } else {
            Prefixed { held: held.into(), rest: (!body_done).then_some(incoming) }.boxed_unsync()
        };
        let h2c = svc.https().h2c;
        let sent = if h2c {
            // HTTP/2 names the host in :authority, not Host (RFC 9113 §8.3.1).
            let authority = parts.headers.remove(header::HOST).and_then(|h| h.to_str().ok().map(str::to_string));
            let authority = authority.unwrap_or_else(|| host.to_string());
            parts.uri = match Uri::try_from(format!("http://{authority}{path}")) {
                Ok(u) => u,
                Err(_) => {
                    return error(StatusCode::BAD_REQUEST, "bad-request", "the Host is not a valid authority".into())
                }
            };
            parts.version = http::Version::HTTP_2;
            let key = instance_authority(svc.id, &lease);
            let upstream = Request::from_parts(parts, body);
            futures_util::future::Either::Left(self.h2c_send(key, lease.addr, upstream))
        } else {
            let upstream = Request::from_parts(parts, body);
            futures_util::future::Either::Right(async { self.client.request(upstream).await.map_err(BoxError::from) })
        };
        let resp = match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                svc.suspect(lease.slot());
                tracing::warn!(service = %svc.name, addr = %lease.addr, error = %error_chain(&*e), "upstream request failed");
                return error(
                    StatusCode::BAD_GATEWAY,
                    "upstream-failed",
                    format!("the instance of service {} failed to answer: {}", svc.name, error_chain(&*e)),
                );
            }
            Err(_) => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    format!(
                        "the instance of service {} did not answer within the request timeout ({})",
                        svc.name,
                        super::scaling::format_duration(timeout.as_millis() as u64)
                    ),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_up) = client_upgrade {
                return tunnel(resp, client_up, lease);
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(
            parts,
            Leased { inner: body.map_err(BoxError::from).boxed_unsync(), lease: Some(lease) }.boxed_unsync(),
        )
    }

    /// Sends over the instance's HTTP/2 connection, opening it (prior knowledge) if there is
    /// none or it closed.
    async fn h2c_send(
        &self,
        key: String,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let open = self.h2c.get(&key).map(|s| s.clone()).filter(|s| !s.is_closed());
        let mut sender = match open {
            Some(s) => s,
            None => {
                let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| BoxError::from(format!("connecting to {addr} timed out")))??;
                let _ = tcp.set_nodelay(true);
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(tcp))
                    .await?;
                tokio::spawn(conn);
                // Connections of stopped instances go with them.
                self.h2c.retain(|_, s| !s.is_closed());
                self.h2c.insert(key, sender.clone());
                sender
            }
        };
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    fn set_forwarded(&self, h: &mut HeaderMap, peer: SocketAddr, host: &str, https: bool) {
        let ip = peer.ip().to_canonical();
        let trusted = self.trusted.iter().any(|c| c.contains(ip));
        let xff = HeaderName::from_static("x-forwarded-for");
        let xfp = HeaderName::from_static("x-forwarded-proto");
        let xfh = HeaderName::from_static("x-forwarded-host");
        let prior: Vec<String> = if trusted {
            h.get_all(&xff).iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect()
        } else {
            Vec::new()
        };
        let mut chain = prior.join(", ");
        if !chain.is_empty() {
            chain.push_str(", ");
        }
        chain.push_str(&ip.to_string());
        h.remove(&xff);
        if let Ok(v) = HeaderValue::from_str(&chain) {
            h.insert(xff, v);
        }
        if !(trusted && h.contains_key(&xfp)) {
            h.insert(xfp, HeaderValue::from_static(if https { "https" } else { "http" }));
        }
        if !(trusted && h.contains_key(&xfh)) {
            if let Ok(v) = HeaderValue::from_str(host) {
                h.insert(xfh, v);
            }
        }
        if !trusted {
            h.remove(header::FORWARDED);
        }
    }
}

/// The proxy's threads, after nginx's workers: each runs an event loop of its own (a
/// current-thread runtime) and serves its connections start to end, with its own pool of
/// upstream connections, so a request and its upstream exchange never hop between threads
/// (under tokio's work-stealing scheduler that hop cost about a third of the proxy's CPU per
/// request on two cores). The accept loops run on the server's main runtime and hand each new
/// connection to the thread serving the fewest: threads accepting for themselves from a shared
/// socket let one of them take a whole burst of connections and leave the others idle.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    acceptors: Vec<tokio::task::JoinHandle<()>>,
    /// Set when the server is done: the threads' open connections are dropped then.
    exit: tokio::sync::watch::Sender<bool>,
}

/// A new connection for a proxy thread, and whether it is TLS.
type Handoff = (std::net::TcpStream, SocketAddr, bool);

struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<Handoff>,
    /// Connections handed to it that have not ended.
    open: Arc<AtomicUsize>,
}

/// Counts a connection as open on its thread until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` threads with a proxy each from `make`, and accept loops (on the calling
    /// runtime) for `http` and, over TLS, `https`, until `stop` turns true.
    pub fn start(
        n: usize,
        make: impl Fn() -> Proxy,
        http: TcpListener,
        https: Option<TcpListener>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Workers> {
        let (exit, exit_rx) = tokio::sync::watch::channel(false);
        let mut threads = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let proxy = Arc::new(make());
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
            let open = Arc::new(AtomicUsize::new(0));
            let counter = open.clone();
            let mut exit_rx = exit_rx.clone();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let t = std::thread::Builder::new().name(format!("berth-proxy-{i}")).spawn(move || {
                rt.block_on(async move {
                    while let Some((stream, peer, tls)) = rx.recv().await {
                        let guard = Open(counter.clone());
                        let stream = match tokio::net::TcpStream::from_std(stream) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(error = %e, "proxy thread: registering a connection");
                                continue;
                            }
                        };
                        let me = proxy.clone();
                        tokio::spawn(async move {
                            let _guard = guard;
                            if tls {
                                me.tls_conn(stream, peer).await
                            } else {
                                me.http_conn(stream, peer).await
                            }
                        });
                    }
                    let _ = exit_rx.wait_for(|s| *s).await;
                });
            })?;
            threads.push(t);
            workers.push(Worker { tx, open });
        }
        let workers = Arc::new(workers);
        let mut acceptors = vec![tokio::spawn(accept(http, false, workers.clone(), stop.clone()))];
        if let Some(l) = https {
            acceptors.push(tokio::spawn(accept(l, true, workers.clone(), stop)));
        }
        Ok(Workers { threads, acceptors, exit })
    }

    /// Waits until the accept loops ended (after `stop` turned true).
    pub async fn stopped(&mut self) {
        for a in self.acceptors.drain(..) {
            let _ = a.await;
        }
    }

    /// Ends the threads, dropping the connections they still serve.
    pub fn finish(self) {
        let _ = self.exit.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Accepts on `listener` until `stop`, handing each connection to the thread with the fewest.
async fn accept(
    listener: TcpListener,
    tls: bool,
    workers: Arc<Vec<Worker>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let what = if tls { "proxy TLS accept failed" } else { "proxy accept failed" };
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    accept_loop(&listener, what, stopped, |stream, peer| {
        let Some(w) = workers.iter().min_by_key(|w| w.open.load(Ordering::Relaxed)) else { return };
        match stream.into_std() {
            Ok(s) => {
                w.open.fetch_add(1, Ordering::Relaxed);
                if w.tx.send((s, peer, tls)).is_err() {
                    w.open.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "proxy: handing a connection to a proxy thread"),
        }
    })
    .await
}

/// Accepts until `shutdown` resolves, giving each connection to `take`; on an accept error
/// (EMFILE and friends) it logs `what` and backs off instead of spinning.
async fn accept_loop(
    listener: &TcpListener,
    what: &str,
    shutdown: impl std::future::Future<Output = ()>,
    mut take: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => take(stream, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => return,
        }
    }
}

/// A 101 from the instance: answer the client with it and splice the two upgraded connections;
/// the lease lives as long as the tunnel.
fn tunnel(resp: Response<Incoming>, client: hyper::upgrade::OnUpgrade, lease: Lease) -> Response<Body> {
    let (mut parts, _) = resp.into_parts();
    let upstream = hyper::upgrade::on(Response::from_parts(parts.clone(), ()));
    let proto = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = proto {
        parts.headers.insert(header::UPGRADE, p);
    }
    tokio::spawn(async move {
        let _lease = lease;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    Response::from_parts(parts, Full::new(Bytes::new()).map_err(|n| match n {}).boxed_unsync())
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, and those the Connection header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
}

/// One of the proxy's own answers: a text body and the `berth-error` header naming the cause.
pub fn error(status: StatusCode, cause: &'static str, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))).map_err(|n| match n {}).boxed_unsync());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(HeaderName::from_static("berth-error"), HeaderValue::from_static(cause));
    r
}

fn refusal(svc: &Service, r: Refusal) -> Response<Body> {
    let (cause, msg, retry) = match r {
        Refusal::NotDeployed => {
            ("not-deployed", format!("service {} has no revision yet: deploy an image", svc.name), 5)
        }
        Refusal::QueueFull(n) => {
            ("queue-full", format!("service {} already holds {n} requests; try again", svc.name), 1)
        }
        Refusal::StartFailed(reason) => ("start-failed", format!("service {} could not start: {reason}", svc.name), 5),
        Refusal::Deleted => ("not-deployed", format!("service {} was deleted", svc.name), 5),
    };
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, cause, msg);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry));
    resp
}

/// An error with its sources, `outer: inner: ...`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How long an HTTP/2 connection over TLS may stay open without a stream, in
/// `--header-timeout`s (an idle HTTP/1.1 connection gets one; HTTP/2 clients such as browsers
/// keep a connection for later requests, so it gets six: a minute by default).
const H2_IDLE: u32 = 6;

/// One HTTP/2 connection's open streams.
struct Idle {
    open: AtomicUsize,
    since: Mutex<Instant>,
}

impl Idle {
    fn is_idle(&self, after: Duration) -> bool {
        self.open.load(Ordering::SeqCst) == 0 && self.since.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= after
    }
}

/// Counts a stream open until its response body is done (or dropped).
struct Stream(Arc<Idle>);

impl Stream {
    fn open(idle: Arc<Idle>) -> Stream {
        idle.open.fetch_add(1, Ordering::SeqCst);
        Stream(idle)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its stream counted.
struct Counted {
    inner: Body,
    _guard: Stream,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds the instance's lease until it ends or is dropped.
struct Leased {
    inner: Body,
    lease: Option<Lease>,
}

impl HttpBody for Leased {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &r {
            self.lease = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body whose first frames were read while the request was held.
struct Prefixed {
    held: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.held.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx).map_err(BoxError::from),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self.held.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
        match &self.rest {
            None => SizeHint::with_exact(held),
            Some(r) => {
                let h = r.size_hint();
                let mut s = SizeHint::new();
                s.set_lower(h.lower() + held);
                if let Some(u) = h.upper() {
                    s.set_upper(u + held);
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
            ("content-type", "text/plain"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    #[test]
    fn instance_names_carry_the_address() {
        assert_eq!(instance_addr("s3-i12-10-88-0-2.instance"), Some("10.88.0.2:0".parse().unwrap()));
        assert_eq!(instance_addr("s3-i12-10-88-0.instance"), None);
        assert_eq!(instance_addr("example.com"), None);
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(wants_upgrade(&h));
    }
}
