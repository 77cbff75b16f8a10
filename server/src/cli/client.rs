//! The commands that talk to a running `berth server` over its API: `deploy`, `services`,
//! `logs`, `scale`, `rm`.
//!
//! Where the server is and which token to send: `--api`/`BERTH_API` and `--token`/`BERTH_TOKEN`,
//! else `~/.config/berth/client.toml` (`api = "..."`, `token = "..."`), else
//! `http://127.0.0.1:7070` and the admin token in the data directory (readable by root on the
//! server's own machine).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Conn {
    /// The Berth API's URL (default http://127.0.0.1:7070).
    #[arg(long, env = "BERTH_API", global = true, value_name = "URL")]
    pub api: Option<String>,
    /// The API token (default: the admin token in the data directory).
    #[arg(long, env = "BERTH_TOKEN", global = true, hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Print JSON, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The service (created if it does not exist); it answers at <name>.<domain>.
    pub name: String,
    /// The image reference to deploy.
    #[arg(long, value_name = "REF", required_unless_present = "source", conflicts_with = "source")]
    pub image: Option<String>,
    /// Build this directory (its Dockerfile, its berth.toml) on the server and deploy the image.
    #[arg(long, value_name = "DIR")]
    pub source: Option<std::path::PathBuf>,
    /// With --source: a build argument (repeatable), over berth.toml's.
    #[arg(long = "build-arg", value_name = "KEY=VALUE", requires = "source")]
    pub build_args: Vec<String>,
    /// With --source: the stage to build.
    #[arg(long, requires = "source")]
    pub target: Option<String>,
    /// With --source: the Dockerfile, relative to DIR.
    #[arg(short = 'f', long = "file", value_name = "PATH", requires = "source")]
    pub file: Option<String>,
    /// With --source: build every step again.
    #[arg(long, requires = "source")]
    pub no_cache: bool,
    /// Set an environment variable (repeatable); `--env NAME` passes this shell's value.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// The port the app listens on (default: its PORT env, the image's exposed port, or 8080).
    #[arg(long)]
    pub port: Option<u16>,
    /// An HTTP path that must answer 2xx before an instance takes traffic.
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
    /// Mount a named volume (repeatable): `--volume data:/var/lib/app`; replaces the service's list.
    #[arg(long = "volume", value_name = "NAME:PATH")]
    pub volumes: Vec<String>,
    /// Run this (with /bin/sh -c) once in each new revision before it takes traffic, like
    /// database migrations; a failure aborts the deploy. "" removes it.
    #[arg(long, value_name = "CMD")]
    pub release_command: Option<String>,
    /// Each instance's memory limit, like 256m or 1g ("" removes it).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Each instance's CPUs, like 0.5 (0 removes the limit).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Wait until the new revision serves (or the deploy fails), showing progress.
    #[arg(long)]
    pub wait: bool,
    /// How long the new revision gets to become ready, like 30s (default 2m).
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    pub name: String,
    /// Keep printing new lines as they are written.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    pub name: String,
    /// Instances kept running when idle (0: scale to zero).
    #[arg(long)]
    pub min: Option<u32>,
    /// Instances at most.
    #[arg(long)]
    pub max: Option<u32>,
    /// Requests one instance serves at once.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Idle time before an instance is frozen, like 30s.
    #[arg(long, value_name = "DUR")]
    pub freeze_after: Option<String>,
    /// Idle time before an instance is stopped, like 5m.
    #[arg(long, value_name = "DUR")]
    pub stop_after: Option<String>,
    /// A request's time limit, time held included, like 60s.
    #[arg(long, value_name = "DUR")]
    pub request_timeout: Option<String>,
    /// Requests held while no instance can take them.
    #[arg(long, value_name = "N")]
    pub queue: Option<u32>,
    /// The concurrency per instance the autoscaler aims at (0: 70% of --concurrency).
    #[arg(long, value_name = "N")]
    pub target: Option<u32>,
    /// The autoscaler's stable window, like 60s (its panic window is a tenth of it).
    #[arg(long, value_name = "DUR")]
    pub stable_window: Option<String>,
}

