//! Reading image tarballs for `load`: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) or a docker-archive as `docker save` writes it (`manifest.json`, config
//! JSON, layer tars at `<id>/layer.tar` or `blobs/sha256/…`), optionally gzip or zstd
//! compressed.
//!
//! The tarball is read once, front to back: blobs stream straight into the blob store (OCI
//! blobs verified against their names), small metadata files are kept in memory, and links
//! (docker-archive's repeated layers) are remembered. Then every image is checked — manifest,
//! config, every layer present, diff_id count — before the caller records anything.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;

use super::records::Record;
use super::{check_manifest, config, now_rfc3339, zip_layers, Error, Plan, Result};
use crate::digest::Digest;
use crate::layer::Compression;
use crate::reference::Reference;
use crate::registry::{manifest, Descriptor, Index, Manifest, Platform};
use crate::store::{self, Store};

/// Metadata files bigger than this are not metadata.
const MAX_METADATA: u64 = 16 << 20;
/// How deep indexes may nest, and links chain.
const MAX_DEPTH: usize = 8;

const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What the tarball holds, by normalised path.
#[derive(Debug, Default)]
struct Contents {
    files: BTreeMap<String, Vec<u8>>,
    blobs: BTreeMap<String, Digest>,
    links: BTreeMap<String, String>,
}

enum Item<'a> {
    File(&'a [u8]),
    Blob(&'a Digest),
}

impl Contents {
    /// What `path` holds, following links.
    fn get(&self, path: &str) -> Option<Item<'_>> {
        let mut p = normalize(path)?;
        for _ in 0..MAX_DEPTH {
            if let Some(b) = self.files.get(&p) {
                return Some(Item::File(b));
            }
            if let Some(d) = self.blobs.get(&p) {
                return Some(Item::Blob(d));
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }
}

/// `a/./b/../c` → `a/c`; None if it climbs above the root.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn is_metadata(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.ends_with(".json") || ["json", "VERSION", "oci-layout", "repositories"].contains(&name)
}

/// `blobs/sha256/<hex>` → its digest.
fn blob_path_digest(path: &str) -> Option<Digest> {
    let hex = path.strip_prefix("blobs/sha256/")?;
    format!("sha256:{hex}").parse().ok()
}

/// Reads the tarball at `path` and returns what to record for each image in it. Blobs land
/// in `blobs`; nothing else is written.
pub(super) fn load(blobs: &Store, path: &Path, platform: &Platform) -> Result<Vec<Plan>> {
    let bad = |detail: String| Error::Archive { path: path.to_path_buf(), detail };
    let contents = read(blobs, path)?;
    let mut plans = if contents.files.contains_key("index.json") {
        oci(&contents, blobs, platform, &bad)?
    } else if contents.files.contains_key("manifest.json") {
        docker(&contents, blobs, &bad)?
    } else {
        return Err(bad("it has neither index.json (an OCI image layout) nor manifest.json (a docker-archive)".into()));
    };
    // The same image listed twice (under two names) is one image with both names.
    let mut merged: Vec<Plan> = Vec::new();
    for p in plans.drain(..) {
        match merged.iter_mut().find(|m| m.record.manifest_digest == p.record.manifest_digest) {
            Some(m) => {
                for r in p.references {
                    if !m.references.contains(&r) {
                        m.references.push(r);
                    }
                }
            }
            None => merged.push(p),
        }
    }
    Ok(merged)
}

fn read(blobs: &Store, path: &Path) -> Result<Contents> {
    let bad = |detail: String| Error::Archive { path: path.to_path_buf(), detail };
    let file =
        File::open(path).map_err(|source| Error::Io { what: "opening".into(), path: path.to_path_buf(), source })?;
    let mut raw = BufReader::with_capacity(256 << 10, file);
    let head =
        raw.fill_buf().map_err(|source| Error::Io { what: "reading".into(), path: path.to_path_buf(), source })?;
    if head.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    let reader: Box<dyn Read> = match Compression::sniff(head) {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| bad(format!("reading zstd: {e}")))?)
        }
    };
    let mut archive = tar::Archive::new(reader);
    let mut c = Contents::default();
    let tar_err = |e: io::Error| bad(format!("reading the tar stream: {e}"));
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let raw_path = entry.path().map_err(tar_err)?.to_string_lossy().into_owned();
        let Some(p) = normalize(&raw_path).filter(|p| !p.is_empty()) else { continue };
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name().map_err(tar_err)? else { continue };
            let target = target.to_string_lossy().into_owned();
            // A symlink is relative to its directory, a hard link to the archive's root.
            let base = match (kind.is_symlink(), target.starts_with('/'), p.rsplit_once('/')) {
                (true, false, Some((dir, _))) => format!("{dir}/"),
                _ => String::new(),
            };
            if let Some(t) = normalize(&format!("{base}{target}")) {
                c.links.insert(p, t);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        if let Some(d) = blob_path_digest(&p) {
            if !blobs.has(&d) {
                let mut w = blobs
                    .ingest(&d, Some(size))
                    .map_err(|source| Error::Store { what: format!("importing {p}"), source })?;
                io::copy(&mut entry, &mut w).map_err(tar_err)?;
                w.commit().map_err(|e| match e {
                    store::Error::DigestMismatch { actual, .. } => {
                        bad(format!("{p} does not match its name: its content has digest {actual}"))
                    }
                    source => Error::Store { what: format!("importing {p}"), source },
                })?;
            }
            c.blobs.insert(p, d);
        } else if is_metadata(&p) && size <= MAX_METADATA {
            let mut buf = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut buf).map_err(tar_err)?;
            c.files.insert(p, buf);
        } else {
            // A docker-archive layer tar: its digest is learnt from its content.
            let mut w =
                blobs.ingest_unverified().map_err(|source| Error::Store { what: format!("importing {p}"), source })?;
            io::copy(&mut entry, &mut w).map_err(tar_err)?;
            let d = w.commit().map_err(|source| Error::Store { what: format!("importing {p}"), source })?;
            c.blobs.insert(p, d);
        }
    }
    Ok(c)
}

