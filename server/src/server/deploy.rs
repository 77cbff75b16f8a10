//! A deploy of an image reference: pull it (pinning the tag to the image id), choose the port,
//! record an immutable revision, start one instance of it and wait until it is ready, then move
//! the traffic to it atomically. If anything fails the serving revision keeps serving and the
//! deploy records why.
//!
//! A deploy runs in its own task: a client that stops waiting does not cancel it.

use std::sync::Arc;
use std::time::Duration;

use berth_agent::image::Progress;
use berth_agent::reference::Reference;
use tokio::sync::{mpsc, oneshot};

use super::api::AppState;
use super::db;
use super::platform::Service;

/// How long a new revision's first instance gets to become ready, unless the deploy says.
/// Instances started for held requests get as long.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a deploy puts in service: a new image (a new revision), the image of revision N with
/// the service's changed settings (a new revision, no pull: `berth env`), or an earlier
/// revision again (a rollback: no pull, no new revision, the stored settings stay as they are).
#[derive(Debug, Clone)]
pub enum Source {
    Image(Reference),
    /// An image already in the store (built from source): no pull.
    Local(Reference),
    Config(i64),
    Revision(i64),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Image(r) | Source::Local(r) => write!(f, "{r}"),
            Source::Config(n) => write!(f, "revision {n}'s image with new settings"),
            Source::Revision(n) => write!(f, "revision {n}"),
        }
    }
}

/// What a deploy reports as it goes (streamed to `berth deploy` as NDJSON).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Progress { message: String },
    Done { deploy: db::Deploy },
}

/// The port a revision listens on: the service's configured port, else its `PORT` env, else
/// the image's single exposed TCP port, else 8080.
pub fn choose_port(
    configured: Option<u16>,
    env: &std::collections::BTreeMap<String, String>,
    exposed: &[String],
) -> Result<u16, String> {
    if let Some(p) = configured {
        return Ok(p);
    }
    if let Some(v) = env.get("PORT") {
        return match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("env PORT={v:?} is not a port number (1-65535)")),
        };
    }
    let tcp: Vec<u16> = exposed.iter().filter_map(|p| p.strip_suffix("/tcp")).filter_map(|p| p.parse().ok()).collect();
    Ok(if tcp.len() == 1 { tcp[0] } else { 8080 })
}

/// Runs deploy `id` of `image` for `service`; sends events to `events` (if anyone listens) and
/// returns the deploy as recorded at the end.
pub async fn run(
    state: AppState,
    service: db::Service,
    live: Arc<Service>,
    id: i64,
    image: Source,
    timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
) -> db::Deploy {
    use tracing::Instrument;
    // `instrument`, not `enter`: a span entered across awaits would tag other tasks' events.
    let span = tracing::info_span!("deploy", service = %service.name, deploy = id, image = %image);
    let outcome = steps(&state, &service, &live, id, &image, timeout, &events).instrument(span).await;
    let (status, revision, error) = match &outcome {
        Ok(n) => ("succeeded", Some(*n), None),
        Err(e) => ("failed", None, Some(e.as_str())),
    };
    match &outcome {
        Ok(n) => tracing::info!(revision = n, "deploy succeeded"),
        Err(e) => tracing::warn!(error = ?e, "deploy failed"),
    }
    live.end_deploy();
    super::write_gc_roots(&state).await;
    if let Err(e) = db::update_deploy(&state.db, id, status, revision, error, true).await {
        tracing::error!(error = %format!("{e:#}"), "recording the end of a deploy");
    }
    let deploy = match db::get_deploy(&state.db, &service.name, id).await {
        Ok(Some(d)) => d,
        _ => db::Deploy {
            id,
            service: service.name.clone(),
            revision,
            image: image.to_string(),
            status: status.into(),
            error: error.map(str::to_string),
            created_at: db::now(),
            finished_at: Some(db::now()),
            by: String::new(),
            kind: String::new(),
        },
    };
    let _ = events.send(Event::Done { deploy: deploy.clone() });
    deploy
}

