//! Manifests, indexes and descriptors as registries serve them (OCI and Docker schema 2),
//! deserialised permissively: unknown fields are ignored, absent or null lists are empty.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
pub const OCI_LAYER_NONDIST_GZIP: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const OCI_LAYER_NONDIST_ZSTD: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_FOREIGN_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// What `Accept` lists when asking for a manifest.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// The layer media types an image may use (all tar, possibly compressed; the compression is
/// sniffed from the content anyway). An empty media type (some old tools) counts as a layer.
pub fn is_layer(media_type: &str) -> bool {
    media_type.is_empty()
        || [
            OCI_LAYER_TAR,
            OCI_LAYER_GZIP,
            OCI_LAYER_ZSTD,
            OCI_LAYER_NONDIST_TAR,
            OCI_LAYER_NONDIST_GZIP,
            OCI_LAYER_NONDIST_ZSTD,
            DOCKER_LAYER_TAR,
            DOCKER_LAYER_GZIP,
            DOCKER_LAYER_FOREIGN_GZIP,
        ]
        .contains(&media_type)
}

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

pub fn is_schema1(media_type: &str) -> bool {
    media_type == DOCKER_SCHEMA1 || media_type == DOCKER_SCHEMA1_SIGNED
}

/// An image manifest: one config and its layers, bottom first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default, deserialize_with = "null_default")]
    pub layers: Vec<Descriptor>,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (OCI) or manifest list (Docker): manifests per platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub manifests: Vec<Descriptor>,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

/// An OS/architecture pair (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// `null` as the type's default (some registries write `"layers": null`).
fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// What a manifest body says it is, for registries that send no (or a generic) Content-Type:
/// its own `mediaType`, else its shape.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: Option<u32>,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
        #[serde(default)]
        fs_layers: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = p.media_type.filter(|m| !m.is_empty()) {
        return Some(mt);
    }
    if p.schema_version == Some(1) || p.fs_layers.is_some() {
        return Some(DOCKER_SCHEMA1.to_string());
    }
    if p.manifests.is_some() {
        return Some(OCI_INDEX.to_string());
    }
    if p.config.is_some() {
        return Some(OCI_MANIFEST.to_string());
    }
    None
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform { os: os.into(), architecture: architecture.into(), variant: variant.map(Into::into) }
    }

    /// The platform of this machine, in OCI terms.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform::new("linux", arch, variant)
    }

    /// `(arch, variant)` with the aliases and default variants folded as containerd does, so
    /// that `arm64` matches `arm64/v8` and `aarch64`.
    fn normalized(&self) -> (String, Option<String>) {
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().filter(|v| !v.is_empty()).map(str::to_ascii_lowercase);
        match arch.as_str() {
            "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant.filter(|v| v != "v1")),
            "aarch64" | "arm64" => ("arm64".into(), variant.filter(|v| v != "v8" && v != "8")),
            "armhf" => ("arm".into(), Some("v7".into())),
            "armel" => ("arm".into(), Some("v6".into())),
            "arm" => (
                "arm".into(),
                Some(variant.map(|v| if v.starts_with('v') { v } else { format!("v{v}") }).unwrap_or("v7".into())),
            ),
            "i386" | "i486" | "i586" | "i686" | "386" => ("386".into(), None),
            _ => (arch, variant),
        }
    }

    /// How well `offered` suits `self` (the platform wanted): None if it cannot run, higher is
    /// better (an exact variant beats an unspecified one).
    pub fn score(&self, offered: &Platform) -> Option<u8> {
        if !self.os.eq_ignore_ascii_case(&offered.os) {
            return None;
        }
        let (want_arch, want_var) = self.normalized();
        let (arch, var) = offered.normalized();
        if want_arch != arch {
            return None;
        }
        match (want_var, var) {
            (a, b) if a == b => Some(2),
            (Some(_), None) | (None, Some(_)) => Some(1),
            _ => None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform::new(os, arch, None)),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
                Ok(Platform::new(os, arch, Some(v)))
            }
            _ => Err(format!("invalid platform {s:?}: expected os/arch[/variant]")),
        }
    }
}

