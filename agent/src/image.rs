//! The image store at `<data-dir>`: pulls images (blobs into `blobs/`, each layer unpacked once
//! into `layers/<id>/diff` and shared by every image using it), records and tags them in
//! `images/index.json`, lists, removes, garbage-collects, loads tarballs and pushes.
//!
//! Several berth processes may share a data dir. Every metadata file is replaced whole
//! (write, fsync, rename); the index's read-modify-write happens under an `flock`; a layer is
//! unpacked into a private `.tmp-` directory and renamed into place, the first process to
//! finish winning. See [`records`] for how garbage collection stays out of a running pull's way.

mod archive;
mod config;
mod records;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::digest::Digest;
use crate::layer;
use crate::reference::Reference;
use crate::registry::{self, manifest, Descriptor, Platform};
use crate::store;

pub use config::ImageConfig;
pub use records::LayerRecord;
use records::Record;

/// Layers downloaded at once by one pull.
const PULL_CONCURRENCY: usize = 4;
/// Blobs uploaded at once by one push.
const PUSH_CONCURRENCY: usize = 3;
/// `LayerBytes` events come at most once per this many bytes (and at the end).
const PROGRESS_STEP: u64 = 1 << 20;
/// Unpack directories untouched this long and not locked are leftovers of a killed process.
const STALE_TMP: Duration = Duration::from_secs(60);
/// Layer directory names: this many hex digits of the layer blob's digest. Short because
/// overlay mount options (all lower dirs) must fit in one page.
const LAYER_ID_LEN: usize = 16;

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The config digest (Docker's image id).
    pub id: Digest,
    pub manifest_digest: Digest,
    /// Normalised references naming this image, sorted; empty for an untagged image that
    /// garbage collection has not removed yet (because a container uses it).
    pub references: Vec<String>,
    pub config: ImageConfig,
    /// The unpacked layer directories, bottom first (overlay lower dirs).
    pub layers: Vec<PathBuf>,
    /// Unpacked size of its layers, in bytes.
    pub size: u64,
    /// The image config's creation time (RFC 3339), if it has one.
    pub created: Option<String>,
}

/// Pull progress, in the order things happen for each layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The manifest is known: how many layers (distinct blobs) and their compressed size.
    Resolved {
        reference: String,
        digest: Digest,
        layers: usize,
        total_size: u64,
    },
    LayerStarted {
        digest: Digest,
        size: u64,
    },
    LayerBytes {
        digest: Digest,
        done: u64,
        total: u64,
    },
    /// Downloaded and verified.
    LayerDone {
        digest: Digest,
    },
    LayerUnpacked {
        digest: Digest,
    },
    /// Already unpacked (by an earlier pull, maybe of another image).
    LayerCached {
        digest: Digest,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub removed_images: usize,
    pub removed_layers: usize,
    pub removed_blobs: usize,
    pub freed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such image: {0}")]
    NotFound(String),
    #[error("{name:?} matches more than one image ({candidates}); give more of the id")]
    Ambiguous { name: String, candidates: String },
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error("{what}: {source}")]
    Store { what: String, source: store::Error },
    #[error("unpacking layer sha256:{} of {image}: {source}", layer.short())]
    Unpack { image: String, layer: Digest, source: layer::Error },
    #[error("layer {layer} of {image} unpacks to diff_id {actual}, but the image config says {expected}")]
    DiffId { image: String, layer: Digest, expected: Digest, actual: Digest },
    #[error("{image}: {detail}")]
    Invalid { image: String, detail: String },
    #[error("malformed image archive {}: {detail}", path.display())]
    Archive { path: PathBuf, detail: String },
    #[error("the image index {} is unreadable: {detail}", path.display())]
    Index { path: PathBuf, detail: String },
    #[error("{what} {}: {source}", path.display())]
    Io { what: String, path: PathBuf, source: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    let what = what.into();
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

fn store_err(what: impl Into<String>) -> impl FnOnce(store::Error) -> Error {
    let what = what.into();
    move |source| Error::Store { what, source }
}

/// Parses an image config blob (the JSON a manifest's `config` descriptor points to).
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig> {
    config::parse_file(bytes)
        .map(|f| f.config)
        .map_err(|detail| Error::Invalid { image: "image config".into(), detail })
}

/// The directory name of a layer: the first hex digits of its blob digest.
fn layer_id(blob: &Digest) -> &str {
    &blob.hex()[..LAYER_ID_LEN]
}

/// `layers/<id>/layer.json`: which blob a layer directory was unpacked from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LayerMeta {
    digest: Digest,
    diff_id: Digest,
    /// Bytes of file content unpacked.
    size: u64,
}

