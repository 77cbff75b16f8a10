//! Deploy from source by `git push`: bare repositories under `<data-dir>/git/`, served over
//! Berth's own SSH server (`ssh`) and git's smart HTTP protocol (`http`), by the system `git`
//! (`git receive-pack`, `git upload-pack`). A push runs the repository's `pre-receive` hook,
//! which is `berth git-hook pre-receive` (server/src/cli/git.rs): it checks out the pushed
//! commit, sends it to the builds API and lets the ref update only if the deploy succeeded.
//!
//! The hook reaches the API with a push token minted here for the one push: it may only
//! `POST /api/v1/services/<service>/builds`, lives in memory only and is dropped when the push
//! ends. It travels in the environment of `git receive-pack` (never in argv, never logged).
//!
//! Architecture Invariant: the server never parses git's pack protocol; it only moves bytes
//! between a client and a `git` process and decides who may start one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::api::{Caller, Error, Scope};

pub mod http;
pub mod keys;
pub mod repo;
pub mod ssh;

/// What the server hands to every `git receive-pack` it starts, set once at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `berth` binary the hooks exec (`std::env::current_exe()` at start).
    pub exe: PathBuf,
    /// Where the hook reaches this server's API, like `http://127.0.0.1:7070`.
    pub api_url: String,
    pub data_dir: PathBuf,
    /// How users reach the SSH server (`ssh://git@HOST:PORT/`), for messages; None: off.
    pub ssh_port: Option<u16>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Records the server's git settings (the first call wins: one server per process).
pub fn configure(config: Config) {
    let _ = CONFIG.set(config);
}

/// The settings, once the server has made them; git routes answer 503 before that.
pub fn config() -> Option<&'static Config> {
    CONFIG.get()
}

/// The API URL a hook on this machine uses to reach a listener bound to `addr`.
pub fn loopback_url(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
}

/// One push in progress: who pushes to which service.
#[derive(Debug, Clone)]
struct Push {
    service: String,
    /// For the build's record: `key:<name>` (SSH) or the API token's name (HTTP).
    by: String,
}

/// The push tokens alive now, by their SHA-256.
fn pushes() -> &'static Mutex<HashMap<String, Push>> {
    static PUSHES: OnceLock<Mutex<HashMap<String, Push>>> = OnceLock::new();
    PUSHES.get_or_init(Default::default)
}

/// A push token; it stops working when this is dropped.
pub struct PushToken {
    hash: String,
    token: String,
}

impl PushToken {
    /// Mints a token that may only start builds of `service`, recorded as made by `by`.
    pub fn mint(service: &str, by: &str) -> anyhow::Result<PushToken> {
        let token = super::token::generate()?.replacen("berth_", "berth_push_", 1);
        let hash = super::token::hash(&token);
        let push = Push { service: service.to_string(), by: by.to_string() };
        pushes().lock().unwrap_or_else(|e| e.into_inner()).insert(hash.clone(), push);
        Ok(PushToken { hash, token })
    }

    pub fn secret(&self) -> &str {
        &self.token
    }
}

impl Drop for PushToken {
    fn drop(&mut self) {
        pushes().lock().unwrap_or_else(|e| e.into_inner()).remove(&self.hash);
    }
}

impl std::fmt::Debug for PushToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushToken(***)")
    }
}

/// For the API's authentication: None if `token` is not a push token; else the caller, if the
/// call is the one a push token may make (`POST /api/v1/services/<its service>/builds`).
pub fn push_caller(token: &str, method: &axum::http::Method, path: &str) -> Option<Result<Caller, Error>> {
    if !token.starts_with("berth_push_") {
        return None;
    }
    let push = pushes().lock().unwrap_or_else(|e| e.into_inner()).get(&super::token::hash(token)).cloned()?;
    // Below `/api/v1` as the API's router sees it (nested), or with the prefix.
    let below = path.strip_prefix("/api/v1").unwrap_or(path);
    let builds = format!("/api/v1/services/{}/builds", push.service);
    if method == axum::http::Method::POST && below == &builds["/api/v1".len()..] {
        // A push may create the service: the key or token that pushed was allowed to.
        Some(Ok(Caller(push.by, Scope::Admin)))
    } else {
        Some(Err(Error::Forbidden(format!("a push token may only POST {builds}"))))
    }
}

