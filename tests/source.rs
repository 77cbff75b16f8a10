//! End to end: deploying from source with `berth deploy NAME --source DIR` (the builds API):
//! a Python app, a multi-stage build that compiles C and copies it into a busybox stage, a
//! static site with .dockerignore; the layer cache across rebuilds; Dockerfile errors; two
//! builds at once; a HEALTHCHECK as the readiness check; build logs.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_tests::server::Server;
use berth_tests::{Berth, PYTHON_APP};

fn image(name: &str) -> String {
    berth_tests::world().image("anon", name)
}

/// Writes `files` (path, contents) under a fresh directory.
fn source(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, c) in files {
        let path = d.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
    d
}

fn deploy_source(s: &Server, b: &Berth, name: &str, dir: &Path) -> std::process::Output {
    s.cli(b, &["deploy", name, "--source", dir.to_str().unwrap(), "--wait", "--timeout", "60s"])
}

fn ok(out: &std::process::Output, s: &Server) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy --source failed:\n{text}\nserver log:\n{}", s.log_text());
    text
}

#[test]
fn a_python_app_a_compiled_multi_stage_build_and_a_static_site_are_served() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);

    // A Python stdlib app; berth.toml sets the port and a variable.
    let py = source(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\nWORKDIR /app\nCOPY app.py version.txt ./\nCMD [\"python3\", \"app.py\"]\n",
                image("python")
            ),
        ),
        ("app.py", PYTHON_APP),
        ("version.txt", "v1\n"),
        ("berth.toml", "[service]\nport = 8000\nenv = { MODE = \"toml\" }\n"),
    ]);
    let out = ok(&deploy_source(&s, &b, "py", py.path()), &s);
    assert!(out.contains("revision 1 is serving"), "{out}");
    assert_eq!(s.get("py", "/").text(), "python says toml v1");

    // Compile C with tcc in a Debian stage; run the binary as a CGI in a busybox stage.
    let c = source(&[
        (
            "Dockerfile",
            &format!(
                "FROM {} AS Build\nCOPY hello.c /src/\nRUN mkdir /out && tcc -o /out/hello /src/hello.c\n\
                 FROM {}\nCOPY --from=build /out/hello /www/cgi-bin/hello\n\
                 COPY --from=build /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/\n\
                 COPY --from=build /lib64/ld-linux-x86-64.so.2 /lib64/\n\
                 EXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                image("python"),
                image("busybox")
            ),
        ),
        (
            "hello.c",
            "#include <stdio.h>\nint main(void){printf(\"Content-Type: text/plain\\r\\n\\r\\ncompiled by tcc\\n\");return 0;}\n",
        ),
    ]);
    ok(&deploy_source(&s, &b, "cgi", c.path()), &s);
    let r = s.get("cgi", "/cgi-bin/hello");
    assert_eq!((r.status, r.text().trim()), (200, "compiled by tcc"), "{}", r.text());

    // A static site; .dockerignore keeps a file out, an exception lets one back in.
    let site = source(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\nCOPY . /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                image("busybox")
            ),
        ),
        (".dockerignore", "*.secret\n!public.secret\nDockerfile\n"),
        ("index.html", "<h1>static</h1>\n"),
        ("private.secret", "no\n"),
        ("public.secret", "yes\n"),
    ]);
    ok(&deploy_source(&s, &b, "site", site.path()), &s);
    assert_eq!(s.get("site", "/index.html").text(), "<h1>static</h1>\n");
    assert_eq!(s.get("site", "/public.secret").text(), "yes\n");
    assert_eq!(s.get("site", "/private.secret").status, 404);
    assert_eq!(s.get("site", "/Dockerfile").status, 404);

    // Builds are recorded with their logs.
    let list = s.cli_ok(&b, &["builds", "site"]);
    assert!(list.lines().nth(1).is_some_and(|l| l.contains("succeeded") && l.contains("upload")), "{list}");
    let id = list.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let log = s.cli_ok(&b, &["builds", "site", &id, "--log"]);
    assert!(log.contains("COPY . /www/") && log.contains("deployed revision 1"), "{log}");
}

