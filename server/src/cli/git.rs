//! `berth keys add|ls|rm` (the SSH keys allowed to push), `berth git NAME [--deploy-branch B]`
//! (a service's deploy branch and remotes), and the hidden `berth git-hook pre-receive`: the
//! hook of every repository under `<data-dir>/git/`, run by `git receive-pack` during a push.
//!
//! The hook refuses refs other than the deploy branch, checks the pushed commit out (with its
//! submodules) into a temporary directory, sends it as a tar to the builds API and prints the
//! build's output (git shows it to the pusher as `remote: ...`). It exits 0, letting git
//! update the ref, only if the build and the deploy succeeded.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::Value;

use super::client::{service_name, Client, Conn};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Allow a public key to push (FILE like ~/.ssh/id_ed25519.pub, or - for stdin).
    Add { name: String, file: String },
    /// List the keys and their fingerprints.
    Ls,
    /// Remove a key: it can no longer push.
    Rm { name: String },
}

pub fn keys(conn: &Conn, data_dir: &Path, cmd: &KeysCommand) -> Result<i32> {
    let c = Client::new(conn, data_dir)?;
    let rt = crate::cli::runtime();
    match cmd {
        KeysCommand::Add { name, file } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the key from stdin")?;
                s
            } else {
                std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
            };
            let body = serde_json::json!({ "name": name, "public_key": text });
            let v = rt.block_on(c.json(c.req(reqwest::Method::POST, "/keys").json(&body)))?;
            if conn.json {
                println!("{v}");
            } else {
                println!("key {name} added: {}", v["fingerprint"].as_str().unwrap_or(""));
            }
        }
        KeysCommand::Ls => {
            let v = rt.block_on(c.json(c.req(reqwest::Method::GET, "/keys")))?;
            if conn.json {
                println!("{v}");
                return Ok(0);
            }
            println!("{:<24} {:<52} {:<12} CREATED", "NAME", "FINGERPRINT", "TYPE");
            for k in v["keys"].as_array().into_iter().flatten() {
                let line = k["public_key"].as_str().unwrap_or("");
                println!(
                    "{:<24} {:<52} {:<12} {}",
                    k["name"].as_str().unwrap_or(""),
                    k["fingerprint"].as_str().unwrap_or(""),
                    line.split(' ').next().unwrap_or("").trim_start_matches("ssh-"),
                    k["created_at"].as_str().unwrap_or("")
                );
            }
        }
        KeysCommand::Rm { name } => {
            rt.block_on(c.send(c.req(reqwest::Method::DELETE, &format!("/keys/{name}"))))?;
            if conn.json {
                println!("{}", serde_json::json!({ "removed": name }));
            } else {
                println!("key {name} removed");
            }
        }
    }
    Ok(0)
}

#[derive(Debug, clap::Args)]
pub struct GitArgs {
    pub name: String,
    /// Make pushes to this branch deploy the service (others are refused).
    #[arg(long, value_name = "BRANCH")]
    pub deploy_branch: Option<String>,
}

/// `berth git NAME [--deploy-branch B]`.
pub fn git(conn: &Conn, data_dir: &Path, a: &GitArgs) -> Result<i32> {
    let name = service_name(&a.name)?;
    if let Some(b) = &a.deploy_branch {
        crate::server::git::check_branch(b).map_err(anyhow::Error::msg)?;
    }
    let c = Client::new(conn, data_dir)?;
    let path = format!("/services/{name}/git");
    let rb = match &a.deploy_branch {
        Some(b) => c.req(reqwest::Method::PUT, &path).json(&serde_json::json!({ "deploy_branch": b })),
        None => c.req(reqwest::Method::GET, &path),
    };
    let v = crate::cli::runtime().block_on(c.json(rb))?;
    if conn.json {
        println!("{v}");
        return Ok(0);
    }
    println!("deploy branch  {}", v["deploy_branch"].as_str().unwrap_or(""));
    println!("ssh            {}", v["ssh_url"].as_str().unwrap_or("(the SSH server is off)"));
    println!("http           {}", v["http_url"].as_str().unwrap_or(""));
    Ok(0)
}

