//! `/api/v1/tokens`: API tokens. An `admin` token may do everything; a `deploy` token is
//! scoped to one service and may only deploy it and follow its deploys (for CI). A token is
//! shown once, when it is made; only its SHA-256 is stored.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;

use super::services::body;
use super::{AppState, Error};
use crate::server::db::{self, InsertError};

pub fn router() -> Router<AppState> {
    Router::new().route("/tokens", get(list).post(create)).route("/tokens/{name}", delete(revoke))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CreateToken")]
pub(super) struct Create {
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    name: String,
    /// `admin` or `deploy`.
    #[schemars(regex(pattern = r"^(admin|deploy)$"))]
    scope: String,
    /// The service a `deploy` token may deploy.
    #[serde(default)]
    service: Option<String>,
}

async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    Ok(Json(serde_json::json!({ "tokens": db::list_tokens(&state.db).await? })))
}

/// `POST /tokens` `{"name", "scope": "admin"|"deploy", "service"}`: 201 with the token, the
/// only time it is shown.
async fn create(State(state): State<AppState>, bytes: Bytes) -> Result<(StatusCode, Json<serde_json::Value>), Error> {
    let req: Create = body(&bytes)?;
    crate::server::settings::label_problem(&req.name)
        .map_err(|e| Error::BadRequest(format!("name: {:?} {e} (1-63 lowercase letters, digits and '-')", req.name)))?;
    match (req.scope.as_str(), &req.service) {
        ("admin", None) => {}
        ("admin", Some(_)) => {
            return Err(Error::BadRequest(
                "service: an admin token is not scoped to a service; use scope \"deploy\"".into(),
            ))
        }
        ("deploy", Some(svc)) => {
            if db::get_service(&state.db, svc).await?.is_none() {
                return Err(Error::NotFound(format!("service: no service named {svc:?}")));
            }
        }
        ("deploy", None) => {
            return Err(Error::BadRequest("service: a deploy token needs the service it may deploy".into()))
        }
        (other, _) => return Err(Error::BadRequest(format!("scope: {other:?} is not \"admin\" or \"deploy\""))),
    }
    let token = crate::server::token::generate()?;
    let t = db::Token { name: req.name.clone(), scope: req.scope, service: req.service, created_at: db::now() };
    match db::insert_token(&state.db, &t, &crate::server::token::hash(&token)).await {
        Ok(()) => {}
        Err(InsertError::Duplicate) => return Err(Error::Conflict(format!("a token named {:?} exists", req.name))),
        Err(InsertError::Other(e)) => return Err(e.into()),
    }
    tracing::info!(token = %t.name, scope = %t.scope, service = ?t.service, "token created");
    let mut v = serde_json::to_value(&t).map_err(anyhow::Error::from)?;
    v["token"] = token.into();
    Ok((StatusCode::CREATED, Json(v)))
}

async fn revoke(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, Error> {
    if name == crate::server::token::ADMIN {
        return Err(Error::Conflict(
            "the admin token cannot be revoked (it is made again at start); delete <data-dir>/admin-token and restart to change it".into(),
        ));
    }
    if !db::delete_token(&state.db, &name).await? {
        return Err(Error::NotFound(format!("no token named {name:?}")));
    }
    tracing::info!(token = %name, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}
