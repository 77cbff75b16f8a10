//! `/api/v1/services`: create, read, list, configure, deploy, scale and delete services; their
//! instances, deploys and logs.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{AppState, Caller, Error};
use crate::server::db::{self, InsertError, Service};
use crate::server::platform::{self, Snapshot};
use crate::server::scaling::{self, Scaling};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/services", get(list).post(create))
        .route("/services/{name}", get(read).patch(update).delete(remove))
        .route("/services/{name}/scaling", patch(set_scaling))
        .route("/services/{name}/https", patch(set_https))
        .route("/services/{name}/deploys", post(deploy).get(list_deploys))
        .route("/services/{name}/deploys/{id}", get(read_deploy))
        .route("/services/{name}/instances", get(instances))
        .route("/services/{name}/revisions", get(revisions))
        .route("/services/{name}/rollback", post(rollback))
        .route("/services/{name}/logs", get(logs))
        .merge(super::traffic::router())
        .merge(super::env::router())
        .merge(super::domains::router())
}

/// The service settings a create, update or deploy may carry.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ServiceSettings")]
pub(super) struct Settings {
    #[serde(default)]
    pub(super) port: Option<u16>,
    /// Variables to set (merged over the stored ones).
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    /// Variables to remove.
    #[serde(default)]
    pub(super) unset_env: Vec<String>,
    /// Secret variables to set: stored sealed, never shown back.
    #[serde(default)]
    pub(super) secrets: BTreeMap<String, String>,
    /// Secret variables to remove.
    #[serde(default)]
    pub(super) unset_secrets: Vec<String>,
    #[serde(default)]
    health_path: Option<String>,
    /// Named volumes and where they are mounted (replaces the list).
    #[serde(default)]
    volumes: Option<Vec<platform::VolumeMount>>,
    /// Run once in each new revision before it takes traffic ("": none).
    #[serde(default)]
    release_command: Option<String>,
    /// Each instance's memory limit, like "256m" or "1g" ("": none).
    #[serde(default)]
    memory: Option<String>,
    /// Each instance's CPUs, like 0.5 (0: no limit).
    #[serde(default)]
    cpus: Option<f64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CreateService")]
pub(super) struct Create {
    #[schemars(regex(pattern = r"^(?!.*--)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    name: String,
    /// Deploy this image right away (optional).
    #[serde(default)]
    image: Option<String>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DeployRequest {
    #[schemars(length(min = 1))]
    image: String,
    /// How long the new revision's first instance gets to become ready ("2m" by default).
    #[serde(default)]
    timeout: Option<String>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "Service")]
pub(super) struct View {
    name: String,
    url: String,
    /// None: chosen at deploy (the env's PORT, the image's single exposed port, else 8080).
    port: Option<u16>,
    env: BTreeMap<String, String>,
    /// The names of the secret variables (their values are never shown).
    secrets: Vec<String>,
    health_path: Option<String>,
    volumes: Vec<platform::VolumeMount>,
    release_command: Option<String>,
    /// Each instance's memory limit in bytes (null: none).
    memory: Option<u64>,
    /// Each instance's CPUs (null: no limit).
    cpus: Option<f64>,
    scaling: scaling::View,
    /// The revision the last deploy or rollback put in service.
    revision: Option<i64>,
    /// Who gets the untagged requests.
    traffic: Vec<platform::TrafficView>,
    /// Tag → revision; each answers at `<tag>--<service>.<domain>`.
    tags: BTreeMap<String, i64>,
    /// Extra host names it answers at.
    domains: Vec<String>,
    /// HTTPS redirect and HSTS (`berth https`).
    https: platform::Https,
    /// The certificate of each name it answers at (empty without `--https-addr`).
    certificates: Vec<crate::server::tls::CertStatus>,
    /// Revisions whose autoscaler is in panic mode.
    panicking: Vec<i64>,
    image: Option<String>,
    status: &'static str,
    instances: Vec<platform::InstanceView>,
    queued: usize,
    in_flight: u32,
    last_error: Option<String>,
    deploying: Option<i64>,
    /// The newest deploy, whatever its outcome (a failed first deploy shows here).
    last_deploy: Option<db::Deploy>,
    /// A container of the serving revision is created (not started) for the next cold start.
    prepared: bool,
    /// Instances that died in a row soon after becoming ready (min instances are restarted with
    /// a backoff doubling from 100 ms to 30 s; 3 or more: status crash-loop).
    crashes: u32,
    created_at: String,
    updated_at: String,
}

impl View {
    fn new(
        state: &AppState,
        s: Service,
        live: Option<Snapshot>,
        last_deploy: Option<db::Deploy>,
        domains: Vec<String>,
    ) -> View {
        let live = live.unwrap_or(Snapshot {
            revision: None,
            traffic: Vec::new(),
            tags: BTreeMap::new(),
            panicking: Vec::new(),
            instances: Vec::new(),
            queued: 0,
            in_flight: 0,
            last_error: None,
            deploying: None,
            status: "not-deployed",
            prepared: false,
            crashes: 0,
        });
        let certificates = match (&state.tls, state.platform.get(&s.name)) {
            (Some(tls), Some(svc)) => state.platform.names_of(&svc).iter().map(|n| tls.status(n)).collect(),
            _ => Vec::new(),
        };
        View {
            https: s.https,
            certificates,
            url: state.url(&s.name),
            scaling: s.scaling.view(),
            port: s.port,
            env: s.env,
            secrets: s.secrets.into_keys().collect(),
            health_path: s.health_path,
            volumes: s.volumes,
            release_command: s.release_command,
            memory: s.resources.memory,
            cpus: s.resources.cpu_millis.map(|m| f64::from(m) / 1000.0),
            revision: s.revision,
            traffic: live.traffic,
            tags: live.tags,
            domains,
            panicking: live.panicking,
            image: live.revision.as_ref().map(|r| r.image.clone()),
            status: live.status,
            instances: live.instances,
            queued: live.queued,
            in_flight: live.in_flight,
            last_error: live.last_error,
            deploying: live.deploying,
            last_deploy,
            prepared: live.prepared,
            crashes: live.crashes,
            created_at: s.created_at,
            updated_at: s.updated_at,
            name: s.name,
        }
    }
}

/// Parses a JSON body; serde's message names the field that is missing, unknown or mistyped
/// (and where), without the names of our Rust types.
pub(super) fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        let msg = e.to_string();
        let msg = match msg.find("expected struct ") {
            Some(i) => {
                let end = msg[i + 16..].find(|c: char| !c.is_alphanumeric()).map_or(msg.len(), |j| i + 16 + j);
                format!("{}expected a JSON object{}", &msg[..i], &msg[end..])
            }
            None => msg,
        };
        Error::BadRequest(format!("invalid JSON body: {msg}"))
    })
}

