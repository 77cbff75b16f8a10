//! [`Engine`]: the one interface between the control plane (server, CLI) and the container
//! engine. Blocking calls; a tokio caller wraps them in `spawn_blocking`.
//!
//! Architecture Invariant: the engine never calls libcontainer or creates namespaces in the
//! calling process. Everything that touches the kernel per container runs in a shim process
//! (`berth shim ID`), so the engine is safe to use from a threaded server.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod exec;

pub use crate::container::Mount;
use crate::container::{self, Container, Paths, State, Status};
use crate::image::{self, Image};
use crate::Config;
pub use exec::{Exec, ExecOptions};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Image(#[from] image::Error),
    #[error("no such container: {0}")]
    NotFound(String),
    #[error("container reference {0:?} matches more than one container; use more of the id")]
    Ambiguous(String),
    #[error("the container name {0:?} is already in use by container {1}")]
    NameInUse(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("container {0} failed to start: {1}")]
    Start(String, String),
    #[error("container {0} is running: stop it first, or remove it with --force")]
    Running(String),
    /// A command could not be started in a container; `code` is what a shell would exit with:
    /// 127 not found, 126 not executable, 125 anything else.
    #[error("{reason}")]
    Exec { code: i32, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How to start a shim: the berth binary and the arguments before the container id.
#[derive(Debug, Clone)]
pub struct ShimCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// What `berth run` (or the control plane) asks for; unset fields come from the image config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub name: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE` overrides, merged over the image's Env.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    pub stop_signal: Option<String>,
    pub stop_timeout: Option<u64>,
    pub auto_remove: bool,
    pub no_new_privileges: bool,
    pub labels: BTreeMap<String, String>,
    /// Host directories to bind-mount (see [`Mount`]); checked by [`validate_mounts`].
    pub mounts: Vec<Mount>,
}

/// A container created by [`Engine::prepare`] whose process has not started: its shim waits on
/// this socket. [`Engine::start_prepared`] starts it; dropping it makes the shim tear the
/// container down (then [`Engine::remove`] deletes it).
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    sock: UnixStream,
}

static FORWARD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn remember_signal(sig: libc::c_int) {
    FORWARD.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM, SIGHUP and SIGQUIT to this process be recorded instead of killing it,
/// so a foreground `berth run` can pass them to its container (Docker's `--sig-proxy`).
pub fn forward_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, remember_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Gives SIGPIPE its default action (end the process), which Rust's runtime replaces with
/// "ignore": a command printing into a closed pipe (`berth services | head -1`) then ends
/// quietly, as Unix tools do, instead of failing on EPIPE. For short-lived CLI processes only.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to the default installs no handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

static WINCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn remember_winch(_: libc::c_int) {
    WINCH.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGWINCH (the terminal was resized) be recorded, for a client that passes the size on
/// to a container's terminal; see [`take_window_change`].
pub fn watch_window_changes() {
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGWINCH, remember_winch as *const () as libc::sighandler_t);
    }
}

/// Whether SIGWINCH came since the last call.
pub fn take_window_change() -> bool {
    WINCH.swap(false, std::sync::atomic::Ordering::SeqCst)
}

/// The signal received since the last call, if any.
pub fn take_forwarded_signal() -> Option<Signal> {
    let sig = FORWARD.swap(0, std::sync::atomic::Ordering::SeqCst);
    if sig == 0 {
        None
    } else {
        Signal::try_from(sig).ok()
    }
}

/// A foreground attachment to a started container: says when it exited.
pub struct Attach {
    sock: UnixStream,
}

impl Attach {
    /// Waits until the container exits, calling `tick` at least every `every` (to copy log
    /// lines as they come). Dropping the Attach lets the shim finish (and remove a `--rm`
    /// container).
    pub fn wait(&mut self, every: Duration, mut tick: impl FnMut()) {
        let _ = self.sock.set_read_timeout(Some(every));
        let mut buf = [0u8; 256];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => return,
                Ok(n) if buf[..n].windows(6).any(|w| w == b"exited") => return,
                Ok(_) => tick(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    tick()
                }
                Err(_) => return,
            }
        }
    }
}

