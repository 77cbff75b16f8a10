//! The control plane's state: SQLite (`<data-dir>/berth.db`) by default, or PostgreSQL
//! (`--database-url postgres://…`); opening it, applying the embedded migrations of its kind
//! (`migrations/sqlite`, `migrations/postgres`), and the queries on services, revisions,
//! deploys, tokens and domains.
//!
//! Invariant: every query is written once, in the SQL both accept, with `$N` placeholders
//! (SQLite reads `$N` as parameter N too) and `RETURNING` instead of `last_insert_rowid()`;
//! every integer column is 64-bit on both.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Executor, Row};

/// A pool of connections to either database.
pub type Pool = sqlx::AnyPool;
type SqliteRow = AnyRow;
type SqlitePool = Pool;

use super::platform::{TrafficView, VolumeMount};
use super::scaling::Scaling;

/// The database file under the data directory.
pub const FILE: &str = "berth.db";

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Where the state lives, as `--database-url` says (None: SQLite in the data directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    /// Reads `--database-url`: `postgres://` or `postgresql://` URLs, or `sqlite:PATH`.
    pub fn parse(url: Option<&str>, data_dir: &Path) -> Result<Location, String> {
        let Some(url) = url else { return Ok(Location::Sqlite(data_dir.join(FILE))) };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Location::Postgres(url.to_string()));
        }
        if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            if path.is_empty() || path.contains('?') {
                return Err(format!("--database-url {url:?}: give sqlite:PATH, a file, without options"));
            }
            return Ok(Location::Sqlite(path.into()));
        }
        Err(format!(
            "--database-url: expected postgres://USER:PASSWORD@HOST:PORT/DB or sqlite:PATH, got {:?}",
            redact(url)
        ))
    }

    /// For messages: never the password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(url) => redact(url),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Opens (creating a SQLite file if needed) the database and applies pending migrations.
pub async fn open(location: &Location) -> anyhow::Result<Pool> {
    sqlx::any::install_default_drivers();
    let what = location.describe();
    let (url, migrator) = match location {
        Location::Sqlite(path) => (format!("sqlite://{}?mode=rwc", path.display()), &SQLITE),
        Location::Postgres(url) => (url.clone(), &POSTGRES),
    };
    let sqlite = matches!(location, Location::Sqlite(_));
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 4 } else { 8 })
        .acquire_timeout(std::time::Duration::from_secs(10))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
                        .await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .with_context(|| format!("opening the database {what}"))?;
    migrator.run(&pool).await.with_context(|| format!("applying migrations to {what}"))?;
    Ok(pool)
}

/// A service as stored: what the next deploy uses, and its scaling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: i64,
    pub name: String,
    pub port: Option<u16>,
    pub env: BTreeMap<String, String>,
    /// Secret variables, sealed (see [`super::secrets`]).
    pub secrets: BTreeMap<String, String>,
    pub health_path: Option<String>,
    pub volumes: Vec<VolumeMount>,
    pub release_command: Option<String>,
    pub resources: Resources,
    pub scaling: Scaling,
    /// The revision the last deploy or rollback put in service.
    pub revision: Option<i64>,
    /// How the untagged traffic is split; None: all to `revision`.
    pub traffic: Option<Vec<TrafficView>>,
    /// Tags: each reaches one revision at `<tag>--<service>.<domain>`.
    pub tags: BTreeMap<String, i64>,
    pub https: super::platform::Https,
    pub created_at: String,
    pub updated_at: String,
}

const SERVICE_COLUMNS: &str = "id, name, port, env, secrets, health_path, volumes, release_command, memory, cpu_millis, min, max, concurrency, freeze_after_ms, \
                               stop_after_ms, request_timeout_ms, queue, target, stable_window_ms, revision, traffic, tags, \
                               https, created_at, updated_at";

fn env_from(name: &str, text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    serde_json::from_str(text).with_context(|| format!("service {name}: stored env is not a JSON object"))
}

