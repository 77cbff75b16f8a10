//! `berth shim --exec ID`: runs one command inside a running container, the process behind
//! [`Engine::exec`](crate::Engine::exec).
//!
//! Like the shim, this is the `berth` binary re-executed, single-threaded: entering namespaces
//! (`setns`) and forking are only sound there (../shared/WORLD.md). The engine passes a socket as
//! fd 3 and writes one JSON line, a [`Request`]. The helper
//!
//! 1. checks the container runs and is not frozen, and opens `/proc/<init>` once, so every later
//!    lookup (its namespaces, root, cgroups) is of that very process, never of a recycled pid;
//! 2. takes the process settings from the container's OCI spec (`bundle/config.json`): env, cwd,
//!    user, capabilities, `no_new_privileges`, rlimits and the seccomp profile — an exec'd
//!    command is confined exactly as the container's own process;
//! 3. opens the `cgroup.procs` files of the init's cgroups (host view), enters the init's
//!    namespaces (those the spec gives the container: pid, net, ipc, uts, mount, cgroup) and its
//!    root, and with `tty` opens a pseudo-terminal *inside* the container (its own devpts, so
//!    `tty` names it there);
//! 4. forks the command's process, moves it into the cgroups (so the freezer and limits hold
//!    before it runs), lets it finish its setup and exec, and learns whether the exec worked;
//! 5. answers `started <pid>` (with the terminal's master end as SCM_RIGHTS) or
//!    `error <code> <reason>` (code 126: not executable, 127: not found, 125: anything else);
//! 6. waits for the command, passing on SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2,
//!    and exits with its exit code (128 + n when killed by signal n).
//!
//! The command dies with this helper (`PR_SET_PDEATHSIG`), so killing the helper ends the exec.
//! The helper itself stays out of the container's cgroups: the container's teardown never waits
//! on it.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Process};
use rustix::fs::{openat, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::container::{Paths, Status};
use crate::runtime::user;

/// What the engine asks for, as one JSON line on fd 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub args: Vec<String>,
    /// `KEY=VALUE`, merged over the container's env.
    pub env: Vec<String>,
    pub tty: bool,
    /// Rows and columns of the terminal, with `tty`.
    #[serde(default)]
    pub tty_size: Option<(u16, u16)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Why the command could not start: the helper's exit code and a reason for humans.
#[derive(Debug)]
struct Failure {
    code: i32,
    msg: String,
}

fn fail(msg: impl Into<String>) -> Failure {
    Failure { code: 125, msg: msg.into() }
}

/// The signals a waiting helper passes on to the command.
const FORWARDED: [Signal; 6] =
    [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// Entry point of `berth shim --exec ID`: returns the process exit code.
pub fn main(data_dir: &Path, id: &str) -> i32 {
    if nix::sys::stat::fstat(super::NOTIFY_FD).is_err() {
        eprintln!("berth shim --exec: no request socket on fd 3 (this is started by berth itself)");
        return 125;
    }
    // SAFETY: fd 3 was set up by the engine (dup2 in pre_exec) and nothing else here owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(super::NOTIFY_FD) };
    // The command must not inherit the socket (dup2 cleared close-on-exec), nor anything else
    // the engine's process had open.
    let _ = nix::fcntl::fcntl(super::NOTIFY_FD, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    // SAFETY: close_range only closes descriptors; nothing in this fresh process uses fds >= 4.
    unsafe {
        libc::syscall(libc::SYS_close_range, super::NOTIFY_FD + 1, u32::MAX, 0);
    }
    // Out of the caller's session: a terminal's ^C reaches the command through its caller, once.
    let _ = nix::unistd::setsid();
    let req = match read_request(&mut sock) {
        Ok(r) => r,
        Err(e) => {
            tell(&sock, &format!("error 125 reading the exec request: {e}"), None);
            return 125;
        }
    };
    match run(data_dir, id, &req, &sock) {
        Ok(code) => code,
        Err(f) => {
            tell(&sock, &format!("error {} {}", f.code, f.msg.replace('\n', " ")), None);
            f.code
        }
    }
}

fn read_request(sock: &mut UnixStream) -> io::Result<Request> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match sock.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => raw.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if raw.len() > 1 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request longer than 1 MiB"));
        }
    }
    serde_json::from_slice(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One line to the engine, with `fd` attached (SCM_RIGHTS) if given.
fn tell(sock: &UnixStream, line: &str, fd: Option<&OwnedFd>) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let bytes = format!("{line}\n");
    let iov = [IoSlice::new(bytes.as_bytes())];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = fds.as_ref().map(|f| vec![ControlMessage::ScmRights(f)]).unwrap_or_default();
    let _ = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None);
}