/// The file under the data directory listing image ids `gc` keeps though no container uses them.
pub const GC_ROOTS: &str = "gc-roots";

pub struct Engine {
    data_dir: PathBuf,
    config: Config,
    images: image::Store,
    shim: ShimCommand,
}

impl Engine {
    pub fn open(data_dir: &Path, config: Config, shim: ShimCommand) -> Result<Engine, Error> {
        crate::network::validate(&config.network).map_err(|e| Error::Invalid(e.to_string()))?;
        for d in ["containers", "names", "run"] {
            fs::create_dir_all(data_dir.join(d)).map_err(io_err(format!("creating {}", data_dir.join(d).display())))?;
        }
        // A container's spec and bundle hold its process's environment (secrets included):
        // root only.
        use std::os::unix::fs::PermissionsExt;
        let containers = data_dir.join("containers");
        fs::set_permissions(&containers, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("making {} private", containers.display())))?;
        let images = image::Store::open(data_dir, &config)?;
        Ok(Engine { data_dir: data_dir.to_path_buf(), config, images, shim })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn images(&self) -> &image::Store {
        &self.images
    }

    pub fn paths(&self, id: &str) -> Paths {
        Paths::new(&self.data_dir, id)
    }

    /// Creates and starts a container of `image`. With `attach`, the returned [`Attach`] says
    /// when it exits.
    pub fn run(
        &self,
        image: &Image,
        image_ref: &str,
        opts: RunOptions,
        attach: bool,
    ) -> Result<(Container, Option<Attach>), Error> {
        let (c, sock) = self.create(image, image_ref, opts, false)?;
        Ok((c, attach.then_some(Attach { sock })))
    }

    /// Creates a container of `image` without starting its process (see [`Prepared`]).
    pub fn prepare(&self, image: &Image, image_ref: &str, opts: RunOptions) -> Result<Prepared, Error> {
        let (c, sock) = self.create(image, image_ref, opts, true)?;
        Ok(Prepared { id: c.id, sock })
    }

    /// Starts a prepared container's process; returns once it runs, as [`Engine::run`].
    pub fn start_prepared(&self, p: Prepared) -> Result<Container, Error> {
        use std::io::Write;
        (&p.sock).write_all(b"start\n").map_err(io_err("telling the shim to start"))?;
        let _ = p.sock.set_read_timeout(Some(Duration::from_secs(120)));
        let line = read_line(&p.sock).map_err(io_err("waiting for the shim"))?;
        if let Some(reason) = line.strip_prefix("error ") {
            return Err(Error::Start(p.id[..12].to_string(), reason.to_string()));
        }
        if !line.starts_with("started ") {
            return Err(Error::Start(p.id[..12].to_string(), format!("the shim answered {line:?} to start")));
        }
        drop(p.sock);
        self.get(&p.id)
    }

    fn create(
        &self,
        image: &Image,
        image_ref: &str,
        opts: RunOptions,
        prepare: bool,
    ) -> Result<(Container, UnixStream), Error> {
        let id = container::new_id();
        let name = match &opts.name {
            Some(n) => {
                container::validate_name(n).map_err(Error::Invalid)?;
                n.clone()
            }
            None => container::random_name(&id),
        };
        let mut spec = self.make_spec(&id, &name, image, image_ref, &opts)?;
        spec.prepare = prepare;
        self.reserve_name(&name, &id)?;
        let paths = self.paths(&id);
        let result = (|| {
            fs::create_dir_all(&paths.dir).map_err(io_err(format!("creating {}", paths.dir.display())))?;
            container::write_atomic(&paths.spec(), &serde_json::to_vec_pretty(&spec).expect("spec serialises"))
                .map_err(io_err("writing the container spec"))?;
            paths.write_state(&State::new()).map_err(io_err("writing the container state"))?;
            self.spawn_shim(&id, if prepare { "created" } else { "started " })
        })();
        match result {
            Ok(sock) => Ok((self.get(&id)?, sock)),
            Err(e) => {
                // A shim that failed has cleaned up what it took; the directory and the name are
                // ours to release. Its state says why, for `container inspect`, unless --rm.
                if spec.auto_remove || !paths.state().exists() {
                    shim_remove_dir(&paths.dir);
                    self.release_name(&name, &id);
                }
                Err(e)
            }
        }
    }

