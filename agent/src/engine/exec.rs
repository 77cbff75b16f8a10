//! [`Engine::exec`]: a command inside a running container, run by a helper process
//! (`berth shim --exec ID`, [`crate::shim::exec`]) because entering namespaces is not safe in a
//! threaded caller.

use std::fs::File;
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{io_err, merge_env, Engine, Error};
use crate::container::Status;
use crate::shim::exec::Request;

/// What to run and how. The command gets the container's env with `env` merged over it, its
/// working directory and user unless given here, and stdio as chosen: with `tty` the command's
/// stdin, stdout and stderr are a new terminal inside the container (its master end is
/// [`Exec::pty`]) and the three `Stdio` fields are ignored.
#[derive(Debug)]
pub struct ExecOptions {
    pub args: Vec<String>,
    /// `KEY=VALUE`, over the container's env.
    pub env: Vec<String>,
    pub tty: bool,
    /// With `tty`: the terminal's first size (rows, columns), set before the command starts
    /// (a later change: [`Exec::resize`]).
    pub tty_size: Option<(u16, u16)>,
    /// Absolute; default: the container's working directory.
    pub working_dir: Option<String>,
    /// As `berth run --user`; default: the container's user.
    pub user: Option<String>,
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            args: Vec::new(),
            env: Vec::new(),
            tty: false,
            tty_size: None,
            working_dir: None,
            user: None,
            stdin: Stdio::null(),
            stdout: Stdio::piped(),
            stderr: Stdio::piped(),
        }
    }
}

/// A command started by [`Engine::exec`]. `child` is its helper process, which exits with the
/// command's exit code (128 + n if a signal n killed it) and passes on the signals sent to it;
/// its piped stdio (if any was asked for) is the command's. Dropping an `Exec` that was not
/// waited for kills the command.
#[derive(Debug)]
pub struct Exec {
    pub child: Child,
    /// The command's pid as the host sees it.
    pub pid: i32,
    /// With `tty`: the terminal's master end (read the output, write the input).
    pub pty: Option<File>,
    done: bool,
}

impl Exec {
    /// Waits for the command; its exit code, or 128 + the signal that killed it.
    pub fn wait(&mut self) -> io::Result<i32> {
        let st = self.child.wait()?;
        self.done = true;
        Ok(exit_code(st))
    }

    /// The exit code if the command has ended.
    pub fn try_wait(&mut self) -> io::Result<Option<i32>> {
        let st = self.child.try_wait()?;
        self.done |= st.is_some();
        Ok(st.map(exit_code))
    }

    /// Sends `sig` to the command (through its helper, whose pid stays ours until waited for,
    /// so a recycled pid is never signalled).
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        kill(Pid::from_raw(self.child.id() as i32), sig).map_err(io::Error::from)
    }

    /// Sets the terminal's size (rows, columns), which the command sees as SIGWINCH.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let Some(pty) = &self.pty else { return Ok(()) };
        rustix::termios::tcsetwinsize(
            pty,
            rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 },
        )
        .map_err(io::Error::from)
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // SIGKILL of the helper takes the command with it (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

impl Engine {
    /// Runs a command inside a running container: its namespaces (mount, pid, net, uts, ipc),
    /// cgroups, root, env, working directory, user, capabilities and seccomp profile. Returns
    /// once the command runs; an error if it could not start (exit code 126/127 for a command
    /// not executable/not found in [`Error::Exec`]). A frozen container is refused (thaw it
    /// first): a command in it could not run.
    pub fn exec(&self, key: &str, opts: ExecOptions) -> Result<Exec, Error> {
        let c = self.get(key)?;
        let short = c.short_id().to_string();
        if !c.is_running() {
            return Err(Error::Invalid(format!("container {short} is not running")));
        }
        match c.state.status {
            Status::Running if super::frozen(&c.id) => {
                return Err(Error::Invalid(format!("container {short} is frozen (paused): thaw it first")))
            }
            Status::Running => {}
            Status::Paused => {
                return Err(Error::Invalid(format!("container {short} is frozen (paused): thaw it first")))
            }
            s => return Err(Error::Invalid(format!("container {short} is {s}, not running"))),
        }
        if opts.args.is_empty() || opts.args[0].is_empty() {
            return Err(Error::Invalid("exec needs a command".into()));
        }
        merge_env(&[], &opts.env)?;
        if let Some(d) = &opts.working_dir {
            if !d.starts_with('/') {
                return Err(Error::Invalid(format!("the working directory {d:?} must be an absolute path")));
            }
        }
        let req = Request {
            args: opts.args,
            env: opts.env,
            tty: opts.tty,
            tty_size: opts.tty_size,
            working_dir: opts.working_dir,
            user: opts.user,
        };
        let (ours, theirs) = UnixStream::pair().map_err(io_err("creating the exec socket"))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&self.shim.program);
        cmd.args(&self.shim.args).arg("--exec").arg(&c.id);
        if req.tty {
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        } else {
            cmd.stdin(opts.stdin).stdout(opts.stdout).stderr(opts.stderr);
        }
        // SAFETY: dup2 is async-signal-safe; it runs in the forked child before exec and only
        // moves the helper's end of the socket to fd 3 (dup2 clears close-on-exec on the copy).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, crate::shim::NOTIFY_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child =
            cmd.spawn().map_err(io_err(format!("starting the exec helper {}", self.shim.program.display())))?;
        drop(theirs);
        let mut line = serde_json::to_vec(&req).expect("request serialises");
        line.push(b'\n');
        if let Err(e) = (&ours).write_all(&line) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Io { what: "sending the exec request".into(), source: e });
        }
        let (reply, fds) = match read_reply(&ours) {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Io { what: "waiting for the exec helper".into(), source: e });
            }
        };
        if let Some(pid) = reply.strip_prefix("started ").and_then(|p| p.trim().parse().ok()) {
            let pty = fds.into_iter().next().map(File::from);
            if req.tty && pty.is_none() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Exec {
                    code: 125,
                    reason: format!("exec in container {short}: no terminal came back"),
                });
            }
            return Ok(Exec { child, pid, pty, done: false });
        }
        let st = child.wait().ok();
        let (code, reason) = match reply.strip_prefix("error ") {
            Some(rest) => {
                let (code, msg) = rest.split_once(' ').unwrap_or(("125", rest));
                (code.parse().unwrap_or(125), msg.to_string())
            }
            None => (125, format!("the exec helper exited ({st:?}) without an answer")),
        };
        Err(Error::Exec { code, reason: format!("exec in container {short}: {reason}") })
    }
}

/// The helper's one line, and any descriptors sent with it.
fn read_reply(sock: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; 512];
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(got) = c {
                // SAFETY: descriptors received with SCM_RIGHTS are new in this process and ours.
                fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if line.contains(&b'\n') {
            break;
        }
    }
    let text = String::from_utf8_lossy(&line);
    Ok((text.lines().next().unwrap_or("").to_string(), fds))
}
