//! End to end: Berth's main job. A real `berth server`, images from the test world's local
//! registry, real containers: deploy with the CLI, requests through the proxy, scale to zero
//! and back, holding, WebSockets, restarts, isolation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use berth_tests::server::{raw, read_reply, request, Server};
use berth_tests::Berth;
use serde_json::{json, Value};

fn python(_: &Berth) -> String {
    berth_tests::world().image("anon", "python")
}

fn busybox() -> String {
    berth_tests::world().image("anon", "busybox")
}

/// Deploys `image` as `name` with the CLI and waits until it serves.
fn deploy(s: &Server, b: &Berth, name: &str, image: &str, extra: &[&str]) -> String {
    let mut args = vec!["deploy", name, "--image", image, "--wait"];
    args.extend_from_slice(extra);
    s.cli_ok(b, &args)
}

fn scale(s: &Server, b: &Berth, name: &str, args: &[&str]) {
    let mut a = vec!["scale", name];
    a.extend_from_slice(args);
    s.cli_ok(b, &a);
}

fn states(svc: &Value) -> Vec<String> {
    svc["instances"].as_array().unwrap().iter().map(|i| i["state"].as_str().unwrap().to_string()).collect()
}

/// Containers of `service` the engine knows, with their status.
fn containers_of(b: &Berth, service: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&b.ok(&["container", "ls", "--all", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|c| c["spec"]["labels"]["berth.service"] == service || c["labels"]["berth.service"] == service)
        .map(|c| {
            let status = c["state"]["status"].as_str().or(c["status"].as_str()).unwrap_or("").to_string();
            (c["id"].as_str().unwrap().to_string(), status)
        })
        .collect()
}

/// How many instances the server has started (its log says "instance ready" for each).
fn instance_count_started(s: &Server) -> usize {
    s.log_text().matches("instance ready").count()
}

#[test]
fn deploy_with_the_cli_and_serve_through_the_proxy() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let out = deploy(&s, &b, "hello", &busybox(), &[]);
    assert!(out.contains("revision 1 is serving"), "{out}");

    let r = s.get("hello", "/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from berth test world\n"), "{:?}", r.headers);
    // Host matching: case, trailing dot and port don't matter.
    for host in ["HELLO.Test.Local", "hello.test.local.", &format!("hello.test.local:{}", s.http)] {
        let r = request(s.http, "GET", host, "/second.txt", &[], b"").unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "second file from layer 2\n"), "Host: {host}");
    }
    let r = request(s.http, "GET", "nope.test.local", "/", &[], b"").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.header("berth-error"), Some("unknown-host"));
    assert!(r.text().contains("nope.test.local"), "{}", r.text());

    // The control host reaches the API through the proxy.
    let t = s.token();
    let r = request(
        s.http,
        "GET",
        "berth.test.local",
        "/api/v1/services/hello",
        &[("Authorization", &format!("Bearer {t}"))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revision"], 1);

    let list = s.cli_ok(&b, &["services"]);
    assert!(list.lines().any(|l| l.starts_with("hello ") && l.contains("ready")), "{list}");
    let v: Value = serde_json::from_str(&s.cli_ok(&b, &["services", "--json"])).unwrap();
    assert_eq!(v["services"][0]["port"], Value::Null);
    assert_eq!(v["services"][0]["instances"][0]["address"].as_str().unwrap().rsplit(':').next(), Some("8080"));

    // Logs: busybox httpd -v logs each response to stderr; nothing of Berth's own is mixed in.
    let logs = s.cli_ok(&b, &["logs", "hello"]);
    assert!(logs.matches("response:200").count() >= 4, "{logs}");
    assert!(!logs.contains("WARN"), "{logs}");

    // A deploy that cannot become ready fails with the reason; the old revision keeps serving.
    let out = s.cli(&b, &["deploy", "hello", "--image", &busybox(), "--port", "9999", "--timeout", "3s", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not accept connections on port 9999"), "{err}");
    let r = s.get("hello", "/");
    assert_eq!(r.status, 200, "the old revision still serves");
    let v = s.service("hello");
    assert_eq!(v["revision"], 1);
    assert_eq!(v["port"], Value::Null, "a failed deploy changes none of the stored settings");
    assert_eq!(v["last_deploy"]["status"], "failed");
    assert!(v["last_deploy"]["error"].as_str().unwrap().contains("port 9999"), "{v}");
    let d = s.call("GET", "/api/v1/services/hello/deploys", None).json();
    let statuses: Vec<&str> = d["deploys"].as_array().unwrap().iter().map(|d| d["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "succeeded"], "{d}");
    assert_eq!(d["deploys"][1]["by"], "admin");
    // A revision whose process exits at once: the reason is its exit code and log tail.
    let out = s.cli(&b, &["deploy", "crash", "--image", &python(&b), "--env", "BIND=no.such.host.invalid", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited with code 1") && err.contains("last log lines") && err.contains("Errno"), "{err}");
    let v = s.service("crash");
    assert_eq!((v["status"].as_str(), v["revision"].as_i64()), (Some("not-deployed"), None), "{v}");
    let r = s.get("crash", "/");
    assert_eq!((r.status, r.header("berth-error")), (503, Some("not-deployed")));

    s.cli_ok(&b, &["rm", "hello"]);
    let r = s.get("hello", "/");
    assert_eq!(r.status, 404);
    assert!(Berth::wait_until(Duration::from_secs(15), || containers_of(&b, "hello").is_empty()), "instances removed");
}

#[test]
fn idle_instances_freeze_then_stop_and_each_time_the_next_request_is_answered() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "app", &python(&b), &["--env", "WHO=berth"]);
    scale(&s, &b, "app", &["--freeze-after", "300ms", "--stop-after", "1500ms"]);
    let r = s.get("app", "/env/WHO");
    assert_eq!((r.status, r.text().as_str()), (200, "berth"));
    assert_eq!(s.get("app", "/env/PORT").text(), "8000", "the container gets PORT");

    let svc = s.wait_service("app", Duration::from_secs(10), "a frozen instance", |v| states(v) == ["frozen"]);
    let id = svc["instances"][0]["id"].as_str().unwrap().to_string();
    let c = b.inspect(&id);
    assert_eq!(c["state"]["status"], "paused", "the engine froze the container: {c}");
    let r = s.get("app", "/");
    assert_eq!((r.status, r.text().as_str()), (200, "python ok"), "answered from frozen");
    assert_eq!(s.service("app")["instances"][0]["id"], id, "the same instance, thawed");

    s.wait_service("app", Duration::from_secs(15), "no instance", |v| states(v).is_empty());
    // At zero: at most one container, prepared (created, its process not started), and no
    // process of the app's image anywhere in its cgroup.
    assert!(
        Berth::wait_until(Duration::from_secs(10), || {
            let c = containers_of(&b, "app");
            c.len() == 1 && c[0].1 == "created"
        }),
        "at zero only a prepared container: {:?}",
        containers_of(&b, "app")
    );
    for (id, _) in containers_of(&b, "app") {
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let cg = std::fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
            if cg.contains(&id) {
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                assert!(!cmd.contains("app.py"), "an app process runs at zero: {cmd}");
            }
        }
    }
    s.wait_service("app", Duration::from_secs(10), "a prepared container", |v| v["prepared"] == true);
    let prepared = containers_of(&b, "app")[0].0.clone();
    let before = instance_count_started(&s);
    let r = s.get("app", "/");
    assert_eq!((r.status, r.text().as_str()), (200, "python ok"), "answered from zero");
    assert_eq!(instance_count_started(&s), before + 1);
    let v = s.service("app");
    assert_eq!(v["instances"][0]["id"], prepared.as_str(), "the prepared container was started: {v}");
    assert_eq!(v["prepared"], false);
    // Stopped instances' logs are kept.
    let logs = s.cli_ok(&b, &["logs", "app"]);
    assert!(logs.matches("python app listening on port 8000").count() >= 2, "{logs}");
}

#[test]
fn a_thousand_concurrent_requests_at_zero_start_exactly_one_instance() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "burst", &busybox(), &[]);
    scale(&s, &b, "burst", &["--max", "1", "--queue", "2000", "--freeze-after", "200ms", "--stop-after", "200ms"]);
    // busybox httpd ignores SIGTERM as PID 1: it stops at the grace period's end (10 s).
    s.wait_service("burst", Duration::from_secs(25), "zero instances", |v| states(v).is_empty());
    // Long idle timers for the burst itself: 1000 threads take a while to spawn, and a gap of
    // 200 ms would rightly freeze and stop the instance in the middle of it.
    scale(&s, &b, "burst", &["--freeze-after", "30s", "--stop-after", "60s"]);
    let before = instance_count_started(&s);
    let port = s.http;
    let threads: Vec<_> = (0..1000)
        .map(|_| {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || request(port, "GET", "burst.test.local", "/", &[], b"").map(|r| r.status))
                .unwrap()
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for t in threads {
        let st = match t.join().unwrap() {
            Ok(code) => code.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *statuses.entry(st).or_insert(0) += 1;
    }
    assert_eq!(statuses, [("200".to_string(), 1000)].into(), "all answered 200");
    let log = s.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("instance") || l.contains("prepar")).collect();
    assert_eq!(instance_count_started(&s) - before, 1, "exactly one instance started; log:\n{}", lines.join("\n"));
}

#[test]
fn held_requests_keep_their_body_websockets_work_from_zero_and_a_leaving_client_leaks_nothing() {
    let b = Berth::new();
    let s = Server::start(&b, &["--hold-body-limit", "64k"]);
    deploy(&s, &b, "echo", &python(&b), &[]);
    let zero = |s: &Server| {
        scale(s, &b, "echo", &["--freeze-after", "100ms", "--stop-after", "100ms"]);
        s.wait_service("echo", Duration::from_secs(10), "zero instances", |v| states(v).is_empty());
    };

    // A 300 KB body (more than the hold buffer) sent to a service at zero arrives intact.
    zero(&s);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = request(s.http, "POST", "echo.test.local", "/echo", &[], &body).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == body, "the echoed body differs ({} bytes back)", r.body.len());
    // Chunked, with Expect: 100-continue.
    zero(&s);
    let mut conn = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    conn.write_all(
        b"POST /echo HTTP/1.1\r\nHost: echo.test.local\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    let cont = read_reply(&mut rd, true).unwrap();
    assert_eq!(cont.status, 100, "100 Continue before the body");
    conn.write_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap();
    let r = read_reply(&mut rd, false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));

    // A WebSocket opened to a service at zero echoes.
    zero(&s);
    let mut ws = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: echo.test.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut rd = BufReader::new(ws.try_clone().unwrap());
    let up = read_reply(&mut rd, true).unwrap();
    assert_eq!(up.status, 101, "{:?}", up.headers);
    assert_eq!(up.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    for msg in [&b"hi from a cold start"[..], &[7u8; 1000][..]] {
        ws.write_all(&ws_frame(msg)).unwrap();
        let got = ws_read(&mut rd);
        assert_eq!(got, msg);
    }
    // An open WebSocket is activity: the instance is neither frozen nor stopped under it.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(states(&s.service("echo")), ["ready"], "nothing scales down under a live connection");
    ws.write_all(&ws_frame(b"still here")).unwrap();
    assert_eq!(ws_read(&mut rd), b"still here");
    drop(rd);
    drop(ws);

    // A client that gives up while held is counted out; the service still goes to zero.
    zero(&s);
    scale(&s, &b, "echo", &["--freeze-after", "300ms", "--stop-after", "300ms"]);
    for _ in 0..5 {
        let mut c = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
        c.write_all(b"GET /sleep/10 HTTP/1.1\r\nHost: echo.test.local\r\n\r\n").unwrap();
        drop(c);
    }
    let v = s.wait_service("echo", Duration::from_secs(15), "back to zero", |v| {
        v["queued"] == 0 && v["in_flight"] == 0 && states(v).is_empty() && v["status"] != "starting"
    });
    assert_eq!(v["queued"], 0);
}

fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x82];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn ws_read(r: &mut impl Read) -> Vec<u8> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).unwrap();
    let mut len = (h[1] & 0x7f) as usize;
    if len == 126 {
        let mut l = [0u8; 2];
        r.read_exact(&mut l).unwrap();
        len = u16::from_be_bytes(l) as usize;
    }
    let mut p = vec![0; len];
    r.read_exact(&mut p).unwrap();
    p
}

