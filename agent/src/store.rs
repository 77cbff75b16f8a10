//! The content-addressed blob store (manifests, configs, layer blobs) at `<data-dir>/blobs`,
//! each blob at `sha256/<hex>` and only ever there once its content has been verified.
//!
//! Several berth processes may share a store, so nothing here relies on in-memory locks: a
//! blob is written to `tmp/<hex>.<random>`, hashed on the way, fsynced and then renamed into
//! `sha256/` (rename is atomic, and two writers of one digest write the same bytes). A writer
//! holds an `flock` on its temporary file so that a cleanup run by another process can tell a
//! live download from the leftovers of a killed one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::FlockOperation;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Temporary files untouched for this long, and not locked, are leftovers: removed on open.
/// (A live writer holds a lock anyway; the age only covers the instant between creating the
/// file and locking it.)
const STALE_TMP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {source}", path.display())]
    Io { what: String, path: PathBuf, source: io::Error },
    #[error("blob {expected} is corrupt: its content has digest {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} is {actual} bytes long, expected {expected}")]
    SizeMismatch { digest: Digest, expected: u64, actual: u64 },
    #[error("blob {0} is not in the store")]
    NotFound(Digest),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    let what = what.into();
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

impl Store {
    /// Opens (creating it if needed) the store at `root`, and removes what killed writers left
    /// in `tmp/`.
    pub fn open(root: &Path) -> Result<Store> {
        let store = Store { root: root.to_path_buf() };
        for dir in [store.blobs_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(io_err("creating the blob store directory", &dir))?;
        }
        match store.cleanup_tmp(STALE_TMP) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, root = %root.display(), "removed interrupted blob downloads"),
            Err(e) => tracing::warn!("cleaning the blob store's temporary files: {e}"),
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn size(&self, digest: &Digest) -> Result<u64> {
        let path = self.path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound(digest.clone())),
            Err(e) => Err(io_err(format!("reading the size of blob {digest}"), &path)(e)),
        }
    }

    /// Reads a whole blob (meant for manifests and configs, not layers) and checks its digest:
    /// these bytes drive everything else, so disk corruption must not go unnoticed.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NotFound(digest.clone())),
            Err(e) => return Err(io_err(format!("reading blob {digest}"), &path)(e)),
        };
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(Error::DigestMismatch { expected: digest.clone(), actual });
        }
        Ok(bytes)
    }

    /// Stores `bytes`, returning their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if self.has(&digest) {
            return Ok(digest);
        }
        let mut w = self.ingest(&digest, Some(bytes.len() as u64))?;
        w.write_all(bytes).map_err(io_err(format!("writing blob {digest}"), &w.tmp))?;
        w.commit()
    }

    /// Starts writing the blob `expected`; [`Ingest::commit`] verifies and publishes it. Writing
    /// more than `expected_size` bytes fails at once, so a misbehaving server cannot fill the
    /// disk.
    pub fn ingest(&self, expected: &Digest, expected_size: Option<u64>) -> Result<Ingest> {
        self.start_ingest(Some(expected.clone()), expected_size, expected.hex())
    }

    /// Starts writing a blob whose digest is only learnt from its content (a docker-archive
    /// layer tar); [`Ingest::commit`] returns it.
    pub fn ingest_unverified(&self) -> Result<Ingest> {
        self.start_ingest(None, None, "unverified")
    }

    fn start_ingest(&self, expected: Option<Digest>, expected_size: Option<u64>, stem: &str) -> Result<Ingest> {
        // `<hex>.<random>` in tmp/: never a valid blob name, never in sha256/.
        let tmp = self.tmp_dir().join(format!("{stem}.{}", random_suffix()));
        let what = || match &expected {
            Some(d) => format!("creating a temporary file for blob {d}"),
            None => "creating a temporary file for a blob".to_string(),
        };
        let file = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => f,
            // The tmp directory may have been removed under us (a data dir wiped by hand).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(self.tmp_dir()).map_err(io_err(what(), &tmp))?;
                OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err(what(), &tmp))?
            }
            Err(e) => return Err(io_err(what(), &tmp)(e)),
        };
        // Marks the file as in use for cleanup_tmp in any process; released when we exit,
        // however we exit.
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| io_err(what(), &tmp)(io::Error::from(e)))?;
        Ok(Ingest {
            file: Some(file),
            tmp,
            blobs_dir: self.blobs_dir(),
            hasher: Sha256::new(),
            written: 0,
            expected,
            expected_size,
            finished: false,
        })
    }

    /// Removes the blob; false if it was not there.
    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(format!("removing blob {digest}"), &path)(e)),
        }
    }

    /// Every blob in the store (in no particular order).
    pub fn list(&self) -> Result<Vec<Digest>> {
        let dir = self.blobs_dir();
        let entries = fs::read_dir(&dir).map_err(io_err("listing the blob store", &dir))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing the blob store", &dir))?;
            if let Some(d) = entry.file_name().to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Removes temporary files last modified more than `older_than` ago that no live writer
    /// holds; returns how many went.
    pub fn cleanup_tmp(&self, older_than: Duration) -> Result<usize> {
        let dir = self.tmp_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("listing the blob store's temporary files", &dir)(e)),
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if !meta.is_file() || age < older_than {
                continue;
            }
            let Ok(file) = File::open(&path) else { continue };
            if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
                // A live writer in some process.
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing a stale temporary file", &path)(e)),
            }
        }
        Ok(removed)
    }
}

