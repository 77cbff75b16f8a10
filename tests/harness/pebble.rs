//! A real ACME CA for end-to-end tests: Debian's `pebble` (the RFC 8555 test CA) with
//! `pebble-challtestsrv` as its DNS server (which answers 127.0.0.1 for every name), both on
//! loopback with ephemeral ports. Pebble validates challenges by connecting to 127.0.0.1 on
//! the `httpPort` (HTTP-01) and `tlsPort` (TLS-ALPN-01) of its config: the ports of the berth
//! server under test. Both processes are killed and reaped, and the temp dir removed, on drop
//! (also when the test panicked).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::free_port;

/// A running pebble and its challenge test server.
pub struct Pebble {
    /// The ACME API port (`https://127.0.0.1:PORT/dir`).
    pub port: u16,
    /// The management port (`/roots/0`, `/intermediates/0`).
    pub management: u16,
    /// The DNS port of pebble-challtestsrv (UDP and TCP).
    pub dns: u16,
    /// Where pebble connects for HTTP-01 and TLS-ALPN-01.
    pub http_port: u16,
    pub tls_port: u16,
    pebble: Child,
    chall: Child,
    log: PathBuf,
    chall_log: PathBuf,
    api_ca: PathBuf,
    root: PathBuf,
    // Last: removed after the processes are gone.
    dir: tempfile::TempDir,
}

fn need(tool: &str) {
    let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{tool} is not installed: apt-get install pebble openssl curl (scripts/install-test-deps)");
}

/// Runs `c`, asserting success.
fn run_ok(c: &mut Command, what: &str) -> Vec<u8> {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("opening a log file");
    let g = f.try_clone().expect("cloning a log file");
    (Stdio::from(f), Stdio::from(g))
}