/// The names an OCI index entry gives its image: containerd's full name, else the OCI
/// `ref.name` read as a reference (`busybox:1.36`, `registry.local/app:v1`). A bare word is
/// what skopeo and umoci write there: only a tag (`oci:dir:latest`), which names no
/// repository, so the image loads unnamed (`berth image load --tag` names it).
fn annotated_names(annotations: &BTreeMap<String, String>) -> Vec<String> {
    for key in [CONTAINERD_NAME, OCI_REF_NAME] {
        if let Some(name) = annotations.get(key).filter(|n| !n.is_empty()) {
            if key == OCI_REF_NAME && !name.contains(['/', ':', '@']) {
                continue;
            }
            match name.parse::<Reference>() {
                Ok(r) => return vec![r.to_string()],
                Err(e) => tracing::warn!("ignoring the image name in the {key} annotation: {e}"),
            }
        }
    }
    Vec::new()
}

fn oci(c: &Contents, blobs: &Store, platform: &Platform, bad: &dyn Fn(String) -> Error) -> Result<Vec<Plan>> {
    match c.files.get("oci-layout") {
        None => tracing::warn!("the OCI image layout has no oci-layout file; reading it anyway"),
        Some(b) => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Layout {
                image_layout_version: String,
            }
            let l: Layout = serde_json::from_slice(b).map_err(|e| bad(format!("oci-layout is malformed: {e}")))?;
            if !l.image_layout_version.starts_with("1.") {
                return Err(bad(format!("unsupported OCI image layout version {:?}", l.image_layout_version)));
            }
        }
    }
    let index: Index = serde_json::from_slice(&c.files["index.json"])
        .map_err(|e| bad(format!("index.json is not a valid OCI image index: {e}")))?;
    if index.manifests.is_empty() {
        return Err(bad("index.json lists no images".into()));
    }
    // Archives written by `docker save` (25+) carry RepoTags too; used for unnamed entries.
    let docker_names: BTreeMap<Digest, Vec<String>> = docker_entries(c, bad)
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let config = match c.get(&e.config)? {
                Item::Blob(d) => d.clone(),
                Item::File(b) => Digest::of(b),
            };
            Some((
                config,
                e.repo_tags.iter().filter_map(|t| t.parse::<Reference>().ok()).map(|r| r.to_string()).collect(),
            ))
        })
        .collect();
    let mut plans = Vec::new();
    for desc in &index.manifests {
        let (bytes, media_type, digest) = resolve(desc, blobs, platform, bad, 0)?;
        let mut plan = plan(&bytes, &media_type, &digest, blobs, annotated_names(&desc.annotations), bad)?;
        if plan.references.is_empty() {
            plan.references = docker_names.get(&plan.record.config_digest).cloned().unwrap_or_default();
        }
        plans.push(plan);
    }
    Ok(plans)
}

