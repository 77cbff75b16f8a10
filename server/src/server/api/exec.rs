//! `POST /api/v1/services/{name}/exec`: a command in one of a service's instances, its stdio
//! streamed both ways over an HTTP/1.1 upgrade (`Upgrade: berth-exec`, 101, then frames).
//! The framing ([`frame`]) is documented in docs/SERVER.md; `berth exec` (cli/exec.rs) is the
//! client.
//!
//! The instance is held by a lease for as long as the command runs, as a request would be: it
//! is not frozen or stopped under it. Without `instance` the lease comes from the same place a
//! proxied request's does (the least-loaded ready instance; at zero one is thawed or started).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use berth_agent::engine::{Exec, ExecOptions};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{AppState, Error};
use crate::server::platform::{Acquired, Lease, NoInstance, Refusal};

/// The protocol's name in `Upgrade`.
pub const PROTOCOL: &str = "berth-exec";

pub fn router() -> Router<AppState> {
    Router::new().route("/services/{name}/exec", post(exec))
}

/// The request body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecRequest {
    command: Vec<String>,
    /// Variables over the instance's env.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Send stdin frames to the command (else its stdin is empty).
    #[serde(default)]
    interactive: bool,
    /// A terminal for the command; its output comes as stdout frames.
    #[serde(default)]
    tty: bool,
    /// The terminal's first size.
    #[serde(default)]
    rows: Option<u16>,
    #[serde(default)]
    cols: Option<u16>,
    /// An instance (container id or a unique prefix of it); default: as a request would get.
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    workdir: Option<String>,
}

/// Frames after the upgrade: a kind byte, a 4-byte big-endian length, the payload.
pub mod frame {
    /// Client to server: bytes for the command's stdin.
    pub const STDIN: u8 = 0x00;
    /// Client to server: the end of stdin (empty payload).
    pub const STDIN_CLOSE: u8 = 0x01;
    /// Client to server: the terminal's size, rows and columns as two big-endian u16.
    pub const RESIZE: u8 = 0x02;
    /// Client to server: a signal number (big-endian i32) for the command.
    pub const SIGNAL: u8 = 0x03;
    /// Server to client: the command's stdout (with a terminal: all its output).
    pub const STDOUT: u8 = 0x10;
    /// Server to client: the command's stderr.
    pub const STDERR: u8 = 0x11;
    /// Server to client, last: the exit code (big-endian i32; 128 + n when signal n killed it).
    pub const EXIT: u8 = 0x12;
    /// The largest payload either side sends or accepts.
    pub const MAX: usize = 1 << 20;

    pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits a byte stream into frames.
    #[derive(Debug, Default)]
    pub struct Decoder {
        buf: Vec<u8>,
    }

    impl Decoder {
        pub fn push(&mut self, bytes: &[u8]) {
            self.buf.extend_from_slice(bytes);
        }

        /// The next complete frame; an error for one longer than [`MAX`].
        pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
            if self.buf.len() < 5 {
                return Ok(None);
            }
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            if len > MAX {
                return Err(format!("a frame of {len} bytes is over the limit of {MAX}"));
            }
            if self.buf.len() < 5 + len {
                return Ok(None);
            }
            let kind = self.buf[0];
            let payload = self.buf[5..5 + len].to_vec();
            self.buf.drain(..5 + len);
            Ok(Some((kind, payload)))
        }
    }
}

/// Why no command runs: the API's error, or a command that could not start (422 with the exit
/// code a shell would give: 126 not executable, 127 not found, 125 anything else).
enum Failure {
    Api(Error),
    NotStarted { code: i32, reason: String },
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Api(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Failure::Api(e) => e.into_response(),
            Failure::NotStarted { code, reason } => {
                (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({ "error": reason, "exit_code": code })))
                    .into_response()
            }
        }
    }
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, PROTOCOL)
}

async fn exec(State(state): State<AppState>, Path(name): Path<String>, req: Request) -> Response {
    match start(state, name, req).await {
        Ok(resp) => resp,
        Err(f) => f.into_response(),
    }
}

