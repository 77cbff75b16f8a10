//! Client commands that operate a service: its traffic (`berth traffic NAME REV=PERCENT...`,
//! `berth tag NAME REV TAG`, `berth untag NAME TAG`) and variables (`berth env NAME
//! set|unset|ls`).

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use super::client::{env_map, follow_deploy, service_name, Client, Conn};

#[derive(Debug, clap::Args)]
pub struct TrafficArgs {
    pub name: String,
    /// Shares like `1=90 2=10` (revision=percent, adding up to 100); none: show the split.
    #[arg(value_name = "REV=PERCENT")]
    pub split: Vec<String>,
}

/// Parses `REV=PERCENT` arguments into the API's `traffic` array.
pub fn parse_split(args: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for a in args {
        let Some((rev, pct)) = a.split_once('=') else {
            bail!("{a:?}: expected REV=PERCENT, like 2=10");
        };
        let rev: i64 = rev.trim().parse().map_err(|_| anyhow::anyhow!("{a:?}: {rev:?} is not a revision number"))?;
        let pct = pct.trim().trim_end_matches('%');
        let pct: u32 = pct.parse().map_err(|_| anyhow::anyhow!("{a:?}: {pct:?} is not a percentage from 0 to 100"))?;
        out.push(serde_json::json!({ "revision": rev, "percent": pct }));
    }
    Ok(out)
}

fn print(conn: &Conn, v: &Value) {
    if conn.json {
        println!("{v}");
        return;
    }
    for t in v["traffic"].as_array().into_iter().flatten() {
        println!("revision {:<6} {:>3}%", t["revision"], t["percent"]);
    }
    for (tag, t) in v["tags"].as_object().into_iter().flatten() {
        println!("tag {tag:<16} revision {:<6} {}", t["revision"], t["url"].as_str().unwrap_or(""));
    }
}

pub fn traffic(conn: &Conn, data_dir: &Path, a: &TrafficArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let path = format!("/services/{}/traffic", a.name);
    let v = if a.split.is_empty() {
        let v = crate::cli::runtime().block_on(c.json(c.req(reqwest::Method::GET, &path)))?;
        if !conn.json && v["traffic"].as_array().is_some_and(|t| t.is_empty()) {
            println!("{}: not deployed yet (no revision takes traffic)", a.name);
            return Ok(0);
        }
        v
    } else {
        let body = serde_json::json!({ "traffic": parse_split(&a.split)? });
        crate::cli::runtime().block_on(c.json(c.req(reqwest::Method::PUT, &path).json(&body)))?
    };
    print(conn, &v);
    Ok(0)
}

#[derive(Debug, clap::Args)]
pub struct TagArgs {
    pub name: String,
    /// The revision the tag names.
    pub revision: i64,
    /// The tag: the revision answers at <tag>--<name>.<domain>.
    pub tag: String,
}

pub fn tag(conn: &Conn, data_dir: &Path, a: &TagArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let path = format!("/services/{}/tags/{}", a.name, a.tag);
    let body = serde_json::json!({ "revision": a.revision });
    let v = crate::cli::runtime().block_on(c.json(c.req(reqwest::Method::PUT, &path).json(&body)))?;
    if conn.json {
        println!("{v}");
    } else {
        let url = v["tags"][&a.tag]["url"].as_str().unwrap_or("");
        println!("{} revision {} is tagged {}: {url}", a.name, a.revision, a.tag);
    }
    Ok(0)
}

pub fn untag(conn: &Conn, data_dir: &Path, name: &str, tag: &str) -> Result<i32> {
    service_name(name)?;
    let c = Client::new(conn, data_dir)?;
    let path = format!("/services/{name}/tags/{tag}");
    crate::cli::runtime().block_on(c.send(c.req(reqwest::Method::DELETE, &path)))?;
    if conn.json {
        println!("{}", serde_json::json!({ "service": name, "removed_tag": tag }));
    } else {
        println!("{name}: tag {tag} removed");
    }
    Ok(0)
}

#[derive(Debug, clap::Subcommand)]
pub enum EnvCommand {
    /// List the variables, and the names of the secrets (never their values).
    Ls,
    /// Set variables (`K=V`, or `K` for this shell's value) and roll out a new revision.
    Set {
        /// Store them as secrets: sealed at rest, never shown back.
        #[arg(long)]
        secret: bool,
        #[arg(value_name = "K=V", required = true)]
        vars: Vec<String>,
    },
    /// Remove variables or secrets and roll out a new revision.
    Unset {
        #[arg(value_name = "K", required = true)]
        names: Vec<String>,
    },
}