/// What a pull or load has decided to record for one image.
struct Plan {
    record: Record,
    references: Vec<String>,
}

/// Keeps garbage collection off while it lives ([`Store::hold_gc`]).
#[derive(Debug)]
pub struct GcHold(#[allow(dead_code)] records::Lock);

/// The image store. Clones share the registry client (and its token cache).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    blobs: store::Store,
    files: records::Files,
    /// Made on first use: building it loads the system's CA certificates (tens of ms), which
    /// `berth run` of a local image or `container ls` never need.
    client: Arc<OnceLock<registry::Client>>,
    config: Config,
    platform: Platform,
}

impl Store {
    /// Opens (creating it if needed) the store in `data_dir`, removing what killed processes
    /// left half-done.
    pub fn open(data_dir: &Path, config: &Config) -> Result<Store> {
        let blobs = store::Store::open(&data_dir.join("blobs")).map_err(store_err("opening the blob store"))?;
        for d in [data_dir.join("layers"), data_dir.join("images")] {
            fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
        }
        let s = Store {
            root: data_dir.to_path_buf(),
            blobs,
            files: records::Files::new(&data_dir.join("images")),
            client: Arc::new(OnceLock::new()),
            config: config.clone(),
            platform: Platform::host(),
        };
        s.cleanup_layer_tmp(STALE_TMP);
        Ok(s)
    }

