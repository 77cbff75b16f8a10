//! `berth server`: the control plane and the proxy in one process. Validates its options (exit
//! 64 before anything is bound or written), binds the API and proxy ports, opens the state
//! database, loads every service and re-adopts the instances the engine still runs (nothing is
//! redeployed), then serves until SIGTERM or SIGINT. Instances keep running when it stops.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

pub mod api;
pub mod autoscale;
pub mod db;
pub mod deploy;
pub mod git;
pub mod instance;
pub mod internal;
pub mod logs;
pub mod manifest;
pub mod platform;
pub mod proxy;
pub mod scaling;
pub mod secrets;
pub mod settings;
pub mod tls;
pub mod token;

pub use settings::{Args, Settings};

use crate::config::EXIT_USAGE;

/// `<data-dir>/api-url`: the running server's API URL, for the CLI.
pub const API_URL_FILE: &str = "api-url";
const LOCK_FILE: &str = "server.lock";

/// Takes `<data-dir>/server.lock` (flock, held until exit; the file records the pid). A data
/// directory that does not exist yet cannot be in use.
fn lock_data_dir(data_dir: &Path) -> Result<Option<std::fs::File>, String> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("creating --data-dir {}: {e}", data_dir.display()))?;
    }
    let path = data_dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    if rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(format!(
            "--data-dir {} is in use by another berth server (pid {}); stop it first",
            data_dir.display(),
            pid.trim()
        ));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(Some(f))
}

/// How often idle instances are considered for freezing and stopping.
const TICK: Duration = Duration::from_millis(100);

/// Runs `berth server`; returns the process exit code.
pub fn main(data_dir: &Path, config: Option<&Path>, args: &Args) -> i32 {
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth: {e}");
            return EXIT_USAGE;
        }
    };
    let cfg = match crate::config::load(data_dir, config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(e) = berth_agent::network::check_existing(&cfg.network) {
        eprintln!("berth: [network] {e}");
        return EXIT_USAGE;
    }
    // One server per data directory: a second one would re-adopt, freeze and stop the first
    // one's instances under it. The lock lives as long as this process.
    let _lock = match lock_data_dir(data_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth: {e}");
            return EXIT_USAGE;
        }
    };
    match crate::cli::runtime().block_on(serve(data_dir, cfg, settings)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("berth: {e:#}");
            1
        }
    }
}

