//! A real `berth server` for end-to-end tests: started on ephemeral loopback ports over a
//! [`Berth`] data directory (its own bridge and subnet), driven with raw HTTP/1.1 so that tests
//! see exactly what goes over the wire. Killed and reaped on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Berth;

/// A port nobody listens on right now, and not handed out before by this process: ports
/// are picked before the servers that bind them start, and the kernel may give a port that
/// was just released (one test's --https-addr) to the next ephemeral bind (another --api-addr).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port").local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// An HTTP response as read off the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.text()))
    }
}

/// Reads one response (head and body: Content-Length, chunked, or to EOF) from `r`.
pub fn read_reply(r: &mut impl BufRead, head_only: bool) -> std::io::Result<Reply> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status: u16 =
        line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut reply = Reply { status, headers, body: Vec::new() };
    if head_only || status == 101 || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(reply);
    }
    if reply.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end)?;
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            reply.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = reply.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        reply.body = vec![0; n];
        r.read_exact(&mut reply.body)?;
    } else {
        r.read_to_end(&mut reply.body)?;
    }
    Ok(reply)
}

/// Sends raw bytes on a fresh connection and reads one response.
pub fn raw(port: u16, request: &[u8]) -> std::io::Result<Reply> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    (&s).write_all(request)?;
    read_reply(&mut BufReader::new(s), false)
}

/// A request with `Host: host` and `Connection: close`.
pub fn request(
    port: u16,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" || method == "PATCH" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(port, &bytes)
}

/// A running `berth server`.
pub struct Server {
    pub child: Child,
    pub api: u16,
    pub http: u16,
    /// The SSH server's port (git push), unless `--ssh-addr` turned it off.
    pub ssh: u16,
    /// The proxy's TLS port (`--https-addr`).
    pub https: u16,
    pub domain: String,
    pub data_dir: PathBuf,
    /// The server's stderr (its log), appended across restarts.
    pub log: PathBuf,
    /// With `BERTH_TEST_POSTGRES` set: the PostgreSQL database of this server (dropped at the end).
    pub postgres: Option<(String, String)>,
    args: Vec<String>,
}

/// The PostgreSQL server the suite runs against its second time (`scripts/test-postgres`),
/// e.g. `postgres://postgres@127.0.0.1:55432`; None: SQLite.
pub fn postgres_base() -> Option<String> {
    std::env::var("BERTH_TEST_POSTGRES").ok().filter(|s| !s.is_empty()).map(|s| s.trim_end_matches('/').to_string())
}

