//! The judge: canary against stable (or the shadow stage's comparison
//! counts) over a step's window, with a verdict and the numbers behind it.
//!
//! Pure functions: no I/O, no clock (the caller passes `now_ms`). The
//! engine calls [`judge`] or [`judge_shadow`] every `analysis.interval_s`
//! with the evidence gathered since the step started, and stores the
//! [`Judgement`] verbatim in the audit log.
//!
//! # Rules
//! - **No data is never healthy.** A side with no data, stale data (older
//!   than `analysis.max_staleness_s`), impossible data (more errors than
//!   requests) or fewer than `analysis.min_requests_per_side` requests gets
//!   no statistical verdict at all: the judgement is Hold, with a reason
//!   saying which. A malformed latency histogram holds the latency checks.
//!   Every hold says what it waits for (see Minimums).
//! - Verdicts combine as: any check failed → Rollback; else any check short
//!   of data or time → Hold; else Promote.
//! - Promotion of a canary step needs the step's minimum duration and
//!   requests and no significant evidence of harm, not demonstrated
//!   equivalence (that would take thousands of requests per step at 1%
//!   weight). The upper confidence bounds are reported, so an operator sees
//!   how much a step has actually shown.
//! - At weight 100 stable serves nothing, so there is nothing to compare
//!   with: the step is a bake period. It passes on fresh canary data, its
//!   minimum duration and requests; the stop rules cannot fire there.
//!
//! # Why sequential tests
//! The engine looks every second. A plain z-test at level α repeated at
//! every look rejects a true null far more often than α: the running
//! z-statistic of an identical canary wanders, and over 120 looks it
//! crosses a fixed 2.33 several times more often than 1 run in 100 (with
//! unlimited looks, eventually always: law of the iterated logarithm).
//! Every test here is instead an *e-process*: a statistic whose chance of
//! *ever* exceeding 1/α, over any number of looks, is at most α when the
//! null holds (Ville's inequality). The engine may look as often as it
//! likes and stop whenever it likes; the judge needs no memory of earlier
//! looks. Shown p-values are `min(1, 1/E)` ("always valid"), and confidence
//! bounds are the inverted tests (confidence sequences).
//!
//! - **Error rate** (`error_rate`): H0: `p_canary − p_stable ≤ margin`
//!   (`stop_rules.max_error_rate_increase_pp`). The statistic is the
//!   mixture sequential probability ratio test (mSPRT: Robbins; Johari,
//!   Pekelis & Walsh, "Always valid inference") on `p̂_c − p̂_s − margin`,
//!   mixing over a half-normal prior (scale 3 pp) on increases beyond the
//!   margin, with the variance taken at the null's best fit on the boundary
//!   `p_c = p_s + margin` (the Farrington–Manning score variance). That
//!   variance is what the estimate has if the null is true, it never
//!   vanishes when a side has no errors yet, and it keeps small counts
//!   honest. Rollback when the evidence reaches 1/α: significant evidence
//!   that the increase exceeds the margin.
//! - **Error rate, restarted** (the engine's [`judge_with_restarts`]): a
//!   step is judged on everything since it started, so a regression that
//!   begins mid-step is diluted by the healthy requests before it (10 s of
//!   healthy traffic took +5 pp from 5 s to 10 s in simulation). The test
//!   is therefore a *mixture* of e-processes: the whole window's, weight
//!   ½, and one started afresh at every restart point (every
//!   [`RESTART_EVERY_MS`] of the step's evidence), weights following the
//!   density `A/(s+A)²` over start time `s` (A = 10 s) and summing to ½.
//!   Each is an e-process under H0 from its own start (1 before it), so the
//!   weighted sum is too, and Ville's inequality holds for the sum: the
//!   test stays anytime-valid over the whole step, at the price of ln 2 of
//!   evidence when the regression is there from the start, and
//!   `ln(1/weight)` for one that starts later (about 3–4 nats 10 s in,
//!   partly won back because neighbouring restarts add up). Restarts with
//!   fewer than `min_requests_per_side` requests on a side, and all but the
//!   newest [`MAX_RESTARTS`], count as 0: leaving terms out only lowers the
//!   sum. Measured in the seeded simulation (100 req/s per side, 10 s
//!   healthy first, looks after every 1 s flush): +5 pp caught 7 s after it
//!   starts instead of 10 s (median; 90th percentile 11 s instead of 14 s),
//!   +2 pp against a 0 pp margin in 13 s instead of 15 s. Latency rules are judged
//!   on the whole window (a tail regression shows at once in the exact
//!   test's count, see below).
//! - **Latency quantiles** (`p99_latency`, and `p50_latency`,
//!   `p90_latency`, `p99.9_latency` when the spec sets them): H0: `q_c ≤
//!   max(R × q_s, q_s + min_p99_increase_ms)`, R = `stop_rules.max_p99_ratio`
//!   (or the quantile's own ratio). Two tests, each at half the rule's α;
//!   the check fails when either rejects:
//!   - the **exact tail test**, valid at any sample size: stable's quantile
//!     is bounded from above at a bucket bound `U` (the first bound at which
//!     "at least 1% of stable's samples are above it" is rejected by a
//!     Beta-mixture e-value at α/4: an anytime confidence bound that needs
//!     no interpolation), and the canary's count in buckets *wholly above*
//!     `L = max(R U, U + min_p99_increase_ms)` is tested against "at most
//!     1% of canary requests are slower than L" with a Beta-mixture e-value
//!     at α/4 (the shadow stage's one-sample test). Stable usually has many
//!     samples, so its bound is tight; the canary needs none in particular:
//!     15 of 300 slow samples roll issue 11's tail back. Why it is valid:
//!     [`exact_tail`].
//!   - the **interpolated test**, from 500 samples per side (for a p99; see
//!     Minimums): `q_c = R q_s` exactly when 1% of canary requests are
//!     slower than `R × q_s`, so the test is on the canary's share above `R
//!     × q̂_s` minus 1%, with an mSPRT. Its variance has two parts: the
//!     canary's binomial share, and stable's p99 estimate moving the limit
//!     (delta method: `(ρ² / n_s) · 1% · 99%`, ρ the ratio of the canary's to
//!     stable's density per log-latency at their p99s, 1 when canary is
//!     stable scaled, floored at 1), plus a term for the interpolation's own
//!     error. Histograms are interpolated linearly in probit–log
//!     coordinates, exact for log-normal latencies, where linear
//!     interpolation misplaces a p99 badly in Envoy's wide tail buckets.
//!     This test sees a limit that falls inside a wide bucket (×2 on a
//!     log-normal in Envoy's default 100–250 ms bucket), which the exact test
//!     only sees once samples cross a bound.
//!
//!   Mann–Whitney was not used: it tests a shift of the whole distribution,
//!   the stop rule is the tail.
//! - **Slow share** (`slow_share`): the error-rate test with "slower than
//!   `slow_request_ms`" in place of 5xx, on buckets wholly above it (exact
//!   when `slow_request_ms` is a bucket bound, conservative otherwise), on
//!   the whole window.
//!
//! # Exact at bucket edges, conservative inside a bucket
//! Envoy's histogram proves only how many samples fell in each bucket
//! `(lo, hi]`. So:
//! - **Counts above a limit** (exact tail test, slow share) are exact when
//!   the limit is a bucket bound; when it falls inside a bucket, that
//!   bucket's samples are left out. The count is then *at most* the true
//!   number above the limit, and the e-value grows with the count, so the
//!   test can only lose power, never reject more often: conservative
//!   towards the canary (no false rollback from the bucketing).
//! - **Stable's quantile bound** is a bucket bound, never interpolated, and
//!   at least the true quantile (with its confidence): the limit it sets is
//!   at least the true limit. Conservative towards the canary again.
//! - **Quantile estimates** (the numbers shown) are exact when the quantile
//!   is a bucket edge (the CDF at every bound is counted, not estimated)
//!   and always lie in the bucket that holds the true quantile, which the
//!   verdict shows beside them (`in (80, 100 ms]`); inside a bucket the
//!   position is interpolated (probit–log), an estimate with no direction.
//!   The interpolated test uses these, which is why it carries an
//!   interpolation error term and needs 500 samples, and why the exact test
//!   stands beside it.
//!
//! # Minimums (every one)
//! - `analysis.min_requests_per_side` (spec; default 100): fewer requests on
//!   a side, no statistical verdict: hold, "not enough data: canary has 37
//!   of 100 requests". Restarted error-rate windows need it too.
//! - Exact tail test: stable needs enough latency samples to bound its
//!   quantile: with none above a bound, `samples_to_bound` (about 800 for a
//!   p99 at 99% confidence, 8,000 for a p99.9, 30 for a p50); with some above
//!   it, more. Until then it holds: "exact: waiting for stable latency
//!   samples to bound its p99: 120 of 812". The canary needs at least one.
//! - Interpolated test: `MIN_TAIL_SAMPLES / tail` samples per side (5 above
//!   the quantile: 500 for a p99, 5,000 for a p99.9, 10 for a p50); below
//!   it, simulated canaries exactly at the allowed ratio were rolled back
//!   several times too often. Until then the check says so
//!   ("interpolated: waiting for latency samples: stable 1200 and canary 120
//!   of 500 each") and rests on the exact test.
//! - A latency check passes when at least one of its tests ran and none
//!   rejected; it holds when neither could run.
//! - `steps[].min_duration_s` and `steps[].min_requests` (canary requests):
//!   a step promotes only after both ("step has run 3.2 of 60 s", "canary
//!   has served 37 of the step's 200 requests").
//! - The step's evidence starts one stats flush (the engine's
//!   `FLUSH_SETTLE_MS`, 1 s) after the step.
//!
//! - **Shadow stage**: one-sample tests, exact at any sample size:
//!   e-values `E = ∫L dπ / sup_{H0} L` with a fixed mixture of Beta priors
//!   π, whose numerator is closed-form in the counts ("universal
//!   inference", Wasserman, Ramdas & Balakrishnan; for any null θ0,
//!   `E ≤ ∫L dπ / L(θ0)`, a martingale of mean 1). Rollback when the
//!   unexpected-mismatch rate is significantly above
//!   `stop_rules.max_unexpected_mismatch_rate`; pass only when the serious
//!   and unexpected rates are *shown* at or below the stage's maxima (their
//!   anytime upper bounds are), after `min_duration_s` and `min_compared`:
//!   an upper bound, not the observed rate, so that holding and looking
//!   again until the observed rate happens to dip cannot pass a stage.
//!   The two-sample canary tests do not use this form: there the prior's
//!   spread over stable's rate costs as much evidence again, and the +5 pp
//!   regression took twice as long to catch.
//! - **Worst segment** (`shadow.per_segment`): the same one-sample test
//!   as the unexpected-mismatch stop rule, run on each traffic segment
//!   with at least `per_segment.min_compared` pairs, at α divided by the
//!   number of segments tested (Bonferroni: with up to 33 segments, a
//!   per-segment α would make a false rollback of a good version up to 33
//!   times likelier). One segment significantly above
//!   `per_segment.max_unexpected_rate` rolls back, and the verdict names it
//!   with its numbers and the route's average; `other` (segments beyond the
//!   cap) is tested like any segment. A route that reports no segments
//!   holds the stage: the gate asked for cannot be checked.
//! - **α**: `1 − analysis.confidence`, for each stop rule: a step that
//!   checks both error rate and p99 can roll back a canary that is no
//!   worse than stable with chance up to 2α.
//!
//! The canary tests rest on normal approximations and on interpolated
//! histograms, so their calibration was measured by a one-off seeded simulation (the
//! asserted tests below run 200-run versions of the same scenarios): canaries
//! *exactly at* the allowed margin or ratio, looked at every second for
//! 120 s, 1,000 runs per case, were rolled back in 0.4–1.3% of runs for
//! error rates (0.1% to 5% base rates, 10 to 50 canary requests/s) and
//! 0.1–1.3% for p99 (log-normal σ 0.25 to 0.8) at a nominal 1%; identical
//! canaries, never.
//!
//! Modelling assumption, as in any such test: requests are independent
//! draws within the window. Shared causes (a bad dependency hitting both
//! sides) affect both alike and cancel in the comparison.
//!
//! `libm` provides `lgamma` and `erfc`: the Rust project's own port of
//! musl's libm, dependency-free and well kept. `statrs` was not needed: the
//! normal CDF is `erfc`, and its inverse a bisection.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::spec::{
    Analysis, CanaryStep, MetricLimit, MetricRule, Probes, SegmentGate, ShadowStage, StopRules,
};
use crate::evidence::probes::{ProbeTally, Side};
use crate::evidence::{Evidence, MetricEvidence, PairCounts, ShadowEvidence};

/// What the engine should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every check passed: go to the next step.
    Promote,
    /// Not enough data, time or evidence yet: stay, look again.
    Hold,
    /// A stop rule fired: take the canary out.
    Rollback,
}

/// One check's own outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    /// A stop rule fired.
    Fail,
    /// Not enough (or no usable) data, or time, to pass.
    Insufficient,
}

/// One check with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// `data`, `sample_size`, `error_rate`, `p99_latency`, `step_duration`,
    /// `step_requests`; shadow: `unexpected_mismatch_rate`,
    /// `serious_mismatch_rate`, `stage_duration`, `compared`.
    pub name: String,
    pub status: CheckStatus,
    /// One sentence with the numbers.
    pub detail: String,
    /// The limit the check compares against, in the unit of its name
    /// (percentage points, ratio, fraction, seconds, requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Measured numbers by name: counts, rates, bounds, p-values (finite only).
    #[serde(default)]
    pub measured: BTreeMap<String, f64>,
}

/// A verdict, the sentence that explains it, and every check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub verdict: Verdict,
    /// The failing checks' details for a Rollback, the short ones' for a
    /// Hold, all of them for a Promote.
    pub reason: String,
    pub checks: Vec<Check>,
    /// The queries the evidence was read with (Prometheus evidence), and
    /// the source's last error if it had one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<String>,
}

impl Check {
    fn new(name: &str, status: CheckStatus, detail: String) -> Self {
        Self {
            name: name.to_owned(),
            status,
            detail,
            threshold: None,
            measured: BTreeMap::new(),
        }
    }

    fn threshold(mut self, t: f64) -> Self {
        self.threshold = t.is_finite().then_some(t);
        self
    }

    /// Records a number; non-finite ones are left out so the judgement
    /// always serializes to JSON and back.
    fn put(&mut self, key: &str, value: f64) {
        if value.is_finite() {
            self.measured.insert(key.to_owned(), value);
        }
    }

    fn put_opt(&mut self, key: &str, value: Option<f64>) {
        if let Some(v) = value {
            self.put(key, v);
        }
    }
}

/// Judges one canary step: `stable` and `canary` are each side's evidence
/// since `step_started_ms`. The error-rate test runs on the whole window
/// only; the engine uses [`judge_with_restarts`].
pub fn judge(
    rules: &StopRules,
    analysis: &Analysis,
    step: &CanaryStep,
    stable: &Evidence,
    canary: &Evidence,
    now_ms: u64,
    step_started_ms: u64,
) -> Judgement {
    judge_inner(
        rules,
        analysis,
        step,
        stable,
        canary,
        None,
        now_ms,
        step_started_ms,
    )
}

/// [`judge`], with the error-rate test also restarted at the step's
/// [`restart_points`]: `restarts` holds the counts since each (see
/// "Restarts" in the module docs). Restarts that are not on the grid
/// (index 0), repeated, or beyond [`MAX_RESTARTS`] are ignored.
#[allow(clippy::too_many_arguments)]
pub fn judge_with_restarts(
    rules: &StopRules,
    analysis: &Analysis,
    step: &CanaryStep,
    stable: &Evidence,
    canary: &Evidence,
    restarts: &[Restart],
    now_ms: u64,
    step_started_ms: u64,
) -> Judgement {
    judge_inner(
        rules,
        analysis,
        step,
        stable,
        canary,
        Some(restarts),
        now_ms,
        step_started_ms,
    )
}

#[allow(clippy::too_many_arguments)]
fn judge_inner(
    rules: &StopRules,
    analysis: &Analysis,
    step: &CanaryStep,
    stable: &Evidence,
    canary: &Evidence,
    restarts: Option<&[Restart]>,
    now_ms: u64,
    step_started_ms: u64,
) -> Judgement {
    // At weight 100 stable has no traffic: nothing to compare against.
    let baseline = step.weight < 100;
    let mut sides: Vec<(&str, &Evidence)> = Vec::with_capacity(2);
    if baseline {
        sides.push(("stable", stable));
    }
    sides.push(("canary", canary));

    let mut checks = vec![data_check(analysis, &sides, now_ms)];
    if checks.iter().all(|c| c.status == CheckStatus::Pass) {
        checks.push(sample_check(analysis, &sides));
    }
    if checks.iter().any(|c| c.status != CheckStatus::Pass) {
        return finish(checks);
    }

    if baseline {
        let alpha = analysis.alpha();
        if let Some(pp) = rules.max_error_rate_increase_pp {
            checks.push(error_rate_check(
                pp,
                alpha,
                stable,
                canary,
                restarts,
                analysis.min_requests_per_side,
            ));
        }
        if let Some(ratio) = rules.max_p99_ratio {
            checks.push(latency_check(
                P99,
                ratio,
                rules.min_p99_increase_ms,
                alpha,
                stable,
                canary,
            ));
        }
        let more = &rules.latency;
        for (label, tail, ratio) in [
            ("p50", 0.5, more.max_p50_ratio),
            ("p90", 0.1, more.max_p90_ratio),
            ("p99.9", 0.001, more.max_p999_ratio),
        ] {
            if let Some(ratio) = ratio {
                checks.push(latency_check(
                    Quantile { label, tail },
                    ratio,
                    rules.min_p99_increase_ms,
                    alpha,
                    stable,
                    canary,
                ));
            }
        }
        if let (Some(slow_ms), Some(pp)) = (more.slow_request_ms, more.max_slow_share_increase_pp) {
            checks.push(slow_share_check(slow_ms, pp, alpha, stable, canary));
        }
    }

    let elapsed_s = now_ms.saturating_sub(step_started_ms) as f64 / 1000.0;
    checks.push(duration_check(
        "step_duration",
        "step",
        elapsed_s,
        step.min_duration_s,
    ));
    let mut requests = if canary.requests >= step.min_requests {
        Check::new(
            "step_requests",
            CheckStatus::Pass,
            format!(
                "canary served {} requests (minimum {})",
                canary.requests, step.min_requests
            ),
        )
    } else {
        Check::new(
            "step_requests",
            CheckStatus::Insufficient,
            format!(
                "canary has served {} of the step's {} requests",
                canary.requests, step.min_requests
            ),
        )
    }
    .threshold(step.min_requests as f64);
    requests.put("canary_requests", canary.requests as f64);
    checks.push(requests);
    if !baseline {
        let mut bake = Check::new(
            "baseline",
            CheckStatus::Pass,
            "weight 100: stable serves nothing to compare with, so this step only bakes".to_owned(),
        );
        bake.put("weight", f64::from(step.weight));
        checks.push(bake);
    }
    finish(checks)
}

/// Judges the shadow stage from the comparison counts since
/// `stage_started_ms`.
pub fn judge_shadow(
    stage: &ShadowStage,
    rules: &StopRules,
    analysis: &Analysis,
    shadow: &ShadowEvidence,
    now_ms: u64,
    stage_started_ms: u64,
) -> Judgement {
    let mut data = shadow_data_check(analysis, shadow, now_ms);
    let mut checks = Vec::new();
    if data.status == CheckStatus::Pass && shadow.compared < analysis.min_requests_per_side {
        data = Check::new(
            "sample_size",
            CheckStatus::Insufficient,
            format!(
                "not enough data (shadow {} of {} compared pairs)",
                shadow.compared, analysis.min_requests_per_side
            ),
        )
        .threshold(analysis.min_requests_per_side as f64);
        data.put("compared", shadow.compared as f64);
    }
    let usable = data.status == CheckStatus::Pass;
    checks.push(data);
    if !usable {
        return finish(checks);
    }

    let alpha = analysis.alpha();
    let thr = (1.0 / alpha).ln();
    let n = shadow.compared as f64;

    // The stop rule: unexpected mismatches significantly above the maximum.
    let stop = rules
        .max_unexpected_mismatch_rate
        .unwrap_or(stage.max_unexpected_rate);
    let k_unexpected = shadow.unexpected as f64;
    let prior = stats::Prior::around(stop);
    let ln_e = stats::ln_e_above(&prior, k_unexpected, n, stop);
    let lower = stats::rate_lower_bound(&prior, k_unexpected, n, thr);
    let rate = k_unexpected / n;
    let p = p_value(ln_e);
    let mut c = if ln_e >= thr {
        Check::new(
            "unexpected_mismatch_rate",
            CheckStatus::Fail,
            format!(
                "shadow unexpected mismatches {} of {} pairs ({}, at least {} at {} confidence > {} allowed; p = {} < {})",
                shadow.unexpected,
                shadow.compared,
                pct(rate),
                pct(lower),
                conf(alpha),
                pct(stop),
                fmt_p(p),
                fmt_p(alpha)
            ),
        )
    } else {
        Check::new(
            "unexpected_mismatch_rate",
            CheckStatus::Pass,
            format!(
                "shadow unexpected mismatches {} of {} pairs ({}; not significantly above {}, p = {})",
                shadow.unexpected,
                shadow.compared,
                pct(rate),
                pct(stop),
                fmt_p(p)
            ),
        )
    }
    .threshold(stop);
    c.put("compared", n);
    c.put("unexpected", k_unexpected);
    c.put("rate", rate);
    c.put("lower_bound", lower);
    c.put("p_value", p);
    c.put("alpha", alpha);
    checks.push(c);

    if let Some(gate) = &stage.per_segment {
        checks.push(segment_check(gate, shadow, alpha));
    }

    // The stage's gates: each rate shown (upper bound) at or below its maximum.
    for (name, what, k, max) in [
        (
            "serious_mismatch_rate",
            "serious",
            shadow.serious,
            stage.max_serious_rate,
        ),
        (
            "unexpected_mismatch_gate",
            "unexpected",
            shadow.unexpected,
            stage.max_unexpected_rate,
        ),
    ] {
        let k = k as f64;
        let prior = stats::Prior::around(max);
        let upper = stats::rate_upper_bound(&prior, k, n, thr);
        let shown = stats::ln_e_below(&prior, k, n, max) >= thr;
        let status = if shown {
            CheckStatus::Pass
        } else {
            CheckStatus::Insufficient
        };
        let bound = upper.map_or_else(|| "100%".to_owned(), pct);
        let detail = if shown {
            format!(
                "shadow {what} mismatches {} of {} pairs ({}, at most {bound} at {} confidence ≤ {} allowed)",
                k,
                shadow.compared,
                pct(k / n),
                conf(alpha),
                pct(max)
            )
        } else {
            format!(
                "shadow {what} mismatches {} of {} pairs ({}, up to {bound} at {} confidence): not yet shown ≤ {}",
                k,
                shadow.compared,
                pct(k / n),
                conf(alpha),
                pct(max)
            )
        };
        let mut c = Check::new(name, status, detail).threshold(max);
        c.put("compared", n);
        c.put(what, k);
        c.put("rate", k / n);
        c.put_opt("upper_bound", upper);
        checks.push(c);
    }

    let elapsed_s = now_ms.saturating_sub(stage_started_ms) as f64 / 1000.0;
    checks.push(duration_check(
        "stage_duration",
        "shadow stage",
        elapsed_s,
        stage.min_duration_s,
    ));
    let mut compared = if shadow.compared >= stage.min_compared {
        Check::new(
            "compared",
            CheckStatus::Pass,
            format!(
                "shadow compared {} pairs (minimum {})",
                shadow.compared, stage.min_compared
            ),
        )
    } else {
        Check::new(
            "compared",
            CheckStatus::Insufficient,
            format!(
                "shadow has compared {} of the stage's {} pairs",
                shadow.compared, stage.min_compared
            ),
        )
    }
    .threshold(stage.min_compared as f64);
    compared.put("compared", n);
    checks.push(compared);
    finish(checks)
}

