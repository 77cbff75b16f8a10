//! End to end: `berth server` as a real process on ephemeral loopback ports, driven over HTTP
//! with a small std-only HTTP/1.1 client. No containers: this covers the control plane's
//! options, admin token, authentication and the services API.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use berth_tests::server::{free_port, request, Reply, Server};
use berth_tests::Berth;
use serde_json::{json, Value};

fn error_of(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_else(|| panic!("no \"error\" string in {}", r.text())).to_string()
}

/// `berth server` with the test's own data dir and network, without starting it.
fn berth(b: &Berth) -> Command {
    let mut c = b.cmd();
    c.env_remove("BERTH_CONTROL_HOST").env_remove("BERTH_TRUSTED_PROXY").env_remove("BERTH_DOMAIN").arg("server");
    c
}

#[test]
fn admin_token_is_private_stable_and_required() {
    let b = Berth::new();
    let mut server = Server::start(&b, &[]);
    let path = b.data_dir().join("admin-token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin-token mode");
    let token = server.token();
    assert!(token.len() >= 32, "{token:?}");
    let db = server.database_bytes();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()), "the token itself is not in the database");

    let none = request(server.api, "GET", "127.0.0.1", "/api/v1/services", &[], b"").unwrap();
    assert_eq!(none.status, 401);
    assert!(error_of(&none).contains("Authorization"), "{}", none.text());
    let wrong =
        request(server.api, "GET", "127.0.0.1", "/api/v1/services", &[("Authorization", "Bearer berth_wrong")], b"")
            .unwrap();
    assert_eq!(wrong.status, 401);
    assert!(error_of(&wrong).contains("invalid token"), "{}", wrong.text());
    assert_eq!(server.call("GET", "/api/v1/services", None).status, 200);

    server.stop();
    server.restart(&b);
    assert_eq!(server.token(), token, "the token survives a restart");
    assert_eq!(server.call("GET", "/api/v1/services", None).status, 200);
}

