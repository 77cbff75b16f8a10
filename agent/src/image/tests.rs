//! Tests of the image store without a network: loads of OCI layouts and docker-archives built
//! here, records and references, removal, GC keeping shared layers, concurrent unpacks, and a
//! pull from the scripted registry of the registry tests.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;

use flate2::write::GzEncoder;

use super::*;
use crate::registry::tests::{resp, Content, Mock};

/// An uncompressed layer tar of regular files (and directories for paths ending in '/').
fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
        }
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn config_json(diff_ids: &[Digest], cmd: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2024-05-06T07:08:09Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "ExposedPorts": {"8080/tcp": {}}, "Labels": {"a": "b"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// An image as blobs: (manifest bytes, config bytes, layer blobs); layers gzip-compressed.
struct Built {
    manifest: Vec<u8>,
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
}

impl Built {
    fn new(tars: &[Vec<u8>], cmd: &[&str]) -> Built {
        let diff_ids: Vec<Digest> = tars.iter().map(|t| Digest::of(t)).collect();
        let config = config_json(&diff_ids, cmd);
        let layers: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST,
            "config": {"mediaType": manifest::OCI_CONFIG, "digest": Digest::of(&config), "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({"mediaType": manifest::OCI_LAYER_GZIP, "digest": Digest::of(l), "size": l.len()})).collect::<Vec<_>>(),
        }))
        .unwrap();
        Built { manifest, config, layers }
    }

    fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }

    fn id(&self) -> Digest {
        Digest::of(&self.config)
    }

    fn blobs(&self) -> Vec<&Vec<u8>> {
        let mut v = vec![&self.manifest, &self.config];
        v.extend(self.layers.iter());
        v
    }
}

/// Tarball entries: (path, content).
type Entries = Vec<(String, Vec<u8>)>;
/// A PUT seen by a scripted registry: (path, digest query, body).
type Put = (String, String, Vec<u8>);

/// A tarball of `entries` (path, content); gzip-compressed if asked.
fn tarball(entries: &[(String, Vec<u8>)], gz: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    let t = b.into_inner().unwrap();
    if gz {
        gzip(&t)
    } else {
        t
    }
}

/// An OCI layout tarball's entries for images with optional `ref.name`s.
fn oci_layout(images: &[(&Built, Option<&str>)]) -> Vec<(String, Vec<u8>)> {
    let mut entries = vec![("oci-layout".to_string(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())];
    let manifests: Vec<_> = images
        .iter()
        .map(|(b, name)| {
            let mut d = serde_json::json!({"mediaType": manifest::OCI_MANIFEST, "digest": b.digest(), "size": b.manifest.len()});
            if let Some(n) = name {
                d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": n});
            }
            d
        })
        .collect();
    entries.push((
        "index.json".into(),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests})).unwrap(),
    ));
    for (b, _) in images {
        for blob in b.blobs() {
            entries.push((format!("blobs/sha256/{}", Digest::of(blob).hex()), blob.clone()));
        }
    }
    entries
}

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Store,
}

fn env() -> Env {
    env_with(&Config::default())
}

fn env_with(config: &Config) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let store = Store::open(&root, config).unwrap();
    Env { _dir: dir, root, store }
}

impl Env {
    async fn load(&self, entries: &[(String, Vec<u8>)], gz: bool) -> Result<Vec<Image>> {
        let path = self.root.join(format!("in-{}.tar", store::random_suffix()));
        std::fs::write(&path, tarball(entries, gz)).unwrap();
        let r = self.store.load(&path).await;
        std::fs::remove_file(&path).unwrap();
        r
    }

