//! End-to-end tests of the embedded engine (issue 2): pulling from real registries, running real
//! containers on this kernel, and everything they must leave behind (nothing).

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use berth_tests::{http_get, stderr, stdout, world, Berth};

fn run_out(b: &Berth, args: &[&str]) -> (i32, String, String) {
    let o = b.run(args);
    (o.status.code().unwrap_or(-1), stdout(&o), stderr(&o))
}

#[test]
fn runs_images_from_all_three_registries() {
    let w = world();
    let b = Berth::new();
    for reg in ["anon", "basic", "token"] {
        let image = w.image(reg, "busybox");
        let (code, out, err) =
            run_out(&b, &["run", "--rm", "-q", &image, "--", "sh", "-c", "echo $GREETING from $(id -u)"]);
        assert_eq!(code, 0, "{reg}: {err}");
        assert_eq!(out, "hello from 0\n", "{reg}");
    }
}

#[test]
fn image_config_and_overrides_are_honoured() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    let cases: &[(&[&str], &str, i32)] = &[
        (&["--", "sh", "-c", "exit 3"], "", 3),
        (&["--env", "GREETING=hi", "--", "sh", "-c", "echo $GREETING"], "hi\n", 0),
        (&["--env", "NEW=1", "--", "sh", "-c", "echo $GREETING$NEW"], "hello1\n", 0),
        // A bare name passes the client's own value (the test process sets BERTH_TEST_PASS).
        (&["--env", "BERTH_TEST_PASS", "--", "sh", "-c", "echo $BERTH_TEST_PASS"], "passed\n", 0),
        (&["--user", "app", "--", "sh", "-c", "echo $(id -u):$(id -g) $HOME"], "1000:1000 /home/app\n", 0),
        (&["--user", "4242:4343", "--", "sh", "-c", "echo $(id -u):$(id -g)"], "4242:4343\n", 0),
        (&["--workdir", "/tmp", "--", "pwd"], "/tmp\n", 0),
        (&["--", "pwd"], "/\n", 0),
        // A missing working directory is created, as Docker does.
        (&["--workdir", "/new/dir", "--", "pwd"], "/new/dir\n", 0),
        // Docker's exit codes: 127 command not found, 126 not executable.
        (&["--", "/nonexistent"], "", 127),
        (&["--", "/etc/passwd"], "", 126),
        (&["--entrypoint", "echo", "--", "a", "b"], "a b\n", 0),
        (&["--hostname", "box1", "--", "cat", "/etc/hostname"], "box1\n", 0),
    ];
    for (args, want, code) in cases {
        // Options go before the image; split ours at "--".
        let (opts, cmd) = match args.iter().position(|a| *a == "--") {
            Some(i) => (&args[..i], &args[i..]),
            None => (*args, &[][..]),
        };
        let mut full: Vec<&str> = vec!["run", "--rm"];
        full.extend_from_slice(opts);
        full.push(&image);
        full.extend_from_slice(cmd);
        let (got_code, out, err) = run_out(&b, &full);
        assert_eq!((got_code, out.as_str()), (*code, *want), "berth {full:?}\nstderr: {err}");
    }
    // The image's own Cmd runs when none is given: httpd serves its page.
    let id = b.ok(&["run", "-d", &image]).trim().to_string();
    let c = b.inspect(&id);
    let ip = c["state"]["network"]["ip"].as_str().expect("an address").to_string();
    let mut body = String::new();
    let ok = Berth::wait_until(Duration::from_secs(10), || match http_get(&format!("{ip}:8080"), "/") {
        Ok((status, b)) => {
            body = b;
            status.contains("200")
        }
        Err(_) => false,
    });
    assert!(ok, "GET http://{ip}:8080/ from the host");
    assert!(body.contains("hello from berth test world"), "{body}");
    assert_eq!(c["spec"]["exposed_ports"][0], "8080/tcp");
    b.ok(&["container", "rm", "--force", &id]);
}

#[test]
fn zstd_image_runs_and_load_of_an_oci_layout_runs() {
    let w = world();
    let b = Berth::new();
    let (code, out, err) =
        run_out(&b, &["run", "--rm", "-q", &w.image("anon", "busybox-zstd"), "--", "cat", "/www/index.html"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello from berth test world"));

    let tar = b.data_dir().join("layout.tar");
    let st = std::process::Command::new("python3")
        .arg(berth_tests::repo_root().join("tests/world/world.py"))
        .args(["oci-tar", "busybox"])
        .arg(&tar)
        .status()
        .expect("world.py oci-tar");
    assert!(st.success());
    let out = b.ok(&["image", "load", "--input", tar.to_str().unwrap()]);
    assert!(out.contains("loaded sha256:"), "{out}");
    let ls: serde_json::Value = serde_json::from_str(&b.ok(&["image", "ls", "--json"])).unwrap();
    let id = ls[0]["id"].as_str().unwrap().to_string();
    let (code, out, err) = run_out(&b, &["run", "--rm", &id[7..19], "--", "echo", "loaded ok"]);
    assert_eq!((code, out.as_str()), (0, "loaded ok\n"), "{err}");
}

fn blobs(b: &Berth) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(b.data_dir().join("blobs/sha256"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn assert_blobs_intact(b: &Berth) {
    use sha2::Digest;
    for p in blobs(b) {
        let bytes = std::fs::read(&p).unwrap();
        let got = hex::encode(sha2::Sha256::digest(&bytes));
        assert_eq!(got, p.file_name().unwrap().to_str().unwrap(), "blob {} is corrupt", p.display());
    }
}

#[test]
fn interrupted_pull_leaves_no_corrupt_blob_and_resumes() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "python");
    let mut child =
        b.cmd().args(["image", "pull", &image]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Kill it once it is downloading (the python layer is tens of MB).
    let tmp = b.data_dir().join("blobs/tmp");
    let started = Berth::wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(&tmp)
            .map(|d| d.flatten().any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false)))
            .unwrap_or(false)
    });
    child.kill().unwrap();
    let _ = child.wait();
    assert!(started, "the pull never started writing a blob");
    assert_blobs_intact(&b);
    b.ok(&["image", "pull", "-q", &image]);
    assert_blobs_intact(&b);
    let (code, out, err) = run_out(&b, &["run", "--rm", &image, "--", "python3", "-c", "print(6*7)"]);
    assert_eq!((code, out.as_str()), (0, "42\n"), "{err}");
}

