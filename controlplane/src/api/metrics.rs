//! `GET /metrics`: the control plane's own metrics in the Prometheus text
//! exposition format (0.0.4), for Prometheus to scrape.
//!
//! **It needs a bearer token; a viewer's is enough.** Argo Rollouts and
//! Flagger serve `/metrics` open, but on a port of their own inside the
//! cluster. Here it shares the API port, where everything but the probes
//! needs a token, and it names services, rollouts and how each is judged,
//! which the API only shows to callers it knows. Prometheus sends a token
//! with two lines of scrape config (`authorization: {credentials_file: ...}`,
//! see the README), a scrape a second is far below a caller's rate limit,
//! and a wrong token is throttled like any failed login. With
//! `--insecure-no-auth` it is open, like every other path.
//!
//! Besides the counters in [`crate::metrics::Metrics`], each scrape builds
//! these from their owners (nothing is copied or kept twice):
//!
//! | metric | labels | from |
//! |---|---|---|
//! | `understudy_rollouts` | `phase` | every stored rollout, by phase |
//! | `understudy_rollout_phase` | `rollout`, `service`, `phase` | 1 for the current phase |
//! | `understudy_rollout_canary_weight_percent` | `rollout`, `service` | the weight it applied |
//! | `understudy_rollout_verdict` | `rollout`, `service`, `verdict` | 1 for the last verdict (none before the first) |
//! | `understudy_rollout_check_status` | `rollout`, `service`, `check`, `status` | 1 for each check's last status |
//! | `understudy_rollout_check_threshold` | `rollout`, `service`, `check` | the limit, in the unit of the check |
//! | `understudy_rollout_check_measured` | `rollout`, `service`, `check`, `measure` | each number the check measured |
//! | `understudy_xds_connected_envoys` | | ADS streams open now |
//! | `understudy_shadow_report_batches_total` | | shadow report batches received |
//! | `understudy_shadow_pairs_compared_total` | | shadow pairs compared, from accepted batches |
//! | `understudy_shadow_dropped_total` | `reason` | `filter_queue_full` (records a filter dropped), `unknown_route` (refused) |
//! | `understudy_shadow_records_stored` | | mismatch records kept for replay |
//!
//! Per-rollout series cover each service's latest rollout only (the active
//! one, else the last to finish), so the number of series follows the
//! number of services, not every rollout ever stored; the phase totals
//! count them all. Checks per rollout and numbers per check are capped
//! ([`MAX_CHECKS`], [`MAX_MEASURES`]) and every label value is cut
//! ([`crate::metrics::label`]). Check values keep the units of their check
//! (percentage points, ratios, milliseconds, seconds, requests), which is
//! why those families carry no unit in their name.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ApiState;
use crate::metrics::{CONTENT_TYPE, MetricsError, Scrape, label};
use crate::rollout::engine::Phase;
use crate::rollout::judge::{CheckStatus, Verdict};
use crate::rollout::machine::Rollout;

/// Checks written per rollout; a judgement has a handful.
pub const MAX_CHECKS: usize = 32;
/// Measured numbers written per check.
pub const MAX_MEASURES: usize = 32;

pub(super) fn routes() -> axum::Router<ApiState> {
    axum::Router::new().route("/metrics", get(scrape))
}

async fn scrape(State(s): State<ApiState>) -> Response {
    match render(&s) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "GET /metrics failed");
            super::ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics_failed",
                "the metrics could not be written",
            )
            .into_response()
        }
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Promote => "promote",
        Verdict::Hold => "hold",
        Verdict::Rollback => "rollback",
    }
}

fn status_name(s: CheckStatus) -> &'static str {
    match s {
        CheckStatus::Pass => "pass",
        CheckStatus::Fail => "fail",
        CheckStatus::Insufficient => "insufficient",
    }
}

/// Each service's rollout to show: its active one, else its latest.
fn latest_per_service(all: &[Rollout]) -> Vec<&Rollout> {
    let mut by_service: BTreeMap<&str, &Rollout> = BTreeMap::new();
    for r in all {
        let key = (r.phase.is_active(), r.created_ms, r.id.as_str());
        by_service
            .entry(r.spec.service.as_str())
            .and_modify(|cur| {
                if key > (cur.phase.is_active(), cur.created_ms, cur.id.as_str()) {
                    *cur = r;
                }
            })
            .or_insert(r);
    }
    by_service.into_values().collect()
}

fn render(s: &ApiState) -> Result<String, MetricsError> {
    let scrape = Scrape::default();
    rollouts(&scrape, &s.engine.list())?;
    let connected = scrape.gauge(
        "understudy_xds_connected_envoys",
        "Envoys connected over ADS now (open streams).",
        &[],
    )?;
    connected
        .with_label_values(&[] as &[&str])
        .set(s.registry.envoys().len() as f64);
    shadow(&scrape, s)?;
    s.metrics.encode(scrape.families())
}

