//! git's smart HTTP protocol at `/git/<service>.git` (on `--api-addr`, and on the control host
//! through the proxy): `GET info/refs?service=git-receive-pack|git-upload-pack`, `POST
//! git-receive-pack`, `POST git-upload-pack`, each a `git <service> --stateless-rpc` with the
//! request body streamed to its stdin (gzip decoded when the client compressed it) and its
//! stdout streamed back.
//!
//! Authentication: HTTP Basic with any user name and an API token as the password (an admin
//! token, or a deploy token of that service); without one the answer is 401 with
//! `WWW-Authenticate: Basic realm="berth"`, so git asks for credentials. Errors are plain
//! text: git shows them to the user as they are.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use super::repo::{self, Service};
use crate::server::api::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/git/{repo}/info/refs", get(info_refs))
        .route("/git/{repo}/git-receive-pack", post(receive_pack))
        .route("/git/{repo}/git-upload-pack", post(upload_pack))
}

/// A refusal, in plain text.
fn fail(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = (status, msg).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"berth\""));
    }
    r
}

fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "git over http failed");
    fail(StatusCode::INTERNAL_SERVER_ERROR, "internal error: see the server's log")
}

/// The token in `Authorization: Basic` (its password) or `Bearer`.
fn token_of(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    if let Some(b) = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")) {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD.decode(b.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (_, password) = text.split_once(':')?;
        return Some(password.to_string()).filter(|p| !p.is_empty());
    }
    v.strip_prefix("Bearer ").map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Who may use the repository of `service`: the token's name, or the refusal.
async fn authorize(state: &AppState, headers: &HeaderMap, service: &str) -> Result<String, Response> {
    let Some(token) = token_of(headers) else {
        return Err(fail(
            StatusCode::UNAUTHORIZED,
            "berth: authentication required: use an API token as the password (any user name)",
        ));
    };
    let found = crate::server::db::find_token(&state.db, &crate::server::token::hash(&token)).await;
    let t = match found {
        Ok(Some(t)) => t,
        Ok(None) => return Err(fail(StatusCode::UNAUTHORIZED, "berth: invalid token")),
        Err(e) => return Err(internal(e)),
    };
    match (t.scope.as_str(), &t.service) {
        ("deploy", Some(s)) if s != service => Err(fail(
            StatusCode::FORBIDDEN,
            format!("berth: token {:?} may only push to service {s:?}, not {service:?}", t.name),
        )),
        _ => Ok(t.name),
    }
}

#[derive(Debug, serde::Deserialize)]
struct InfoQuery {
    service: Option<String>,
}

/// What every handler first does: the service name, the token's name, the repository.
async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    path: &str,
    service: Service,
) -> Result<(String, String, std::path::PathBuf), Response> {
    let name = repo::service_of(path).map_err(|e| fail(StatusCode::NOT_FOUND, format!("berth: {e}")))?;
    let by = authorize(state, headers, &name).await?;
    let Some(cfg) = super::config() else {
        return Err(fail(StatusCode::SERVICE_UNAVAILABLE, "berth: the git service is not ready"));
    };
    let push = service == Service::ReceivePack;
    match repo::open(&state.data_dir, &name, &cfg.exe, push).await {
        Ok(Some(r)) => Ok((name, by, r)),
        Ok(None) => Err(fail(StatusCode::NOT_FOUND, format!("berth: no repository {name:?}: push to it first"))),
        Err(e) => Err(internal(e)),
    }
}