/// The image manifest an index entry leads to (through nested indexes, picking `platform`).
fn resolve(
    desc: &Descriptor,
    blobs: &Store,
    platform: &Platform,
    bad: &dyn Fn(String) -> Error,
    depth: usize,
) -> Result<(Vec<u8>, String, Digest)> {
    if depth > MAX_DEPTH {
        return Err(bad("image indexes nest too deeply".into()));
    }
    let bytes = blobs.read(&desc.digest).map_err(|e| match e {
        store::Error::NotFound(_) => bad(format!(
            "{} is listed in an index but not in the archive (blobs/sha256/{})",
            desc.digest,
            desc.digest.hex()
        )),
        e => bad(e.to_string()),
    })?;
    let media_type = if desc.media_type.is_empty() {
        manifest::sniff_media_type(&bytes).unwrap_or_default()
    } else {
        desc.media_type.clone()
    };
    if manifest::is_index(&media_type) {
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("image index {} is malformed: {e}", desc.digest)))?;
        let child = manifest::select(&index, platform).ok_or_else(|| {
            let have: Vec<String> =
                index.manifests.iter().filter_map(|d| d.platform.as_ref()).map(|p| p.to_string()).collect();
            bad(format!("image index {} has no manifest for {platform} (it has: {})", desc.digest, have.join(", ")))
        })?;
        return resolve(child, blobs, platform, bad, depth + 1);
    }
    Ok((bytes, media_type, desc.digest.clone()))
}

/// Checks one image manifest and everything it needs, and what to record for it.
fn plan(
    bytes: &[u8],
    media_type: &str,
    digest: &Digest,
    blobs: &Store,
    references: Vec<String>,
    bad: &dyn Fn(String) -> Error,
) -> Result<Plan> {
    let name = references.first().cloned().unwrap_or_else(|| format!("manifest {digest}"));
    if manifest::is_schema1(media_type) {
        return Err(bad(format!("{name}: schema1 manifests are not supported")));
    }
    if !manifest::is_manifest(media_type) {
        return Err(bad(format!("{name}: unsupported manifest media type {media_type:?}")));
    }
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("{name}: malformed manifest: {e}")))?;
    check_manifest(&name, &m)?;
    let config_bytes = blobs.read(&m.config.digest).map_err(|e| match e {
        store::Error::NotFound(_) => bad(format!("{name}: its config {} is not in the archive", m.config.digest)),
        e => bad(format!("{name}: {e}")),
    })?;
    let cfg = config::parse_file(&config_bytes).map_err(|e| bad(format!("{name}: {e}")))?;
    let layers = zip_layers(&name, &m, &cfg)?;
    for (i, l) in m.layers.iter().enumerate() {
        match blobs.size(&l.digest) {
            Ok(size) if size == l.size => {}
            Ok(size) => {
                return Err(bad(format!("{name}: layer {} is {size} bytes, the manifest says {}", l.digest, l.size)))
            }
            Err(_) => {
                return Err(bad(format!(
                    "{name}: layer {} of {} ({}) is not in the archive",
                    i + 1,
                    m.layers.len(),
                    l.digest
                )));
            }
        }
    }
    Ok(Plan {
        record: Record {
            manifest_digest: digest.clone(),
            media_type: media_type.to_string(),
            config_digest: m.config.digest.clone(),
            layers,
            created: cfg.created,
            added: Some(now_rfc3339()),
            size: 0,
        },
        references,
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default, deserialize_with = "null_default")]
    repo_tags: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    layers: Vec<String>,
}

fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn docker_entries(c: &Contents, bad: &dyn Fn(String) -> Error) -> Result<Option<Vec<DockerEntry>>> {
    let Some(bytes) = c.files.get("manifest.json") else { return Ok(None) };
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| bad(format!("manifest.json is not a valid docker-archive manifest: {e}")))
}

/// A docker-archive: an OCI manifest is made for each image (layers are stored as they are in
/// the archive, typically uncompressed tars, so their digests are their diff_ids).
fn docker(c: &Contents, blobs: &Store, bad: &dyn Fn(String) -> Error) -> Result<Vec<Plan>> {
    let entries = docker_entries(c, bad)?.unwrap_or_default();
    if entries.is_empty() {
        return Err(bad("manifest.json lists no images".into()));
    }
    let mut plans = Vec::new();
    for e in entries {
        let config_bytes = match c.get(&e.config) {
            Some(Item::File(b)) => b.to_vec(),
            Some(Item::Blob(d)) => blobs.read(d).map_err(|err| bad(format!("config {:?}: {err}", e.config)))?,
            None => return Err(bad(format!("manifest.json names config {:?}, which is not in the archive", e.config))),
        };
        let config_digest = blobs
            .put_bytes(&config_bytes)
            .map_err(|source| Error::Store { what: format!("importing {}", e.config), source })?;
        let mut layers = Vec::new();
        for path in &e.layers {
            let digest = match c.get(path) {
                Some(Item::Blob(d)) => d.clone(),
                Some(Item::File(b)) => {
                    blobs.put_bytes(b).map_err(|source| Error::Store { what: format!("importing {path}"), source })?
                }
                None => return Err(bad(format!("manifest.json names layer {path:?}, which is not in the archive"))),
            };
            let size =
                blobs.size(&digest).map_err(|source| Error::Store { what: format!("importing {path}"), source })?;
            let mut head = [0u8; 4];
            let n = File::open(blobs.path(&digest)).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
            let media_type = match Compression::sniff(&head[..n]) {
                Compression::None => manifest::OCI_LAYER_TAR,
                Compression::Gzip => manifest::OCI_LAYER_GZIP,
                Compression::Zstd => manifest::OCI_LAYER_ZSTD,
            };
            layers.push(Descriptor {
                media_type: media_type.into(),
                digest,
                size,
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            });
        }
        let m = Manifest {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: manifest::OCI_CONFIG.into(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            },
            layers,
            annotations: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&m).expect("a manifest serialises");
        let digest =
            blobs.put_bytes(&bytes).map_err(|source| Error::Store { what: "storing a manifest".into(), source })?;
        let mut references = Vec::new();
        for t in &e.repo_tags {
            match t.parse::<Reference>() {
                Ok(r) => references.push(r.to_string()),
                Err(err) => tracing::warn!("ignoring RepoTag: {err}"),
            }
        }
        plans.push(plan(&bytes, manifest::OCI_MANIFEST, &digest, blobs, references, bad)?);
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(normalize("./a/./b/../c/").as_deref(), Some("a/c"));
        assert_eq!(normalize("/abs").as_deref(), Some("abs"));
        assert_eq!(normalize("../x"), None);
        assert!(
            is_metadata("index.json")
                && is_metadata("abc/json")
                && is_metadata("oci-layout")
                && !is_metadata("abc/layer.tar")
        );
        assert_eq!(blob_path_digest(&format!("blobs/sha256/{}", Digest::of(b"").hex())), Some(Digest::of(b"")));
        assert_eq!(blob_path_digest("blobs/sha256/xyz"), None);
    }
}