fn service_from_row(row: &SqliteRow) -> anyhow::Result<Service> {
    let name: String = row.try_get("name")?;
    let env: String = row.try_get("env")?;
    let env = env_from(&name, &env)?;
    let port: Option<i64> = row.try_get("port")?;
    let int = |col: &str| -> anyhow::Result<i64> { Ok(row.try_get::<i64, _>(col)?) };
    let u32_of = |col: &str| -> anyhow::Result<u32> {
        let v = int(col)?;
        u32::try_from(v).with_context(|| format!("service {name}: stored {col} {v} is out of range"))
    };
    let u64_of = |col: &str| -> anyhow::Result<u64> {
        let v = int(col)?;
        u64::try_from(v).with_context(|| format!("service {name}: stored {col} {v} is out of range"))
    };
    Ok(Service {
        id: row.try_get("id")?,
        port: port.map(u16::try_from).transpose().with_context(|| format!("service {name}: stored port"))?,
        env,
        secrets: env_from(&name, &row.try_get::<String, _>("secrets")?)?,
        health_path: row.try_get("health_path")?,
        volumes: serde_json::from_str(&row.try_get::<String, _>("volumes")?)
            .with_context(|| format!("service {name}: stored volumes"))?,
        release_command: row.try_get("release_command")?,
        resources: resources_from(row)?,
        scaling: Scaling {
            min: u32_of("min")?,
            max: u32_of("max")?,
            concurrency: u32_of("concurrency")?,
            freeze_after_ms: u64_of("freeze_after_ms")?,
            stop_after_ms: u64_of("stop_after_ms")?,
            request_timeout_ms: u64_of("request_timeout_ms")?,
            queue: u32_of("queue")?,
            target: u32_of("target")?,
            stable_window_ms: u64_of("stable_window_ms")?,
        },
        revision: row.try_get("revision")?,
        traffic: match row.try_get::<Option<String>, _>("traffic")? {
            Some(t) => Some(serde_json::from_str(&t).with_context(|| format!("service {name}: stored traffic"))?),
            None => None,
        },
        tags: serde_json::from_str(&row.try_get::<String, _>("tags")?)
            .with_context(|| format!("service {name}: stored tags"))?,
        https: serde_json::from_str(&row.try_get::<String, _>("https")?)
            .with_context(|| format!("service {name}: stored https settings"))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        name,
    })
}

/// What each instance may use: memory in bytes, CPUs in thousandths (1500: one and a half).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Resources {
    pub memory: Option<u64>,
    pub cpu_millis: Option<u32>,
}

fn resources_from(row: &SqliteRow) -> anyhow::Result<Resources> {
    let memory: Option<i64> = row.try_get("memory")?;
    let cpu: Option<i64> = row.try_get("cpu_millis")?;
    Ok(Resources {
        memory: memory.map(u64::try_from).transpose().context("stored memory")?,
        cpu_millis: cpu.map(u32::try_from).transpose().context("stored cpu_millis")?,
    })
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatting the current time")
}

/// Why an insert failed.
#[derive(Debug)]
pub enum InsertError {
    Duplicate,
    Other(anyhow::Error),
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a service's scaling columns, in the order `min, max, concurrency, freeze_after_ms,
/// stop_after_ms, request_timeout_ms, queue, target, stable_window_ms`.
fn bind_scaling<'q>(q: Query<'q>, sc: &Scaling) -> Query<'q> {
    q.bind(i64::from(sc.min))
        .bind(i64::from(sc.max))
        .bind(i64::from(sc.concurrency))
        .bind(sc.freeze_after_ms as i64)
        .bind(sc.stop_after_ms as i64)
        .bind(sc.request_timeout_ms as i64)
        .bind(i64::from(sc.queue))
        .bind(i64::from(sc.target))
        .bind(sc.stable_window_ms as i64)
}

