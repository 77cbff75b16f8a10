//! `<data-dir>/images/index.json`: which reference names which manifest, and one record per
//! image manifest; plus the `flock`s that let several berth processes share it.
//!
//! Readers just read the file: it is only ever replaced whole, by rename. Writers hold
//! `images/lock` exclusively for the read-modify-write. Pulls, loads and pushes hold
//! `images/gc.lock` shared for their whole duration and garbage collection holds it
//! exclusively, so GC never removes a blob or layer that an unrecorded pull is about to use.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;

const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Index {
    #[serde(default)]
    pub version: u32,
    /// Normalised reference (`docker.io/library/busybox:latest`) → manifest digest.
    #[serde(default)]
    pub references: BTreeMap<String, Digest>,
    /// Manifest digest → record.
    #[serde(default)]
    pub images: BTreeMap<Digest, Record>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub manifest_digest: Digest,
    /// The manifest's media type, sent again when pushing.
    pub media_type: String,
    /// The image id.
    pub config_digest: Digest,
    /// Bottom first.
    pub layers: Vec<LayerRecord>,
    /// From the config's `created`.
    #[serde(default)]
    pub created: Option<String>,
    /// When this store first recorded the image (RFC 3339).
    #[serde(default)]
    pub added: Option<String>,
    /// Unpacked size of the distinct layers.
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The blob digest (compressed, as in the manifest).
    pub digest: Digest,
    pub media_type: String,
    /// The blob's size.
    pub size: u64,
    pub diff_id: Digest,
}

impl Index {
    /// The references naming `manifest`, sorted.
    pub fn references_to(&self, manifest: &Digest) -> Vec<String> {
        self.references.iter().filter(|(_, d)| *d == manifest).map(|(r, _)| r.clone()).collect()
    }
}

/// An `flock` held until dropped (closing the file releases it).
#[derive(Debug)]
pub(crate) struct Lock {
    _file: File,
}

/// Blocks until `path` (created if needed) is locked, shared or exclusive.
pub(crate) fn lock(path: &Path, exclusive: bool) -> io::Result<Lock> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    let op = if exclusive { FlockOperation::LockExclusive } else { FlockOperation::LockShared };
    loop {
        match rustix::fs::flock(&file, op) {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Locks `path` exclusively if nobody holds it; None if someone does.
pub(crate) fn try_lock_exclusive(path: &Path) -> io::Result<Option<Lock>> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    loop {
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Some(Lock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Files {
    pub index: PathBuf,
    pub lock: PathBuf,
    pub gc_lock: PathBuf,
}

impl Files {
    pub fn new(images_dir: &Path) -> Files {
        Files {
            index: images_dir.join("index.json"),
            lock: images_dir.join("lock"),
            gc_lock: images_dir.join("gc.lock"),
        }
    }

    /// The current index (empty if none was ever written).
    pub fn read(&self) -> Result<Index, ReadError> {
        let bytes = match fs::read(&self.index) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Index { version: VERSION, ..Default::default() })
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| ReadError::Corrupt(e.to_string()))?;
        if index.version > VERSION {
            return Err(ReadError::Corrupt(format!(
                "it has format version {}, this berth knows only up to {VERSION}",
                index.version
            )));
        }
        Ok(index)
    }

    /// Read-modify-write under the exclusive lock; `f`'s error leaves the file untouched.
    pub fn update<T, E>(&self, f: impl FnOnce(&mut Index) -> Result<T, E>) -> Result<T, UpdateError<E>> {
        let _lock = lock(&self.lock, true).map_err(UpdateError::Lock)?;
        let mut index = self.read().map_err(UpdateError::Read)?;
        let before = index.clone();
        let out = f(&mut index).map_err(UpdateError::Inner)?;
        if index.references != before.references || index.images != before.images {
            index.version = VERSION;
            let bytes = serde_json::to_vec_pretty(&index).expect("the index serialises");
            crate::store::write_atomic(&self.index, &bytes).map_err(UpdateError::Write)?;
        }
        Ok(out)
    }
}

#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    Corrupt(String),
}

#[derive(Debug)]
pub(crate) enum UpdateError<E> {
    Lock(io::Error),
    Read(ReadError),
    Write(io::Error),
    Inner(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_is_atomic_and_serialised() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        assert!(files.read().unwrap().references.is_empty());
        // Many writers (threads standing in for processes: flock is per open file) each add a
        // reference; none is lost.
        std::thread::scope(|s| {
            for i in 0..8 {
                let files = files.clone();
                s.spawn(move || {
                    files
                        .update(|idx| {
                            idx.references.insert(format!("r{i}"), Digest::of(&[i]));
                            Ok::<_, ()>(())
                        })
                        .unwrap();
                });
            }
        });
        let idx = files.read().unwrap();
        assert_eq!(idx.references.len(), 8);
        assert_eq!(idx.references_to(&Digest::of(&[3])), ["r3"]);

        // A failing update writes nothing.
        let r: Result<(), UpdateError<&str>> = files.update(|idx| {
            idx.references.clear();
            Err("no")
        });
        assert!(matches!(r, Err(UpdateError::Inner("no"))));
        assert_eq!(files.read().unwrap().references.len(), 8);
        // Only index.json and the lock file: no temporaries left behind.
        let mut names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["index.json", "lock"]);

        fs::write(&files.index, b"{garbage").unwrap();
        assert!(matches!(files.read(), Err(ReadError::Corrupt(_))));
    }
}
