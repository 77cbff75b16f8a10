//! End to end: operating services on a real `berth server` — traffic splits and tags,
//! autoscaling under real load, and deploys and rollbacks under load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_tests::server::{deploy, python, request, Server};
use berth_tests::Berth;
use serde_json::{json, Value};

fn ready(svc: &Value) -> usize {
    svc["instances"].as_array().unwrap().iter().filter(|i| i["state"] == "ready").count()
}

/// The revision that answered a request (the app prints its BERTH_REVISION).
fn revision_of(s: &Server, host: &str) -> String {
    let r = request(s.http, "GET", host, "/env/BERTH_REVISION", &[], b"").expect("a request through the proxy");
    assert_eq!(r.status, 200, "{host}: {}", r.text());
    r.text()
}

#[test]
fn a_90_10_split_sends_a_tenth_to_the_second_revision_and_its_tag_reaches_it_alone() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "split", &["--env", "V=one"]);
    deploy(&s, &b, "split", &["--env", "V=two"]);
    let out = s.cli_ok(&b, &["traffic", "split", "1=90", "2=10"]);
    assert!(out.contains("revision 1") && out.contains("90%") && out.contains("10%"), "{out}");
    let out = s.cli_ok(&b, &["tag", "split", "2", "canary"]);
    assert!(out.contains("http://canary--split.test.local"), "{out}");

    let host = format!("split.{}", s.domain);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..1000 {
        *counts.entry(revision_of(&s, &host)).or_default() += 1;
    }
    let second = counts.get("2").copied().unwrap_or(0);
    assert!((80..=120).contains(&second), "about 10% to revision 2: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 1000);
    assert_eq!(counts.len(), 2, "{counts:?}");

    let tagged = format!("canary--split.{}", s.domain);
    for _ in 0..50 {
        assert_eq!(revision_of(&s, &tagged), "2");
    }
    // Mixed case and a trailing dot route the same.
    assert_eq!(revision_of(&s, &format!("CANARY--Split.{}.", s.domain)), "2");
    let r = request(s.http, "GET", &format!("nope--split.{}", s.domain), "/", &[], b"").unwrap();
    assert_eq!((r.status, r.header("berth-error")), (404, Some("unknown-host")));

    let list = s.cli_ok(&b, &["revisions", "split"]);
    assert!(list.lines().any(|l| l.contains("canary") && l.contains("10%")), "{list}");
    // Bad splits are refused with the reason, and change nothing.
    for (args, want) in [
        (&["traffic", "split", "1=90", "2=20"][..], "add up to 110, not 100"),
        (&["traffic", "split", "1=50", "1=50"][..], "listed twice"),
        (&["traffic", "split", "7=100"][..], "has no revision 7"),
        (&["traffic", "split", "1=ninety"][..], "not a percentage"),
        (&["tag", "split", "9", "x"][..], "has no revision 9"),
        (&["tag", "split", "1", "Bad_Tag"][..], "tag: \"Bad_Tag\""),
    ] {
        let out = s.cli(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let t = s.call("GET", "/api/v1/services/split/traffic", None).json();
    assert_eq!(t["traffic"], json!([{"revision": 1, "percent": 90}, {"revision": 2, "percent": 10}]));

    // The split and the tag survive a restart.
    let mut s = s;
    s.stop();
    s.restart(&b);
    assert_eq!(revision_of(&s, &tagged), "2");
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..100 {
        *seen.entry(revision_of(&s, &host)).or_default() += 1;
    }
    assert_eq!(seen.get("2"), Some(&10), "smooth round robin after a restart: {seen:?}");

    // All to revision 2 again, the tag removed: revision 1's instances drain and exit.
    s.cli_ok(&b, &["traffic", "split", "2=100"]);
    s.cli_ok(&b, &["untag", "split", "canary"]);
    let r = request(s.http, "GET", &tagged, "/", &[], b"").unwrap();
    assert_eq!(r.status, 404);
    s.wait_service("split", Duration::from_secs(20), "revision 1 drained", |v| {
        v["instances"].as_array().unwrap().iter().all(|i| i["revision"] == 2)
    });
    // The engine's image GC keeps the images of revisions in service (and recent ones), even
    // at zero and with their tag removed from the image store.
    s.cli_ok(&b, &["tag", "split", "1", "old"]);
    s.cli_ok(&b, &["scale", "split", "--freeze-after", "100ms", "--stop-after", "200ms"]);
    s.wait_service("split", Duration::from_secs(20), "zero instances", |v| {
        v["instances"].as_array().unwrap().is_empty()
    });
    b.ok(&["image", "rm", &python()]);
    b.ok(&["image", "gc"]);
    assert_eq!(revision_of(&s, &host), "2", "revision 2 starts from zero after the GC");
    assert_eq!(revision_of(&s, &format!("old--split.{}", s.domain)), "1", "so does the tagged revision 1");
}

/// `clients` threads send `path` in a loop until `stop`; returns every status seen.
fn load(
    s: &Server,
    host: &str,
    path: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u16>> {
    let (port, host, path) = (s.http, host.to_string(), path.to_string());
    std::thread::spawn(move || {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (stop, seen, host, path) = (stop.clone(), seen.clone(), host.clone(), path.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let status = match request(port, "GET", &host, &path, &[], b"") {
                            Ok(r) => r.status,
                            Err(_) => 0,
                        };
                        seen.lock().unwrap().push(status);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
    })
}

#[test]
fn three_times_the_target_runs_three_instances_and_calm_returns_to_min() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "auto", &[]);
    s.cli_ok(&b, &["scale", "auto", "--min", "1", "--concurrency", "10", "--target", "2", "--stable-window", "4s"]);
    s.wait_service("auto", Duration::from_secs(20), "min 1", |v| ready(v) == 1);
    // Six clients, each with one slow request in flight at a time: 3x the target of 2.
    let stop = Arc::new(AtomicBool::new(false));
    let host = format!("auto.{}", s.domain);
    let gen = load(&s, &host, "/sleep/200", 6, stop.clone());
    let mut most = 0;
    let mut trace = Vec::new();
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        let v = s.service("auto");
        most = most.max(ready(&v));
        let line: Vec<String> = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| format!("{}:{}:{}", &i["id"].as_str().unwrap_or("-----")[..5], i["state"], i["in_flight"]))
            .collect();
        trace.push(line.join(" "));
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = s.service("auto");
    stop.store(true, Ordering::Relaxed);
    let statuses = gen.join().unwrap();
    assert_eq!(ready(&v), 3, "{v:#}");
    assert_eq!(most, 3, "never more than 3");
    let per: Vec<u64> = v["instances"].as_array().unwrap().iter().map(|i| i["in_flight"].as_u64().unwrap()).collect();
    assert!(
        per.iter().all(|&n| n <= 3),
        "least-loaded routing spreads the six: {per:?}\n{}\nserver log:\n{}\ninstances' logs:\n{}",
        trace.join("\n"),
        s.log_text(),
        s.cli_ok(&b, &["logs", "auto", "--tail", "80"])
    );
    assert!(statuses.iter().all(|&c| c == 200), "{:?}", statuses.iter().filter(|&&c| c != 200).collect::<Vec<_>>());
    // Calm: back to min once the stable window has passed.
    s.wait_service("auto", Duration::from_secs(15), "back to min", |v| {
        ready(v) == 1 && v["instances"].as_array().unwrap().len() == 1
    });
}

#[test]
fn deploy_and_rollback_under_load_answer_every_request_and_the_drained_revision_exits() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "busy", &["--env", "V=one"]);
    let stop = Arc::new(AtomicBool::new(false));
    let host = format!("busy.{}", s.domain);
    let gen = load(&s, &host, "/env/V", 4, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    deploy(&s, &b, "busy", &["--env", "V=two"]);
    std::thread::sleep(Duration::from_millis(500));
    let out = s.cli_ok(&b, &["rollback", "busy"]);
    assert!(out.contains("revision 1 is serving"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let statuses = gen.join().unwrap();
    let bad: Vec<&u16> = statuses.iter().filter(|&&c| !(200..300).contains(&c)).collect();
    assert!(statuses.len() > 100, "the load ran: {} requests", statuses.len());
    assert!(bad.is_empty(), "{} of {} requests failed: {bad:?}\n{}", bad.len(), statuses.len(), s.log_text());
    assert_eq!(s.get("busy", "/env/V").text(), "one");
    // Revision 2's instance drained and exited.
    s.wait_service("busy", Duration::from_secs(20), "revision 2 drained", |v| {
        v["instances"].as_array().unwrap().iter().all(|i| i["revision"] == 1)
    });
    let v: Value = serde_json::from_str(&b.ok(&["container", "ls", "--json"])).unwrap();
    let running: Vec<&Value> =
        v.as_array().unwrap().iter().filter(|c| c["spec"]["labels"]["berth.revision"] == "2").collect();
    assert!(running.is_empty(), "no container of revision 2 runs: {running:?}");
}

#[test]
fn env_changes_roll_out_and_a_secret_reaches_the_app_but_nothing_shows_it() {
    const SECRET: &str = "s3cr3t-Value-9f8e7d";
    let b = Berth::new();
    let mut s = Server::start(&b, &[]);
    deploy(&s, &b, "sec", &["--env", "A=1"]);
    let mut outputs = Vec::new();
    let mut run = |s: &Server, args: &[&str]| {
        let out = s.cli(&b, args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        outputs.push(text.clone());
        (out.status.code(), text)
    };
    let (code, out) = run(&s, &["env", "sec", "set", "B=2"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("revision 2 is serving"), "an env change is a new revision: {out}");
    assert_eq!((s.get("sec", "/env/A").text(), s.get("sec", "/env/B").text()), ("1".into(), "2".into()));
    let (code, out) = run(&s, &["env", "sec", "set", "--secret", &format!("TOKEN={SECRET}")]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(s.get("sec", "/env/TOKEN").text(), SECRET, "the secret reaches the container's env");
    let (_, ls) = run(&s, &["env", "sec", "ls"]);
    assert!(ls.contains("A=1") && ls.contains("B=2") && ls.contains("TOKEN=<secret>"), "{ls}");
    // Output quoted in a failed deploy (a release command that prints its env) is masked.
    let image = python();
    let (code, out) = run(&s, &["deploy", "sec", "--image", &image, "--release-command", "env; exit 1", "--wait"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("TOKEN=<secret TOKEN>"), "the secret is masked in the release output: {out}");
    let last = s.service("sec")["last_deploy"]["error"].as_str().unwrap().to_string();
    assert!(last.contains("<secret TOKEN>"), "{last}");
    // The engine's runtime files (which hold the process's env) are root's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(b.data_dir().join("containers")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "containers/ is private");
    // Unset, and a change that fails: the old revision serves and the stored env is unchanged.
    let (code, out) = run(&s, &["env", "sec", "unset", "A"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(s.get("sec", "/env/A").status, 404);
    let (code, out) = run(&s, &["env", "sec", "set", "BIND=no.such.host.invalid"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(s.get("sec", "/env/TOKEN").text(), SECRET);
    let (_, ls) = run(&s, &["env", "sec", "ls"]);
    assert!(!ls.contains("BIND"), "a failed change is not stored: {ls}");
    for (args, want) in [
        (&["env", "sec", "unset", "NOPE"][..], "NOPE is neither a variable nor a secret"),
        (&["env", "sec", "set", "--secret", "PORT=1"][..], "PORT cannot be a secret"),
        (&["env", "nope", "ls"][..], "no service named"),
    ] {
        let (code, err) = run(&s, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Every way of looking at the service shows the name, never the value.
    for args in [
        &["services", "--json"][..],
        &["revisions", "sec", "--json"],
        &["revisions", "sec"],
        &["env", "sec", "ls", "--json"],
    ] {
        let (code, out) = run(&s, args);
        assert_eq!(code, Some(0), "{args:?}: {out}");
    }
    let mut api = Vec::new();
    for path in [
        "/api/v1/services",
        "/api/v1/services/sec",
        "/api/v1/services/sec/revisions",
        "/api/v1/services/sec/env",
        "/api/v1/services/sec/deploys",
        "/api/v1/services/sec/instances",
        "/api/v1/services/sec/traffic",
    ] {
        let r = s.call("GET", path, None);
        assert_eq!(r.status, 200, "{path}");
        api.push(r.text());
    }
    assert!(api[3].contains("\"TOKEN\""), "the env view names the secret: {}", api[3]);
    // The server keeps working after a restart: the key opens the stored secrets.
    s.stop();
    s.restart(&b);
    assert_eq!(s.get("sec", "/env/TOKEN").text(), SECRET);
    let log = s.log_text();
    let db = s.database_bytes();
    assert!(db.len() > 1000 && db.windows(5).any(|w| w == b"TOKEN"), "the database was read: it names the secret");
    for (what, text) in outputs
        .iter()
        .map(|o| ("CLI output", o.as_str()))
        .chain(api.iter().map(|a| ("API", a.as_str())))
        .chain([("Berth's log", log.as_str())])
    {
        assert!(!text.contains(SECRET), "the secret shows in the {what}: {text}");
    }
    assert!(!db.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "the database holds the secret in plain text");
}

#[test]
fn deploy_tokens_deploy_one_service_only_and_domains_route_to_their_service() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "app", &["--env", "V=one"]);
    deploy(&s, &b, "other", &[]);
    let out = s.cli(&b, &["tokens", "create", "ci", "--deploy", "app"]);
    assert!(out.status.success(), "{out:?}");
    let ci = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(ci.starts_with("berth_"), "the token alone on stdout: {ci:?}");
    let admin2 = s.cli_ok(&b, &["tokens", "create", "ops"]).trim().to_string();
    let ls = s.cli_ok(&b, &["tokens", "ls"]);
    assert!(ls.contains("ci") && ls.contains("deploy") && ls.contains("app") && !ls.contains(&ci), "{ls}");
    let with = |token: &str, method: &str, path: &str, body: Option<Value>| {
        let b = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = format!("Bearer {token}");
        let mut h = vec![("Authorization", auth.as_str())];
        if !b.is_empty() {
            h.push(("Content-Type", "application/json"));
        }
        request(s.api, method, "127.0.0.1", path, &h, b.as_bytes()).unwrap()
    };
    // The CI token deploys its service, as CI would: POST and wait.
    let image = python();
    let r =
        with(&ci, "POST", "/api/v1/services/app/deploys?wait=true", Some(json!({"image": image, "env": {"V": "two"}})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["by"], "ci", "the deploy records which token made it");
    let id = r.json()["id"].as_i64().unwrap();
    assert_eq!(with(&ci, "GET", &format!("/api/v1/services/app/deploys/{id}"), None).status, 200);
    assert_eq!(s.get("app", "/env/V").text(), "two");
    // ...and nothing else.
    for (method, path, body) in [
        ("POST", "/api/v1/services/other/deploys", Some(json!({"image": image}))),
        ("DELETE", "/api/v1/services/app", None),
        ("POST", "/api/v1/services/app/env", Some(json!({"env": {"X": "1"}}))),
        ("GET", "/api/v1/services/app/env", None),
        ("GET", "/api/v1/services", None),
        ("POST", "/api/v1/tokens", Some(json!({"name": "x", "scope": "admin"}))),
        ("PATCH", "/api/v1/services/app/scaling", Some(json!({"min": 1}))),
    ] {
        let r = with(&ci, method, path, body);
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert!(r.json()["error"].as_str().unwrap().contains("may only deploy service \"app\""), "{}", r.text());
    }
    // A second admin token works; revoked, neither it nor the CI token does.
    assert_eq!(with(&admin2, "GET", "/api/v1/services", None).status, 200);
    s.cli_ok(&b, &["tokens", "revoke", "ci"]);
    s.cli_ok(&b, &["tokens", "revoke", "ops"]);
    assert_eq!(with(&ci, "GET", "/api/v1/services/app", None).status, 401);
    assert_eq!(with(&admin2, "GET", "/api/v1/services", None).status, 401);
    for (args, want) in [
        (&["tokens", "revoke", "admin"][..], "cannot be revoked"),
        (&["tokens", "revoke", "nope"][..], "no token named"),
        (&["tokens", "create", "x", "--deploy", "nope"][..], "no service named"),
        (&["tokens", "create", "Bad Name"][..], "name: \"Bad Name\""),
    ] {
        let out = s.cli(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}: {out:?}");
    }

    // Domains.
    s.cli_ok(&b, &["domains", "app", "add", "WWW.Example.COM"]);
    s.cli_ok(&b, &["domains", "app", "add", "api.example.com"]);
    assert_eq!(s.cli_ok(&b, &["domains", "app", "ls"]), "api.example.com\nwww.example.com\n");
    for host in ["www.example.com", "WWW.example.com.", "api.example.com:80"] {
        let r = request(s.http, "GET", host, "/env/V", &[], b"").unwrap();
        assert_eq!((r.status, r.text()), (200, "two".into()), "{host}");
    }
    for (args, want) in [
        (&["domains", "other", "add", "www.example.com"][..], "belongs to service \"app\""),
        (&["domains", "app", "add", "x.test.local"][..], "under the platform's domain"),
        (&["domains", "app", "add", "localhost"][..], "single label"),
        (&["domains", "app", "rm", "nope.example.com"][..], "has no domain"),
    ] {
        let out = s.cli(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}: {out:?}");
    }
    assert_eq!(s.service("app")["domains"], json!(["api.example.com", "www.example.com"]));
    let mut s = s;
    s.stop();
    s.restart(&b);
    assert_eq!(
        request(s.http, "GET", "api.example.com", "/env/V", &[], b"").unwrap().text(),
        "two",
        "kept across a restart"
    );
    s.cli_ok(&b, &["domains", "app", "rm", "api.example.com"]);
    let r = request(s.http, "GET", "api.example.com", "/", &[], b"").unwrap();
    assert_eq!((r.status, r.header("berth-error")), (404, Some("unknown-host")));
    // Deleting the service frees its names.
    // A deploy token goes with its service: a new service of the same name is not its.
    s.cli_ok(&b, &["tokens", "create", "ci2", "--deploy", "other"]);
    s.cli_ok(&b, &["rm", "other"]);
    assert!(!s.cli_ok(&b, &["tokens", "ls"]).contains("ci2"), "revoked with its service");
    s.cli_ok(&b, &["rm", "app"]);
    deploy(&s, &b, "other", &[]);
    s.cli_ok(&b, &["domains", "other", "add", "www.example.com"]);
    assert_eq!(request(s.http, "GET", "www.example.com", "/", &[], b"").unwrap().status, 200);
}

/// Names of the containers of `service` that the engine knows (any state).
fn containers_of(b: &Berth, service: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&b.ok(&["container", "ls", "--all", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|c| c["spec"]["labels"]["berth.service"] == service)
        .map(|c| c["spec"]["name"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn volumes_keep_data_across_revisions_zero_and_restarts_and_release_commands_gate_the_deploy() {
    let b = Berth::new();
    let mut s = Server::start(&b, &[]);
    deploy(&s, &b, "vol", &["--volume", "data:/data", "--env", "V=one"]);
    let r = request(s.http, "PUT", &format!("vol.{}", s.domain), "/file/data/note", &[], b"from revision 1").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    deploy(&s, &b, "vol", &["--env", "V=two"]);
    assert_eq!(s.get("vol", "/env/V").text(), "two");
    assert_eq!(s.get("vol", "/file/data/note").text(), "from revision 1", "revision 2 reads revision 1's file");
    // To zero and back.
    s.cli_ok(&b, &["scale", "vol", "--freeze-after", "200ms", "--stop-after", "400ms"]);
    s.wait_service("vol", Duration::from_secs(20), "zero instances", |v| v["instances"].as_array().unwrap().is_empty());
    assert_eq!(s.get("vol", "/file/data/note").text(), "from revision 1", "after a restart from zero");
    s.stop();
    s.restart(&b);
    assert_eq!(s.get("vol", "/file/data/note").text(), "from revision 1", "after a server restart");

    // A release command runs in the new revision's image, with its env and volumes, before the
    // traffic moves.
    let out =
        deploy(&s, &b, "vol", &["--env", "V=three", "--release-command", "echo \"migrated to $V\" >> /data/releases"]);
    assert!(out.contains("revision 3 is serving"), "{out}");
    assert_eq!(s.get("vol", "/file/data/releases").text(), "migrated to three\n");
    let d = s.service("vol")["last_deploy"].clone();
    assert_eq!(d["status"], "succeeded");
    // A failing one aborts the deploy with its output; the old revision serves on.
    let image = python();
    let out = s.cli(
        &b,
        &[
            "deploy",
            "vol",
            "--image",
            &image,
            "--env",
            "V=four",
            "--release-command",
            "echo boom >&2; exit 7",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("release command failed") && err.contains("exited with code 7") && err.contains("boom"),
        "{err}"
    );
    assert_eq!(s.get("vol", "/env/V").text(), "three");
    assert_eq!(s.get("vol", "/file/data/releases").text(), "migrated to three\n", "the failed deploy ran nothing else");
    // A rollback to the revision whose release failed runs its release command (it never ran
    // to the end), and fails the same way; a tag cannot name it either.
    let failed = s.service("vol")["last_deploy"]["revision"].as_i64().unwrap().to_string();
    let out = s.cli(&b, &["rollback", "vol", &failed]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited with code 7"), "{out:?}");
    let out = s.cli(&b, &["tag", "vol", &failed, "broken"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("never became ready"), "{out:?}");
    // Resources are part of a revision: a change makes a new one, whose instances get them.
    deploy(&s, &b, "vol", &["--memory", "96m", "--cpus", "0.5"]);
    let v = s.service("vol");
    assert_eq!((v["memory"].as_u64(), v["cpus"].as_f64()), (Some(96 << 20), Some(0.5)), "{v:#}");
    let rev = v["revision"].as_i64().unwrap();
    let list: Value = serde_json::from_str(&s.cli_ok(&b, &["revisions", "vol", "--json"])).unwrap();
    let newest = &list["revisions"][0];
    assert_eq!((newest["number"].as_i64(), newest["memory"].as_u64()), (Some(rev), Some(96 << 20)));
    let cs: Value = serde_json::from_str(&b.ok(&["container", "ls", "--json"])).unwrap();
    let mine: Vec<&Value> = cs
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["spec"]["labels"]["berth.revision"] == rev.to_string().as_str()
                && c["spec"]["labels"]["berth.service"] == "vol"
        })
        .collect();
    assert!(!mine.is_empty());
    assert!(
        mine.iter().all(|c| c["spec"]["memory"].as_u64() == Some(96 << 20) && c["spec"]["cpus"].as_f64() == Some(0.5)),
        "{mine:?}"
    );
    for (args, want) in [
        (&["deploy", "vol", "--image", &image, "--memory", "1k"][..], "less than the 4m"),
        (&["deploy", "vol", "--image", &image, "--memory", "lots"][..], "not a size"),
        (&["deploy", "vol", "--image", &image, "--cpus", "5000"][..], "cpus: 5000 must be"),
    ] {
        let out = s.cli(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}: {out:?}");
    }
    // A volume belongs to its service: another one naming it gets its own, empty.
    deploy(&s, &b, "thief", &["--volume", "data:/data"]);
    assert_eq!(s.get("thief", "/file/data/note").status, 404, "no way into vol's volume");
    assert!(
        s.service("vol")["release_command"].as_str().unwrap().contains("migrated"),
        "the failed deploy's settings are not kept"
    );
    // A revision that exits at once fails its deploy with the exit code and its last lines.
    let out = s.cli(
        &b,
        &["deploy", "vol", "--image", &image, "--env", "BIND=no.such.host.invalid", "--release-command", "", "--wait"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited with code 1") && err.contains("last log lines") && err.contains("gaierror"), "{err}");
    assert_eq!(s.get("vol", "/env/V").text(), "three");
    // No release container is left behind.
    assert!(
        Berth::wait_until(Duration::from_secs(10), || !containers_of(&b, "vol")
            .iter()
            .any(|n| n.ends_with("-release"))),
        "{:?}",
        containers_of(&b, "vol")
    );
    for (args, want) in [
        (&["deploy", "vol", "--image", &image, "--volume", "nocolon"][..], "expected NAME:PATH"),
        (&["deploy", "vol", "--image", &image, "--volume", "Data:/x"][..], "volumes[0].volume"),
        (&["deploy", "vol", "--image", &image, "--volume", "d:relative"][..], "volumes[0].path"),
        (
            &["deploy", "vol", "--image", &image, "--volume", "d:/a", "--volume", "e:/a"][..],
            "two volumes are mounted at /a",
        ),
    ] {
        let out = s.cli(&b, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}: {out:?}");
    }
}

#[test]
fn a_service_reaches_another_at_zero_by_its_internal_name_and_not_directly() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    deploy(&s, &b, "callee", &["--env", "V=callee here"]);
    deploy(&s, &b, "caller", &[]);
    s.cli_ok(&b, &["scale", "callee", "--freeze-after", "100ms", "--stop-after", "200ms"]);
    s.wait_service("callee", Duration::from_secs(20), "callee at zero", |v| {
        v["instances"].as_array().unwrap().is_empty()
    });
    // Held, started, answered: through Berth's proxy, by name.
    let r = s.get("caller", "/fetch/callee.internal/env/V");
    assert_eq!((r.status, r.text()), (200, "callee here".into()));
    let started = s.service("callee")["instances"].as_array().unwrap().len();
    assert_eq!(started, 1, "the callee was started for the call");
    // Names of no service do not resolve; the outside world cannot use .internal names.
    let r = s.get("caller", "/fetch/nope.internal/");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("fetch failed"), "{}", r.text());
    let r = request(s.http, "GET", "callee.internal", "/", &[], b"").unwrap();
    assert_eq!((r.status, r.header("berth-error")), (404, Some("unknown-host")));
    // Directly, container to container, stays blocked: to a callee instance that runs (not
    // to the address of one already stopped again).
    s.cli_ok(&b, &["scale", "callee", "--freeze-after", "30s", "--stop-after", "5m"]);
    assert_eq!(s.get("caller", "/fetch/callee.internal/env/V").text(), "callee here");
    let v = s.wait_service("callee", Duration::from_secs(10), "a ready callee", |v| {
        v["instances"].as_array().unwrap().iter().any(|i| i["state"] == "ready")
    });
    let addr = v["instances"].as_array().unwrap().iter().find(|i| i["state"] == "ready").unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let (ip, port) = addr.split_once(':').unwrap();
    let r = s.get("caller", &format!("/connect/{ip}/{port}"));
    assert_eq!(r.status, 502, "direct: {}", r.text());
    // Other names still resolve through the host's resolvers (the relay answers, even if
    // the name is unknown there).
    let r = s.get("caller", "/fetch/localhost.invalid/");
    assert_eq!(r.status, 502);
    assert!(!r.text().contains("timed out"), "the relay answers: {}", r.text());
}
