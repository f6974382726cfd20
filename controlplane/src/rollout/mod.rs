//! Canary rollouts that advance and roll back by themselves, on measured
//! evidence.
//!
//! - [`spec`]: the rollout spec as written (YAML or JSON) and its validation.
//! - [`engine`]: the persisted state machine that gathers evidence, asks the
//!   judge and moves the weights; [`store`]: where it persists; [`api`]: its
//!   HTTP endpoints.
//! - [`judge`]: the statistics: canary against stable over a step's window,
//!   with a verdict (promote, hold, rollback) and the numbers behind it.
//!
//! The types here are what the parts exchange: [`Evidence`] is what one
//! side (stable or canary) did over a window, as measured from Envoy's
//! metrics stream; [`ShadowEvidence`] is the shadow stage's comparison
//! counts from the filter's reports.

pub mod api;
pub mod engine;
pub mod judge;
pub mod spec;
pub mod store;

use serde::{Deserialize, Serialize};

/// What one backend (stable or canary) did over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Requests completed (any status).
    pub requests: u64,
    /// Requests answered 5xx.
    pub errors: u64,
    /// Request latency as a histogram: `(upper bound in ms, count)` per
    /// bucket, NOT cumulative, bounds ascending; the last bound may be
    /// `f64::INFINITY`. Counts sum to about `requests`.
    pub latency_ms: Vec<(f64, u64)>,
    /// Unix ms of the newest data in the window; `None`: no data ever.
    pub last_update_ms: Option<u64>,
}

/// The shadow stage's comparison counts over a window (from the filter's
/// reports, see [`crate::shadow`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowEvidence {
    pub compared: u64,
    /// Pairs with a serious difference (after noise learning).
    pub serious: u64,
    /// Pairs with a difference no expected-divergence rule covers.
    pub unexpected: u64,
    /// Unix ms of the newest report; `None`: no data ever.
    pub last_update_ms: Option<u64>,
}
