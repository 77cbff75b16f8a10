//! `berth container ls|inspect|logs|exec|stop|rm`.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use berth_agent::container::Container;
use berth_agent::engine::{Exec, ExecOptions};
use berth_agent::logs::{self, Follower, Stream};
use berth_agent::Engine;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List containers (running ones; --all for every one).
    #[command(alias = "list", alias = "ps")]
    Ls {
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show everything about a container.
    Inspect {
        container: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a container's output.
    Logs {
        container: String,
        /// Keep following new output until the container exits.
        #[arg(short, long)]
        follow: bool,
        /// Prefix each line with its timestamp.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Run a command inside a running container; exits with the command's exit code.
    Exec(ExecArgs),
    /// Stop containers: the stop signal, then SIGKILL after the grace period.
    Stop {
        #[arg(required = true)]
        containers: Vec<String>,
        /// Seconds to wait before SIGKILL (default: the container's stop timeout).
        #[arg(short, long)]
        time: Option<u64>,
    },
    /// Remove containers.
    Rm {
        #[arg(required = true)]
        containers: Vec<String>,
        /// Kill running containers first.
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Pass stdin to the command (without it the command's stdin is empty).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (the local one goes into raw mode, its size follows).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE, or NAME to pass this one's), over the container's.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory (default: the container's).
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid; default: the container's).
    #[arg(short, long)]
    pub user: Option<String>,
    /// The container: id, id prefix or name.
    pub container: String,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn status_line(c: &Container) -> String {
    use berth_agent::container::Status;
    match c.state.status {
        Status::Running | Status::Paused | Status::Created if !c.process_alive() => "dead (shim lost)".into(),
        Status::Running if !c.shim_alive => "running (re-adopt pending)".into(),
        Status::Exited | Status::Failed => c.state.describe_exit(),
        s => s.to_string(),
    }
}

pub fn run(engine: &Engine, cmd: Command) -> Result<i32> {
    match cmd {
        Command::Ls { all, json } => {
            let list: Vec<Container> = engine.list()?.into_iter().filter(|c| all || c.is_running()).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!("{:<14} {:<24} {:<40} {:<16} STATUS", "CONTAINER ID", "NAME", "IMAGE", "IP");
            for c in &list {
                let ip = if c.is_running() {
                    c.state.ip().map(|i| i.to_string()).unwrap_or_default()
                } else {
                    String::new()
                };
                println!("{:<14} {:<24} {:<40} {:<16} {}", c.short_id(), c.spec.name, c.spec.image, ip, status_line(c));
            }
        }
        Command::Inspect { container, json } => {
            let c = engine.get(&container)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!("id:        {}", c.id);
                println!("name:      {}", c.spec.name);
                println!("image:     {} ({})", c.spec.image, c.spec.image_id);
                println!("command:   {}", serde_json::to_string(&c.spec.args)?);
                println!("status:    {}", status_line(&c));
                if let Some(pid) = c.state.pid {
                    println!("pid:       {pid}");
                }
                if let Some(ip) = c.state.ip() {
                    println!("ip:        {ip}");
                }
                if !c.spec.exposed_ports.is_empty() {
                    println!("ports:     {}", c.spec.exposed_ports.join(", "));
                }
                if let Some(t) = &c.state.started_at {
                    println!("started:   {t}");
                }
                if let Some(t) = &c.state.finished_at {
                    println!("finished:  {t}");
                }
            }
        }
        Command::Logs { container, follow, timestamps } => {
            let c = engine.get(&container)?;
            let path = engine.paths(&c.id).log();
            let stdout = std::io::stdout();
            let stderr = std::io::stderr();
            let mut emit = |l: logs::Line| {
                let mut out: Vec<u8> = Vec::new();
                if timestamps {
                    out.extend_from_slice(l.timestamp.as_bytes());
                    out.push(b' ');
                }
                out.extend_from_slice(&l.bytes);
                let _ = match l.stream {
                    Stream::Stdout => stdout.lock().write_all(&out),
                    Stream::Stderr => stderr.lock().write_all(&out),
                };
            };
            let mut follower = Follower::at_end(&path);
            for l in logs::read_all(&path, c.spec.logs.max_files)? {
                emit(l);
            }
            if follow {
                loop {
                    follower.poll(&mut emit)?;
                    let _ = stdout.lock().flush();
                    match engine.get(&c.id) {
                        Ok(now) if now.is_running() => std::thread::sleep(Duration::from_millis(100)),
                        _ => {
                            follower.poll(&mut emit)?;
                            follower.flush(&mut emit);
                            break;
                        }
                    }
                }
            }
        }
        Command::Exec(a) => return Ok(exec(engine, a)),
        Command::Stop { containers, time } => {
            let mut code = 0;
            for key in containers {
                match engine.stop(&key, time.map(Duration::from_secs)) {
                    Ok(c) => println!("{} {}", c.short_id(), status_line(&c)),
                    Err(e) => {
                        eprintln!("berth: {e}");
                        code = 1;
                    }
                }
            }
            return Ok(code);
        }
        Command::Rm { containers, force } => {
            let mut code = 0;
            for key in containers {
                match engine.remove(&key, force) {
                    Ok(c) => println!("{}", c.short_id()),
                    Err(e) => {
                        eprintln!("berth: {e}");
                        code = 1;
                    }
                }
            }
            return Ok(code);
        }
    }
    Ok(0)
}

/// `berth container exec`: the command's exit code; 125 when it could not be run (no such
/// container, not running, frozen, bad option), 126 not executable, 127 not found.
fn exec(engine: &Engine, a: ExecArgs) -> i32 {
    let env = super::run::env_pairs(&a.env);
    let opts = ExecOptions {
        args: a.command,
        env,
        tty: a.tty,
        tty_size: if a.tty { super::term::size() } else { None },
        working_dir: a.workdir,
        user: a.user,
        stdin: if a.interactive { Stdio::inherit() } else { Stdio::null() },
        stdout: Stdio::inherit(),
        stderr: Stdio::inherit(),
    };
    let mut exec = match engine.exec(&a.container, opts) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("berth: {e}");
            return match e {
                berth_agent::engine::Error::Exec { code, .. } => code,
                _ => 125,
            };
        }
    };
    let result = if a.tty {
        let raw = if a.interactive { super::term::RawMode::enter() } else { Ok(None) };
        match raw {
            Ok(raw) => {
                let r = super::term::pump(&mut LocalPty { exec: &mut exec }, a.interactive);
                drop(raw);
                r.and_then(|()| exec.wait())
            }
            Err(e) => Err(e),
        }
    } else {
        berth_agent::engine::forward_signals();
        loop {
            match exec.try_wait() {
                Ok(Some(code)) => break Ok(code),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if let Some(sig) = berth_agent::engine::take_forwarded_signal() {
                let _ = exec.signal(sig);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: exec in container {}: {e}", a.container);
            125
        }
    }
}

/// A container's terminal on this machine: the master end [`Engine::exec`] gave.
struct LocalPty<'a> {
    exec: &'a mut Exec,
}

impl LocalPty<'_> {
    fn master(&self) -> &std::fs::File {
        self.exec.pty.as_ref().expect("an exec with tty has a pty")
    }
}

impl super::term::Remote for LocalPty<'_> {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.master().as_fd()
    }
    fn pump_output(&mut self) -> std::io::Result<bool> {
        use std::io::Read;
        let mut buf = [0u8; 16 * 1024];
        match self.master().read(&mut buf) {
            Ok(0) => Ok(false),
            Ok(n) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf[..n])?;
                out.flush()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
            // A pty's master reads EIO once the last process holding the terminal is gone.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn write_input(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.master().write_all(bytes)
    }
    fn close_input(&mut self) -> std::io::Result<()> {
        // A terminal has no end of input, only its EOF character (^D), which ends a read in
        // canonical mode.
        self.master().write_all(&[4])
    }
    fn resize(&mut self, rows: u16, cols: u16) -> std::io::Result<()> {
        self.exec.resize(rows, cols)
    }
    fn signal(&mut self, sig: nix::sys::signal::Signal) -> std::io::Result<()> {
        self.exec.signal(sig)
    }
}