/// Inserts a new service; returns its id.
pub async fn insert_service(pool: &SqlitePool, s: &Service) -> Result<i64, InsertError> {
    let env = serde_json::to_string(&s.env).map_err(|e| InsertError::Other(e.into()))?;
    let sc = &s.scaling;
    let q = sqlx::query(
        "INSERT INTO services (name, port, env, secrets, health_path, volumes, release_command, memory, cpu_millis, min, max, concurrency, freeze_after_ms, \
         stop_after_ms, request_timeout_ms, queue, target, stable_window_ms, revision, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, NULL, $19, $20) RETURNING id",
    )
    .bind(&s.name)
    .bind(s.port.map(i64::from))
    .bind(env)
    .bind(serde_json::to_string(&s.secrets).map_err(|e| InsertError::Other(e.into()))?)
    .bind(&s.health_path)
    .bind(serde_json::to_string(&s.volumes).map_err(|e| InsertError::Other(e.into()))?)
    .bind(&s.release_command)
    .bind(s.resources.memory.map(|m| m as i64))
    .bind(s.resources.cpu_millis.map(i64::from));
    let result = bind_scaling(q, sc).bind(&s.created_at).bind(&s.updated_at).fetch_one(pool).await;
    match result {
        Ok(r) => r.try_get::<i64, _>(0).map_err(|e| InsertError::Other(e.into())),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(InsertError::Duplicate),
        Err(e) => Err(InsertError::Other(anyhow::Error::new(e).context(format!("inserting service {}", s.name)))),
    }
}

