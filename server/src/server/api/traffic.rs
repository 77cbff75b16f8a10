//! `/api/v1/services/{name}/traffic` and `/tags/{tag}`: split the untagged traffic between
//! revisions by percentage, and name revisions with tags that reach them alone at
//! `<tag>--<service>.<domain>`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::services::{body, find};
use super::{AppState, Error};
use crate::server::db::{self, Service};
use crate::server::platform::TrafficView;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/services/{name}/traffic", get(read).put(set))
        .route("/services/{name}/tags/{tag}", put(tag).delete(untag))
}

/// The split as stored, with the implicit "all to the service's revision" spelled out.
pub fn stored_traffic(s: &Service) -> Vec<TrafficView> {
    match &s.traffic {
        Some(t) => t.clone(),
        None => s.revision.map(|r| vec![TrafficView { revision: r, percent: 100 }]).unwrap_or_default(),
    }
}

fn traffic_view(state: &AppState, s: &Service) -> serde_json::Value {
    let tags: BTreeMap<&String, serde_json::Value> = s
        .tags
        .iter()
        .map(|(t, n)| (t, serde_json::json!({ "revision": n, "url": state.url(&format!("{t}--{}", s.name)) })))
        .collect();
    serde_json::json!({ "traffic": stored_traffic(s), "tags": tags })
}

