//! `berth run [-d] [--name N] [--env K=V]... [-v HOST:CONTAINER[:ro]]... [--memory 64m] [--rm] REF
//! [-- CMD ARGS...]`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Result};
use berth_agent::container::Status;
use berth_agent::engine::{parse_size, Mount, RunOptions};
use berth_agent::logs::{Follower, Stream};
use berth_agent::reference::Reference;
use berth_agent::Engine;

use super::{progress_printer, runtime};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run in the background and print the container id.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable (KEY=VALUE), over the image's.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Memory limit (e.g. 64m, 1g); past it the kernel OOM-kills the container.
    #[arg(short, long)]
    pub memory: Option<String>,
    /// CPU limit in cores (e.g. 0.5).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Override the image's Entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid) inside the container.
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// Signal that stops the container (default: the image's StopSignal, else SIGTERM).
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL.
    #[arg(long)]
    pub stop_timeout: Option<u64>,
    /// Set the no_new_privileges bit (setuid binaries no longer raise privileges).
    #[arg(long)]
    pub no_new_privileges: bool,
    /// A label (KEY=VALUE).
    #[arg(short, long = "label", value_name = "K=V")]
    pub label: Vec<String>,
    /// Bind-mount a host directory into the container (`:ro` read-only); HOST is an absolute
    /// path or one starting with `./`, CONTAINER an absolute path (created if missing).
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volume: Vec<String>,
    /// Print no pull progress.
    #[arg(short, long)]
    pub quiet: bool,
    /// The image reference.
    pub image: String,
    /// Command and arguments, replacing the image's Cmd.
    #[arg(last = false, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Runs `berth run`. As Docker, any failure before the container's process runs (bad option,
/// bad reference, failed pull) exits with 125.
pub fn run(engine: &Engine, a: Args) -> Result<i32> {
    match run_inner(engine, a) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("berth: {e:#}");
            Ok(125)
        }
    }
}

