//! Secret variables at rest: stored sealed with ChaCha20-Poly1305 under a key kept in
//! `<data-dir>/secret-key` (32 random bytes as hex, mode 0600, made on first start). Each
//! value is sealed with a fresh random nonce and bound to its service and name (associated
//! data), so a sealed value copied to another variable does not open.
//!
//! Invariant: a secret's value exists in plain text only in memory (to start an instance) and
//! in the environment of that instance's process; the database, the API, the CLI and Berth's
//! own log see names only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// The key file under the data directory.
pub const FILE: &str = "secret-key";
const PREFIX: &str = "v1:";

/// Seals and opens secret values.
#[derive(Clone)]
pub struct Keyring {
    cipher: Arc<ChaCha20Poly1305>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(..)")
    }
}

/// Secret variables in plain text, in memory only: `Debug` shows their names, never values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Plain(pub BTreeMap<String, String>);

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

fn aad(service: &str, name: &str) -> Vec<u8> {
    format!("{service}\0{name}").into_bytes()
}

impl Keyring {
    /// Reads the key, creating it first if there is none.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Keyring> {
        let text = super::token::secret_file(data_dir, FILE, || {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("reading random bytes for the secret key: {e}"))?;
            Ok(hex::encode(key))
        })?;
        let bytes = hex::decode(&text)
            .ok()
            .filter(|b| b.len() == 32)
            .with_context(|| format!("{}: expected 64 hex digits (a 32-byte key)", data_dir.join(FILE).display()))?;
        Ok(Keyring { cipher: Arc::new(ChaCha20Poly1305::new(Key::from_slice(&bytes))) })
    }

    /// Seals `value` of variable `name` of `service`.
    pub fn seal(&self, service: &str, name: &str, value: &str) -> String {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the kernel's random source");
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: value.as_bytes(), aad: &aad(service, name) })
            .expect("ChaCha20-Poly1305 encryption of a bounded value");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Opens what [`Keyring::seal`] made for the same service and name.
    pub fn open(&self, service: &str, name: &str, sealed: &str) -> anyhow::Result<String> {
        let Some(b64) = sealed.strip_prefix(PREFIX) else {
            bail!("secret {name} of {service}: not a sealed value");
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .with_context(|| format!("secret {name} of {service}: not valid base64"))?;
        if bytes.len() < 12 + 16 {
            bail!("secret {name} of {service}: too short to be sealed");
        }
        let (nonce, ct) = bytes.split_at(12);
        let plain =
            self.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad(service, name) }).map_err(
                |_| anyhow::anyhow!("secret {name} of {service} does not open with this data directory's secret-key"),
            )?;
        String::from_utf8(plain).with_context(|| format!("secret {name} of {service}: not UTF-8"))
    }

    pub fn open_all(&self, service: &str, sealed: &BTreeMap<String, String>) -> anyhow::Result<Plain> {
        sealed.iter().map(|(k, v)| Ok((k.clone(), self.open(service, k, v)?))).collect::<anyhow::Result<_>>().map(Plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_in_their_place_and_under_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::load_or_create(dir.path()).unwrap();
        let a = k.seal("web", "DB_PASSWORD", "hunter2");
        let b = k.seal("web", "DB_PASSWORD", "hunter2");
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(!a.contains("hunter2"));
        assert_eq!(k.open("web", "DB_PASSWORD", &a).unwrap(), "hunter2");
        assert!(k.open("web", "OTHER", &a).is_err(), "bound to its name");
        assert!(k.open("api", "DB_PASSWORD", &a).is_err(), "bound to its service");
        let again = Keyring::load_or_create(dir.path()).unwrap();
        assert_eq!(again.open("web", "DB_PASSWORD", &a).unwrap(), "hunter2", "the key is kept");
        let other = Keyring::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let err = other.open("web", "DB_PASSWORD", &a).unwrap_err().to_string();
        assert!(err.contains("does not open"), "{err}");
        for bad in ["hunter2", "v1:!!", "v1:AAAA"] {
            assert!(k.open("web", "X", bad).is_err(), "{bad}");
        }
        let plain = Plain(BTreeMap::from([("DB_PASSWORD".into(), "hunter2".into())]));
        assert_eq!(format!("{plain:?}"), "{\"DB_PASSWORD\"}");
    }
}