/// `shadow.per_segment`: the worst traffic segment against its limit (see
/// "Worst segment" in the module docs).
fn segment_check(gate: &SegmentGate, shadow: &ShadowEvidence, alpha: f64) -> Check {
    let max = gate.max_unexpected_rate;
    let name = "segment_unexpected_mismatch_rate";
    if shadow.segments.is_empty() {
        return Check::new(
            name,
            CheckStatus::Insufficient,
            "no traffic segments reported: the stage gates on its worst segment, \
             so the route's shadow config needs `segment_by`"
                .to_owned(),
        )
        .threshold(max);
    }
    let invalid: Vec<&str> = shadow
        .segments
        .iter()
        .filter(|(_, c)| c.serious > c.compared || c.unexpected > c.compared)
        .map(|(l, _)| l.as_str())
        .collect();
    if !invalid.is_empty() {
        return Check::new(
            name,
            CheckStatus::Insufficient,
            format!(
                "invalid shadow segment evidence: more mismatches than pairs in {}",
                invalid.join(", ")
            ),
        )
        .threshold(max);
    }
    let tested: Vec<(&String, &PairCounts)> = shadow
        .segments
        .iter()
        .filter(|(_, c)| c.compared >= gate.min_compared)
        .collect();
    let avg = if shadow.compared > 0 {
        shadow.unexpected as f64 / shadow.compared as f64
    } else {
        0.0
    };
    let prior = stats::Prior::around(max);
    let m = tested.len().max(1) as f64;
    let alpha_each = alpha / m;
    let thr = (1.0 / alpha_each).ln();
    // The worst segment: the strongest evidence above the limit.
    let worst = tested
        .iter()
        .map(|(label, c)| {
            let (k, n) = (c.unexpected as f64, c.compared as f64);
            (*label, **c, stats::ln_e_above(&prior, k, n, max))
        })
        .max_by(|a, b| a.2.total_cmp(&b.2).then_with(|| b.0.cmp(a.0)));
    let Some((label, c, ln_e)) = worst else {
        let mut check = Check::new(
            name,
            CheckStatus::Pass,
            format!(
                "no traffic segment has {} compared pairs yet ({} segments)",
                gate.min_compared,
                shadow.segments.len()
            ),
        )
        .threshold(max);
        check.put("segments", shadow.segments.len() as f64);
        return check;
    };
    let (k, n) = (c.unexpected as f64, c.compared as f64);
    let rate = k / n;
    let p = p_value(ln_e);
    let mut check = if ln_e >= thr {
        let lower = stats::rate_lower_bound(&prior, k, n, thr);
        let mut c = Check::new(
            name,
            CheckStatus::Fail,
            format!(
                "shadow segment {label:?}: unexpected mismatches {} of {} pairs ({}, at least {} at {} confidence > {} allowed per segment; p = {} < {}), while the route's average is {} ({} of {})",
                c.unexpected,
                c.compared,
                pct(rate),
                pct(lower),
                conf(alpha_each),
                pct(max),
                fmt_p(p),
                fmt_p(alpha_each),
                pct(avg),
                shadow.unexpected,
                shadow.compared
            ),
        );
        c.put("lower_bound", lower);
        c
    } else {
        Check::new(
            name,
            CheckStatus::Pass,
            format!(
                "worst shadow segment {label:?}: unexpected mismatches {} of {} pairs ({}; not significantly above {} per segment, p = {}), of {} segments tested",
                c.unexpected,
                c.compared,
                pct(rate),
                pct(max),
                fmt_p(p),
                tested.len()
            ),
        )
    }
    .threshold(max);
    check.put("compared", n);
    check.put("unexpected", k);
    check.put("rate", rate);
    check.put("p_value", p);
    check.put("alpha", alpha_each);
    check.put("segments_tested", tested.len() as f64);
    check.put("average_rate", avg);
    check
}

// === verdict ===

fn finish(checks: Vec<Check>) -> Judgement {
    let with = |status: CheckStatus| -> Vec<&str> {
        checks
            .iter()
            .filter(|c| c.status == status)
            .map(|c| c.detail.as_str())
            .collect()
    };
    let failed = with(CheckStatus::Fail);
    let short = with(CheckStatus::Insufficient);
    let (verdict, reason) = if !failed.is_empty() {
        (Verdict::Rollback, failed.join("; "))
    } else if !short.is_empty() {
        (Verdict::Hold, short.join("; "))
    } else {
        // The data checks passing goes without saying in a promotion.
        let passed: Vec<&str> = checks
            .iter()
            .filter(|c| c.name != "data" && c.name != "sample_size")
            .map(|c| c.detail.as_str())
            .collect();
        (Verdict::Promote, passed.join("; "))
    };
    Judgement {
        verdict,
        reason,
        checks,
        queries: Vec::new(),
    }
}

/// `judgement` with `more` checks, decided again (a rollback in `more`
/// rolls back; a hold holds); its queries are kept.
pub fn with_checks(judgement: Judgement, more: Vec<Check>) -> Judgement {
    let queries = judgement.queries;
    let mut checks = judgement.checks;
    checks.extend(more);
    Judgement {
        queries,
        ..finish(checks)
    }
}

// === synthetic probes ===

/// The `probes` check over a step's (or the shadow stage's) probe results:
/// canary failures above `max_failures` fail it, naming each failing check,
/// what it expects, what the canary answered and how stable did beside it;
/// fewer than `min_passed` canary passes hold it. Stable's failures are
/// reported, never held against the canary. Probe counts are never added to
/// the live request counts.
pub fn probe_check(probes: &Probes, tally: &ProbeTally) -> Check {
    let (passed, failed) = (tally.passed(Side::Canary), tally.failed(Side::Canary));
    let (s_passed, s_failed) = (tally.passed(Side::Stable), tally.failed(Side::Stable));
    let mut check = if failed > probes.max_failures {
        let failing: Vec<String> = tally
            .checks
            .iter()
            .filter(|c| c.canary.failed > 0)
            .map(|c| {
                let expect = probes
                    .checks
                    .iter()
                    .find(|p| p.name == c.check)
                    .map_or_else(|| "?".to_owned(), |p| p.expect.describe());
                let answered = c
                    .canary
                    .last_failure
                    .as_ref()
                    .map_or("", |r| r.detail.as_str());
                let stable = match &c.stable.last_failure {
                    None => format!(
                        "stable passed {} of {}",
                        c.stable.passed,
                        c.stable.passed.saturating_add(c.stable.failed)
                    ),
                    Some(r) => format!(
                        "stable passed {} of {}, last {}",
                        c.stable.passed,
                        c.stable.passed.saturating_add(c.stable.failed),
                        r.detail
                    ),
                };
                format!(
                    "probe {} failed on canary {} of {} times (expected {expect}; canary {answered}; {stable})",
                    c.check,
                    c.canary.failed,
                    c.canary.failed.saturating_add(c.canary.passed)
                )
            })
            .collect();
        Check::new(
            "probes",
            CheckStatus::Fail,
            format!(
                "{} (at most {} canary probe failures allowed)",
                failing.join("; "),
                probes.max_failures
            ),
        )
    } else if passed < probes.min_passed {
        Check::new(
            "probes",
            CheckStatus::Insufficient,
            format!(
                "probes: canary passed {passed} of the {} needed",
                probes.min_passed
            ),
        )
    } else {
        Check::new(
            "probes",
            CheckStatus::Pass,
            format!(
                "probes: canary passed {passed}, failed {failed} (at most {}); stable passed {s_passed}, failed {s_failed}",
                probes.max_failures
            ),
        )
    }
    .threshold(probes.max_failures as f64);
    check.put("canary_passed", passed as f64);
    check.put("canary_failed", failed as f64);
    check.put("stable_passed", s_passed as f64);
    check.put("stable_failed", s_failed as f64);
    check
}

/// A step judged on probes alone, when the spec allows it
/// (`probes.judge_idle_on_probes`) and the window shows no live traffic:
/// zero requests on each side, at least one side fresh, and neither stale.
/// A side with no data at all while the other is fresh is a cluster the
/// data plane has never used (Envoy's stats sink sends only counters that
/// were ever used, every flush from then on, so the fresh side proves the
/// stream is alive). `None` when there is live traffic, or when its absence
/// is not shown (no data from either side, or stale data, is never
/// "idle"): the step is then judged as usual, and probes never stand in for
/// live requests.
#[allow(clippy::too_many_arguments)]
pub fn judge_idle_on_probes(
    probes: &Probes,
    analysis: &Analysis,
    step: &CanaryStep,
    stable: &Evidence,
    canary: &Evidence,
    tally: &ProbeTally,
    now_ms: u64,
    step_started_ms: u64,
) -> Option<Judgement> {
    if !probes.judge_idle_on_probes || stable.requests > 0 || canary.requests > 0 {
        return None;
    }
    let fresh = |t: u64| now_ms.saturating_sub(t) as f64 / 1000.0 <= analysis.max_staleness_s;
    let sides = [stable.last_update_ms, canary.last_update_ms];
    if sides.iter().flatten().any(|&t| !fresh(t)) || sides.iter().all(Option::is_none) {
        return None;
    }
    let n = tally.passed(Side::Canary);
    let mut idle = Check::new(
        "live_traffic",
        CheckStatus::Pass,
        format!("no live traffic: judged on {n} probes only"),
    );
    idle.put("stable_requests", 0.0);
    idle.put("canary_requests", 0.0);
    idle.put("canary_probes_passed", n as f64);
    let elapsed_s = now_ms.saturating_sub(step_started_ms) as f64 / 1000.0;
    Some(finish(vec![
        idle,
        probe_check(probes, tally),
        duration_check("step_duration", "step", elapsed_s, step.min_duration_s),
    ]))
}

// === data checks ===

/// Freshness and sanity of each side's evidence.
fn data_check(analysis: &Analysis, sides: &[(&str, &Evidence)], now_ms: u64) -> Check {
    let mut problems = Vec::new();
    let mut check =
        Check::new("data", CheckStatus::Pass, String::new()).threshold(analysis.max_staleness_s);
    for (side, ev) in sides {
        match ev.last_update_ms {
            None => problems.push(format!("no data from {side}")),
            Some(t) => {
                let age_s = now_ms.saturating_sub(t) as f64 / 1000.0;
                check.put(&format!("{side}_age_s"), age_s);
                if age_s > analysis.max_staleness_s {
                    problems.push(format!(
                        "stale data from {side} (last update {age_s:.1} s ago, limit {} s)",
                        num(analysis.max_staleness_s)
                    ));
                }
            }
        }
        if ev.errors > ev.requests {
            problems.push(format!(
                "invalid evidence from {side}: {} errors reported for {} requests",
                ev.errors, ev.requests
            ));
        }
    }
    if problems.is_empty() {
        check.detail = "fresh data from both sides".to_owned();
        if sides.len() == 1 {
            check.detail = "fresh data from canary".to_owned();
        }
    } else {
        check.status = CheckStatus::Insufficient;
        check.detail = problems.join(", ");
    }
    check
}

fn sample_check(analysis: &Analysis, sides: &[(&str, &Evidence)]) -> Check {
    let min = analysis.min_requests_per_side;
    let mut check =
        Check::new("sample_size", CheckStatus::Pass, String::new()).threshold(min as f64);
    let mut short = Vec::new();
    for (side, ev) in sides {
        check.put(&format!("{side}_requests"), ev.requests as f64);
        if ev.requests < min {
            short.push(format!("{side} has {} of {min} requests", ev.requests));
        }
    }
    if short.is_empty() {
        check.detail = format!("at least {min} requests per side");
    } else {
        check.status = CheckStatus::Insufficient;
        check.detail = format!("not enough data: {}", short.join(", "));
    }
    check
}

fn shadow_data_check(analysis: &Analysis, shadow: &ShadowEvidence, now_ms: u64) -> Check {
    let mut check = Check::new("data", CheckStatus::Insufficient, String::new())
        .threshold(analysis.max_staleness_s);
    match shadow.last_update_ms {
        None => check.detail = "no data: no shadow comparisons reported yet".to_owned(),
        Some(t) => {
            let age_s = now_ms.saturating_sub(t) as f64 / 1000.0;
            check.put("age_s", age_s);
            if age_s > analysis.max_staleness_s {
                check.detail = format!(
                    "stale shadow data (last report {age_s:.1} s ago, limit {} s)",
                    num(analysis.max_staleness_s)
                );
            } else if shadow.serious > shadow.compared || shadow.unexpected > shadow.compared {
                check.detail = format!(
                    "invalid shadow evidence: {} serious and {} unexpected mismatches reported for {} compared pairs",
                    shadow.serious, shadow.unexpected, shadow.compared
                );
            } else {
                check.status = CheckStatus::Pass;
                check.detail = "fresh shadow data".to_owned();
            }
        }
    }
    check
}

fn duration_check(name: &str, what: &str, elapsed_s: f64, min_s: f64) -> Check {
    let mut c = if elapsed_s >= min_s {
        Check::new(
            name,
            CheckStatus::Pass,
            format!("{what} ran {elapsed_s:.1} s (minimum {} s)", num(min_s)),
        )
    } else {
        Check::new(
            name,
            CheckStatus::Insufficient,
            format!("{what} has run {elapsed_s:.1} of {} s", num(min_s)),
        )
    }
    .threshold(min_s);
    c.put("elapsed_s", elapsed_s);
    c
}

// === error rate ===

fn error_rate_check(
    max_pp: f64,
    alpha: f64,
    stable: &Evidence,
    canary: &Evidence,
    restarts: Option<&[Restart]>,
    min_requests: u64,
) -> Check {
    let (ks, ns) = (stable.errors as f64, stable.requests as f64);
    let (kc, nc) = (canary.errors as f64, canary.requests as f64);
    let margin = max_pp / 100.0;
    let thr = (1.0 / alpha).ln();
    let whole = stats::ln_e_increase(ks, ns, kc, nc, margin);
    // The mixture over the whole window and every restart (module docs):
    // its largest term says which window carries the evidence.
    let mut terms = Vec::new();
    let mut best: Option<(f64, &Restart)> = None;
    if let Some(restarts) = restarts {
        terms.push(WHOLE_WINDOW_WEIGHT.ln() + whole);
        for r in usable_restarts(restarts, min_requests) {
            let t = restart_weight(r.index).ln()
                + stats::ln_e_increase(
                    r.stable_errors as f64,
                    r.stable_requests as f64,
                    r.canary_errors as f64,
                    r.canary_requests as f64,
                    margin,
                );
            if best.is_none_or(|(b, _)| t > b) {
                best = Some((t, r));
            }
            terms.push(t);
        }
    } else {
        terms.push(whole);
    }
    let ln_e = stats::log_sum_exp(terms.iter().copied());
    let p = p_value(ln_e);
    // A restart is named when it carries more evidence than the whole window.
    let from_restart = best
        .filter(|(t, _)| *t > WHOLE_WINDOW_WEIGHT.ln() + whole)
        .map(|(_, r)| r);
    let recent = from_restart.map_or_else(String::new, |r| {
        let rs = r.stable_errors as f64 / r.stable_requests as f64;
        let rc = r.canary_errors as f64 / r.canary_requests as f64;
        format!(
            "; since restart {} ({} s into the step's evidence): canary {} of {} vs stable {} of {}, {} pp",
            r.index,
            num(f64::from(r.index) * RESTART_EVERY_MS as f64 / 1000.0),
            r.canary_errors,
            r.canary_requests,
            r.stable_errors,
            r.stable_requests,
            signed((rc - rs) * 100.0)
        )
    });
    let lower = stats::increase_lower_bound(ks, ns, kc, nc, thr);
    let upper = stats::increase_upper_bound(ks, ns, kc, nc, thr);
    let (rs, rc) = (ks / ns, kc / nc);
    let increase = rc - rs;
    let head = format!(
        "canary 5xx {} vs stable {} ({} pp",
        pct(rc),
        pct(rs),
        signed(increase * 100.0)
    );
    let mut c = if ln_e >= thr {
        let at_least = lower.map_or_else(String::new, |l| {
            format!(
                ", at least {} pp at {} confidence",
                signed(l * 100.0),
                conf(alpha)
            )
        });
        Check::new(
            "error_rate",
            CheckStatus::Fail,
            format!(
                "{head}{at_least}{recent} > {} pp allowed; p = {} < {})",
                num(max_pp),
                fmt_p(p),
                fmt_p(alpha)
            ),
        )
    } else {
        let at_most = upper.map_or_else(String::new, |u| {
            format!(
                ", at most {} pp at {} confidence",
                signed(u * 100.0),
                conf(alpha)
            )
        });
        Check::new(
            "error_rate",
            CheckStatus::Pass,
            format!(
                "{head}{at_most}; no significant increase over the {} pp allowed, p = {})",
                num(max_pp),
                fmt_p(p)
            ),
        )
    }
    .threshold(max_pp);
    c.put("stable_requests", ns);
    c.put("stable_errors", ks);
    c.put("canary_requests", nc);
    c.put("canary_errors", kc);
    c.put("stable_rate", rs);
    c.put("canary_rate", rc);
    c.put("increase_pp", increase * 100.0);
    c.put_opt("increase_lower_pp", lower.map(|l| l * 100.0));
    c.put_opt("increase_upper_pp", upper.map(|u| u * 100.0));
    if let Some(r) = from_restart {
        c.put("restart_index", f64::from(r.index));
        c.put("restart_stable_requests", r.stable_requests as f64);
        c.put("restart_stable_errors", r.stable_errors as f64);
        c.put("restart_canary_requests", r.canary_requests as f64);
        c.put("restart_canary_errors", r.canary_errors as f64);
    }
    if let Some(restarts) = restarts {
        c.put(
            "restarts_judged",
            usable_restarts(restarts, min_requests).count() as f64,
        );
    }
    c.put("p_value", p);
    c.put("alpha", alpha);
    c
}

// === business metrics ===

