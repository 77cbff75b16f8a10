//! Resolving an image's `User` (`name`, `uid`, `name:group`, `uid:gid`, …) against the image's own
//! /etc/passwd and /etc/group, as Docker does. Numeric ids without entries are allowed.

use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    NoUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    NoGroup(String),
    #[error("invalid user specification {0:?}")]
    Invalid(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some(PasswdEntry { name: f[0].into(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].into() })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
                .unwrap_or_default();
            Some(GroupEntry { name: f[0].into(), gid: f[2].parse().ok()?, members })
        })
        .collect()
}

/// Resolves `spec` with the given passwd and group file contents.
pub fn resolve_with(spec: &str, passwd: &str, group: &str) -> Result<User, Error> {
    let spec = spec.trim();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if u.is_empty() && g.is_none() {
        return Ok(User { uid: 0, gid: 0, additional_gids: vec![0], home: "/root".into() });
    }
    if u.is_empty() || g == Some("") {
        return Err(Error::Invalid(spec.into()));
    }
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let (uid, mut gid, home, name) = if let Ok(uid) = u.parse::<u32>() {
        match users.iter().find(|e| e.uid == uid) {
            Some(e) => (uid, e.gid, e.home.clone(), Some(e.name.clone())),
            None => (uid, 0, "/".to_string(), None),
        }
    } else {
        let e = users.iter().find(|e| e.name == u).ok_or_else(|| Error::NoUser(u.into()))?;
        (e.uid, e.gid, e.home.clone(), Some(e.name.clone()))
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups.iter().find(|e| e.name == g).map(|e| e.gid).ok_or_else(|| Error::NoGroup(g.into()))?,
        };
    }
    // Supplementary groups: the primary group itself (as Docker since CVE-2022-36109 and
    // containerd since CVE-2023-25173 do, so that dropping the primary group with setgid cannot
    // escape a group-denied file), then every group listing the user by name.
    let mut additional_gids: Vec<u32> = vec![gid];
    if let Some(n) = &name {
        additional_gids.extend(groups.iter().filter(|e| e.members.iter().any(|m| m == n)).map(|e| e.gid));
    }
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(User { uid, gid, additional_gids, home })
}

/// Reads a file inside a root filesystem without ever following a link out of it: the lookup is
/// confined by the kernel (RESOLVE_IN_ROOT), so an absolute symlink at /etc/passwd in the image
/// resolves inside the image, not on the host.
pub fn read_in_root(root: &Path, path: &str) -> Option<String> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
    let dir = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let _ = CWD;
    let fd = openat2(
        &dir,
        path.trim_start_matches('/'),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let mut s = String::new();
    std::fs::File::from(fd).take(16 << 20).read_to_string(&mut s).ok()?;
    Some(s)
}

/// Resolves `spec` against the image root filesystem mounted at `root`.
pub fn resolve(spec: &str, root: &Path) -> Result<User, Error> {
    let passwd = read_in_root(root, "/etc/passwd").unwrap_or_default();
    let group = read_in_root(root, "/etc/group").unwrap_or_default();
    resolve_with(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app\nnogroup:x:65534:\n";

    #[test]
    fn table() {
        type Want = Result<(u32, u32, &'static [u32], &'static str), &'static str>;
        let cases: &[(&str, Want)] = &[
            ("", Ok((0, 0, &[0], "/root"))),
            ("root", Ok((0, 0, &[0], "/root"))),
            ("app", Ok((1000, 1000, &[50, 1000], "/home/app"))),
            ("1000", Ok((1000, 1000, &[50, 1000], "/home/app"))),
            ("app:staff", Ok((1000, 50, &[50], "/home/app"))),
            ("app:65534", Ok((1000, 65534, &[50, 65534], "/home/app"))),
            ("4242", Ok((4242, 0, &[0], "/"))),
            ("4242:4343", Ok((4242, 4343, &[4343], "/"))),
            ("ghost", Err("user \"ghost\" not found in the image's /etc/passwd")),
            ("app:ghosts", Err("group \"ghosts\" not found in the image's /etc/group")),
            ("app:", Err("invalid user specification \"app:\"")),
        ];
        for (spec, want) in cases {
            let got = resolve_with(spec, PASSWD, GROUP);
            match (want, got) {
                (Ok((u, g, extra, home)), Ok(user)) => {
                    assert_eq!(
                        (user.uid, user.gid, user.additional_gids.as_slice(), user.home.as_str()),
                        (*u, *g, *extra, *home),
                        "{spec}"
                    )
                }
                (Err(msg), Err(e)) => assert_eq!(e.to_string(), *msg, "{spec}"),
                (w, g) => panic!("{spec}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn read_in_root_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("etc/passwd")).unwrap();
        // The absolute link resolves inside the root, where /etc/hostname does not exist.
        assert_eq!(read_in_root(dir.path(), "/etc/passwd"), None);
        std::fs::write(dir.path().join("etc/hostname"), "inside").unwrap();
        assert_eq!(read_in_root(dir.path(), "/etc/passwd").as_deref(), Some("inside"));
    }
}
