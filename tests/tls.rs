//! End to end: automatic HTTPS against a real ACME CA (Debian's pebble, tests/harness/pebble.rs).
//! HTTP-01 and TLS-ALPN-01 issuance for services, tags and the control host, served over HTTP/2
//! and HTTP/1.1 with `curl` verifying against pebble's root; the certificate without SNI; the
//! certificates across a restart (no new order); renewal of 30-second certificates under
//! requests; a CA that cannot validate (the error, the backoff); on-demand issuance (off by
//! default, an allow-list, an ask URL); an uploaded certificate, the HTTP → HTTPS redirect and
//! HSTS; `git push` over HTTPS to the control host.
//!
//! Clients are the real `curl`, `openssl s_client` and `git`. Pebble validates on 127.0.0.1 at
//! the ports its config names (`httpPort`, `tlsPort`); a test that means one challenge type to
//! succeed points the other at a port where nothing listens.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_tests::pebble::Pebble;
use berth_tests::server::{deploy, free_port, python, request, Server};
use berth_tests::{git, stderr, stdout, Berth, PYTHON_APP};
use serde_json::Value;

/// How long issuance may take (a deploy's names are ordered soon after it).
const ISSUANCE: Duration = Duration::from_secs(60);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of the server's and pebble's logs, for failure messages.
fn logs(s: &Server, p: Option<&Pebble>) -> String {
    let mut out = format!("--- server log (tail) ---\n{}\n", tail(&s.log_text(), 60));
    if let Some(p) = p {
        out.push_str(&format!("--- pebble log (tail) ---\n{}\n", tail(&p.log_text(), 40)));
    }
    out
}

/// A server whose ACME CA is `p`, listening for HTTP on `http` and TLS on `https` (the ports
/// `p` was started with, for the challenge type the test means to succeed).
fn acme_server(b: &Berth, p: &Pebble, http: u16, https: u16, extra: &[&str]) -> Server {
    let dir = p.directory();
    let ca = p.api_ca();
    let http = format!("127.0.0.1:{http}");
    let https = format!("127.0.0.1:{https}");
    let mut args = vec![
        "--acme-directory",
        dir.as_str(),
        "--acme-ca-root",
        ca.to_str().unwrap(),
        "--acme-email",
        "ops@berth.invalid",
        "--http-addr",
        http.as_str(),
        "--https-addr",
        https.as_str(),
    ];
    args.extend_from_slice(extra);
    Server::start(b, &args)
}

/// `GET /api/v1/certs`: one object per name.
fn certs(s: &Server) -> Vec<Value> {
    let r = s.call("GET", "/api/v1/certs", None);
    assert_eq!(r.status, 200, "GET /api/v1/certs: {}", r.text());
    match r.json() {
        Value::Array(v) => v,
        other => panic!("GET /api/v1/certs is not a JSON array: {other:#}"),
    }
}

fn cert(s: &Server, host: &str) -> Option<Value> {
    certs(s).into_iter().find(|c| c["host"] == host)
}

