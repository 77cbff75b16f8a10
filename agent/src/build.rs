//! Dockerfile builds on the engine itself: no daemon, no BuildKit.
//!
//! [`build`] parses the Dockerfile ([`dockerfile`]), works out which stages the target needs,
//! and runs each needed stage's instructions in order:
//! - metadata instructions (ENV, LABEL, CMD, USER, ...) change the image config;
//! - RUN starts a container of the stage's current layers on the engine's own runtime, under
//!   the build's CPU and memory limits, and its overlay upper directory becomes the next layer
//!   (deletions are whiteouts already);
//! - COPY and ADD write a layer from the context, another stage or an image;
//! - WORKDIR creates its directory (a layer) when the stage does not have it.
//!
//! Every step has a cache key: the key of the step before it plus what the step does and reads
//! (the expanded command and its environment for RUN; the paths, modes, owners and contents of
//! the sources for COPY). A key seen before whose layer is still stored reuses that layer, so an
//! unchanged rebuild runs nothing and a change rebuilds from the first step it affects.
//! Entries live in `<data-dir>/build-cache/<key>.json`.
//!
//! Invariants: nothing is written into a layer or the context from the host side through a
//! symlink (sources are read with `lstat`, views resolve inside their root); every mount a build
//! makes is undone when it ends, also when it fails; the image is recorded only when all of it
//! was built.

pub mod dockerfile;
pub mod ignore;
mod tarball;
mod view;
pub mod words;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::container::Mount;
use crate::engine::{Engine, RunOptions};
use crate::image::{Image, ImageConfig, LayerRecord};
use crate::reference::Reference;
use crate::Digest;
use dockerfile::{Command, Copy, Dockerfile, Instruction, Kind, MountKind, Run};
use tarball::Entry;

/// Lines of a failing step's output shown with its error.
const TAIL_LINES: usize = 20;

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The build context: a directory whose files COPY and ADD can read.
    pub context: PathBuf,
    /// The Dockerfile (default `<context>/Dockerfile`); relative paths are relative to the
    /// context.
    pub dockerfile: Option<PathBuf>,
    /// References to tag the image with.
    pub tags: Vec<Reference>,
    pub build_args: BTreeMap<String, String>,
    /// The stage to build (default: the last).
    pub target: Option<String>,
    /// Limits of each RUN container.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    /// Build every step, ignoring the cache.
    pub no_cache: bool,
    /// Pull FROM images even when they are in the store.
    pub pull: bool,
    /// `RUN --mount=type=secret,id=ID` sources.
    pub secrets: BTreeMap<String, PathBuf>,
}

/// What a build made.
#[derive(Debug, Clone)]
pub struct Output {
    pub image: Image,
    /// Steps run or taken from the cache, of the stages built.
    pub steps: usize,
    pub cached: usize,
}

/// Why a build failed: the instruction (with its line) when one failed, and the tail of its
/// output for a RUN.
#[derive(Debug)]
pub struct Error {
    pub line: Option<usize>,
    pub instruction: Option<String>,
    pub message: String,
    pub tail: Vec<String>,
}

