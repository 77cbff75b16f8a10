//! `berth.toml`: the optional app manifest at the root of a repository (or an uploaded build
//! context), read on every source deploy. `[build]` says how to build, `[service]` how to run;
//! CLI flags and API fields override it. Every key is documented in docs/BUILDS.md.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::scaling;

/// The file's name at the repository root.
pub const FILE: &str = "berth.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub service: Service,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// The Dockerfile, relative to the repository root (default: `<context>/Dockerfile`).
    pub dockerfile: Option<String>,
    /// The build context, a directory relative to the repository root (default: the root).
    pub context: Option<String>,
    /// The stage to build (default: the last).
    pub target: Option<String>,
    /// Build arguments.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub port: Option<u16>,
    pub health_path: Option<String>,
    pub release_command: Option<String>,
    /// `"256m"`, `"1g"`.
    pub memory: Option<String>,
    pub cpus: Option<f64>,
    /// `"NAME:/path"` each.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Variables that are not secret (secrets are set with `berth env NAME set --secret`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// As `berth scale`: min, max, concurrency, target, freeze_after, stop_after,
    /// request_timeout, queue, stable_window.
    pub scaling: Option<scaling::Patch>,
}

impl Manifest {
    /// Reads `berth.toml` under `root`; a missing file is an empty manifest.
    pub fn load(root: &Path) -> Result<Manifest, String> {
        let path = root.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(e) => return Err(format!("{FILE}: {e}")),
        };
        Manifest::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Manifest, String> {
        let m: Manifest = toml::from_str(text).map_err(|e| format!("{FILE}: {}", e.to_string().trim_end()))?;
        for (k, d) in [("build.context", &m.build.context), ("build.dockerfile", &m.build.dockerfile)] {
            if let Some(p) = d {
                if Path::new(p).is_absolute() || Path::new(p).components().any(|c| c == std::path::Component::ParentDir)
                {
                    return Err(format!("{FILE}: {k} = {p:?} must be a path inside the repository"));
                }
            }
        }
        Ok(m)
    }

    /// The `[service]` settings as the API's settings object (volumes as `{volume, path}`).
    pub fn settings_json(&self) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        use serde_json::json;
        let s = &self.service;
        let mut o = serde_json::Map::new();
        if let Some(p) = s.port {
            o.insert("port".into(), json!(p));
        }
        if let Some(h) = &s.health_path {
            o.insert("health_path".into(), json!(h));
        }
        if let Some(r) = &s.release_command {
            o.insert("release_command".into(), json!(r));
        }
        if let Some(m) = &s.memory {
            o.insert("memory".into(), json!(m));
        }
        if let Some(c) = s.cpus {
            o.insert("cpus".into(), json!(c));
        }
        if !s.env.is_empty() {
            o.insert("env".into(), json!(s.env));
        }
        if !s.volumes.is_empty() {
            let mut v = Vec::new();
            for spec in &s.volumes {
                let Some((name, path)) = spec.split_once(':') else {
                    return Err(format!("{FILE}: service.volumes: {spec:?} should be NAME:/path"));
                };
                v.push(json!({ "volume": name, "path": path }));
            }
            o.insert("volumes".into(), json!(v));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_and_errors() {
        let m = Manifest::parse(
            r#"
[build]
dockerfile = "docker/Dockerfile"
context = "app"
target = "runtime"
args = { VERSION = "1.2" }

[service]
port = 8000
health_path = "/healthz"
release_command = "python3 migrate.py"
memory = "256m"
cpus = 0.5
volumes = ["data:/data"]
env = { MODE = "production" }
scaling = { min = 1, max = 3, freeze_after = "30s" }
"#,
        )
        .unwrap();
        assert_eq!(m.build.target.as_deref(), Some("runtime"));
        assert_eq!(m.build.args["VERSION"], "1.2");
        let s = m.settings_json().unwrap();
        assert_eq!(s["volumes"], serde_json::json!([{ "volume": "data", "path": "/data" }]));
        assert_eq!(m.service.scaling.as_ref().unwrap().max, Some(3));
        let e = Manifest::parse("[service]\nprot = 1\n").unwrap_err();
        assert!(e.contains("prot") && e.contains("line 2"), "{e}");
        let e = Manifest::parse("[build]\ncontext = \"../x\"\n").unwrap_err();
        assert!(e.contains("inside the repository"), "{e}");
        assert!(Manifest::parse("[service]\nvolumes = [\"nocolon\"]\n").unwrap().settings_json().is_err());
    }
}
