//! The per-container shim: a small single-threaded process (the `berth` binary re-executed) that
//! sets a container up, drives youki's libcontainer, owns the container's stdout/stderr and log,
//! waits for it to exit, records how it ended and releases everything it took.
//!
//! Why a separate process: libcontainer forks with raw clone3, changes the caller's working
//! directory and makes it non-dumpable, which breaks a threaded server (../shared/WORLD.md). The
//! shim also makes containers independent of the server: killing Berth leaves shims and their
//! containers running, and a new Berth re-adopts them from `state.json`.
//!
//! The creator passes a socket as fd 3 and reads one line from it: `started <pid>` or
//! `error <reason>`. When the container has exited the shim writes `exited` and waits for the
//! creator to close its end (a foreground `berth run` reads the last of the log first), then,
//! for `--rm` containers, removes the container's directory.
//!
//! A prepared container (`Spec::prepare`) stops short of the exec: the shim writes `created`,
//! waits for the line `start`, then starts the process and goes on as above with `started
//! <pid>`. If the socket closes first, the container is torn down and marked failed.

pub mod exec;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::container::{self, Paths, State, Status};
use crate::logs::{self, Stream};
use crate::network::{self, Network};
use crate::runtime::{oci, user};

/// The fd on which a shim finds its creator's socket.
pub const NOTIFY_FD: i32 = 3;

