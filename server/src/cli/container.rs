//! `berth container ls|inspect|logs|stop|rm`.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use berth_agent::container::Container;
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
