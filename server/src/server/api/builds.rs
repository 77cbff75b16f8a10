//! `/services/{name}/builds`: build a source tree (a tar or tar.gz of the context, what
//! `berth deploy --source` and `git push` send) with the embedded builder, then deploy the image
//! with the usual rolling swap; list builds and read their logs.
//!
//! `POST` answers at once with an NDJSON stream: `{"type":"log","line":...}` for every line of
//! build and deploy output, then exactly one `{"type":"result","ok":...}`. The build goes on if
//! the client goes away; its log is kept in `<data-dir>/builds/<id>.log`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::services::{apply, async_stream, find, insert, start_deploy, Settings};
use super::{AppState, Caller, Error};
use crate::server::db;
use crate::server::manifest::Manifest;

/// The largest build context accepted.
const MAX_CONTEXT: u64 = 2 << 30;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/services/{name}/builds", get(list).post(create))
        .route("/services/{name}/builds/{id}", get(read))
        .route("/services/{name}/builds/{id}/log", get(log))
}

/// How builds run on this server (`--build-cpus`, `--build-memory`) and how many at once.
#[derive(Debug)]
pub struct Builds {
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub slots: tokio::sync::Semaphore,
}

impl Builds {
    pub fn new(cpus: Option<f64>, memory: Option<u64>, at_once: usize) -> Builds {
        Builds { cpus, memory, slots: tokio::sync::Semaphore::new(at_once.max(1)) }
    }
}

pub fn log_path(data_dir: &FsPath, id: i64) -> PathBuf {
    data_dir.join("builds").join(format!("{id}.log"))
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BuildQuery {
    /// `git` (a push) or `upload` (default).
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    commit: Option<String>,
    #[serde(default)]
    branch: Option<String>,
    /// Overrides berth.toml's `[build]`.
    #[serde(default)]
    dockerfile: Option<String>,
    #[serde(default)]
    target: Option<String>,
    /// `KEY=VALUE` pairs separated by newlines, over berth.toml's `build.args`.
    #[serde(default)]
    build_args: Option<String>,
    /// A JSON service settings object (as a deploy's), over berth.toml's `[service]`.
    #[serde(default)]
    settings: Option<String>,
    #[serde(default)]
    no_cache: Option<String>,
    /// How long the new revision's first instance gets to become ready ("2m").
    #[serde(default)]
    timeout: Option<String>,
}

/// One line of the stream, and of the log file.
struct Out {
    tx: tokio::sync::mpsc::UnboundedSender<serde_json::Value>,
    file: Option<std::fs::File>,
}

impl Out {
    fn line(&mut self, line: &str) {
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
        }
        let _ = self.tx.send(json!({ "type": "log", "line": line }));
    }
}