async fn serve(data_dir: &Path, mut cfg: berth_agent::Config, settings: Settings) -> anyhow::Result<()> {
    // Bind first: a port in use is the likeliest failure, and it should leave nothing behind.
    let api_listener = tokio::net::TcpListener::bind(settings.api_addr)
        .await
        .with_context(|| format!("--api-addr {}: binding", settings.api_addr))?;
    let http_listener = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| format!("--http-addr {}: binding", settings.http_addr))?;
    let https_listener = match settings.https_addr {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("--https-addr {a}: binding"))?),
        None => None,
    };
    let ssh_listener = match settings.ssh_addr {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("--ssh-addr {a}: binding"))?),
        None => None,
    };
    let http_port = http_listener.local_addr().map(|a| a.port()).unwrap_or(settings.http_addr.port());
    let api_port = api_listener.local_addr().map(|a| a.port()).unwrap_or(settings.api_addr.port());
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let subnet = berth_agent::network::validate(&cfg.network).context("[network]")?;
    let bridge = cfg.network.bridge.clone();
    // Service to service (see `internal`): the bridge's gateway address answers DNS for
    // `<service>.internal` and takes HTTP on port 80, so the bridge must exist now.
    let net = berth_agent::network::Network::new(&cfg.network, &data_dir.join("network")).context("[network]")?;
    tokio::task::spawn_blocking(move || net.ensure_bridge()).await?.context("setting up the containers' bridge")?;
    let gateway = subnet.gateway();
    let internal_http = match tokio::net::TcpListener::bind((gateway, 80)).await {
        Ok(l) => Some(l),
        Err(e) => {
            let covered = settings.http_addr.port() == 80 && settings.http_addr.ip().is_unspecified();
            if !covered {
                tracing::warn!(error = %e, %gateway, "cannot listen on the gateway's port 80: http://<service>.internal will not work");
            }
            None
        }
    };
    let dns = match tokio::net::UdpSocket::bind((gateway, 53)).await {
        Ok(sock) => {
            let upstreams = internal::upstreams(&cfg.network.dns);
            cfg.network.dns = vec![gateway];
            Some((sock, upstreams))
        }
        Err(e) => {
            tracing::warn!(error = %e, %gateway, "cannot answer DNS on the gateway: <service>.internal names will not resolve");
            None
        }
    };
    let engine = Arc::new(crate::cli::open_engine_at(data_dir, cfg)?);
    let location = db::Location::parse(settings.database_url.as_deref(), data_dir).map_err(anyhow::Error::msg)?;
    let db = db::open(&location).await?;
    let unfinished = db::fail_unfinished_deploys(&db).await?;
    let builds = db::fail_unfinished_builds(&db).await?;
    if builds > 0 {
        tracing::warn!(builds, "builds the previous server left unfinished are marked failed");
    }
    if unfinished > 0 {
        tracing::warn!(deploys = unfinished, "deploys the previous server left unfinished are marked failed");
    }
    let admin = token::load_or_create(data_dir)?;
    db::ensure_token(&db, token::ADMIN, &token::hash(&admin), token::ADMIN).await?;

    let platform = Arc::new(platform::Platform::new(&settings.domain, &settings.control_host));
    let https_port = https_listener.as_ref().map(|l| l.local_addr().map(|a| a.port()).unwrap_or(443));
    let tls = match &https_listener {
        Some(_) => Some(
            tls::Tls::new(
                tls::Store::new(data_dir),
                &settings.control_host,
                settings.on_demand.clone(),
                settings.acme.as_ref().map(|a| a.directory.as_str()),
            )
            .context("setting up TLS")?,
        ),
        None => None,
    };
    let (actions, actions_rx) = tokio::sync::mpsc::unbounded_channel();
    let state = api::AppState {
        db: db.clone(),
        platform: platform.clone(),
        engine: engine.clone(),
        actions: actions.clone(),
        data_dir: data_dir.to_path_buf(),
        domain: settings.domain.clone(),
        control_host: settings.control_host.clone(),
        http_port,
        https_port,
        keys: secrets::Keyring::load_or_create(data_dir)?,
        builds: Arc::new(api::builds::Builds::new(
            Some(settings.build_cpus),
            Some(settings.build_memory),
            settings.builds,
        )),
        tls: tls.clone(),
    };
    let adopted = load_services(&state).await?;
    write_gc_roots(&state).await;
    let executor = instance::Executor {
        engine: engine.clone(),
        data_dir: data_dir.to_path_buf(),
        prepared: Default::default(),
        max_prepared: settings.prepared,
    };
    let on_stop = executor.clone();
    tokio::spawn(executor.run(actions_rx));
    tokio::spawn(ticker(platform.clone()));
    let firewall = Firewall::install(&bridge, api_port);

    git::configure(git::Config {
        exe: std::env::current_exe().context("finding the berth binary for the git hooks")?,
        api_url: git::loopback_url(api_listener.local_addr().unwrap_or(settings.api_addr)),
        data_dir: data_dir.to_path_buf(),
        ssh_port: ssh_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()),
    });
    let ssh_key = match &ssh_listener {
        Some(_) => Some(git::ssh::load_or_create_host_key(data_dir)?),
        None => None,
    };
    let app = api::router(state.clone());
    let make_proxy = || {
        proxy::Proxy::new(
            platform.clone(),
            app.clone(),
            settings.trusted_proxies.clone(),
            settings.hold_body_limit,
            settings.header_timeout,
            subnet,
            tls.clone().zip(https_port),
        )
    };
    // The gateway's port 80 (service to service) is served on this runtime; the public
    // listeners by the proxy threads.
    let proxy = Arc::new(make_proxy());
    let main_rt = tokio::runtime::Handle::current();
    let https_local = https_listener.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(
        api = %settings.api_addr,
        http = %settings.http_addr,
        domain = %settings.domain,
        control_host = %settings.control_host,
        services = platform.all().len(),
        adopted,
        token_file = %data_dir.join(token::FILE).display(),
        database = %location.describe(),
        ssh = %ssh_listener.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".into(), |a| a.to_string()),
        https = %https_local.map_or("off".into(), |a| a.to_string()),
        proxy_threads = settings.proxy_threads,
        acme = %settings.acme.as_ref().map_or("off", |a| a.directory.as_str()),
        "berth server listening"
    );
    // Where the CLI finds this server when BERTH_API is not set.
    let api_url = format!("http://{}", api_listener.local_addr().unwrap_or(settings.api_addr));
    let _ = berth_agent::container::write_atomic(&data_dir.join(API_URL_FILE), api_url.as_bytes());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some((sock, upstreams)) = dns {
        tokio::spawn(internal::serve_dns(sock, platform.clone(), gateway, upstreams));
    }
    if let Some(l) = internal_http {
        tokio::spawn(proxy.clone().serve(l, stopped(stop_rx.clone())));
    }
    if let (Some(l), Some(key)) = (ssh_listener, ssh_key) {
        tokio::spawn(git::ssh::serve(l, key, db.clone(), data_dir.to_path_buf(), stopped(stop_rx.clone())));
    }
    if let (Some(tls), Some(acme)) = (&tls, &settings.acme) {
        if tls.public_ca && tls::special_use(&settings.domain) {
            tracing::warn!(
                domain = %settings.domain,
                "Let's Encrypt issues no certificate under a special-use domain: its services are served with the self-signed default certificate (use a real --domain, or --acme-directory for another CA)"
            );
        }
        let p = platform.clone();
        tokio::spawn(tls::acme::run(tls.clone(), acme.clone(), move || p.certificate_names()));
    }
    let mut workers = proxy::Workers::start(
        settings.proxy_threads,
        || make_proxy().with_control_runtime(main_rt.clone()),
        http_listener,
        https_listener,
        stop_rx.clone(),
    )
    .context("starting the proxy threads")?;
    let api_task =
        tokio::spawn(async move { axum::serve(api_listener, app).with_graceful_shutdown(stopped(stop_rx)).await });
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    workers.stopped().await;
    // In-flight API calls (a deploy waiting) get a moment; instances keep running.
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    // Prepared containers are not instances: remove them rather than leave them to be found
    // abandoned by the next server.
    on_stop.discard_all().await;
    drop(firewall);
    db.close().await;
    let _ = tokio::task::spawn_blocking(move || workers.finish()).await;
    tracing::info!("berth server stopped");
    Ok(())
}

