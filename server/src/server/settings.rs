//! `berth server`'s options: the clap definition (that is the `--help`) and their validation
//! into [`Settings`], done before any port is bound or the data directory is touched.

use std::net::{IpAddr, SocketAddr};

/// The options of `berth server`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the proxy listens for HTTP requests to services.
    #[arg(long, env = "BERTH_HTTP_ADDR", default_value = "0.0.0.0:80", value_name = "ADDR")]
    pub http_addr: String,
    /// Where the API and the dashboard listen.
    #[arg(long, env = "BERTH_API_ADDR", default_value = "127.0.0.1:7070", value_name = "ADDR")]
    pub api_addr: String,
    /// Services answer at <service>.<domain> (required).
    #[arg(long, env = "BERTH_DOMAIN", value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// The host name the proxy hands to the API, dashboard and git (default: berth.<domain>).
    #[arg(long, env = "BERTH_CONTROL_HOST", value_name = "HOST")]
    pub control_host: Option<String>,
    /// A peer (IP or CIDR) whose X-Forwarded-For is kept; repeat it or separate with commas.
    #[arg(long, env = "BERTH_TRUSTED_PROXY", value_name = "CIDR", value_delimiter = ',')]
    pub trusted_proxy: Vec<String>,
    /// How much of a held request's body the proxy reads into memory while an instance starts
    /// (the rest streams once it is ready), like 1m or 64k.
    #[arg(long, env = "BERTH_HOLD_BODY_LIMIT", default_value = "1m", value_name = "SIZE")]
    pub hold_body_limit: String,
    /// How long a client may take to send a request's headers before the proxy closes the
    /// connection, like 10s.
    #[arg(long, env = "BERTH_HEADER_TIMEOUT", default_value = "10s", value_name = "DUR")]
    pub header_timeout: String,
    /// How many services that went to zero keep a container created but not started, so their
    /// next cold start skips most of the setup (each costs a shim, an init process, an address
    /// and cgroups; 0 turns it off).
    #[arg(long, env = "BERTH_PREPARED", default_value_t = 4, value_name = "N")]
    pub prepared: usize,
    /// Threads the proxy serves connections on, each with its own event loop and upstream
    /// connection pool, as nginx has one worker per core (default: one per CPU).
    #[arg(long, env = "BERTH_PROXY_THREADS", value_name = "N")]
    pub proxy_threads: Option<usize>,
    /// Keep the state in PostgreSQL (postgres://USER:PASSWORD@HOST:PORT/DB) instead of SQLite
    /// in <data-dir>/berth.db; `sqlite:PATH` puts the SQLite file elsewhere.
    #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Where the SSH server for `git push` listens ("" or "off": no SSH server).
    #[arg(long, env = "BERTH_SSH_ADDR", default_value = "0.0.0.0:2222", value_name = "ADDR")]
    pub ssh_addr: String,
    /// CPUs each build step may use, like 1.5 (default: all but one, at least one), so that
    /// builds cannot starve the services.
    #[arg(long, env = "BERTH_BUILD_CPUS", value_name = "CPUS")]
    pub build_cpus: Option<f64>,
    /// Memory each build step may use, like 2g (default: half the machine's).
    #[arg(long, env = "BERTH_BUILD_MEMORY", value_name = "SIZE")]
    pub build_memory: Option<String>,
    /// Builds that run at once; more wait their turn.
    #[arg(long, env = "BERTH_BUILDS", default_value_t = 2, value_name = "N")]
    pub builds: usize,
    /// Where the proxy listens for HTTPS (TLS, HTTP/2 and HTTP/1.1; "off": no TLS listener).
    #[arg(long, env = "BERTH_HTTPS_ADDR", default_value = "0.0.0.0:443", value_name = "ADDR")]
    pub https_addr: String,
    /// The ACME CA's directory URL certificates are ordered from ("off": order nothing).
    #[arg(long, env = "BERTH_ACME_DIRECTORY", default_value = super::tls::acme::LETS_ENCRYPT, value_name = "URL")]
    pub acme_directory: String,
    /// The contact address of the ACME account (the CA's expiry warnings go there).
    #[arg(long, env = "BERTH_ACME_EMAIL", value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// A PEM root to trust for the ACME directory's own HTTPS, besides the system's (a test CA).
    #[arg(long, env = "BERTH_ACME_CA_ROOT", value_name = "FILE")]
    pub acme_ca_root: Option<std::path::PathBuf>,
    /// How the CA validates a name: http-01 (the proxy's HTTP listener must be the name's port
    /// 80) or tls-alpn-01 (its HTTPS listener must be the name's port 443).
    #[arg(long, env = "BERTH_ACME_CHALLENGE", default_value = "http-01", value_name = "TYPE")]
    pub acme_challenge: String,
    /// The wait before retrying a failed order, like 1m; it doubles with each failure in a row,
    /// up to a day.
    #[arg(long, env = "BERTH_ACME_RETRY", default_value = "1m", value_name = "DUR")]
    pub acme_retry: String,
    /// Names (or *.example.com patterns) whose certificate is ordered during their first
    /// handshake, though no service answers there; repeat it or separate with commas.
    #[arg(long, env = "BERTH_TLS_ON_DEMAND_ALLOW", value_name = "NAMES", value_delimiter = ',')]
    pub tls_on_demand_allow: Vec<String>,
    /// A URL asked GET URL?domain=NAME before an on-demand order; only a 200 allows it.
    #[arg(long, env = "BERTH_TLS_ON_DEMAND_ASK", value_name = "URL")]
    pub tls_on_demand_ask: Option<String>,
}