/// A business metric's stop rule (spec `metrics`) on its counts over the
/// step's window, canary against stable:
/// - a share (`max_decrease_pp`, `max_increase_pp`): the error-rate test
///   with `events / total` in place of the 5xx rate (sides swapped for a
///   decrease);
/// - a rate (`max_ratio`): given the events of both sides, each is the
///   canary's with chance `r·t_c / (r·t_c + t_s)` when the canary's rate
///   is `r` times stable's (`t`: each side's total, events Poisson in it);
///   the canary's share of events is tested against that at `r =
///   max_ratio` with the normal-mixture SPRT (as the error rate).
///
/// No data, stale data, or fewer than `min_total` in a side's total holds.
pub fn metric_check(
    rule: &MetricRule,
    evidence: Option<&MetricEvidence>,
    analysis: &Analysis,
    now_ms: u64,
) -> Check {
    let name = format!("metric:{}", rule.name);
    let Some(ev) = evidence else {
        return Check::new(
            &name,
            CheckStatus::Insufficient,
            format!("{}: no data", rule.name),
        );
    };
    match ev.last_update_ms {
        None => {
            return Check::new(
                &name,
                CheckStatus::Insufficient,
                format!("{}: no data", rule.name),
            );
        }
        Some(t) => {
            let age_s = now_ms.saturating_sub(t) as f64 / 1000.0;
            if age_s > analysis.max_staleness_s {
                return Check::new(
                    &name,
                    CheckStatus::Insufficient,
                    format!(
                        "{}: stale data (last update {age_s:.1} s ago, limit {} s)",
                        rule.name,
                        num(analysis.max_staleness_s)
                    ),
                );
            }
        }
    }
    let (s, c) = (ev.stable, ev.canary);
    let min = analysis.min_requests_per_side;
    if s.total < min || c.total < min {
        let mut check = Check::new(
            &name,
            CheckStatus::Insufficient,
            format!(
                "{}: not enough data: stable {} and canary {} of {min} each",
                rule.name, s.total, c.total
            ),
        );
        check.put("stable_total", s.total as f64);
        check.put("canary_total", c.total as f64);
        return check;
    }
    let alpha = analysis.alpha();
    let thr = (1.0 / alpha).ln();
    let (ks, ns, kc, nc) = (
        s.events as f64,
        s.total as f64,
        c.events as f64,
        c.total as f64,
    );
    let (rs, rc) = (ks / ns, kc / nc);
    let share_head = || {
        format!(
            "{}: canary {} ({} of {}) vs stable {} ({} of {}), {} pp",
            rule.name,
            pct(rc),
            c.events,
            c.total,
            pct(rs),
            s.events,
            s.total,
            signed((rc - rs) * 100.0)
        )
    };
    let (ln_e, head, limit_text, threshold) = match rule.limit {
        MetricLimit::MaxDecreasePp(pp) => (
            stats::ln_e_increase(kc, nc, ks, ns, pp / 100.0),
            share_head(),
            format!("more than {} pp below stable", num(pp)),
            pp,
        ),
        MetricLimit::MaxIncreasePp(pp) => (
            stats::ln_e_increase(ks, ns, kc, nc, pp / 100.0),
            share_head(),
            format!("more than {} pp above stable", num(pp)),
            pp,
        ),
        MetricLimit::MaxRatio(r) => {
            let k = ks + kc;
            let ln_e = if k > 0.0 {
                let p0 = r * nc / (r * nc + ns);
                let share = kc / k;
                stats::ln_msprt(share - p0, p0 * (1.0 - p0) / k, TAU_EVENT_SHARE)
            } else {
                0.0
            };
            let per_k = |x: f64| num(x * 1000.0);
            (
                ln_e,
                format!(
                    "{}: canary {} per 1000 ({} of {}) vs stable {} per 1000 ({} of {}), ×{}",
                    rule.name,
                    per_k(rc),
                    c.events,
                    c.total,
                    per_k(rs),
                    s.events,
                    s.total,
                    if rs > 0.0 {
                        num(rc / rs)
                    } else {
                        "∞".to_owned()
                    }
                ),
                format!("above {}× stable", num(r)),
                r,
            )
        }
    };
    let p = p_value(ln_e);
    let mut check = if ln_e >= thr {
        Check::new(
            &name,
            CheckStatus::Fail,
            format!("{head}; {limit_text}, p = {} < {}", fmt_p(p), fmt_p(alpha)),
        )
    } else {
        Check::new(
            &name,
            CheckStatus::Pass,
            format!("{head}; not significantly {limit_text}, p = {}", fmt_p(p)),
        )
    }
    .threshold(threshold);
    check.put("stable_events", ks);
    check.put("stable_total", ns);
    check.put("canary_events", kc);
    check.put("canary_total", nc);
    check.put("stable_rate", rs);
    check.put("canary_rate", rc);
    check.put("p_value", p);
    check.put("alpha", alpha);
    check
}

/// The mixture's scale for the canary's share of events (rate rules).
const TAU_EVENT_SHARE: f64 = 0.1;

// === restarts ===

/// Restart points are this far apart, from the start of a step's evidence.
pub const RESTART_EVERY_MS: u64 = 2_000;
/// The newest restarts judged at most: dropping a term only lowers the
/// mixture, so the test stays valid, and a look stays cheap (two minutes
/// back at [`RESTART_EVERY_MS`]).
pub const MAX_RESTARTS: usize = 60;
/// The whole window's weight in the mixture; the restarts share the rest.
const WHOLE_WINDOW_WEIGHT: f64 = 0.5;
/// The restarts' weights follow the density `A / (s + A)²` over their
/// start time `s`, `A` this many seconds: nearly flat over the first `A`
/// seconds, where a step's regressions are expected, then falling as
/// `1/s²` (which any weights summing to 1 must, roughly).
const RESTART_SCALE_S: f64 = 10.0;

/// Error counts since one restart point of a step (both sides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    /// Which point: it starts `index ×` [`RESTART_EVERY_MS`] after the
    /// step's evidence does (1, 2, ...; 0 is the whole window).
    pub index: u32,
    pub stable_requests: u64,
    pub stable_errors: u64,
    pub canary_requests: u64,
    pub canary_errors: u64,
}

/// The restart points of a step whose evidence starts at `first_ms`, as
/// `(index, start ms)`: the newest [`MAX_RESTARTS`] that start before
/// `now_ms`, oldest first.
pub fn restart_points(first_ms: u64, now_ms: u64) -> Vec<(u32, u64)> {
    let elapsed = now_ms.saturating_sub(first_ms);
    if elapsed == 0 {
        return Vec::new();
    }
    let newest = (elapsed - 1) / RESTART_EVERY_MS;
    let oldest = newest.saturating_sub(MAX_RESTARTS as u64 - 1).max(1);
    (oldest..=newest)
        .filter_map(|j| {
            let index = u32::try_from(j).ok()?;
            Some((
                index,
                first_ms.checked_add(j.checked_mul(RESTART_EVERY_MS)?)?,
            ))
        })
        .collect()
}

/// Restart `index`'s weight: its share of the density `A/(s+A)²` between
/// the previous point and its own, times the restarts' total. The
/// weights of all restarts, over an unbounded step, sum to
/// `1 − WHOLE_WINDOW_WEIGHT`.
fn restart_weight(index: u32) -> f64 {
    let d = RESTART_EVERY_MS as f64 / 1000.0;
    let cdf = |j: f64| {
        let s = j * d;
        s / (s + RESTART_SCALE_S)
    };
    let j = f64::from(index);
    (1.0 - WHOLE_WINDOW_WEIGHT) * (cdf(j) - cdf(j - 1.0))
}

/// The restarts a look may judge: on the grid (index ≥ 1), each index once
/// (the first given), sane counts, at least `min_requests` per side, the
/// newest [`MAX_RESTARTS`] indices.
fn usable_restarts(restarts: &[Restart], min_requests: u64) -> impl Iterator<Item = &Restart> {
    let mut seen = std::collections::BTreeMap::new();
    for r in restarts {
        if r.index >= 1 {
            seen.entry(r.index).or_insert(r);
        }
    }
    let skip = seen.len().saturating_sub(MAX_RESTARTS);
    seen.into_values().skip(skip).filter(move |r| {
        r.stable_requests >= min_requests
            && r.canary_requests >= min_requests
            && r.stable_errors <= r.stable_requests
            && r.canary_errors <= r.canary_requests
    })
}

// === latency ===

/// "Share of requests slower than `slow_ms`", canary minus stable, against
/// a margin in percentage points: the error-rate test with "slower than"
/// in place of "5xx". The count is of buckets wholly above `slow_ms`, so it
/// is exact when `slow_ms` is one of Envoy's bucket bounds (a bucket that
/// straddles it is not counted, on either side).
fn slow_share_check(
    slow_ms: f64,
    max_pp: f64,
    alpha: f64,
    stable: &Evidence,
    canary: &Evidence,
) -> Check {
    let name = "slow_share";
    let (hs, hc) = match (
        Histogram::new(&stable.latency_ms),
        Histogram::new(&canary.latency_ms),
    ) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => {
            return Check::new(
                name,
                CheckStatus::Insufficient,
                format!("invalid latency histogram: {e}"),
            );
        }
    };
    if hs.total <= 0.0 || hc.total <= 0.0 {
        return Check::new(
            name,
            CheckStatus::Insufficient,
            format!(
                "latency: no samples yet (stable {}, canary {})",
                hs.total, hc.total
            ),
        );
    }
    let (ks, ns) = (hs.count_wholly_above(slow_ms), hs.total);
    let (kc, nc) = (hc.count_wholly_above(slow_ms), hc.total);
    let margin = max_pp / 100.0;
    let thr = (1.0 / alpha).ln();
    let ln_e = stats::ln_e_increase(ks, ns, kc, nc, margin);
    let p = p_value(ln_e);
    let (rs, rc) = (ks / ns, kc / nc);
    let head = format!(
        "canary requests slower than {} {} vs stable {} ({} pp",
        ms(slow_ms),
        pct(rc),
        pct(rs),
        signed((rc - rs) * 100.0)
    );
    let mut c = if ln_e >= thr {
        Check::new(
            name,
            CheckStatus::Fail,
            format!(
                "{head} > {} pp allowed; p = {} < {})",
                num(max_pp),
                fmt_p(p),
                fmt_p(alpha)
            ),
        )
    } else {
        Check::new(
            name,
            CheckStatus::Pass,
            format!(
                "{head}; no significant increase over the {} pp allowed, p = {})",
                num(max_pp),
                fmt_p(p)
            ),
        )
    }
    .threshold(max_pp);
    c.put("slow_ms", slow_ms);
    c.put("stable_samples", ns);
    c.put("stable_slow", ks);
    c.put("canary_samples", nc);
    c.put("canary_slow", kc);
    c.put("p_value", p);
    c.put("alpha", alpha);
    c
}

/// The tail share a p99 leaves above it.
const P99_TAIL: f64 = 0.01;

/// A quantile a stop rule is on: its label and the share of samples above it.
#[derive(Clone, Copy)]
struct Quantile {
    label: &'static str,
    tail: f64,
}

const P99: Quantile = Quantile {
    label: "p99",
    tail: P99_TAIL,
};

/// The test on the canary's `q` against `max_ratio ×` stable's: two tests,
/// each at half the rule's α, and the check fails when either rejects.
///
/// - **Exact tail test** (any sample size): stable's quantile is bounded
///   from above at a bucket bound (an anytime confidence bound, α/4), the
///   limit is `max_ratio ×` that bound, and the canary's share of samples
///   in buckets wholly above the limit is tested against the tail share
///   with a Beta-mixture e-value (α/4). See [`exact_tail`].
/// - **Interpolated test** (at least [`MIN_TAIL_SAMPLES`] `/ tail` samples
///   per side, 500 for a p99): the canary's interpolated share above
///   `max_ratio ×` stable's interpolated quantile, with an mSPRT (the module
///   docs). More powerful when a limit falls inside a wide bucket; needs
///   enough samples for its normal approximation.
fn latency_check(
    q: Quantile,
    max_ratio: f64,
    min_increase_ms: f64,
    alpha: f64,
    stable: &Evidence,
    canary: &Evidence,
) -> Check {
    let Quantile { label, tail } = q;
    let name = &format!("{label}_latency");
    let (hs, hc) = match (
        Histogram::new(&stable.latency_ms),
        Histogram::new(&canary.latency_ms),
    ) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) => {
            return Check::new(
                name,
                CheckStatus::Insufficient,
                format!("invalid latency histogram from stable: {e}; waiting for a valid one"),
            );
        }
        (_, Err(e)) => {
            return Check::new(
                name,
                CheckStatus::Insufficient,
                format!("invalid latency histogram from canary: {e}; waiting for a valid one"),
            );
        }
    };
    let min_samples = (MIN_TAIL_SAMPLES / tail).ceil();
    let exact = exact_tail(&hs, &hc, tail, max_ratio, min_increase_ms, alpha);
    let interp = (hs.total >= min_samples && hc.total >= min_samples)
        .then(|| interpolated_tail(&hs, &hc, tail, max_ratio, min_increase_ms));
    let thr_exact = (EXACT_SHARES / alpha).ln();
    let thr_interp = (INTERPOLATED_SHARES / alpha).ln();

    // What each test says, and whether it rejected.
    let exact_fired = matches!(exact, ExactTail::Ran { ln_e, .. } if ln_e >= thr_exact);
    let exact_text = match exact {
        ExactTail::Ran {
            stable_upper_ms,
            limit_ms,
            canary_above,
            ln_e,
        } => {
            let p = p_value(ln_e);
            let verdict = if ln_e >= thr_exact {
                format!("p = {} < {}", fmt_p(p), fmt_p(alpha / EXACT_SHARES))
            } else {
                format!("not significant, p = {}", fmt_p(p))
            };
            format!(
                "exact: {} of {} canary samples ({}) above {} (×{} stable's {label} bound {}{}), where {} is allowed; {verdict}",
                canary_above,
                hc.total,
                pct(canary_above / hc.total),
                ms(limit_ms),
                num(max_ratio),
                ms(stable_upper_ms),
                if limit_ms > max_ratio * stable_upper_ms {
                    format!(", at least +{}", ms(min_increase_ms))
                } else {
                    String::new()
                },
                pct(tail)
            )
        }
        ExactTail::StableUnbounded { need } => format!(
            "exact: waiting for stable latency samples to bound its {label}: {} of {}",
            hs.total, need
        ),
        ExactTail::StableBeyondLastBound => format!(
            "exact: stable's {label} is beyond the histogram's last bound ({})",
            ms(hs.last_finite_bound())
        ),
        ExactTail::NoCanary => "exact: waiting for canary latency samples: 0 so far".to_owned(),
    };
    let interp_fired = interp.as_ref().is_some_and(|i| i.ln_e >= thr_interp);
    let interp_text = match &interp {
        Some(i) => {
            let p = p_value(i.ln_e);
            let verdict = if i.ln_e >= thr_interp {
                format!("p = {} < {}", fmt_p(p), fmt_p(alpha / INTERPOLATED_SHARES))
            } else {
                format!("not significant, p = {}", fmt_p(p))
            };
            if i.limit_ms.is_finite() {
                format!(
                    "interpolated: {} of canary requests slower than {} (×{} stable's {label}, at least +{}), where {} is allowed; {verdict}",
                    pct(i.share),
                    ms(i.limit_ms),
                    num(max_ratio),
                    ms(min_increase_ms),
                    pct(tail)
                )
            } else {
                format!(
                    "interpolated: stable's {label} is beyond the histogram's last bound ({})",
                    ms(hs.last_finite_bound())
                )
            }
        }
        None => format!(
            "interpolated: waiting for latency samples: stable {} and canary {} of {} each",
            hs.total, hc.total, min_samples
        ),
    };

    let q_s = hs.quantile_above(tail * hs.total, OpenBucket::LowerBound);
    let q_c = hc.quantile_above(tail * hc.total, OpenBucket::LowerBound);
    let head = if hs.total > 0.0 && hc.total > 0.0 {
        format!(
            "canary {label} {} {} vs stable {} {} (×{:.2})",
            ms(q_c),
            hc.bucket_text(tail * hc.total),
            ms(q_s),
            hs.bucket_text(tail * hs.total),
            q_c / q_s
        )
    } else {
        format!("{label} latency")
    };
    let ran = matches!(exact, ExactTail::Ran { .. })
        || interp.as_ref().is_some_and(|i| i.limit_ms.is_finite());
    let (status, detail) = if exact_fired || interp_fired {
        let mut fired = Vec::new();
        if exact_fired {
            fired.push(exact_text.as_str());
        }
        if interp_fired {
            fired.push(interp_text.as_str());
        }
        (CheckStatus::Fail, format!("{head}: {}", fired.join("; ")))
    } else if ran {
        (
            CheckStatus::Pass,
            format!("{head}: {exact_text}; {interp_text}"),
        )
    } else {
        (
            CheckStatus::Insufficient,
            format!("{label} latency: {exact_text}; {interp_text}"),
        )
    };
    let mut c = Check::new(name, status, detail).threshold(max_ratio);
    c.put("stable_samples", hs.total);
    c.put("canary_samples", hc.total);
    c.put("interpolated_min_samples", min_samples);
    if hs.total > 0.0 && hc.total > 0.0 {
        c.put(&format!("stable_{label}_ms"), q_s);
        c.put(&format!("canary_{label}_ms"), q_c);
        c.put("ratio", q_c / q_s);
    }
    match exact {
        ExactTail::Ran {
            stable_upper_ms,
            limit_ms,
            canary_above,
            ln_e,
        } => {
            c.put(&format!("stable_{label}_upper_bound_ms"), stable_upper_ms);
            c.put("exact_limit_ms", limit_ms);
            c.put("exact_canary_above_limit", canary_above);
            c.put("exact_p_value", p_value(ln_e));
        }
        ExactTail::StableUnbounded { need } => c.put("stable_samples_needed", need),
        _ => {}
    }
    if let Some(i) = &interp {
        c.put("limit_ms", i.limit_ms);
        c.put("canary_share_above_limit", i.share);
        c.put("density_ratio", i.rho);
        c.put("p_value", p_value(i.ln_e));
    }
    // Every side's quantiles with the bucket that holds each: the estimate
    // is interpolated, the bucket is what the histogram proves.
    for (side, h) in [("stable", &hs), ("canary", &hc)] {
        for (label, tail) in REPORTED_QUANTILES {
            let k = tail * h.total;
            if h.total <= 0.0 {
                continue;
            }
            c.put(
                &format!("{side}_{label}_ms"),
                h.quantile_above(k, OpenBucket::LowerBound),
            );
            if let Some((lo, hi)) = h.bucket_of(k) {
                c.put(&format!("{side}_{label}_bucket_lo_ms"), lo);
                c.put(&format!("{side}_{label}_bucket_hi_ms"), hi);
            }
        }
    }
    c.put("alpha", alpha);
    c
}

/// The latency rule's α is split in halves: this many shares of α to each
/// of the two tests' thresholds (`ln(2/α)` for the interpolated test), and
/// within the exact test half to stable's bound, half to canary's count
/// (`ln(4/α)` each). A canary as good as stable is then rolled back by the
/// rule with probability at most α.
const INTERPOLATED_SHARES: f64 = 2.0;
const EXACT_SHARES: f64 = 4.0;

/// The exact tail test's outcome.
#[derive(Debug, Clone, Copy)]
enum ExactTail {
    /// Ran: stable's quantile is at most `stable_upper_ms` (a bucket
    /// bound), `canary_above` samples lie in buckets wholly above
    /// `limit_ms`, with evidence `ln_e` against "at most `tail` above it".
    Ran {
        stable_upper_ms: f64,
        limit_ms: f64,
        canary_above: f64,
        ln_e: f64,
    },
    /// Stable has too few samples to bound its quantile at any bucket
    /// bound: it would take at least `need` (with none above the bound).
    StableUnbounded { need: f64 },
    /// Stable's quantile is in the open last bucket: no finite bound.
    StableBeyondLastBound,
    /// The canary has no latency samples.
    NoCanary,
}

/// The exact tail test, valid at any sample size (see [`latency_check`]).
///
/// Why it is exact: let `q_s` be stable's true quantile, `L* = max(R q_s,
/// q_s + m)`. H0 says the canary's quantile is at most `L*`, so at most
/// `tail` of canary requests are slower than `L*`. Stable's bound `U` is the
/// first bucket bound whose share of stable samples above it is shown below
/// `tail` (Beta-mixture e-value, anytime-valid); while that bound holds,
/// `U ≥ q_s` and the limit `L = max(R U, U + m) ≥ L*`. Counting only buckets
/// whose *lower* bound is at or above `L` counts only samples slower than
/// `L`, so never more than the samples slower than `L*`: a binomial count
/// with rate at most `tail` under H0, tested by a Beta-mixture e-value,
/// which grows with the count. So the canary's e-value is at most that of a
/// fixed, valid e-process, and the test rejects a true H0 with probability
/// at most α/4 + α/4. When `L` is a bucket bound the count is exact; inside
/// a bucket, the straddling bucket's samples are left out: conservative.
fn exact_tail(
    hs: &Histogram,
    hc: &Histogram,
    tail: f64,
    max_ratio: f64,
    min_increase_ms: f64,
    alpha: f64,
) -> ExactTail {
    let thr = (EXACT_SHARES / alpha).ln();
    let prior = stats::Prior::around(tail);
    let Some(upper) = hs.upper_bound_of_quantile(tail, &prior, thr) else {
        let need = stats::samples_to_bound(&prior, tail, thr);
        if hs.total >= need {
            return ExactTail::StableBeyondLastBound;
        }
        return ExactTail::StableUnbounded { need };
    };
    if hc.total <= 0.0 {
        return ExactTail::NoCanary;
    }
    let limit_ms = (max_ratio * upper).max(upper + min_increase_ms);
    let canary_above = hc.count_wholly_above(limit_ms);
    let ln_e = stats::ln_e_above(&prior, canary_above, hc.total, tail);
    ExactTail::Ran {
        stable_upper_ms: upper,
        limit_ms,
        canary_above,
        ln_e,
    }
}

/// The interpolated tail test's numbers.
struct InterpolatedTail {
    /// `+inf` when stable's quantile is in the open last bucket.
    limit_ms: f64,
    share: f64,
    rho: f64,
    ln_e: f64,
}