    fn make_spec(
        &self,
        id: &str,
        name: &str,
        image: &Image,
        image_ref: &str,
        opts: &RunOptions,
    ) -> Result<container::Spec, Error> {
        let cfg = &image.config;
        let (entrypoint, cmd) = match (&opts.entrypoint, &opts.cmd) {
            // `--entrypoint ""` only clears the image's Entrypoint; its Cmd still applies.
            (Some(ep), cmd) if ep.iter().all(|s| s.is_empty()) => {
                (Vec::new(), cmd.clone().or_else(|| cfg.cmd.clone()).unwrap_or_default())
            }
            // As Docker: a new entrypoint drops the image's Cmd.
            (Some(ep), cmd) => (ep.clone(), cmd.clone().unwrap_or_default()),
            (None, Some(cmd)) => (cfg.entrypoint.clone().unwrap_or_default(), cmd.clone()),
            (None, None) => (cfg.entrypoint.clone().unwrap_or_default(), cfg.cmd.clone().unwrap_or_default()),
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(Error::Invalid(format!(
                "image {image_ref} has no Entrypoint or Cmd, and no command was given"
            )));
        }
        let env = merge_env(&cfg.env, &opts.env)?;
        let stop_signal =
            opts.stop_signal.clone().or_else(|| cfg.stop_signal.clone()).unwrap_or_else(|| "SIGTERM".into());
        if parse_signal(&stop_signal).is_none() {
            return Err(Error::Invalid(format!(
                "invalid stop signal {stop_signal:?}: use a name like SIGTERM or a number"
            )));
        }
        let working_dir = opts.working_dir.clone().or_else(|| cfg.working_dir.clone()).unwrap_or_default();
        if !working_dir.is_empty() && !working_dir.starts_with('/') {
            return Err(Error::Invalid(format!("the working directory {working_dir:?} must be an absolute path")));
        }
        let mut labels = cfg.labels.clone();
        labels.extend(opts.labels.clone());
        let mounts = validate_mounts(&opts.mounts)?;
        Ok(container::Spec {
            id: id.to_string(),
            name: name.to_string(),
            image: image_ref.to_string(),
            image_id: image.id.clone(),
            layers: image.layers.clone(),
            args,
            env,
            working_dir,
            user: opts.user.clone().or_else(|| cfg.user.clone()).unwrap_or_default(),
            hostname: opts.hostname.clone().unwrap_or_else(|| id[..12].to_string()),
            memory: opts.memory,
            cpus: opts.cpus,
            pids: opts.pids,
            stop_signal: opts
                .stop_signal
                .clone()
                .or_else(|| cfg.stop_signal.clone())
                .unwrap_or_else(|| "SIGTERM".into()),
            stop_timeout_secs: opts.stop_timeout.unwrap_or(10),
            auto_remove: opts.auto_remove,
            no_new_privileges: opts.no_new_privileges,
            exposed_ports: cfg.exposed_ports.clone(),
            labels,
            network: self.config.network.clone(),
            logs: self.config.logs.clone(),
            created: crate::logs::now_rfc3339(),
            prepare: false,
            mounts,
        })
    }