/// libcontainer's state directory under the data directory.
pub fn youki_root(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

pub fn cgroup_v2() -> bool {
    // On a pure v2 system /sys/fs/cgroup itself is cgroup2 and has cgroup.controllers.
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Entry point of `berth shim ID`: returns the process exit code.
pub fn main(data_dir: &Path, id: &str) -> i32 {
    // SAFETY: fd 3 was set up by the creator (dup2 in pre_exec) and nothing else in this fresh
    // process owns it. If the creator passed nothing, fstat fails and we run without notify.
    let notify = if nix::sys::stat::fstat(NOTIFY_FD).is_ok() {
        Some(unsafe { UnixStream::from_raw_fd(NOTIFY_FD) })
    } else {
        None
    };
    // Whatever else the creator's process had open (a shell's pipes, a server's sockets) must
    // not be held for the container's lifetime: `$(berth run -d …)` would never see EOF.
    // SAFETY: close_range only closes descriptors; nothing in this fresh process uses fds >= 4.
    unsafe {
        libc::syscall(libc::SYS_close_range, NOTIFY_FD + 1, u32::MAX, 0);
    }
    let _ = nix::unistd::setsid();
    // SAFETY: ignoring SIGPIPE is process-wide and this process is single-threaded; a creator
    // that went away must not kill the shim when it writes the exit notice.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let paths = Paths::new(data_dir, id);
    redirect_stdio(&paths.shim_log());
    let mut shim = Shim { data_dir: data_dir.to_path_buf(), id: id.to_string(), paths, notify, state: State::new() };
    match shim.run() {
        Ok(()) => 0,
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!("shim: {msg}");
            1
        }
    }
}

fn redirect_stdio(log: &Path) {
    let null = File::open("/dev/null").ok();
    let log = OpenOptions::new().create(true).append(true).open(log).ok();
    if let Some(null) = &null {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    if let Some(log) = &log {
        let _ = nix::unistd::dup2(log.as_raw_fd(), 1);
        let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    }
}

struct Shim {
    data_dir: PathBuf,
    id: String,
    paths: Paths,
    notify: Option<UnixStream>,
    state: State,
}

/// What setup took, so a failure half way releases exactly that.
#[derive(Default)]
struct Taken {
    mounted: bool,
    ip: Option<std::net::Ipv4Addr>,
    attachment: Option<network::Attachment>,
    created: bool,
}

impl Shim {
    fn run(&mut self) -> Result<()> {
        let spec = self.paths.read_spec().with_context(|| format!("reading the spec of container {}", self.id))?;
        let me = std::process::id() as i32;
        self.state.shim_pid = Some(me);
        self.state.shim_start = container::process_start_time(me);
        self.save();

        let mut taken = Taken::default();
        let started = self.setup(&spec, &mut taken);
        let (mut container, out_r, err_r) = match started {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("{e:#}");
                self.teardown(&spec, &mut taken);
                if let Ok(mut w) = logs::Writer::open(&self.paths.log(), spec.logs.max_size, spec.logs.max_files) {
                    let _ = w.note(&format!("container failed to start: {msg}"));
                }
                self.state.status = Status::Failed;
                self.state.error = Some(msg.clone());
                self.state.finished_at = Some(logs::now_rfc3339());
                self.save();
                self.tell(&format!("error {}", msg.replace('\n', " ")));
                return Err(e);
            }
        };
        let pid = container.pid().context("libcontainer reported no pid for the started container")?;
        self.state.pid = Some(pid.as_raw());
        self.state.status = Status::Running;
        self.state.started_at = Some(logs::now_rfc3339());
        self.save();
        self.tell(&format!("started {}", pid.as_raw()));

        let status = self.pump(&spec, pid, out_r, err_r);
        self.state.finished_at = Some(logs::now_rfc3339());
        self.state.oom_killed = oom_kills(&spec.id) > 0;
        match status {
            WaitStatus::Exited(_, code) => self.state.exit_code = Some(code),
            WaitStatus::Signaled(_, sig, _) => {
                self.state.exit_code = Some(128 + sig as i32);
                self.state.signal = Some(sig.as_str().to_string());
            }
            other => self.state.error = Some(format!("unexpected wait status {other:?}")),
        }
        if self.state.oom_killed {
            if let Ok(mut w) = logs::Writer::open(&self.paths.log(), spec.logs.max_size, spec.logs.max_files) {
                let _ = w.note("container was killed by the kernel: out of memory (OOM)");
            }
        }
        // Report the exit before releasing resources: a foreground `berth run` returns as soon
        // as the process is gone; teardown (cgroups, netns, mount) goes on behind it, and
        // `remove` waits for this shim to finish before deleting the directory.
        self.state.status = Status::Exited;
        self.save();
        let code = self.state.exit_code.unwrap_or(-1);
        self.tell(&format!("exited {code}"));
        let t0 = Instant::now();
        if let Err(e) = container.delete(true) {
            tracing::warn!("deleting container {}: {e}", self.id);
        }
        taken.created = false;
        release_local(&self.data_dir, &self.id, false, taken.mounted);
        taken.mounted = false;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "runtime deleted, root unmounted");
        // Wait for the creator to be done with the log (it closes its end, or it died).
        if let Some(n) = self.notify.as_mut() {
            let mut b = [0u8; 64];
            while matches!(n.read(&mut b), Ok(k) if k > 0) {}
        }
        if spec.auto_remove {
            remove_dir(&self.paths.dir);
            let name = self.data_dir.join("names").join(&spec.name);
            if fs::read_to_string(&name).map(|owner| owner == self.id).unwrap_or(false) {
                let _ = fs::remove_file(name);
            }
        }
        // The network goes last: deleting a veth waits for the kernel (10-20 ms here), and a
        // `berth run --rm` client, which returns once the directory is gone, need not wait for
        // it. `remove` waits for this shim to exit, so it never returns before this is done.
        release_network(&self.data_dir, &self.id, &spec, taken.attachment.take(), taken.ip.take());
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "torn down");
        Ok(())
    }

    fn save(&self) {
        if let Err(e) = self.paths.write_state(&self.state) {
            tracing::error!("shim: writing state: {e}");
        }
    }

    /// One line from the creator on the notify socket; None at EOF.
    fn read_command(&mut self) -> Option<String> {
        let n = self.notify.as_mut()?;
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match n.read(&mut byte) {
                Ok(0) => return None,
                Ok(_) if byte[0] == b'\n' => return Some(String::from_utf8_lossy(&raw).into_owned()),
                Ok(_) => raw.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }

    fn tell(&mut self, line: &str) {
        if let Some(n) = self.notify.as_mut() {
            let _ = n.write_all(format!("{line}\n").as_bytes());
        }
    }

    fn setup(
        &mut self,
        spec: &container::Spec,
        taken: &mut Taken,
    ) -> Result<(libcontainer::container::Container, OwnedFd, OwnedFd)> {
        let p = &self.paths;
        for d in [p.rootfs(), p.upper(), p.work(), p.bundle()] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let t0 = Instant::now();
        mount_overlay(&self.data_dir, spec, p)?;
        taken.mounted = true;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "overlay mounted");

        let user = user::resolve(&spec.user, &p.rootfs()).context("resolving the image's user")?;
        if !spec.working_dir.is_empty() {
            // As Docker: a working directory missing from the image is created (owned by root).
            make_dir_in_root(&p.rootfs(), &spec.working_dir)
                .with_context(|| format!("creating the working directory {}", spec.working_dir))?;
        }
        for m in &spec.mounts {
            // A prepared container starts long after the engine checked the source.
            if !m.source.is_dir() {
                bail!("mount source {} is not a directory any more", m.source.display());
            }
            // Created here, inside the root (a link in the image resolves inside it, never to
            // the host), so that a bad destination fails with its name before the runtime runs.
            make_dir_in_root(&p.rootfs(), &m.destination)
                .with_context(|| format!("creating the mount point {} in the container", m.destination))?;
        }

        let net = Network::new(&spec.network, &self.data_dir.join("network"))?;
        net.ensure_bridge()?;
        let ip = net.allocate(&self.id)?;
        taken.ip = Some(ip);
        let att = net.attach(&self.id, ip)?;
        taken.attachment = Some(att.clone());
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "network attached");
        self.state.network = Some(att.clone());
        self.save();

        fs::write(p.dir.join("hostname"), format!("{}\n", spec.hostname)).context("writing /etc/hostname")?;
        fs::write(
            p.dir.join("hosts"),
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\n{ip}\t{}\n",
                spec.hostname
            ),
        )
        .context("writing /etc/hosts")?;
        fs::write(p.dir.join("resolv.conf"), network::resolv_conf(&spec.network))
            .context("writing /etc/resolv.conf")?;

        let oci_spec = oci::build(spec, p, &user, &att.netns_path(), cgroup_v2())?;
        oci_spec.save(p.bundle().join("config.json")).context("writing the OCI spec")?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "spec written");

        let (out_r, out_w) = nix::unistd::pipe().context("creating the stdout pipe")?;
        let (err_r, err_w) = nix::unistd::pipe().context("creating the stderr pipe")?;
        let null: OwnedFd = File::open("/dev/null").context("opening /dev/null")?.into();
        taken.created = true;
        let mut c = libcontainer::container::builder::ContainerBuilder::new(
            self.id.clone(),
            libcontainer::syscall::syscall::SyscallType::default(),
        )
        .with_root_path(youki_root(&self.data_dir))
        .context("setting the runtime's state directory")?
        .with_stdin(null)
        .with_stdout(out_w)
        .with_stderr(err_w)
        .as_init(p.bundle())
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| anyhow::anyhow!("{}", runtime_reason(&e.to_string())))?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "container created");
        if spec.prepare {
            // Prepared: everything is in place but the process's exec. Wait for the creator's
            // `start`; if its socket closes first (it evicted us, or it died), give up, and the
            // error path releases what was taken.
            self.tell("created");
            if self.read_command().as_deref() != Some("start") {
                anyhow::bail!("the prepared container was abandoned before it started");
            }
            tracing::debug!("prepared container told to start");
        }
        c.start().map_err(|e| anyhow::anyhow!("starting the container process: {}", runtime_reason(&e.to_string())))?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "container started");
        Ok((c, out_r, err_r))
    }

    /// Copies the container's output into its log until the init process exits, then drains
    /// what is left (for at most a second: a process that escaped the pid namespace cannot keep
    /// the shim alive forever).
    fn pump(&mut self, spec: &container::Spec, pid: Pid, out_r: OwnedFd, err_r: OwnedFd) -> WaitStatus {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut log = logs::Writer::open(&self.paths.log(), spec.logs.max_size, spec.logs.max_files).ok();
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid.as_raw()).expect("pid > 0"),
            rustix::process::PidfdFlags::empty(),
        )
        .ok();
        let mut open = [Some(out_r), Some(err_r)];
        let mut buf = vec![0u8; 64 * 1024];
        let mut exited: Option<WaitStatus> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            if exited.is_none() {
                if let Some(st) = reap(pid) {
                    exited = Some(st);
                    deadline = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            if open.iter().all(|o| o.is_none()) {
                if let Some(st) = exited {
                    break finish(log, st);
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break finish(log, exited.expect("deadline set on exit"));
            }
            let mut fds = Vec::new();
            let mut which = Vec::new();
            for (i, o) in open.iter().enumerate() {
                if let Some(fd) = o {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    which.push(Some(i));
                }
            }
            if exited.is_none() {
                if let Some(pfd) = &pidfd {
                    fds.push(PollFd::new(pfd.as_fd(), PollFlags::POLLIN));
                    which.push(None);
                }
            }
            let timeout = if pidfd.is_none() || exited.is_some() { 50u16 } else { 10_000 };
            if poll(&mut fds, PollTimeout::from(timeout)).is_err() {
                continue;
            }
            let ready: Vec<(Option<usize>, bool)> =
                fds.iter().zip(&which).map(|(f, w)| (*w, f.revents().is_some_and(|r| !r.is_empty()))).collect();
            drop(fds);
            for (w, is_ready) in ready {
                let Some(i) = w else { continue };
                if !is_ready {
                    continue;
                }
                let stream = if i == 0 { Stream::Stdout } else { Stream::Stderr };
                let fd = open[i].as_ref().expect("open fd");
                match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                    Ok(0) | Err(_) => {
                        if let Some(l) = log.as_mut() {
                            let _ = l.finish(stream);
                        }
                        open[i] = None;
                    }
                    Ok(n) => {
                        if let Some(l) = log.as_mut() {
                            let _ = l.feed(stream, &buf[..n]);
                        }
                    }
                }
            }
        }
    }

    fn teardown(&mut self, spec: &container::Spec, taken: &mut Taken) {
        teardown(
            &self.data_dir,
            &self.id,
            spec,
            taken.created,
            taken.attachment.take(),
            taken.ip.take(),
            taken.mounted,
        );
        taken.mounted = false;
    }
}

