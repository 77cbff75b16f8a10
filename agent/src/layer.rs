//! Unpacks OCI/Docker image layer blobs (tar, gzip or zstd) into directories that overlayfs can
//! mount directly as lower layers, refusing any entry that would write outside its destination.
//!
//! The layer is treated as hostile. Every filesystem call is made relative to a directory fd that
//! was opened beneath the destination with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` (or, on kernels without openat2, one `O_NOFOLLOW` component at a
//! time), and every final component is created with `O_EXCL | O_NOFOLLOW` or an `*at` call that
//! does not follow symlinks. So it is the kernel, not a check-then-use in userspace, that keeps
//! writes inside the destination, and a symlink planted by an earlier entry cannot redirect a
//! later one.
//!
//! OCI whiteouts are translated into overlayfs's own form on the way: `dir/.wh.NAME` becomes a
//! 0/0 character device `dir/NAME`, and `dir/.wh..wh..opq` becomes the xattr
//! `trusted.overlay.opaque="y"` on `dir`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};
use tar::EntryType;

use crate::Digest;

/// Size of the buffer file contents are copied through: big enough that a large file costs few
/// read/write syscalls, small enough to stay cheap per unpack.
const COPY_BUF: usize = 256 * 1024;
/// Size of the buffer in front of the (compressed) blob. Tar headers are read 512 bytes at a time;
/// without it each would be its own read syscall on an uncompressed blob.
const READ_BUF: usize = 128 * 1024;

/// How every directory below the destination is resolved: no `..` above the start, no symlinks
/// at all (the layer's own symlinks are data for the container, never for us), no /proc magic.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);
/// How directories are opened. `O_NOFOLLOW` matters on the component-at-a-time fallback walk.
const DIR_OPEN: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
/// How regular files are created: never through an existing name, let alone a symlink.
const FILE_CREATE: OFlags =
    OFlags::WRONLY.union(OFlags::CREATE).union(OFlags::EXCL).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// The compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Detects from the first bytes (gzip 1f 8b, zstd 28 b5 2f fd, else uncompressed tar).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// What [`unpack`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The sha256 of the whole uncompressed tar stream: what an image config's `rootfs.diff_ids`
    /// lists for this layer.
    pub diff_id: Digest,
    /// Bytes of regular-file contents written.
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening layer blob {path}: {source}")]
    Blob { path: PathBuf, source: io::Error },
    #[error("opening layer destination {path}: {source}")]
    Dest { path: PathBuf, source: io::Error },
    #[error("reading layer tar stream: {0}")]
    Stream(#[source] io::Error),
    #[error("layer entry {entry:?}: path escapes the layer directory")]
    Escape { entry: String },
    #[error("layer entry {entry:?}: path goes through a symlink")]
    ThroughSymlink { entry: String },
    #[error("layer entry {entry:?}: a parent path component is not a directory")]
    ParentNotDir { entry: String },
    #[error("layer entry {entry:?}: replaces a symlink")]
    ReplacesSymlink { entry: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} escapes the layer directory")]
    LinkEscape { entry: String, target: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} goes through a symlink")]
    LinkThroughSymlink { entry: String, target: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} does not exist in this layer")]
    LinkMissing { entry: String, target: String },
    #[error("layer entry {entry:?}: {reason}")]
    Invalid { entry: String, reason: String },
    #[error("layer entry {entry:?}: {what}: {source}")]
    Io { entry: String, what: &'static str, source: io::Error },
}

/// Unpacks the layer blob at `blob` into `dest`, an existing empty directory. Returns the
/// diff_id: the sha256 of the uncompressed tar stream (the whole stream, read to its end).
///
/// Nothing is synced to disk: the caller syncs once when it has unpacked what it needs. On any
/// error `dest` is left partly written, and the caller deletes it.
pub fn unpack(blob: &Path, dest: &Path) -> Result<Unpacked, Error> {
    let file = File::open(blob).map_err(|source| Error::Blob { path: blob.to_path_buf(), source })?;
    unpack_reader(file, dest)
}

/// Same as [`unpack`], from any reader of the (possibly compressed) blob bytes.
pub fn unpack_reader(r: impl Read, dest: &Path) -> Result<Unpacked, Error> {
    unpack_with(r, dest, true)
}

/// [`unpack_reader`], optionally without openat2 (as on kernels before 5.6), for the tests.
fn unpack_with(mut r: impl Read, dest: &Path, use_openat2: bool) -> Result<Unpacked, Error> {
    // Not DIR_OPEN: the caller chose `dest`, and may reach it through a symlink of its own.
    let root = rfs::open(dest, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::Dest { path: dest.to_path_buf(), source: e.into() })?;

    let mut head = [0u8; 4];
    let n = read_head(&mut r, &mut head).map_err(Error::Stream)?;
    let compression = Compression::sniff(&head[..n]);
    // The sniffed bytes were consumed from `r`: put them back in front of it.
    let raw = BufReader::with_capacity(READ_BUF, (&head[..n]).chain(r));
    let plain: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(Error::Stream)?),
    };

    // The diff_id is hashed from exactly the bytes the tar reader consumes, so the layer is read
    // once and never held in memory.
    let mut archive = tar::Archive::new(HashingReader { inner: plain, hasher: Sha256::new() });
    let mut unpacker = Unpacker::new(root);
    unpacker.openat2 = use_openat2;
    for entry in archive.entries().map_err(Error::Stream)? {
        let mut entry = entry.map_err(Error::Stream)?;
        unpacker.entry(&mut entry)?;
    }
    unpacker.finish()?;

    // The tar reader stops at the first zero block; the stream goes on (a second zero block,
    // then padding to the writer's record size) and the diff_id covers all of it.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(Error::Stream)?;
    Ok(Unpacked { diff_id: Digest::from_hasher(rest.hasher), size: unpacker.written })
}

/// Reads up to `head.len()` bytes, fewer only at end of stream (a pipe may deliver less per read).
fn read_head(r: &mut impl Read, head: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A path inside the layer, normalised: components joined by `/`, with no empty, `.` or `..`
/// component. The empty path is the layer root.
struct Rel {
    path: Vec<u8>,
    /// Where the last component starts in `path`.
    name_at: usize,
}

impl Rel {
    /// `None` for a path that could leave the layer: absolute, or with a `..` component.
    fn parse(raw: &[u8]) -> Option<Rel> {
        if raw.first() == Some(&b'/') {
            return None;
        }
        let mut path = Vec::with_capacity(raw.len());
        let mut name_at = 0;
        for comp in raw.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => continue,
                b".." => return None,
                _ => {}
            }
            if !path.is_empty() {
                path.push(b'/');
            }
            name_at = path.len();
            path.extend_from_slice(comp);
        }
        Some(Rel { path, name_at })
    }

    fn is_root(&self) -> bool {
        self.path.is_empty()
    }

    fn parent(&self) -> &[u8] {
        &self.path[..self.name_at.saturating_sub(1)]
    }

    fn name(&self) -> &[u8] {
        &self.path[self.name_at..]
    }
}

