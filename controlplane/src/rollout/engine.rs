//! The rollout engine: the shell around the pure state machine
//! ([`super::machine`]). It turns the world into events (a timer that
//! gathers evidence and asks the [`judge`](super::judge), operators' verbs,
//! the data plane's rejections, changes found in the desired state),
//! persists each decision in the [`RolloutStore`], and carries out its
//! effects through the [`TrafficRouter`].
//!
//! # One writer, and readers that never wait on I/O
//! Every decision (timer, verb, create, finalize) is made and carried out
//! under `writer`, one at a time. What readers (the API's GETs) see is a
//! separate map, replaced only after a decision is persisted; readers take
//! its lock for a clone and never wait on a disk or a router. A verb is a
//! decision too, so it waits its turn behind the writer (the API runs it on
//! a blocking thread, never on the async runtime's workers).
//!
//! # One home for the weight
//! The service's canary weight lives in the desired state behind the
//! router. A rollout's `weight` is what it holds the service at; every
//! evaluation compares it with [`TrafficRouter::weight`] and, if they
//! differ (a write that bypassed the API's 409, or a state file edited
//! while the control plane was down), records what it found in the audit
//! and puts its own weight back. A rollback always writes weight 0 to the
//! router, whatever either copy says.
//!
//! # Order of writes, and recovery
//! A decision is written in this order: the rollout record with its audit
//! entries (`applied: false` when it moves traffic) in one database
//! transaction; then its effects through the router (the state file, then
//! the published snapshot); then `applied: true`. A kill between any two
//! leaves either the old record (nothing was decided) or a record with
//! `applied: false`, which [`Engine::new`] applies again: a decided
//! rollback is never lost, and the state file always ends up following the
//! record. A shadow stage is re-baselined at start (the shadow counts
//! restart at zero; what was seen is carried over).
//!
//! # Replicas
//! With replicas ([`Engine::standby`] and [`Engine::lead_with`]) only the
//! replica holding the lease decides. The others keep what they show in
//! step with the database ([`Engine::reload`]) and refuse verbs
//! ([`EngineError::NotLeader`], naming the leader). A replica that takes
//! the lease reads every rollout back from the database and recovers them
//! as a restart does ([`Engine::take_over`]): each resumes in the same step
//! with the same step start, because both are in the stored record.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{error, info, warn};

use super::events::{self, Notifier};
use super::judge;
use super::machine::{
    self, Decision, Effect, Event, FlagState, NotApplicable, flag_header, flag_state,
};
pub use super::machine::{
    Action, AuditEntry, ENGINE, FinalizeState, Mark, OUTSIDE, Phase, Rollout, ShadowBaseline,
};
use super::spec::{CanaryAfterFinalize, RolloutSpec, SpecError};
use super::store::{RolloutStore, RolloutStoreError};
use crate::evidence::envoy_stats::MetricsBook;
use crate::evidence::probes::{ProbeTally, Prober};
use crate::evidence::prometheus::PrometheusEvidence;
use crate::evidence::shadow::ShadowBook;
use crate::evidence::{EnvoyEvidence, EvidenceSource, PairCounts, ShadowEvidence, StepWindows};
use crate::store::Store;
use crate::traffic::{RouterError, ShadowTarget, TrafficRouter};
use crate::xds::Registry;
use crate::xds::router::AdsRouter;
use understudy_core::segment::SegmentTally;

/// Evidence for a step starts this long after the step: Envoy's stats flush
/// interval (`envoy/bootstrap.yaml`).
pub const FLUSH_SETTLE_MS: u64 = 1_000;

/// A source with nothing: a spec that asks for a source this control
/// plane lacks is judged on no data (it holds).
struct NoEvidence;

impl EvidenceSource for NoEvidence {
    fn step_windows(&self, _: &str, _: u64, _: u64) -> StepWindows {
        StepWindows::default()
    }
    fn shadow_pairs(&self, _: &str) -> Option<ShadowEvidence> {
        None
    }
    fn counts_since(
        &self,
        _: &str,
        starts: &[u64],
        _: u64,
    ) -> Vec<(crate::evidence::Counts, crate::evidence::Counts)> {
        vec![Default::default(); starts.len()]
    }
}

/// Looks on fresh evidence are at least this far apart (the spec's
/// smallest `interval_s`): with many Envoys flushing at their own phases,
/// a rollout is judged at most five times a second.
pub const MIN_LOOK_GAP_MS: u64 = 200;

/// Changes remembered per rollout as "made by it" (newest kept): only a
/// rejection of one of these halts it.
pub const MAX_PUSHED_VERSIONS: usize = 64;

/// A test hook run at the start of each evaluation (see `Engine::fault`).
pub type Fault = Arc<dyn Fn(&str) + Send + Sync>;

/// How the engine's own loop is doing: `GET /readyz` and every rollout view
/// show it, so a panic or a failed write is never silent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EngineHealth {
    /// Evaluations that panicked; each was caught, logged and the loop went on.
    pub panics: u64,
    pub last_panic: Option<String>,
    /// Transitions whose effects could not be saved to the state file (they
    /// were applied in memory when they take traffic off the canary).
    pub persistence_failures: u64,
    pub last_persistence_error: Option<String>,
}

/// A rollout as `GET /v1/rollouts/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub stage: String,
    pub weights: Weights,
    pub audit: Vec<AuditEntry>,
    /// Why `audit` is empty although the rollout has one: its database
    /// could not be read (replicas: PostgreSQL is away). The rest of the
    /// view is this replica's copy, so it still answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_unavailable: Option<String>,
    /// The engine's panics and persistence failures (all rollouts).
    pub engine: EngineHealth,
}

/// `GET /v1/rollouts/{id}/probes`: a rollout's synthetic probes.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    /// The spec declares probes.
    pub declared: bool,
    /// They are being sent now (active, not paused, a runner configured).
    pub running: bool,
    /// The runner's scheduler looks so far (all services).
    pub ticks: u64,
    /// The results below are from this time on (the current phase's start).
    pub since_ms: u64,
    pub results: ProbeTally,
}