/// A blob being written: hashed as it goes, published by [`Ingest::commit`], deleted if
/// dropped uncommitted.
#[derive(Debug)]
pub struct Ingest {
    file: Option<File>,
    tmp: PathBuf,
    blobs_dir: PathBuf,
    hasher: Sha256,
    written: u64,
    expected: Option<Digest>,
    expected_size: Option<u64>,
    finished: bool,
}

impl Ingest {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest, fsyncs, and renames the blob into place. If the blob is
    /// already there (another writer won), ours is simply dropped. Returns the digest.
    pub fn commit(mut self) -> Result<Digest> {
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        let label = self.expected.clone().unwrap_or_else(|| actual.clone());
        if let Some(expected) = self.expected_size {
            if self.written != expected {
                return Err(Error::SizeMismatch { digest: label, expected, actual: self.written });
            }
        }
        if let Some(expected) = &self.expected {
            if *expected != actual {
                return Err(Error::DigestMismatch { expected: expected.clone(), actual });
            }
        }
        let dest = self.blobs_dir.join(actual.hex());
        if dest.is_file() {
            // Dropping removes our copy.
            return Ok(actual);
        }
        let file = self.file.take().expect("an uncommitted ingest has its file");
        file.sync_all().map_err(io_err(format!("syncing blob {actual}"), &self.tmp))?;
        drop(file);
        fs::rename(&self.tmp, &dest).map_err(io_err(format!("moving blob {actual} into place at"), &dest))?;
        self.finished = true;
        // The rename itself must survive a crash too.
        if let Ok(d) = File::open(&self.blobs_dir) {
            let _ = d.sync_all();
        }
        Ok(actual)
    }
}

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(max) = self.expected_size {
            if self.written + buf.len() as u64 > max {
                let what = self.expected.as_ref().map(|d| d.to_string()).unwrap_or_else(|| "blob".into());
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what} is longer than the expected {max} bytes"),
                ));
            }
        }
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("blob already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// 16 random hex digits for temporary names.
pub(crate) fn random_suffix() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Uniqueness, not secrecy, is what matters here.
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    hex::encode(b)
}

