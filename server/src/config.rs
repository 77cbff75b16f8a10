//! Loading and validating `config.toml` (see docs/CONFIGURATION.md for every key).
//!
//! A bad config is reported in one line naming the file and the problem, and the process exits
//! with 64 (EX_USAGE) before it binds a port or touches a container.

use std::path::{Path, PathBuf};

use berth_agent::Config;

/// Exit code for a bad configuration or bad command line (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The config file to read: `--config`, else `<data-dir>/config.toml` (which may be absent).
pub fn path(data_dir: &Path, explicit: Option<&Path>) -> (PathBuf, bool) {
    match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (data_dir.join("config.toml"), false),
    }
}

pub fn load(data_dir: &Path, explicit: Option<&Path>) -> Result<Config, Error> {
    let (path, required) = path(data_dir, explicit);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Config::default()),
        Err(e) => return Err(Error(format!("config {}: {e}", path.display()))),
    };
    parse(&text).map_err(|msg| Error(format!("config {}: {msg}", path.display())))
}

pub fn parse(text: &str) -> Result<Config, String> {
    let cfg: Config = toml::from_str(text).map_err(|e| {
        // toml's message spans several lines (a source excerpt); keep one line with the position.
        let msg = e.message().to_string();
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {msg}")
            }
            None => msg,
        }
    })?;
    berth_agent::network::validate(&cfg.network).map_err(|e| format!("[network] {e}"))?;
    for (host, reg) in &cfg.registries {
        if host.is_empty() || host.contains('/') {
            return Err(format!("[registries.{host:?}]: a registry key is a host name with an optional port, like \"docker.io\" or \"127.0.0.1:5000\""));
        }
        for m in &reg.mirrors {
            if m.is_empty() || m.contains("://") || m.contains(char::is_whitespace) {
                return Err(format!(
                    "[registries.\"{host}\"]: mirror {m:?} must be host[:port][/path], without a scheme \
                     (set insecure = true on the mirror's own [registries] entry for plain HTTP)"
                ));
            }
        }
        if reg.username.is_some() != reg.password.is_some() {
            return Err(format!("[registries.\"{host}\"]: username and password go together"));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let cfg = parse(
            r#"
[registries."docker.io"]
mirrors = ["mirror.local:5000", "mirror2.local/hub"]
[registries."127.0.0.1:5000"]
insecure = true
username = "u"
password = "p"
[registries."r.example"]
skip_tls_verify = true
[network]
bridge = "berthtest1"
subnet = "10.123.0.0/24"
dns = ["1.1.1.1"]
[logs]
max_size = 1048576
max_files = 2
"#,
        )
        .unwrap();
        assert_eq!(cfg.registry("docker.io").mirrors.len(), 2);
        assert!(cfg.registry("127.0.0.1:5000").insecure);
        assert_eq!(cfg.network.bridge, "berthtest1");
        assert_eq!(cfg.logs.max_files, 2);
    }

    #[test]
    fn bad_configs_say_what_and_where() {
        let cases = [
            ("[network]\nbridge = \"b\"\nsubnett = \"x\"\n", "line 3: unknown field `subnett`"),
            ("[network]\nsubnet = \"10.0.0.0\"\n", "[network] subnet \"10.0.0.0\" is not a private IPv4 CIDR"),
            ("[network]\nsubnet = \"127.0.0.0/24\"\n", "[network] subnet \"127.0.0.0/24\""),
            ("[network]\nbridge = \"lo\"\n", "[network] bridge name \"lo\""),
            ("[registries.\"docker.io\"]\nmirrors = [\"http://m.local\"]\n", "mirror \"http://m.local\""),
            ("[network]\nbridge = \"a-very-long-bridge-name\"\n", "[network] bridge name"),
            ("[registries.\"x\"]\nusername = \"u\"\n", "username and password go together"),
            ("[logs]\nmax_size = \"big\"\n", "line 2: invalid type"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }
}