#[test]
fn killing_the_server_keeps_instances_and_a_new_one_re_adopts_them() {
    let b = Berth::new();
    let mut s = Server::start(&b, &[]);
    deploy(&s, &b, "keep", &python(&b), &[]);
    assert_eq!(s.get("keep", "/").status, 200);
    let before = s.service("keep");
    let id = before["instances"][0]["id"].as_str().unwrap().to_string();

    s.kill9();
    assert_eq!(b.inspect(&id)["state"]["status"], "running", "the instance outlives the server");
    let started = instance_count_started(&s);
    s.restart(&b);
    let after = s.service("keep");
    assert_eq!(after["revision"], 1, "nothing redeployed");
    assert_eq!(after["instances"][0]["id"], id, "the same container, re-adopted: {after:#}");
    let r = s.get("keep", "/");
    assert_eq!((r.status, r.text().as_str()), (200, "python ok"));
    assert_eq!(instance_count_started(&s), started, "no instance started");
    assert!(s.log_text().contains("instance re-adopted"), "{}", s.log_text());
}

#[test]
fn containers_reach_neither_the_api_nor_other_services() {
    let b = Berth::new();
    let api = berth_tests::server::free_port();
    let s = Server::start(&b, &["--api-addr", &format!("0.0.0.0:{api}")]);
    deploy(&s, &b, "one", &python(&b), &[]);
    deploy(&s, &b, "two", &python(&b), &[]);
    scale(&s, &b, "one", &["--min", "1"]);
    scale(&s, &b, "two", &["--min", "1"]);
    assert_eq!(s.get("two", "/").status, 200);
    let two = s.service("two")["instances"][0]["address"].as_str().unwrap().to_string();
    let gateway = {
        let net = b.subnet.split('/').next().unwrap().rsplit_once('.').unwrap().0.to_string();
        format!("{net}.1")
    };
    // The host's API port, through the bridge address.
    let r = s.get("one", &format!("/connect/{gateway}/{api}"));
    assert_eq!(r.status, 502, "the API is reachable from a container: {}", r.text());
    // Another service's container, directly.
    let (ip, port) = two.split_once(':').unwrap();
    let r = s.get("one", &format!("/connect/{ip}/{port}"));
    assert_eq!(r.status, 502, "one reached two directly: {}", r.text());
    // Control: the host itself reaches both (the rule is about containers).
    assert_eq!(request(api, "GET", "127.0.0.1", "/api/v1/health", &[], b"").unwrap().status, 200);
    assert!(TcpStream::connect(two.as_str()).is_ok(), "the host reaches the instance");
}