    fn reserve_name(&self, name: &str, id: &str) -> Result<(), Error> {
        let path = self.data_dir.join("names").join(name);
        match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(id.as_bytes()).map_err(io_err("recording the container name"))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let owner = fs::read_to_string(&path).unwrap_or_default();
                // A name left by a container whose directory is gone (removed by a shim with
                // --rm, or by hand) is free again.
                if !owner.is_empty() && !self.paths(&owner).dir.exists() {
                    let _ = fs::remove_file(&path);
                    return self.reserve_name(name, id);
                }
                Err(Error::NameInUse(name.to_string(), owner.chars().take(12).collect()))
            }
            Err(e) => Err(Error::Io { what: "recording the container name".into(), source: e }),
        }
    }

    fn release_name(&self, name: &str, id: &str) {
        let path = self.data_dir.join("names").join(name);
        if fs::read_to_string(&path).map(|o| o == id).unwrap_or(false) {
            let _ = fs::remove_file(path);
        }
    }

    /// Spawns the shim and waits for its first line, which must start with `expect`; returns
    /// the socket.
    fn spawn_shim(&self, id: &str, expect: &str) -> Result<UnixStream, Error> {
        let (ours, theirs) = UnixStream::pair().map_err(io_err("creating the shim socket"))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&self.shim.program);
        cmd.args(&self.shim.args).arg(id).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; it runs in the forked child before exec and only
        // moves the shim's end of the socket to fd 3 (dup2 clears close-on-exec on the copy).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, crate::shim::NOTIFY_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err(format!("starting the shim {}", self.shim.program.display())))?;
        drop(theirs);
        // The shim outlives us: reap it in the background so it doesn't stay a zombie while
        // this process lives on (a server).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let _ = ours.set_read_timeout(Some(Duration::from_secs(120)));
        let line = read_line(&ours).map_err(io_err("waiting for the shim"))?;
        let line = line.as_str();
        if let Some(reason) = line.strip_prefix("error ") {
            return Err(Error::Start(id[..12].to_string(), reason.to_string()));
        }
        if !line.starts_with(expect) {
            let log = fs::read_to_string(self.paths(id).shim_log()).unwrap_or_default();
            return Err(Error::Start(
                id[..12].to_string(),
                format!("the shim exited without starting it: {}", log.trim()),
            ));
        }
        let _ = ours.set_read_timeout(None);
        Ok(ours)
    }

    /// All containers, newest first.
    pub fn list(&self) -> Result<Vec<Container>, Error> {
        let dir = self.data_dir.join("containers");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let Ok(entry) = entry else { continue };
            let id = entry.file_name().to_string_lossy().to_string();
            if id.len() != 64 {
                continue;
            }
            if let Ok(c) = self.load(&id) {
                out.push(c);
            }
        }
        out.sort_by(|a, b| b.spec.created.cmp(&a.spec.created));
        Ok(out)
    }

    fn load(&self, id: &str) -> Result<Container, Error> {
        let paths = self.paths(id);
        let spec = paths.read_spec().map_err(|_| Error::NotFound(id.to_string()))?;
        let state = paths.read_state().map_err(io_err(format!("reading the state of container {}", &id[..12])))?;
        let shim_alive = container::shim_alive(&state);
        Ok(Container { id: id.to_string(), spec, state, shim_alive })
    }

    /// A container by full id, unique id prefix, or name.
    pub fn get(&self, key: &str) -> Result<Container, Error> {
        if key.is_empty() {
            return Err(Error::NotFound(String::new()));
        }
        if let Ok(id) = fs::read_to_string(self.data_dir.join("names").join(key)) {
            if !key.contains('/') {
                if let Ok(c) = self.load(&id) {
                    return Ok(c);
                }
            }
        }
        if key.len() == 64 {
            return self.load(key);
        }
        if !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::NotFound(key.to_string()));
        }
        let dir = self.data_dir.join("containers");
        let matches: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err(format!("reading {}", dir.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.len() == 64 && n.starts_with(key))
            .collect();
        match matches.as_slice() {
            [one] => self.load(one),
            [] => Err(Error::NotFound(key.to_string())),
            _ => Err(Error::Ambiguous(key.to_string())),
        }
    }

    /// Stop = the stop signal, up to `timeout` (default: the container's), then SIGKILL.
    pub fn stop(&self, key: &str, timeout: Option<Duration>) -> Result<Container, Error> {
        let c = self.get(key)?;
        if !c.is_running() {
            self.reconcile(&c);
            return self.get(&c.id);
        }
        let timeout = timeout.unwrap_or(Duration::from_secs(c.spec.stop_timeout_secs));
        let pid = c.state.pid.map(Pid::from_raw);
        if c.state.status == Status::Paused {
            self.thaw(&c.id);
        }
        if let Some(pid) = pid {
            let sig = parse_signal(&c.spec.stop_signal).unwrap_or(Signal::SIGTERM);
            if !timeout.is_zero() {
                let _ = kill(pid, sig);
                if self.wait_stopped(&c.id, timeout) {
                    return self.finish_stop(&c.id);
                }
            }
            // Killing a pid namespace's init kills every process in it.
            let _ = kill(pid, Signal::SIGKILL);
            if !self.wait_stopped(&c.id, Duration::from_secs(10)) {
                return Err(Error::Invalid(format!("container {} did not exit after SIGKILL", c.short_id())));
            }
        }
        self.finish_stop(&c.id)
    }

    fn finish_stop(&self, id: &str) -> Result<Container, Error> {
        let c = self.get(id)?;
        self.reconcile(&c);
        self.get(id)
    }

    /// Waits until the container is not running: its shim recorded the exit, or (shim gone) its
    /// init process is gone.
    fn wait_stopped(&self, id: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            match self.load(id) {
                Ok(c) if c.shim_alive && matches!(c.state.status, Status::Exited | Status::Failed) => return true,
                Ok(c) if !c.shim_alive && !c.process_alive() => return true,
                Err(_) => return true,
                _ => {}
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A container whose shim died can't clean up after itself: do it in a helper process.
    fn reconcile(&self, c: &Container) {
        let live_state = matches!(c.state.status, Status::Created | Status::Running | Status::Paused);
        if !c.shim_alive && live_state && !c.process_alive() {
            let _ = Command::new(&self.shim.program)
                .args(&self.shim.args)
                .arg("--cleanup")
                .arg(&c.id)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
        }
    }

    /// Removes a stopped container (with `force`, stops it first with SIGKILL).
    pub fn remove(&self, key: &str, force: bool) -> Result<Container, Error> {
        self.remove_keeping(key, force, None)
    }

    /// Removes an exited container but first moves its writable layer (the overlay upper
    /// directory: exactly what its process changed) to `dest`. Builds commit RUN steps so.
    pub fn remove_taking_upper(&self, key: &str, dest: &Path) -> Result<Container, Error> {
        self.remove_keeping(key, false, Some(dest))
    }

    fn remove_keeping(&self, key: &str, force: bool, upper: Option<&Path>) -> Result<Container, Error> {
        let c = self.get(key)?;
        if c.is_running() {
            if !force {
                return Err(Error::Running(c.short_id().to_string()));
            }
            self.stop(&c.id, Some(Duration::ZERO))?;
        }
        let c = self.get(&c.id)?;
        self.reconcile(&c);
        // The shim may still be finishing (waiting for its creator to let go of the log).
        let end = Instant::now() + Duration::from_secs(5);
        while container::shim_alive(&self.paths(&c.id).read_state().unwrap_or_default()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let rootfs = self.paths(&c.id).rootfs();
        if crate::shim::is_mountpoint(&rootfs) {
            let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(dest) = upper {
            let from = self.paths(&c.id).upper();
            fs::rename(&from, dest).map_err(io_err(format!("moving {} to {}", from.display(), dest.display())))?;
        }
        shim_remove_dir(&self.paths(&c.id).dir);
        self.release_name(&c.spec.name, &c.id);
        Ok(c)
    }

    /// Image ids that containers (running or not) still use: garbage collection keeps them.
    /// Images a container uses, plus those named in `<data-dir>/gc-roots` (one image id per
    /// line: the server's revisions in service and the recent ones it may roll back to).
    pub fn images_in_use(&self) -> Result<HashSet<crate::Digest>, Error> {
        let mut used: HashSet<crate::Digest> = self.list()?.into_iter().map(|c| c.spec.image_id).collect();
        if let Ok(text) = fs::read_to_string(self.data_dir.join(GC_ROOTS)) {
            used.extend(text.lines().filter_map(|l| l.trim().parse::<crate::Digest>().ok()));
        }
        Ok(used)
    }

    pub fn gc(&self) -> Result<image::GcReport, Error> {
        let in_use = self.images_in_use()?;
        Ok(self.images.gc(&in_use)?)
    }

    /// Freezes a running container with the cgroup freezer (memory kept, no CPU).
    pub fn freeze(&self, key: &str) -> Result<(), Error> {
        let c = self.get(key)?;
        if !c.is_running() {
            return Err(Error::Invalid(format!("container {} is not running", c.short_id())));
        }
        freezer_set(&c.id, true).map_err(io_err(format!("freezing container {}", c.short_id())))?;
        self.set_status(&c.id, Status::Paused);
        Ok(())
    }

    pub fn thaw(&self, key: &str) {
        if let Ok(c) = self.get(key) {
            if freezer_set(&c.id, false).is_ok() && c.state.status == Status::Paused {
                self.set_status(&c.id, Status::Running);
            }
        }
    }

    fn set_status(&self, id: &str, status: Status) {
        let paths = self.paths(id);
        if let Ok(mut st) = paths.read_state() {
            if matches!(st.status, Status::Running | Status::Paused) {
                st.status = status;
                let _ = paths.write_state(&st);
            }
        }
    }
}

/// One line from the shim, read byte by byte, not through a BufReader: a container that exits
/// at once has its `exited` message right behind `started`, and a buffered read would swallow
/// it, leaving the attached client and the shim each waiting for the other.
fn read_line(sock: &UnixStream) -> io::Result<String> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*sock).read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => raw.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&raw).trim_end().to_string())
}