#[test]
fn image_rm_and_gc_keep_shared_layers() {
    let w = world();
    let b = Berth::new();
    let a = w.image("anon", "busybox");
    let c = w.image("basic", "busybox");
    b.ok(&["image", "pull", "-q", &a]);
    b.ok(&["image", "pull", "-q", &c]);
    let layers = |b: &Berth| {
        std::fs::read_dir(b.data_dir().join("layers"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    };
    let before = layers(&b);
    assert!(before >= 2);
    b.ok(&["image", "rm", &a]);
    assert_eq!(layers(&b), before, "shared layers are kept while another image uses them");
    let (code, out, _) = run_out(&b, &["run", "--rm", &c, "--", "echo", "still"]);
    assert_eq!((code, out.as_str()), (0, "still\n"));
    b.ok(&["image", "rm", &c]);
    assert_eq!(layers(&b), 0, "no image uses them any more");
    assert!(blobs(&b).is_empty(), "blobs removed too: {:?}", blobs(&b));
    let (code, _, err) = run_out(&b, &["image", "rm", "no/such:image"]);
    assert_ne!(code, 0);
    assert!(err.contains("no/such"), "{err}");
}

#[test]
fn memory_limit_is_enforced_and_oom_reported() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    // The shell keeps 64 MB in a variable: past a 16 MB limit.
    let (code, _, err) = run_out(
        &b,
        &[
            "run",
            "--name",
            "oom",
            "--memory",
            "16m",
            "-q",
            &image,
            "--",
            "sh",
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}",
        ],
    );
    assert_eq!(code, 137, "{err}");
    assert!(err.contains("out of memory"), "{err}");
    let c = b.inspect("oom");
    assert_eq!(c["state"]["oom_killed"], true);
    // Under the limit the same works.
    let (code, out, err) = run_out(
        &b,
        &[
            "run",
            "--rm",
            "--memory",
            "64m",
            &image,
            "--",
            "sh",
            "-c",
            "x=$(head -c 1048576 /dev/zero | tr '\\0' a); echo ${#x}",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "1048576\n"), "{err}");
}

#[test]
fn long_lines_and_binary_bytes_survive_the_log() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let script = "head -c 20480 /dev/zero | tr '\\0' x; printf '\\n\\377\\376end\\n'; echo to-stderr >&2";
    let o = b.run(&["run", "--name", "bytes", "-q", &image, "--", "sh", "-c", script]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut want = vec![b'x'; 20480];
    want.extend_from_slice(b"\n\xff\xfeend\n");
    assert_eq!(o.stdout, want, "berth run prints the bytes as written");
    assert_eq!(o.stderr, b"to-stderr\n");
    let logs = b.run(&["container", "logs", "bytes"]);
    assert_eq!(logs.stdout, want, "the log gives them back intact");
    assert_eq!(logs.stderr, b"to-stderr\n");
}

#[test]
fn stop_kills_a_process_that_ignores_sigterm_after_the_grace_period() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let id = b
        .ok(&[
            "run",
            "-d",
            "--stop-timeout",
            "2",
            &image,
            "--",
            "sh",
            "-c",
            "trap '' TERM; while true; do sleep 1; done",
        ])
        .trim()
        .to_string();
    let t = Instant::now();
    b.ok(&["container", "stop", &id]);
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(8), "took {took:?}");
    let c = b.inspect(&id);
    assert_eq!(c["state"]["signal"], "SIGKILL");
    assert_eq!(c["state"]["exit_code"], 137);
    // A process that handles SIGTERM stops at once.
    let id = b
        .ok(&["run", "-d", &image, "--", "sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"])
        .trim()
        .to_string();
    let t = Instant::now();
    b.ok(&["container", "stop", &id]);
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!(b.inspect(&id)["state"]["exit_code"], 0);
}

fn host_leftovers(b: &Berth, ids: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect::<Vec<_>>())
        .unwrap_or_default();
    let links = std::fs::read_dir("/sys/class/net")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect::<Vec<_>>())
        .unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for id in ids {
        let short = &id[..12];
        if netns.iter().any(|n| n.contains(short)) {
            left.push(format!("netns of {short}"));
        }
        if links.iter().any(|n| n.contains(short)) {
            left.push(format!("veth of {short}"));
        }
        if mounts.contains(id.as_str()) {
            left.push(format!("mount of {short}"));
        }
        for ctrl in ["memory", "pids", "cpu", "freezer"] {
            if std::path::Path::new(&format!("/sys/fs/cgroup/{ctrl}/berth/{id}")).exists() {
                left.push(format!("{ctrl} cgroup of {short}"));
            }
        }
    }
    let ips = std::fs::read_dir(b.data_dir().join("network/ips")).map(|d| d.count()).unwrap_or(0);
    if ips > 0 {
        left.push(format!("{ips} allocated addresses"));
    }
    left
}