/// `POST /services/{name}/builds`: the body is the build context (tar, tar.gz or tar.zst).
async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<BuildQuery>,
    body: Body,
) -> Result<Response, Error> {
    super::check_name(&name).map_err(Error::BadRequest)?;
    let source = match q.source.as_deref() {
        None | Some("upload") => "upload",
        Some("git") => "git",
        Some(other) => return Err(Error::BadRequest(format!("?source={other}: expected git or upload"))),
    };
    if let Some(c) = &q.commit {
        if c.len() > 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadRequest(format!("?commit={c}: expected a hex commit id")));
        }
    }
    let timeout = super::services::parse_timeout(&q.timeout)?;
    let no_cache = super::services::flag("no_cache", &q.no_cache)?;
    let overrides: serde_json::Map<String, serde_json::Value> = match &q.settings {
        Some(s) => serde_json::from_str(s).map_err(|e| Error::BadRequest(format!("?settings: {e}")))?,
        None => serde_json::Map::new(),
    };
    let build_args = parse_args(q.build_args.as_deref().unwrap_or(""))?;

    // The context goes to disk first: a tar is unpacked as a whole.
    let work = state.data_dir.join("builds").join(format!("ctx-{}", &berth_agent::container::new_id()[..16]));
    std::fs::create_dir_all(&work).map_err(|e| anyhow::anyhow!("creating {}: {e}", work.display()))?;
    let cleanup = Cleanup(work.clone());
    let tarball = work.join("context.tar");
    receive(body, &tarball).await?;
    let root = work.join("root");
    std::fs::create_dir_all(&root).map_err(|e| anyhow::anyhow!("creating {}: {e}", root.display()))?;
    let (t2, r2) = (tarball.clone(), root.clone());
    tokio::task::spawn_blocking(move || berth_agent::layer::unpack(&t2, &r2))
        .await
        .map_err(|e| anyhow::anyhow!("unpacking the context: {e}"))?
        .map_err(|e| Error::BadRequest(format!("the build context is not a valid tar archive: {e}")))?;
    let _ = std::fs::remove_file(&tarball);

    let manifest = Manifest::load(&root).map_err(Error::BadRequest)?;
    let mut settings_json = manifest.settings_json().map_err(Error::BadRequest)?;
    for (k, v) in overrides {
        match (k.as_str(), settings_json.get_mut("env"), &v) {
            ("env", Some(serde_json::Value::Object(base)), serde_json::Value::Object(over)) => {
                base.extend(over.clone());
            }
            _ => {
                settings_json.insert(k, v);
            }
        }
    }
    let settings: Settings = serde_json::from_value(serde_json::Value::Object(settings_json))
        .map_err(|e| Error::BadRequest(format!("service settings (berth.toml [service] or ?settings): {e}")))?;
    let service = match db::get_service(&state.db, &name).await? {
        Some(s) => s,
        None => match insert(&state, &name, &settings).await {
            Ok(s) => s,
            Err(Error::Conflict(_)) => find(&state, &name).await?,
            Err(e) => return Err(e),
        },
    };
    let mut build = manifest.build.clone();
    if q.dockerfile.is_some() {
        build.dockerfile = q.dockerfile.clone();
    }
    if q.target.is_some() {
        build.target = q.target.clone();
    }
    build.args.extend(build_args);
    let id =
        db::insert_build(&state.db, service.id, source, q.commit.as_deref(), q.branch.as_deref(), &caller.0).await?;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let job = Job {
        state: state.clone(),
        name: name.clone(),
        id,
        root,
        build,
        settings,
        scaling: manifest.service.scaling,
        no_cache,
        timeout,
        caller: caller.0.clone(),
    };
    tokio::spawn(async move {
        let _cleanup = cleanup;
        job.run(tx).await;
    });
    let body = async_stream(move |out| async move {
        while let Some(v) = rx.recv().await {
            let mut line = serde_json::to_vec(&v).expect("serialises");
            line.push(b'\n');
            if out.send(Bytes::from(line)).await.is_err() {
                // The client left; the build goes on (and keeps its log).
                while rx.recv().await.is_some() {}
                return;
            }
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Streams the request body into `dest`, at most [`MAX_CONTEXT`] bytes.
async fn receive(body: Body, dest: &FsPath) -> Result<(), Error> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::File::create(dest).await.map_err(|e| anyhow::anyhow!("creating {}: {e}", dest.display()))?;
    let mut stream = body.into_data_stream();
    let mut n: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the build context: {e}")))?;
        n += chunk.len() as u64;
        if n > MAX_CONTEXT {
            return Err(Error::BadRequest(format!("the build context is larger than {} bytes", MAX_CONTEXT)));
        }
        f.write_all(&chunk).await.map_err(|e| anyhow::anyhow!("writing {}: {e}", dest.display()))?;
    }
    if n == 0 {
        return Err(Error::BadRequest("the body is empty: send a tar of the build context".into()));
    }
    f.flush().await.map_err(|e| anyhow::anyhow!("writing {}: {e}", dest.display()))?;
    Ok(())
}

/// `KEY=VALUE` lines.
fn parse_args(s: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for line in s.lines().filter(|l| !l.is_empty()) {
        match line.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => return Err(Error::BadRequest(format!("?build_args: {line:?} is not KEY=VALUE"))),
        }
    }
    Ok(out)
}

struct Job {
    state: AppState,
    name: String,
    id: i64,
    root: PathBuf,
    build: crate::server::manifest::Build,
    settings: Settings,
    scaling: Option<crate::server::scaling::Patch>,
    no_cache: bool,
    timeout: std::time::Duration,
    caller: String,
}

impl Job {
    async fn run(self, tx: tokio::sync::mpsc::UnboundedSender<serde_json::Value>) {
        let path = log_path(&self.state.data_dir, self.id);
        let _ = std::fs::create_dir_all(path.parent().expect("a parent"));
        let file = std::fs::File::create(&path).ok();
        let mut out = Out { tx: tx.clone(), file };
        let result = self.steps(&mut out).await;
        let (status, deploy, error) = match &result {
            Ok((d, _, _)) => ("succeeded", Some(*d), None),
            Err((d, e)) => ("failed", *d, Some(e.clone())),
        };
        if let Some(e) = &error {
            for l in e.lines() {
                out.line(l);
            }
        }
        if let Err(e) =
            db::update_build(&self.state.db, self.id, status, None, None, deploy, error.as_deref(), true).await
        {
            tracing::error!(error = %format!("{e:#}"), "recording the end of a build");
        }
        let v = match result {
            Ok((deploy, revision, url)) => {
                out.line(&format!("deployed revision {revision}: {url}"));
                json!({ "type": "result", "ok": true, "build": self.id, "deploy": deploy, "revision": revision, "url": url })
            }
            Err((deploy, e)) => {
                json!({ "type": "result", "ok": false, "build": self.id, "deploy": deploy, "error": e })
            }
        };
        let _ = tx.send(v);
    }

