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
//!   requests, a malformed histogram) or fewer than
//!   `analysis.min_requests_per_side` requests gets no statistical verdict
//!   at all: the judgement is Hold, with a reason saying which.
//! - Verdicts combine as: any check failed → Rollback; else any check short
//!   of data or time → Hold; else Promote.
//! - At weight 100 stable serves nothing, so there is nothing to compare
//!   with: the step is a bake period. It passes on fresh canary data, its
//!   minimum duration and requests; the stop rules cannot fire there.
//!
//! # Why sequential tests
//! The engine looks every second. A plain z-test at level α run at every
//! look rejects a true null far more often than α: over 120 looks of an
//! identical canary the false-alarm rate of a nominal 1% z-test is several
//! times 1% (the running z-statistic wanders past any fixed threshold
//! eventually, by the law of the iterated logarithm). Every test here is
//! instead an *e-process*: a statistic whose chance of ever exceeding 1/α,
//! at any of arbitrarily many looks, is at most α when the null holds
//! (Ville's inequality). The engine may look as often as it likes and stop
//! whenever it likes.
//!
//! Each e-value is a Bayes factor against a composite null with the null's
//! best fit in the denominator ("universal inference", Wasserman, Ramdas &
//! Balakrishnan 2020):
//!
//! `E = ∫ L(θ) dπ(θ) / sup_{θ ∈ H0} L(θ)`
//!
//! with a fixed mixture of Beta priors π, so the numerator has a closed
//! form in the counts (`B(a + k, b + n − k) / B(a, b)` per side) and no
//! request order is needed: the judge is stateless. For any θ0 in the null,
//! `E ≤ ∫L dπ / L(θ0)`, a nonnegative martingale of mean 1, so the bound is
//! exact, not asymptotic, at any sample size. The price against a
//! one-look test is a few nats of evidence (the prior's spread); the
//! priors are chosen around the rates that matter (error rates on a log
//! scale, 1% exceedances for a p99) to keep it small. p-values shown are
//! `min(1, 1/E)`; confidence bounds are the inverted tests (confidence
//! sequences), valid at every look too.
//!
//! - **Error rate** (`error_rate`): H0: `p_canary − p_stable ≤ margin`
//!   (`stop_rules.max_error_rate_increase_pp`), two independent binomials;
//!   the null's best fit is found on the boundary `p_c = p_s + margin`.
//!   Rollback when E ≥ 1/α: there is significant evidence that the increase
//!   exceeds the margin. Pass (promote-eligible) when it does not.
//! - **p99 latency** (`p99_latency`): H1: `q_c > R × q_s` with
//!   R = `stop_rules.max_p99_ratio`. From the histograms (interpolated
//!   log-linearly within a bucket, linearly in the first), an anytime upper
//!   bound `U_s` on stable's p99 (test "more than 1% of stable is above x",
//!   at α/2) and an anytime lower bound `L_c` on canary's (at α/2); Rollback
//!   when `L_c / U_s > R`. If `L_c / U_s > R`, then either `U_s` is below the
//!   true stable p99 or `L_c` is above the true canary p99: each has
//!   probability ≤ α/2 over all looks, so this is a level-α test of
//!   `q_c ≤ R q_s`. A Mann–Whitney test was not used: it tests a shift of
//!   the whole distribution, and the stop rule is about the tail.
//!   Exactness holds at bucket bounds; within a bucket it rests on the
//!   interpolation, which for Envoy's log-spaced bounds is close for
//!   latency-like (log-normal) data.
//! - **α budget**: `α = 1 − analysis.confidence` per step, split evenly
//!   between the configured stop rules (error rate, p99), so the chance
//!   that a step rolls back a canary no worse than stable is at most α in
//!   total, however often it is looked at.
//! - **Shadow stage**: Rollback when the unexpected-mismatch rate is
//!   significantly above `stop_rules.max_unexpected_mismatch_rate`
//!   (one-sample e-value); pass only when the serious and unexpected rates
//!   are *shown* at or below the stage's maxima (their anytime upper
//!   confidence bounds are), after `min_duration_s` and `min_compared`.
//!   An upper bound rather than the observed rate, so that holding and
//!   re-looking until the observed rate happens to dip cannot pass a stage.
//!
//! Promotion of a canary step needs no demonstrated equivalence (that would
//! take thousands of requests per step at 1% weight): it needs the step's
//! minimum duration and requests and no significant evidence of harm. The
//! upper confidence bounds are reported so an operator sees how much the
//! step has actually shown.
//!
//! Modelling assumption, as in any such test: requests are independent
//! draws within the window. Shared causes (a bad dependency hitting both
//! sides) affect both sides alike and cancel in the comparison.
//!
//! `libm` provides `lgamma` (for the Beta function): it is the Rust
//! project's own port of musl's libm, dependency-free and well kept;
//! `statrs` was not needed, as no distribution function is used.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::spec::{Analysis, CanaryStep, ShadowStage, StopRules};
use super::{Evidence, ShadowEvidence};

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
/// since `step_started_ms`.
pub fn judge(
    rules: &StopRules,
    analysis: &Analysis,
    step: &CanaryStep,
    stable: &Evidence,
    canary: &Evidence,
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
        let configured = usize::from(rules.max_error_rate_increase_pp.is_some())
            + usize::from(rules.max_p99_ratio.is_some());
        let alpha = analysis.alpha() / configured.max(1) as f64;
        if let Some(pp) = rules.max_error_rate_increase_pp {
            checks.push(error_rate_check(pp, alpha, stable, canary));
        }
        if let Some(ratio) = rules.max_p99_ratio {
            checks.push(latency_check(ratio, alpha, stable, canary));
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
        (Verdict::Promote, with(CheckStatus::Pass).join("; "))
    };
    Judgement {
        verdict,
        reason,
        checks,
    }
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
            short.push(format!("{side} {} of {min}", ev.requests));
        }
    }
    if short.is_empty() {
        check.detail = format!("at least {min} requests per side");
    } else {
        check.status = CheckStatus::Insufficient;
        check.detail = format!("not enough data ({} requests)", short.join(", "));
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

fn error_rate_check(max_pp: f64, alpha: f64, stable: &Evidence, canary: &Evidence) -> Check {
    let (ks, ns) = (stable.errors as f64, stable.requests as f64);
    let (kc, nc) = (canary.errors as f64, canary.requests as f64);
    let margin = max_pp / 100.0;
    let thr = (1.0 / alpha).ln();
    let ln_e = stats::ln_e_increase(ks, ns, kc, nc, margin);
    let p = p_value(ln_e);
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
                "{head}{at_least} > {} pp allowed; p = {} < {})",
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
    c.put("p_value", p);
    c.put("alpha", alpha);
    c
}

// === latency ===

/// The tail share a p99 leaves above it.
const P99_TAIL: f64 = 0.01;

fn latency_check(max_ratio: f64, alpha: f64, stable: &Evidence, canary: &Evidence) -> Check {
    let name = "p99_latency";
    let (hs, hc) = match (
        Histogram::new(&stable.latency_ms),
        Histogram::new(&canary.latency_ms),
    ) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) => {
            return Check::new(
                name,
                CheckStatus::Insufficient,
                format!("invalid latency histogram from stable: {e}"),
            );
        }
        (_, Err(e)) => {
            return Check::new(
                name,
                CheckStatus::Insufficient,
                format!("invalid latency histogram from canary: {e}"),
            );
        }
    };
    let min_samples = 1.0 / P99_TAIL;
    if hs.total < min_samples || hc.total < min_samples {
        let mut c = Check::new(
            name,
            CheckStatus::Insufficient,
            format!(
                "too few latency samples for a p99 (stable {}, canary {}; {} each needed)",
                hs.total, hc.total, min_samples
            ),
        )
        .threshold(max_ratio);
        c.put("stable_samples", hs.total);
        c.put("canary_samples", hc.total);
        return c;
    }
    let p99_s = hs.quantile_above(P99_TAIL * hs.total, OpenBucket::Unbounded);
    let p99_c = hc.quantile_above(P99_TAIL * hc.total, OpenBucket::LowerBound);
    if !(p99_s.is_finite() && p99_s > 0.0) {
        return Check::new(
            name,
            CheckStatus::Insufficient,
            format!(
                "stable's p99 is beyond the histogram's last bound ({}): nothing to compare with",
                ms(hs.last_finite_bound())
            ),
        )
        .threshold(max_ratio);
    }
    // Canary's share above R × stable's p99 is 1% exactly when
    // q_c = R q_s: the test is on that share (see the module docs).
    let limit_ms = max_ratio * p99_s;
    let share = hc.count_above(limit_ms) / hc.total;
    let rho = hc.log_density(limit_ms) / hs.log_density(p99_s);
    let rho = if rho.is_finite() {
        rho.clamp(1.0, MAX_DENSITY_RATIO)
    } else {
        1.0
    };
    let var = P99_TAIL * (1.0 - P99_TAIL) * (1.0 / hc.total + rho * rho / hs.total);
    let ln_e = stats::ln_msprt(share - P99_TAIL, var, TAU_P99_SHARE);
    let p = p_value(ln_e);
    let thr = (1.0 / alpha).ln();
    let ratio = p99_c / p99_s;
    let head = format!(
        "canary p99 {} vs stable {} (×{ratio:.2}; {} of canary requests slower than ×{} stable's p99, where {} is allowed",
        ms(p99_c),
        ms(p99_s),
        pct(share),
        num(max_ratio),
        pct(P99_TAIL)
    );
    let mut c = if ln_e >= thr {
        Check::new(
            name,
            CheckStatus::Fail,
            format!("{head}; p = {} < {})", fmt_p(p), fmt_p(alpha)),
        )
    } else {
        Check::new(
            name,
            CheckStatus::Pass,
            format!("{head}; not significant, p = {})", fmt_p(p)),
        )
    }
    .threshold(max_ratio);
    c.put("stable_samples", hs.total);
    c.put("canary_samples", hc.total);
    c.put("stable_p99_ms", p99_s);
    c.put("canary_p99_ms", p99_c);
    c.put("ratio", ratio);
    c.put("limit_ms", limit_ms);
    c.put("canary_share_above_limit", share);
    c.put("density_ratio", rho);
    c.put("p_value", p);
    c.put("alpha", alpha);
    c
}