fn run_inner(engine: &Engine, a: Args) -> Result<i32> {
    let reference: Reference = a.image.parse()?;
    let memory = match &a.memory {
        Some(m) => match parse_size(m) {
            Some(v) if v >= 6 << 20 => Some(v),
            Some(_) => bail!("--memory {m}: the minimum is 6m"),
            None => bail!("--memory {m:?}: expected a size like 64m or 1g"),
        },
        None => None,
    };
    let mut labels = BTreeMap::new();
    for l in &a.label {
        let Some((k, v)) = l.split_once('=') else { bail!("--label {l:?}: expected KEY=VALUE") };
        labels.insert(k.to_string(), v.to_string());
    }
    let env = env_pairs(&a.env);
    let mounts = a.volume.iter().map(|v| parse_volume(v)).collect::<Result<Vec<_>>>()?;
    if let Some(c) = a.cpus {
        let max = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        if !(0.01..=max).contains(&c) {
            bail!("--cpus {c}: the range is 0.01 to {max} (the cores of this machine)");
        }
    }
    // Options are checked before anything is pulled: a typo fails at once.
    let image = match engine.images().get(&a.image) {
        Ok(img) => img,
        Err(_) => runtime().block_on(engine.images().pull(&reference, &progress_printer(a.quiet)))?,
    };
    let opts = RunOptions {
        name: a.name.clone(),
        entrypoint: a.entrypoint.as_ref().map(|e| vec![e.clone()]),
        cmd: if a.command.is_empty() { None } else { Some(a.command.clone()) },
        env,
        working_dir: a.workdir.clone(),
        user: a.user.clone(),
        hostname: a.hostname.clone(),
        memory,
        cpus: a.cpus,
        pids: a.pids_limit,
        stop_signal: a.stop_signal.clone(),
        stop_timeout: a.stop_timeout,
        auto_remove: a.rm,
        no_new_privileges: a.no_new_privileges,
        labels,
        mounts,
    };
    let (c, attach) = match engine.run(&image, &reference.to_string(), opts, !a.detach) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("berth: {e}");
            // As Docker: 127 when the command was not found, 126 when it could not be
            // executed, 125 when the container could not be created or started otherwise.
            let msg = e.to_string();
            return Ok(if msg.contains("not found in $PATH") || msg.contains("No such file") {
                127
            } else if msg.contains("does not have correct permissions") || msg.contains("ermission denied") {
                126
            } else {
                125
            });
        }
    };
    if a.detach {
        println!("{}", c.id);
        return Ok(0);
    }
    let mut attach = attach.expect("attached run");
    // Ctrl-C and friends go to the container, not to this client (Docker's --sig-proxy).
    berth_agent::engine::forward_signals();
    let pid = c.state.pid;
    let log = engine.paths(&c.id).log();
    let mut follower = Follower::from_start(&log);
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut emit = |l: berth_agent::logs::Line| {
        let _ = match l.stream {
            Stream::Stdout => stdout.lock().write_all(&l.bytes),
            Stream::Stderr => stderr.lock().write_all(&l.bytes),
        };
    };
    attach.wait(Duration::from_millis(50), || {
        if let (Some(sig), Some(pid)) = (berth_agent::engine::take_forwarded_signal(), pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
        let _ = follower.poll(&mut emit);
    });
    let _ = follower.poll(&mut emit);
    follower.flush(&mut emit);
    let _ = stdout.lock().flush();
    let state = engine.paths(&c.id).read_state()?;
    drop(attach);
    if a.rm {
        // As `docker run --rm`: return once the container is gone (its shim removes it after
        // releasing mounts, network and cgroups), so what follows sees it removed.
        let dir = engine.paths(&c.id).dir;
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while dir.exists() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(match state.status {
        Status::Failed => 125,
        _ => state.exit_code.unwrap_or(0),
    })
}

/// `HOST:CONTAINER[:ro|:rw]`, as Docker's `-v` for a host directory (named volumes do not exist
/// here). The engine checks the paths themselves.
fn parse_volume(v: &str) -> Result<Mount> {
    let parts: Vec<&str> = v.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, o] => bail!("--volume {v:?}: unknown option {o:?} (use ro or rw)"),
        _ => bail!("--volume {v:?}: expected HOST:CONTAINER or HOST:CONTAINER:ro"),
    };
    if host.is_empty() || container.is_empty() {
        bail!("--volume {v:?}: expected HOST:CONTAINER or HOST:CONTAINER:ro");
    }
    if !host.starts_with('/') && !host.starts_with('.') {
        bail!("--volume {v:?}: {host:?} is not a path; named volumes are not supported, give a host directory (absolute, or starting with ./)");
    }
    Ok(Mount { source: host.into(), destination: container.to_string(), read_only })
}

/// `--env` values as `K=V`: as Docker, a bare `NAME` passes this process's value of NAME
/// (nothing if it is unset). Shared by `berth run` and `berth container exec`.
pub(super) fn env_pairs(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|kv| {
            if kv.contains('=') {
                Some(kv.clone())
            } else {
                std::env::var(kv).ok().map(|v| format!("{kv}={v}"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_syntax() {
        let m = |s: &str, d: &str, ro: bool| Mount { source: s.into(), destination: d.into(), read_only: ro };
        assert_eq!(parse_volume("/srv/data:/data").unwrap(), m("/srv/data", "/data", false));
        assert_eq!(parse_volume("./d:/data:ro").unwrap(), m("./d", "/data", true));
        assert_eq!(parse_volume("/d:/data:rw").unwrap(), m("/d", "/data", false));
        for (bad, want) in [
            ("/d", "expected HOST:CONTAINER"),
            ("/d:/e:ro:x", "expected HOST:CONTAINER"),
            ("/d:/e:rx", "unknown option \"rx\""),
            (":/e", "expected HOST:CONTAINER"),
            ("data:/e", "named volumes are not supported"),
        ] {
            let err = parse_volume(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
