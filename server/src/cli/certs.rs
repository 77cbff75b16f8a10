//! `berth certs` (the certificates of every name, uploads) and `berth https NAME` (a
//! service's HTTP → HTTPS redirect and HSTS).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::client::{service_name, Client, Conn};

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Every name's certificate: issued, uploaded, pending or failed (and why).
    Ls,
    /// Serve your own certificate for HOST (or *.DOMAIN): it wins over an issued one, and
    /// nothing is ordered for HOST while it is valid.
    Add {
        host: String,
        /// The certificate chain (PEM, leaf first).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Its private key (PEM).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Stop serving an uploaded certificate (an issued one is ordered again if HOST is served).
    Rm { host: String },
}

fn time_of(v: &serde_json::Value) -> String {
    match v.as_u64() {
        Some(t) => time::OffsetDateTime::from_unix_timestamp(t as i64)
            .ok()
            .and_then(|d| d.format(&time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]")).ok())
            .unwrap_or_default(),
        None => "-".into(),
    }
}

/// A host as the API's path takes it: a name, maybe `*.`-prefixed, nothing that would move the
/// request elsewhere (`/`, `..`, `?`, `#`, `%`) or that is no name at all.
fn check_host(host: &str) -> Result<&str> {
    let bad = host.is_empty()
        || host.chars().any(|c| matches!(c, '/' | '\\' | '?' | '#' | '%') || c.is_whitespace() || c.is_control())
        || host.trim_matches('.').is_empty()
        || host.contains("..");
    if bad {
        bail!("{host:?} is not a host name (like shop.example.com or *.example.com)");
    }
    Ok(host)
}

pub fn certs(conn: &Conn, data_dir: &Path, cmd: Option<&CertsCommand>) -> Result<i32> {
    if let Some(CertsCommand::Add { host, .. } | CertsCommand::Rm { host }) = cmd {
        check_host(host)?;
    }
    let c = Client::new(conn, data_dir)?;
    let rt = crate::cli::runtime();
    match cmd.unwrap_or(&CertsCommand::Ls) {
        CertsCommand::Ls => {
            let v = rt.block_on(c.json(c.req(reqwest::Method::GET, "/certs")))?;
            if conn.json {
                println!("{v}");
                return Ok(0);
            }
            println!("{:<40} {:<8} {:<10} {:<17} DETAIL", "HOST", "STATUS", "SOURCE", "EXPIRES");
            for s in v.as_array().into_iter().flatten() {
                let detail = match (s["error"].as_str(), s["next_attempt"].as_u64()) {
                    (Some(e), Some(_)) => format!("{e} (retry at {})", time_of(&s["next_attempt"])),
                    (Some(e), None) => e.to_string(),
                    _ if s["renew_at"].is_u64() => format!("renews from {}", time_of(&s["renew_at"])),
                    _ => String::new(),
                };
                println!(
                    "{:<40} {:<8} {:<10} {:<17} {}",
                    s["host"].as_str().unwrap_or(""),
                    s["status"].as_str().unwrap_or(""),
                    s["source"].as_str().unwrap_or("-"),
                    time_of(&s["not_after"]),
                    detail
                );
            }
        }
        CertsCommand::Add { host, cert, key } => {
            let read = |p: &PathBuf, what: &str| -> Result<String> {
                std::fs::read_to_string(p).with_context(|| format!("reading the {what} {}", p.display()))
            };
            let body = serde_json::json!({ "cert": read(cert, "certificate")?, "key": read(key, "key")? });
            let v = rt.block_on(c.json(c.req(reqwest::Method::PUT, &format!("/certs/{host}")).json(&body)))?;
            if conn.json {
                println!("{v}");
            } else {
                println!(
                    "{}: serving the uploaded certificate (expires {})",
                    v["host"].as_str().unwrap_or(host),
                    time_of(&v["not_after"])
                );
            }
        }
        CertsCommand::Rm { host } => {
            rt.block_on(c.send(c.req(reqwest::Method::DELETE, &format!("/certs/{host}"))))?;
            if conn.json {
                println!("{}", serde_json::json!({ "removed": host }));
            } else {
                println!("{host}: uploaded certificate removed");
            }
        }
    }
    Ok(0)
}

#[derive(Debug, clap::Args)]
pub struct HttpsArgs {
    pub name: String,
    /// Redirect plain HTTP requests to HTTPS (308), except ACME challenges: on or off.
    #[arg(long, value_name = "on|off")]
    pub redirect: Option<String>,
    /// Send Strict-Transport-Security with this max-age on HTTPS responses, like 1y; off: none.
    #[arg(long, value_name = "DUR|off")]
    pub hsts: Option<String>,
    /// The instances speak HTTP/2 without TLS (h2c): on or off (HTTP/1.1, the default).
    #[arg(long, value_name = "on|off")]
    pub h2c: Option<String>,
}

fn on_off(flag: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("{flag} {v:?}: on or off"),
    }
}

