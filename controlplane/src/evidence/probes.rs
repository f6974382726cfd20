//! Synthetic probes as evidence: the checks a rollout declares, the pure
//! schedule that paces them ([`due`]), the bounded book their results go
//! to ([`ProbeBook`]), what a window of them amounts to ([`ProbeTally`]),
//! and the port the engine drives a runner through ([`Prober`]).
//!
//! The runner itself (HTTP through Envoy) is [`crate::probes`]; this module
//! does no I/O, so the rate logic and the book are tested with time as an
//! input. Probe results are evidence of their own: they are never added to
//! the live request counts the judge reads from Envoy's stats (the probes
//! go to separate `-probe` clusters, see [`crate::model::probe_cluster`]).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Most checks one rollout may declare.
pub const MAX_CHECKS: usize = 8;
/// The shortest period between two sends of one check.
pub const MIN_EVERY_S: f64 = 0.2;
/// Most probe requests per second one rollout may send, both sides counted.
pub const MAX_RATE_PER_S: f64 = 20.0;
/// Largest request body a check may send.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest response body read; a longer one fails the check.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Results kept per service (newest kept): a few minutes at the highest rate.
pub const MAX_RESULTS: usize = 8_192;
/// Longest error or mismatch text kept with a result.
pub const MAX_DETAIL_CHARS: usize = 200;

/// One declared check, validated by the rollout spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeCheck {
    pub name: String,
    pub method: String,
    /// Starts with `/`; may carry a query.
    pub path: String,
    /// Lower-case names; sent as given.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    pub expect: Expect,
    /// Seconds between two sends (each send goes to both sides).
    pub every_s: f64,
}

/// What a passing answer looks like.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expect {
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<JsonExpect>,
}

/// A JSON field the answer must hold: the value at `pointer` (RFC 6901)
/// equals `equals`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonExpect {
    pub pointer: String,
    pub equals: serde_json::Value,
}

impl Expect {
    /// `status 200 and /status == "ok"`.
    pub fn describe(&self) -> String {
        match &self.json {
            None => format!("status {}", self.status),
            Some(j) => format!("status {} and {} == {}", self.status, j.pointer, j.equals),
        }
    }

    /// Whether an answer passes, and if not, what it was.
    pub fn judge(&self, status: u16, body: &[u8]) -> Result<(), String> {
        if status != self.status {
            return Err(format!("got status {status}"));
        }
        let Some(j) = &self.json else {
            return Ok(());
        };
        let doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| format!("got status {status}, a body that is not JSON ({e})"))?;
        match doc.pointer(&j.pointer) {
            Some(v) if *v == j.equals => Ok(()),
            Some(v) => Err(format!("got status {status}, {} = {v}", j.pointer)),
            None => Err(format!("got status {status}, no {} in the body", j.pointer)),
        }
    }
}

/// Which backend a probe was pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Stable,
    Canary,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Stable, Side::Canary];

    pub fn name(self) -> &'static str {
        match self {
            Side::Stable => "stable",
            Side::Canary => "canary",
        }
    }
}

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// When it was sent (Unix ms).
    pub time_ms: u64,
    pub check: String,
    pub side: Side,
    pub passed: bool,
    /// The status answered; `None`: no answer (timeout, connection error).
    pub status: Option<u16>,
    pub latency_ms: f64,
    /// Why it failed (at most [`MAX_DETAIL_CHARS`]); empty when it passed.
    pub detail: String,
}

/// `text` cut to [`MAX_DETAIL_CHARS`] characters.
pub fn bounded_detail(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_DETAIL_CHARS).collect();
    if text.chars().nth(MAX_DETAIL_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// One side's results for one check over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SideTally {
    pub passed: u64,
    pub failed: u64,
    /// The newest failure, for the verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<ProbeResult>,
}

/// One check's results over a window, per side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckTally {
    pub check: String,
    pub stable: SideTally,
    pub canary: SideTally,
}

/// A window of a service's probe results, per check (in name order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeTally {
    pub checks: Vec<CheckTally>,
}