/// Checks a service name: a DNS label, since the service answers at `<name>.<domain>`.
pub fn check_name(name: &str) -> Result<(), String> {
    crate::server::settings::label_problem(name).map_err(|e| {
        format!("name: {name:?} {e} (a service name is a DNS label: 1-63 lowercase letters, digits and '-', not starting or ending with '-')")
    })?;
    if name.contains("--") {
        return Err(format!(
            "name: {name:?} contains \"--\", which separates a tag from its service in <tag>--<service> host names"
        ));
    }
    Ok(())
}

/// The kernel's limit on one `K=V` string of a process's environment (MAX_ARG_STRLEN).
const MAX_VAR: usize = 128 * 1024 - 1;
/// What all of a service's variables may add up to (the kernel's ARG_MAX is 2 MiB in all).
const MAX_ENV_TOTAL: usize = 1024 * 1024;

fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in env {
        let first_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err(format!(
                "env: {k:?} is not a variable name (a letter or '_', then letters, digits, '_', '.' or '-')"
            ));
        }
        if v.contains('\0') {
            return Err(format!("env: the value of {k} contains a NUL byte"));
        }
        if k.len() + 1 + v.len() > MAX_VAR {
            return Err(format!(
                "env: {k} is {} bytes long; one variable may have at most {MAX_VAR}",
                k.len() + 1 + v.len()
            ));
        }
    }
    Ok(())
}