pub(super) struct Client {
    http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: String,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ClientFile {
    api: Option<String>,
    token: Option<String>,
}

/// A service name as the CLI takes it: checked here, so a typo like `a/b` is not sent as a
/// path.
pub(super) fn service_name(name: &str) -> Result<&str> {
    crate::server::api::check_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(name)
}

impl Client {
    pub(super) fn new(conn: &Conn, data_dir: &Path) -> Result<Client> {
        let file = client_file()?;
        // The running server on this data directory writes its API URL there.
        let local =
            std::fs::read_to_string(data_dir.join(crate::server::API_URL_FILE)).ok().map(|s| s.trim().to_string());
        let base = conn
            .api
            .clone()
            .or(file.api)
            .or(local)
            .unwrap_or_else(|| "http://127.0.0.1:7070".into())
            .trim_end_matches('/')
            .to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("--api {base:?}: expected a URL like http://127.0.0.1:7070");
        }
        let token = match conn.token.clone().or(file.token) {
            Some(t) => t,
            None => std::fs::read_to_string(data_dir.join(crate::server::token::FILE))
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "no API token: set BERTH_TOKEN (or --token); {} is not readable: {e}",
                        data_dir.join(crate::server::token::FILE).display()
                    )
                })?,
        };
        let http = reqwest::Client::builder().build().context("building the HTTP client")?;
        Ok(Client { http, base, token })
    }

    pub(super) fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}/api/v1{path}", self.base)).bearer_auth(&self.token)
    }

    /// Sends, and turns a non-2xx answer into the API's error message.
    pub(super) async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.with_context(|| format!("connecting to the Berth API at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{msg} (HTTP {})", status.as_u16())
    }

    pub(super) async fn json(&self, rb: reqwest::RequestBuilder) -> Result<Value> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await.context("reading the API's answer")?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).context("the API's answer is not JSON")
    }
}

fn client_file() -> Result<ClientFile> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")));
    let Some(path) = dir.map(|d| d.join("berth/client.toml")) else { return Ok(ClientFile::default()) };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message())),
        Err(_) => Ok(ClientFile::default()),
    }
}

pub(super) fn env_map(pairs: &[String]) -> Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for kv in pairs {
        match kv.split_once('=') {
            Some((k, v)) => m.insert(k.to_string(), Value::String(v.to_string())),
            None => match std::env::var(kv) {
                Ok(v) => m.insert(kv.clone(), Value::String(v)),
                Err(_) => bail!("{kv}: expected K=V, or the name of a variable set in this shell (it is not set)"),
            },
        };
    }
    Ok(m)
}

pub fn deploy(conn: &Conn, data_dir: &Path, a: &DeployArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let mut body = serde_json::json!({ "env": env_map(&a.env)? });
    if let Some(i) = &a.image {
        body["image"] = i.clone().into();
    }
    if let Some(p) = a.port {
        body["port"] = p.into();
    }
    if let Some(h) = &a.health_path {
        body["health_path"] = h.clone().into();
    }
    if let Some(t) = &a.timeout {
        body["timeout"] = t.clone().into();
    }
    if !a.volumes.is_empty() {
        let mut list = Vec::new();
        for v in &a.volumes {
            let Some((name, path)) = v.split_once(':') else {
                bail!("--volume {v:?}: expected NAME:PATH, like data:/var/lib/app");
            };
            list.push(serde_json::json!({ "volume": name, "path": path }));
        }
        body["volumes"] = list.into();
    }
    if let Some(c) = &a.release_command {
        body["release_command"] = c.clone().into();
    }
    if let Some(m) = &a.memory {
        body["memory"] = m.clone().into();
    }
    if let Some(c) = a.cpus {
        body["cpus"] = c.into();
    }
    if let Some(dir) = &a.source {
        return deploy_source(&c, conn, a, dir, body);
    }
    let path = format!("/services/{}/deploys", a.name);
    crate::cli::runtime().block_on(async {
        if !a.wait {
            let d = c.json(c.req(reqwest::Method::POST, &path).json(&body)).await?;
            if conn.json {
                println!("{d}");
            } else {
                println!("deploy {} of {} started ({})", d["id"], a.name, a.image.as_deref().unwrap_or_default());
            }
            return Ok(0);
        }
        follow_deploy(&c, conn, &a.name, &path, &body).await
    })
}