/// The mixture's scale for the canary's excess share above the limit:
/// shares of 1.5% to 10% where 1% is allowed are the regressions to catch.
const TAU_P99_SHARE: f64 = 0.02;
/// A cap on the estimated density ratio, which comes from coarse buckets.
const MAX_DENSITY_RATIO: f64 = 10.0;

/// What a quantile inside the open last bucket (`+inf` bound) is taken as.
#[derive(Clone, Copy)]
enum OpenBucket {
    /// Its lower bound: right for a lower confidence bound (the true value is above).
    LowerBound,
    /// Unknown: infinity, right for an upper confidence bound.
    Unbounded,
}

/// A validated latency histogram: buckets `(lower, upper, count)`, the
/// first starting at 0.
struct Histogram {
    buckets: Vec<(f64, f64, f64)>,
    total: f64,
}

impl Histogram {
    fn new(raw: &[(f64, u64)]) -> Result<Self, String> {
        let mut buckets = Vec::with_capacity(raw.len());
        let mut lower = 0.0;
        for (i, &(upper, count)) in raw.iter().enumerate() {
            if upper.is_nan() || upper <= lower {
                return Err(format!(
                    "bucket bounds must be positive and ascend, bound {i} is {upper} after {lower}"
                ));
            }
            if upper.is_infinite() && i + 1 != raw.len() {
                return Err(format!("only the last bound may be infinite, bound {i} is"));
            }
            buckets.push((lower, upper, count as f64));
            lower = upper;
        }
        let total = buckets.iter().map(|b| b.2).sum();
        Ok(Self { buckets, total })
    }