/// The index entry best suited to `want`; entries without a platform, or for an `unknown`
/// OS (build attestations), never match.
pub fn select<'a>(index: &'a Index, want: &Platform) -> Option<&'a Descriptor> {
    let mut best: Option<(u8, &Descriptor)> = None;
    for d in &index.manifests {
        let Some(p) = &d.platform else { continue };
        if let Some(score) = want.score(p) {
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, d));
            }
        }
    }
    best.map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(platforms: &[&str]) -> Index {
        let manifests = platforms
            .iter()
            .enumerate()
            .map(|(i, p)| Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: Digest::of(&[i as u8]),
                size: 1,
                platform: Some(p.parse().unwrap()),
                annotations: Default::default(),
                urls: vec![],
            })
            .collect();
        Index { schema_version: 2, media_type: Some(OCI_INDEX.into()), manifests, annotations: Default::default() }
    }

    fn pick(idx: &Index, want: &str) -> Option<String> {
        select(idx, &want.parse().unwrap()).map(|d| d.platform.as_ref().unwrap().to_string())
    }

    #[test]
    fn platform_selection() {
        let idx = index(&[
            "unknown/unknown",
            "linux/arm/v6",
            "linux/arm/v7",
            "linux/arm64/v8",
            "linux/amd64",
            "linux/386",
            "windows/amd64",
        ]);
        assert_eq!(pick(&idx, "linux/amd64").as_deref(), Some("linux/amd64"));
        assert_eq!(pick(&idx, "linux/arm64/v8").as_deref(), Some("linux/arm64/v8"));
        assert_eq!(pick(&idx, "linux/arm64").as_deref(), Some("linux/arm64/v8"));
        assert_eq!(pick(&idx, "linux/arm/v7").as_deref(), Some("linux/arm/v7"));
        assert_eq!(pick(&idx, "linux/arm/v6").as_deref(), Some("linux/arm/v6"));
        assert_eq!(pick(&idx, "linux/arm").as_deref(), Some("linux/arm/v7"));
        assert_eq!(pick(&idx, "windows/amd64").as_deref(), Some("windows/amd64"));
        assert_eq!(pick(&idx, "linux/s390x"), None);
        // An arm64 entry without a variant is v8.
        let idx = index(&["linux/amd64", "linux/arm64"]);
        assert_eq!(pick(&idx, "linux/arm64/v8").as_deref(), Some("linux/arm64"));
        // An exact variant beats an unspecified one, whatever the order.
        let idx = index(&["linux/amd64", "linux/amd64/v3"]);
        assert_eq!(pick(&idx, "linux/amd64/v3").as_deref(), Some("linux/amd64/v3"));
        assert_eq!(pick(&idx, "linux/amd64").as_deref(), Some("linux/amd64"));
        let idx = index(&["linux/arm/v5"]);
        assert_eq!(pick(&idx, "linux/arm/v7"), None);
    }

    #[test]
    fn host_platform() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.to_string(), "linux/amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(h.to_string(), "linux/arm64/v8");
        }
    }

    #[test]
    fn permissive_parsing() {
        let m: Manifest = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
                "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","extra":1},
                "layers":null,"somethingNew":{"a":1}}"#,
        )
        .unwrap();
        assert!(m.layers.is_empty());
        assert_eq!(m.config.size, 7);
        let i: Index = serde_json::from_str(r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":1,"platform":{"architecture":"amd64","os":"linux","os.version":"x"}}]}"#).unwrap();
        assert_eq!(i.manifests[0].platform.as_ref().unwrap().to_string(), "linux/amd64");
        assert_eq!(sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(), Some(OCI_INDEX));
        assert_eq!(sniff_media_type(br#"{"schemaVersion":1,"fsLayers":[]}"#).as_deref(), Some(DOCKER_SCHEMA1));
        assert_eq!(sniff_media_type(br#"{"schemaVersion":2,"config":{}}"#).as_deref(), Some(OCI_MANIFEST));
        assert_eq!(sniff_media_type(br#"{"mediaType":"x"}"#).as_deref(), Some("x"));
    }
}