/// The user the command runs as.
struct Ids {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

fn run(data_dir: &Path, id: &str, req: &Request, sock: &UnixStream) -> Result<i32, Failure> {
    if req.args.is_empty() {
        return Err(fail("no command given"));
    }
    let paths = Paths::new(data_dir, id);
    let short = &id[..id.len().min(12)];
    let state = paths.read_state().map_err(|e| fail(format!("reading the state of container {short}: {e}")))?;
    if state.status != Status::Running {
        return Err(fail(format!("container {short} is {}, not running", state.status)));
    }
    let pid = state.pid.ok_or_else(|| fail(format!("container {short} has no process")))?;
    // Every later lookup goes through this directory: if the init dies and its pid is reused,
    // they fail instead of entering a stranger.
    let gone = || fail(format!("container {short} is not running (its process is gone)"));
    let proc_dir =
        rustix::fs::open(format!("/proc/{pid}"), OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|_| gone())?;
    let cgroups = read_at(&proc_dir, "cgroup").map_err(|_| gone())?;
    if !cgroups.contains(&crate::runtime::oci::cgroups_path(id)) {
        return Err(gone());
    }
    if crate::engine::frozen(id) {
        return Err(fail(format!("container {short} is frozen (paused): thaw it first")));
    }

    let oci = oci_spec::runtime::Spec::load(paths.bundle().join("config.json"))
        .map_err(|e| fail(format!("reading the OCI spec of container {short}: {e}")))?;
    let process = oci.process().clone().ok_or_else(|| fail("the container's OCI spec has no process"))?;
    let linux = oci.linux().clone().ok_or_else(|| fail("the container's OCI spec has no linux section"))?;
    let spec = paths.read_spec().map_err(|e| fail(format!("reading the spec of container {short}: {e}")))?;

    let mut env = process.env().clone().unwrap_or_default();
    let ids = match &req.user {
        Some(u) => {
            let user = user::resolve(u, &paths.rootfs()).map_err(|e| fail(e.to_string()))?;
            // HOME follows the user, unless the container's config set it.
            if !spec.env.iter().any(|e| e.starts_with("HOME=")) {
                env.retain(|e| !e.starts_with("HOME="));
                env.push(format!("HOME={}", user.home));
            }
            Ids { uid: user.uid, gid: user.gid, groups: user.additional_gids }
        }
        None => {
            let u = process.user();
            Ids { uid: u.uid(), gid: u.gid(), groups: u.additional_gids().clone().unwrap_or_default() }
        }
    };
    let env = crate::engine::merge_env(&env, &req.env).map_err(|e| fail(e.to_string()))?;
    let cwd = match &req.working_dir {
        Some(d) if !d.starts_with('/') => {
            return Err(fail(format!("the working directory {d:?} must be an absolute path")))
        }
        Some(d) => d.clone(),
        None => process.cwd().display().to_string(),
    };

    // Namespaces the container has, entered in this order: mount last, as it changes what
    // paths mean.
    let mut namespaces = Vec::new();
    for ns in linux.namespaces().as_deref().unwrap_or_default() {
        let (name, flag, rank) = match ns.typ() {
            LinuxNamespaceType::User => ("user", CloneFlags::CLONE_NEWUSER, 0),
            LinuxNamespaceType::Ipc => ("ipc", CloneFlags::CLONE_NEWIPC, 1),
            LinuxNamespaceType::Uts => ("uts", CloneFlags::CLONE_NEWUTS, 2),
            LinuxNamespaceType::Network => ("net", CloneFlags::CLONE_NEWNET, 3),
            LinuxNamespaceType::Pid => ("pid", CloneFlags::CLONE_NEWPID, 4),
            LinuxNamespaceType::Cgroup => ("cgroup", CloneFlags::CLONE_NEWCGROUP, 5),
            LinuxNamespaceType::Time => ("time", CloneFlags::empty(), 6),
            LinuxNamespaceType::Mount => ("mnt", CloneFlags::CLONE_NEWNS, 7),
        };
        let fd = openat(&proc_dir, format!("ns/{name}"), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| fail(format!("opening the {name} namespace of container {short}: {e}")))?;
        namespaces.push((rank, name, flag, fd));
    }
    namespaces.sort_by_key(|n| n.0);
    let root = openat(&proc_dir, "root", OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| fail(format!("opening the root of container {short}: {e}")))?;
    // Opened now, while /sys/fs/cgroup is still the host's.
    let procs = cgroup_procs(&cgroups).map_err(|e| fail(format!("opening the cgroups of container {short}: {e}")))?;

    for (_, name, flag, fd) in &namespaces {
        nix::sched::setns(fd, *flag)
            .map_err(|e| fail(format!("entering the {name} namespace of container {short}: {e}")))?;
    }
    rustix::process::fchdir(&root).map_err(|e| fail(format!("entering the root of container {short}: {e}")))?;
    rustix::process::chroot(".").map_err(|e| fail(format!("entering the root of container {short}: {e}")))?;
    let _ = nix::unistd::chdir("/");

    let pty = if req.tty {
        let (master, slave) = open_pty(ids.uid).map_err(|e| fail(format!("allocating a terminal: {e}")))?;
        if let Some((rows, cols)) = req.tty_size {
            let size = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            rustix::termios::tcsetwinsize(&master, size)
                .map_err(|e| fail(format!("setting the terminal size: {e}")))?;
        }
        Some((master, slave))
    } else {
        None
    };
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(format!("pipe: {e}")))?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(format!("pipe: {e}")))?;
    // Blocked from before the fork, so none is lost; the command unblocks them.
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .map_err(|e| fail(format!("sigprocmask: {e}")))?;

    // SAFETY: this process is single-threaded (the re-executed binary, no runtime), so the child
    // may do anything the parent could.
    let child = match unsafe { nix::unistd::fork() }.map_err(|e| fail(format!("fork: {e}")))? {
        ForkResult::Child => {
            drop(err_r);
            drop(go_w);
            let f = command(go_r, pty.as_ref().map(|p| &p.1), &process, &linux, &ids, &cwd, &req.args, &env);
            let _ = File::from(err_w).write_all(format!("{} {}", f.code, f.msg).as_bytes());
            // SAFETY: _exit ends the child without running the parent's destructors or atexit
            // handlers twice.
            unsafe { libc::_exit(f.code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_w);
    drop(go_r);
    let master = pty.map(|(m, slave)| {
        drop(slave);
        m
    });
    // Into the container's cgroups before it runs anything of its own.
    for (path, f) in &procs {
        if let Err(e) = (&*f).write_all(child.as_raw().to_string().as_bytes()) {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            return Err(fail(format!("joining the cgroup {path} of container {short}: {e}")));
        }
    }
    let _ = File::from(go_w).write_all(b"g");
    let mut err = String::new();
    let _ = File::from(err_r).read_to_string(&mut err);
    if !err.is_empty() {
        let _ = waitpid(child, None);
        let (code, msg) = err.split_once(' ').unwrap_or(("125", err.as_str()));
        return Err(Failure { code: code.parse().unwrap_or(125), msg: msg.to_string() });
    }
    tell(sock, &format!("started {}", child.as_raw()), master.as_ref());
    drop(master);
    Ok(wait(child, &mask))
}

/// Waits for the command, passing on the forwarded signals; its exit code, or 128 + signal.
fn wait(child: Pid, mask: &SigSet) -> i32 {
    let sfd = nix::sys::signalfd::SignalFd::new(mask).ok();
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return 125,
        }
        let Some(sfd) = &sfd else {
            // No signalfd: poll.
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        };
        if let Ok(Some(info)) = sfd.read_signal() {
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                if sig != Signal::SIGCHLD {
                    let _ = nix::sys::signal::kill(child, sig);
                }
            }
        }
    }
}