/// Whether the container's cgroup is frozen or freezing (the freezer is the truth, not
/// `state.json`, which another process may be about to change).
pub(crate) fn frozen(id: &str) -> bool {
    let rel = crate::runtime::oci::cgroups_path(id);
    if crate::shim::cgroup_v2() {
        return fs::read_to_string(format!("/sys/fs/cgroup{rel}/cgroup.freeze")).is_ok_and(|s| s.trim() == "1");
    }
    fs::read_to_string(format!("/sys/fs/cgroup/freezer{rel}/freezer.state")).is_ok_and(|s| s.trim() != "THAWED")
}

fn freezer_set(id: &str, frozen: bool) -> io::Result<()> {
    let rel = crate::runtime::oci::cgroups_path(id);
    if crate::shim::cgroup_v2() {
        return fs::write(format!("/sys/fs/cgroup{rel}/cgroup.freeze"), if frozen { "1" } else { "0" });
    }
    let path = format!("/sys/fs/cgroup/freezer{rel}/freezer.state");
    fs::write(&path, if frozen { "FROZEN" } else { "THAWED" })?;
    // The v1 freezer changes state asynchronously: wait until it settled (well under 1 ms here).
    let want = if frozen { "FROZEN" } else { "THAWED" };
    for _ in 0..2000 {
        if fs::read_to_string(&path)?.trim() == want {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("freezer did not reach {want}")))
}

