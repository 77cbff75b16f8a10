//! Differential tests of the Dockerfile builder (issue 5): each Dockerfile here is built by
//! `buildah bud --isolation chroot --format docker` and by `berth build`, and the two images
//! must agree on their config (Env, Cmd, Entrypoint, WorkingDir, User, ExposedPorts, Labels,
//! Healthcheck, StopSignal, Volumes, OnBuild, Shell) and on their flattened file trees (paths,
//! types, modes, owners, contents, symlink targets; not mtimes).
//!
//! Both images end up as `dir:` copies (buildah pushes its own; berth pushes to the world's
//! registry and skopeo copies it down), whose layers are applied in order, whiteouts included,
//! into one map of path to entry.
//!
//! Where buildah 1.28 and Docker/BuildKit genuinely differ, the test follows documented Docker
//! behaviour and says so where it does.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use berth_tests::{stderr, stdout, world, Berth};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn anon() -> String {
    world().registries["anon"].host.clone()
}

/// The busybox test image in the anonymous registry.
fn base() -> String {
    world().image("anon", "busybox")
}

fn check(what: &str, o: Output) -> String {
    assert!(o.status.success(), "{what} failed with {:?}\nstdout: {}\nstderr: {}", o.status, stdout(&o), stderr(&o));
    stdout(&o)
}

fn need(tool: &str) {
    let ok = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(ok.is_ok_and(|s| s.success()), "{tool} is not installed: run scripts/install-test-deps");
}

