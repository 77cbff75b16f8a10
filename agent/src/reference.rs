//! Image references (`busybox`, `127.0.0.1:5000/app:1.2@sha256:…`), parsed and normalised
//! exactly as Docker's `distribution/reference` (`ParseNormalizedNamed` + `TagNameOnly`) does.
//!
//! The grammar, hand-parsed (no regex crate):
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [domain "/"] path            (at most 255 characters, domain included)
//! domain     := host [":" port]               host: dns name, IPv4, or "[" IPv6 "]"
//! path       := component ("/" component)*
//! component  := [a-z0-9]+ ( ( [._] | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! ```
//!
//! Normalisation: the first path element is a registry only if it contains `.` or `:`, is
//! `localhost`, or has an uppercase letter; otherwise the registry is `docker.io`.
//! `index.docker.io` is `docker.io`, single-component Docker Hub names get `library/`, and a
//! reference with neither tag nor digest gets the tag `latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::{self, Digest};

/// The registry of names without one.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag of references with neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A normalised image reference. When both a tag and a digest are given both are kept (for
/// display), but the digest is what gets pulled.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid reference \"\": an image reference cannot be empty")]
    Empty,
    #[error("invalid reference {input:?}: {reason}")]
    Format { input: String, reason: String },
    #[error("invalid reference {input:?}: repository name {repository:?} must be lowercase")]
    Uppercase { input: String, repository: String },
    #[error(
        "invalid reference {input:?}: repository name is {len} characters long, at most {MAX_NAME_LEN} are allowed"
    )]
    TooLong { input: String, len: usize },
    #[error(
        "invalid reference {input:?}: invalid tag {tag:?} (a tag is at most 128 letters, digits, '_', '.' and '-', and does not start with '.' or '-')"
    )]
    Tag { input: String, tag: String },
    #[error("invalid reference {input:?}: {source}")]
    Digest { input: String, source: digest::Error },
    #[error("invalid reference {input:?}: a 64-digit hexadecimal string is an image id, not a repository name")]
    HexIdentifier { input: String },
}

impl Reference {
    /// The registry host, possibly with a port (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path within the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry's `/manifests/<ref>` for: the digest if there is one (it wins
    /// over the tag), else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            // Unreachable through parsing (a reference without digest always gets a tag), but
            // a sane answer costs nothing.
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same repository with `digest` instead of any tag or digest.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The same repository with `tag` instead of any tag or digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, Error> {
        if !valid_tag(tag) {
            return Err(Error::Tag { input: format!("{}:{tag}", self.name()), tag: tag.to_string() });
        }
        Ok(Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(input: &str) -> Result<Reference, Error> {
        let format = |reason: &str| Error::Format { input: input.to_string(), reason: reason.to_string() };
        if input.is_empty() {
            return Err(Error::Empty);
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format("it contains whitespace or control characters"));
        }
        if input.len() == 64 && input.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::HexIdentifier { input: input.to_string() });
        }

        // The digest goes first: it contains a ':' that is not a tag separator.
        let (rest, digest) = match input.split_once('@') {
            Some((_, "")) => return Err(format("'@' must be followed by a digest")),
            Some((rest, d)) => {
                let d = d.parse::<Digest>().map_err(|source| Error::Digest { input: input.to_string(), source })?;
                (rest, Some(d))
            }
            None => (input, None),
        };
        if rest.is_empty() {
            return Err(format("the repository name is missing"));
        }

        // Then the registry, whose port is not a tag either.
        let (registry, remainder) = split_registry(rest);
        if !valid_domain(registry) {
            return Err(format(&format!("{registry:?} is not a valid registry host[:port]")));
        }