async fn steps(
    state: &AppState,
    service: &db::Service,
    live: &Arc<Service>,
    id: i64,
    source: &Source,
    timeout: Duration,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<i64, String> {
    let say = |m: String| {
        let _ = events.send(Event::Progress { message: m });
    };
    let rev = match source {
        Source::Image(reference) => new_revision(state, service, id, reference, true, events).await?,
        Source::Local(reference) => new_revision(state, service, id, reference, false, events).await?,
        Source::Config(n) => {
            let base = stored_revision(state, service, *n).await?;
            let (engine, image_id) = (state.engine.clone(), base.image_id.clone());
            let exposed =
                tokio::task::spawn_blocking(move || engine.images().get(&image_id).map(|i| i.config.exposed_ports))
                    .await
                    .map_err(|e| format!("reading the image: {e}"))?
                    .map_err(|e| format!("revision {n}'s image {}: {e}", base.image))?;
            let port = choose_port(service.port, &service.env, &exposed)?;
            let rev = db::insert_revision(&state.db, service, &base.image, &base.image_id, port)
                .await
                .map_err(|e| format!("{e:#}"))?;
            db::update_deploy(&state.db, id, "starting", Some(rev.number), None, false)
                .await
                .map_err(|e| format!("{e:#}"))?;
            say(format!("revision {} (revision {n}'s image, new settings, port {port}) recorded", rev.number));
            rev
        }
        Source::Revision(n) => {
            let rev = stored_revision(state, service, *n).await?;
            db::update_deploy(&state.db, id, "starting", Some(rev.number), None, false)
                .await
                .map_err(|e| format!("{e:#}"))?;
            say(format!("revision {n} ({}, port {}) back in service", rev.image, rev.port));
            rev
        }
    };
    let revision = super::to_live_revision(&state.keys, &service.name, &rev).map_err(|e| format!("{e:#}"))?;
    // A rollback to a revision that served does not run it again: its work was done then.
    let released = matches!(source, Source::Revision(_)) && rev.served_at.is_some();
    if let (Some(cmd), false) = (&rev.release_command, released) {
        // Before the traffic moves (database migrations).
        db::update_deploy(&state.db, id, "releasing", Some(rev.number), None, false)
            .await
            .map_err(|e| format!("{e:#}"))?;
        say(format!("revision {}: running the release command: {cmd}", rev.number));
        let (engine, dir, name, r, c) =
            (state.engine.clone(), state.data_dir.clone(), service.name.clone(), revision.clone(), cmd.clone());
        let out =
            tokio::task::spawn_blocking(move || super::instance::run_release(&engine, &dir, &name, &r, &c, timeout))
                .await
                .map_err(|e| format!("the release command's task failed: {e}"))?;
        match out {
            Ok(tail) => say(format!("revision {}: the release command succeeded{tail}", rev.number)),
            Err(why) => return Err(format!("revision {}: the release command failed: {why}", rev.number)),
        }
    }
    say(format!("revision {}: starting an instance on port {}", rev.number, rev.port));
    let (tx, rx) = oneshot::channel();
    live.start_candidate(revision.clone(), timeout, tx);
    match rx.await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return Err(format!("revision {} did not become ready: {reason}", rev.number)),
        Err(_) => return Err(format!("revision {}: the start was abandoned (server stopping?)", rev.number)),
    }
    if live.is_deleted() {
        return Err(format!("service {} was deleted during the deploy", service.name));
    }
    if !matches!(source, Source::Revision(_)) {
        // Only now do the deploy's settings become the service's (a rollback keeps them).
        db::set_service_config(&state.db, service).await.map_err(|e| format!("{e:#}"))?;
    }
    db::set_current_revision(&state.db, service.id, rev.number).await.map_err(|e| format!("{e:#}"))?;
    live.switch(revision);
    say(format!("revision {} is serving at {}", rev.number, state.url(&service.name)));
    Ok(rev.number)
}

/// Revision `n` of `service`, whose image must still be in the store.
async fn stored_revision(state: &AppState, service: &db::Service, n: i64) -> Result<db::Revision, String> {
    let rev = db::get_revision(&state.db, service.id, n)
        .await
        .map_err(|e| format!("{e:#}"))?
        .ok_or_else(|| format!("service {} has no revision {n}", service.name))?;
    match image_gone(state, &rev).await {
        Some(why) => Err(why),
        None => Ok(rev),
    }
}