/// The command's side of the fork: finishes its setup the way libcontainer sets up a container's
/// init, and execs. Returns only on failure.
#[allow(clippy::too_many_arguments)]
fn command(
    go: OwnedFd,
    tty: Option<&OwnedFd>,
    process: &Process,
    linux: &oci_spec::runtime::Linux,
    ids: &Ids,
    cwd: &str,
    args: &[String],
    env: &[String],
) -> Failure {
    // If the helper dies before this, the read below sees EOF.
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)) {
        return fail(format!("prctl(PR_SET_PDEATHSIG): {e}"));
    }
    // Wait until the parent moved us into the container's cgroups.
    let mut b = [0u8; 1];
    if !matches!(File::from(go).read(&mut b), Ok(1)) {
        return fail("the exec helper gave up");
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // Rust's runtime ignores SIGPIPE, and an ignored signal stays ignored across exec.
    // SAFETY: restoring a default disposition installs no handler.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl);
    }
    if let Err(e) = nix::unistd::setsid() {
        return fail(format!("setsid: {e}"));
    }
    if let Some(slave) = tty {
        for fd in 0..3 {
            if let Err(e) = nix::unistd::dup2(slave.as_raw_fd(), fd) {
                return fail(format!("dup2 of the terminal: {e}"));
            }
        }
        // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the terminal just put there.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return fail(format!("making the terminal the controlling one: {}", io::Error::last_os_error()));
        }
    }
    for r in process.rlimits().as_deref().unwrap_or_default() {
        let limit = rustix::process::Rlimit { current: Some(r.soft()), maximum: Some(r.hard()) };
        if let Err(e) = rustix::process::setrlimit(resource(r.typ()), limit) {
            return fail(format!("setting {:?}: {e}", r.typ()));
        }
    }
    // The directory first, as root (the user may not be able to reach it; retried after).
    let mut chdir_later = false;
    match nix::unistd::chdir(cwd) {
        Ok(()) => {}
        Err(Errno::EACCES | Errno::EPERM) => chdir_later = true,
        Err(Errno::ENOENT | Errno::ENOTDIR) => {
            return fail(format!("the working directory {cwd} does not exist in the container"))
        }
        Err(e) => return fail(format!("changing to the working directory {cwd}: {e}")),
    }
    let groups: Vec<Gid> = ids.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        return fail(format!("setting the supplementary groups: {e}"));
    }
    let nnp = process.no_new_privileges() == Some(true);
    if nnp {
        if let Err(e) = rustix::thread::set_no_new_privs(true) {
            return fail(format!("setting no_new_privileges: {e}"));
        }
    }
    // As libcontainer: without no_new_privileges, loading a filter needs CAP_SYS_ADMIN, so it
    // goes before the capabilities are dropped; with it, as late as possible.
    let seccomp = linux.seccomp().as_ref();
    if let (Some(s), false) = (seccomp, nnp) {
        if let Err(e) = libcontainer::seccomp::initialize_seccomp(s) {
            return fail(format!("loading the seccomp profile: {e}"));
        }
    }
    let syscall = libcontainer::syscall::syscall::create_syscall();
    if let Err(e) = syscall.set_id(Uid::from_raw(ids.uid), Gid::from_raw(ids.gid)) {
        return fail(format!("switching to uid {} gid {}: {e}", ids.uid, ids.gid));
    }
    if let Err(e) = libcontainer::capabilities::reset_effective(syscall.as_ref()) {
        return fail(format!("resetting the capabilities: {e}"));
    }
    if let Some(caps) = process.capabilities() {
        if let Err(e) = libcontainer::capabilities::drop_privileges(caps, syscall.as_ref()) {
            return fail(format!("dropping capabilities: {e}"));
        }
    }
    if chdir_later {
        if let Err(e) = nix::unistd::chdir(cwd) {
            return fail(format!("changing to the working directory {cwd}: {e}"));
        }
    }
    if let (Some(s), true) = (seccomp, nnp) {
        if let Err(e) = libcontainer::seccomp::initialize_seccomp(s) {
            return fail(format!("loading the seccomp profile: {e}"));
        }
    }
    exec(args, env)
}