/// The interpolated test (module docs): the canary's share above
/// `R ×` stable's interpolated quantile, minus `tail`, with an mSPRT.
fn interpolated_tail(
    hs: &Histogram,
    hc: &Histogram,
    tail: f64,
    max_ratio: f64,
    min_increase_ms: f64,
) -> InterpolatedTail {
    let q_s = hs.quantile_above(tail * hs.total, OpenBucket::Unbounded);
    let q_c = hc.quantile_above(tail * hc.total, OpenBucket::LowerBound);
    if !(q_s.is_finite() && q_s > 0.0) {
        return InterpolatedTail {
            limit_ms: f64::INFINITY,
            share: 0.0,
            rho: 1.0,
            ln_e: 0.0,
        };
    }
    // Canary's share above R × stable's quantile is `tail` exactly when
    // q_c = R q_s: the test is on that share (see the module docs).
    // A ratio of small numbers is noise: the limit is also at least
    // `min_increase_ms` above stable's quantile.
    let limit_ms = (max_ratio * q_s).max(q_s + min_increase_ms);
    let share = hc.count_above(limit_ms) / hc.total;
    // Stable's quantile's own error moves the limit; its effect on the
    // share is (canary density at the limit ÷ stable density at its
    // quantile)² / n_s. Evaluated where the null's boundary puts the limit,
    // at canary's own quantile (score-test style): 1 when canary is stable
    // scaled.
    let rho = hc.log_density(q_c) / hs.log_density(q_s);
    let rho = if rho.is_finite() {
        rho.clamp(1.0, MAX_DENSITY_RATIO)
    } else {
        1.0
    };
    let var = tail * (1.0 - tail) * (1.0 / hc.total + rho * rho / hs.total)
        + interpolation_error(tail).powi(2);
    // The mixture's scale grows with the tail: 2 pp for a p99's 1%.
    let tau = (TAU_P99_SHARE * tail / P99_TAIL).min(0.2);
    InterpolatedTail {
        limit_ms,
        share,
        rho,
        ln_e: stats::ln_msprt(share - tail, var, tau),
    }
}

/// The quantiles every latency check reports per side, by the share of
/// samples above them.
const REPORTED_QUANTILES: [(&str, f64); 4] =
    [("p50", 0.5), ("p90", 0.1), ("p99", 0.01), ("p99.9", 0.001)];

/// The mixture's scale for the canary's excess share above the limit:
/// shares of 1.5% to 10% where 1% is allowed are the regressions to catch.
const TAU_P99_SHARE: f64 = 0.02;
/// A quantile needs this many samples above it on each side (so a p99
/// 500 samples): with fewer, simulated canaries exactly at the allowed
/// ratio were rolled back several times too often.
const MIN_TAIL_SAMPLES: f64 = 5.0;
/// The share above a limit inside a bucket is interpolated, not counted:
/// its error (relative to the 1% tail) is added to the sampling variance,
/// so that with many samples the interpolation's own error cannot pass for
/// evidence. Measured in simulation: about 10–20% of the tail share with
/// Envoy's default buckets.
const INTERPOLATION_ERROR: f64 = 0.3;
/// The interpolation error's share for a quantile with `tail` above it:
/// [`INTERPOLATION_ERROR`] of the tail for a p99 and beyond (where it was
/// measured); for central quantiles growing only with the square root of
/// the tail, since their buckets hold many samples on both sides of the
/// limit. Not calibrated by simulation for p50 and p90, unlike the p99.
fn interpolation_error(tail: f64) -> f64 {
    if tail <= P99_TAIL {
        INTERPOLATION_ERROR * tail
    } else {
        INTERPOLATION_ERROR * P99_TAIL * (tail / P99_TAIL).sqrt()
    }
}

/// A cap on the estimated density ratio, which comes from coarse buckets.
const MAX_DENSITY_RATIO: f64 = 10.0;

/// What a quantile inside the open last bucket (`+inf` bound) is taken as.
#[derive(Clone, Copy)]
enum OpenBucket {
    /// Its lower bound: right for a lower estimate (the true value is above).
    LowerBound,
    /// Unknown: infinity.
    Unbounded,
}

/// A validated latency histogram: buckets `(lower, upper, count)`, the
/// first starting at 0, and the empirical CDF at every bound.
///
/// Within a bucket the CDF is interpolated linearly in probit–log
/// coordinates (`Φ⁻¹(F)` against `ln x`): exact at every bound whatever the
/// distribution, and exact inside the buckets for log-normal latencies,
/// where linear or log-linear interpolation badly misplaces a p99 in
/// Envoy's wide tail buckets (100–250 ms, 250–500 ms). The highest
/// occupied bucket, whose upper CDF is 1, takes the probit slope of the
/// bucket below it (a log-normal tail, truncated at the bucket's bound).
/// The first bucket, from 0, is linear.
struct Histogram {
    /// `(lower, upper, count, F(lower), F(upper))`.
    buckets: Vec<(f64, f64, f64, f64, f64)>,
    total: f64,
}

/// How the CDF runs inside one bucket.
enum Interp {
    Linear,
    LogLinear,
    /// `F = Φ(z_lo + (z_hi − z_lo) · ln(x/lo) / ln(hi/lo))`.
    Probit {
        z_lo: f64,
        z_hi: f64,
    },
    /// The top occupied bucket: a normal in `ln x` of the given slope
    /// through `(lo, F(lo))`, rescaled to reach 1 at `hi`.
    Tail {
        z_lo: f64,
        slope: f64,
        u_lo: f64,
        u_hi: f64,
    },
}

impl Histogram {
    fn new(raw: &[(f64, u64)]) -> Result<Self, String> {
        let mut lower = 0.0;
        let total: f64 = raw.iter().map(|b| b.1 as f64).sum();
        let mut below = 0.0;
        let mut buckets = Vec::with_capacity(raw.len());
        for (i, &(upper, count)) in raw.iter().enumerate() {
            if upper.is_nan() || upper <= lower {
                return Err(format!(
                    "bucket bounds must be positive and ascend, bound {i} is {upper} after {lower}"
                ));
            }
            if upper.is_infinite() && i + 1 != raw.len() {
                return Err(format!("only the last bound may be infinite, bound {i} is"));
            }
            let count = count as f64;
            let f_lo = if total > 0.0 { below / total } else { 0.0 };
            below += count;
            let f_hi = if total > 0.0 { below / total } else { 0.0 };
            buckets.push((lower, upper, count, f_lo, f_hi));
            lower = upper;
        }
        Ok(Self { buckets, total })
    }

    fn interp(&self, i: usize) -> Interp {
        let Some(&(lo, hi, _, f_lo, f_hi)) = self.buckets.get(i) else {
            return Interp::LogLinear;
        };
        if lo <= 0.0 {
            return Interp::Linear;
        }
        let (z_lo, z_hi) = (stats::probit(f_lo), stats::probit(f_hi));
        if z_lo.is_finite() && z_hi.is_finite() && z_hi > z_lo {
            return Interp::Probit { z_lo, z_hi };
        }
        // The slope comes from the nearest occupied bucket below: empty
        // buckets between carry no shape.
        if z_lo.is_finite()
            && f_hi >= 1.0
            && let Some(prev) = self
                .buckets
                .get(..i)
                .and_then(|below| below.iter().rposition(|b| b.2 > 0.0))
            && let Some(&(prev_lo, prev_hi, ..)) = self.buckets.get(prev)
        {
            let slope = match self.interp(prev) {
                Interp::Probit { z_lo: a, z_hi: b } => (b - a) / (prev_hi / prev_lo).ln(),
                _ => f64::NAN,
            };
            if slope.is_finite() && slope > 0.0 {
                let u_lo = stats::phi(z_lo);
                let u_hi = stats::phi(z_lo + slope * (hi / lo).ln());
                if u_hi - u_lo > 1e-12 {
                    return Interp::Tail {
                        z_lo,
                        slope,
                        u_lo,
                        u_hi,
                    };
                }
            }
        }
        Interp::LogLinear
    }

    /// The interpolated CDF at `x`; inside the open last bucket, its lower
    /// end (where in it the samples lie is unknown).
    fn cdf(&self, x: f64) -> f64 {
        for (i, &(lo, hi, count, f_lo, f_hi)) in self.buckets.iter().enumerate() {
            if x > hi {
                continue;
            }
            if x <= lo || count <= 0.0 || hi.is_infinite() {
                return f_lo;
            }
            if x >= hi {
                return f_hi;
            }
            let t = (x / lo).ln() / (hi / lo).ln();
            return match self.interp(i) {
                Interp::Linear => f_lo + (f_hi - f_lo) * (x - lo) / (hi - lo),
                Interp::LogLinear => f_lo + (f_hi - f_lo) * t,
                Interp::Probit { z_lo, z_hi } => stats::phi(z_lo + (z_hi - z_lo) * t),
                Interp::Tail {
                    z_lo,
                    slope,
                    u_lo,
                    u_hi,
                } => {
                    let u = stats::phi(z_lo + slope * (x / lo).ln());
                    f_lo + (1.0 - f_lo) * (u - u_lo) / (u_hi - u_lo)
                }
            }
            .clamp(f_lo, f_hi);
        }
        1.0
    }

    /// An anytime upper confidence bound on the quantile with `tail` of the
    /// samples above it, at a bucket bound: the first finite bound `b` at
    /// which "at least `tail` of the samples are above `b`" is rejected
    /// (evidence `thr`). The quantile is at most `b` exactly when at most
    /// `tail` is above `b`, and the count above a bound is exact, so no
    /// interpolation enters. `None`: no bound qualifies yet.
    fn upper_bound_of_quantile(&self, tail: f64, prior: &stats::Prior, thr: f64) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        let mut below = 0.0;
        for &(_, hi, count, ..) in &self.buckets {
            below += count;
            if !hi.is_finite() {
                return None;
            }
            let above = (self.total - below).max(0.0);
            if stats::ln_e_below(prior, above, self.total, tail) >= thr {
                return Some(hi);
            }
        }
        None
    }

    /// The samples in buckets whose lower bound is at or above `x`: exact,
    /// never interpolated.
    fn count_wholly_above(&self, x: f64) -> f64 {
        // Not `sum()`: an empty f64 sum is -0.0, shown as "-0.0%".
        self.buckets
            .iter()
            .filter(|b| b.0 >= x)
            .fold(0.0, |acc, b| acc + b.2)
    }

    /// The (interpolated) number of samples above `x`; none in the open
    /// last bucket count once `x` is inside it.
    fn count_above(&self, x: f64) -> f64 {
        if x >= self.last_finite_bound() {
            return 0.0;
        }
        self.total * (1.0 - self.cdf(x))
    }

    /// `dF / d ln x` around `x`: how densely samples sit there, per unit
    /// of log-latency. NaN at or beyond the last finite bound.
    fn log_density(&self, x: f64) -> f64 {
        if !(x > 0.0 && x < self.last_finite_bound()) {
            return f64::NAN;
        }
        let h = 0.02_f64;
        (self.cdf(x * h.exp()) - self.cdf(x * (-h).exp())) / (2.0 * h)
    }

    fn last_finite_bound(&self) -> f64 {
        self.buckets
            .iter()
            .rev()
            .map(|b| b.1)
            .find(|b| b.is_finite())
            .unwrap_or(0.0)
    }

    /// The bucket `(lower, upper]` that holds the latency with `k_above`
    /// samples above it: exact, whatever the distribution inside buckets.
    fn bucket_of(&self, k_above: f64) -> Option<(f64, f64)> {
        let target = if self.total > 0.0 {
            (1.0 - k_above / self.total).clamp(0.0, 1.0)
        } else {
            return None;
        };
        self.buckets
            .iter()
            .find(|b| b.2 > 0.0 && b.4 >= target)
            .map(|b| (b.0, b.1))
    }

    /// `"in (80, 100] ms"`: where [`Self::bucket_of`] puts a quantile.
    fn bucket_text(&self, k_above: f64) -> String {
        match self.bucket_of(k_above) {
            Some((lo, hi)) if hi.is_infinite() => format!("(above {})", ms(lo)),
            Some((lo, hi)) => format!("(in ({}, {}])", num(lo), ms(hi)),
            None => String::new(),
        }
    }

    /// The latency with (interpolated) `k_above` samples above it.
    fn quantile_above(&self, k_above: f64, open: OpenBucket) -> f64 {
        let target = if self.total > 0.0 {
            (1.0 - k_above / self.total).clamp(0.0, 1.0)
        } else {
            0.0
        };
        for (i, &(lo, hi, count, f_lo, f_hi)) in self.buckets.iter().enumerate() {
            if count <= 0.0 || f_hi < target {
                continue;
            }
            if hi.is_infinite() {
                return match open {
                    OpenBucket::LowerBound => lo,
                    OpenBucket::Unbounded => f64::INFINITY,
                };
            }
            let t = ((target - f_lo) / (f_hi - f_lo)).clamp(0.0, 1.0);
            return match self.interp(i) {
                Interp::Linear => lo + (hi - lo) * t,
                Interp::LogLinear => lo * (hi / lo).powf(t),
                Interp::Probit { z_lo, z_hi } => {
                    let frac = ((stats::probit(target) - z_lo) / (z_hi - z_lo)).clamp(0.0, 1.0);
                    lo * (hi / lo).powf(frac)
                }
                Interp::Tail {
                    z_lo,
                    slope,
                    u_lo,
                    u_hi,
                } => {
                    let u = u_lo + t * (u_hi - u_lo);
                    let ln_x = lo.ln() + (stats::probit(u) - z_lo) / slope;
                    ln_x.exp().clamp(lo, hi)
                }
            };
        }
        0.0
    }
}

// === formatting ===

fn p_value(ln_e: f64) -> f64 {
    (-ln_e).exp().min(1.0)
}

fn fmt_p(p: f64) -> String {
    if p < 1e-300 {
        "< 1e-300".to_owned()
    } else if p >= 1.0 {
        "1".to_owned()
    } else if p >= 0.001 {
        trim(format!("{p:.3}"))
    } else {
        format!("{p:.0e}")
    }
}

/// `0.99` → `"99%"`: the confidence of a bound at level α.
fn conf(alpha: f64) -> String {
    let c = (1.0 - alpha) * 100.0;
    format!("{}%", trim(format!("{c:.2}")))
}

fn pct(rate: f64) -> String {
    let v = rate * 100.0;
    if v != 0.0 && v.abs() < 1.0 {
        format!("{}%", trim(format!("{v:.2}")))
    } else {
        format!("{v:.1}%")
    }
}

fn signed(pp: f64) -> String {
    if pp.abs() < 1.0 {
        format!("{pp:+.2}")
    } else {
        format!("{pp:+.1}")
    }
}

fn ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0} ms")
    } else {
        format!("{} ms", trim(format!("{v:.2}")))
    }
}

