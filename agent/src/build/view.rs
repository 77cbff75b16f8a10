//! Read-only views of a stage's file system while it is being built: an overlay mount of its
//! layers (no upper directory, so nothing can be written) at a private directory, unmounted
//! when the [`View`] drops. COPY reads `--from` stages and images through one, and checks its
//! destination, `--chown` names and parent directories against the stage's own.
//!
//! Paths inside are resolved with `RESOLVE_IN_ROOT`: a symlink in the image points inside the
//! image, never at the host.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub struct View {
    root: PathBuf,
    mounted: bool,
}

impl View {
    /// Mounts `layers` (bottom first) read-only at `at` (created; must not exist).
    pub fn mount(layers: &[PathBuf], at: &Path) -> io::Result<View> {
        fs::create_dir_all(at)?;
        let mut v = View { root: at.to_path_buf(), mounted: false };
        if layers.is_empty() {
            return Ok(v);
        }
        if layers.len() == 1 {
            // overlayfs wants two lower dirs without an upper one: bind the single layer.
            nix::mount::mount(
                Some(&layers[0]),
                at,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(io::Error::from)?;
            v.mounted = true;
            let _ = nix::mount::mount(
                None::<&str>,
                at,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            );
            return Ok(v);
        }
        let lower: Vec<String> = layers.iter().rev().map(|l| l.display().to_string()).collect();
        let opts = format!("lowerdir={}", lower.join(":"));
        nix::mount::mount(Some("overlay"), at, Some("overlay"), nix::mount::MsFlags::MS_RDONLY, Some(opts.as_str()))
            .map_err(|e| io::Error::other(format!("mounting a read-only view of {} layers: {e}", layers.len())))?;
        v.mounted = true;
        Ok(v)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `path` (absolute inside the view) with symlinks resolved inside the root.
    pub fn open(&self, path: &str) -> io::Result<OwnedFd> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        let dir = rustix::fs::open(&self.root, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        Ok(openat2(
            &dir,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?)
    }

    /// Where `path` (symlinks followed inside the root) is on the host, below [`View::root`];
    /// None if it does not exist.
    pub fn resolve(&self, path: &str) -> Option<PathBuf> {
        let fd = self.open(path).ok()?;
        let real = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        real.starts_with(&self.root).then_some(real)
    }

    /// Reads a small file inside the view (symlinks resolved inside the root).
    pub fn read_to_string(&self, path: &str) -> Option<String> {
        crate::runtime::user::read_in_root(&self.root, path)
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir(&self.root);
    }
}