        let (path, tag) = match remainder.split_once(':') {
            Some((path, tag)) => (path, Some(tag)),
            None => (remainder, None),
        };
        if path.is_empty() {
            return Err(format("the repository name is missing"));
        }
        if tag == Some("") {
            return Err(format("':' must be followed by a tag"));
        }
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::Uppercase { input: input.to_string(), repository: path.to_string() });
        }
        if let Some(bad) = path.split('/').find(|c| !valid_component(c)) {
            let reason = if bad.is_empty() {
                "the repository name has an empty path component".to_string()
            } else {
                format!(
                    "invalid repository path component {bad:?} (lowercase letters and digits, separated by '.', '_', '__' or dashes)"
                )
            };
            return Err(format(&reason));
        }
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(Error::Tag { input: input.to_string(), tag: tag.to_string() });
            }
        }

        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path.to_string()
        };
        let len = registry.len() + 1 + repository.len();
        if len > MAX_NAME_LEN {
            return Err(Error::TooLong { input: input.to_string(), len });
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference { registry: registry.to_string(), repository, tag, digest })
    }
}

/// Docker's `splitDockerDomain`: the first element is a registry only when it looks like a host
/// (has `.` or `:`, is `localhost`) or has an uppercase letter (repository paths never do).
fn split_registry(name: &str) -> (&str, &str) {
    let (registry, remainder) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_REGISTRY, name),
    };
    if registry == LEGACY_DEFAULT_REGISTRY {
        (DEFAULT_REGISTRY, remainder)
    } else {
        (registry, remainder)
    }
}

