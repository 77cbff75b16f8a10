//! The slow half of scaling: carries out the [`Action`]s that [`super::platform`] decides
//! under its locks — start a container of a revision and wait until it is really ready, freeze,
//! thaw, stop, check — and reports each outcome back through the service's `on_*` methods.
//!
//! Engine calls are blocking (they spawn shims, read and write files): each runs in
//! `spawn_blocking`, never on the request path's executor threads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::{Engine, RunOptions};
use tokio::sync::mpsc;

use super::platform::{Action, Revision, Service};

/// Container labels that tie a container to its service and revision (for re-adoption).
pub const LABEL_SERVICE: &str = "berth.service";
pub const LABEL_REVISION: &str = "berth.revision";
/// Marks a release command's container (never an instance).
pub const LABEL_RELEASE: &str = "berth.release";

/// How long a stopping instance gets between its stop signal and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Log lines quoted in a start failure.
const LOG_TAIL: usize = 10;
/// Logs of stopped instances kept per service.
const KEEP_LOGS: usize = 20;

#[derive(Clone)]
pub struct Executor {
    pub engine: Arc<Engine>,
    pub data_dir: PathBuf,
    /// Prepared containers (created, not started), oldest first, at most `max_prepared`.
    pub prepared: Arc<std::sync::Mutex<std::collections::VecDeque<PreparedEntry>>>,
    pub max_prepared: usize,
}

/// A prepared container waiting for its service's next cold start.
pub struct PreparedEntry {
    svc: Arc<Service>,
    revision: i64,
    container: berth_agent::engine::Prepared,
}

impl Executor {
    /// Runs every action as its own task, so a slow start never delays a thaw.
    pub async fn run(self, mut actions: mpsc::UnboundedReceiver<Action>) {
        while let Some(a) = actions.recv().await {
            let me = self.clone();
            tokio::spawn(async move { me.perform(a).await });
        }
    }

    async fn perform(&self, a: Action) {
        match a {
            Action::Start { svc, slot, revision, timeout, notify } => {
                let t0 = Instant::now();
                // Quoted output may hold the app's env: its secrets are masked.
                let result = self.start(&svc, slot, &revision, timeout).await.map_err(|e| redact(&e, &revision));
                match &result {
                    Ok(addr) => tracing::info!(service = %svc.name, revision = revision.number, %addr,
                        ms = t0.elapsed().as_millis() as u64, "instance ready"),
                    Err(e) => tracing::warn!(service = %svc.name, revision = revision.number, reason = ?e,
                        "instance failed to start"),
                }
                if let Err(reason) = &result {
                    svc.on_start_failed(slot, reason);
                }
                if let Some(n) = notify {
                    let _ = n.send(result.map(|_| ()));
                }
            }
            Action::Freeze { svc, slot, container } => {
                let ok = self.blocking(move |e| e.freeze(&container).map_err(|e| e.to_string())).await;
                if let Err(e) = &ok {
                    tracing::warn!(service = %svc.name, error = %e, "freezing an instance failed");
                } else {
                    tracing::debug!(service = %svc.name, slot, "instance frozen");
                }
                svc.on_frozen(slot, ok.is_ok());
            }
            Action::Thaw { svc, slot, container } => {
                self.blocking(move |e| e.thaw(&container)).await;
                svc.on_thawed(slot);
            }
            Action::Stop { svc, slot, container } => {
                if let Some(c) = container {
                    let name = svc.name.clone();
                    let dir = self.data_dir.clone();
                    self.blocking(move |e| retire(e, &dir, &name, &c)).await;
                }
                tracing::info!(service = %svc.name, slot, "instance stopped");
                svc.on_stopped(slot);
            }
            Action::Prepare { svc, revision } => self.prepare(svc, revision).await,
            Action::Discard { service, name } => {
                tracing::debug!(service = %name, "discarding prepared containers");
                self.act_discard(service).await;
            }
            Action::Check { svc, slot, container } => {
                let c2 = container.clone();
                let dead = self
                    .blocking(move |e| match e.get(&c2) {
                        Ok(c) if c.is_running() => None,
                        Ok(c) => Some(format!("{}{}", c.state.describe_exit(), log_tail(e, &c.id))),
                        Err(err) => Some(err.to_string()),
                    })
                    .await;
                if let Some(reason) = dead {
                    let reason = match svc.revision() {
                        Some(r) => redact(&reason, &r),
                        None => reason,
                    };
                    svc.on_dead(slot, &reason);
                    let name = svc.name.clone();
                    let dir = self.data_dir.clone();
                    self.blocking(move |e| retire_with(e, &dir, &name, &container, Duration::ZERO)).await;
                }
            }
        }
    }