    /// The (interpolated) number of samples above `x`; none of the open
    /// last bucket is counted, as where in it they lie is unknown.
    fn count_above(&self, x: f64) -> f64 {
        self.buckets
            .iter()
            .map(|&(lo, hi, count)| {
                if x <= lo {
                    count
                } else if x >= hi || hi.is_infinite() {
                    0.0
                } else if lo <= 0.0 {
                    count * (hi - x) / hi
                } else {
                    count * (hi / x).ln() / (hi / lo).ln()
                }
            })
            .sum()
    }

    /// Share of samples per unit of ln(latency) around `x`: the density
    /// the interpolation assumes there. NaN in the open last bucket.
    fn log_density(&self, x: f64) -> f64 {
        for &(lo, hi, count) in &self.buckets {
            if x > lo && x <= hi {
                if hi.is_infinite() {
                    return f64::NAN;
                }
                let share = count / self.total;
                // In the first bucket the density is flat in x.
                return if lo <= 0.0 {
                    share * x / hi
                } else {
                    share / (hi / lo).ln()
                };
            }
        }
        f64::NAN
    }

    fn last_finite_bound(&self) -> f64 {
        self.buckets
            .iter()
            .rev()
            .map(|b| b.1)
            .find(|b| b.is_finite())
            .unwrap_or(0.0)
    }