fn rollouts(scrape: &Scrape, all: &[Rollout]) -> Result<(), MetricsError> {
    let by_phase = scrape.gauge(
        "understudy_rollouts",
        "Stored rollouts by phase.",
        &["phase"],
    )?;
    for p in Phase::STATES {
        by_phase.with_label_values(&[p]).set(0.0);
    }
    for r in all {
        by_phase.with_label_values(&[r.phase.state()]).inc();
    }
    let phase = scrape.gauge(
        "understudy_rollout_phase",
        "1 for the phase each service's latest rollout is in.",
        &["rollout", "service", "phase"],
    )?;
    let weight = scrape.gauge(
        "understudy_rollout_canary_weight_percent",
        "The canary weight each service's latest rollout last applied, in percent of requests.",
        &["rollout", "service"],
    )?;
    let verdict = scrape.gauge(
        "understudy_rollout_verdict",
        "1 for the last verdict of each service's latest rollout (no series before its first).",
        &["rollout", "service", "verdict"],
    )?;
    let status = scrape.gauge(
        "understudy_rollout_check_status",
        "1 for each check's status in the last judgement (pass, fail, insufficient).",
        &["rollout", "service", "check", "status"],
    )?;
    let threshold = scrape.gauge(
        "understudy_rollout_check_threshold",
        "Each check's limit, in the unit of the check (percentage points, ratio, ms, s, requests).",
        &["rollout", "service", "check"],
    )?;
    let measured = scrape.gauge(
        "understudy_rollout_check_measured",
        "Each number a check measured (counts, rates, bounds, p-values), in the unit of the check.",
        &["rollout", "service", "check", "measure"],
    )?;
    for r in latest_per_service(all) {
        let (id, service) = (label(&r.id), label(&r.spec.service));
        for p in Phase::STATES {
            let on = p == r.phase.state();
            phase
                .with_label_values(&[id, service, p])
                .set(if on { 1.0 } else { 0.0 });
        }
        weight
            .with_label_values(&[id, service])
            .set(f64::from(r.weight));
        let Some(j) = &r.last_judgement else {
            continue;
        };
        for v in [Verdict::Promote, Verdict::Hold, Verdict::Rollback] {
            let on = v == j.verdict;
            verdict
                .with_label_values(&[id, service, verdict_name(v)])
                .set(if on { 1.0 } else { 0.0 });
        }
        for c in j.checks.iter().take(MAX_CHECKS) {
            let check = label(&c.name);
            for st in [
                CheckStatus::Pass,
                CheckStatus::Fail,
                CheckStatus::Insufficient,
            ] {
                let on = st == c.status;
                status
                    .with_label_values(&[id, service, check, status_name(st)])
                    .set(if on { 1.0 } else { 0.0 });
            }
            if let Some(t) = c.threshold.filter(|t| t.is_finite()) {
                threshold.with_label_values(&[id, service, check]).set(t);
            }
            for (name, v) in c.measured.iter().take(MAX_MEASURES) {
                if v.is_finite() {
                    measured
                        .with_label_values(&[id, service, check, label(name)])
                        .set(*v);
                }
            }
        }
    }
    Ok(())
}

fn shadow(scrape: &Scrape, s: &ApiState) -> Result<(), MetricsError> {
    let c = s.shadow.counts();
    scrape
        .counter(
            "understudy_shadow_report_batches_total",
            "Shadow comparison report batches received from filters.",
            &[],
        )?
        .with_label_values(&[] as &[&str])
        .inc_by(c.batches);
    scrape
        .counter(
            "understudy_shadow_pairs_compared_total",
            "Shadow pairs compared on accepted routes, live and calibration, as the filters reported them.",
            &[],
        )?
        .with_label_values(&[] as &[&str])
        .inc_by(c.pairs_compared);
    let dropped = scrape.counter(
        "understudy_shadow_dropped_total",
        "Shadow evidence lost: filter_queue_full (records a filter dropped, its queue full), unknown_route (records and counters refused: not a route of the filter config).",
        &["reason"],
    )?;
    dropped
        .with_label_values(&["filter_queue_full"])
        .inc_by(c.dropped_by_filters);
    dropped
        .with_label_values(&["unknown_route"])
        .inc_by(c.rejected);
    scrape
        .gauge(
            "understudy_shadow_records_stored",
            "Mismatch records kept now for inspection and replay.",
            &[],
        )?
        .with_label_values(&[] as &[&str])
        .set(c.records_stored as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One enum, one spelling: the label values are the API's serde names.
    #[test]
    fn label_values_are_the_serde_names() {
        let phases = [
            Phase::Shadow,
            Phase::Canary { step: 0 },
            Phase::AwaitingApproval { step: 0 },
            Phase::Succeeded,
            Phase::RolledBack { reason: "r".into() },
            Phase::Aborted { reason: "r".into() },
        ];
        for (p, name) in phases.iter().zip(Phase::STATES) {
            assert_eq!(serde_json::to_value(p).unwrap()["state"], name);
            assert_eq!(p.state(), name);
        }
        for v in [Verdict::Promote, Verdict::Hold, Verdict::Rollback] {
            assert_eq!(serde_json::to_value(v).unwrap(), verdict_name(v));
        }
        for c in [
            CheckStatus::Pass,
            CheckStatus::Fail,
            CheckStatus::Insufficient,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), status_name(c));
        }
    }
}
