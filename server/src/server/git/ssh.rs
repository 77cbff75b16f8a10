//! Berth's SSH server (`--ssh-addr`), for `git push` and `git fetch` only: public-key
//! authentication against `ssh_keys` (every registered key may push any service and create
//! it), user name `git`, and exec requests `git-receive-pack '<service>.git'` or
//! `git-upload-pack ...`, each bridged to a `git` process (stdin, stdout, stderr as extended
//! data, the exit status). Anything else gets a message on stderr and exit status 1.
//!
//! The host key (ed25519) is made once, `<data-dir>/ssh_host_ed25519_key` (0600, with its
//! `.pub` beside it), and kept across restarts so clients' known_hosts stay valid.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::io::AsyncWriteExt;

use super::repo::{self, Service};
use crate::server::db::Pool;

/// The host key's file under the data directory.
pub const HOST_KEY: &str = "ssh_host_ed25519_key";

/// Reads the host key, making it first if there is none (written to a temporary file, 0600,
/// then hard-linked to its name, so two servers starting at once agree on one key).
pub fn load_or_create_host_key(data_dir: &Path) -> anyhow::Result<PrivateKey> {
    let path = data_dir.join(HOST_KEY);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return PrivateKey::from_openssh(text.as_bytes()).with_context(|| {
                format!("{} is not an OpenSSH private key: remove it to have one made", path.display())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("reading random bytes for the SSH host key: {e}"))?;
    let mut key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed));
    key.set_comment("berth host key");
    let text = key.to_openssh(russh::keys::ssh_key::LineEnding::LF).context("encoding the SSH host key")?;
    let tmp = data_dir.join(format!(".{HOST_KEY}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().with_context(|| format!("writing {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            let public = key.public_key().to_openssh().context("encoding the SSH host key")?;
            let _ = std::fs::write(data_dir.join(format!("{HOST_KEY}.pub")), public + "\n");
            tracing::info!(file = %path.display(), "SSH host key created");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_host_key(data_dir),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Serves SSH on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    key: PrivateKey,
    db: Pool,
    data_dir: PathBuf,
    stop: impl std::future::Future<Output = ()>,
) {
    let config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Berth".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: std::time::Duration::from_millis(500),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        keys: vec![key],
        inactivity_timeout: Some(std::time::Duration::from_secs(3600)),
        keepalive_interval: Some(std::time::Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    });
    tokio::pin!(stop);
    loop {
        let (socket, peer) = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ssh: accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let handler = Connection {
            db: db.clone(),
            data_dir: data_dir.clone(),
            peer,
            user: String::new(),
            key: None,
            channels: HashMap::new(),
            protocol: HashMap::new(),
        };
        let config = config.clone();
        tokio::spawn(async move {
            match russh::server::run_stream(config, socket, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(%peer, error = %format!("{e:#}"), "ssh session ended with an error");
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %format!("{e:#}"), "ssh handshake failed"),
            }
        });
    }
}

/// One client connection.
struct Connection {
    db: Pool,
    data_dir: PathBuf,
    peer: std::net::SocketAddr,
    /// The user name it authenticated as.
    user: String,
    /// The registered key's name, once authenticated.
    key: Option<String>,
    /// Opened session channels not yet given a command.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// `GIT_PROTOCOL` sent by the client (an env request), per channel.
    protocol: HashMap<ChannelId, String>,
}

impl Connection {
    async fn registered(&self, key: &PublicKey) -> anyhow::Result<Option<String>> {
        Ok(super::keys::find(&self.db, &super::keys::fingerprint(key)).await?.map(|k| k.name))
    }