/// Replaces `path` with `bytes` so that readers (in any process) see the old or the new
/// content, never a mix, and the new content survives a crash: write a temporary sibling,
/// fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", random_suffix()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("blobs")).unwrap();
        (dir, s)
    }

    fn tmp_files(s: &Store) -> Vec<PathBuf> {
        fs::read_dir(s.root().join("tmp")).unwrap().map(|e| e.unwrap().path()).collect()
    }

    #[test]
    fn put_read_list_remove() {
        let (_d, s) = store();
        let d = s.put_bytes(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert!(s.has(&d));
        assert_eq!(s.path(&d), s.root().join("sha256").join(d.hex()));
        assert_eq!(s.size(&d).unwrap(), 5);
        assert_eq!(s.read(&d).unwrap(), b"hello");
        // Idempotent.
        assert_eq!(s.put_bytes(b"hello").unwrap(), d);
        assert_eq!(s.list().unwrap(), vec![d.clone()]);
        assert!(s.remove(&d).unwrap());
        assert!(!s.remove(&d).unwrap());
        assert!(!s.has(&d));
        assert!(matches!(s.read(&d), Err(Error::NotFound(_))));
        assert!(matches!(s.size(&d), Err(Error::NotFound(_))));
        assert!(tmp_files(&s).is_empty());
    }

    #[test]
    fn ingest_verifies() {
        let (_d, s) = store();
        let good = Digest::of(b"abcdef");
        let mut w = s.ingest(&good, Some(6)).unwrap();
        w.write_all(b"abc").unwrap();
        // The partial blob is only ever under tmp/.
        assert!(!s.has(&good));
        assert_eq!(tmp_files(&s).len(), 1);
        w.write_all(b"def").unwrap();
        assert_eq!(w.written(), 6);
        assert_eq!(w.commit().unwrap(), good);
        assert_eq!(s.read(&good).unwrap(), b"abcdef");
        assert!(tmp_files(&s).is_empty());

        // Wrong content: error names both digests, and the temporary file goes.
        let want = Digest::of(b"expected");
        let mut w = s.ingest(&want, None).unwrap();
        w.write_all(b"something else").unwrap();
        let err = w.commit().unwrap_err().to_string();
        assert!(err.contains(want.as_str()) && err.contains(Digest::of(b"something else").as_str()), "{err}");
        assert!(!s.has(&want));
        assert!(tmp_files(&s).is_empty());

        // Too long fails on write; too short on commit.
        let mut w = s.ingest(&good, Some(3)).unwrap();
        assert!(w.write_all(b"abcdef").is_err());
        drop(w);
        let mut w = s.ingest(&Digest::of(b"abc"), Some(4)).unwrap();
        w.write_all(b"abc").unwrap();
        assert!(matches!(w.commit(), Err(Error::SizeMismatch { expected: 4, actual: 3, .. })));
        assert!(tmp_files(&s).is_empty());

        // An existing blob: the second writer's copy is dropped.
        let mut w = s.ingest(&good, None).unwrap();
        w.write_all(b"abcdef").unwrap();
        assert_eq!(w.commit().unwrap(), good);
        assert!(tmp_files(&s).is_empty());

        // Unknown digest.
        let mut w = s.ingest_unverified().unwrap();
        w.write_all(b"layer").unwrap();
        assert_eq!(w.commit().unwrap(), Digest::of(b"layer"));
        assert!(s.has(&Digest::of(b"layer")));
    }

    #[test]
    fn corrupt_blob_is_detected_on_read() {
        let (_d, s) = store();
        let d = s.put_bytes(b"{}").unwrap();
        fs::write(s.path(&d), b"{ }").unwrap();
        assert!(matches!(s.read(&d), Err(Error::DigestMismatch { .. })));
    }

    #[test]
    fn leftovers_of_killed_writers_are_cleaned() {
        let (dir, s) = store();
        // What a killed process leaves: an unlocked temporary file.
        let stale = s.root().join("tmp").join(format!("{}.0123456789abcdef", Digest::of(b"x").hex()));
        fs::write(&stale, b"partial").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        // A live writer (its file is locked), even if old.
        let mut live = s.ingest(&Digest::of(b"y"), None).unwrap();
        live.write_all(b"y").unwrap();
        let live_path = live.tmp.clone();
        File::options().write(true).open(&live_path).unwrap().set_modified(old).unwrap();

        // Re-opening the store (another process starting) removes only the stale one.
        let s2 = Store::open(&dir.path().join("blobs")).unwrap();
        assert!(!stale.exists());
        assert!(live_path.exists());
        assert_eq!(s2.cleanup_tmp(Duration::ZERO).unwrap(), 0);
        assert_eq!(live.commit().unwrap(), Digest::of(b"y"));
        assert!(s2.has(&Digest::of(b"y")));

        // Young unlocked files are left to cleanup_tmp with a smaller age.
        fs::write(&stale, b"partial").unwrap();
        assert_eq!(s2.cleanup_tmp(Duration::from_secs(600)).unwrap(), 0);
        assert_eq!(s2.cleanup_tmp(Duration::ZERO).unwrap(), 1);
    }

    #[test]
    fn concurrent_writers_of_one_blob() {
        let (_d, s) = store();
        let data = vec![7u8; 1 << 20];
        let d = Digest::of(&data);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let mut w = s.ingest(&d, Some(data.len() as u64)).unwrap();
                    for chunk in data.chunks(4096) {
                        w.write_all(chunk).unwrap();
                    }
                    assert_eq!(w.commit().unwrap(), d);
                });
            }
        });
        assert_eq!(s.read(&d).unwrap(), data);
        assert_eq!(s.list().unwrap(), vec![d]);
        assert!(tmp_files(&s).is_empty());
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