/// A config number as written: `1`, `0.5`.
fn num(v: f64) -> String {
    let mut s = String::new();
    let _ = write!(s, "{v}");
    s
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

// === statistics ===

/// E-values from Beta-mixture Bayes factors against composite nulls. All
/// counts are `f64` (latency tail counts are interpolated, so fractional);
/// callers pass `n > 0` and `0 ≤ k ≤ n`.
mod stats {
    /// Whether evidence `x` reaches `thr`; NaN never does.
    fn reaches(x: f64, thr: f64) -> bool {
        x >= thr
    }

    /// Bisection steps: 2^-60 of any interval here is below f64 noise.
    const BISECT: usize = 60;

    /// A finite mixture of Beta(a, b) priors: `(ln weight, a, b)`.
    #[derive(Debug, Clone)]
    pub(super) struct Prior(Vec<(f64, f64, f64)>);

    impl Prior {
        fn from_means(means: impl IntoIterator<Item = f64>) -> Self {
            let means: Vec<f64> = means.into_iter().collect();
            let ln_w = -(means.len().max(1) as f64).ln();
            // Shape a = 2: unimodal around each mean, wide enough
            // (sd ≈ 0.7 × mean) that means a factor 2–3 apart overlap.
            Prior(
                means
                    .into_iter()
                    .map(|m| (ln_w, 2.0, 2.0 * (1.0 - m) / m))
                    .collect(),
            )
        }

        /// For a rate tested against `anchor`: means from anchor/8 to 8 × anchor.
        pub(super) fn around(anchor: f64) -> Self {
            let anchor = anchor.clamp(1e-3, 0.5);
            Self::from_means(
                (-3..=3)
                    .map(|j| (anchor * 2f64.powi(j)).clamp(1e-5, 0.6))
                    .collect::<Vec<_>>(),
            )
        }

        /// ln of the prior-mixed probability of one sequence with `k`
        /// successes in `n` trials.
        pub(super) fn ln_marginal(&self, k: f64, n: f64) -> f64 {
            log_sum_exp(
                self.0
                    .iter()
                    .map(|&(ln_w, a, b)| ln_w + ln_beta(a + k, b + n - k) - ln_beta(a, b)),
            )
        }
    }

    fn ln_beta(a: f64, b: f64) -> f64 {
        libm::lgamma(a) + libm::lgamma(b) - libm::lgamma(a + b)
    }

    pub(super) fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
        let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            return max;
        }
        max + xs.map(|x| (x - max).exp()).sum::<f64>().ln()
    }

    /// `x ln y`, with `0 ln 0 = 0`.
    fn xlny(x: f64, y: f64) -> f64 {
        if x == 0.0 { 0.0 } else { x * y.ln() }
    }

    /// ln likelihood of a sequence with `k` successes in `n` at rate `p`.
    pub(super) fn log_lik(k: f64, n: f64, p: f64) -> f64 {
        xlny(k, p) + xlny(n - k, 1.0 - p)
    }

    /// ln e-value against H0: rate ≤ `p0` (evidence the rate is above it).
    pub(super) fn ln_e_above(prior: &Prior, k: f64, n: f64, p0: f64) -> f64 {
        if n <= 0.0 {
            return 0.0;
        }
        prior.ln_marginal(k, n) - log_lik(k, n, (k / n).min(p0))
    }

    /// ln e-value against H0: rate ≥ `p0` (evidence the rate is below it).
    pub(super) fn ln_e_below(prior: &Prior, k: f64, n: f64, p0: f64) -> f64 {
        if n <= 0.0 {
            return 0.0;
        }
        prior.ln_marginal(k, n) - log_lik(k, n, (k / n).max(p0))
    }

    /// The fewest trials, none of them a success, that show a rate below
    /// `p0` (`ln_e_below ≥ thr`): what a side needs at least before its
    /// quantile with `p0` above it can be bounded.
    pub(super) fn samples_to_bound(prior: &Prior, p0: f64, thr: f64) -> f64 {
        let shown = |n: f64| ln_e_below(prior, 0.0, n, p0) >= thr;
        let mut hi = 1.0;
        while !shown(hi) {
            hi *= 2.0;
            if hi > 1e12 {
                return f64::INFINITY;
            }
        }
        let mut lo = hi / 2.0;
        // Integers: the answer is in (lo, hi].
        while hi - lo > 1.0 {
            let mid = ((lo + hi) / 2.0).floor();
            if shown(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }

    /// Anytime upper confidence bound on a rate: the smallest `p0` that
    /// "rate ≥ p0" is rejected for. `None`: not even rates near 1 are.
    pub(super) fn rate_upper_bound(prior: &Prior, k: f64, n: f64, thr: f64) -> Option<f64> {
        let hat = k / n;
        let top = 1.0 - 1e-12;
        if !reaches(ln_e_below(prior, k, n, top), thr) {
            return None;
        }
        let (mut lo, mut hi) = (hat, top);
        for _ in 0..BISECT {
            let mid = 0.5 * (lo + hi);
            if ln_e_below(prior, k, n, mid) >= thr {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// Anytime lower confidence bound on a rate (0 when none).
    pub(super) fn rate_lower_bound(prior: &Prior, k: f64, n: f64, thr: f64) -> f64 {
        let hat = k / n;
        if !reaches(ln_e_above(prior, k, n, 0.0), thr) {
            return 0.0;
        }
        let (mut lo, mut hi) = (0.0, hat);
        for _ in 0..BISECT {
            let mid = 0.5 * (lo + hi);
            if ln_e_above(prior, k, n, mid) >= thr {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// ln of the one-sided normal-mixture SPRT statistic (Robbins;
    /// Johari et al., "Always valid inference") for an estimate `x` of an
    /// effect θ with variance `var`, against H0: θ ≤ 0, mixing over a
    /// half-normal prior of scale `tau` on θ > 0:
    /// `Λ = 2 √(V/(V+τ²)) exp(x²τ²/(2V(V+τ²))) Φ(xτ/√(V(V+τ²)))`.
    /// Under H0 (asymptotically, for a normal estimate) Λ is a
    /// nonnegative supermartingale of mean ≤ 1.
    pub(super) fn ln_msprt(x: f64, var: f64, tau: f64) -> f64 {
        let v = var.max(1e-18);
        let t2 = tau * tau;
        let z = x * tau / (v * (v + t2)).sqrt();
        std::f64::consts::LN_2
            + 0.5 * (v / (v + t2)).ln()
            + x * x * t2 / (2.0 * v * (v + t2))
            + ln_phi(z)
    }

    /// Φ(z), the standard normal CDF.
    pub(super) fn phi(z: f64) -> f64 {
        0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
    }

    /// Φ⁻¹(p), ±∞ at 0 and 1: Acklam's rational approximation (relative
    /// error 1.2e-9) polished by two Halley steps on Φ, to f64 precision.
    /// It replaced a 70-step bisection: the judge calls it dozens of times
    /// per look, and the 10,000-run A/A simulation looks 300,000 times.
    pub(super) fn probit(p: f64) -> f64 {
        if p.is_nan() || p <= 0.0 {
            return f64::NEG_INFINITY;
        }
        if p >= 1.0 {
            return f64::INFINITY;
        }
        const A: [f64; 6] = [
            -3.969_683_028_665_376e1,
            2.209_460_984_245_205e2,
            -2.759_285_104_469_687e2,
            1.383_577_518_672_69e2,
            -3.066_479_806_614_716e1,
            2.506_628_277_459_239,
        ];
        const B: [f64; 5] = [
            -5.447_609_879_822_406e1,
            1.615_858_368_580_409e2,
            -1.556_989_798_598_866e2,
            6.680_131_188_771_972e1,
            -1.328_068_155_288_572e1,
        ];
        const C: [f64; 6] = [
            -7.784_894_002_430_293e-3,
            -3.223_964_580_411_365e-1,
            -2.400_758_277_161_838,
            -2.549_732_539_343_734,
            4.374_664_141_464_968,
            2.938_163_982_698_783,
        ];
        const D: [f64; 4] = [
            7.784_695_709_041_462e-3,
            3.224_671_290_700_398e-1,
            2.445_134_137_142_996,
            3.754_408_661_907_416,
        ];
        let tail = |q: f64| {
            (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
                / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
        };
        const P_LOW: f64 = 0.024_25;
        let mut x = if p < P_LOW {
            tail((-2.0 * p.ln()).sqrt())
        } else if p <= 1.0 - P_LOW {
            let q = p - 0.5;
            let r = q * q;
            (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
                / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
        } else {
            -tail((-2.0 * (1.0 - p).ln()).sqrt())
        };
        for _ in 0..2 {
            let e = phi(x) - p;
            let u = e * (2.0 * std::f64::consts::PI).sqrt() * (0.5 * x * x).exp();
            let next = x - u / (1.0 + 0.5 * x * u);
            // Far in the tails the correction over- or underflows: keep x.
            if next.is_finite() {
                x = next;
            }
        }
        x
    }

    /// ln Φ(z), the standard normal CDF, without underflow to ln 0 for
    /// moderately negative z.
    fn ln_phi(z: f64) -> f64 {
        let p = phi(z);
        if p > 0.0 {
            p.ln()
        } else {
            // Mills ratio: Φ(z) ≈ φ(z)/|z| far in the lower tail.
            -0.5 * z * z - (-z).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
        }
    }

    /// The mixture's scale for an error-rate increase: increases of one to a
    /// few percentage points over the margin are the regressions to catch.
    const TAU_ERROR_RATE: f64 = 0.03;

    /// The maximum-likelihood `(p_s, p_c)` on the boundary `p_c = p_s + margin`
    /// for two independent binomial samples (`ks` of `ns`, `kc` of `nc`).
    fn boundary_fit(ks: f64, ns: f64, kc: f64, nc: f64, margin: f64) -> (f64, f64) {
        // The log-likelihood along the boundary is concave: bisect its slope.
        let (mut lo, mut hi) = ((-margin).max(0.0), (1.0 - margin).min(1.0));
        let slope = |p: f64| {
            ratio(ks, p) - ratio(ns - ks, 1.0 - p) + ratio(kc, p + margin)
                - ratio(nc - kc, 1.0 - p - margin)
        };
        for _ in 0..BISECT {
            let mid = 0.5 * (lo + hi);
            if slope(mid) > 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let p = 0.5 * (lo + hi);
        (p, (p + margin).clamp(0.0, 1.0))
    }

    /// `x / y` with `0 / y = 0`.
    fn ratio(x: f64, y: f64) -> f64 {
        if x == 0.0 { 0.0 } else { x / y }
    }

    /// ln e-value against H0: `p_c − p_s ≤ margin`: the mixture SPRT on
    /// `p̂_c − p̂_s − margin` with the variance at the null's best fit (the
    /// Farrington–Manning score variance), which stays honest for small
    /// counts and never vanishes when one side has no errors yet.
    pub(super) fn ln_e_increase(ks: f64, ns: f64, kc: f64, nc: f64, margin: f64) -> f64 {
        if ns <= 0.0 || nc <= 0.0 {
            return 0.0;
        }
        let (ps, pc) = boundary_fit(ks, ns, kc, nc, margin);
        let var = ps * (1.0 - ps) / ns + pc * (1.0 - pc) / nc;
        ln_msprt(kc / nc - ks / ns - margin, var, TAU_ERROR_RATE)
    }

    /// Margins are searched in (−1, 1); the ends are open.
    const EDGE: f64 = 1.0 - 1e-9;

    /// Anytime lower confidence bound on `p_c − p_s`: the largest margin
    /// the test still rejects. `None` when it rejects none.
    pub(super) fn increase_lower_bound(
        ks: f64,
        ns: f64,
        kc: f64,
        nc: f64,
        thr: f64,
    ) -> Option<f64> {
        let hat = (kc / nc - ks / ns).clamp(-EDGE, EDGE);
        if !reaches(ln_e_increase(ks, ns, kc, nc, -EDGE), thr) {
            return None;
        }
        let (mut lo, mut hi) = (-EDGE, hat);
        for _ in 0..BISECT {
            let mid = 0.5 * (lo + hi);
            if ln_e_increase(ks, ns, kc, nc, mid) >= thr {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    /// Anytime upper confidence bound on `p_c − p_s`.
    pub(super) fn increase_upper_bound(
        ks: f64,
        ns: f64,
        kc: f64,
        nc: f64,
        thr: f64,
    ) -> Option<f64> {
        increase_lower_bound(kc, nc, ks, ns, thr).map(|l| -l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Envoy's default histogram bucket bounds, in ms.
    const ENVOY_BOUNDS: [f64; 20] = [
        0.5,
        1.0,
        5.0,
        10.0,
        25.0,
        50.0,
        100.0,
        250.0,
        500.0,
        1000.0,
        2500.0,
        5000.0,
        10000.0,
        30000.0,
        60000.0,
        300000.0,
        600000.0,
        1800000.0,
        3600000.0,
        f64::INFINITY,
    ];

    #[derive(Clone, Default)]
    struct Side {
        requests: u64,
        errors: u64,
        hist: [u64; 20],
    }

    impl Side {
        /// `n` requests: 5xx with probability `err`, latency log-normal
        /// with median `median_ms` and log-sd `sigma`.
        fn serve(&mut self, rng: &mut StdRng, n: u64, err: f64, median_ms: f64, sigma: f64) {
            for _ in 0..n {
                self.requests += 1;
                if rng.random_bool(err) {
                    self.errors += 1;
                }
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let latency = median_ms * (sigma * z).exp();
                let i = ENVOY_BOUNDS
                    .iter()
                    .position(|b| latency <= *b)
                    .unwrap_or(19);
                self.hist[i] += 1;
            }
        }

        fn evidence(&self, now_ms: u64) -> Evidence {
            Evidence {
                requests: self.requests,
                errors: self.errors,
                latency_ms: ENVOY_BOUNDS.iter().copied().zip(self.hist).collect(),
                last_update_ms: Some(now_ms),
            }
        }
    }

    #[derive(Clone, Copy, Debug)]
    struct Scenario {
        stable_rps: u64,
        canary_rps: u64,
        stable_err: f64,
        canary_err: f64,
        median_ms: f64,
        sigma: f64,
        /// Canary latencies are stable's distribution times this.
        canary_slowdown: f64,
        seconds: u64,
        max_pp: Option<f64>,
        max_ratio: Option<f64>,
        /// The canary serves stable's error rate and latency for this many
        /// seconds first, then `canary_err` and `canary_slowdown`.
        healthy_s: u64,
        /// Whether the error-rate test restarts, as the engine has it.
        restarts: bool,
    }

    /// The restarts' counts from a step's history of cumulative counts
    /// `(at ms, [stable requests, stable errors, canary requests, canary
    /// errors])`, as the engine sums flushes since each restart point.
    fn restarts_at(history: &[(u64, [u64; 4])], first_ms: u64, now: u64) -> Vec<Restart> {
        let cum_at = |ms: u64| {
            history
                .iter()
                .rev()
                .find(|(t, _)| *t <= ms)
                .map_or([0; 4], |h| h.1)
        };
        let latest = cum_at(now);
        restart_points(first_ms, now)
            .into_iter()
            .map(|(index, start)| {
                let base = cum_at(start);
                Restart {
                    index,
                    stable_requests: latest[0] - base[0],
                    stable_errors: latest[1] - base[1],
                    canary_requests: latest[2] - base[2],
                    canary_errors: latest[3] - base[3],
                }
            })
            .collect()
    }

    const T0: u64 = 1_700_000_000_000;

    /// One simulated step evaluated every second: the first second with a
    /// Rollback, and the verdict at the end.
    fn simulate(s: &Scenario, seed: u64) -> (Option<u64>, Verdict) {
        let mut rng = StdRng::seed_from_u64(seed);
        let rules = StopRules {
            max_error_rate_increase_pp: s.max_pp,
            max_p99_ratio: s.max_ratio,
            min_p99_increase_ms: 5.0,
            max_unexpected_mismatch_rate: None,
            halt_on_nack: true,
            latency: Default::default(),
        };
        let analysis = analysis();
        let step = CanaryStep {
            weight: 20,
            cohort: None,
            min_duration_s: s.seconds as f64,
            min_requests: 200,
            manual_gate: false,
        };
        let (mut stable, mut canary) = (Side::default(), Side::default());
        let mut last = Verdict::Hold;
        let mut history = Vec::new();
        for t in 1..=s.seconds {
            stable.serve(&mut rng, s.stable_rps, s.stable_err, s.median_ms, s.sigma);
            let (err, slowdown) = if t > s.healthy_s {
                (s.canary_err, s.canary_slowdown)
            } else {
                (s.stable_err, 1.0)
            };
            canary.serve(&mut rng, s.canary_rps, err, s.median_ms * slowdown, s.sigma);
            let now = T0 + t * 1000;
            history.push((
                now,
                [
                    stable.requests,
                    stable.errors,
                    canary.requests,
                    canary.errors,
                ],
            ));
            let (se, ce) = (stable.evidence(now), canary.evidence(now));
            let j = if s.restarts {
                let r = restarts_at(&history, T0, now);
                judge_with_restarts(&rules, &analysis, &step, &se, &ce, &r, now, T0)
            } else {
                judge(&rules, &analysis, &step, &se, &ce, now, T0)
            };
            if j.verdict == Verdict::Rollback {
                return (Some(t), Verdict::Rollback);
            }
            last = j.verdict;
        }
        (None, last)
    }

    fn analysis() -> Analysis {
        Analysis {
            interval_s: 1.0,
            max_staleness_s: 10.0,
            min_requests_per_side: 100,
            confidence: 0.99,
        }
    }

    fn base() -> Scenario {
        Scenario {
            stable_rps: 200,
            canary_rps: 50,
            stable_err: 0.01,
            canary_err: 0.01,
            median_ms: 50.0,
            sigma: 0.4,
            canary_slowdown: 1.0,
            seconds: 120,
            max_pp: Some(1.0),
            max_ratio: Some(1.5),
            healthy_s: 0,
            restarts: true,
        }
    }

    /// Rollbacks over `runs` seeded runs, and how many within `by_s` seconds.
    fn rollbacks(s: &Scenario, runs: u64, by_s: u64) -> (usize, usize) {
        let times: Vec<u64> = (0..runs).filter_map(|seed| simulate(s, seed).0).collect();
        let within = times.iter().filter(|t| **t <= by_s).count();
        (times.len(), within)
    }

    // === simulations: the design goals ===

    /// (a) Identical canary (1% 5xx, same latency), both stop rules, looked
    /// at every second for a 120 s step at 50 canary / 200 stable req/s:
    /// no false rollbacks (≤ 2 in 200 allowed), and the healthy canary is
    /// promoted at the end.
    #[test]
    fn sim_identical_canary_is_not_rolled_back() {
        let s = base();
        let mut rolled_back = 0;
        let mut promoted = 0;
        for seed in 0..200 {
            match simulate(&s, seed) {
                (Some(_), _) => rolled_back += 1,
                (None, Verdict::Promote) => promoted += 1,
                _ => {}
            }
        }
        eprintln!("A/A: {rolled_back}/200 rolled back, {promoted}/200 promoted at 120 s");
        assert!(
            rolled_back <= 2,
            "{rolled_back} false rollbacks in 200 runs"
        );
        assert!(
            promoted >= 195,
            "only {promoted} of 200 healthy canaries promoted"
        );
    }

    /// (b) +5 pp 5xx (1% → 6%, margin 1 pp) at 50 canary req/s. How fast
    /// depends on stable's traffic too, since stable's rate is estimated:
    /// at weight 5 (950 stable req/s) ≥ 95% are caught within 10 s; at
    /// weight 20 (200 stable req/s) about 94% (measured 936 of 1,000).
    #[test]
    fn sim_plus_5pp_is_caught_within_10s() {
        for (stable_rps, need) in [(950, 190), (200, 180)] {
            let s = Scenario {
                canary_err: 0.06,
                stable_rps,
                seconds: 20,
                ..base()
            };
            let (caught, within) = rollbacks(&s, 200, 10);
            eprintln!(
                "+5 pp, stable {stable_rps} req/s: {within}/200 within 10 s, {caught}/200 within 20 s"
            );
            assert!(
                within >= need,
                "stable {stable_rps} req/s: {within}/200 within 10 s"
            );
            assert_eq!(caught, 200);
        }
    }

    /// (b) +2 pp (1% → 3%) within 30 s: with a 0 pp margin (any increase
    /// stops). With a 1 pp margin only 1 pp of the 2 is evidence, and no
    /// test can catch that in 30 s at 50 req/s: even a single z-test at
    /// 30 s has about 2/3 power.
    #[test]
    fn sim_plus_2pp_is_caught_within_30s() {
        let s = Scenario {
            canary_err: 0.03,
            max_pp: Some(0.0),
            seconds: 40,
            ..base()
        };
        let (caught, within) = rollbacks(&s, 200, 30);
        eprintln!("+2 pp, margin 0: {within}/200 within 30 s, {caught}/200 within 40 s");
        assert!(within >= 190, "{within}/200 within 30 s");
    }

    /// Median and 90th percentile of the seconds from a regression's start
    /// to its rollback over `runs` seeded runs (a run never rolled back
    /// counts as `u64::MAX`).
    fn detection_times(s: &Scenario, runs: u64) -> (u64, u64) {
        median_p90(
            (0..runs)
                .map(|seed| {
                    simulate(s, seed)
                        .0
                        .map_or(u64::MAX, |t| t.saturating_sub(s.healthy_s))
                })
                .collect(),
        )
    }

    /// The median and 90th percentile of `times`.
    fn median_p90(mut times: Vec<u64>) -> (u64, u64) {
        times.sort_unstable();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        (at(0.5), at(0.9))
    }

    /// The benchmark's case: 100 req/s per side, 10 s healthy, then the
    /// canary at `canary_err` 5xx (stable 1%), judged on the error rate only.
    fn mid_step(canary_err: f64, max_pp: f64) -> Scenario {
        Scenario {
            stable_rps: 100,
            canary_rps: 100,
            canary_err,
            max_pp: Some(max_pp),
            max_ratio: None,
            healthy_s: 10,
            seconds: 70,
            ..base()
        }
    }

    /// Where the time goes when a regression starts mid-step (the
    /// benchmark's case: 10 s healthy at 100 req/s per side, then +5 pp, or
    /// +2 pp against a 0 pp margin): judged on the whole window, the healthy
    /// seconds dilute it; the restarts judge the newer windows too, at the
    /// price of the whole window's weight (½) when the regression is there
    /// from the start. Measured (200 runs, median and 90th percentile after
    /// the regression starts): +5 pp in (7, 11) s with restarts against
    /// (10, 14) s without; +2 pp at margin 0 in (13, 23) s against (15, 26) s;
    /// from the start of the step (5, 9) s and (11, 20) s.
    #[test]
    fn sim_restarts_undo_the_dilution_of_a_mid_step_regression() {
        for (canary_err, max_pp, with_max, without_min) in [(0.06, 1.0, 8, 9), (0.03, 0.0, 16, 15)]
        {
            let s = mid_step(canary_err, max_pp);
            let with = detection_times(&s, 200);
            let without = detection_times(
                &Scenario {
                    restarts: false,
                    ..s
                },
                200,
            );
            let fresh = detection_times(&Scenario { healthy_s: 0, ..s }, 200);
            eprintln!(
                "{:.0} pp (margin {max_pp} pp) after 10 healthy s: median, p90 {with:?} s with restarts, {without:?} without; from the start {fresh:?}",
                (canary_err - 0.01) * 100.0
            );
            assert!(with.0 <= with_max, "{with:?}");
            assert!(without.0 >= without_min, "{without:?}");
            assert!(with.1 < without.1, "{with:?} vs {without:?}");
        }
    }

    /// Seconds an oracle needs: it knows when the regression starts and runs
    /// the error-rate e-process from exactly then at the whole α (no
    /// restart weight, no healthy seconds diluting it), looked at after
    /// every 1 s flush at `rps` per side. Median and 90th percentile over
    /// `runs` seeds (never caught within 120 s counts as `u64::MAX`).
    fn oracle_times(rps: u64, canary_err: f64, max_pp: f64, runs: u64) -> (u64, u64) {
        let thr = (1.0 / (1.0 - analysis().confidence)).ln();
        let times: Vec<u64> = (0..runs)
            .map(|seed| {
                let mut rng = StdRng::seed_from_u64(seed);
                let (mut stable, mut canary) = (Side::default(), Side::default());
                (1..=120)
                    .find(|_| {
                        stable.serve(&mut rng, rps, 0.01, 10.0, 0.1);
                        canary.serve(&mut rng, rps, canary_err, 10.0, 0.1);
                        let (ks, ns) = (stable.errors as f64, stable.requests as f64);
                        let (kc, nc) = (canary.errors as f64, canary.requests as f64);
                        ns >= 100.0 && stats::ln_e_increase(ks, ns, kc, nc, max_pp / 100.0) >= thr
                    })
                    .unwrap_or(u64::MAX)
            })
            .collect();
        median_p90(times)
    }

    /// Where the floor is (issue 11's speed goals): the judge, which must
    /// find a mid-step regression's start itself, against the oracle that
    /// knows it. The difference is the restarts' price: ln(1/weight) of
    /// evidence, about 3.6 for a start 10 s into the step. Measured (200
    /// runs, median and 90th percentile of seconds of data): +5 pp against a
    /// 1 pp margin, oracle (4, 6), judge (7, 11); +2 pp against 0 pp,
    /// oracle (9, 16), judge (13, 23). End to end, a stats flush and a look
    /// come on top (the benchmark's `detect_s`).
    #[test]
    fn sim_the_floor_for_a_regression_at_an_unknown_time() {
        for (canary_err, max_pp) in [(0.06, 1.0), (0.03, 0.0)] {
            let oracle = oracle_times(100, canary_err, max_pp, 200);
            let s = mid_step(canary_err, max_pp);
            let judged = detection_times(&s, 200);
            eprintln!(
                "{:.0} pp over {max_pp} pp: oracle (median, p90) {oracle:?} s, judge {judged:?} s",
                (canary_err - 0.01) * 100.0
            );
            // The restarts cost at most a few seconds over the oracle.
            assert!(judged.0 <= oracle.0 + 3, "{judged:?} vs {oracle:?}");
            // No test of this kind beats the oracle: at +5 pp its median
            // alone is most of the benchmark's 6 s goal.
            assert!(oracle.0 >= 4, "{oracle:?}");
        }
    }

    /// (c) p99 doubled (every latency × 2; p99 127 → 254 ms, log-normal
    /// σ 0.4, Envoy's buckets), identical error rates, 50 canary req/s:
    /// caught within 15 s. (The p99 needs 500 canary samples: 10 s.)
    #[test]
    fn sim_doubled_p99_is_caught_within_15s() {
        let s = Scenario {
            canary_slowdown: 2.0,
            seconds: 30,
            ..base()
        };
        let (caught, within) = rollbacks(&s, 200, 15);
        eprintln!("p99 × 2: {within}/200 within 15 s, {caught}/200 within 30 s");
        assert!(within >= 190, "{within}/200 within 15 s");
    }

    /// (d) Identical latency, p99 rule only, light and heavy tails: no
    /// rollbacks in ≥ 99% of runs.
    #[test]
    fn sim_identical_latency_is_not_rolled_back() {
        for sigma in [0.25, 0.8] {
            let s = Scenario {
                sigma,
                max_pp: None,
                ..base()
            };
            let (rolled_back, _) = rollbacks(&s, 200, 120);
            eprintln!("A/A latency σ {sigma}: {rolled_back}/200 rolled back");
            assert!(rolled_back <= 2, "σ {sigma}: {rolled_back}/200");
        }
    }

    // === tails behind empty buckets (issue 11) ===

    /// `envoy/bootstrap.yaml`'s `upstream_rq_time` bounds, in ms.
    const FINE_BOUNDS: [f64; 45] = [
        0.5,
        1.0,
        1.25,
        1.5,
        2.0,
        2.5,
        3.0,
        4.0,
        5.0,
        6.0,
        8.0,
        10.0,
        12.5,
        15.0,
        20.0,
        25.0,
        30.0,
        40.0,
        50.0,
        60.0,
        80.0,
        100.0,
        125.0,
        150.0,
        200.0,
        250.0,
        300.0,
        400.0,
        500.0,
        600.0,
        800.0,
        1000.0,
        1250.0,
        1500.0,
        2000.0,
        2500.0,
        3000.0,
        4000.0,
        5000.0,
        7500.0,
        10000.0,
        15000.0,
        30000.0,
        60000.0,
        f64::INFINITY,
    ];

    /// A mixture of log-normal modes `(share, median ms, log-sd)` as
    /// expected bucket counts of `n` samples over `bounds`, compacted the
    /// way the metrics book stores it (runs of empty buckets kept as one).
    fn modes(bounds: &[f64], n: u64, modes: &[(f64, f64, f64)]) -> Vec<(f64, u64)> {
        let cdf = |x: f64| -> f64 {
            if x.is_infinite() {
                return 1.0;
            }
            modes
                .iter()
                .map(|(w, m, sd)| w * stats::phi((x / m).ln() / sd))
                .sum()
        };
        let mut prev = 0.0;
        let raw: Vec<(f64, u64)> = bounds
            .iter()
            .map(|&b| {
                let f = cdf(b);
                let c = ((f - prev) * n as f64).round() as u64;
                prev = f;
                (b, c)
            })
            .collect();
        compacted(&raw)
    }

    /// Runs of empty buckets as one, trailing empty ones gone.
    fn compacted(raw: &[(f64, u64)]) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        for (i, &(b, c)) in raw.iter().enumerate() {
            let next_full = raw.get(i + 1).is_some_and(|n| n.1 > 0);
            if c > 0 || next_full {
                out.push((b, c));
            }
        }
        out
    }

    /// Issue 11's case: 95% fast, 5% at `slow_ms` (Envoy measures a sleep
    /// a little above its length), no errors.
    fn tail_gap(n: u64, slow_ms: f64) -> Evidence {
        Evidence {
            requests: n,
            errors: 0,
            latency_ms: modes(
                &FINE_BOUNDS,
                n,
                &[(0.95, 3.0, 0.3), (0.05, slow_ms * 1.02, 0.02)],
            ),
            last_update_ms: Some(NOW),
        }
    }

    #[test]
    fn a_tail_that_moved_from_40_to_90_ms_behind_empty_buckets_rolls_back() {
        let stable = tail_gap(16_000, 40.0);
        let j = run(&stable, &tail_gap(4_000, 90.0));
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        let c = check(&j, "p99_latency");
        assert_eq!(c.status, CheckStatus::Fail);
        // The reason names p99 and both sides, with the buckets that hold them.
        assert!(
            j.reason.starts_with("canary p99 ")
                && j.reason.contains("(in (80, 100 ms]) vs stable ")
                && j.reason.contains("(in (40, 50 ms])"),
            "{}",
            j.reason
        );
        assert!(
            (80.0..=100.0).contains(&c.measured["canary_p99_ms"]),
            "{c:?}"
        );
        assert!(
            (40.0..=50.0).contains(&c.measured["stable_p99_ms"]),
            "{c:?}"
        );
        assert_eq!(c.measured["canary_p99_bucket_lo_ms"], 80.0);
        assert_eq!(c.measured["canary_p99_bucket_hi_ms"], 100.0);
        assert_eq!(c.measured["stable_p99_bucket_hi_ms"], 50.0);
        assert!(c.measured.contains_key("canary_p50_ms"));
        assert!(c.measured.contains_key("stable_p99.9_bucket_hi_ms"));

        // The same tail on both sides passes.
        let j = run(&stable, &tail_gap(4_000, 40.0));
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);

        // What the old ingestion did: empty buckets dropped, so canary's
        // (80, 100] read as (10, 100]. The p99 then lands far below 80 ms:
        // the smear this issue is about.
        let mut smeared = tail_gap(4_000, 90.0);
        smeared.latency_ms.retain(|b| b.1 > 0);
        let j = run(&stable, &smeared);
        let p99 = check(&j, "p99_latency").measured["canary_p99_ms"];
        assert!(p99 < 80.0, "{p99}");
    }

    #[test]
    fn p50_p90_p999_and_slow_share_rules() {
        let stable = tail_gap(16_000, 40.0);
        let moved = tail_gap(4_000, 90.0);
        let mut r = rules();
        r.max_p99_ratio = None;
        r.latency.max_p50_ratio = Some(1.5);
        r.latency.max_p90_ratio = Some(1.5);
        // The fast mode did not move: p50 and p90 pass...
        let j = judge(&r, &analysis(), &step(20), &stable, &moved, NOW, T0);
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
        assert_eq!(check(&j, "p50_latency").status, CheckStatus::Pass);
        assert_eq!(check(&j, "p90_latency").status, CheckStatus::Pass);
        // ..."5% slower than 60 ms, where stable has none" does not.
        r.latency.slow_request_ms = Some(60.0);
        r.latency.max_slow_share_increase_pp = Some(1.0);
        let j = judge(&r, &analysis(), &step(20), &stable, &moved, NOW, T0);
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        let c = check(&j, "slow_share");
        assert_eq!(
            (c.measured["canary_slow"], c.measured["stable_slow"]),
            (200.0, 0.0)
        );
        assert!(
            j.reason.starts_with(
                "canary requests slower than 60 ms 5.0% vs stable 0.0% (+5.0 pp > 1 pp allowed"
            ),
            "{}",
            j.reason
        );
        let mut r = rules();
        r.latency.max_p999_ratio = Some(1.5);
        let j = judge(
            &r,
            &analysis(),
            &step(20),
            &stable,
            &tail_gap(4_000, 40.0),
            NOW,
            T0,
        );
        // A p99.9 with 4,000 canary samples: the exact test runs (stable's
        // 16,000 bound its p99.9), the interpolated one waits and says so.
        let c = check(&j, "p99.9_latency");
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.detail);
        assert!(
            c.detail.ends_with(&format!(
                "interpolated: waiting for latency samples: stable {} and canary {} of 5000 each",
                c.measured["stable_samples"], c.measured["canary_samples"]
            )),
            "{}",
            c.detail
        );
        // With fewer stable samples than bound a p99.9, it holds, saying how many.
        let j = judge(
            &r,
            &analysis(),
            &step(20),
            &tail_gap(3_000, 40.0),
            &tail_gap(3_000, 40.0),
            NOW,
            T0,
        );
        assert_eq!(j.verdict, Verdict::Hold);
        let c = check(&j, "p99.9_latency");
        let (need, n) = (
            c.measured["stable_samples_needed"],
            c.measured["stable_samples"],
        );
        assert_eq!(
            j.reason,
            format!(
                "p99.9 latency: exact: waiting for stable latency samples to bound its p99.9: {n} of {need}; interpolated: waiting for latency samples: stable {n} and canary {n} of 5000 each"
            )
        );
        // A p50 that doubled rolls back.
        let mut r = rules();
        r.max_p99_ratio = None;
        r.latency.max_p50_ratio = Some(1.5);
        let j = judge(
            &r,
            &analysis(),
            &step(20),
            &ev(20_000, 200, 50.0, Some(NOW)),
            &ev(5_000, 50, 100.0, Some(NOW)),
            NOW,
            T0,
        );
        assert_eq!(
            check(&j, "p50_latency").status,
            CheckStatus::Fail,
            "{}",
            j.reason
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Bi- and multimodal latencies with gaps of empty buckets: each
        /// side's p99 estimate lies in the bucket that holds the true p99,
        /// and so do the other reported quantiles.
        #[test]
        fn prop_quantiles_lie_in_the_bucket_of_the_true_quantile(
            mode_list in prop::collection::vec((0.01f64..1.0, 0.7f64..3000.0, 0.01f64..0.5), 1..=4),
            n in 100u64..50_000,
        ) {
            let total_w: f64 = mode_list.iter().map(|m| m.0).sum();
            let ms: Vec<(f64, f64, f64)> =
                mode_list.iter().map(|&(w, m, sd)| (w / total_w, m, sd)).collect();
            let raw = modes(&FINE_BOUNDS, n, &ms);
            let h = Histogram::new(&raw).unwrap();
            prop_assume!(h.total > 0.0);
            for (_, tail) in REPORTED_QUANTILES {
                // The true quantile's bucket from the counts alone: the
                // first bucket whose cumulative count reaches (1 − tail) n.
                let need = (1.0 - tail) * h.total;
                let mut below = 0.0;
                let mut lower = 0.0;
                let mut truth = None;
                for &(upper, c) in &raw {
                    below += c as f64;
                    if c > 0 && below >= need {
                        truth = Some((lower, upper));
                        break;
                    }
                    lower = upper;
                }
                let (lo, hi) = truth.unwrap();
                let q = h.quantile_above(tail * h.total, OpenBucket::LowerBound);
                prop_assert!(lo <= q && q <= hi, "tail {tail}: {q} not in ({lo}, {hi}] for {raw:?}");
                prop_assert_eq!(h.bucket_of(tail * h.total), Some((lo, hi)));
            }
        }

        /// The tail test on issue 11's shape at any fast median, slow share
        /// and sample size: 40 → 90 ms rolls back, 40 → 40 ms passes.
        #[test]
        fn prop_a_moved_tail_rolls_back_and_an_identical_one_passes(
            fast in 1.0f64..8.0,
            share in 0.03f64..0.1,
            n_canary in 2_000u64..20_000,
        ) {
            let side = |n: u64, slow: f64| Evidence {
                requests: n,
                errors: 0,
                latency_ms: modes(&FINE_BOUNDS, n, &[(1.0 - share, fast, 0.3), (share, slow * 1.02, 0.02)]),
                last_update_ms: Some(NOW),
            };
            let stable = side(4 * n_canary, 40.0);
            let j = run(&stable, &side(n_canary, 90.0));
            prop_assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
            let j = run(&stable, &side(n_canary, 40.0));
            prop_assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
        }
    }

    // === restarts ===

    #[test]
    fn restart_points_and_weights() {
        assert!(restart_points(T0, T0).is_empty());
        // A restart starts strictly before the look, to have a window.
        assert!(restart_points(T0, T0 + 2_000).is_empty());
        assert_eq!(restart_points(T0, T0 + 2_001), vec![(1, T0 + 2_000)]);
        let p = restart_points(T0, T0 + 1_000_000);
        assert_eq!(p.len(), MAX_RESTARTS);
        assert_eq!(p.last(), Some(&(499, T0 + 998_000)));
        // Over an unbounded step the restarts' weights sum to ½.
        let total: f64 = (1..2_000_000).map(restart_weight).sum();
        assert!(total <= 0.5 && total > 0.499, "{total}");
        assert!(restart_weight(1) > restart_weight(5) && restart_weight(5) > restart_weight(50));
    }

    /// A regression that began mid-step: diluted in the whole window (1% vs
    /// 2% over 3,000 requests a side: within the 1 pp margin), plain since
    /// restart 5 (1% vs 9% over 500). The restarted test rolls it back and
    /// names the restart; the whole window alone does not. Restarts off the
    /// grid, repeated or impossible are not judged.
    #[test]
    fn a_restart_catches_a_diluted_regression_and_names_itself() {
        let stable = ev(3_000, 30, 50.0, Some(NOW));
        let canary = ev(3_000, 60, 50.0, Some(NOW));
        let recent = Restart {
            index: 5,
            stable_requests: 500,
            stable_errors: 5,
            canary_requests: 500,
            canary_errors: 45,
        };
        let j = judge(&rules(), &analysis(), &step(20), &stable, &canary, NOW, T0);
        assert_eq!(
            check(&j, "error_rate").status,
            CheckStatus::Pass,
            "{}",
            j.reason
        );
        let with = |restarts: &[Restart]| {
            judge_with_restarts(
                &rules(),
                &analysis(),
                &step(20),
                &stable,
                &canary,
                restarts,
                NOW,
                T0,
            )
        };
        let j = with(&[recent]);
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        assert!(
            j.reason.contains(
                "; since restart 5 (10 s into the step's evidence): canary 45 of 500 vs stable 5 of 500, +8.0 pp > 1 pp allowed; p = "
            ),
            "{}",
            j.reason
        );
        let c = check(&j, "error_rate");
        assert_eq!(c.measured["restart_index"], 5.0);
        assert_eq!(c.measured["restarts_judged"], 1.0);
        // Hostile or broken restarts: none is judged.
        let bad = [
            Restart { index: 0, ..recent },
            Restart {
                canary_errors: 501,
                ..recent
            },
            Restart {
                canary_requests: 99,
                ..recent
            },
        ];
        let j = with(&bad);
        assert_eq!(
            check(&j, "error_rate").status,
            CheckStatus::Pass,
            "{}",
            j.reason
        );
        assert_eq!(check(&j, "error_rate").measured["restarts_judged"], 0.0);
        // A repeated index counts once: the first given.
        let healthy = Restart {
            canary_errors: 5,
            ..recent
        };
        let j = with(&[healthy, recent]);
        assert_eq!(
            check(&j, "error_rate").status,
            CheckStatus::Pass,
            "{}",
            j.reason
        );
    }

    // === small samples: the exact tail test (issue 11, item 3) ===

    /// Issue 11's tail at a low-traffic step: 300 canary samples, fewer
    /// than the interpolated test's 500. The exact test rolls the moved
    /// tail back and passes an identical one; the step promotes as soon as
    /// its duration and requests are met.
    #[test]
    fn a_small_canary_sample_is_judged_exactly() {
        let stable = tail_gap(20_000, 40.0);
        let j = run(&stable, &tail_gap(300, 90.0));
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        let c = check(&j, "p99_latency");
        assert!(c.measured["canary_samples"] < 500.0);
        assert_eq!(c.measured["stable_p99_upper_bound_ms"], 50.0);
        assert_eq!(c.measured["exact_limit_ms"], 75.0);
        let n = c.measured["canary_samples"];
        assert_eq!(c.measured["exact_canary_above_limit"], 15.0);
        assert!(
            j.reason.starts_with("canary p99 ")
                && j.reason.contains(" vs stable ")
                && j.reason.contains(&format!(": exact: 15 of {n} canary samples (5.0%) above 75 ms (×1.5 stable's p99 bound 50 ms), where 1.0% is allowed; p = ")),
            "{}",
            j.reason
        );
        let j = run(&stable, &tail_gap(300, 40.0));
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
    }

    /// Exact at bucket bounds, conservative inside a bucket: with the limit
    /// on a bound, the count above it is the true count and the quantile
    /// bound is the bound itself; with the limit inside a bucket, that
    /// bucket's samples are left out of the count (some may be above the
    /// limit, none is counted that might be below it).
    #[test]
    fn the_tail_test_is_exact_at_bucket_bounds_and_conservative_inside() {
        let stable = Histogram::new(&[(40.0, 0), (50.0, 10_000), (f64::INFINITY, 0)]).unwrap();
        let canary = Histogram::new(&[
            (40.0, 0),
            (50.0, 990),
            (80.0, 0),
            (100.0, 3),
            (125.0, 7),
            (f64::INFINITY, 0),
        ])
        .unwrap();
        let prior = stats::Prior::around(P99_TAIL);
        let thr = (EXACT_SHARES / 0.01f64).ln();
        assert_eq!(
            stable.upper_bound_of_quantile(P99_TAIL, &prior, thr),
            Some(50.0)
        );
        // R = 2: the limit is 100 ms, a bound. Exactly the 7 samples above it.
        let ExactTail::Ran {
            limit_ms,
            canary_above,
            ..
        } = exact_tail(&stable, &canary, P99_TAIL, 2.0, 0.0, 0.01)
        else {
            panic!("the exact test did not run");
        };
        assert_eq!((limit_ms, canary_above), (100.0, 7.0));
        // The interpolated count agrees at a bound: the CDF there is counted.
        assert!((canary.count_above(100.0) - 7.0).abs() < 1e-9);
        // R = 1.9: the limit, 95 ms, is inside (80, 100]: between 7 and 10
        // samples are above it; the exact test counts 7, never more.
        let ExactTail::Ran {
            limit_ms,
            canary_above,
            ..
        } = exact_tail(&stable, &canary, P99_TAIL, 1.9, 0.0, 0.01)
        else {
            panic!("the exact test did not run");
        };
        assert_eq!((limit_ms, canary_above), (95.0, 7.0));
        let interpolated = canary.count_above(95.0);
        assert!((7.0..=10.0).contains(&interpolated), "{interpolated}");
        // A quantile at a bucket edge is the edge: 99 of 100 at or below 10.
        let h = Histogram::new(&[(10.0, 99), (20.0, 1)]).unwrap();
        assert_eq!(h.quantile_above(1.0, OpenBucket::LowerBound), 10.0);
        assert_eq!(h.bucket_of(1.0), Some((0.0, 10.0)));
    }

    /// Once the exact test's e-value reaches a threshold, a larger count
    /// above the limit (same sample size) reaches it too: what makes
    /// counting fewer samples than the truth (limit inside a bucket, or
    /// above the true limit while stable's bound holds) conservative. (The
    /// e-value itself is not monotone where it is below 1, k/n under the
    /// tail share: there the null's best fit moves with k.)
    #[test]
    fn the_exact_e_value_reaches_a_threshold_for_every_larger_count() {
        for tail in [0.5, 0.1, 0.01, 0.001] {
            let prior = stats::Prior::around(tail);
            for n in [1u32, 2, 5, 10, 37, 100, 300, 1000, 5000, 20_000] {
                let n = f64::from(n);
                for thr in [1e-9, 20f64.ln(), 100f64.ln(), 400f64.ln(), 4000f64.ln()] {
                    let step = (n / 400.0).max(1.0);
                    let mut reached: Option<f64> = None;
                    let mut k = 0.0;
                    while k <= n {
                        let e = stats::ln_e_above(&prior, k, n, tail);
                        if let Some(first) = reached {
                            assert!(
                                e >= thr,
                                "tail {tail} n {n}: k {first} reaches {thr}, k {k} not ({e})"
                            );
                        } else if e >= thr {
                            reached = Some(k);
                        }
                        k += step;
                    }
                }
            }
        }
    }

    /// Calibration of the exact test where it is tightest: stable's p99 in
    /// (5, 6] ms (bounded at 6), the canary with exactly 1% of its samples
    /// above 1.5 × 6 = 9 ms (so "at most 1% above the limit" holds with
    /// equality), looked at every 10 canary samples from 10 to 600 (stable
    /// growing 20 times as fast): rolled back in at most 1% of 2,000 runs
    /// (the rule's α; the exact test has half of it).
    #[test]
    fn sim_the_exact_tail_test_holds_its_level_at_small_samples() {
        let stable = aa_shape("stable", 0.0, &[(0.989, 2.8, 0.02), (0.011, 5.5, 0.02)]);
        let canary = aa_shape("canary", 0.0, &[(0.99, 2.8, 0.02), (0.01, 11.0, 0.02)]);
        let draw = |rng: &mut StdRng, shape: &AaShape, hist: &mut [u64; 45], n: u64| {
            for _ in 0..n {
                let u: f64 = rng.random();
                let i = shape.cumulative.partition_point(|c| *c < u).min(44);
                hist[i] += 1;
            }
        };
        let ev = |hist: &[u64; 45]| Evidence {
            requests: hist.iter().sum(),
            errors: 0,
            latency_ms: compacted(&FINE_BOUNDS.iter().copied().zip(*hist).collect::<Vec<_>>()),
            last_update_ms: Some(NOW),
        };
        let runs = 2_000;
        let mut rolled_back = 0;
        let mut judged = 0;
        for seed in 0..runs {
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut hs, mut hc) = ([0u64; 45], [0u64; 45]);
            for _ in 0..60 {
                draw(&mut rng, &stable, &mut hs, 200);
                draw(&mut rng, &canary, &mut hc, 10);
                let c = latency_check(P99, 1.5, 0.0, 0.01, &ev(&hs), &ev(&hc));
                if c.measured.contains_key("exact_limit_ms") {
                    judged += 1;
                }
                if c.status == CheckStatus::Fail {
                    rolled_back += 1;
                    break;
                }
            }
        }
        eprintln!(
            "exact tail test at the boundary: {rolled_back} of {runs} rolled back, {judged} looks judged"
        );
        assert!(judged > 0);
        assert!(rolled_back * 100 <= runs, "{rolled_back} of {runs}");
    }

    // === 10,000 seeded A/A runs (issue 11) ===

    /// One A/A shape: the share of requests per bucket of [`FINE_BOUNDS`]
    /// (cumulative, for inverse-CDF draws) and the 5xx rate, both sides alike.
    struct AaShape {
        name: &'static str,
        cumulative: Vec<f64>,
        err: f64,
    }

    fn aa_shape(name: &'static str, err: f64, m: &[(f64, f64, f64)]) -> AaShape {
        let cdf = |x: f64| -> f64 {
            if x.is_infinite() {
                return 1.0;
            }
            m.iter()
                .map(|(w, med, sd)| w * stats::phi((x / med).ln() / sd))
                .sum()
        };
        AaShape {
            name,
            cumulative: FINE_BOUNDS.iter().map(|&b| cdf(b)).collect(),
            err,
        }
    }

    /// One A/A rollout step simulated one stats flush (1 s) at a time, each
    /// request drawn from `shape` on both sides, judged after every flush
    /// as the engine does; whether it was ever rolled back, and why.
    fn aa_run(
        shape: &AaShape,
        seed: u64,
        canary_rps: u64,
        stable_rps: u64,
        secs: u64,
    ) -> Option<String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let rules = rules();
        let a = analysis();
        let step = CanaryStep {
            weight: 20,
            cohort: None,
            min_duration_s: secs as f64,
            min_requests: 0,
            manual_gate: false,
        };
        let mut sides = [(0u64, 0u64, [0u64; 45]), (0u64, 0u64, [0u64; 45])];
        let mut history = Vec::new();
        for t in 1..=secs {
            for (side, rps) in sides.iter_mut().zip([stable_rps, canary_rps]) {
                for _ in 0..rps {
                    side.0 += 1;
                    if rng.random_bool(shape.err) {
                        side.1 += 1;
                    }
                    let u: f64 = rng.random();
                    let i = shape.cumulative.partition_point(|c| *c < u).min(44);
                    side.2[i] += 1;
                }
            }
            let now = T0 + t * 1000;
            let ev = |side: &(u64, u64, [u64; 45])| Evidence {
                requests: side.0,
                errors: side.1,
                latency_ms: compacted(&FINE_BOUNDS.iter().copied().zip(side.2).collect::<Vec<_>>()),
                last_update_ms: Some(now),
            };
            history.push((now, [sides[0].0, sides[0].1, sides[1].0, sides[1].1]));
            let restarts = restarts_at(&history, T0, now);
            let j = judge_with_restarts(
                &rules,
                &a,
                &step,
                &ev(&sides[0]),
                &ev(&sides[1]),
                &restarts,
                now,
                T0,
            );
            if j.verdict == Verdict::Rollback {
                return Some(j.reason);
            }
        }
        None
    }

    /// 10,000 seeded A/A steps (identical canary; uni-, bi- and trimodal
    /// latency, a tail share right at 1% where stable's p99 jumps between
    /// modes from one look to the next; 10 to 100 canary req/s; looked at
    /// after every flush for 30 s, both stop rules): at most 0.1% are
    /// rolled back.
    #[test]
    fn sim_10000_aa_runs_roll_back_at_most_one_in_a_thousand() {
        let shapes = [
            aa_shape("log-normal", 0.01, &[(1.0, 10.0, 0.5)]),
            aa_shape(
                "bimodal 5% at 40 ms",
                0.005,
                &[(0.95, 3.0, 0.3), (0.05, 40.8, 0.02)],
            ),
            aa_shape(
                "bimodal 1% at 90 ms",
                0.01,
                &[(0.99, 3.0, 0.3), (0.01, 91.8, 0.02)],
            ),
            aa_shape(
                "trimodal",
                0.002,
                &[(0.9, 2.0, 0.2), (0.08, 25.0, 0.1), (0.02, 300.0, 0.05)],
            ),
        ];
        let rates = [(10, 40), (30, 120), (100, 100)];
        let runs = 10_000u64;
        let mut rolled_back = Vec::new();
        for seed in 0..runs {
            let shape = &shapes[(seed % 4) as usize];
            let (c, s) = rates[((seed / 4) % 3) as usize];
            if let Some(reason) = aa_run(shape, seed, c, s, 30) {
                rolled_back.push(format!(
                    "{} {c}/{s} req/s seed {seed}: {reason}",
                    shape.name
                ));
            }
        }
        eprintln!("A/A: {} of {runs} rolled back", rolled_back.len());
        for r in &rolled_back {
            eprintln!("  {r}");
        }
        assert!(
            rolled_back.len() as u64 <= runs / 1000,
            "{} of {runs} A/A runs rolled back: {rolled_back:#?}",
            rolled_back.len()
        );
    }

    // === business metrics (issue 15) ===

    fn metric(name: &str, limit: MetricLimit) -> MetricRule {
        MetricRule {
            name: name.into(),
            events: r#"e{v="{{side}}"}"#.into(),
            total: r#"t{v="{{side}}"}"#.into(),
            limit,
        }
    }

    fn tallies(s: (u64, u64), c: (u64, u64), at: Option<u64>) -> MetricEvidence {
        use crate::evidence::Tally;
        MetricEvidence {
            name: "m".into(),
            stable: Tally {
                events: s.0,
                total: s.1,
            },
            canary: Tally {
                events: c.0,
                total: c.1,
            },
            last_update_ms: at,
        }
    }

    #[test]
    fn business_metrics_judge_canary_against_stable() {
        let a = analysis();
        let now = T0 + 60_000;
        let fresh = Some(now - 1_000);
        let completion = metric("checkout_completion", MetricLimit::MaxDecreasePp(2.0));
        let dropped = metric_check(
            &completion,
            Some(&tallies((970, 1000), (900, 1000), fresh)),
            &a,
            now,
        );
        assert_eq!(dropped.status, CheckStatus::Fail, "{}", dropped.detail);
        assert!(
            dropped
                .detail
                .contains("canary 90.0% (900 of 1000) vs stable 97.0% (970 of 1000)"),
            "{}",
            dropped.detail
        );
        assert_eq!(dropped.name, "metric:checkout_completion");
        let held = metric_check(
            &completion,
            Some(&tallies((970, 1000), (965, 1000), fresh)),
            &a,
            now,
        );
        assert_eq!(held.status, CheckStatus::Pass, "{}", held.detail);
        // A gain is never a rollback.
        let better = metric_check(
            &completion,
            Some(&tallies((900, 1000), (990, 1000), fresh)),
            &a,
            now,
        );
        assert_eq!(better.status, CheckStatus::Pass);

        let worse_share = metric("refunds", MetricLimit::MaxIncreasePp(1.0));
        let up = metric_check(
            &worse_share,
            Some(&tallies((10, 1000), (60, 1000), fresh)),
            &a,
            now,
        );
        assert_eq!(up.status, CheckStatus::Fail, "{}", up.detail);

        let tickets = metric("support_tickets", MetricLimit::MaxRatio(1.5));
        let tripled = metric_check(
            &tickets,
            Some(&tallies((40, 20_000), (120, 20_000), fresh)),
            &a,
            now,
        );
        assert_eq!(tripled.status, CheckStatus::Fail, "{}", tripled.detail);
        assert!(tripled.detail.contains("×3"), "{}", tripled.detail);
        let same = metric_check(
            &tickets,
            Some(&tallies((40, 20_000), (48, 20_000), fresh)),
            &a,
            now,
        );
        assert_eq!(same.status, CheckStatus::Pass, "{}", same.detail);
        // Less canary traffic: 3× stable's rate is still 3×.
        let small = metric_check(
            &tickets,
            Some(&tallies((80, 40_000), (60, 10_000), fresh)),
            &a,
            now,
        );
        assert_eq!(small.status, CheckStatus::Fail, "{}", small.detail);

        // No data, stale data, too little data: hold, never pass or fail.
        for (ev, why) in [
            (None, "no data"),
            (Some(tallies((970, 1000), (900, 1000), None)), "no data"),
            (
                Some(tallies((970, 1000), (900, 1000), Some(now - 60_000))),
                "stale",
            ),
            (Some(tallies((97, 99), (0, 1000), fresh)), "not enough data"),
        ] {
            let c = metric_check(&completion, ev.as_ref(), &a, now);
            assert_eq!(c.status, CheckStatus::Insufficient, "{}", c.detail);
            assert!(c.detail.contains(why), "{}", c.detail);
        }

        // With the step's own checks: a failing metric rolls back.
        let j = with_checks(
            Judgement {
                verdict: Verdict::Promote,
                reason: String::new(),
                checks: vec![held.clone()],
                queries: vec!["q".into()],
            },
            vec![dropped],
        );
        assert_eq!(j.verdict, Verdict::Rollback);
        assert!(j.reason.starts_with("checkout_completion:"), "{}", j.reason);
        assert_eq!(j.queries, ["q"]);
    }

    /// Identical sides, looked at every second for 60 s at 100 per side
    /// per second (share 95%, tickets 2%): a rule rolls back at most α of
    /// runs (measured: see the assertion's message).
    #[test]
    fn sim_identical_business_metrics_are_not_rolled_back() {
        let a = analysis();
        let rules = [
            metric("completion", MetricLimit::MaxDecreasePp(0.0)),
            metric("tickets", MetricLimit::MaxRatio(1.2)),
        ];
        for (rule, p) in rules.iter().zip([0.95, 0.02]) {
            let mut rolled_back = 0;
            for seed in 0..500u64 {
                let mut rng = StdRng::seed_from_u64(seed);
                let (mut s, mut c) = ((0u64, 0u64), (0u64, 0u64));
                for t in 1..=60u64 {
                    for side in [&mut s, &mut c] {
                        side.1 += 100;
                        side.0 += (0..100).filter(|_| rng.random_bool(p)).count() as u64;
                    }
                    let now = T0 + t * 1000;
                    let check = metric_check(rule, Some(&tallies(s, c, Some(now))), &a, now);
                    if check.status == CheckStatus::Fail {
                        rolled_back += 1;
                        break;
                    }
                }
            }
            eprintln!(
                "{}: {rolled_back} of 500 identical runs rolled back",
                rule.name
            );
            assert!(
                rolled_back <= 5,
                "{}: {rolled_back} of 500 rolled back",
                rule.name
            );
        }
    }

    // === synthetic probes ===

    fn probes(idle: bool) -> Probes {
        use crate::evidence::probes::{Expect, JsonExpect, ProbeCheck};
        Probes {
            checks: vec![ProbeCheck {
                name: "health".into(),
                method: "GET".into(),
                path: "/health".into(),
                headers: Default::default(),
                body: None,
                expect: Expect {
                    status: 200,
                    json: Some(JsonExpect {
                        pointer: "/status".into(),
                        equals: serde_json::json!("ok"),
                    }),
                },
                every_s: 1.0,
            }],
            max_failures: 0,
            min_passed: 3,
            judge_idle_on_probes: idle,
        }
    }

    /// `passed`/`failed` health probes per side; a canary failure answered
    /// `{"status":"degraded"}`.
    fn tally(stable: (u64, u64), canary: (u64, u64)) -> ProbeTally {
        use crate::evidence::probes::{CheckTally, ProbeResult, SideTally};
        let side = |(passed, failed): (u64, u64), which| SideTally {
            passed,
            failed,
            last_failure: (failed > 0).then(|| ProbeResult {
                time_ms: NOW - 1_000,
                check: "health".into(),
                side: which,
                passed: false,
                status: Some(200),
                latency_ms: 2.0,
                detail: "got status 200, /status = \"degraded\"".into(),
            }),
        };
        ProbeTally {
            checks: vec![CheckTally {
                check: "health".into(),
                stable: side(stable, crate::evidence::probes::Side::Stable),
                canary: side(canary, crate::evidence::probes::Side::Canary),
            }],
        }
    }

    #[test]
    fn a_failing_canary_probe_rolls_back_naming_the_probe_with_stable_beside_it() {
        // Healthy live traffic, still held for the step's duration: the
        // probe alone takes it out.
        let j = run(&ev(1_000, 5, 20.0, Some(NOW)), &ev(300, 1, 20.0, Some(NOW)));
        let j = with_checks(j, vec![probe_check(&probes(false), &tally((5, 0), (4, 1)))]);
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        assert!(
            j.reason
                .contains("probe health failed on canary 1 of 5 times")
                && j.reason
                    .contains("expected status 200 and /status == \"ok\"")
                && j.reason
                    .contains("canary got status 200, /status = \"degraded\"")
                && j.reason.contains("stable passed 5 of 5"),
            "{}",
            j.reason
        );
        // At max_failures it still passes.
        let mut lenient = probes(false);
        lenient.max_failures = 1;
        assert_eq!(
            probe_check(&lenient, &tally((5, 0), (4, 1))).status,
            CheckStatus::Pass
        );
        // Stable failing is not held against the canary.
        assert_eq!(
            probe_check(&probes(false), &tally((0, 5), (5, 0))).status,
            CheckStatus::Pass
        );
    }

    #[test]
    fn an_idle_service_advances_on_probes_and_the_verdict_says_so() {
        let quiet = ev(0, 0, 20.0, Some(NOW));
        let mut s = step(20);
        s.min_duration_s = 30.0;
        let j = judge_idle_on_probes(
            &probes(true),
            &analysis(),
            &s,
            &quiet,
            &quiet,
            &tally((6, 0), (6, 0)),
            NOW,
            T0,
        )
        .expect("idle");
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
        assert!(
            j.reason
                .starts_with("no live traffic: judged on 6 probes only"),
            "{}",
            j.reason
        );
        // Too few probes: hold, saying so.
        let j = judge_idle_on_probes(
            &probes(true),
            &analysis(),
            &s,
            &quiet,
            &quiet,
            &tally((2, 0), (2, 0)),
            NOW,
            T0,
        )
        .expect("idle");
        assert_eq!(j.verdict, Verdict::Hold);
        assert!(
            j.reason.contains("canary passed 2 of the 3 needed"),
            "{}",
            j.reason
        );
        // Not allowed by the spec, no data, or stale data: not idle.
        let t = tally((6, 0), (6, 0));
        let a = analysis();
        assert!(
            judge_idle_on_probes(&probes(false), &a, &s, &quiet, &quiet, &t, NOW, T0).is_none()
        );
        let silent = ev(0, 0, 20.0, None);
        assert!(
            judge_idle_on_probes(&probes(true), &a, &s, &silent, &silent, &t, NOW, T0).is_none()
        );
        // A never-used canary cluster beside a fresh stable: idle.
        assert!(
            judge_idle_on_probes(&probes(true), &a, &s, &quiet, &silent, &t, NOW, T0).is_some()
        );
        let stale = ev(0, 0, 20.0, Some(NOW - 60_000));
        assert!(judge_idle_on_probes(&probes(true), &a, &s, &quiet, &stale, &t, NOW, T0).is_none());
        assert!(
            judge_idle_on_probes(&probes(true), &a, &s, &stale, &silent, &t, NOW, T0).is_none()
        );
    }

    #[test]
    fn probes_never_count_as_live_requests() {
        // A little live traffic: not idle, so the step's minimums apply to
        // live requests only, however many probes passed.
        let a = analysis();
        let s = step(20);
        let some = ev(150, 0, 20.0, Some(NOW));
        let lots = tally((500, 0), (500, 0));
        assert!(
            judge_idle_on_probes(&probes(true), &a, &s, &some, &some, &lots, NOW, T0).is_none()
        );
        let j = with_checks(
            judge(&rules(), &a, &s, &some, &some, NOW, T0),
            vec![probe_check(&probes(true), &lots)],
        );
        assert_eq!(j.verdict, Verdict::Hold, "{}", j.reason);
        assert!(
            j.reason
                .contains("canary has served 150 of the step's 200 requests"),
            "{}",
            j.reason
        );
    }

    // === judge: rules with hand-made evidence ===

    fn rules() -> StopRules {
        StopRules {
            max_error_rate_increase_pp: Some(1.0),
            max_p99_ratio: Some(1.5),
            min_p99_increase_ms: 5.0,
            max_unexpected_mismatch_rate: Some(0.01),
            halt_on_nack: true,
            latency: Default::default(),
        }
    }

    fn step(weight: u32) -> CanaryStep {
        CanaryStep {
            weight,
            cohort: None,
            min_duration_s: 60.0,
            min_requests: 200,
            manual_gate: false,
        }
    }

    /// `requests` with `errors`, latencies log-normal around `median_ms`
    /// (deterministic: expected bucket counts), updated at `at_ms`.
    fn ev(requests: u64, errors: u64, median_ms: f64, at_ms: Option<u64>) -> Evidence {
        let sigma: f64 = 0.4;
        let cdf = |x: f64| stats::phi((x / median_ms).ln() / sigma);
        let mut prev = 0.0;
        let latency_ms = ENVOY_BOUNDS
            .iter()
            .map(|&b| {
                let f = if b.is_infinite() { 1.0 } else { cdf(b) };
                let count = ((f - prev) * requests as f64).round() as u64;
                prev = f;
                (b, count)
            })
            .collect();
        Evidence {
            requests,
            errors,
            latency_ms,
            last_update_ms: at_ms,
        }
    }

    const NOW: u64 = T0 + 90_000;

    fn run(stable: &Evidence, canary: &Evidence) -> Judgement {
        judge(&rules(), &analysis(), &step(20), stable, canary, NOW, T0)
    }

    fn check<'a>(j: &'a Judgement, name: &str) -> &'a Check {
        match j.checks.iter().find(|c| c.name == name) {
            Some(c) => c,
            None => panic!("no check {name} in {j:#?}"),
        }
    }

    #[test]
    fn no_data_is_never_healthy() {
        let good = ev(20_000, 200, 50.0, Some(NOW));
        let j = run(&good, &Evidence::default());
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(j.reason, "no data from canary");
        let j = run(&Evidence::default(), &Evidence::default());
        assert_eq!(j.reason, "no data from stable, no data from canary");
        // Counts without a timestamp are no data either.
        let j = run(&good, &ev(5000, 0, 50.0, None));
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(j.checks.len(), 1, "no statistics on missing data");
    }

    #[test]
    fn stale_data_holds_with_its_age() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let canary = ev(5000, 50, 50.0, Some(NOW - 12_300));
        let j = run(&stable, &canary);
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(
            j.reason,
            "stale data from canary (last update 12.3 s ago, limit 10 s)"
        );
        assert_eq!(check(&j, "data").measured["canary_age_s"], 12.3);
        // Even a clear regression is not judged on stale data.
        let j = run(&stable, &ev(5000, 2500, 50.0, Some(NOW - 12_300)));
        assert_eq!(j.verdict, Verdict::Hold);
    }

    #[test]
    fn too_few_requests_hold() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let j = run(&stable, &ev(37, 0, 50.0, Some(NOW)));
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(j.reason, "not enough data: canary has 37 of 100 requests");
        let j = run(&ev(12, 0, 50.0, Some(NOW)), &ev(37, 0, 50.0, Some(NOW)));
        assert_eq!(
            j.reason,
            "not enough data: stable has 12 of 100 requests, canary has 37 of 100 requests"
        );
    }

    #[test]
    fn impossible_counts_are_invalid_evidence() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let j = run(&stable, &ev(100, 120, 50.0, Some(NOW)));
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(
            j.reason,
            "invalid evidence from canary: 120 errors reported for 100 requests"
        );
    }

    #[test]
    fn error_regression_rolls_back_with_the_numbers() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let canary = ev(5000, 300, 50.0, Some(NOW));
        let j = run(&stable, &canary);
        assert_eq!(j.verdict, Verdict::Rollback);
        assert!(
            j.reason
                .starts_with("canary 5xx 6.0% vs stable 1.0% (+5.0 pp, at least +"),
            "{}",
            j.reason
        );
        assert!(
            j.reason
                .contains(" pp at 99% confidence > 1 pp allowed; p = ")
                && j.reason.ends_with(" < 0.01)"),
            "{}",
            j.reason
        );
        let c = check(&j, "error_rate");
        assert_eq!(c.status, CheckStatus::Fail);
        assert_eq!(c.threshold, Some(1.0));
        assert!(c.measured["p_value"] < 1e-6);
        let lower = c.measured["increase_lower_pp"];
        assert!(lower > 1.0 && lower < 5.0, "{lower}");
        // The latency check is still reported, and passes.
        assert_eq!(check(&j, "p99_latency").status, CheckStatus::Pass);
    }

    #[test]
    fn a_few_milliseconds_are_never_a_latency_regression() {
        // Canary twice as slow, but 1 ms vs 2 ms: under the 5 ms floor.
        let mut stable = Evidence::default();
        let mut canary = Evidence::default();
        for (e, at) in [(&mut stable, 1.0), (&mut canary, 2.5)] {
            e.requests = 10_000;
            e.latency_ms = vec![(at, 10_000), (f64::INFINITY, 0)];
        }
        let c = latency_check(P99, 1.5, 5.0, 0.01, &stable, &canary);
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.detail);
        let c = latency_check(P99, 1.5, 0.0, 0.01, &stable, &canary);
        assert_eq!(c.status, CheckStatus::Fail, "{}", c.detail);
    }

    #[test]
    fn latency_regression_rolls_back_with_the_numbers() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let canary = ev(5000, 50, 150.0, Some(NOW));
        let j = run(&stable, &canary);
        assert_eq!(j.verdict, Verdict::Rollback);
        let c = check(&j, "p99_latency");
        assert_eq!(c.status, CheckStatus::Fail);
        let ratio = c.measured["ratio"];
        assert!((ratio - 3.0).abs() < 0.2, "{ratio}");
        let p99 = c.measured["stable_p99_ms"];
        let truth = 50.0 * (0.4f64 * 2.326).exp();
        assert!(
            (p99 / truth - 1.0).abs() < 0.03,
            "stable p99 {p99} vs {truth}"
        );
        assert!(
            j.reason.starts_with("canary p99 ")
                && j.reason.contains(
                    "of canary requests slower than 193 ms (×1.5 stable's p99, at least +5 ms), where 1.0% is allowed; p = "
                ),
            "{}",
            j.reason
        );
        assert_eq!(check(&j, "error_rate").status, CheckStatus::Pass);
    }

    #[test]
    fn healthy_canary_holds_for_the_duration_then_promotes() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let canary = ev(5000, 51, 50.0, Some(NOW));
        let early = judge(
            &rules(),
            &analysis(),
            &step(20),
            &stable,
            &canary,
            T0 + 30_000,
            T0,
        );
        assert_eq!(early.verdict, Verdict::Hold);
        assert_eq!(early.reason, "step has run 30.0 of 60 s");
        let j = run(&stable, &canary);
        assert_eq!(j.verdict, Verdict::Promote, "{j:#?}");
        for name in [
            "data",
            "sample_size",
            "error_rate",
            "p99_latency",
            "step_duration",
            "step_requests",
        ] {
            assert_eq!(check(&j, name).status, CheckStatus::Pass, "{name}");
        }
        assert!(
            j.reason
                .contains("no significant increase over the 1 pp allowed"),
            "{}",
            j.reason
        );
        assert!(
            j.reason.contains("step ran 90.0 s (minimum 60 s)"),
            "{}",
            j.reason
        );
        let c = check(&j, "error_rate");
        assert!(c.measured["increase_upper_pp"] < 1.0, "{c:?}");
    }

    #[test]
    fn a_step_needs_its_requests() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        let mut s = step(20);
        s.min_requests = 10_000;
        let j = judge(
            &rules(),
            &analysis(),
            &s,
            &stable,
            &ev(5000, 50, 50.0, Some(NOW)),
            NOW,
            T0,
        );
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(
            j.reason,
            "canary has served 5000 of the step's 10000 requests"
        );
    }

    #[test]
    fn the_p99_needs_enough_samples_and_a_valid_histogram() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        // 300 canary samples: the exact test judges them, the interpolated
        // one says what it waits for; the check passes.
        let j = run(&stable, &ev(300, 3, 50.0, Some(NOW)));
        let c = check(&j, "p99_latency");
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.detail);
        let (ns, nc) = (c.measured["stable_samples"], c.measured["canary_samples"]);
        assert!(
            c.detail.ends_with(&format!(
                "interpolated: waiting for latency samples: stable {ns} and canary {nc} of 500 each"
            )),
            "{}",
            c.detail
        );
        assert!(
            c.detail
                .contains(&format!("exact: 0 of {nc} canary samples")),
            "{}",
            c.detail
        );
        // Too few stable samples to bound its p99: hold, with the count needed.
        let j = run(&ev(300, 3, 50.0, Some(NOW)), &ev(300, 3, 50.0, Some(NOW)));
        assert_eq!(j.verdict, Verdict::Hold);
        let c = check(&j, "p99_latency");
        let need = c.measured["stable_samples_needed"];
        assert!((300.0..2000.0).contains(&need), "{need}");
        let (ns, nc) = (c.measured["stable_samples"], c.measured["canary_samples"]);
        assert!(
            j.reason.starts_with(&format!(
                "p99 latency: exact: waiting for stable latency samples to bound its p99: {ns} of {need}; interpolated: waiting for latency samples: stable {ns} and canary {nc} of 500 each"
            )),
            "{}",
            j.reason
        );
        let mut broken = ev(5000, 50, 50.0, Some(NOW));
        broken.latency_ms.swap(3, 4);
        let j = run(&stable, &broken);
        assert_eq!(j.verdict, Verdict::Hold);
        assert!(
            j.reason.starts_with(
                "invalid latency histogram from canary: bucket bounds must be positive and ascend"
            ),
            "{}",
            j.reason
        );
        let mut nan = ev(5000, 50, 50.0, Some(NOW));
        nan.latency_ms[2].0 = f64::NAN;
        assert_eq!(run(&nan, &stable).verdict, Verdict::Hold);
        // No histogram at all: the p99 rule cannot be checked, so no promotion.
        let mut bare = ev(5000, 50, 50.0, Some(NOW));
        bare.latency_ms.clear();
        assert_eq!(run(&stable, &bare).verdict, Verdict::Hold);
        // Without the p99 rule, histograms are not needed.
        let mut r = rules();
        r.max_p99_ratio = None;
        let j = judge(&r, &analysis(), &step(20), &stable, &bare, NOW, T0);
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
        assert!(j.checks.iter().all(|c| c.name != "p99_latency"));
    }

    #[test]
    fn weight_100_bakes_without_a_baseline() {
        let canary = ev(5000, 50, 50.0, Some(NOW));
        let j = judge(
            &rules(),
            &analysis(),
            &step(100),
            &Evidence::default(),
            &canary,
            NOW,
            T0,
        );
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
        assert!(
            j.reason
                .contains("weight 100: stable serves nothing to compare with")
        );
        assert!(j.checks.iter().all(|c| c.name != "error_rate"));
        // Canary data must still be there and fresh.
        let j = judge(
            &rules(),
            &analysis(),
            &step(100),
            &Evidence::default(),
            &Evidence::default(),
            NOW,
            T0,
        );
        assert_eq!(j.reason, "no data from canary");
    }

    /// Equal after a JSON round trip, up to serde_json's float parsing
    /// (not always bit-exact).
    fn round_trips(j: &Judgement) -> bool {
        let Ok(json) = serde_json::to_string(j) else {
            return false;
        };
        let Ok(back) = serde_json::from_str::<Judgement>(&json) else {
            return false;
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
        back.verdict == j.verdict
            && back.reason == j.reason
            && back.checks.len() == j.checks.len()
            && back.checks.iter().zip(&j.checks).all(|(b, c)| {
                b.name == c.name
                    && b.status == c.status
                    && b.detail == c.detail
                    && b.threshold
                        .zip(c.threshold)
                        .is_none_or(|(x, y)| close(x, y))
                    && b.measured.len() == c.measured.len()
                    && b.measured
                        .iter()
                        .zip(&c.measured)
                        .all(|((kb, vb), (kc, vc))| kb == kc && close(*vb, *vc))
            })
    }

    #[test]
    fn judgements_round_trip_through_json() {
        let stable = ev(20_000, 200, 50.0, Some(NOW));
        for canary in [
            ev(5000, 300, 50.0, Some(NOW)),
            ev(5000, 50, 50.0, Some(NOW)),
            Evidence::default(),
        ] {
            let j = run(&stable, &canary);
            assert!(round_trips(&j), "{j:#?}");
        }
        let json = serde_json::to_value(run(&stable, &ev(5000, 300, 50.0, Some(NOW)))).unwrap();
        assert_eq!(json["verdict"], "rollback");
        assert_eq!(json["checks"][2]["name"], "error_rate");
        assert_eq!(json["checks"][2]["status"], "fail");
    }

    // === shadow stage ===

    fn stage() -> ShadowStage {
        ShadowStage {
            route: "checkout".into(),
            percent: 10.0,
            min_duration_s: 60.0,
            min_compared: 500,
            max_serious_rate: 0.02,
            max_unexpected_rate: 0.01,
            per_segment: None,
        }
    }

    fn shadow(compared: u64, serious: u64, unexpected: u64, at: Option<u64>) -> ShadowEvidence {
        ShadowEvidence {
            compared,
            serious,
            unexpected,
            last_update_ms: at,
            segments: BTreeMap::new(),
        }
    }

    /// A stage gating on its worst segment, and evidence per segment
    /// `(label, compared, unexpected)` (no serious ones) with their sums.
    fn segmented(segs: &[(&str, u64, u64)]) -> (ShadowStage, ShadowEvidence) {
        let stage = ShadowStage {
            max_unexpected_rate: 0.1,
            per_segment: Some(SegmentGate {
                max_unexpected_rate: 0.1,
                min_compared: 50,
            }),
            ..stage()
        };
        let mut ev = shadow(0, 0, 0, Some(NOW));
        for (label, n, k) in segs {
            ev.compared += n;
            ev.unexpected += k;
            ev.segments.insert(
                (*label).to_owned(),
                PairCounts {
                    compared: *n,
                    serious: 0,
                    unexpected: *k,
                },
            );
        }
        (stage, ev)
    }

    fn run_segmented(segs: &[(&str, u64, u64)]) -> Judgement {
        let (stage, ev) = segmented(segs);
        let rules = StopRules {
            max_unexpected_mismatch_rate: Some(0.1),
            ..rules()
        };
        judge_shadow(&stage, &rules, &analysis(), &ev, NOW, T0)
    }

    fn segment_check_of(j: &Judgement) -> &Check {
        j.checks
            .iter()
            .find(|c| c.name == "segment_unexpected_mismatch_rate")
            .expect("a segment check")
    }

    #[test]
    fn one_segment_breaking_rolls_back_while_the_average_passes() {
        // gold: 60 of 300 (20%), silver and bronze clean: 60 of 1000 = 6%
        // on average, under the route's 10%.
        let j = run_segmented(&[("gold", 300, 60), ("silver", 400, 0), ("bronze", 300, 0)]);
        let avg = j
            .checks
            .iter()
            .find(|c| c.name == "unexpected_mismatch_rate")
            .unwrap();
        assert_eq!(avg.status, CheckStatus::Pass, "{}", avg.detail);
        let seg = segment_check_of(&j);
        assert_eq!(seg.status, CheckStatus::Fail, "{}", seg.detail);
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        assert!(
            j.reason.starts_with(
                "shadow segment \"gold\": unexpected mismatches 60 of 300 pairs (20.0%"
            ),
            "{}",
            j.reason
        );
        assert!(
            j.reason
                .contains("the route's average is 6.0% (60 of 1000)"),
            "{}",
            j.reason
        );
        assert_eq!(seg.measured["segments_tested"], 3.0);
        // Without the gate, the same evidence does not roll back.
        let (mut stage, ev) =
            segmented(&[("gold", 300, 60), ("silver", 400, 0), ("bronze", 300, 0)]);
        stage.per_segment = None;
        let rules = StopRules {
            max_unexpected_mismatch_rate: Some(0.1),
            ..rules()
        };
        let j = judge_shadow(&stage, &rules, &analysis(), &ev, NOW, T0);
        assert_ne!(j.verdict, Verdict::Rollback, "{}", j.reason);
    }

    #[test]
    fn a_segment_under_its_minimum_cannot_fail_the_stage() {
        // tiny: 20 of 20 unexpected, but only 20 pairs (minimum 50).
        let j = run_segmented(&[("tiny", 20, 20), ("silver", 1000, 0)]);
        let seg = segment_check_of(&j);
        assert_eq!(seg.status, CheckStatus::Pass, "{}", seg.detail);
        assert!(
            seg.detail.starts_with("worst shadow segment \"silver\""),
            "{}",
            seg.detail
        );
        assert_eq!(seg.measured["segments_tested"], 1.0);
    }

    #[test]
    fn other_is_judged_like_any_segment() {
        let j = run_segmented(&[("other", 300, 90), ("gold", 700, 0)]);
        assert_eq!(j.verdict, Verdict::Rollback, "{}", j.reason);
        assert!(
            j.reason.starts_with("shadow segment \"other\""),
            "{}",
            j.reason
        );
    }

    #[test]
    fn a_segment_gate_without_segments_holds() {
        let (stage, mut ev) = segmented(&[]);
        ev.compared = 1000;
        let rules = StopRules {
            max_unexpected_mismatch_rate: Some(0.1),
            ..rules()
        };
        let j = judge_shadow(&stage, &rules, &analysis(), &ev, NOW, T0);
        let seg = segment_check_of(&j);
        assert_eq!(seg.status, CheckStatus::Insufficient);
        assert!(seg.detail.contains("segment_by"), "{}", seg.detail);
        // More mismatches than pairs in a segment is not evidence.
        let (stage, mut ev) = segmented(&[("gold", 100, 0)]);
        ev.segments.get_mut("gold").unwrap().unexpected = 500;
        let j = judge_shadow(&stage, &rules, &analysis(), &ev, NOW, T0);
        assert_eq!(segment_check_of(&j).status, CheckStatus::Insufficient);
    }

    #[test]
    fn slightly_worse_segments_among_many_do_not_roll_back() {
        // 33 segments at exactly the limit: Bonferroni keeps the gate quiet.
        let segs: Vec<(String, u64, u64)> = (0..33).map(|i| (format!("s{i}"), 200, 20)).collect();
        let segs: Vec<(&str, u64, u64)> =
            segs.iter().map(|(l, n, k)| (l.as_str(), *n, *k)).collect();
        let j = run_segmented(&segs);
        assert_eq!(segment_check_of(&j).status, CheckStatus::Pass);
    }

    fn run_shadow(ev: &ShadowEvidence) -> Judgement {
        judge_shadow(&stage(), &rules(), &analysis(), ev, NOW, T0)
    }

    #[test]
    fn shadow_without_usable_data_holds() {
        let j = run_shadow(&shadow(0, 0, 0, None));
        assert_eq!(j.verdict, Verdict::Hold);
        assert_eq!(j.reason, "no data: no shadow comparisons reported yet");
        let j = run_shadow(&shadow(5000, 0, 0, Some(NOW - 30_000)));
        assert_eq!(
            j.reason,
            "stale shadow data (last report 30.0 s ago, limit 10 s)"
        );
        let j = run_shadow(&shadow(100, 150, 0, Some(NOW)));
        assert!(
            j.reason.starts_with("invalid shadow evidence"),
            "{}",
            j.reason
        );
        let j = run_shadow(&shadow(40, 40, 40, Some(NOW)));
        assert_eq!(
            j.verdict,
            Verdict::Hold,
            "no verdict below the minimum, even a bad one"
        );
        assert_eq!(
            j.reason,
            "not enough data (shadow 40 of 100 compared pairs)"
        );
    }

    #[test]
    fn shadow_unexpected_mismatches_roll_back() {
        let j = run_shadow(&shadow(500, 30, 30, Some(NOW)));
        assert_eq!(j.verdict, Verdict::Rollback);
        assert!(
            j.reason
                .starts_with("shadow unexpected mismatches 30 of 500 pairs (6.0%, at least ")
                && j.reason.contains("at 99% confidence > 1.0% allowed; p = "),
            "{}",
            j.reason
        );
        let c = check(&j, "unexpected_mismatch_rate");
        assert!(
            c.measured["lower_bound"] > 0.01 && c.measured["lower_bound"] < 0.06,
            "{c:?}"
        );
    }

    #[test]
    fn shadow_passes_only_once_rates_are_shown_low() {
        // 0 of 300: too few pairs to show a rate below 1% yet.
        let j = run_shadow(&shadow(300, 0, 0, Some(NOW)));
        assert_eq!(j.verdict, Verdict::Hold);
        assert!(j.reason.contains("not yet shown ≤ 1.0%"), "{}", j.reason);
        // Observed 1.5% serious with a 2% maximum: not shown at 800 pairs...
        let j = run_shadow(&shadow(800, 12, 0, Some(NOW)));
        assert_eq!(
            check(&j, "serious_mismatch_rate").status,
            CheckStatus::Insufficient
        );
        // ...shown at 20,000.
        let j = run_shadow(&shadow(20_000, 300, 20, Some(NOW)));
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason);
        // The stage's own minimum duration.
        let j = judge_shadow(
            &stage(),
            &rules(),
            &analysis(),
            &shadow(20_000, 300, 20, Some(T0 + 20_000)),
            T0 + 20_000,
            T0,
        );
        assert_eq!(j.reason, "shadow stage has run 20.0 of 60 s");
    }

    // === properties ===

    use proptest::prelude::*;

    fn arb_evidence() -> impl Strategy<Value = Evidence> {
        (
            0u64..4000,
            0u64..5000,
            prop::collection::vec(0u64..400, 0..=20),
            prop::option::of(0u64..30_000),
        )
            .prop_map(|(requests, errors, counts, age)| Evidence {
                requests,
                // Mostly valid counts, sometimes impossible ones.
                errors: if errors % 7 == 0 {
                    errors
                } else {
                    errors.min(requests) / 3
                },
                latency_ms: ENVOY_BOUNDS.iter().copied().zip(counts).collect(),
                last_update_ms: age.map(|a| NOW - a),
            })
    }

    fn unusable(e: &Evidence, a: &Analysis) -> bool {
        e.last_update_ms
            .is_none_or(|t| (NOW - t) as f64 / 1000.0 > a.max_staleness_s)
            || e.requests < a.min_requests_per_side
            || e.errors > e.requests
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn prop_no_promotion_without_fresh_minimum_data(
            stable in arb_evidence(),
            canary in arb_evidence(),
            weight in prop::sample::select(vec![1u32, 20, 100]),
            pp in prop::option::of(0.0f64..5.0),
            ratio in prop::option::of(1.01f64..3.0),
        ) {
            let mut r = rules();
            r.max_error_rate_increase_pp = pp.or(if ratio.is_none() { Some(1.0) } else { None });
            r.max_p99_ratio = ratio;
            let a = analysis();
            let mut s = step(weight);
            s.min_duration_s = 0.0;
            s.min_requests = 0;
            let j = judge(&r, &a, &s, &stable, &canary, NOW, T0);
            let baseline_bad = weight < 100 && unusable(&stable, &a);
            if baseline_bad || unusable(&canary, &a) {
                prop_assert_eq!(j.verdict, Verdict::Hold, "{}", j.reason);
            }
            if canary.errors > canary.requests || (weight < 100 && stable.errors > stable.requests) {
                prop_assert!(j.reason.contains("invalid evidence"), "{}", j.reason);
            }
            prop_assert!(!j.reason.is_empty());
            prop_assert!(round_trips(&j), "{:#?}", j);
        }

        #[test]
        fn prop_shadow_no_promotion_without_fresh_minimum_data(
            compared in 0u64..50_000,
            serious in 0u64..60_000,
            unexpected in 0u64..60_000,
            age in prop::option::of(0u64..30_000),
        ) {
            let ev = shadow(compared, serious % (compared + 2), unexpected % (compared + 2), age.map(|a| NOW - a));
            let j = run_shadow(&ev);
            let stale = age.is_none_or(|a| a > 10_000);
            if stale || compared < 100 || ev.serious > compared || ev.unexpected > compared {
                prop_assert_eq!(j.verdict, Verdict::Hold, "{}", j.reason);
            }
            prop_assert!(round_trips(&j), "{:#?}", j);
        }

        #[test]
        fn prop_increase_bounds_bracket_the_estimate(
            ns in 1u64..20_000, ks_frac in 0.0f64..1.0,
            nc in 1u64..20_000, kc_frac in 0.0f64..1.0,
        ) {
            let (ns, nc) = (ns as f64, nc as f64);
            let (ks, kc) = ((ns * ks_frac * 0.2).floor(), (nc * kc_frac * 0.2).floor());
            let thr = 100f64.ln();
            let hat = kc / nc - ks / ns;
            let lo = stats::increase_lower_bound(ks, ns, kc, nc, thr).unwrap_or(-1.0);
            let hi = stats::increase_upper_bound(ks, ns, kc, nc, thr).unwrap_or(1.0);
            prop_assert!(lo <= hat + 1e-9 && hat <= hi + 1e-9, "{lo} {hat} {hi}");
            prop_assert!(stats::ln_e_increase(ks, ns, kc, nc, hat).is_finite());
        }

        #[test]
        fn prop_rate_bounds_bracket_the_estimate(n in 1u64..100_000, frac in 0.0f64..1.0, anchor in 0.0f64..0.5) {
            let n = n as f64;
            let k = (n * frac).floor();
            let prior = stats::Prior::around(anchor);
            let thr = 100f64.ln();
            let lo = stats::rate_lower_bound(&prior, k, n, thr);
            let hi = stats::rate_upper_bound(&prior, k, n, thr).unwrap_or(1.0);
            prop_assert!(lo <= k / n + 1e-12 && k / n <= hi + 1e-12, "{lo} {} {hi}", k / n);
        }
    }

    // === pieces ===

    #[test]
    fn probit_log_interpolation_recovers_a_log_normal_p99() {
        for (median, sigma) in [(50.0, 0.4), (20.0, 0.8), (300.0, 0.3), (3.0, 0.5)] {
            let cdf = |x: f64| stats::phi((x / median).ln() / sigma);
            let mut prev = 0.0;
            let raw: Vec<(f64, u64)> = ENVOY_BOUNDS
                .iter()
                .map(|&b| {
                    let f = if b.is_infinite() { 1.0 } else { cdf(b) };
                    let c = ((f - prev) * 1e6).round() as u64;
                    prev = f;
                    (b, c)
                })
                .collect();
            let h = Histogram::new(&raw).unwrap();
            let p99 = h.quantile_above(0.01 * h.total, OpenBucket::LowerBound);
            let truth = median * (sigma * 2.326_348).exp();
            assert!(
                (p99 / truth - 1.0).abs() < 0.01,
                "median {median} σ {sigma}: {p99} vs {truth}"
            );
            let above = h.count_above(1.5 * truth) / h.total;
            let want = 1.0 - cdf(1.5 * truth);
            assert!(
                (above - want).abs() < 0.1 * want + 1e-4,
                "{above} vs {want}"
            );
        }
    }

    #[test]
    fn probit_inverts_phi() {
        for p in [
            1e-300, 1e-20, 1e-9, 0.001, 0.01, 0.024, 0.025, 0.3, 0.5, 0.77, 0.975, 0.99, 0.999_999,
        ] {
            let z = stats::probit(p);
            assert!(
                ((stats::phi(z) - p) / p).abs() < 1e-9,
                "p {p}: z {z}, Φ(z) {}",
                stats::phi(z)
            );
        }
        assert_eq!(stats::probit(0.5), 0.0);
        assert!((stats::probit(0.99) - 2.326_347_874_040_841).abs() < 1e-12);
        assert_eq!(stats::probit(0.0), f64::NEG_INFINITY);
        assert_eq!(stats::probit(1.0), f64::INFINITY);
        assert_eq!(stats::probit(f64::NAN), f64::NEG_INFINITY);
    }

    #[test]
    fn histogram_edges() {
        assert!(Histogram::new(&[(1.0, 1), (1.0, 1)]).is_err());
        assert!(Histogram::new(&[(0.0, 1)]).is_err());
        assert!(Histogram::new(&[(f64::INFINITY, 1), (5.0, 1)]).is_err());
        let empty = Histogram::new(&[]).unwrap();
        assert_eq!(empty.total, 0.0);
        assert_eq!(empty.quantile_above(0.0, OpenBucket::LowerBound), 0.0);
        // Everything in the open bucket: a lower estimate is its bound,
        // an upper one unknown.
        let open = Histogram::new(&[(10.0, 0), (f64::INFINITY, 100)]).unwrap();
        assert_eq!(open.quantile_above(1.0, OpenBucket::LowerBound), 10.0);
        assert!(
            open.quantile_above(1.0, OpenBucket::Unbounded)
                .is_infinite()
        );
        assert_eq!(open.count_above(20.0), 0.0);
        assert_eq!(open.count_above(5.0), 100.0);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_p(3.2e-9), "3e-9");
        assert_eq!(fmt_p(0.0123), "0.012");
        assert_eq!(fmt_p(1.0), "1");
        assert_eq!(fmt_p(0.0), "< 1e-300");
        assert_eq!(conf(0.01), "99%");
        assert_eq!(conf(0.005), "99.5%");
        assert_eq!(pct(0.061), "6.1%");
        assert_eq!(pct(0.0075), "0.75%");
        assert_eq!(pct(0.0), "0.0%");
        assert_eq!(signed(5.1), "+5.1");
        assert_eq!(signed(-0.25), "-0.25");
        assert_eq!(ms(127.4), "127 ms");
        assert_eq!(ms(0.5), "0.5 ms");
        assert_eq!(num(1.0), "1");
        assert_eq!(num(0.5), "0.5");
    }
}