/// The machine's memory, from /proc/meminfo.
fn memory_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The validated options.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// Lowercase, without a trailing dot.
    pub domain: String,
    pub control_host: String,
    pub trusted_proxies: Vec<Cidr>,
    pub hold_body_limit: usize,
    pub header_timeout: std::time::Duration,
    pub prepared: usize,
    /// Event-loop threads of the proxy (1..=256).
    pub proxy_threads: usize,
    pub database_url: Option<String>,
    /// None: no SSH server.
    pub ssh_addr: Option<SocketAddr>,
    pub build_cpus: f64,
    pub build_memory: u64,
    pub builds: usize,
    /// None: no TLS listener.
    pub https_addr: Option<SocketAddr>,
    /// None: no ACME.
    pub acme: Option<super::tls::acme::Config>,
    pub on_demand: super::tls::OnDemand,
}

impl Settings {
    /// Validates `args`; the error is one line naming the option and the problem.
    pub fn from_args(args: &Args) -> Result<Settings, String> {
        let http_addr = addr("--http-addr", &args.http_addr)?;
        let api_addr = addr("--api-addr", &args.api_addr)?;
        let Some(domain) = &args.domain else {
            return Err("--domain is required (or BERTH_DOMAIN): services answer at <service>.<domain>".into());
        };
        let domain = dns_name(&super::tls::normalize(domain)).map_err(|e| format!("--domain {domain:?}: {e}"))?;
        let control_host = match &args.control_host {
            Some(h) => dns_name(&super::tls::normalize(h)).map_err(|e| format!("--control-host {h:?}: {e}"))?,
            None => {
                let h = format!("berth.{domain}");
                dns_name(&h).map_err(|e| format!("--control-host (default {h:?}): {e}; set it explicitly"))?
            }
        };
        let trusted_proxies = args
            .trusted_proxy
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<Cidr>().map_err(|e| format!("--trusted-proxy {s:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let hold_body_limit =
            berth_agent::engine::parse_size(&args.hold_body_limit).filter(|&n| n <= 1 << 30).ok_or_else(|| {
                format!("--hold-body-limit {:?}: expected a size up to 1g, like 1m or 64k", args.hold_body_limit)
            })? as usize;
        let header_timeout = super::scaling::parse_duration(&args.header_timeout)
            .map(std::time::Duration::from_millis)
            .map_err(|e| format!("--header-timeout: {e}"))?;
        if !(std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(600)).contains(&header_timeout) {
            return Err(format!("--header-timeout {:?}: must be from 100ms to 10m", args.header_timeout));
        }
        if http_addr == api_addr && http_addr.port() != 0 {
            return Err(format!(
                "--http-addr and --api-addr are both {http_addr}: the proxy and the API need their own ports"
            ));
        }
        let ssh_addr = match args.ssh_addr.trim() {
            "" | "off" => None,
            s => Some(addr("--ssh-addr", s)?),
        };
        if let Some(ssh) = ssh_addr.filter(|a| a.port() != 0 && (*a == http_addr || *a == api_addr)) {
            return Err(format!("--ssh-addr {ssh} is also --http-addr or --api-addr: SSH needs its own port"));
        }
        let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let build_cpus = match args.build_cpus {
            Some(c) if c > 0.0 && c <= ncpu => c,
            Some(c) => return Err(format!("--build-cpus {c}: must be more than 0 and at most {ncpu}")),
            None => (ncpu - 1.0).max(1.0),
        };
        let build_memory = match &args.build_memory {
            Some(m) => berth_agent::engine::parse_size(m)
                .filter(|&n| n >= 64 << 20)
                .ok_or_else(|| format!("--build-memory {m:?}: expected a size of at least 64m, like 2g"))?,
            None => memory_total().map(|m| m / 2).unwrap_or(2 << 30),
        };
        if !(1..=64).contains(&args.builds) {
            return Err(format!("--builds {}: from 1 to 64", args.builds));
        }
        let https_addr = match args.https_addr.trim() {
            "" | "off" => None,
            s => Some(addr("--https-addr", s)?),
        };
        // The same port on the same address, or on any address and a specific one, clashes.
        let clash = |a: SocketAddr, b: SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        if let Some(h) = https_addr {
            for (other, name) in
                [(Some(http_addr), "--http-addr"), (Some(api_addr), "--api-addr"), (ssh_addr, "--ssh-addr")]
            {
                if let Some(o) = other.filter(|&o| clash(h, o)) {
                    return Err(format!("--https-addr {h} and {name} {o} are the same port: TLS needs its own"));
                }
            }
        }
        let acme = match args.acme_directory.trim() {
            "" | "off" => None,
            url => {
                let u = reqwest::Url::parse(url)
                    .map_err(|e| format!("--acme-directory {url:?}: not a URL ({e}); give https://... or off"))?;
                if u.scheme() != "https" {
                    return Err(format!("--acme-directory {url:?}: an ACME directory is an https:// URL"));
                }
                if let Some(root) = &args.acme_ca_root {
                    super::tls::acme::check_ca_root(root)?;
                }
                if let Some(e) = &args.acme_email {
                    let ok = match e.split_once('@') {
                        Some((local, domain)) => {
                            !local.is_empty()
                                && !domain.contains('@')
                                && domain.contains('.')
                                && dns_name(domain).is_ok()
                                && !e.contains(|c: char| {
                                    c.is_whitespace() || c.is_control() || matches!(c, ',' | ':' | '<' | '>')
                                })
                        }
                        None => false,
                    };
                    if !ok {
                        return Err(format!("--acme-email {e:?}: not an email address (one, like you@example.com)"));
                    }
                }
                let retry = super::scaling::parse_duration(&args.acme_retry)
                    .map(std::time::Duration::from_millis)
                    .map_err(|e| format!("--acme-retry: {e}"))?;
                if retry < std::time::Duration::from_secs(1) || retry > std::time::Duration::from_secs(86400) {
                    return Err(format!("--acme-retry {:?}: from 1s to 1d", args.acme_retry));
                }
                Some(super::tls::acme::Config {
                    directory: url.to_string(),
                    email: args.acme_email.clone(),
                    ca_root: args.acme_ca_root.clone(),
                    challenge: super::tls::acme::Challenge::parse(&args.acme_challenge)?,
                    retry,
                })
            }
        };
        let mut allow = Vec::new();
        for n in args.tls_on_demand_allow.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (wild, rest) = match n.strip_prefix("*.") {
                Some(r) => ("*.", r),
                None => ("", n),
            };
            let name =
                dns_name(&super::tls::normalize(rest)).map_err(|e| format!("--tls-on-demand-allow {n:?}: {e}"))?;
            if !wild.is_empty() && !name.contains('.') {
                return Err(format!(
                    "--tls-on-demand-allow {n:?}: a pattern must name a domain of its own (*.apps.example.com), not a top-level domain"
                ));
            }
            allow.push(format!("{wild}{name}"));
        }
        if let Some(u) = &args.tls_on_demand_ask {
            reqwest::Url::parse(u)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| format!("--tls-on-demand-ask {u:?}: not an http(s) URL"))?;
        }
        let on_demand = super::tls::OnDemand { allow, ask: args.tls_on_demand_ask.clone() };
        let proxy_threads = match args.proxy_threads {
            Some(n @ 1..=256) => n,
            Some(n) => return Err(format!("--proxy-threads {n}: give 1 to 256")),
            None => std::thread::available_parallelism().map_or(2, |n| n.get().min(64)),
        };
        if args.prepared > 1000 {
            return Err(format!("--prepared {}: at most 1000", args.prepared));
        }
        Ok(Settings {
            http_addr,
            api_addr,
            domain,
            control_host,
            trusted_proxies,
            hold_body_limit,
            header_timeout,
            prepared: args.prepared,
            proxy_threads,
            ssh_addr,
            build_cpus,
            build_memory,
            builds: args.builds,
            https_addr,
            acme,
            on_demand,
            database_url: match &args.database_url {
                Some(url) => {
                    super::db::Location::parse(Some(url), std::path::Path::new("."))?;
                    Some(url.clone())
                }
                None => None,
            },
        })
    }
}