/// `berth deploy NAME --source DIR`: sends DIR (without .git) as a gzipped tar to the builds
/// API; with --wait streams the build and deploy and exits 0 only if both succeeded.
fn deploy_source(c: &Client, conn: &Conn, a: &DeployArgs, dir: &Path, mut settings: Value) -> Result<i32> {
    if !dir.is_dir() {
        bail!("--source {}: not a directory", dir.display());
    }
    if settings["env"].as_object().is_some_and(|m| m.is_empty()) {
        settings.as_object_mut().map(|o| o.remove("env"));
    }
    settings.as_object_mut().map(|o| o.remove("timeout"));
    let tmp = tempfile::NamedTempFile::new().context("creating a temporary file for the build context")?;
    {
        let gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(tmp.as_file()), flate2::Compression::fast());
        crate::cli::git::tar_tree(dir, gz)?;
    }
    let bytes = std::fs::read(tmp.path()).context("reading the build context")?;
    let mut query: Vec<(&str, String)> = vec![("source", "upload".into())];
    if settings.as_object().is_some_and(|o| !o.is_empty()) {
        query.push(("settings", settings.to_string()));
    }
    if !a.build_args.is_empty() {
        let args = super::build::parse_build_args(&a.build_args)?;
        query.push(("build_args", args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("\n")));
    }
    if let Some(t) = &a.target {
        query.push(("target", t.clone()));
    }
    if let Some(f) = &a.file {
        query.push(("dockerfile", f.clone()));
    }
    if a.no_cache {
        query.push(("no_cache", "true".into()));
    }
    if let Some(t) = &a.timeout {
        query.push(("timeout", t.clone()));
    }
    let path = format!("/services/{}/builds", a.name);
    crate::cli::runtime().block_on(async {
        let resp = c
            .send(
                c.req(reqwest::Method::POST, &path)
                    .query(&query)
                    .header("content-type", "application/x-tar")
                    .header("content-encoding", "identity")
                    .body(bytes),
            )
            .await?;
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.context("reading the build's output")?);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let ev: Value = serde_json::from_slice(&line).context("a build event is not JSON")?;
                match ev["type"].as_str() {
                    Some("log") => {
                        let l = ev["line"].as_str().unwrap_or_default();
                        if !a.wait {
                            if let Some(rest) = l.strip_prefix(&format!("building {} (build ", a.name)) {
                                println!("build {} of {} started", rest.trim_end_matches(')'), a.name);
                                return Ok(0);
                            }
                        }
                        if !conn.json {
                            eprintln!("{l}");
                        }
                    }
                    Some("result") => {
                        if conn.json {
                            println!("{ev}");
                        } else if ev["ok"] == true {
                            println!(
                                "{} revision {} is serving at {}",
                                a.name,
                                ev["revision"],
                                ev["url"].as_str().unwrap_or_default()
                            );
                        } else {
                            eprintln!("berth: {}", ev["error"].as_str().unwrap_or("the build failed"));
                        }
                        return Ok(if ev["ok"] == true { 0 } else { 1 });
                    }
                    _ => {}
                }
            }
        }
        bail!("the server ended the build's stream without a result")
    })
}

#[derive(Debug, clap::Args)]
pub struct BuildsArgs {
    pub name: String,
    /// One build: its record, or with --log its output.
    pub id: Option<i64>,
    /// Print the build's output.
    #[arg(long, requires = "id")]
    pub log: bool,
}