impl Pebble {
    /// Starts challtestsrv and pebble; pebble validates HTTP-01 on 127.0.0.1:`http_port` and
    /// TLS-ALPN-01 on 127.0.0.1:`tls_port`. `validity_secs`: the lifetime of the certificates
    /// it issues (pebble's default otherwise). Returns once its directory answers.
    pub fn start(http_port: u16, tls_port: u16, validity_secs: Option<u64>) -> Pebble {
        for t in ["pebble", "pebble-challtestsrv", "openssl", "curl"] {
            need(t);
        }
        let dir = tempfile::Builder::new().prefix("btpebble").tempdir_in("/tmp").expect("temp dir");
        let d = dir.path();
        let (port, management, dns, chall_mgmt) = (free_port(), free_port(), free_port(), free_port());

        // Pebble's own API certificate, signed by a CA of its own: `api_ca` is that CA, which
        // clients trust explicitly. (A self-signed `openssl req -x509` certificate carries
        // `CA:TRUE`, which webpki refuses as a server's certificate: CaUsedAsEndEntity.)
        let api_ca = d.join("api-ca.pem");
        let api_ca_key = d.join("api-ca-key.pem");
        let api_cert = d.join("api-cert.pem");
        let api_key = d.join("api-key.pem");
        let api_csr = d.join("api.csr");
        let api_ext = d.join("api.ext");
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-days", "30", "-subj", "/CN=Pebble API test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"])
                .arg("-keyout")
                .arg(&api_ca_key)
                .arg("-out")
                .arg(&api_ca),
            "openssl req (the CA of pebble's API certificate)",
        );
        run_ok(
            Command::new("openssl")
                .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-subj", "/CN=localhost"])
                .arg("-keyout")
                .arg(&api_key)
                .arg("-out")
                .arg(&api_csr),
            "openssl req (pebble's API key)",
        );
        std::fs::write(
            &api_ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("writing the extensions file");
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "30", "-in"])
                .arg(&api_csr)
                .arg("-CA")
                .arg(&api_ca)
                .arg("-CAkey")
                .arg(&api_ca_key)
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(&api_ext)
                .arg("-out")
                .arg(&api_cert),
            "openssl x509 (pebble's API certificate)",
        );

        let mut cfg = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": api_cert,
            "privateKey": api_key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(v) = validity_secs {
            cfg["certificateValidityPeriod"] = v.into();
        }
        let cfg_path = d.join("pebble.json");
        std::fs::write(&cfg_path, serde_json::json!({ "pebble": cfg }).to_string()).expect("writing pebble's config");

        let chall_log = d.join("challtestsrv.log");
        let (o, e) = log_file(&chall_log);
        let chall = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{chall_mgmt}"), "-defaultIPv6", ""])
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .spawn()
            .expect("starting pebble-challtestsrv");

        let log = d.join("pebble.log");
        let (o, e) = log_file(&log);
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&cfg_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .spawn()
            .expect("starting pebble");

        let root = d.join("root.pem");
        let mut p =
            Pebble { port, management, dns, http_port, tls_port, pebble, chall, log, chall_log, api_ca, root, dir };
        p.wait_up();
        p
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.pebble.try_wait().unwrap() {
                panic!("pebble exited with {st}; its log:\n{}", self.log_text());
            }
            if let Some(st) = self.chall.try_wait().unwrap() {
                panic!("pebble-challtestsrv exited with {st}; its log:\n{}", self.chall_log_text());
            }
            // The directory through the CA clients are given: the API certificate checks out.
            let dir = curl(&self.directory(), Some(&self.api_ca));
            let root = curl(&format!("https://127.0.0.1:{}/roots/0", self.management), None);
            if let (Some(dir), Some(root)) = (dir, root) {
                if dir.contains("newOrder") && root.contains("BEGIN CERTIFICATE") {
                    std::fs::write(&self.root, root).expect("writing pebble's root");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "pebble did not answer on {} within 20s; its log:\n{}",
                self.directory(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The ACME directory URL, for `--acme-directory`.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The PEM of the CA that signed pebble's own API certificate, for `--acme-ca-root`.
    pub fn api_ca(&self) -> PathBuf {
        self.api_ca.clone()
    }

    /// The root that the certificates pebble issues chain to (fetched from `/roots/0` at start).
    pub fn root_pem(&self) -> PathBuf {
        self.root.clone()
    }

    /// A fresh copy of pebble's intermediate certificate(s), as PEM.
    pub fn intermediate_pem(&self) -> String {
        curl(&format!("https://127.0.0.1:{}/intermediates/0", self.management), None).unwrap_or_default()
    }

    /// A temp dir of this CA's, for a test's own files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Pebble's stdout and stderr so far (it logs each request, order and validation).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn chall_log_text(&self) -> String {
        std::fs::read_to_string(&self.chall_log).unwrap_or_default()
    }

    /// How many orders pebble has received (it logs `Added order "ID" to the db` for each).
    pub fn orders(&self) -> usize {
        self.log_text().matches("Added order").count()
    }

    /// How many certificates pebble has issued (`Issued certificate serial S for order O`).
    pub fn issued(&self) -> usize {
        self.log_text().matches("Issued certificate serial").count()
    }

    /// How many validations pebble ran for `name` (its VA logs each task with the identifier:
    /// `Pulled a task from the Tasks queue: &va.vaTask{Identifier:acme.Identifier{Type:"dns",
    /// Value:"NAME"}, ...`).
    pub fn validations_for(&self, name: &str) -> usize {
        let needle = format!("Value:\"{name}\"");
        self.log_text().lines().filter(|l| l.contains("Pulled a task") && l.contains(&needle)).count()
    }
}

/// `curl -s URL`, trusting `ca` (None: any certificate): the body on success.
fn curl(url: &str, ca: Option<&Path>) -> Option<String> {
    let mut c = Command::new("curl");
    match ca {
        Some(ca) => c.arg("--cacert").arg(ca),
        None => c.arg("-k"),
    };
    let out =
        c.args(["-s", "--fail", "--max-time", "5", url]).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.pebble.wait();
        let _ = self.chall.kill();
        let _ = self.chall.wait();
    }
}