fn finish(mut log: Option<logs::Writer>, st: WaitStatus) -> WaitStatus {
    if let Some(l) = log.as_mut() {
        let _ = l.finish(Stream::Stdout);
        let _ = l.finish(Stream::Stderr);
    }
    st
}

/// Reaps the container's init if it exited; also reaps any other child (the runtime's helpers).
fn reap(pid: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(st) => {
                if st.pid() == Some(pid) {
                    found = Some(st);
                }
            }
        }
    }
}

fn mount_overlay(data_dir: &Path, spec: &container::Spec, p: &Paths) -> Result<()> {
    let mut lower: Vec<String> = spec.layers.iter().rev().map(|l| l.display().to_string()).collect();
    if lower.is_empty() {
        // overlayfs needs at least one lower layer; an image without layers gets an empty one.
        let empty = data_dir.join("layers").join("empty");
        fs::create_dir_all(&empty).context("creating the empty layer")?;
        lower.push(empty.display().to_string());
    }
    for l in &lower {
        if l.contains(',') || l.contains(':') {
            bail!("layer path {l:?} contains ',' or ':', which overlayfs options cannot carry");
        }
    }
    // `volatile`: no syncs of the upper layer. A container's writable layer does not outlive a
    // machine crash anyway (the container is gone), and without it the unmount of an overlay
    // syncs the whole filesystem, which costs ~100 ms on this machine's disk.
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},volatile",
        lower.join(":"),
        p.upper().display(),
        p.work().display()
    );
    if opts.len() >= 4096 {
        bail!(
            "the overlay mount options for {} layers are longer than a page ({} bytes); use a shorter --data-dir",
            lower.len(),
            opts.len()
        );
    }
    // No redirects and no metadata-only copy-ups, whatever the kernel's defaults: the upper
    // directory must be a plain diff (builds turn it into a layer). Kernels that do not know
    // the options get the mount without them.
    let strict = format!("{opts},redirect_dir=off,metacopy=off");
    let mount = |o: &str| {
        nix::mount::mount(Some("overlay"), &p.rootfs(), Some("overlay"), nix::mount::MsFlags::empty(), Some(o))
    };
    match mount(&strict) {
        Err(nix::errno::Errno::EINVAL) => mount(&opts),
        r => r,
    }
    .with_context(|| format!("mounting the overlay root filesystem at {}", p.rootfs().display()))
}