#[test]
fn services_api() {
    let b = Berth::new();
    let mut server = Server::start(&b, &[]);

    let created = server.call(
        "POST",
        "/api/v1/services",
        Some(json!({"name": "hello", "port": 8080, "env": {"GREETING": "hi"}, "health_path": "/health"})),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let c = created.json();
    assert_eq!(c["name"], "hello");
    assert_eq!(c["url"], format!("http://hello.test.local:{}/", server.http));
    assert_eq!(c["port"], 8080);
    assert_eq!(c["env"], json!({"GREETING": "hi"}));
    assert_eq!(c["health_path"], "/health");
    assert_eq!(c["scaling"]["min"], 0);
    assert_eq!(c["status"], "not-deployed");
    assert_eq!(c["revision"], Value::Null);

    let got = server.call("GET", "/api/v1/services/hello", None);
    assert_eq!((got.status, got.json()), (200, c.clone()));
    let second = server.call("POST", "/api/v1/services", Some(json!({"name": "web"})));
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(second.json()["port"], Value::Null);
    let list = server.call("GET", "/api/v1/services", None).json();
    let names: Vec<&str> = list["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello", "web"]);

    let updated =
        server.call("PATCH", "/api/v1/services/hello", Some(json!({"env": {"A": "1"}, "unset_env": ["GREETING"]})));
    assert_eq!(updated.status, 200, "{}", updated.text());
    assert_eq!(updated.json()["env"], json!({"A": "1"}));

    let patched = server.call(
        "PATCH",
        "/api/v1/services/hello/scaling",
        Some(json!({"min": 1, "max": 3, "concurrency": 10, "freeze_after": "10s", "stop_after": "5m",
                    "request_timeout": "90s", "queue": 50})),
    );
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(
        patched.json()["scaling"],
        json!({"min": 1, "max": 3, "concurrency": 10, "freeze_after": "10s", "stop_after": "5m",
               "request_timeout": "1m30s", "queue": 50, "target": 7, "target_set": false, "stable_window": "1m"})
    );

    // Errors: status, and a message naming what was wrong.
    let cases: &[(&str, &str, Option<Value>, u16, &str)] = &[
        ("POST", "/api/v1/services", Some(json!({"name": "Bad_Name"})), 400, "name: \"Bad_Name\""),
        (
            "POST",
            "/api/v1/services",
            Some(json!({"name": "x", "image": "UPPER/Case::"})),
            400,
            "image: invalid reference",
        ),
        ("POST", "/api/v1/services", Some(json!({"image": "busybox"})), 400, "missing field `name`"),
        ("POST", "/api/v1/services", Some(json!({"name": "x", "colour": 1})), 400, "unknown field `colour`"),
        ("POST", "/api/v1/services", Some(json!({"name": "x", "port": 70000})), 400, "invalid value"),
        ("POST", "/api/v1/services", Some(json!({"name": "x", "env": {"PORT": "http"}})), 400, "PORT=\"http\""),
        (
            "POST",
            "/api/v1/services",
            Some(json!({"name": "x", "health_path": "health"})),
            400,
            "health_path: \"health\"",
        ),
        ("POST", "/api/v1/services", Some(json!({"name": "hello"})), 409, "service \"hello\" already exists"),
        ("GET", "/api/v1/services/nope", None, 404, "no service named \"nope\""),
        ("DELETE", "/api/v1/services/nope", None, 404, "no service named \"nope\""),
        ("PATCH", "/api/v1/services/nope/scaling", Some(json!({"min": 1})), 404, "no service named \"nope\""),
        ("PATCH", "/api/v1/services/hello/scaling", Some(json!({"min": 9})), 400, "min: 9 is more than max (3)"),
        ("PATCH", "/api/v1/services/hello/scaling", Some(json!({"stop_after": "soon"})), 400, "stop_after: \"soon\""),
        ("POST", "/api/v1/services/hello/deploys", Some(json!({"image": "a b"})), 400, "image: invalid reference"),
        ("POST", "/api/v1/services/hello/deploys", Some(json!({})), 400, "missing field `image`"),
        ("POST", "/api/v1/services/Bad/deploys", Some(json!({"image": "busybox"})), 400, "name: \"Bad\""),
        ("GET", "/api/v1/services/hello/deploys/99", None, 404, "no deploy 99"),
        ("GET", "/api/v1/nothing-here", None, 404, "no such endpoint"),
        ("POST", "/api/v1/services", Some(json!({"name": "berth"})), 409, "is the control host"),
        (
            "POST",
            "/api/v1/services",
            Some(json!({"name": "x", "port": 9000, "env": {"PORT": "8000"}})),
            400,
            "differs from env PORT=8000",
        ),
        (
            "POST",
            "/api/v1/services/hello/deploys",
            Some(json!({"image": "busybox", "timeout": "0s"})),
            400,
            "must be from 1s to 1h",
        ),
        ("POST", "/api/v1/services", Some(json!("a string")), 400, "expected a JSON object"),
        // axum's own rejections answer in JSON too.
        ("GET", "/api/v1/services/hello/deploys/abc", None, 400, "abc"),
        ("GET", "/api/v1/services/hello/logs?tail=many", None, 400, "tail"),
        ("GET", "/api/v1/services/hello/logs?follow=maybe", None, 400, "?follow=maybe"),
        ("GET", "/api/v1/services/hello/deploys?limit=0", None, 400, "?limit=0"),
    ];
    for (method, path, body, status, want) in cases {
        let r = server.call(method, path, body.clone());
        assert_eq!(r.status, *status, "{method} {path} {body:?}: {}", r.text());
        assert!(error_of(&r).contains(want), "{method} {path} {body:?}: got {}, want {want:?}", r.text());
    }

    let deleted = server.call("DELETE", "/api/v1/services/web", None);
    assert_eq!(deleted.status, 204);
    assert_eq!(server.call("GET", "/api/v1/services/web", None).status, 404);

    // A restart keeps what was stored.
    server.stop();
    server.restart(&b);
    let list = server.call("GET", "/api/v1/services", None).json();
    assert_eq!(list["services"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["services"][0]["scaling"], patched.json()["scaling"]);
    assert_eq!(list["services"][0]["env"], json!({"A": "1"}));
}

/// The proxy's threads: as many as asked, each accepting on the shared sockets (plain and TLS),
/// the control host answered through them by the main runtime, and all gone at SIGTERM.
#[test]
fn the_proxy_serves_on_its_own_threads() {
    let b = Berth::new();
    let mut s = Server::start(&b, &["--proxy-threads", "3"]);
    let threads = || -> usize {
        let dir = format!("/proc/{}/task", s.child.id());
        std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                    .filter(|c| c.starts_with("berth-proxy-"))
                    .count()
            })
            .unwrap_or(0)
    };
    // A thread names itself once it runs, which may be just after the server answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while threads() != 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(threads(), 3, "{}", s.log_text());
    // Many connections at once, so that every thread accepts some: all answered.
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let port = s.http;
            std::thread::spawn(move || request(port, "GET", "berth.test.local", "/api/v1/health", &[], b"").unwrap())
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = request(s.http, "GET", "nothing.test.local", "/", &[], b"").unwrap();
    assert_eq!((r.status, r.header("berth-error")), (404, Some("unknown-host")), "{r:?}");
    s.stop();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", s.http)).is_err(),
        "the proxy's port is closed once the server stopped"
    );
}

