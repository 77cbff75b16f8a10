//! The bare repositories (`<data-dir>/git/<service>.git`, made on the first push, each with a
//! `pre-receive` hook that runs `berth git-hook pre-receive`), what a client may ask for, and
//! the `git` processes that serve them.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Which side of git's transport a client wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// A push.
    ReceivePack,
    /// A fetch or clone.
    UploadPack,
}

impl Service {
    /// As git names it on the wire: `git-receive-pack`, `git-upload-pack`.
    pub fn name(self) -> &'static str {
        match self {
            Service::ReceivePack => "git-receive-pack",
            Service::UploadPack => "git-upload-pack",
        }
    }

    pub fn from_name(name: &str) -> Option<Service> {
        match name {
            "git-receive-pack" => Some(Service::ReceivePack),
            "git-upload-pack" => Some(Service::UploadPack),
            _ => None,
        }
    }

    /// The `git` subcommand.
    fn subcommand(self) -> &'static str {
        match self {
            Service::ReceivePack => "receive-pack",
            Service::UploadPack => "upload-pack",
        }
    }
}

/// A repository path as clients write it (`/web`, `web.git`, `/web.git/`) → the service name,
/// checked as one.
pub fn service_of(path: &str) -> Result<String, String> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    let name = p.strip_suffix(".git").unwrap_or(p);
    super::super::api::check_name(name)
        .map_err(|e| format!("repository {path:?}: {}", e.trim_start_matches("name: ")))?;
    Ok(name.to_string())
}

/// Parses an SSH exec request as git sends it: `git-receive-pack '/web.git'` (the path in
/// single quotes, as git's `sq_quote` writes it; `git receive-pack` with a space is also
/// accepted).
pub fn parse_command(cmd: &str) -> Result<(Service, String), String> {
    let cmd = cmd.trim();
    let (program, rest) = match cmd.split_once(' ') {
        Some(("git", r)) => match r.trim_start().split_once(' ') {
            Some((sub, r)) => (format!("git-{sub}"), r),
            None => (cmd.to_string(), ""),
        },
        Some((p, r)) => (p.to_string(), r),
        None => (cmd.to_string(), ""),
    };
    let Some(service) = Service::from_name(&program) else {
        return Err(format!(
            "berth: this SSH server only serves git pushes and fetches (git-receive-pack, git-upload-pack), not {:?}; \
             use it as a git remote: git remote add berth ssh://git@HOST:PORT/SERVICE",
            program
        ));
    };
    let arg = unquote(rest.trim()).ok_or_else(|| format!("berth: cannot read the repository path in {cmd:?}"))?;
    if arg.is_empty() {
        return Err(format!("berth: {program} needs a repository, like {program} 'SERVICE.git'"));
    }
    Ok((service, service_of(&arg).map_err(|e| format!("berth: {e}"))?))
}

/// Undoes git's shell quoting: `'a'`, `'it'\''s'`; a bare word is taken as it is.
fn unquote(s: &str) -> Option<String> {
    if !s.starts_with('\'') {
        return (!s.contains(['\'', '"', ' ', '\\'])).then(|| s.to_string());
    }
    let mut out = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'')?;
            out.push_str(&r[..end]);
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("\\'") {
            out.push('\'');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("\\!") {
            out.push('!');
            rest = r;
        } else {
            return None;
        }
    }
    Some(out)
}

/// `<data-dir>/git/<service>.git`.
pub fn path(data_dir: &Path, service: &str) -> PathBuf {
    super::root(data_dir).join(format!("{service}.git"))
}

/// The hook script: execs the berth binary (its path quoted for sh).
fn hook_script(exe: &Path) -> String {
    let quoted = exe.display().to_string().replace('\'', "'\\''");
    format!("#!/bin/sh\n# Written by the berth server: every push to this repository deploys through it.\nexec '{quoted}' git-hook pre-receive\n")
}

/// The repository of `service`, made if `create` and missing (`git init --bare` in a temporary
/// directory renamed into place, so two first pushes at once agree on one); its hook is
/// (re)written to exec `exe`. None if it does not exist and `create` is false.
pub async fn open(data_dir: &Path, service: &str, exe: &Path, create: bool) -> anyhow::Result<Option<PathBuf>> {
    let repo = path(data_dir, service);
    if !repo.join("HEAD").exists() {
        if !create {
            return Ok(None);
        }
        let root = super::root(data_dir);
        tokio::fs::create_dir_all(&root).await.with_context(|| format!("creating {}", root.display()))?;
        let mut rand = [0u8; 6];
        getrandom::fill(&mut rand).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
        let tmp = root.join(format!(".new-{service}-{}", hex::encode(rand)));
        let out = tokio::process::Command::new("git")
            .args(["init", "--quiet", "--bare", "--initial-branch", super::DEFAULT_BRANCH])
            .arg(&tmp)
            .env_remove("GIT_DIR")
            .output()
            .await
            .context("running git init (git must be installed on the server)")?;
        anyhow::ensure!(
            out.status.success(),
            "git init --bare {}: {}",
            tmp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        match tokio::fs::rename(&tmp, &repo).await {
            Ok(()) => tracing::info!(service, repo = %repo.display(), "git repository created"),
            Err(_) if repo.join("HEAD").exists() => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
            }
            Err(e) => return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), repo.display())),
        }
    }
    write_hook(&repo, exe).await?;
    Ok(Some(repo))
}

