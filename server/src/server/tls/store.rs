//! Certificates on disk, under `<data-dir>/tls/`:
//!
//! - `account.json`: the ACME account (its key and URL) and the directory it belongs to; 0600.
//! - `acme/<name>.pem`: an issued certificate for one host name, its chain, then its private
//!   key, in one file so that a reader never sees a key without its certificate; 0600.
//! - `uploaded/<name>.pem`: the same for a certificate a user uploaded (`berth certs add`);
//!   it wins over an issued one, and no order is placed for its name while it is valid.
//! - `default.pem`: the self-signed certificate for clients that send no server name, until
//!   the control host has a certificate of its own.
//!
//! Every file is written atomically (a temporary file, then a rename).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Acme,
    Uploaded,
    SelfSigned,
}

/// A certificate ready for handshakes, with what the renewal and the API need to know of it.
#[derive(Debug, Clone)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The DNS names in its subjectAltName, lowercase.
    pub names: Vec<String>,
    pub source: Source,
    /// The chain and key as stored (PEM).
    pub pem: String,
}

impl Cert {
    /// Parses a PEM chain and private key (in one text or two). The error says what is wrong.
    pub fn from_pem(chain_pem: &str, key_pem: &str, source: Source) -> Result<Cert, String> {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading the certificate PEM: {e}"))?;
        let Some(leaf) = chain.first() else {
            return Err("no CERTIFICATE block in the certificate PEM".into());
        };
        if key_pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || key_pem.contains("Proc-Type: 4,ENCRYPTED") {
            return Err("the private key is encrypted: give it decrypted (openssl pkey -in KEY -out KEY.plain)".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block in the key PEM".to_string(),
            e => format!("reading the private key PEM: {e}"),
        })?;
        let info = parse_leaf(leaf).map_err(|e| format!("the first certificate is not valid X.509: {e}"))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
            format!("the private key cannot sign: RSA of 2048 bits or more, ECDSA P-256/P-384 and Ed25519 work ({e})")
        })?;
        let ck = CertifiedKey::new(chain.clone(), signer);
        match ck.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(if chain.len() > 1 {
                    "the private key does not belong to the first certificate: the chain must start with the leaf (the key's certificate), then its issuers".into()
                } else {
                    "the private key does not belong to the certificate".into()
                })
            }
            // The public key could not be compared (an unusual encoding): the handshake tells.
            Err(_) => {}
        }
        let mut pem = String::new();
        for c in &chain {
            pem.push_str(&pem_block("CERTIFICATE", c.as_ref()));
        }
        pem.push_str(key_pem.trim_end());
        pem.push('\n');
        Ok(Cert {
            key: Arc::new(ck),
            not_before: info.not_before,
            not_after: info.not_after,
            names: info.names,
            source,
            pem,
        })
    }

    /// A stored file: chain and key in one PEM text.
    pub fn from_combined(pem: &str, source: Source) -> Result<Cert, String> {
        Cert::from_pem(pem, pem, source)
    }

    /// True if the certificate names `host` (exactly, or by a `*.` wildcard one label deep).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|n| n == host || wildcard_match(n, host))
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Hex of the leaf certificate's SHA-256: what the API shows to tell certificates apart.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.key.cert[0].as_ref()))
    }
}