#[test]
fn twenty_containers_at_once_then_nothing_left() {
    let w = world();
    let b = std::sync::Arc::new(Berth::new());
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let b = b.clone();
            let image = image.clone();
            std::thread::spawn(move || {
                b.ok(&["run", "-d", "--name", &format!("many{i}"), &image, "--", "sleep", "300"]).trim().to_string()
            })
        })
        .collect();
    let ids: Vec<String> = handles.into_iter().map(|h| h.join().expect("a run failed")).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 20);
    let ips: HashSet<String> =
        ids.iter().map(|id| b.inspect(id)["state"]["network"]["ip"].as_str().unwrap().to_string()).collect();
    assert_eq!(ips.len(), 20, "every container has its own address");
    let mut args = vec!["container", "rm", "--force"];
    args.extend(ids.iter().map(|s| s.as_str()));
    b.ok(&args);
    assert!(b.container_ids().is_empty());
    let left = host_leftovers(&b, &ids);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn containers_survive_berth_being_killed_and_are_readopted() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    // A foreground `berth run`, killed with SIGKILL while its container runs.
    let mut fg = b
        .cmd()
        .args(["run", "--name", "survivor", &image, "--", "sh", "-c", "echo started; while true; do sleep 0.2; done"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        Berth::wait_until(Duration::from_secs(20), || b.run(&["container", "logs", "survivor"]).stdout == b"started\n")
    );
    fg.kill().unwrap();
    let _ = fg.wait();
    std::thread::sleep(Duration::from_millis(300));
    let c = b.inspect("survivor");
    assert_eq!(c["state"]["status"], "running", "{c}");
    let pid = c["state"]["pid"].as_i64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the container process is alive");
    let ls = b.ok(&["container", "ls"]);
    assert!(ls.contains("survivor"), "{ls}");
    assert_eq!(b.run(&["container", "logs", "survivor"]).stdout, b"started\n");
    b.ok(&["container", "stop", "--time", "1", "survivor"]);
    assert_eq!(b.inspect("survivor")["state"]["status"], "exited");
    let id = c["id"].as_str().unwrap().to_string();
    b.ok(&["container", "rm", "survivor"]);
    assert!(host_leftovers(&b, &[id]).is_empty());
}