/// An entry's metadata, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<Meta, Error> {
        let bad = |what: &str, e: io::Error| Error::Invalid {
            entry: lossy(raw),
            reason: format!("unreadable {what} in its tar header: {e}"),
        };
        let id = |what: &str, v: u64| {
            // u32::MAX is chown's "leave unchanged", never a real id.
            u32::try_from(v)
                .ok()
                .filter(|&v| v != u32::MAX)
                .ok_or_else(|| Error::Invalid { entry: lossy(raw), reason: format!("{what} {v} is out of range") })
        };
        // An empty numeric field means 0, as in Go's archive/tar (which wrote most layers).
        let num = |what: &str, field: &[u8], v: io::Result<u64>| match v {
            Err(_) if field.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            v => v.map_err(|e| bad(what, e)),
        };
        let h = entry.header();
        let old = h.as_old();
        // PAX uid/gid records are already folded into the header by the tar crate.
        let mode = num("mode", &old.mode, h.mode().map(u64::from))? as u32 & 0o7777;
        let uid = id("uid", num("uid", &old.uid, h.uid())?)?;
        let gid = id("gid", num("gid", &old.gid, h.gid())?)?;
        let secs = num("mtime", &old.mtime, h.mtime())?;
        let mut mtime = Timespec { tv_sec: i64::try_from(secs).unwrap_or(i64::MAX), tv_nsec: 0 };

        let mut xattrs = Vec::new();
        if let Some(records) = entry.pax_extensions().map_err(Error::Stream)? {
            for record in records {
                let record = record.map_err(|e| bad("PAX record", e))?;
                let key = record.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if wanted_xattr(name) {
                        xattrs.push((name.to_vec(), record.value_bytes().to_vec()));
                    } else {
                        tracing::debug!(entry = %lossy(raw), xattr = %lossy(name), "skipping layer xattr");
                    }
                } else if key == b"mtime" {
                    if let Some(t) = parse_pax_time(record.value_bytes()) {
                        mtime = t;
                    }
                }
            }
        }
        Ok(Meta { mode, uid, gid, mtime, xattrs })
    }

    fn times(&self) -> Timestamps {
        // Tar keeps no atime worth restoring; umoci and docker use the mtime for both too.
        Timestamps { last_access: self.mtime, last_modification: self.mtime }
    }

    fn owner(&self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
    }
}

/// Which xattrs a layer may set. `trusted.overlay.*` is refused because it steers overlayfs
/// itself (redirects, metacopy, opacity): only our own whiteout translation writes it. Other
/// namespaces (`security.selinux`, ACLs) depend on the host and are not part of the image.
pub(crate) fn wanted_xattr(name: &[u8]) -> bool {
    if name.starts_with(b"trusted.overlay.") {
        return false;
    }
    name.starts_with(b"user.") || name.starts_with(b"trusted.") || name == b"security.capability"
}

/// Parses a PAX time, `SECONDS[.FRACTION]`, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nsec: i64 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.as_bytes().get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    // "-1.5" is one and a half seconds before the epoch: -2 s + 0.5 s.
    if s.starts_with('-') && nsec > 0 {
        return Some(Timespec { tv_sec: secs.checked_sub(1)?, tv_nsec: 1_000_000_000 - nsec });
    }
    Some(Timespec { tv_sec: secs, tv_nsec: nsec })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn io_err(raw: &[u8], what: &'static str, e: impl Into<io::Error>) -> Error {
    Error::Io { entry: lossy(raw), what, source: e.into() }
}

/// Maps a failure to reach an entry's parent directory to the refusal it means.
fn parent_err(raw: &[u8], e: Errno) -> Error {
    match e {
        Errno::LOOP => Error::ThroughSymlink { entry: lossy(raw) },
        Errno::XDEV => Error::Escape { entry: lossy(raw) },
        Errno::NOTDIR => Error::ParentNotDir { entry: lossy(raw) },
        e => io_err(raw, "opening its parent directory", e),
    }
}

/// Opens the existing directory `path` (normalised, non-empty) beneath `root`, refusing symlinks
/// anywhere on the way with `ELOOP`.
fn open_dir_beneath(root: BorrowedFd<'_>, path: &[u8], openat2: &mut bool) -> Result<OwnedFd, Errno> {
    if *openat2 {
        // EAGAIN: the kernel saw a concurrent rename somewhere and would rather we retry.
        for _ in 0..4 {
            match rfs::openat2(root, path, DIR_OPEN, Mode::empty(), RESOLVE) {
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => {
                    *openat2 = false;
                    break;
                }
                r => return r.map_err(|e| classify(root, path, e)),
            }
        }
    }
    walk(root, path, false)
}

/// Refines ENOTDIR into ELOOP when what stood in the way is a symlink: the kernel says ENOTDIR for
/// a symlink as the last component under `O_NOFOLLOW | O_DIRECTORY`. Only picks the error to
/// report, after the kernel already refused, so it may look things up by path.
fn classify(root: BorrowedFd<'_>, path: &[u8], e: Errno) -> Errno {
    if e != Errno::NOTDIR {
        return e;
    }
    let mut end = 0;
    while end < path.len() {
        end = path[end + 1..].iter().position(|&b| b == b'/').map_or(path.len(), |i| end + 1 + i);
        // Every shorter prefix was a real directory, so this lookup follows no symlink.
        match rfs::statat(root, &path[..end], AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {}
                FileType::Symlink => return Errno::LOOP,
                _ => return e,
            },
            Err(_) => return e,
        }
    }
    e
}

/// Opens `path` beneath `root` one component at a time, each with `O_NOFOLLOW | O_DIRECTORY`
/// relative to the previous one (the components hold no `/` and no `..`, so this is as confined
/// as openat2's RESOLVE_BENEATH), creating missing directories (0755, like docker) when `create`.
fn walk(root: BorrowedFd<'_>, path: &[u8], create: bool) -> Result<OwnedFd, Errno> {
    walk_inner(root, path, create).map_err(|e| classify(root, path, e))
}

fn walk_inner(root: BorrowedFd<'_>, path: &[u8], create: bool) -> Result<OwnedFd, Errno> {
    let mut cur: Option<OwnedFd> = None;
    for comp in path.split(|&b| b == b'/') {
        let at = cur.as_ref().map_or(root, |fd| fd.as_fd());
        let next = match rfs::openat(at, comp, DIR_OPEN, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rfs::mkdirat(at, comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
                rfs::openat(at, comp, DIR_OPEN, Mode::empty())?
            }
            r => r?,
        };
        cur = Some(next);
    }
    cur.ok_or(Errno::INVAL)
}