/// Loads every service into the platform and re-adopts the instances the engine still runs
/// for them; containers of unknown services or revisions, and exited ones, are removed.
/// Returns how many instances were adopted.
async fn load_services(state: &api::AppState) -> anyhow::Result<usize> {
    let services = db::list_services(&state.db).await?;
    let mut revisions = std::collections::HashMap::new();
    for s in &services {
        let rev = match s.revision {
            Some(n) => db::get_revision(&state.db, s.id, n).await?,
            None => None,
        };
        let live = platform::Service::new(
            s.name.clone(),
            s.id,
            s.scaling,
            rev.as_ref().map(|r| to_live_revision(&state.keys, &s.name, r)).transpose()?,
            state.actions.clone(),
        );
        live.set_https(s.https);
        if let Some(traffic) = &s.traffic {
            let mut split = Vec::new();
            for t in traffic {
                match db::get_revision(&state.db, s.id, t.revision).await? {
                    Some(r) => split.push((to_live_revision(&state.keys, &s.name, &r)?, t.percent)),
                    None => anyhow::bail!(
                        "service {}: its traffic names revision {}, which does not exist",
                        s.name,
                        t.revision
                    ),
                }
            }
            live.set_traffic(split);
        }
        for (tag, &n) in &s.tags {
            if let Some(r) = db::get_revision(&state.db, s.id, n).await? {
                live.set_tag(tag, Some(to_live_revision(&state.keys, &s.name, &r)?));
            }
        }
        state.platform.insert(live);
        revisions.insert(s.name.clone(), s.id);
    }
    for (host, name) in db::all_domains(&state.db).await? {
        state.platform.add_host(&host, &name);
    }
    let engine = state.engine.clone();
    let containers = tokio::task::spawn_blocking(move || engine.list()).await??;
    let mut adopted = 0;
    for c in containers {
        let Some(name) = c.spec.labels.get(instance::LABEL_SERVICE).cloned() else { continue };
        let number: Option<i64> = c.spec.labels.get(instance::LABEL_REVISION).and_then(|n| n.parse().ok());
        let live = state.platform.get(&name);
        let rev = match (revisions.get(&name), number) {
            (Some(&sid), Some(n)) => db::get_revision(&state.db, sid, n).await?,
            _ => None,
        };
        // Only started instances: a container still `created` was being started, or was a
        // prepared one whose server (the previous one) is gone; it is removed.
        // A release command's container is never an instance: the deploy it belonged to failed.
        let started = !c.spec.labels.contains_key(instance::LABEL_RELEASE)
            && matches!(
                c.state.status,
                berth_agent::container::Status::Running | berth_agent::container::Status::Paused
            );
        match (live, rev, c.is_running() && started, c.state.ip()) {
            (Some(live), Some(rev), true, Some(ip)) => {
                let frozen = c.state.status == berth_agent::container::Status::Paused;
                let addr = std::net::SocketAddr::new(ip.into(), rev.port);
                live.adopt(&c.id, rev.number, addr, frozen, c.state.started_at.clone().unwrap_or_default());
                tracing::info!(service = %name, revision = rev.number, container = %c.short_id(), frozen, "instance re-adopted");
                adopted += 1;
            }
            _ => {
                tracing::info!(service = %name, container = %c.short_id(), "removing a leftover instance");
                let (engine, dir, id) = (state.engine.clone(), state.data_dir.clone(), c.id.clone());
                tokio::task::spawn_blocking(move || instance::retire(&engine, &dir, &name, &id));
            }
        }
    }
    Ok(adopted)
}

