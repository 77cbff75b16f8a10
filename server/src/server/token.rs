//! The admin API token: created on first start in `<data-dir>/admin-token` (mode 0600), kept
//! across restarts; only its SHA-256 goes into the database.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// The file under the data directory.
pub const FILE: &str = "admin-token";
/// The name and scope of the admin token in the `tokens` table.
pub const ADMIN: &str = "admin";

/// Hex SHA-256 of a token, as stored and looked up.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("reading random bytes for the admin token: {e}"))?;
    Ok(format!("berth_{}", hex::encode(bytes)))
}

/// Reads the admin token, creating it first if there is none.
///
/// The token is written to a temporary file (`O_EXCL`, 0600) and then hard-linked to its
/// name: `link` fails if the name exists, so the file is never seen half written and two
/// servers starting at once agree on one token.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<String> {
    secret_file(data_dir, FILE, generate)
}

/// Reads the one-line secret in `<data_dir>/<file>`, creating it with `generate` first if there
/// is none, as [`load_or_create`] does for the admin token.
pub fn secret_file(
    data_dir: &Path,
    file: &str,
    generate: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let path = data_dir.join(file);
    if let Some(token) = read(&path)? {
        return Ok(token);
    }
    let token = generate()?;
    let tmp = data_dir.join(format!(".{file}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()
    };
    write().with_context(|| format!("writing {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(token),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(&path)?.with_context(|| format!("{} vanished while it was being created", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

fn read(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            anyhow::ensure!(!token.is_empty(), "{} is empty: remove it to have a new token made", path.display());
            Ok(Some(token.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create(dir.path()).unwrap();
        assert!(token.starts_with("berth_") && token.len() == 6 + 64, "{token}");
        let mode = std::fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), token);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        assert_eq!(hash(&token).len(), 64);
        assert_ne!(hash(&token), hash("other"));
    }
}