    /// Takes a channel for a command; fails it if it is unknown or already in use.
    fn take(&mut self, id: ChannelId, session: &mut Session) -> Result<Option<Channel<Msg>>, anyhow::Error> {
        match self.channels.remove(&id) {
            Some(c) => {
                session.channel_success(id)?;
                Ok(Some(c))
            }
            None => {
                session.channel_failure(id)?;
                Ok(None)
            }
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = anyhow::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Unknown keys are refused before the client signs anything.
        Ok(match self.registered(offer.public_key).await? {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fingerprint = super::keys::fingerprint(key.public_key);
        match self.registered(key.public_key).await? {
            Some(name) => {
                // A wrong user name is let in to be told what is wrong: with a key that may
                // push, there is nothing else it could reach.
                tracing::info!(peer = %self.peer, key = %name, user, "ssh: authenticated");
                self.user = user.to_string();
                self.key = Some(name);
                Ok(Auth::Accept)
            }
            None => {
                tracing::info!(peer = %self.peer, %fingerprint, user, "ssh: unknown key refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.key.is_none() {
            reply.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "GIT_PROTOCOL" {
            self.protocol.insert(channel, value.to_string());
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted and ignored, so `ssh -t` reaches the shell request and its message.
        session.channel_success(channel)?;
        Ok(())
    }

    async fn shell_request(&mut self, id: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(channel) = self.take(id, session)? {
            let key = self.key.clone().unwrap_or_default();
            let msg = format!(
                "berth: hi {key}! There is no shell here: this SSH server takes git pushes. \
                 Add it as a remote: git remote add berth ssh://git@HOST:PORT/SERVICE, then git push berth main"
            );
            tokio::spawn(refuse(channel, msg));
        }
        Ok(())
    }

    async fn subsystem_request(&mut self, id: ChannelId, name: &str, session: &mut Session) -> Result<(), Self::Error> {
        tracing::info!(peer = %self.peer, subsystem = name, "ssh: subsystem refused");
        self.channels.remove(&id);
        session.channel_failure(id)?;
        Ok(())
    }

    async fn exec_request(&mut self, id: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        let Some(channel) = self.take(id, session)? else { return Ok(()) };
        let command = String::from_utf8_lossy(data).into_owned();
        let key = self.key.clone().unwrap_or_default();
        if self.user != "git" {
            let msg = format!(
                "berth: log in as user \"git\" (ssh://git@HOST:PORT/SERVICE), not {:?}; key {key} is fine",
                self.user
            );
            tokio::spawn(refuse(channel, msg));
            return Ok(());
        }
        let (service, name) = match repo::parse_command(&command) {
            Ok(c) => c,
            Err(msg) => {
                tracing::info!(peer = %self.peer, key = %key, command = %command, "ssh: command refused");
                tokio::spawn(refuse(channel, msg));
                return Ok(());
            }
        };
        tracing::info!(peer = %self.peer, key = %key, service = %name, git = service.name(), "ssh: git");
        let protocol = self.protocol.remove(&id);
        let (db, data_dir) = (self.db.clone(), self.data_dir.clone());
        tokio::spawn(async move {
            let (rx, tx) = channel.split();
            let code = match run_git(&db, &data_dir, service, &name, &key, protocol.as_deref(), rx, &tx).await {
                Ok(code) => code,
                Err(e) => {
                    tracing::warn!(service = %name, error = %format!("{e:#}"), "ssh: git failed");
                    let _ = tx.extended_data_bytes(1, format!("berth: {e:#}\n").into_bytes()).await;
                    1
                }
            };
            let _ = tx.exit_status(code).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
        });
        Ok(())
    }
}

/// Ends a channel with `msg` on its stderr and exit status 1.
async fn refuse(channel: Channel<Msg>, msg: String) {
    let _ = channel.extended_data_bytes(1, format!("{msg}\n").into_bytes()).await;
    let _ = channel.exit_status(1).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// Runs `git <service>` on the repository of `name` for this channel; returns its exit status.
#[allow(clippy::too_many_arguments)]
async fn run_git(
    db: &Pool,
    data_dir: &Path,
    service: Service,
    name: &str,
    key: &str,
    protocol: Option<&str>,
    mut rx: russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
) -> anyhow::Result<u32> {
    let cfg = super::config().context("the git service is not ready")?;
    let push = service == Service::ReceivePack;
    let Some(repo) = repo::open(data_dir, name, &cfg.exe, push).await? else {
        anyhow::bail!("no repository {name:?}: push to it first");
    };
    let (token, branch) = if push {
        let branch = super::deploy_branch(db, name).await?.unwrap_or_else(|| super::DEFAULT_BRANCH.to_string());
        (Some(super::PushToken::mint(name, &format!("key:{key}"))?), branch)
    } else {
        (None, String::new())
    };
    let hook = token.as_ref().map(|t| repo::HookEnv { service: name, branch: &branch, token: t });
    let mut child = repo::command(service, &repo, false, false, protocol, hook.as_ref())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting git (git must be installed on the server)")?;
    let _ = hook;
    let mut stdin = child.stdin.take().context("git's stdin")?;
    let mut stdout = child.stdout.take().context("git's stdout")?;
    let mut stderr = child.stderr.take().context("git's stderr")?;
    // The client's data to git's stdin until it sends EOF; the client keeps the channel open
    // until it has the exit status, so this task is ended rather than awaited.
    let input = tokio::spawn(async move {
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } if stdin.write_all(&data).await.is_err() => break,
                ChannelMsg::Data { .. } => {}
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = stdin.shutdown().await;
    });
    let mut out_writer = tx.make_writer();
    let mut err_writer = tx.make_writer_ext(Some(1));
    let (out, err) =
        tokio::join!(tokio::io::copy(&mut stdout, &mut out_writer), tokio::io::copy(&mut stderr, &mut err_writer));
    let status = child.wait().await.context("waiting for git")?;
    input.abort();
    out.context("sending git's output")?;
    err.context("sending git's messages")?;
    let _ = out_writer.flush().await;
    let _ = err_writer.flush().await;
    // The push token lives until git (and its hook) is done.
    drop(token);
    Ok(match status.code() {
        Some(c) => c as u32,
        None => 1,
    })
}
