//! The live side of the control plane: every service's revisions in service (its traffic
//! split and tags), instances and queues of held requests, in memory. The proxy asks it for a
//! [`Lease`] on an instance; it decides when to start, thaw, freeze, drain and stop instances
//! and hands that work to [`super::instance`].
//!
//! Invariants:
//! - The request path ([`Service::acquire`], [`Lease`] drop) takes one short `std` mutex per
//!   service and never waits on the database, the engine or the network.
//! - Every state change of an instance happens under that mutex; slow work (engine calls,
//!   probes) runs outside it and reports back through `on_*` methods.
//! - A held request is a oneshot sender in its revision's queue; a client that gave up drops
//!   its receiver and is skipped (and no longer counted) from then on.
//! - A request's revision is chosen once, when it arrives (by its tag, else by the traffic
//!   split), and it is served by an instance of that revision only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::autoscale::Autoscaler;
use super::scaling::Scaling;

/// A revision as instances run it: the image pinned by id plus its config. Immutable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub number: i64,
    pub image: String,
    pub image_id: String,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    /// Secret variables, opened: in memory only.
    pub secrets: super::secrets::Plain,
    pub health_path: Option<String>,
    pub volumes: Vec<VolumeMount>,
    pub resources: super::db::Resources,
}

/// A named volume mounted at `path` in a service's instances.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub volume: String,
    #[schemars(regex(pattern = r"^/[^:]*[^/:]$"))]
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Starting,
    Ready,
    /// Scaled in: takes no new requests, stops once its requests finished (or, if the load
    /// comes back first, is ready again).
    Draining,
    Freezing,
    Frozen,
    Thawing,
    Stopping,
}

#[derive(Debug)]
struct Instance {
    slot: u64,
    container: Option<String>,
    revision: i64,
    addr: Option<SocketAddr>,
    state: InstanceState,
    in_flight: u32,
    last_active: Instant,
    started_at: String,
    /// When the container was last checked to be alive (ready instances only).
    checked: Instant,
    /// When it became ready (a crash after a long healthy run does not count as a loop).
    ready_at: Option<Instant>,
}

impl Instance {
    /// Counts toward the revision's instances (it serves, or will, or can be thawed).
    fn is_live(&self) -> bool {
        !matches!(self.state, InstanceState::Stopping | InstanceState::Draining)
    }
    /// Serves now or very soon.
    fn is_up(&self) -> bool {
        matches!(self.state, InstanceState::Starting | InstanceState::Ready | InstanceState::Thawing)
    }
}

/// Why a request could not get an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotDeployed,
    QueueFull(u32),
    StartFailed(String),
    Deleted,
}

/// Why [`Service::lease_instance`] found no instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoInstance {
    Unknown,
    Ambiguous,
    NotReady(InstanceState),
}

/// Told when a deploy's first instance of a new revision is ready (or why it is not).
pub type StartNotice = oneshot::Sender<Result<(), String>>;

/// Work for [`super::instance`], decided under the service's lock and done outside it.
#[derive(Debug)]
pub enum Action {
    Start {
        svc: Arc<Service>,
        slot: u64,
        revision: Arc<Revision>,
        timeout: Duration,
        notify: Option<StartNotice>,
    },
    Freeze {
        svc: Arc<Service>,
        slot: u64,
        container: String,
    },
    Thaw {
        svc: Arc<Service>,
        slot: u64,
        container: String,
    },
    Stop {
        svc: Arc<Service>,
        slot: u64,
        container: Option<String>,
    },
    Check {
        svc: Arc<Service>,
        slot: u64,
        container: String,
    },
    /// The service went to zero: keep a container of `revision` created but not started, so
    /// the next cold start skips most of the setup.
    Prepare {
        svc: Arc<Service>,
        revision: Arc<Revision>,
    },
    /// Drop the prepared containers of service `service` (deleted, or a new revision).
    Discard {
        service: i64,
        name: String,
    },
}

type Waiter = oneshot::Sender<Result<Lease, Refusal>>;

/// One revision's share of the traffic.
#[derive(Debug, Clone)]
struct Split {
    rev: Arc<Revision>,
    percent: u32,
    /// Smooth weighted round robin: the share it is owed.
    credit: i64,
}

/// A revision's share of the traffic, as set and shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct TrafficView {
    pub revision: i64,
    pub percent: u32,
}

#[derive(Debug)]
struct Inner {
    scaling: Scaling,
    /// The revision the last deploy or rollback put in service.
    revision: Option<Arc<Revision>>,
    /// Who gets the untagged requests: percentages adding up to 100.
    traffic: Vec<Split>,
    /// `<tag>--<service>.<domain>` reaches that revision alone.
    tags: BTreeMap<String, Arc<Revision>>,
    /// Per revision in service.
    scalers: HashMap<i64, Autoscaler>,
    instances: Vec<Instance>,
    /// Held requests per revision, oldest first.
    queues: BTreeMap<i64, VecDeque<Waiter>>,
    last_error: Option<String>,
    /// After a failed start or a crash, instances are not restarted for `min` or the
    /// autoscaler before this.
    retry_after: Option<Instant>,
    /// When the traffic last moved off a revision: instances of revisions out of service drain
    /// for at most `request_timeout` from then (no request of theirs can legitimately last
    /// longer).
    switched_at: Option<Instant>,
    /// Crashes in a row (instances that died soon after becoming ready): the restart backoff
    /// doubles with each, from 100 ms up to 30 s.
    crashes: u32,
    deploying: Option<i64>,
    /// The revision a running deploy is starting: its instances are not drained.
    candidate: Option<i64>,
    deleted: bool,
    next_slot: u64,
}

impl Inner {
    /// The revisions that may get requests: those with a share of the traffic, tagged ones,
    /// and a deploy's candidate.
    fn in_service(&self, rev: i64) -> bool {
        self.traffic.iter().any(|s| s.rev.number == rev && s.percent > 0)
            || self.tags.values().any(|r| r.number == rev)
            || self.candidate == Some(rev)
    }

    fn find_revision(&self, rev: i64) -> Option<Arc<Revision>> {
        self.traffic
            .iter()
            .map(|s| &s.rev)
            .chain(self.tags.values())
            .chain(self.revision.iter())
            .find(|r| r.number == rev)
            .cloned()
    }

    /// The revision for the next untagged request: smooth weighted round robin, so a 90/10
    /// split sends exactly one request in ten to the second revision, evenly spread.
    fn pick(&mut self) -> Option<Arc<Revision>> {
        let total: i64 = self.traffic.iter().map(|s| i64::from(s.percent)).sum();
        if total == 0 {
            return None;
        }
        for s in self.traffic.iter_mut() {
            s.credit += i64::from(s.percent);
        }
        let best = self.traffic.iter_mut().filter(|s| s.percent > 0).max_by_key(|s| s.credit)?;
        best.credit -= total;
        Some(best.rev.clone())
    }

    /// The instances `min` asks of revision `rev`: its share of `min`, rounded up.
    fn min_of(&self, rev: i64) -> u32 {
        let pct = self.traffic.iter().find(|s| s.rev.number == rev).map_or(0, |s| s.percent);
        if pct == 0 {
            0
        } else {
            (self.scaling.min * pct).div_ceil(100)
        }
    }

