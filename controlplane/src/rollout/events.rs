//! What a rollout tells the outside world: the events its webhooks receive
//! (spec `notifications`), and the port the engine hands them to.
//!
//! The engine derives events from a committed decision (a durable one: the
//! database transaction is done) and gives them to a [`Notifier`], which
//! must not block: delivery, retries and recording the outcome are the
//! notifier's (`crate::notify`). No HTTP here.

use serde::Serialize;

use super::machine::{AuditEntry, Phase, Rollout};
pub use super::spec::EventKind;
use super::spec::Webhook;

/// One event, with what a receiver needs to act on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutEvent {
    pub event: EventKind,
    pub rollout: String,
    pub service: String,
    pub owner: String,
    /// The phase after the event ("canary step 2", "rolled back", ...).
    pub phase: String,
    /// The canary's weight after the event.
    pub weight: u32,
    /// Who decided: the engine, or the API caller.
    pub actor: String,
    /// The decision's one sentence with its numbers.
    pub reason: String,
    /// Unix ms of the decision.
    pub at_ms: u64,
    /// Where it goes (the rollout's spec): not part of the body.
    #[serde(skip)]
    pub webhooks: Vec<Webhook>,
}

/// Takes events from the engine. `notify` is called on the engine's
/// decision path, so it must return at once (queue and deliver elsewhere).
pub trait Notifier: Send + Sync {
    fn notify(&self, event: RolloutEvent);
}

/// The events a committed decision amounts to: `Created` when the rollout
/// is new, then the phase it moved to, if it moved. Pausing and resuming
/// are not events (the audit log has them).
pub fn events_of(before: Option<&Rollout>, after: &Rollout) -> Vec<EventKind> {
    let mut out = Vec::new();
    if before.is_none() {
        out.push(EventKind::Created);
    }
    let moved = before.is_some_and(|b| b.phase != after.phase);
    if moved {
        let kind = match after.phase {
            Phase::Shadow => None,
            Phase::Canary { .. } => Some(EventKind::StepAdvanced),
            Phase::AwaitingApproval { .. } => Some(EventKind::AwaitingApproval),
            Phase::Succeeded => Some(EventKind::Succeeded),
            Phase::RolledBack { .. } => Some(EventKind::RolledBack),
            Phase::Aborted { .. } => Some(EventKind::Aborted),
        };
        out.extend(kind);
    }
    out
}

/// The events of a decision, addressed: only to webhooks that want them.
pub fn addressed(
    before: Option<&Rollout>,
    after: &Rollout,
    audit: &[AuditEntry],
    at_ms: u64,
) -> Vec<RolloutEvent> {
    if after.spec.notifications.is_empty() {
        return Vec::new();
    }
    let last = audit.last();
    events_of(before, after)
        .into_iter()
        .filter_map(|event| {
            let webhooks: Vec<Webhook> = after
                .spec
                .notifications
                .iter()
                .filter(|w| w.wants(event))
                .cloned()
                .collect();
            (!webhooks.is_empty()).then(|| RolloutEvent {
                event,
                rollout: after.id.clone(),
                service: after.spec.service.clone(),
                owner: after.spec.owner.clone(),
                phase: after.phase.label(),
                weight: after.weight,
                actor: last.map_or_else(String::new, |a| a.actor.clone()),
                reason: last.map_or_else(String::new, |a| a.reason.clone()),
                at_ms,
                webhooks,
            })
        })
        .collect()
}