pub fn env(conn: &Conn, data_dir: &Path, name: &str, cmd: &EnvCommand) -> Result<i32> {
    service_name(name)?;
    let c = Client::new(conn, data_dir)?;
    let path = format!("/services/{name}/env");
    let body = match cmd {
        EnvCommand::Ls => {
            let v = crate::cli::runtime().block_on(c.json(c.req(reqwest::Method::GET, &path)))?;
            if conn.json {
                println!("{v}");
                return Ok(0);
            }
            for (k, v) in v["env"].as_object().into_iter().flatten() {
                println!("{k}={}", v.as_str().unwrap_or(""));
            }
            for k in v["secrets"].as_array().into_iter().flatten() {
                println!("{}=<secret>", k.as_str().unwrap_or(""));
            }
            return Ok(0);
        }
        EnvCommand::Set { secret, vars } => {
            let vars = env_map(vars)?;
            if *secret {
                serde_json::json!({ "secrets": vars })
            } else {
                serde_json::json!({ "env": vars })
            }
        }
        EnvCommand::Unset { names } => {
            for n in names {
                if n.is_empty() || n.contains('=') {
                    bail!("{n:?}: give the variable's name only");
                }
            }
            serde_json::json!({ "unset_env": names, "unset_secrets": names })
        }
    };
    crate::cli::runtime().block_on(async {
        let svc = c.json(c.req(reqwest::Method::GET, &format!("/services/{name}"))).await?;
        if svc["revision"].is_null() {
            let v = c.json(c.req(reqwest::Method::POST, &path).json(&body)).await?;
            if conn.json {
                println!("{v}");
            } else {
                println!("{name}: stored; the first deploy uses it");
            }
            return Ok(0);
        }
        follow_deploy(&c, conn, name, &path, &body).await
    })
}

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Make a token (shown once): admin, or with --deploy SERVICE one that may only deploy it.
    Create {
        name: String,
        /// Scope the token to deploying this one service (for CI).
        #[arg(long, value_name = "SERVICE")]
        deploy: Option<String>,
    },
    /// List the tokens (names and scopes; never the tokens).
    Ls,
    /// Revoke a token: it stops working at once.
    Revoke { name: String },
}

pub fn tokens(conn: &Conn, data_dir: &Path, cmd: &TokensCommand) -> Result<i32> {
    let c = Client::new(conn, data_dir)?;
    let rt = crate::cli::runtime();
    match cmd {
        TokensCommand::Create { name, deploy } => {
            let body = match deploy {
                Some(svc) => serde_json::json!({ "name": name, "scope": "deploy", "service": service_name(svc)? }),
                None => serde_json::json!({ "name": name, "scope": "admin" }),
            };
            let v = rt.block_on(c.json(c.req(reqwest::Method::POST, "/tokens").json(&body)))?;
            if conn.json {
                println!("{v}");
            } else {
                // The token alone on stdout (for `$(berth tokens create ...)`); the rest to stderr.
                println!("{}", v["token"].as_str().unwrap_or(""));
                match deploy {
                    Some(svc) => eprintln!("token {name} may deploy {svc}; it is not shown again"),
                    None => eprintln!("admin token {name}; it is not shown again"),
                }
            }
        }
        TokensCommand::Ls => {
            let v = rt.block_on(c.json(c.req(reqwest::Method::GET, "/tokens")))?;
            if conn.json {
                println!("{v}");
                return Ok(0);
            }
            println!("{:<24} {:<7} {:<24} CREATED", "NAME", "SCOPE", "SERVICE");
            for t in v["tokens"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<7} {:<24} {}",
                    t["name"].as_str().unwrap_or(""),
                    t["scope"].as_str().unwrap_or(""),
                    t["service"].as_str().unwrap_or("-"),
                    t["created_at"].as_str().unwrap_or("")
                );
            }
        }
        TokensCommand::Revoke { name } => {
            rt.block_on(c.send(c.req(reqwest::Method::DELETE, &format!("/tokens/{name}"))))?;
            if conn.json {
                println!("{}", serde_json::json!({ "revoked": name }));
            } else {
                println!("token {name} revoked");
            }
        }
    }
    Ok(0)
}

#[derive(Debug, clap::Subcommand)]
pub enum DomainsCommand {
    /// Make the service answer at HOST too (point HOST's DNS at this machine).
    Add { host: String },
    /// Stop answering at HOST.
    Rm { host: String },
    /// List the service's extra host names.
    Ls,
}

pub fn domains(conn: &Conn, data_dir: &Path, name: &str, cmd: &DomainsCommand) -> Result<i32> {
    service_name(name)?;
    let c = Client::new(conn, data_dir)?;
    let rt = crate::cli::runtime();
    let check = |h: &str| -> Result<()> {
        if h.is_empty() || h.contains('/') || h.contains(char::is_whitespace) {
            bail!("{h:?} is not a host name");
        }
        Ok(())
    };
    let v = match cmd {
        DomainsCommand::Add { host } => {
            check(host)?;
            rt.block_on(c.json(c.req(reqwest::Method::PUT, &format!("/services/{name}/domains/{host}"))))?
        }
        DomainsCommand::Rm { host } => {
            check(host)?;
            rt.block_on(c.send(c.req(reqwest::Method::DELETE, &format!("/services/{name}/domains/{host}"))))?;
            if conn.json {
                println!("{}", serde_json::json!({ "service": name, "removed_domain": host }));
            } else {
                println!("{name} no longer answers at {host}");
            }
            return Ok(0);
        }
        DomainsCommand::Ls => rt.block_on(c.json(c.req(reqwest::Method::GET, &format!("/services/{name}/domains"))))?,
    };
    if conn.json {
        println!("{v}");
    } else {
        for d in v["domains"].as_array().into_iter().flatten() {
            println!("{}", d.as_str().unwrap_or(""));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        let v = parse_split(&["1=90".into(), "2=10%".into()]).unwrap();
        assert_eq!(v[1], serde_json::json!({"revision": 2, "percent": 10}));
        for (bad, want) in [("1", "expected REV=PERCENT"), ("x=5", "not a revision"), ("1=-5", "not a percentage")] {
            let err = parse_split(&[bad.into()]).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
