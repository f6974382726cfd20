//! `understudy rollout watch`: follow one rollout until it ends.
//!
//! On a terminal the screen is redrawn in place (indicatif): the step ladder,
//! the current verdict, and a progress bar each for the step's minimum time
//! and minimum canary requests; transitions are printed above it once each.
//! Piped, it prints only what changed: each transition once, and a status
//! line when the stage, the weights or the verdict change (not when only the
//! numbers inside a verdict's reason move). It exits non-zero unless the
//! rollout succeeds.
//!
//! What to show is decided by pure functions of the API's rollout view
//! ([`ladder`], [`status_line`], [`step_progress`]), tested below; [`run`]
//! only polls and draws.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// The step ladder: `shadow ✓ › 1% ✓ › [5%] › 20% (gate) › 100%`. The
/// current position is in brackets, passed positions carry ✓, and the
/// position where a rollout ended badly carries ✗.
pub fn ladder(view: &Value) -> String {
    let state = view["phase"]["state"].as_str().unwrap_or("");
    let step = view["phase"]["step"].as_u64().map(|s| s as usize);
    let failed = matches!(state, "rolled_back" | "aborted");
    let steps: &[Value] = view["spec"]["steps"].as_array().map_or(&[], Vec::as_slice);
    // The position the rollout is at (or ended at): None = shadow stage.
    let at: Option<usize> = match state {
        "shadow" => None,
        "canary" | "awaiting_approval" => step,
        "succeeded" => Some(steps.len().saturating_sub(1)),
        _ => {
            // Ended badly: at the highest step whose weight had gone out
            // (the marks record each weight applied), or in the shadow stage.
            let reached = view["marks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["weight"].as_u64())
                .max()
                .unwrap_or(0);
            steps
                .iter()
                .rposition(|st| st["weight"].as_u64().is_some_and(|w| w <= reached))
                .filter(|_| reached > 0)
        }
    };
    let succeeded = state == "succeeded";
    let mut parts = Vec::new();
    if view["spec"]["shadow"].is_object() {
        let mark = match at {
            None if failed => "shadow ✗".to_owned(),
            None if !succeeded => "[shadow]".to_owned(),
            _ => "shadow ✓".to_owned(),
        };
        parts.push(mark);
    }
    for (i, st) in steps.iter().enumerate() {
        let w = st["weight"].as_u64().unwrap_or(0);
        let gate = if st["manual_gate"].as_bool() == Some(true) {
            " (gate)"
        } else {
            ""
        };
        let label = format!("{w}%{gate}");
        parts.push(match at {
            Some(a) if i < a => format!("{label} ✓"),
            Some(a) if i == a && succeeded => format!("{label} ✓"),
            Some(a) if i == a && failed => format!("{label} ✗"),
            Some(a) if i == a => format!("[{label}]"),
            _ => label,
        });
    }
    parts.join(" › ")
}

/// The status line: stage, weights and the current verdict. `with_reason`
/// adds the verdict's reason (its numbers change every evaluation).
pub fn status_line(view: &Value, with_reason: bool) -> String {
    let paused = if view["paused"].as_bool() == Some(true) {
        " (paused)"
    } else {
        ""
    };
    let verdict = view["last_judgement"]["verdict"].as_str().unwrap_or("-");
    let mut line = format!(
        "{}{}  stable {}% / canary {}%  {}",
        view["stage"].as_str().unwrap_or("?"),
        paused,
        view["weights"]["stable"],
        view["weights"]["canary"],
        verdict,
    );
    if with_reason {
        let reason = view["last_judgement"]["reason"].as_str().unwrap_or("");
        line.push_str(": ");
        line.push_str(reason);
    }
    line
}

/// How far the current canary step is towards its minimums.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    pub elapsed_s: f64,
    pub min_duration_s: f64,
    /// Canary requests counted by the last evaluation, if it had any.
    pub requests: Option<u64>,
    pub min_requests: u64,
}

/// The current step's progress, for a rollout in a canary step.
pub fn step_progress(view: &Value, now_ms: u64) -> Option<StepProgress> {
    if view["phase"]["state"].as_str() != Some("canary") {
        return None;
    }
    let step = view["phase"]["step"].as_u64()? as usize;
    let spec = &view["spec"]["steps"][step];
    let started = view["phase_started_ms"].as_u64()?;
    let requests = view["last_judgement"]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "step_requests")
        .and_then(|c| c["measured"]["canary_requests"].as_f64())
        .map(|r| r.max(0.0) as u64);
    Some(StepProgress {
        elapsed_s: now_ms.saturating_sub(started) as f64 / 1000.0,
        min_duration_s: spec["min_duration_s"].as_f64()?,
        requests,
        min_requests: spec["min_requests"].as_u64()?,
    })
}