fn psql(base: &str, sql: &str) {
    let out = Command::new("psql")
        .args([&format!("{base}/postgres"), "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("running psql");
    assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Server {
    /// Starts a server on `berth`'s data directory with `extra` options; waits for its API.
    pub fn start(berth: &Berth, extra: &[&str]) -> Server {
        let api = free_port();
        let http = free_port();
        let ssh = free_port();
        let https = free_port();
        let log = berth.data_dir().join("server.log");
        let mut args: Vec<String> = Vec::new();
        // Defaults, unless `extra` sets the option itself.
        for (opt, val) in [
            ("--api-addr", format!("127.0.0.1:{api}")),
            ("--http-addr", format!("127.0.0.1:{http}")),
            // Every server its own SSH port: the default 0.0.0.0:2222 would be shared.
            ("--ssh-addr", format!("127.0.0.1:{ssh}")),
            // And its own TLS port; no ACME CA unless a test starts one (tests never reach
            // the internet, and the default is Let's Encrypt).
            ("--https-addr", format!("127.0.0.1:{https}")),
            ("--acme-directory", "off".into()),
            ("--domain", "test.local".into()),
        ] {
            if !extra.contains(&opt) {
                args.extend([opt.to_string(), val]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        // A fresh database per server, when the suite runs on PostgreSQL.
        let postgres = match postgres_base() {
            Some(base) if !extra.contains(&"--database-url") => {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let db = format!("berth_t{}_{n}", std::process::id());
                psql(&base, &format!("CREATE DATABASE {db}"));
                args.extend(["--database-url".to_string(), format!("{base}/{db}")]);
                Some((base, db))
            }
            _ => None,
        };
        let api = last_port(&args, "--api-addr").unwrap_or(api);
        let http = last_port(&args, "--http-addr").unwrap_or(http);
        let ssh = last_port(&args, "--ssh-addr").unwrap_or(ssh);
        let https = last_port(&args, "--https-addr").unwrap_or(https);
        let mut s = Server {
            child: spawn(berth, &args, &log),
            api,
            http,
            ssh,
            https,
            domain: "test.local".into(),
            data_dir: berth.data_dir().to_path_buf(),
            log,
            postgres,
            args,
        };
        s.wait_up();
        s
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("berth server exited with {status} before answering; its log:\n{}", self.log_text());
            }
            if let Ok(r) = request(self.api, "GET", "127.0.0.1", "/api/v1/health", &[], b"") {
                assert_eq!(r.status, 200, "{}", r.text());
                return;
            }
            assert!(Instant::now() < deadline, "berth server did not answer within 30s; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the database holds, as bytes: the SQLite files, or a `pg_dump` of the
    /// PostgreSQL database (to check what is, and is not, stored).
    pub fn database_bytes(&self) -> Vec<u8> {
        match &self.postgres {
            Some((base, db)) => {
                let out = Command::new("pg_dump").arg(format!("{base}/{db}")).output().expect("running pg_dump");
                assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
                out.stdout
            }
            None => ["berth.db", "berth.db-wal"]
                .iter()
                .flat_map(|f| std::fs::read(self.data_dir.join(f)).unwrap_or_default())
                .collect(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token")).expect("reading admin-token").trim().to_string()
    }

    /// An API call with the admin token; `body` is JSON.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let t = self.token();
        let b = body.map(|b| b.to_string()).unwrap_or_default();
        let mut h = vec![("Authorization", format!("Bearer {t}"))];
        if !b.is_empty() {
            h.push(("Content-Type", "application/json".into()));
        }
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(self.api, method, "127.0.0.1", path, &h, b.as_bytes()).expect("calling the API")
    }

    /// A GET through the proxy to `<service>.<domain>`.
    pub fn get(&self, service: &str, path: &str) -> Reply {
        request(self.http, "GET", &format!("{service}.{}", self.domain), path, &[], b"").unwrap_or_else(|e| {
            panic!("GET {path} through the proxy to {service}: {e}\nserver log:\n{}", self.log_text())
        })
    }

    /// The `berth` CLI pointed at this server.
    pub fn cli(&self, berth: &Berth, args: &[&str]) -> Output {
        berth
            .cmd()
            .env("BERTH_API", format!("http://127.0.0.1:{}", self.api))
            .env("BERTH_TOKEN", self.token())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running berth")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn cli_ok(&self, berth: &Berth, args: &[&str]) -> String {
        let out = self.cli(berth, args);
        assert!(
            out.status.success(),
            "berth {args:?} failed with {:?}\nstdout: {}\nstderr: {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The service as the API shows it.
    pub fn service(&self, name: &str) -> Value {
        let r = self.call("GET", &format!("/api/v1/services/{name}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Waits until `f(service)` holds.
    pub fn wait_service(&self, name: &str, timeout: Duration, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let s = self.service(name);
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < end, "waited {timeout:?} for {what}; service now: {s:#}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL, like a crash: nothing of the server's shutdown runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same server again (same ports and options) after a stop or kill.
    pub fn restart(&mut self, berth: &Berth) {
        self.child = spawn(berth, &self.args, &self.log);
        self.wait_up();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "berth server exited with {status} on SIGTERM; log:\n{}", self.log_text());
                return;
            }
            assert!(Instant::now() < deadline, "berth server did not stop within 15s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn last_port(args: &[String], opt: &str) -> Option<u16> {
    let i = args.iter().rposition(|a| a == opt)?;
    args.get(i + 1)?.rsplit(':').next()?.parse().ok()
}

fn spawn(berth: &Berth, args: &[String], log: &std::path::Path) -> Child {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("opening the server log");
    let mut c: Command = berth.cmd();
    c.env_remove("BERTH_CONTROL_HOST")
        .env_remove("BERTH_TRUSTED_PROXY")
        .env_remove("BERTH_DOMAIN")
        .env("BERTH_LOG", "info,berth=debug")
        .arg("server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    c.spawn().expect("starting berth server")
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((base, db)) = &self.postgres {
            let _ = Command::new("psql")
                .args([&format!("{base}/postgres"), "-qc", &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")])
                .output();
        }
        // The API firewall rule of a killed server (the harness removes the bridge itself).
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "iptables -w -S INPUT | grep -- '--dport {} ' | sed 's/^-A/-D/' | xargs -r -L1 iptables -w",
                self.api
            ))
            .status();
    }
}

/// The test world's Python image.
pub fn python() -> String {
    crate::world().image("anon", "python")
}

/// `berth deploy NAME --image <python> --wait EXTRA...`, which must succeed.
pub fn deploy(s: &Server, b: &Berth, name: &str, extra: &[&str]) -> String {
    let image = python();
    let mut args = vec!["deploy", name, "--image", image.as_str(), "--wait"];
    args.extend_from_slice(extra);
    s.cli_ok(b, &args)
}
