//! The Rollout page's chart data: both sides' requests per second, 5xx
//! rate and p50/p99 latency in time bins, read through the same
//! [`EvidenceSource`] port the judge reads, plus the release marks. Pure
//! apart from that read; time is an input.

use serde::Serialize;

use crate::evidence::{Evidence, EvidenceSource};
use crate::rollout::machine::AuditEntry;

/// Points per chart at most: the bin grows with the time shown.
pub const MAX_POINTS: u64 = 240;
/// The smallest bin: about one Envoy stats flush.
pub const MIN_BIN_MS: u64 = 1000;

/// One side's numbers per bin; `None` where the bin had no requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Side {
    pub rps: Vec<Option<f64>>,
    pub error_pct: Vec<Option<f64>>,
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

/// A vertical line at a transition, labelled with what and who.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleaseMark {
    /// Unix seconds.
    pub t: f64,
    pub label: String,
}

/// Everything the charts draw, on one time axis.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    /// Each bin's end, Unix seconds.
    pub t: Vec<f64>,
    pub stable: Side,
    pub canary: Side,
    pub marks: Vec<ReleaseMark>,
    /// The stop rules' limits, drawn as lines: `error_pct` on the canary's
    /// 5xx chart (stable's rate plus the allowed increase is per bin, so
    /// this is the absolute ceiling), `p99_ms` on the latency chart.
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Thresholds {
    /// Stable's 5xx rate plus the allowed increase, per bin.
    pub error_pct: Vec<Option<f64>>,
    /// Stable's p99 times the allowed ratio, per bin.
    pub p99_ms: Vec<Option<f64>>,
}

/// The stop rules the thresholds come from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub max_error_increase_pp: Option<f64>,
    pub max_p99_ratio: Option<f64>,
}