async fn start(state: AppState, name: String, mut req: Request) -> Result<Response, Failure> {
    super::check_name(&name).map_err(|e| Error::BadRequest(e.to_string()))?;
    if !wants_upgrade(req.headers()) {
        return Err(Error::BadRequest(format!(
            "exec streams over an HTTP/1.1 upgrade: send \"Connection: Upgrade\" and \"Upgrade: {PROTOCOL}\""
        ))
        .into());
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(Error::BadRequest("this connection cannot be upgraded (HTTP/1.1 only)".into()).into());
    };
    let body = axum::body::to_bytes(std::mem::take(req.body_mut()), 1 << 20)
        .await
        .map_err(|e| Error::BadRequest(format!("reading the request body: {e}")))?;
    let r: ExecRequest =
        serde_json::from_slice(&body).map_err(|e| Error::BadRequest(format!("invalid exec request: {e}")))?;
    if r.command.first().is_none_or(|c| c.is_empty()) {
        return Err(Error::BadRequest("command: give the command to run, as a list of strings".into()).into());
    }
    for k in r.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains(char::is_whitespace) {
            return Err(Error::BadRequest(format!("env: invalid variable name {k:?}")).into());
        }
    }
    let svc = state.platform.get(&name).ok_or_else(|| Error::NotFound(format!("no service named {name:?}")))?;
    let (lease, container) = lease(&svc, r.instance.as_deref()).await?;
    let opts = ExecOptions {
        args: r.command,
        env: r.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        tty: r.tty,
        tty_size: match (r.rows, r.cols) {
            (Some(rows), Some(cols)) if r.tty => Some((rows, cols)),
            _ => None,
        },
        working_dir: r.workdir,
        user: r.user,
        stdin: if r.interactive && !r.tty { std::process::Stdio::piped() } else { std::process::Stdio::null() },
        stdout: std::process::Stdio::piped(),
        stderr: std::process::Stdio::piped(),
    };
    let engine = state.engine.clone();
    let id = container.clone();
    let started = tokio::task::spawn_blocking(move || engine.exec(&id, opts))
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("the exec task failed: {e}")))?;
    let exec = match started {
        Ok(x) => x,
        Err(berth_agent::engine::Error::Exec { code, reason }) => return Err(Failure::NotStarted { code, reason }),
        // The instance stopped or froze since its lease was taken.
        Err(e) => return Err(Error::Conflict(e.to_string()).into()),
    };
    tracing::info!(service = %name, instance = %&container[..12], pid = exec.pid, "exec started");
    let (tty, interactive) = (r.tty, r.interactive);
    let header_id = container.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let code = session(hyper_util::rt::TokioIo::new(upgraded), exec, tty, interactive).await;
                tracing::info!(service = %name, instance = %&container[..12], code = ?code, "exec ended");
            }
            // Dropping the exec kills the command.
            Err(e) => tracing::warn!(service = %name, error = %e, "exec upgrade failed"),
        }
        drop(lease);
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .header("berth-instance", header_id)
        .body(Body::empty())
        .expect("a valid response"))
}

/// A lease on the asked-for instance, or on the one a request would get (waiting, as a held
/// request does, up to the service's `request_timeout`); and its container.
async fn lease(
    svc: &std::sync::Arc<crate::server::platform::Service>,
    instance: Option<&str>,
) -> Result<(Lease, String), Error> {
    let name = &svc.name;
    if let Some(want) = instance {
        if want.is_empty() || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadRequest(format!("instance: {want:?} is not a container id")));
        }
        return svc.lease_instance(want).map_err(|e| match e {
            NoInstance::Unknown => Error::NotFound(format!("service {name:?} has no instance {want:?}")),
            NoInstance::Ambiguous => {
                Error::BadRequest(format!("instance {want:?} matches more than one; use more of the id"))
            }
            NoInstance::NotReady(st) => Error::Conflict(format!(
                "instance {want} of service {name:?} is {}, not ready; exec without an instance to wake one",
                serde_json::to_value(st).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            )),
        });
    }
    let refused = |r: Refusal| match r {
        Refusal::NotDeployed => Error::Conflict(format!("service {name:?} has no revision deployed")),
        Refusal::Deleted => Error::NotFound(format!("service {name:?} was deleted")),
        Refusal::QueueFull(n) => Error::Conflict(format!("service {name:?} already holds {n} requests")),
        Refusal::StartFailed(reason) => Error::Unprocessable(format!("service {name:?} could not start: {reason}")),
    };
    let lease = match svc.acquire(None) {
        Acquired::Now(l) => l,
        Acquired::Refused(r) => return Err(refused(r)),
        Acquired::Held(rx) => {
            let limit = Duration::from_millis(svc.scaling().request_timeout_ms);
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(Ok(l))) => l,
                Ok(Ok(Err(r))) => return Err(refused(r)),
                Ok(Err(_)) => return Err(Error::NotFound(format!("service {name:?} was deleted"))),
                Err(_) => {
                    return Err(Error::Unprocessable(format!(
                        "no instance of service {name:?} became ready within {limit:?}"
                    )))
                }
            }
        }
    };
    let container = svc
        .container_of(lease.slot())
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("instance {} of {name} has no container", lease.slot())))?;
    Ok((lease, container))
}