impl ProbeTally {
    pub fn side(&self, side: Side) -> impl Iterator<Item = &SideTally> {
        self.checks.iter().map(move |c| match side {
            Side::Stable => &c.stable,
            Side::Canary => &c.canary,
        })
    }

    /// Probes that passed on `side`, all checks.
    pub fn passed(&self, side: Side) -> u64 {
        self.side(side)
            .map(|s| s.passed)
            .fold(0, u64::saturating_add)
    }

    /// Probes that failed on `side`, all checks.
    pub fn failed(&self, side: Side) -> u64 {
        self.side(side)
            .map(|s| s.failed)
            .fold(0, u64::saturating_add)
    }
}

/// The bounded per-service record of probe results, oldest dropped first.
#[derive(Debug, Default)]
pub struct ProbeBook {
    services: BTreeMap<String, VecDeque<ProbeResult>>,
}

impl ProbeBook {
    pub fn record(&mut self, service: &str, result: ProbeResult) {
        let list = self.services.entry(service.to_owned()).or_default();
        if list.len() >= MAX_RESULTS {
            list.pop_front();
        }
        list.push_back(result);
    }

    /// Forgets a service's results (its rollout ended; the next one starts
    /// from nothing).
    pub fn forget(&mut self, service: &str) {
        self.services.remove(service);
    }

    /// The service's results sent at or after `since_ms`, per check.
    pub fn tally(&self, service: &str, since_ms: u64) -> ProbeTally {
        let mut by_check: BTreeMap<&str, CheckTally> = BTreeMap::new();
        for r in self
            .services
            .get(service)
            .into_iter()
            .flatten()
            .filter(|r| r.time_ms >= since_ms)
        {
            let c = by_check.entry(&r.check).or_insert_with(|| CheckTally {
                check: r.check.clone(),
                ..CheckTally::default()
            });
            let side = match r.side {
                Side::Stable => &mut c.stable,
                Side::Canary => &mut c.canary,
            };
            if r.passed {
                side.passed = side.passed.saturating_add(1);
            } else {
                side.failed = side.failed.saturating_add(1);
                side.last_failure = Some(r.clone());
            }
        }
        ProbeTally {
            checks: by_check.into_values().collect(),
        }
    }
}

/// Where one check is in its schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    /// When it was last sent (Unix ms); `None`: never.
    pub last_sent_ms: Option<u64>,
    /// A send (to either side) has not finished yet.
    pub in_flight: bool,
}

/// Whether a check sent every `every_ms` is due at `now_ms`: never while
/// its previous send is still in flight (a slow backend cannot pile probes
/// up), otherwise once `every_ms` has passed since the last send. The clock
/// going backwards never makes it due early.
pub fn due(now_ms: u64, every_ms: u64, schedule: Schedule) -> bool {
    if schedule.in_flight {
        return false;
    }
    match schedule.last_sent_ms {
        None => true,
        Some(last) => now_ms >= last.saturating_add(every_ms.max(1)),
    }
}

/// The probe runner as the engine sees it: told what to run, asked what
/// happened. The engine is its only caller; the runner never knows whose
/// evidence it gathers.
pub trait Prober: Send + Sync {
    /// Runs `checks` for `service` from now on, replacing what ran before;
    /// `None` stops it: no probe of the service leaves after this returns.
    fn set_plan(&self, service: &str, checks: Option<Vec<ProbeCheck>>);

    /// The service's results sent at or after `since_ms`.
    fn tally(&self, service: &str, since_ms: u64) -> ProbeTally;