fn shim_remove_dir(dir: &Path) {
    crate::shim::remove_dir(dir)
}

/// Merges `KEY=VALUE` overrides over the image's Env (same key replaced in place, new keys
/// appended) and makes sure PATH is set.
pub fn merge_env(image: &[String], overrides: &[String]) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = image.to_vec();
    for kv in overrides {
        let Some((k, _)) = kv.split_once('=') else {
            return Err(Error::Invalid(format!("invalid environment variable {kv:?}: expected KEY=VALUE")));
        };
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(Error::Invalid(format!("invalid environment variable name in {kv:?}")));
        }
        let prefix = format!("{k}=");
        match out.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(slot) => *slot = kv.clone(),
            None => out.push(kv.clone()),
        }
    }
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    Ok(out)
}

/// Checks bind mounts and returns them normalised: each destination absolute, without `..`,
/// `.` or repeated slashes, not `/` and not inside `/proc` or `/sys` (the kernel's, which the
/// runtime mounts and masks), used once; each source an existing directory, made canonical
/// (so the shim, which runs elsewhere, finds the same one, and the spec records what it is).
pub fn validate_mounts(mounts: &[Mount]) -> Result<Vec<Mount>, Error> {
    let mut out: Vec<Mount> = Vec::with_capacity(mounts.len());
    for m in mounts {
        let dest = &m.destination;
        let bad = |why: &str| Error::Invalid(format!("invalid mount destination {dest:?}: {why}"));
        if !dest.starts_with('/') {
            return Err(bad("it must be an absolute path inside the container"));
        }
        let mut parts: Vec<&str> = Vec::new();
        for part in dest.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(bad("it must not contain '..'")),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(bad("the container's root / cannot be a mount point"));
        }
        if matches!(parts[0], "proc" | "sys") {
            return Err(bad("/proc and /sys are the kernel's and cannot be mount points"));
        }
        let destination = format!("/{}", parts.join("/"));
        if out.iter().any(|o| o.destination == destination) {
            return Err(Error::Invalid(format!("two mounts have the destination {destination}")));
        }
        let src = &m.source;
        let source = match fs::canonicalize(src) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Invalid(format!("mount source {} does not exist", src.display())))
            }
            Err(e) => return Err(Error::Invalid(format!("mount source {}: {e}", src.display()))),
        };
        if !source.is_dir() {
            return Err(Error::Invalid(format!(
                "mount source {} is not a directory (only directories can be mounted)",
                src.display()
            )));
        }
        out.push(Mount { source, destination, read_only: m.read_only });
    }
    Ok(out)
}