/// The useful part of libcontainer's nested error ("failed to create container: exec process
/// failed with error error in executing process : executable 'x' not found in $PATH").
pub fn runtime_reason(msg: &str) -> String {
    let tail = msg.rsplit(" : ").next().unwrap_or(msg).trim();
    tail.strip_prefix("error in executing process").map(str::trim).unwrap_or(tail).to_string()
}

/// Creates `dir` (absolute, inside the container) and its missing parents under `root`,
/// resolving every component inside the root, as the container would see it: a symlink in the
/// image (absolute or with `..`) is followed within the root, never to the host, and what its
/// target lacks is created there too.
fn make_dir_in_root(root: &Path, dir: &str) -> Result<()> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStrExt;

    use rustix::fs::{mkdirat, openat, readlinkat, Mode, OFlags};
    if Path::new(dir).components().any(|c| c == std::path::Component::ParentDir) {
        bail!("{dir:?} must not contain '..'");
    }
    let open_dir = |at: &OwnedFd, name: &std::ffi::OsStr| {
        openat(at, name, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
    };
    let root_fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    // The directories from the root down to the current one; `..` pops, never past the root.
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut todo: VecDeque<OsString> =
        dir.split('/').filter(|c| !c.is_empty() && *c != ".").map(OsString::from).collect();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            stack.pop();
            continue;
        }
        let cur = stack.last().unwrap_or(&root_fd);
        match mkdirat(cur, name.as_os_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        match open_dir(cur, name.as_os_str()) {
            Ok(fd) => stack.push(fd),
            // O_NOFOLLOW on a symlink: follow it by hand, inside the root.
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                let target = match readlinkat(cur, name.as_os_str(), Vec::new()) {
                    Ok(t) => t,
                    Err(rustix::io::Errno::INVAL) => bail!("{} is not a directory", name.to_string_lossy()),
                    Err(e) => return Err(e.into()),
                };
                links += 1;
                if links > 40 {
                    bail!("too many levels of symbolic links");
                }
                let target = target.as_bytes();
                if target.starts_with(b"/") {
                    stack.clear();
                }
                for part in target.split(|b| *b == b'/').rev() {
                    if !part.is_empty() && part != b"." {
                        todo.push_front(OsString::from(std::ffi::OsStr::from_bytes(part)));
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Number of OOM kills in the container's memory cgroup.
fn oom_kills(id: &str) -> u64 {
    let (file, key) = if cgroup_v2() {
        (format!("/sys/fs/cgroup{}/memory.events", oci::cgroups_path(id)), "oom_kill")
    } else {
        (format!("/sys/fs/cgroup/memory{}/memory.oom_control", oci::cgroups_path(id)), "oom_kill")
    };
    fs::read_to_string(file)
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// Releases what a container holds. Every step tolerates a missing piece, so this is safe after
/// a half-done setup, a crash, or twice.
pub fn teardown(
    data_dir: &Path,
    id: &str,
    spec: &container::Spec,
    created: bool,
    attachment: Option<network::Attachment>,
    ip: Option<std::net::Ipv4Addr>,
    mounted: bool,
) {
    release_local(data_dir, id, created, mounted);
    release_network(data_dir, id, spec, attachment, ip);
}

/// The runtime's state and cgroups, and the root filesystem's mount.
fn release_local(data_dir: &Path, id: &str, created: bool, mounted: bool) {
    let youki_dir = youki_root(data_dir).join(id);
    if created || youki_dir.exists() {
        match libcontainer::container::Container::load(youki_dir.clone()) {
            Ok(mut c) => {
                if let Err(e) = c.delete(true) {
                    tracing::warn!("deleting container {id} in the runtime: {e}");
                }
            }
            Err(_) => {
                let _ = fs::remove_dir_all(&youki_dir);
            }
        }
    }
    remove_cgroups(id);
    let rootfs = Paths::new(data_dir, id).rootfs();
    if mounted || is_mountpoint(&rootfs) {
        if let Err(e) = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", rootfs.display());
        }
    }
}

/// The namespace, the veth and the address.
fn release_network(
    data_dir: &Path,
    id: &str,
    spec: &container::Spec,
    attachment: Option<network::Attachment>,
    ip: Option<std::net::Ipv4Addr>,
) {
    if let Some(att) = &attachment {
        network::detach(att);
    }
    if let (Some(ip), Ok(net)) =
        (ip.or(attachment.as_ref().map(|a| a.ip)), Network::new(&spec.network, &data_dir.join("network")))
    {
        net.release(ip, id);
    }
}

/// Removes the container's cgroups if the runtime left any (it does when its state is gone).
fn remove_cgroups(id: &str) {
    let rel = oci::cgroups_path(id);
    if cgroup_v2() {
        let _ = fs::remove_dir(format!("/sys/fs/cgroup{rel}"));
        return;
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let _ = fs::remove_dir(e.path().join(rel.trim_start_matches('/')));
        }
    }
}

pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.display().to_string();
    text.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Removes a container directory; the overlay work dir may hold a `work` subdirectory with mode
/// 000 that remove_dir_all handles as root.
pub fn remove_dir(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// Entry point of `berth shim --cleanup ID`: releases what a container whose shim died still
/// holds (run in its own process for the same reason as the shim).
pub fn cleanup_main(data_dir: &Path, id: &str) -> i32 {
    let paths = Paths::new(data_dir, id);
    let Ok(spec) = paths.read_spec() else { return 1 };
    let mut state = paths.read_state().unwrap_or_default();
    teardown(data_dir, id, &spec, true, state.network.clone(), state.ip(), true);
    if matches!(state.status, Status::Created | Status::Running | Status::Paused) {
        state.status = Status::Exited;
        state.finished_at.get_or_insert_with(logs::now_rfc3339);
        state.error.get_or_insert_with(|| "the container's shim died; the container was cleaned up".into());
        let _ = paths.write_state(&state);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_are_made_inside_the_root_through_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::os::unix::fs::symlink(outside.path(), r.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../c", r.join("rel")).unwrap();
        fs::write(r.join("file"), "x").unwrap();
        make_dir_in_root(r, "/abs/sub").unwrap();
        assert!(r.join(outside.path().strip_prefix("/").unwrap()).join("sub").is_dir());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "nothing made outside the root");
        make_dir_in_root(r, "//rel/./q/").unwrap();
        assert!(r.join("c/q").is_dir(), "'..' in a link stops at the root");
        make_dir_in_root(r, "/plain/dir").unwrap();
        assert!(r.join("plain/dir").is_dir());
        let err = make_dir_in_root(r, "/file/q").unwrap_err().to_string();
        assert!(err.contains("file is not a directory"), "{err}");
        assert!(make_dir_in_root(r, "/a/../b").unwrap_err().to_string().contains("'..'"));
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(make_dir_in_root(r, "/loop/x").unwrap_err().to_string().contains("too many levels"));
    }
}
