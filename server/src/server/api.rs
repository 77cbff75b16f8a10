//! The JSON API under `/api/v1`: routing, bearer-token authentication and the error type that
//! turns every failure into one deliberate status with `{"error": "..."}`.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

pub mod builds;
pub(super) mod certs;
mod domains;
mod env;
pub mod exec;
mod keys;
pub mod openapi;
mod services;
mod tokens;
mod traffic;

pub use services::check_name;
pub use traffic::stored_traffic;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub db: super::db::Pool,
    pub platform: std::sync::Arc<super::platform::Platform>,
    pub engine: std::sync::Arc<berth_agent::Engine>,
    pub actions: tokio::sync::mpsc::UnboundedSender<super::platform::Action>,
    pub data_dir: std::path::PathBuf,
    pub domain: String,
    pub control_host: String,
    /// The proxy's port, for the URLs the API shows (omitted when 80).
    pub http_port: u16,
    /// The TLS listener's port (None: no `--https-addr`), for the URLs of services that
    /// redirect to HTTPS (omitted when 443).
    pub https_port: Option<u16>,
    /// Seals and opens secret variables.
    pub keys: super::secrets::Keyring,
    /// Build limits and slots.
    pub builds: std::sync::Arc<builds::Builds>,
    /// Certificates (None: no `--https-addr`).
    pub tls: Option<std::sync::Arc<super::tls::Tls>>,
}

impl AppState {
    /// The URL a service (or `TAG--SERVICE`) answers at: https:// when the service redirects
    /// plain HTTP there.
    pub fn url(&self, service: &str) -> String {
        let name = service.split_once("--").map_or(service, |(_, n)| n);
        let redirect = self.platform.get(name).is_some_and(|s| s.https().redirect);
        match (redirect, self.https_port) {
            (true, Some(443)) => format!("https://{service}.{}/", self.domain),
            (true, Some(p)) => format!("https://{service}.{}:{p}/", self.domain),
            _ if self.http_port == 80 => format!("http://{service}.{}/", self.domain),
            _ => format!("http://{service}.{}:{}/", self.domain, self.http_port),
        }
    }
}

/// An API failure. Internal errors are logged once and answered with a generic message: their
/// detail (paths, SQL) is not the client's business.
#[derive(Debug)]
pub enum Error {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    Conflict(String),
    /// The service exists but cannot do this now (a deploy that failed: 422 with the reason).
    Unprocessable(String),
    MethodNotAllowed,
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Error {
        Error::Internal(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            Error::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Error::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            Error::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Error::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Error::Conflict(m) => (StatusCode::CONFLICT, m),
            Error::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
            Error::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path".into()),
            Error::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "api request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error: see the server's log".into())
            }
        };
        let mut resp = (status, Json(serde_json::json!({ "error": msg }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let authed = services::router()
        .merge(builds::router())
        .merge(tokens::router())
        .merge(exec::router())
        .merge(keys::router())
        .merge(certs::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state.clone());
    let v1 = Router::new().route("/health", get(health)).route("/openapi.json", get(openapi::serve)).merge(authed);
    Router::new()
        .nest("/api/v1", v1)
        .layer(middleware::map_response(json_errors))
        // git's smart HTTP protocol: plain-text errors, its own authentication, and bodies
        // streamed without the API's size limit.
        .merge(crate::server::git::http::router().with_state(state.clone()))
        .fallback(|req: Request| async move {
            Error::NotFound(format!("no such endpoint: {} {}", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
}

/// axum's own rejections (a path segment of the wrong type, a bad query string, a body over
/// the limit) answer in plain text: give them the API's JSON shape.
async fn json_errors(resp: Response) -> Response {
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(resp.status().is_client_error() && plain) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let mut out = (parts.status, Json(serde_json::json!({ "error": text.trim() }))).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Who made an API call: its token's name and what it may do.
#[derive(Debug, Clone)]
pub struct Caller(pub String, pub Scope);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Admin,
    /// May deploy this one service and follow its deploys, nothing else.
    Deploy(String),
}

impl Scope {
    /// Whether a token of this scope may make this call (`path` below `/api/v1`).
    pub fn allows(&self, method: &axum::http::Method, path: &str) -> bool {
        let Scope::Deploy(service) = self else { return true };
        use axum::http::Method;
        let path = path.strip_prefix("/api/v1").unwrap_or(path);
        let Some(rest) = path.strip_prefix("/services/").and_then(|p| p.strip_prefix(service.as_str())) else {
            return false;
        };
        let deploy_id =
            rest.strip_prefix("/deploys/").is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        match (method, rest) {
            (&Method::GET, "") => true,
            (&Method::POST, "/deploys") | (&Method::GET, "/deploys") => true,
            (&Method::POST, "/builds") | (&Method::GET, "/builds") => true,
            (&Method::GET, r)
                if r.strip_prefix("/builds/").is_some_and(|id| {
                    let id = id.strip_suffix("/log").unwrap_or(id);
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
                }) =>
            {
                true
            }
            (&Method::GET, _) if deploy_id => true,
            _ => false,
        }
    }
}

/// Lets a request through if it carries `Authorization: Bearer <token>` of a known token whose
/// scope allows the call.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, Error> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(Error::Unauthorized("missing Authorization header: send \"Authorization: Bearer <token>\"".into()));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::Unauthorized("the Authorization header must be \"Bearer <token>\"".into()))?;
    // A `git push` in progress: its hook's short-lived token (see `git::PushToken`).
    if let Some(caller) = crate::server::git::push_caller(token, req.method(), req.uri().path()) {
        req.extensions_mut().insert(caller?);
        return Ok(next.run(req).await);
    }
    let Some(t) = crate::server::db::find_token(&state.db, &crate::server::token::hash(token)).await? else {
        return Err(Error::Unauthorized("invalid token".into()));
    };
    let scope = match (t.scope.as_str(), t.service) {
        ("deploy", Some(service)) => Scope::Deploy(service),
        _ => Scope::Admin,
    };
    if !scope.allows(req.method(), req.uri().path()) {
        let Scope::Deploy(service) = &scope else { unreachable!("admin may do anything") };
        return Err(Error::Forbidden(format!(
            "token {:?} may only deploy service {service:?} (POST /services/{service}/deploys) and read its deploys",
            t.name
        )));
    }
    req.extensions_mut().insert(Caller(t.name, scope));
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn deploy_tokens_reach_their_service_s_deploys_only() {
        let s = Scope::Deploy("web".into());
        for (m, p) in [
            (Method::POST, "/api/v1/services/web/deploys"),
            (Method::GET, "/services/web/deploys"),
            (Method::GET, "/services/web/deploys/12"),
            (Method::GET, "/services/web"),
        ] {
            assert!(s.allows(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::POST, "/services/webx/deploys"),
            (Method::POST, "/services/api/deploys"),
            (Method::DELETE, "/services/web"),
            (Method::PATCH, "/services/web/scaling"),
            (Method::POST, "/services/web/env"),
            (Method::GET, "/services/web/env"),
            (Method::GET, "/services/web/logs"),
            (Method::POST, "/services/web/rollback"),
            (Method::GET, "/services"),
            (Method::POST, "/tokens"),
            (Method::GET, "/services/web/deploys/1/../../env"),
        ] {
            assert!(!s.allows(&m, p), "{m} {p}");
        }
        assert!(Scope::Admin.allows(&Method::DELETE, "/tokens/x"));
    }
}