impl Error {
    fn new(message: impl Into<String>) -> Error {
        Error { line: None, instruction: None, message: message.into(), tail: Vec::new() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.instruction) {
            (Some(l), Some(i)) => write!(f, "Dockerfile line {l}: {i}: {}", self.message)?,
            (Some(l), None) => write!(f, "Dockerfile line {l}: {}", self.message)?,
            _ => write!(f, "{}", self.message)?,
        }
        if !self.tail.is_empty() {
            write!(f, "\nlast lines of its output:")?;
            for l in &self.tail {
                write!(f, "\n  {l}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

type Result<T, E = Error> = std::result::Result<T, E>;

fn err(e: impl fmt::Display) -> Error {
    Error::new(e.to_string())
}

/// Builds the image `opts` describes, printing progress lines to `out`. Blocking: it runs
/// containers and waits for them; `rt` runs the registry pulls.
pub fn build(
    engine: &Engine,
    rt: &tokio::runtime::Handle,
    opts: &Options,
    out: &mut dyn FnMut(&str),
) -> Result<Output> {
    let context = opts
        .context
        .canonicalize()
        .map_err(|e| Error::new(format!("the build context {}: {e}", opts.context.display())))?;
    if !context.is_dir() {
        return Err(Error::new(format!("the build context {} is not a directory", context.display())));
    }
    let df_path = match &opts.dockerfile {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => context.join(p),
        None => context.join("Dockerfile"),
    };
    let text = fs::read_to_string(&df_path)
        .map_err(|e| Error::new(format!("reading the Dockerfile {}: {e}", df_path.display())))?;
    let df = dockerfile::parse(&text).map_err(|e| Error {
        line: Some(e.line),
        instruction: None,
        message: e.message.clone(),
        tail: Vec::new(),
    })?;
    if df.stages.is_empty() {
        return Err(Error::new("the Dockerfile has no FROM instruction"));
    }
    let ignore = match fs::read_to_string(context.join(".dockerignore")) {
        Ok(t) => ignore::Ignore::parse(&t).map_err(|e| Error::new(format!(".dockerignore: {e}")))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => ignore::Ignore::parse("").expect("empty"),
        Err(e) => return Err(Error::new(format!("reading .dockerignore: {e}"))),
    };
    let work = engine.data_dir().join("build").join(&crate::container::new_id()[..16]);
    fs::create_dir_all(&work).map_err(|e| Error::new(format!("creating {}: {e}", work.display())))?;
    let _work = RemoveOnDrop(work.clone());
    let _gc = engine.images().hold_gc().map_err(err)?;
    let mut b = Builder {
        engine,
        rt,
        opts,
        out,
        df,
        context,
        ignore,
        work,
        built: HashMap::new(),
        meta: BTreeMap::new(),
        used_args: BTreeSet::new(),
        steps: 0,
        cached: 0,
        seq: 0,
    };
    b.meta_args()?;
    let target = b.target_stage()?;
    let started = Instant::now();
    let stage = b.stage(target)?;
    let unused: Vec<&String> = opts.build_args.keys().filter(|k| !b.used_args.contains(*k)).collect();
    if !unused.is_empty() {
        let names: Vec<&str> = unused.iter().map(|s| s.as_str()).collect();
        (b.out)(&format!("warning: build arguments not used by the Dockerfile: {}", names.join(", ")));
    }
    let image = b.commit(&stage)?;
    (b.out)(&format!(
        "built {} in {:.1}s ({} steps, {} cached)",
        image.id.short(),
        started.elapsed().as_secs_f64(),
        b.steps,
        b.cached
    ));
    for r in &image.references {
        (b.out)(&format!("tagged {r}"));
    }
    Ok(Output { image, steps: b.steps, cached: b.cached })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The build args every build defines without an ARG default (BuildKit's automatic platform
/// args; available in a stage once declared with `ARG NAME`).
fn platform_args() -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut m = BTreeMap::new();
    for p in ["TARGET", "BUILD"] {
        m.insert(format!("{p}PLATFORM"), format!("linux/{arch}"));
        m.insert(format!("{p}OS"), "linux".into());
        m.insert(format!("{p}ARCH"), arch.into());
        m.insert(format!("{p}VARIANT"), String::new());
    }
    m
}

/// Build args usable without an ARG instruction, as Docker's (the proxy variables).
const PREDEFINED_ARGS: [&str; 8] =
    ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy"];

/// A finished stage.
#[derive(Debug, Clone)]
struct Built {
    layers: Vec<LayerRecord>,
    /// The whole image config file.
    config: Value,
    key: String,
    /// The image id containers of this stage are recorded under (for GC).
    base_id: Digest,
}

/// A stage while it is built.
struct St {
    layers: Vec<LayerRecord>,
    file: Value,
    history: Vec<Value>,
    /// ARGs declared in the stage, with their values (None: declared, no value).
    args: BTreeMap<String, Option<String>>,
    key: String,
    cmd_set: bool,
    base_id: Digest,
    onbuild: Vec<String>,
}

impl St {
    fn cfg(&mut self) -> &mut Map<String, Value> {
        if !self.file.get("config").is_some_and(Value::is_object) {
            self.file["config"] = json!({});
        }
        self.file["config"].as_object_mut().expect("an object")
    }

    fn cfg_str(&self, key: &str) -> String {
        self.file.get("config").and_then(|c| c.get(key)).and_then(Value::as_str).unwrap_or_default().to_string()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.file
            .get("config")
            .and_then(|c| c.get("Env"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => (k.to_string(), v.to_string()),
                        None => (kv.to_string(), String::new()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set_env(&mut self, k: &str, v: &str) {
        let mut env = self.env();
        match env.iter_mut().find(|(n, _)| n == k) {
            Some(e) => e.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        }
        self.cfg().insert("Env".into(), json!(env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()));
    }

    fn workdir(&self) -> String {
        let w = self.cfg_str("WorkingDir");
        if w.is_empty() {
            "/".into()
        } else {
            w
        }
    }

    fn shell(&self) -> Vec<String> {
        self.file
            .get("config")
            .and_then(|c| c.get("Shell"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    /// The variables instructions expand with: ENV over ARG.
    fn vars(&self) -> Vars {
        let mut m: HashMap<String, String> =
            self.args.iter().filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v))).collect();
        m.extend(self.env());
        Vars(m)
    }

    /// RUN's environment: the image's Env plus the ARGs in scope that ENV does not set.
    fn run_env(&self) -> Vec<String> {
        let env = self.env();
        let mut out: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for (k, v) in &self.args {
            if let Some(v) = v {
                if !env.iter().any(|(n, _)| n == k) {
                    out.push(format!("{k}={v}"));
                }
            }
        }
        out
    }

    fn history(&mut self, created_by: &str, empty: bool) {
        let mut h = json!({ "created": now(), "created_by": created_by, "comment": "berth build" });
        if empty {
            h["empty_layer"] = json!(true);
        }
        self.history.push(h);
    }
}

struct Vars(HashMap<String, String>);

impl words::Env for Vars {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn now() -> String {
    crate::logs::now_rfc3339()
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Where a step's files come from.
enum Source<'a> {
    /// The build context, filtered by .dockerignore; files are owned by root unless chowned.
    Context,
    /// A stage or an image, through a read-only view; ownership is kept.
    View(&'a view::View),
}

struct Builder<'a> {
    engine: &'a Engine,
    rt: &'a tokio::runtime::Handle,
    opts: &'a Options,
    out: &'a mut dyn FnMut(&str),
    df: Dockerfile,
    context: PathBuf,
    ignore: ignore::Ignore,
    work: PathBuf,
    built: HashMap<usize, Built>,
    /// Values of the ARGs before the first FROM (plus the platform args).
    meta: BTreeMap<String, String>,
    used_args: BTreeSet<String>,
    steps: usize,
    cached: usize,
    /// For unique names under `work`.
    seq: usize,
}

impl Builder<'_> {
    fn say(&mut self, line: &str) {
        (self.out)(line);
    }

    fn scratch_dir(&mut self, what: &str) -> PathBuf {
        self.seq += 1;
        self.work.join(format!("{what}-{}", self.seq))
    }

    fn meta_args(&mut self) -> Result<()> {
        self.meta = platform_args();
        let decls = self.df.meta_args.clone();
        for a in decls {
            let v = match self.opts.build_args.get(&a.name) {
                Some(v) => Some(v.clone()),
                None => match &a.default {
                    Some(d) => Some(
                        words::process_word(d, &Vars(self.meta.clone().into_iter().collect()), self.df.escape)
                            .map_err(|e| Error::new(format!("ARG {}: {e}", a.name)))?,
                    ),
                    None => None,
                },
            };
            self.used_args.insert(a.name.clone());
            match v {
                Some(v) => {
                    self.meta.insert(a.name.clone(), v);
                }
                None => {
                    self.meta.remove(&a.name);
                }
            }
        }
        Ok(())
    }

    fn target_stage(&self) -> Result<usize> {
        match &self.opts.target {
            None => Ok(self.df.stages.len() - 1),
            Some(t) => self
                .df
                .stages
                .iter()
                .position(|s| s.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(t)))
                .ok_or_else(|| {
                    let names: Vec<&str> = self.df.stages.iter().filter_map(|s| s.name.as_deref()).collect();
                    Error::new(format!(
                        "--target {t:?}: no stage of that name (stages: {})",
                        if names.is_empty() { "none named".to_string() } else { names.join(", ") }
                    ))
                }),
        }
    }

    /// The index of the earlier stage `name` refers to (a name, case-insensitive, or an index).
    fn stage_ref(&self, name: &str, before: usize) -> Option<usize> {
        if let Ok(i) = name.parse::<usize>() {
            return (i < before).then_some(i);
        }
        self.df.stages[..before].iter().position(|s| s.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(name)))
    }

    fn meta_vars(&self) -> Vars {
        Vars(self.meta.clone().into_iter().collect())
    }

    /// Builds stage `i` (and, first, the stages it needs), once.
    fn stage(&mut self, i: usize) -> Result<Built> {
        if let Some(b) = self.built.get(&i) {
            return Ok(b.clone());
        }
        let stage = self.df.stages[i].clone();
        let at = |e: Error| Error { line: e.line.or(Some(stage.line)), ..e };
        // The stages this one reads from are built first, so that each stage's output is in one
        // piece.
        for j in self.dependencies(i)? {
            self.stage(j)?;
        }
        let base_name = words::process_word(&stage.base, &self.meta_vars(), self.df.escape)
            .map_err(|e| at(Error::new(format!("FROM {}: {e}", stage.base))))?;
        if base_name.is_empty() {
            return Err(at(Error::new(format!("FROM {:?} expands to an empty image name", stage.base))));
        }
        if let Some(p) = &stage.platform {
            let p = words::process_word(p, &self.meta_vars(), self.df.escape).map_err(|e| at(err(e)))?;
            let host = self.meta.get("TARGETPLATFORM").cloned().unwrap_or_default();
            if !p.is_empty() && p != host && p != "$BUILDPLATFORM" {
                return Err(at(Error::new(format!(
                    "FROM --platform={p}: this builder builds for {host} only (no emulation)"
                ))));
            }
        }
        let label = match &stage.name {
            Some(n) => format!("stage {n}"),
            None => format!("stage {}", i + 1),
        };
        let mut st = if let Some(j) = self.stage_ref(&base_name, i) {
            let b = self.stage(j)?;
            self.say(&format!("[{label}] FROM {base_name} (stage)"));
            let mut file = b.config.clone();
            file.as_object_mut().map(|o| o.remove("history"));
            St {
                layers: b.layers.clone(),
                history: b.config.get("history").and_then(Value::as_array).cloned().unwrap_or_default(),
                file,
                args: BTreeMap::new(),
                key: b.key.clone(),
                cmd_set: false,
                base_id: b.base_id.clone(),
                onbuild: Vec::new(),
            }
        } else if base_name.eq_ignore_ascii_case("scratch") {
            self.say(&format!("[{label}] FROM scratch"));
            St {
                layers: Vec::new(),
                file: json!({ "architecture": self.meta["TARGETARCH"], "os": "linux", "config": {} }),
                history: Vec::new(),
                args: BTreeMap::new(),
                key: hash(&["scratch"]),
                cmd_set: false,
                base_id: Digest::of(b"scratch"),
                onbuild: Vec::new(),
            }
        } else {
            let image = self.image(&base_name).map_err(at)?;
            self.say(&format!("[{label}] FROM {base_name} ({})", image.id.short()));
            let mut file = self.engine.images().config_json(&image).map_err(|e| at(err(e)))?;
            let history = file.get("history").and_then(Value::as_array).cloned().unwrap_or_default();
            if let Some(o) = file.as_object_mut() {
                o.remove("history");
                o.remove("rootfs");
            }
            St {
                layers: self.engine.images().layer_records(&image).map_err(|e| at(err(e)))?,
                file,
                history,
                args: BTreeMap::new(),
                key: hash(&["image", image.manifest_digest.as_str()]),
                cmd_set: false,
                base_id: image.id.clone(),
                onbuild: Vec::new(),
            }
        };
        // The base's ONBUILD triggers run first; the new image does not inherit them.
        let triggers: Vec<String> = st
            .file
            .get("config")
            .and_then(|c| c.get("OnBuild"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
            .unwrap_or_default();
        st.cfg().remove("OnBuild");
        let mut instructions: Vec<(Instruction, bool)> = Vec::new();
        for t in &triggers {
            let parsed = dockerfile::parse(&format!("FROM scratch\n{t}\n"))
                .map_err(|e| at(Error::new(format!("the base image's ONBUILD {t:?}: {}", e.message))))?;
            for mut inst in parsed.stages.into_iter().flat_map(|s| s.instructions) {
                inst.line = stage.line;
                inst.end_line = stage.line;
                instructions.push((inst, true));
            }
        }
        instructions.extend(stage.instructions.iter().cloned().map(|i| (i, false)));
        let total = instructions.len();
        for (n, (inst, trigger)) in instructions.iter().enumerate() {
            let shown = if *trigger { format!("ONBUILD {}", inst.text) } else { inst.text.clone() };
            self.say(&format!("[{label} {}/{total}] {}", n + 1, shown));
            let t0 = Instant::now();
            let cached = self.cached;
            self.step(&mut st, inst, i).map_err(|e| Error {
                line: e.line.or(Some(inst.line)),
                instruction: e.instruction.or_else(|| Some(shown.clone())),
                ..e
            })?;
            if self.cached > cached {
                self.say(" ---> cached");
            } else if matches!(inst.kind, Kind::Run(_) | Kind::Copy(_) | Kind::Add(_)) {
                self.say(&format!(" ---> done in {:.1}s", t0.elapsed().as_secs_f64()));
            }
        }
        if !st.onbuild.is_empty() {
            let triggers = st.onbuild.clone();
            st.cfg().insert("OnBuild".into(), json!(triggers));
        }
        let mut file = st.file.clone();
        file["history"] = json!(st.history);
        let b = Built { layers: st.layers, config: file, key: st.key, base_id: st.base_id };
        self.built.insert(i, b.clone());
        Ok(b)
    }

    /// The earlier stages stage `i` names: its FROM, `COPY --from`, `RUN --mount from=`.
    /// Names with variables other than meta ARGs are resolved when the step runs.
    fn dependencies(&self, i: usize) -> Result<Vec<usize>> {
        let stage = &self.df.stages[i];
        let mut names = vec![stage.base.clone()];
        for inst in &stage.instructions {
            match &inst.kind {
                Kind::Copy(c) | Kind::Add(c) => names.extend(c.from.clone()),
                Kind::Run(r) => names.extend(r.mounts.iter().filter_map(|m| m.from.clone())),
                _ => {}
            }
        }
        let mut out = Vec::new();
        for n in names {
            let Ok(n) = words::process_word(&n, &self.meta_vars(), self.df.escape) else { continue };
            if let Some(j) = self.stage_ref(&n, i) {
                if !out.contains(&j) {
                    out.push(j);
                }
            }
        }
        Ok(out)
    }

    /// An image from the store, pulled if missing (or always with `--pull`).
    fn image(&mut self, name: &str) -> Result<Image> {
        let r = name
            .parse::<Reference>()
            .map_err(|e| Error::new(format!("{name:?} is not a valid image reference: {e}")))?;
        if !self.opts.pull {
            if let Ok(i) = self.engine.images().get(&r.to_string()) {
                return Ok(i);
            }
        }
        self.say(&format!("pulling {r}"));
        let store = self.engine.images().clone();
        let r2 = r.clone();
        self.rt
            .block_on(async move { store.pull(&r2, &|_| {}).await })
            .map_err(|e| Error::new(format!("pulling {r}: {e}")))
    }

    fn expand(&self, st: &St, raw: &str) -> Result<String> {
        words::process_word(raw, &st.vars(), self.df.escape).map_err(|e| Error::new(format!("{raw:?}: {e}")))
    }

    fn expand_fields(&self, st: &St, raw: &str) -> Result<Vec<String>> {
        words::process_words(raw, &st.vars(), self.df.escape).map_err(|e| Error::new(format!("{raw:?}: {e}")))
    }

    fn step(&mut self, st: &mut St, inst: &Instruction, stage: usize) -> Result<()> {
        self.steps += 1;
        let text = inst.text.clone();
        let meta = |st: &mut St, what: &str| {
            st.key = hash(&[&st.key, what]);
            st.history(&text, true);
        };
        match &inst.kind {
            Kind::Env(pairs) => {
                let vars = st.vars();
                let mut done = Vec::new();
                for (k, v) in pairs {
                    let k = words::process_word(k, &vars, self.df.escape).map_err(err)?;
                    let v = words::process_word(v, &vars, self.df.escape).map_err(err)?;
                    if k.is_empty() || k.contains('=') {
                        return Err(Error::new(format!("ENV: invalid variable name {k:?}")));
                    }
                    done.push((k, v));
                }
                for (k, v) in &done {
                    st.set_env(k, v);
                }
                meta(st, &format!("env {done:?}"));
            }
            Kind::Label(pairs) => {
                let vars = st.vars();
                let mut labels = st.cfg().get("Labels").and_then(Value::as_object).cloned().unwrap_or_default();
                for (k, v) in pairs {
                    let k = words::process_word(k, &vars, self.df.escape).map_err(err)?;
                    let v = words::process_word(v, &vars, self.df.escape).map_err(err)?;
                    labels.insert(k, json!(v));
                }
                st.cfg().insert("Labels".into(), Value::Object(labels.clone()));
                meta(st, &format!("labels {labels:?}"));
            }
            Kind::Arg(decls) => {
                let mut done = Vec::new();
                for a in decls {
                    self.used_args.insert(a.name.clone());
                    let v = match self.opts.build_args.get(&a.name) {
                        Some(v) => Some(v.clone()),
                        None => match &a.default {
                            Some(d) => Some(self.expand(st, d)?),
                            None => self.meta.get(&a.name).cloned(),
                        },
                    };
                    done.push((a.name.clone(), v.clone()));
                    st.args.insert(a.name.clone(), v);
                }
                meta(st, &format!("arg {done:?}"));
            }
            Kind::Workdir(w) => {
                let w = self.expand(st, w)?;
                if w.is_empty() {
                    return Err(Error::new("WORKDIR needs a path"));
                }
                let path = clean(&Path::new(&st.workdir()).join(&w).to_string_lossy());
                st.cfg().insert("WorkingDir".into(), json!(path));
                self.workdir_layer(st, &path)?;
            }
            Kind::User(u) => {
                let u = self.expand(st, u)?;
                st.cfg().insert("User".into(), json!(u));
                meta(st, &format!("user {u}"));
            }
            Kind::Expose(ports) => {
                let mut map = st.cfg().get("ExposedPorts").and_then(Value::as_object).cloned().unwrap_or_default();
                for raw in ports {
                    for p in self.expand_fields(st, raw)? {
                        let (num, proto) = p.split_once('/').unwrap_or((&p, "tcp"));
                        let ok_range = num.split_once('-').map_or(num.parse::<u16>().is_ok(), |(a, b)| {
                            a.parse::<u16>().is_ok() && b.parse::<u16>().is_ok()
                        });
                        if !ok_range || !matches!(proto.to_ascii_lowercase().as_str(), "tcp" | "udp" | "sctp") {
                            return Err(Error::new(format!("EXPOSE: invalid port {p:?}")));
                        }
                        map.insert(format!("{num}/{}", proto.to_ascii_lowercase()), json!({}));
                    }
                }
                st.cfg().insert("ExposedPorts".into(), Value::Object(map.clone()));
                meta(st, &format!("expose {map:?}"));
            }
            Kind::Volume(vols) => {
                let mut map = st.cfg().get("Volumes").and_then(Value::as_object).cloned().unwrap_or_default();
                for raw in vols {
                    for v in self.expand_fields(st, raw)? {
                        if v.is_empty() {
                            return Err(Error::new("VOLUME: empty path"));
                        }
                        map.insert(v, json!({}));
                    }
                }
                st.cfg().insert("Volumes".into(), Value::Object(map.clone()));
                meta(st, &format!("volume {map:?}"));
            }
            Kind::StopSignal(s) => {
                let s = self.expand(st, s)?;
                if crate::engine::parse_signal(&s).is_none() {
                    return Err(Error::new(format!("STOPSIGNAL: {s:?} is not a signal")));
                }
                st.cfg().insert("StopSignal".into(), json!(s));
                meta(st, &format!("stopsignal {s}"));
            }
            Kind::Shell(v) => {
                st.cfg().insert("Shell".into(), json!(v));
                meta(st, &format!("shell {v:?}"));
            }
            Kind::Maintainer(m) => {
                let m = self.expand(st, m)?;
                st.file["author"] = json!(m);
                meta(st, &format!("maintainer {m}"));
            }
            Kind::Cmd(c) => {
                let argv = self.argv(st, c);
                st.cfg().insert("Cmd".into(), json!(argv));
                st.cmd_set = true;
                meta(st, &format!("cmd {argv:?}"));
            }
            Kind::Entrypoint(c) => {
                let argv = self.argv(st, c);
                st.cfg().insert("Entrypoint".into(), json!(argv));
                if !st.cmd_set {
                    // As Docker: a new ENTRYPOINT drops the Cmd inherited from the base image.
                    st.cfg().insert("Cmd".into(), Value::Null);
                }
                meta(st, &format!("entrypoint {argv:?}"));
            }
            Kind::Healthcheck(h) => {
                let v = match h {
                    dockerfile::Healthcheck::None => json!({ "Test": ["NONE"] }),
                    dockerfile::Healthcheck::Check {
                        test,
                        interval,
                        timeout,
                        start_period,
                        start_interval,
                        retries,
                    } => {
                        let mut o = json!({ "Test": test });
                        let ns = |d: &Option<Duration>| d.map(|d| d.as_nanos() as u64);
                        for (k, d) in [
                            ("Interval", ns(interval)),
                            ("Timeout", ns(timeout)),
                            ("StartPeriod", ns(start_period)),
                            ("StartInterval", ns(start_interval)),
                        ] {
                            if let Some(d) = d {
                                o[k] = json!(d);
                            }
                        }
                        if let Some(r) = retries {
                            o["Retries"] = json!(r);
                        }
                        o
                    }
                };
                st.cfg().insert("Healthcheck".into(), v.clone());
                meta(st, &format!("healthcheck {v}"));
            }
            Kind::Onbuild(inner) => {
                st.onbuild.push(inner.text.clone());
                meta(st, &format!("onbuild {}", inner.text));
            }
            Kind::Run(run) => self.run(st, inst, run, stage)?,
            Kind::Copy(c) => self.copy(st, inst, c, false, stage)?,
            Kind::Add(c) => self.copy(st, inst, c, true, stage)?,
        }
        Ok(())
    }

    /// CMD / ENTRYPOINT argv: the exec form as written, the shell form through SHELL.
    fn argv(&self, st: &St, c: &Command) -> Vec<String> {
        match c {
            Command::Exec(v) => v.clone(),
            Command::Shell(s) => {
                let mut v = st.shell();
                v.push(s.clone());
                v
            }
        }
    }

    fn cache_get(&self, key: &str) -> Option<Option<LayerRecord>> {
        if self.opts.no_cache {
            return None;
        }
        let path = self.engine.data_dir().join("build-cache").join(format!("{key}.json"));
        let v: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        match v.get("layer") {
            Some(Value::Null) | None => Some(None),
            Some(l) => {
                let l: LayerRecord = serde_json::from_value(l.clone()).ok()?;
                self.engine.images().has_layer(&l).then_some(Some(l))
            }
        }
    }

    fn cache_put(&self, key: &str, layer: Option<&LayerRecord>, created_by: &str) {
        let dir = self.engine.data_dir().join("build-cache");
        let _ = fs::create_dir_all(&dir);
        let v = json!({ "layer": layer, "created_by": created_by, "created": now() });
        let _ = crate::container::write_atomic(
            &dir.join(format!("{key}.json")),
            &serde_json::to_vec_pretty(&v).expect("serialises"),
        );
    }

    /// Adds a step's layer (or none: an empty change) to the stage.
    fn push_layer(&mut self, st: &mut St, key: String, layer: Option<LayerRecord>, created_by: &str) {
        st.key = key;
        match layer {
            Some(l) => {
                st.layers.push(l.clone());
                st.history(created_by, false);
            }
            None => st.history(created_by, true),
        }
    }

    fn view(&mut self, layers: &[LayerRecord]) -> Result<view::View> {
        let at = self.scratch_dir("view");
        let paths = self.engine.images().layer_paths(layers);
        view::View::mount(&paths, &at).map_err(|e| Error::new(format!("mounting a view of the stage: {e}")))
    }

    fn workdir_layer(&mut self, st: &mut St, path: &str) -> Result<()> {
        // As BuildKit, the directories WORKDIR creates belong to the stage's USER (so that a
        // non-root user can write to its own working directory).
        let user = st.cfg_str("User");
        let key = hash(&[&st.key, "workdir", path, &user]);
        let created_by = format!("WORKDIR {path}");
        if let Some(hit) = self.cache_get(&key) {
            self.push_layer(st, key, hit, &created_by);
            return Ok(());
        }
        let v = self.view(&st.layers.clone())?;
        let (uid, gid) = if user.is_empty() {
            (0, 0)
        } else {
            resolve_chown(&user, &v).map_err(|e| Error::new(format!("WORKDIR as USER {user}: {}", e.message)))?
        };
        let mut entries = Vec::new();
        let mut acc = String::new();
        let mut missing = false;
        for c in path.trim_start_matches('/').split('/').filter(|c| !c.is_empty()) {
            acc = if acc.is_empty() { c.to_string() } else { format!("{acc}/{c}") };
            match v.resolve(&acc).map(fs::symlink_metadata) {
                Some(Ok(md)) if !missing => entries.push(dir_entry(&acc, &md)),
                _ => {
                    missing = true;
                    entries.push(Entry {
                        path: acc.clone(),
                        kind: tarball::Kind::Dir,
                        mode: 0o755,
                        uid,
                        gid,
                        mtime: unix_now(),
                    });
                }
            }
        }
        drop(v);
        let layer = if missing { Some(self.entries_layer(&entries)?) } else { None };
        self.cache_put(&key, layer.as_ref(), &created_by);
        self.push_layer(st, key, layer, &created_by);
        Ok(())
    }

    fn entries_layer(&self, entries: &[Entry]) -> Result<LayerRecord> {
        self.engine
            .images()
            .add_layer(|w| {
                let mut b = tar::Builder::new(w);
                tarball::append_entries(&mut b, entries)?;
                b.finish()
            })
            .map_err(|e| Error::new(format!("writing the layer: {e}")))
    }

    // --- RUN ---------------------------------------------------------------------------------

    fn run(&mut self, st: &mut St, inst: &Instruction, run: &Run, stage: usize) -> Result<()> {
        let mut mounts: Vec<Mount> = Vec::new();
        let mut mount_desc = Vec::new();
        let shell = |last: String| {
            let mut v = st.shell();
            v.push(last);
            v
        };
        let argv = match run.script() {
            dockerfile::Script::Plain(Command::Exec(v)) => v.clone(),
            dockerfile::Script::Plain(Command::Shell(s)) => shell(s.clone()),
            dockerfile::Script::Inline(s) | dockerfile::Script::Reconstituted(s) => shell(s),
            dockerfile::Script::Shebang { name, data } => {
                // As BuildKit: the script is a file in a read-only mount, run through SHELL.
                let d = self.scratch_dir("pipes");
                fs::create_dir_all(&d).map_err(err)?;
                let f = d.join(name);
                fs::write(&f, &data).map_err(err)?;
                fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(err)?;
                mounts.push(Mount { source: d, destination: "/dev/pipes".into(), read_only: true });
                mount_desc.push(format!("script {name} {}", hash(&[&data])));
                shell(format!("/dev/pipes/{name}"))
            }
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Err(Error::new("RUN needs a command"));
        }
        if let Some(n) = &run.network {
            if n != "default" {
                self.say(&format!("warning: RUN --network={n} is not supported: the step uses the build network"));
            }
        }
        let mut env = st.run_env();
        for name in PREDEFINED_ARGS {
            if let Some(v) = self.opts.build_args.get(name) {
                self.used_args.insert(name.to_string());
                if !env.iter().any(|e| e.split('=').next() == Some(name)) {
                    env.push(format!("{name}={v}"));
                }
            }
        }
        let user = st.cfg_str("User");
        let workdir = st.workdir();
        // Mounts: what they are is part of the key; what a cache mount holds is not.
        let mut views = Vec::new();
        let mut secret_dir: Option<PathBuf> = None;
        for m in &run.mounts {
            let target = m.target.as_deref().map(|t| self.expand(st, t)).transpose()?;
            let abs = |t: &str| clean(&Path::new(&workdir).join(t).to_string_lossy());
            match m.kind {
                MountKind::Cache => {
                    let target = target.ok_or_else(|| Error::new("RUN --mount=type=cache needs target="))?;
                    let target = abs(&target);
                    let id = m.id.clone().unwrap_or_else(|| target.clone());
                    let dir = self.engine.data_dir().join("build-cache").join("mounts").join(hash(&[&id]));
                    if !dir.exists() {
                        fs::create_dir_all(&dir).map_err(err)?;
                        let mode = m.mode.as_deref().map(|s| u32::from_str_radix(s, 8)).transpose().map_err(|_| {
                            Error::new(format!("RUN --mount: mode={:?} is not octal", m.mode.as_deref().unwrap_or("")))
                        })?;
                        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(mode.unwrap_or(0o755)))
                            .map_err(err)?;
                        let id_of = |s: &Option<String>| s.as_deref().and_then(|s| s.parse::<u32>().ok());
                        let _ = std::os::unix::fs::chown(&dir, id_of(&m.uid), id_of(&m.gid));
                    }
                    mount_desc.push(format!("cache {id} {target}"));
                    mounts.push(Mount { source: dir, destination: target, read_only: false });
                }
                MountKind::Bind => {
                    let target = abs(&target.ok_or_else(|| Error::new("RUN --mount=type=bind needs target="))?);
                    let source = m.source.as_deref().map(|s| self.expand(st, s)).transpose()?.unwrap_or_default();
                    let host = match &m.from {
                        Some(from) => {
                            let from = self.expand(st, from)?;
                            let (layers, from_key) = self.source_layers(&from, stage)?;
                            let v = self.view(&layers)?;
                            let p = v
                                .resolve(&source)
                                .ok_or_else(|| Error::new(format!("RUN --mount from={from}: no {source:?} there")))?;
                            mount_desc.push(format!("bind {from_key} {source} {target}"));
                            views.push(v);
                            p
                        }
                        None => {
                            let rel = clean_rel(&source)?;
                            mount_desc.push(format!("bind context {rel} {target} {}", self.context_key(&rel)?));
                            self.context.join(&rel)
                        }
                    };
                    if !host.is_dir() {
                        return Err(Error::new(format!(
                            "RUN --mount=type=bind: source {source:?} is not a directory (file binds are not supported)"
                        )));
                    }
                    mounts.push(Mount { source: host, destination: target, read_only: m.readonly });
                }
                MountKind::Secret => {
                    let id =
                        m.id.clone().or_else(|| target.as_deref().and_then(|t| t.rsplit('/').next()).map(String::from));
                    let id = id.ok_or_else(|| Error::new("RUN --mount=type=secret needs id="))?;
                    let t = target.clone().unwrap_or_else(|| format!("/run/secrets/{id}"));
                    if Path::new(&t).parent() != Some(Path::new("/run/secrets")) {
                        return Err(Error::new(format!(
                            "RUN --mount=type=secret: target={t}: only targets in /run/secrets are supported"
                        )));
                    }
                    let Some(src) = self.opts.secrets.get(&id) else {
                        if m.required {
                            return Err(Error::new(format!(
                                "RUN --mount=type=secret: no secret {id:?} was given (--secret id={id},src=FILE)"
                            )));
                        }
                        continue;
                    };
                    let dir = match &secret_dir {
                        Some(d) => d.clone(),
                        None => {
                            let d = self.scratch_dir("secrets");
                            fs::create_dir_all(&d).map_err(err)?;
                            fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                                .map_err(err)?;
                            secret_dir = Some(d.clone());
                            mounts.push(Mount {
                                source: d.clone(),
                                destination: "/run/secrets".into(),
                                read_only: true,
                            });
                            d
                        }
                    };
                    let name = Path::new(&t).file_name().expect("a file name").to_owned();
                    fs::copy(src, dir.join(name))
                        .map_err(|e| Error::new(format!("secret {id}: reading {}: {e}", src.display())))?;
                    mount_desc.push(format!("secret {id} {t}"));
                }
                MountKind::Tmpfs => {
                    let target = abs(&target.ok_or_else(|| Error::new("RUN --mount=type=tmpfs needs target="))?);
                    let d = self.scratch_dir("tmpfs");
                    fs::create_dir_all(&d).map_err(err)?;
                    mount_desc.push(format!("tmpfs {target}"));
                    mounts.push(Mount { source: d, destination: target, read_only: false });
                }
                MountKind::Ssh => return Err(Error::new("RUN --mount=type=ssh is not supported")),
            }
        }
        let key = hash(&[
            &st.key,
            "run",
            &serde_json::to_string(&argv).expect("json"),
            &serde_json::to_string(&env).expect("json"),
            &user,
            &workdir,
            &mount_desc.join("\n"),
        ]);
        let created_by = format!("RUN {}", inst.text.strip_prefix("RUN ").unwrap_or(&inst.text));
        if let Some(hit) = self.cache_get(&key) {
            self.cached += 1;
            self.push_layer(st, key, hit, &created_by);
            return Ok(());
        }
        let layers = self.engine.images().layer_paths(&st.layers);
        let image = Image {
            id: st.base_id.clone(),
            manifest_digest: st.base_id.clone(),
            references: Vec::new(),
            config: ImageConfig::default(),
            layers: layers.clone(),
            size: 0,
            created: None,
        };
        let mut labels = BTreeMap::new();
        labels.insert("berth.build".to_string(), self.work.file_name().unwrap_or_default().to_string_lossy().into());
        let opts = RunOptions {
            entrypoint: Some(argv),
            cmd: Some(Vec::new()),
            env,
            working_dir: Some(workdir.clone()),
            user: Some(user),
            hostname: Some("berth-build".into()),
            memory: self.opts.memory,
            cpus: self.opts.cpus,
            labels,
            mounts: mounts.clone(),
            ..Default::default()
        };
        let (c, attach) = self
            .engine
            .run(&image, "berth build", opts, true)
            .map_err(|e| Error::new(format!("starting the step's container: {e}")))?;
        let mut attach = attach.expect("attached");
        let mut follower = crate::logs::Follower::from_start(&self.engine.paths(&c.id).log());
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut partial: Vec<u8> = Vec::new();
        {
            let out = &mut *self.out;
            let mut emit = |l: crate::logs::Line| {
                partial.extend_from_slice(&l.bytes);
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let line = String::from_utf8_lossy(&partial[..i]).trim_end_matches('\r').to_string();
                    partial.drain(..=i);
                    out(&format!("    {line}"));
                    tail.push_back(line);
                    if tail.len() > TAIL_LINES {
                        tail.pop_front();
                    }
                }
            };
            attach.wait(Duration::from_millis(50), || {
                let _ = follower.poll(&mut emit);
            });
            let _ = follower.poll(&mut emit);
            follower.flush(&mut emit);
            if !partial.is_empty() {
                let line = String::from_utf8_lossy(&partial).to_string();
                out(&format!("    {line}"));
                tail.push_back(line);
            }
        }
        drop(attach);
        let state = self.engine.paths(&c.id).read_state().map_err(err)?;
        let upper = self.scratch_dir("upper");
        let removed = self.engine.remove_taking_upper(&c.id, &upper);
        drop(views);
        if state.status == crate::container::Status::Failed || state.exit_code != Some(0) {
            let _ = self.engine.remove(&c.id, true);
            let _ = fs::remove_dir_all(&upper);
            let why = match (&state.error, state.exit_code) {
                (Some(e), _) => e.clone(),
                (None, Some(code)) if state.oom_killed => format!("killed: out of memory (exit code {code})"),
                (None, Some(code)) => format!("the command exited with code {code}"),
                (None, None) => "the command did not run".into(),
            };
            return Err(Error { line: None, instruction: None, message: why, tail: tail.into() });
        }
        removed.map_err(|e| Error::new(format!("collecting the step's changes: {e}")))?;
        let mut points: Vec<String> = ["proc", "sys", "dev", "etc/hosts", "etc/hostname", "etc/resolv.conf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        points.extend(mounts.iter().map(|m| m.destination.trim_start_matches('/').to_string()));
        remove_mount_points(&upper, &layers, &points);
        let layer = if dir_is_empty(&upper) {
            None
        } else {
            Some(
                self.engine
                    .images()
                    .add_layer(|w| tarball::write_tree(&upper, w, &|_| false))
                    .map_err(|e| Error::new(format!("writing the step's layer: {e}")))?,
            )
        };
        let _ = fs::remove_dir_all(&upper);
        self.cache_put(&key, layer.as_ref(), &created_by);
        self.push_layer(st, key, layer, &created_by);
        Ok(())
    }

    /// The layers of what `from` names: an earlier stage, or an image.
    /// Also its cache key: the stage's, or the image's manifest digest.
    fn source_layers(&mut self, from: &str, stage: usize) -> Result<(Vec<LayerRecord>, String)> {
        if let Some(j) = self.stage_ref(from, stage) {
            let b = self.stage(j)?;
            return Ok((b.layers, b.key));
        }
        if from.parse::<usize>().is_ok() {
            return Err(Error::new(format!("--from={from}: there is no earlier stage {from}")));
        }
        let image = self.image(from)?;
        let layers = self.engine.images().layer_records(&image).map_err(err)?;
        Ok((layers, image.manifest_digest.to_string()))
    }

    /// A key for a source from the context (a file or a directory's tree).
    fn context_key(&self, rel: &str) -> Result<String> {
        Ok(listing_key(&self.context_listing(rel)?))
    }

    /// What [`Builder::walk_context`] visits, collected.
    fn context_listing(&self, rel: &str) -> Result<Vec<(String, fs::Metadata, PathBuf)>> {
        let mut list = Vec::new();
        self.walk_context(rel, &mut |r, md, p| list.push((r.to_string(), md.clone(), p.to_path_buf())))?;
        Ok(list)
    }

    /// Visits `rel` in the context and, if a directory, everything under it that .dockerignore
    /// lets in, sorted; `f` gets the relative path (below `rel`, "" for itself), its metadata
    /// (not followed) and its host path.
    fn walk_context(&self, rel: &str, f: &mut dyn FnMut(&str, &fs::Metadata, &Path)) -> Result<()> {
        let top = self.context.join(rel);
        let md = fs::symlink_metadata(&top).map_err(|e| Error::new(format!("{rel}: {e}")))?;
        f("", &md, &top);
        if md.is_dir() {
            self.walk_dir(&top, rel, "", f)?;
        }
        Ok(())
    }

    fn walk_dir(&self, dir: &Path, base: &str, sub: &str, f: &mut dyn FnMut(&str, &fs::Metadata, &Path)) -> Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(|e| Error::new(format!("reading {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            let n = n.to_string_lossy().into_owned();
            let r = if sub.is_empty() { n.clone() } else { format!("{sub}/{n}") };
            let full = if base.is_empty() { r.clone() } else { format!("{base}/{r}") };
            let path = dir.join(&n);
            let md = fs::symlink_metadata(&path).map_err(|e| Error::new(format!("{full}: {e}")))?;
            let excluded = self.ignore.matches(&full);
            if excluded && !(md.is_dir() && self.ignore.may_include_under(&full)) {
                continue;
            }
            if !excluded {
                f(&r, &md, &path);
            }
            if md.is_dir() {
                self.walk_dir(&path, base, &r, f)?;
            }
        }
        Ok(())
    }

    // --- COPY / ADD --------------------------------------------------------------------------

    fn copy(&mut self, st: &mut St, inst: &Instruction, c: &Copy, add: bool, stage: usize) -> Result<()> {
        let what = if add { "ADD" } else { "COPY" };
        if c.parents || !c.exclude.is_empty() {
            return Err(Error::new(format!("{what} --parents and --exclude are not supported")));
        }
        let dest_raw = self.expand(st, &c.dest)?;
        if dest_raw.is_empty() {
            return Err(Error::new(format!("{what} needs a destination")));
        }
        let dir_dest = dest_raw.ends_with('/') || dest_raw == "." || dest_raw.ends_with("/.");
        let dest = clean(&Path::new(&st.workdir()).join(&dest_raw).to_string_lossy());
        let chmod = c
            .chmod
            .as_deref()
            .map(|m| {
                let m = self.expand(st, m)?;
                u32::from_str_radix(&m, 8)
                    .ok()
                    .filter(|v| *v <= 0o7777)
                    .ok_or_else(|| Error::new(format!("--chmod={m}: give an octal mode such as 755")))
            })
            .transpose()?;
        let chown_spec = c.chown.as_deref().map(|s| self.expand(st, s)).transpose()?;
        // The destination stage, for what exists at the destination and --chown names.
        let dst_view = self.view(&st.layers.clone())?;
        let chown = match &chown_spec {
            None => None,
            Some(spec) => Some(resolve_chown(spec, &dst_view)?),
        };
        let from = c.from.as_deref().map(|f| self.expand(st, f)).transpose()?;
        let (src_view, from_key) = match &from {
            Some(f) => {
                let (layers, key) = self.source_layers(f, stage)?;
                (Some(self.view(&layers)?), key)
            }
            None => (None, String::new()),
        };
        let source = match &src_view {
            Some(v) => Source::View(v),
            None => Source::Context,
        };
        // Sources: heredocs, URLs (ADD), paths (wildcards expanded).
        let mut items: Vec<Item> = Vec::new();
        for h in &c.heredocs {
            let data = h.data();
            let content = if h.expand { expand_vars(&data, &st.vars()) } else { data };
            items.push(Item::Bytes(h.name.clone(), content.into_bytes()));
        }
        for raw in &c.sources {
            let s = self.expand(st, raw)?;
            if add && (s.starts_with("http://") || s.starts_with("https://")) {
                items.push(Item::Url(s));
                continue;
            }
            if !add && (s.starts_with("http://") || s.starts_with("https://")) {
                return Err(Error::new(format!("COPY cannot fetch URLs ({s}); use ADD")));
            }
            let matched = self.glob(&source, &s)?;
            if matched.is_empty() {
                return Err(Error::new(match source {
                    Source::Context => format!(
                        "{s:?}: not found in the build context{}",
                        if self.ignore.matches(&clean_rel(&s).unwrap_or_default()) {
                            " (excluded by .dockerignore)"
                        } else {
                            ""
                        }
                    ),
                    Source::View(_) => format!("{s:?}: not found in {}", from.as_deref().unwrap_or("")),
                }));
            }
            let wild = has_wildcard(&s);
            for m in matched {
                items.push(Item::Path(m, wild));
            }
        }
        if items.len() > 1 && !dir_dest {
            return Err(Error::new(format!(
                "{what} with more than one source needs a destination directory ending in '/' (got {dest_raw:?})"
            )));
        }
        let dest_is_dir = dir_dest
            || dst_view.resolve(&dest).is_some_and(|p| p.is_dir())
            || items.iter().any(|i| matches!(i, Item::Path(_, true)));
        // Entries, and the key: what the layer will hold, contents hashed for the context.
        let mut entries: Vec<Entry> = Vec::new();
        let mut h = Sha256::new();
        h.update(st.key.as_bytes());
        h.update(format!("{what} {dest} {chown:?} {chmod:?} {:?} {}", from, dest_is_dir).as_bytes());
        let mut work_dirs = Vec::new();
        for item in &items {
            match item {
                Item::Bytes(name, data) => {
                    let path = if dest_is_dir { format!("{dest}/{name}") } else { dest.clone() };
                    h.update(path.as_bytes());
                    h.update(data);
                    let (uid, gid) = chown.unwrap_or((0, 0));
                    entries.push(Entry {
                        path: rel_of(&path),
                        kind: tarball::Kind::Bytes(data.clone()),
                        mode: chmod.unwrap_or(0o644),
                        uid,
                        gid,
                        mtime: unix_now(),
                    });
                }
                Item::Url(url) => {
                    let (name, data, mtime) = self.download(url)?;
                    let path = if dest_is_dir { format!("{dest}/{name}") } else { dest.clone() };
                    h.update(path.as_bytes());
                    h.update(&data);
                    let (uid, gid) = chown.unwrap_or((0, 0));
                    entries.push(Entry {
                        path: rel_of(&path),
                        kind: tarball::Kind::Bytes(data),
                        mode: chmod.unwrap_or(0o600),
                        uid,
                        gid,
                        mtime,
                    });
                }
                Item::Path(host, _) => {
                    let md = fs::symlink_metadata(host).map_err(err)?;
                    let name = host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let in_context = matches!(source, Source::Context);
                    if add && in_context && md.is_file() && is_archive(host) {
                        let x = self.scratch_dir("extract");
                        fs::create_dir_all(&x).map_err(err)?;
                        crate::layer::unpack(host, &x)
                            .map_err(|e| Error::new(format!("ADD: extracting {name}: {e}")))?;
                        h.update(b"archive");
                        hash_file(&mut h, host);
                        // The archive's own entries keep their owners; the destination
                        // directory, when the step creates it, is made like any missing
                        // parent (0755, owned by --chown), and an existing one is left as
                        // it is (ADD into /tmp must not reset its 1777), as BuildKit does.
                        let at = entries.len();
                        collect_tree(&x, &dest, &mut entries, None, chmod, false)?;
                        if dst_view.resolve(&dest).is_none() && !entries.iter().any(|e| e.path == rel_of(&dest)) {
                            entries.insert(at, new_dir(&dest, chown));
                        }
                        work_dirs.push(x);
                        continue;
                    }
                    let owner = match (chown, in_context) {
                        (Some(o), _) => Some(o),
                        (None, true) => Some((0, 0)),
                        (None, false) => None,
                    };
                    if md.is_dir() {
                        if in_context {
                            let rel = host.strip_prefix(&self.context).unwrap_or(host).to_string_lossy().into_owned();
                            let list = self.context_listing(&rel)?;
                            h.update(listing_key(&list).as_bytes());
                            for (r, md, p) in list {
                                let target = if r.is_empty() { dest.clone() } else { format!("{dest}/{r}") };
                                if r.is_empty() {
                                    // An existing destination directory keeps its own metadata;
                                    // a new one is made like a missing parent (0755, --chown, no
                                    // --chmod, not the source directory's mode), as BuildKit's
                                    // copy of directory contents does (fsutil prepareTargetDir).
                                    if dst_view.resolve(&dest).is_none() {
                                        entries.push(new_dir(&dest, chown));
                                    }
                                    continue;
                                }
                                entries.push(entry_for(&target, &md, &p, owner, chmod)?);
                            }
                        } else {
                            h.update(host.to_string_lossy().as_bytes());
                            if dst_view.resolve(&dest).is_none() {
                                entries.push(new_dir(&dest, chown));
                            }
                            collect_tree(host, &dest, &mut entries, owner, chmod, false)?;
                        }
                    } else {
                        let target = if dest_is_dir { format!("{dest}/{name}") } else { dest.clone() };
                        h.update(target.as_bytes());
                        if in_context {
                            h.update(md.mode().to_le_bytes());
                            hash_file(&mut h, host);
                        } else {
                            h.update(host.to_string_lossy().as_bytes());
                        }
                        entries.push(entry_for(&target, &md, host, owner, chmod)?);
                    }
                }
            }
        }
        // From another stage or image, the key is that stage's key plus the paths.
        h.update(from_key.as_bytes());
        let key = hex::encode(h.finalize());
        let created_by = format!("{what} {}", inst.text.split_once(' ').map(|x| x.1).unwrap_or(""));
        if let Some(hit) = self.cache_get(&key) {
            self.cached += 1;
            drop(dst_view);
            self.push_layer(st, key, hit, &created_by);
            return Ok(());
        }
        // Parent directories of the destination: existing ones as they are, new ones 0755.
        let top = if dest_is_dir {
            dest.clone()
        } else {
            Path::new(&dest).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
        };
        let mut parents = Vec::new();
        let mut acc = String::new();
        let mut missing = false;
        for comp in top.trim_start_matches('/').split('/').filter(|c| !c.is_empty()) {
            acc = if acc.is_empty() { comp.to_string() } else { format!("{acc}/{comp}") };
            if entries.iter().any(|e| e.path == acc) {
                continue;
            }
            match dst_view.resolve(&acc).map(fs::symlink_metadata) {
                Some(Ok(md)) if !missing && md.is_dir() => parents.push(dir_entry(&acc, &md)),
                _ => {
                    missing = true;
                    let (uid, gid) = chown.unwrap_or((0, 0));
                    parents.push(Entry {
                        path: acc.clone(),
                        kind: tarball::Kind::Dir,
                        mode: 0o755,
                        uid,
                        gid,
                        mtime: unix_now(),
                    });
                }
            }
        }
        parents.extend(entries);
        drop(dst_view);
        // The source view stays mounted until the layer is written: entries read from it.
        let layer = self.entries_layer(&parents);
        drop(src_view);
        let layer = layer?;
        for d in work_dirs {
            let _ = fs::remove_dir_all(d);
        }
        self.cache_put(&key, Some(&layer), &created_by);
        self.push_layer(st, key, Some(layer), &created_by);
        Ok(())
    }

    /// The host paths a COPY source names: itself, or what its wildcards match.
    fn glob(&self, source: &Source<'_>, s: &str) -> Result<Vec<PathBuf>> {
        let rel = clean_rel(s)?;
        let (root, context) = match source {
            Source::Context => (self.context.clone(), true),
            Source::View(v) => (v.root().to_path_buf(), false),
        };
        if !has_wildcard(&rel) {
            if context {
                if !rel.is_empty() && self.ignore.matches(&rel) {
                    return Ok(Vec::new());
                }
                let p = self.context.join(&rel);
                // The source itself may be a symlink: followed, inside the context.
                let real = if p.is_symlink() {
                    match p.canonicalize() {
                        Ok(r) if r.starts_with(&self.context) => r,
                        _ => return Ok(Vec::new()),
                    }
                } else {
                    p
                };
                return Ok(if fs::symlink_metadata(&real).is_ok() { vec![real] } else { Vec::new() });
            }
            let Source::View(v) = source else { unreachable!() };
            return Ok(v.resolve(&format!("/{rel}")).into_iter().collect());
        }
        let mut found = vec![(root.clone(), String::new())];
        for comp in rel.split('/') {
            let mut next = Vec::new();
            for (dir, r) in &found {
                if !has_wildcard(comp) {
                    let p = dir.join(comp);
                    if fs::symlink_metadata(&p).is_ok() {
                        next.push((p, join_rel(r, comp)));
                    }
                    continue;
                }
                let Ok(rd) = fs::read_dir(dir) else { continue };
                let mut names: Vec<String> =
                    rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
                names.sort();
                for n in names {
                    if glob_match(comp, &n) {
                        next.push((dir.join(&n), join_rel(r, &n)));
                    }
                }
            }
            found = next;
        }
        Ok(found.into_iter().filter(|(_, r)| !(context && self.ignore.matches(r))).map(|(p, _)| p).collect())
    }

    fn download(&mut self, url: &str) -> Result<(String, Vec<u8>, u64)> {
        self.say(&format!("downloading {url}"));
        let u = url.to_string();
        let (bytes, modified) = self
            .rt
            .block_on(async move {
                let resp = reqwest::get(&u).await?.error_for_status()?;
                let modified = resp
                    .headers()
                    .get(reqwest::header::LAST_MODIFIED)
                    .and_then(|v| v.to_str().ok())
                    .and_then(httpdate_secs);
                Ok::<_, reqwest::Error>((resp.bytes().await?.to_vec(), modified))
            })
            .map_err(|e| Error::new(format!("ADD {url}: {e}")))?;
        let name = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').next())
            .filter(|n| !n.is_empty())
            .unwrap_or("index.html")
            .to_string();
        Ok((name, bytes, modified.unwrap_or(0)))
    }

    /// Writes the final image of `b` into the store, tagged.
    fn commit(&mut self, b: &Built) -> Result<Image> {
        let mut file = b.config.clone();
        file["created"] = json!(now());
        file["rootfs"] = json!({
            "type": "layers",
            "diff_ids": b.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        });
        if file.get("architecture").is_none() {
            file["architecture"] = json!(self.meta["TARGETARCH"]);
        }
        if file.get("os").is_none() {
            file["os"] = json!("linux");
        }
        let bytes = serde_json::to_vec(&file).expect("serialises");
        let refs = self.opts.tags.iter().map(|r| r.to_string()).collect();
        self.engine.images().add_image(&bytes, &b.layers, refs).map_err(err)
    }
}

enum Item {
    Bytes(String, Vec<u8>),
    Url(String),
    /// A host path, and whether it came from a wildcard.
    Path(PathBuf, bool),
}

/// The key of a context listing: paths, modes, sizes and file contents.
fn listing_key(list: &[(String, fs::Metadata, PathBuf)]) -> String {
    let mut h = Sha256::new();
    for (r, md, path) in list {
        h.update(r.as_bytes());
        h.update(md.mode().to_le_bytes());
        h.update(md.len().to_le_bytes());
        if md.is_file() {
            hash_file(&mut h, path);
        }
    }
    hex::encode(h.finalize())
}

struct HashWriter<'a>(&'a mut Sha256);

impl io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hash_file(h: &mut Sha256, p: &Path) {
    if let Ok(mut f) = fs::File::open(p) {
        let _ = io::copy(&mut f, &mut HashWriter(h));
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn dir_entry(rel: &str, md: &fs::Metadata) -> Entry {
    Entry {
        path: rel.to_string(),
        kind: tarball::Kind::Dir,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime().max(0) as u64,
    }
}

/// A directory a COPY or ADD creates for its destination: 0755, owned by `--chown` or root.
fn new_dir(dest: &str, chown: Option<(u32, u32)>) -> Entry {
    let (uid, gid) = chown.unwrap_or((0, 0));
    Entry { path: rel_of(dest), kind: tarball::Kind::Dir, mode: 0o755, uid, gid, mtime: unix_now() }
}

/// The layer entry for one source path at `target` (absolute in the image).
fn entry_for(
    target: &str,
    md: &fs::Metadata,
    host: &Path,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
) -> Result<Entry> {
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        tarball::Kind::Dir
    } else if ft.is_symlink() {
        tarball::Kind::Symlink(fs::read_link(host).map_err(err)?.to_string_lossy().into_owned())
    } else if ft.is_file() {
        tarball::Kind::File(host.to_path_buf())
    } else if ft.is_fifo() {
        tarball::Kind::Fifo
    } else {
        return Err(Error::new(format!("{}: device files and sockets cannot be copied", host.display())));
    };
    let (uid, gid) = owner.unwrap_or((md.uid(), md.gid()));
    let mode = match (chmod, &kind) {
        (Some(m), k) if !matches!(k, tarball::Kind::Symlink(_)) => m,
        _ => md.mode() & 0o7777,
    };
    Ok(Entry { path: rel_of(target), kind, mode, uid, gid, mtime: md.mtime().max(0) as u64 })
}

/// Entries for everything under `dir` (not following links), placed under `dest`; with
/// `with_root`, `dest` itself gets `dir`'s metadata.
fn collect_tree(
    dir: &Path,
    dest: &str,
    out: &mut Vec<Entry>,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    with_root: bool,
) -> Result<()> {
    if with_root {
        let md = fs::symlink_metadata(dir).map_err(err)?;
        out.push(entry_for(dest, &md, dir, owner, chmod)?);
    }
    let mut names: Vec<_> = fs::read_dir(dir).map_err(err)?.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let target = format!("{}/{}", dest.trim_end_matches('/'), n.to_string_lossy());
        let md = fs::symlink_metadata(&p).map_err(err)?;
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_char_device() && md.rdev() == 0 {
            continue; // a whiteout left by unpacking an archive
        }
        out.push(entry_for(&target, &md, &p, owner, chmod)?);
        if md.is_dir() {
            collect_tree(&p, &target, out, owner, chmod, false)?;
        }
    }
    Ok(())
}

/// `--chown=USER[:GROUP]` against the destination stage's /etc/passwd and /etc/group; numeric
/// ids need no entries. A user without a group gets the group of the same name or number.
fn resolve_chown(spec: &str, v: &view::View) -> Result<(u32, u32)> {
    let passwd = v.read_to_string("/etc/passwd").unwrap_or_default();
    let group = v.read_to_string("/etc/group").unwrap_or_default();
    let (u, g) = spec.split_once(':').map_or((spec, None), |(u, g)| (u, Some(g)));
    let lookup = |table: &str, name: &str| -> Option<u32> {
        table.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[0] == name).then(|| f[2].parse().ok()).flatten()
        })
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => lookup(&passwd, u)
            .ok_or_else(|| Error::new(format!("--chown={spec}: no user {u:?} in the image's /etc/passwd")))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(&group, g)
                .ok_or_else(|| Error::new(format!("--chown={spec}: no group {g:?} in the image's /etc/group")))?,
        },
        None => match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(&group, u).unwrap_or_else(|| {
                // The user's primary group.
                passwd
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() > 3 && f[0] == u).then(|| f[3].parse().ok()).flatten()
                    })
                    .unwrap_or(uid)
            }),
        },
    };
    Ok((uid, gid))
}

/// Removes from a RUN's upper directory the mount points the runtime created (files and
/// directories that did not exist in the image and are empty), and their parents likewise.
fn remove_mount_points(upper: &Path, layers: &[PathBuf], points: &[String]) {
    for p in points {
        let mut cur = PathBuf::from(p);
        loop {
            let rel = cur.to_string_lossy().into_owned();
            if rel.is_empty() || exists_in_layers(layers, &rel) {
                break;
            }
            let full = upper.join(&cur);
            let Ok(md) = fs::symlink_metadata(&full) else { break };
            let empty = if md.is_dir() { dir_is_empty(&full) } else { md.is_file() && md.len() == 0 };
            if !empty {
                break;
            }
            let _ = if md.is_dir() { fs::remove_dir(&full) } else { fs::remove_file(&full) };
            match cur.parent() {
                Some(parent) => cur = parent.to_path_buf(),
                None => break,
            }
        }
    }
}

/// Whether `rel` exists in the overlay of `layers` (bottom first): the top-most layer that has
/// it or hides it (a whiteout, an opaque directory above it) decides.
fn exists_in_layers(layers: &[PathBuf], rel: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for layer in layers.iter().rev() {
        let mut p = layer.clone();
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.file_type().is_char_device() && md.rdev() == 0 => return false,
                Ok(md) if i + 1 == comps.len() => return !md.file_type().is_char_device() || md.rdev() != 0,
                Ok(md) if md.is_dir() => {
                    if xattr_is(&p, "trusted.overlay.opaque", b"y") && i + 1 < comps.len() {
                        // Below an opaque directory, only this layer counts.
                        let rest: PathBuf = comps[i + 1..].iter().collect();
                        return fs::symlink_metadata(p.join(rest)).is_ok();
                    }
                }
                _ => break,
            }
        }
    }
    false
}

