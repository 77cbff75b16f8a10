//! `/api/v1/services/{name}/env`: a service's variables and secrets. A change rolls out at
//! once as a new revision of the serving image (as Cloud Run does), the way a deploy does: the
//! old revision serves until the new one is ready, and a failure changes nothing.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};

use super::services::{apply, body, find, flag, respond, start_deploy, DeployQuery, Settings};
use super::{AppState, Caller, Error};
use crate::server::db::{self, Service};

pub fn router() -> Router<AppState> {
    Router::new().route("/services/{name}/env", get(read).post(change))
}

fn env_view(s: &Service) -> serde_json::Value {
    serde_json::json!({ "env": s.env, "secrets": s.secrets.keys().collect::<Vec<_>>() })
}

async fn read(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<serde_json::Value>, Error> {
    Ok(Json(env_view(&find(&state, &name).await?)))
}

/// `POST /services/{name}/env` `{"env": {...}, "unset_env": [...], "secrets": {...},
/// "unset_secrets": [...]}`: stores the change and, if a revision serves, deploys its image
/// with it (answered as a deploy: 202, `?wait=true`, or an NDJSON stream). Not deployed yet:
/// stored for the first deploy, 200 with the variables.
async fn change(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<DeployQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Error> {
    let settings: Settings = body(&bytes)?;
    let wait = flag("wait", &q.wait)?;
    let mut service = find(&state, &name).await?;
    for k in settings.unset_env.iter().chain(&settings.unset_secrets) {
        if !service.env.contains_key(k) && !service.secrets.contains_key(k) {
            return Err(Error::BadRequest(format!("{k} is neither a variable nor a secret of {name}")));
        }
    }
    apply(&state.keys, &mut service, &settings)?;
    let Some(current) = service.revision else {
        db::set_service_config(&state.db, &service).await?;
        return Ok(Json(env_view(&service)).into_response());
    };
    let source = crate::server::deploy::Source::Config(current);
    let started = start_deploy(&state, service, source, &caller.0, crate::server::deploy::READY_TIMEOUT).await?;
    respond(&state, &name, started, &headers, wait).await
}
