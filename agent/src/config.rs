//! The engine's configuration: registries (mirrors, plain HTTP, credentials) and the network.
//!
//! Loaded by the server from `<data-dir>/config.toml` (or `--config`); every key is documented in
//! docs/CONFIGURATION.md. Unknown keys are refused so that a typo never silently does nothing.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Per-registry settings, keyed by registry host (`docker.io`, `127.0.0.1:5000`).
    pub registries: BTreeMap<String, RegistryConfig>,
    pub network: NetworkConfig,
    pub logs: LogConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Mirrors tried in order before the registry itself (`host[:port]`, optionally with a
    /// path prefix such as `mirror.local/dockerhub`); the upstream is always the last fallback.
    pub mirrors: Vec<String>,
    /// Talk plain HTTP to this registry (loopback registries are plain HTTP by default).
    pub insecure: bool,
    /// Accept an invalid TLS certificate (self-signed) from this registry.
    pub skip_tls_verify: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The Linux bridge containers attach to.
    pub bridge: String,
    /// The IPv4 subnet in CIDR form; the first host address is the bridge's (the gateway).
    pub subnet: String,
    /// Nameservers written to containers' /etc/resolv.conf; empty = copy the host's, minus
    /// loopback resolvers, which a container cannot reach.
    pub dns: Vec<Ipv4Addr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig { bridge: "berth0".into(), subnet: "10.88.0.0/16".into(), dns: vec![] }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A container's log file is rotated once it grows past this many bytes.
    pub max_size: u64,
    /// Rotated files kept besides the live one.
    pub max_files: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { max_size: 10 << 20, max_files: 3 }
    }
}

impl Config {
    /// The settings for a registry host, or the defaults.
    pub fn registry(&self, host: &str) -> RegistryConfig {
        self.registries.get(host).cloned().unwrap_or_default()
    }
}
