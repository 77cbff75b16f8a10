//! Containers on disk: what was asked for (`spec.json`, written once by the creator) and what
//! happened (`state.json`, written by the container's shim), plus names and ids.
//!
//! Layout of `<data-dir>/containers/<id>/`: `spec.json`, `state.json`, `bundle/config.json` (the
//! OCI spec), `rootfs/` (overlay mount point), `upper/` and `work/` (the container's own layer),
//! `hosts`, `hostname`, `resolv.conf`, `container.log` (+ rotated), `shim.log`.
//! Every write is write-temp + rename, so a reader in another berth process sees either the old
//! or the new file, never half of one.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{LogConfig, NetworkConfig};
use crate::network::Attachment;
use crate::Digest;

/// What the creator asked for. Immutable once written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub id: String,
    pub name: String,
    /// The image reference as given by the user, and the image it resolved to.
    pub image: String,
    pub image_id: Digest,
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The process: entrypoint + cmd after overrides.
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    /// The image's (or overridden) `User`, resolved inside the root filesystem at start.
    pub user: String,
    pub hostname: String,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    pub stop_signal: String,
    pub stop_timeout_secs: u64,
    pub auto_remove: bool,
    pub no_new_privileges: bool,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub network: NetworkConfig,
    pub logs: LogConfig,
    pub created: String,
    /// Prepared: the shim creates the container (everything but the process's exec) and waits
    /// for `start` on its socket; it tears everything down if the socket closes first.
    #[serde(default)]
    pub prepare: bool,
    /// Host directories bind-mounted into the container, validated by the engine (absolute,
    /// normalised destinations; canonical sources).
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

/// A host directory bind-mounted into a container (`berth run -v HOST:CONTAINER[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// A directory on the host.
    pub source: PathBuf,
    /// An absolute path inside the container; created in the root filesystem if missing.
    pub destination: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being set up by its shim.
    Created,
    Running,
    /// Frozen by the cgroup freezer.
    Paused,
    Exited,
    /// Could not be started; `State::error` says why.
    Failed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Exited => "exited",
            Status::Failed => "failed",
        })
    }
}

/// What happened, written by the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub status: Status,
    /// The shim's pid and its start time in clock ticks since boot (from /proc/<pid>/stat), so a
    /// recycled pid is never mistaken for the shim.
    pub shim_pid: Option<i32>,
    pub shim_start: Option<u64>,
    /// The container's init process, as seen from the host.
    pub pid: Option<i32>,
    pub network: Option<Attachment>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub oom_killed: bool,
    pub error: Option<String>,
}

impl State {
    pub fn new() -> State {
        State {
            status: Status::Created,
            shim_pid: None,
            shim_start: None,
            pid: None,
            network: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
            error: None,
        }
    }

    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.network.as_ref().map(|n| n.ip)
    }

    /// A one-line account of how the container ended, for humans.
    pub fn describe_exit(&self) -> String {
        match (self.status, self.exit_code, &self.signal) {
            (Status::Failed, _, _) => format!("failed to start: {}", self.error.as_deref().unwrap_or("unknown error")),
            (_, _, _) if self.oom_killed => "killed by the kernel: out of memory (OOM)".to_string(),
            (_, _, Some(sig)) => format!("killed by signal {sig}"),
            (_, Some(code), _) => format!("exited with code {code}"),
            (s, _, _) => s.to_string(),
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

/// A container as read from disk.
#[derive(Debug, Clone, Serialize)]
pub struct Container {
    pub id: String,
    pub spec: Spec,
    pub state: State,
    /// False when the state says running but no shim owns the container any more (the shim was
    /// killed, or the machine rebooted).
    pub shim_alive: bool,
}

impl Container {
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state.status, Status::Running | Status::Paused | Status::Created) && self.process_alive()
    }

    /// Whether the container's init process still exists (it can outlive a killed shim).
    pub fn process_alive(&self) -> bool {
        match (self.state.pid, self.shim_alive) {
            (_, true) => true,
            (Some(pid), false) => Path::new(&format!("/proc/{pid}")).exists() && is_container_init(pid, &self.id),
            (None, false) => false,
        }
    }
}

/// Whether `pid` is the init of container `id`: its cgroup path names the container.
fn is_container_init(pid: i32, id: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|s| s.contains(id)).unwrap_or(false)
}

pub fn new_id() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the kernel's random source");
    hex::encode(b)
}

/// Docker's rule for container names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, kept to 63 characters so the
/// name can serve as a host name.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid container name {name:?}: use 1 to 63 characters of [a-zA-Z0-9_.-], starting with a letter or digit"
        ))
    }
}

/// A friendly random name, as Docker gives, when none is asked for.
pub fn random_name(id: &str) -> String {
    const A: &[&str] = &["brave", "calm", "eager", "fond", "keen", "lucid", "merry", "quiet", "swift", "tidy"];
    const B: &[&str] = &["otter", "heron", "lynx", "finch", "marten", "ibis", "puffin", "wren", "stoat", "vole"];
    let b = hex::decode(&id[..4]).unwrap_or_else(|_| vec![0, 0]);
    format!("{}_{}_{}", A[b[0] as usize % A.len()], B[b[1] as usize % B.len()], &id[..6])
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, rename).
///
/// No fsync: these files describe live processes, which a power loss ends anyway, and an fsync
/// costs 2-25 ms here on every container start and exit. The rename still guarantees that a
/// reader sees the old or the new file, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp =
        dir.join(format!(".{}.tmp{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("f"), std::process::id()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    fs::rename(&tmp, path)
}

/// Paths of one container's directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path, id: &str) -> Paths {
        Paths { dir: data_dir.join("containers").join(id) }
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("container.log")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }

    pub fn read_spec(&self) -> io::Result<Spec> {
        let bytes = fs::read(self.spec())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn read_state(&self) -> io::Result<State> {
        match fs::read(self.state()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::new()),
            Err(e) => Err(e),
        }
    }

    pub fn write_state(&self, state: &State) -> io::Result<()> {
        write_atomic(&self.state(), &serde_json::to_vec_pretty(state).expect("state serialises"))
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat).
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // A zombie (or dead) process is gone for our purposes: it waits only for its parent (which,
    // for an orphaned shim, is whatever reaps orphans here) to collect its status.
    if rest.starts_with('Z') || rest.starts_with('X') {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the shim recorded in `state` is still the same live process.
pub fn shim_alive(state: &State) -> bool {
    match (state.shim_pid, state.shim_start) {
        (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "web-1", "my_app.v2", "0abc"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        let id = new_id();
        assert_eq!(id.len(), 64);
        assert!(validate_name(&random_name(&id)).is_ok());
    }

    #[test]
    fn own_start_time_is_readable() {
        let me = std::process::id() as i32;
        assert!(process_start_time(me).is_some());
        let st = State { shim_pid: Some(me), shim_start: process_start_time(me), ..State::new() };
        assert!(shim_alive(&st));
        let st = State { shim_start: Some(1), ..st };
        assert!(!shim_alive(&st));
    }
}
