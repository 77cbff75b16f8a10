//! The `berth` command line. Global options first (`--data-dir`, `--config`), then one
//! subcommand; each lives in its own file under `cli/`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod build;
mod certs;
mod client;
mod container;
mod exec;
mod git;
mod image;
mod ops;
mod run;
mod term;

use crate::config::EXIT_USAGE;

#[derive(Debug, Parser)]
#[command(name = "berth", version, about = "Berth: a single-node PaaS with its own container engine")]
pub struct Cli {
    /// Where Berth keeps images, containers and state.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = "/var/lib/berth", global = true)]
    pub data_dir: PathBuf,
    /// The TOML configuration file (default: <data-dir>/config.toml, optional).
    #[arg(long, env = "BERTH_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage images: pull, list, remove, load, push.
    #[command(subcommand)]
    Image(image::Command),
    /// Run a container from an image (pulled if missing).
    Run(Box<run::Args>),
    /// Build a Dockerfile into the image store: `berth build -t web:1 DIR`.
    Build(Box<build::Args>),
    /// Manage containers: ls, inspect, logs, exec, stop, rm.
    #[command(subcommand)]
    Container(container::Command),
    /// Run the control plane, the API and the proxy.
    Server(crate::server::Args),
    /// Deploy an image to a service (created if needed) on a running server.
    Deploy {
        #[command(flatten)]
        args: client::DeployArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// A service's builds from source: `berth builds NAME`, `berth builds NAME ID --log`.
    Builds {
        #[command(flatten)]
        args: client::BuildsArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// List the services of a running server: status, revision, instances, URL.
    Services {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Print a service's logs (all its instances, stopped ones included).
    Logs {
        #[command(flatten)]
        args: client::LogsArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Change how a service scales.
    Scale {
        #[command(flatten)]
        args: client::ScaleArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// List a service's revisions (`*`: the one serving).
    Revisions {
        name: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Put an earlier revision back in service (default: the one before the serving one).
    Rollback {
        #[command(flatten)]
        args: client::RollbackArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Show or set how a service's traffic is split between revisions: `berth traffic web 1=90 2=10`.
    Traffic {
        #[command(flatten)]
        args: ops::TrafficArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Tag a revision: it answers alone at <tag>--<name>.<domain>.
    Tag {
        #[command(flatten)]
        args: ops::TagArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Remove a tag.
    Untag {
        name: String,
        tag: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// A service's variables and secrets: `berth env NAME set K=V...`, `unset K...`, `ls`.
    Env {
        name: String,
        #[command(subcommand)]
        cmd: ops::EnvCommand,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// A service's extra host names: `berth domains NAME add|rm HOST`, `ls`.
    Domains {
        name: String,
        #[command(subcommand)]
        cmd: ops::DomainsCommand,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// API tokens: `berth tokens create NAME [--deploy SERVICE]`, `ls`, `revoke NAME`.
    Tokens {
        #[command(subcommand)]
        cmd: ops::TokensCommand,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// SSH keys allowed to git push: `berth keys add NAME FILE|-`, `ls`, `rm NAME`.
    Keys {
        #[command(subcommand)]
        cmd: git::KeysCommand,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// TLS certificates: `berth certs [ls]`, `add HOST --cert FILE --key FILE`, `rm HOST`.
    Certs {
        #[command(subcommand)]
        cmd: Option<certs::CertsCommand>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// A service's HTTPS: `berth https NAME [--redirect on|off] [--hsts 1y|off]`.
    Https {
        #[command(flatten)]
        args: certs::HttpsArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// A service's git remotes and deploy branch: `berth git NAME [--deploy-branch BRANCH]`.
    Git {
        #[command(flatten)]
        args: git::GitArgs,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Internal: the hook of Berth's git repositories (run by git during a push).
    #[command(hide = true, name = "git-hook")]
    GitHook { hook: String },
    /// Run a command in one of a service's instances; exits with the command's exit code.
    Exec {
        #[command(flatten)]
        args: exec::Args,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Delete a service: its instances stop, its route goes.
    Rm {
        name: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Internal: the per-container shim process (started by Berth itself).
    #[command(hide = true)]
    Shim {
        /// Release what a container whose shim died still holds, then exit.
        #[arg(long)]
        cleanup: bool,
        /// Run the command the engine sends on fd 3 inside the running container, then exit.
        #[arg(long, conflicts_with = "cleanup")]
        exec: bool,
        id: String,
    },
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let mut cli = cli;
    // Paths are handed to shims and to the runtime, which run elsewhere: make them absolute.
    match std::path::absolute(&cli.data_dir) {
        Ok(p) => cli.data_dir = p,
        Err(e) => {
            eprintln!("berth: --data-dir {}: {e}", cli.data_dir.display());
            return EXIT_USAGE;
        }
    }
    if cli.data_dir.exists() && !cli.data_dir.is_dir() {
        eprintln!("berth: --data-dir {}: not a directory", cli.data_dir.display());
        return EXIT_USAGE;
    }
    if let Command::Shim { exec: true, id, .. } = &cli.command {
        // No logging at all: this helper's stdio is the exec'd command's, and its failures go
        // back to the engine on its socket.
        return berth_agent::shim::exec::main(&cli.data_dir, id);
    }
    if let Command::Shim { cleanup, id, .. } = &cli.command {
        // The shim must stay single-threaded: no tokio, no logging threads. Its stderr is
        // shim.log; the container's init inherits the subscriber until it execs, when its
        // stderr is already the container's, so libcontainer's warnings about syscalls this
        // libseccomp doesn't know (skipped, harmless) must not print there.
        // The quiet directives hold whatever BERTH_LOG says (a server's BERTH_LOG reaches its
        // shims).
        // libcontainer logs from the container's init too, whose stderr is the app's: below warn
        // its lines would land in the app's log.
        let quiet = if *cleanup {
            "libcontainer=error,libcgroups=error"
        } else {
            "libcontainer=warn,libcgroups=warn,libcontainer::seccomp=error"
        };
        let filter = match std::env::var("BERTH_LOG") {
            Ok(f) if !f.trim().is_empty() => format!("{f},{quiet}"),
            _ => format!("warn,{quiet}"),
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_target(false)
            .try_init();
        return if *cleanup {
            berth_agent::shim::cleanup_main(&cli.data_dir, id)
        } else {
            berth_agent::shim::main(&cli.data_dir, id)
        };
    }
    if let Command::Server(args) = &cli.command {
        init_tracing("info");
        return crate::server::main(&cli.data_dir, cli.config.as_deref(), args);
    }
    if !matches!(
        cli.command,
        Command::Exec { .. } | Command::Image(_) | Command::Run(_) | Command::Build(_) | Command::Container(_)
    ) {
        // A client command printing into a closed pipe (`berth traffic web | head -1`) ends
        // quietly, as Unix tools do, instead of panicking in println!.
        berth_agent::engine::default_sigpipe();
    }
    let client_result = match &cli.command {
        Command::Deploy { args, conn } => Some(client::deploy(conn, &cli.data_dir, args)),
        Command::Services { conn } => Some(client::services(conn, &cli.data_dir)),
        Command::Builds { args, conn } => Some(client::builds(conn, &cli.data_dir, args)),
        Command::Logs { args, conn } => Some(client::logs(conn, &cli.data_dir, args)),
        Command::Scale { args, conn } => Some(client::scale(conn, &cli.data_dir, args)),
        Command::Rm { name, conn } => Some(client::rm(conn, &cli.data_dir, name)),
        Command::Revisions { name, conn } => Some(client::revisions(conn, &cli.data_dir, name)),
        Command::Rollback { args, conn } => Some(client::rollback(conn, &cli.data_dir, args)),
        Command::Traffic { args, conn } => Some(ops::traffic(conn, &cli.data_dir, args)),
        Command::Tag { args, conn } => Some(ops::tag(conn, &cli.data_dir, args)),
        Command::Untag { name, tag, conn } => Some(ops::untag(conn, &cli.data_dir, name, tag)),
        Command::Env { name, cmd, conn } => Some(ops::env(conn, &cli.data_dir, name, cmd)),
        Command::Tokens { cmd, conn } => Some(ops::tokens(conn, &cli.data_dir, cmd)),
        Command::Domains { name, cmd, conn } => Some(ops::domains(conn, &cli.data_dir, name, cmd)),
        Command::Exec { args, conn } => Some(exec::exec(conn, &cli.data_dir, args)),
        Command::Keys { cmd, conn } => Some(git::keys(conn, &cli.data_dir, cmd)),
        Command::Git { args, conn } => Some(git::git(conn, &cli.data_dir, args)),
        Command::Certs { cmd, conn } => Some(certs::certs(conn, &cli.data_dir, cmd.as_ref())),
        Command::Https { args, conn } => Some(certs::https(conn, &cli.data_dir, args)),
        Command::GitHook { hook } => Some(git::hook(hook)),
        _ => None,
    };
    if let Some(r) = client_result {
        init_tracing("warn");
        return match r {
            Ok(code) => code,
            Err(e) => {
                eprintln!("berth: {e:#}");
                1
            }
        };
    }
    init_tracing("warn");
    let cfg = match crate::config::load(&cli.data_dir, cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: {e}");
            return EXIT_USAGE;
        }
    };
    let engine = match open_engine(&cli, cfg) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("berth: {e}");
            return 1;
        }
    };
    let result = match cli.command {
        Command::Image(cmd) => image::run(&engine, cmd),
        Command::Run(args) => run::run(&engine, *args),
        Command::Build(args) => build::run(&engine, *args),
        Command::Container(cmd) => container::run(&engine, cmd),
        Command::Shim { .. }
        | Command::Server(_)
        | Command::Deploy { .. }
        | Command::Services { .. }
        | Command::Builds { .. }
        | Command::Logs { .. }
        | Command::Scale { .. }
        | Command::Rm { .. }
        | Command::Revisions { .. }
        | Command::Rollback { .. }
        | Command::Traffic { .. }
        | Command::Tag { .. }
        | Command::Untag { .. }
        | Command::Env { .. }
        | Command::Tokens { .. }
        | Command::Domains { .. }
        | Command::Keys { .. }
        | Command::Git { .. }
        | Command::Certs { .. }
        | Command::Https { .. }
        | Command::GitHook { .. }
        | Command::Exec { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: {e:#}");
            1
        }
    }
}

fn open_engine(cli: &Cli, cfg: berth_agent::Config) -> anyhow::Result<berth_agent::Engine> {
    open_engine_at(&cli.data_dir, cfg)
}

/// Opens the engine on `data_dir`, with this binary as its shim.
pub(crate) fn open_engine_at(
    data_dir: &std::path::Path,
    cfg: berth_agent::Config,
) -> anyhow::Result<berth_agent::Engine> {
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("finding the berth binary: {e}"))?;
    let shim = berth_agent::ShimCommand {
        program: exe,
        args: vec!["--data-dir".into(), data_dir.as_os_str().to_owned(), "shim".into()],
    };
    Ok(berth_agent::Engine::open(data_dir, cfg, shim)?)
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| default.into());
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// A tokio runtime for the commands that talk to registries.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// Prints pull progress to stderr: one line per layer event (not a live bar: output is often
/// a CI log).
pub(crate) fn progress_printer(quiet: bool) -> impl Fn(berth_agent::image::Progress) + Send + Sync {
    use berth_agent::image::Progress;
    move |p| {
        if quiet {
            return;
        }
        match p {
            Progress::Resolved { reference, digest, layers, total_size, .. } => {
                eprintln!("{reference}: resolved to {digest} ({layers} layers, {})", human_size(total_size))
            }
            Progress::LayerStarted { digest, size, .. } => {
                eprintln!("{}: downloading {}", digest.short(), human_size(size))
            }
            Progress::LayerCached { digest, .. } => eprintln!("{}: already present", digest.short()),
            Progress::LayerUnpacked { digest, .. } => eprintln!("{}: unpacked", digest.short()),
            _ => {}
        }
    }
}

pub(crate) fn human_size(n: u64) -> String {
    const U: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < U.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
