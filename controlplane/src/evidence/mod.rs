//! Evidence: what the data plane measured, gathered by its sources, and the
//! port ([`EvidenceSource`]) a rollout reads it through.
//!
//! - [`envoy_stats`]: Envoy's stats stream (gRPC `MetricsService`):
//!   per-cluster requests, 5xx and latency histograms per Envoy and flush.
//! - [`prometheus`]: the same windows, and business metrics, read from a
//!   Prometheus server with `query_range`, for rollouts whose spec asks.
//! - [`shadow`]: the filter's shadow comparison reports: per-route counts,
//!   differing paths, stored samples, noise learned from A/A calibration.
//! - [`probes`]: synthetic probes' checks, schedule and results, and the
//!   [`probes::Prober`] port the engine drives the runner through.
//! - [`replay`]: replaying a stored sample against a cluster through Envoy.
//! - [`usage`]: the filter's report service (gRPC): per-tenant rate-limit
//!   usage, and the shadow batches handed to [`shadow`].
//! - [`shared`]: replicas: each ships its Envoys' stats to the database and
//!   builds the fleet's book from every replica's rows.
//!
//! Sources never import the rollout's types: the port's types live here,
//! and the rollout imports them. To add a source (Prometheus, say),
//! implement [`EvidenceSource`] for it and hand it to the engine in
//! [`crate::rollout::engine::Sources`]; nothing in the judge changes.

pub mod envoy_stats;
pub mod probes;
pub mod prometheus;
pub mod replay;
pub mod shadow;
pub mod shared;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use self::envoy_stats::MetricsBook;
use self::shadow::ShadowBook;

/// What one backend (stable or canary) did over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Requests completed (any status).
    pub requests: u64,
    /// Requests answered 5xx.
    pub errors: u64,
    /// Request latency as a histogram: `(upper bound in ms, count)` per
    /// bucket, NOT cumulative, bounds ascending; the last bound may be
    /// `f64::INFINITY`. Every bucket keeps its true bounds: an empty bucket
    /// is kept as `(bound, 0)` where it separates occupied ones. Counts sum
    /// to about `requests`.
    pub latency_ms: Vec<(f64, u64)>,
    /// Unix ms of the newest data in the window; `None`: no data ever, or a
    /// source that carries the backend went silent (see the source).
    pub last_update_ms: Option<u64>,
}

/// A shadow stage's comparison counts over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowEvidence {
    pub compared: u64,
    /// Pairs with a serious difference (after noise learning).
    pub serious: u64,
    /// Pairs with a difference no expected-divergence rule covers.
    pub unexpected: u64,
    /// Unix ms of the newest report; `None`: no data ever.
    pub last_update_ms: Option<u64>,
    /// The same counts per traffic segment (the route's `segment_by`), at
    /// most [`understudy_core::segment::MAX_SEGMENTS`] plus `other`; empty
    /// when the route does not segment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub segments: BTreeMap<String, PairCounts>,
}

/// A shadow segment's comparison counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairCounts {
    pub compared: u64,
    pub serious: u64,
    pub unexpected: u64,
}

/// A service's two sides over one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepWindows {
    pub stable: Evidence,
    pub canary: Evidence,
}

/// Requests and 5xx of one side since one point in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
}

/// A business metric's counts over a window: `events` out of `total`
/// (checkouts completed of started, tickets per request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub events: u64,
    pub total: u64,
}

/// One business metric (spec `metrics`), both sides, over a step's window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricEvidence {
    pub name: String,
    pub stable: Tally,
    pub canary: Tally,
    /// The older side's newest sample; `None`: no data.
    pub last_update_ms: Option<u64>,
}

/// Where a rollout's evidence comes from.
///
/// Both methods are cheap reads of what the source has already gathered
/// (the engine calls them every evaluation, under no lock of its own), and
/// neither may block on the network.
pub trait EvidenceSource: Send + Sync {
    /// What `service`'s stable and canary backends did from `since_ms` to
    /// `now_ms` (Unix ms). A backend the source knows nothing of is
    /// `Evidence::default()` (no data: the judge holds). `last_update_ms`
    /// must be the *oldest* of the fresh data's sources that carry the
    /// backend, so one silent reporter holds the step.
    fn step_windows(&self, service: &str, since_ms: u64, now_ms: u64) -> StepWindows;

    /// A shadow route's comparison counts since the source started (or the
    /// route was reset), with the newest report's time in
    /// `last_update_ms`. `None`: the source has no such route. The counts
    /// only grow, except that a restart or a reset starts them at 0 (the
    /// engine carries what it saw across that).
    fn shadow_pairs(&self, route: &str) -> Option<ShadowEvidence>;