/// `*.example.com` matches `a.example.com`, not `example.com` nor `a.b.example.com`.
pub fn wildcard_match(pattern: &str, host: &str) -> bool {
    match (pattern.strip_prefix("*."), host.split_once('.')) {
        (Some(suffix), Some((first, rest))) => !first.is_empty() && rest == suffix,
        _ => false,
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// What the proxy needs of a leaf certificate.
#[derive(Debug)]
pub struct LeafInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub names: Vec<String>,
}

/// Reads validity and subjectAltName DNS names from a DER certificate: a small walk over the
/// fields of RFC 5280 §4.1 rather than a full X.509 parser (rustls verifies nothing here; a
/// certificate we serve was issued to us or uploaded on purpose).
pub fn parse_leaf(der: &[u8]) -> Result<LeafInfo, String> {
    let (cert, _) = der::expect(der, der::SEQUENCE)?;
    let (tbs, _) = der::expect(cert, der::SEQUENCE)?;
    let mut rest = tbs;
    // version [0] EXPLICIT, optional
    if rest.first() == Some(&0xa0) {
        rest = der::next(rest)?.2;
    }
    let (_, _, r) = der::next(rest)?; // serialNumber
    let (_, _, r) = der::next(r)?; // signature AlgorithmIdentifier
    let (_, _, r) = der::next(r)?; // issuer
    let (validity, r) = der::expect(r, der::SEQUENCE)?;
    let (tag1, nb, v) = der::next(validity)?;
    let (tag2, na, _) = der::next(v)?;
    let not_before = der::time(tag1, nb)?;
    let not_after = der::time(tag2, na)?;
    let (_, _, r) = der::next(r)?; // subject
    let (_, _, mut r) = der::next(r)?; // subjectPublicKeyInfo
    let mut names = Vec::new();
    while !r.is_empty() {
        let (tag, body, after) = der::next(r)?;
        r = after;
        if tag != 0xa3 {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let (exts, _) = der::expect(body, der::SEQUENCE)?;
        let mut e = exts;
        while !e.is_empty() {
            let (ext, after) = der::expect(e, der::SEQUENCE)?;
            e = after;
            let (oid, x) = der::expect(ext, 0x06)?;
            // 2.5.29.17 subjectAltName
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            let mut x = x;
            if x.first() == Some(&0x01) {
                x = der::next(x)?.2; // critical
            }
            let (octets, _) = der::expect(x, 0x04)?;
            let (gns, _) = der::expect(octets, der::SEQUENCE)?;
            let mut g = gns;
            while !g.is_empty() {
                let (tag, v, after) = der::next(g)?;
                g = after;
                if tag == 0x82 {
                    // dNSName
                    names.push(String::from_utf8_lossy(v).to_ascii_lowercase());
                }
            }
        }
    }
    Ok(LeafInfo { not_before, not_after, names })
}

mod der {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub const SEQUENCE: u8 = 0x30;

    /// One TLV: (tag, contents, the rest).
    pub fn next(b: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
        let (&tag, b) = b.split_first().ok_or("truncated DER")?;
        let (&l0, mut b) = b.split_first().ok_or("truncated DER")?;
        let len = if l0 < 0x80 {
            l0 as usize
        } else {
            let n = (l0 & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return Err("bad DER length".into());
            }
            let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            b = &b[n..];
            len
        };
        if b.len() < len {
            return Err("truncated DER".into());
        }
        Ok((tag, &b[..len], &b[len..]))
    }

    pub fn expect(b: &[u8], want: u8) -> Result<(&[u8], &[u8]), String> {
        let (tag, v, rest) = next(b)?;
        if tag != want {
            return Err(format!("expected DER tag {want:#x}, found {tag:#x}"));
        }
        Ok((v, rest))
    }

    /// UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ).
    pub fn time(tag: u8, v: &[u8]) -> Result<SystemTime, String> {
        let s = std::str::from_utf8(v).map_err(|_| "a time that is not ASCII")?;
        let s = s.strip_suffix('Z').ok_or("a time not in UTC")?;
        let (year, rest) = match tag {
            0x17 if s.len() == 12 => {
                let yy: i32 = s[..2].parse().map_err(|_| "bad UTCTime")?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
            }
            0x18 if s.len() == 14 => (s[..4].parse().map_err(|_| "bad GeneralizedTime")?, &s[4..]),
            _ => return Err(format!("unsupported time {s:?}")),
        };
        let n = |i: usize| rest[i..i + 2].parse::<u8>().map_err(|_| format!("bad time {s:?}"));
        let month = time::Month::try_from(n(0)?).map_err(|e| e.to_string())?;
        let date = time::Date::from_calendar_date(year, month, n(2)?).map_err(|e| e.to_string())?;
        let t = time::Time::from_hms(n(4)?, n(6)?, n(8)?).map_err(|e| e.to_string())?;
        let secs = time::PrimitiveDateTime::new(date, t).assume_utc().unix_timestamp();
        Ok(if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        })
    }
}

/// The `tls/` directory of a data directory, and the files in it.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(data_dir: &Path) -> Store {
        Store { dir: data_dir.join("tls") }
    }

    pub fn account(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    pub fn retries(&self) -> PathBuf {
        self.dir.join("retry.json")
    }

    fn file(&self, kind: &str, name: &str) -> PathBuf {
        self.dir.join(kind).join(format!("{name}.pem"))
    }

    /// Writes `bytes` atomically with mode 0600, creating the directory.
    pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path.parent().expect("a file in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    pub fn save(&self, kind: Source, name: &str, cert: &Cert) -> std::io::Result<()> {
        Store::write_private(&self.file(kind_dir(kind), name), cert.pem.as_bytes())
    }

    pub fn remove(&self, kind: Source, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.file(kind_dir(kind), name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every stored certificate of `kind`, by name; unreadable files are logged and skipped.
    pub fn load_all(&self, kind: Source) -> Vec<(String, Cert)> {
        let dir = self.dir.join(kind_dir(kind));
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".pem")) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| Cert::from_combined(&t, kind))
            {
                Ok(c) => out.push((name.to_string(), c)),
                Err(err) => tracing::warn!(file = %path.display(), error = %err, "ignoring a stored certificate"),
            }
        }
        out
    }

    /// The self-signed default certificate (made once, then reused).
    pub fn default_cert(&self, name: &str) -> anyhow::Result<Cert> {
        let path = self.dir.join("default.pem");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(c) = Cert::from_combined(&text, Source::SelfSigned) {
                if c.not_after > SystemTime::now() + Duration::from_secs(86400) {
                    return Ok(c);
                }
            }
        }
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("berth default certificate for {name}"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let c = Cert::from_pem(&cert.pem(), &key.serialize_pem(), Source::SelfSigned).map_err(anyhow::Error::msg)?;
        Store::write_private(&path, c.pem.as_bytes())?;
        Ok(c)
    }
}