    /// Builds, then deploys: Ok(deploy, revision, url) or Err(deploy if one started, why).
    async fn steps(&self, out: &mut Out) -> Result<(i64, i64, String), (Option<i64>, String)> {
        let state = &self.state;
        let builds = state.builds.clone();
        if builds.slots.available_permits() == 0 {
            out.line("waiting for another build to finish");
        }
        let permit = builds.slots.acquire().await.map_err(|_| (None, "the server is stopping".to_string()))?;
        let context = match &self.build.context {
            Some(c) => self.root.join(c),
            None => self.root.clone(),
        };
        let reference: berth_agent::reference::Reference = format!("berth.local/{}:build-{}", self.name, self.id)
            .parse()
            .map_err(|e| (None, format!("naming the image: {e}")))?;
        let opts = berth_agent::build::Options {
            context,
            dockerfile: self.build.dockerfile.as_ref().map(|d| self.root.join(d)),
            tags: vec![reference.clone()],
            build_args: self.build.args.clone(),
            target: self.build.target.clone(),
            memory: builds.memory,
            cpus: builds.cpus,
            no_cache: self.no_cache,
            pull: false,
            secrets: BTreeMap::new(),
        };
        out.line(&format!("building {} (build {})", self.name, self.id));
        let (engine, handle) = (state.engine.clone(), tokio::runtime::Handle::current());
        let (ltx, mut lrx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let task = tokio::task::spawn_blocking(move || {
            let mut say = |l: &str| {
                let _ = ltx.send(l.to_string());
            };
            berth_agent::build::build(&engine, &handle, &opts, &mut say)
        });
        while let Some(l) = lrx.recv().await {
            out.line(&l);
        }
        let built = task.await.map_err(|e| (None, format!("the build task failed: {e}")))?;
        drop(permit);
        let built = built.map_err(|e| (None, format!("build failed: {e}")))?;
        let _ = db::update_build(
            &state.db,
            self.id,
            "deploying",
            Some(&reference.to_string()),
            Some(built.image.id.as_str()),
            None,
            None,
            false,
        )
        .await;
        // The settings become the service's only if the deploy succeeds (deploy::run stores them).
        let mut service = find(state, &self.name).await.map_err(|e| (None, api_error(e)))?;
        apply(&state.keys, &mut service, &self.settings).map_err(|e| (None, api_error(e)))?;
        let source = crate::server::deploy::Source::Local(reference);
        let (deploy_id, mut events, handle) =
            start_deploy(state, service, source, &self.caller, self.timeout).await.map_err(|e| (None, api_error(e)))?;
        let _ = db::update_build(&state.db, self.id, "deploying", None, None, Some(deploy_id), None, false).await;
        out.line(&format!("deploying (deploy {deploy_id})"));
        while let Some(ev) = events.recv().await {
            if let crate::server::deploy::Event::Progress { message } = ev {
                out.line(&message);
            }
        }
        let deploy = handle.await.map_err(|e| (Some(deploy_id), format!("the deploy task failed: {e}")))?;
        if deploy.status != "succeeded" {
            return Err((Some(deploy_id), format!("deploy failed: {}", deploy.error.unwrap_or_default())));
        }
        if let Some(patch) = &self.scaling {
            let svc = find(state, &self.name).await.map_err(|e| (Some(deploy_id), api_error(e)))?;
            let scaling = svc
                .scaling
                .apply(patch)
                .map_err(|e| (Some(deploy_id), format!("berth.toml [service.scaling]: {e}")))?;
            if db::set_scaling(&state.db, &self.name, &scaling).await.unwrap_or(false) {
                if let Some(live) = state.platform.get(&self.name) {
                    live.set_scaling(scaling);
                }
            }
        }
        Ok((deploy_id, deploy.revision.unwrap_or_default(), state.url(&self.name)))
    }
}

fn api_error(e: Error) -> String {
    match e {
        Error::BadRequest(m)
        | Error::Unauthorized(m)
        | Error::Forbidden(m)
        | Error::NotFound(m)
        | Error::Conflict(m)
        | Error::Unprocessable(m) => m,
        Error::MethodNotAllowed => "method not allowed".into(),
        Error::Internal(e) => {
            tracing::error!(error = %format!("{e:#}"), "build");
            "internal error: see the server's log".into()
        }
    }
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub(super) struct ListQuery {
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    limit: Option<i64>,
}

/// `GET /services/{name}/builds`: newest first.
async fn list(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<db::Build>>, Error> {
    find(&state, &name).await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(Error::BadRequest(format!("?limit={limit}: must be from 1 to 1000")));
    }
    Ok(Json(db::list_builds(&state.db, &name, limit).await?))
}

async fn read(State(state): State<AppState>, Path((name, id)): Path<(String, i64)>) -> Result<Json<db::Build>, Error> {
    db::get_build(&state.db, &name, id)
        .await?
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("service {name:?} has no build {id}")))
}

/// `GET /services/{name}/builds/{id}/log`: the build's output as text.
async fn log(State(state): State<AppState>, Path((name, id)): Path<(String, i64)>) -> Result<Response, Error> {
    db::get_build(&state.db, &name, id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("service {name:?} has no build {id}")))?;
    let text = tokio::fs::read(log_path(&state.data_dir, id)).await.unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}