/// Applies `s` to a service's stored settings, checking each field; secrets are sealed.
pub(super) fn apply(keys: &crate::server::secrets::Keyring, service: &mut Service, s: &Settings) -> Result<(), Error> {
    if s.port == Some(0) {
        return Err(Error::BadRequest("port: 0 is not a port (1-65535)".into()));
    }
    check_env(&s.env).map_err(Error::BadRequest)?;
    check_env(&s.secrets).map_err(|e| Error::BadRequest(e.replacen("env: ", "secrets: ", 1)))?;
    if let Some(k) = s.env.keys().find(|k| s.secrets.contains_key(*k)) {
        return Err(Error::BadRequest(format!("env and secrets both set {k}: a variable is one or the other")));
    }
    if let Some(p) = &s.health_path {
        if !p.is_empty() && (!p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f)) {
            return Err(Error::BadRequest(format!(
                "health_path: {p:?} must be an absolute path without spaces or control characters, like /healthz"
            )));
        }
        service.health_path = if p.is_empty() { None } else { Some(p.clone()) };
    }
    if s.port.is_some() {
        service.port = s.port;
    }
    if let Some(v) = &s.volumes {
        check_volumes(v).map_err(Error::BadRequest)?;
        // Stored as the mount sees it: one slash between parts, none at the end.
        service.volumes = v
            .iter()
            .map(|m| platform::VolumeMount {
                volume: m.volume.clone(),
                path: format!("/{}", m.path.split('/').filter(|c| !c.is_empty()).collect::<Vec<_>>().join("/")),
            })
            .collect();
    }
    if let Some(m) = &s.memory {
        service.resources.memory = if m.is_empty() {
            None
        } else {
            match berth_agent::engine::parse_size(m) {
                Some(b) if b >= 4 << 20 => Some(b),
                Some(_) => {
                    return Err(Error::BadRequest(format!("memory: {m:?} is less than the 4m an instance needs")))
                }
                None => return Err(Error::BadRequest(format!("memory: {m:?} is not a size like 256m or 1g"))),
            }
        };
    }
    if let Some(c) = s.cpus {
        if !c.is_finite() || !(0.0..=1024.0).contains(&c) || (c > 0.0 && c < 0.01) {
            return Err(Error::BadRequest(format!("cpus: {c} must be from 0.01 to 1024 (0: no limit)")));
        }
        service.resources.cpu_millis = if c == 0.0 { None } else { Some((c * 1000.0).round() as u32) };
    }
    if let Some(c) = &s.release_command {
        if c.contains('\0') {
            return Err(Error::BadRequest("release_command: contains a NUL byte".into()));
        }
        service.release_command = if c.trim().is_empty() { None } else { Some(c.clone()) };
    }
    for k in &s.unset_env {
        service.env.remove(k);
    }
    for k in &s.unset_secrets {
        service.secrets.remove(k);
    }
    // A variable set as one kind stops being the other.
    for k in s.env.keys() {
        service.secrets.remove(k);
    }
    for (k, v) in &s.secrets {
        service.env.remove(k);
        service.secrets.insert(k.clone(), keys.seal(&service.name, k, v));
    }
    service.env.extend(s.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // Sealed values are longer than the plain ones: a bound on them bounds the plain ones too.
    let total: usize = service.env.iter().chain(service.secrets.iter()).map(|(k, v)| k.len() + v.len() + 2).sum();
    if total > MAX_ENV_TOTAL {
        return Err(Error::BadRequest(format!(
            "env: the variables and secrets would add up to {total} bytes; at most {MAX_ENV_TOTAL} fit in a process's environment"
        )));
    }
    if service.secrets.contains_key("PORT") {
        return Err(Error::BadRequest("secrets: PORT cannot be a secret: Berth reads it to reach the app".into()));
    }
    if let Some(v) = service.env.get("PORT") {
        let Ok(p) = v.parse::<u16>().map_err(drop).and_then(|p| if p > 0 { Ok(p) } else { Err(()) }) else {
            return Err(Error::BadRequest(format!("env: PORT={v:?} is not a port number (1-65535)")));
        };
        if let Some(port) = service.port.filter(|&port| port != p) {
            return Err(Error::BadRequest(format!(
                "port: {port} differs from env PORT={p}; the app listens on $PORT, so set one of them (or both the same)"
            )));
        }
    }
    Ok(())
}