/// `SIGTERM`, `TERM`, `15`, `sigquit`, as Docker accepts StopSignal.
pub fn parse_signal(s: &str) -> Option<Signal> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
    name.parse().ok()
}

/// Parses sizes like `64m`, `1g`, `512k`, `1048576`, `64MiB` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1u64 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        't' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    if v < 0.0 || !v.is_finite() {
        return None;
    }
    Some((v * mul as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge() {
        let image = vec!["PATH=/bin".to_string(), "A=1".into()];
        let got = merge_env(&image, &["A=2".into(), "B=x=y".into()]).unwrap();
        assert_eq!(got, vec!["PATH=/bin", "A=2", "B=x=y"]);
        assert!(merge_env(&image, &["NOEQUALS".into()]).is_err());
        assert!(merge_env(&[], &[]).unwrap()[0].starts_with("PATH="));
    }

    #[test]
    fn mounts_are_checked_and_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("data");
        fs::create_dir(&src).unwrap();
        fs::write(dir.path().join("file"), "x").unwrap();
        let m = |s: &Path, d: &str| Mount { source: s.to_path_buf(), destination: d.into(), read_only: false };
        let got = validate_mounts(&[m(&dir.path().join("data/../data/"), "//srv/./data/")]).unwrap();
        assert_eq!(got, [m(&fs::canonicalize(&src).unwrap(), "/srv/data")]);
        let cases: &[(Mount, &str)] = &[
            (m(&src, "data"), "must be an absolute path"),
            (m(&src, "/a/../etc"), "must not contain '..'"),
            (m(&src, "/"), "root / cannot be a mount point"),
            (m(&src, "/./"), "root / cannot be a mount point"),
            (m(&src, "/proc/x"), "/proc and /sys"),
            (m(&src, "/sys"), "/proc and /sys"),
            (m(&dir.path().join("nope"), "/d"), "does not exist"),
            (m(&dir.path().join("file"), "/d"), "is not a directory"),
        ];
        for (mount, want) in cases {
            let err = validate_mounts(std::slice::from_ref(mount)).unwrap_err().to_string();
            assert!(err.contains(want), "{mount:?}: {err}");
        }
        let err = validate_mounts(&[m(&src, "/d"), m(&src, "/d/")]).unwrap_err().to_string();
        assert!(err.contains("two mounts have the destination /d"), "{err}");
        // Names that only look like the kernel's are fine.
        assert!(validate_mounts(&[m(&src, "/process"), m(&src, "/system")]).is_ok());
    }

    #[test]
    fn signals_and_sizes() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("NOPE"), None);
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("lots"), None);
    }
}