/// Waits until the certificate of `host` satisfies `f`; returns it.
fn wait_cert(
    s: &Server,
    p: Option<&Pebble>,
    host: &str,
    timeout: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + timeout;
    loop {
        let all = certs(s);
        if let Some(c) = all.iter().find(|c| c["host"] == host) {
            if f(c) {
                return c.clone();
            }
        }
        assert!(
            Instant::now() < end,
            "waited {timeout:?} for {what} of {host}; /api/v1/certs: {:#}\n{}",
            Value::Array(all),
            logs(s, p)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_valid(s: &Server, p: &Pebble, host: &str) -> Value {
    wait_cert(s, Some(p), host, ISSUANCE, "a valid certificate", |c| c["status"] == "valid")
}

/// Lowercase hex without colons.
fn norm_fp(fp: &str) -> String {
    fp.chars().filter(|c| c.is_ascii_hexdigit()).collect::<String>().to_ascii_lowercase()
}

fn fp_of(c: &Value) -> String {
    let fp = norm_fp(c["fingerprint"].as_str().unwrap_or_else(|| panic!("no fingerprint in {c:#}")));
    assert_eq!(fp.len(), 64, "a SHA-256 in hex: {c:#}");
    fp
}

/// What curl got.
#[derive(Debug)]
struct Curl {
    /// curl's exit code (0: the transfer worked; 60: the certificate did not verify...).
    exit: i32,
    code: u16,
    version: String,
    /// The response head as received (`-D`), names as sent.
    head: String,
    body: String,
    /// curl's own messages (shown by Debug in failure messages).
    #[allow(dead_code)]
    err: String,
}

impl Curl {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn curl(args: &[&str]) -> Curl {
    let tmp = tempfile::Builder::new().prefix("btcurl").tempdir_in("/tmp").unwrap();
    let (h, b) = (tmp.path().join("head"), tmp.path().join("body"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "40", "-w", "%{http_code} %{http_version}", "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running curl");
    let w = stdout(&out);
    let (code, version) = w.trim().split_once(' ').unwrap_or(("000", ""));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        code: code.parse().unwrap_or(0),
        version: version.to_string(),
        head: std::fs::read_to_string(&h).unwrap_or_default(),
        body: std::fs::read_to_string(&b).unwrap_or_default(),
        err: stderr(&out),
    }
}

/// `curl --cacert CA https://HOST:PORT/PATH`, HOST resolved to 127.0.0.1.
fn https_get(s: &Server, ca: &Path, host: &str, path: &str, extra: &[&str]) -> Curl {
    let resolve = format!("{host}:{}:127.0.0.1", s.https);
    let url = format!("https://{host}:{}{path}", s.https);
    let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", resolve.as_str()];
    args.extend_from_slice(extra);
    args.push(url.as_str());
    curl(&args)
}

/// `curl -k https://HOST:PORT/PATH`: over TLS, whatever the certificate.
fn https_insecure(s: &Server, host: &str, path: &str) -> Curl {
    let resolve = format!("{host}:{}:127.0.0.1", s.https);
    curl(&["-k", "--resolve", &resolve, &format!("https://{host}:{}{path}", s.https)])
}

/// The leaf a TLS server presented to `openssl s_client`.
#[derive(Debug, Default)]
struct Presented {
    /// s_client's whole output.
    out: String,
    pem: String,
    fingerprint: String,
    /// `openssl x509 -subject -ext subjectAltName` of the leaf.
    names: String,
}

impl Presented {
    fn verified(&self) -> bool {
        self.out.contains("Verify return code: 0 (ok)")
    }
}

/// A handshake with 127.0.0.1:`port`, SNI `sni` (None: no SNI); with `ca`, the chain is
/// verified against it (`-verify_return_error`).
fn presented(port: u16, sni: Option<&str>, ca: Option<&Path>) -> Presented {
    let mut c = Command::new("timeout");
    c.args(["40", "openssl", "s_client", "-connect", &format!("127.0.0.1:{port}"), "-showcerts"]);
    match sni {
        Some(n) => c.args(["-servername", n]),
        None => c.arg("-noservername"),
    };
    if let Some(ca) = ca {
        c.arg("-CAfile").arg(ca).arg("-verify_return_error");
    }
    let out = c.stdin(Stdio::null()).output().expect("running openssl s_client");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    let mut p = Presented { out: text.clone(), ..Default::default() };
    let (Some(start), Some(end)) = (text.find("-----BEGIN CERTIFICATE-----"), text.find("-----END CERTIFICATE-----"))
    else {
        return p;
    };
    p.pem = format!("{}\n", &text[start..end + "-----END CERTIFICATE-----".len()]);
    let x = x509(&p.pem, &["-fingerprint", "-sha256", "-subject", "-ext", "subjectAltName"]);
    p.fingerprint = x.lines().find_map(|l| l.split_once("Fingerprint=")).map(|(_, f)| norm_fp(f)).unwrap_or_default();
    p.names = x;
    p
}

/// `openssl x509 -noout ARGS` of a PEM.
fn x509(pem: &str, args: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running openssl x509");
    child.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    format!("{}{}", stdout(&out), stderr(&out))
}

fn pem_fingerprint(pem: &str) -> String {
    let x = x509(pem, &["-fingerprint", "-sha256"]);
    x.lines().find_map(|l| l.split_once("Fingerprint=")).map(|(_, f)| norm_fp(f)).unwrap_or_else(|| panic!("{x}"))
}

/// The presented leaf's fingerprint once the TLS listener answers (right after a start it may
/// not yet).
fn presented_fp(s: &Server, sni: &str, ca: Option<&Path>) -> Presented {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let p = presented(s.https, Some(sni), ca);
        if !p.fingerprint.is_empty() {
            return p;
        }
        assert!(Instant::now() < end, "no TLS handshake for {sni} on {}: {}\n{}", s.https, p.out, logs(s, None));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_ok(c: &mut Command) -> String {
    let out = c.stdin(Stdio::null()).output().expect("running a tool");
    assert!(out.status.success(), "{c:?}: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

#[test]
fn http_01_certificates_are_served_over_http2_and_http1_to_any_spelling_and_without_sni() {
    let (http, https) = (free_port(), free_port());
    // TLS-ALPN-01 has nowhere to go: only HTTP-01 can succeed.
    let p = Pebble::start(http, free_port(), None);
    let b = Berth::new();
    let s = acme_server(&b, &p, http, https, &[]);
    let root = p.root_pem();
    deploy(&s, &b, "web", &[]);

    let c = wait_valid(&s, &p, "web.test.local");
    assert_eq!(c["source"], "acme", "{c:#}");
    let (t, not_after, renew_at) = (now(), c["not_after"].as_u64().unwrap(), c["renew_at"].as_u64().unwrap());
    assert!(not_after > t + 3600, "pebble's default lifetime is years: {c:#}");
    assert!(renew_at > t && renew_at < not_after, "renewal comes before expiry: {c:#}");
    assert_eq!(c["failures"], 0, "{c:#}");
    assert!(c["error"].is_null(), "{c:#}");
    let fp = fp_of(&c);
    assert!(p.validations_for("web.test.local") >= 1, "pebble validated the name:\n{}", p.log_text());

    // HTTP/2 by ALPN, and HTTP/1.1 for a client that asks for it; both verify against the root.
    let r = https_get(&s, &root, "web.test.local", "/", &[]);
    assert_eq!(
        (r.exit, r.code, r.body.as_str(), r.version.as_str()),
        (0, 200, "python ok", "2"),
        "{r:?}\n{}",
        logs(&s, Some(&p))
    );
    let r = https_get(&s, &root, "web.test.local", "/", &["--http1.1"]);
    assert_eq!((r.exit, r.code, r.body.as_str(), r.version.as_str()), (0, 200, "python ok", "1.1"), "{r:?}");
    let pr = presented_fp(&s, "web.test.local", Some(&root));
    assert!(pr.verified(), "{}", pr.out);
    assert_eq!(pr.fingerprint, fp, "the certificate the API shows is the one served");
    assert!(pr.names.contains("DNS:web.test.local"), "{}", pr.names);

    // Another spelling of the name: case and a trailing dot.
    let r = https_get(&s, &root, "WEB.Test.Local.", "/", &[]);
    assert_eq!((r.exit, r.code, r.body.as_str()), (0, 200, "python ok"), "{r:?}");
    let pr = presented(s.https, Some("WEB.Test.Local"), Some(&root));
    assert_eq!(pr.fingerprint, fp, "SNI in another case: {}", pr.out);

    // The service shows its certificates.
    let svc = s.service("web");
    let mine = svc["certificates"].as_array().unwrap_or_else(|| panic!("no certificates in {svc:#}"));
    let w = mine.iter().find(|c| c["host"] == "web.test.local").unwrap_or_else(|| panic!("{svc:#}"));
    assert_eq!((w["status"].as_str(), fp_of(w)), (Some("valid"), fp.clone()), "{svc:#}");
    assert!(mine.iter().all(|c| c["host"] != "berth.test.local"), "only the service's names: {svc:#}");

    // A tag's name gets its own.
    s.cli_ok(&b, &["tag", "web", "1", "canary"]);
    let tc = wait_valid(&s, &p, "canary--web.test.local");
    let r = https_get(&s, &root, "canary--web.test.local", "/", &[]);
    assert_eq!((r.exit, r.code, r.body.as_str()), (0, 200, "python ok"), "{r:?}");
    assert_ne!(fp_of(&tc), fp);

    // Without SNI: the control host's certificate, which verifies.
    let ctl = wait_valid(&s, &p, "berth.test.local");
    let pr = presented(s.https, None, Some(&root));
    assert!(pr.verified(), "{}", pr.out);
    assert!(pr.names.contains("DNS:berth.test.local"), "{}", pr.names);
    assert_eq!(pr.fingerprint, fp_of(&ctl));
    let out = run_ok(
        Command::new("timeout")
            .args(["40", "openssl", "s_client", "-connect", &format!("127.0.0.1:{}", s.https), "-noservername"])
            .args(["-verify_hostname", "berth.test.local", "-verify_return_error", "-CAfile"])
            .arg(&root),
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    // The API through the control host over HTTPS.
    let t = format!("Authorization: Bearer {}", s.token());
    let r = https_get(&s, &root, "berth.test.local", "/api/v1/services/web", &["-H", &t]);
    assert_eq!((r.exit, r.code), (0, 200), "{r:?}");

    // `berth certs` lists them.
    let out = s.cli_ok(&b, &["certs"]);
    for host in ["web.test.local", "canary--web.test.local", "berth.test.local"] {
        assert!(out.lines().any(|l| l.contains(host) && l.contains("valid")), "{host} in:\n{out}");
    }
}

#[test]
fn tls_alpn_01_issues_a_certificate_that_curl_verifies() {
    let (http, https) = (free_port(), free_port());
    // HTTP-01 has nowhere to go: only TLS-ALPN-01 can succeed.
    let p = Pebble::start(free_port(), https, None);
    let b = Berth::new();
    let s = acme_server(&b, &p, http, https, &["--acme-challenge", "tls-alpn-01"]);
    deploy(&s, &b, "web", &[]);
    let c = wait_valid(&s, &p, "web.test.local");
    assert_eq!(c["source"], "acme", "{c:#}");
    let r = https_get(&s, &p.root_pem(), "web.test.local", "/", &[]);
    assert_eq!((r.exit, r.code, r.body.as_str()), (0, 200, "python ok"), "{r:?}\n{}", logs(&s, Some(&p)));
    assert_eq!(presented_fp(&s, "web.test.local", Some(&p.root_pem())).fingerprint, fp_of(&c));
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn issued_certificates_survive_a_restart_without_a_new_order() {
    let (http, https) = (free_port(), free_port());
    let p = Pebble::start(http, free_port(), None);
    let b = Berth::new();
    let mut s = acme_server(&b, &p, http, https, &[]);
    deploy(&s, &b, "web", &[]);
    let fp = fp_of(&wait_valid(&s, &p, "web.test.local"));
    let ctl = fp_of(&wait_valid(&s, &p, "berth.test.local"));
    std::thread::sleep(Duration::from_secs(1));
    let orders = p.orders();
    assert!(orders >= 2, "an order per name at least:\n{}", p.log_text());

    // On disk under <data-dir>/tls/: the certificate, and its key readable by root alone.
    let tls = s.data_dir.join("tls");
    let files = files_under(&tls);
    let holds_leaf = files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| t.contains("BEGIN CERTIFICATE") && pem_fingerprint(&t) == fp)
    });
    assert!(holds_leaf, "no file under {} holds the leaf {fp}: {files:?}", tls.display());
    let keys: Vec<_> =
        files.iter().filter(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("PRIVATE KEY"))).collect();
    assert!(!keys.is_empty(), "no private key under {}: {files:?}", tls.display());
    for k in keys {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(k).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}: a private key for root alone", k.display());
    }

    s.stop();
    s.restart(&b);
    let pr = presented_fp(&s, "web.test.local", Some(&p.root_pem()));
    assert_eq!(pr.fingerprint, fp, "the same certificate after the restart");
    assert!(pr.verified(), "{}", pr.out);
    assert_eq!(presented(s.https, None, None).fingerprint, ctl, "and the control host's without SNI");
    let c = cert(&s, "web.test.local").expect("listed after the restart");
    assert_eq!((c["status"].as_str(), fp_of(&c)), (Some("valid"), fp.clone()), "{c:#}");
    // The app comes back, served with it.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = https_get(&s, &p.root_pem(), "web.test.local", "/", &[]);
        if (r.exit, r.code) == (0, 200) {
            break;
        }
        assert!(Instant::now() < end, "{r:?}\n{}", logs(&s, Some(&p)));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.orders(), orders, "no new order after the restart:\n{}", tail(&p.log_text(), 40));
}

#[test]
fn short_lived_certificates_are_renewed_while_every_request_succeeds() {
    let (http, https) = (free_port(), free_port());
    let p = Pebble::start(http, free_port(), Some(30));
    let b = Berth::new();
    let s = acme_server(&b, &p, http, https, &[]);
    let root = p.root_pem();
    deploy(&s, &b, "web", &[]);
    let c = wait_valid(&s, &p, "web.test.local");
    let first = fp_of(&c);
    let (not_after, renew_at) = (c["not_after"].as_u64().unwrap(), c["renew_at"].as_u64().unwrap());
    assert!(not_after <= now() + 31, "a 30-second certificate: {c:#}");
    assert!(renew_at < not_after, "{c:#}");

    let mut api_fps = vec![first.clone()];
    let mut served_fps = vec![presented_fp(&s, "web.test.local", None).fingerprint];
    let mut bad = Vec::new();
    let mut n = 0;
    let end = Instant::now() + Duration::from_secs(35);
    while Instant::now() < end {
        let r = https_get(&s, &root, "web.test.local", "/", &[]);
        n += 1;
        if (r.exit, r.code, r.body.as_str()) != (0, 200, "python ok") {
            bad.push(format!("{:?}s: {r:?}", now()));
        }
        if let Some(c) = cert(&s, "web.test.local") {
            if let Some(f) = c["fingerprint"].as_str().map(norm_fp) {
                if api_fps.last() != Some(&f) {
                    api_fps.push(f);
                }
            }
        }
        if n % 5 == 0 {
            let f = presented(s.https, Some("web.test.local"), None).fingerprint;
            if !f.is_empty() && served_fps.last() != Some(&f) {
                served_fps.push(f);
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed, first ones: {:#?}\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        logs(&s, Some(&p))
    );
    assert!(api_fps.len() >= 2, "the certificate was never renewed in 35s: {api_fps:?}\n{}", logs(&s, Some(&p)));
    assert!(served_fps.len() >= 2, "the renewed certificate was never served: {served_fps:?}");
    let c = cert(&s, "web.test.local").unwrap();
    assert_eq!(c["status"], "valid", "{c:#}");
    assert!(c["not_after"].as_u64().unwrap() > not_after, "{c:#}");
}

/// How many orders have failed `secs` after the first with `--acme-retry 2s`: retries 2, 4,
/// 8... seconds after each failure, so at 0, 2, 6, 14, 30, 62...
fn failures_by(secs: f64) -> u64 {
    (0..20).take_while(|k| f64::from((1u32 << (k + 1)) - 2) <= secs).count() as u64
}

#[test]
fn a_ca_that_cannot_validate_shows_its_error_and_retries_with_backoff() {
    let (http, https) = (free_port(), free_port());
    // Pebble connects to ports where nothing listens, for both challenge types.
    let (dead_http, dead_tls) = (free_port(), free_port());
    let p = Pebble::start(dead_http, dead_tls, None);
    let b = Berth::new();
    // The control host is ordered as the server starts.
    let started = Instant::now();
    let s = acme_server(&b, &p, http, https, &["--acme-retry", "2s"]);
    let ctl = "berth.test.local";
    let c = wait_cert(&s, Some(&p), ctl, ISSUANCE, "a failed order", |c| c["status"] == "failed");
    let err = c["error"].as_str().unwrap_or_else(|| panic!("no error: {c:#}")).to_ascii_lowercase();
    assert!(
        err.contains("refused") || err.contains(&dead_http.to_string()),
        "the CA's reason (connection refused on port {dead_http}): {c:#}"
    );
    assert!(c["failures"].as_u64().unwrap() >= 1, "{c:#}");
    let next = c["next_attempt"].as_u64().unwrap_or_else(|| panic!("no next_attempt: {c:#}"));
    assert!(next >= now() && next <= now() + 60, "next_attempt soon after the failure, with --acme-retry 2s: {c:#}");
    assert!(c["fingerprint"].is_null() && c["not_after"].is_null(), "{c:#}");

    // 2s, 4s, 8s...: about three failures ten seconds after the first, not dozens.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    let c = cert(&s, ctl).unwrap();
    let failures = c["failures"].as_u64().unwrap();
    assert!(
        (2..=4).contains(&failures),
        "failures 10s after the start with --acme-retry 2s: {c:#}\n{}",
        logs(&s, Some(&p))
    );
    assert_eq!(c["status"], "failed", "{c:#}");
    assert!(c["next_attempt"].as_u64().unwrap() >= now(), "{c:#}");

    // A service's names fail the same way; HTTPS still answers it (with a self-signed
    // certificate), and `berth certs` shows the failure.
    let created = Instant::now();
    deploy(&s, &b, "web", &[]);
    let c = wait_cert(&s, Some(&p), "web.test.local", ISSUANCE, "a failed order", |c| c["status"] == "failed");
    assert!(c["error"].as_str().is_some_and(|e| e.to_ascii_lowercase().contains("refused")), "{c:#}");
    let r = https_insecure(&s, "web.test.local", "/");
    assert_eq!((r.exit, r.code, r.body.as_str()), (0, 200, "python ok"), "{r:?}");
    let out = s.cli_ok(&b, &["certs"]);
    assert!(out.lines().any(|l| l.contains("web.test.local") && l.contains("failed")), "{out}");
    let (web, ctl_failures) =
        (cert(&s, "web.test.local").unwrap(), cert(&s, ctl).unwrap()["failures"].as_u64().unwrap());
    let (w, c) = (web["failures"].as_u64().unwrap(), failures_by(created.elapsed().as_secs_f64()));
    assert!(w >= 1 && w <= c + 1, "{w} failures of web.test.local {:?} after its creation: {web:#}", created.elapsed());
    let c = failures_by(started.elapsed().as_secs_f64());
    assert!(ctl_failures <= c + 1, "{ctl_failures} failures of {ctl} {:?} after the start", started.elapsed());
    // Pebble saw an order per attempt, no more.
    let orders = p.orders() as u64;
    assert!(
        orders <= w + ctl_failures + 2,
        "{orders} orders for {w} + {ctl_failures} failures:\n{}",
        tail(&p.log_text(), 40)
    );

    // A restart keeps the failures and their retry time: the name is not retried at once.
    let before = cert(&s, ctl).unwrap();
    let mut s = s;
    s.stop();
    s.restart(&b);
    let after = cert(&s, ctl).unwrap();
    assert_eq!(after["status"], "failed", "{after:#}");
    assert!(
        after["failures"].as_u64() >= before["failures"].as_u64(),
        "failures reset by a restart: {before:#} {after:#}"
    );
    assert!(after["error"].is_string(), "{after:#}");
}

/// A tiny HTTP server for `--tls-on-demand-ask`: 200 for the names in `yes`, 403 otherwise;
/// records the request targets it got.
fn ask_server(yes: &'static [&'static str]) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/check", l.local_addr().unwrap().port());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut r = BufReader::new(&conn);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let target = line.split(' ').nth(1).unwrap_or("").to_string();
            let ok = yes.iter().any(|n| target.ends_with(&format!("domain={n}")));
            seen2.lock().unwrap().push(target);
            let status = if ok { "200 OK" } else { "403 Forbidden" };
            let _ = write!(&conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

/// No order reaches pebble for `host` within a few seconds of a handshake for it.
fn handshake_orders_nothing(s: &Server, p: &Pebble, host: &str) {
    let before = p.orders();
    let pr = presented(s.https, Some(host), None);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.orders(), before, "a handshake for {host} ordered: {}\n{}", pr.out, tail(&p.log_text(), 30));
    assert_eq!(p.validations_for(host), 0, "{}", p.log_text());
    assert!(cert(s, host).is_none(), "{host} is in /api/v1/certs: {:#}", Value::Array(certs(s)));
    assert!(!pr.names.contains(&format!("DNS:{host}")), "a certificate for {host} was served: {}", pr.names);
}

/// A handshake for `host` gets a certificate for it that verifies (the proxy may then answer
/// 404 for a host no service has).
fn handshake_gets_a_certificate(s: &Server, p: &Pebble, host: &str) {
    let r = https_get(s, &p.root_pem(), host, "/", &[]);
    assert_eq!(
        r.exit,
        0,
        "the first handshake for {host} gets a certificate that verifies: {r:?}\n{}",
        logs(s, Some(p))
    );
    assert!([200, 404].contains(&r.code), "{r:?}");
    let c = wait_valid(s, p, host);
    assert_eq!(c["source"], "acme", "{c:#}");
    assert!(p.validations_for(host) >= 1, "{}", p.log_text());
}

#[test]
fn on_demand_issuance_is_off_by_default_and_follows_the_allow_list_and_the_ask_url() {
    let (http, https) = (free_port(), free_port());
    let p = Pebble::start(http, free_port(), None);
    let b = Berth::new();
    {
        let s = acme_server(&b, &p, http, https, &[]);
        wait_valid(&s, &p, "berth.test.local");
        std::thread::sleep(Duration::from_secs(1));
        handshake_orders_nothing(&s, &p, "unknown.example.org");
    }
    {
        // The same data directory and ports, with an allow-list.
        let s = acme_server(&b, &p, http, https, &["--tls-on-demand-allow", "allowed.example.org,*.wild.example.org"]);
        wait_valid(&s, &p, "berth.test.local");
        std::thread::sleep(Duration::from_secs(1));
        let before = p.orders();
        handshake_gets_a_certificate(&s, &p, "allowed.example.org");
        handshake_gets_a_certificate(&s, &p, "x.wild.example.org");
        assert_eq!(p.orders(), before + 2, "an order per allowed name:\n{}", tail(&p.log_text(), 40));
        handshake_orders_nothing(&s, &p, "other.example.org");
        handshake_orders_nothing(&s, &p, "wild.example.org");
        // Issued on demand, and served again without a new order.
        let fp = fp_of(&cert(&s, "allowed.example.org").unwrap());
        let n = p.orders();
        assert_eq!(presented(s.https, Some("allowed.example.org"), None).fingerprint, fp);
        assert_eq!(p.orders(), n);
    }
    {
        let (url, seen) = ask_server(&["yes.example.org"]);
        let s = acme_server(&b, &p, http, https, &["--tls-on-demand-ask", &url]);
        wait_valid(&s, &p, "berth.test.local");
        std::thread::sleep(Duration::from_secs(1));
        handshake_gets_a_certificate(&s, &p, "yes.example.org");
        handshake_orders_nothing(&s, &p, "no.example.org");
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|t| t == "/check?domain=yes.example.org"), "{seen:?}");
        assert!(seen.iter().any(|t| t == "/check?domain=no.example.org"), "{seen:?}");
        // Names the server knows itself are never asked about.
        assert!(!seen.iter().any(|t| t.contains("berth.test.local")), "{seen:?}");
    }
}

/// A throwaway CA and leaf certificates it signs, made with openssl.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> TestCa {
        let dir = tempfile::Builder::new().prefix("btca").tempdir_in("/tmp").unwrap();
        let d = dir.path();
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-days", "2", "-subj", "/CN=Berth Throwaway CA"])
                .args([
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ])
                .arg("-keyout")
                .arg(d.join("ca.key"))
                .arg("-out")
                .arg(d.join("ca.pem")),
        );
        TestCa { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `<name>.pem` and `<name>.key`: a leaf for `host`, with a key of its own.
    fn leaf(&self, name: &str, host: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let (cert, key, csr, ext) = (
            d.join(format!("{name}.pem")),
            d.join(format!("{name}.key")),
            d.join(format!("{name}.csr")),
            d.join("ext"),
        );
        std::fs::write(
            &ext,
            format!("subjectAltName=DNS:{host}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"),
        )
        .unwrap();
        run_ok(
            Command::new("openssl")
                .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-subj", &format!("/CN={host}")])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        );
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(d.join("ca.pem"))
                .arg("-CAkey")
                .arg(d.join("ca.key"))
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert),
        );
        (cert, key)
    }
}

#[test]
fn an_uploaded_certificate_is_served_and_https_redirects_and_hsts_are_per_service() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "web", &[]);
    // Custom domains may not be under the platform's domain: the uploaded name is another.
    let up = "up.example.net";
    s.cli_ok(&b, &["domains", "web", "add", up]);
    let ca = TestCa::new();
    let (cert1, key1) = ca.leaf("one", up);
    let fp1 = pem_fingerprint(&std::fs::read_to_string(&cert1).unwrap());
    s.cli_ok(&b, &["certs", "add", up, "--cert", cert1.to_str().unwrap(), "--key", key1.to_str().unwrap()]);
    let r = https_get(&s, &ca.ca(), up, "/", &[]);
    assert_eq!((r.exit, r.code, r.body.as_str()), (0, 200, "python ok"), "{r:?}\n{}", logs(&s, None));
    assert_eq!(presented_fp(&s, up, Some(&ca.ca())).fingerprint, fp1);
    let c = cert(&s, up).expect("listed");
    assert_eq!(
        (c["status"].as_str(), c["source"].as_str(), fp_of(&c)),
        (Some("valid"), Some("uploaded"), fp1.clone()),
        "{c:#}"
    );
    let out = s.cli_ok(&b, &["certs"]);
    assert!(out.lines().any(|l| l.contains(up) && l.contains("uploaded")), "{out}");

    // A certificate with another certificate's key is refused, and nothing changes.
    let (cert2, _key2) = ca.leaf("two", up);
    let bad = s.cli(&b, &["certs", "add", up, "--cert", cert2.to_str().unwrap(), "--key", key1.to_str().unwrap()]);
    let said = format!("{}{}", stdout(&bad), stderr(&bad));
    assert!(!bad.status.success(), "a mismatched key was accepted: {said}");
    assert!(said.to_ascii_lowercase().contains("key"), "the refusal says the key is wrong: {said}");
    assert_eq!(presented_fp(&s, up, Some(&ca.ca())).fingerprint, fp1, "the old certificate still serves");
    assert_eq!(fp_of(&cert(&s, up).unwrap()), fp1);

    // Redirects and HSTS are off by default.
    let r = request(s.http, "GET", "web.test.local", "/x?y=1", &[], b"").unwrap();
    assert_ne!(r.status, 308, "{r:?}");
    let r = https_insecure(&s, "web.test.local", "/");
    assert_eq!((r.exit, r.code), (0, 200), "{r:?}");
    assert_eq!(r.header("strict-transport-security"), None, "{r:?}");
    let r = request(s.http, "GET", "web.test.local", "/headers", &[], b"").unwrap();
    assert!(r.text().contains("x-forwarded-proto: http\n"), "{}", r.text());

    assert_eq!(s.service("web")["url"], format!("http://web.test.local:{}/", s.http));
    s.cli_ok(&b, &["https", "web", "--redirect", "on", "--hsts", "1d"]);
    // The service's URL is the one it is served at now.
    assert_eq!(s.service("web")["url"], format!("https://web.test.local:{}/", s.https));
    for (host, want) in [
        ("web.test.local", format!("https://web.test.local:{}/x?y=1", s.https)),
        (&format!("web.test.local:{}", s.http), format!("https://web.test.local:{}/x?y=1", s.https)),
        (up, format!("https://{up}:{}/x?y=1", s.https)),
    ] {
        let r = request(s.http, "GET", host, "/x?y=1", &[], b"").unwrap();
        assert_eq!((r.status, r.header("location")), (308, Some(want.as_str())), "Host: {host}: {r:?}");
        assert_eq!(r.header("strict-transport-security"), None, "no HSTS over plain HTTP: {r:?}");
    }
    let r = request(s.http, "GET", "web.test.local", "/.well-known/acme-challenge/abc", &[], b"").unwrap();
    assert_ne!(r.status, 308, "ACME challenges are never redirected: {r:?}");
    // Only a token is a challenge: a path that climbs out of the prefix is redirected.
    let r = request(s.http, "GET", "web.test.local", "/.well-known/acme-challenge/../secret", &[], b"").unwrap();
    assert_eq!(r.status, 308, "{r:?}");
    // The control host is not the service's: not redirected.
    let r = request(s.http, "GET", "berth.test.local", "/api/v1/health", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // Over HTTPS: HSTS, and the app sees X-Forwarded-Proto: https (HTTP/2 and HTTP/1.1).
    for extra in [&[][..], &["--http1.1"][..]] {
        let r = https_get(&s, &ca.ca(), up, "/headers", extra);
        assert_eq!((r.exit, r.code), (0, 200), "{r:?}");
        assert_eq!(r.header("strict-transport-security").as_deref(), Some("max-age=86400"), "{r:?}");
        assert!(r.body.contains("x-forwarded-proto: https\n"), "{extra:?}: {}", r.body);
    }

    s.cli_ok(&b, &["https", "web", "--redirect", "off", "--hsts", "off"]);
    let r = request(s.http, "GET", "web.test.local", "/x?y=1", &[], b"").unwrap();
    assert_ne!(r.status, 308, "{r:?}");
    assert_eq!(s.service("web")["url"], format!("http://web.test.local:{}/", s.http));
    let r = https_get(&s, &ca.ca(), up, "/", &[]);
    assert_eq!(((r.exit, r.code), r.header("strict-transport-security")), ((0, 200), None), "{r:?}");

    // A name nothing answers at and nothing orders is none, not pending.
    let r = s.call("GET", "/api/v1/certs/nothing.example.com", None);
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("none")), "{}", r.text());
    // A host that would leave the certs path is refused by the CLI before any request.
    let out = s.cli(&b, &["certs", "rm", "../services/web"]);
    assert!(!out.status.success() && stderr(&out).contains("is not a host name"), "{}", stderr(&out));
    assert_eq!(s.service("web")["name"], "web", "the service is still there");

    // Removed: the name falls back to a certificate the throwaway CA did not sign.
    s.cli_ok(&b, &["certs", "rm", up]);
    let r = https_get(&s, &ca.ca(), up, "/", &[]);
    assert_ne!(r.exit, 0, "still verifies after `berth certs rm`: {r:?}");
    assert_ne!(presented(s.https, Some(up), None).fingerprint, fp1);
    assert!(cert(&s, up).is_none_or(|c| c["source"] != "uploaded"), "{:#}", Value::Array(certs(&s)));
}