/// Volume names are DNS labels; each is mounted once, at an absolute path of its own.
fn check_volumes(v: &[platform::VolumeMount]) -> Result<(), String> {
    for (i, m) in v.iter().enumerate() {
        crate::server::settings::label_problem(&m.volume)
            .map_err(|e| format!("volumes[{i}].volume: {:?} {e} (a volume name is a DNS label)", m.volume))?;
        let p = &m.path;
        if p.contains(':') {
            return Err(format!(
                "volumes[{i}].path: {p:?} contains ':' (volumes are mounted read-write; give NAME:PATH)"
            ));
        }
        if !p.starts_with('/') || p == "/" || p.split('/').any(|c| c == ".." || c == ".") || p.contains('\0') {
            return Err(format!(
                "volumes[{i}].path: {p:?} must be an absolute path inside the container, not / and without . or .."
            ));
        }
        if p.starts_with("/proc") || p.starts_with("/sys") {
            return Err(format!("volumes[{i}].path: {p:?} is the kernel's"));
        }
        if v[..i].iter().any(|o| o.volume == m.volume) {
            return Err(format!("volumes[{i}]: volume {} is listed twice", m.volume));
        }
        if v[..i].iter().any(|o| o.path.trim_end_matches('/') == p.trim_end_matches('/')) {
            return Err(format!("volumes[{i}]: two volumes are mounted at {p}"));
        }
    }
    Ok(())
}

fn parse_image(image: &str) -> Result<berth_agent::reference::Reference, Error> {
    image.parse().map_err(|e| Error::BadRequest(format!("image: {e}")))
}

/// Creates a service (stored and live); 409 if the name is taken.
pub(super) async fn insert(state: &AppState, name: &str, settings: &Settings) -> Result<Service, Error> {
    check_name(name).map_err(Error::BadRequest)?;
    if format!("{name}.{}", state.domain) == state.control_host {
        return Err(Error::Conflict(format!(
            "name: {name:?} would answer at {}, which is the control host (the API): choose another name",
            state.control_host
        )));
    }
    let now = db::now();
    let mut service = Service {
        id: 0,
        name: name.to_string(),
        port: None,
        env: BTreeMap::new(),
        secrets: BTreeMap::new(),
        health_path: None,
        volumes: Vec::new(),
        release_command: None,
        resources: Default::default(),
        scaling: Scaling::default(),
        revision: None,
        traffic: None,
        tags: BTreeMap::new(),
        https: Default::default(),
        created_at: now.clone(),
        updated_at: now,
    };
    apply(&state.keys, &mut service, settings)?;
    match db::insert_service(&state.db, &service).await {
        Ok(id) => service.id = id,
        Err(InsertError::Duplicate) => return Err(Error::Conflict(format!("service {name:?} already exists"))),
        Err(InsertError::Other(e)) => return Err(e.into()),
    }
    let live = platform::Service::new(service.name.clone(), service.id, service.scaling, None, state.actions.clone());
    state.platform.insert(live);
    tracing::info!(service = %name, "service created");
    Ok(service)
}

async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<View>), Error> {
    let req: Create = body(&bytes)?;
    let image = req.image.as_deref().map(parse_image).transpose()?;
    let service = insert(&state, &req.name, &req.settings).await?;
    if let Some(image) = image {
        let source = crate::server::deploy::Source::Image(image);
        start_deploy(&state, service.clone(), source, &caller.0, crate::server::deploy::READY_TIMEOUT).await?;
    }
    let view = view(&state, &req.name).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    let mut services = Vec::new();
    for s in db::list_services(&state.db).await? {
        let live = state.platform.get(&s.name).map(|l| l.snapshot());
        let last = db::list_deploys(&state.db, &s.name, 1).await?.pop();
        let domains = db::list_domains(&state.db, s.id).await?;
        services.push(View::new(&state, s, live, last, domains));
    }
    Ok(Json(serde_json::json!({ "services": services })))
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DeployList {
    #[serde(default)]
    limit: Option<i64>,
}

async fn list_deploys(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<DeployList>,
) -> Result<Json<serde_json::Value>, Error> {
    find(&state, &name).await?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(Error::BadRequest(format!("?limit={limit}: must be from 1 to 1000")));
    }
    Ok(Json(serde_json::json!({ "deploys": db::list_deploys(&state.db, &name, limit).await? })))
}