/// `host [":" port]` where host is a DNS name / IPv4 address or a bracketed IPv6 address.
fn valid_domain(domain: &str) -> bool {
    let (host_ok, rest) = if let Some(inner) = domain.strip_prefix('[') {
        let Some((addr, rest)) = inner.split_once(']') else { return false };
        (!addr.is_empty() && addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'), rest)
    } else {
        let (host, rest) = match domain.find(':') {
            Some(i) => domain.split_at(i),
            None => (domain, ""),
        };
        (host.split('.').all(valid_domain_component), rest)
    };
    let port_ok = match rest.strip_prefix(':') {
        Some(port) => !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()),
        None => rest.is_empty(),
    };
    host_ok && port_ok
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn valid_domain_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            // Empty component, or a separator not followed by an alphanumeric run.
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty() && b.len() <= MAX_TAG_LEN && word(b[0]) && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    /// Valid inputs and their normalised form (mostly Docker's own test cases from
    /// reference_test.go and normalize_test.go, seen through ParseNormalizedNamed).
    #[test]
    fn valid() {
        let d = D;
        let cases: Vec<(String, String)> = vec![
            ("busybox".into(), "docker.io/library/busybox:latest".into()),
            ("debian".into(), "docker.io/library/debian:latest".into()),
            ("library/debian".into(), "docker.io/library/debian:latest".into()),
            ("docker/docker".into(), "docker.io/docker/docker:latest".into()),
            ("docker.io/docker/docker".into(), "docker.io/docker/docker:latest".into()),
            ("docker.io/library/debian".into(), "docker.io/library/debian:latest".into()),
            ("docker.io/debian".into(), "docker.io/library/debian:latest".into()),
            ("index.docker.io/docker/docker".into(), "docker.io/docker/docker:latest".into()),
            ("index.docker.io/library/debian".into(), "docker.io/library/debian:latest".into()),
            ("index.docker.io/debian".into(), "docker.io/library/debian:latest".into()),
            ("127.0.0.1:5000/docker/docker".into(), "127.0.0.1:5000/docker/docker:latest".into()),
            ("127.0.0.1:5000/library/debian".into(), "127.0.0.1:5000/library/debian:latest".into()),
            ("127.0.0.1:5000/debian".into(), "127.0.0.1:5000/debian:latest".into()),
            ("192.168.0.1".into(), "docker.io/library/192.168.0.1:latest".into()),
            ("192.168.0.1:80".into(), "docker.io/library/192.168.0.1:80".into()),
            ("192.168.0.1:8/debian".into(), "192.168.0.1:8/debian:latest".into()),
            ("192.168.0.2:25000/debian".into(), "192.168.0.2:25000/debian:latest".into()),
            ("localhost/debian".into(), "localhost/debian:latest".into()),
            ("localhost:5000/a/b".into(), "localhost:5000/a/b:latest".into()),
            // No '/': "localhost:5000" is the Docker Hub image "localhost" tagged "5000".
            ("localhost:5000".into(), "docker.io/library/localhost:5000".into()),
            ("foo/bar".into(), "docker.io/foo/bar:latest".into()),
            ("foo/bar/baz".into(), "docker.io/foo/bar/baz:latest".into()),
            ("test_com".into(), "docker.io/library/test_com:latest".into()),
            ("test.com:tag".into(), "docker.io/library/test.com:tag".into()),
            ("test.com:5000".into(), "docker.io/library/test.com:5000".into()),
            ("test.com/repo:tag".into(), "test.com/repo:tag".into()),
            ("test:5000/repo".into(), "test:5000/repo:latest".into()),
            ("test:5000/repo:tag".into(), "test:5000/repo:tag".into()),
            (format!("test:5000/repo@{d}"), format!("test:5000/repo@{d}")),
            (format!("test:5000/repo:tag@{d}"), format!("test:5000/repo:tag@{d}")),
            (format!("busybox@{d}"), format!("docker.io/library/busybox@{d}")),
            ("lowercase:Uppercase".into(), "docker.io/library/lowercase:Uppercase".into()),
            // Docker's known quirk: an uppercase first element is taken for a registry host.
            ("Uppercase/lowercase:tag".into(), "Uppercase/lowercase:tag".into()),
            ("sub-dom1.foo.com/bar/baz/quux".into(), "sub-dom1.foo.com/bar/baz/quux:latest".into()),
            (
                "sub-dom1.foo.com/bar/baz/quux:some-long-tag".into(),
                "sub-dom1.foo.com/bar/baz/quux:some-long-tag".into(),
            ),
            (
                "b.gcr.io/test.example.com/my-app:test.example.com".into(),
                "b.gcr.io/test.example.com/my-app:test.example.com".into(),
            ),
            ("xn--n3h.com/myimage:xn--n3h.com".into(), "xn--n3h.com/myimage:xn--n3h.com".into()),
            ("foo_bar.com:8080".into(), "docker.io/library/foo_bar.com:8080".into()),
            ("foo/foo_bar.com:8080".into(), "docker.io/foo/foo_bar.com:8080".into()),
            ("192.168.1.1/repo".into(), "192.168.1.1/repo:latest".into()),
            ("192.168.1.1:5000/repo".into(), "192.168.1.1:5000/repo:latest".into()),
            ("[2001:db8::1]/repo".into(), "[2001:db8::1]/repo:latest".into()),
            ("[2001:db8:1:2:3:4:5:6]/repo:tag".into(), "[2001:db8:1:2:3:4:5:6]/repo:tag".into()),
            ("[2001:db8::1]:5000/repo".into(), "[2001:db8::1]:5000/repo:latest".into()),
            ("[2001:db8::1]:5000/repo:tag".into(), "[2001:db8::1]:5000/repo:tag".into()),
            (format!("[2001:db8::1]:5000/repo@{d}"), format!("[2001:db8::1]:5000/repo@{d}")),
            (format!("[2001:db8::1]:5000/repo:tag@{d}"), format!("[2001:db8::1]:5000/repo:tag@{d}")),
            ("[2001:db8::]:5000/repo".into(), "[2001:db8::]:5000/repo:latest".into()),
            ("[::1]:5000/repo".into(), "[::1]:5000/repo:latest".into()),
            ("a.b/x__y/a-b--c/d.e_f".into(), "a.b/x__y/a-b--c/d.e_f:latest".into()),
            (
                "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev".into(),
                "docker.io/library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev:latest".into(),
            ),
            // A 64-hex string is an id on its own, but fine as a path component under a registry.
            (
                "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a".into(),
                "docker.io/library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a:latest".into(),
            ),
            (format!("x:{}", "t".repeat(128)), format!("docker.io/library/x:{}", "t".repeat(128))),
            // The longest name: 255 characters, registry included.
            (format!("a.io/{}aa:tag", "a/".repeat(124)), format!("a.io/{}aa:tag", "a/".repeat(124))),
        ];
        for (input, want) in cases {
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), want, "{input}");
            // The normalised form is a fixed point.
            assert_eq!(r.to_string().parse::<Reference>().unwrap(), r, "{input}");
        }
    }

    #[test]
    fn parts() {
        let r: Reference = format!("127.0.0.1:5000/a/b:v1@{D}").parse().unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest().unwrap().as_str(), D);
        assert_eq!(r.name(), "127.0.0.1:5000/a/b");
        // The digest wins for pulling.
        assert_eq!(r.manifest_ref(), D);

        let r: Reference = "host:5000/a/b".parse().unwrap();
        assert_eq!((r.registry(), r.tag(), r.digest()), ("host:5000", Some("latest"), None));
        assert_eq!(r.manifest_ref(), "latest");

        let r: Reference = format!("busybox@{D}").parse().unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.with_tag("1.36").unwrap().to_string(), "docker.io/library/busybox:1.36");
        assert!(r.with_tag("-bad").is_err());

        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
    }

    #[test]
    fn invalid() {
        let hex64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a";
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "cannot be empty"),
            (" ".into(), "whitespace"),
            ("busybox ".into(), "whitespace"),
            ("bu sybox".into(), "whitespace"),
            ("busy\tbox".into(), "whitespace"),
            (":".into(), "repository name is missing"),
            (":justtag".into(), "repository name is missing"),
            ("busybox:".into(), "followed by a tag"),
            ("busybox@".into(), "followed by a digest"),
            (format!("@{D}"), "repository name is missing"),
            ("busybox@sha256:abc".into(), "64 hex digits"),
            ("busybox@sha256".into(), "only sha256"),
            (format!("validname@invaliddigest:{}", "f".repeat(64)), "only sha256"),
            (format!("repo@sha256:{}", "f".repeat(63)), "64 hex digits"),
            (format!("repo@sha256:{}", "F".repeat(64)), "lowercase hex"),
            ("https://github.com/docker/docker".into(), "not a valid registry"),
            ("docker/Docker".into(), "must be lowercase"),
            ("Uppercase:tag".into(), "must be lowercase"),
            ("BUSYBOX".into(), "must be lowercase"),
            ("test:5000/Uppercase/lowercase:tag".into(), "must be lowercase"),
            ("docker.io/docker/Docker".into(), "must be lowercase"),
            ("-docker".into(), "path component \"-docker\""),
            ("-docker/docker".into(), "path component \"-docker\""),
            ("-docker.io/docker/docker".into(), "not a valid registry"),
            ("docker///docker".into(), "empty path component"),
            ("docker.io/docker///docker".into(), "empty path component"),
            ("docker/".into(), "empty path component"),
            ("/docker".into(), "empty path component"),
            ("docker.io/".into(), "repository name is missing"),
            ("aa/asdf$$^/aa".into(), "asdf$$^"),
            ("a..b".into(), "path component"),
            ("a___b".into(), "path component"),
            ("a_".into(), "path component"),
            ("a.".into(), "path component"),
            (hex64.into(), "image id"),
            ("[2001:db8::1]".into(), "path component"),
            ("[2001:db8::1]:5000".into(), "path component"),
            ("[2001:db8::1]:tag".into(), "path component"),
            ("[fe80::1%eth0]:5000/repo".into(), "not a valid registry"),
            ("[fe80::1%@invalidzone]:5000/repo".into(), "only sha256"),
            ("host:port/repo".into(), "not a valid registry"),
            ("host:/repo".into(), "not a valid registry"),
            ("busybox:-tag".into(), "invalid tag"),
            ("busybox:.tag".into(), "invalid tag"),
            ("busybox:ta+g".into(), "invalid tag"),
            ("busybox:a:b".into(), "invalid tag"),
            (format!("busybox:{}", "t".repeat(129)), "invalid tag"),
            (format!("{}a:tag", "a/".repeat(128)), "at most 255"),
            // Under docker.io (10 characters with the '/') 127 "a/" plus "a" is too long.
            (format!("{}a:tag-puts-this-over-max", "a/".repeat(127)), "at most 255"),
            (format!("a.io/{}aaa:tag", "a/".repeat(124)), "at most 255"),
        ];
        for (input, want) in cases {
            match input.parse::<Reference>() {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{input:?}: {msg:?} lacks {want:?}");
                    if !input.is_empty() {
                        // Every message quotes the input.
                        assert!(msg.contains(&format!("{input:?}")), "{msg}");
                    }
                }
            }
        }
    }
}
