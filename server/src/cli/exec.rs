//! `berth exec NAME [-i] [-t] [--instance ID] -- CMD...`: a command in one of a service's
//! instances, through the server's API (`POST /api/v1/services/NAME/exec`, an HTTP/1.1 upgrade
//! to the frames of [`crate::server::api::exec::frame`]; docs/SERVER.md).
//!
//! Plain HTTP only (the API has no TLS yet): the upgrade is spoken over a blocking TCP socket,
//! so the terminal loop (cli/term.rs) can poll it next to stdin.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::client::{service_name, Client, Conn};
use super::term;
use crate::server::api::exec::{frame, PROTOCOL};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The service.
    pub name: String,
    /// Pass stdin to the command (without it the command's stdin is empty).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (the local one goes into raw mode, its size follows).
    #[arg(short, long)]
    pub tty: bool,
    /// The instance (container id or a unique prefix; `berth services --json` lists them).
    /// Default: the one a request would get (at zero, one is started).
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Set an environment variable (KEY=VALUE, or NAME to pass this one's), over the instance's.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory (default: the instance's).
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid; default: the instance's).
    #[arg(short, long)]
    pub user: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Runs `berth exec`: the command's exit code; 125 when it could not be run (as `berth container
/// exec`: 126 not executable, 127 not found), with the reason on stderr.
pub fn exec(conn: &Conn, data_dir: &Path, a: &Args) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let Some(rest) = c.base.strip_prefix("http://") else {
        bail!("berth exec needs a plain http:// API URL (the API has no TLS); got {}", c.base);
    };
    let (hostport, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, String::new()),
    };
    let addr = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let mut env = serde_json::Map::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) => env.insert(k.to_string(), v.into()),
            None => match std::env::var(kv) {
                Ok(v) => env.insert(kv.clone(), v.into()),
                // As `berth run --env NAME`: nothing when it is unset here.
                Err(_) => None,
            },
        };
    }
    let mut body = serde_json::json!({
        "command": a.command, "env": env, "interactive": a.interactive, "tty": a.tty,
    });
    for (k, v) in [("instance", &a.instance), ("workdir", &a.workdir), ("user", &a.user)] {
        if let Some(v) = v {
            body[k] = v.clone().into();
        }
    }
    if a.tty {
        if let Some((rows, cols)) = term::size() {
            body["rows"] = rows.into();
            body["cols"] = cols.into();
        }
    }
    let body = body.to_string();
    let sock = TcpStream::connect(&addr).with_context(|| format!("connecting to the Berth API at {}", c.base))?;
    let _ = sock.set_nodelay(true);
    let head = format!(
        "POST {prefix}/api/v1/services/{}/exec HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {}\r\n\
         Connection: Upgrade\r\nUpgrade: {PROTOCOL}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        a.name,
        c.token,
        body.len()
    );
    (&sock)
        .write_all(head.as_bytes())
        .and_then(|_| (&sock).write_all(body.as_bytes()))
        .context("sending the exec request")?;
    let (status, headers) = read_head(&sock).context("reading the API's answer")?;
    if status != 101 {
        let len =
            headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok()).unwrap_or(0);
        let mut raw = vec![0u8; len];
        let _ = (&sock).read_exact(&mut raw);
        let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        let msg = v["error"].as_str().map(str::to_string).unwrap_or_else(|| String::from_utf8_lossy(&raw).into_owned());
        eprintln!("berth: {msg} (HTTP {status})");
        return Ok(v["exit_code"].as_i64().map(|c| c as i32).unwrap_or(125));
    }
    let mut remote = Session { sock, dec: frame::Decoder::default(), code: None };
    let raw = if a.tty && a.interactive { term::RawMode::enter()? } else { None };
    let pumped = term::pump(&mut remote, a.interactive);
    drop(raw);
    pumped.context("exec session")?;
    match remote.code {
        Some(code) => Ok(code),
        None => bail!("the server ended the exec without its exit code"),
    }
}

/// Reads a response head (status, lowercased headers) byte by byte, so nothing after it is
/// taken from the socket.
fn read_head(mut sock: &TcpStream) -> io::Result<(u16, Vec<(String, String)>)> {
    sock.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if sock.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed before an answer"));
        }
        raw.push(byte[0]);
        if raw.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the answer's head is over 64 KiB"));
        }
    }
    sock.set_read_timeout(None)?;
    let text = String::from_utf8_lossy(&raw);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

/// The upgraded connection, as the terminal loop's [`term::Remote`].
struct Session {
    sock: TcpStream,
    dec: frame::Decoder,
    code: Option<i32>,
}

impl Session {
    fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        (&self.sock).write_all(&frame::encode(kind, payload))
    }

    /// Hands out the complete frames received; false once the exit code came.
    fn drain(&mut self) -> io::Result<bool> {
        while let Some((kind, payload)) =
            self.dec.next_frame().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            match kind {
                frame::STDOUT => {
                    let mut out = io::stdout().lock();
                    out.write_all(&payload)?;
                    out.flush()?;
                }
                frame::STDERR => io::stderr().lock().write_all(&payload)?,
                frame::EXIT if payload.len() == 4 => {
                    self.code = Some(i32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
                    return Ok(false);
                }
                _ => {}
            }
        }
        Ok(true)
    }
}

impl term::Remote for Session {
    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
    fn pump_output(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        let n = match (&self.sock).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(false);
        }
        self.dec.push(&buf[..n]);
        self.drain()
    }
    fn write_input(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.send(frame::STDIN, bytes)
    }
    fn close_input(&mut self) -> io::Result<()> {
        self.send(frame::STDIN_CLOSE, &[])
    }
    fn resize(&mut self, rows: u16, cols: u16) -> io::Result<()> {
        let mut p = rows.to_be_bytes().to_vec();
        p.extend(cols.to_be_bytes());
        self.send(frame::RESIZE, &p)
    }
    fn signal(&mut self, sig: nix::sys::signal::Signal) -> io::Result<()> {
        self.send(frame::SIGNAL, &(sig as i32).to_be_bytes())
    }
}
