//! `berth build`: builds a Dockerfile into the local image store, printing each step.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use berth_agent::build;
use berth_agent::reference::Reference;
use berth_agent::Engine;

use super::runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Name the image (repeatable): `-t web:1`.
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// A build argument: `--build-arg VERSION=1.2` (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// The stage to build (default: the last).
    #[arg(long)]
    pub target: Option<String>,
    /// The Dockerfile (default: DIR/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Build every step again, ignoring the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Pull FROM images even when the store has them.
    #[arg(long)]
    pub pull: bool,
    /// Memory limit of each RUN step: `512m`, `2g`.
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit of each RUN step: `1.5`.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// A secret for `RUN --mount=type=secret`: `--secret id=npmrc,src=/home/me/.npmrc`.
    #[arg(long = "secret", value_name = "id=ID,src=FILE")]
    pub secrets: Vec<String>,
    /// Print only the image id.
    #[arg(short, long)]
    pub quiet: bool,
    /// The build context.
    pub dir: PathBuf,
}

/// `KEY=VALUE` pairs; a bare `KEY` takes the value of the environment variable (as Docker).
pub fn parse_build_args(list: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in list {
        match a.split_once('=') {
            Some(("", _)) => bail!("--build-arg {a:?}: the name is empty"),
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    out.insert(a.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

fn parse_secret(s: &str) -> Result<(String, PathBuf)> {
    let (mut id, mut src) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            _ => bail!("--secret {s:?}: expected id=ID,src=FILE"),
        }
    }
    match (id, src) {
        (Some(id), Some(src)) if !id.is_empty() => Ok((id, src)),
        _ => bail!("--secret {s:?}: expected id=ID,src=FILE"),
    }
}

pub fn run(engine: &Engine, a: Args) -> Result<i32> {
    let tags = a
        .tags
        .iter()
        .map(|t| t.parse::<Reference>().map_err(|e| anyhow::anyhow!("-t {t:?}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let memory = match &a.memory {
        Some(m) => Some(
            berth_agent::engine::parse_size(m)
                .ok_or_else(|| anyhow::anyhow!("--memory {m:?}: give a size such as 512m or 2g"))?,
        ),
        None => None,
    };
    if let Some(c) = a.cpus {
        if !(c > 0.0 && c.is_finite()) {
            bail!("--cpus {c}: give a positive number");
        }
    }
    let opts = build::Options {
        context: a.dir.clone(),
        dockerfile: a.file.clone(),
        tags,
        build_args: parse_build_args(&a.build_args)?,
        target: a.target.clone(),
        memory,
        cpus: a.cpus,
        no_cache: a.no_cache,
        pull: a.pull,
        secrets: a.secrets.iter().map(|s| parse_secret(s)).collect::<Result<_>>()?,
    };
    let rt = runtime();
    let quiet = a.quiet;
    let mut out = |line: &str| {
        if !quiet {
            println!("{line}");
        }
    };
    match build::build(engine, rt.handle(), &opts, &mut out) {
        Ok(o) => {
            if quiet {
                println!("{}", o.image.id);
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("berth: build failed: {e}");
            Ok(1)
        }
    }
}
