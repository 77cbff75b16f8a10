//! Writing layer tars: a directory tree in overlayfs's form (an upper directory, or a layer
//! directory) becomes an OCI layer, and [`Entry`] lists become layers too (COPY, ADD).
//!
//! overlayfs → OCI: a 0/0 character device `dir/NAME` becomes `dir/.wh.NAME`, a directory with
//! `trusted.overlay.opaque=y` gets a `dir/.wh..wh..opq` entry. Hard links inside the tree stay
//! hard links. Nothing is ever followed: symlinks are entries.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const OPAQUE: &str = "trusted.overlay.opaque";
// Xattrs a layer carries: those the unpacker accepts.
use crate::layer::wanted_xattr;

/// One entry of a layer being built from pieces.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the image, relative (no leading `/`), cleaned.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    /// A host file whose contents are copied.
    File(PathBuf),
    /// Contents given inline (heredocs, downloads kept in memory).
    Bytes(Vec<u8>),
    Symlink(String),
    /// A hard link to an earlier entry of the same layer.
    Link(String),
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
}

fn header(e: &Entry) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(e.mode & 0o7777);
    h.set_uid(u64::from(e.uid));
    h.set_gid(u64::from(e.gid));
    h.set_mtime(e.mtime);
    h.set_size(0);
    h
}

/// Appends `entries` in order to `b`.
pub fn append_entries<W: Write>(b: &mut tar::Builder<W>, entries: &[Entry]) -> io::Result<()> {
    for e in entries {
        let mut h = header(e);
        match &e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, format!("{}/", e.path), io::empty())?;
            }
            Kind::File(src) => {
                let f = File::open(src)?;
                let len = f.metadata()?.len();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(len);
                b.append_data(&mut h, &e.path, f.take(len))?;
            }
            Kind::Bytes(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &e.path, data.as_slice())?;
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &e.path, target)?;
            }
            Kind::Link(target) => {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, &e.path, target)?;
            }
            Kind::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                b.append_data(&mut h, &e.path, io::empty())?;
            }
            Kind::Char(maj, min) | Kind::Block(maj, min) => {
                h.set_entry_type(if matches!(e.kind, Kind::Char(..)) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                h.set_device_major(*maj)?;
                h.set_device_minor(*min)?;
                b.append_data(&mut h, &e.path, io::empty())?;
            }
        }
    }
    Ok(())
}

/// Writes the tree under `root` (overlayfs form) as an OCI layer tar into `out`, sorted by
/// path. `skip` says which relative paths to leave out (with what is below them).
pub fn write_tree(root: &Path, out: &mut dyn Write, skip: &dyn Fn(&str) -> bool) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    walk(&mut b, root, "", &mut links, skip)?;
    b.into_inner()?.flush()
}

fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    rel: &str,
    links: &mut HashMap<(u64, u64), String>,
    skip: &dyn Fn(&str) -> bool,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let name_s = String::from_utf8_lossy(name.as_bytes()).into_owned();
        let r = if rel.is_empty() { name_s.clone() } else { format!("{rel}/{name_s}") };
        if skip(&r) {
            continue;
        }
        let md = fs::symlink_metadata(&path)?;
        let ft = md.file_type();
        let base = Entry {
            path: r.clone(),
            kind: Kind::Dir,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime().max(0) as u64,
        };
        if ft.is_char_device() && md.rdev() == 0 {
            // An overlayfs whiteout.
            let wh = match r.rsplit_once('/') {
                Some((parent, n)) => format!("{parent}/.wh.{n}"),
                None => format!(".wh.{r}"),
            };
            let e = Entry { path: wh, kind: Kind::Bytes(Vec::new()), mode: 0o644, uid: 0, gid: 0, ..base };
            append_entries(b, &[e])?;
            continue;
        }
        let xattrs = read_xattrs(&path);
        if !xattrs.is_empty() {
            let pax: Vec<(String, Vec<u8>)> = xattrs
                .iter()
                .filter(|(k, _)| wanted_xattr(k.as_bytes()))
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
                .collect();
            if !pax.is_empty() {
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
            }
        }
        if ft.is_dir() {
            append_entries(b, &[base])?;
            if xattrs.iter().any(|(k, v)| k == OPAQUE && v.as_slice() == b"y") {
                let e = Entry {
                    path: format!("{r}/.wh..wh..opq"),
                    kind: Kind::Bytes(Vec::new()),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                };
                append_entries(b, &[e])?;
            }
            walk(b, &path, &r, links, skip)?;
            continue;
        }
        let kind = if ft.is_symlink() {
            Kind::Symlink(String::from_utf8_lossy(fs::read_link(&path)?.as_os_str().as_bytes()).into_owned())
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    append_entries(b, &[Entry { kind: Kind::Link(first.clone()), ..base }])?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), r.clone());
            }
            Kind::File(path.clone())
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::Char(major(md.rdev()), minor(md.rdev()))
        } else if ft.is_block_device() {
            Kind::Block(major(md.rdev()), minor(md.rdev()))
        } else {
            // Sockets are not part of images.
            continue;
        };
        append_entries(b, &[Entry { kind, ..base }])?;
    }
    Ok(())
}

fn major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

/// The xattrs of a path (not followed); names that are not UTF-8 are skipped.
fn read_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(path, &mut names) {
        Ok(n) => n,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    for raw in names[..n].split(|&c| c == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw) else { continue };
        let mut val = vec![0u8; 4096];
        if let Ok(len) = rustix::fs::lgetxattr(path, name, &mut val) {
            val.truncate(len);
            out.push((name.to_string(), val));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_to_tar_with_whiteouts_and_links() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/f"), b"hello").unwrap();
        fs::hard_link(r.join("a/b/f"), r.join("a/g")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("a/l")).unwrap();
        nix::sys::stat::mknod(&r.join("a/gone"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
            .unwrap();
        fs::create_dir(r.join("o")).unwrap();
        rustix::fs::setxattr(r.join("o").as_path(), OPAQUE, b"y", rustix::fs::XattrFlags::empty()).unwrap();
        let mut out = Vec::new();
        write_tree(r, &mut out, &|p| p == "skip").unwrap();
        let mut a = tar::Archive::new(out.as_slice());
        let names: Vec<(String, tar::EntryType)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().entry_type())
            })
            .collect();
        let want = [
            ("a/", tar::EntryType::Directory),
            ("a/b/", tar::EntryType::Directory),
            ("a/b/f", tar::EntryType::Regular),
            ("a/g", tar::EntryType::Link),
            ("a/.wh.gone", tar::EntryType::Regular),
            ("a/l", tar::EntryType::Symlink),
            ("o/", tar::EntryType::Directory),
            ("o/.wh..wh..opq", tar::EntryType::Regular),
        ];
        let got: Vec<(&str, tar::EntryType)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        assert_eq!(got, want);
    }
}