    /// How many times the runner's scheduler has looked for due checks
    /// (whether or not any was due): lets a test see time pass for it.
    fn ticks(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(time_ms: u64, check: &str, side: Side, passed: bool) -> ProbeResult {
        ProbeResult {
            time_ms,
            check: check.into(),
            side,
            passed,
            status: Some(if passed { 200 } else { 500 }),
            latency_ms: 1.0,
            detail: if passed {
                String::new()
            } else {
                "got status 500".into()
            },
        }
    }

    #[test]
    fn a_check_is_due_once_per_period_and_never_while_in_flight() {
        let idle = |last| Schedule {
            last_sent_ms: last,
            in_flight: false,
        };
        assert!(due(0, 1_000, idle(None)));
        assert!(!due(1_999, 1_000, idle(Some(1_000))));
        assert!(due(2_000, 1_000, idle(Some(1_000))));
        // In flight: not even long after.
        assert!(!due(
            60_000,
            1_000,
            Schedule {
                last_sent_ms: Some(1_000),
                in_flight: true
            }
        ));
        // A clock that went back is not "due".
        assert!(!due(500, 1_000, idle(Some(1_000))));
        // No overflow at the end of time; a period of 0 is treated as 1 ms.
        assert!(!due(u64::MAX - 1, 10, idle(Some(u64::MAX - 1))));
        assert!(!due(5, 0, idle(Some(5))));
        assert!(due(6, 0, idle(Some(5))));
    }

    #[test]
    fn sends_over_a_simulated_minute_keep_to_the_rate() {
        // Ticks every 50 ms for 60 s; a send takes 120 ms.
        let every_ms = 200;
        let mut s = Schedule::default();
        let mut finishes_at = None;
        let mut sent = 0;
        for now in (0..60_000).step_by(50) {
            if finishes_at.is_some_and(|f| now >= f) {
                s.in_flight = false;
                finishes_at = None;
            }
            if due(now, every_ms, s) {
                sent += 1;
                s = Schedule {
                    last_sent_ms: Some(now),
                    in_flight: true,
                };
                finishes_at = Some(now + 120);
            }
        }
        assert_eq!(sent, 300, "one send per 200 ms, never more");
    }

    #[test]
    fn the_book_is_bounded_and_tallies_a_window_per_check_and_side() {
        let mut book = ProbeBook::default();
        book.record("shop", result(1_000, "health", Side::Canary, false));
        book.record("shop", result(2_000, "health", Side::Canary, true));
        book.record("shop", result(2_000, "health", Side::Stable, true));
        book.record("shop", result(3_000, "order", Side::Canary, false));
        book.record("other", result(3_000, "health", Side::Canary, false));
        let t = book.tally("shop", 2_000);
        assert_eq!(t.checks.len(), 2);
        assert_eq!((t.passed(Side::Canary), t.failed(Side::Canary)), (1, 1));
        assert_eq!((t.passed(Side::Stable), t.failed(Side::Stable)), (1, 0));
        let order = &t.checks[1];
        assert_eq!(order.check, "order");
        assert_eq!(
            order.canary.last_failure.as_ref().map(|r| r.time_ms),
            Some(3_000)
        );
        for i in 0..(MAX_RESULTS as u64 + 10) {
            book.record("shop", result(10_000 + i, "health", Side::Stable, true));
        }
        let all = book.tally("shop", 0);
        assert_eq!(all.passed(Side::Stable), MAX_RESULTS as u64);
        book.forget("shop");
        assert_eq!(book.tally("shop", 0), ProbeTally::default());
    }

    #[test]
    fn an_expectation_names_what_the_answer_was() {
        let e = Expect {
            status: 200,
            json: Some(JsonExpect {
                pointer: "/status".into(),
                equals: serde_json::json!("ok"),
            }),
        };
        assert_eq!(e.describe(), "status 200 and /status == \"ok\"");
        assert_eq!(e.judge(200, br#"{"status":"ok"}"#), Ok(()));
        assert_eq!(
            e.judge(200, br#"{"status":"degraded"}"#),
            Err("got status 200, /status = \"degraded\"".into())
        );
        assert_eq!(e.judge(503, b""), Err("got status 503".into()));
        assert!(e.judge(200, b"\xff\xfe").unwrap_err().contains("not JSON"));
        assert!(e.judge(200, b"{}").unwrap_err().contains("no /status"));
        let long = "é".repeat(MAX_DETAIL_CHARS * 2);
        assert_eq!(bounded_detail(&long).chars().count(), MAX_DETAIL_CHARS + 1);
    }
}
