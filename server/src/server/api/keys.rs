//! `/api/v1/keys`: the SSH public keys allowed to `git push` to Berth's SSH server (admin
//! only: a key may push, and so deploy, any service and create new ones). And
//! `/api/v1/services/{name}/git`: a service's deploy branch and the remotes to push to.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::Deserialize;

use super::services::body;
use super::{AppState, Caller, Error, Scope};
use crate::server::db::InsertError;
use crate::server::git::{self, keys};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/keys", get(list).post(add))
        .route("/keys/{name}", delete(remove))
        .route("/services/{name}/git", get(read_git).put(set_git))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "AddKey")]
pub(super) struct Add {
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    name: String,
    /// One line in OpenSSH form, as in `~/.ssh/id_ed25519.pub`.
    #[schemars(length(min = 1))]
    public_key: String,
}

fn admin_only(caller: &Caller) -> Result<(), Error> {
    match &caller.1 {
        Scope::Admin => Ok(()),
        Scope::Deploy(_) => Err(Error::Forbidden(format!("token {:?} may not manage SSH keys", caller.0))),
    }
}

async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    Ok(Json(serde_json::json!({ "keys": keys::list(&state.db).await? })))
}

/// `POST /keys` `{"name", "public_key"}`: 201 with the stored key and its fingerprint.
async fn add(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<keys::Key>), Error> {
    admin_only(&caller)?;
    let req: Add = body(&bytes)?;
    crate::server::settings::label_problem(&req.name)
        .map_err(|e| Error::BadRequest(format!("name: {:?} {e} (1-63 lowercase letters, digits and '-')", req.name)))?;
    let (key, line) = keys::parse(&req.public_key).map_err(Error::BadRequest)?;
    let k = keys::Key {
        name: req.name.clone(),
        fingerprint: keys::fingerprint(&key),
        public_key: line,
        created_at: keys::now(),
    };
    match keys::insert(&state.db, &k).await {
        Ok(()) => {}
        Err(InsertError::Duplicate) => {
            let taken = keys::by_name(&state.db, &k.name).await?.is_some();
            return Err(Error::Conflict(if taken {
                format!("a key named {:?} exists", k.name)
            } else {
                format!("key {} is already registered under another name", k.fingerprint)
            }));
        }
        Err(InsertError::Other(e)) => return Err(e.into()),
    }
    tracing::info!(key = %k.name, fingerprint = %k.fingerprint, "ssh key added");
    Ok((StatusCode::CREATED, Json(k)))
}

async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, Error> {
    admin_only(&caller)?;
    if !keys::delete(&state.db, &name).await? {
        return Err(Error::NotFound(format!("no SSH key named {name:?}")));
    }
    tracing::info!(key = %name, "ssh key removed");
    Ok(StatusCode::NO_CONTENT)
}

/// A service's git settings and remotes.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
#[schemars(rename = "GitSettings")]
pub(super) struct GitView {
    service: String,
    /// Only pushes to this branch deploy; pushes to others are refused.
    deploy_branch: String,
    /// `ssh://git@HOST:PORT/NAME` (null when the SSH server is off).
    ssh_url: Option<String>,
    /// The repository's URL on the control host (the password is an API token).
    http_url: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "SetGit")]
pub(super) struct SetGit {
    /// A branch name as git accepts it (`git check-ref-format --branch`).
    #[schemars(length(min = 1, max = 200))]
    deploy_branch: String,
}

async fn git_view(state: &AppState, name: &str) -> Result<GitView, Error> {
    let Some(branch) = git::deploy_branch(&state.db, name).await? else {
        return Err(Error::NotFound(format!("no service named {name:?}")));
    };
    let port = if state.http_port == 80 { String::new() } else { format!(":{}", state.http_port) };
    Ok(GitView {
        service: name.to_string(),
        deploy_branch: branch,
        ssh_url: git::config().and_then(|c| c.ssh_port).map(|p| format!("ssh://git@{}:{p}/{name}", state.control_host)),
        http_url: format!("http://{}{port}/git/{name}.git", state.control_host),
    })
}

async fn read_git(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<GitView>, Error> {
    Ok(Json(git_view(&state, &name).await?))
}

/// `PUT /services/{name}/git` `{"deploy_branch": "release"}`.
async fn set_git(
    State(state): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Json<GitView>, Error> {
    let req: SetGit = body(&bytes)?;
    git::check_branch(&req.deploy_branch).map_err(Error::BadRequest)?;
    if !git::set_deploy_branch(&state.db, &name, &req.deploy_branch).await? {
        return Err(Error::NotFound(format!("no service named {name:?}")));
    }
    tracing::info!(service = %name, branch = %req.deploy_branch, "deploy branch set");
    Ok(Json(git_view(&state, &name).await?))
}