fn xattr_is(p: &Path, name: &str, want: &[u8]) -> bool {
    let mut buf = [0u8; 8];
    matches!(rustix::fs::lgetxattr(p, name, &mut buf), Ok(n) if &buf[..n] == want)
}

fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// Whether a file is an archive ADD extracts (tar, gzip or zstd tar).
fn is_archive(p: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut f) = fs::File::open(p) else { return false };
    let n = f.read(&mut head).unwrap_or(0);
    let head = &head[..n];
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (n >= 262 && &head[257..262] == b"ustar")
}

/// Go's `path.Clean` of an absolute path: `/a/./b/../c/` → `/a/c`.
fn clean(p: &str) -> String {
    ignore::clean(&format!("/{p}"))
}

/// A source path relative to the context root: cleaned, never above it.
fn clean_rel(s: &str) -> Result<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in Path::new(s).components() {
        match c {
            Component::Normal(n) => out.push(n.to_str().unwrap_or("")),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out.join("/"))
}

fn rel_of(abs: &str) -> String {
    abs.trim_start_matches('/').to_string()
}

fn join_rel(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}/{b}")
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// One path component against a pattern with `*`, `?`, `[...]` (`^`/`!` negation, ranges) and
/// `\` escapes, as Go's filepath.Match.
pub(crate) fn glob_match(pat: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        if p.is_empty() {
            return n.is_empty();
        }
        match p[0] {
            '*' => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            '?' => !n.is_empty() && go(&p[1..], &n[1..]),
            '[' => {
                let Some(end) = p.iter().skip(1).position(|&c| c == ']').map(|i| i + 1) else {
                    return !n.is_empty() && n[0] == '[' && go(&p[1..], &n[1..]);
                };
                if n.is_empty() {
                    return false;
                }
                let class = &p[1..end];
                let (neg, class) = match class.first() {
                    Some('^') | Some('!') => (true, &class[1..]),
                    _ => (false, class),
                };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= n[0] && n[0] <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == n[0];
                        i += 1;
                    }
                }
                hit != neg && go(&p[end + 1..], &n[1..])
            }
            '\\' if p.len() > 1 => !n.is_empty() && n[0] == p[1] && go(&p[2..], &n[1..]),
            c => !n.is_empty() && n[0] == c && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// `$VAR` and `${VAR}` in a heredoc body (quotes are the body's own).