    fn waiting(&self, rev: i64) -> usize {
        self.queues.get(&rev).map_or(0, |q| q.iter().filter(|w| !w.is_closed()).count())
    }
}

/// One service's live state.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub id: i64,
    /// A prepared container (created, not started) waits for this service's next cold start.
    prepared: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
    actions: mpsc::UnboundedSender<Action>,
    https: std::sync::RwLock<Https>,
}

/// A service's HTTPS settings (`berth https`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct Https {
    /// Plain HTTP requests are redirected (308) to HTTPS, except ACME HTTP-01 challenges.
    pub redirect: bool,
    /// Seconds of `Strict-Transport-Security: max-age` on HTTPS responses; None: no header.
    pub hsts_max_age: Option<u64>,
    /// The instances speak HTTP/2 without TLS (h2c, prior knowledge): the proxy's upstream
    /// connections use it instead of HTTP/1.1 (upgrades such as WebSockets then fail).
    pub h2c: bool,
}

/// A counted use of one instance: the proxy holds it while a request (or an upgraded
/// connection) is in flight. Dropping it frees the slot and hands it to the next held request.
#[derive(Debug)]
pub struct Lease {
    svc: Option<Arc<Service>>,
    slot: u64,
    pub addr: SocketAddr,
    pub revision: i64,
}

impl Lease {
    pub fn slot(&self) -> u64 {
        self.slot
    }
    pub fn service(&self) -> &Arc<Service> {
        self.svc.as_ref().expect("an armed lease")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(svc) = self.svc.take() {
            let mut g = svc.lock();
            if let Some(i) = g.instances.iter_mut().find(|i| i.slot == self.slot) {
                i.in_flight = i.in_flight.saturating_sub(1);
                i.last_active = Instant::now();
            }
            svc.dispatch(&mut g);
        }
    }
}

/// What [`Service::acquire`] gives.
pub enum Acquired {
    Now(Lease),
    Held(oneshot::Receiver<Result<Lease, Refusal>>),
    Refused(Refusal),
}

/// A summary for the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    pub revision: Option<Arc<RevisionView>>,
    pub traffic: Vec<TrafficView>,
    pub tags: BTreeMap<String, i64>,
    pub instances: Vec<InstanceView>,
    pub queued: usize,
    pub in_flight: u32,
    pub last_error: Option<String>,
    pub deploying: Option<i64>,
    pub status: &'static str,
    pub prepared: bool,
    /// Instances that died in a row soon after becoming ready.
    pub crashes: u32,
    /// Revisions whose autoscaler is in panic mode (a burst).
    pub panicking: Vec<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RevisionView {
    pub number: i64,
    pub image: String,
    pub image_id: String,
    pub port: u16,
}

#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct InstanceView {
    pub id: Option<String>,
    pub revision: i64,
    pub state: InstanceState,
    pub address: Option<String>,
    pub in_flight: u32,
    pub idle_ms: u64,
    pub started_at: String,
}

/// The least-loaded ready instance of `rev` with room: its slot and address, counted in.
fn take(instances: &mut [Instance], rev: i64, conc: u32) -> Option<(u64, SocketAddr)> {
    let inst = instances
        .iter_mut()
        .filter(|i| i.state == InstanceState::Ready && i.revision == rev && i.in_flight < conc)
        .min_by_key(|i| i.in_flight)?;
    inst.in_flight += 1;
    inst.last_active = Instant::now();
    Some((inst.slot, inst.addr.expect("a ready instance has an address")))
}

