//! The rollout engine: a state machine per rollout, persisted in the
//! [`RolloutStore`], driven by a timer that gathers evidence, asks the
//! [`judge`](super::judge) and carries out the verdict.
//!
//! Phases: `shadow` (optional) → `canary` step by step (weights from the
//! spec; a step with a manual gate waits in `awaiting_approval` before its
//! weight goes out) → `succeeded`; or `rolled_back` / `aborted` at any point.
//! A paused rollout keeps its weight and is not evaluated.
//!
//! Every transition is appended to the audit log with the time, from, to,
//! actor (`engine` or the API caller), reason, and the judgement (with its
//! numbers) that justified it. Release marks (a timestamp per transition)
//! are kept on the rollout for dashboards.
//!
//! Effects: a new weight is a `set_canary_weight` on the desired state (an
//! RDS push); the shadow stage turns the route's `shadow` on in the filter
//! config (an ECDS push) and any rollback or the end of the stage turns it
//! off again. A NACK of anything pushed after the rollout started halts it.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::judge::{self, Judgement, Verdict};
use super::spec::{RolloutSpec, SpecError};
use super::store::{RolloutStore, RolloutStoreError};
use super::{Evidence, ShadowEvidence};
use crate::metrics::MetricsBook;
use crate::model::{FilterSettings, Weight};
use crate::resources::{Snapshot, type_url};
use crate::shadow::ShadowBook;
use crate::store::{ChangeError, Store};
use crate::xds::Registry;

/// Evidence for a step starts this long after the step: Envoy's stats flush
/// interval (`envoy/bootstrap.yaml`).
pub const FLUSH_SETTLE_MS: u64 = 1_000;

/// The actor recorded for the engine's own decisions.
pub const ENGINE: &str = "engine";

/// Config versions remembered per rollout as "pushed by it" (newest kept).
pub const MAX_PUSHED_VERSIONS: usize = 64;

pub fn now_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    Shadow,
    Canary {
        step: usize,
    },
    /// Waiting for a manual promote before step `step`'s weight goes out.
    AwaitingApproval {
        step: usize,
    },
    Succeeded,
    RolledBack {
        reason: String,
    },
    Aborted {
        reason: String,
    },
}

impl Phase {
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Phase::Shadow | Phase::Canary { .. } | Phase::AwaitingApproval { .. }
        )
    }

    fn label(&self) -> String {
        match self {
            Phase::Shadow => "shadow".into(),
            Phase::Canary { step } => format!("canary step {}", step + 1),
            Phase::AwaitingApproval { step } => format!("awaiting approval for step {}", step + 1),
            Phase::Succeeded => "succeeded".into(),
            Phase::RolledBack { .. } => "rolled_back".into(),
            Phase::Aborted { .. } => "aborted".into(),
        }
    }
}

/// A release mark: when the rollout entered a phase, at which weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub time_ms: u64,
    pub phase: String,
    pub weight: u32,
}

/// Shadow counts at the start of the stage, so the stage is judged on its
/// own pairs only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowBaseline {
    pub compared: u64,
    pub serious: u64,
    pub unexpected: u64,
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub phase: Phase,
    #[serde(default)]
    pub paused: bool,
    pub created_ms: u64,
    pub created_by: String,
    /// When the current phase (step) started: its evidence window.
    pub phase_started_ms: u64,
    /// The canary weight this rollout last applied.
    pub weight: u32,
    #[serde(default)]
    pub shadow_baseline: ShadowBaseline,
    #[serde(default)]
    pub last_judgement: Option<Judgement>,
    #[serde(default)]
    pub last_evaluated_ms: u64,
    #[serde(default)]
    pub marks: Vec<Mark>,
    /// Set once a succeeded rollout is finalized (or found unfinalizable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalized: Option<FinalizeState>,
    /// The (type URL, version) pairs this rollout's own changes produced:
    /// only a NACK of one of these halts it.
    #[serde(default)]
    pub pushed: Vec<PushedVersion>,
    /// Shadow evidence counted before the current baseline (a restart
    /// empties the shadow book, so what was seen is carried over).
    #[serde(default)]
    pub shadow_carried: ShadowBaseline,
    /// Shadow evidence as of the last evaluation: what a restart carries.
    #[serde(default)]
    pub shadow_seen: ShadowBaseline,
    /// The current phase's effects (weight, shadow) are in the desired
    /// state. `false` between recording a decision and applying it; a
    /// rollout found `false` at start is applied again (see
    /// [`Engine::new`]), so a decided rollback is never lost.
    #[serde(default = "applied_default")]
    pub applied: bool,
}

fn applied_default() -> bool {
    true
}