fn git_ok(dir: &Path, args: &[&str]) {
    let out = git(dir).args(args).output().expect("running git");
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

#[test]
fn git_push_over_https_to_the_control_host_deploys() {
    let (http, https) = (free_port(), free_port());
    let p = Pebble::start(http, free_port(), None);
    let b = Berth::new();
    let s = acme_server(&b, &p, http, https, &[]);
    let root = p.root_pem();
    wait_valid(&s, &p, "berth.test.local");

    let repo = tempfile::Builder::new().prefix("btgit").tempdir_in("/tmp").unwrap();
    let dockerfile =
        format!("FROM {}\nWORKDIR /app\nCOPY app.py version.txt ./\nCMD [\"python3\", \"app.py\"]\n", python());
    for (name, body) in [
        ("Dockerfile", dockerfile.as_str()),
        ("app.py", PYTHON_APP),
        ("version.txt", "v1\n"),
        ("berth.toml", "[service]\nport = 8000\nenv = { MODE = \"tls\" }\n"),
    ] {
        std::fs::write(repo.path().join(name), body).unwrap();
    }
    git_ok(repo.path(), &["init", "-q", "-b", "main"]);
    git_ok(repo.path(), &["add", "-A"]);
    git_ok(repo.path(), &["commit", "-q", "-m", "first"]);

    let control = format!("berth.test.local:{}", s.https);
    let push = |token: &str| {
        git(repo.path())
            // GIT_SSL_CAINFO rather than `-c http.sslCAInfo=`: this machine's git 2.47
            // (/usr/local/bin, libcurl-gnutls) ignores the latter from the command line.
            .env("GIT_SSL_CAINFO", &root)
            .args(["-c", &format!("http.curloptResolve={control}:127.0.0.1")])
            .args(["push", "--porcelain", &format!("https://git:{token}@{control}/git/gp.git"), "HEAD:main"])
            .output()
            .expect("running git push")
    };
    // A wrong token is refused over HTTPS as over HTTP.
    let out = push("not-a-token");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(!t.contains("certificate") && t.contains("Authentication failed"), "refused for the token, not TLS: {t}");
    let out = push(&s.token());
    assert!(out.status.success(), "the push over HTTPS failed:\n{}\n{}", text(&out), logs(&s, Some(&p)));
    let err = stderr(&out);
    let remote: Vec<&str> = err.lines().filter_map(|l| l.strip_prefix("remote: ")).map(str::trim_end).collect();
    assert!(remote.contains(&"berth: deployed gp revision 1"), "{}", text(&out));

    wait_valid(&s, &p, "gp.test.local");
    let r = https_get(&s, &root, "gp.test.local", "/", &[]);
    assert_eq!((r.exit, r.code, r.body.as_str()), (0, 200, "python says tls v1"), "{r:?}");
}

#[test]
fn an_idle_http2_connection_is_closed_like_an_idle_http1_one() {
    let b = Berth::new();
    // Idle HTTP/2 connections close after six times --header-timeout (at least a minute by
    // default); HTTP/1.1 ones after --header-timeout.
    let s = Server::start(&b, &["--header-timeout", "1s"]);
    for (alpn, within) in [("h2", 6.0..12.0), ("http/1.1", 0.5..4.0)] {
        let started = Instant::now();
        let mut c = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", s.https), "-servername", "berth.test.local"])
            .args(["-alpn", alpn, "-quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running openssl s_client");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let took = started.elapsed().as_secs_f64();
        if status.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(
            status.is_some() && within.contains(&took),
            "{alpn}: an idle connection closed after {took:.1}s (want {within:?})"
        );
    }
}