    /// Prepares a container of `rev` for `svc` (at most one per service), evicting the oldest
    /// prepared container beyond `max_prepared`.
    async fn prepare(&self, svc: Arc<Service>, rev: Arc<Revision>) {
        if self.max_prepared == 0 {
            return;
        }
        let already = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|e| e.svc.id == svc.id && e.revision == rev.number);
        if already || svc.is_deleted() {
            return;
        }
        let (name, r, dir) = (svc.name.clone(), rev.clone(), self.data_dir.clone());
        let made = self
            .blocking(move |e| -> Result<berth_agent::engine::Prepared, String> {
                let image = e.images().get(&r.image_id).map_err(|err| err.to_string())?;
                e.prepare(&image, &r.image, run_options(&dir, &name, &r)?).map_err(|err| err.to_string())
            })
            .await;
        let p = match made {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(service = %svc.name, error = %e, "preparing a container failed");
                return;
            }
        };
        tracing::debug!(service = %svc.name, revision = rev.number, container = %&p.id[..12], "container prepared");
        svc.set_prepared(true);
        let entry = PreparedEntry { svc: svc.clone(), revision: rev.number, container: p };
        let evicted: Vec<PreparedEntry> = {
            let mut list = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
            list.push_back(entry);
            let excess = list.len().saturating_sub(self.max_prepared);
            list.drain(..excess).collect()
        };
        for e in evicted {
            self.discard(e).await;
        }
        // Deleted while it was being made.
        if svc.is_deleted() {
            self.act_discard(svc.id).await;
        }
    }

    async fn act_discard(&self, service: i64) {
        let gone: Vec<PreparedEntry> = {
            let mut list = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
            let all: Vec<PreparedEntry> = list.drain(..).collect();
            let (gone, keep): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e.svc.id == service);
            list.extend(keep);
            gone
        };
        for e in gone {
            self.discard(e).await;
        }
    }

    /// Closes a prepared container's socket (its shim tears it down) and removes it.
    async fn discard(&self, e: PreparedEntry) {
        let id = e.container.id.clone();
        let (dir, name) = (self.data_dir.clone(), e.svc.name.clone());
        e.svc.set_prepared(false);
        drop(e.container);
        self.blocking(move |eng| {
            archive_log(eng, &dir, &name, &id);
            let _ = eng.remove(&id, true);
        })
        .await;
    }

    /// Removes every prepared container (the server is stopping).
    pub async fn discard_all(&self) {
        let all: Vec<PreparedEntry> = self.prepared.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for e in all {
            self.discard(e).await;
        }
    }

    fn take_prepared(&self, service: i64, revision: i64) -> Option<berth_agent::engine::Prepared> {
        let mut list = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        let i = list.iter().position(|e| e.svc.id == service && e.revision == revision)?;
        let e = list.remove(i)?;
        e.svc.set_prepared(false);
        Some(e.container)
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Engine) -> T + Send + 'static) -> T {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine)).await.expect("an engine call panicked")
    }

    /// Starts a container of `rev` and waits until it is ready: its port accepts connections,
    /// then its health path (if any) answers 2xx. Returns its address, or why it failed.
    async fn start(
        &self,
        svc: &Arc<Service>,
        slot: u64,
        rev: &Arc<Revision>,
        timeout: Duration,
    ) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + timeout;
        let (name, r, dir) = (svc.name.clone(), rev.clone(), self.data_dir.clone());
        let prepared = self.take_prepared(svc.id, rev.number);
        let started = self
            .blocking(move |e| -> Result<(String, Option<std::net::Ipv4Addr>), String> {
                if let Some(p) = prepared {
                    let id = p.id.clone();
                    match e.start_prepared(p) {
                        Ok(c) => return Ok((c.id.clone(), c.state.ip())),
                        // Fall back to a container made now; the prepared one is gone.
                        Err(err) => {
                            tracing::warn!(container = %&id[..12], error = %err, "starting a prepared container failed");
                            let _ = e.remove(&id, true);
                        }
                    }
                }
                let image = e
                    .images()
                    .get(&r.image_id)
                    .map_err(|err| format!("image {} ({}) is not in the store: {err}", r.image, r.image_id))?;
                let (c, _) =
                    e.run(&image, &r.image, run_options(&dir, &name, &r)?, false).map_err(|err| err.to_string())?;
                Ok((c.id.clone(), c.state.ip()))
            })
            .await?;
        let (id, ip) = started;
        svc.on_created(slot, &id);
        let result = match ip {
            Some(ip) => self.wait_ready(svc, &id, SocketAddr::new(ip.into(), rev.port), rev, deadline, timeout).await,
            None => Err("the container has no network address".to_string()),
        };
        match result {
            Ok(addr) => {
                svc.on_ready(slot, &id, addr);
                Ok(addr)
            }
            Err(reason) => {
                // It never served: nothing to drain, no grace period (a process that has not
                // set up its SIGTERM handler yet would ignore the signal as PID 1).
                let (name, dir) = (svc.name.clone(), self.data_dir.clone());
                self.blocking(move |e| retire_with(e, &dir, &name, &id, Duration::ZERO)).await;
                Err(reason)
            }
        }
    }

    /// Probes `addr` until it accepts a connection (every 1 ms, then 2 ms: a refused connect on
    /// the bridge costs microseconds, and a longer step is added to every cold start), checking
    /// every 25 ms that the container still runs, so a crash is reported at once with its exit
    /// and last log lines.
    async fn wait_ready(
        &self,
        svc: &Service,
        id: &str,
        addr: SocketAddr,
        rev: &Revision,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<SocketAddr, String> {
        let mut delay = Duration::from_millis(1);
        let mut checked = Instant::now();
        loop {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(250), tokio::net::TcpStream::connect(addr)).await
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "did not accept connections on port {} within {}{}",
                    rev.port,
                    super::scaling::format_duration(timeout.as_millis() as u64),
                    self.tail(id).await
                ));
            }
            if checked.elapsed() >= Duration::from_millis(25) {
                checked = Instant::now();
                self.ensure_running(id).await?;
                if svc.is_deleted() {
                    return Err(format!("service {} was deleted", svc.name));
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(2));
        }
        let Some(path) = &rev.health_path else { return self.wait_healthcheck(id, addr, rev, deadline, timeout).await };
        let mut last;
        loop {
            match health_get(addr, path).await {
                Ok(status) if (200..300).contains(&status) => return Ok(addr),
                Ok(status) => last = format!("answered {status}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "health check GET {path} did not answer 2xx within {} (last: {last}){}",
                    super::scaling::format_duration(timeout.as_millis() as u64),
                    self.tail(id).await
                ));
            }
            self.ensure_running(id).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Without a health path, an image's HEALTHCHECK (`CMD` or `CMD-SHELL`) is the readiness
    /// check: it runs in the instance until it exits 0.
    async fn wait_healthcheck(
        &self,
        id: &str,
        addr: SocketAddr,
        rev: &Revision,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<SocketAddr, String> {
        let image_id = rev.image_id.clone();
        let test = self.blocking(move |e| e.images().get(&image_id).ok().and_then(|i| i.config.healthcheck)).await;
        let args: Vec<String> = match test.as_deref() {
            Some([kind, rest @ ..]) if kind == "CMD" && !rest.is_empty() => rest.to_vec(),
            Some([kind, cmd]) if kind == "CMD-SHELL" => vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
            _ => return Ok(addr),
        };
        let mut last;
        loop {
            let (cid, a) = (id.to_string(), args.clone());
            let outcome = self
                .blocking(move |e| {
                    let opts = berth_agent::ExecOptions {
                        args: a,
                        stdin: std::process::Stdio::null(),
                        stdout: std::process::Stdio::null(),
                        stderr: std::process::Stdio::null(),
                        ..Default::default()
                    };
                    e.exec(&cid, opts).map_err(|e| e.to_string()).and_then(|mut x| x.wait().map_err(|e| e.to_string()))
                })
                .await;
            match outcome {
                Ok(0) => return Ok(addr),
                Ok(code) => last = format!("exit code {code}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the image's HEALTHCHECK {args:?} did not succeed within {} (last: {last}){}",
                    super::scaling::format_duration(timeout.as_millis() as u64),
                    self.tail(id).await
                ));
            }
            self.ensure_running(id).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ensure_running(&self, id: &str) -> Result<(), String> {
        let id = id.to_string();
        self.blocking(move |e| match e.get(&id) {
            Ok(c) if c.is_running() => Ok(()),
            Ok(c) => Err(format!("{}{}", c.state.describe_exit(), log_tail(e, &c.id))),
            Err(err) => Err(err.to_string()),
        })
        .await
    }

    async fn tail(&self, id: &str) -> String {
        let id = id.to_string();
        self.blocking(move |e| log_tail(e, &id)).await
    }
}

/// Where a service's named volumes live: `<data-dir>/volumes/<service>/<volume>` (a volume
/// belongs to its service: no service can name its way into another's data).
pub fn volume_dir(data_dir: &Path, service: &str, volume: &str) -> PathBuf {
    data_dir.join("volumes").join(service).join(volume)
}

/// `text` with every secret value of `rev` (4 characters or more) replaced by `<secret NAME>`:
/// for output quoted in errors (an app or a release command may print its env).
pub fn redact(text: &str, rev: &Revision) -> String {
    let mut out = text.to_string();
    for (k, v) in &rev.secrets.0 {
        if v.len() >= 4 {
            out = out.replace(v.as_str(), &format!("<secret {k}>"));
        }
    }
    out
}

/// What a service's container is started with (its volumes' directories made if new).
pub fn run_options(data_dir: &Path, service: &str, rev: &Revision) -> Result<RunOptions, String> {
    let mut mounts = Vec::new();
    for v in &rev.volumes {
        let source = volume_dir(data_dir, service, &v.volume);
        std::fs::create_dir_all(&source).map_err(|e| format!("creating volume {}: {e}", v.volume))?;
        mounts.push(berth_agent::engine::Mount { source, destination: v.path.clone(), read_only: false });
    }
    let mut env: Vec<String> = rev.env.iter().chain(rev.secrets.0.iter()).map(|(k, v)| format!("{k}={v}")).collect();
    if !rev.env.contains_key("PORT") && !rev.secrets.0.contains_key("PORT") {
        env.push(format!("PORT={}", rev.port));
    }
    // As Cloud Run's K_SERVICE and K_REVISION: the app may say who it is.
    for (k, v) in [("BERTH_SERVICE", service.to_string()), ("BERTH_REVISION", rev.number.to_string())] {
        if !rev.env.contains_key(k) && !rev.secrets.0.contains_key(k) {
            env.push(format!("{k}={v}"));
        }
    }
    let mut suffix = [0u8; 3];
    getrandom::fill(&mut suffix).expect("the kernel's random source");
    Ok(RunOptions {
        name: Some(format!("{service}-r{}-{}", rev.number, hex::encode(suffix))),
        env,
        hostname: Some(service.to_string()),
        labels: [
            (LABEL_SERVICE.to_string(), service.to_string()),
            (LABEL_REVISION.to_string(), rev.number.to_string()),
        ]
        .into(),
        mounts,
        memory: rev.resources.memory,
        cpus: rev.resources.cpu_millis.map(|m| f64::from(m) / 1000.0),
        ..RunOptions::default()
    })
}

/// Runs a revision's release command once, to completion, in a container of its image with
/// its env, secrets and volumes (`/bin/sh -c COMMAND`); stopped after `timeout`. Ok with the
/// output's tail if it exited 0, else why not. Blocking.
pub fn run_release(
    engine: &Engine,
    data_dir: &Path,
    service: &str,
    rev: &Revision,
    command: &str,
    timeout: Duration,
) -> Result<String, String> {
    let image = engine.images().get(&rev.image_id).map_err(|e| format!("image {}: {e}", rev.image))?;
    let mut opts = run_options(data_dir, service, rev)?;
    opts.name = opts.name.map(|n| format!("{n}-release"));
    opts.entrypoint = Some(vec!["/bin/sh".into(), "-c".into()]);
    opts.cmd = Some(vec![command.to_string()]);
    opts.labels.insert(LABEL_RELEASE.to_string(), "1".to_string());
    let (c, attach) = engine.run(&image, &rev.image, opts, true).map_err(|e| format!("starting it: {e}"))?;
    let id = c.id.clone();
    let deadline = Instant::now() + timeout;
    let mut stopped = false;
    if let Some(mut a) = attach {
        a.wait(Duration::from_millis(200), || {
            if !stopped && Instant::now() >= deadline {
                stopped = true;
                let _ = engine.stop(&id, Some(Duration::from_secs(2)));
            }
        });
    }
    // The shim records the exit just after it tells the attached client.
    let mut state = engine.get(&id).map(|c| c.state);
    for _ in 0..50 {
        if state.as_ref().is_ok_and(|s| s.exit_code.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        state = engine.get(&id).map(|c| c.state);
    }
    let tail = redact(&log_tail(engine, &id), rev);
    let _ = engine.remove(&id, true);
    let state = state.map_err(|e| format!("reading its state: {e}"))?;
    match state.exit_code {
        Some(0) if !stopped => Ok(tail),
        _ if stopped => Err(format!("it ran longer than {}s and was stopped{tail}", timeout.as_secs())),
        _ => Err(format!("{}{tail}", state.describe_exit())),
    }
}

/// "; last log lines:\n..." with up to [`LOG_TAIL`] lines of a container's output, or "".
pub fn log_tail(engine: &Engine, id: &str) -> String {
    let path = engine.paths(id).log();
    let lines = berth_agent::logs::read_all(&path, engine.config().logs.max_files).unwrap_or_default();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(LOG_TAIL);
    let mut out = String::from("; last log lines:\n");
    for l in &lines[start..] {
        out.push_str(String::from_utf8_lossy(&l.bytes).trim_end_matches('\n'));
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

/// Stops a container (stop signal, grace, SIGKILL), keeps its log under the service's log
/// directory, and removes it. Tolerates a container that is already gone.
pub fn retire(engine: &Engine, data_dir: &Path, service: &str, id: &str) {
    retire_with(engine, data_dir, service, id, STOP_GRACE)
}

fn retire_with(engine: &Engine, data_dir: &Path, service: &str, id: &str, grace: Duration) {
    let _ = engine.stop(id, Some(grace));
    archive_log(engine, data_dir, service, id);
    if let Err(e) = engine.remove(id, true) {
        tracing::warn!(service, container = id, error = %e, "removing a stopped instance");
    }
}

/// The directory where a service's stopped instances' logs are kept.
pub fn log_dir(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join("services").join(service).join("logs")
}

fn archive_log(engine: &Engine, data_dir: &Path, service: &str, id: &str) {
    let dir = log_dir(data_dir, service);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    // The raw records (same format), rotated files oldest first, then the live one.
    let live = engine.paths(id).log();
    let mut text = Vec::new();
    for n in (1..=engine.config().logs.max_files).rev() {
        let mut p = live.as_os_str().to_owned();
        p.push(format!(".{n}"));
        if let Ok(b) = std::fs::read(&p) {
            text.extend_from_slice(&b);
        }
    }
    if let Ok(b) = std::fs::read(&live) {
        text.extend_from_slice(&b);
    }
    if text.is_empty() {
        return;
    }
    let stamp = String::from_utf8_lossy(text.split(|&b| b == b' ').next().unwrap_or_default()).into_owned();
    let _ = std::fs::write(dir.join(format!("{stamp}_{}.log", &id[..12])), text);
    // Keep the newest KEEP_LOGS files (names start with the first line's time, so they sort).
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        let excess = names.len().saturating_sub(KEEP_LOGS);
        for p in &names[..excess] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One GET of the health path; returns the status code.
async fn health_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| format!("sending: {e}"))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.map_err(|e| format!("reading: {e}"))?;
        let head = String::from_utf8_lossy(&buf[..n]);
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("not an HTTP answer: {head:?}"))
    };
    tokio::time::timeout(Duration::from_secs(2), fut).await.map_err(|_| "timed out after 2s".to_string())?
}
