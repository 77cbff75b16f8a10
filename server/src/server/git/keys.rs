//! The SSH public keys allowed to push (`ssh_keys`): parsing and fingerprints (as ssh-keygen
//! prints them, `SHA256:` and unpadded base64) and the queries, written once for SQLite and
//! PostgreSQL as in `db.rs`.

use anyhow::Context;
use russh::keys::{HashAlg, PublicKey};
use sqlx::Row;

use crate::server::db::{self, InsertError, Pool};

/// A key as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Key {
    pub name: String,
    /// `SHA256:...`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// The key in OpenSSH one-line form (`ssh-ed25519 AAAA... comment`).
    pub public_key: String,
    pub created_at: String,
}

/// The key types a user may register.
const ALLOWED: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Parses one OpenSSH public key line (`TYPE BASE64 [COMMENT]`, as in `id_ed25519.pub` or an
/// `authorized_keys` line without options); returns the key and its normalised line.
pub fn parse(text: &str) -> Result<(PublicKey, String), String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let line = match lines.as_slice() {
        [one] => *one,
        [] => return Err("public_key: empty; give one line like \"ssh-ed25519 AAAA... you@host\"".into()),
        _ => return Err("public_key: one key per call (found several lines)".into()),
    };
    let mut parts = line.split_whitespace();
    let kind = parts.next().unwrap_or("");
    if kind.contains("PRIVATE") || line.starts_with("-----") {
        return Err("public_key: this is a private key; give the .pub file".into());
    }
    if !ALLOWED.contains(&kind) {
        return Err(format!("public_key: key type {kind:?} is not one of {}", ALLOWED.join(", ")));
    }
    let Some(data) = parts.next() else {
        return Err(format!("public_key: {kind} needs its base64 data after the type"));
    };
    use base64::Engine;
    if base64::engine::general_purpose::STANDARD.decode(data).is_err() {
        return Err("public_key: the key data is not valid base64".into());
    }
    let key = PublicKey::from_openssh(line).map_err(|e| format!("public_key: not a valid {kind} key: {e}"))?;
    if key.algorithm().as_str() != kind {
        return Err(format!("public_key: the line says {kind} but the data is a {} key", key.algorithm().as_str()));
    }
    let comment: Vec<&str> = parts.collect();
    let mut normal = format!("{kind} {data}");
    if !comment.is_empty() {
        normal.push(' ');
        normal.push_str(&comment.join(" "));
    }
    Ok((key, normal))
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn from_row(r: &sqlx::any::AnyRow) -> anyhow::Result<Key> {
    Ok(Key {
        name: r.try_get("name")?,
        fingerprint: r.try_get("fingerprint")?,
        public_key: r.try_get("public_key")?,
        created_at: r.try_get("created_at")?,
    })
}

pub async fn list(pool: &Pool) -> anyhow::Result<Vec<Key>> {
    let rows = sqlx::query("SELECT name, fingerprint, public_key, created_at FROM ssh_keys ORDER BY name")
        .fetch_all(pool)
        .await
        .context("listing SSH keys")?;
    rows.iter().map(from_row).collect()
}

/// The key with this fingerprint, if one is registered.
pub async fn find(pool: &Pool, fingerprint: &str) -> anyhow::Result<Option<Key>> {
    let row = sqlx::query("SELECT name, fingerprint, public_key, created_at FROM ssh_keys WHERE fingerprint = $1")
        .bind(fingerprint)
        .fetch_optional(pool)
        .await
        .context("looking up an SSH key")?;
    row.as_ref().map(from_row).transpose()
}

/// Records a key; Duplicate if its name or its fingerprint is taken.
pub async fn insert(pool: &Pool, k: &Key) -> Result<(), InsertError> {
    let r = sqlx::query("INSERT INTO ssh_keys (name, fingerprint, public_key, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&k.name)
        .bind(&k.fingerprint)
        .bind(&k.public_key)
        .bind(&k.created_at)
        .execute(pool)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(InsertError::Duplicate),
        Err(e) => Err(InsertError::Other(anyhow::Error::new(e).context(format!("recording SSH key {}", k.name)))),
    }
}

/// Deletes a key; false if there is none by that name.
pub async fn delete(pool: &Pool, name: &str) -> anyhow::Result<bool> {
    let r = sqlx::query("DELETE FROM ssh_keys WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await
        .with_context(|| format!("removing SSH key {name}"))?;
    Ok(r.rows_affected() == 1)
}

/// A key by name, for messages.
pub async fn by_name(pool: &Pool, name: &str) -> anyhow::Result<Option<Key>> {
    let row = sqlx::query("SELECT name, fingerprint, public_key, created_at FROM ssh_keys WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .context("reading an SSH key")?;
    row.as_ref().map(from_row).transpose()
}

pub fn now() -> String {
    db::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by ssh-keygen -t ed25519 -C test@berth; FP is what ssh-keygen -lf prints for it.
    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIaUTdnI5EZGJbhTCpCK8/Z2/eY+ex3hNqUkklppjfTN test@berth";
    const FP: &str = "SHA256:8zABQjRjsgJVB1BDqlqIoqlq1eh5SuqjZ+StWGikXe0";

    #[test]
    fn keys() {
        let (key, line) = parse(&format!("\n{ED}\n")).unwrap();
        assert_eq!(line, ED);
        assert_eq!(fingerprint(&key), FP);
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("ssh-dss AAAA", "key type \"ssh-dss\""),
            ("ssh-ed25519", "needs its base64"),
            ("ssh-ed25519 !!!", "not valid base64"),
            ("ssh-ed25519 AAAAB3NzaC1yc2E=", "not a valid ssh-ed25519 key"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
        ];
        for (input, want) in bad {
            let err = parse(input).unwrap_err();
            assert!(err.contains(want), "{input:?}: {err}");
        }
        assert!(parse(&format!("{ED}\n{ED}")).unwrap_err().contains("one key per call"));
    }
}