fn expand_vars(s: &str, vars: &Vars) -> String {
    let mut out = String::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        if cs[i] == '\\' && i + 1 < cs.len() && cs[i + 1] == '$' {
            out.push('$');
            i += 2;
            continue;
        }
        if cs[i] == '$' && i + 1 < cs.len() {
            if cs[i + 1] == '{' {
                if let Some(end) = cs[i + 2..].iter().position(|&c| c == '}') {
                    let name: String = cs[i + 2..i + 2 + end].iter().collect();
                    out.push_str(&vars.0.get(&name).cloned().unwrap_or_default());
                    i += end + 3;
                    continue;
                }
            } else if cs[i + 1] == '_' || cs[i + 1].is_ascii_alphabetic() {
                let mut j = i + 1;
                while j < cs.len() && (cs[j] == '_' || cs[j].is_ascii_alphanumeric()) {
                    j += 1;
                }
                let name: String = cs[i + 1..j].iter().collect();
                out.push_str(&vars.0.get(&name).cloned().unwrap_or_default());
                i = j;
                continue;
            }
        }
        out.push(cs[i]);
        i += 1;
    }
    out
}

/// An HTTP date (`Last-Modified`) as Unix seconds.
fn httpdate_secs(v: &str) -> Option<u64> {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = time::PrimitiveDateTime::parse(v, &fmt).ok()?;
    u64::try_from(t.assume_utc().unix_timestamp()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing_and_cleaning() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("f?le[0-9]", "file7"));
        assert!(!glob_match("f[!i]le", "file"));
        assert_eq!(clean("/app/./x/../y/"), "/app/y");
        assert_eq!(clean("/"), "/");
        assert_eq!(clean_rel("../../etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(clean_rel("./src/").unwrap(), "src");
    }

    #[test]
    fn overlay_lookup() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2) = (t.path().join("1"), t.path().join("2"));
        fs::create_dir_all(l1.join("etc/x")).unwrap();
        fs::write(l1.join("etc/hosts"), b"").unwrap();
        fs::create_dir_all(l2.join("etc")).unwrap();
        nix::sys::stat::mknod(&l2.join("etc/hosts"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
            .unwrap();
        let layers = vec![l1.clone(), l2.clone()];
        assert!(!exists_in_layers(&layers, "etc/hosts"));
        assert!(exists_in_layers(&layers, "etc/x"));
        assert!(exists_in_layers(&layers[..1], "etc/hosts"));
        assert!(!exists_in_layers(&layers, "proc"));
    }
}