/// A private buildah storage (vfs: no mounts to leak) under a temp dir, removed on drop.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        need("buildah");
        need("skopeo");
        Buildah { dir: tempfile::Builder::new().prefix("bt-buildah").tempdir_in("/tmp").expect("temp dir") }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .stdin(Stdio::null());
        c
    }

    fn build(&self, ctx: &Path, tag: &str, extra: &[String]) {
        let mut c = self.cmd();
        c.args(["bud", "--isolation", "chroot", "--format", "docker", "--tls-verify=false", "-q", "-t", tag]);
        c.args(extra).arg(ctx);
        check(&format!("buildah bud {tag} {extra:?}"), c.output().expect("running buildah"));
    }

    /// Copies the image to a `dir:` layout at `out`.
    fn save(&self, tag: &str, out: &Path) {
        let mut c = self.cmd();
        c.args(["push", "-q"]).arg(tag).arg(format!("dir:{}", out.display()));
        check(&format!("buildah push {tag}"), c.output().expect("running buildah"));
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
        // chroot isolation unmounts what it mounted, but a killed build may not have: detach
        // anything left under the storage before removing it.
        if let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.path().display().to_string();
            let mut points: Vec<&str> =
                mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&root)).collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for m in points {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

/// A build context: a temp dir holding a Dockerfile and files.
struct Ctx {
    dir: tempfile::TempDir,
}

impl Ctx {
    fn new(dockerfile: &str) -> Ctx {
        let c = Ctx { dir: tempfile::Builder::new().prefix("bt-ctx").tempdir_in("/tmp").expect("temp dir") };
        c.file("Dockerfile", dockerfile, 0o644);
        c
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, rel: &str, data: &str, mode: u32) -> &Ctx {
        self.bytes(rel, data.as_bytes(), mode)
    }

    fn bytes(&self, rel: &str, data: &[u8], mode: u32) -> &Ctx {
        let p = self.dir.path().join(rel);
        fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        fs::write(&p, data).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        self
    }
}

/// Both builders with their stores, for one test.
struct Pair {
    berth: Berth,
    buildah: Buildah,
    out: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        world();
        Pair {
            berth: Berth::new(),
            buildah: Buildah::new(),
            out: tempfile::Builder::new().prefix("bt-diff").tempdir_in("/tmp").expect("temp dir"),
        }
    }

    /// Builds `ctx` with both tools, tagging it `tag` in both stores; `extra` are the flags both
    /// take alike (`--build-arg`, `--target`, `-f`).
    fn build(&self, ctx: &Path, tag: &str, extra: &[&str]) {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        self.buildah.build(ctx, tag, &extra);
        let mut args: Vec<&str> = vec!["build", "-t", tag];
        args.extend(extra.iter().map(String::as_str));
        let dir = ctx.display().to_string();
        args.push(&dir);
        self.berth.ok(&args);
    }

    /// Both images as (config, tree).
    fn images(&self, tag: &str) -> (Image, Image) {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let bd = self.out.path().join(format!("buildah-{n}"));
        self.buildah.save(tag, &bd);
        let remote = format!("{}/diff/berth-{}-{n}:latest", anon(), std::process::id());
        self.berth.ok(&["image", "push", tag, &remote]);
        let bt = self.out.path().join(format!("berth-{n}"));
        let o = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{remote}"))
            .arg(format!("dir:{}", bt.display()))
            .output()
            .expect("running skopeo");
        check("skopeo copy", o);
        (Image::read(&bd), Image::read(&bt))
    }

    /// Builds with both and asserts the images agree; returns them for further checks.
    fn same(&self, ctx: &Path, extra: &[&str]) -> (Image, Image) {
        let tag = format!("{}/diff/case-{}:latest", anon(), SEQ.fetch_add(1, Ordering::SeqCst));
        self.build(ctx, &tag, extra);
        let (a, b) = self.images(&tag);
        assert_same(&a, &b);
        (a, b)
    }

    /// For where buildah 1.28 departs from Docker: berth builds `berth` (with `berth_extra`),
    /// buildah builds `buildah` (with `buildah_extra`), a Dockerfile that means the same to it,
    /// and the images must agree.
    fn same_as(&self, berth: &Path, berth_extra: &[&str], buildah: &Path, buildah_extra: &[&str]) -> (Image, Image) {
        let tag = format!("{}/diff/case-{}:latest", anon(), SEQ.fetch_add(1, Ordering::SeqCst));
        let extra: Vec<String> = buildah_extra.iter().map(|s| s.to_string()).collect();
        self.buildah.build(buildah, &tag, &extra);
        let dir = berth.display().to_string();
        let mut args = vec!["build", "-t", &tag];
        args.extend(berth_extra);
        args.push(&dir);
        self.berth.ok(&args);
        let (a, b) = self.images(&tag);
        assert_same(&a, &b);
        (a, b)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u64,
    gid: u64,
    /// sha256 of a file's contents, a symlink's target, a device's numbers.
    data: String,
}

struct Image {
    config: Value,
    tree: BTreeMap<String, Node>,
}

impl Image {
    /// Reads a `dir:` copy and applies its layers.
    fn read(dir: &Path) -> Image {
        let manifest: Value = serde_json::from_slice(&fs::read(dir.join("manifest.json")).expect("manifest.json"))
            .expect("manifest json");
        let blob = |d: &Value| dir.join(d.as_str().expect("digest").trim_start_matches("sha256:"));
        let config: Value = serde_json::from_slice(&fs::read(blob(&manifest["config"]["digest"])).expect("config"))
            .expect("config json");
        let mut tree = BTreeMap::new();
        for l in manifest["layers"].as_array().expect("layers") {
            apply(&mut tree, &blob(&l["digest"]));
        }
        Image { config, tree }
    }

    fn file(&self, path: &str) -> &Node {
        self.tree.get(path).unwrap_or_else(|| panic!("{path} is not in the image"))
    }
}

fn layer_reader(path: &Path) -> Box<dyn Read> {
    let mut f = fs::File::open(path).expect("layer");
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).expect("reading a layer");
    let f = std::io::Cursor::new(magic[..n].to_vec()).chain(f);
    match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => panic!("{}: zstd layers are not read by this test", path.display()),
        _ => Box::new(f),
    }
}

fn norm(p: &Path) -> String {
    let s = p.to_string_lossy();
    s.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/').to_string()
}

fn remove_under(tree: &mut BTreeMap<String, Node>, dir: &str, itself: bool) {
    let prefix = format!("{dir}/");
    tree.retain(|k, _| !(k.starts_with(&prefix) || (itself && k == dir)));
}