    /// `(stable, canary)` counts from each of `starts_ms` (ascending,
    /// exclusive, by the data's arrival) to `now_ms`: the judge's restarted
    /// error-rate tests. One entry per start, in the same order.
    fn counts_since(&self, service: &str, starts_ms: &[u64], now_ms: u64) -> Vec<(Counts, Counts)>;

    /// Unix ms when the newest data on `service`'s stable or canary
    /// arrived. The engine looks again as soon as something newer arrives,
    /// rather than waiting for the rollout's `interval_s`. `None` (the
    /// default): the source can't tell, and the interval alone decides.
    fn newest_arrival_ms(&self, _service: &str) -> Option<u64> {
        None
    }
}

/// Which Envoy clusters carry a service's stable and canary traffic.
pub type Naming = Arc<dyn Fn(&str) -> crate::model::ClusterNames + Send + Sync>;

/// Today's source: Envoy's stats stream for the two sides, the filter's
/// reports for shadow pairs.
#[derive(Clone)]
pub struct EnvoyEvidence {
    pub metrics: Arc<MetricsBook>,
    pub shadow: Arc<ShadowBook>,
    /// The clusters a service's stats arrive under: `ClusterNames::of`
    /// (our ADS names) unless set with [`EnvoyEvidence::with_naming`], e.g.
    /// to `ClusterNames::istio` in an Istio mesh.
    pub naming: Naming,
}

impl EnvoyEvidence {
    /// Evidence under our own cluster names (`<service>-stable`/`-canary`).
    pub fn new(metrics: Arc<MetricsBook>, shadow: Arc<ShadowBook>) -> Self {
        Self {
            metrics,
            shadow,
            naming: Arc::new(crate::model::ClusterNames::of),
        }
    }

    /// The same evidence, read under other cluster names.
    pub fn with_naming(
        mut self,
        naming: impl Fn(&str) -> crate::model::ClusterNames + Send + Sync + 'static,
    ) -> Self {
        self.naming = Arc::new(naming);
        self
    }
}

impl std::fmt::Debug for EnvoyEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvoyEvidence").finish_non_exhaustive()
    }
}

impl EvidenceSource for EnvoyEvidence {
    fn step_windows(&self, service: &str, since_ms: u64, now_ms: u64) -> StepWindows {
        let names = (self.naming)(service);
        StepWindows {
            stable: self.metrics.window(&names.stable, since_ms, now_ms),
            canary: self.metrics.window(&names.canary, since_ms, now_ms),
        }
    }

    fn counts_since(&self, service: &str, starts_ms: &[u64], now_ms: u64) -> Vec<(Counts, Counts)> {
        let Some(&oldest) = starts_ms.first() else {
            return Vec::new();
        };
        let names = (self.naming)(service);
        // Each sample is summed into the newest start at or before its
        // arrival, then suffix-summed: one pass over each side's samples.
        let since = |cluster: &str| -> Vec<Counts> {
            let mut per = vec![Counts::default(); starts_ms.len()];
            for s in self.metrics.samples(cluster, oldest, now_ms) {
                let i = starts_ms.partition_point(|&start| start < s.at_ms);
                if let Some(slot) = i.checked_sub(1).and_then(|i| per.get_mut(i)) {
                    slot.requests = slot.requests.saturating_add(s.requests);
                    slot.errors = slot.errors.saturating_add(s.errors_5xx);
                }
            }
            for i in (0..per.len().saturating_sub(1)).rev() {
                let next = per[i + 1];
                per[i].requests = per[i].requests.saturating_add(next.requests);
                per[i].errors = per[i].errors.saturating_add(next.errors);
            }
            per
        };
        since(&names.stable)
            .into_iter()
            .zip(since(&names.canary))
            .collect()
    }

    fn newest_arrival_ms(&self, service: &str) -> Option<u64> {
        let names = (self.naming)(service);
        let stable = self.metrics.last_report_ms(&names.stable);
        let canary = self.metrics.last_report_ms(&names.canary);
        stable.max(canary)
    }

    fn shadow_pairs(&self, route: &str) -> Option<ShadowEvidence> {
        let summary = self
            .shadow
            .summaries()
            .into_iter()
            .find(|s| s.route == route)?;
        let segments = self.shadow.segment_counts(route);
        Some(ShadowEvidence {
            compared: summary.live.compared,
            serious: summary.live.mismatched_serious,
            unexpected: summary.live.unexpected,
            last_update_ms: Some(crate::time::unix_ms(summary.last_report)),
            segments,
        })
    }
}
