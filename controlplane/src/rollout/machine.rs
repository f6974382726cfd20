//! The rollout state machine, pure: [`decide`] takes a rollout, an
//! [`Event`] and the time, and gives the next rollout and the [`Effect`]s
//! to carry out. No I/O, no clock, no locks: the engine
//! ([`super::engine`]) gathers events, persists each decision, and applies
//! its effects through the traffic port.
//!
//! ```text
//!            create
//!              │
//!   ┌──────────┴──────────┐
//!   ▼                     ▼
//! shadow ──pass──▶ canary step 1 ──pass──▶ … ──pass──▶ succeeded ──▶ finalized
//!   │                 │   ▲ (a step with a manual gate waits in
//!   │                 │   │  awaiting_approval until promoted)
//!   └─fail / NACK─────┴───┴──▶ rolled_back        abort (any active) ──▶ aborted
//! ```
//!
//! Rules every transition keeps (checked by a property test):
//! - the weight in an effect is within 0..=100;
//! - nothing happens after a terminal phase (succeeded, rolled back, aborted);
//! - every transition, and every out-of-band change found and undone, has
//!   exactly one audit entry;
//! - a rollback and an abort set the weight to 0 and turn the shadow off,
//!   whatever the weight was (the engine applies it against the desired
//!   state, not against [`Rollout::weight`]).
//!
//! A paused rollout keeps its weight and ignores verdicts; verbs still apply.

use serde::{Deserialize, Serialize};

use super::judge::{Judgement, Verdict};
use super::spec::RolloutSpec;
use crate::model::{Cohort, FlagHeader};
use crate::traffic::ChangeId;

/// The actor recorded for the engine's own decisions.
pub const ENGINE: &str = "engine";

/// The actor recorded for a change found in the desired state that no
/// rollout made (a state file edited while the control plane was down, or
/// a write that bypassed the API's ownership check).
pub const OUTSIDE: &str = "outside the rollout";

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
    /// Every [`Phase::state`], in life-cycle order.
    pub const STATES: [&'static str; 6] = [
        "shadow",
        "canary",
        "awaiting_approval",
        "succeeded",
        "rolled_back",
        "aborted",
    ];

    /// The phase's state name, as the API writes it (`phase.state`).
    pub fn state(&self) -> &'static str {
        match self {
            Phase::Shadow => "shadow",
            Phase::Canary { .. } => "canary",
            Phase::AwaitingApproval { .. } => "awaiting_approval",
            Phase::Succeeded => "succeeded",
            Phase::RolledBack { .. } => "rolled_back",
            Phase::Aborted { .. } => "aborted",
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Phase::Shadow | Phase::Canary { .. } | Phase::AwaitingApproval { .. }
        )
    }

    pub fn label(&self) -> String {
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
    /// The same per traffic segment (bounded as the shadow book bounds
    /// them), so a segment gate is judged on the stage's own pairs too.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub segments: std::collections::BTreeMap<String, crate::evidence::PairCounts>,
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
    pub pushed: Vec<ChangeId>,
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
    /// [`super::engine::Engine::new`]), so a decided rollback is never lost.
    #[serde(default = "applied_default")]
    pub applied: bool,
}

fn applied_default() -> bool {
    true
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

/// A manual action through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// What happened to a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The judge's judgement of the current phase over its window.
    Judged(Judgement),
    /// An operator's verb (not `Finalize`: see [`finalized`]).
    Verb { action: Action, actor: String },
    /// The data plane rejected a change this rollout made.
    Rejected(String),
    /// The desired state differs from what the rollout holds: `weight` is
    /// the canary weight found; `shadow` whether the stage's route is
    /// shadowed (`None`: not checked, the rollout has no shadow stage);
    /// `cohorts` the cohorts routed to the canary (`None`: the router keeps
    /// none); `flags` the flags header the routes render (`None`: the
    /// router renders none).
    Found {
        weight: u32,
        shadow: Option<bool>,
        cohorts: Option<Vec<Cohort>>,
        flags: Option<FlagHeader>,
    },
    /// The control plane restarted: a decided but unapplied transition is
    /// applied again.
    Restarted,
}

/// What the engine must carry out for a decision, in this order, after it
/// has persisted the decision's rollout and audit entries.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Set the service's canary weight (a rollback forces it through even
    /// when it cannot be saved).
    SetWeight(u32),
    /// Turn the shadow stage's route shadowing on (to the canary) or off.
    SetShadow(bool),
    /// Append this entry to the rollout's audit log.
    Audit(AuditEntry),
}

/// The next rollout and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub rollout: Rollout,
    pub effects: Vec<Effect>,
}

impl Decision {
    fn unchanged(r: &Rollout) -> Self {
        Self {
            rollout: r.clone(),
            effects: Vec::new(),
        }
    }

    /// Whether the effects change traffic (and so need `applied`).
    pub fn moves_traffic(&self) -> bool {
        self.effects
            .iter()
            .any(|e| matches!(e, Effect::SetWeight(_) | Effect::SetShadow(_)))
    }