    fn client(&self) -> Result<&registry::Client> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let c = registry::Client::new(&self.config)?;
        let _ = self.client.set(c);
        Ok(self.client.get().expect("just set"))
    }

    /// The blob store (manifests, configs, layer blobs).
    pub fn blobs(&self) -> &store::Store {
        &self.blobs
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    fn layer_dir(&self, blob: &Digest) -> PathBuf {
        self.layers_dir().join(layer_id(blob))
    }

    fn read_index(&self) -> Result<records::Index> {
        self.files.read().map_err(|e| self.index_err(e))
    }

    fn index_err(&self, e: records::ReadError) -> Error {
        let detail = match e {
            records::ReadError::Io(e) => e.to_string(),
            records::ReadError::Corrupt(d) => format!("it is corrupt ({d})"),
        };
        Error::Index { path: self.files.index.clone(), detail }
    }

    fn update<T>(&self, f: impl FnOnce(&mut records::Index) -> Result<T>) -> Result<T> {
        self.files.update(f).map_err(|e| match e {
            records::UpdateError::Lock(e) => {
                Error::Io { what: "locking".into(), path: self.files.lock.clone(), source: e }
            }
            records::UpdateError::Read(e) => self.index_err(e),
            records::UpdateError::Write(e) => {
                Error::Io { what: "writing".into(), path: self.files.index.clone(), source: e }
            }
            records::UpdateError::Inner(e) => e,
        })
    }

    /// Holds GC off (shared lock) while blobs and layers are in use but not yet recorded.
    async fn hold_off_gc(&self) -> Result<records::Lock> {
        let path = self.files.gc_lock.clone();
        tokio::task::spawn_blocking(move || records::lock(&path, false).map_err(io_err("locking", &path)))
            .await
            .map_err(|e| Error::Io {
                what: "locking".into(),
                path: self.files.gc_lock.clone(),
                source: io::Error::other(e),
            })?
    }

    /// Pulls `reference` for this host's platform: downloads the layers (a few at once), each
    /// unpacked as soon as it is complete, checks each layer's diff_id against the config,
    /// then records the image and tags it with `reference`.
    pub async fn pull(&self, reference: &Reference, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<Image> {
        let image = reference.to_string();
        let resolved = self.client()?.resolve(reference, &self.platform).await?;
        let _gc = self.hold_off_gc().await?;
        let m = &resolved.manifest;
        check_manifest(&image, m)?;

        let stored =
            self.blobs.put_bytes(&resolved.bytes).map_err(store_err(format!("storing the manifest of {image}")))?;
        debug_assert_eq!(stored, resolved.digest);
        self.client()?.fetch_blob(reference, &m.config.digest, Some(m.config.size), &self.blobs, |_| {}).await?;
        let config_bytes =
            self.blobs.read(&m.config.digest).map_err(store_err(format!("reading the config of {image}")))?;
        let cfg =
            config::parse_file(&config_bytes).map_err(|detail| Error::Invalid { image: image.clone(), detail })?;
        if resolved.index.is_none() {
            self.warn_platform(&image, &cfg);
        }
        let layers = zip_layers(&image, m, &cfg)?;

        let distinct: Vec<&LayerRecord> = distinct_layers(&layers);
        progress(Progress::Resolved {
            reference: image.clone(),
            digest: resolved.digest.clone(),
            layers: distinct.len(),
            total_size: distinct.iter().map(|l| l.size).sum(),
        });
        let metas: Vec<LayerMeta> =
            futures_util::stream::iter(distinct.into_iter().map(|l| self.pull_layer(reference, l, progress)))
                .buffer_unordered(PULL_CONCURRENCY)
                .try_collect()
                .await?;

        let record = Record {
            manifest_digest: resolved.digest.clone(),
            media_type: resolved.media_type.clone(),
            config_digest: m.config.digest.clone(),
            layers,
            created: cfg.created.clone(),
            added: Some(now_rfc3339()),
            size: metas.iter().map(|m| m.size).sum(),
        };
        // The index lock may be held by another process for a moment: not on an async worker.
        let this = self.clone();
        let mut images =
            tokio::task::spawn_blocking(move || this.record(vec![Plan { record, references: vec![image] }]))
                .await
                .map_err(|e| Error::Io {
                what: "recording".into(),
                path: self.files.index.clone(),
                source: io::Error::other(e),
            })??;
        Ok(images.remove(0))
    }

    fn warn_platform(&self, image: &str, cfg: &config::ConfigFile) {
        if let (Some(os), Some(arch)) = (&cfg.os, &cfg.architecture) {
            let theirs = Platform::new(os, arch, None);
            if self.platform.score(&theirs).is_none() {
                tracing::warn!(
                    image,
                    "the image is for {theirs}, this host is {}: its programs may not run",
                    self.platform
                );
            }
        }
    }

    /// Makes sure one layer is downloaded and unpacked.
    async fn pull_layer(
        &self,
        reference: &Reference,
        l: &LayerRecord,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<LayerMeta> {
        let image = reference.to_string();
        if let Some(meta) = self.existing_layer(&image, l)? {
            progress(Progress::LayerCached { digest: l.digest.clone() });
            return Ok(meta);
        }
        if !self.blobs.has(&l.digest) {
            progress(Progress::LayerStarted { digest: l.digest.clone(), size: l.size });
            let last = AtomicU64::new(0);
            self.client()?
                .fetch_blob(reference, &l.digest, Some(l.size), &self.blobs, |done| {
                    let prev = last.load(Ordering::Relaxed);
                    if done >= prev + PROGRESS_STEP || done == l.size {
                        last.store(done, Ordering::Relaxed);
                        progress(Progress::LayerBytes { digest: l.digest.clone(), done, total: l.size });
                    }
                })
                .await?;
            progress(Progress::LayerDone { digest: l.digest.clone() });
        }
        let (this, l2) = (self.clone(), l.clone());
        let meta = tokio::task::spawn_blocking(move || this.unpack_layer(&image, &l2)).await.map_err(|e| {
            Error::Io { what: "unpacking".into(), path: self.layer_dir(&l.digest), source: io::Error::other(e) }
        })??;
        progress(Progress::LayerUnpacked { digest: l.digest.clone() });
        Ok(meta)
    }

    /// The layer's metadata if it is already unpacked (and is what this image expects).
    fn existing_layer(&self, image: &str, l: &LayerRecord) -> Result<Option<LayerMeta>> {
        let path = self.layer_dir(&l.digest).join("layer.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let meta: LayerMeta = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            what: "reading".into(),
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        if meta.digest != l.digest {
            return Err(Error::Invalid {
                image: image.into(),
                detail: format!(
                    "layer directory {} holds {} (an id collision with {})",
                    path.display(),
                    meta.digest,
                    l.digest
                ),
            });
        }
        if meta.diff_id != l.diff_id {
            return Err(Error::DiffId {
                image: image.into(),
                layer: l.digest.clone(),
                expected: l.diff_id.clone(),
                actual: meta.diff_id,
            });
        }
        Ok(Some(meta))
    }

    /// Unpacks a layer blob into `.tmp-<id>-<random>/diff`, checks its diff_id, makes it
    /// durable and renames it to `<id>`; if another process got there first, ours goes.
    fn unpack_layer(&self, image: &str, l: &LayerRecord) -> Result<LayerMeta> {
        if let Some(meta) = self.existing_layer(image, l)? {
            return Ok(meta);
        }
        let id = layer_id(&l.digest);
        let tmp = self.layers_dir().join(format!(".tmp-{id}-{}", store::random_suffix()));
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let result = (|| {
            // Tells cleanup in other processes that this one is alive.
            let dir = File::open(&tmp).map_err(io_err("opening", &tmp))?;
            rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive)
                .map_err(|e| io_err("locking", &tmp)(e.into()))?;
            let diff = tmp.join("diff");
            fs::create_dir(&diff).map_err(io_err("creating", &diff))?;
            let unpacked = layer::unpack(&self.blobs.path(&l.digest), &diff).map_err(|source| Error::Unpack {
                image: image.into(),
                layer: l.digest.clone(),
                source,
            })?;
            if unpacked.diff_id != l.diff_id {
                return Err(Error::DiffId {
                    image: image.into(),
                    layer: l.digest.clone(),
                    expected: l.diff_id.clone(),
                    actual: unpacked.diff_id,
                });
            }
            let meta = LayerMeta { digest: l.digest.clone(), diff_id: unpacked.diff_id, size: unpacked.size };
            let meta_path = tmp.join("layer.json");
            fs::write(&meta_path, serde_json::to_vec_pretty(&meta).expect("serialises"))
                .map_err(io_err("writing", &meta_path))?;
            // layer::unpack syncs nothing: the whole tree must be on disk before it is renamed
            // to a name that says "complete".
            rustix::fs::syncfs(&dir).map_err(|e| io_err("syncing", &tmp)(e.into()))?;
            Ok((meta, dir))
        })();
        // The lock (`_held`) stays until the directory has its final name.
        let (meta, _held) = match result {
            Ok(m) => m,
            Err(e) => {
                remove_tree(&tmp);
                return Err(e);
            }
        };
        let dest = self.layer_dir(&l.digest);
        match fs::rename(&tmp, &dest) {
            Ok(()) => {
                if let Ok(d) = File::open(self.layers_dir()) {
                    let _ = d.sync_all();
                }
                Ok(meta)
            }
            // Another process won the race (rename onto a non-empty directory fails).
            Err(_) if dest.join("layer.json").is_file() => {
                remove_tree(&tmp);
                self.existing_layer(image, l)?.ok_or_else(|| Error::NotFound(dest.display().to_string()))
            }
            Err(e) => {
                remove_tree(&tmp);
                Err(io_err("moving the unpacked layer into place at", &dest)(e))
            }
        }
    }

    /// Records images and their references in one index update; returns them.
    fn record(&self, plans: Vec<Plan>) -> Result<Vec<Image>> {
        let records = self.update(|idx| {
            let mut out = Vec::new();
            for p in &plans {
                let d = p.record.manifest_digest.clone();
                // Keep the first-recorded time of an image pulled again.
                let mut rec = p.record.clone();
                if let Some(old) = idx.images.get(&d) {
                    rec.added = old.added.clone().or(rec.added);
                }
                idx.images.insert(d.clone(), rec.clone());
                for r in &p.references {
                    if let Some(old) = idx.references.insert(r.clone(), d.clone()) {
                        if old != d {
                            tracing::info!(reference = %r, from = %old, to = %d, "reference moved to a new image");
                        }
                    }
                }
                out.push((rec, idx.references_to(&d)));
            }
            Ok(out)
        })?;
        records.into_iter().map(|(rec, refs)| self.image(&rec, refs)).collect()
    }

    /// The [`Image`] view of a record.
    fn image(&self, rec: &Record, references: Vec<String>) -> Result<Image> {
        let bytes = self
            .blobs
            .read(&rec.config_digest)
            .map_err(store_err(format!("reading the config of image {}", rec.config_digest.short())))?;
        let cfg = config::parse_file(&bytes)
            .map_err(|detail| Error::Invalid { image: rec.config_digest.to_string(), detail })?;
        Ok(Image {
            id: rec.config_digest.clone(),
            manifest_digest: rec.manifest_digest.clone(),
            references,
            config: cfg.config,
            layers: overlay_layers(&rec.layers).into_iter().map(|d| self.layer_dir(d).join("diff")).collect(),
            size: rec.size,
            created: rec.created.clone(),
        })
    }

    /// The image named by `name_or_id`: a reference (normalised: `busybox` finds
    /// `docker.io/library/busybox:latest`; `name@digest` also finds an image pulled by tag), a
    /// full digest (image id or manifest digest), or a unique prefix of at least 4 hex digits
    /// of an image id.
    pub fn get(&self, name_or_id: &str) -> Result<Image> {
        let idx = self.read_index()?;
        let rec = find(&idx, name_or_id)?.record;
        self.image(rec, idx.references_to(&rec.manifest_digest))
    }

    /// Every image, tagged or not, sorted by first reference (untagged last).
    pub fn list(&self) -> Result<Vec<Image>> {
        let idx = self.read_index()?;
        let mut out = Vec::new();
        for rec in idx.images.values() {
            // One damaged image (its config blob gone) must not hide all the others.
            match self.image(rec, idx.references_to(&rec.manifest_digest)) {
                Ok(i) => out.push(i),
                Err(e) => tracing::warn!(manifest = %rec.manifest_digest, "skipping an unreadable image: {e}"),
            }
        }
        out.sort_by(|a, b| {
            (a.references.is_empty(), &a.references, &a.id).cmp(&(b.references.is_empty(), &b.references, &b.id))
        });
        Ok(out)
    }

    /// Untags: a reference removes that one reference; an id or digest removes every
    /// reference to the image. Returns the references removed. The image's record, layers and
    /// blobs stay until [`Store::gc`], which keeps those of images containers use.
    pub fn remove(&self, name_or_id: &str) -> Result<Vec<String>> {
        self.update(|idx| {
            let found = find(idx, name_or_id)?;
            let untag = match found.by_reference {
                Some(r) => vec![r],
                None => idx.references_to(&found.record.manifest_digest),
            };
            for r in &untag {
                idx.references.remove(r);
            }
            Ok(untag)
        })
    }

    /// Adds `reference` to an image (`docker tag`).
    pub fn tag(&self, name_or_id: &str, reference: &Reference) -> Result<Image> {
        let (rec, refs) = self.update(|idx| {
            let rec = find(idx, name_or_id)?.record.clone();
            idx.references.insert(reference.to_string(), rec.manifest_digest.clone());
            let refs = idx.references_to(&rec.manifest_digest);
            Ok((rec, refs))
        })?;
        self.image(&rec, refs)
    }

    /// Removes image records no reference names and no container uses (`in_use`: image ids),
    /// then every layer and blob no remaining image refers to.
    ///
    /// While a pull, load or push runs (in any process) the files it is about to record look
    /// unreferenced, so then only records are removed and files wait for the next run; GC
    /// never blocks on a long download.
    pub fn gc(&self, in_use: &HashSet<Digest>) -> Result<GcReport> {
        let gc_lock =
            records::try_lock_exclusive(&self.files.gc_lock).map_err(io_err("locking", &self.files.gc_lock))?;
        if gc_lock.is_none() {
            tracing::info!(
                "a pull, load or push is running: unused layers and blobs are left for the next garbage collection"
            );
        }
        let mut report = GcReport::default();
        let live: Vec<Record> = self.update(|idx| {
            let named: HashSet<Digest> = idx.references.values().cloned().collect();
            let before = idx.images.len();
            idx.images.retain(|d, rec| named.contains(d) || in_use.contains(&rec.config_digest));
            report.removed_images = before - idx.images.len();
            Ok(idx.images.values().cloned().collect())
        })?;
        if gc_lock.is_none() {
            return Ok(report);
        }

        let mut live_blobs: HashSet<Digest> = HashSet::new();
        let mut live_layers: HashSet<String> = HashSet::new();
        for rec in &live {
            live_blobs.insert(rec.manifest_digest.clone());
            live_blobs.insert(rec.config_digest.clone());
            for l in &rec.layers {
                live_blobs.insert(l.digest.clone());
                live_layers.insert(layer_id(&l.digest).to_string());
            }
        }

        let layers_dir = self.layers_dir();
        let entries = fs::read_dir(&layers_dir).map_err(io_err("listing", &layers_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &layers_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || live_layers.contains(&name) {
                continue;
            }
            let dir = entry.path();
            let size = fs::read(dir.join("layer.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<LayerMeta>(&b).ok())
                .map(|m| m.size)
                .unwrap_or(0);
            // Renamed first, so that a half-removed tree never passes for a layer; a crash
            // leaves a .tmp- directory that the next open removes.
            let doomed = layers_dir.join(format!(".tmp-gc-{name}-{}", store::random_suffix()));
            fs::rename(&dir, &doomed).map_err(io_err("removing layer", &dir))?;
            // Locked, like an unpack, so that cleanup elsewhere does not race this removal.
            let held = File::open(&doomed).ok();
            if let Some(f) = &held {
                let _ = rustix::fs::flock(f, FlockOperation::NonBlockingLockExclusive);
            }
            remove_tree(&doomed);
            drop(held);
            report.removed_layers += 1;
            report.freed_bytes += size;
        }

        for d in self.blobs.list().map_err(store_err("listing blobs"))? {
            if live_blobs.contains(&d) {
                continue;
            }
            let size = self.blobs.size(&d).unwrap_or(0);
            if self.blobs.remove(&d).map_err(store_err("removing a blob"))? {
                report.removed_blobs += 1;
                report.freed_bytes += size;
            }
        }
        if let Err(e) = self.blobs.cleanup_tmp(STALE_TMP) {
            tracing::warn!("cleaning the blob store's temporary files: {e}");
        }
        self.cleanup_layer_tmp(STALE_TMP);
        tracing::info!(?report, "image garbage collection");
        Ok(report)
    }

    /// Removes `.tmp-` layer directories of processes that died (not locked, not recent).
    fn cleanup_layer_tmp(&self, older_than: Duration) {
        let Ok(entries) = fs::read_dir(self.layers_dir()) else { return };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            let path = entry.path();
            let age = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age < older_than {
                continue;
            }
            let Ok(dir) = File::open(&path) else { continue };
            if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_ok() {
                tracing::info!(path = %path.display(), "removing an interrupted layer unpack");
                remove_tree(&path);
            }
        }
    }

    // --- what builds need ----------------------------------------------------------------------

    /// Holds garbage collection off (shared lock) until the guard drops: a build's layers are
    /// in the store but recorded by no image until it finishes.
    pub fn hold_gc(&self) -> Result<GcHold> {
        records::lock(&self.files.gc_lock, false).map(GcHold).map_err(io_err("locking", &self.files.gc_lock))
    }

    /// The raw config JSON of an image (the whole file: `config`, `history`, `rootfs`...).
    pub fn config_json(&self, image: &Image) -> Result<serde_json::Value> {
        let bytes = self.blobs.read(&image.id).map_err(store_err(format!("reading the config of {}", image.id)))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid { image: image.id.to_string(), detail: format!("malformed config: {e}") })
    }

    /// An image's layers, bottom first, as its manifest lists them.
    pub fn layer_records(&self, image: &Image) -> Result<Vec<LayerRecord>> {
        let idx = self.read_index()?;
        idx.images
            .get(&image.manifest_digest)
            .map(|r| r.layers.clone())
            .ok_or_else(|| Error::NotFound(image.manifest_digest.to_string()))
    }

    /// The unpacked directories of `layers` (bottom first, as overlay lower dirs).
    pub fn layer_paths(&self, layers: &[LayerRecord]) -> Vec<PathBuf> {
        overlay_layers(layers).into_iter().map(|d| self.layer_dir(d).join("diff")).collect()
    }

    /// Whether a layer (from a build cache entry) is still stored and unpacked.
    pub fn has_layer(&self, l: &LayerRecord) -> bool {
        self.blobs.has(&l.digest) && matches!(self.existing_layer("", l), Ok(Some(_)))
    }

    /// Stores a new layer: `write` produces its uncompressed tar, which is gzipped into the
    /// blob store (its diff_id hashed on the way) and unpacked. The caller holds [`hold_gc`].
    pub fn add_layer(&self, write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> Result<LayerRecord> {
        struct Hashing<W> {
            inner: W,
            hasher: sha2::Sha256,
        }
        impl<W: io::Write> io::Write for Hashing<W> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let n = self.inner.write(buf)?;
                sha2::Digest::update(&mut self.hasher, &buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                self.inner.flush()
            }
        }
        let ingest = self.blobs.ingest_unverified().map_err(store_err("storing a layer"))?;
        let gz =
            flate2::write::GzEncoder::new(io::BufWriter::with_capacity(256 << 10, ingest), flate2::Compression::fast());
        let mut w = Hashing { inner: gz, hasher: <sha2::Sha256 as sha2::Digest>::new() };
        let tmp_path = self.blobs.root().join("tmp");
        write(&mut w).map_err(io_err("writing a layer", &tmp_path))?;
        let diff_id = Digest::from_hasher(w.hasher);
        let ingest = w
            .inner
            .finish()
            .and_then(|b| b.into_inner().map_err(|e| e.into_error()))
            .map_err(io_err("writing a layer", &tmp_path))?;
        let size = ingest.written();
        let digest = ingest.commit().map_err(store_err("storing a layer"))?;
        let l = LayerRecord { digest, media_type: manifest::OCI_LAYER_GZIP.to_string(), size, diff_id };
        self.unpack_layer("a build", &l)?;
        Ok(l)
    }

    /// Records a built image: its config blob (the JSON as given, `rootfs.diff_ids` included)
    /// and an OCI manifest of `layers`, tagged with `references` (normalised).
    pub fn add_image(&self, config: &[u8], layers: &[LayerRecord], references: Vec<String>) -> Result<Image> {
        let config_digest = self.blobs.put_bytes(config).map_err(store_err("storing an image config"))?;
        let m = registry::Manifest {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.to_string()),
            config: Descriptor {
                media_type: manifest::OCI_CONFIG.to_string(),
                digest: config_digest.clone(),
                size: config.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
                urls: Vec::new(),
            },
            layers: layers
                .iter()
                .map(|l| Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size,
                    platform: None,
                    annotations: BTreeMap::new(),
                    urls: Vec::new(),
                })
                .collect(),
            annotations: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&m).expect("a manifest serialises");
        let manifest_digest = self.blobs.put_bytes(&bytes).map_err(store_err("storing a manifest"))?;
        let cfg =
            config::parse_file(config).map_err(|detail| Error::Invalid { image: "the built image".into(), detail })?;
        let size = distinct_layers(layers)
            .iter()
            .map(|l| self.existing_layer("", l).ok().flatten().map(|m| m.size).unwrap_or(0))
            .sum();
        let record = Record {
            manifest_digest,
            media_type: manifest::OCI_MANIFEST.to_string(),
            config_digest,
            layers: layers.to_vec(),
            created: cfg.created,
            added: Some(now_rfc3339()),
            size,
        };
        Ok(self.record(vec![Plan { record, references }])?.remove(0))
    }

    /// Loads a tarball (optionally gzip- or zstd-compressed) holding an OCI image layout or a
    /// docker-archive (`docker save`): imports its blobs, unpacks its layers and records and
    /// tags its images. Everything is checked before anything is recorded, so a malformed
    /// archive records nothing (its imported blobs are left to [`Store::gc`]).
    pub async fn load(&self, tarball: &Path) -> Result<Vec<Image>> {
        let _gc = self.hold_off_gc().await?;
        let (this, path) = (self.clone(), tarball.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let plans = archive::load(&this.blobs, &path, &this.platform)?;
            for p in &plans {
                let image = p.references.first().cloned().unwrap_or_else(|| p.record.config_digest.to_string());
                for l in distinct_layers(&p.record.layers) {
                    this.unpack_layer(&image, l)?;
                }
            }
            let plans = plans
                .into_iter()
                .map(|mut p| {
                    p.record.size = distinct_layers(&p.record.layers)
                        .iter()
                        .map(|l| this.existing_layer("", l).ok().flatten().map(|m| m.size).unwrap_or(0))
                        .sum();
                    p
                })
                .collect();
            this.record(plans)
        })
        .await
        .map_err(|e| Error::Io {
            what: "loading".into(),
            path: tarball.to_path_buf(),
            source: io::Error::other(e),
        })?
    }

    /// Pushes an image to `dest`: its blobs (those the registry lacks), then its manifest
    /// exactly as stored, so the manifest digest stays the same.
    pub async fn push(&self, name_or_id: &str, dest: &Reference) -> Result<()> {
        let _gc = self.hold_off_gc().await?;
        let idx = self.read_index()?;
        let rec = find(&idx, name_or_id)?.record.clone();
        let mut blobs: Vec<Digest> = distinct_layers(&rec.layers).into_iter().map(|l| l.digest.clone()).collect();
        blobs.push(rec.config_digest.clone());
        let client = self.client()?;
        futures_util::stream::iter(blobs.iter().map(|d| client.push_blob(dest, d, &self.blobs)))
            .buffer_unordered(PUSH_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let bytes = self
            .blobs
            .read(&rec.manifest_digest)
            .map_err(store_err(format!("reading the manifest of {name_or_id}")))?;
        self.client()?.push_manifest(dest, &bytes, &rec.media_type).await?;
        Ok(())
    }
}

/// Refuses what is not a runnable image (a Helm chart, an encrypted image, …) before any
/// download.
fn check_manifest(image: &str, m: &registry::Manifest) -> Result<()> {
    let ct = m.config.media_type.as_str();
    if !(ct.is_empty() || ct == manifest::OCI_CONFIG || ct == manifest::DOCKER_CONFIG) {
        return Err(Error::Invalid {
            image: image.into(),
            detail: format!("not a container image: its config has media type {ct:?}"),
        });
    }
    if let Some(l) = m.layers.iter().find(|l| !manifest::is_layer(&l.media_type)) {
        return Err(Error::Invalid {
            image: image.into(),
            detail: format!("layer {} has unsupported media type {:?}", l.digest, l.media_type),
        });
    }
    Ok(())
}

/// Pairs each manifest layer with the config's diff_id for it.
fn zip_layers(image: &str, m: &registry::Manifest, cfg: &config::ConfigFile) -> Result<Vec<LayerRecord>> {
    if m.layers.len() != cfg.diff_ids.len() {
        return Err(Error::Invalid {
            image: image.into(),
            detail: format!(
                "the manifest has {} layers but the config lists {} diff_ids",
                m.layers.len(),
                cfg.diff_ids.len()
            ),
        });
    }
    Ok(m.layers
        .iter()
        .zip(&cfg.diff_ids)
        .map(|(d, diff_id): (&Descriptor, &Digest)| LayerRecord {
            digest: d.digest.clone(),
            media_type: d.media_type.clone(),
            size: d.size,
            diff_id: diff_id.clone(),
        })
        .collect())
}

/// Each layer blob once (an image may list one twice, typically an empty layer).
fn distinct_layers(layers: &[LayerRecord]) -> Vec<&LayerRecord> {
    let mut seen = BTreeSet::new();
    layers.iter().filter(|l| seen.insert(&l.digest)).collect()
}

/// The layer blobs to stack, bottom first, each once: a repeated layer is kept at its top
/// position, which subsumes the lower one (same files, same whiteouts, applied later).
fn overlay_layers(layers: &[LayerRecord]) -> Vec<&Digest> {
    let mut seen = BTreeSet::new();
    let mut out: Vec<&Digest> = layers.iter().rev().filter(|l| seen.insert(&l.digest)).map(|l| &l.digest).collect();
    out.reverse();
    out
}

/// What [`find`] matched.
struct Found<'a> {
    record: &'a Record,
    /// The normalised reference, when the name was one that is recorded.
    by_reference: Option<String>,
}