/// One config version a rollout's change produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedVersion {
    pub type_url: String,
    pub version: String,
}

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

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time_ms: u64,
    pub from: String,
    pub to: String,
    pub actor: String,
    pub reason: String,
    /// The judgement (or other numbers) that justified the transition.
    pub snapshot: serde_json::Value,
}

/// A rollout as `GET /v1/rollouts/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub stage: String,
    pub weights: Weights,
    pub audit: Vec<AuditEntry>,
    /// The engine's panics and persistence failures (all rollouts).
    pub engine: EngineHealth,
}

#[derive(Debug, Clone, Serialize)]
pub struct Weights {
    pub stable: u32,
    pub canary: u32,
}

/// A manual action through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Abort,
    /// After success: make the canary's backend the stable one (see
    /// [`FinalizeState`]).
    Finalize,
}

/// How far a succeeded rollout is through finalizing: the canary's
/// endpoints become the stable backend's and the weight returns to 0, in
/// one change Envoy applies make-before-break; then, with
/// `finalize.canary: empty`, the canary's endpoints are removed once every
/// connected Envoy has ACKed the route that moved the traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum FinalizeState {
    /// Stable serves the new version; the canary's endpoints are removed
    /// once every Envoy has the new route.
    EmptyingCanary { time_ms: u64, actor: String },
    /// Finished: the service is ready for its next rollout.
    Done { time_ms: u64, actor: String },
    /// Not finalized, and never will be by the engine: the service changed
    /// after the rollout succeeded (another rollout, or an operator).
    Skipped { time_ms: u64, reason: String },
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
    #[error("rollout {id} is {phase}: {action:?} does not apply")]
    Conflict {
        id: String,
        phase: String,
        action: Action,
    },
    #[error(transparent)]
    Change(#[from] ChangeError),
    #[error(transparent)]
    Store(#[from] RolloutStoreError),
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

/// Where the engine reads evidence from.
#[derive(Clone)]
pub struct Sources {
    pub metrics: Arc<MetricsBook>,
    pub shadow: Arc<ShadowBook>,
    pub registry: Arc<Registry>,
}

pub struct Engine {
    store: Store,
    db: RolloutStore,
    sources: Sources,
    rollouts: Mutex<BTreeMap<String, Rollout>>,
    panics: AtomicU64,
    health: Mutex<EngineHealth>,
    /// Test hook: called with a rollout id at the start of its evaluation.
    #[doc(hidden)]
    pub fault: Mutex<Option<Fault>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// What one transition does besides changing the phase.
struct Step {
    to: Phase,
    weight: Option<u32>,
    shadow: Option<bool>,
    reason: String,
    actor: String,
    snapshot: serde_json::Value,
}

impl Engine {
    /// Loads every stored rollout; active ones resume where they were.
    ///
    /// **Recovery.** A transition is written in this order: the decision
    /// (record + audit entry, `applied: false`) to the database, then its
    /// effects to the desired state (state file, then the published
    /// snapshot), then `applied: true`. A crash between the writes leaves a
    /// record with `applied: false`, and here its effects are applied again,
    /// so the state file follows every decided transition. A rollout in the
    /// shadow stage is re-baselined: the shadow book starts empty after a
    /// restart, so the evidence seen so far is carried and the new counts
    /// add to it (never subtracted from counters that restarted at zero).
    pub fn new(store: Store, db: RolloutStore, sources: Sources) -> Result<Self, EngineError> {
        // Reports are judged against the config this control plane pushed.
        sources.shadow.follow(store.clone());
        let loaded: Vec<Rollout> = db.load_all()?;
        let rollouts = loaded.into_iter().map(|r| (r.id.clone(), r)).collect();
        let engine = Self {
            store,
            db,
            sources,
            rollouts: Mutex::new(rollouts),
            panics: AtomicU64::new(0),
            health: Mutex::default(),
            fault: Mutex::new(None),
        };
        engine.recover()?;
        Ok(engine)
    }

    /// Applies decided-but-unapplied transitions and re-baselines shadow stages.
    fn recover(&self) -> Result<(), EngineError> {
        let mut rollouts = self.lock();
        for rollout in rollouts.values_mut() {
            let mut changed = false;
            if !rollout.applied {
                let forced = is_rollback(&rollout.phase);
                warn!(rollout = %rollout.id, phase = %rollout.phase.label(), weight = rollout.weight, "applying a transition that was decided but not applied before the restart");
                let shadow = rollout
                    .spec
                    .shadow
                    .as_ref()
                    .map(|_| rollout.phase == Phase::Shadow);
                match self.apply(rollout, shadow, forced) {
                    Ok(()) => {
                        rollout.applied = true;
                        changed = true;
                    }
                    Err(e) => {
                        self.persistence_failed(&rollout.id, &e);
                        if !forced {
                            return Err(e);
                        }
                    }
                }
            }
            if rollout.phase == Phase::Shadow {
                rollout.shadow_carried = rollout.shadow_seen.clone();
                rollout.shadow_baseline = self.shadow_counts(rollout).0;
                changed = true;
            }
            if changed {
                self.db.save::<_, AuditEntry>(&rollout.id, rollout, &[])?;
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

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and starts a rollout.
    pub fn create(&self, text: &str, actor: &str, now: SystemTime) -> Result<Rollout, EngineError> {
        let spec = RolloutSpec::from_yaml_or_json(text)?;
        let service = self
            .store
            .service(&spec.service)
            .map_err(|_| EngineError::UnknownService(spec.service.clone()))?;
        if service.canary.endpoints.is_empty() {
            return Err(EngineError::Invalid {
                field: "service",
                reason: format!("service {:?} has no canary endpoints", spec.service),
            });
        }
        if let Some(stage) = &spec.shadow {
            let filter = self.store.state().filter;
            let config =
                understudy_core::FilterConfig::from_value(&filter.config).map_err(|e| {
                    EngineError::Invalid {
                        field: "shadow.route",
                        reason: e.to_string(),
                    }
                })?;
            if !config.routes().iter().any(|r| r.name == stage.route) {
                return Err(EngineError::Invalid {
                    field: "shadow.route",
                    reason: format!("the filter config has no route named {:?}", stage.route),
                });
            }
        }
        let mut rollouts = self.lock();
        if let Some(active) = rollouts
            .values()
            .find(|r| r.spec.service == spec.service && r.phase.is_active())
        {
            return Err(EngineError::Busy {
                service: spec.service.clone(),
                id: active.id.clone(),
            });
        }
        let n = rollouts
            .values()
            .filter(|r| r.spec.service == spec.service)
            .count();
        let t = now_ms(now);
        let id = format!("{}-{}", spec.service, n + 1);
        let first = if spec.shadow.is_some() {
            Phase::Shadow
        } else {
            Self::enter_step(&spec, 0)
        };
        let mut rollout = Rollout {
            id: id.clone(),
            spec,
            phase: Phase::Shadow,
            paused: false,
            created_ms: t,
            created_by: actor.to_owned(),
            phase_started_ms: t,
            weight: service.canary_weight.percent(),
            shadow_baseline: ShadowBaseline::default(),
            last_judgement: None,
            last_evaluated_ms: 0,
            marks: Vec::new(),
            finalized: None,
            pushed: Vec::new(),
            shadow_carried: ShadowBaseline::default(),
            shadow_seen: ShadowBaseline::default(),
            applied: true,
        };
        let weight = match first {
            Phase::Canary { step } => rollout.spec.steps.get(step).map(|s| s.weight),
            _ => Some(0),
        };
        let step = Step {
            shadow: Some(first == Phase::Shadow),
            to: first,
            weight,
            reason: format!("created by {actor}"),
            actor: actor.to_owned(),
            snapshot: serde_json::json!({"spec": rollout.spec}),
        };
        self.transition(&mut rollout, step, "created", t)?;
        rollouts.insert(id, rollout.clone());
        Ok(rollout)
    }

    fn enter_step(spec: &RolloutSpec, step: usize) -> Phase {
        match spec.steps.get(step) {
            Some(s) if s.manual_gate => Phase::AwaitingApproval { step },
            Some(_) => Phase::Canary { step },
            None => Phase::Succeeded,
        }
    }

    /// Carries out `step` on `rollout`, in the order [`Engine::new`]
    /// recovers from: the decision (record and audit entry, `applied:
    /// false`) in one database transaction, then the effects on the desired
    /// state, then `applied: true`.
    ///
    /// A failed decision write changes nothing, except that a rollback is
    /// applied anyway (traffic leaves the canary first). A failed apply of
    /// a rollback is published in memory, logged at error and counted in
    /// [`EngineHealth`]; its record stays `applied: false`, so a restart
    /// applies it again. A failed apply of anything else is undone in the
    /// record, with an audit entry saying why.
    fn transition(
        &self,
        rollout: &mut Rollout,
        step: Step,
        from_label: &str,
        t: u64,
    ) -> Result<(), EngineError> {
        let before = rollout.clone();
        let rollback = is_rollback(&step.to);
        let entry = AuditEntry {
            time_ms: t,
            from: from_label.to_owned(),
            to: step.to.label(),
            actor: step.actor,
            reason: step.reason.clone(),
            snapshot: step.snapshot,
        };
        info!(rollout = %rollout.id, from = %entry.from, to = %entry.to, actor = %entry.actor, reason = %entry.reason, "rollout transition");
        if let Some(w) = step.weight {
            rollout.weight = w;
        }
        rollout.phase = step.to;
        rollout.phase_started_ms = t;
        rollout.marks.push(Mark {
            time_ms: t,
            phase: rollout.phase.label(),
            weight: rollout.weight,
        });
        rollout.applied = false;
        if let Err(e) = self
            .db
            .save(&rollout.id, rollout, std::slice::from_ref(&entry))
        {
            let e = EngineError::from(e);
            if rollback {
                // The database is failing; traffic still leaves the canary.
                if let Err(apply) = self.apply(rollout, step.shadow, true) {
                    self.persistence_failed(&rollout.id, &apply);
                }
            } else {
                *rollout = before;
            }
            self.persistence_failed(&rollout.id, &e);
            return Err(e);
        }
        if let Err(e) = self.apply(rollout, step.shadow, rollback) {
            self.persistence_failed(&rollout.id, &e);
            if !rollback {
                let undo = AuditEntry {
                    time_ms: t,
                    from: entry.to.clone(),
                    to: entry.from.clone(),
                    actor: ENGINE.to_owned(),
                    reason: format!("not applied: {e}"),
                    snapshot: serde_json::Value::Null,
                };
                *rollout = before;
                if from_label == "created" {
                    // A rollout whose start could not be applied never ran;
                    // its stored record must not resume as active.
                    rollout.phase = Phase::Aborted {
                        reason: undo.reason.clone(),
                    };
                }
                self.db.save(&rollout.id, rollout, &[undo])?;
            }
            return Err(e);
        }
        if step.shadow == Some(true) {
            rollout.shadow_baseline = self.shadow_counts(rollout).0;
            rollout.shadow_carried = ShadowBaseline::default();
            rollout.shadow_seen = ShadowBaseline::default();
        }
        rollout.applied = true;
        self.db.save::<_, AuditEntry>(&rollout.id, rollout, &[])?;
        Ok(())
    }

    /// Makes the desired state match `rollout`'s phase: its canary weight,
    /// and the shadow stage's shadowing on exactly while in `shadow`.
    /// `forced`: a state file that cannot be written does not stop the
    /// change from being published (rollbacks). Records the config versions
    /// the change produced, for [`Engine::nack_for`].
    fn apply(
        &self,
        rollout: &mut Rollout,
        shadow: Option<bool>,
        forced: bool,
    ) -> Result<(), EngineError> {
        let before = self.store.snapshot();
        let mut result = Ok(());
        let weight = Weight::try_from(i64::from(rollout.weight)).map_err(ChangeError::Invalid)?;
        if let Err(e) = self
            .store
            .set_canary_weight_with(&rollout.spec.service, weight, forced)
        {
            result = Err(EngineError::from(e));
        }
        if let Some(on) = shadow
            && let Err(e) = self.set_shadow(rollout, on, forced)
            && result.is_ok()
        {
            result = Err(e);
        }
        self.remember_pushed(rollout, &before);
        result
    }

    fn remember_pushed(&self, rollout: &mut Rollout, before: &Snapshot) {
        let after = self.store.snapshot();
        for url in [
            type_url::CLUSTER,
            type_url::ENDPOINT,
            type_url::LISTENER,
            type_url::ROUTE,
            type_url::EXTENSION_CONFIG,
        ] {
            let Some(now) = after.get(url) else { continue };
            if before.get(url).is_some_and(|b| b.version == now.version) {
                continue;
            }
            let v = PushedVersion {
                type_url: url.to_owned(),
                version: now.version.clone(),
            };
            if !rollout.pushed.contains(&v) {
                rollout.pushed.push(v);
            }
        }
        let over = rollout.pushed.len().saturating_sub(MAX_PUSHED_VERSIONS);
        rollout.pushed.drain(..over);
    }

    /// Turns the shadow stage's route shadowing on (to the canary cluster,
    /// keeping any comparison rules already configured) or off.
    fn set_shadow(&self, rollout: &Rollout, on: bool, forced: bool) -> Result<(), EngineError> {
        let Some(stage) = &rollout.spec.shadow else {
            return Ok(());
        };
        let FilterSettings {
            wasm_path,
            mut config,
            report_cluster,
        } = self.store.state().filter;
        let canary = format!("{}-canary", rollout.spec.service);
        let mut changed = false;
        if let Some(routes) = config.get_mut("routes").and_then(|r| r.as_array_mut()) {
            for route in routes.iter_mut() {
                if route.get("name").and_then(|n| n.as_str()) != Some(stage.route.as_str()) {
                    continue;
                }
                let Some(obj) = route.as_object_mut() else {
                    continue;
                };
                if on {
                    let mut shadow = obj
                        .get("shadow")
                        .cloned()
                        .unwrap_or_else(|| serde_json::json!({}));
                    if let Some(s) = shadow.as_object_mut() {
                        s.insert("cluster".into(), serde_json::json!(canary));
                        s.insert("percent".into(), serde_json::json!(stage.percent));
                        s.remove("calibration");
                    }
                    obj.insert("shadow".into(), shadow);
                    changed = true;
                } else if obj.remove("shadow").is_some() {
                    changed = true;
                }
            }
        }
        if changed {
            self.store.put_filter_with(
                FilterSettings {
                    wasm_path,
                    config,
                    report_cluster,
                },
                forced,
            )?;
        }
        Ok(())
    }

    /// The shadow route's live counts now, and when it last reported.
    fn shadow_counts(&self, rollout: &Rollout) -> (ShadowBaseline, Option<u64>) {
        let Some(stage) = &rollout.spec.shadow else {
            return (ShadowBaseline::default(), None);
        };
        self.sources
            .shadow
            .summaries()
            .into_iter()
            .find(|s| s.route == stage.route)
            .map_or((ShadowBaseline::default(), None), |s| {
                (
                    ShadowBaseline {
                        compared: s.live.compared,
                        serious: s.live.mismatched_serious,
                        unexpected: s.live.unexpected,
                    },
                    Some(now_ms(s.last_report)),
                )
            })
    }

    fn shadow_evidence(&self, rollout: &Rollout) -> ShadowEvidence {
        let (now, last) = self.shadow_counts(rollout);
        let base = &rollout.shadow_baseline;
        let carried = &rollout.shadow_carried;
        let since =
            |now: u64, base: u64, carried: u64| carried.saturating_add(now.saturating_sub(base));
        ShadowEvidence {
            compared: since(now.compared, base.compared, carried.compared),
            serious: since(now.serious, base.serious, carried.serious),
            unexpected: since(now.unexpected, base.unexpected, carried.unexpected),
            // Reports from before the stage are not evidence for it.
            last_update_ms: last.filter(|t| *t >= rollout.phase_started_ms),
        }
    }

    fn evidence(&self, rollout: &Rollout, now: u64) -> (Evidence, Evidence) {
        let service = &rollout.spec.service;
        // A stats flush is stamped when it arrives, so the first one after
        // a step starts still carries up to a flush interval of requests
        // from before it (the previous weight, or a previous rollout).
        let since = rollout.phase_started_ms + FLUSH_SETTLE_MS;
        let window = |cluster: String| self.sources.metrics.window(&cluster, since, now);
        (
            window(format!("{service}-stable")),
            window(format!("{service}-canary")),
        )
    }

    /// The error counts since each of the step's restart points (see the
    /// judge's "Restarts"), from the same per-flush samples as
    /// [`Self::evidence`]: one pass over each side's samples per look.
    fn restarts(&self, rollout: &Rollout, now: u64) -> Vec<judge::Restart> {
        let service = &rollout.spec.service;
        let first = rollout.phase_started_ms + FLUSH_SETTLE_MS;
        let points = judge::restart_points(first, now);
        let Some(&(_, oldest)) = points.first() else {
            return Vec::new();
        };
        // (requests, errors) since each point: samples are summed into the
        // newest point at or before their arrival, then suffix-summed.
        let since = |cluster: String| -> Vec<(u64, u64)> {
            let mut per = vec![(0u64, 0u64); points.len()];
            for s in self.sources.metrics.samples(&cluster, oldest, now) {
                let i = points.partition_point(|&(_, start)| start < s.at_ms);
                if let Some(slot) = i.checked_sub(1).and_then(|i| per.get_mut(i)) {
                    slot.0 = slot.0.saturating_add(s.requests);
                    slot.1 = slot.1.saturating_add(s.errors_5xx);
                }
            }
            for i in (0..per.len().saturating_sub(1)).rev() {
                let next = per[i + 1];
                per[i].0 = per[i].0.saturating_add(next.0);
                per[i].1 = per[i].1.saturating_add(next.1);
            }
            per
        };
        let stable = since(format!("{service}-stable"));
        let canary = since(format!("{service}-canary"));
        points
            .iter()
            .zip(stable.iter().zip(&canary))
            .map(|(&(index, _), (s, c))| judge::Restart {
                index,
                stable_requests: s.0,
                stable_errors: s.1,
                canary_requests: c.0,
                canary_errors: c.1,
            })
            .collect()
    }

    /// A NACK, recorded since `since_ms`, of a config version this
    /// rollout's own changes produced. A NACK of anything else (another
    /// change, another resource) is not this rollout's business.
    fn nack_for(&self, rollout: &Rollout, since_ms: u64) -> Option<String> {
        self.sources
            .registry
            .nacks()
            .into_iter()
            .filter(|n| now_ms(n.nack.at) >= since_ms)
            .find(|n| {
                rollout
                    .pushed
                    .iter()
                    .any(|p| p.type_url == n.nack.type_url && p.version == n.nack.version)
            })
            .map(|n| {
                format!(
                    "Envoy {} rejected {} version {}: {}",
                    n.node_id.as_deref().unwrap_or("?"),
                    n.nack.type_url.rsplit('.').next().unwrap_or(""),
                    n.nack.version,
                    n.nack.error
                )
            })
    }

    /// Evaluates every active rollout whose interval has passed.
    pub fn tick(&self, now: SystemTime) {
        let t = now_ms(now);
        let ids: Vec<String> = self
            .lock()
            .values()
            .filter(|r| r.phase.is_active() && !r.paused)
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            // One rollout's panic must not leave the others unjudged: each
            // evaluation is caught on its own (a poisoned lock is still
            // usable, see `lock`).
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.evaluate(&id, t)));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(rollout = %id, error = %e, "rollout evaluation failed"),
                Err(panic) => self.panicked(&id, panic.as_ref()),
            }
        }
        self.finalize_due(t);
    }

    /// Carries finalizing forward: automatic finalizing of a rollout that
    /// succeeded, and emptying a finalized canary once it is safe. Run on
    /// every tick, so a restart between the two writes of a step (desired
    /// state, then the rollout record) finishes what was started.
    fn finalize_due(&self, t: u64) {
        let due: Vec<String> = self
            .lock()
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
            let mut rollouts = self.lock();
            let newer = newer_rollout(&rollouts, &id);
            let Some(rollout) = rollouts.get_mut(&id) else {
                continue;
            };
            let result = match rollout.finalized {
                None => self.finalize(rollout, newer, ENGINE, t),
                Some(FinalizeState::EmptyingCanary { .. }) => self.empty_canary(rollout, t),
                Some(_) => Ok(()),
            };
            if let Err(e) = result {
                warn!(rollout = %id, error = %e, "finalizing failed; will retry");
            }
        }
    }

    /// Finalizes a succeeded rollout (see [`FinalizeState`]): one desired
    /// state change, then the record with its audit entry.
    fn finalize(
        &self,
        rollout: &mut Rollout,
        newer: Option<String>,
        actor: &str,
        t: u64,
    ) -> Result<(), EngineError> {
        let service = &rollout.spec.service;
        let svc = self.store.service(service).map_err(ChangeError::Invalid)?;
        let already = svc.canary_weight.percent() == 0
            && !svc.stable.endpoints.is_empty()
            && svc.stable.endpoints == svc.canary.endpoints;
        let changed =
            newer.is_some() || (!already && svc.canary_weight.percent() != rollout.weight);
        if changed {
            let reason = match newer {
                Some(id) => format!("not finalized: rollout {id} of {service} came after it"),
                None => format!(
                    "not finalized: {service}'s canary weight is {} and no longer the rollout's {}",
                    svc.canary_weight.percent(),
                    rollout.weight
                ),
            };
            return self.record_finalize(
                rollout,
                FinalizeState::Skipped {
                    time_ms: t,
                    reason: reason.clone(),
                },
                actor,
                reason,
                t,
            );
        }
        let promoted = self.store.promote_canary_to_stable(service)?;
        rollout.weight = 0;
        let endpoints: Vec<String> = promoted
            .stable
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect();
        let (state, tail) = match rollout.spec.finalize.canary {
            super::spec::CanaryAfterFinalize::Keep => (
                FinalizeState::Done {
                    time_ms: t,
                    actor: actor.to_owned(),
                },
                "the canary keeps its endpoints at weight 0",
            ),
            super::spec::CanaryAfterFinalize::Empty => (
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
        self.record_finalize(rollout, state, actor, reason, t)
    }

    /// Removes a finalized canary's endpoints once every connected Envoy has
    /// ACKed the current route configuration (which sends it no traffic).
    fn empty_canary(&self, rollout: &mut Rollout, t: u64) -> Result<(), EngineError> {
        if !self.routes_applied_everywhere() {
            return Ok(());
        }
        self.store.empty_canary(&rollout.spec.service)?;
        let reason = format!(
            "canary of {} emptied: every connected Envoy has the route with weight 0",
            rollout.spec.service
        );
        self.record_finalize(
            rollout,
            FinalizeState::Done {
                time_ms: t,
                actor: ENGINE.to_owned(),
            },
            ENGINE,
            reason,
            t,
        )
    }

    fn record_finalize(
        &self,
        rollout: &mut Rollout,
        state: FinalizeState,
        actor: &str,
        reason: String,
        t: u64,
    ) -> Result<(), EngineError> {
        let to = match &state {
            FinalizeState::EmptyingCanary { .. } | FinalizeState::Done { .. } => "finalized",
            FinalizeState::Skipped { .. } => "not finalized",
        };
        let entry = AuditEntry {
            time_ms: t,
            from: rollout.phase.label(),
            to: to.to_owned(),
            actor: actor.to_owned(),
            reason: reason.clone(),
            snapshot: serde_json::json!({"finalize": state}),
        };
        info!(rollout = %rollout.id, actor, %reason, "rollout finalize");
        if matches!(
            state,
            FinalizeState::EmptyingCanary { .. } | FinalizeState::Skipped { .. }
        ) || rollout.finalized.is_none()
        {
            rollout.marks.push(Mark {
                time_ms: t,
                phase: to.to_owned(),
                weight: rollout.weight,
            });
        }
        rollout.finalized = Some(state);
        self.db.save(&rollout.id, rollout, &[entry])?;
        Ok(())
    }

    /// Whether every connected Envoy has ACKed the current route configuration.
    fn routes_applied_everywhere(&self) -> bool {
        let snapshot = self.store.snapshot();
        let Some(routes) = snapshot.get(crate::resources::type_url::ROUTE) else {
            return false;
        };
        let rds = crate::resources::type_url::short(crate::resources::type_url::ROUTE);
        self.sources.registry.envoys().iter().all(|e| {
            e.types.get(rds).and_then(|s| s.acked_version.as_deref())
                == Some(routes.version.as_str())
        })
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

    fn evaluate(&self, id: &str, t: u64) -> Result<(), EngineError> {
        let mut rollouts = self.lock();
        let Some(rollout) = rollouts.get_mut(id) else {
            return Ok(());
        };
        let interval_ms = (rollout.spec.analysis.interval_s * 1000.0) as u64;
        if !rollout.phase.is_active()
            || rollout.paused
            || t.saturating_sub(rollout.last_evaluated_ms) < interval_ms
        {
            return Ok(());
        }
        rollout.last_evaluated_ms = t;
        let fault = self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(fault) = fault {
            fault(id);
        }
        let from = rollout.phase.label();
        if rollout.spec.stop_rules.halt_on_nack
            && let Some(first_mark) = rollout.marks.first().map(|m| m.time_ms)
            && let Some(nack) = self.nack_for(rollout, first_mark)
        {
            let step = self.rollback_step(rollout, format!("halted: {nack}"), ENGINE);
            return self.transition(rollout, step, &from, t);
        }
        let judgement = match rollout.phase {
            Phase::Shadow => {
                let Some(stage) = &rollout.spec.shadow else {
                    return Ok(());
                };
                let ev = self.shadow_evidence(rollout);
                rollout.shadow_seen = ShadowBaseline {
                    compared: ev.compared,
                    serious: ev.serious,
                    unexpected: ev.unexpected,
                };
                judge::judge_shadow(
                    stage,
                    &rollout.spec.stop_rules,
                    &rollout.spec.analysis,
                    &ev,
                    t,
                    rollout.phase_started_ms,
                )
            }
            Phase::Canary { step } => {
                let Some(s) = rollout.spec.steps.get(step) else {
                    return Ok(());
                };
                let (stable, canary) = self.evidence(rollout, t);
                let restarts = self.restarts(rollout, t);
                judge::judge_with_restarts(
                    &rollout.spec.stop_rules,
                    &rollout.spec.analysis,
                    s,
                    &stable,
                    &canary,
                    &restarts,
                    t,
                    rollout.phase_started_ms,
                )
            }
            _ => return Ok(()),
        };
        let snapshot = serde_json::to_value(&judgement).unwrap_or_default();
        let verdict = judgement.verdict;
        let reason = judgement.reason.clone();
        rollout.last_judgement = Some(judgement);
        match verdict {
            Verdict::Hold => {
                self.db.save::<_, AuditEntry>(&rollout.id, rollout, &[])?;
                Ok(())
            }
            Verdict::Rollback => {
                let mut step = self.rollback_step(rollout, reason, ENGINE);
                step.snapshot = snapshot;
                self.transition(rollout, step, &from, t)
            }
            Verdict::Promote => {
                let mut step = self.advance_step(rollout, reason, ENGINE);
                step.snapshot = snapshot;
                self.transition(rollout, step, &from, t)
            }
        }
    }

    fn rollback_step(&self, rollout: &Rollout, reason: String, actor: &str) -> Step {
        Step {
            to: Phase::RolledBack {
                reason: reason.clone(),
            },
            weight: Some(0),
            shadow: rollout.spec.shadow.as_ref().map(|_| false),
            reason,
            actor: actor.to_owned(),
            snapshot: serde_json::Value::Null,
        }
    }

    /// The next phase after the current one passes (or is promoted by hand).
    fn advance_step(&self, rollout: &Rollout, reason: String, actor: &str) -> Step {
        let (to, shadow) = match rollout.phase {
            Phase::Shadow => (Self::enter_step(&rollout.spec, 0), Some(false)),
            Phase::Canary { step } => (Self::enter_step(&rollout.spec, step + 1), None),
            // A manual promote opens the gate.
            Phase::AwaitingApproval { step } => (Phase::Canary { step }, None),
            ref other => (other.clone(), None),
        };
        let weight = match to {
            Phase::Canary { step } => rollout.spec.steps.get(step).map(|s| s.weight),
            _ => None,
        };
        Step {
            to,
            weight,
            shadow,
            reason,
            actor: actor.to_owned(),
            snapshot: serde_json::Value::Null,
        }
    }

    /// A manual action by `actor`.
    pub fn act(
        &self,
        id: &str,
        action: Action,
        actor: &str,
        now: SystemTime,
    ) -> Result<Rollout, EngineError> {
        let t = now_ms(now);
        let mut rollouts = self.lock();
        let rollout = rollouts
            .get_mut(id)
            .ok_or_else(|| EngineError::Unknown(id.to_owned()))?;
        let from = rollout.phase.label();
        let conflict = || EngineError::Conflict {
            id: id.to_owned(),
            phase: from.clone(),
            action,
        };
        if action == Action::Finalize {
            if rollout.phase != Phase::Succeeded || rollout.finalized.is_some() {
                return Err(conflict());
            }
            let rollout = rollouts.get(id).cloned();
            let newer = newer_rollout(&rollouts, id);
            let mut rollout = rollout.ok_or_else(|| EngineError::Unknown(id.to_owned()))?;
            self.finalize(&mut rollout, newer, actor, t)?;
            rollouts.insert(id.to_owned(), rollout.clone());
            return Ok(rollout);
        }
        if !rollout.phase.is_active() {
            return Err(conflict());
        }
        match action {
            Action::Pause | Action::Resume => {
                let pause = action == Action::Pause;
                if rollout.paused == pause {
                    return Err(conflict());
                }
                rollout.paused = pause;
                let what = if pause { "paused" } else { "resumed" };
                let entry = AuditEntry {
                    time_ms: t,
                    from: from.clone(),
                    to: from.clone(),
                    actor: actor.to_owned(),
                    reason: format!("{what} by {actor}"),
                    snapshot: serde_json::Value::Null,
                };
                rollout.marks.push(Mark {
                    time_ms: t,
                    phase: what.to_owned(),
                    weight: rollout.weight,
                });
                self.db.save(&rollout.id, rollout, &[entry])?;
            }
            Action::Promote => {
                let step = self.advance_step(rollout, format!("promoted by {actor}"), actor);
                self.transition(rollout, step, &from, t)?;
            }
            Action::Finalize => return Err(conflict()),
            Action::Abort => {
                let mut step = self.rollback_step(rollout, format!("aborted by {actor}"), actor);
                step.to = Phase::Aborted {
                    reason: format!("aborted by {actor}"),
                };
                self.transition(rollout, step, &from, t)?;
            }
        }
        Ok(rollout.clone())
    }

    pub fn list(&self) -> Vec<Rollout> {
        self.lock().values().cloned().collect()
    }

    pub fn view(&self, id: &str) -> Result<RolloutView, EngineError> {
        let rollout = self
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::Unknown(id.to_owned()))?;
        let audit = self.db.audit(id)?;
        Ok(RolloutView {
            stage: rollout.phase.label(),
            weights: Weights {
                stable: 100 - rollout.weight.min(100),
                canary: rollout.weight,
            },
            rollout,
            audit,
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
            if let Err(panic) =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.tick(SystemTime::now())))
            {
                self.panicked("(tick)", panic.as_ref());
            }
        }
    }
}

fn is_rollback(phase: &Phase) -> bool {
    matches!(phase, Phase::RolledBack { .. } | Phase::Aborted { .. })
}