/// One audit entry as a line: `>> canary step 1 -> canary step 2 by engine: ...`.
pub fn audit_line(entry: &Value) -> String {
    format!(
        ">> {} -> {} by {}: {}",
        entry["from"].as_str().unwrap_or(""),
        entry["to"].as_str().unwrap_or(""),
        entry["actor"].as_str().unwrap_or(""),
        entry["reason"].as_str().unwrap_or("")
    )
}

/// How a finished rollout ends the command: `Ok` only for success.
fn outcome(view: &Value) -> Option<anyhow::Result<()>> {
    match view["phase"]["state"].as_str() {
        Some("succeeded") => Some(Ok(())),
        Some(end @ ("rolled_back" | "aborted")) => Some(Err(anyhow::anyhow!(
            "rollout {end}: {}",
            view["phase"]["reason"].as_str().unwrap_or("")
        ))),
        _ => None,
    }
}

/// The live screen on a terminal.
struct Screen {
    multi: MultiProgress,
    head: ProgressBar,
    time: ProgressBar,
    requests: ProgressBar,
}

impl Screen {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let text =
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressStyle::with_template("  {prefix:9} [{bar:32}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let head = multi.add(ProgressBar::new(1).with_style(text));
        let time = multi.add(
            ProgressBar::new(1)
                .with_style(bar.clone())
                .with_prefix("time"),
        );
        let requests = multi.add(ProgressBar::new(1).with_style(bar).with_prefix("requests"));
        Self {
            multi,
            head,
            time,
            requests,
        }
    }

    fn draw(&self, view: &Value, now: u64) {
        self.head
            .set_message(format!("{}\n{}", ladder(view), status_line(view, true)));
        match step_progress(view, now) {
            Some(p) => {
                let min = (p.min_duration_s * 10.0).round().max(1.0) as u64;
                self.time.set_length(min);
                self.time
                    .set_position(((p.elapsed_s * 10.0).round() as u64).min(min));
                self.time
                    .set_message(format!("{:.0} of {:.0} s", p.elapsed_s, p.min_duration_s));
                let got = p.requests.unwrap_or(0);
                self.requests.set_length(p.min_requests.max(1));
                self.requests.set_position(got.min(p.min_requests.max(1)));
                self.requests.set_message(match p.requests {
                    Some(r) => format!("{r} of {} canary requests", p.min_requests),
                    None => format!("? of {} canary requests", p.min_requests),
                });
            }
            None => {
                for bar in [&self.time, &self.requests] {
                    bar.set_length(1);
                    bar.set_position(0);
                    bar.set_message("-");
                }
            }
        }
    }

    fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    fn finish(&self) {
        for bar in [&self.head, &self.time, &self.requests] {
            bar.abandon();
        }
    }
}