#[test]
fn bad_input_gets_a_clear_error() {
    let b = Berth::new();
    let cases: &[(&[&str], &str)] = &[
        (&["image", "pull", "Busybox"], "must be lowercase"),
        (&["image", "pull", "busybox:"], "busybox:"),
        (&["image", "pull", "busybox@sha256:abc"], "digest"),
        (&["run", "--memory", "lots", "busybox"], "--memory"),
        (&["container", "stop", "nope"], "no such container: nope"),
    ];
    for (args, want) in cases {
        let (code, _, err) = run_out(&b, args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "berth {args:?}: {err}");
    }
    // A bad config: one line, exit code 64.
    b.write_config("[logs]\nmax_sise = 1\n");
    let (code, _, err) = run_out(&b, &["container", "ls"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("unknown field") && err.contains("config.toml"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A tar with one hostile entry: raw header bytes, since tar builders refuse such names.
fn hostile_layer(kind: &str, outside: &std::path::Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut entry = |name: &str, typ: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        {
            let raw = h.as_old_mut();
            raw.name = [0; 100];
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                raw.linkname = [0; 100];
                raw.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(typ);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let out = outside.to_str().unwrap();
    match kind {
        "dotdot" => entry("../../../../../../../../tmp/berth-pwned", tar::EntryType::Regular, None, b"x"),
        "absolute" => entry(&format!("{out}/abs"), tar::EntryType::Regular, None, b"x"),
        "symlink-then-file" => {
            entry("evil", tar::EntryType::Symlink, Some(out), b"");
            entry("evil/pwned", tar::EntryType::Regular, None, b"x");
        }
        "hardlink-outside" => entry("h", tar::EntryType::Link, Some("../../../../../../etc/passwd"), b""),
        _ => unreachable!(),
    }
    b.into_inner().unwrap()
}

fn oci_layout_tar(layer: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["true"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": layer.len()}]
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len(),
                        "annotations": {"org.opencontainers.image.ref.name": "hostile"}}]
    })
    .to_string()
    .into_bytes();
    let mut t = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        t.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for blob in [&config, &manifest, &layer.to_vec()] {
        add(&format!("blobs/sha256/{}", &sha(blob)[7..]), blob);
    }
    t.into_inner().unwrap()
}

#[test]
fn hostile_layers_are_refused_and_write_nothing_outside() {
    let b = Berth::new();
    let outside = tempfile::tempdir().unwrap();
    for kind in ["dotdot", "absolute", "symlink-then-file", "hardlink-outside"] {
        let tar = b.data_dir().join(format!("{kind}.tar"));
        std::fs::write(&tar, oci_layout_tar(&hostile_layer(kind, outside.path()))).unwrap();
        let (code, _, err) = run_out(&b, &["image", "load", "--input", tar.to_str().unwrap()]);
        assert_ne!(code, 0, "{kind}: the load must fail");
        let named = match kind {
            "dotdot" => "berth-pwned",
            "absolute" => "abs",
            "symlink-then-file" => "evil/pwned",
            _ => "h",
        };
        assert!(err.contains(named), "{kind}: the error names the entry: {err}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "{kind}: wrote outside");
        assert!(!std::path::Path::new("/tmp/berth-pwned").exists(), "{kind}");
        let ls: serde_json::Value = serde_json::from_str(&b.ok(&["image", "ls", "--json"])).unwrap();
        assert_eq!(ls.as_array().unwrap().len(), 0, "{kind}: no half-recorded image");
    }
}

#[test]
fn mirrors_are_used_and_fall_back_to_the_upstream() {
    let w = world();
    let b = Berth::new();
    let anon = w.registries["anon"].host.clone();
    // An upstream nobody serves, mirrored by the anonymous registry: the mirror answers.
    // And the anonymous registry with a dead mirror in front: the upstream answers.
    b.write_config(&format!(
        "[registries.\"127.0.0.1:9\"]\nmirrors = [\"{anon}\"]\n\n[registries.\"{anon}\"]\nmirrors = [\"127.0.0.1:9\"]\n"
    ));
    let (code, out, err) =
        run_out(&b, &["run", "--rm", "-q", "127.0.0.1:9/test/busybox:latest", "--", "echo", "via mirror"]);
    assert_eq!((code, out.as_str()), (0, "via mirror\n"), "{err}");
    let (code, out, err) =
        run_out(&b, &["run", "--rm", "-q", &w.image("anon", "busybox-zstd"), "--", "echo", "via upstream"]);
    assert_eq!((code, out.as_str()), (0, "via upstream\n"), "{err}");
}

#[test]
fn isolation_defaults_and_limits_apply() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let script = "grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status; \
                  cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/pids/pids.max; \
                  echo pid=$$; unshare -n true 2>/dev/null; echo unshare=$?";
    let (code, out, err) = run_out(
        &b,
        &[
            "run",
            "--rm",
            "-q",
            "--cpus",
            "0.5",
            "--pids-limit",
            "20",
            "--no-new-privileges",
            &image,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<String> = out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    assert_eq!(
        lines,
        [
            // Docker's default capability set, nothing more.
            "CapEff: 00000000a80425fb",
            "NoNewPrivs: 1",
            // A seccomp filter is installed, and it refuses new namespaces.
            "Seccomp: 2",
            "50000",
            "20",
            // The container's process is pid 1 of its own pid namespace.
            "pid=1",
            "unshare=1",
        ]
    );
    let (code, out, _) = run_out(&b, &["run", "--rm", "-q", &image, "--", "grep", "NoNewPrivs", "/proc/self/status"]);
    assert_eq!((code, out.split_whitespace().last()), (0, Some("0")), "no_new_privileges is an option, off by default");
}

#[test]
fn concurrent_berth_processes_share_a_data_dir_safely() {
    let w = world();
    let b = Berth::new();
    let images = [w.image("anon", "busybox"), w.image("basic", "busybox"), w.image("anon", "busybox-zstd")];
    // Three pulls (two of the same layers) and a gc, as separate processes, all at once.
    let mut children: Vec<_> = images
        .iter()
        .map(|i| b.cmd().args(["image", "pull", "-q", i]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    children.push(b.cmd().args(["image", "gc"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_blobs_intact(&b);
    for i in &images {
        let (code, out, err) = run_out(&b, &["run", "--rm", i, "--", "echo", "ok"]);
        assert_eq!((code, out.as_str()), (0, "ok\n"), "{i}: {err}");
    }
    let ls: serde_json::Value = serde_json::from_str(&b.ok(&["image", "ls", "--json"])).unwrap();
    let refs: usize = ls.as_array().unwrap().iter().map(|i| i["references"].as_array().unwrap().len()).sum();
    assert_eq!(refs, 3, "every reference recorded: {ls}");
}

#[test]
fn ctrl_c_on_a_foreground_run_reaches_the_container() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    let fg = b
        .cmd()
        .args([
            "run",
            "--rm",
            "--name",
            "fg",
            &image,
            "--",
            "sh",
            "-c",
            "trap 'echo got INT; exit 7' INT; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(Berth::wait_until(Duration::from_secs(20), || b.run(&["container", "logs", "fg"]).stdout == b"ready\n"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(fg.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = fg.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "the client exits with the container's code");
    assert_eq!(stdout(&out), "ready\ngot INT\n");
    assert!(b.container_ids().is_empty(), "--rm removed it");
}

#[test]
fn relative_data_dir_and_option_errors() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    // A relative --data-dir works like the absolute one.
    let o = b
        .cmd()
        .current_dir(b.data_dir().parent().unwrap())
        .env("BERTH_DATA_DIR", b.data_dir().file_name().unwrap())
        .args(["run", "--rm", "-q", &image, "--", "echo", "relative ok"])
        .output()
        .unwrap();
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "relative ok\n"), "{}", stderr(&o));
    // Bad options exit 125 before anything runs, saying what was wrong.
    for (args, want) in [
        (vec!["--stop-signal", "SIGNOPE"], "invalid stop signal"),
        (vec!["--workdir", "relative/dir"], "must be an absolute path"),
        (vec!["--memory", "1k"], "minimum"),
        (vec!["--name", "bad name"], "invalid container name"),
        (vec!["--env", "=novalue"], "invalid environment variable name"),
        (vec!["--cpus", "0.001"], "--cpus"),
    ] {
        let mut full = vec!["run", "--rm"];
        full.extend(args.iter().copied());
        full.push(&image);
        full.extend(["true"]);
        let (code, _, err) = run_out(&b, &full);
        assert_eq!(code, 125, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(b.container_ids().is_empty());
}

#[test]
fn network_misconfiguration_fails_clearly_and_leaks_nothing() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    // The configured "bridge" is a veth: refused before anything is created.
    let dummy = format!("{}d", b.bridge);
    let peer = format!("{}p", b.bridge);
    let made =
        std::process::Command::new("ip").args(["link", "add", &dummy, "type", "veth", "peer", "name", &peer]).status();
    assert!(made.unwrap().success());
    std::fs::write(
        b.data_dir().join("config.toml"),
        format!("[network]\nbridge = \"{dummy}\"\nsubnet = \"{}\"\n", b.subnet),
    )
    .unwrap();
    let (code, _, err) = run_out(&b, &["run", "--rm", &image, "--", "true"]);
    let _ = std::process::Command::new("ip").args(["link", "del", &dummy]).status();
    assert_eq!(code, 125);
    assert!(err.contains("is not a bridge"), "{err}");
    // The bridge exists with another subnet's address: refused, naming both.
    b.write_config("");
    b.ok(&["run", "--rm", &image, "--", "true"]);
    // Same bridge, the upper half of its /24 as the subnet: its gateway .129 is not on it.
    let moved = b.subnet.replace(".0/24", ".128/25");
    std::fs::write(
        b.data_dir().join("config.toml"),
        format!("[network]\nbridge = \"{}\"\nsubnet = \"{moved}\"\n", b.bridge),
    )
    .unwrap();
    let (code, _, err) = run_out(&b, &["run", "--rm", &image, "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("does not have the address"), "{err}");
    // The earlier --rm run's shim releases its network just after its client returned.
    let ips = || std::fs::read_dir(b.data_dir().join("network/ips")).map(|d| d.count()).unwrap_or(0);
    assert!(Berth::wait_until(Duration::from_secs(5), || ips() == 0), "no address kept");
}

#[test]
fn load_with_tag_names_the_image() {
    let b = Berth::new();
    let tar = b.data_dir().join("bb.tar");
    let st = std::process::Command::new("python3")
        .arg(berth_tests::repo_root().join("tests/world/world.py"))
        .args(["oci-tar", "busybox"])
        .arg(&tar)
        .status()
        .unwrap();
    assert!(st.success());
    let out = b.ok(&["image", "load", "--input", tar.to_str().unwrap(), "--tag", "local/bb:1"]);
    assert!(out.contains("local/bb:1"), "{out}");
    let (code, out, err) = run_out(&b, &["run", "--rm", "local/bb:1", "--", "echo", "tagged"]);
    assert_eq!((code, out.as_str()), (0, "tagged\n"), "{err}");
}

/// A network namespace standing for "the outside world": a veth from the host, an address,
/// and a TCP server that answers with the address it sees the client coming from.
struct Outside {
    ns: String,
    host_if: String,
    server: std::process::Child,
    addr: String,
}

impl Outside {
    fn new(tag: &str, net: u32) -> Outside {
        let ns = format!("btout{tag}");
        let host_if = format!("bto{tag}");
        let sh = |cmd: String| {
            let ok = std::process::Command::new("sh").arg("-c").arg(&cmd).status().unwrap().success();
            assert!(ok, "{cmd}");
        };
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
        sh(format!("ip netns add {ns} && ip link add {host_if} type veth peer name eth0 netns {ns}"));
        sh(format!("ip addr add 10.199.{net}.1/30 dev {host_if} && ip link set {host_if} up"));
        sh(format!("ip -n {ns} addr add 10.199.{net}.2/30 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"));
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg(
                "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('0.0.0.0', 9000)); s.listen(5)\nwhile True:\n    c, a = s.accept(); c.sendall(a[0].encode() + b'\\n'); c.close()\n",
            )
            .spawn()
            .unwrap();
        Outside { ns, host_if, server, addr: format!("10.199.{net}.2") }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn containers_get_hosts_files_and_outbound_nat() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let out = Outside::new(&format!("{}", std::process::id() % 10000), std::process::id() % 250);
    let id = b.ok(&["run", "-d", "--hostname", "natbox", &image, "--", "sleep", "60"]).trim().to_string();
    let ip = b.inspect(&id)["state"]["network"]["ip"].as_str().unwrap().to_string();
    b.ok(&["container", "rm", "--force", &id]);
    // The container reaches an address outside Berth's subnet, and is seen there as the host
    // (masqueraded), not as its own 10.x address.
    let script = format!(
        "grep -c 'natbox' /etc/hosts; cat /etc/hostname; test -f /etc/resolv.conf && echo resolv; \
         for i in 1 2 3 4 5 6 7 8 9 10; do r=$(nc -w 2 {} 9000 </dev/null) && break; sleep 0.3; done; echo from=$r",
        out.addr
    );
    let (code, stdout_text, err) =
        run_out(&b, &["run", "--rm", "-q", "--hostname", "natbox", &image, "--", "sh", "-c", &script]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = stdout_text.lines().collect();
    assert_eq!(lines[..3], ["1", "natbox", "resolv"], "{stdout_text}");
    let seen = lines[3].trim_start_matches("from=");
    assert!(seen.starts_with("10.199."), "the outside saw {seen:?}, want the host's address (NAT)");
    assert_ne!(seen, ip);
}

#[test]
fn logs_follow_until_the_container_exits() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let id = b
        .ok(&["run", "-d", &image, "--", "sh", "-c", "echo one; sleep 1; echo two >&2; sleep 0.5; echo three"])
        .trim()
        .to_string();
    let o = b.run(&["container", "logs", "--follow", &id]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "one\nthree\n");
    assert_eq!(stderr(&o), "two\n");
    let t = b.run(&["container", "logs", "--timestamps", &id]);
    let first = stdout(&t).lines().next().unwrap().to_string();
    assert!(first.ends_with("Z one") && first.starts_with("20"), "{first}");
}

#[test]
fn fast_exiting_foreground_runs_never_hang() {
    // Regression: a container that exits within microseconds of starting has its `exited`
    // message right behind `started` on the shim's socket; reading `started` through a buffer
    // once swallowed it, and `berth run` and the shim then waited for each other forever.
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    for i in 0..40 {
        let mut child = b
            .cmd()
            .args(["run", "--rm", "-q", &image, "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!("run {i} of `berth run --rm IMG -- true` hung for 20s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "run {i}: {status}");
    }
}

fn exec_out(b: &Berth, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["container", "exec"];
    full.extend_from_slice(args);
    run_out(b, &full)
}

#[test]
fn bind_mounts_share_a_host_directory_and_read_only_refuses_writes() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    let host = tempfile::tempdir().unwrap();
    let vol = format!("{}:/data", host.path().display());
    // One container writes into the mounted directory (a destination missing from the image).
    let (code, _, err) =
        run_out(&b, &["run", "--rm", "-v", &vol, &image, "--", "sh", "-c", "echo from-one > /data/note"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(host.path().join("note")).unwrap(), "from-one\n", "the host sees it");
    std::fs::write(host.path().join("from-host"), "from the host\n").unwrap();
    // A second one, read-only and deeper, sees both files and cannot write.
    let ro = format!("{}:/deep/er/data:ro", host.path().display());
    let script = "cat /deep/er/data/note /deep/er/data/from-host; \
                  if echo x > /deep/er/data/x; then echo wrote; else echo refused; fi";
    let (code, out, err) = run_out(&b, &["run", "--rm", "-v", &ro, &image, "--", "sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "from-one\nfrom the host\nrefused\n");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!host.path().join("x").exists());
    // The mounts are part of the container's spec (what a restart or re-adoption reads).
    let id = b.ok(&["run", "-d", "-v", &ro, "-v", &vol, &image, "--", "sleep", "300"]).trim().to_string();
    let c = b.inspect(&id);
    let canonical = std::fs::canonicalize(host.path()).unwrap();
    assert_eq!(
        c["spec"]["mounts"],
        serde_json::json!([
            {"source": canonical, "destination": "/deep/er/data", "read_only": true},
            {"source": canonical, "destination": "/data", "read_only": false},
        ])
    );
    let (code, out, err) = exec_out(&b, &[&id, "--", "sh", "-c", "cat /data/note; echo two > /data/two"]);
    assert_eq!((code, out.as_str()), (0, "from-one\n"), "{err}");
    assert_eq!(std::fs::read_to_string(host.path().join("two")).unwrap(), "two\n");
    b.ok(&["container", "rm", "--force", &id]);
    assert!(host_leftovers(&b, &[id]).is_empty());
}

#[test]
fn bind_mount_specs_get_clear_errors() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    let host = tempfile::tempdir().unwrap();
    let dir = host.path().display().to_string();
    let file = host.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("data:/data".into(), "named volumes are not supported"),
        (dir.clone(), "expected HOST:CONTAINER"),
        (format!("{dir}:/data:rx"), "unknown option \"rx\""),
        (format!("{dir}/missing:/data"), "does not exist"),
        (format!("{}:/data", file.display()), "is not a directory"),
        (format!("{dir}:data"), "must be an absolute path"),
        (format!("{dir}:/a/../etc"), "must not contain '..'"),
        (format!("{dir}:/"), "cannot be a mount point"),
        (format!("{dir}:/proc/x"), "/proc and /sys"),
        // A destination that is a file in the image: refused by the shim, naming it.
        (format!("{dir}:/etc/passwd"), "creating the mount point /etc/passwd in the container"),
    ];
    for (vol, want) in &cases {
        let (code, _, err) = run_out(&b, &["run", "--rm", "-v", vol, &image, "--", "true"]);
        assert_eq!(code, 125, "-v {vol}: {err}");
        assert!(err.contains(want), "-v {vol}: want {want:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "-v {vol}: one line: {err}");
    }
    assert!(b.container_ids().is_empty());
    let (code, _, err) = run_out(&b, &["run", "--rm", "-v", &format!("{dir}:/d"), "-v", &format!("{dir}:/d/"), &image]);
    assert_eq!(code, 125);
    assert!(err.contains("two mounts have the destination /d"), "{err}");
}

/// An image whose root has an absolute symlink to a host directory, and a static busybox.
fn image_with_a_link_to(outside: &std::path::Path) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox-static: run tests/world/install-deps.sh");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    t.append_data(&mut h, "bin/", std::io::empty()).unwrap();
    let bytes = std::fs::read(busybox).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(bytes.len() as u64);
    t.append_data(&mut h, "bin/busybox", &bytes[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    t.append_link(&mut h, "link", outside).unwrap();
    t.into_inner().unwrap()
}

#[test]
fn mount_points_never_follow_links_out_of_the_root() {
    let b = Berth::new();
    let outside = tempfile::tempdir().unwrap();
    let tar = b.data_dir().join("linked.tar");
    std::fs::write(&tar, oci_layout_tar(&image_with_a_link_to(outside.path()))).unwrap();
    b.ok(&["image", "load", "--input", tar.to_str().unwrap(), "--tag", "local/linked:1"]);
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("f"), "mounted\n").unwrap();
    // /link points at a host directory: the mount point is made inside the root filesystem,
    // where the link resolves to a path of the container's own, never in the host directory.
    let vol = format!("{}:/link/sub", host.path().display());
    let inside = format!("{}/sub", outside.path().display());
    let script = format!("/bin/busybox cat /link/sub/f && /bin/busybox ls -d {inside}");
    let (code, out, err) =
        run_out(&b, &["run", "--rm", "-v", &vol, "local/linked:1", "--", "/bin/busybox", "sh", "-c", &script]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("mounted\n{inside}\n"));
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing made in the host directory");
}

#[test]
fn exec_runs_inside_the_container() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let id = b
        .ok(&[
            "run",
            "-d",
            "-q",
            "--hostname",
            "execbox",
            "--user",
            "app",
            "--workdir",
            "/tmp",
            "--env",
            "EXTRA=1",
            &image,
            "--",
            "sh",
            "-c",
            "echo marker > /tmp/made-by-init; exec sleep 300",
        ])
        .trim()
        .to_string();
    let c = b.inspect(&id);
    let ip = c["state"]["network"]["ip"].as_str().unwrap().to_string();
    assert!(Berth::wait_until(Duration::from_secs(10), || exec_out(
        &b,
        &[&id, "--", "test", "-f", "/tmp/made-by-init"]
    )
    .0 == 0));
    // Its filesystem, host name, network, cgroups; the container's user, directory and env.
    let (code, out, err) = exec_out(
        &b,
        &[
            &id,
            "--",
            "sh",
            "-c",
            "cat /tmp/made-by-init /etc/hostname; id -u; pwd; echo $HOME $EXTRA $GREETING; \
             ip -4 addr show eth0 | grep -o 'inet [0-9.]*'; grep -c /berth/ /proc/self/cgroup",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..6], ["marker", "execbox", "1000", "/tmp", "/home/app 1 hello", &format!("inet {ip}")], "{out}");
    assert!(lines[6].parse::<u32>().unwrap() >= 4, "in the container's cgroups: {out}");
    // Its pid namespace: pid 1 is the container's sleep, and only its processes are visible.
    let (code, out, err) =
        exec_out(&b, &[&id, "--", "sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$; ls /proc"]);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("sleep 300 "));
    let me: u32 = lines.next().unwrap().parse().unwrap();
    let pids: Vec<u32> = lines.flat_map(|l| l.split_whitespace()).filter_map(|w| w.parse().ok()).collect();
    assert!(me > 1 && me < 100, "a pid of the container's namespace: {me}");
    assert!(pids.contains(&1) && pids.iter().all(|p| *p < 100), "only the container's processes: {pids:?}");
    // The same confinement as the container's own process.
    let status = "grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status | tr -s '\\t ' ' '";
    let (_, own, _) = exec_out(&b, &["--user", "root", &id, "--", "sh", "-c", status]);
    assert_eq!(own, "CapEff: 00000000a80425fb\nNoNewPrivs: 0\nSeccomp: 2\n");
    // Overrides: user, directory, env.
    let (code, out, err) = exec_out(
        &b,
        &[
            "-u",
            "root",
            "-w",
            "/www",
            "-e",
            "EXTRA=2",
            "-e",
            "BERTH_TEST_PASS",
            &id,
            "--",
            "sh",
            "-c",
            "id -u; pwd; echo $HOME $EXTRA $BERTH_TEST_PASS",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "0\n/www\n/root 2 passed\n"), "{err}");
    // Exit codes, as a shell's.
    assert_eq!(exec_out(&b, &[&id, "--", "sh", "-c", "exit 42"]).0, 42);
    assert_eq!(exec_out(&b, &[&id, "--", "sh", "-c", "kill -9 $$"]).0, 137);
    let (code, _, err) = exec_out(&b, &[&id, "--", "no-such-command"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("\"no-such-command\" not found"), "{err}");
    let (code, _, err) = exec_out(&b, &[&id, "--", "/etc/passwd"]);
    assert_eq!(code, 126, "{err}");
    let (code, _, err) = exec_out(&b, &["-w", "/nowhere", &id, "--", "pwd"]);
    assert_eq!(code, 125);
    assert!(err.contains("/nowhere does not exist"), "{err}");
    // stdin: passed with -i, empty without.
    for (flag, want) in [(Some("-i"), "got:typed here\n"), (None, "got:\n")] {
        let mut args = vec!["container", "exec"];
        args.extend(flag);
        args.extend([id.as_str(), "--", "sh", "-c", "read x; echo got:$x"]);
        let mut child = b.cmd().args(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"typed here\n").unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), want), "{flag:?}");
    }
    // A command still running when the container stops goes with it.
    let mut long =
        b.cmd().args(["container", "exec", &id, "--", "sleep", "300"]).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    b.ok(&["container", "stop", "--time", "0", &id]);
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = long.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = long.kill();
            panic!("the exec outlived its container");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(137));
    b.ok(&["container", "rm", &id]);
    assert!(host_leftovers(&b, &[id]).is_empty());
}

#[test]
fn exec_is_refused_unless_the_container_runs() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let id = b.ok(&["run", "-d", "-q", &image, "--", "sleep", "300"]).trim().to_string();
    // Frozen (as the server freezes idle instances): refused, saying why.
    let freezer = format!("/sys/fs/cgroup/freezer/berth/{id}/freezer.state");
    std::fs::write(&freezer, "FROZEN").unwrap();
    let (code, _, err) = exec_out(&b, &[&id, "--", "true"]);
    std::fs::write(&freezer, "THAWED").unwrap();
    assert_eq!(code, 125);
    assert!(err.contains("is frozen"), "{err}");
    assert_eq!(exec_out(&b, &[&id, "--", "true"]).0, 0, "thawed, it works");
    b.ok(&["container", "stop", "--time", "0", &id]);
    let (code, _, err) = exec_out(&b, &[&id, "--", "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("is not running"), "{err}");
    let (code, _, err) = exec_out(&b, &["nosuch", "--", "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("no such container: nosuch"), "{err}");
}

#[test]
fn exec_with_a_terminal() {
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    let id = b.ok(&["run", "-d", "-q", &image, "--", "sleep", "300"]).trim().to_string();
    // The client runs on a terminal of our own, 33 rows by 111 columns.
    let mut cmd = b.cmd();
    cmd.args([
        "container",
        "exec",
        "-it",
        &id,
        "--",
        "sh",
        "-c",
        "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; stty size; tty; read x; echo got:$x; exit 3",
    ]);
    let mut term = berth_tests::terminal::Terminal::spawn(cmd, 33, 111);
    term.wait_for("/dev/pts/");
    // Typed keys reach the command through the container's terminal (which echoes them).
    term.type_keys(b"keys\r");
    term.wait_for("got:keys");
    let st = term.child.wait().unwrap();
    let seen = term.seen;
    assert_eq!(st.code(), Some(3), "{seen:?}");
    let lines: Vec<&str> = seen.split("\r\n").collect();
    assert_eq!(
        lines[..3],
        ["is-a-tty", "33 111", "/dev/pts/0"],
        "a terminal of the container's own, of our size: {seen:?}"
    );
    b.ok(&["container", "rm", "--force", &id]);
}

/// The engine as a library, on a harness data directory.
fn engine(b: &Berth) -> berth_agent::Engine {
    let cfg = berth_agent::Config {
        network: berth_agent::config::NetworkConfig { bridge: b.bridge.clone(), subnet: b.subnet.clone(), dns: vec![] },
        ..Default::default()
    };
    let shim = berth_agent::ShimCommand {
        program: berth_tests::berth_bin(),
        args: vec!["--data-dir".into(), b.data_dir().as_os_str().to_owned(), "shim".into()],
    };
    berth_agent::Engine::open(b.data_dir(), cfg, shim).unwrap()
}

#[test]
fn engine_api_prepared_containers_keep_mounts_and_exec_pipes_stdio() {
    use std::io::{Read, Write};
    let w = world();
    let b = Berth::new();
    let image = w.image("anon", "busybox");
    b.ok(&["image", "pull", "-q", &image]);
    let e = engine(&b);
    let img = e.images().get(&image).unwrap();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("f"), "in the volume\n").unwrap();
    let opts = berth_agent::RunOptions {
        cmd: Some(vec!["sleep".into(), "300".into()]),
        mounts: vec![berth_agent::Mount { source: host.path().into(), destination: "/vol".into(), read_only: false }],
        ..Default::default()
    };
    let prepared = e.prepare(&img, &image, opts).unwrap();
    assert_eq!(e.get(&prepared.id).unwrap().spec.mounts[0].destination, "/vol");
    let c = e.start_prepared(prepared).unwrap();
    let mut x = e
        .exec(
            &c.id,
            berth_agent::ExecOptions {
                args: vec!["sh".into(), "-c".into(), "cat /vol/f; cat > /vol/g; echo oops >&2; exit 5".into()],
                stdin: Stdio::piped(),
                ..Default::default()
            },
        )
        .unwrap();
    x.child.stdin.take().unwrap().write_all(b"from stdin\n").unwrap();
    let mut out = String::new();
    x.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    x.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(x.wait().unwrap(), 5);
    assert_eq!((out.as_str(), err.as_str()), ("in the volume\n", "oops\n"));
    assert_eq!(std::fs::read_to_string(host.path().join("g")).unwrap(), "from stdin\n");
    // Dropping a running exec ends its command.
    let x = e
        .exec(&c.id, berth_agent::ExecOptions { args: vec!["sleep".into(), "301".into()], ..Default::default() })
        .unwrap();
    let pid = x.pid;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(x);
    assert!(Berth::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).map(|c| !c.starts_with("sleep\u{0}301")).unwrap_or(true)
    }));
    e.remove(&c.id, true).unwrap();
}