/// Copies between the upgraded connection and the command until it exits (then the rest of its
/// output, for at most a second, and its exit code); None if the client went first (the command
/// is killed as the exec drops).
async fn session<S>(io: S, mut exec: Exec, tty: bool, interactive: bool) -> Option<i32>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(32);
    // Blocking descriptors get a thread each (a pipe or a pty; only as long as they are open).
    let mut input: Option<std::sync::mpsc::Sender<Vec<u8>>> = None;
    let mut spawn_writer = |mut w: Box<dyn Write + Send>| {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            while let Ok(bytes) = rx.recv() {
                if w.write_all(&bytes).and_then(|_| w.flush()).is_err() {
                    break;
                }
            }
        });
        input = Some(tx);
    };
    let spawn_reader = |mut r: Box<dyn Read + Send>, kind: u8| {
        let tx = out_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            // A pty's master reads EIO once the terminal is closed: the end, like EOF.
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || tx.blocking_send((kind, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    };
    if let Some(pty) = &exec.pty {
        if let Ok(r) = pty.try_clone() {
            spawn_reader(Box::new(r), frame::STDOUT);
        }
        if interactive {
            if let Ok(w) = pty.try_clone() {
                spawn_writer(Box::new(w));
            }
        }
    } else {
        if let Some(o) = exec.child.stdout.take() {
            spawn_reader(Box::new(o), frame::STDOUT);
        }
        if let Some(e) = exec.child.stderr.take() {
            spawn_reader(Box::new(e), frame::STDERR);
        }
        if let Some(i) = exec.child.stdin.take() {
            spawn_writer(Box::new(i));
        }
    }
    drop(out_tx);
    // The client's frames, read by a task of their own (a read cut short by select! would lose
    // bytes); None at its end.
    let (in_tx, mut in_rx) = mpsc::channel::<Option<(u8, Vec<u8>)>>(32);
    let reader = tokio::spawn(async move {
        let mut dec = frame::Decoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dec.push(&buf[..n]),
            }
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => {
                        if in_tx.send(Some(f)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "exec: bad frame from the client");
                        let _ = in_tx.send(None).await;
                        return;
                    }
                }
            }
        }
        let _ = in_tx.send(None).await;
    });
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut outputs_open = true;
    let code = loop {
        tokio::select! {
            f = in_rx.recv() => match f.flatten() {
                Some((frame::STDIN, bytes)) => {
                    if let Some(i) = &input {
                        let _ = i.send(bytes);
                    }
                }
                Some((frame::STDIN_CLOSE, _)) => {
                    // A terminal has no end of input, only its EOF character.
                    if tty {
                        if let Some(i) = &input {
                            let _ = i.send(vec![4]);
                        }
                    } else {
                        input = None;
                    }
                }
                Some((frame::RESIZE, p)) if p.len() == 4 => {
                    let _ = exec.resize(u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
                }
                Some((frame::SIGNAL, p)) if p.len() == 4 => {
                    let n = i32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                    if let Ok(sig) = nix::sys::signal::Signal::try_from(n) {
                        let _ = exec.signal(sig);
                    }
                }
                Some(_) => {}
                None => break None,
            },
            o = out_rx.recv(), if outputs_open => match o {
                Some((kind, bytes)) => {
                    if wr.write_all(&frame::encode(kind, &bytes)).await.is_err() {
                        break None;
                    }
                }
                None => outputs_open = false,
            },
            _ = tick.tick() => {
                if let Ok(Some(code)) = exec.try_wait() {
                    break Some(code);
                }
            }
        }
    };
    reader.abort();
    let code = code?;
    let rest = async {
        while let Some((kind, bytes)) = out_rx.recv().await {
            if wr.write_all(&frame::encode(kind, &bytes)).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), rest).await;
    let _ = wr.write_all(&frame::encode(frame::EXIT, &code.to_be_bytes())).await;
    let _ = wr.shutdown().await;
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::frame::{encode, Decoder};

    #[test]
    fn frames_split_and_join() {
        let mut bytes = encode(0x10, b"hello");
        bytes.extend(encode(0x12, &7i32.to_be_bytes()));
        let mut d = Decoder::default();
        // Fed a byte at a time, the frames come out whole.
        let mut got = Vec::new();
        for b in &bytes {
            d.push(&[*b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, [(0x10, b"hello".to_vec()), (0x12, vec![0, 0, 0, 7])]);
        let mut d = Decoder::default();
        d.push(&[0x00, 0xff, 0xff, 0xff, 0xff]);
        assert!(d.next_frame().unwrap_err().contains("over the limit"));
    }
}