/// execve of `args[0]`, searched in the command's own PATH when it has no slash, as execvp does.
fn exec(args: &[String], env: &[String]) -> Failure {
    let cstrings = |v: &[String]| -> Option<Vec<CString>> { v.iter().map(|s| CString::new(s.as_str()).ok()).collect() };
    let (Some(argv), Some(envp)) = (cstrings(args), cstrings(env)) else {
        return fail("the command or its environment contains a NUL byte");
    };
    let prog = &args[0];
    let describe = |e: Errno, what: &str| match e {
        Errno::ENOENT | Errno::ENOTDIR => Failure { code: 127, msg: format!("{what}: no such file or directory") },
        Errno::EACCES | Errno::EPERM => Failure { code: 126, msg: format!("{what}: permission denied") },
        Errno::ENOEXEC => Failure { code: 126, msg: format!("{what}: exec format error") },
        e => Failure { code: 126, msg: format!("{what}: {e}") },
    };
    if prog.contains('/') {
        let e = nix::unistd::execve(&argv[0], &argv, &envp).unwrap_err();
        return describe(e, &format!("{prog:?}"));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut denied: Option<Failure> = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let Ok(full) = CString::new(format!("{dir}/{prog}")) else { continue };
        match nix::unistd::execve(&full, &argv, &envp).unwrap_err() {
            Errno::ENOENT | Errno::ENOTDIR => continue,
            e => {
                denied.get_or_insert_with(|| describe(e, &format!("{dir}/{prog}")));
            }
        }
    }
    denied.unwrap_or_else(|| Failure { code: 127, msg: format!("executable {prog:?} not found in $PATH") })
}