    /// The latency with (interpolated) `k_above` samples above it.
    fn quantile_above(&self, k_above: f64, open: OpenBucket) -> f64 {
        let target = (self.total - k_above).max(0.0);
        let mut below = 0.0;
        for &(lo, hi, count) in &self.buckets {
            if count <= 0.0 {
                continue;
            }
            if below + count >= target {
                let f = ((target - below) / count).clamp(0.0, 1.0);
                return if hi.is_infinite() {
                    match open {
                        OpenBucket::LowerBound => lo,
                        OpenBucket::Unbounded => f64::INFINITY,
                    }
                } else if lo <= 0.0 {
                    f * hi
                } else {
                    // Log-linear: Envoy's bounds are about log-spaced and
                    // latencies about log-normal.
                    lo * (hi / lo).powf(f)
                };
            }
            below += count;
        }
        0.0
    }
}

// === formatting ===

fn p_value(ln_e: f64) -> f64 {
    (-ln_e).exp().min(1.0)
}

fn fmt_p(p: f64) -> String {
    if p >= 1.0 {
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

    fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
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

    /// Anytime upper confidence bound on a rate: the smallest `p0` that
    /// "rate ≥ p0" is rejected for. `None`: not even rates near 1 are.
    pub(super) fn rate_upper_bound(prior: &Prior, k: f64, n: f64, thr: f64) -> Option<f64> {
        let hat = k / n;
        let top = 1.0 - 1e-12;
        if !(ln_e_below(prior, k, n, top) >= thr) {
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
        if !(ln_e_above(prior, k, n, 0.0) >= thr) {
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

    /// ln Φ(z), the standard normal CDF, without underflow to ln 0 for
    /// moderately negative z.
    fn ln_phi(z: f64) -> f64 {
        let p = 0.5 * libm::erfc(-z / std::f64::consts::SQRT_2);
        if p > 0.0 {
            p.ln()
        } else {
            // Mills ratio: Φ(z) ≈ φ(z)/|z| far in the lower tail.
            -0.5 * z * z - (-z).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
        }
    }

    /// The mixture's scale for an error-rate increase: increases of one to a
    /// few percentage points over the margin are the regressions to catch.
    const TAU_ERROR_RATE: f64 = 0.02;

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
        if !(ln_e_increase(ks, ns, kc, nc, -EDGE) >= thr) {
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
    }

    const T0: u64 = 1_700_000_000_000;

    /// One simulated step evaluated every second: the first second with a
    /// Rollback, and the verdict at the end.
    fn simulate(s: &Scenario, seed: u64) -> (Option<u64>, Verdict) {
        let mut rng = StdRng::seed_from_u64(seed);
        let rules = StopRules {
            max_error_rate_increase_pp: s.max_pp,
            max_p99_ratio: s.max_ratio,
            max_unexpected_mismatch_rate: None,
            halt_on_nack: true,
        };
        let analysis = analysis();
        let step = CanaryStep {
            weight: 20,
            min_duration_s: s.seconds as f64,
            min_requests: 200,
            manual_gate: false,
        };
        let (mut stable, mut canary) = (Side::default(), Side::default());
        let mut last = Verdict::Hold;
        for t in 1..=s.seconds {
            stable.serve(&mut rng, s.stable_rps, s.stable_err, s.median_ms, s.sigma);
            canary.serve(
                &mut rng,
                s.canary_rps,
                s.canary_err,
                s.median_ms * s.canary_slowdown,
                s.sigma,
            );
            let now = T0 + t * 1000;
            let j = judge(
                &rules,
                &analysis,
                &step,
                &stable.evidence(now),
                &canary.evidence(now),
                now,
                T0,
            );
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
        }
    }

    fn summarize(name: &str, s: &Scenario, runs: u64) {
        let mut times = Vec::new();
        let mut promoted = 0;
        for seed in 0..runs {
            let (t, v) = simulate(s, seed);
            if let Some(t) = t {
                times.push(t);
            }
            if v == Verdict::Promote {
                promoted += 1;
            }
        }
        times.sort_unstable();
        let q = |f: f64| {
            times
                .get(((times.len() as f64 * f) as usize).min(times.len().saturating_sub(1)))
                .copied()
        };
        eprintln!(
            "{name}: rollbacks {}/{runs}, promoted {promoted}, t50 {:?} t90 {:?} t95 {:?} max {:?}",
            times.len(),
            q(0.5),
            q(0.9),
            q(0.95),
            times.last()
        );
    }

    #[test]
    #[ignore]
    fn debug_one() {
        let s = Scenario { canary_slowdown: 2.0, seconds: 20, sigma: 0.4, ..base() };
        let mut rng = StdRng::seed_from_u64(1);
        let (mut st, mut ca) = (Side::default(), Side::default());
        for _ in 0..20 {
            st.serve(&mut rng, s.stable_rps, s.stable_err, s.median_ms, s.sigma);
            ca.serve(&mut rng, s.canary_rps, s.canary_err, s.median_ms * 2.0, s.sigma);
        }
        let rules = StopRules { max_error_rate_increase_pp: Some(1.0), max_p99_ratio: Some(1.5), max_unexpected_mismatch_rate: None, halt_on_nack: true };
        let step = CanaryStep { weight: 20, min_duration_s: 20.0, min_requests: 200, manual_gate: false };
        let now = T0 + 20_000;
        let j = judge(&rules, &analysis(), &step, &st.evidence(now), &ca.evidence(now), now, T0);
        eprintln!("{}", serde_json::to_string_pretty(&j).unwrap());
        eprintln!("{:?}\n{:?}", st.hist, ca.hist);
    }

    #[test]
    #[ignore]
    fn explore() {
        let runs = 200;
        summarize("A/A", &base(), runs);
        summarize(
            "+5pp",
            &Scenario {
                canary_err: 0.06,
                seconds: 30,
                ..base()
            },
            runs,
        );
        summarize(
            "+2pp",
            &Scenario {
                canary_err: 0.03,
                seconds: 60,
                ..base()
            },
            runs,
        );
        summarize(
            "+2pp m0",
            &Scenario {
                canary_err: 0.03,
                seconds: 60,
                max_pp: Some(0.0),
                ..base()
            },
            runs,
        );
        for sigma in [0.25, 0.3, 0.4, 0.5] {
            summarize(
                &format!("p99x2 s{sigma}"),
                &Scenario {
                    canary_slowdown: 2.0,
                    seconds: 40,
                    sigma,
                    ..base()
                },
                runs,
            );
        }
    }
}