/// Whether `name` is a branch name git accepts (`git check-ref-format --branch`), checked
/// here without running git: the rules of git-check-ref-format(1) for `refs/heads/<name>`.
pub fn check_branch(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("deploy branch {name:?}: {why}"));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 200 {
        return bad("is longer than 200 characters");
    }
    if name.starts_with('-') {
        return bad("starts with '-'");
    }
    if name == "@" || name.contains("@{") {
        return bad("contains '@{' or is '@'");
    }
    if name.contains("..") || name.contains("//") {
        return bad("contains '..' or '//'");
    }
    if name.starts_with('/') || name.ends_with('/') || name.ends_with('.') {
        return bad("starts or ends with '/', or ends with '.'");
    }
    if let Some(c) = name.chars().find(|&c| c.is_ascii_control() || " ~^:?*[\\\x7f".contains(c)) {
        return bad(&format!("contains {c:?}"));
    }
    for part in name.split('/') {
        if part.starts_with('.') || part.ends_with(".lock") {
            return bad("has a component starting with '.' or ending with '.lock'");
        }
    }
    Ok(())
}

/// The default deploy branch, for services that do not exist yet.
pub const DEFAULT_BRANCH: &str = "main";

/// `services.deploy_branch` of `service`; None if there is no such service.
pub async fn deploy_branch(db: &super::db::Pool, service: &str) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    use sqlx::Row;
    let row = sqlx::query("SELECT deploy_branch FROM services WHERE name = $1")
        .bind(service)
        .fetch_optional(db)
        .await
        .with_context(|| format!("reading the deploy branch of {service}"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Sets `services.deploy_branch`; false if there is no such service.
pub async fn set_deploy_branch(db: &super::db::Pool, service: &str, branch: &str) -> anyhow::Result<bool> {
    use anyhow::Context;
    let done = sqlx::query("UPDATE services SET deploy_branch = $1, updated_at = $2 WHERE name = $3")
        .bind(branch)
        .bind(super::db::now())
        .bind(service)
        .execute(db)
        .await
        .with_context(|| format!("setting the deploy branch of {service}"))?;
    Ok(done.rows_affected() == 1)
}

/// `<data-dir>/git`.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("git")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        for ok in ["main", "release/2024", "feature-x", "v1.2", "a_b"] {
            assert_eq!(check_branch(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-x", "a..b", "a b", "a:b", "x.lock", ".hidden", "a/.b", "a/", "/a", "a.", "@", "a@{1}", "a~1", "a^",
            "a*", "a//b", "a\\b",
        ] {
            assert!(check_branch(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn push_tokens_reach_their_builds_only_and_die_with_the_push() {
        let post = axum::http::Method::POST;
        let t = PushToken::mint("web", "key:alice").unwrap();
        let secret = t.secret().to_string();
        match push_caller(&secret, &post, "/api/v1/services/web/builds") {
            Some(Ok(Caller(by, Scope::Admin))) => assert_eq!(by, "key:alice"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(push_caller(&secret, &post, "/services/web/builds"), Some(Ok(_))), "nested path");
        for (m, p) in [
            (post.clone(), "/api/v1/services/api/builds"),
            (post.clone(), "/services/web/builds/../deploys"),
            (post.clone(), "/api/v1/services/web/deploys"),
            (axum::http::Method::GET, "/api/v1/services/web/builds"),
            (axum::http::Method::DELETE, "/api/v1/services/web"),
        ] {
            assert!(matches!(push_caller(&secret, &m, p), Some(Err(Error::Forbidden(_)))), "{m} {p}");
        }
        assert!(push_caller("berth_0123", &post, "/api/v1/services/web/builds").is_none(), "not a push token");
        drop(t);
        assert!(push_caller(&secret, &post, "/api/v1/services/web/builds").is_none(), "dropped with the push");
        assert!(!format!("{:?}", PushToken::mint("web", "x").unwrap()).contains("berth_"));
    }
}