async fn read(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<serde_json::Value>, Error> {
    let s = find(&state, &name).await?;
    Ok(Json(traffic_view(&state, &s)))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SetTraffic {
    #[schemars(length(min = 1))]
    traffic: Vec<Share>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Share {
    #[schemars(range(min = 1))]
    revision: i64,
    #[schemars(range(max = 100))]
    percent: u32,
}

/// A revision that may take requests: it exists and its image is still in the store.
async fn usable(state: &AppState, s: &Service, n: i64) -> Result<db::Revision, Error> {
    let rev = db::get_revision(&state.db, s.id, n)
        .await?
        .ok_or_else(|| Error::NotFound(format!("service {:?} has no revision {n}", s.name)))?;
    match crate::server::deploy::image_gone(state, &rev).await {
        Some(why) => Err(Error::Conflict(why)),
        None => Ok(rev),
    }
}

/// A service with a deploy running is left alone: the deploy would move the traffic anyway.
fn not_deploying(state: &AppState, name: &str) -> Result<std::sync::Arc<crate::server::platform::Service>, Error> {
    let live = state.platform.get(name).ok_or_else(|| Error::NotFound(format!("no service named {name:?}")))?;
    if let Some(d) = live.snapshot().deploying {
        return Err(Error::Conflict(format!("deploy {d} of service {name} is running; wait for it to finish")));
    }
    Ok(live)
}

/// `PUT /services/{name}/traffic` `{"traffic": [{"revision": 1, "percent": 90}, ...]}`: the
/// percentages must add up to 100. Revisions that lose their share drain.
async fn set(
    State(state): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Json<serde_json::Value>, Error> {
    let req: SetTraffic = body(&bytes)?;
    let s = find(&state, &name).await?;
    if req.traffic.is_empty() {
        return Err(Error::BadRequest("traffic: give at least one revision with its percent".into()));
    }
    let mut sum = 0u32;
    let mut split = Vec::new();
    for (i, share) in req.traffic.iter().enumerate() {
        if share.percent > 100 {
            return Err(Error::BadRequest(format!("traffic[{i}].percent: {} is more than 100", share.percent)));
        }
        if req.traffic[..i].iter().any(|o| o.revision == share.revision) {
            return Err(Error::BadRequest(format!("traffic[{i}]: revision {} is listed twice", share.revision)));
        }
        sum += share.percent;
        let rev = usable(&state, &s, share.revision).await?;
        if share.percent > 0 && rev.served_at.is_none() && Some(rev.number) != s.revision {
            return Err(Error::Conflict(format!(
                "revision {} never became ready (its deploy failed): it cannot take traffic; roll back to it or deploy again",
                rev.number
            )));
        }
        split.push((crate::server::to_live_revision(&state.keys, &name, &rev)?, share.percent));
    }
    if sum != 100 {
        return Err(Error::BadRequest(format!("traffic: the percentages add up to {sum}, not 100")));
    }
    let live = not_deploying(&state, &name)?;
    let stored: Vec<TrafficView> =
        req.traffic.iter().map(|t| TrafficView { revision: t.revision, percent: t.percent }).collect();
    db::set_traffic(&state.db, s.id, Some(&stored)).await?;
    live.set_traffic(split);
    crate::server::write_gc_roots(&state).await;
    tracing::info!(service = %name, traffic = ?stored, "traffic split changed");
    let s = find(&state, &name).await?;
    Ok(Json(traffic_view(&state, &s)))
}

/// A tag is a DNS label without "--" (which ends it in `<tag>--<service>`), and the whole
/// `<tag>--<service>` must still be one DNS label.
fn check_tag(tag: &str, service: &str) -> Result<(), String> {
    crate::server::settings::label_problem(tag).map_err(|e| {
        format!("tag: {tag:?} {e} (a tag is 1-63 lowercase letters, digits and '-', not starting or ending with '-')")
    })?;
    if tag.contains("--") {
        return Err(format!("tag: {tag:?} contains \"--\", which separates the tag from the service in its host name"));
    }
    let label = tag.len() + 2 + service.len();
    if label > 63 {
        return Err(format!(
            "tag: {tag:?}--{service} would be {label} characters, more than the 63 a DNS label may have: use a shorter tag"
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SetTag {
    #[schemars(range(min = 1))]
    revision: i64,
}

/// `PUT /services/{name}/tags/{tag}` `{"revision": N}`: points the tag at revision N.
async fn tag(
    State(state): State<AppState>,
    Path((name, tag)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<serde_json::Value>, Error> {
    let req: SetTag = body(&bytes)?;
    let mut s = find(&state, &name).await?;
    check_tag(&tag, &name).map_err(Error::BadRequest)?;
    let rev = usable(&state, &s, req.revision).await?;
    if rev.served_at.is_none() && Some(rev.number) != s.revision {
        return Err(Error::Conflict(format!(
            "revision {} never became ready (its deploy failed): a tag would only answer 503; roll back to it or deploy again",
            rev.number
        )));
    }
    let live = state.platform.get(&name).ok_or_else(|| Error::NotFound(format!("no service named {name:?}")))?;
    s.tags.insert(tag.clone(), rev.number);
    db::set_tags(&state.db, s.id, &s.tags).await?;
    live.set_tag(&tag, Some(crate::server::to_live_revision(&state.keys, &name, &rev)?));
    crate::server::write_gc_roots(&state).await;
    tracing::info!(service = %name, tag, revision = rev.number, "tag set");
    Ok(Json(traffic_view(&state, &s)))
}

/// `DELETE /services/{name}/tags/{tag}`.
async fn untag(State(state): State<AppState>, Path((name, tag)): Path<(String, String)>) -> Result<StatusCode, Error> {
    let mut s = find(&state, &name).await?;
    if s.tags.remove(&tag).is_none() {
        return Err(Error::NotFound(format!("service {name:?} has no tag {tag:?}")));
    }
    db::set_tags(&state.db, s.id, &s.tags).await?;
    if let Some(live) = state.platform.get(&name) {
        live.set_tag(&tag, None);
    }
    tracing::info!(service = %name, tag, "tag removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(check_tag("canary", "web"), Ok(()));
        assert_eq!(check_tag("v2", "web"), Ok(()));
        for (tag, want) in
            [("Canary", "contains 'C'"), ("a--b", "contains \"--\""), ("-a", "starts or ends"), ("", "is empty")]
        {
            let err = check_tag(tag, "web").unwrap_err();
            assert!(err.starts_with("tag: ") && err.contains(want), "{tag:?}: {err}");
        }
        let long = "x".repeat(40);
        assert!(check_tag(&long, &"y".repeat(30)).unwrap_err().contains("72 characters"));
    }
}