/// Applies one layer tar to `tree`, as an overlay would.
fn apply(tree: &mut BTreeMap<String, Node>, layer: &Path) {
    let mut ar = tar::Archive::new(layer_reader(layer));
    for e in ar.entries().expect("layer entries") {
        let mut e = e.expect("layer entry");
        let path = norm(&e.path().expect("entry path"));
        if path.is_empty() || path == "." {
            continue;
        }
        let (parent, name) = match path.rsplit_once('/') {
            Some((p, n)) => (p.to_string(), n.to_string()),
            None => (String::new(), path.clone()),
        };
        if name == ".wh..wh..opq" {
            if parent.is_empty() {
                tree.clear();
            } else {
                remove_under(tree, &parent, false);
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let victim = if parent.is_empty() { hidden.to_string() } else { format!("{parent}/{hidden}") };
            remove_under(tree, &victim, true);
            continue;
        }
        let h = e.header().clone();
        let mode = h.mode().expect("mode") & 0o7777;
        let (uid, gid) = (h.uid().expect("uid"), h.gid().expect("gid"));
        let et = h.entry_type();
        let node = if et.is_hard_link() {
            // A hard link reads as the file it links to: the tools may link or copy.
            let target = norm(&e.link_name().expect("link").expect("a link name"));
            let mut n = tree.get(&target).unwrap_or_else(|| panic!("hard link {path} to missing {target}")).clone();
            n.mode = mode;
            n
        } else if et.is_dir() {
            Node { kind: "dir", mode, uid, gid, data: String::new() }
        } else if et.is_symlink() {
            let t = e.link_name().expect("link").expect("a link name").to_string_lossy().into_owned();
            Node { kind: "symlink", mode: 0, uid, gid, data: t }
        } else if et.is_file() || et == tar::EntryType::Continuous {
            let mut h2 = Sha256::new();
            std::io::copy(&mut e, &mut h2).expect("reading a file");
            Node { kind: "file", mode, uid, gid, data: hex::encode(h2.finalize()) }
        } else if et.is_character_special() || et.is_block_special() {
            let kind = if et.is_character_special() { "char" } else { "block" };
            let dev = format!(
                "{}:{}",
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0)
            );
            Node { kind, mode, uid, gid, data: dev }
        } else if et.is_fifo() {
            Node { kind: "fifo", mode, uid, gid, data: String::new() }
        } else {
            continue; // pax/gnu headers are folded into entries by the tar crate
        };
        if node.kind != "dir" {
            remove_under(tree, &path, false);
        }
        tree.insert(path, node);
    }
}

/// The config fields compared, with absent, null, empty arrays and empty objects made one.
const FIELDS: [&str; 12] = [
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Labels",
    "Healthcheck",
    "StopSignal",
    "Volumes",
    "OnBuild",
    "Shell",
];

fn config_fields(img: &Image) -> BTreeMap<&'static str, Value> {
    let c = &img.config["config"];
    let mut m = BTreeMap::new();
    for f in FIELDS {
        let mut v = c.get(f).cloned().unwrap_or(Value::Null);
        if f == "Env" {
            // An ENV that sets a variable the base already has: BuildKit (and berth) replace it
            // in place (dockerfile2llb's addEnv), buildah moves it to the end. The order of
            // distinct variables means nothing to a process, so Env compares as a set here;
            // args_and_env_scoping_and_expansion pins berth's order to BuildKit's.
            if let Some(a) = v.as_array_mut() {
                a.sort_by(|x, y| x.as_str().cmp(&y.as_str()));
            }
        }
        if f == "Labels" {
            // buildah stamps its own version into every image it builds (1.28 has no flag to
            // turn that off); it is the tool's signature, not the Dockerfile's.
            if let Some(o) = v.as_object_mut() {
                o.remove("io.buildah.version");
            }
        }
        let empty = match &v {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            Value::Null => true,
            _ => false,
        };
        m.insert(f, if empty { Value::Null } else { v });
    }
    m
}

/// Runtime artifacts of buildah's chroot isolation: it bind-mounts the host's /etc/hosts and
/// /etc/resolv.conf over empty files it creates (mode 0755) when the image has none, and those
/// stay in the layer of every RUN. Docker leaves nothing there, and neither does berth. Only
/// empty ones are dropped: a Dockerfile that writes them is still compared.
const BUILDAH_ARTIFACTS: [&str; 2] = ["etc/hosts", "etc/resolv.conf"];