pub fn https(conn: &Conn, data_dir: &Path, a: &HttpsArgs) -> Result<i32> {
    service_name(&a.name)?;
    let mut patch = serde_json::Map::new();
    if let Some(r) = &a.redirect {
        patch.insert("redirect".into(), on_off("--redirect", r)?.into());
    }
    if let Some(v) = &a.h2c {
        patch.insert("h2c".into(), on_off("--h2c", v)?.into());
    }
    if let Some(h) = &a.hsts {
        let secs = match h.as_str() {
            "off" | "0" => 0,
            d => hsts_secs(d).with_context(|| format!("--hsts {d:?}"))?,
        };
        patch.insert("hsts_max_age".into(), secs.into());
    }
    let c = Client::new(conn, data_dir)?;
    let rt = crate::cli::runtime();
    let path = format!("/services/{}", a.name);
    let v = if patch.is_empty() {
        rt.block_on(c.json(c.req(reqwest::Method::GET, &path)))?
    } else {
        rt.block_on(c.json(c.req(reqwest::Method::PATCH, &format!("{path}/https")).json(&patch)))?
    };
    if conn.json {
        println!("{}", serde_json::json!({ "https": v["https"], "certificates": v["certificates"] }));
        return Ok(0);
    }
    let h = &v["https"];
    println!("redirect: {}", if h["redirect"].as_bool() == Some(true) { "on" } else { "off" });
    match h["hsts_max_age"].as_u64() {
        Some(n) => println!("hsts:     max-age={n}"),
        None => println!("hsts:     off"),
    }
    println!("upstream: {}", if h["h2c"].as_bool() == Some(true) { "h2c" } else { "http/1.1" });
    for s in v["certificates"].as_array().into_iter().flatten() {
        let extra = s["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default();
        println!(
            "cert:     {} {} expires {}{extra}",
            s["host"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            time_of(&s["not_after"])
        );
    }
    Ok(0)
}

/// `1y`, `180d`, `12h`, `3600s` or a bare number of seconds.
fn hsts_secs(s: &str) -> Result<u64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().context("expected a duration like 1y, 180d or 3600s")?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        "y" => 365 * 86400,
        _ => bail!("unknown unit {unit:?}: use s, m, h, d, w or y"),
    };
    n.checked_mul(mult).filter(|&s| s <= 2 * 365 * 86400).ok_or_else(|| anyhow::anyhow!("at most two years (2y)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_that_would_leave_the_certs_path_are_refused() {
        for bad in ["../services/web", "a/b", "..", ".", "", "a..b", "x?y", "x#y", "x%2fy", "a b"] {
            assert!(super::check_host(bad).is_err(), "{bad}");
        }
        for good in ["shop.example.com", "*.example.com", "SHOP.Example.com.", "bücher.example"] {
            assert!(super::check_host(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn hsts_durations() {
        assert_eq!(super::hsts_secs("1y").unwrap(), 31536000);
        assert_eq!(super::hsts_secs("1d").unwrap(), 86400);
        assert_eq!(super::hsts_secs("600").unwrap(), 600);
        assert!(super::hsts_secs("1x").is_err());
        assert!(super::hsts_secs("y").is_err());
        assert!(super::hsts_secs("600000000000y").is_err());
        assert!(super::hsts_secs("3y").is_err());
    }
}