    fn layer_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

fn base() -> Vec<u8> {
    layer_tar(&[("bin/", b""), ("bin/sh", b"#!fake shell"), ("etc/", b""), ("etc/os-release", b"ID=test\n")])
}

#[tokio::test]
async fn load_oci_layout_and_get() {
    let e = env();
    let app = layer_tar(&[("app/", b""), ("app/run", b"run run run")]);
    let img = Built::new(&[base(), app.clone()], &["/app/run"]);
    let loaded = e.load(&oci_layout(&[(&img, Some("registry.local:5000/team/app:v1"))]), true).await.unwrap();
    assert_eq!(loaded.len(), 1);
    let i = &loaded[0];
    assert_eq!(i.id, img.id());
    assert_eq!(i.manifest_digest, img.digest());
    assert_eq!(i.references, ["registry.local:5000/team/app:v1"]);
    assert_eq!(i.config.cmd, Some(vec!["/app/run".to_string()]));
    assert_eq!(i.config.exposed_ports, ["8080/tcp"]);
    assert_eq!(i.created.as_deref(), Some("2024-05-06T07:08:09Z"));
    assert_eq!(i.layers.len(), 2);
    assert_eq!(fs::read(i.layers[0].join("bin/sh")).unwrap(), b"#!fake shell");
    assert_eq!(fs::read(i.layers[1].join("app/run")).unwrap(), b"run run run");
    // Short layer directory names: 16 hex digits of the layer blob digest.
    assert_eq!(i.layers[1], e.root.join("layers").join(&Digest::of(&img.layers[1]).hex()[..16]).join("diff"));
    assert_eq!(i.size, (12 + 8 + 11) as u64);
    let meta: LayerMeta = serde_json::from_slice(
        &fs::read(e.root.join("layers").join(&Digest::of(&img.layers[1]).hex()[..16]).join("layer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta.diff_id, Digest::of(&app));

    // Every way of naming it.
    for name in [
        "registry.local:5000/team/app:v1".to_string(),
        format!("registry.local:5000/team/app@{}", img.digest()),
        img.id().to_string(),
        img.id().hex().to_string(),
        img.id().hex()[..4].to_string(),
        format!("sha256:{}", &img.id().hex()[..8]),
        img.digest().to_string(),
    ] {
        assert_eq!(e.store.get(&name).unwrap_or_else(|err| panic!("{name}: {err}")), *i, "{name}");
    }
    for name in ["registry.local:5000/team/app:v2", "busybox", &img.id().hex()[..3], "zzzz", ""] {
        let err = e.store.get(name).unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{name}: {err}");
    }
    assert!(e.store.get("busybox").unwrap_err().to_string().contains("docker.io/library/busybox:latest"));
    assert_eq!(e.store.list().unwrap(), loaded);

    // Image serialises for the CLI's --json.
    let json = serde_json::to_value(i).unwrap();
    assert_eq!(json["id"], img.id().to_string());
    assert_eq!(json["config"]["exposed_ports"][0], "8080/tcp");

    // Loading again changes nothing and reuses the layers.
    let again = e.load(&oci_layout(&[(&img, Some("registry.local:5000/team/app:v1"))]), false).await.unwrap();
    assert_eq!(again, loaded);
    assert_eq!(e.layer_dirs().len(), 2);
}

#[tokio::test]
async fn load_names_and_untagged() {
    let e = env();
    let a = Built::new(&[base()], &["a"]);
    let b = Built::new(&[layer_tar(&[("b", b"b")])], &["b"]);
    // A bare word in ref.name is only a tag (skopeo's and umoci's `oci:dir:latest`): no name.
    let loaded = e
        .load(&oci_layout(&[(&a, Some("library/busybox")), (&b, Some("latest")), (&a, Some("other:1"))]), false)
        .await
        .unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0].references, ["docker.io/library/busybox:latest", "docker.io/library/other:1"]);
    assert!(loaded[1].references.is_empty());
    // "busybox" finds docker.io/library/busybox:latest.
    assert_eq!(e.store.get("busybox").unwrap().id, a.id());
    assert_eq!(e.store.get("docker.io/library/other:1").unwrap().id, a.id());
    // The untagged one is listed (last) and found by id.
    let list = e.store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[1].references.is_empty());
    assert_eq!(e.store.get(&b.id().hex()[..10]).unwrap().id, b.id());
    let tagged = e.store.tag(&b.id().hex()[..10], &"registry.local/b:x".parse().unwrap()).unwrap();
    assert_eq!(tagged.references, ["registry.local/b:x"]);
}

#[tokio::test]
async fn load_docker_archive() {
    let e = env();
    let l1 = base();
    let l2 = layer_tar(&[("srv/", b""), ("srv/index.html", b"<h1>hi</h1>")]);
    let config = config_json(&[Digest::of(&l1), Digest::of(&l2), Digest::of(&l1)], &["httpd"]);
    let manifest = serde_json::json!([{
        "Config": "cfg.json",
        "RepoTags": ["web:1.0", "localhost:5000/web:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]);
    // ccc/layer.tar is a symlink to aaa's, as docker save writes repeated layers.
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("cfg.json", config.clone()),
        ("aaa/VERSION", b"1.0".to_vec()),
        ("aaa/layer.tar", l1.clone()),
        ("bbb/layer.tar", l2.clone()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "ccc/layer.tar", "../aaa/layer.tar").unwrap();
    let path = e.root.join("save.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();

    let loaded = e.store.load(&path).await.unwrap();
    assert_eq!(loaded.len(), 1);
    let i = &loaded[0];
    assert_eq!(i.id, Digest::of(&config));
    assert_eq!(i.references, ["docker.io/library/web:1.0", "localhost:5000/web:latest"]);
    // The repeated bottom layer is stacked once, at its top position.
    assert_eq!(i.layers.len(), 2);
    assert_eq!(fs::read(i.layers[0].join("srv/index.html")).unwrap(), b"<h1>hi</h1>");
    assert!(i.layers[1].join("bin/sh").is_file());
    // Layers kept as they came (uncompressed): the blob digest is the diff_id.
    let m: registry::Manifest = serde_json::from_slice(&e.store.blobs().read(&i.manifest_digest).unwrap()).unwrap();
    assert_eq!(m.layers[0].digest, Digest::of(&l1));
    assert_eq!(m.layers[0].media_type, manifest::OCI_LAYER_TAR);
    assert_eq!(m.config.digest, i.id);
    // Loading the same archive twice gives the same manifest (digest).
    assert_eq!(e.store.load(&path).await.unwrap()[0].manifest_digest, i.manifest_digest);
}

#[tokio::test]
async fn malformed_archives_record_nothing() {
    let e = env();
    let img = Built::new(&[base(), layer_tar(&[("x", b"x")])], &["x"]);
    let good = oci_layout(&[(&img, Some("app:1"))]);
    let without = |suffix: &str| -> Vec<(String, Vec<u8>)> {
        good.iter().filter(|(p, _)| !p.ends_with(suffix)).cloned().collect()
    };
    let layer2 = Digest::of(&img.layers[1]);

    let cases: Vec<(Entries, String)> =
        vec![
            (vec![("hello.txt".into(), b"hi".to_vec())], "neither index.json".into()),
            (without(layer2.hex()), format!("layer 2 of 2 ({layer2}) is not in the archive")),
            (without(img.id().hex()), format!("its config {} is not in the archive", img.id())),
            (without(img.digest().hex()), format!("{} is listed in an index but not in the archive", img.digest())),
            (
                good.iter()
                    .map(
                        |(p, d)| {
                            if p == "index.json" {
                                (p.clone(), b"{not json".to_vec())
                            } else {
                                (p.clone(), d.clone())
                            }
                        },
                    )
                    .collect(),
                "index.json is not a valid OCI image index".into(),
            ),
            (
                good.iter()
                    .map(|(p, d)| {
                        if p.ends_with(layer2.hex()) {
                            (p.clone(), b"tampered".to_vec())
                        } else {
                            (p.clone(), d.clone())
                        }
                    })
                    .collect(),
                "does not match its name".into(),
            ),
            (
                vec![("manifest.json".into(), br#"[{"Config":"c.json","Layers":["l.tar"]}]"#.to_vec())],
                "names config \"c.json\", which is not in the archive".into(),
            ),
        ];
    for (entries, want) in cases {
        // A fresh store each time: a blob the store already has need not be in the archive.
        let e = env();
        let err = e.load(&entries, false).await.unwrap_err().to_string();
        assert!(err.contains(&want), "{err:?} lacks {want:?}");
        assert!(err.starts_with("malformed image archive"), "{err}");
        assert!(e.store.list().unwrap().is_empty());
    }
    // Not a tar at all.
    let path = e.root.join("junk");
    fs::write(&path, vec![0x42u8; 3000]).unwrap();
    assert!(e.store.load(&path).await.unwrap_err().to_string().contains("malformed image archive"));

    // A layer whose content does not match the config's diff_id.
    let mut lying = Built::new(&[base()], &["x"]);
    let other = gzip(&layer_tar(&[("evil", b"evil")]));
    let mut m: serde_json::Value = serde_json::from_slice(&lying.manifest).unwrap();
    m["layers"][0]["digest"] = serde_json::json!(Digest::of(&other));
    m["layers"][0]["size"] = serde_json::json!(other.len());
    lying.manifest = serde_json::to_vec(&m).unwrap();
    lying.layers = vec![other];
    let err = e.load(&oci_layout(&[(&lying, Some("lying:1"))]), false).await.unwrap_err();
    assert!(matches!(err, Error::DiffId { .. }), "{err}");

    assert!(e.store.list().unwrap().is_empty());
    // No unpack leftovers either.
    assert!(e.layer_dirs().iter().all(|d| !d.starts_with(".tmp-")), "{:?}", e.layer_dirs());
}

#[tokio::test]
async fn remove_and_gc_keep_shared_layers() {
    let e = env();
    let shared = base();
    let a = Built::new(&[shared.clone(), layer_tar(&[("a", b"a")])], &["a"]);
    let b = Built::new(&[shared.clone(), layer_tar(&[("b", b"b")])], &["b"]);
    let c = Built::new(&[layer_tar(&[("c", b"c")])], &["c"]);
    e.load(&oci_layout(&[(&a, Some("a:1")), (&b, Some("b:1")), (&c, Some("c:1"))]), false).await.unwrap();
    e.store.tag("a:1", &"a:2".parse().unwrap()).unwrap();
    assert_eq!(e.layer_dirs().len(), 4, "the shared layer is unpacked once");
    let blobs_before = e.store.blobs().list().unwrap().len();
    // Manifest, config and layers of each; the shared layer once.
    assert_eq!(blobs_before, 4 + 4 + 3 - 1);

    // Nothing unreferenced yet.
    assert_eq!(e.store.gc(&HashSet::new()).unwrap(), GcReport::default());

    // Untag by reference: one reference at a time.
    assert_eq!(e.store.remove("a:1").unwrap(), ["docker.io/library/a:1"]);
    assert_eq!(e.store.get("a:2").unwrap().id, a.id());
    assert!(matches!(e.store.remove("a:1"), Err(Error::NotFound(_))));
    // By id: every reference.
    assert_eq!(e.store.remove(&a.id().hex()[..12]).unwrap(), ["docker.io/library/a:2"]);
    // Untagged but in use by a container: kept.
    let in_use: HashSet<Digest> = [a.id()].into();
    let r = e.store.gc(&in_use).unwrap();
    assert_eq!(r, GcReport::default());
    assert!(e.store.get(a.id().as_str()).unwrap().references.is_empty());

    // While a pull runs somewhere (it holds the GC lock shared), only records go: the
    // files may be what that pull is about to record.
    let pulling = records::lock(&e.root.join("images/gc.lock"), false).unwrap();
    let r = e.store.gc(&HashSet::new()).unwrap();
    assert_eq!((r.removed_images, r.removed_layers, r.removed_blobs), (1, 0, 0));
    assert!(matches!(e.store.get(a.id().as_str()), Err(Error::NotFound(_))));
    drop(pulling);

    // Then a's own layer and its blobs go; the shared layer stays.
    let r = e.store.gc(&HashSet::new()).unwrap();
    assert_eq!((r.removed_images, r.removed_layers, r.removed_blobs), (0, 1, 3));
    assert!(r.freed_bytes > 0);
    assert!(matches!(e.store.get(a.id().as_str()), Err(Error::NotFound(_))));
    let bi = e.store.get("b:1").unwrap();
    assert!(bi.layers.iter().all(|l| l.is_dir()));
    assert!(bi.layers[0].join("bin/sh").is_file());
    assert_eq!(e.layer_dirs().len(), 3);

    // Removing b too frees the shared layer; c is untouched.
    e.store.remove("b:1").unwrap();
    let r = e.store.gc(&HashSet::new()).unwrap();
    assert_eq!((r.removed_images, r.removed_layers, r.removed_blobs), (1, 2, 4));
    assert_eq!(e.layer_dirs().len(), 1);
    let ci = e.store.get("c:1").unwrap();
    assert!(ci.layers[0].join("c").is_file());
    assert_eq!(e.store.blobs().list().unwrap().len(), 3);
    assert_eq!(e.store.list().unwrap().len(), 1);
}

#[test]
fn concurrent_unpacks_of_one_layer() {
    let e = env();
    let tar = base();
    let blob = gzip(&tar);
    let digest = e.store.blobs().put_bytes(&blob).unwrap();
    let l = LayerRecord {
        digest: digest.clone(),
        media_type: manifest::OCI_LAYER_GZIP.into(),
        size: blob.len() as u64,
        diff_id: Digest::of(&tar),
    };
    // Separate Store values stand in for separate processes.
    let stores: Vec<Store> = (0..4).map(|_| Store::open(&e.root, &Config::default()).unwrap()).collect();
    std::thread::scope(|s| {
        for st in &stores {
            let l = l.clone();
            s.spawn(move || st.unpack_layer("test", &l).unwrap());
        }
    });
    assert_eq!(e.layer_dirs(), [digest.hex()[..16].to_string()]);
    assert!(e.root.join("layers").join(&digest.hex()[..16]).join("diff/bin/sh").is_file());

    // A wrong diff_id is refused and leaves nothing.
    let e2 = env();
    e2.store.blobs().put_bytes(&blob).unwrap();
    let wrong = LayerRecord { diff_id: Digest::of(b"nope"), ..l };
    assert!(matches!(e2.store.unpack_layer("test", &wrong), Err(Error::DiffId { .. })));
    assert!(e2.layer_dirs().is_empty());
}

#[test]
fn killed_unpacks_are_cleaned_on_open() {
    let e = env();
    let stale = e.root.join("layers/.tmp-0123456789abcdef-00");
    fs::create_dir_all(stale.join("diff/x")).unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    File::open(&stale).unwrap().set_modified(old).unwrap();
    // One still being unpacked by a live process (locked).
    let live = e.root.join("layers/.tmp-fedcba9876543210-11");
    fs::create_dir_all(&live).unwrap();
    let held = File::open(&live).unwrap();
    rustix::fs::flock(&held, FlockOperation::LockExclusive).unwrap();
    File::open(&live).unwrap().set_modified(old).unwrap();
    Store::open(&e.root, &Config::default()).unwrap();
    assert!(!stale.exists());
    assert!(live.exists());
}

#[test]
fn index_survives_and_reports_corruption() {
    let e = env();
    fs::write(e.root.join("images/index.json"), b"{oops").unwrap();
    let err = e.store.list().unwrap_err().to_string();
    assert!(err.contains("index.json") && err.contains("corrupt"), "{err}");
}

#[tokio::test]
async fn pull_from_registry() {
    let tars = [base(), layer_tar(&[("app", b"app")]), layer_tar(&[("more", b"more")])];
    let img = Built::new(&tars, &["/app"]);
    let mut content = Content::default().manifest(Some("v1"), &img.manifest, manifest::OCI_MANIFEST).blob(&img.config);
    for l in &img.layers {
        content = content.blob(l);
    }
    let mock = Mock::start(move |req, _| content.serve(req)).await;
    let e = env();
    let r: Reference = format!("{}/team/app:v1", mock.host).parse().unwrap();
    let events = Mutex::new(Vec::new());
    let image = e.store.pull(&r, &|p| events.lock().unwrap().push(p)).await.unwrap();
    assert_eq!(image.id, img.id());
    assert_eq!(image.manifest_digest, img.digest());
    assert_eq!(image.references, [r.to_string()]);
    assert_eq!(image.layers.len(), 3);
    assert!(image.layers[1].join("app").is_file());
    assert_eq!(e.store.get(&r.to_string()).unwrap(), image);

    let events = events.into_inner().unwrap();
    assert!(matches!(&events[0], Progress::Resolved { layers: 3, digest, .. } if *digest == img.digest()));
    for l in &img.layers {
        let d = Digest::of(l);
        let kinds: Vec<&str> = events
            .iter()
            .filter_map(|ev| match ev {
                Progress::LayerStarted { digest, .. } if *digest == d => Some("started"),
                Progress::LayerBytes { digest, done, total } if *digest == d && done == total => Some("bytes"),
                Progress::LayerDone { digest } if *digest == d => Some("done"),
                Progress::LayerUnpacked { digest } if *digest == d => Some("unpacked"),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["started", "bytes", "done", "unpacked"]);
    }

    // Pulled again: everything cached, and the registry only asked for the manifest.
    let before = mock.requests().len();
    let cached = Mutex::new(0);
    e.store
        .pull(&r, &|p| {
            if matches!(p, Progress::LayerCached { .. }) {
                *cached.lock().unwrap() += 1
            }
        })
        .await
        .unwrap();
    assert_eq!(*cached.lock().unwrap(), 3);
    assert_eq!(mock.requests().len(), before + 1);

    // A tag that does not exist.
    let err =
        e.store.pull(&format!("{}/team/app:nope", mock.host).parse().unwrap(), &|_| {}).await.unwrap_err().to_string();
    assert!(err.contains("manifest unknown") && err.contains(":nope"), "{err}");

    // A config whose diff_ids do not match the layers: refused, nothing recorded.
    let mut bad = Built::new(&tars[..1], &["x"]);
    bad.config = config_json(&[Digest::of(b"not the layer")], &["x"]);
    let mut m: serde_json::Value = serde_json::from_slice(&bad.manifest).unwrap();
    m["config"]["digest"] = serde_json::json!(Digest::of(&bad.config));
    m["config"]["size"] = serde_json::json!(bad.config.len());
    bad.manifest = serde_json::to_vec(&m).unwrap();
    let mut content = Content::default().manifest(Some("bad"), &bad.manifest, manifest::OCI_MANIFEST).blob(&bad.config);
    for l in &bad.layers {
        content = content.blob(l);
    }
    let mock2 = Mock::start(move |req, _| content.serve(req)).await;
    let e2 = env();
    let err = e2.store.pull(&format!("{}/x:bad", mock2.host).parse().unwrap(), &|_| {}).await.unwrap_err();
    assert!(matches!(err, Error::DiffId { .. }), "{err}");
    assert!(e2.store.list().unwrap().is_empty());

    // Not an image (a Helm chart, say).
    let chart = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": Digest::of(b"{}"), "size": 2}, "layers": []})).unwrap();
    let content = Content::default().manifest(Some("chart"), &chart, manifest::OCI_MANIFEST);
    let mock3 = Mock::start(move |req, _| content.serve(req)).await;
    let err =
        e2.store.pull(&format!("{}/c:chart", mock3.host).parse().unwrap(), &|_| {}).await.unwrap_err().to_string();
    assert!(err.contains("not a container image"), "{err}");
    let _ = resp(200);
}

#[tokio::test]
async fn push_sends_stored_manifest() {
    let e = env();
    let img = Built::new(&[base()], &["x"]);
    e.load(&oci_layout(&[(&img, Some("app:1"))]), false).await.unwrap();
    let got: Arc<Mutex<Vec<Put>>> = Arc::default();
    let g = got.clone();
    let mock = Mock::start(move |req, host| {
        let p = req.path().to_string();
        match req.method.as_str() {
            "HEAD" => resp(404),
            "POST" => resp(202).header("location", &format!("http://{host}/up/{}", g.lock().unwrap().len())),
            "PUT" => {
                g.lock().unwrap().push((p, req.query("digest").join(""), req.body.clone()));
                resp(201)
            }
            _ => resp(400),
        }
    })
    .await;
    let dest: Reference = format!("{}/pushed/app:2", mock.host).parse().unwrap();
    e.store.push("app:1", &dest).await.unwrap();
    let got = got.lock().unwrap().clone();
    let blobs: HashSet<String> = got
        .iter()
        .filter(|(p, ..)| p.starts_with("/up/"))
        .map(|(_, d, body)| {
            assert_eq!(Digest::of(body).to_string(), *d);
            d.clone()
        })
        .collect();
    assert_eq!(blobs, [img.id().to_string(), Digest::of(&img.layers[0]).to_string()].into());
    let (path, _, body) = got.last().unwrap();
    assert_eq!(path, "/v2/pushed/app/manifests/2");
    assert_eq!(*body, img.manifest, "the manifest goes byte for byte");
}
