//! The image config blob (OCI / Docker `container.image.v1`): what containers start with
//! (`config`) and what the layers must hash to (`rootfs.diff_ids`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::digest::Digest;

/// The runtime defaults of an image, from its config's `config` object. Empty values are
/// absent values: an empty `Cmd` is `None`, an empty `WorkingDir` is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `8080/tcp`, `53/udp` (a bare port is tcp, as in Docker), sorted.
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Paths declared as volumes, sorted.
    pub volumes: Vec<String>,
    /// The HEALTHCHECK test as Docker stores it (`["CMD", ...]`, `["CMD-SHELL", "..."]`,
    /// `["NONE"]`), if the image has one.
    #[serde(default)]
    pub healthcheck: Option<Vec<String>>,
}

/// The whole config file, as far as the store needs it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConfigFile {
    pub config: ImageConfig,
    pub created: Option<String>,
    pub os: Option<String>,
    pub architecture: Option<String>,
    /// One per layer, bottom first: the sha256 of each layer's uncompressed tar.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    diff_ids: Vec<Digest>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default, deserialize_with = "null_default")]
    env: Vec<String>,
    #[serde(default, deserialize_with = "str_slice")]
    entrypoint: Option<Vec<String>>,
    #[serde(default, deserialize_with = "str_slice")]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    labels: BTreeMap<String, Option<String>>,
    #[serde(default, deserialize_with = "null_default")]
    volumes: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    healthcheck: Option<RawHealthcheck>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawHealthcheck {
    #[serde(default, deserialize_with = "null_default")]
    test: Vec<String>,
}

fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Docker's `StrSlice`: a JSON array of strings, or a single string (old images), or null.
fn str_slice<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<S>::deserialize(d)? {
        None => None,
        Some(S::One(s)) => Some(vec![s]),
        Some(S::Many(v)) => Some(v),
    }
    .filter(|v| !v.is_empty()))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Parses an image config blob; the error says what is wrong with it.
pub(crate) fn parse_file(bytes: &[u8]) -> Result<ConfigFile, String> {
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| format!("malformed image config: {e}"))?;
    if let Some(kind) = raw.rootfs.as_ref().and_then(|r| r.kind.as_deref()) {
        if kind != "layers" {
            return Err(format!("unsupported rootfs type {kind:?} in the image config"));
        }
    }
    let c = raw.config.unwrap_or_default();
    let mut exposed_ports: Vec<String> = c
        .exposed_ports
        .into_keys()
        .map(|p| if p.contains('/') { p.to_ascii_lowercase() } else { format!("{p}/tcp") })
        .collect();
    exposed_ports.sort();
    exposed_ports.dedup();
    let config = ImageConfig {
        env: c.env,
        entrypoint: c.entrypoint,
        cmd: c.cmd,
        working_dir: non_empty(c.working_dir),
        user: non_empty(c.user),
        exposed_ports,
        stop_signal: non_empty(c.stop_signal),
        labels: c.labels.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
        volumes: c.volumes.into_keys().collect(),
        healthcheck: c.healthcheck.map(|h| h.test).filter(|t| !t.is_empty()),
    };
    Ok(ConfigFile {
        config,
        created: non_empty(raw.created),
        os: non_empty(raw.os),
        architecture: non_empty(raw.architecture),
        diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_style_config() {
        let json = br#"{
            "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/bin", "A=1"],
                "Entrypoint": ["/docker-entrypoint.sh"],
                "Cmd": ["nginx", "-g", "daemon off;"],
                "WorkingDir": "/srv",
                "User": "101:101",
                "ExposedPorts": {"80/tcp": {}, "443": {}, "53/UDP": {}},
                "StopSignal": "SIGQUIT",
                "Labels": {"maintainer": "x", "nullish": null},
                "Volumes": {"/var/cache/nginx": {}, "/data": {}},
                "Healthcheck": {"Test": ["CMD", "true"]},
                "Unknown": 1
            },
            "container_config": {"Cmd": ["ignored"]},
            "rootfs": {"type": "layers", "diff_ids": [
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            ]},
            "history": [{"created_by": "x"}]
        }"#;
        let f = parse_file(json).unwrap();
        let c = &f.config;
        assert_eq!(c.env, ["PATH=/usr/local/sbin:/usr/bin", "A=1"]);
        assert_eq!(c.entrypoint.as_deref(), Some(&["/docker-entrypoint.sh".to_string()][..]));
        assert_eq!(c.cmd.as_ref().unwrap().len(), 3);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("101:101"));
        assert_eq!(c.exposed_ports, ["443/tcp", "53/udp", "80/tcp"]);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(c.labels.len(), 1);
        assert_eq!(c.volumes, ["/data", "/var/cache/nginx"]);
        assert_eq!(f.created.as_deref(), Some("2024-01-02T03:04:05Z"));
        assert_eq!(f.diff_ids, [Digest::of(b"")]);
        assert_eq!((f.os.as_deref(), f.architecture.as_deref()), (Some("linux"), Some("amd64")));
    }

    #[test]
    fn sparse_and_odd_configs() {
        // Minimal: no config object at all (a scratch image built by hand).
        let f = parse_file(br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        assert_eq!(f.config, ImageConfig::default());
        // Nulls and empties are absences; a string Cmd is a one-element list (old Docker).
        let f = parse_file(br#"{"config":{"Env":null,"Entrypoint":null,"Cmd":"/bin/sh","WorkingDir":"","User":"","Labels":null,"ExposedPorts":null,"Volumes":null}}"#).unwrap();
        assert_eq!(f.config.cmd, Some(vec!["/bin/sh".to_string()]));
        assert_eq!((f.config.entrypoint, f.config.working_dir, f.config.user), (None, None, None));
        let f = parse_file(br#"{"config":{"Entrypoint":[],"Cmd":[]}}"#).unwrap();
        assert_eq!((f.config.entrypoint, f.config.cmd), (None, None));

        assert!(parse_file(b"not json").unwrap_err().contains("malformed image config"));
        assert!(parse_file(br#"{"rootfs":{"type":"layers","diff_ids":["md5:x"]}}"#).is_err());
        assert!(parse_file(br#"{"rootfs":{"type":"snapshot"}}"#).unwrap_err().contains("rootfs type"));
    }
}
