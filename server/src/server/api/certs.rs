//! `/api/v1/certs`: every name's certificate (issued, uploaded, pending or failed, with the
//! CA's message), and certificates users bring for a host (`berth certs add`): an uploaded
//! certificate wins over an issued one, and nothing is ordered for its name while it is valid.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use super::services::body;
use super::{AppState, Error};
use crate::server::tls::{self, CertStatus, Source};

pub fn router() -> Router<AppState> {
    Router::new().route("/certs", get(list)).route("/certs/{host}", get(read).put(upload).delete(remove))
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "UploadCert")]
pub(super) struct Upload {
    /// The certificate chain, PEM, leaf first.
    #[schemars(length(min = 1))]
    cert: String,
    /// Its private key, PEM (PKCS#8, SEC1 or PKCS#1).
    #[schemars(length(min = 1))]
    key: String,
}

fn tls_of(state: &AppState) -> Result<&std::sync::Arc<tls::Tls>, Error> {
    state.tls.as_ref().ok_or_else(|| Error::Conflict("the server runs without TLS (--https-addr off)".into()))
}

fn host_of(raw: &str) -> Result<String, Error> {
    let (wild, rest) = match raw.strip_prefix("*.") {
        Some(r) => ("*.", r),
        None => ("", raw),
    };
    let name = crate::server::settings::dns_name(&tls::normalize(rest))
        .map_err(|e| Error::BadRequest(format!("host {raw:?}: {e}")))?;
    Ok(format!("{wild}{name}"))
}

/// The names the proxy answers at (and the allowed on-demand ones): those that are ordered.
fn wanted(state: &AppState, tls: &tls::Tls) -> std::collections::HashSet<String> {
    let mut w: std::collections::HashSet<String> = state.platform.certificate_names().into_iter().collect();
    w.extend(tls.on_demand_names.iter().map(|e| e.key().clone()));
    w
}

/// Every name the proxy answers at, with what is uploaded or issued besides.
async fn list(State(state): State<AppState>) -> Result<Json<Vec<CertStatus>>, Error> {
    let tls = tls_of(&state)?;
    let mut names = state.platform.certificate_names();
    names.extend(tls.uploaded_names());
    names.extend(tls.issued_names());
    names.extend(tls.on_demand_names.iter().map(|e| e.key().clone()));
    names.sort();
    names.dedup();
    let wanted = wanted(&state, tls);
    Ok(Json(names.iter().map(|n| tls.status_of(n, wanted.contains(n))).collect()))
}

async fn read(State(state): State<AppState>, Path(host): Path<String>) -> Result<Json<CertStatus>, Error> {
    let tls = tls_of(&state)?;
    let host = host_of(&host)?;
    Ok(Json(tls.status_of(&host, wanted(&state, tls).contains(&host))))
}

/// `PUT /certs/{host}` `{"cert", "key"}`: checked (PEM, the key matches, the certificate names
/// the host and has not expired), stored, then served from the next handshake on.
async fn upload(
    State(state): State<AppState>,
    Path(host): Path<String>,
    bytes: Bytes,
) -> Result<Json<CertStatus>, Error> {
    let tls = tls_of(&state)?;
    let host = host_of(&host)?;
    let req: Upload = body(&bytes)?;
    let cert = tls::Cert::from_pem(&req.cert, &req.key, Source::Uploaded).map_err(Error::BadRequest)?;
    if cert.names.is_empty() {
        return Err(Error::BadRequest(
            "the certificate has no DNS name in its subjectAltName (clients ignore the CN): it is valid for no host"
                .into(),
        ));
    }
    if !cert.names.iter().any(|n| n == &host) && !cert.covers(&host) {
        return Err(Error::BadRequest(format!("the certificate is for {} but not for {host}", cert.names.join(", "))));
    }
    if cert.not_before > std::time::SystemTime::now() + std::time::Duration::from_secs(3600) {
        return Err(Error::BadRequest(format!(
            "the certificate is not valid before {}",
            time::OffsetDateTime::from(cert.not_before)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        )));
    }
    if cert.not_after <= std::time::SystemTime::now() {
        return Err(Error::BadRequest(format!(
            "the certificate expired at {}",
            time::OffsetDateTime::from(cert.not_after)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        )));
    }
    let (tls2, host2, cert2) = (tls.clone(), host.clone(), cert.clone());
    tokio::task::spawn_blocking(move || tls2.store.save(Source::Uploaded, &host2, &cert2))
        .await
        .map_err(anyhow::Error::from)?
        .map_err(|e| anyhow::anyhow!("storing the certificate of {host}: {e}"))?;
    tls.install_uploaded(&host, cert);
    tracing::info!(host = %host, "certificate uploaded");
    Ok(Json(tls.status_of(&host, true)))
}

async fn remove(State(state): State<AppState>, Path(host): Path<String>) -> Result<StatusCode, Error> {
    let tls = tls_of(&state)?;
    let host = host_of(&host)?;
    if tls.uploaded(&host).is_none() {
        let by = host.split_once('.').map(|(_, p)| format!("*.{p}")).filter(|w| tls.uploaded(w).is_some());
        return Err(Error::NotFound(match by {
            Some(w) => format!("no uploaded certificate for {host}: it is served by the one uploaded for {w}"),
            None => format!("no uploaded certificate for {host}"),
        }));
    }
    tls.store
        .remove(Source::Uploaded, &host)
        .map_err(|e| anyhow::anyhow!("removing the certificate of {host}: {e}"))?;
    tls.remove_uploaded(&host);
    tracing::info!(host = %host, "uploaded certificate removed");
    Ok(StatusCode::NO_CONTENT)
}