#[test]
fn bad_options_exit_64_before_binding_or_writing() {
    let b = Berth::new();
    let data = b.data_dir().join("fresh");
    let api = free_port();
    let api_addr = format!("127.0.0.1:{api}");
    let http_addr = format!("127.0.0.1:{}", free_port());
    let cases: &[(&[&str], &str)] = &[
        (&["--domain", "bad domain"], "--domain \"bad domain\""),
        (&["--domain", "test.local", "--api-addr", "nonsense"], "--api-addr \"nonsense\""),
        (&["--domain", "test.local", "--http-addr", "127.0.0.1"], "--http-addr \"127.0.0.1\""),
        (&["--domain", "test.local", "--trusted-proxy", "10.0.0.0/99"], "--trusted-proxy \"10.0.0.0/99\""),
        (&["--domain", "test.local", "--control-host", "a_b.test"], "--control-host \"a_b.test\""),
        (&["--domain", "test.local", "--hold-body-limit", "lots"], "--hold-body-limit \"lots\""),
        (&["--domain", "test.local", "--proxy-threads", "0"], "--proxy-threads 0: give 1 to 256"),
        (&[], "--domain is required"),
    ];
    for (args, want) in cases {
        let mut cmd = berth(&b);
        for (opt, val) in [("--api-addr", &api_addr), ("--http-addr", &http_addr)] {
            if !args.contains(&opt) {
                cmd.args([opt, val.as_str()]);
            }
        }
        let out =
            cmd.args(*args).env("BERTH_DATA_DIR", &data).stdin(Stdio::null()).output().expect("running berth server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line, got {stderr:?}");
        assert!(stderr.contains(want), "{args:?}: got {stderr:?}, want {want:?}");
        assert!(!data.exists(), "{args:?}: the data directory was created");
    }
    // The proxy and the API cannot share an address.
    let out = berth(&b)
        .args(["--api-addr", &api_addr, "--http-addr", &api_addr, "--domain", "t.local"])
        .env("BERTH_DATA_DIR", &data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("both 127.0.0.1:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One server per data directory: a second one is refused before it touches anything.
    let first = Server::start(&b, &[]);
    let out =
        berth(&b).args(["--api-addr", &api_addr, "--http-addr", &http_addr, "--domain", "t.local"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("in use by another berth server") && err.contains(&first.child.id().to_string()), "{err}");
    assert_eq!(first.call("GET", "/api/v1/services", None).status, 200, "the first server is untouched");
    drop(first);
    // An interface named like the bridge that is not a bridge: refused at start, not at the
    // first container.
    let dummy = format!("btd{}", std::process::id() % 100_000);
    let peer = format!("{dummy}p");
    assert!(Command::new("ip")
        .args(["link", "add", &dummy, "type", "veth", "peer", "name", &peer])
        .status()
        .unwrap()
        .success());
    std::fs::write(
        b.data_dir().join("config.toml"),
        format!("[network]\nbridge = \"{dummy}\"\nsubnet = \"{}\"\n", b.subnet),
    )
    .unwrap();
    let out =
        berth(&b).args(["--api-addr", &api_addr, "--http-addr", &http_addr, "--domain", "t.local"]).output().unwrap();
    let _ = Command::new("ip").args(["link", "del", &dummy]).status();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("is not a bridge"), "{err}");
    // A bad config.toml is refused the same way.
    b.write_config("[network]\nsubnet = \"nonsense\"\n");
    let out =
        berth(&b).args(["--api-addr", &api_addr, "--http-addr", &http_addr, "--domain", "t.local"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing was left listening, and the ports are still free to bind.
    TcpListener::bind(&api_addr).expect("the API port is still free");

    let out =
        berth(&b).args(["--domain", "test.local"]).env("BERTH_TRUSTED_PROXY", "10.0.0.0/8,nope").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trusted-proxy \"nope\""));
}