pub async fn get_service(pool: &SqlitePool, name: &str) -> anyhow::Result<Option<Service>> {
    let row = sqlx::query(&format!("SELECT {SERVICE_COLUMNS} FROM services WHERE name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("reading service {name}"))?;
    row.as_ref().map(service_from_row).transpose()
}

pub async fn list_services(pool: &SqlitePool) -> anyhow::Result<Vec<Service>> {
    let rows = sqlx::query(&format!("SELECT {SERVICE_COLUMNS} FROM services ORDER BY name"))
        .fetch_all(pool)
        .await
        .context("listing services")?;
    rows.iter().map(service_from_row).collect()
}

/// Sets what the next deploy of a service uses (its port, env, secrets, health path).
pub async fn set_service_config(pool: &SqlitePool, s: &Service) -> anyhow::Result<()> {
    let id = s.id;
    sqlx::query(
        "UPDATE services SET port = $1, env = $2, secrets = $3, health_path = $4, volumes = $5, release_command = $6, \
         memory = $7, cpu_millis = $8, updated_at = $9 WHERE id = $10",
    )
    .bind(s.port.map(i64::from))
    .bind(serde_json::to_string(&s.env)?)
    .bind(serde_json::to_string(&s.secrets)?)
    .bind(&s.health_path)
    .bind(serde_json::to_string(&s.volumes)?)
    .bind(&s.release_command)
    .bind(s.resources.memory.map(|m| m as i64))
    .bind(s.resources.cpu_millis.map(i64::from))
    .bind(now())
    .bind(id)
    .execute(pool)
    .await
    .context("updating a service")?;
    Ok(())
}

/// Sets a service's scaling; false if there is no such service.
pub async fn set_scaling(pool: &SqlitePool, name: &str, sc: &Scaling) -> anyhow::Result<bool> {
    let q = sqlx::query(
        "UPDATE services SET min = $1, max = $2, concurrency = $3, freeze_after_ms = $4, stop_after_ms = $5, \
         request_timeout_ms = $6, queue = $7, target = $8, stable_window_ms = $9, updated_at = $10 WHERE name = $11",
    );
    let done = bind_scaling(q, sc)
        .bind(now())
        .bind(name)
        .execute(pool)
        .await
        .with_context(|| format!("updating the scaling of service {name}"))?;
    Ok(done.rows_affected() == 1)
}

/// Sets a service's HTTPS settings; false if there is no such service.
pub async fn set_https(pool: &SqlitePool, name: &str, h: &super::platform::Https) -> anyhow::Result<bool> {
    let done = sqlx::query("UPDATE services SET https = $1, updated_at = $2 WHERE name = $3")
        .bind(serde_json::to_string(h)?)
        .bind(now())
        .bind(name)
        .execute(pool)
        .await
        .with_context(|| format!("updating the HTTPS settings of service {name}"))?;
    Ok(done.rows_affected() == 1)
}

/// Deletes a service (and, by cascade, its revisions and deploys); false if there is none.
pub async fn delete_service(pool: &SqlitePool, name: &str) -> anyhow::Result<bool> {
    let done = sqlx::query("DELETE FROM services WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await
        .with_context(|| format!("deleting service {name}"))?;
    Ok(done.rows_affected() == 1)
}

/// A revision as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub number: i64,
    pub image: String,
    pub image_id: String,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    /// Sealed, as the service's were when the revision was made.
    pub secrets: BTreeMap<String, String>,
    pub health_path: Option<String>,
    pub volumes: Vec<VolumeMount>,
    pub release_command: Option<String>,
    pub resources: Resources,
    pub created_at: String,
    pub served_at: Option<String>,
}

const REVISION_COLUMNS: &str =
    "number, image, image_id, port, env, secrets, health_path, volumes, release_command, memory, cpu_millis, \
     created_at, served_at";

fn revision_from_row(row: &SqliteRow) -> anyhow::Result<Revision> {
    let env: String = row.try_get("env")?;
    let port: i64 = row.try_get("port")?;
    Ok(Revision {
        number: row.try_get("number")?,
        image: row.try_get("image")?,
        image_id: row.try_get("image_id")?,
        port: u16::try_from(port).context("stored revision port")?,
        env: env_from("revision", &env)?,
        secrets: env_from("revision", &row.try_get::<String, _>("secrets")?)?,
        health_path: row.try_get("health_path")?,
        volumes: serde_json::from_str(&row.try_get::<String, _>("volumes")?).context("stored revision volumes")?,
        release_command: row.try_get("release_command")?,
        resources: resources_from(row)?,
        created_at: row.try_get("created_at")?,
        served_at: row.try_get("served_at")?,
    })
}

/// A service's revisions, newest first.
pub async fn list_revisions(pool: &SqlitePool, service_id: i64) -> anyhow::Result<Vec<Revision>> {
    let rows =
        sqlx::query(&format!("SELECT {REVISION_COLUMNS} FROM revisions WHERE service_id = $1 ORDER BY number DESC"))
            .bind(service_id)
            .fetch_all(pool)
            .await
            .context("listing revisions")?;
    rows.iter().map(revision_from_row).collect()
}

/// Every revision's (service id, number, image id), newest first within each service.
pub async fn revision_images(pool: &SqlitePool) -> anyhow::Result<Vec<(i64, i64, String)>> {
    let rows = sqlx::query("SELECT service_id, number, image_id FROM revisions ORDER BY service_id, number DESC")
        .fetch_all(pool)
        .await
        .context("listing revision images")?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
}

pub async fn get_revision(pool: &SqlitePool, service_id: i64, number: i64) -> anyhow::Result<Option<Revision>> {
    let row = sqlx::query(&format!("SELECT {REVISION_COLUMNS} FROM revisions WHERE service_id = $1 AND number = $2"))
        .bind(service_id)
        .bind(number)
        .fetch_optional(pool)
        .await
        .context("reading a revision")?;
    row.as_ref().map(revision_from_row).transpose()
}

/// Records a new revision of service `s` (with its env, secrets and health path); returns it
/// with its number (one more than the last).
pub async fn insert_revision(
    pool: &SqlitePool,
    s: &Service,
    image: &str,
    image_id: &str,
    port: u16,
) -> anyhow::Result<Revision> {
    let created_at = now();
    let row = sqlx::query(
        "INSERT INTO revisions (service_id, number, image, image_id, port, env, secrets, health_path, volumes, \
         release_command, memory, cpu_millis, created_at) \
         VALUES ($1, (SELECT COALESCE(MAX(number), 0) + 1 FROM revisions WHERE service_id = $2), $3, $4, $5, $6, $7, \
         $8, $9, $10, $11, $12, $13) \
         RETURNING number",
    )
    .bind(s.id)
    .bind(s.id)
    .bind(image)
    .bind(image_id)
    .bind(i64::from(port))
    .bind(serde_json::to_string(&s.env)?)
    .bind(serde_json::to_string(&s.secrets)?)
    .bind(&s.health_path)
    .bind(serde_json::to_string(&s.volumes)?)
    .bind(&s.release_command)
    .bind(s.resources.memory.map(|m| m as i64))
    .bind(s.resources.cpu_millis.map(i64::from))
    .bind(&created_at)
    .fetch_one(pool)
    .await
    .context("recording a revision")?;
    Ok(Revision {
        number: row.try_get("number")?,
        image: image.to_string(),
        image_id: image_id.to_string(),
        port,
        env: s.env.clone(),
        secrets: s.secrets.clone(),
        health_path: s.health_path.clone(),
        volumes: s.volumes.clone(),
        release_command: s.release_command.clone(),
        resources: s.resources,
        created_at,
        served_at: None,
    })
}

/// Puts revision `number` in service with all the traffic (tags stay).
pub async fn set_current_revision(pool: &SqlitePool, service_id: i64, number: i64) -> anyhow::Result<()> {
    sqlx::query("UPDATE services SET revision = $1, traffic = NULL, updated_at = $2 WHERE id = $3")
        .bind(number)
        .bind(now())
        .bind(service_id)
        .execute(pool)
        .await
        .context("switching the revision")?;
    mark_served(pool, service_id, std::iter::once(number)).await
}

/// Sets how the untagged traffic is split (None: all to the service's revision).
pub async fn set_traffic(pool: &SqlitePool, service_id: i64, traffic: Option<&[TrafficView]>) -> anyhow::Result<()> {
    let text = traffic.map(serde_json::to_string).transpose()?;
    sqlx::query("UPDATE services SET traffic = $1, updated_at = $2 WHERE id = $3")
        .bind(text)
        .bind(now())
        .bind(service_id)
        .execute(pool)
        .await
        .context("setting the traffic split")?;
    mark_served(pool, service_id, traffic.unwrap_or_default().iter().filter(|t| t.percent > 0).map(|t| t.revision))
        .await
}

pub async fn set_tags(pool: &SqlitePool, service_id: i64, tags: &BTreeMap<String, i64>) -> anyhow::Result<()> {
    sqlx::query("UPDATE services SET tags = $1, updated_at = $2 WHERE id = $3")
        .bind(serde_json::to_string(tags)?)
        .bind(now())
        .bind(service_id)
        .execute(pool)
        .await
        .context("setting the tags")?;
    Ok(())
}

/// Records that these revisions took traffic (once: the first time is kept).
async fn mark_served(pool: &SqlitePool, service_id: i64, numbers: impl Iterator<Item = i64>) -> anyhow::Result<()> {
    for n in numbers {
        sqlx::query("UPDATE revisions SET served_at = COALESCE(served_at, $1) WHERE service_id = $2 AND number = $3")
            .bind(now())
            .bind(service_id)
            .bind(n)
            .execute(pool)
            .await
            .context("recording that a revision served")?;
    }
    Ok(())
}

/// Deploys a stopped server left unfinished are marked failed (their instances, if any, are
/// not serving and drain).
pub async fn fail_unfinished_deploys(pool: &SqlitePool) -> anyhow::Result<u64> {
    let r = sqlx::query(
        "UPDATE deploys SET status = 'failed', error = 'the server stopped during the deploy', finished_at = $1 \
         WHERE finished_at IS NULL",
    )
    .bind(now())
    .execute(pool)
    .await
    .context("closing unfinished deploys")?;
    Ok(r.rows_affected())
}

/// Forgets a deploy that was refused before it began.
pub async fn delete_deploy(pool: &SqlitePool, id: i64) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM deploys WHERE id = $1").bind(id).execute(pool).await.context("forgetting a deploy")?;
    Ok(())
}

/// A deploy as stored.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Deploy {
    pub id: i64,
    pub service: String,
    pub revision: Option<i64>,
    pub image: String,
    pub status: String,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// The name of the token that asked for it.
    pub by: String,
    /// `deploy` (a new image), `config` (new settings: `berth env`) or `rollback`.
    pub kind: String,
}