/// Returns a directory fd for `parent` (creating it if missing), from the one-entry cache when
/// it holds that directory: consecutive tar entries nearly always share their parent, so most
/// entries cost no lookup at all.
///
/// The cache never goes stale: the only path ever removed is the current entry's own (when a
/// later entry replaces it), and by then the cache holds that entry's parent, which is not under
/// it, or, for an entry at the top, nothing.
fn parent_dir<'a>(
    root: &'a OwnedFd,
    cache: &'a mut Option<(Vec<u8>, OwnedFd)>,
    openat2: &mut bool,
    parent: &[u8],
    raw: &[u8],
) -> Result<BorrowedFd<'a>, Error> {
    if parent.is_empty() {
        // The cached directory may be under this entry, which may be about to replace it.
        *cache = None;
        return Ok(root.as_fd());
    }
    let hit = cache.as_ref().is_some_and(|(key, _)| key.as_slice() == parent);
    if !hit {
        let fd = match open_dir_beneath(root.as_fd(), parent, openat2) {
            Err(Errno::NOENT) => walk(root.as_fd(), parent, true),
            r => r,
        }
        .map_err(|e| parent_err(raw, e))?;
        return Ok(cache.insert((parent.to_vec(), fd)).1.as_fd());
    }
    let cached: &'a Option<(Vec<u8>, OwnedFd)> = cache;
    match cached {
        Some((_, fd)) => Ok(fd.as_fd()),
        None => unreachable!("cache was just checked to hold the parent"),
    }
}

/// What an entry is about to put at a name that is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum New {
    /// A regular file or hardlink: refused over a symlink.
    File,
    Dir,
    Other,
}

/// Clears `name` in `dir` for a later entry of the same path: a later entry replaces an earlier
/// one. Returns false when nothing was removed because a directory goes over a directory (it just
/// takes the new metadata).
fn make_room(dir: BorrowedFd<'_>, name: &[u8], new: New, raw: &[u8]) -> Result<bool, Error> {
    let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err(raw, "inspecting the entry it replaces", e))?;
    match FileType::from_raw_mode(st.st_mode) {
        // O_NOFOLLOW would keep us from writing through it anyway, but a file over a symlink is
        // how tar-slip attacks are built; no legitimate layer needs it.
        FileType::Symlink if new == New::File => Err(Error::ReplacesSymlink { entry: lossy(raw) }),
        FileType::Directory if new == New::Dir => Ok(false),
        FileType::Directory => {
            remove_tree(dir, name).map_err(|e| io_err(raw, "removing the directory it replaces", e))?;
            Ok(true)
        }
        _ => {
            rfs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| io_err(raw, "removing the entry it replaces", e))?;
            Ok(true)
        }
    }
}

/// Removes the directory `name` in `parent` and everything under it, never following symlinks.
/// Iterative, so that a hostile layer's deep tree cannot overflow the stack.
fn remove_tree(parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let top = rfs::openat(parent, name, DIR_OPEN, Mode::empty())?;
    let mut stack: Vec<(OwnedFd, Vec<u8>)> = vec![(top, name.to_vec())];
    while let Some((fd, _)) = stack.last() {
        let fd = fd.as_fd();
        let mut subdir = None;
        let mut dir = rfs::Dir::read_from(fd)?;
        while let Some(child) = dir.read() {
            let child = child?;
            let child_name = child.file_name().to_bytes();
            if child_name == b"." || child_name == b".." {
                continue;
            }
            let is_dir = match child.file_type() {
                FileType::Directory => true,
                FileType::Unknown => {
                    let st = rfs::statat(fd, child_name, AtFlags::SYMLINK_NOFOLLOW)?;
                    FileType::from_raw_mode(st.st_mode) == FileType::Directory
                }
                _ => false,
            };
            if is_dir {
                subdir = Some(child_name.to_vec());
                break;
            }
            rfs::unlinkat(fd, child_name, AtFlags::empty())?;
        }
        match subdir {
            Some(sub) => {
                let sub_fd = rfs::openat(fd, &sub, DIR_OPEN, Mode::empty())?;
                stack.push((sub_fd, sub));
            }
            None => {
                let Some((_, done)) = stack.pop() else { break };
                let at = stack.last().map_or(parent, |(fd, _)| fd.as_fd());
                rfs::unlinkat(at, &done, AtFlags::REMOVEDIR)?;
            }
        }
    }
    Ok(())
}

/// Sets `xattrs` on an open file or directory.
fn set_xattrs_fd(fd: BorrowedFd<'_>, xattrs: &[(Vec<u8>, Vec<u8>)], raw: &[u8]) -> Result<(), Error> {
    for (name, value) in xattrs {
        rfs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty())
            .map_err(|e| io_err(raw, "setting an extended attribute", e))?;
    }
    Ok(())
}

/// Sets `xattrs` on the symlink, device or fifo `name` in `dir`, which we cannot open for
/// fsetxattr. The path goes through `/proc/self/fd/DIR`, so the lookup starts at the directory we
/// already vetted, and lsetxattr does not follow `name` itself.
fn set_xattrs_at(dir: BorrowedFd<'_>, name: &[u8], xattrs: &[(Vec<u8>, Vec<u8>)], raw: &[u8]) -> Result<(), Error> {
    let mut path = None;
    for (xname, value) in xattrs {
        // The kernel allows user.* only on regular files and directories.
        if xname.starts_with(b"user.") {
            continue;
        }
        let path = path.get_or_insert_with(|| {
            let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            p.extend_from_slice(name);
            p
        });
        rfs::lsetxattr(OsStr::from_bytes(path), xname.as_slice(), value, XattrFlags::empty())
            .map_err(|e| io_err(raw, "setting an extended attribute", e))?;
    }
    Ok(())
}

/// Ownership before mode (chown clears setuid/setgid), then xattrs (chown clears
/// security.capability).
fn apply_fd_meta(fd: BorrowedFd<'_>, meta: &Meta, raw: &[u8]) -> Result<(), Error> {
    let (uid, gid) = meta.owner();
    rfs::fchown(fd, uid, gid).map_err(|e| io_err(raw, "setting its owner", e))?;
    rfs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| io_err(raw, "setting its mode", e))?;
    set_xattrs_fd(fd, &meta.xattrs, raw)
}

struct Unpacker {
    root: OwnedFd,
    /// The most recently used parent directory, by its normalised path.
    cache: Option<(Vec<u8>, OwnedFd)>,
    /// Whether openat2 is available (cleared on ENOSYS).
    openat2: bool,
    /// Directory mtimes, set in a final pass because writing a directory's children changes it.
    dir_times: Vec<(Vec<u8>, Timespec)>,
    buf: Vec<u8>,
    written: u64,
}