fn kind_dir(kind: Source) -> &'static str {
    match kind {
        Source::Uploaded => "uploaded",
        _ => "acme",
    }
}

/// Seconds since the epoch, for the API.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str], days: i64) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(days);
        let k = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&k).unwrap().pem(), k.serialize_pem())
    }

    #[test]
    fn validity_and_names_come_from_the_certificate() {
        let (c, k) = self_signed(&["a.example.com", "*.b.example.com"], 30);
        let cert = Cert::from_pem(&c, &k, Source::Uploaded).unwrap();
        assert_eq!(cert.names, ["a.example.com", "*.b.example.com"]);
        let life = cert.lifetime().as_secs();
        assert_eq!(life, 31 * 86400);
        assert!(cert.covers("a.example.com") && cert.covers("x.b.example.com"));
        assert!(!cert.covers("b.example.com") && !cert.covers("y.x.b.example.com") && !cert.covers("c.example.com"));
        // The stored form reads back the same.
        let again = Cert::from_combined(&cert.pem, Source::Uploaded).unwrap();
        assert_eq!(again.fingerprint(), cert.fingerprint());
    }

    #[test]
    fn a_key_of_another_certificate_or_garbage_is_refused_with_the_reason() {
        let (c1, _) = self_signed(&["a.example.com"], 30);
        let (_, k2) = self_signed(&["a.example.com"], 30);
        assert_eq!(
            Cert::from_pem(&c1, &k2, Source::Uploaded).unwrap_err(),
            "the private key does not belong to the certificate"
        );
        assert!(Cert::from_pem("hello", &k2, Source::Uploaded).unwrap_err().contains("no CERTIFICATE block"));
        assert!(Cert::from_pem(&c1, "nope", Source::Uploaded).unwrap_err().contains("no PRIVATE KEY block"));
    }
}