fn assert_same(buildah: &Image, berth: &Image) {
    let (a, b) = (config_fields(buildah), config_fields(berth));
    let mut buildah_tree = buildah.tree.clone();
    for p in BUILDAH_ARTIFACTS {
        if buildah_tree.get(p).is_some_and(|n| n.kind == "file" && n.data == sha("")) && !berth.tree.contains_key(p) {
            buildah_tree.remove(p);
        }
    }
    let buildah = Image { config: Value::Null, tree: buildah_tree };
    let mut diffs = Vec::new();
    for f in FIELDS {
        if a[f] != b[f] {
            diffs.push(format!("config {f}: buildah {} / berth {}", a[f], b[f]));
        }
    }
    for (p, n) in &buildah.tree {
        match berth.tree.get(p) {
            None => diffs.push(format!("only in buildah's image: /{p} {n:?}")),
            Some(m) if m != n => diffs.push(format!("/{p}: buildah {n:?} / berth {m:?}")),
            _ => {}
        }
    }
    for (p, m) in &berth.tree {
        if !buildah.tree.contains_key(p) {
            diffs.push(format!("only in berth's image: /{p} {m:?}"));
        }
    }
    assert!(diffs.is_empty(), "the images differ ({} differences):\n{}", diffs.len(), diffs.join("\n"));
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

// --- the cases ------------------------------------------------------------------------------

#[test]
fn args_and_env_scoping_and_expansion() {
    let p = Pair::new();
    let (repo, tag) = base().rsplit_once(':').map(|(a, b)| (a.to_string(), b.to_string())).expect("a tag");
    let ctx = Ctx::new(&format!(
        r#"ARG REPO={repo}
ARG TAG=nope
ARG GLOBAL_ONLY=global
FROM ${{REPO}}:${{TAG}}
# Not redeclared: a meta ARG is not in scope inside the stage.
ENV SEES_GLOBAL="[${{GLOBAL_ONLY}}]"
# Redeclared without a value: takes the meta ARG's value.
ARG TAG
ARG GREETING=default
ARG OVERRIDDEN=from-dockerfile
ARG EMPTY=
ENV BEFORE=${{LATER:-unset}}
ARG LATER=later
ENV FROM_ARG=$GREETING OV=${{OVERRIDDEN}} TAGV=${{TAG}} AFTER=${{LATER:-unset}}
ENV DEF=${{NOPE:-fallback}} DEF_EMPTY=${{EMPTY:-fallback}} ALT=${{GREETING:+alt}} NOALT=x${{NOPE:+alt}}
ENV SPACED="a b  c" QUOTED='single $GREETING' ESCAPED=\$GREETING MIXED=pre"$GREETING"post
ENV GREETING=env-wins
RUN echo "$GREETING $OVERRIDDEN $TAG $LATER" > /args.txt && env | grep -E '^(OVERRIDDEN|LATER|EMPTY)=' | sort > /run-env.txt
LABEL from.arg=$OVERRIDDEN "with space"="a value" \
      multi.a=1 \
      # a comment inside the continuation
      multi.b=2
ENV legacy form with spaces
ENV PATH=$PATH:/opt/bin
# One ENV expands all its values with the variables as they were before it.
ENV abc=hello
ENV abc=bye def=$abc
USER ${{OVERRIDDEN}}
USER root
ENV EQUALS=a=b=c
ARG TARGETARCH
ARG TARGETOS
ENV ARCH=$TARGETARCH/$TARGETOS
ARG PORT=8080
EXPOSE $PORT
"#
    ));
    let (a, b) = p.same(ctx.path(), &["--build-arg", &format!("TAG={tag}"), "--build-arg", "OVERRIDDEN=from-cli"]);
    // The comparison is the test; these pin what both produced to what Docker documents.
    let env: Vec<&str> = a.config["config"]["Env"].as_array().expect("Env").iter().filter_map(Value::as_str).collect();
    for want in [
        "SEES_GLOBAL=[]",
        "BEFORE=unset",
        "OV=from-cli",
        "DEF_EMPTY=fallback",
        "ALT=alt",
        "NOALT=x",
        "ESCAPED=$GREETING",
        "def=hello",
    ] {
        assert!(env.contains(&want), "{want} not in {env:?}");
    }
    assert_eq!(a.file("args.txt").data, sha(&format!("env-wins from-cli {tag} later\n")));
    // BuildKit replaces a variable the base image set where it stands (see config_fields).
    let env: Vec<&str> = b.config["config"]["Env"].as_array().expect("Env").iter().filter_map(Value::as_str).collect();
    assert_eq!(
        &env[..2],
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/bin", "GREETING=env-wins"]
    );
}

const MULTI: &str = r#"FROM {BASE} AS Builder
RUN mkdir -p /out && echo built > /out/artifact && chmod 0640 /out/artifact && echo x > /out/extra
FROM builder AS Second
RUN echo second >> /out/artifact
FROM {BASE} AS broken
RUN echo this stage is never needed && exit 1
FROM {BASE}
COPY --from=BUILDER /out/artifact /from-name
COPY --from=0 /out /from-index/
COPY --from=second /out/artifact /from-second
COPY --from={BASE} /www/index.html /from-image.html
"#;

/// Stage names are case-insensitive in Docker (BuildKit lowercases them, and `--target` and
/// `--from` with them); buildah 1.28 matches them case-sensitively, so it gets the names
/// spelled as declared.
fn multi_for_buildah() -> String {
    MULTI
        .replace("{BASE}", &base())
        .replace("--from=BUILDER", "--from=Builder")
        .replace("FROM builder AS", "FROM Builder AS")
        .replace("--from=second", "--from=Second")
}

#[test]
fn multi_stage_copies_from_names_indexes_and_images() {
    let p = Pair::new();
    let ctx = Ctx::new(&MULTI.replace("{BASE}", &base()));
    let bctx = Ctx::new(&multi_for_buildah());
    // The last stage is the target: the broken stage is not needed, so neither builds it.
    let (a, _) = p.same_as(ctx.path(), &[], bctx.path(), &[]);
    assert_eq!(a.file("from-second").data, sha("built\nsecond\n"));
    assert_eq!(a.file("from-name").mode, 0o640);
}

#[test]
fn target_builds_only_the_stages_it_needs() {
    let p = Pair::new();
    let ctx = Ctx::new(&MULTI.replace("{BASE}", &base()));
    let bctx = Ctx::new(&multi_for_buildah());
    let (a, _) = p.same_as(ctx.path(), &["--target", "SECOND"], bctx.path(), &["--target", "Second"]);
    assert_eq!(a.file("out/artifact").data, sha("built\nsecond\n"));
}

#[test]
fn copy_chown_chmod_and_context_modes() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        r#"FROM {}
RUN echo 'svc:x:2001:2002::/:/bin/sh' >> /etc/passwd && echo 'svcg:x:2002:' >> /etc/group && chmod 0700 /www
COPY --chown=app:app a.txt /owned/by-names
COPY --chown=svc:svcg a.txt /owned/by-names-2
COPY --chown=1234:5678 a.txt /owned/numeric
COPY --chown=app:5678 a.txt /owned/name-and-gid
COPY --chown=app:app dir/ /owned/dir/
COPY --chmod=0751 run.sh /perm/run.sh
COPY --chmod=600 a.txt b.txt /perm/
COPY dir/ /plain/
COPY dir /plain2
COPY *.txt /glob/
COPY dir/sub/deep.txt /new/parents/deep.txt
COPY foreign.txt /foreign.txt
COPY a.txt /tmp/
COPY --chown=app:app dir /home/app/
COPY --chmod=700 dir/ /perm-dir/
COPY --chmod=700 dir /perm-dir-no-slash
COPY --from={} /www/ /www-copy/
COPY --from={} /www /www-copy-no-slash
"#,
        base(),
        base(),
        base()
    ));
    ctx.file("a.txt", "a\n", 0o644)
        .file("b.txt", "b\n", 0o600)
        .file("run.sh", "#!/bin/sh\necho run\n", 0o644)
        .file("dir/x", "x\n", 0o755)
        .file("dir/sub/deep.txt", "deep\n", 0o640)
        .file("foreign.txt", "owned by someone on the host\n", 0o664);
    std::os::unix::fs::symlink("sub/deep.txt", ctx.path().join("dir/link")).expect("symlink");
    fs::set_permissions(ctx.path().join("dir/sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
    fs::set_permissions(ctx.path().join("dir"), fs::Permissions::from_mode(0o711)).expect("chmod");
    // Context files are root's in the image whoever owns them on the host.
    std::os::unix::fs::chown(ctx.path().join("foreign.txt"), Some(777), Some(778)).expect("chown");
    let (a, _) = p.same(ctx.path(), &[]);
    let n = a.file("owned/numeric");
    assert_eq!((n.uid, n.gid), (1234, 5678));
    assert_eq!(a.file("foreign.txt").uid, 0);
}

#[test]
fn chown_with_only_a_user() {
    // Docker documents `--chown=user` (no group) as giving the uid as the gid too ("a UID
    // without GID will use the same numeric UID as the GID"), names included.
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        "FROM {}\nRUN echo 'svc:x:2001:2002::/:/bin/sh' >> /etc/passwd && echo 'svcg:x:2002:' >> /etc/group\nCOPY --chown=4321 a.txt /numeric-only\nCOPY --chown=app a.txt /name-only\nCOPY --chown=svc a.txt /name-other-group\n",
        base()
    ));
    ctx.file("a.txt", "a\n", 0o644);
    let (a, _) = p.same(ctx.path(), &[]);
    let n = a.file("numeric-only");
    assert_eq!((n.uid, n.gid), (4321, 4321));
}