/// The `q` quantile (0..=1) of a non-cumulative histogram of
/// `(upper bound, count)`, interpolated inside its bucket; `None` when
/// empty. An open last bucket reports its lower bound.
pub fn quantile(hist: &[(f64, u64)], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().map(|&(_, c)| c).fold(0, u64::saturating_add);
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for &(upper, count) in hist {
        let next = below.saturating_add(count);
        if count > 0 && next as f64 >= rank {
            if !upper.is_finite() {
                return Some(lower);
            }
            let within = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        below = next;
        if upper.is_finite() {
            lower = upper;
        }
    }
    Some(lower)
}

fn push(side: &mut Side, e: &Evidence, bin_s: f64) {
    let any = e.requests > 0;
    side.rps.push(Some(e.requests as f64 / bin_s));
    side.error_pct
        .push(any.then(|| 100.0 * e.errors as f64 / e.requests as f64));
    side.p50_ms.push(quantile(&e.latency_ms, 0.5));
    side.p99_ms.push(quantile(&e.latency_ms, 0.99));
}

/// `service`'s two sides from `from_ms` to `now_ms` in at most
/// [`MAX_POINTS`] bins, with a mark at every transition in `audit`.
pub fn build(
    source: &dyn EvidenceSource,
    service: &str,
    from_ms: u64,
    now_ms: u64,
    audit: &[AuditEntry],
    limits: Limits,
) -> Series {
    let span = now_ms.saturating_sub(from_ms);
    let bin = span.div_ceil(MAX_POINTS).max(MIN_BIN_MS);
    let bins = span.div_ceil(bin).min(MAX_POINTS);
    let start = now_ms.saturating_sub(bins * bin);
    let bin_s = bin as f64 / 1000.0;
    let mut s = Series::default();
    for i in 0..bins {
        let lo = start + i * bin;
        let hi = lo + bin;
        let w = source.step_windows(service, lo, hi);
        s.t.push(hi as f64 / 1000.0);
        push(&mut s.stable, &w.stable, bin_s);
        push(&mut s.canary, &w.canary, bin_s);
        let stable_err = s.stable.error_pct.last().copied().flatten();
        s.thresholds.error_pct.push(
            limits
                .max_error_increase_pp
                .zip(stable_err)
                .map(|(pp, e)| e + pp),
        );
        let stable_p99 = s.stable.p99_ms.last().copied().flatten();
        s.thresholds
            .p99_ms
            .push(limits.max_p99_ratio.zip(stable_p99).map(|(r, p)| p * r));
    }
    s.marks = marks(audit, start);
    s
}

/// A mark per transition (an audit entry that changed the phase), at or
/// after `from_ms`, labelled "to · actor".
pub fn marks(audit: &[AuditEntry], from_ms: u64) -> Vec<ReleaseMark> {
    audit
        .iter()
        .filter(|a| a.from != a.to && a.time_ms >= from_ms)
        .map(|a| ReleaseMark {
            t: a.time_ms as f64 / 1000.0,
            label: format!("{} · {}", a.to, a.actor),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{Counts, ShadowEvidence, StepWindows};

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = [(10.0, 50), (20.0, 40), (100.0, 10)];
        assert_eq!(quantile(&h, 0.5), Some(10.0));
        assert_eq!(quantile(&h, 0.7), Some(15.0));
        assert!((quantile(&h, 0.99).unwrap() - 92.0).abs() < 1e-9);
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(5.0, 0)], 0.5), None);
        assert_eq!(quantile(&[(5.0, 1), (f64::INFINITY, 9)], 0.99), Some(5.0));
    }

    /// A source where each second since 0 carried `rate` requests per side,
    /// the canary failing 10% from `bad_from_ms`.
    struct Steady {
        bad_from_ms: u64,
    }

    impl EvidenceSource for Steady {
        fn step_windows(&self, _: &str, since: u64, now: u64) -> StepWindows {
            let secs = (now - since) / 1000;
            let side = |errors: u64| Evidence {
                requests: 100 * secs,
                errors,
                latency_ms: vec![(10.0, 99 * secs), (50.0, secs)],
                last_update_ms: Some(now),
            };
            let bad = if since >= self.bad_from_ms {
                10 * secs
            } else {
                0
            };
            StepWindows {
                stable: side(0),
                canary: side(bad),
            }
        }
        fn shadow_pairs(&self, _: &str) -> Option<ShadowEvidence> {
            None
        }
        fn counts_since(&self, _: &str, _: &[u64], _: u64) -> Vec<(Counts, Counts)> {
            Vec::new()
        }
    }

    fn entry(time_ms: u64, from: &str, to: &str, actor: &str) -> AuditEntry {
        AuditEntry {
            time_ms,
            from: from.into(),
            to: to.into(),
            actor: actor.into(),
            reason: String::new(),
            snapshot: serde_json::Value::Null,
        }
    }

    #[test]
    fn bins_cover_the_span_with_both_sides_and_the_marks() {
        let audit = [
            entry(10_000, "shadow", "canary 10%", "engine"),
            entry(20_000, "canary 10%", "canary 10%", "webhooks"),
            entry(30_000, "canary 10%", "rolled back", "engine"),
        ];
        let limits = Limits {
            max_error_increase_pp: Some(1.0),
            max_p99_ratio: Some(1.5),
        };
        let s = build(
            &Steady {
                bad_from_ms: 20_000,
            },
            "shop",
            0,
            40_000,
            &audit,
            limits,
        );
        assert_eq!(s.t.len(), 40, "one bin per second");
        assert_eq!(s.t[0], 1.0);
        assert_eq!(s.stable.rps[0], Some(100.0));
        assert_eq!(s.canary.error_pct[19], Some(0.0));
        assert_eq!(s.canary.error_pct[25], Some(10.0));
        assert_eq!(s.thresholds.error_pct[25], Some(1.0));
        // 99 of every 100 at or under 10 ms: p99 is the bucket's top.
        assert_eq!(s.stable.p99_ms[0], Some(10.0));
        assert_eq!(s.stable.p50_ms[0].map(|p| p < 10.0), Some(true));
        assert_eq!(s.thresholds.p99_ms[0], Some(15.0));
        let labels: Vec<_> = s.marks.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["canary 10% · engine", "rolled back · engine"]);
    }

    #[test]
    fn long_spans_are_capped_and_empty_bins_have_no_rates() {
        struct Empty;
        impl EvidenceSource for Empty {
            fn step_windows(&self, _: &str, _: u64, _: u64) -> StepWindows {
                StepWindows::default()
            }
            fn shadow_pairs(&self, _: &str) -> Option<ShadowEvidence> {
                None
            }
            fn counts_since(&self, _: &str, _: &[u64], _: u64) -> Vec<(Counts, Counts)> {
                Vec::new()
            }
        }
        let s = build(&Empty, "shop", 0, 86_400_000, &[], Limits::default());
        assert_eq!(s.t.len() as u64, MAX_POINTS);
        assert_eq!(s.canary.error_pct[0], None);
        assert_eq!(s.canary.rps[0], Some(0.0));
        assert!(s.thresholds.error_pct.iter().all(Option::is_none));
        let s = build(&Empty, "shop", 5_000, 5_000, &[], Limits::default());
        assert!(s.t.is_empty(), "no span, no bins");
    }
}
