//! The API against its own OpenAPI document: every route the document lists is routed, and
//! schemathesis (from PyPI, installed by scripts/install-test-deps) finds no failure when it
//! throws generated requests at a running server.

use std::process::Command;

use berth_tests::server::{request, Server};
use berth_tests::Berth;
use serde_json::{json, Value};

fn schemathesis() -> String {
    let st = std::env::var("BERTH_SCHEMATHESIS").unwrap_or_else(|_| "/opt/berth-test/schemathesis/bin/st".into());
    assert!(
        std::path::Path::new(&st).exists(),
        "schemathesis is not installed at {st}: run scripts/install-test-deps (or set BERTH_SCHEMATHESIS)"
    );
    st
}

#[test]
fn the_openapi_document_matches_the_server_and_schemathesis_finds_no_failure() {
    // Whatever image a generated request names, the server's pulls go to a closed port on
    // loopback (the registry client honours the proxy variables): nothing leaves the machine.
    std::env::set_var("HTTPS_PROXY", "http://127.0.0.1:9");
    std::env::set_var("HTTP_PROXY", "http://127.0.0.1:9");
    std::env::remove_var("NO_PROXY");
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let doc = request(s.api, "GET", "127.0.0.1", "/api/v1/openapi.json", &[], b"").unwrap();
    assert_eq!(doc.status, 200, "served without a token");
    let doc: Value = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    // A service and a revision-less tag target, so generated calls reach more than 404s.
    assert_eq!(s.call("POST", "/api/v1/services", Some(json!({"name": "demo"}))).status, 201);

    // Every documented operation is routed: not the fallback 404 nor 405.
    let paths = doc["paths"].as_object().unwrap();
    let mut ops = 0;
    for (path, methods) in paths {
        for (method, op) in methods.as_object().unwrap() {
            let concrete = path
                .replace("{name}", "demo")
                .replace("{id}", "1")
                .replace("{tag}", "t")
                .replace("{host}", "a.example.com");
            let body = if op["requestBody"].is_object() { json!({}).to_string() } else { String::new() };
            let token = format!("Bearer {}", s.token());
            let mut h = vec![("Authorization", token.as_str())];
            if !body.is_empty() {
                h.push(("Content-Type", "application/json"));
            }
            let r = request(s.api, &method.to_uppercase(), "127.0.0.1", &concrete, &h, body.as_bytes()).unwrap();
            let fallback = r.status == 404 && r.text().contains("no such endpoint");
            assert!(
                !fallback && r.status != 405,
                "{method} {path} is documented but not routed: {} {}",
                r.status,
                r.text()
            );
            ops += 1;
        }
    }
    assert!(ops >= 27, "{ops} operations");

    let out = Command::new(schemathesis())
        .current_dir(berth_tests::repo_root().join("tests/schemathesis"))
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env("NO_COLOR", "1")
        .args([
            "run",
            &format!("http://127.0.0.1:{}/api/v1/openapi.json", s.api),
            "-H",
            &format!("Authorization: Bearer {}", s.token()),
            "--checks",
            "all",
            // Schema-valid but refused is fine here: sums to 100, existing revisions, image
            // references, host rules are checked beyond what JSON Schema can say.
            "--exclude-checks",
            "positive_data_acceptance",
            // Streams and upgrades are not one JSON document (tests/serve.rs covers them).
            "--exclude-operation-id",
            "exec",
            "--exclude-operation-id",
            "logs",
            "--exclude-operation-id",
            "createBuild",
            // schemathesis 4.32.5 itself crashes generating negative path values for this
            // operation ("AST constructor recursion depth mismatch" inside hypothesis, a
            // Runtime Error, not a finding); the route is still checked as routed above and by
            // tests/git.rs.
            "--exclude-operation-id",
            "removeKey",
            "--max-examples",
            "25",
            "--seed",
            "20261204",
            "--workers",
            "2",
            "--request-timeout",
            "20",
        ])
        .output()
        .expect("running schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{text}\nserver log:\n{}", s.log_text());
    let selected = text
        .split("Operations:")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("schemathesis prints how many operations it selected");
    // All but the four excluded operations (and the document's own route, which the routed
    // check above counts).
    assert!(selected + 5 >= ops, "{selected} of {ops} operations selected");
    let tested = format!("Tested: {selected}");
    assert!(text.contains(&tested), "schemathesis tested the operations ({tested}): {text}");
    // Generated images were pulled through the dead proxy only.
    let log = s.log_text();
    assert!(!log.contains("failed to lookup address"), "a pull tried to resolve an outside host:\n{log}");
}