/// Why revision `rev` cannot start, if its image is no longer in the store.
pub async fn image_gone(state: &AppState, rev: &db::Revision) -> Option<String> {
    let (engine, image_id) = (state.engine.clone(), rev.image_id.clone());
    let present = tokio::task::spawn_blocking(move || engine.images().get(&image_id).is_ok()).await.unwrap_or(false);
    (!present).then(|| {
        format!(
            "revision {}'s image {} ({}) is no longer in the image store; deploy it again",
            rev.number, rev.image, rev.image_id
        )
    })
}

/// Pulls `reference` and records the revision a deploy of it makes.
async fn new_revision(
    state: &AppState,
    service: &db::Service,
    id: i64,
    reference: &Reference,
    pull: bool,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<db::Revision, String> {
    let say = |m: String| {
        let _ = events.send(Event::Progress { message: m });
    };
    if !pull {
        let (engine, r) = (state.engine.clone(), reference.to_string());
        let image = tokio::task::spawn_blocking(move || engine.images().get(&r))
            .await
            .map_err(|e| format!("reading {reference}: {e}"))?
            .map_err(|e| format!("{reference}: {e}"))?;
        return record_revision(state, service, id, reference, &image, events).await;
    }
    db::update_deploy(&state.db, id, "pulling", None, None, false).await.map_err(|e| format!("{e:#}"))?;
    say(format!("pulling {reference}"));
    // The store's pull future is not `Send` (a borrow held across an await inside it), so it
    // runs to completion on a blocking thread instead of moving between workers.
    let image = {
        let (engine, r) = (state.engine.clone(), reference.clone());
        let handle = tokio::runtime::Handle::current();
        let events = events.clone();
        tokio::task::spawn_blocking(move || {
            let say = |m: String| {
                let _ = events.send(Event::Progress { message: m });
            };
            let progress = |p: Progress| match p {
                Progress::Resolved { digest, layers, total_size, .. } => {
                    say(format!("resolved to {digest} ({layers} layers, {})", crate::cli::human_size(total_size)))
                }
                Progress::LayerStarted { digest, size, .. } => {
                    say(format!("{}: downloading {}", digest.short(), crate::cli::human_size(size)))
                }
                Progress::LayerUnpacked { digest, .. } => say(format!("{}: unpacked", digest.short())),
                _ => {}
            };
            handle.block_on(engine.images().pull(&r, &progress))
        })
        .await
        .map_err(|e| format!("pulling {reference}: the pull task failed: {e}"))?
        .map_err(|e| format!("pulling {reference}: {e}"))?
    };
    record_revision(state, service, id, reference, &image, events).await
}

async fn record_revision(
    state: &AppState,
    service: &db::Service,
    id: i64,
    reference: &Reference,
    image: &berth_agent::image::Image,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<db::Revision, String> {
    let say = |m: String| {
        let _ = events.send(Event::Progress { message: m });
    };
    let port = choose_port(service.port, &service.env, &image.config.exposed_ports)?;
    let rev = db::insert_revision(&state.db, service, &reference.to_string(), &image.id.to_string(), port)
        .await
        .map_err(|e| format!("{e:#}"))?;
    db::update_deploy(&state.db, id, "starting", Some(rev.number), None, false).await.map_err(|e| format!("{e:#}"))?;
    say(format!("revision {} ({}, port {port}) recorded", rev.number, image.id.short()));
    Ok(rev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_choice() {
        let env = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let ports = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose_port(Some(9000), &env(&[("PORT", "1")]), &ports(&["80/tcp"])), Ok(9000));
        assert_eq!(choose_port(None, &env(&[("PORT", "3000")]), &ports(&["80/tcp"])), Ok(3000));
        assert_eq!(choose_port(None, &env(&[]), &ports(&["80/tcp"])), Ok(80));
        assert_eq!(choose_port(None, &env(&[]), &ports(&["80/tcp", "443/tcp"])), Ok(8080));
        assert_eq!(choose_port(None, &env(&[]), &ports(&["53/udp"])), Ok(8080));
        assert_eq!(choose_port(None, &env(&[]), &[]), Ok(8080));
        assert!(choose_port(None, &env(&[("PORT", "http")]), &[]).unwrap_err().contains("PORT"));
    }
}