pub(super) async fn find(state: &AppState, name: &str) -> Result<Service, Error> {
    db::get_service(&state.db, name).await?.ok_or_else(|| Error::NotFound(format!("no service named {name:?}")))
}

pub(super) async fn view(state: &AppState, name: &str) -> Result<View, Error> {
    let s = find(state, name).await?;
    let live = state.platform.get(name).map(|l| l.snapshot());
    let last = db::list_deploys(&state.db, name, 1).await?.pop();
    let domains = db::list_domains(&state.db, s.id).await?;
    Ok(View::new(state, s, live, last, domains))
}

async fn read(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<View>, Error> {
    Ok(Json(view(&state, &name).await?))
}

/// Changes what the next deploy uses (port, env, health path); the running revision is not
/// touched.
async fn update(State(state): State<AppState>, Path(name): Path<String>, bytes: Bytes) -> Result<Json<View>, Error> {
    let settings: Settings = body(&bytes)?;
    let mut service = find(&state, &name).await?;
    apply(&state.keys, &mut service, &settings)?;
    db::set_service_config(&state.db, &service).await?;
    Ok(Json(view(&state, &name).await?))
}

async fn set_scaling(
    State(state): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Json<View>, Error> {
    let patch: scaling::Patch = body(&bytes)?;
    let service = find(&state, &name).await?;
    let scaling = service.scaling.apply(&patch).map_err(Error::BadRequest)?;
    if !db::set_scaling(&state.db, &name, &scaling).await? {
        return Err(Error::NotFound(format!("no service named {name:?}")));
    }
    if let Some(live) = state.platform.get(&name) {
        live.set_scaling(scaling);
    }
    tracing::info!(service = %name, "scaling changed");
    Ok(Json(view(&state, &name).await?))
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpsPatch {
    /// Redirect plain HTTP to HTTPS (308), except ACME challenges.
    redirect: Option<bool>,
    /// Strict-Transport-Security max-age in seconds, at most two years; 0 turns it off.
    #[schemars(range(max = 63072000))]
    hsts_max_age: Option<u64>,
    /// The instances speak h2c (HTTP/2 without TLS): upstream connections use it.
    h2c: Option<bool>,
}

/// Changes a service's HTTPS redirect and HSTS; fields left out keep their value.
async fn set_https(State(state): State<AppState>, Path(name): Path<String>, bytes: Bytes) -> Result<Json<View>, Error> {
    let patch: HttpsPatch = body(&bytes)?;
    if state.tls.is_none() && (patch.redirect == Some(true) || patch.hsts_max_age.is_some_and(|n| n > 0)) {
        return Err(Error::Conflict("the server runs without TLS (--https-addr off): nothing to redirect to".into()));
    }
    let service = find(&state, &name).await?;
    let mut h = service.https;
    if let Some(r) = patch.redirect {
        h.redirect = r;
    }
    if let Some(v) = patch.h2c {
        h.h2c = v;
    }
    match patch.hsts_max_age {
        Some(0) => h.hsts_max_age = None,
        Some(n) if n > 2 * 365 * 86400 => {
            return Err(Error::BadRequest(format!("hsts_max_age: {n} is more than two years (63072000)")))
        }
        Some(n) => h.hsts_max_age = Some(n),
        None => {}
    }
    if !db::set_https(&state.db, &name, &h).await? {
        return Err(Error::NotFound(format!("no service named {name:?}")));
    }
    if let Some(live) = state.platform.get(&name) {
        live.set_https(h);
    }
    tracing::info!(service = %name, redirect = h.redirect, hsts = ?h.hsts_max_age, "https settings changed");
    Ok(Json(view(&state, &name).await?))
}

async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, Error> {
    if !db::delete_service(&state.db, &name).await? {
        return Err(Error::NotFound(format!("no service named {name:?}")));
    }
    if let Some(live) = state.platform.remove(&name) {
        live.delete();
    }
    let _ = std::fs::remove_dir_all(crate::server::instance::log_dir(&state.data_dir, &name));
    // Its git repository too: a new service of the same name starts with no history.
    let _ = std::fs::remove_dir_all(crate::server::git::repo::path(&state.data_dir, &name));
    // A deploy token of a deleted service must not deploy a new one of the same name.
    let revoked = db::delete_service_tokens(&state.db, &name).await?;
    crate::server::write_gc_roots(&state).await;
    tracing::info!(service = %name, tokens_revoked = revoked, "service deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub(super) struct DeployQuery {
    #[serde(default)]
    pub(super) wait: Option<String>,
}

/// A deploy's `timeout` field: 1s to 1h, by default deploy::READY_TIMEOUT.
pub(super) fn parse_timeout(t: &Option<String>) -> Result<Duration, Error> {
    match t {
        Some(t) => {
            let ms = scaling::parse_duration(t).map_err(|e| Error::BadRequest(format!("timeout: {e}")))?;
            if !(1000..=3_600_000).contains(&ms) {
                return Err(Error::BadRequest(format!("timeout: {t:?} must be from 1s to 1h")));
            }
            Ok(Duration::from_millis(ms))
        }
        None => Ok(crate::server::deploy::READY_TIMEOUT),
    }
}

/// A boolean query parameter: absent or `0|false|no` is false, `""|1|true|yes` true.
pub(super) fn flag(name: &str, v: &Option<String>) -> Result<bool, Error> {
    match v.as_deref() {
        None | Some("0" | "false" | "no") => Ok(false),
        Some("" | "1" | "true" | "yes") => Ok(true),
        Some(other) => Err(Error::BadRequest(format!("?{name}={other}: expected true or false"))),
    }
}

/// Records a deploy and starts it in its own task; returns its id and its event stream.
pub(super) async fn start_deploy(
    state: &AppState,
    service: Service,
    source: crate::server::deploy::Source,
    caller: &str,
    timeout: Duration,
) -> Result<
    (i64, tokio::sync::mpsc::UnboundedReceiver<crate::server::deploy::Event>, tokio::task::JoinHandle<db::Deploy>),
    Error,
> {
    let live = state
        .platform
        .get(&service.name)
        .ok_or_else(|| Error::NotFound(format!("no service named {:?}", service.name)))?;
    let (kind, revision, image) = match &source {
        crate::server::deploy::Source::Image(r) | crate::server::deploy::Source::Local(r) => {
            ("deploy", None, r.to_string())
        }
        crate::server::deploy::Source::Config(n) => {
            let image = db::get_revision(&state.db, service.id, *n).await?.map(|r| r.image).unwrap_or_default();
            ("config", None, image)
        }
        crate::server::deploy::Source::Revision(n) => {
            let image = db::get_revision(&state.db, service.id, *n).await?.map(|r| r.image).unwrap_or_default();
            ("rollback", Some(*n), image)
        }
    };
    let id = db::insert_deploy(&state.db, service.id, kind, revision, &image, caller).await?;
    if let Err(other) = live.begin_deploy(id) {
        // Refused: it never began, so it leaves no record.
        db::delete_deploy(&state.db, id).await?;
        return Err(Error::Conflict(format!(
            "deploy {other} of service {} is still running; wait for it to finish",
            service.name
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::spawn(crate::server::deploy::run(state.clone(), service, live, id, source, timeout, tx));
    Ok((id, rx, handle))
}

/// `POST /services/{name}/deploys`: deploys an image, creating the service if needed.
/// Answers 202 with the deploy at once; with `?wait=true` once it served or failed (200, or 422
/// with the reason); with `Accept: application/x-ndjson` as a stream of events, the last one
/// the finished deploy.
async fn deploy(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<DeployQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Error> {
    let req: DeployRequest = body(&bytes)?;
    let image = parse_image(&req.image)?;
    let wait = flag("wait", &q.wait)?;
    let timeout = parse_timeout(&req.timeout)?;
    check_name(&name).map_err(Error::BadRequest)?;
    // The deploy's settings are stored only if it succeeds (deploy::run does): a refused or
    // failed deploy changes nothing. A new service is created with them.
    let service = match db::get_service(&state.db, &name).await? {
        Some(mut s) => {
            apply(&state.keys, &mut s, &req.settings)?;
            s
        }
        None => match insert(&state, &name, &req.settings).await {
            Ok(s) => s,
            // Another first deploy created it a moment ago: deploy to it (or be told it is busy).
            Err(Error::Conflict(_)) => {
                let mut s = find(&state, &name).await?;
                apply(&state.keys, &mut s, &req.settings)?;
                s
            }
            Err(e) => return Err(e),
        },
    };
    let source = crate::server::deploy::Source::Image(image);
    let started = start_deploy(&state, service, source, &caller.0, timeout).await?;
    respond(&state, &name, started, &headers, wait).await
}

type Started =
    (i64, tokio::sync::mpsc::UnboundedReceiver<crate::server::deploy::Event>, tokio::task::JoinHandle<db::Deploy>);

/// A deploy's answer: an NDJSON event stream (`Accept: application/x-ndjson`), the finished
/// deploy (`wait`: 200, or 422 with the reason), or 202 and the deploy as it starts.
pub(super) async fn respond(
    state: &AppState,
    name: &str,
    started: Started,
    headers: &HeaderMap,
    wait: bool,
) -> Result<Response, Error> {
    let (id, mut events, handle) = started;
    let stream =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/x-ndjson"));
    if stream {
        let body = async_stream(move |tx| async move {
            while let Some(ev) = events.recv().await {
                let mut line = serde_json::to_vec(&ev).expect("events serialise");
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        });
        return Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response());
    }
    if wait {
        let deploy = handle.await.map_err(|e| anyhow::anyhow!("the deploy task failed: {e}"))?;
        if deploy.status == "succeeded" {
            return Ok(Json(deploy).into_response());
        }
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(deploy)).into_response());
    }
    let deploy = db::get_deploy(&state.db, name, id).await?.ok_or_else(|| anyhow::anyhow!("deploy {id} vanished"))?;
    Ok((StatusCode::ACCEPTED, Json(deploy)).into_response())
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Rollback {
    /// Default: the newest revision older than the serving one that once served.
    #[serde(default)]
    #[schemars(range(min = 1))]
    revision: Option<i64>,
    /// How long its instance gets to become ready ("2m" by default).
    #[serde(default)]
    timeout: Option<String>,
}

/// `POST /services/{name}/rollback`: puts an earlier revision back in service, the way a
/// deploy does (its instance must be ready before the traffic moves). Answers as a deploy.
async fn rollback(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<DeployQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Error> {
    let req: Rollback = if bytes.is_empty() { Rollback::default() } else { body(&bytes)? };
    let wait = flag("wait", &q.wait)?;
    let service = find(&state, &name).await?;
    let revisions = db::list_revisions(&state.db, service.id).await?;
    let Some(current) = service.revision else {
        return Err(Error::Conflict(format!("service {name:?} has no revision in service yet: deploy one first")));
    };
    let target = match req.revision {
        Some(n) if revisions.iter().any(|r| r.number == n) => n,
        Some(n) => return Err(Error::NotFound(format!("service {name:?} has no revision {n}"))),
        None => revisions
            .iter()
            .filter(|r| r.number < current && r.served_at.is_some())
            .map(|r| r.number)
            .max()
            .ok_or_else(|| {
                Error::Conflict(format!("service {name:?} has no revision older than {current} that ever served"))
            })?,
    };
    let timeout = parse_timeout(&req.timeout)?;
    if target == current {
        return Err(Error::Conflict(format!("revision {target} of {name:?} is already serving")));
    }
    let source = crate::server::deploy::Source::Revision(target);
    let started = start_deploy(&state, service, source, &caller.0, timeout).await?;
    respond(&state, &name, started, &headers, wait).await
}

/// `GET /services/{name}/revisions`: newest first, each with its share of the traffic and tags.
async fn revisions(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<serde_json::Value>, Error> {
    let service = find(&state, &name).await?;
    let traffic = super::traffic::stored_traffic(&service);
    let list: Vec<serde_json::Value> = db::list_revisions(&state.db, service.id)
        .await?
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "number": r.number, "image": r.image, "image_id": r.image_id, "port": r.port,
                "env": r.env, "secrets": r.secrets.keys().collect::<Vec<_>>(), "health_path": r.health_path,
                "volumes": r.volumes, "release_command": r.release_command,
                "memory": r.resources.memory, "cpus": r.resources.cpu_millis.map(|m| f64::from(m) / 1000.0), "created_at": r.created_at,
                "served_at": r.served_at,
                "serving": traffic.iter().any(|t| t.revision == r.number && t.percent > 0),
                "percent": traffic.iter().find(|t| t.revision == r.number).map_or(0, |t| t.percent),
                "tags": service.tags.iter().filter(|(_, &n)| n == r.number).map(|(t, _)| t).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "revisions": list })))
}

async fn read_deploy(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, i64)>,
) -> Result<Json<db::Deploy>, Error> {
    find(&state, &name).await?;
    db::get_deploy(&state.db, &name, id)
        .await?
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("service {name:?} has no deploy {id}")))
}

async fn instances(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<serde_json::Value>, Error> {
    find(&state, &name).await?;
    let snap = state.platform.get(&name).map(|l| l.snapshot());
    Ok(Json(serde_json::json!({ "instances": snap.map(|s| s.instances).unwrap_or_default() })))
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub(super) struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
    #[serde(default)]
    tail: Option<usize>,
}

/// `GET /services/{name}/logs`: the output of the service's instances, stopped ones included
/// (the last 20 kept), as NDJSON lines `{"time", "instance", "stream", "line"}` ordered by time;
/// `?tail=N` keeps the last N; `?follow=true` then streams new lines as they are written.
async fn logs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, Error> {
    find(&state, &name).await?;
    let follow = flag("follow", &q.follow)?;
    let tail = q.tail;
    let st = state.clone();
    let body = async_stream(move |tx| async move {
        use crate::server::logs::ServiceLogs;
        // The reads are blocking file I/O: each batch runs on a blocking thread, which gets the
        // reader and hands it back.
        let mut logs = Some(ServiceLogs::new(st.engine.clone(), st.data_dir.clone(), name.clone()));
        let mut first = true;
        loop {
            let Some(mut l) = logs.take() else { return };
            let batch = tokio::task::spawn_blocking(move || {
                let lines = if first { l.read_all(tail) } else { l.poll() };
                (l, lines)
            })
            .await;
            let Ok((l, lines)) = batch else { return };
            logs = Some(l);
            for line in lines {
                if tx.send(line.to_ndjson()).await.is_err() {
                    return;
                }
            }
            if !follow || st.platform.get(&name).is_none() {
                return;
            }
            first = false;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// A streamed body fed by `f` through a channel; the stream ends when `f` returns.
pub(super) fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(f(tx));
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "hello", "my-app-2", "0day", &"x".repeat(63)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "is empty"),
            ("Hello", "contains 'H'"),
            ("my_app", "contains '_'"),
            ("a.b", "contains '.'"),
            ("-a", "starts or ends with '-'"),
            ("a-", "starts or ends with '-'"),
            ("canary--web", "contains \"--\""),
            (&"x".repeat(64), "64 characters long"),
        ];
        for (name, want) in bad {
            let err = check_name(name).unwrap_err();
            assert!(err.starts_with("name: ") && err.contains(want), "{name:?}: {err}");
        }
    }

    #[test]
    fn envs() {
        let env = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(check_env(&env("PORT", "8080")), Ok(()));
        assert!(check_env(&env("", "x")).unwrap_err().starts_with("env: "));
        assert!(check_env(&env("A=B", "x")).unwrap_err().contains("\"A=B\""));
        assert!(check_env(&env("A", "x\0")).unwrap_err().contains("NUL"));
        assert!(check_env(&env("A B", "1")).unwrap_err().contains("is not a variable name"));
        assert!(check_env(&env("1A", "1")).unwrap_err().contains("is not a variable name"));
        assert_eq!(check_env(&env("my.app-key_2", "1")), Ok(()));
        assert!(check_env(&env("BIG", &"x".repeat(200_000))).unwrap_err().contains("at most 131071"));
    }
}