#[test]
fn proxy_errors_are_fixed_and_explained() {
    let b = Berth::new();
    // No prepared container: the start-failed case needs every start to begin from the image.
    let s = Server::start(&b, &["--prepared", "0"]);
    // Not deployed yet.
    s.call("POST", "/api/v1/services", Some(json!({"name": "empty"})));
    let r = s.get("empty", "/");
    assert_eq!((r.status, r.header("berth-error")), (503, Some("not-deployed")));
    assert!(r.header("retry-after").is_some());

    deploy(&s, &b, "err", &python(&b), &[]);
    // 502: the instance dies in the middle of a request.
    let id = s.service("err")["instances"][0]["id"].as_str().unwrap().to_string();
    let port = s.http;
    let slow = std::thread::spawn(move || request(port, "GET", "err.test.local", "/sleep/3000", &[], b"").unwrap());
    std::thread::sleep(Duration::from_millis(500));
    b.ok(&["container", "stop", "--time", "0", &id]);
    let r = slow.join().unwrap();
    assert_eq!((r.status, r.header("berth-error")), (502, Some("upstream-failed")), "{}", r.text());
    // The dead instance is noticed and replaced by the next request.
    let r = s.get("err", "/");
    assert!(r.status == 200 || r.status == 502, "{} {}", r.status, r.text());
    s.wait_service("err", Duration::from_secs(10), "a healthy instance", |v| {
        v["instances"].as_array().unwrap().iter().all(|i| i["id"] != id.as_str())
    });
    assert_eq!(s.get("err", "/").status, 200);
    // 504: a held request's time runs out before an instance is ready.
    scale(&s, &b, "err", &["--freeze-after", "100ms", "--stop-after", "100ms"]);
    s.wait_service("err", Duration::from_secs(10), "zero", |v| states(v).is_empty());
    scale(&s, &b, "err", &["--request-timeout", "5ms"]);
    let r = s.get("err", "/");
    assert_eq!((r.status, r.header("berth-error")), (504, Some("cold-start-timeout")), "{}", r.text());
    // 503 queue-full: one place in the queue, many requests at zero.
    scale(&s, &b, "err", &["--request-timeout", "30s", "--queue", "1", "--max", "1"]);
    s.wait_service("err", Duration::from_secs(10), "zero", |v| states(v).is_empty());
    let port = s.http;
    let ts: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || request(port, "GET", "err.test.local", "/sleep/300", &[], b"").unwrap()))
        .collect();
    let replies: Vec<_> = ts.into_iter().map(|t| t.join().unwrap()).collect();
    let full: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(!full.is_empty(), "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(full.iter().all(|r| r.header("berth-error") == Some("queue-full") && r.header("retry-after") == Some("1")));
    // 503 start-failed, with the reason: the revision's image is gone from the store. (The
    // server lists the images of revisions in service in gc-roots, which `image rm` keeps;
    // without it, the image goes as if lost.)
    s.wait_service("err", Duration::from_secs(10), "zero", |v| states(v).is_empty());
    assert!(Berth::wait_until(Duration::from_secs(10), || containers_of(&b, "err").is_empty()));
    let roots = b.data_dir().join("gc-roots");
    assert!(std::fs::read_to_string(&roots).unwrap().contains("sha256:"), "the server pins the image");
    b.ok(&["image", "rm", &python(&b)]);
    std::fs::remove_file(&roots).unwrap();
    b.ok(&["image", "gc"]);
    let r = s.get("err", "/");
    assert_eq!((r.status, r.header("berth-error")), (503, Some("start-failed")), "{}", r.text());
    assert!(r.text().contains("not in the store"), "{}", r.text());
}