fn protocol(headers: &HeaderMap) -> Option<String> {
    headers.get("git-protocol").and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn no_cache(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, max-age=0, must-revalidate"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("Fri, 01 Jan 1980 00:00:00 GMT"));
}

/// `GET /git/<service>.git/info/refs?service=git-upload-pack|git-receive-pack`.
async fn info_refs(
    State(state): State<AppState>,
    Path(path): Path<String>,
    Query(q): Query<InfoQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(service) = q.service.as_deref().and_then(Service::from_name) else {
        return fail(
            StatusCode::FORBIDDEN,
            "berth: only git's smart HTTP protocol is served (?service=git-upload-pack or git-receive-pack)",
        );
    };
    let (_, _, repo) = match prepare(&state, &headers, &path, service).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let protocol = protocol(&headers);
    let out = repo::command(service, &repo, true, true, protocol.as_deref(), None)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let out = match out {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => {
            return internal(anyhow::anyhow!(
                "git {} --advertise-refs: {}",
                service.name(),
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return internal(anyhow::Error::new(e).context("starting git")),
    };
    // As git-http-backend: a `# service=` packet and a flush first, except in protocol v2.
    let v2 = protocol.as_deref().is_some_and(|p| p.split(':').any(|x| x == "version=2"));
    let mut body = Vec::with_capacity(out.len() + 64);
    if !v2 {
        let line = format!("# service={}\n", service.name());
        body.extend_from_slice(format!("{:04x}{line}0000", line.len() + 4).as_bytes());
    }
    body.extend_from_slice(&out);
    let mut r = Response::new(Body::from(body));
    let ct = format!("application/x-{}-advertisement", service.name());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(&ct).expect("a valid header"));
    no_cache(&mut r);
    r
}

async fn receive_pack(state: State<AppState>, path: Path<String>, req: Request) -> Response {
    rpc(state, path, req, Service::ReceivePack).await
}

async fn upload_pack(state: State<AppState>, path: Path<String>, req: Request) -> Response {
    rpc(state, path, req, Service::UploadPack).await
}

/// `POST /git/<service>.git/git-receive-pack|git-upload-pack`.
async fn rpc(State(state): State<AppState>, Path(path): Path<String>, req: Request, service: Service) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let want = format!("application/x-{}-request", service.name());
    if headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return fail(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("berth: expected Content-Type: {want}"));
    }
    let gzip = match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            return fail(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("berth: Content-Encoding {other:?} is not gzip"))
        }
    };
    let (name, by, repo) = match prepare(&state, headers, &path, service).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let push = service == Service::ReceivePack;
    let (token, branch) = if push {
        let branch = match super::deploy_branch(&state.db, &name).await {
            Ok(b) => b.unwrap_or_else(|| super::DEFAULT_BRANCH.to_string()),
            Err(e) => return internal(e),
        };
        match super::PushToken::mint(&name, &by) {
            Ok(t) => (Some(t), branch),
            Err(e) => return internal(e),
        }
    } else {
        (None, String::new())
    };
    let hook = token.as_ref().map(|t| repo::HookEnv { service: &name, branch: &branch, token: t });
    let protocol = protocol(headers);
    let spawned = repo::command(service, &repo, true, false, protocol.as_deref(), hook.as_ref())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return internal(anyhow::Error::new(e).context("starting git (git must be installed on the server)")),
    };
    let _ = hook;
    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return internal(anyhow::anyhow!("git's stdio was not piped"));
    };
    if push {
        tracing::info!(service = %name, by = %by, "git push over http");
    }
    // The request body into git, decoded on a blocking thread if it is gzip.
    let reader = tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    tokio::spawn(async move {
        let r = if gzip {
            let reader = tokio_util::io::SyncIoBridge::new(reader);
            let writer = tokio_util::io::SyncIoBridge::new(stdin);
            tokio::task::spawn_blocking(move || {
                let mut gz = flate2::read::GzDecoder::new(reader);
                let mut writer = writer;
                std::io::copy(&mut gz, &mut writer)?;
                writer.shutdown()
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        } else {
            let mut reader = reader;
            let mut stdin = stdin;
            match tokio::io::copy(&mut reader, &mut stdin).await {
                Ok(_) => stdin.shutdown().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "git over http: reading the request body");
        }
    });
    // git's messages (the hook's output goes to the client over the sideband) to the log; the
    // process reaped, and the push token dropped, when it exits.
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(service = %name, git = service.name(), "{line}");
        }
        match child.wait().await {
            Ok(s) if !s.success() => tracing::info!(service = %name, git = service.name(), status = %s, "git exited"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "waiting for git"),
        }
        drop(token);
    });
    let mut r = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(stdout).boxed()));
    let ct = format!("application/x-{}-result", service.name());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(&ct).expect("a valid header"));
    no_cache(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_basic_and_bearer() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        // "git:berth_abc"
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Z2l0OmJlcnRoX2FiYw=="));
        assert_eq!(token_of(&h).as_deref(), Some("berth_abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer berth_x"));
        assert_eq!(token_of(&h).as_deref(), Some("berth_x"));
        // "git:" — no password
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Z2l0Og=="));
        assert_eq!(token_of(&h), None);
    }
}