/// `berth builds NAME [ID [--log]]`.
pub fn builds(conn: &Conn, data_dir: &Path, a: &BuildsArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    crate::cli::runtime().block_on(async {
        match (a.id, a.log) {
            (Some(id), true) => {
                let resp =
                    c.send(c.req(reqwest::Method::GET, &format!("/services/{}/builds/{id}/log", a.name))).await?;
                let text = resp.text().await.context("reading the build log")?;
                print!("{text}");
            }
            (Some(id), false) => {
                let b = c.json(c.req(reqwest::Method::GET, &format!("/services/{}/builds/{id}", a.name))).await?;
                if conn.json {
                    println!("{b}");
                } else {
                    for k in [
                        "id",
                        "status",
                        "source",
                        "commit",
                        "branch",
                        "image",
                        "deploy",
                        "error",
                        "by",
                        "created_at",
                        "finished_at",
                    ] {
                        let v = &b[k];
                        if !v.is_null() {
                            println!("{k:<12} {}", v.as_str().map(String::from).unwrap_or_else(|| v.to_string()));
                        }
                    }
                }
            }
            (None, _) => {
                let list = c.json(c.req(reqwest::Method::GET, &format!("/services/{}/builds", a.name))).await?;
                if conn.json {
                    println!("{list}");
                    return Ok(0);
                }
                println!("{:<6} {:<10} {:<7} {:<12} {:<8} CREATED", "ID", "STATUS", "SOURCE", "COMMIT", "DEPLOY");
                for b in list.as_array().into_iter().flatten() {
                    let commit =
                        b["commit"].as_str().map(|c| c.chars().take(12).collect::<String>()).unwrap_or("-".into());
                    let deploy = b["deploy"].as_i64().map(|d| d.to_string()).unwrap_or("-".into());
                    println!(
                        "{:<6} {:<10} {:<7} {:<12} {:<8} {}",
                        b["id"],
                        b["status"].as_str().unwrap_or(""),
                        b["source"].as_str().unwrap_or(""),
                        commit,
                        deploy,
                        b["created_at"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Ok(0)
    })
}

/// POSTs a deploy (or rollback) asking for its NDJSON progress; prints the progress to stderr
/// and the outcome; returns 0 if it succeeded, 1 if it failed.
pub(super) async fn follow_deploy(c: &Client, conn: &Conn, name: &str, path: &str, body: &Value) -> Result<i32> {
    let resp = c.send(c.req(reqwest::Method::POST, path).header("accept", "application/x-ndjson").json(body)).await?;
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut done: Option<Value> = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("reading the deploy's progress")?);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: Value = serde_json::from_slice(&line).context("a deploy event is not JSON")?;
            match ev["event"].as_str() {
                Some("progress") if !conn.json => eprintln!("{}", ev["message"].as_str().unwrap_or_default()),
                Some("done") => done = Some(ev["deploy"].clone()),
                _ => {}
            }
        }
    }
    let Some(d) = done else { bail!("the server ended the deploy's stream without a result") };
    if conn.json {
        println!("{d}");
    }
    if d["status"] == "succeeded" {
        if !conn.json {
            println!("{name}: revision {} is serving", d["revision"]);
        }
        Ok(0)
    } else {
        eprintln!("berth: deploy {} of {name} failed: {}", d["id"], d["error"].as_str().unwrap_or("unknown error"));
        Ok(1)
    }
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    pub name: String,
    /// The revision to put back in service (default: the newest older one that ever served).
    pub revision: Option<i64>,
    /// How long its instance gets to become ready, like 30s (default 2m).
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
}

/// `berth rollback NAME [REVISION]`: waits until the revision serves (or says why not).
pub fn rollback(conn: &Conn, data_dir: &Path, a: &RollbackArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let mut body = serde_json::json!({});
    if let Some(n) = a.revision {
        body["revision"] = n.into();
    }
    if let Some(t) = &a.timeout {
        body["timeout"] = t.clone().into();
    }
    let path = format!("/services/{}/rollback", a.name);
    crate::cli::runtime().block_on(follow_deploy(&c, conn, &a.name, &path, &body))
}

/// `berth revisions NAME`: newest first; `*` marks the one serving.
pub fn revisions(conn: &Conn, data_dir: &Path, name: &str) -> Result<i32> {
    service_name(name)?;
    let c = Client::new(conn, data_dir)?;
    let v =
        crate::cli::runtime().block_on(c.json(c.req(reqwest::Method::GET, &format!("/services/{name}/revisions"))))?;
    if conn.json {
        println!("{v}");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "  {:>8} {:>7} {:<21} {:<6} {:<20} {:>5}  {:<16} IMAGE",
        "REVISION", "TRAFFIC", "CREATED", "SERVED", "IMAGE ID", "PORT", "TAGS"
    )?;
    for r in v["revisions"].as_array().into_iter().flatten() {
        let id = r["image_id"].as_str().unwrap_or("");
        let tags: Vec<&str> = r["tags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let tags = if tags.is_empty() { "-".to_string() } else { tags.join(",") };
        writeln!(
            out,
            "{} {:>8} {:>6}% {:<21} {:<6} {:<20} {:>5}  {:<16} {}",
            if r["serving"] == true { "*" } else { " " },
            r["number"].as_i64().unwrap_or(0),
            r["percent"].as_i64().unwrap_or(0),
            r["created_at"].as_str().unwrap_or(""),
            if r["served_at"].is_null() { "never" } else { "yes" },
            id.get(..19).unwrap_or(id),
            r["port"].as_i64().unwrap_or(0),
            tags,
            r["image"].as_str().unwrap_or("")
        )?;
    }
    Ok(0)
}

pub fn services(conn: &Conn, data_dir: &Path) -> Result<i32> {
    let c = Client::new(conn, data_dir)?;
    let v = crate::cli::runtime().block_on(c.json(c.req(reqwest::Method::GET, "/services")))?;
    if conn.json {
        println!("{v}");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<24} {:<13} {:>8} {:>9}  {:<40} IMAGE", "NAME", "STATUS", "REVISION", "INSTANCES", "URL")?;
    for s in v["services"].as_array().into_iter().flatten() {
        let rev = s["revision"].as_i64().map_or("-".to_string(), |n| n.to_string());
        let n = s["instances"].as_array().map_or(0, |a| a.len());
        writeln!(
            out,
            "{:<24} {:<13} {:>8} {:>9}  {:<40} {}",
            s["name"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            rev,
            n,
            s["url"].as_str().unwrap_or(""),
            s["image"].as_str().unwrap_or("-")
        )?;
    }
    Ok(0)
}

pub fn logs(conn: &Conn, data_dir: &Path, a: &LogsArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let mut q = vec![("follow", a.follow.to_string())];
    if let Some(n) = a.tail {
        q.push(("tail", n.to_string()));
    }
    crate::cli::runtime().block_on(async {
        let resp = c.send(c.req(reqwest::Method::GET, &format!("/services/{}/logs", a.name)).query(&q)).await?;
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut out = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.context("reading the logs")?);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let written = if conn.json {
                    out.write_all(&line).and_then(|_| out.flush())
                } else {
                    let v: Value = serde_json::from_slice(&line).context("a log line is not JSON")?;
                    writeln!(
                        out,
                        "{} {} {}",
                        v["time"].as_str().unwrap_or(""),
                        v["instance"].as_str().unwrap_or(""),
                        v["line"].as_str().unwrap_or("")
                    )
                    .and_then(|_| out.flush())
                };
                match written {
                    // The reader went away (`berth logs NAME | head`): that is the end, not an error.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
                    other => other?,
                }
            }
        }
        Ok(0)
    })
}

pub fn scale(conn: &Conn, data_dir: &Path, a: &ScaleArgs) -> Result<i32> {
    service_name(&a.name)?;
    let c = Client::new(conn, data_dir)?;
    let mut body = serde_json::Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            body.insert(k.to_string(), v);
        }
    };
    put("min", a.min.map(Value::from));
    put("max", a.max.map(Value::from));
    put("concurrency", a.concurrency.map(Value::from));
    put("freeze_after", a.freeze_after.clone().map(Value::from));
    put("stop_after", a.stop_after.clone().map(Value::from));
    put("request_timeout", a.request_timeout.clone().map(Value::from));
    put("queue", a.queue.map(Value::from));
    put("target", a.target.map(Value::from));
    put("stable_window", a.stable_window.clone().map(Value::from));
    let v = crate::cli::runtime().block_on(
        c.json(c.req(reqwest::Method::PATCH, &format!("/services/{}/scaling", a.name)).json(&Value::Object(body))),
    )?;
    if conn.json {
        println!("{v}");
    } else {
        let s = &v["scaling"];
        println!(
            "{}: min {} max {} concurrency {} target {} stable-window {} freeze-after {} stop-after {} request-timeout {} queue {}",
            a.name,
            s["min"],
            s["max"],
            s["concurrency"],
            s["target"],
            s["stable_window"].as_str().unwrap_or(""),
            s["freeze_after"].as_str().unwrap_or(""),
            s["stop_after"].as_str().unwrap_or(""),
            s["request_timeout"].as_str().unwrap_or(""),
            s["queue"]
        );
    }
    Ok(0)
}

pub fn rm(conn: &Conn, data_dir: &Path, name: &str) -> Result<i32> {
    service_name(name)?;
    let c = Client::new(conn, data_dir)?;
    crate::cli::runtime().block_on(c.send(c.req(reqwest::Method::DELETE, &format!("/services/{name}"))))?;
    if !conn.json {
        println!("removed {name}");
    }
    Ok(0)
}