#[derive(Debug, Clone, Serialize)]
pub struct Weights {
    pub stable: u32,
    pub canary: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("rollout {0:?} does not exist")]
    Unknown(String),
    /// The spec names a service the control plane does not have.
    #[error("service: no service named {0:?}")]
    UnknownService(String),
    #[error("service {service:?} already has an active rollout ({id})")]
    Busy { service: String, id: String },
    #[error("flags[{index}].key: {key:?} belongs to active rollout {id}")]
    FlagTaken {
        index: usize,
        key: String,
        id: String,
    },
    #[error(transparent)]
    Conflict(#[from] NotApplicable),
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error(transparent)]
    Store(#[from] RolloutStoreError),
    /// Replicas: another replica runs rollouts; ask it.
    #[error("this replica does not lead; rollouts are run by {leader}")]
    NotLeader { leader: String },
}

/// A flag as the OFREP endpoints read it: its state and the rollout it
/// comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlagView {
    pub rollout: String,
    pub service: String,
    pub phase: &'static str,
    pub state: FlagState,
}

impl FlagView {
    fn of(r: &Rollout) -> Self {
        Self {
            rollout: r.id.clone(),
            service: r.spec.service.clone(),
            phase: r.phase.state(),
            state: flag_state(r),
        }
    }
}

/// The newest rollout of `id`'s service created after it, if any.
fn newer_rollout(rollouts: &BTreeMap<String, Rollout>, id: &str) -> Option<String> {
    let this = rollouts.get(id)?;
    rollouts
        .values()
        .filter(|r| r.spec.service == this.spec.service && r.created_ms > this.created_ms)
        .max_by_key(|r| r.created_ms)
        .map(|r| r.id.clone())
}

/// Today's wiring: Envoy's stats stream and the filter's reports for
/// evidence, our ADS for traffic (see [`Engine::new`]).
#[derive(Clone)]
pub struct Sources {
    pub metrics: Arc<MetricsBook>,
    pub shadow: Arc<ShadowBook>,
    pub registry: Arc<Registry>,
}

pub struct Engine {
    router: Arc<dyn TrafficRouter>,
    evidence: Arc<dyn EvidenceSource>,
    db: RolloutStore,
    /// What readers see: replaced only after a decision is persisted.
    rollouts: RwLock<BTreeMap<String, Rollout>>,
    /// One decision at a time; held across persistence and routing.
    /// Readers never take it.
    writer: Mutex<()>,
    panics: AtomicU64,
    health: Mutex<EngineHealth>,
    /// Where a committed decision's events go (webhooks); none: nowhere.
    notifier: OnceLock<Arc<dyn Notifier>>,
    /// The source for rollouts whose spec reads Prometheus.
    prometheus: OnceLock<Arc<PrometheusEvidence>>,
    /// The synthetic probe runner; none: rollouts with probes are refused.
    prober: OnceLock<Arc<dyn Prober>>,
    /// Test hook: called with a rollout id at the start of its evaluation.
    #[doc(hidden)]
    pub fault: Mutex<Option<Fault>>,
    /// Replicas: the lease this replica leads under, if any ([`Engine::lead_with`]).
    leader: OnceLock<Leader>,
    /// The term this engine last took over under (0: not leading).
    leading: AtomicI64,
}

/// How an engine of a replica learns whether it leads, and who does.
#[derive(Clone)]
pub struct Leader {
    /// This replica's name.
    pub me: String,
    /// The term this replica leads under now.
    pub term: crate::pg::Fence,
    /// Who leads, for a refused verb (`holder (api address)`).
    pub who: Arc<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// The engine over Envoy: evidence from its stats stream and the
    /// filter's reports, traffic through our ADS. Every stored rollout
    /// resumes where it was (see the module docs on recovery).
    pub fn new(store: Store, db: RolloutStore, sources: Sources) -> Result<Self, EngineError> {
        // Reports are judged against the config this control plane pushed.
        sources.shadow.follow(store.clone());
        Self::with_ports(
            Arc::new(AdsRouter::new(store, sources.registry)),
            Arc::new(EnvoyEvidence::new(sources.metrics, sources.shadow)),
            db,
        )
    }

    /// The engine over any router and evidence source.
    pub fn with_ports(
        router: Arc<dyn TrafficRouter>,
        evidence: Arc<dyn EvidenceSource>,
        db: RolloutStore,
    ) -> Result<Self, EngineError> {
        let engine = Self::standby(router, evidence, db)?;
        engine.recover(crate::time::now_unix_ms())?;
        Ok(engine)
    }

    /// [`Engine::with_ports`] for a replica: loads the stored rollouts for
    /// reading but decides nothing until [`Engine::lead_with`]'s lease is
    /// held ([`Engine::take_over`] then recovers them).
    pub fn standby(
        router: Arc<dyn TrafficRouter>,
        evidence: Arc<dyn EvidenceSource>,
        db: RolloutStore,
    ) -> Result<Self, EngineError> {
        let loaded: Vec<Rollout> = db.load_all()?;
        let rollouts = loaded.into_iter().map(|r| (r.id.clone(), r)).collect();
        Ok(Self {
            router,
            evidence,
            db,
            rollouts: RwLock::new(rollouts),
            writer: Mutex::new(()),
            panics: AtomicU64::new(0),
            health: Mutex::default(),
            notifier: OnceLock::new(),
            prometheus: OnceLock::new(),
            prober: OnceLock::new(),
            fault: Mutex::new(None),
            leader: OnceLock::new(),
            leading: AtomicI64::new(0),
        })
    }

    /// Replicas: decide only while `leader` says this replica leads.
    pub fn lead_with(&self, leader: Leader) -> Result<(), Leader> {
        self.leader.set(leader)
    }

    /// Whether this engine decides now: always without replicas; with them,
    /// once it has taken over under the current term.
    pub fn leads(&self) -> bool {
        match self.leader.get() {
            None => true,
            Some(l) => (l.term)().is_some_and(|t| t.term == self.leading.load(Ordering::Acquire)),
        }
    }