/// Polls `url` (a rollout's API address) every `every` seconds until the
/// rollout ends.
pub async fn run(http: &reqwest::Client, url: &str, every: f64) -> anyhow::Result<()> {
    let period = Duration::from_secs_f64(every.clamp(0.1, 60.0));
    let screen = std::io::stdout().is_terminal().then(Screen::new);
    let mut seen_audit = 0;
    let mut last_status = String::new();
    loop {
        let view = match super::call(http.get(url)).await {
            Ok(v) => v,
            Err(e) => {
                if let Some(s) = &screen {
                    s.finish();
                }
                bail!(e);
            }
        };
        for entry in view["audit"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(seen_audit)
        {
            match &screen {
                Some(s) => s.println(&audit_line(entry)),
                None => println!("{}", audit_line(entry)),
            }
            seen_audit += 1;
        }
        match &screen {
            Some(s) => s.draw(&view, crate::time::now_unix_ms()),
            None => {
                // Piped: only changes, and the reason only with them.
                let status = status_line(&view, false);
                if status != last_status {
                    println!("{}", ladder(&view));
                    println!("{}", status_line(&view, true));
                    last_status = status;
                }
            }
        }
        if let Some(end) = outcome(&view) {
            if let Some(s) = &screen {
                s.finish();
            }
            return end;
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(phase: Value) -> Value {
        json!({
            "phase": phase,
            "phase_started_ms": 10_000,
            "stage": "canary step 2",
            "weights": {"stable": 95, "canary": 5},
            "spec": {
                "shadow": {"route": "r"},
                "steps": [
                    {"weight": 1, "min_duration_s": 60.0, "min_requests": 200, "manual_gate": false},
                    {"weight": 5, "min_duration_s": 30.0, "min_requests": 100, "manual_gate": false},
                    {"weight": 20, "min_duration_s": 60.0, "min_requests": 200, "manual_gate": true},
                    {"weight": 100, "min_duration_s": 60.0, "min_requests": 200, "manual_gate": false}
                ]
            },
            "marks": [{"weight": 0}, {"weight": 1}, {"weight": 5}],
            "last_judgement": {
                "verdict": "hold",
                "reason": "not enough data (canary 37 of 100 requests)",
                "checks": [{"name": "step_requests", "measured": {"canary_requests": 37.0}}]
            }
        })
    }

    #[test]
    fn the_ladder_marks_passed_current_and_gated_steps() {
        let v = view(json!({"state": "canary", "step": 1}));
        assert_eq!(ladder(&v), "shadow ✓ › 1% ✓ › [5%] › 20% (gate) › 100%");
        let v = view(json!({"state": "shadow"}));
        assert_eq!(ladder(&v), "[shadow] › 1% › 5% › 20% (gate) › 100%");
        let v = view(json!({"state": "awaiting_approval", "step": 2}));
        assert_eq!(ladder(&v), "shadow ✓ › 1% ✓ › 5% ✓ › [20% (gate)] › 100%");
    }

    #[test]
    fn the_ladder_shows_where_a_rollout_ended() {
        // Rolled back at 5%: the marks say 5% went out.
        let v = view(json!({"state": "rolled_back", "reason": "5xx"}));
        assert_eq!(ladder(&v), "shadow ✓ › 1% ✓ › 5% ✗ › 20% (gate) › 100%");
        // Rolled back in the shadow stage: no weight ever went out.
        let mut v = view(json!({"state": "rolled_back", "reason": "mismatches"}));
        v["marks"] = json!([{"weight": 0}]);
        assert_eq!(ladder(&v), "shadow ✗ › 1% › 5% › 20% (gate) › 100%");
        let v = view(json!({"state": "succeeded"}));
        assert_eq!(ladder(&v), "shadow ✓ › 1% ✓ › 5% ✓ › 20% (gate) ✓ › 100% ✓");
    }

    #[test]
    fn the_status_line_leaves_the_moving_numbers_out_unless_asked() {
        let mut v = view(json!({"state": "canary", "step": 1}));
        v["paused"] = json!(true);
        assert_eq!(
            status_line(&v, true),
            "canary step 2 (paused)  stable 95% / canary 5%  hold: not enough data (canary 37 of 100 requests)"
        );
        let short = status_line(&v, false);
        v["last_judgement"]["reason"] = json!("not enough data (canary 38 of 100 requests)");
        // Piped output compares this line: a new number is not a change.
        assert_eq!(status_line(&v, false), short);
        v["last_judgement"]["verdict"] = json!("promote");
        assert_ne!(status_line(&v, false), short);
    }

    #[test]
    fn step_progress_counts_time_and_canary_requests() {
        let v = view(json!({"state": "canary", "step": 1}));
        assert_eq!(
            step_progress(&v, 25_000),
            Some(StepProgress {
                elapsed_s: 15.0,
                min_duration_s: 30.0,
                requests: Some(37),
                min_requests: 100
            })
        );
        assert_eq!(
            step_progress(&view(json!({"state": "shadow"})), 25_000),
            None
        );
    }

    #[test]
    fn only_success_exits_zero() {
        assert!(matches!(
            outcome(&view(json!({"state": "succeeded"}))),
            Some(Ok(()))
        ));
        let err = outcome(&view(json!({"state": "rolled_back", "reason": "p99 2x"})))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "rollout rolled_back: p99 2x");
        assert!(
            outcome(&view(json!({"state": "aborted", "reason": "x"})))
                .unwrap()
                .is_err()
        );
        assert!(outcome(&view(json!({"state": "canary", "step": 0}))).is_none());
    }
}