/// The build log of the newest build of `name`.
fn last_log(s: &Server, b: &Berth, name: &str) -> String {
    let list = s.cli_ok(b, &["builds", name, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = v[0]["id"].as_i64().unwrap().to_string();
    s.cli_ok(b, &["builds", name, &id, "--log"])
}

#[test]
fn an_unchanged_rebuild_reuses_every_layer_and_a_change_rebuilds_from_its_copy() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let dockerfile = format!(
        "FROM {}\nRUN echo one > /one\nCOPY a.txt /a.txt\nRUN cat /a.txt > /from-a\nCOPY b.txt /b.txt\nRUN cat /b.txt > /from-b\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n",
        image("busybox")
    );
    let dir = source(&[("Dockerfile", &dockerfile), ("a.txt", "a1\n"), ("b.txt", "b1\n")]);
    ok(&deploy_source(&s, &b, "cache", dir.path()), &s);
    let first = last_log(&s, &b, "cache");
    assert_eq!(first.matches("---> cached").count(), 0, "{first}");

    let t0 = Instant::now();
    ok(&deploy_source(&s, &b, "cache", dir.path()), &s);
    let second = last_log(&s, &b, "cache");
    assert_eq!(second.matches("---> cached").count(), 5, "every RUN and COPY reused:\n{second}");
    assert!(second.contains("(6 steps, 5 cached)"), "{second}");
    eprintln!("unchanged rebuild + deploy: {:?}", t0.elapsed());

    std::fs::write(dir.path().join("b.txt"), "b2\n").unwrap();
    ok(&deploy_source(&s, &b, "cache", dir.path()), &s);
    let third = last_log(&s, &b, "cache");
    let cached_steps: Vec<&str> =
        third.lines().collect::<Vec<_>>().windows(2).filter(|w| w[1].contains("---> cached")).map(|w| w[0]).collect();
    assert_eq!(cached_steps.len(), 3, "the steps before COPY b.txt are cached:\n{third}");
    assert!(cached_steps.iter().all(|l| !l.contains("b.txt")), "{third}");
    assert!(third.contains("(6 steps, 3 cached)"), "{third}");
    assert_eq!(s.get("cache", "/from-b").text(), "b2\n");
    assert_eq!(s.get("cache", "/from-a").text(), "a1\n");
}

#[test]
fn a_dockerfile_error_names_its_line_and_the_old_revision_keeps_serving() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let good = source(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\nCOPY index.html /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                image("busybox")
            ),
        ),
        ("index.html", "old\n"),
    ]);
    ok(&deploy_source(&s, &b, "web", good.path()), &s);

    // A syntax error: refused before anything runs, with its line.
    let bad = source(&[
        ("Dockerfile", &format!("FROM {}\n# a comment\nCOPY onlyone\n", image("busybox"))),
        ("index.html", "new\n"),
    ]);
    let out = deploy_source(&s, &b, "web", bad.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 3") && err.contains("COPY"), "{err}");

    // A failing RUN: its line, its exit code and the tail of its output.
    let failing = source(&[
        (
            "Dockerfile",
            &format!("FROM {}\nCOPY index.html /www/\nRUN echo about to fail && \\\n    exit 3\n", image("busybox")),
        ),
        ("index.html", "new\n"),
    ]);
    let out = deploy_source(&s, &b, "web", failing.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Dockerfile line 3") && err.contains("exited with code 3") && err.contains("about to fail"),
        "{err}"
    );

    // A context that is not a tar is refused with the reason.
    let r = berth_tests::server::request(
        s.api,
        "POST",
        "127.0.0.1",
        "/api/v1/services/web/builds",
        &[("Authorization", &format!("Bearer {}", s.token()))],
        b"this is not a tarball",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not a valid tar"), "{}", r.text());

    assert_eq!(s.get("web", "/index.html").text(), "old\n");
    let svc = s.service("web");
    assert_eq!(svc["revision"], 1, "{svc:#}");
    let list = s.cli_ok(&b, &["builds", "web"]);
    assert_eq!(list.lines().filter(|l| l.contains("failed")).count(), 2, "{list}");
}

#[test]
fn two_builds_at_once_both_deploy() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|i| {
            source(&[
                (
                    "Dockerfile",
                    &format!(
                        "FROM {}\nRUN sleep 1 && echo built {i} > /www-{i}\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n",
                        image("busybox")
                    ),
                ),
            ])
        })
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (s, b) = (&s, &b);
                scope.spawn(move || deploy_source(s, b, &format!("twin{i}"), d.path()))
            })
            .collect();
        for h in handles {
            ok(&h.join().unwrap(), &s);
        }
    });
    eprintln!("two builds at once: {:?}", t0.elapsed());
    for i in 0..2 {
        assert_eq!(s.get(&format!("twin{i}"), &format!("/www-{i}")).text(), format!("built {i}\n"));
    }
}

#[test]
fn a_healthcheck_is_the_readiness_check() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    // The port opens at once; the app is ready (its HEALTHCHECK passes) a second later.
    let dir = source(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN mkdir -p /srv && echo ready > /srv/index.html\n\
             HEALTHCHECK --interval=30s CMD test -f /tmp/ready\n\
             CMD [\"sh\", \"-c\", \"httpd -p 8080 -h /srv; sleep 1; touch /tmp/ready; sleep 3600\"]\n",
            image("busybox")
        ),
    )]);
    let t0 = Instant::now();
    ok(&deploy_source(&s, &b, "hc", dir.path()), &s);
    assert!(t0.elapsed() >= Duration::from_secs(1), "ready only once the HEALTHCHECK passed");
    assert_eq!(s.get("hc", "/index.html").text(), "ready\n");

    let never = source(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nHEALTHCHECK CMD false\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n",
            image("busybox")
        ),
    )]);
    let out = s.cli(&b, &["deploy", "hc", "--source", never.path().to_str().unwrap(), "--wait", "--timeout", "3s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("HEALTHCHECK") && err.contains("exit code 1"), "{err}");
    assert_eq!(s.service("hc")["revision"], 1);
}