    /// Replicas: this replica's name and whether it decides now.
    pub fn replica(&self) -> Option<(String, bool)> {
        self.leader.get().map(|l| (l.me.clone(), self.leads()))
    }

    /// A verb's check: `NotLeader` on a follower.
    fn must_lead(&self) -> Result<(), EngineError> {
        match self.leader.get() {
            Some(l) if !self.leads() => Err(EngineError::NotLeader { leader: (l.who)() }),
            _ => Ok(()),
        }
    }

    /// Replicas: this replica just took the lease under `term`. Reads every
    /// rollout back from the database (what the last leader committed) and
    /// recovers them as a restart does; decisions start only after.
    pub fn take_over(&self, term: i64, t: u64) -> Result<(), EngineError> {
        {
            let _writer = self.write_lock();
            self.reload_locked()?;
        }
        self.recover(t)?;
        self.leading.store(term, Ordering::Release);
        info!(
            term,
            "this replica leads: rollouts resumed from the database"
        );
        Ok(())
    }

    /// Replicas: a follower's view, read again from the database (another
    /// replica committed a change). A leader ignores it: it wrote them.
    pub fn reload(&self) -> Result<(), EngineError> {
        if self.leader.get().is_none() || self.leads() {
            return Ok(());
        }
        let _writer = self.write_lock();
        self.reload_locked()
    }

    fn reload_locked(&self) -> Result<(), EngineError> {
        let loaded: Vec<Rollout> = self.db.load_all()?;
        *self.rollouts.write().unwrap_or_else(|p| p.into_inner()) =
            loaded.into_iter().map(|r| (r.id.clone(), r)).collect();
        Ok(())
    }

    /// Replicas, once per engine period: takes over when this replica has
    /// just been granted the lease, steps back when it has lost it. Whether
    /// to evaluate now.
    fn follow_lease(&self, t: u64) -> bool {
        let Some(l) = self.leader.get() else {
            return true;
        };
        match (l.term)() {
            None => {
                if self.leading.swap(0, Ordering::AcqRel) != 0 {
                    warn!("this replica no longer leads: rollouts are left to the next leader");
                }
                false
            }
            Some(term) if term.term == self.leading.load(Ordering::Acquire) => true,
            Some(term) => match self.take_over(term.term, t) {
                Ok(()) => true,
                Err(e) => {
                    warn!(term = term.term, error = %e, "could not take over the rollouts; trying again");
                    false
                }
            },
        }
    }