    /// The audit entries to persist with the rollout.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Audit(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether this decision takes traffic off the canary (a rollback or
    /// an abort): applied even when it cannot be saved.
    pub fn is_rollback(&self) -> bool {
        is_rollback(&self.rollout.phase) && self.moves_traffic()
    }
}

/// A verb that does not apply to the rollout's phase.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rollout {id} is {phase}: {action:?} does not apply")]
pub struct NotApplicable {
    pub id: String,
    pub phase: String,
    pub action: Action,
}

pub fn is_rollback(phase: &Phase) -> bool {
    matches!(phase, Phase::RolledBack { .. } | Phase::Aborted { .. })
}

/// The cohorts routed to the canary in `r`'s phase: those of the steps
/// that have gone out (a gated step's only once promoted), none in the
/// shadow stage or after a rollback or an abort. Applied with the weight
/// (the engine's `SetWeight`), so every transition, rollback and restart
/// that writes the weight writes the cohorts too, in one change.
pub fn cohorts(r: &Rollout) -> Vec<Cohort> {
    let through = match r.phase {
        Phase::Canary { step } => step + 1,
        Phase::AwaitingApproval { step } => step,
        Phase::Succeeded => r.spec.steps.len(),
        Phase::Shadow | Phase::RolledBack { .. } | Phase::Aborted { .. } => 0,
    };
    r.spec
        .steps
        .iter()
        .take(through)
        .filter_map(|s| s.cohort.clone())
        .collect()
}

/// Who a rollout's flags are on for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "on", rename_all = "snake_case")]
pub enum FlagState {
    /// Off for everyone; `disabled`: by a rollback or an abort (the circuit
    /// breaker tripped), not merely not yet on.
    Nobody { disabled: bool },
    /// On for the canary's users: the cohorts, and `weight` % of user keys.
    Canary { weight: u32, cohorts: Vec<Cohort> },
    /// On for everyone: the rollout succeeded.
    Everyone,
}

/// The flags' state in `r`'s phase (see [`super::flags`]' table).
pub fn flag_state(r: &Rollout) -> FlagState {
    match r.phase {
        Phase::Shadow => FlagState::Nobody { disabled: false },
        Phase::RolledBack { .. } | Phase::Aborted { .. } => FlagState::Nobody { disabled: true },
        Phase::Canary { .. } | Phase::AwaitingApproval { .. } => FlagState::Canary {
            weight: r.weight.min(100),
            cohorts: cohorts(r),
        },
        Phase::Succeeded => FlagState::Everyone,
    }
}

impl FlagState {
    /// A sentence for the audit log: `on for the canary (20 %, and x-user-group: internal)`.
    pub fn describe(&self) -> String {
        match self {
            FlagState::Nobody { .. } => "off".to_owned(),
            FlagState::Everyone => "on for everyone".to_owned(),
            FlagState::Canary { weight, cohorts } => {
                let mut parts = vec![format!("{weight} % of users")];
                parts.extend(cohorts.iter().map(ToString::to_string));
                format!("on for the canary ({})", parts.join(", "))
            }
        }
    }

    /// Whether the flag is on for some requests the canary serves: what the
    /// route's `x-understudy-flags` says on the canary branch.
    pub fn on_for_canary(&self) -> bool {
        !matches!(self, FlagState::Nobody { .. })
    }
}

/// The flags as `r`'s service's routes render them into
/// `x-understudy-flags`: on for the canary branch while anyone is on the
/// canary, on for stable too once the rollout succeeded (after finalize,
/// stable serves the new version). Written by the engine with the weight.
pub fn flag_header(r: &Rollout) -> FlagHeader {
    if r.spec.flags.is_empty() {
        // No flags, no header: the same value a service without any has.
        return FlagHeader::default();
    }
    let keys: Vec<String> = r.spec.flags.iter().map(|f| f.key.clone()).collect();
    let (canary, stable) = match flag_state(r) {
        FlagState::Nobody { .. } => (false, false),
        FlagState::Canary { .. } => (true, false),
        FlagState::Everyone => (true, true),
    };
    FlagHeader {
        keys,
        canary,
        stable,
    }
}

/// `flags off: new-checkout, beta-ui` when the flags' state differs
/// between `before` and `after` (for the transition's audit entry).
pub fn flag_change(before: &Rollout, after: &Rollout) -> Option<String> {
    if after.spec.flags.is_empty() {
        return None;
    }
    let (was, now) = (flag_state(before), flag_state(after));
    if was == now {
        return None;
    }
    let keys: Vec<&str> = after.spec.flags.iter().map(|f| f.key.as_str()).collect();
    Some(format!("flags {}: {}", now.describe(), keys.join(", ")))
}

/// The phase a spec's step `step` starts in.
pub fn enter_step(spec: &RolloutSpec, step: usize) -> Phase {
    match spec.steps.get(step) {
        Some(s) if s.manual_gate => Phase::AwaitingApproval { step },
        Some(_) => Phase::Canary { step },
        None => Phase::Succeeded,
    }
}