fn tar_gz(entries: &[(&str, &str, u32, u64)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (path, data, mode, id) in entries {
        let mut h = tar::Header::new_gnu();
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
        } else {
            h.set_size(data.len() as u64);
        }
        h.set_mode(*mode);
        h.set_uid(*id);
        h.set_gid(*id);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data.as_bytes()).expect("tar entry");
    }
    b.into_inner().expect("tar").finish().expect("gzip")
}

#[test]
fn add_extracts_local_archives() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        "FROM {}\nADD app.tar.gz /extracted/\nADD app.tar.gz /extracted-no-slash\nADD plain.txt /added.txt\nADD --chown=1000:1000 app.tar.gz /chowned/\nADD app.tar.gz /tmp/\nADD app.tar.gz /home/app\n",
        base()
    ));
    let tgz = tar_gz(&[
        ("top/", "", 0o750, 1500),
        ("top/file.txt", "in the archive\n", 0o640, 1500),
        ("top/bin.sh", "#!/bin/sh\n", 0o755, 0),
        ("root.txt", "at the root\n", 0o600, 42),
    ]);
    ctx.bytes("app.tar.gz", &tgz, 0o644).file("plain.txt", "plain\n", 0o644);
    let (a, _) = p.same(ctx.path(), &[]);
    assert_eq!(a.file("extracted/top/file.txt").uid, 1500, "ADD keeps the archive's owners");
    assert_eq!(a.file("tmp").mode, 0o1777, "extracting into a directory leaves it as it was");
}