async fn write_hook(repo: &Path, exe: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let hooks = repo.join("hooks");
    let hook = hooks.join("pre-receive");
    let script = hook_script(exe);
    if tokio::fs::read_to_string(&hook).await.is_ok_and(|s| s == script) {
        return Ok(());
    }
    tokio::fs::create_dir_all(&hooks).await.with_context(|| format!("creating {}", hooks.display()))?;
    let tmp = hooks.join(format!(".pre-receive.{}", std::process::id()));
    tokio::fs::write(&tmp, script).await.with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).await?;
    tokio::fs::rename(&tmp, &hook).await.with_context(|| format!("writing {}", hook.display()))?;
    Ok(())
}

/// What a `git receive-pack` needs to hand its hook.
#[derive(Debug)]
pub struct HookEnv<'a> {
    pub service: &'a str,
    pub branch: &'a str,
    pub token: &'a super::PushToken,
}

/// A `git <service>` on `repo` (stdio not yet set), for SSH (`stateless` false) or HTTP. The
/// hook's settings go in the environment, never in argv (which `ps` shows).
pub fn command(
    service: Service,
    repo: &Path,
    stateless: bool,
    advertise: bool,
    protocol: Option<&str>,
    hook: Option<&HookEnv<'_>>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg(service.subcommand());
    if stateless {
        cmd.arg("--stateless-rpc");
    }
    if advertise {
        cmd.arg("--advertise-refs");
    }
    cmd.arg(repo);
    for v in ["GIT_DIR", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_PROTOCOL", "GIT_CONFIG"] {
        cmd.env_remove(v);
    }
    // Only what git itself understands: `version=2`, `version=1`.
    if let Some(p) = protocol.filter(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b"=:.-_".contains(&b))) {
        cmd.env("GIT_PROTOCOL", p);
    }
    if let (Some(h), Some(cfg)) = (hook, super::config()) {
        cmd.env("BERTH_HOOK_API", &cfg.api_url)
            .env("BERTH_HOOK_TOKEN", h.token.secret())
            .env("BERTH_HOOK_SERVICE", h.service)
            .env("BERTH_HOOK_BRANCH", h.branch)
            .env("BERTH_HOOK_WORK", super::root(&cfg.data_dir).join(".work"));
    }
    cmd.kill_on_drop(true);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_commands() {
        let ok: &[(&str, Service, &str)] = &[
            ("git-receive-pack '/web'", Service::ReceivePack, "web"),
            ("git-receive-pack 'web.git'", Service::ReceivePack, "web"),
            ("git-receive-pack '/web.git'", Service::ReceivePack, "web"),
            ("git-upload-pack '/api-2.git/'", Service::UploadPack, "api-2"),
            ("git-upload-pack web", Service::UploadPack, "web"),
            ("git upload-pack 'web'", Service::UploadPack, "web"),
        ];
        for (cmd, service, name) in ok {
            assert_eq!(parse_command(cmd), Ok((*service, name.to_string())), "{cmd}");
        }
        let bad: &[(&str, &str)] = &[
            ("ls -la", "only serves git pushes and fetches"),
            ("git-upload-archive 'web'", "not \"git-upload-archive\""),
            ("git-receive-pack", "needs a repository"),
            ("git-receive-pack '../etc'", "repository \"../etc\""),
            ("git-receive-pack 'a/b'", "repository \"a/b\""),
            ("git-receive-pack 'Web'", "lowercase"),
            ("git-receive-pack 'web", "cannot read"),
            ("git-receive-pack 'a'\\''b'", "repository \"a'b\""),
        ];
        for (cmd, want) in bad {
            let err = parse_command(cmd).unwrap_err();
            assert!(err.contains(want), "{cmd}: {err}");
        }
    }

    #[test]
    fn hook_script_quotes_the_binary() {
        assert!(hook_script(Path::new("/opt/it's/berth")).contains("exec '/opt/it'\\''s/berth' git-hook pre-receive"));
    }
}