fn addr(option: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{option} {s:?}: not an address with a port, like 127.0.0.1:7070 or [::1]:7070"))
}

/// Validates a DNS name and returns it lowercased, without its trailing dot.
pub fn dns_name(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.is_empty() {
        return Err("a DNS name cannot be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("a DNS name is at most 253 characters, this one has {}", name.len()));
    }
    for label in name.split('.') {
        label_problem(label).map_err(|e| format!("label {label:?} {e}"))?;
    }
    if name.parse::<IpAddr>().is_ok() || name.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("an IP address or a name whose last label is numeric is not a domain".into());
    }
    Ok(name)
}

/// Why `label` is not a DNS label (1–63 of `a-z0-9-`, not starting or ending with `-`), if it
/// is not. Shared with service names, which become labels under the domain.
pub fn label_problem(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("is empty".into());
    }
    if label.len() > 63 {
        return Err(format!("is {} characters long, at most 63 are allowed", label.len()));
    }
    if let Some(c) = label.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(format!("contains {c:?}: only lowercase letters a-z, digits and '-' are allowed"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("starts or ends with '-'".into());
    }
    Ok(())
}

/// An IPv4 or IPv6 network; a plain address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask(u32::from(ip).into(), 32, self.prefix) == u32::from(net) as u128,
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask(u128::from(ip), 128, self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

/// `bits` (an address of `width` bits) with everything after `prefix` cleared.
fn mask(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        let keep = u128::MAX << (width - prefix);
        bits & keep & (u128::MAX >> (128 - width))
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 or IPv6 address"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width && !p.starts_with('+') => n,
                _ => return Err(format!("prefix length {p:?} must be a number from 0 to {width}")),
            },
        };
        let bits = match addr {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        };
        if mask(bits, width, prefix) != bits {
            return Err(format!("{s} has bits set after the prefix: the network is written with them cleared"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("example.com", Ok("example.com")),
            ("Example.COM.", Ok("example.com")),
            ("test.local", Ok("test.local")),
            ("localhost", Ok("localhost")),
            ("a-b.c1.io", Ok("a-b.c1.io")),
            ("", Err("cannot be empty")),
            (".", Err("cannot be empty")),
            ("bad domain", Err("label \"bad domain\" contains ' '")),
            ("a..b", Err("label \"\" is empty")),
            ("-a.com", Err("starts or ends with '-'")),
            ("a-.com", Err("starts or ends with '-'")),
            ("under_score.com", Err("contains '_'")),
            ("10.0.0.1", Err("IP address")),
            ("x.123", Err("numeric")),
            (&"a".repeat(64), Err("at most 63")),
        ];
        for (input, want) in cases {
            let got = dns_name(input);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{input:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{input:?}: got {g:?}, want {w:?}"),
                _ => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63)].join(".");
        assert!(dns_name(&long).unwrap_err().contains("at most 253"));
    }

    #[test]
    fn cidrs() {
        let ok: &[(&str, &str)] = &[
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::1", "::1/128"),
            ("fd00::/8", "fd00::/8"),
        ];
        for (input, want) in ok {
            assert_eq!(input.parse::<Cidr>().unwrap().to_string(), *want, "{input}");
        }
        let bad: &[(&str, &str)] = &[
            ("10.0.0.0/99", "prefix length \"99\" must be a number from 0 to 32"),
            ("10.0.0.0/", "prefix length \"\""),
            ("10.0.0.0/+8", "prefix length \"+8\""),
            ("::/129", "from 0 to 128"),
            ("10.0.0.1/8", "bits set after the prefix"),
            ("nonsense", "\"nonsense\" is not an IPv4 or IPv6 address"),
            ("10.0.0/8", "not an IPv4 or IPv6 address"),
        ];
        for (input, want) in bad {
            let err = input.parse::<Cidr>().unwrap_err();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn cidr_contains() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!("fd00::/8".parse::<Cidr>().unwrap().contains("fd12::1".parse().unwrap()));
    }

    fn args(domain: Option<&str>) -> Args {
        Args {
            http_addr: "0.0.0.0:80".into(),
            api_addr: "127.0.0.1:7070".into(),
            domain: domain.map(Into::into),
            control_host: None,
            trusted_proxy: vec![],
            hold_body_limit: "1m".into(),
            header_timeout: "10s".into(),
            prepared: 4,
            proxy_threads: None,
            database_url: None,
            ssh_addr: "0.0.0.0:2222".into(),
            build_cpus: None,
            build_memory: None,
            builds: 2,
            https_addr: "0.0.0.0:443".into(),
            acme_directory: crate::server::tls::acme::LETS_ENCRYPT.into(),
            acme_email: None,
            acme_ca_root: None,
            acme_challenge: "http-01".into(),
            acme_retry: "1m".into(),
            tls_on_demand_allow: vec![],
            tls_on_demand_ask: None,
        }
    }

    #[test]
    fn settings() {
        let s = Settings::from_args(&args(Some("Apps.Example.com."))).unwrap();
        assert_eq!(s.domain, "apps.example.com");
        assert_eq!(s.control_host, "berth.apps.example.com");
        type Change = fn(&mut Args);
        let cases: &[(Change, &str)] = &[
            (|a| a.domain = None, "--domain is required"),
            (|a| a.domain = Some("bad domain".into()), "--domain \"bad domain\": label"),
            (|a| a.api_addr = "nonsense".into(), "--api-addr \"nonsense\": not an address"),
            (|a| a.http_addr = "127.0.0.1".into(), "--http-addr \"127.0.0.1\""),
            (|a| a.https_addr = "127.0.0.1:7070".into(), "--https-addr 127.0.0.1:7070 and --api-addr"),
            (|a| a.acme_directory = "http://ca.example/dir".into(), "an ACME directory is an https:// URL"),
            (|a| a.acme_challenge = "dns-01".into(), "--acme-challenge \"dns-01\": expected http-01 or tls-alpn-01"),
            (|a| a.acme_retry = "0s".into(), "--acme-retry \"0s\": from 1s to 1d"),
            (|a| a.acme_retry = "25h".into(), "--acme-retry \"25h\": from 1s to 1d"),
            (|a| a.acme_email = Some("a@".into()), "not an email address"),
            (|a| a.acme_email = Some("mailto:a@b.com".into()), "not an email address"),
            (|a| a.acme_email = Some("a@b.com,c@d.com".into()), "not an email address"),
            (|a| a.acme_email = Some("a@b".into()), "not an email address"),
            (
                |a| a.https_addr = "0.0.0.0:80".into(),
                "--https-addr 0.0.0.0:80 and --http-addr 0.0.0.0:80 are the same port",
            ),
            (|a| a.https_addr = "127.0.0.1:2222".into(), "and --ssh-addr 0.0.0.0:2222 are the same port"),
            (|a| a.acme_directory = "garbage".into(), "--acme-directory \"garbage\": not a URL"),
            (|a| a.tls_on_demand_allow = vec!["*.com".into()], "not a top-level domain"),
            (|a| a.acme_email = Some("nobody".into()), "--acme-email \"nobody\": not an email address"),
            (|a| a.acme_ca_root = Some("/nonexistent.pem".into()), "--acme-ca-root /nonexistent.pem: No such file"),
            (|a| a.tls_on_demand_allow = vec!["a b".into()], "--tls-on-demand-allow \"a b\""),
            (|a| a.tls_on_demand_ask = Some("ftp://x".into()), "--tls-on-demand-ask \"ftp://x\": not an http(s) URL"),
            (|a| a.control_host = Some("a_b".into()), "--control-host \"a_b\""),
            (|a| a.ssh_addr = "2222".into(), "--ssh-addr \"2222\": not an address"),
            (|a| a.ssh_addr = "127.0.0.1:7070".into(), "SSH needs its own port"),
            (|a| a.trusted_proxy = vec!["10.0.0.0/8".into(), "10.0.0.0/99".into()], "--trusted-proxy \"10.0.0.0/99\""),
        ];
        for (change, want) in cases {
            let mut a = args(Some("test.local"));
            change(&mut a);
            let err = Settings::from_args(&a).unwrap_err();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
            assert!(!err.contains('\n'));
        }
    }
}