#[test]
fn workdir_and_user() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        r#"FROM {}
WORKDIR /a
WORKDIR b
WORKDIR ../c
ENV DIRNAME=d
WORKDIR $DIRNAME
RUN pwd > /pwd.txt
COPY f.txt rel.txt
USER app
RUN id -u -n > /tmp/id.txt && id -g -n >> /tmp/id.txt && touch /tmp/by-app && grep Groups /proc/self/status > /tmp/groups.txt
WORKDIR /home/app/work
RUN touch made-here
USER 1234:5678
RUN touch /tmp/by-numeric
USER app:root
COPY f.txt /copied-after-user.txt
"#,
        base()
    ));
    ctx.file("f.txt", "f\n", 0o644);
    let (a, b) = p.same(ctx.path(), &[]);
    // The primary group is among the supplementary groups, as with Docker since CVE-2022-36109.
    assert_eq!(b.file("tmp/groups.txt").data, sha("Groups:\t1000 \n"), "berth: groups of app");
    assert_eq!(a.file("pwd.txt").data, sha("/a/c/d\n"));
    let n = a.file("tmp/by-app");
    assert_eq!((n.uid, n.gid), (1000, 1000), "USER app resolves in the image's passwd");
}

#[test]
fn dockerignore_with_exceptions() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!("FROM {}\nCOPY . /ctx/\n", base()));
    ctx.file(
        ".dockerignore",
        "# comment\n*.log\nsecret/\ndocs/**\n!docs/keep.md\n**/*.tmp\n!important.log\n/abs.txt\n",
        0o644,
    )
    .file("a.log", "a\n", 0o644)
    .file("important.log", "kept\n", 0o644)
    .file("secret/key", "k\n", 0o600)
    .file("docs/a.md", "a\n", 0o644)
    .file("docs/keep.md", "keep\n", 0o644)
    .file("docs/deeper/b.md", "b\n", 0o644)
    .file("sub/x.tmp", "x\n", 0o644)
    .file("sub/y.txt", "y\n", 0o644)
    .file("x.tmp", "x\n", 0o644)
    .file("abs.txt", "abs\n", 0o644)
    .file("keep.txt", "keep\n", 0o644);
    let (a, _) = p.same(ctx.path(), &[]);
    assert!(a.tree.contains_key("ctx/docs/keep.md") && !a.tree.contains_key("ctx/secret/key"));
}