/// `berth git-hook HOOK`: only `pre-receive` is a hook Berth installs.
pub fn hook(name: &str) -> Result<i32> {
    match name {
        "pre-receive" => pre_receive(),
        other => bail!("git-hook {other:?}: only pre-receive is handled"),
    }
}

/// The hook's settings, from the environment the server gave `git receive-pack`.
struct HookEnv {
    api: String,
    token: String,
    service: String,
    branch: String,
    work: PathBuf,
}

fn hook_env() -> Result<HookEnv> {
    let var = |k: &str| {
        std::env::var(k).with_context(|| format!("{k} is not set: this hook runs in pushes to a berth server"))
    };
    Ok(HookEnv {
        api: var("BERTH_HOOK_API")?,
        token: var("BERTH_HOOK_TOKEN")?,
        service: var("BERTH_HOOK_SERVICE")?,
        branch: var("BERTH_HOOK_BRANCH")?,
        work: std::env::var_os("BERTH_HOOK_WORK").map(PathBuf::from).unwrap_or_else(std::env::temp_dir),
    })
}

/// One line of the hook's input.
#[derive(Debug, PartialEq, Eq)]
struct Update {
    old: String,
    new: String,
    refname: String,
}

fn parse_updates(input: &str) -> Result<Vec<Update>> {
    let mut out = Vec::new();
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        let mut p = line.split_whitespace();
        match (p.next(), p.next(), p.next(), p.next()) {
            (Some(old), Some(new), Some(r), None) => {
                out.push(Update { old: old.into(), new: new.into(), refname: r.into() })
            }
            _ => bail!("unexpected hook input line {line:?}"),
        }
    }
    Ok(out)
}

fn is_zero(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b == b'0')
}

/// The one update that deploys, or the message that refuses the push.
fn check_updates<'a>(updates: &'a [Update], service: &str, branch: &str) -> Result<Option<&'a Update>, String> {
    let deploy_ref = format!("refs/heads/{branch}");
    let mut deploy = None;
    for u in updates {
        if u.refname != deploy_ref {
            let what = match (u.refname.strip_prefix("refs/heads/"), u.refname.strip_prefix("refs/tags/")) {
                (Some(b), _) => format!("'{b}'"),
                (_, Some(t)) => format!("tag '{t}'"),
                _ => format!("'{}'", u.refname),
            };
            return Err(format!(
                "berth: only pushes to '{branch}' deploy {service}; you pushed {what}\n\
                 berth: push your branch as {branch} (git push berth HEAD:{branch}), or change the deploy branch: berth git {service} --deploy-branch BRANCH"
            ));
        }
        if is_zero(&u.new) {
            return Err(format!("berth: deleting '{branch}' is refused: {service} deploys from it"));
        }
        deploy = Some(u);
    }
    Ok(deploy)
}

fn pre_receive() -> Result<i32> {
    let env = hook_env()?;
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).context("reading the pushed refs")?;
    let updates = parse_updates(&input)?;
    let update = match check_updates(&updates, &env.service, &env.branch) {
        Ok(Some(u)) => u,
        Ok(None) => return Ok(0),
        Err(msg) => {
            eprintln!("{msg}");
            return Ok(1);
        }
    };
    match deploy(&env, update) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("berth: {e:#}");
            eprintln!("berth: the push is refused; {} is unchanged", env.service);
            Ok(1)
        }
    }
}