/// Revisions whose images `berth image gc` keeps for each service besides those in service.
const KEEP_REVISIONS: usize = 10;

/// Rewrites `<data-dir>/gc-roots`: the image ids of every service's revisions in service (its
/// traffic, tags and last deployed revision) and of its newest revisions, so the engine's
/// image GC never deletes what a request, a split, a tag or a rollback needs. Errors are
/// logged: a stale list only keeps too much or too little until the next write.
pub async fn write_gc_roots(state: &api::AppState) {
    let result: anyhow::Result<()> = async {
        let mut in_service = std::collections::HashSet::new();
        for s in db::list_services(&state.db).await? {
            let traffic = api::stored_traffic(&s);
            let numbers = traffic.iter().map(|t| t.revision).chain(s.tags.values().copied()).chain(s.revision);
            in_service.extend(numbers.map(|n| (s.id, n)));
        }
        // Newest first per service: the first KEEP_REVISIONS of each are kept too.
        let mut ids = std::collections::BTreeSet::new();
        let mut seen: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
        for (service, number, image_id) in db::revision_images(&state.db).await? {
            let rank = seen.entry(service).or_default();
            *rank += 1;
            if *rank <= KEEP_REVISIONS || in_service.contains(&(service, number)) {
                ids.insert(image_id);
            }
        }
        let text: String = ids.into_iter().map(|id| id + "\n").collect();
        berth_agent::container::write_atomic(&state.data_dir.join(berth_agent::engine::GC_ROOTS), text.as_bytes())?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %format!("{e:#}"), "writing gc-roots");
    }
}

/// A stored revision of `service` as instances run it: its secrets opened.
pub fn to_live_revision(
    keys: &secrets::Keyring,
    service: &str,
    r: &db::Revision,
) -> anyhow::Result<platform::Revision> {
    Ok(platform::Revision {
        number: r.number,
        image: r.image.clone(),
        image_id: r.image_id.clone(),
        port: r.port,
        env: r.env.clone(),
        secrets: keys.open_all(service, &r.secrets)?,
        health_path: r.health_path.clone(),
        volumes: r.volumes.clone(),
        resources: r.resources,
    })
}

async fn ticker(platform: Arc<platform::Platform>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        let now = Instant::now();
        for svc in platform.all() {
            svc.tick(now);
        }
    }
}

/// The iptables rule that keeps containers from the API port on the host (they reach the
/// host through the bridge's address). Removed when the server stops; a server killed with
/// SIGKILL leaves it, and the next start finds it in place.
struct Firewall {
    rule: Vec<String>,
}

impl Firewall {
    fn install(bridge: &str, api_port: u16) -> Firewall {
        let rule: Vec<String> = ["INPUT", "-i", bridge, "-p", "tcp", "--dport", &api_port.to_string(), "-j", "REJECT"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ok = |args: &[&str]| {
            std::process::Command::new("iptables")
                .arg("-w")
                .args(args)
                .args(&rule)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["-C"]) && !ok(&["-I"]) {
            tracing::warn!(bridge, api_port, "could not add the iptables rule that keeps containers off the API port");
        }
        Firewall { rule }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .arg("-w")
            .arg("-D")
            .args(&self.rule)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot listen for SIGTERM/SIGINT; stop the server with SIGKILL");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
}