pub async fn insert_deploy(
    pool: &SqlitePool,
    service_id: i64,
    kind: &str,
    revision: Option<i64>,
    image: &str,
    token: &str,
) -> anyhow::Result<i64> {
    let r = sqlx::query(
        "INSERT INTO deploys (service_id, kind, revision, image, status, token, created_at) \
         VALUES ($1, $2, $3, $4, 'pending', $5, $6) RETURNING id",
    )
    .bind(service_id)
    .bind(kind)
    .bind(revision)
    .bind(image)
    .bind(token)
    .bind(now())
    .fetch_one(pool)
    .await
    .context("recording a deploy")?;
    Ok(r.try_get::<i64, _>(0)?)
}

pub async fn update_deploy(
    pool: &SqlitePool,
    id: i64,
    status: &str,
    revision: Option<i64>,
    error: Option<&str>,
    finished: bool,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE deploys SET status = $1, revision = COALESCE($2, revision), error = $3, \
         finished_at = CASE WHEN $4 THEN $5 ELSE finished_at END WHERE id = $6",
    )
    .bind(status)
    .bind(revision)
    .bind(error)
    .bind(finished)
    .bind(now())
    .bind(id)
    .execute(pool)
    .await
    .context("updating a deploy")?;
    Ok(())
}

const DEPLOY_COLUMNS: &str =
    "d.id, s.name, d.revision, d.image, d.status, d.error, d.created_at, d.finished_at, d.token, d.kind";