/// A pseudo-terminal from the container's own devpts (we are in its root): (master, slave).
fn open_pty(uid: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = rustix::fs::open("/dev/ptmx", OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int through the pointer, which points at a live local.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor (or -1), which we own.
    let slave =
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // The user's own terminal, as a login would give it.
    let _ = nix::unistd::fchown(slave.as_fd().as_raw_fd(), Some(Uid::from_raw(uid)), None);
    Ok((master, slave))
}

fn read_at(dir: &OwnedFd, name: &str) -> io::Result<String> {
    let fd = openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut s = String::new();
    File::from(fd).read_to_string(&mut s)?;
    Ok(s)
}

/// The `cgroup.procs` file of each cgroup in `/proc/<pid>/cgroup`, found through the host's
/// cgroup mounts (v1 hierarchies by their controllers, the v2 one by its type).
fn cgroup_procs(cgroups: &str) -> io::Result<Vec<(String, File)>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounts: Vec<(&str, &str, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let (root, point) = (*pre.get(3)?, *pre.get(4)?);
            let (fstype, opts) = (*post.first()?, *post.get(2)?);
            matches!(fstype, "cgroup" | "cgroup2").then(|| (fstype, root, point, opts.split(',').collect()))
        })
        .collect();
    let mut out = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let found = mounts.iter().find(|(fstype, root, _, opts)| {
            let kind = if ctrls.is_empty() {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && ctrls.split(',').all(|c| opts.contains(&c))
            };
            kind && (path == *root || path.starts_with(&format!("{}/", root.trim_end_matches('/'))))
        });
        // A hierarchy not mounted here has nothing to join.
        let Some((_, root, point, _)) = found else { continue };
        let rel = path[root.trim_end_matches('/').len()..].trim_start_matches('/');
        let file = Path::new(point).join(rel).join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        out.push((file.display().to_string(), f));
    }
    Ok(out)
}

fn resource(t: PosixRlimitType) -> rustix::process::Resource {
    use rustix::process::Resource as R;
    match t {
        PosixRlimitType::RlimitCpu => R::Cpu,
        PosixRlimitType::RlimitFsize => R::Fsize,
        PosixRlimitType::RlimitData => R::Data,
        PosixRlimitType::RlimitStack => R::Stack,
        PosixRlimitType::RlimitCore => R::Core,
        PosixRlimitType::RlimitRss => R::Rss,
        PosixRlimitType::RlimitNproc => R::Nproc,
        PosixRlimitType::RlimitNofile => R::Nofile,
        PosixRlimitType::RlimitMemlock => R::Memlock,
        PosixRlimitType::RlimitAs => R::As,
        PosixRlimitType::RlimitLocks => R::Locks,
        PosixRlimitType::RlimitSigpending => R::Sigpending,
        PosixRlimitType::RlimitMsgqueue => R::Msgqueue,
        PosixRlimitType::RlimitNice => R::Nice,
        PosixRlimitType::RlimitRtprio => R::Rtprio,
        PosixRlimitType::RlimitRttime => R::Rttime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_lines_map_to_the_host_mounts() {
        // The cgroups of this test process are all mounted here, v1, v2 or hybrid alike.
        let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let files = cgroup_procs(&mine).unwrap();
        assert!(!files.is_empty(), "{mine}");
        for (path, _) in &files {
            assert!(path.starts_with("/sys/fs/cgroup") && path.ends_with("/cgroup.procs"), "{path}");
        }
    }
}