#[test]
fn proxy_conformance() {
    let b = Berth::new();
    let s = Server::start(&b, &["--trusted-proxy", "127.0.0.2", "--header-timeout", "500ms"]);
    deploy(&s, &b, "conf", &python(&b), &[]);
    scale(&s, &b, "conf", &["--min", "1"]);
    let h = "conf.test.local";

    // Request headers as the instance sees them: hop-by-hop ones gone (also those Connection
    // names), X-Forwarded-* set, a client's X-Forwarded-For dropped (the peer is not trusted).
    let r = request(
        s.http,
        "GET",
        h,
        "/headers",
        &[
            ("Connection", "close, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eA=="),
            ("TE", "trailers"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-App", "kept"),
        ],
        b"",
    )
    .unwrap();
    let seen = r.text();
    let table: &[(&str, bool)] = &[
        ("x-hop:", false),
        ("keep-alive:", false),
        ("proxy-authorization:", false),
        ("te:", false),
        ("6.6.6.6", false),
        ("x-forwarded-for: 127.0.0.1\n", true),
        ("x-forwarded-proto: http\n", true),
        ("x-forwarded-host: conf.test.local\n", true),
        ("x-app: kept\n", true),
        ("host: conf.test.local\n", true),
    ];
    for (needle, present) in table {
        assert_eq!(seen.contains(needle), *present, "{needle:?} in the upstream request:\n{seen}");
    }
    // From a trusted peer the chain is kept and extended.
    let sock = socket_from("127.0.0.2", s.http);
    let mut rd = BufReader::new(sock.try_clone().unwrap());
    (&sock)
        .write_all(
            b"GET /headers HTTP/1.1\r\nHost: conf.test.local\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let r = read_reply(&mut rd, false).unwrap();
    assert!(r.text().contains("x-forwarded-for: 6.6.6.6, 127.0.0.2\n"), "{}", r.text());

    // Both Content-Length and Transfer-Encoding: refused.
    let r = raw(
        s.http,
        b"POST /echo HTTP/1.1\r\nHost: conf.test.local\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // Headers over the limit: 431.
    let big = format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000));
    let r = raw(s.http, big.as_bytes()).unwrap();
    assert_eq!((r.status, r.header("berth-error")), (431, Some("header-too-large")));
    // Two Host headers; a transfer coding other than chunked; OPTIONS *.
    let r = raw(s.http, format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.example\r\n\r\n").as_bytes()).unwrap();
    assert_eq!((r.status, r.header("berth-error")), (400, Some("bad-request")), "{}", r.text());
    let r = raw(
        s.http,
        format!("POST /echo HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 501, "{}", r.text());
    let r = raw(s.http, format!("OPTIONS * HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("allow").is_some_and(|a| a.contains("GET")));
    // An absolute-form target wins over Host, and the instance sees it as Host.
    let r = raw(
        s.http,
        format!("GET http://{h}/headers HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("host: conf.test.local\n") && !r.text().contains("evil"), "{}", r.text());
    // No Host at all.
    let r = raw(s.http, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(r.status, 400);
    // A client that sends its headers too slowly is cut off at --header-timeout.
    let mut slow = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: conf.test.local\r\n").unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(4),
        "closed after {waited:?}, answer {:?}",
        String::from_utf8_lossy(&buf)
    );

    // Keep-alive: three requests on one connection.
    let conn = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    for _ in 0..3 {
        (&conn).write_all(format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes()).unwrap();
        let r = read_reply(&mut rd, false).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "python ok"));
    }

    // Streaming: the first chunk arrives while the app is still writing the rest.
    let conn = TcpStream::connect(("127.0.0.1", s.http)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&conn).write_all(format!("GET /stream/5 HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let t0 = Instant::now();
    let mut rd = BufReader::new(conn);
    let head = read_reply(&mut rd, true).unwrap();
    assert_eq!(head.status, 200);
    let mut first = String::new();
    rd.read_line(&mut first).unwrap(); // chunk size
    first.clear();
    rd.read_line(&mut first).unwrap();
    assert_eq!(first, "chunk 0\n");
    assert!(t0.elapsed() < Duration::from_millis(600), "first chunk after {:?}: not streamed", t0.elapsed());
    let mut rest = String::new();
    rd.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("chunk 4\n"), "{rest}");
}

/// A connection to 127.0.0.1:`port` from source address `src` (another loopback address).
fn socket_from(src: &str, port: u16) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).unwrap();
    let src: std::net::SocketAddrV4 = format!("{src}:0").parse().unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::from(src)).unwrap();
    let dst: std::net::SocketAddrV4 = format!("127.0.0.1:{port}").parse().unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn revisions_list_and_rollback_moves_the_traffic_back() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "rb", &python(&b), &["--env", "V=one"]);
    // Revision 2 never serves: its deploy fails.
    let out = s.cli(&b, &["deploy", "rb", "--image", &python(&b), "--env", "BIND=no.such.host.invalid", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    deploy(&s, &b, "rb", &python(&b), &["--env", "V=two"]);
    assert_eq!(s.get("rb", "/env/V").text(), "two");
    let list = s.cli_ok(&b, &["revisions", "rb"]);
    let serving: Vec<&str> = list.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(serving.len(), 1, "{list}");
    assert!(serving[0].split_whitespace().nth(1) == Some("3"), "{list}");
    let two = list.lines().find(|l| l.split_whitespace().next() == Some("2")).unwrap_or("");
    assert!(two.contains("never"), "revision 2 never served: {list}");
    // The old revision's instance drained and stopped after the switch.
    assert!(
        Berth::wait_until(Duration::from_secs(15), || containers_of(&b, "rb").len() == 1),
        "{:?}",
        containers_of(&b, "rb")
    );

    // The default target is the newest older revision that served: 1, not the failed 2.
    let out = s.cli_ok(&b, &["rollback", "rb", "--timeout", "30s"]);
    assert!(out.contains("revision 1 is serving"), "{out}");
    assert_eq!(s.get("rb", "/env/V").text(), "one", "revision 1's env");
    let v = s.service("rb");
    assert_eq!(v["revision"], 1);
    assert_eq!(v["env"]["V"], "two", "a rollback keeps the stored settings for the next deploy");
    assert_eq!((v["last_deploy"]["kind"].as_str(), v["last_deploy"]["revision"].as_i64()), (Some("rollback"), Some(1)));
    assert_eq!(v["last_deploy"]["image"], python(&b).as_str());

    s.cli_ok(&b, &["rollback", "rb", "3"]);
    assert_eq!(s.get("rb", "/env/V").text(), "two");
    for (args, want) in [
        (&["rollback", "rb", "9"][..], "has no revision 9"),
        (&["rollback", "rb", "3"][..], "already serving"),
        (&["rollback", "nope"][..], "no service named"),
    ] {
        let out = s.cli(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A refused rollback leaves no deploy record.
    let deploys = s.call("GET", "/api/v1/services/rb/deploys", None).json()["deploys"].as_array().unwrap().len();
    assert_eq!(deploys, 5, "3 deploys and 2 rollbacks");
    // After a restart the rolled-to revision is still the one serving.
    s.cli_ok(&b, &["rollback", "rb", "1"]);
    let mut s = s;
    s.stop();
    s.restart(&b);
    assert_eq!(s.get("rb", "/env/V").text(), "one");
}

#[test]
fn a_crash_loop_is_restarted_with_backoff_and_shows_on_the_service() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "crashy", &python(&b), &[]);
    scale(&s, &b, "crashy", &["--min", "1"]);
    let mut ids = std::collections::HashSet::new();
    for round in 0..3 {
        let v = s.wait_service("crashy", Duration::from_secs(20), "a ready instance", |v| states(v) == ["ready"]);
        ids.insert(v["instances"][0]["id"].as_str().unwrap().to_string());
        let r = s.get("crashy", "/exit/3");
        assert_eq!(r.status, 200, "round {round}");
        s.wait_service("crashy", Duration::from_secs(10), "the crash noticed", |v| {
            v["crashes"].as_u64() == Some(round + 1)
        });
    }
    let v = s.service("crashy");
    assert_eq!(v["status"], "crash-loop", "{v:#}");
    let err = v["last_error"].as_str().unwrap();
    assert!(
        err.contains("exited with code 3") && err.contains("3 in a row") && err.contains("last log lines"),
        "{err}"
    );
    assert_eq!(ids.len(), 3, "each crash got a new instance: {ids:?}");
    // min 1: it is restarted again (after a longer backoff) and serves.
    s.wait_service("crashy", Duration::from_secs(20), "a restarted instance", |v| states(v) == ["ready"]);
    assert_eq!(s.get("crashy", "/").status, 200);
}

fn out(o: &std::process::Output) -> (Option<i32>, String, String) {
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn berth_exec_runs_commands_in_a_service_instance() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "shell", &busybox(), &[]);
    let id = s.service("shell")["instances"][0]["id"].as_str().unwrap().to_string();
    // In the instance's container (its pid 1 is the image's httpd), both output streams, the
    // exit code.
    let script = "cat /etc/hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; echo oops >&2; exit 7";
    let (code, stdout, stderr) = out(&s.cli(&b, &["exec", "shell", "--", "sh", "-c", script]));
    assert_eq!(code, Some(7), "{stderr}");
    assert_eq!(stdout, "shell\nhttpd -f -v -p 8080 -h /www \n");
    assert_eq!(stderr, "oops\n");
    // A given instance, with env, user and working directory; the instance's own env is there.
    let o = s.cli(
        &b,
        &[
            "exec",
            "--instance",
            &id[..12],
            "-e",
            "A=1",
            "-u",
            "app",
            "-w",
            "/www",
            "shell",
            "--",
            "sh",
            "-c",
            "echo $A $(id -u) $(pwd) $PORT",
        ],
    );
    assert_eq!(out(&o), (Some(0), "1 1000 /www 8080\n".into(), String::new()));
    // stdin with -i.
    let mut child = b
        .cmd()
        .env("BERTH_API", format!("http://127.0.0.1:{}", s.api))
        .env("BERTH_TOKEN", s.token())
        .args(["exec", "-i", "shell", "--", "sh", "-c", "read x; echo got:$x; cat | wc -c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.write_all(&[b'x'; 100_000]).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>()),
        (Some(0), vec!["got:hello", "100000"])
    );
    // What cannot run says why, with the exit codes of `berth container exec`.
    for (args, want_code, want) in [
        (vec!["exec", "shell", "--", "no-such-cmd"], 127, "\"no-such-cmd\" not found"),
        (vec!["exec", "nosuch", "--", "true"], 125, "no service named \"nosuch\""),
        (vec!["exec", "--instance", "abcdef", "shell", "--", "true"], 125, "has no instance \"abcdef\""),
        (vec!["exec", "-w", "/nowhere", "shell", "--", "true"], 125, "/nowhere does not exist"),
    ] {
        let (code, _, err) = out(&s.cli(&b, &args));
        assert_eq!(code, Some(want_code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A terminal: the client runs on one of ours, 33 rows by 111 columns.
    let mut cmd = b.cmd();
    cmd.env("BERTH_API", format!("http://127.0.0.1:{}", s.api)).env("BERTH_TOKEN", s.token()).args([
        "exec",
        "-it",
        "shell",
        "--",
        "sh",
        "-c",
        "[ -t 0 ] && echo is-a-tty; stty size; read x; echo got:$x; exit 4",
    ]);
    let mut term = berth_tests::terminal::Terminal::spawn(cmd, 33, 111);
    term.wait_for("33 111\r\n");
    term.type_keys(b"typed\r");
    term.wait_for("got:typed");
    let code = term.child.wait().unwrap().code();
    let seen = term.seen;
    assert_eq!(code, Some(4), "{seen:?}");
    assert!(seen.starts_with("is-a-tty\r\n33 111\r\n"), "{seen:?}");
}

#[test]
fn an_exec_keeps_its_instance_awake_and_wakes_a_frozen_one() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "awake", &busybox(), &[]);
    scale(&s, &b, "awake", &["--min", "1", "--freeze-after", "200ms", "--stop-after", "1h"]);
    // Under a command that outlives freeze_after several times, the instance stays ready (a
    // frozen one would stop the command: it would never print).
    let child = b
        .cmd()
        .env("BERTH_API", format!("http://127.0.0.1:{}", s.api))
        .env("BERTH_TOKEN", s.token())
        .args(["exec", "awake", "--", "sh", "-c", "sleep 1.5; echo done"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let end = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the exec did not finish within 10 s: frozen under it?");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()), (Some(0), "done\n"));
    // Idle, it freezes; an exec thaws it, as a request would.
    s.wait_service("awake", Duration::from_secs(10), "a frozen instance", |v| states(v) == ["frozen"]);
    let (code, stdout, stderr) = out(&s.cli(&b, &["exec", "awake", "--", "echo", "woke"]));
    assert_eq!((code, stdout.as_str()), (Some(0), "woke\n"), "{stderr}");
    // Naming a frozen instance is refused, saying how to wake it.
    let v = s.wait_service("awake", Duration::from_secs(10), "frozen again", |v| states(v) == ["frozen"]);
    let id = v["instances"][0]["id"].as_str().unwrap().to_string();
    let (code, _, err) = out(&s.cli(&b, &["exec", "--instance", &id, "awake", "--", "true"]));
    assert_eq!(code, Some(125));
    assert!(err.contains("is frozen, not ready") && err.contains("(HTTP 409)"), "{err}");
}

/// The exec protocol on the wire: the upgrade, frames both ways, a resize and a signal.
#[test]
fn the_exec_api_speaks_framed_bytes_over_an_upgrade() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "wire", &busybox(), &[]);
    let t = s.token();
    // Without the upgrade headers: refused, saying what to send.
    let r = s.call("POST", "/api/v1/services/wire/exec", Some(json!({"command": ["true"]})));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("Upgrade: berth-exec"), "{}", r.text());
    let body = json!({
        "command": ["sh", "-c", "stty size; read x; echo got:$x; stty size; exec sleep 30"],
        "tty": true, "interactive": true, "rows": 10, "cols": 20,
    })
    .to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", s.api)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        conn,
        "POST /api/v1/services/wire/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: Upgrade\r\n\
         Upgrade: berth-exec\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    let up = read_reply(&mut rd, true).unwrap();
    assert_eq!(up.status, 101, "{:?}", up.headers);
    assert_eq!(up.header("upgrade"), Some("berth-exec"));
    let instance = s.service("wire")["instances"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(up.header("berth-instance"), Some(instance.as_str()));
    let send = |conn: &mut TcpStream, kind: u8, payload: &[u8]| {
        let mut f = vec![kind];
        f.extend((payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        conn.write_all(&f).unwrap();
    };
    // Reads frames until the output holds `want`; returns the exit code if one came.
    let mut output = String::new();
    let read_until = |rd: &mut BufReader<TcpStream>, want: &str, output: &mut String| -> Option<i32> {
        while !output.contains(want) {
            let mut h = [0u8; 5];
            rd.read_exact(&mut h).unwrap_or_else(|e| panic!("waiting for {want:?}, got {output:?}: {e}"));
            let mut p = vec![0u8; u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize];
            rd.read_exact(&mut p).unwrap();
            match h[0] {
                0x10 => output.push_str(&String::from_utf8_lossy(&p)),
                0x12 => return Some(i32::from_be_bytes([p[0], p[1], p[2], p[3]])),
                k => panic!("unexpected frame kind {k:#x}"),
            }
        }
        None
    };
    assert_eq!(read_until(&mut rd, "10 20\r\n", &mut output), None);
    send(&mut conn, 0x02, &[0, 30, 0, 40]);
    send(&mut conn, 0x00, b"over the wire\r");
    assert_eq!(read_until(&mut rd, "30 40\r\n", &mut output), None);
    assert!(output.contains("got:over the wire"), "{output:?}");
    // SIGTERM (15) for the command: it ends with 128 + 15.
    send(&mut conn, 0x03, &15i32.to_be_bytes());
    assert_eq!(read_until(&mut rd, "never printed", &mut output), Some(143), "{output:?}");

    // A client that goes away takes its command with it.
    let body = json!({"command": ["sleep", "301"]}).to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", s.api)).unwrap();
    write!(
        conn,
        "POST /api/v1/services/wire/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: Upgrade\r\n\
         Upgrade: berth-exec\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let up = read_reply(&mut BufReader::new(conn.try_clone().unwrap()), true).unwrap();
    assert_eq!(up.status, 101);
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .any(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x00301\x00"))
    };
    assert!(sleeping(), "the command runs");
    drop(conn);
    assert!(Berth::wait_until(Duration::from_secs(10), || !sleeping()), "the command outlived its client");
}

#[test]
fn a_service_that_says_h2c_gets_http2_upstream_connections() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let nginx = berth_tests::world().image("anon", "nginx");
    // Port 8081 of the test world's nginx speaks only HTTP/2 without TLS (prior knowledge).
    deploy(&s, &b, "h2", &nginx, &["--port", "8081"]);
    let r = s.get("h2", "/");
    assert_eq!(r.status, 502, "HTTP/1.1 to an h2c-only port fails: {}", r.text());
    let out = s.cli_ok(&b, &["https", "h2", "--h2c", "on"]);
    assert!(out.contains("upstream: h2c"), "{out}");
    let r = s.get("h2", "/hello");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("nginx HTTP/2.0 host=h2.{}\n", s.domain), "the Host reaches the app over h2c");
    // Many requests at once share the HTTP/2 connection(s); every one is answered.
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (port, host) = (s.http, format!("h2.{}", s.domain));
            std::thread::spawn(move || request(port, "GET", &host, "/", &[], b"").map(|r| r.status).unwrap_or(0))
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    s.cli_ok(&b, &["https", "h2", "--h2c", "off"]);
    assert_eq!(s.get("h2", "/").status, 502, "back to HTTP/1.1");
}