/// A new rollout, and its first transition (into the shadow stage or the
/// first step). `weight` is the canary weight the service had.
pub fn start(id: String, spec: RolloutSpec, actor: &str, weight: u32, now_ms: u64) -> Decision {
    let first = if spec.shadow.is_some() {
        Phase::Shadow
    } else {
        enter_step(&spec, 0)
    };
    let target = match first {
        Phase::Canary { step } => spec.steps.get(step).map_or(0, |s| s.weight),
        _ => 0,
    };
    let shadow = spec.shadow.as_ref().map(|_| first == Phase::Shadow);
    let snapshot = serde_json::json!({"spec": spec});
    let r = Rollout {
        id,
        spec,
        phase: Phase::Shadow,
        paused: false,
        created_ms: now_ms,
        created_by: actor.to_owned(),
        phase_started_ms: now_ms,
        weight,
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
    let step = Transition {
        to: first,
        weight: Some(target),
        shadow,
        reason: format!("created by {actor}"),
        actor: actor.to_owned(),
        snapshot,
    };
    transition(&r, step, "created", now_ms)
}

/// The rollout after `event` at `now_ms`, and what to carry out.
pub fn decide(r: &Rollout, event: Event, now_ms: u64) -> Result<Decision, NotApplicable> {
    match event {
        Event::Restarted => Ok(restarted(r)),
        Event::Verb { action, actor } => verb(r, action, &actor, now_ms),
        // Nothing happens after a terminal phase.
        _ if !r.phase.is_active() => Ok(Decision::unchanged(r)),
        Event::Rejected(what) => {
            let step = rollback(r, format!("halted: {what}"), ENGINE);
            Ok(transition(r, step, &r.phase.label(), now_ms))
        }
        Event::Found {
            weight,
            shadow,
            cohorts,
            flags,
        } => Ok(found(r, weight, shadow, cohorts, flags.as_ref(), now_ms)),
        // A paused rollout ignores verdicts; a gate opens only by a verb.
        Event::Judged(_) if r.paused || matches!(r.phase, Phase::AwaitingApproval { .. }) => {
            Ok(Decision::unchanged(r))
        }
        Event::Judged(judgement) => Ok(judged(r, judgement, now_ms)),
    }
}

fn judged(r: &Rollout, judgement: Judgement, now_ms: u64) -> Decision {
    let snapshot = serde_json::to_value(&judgement).unwrap_or_default();
    let verdict = judgement.verdict;
    let reason = judgement.reason.clone();
    let mut base = r.clone();
    base.last_judgement = Some(judgement);
    base.last_evaluated_ms = now_ms;
    let from = r.phase.label();
    match verdict {
        Verdict::Hold => Decision::unchanged(&base),
        Verdict::Rollback => {
            let mut step = rollback(&base, reason, ENGINE);
            step.snapshot = snapshot;
            transition(&base, step, &from, now_ms)
        }
        Verdict::Promote => {
            let mut step = advance(&base, reason, ENGINE);
            step.snapshot = snapshot;
            transition(&base, step, &from, now_ms)
        }
    }
}

fn verb(r: &Rollout, action: Action, actor: &str, now_ms: u64) -> Result<Decision, NotApplicable> {
    let from = r.phase.label();
    let refuse = || NotApplicable {
        id: r.id.clone(),
        phase: from.clone(),
        action,
    };
    if !r.phase.is_active() || action == Action::Finalize {
        return Err(refuse());
    }
    match action {
        Action::Pause | Action::Resume => {
            let pause = action == Action::Pause;
            if r.paused == pause {
                return Err(refuse());
            }
            let what = if pause { "paused" } else { "resumed" };
            let mut next = r.clone();
            next.paused = pause;
            next.marks.push(Mark {
                time_ms: now_ms,
                phase: what.to_owned(),
                weight: r.weight,
            });
            Ok(Decision {
                rollout: next,
                effects: vec![Effect::Audit(AuditEntry {
                    time_ms: now_ms,
                    from: from.clone(),
                    to: from,
                    actor: actor.to_owned(),
                    reason: format!("{what} by {actor}"),
                    snapshot: serde_json::Value::Null,
                })],
            })
        }
        Action::Promote => {
            let step = advance(r, format!("promoted by {actor}"), actor);
            Ok(transition(r, step, &from, now_ms))
        }
        Action::Abort => {
            let mut step = rollback(r, format!("aborted by {actor}"), actor);
            step.to = Phase::Aborted {
                reason: format!("aborted by {actor}"),
            };
            Ok(transition(r, step, &from, now_ms))
        }
        Action::Finalize => Err(refuse()),
    }
}

/// The desired state was changed outside the rollout: record what was
/// found and put back what the rollout holds.
fn found(
    r: &Rollout,
    weight: u32,
    shadow: Option<bool>,
    found_cohorts: Option<Vec<Cohort>>,
    found_flags: Option<&FlagHeader>,
    now_ms: u64,
) -> Decision {
    let want_shadow = r.spec.shadow.as_ref().map(|_| r.phase == Phase::Shadow);
    let want_cohorts = cohorts(r);
    let want_flags = flag_header(r);
    let weight_drift = weight != r.weight;
    let shadow_drift = shadow.is_some() && want_shadow.is_some() && shadow != want_shadow;
    let cohort_drift = found_cohorts.as_ref().is_some_and(|c| *c != want_cohorts);
    let flag_drift = found_flags.is_some_and(|f| *f != want_flags);
    if !weight_drift && !shadow_drift && !cohort_drift && !flag_drift {
        return Decision::unchanged(r);
    }
    let mut what = Vec::new();
    if weight_drift {
        what.push(format!(
            "canary weight {weight} in the desired state, not the rollout's {}",
            r.weight
        ));
    }
    if cohort_drift {
        let list = |c: &[Cohort]| {
            let names: Vec<String> = c.iter().map(ToString::to_string).collect();
            format!("[{}]", names.join(", "))
        };
        what.push(format!(
            "canary cohorts {} in the desired state, not the rollout's {}",
            list(found_cohorts.as_deref().unwrap_or_default()),
            list(&want_cohorts)
        ));
    }
    if flag_drift {
        let show = |f: &FlagHeader| {
            if f.is_empty() {
                "none".to_owned()
            } else {
                format!(
                    "{} (canary branch), {} (stable branch)",
                    f.value(true),
                    f.value(false)
                )
            }
        };
        what.push(format!(
            "flags header {} in the desired state, not the rollout's {}",
            found_flags.map_or_else(|| "none".to_owned(), show),
            show(&want_flags)
        ));
    }
    if shadow_drift {
        let on = |b: Option<bool>| if b == Some(true) { "on" } else { "off" };
        what.push(format!(
            "shadow {} on the stage's route, not {}",
            on(shadow),
            on(want_shadow)
        ));
    }
    let phase = r.phase.label();
    let mut next = r.clone();
    next.applied = false;
    let mut effects = vec![Effect::Audit(AuditEntry {
        time_ms: now_ms,
        from: phase.clone(),
        to: phase,
        actor: OUTSIDE.to_owned(),
        reason: format!(
            "found {} (changed outside the rollout: the state file edited, or a write that bypassed the API); restored",
            what.join(" and ")
        ),
        snapshot: serde_json::json!({
            "found": {"canary_weight": weight, "shadow": shadow, "canary_cohorts": found_cohorts, "flags": found_flags},
            "restored": {"canary_weight": r.weight, "shadow": want_shadow, "canary_cohorts": want_cohorts, "flags": want_flags},
        }),
    })];
    // The weight goes with the rollout's cohorts (the engine's `SetWeight`).
    effects.push(Effect::SetWeight(r.weight));
    if let Some(on) = want_shadow.filter(|_| shadow_drift) {
        effects.push(Effect::SetShadow(on));
    }
    Decision {
        rollout: next,
        effects,
    }
}

/// A restart: a decided transition not yet applied is applied again.
fn restarted(r: &Rollout) -> Decision {
    if r.applied {
        return Decision::unchanged(r);
    }
    let mut effects = vec![Effect::SetWeight(r.weight.min(100))];
    if r.spec.shadow.is_some() {
        effects.push(Effect::SetShadow(r.phase == Phase::Shadow));
    }
    Decision {
        rollout: r.clone(),
        effects,
    }
}

/// What one transition does besides changing the phase.
struct Transition {
    to: Phase,
    weight: Option<u32>,
    shadow: Option<bool>,
    reason: String,
    actor: String,
    snapshot: serde_json::Value,
}

fn rollback(r: &Rollout, reason: String, actor: &str) -> Transition {
    Transition {
        to: Phase::RolledBack {
            reason: reason.clone(),
        },
        weight: Some(0),
        shadow: r.spec.shadow.as_ref().map(|_| false),
        reason,
        actor: actor.to_owned(),
        snapshot: serde_json::Value::Null,
    }
}

/// The next phase after the current one passes (or is promoted by hand).
fn advance(r: &Rollout, reason: String, actor: &str) -> Transition {
    let (to, shadow) = match r.phase {
        Phase::Shadow => (enter_step(&r.spec, 0), Some(false)),
        Phase::Canary { step } => (enter_step(&r.spec, step + 1), None),
        // A manual promote opens the gate.
        Phase::AwaitingApproval { step } => (Phase::Canary { step }, None),
        ref other => (other.clone(), None),
    };
    let weight = match to {
        Phase::Canary { step } => r.spec.steps.get(step).map(|s| s.weight),
        _ => None,
    };
    Transition {
        to,
        weight,
        shadow,
        reason,
        actor: actor.to_owned(),
        snapshot: serde_json::Value::Null,
    }
}

fn transition(r: &Rollout, step: Transition, from: &str, now_ms: u64) -> Decision {
    let mut next = r.clone();
    if let Some(w) = step.weight {
        next.weight = w.min(100);
    }
    next.phase = step.to;
    next.phase_started_ms = now_ms;
    next.marks.push(Mark {
        time_ms: now_ms,
        phase: next.phase.label(),
        weight: next.weight,
    });
    next.applied = false;
    // The flags are derived from the phase: this transition is the one
    // that changes them, so its audit entry says so.
    let reason = match flag_change(r, &next) {
        Some(flags) => format!("{}; {flags}", step.reason),
        None => step.reason,
    };
    let mut effects = vec![
        Effect::Audit(AuditEntry {
            time_ms: now_ms,
            from: from.to_owned(),
            to: next.phase.label(),
            actor: step.actor,
            reason,
            snapshot: step.snapshot,
        }),
        // Always written, against the desired state: a rollback to 0 must
        // reach Envoy whatever the weight was, even if it "already" was 0
        // in this record.
        Effect::SetWeight(next.weight),
    ];
    if let Some(on) = step.shadow {
        effects.push(Effect::SetShadow(on));
    }
    Decision {
        rollout: next,
        effects,
    }
}

/// A succeeded rollout's finalize progress recorded, with its audit entry
/// (the traffic change itself is the engine's: it needs the service).
pub fn finalized(
    r: &Rollout,
    state: FinalizeState,
    actor: &str,
    reason: String,
    weight: u32,
    now_ms: u64,
) -> Decision {
    let to = match &state {
        FinalizeState::EmptyingCanary { .. } | FinalizeState::Done { .. } => "finalized",
        FinalizeState::Skipped { .. } => "not finalized",
    };
    let mut next = r.clone();
    next.weight = weight;
    if matches!(
        state,
        FinalizeState::EmptyingCanary { .. } | FinalizeState::Skipped { .. }
    ) || r.finalized.is_none()
    {
        next.marks.push(Mark {
            time_ms: now_ms,
            phase: to.to_owned(),
            weight,
        });
    }
    let snapshot = serde_json::json!({"finalize": state});
    next.finalized = Some(state);
    Decision {
        rollout: next,
        effects: vec![Effect::Audit(AuditEntry {
            time_ms: now_ms,
            from: r.phase.label(),
            to: to.to_owned(),
            actor: actor.to_owned(),
            reason,
            snapshot,
        })],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::judge::Verdict;
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000_000;

    fn spec(shadow: bool, gate_at: Option<usize>) -> RolloutSpec {
        let mut steps = vec![
            serde_json::json!({"weight": 5}),
            serde_json::json!({"weight": 50}),
            serde_json::json!({"weight": 100}),
        ];
        if let Some(i) = gate_at {
            steps[i]["manual_gate"] = serde_json::json!(true);
        }
        let mut s = serde_json::json!({
            "service": "shop", "owner": "team", "steps": steps,
            "stop_rules": {"max_error_rate_increase_pp": 1.0},
        });
        if shadow {
            s["shadow"] = serde_json::json!({"route": "all", "percent": 100,
                "max_serious_rate": 0.01, "max_unexpected_rate": 0.01});
            s["stop_rules"]["max_unexpected_mismatch_rate"] = serde_json::json!(0.01);
        }
        RolloutSpec::from_yaml_or_json(&s.to_string()).expect("valid spec")
    }

    fn started(shadow: bool, gate_at: Option<usize>) -> Rollout {
        let mut r = start("shop-1".into(), spec(shadow, gate_at), "ana", 0, T0).rollout;
        r.applied = true;
        r
    }

    fn verdict(v: Verdict) -> Event {
        Event::Judged(Judgement {
            verdict: v,
            reason: format!("{v:?}"),
            checks: Vec::new(),
            queries: Vec::new(),
        })
    }

    fn verb(action: Action) -> Event {
        Event::Verb {
            action,
            actor: "bob".into(),
        }
    }

    fn audits(d: &Decision) -> usize {
        d.audit().len()
    }

    fn weights(d: &Decision) -> Vec<u32> {
        d.effects
            .iter()
            .filter_map(|e| match e {
                Effect::SetWeight(w) => Some(*w),
                _ => None,
            })
            .collect()
    }

    fn step(r: &Rollout, e: Event) -> Decision {
        let mut d = decide(r, e, T0 + 1_000).expect("applies");
        d.rollout.applied = true;
        d
    }

    /// A started rollout whose first step sends the `x-user-group:
    /// internal` cohort, then `later` steps.
    fn cohort_rollout(later: serde_json::Value) -> Rollout {
        let mut steps = vec![
            serde_json::json!({"cohort": {"header": {"name": "x-user-group", "value": "internal"}}}),
        ];
        steps.extend(later.as_array().cloned().unwrap_or_default());
        let spec = RolloutSpec::from_yaml_or_json(
            &serde_json::json!({
                "service": "shop", "owner": "team",
                "stop_rules": {"max_error_rate_increase_pp": 1.0},
                "steps": steps,
            })
            .to_string(),
        )
        .unwrap();
        let mut r = start("shop-1".into(), spec, "ana", 0, T0).rollout;
        r.applied = true;
        r
    }

    #[test]
    fn cohorts_go_out_with_their_step_stay_and_go_with_a_rollback() {
        let internal = Cohort::Header {
            name: "x-user-group".into(),
            value: Some("internal".into()),
        };
        let r = cohort_rollout(serde_json::json!([
            {"weight": 20, "manual_gate": true},
            {"weight": 100},
        ]));
        assert_eq!((r.weight, cohorts(&r)), (0, vec![internal.clone()]));
        // Passing the cohort step: the gate holds, the cohort stays.
        let d = step(&r, verdict(Verdict::Promote));
        assert_eq!(d.rollout.phase, Phase::AwaitingApproval { step: 1 });
        assert_eq!(cohorts(&d.rollout), vec![internal.clone()]);
        let d = step(&d.rollout, verb(Action::Promote));
        assert_eq!(
            (d.rollout.weight, cohorts(&d.rollout)),
            (20, vec![internal.clone()])
        );
        // A rollback takes the weight and the cohort: the weight effect is
        // written, and the cohorts go with it.
        let d = step(&d.rollout, verdict(Verdict::Rollback));
        assert!(is_rollback(&d.rollout.phase));
        assert_eq!(weights(&d), [0]);
        assert!(cohorts(&d.rollout).is_empty());
        // No cohort in the shadow stage.
        let mut shadowed = started(true, None);
        assert!(cohorts(&shadowed).is_empty());
        shadowed.phase = Phase::Succeeded;
        assert!(
            cohorts(&shadowed).is_empty(),
            "the spec has no cohort steps"
        );
    }

    #[test]
    fn start_enters_the_shadow_stage_or_the_first_step_with_its_weight() {
        let d = start("shop-1".into(), spec(true, None), "ana", 7, T0);
        assert_eq!(d.rollout.phase, Phase::Shadow);
        assert_eq!(weights(&d), [0]);
        assert!(d.effects.contains(&Effect::SetShadow(true)));
        assert_eq!(audits(&d), 1);
        let d = start("shop-1".into(), spec(false, None), "ana", 7, T0);
        assert_eq!(d.rollout.phase, Phase::Canary { step: 0 });
        assert_eq!(weights(&d), [5]);
        assert!(!d.effects.iter().any(|e| matches!(e, Effect::SetShadow(_))));
        let d = start("shop-1".into(), spec(false, Some(0)), "ana", 7, T0);
        assert_eq!(d.rollout.phase, Phase::AwaitingApproval { step: 0 });
        assert_eq!(weights(&d), [0], "a gated first step sends nothing yet");
    }

    #[test]
    fn passing_steps_walk_the_ladder_to_success() {
        let mut r = started(true, None);
        let mut seen = Vec::new();
        while r.phase.is_active() {
            let d = step(&r, verdict(Verdict::Promote));
            assert_eq!(audits(&d), 1);
            seen.push((d.rollout.phase.label(), weights(&d)));
            r = d.rollout;
        }
        assert_eq!(
            seen,
            [
                ("canary step 1".to_owned(), vec![5]),
                ("canary step 2".to_owned(), vec![50]),
                ("canary step 3".to_owned(), vec![100]),
                ("succeeded".to_owned(), vec![100]),
            ]
        );
        assert_eq!(r.marks.len(), 5);
    }

    #[test]
    fn hold_changes_nothing_but_the_judgement() {
        for phase_r in [started(true, None), started(false, None)] {
            let d = step(&phase_r, verdict(Verdict::Hold));
            assert!(d.effects.is_empty());
            assert_eq!(d.rollout.phase, phase_r.phase);
            assert_eq!(d.rollout.last_evaluated_ms, T0 + 1_000);
            assert!(d.rollout.last_judgement.is_some());
        }
    }

    /// Every active phase rolls back to weight 0 with the shadow off.
    fn active_phases() -> Vec<Rollout> {
        let shadow = started(true, None);
        let canary = step(&shadow, verdict(Verdict::Promote)).rollout;
        let later = step(&canary, verdict(Verdict::Promote)).rollout;
        let gated = step(&started(false, Some(1)), verdict(Verdict::Promote)).rollout;
        assert_eq!(gated.phase, Phase::AwaitingApproval { step: 1 });
        vec![shadow, canary, later, gated]
    }

    #[test]
    fn rollback_abort_and_rejection_from_every_active_phase_set_weight_0() {
        for r in active_phases() {
            for (event, terminal) in [
                (verdict(Verdict::Rollback), "rolled_back"),
                (verb(Action::Abort), "aborted"),
                (
                    Event::Rejected("Envoy e1 rejected RDS".into()),
                    "rolled_back",
                ),
            ] {
                if matches!(r.phase, Phase::AwaitingApproval { .. })
                    && matches!(event, Event::Judged(_))
                {
                    // A gate is not judged: verdicts change nothing there.
                    assert!(step(&r, event).effects.is_empty());
                    continue;
                }
                let d = step(&r, event);
                assert_eq!(
                    d.rollout.phase.label(),
                    terminal,
                    "from {}",
                    r.phase.label()
                );
                assert_eq!(weights(&d), [0]);
                assert_eq!(d.rollout.weight, 0);
                assert!(d.is_rollback());
                if r.spec.shadow.is_some() {
                    assert!(d.effects.contains(&Effect::SetShadow(false)));
                }
                assert_eq!(audits(&d), 1);
            }
        }
    }

    #[test]
    fn a_manual_gate_waits_for_promote_and_then_sends_the_weight() {
        let r = step(&started(false, Some(1)), verdict(Verdict::Promote)).rollout;
        assert_eq!(r.weight, 5, "the gate keeps the previous step's weight");
        // A verdict does not open a gate.
        let d = step(&r, verdict(Verdict::Promote));
        assert_eq!(d.rollout, r);
        assert!(d.effects.is_empty());
        let d = step(&r, verb(Action::Promote));
        assert_eq!(d.rollout.phase, Phase::Canary { step: 1 });
        assert_eq!(weights(&d), [50]);
        let entry = &d.audit()[0];
        assert_eq!(entry.actor, "bob");
        assert_eq!(entry.reason, "promoted by bob");
    }

    #[test]
    fn pause_resume_and_promote_from_every_active_phase() {
        for r in active_phases() {
            let d = step(&r, verb(Action::Pause));
            assert!(d.rollout.paused);
            assert!(d.effects.iter().all(|e| matches!(e, Effect::Audit(_))));
            assert_eq!(audits(&d), 1);
            let paused = d.rollout;
            // A paused rollout ignores verdicts, even a rollback verdict.
            let ignored = step(&paused, verdict(Verdict::Rollback));
            assert_eq!(ignored.rollout, paused);
            assert!(ignored.effects.is_empty());
            assert!(decide(&paused, verb(Action::Pause), T0).is_err());
            let resumed = step(&paused, verb(Action::Resume)).rollout;
            assert!(!resumed.paused);
            assert!(decide(&resumed, verb(Action::Resume), T0).is_err());
            let promoted = step(&r, verb(Action::Promote));
            assert_ne!(promoted.rollout.phase, r.phase);
            assert_eq!(audits(&promoted), 1);
            // Abort still applies to a paused rollout.
            assert_eq!(
                step(&paused, verb(Action::Abort)).rollout.phase.label(),
                "aborted"
            );
        }
    }

    #[test]
    fn nothing_happens_after_a_terminal_phase() {
        let done = step(&started(false, None), verb(Action::Abort)).rollout;
        for e in [
            verdict(Verdict::Promote),
            verdict(Verdict::Rollback),
            Event::Rejected("x".into()),
            Event::Found {
                weight: 30,
                shadow: None,
                cohorts: None,
                flags: None,
            },
        ] {
            let d = step(&done, e);
            assert_eq!(d.rollout, done);
            assert!(d.effects.is_empty());
        }
        for a in [
            Action::Pause,
            Action::Resume,
            Action::Promote,
            Action::Abort,
            Action::Finalize,
        ] {
            assert!(decide(&done, verb(a), T0).is_err(), "{a:?}");
        }
    }

    #[test]
    fn a_weight_changed_outside_is_recorded_and_restored() {
        let r = started(true, None);
        let d = step(
            &r,
            Event::Found {
                weight: 30,
                shadow: Some(true),
                cohorts: None,
                flags: None,
            },
        );
        assert_eq!(weights(&d), [0]);
        assert_eq!(d.rollout.phase, Phase::Shadow);
        let entry = &d.audit()[0];
        assert_eq!(entry.actor, OUTSIDE);
        assert!(
            entry.reason.contains("canary weight 30"),
            "{}",
            entry.reason
        );
        assert_eq!(entry.snapshot["found"]["canary_weight"], 30);
        assert_eq!(entry.snapshot["restored"]["canary_weight"], 0);
        // The shadow turned off outside the rollout is turned on again.
        let d = step(
            &r,
            Event::Found {
                weight: 0,
                shadow: Some(false),
                cohorts: None,
                flags: None,
            },
        );
        assert!(d.effects.contains(&Effect::SetShadow(true)));
        // Nothing differs: nothing happens.
        let d = step(
            &r,
            Event::Found {
                weight: 0,
                shadow: Some(true),
                cohorts: None,
                flags: None,
            },
        );
        assert!(d.effects.is_empty());
    }

    #[test]
    fn cohorts_changed_outside_are_recorded_and_restored_with_the_weight() {
        let r = cohort_rollout(serde_json::json!([{"weight": 100}]));
        let held = cohorts(&r);
        let d = step(
            &r,
            Event::Found {
                weight: 0,
                shadow: None,
                cohorts: Some(Vec::new()),
                flags: None,
            },
        );
        assert_eq!(
            weights(&d),
            [0],
            "the weight effect writes the cohorts back"
        );
        assert_eq!(cohorts(&d.rollout), held);
        let entry = &d.audit()[0];
        assert_eq!(entry.actor, OUTSIDE);
        assert!(
            entry.reason.contains(
                "canary cohorts [] in the desired state, not the rollout's [x-user-group: internal]"
            ),
            "{}",
            entry.reason
        );
        // The same cohorts, or a router that keeps none: nothing happens.
        for found in [Some(held.clone()), None] {
            let d = step(
                &r,
                Event::Found {
                    weight: 0,
                    shadow: None,
                    cohorts: found,
                    flags: None,
                },
            );
            assert!(d.effects.is_empty());
        }
    }

    #[test]
    fn a_flags_header_changed_outside_is_recorded_and_restored_with_the_weight() {
        let mut r = cohort_rollout(serde_json::json!([{"weight": 100}]));
        r.spec.flags = vec![crate::rollout::spec::Flag {
            key: "new-checkout".into(),
            description: None,
        }];
        let want = flag_header(&r);
        assert!(want.canary && !want.stable, "{want:?}");
        let held = cohorts(&r);
        let d = step(
            &r,
            Event::Found {
                weight: 0,
                shadow: None,
                cohorts: Some(held.clone()),
                flags: Some(FlagHeader::default()),
            },
        );
        assert_eq!(weights(&d), [0], "the weight effect writes the flags back");
        let entry = &d.audit()[0];
        assert_eq!(entry.actor, OUTSIDE);
        assert!(
            entry.reason.contains(
                "flags header none in the desired state, not the rollout's new-checkout=on (canary branch), new-checkout=off (stable branch)"
            ),
            "{}",
            entry.reason
        );
        assert_eq!(
            entry.snapshot["restored"]["flags"]["keys"][0],
            "new-checkout"
        );
        // The same header, or a router that renders none: nothing happens.
        for found in [Some(want.clone()), None] {
            let d = step(
                &r,
                Event::Found {
                    weight: 0,
                    shadow: None,
                    cohorts: Some(held.clone()),
                    flags: found,
                },
            );
            assert!(d.effects.is_empty());
        }
    }

    #[test]
    fn a_restart_applies_an_unapplied_decision_again_and_nothing_else() {
        let r = started(true, None);
        let mut d = decide(&r, verdict(Verdict::Rollback), T0 + 5).expect("applies");
        assert!(!d.rollout.applied, "decided, not applied");
        let again = decide(&d.rollout, Event::Restarted, T0 + 9).expect("applies");
        assert_eq!(again.rollout, d.rollout);
        assert_eq!(weights(&again), [0]);
        assert!(again.effects.contains(&Effect::SetShadow(false)));
        assert_eq!(
            audits(&again),
            0,
            "the decision was audited when it was made"
        );
        d.rollout.applied = true;
        assert!(
            decide(&d.rollout, Event::Restarted, T0 + 9)
                .expect("applies")
                .effects
                .is_empty()
        );
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            prop_oneof![
                Just(Verdict::Promote),
                Just(Verdict::Hold),
                Just(Verdict::Rollback)
            ]
            .prop_map(verdict),
            prop_oneof![
                Just(Action::Pause),
                Just(Action::Resume),
                Just(Action::Promote),
                Just(Action::Abort),
                Just(Action::Finalize)
            ]
            .prop_map(verb),
            Just(Event::Rejected("nack".into())),
            (0u32..=100, proptest::option::of(any::<bool>())).prop_map(|(weight, shadow)| {
                Event::Found {
                    weight,
                    shadow,
                    cohorts: None,
                    flags: None,
                }
            }),
            Just(Event::Restarted),
        ]
    }

    proptest! {
        /// Over any sequence of events: weights stay in 0..=100; every
        /// phase change has exactly one audit entry; nothing happens after
        /// a terminal phase; a rollback always writes weight 0.
        #[test]
        fn prop_invariants_hold_over_any_event_sequence(
            shadow in any::<bool>(),
            gate in proptest::option::of(0usize..3),
            events in proptest::collection::vec(arb_event(), 0..40),
            applied_between in any::<bool>(),
        ) {
            let mut r = started(shadow, gate);
            for (i, e) in events.into_iter().enumerate() {
                let t = T0 + 1_000 * (i as u64 + 1);
                let terminal = !r.phase.is_active();
                let Ok(d) = decide(&r, e.clone(), t) else {
                    continue;
                };
                for w in weights(&d) {
                    prop_assert!(w <= 100);
                }
                prop_assert!(d.rollout.weight <= 100);
                if terminal && !matches!(e, Event::Restarted) {
                    prop_assert_eq!(&d.rollout, &r);
                    prop_assert!(d.effects.is_empty());
                }
                if d.rollout.phase != r.phase {
                    prop_assert_eq!(audits(&d), 1, "{:?} -> {:?}", r.phase, d.rollout.phase);
                }
                if d.moves_traffic() && !matches!(e, Event::Restarted) {
                    prop_assert!(audits(&d) >= 1);
                }
                if is_rollback(&d.rollout.phase) && !is_rollback(&r.phase) {
                    prop_assert_eq!(weights(&d), vec![0]);
                }
                r = d.rollout;
                if applied_between {
                    r.applied = true;
                }
            }
        }
    }
}