#[test]
fn onbuild_triggers_fire_in_the_child() {
    let p = Pair::new();
    let parent = Ctx::new(&format!(
        "FROM {}\nONBUILD COPY trigger.txt /from-trigger.txt\nONBUILD RUN echo fired > /onbuild-fired\nONBUILD ENV TRIGGERED=yes\nLABEL parent=yes\n",
        base()
    ));
    let ptag = format!("{}/diff/onbuild-parent-{}:latest", anon(), std::process::id());
    p.build(parent.path(), &ptag, &[]);
    let (a, b) = p.images(&ptag);
    assert_same(&a, &b);
    assert_eq!(a.config["config"]["OnBuild"].as_array().map(Vec::len), Some(3));
    let child = Ctx::new(&format!("FROM {ptag}\nRUN cat /from-trigger.txt > /copy-of-trigger\n"));
    child.file("trigger.txt", "from the child's context\n", 0o644);
    let (a, _) = p.same(child.path(), &[]);
    assert_eq!(a.file("onbuild-fired").data, sha("fired\n"));
    assert_eq!(a.file("copy-of-trigger").data, sha("from the child's context\n"));
}

#[test]
fn run_deletions_become_whiteouts() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        r#"FROM {}
RUN rm -rf /www/cgi-bin /home/app/.profile && mkdir -p /newdir/sub && echo x > /newdir/f && echo keep > /newdir/sub/k
RUN rm -rf /newdir && mkdir /newdir && echo y > /newdir/g
RUN rm /www/index.html && mkdir /www/index.html && ln -s ../second.txt /www/index.html/link
RUN ln /www/second.txt /hard && ln -s /nowhere /dangling && mkfifo /fifo && chmod 4755 /hard
"#,
        base()
    ));
    let (a, _) = p.same(ctx.path(), &[]);
    assert!(!a.tree.contains_key("www/cgi-bin/env") && !a.tree.contains_key("newdir/f"));
}