    /// Applies decided-but-unapplied transitions, re-baselines shadow
    /// stages, and records (and undoes) changes made outside a rollout
    /// while the control plane was down.
    fn recover(&self, t: u64) -> Result<(), EngineError> {
        let _writer = self.write_lock();
        // Collected first: a read guard in the loop head would live through
        // the loop and deadlock `publish`.
        let stored: Vec<Rollout> = self.read().values().cloned().collect();
        for r in stored {
            let mut r = r;
            if !r.applied {
                warn!(rollout = %r.id, phase = %r.phase.label(), weight = r.weight, "applying a transition that was decided but not applied before the restart");
                let d = machine::decide(&r, Event::Restarted, t)?;
                match self.commit(&r, d, t, false) {
                    Ok(next) => r = next,
                    // A rollback that still cannot be applied stays
                    // `applied: false` for the next start; anything else
                    // stops the start.
                    Err(e) if machine::is_rollback(&r.phase) => {
                        self.persistence_failed(&r.id, &e);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if r.phase == Phase::Shadow {
                let mut next = r.clone();
                next.shadow_carried = next.shadow_seen.clone();
                next.shadow_baseline = self.shadow_counts(&next).0;
                self.db.save::<_, AuditEntry>(&next.id, &next, &[])?;
                self.publish(next.clone());
                r = next;
            }
            if let Some(found) = self.found(&r) {
                let d = machine::decide(&r, found, t)?;
                self.commit(&r, d, t, false)?;
            }
        }
        Ok(())
    }

    /// The engine's panics and persistence failures so far.
    pub fn health(&self) -> EngineHealth {
        let mut h = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        h.panics = self.panics.load(Ordering::Relaxed);
        h
    }

    fn persistence_failed(&self, id: &str, e: &EngineError) {
        error!(rollout = %id, error = %e, "rollout transition could not be persisted");
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.persistence_failures = h.persistence_failures.saturating_add(1);
        h.last_persistence_error = Some(format!("rollout {id}: {e}"));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Rollout>> {
        self.rollouts.read().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, r: Rollout) {
        let service = r.spec.service.clone();
        self.rollouts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.id.clone(), r);
        self.sync_probes(&service);
    }

    /// Tells the probe runner what `service`'s probes are now, derived from
    /// the published rollouts: its active rollout's checks unless it is
    /// paused, else none. Called after every published decision, so a pause,
    /// a resume, a rollback or an end stops or starts them at once.
    fn sync_probes(&self, service: &str) {
        let Some(prober) = self.prober.get() else {
            return;
        };
        let plan = self
            .owner(service)
            .filter(|r| !r.paused)
            .and_then(|r| r.spec.probes)
            .map(|p| p.checks);
        prober.set_plan(service, plan);
    }

    /// Runs rollouts' synthetic probes through `prober` (once; a second
    /// call is refused with the prober given back). Rollouts already
    /// running resume their probes.
    pub fn probe_with(&self, prober: Arc<dyn Prober>) -> Result<(), Arc<dyn Prober>> {
        self.prober.set(prober)?;
        let services: Vec<String> = self
            .read()
            .values()
            .filter(|r| r.phase.is_active())
            .map(|r| r.spec.service.clone())
            .collect();
        for service in services {
            self.sync_probes(&service);
        }
        Ok(())
    }

    /// Rollout `id`'s probes: whether they run, their results in the
    /// current phase, and the runner's scheduler ticks.
    pub fn probe_status(&self, id: &str) -> Result<ProbeStatus, EngineError> {
        let r = self
            .get(id)
            .ok_or_else(|| EngineError::Unknown(id.to_owned()))?;
        let prober = self.prober.get();
        Ok(ProbeStatus {
            declared: r.spec.probes.is_some(),
            running: r.spec.probes.is_some()
                && r.phase.is_active()
                && !r.paused
                && prober.is_some(),
            ticks: prober.map_or(0, |p| p.ticks()),
            since_ms: r.phase_started_ms,
            results: self.probe_tally(&r),
        })
    }

    /// The probe results in `r`'s current phase (empty without a runner).
    fn probe_tally(&self, r: &Rollout) -> ProbeTally {
        self.prober.get().map_or_else(ProbeTally::default, |p| {
            p.tally(&r.spec.service, r.phase_started_ms)
        })
    }

    fn get(&self, id: &str) -> Option<Rollout> {
        self.read().get(id).cloned()
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The router every traffic change goes through (the API's manual
    /// weight too): the Store in ADS mode, the VirtualService in Istio mode.
    pub fn router(&self) -> Arc<dyn TrafficRouter> {
        Arc::clone(&self.router)
    }

    /// The active rollout that owns `service`'s traffic, if any: while it
    /// runs, the weight and the shadow stage's route are its to change.
    pub fn owner(&self, service: &str) -> Option<Rollout> {
        self.read()
            .values()
            .find(|r| r.spec.service == service && r.phase.is_active())
            .cloned()
    }

    /// The active rollout whose shadow stage owns filter route `route`.
    pub fn shadow_owner(&self, route: &str) -> Option<Rollout> {
        self.read()
            .values()
            .find(|r| {
                r.phase.is_active() && r.spec.shadow.as_ref().is_some_and(|s| s.route == route)
            })
            .cloned()
    }

    /// Validates and starts a rollout.
    pub fn create(&self, text: &str, actor: &str, now: SystemTime) -> Result<Rollout, EngineError> {
        let spec = RolloutSpec::from_yaml_or_json(text)?;
        self.must_lead()?;
        match self.router.check_service(&spec.service) {
            Ok(()) => {}
            Err(RouterError::UnknownService(s)) => return Err(EngineError::UnknownService(s)),
            Err(e) => {
                return Err(EngineError::Invalid {
                    field: "service",
                    reason: e.to_string(),
                });
            }
        }
        if spec.steps.iter().any(|s| s.cohort.is_some())
            && !matches!(self.router.cohorts(&spec.service), Ok(Some(_)))
        {
            return Err(EngineError::Invalid {
                field: "steps",
                reason: "this control plane's traffic router cannot send a cohort to the canary \
                         (Istio mode: not yet); use weights"
                    .to_owned(),
            });
        }
        if spec.probes.is_some() {
            let why = if !self.router.probe_pins() {
                Some(
                    "this control plane's traffic router cannot pin a probe to one backend (Istio mode: not yet)",
                )
            } else if self.prober.get().is_none() {
                Some(
                    "this control plane sends no probes: start it with --probe-via (the Envoy listener's address)",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(EngineError::Invalid {
                    field: "probes",
                    reason: why.to_owned(),
                });
            }
        }
        if let Some(stage) = &spec.shadow
            && let Err(e) = self.router.shadow(&stage.route)
        {
            return Err(EngineError::Invalid {
                field: "shadow.route",
                reason: e.to_string(),
            });
        }
        let _writer = self.write_lock();
        let n = {
            let rollouts = self.read();
            // A flag answers for one active rollout at a time.
            for (i, f) in spec.flags.iter().enumerate() {
                if let Some(other) = rollouts.values().find(|r| {
                    r.phase.is_active()
                        && r.spec.service != spec.service
                        && r.spec.flags.iter().any(|o| o.key == f.key)
                }) {
                    return Err(EngineError::FlagTaken {
                        index: i,
                        key: f.key.clone(),
                        id: other.id.clone(),
                    });
                }
            }
            if let Some(active) = rollouts
                .values()
                .find(|r| r.spec.service == spec.service && r.phase.is_active())
            {
                return Err(EngineError::Busy {
                    service: spec.service.clone(),
                    id: active.id.clone(),
                });
            }
            rollouts
                .values()
                .filter(|r| r.spec.service == spec.service)
                .count()
        };
        let t = crate::time::unix_ms(now);
        let id = format!("{}-{}", spec.service, n + 1);
        let weight = self.router.weight(&spec.service)?;
        let d = machine::start(id, spec, actor, weight, t);
        let before = Rollout {
            phase: Phase::Shadow,
            weight,
            marks: Vec::new(),
            applied: true,
            ..d.rollout.clone()
        };
        self.commit(&before, d, t, true)
    }

    /// Persists decision `d` (taken on `before`) and carries out its
    /// effects, in the order the module docs give. `creating`: `before`
    /// was never stored.
    ///
    /// A failed record write changes nothing, except that a rollback is
    /// applied anyway (traffic leaves the canary first). A failed apply of
    /// a rollback is logged at error and counted in [`EngineHealth`]; its
    /// record stays `applied: false`, so a restart applies it again. A
    /// failed apply of anything else is undone in the record, with an audit
    /// entry saying why (a rollout whose start failed is aborted).
    fn commit(
        &self,
        before: &Rollout,
        d: Decision,
        t: u64,
        creating: bool,
    ) -> Result<Rollout, EngineError> {
        let rollback = d.is_rollback();
        let moves = d.moves_traffic();
        let audit = d.audit();
        let mut next = d.rollout;
        for entry in &audit {
            info!(rollout = %next.id, from = %entry.from, to = %entry.to, actor = %entry.actor, reason = %entry.reason, "rollout transition");
        }
        if moves {
            next.applied = false;
        }
        if next == *before && audit.is_empty() && !moves {
            return Ok(next);
        }
        if let Err(e) = self.db.save(&next.id, &next, &audit) {
            let fenced = matches!(e, RolloutStoreError::Shared(crate::pg::PgError::Fenced(_)));
            let e = EngineError::from(e);
            // A replica whose lease has passed acts on nothing: the next
            // leader decides again from the stored record.
            if rollback && !fenced {
                // The database is failing; traffic still leaves the canary.
                if let Err(apply) = self.apply(&mut next, &d.effects, true) {
                    self.persistence_failed(&next.id, &apply);
                }
                self.publish(next);
            }
            self.persistence_failed(&before.id, &e);
            return Err(e);
        }
        if moves {
            if let Err(e) = self.apply(&mut next, &d.effects, rollback) {
                self.persistence_failed(&next.id, &e);
                if rollback {
                    self.publish(next);
                    return Err(e);
                }
                let from = audit
                    .first()
                    .map_or_else(|| next.phase.label(), |a| a.to.clone());
                let to = audit
                    .first()
                    .map_or_else(|| before.phase.label(), |a| a.from.clone());
                let undo = AuditEntry {
                    time_ms: t,
                    from,
                    to,
                    actor: ENGINE.to_owned(),
                    reason: format!("not applied: {e}"),
                    snapshot: serde_json::Value::Null,
                };
                let mut undone = before.clone();
                if creating {
                    // A rollout whose start could not be applied never ran;
                    // its stored record must not resume as active.
                    undone.phase = Phase::Aborted {
                        reason: undo.reason.clone(),
                    };
                }
                self.db.save(&undone.id, &undone, &[undo])?;
                self.publish(undone);
                return Err(e);
            }
            if d.effects.contains(&Effect::SetShadow(true)) {
                next.shadow_baseline = self.shadow_counts(&next).0;
                next.shadow_carried = ShadowBaseline::default();
                next.shadow_seen = ShadowBaseline::default();
            }
            next.applied = true;
            self.db.save::<_, AuditEntry>(&next.id, &next, &[])?;
        }
        self.publish(next.clone());
        if let Some(notifier) = self.notifier.get() {
            let was = (!creating).then_some(before);
            for event in events::addressed(was, &next, &audit, t) {
                notifier.notify(event);
            }
        }
        Ok(next)
    }

    /// Reads rollouts whose spec says `evidence: {source: prometheus}`
    /// through `source` (once; a second call is refused).
    pub fn read_prometheus_with(
        &self,
        source: Arc<PrometheusEvidence>,
    ) -> Result<(), Arc<PrometheusEvidence>> {
        self.prometheus.set(source)
    }

    /// Sends every later decision's events to `notifier` (once; a second
    /// call is refused with the notifier given back).
    pub fn notify_with(&self, notifier: Arc<dyn Notifier>) -> Result<(), Arc<dyn Notifier>> {
        self.notifier.set(notifier)
    }

    /// Appends `entry` to rollout `id`'s audit log (a webhook's delivery,
    /// by the notifier), leaving its record alone.
    pub fn record_audit(&self, id: &str, entry: &AuditEntry) -> Result<(), EngineError> {
        self.db.append_audit(id, std::slice::from_ref(entry))?;
        Ok(())
    }

    /// Carries out the traffic effects through the router. `forced`
    /// (rollbacks): every effect is tried and published even if it cannot
    /// be saved; the first error is returned. Otherwise the first error
    /// stops. Records the changes made, for rejections.
    fn apply(&self, r: &mut Rollout, effects: &[Effect], forced: bool) -> Result<(), EngineError> {
        let mut first_error = None;
        for effect in effects {
            let result = match effect {
                Effect::SetWeight(w) => {
                    let cohorts = machine::cohorts(r);
                    let flags = flag_header(r);
                    self.router
                        .set_split(&r.spec.service, *w, &cohorts, &flags, forced)
                }
                Effect::SetShadow(on) => match &r.spec.shadow {
                    Some(stage) => {
                        let target = on.then(|| ShadowTarget {
                            cluster: self.router.canary_cluster(&r.spec.service),
                            percent: stage.percent,
                        });
                        self.router.set_shadow(&stage.route, target, forced)
                    }
                    None => Ok(Vec::new()),
                },
                Effect::Audit(_) => Ok(Vec::new()),
            };
            match result {
                Ok(pushed) => {
                    for p in pushed {
                        if !r.pushed.contains(&p) {
                            r.pushed.push(p);
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(EngineError::from(e));
                    if !forced {
                        break;
                    }
                }
            }
        }
        let over = r.pushed.len().saturating_sub(MAX_PUSHED_VERSIONS);
        r.pushed.drain(..over);
        first_error.map_or(Ok(()), Err)
    }

    /// What the desired state holds for the rollout's traffic, as an event
    /// for the machine (which alone decides whether it differs); `None`
    /// while the rollout's own decision is not applied yet.
    fn found(&self, r: &Rollout) -> Option<Event> {
        if !r.phase.is_active() || !r.applied {
            return None;
        }
        let weight = self.router.weight(&r.spec.service).ok()?;
        let shadow = r
            .spec
            .shadow
            .as_ref()
            .and_then(|s| self.router.shadow(&s.route).ok())
            .map(|t| t.is_some());
        let cohorts = self.router.cohorts(&r.spec.service).ok()?;
        let flags = self.router.flags(&r.spec.service).ok()?;
        Some(Event::Found {
            weight,
            shadow,
            cohorts,
            flags,
        })
    }

    /// The shadow route's live counts now, and when it last reported.
    fn shadow_counts(&self, r: &Rollout) -> (ShadowBaseline, Option<u64>) {
        let Some(stage) = &r.spec.shadow else {
            return (ShadowBaseline::default(), None);
        };
        self.evidence
            .shadow_pairs(&stage.route)
            .map_or((ShadowBaseline::default(), None), |s| {
                (
                    ShadowBaseline {
                        compared: s.compared,
                        serious: s.serious,
                        unexpected: s.unexpected,
                        segments: s.segments,
                    },
                    s.last_update_ms,
                )
            })
    }

    fn shadow_evidence(&self, r: &Rollout) -> ShadowEvidence {
        let (now, last) = self.shadow_counts(r);
        let base = &r.shadow_baseline;
        let carried = &r.shadow_carried;
        let since =
            |now: u64, base: u64, carried: u64| carried.saturating_add(now.saturating_sub(base));
        // Per segment the same way; a segment carried over from before a
        // restart and one counted now share a slot under the same cap.
        let mut segments: SegmentTally<PairCounts> = SegmentTally::default();
        for (label, c) in &carried.segments {
            let slot = segments.entry(label);
            *slot = PairCounts {
                compared: slot.compared.saturating_add(c.compared),
                serious: slot.serious.saturating_add(c.serious),
                unexpected: slot.unexpected.saturating_add(c.unexpected),
            };
        }
        for (label, c) in &now.segments {
            let b = base.segments.get(label).copied().unwrap_or_default();
            let slot = segments.entry(label);
            *slot = PairCounts {
                compared: since(c.compared, b.compared, slot.compared),
                serious: since(c.serious, b.serious, slot.serious),
                unexpected: since(c.unexpected, b.unexpected, slot.unexpected),
            };
        }
        ShadowEvidence {
            compared: since(now.compared, base.compared, carried.compared),
            serious: since(now.serious, base.serious, carried.serious),
            unexpected: since(now.unexpected, base.unexpected, carried.unexpected),
            // Reports from before the stage are not evidence for it.
            last_update_ms: last.filter(|t| *t >= r.phase_started_ms),
            segments: segments.take(),
        }
    }

    /// Where `r`'s evidence comes from: its spec's Prometheus (tracked from
    /// the step's evidence start on; nothing there yet is no data, never
    /// Envoy's numbers instead), or Envoy's stats stream.
    fn source_for(&self, r: &Rollout, now: u64) -> Arc<dyn EvidenceSource> {
        let Some(target) = r.spec.prometheus_target() else {
            return Arc::clone(&self.evidence);
        };
        match self.prometheus.get() {
            Some(p) => {
                let since = r.phase_started_ms.saturating_add(FLUSH_SETTLE_MS);
                p.track(&r.spec.service, &target, since, now);
                Arc::clone(p) as Arc<dyn EvidenceSource>
            }
            None => Arc::new(NoEvidence),
        }
    }

    /// What `r`'s evidence source has gathered, for the dashboard's charts:
    /// the source the judge reads, without asking it to track anything new.
    pub fn evidence_of(&self, r: &Rollout) -> Arc<dyn EvidenceSource> {
        if r.spec.prometheus_target().is_none() {
            return Arc::clone(&self.evidence);
        }
        match self.prometheus.get() {
            Some(p) => Arc::clone(p) as Arc<dyn EvidenceSource>,
            None => Arc::new(NoEvidence),
        }
    }

    /// `j` with the spec's business metrics judged (on steps with a
    /// baseline) and the Prometheus queries behind it.
    fn with_prometheus(
        &self,
        r: &Rollout,
        weight: u32,
        j: judge::Judgement,
        now: u64,
    ) -> judge::Judgement {
        let Some(target) = r.spec.prometheus_target() else {
            return j;
        };
        let Some(p) = self.prometheus.get() else {
            let mut j = j;
            j.queries = vec!["no Prometheus source in this control plane".to_owned()];
            return j;
        };
        let since = r.phase_started_ms.saturating_add(FLUSH_SETTLE_MS);
        let mut j = if weight < 100 && !r.spec.metrics.is_empty() {
            let counts = p.metric_counts(&r.spec.service, since, now);
            let more = r
                .spec
                .metrics
                .iter()
                .map(|rule| {
                    let ev = counts.iter().find(|c| c.name == rule.name);
                    judge::metric_check(rule, ev, &r.spec.analysis, now)
                })
                .collect();
            judge::with_checks(j, more)
        } else {
            j
        };
        j.queries = target.rendered(&r.spec.service);
        if let Some(e) = p.status(&r.spec.service).and_then(|s| s.error) {
            j.queries.push(format!("last poll failed: {e}"));
        }
        j
    }

    fn step_windows(&self, source: &dyn EvidenceSource, r: &Rollout, now: u64) -> StepWindows {
        // A stats flush is stamped when it arrives, so the first one after
        // a step starts still carries up to a flush interval of requests
        // from before it (the previous weight, or a previous rollout).
        let since = r.phase_started_ms.saturating_add(FLUSH_SETTLE_MS);
        source.step_windows(&r.spec.service, since, now)
    }

    /// The error counts since each of the step's restart points (see the
    /// judge's "Restarts"), from the same evidence as [`Self::step_windows`].
    fn restarts(&self, source: &dyn EvidenceSource, r: &Rollout, now: u64) -> Vec<judge::Restart> {
        let first = r.phase_started_ms.saturating_add(FLUSH_SETTLE_MS);
        let points = judge::restart_points(first, now);
        let starts: Vec<u64> = points.iter().map(|&(_, start)| start).collect();
        points
            .iter()
            .zip(source.counts_since(&r.spec.service, &starts, now))
            .map(|(&(index, _), (s, c))| judge::Restart {
                index,
                stable_requests: s.requests,
                stable_errors: s.errors,
                canary_requests: c.requests,
                canary_errors: c.errors,
            })
            .collect()
    }

    /// Evaluates every active rollout whose interval has passed.
    pub fn tick(&self, now: SystemTime) {
        let t = crate::time::unix_ms(now);
        let ids: Vec<String> = self
            .read()
            .values()
            .filter(|r| r.phase.is_active() && !r.paused)
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            // One rollout's panic must not leave the others unjudged: each
            // evaluation is caught on its own (a poisoned lock is still
            // usable, see `read`).
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.evaluate(&id, t)));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(rollout = %id, error = %e, "rollout evaluation failed"),
                Err(panic) => self.panicked(&id, panic.as_ref()),
            }
        }
        self.finalize_due(t);
    }

    /// Whether `r` is due a look at `t`: its `interval_s` has passed, or
    /// evidence newer than its last look has arrived (at most one look per
    /// [`MIN_LOOK_GAP_MS`]). Looking when a stats flush lands saves up to an
    /// interval between the evidence and the decision; the tests are
    /// anytime-valid, so looking more often costs no false rollbacks.
    fn look_due(&self, r: &Rollout, t: u64) -> bool {
        let since = t.saturating_sub(r.last_evaluated_ms);
        let interval_ms = (r.spec.analysis.interval_s * 1000.0) as u64;
        since >= interval_ms
            || (since >= MIN_LOOK_GAP_MS
                && matches!(r.phase, Phase::Canary { .. })
                && self
                    .source_for(r, t)
                    .newest_arrival_ms(&r.spec.service)
                    .is_some_and(|a| a > r.last_evaluated_ms))
    }

    fn evaluate(&self, id: &str, t: u64) -> Result<(), EngineError> {
        let _writer = self.write_lock();
        let Some(mut r) = self.get(id) else {
            return Ok(());
        };
        if !r.phase.is_active() || r.paused || !self.look_due(&r, t) {
            return Ok(());
        }
        let fault = self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(fault) = fault {
            fault(id);
        }
        if let Some(found) = self.found(&r) {
            let d = machine::decide(&r, found, t)?;
            r = self.commit(&r, d, t, false)?;
        }
        if r.spec.stop_rules.halt_on_nack
            && let Some(first_mark) = r.marks.first().map(|m| m.time_ms)
            && let Some(what) = self.router.rejection(&r.pushed, first_mark)
        {
            let d = machine::decide(&r, Event::Rejected(what), t)?;
            self.commit(&r, d, t, false)?;
            return Ok(());
        }
        let judgement = match r.phase {
            Phase::Shadow => {
                let Some(stage) = &r.spec.shadow else {
                    return Ok(());
                };
                let ev = self.shadow_evidence(&r);
                let mut j = judge::judge_shadow(
                    stage,
                    &r.spec.stop_rules,
                    &r.spec.analysis,
                    &ev,
                    t,
                    r.phase_started_ms,
                );
                if let Some(probes) = &r.spec.probes {
                    let check = judge::probe_check(probes, &self.probe_tally(&r));
                    j = judge::with_checks(j, vec![check]);
                }
                r.shadow_seen = ShadowBaseline {
                    compared: ev.compared,
                    serious: ev.serious,
                    unexpected: ev.unexpected,
                    segments: ev.segments.clone(),
                };
                j
            }
            Phase::Canary { step } => {
                let Some(s) = r.spec.steps.get(step) else {
                    return Ok(());
                };
                let source = self.source_for(&r, t);
                let w = self.step_windows(source.as_ref(), &r, t);
                let tally = r.spec.probes.as_ref().map(|_| self.probe_tally(&r));
                if let (Some(probes), Some(tally)) = (&r.spec.probes, &tally)
                    && let Some(j) = judge::judge_idle_on_probes(
                        probes,
                        &r.spec.analysis,
                        s,
                        &w.stable,
                        &w.canary,
                        tally,
                        t,
                        r.phase_started_ms,
                    )
                {
                    j
                } else {
                    let restarts = self.restarts(source.as_ref(), &r, t);
                    let j = judge::judge_with_restarts(
                        &r.spec.stop_rules,
                        &r.spec.analysis,
                        s,
                        &w.stable,
                        &w.canary,
                        &restarts,
                        t,
                        r.phase_started_ms,
                    );
                    let j = match (&r.spec.probes, tally) {
                        (Some(probes), Some(tally)) => {
                            judge::with_checks(j, vec![judge::probe_check(probes, &tally)])
                        }
                        _ => j,
                    };
                    self.with_prometheus(&r, s.weight, j, t)
                }
            }
            _ => return Ok(()),
        };
        let before = self.get(id).unwrap_or_else(|| r.clone());
        let d = machine::decide(&r, Event::Judged(judgement), t)?;
        self.commit(&before, d, t, false)?;
        Ok(())
    }

    /// A manual action by `actor`.
    pub fn act(
        &self,
        id: &str,
        action: Action,
        actor: &str,
        now: SystemTime,
    ) -> Result<Rollout, EngineError> {
        let t = crate::time::unix_ms(now);
        self.must_lead()?;
        let _writer = self.write_lock();
        let r = self
            .get(id)
            .ok_or_else(|| EngineError::Unknown(id.to_owned()))?;
        if action == Action::Finalize {
            if r.phase != Phase::Succeeded || r.finalized.is_some() {
                return Err(NotApplicable {
                    id: id.to_owned(),
                    phase: r.phase.label(),
                    action,
                }
                .into());
            }
            let newer = newer_rollout(&self.read(), id);
            return self.finalize(&r, newer, actor, t);
        }
        let d = machine::decide(
            &r,
            Event::Verb {
                action,
                actor: actor.to_owned(),
            },
            t,
        )?;
        self.commit(&r, d, t, false)
    }

    /// Carries finalizing forward: automatic finalizing of a rollout that
    /// succeeded, and emptying a finalized canary once it is safe. Run on
    /// every tick, so a restart between the two writes of a step (desired
    /// state, then the rollout record) finishes what was started.
    fn finalize_due(&self, t: u64) {
        let due: Vec<String> = self
            .read()
            .values()
            .filter(|r| {
                r.phase == Phase::Succeeded
                    && match &r.finalized {
                        None => r.spec.finalize.automatic,
                        Some(FinalizeState::EmptyingCanary { .. }) => true,
                        Some(_) => false,
                    }
            })
            .map(|r| r.id.clone())
            .collect();
        for id in due {
            let _writer = self.write_lock();
            let newer = newer_rollout(&self.read(), &id);
            let Some(r) = self.get(&id) else {
                continue;
            };
            let result = match r.finalized {
                None => self.finalize(&r, newer, ENGINE, t).map(drop),
                Some(FinalizeState::EmptyingCanary { .. }) => self.empty_canary(&r, t),
                Some(_) => Ok(()),
            };
            if let Err(e) = result {
                warn!(rollout = %id, error = %e, "finalizing failed; will retry");
            }
        }
    }

    /// Finalizes a succeeded rollout (see [`FinalizeState`]): one traffic
    /// change, then the record with its audit entry.
    fn finalize(
        &self,
        r: &Rollout,
        newer: Option<String>,
        actor: &str,
        t: u64,
    ) -> Result<Rollout, EngineError> {
        let service = &r.spec.service;
        let weight = self.router.weight(service)?;
        let already = self.router.is_finalized(service)?;
        if newer.is_some() || (!already && weight != r.weight) {
            let reason = match newer {
                Some(id) => format!("not finalized: rollout {id} of {service} came after it"),
                None => format!(
                    "not finalized: {service}'s canary weight is {weight} and no longer the rollout's {}",
                    r.weight
                ),
            };
            let state = FinalizeState::Skipped {
                time_ms: t,
                reason: reason.clone(),
            };
            return self.record(machine::finalized(r, state, actor, reason, r.weight, t));
        }
        if actor == ENGINE
            && let Some(why) = self.router.manual_promotion(service)
        {
            let reason = format!("not finalized automatically: {why}");
            let state = FinalizeState::Skipped {
                time_ms: t,
                reason: reason.clone(),
            };
            return self.record(machine::finalized(r, state, actor, reason, r.weight, t));
        }
        let endpoints = self.router.promote_canary_to_stable(service)?;
        let (state, tail) = match r.spec.finalize.canary {
            CanaryAfterFinalize::Keep => (
                FinalizeState::Done {
                    time_ms: t,
                    actor: actor.to_owned(),
                },
                "the canary keeps its endpoints at weight 0",
            ),
            CanaryAfterFinalize::Empty => (
                FinalizeState::EmptyingCanary {
                    time_ms: t,
                    actor: actor.to_owned(),
                },
                "the canary's endpoints are removed once every Envoy has the new route",
            ),
        };
        let reason = format!(
            "finalized by {actor}: the stable backend is now the new version ({}), canary weight 0; {tail}",
            endpoints.join(", ")
        );
        self.record(machine::finalized(r, state, actor, reason, 0, t))
    }

    /// Removes a finalized canary's endpoints once every connected Envoy has
    /// applied the routing that sends it no traffic.
    fn empty_canary(&self, r: &Rollout, t: u64) -> Result<(), EngineError> {
        if !self.router.routing_applied_everywhere() {
            return Ok(());
        }
        self.router.empty_canary(&r.spec.service)?;
        let reason = format!(
            "canary of {} emptied: every connected Envoy has the route with weight 0",
            r.spec.service
        );
        let state = FinalizeState::Done {
            time_ms: t,
            actor: ENGINE.to_owned(),
        };
        self.record(machine::finalized(r, state, ENGINE, reason, r.weight, t))
            .map(drop)
    }

    /// Persists a decision that moves no traffic (its audit entries too).
    fn record(&self, d: Decision) -> Result<Rollout, EngineError> {
        let audit = d.audit();
        for entry in &audit {
            info!(rollout = %d.rollout.id, actor = %entry.actor, reason = %entry.reason, "rollout finalize");
        }
        self.db.save(&d.rollout.id, &d.rollout, &audit)?;
        self.publish(d.rollout.clone());
        Ok(d.rollout)
    }

    fn panicked(&self, id: &str, panic: &(dyn std::any::Any + Send)) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        let n = self
            .panics
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        error!(rollout = %id, panics = n, panic = %what, "rollout evaluation panicked; the engine goes on");
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.last_panic = Some(format!("rollout {id}: {what}"));
    }

    pub fn list(&self) -> Vec<Rollout> {
        self.read().values().cloned().collect()
    }

    /// Every flag, by key, with the rollout it belongs to: the newest
    /// rollout that declares the key. Its state is derived from that
    /// rollout's phase as published (after the decision was persisted), so
    /// a rollback's flags read off as soon as the rollback is recorded.
    pub fn flags(&self) -> BTreeMap<String, FlagView> {
        let rollouts = self.read();
        let mut out: BTreeMap<String, (u64, FlagView)> = BTreeMap::new();
        for r in rollouts.values() {
            for f in &r.spec.flags {
                if out.get(&f.key).is_some_and(|(t, _)| *t > r.created_ms) {
                    continue;
                }
                out.insert(f.key.clone(), (r.created_ms, FlagView::of(r)));
            }
        }
        out.into_iter().map(|(k, (_, v))| (k, v)).collect()
    }

    /// One flag, by the same rule as [`Self::flags`].
    pub fn flag(&self, key: &str) -> Option<FlagView> {
        self.flags().remove(key)
    }

    pub fn view(&self, id: &str) -> Result<RolloutView, EngineError> {
        let rollout = self
            .get(id)
            .ok_or_else(|| EngineError::Unknown(id.to_owned()))?;
        let (audit, audit_unavailable) = match self.db.audit(id) {
            Ok(audit) => (audit, None),
            Err(e) => {
                warn!(rollout = %id, error = %e, "the audit log could not be read");
                (Vec::new(), Some(e.to_string()))
            }
        };
        Ok(RolloutView {
            stage: rollout.phase.label(),
            weights: Weights {
                stable: 100 - rollout.weight.min(100),
                canary: rollout.weight,
            },
            rollout,
            audit,
            audit_unavailable,
            engine: self.health(),
        })
    }

    /// Evaluates on a timer until the process ends.
    pub async fn run(self: Arc<Self>, period: Duration) {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // `tick` catches each evaluation's panic; this catches the rest,
            // so the loop itself never ends.
            let engine = Arc::clone(&self);
            let outcome = tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let now = SystemTime::now();
                    if engine.follow_lease(crate::time::unix_ms(now)) {
                        engine.tick(now);
                    }
                }))
            })
            .await;
            if let Ok(Err(panic)) = outcome {
                self.panicked("(tick)", panic.as_ref());
            }
        }
    }
}