impl Unpacker {
    fn new(root: OwnedFd) -> Unpacker {
        Unpacker { root, cache: None, openat2: true, dir_times: Vec::new(), buf: vec![0; COPY_BUF], written: 0 }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), Error> {
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // Global PAX records (e.g. git-archive's comment) describe no file.
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let rel = Rel::parse(&raw).ok_or_else(|| Error::Escape { entry: lossy(&raw) })?;
        if let Some(hidden) = rel.name().strip_prefix(b".wh.") {
            return self.whiteout(&raw, &rel, hidden);
        }
        let is_dir = kind == EntryType::Directory
            // Pre-POSIX tars mark directories only by a trailing slash.
            || (kind == EntryType::Regular && raw.ends_with(b"/"));
        if rel.is_root() && !is_dir {
            return Err(Error::Invalid { entry: lossy(&raw), reason: "the layer root can only be a directory".into() });
        }
        let meta = Meta::read(entry, &raw)?;
        match kind {
            _ if is_dir => self.dir(&raw, &rel, &meta),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => self.file(entry, &raw, &rel, &meta),
            EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.symlink(&raw, &rel, &meta, &target)
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.hardlink(&raw, &rel, &target)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => self.node(entry.header(), kind, &raw, &rel, &meta),
            other => {
                tracing::warn!(entry = %lossy(&raw), kind = ?other, "skipping layer entry of unsupported type");
                Ok(())
            }
        }
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        rel: &Rel,
        meta: &Meta,
    ) -> Result<(), Error> {
        let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
        let name = rel.name();
        let create = || rfs::openat(dir, name, FILE_CREATE, Mode::from_raw_mode(0o600));
        let fd = match create() {
            Err(Errno::EXIST) => {
                make_room(dir, name, New::File, raw)?;
                create()
            }
            r => r,
        }
        .map_err(|e| io_err(raw, "creating file", e))?;

        let mut file = File::from(fd);
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(raw, "reading its contents from the layer", e)),
            };
            file.write_all(&self.buf[..n]).map_err(|e| io_err(raw, "writing file contents", e))?;
            written += n as u64;
        }
        if written != entry.size() {
            return Err(Error::Invalid {
                entry: lossy(raw),
                reason: format!("the layer ends {} bytes into its {} bytes of contents", written, entry.size()),
            });
        }
        self.written += written;
        apply_fd_meta(file.as_fd(), meta, raw)?;
        rfs::futimens(&file, &meta.times()).map_err(|e| io_err(raw, "setting its mtime", e))
    }

    fn dir(&mut self, raw: &[u8], rel: &Rel, meta: &Meta) -> Result<(), Error> {
        if rel.is_root() {
            apply_fd_meta(self.root.as_fd(), meta, raw)?;
            self.dir_times.push((Vec::new(), meta.mtime));
            return Ok(());
        }
        let fd = {
            let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
            let name = rel.name();
            // 0700 until the real mode is set: nobody else gets a window into a half-made tree.
            let mkdir = || rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700));
            match mkdir() {
                Err(Errno::EXIST) if make_room(dir, name, New::Dir, raw)? => mkdir(),
                Err(Errno::EXIST) => Ok(()),
                r => r,
            }
            .map_err(|e| io_err(raw, "creating directory", e))?;
            rfs::openat(dir, name, DIR_OPEN, Mode::empty())
                .map_err(|e| io_err(raw, "opening the directory it created", e))?
        };
        apply_fd_meta(fd.as_fd(), meta, raw)?;
        self.dir_times.push((rel.path.clone(), meta.mtime));
        // The next entries are most likely this directory's children.
        self.cache = Some((rel.path.clone(), fd));
        Ok(())
    }

    fn symlink(&mut self, raw: &[u8], rel: &Rel, meta: &Meta, target: &[u8]) -> Result<(), Error> {
        let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
        let name = rel.name();
        // The target is stored as-is: it is resolved inside the container, never by us.
        let create = || rfs::symlinkat(target, dir, name);
        match create() {
            Err(Errno::EXIST) => {
                make_room(dir, name, New::Other, raw)?;
                create()
            }
            r => r,
        }
        .map_err(|e| io_err(raw, "creating symlink", e))?;
        let (uid, gid) = meta.owner();
        rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(raw, "setting its owner", e))?;
        set_xattrs_at(dir, name, &meta.xattrs, raw)?;
        rfs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(raw, "setting its mtime", e))
    }

    fn node(&mut self, h: &tar::Header, kind: EntryType, raw: &[u8], rel: &Rel, meta: &Meta) -> Result<(), Error> {
        let (file_type, dev) = match kind {
            EntryType::Fifo => (FileType::Fifo, 0),
            _ => {
                let num = |v: io::Result<Option<u32>>, what| {
                    v.map(Option::unwrap_or_default).map_err(|e| Error::Invalid {
                        entry: lossy(raw),
                        reason: format!("unreadable device {what} in its tar header: {e}"),
                    })
                };
                let dev = rfs::makedev(num(h.device_major(), "major")?, num(h.device_minor(), "minor")?);
                let ft = if kind == EntryType::Char { FileType::CharacterDevice } else { FileType::BlockDevice };
                (ft, dev)
            }
        };
        let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
        let name = rel.name();
        let mode = Mode::from_raw_mode(meta.mode);
        let create = || rfs::mknodat(dir, name, file_type, mode, dev);
        match create() {
            Err(Errno::EXIST) => {
                make_room(dir, name, New::Other, raw)?;
                create()
            }
            r => r,
        }
        .map_err(|e| io_err(raw, "creating device node", e))?;
        let (uid, gid) = meta.owner();
        rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(raw, "setting its owner", e))?;
        // fchmodat cannot refuse to follow a symlink, but `name` is the node mknodat just made in a
        // directory only this unpack writes to, so there is nothing to follow. The mode is set
        // again because mknodat's is cut by the umask and chown cleared any setuid bit.
        rfs::chmodat(dir, name, mode, AtFlags::empty()).map_err(|e| io_err(raw, "setting its mode", e))?;
        set_xattrs_at(dir, name, &meta.xattrs, raw)?;
        rfs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(raw, "setting its mtime", e))
    }

    fn hardlink(&mut self, raw: &[u8], rel: &Rel, target_raw: &[u8]) -> Result<(), Error> {
        let (entry, target) = (|| lossy(raw), || lossy(target_raw));
        let to = Rel::parse(target_raw).ok_or_else(|| Error::LinkEscape { entry: entry(), target: target() })?;
        if to.is_root() {
            return Err(Error::Invalid { entry: entry(), reason: "hardlink to the layer root".into() });
        }
        let to_dir_owned;
        let to_dir = if to.parent().is_empty() {
            self.root.as_fd()
        } else {
            to_dir_owned =
                open_dir_beneath(self.root.as_fd(), to.parent(), &mut self.openat2).map_err(|e| match e {
                    Errno::LOOP => Error::LinkThroughSymlink { entry: entry(), target: target() },
                    Errno::XDEV => Error::LinkEscape { entry: entry(), target: target() },
                    Errno::NOENT | Errno::NOTDIR => Error::LinkMissing { entry: entry(), target: target() },
                    e => io_err(raw, "opening its hardlink target's directory", e),
                })?;
            to_dir_owned.as_fd()
        };
        let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
        let name = rel.name();
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself, whatever it points at.
        let link = || rfs::linkat(to_dir, to.name(), dir, name, AtFlags::empty());
        let linked = match link() {
            Err(Errno::EXIST) => {
                let here = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
                let there = rfs::statat(to_dir, to.name(), AtFlags::SYMLINK_NOFOLLOW);
                match (here, there) {
                    // A repeated hardlink entry: already done.
                    (Ok(a), Ok(b)) if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) => Ok(()),
                    _ => {
                        make_room(dir, name, New::File, raw)?;
                        link()
                    }
                }
            }
            r => r,
        };
        match linked {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(Error::LinkMissing { entry: entry(), target: target() }),
            Err(e) => Err(io_err(raw, "creating hardlink", e)),
        }
    }

    /// `hidden` is the name after `.wh.`.
    fn whiteout(&mut self, raw: &[u8], rel: &Rel, hidden: &[u8]) -> Result<(), Error> {
        if hidden == b".wh..opq" {
            let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
            return rfs::fsetxattr(dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| io_err(raw, "marking its directory opaque", e));
        }
        if hidden.starts_with(b".wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): nothing overlayfs needs.
            tracing::debug!(entry = %lossy(raw), "skipping aufs metadata in layer");
            return Ok(());
        }
        match hidden {
            b".." => return Err(Error::Escape { entry: lossy(raw) }),
            b"" | b"." => return Err(Error::Invalid { entry: lossy(raw), reason: "whiteout hides no name".into() }),
            _ => {}
        }
        let dir = parent_dir(&self.root, &mut self.cache, &mut self.openat2, rel.parent(), raw)?;
        match rfs::mknodat(dir, hidden, FileType::CharacterDevice, Mode::empty(), rfs::makedev(0, 0)) {
            // A whiteout hides lower layers' files only, never its own layer's (OCI image spec);
            // the file already here is in the upper of the two layers and hides the lower one anyway.
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(io_err(raw, "creating whiteout device", e)),
        }
    }

    fn finish(&mut self) -> Result<(), Error> {
        self.cache = None;
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let times = Timestamps { last_access: mtime, last_modification: mtime };
            let opened;
            let fd = if path.is_empty() {
                self.root.as_fd()
            } else {
                match open_dir_beneath(self.root.as_fd(), &path, &mut self.openat2) {
                    Ok(fd) => {
                        opened = fd;
                        opened.as_fd()
                    }
                    // A later entry replaced this directory or one above it: its mtime is gone too.
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                    Err(e) => return Err(io_err(&path, "reopening directory to set its mtime", e)),
                }
            };
            rfs::futimens(fd, &times).map_err(|e| io_err(&path, "setting its mtime", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    const MTIME: u64 = 1_600_000_000;

    /// Builds tar streams from raw headers, so that the hostile names the tar crate's own path
    /// setters refuse (`..`, absolute) can be written too.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Tar {
            Tar(tar::Builder::new(Vec::new()))
        }

        fn header(path: &str, kind: EntryType, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            let name = &mut h.as_old_mut().name;
            assert!(path.len() <= name.len(), "test path too long for a plain header");
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(MTIME);
            h.set_uid(0);
            h.set_gid(0);
            h
        }

        fn add(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Tar {
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Tar {
            self.add(Self::header(path, EntryType::Regular, mode), data)
        }

        fn owned_file(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Tar {
            let mut h = Self::header(path, EntryType::Regular, mode);
            h.set_uid(uid);
            h.set_gid(gid);
            self.add(h, data)
        }

        fn dir(&mut self, path: &str, mode: u32) -> &mut Tar {
            self.add(Self::header(path, EntryType::Directory, mode), b"")
        }

        fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Tar {
            let mut h = Self::header(path, kind, 0o777);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            self.add(h, b"")
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Tar {
            self.link(EntryType::Symlink, path, target)
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Tar {
            self.link(EntryType::Link, path, target)
        }

        fn node(&mut self, path: &str, kind: EntryType, mode: u32, major: u32, minor: u32) -> &mut Tar {
            let mut h = Self::header(path, kind, mode);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.add(h, b"")
        }

        /// A PAX header for the next entry.
        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
            let mut data = Vec::new();
            for (key, value) in records {
                // "LEN KEY=VALUE\n", where LEN counts its own digits too.
                let body = key.len() + value.len() + 3;
                let mut len = body + 1;
                while body + len.to_string().len() != len {
                    len = body + len.to_string().len();
                }
                data.extend_from_slice(format!("{len} {key}=").as_bytes());
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            self.add(Self::header("PaxHeaders/entry", EntryType::XHeader, 0o644), &data)
        }

        fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = [0u8; 256];
        let n = rfs::lgetxattr(path, name, &mut buf[..]).ok()?;
        Some(buf[..n].to_vec())
    }

    fn kind(path: &Path) -> fs::FileType {
        fs::symlink_metadata(path).unwrap().file_type()
    }

    const BIG: usize = 1_000_000;

    /// A `vfs_cap_data` (revision 2, effective): cap_net_bind_service=ep.
    const CAP_NET_BIND_SERVICE_EP: &[u8] = &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    /// A layer with one of everything.
    fn sample_layer() -> Vec<u8> {
        let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        let mut t = Tar::new();
        t.dir("./", 0o755)
            .dir("etc/", 0o755)
            .pax(&[
                ("SCHILY.xattr.user.foo", b"bar"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
                ("mtime", b"1600000000.5"),
            ])
            .owned_file("etc/passwd", 0o640, 1234, 5678, b"root:x:0:0::/root:/bin/sh\n")
            // No usr/ or usr/bin/ entries: parents are created as needed.
            .owned_file("usr/bin/sudo", 0o4755, 1234, 5678, b"#!setuid")
            .owned_file("usr/bin/wall", 0o2755, 0, 5678, b"#!setgid")
            .hardlink("usr/bin/sudoedit", "usr/bin/sudo")
            .dir("tmp/", 0o1777)
            .dir("ro/", 0o555)
            .file("ro/inside", 0o444, b"read only")
            // user.* cannot be set on a symlink (the kernel refuses): skipped, not an error.
            .pax(&[("SCHILY.xattr.trusted.berth", b"t"), ("SCHILY.xattr.user.skipped", b"u")])
            .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
            .pax(&[("SCHILY.xattr.security.capability", CAP_NET_BIND_SERVICE_EP)])
            .file("usr/bin/ping", 0o755, b"")
            .symlink("usr/lib64", "../lib")
            .node("dev/null", EntryType::Char, 0o666, 1, 3)
            .node("dev/sda", EntryType::Block, 0o660, 8, 0)
            .node("run/fifo", EntryType::Fifo, 0o600, 0, 0)
            .file("big", 0o644, &big);
        let mut bytes = t.finish();
        // GNU tar pads to a 10 KiB record: the diff_id covers the padding too.
        bytes.resize(bytes.len().next_multiple_of(10240), 0);
        bytes
    }

    #[test]
    fn unpacks_a_normal_layer() {
        let bytes = sample_layer();
        let dest = tempfile::tempdir().unwrap();
        let d = dest.path();
        let out = unpack_reader(&bytes[..], d).unwrap();
        assert_eq!(out.diff_id, Digest::of(&bytes));
        assert_eq!(out.size, 26 + 8 + 8 + 9 + BIG as u64);

        let passwd = fs::symlink_metadata(d.join("etc/passwd")).unwrap();
        assert_eq!(fs::read(d.join("etc/passwd")).unwrap(), b"root:x:0:0::/root:/bin/sh\n");
        assert_eq!((passwd.mode() & 0o7777, passwd.uid(), passwd.gid()), (0o640, 1234, 5678));
        assert_eq!((passwd.mtime(), passwd.mtime_nsec()), (1_600_000_000, 500_000_000));
        assert_eq!(xattr(&d.join("etc/passwd"), "user.foo").as_deref(), Some(&b"bar"[..]));
        assert_eq!(xattr(&d.join("etc/passwd"), "trusted.overlay.redirect"), None);

        let sudo = fs::symlink_metadata(d.join("usr/bin/sudo")).unwrap();
        assert_eq!((sudo.mode() & 0o7777, sudo.uid(), sudo.gid()), (0o4755, 1234, 5678));
        let wall = fs::symlink_metadata(d.join("usr/bin/wall")).unwrap();
        assert_eq!((wall.mode() & 0o7777, wall.uid(), wall.gid()), (0o2755, 0, 5678));
        let sudoedit = fs::symlink_metadata(d.join("usr/bin/sudoedit")).unwrap();
        assert_eq!((sudoedit.ino(), sudoedit.nlink()), (sudo.ino(), 2));
        assert!(kind(&d.join("usr/bin")).is_dir());

        assert_eq!(fs::symlink_metadata(d.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
        assert_eq!(fs::symlink_metadata(d.join("ro")).unwrap().mode() & 0o7777, 0o555);
        assert_eq!(fs::read(d.join("ro/inside")).unwrap(), b"read only");

        assert!(kind(&d.join("etc/localtime")).is_symlink());
        assert_eq!(fs::read_link(d.join("etc/localtime")).unwrap(), Path::new("/usr/share/zoneinfo/UTC"));
        assert_eq!(fs::symlink_metadata(d.join("etc/localtime")).unwrap().mtime(), MTIME as i64);
        assert_eq!(fs::read_link(d.join("usr/lib64")).unwrap(), Path::new("../lib"));
        assert_eq!(xattr(&d.join("etc/localtime"), "trusted.berth").as_deref(), Some(&b"t"[..]));
        let ping = d.join("usr/bin/ping");
        assert_eq!(xattr(&ping, "security.capability").as_deref(), Some(CAP_NET_BIND_SERVICE_EP));

        let null = fs::symlink_metadata(d.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!((null.rdev(), null.mode() & 0o7777), (rfs::makedev(1, 3), 0o666));
        let sda = fs::symlink_metadata(d.join("dev/sda")).unwrap();
        assert!(sda.file_type().is_block_device());
        assert_eq!(sda.rdev(), rfs::makedev(8, 0));
        let fifo = fs::symlink_metadata(d.join("run/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o600);

        let big = fs::read(d.join("big")).unwrap();
        assert_eq!(big.len(), BIG);
        assert!(big.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));

        // Directory mtimes survive the files written into them afterwards.
        for dir in [".", "etc", "ro", "tmp"] {
            assert_eq!(fs::symlink_metadata(d.join(dir)).unwrap().mtime(), MTIME as i64, "{dir}");
        }
        assert_eq!(fs::symlink_metadata(d).unwrap().mode() & 0o7777, 0o755);
    }

    #[test]
    fn translates_whiteouts() {
        let mut t = Tar::new();
        t.dir("a/", 0o755)
            .file("a/keep", 0o644, b"kept")
            .file("a/.wh.gone", 0o644, b"")
            .file("b/.wh..wh..opq", 0o644, b"")
            .dir("c/", 0o755)
            .file("c/.wh..wh.plnk", 0o644, b"")
            // A whiteout never hides a file of its own layer.
            .file("c/mine", 0o644, b"mine")
            .file("c/.wh.mine", 0o644, b"")
            .dir("o/", 0o750)
            .file("o/.wh..wh..opq", 0o644, b"")
            // A later entry for the same directory only updates its metadata.
            .dir("o/", 0o700)
            .file(".wh.top", 0o644, b"");
        let bytes = t.finish();
        let dest = tempfile::tempdir().unwrap();
        let d = dest.path();
        unpack_reader(&bytes[..], d).unwrap();

        for wh in ["a/gone", "top"] {
            let m = fs::symlink_metadata(d.join(wh)).unwrap();
            assert!(m.file_type().is_char_device(), "{wh}");
            assert_eq!(m.rdev(), 0, "{wh}");
        }
        assert_eq!(fs::read(d.join("a/keep")).unwrap(), b"kept");
        assert!(kind(&d.join("b")).is_dir());
        assert_eq!(xattr(&d.join("b"), OPAQUE_XATTR).as_deref(), Some(&b"y"[..]));
        assert_eq!(xattr(&d.join("o"), OPAQUE_XATTR).as_deref(), Some(&b"y"[..]));
        assert_eq!(fs::symlink_metadata(d.join("o")).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(xattr(&d.join("a"), OPAQUE_XATTR), None);
        assert_eq!(fs::read(d.join("c/mine")).unwrap(), b"mine");
        let mut names: Vec<String> = Vec::new();
        for dir in ["", "a", "b", "c", "o"] {
            for e in fs::read_dir(d.join(dir)).unwrap() {
                names.push(e.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
        assert!(names.iter().all(|n| !n.starts_with(".wh.")), "{names:?}");
    }

    /// Checks that overlayfs itself reads the translated whiteouts as intended. Needs root and
    /// overlayfs; where mounting is not allowed it checks nothing.
    #[test]
    fn overlayfs_honours_translated_whiteouts() {
        let base = tempfile::tempdir().unwrap();
        let (lower, upper, mnt) = (base.path().join("l"), base.path().join("u"), base.path().join("m"));
        for d in [&lower, &upper, &mnt] {
            fs::create_dir(d).unwrap();
        }
        let mut t = Tar::new();
        t.dir("a/", 0o755).file("a/keep", 0o644, b"").file("a/gone", 0o644, b"");
        t.dir("b/", 0o755).file("b/old", 0o644, b"");
        unpack_reader(&t.finish()[..], &lower).unwrap();
        let mut t = Tar::new();
        t.dir("a/", 0o755).file("a/.wh.gone", 0o644, b"");
        t.dir("b/", 0o755).file("b/.wh..wh..opq", 0o644, b"").file("b/new", 0o644, b"");
        unpack_reader(&t.finish()[..], &upper).unwrap();

        let opts = format!("lowerdir={}:{}", upper.display(), lower.display());
        let opts = std::ffi::CString::new(opts).unwrap();
        let flags = rustix::mount::MountFlags::RDONLY;
        if rustix::mount::mount("overlay", &mnt, "overlay", flags, opts.as_c_str()).is_err() {
            return;
        }
        let seen = |p: &str| fs::symlink_metadata(mnt.join(p)).is_ok();
        let checks = [seen("a/keep"), !seen("a/gone"), !seen("b/old"), seen("b/new")];
        rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH).unwrap();
        assert_eq!(checks, [true; 4]);
    }

    /// Everything about a tree that unpacking should reproduce.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                let m = fs::symlink_metadata(&path).unwrap();
                let what = if m.is_dir() {
                    todo.push(path.clone());
                    String::new()
                } else if m.is_symlink() {
                    fs::read_link(&path).unwrap().display().to_string()
                } else if m.is_file() {
                    Digest::of(&fs::read(&path).unwrap()).to_string()
                } else {
                    format!("rdev {}", m.rdev())
                };
                // Parent directories the archive doesn't list are created at unpack time: their
                // mtime is "now", which differs between two unpacks a second apart.
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
                let mtime = if m.is_dir() && (now - m.mtime()).abs() < 3600 {
                    "now".to_string()
                } else {
                    m.mtime().to_string()
                };
                let desc = format!("{:o} {}:{} {mtime} {} {what}", m.mode(), m.uid(), m.gid(), m.nlink());
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), desc);
            }
        }
        out
    }

    /// Hands out at most 1000 bytes a read, like a pipe or a slow network stream.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn compressed_layers_give_the_same_tree_and_diff_id() {
        let tar_bytes = sample_layer();
        let gzip = |data: &[u8]| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        };
        // pigz and some registries write several gzip members back to back.
        let (first, second) = tar_bytes.split_at(tar_bytes.len() / 3);
        let multi_gzip = [gzip(first), gzip(second)].concat();
        let blobs = [
            (Compression::None, tar_bytes.clone()),
            (Compression::Gzip, gzip(&tar_bytes)),
            (Compression::Gzip, multi_gzip),
            (Compression::Zstd, zstd::stream::encode_all(&tar_bytes[..], 3).unwrap()),
        ];

        let plain = tempfile::tempdir().unwrap();
        unpack_reader(&tar_bytes[..], plain.path()).unwrap();
        let expected = snapshot(plain.path());
        assert!(expected.len() > 10);
        let walked = tempfile::tempdir().unwrap();
        unpack_with(&tar_bytes[..], walked.path(), false).unwrap();
        assert_eq!(snapshot(walked.path()), expected);
        for (i, (compression, blob)) in blobs.iter().enumerate() {
            assert_eq!(Compression::sniff(blob), *compression);
            let work = tempfile::tempdir().unwrap();
            let file = work.path().join("blob");
            fs::write(&file, blob).unwrap();
            for (j, how) in ["path", "trickle"].into_iter().enumerate() {
                let dest = work.path().join(format!("dest{j}"));
                fs::create_dir(&dest).unwrap();
                let out = match how {
                    "path" => unpack(&file, &dest),
                    _ => unpack_reader(Trickle(blob), &dest),
                }
                .unwrap();
                assert_eq!(out.diff_id, Digest::of(&tar_bytes), "blob {i} via {how}");
                assert_eq!(out.size, 26 + 8 + 8 + 9 + BIG as u64);
                assert_eq!(snapshot(&dest), expected, "blob {i} via {how}");
            }
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let mut t = Tar::new();
        t.file("x", 0o644, b"one")
            .file("x", 0o600, b"two")
            .dir("d/", 0o700)
            .file("d/f", 0o644, b"f")
            .dir("d/", 0o750)
            .dir("e/", 0o755)
            .file("e/sub/deep/file", 0o644, b"deep")
            .symlink("e/sub/link", "/etc")
            .file("e", 0o644, b"now a file")
            .file("g", 0o644, b"")
            .dir("g/", 0o755)
            .symlink("s", "x")
            .symlink("s", "y")
            .symlink("t", "/etc")
            .dir("t/", 0o755)
            .hardlink("h", "x")
            .hardlink("h", "x")
            .file("n", 0o644, b"")
            .node("n", EntryType::Fifo, 0o644, 0, 0)
            .dir("r/sub/", 0o755)
            .file("r", 0o644, b"")
            .dir("r/", 0o755)
            .file("r/sub/new", 0o644, b"new");
        let bytes = t.finish();
        let dest = tempfile::tempdir().unwrap();
        let d = dest.path();
        unpack_reader(&bytes[..], d).unwrap();
        assert_eq!(fs::read(d.join("x")).unwrap(), b"two");
        assert_eq!(fs::symlink_metadata(d.join("x")).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(fs::symlink_metadata(d.join("d")).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(fs::read(d.join("d/f")).unwrap(), b"f");
        assert_eq!(fs::read(d.join("e")).unwrap(), b"now a file");
        assert!(kind(&d.join("g")).is_dir());
        assert_eq!(fs::read_link(d.join("s")).unwrap(), Path::new("y"));
        assert!(kind(&d.join("t")).is_dir());
        assert_eq!(fs::symlink_metadata(d.join("h")).unwrap().ino(), fs::symlink_metadata(d.join("x")).unwrap().ino());
        assert!(kind(&d.join("n")).is_fifo());
        assert_eq!(fs::read(d.join("r/sub/new")).unwrap(), b"new");
    }

    #[test]
    fn reads_long_names() {
        let long_dir = "a".repeat(120);
        let long_file = format!("{long_dir}/{}", "b".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(4);
        // A GNU long name, written by the tar crate itself.
        b.append_data(&mut h, &long_file, &b"long"[..]).unwrap();
        let mut t = Tar(b);
        t.pax(&[("path", format!("{long_dir}/pax-named").as_bytes())]).file("short", 0o644, b"pax");
        t.pax(&[("linkpath", long_file.as_bytes())]).hardlink("linked", "ignored");
        let bytes = t.finish();
        let dest = tempfile::tempdir().unwrap();
        unpack_reader(&bytes[..], dest.path()).unwrap();
        assert_eq!(fs::read(dest.path().join(&long_file)).unwrap(), b"long");
        assert_eq!(fs::read(dest.path().join(&long_dir).join("pax-named")).unwrap(), b"pax");
        assert_eq!(fs::read(dest.path().join("linked")).unwrap(), b"long");
        assert!(!dest.path().join("short").exists());
    }

    /// Unpacks a hostile layer built by `build` (given the path of a directory outside the
    /// destination holding one file, `secret`), expects a refusal naming `entry`, and checks that
    /// nothing outside the destination changed.
    fn refused(entry: &str, build: impl FnOnce(&mut Tar, &str)) -> Error {
        let base = tempfile::tempdir().unwrap();
        let dest = base.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"secret").unwrap();
        let mut t = Tar::new();
        t.dir("./", 0o755).file("innocent", 0o644, b"x");
        build(&mut t, outside.path().to_str().unwrap());
        let bytes = t.finish();

        let err = unpack_reader(&bytes[..], &dest).unwrap_err();
        let entry = entry.replace("<outside>", outside.path().to_str().unwrap());
        assert!(err.to_string().starts_with(&format!("layer entry {entry:?}: ")), "{err}");
        // The component-at-a-time walk used without openat2 refuses the same way.
        let dest2 = base.path().join("dest2");
        fs::create_dir(&dest2).unwrap();
        let err2 = unpack_with(&bytes[..], &dest2, false).unwrap_err();
        assert_eq!(err2.to_string(), err.to_string());
        fs::remove_dir_all(&dest2).unwrap();
        let names = |p: &Path| -> Vec<String> {
            let mut v: Vec<String> =
                fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        };
        assert_eq!(names(outside.path()), ["secret"], "{err}");
        let secret = outside.path().join("secret");
        assert_eq!(fs::read(&secret).unwrap(), b"secret", "{err}");
        assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1, "{err}");
        assert_eq!(xattr(outside.path(), OPAQUE_XATTR), None, "{err}");
        assert_eq!(names(base.path()), ["dest"], "{err}");
        err
    }

    #[test]
    fn refuses_paths_that_escape() {
        let e = refused("../escape", |t, _| {
            t.file("../escape", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
        let e = refused("a/../../x", |t, _| {
            t.file("a/../../x", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
        let e = refused("/abs", |t, _| {
            t.file("/abs", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
        let e = refused("<outside>/pwned", |t, outside| {
            t.file(&format!("{outside}/pwned"), 0o644, b"pwned");
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
        // PAX paths are checked as strictly as header names.
        let e = refused("../pax", |t, _| {
            t.pax(&[("path", b"../pax")]).file("harmless", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
        let e = refused("..", |t, _| {
            t.dir("..", 0o777);
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
    }

    #[test]
    fn refuses_paths_through_symlinks() {
        let e = refused("s/pwned", |t, outside| {
            t.symlink("s", outside).file("s/pwned", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::ThroughSymlink { .. }), "{e}");
        let e = refused("s/x", |t, _| {
            t.symlink("s", "..").file("s/x", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::ThroughSymlink { .. }), "{e}");
        let e = refused("d/deeper/sub/", |t, outside| {
            t.dir("d/", 0o755).symlink("d/deeper", outside).dir("d/deeper/sub/", 0o755);
        });
        assert!(matches!(e, Error::ThroughSymlink { .. }), "{e}");
        let e = refused("s/.wh.x", |t, outside| {
            t.symlink("s", outside).file("s/.wh.x", 0o644, b"");
        });
        assert!(matches!(e, Error::ThroughSymlink { .. }), "{e}");
        let e = refused("s/.wh..wh..opq", |t, outside| {
            t.symlink("s", outside).file("s/.wh..wh..opq", 0o644, b"");
        });
        assert!(matches!(e, Error::ThroughSymlink { .. }), "{e}");
        let e = refused(".wh...", |t, _| {
            t.file(".wh...", 0o644, b"");
        });
        assert!(matches!(e, Error::Escape { .. }), "{e}");
        // The directory that was "a" is gone, however recently it was used.
        let e = refused("a/b/c", |t, _| {
            t.dir("a/b/", 0o755).file("a", 0o644, b"").file("a/b/c", 0o644, b"");
        });
        assert!(matches!(e, Error::ParentNotDir { .. }), "{e}");
        let e = refused("innocent/x", |t, _| {
            t.file("innocent/x", 0o644, b"");
        });
        assert!(matches!(e, Error::ParentNotDir { .. }), "{e}");
    }

    #[test]
    fn refuses_files_over_symlinks() {
        let e = refused("f", |t, outside| {
            t.symlink("f", &format!("{outside}/secret")).file("f", 0o644, b"pwned");
        });
        assert!(matches!(e, Error::ReplacesSymlink { .. }), "{e}");
        let e = refused("h", |t, outside| {
            t.symlink("h", &format!("{outside}/secret")).hardlink("h", "innocent");
        });
        assert!(matches!(e, Error::ReplacesSymlink { .. }), "{e}");
    }

    #[test]
    fn refuses_hardlinks_that_escape() {
        let e = refused("h", |t, _| {
            t.hardlink("h", "../../etc/passwd");
        });
        assert!(matches!(e, Error::LinkEscape { .. }), "{e}");
        let e = refused("h", |t, outside| {
            t.hardlink("h", &format!("{outside}/secret"));
        });
        assert!(matches!(e, Error::LinkEscape { .. }), "{e}");
        let e = refused("h", |t, outside| {
            t.symlink("s", outside).hardlink("h", "s/secret");
        });
        assert!(matches!(e, Error::LinkThroughSymlink { .. }), "{e}");
        let e = refused("h", |t, _| {
            t.hardlink("h", "missing");
        });
        assert!(matches!(e, Error::LinkMissing { .. }), "{e}");
        assert!(e.to_string().contains("\"missing\""), "{e}");
    }

    #[test]
    fn hardlinks_to_symlinks_link_the_symlink_itself() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        fs::write(&secret, b"secret").unwrap();
        let mut t = Tar::new();
        t.symlink("l", secret.to_str().unwrap()).hardlink("h", "l");
        let dest = tempfile::tempdir().unwrap();
        unpack_reader(&t.finish()[..], dest.path()).unwrap();
        assert_eq!(fs::read_link(dest.path().join("h")).unwrap(), secret);
        assert_eq!(fs::symlink_metadata(dest.path().join("h")).unwrap().nlink(), 2);
        assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    }

    #[test]
    fn refuses_truncated_layers() {
        let mut t = Tar::new();
        t.file("f", 0o644, &[1u8; 4096]);
        let bytes = t.finish();
        let dest = tempfile::tempdir().unwrap();
        let err = unpack_reader(&bytes[..2048], dest.path()).unwrap_err();
        assert!(err.to_string().starts_with("layer entry \"f\": "), "{err}");
    }

    #[test]
    fn parses_helpers() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(Compression::sniff(b"etc/"), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);

        let rel = Rel::parse(b"./a//b/./c/").unwrap();
        assert_eq!((rel.path.as_slice(), rel.parent(), rel.name()), (&b"a/b/c"[..], &b"a/b"[..], &b"c"[..]));
        let top = Rel::parse(b"./x").unwrap();
        assert_eq!((top.parent(), top.name()), (&b""[..], &b"x"[..]));
        assert!(Rel::parse(b"./").unwrap().is_root());
        assert!(Rel::parse(b"a/../b").is_none());
        assert!(Rel::parse(b"/a").is_none());
        assert!(Rel::parse(b"a/..").is_none());
        assert!(Rel::parse(b"..a/b..").is_some());

        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1600000000"), Some((1_600_000_000, 0)));
        assert_eq!(t("1600000000.123456789123"), Some((1_600_000_000, 123_456_789)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-0.25"), Some((-1, 750_000_000)));
        assert_eq!(t("x"), None);
        assert_eq!(t("1.x"), None);
        assert_eq!(t("-9223372036854775808.5"), None);
    }
}