#[test]
fn heredocs_and_shell() {
    // buildah 1.28 predates heredoc support (added in 1.33), so its Dockerfile spells the same
    // steps without heredocs; berth builds the heredoc one. buildah also ignores SHELL for the
    // shell forms of CMD and ENTRYPOINT, which Docker documents SHELL as applying to ("RUN,
    // CMD and ENTRYPOINT"), so its CMD is written in the exec form Docker makes of it. Docker documents the heredoc forms:
    // `RUN <<EOF` runs the body with the shell, `COPY <<EOF` writes it as a file (variables
    // expanded unless the word is quoted).
    let p = Pair::new();
    let heredoc = format!(
        r#"# syntax=docker/dockerfile:1
FROM {}
ARG NAME=world
RUN <<EOF
echo "hello $NAME" > /heredoc-run.txt
echo second line >> /heredoc-run.txt
EOF
RUN cat > /heredoc-stdin.txt <<EOT
stdin $NAME
EOT
COPY <<EOF /heredoc-copy.txt
literal $NAME
EOF
COPY <<"EOF" /heredoc-quoted.txt
not expanded $NAME
EOF
SHELL ["/bin/sh", "-ec"]
RUN echo "shell $0" > /shell.txt
CMD echo cmd shell form
"#,
        base()
    );
    let plain = format!(
        r#"FROM {}
ARG NAME=world
RUN echo "hello $NAME" > /heredoc-run.txt && echo second line >> /heredoc-run.txt
RUN echo "stdin $NAME" > /heredoc-stdin.txt
COPY heredoc-copy.txt heredoc-quoted.txt /
SHELL ["/bin/sh", "-ec"]
RUN echo "shell $0" > /shell.txt
CMD ["/bin/sh", "-ec", "echo cmd shell form"]
"#,
        base()
    );
    let hctx = Ctx::new(&heredoc);
    let pctx = Ctx::new(&plain);
    pctx.file("heredoc-copy.txt", "literal world\n", 0o644).file("heredoc-quoted.txt", "not expanded $NAME\n", 0o644);
    let tag = format!("{}/diff/heredoc-{}:latest", anon(), std::process::id());
    p.buildah.build(pctx.path(), &tag, &[]);
    p.berth.ok(&["build", "-t", &tag, &hctx.path().display().to_string()]);
    let (a, b) = p.images(&tag);
    assert_same(&a, &b);
    assert_eq!(b.file("shell.txt").data, sha("shell /bin/sh\n"));
    assert_eq!(
        b.config["config"]["Cmd"],
        serde_json::json!(["/bin/sh", "-ec", "echo cmd shell form"]),
        "the shell form goes through SHELL"
    );
}

#[test]
fn image_config_instructions() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        r#"FROM {}
EXPOSE 80 443/tcp 53/udp 8000-8001
VOLUME /data ["/logs", "/cache"]
VOLUME /more /andmore
LABEL a=b c="d e"
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --timeout=2s --start-period=1s --retries=4 CMD wget -q -O- http://localhost/ || exit 1
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo hi"]
"#,
        base()
    ));
    p.same(ctx.path(), &[]);
}

#[test]
fn entrypoint_shell_form_drops_the_base_cmd() {
    let p = Pair::new();
    let ctx = Ctx::new(&format!(
        "FROM {}\nSHELL [\"/bin/sh\", \"-xc\"]\nENTRYPOINT exec httpd -f -p 80\nHEALTHCHECK CMD [\"true\"]\nUSER nobody\n",
        base()
    ));
    // buildah ignores SHELL for ENTRYPOINT's shell form; Docker documents that SHELL applies
    // to it, so buildah gets the exec form Docker makes of it.
    let bctx = Ctx::new(&format!(
        "FROM {}\nSHELL [\"/bin/sh\", \"-xc\"]\nENTRYPOINT [\"/bin/sh\", \"-xc\", \"exec httpd -f -p 80\"]\nHEALTHCHECK CMD [\"true\"]\nUSER nobody\n",
        base()
    ));
    let (a, _) = p.same_as(ctx.path(), &[], bctx.path(), &[]);
    assert!(config_fields(&a)["Cmd"].is_null(), "a new ENTRYPOINT drops the base image's CMD");
    // A child turning the health check off.
    let tag = format!("{}/diff/hc-{}:latest", anon(), std::process::id());
    p.buildah.build(bctx.path(), &tag, &[]);
    p.berth.ok(&["build", "-t", &tag, &ctx.path().display().to_string()]);
    let child = Ctx::new(&format!("FROM {tag}\nHEALTHCHECK NONE\nCMD [\"x\"]\n"));
    p.same(child.path(), &[]);
}
