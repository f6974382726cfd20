//! Canary rollouts that advance and roll back by themselves, on measured
//! evidence. No HTTP here (the API is [`crate::api::rollouts`]) and no
//! source or router: the engine reads evidence through
//! [`crate::evidence::EvidenceSource`] and moves traffic through
//! [`crate::traffic::TrafficRouter`].
//!
//! - [`spec`]: the rollout spec as written (YAML or JSON) and its validation.
//! - [`machine`]: the state machine, pure: `decide(rollout, event, now)`
//!   gives the next rollout and the effects to carry out.
//! - [`judge`]: the statistics: canary against stable over a step's window,
//!   with a verdict (promote, hold, rollback) and the numbers behind it.
//! - [`engine`]: the shell around the machine: gathers evidence on a timer,
//!   turns verbs and NACKs into events, persists each decision, then
//!   applies its effects; [`store`]: where it persists.
//! - [`flags`]: circuit-breaker flags, derived from a rollout's phase
//!   (on for the canary's users, off after a rollback), and their
//!   evaluation for an OpenFeature context.
//! - [`events`]: the events a decision amounts to, for webhooks, and the
//!   [`events::Notifier`] port the engine hands them to.

pub mod engine;
pub mod events;
pub mod flags;
pub mod judge;
pub mod machine;
pub mod spec;
pub mod store;