/// A `git` command without the hook's GIT_* variables (they name the bare repository and its
/// quarantine, which the checkout must not write to).
fn git_cmd() -> Command {
    let mut c = Command::new("git");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GIT_") {
            c.env_remove(&k);
        }
    }
    c.env("GIT_TERMINAL_PROMPT", "0").stdin(Stdio::null());
    c
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Checks out `commit` (objects from the repository and the push's quarantine) with its
/// submodules into `dir`.
pub fn checkout(repo: &Path, quarantine: &[PathBuf], commit: &str, dir: &Path) -> Result<()> {
    run(git_cmd().args(["init", "--quiet"]).arg(dir), "git init")?;
    let mut alternates = format!("{}\n", repo.join("objects").display());
    for q in quarantine {
        alternates.push_str(&format!("{}\n", q.display()));
    }
    std::fs::write(dir.join(".git/objects/info/alternates"), alternates)
        .context("writing the checkout's alternates")?;
    // Relative submodule URLs (../lib.git) resolve against this: other repositories of this
    // server, `<data-dir>/git/lib.git`.
    run(git_cmd().arg("-C").arg(dir).args(["remote", "add", "origin"]).arg(repo), "git remote add")?;
    run(
        git_cmd().arg("-C").arg(dir).args([
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--quiet",
            "--detach",
            commit,
        ]),
        &format!("git checkout {commit}"),
    )?;
    if dir.join(".gitmodules").exists() {
        eprintln!("berth: checking out submodules");
        run(
            git_cmd().arg("-C").arg(dir).args([
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "update",
                "--init",
                "--recursive",
            ]),
            "git submodule update",
        )?;
    }
    Ok(())
}

/// Writes the tree at `dir` as a tar, without any `.git` (the checkout's, and submodules').
pub fn tar_tree(dir: &Path, out: impl std::io::Write) -> Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    fn walk(b: &mut tar::Builder<impl std::io::Write>, root: &Path, rel: &Path) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if e.file_name() == ".git" {
                continue;
            }
            let rel = rel.join(e.file_name());
            let full = root.join(&rel);
            b.append_path_with_name(&full, &rel)
                .with_context(|| format!("adding {} to the build context", rel.display()))?;
            if e.file_type()?.is_dir() {
                walk(b, root, &rel)?;
            }
        }
        Ok(())
    }
    walk(&mut b, dir, Path::new(""))?;
    b.into_inner()?.flush()?;
    Ok(())
}

fn deploy(env: &HookEnv, u: &Update) -> Result<i32> {
    let repo = std::env::current_dir().context("the repository's directory")?;
    let mut quarantine = Vec::new();
    for k in ["GIT_QUARANTINE_PATH", "GIT_OBJECT_DIRECTORY"] {
        if let Some(p) = std::env::var_os(k).map(PathBuf::from) {
            let p = if p.is_absolute() { p } else { repo.join(p) };
            if !quarantine.contains(&p) {
                quarantine.push(p);
            }
        }
    }
    for p in std::env::var("GIT_ALTERNATE_OBJECT_DIRECTORIES").unwrap_or_default().split(':').filter(|p| !p.is_empty())
    {
        quarantine.push(repo.join(p));
    }
    std::fs::create_dir_all(&env.work).with_context(|| format!("creating {}", env.work.display()))?;
    let tmp = tempfile::Builder::new().prefix("push-").tempdir_in(&env.work).context("making a checkout directory")?;
    let tree = tmp.path().join("tree");
    let short = &u.new[..u.new.len().min(12)];
    eprintln!("berth: building {} from {} ({short})", env.service, env.branch);
    checkout(&repo, &quarantine, &u.new, &tree)?;
    let tar_path = tmp.path().join("context.tar");
    let file = std::fs::File::create(&tar_path).context("creating the build context")?;
    tar_tree(&tree, std::io::BufWriter::new(file))?;
    let _ = std::fs::remove_dir_all(&tree);
    crate::cli::runtime().block_on(send(env, u, &tar_path))
}

/// What the builds API's stream said at its end.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok { url: String, revision: Option<i64> },
    Failed(String),
}

/// Handles one NDJSON line of the builds API: a log line is printed; a result is returned.
fn line(text: &str) -> Option<Outcome> {
    let text = text.trim_end_matches('\r');
    if text.trim().is_empty() {
        return None;
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        eprintln!("{text}");
        return None;
    };
    match v["type"].as_str() {
        Some("log") => {
            eprintln!("{}", v["line"].as_str().unwrap_or(""));
            None
        }
        Some("result") if v["ok"] == Value::Bool(true) => {
            Some(Outcome::Ok { url: v["url"].as_str().unwrap_or("").to_string(), revision: v["revision"].as_i64() })
        }
        Some("result") => {
            let build = v["build"].as_i64().map(|b| format!("build {b}: ")).unwrap_or_default();
            Some(Outcome::Failed(format!("{build}{}", v["error"].as_str().unwrap_or("the build failed"))))
        }
        _ => None,
    }
}

