//! The end-to-end test harness: the real `berth` binary against the real test world (local
//! registries started by tests/world/world.py, images built from Debian packages).
//!
//! Each [`Berth`] gets its own data directory, bridge and subnet, so tests run in parallel; its
//! Drop removes every container, the bridge, the NAT rules and the directory, also when the
//! test failed.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub mod pebble;
pub mod server;
pub mod terminal;

#[derive(Debug, Clone, Deserialize)]
pub struct Registry {
    pub host: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorldInfo {
    pub registries: std::collections::BTreeMap<String, Registry>,
    pub images: std::collections::BTreeMap<String, String>,
    pub layouts: std::collections::BTreeMap<String, String>,
}

struct WorldProc {
    info: WorldInfo,
    // Held for the life of the test process: when it exits, the world sees EOF and stops.
    _stdin: ChildStdin,
    _child: Child,
}

static WORLD: OnceLock<Mutex<WorldProc>> = OnceLock::new();

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The shared test world, started on first use.
pub fn world() -> WorldInfo {
    let w = WORLD.get_or_init(|| {
        let script = repo_root().join("tests/world/world.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting the test world ({}): {e}; run scripts/install-test-deps first", script.display())
            });
        let stdin = child.stdin.take().expect("piped");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("reading the world's JSON line");
        let info: WorldInfo = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the test world did not start (got {line:?}: {e}); see its output above"));
        Mutex::new(WorldProc { info, _stdin: stdin, _child: child })
    });
    w.lock().unwrap_or_else(|p| p.into_inner()).info.clone()
}

impl WorldInfo {
    /// `<registry host>/<image path>` for one of the world's images in one of its registries.
    pub fn image(&self, registry: &str, image: &str) -> String {
        format!("{}/{}", self.registries[registry].host, self.images[image])
    }
}

/// The berth binary: `BERTH_BIN`, else next to the test executable's `deps/` directory.
pub fn berth_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BERTH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("berth");
    assert!(bin.exists(), "{} is missing: run `cargo build -p berth` before the tests", bin.display());
    bin
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One berth "installation": a data dir with its own network.
pub struct Berth {
    pub dir: tempfile::TempDir,
    pub bridge: String,
    pub subnet: String,
}

impl Berth {
    pub fn new() -> Berth {
        // The world first: the config gets its registries' credentials.
        world();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = tempfile::Builder::new().prefix("bt").tempdir_in("/tmp").expect("temp dir");
        let bridge = format!("bt{}x{}", pid % 100_000, n);
        let subnet = format!("10.{}.{}.0/24", 100 + (pid % 100), n % 250);
        let b = Berth { dir, bridge, subnet };
        b.write_config("");
        b
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes config.toml: this berth's network, the world's registry credentials, and `extra`.
    pub fn write_config(&self, extra: &str) {
        let mut cfg = format!("[network]\nbridge = \"{}\"\nsubnet = \"{}\"\n\n", self.bridge, self.subnet);
        if let Some(w) = WORLD.get() {
            let info = w.lock().unwrap_or_else(|p| p.into_inner()).info.clone();
            for r in info.registries.values() {
                if let (Some(u), Some(p)) = (&r.username, &r.password) {
                    cfg.push_str(&format!("[registries.\"{}\"]\nusername = \"{u}\"\npassword = \"{p}\"\n\n", r.host));
                }
            }
        }
        cfg.push_str(extra);
        std::fs::write(self.dir.path().join("config.toml"), cfg).expect("writing config.toml");
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(berth_bin());
        c.env("BERTH_DATA_DIR", self.dir.path()).env_remove("BERTH_CONFIG").env("BERTH_TEST_PASS", "passed");
        c
    }

    /// Runs berth with `args`, returning its output (whatever the exit code).
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).stdin(Stdio::null()).output().expect("running berth")
    }

    /// Runs berth and asserts it succeeded; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "berth {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn inspect(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["container", "inspect", "--json", id])).expect("inspect json")
    }

    pub fn container_ids(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["container", "ls", "--all", "--json"])).expect("ls json");
        v.as_array().expect("array").iter().map(|c| c["id"].as_str().expect("id").to_string()).collect()
    }

    /// Waits until `f` is true, up to `timeout`.
    pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        f()
    }
}

impl Default for Berth {
    fn default() -> Self {
        Berth::new()
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let v: Option<serde_json::Value> = self
            .cmd()
            .args(["container", "ls", "--all", "--json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok());
        if let Some(list) = v.as_ref().and_then(|v| v.as_array()) {
            for c in list {
                if let Some(id) = c["id"].as_str() {
                    let _ = self.cmd().args(["container", "rm", "--force", id]).output();
                }
            }
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).stderr(Stdio::null()).status();
        for rule in nat_rules(&self.bridge, &self.subnet) {
            let _ = Command::new("iptables").args(["-w"]).args(&rule).stderr(Stdio::null()).status();
        }
        // Anything still mounted under the data dir (a failed test) is detached before removal.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.path().display().to_string();
            for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&root)) {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

fn nat_rules(bridge: &str, subnet: &str) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        s(&["-t", "filter", "-D", "FORWARD", "-i", bridge, "-o", bridge, "-j", "DROP"]),
        s(&["-t", "nat", "-D", "POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE"]),
        s(&["-t", "filter", "-D", "FORWARD", "-i", bridge, "-j", "ACCEPT"]),
        s(&[
            "-t",
            "filter",
            "-D",
            "FORWARD",
            "-o",
            bridge,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]),
    ]
}

/// Sends a plain HTTP/1.0 GET and returns (status line, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse().expect("socket address"), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    Ok((head.lines().next().unwrap_or("").to_string(), body.to_string()))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `git` with a fixed identity and no user or system configuration.
pub fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Berth Test")
        .env("GIT_AUTHOR_EMAIL", "test@berth.invalid")
        .env("GIT_COMMITTER_NAME", "Berth Test")
        .env("GIT_COMMITTER_EMAIL", "test@berth.invalid")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_SSH_COMMAND")
        .env_remove("GIT_DIR");
    c
}

/// A Python stdlib web app for the test repositories: answers every GET with
/// `python says $MODE <contents of /app/version.txt>` on `$PORT` (8000).
pub const PYTHON_APP: &str = r#"import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("python says " + os.environ.get("MODE", "?") + " " + open("/app/version.txt").read().strip()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), H).serve_forever()
"#;
