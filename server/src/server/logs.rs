//! A service's logs: the output of its running instances (read from their container logs) and
//! of its stopped ones (kept under `<data-dir>/services/<name>/logs/` when they stop), merged
//! in time order. Blocking file reads: callers use `spawn_blocking`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use berth_agent::logs::{Follower, Line, Stream};
use berth_agent::Engine;
use bytes::Bytes;

use super::instance::{log_dir, LABEL_SERVICE};

/// One line of a service's log.
pub struct ServiceLine {
    pub instance: String,
    pub line: Line,
}

impl ServiceLine {
    pub fn to_ndjson(&self) -> Bytes {
        let text = String::from_utf8_lossy(&self.line.bytes);
        let v = serde_json::json!({
            "time": self.line.timestamp,
            "instance": self.instance,
            "stream": match self.line.stream { Stream::Stdout => "stdout", Stream::Stderr => "stderr" },
            "line": text.strip_suffix('\n').unwrap_or(&text),
        });
        let mut b = serde_json::to_vec(&v).expect("a log line serialises");
        b.push(b'\n');
        Bytes::from(b)
    }
}

pub struct ServiceLogs {
    engine: Arc<Engine>,
    data_dir: PathBuf,
    service: String,
    /// Followers of running instances' logs, by container id.
    live: BTreeMap<String, Follower>,
    /// Archived logs already shown (file names), so a stopped instance is not shown twice.
    seen_archives: HashSet<String>,
}

impl ServiceLogs {
    pub fn new(engine: Arc<Engine>, data_dir: PathBuf, service: String) -> ServiceLogs {
        ServiceLogs { engine, data_dir, service, live: BTreeMap::new(), seen_archives: HashSet::new() }
    }

    fn containers(&self) -> Vec<String> {
        self.engine
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.spec.labels.get(LABEL_SERVICE) == Some(&self.service))
            .map(|c| c.id)
            .collect()
    }

    /// Everything there is now, oldest first (the last `tail` lines if given); afterwards
    /// [`poll`](Self::poll) returns only what is new.
    pub fn read_all(&mut self, tail: Option<usize>) -> Vec<ServiceLine> {
        let engine = self.engine.clone();
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(log_dir(&self.data_dir, &self.service)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let instance = name.rsplit('_').next().unwrap_or("").trim_end_matches(".log").to_string();
                for line in berth_agent::logs::read_all(&e.path(), 0).unwrap_or_default() {
                    out.push(ServiceLine { instance: instance.clone(), line });
                }
                self.seen_archives.insert(name);
            }
        }
        for id in self.containers() {
            let path = engine.paths(&id).log();
            for line in berth_agent::logs::read_all(&path, engine.config().logs.max_files).unwrap_or_default() {
                out.push(ServiceLine { instance: id[..12].to_string(), line });
            }
            self.live.insert(id, Follower::at_end(&path));
        }
        out.sort_by(|a, b| a.line.timestamp.cmp(&b.line.timestamp));
        if let Some(n) = tail {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        out
    }

    /// New lines since the last call, including those of instances started since.
    pub fn poll(&mut self) -> Vec<ServiceLine> {
        let engine = self.engine.clone();
        let mut out = Vec::new();
        let current = self.containers();
        for id in &current {
            let f = self.live.entry(id.clone()).or_insert_with(|| Follower::from_start(&engine.paths(id).log()));
            let short = id[..12].to_string();
            let _ = f.poll(&mut |line| out.push(ServiceLine { instance: short.clone(), line }));
        }
        // Instances that stopped: their last lines, then forget them.
        let gone: Vec<String> = self.live.keys().filter(|id| !current.contains(id)).cloned().collect();
        for id in gone {
            if let Some(mut f) = self.live.remove(&id) {
                let short = id[..12].to_string();
                let _ = f.poll(&mut |line| out.push(ServiceLine { instance: short.clone(), line }));
                f.flush(&mut |line| out.push(ServiceLine { instance: short.clone(), line }));
            }
        }
        out.sort_by(|a, b| a.line.timestamp.cmp(&b.line.timestamp));
        out
    }
}