async fn send(env: &HookEnv, u: &Update, tar_path: &Path) -> Result<i32> {
    let file = tokio::fs::File::open(tar_path).await.context("opening the build context")?;
    let len = file.metadata().await?.len();
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let url = format!("{}/api/v1/services/{}/builds", env.api.trim_end_matches('/'), env.service);
    let resp = http
        .post(&url)
        .query(&[("source", "git"), ("commit", u.new.as_str()), ("branch", env.branch.as_str())])
        .bearer_auth(&env.token)
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file)))
        .send()
        .await
        .context("sending the build context to the berth server")?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("the build was refused: {} (HTTP {})", msg.trim(), status.as_u16());
    }
    let mut outcome = None;
    let mut buf = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the build's output")?;
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let l: Vec<u8> = buf.drain(..=i).collect();
            if let Some(o) = line(&String::from_utf8_lossy(&l[..l.len() - 1])) {
                outcome = Some(o);
            }
        }
    }
    if let Some(o) = line(&String::from_utf8_lossy(&buf)) {
        outcome = Some(o);
    }
    match outcome {
        Some(Outcome::Ok { url, revision }) => {
            let rev = revision.map(|r| format!(" revision {r}")).unwrap_or_default();
            eprintln!("berth: deployed {}{rev}", env.service);
            eprintln!("berth: {url}");
            Ok(0)
        }
        Some(Outcome::Failed(e)) => {
            eprintln!("berth: {e}");
            eprintln!("berth: the push is refused; the running revision of {} keeps serving", env.service);
            Ok(1)
        }
        None => bail!("the build's output ended without a result"),
    }
}

/// Reads lines from `r` (for tests of the NDJSON handling).
#[allow(dead_code)]
fn outcome_of(r: impl BufRead) -> Option<Outcome> {
    r.lines().map_while(Result::ok).filter_map(|l| line(&l)).last()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(refname: &str, new: &str) -> Update {
        Update { old: "0".repeat(40), new: new.into(), refname: refname.into() }
    }

    #[test]
    fn only_the_deploy_branch_deploys() {
        let sha = "a".repeat(40);
        let ok = [up("refs/heads/main", &sha)];
        assert_eq!(check_updates(&ok, "web", "main").unwrap(), Some(&ok[0]));
        let cases: &[(&[Update], &str)] = &[
            (&[up("refs/heads/feature", &sha)], "only pushes to 'main' deploy web; you pushed 'feature'"),
            (&[up("refs/heads/main", &sha), up("refs/heads/x", &sha)], "you pushed 'x'"),
            (&[up("refs/tags/v1", &sha)], "you pushed tag 'v1'"),
            (&[up("refs/heads/main", &"0".repeat(40))], "deleting 'main' is refused"),
        ];
        for (updates, want) in cases {
            let err = check_updates(updates, "web", "main").unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        assert_eq!(check_updates(&[], "web", "main").unwrap(), None);
    }

    #[test]
    fn hook_input() {
        let u = parse_updates("0000 1111 refs/heads/main\n\n").unwrap();
        assert_eq!(u, vec![Update { old: "0000".into(), new: "1111".into(), refname: "refs/heads/main".into() }]);
        assert!(parse_updates("a b\n").is_err());
    }

    #[test]
    fn build_stream_results() {
        let ok = "{\"type\":\"log\",\"line\":\"step 1\"}\n{\"type\":\"result\",\"ok\":true,\"build\":7,\"deploy\":12,\"revision\":3,\"url\":\"http://web.example/\"}\n";
        assert_eq!(
            outcome_of(ok.as_bytes()),
            Some(Outcome::Ok { url: "http://web.example/".into(), revision: Some(3) })
        );
        let bad = "{\"type\":\"result\",\"ok\":false,\"build\":7,\"error\":\"Dockerfile:3: unknown instruction\"}";
        assert_eq!(
            outcome_of(bad.as_bytes()),
            Some(Outcome::Failed("build 7: Dockerfile:3: unknown instruction".into()))
        );
        assert_eq!(outcome_of("{\"type\":\"log\",\"line\":\"x\"}\n".as_bytes()), None);
    }
}