impl Service {
    pub fn new(
        name: String,
        id: i64,
        scaling: Scaling,
        revision: Option<Revision>,
        actions: mpsc::UnboundedSender<Action>,
    ) -> Arc<Service> {
        let revision = revision.map(Arc::new);
        let traffic = revision.iter().map(|r| Split { rev: r.clone(), percent: 100, credit: 0 }).collect::<Vec<_>>();
        Arc::new(Service {
            name,
            id,
            prepared: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner {
                scaling,
                revision,
                traffic,
                tags: BTreeMap::new(),
                scalers: HashMap::new(),
                instances: Vec::new(),
                queues: BTreeMap::new(),
                last_error: None,
                retry_after: None,
                crashes: 0,
                switched_at: None,
                deploying: None,
                candidate: None,
                deleted: false,
                next_slot: 1,
            }),
            actions,
            https: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under this lock is a bug; the state is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn act(&self, a: Action) {
        let _ = self.actions.send(a);
    }

    pub fn set_prepared(&self, yes: bool) {
        self.prepared.store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_prepared(&self) -> bool {
        self.prepared.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn scaling(&self) -> Scaling {
        self.lock().scaling
    }

    pub fn https(&self) -> Https {
        *self.https.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_https(&self, h: Https) {
        *self.https.write().unwrap_or_else(|e| e.into_inner()) = h;
    }

    /// The tags that name one of its revisions.
    pub fn tag_names(&self) -> Vec<String> {
        self.lock().tags.keys().cloned().collect()
    }

    pub fn revision(&self) -> Option<Arc<Revision>> {
        self.lock().revision.clone()
    }

    /// True if `tag` names a revision of this service.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.lock().tags.contains_key(tag)
    }

    /// An instance for one request (of the revision tagged `tag`, else of the one the traffic
    /// split picks): at once if one has room, else a place in that revision's queue (and an
    /// instance thawed or started for it), else the reason there is none.
    pub fn acquire(self: &Arc<Self>, tag: Option<&str>) -> Acquired {
        let mut g = self.lock();
        if g.deleted {
            return Acquired::Refused(Refusal::Deleted);
        }
        let rev = match tag {
            Some(t) => g.tags.get(t).cloned(),
            None => g.pick(),
        };
        let Some(rev) = rev else { return Acquired::Refused(Refusal::NotDeployed) };
        let n = rev.number;
        if g.queues.get(&n).is_none_or(VecDeque::is_empty) {
            let conc = g.scaling.concurrency;
            if let Some((slot, addr)) = take(&mut g.instances, n, conc) {
                return Acquired::Now(Lease { svc: Some(self.clone()), slot, addr, revision: n });
            }
        }
        let held: usize = g
            .queues
            .values_mut()
            .map(|q| {
                q.retain(|w| !w.is_closed());
                q.len()
            })
            .sum();
        if held >= g.scaling.queue as usize {
            return Acquired::Refused(Refusal::QueueFull(g.scaling.queue));
        }
        let (tx, rx) = oneshot::channel();
        g.queues.entry(n).or_default().push_back(tx);
        self.plan(&mut g);
        Acquired::Held(rx)
    }

    /// A lease on the instance whose container id is or starts with `container` (an exec into
    /// it), whatever its load: while held, the instance is busy and is neither frozen nor
    /// stopped. Returns the full container id.
    pub fn lease_instance(self: &Arc<Self>, container: &str) -> Result<(Lease, String), NoInstance> {
        let mut g = self.lock();
        let matches = |i: &&mut Instance| i.container.as_deref().is_some_and(|c| c.starts_with(container));
        let mut found = g.instances.iter_mut().filter(matches);
        let inst = match (found.next(), found.next()) {
            (Some(i), None) => i,
            (None, _) => return Err(NoInstance::Unknown),
            (Some(_), Some(_)) => return Err(NoInstance::Ambiguous),
        };
        if inst.state != InstanceState::Ready {
            return Err(NoInstance::NotReady(inst.state));
        }
        inst.in_flight += 1;
        inst.last_active = Instant::now();
        let id = inst.container.clone().expect("matched on its container");
        let addr = inst.addr.expect("a ready instance has an address");
        let revision = inst.revision;
        Ok((Lease { svc: Some(self.clone()), slot: inst.slot, addr, revision }, id))
    }

    /// The container of the instance in `slot`, if it has one.
    pub fn container_of(&self, slot: u64) -> Option<String> {
        self.lock().instances.iter().find(|i| i.slot == slot).and_then(|i| i.container.clone())
    }

    /// Hands free slots to held requests, oldest first per revision; then plans for those
    /// still waiting.
    fn dispatch(self: &Arc<Self>, g: &mut Inner) {
        let conc = g.scaling.concurrency;
        let Inner { queues, instances, .. } = g;
        for (&rev, q) in queues.iter_mut() {
            while let Some(front) = q.front() {
                if front.is_closed() {
                    q.pop_front();
                    continue;
                }
                let Some((slot, addr)) = take(instances, rev, conc) else { break };
                let tx = q.pop_front().expect("a front waiter");
                let lease = Lease { svc: Some(self.clone()), slot, addr, revision: rev };
                if let Err(Ok(mut back)) = tx.send(Ok(lease)) {
                    // The client left between the check and the send: take the slot back
                    // without re-entering this lock through Drop.
                    back.svc = None;
                    if let Some(i) = instances.iter_mut().find(|i| i.slot == back.slot) {
                        i.in_flight -= 1;
                    }
                }
            }
        }
        queues.retain(|_, q| !q.is_empty());
        self.plan(g);
    }

    /// Scale-up decisions for the held requests of each revision: bring back draining
    /// instances, thaw frozen ones, then start new ones (up to `max` for the whole service)
    /// until the capacity on its way covers the queue.
    fn plan(self: &Arc<Self>, g: &mut Inner) {
        if g.deleted {
            return;
        }
        let waiting: Vec<(i64, u64)> =
            g.queues.keys().map(|&r| (r, g.waiting(r) as u64)).filter(|&(_, w)| w > 0).collect();
        if waiting.is_empty() {
            return;
        }
        let conc = u64::from(g.scaling.concurrency);
        let mut active = g.instances.iter().filter(|i| i.is_live()).count() as u64;
        for (rev, waiting) in waiting {
            let Some(revision) = g.find_revision(rev) else { continue };
            let mut coming: u64 = 0;
            for i in g.instances.iter_mut().filter(|i| i.revision == rev) {
                match i.state {
                    InstanceState::Starting | InstanceState::Thawing | InstanceState::Freezing => coming += conc,
                    InstanceState::Draining if coming < waiting => {
                        i.state = InstanceState::Ready;
                        coming += conc;
                        active += 1;
                    }
                    InstanceState::Frozen if coming < waiting => {
                        i.state = InstanceState::Thawing;
                        coming += conc;
                        let container = i.container.clone().expect("a frozen instance has a container");
                        let _ = self.actions.send(Action::Thaw { svc: self.clone(), slot: i.slot, container });
                    }
                    _ => {}
                }
            }
            while coming < waiting && active < u64::from(g.scaling.max) {
                self.start_locked(g, revision.clone());
                coming += conc;
                active += 1;
            }
        }
        // A draining instance brought back may take a held request at once.
        let ready_with_queue = g.instances.iter().any(|i| {
            i.state == InstanceState::Ready && i.in_flight < g.scaling.concurrency && g.waiting(i.revision) > 0
        });
        if ready_with_queue {
            self.dispatch(g);
        }
    }

    /// Adds a `starting` instance of `revision`; returns its slot.
    fn push_starting(g: &mut Inner, revision: i64) -> u64 {
        let slot = g.next_slot;
        g.next_slot += 1;
        let now = Instant::now();
        g.instances.push(Instance {
            slot,
            container: None,
            revision,
            addr: None,
            state: InstanceState::Starting,
            in_flight: 0,
            last_active: now,
            started_at: super::db::now(),
            checked: now,
            ready_at: None,
        });
        slot
    }

    fn start_locked(self: &Arc<Self>, g: &mut Inner, revision: Arc<Revision>) {
        let slot = Self::push_starting(g, revision.number);
        // An instance gets as long to start as a deploy gives it, however short the requests'
        // timeout: a held request may give up (504), the instance still comes up for the next.
        let timeout = super::deploy::READY_TIMEOUT;
        self.act(Action::Start { svc: self.clone(), slot, revision, timeout, notify: None });
    }

    /// Starts one instance of `revision` for a deploy, before the traffic moves to it; `notify`
    /// learns whether it became ready within `timeout`.
    pub fn start_candidate(self: &Arc<Self>, revision: Revision, timeout: Duration, notify: StartNotice) {
        let mut g = self.lock();
        g.candidate = Some(revision.number);
        let slot = Self::push_starting(&mut g, revision.number);
        drop(g);
        self.act(Action::Start {
            svc: self.clone(),
            slot,
            revision: Arc::new(revision),
            timeout,
            notify: Some(notify),
        });
    }

    /// Periodic decisions: drain revisions out of service, freeze and stop idle instances,
    /// check that ready instances are alive, and autoscale each revision in service (keeping
    /// its share of `min`).
    pub fn tick(self: &Arc<Self>, now: Instant) {
        let mut g = self.lock();
        if g.deleted {
            return;
        }
        // At zero with nothing held and nothing to keep running: nothing to decide (most of a
        // thousand idle services, every tick).
        if g.instances.is_empty() && g.queues.is_empty() && g.scalers.is_empty() && g.scaling.min == 0 {
            return;
        }
        let sc = g.scaling;
        let drained = g
            .switched_at
            .is_some_and(|t| now.saturating_duration_since(t) >= Duration::from_millis(sc.request_timeout_ms));
        let mut actions = Vec::new();
        let mut live: HashMap<i64, u32> = HashMap::new();
        for i in g.instances.iter().filter(|i| i.is_live()) {
            *live.entry(i.revision).or_default() += 1;
        }
        let in_service: HashMap<i64, bool> = live.keys().map(|&r| (r, g.in_service(r))).collect();
        let mins: HashMap<i64, u32> = live.keys().map(|&r| (r, g.min_of(r))).collect();
        let queued: HashMap<i64, bool> = live.keys().map(|&r| (r, g.waiting(r) > 0)).collect();
        for i in g.instances.iter_mut() {
            let idle = now.saturating_duration_since(i.last_active);
            let busy = i.in_flight > 0;
            let serving = in_service.get(&i.revision).copied().unwrap_or(false);
            match i.state {
                InstanceState::Ready | InstanceState::Frozen | InstanceState::Draining
                    if !serving && (!busy || drained) =>
                {
                    i.state = InstanceState::Stopping;
                    actions.push(Action::Stop { svc: self.clone(), slot: i.slot, container: i.container.clone() });
                }
                InstanceState::Draining if !busy || idle >= Duration::from_millis(sc.request_timeout_ms) => {
                    i.state = InstanceState::Stopping;
                    actions.push(Action::Stop { svc: self.clone(), slot: i.slot, container: i.container.clone() });
                }
                InstanceState::Frozen
                    if idle >= Duration::from_millis(sc.stop_after_ms)
                        && live.get(&i.revision).copied().unwrap_or(0)
                            > mins.get(&i.revision).copied().unwrap_or(0) =>
                {
                    i.state = InstanceState::Stopping;
                    *live.entry(i.revision).or_default() -= 1;
                    actions.push(Action::Stop { svc: self.clone(), slot: i.slot, container: i.container.clone() });
                }
                InstanceState::Ready
                    if !busy
                        && !queued.get(&i.revision).copied().unwrap_or(false)
                        && idle >= Duration::from_millis(sc.freeze_after_ms)
                        && i.container.is_some() =>
                {
                    i.state = InstanceState::Freezing;
                    let container = i.container.clone().expect("checked");
                    actions.push(Action::Freeze { svc: self.clone(), slot: i.slot, container });
                }
                InstanceState::Ready if now.saturating_duration_since(i.checked) >= Duration::from_secs(1) => {
                    i.checked = now;
                    if let Some(c) = &i.container {
                        actions.push(Action::Check { svc: self.clone(), slot: i.slot, container: c.clone() });
                    }
                }
                _ => {}
            }
        }
        self.autoscale(&mut g, now, &mut actions);
        drop(g);
        for a in actions {
            self.act(a);
        }
    }

    /// Each revision in service: feed its autoscaler, then scale out (bring back draining
    /// instances, thaw frozen ones, start new ones within `max`) or scale in (drain the idlest
    /// ready instances beyond what it wants; never below one, which the idle timers handle).
    fn autoscale(self: &Arc<Self>, g: &mut Inner, now: Instant, actions: &mut Vec<Action>) {
        let sc = g.scaling;
        let stable = Duration::from_millis(sc.stable_window_ms);
        let mut revs: Vec<Arc<Revision>> = g.traffic.iter().filter(|s| s.percent > 0).map(|s| s.rev.clone()).collect();
        for r in g.tags.values() {
            if !revs.iter().any(|x| x.number == r.number) {
                revs.push(r.clone());
            }
        }
        g.scalers.retain(|n, _| revs.iter().any(|r| r.number == *n));
        let may_retry = g.retry_after.is_none_or(|t| now >= t);
        for rev in revs {
            let n = rev.number;
            let of_rev = |g: &Inner, f: &dyn Fn(&Instance) -> bool| {
                g.instances.iter().filter(|i| i.revision == n && f(i)).count() as u32
            };
            let load =
                g.instances.iter().filter(|i| i.revision == n).map(|i| i.in_flight).sum::<u32>() + g.waiting(n) as u32;
            let ready = of_rev(g, &|i| i.state == InstanceState::Ready);
            let scaler = g.scalers.entry(n).or_default();
            scaler.observe(now, load, stable);
            let want = scaler.desired(now, ready, sc.target(), stable);
            let panicking = scaler.panicking();
            if scaler.is_quiet() && of_rev(g, &|_| true) == 0 {
                g.scalers.remove(&n);
            }
            let floor = g.min_of(n);
            let desired = want.max(floor).min(sc.max);
            // Scale out to what the autoscaler wants serving: draining instances first (they
            // are warm), then frozen ones, then new ones.
            // Only under load now: a quiet revision keeps what it has (idle instances freeze
            // and stop on their timers), however much the stable average still wants.
            let mut up = of_rev(g, &|i| i.is_up() || i.state == InstanceState::Freezing);
            let mut total = g.instances.iter().filter(|i| i.is_live()).count() as u32;
            let serve = if load > 0 { want.min(sc.max) } else { 0 };
            for i in g.instances.iter_mut().filter(|i| i.revision == n) {
                if up >= serve {
                    break;
                }
                match i.state {
                    InstanceState::Draining => {
                        i.state = InstanceState::Ready;
                        up += 1;
                        total += 1;
                    }
                    InstanceState::Frozen => {
                        i.state = InstanceState::Thawing;
                        up += 1;
                        let container = i.container.clone().expect("a frozen instance has a container");
                        actions.push(Action::Thaw { svc: self.clone(), slot: i.slot, container });
                    }
                    _ => {}
                }
            }
            // `min` counts frozen instances too: they are there, thawed on demand.
            let live = of_rev(g, &|i| i.is_live());
            let mut short = serve.saturating_sub(up).max(floor.saturating_sub(live));
            while short > 0 && total < sc.max && may_retry {
                self.start_locked(g, rev.clone());
                short -= 1;
                total += 1;
            }
            // Scale in.
            let keep = desired.max(1);
            if !panicking && ready > keep {
                let mut excess = ready - keep;
                let mut idle: Vec<&mut Instance> =
                    g.instances.iter_mut().filter(|i| i.revision == n && i.state == InstanceState::Ready).collect();
                idle.sort_by_key(|i| (i.in_flight, std::cmp::Reverse(now.saturating_duration_since(i.last_active))));
                for i in idle {
                    if excess == 0 {
                        break;
                    }
                    excess -= 1;
                    i.state = InstanceState::Draining;
                    if i.in_flight == 0 {
                        i.state = InstanceState::Stopping;
                        actions.push(Action::Stop { svc: self.clone(), slot: i.slot, container: i.container.clone() });
                    }
                }
            }
        }
    }

    // --- reports from the work in `instance` -------------------------------------------------

    /// The container of a starting instance exists (so a delete can stop it).
    pub fn on_created(&self, slot: u64, container: &str) {
        let mut g = self.lock();
        if let Some(i) = g.instances.iter_mut().find(|i| i.slot == slot) {
            i.container = Some(container.to_string());
        }
    }

    /// A started instance is ready: it takes held requests at once.
    pub fn on_ready(self: &Arc<Self>, slot: u64, container: &str, addr: SocketAddr) {
        let mut g = self.lock();
        let deleted = g.deleted;
        let Some(i) = g.instances.iter_mut().find(|i| i.slot == slot) else { return };
        i.container = Some(container.to_string());
        i.addr = Some(addr);
        let now = Instant::now();
        i.last_active = now;
        i.checked = now;
        i.ready_at = Some(now);
        if deleted || i.state == InstanceState::Stopping {
            i.state = InstanceState::Stopping;
            let c = i.container.clone();
            drop(g);
            self.act(Action::Stop { svc: self.clone(), slot, container: c });
            return;
        }
        i.state = InstanceState::Ready;
        g.last_error = None;
        g.retry_after = None;
        self.dispatch(&mut g);
    }

    /// A start failed: the requests held for its revision get the reason, unless another
    /// instance of it is on its way or ready.
    pub fn on_start_failed(self: &Arc<Self>, slot: u64, reason: &str) {
        let mut g = self.lock();
        let Some(revision) = g.instances.iter().find(|i| i.slot == slot).map(|i| i.revision) else { return };
        g.instances.retain(|i| i.slot != slot);
        let serving =
            g.traffic.iter().any(|s| s.rev.number == revision) || g.tags.values().any(|r| r.number == revision);
        if g.candidate == Some(revision) && !serving {
            // A deploy's candidate: the deploy reports it; the serving revision is not at fault.
            return;
        }
        g.last_error = Some(reason.to_string());
        g.retry_after = Some(Instant::now() + Duration::from_secs(5));
        let hope = g.instances.iter().any(|i| {
            i.revision == revision
                && matches!(
                    i.state,
                    InstanceState::Starting | InstanceState::Ready | InstanceState::Thawing | InstanceState::Freezing
                )
        });
        if hope {
            self.dispatch(&mut g);
            return;
        }
        if let Some(q) = g.queues.remove(&revision) {
            for w in q {
                let _ = w.send(Err(Refusal::StartFailed(reason.to_string())));
            }
        }
    }

    pub fn on_frozen(self: &Arc<Self>, slot: u64, ok: bool) {
        let mut g = self.lock();
        if let Some(i) = g.instances.iter_mut().find(|i| i.slot == slot && i.state == InstanceState::Freezing) {
            i.state = if ok { InstanceState::Frozen } else { InstanceState::Ready };
        }
        // A request that came while freezing waits for a thaw, which plan() orders.
        self.dispatch(&mut g);
    }

    pub fn on_thawed(self: &Arc<Self>, slot: u64) {
        let mut g = self.lock();
        if let Some(i) = g.instances.iter_mut().find(|i| i.slot == slot && i.state == InstanceState::Thawing) {
            i.state = InstanceState::Ready;
            i.last_active = Instant::now();
        }
        self.dispatch(&mut g);
    }

    pub fn on_stopped(self: &Arc<Self>, slot: u64) {
        let mut g = self.lock();
        g.instances.retain(|i| i.slot != slot);
        self.dispatch(&mut g);
        if g.instances.is_empty() && !g.deleted && g.candidate.is_none() {
            if let Some(rev) = g.revision.clone() {
                drop(g);
                self.act(Action::Prepare { svc: self.clone(), revision: rev });
            }
        }
    }

    /// A ready instance's container is gone (crashed, killed): forget it.
    pub fn on_dead(self: &Arc<Self>, slot: u64, reason: &str) {
        let mut g = self.lock();
        let Some(dead) = g.instances.iter().position(|i| i.slot == slot && i.state != InstanceState::Stopping) else {
            return;
        };
        let i = g.instances.remove(dead);
        let now = Instant::now();
        if i.ready_at.is_some_and(|t| now.saturating_duration_since(t) >= HEALTHY_RUN) {
            g.crashes = 0;
        }
        g.crashes = g.crashes.saturating_add(1);
        let backoff = crash_backoff(g.crashes);
        g.retry_after = Some(now + backoff);
        tracing::warn!(service = %self.name, reason = ?reason, crashes = g.crashes, backoff_ms = backoff.as_millis() as u64,
            "instance died");
        g.last_error = Some(format!("an instance died ({} in a row): {reason}", g.crashes));
        self.dispatch(&mut g);
    }

    /// The proxy could not talk to the instance behind `lease`: have it checked soon.
    pub fn suspect(self: &Arc<Self>, slot: u64) {
        let g = self.lock();
        if let Some(c) = g.instances.iter().find(|i| i.slot == slot).and_then(|i| i.container.clone()) {
            drop(g);
            self.act(Action::Check { svc: self.clone(), slot, container: c });
        }
    }

    // --- control plane -----------------------------------------------------------------------

    pub fn set_scaling(self: &Arc<Self>, scaling: Scaling) {
        let mut g = self.lock();
        g.scaling = scaling;
        self.dispatch(&mut g);
    }

    /// Marks a deploy as running; false if another one is.
    pub fn begin_deploy(&self, id: i64) -> Result<(), i64> {
        let mut g = self.lock();
        match g.deploying {
            Some(other) => Err(other),
            None => {
                g.deploying = Some(id);
                Ok(())
            }
        }
    }

    /// Ends a deploy; the candidate's instances, if it did not take the traffic, drain.
    pub fn end_deploy(self: &Arc<Self>) {
        let mut g = self.lock();
        g.deploying = None;
        g.candidate = None;
    }

    /// Adds an instance that runs already (adopted at start, or started by a deploy).
    pub fn adopt(self: &Arc<Self>, container: &str, revision: i64, addr: SocketAddr, frozen: bool, started_at: String) {
        let mut g = self.lock();
        let slot = g.next_slot;
        g.next_slot += 1;
        let now = Instant::now();
        g.instances.push(Instance {
            slot,
            container: Some(container.to_string()),
            revision,
            addr: Some(addr),
            state: if frozen { InstanceState::Frozen } else { InstanceState::Ready },
            in_flight: 0,
            last_active: now,
            started_at,
            checked: now,
            // Adopted: it has been running for who knows how long; count it as healthy.
            ready_at: now.checked_sub(HEALTHY_RUN),
        });
        self.dispatch(&mut g);
    }

    /// Switches all the traffic to `revision` (a deploy or a rollback); instances of revisions
    /// out of service drain and stop. Tags stay as they are.
    pub fn switch(self: &Arc<Self>, revision: Revision) {
        let mut g = self.lock();
        if g.candidate == Some(revision.number) {
            g.candidate = None;
        }
        if g.revision.as_ref().map(|r| r.number) != Some(revision.number) {
            self.act(Action::Discard { service: self.id, name: self.name.clone() });
        }
        if g.traffic.len() != 1 || g.traffic[0].rev.number != revision.number {
            g.switched_at = Some(Instant::now());
        }
        let rev = Arc::new(revision);
        g.traffic = vec![Split { rev: rev.clone(), percent: 100, credit: 0 }];
        g.revision = Some(rev);
        g.last_error = None;
        g.retry_after = None;
        self.dispatch(&mut g);
    }

    /// Splits the untagged traffic between revisions (percentages adding up to 100, checked by
    /// the caller). Requests held for a revision that loses its share still go to it.
    pub fn set_traffic(self: &Arc<Self>, split: Vec<(Revision, u32)>) {
        let mut g = self.lock();
        let mut traffic = Vec::with_capacity(split.len());
        for (rev, percent) in split {
            let rev = g.find_revision(rev.number).filter(|r| **r == rev).unwrap_or_else(|| Arc::new(rev));
            traffic.push(Split { rev, percent, credit: 0 });
        }
        g.traffic = traffic;
        g.switched_at = Some(Instant::now());
        self.dispatch(&mut g);
    }

    /// Points `tag` at `revision` (None: removes the tag).
    pub fn set_tag(self: &Arc<Self>, tag: &str, revision: Option<Revision>) {
        let mut g = self.lock();
        match revision {
            Some(rev) => {
                let rev = g.find_revision(rev.number).filter(|r| **r == rev).unwrap_or_else(|| Arc::new(rev));
                g.tags.insert(tag.to_string(), rev);
            }
            None => {
                g.tags.remove(tag);
                g.switched_at = Some(Instant::now());
            }
        }
        self.dispatch(&mut g);
    }

    /// Deletes the service: held requests are refused, every instance stopped.
    pub fn delete(self: &Arc<Self>) {
        let mut g = self.lock();
        g.deleted = true;
        self.act(Action::Discard { service: self.id, name: self.name.clone() });
        for (_, q) in std::mem::take(&mut g.queues) {
            for w in q {
                let _ = w.send(Err(Refusal::Deleted));
            }
        }
        let mut actions = Vec::new();
        for i in g.instances.iter_mut() {
            if i.state != InstanceState::Stopping && i.state != InstanceState::Starting {
                i.state = InstanceState::Stopping;
                actions.push(Action::Stop { svc: self.clone(), slot: i.slot, container: i.container.clone() });
            } else if i.state == InstanceState::Starting {
                i.state = InstanceState::Stopping; // on_ready stops it
            }
        }
        drop(g);
        for a in actions {
            self.act(a);
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    /// What the API shows of the live state.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let now = Instant::now();
        let instances: Vec<InstanceView> = g
            .instances
            .iter()
            .map(|i| InstanceView {
                id: i.container.clone(),
                revision: i.revision,
                state: i.state,
                address: i.addr.map(|a| a.to_string()),
                in_flight: i.in_flight,
                idle_ms: now.saturating_duration_since(i.last_active).as_millis() as u64,
                started_at: i.started_at.clone(),
            })
            .collect();
        let has = |s: InstanceState| instances.iter().any(|i| i.state == s);
        let status = if g.revision.is_none() {
            if g.deploying.is_some() {
                "deploying"
            } else {
                "not-deployed"
            }
        } else if has(InstanceState::Ready) || has(InstanceState::Thawing) || has(InstanceState::Draining) {
            "ready"
        } else if has(InstanceState::Starting) {
            "starting"
        } else if has(InstanceState::Frozen) || has(InstanceState::Freezing) {
            "frozen"
        } else if g.crashes >= 3 {
            "crash-loop"
        } else if g.last_error.is_some() {
            "failed"
        } else {
            "idle"
        };
        let mut panicking: Vec<i64> = g.scalers.iter().filter(|(_, a)| a.panicking()).map(|(n, _)| *n).collect();
        panicking.sort_unstable();
        Snapshot {
            revision: g.revision.as_ref().map(|r| {
                Arc::new(RevisionView {
                    number: r.number,
                    image: r.image.clone(),
                    image_id: r.image_id.clone(),
                    port: r.port,
                })
            }),
            traffic: g.traffic.iter().map(|s| TrafficView { revision: s.rev.number, percent: s.percent }).collect(),
            tags: g.tags.iter().map(|(t, r)| (t.clone(), r.number)).collect(),
            queued: g.queues.values().map(|q| q.iter().filter(|w| !w.is_closed()).count()).sum(),
            in_flight: g.instances.iter().map(|i| i.in_flight).sum(),
            instances,
            last_error: g.last_error.clone(),
            deploying: g.deploying,
            status,
            prepared: self.is_prepared(),
            crashes: g.crashes,
            panicking,
        }
    }
}

/// An instance that ran this long before dying ends a crash loop: its death counts as the first.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// How long min instances wait to be restarted after `crashes` crashes in a row.
fn crash_backoff(crashes: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << crashes.saturating_sub(1).min(20));
    Duration::from_millis(ms.min(30_000))
}

/// Every service's live state, by name, and how a host name maps to one.
pub struct Platform {
    services: dashmap::DashMap<String, Arc<Service>>,
    /// Extra host names (`berth domains`) → service name.
    hosts: dashmap::DashMap<String, String>,
    /// `.<domain>`: a host `<name>.<domain>` is service `<name>`.
    suffix: String,
    control_host: String,
}

/// Where a request's Host sends it.
pub enum Route {
    Control,
    /// A service, and the tag that names one of its revisions (`<tag>--<service>.<domain>`).
    Service(Arc<Service>, Option<String>),
    Unknown(String),
}

impl Platform {
    pub fn new(domain: &str, control_host: &str) -> Platform {
        Platform {
            services: dashmap::DashMap::new(),
            hosts: dashmap::DashMap::new(),
            suffix: format!(".{domain}"),
            control_host: control_host.into(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Service>> {
        self.services.get(name).map(|s| s.clone())
    }

    pub fn insert(&self, svc: Arc<Service>) {
        self.services.insert(svc.name.clone(), svc);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Service>> {
        self.hosts.retain(|_, svc| svc != name);
        self.services.remove(name).map(|(_, s)| s)
    }

    /// Routes `host` (normalised) to service `name` too.
    pub fn add_host(&self, host: &str, name: &str) {
        self.hosts.insert(host.to_string(), name.to_string());
    }

    pub fn remove_host(&self, host: &str) {
        self.hosts.remove(host);
    }

    /// The names service `name` answers at: `<service>.<domain>`, its tag names and its
    /// custom domains.
    pub fn names_of(&self, svc: &Service) -> Vec<String> {
        let mut v = vec![format!("{}{}", svc.name, self.suffix)];
        v.extend(svc.tag_names().into_iter().map(|t| format!("{t}--{}{}", svc.name, self.suffix)));
        v.extend(self.hosts.iter().filter(|e| e.value() == &svc.name).map(|e| e.key().clone()));
        v
    }

    /// Every name the proxy answers at, each wanting a certificate: the control host and
    /// every service's names.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut v = vec![self.control_host.clone()];
        for s in self.all() {
            v.extend(self.names_of(&s));
        }
        v
    }

    pub fn control_host(&self) -> &str {
        &self.control_host
    }

    pub fn all(&self) -> Vec<Arc<Service>> {
        self.services.iter().map(|e| e.value().clone()).collect()
    }

    /// Routes a Host header value: case-insensitive, port and trailing dot ignored;
    /// `<service>.internal` only for requests from containers.
    pub fn route(&self, host: &str, from_container: bool) -> Route {
        let host = normalize_host(host);
        if let Some(name) = host.strip_suffix(super::internal::SUFFIX) {
            return match self.get(name).filter(|_| from_container) {
                Some(svc) => Route::Service(svc, None),
                None => Route::Unknown(host),
            };
        }
        if host == self.control_host {
            return Route::Control;
        }
        if let Some(name) = self.hosts.get(&host).map(|n| n.clone()) {
            if let Some(svc) = self.get(&name) {
                return Route::Service(svc, None);
            }
        }
        if let Some(name) = host.strip_suffix(self.suffix.as_str()) {
            if !name.contains('.') {
                if let Some(svc) = self.get(name) {
                    return Route::Service(svc, None);
                }
                // A tag has no "--" of its own, so the first one ends it.
                if let Some((tag, name)) = name.split_once("--") {
                    if let Some(svc) = self.get(name).filter(|s| s.has_tag(tag)) {
                        return Route::Service(svc, Some(tag.to_string()));
                    }
                }
            }
        }
        Route::Unknown(host)
    }
}

/// A Host header's name: lowercase, without its port and trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:80`.
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
    };
    super::tls::normalize(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(n: i64) -> Revision {
        Revision {
            number: n,
            image: "img".into(),
            image_id: "sha256:x".into(),
            port: 8080,
            env: Default::default(),
            secrets: Default::default(),
            health_path: None,
            volumes: Vec::new(),
            resources: Default::default(),
        }
    }

    fn service(scaling: Scaling) -> (Arc<Service>, mpsc::UnboundedReceiver<Action>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Service::new("s".into(), 1, scaling, Some(rev(1)), tx), rx)
    }

    fn addr() -> SocketAddr {
        "10.0.0.2:8080".parse().unwrap()
    }

    #[test]
    fn hosts_route_case_insensitively_without_port_or_trailing_dot() {
        let p = Platform::new("example.test", "berth.example.test");
        let (svc, _rx) = service(Scaling::default());
        p.insert(svc);
        for h in ["s.example.test", "S.Example.TEST", "s.example.test.", "s.example.test:8080", "s.example.test.:80"] {
            assert!(matches!(p.route(h, false), Route::Service(_, None)), "{h}");
        }
        assert!(matches!(p.route("BERTH.example.test:7070", false), Route::Control));
        for h in ["x.example.test", "a.s.example.test", "example.test", "s.example.test.evil", ""] {
            assert!(matches!(p.route(h, false), Route::Unknown(_)), "{h}");
        }
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert!(matches!(p.route("s.internal", true), Route::Service(_, None)));
        assert!(matches!(p.route("S.Internal.", true), Route::Service(_, None)));
        assert!(matches!(p.route("s.internal", false), Route::Unknown(_)), "only containers reach .internal");
        assert!(matches!(p.route("x.internal", true), Route::Unknown(_)));
    }

    #[test]
    fn a_deploy_candidate_is_not_drained_and_its_failure_leaves_the_service_alone() {
        let (svc, mut actions) = service(Scaling::default());
        svc.adopt("old", 1, addr(), false, "t".into());
        let (tx, _rx) = oneshot::channel();
        svc.start_candidate(rev(2), Duration::from_secs(5), tx);
        let Ok(Action::Start { slot, .. }) = actions.try_recv() else { panic!("a start") };
        svc.on_ready(slot, "new", "10.0.0.3:8080".parse().unwrap());
        svc.tick(Instant::now());
        assert!(actions.try_recv().is_err(), "neither the serving nor the candidate instance stops");
        let Acquired::Now(lease) = svc.acquire(None) else { panic!() };
        assert_eq!(lease.addr, addr(), "the old revision serves until the switch");
        drop(lease);
        let (tx, _rx) = oneshot::channel();
        svc.start_candidate(rev(3), Duration::from_secs(5), tx);
        let Ok(Action::Start { slot, .. }) = actions.try_recv() else { panic!("a start") };
        svc.on_start_failed(slot, "exited with code 1");
        assert_eq!(svc.snapshot().last_error, None, "a failed candidate is the deploy's error, not the service's");
    }

    #[test]
    fn held_requests_start_one_instance_per_concurrency_and_get_it_when_ready() {
        let (svc, mut actions) = service(Scaling { concurrency: 2, max: 5, queue: 10, ..Scaling::default() });
        let mut held = Vec::new();
        for _ in 0..3 {
            match svc.acquire(None) {
                Acquired::Held(rx) => held.push(rx),
                _ => panic!("nothing runs: the request is held"),
            }
        }
        let mut starts = Vec::new();
        while let Ok(a) = actions.try_recv() {
            if let Action::Start { slot, .. } = a {
                starts.push(slot);
            }
        }
        assert_eq!(starts.len(), 2, "3 requests at concurrency 2 need 2 instances");
        svc.on_ready(starts[0], "c1", addr());
        // Keep the leases: dropping one frees its slot for the next request.
        let got: Vec<Option<Lease>> = held.iter_mut().map(|rx| rx.try_recv().ok().and_then(Result::ok)).collect();
        let got: Vec<bool> = got.iter().map(Option::is_some).collect();
        assert_eq!(got, [true, true, false], "the first two get the ready instance, in order");
    }

    #[test]
    fn the_queue_is_bounded_and_clients_that_left_are_counted_out() {
        let (svc, _actions) = service(Scaling { max: 1, queue: 2, ..Scaling::default() });
        let a = svc.acquire(None);
        let _b = svc.acquire(None);
        assert!(matches!(svc.acquire(None), Acquired::Refused(Refusal::QueueFull(2))));
        drop(a);
        assert_eq!(svc.snapshot().queued, 1);
        assert!(matches!(svc.acquire(None), Acquired::Held(_)), "the place of the client that left is free");
    }

    #[test]
    fn a_failed_start_answers_the_held_requests_with_the_reason() {
        let (svc, mut actions) = service(Scaling::default());
        let Acquired::Held(mut rx) = svc.acquire(None) else { panic!() };
        let Ok(Action::Start { slot, .. }) = actions.try_recv() else { panic!("a start") };
        svc.on_start_failed(slot, "exited with code 3");
        assert_eq!(rx.try_recv().unwrap().unwrap_err(), Refusal::StartFailed("exited with code 3".into()));
        assert_eq!(svc.snapshot().status, "failed");
    }

    #[test]
    fn idle_instances_freeze_then_stop_and_a_request_thaws_a_frozen_one() {
        let (svc, mut actions) = service(Scaling { freeze_after_ms: 100, stop_after_ms: 1000, ..Scaling::default() });
        svc.adopt("c1", 1, addr(), false, "t".into());
        let lease = match svc.acquire(None) {
            Acquired::Now(l) => l,
            _ => panic!("a ready instance serves at once"),
        };
        let t0 = Instant::now();
        svc.tick(t0 + Duration::from_millis(500));
        assert!(actions.try_recv().is_err(), "nothing freezes under a live request");
        drop(lease);
        svc.tick(Instant::now() + Duration::from_millis(150));
        let Ok(Action::Freeze { slot, .. }) = actions.try_recv() else { panic!("idle: freeze") };
        svc.on_frozen(slot, true);
        let Acquired::Held(mut rx) = svc.acquire(None) else { panic!("frozen: held") };
        let Ok(Action::Thaw { slot: s2, .. }) = actions.try_recv() else { panic!("a thaw, not a start") };
        assert_eq!(s2, slot);
        assert!(actions.try_recv().is_err(), "no new instance while one thaws");
        svc.on_thawed(slot);
        let lease = rx.try_recv().unwrap().unwrap();
        drop(lease);
        svc.tick(Instant::now() + Duration::from_millis(150));
        let Ok(Action::Freeze { .. }) = actions.try_recv() else { panic!() };
        svc.on_frozen(slot, true);
        svc.tick(Instant::now() + Duration::from_millis(1500));
        assert!(matches!(actions.try_recv(), Ok(Action::Stop { .. })), "frozen long enough: stop");
    }

    #[test]
    fn crashing_min_instances_restart_with_a_doubling_backoff_and_show_a_crash_loop() {
        let (svc, mut actions) = service(Scaling { min: 1, ..Scaling::default() });
        let mut waits = Vec::new();
        for _ in 0..4 {
            // Find when the next restart comes, in 50 ms steps.
            let mut slot = None;
            for step in 0..100u64 {
                svc.tick(Instant::now() + Duration::from_millis(step * 50));
                if let Ok(Action::Start { slot: s, .. }) = actions.try_recv() {
                    waits.push(step * 50);
                    slot = Some(s);
                    break;
                }
            }
            let slot = slot.expect("a restart");
            svc.on_ready(slot, "c", addr());
            svc.on_dead(slot, "exited with code 1");
        }
        assert_eq!(waits[0], 0, "the first start is at once");
        assert!(waits[1] >= 100 && waits[2] >= 200 && waits[3] >= 400, "doubling backoff: {waits:?}");
        let snap = svc.snapshot();
        assert_eq!((snap.status, snap.crashes), ("crash-loop", 4));
        assert!(snap.last_error.unwrap().contains("exited with code 1"));
        assert_eq!(crash_backoff(1), Duration::from_millis(100));
        assert_eq!(crash_backoff(30), Duration::from_secs(30));
    }

    #[test]
    fn going_to_zero_asks_for_a_prepared_container_and_delete_discards_it() {
        let (svc, mut actions) = service(Scaling::default());
        svc.adopt("c1", 1, addr(), true, "t".into());
        svc.on_stopped(1);
        assert!(matches!(actions.try_recv(), Ok(Action::Prepare { .. })), "at zero: prepare one");
        svc.delete();
        assert!(matches!(actions.try_recv(), Ok(Action::Discard { service: 1, .. })));
    }

    #[test]
    fn a_new_revision_takes_new_requests_and_the_old_one_drains() {
        let (svc, mut actions) = service(Scaling::default());
        svc.adopt("old", 1, addr(), false, "t".into());
        let Acquired::Now(old_lease) = svc.acquire(None) else { panic!() };
        svc.adopt("new", 2, "10.0.0.3:8080".parse().unwrap(), false, "t".into());
        svc.switch(rev(2));
        assert!(
            matches!(actions.try_recv(), Ok(Action::Discard { service: 1, .. })),
            "a new revision makes a prepared container of the old one useless"
        );
        let Acquired::Now(new_lease) = svc.acquire(None) else { panic!() };
        assert_eq!(new_lease.addr.to_string(), "10.0.0.3:8080");
        svc.tick(Instant::now());
        assert!(actions.try_recv().is_err(), "the old instance still serves a request");
        drop(old_lease);
        svc.tick(Instant::now());
        let Ok(Action::Stop { container, .. }) = actions.try_recv() else { panic!("drained: stop") };
        assert_eq!(container.as_deref(), Some("old"));
    }

    #[test]
    fn an_old_revision_drains_for_at_most_the_request_timeout() {
        let (svc, mut actions) = service(Scaling { request_timeout_ms: 1000, ..Scaling::default() });
        svc.adopt("old", 1, addr(), false, "t".into());
        let Acquired::Now(_stuck) = svc.acquire(None) else { panic!() };
        svc.adopt("new", 2, "10.0.0.3:8080".parse().unwrap(), false, "t".into());
        svc.switch(rev(2));
        let _ = actions.try_recv(); // the Discard
        svc.tick(Instant::now() + Duration::from_millis(500));
        assert!(actions.try_recv().is_err(), "within the grace the busy old instance stays");
        svc.tick(Instant::now() + Duration::from_millis(1500));
        let Ok(Action::Stop { container, .. }) = actions.try_recv() else { panic!("grace over: stop") };
        assert_eq!(container.as_deref(), Some("old"));
    }

    #[test]
    fn a_90_10_split_sends_one_request_in_ten_to_the_second_revision_and_a_tag_reaches_it_alone() {
        let (svc, mut actions) = service(Scaling::default());
        svc.adopt("one", 1, addr(), false, "t".into());
        svc.adopt("two", 2, "10.0.0.3:8080".parse().unwrap(), false, "t".into());
        svc.set_traffic(vec![(rev(1), 90), (rev(2), 10)]);
        svc.set_tag("canary", Some(rev(2)));
        let mut counts = [0usize; 3];
        let mut second_at = Vec::new();
        for n in 0..1000 {
            let Acquired::Now(lease) = svc.acquire(None) else { panic!("both revisions run") };
            counts[lease.revision as usize] += 1;
            if lease.revision == 2 {
                second_at.push(n);
            }
        }
        assert_eq!((counts[1], counts[2]), (900, 100));
        assert!(second_at.windows(2).all(|w| w[1] - w[0] == 10), "evenly spread, not in a block");
        for _ in 0..50 {
            let Acquired::Now(lease) = svc.acquire(Some("canary")) else { panic!() };
            assert_eq!(lease.revision, 2);
        }
        assert!(matches!(svc.acquire(Some("nope")), Acquired::Refused(Refusal::NotDeployed)));
        // A revision with no share and no tag drains.
        svc.set_tag("canary", None);
        svc.set_traffic(vec![(rev(1), 100)]);
        svc.tick(Instant::now());
        let mut stops = Vec::new();
        while let Ok(a) = actions.try_recv() {
            if let Action::Stop { container, .. } = a {
                stops.push(container.unwrap());
            }
        }
        assert_eq!(stops, ["two"]);
    }

    /// Drains the actions: (starts, stops) and marks the started instances ready.
    fn settle(svc: &Arc<Service>, actions: &mut mpsc::UnboundedReceiver<Action>, next_ip: &mut u8) -> (usize, usize) {
        let (mut starts, mut stops) = (0, 0);
        while let Ok(a) = actions.try_recv() {
            match a {
                Action::Start { slot, .. } => {
                    starts += 1;
                    *next_ip += 1;
                    svc.on_ready(slot, &format!("c{next_ip}"), format!("10.0.1.{next_ip}:8080").parse().unwrap());
                }
                Action::Stop { slot, .. } => {
                    stops += 1;
                    svc.on_stopped(slot);
                }
                _ => {}
            }
        }
        (starts, stops)
    }

    fn up(svc: &Service) -> usize {
        svc.snapshot().instances.iter().filter(|i| i.state == InstanceState::Ready).count()
    }

    #[test]
    fn three_times_the_target_runs_three_instances_and_the_calm_returns_to_min_on_paused_time() {
        let sc = Scaling { min: 1, concurrency: 10, target: 2, stable_window_ms: 10_000, ..Scaling::default() };
        let (svc, mut actions) = service(sc);
        let mut ip = 0;
        let t0 = Instant::now();
        svc.tick(t0);
        assert_eq!(settle(&svc, &mut actions, &mut ip), (1, 0), "min 1: one instance");
        // Six requests in flight, 3x the target of 2 (each instance could hold 10).
        let mut leases: Vec<Lease> = (0..6)
            .map(|_| match svc.acquire(None) {
                Acquired::Now(l) => l,
                _ => panic!("room on the min instance"),
            })
            .collect();
        let mut t = t0;
        let mut most = 0;
        for _ in 0..50 {
            t += Duration::from_millis(100);
            svc.tick(t);
            settle(&svc, &mut actions, &mut ip);
            most = most.max(up(&svc));
            // Keep the load where it is, spread by least-loaded routing.
            let l = leases.remove(0);
            drop(l);
            leases.push(match svc.acquire(None) {
                Acquired::Now(l) => l,
                _ => panic!("room"),
            });
        }
        assert_eq!((up(&svc), most), (3, 3), "3x the target: 3 instances, never more");
        let per: Vec<u32> = svc.snapshot().instances.iter().map(|i| i.in_flight).collect();
        assert_eq!(per, [2, 2, 2], "requests go to the least-loaded instance");
        drop(leases);
        // Calm: within the stable window nothing is stopped (no flapping)...
        for _ in 0..20 {
            t += Duration::from_millis(100);
            svc.tick(t);
            settle(&svc, &mut actions, &mut ip);
        }
        assert_eq!(up(&svc), 3, "two seconds of calm do not scale in yet");
        // ...after it, back to min.
        for _ in 0..120 {
            t += Duration::from_millis(100);
            svc.tick(t);
            settle(&svc, &mut actions, &mut ip);
        }
        assert_eq!(up(&svc), 1, "back to min after the stable window");
        assert!(svc.snapshot().panicking.is_empty());
    }
}