fn deploy_from_row(r: &SqliteRow) -> anyhow::Result<Deploy> {
    Ok(Deploy {
        id: r.try_get(0)?,
        service: r.try_get(1)?,
        revision: r.try_get(2)?,
        image: r.try_get(3)?,
        status: r.try_get(4)?,
        error: r.try_get(5)?,
        created_at: r.try_get(6)?,
        finished_at: r.try_get(7)?,
        by: r.try_get(8)?,
        kind: r.try_get(9)?,
    })
}

pub async fn get_deploy(pool: &SqlitePool, service: &str, id: i64) -> anyhow::Result<Option<Deploy>> {
    let row = sqlx::query(&format!(
        "SELECT {DEPLOY_COLUMNS} FROM deploys d JOIN services s ON s.id = d.service_id WHERE s.name = $1 AND d.id = $2"
    ))
    .bind(service)
    .bind(id)
    .fetch_optional(pool)
    .await
    .context("reading a deploy")?;
    row.as_ref().map(deploy_from_row).transpose()
}

/// A service's deploys, newest first, at most `limit`.
pub async fn list_deploys(pool: &SqlitePool, service: &str, limit: i64) -> anyhow::Result<Vec<Deploy>> {
    let rows = sqlx::query(&format!(
        "SELECT {DEPLOY_COLUMNS} FROM deploys d JOIN services s ON s.id = d.service_id WHERE s.name = $1 \
         ORDER BY d.id DESC LIMIT $2"
    ))
    .bind(service)
    .bind(limit)
    .fetch_all(pool)
    .await
    .with_context(|| format!("listing the deploys of {service}"))?;
    rows.iter().map(deploy_from_row).collect()
}

/// Records the hash of the token called `name`, replacing the one it had.
pub async fn ensure_token(pool: &SqlitePool, name: &str, hash: &str, scope: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tokens (name, hash, scope, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT(name) DO UPDATE SET hash = excluded.hash, scope = excluded.scope",
    )
    .bind(name)
    .bind(hash)
    .bind(scope)
    .bind(now())
    .execute(pool)
    .await
    .with_context(|| format!("recording token {name}"))?;
    Ok(())
}

/// A token as stored (never the token itself).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Token {
    pub name: String,
    /// `admin` or `deploy`.
    pub scope: String,
    /// The one service a `deploy` token may deploy.
    pub service: Option<String>,
    pub created_at: String,
}

fn token_from_row(r: &SqliteRow) -> anyhow::Result<Token> {
    Ok(Token {
        name: r.try_get("name")?,
        scope: r.try_get("scope")?,
        service: r.try_get("service")?,
        created_at: r.try_get("created_at")?,
    })
}

/// The token whose hash is `hash`, if there is one.
pub async fn find_token(pool: &SqlitePool, hash: &str) -> anyhow::Result<Option<Token>> {
    let row = sqlx::query("SELECT name, scope, service, created_at FROM tokens WHERE hash = $1")
        .bind(hash)
        .fetch_optional(pool)
        .await
        .context("looking up a token")?;
    row.as_ref().map(token_from_row).transpose()
}