fn find<'a>(idx: &'a records::Index, name: &str) -> Result<Found<'a>> {
    let name = name.trim();
    let by_config = |d: &Digest| -> Option<&'a Record> {
        // Two manifests may share a config (the same image compressed differently): prefer
        // a tagged one.
        let all: Vec<&Record> = idx.images.values().filter(|r| &r.config_digest == d).collect();
        all.iter().find(|r| idx.references.values().any(|m| *m == r.manifest_digest)).or(all.first()).copied()
    };
    if let Ok(d) = name.parse::<Digest>() {
        if let Some(rec) = idx.images.get(&d).or_else(|| by_config(&d)) {
            return Ok(Found { record: rec, by_reference: None });
        }
        return Err(Error::NotFound(name.into()));
    }
    if let Ok(r) = name.parse::<Reference>() {
        let key = r.to_string();
        if let Some(rec) = idx.references.get(&key).and_then(|d| idx.images.get(d)) {
            return Ok(Found { record: rec, by_reference: Some(key) });
        }
        // `repo@digest` of an image pulled by tag.
        if let Some(rec) = r.digest().and_then(|d| idx.images.get(d)) {
            if idx
                .references_to(&rec.manifest_digest)
                .iter()
                .any(|n| n.starts_with(&format!("{}:", r.name())) || n.starts_with(&format!("{}@", r.name())))
            {
                return Ok(Found { record: rec, by_reference: None });
            }
        }
    }
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() >= 4 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        let ids: BTreeMap<&Digest, ()> = idx
            .images
            .values()
            .filter(|r| r.config_digest.hex().starts_with(hex))
            .map(|r| (&r.config_digest, ()))
            .collect();
        match ids.len() {
            0 => {}
            1 => {
                let id = ids.keys().next().expect("one");
                return Ok(Found { record: by_config(id).expect("matched"), by_reference: None });
            }
            _ => {
                let candidates = ids.keys().map(|d| d.short().to_string()).collect::<Vec<_>>().join(", ");
                return Err(Error::Ambiguous { name: name.into(), candidates });
            }
        }
    }
    match name.parse::<Reference>() {
        Ok(r) if r.to_string() != name => Err(Error::NotFound(format!("{name} ({r})"))),
        _ => Err(Error::NotFound(name.into())),
    }
}

fn remove_tree(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "removing: {e}");
        }
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests;
