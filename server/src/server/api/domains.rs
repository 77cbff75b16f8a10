//! `/api/v1/services/{name}/domains`: extra host names a service answers at, besides
//! `<name>.<domain>` (point their DNS at this machine).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};

use super::services::find;
use super::{AppState, Error};
use crate::server::db::{self, InsertError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/services/{name}/domains", get(list))
        .route("/services/{name}/domains/{host}", put(add).delete(remove))
}

/// Checks a host name a user gives a service, and returns it normalised (lowercase, without a
/// trailing dot, an internationalised name in punycode). The platform's own names (the control host, `*.<domain>`, `*.internal`)
/// are not for the taking.
pub fn check_host(host: &str, domain: &str, control_host: &str) -> Result<String, String> {
    let h = crate::server::tls::normalize(host);
    let why = |e: String| format!("host: {host:?} {e}");
    if !h.is_ascii() {
        return Err(why("is not a valid internationalised name (IDNA)".into()));
    }
    if h.len() > 253 {
        return Err(why(format!("is {} characters long, at most 253 are allowed", h.len())));
    }
    let bracketed = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(&h);
    if bracketed.parse::<std::net::IpAddr>().is_ok() {
        return Err(why("is an IP address, not a host name".into()));
    }
    let labels: Vec<&str> = h.split('.').collect();
    if labels.len() < 2 {
        return Err(why("has a single label: give a full name like www.example.com".into()));
    }
    for l in &labels {
        crate::server::settings::label_problem(l).map_err(|e| why(format!("has a label {l:?} that {e}")))?;
    }
    if labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(why("ends in an all-digit label: no top-level domain is numeric (is it an address?)".into()));
    }
    if h == control_host {
        return Err(why("is the control host (the API)".into()));
    }
    if h == domain || h.ends_with(&format!(".{domain}")) {
        return Err(why(format!("is under the platform's domain {domain}, where services answer by name already")));
    }
    if h.ends_with(".internal") {
        return Err(why("is under .internal, where services reach each other by name".into()));
    }
    Ok(h)
}

async fn list(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<serde_json::Value>, Error> {
    let s = find(&state, &name).await?;
    Ok(Json(serde_json::json!({ "domains": db::list_domains(&state.db, s.id).await? })))
}

async fn add(
    State(state): State<AppState>,
    Path((name, host)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Error> {
    let s = find(&state, &name).await?;
    let host = check_host(&host, &state.domain, &state.control_host).map_err(Error::BadRequest)?;
    match db::insert_domain(&state.db, s.id, &host).await {
        Ok(()) => {}
        Err(InsertError::Duplicate) => {
            let owner = db::domain_owner(&state.db, &host).await?.unwrap_or_default();
            if owner != name {
                return Err(Error::Conflict(format!("host {host:?} belongs to service {owner:?}")));
            }
        }
        Err(InsertError::Other(e)) => return Err(e.into()),
    }
    state.platform.add_host(&host, &name);
    tracing::info!(service = %name, host, "domain added");
    Ok(Json(serde_json::json!({ "domains": db::list_domains(&state.db, s.id).await? })))
}

async fn remove(
    State(state): State<AppState>,
    Path((name, host)): Path<(String, String)>,
) -> Result<StatusCode, Error> {
    let s = find(&state, &name).await?;
    let host = host.strip_suffix('.').unwrap_or(&host).to_ascii_lowercase();
    if !db::delete_domain(&state.db, s.id, &host).await? {
        return Err(Error::NotFound(format!("service {name:?} has no domain {host:?}")));
    }
    state.platform.remove_host(&host);
    tracing::info!(service = %name, host, "domain removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let c = |h| check_host(h, "apps.test", "berth.apps.test");
        assert_eq!(c("WWW.Example.COM."), Ok("www.example.com".into()));
        assert_eq!(c("example.com"), Ok("example.com".into()));
        // Internationalised names are kept in punycode, as TLS and DNS see them.
        assert_eq!(c("Bücher.de."), Ok("xn--bcher-kva.de".into()));
        for (bad, want) in [
            ("localhost", "single label"),
            ("10.0.0.1", "IP address"),
            ("[::1]", "IP address"),
            ("1.2.3", "all-digit"),
            ("a.123", "all-digit"),
            ("berth.apps.test", "control host"),
            ("web.apps.test", "under the platform's domain"),
            ("apps.test", "under the platform's domain"),
            ("db.internal", ".internal"),
            ("a_b.example.com", "contains '_'"),
            ("-a.example.com", "starts or ends"),
            ("a..example.com", "is empty"),
        ] {
            let err = c(bad).unwrap_err();
            assert!(err.starts_with("host: ") && err.contains(want), "{bad}: {err}");
        }
    }
}