pub async fn list_tokens(pool: &SqlitePool) -> anyhow::Result<Vec<Token>> {
    let rows = sqlx::query("SELECT name, scope, service, created_at FROM tokens ORDER BY name")
        .fetch_all(pool)
        .await
        .context("listing tokens")?;
    rows.iter().map(token_from_row).collect()
}

/// Records a new token; Duplicate if the name is taken.
pub async fn insert_token(pool: &SqlitePool, t: &Token, hash: &str) -> Result<(), InsertError> {
    let r = sqlx::query("INSERT INTO tokens (name, hash, scope, service, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&t.name)
        .bind(hash)
        .bind(&t.scope)
        .bind(&t.service)
        .bind(&t.created_at)
        .execute(pool)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(InsertError::Duplicate),
        Err(e) => Err(InsertError::Other(anyhow::Error::new(e).context(format!("recording token {}", t.name)))),
    }
}

/// Deletes a token; false if there is none by that name.
pub async fn delete_token(pool: &SqlitePool, name: &str) -> anyhow::Result<bool> {
    let r = sqlx::query("DELETE FROM tokens WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await
        .with_context(|| format!("revoking token {name}"))?;
    Ok(r.rows_affected() == 1)
}

/// Revokes the deploy tokens scoped to `service`; returns how many.
pub async fn delete_service_tokens(pool: &SqlitePool, service: &str) -> anyhow::Result<u64> {
    let r = sqlx::query("DELETE FROM tokens WHERE scope = 'deploy' AND service = $1")
        .bind(service)
        .execute(pool)
        .await
        .with_context(|| format!("revoking the tokens of {service}"))?;
    Ok(r.rows_affected())
}

/// A service's extra host names, sorted.
pub async fn list_domains(pool: &SqlitePool, service_id: i64) -> anyhow::Result<Vec<String>> {
    let rows = sqlx::query("SELECT host FROM domains WHERE service_id = $1 ORDER BY host")
        .bind(service_id)
        .fetch_all(pool)
        .await
        .context("listing domains")?;
    Ok(rows.iter().map(|r| r.get("host")).collect())
}

/// Every extra host name with its service's name.
pub async fn all_domains(pool: &SqlitePool) -> anyhow::Result<Vec<(String, String)>> {
    let rows = sqlx::query("SELECT d.host, s.name FROM domains d JOIN services s ON s.id = d.service_id")
        .fetch_all(pool)
        .await
        .context("listing domains")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Gives `host` to a service; Duplicate if some service has it.
pub async fn insert_domain(pool: &SqlitePool, service_id: i64, host: &str) -> Result<(), InsertError> {
    let r = sqlx::query("INSERT INTO domains (host, service_id, created_at) VALUES ($1, $2, $3)")
        .bind(host)
        .bind(service_id)
        .bind(now())
        .execute(pool)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(InsertError::Duplicate),
        Err(e) => Err(InsertError::Other(anyhow::Error::new(e).context(format!("adding domain {host}")))),
    }
}

/// The service that has `host`, if any.
pub async fn domain_owner(pool: &SqlitePool, host: &str) -> anyhow::Result<Option<String>> {
    let row = sqlx::query("SELECT s.name FROM domains d JOIN services s ON s.id = d.service_id WHERE d.host = $1")
        .bind(host)
        .fetch_optional(pool)
        .await
        .context("looking up a domain")?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn delete_domain(pool: &SqlitePool, service_id: i64, host: &str) -> anyhow::Result<bool> {
    let r = sqlx::query("DELETE FROM domains WHERE service_id = $1 AND host = $2")
        .bind(service_id)
        .bind(host)
        .execute(pool)
        .await
        .with_context(|| format!("removing domain {host}"))?;
    Ok(r.rows_affected() == 1)
}

// --- builds --------------------------------------------------------------------------------

/// A build of a service's source, as stored; its output is `<data-dir>/builds/<id>.log`.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Build {
    pub id: i64,
    pub service: String,
    /// `building`, `deploying`, `succeeded` or `failed`.
    pub status: String,
    /// `git` (a push) or `upload` (a context sent to the API).
    pub source: String,
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub image: Option<String>,
    pub image_id: Option<String>,
    /// The deploy that followed the build.
    pub deploy: Option<i64>,
    pub error: Option<String>,
    /// The name of the token that asked for it.
    pub by: String,
    pub created_at: String,
    pub finished_at: Option<String>,
}

const BUILD_COLUMNS: &str = "b.id, s.name, b.status, b.source, b.git_commit, b.branch, b.image, b.image_id, \
     b.deploy_id, b.error, b.token, b.created_at, b.finished_at";

fn build_from_row(r: &SqliteRow) -> anyhow::Result<Build> {
    Ok(Build {
        id: r.try_get(0)?,
        service: r.try_get(1)?,
        status: r.try_get(2)?,
        source: r.try_get(3)?,
        commit: r.try_get(4)?,
        branch: r.try_get(5)?,
        image: r.try_get(6)?,
        image_id: r.try_get(7)?,
        deploy: r.try_get(8)?,
        error: r.try_get(9)?,
        by: r.try_get(10)?,
        created_at: r.try_get(11)?,
        finished_at: r.try_get(12)?,
    })
}

pub async fn insert_build(
    pool: &SqlitePool,
    service_id: i64,
    source: &str,
    commit: Option<&str>,
    branch: Option<&str>,
    token: &str,
) -> anyhow::Result<i64> {
    let r = sqlx::query(
        "INSERT INTO builds (service_id, status, source, git_commit, branch, token, created_at) \
         VALUES ($1, 'building', $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(service_id)
    .bind(source)
    .bind(commit)
    .bind(branch)
    .bind(token)
    .bind(now())
    .fetch_one(pool)
    .await
    .context("recording a build")?;
    Ok(r.try_get(0)?)
}

/// Records a build's progress; `finished` stamps its end.
#[allow(clippy::too_many_arguments)]
pub async fn update_build(
    pool: &SqlitePool,
    id: i64,
    status: &str,
    image: Option<&str>,
    image_id: Option<&str>,
    deploy: Option<i64>,
    error: Option<&str>,
    finished: bool,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE builds SET status = $1, image = COALESCE($2, image), image_id = COALESCE($3, image_id), \
         deploy_id = COALESCE($4, deploy_id), error = $5, finished_at = $6 WHERE id = $7",
    )
    .bind(status)
    .bind(image)
    .bind(image_id)
    .bind(deploy)
    .bind(error)
    .bind(finished.then(now))
    .bind(id)
    .execute(pool)
    .await
    .context("recording a build's progress")?;
    Ok(())
}

pub async fn get_build(pool: &SqlitePool, service: &str, id: i64) -> anyhow::Result<Option<Build>> {
    let row = sqlx::query(&format!(
        "SELECT {BUILD_COLUMNS} FROM builds b JOIN services s ON s.id = b.service_id WHERE s.name = $1 AND b.id = $2"
    ))
    .bind(service)
    .bind(id)
    .fetch_optional(pool)
    .await
    .context("reading a build")?;
    row.as_ref().map(build_from_row).transpose()
}

/// A service's builds, newest first, at most `limit`.
pub async fn list_builds(pool: &SqlitePool, service: &str, limit: i64) -> anyhow::Result<Vec<Build>> {
    let rows = sqlx::query(&format!(
        "SELECT {BUILD_COLUMNS} FROM builds b JOIN services s ON s.id = b.service_id WHERE s.name = $1 \
         ORDER BY b.id DESC LIMIT $2"
    ))
    .bind(service)
    .bind(limit)
    .fetch_all(pool)
    .await
    .with_context(|| format!("listing the builds of {service}"))?;
    rows.iter().map(build_from_row).collect()
}

/// Builds a restart left unfinished are failed: their process is gone.
pub async fn fail_unfinished_builds(pool: &SqlitePool) -> anyhow::Result<u64> {
    let r = sqlx::query(
        "UPDATE builds SET status = 'failed', error = 'the server stopped during the build', finished_at = $1 \
         WHERE finished_at IS NULL",
    )
    .bind(now())
    .execute(pool)
    .await
    .context("closing unfinished builds")?;
    Ok(r.rows_affected())
}
