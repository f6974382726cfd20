//! Hedged requests: when the primary attempt has no response headers after
//! the hedge delay, send another attempt; the first acceptable answer wins.
//!
//! Everything here is decided without touching Envoy:
//! - [`HedgeConfig`]: a route's validated settings.
//! - [`eligibility`]: whether a request may be hedged at all (method,
//!   Idempotency-Key, upgrade/streaming).
//! - [`DelayTracker`]: the hedge delay, fixed or a percentile of recent
//!   latency over a sliding window.
//! - [`Budget`]: a token bucket that keeps hedges under a fraction of requests.
//! - [`HedgeTable`]: the streams that may still be hedged, as a state machine
//!   driven by the filter's events (`track`, `due`, `on_primary_headers`,
//!   `on_hedge_response`, `end`), answering with what the filter must do.
//!
//! **Per worker.** Envoy runs one wasm VM per worker thread and they share no
//! memory, so each worker keeps its own table, delay window and budget. Envoy
//! spreads connections across workers, so each worker's window samples the
//! same latency distribution and its percentile estimates the same value;
//! sharing the windows through shared data would put a process-wide lock on
//! every request for no better estimate. The budget's fraction holds per
//! worker and therefore process-wide; its per-second floor is per worker.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::rules::ConfigError;

/// Hedges after the first (a route's `max_attempts` counts the primary).
pub const MAX_ATTEMPTS: u32 = 4;
/// Streams one worker tracks at once; beyond this, requests are not hedged.
pub const DEFAULT_TABLE_CAP: usize = 10_000;
/// The header a hedge attempt carries so upstreams (and tests) can tell it apart.
pub const HEDGE_MARKER: &str = "x-understudy-hedge";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

// === config ===

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHedgeConfig {
    /// Cluster the hedge goes to: the route's own, or an alternate.
    pub cluster: String,
    /// Attempts in total, primary included.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub delay: RawDelay,
    #[serde(default)]
    pub budget: RawBudget,
    /// Answers that do not win: `"5xx"`, `"4xx"` or single codes like `"429"`.
    #[serde(default = "default_unacceptable")]
    pub unacceptable: Vec<String>,
    /// Timeout of each hedge attempt.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests with a larger body are not hedged (the filter keeps a copy).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// The upstream removes duplicates itself, so unsafe methods may be hedged
    /// without a client-supplied Idempotency-Key.
    #[serde(default)]
    pub upstream_deduplicates: bool,
}

fn default_attempts() -> u32 {
    2
}
fn default_unacceptable() -> Vec<String> {
    vec!["5xx".to_owned()]
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_max_body() -> usize {
    64 * 1024
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawDelay {
    /// `{"fixed": {"ms": 50}}`
    Fixed { ms: u64 },
    /// `{"adaptive": {"percentile": 95, ...}}`
    Adaptive(RawAdaptive),
}

impl Default for RawDelay {
    fn default() -> Self {
        RawDelay::Adaptive(RawAdaptive::default())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdaptive {
    pub percentile: f64,
    /// Used until `min_samples` latencies are in the window.
    pub initial_ms: u64,
    pub min_ms: u64,
    pub max_ms: u64,
    pub window_s: u64,
    pub min_samples: usize,
    pub max_samples: usize,
    /// The delay is at most this many times the latency at the percentile
    /// with twice as many requests slower (p90 for a p95 delay); 0 turns the
    /// guard off. See [`DelayTracker::current_us`].
    pub tail_guard: f64,
}

impl Default for RawAdaptive {
    fn default() -> Self {
        Self {
            percentile: 95.0,
            initial_ms: 50,
            min_ms: 5,
            max_ms: 1_000,
            window_s: 10,
            min_samples: 20,
            max_samples: 1_000,
            tail_guard: DEFAULT_TAIL_GUARD,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBudget {
    /// Hedges may be at most this percentage of requests...
    pub percent: f64,
    /// ...or this many per second (per worker), whichever allows more, so a
    /// quiet route can still hedge. Not added to the percentage: a busy
    /// route's extra load stays at `percent`.
    pub per_second_floor: f64,
    /// Tokens that may accumulate for a burst of slow requests.
    pub burst: f64,
}

impl Default for RawBudget {
    fn default() -> Self {
        Self {
            percent: 5.0,
            per_second_floor: 1.0,
            burst: 10.0,
        }
    }
}

/// A route's validated hedging settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeConfig {
    pub cluster: String,
    pub max_attempts: u32,
    pub delay: DelayConfig,
    pub budget: BudgetConfig,
    unacceptable: Vec<StatusMatch>,
    pub timeout_ms: u64,
    pub max_body_bytes: usize,
    pub upstream_deduplicates: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DelayConfig {
    Fixed {
        ms: u64,
    },
    Adaptive {
        percentile: f64,
        initial_ms: u64,
        min_ms: u64,
        max_ms: u64,
        window_ms: u64,
        min_samples: usize,
        max_samples: usize,
        tail_guard: f64,
    },
}

/// The default [`RawAdaptive::tail_guard`]: twice the guard percentile's
/// latency. A smooth latency distribution never reaches it (p95 is about
/// 1.2 times p90 for a log-normal, 1.3 times for an exponential), so it only
/// acts where the distribution has a gap: a fast mode and a slow tail.
pub const DEFAULT_TAIL_GUARD: f64 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    pub percent: f64,
    pub per_second_floor: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum StatusMatch {
    Class(u16),
    Code(u16),
}

impl HedgeConfig {
    /// Validates `raw`; `field` is where it sits (`routes[0].hedge`) for error messages.
    pub fn from_raw(raw: RawHedgeConfig, field: &str) -> Result<Self, ConfigError> {
        let invalid = |what: &str, reason: String| ConfigError::Invalid {
            field: format!("{field}.{what}"),
            reason,
        };
        if raw.cluster.trim().is_empty() {
            return Err(invalid(
                "cluster",
                "must name the cluster hedges go to".into(),
            ));
        }
        crate::rules::validate_cluster(&format!("{field}.cluster"), &raw.cluster)?;
        if raw.max_attempts == 0 || raw.max_attempts > MAX_ATTEMPTS {
            return Err(invalid(
                "max_attempts",
                format!(
                    "must be between 1 and {MAX_ATTEMPTS} (the primary counts), got {}",
                    raw.max_attempts
                ),
            ));
        }
        let delay = match raw.delay {
            RawDelay::Fixed { ms } => {
                if ms == 0 {
                    return Err(invalid("delay.fixed.ms", "must be at least 1".into()));
                }
                DelayConfig::Fixed { ms }
            }
            RawDelay::Adaptive(a) => {
                if !(a.percentile > 0.0 && a.percentile <= 100.0) {
                    return Err(invalid(
                        "delay.adaptive.percentile",
                        format!("must be in (0, 100], got {}", a.percentile),
                    ));
                }
                if a.min_ms > a.max_ms {
                    return Err(invalid(
                        "delay.adaptive",
                        format!(
                            "the floor min_ms ({}) is above the ceiling max_ms ({})",
                            a.min_ms, a.max_ms
                        ),
                    ));
                }
                if !(a.tail_guard == 0.0 || (1.0..=1000.0).contains(&a.tail_guard)) {
                    return Err(invalid(
                        "delay.adaptive.tail_guard",
                        format!("must be 0 (off) or within 1..=1000, got {}", a.tail_guard),
                    ));
                }
                if a.window_s == 0 || a.max_samples == 0 || a.max_samples > 100_000 {
                    return Err(invalid(
                        "delay.adaptive",
                        "window_s must be at least 1 and max_samples within 1..=100000".into(),
                    ));
                }
                DelayConfig::Adaptive {
                    percentile: a.percentile,
                    initial_ms: a.initial_ms.clamp(a.min_ms, a.max_ms),
                    min_ms: a.min_ms,
                    max_ms: a.max_ms,
                    window_ms: a.window_s.saturating_mul(1000),
                    min_samples: a.min_samples.max(1),
                    max_samples: a.max_samples,
                    tail_guard: a.tail_guard,
                }
            }
        };
        let b = raw.budget;
        if !(0.0..=100.0).contains(&b.percent) {
            return Err(invalid(
                "budget.percent",
                format!("must be within 0..=100, got {}", b.percent),
            ));
        }
        if !(b.per_second_floor >= 0.0 && b.per_second_floor.is_finite()) {
            return Err(invalid(
                "budget.per_second_floor",
                format!("must be 0 or more, got {}", b.per_second_floor),
            ));
        }
        if !(b.burst >= 1.0 && b.burst.is_finite()) {
            return Err(invalid(
                "budget.burst",
                format!("must be at least 1, got {}", b.burst),
            ));
        }
        let unacceptable = raw
            .unacceptable
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_status_match(s).ok_or_else(|| {
                    invalid(
                        &format!("unacceptable[{i}]"),
                        format!("{s:?} is neither a class like \"5xx\" nor a status code"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if raw.timeout_ms == 0 {
            return Err(invalid("timeout_ms", "must be at least 1".into()));
        }
        if raw.max_body_bytes > 16 * 1024 * 1024 {
            return Err(invalid("max_body_bytes", "must be at most 16 MiB".into()));
        }
        Ok(Self {
            cluster: raw.cluster,
            max_attempts: raw.max_attempts,
            delay,
            budget: BudgetConfig {
                percent: b.percent,
                per_second_floor: b.per_second_floor,
                burst: b.burst,
            },
            unacceptable,
            timeout_ms: raw.timeout_ms,
            max_body_bytes: raw.max_body_bytes,
            upstream_deduplicates: raw.upstream_deduplicates,
        })
    }

    /// Whether an answer with `status` may win.
    pub fn acceptable(&self, status: u16) -> bool {
        !self.unacceptable.iter().any(|m| match m {
            StatusMatch::Class(c) => status / 100 == *c,
            StatusMatch::Code(c) => status == *c,
        })
    }
}

fn parse_status_match(s: &str) -> Option<StatusMatch> {
    let b = s.as_bytes();
    if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && s[1..].eq_ignore_ascii_case("xx") {
        return Some(StatusMatch::Class(u16::from(b[0] - b'0')));
    }
    match s.parse::<u16>() {
        Ok(c) if (100..=599).contains(&c) => Some(StatusMatch::Code(c)),
        _ => None,
    }
}

// === eligibility ===

/// Why a request was not hedged; each has its own stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotHedged {
    /// POST/PUT/... without a client Idempotency-Key on a route whose upstream does not deduplicate.
    UnsafeMethod,
    /// WebSocket/HTTP upgrade or CONNECT.
    Upgrade,
    /// gRPC or server-sent events: the hedge's answer arrives fully buffered.
    Streaming,
    BodyTooLarge,
    /// The worker's table is full.
    TableFull,
    /// The Idempotency-Key sent by the client is not a usable header value.
    InvalidKey,
}

impl NotHedged {
    pub const ALL: [NotHedged; 6] = [
        NotHedged::UnsafeMethod,
        NotHedged::Upgrade,
        NotHedged::Streaming,
        NotHedged::BodyTooLarge,
        NotHedged::TableFull,
        NotHedged::InvalidKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotHedged::UnsafeMethod => "unsafe_method",
            NotHedged::Upgrade => "upgrade",
            NotHedged::Streaming => "streaming",
            NotHedged::BodyTooLarge => "body_too_large",
            NotHedged::TableFull => "table_full",
            NotHedged::InvalidKey => "invalid_key",
        }
    }
}

/// What the filter knows about a request when its headers arrive.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub upgrade: bool,
    pub content_type: Option<&'a str>,
    pub accept: Option<&'a str>,
    /// From Content-Length, when present.
    pub content_length: Option<usize>,
}

pub fn is_safe_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// Whether a request may be hedged. Safe methods always may; unsafe ones
/// only with a client Idempotency-Key, or when the upstream deduplicates.
pub fn eligibility(cfg: &HedgeConfig, req: &RequestInfo<'_>) -> Result<(), NotHedged> {
    if req.upgrade || req.method == "CONNECT" {
        return Err(NotHedged::Upgrade);
    }
    let streaming = req
        .content_type
        .is_some_and(|c| c.starts_with("application/grpc"))
        || req.accept.is_some_and(|a| a.contains("text/event-stream"));
    if streaming {
        return Err(NotHedged::Streaming);
    }
    if let Some(key) = req.idempotency_key
        && !valid_key(key)
    {
        return Err(NotHedged::InvalidKey);
    }
    if !is_safe_method(req.method) && req.idempotency_key.is_none() && !cfg.upstream_deduplicates {
        return Err(NotHedged::UnsafeMethod);
    }
    if req.content_length.is_some_and(|n| n > cfg.max_body_bytes) {
        return Err(NotHedged::BodyTooLarge);
    }
    Ok(())
}

/// Keys are opaque to us; they must only be a sane header value.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// A new Idempotency-Key: random bits from the host plus a per-worker
/// counter, so two keys from one worker never collide even with a weak seed.
pub fn generate_key(random: u64, counter: u64) -> String {
    format!("us-{random:016x}-{counter:x}")
}

// === delay ===

/// The current hedge delay of one route on one worker.
#[derive(Debug, Clone)]
pub struct DelayTracker {
    cfg: DelayConfig,
    /// (time recorded, latency) in microseconds, oldest first.
    samples: VecDeque<(u64, u64)>,
    cached: Option<(u64, u64)>,
}

/// How long a computed percentile is reused before it is computed again.
const DELAY_RECOMPUTE_US: u64 = 100_000;

impl DelayTracker {
    pub fn new(cfg: DelayConfig) -> Self {
        Self {
            cfg,
            samples: VecDeque::new(),
            cached: None,
        }
    }

    /// Records one primary latency. Only adaptive delays keep samples.
    pub fn record(&mut self, now_us: u64, latency_us: u64) {
        if let DelayConfig::Adaptive { max_samples, .. } = self.cfg {
            if self.samples.len() >= max_samples {
                self.samples.pop_front();
            }
            self.samples.push_back((now_us, latency_us));
        }
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// The delay to use now, in microseconds: the configured percentile of
    /// the window's latencies, clamped to `min_ms..=max_ms`, and at most
    /// `tail_guard` times the latency at the percentile with twice as many
    /// requests slower (p90 for p95).
    ///
    /// Why the guard: when a slow tail is about as large as `100 -
    /// percentile` (a 5% tail under a p95 delay), the percentile sits on the
    /// gap between the fast requests and the slow ones, and each window puts
    /// it on one side or the other by chance. On the slow side nothing is
    /// hedged, the slow samples stay, and the delay stays there; the p99 of
    /// the same load then differs ten-fold from one run to the next. The
    /// guard percentile lies well inside the fast mode, so the delay stays
    /// near the fast mode's edge, where hedging catches the tail; the budget
    /// still bounds how many hedges go.
    pub fn current_us(&mut self, now_us: u64) -> u64 {
        let DelayConfig::Adaptive {
            percentile,
            initial_ms,
            min_ms,
            max_ms,
            window_ms,
            min_samples,
            tail_guard,
            ..
        } = self.cfg
        else {
            let DelayConfig::Fixed { ms } = self.cfg else {
                return 0;
            };
            return ms * 1000;
        };
        if let Some((at, v)) = self.cached
            && now_us.saturating_sub(at) < DELAY_RECOMPUTE_US
        {
            return v;
        }
        let horizon = now_us.saturating_sub(window_ms * 1000);
        while self.samples.front().is_some_and(|(t, _)| *t < horizon) {
            self.samples.pop_front();
        }
        let value = if self.samples.len() < min_samples {
            initial_ms * 1000
        } else {
            let mut v: Vec<u64> = self.samples.iter().map(|(_, l)| *l).collect();
            v.sort_unstable();
            let mut delay = nearest_rank(&v, percentile).unwrap_or(initial_ms * 1000);
            let guard_percentile = 2.0 * percentile - 100.0;
            if tail_guard > 0.0
                && guard_percentile > 0.0
                && let Some(guard) = nearest_rank(&v, guard_percentile)
            {
                delay = delay.min((guard as f64 * tail_guard) as u64);
            }
            delay.clamp(min_ms * 1000, max_ms * 1000)
        };
        self.cached = Some((now_us, value));
        value
    }
}

// === budget ===

/// The hedge budget: hedges may be `percent` of requests *or*
/// `per_second_floor` per second, whichever allows more, never the sum. The
/// floor lets a quiet route hedge at all; on a busy route it adds nothing, so
/// the extra load stays at the configured percentage.
///
/// Two token buckets, each holding at most `burst`: every request earns
/// `percent/100` of a hedge in one, time earns `per_second_floor` per second
/// in the other. A hedge may go when either holds a whole token, and it
/// spends one from both (neither below zero). So the larger of the two
/// (which a hedge always lowers by exactly one) bounds the hedges: over any
/// stretch where the same bucket leads, they are at most its earnings plus
/// `burst`.
#[derive(Debug, Clone)]
pub struct Budget {
    cfg: BudgetConfig,
    /// Earned by requests.
    by_requests: f64,
    /// Earned by time.
    by_time: f64,
    last_us: Option<u64>,
}

impl Budget {
    pub fn new(cfg: BudgetConfig) -> Self {
        Self {
            cfg,
            by_requests: 0.0,
            by_time: 0.0,
            last_us: None,
        }
    }

    /// A request arrived: it earns `percent/100` of a hedge.
    pub fn on_request(&mut self, now_us: u64) {
        self.refill(now_us);
        self.by_requests = (self.by_requests + self.cfg.percent / 100.0).min(self.cfg.burst);
    }

    /// Spends a token if either bucket has one.
    pub fn try_spend(&mut self, now_us: u64) -> bool {
        self.refill(now_us);
        if self.by_requests >= 1.0 || self.by_time >= 1.0 {
            self.by_requests = (self.by_requests - 1.0).max(0.0);
            self.by_time = (self.by_time - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Time earns `per_second_floor` tokens per second, from the first event on.
    fn refill(&mut self, now_us: u64) {
        if let Some(last) = self.last_us {
            let dt = now_us.saturating_sub(last) as f64 / 1e6;
            self.by_time = (self.by_time + dt * self.cfg.per_second_floor).min(self.cfg.burst);
        }
        self.last_us = Some(self.last_us.map_or(now_us, |l| l.max(now_us)));
    }
}

/// Nearest rank in sorted `v`: the smallest value with at least
/// `percentile`% of them at or below it (`None` when `v` is empty).
fn nearest_rank(v: &[u64], percentile: f64) -> Option<u64> {
    let rank = ((percentile / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len().max(1)) - 1).copied()
}

// === the table ===

/// The request as the hedge must repeat it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestCopy {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub body_complete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No response yet.
    Waiting,
    /// The primary answered unacceptably while a hedge is in flight; its
    /// response headers are held until the hedge answers.
    PrimaryHeld,
    /// The client's answer is decided (the primary's passes, or a hedge's was sent).
    Answered,
}

#[derive(Debug, Clone)]
struct Tracked {
    route: usize,
    started_us: u64,
    request: RequestCopy,
    /// Attempts sent, the primary included.
    attempts: u32,
    /// No more hedges for this stream (budget exhausted or dispatch failed).
    gave_up: bool,
    hedges_in_flight: u32,
    phase: Phase,
}

/// What to do when the primary's response headers arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Let the response through. `primary_won`: hedges were sent and the
    /// client gets the primary's answer. (A hedge's local reply also passes
    /// here, with `primary_won: false`.)
    Continue { primary_won: bool },
    /// Hold the response: a hedge may still bring an acceptable one.
    Hold,
}

/// What to do when a hedge's response arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeAction {
    /// The stream is gone or already answered: drop the hedge's result.
    Discard,
    /// Send the hedge's response to the client (as a local reply on `stream`).
    Reply { stream: u32, route: usize },
    /// Release the held primary response (every attempt failed).
    ReleasePrimary { stream: u32 },
    /// Not acceptable; the primary (or another hedge) may still answer.
    KeepWaiting,
}

/// A hedge that is due: send it for `stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub stream: u32,
    pub route: usize,
}

/// Streams of one worker that may be hedged, and the hedge calls in flight.
/// Bounded: at most `cap` streams; a call's token lives until its response
/// arrives, which Envoy guarantees within the call's timeout.
#[derive(Debug, Clone)]
pub struct HedgeTable {
    cap: usize,
    streams: BTreeMap<u32, Tracked>,
    calls: BTreeMap<u32, u32>,
}

impl Default for HedgeTable {
    fn default() -> Self {
        Self::new(DEFAULT_TABLE_CAP)
    }
}

impl HedgeTable {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            streams: BTreeMap::new(),
            calls: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    pub fn is_tracked(&self, stream: u32) -> bool {
        self.streams.contains_key(&stream)
    }

    /// Starts tracking a request that may be hedged.
    pub fn track(
        &mut self,
        stream: u32,
        route: usize,
        now_us: u64,
        request: RequestCopy,
    ) -> Result<(), NotHedged> {
        if self.streams.len() >= self.cap && !self.streams.contains_key(&stream) {
            return Err(NotHedged::TableFull);
        }
        self.streams.insert(
            stream,
            Tracked {
                route,
                started_us: now_us,
                request,
                attempts: 1,
                gave_up: false,
                hedges_in_flight: 0,
                phase: Phase::Waiting,
            },
        );
        Ok(())
    }

    /// Appends a body chunk. Over `max` bytes the stream stops being hedged.
    pub fn add_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
        max: usize,
    ) -> Result<(), NotHedged> {
        let Some(t) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        if t.request.body.len() + chunk.len() > max {
            self.streams.remove(&stream);
            return Err(NotHedged::BodyTooLarge);
        }
        t.request.body.extend_from_slice(chunk);
        t.request.body_complete = end_of_stream;
        Ok(())
    }

    pub fn request(&self, stream: u32) -> Option<&RequestCopy> {
        self.streams.get(&stream).map(|t| &t.request)
    }

    /// When the stream started (for latency samples).
    pub fn started_us(&self, stream: u32) -> Option<u64> {
        self.streams.get(&stream).map(|t| t.started_us)
    }

    /// Streams whose next hedge is due: still waiting, body complete, under
    /// their attempt limit, and silent for `attempts × delay`.
    pub fn due(
        &self,
        now_us: u64,
        mut delay_us: impl FnMut(usize) -> u64,
        mut max_attempts: impl FnMut(usize) -> u32,
    ) -> Vec<Due> {
        self.streams
            .iter()
            .filter(|(_, t)| {
                t.phase == Phase::Waiting
                    && !t.gave_up
                    && t.request.body_complete
                    && t.attempts < max_attempts(t.route)
            })
            .filter(|(_, t)| {
                now_us.saturating_sub(t.started_us)
                    >= delay_us(t.route).saturating_mul(u64::from(t.attempts))
            })
            .map(|(s, t)| Due {
                stream: *s,
                route: t.route,
            })
            .collect()
    }

    /// The hedge for `stream` went out as call `token`.
    pub fn hedge_sent(&mut self, stream: u32, token: u32) {
        if let Some(t) = self.streams.get_mut(&stream) {
            t.attempts += 1;
            t.hedges_in_flight += 1;
            self.calls.insert(token, stream);
        }
    }

    /// A hedge could not be sent (budget or dispatch failure): stop trying for this stream.
    pub fn give_up(&mut self, stream: u32) {
        if let Some(t) = self.streams.get_mut(&stream) {
            t.gave_up = true;
        }
    }

    pub fn on_primary_headers(&mut self, stream: u32, acceptable: bool) -> PrimaryAction {
        let Some(t) = self.streams.get_mut(&stream) else {
            return PrimaryAction::Continue { primary_won: false };
        };
        match t.phase {
            // Already answered by a hedge: these are its local reply's headers.
            Phase::Answered | Phase::PrimaryHeld => PrimaryAction::Continue { primary_won: false },
            Phase::Waiting if !acceptable && t.hedges_in_flight > 0 => {
                t.phase = Phase::PrimaryHeld;
                PrimaryAction::Hold
            }
            Phase::Waiting => {
                t.phase = Phase::Answered;
                PrimaryAction::Continue {
                    primary_won: t.attempts > 1,
                }
            }
        }
    }

    /// The primary's response is held until a hedge answers.
    pub fn is_held(&self, stream: u32) -> bool {
        self.streams
            .get(&stream)
            .is_some_and(|t| t.phase == Phase::PrimaryHeld)
    }

    /// The route of a tracked stream.
    pub fn route_of(&self, stream: u32) -> Option<usize> {
        self.streams.get(&stream).map(|t| t.route)
    }

    /// The route of a hedge call still in flight.
    pub fn route_of_call(&self, token: u32) -> Option<usize> {
        let stream = self.calls.get(&token)?;
        self.streams.get(stream).map(|t| t.route)
    }

    /// A hedge call answered. `status` is `None` when the call failed or timed out.
    pub fn on_hedge_response(
        &mut self,
        token: u32,
        status: Option<u16>,
        acceptable: bool,
    ) -> HedgeAction {
        let Some(stream) = self.calls.remove(&token) else {
            return HedgeAction::Discard;
        };
        let Some(t) = self.streams.get_mut(&stream) else {
            return HedgeAction::Discard;
        };
        t.hedges_in_flight = t.hedges_in_flight.saturating_sub(1);
        if t.phase == Phase::Answered {
            return HedgeAction::Discard;
        }
        // 409 means the upstream saw this key in flight: the primary is working on it.
        let wins = matches!(status, Some(s) if s != 409 && acceptable);
        if wins {
            t.phase = Phase::Answered;
            return HedgeAction::Reply {
                stream,
                route: t.route,
            };
        }
        if t.phase == Phase::PrimaryHeld && t.hedges_in_flight == 0 {
            t.phase = Phase::Answered;
            return HedgeAction::ReleasePrimary { stream };
        }
        HedgeAction::KeepWaiting
    }

    /// The stream ended: forget it. Its calls still in flight are discarded on arrival.
    pub fn end(&mut self, stream: u32) {
        self.streams.remove(&stream);
    }
}

// === the tick ===

/// One hedging route's moving parts on one worker: its settings, its delay
/// window and budget, and the delay last shown on the route's gauge.
#[derive(Debug, Clone)]
pub struct RouteState {
    pub cfg: HedgeConfig,
    pub delay: DelayTracker,
    pub budget: Budget,
    last_delay_ms: Option<u64>,
}

impl RouteState {
    pub fn new(cfg: HedgeConfig) -> Self {
        Self {
            delay: DelayTracker::new(cfg.delay.clone()),
            budget: Budget::new(cfg.budget),
            cfg,
            last_delay_ms: None,
        }
    }
}

/// A hedge to send now, ready for the host's HTTP call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HedgeCall {
    pub stream: u32,
    pub route: usize,
    pub cluster: String,
    /// The primary's headers (so the same Idempotency-Key), without
    /// `transfer-encoding` (the call sets its own framing), plus the marker.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

/// What one tick asks of the glue, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickAction {
    /// Show `ms` on the route's `delay_ms` gauge (it changed since last shown).
    ShowDelay { route: usize, ms: u64 },
    /// The budget refused the stream's hedge: count it. The table has
    /// already given the stream up.
    BudgetExhausted { route: usize, stream: u32 },
    /// Send this hedge, then report back with [`HedgeTable::hedge_sent`] (it
    /// went out) or [`HedgeTable::give_up`] (the host refused it).
    Send(HedgeCall),
}

/// The root context's tick: the routes' current delays (shown on their
/// gauges), then every hedge that is due, within each route's budget.
///
/// Every VM shares a route's gauge, the main thread's too, which sees no
/// traffic: only a route with latency samples (or a fixed delay) shows its
/// delay, so an idle VM never overwrites a busy one's figure.
pub fn tick(
    routes: &mut [Option<RouteState>],
    table: &mut HedgeTable,
    now_us: u64,
) -> Vec<TickAction> {
    let mut actions = Vec::new();
    // Per route: (delay now, attempt limit); u64::MAX for routes that do not hedge.
    let limits: Vec<(u64, u32)> = routes
        .iter_mut()
        .enumerate()
        .map(|(route, r)| match r {
            Some(r) => {
                let us = r.delay.current_us(now_us);
                let informed =
                    r.delay.samples() > 0 || matches!(r.cfg.delay, DelayConfig::Fixed { .. });
                if informed && r.last_delay_ms != Some(us / 1000) {
                    actions.push(TickAction::ShowDelay {
                        route,
                        ms: us / 1000,
                    });
                    r.last_delay_ms = Some(us / 1000);
                }
                (us, r.cfg.max_attempts)
            }
            None => (u64::MAX, 1),
        })
        .collect();
    if table.is_empty() {
        return actions;
    }
    let due = table.due(
        now_us,
        |route| limits.get(route).map_or(u64::MAX, |l| l.0),
        |route| limits.get(route).map_or(1, |l| l.1),
    );
    for d in due {
        let Some(Some(r)) = routes.get_mut(d.route) else {
            continue;
        };
        if !r.budget.try_spend(now_us) {
            table.give_up(d.stream);
            actions.push(TickAction::BudgetExhausted {
                route: d.route,
                stream: d.stream,
            });
            continue;
        }
        let Some(request) = table.request(d.stream) else {
            continue;
        };
        actions.push(TickAction::Send(HedgeCall {
            stream: d.stream,
            route: d.route,
            cluster: r.cfg.cluster.clone(),
            headers: hedge_headers(&request.headers),
            body: (!request.body.is_empty()).then(|| request.body.clone()),
            timeout_ms: r.cfg.timeout_ms,
        }));
    }
    actions
}

/// A hedge's request headers: the primary's, without `transfer-encoding`,
/// with [`HEDGE_MARKER`] so the upstream (and our own filter) can tell.
pub fn hedge_headers(primary: &[(String, String)]) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = primary
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("transfer-encoding"))
        .cloned()
        .collect();
    headers.push((HEDGE_MARKER.to_owned(), "1".to_owned()));
    headers
}

/// The local reply that hands a winning hedge's answer to the client: its
/// replayable headers (no hop-by-hop ones, no `set-cookie`) and the marker
/// `won`. A call answer with no `:status` is sent as 200.
pub fn reply_from_hedge(
    call_headers: &[(String, String)],
    status: Option<u16>,
) -> (u32, Vec<(String, String)>) {
    let mut headers = crate::http::replayable_headers(call_headers);
    headers.push((HEDGE_MARKER.to_owned(), "won".to_owned()));
    (u32::from(status.unwrap_or(200)), headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(json: serde_json::Value) -> RouteState {
        RouteState::new(cfg(json).unwrap())
    }

    fn get(r: &RequestCopy) -> RequestCopy {
        RequestCopy {
            body_complete: true,
            ..r.clone()
        }
    }

    #[test]
    fn the_tick_shows_the_delay_once_sends_what_is_due_and_spends_the_budget() {
        let mut routes = vec![
            None,
            Some(state(serde_json::json!({
                "cluster": "backup",
                "delay": {"fixed": {"ms": 40}},
                "budget": {"percent": 100, "per_second_floor": 1, "burst": 1}
            }))),
        ];
        let mut table = HedgeTable::default();
        let request = get(&RequestCopy {
            headers: vec![
                (":path".to_owned(), "/a".to_owned()),
                ("Transfer-Encoding".to_owned(), "chunked".to_owned()),
            ],
            body: b"x".to_vec(),
            body_complete: true,
        });
        for stream in [7, 8] {
            if let Some(Some(r)) = routes.get_mut(1) {
                r.budget.on_request(0);
            }
            table.track(stream, 1, 0, request.clone()).unwrap();
        }
        // Before the delay: only the gauge, once.
        assert_eq!(
            tick(&mut routes, &mut table, 10_000),
            vec![TickAction::ShowDelay { route: 1, ms: 40 }]
        );
        assert_eq!(tick(&mut routes, &mut table, 20_000), vec![]);
        // Due: one token for two streams.
        let actions = tick(&mut routes, &mut table, 40_000);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert_eq!(
            actions[0],
            TickAction::Send(HedgeCall {
                stream: 7,
                route: 1,
                cluster: "backup".to_owned(),
                headers: vec![
                    (":path".to_owned(), "/a".to_owned()),
                    (HEDGE_MARKER.to_owned(), "1".to_owned()),
                ],
                body: Some(b"x".to_vec()),
                timeout_ms: 5_000,
            })
        );
        assert_eq!(
            actions[1],
            TickAction::BudgetExhausted {
                route: 1,
                stream: 8
            }
        );
        table.hedge_sent(7, 1);
        // Stream 8 was given up; stream 7's next attempt would exceed max_attempts.
        assert_eq!(tick(&mut routes, &mut table, 200_000), vec![]);
    }

    #[test]
    fn an_adaptive_delay_is_shown_only_once_it_has_samples() {
        let mut routes = vec![Some(state(serde_json::json!({"cluster": "c"})))];
        let mut table = HedgeTable::default();
        assert_eq!(
            tick(&mut routes, &mut table, 1_000),
            vec![],
            "no samples yet"
        );
        if let Some(Some(r)) = routes.get_mut(0) {
            r.delay.record(1_000, 30_000);
        }
        let actions = tick(&mut routes, &mut table, 2_000);
        assert!(
            matches!(actions.as_slice(), [TickAction::ShowDelay { route: 0, .. }]),
            "{actions:?}"
        );
    }

    #[test]
    fn a_winning_hedge_is_replayed_without_per_hop_headers_or_cookies() {
        let h = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let (status, headers) = reply_from_hedge(
            &[
                h(":status", "201"),
                h("set-cookie", "s=1"),
                h("etag", "v"),
                h("connection", "close"),
            ],
            Some(201),
        );
        assert_eq!(status, 201);
        assert_eq!(headers, vec![h("etag", "v"), h(HEDGE_MARKER, "won")]);
        assert_eq!(reply_from_hedge(&[], None).0, 200);
    }

    fn cfg(json: serde_json::Value) -> Result<HedgeConfig, ConfigError> {
        HedgeConfig::from_raw(serde_json::from_value(json).unwrap(), "routes[0].hedge")
    }

    fn fixed(ms: u64) -> HedgeConfig {
        cfg(serde_json::json!({"cluster": "c", "delay": {"fixed": {"ms": ms}}})).unwrap()
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"cluster": "c", "max_attempts": 0}),
                "routes[0].hedge.max_attempts",
            ),
            (
                serde_json::json!({"cluster": "c", "delay": {"adaptive": {"min_ms": 100, "max_ms": 10}}}),
                "floor min_ms (100) is above the ceiling max_ms (10)",
            ),
            (
                serde_json::json!({"cluster": "c", "budget": {"percent": 101}}),
                "routes[0].hedge.budget.percent",
            ),
            (
                serde_json::json!({"cluster": "c", "budget": {"percent": -1}}),
                "routes[0].hedge.budget.percent",
            ),
            (
                serde_json::json!({"cluster": "", "max_attempts": 2}),
                "routes[0].hedge.cluster",
            ),
            (
                serde_json::json!({"cluster": "c", "unacceptable": ["6xx"]}),
                "unacceptable[0]",
            ),
            (
                serde_json::json!({"cluster": "c", "delay": {"fixed": {"ms": 0}}}),
                "delay.fixed.ms",
            ),
        ];
        for (json, needle) in cases {
            let err = cfg(json.clone()).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn acceptable_defaults_to_non_5xx() {
        let c = fixed(10);
        assert!(c.acceptable(200) && c.acceptable(404) && c.acceptable(409));
        assert!(!c.acceptable(500) && !c.acceptable(503));
        let c = cfg(serde_json::json!({"cluster": "c", "unacceptable": ["5xx", "429"]})).unwrap();
        assert!(!c.acceptable(429) && c.acceptable(428));
    }

    #[test]
    fn eligibility_rules() {
        let c = fixed(10);
        let get = RequestInfo {
            method: "GET",
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &get), Ok(()));
        let post = RequestInfo {
            method: "POST",
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &post), Err(NotHedged::UnsafeMethod));
        let keyed = RequestInfo {
            method: "POST",
            idempotency_key: Some("k1"),
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &keyed), Ok(()));
        let mut dedup = c.clone();
        dedup.upstream_deduplicates = true;
        assert_eq!(eligibility(&dedup, &post), Ok(()));
        let ws = RequestInfo {
            method: "GET",
            upgrade: true,
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &ws), Err(NotHedged::Upgrade));
        let grpc = RequestInfo {
            method: "POST",
            content_type: Some("application/grpc"),
            idempotency_key: Some("k"),
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &grpc), Err(NotHedged::Streaming));
        let big = RequestInfo {
            method: "GET",
            content_length: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &big), Err(NotHedged::BodyTooLarge));
        let bad = RequestInfo {
            method: "GET",
            idempotency_key: Some("a\u{7}b"),
            ..Default::default()
        };
        assert_eq!(eligibility(&c, &bad), Err(NotHedged::InvalidKey));
    }

    #[test]
    fn generated_keys_are_valid_and_distinct() {
        let a = generate_key(7, 1);
        let b = generate_key(7, 2);
        assert!(valid_key(&a) && valid_key(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn adaptive_delay_starts_at_initial_then_follows_the_percentile() {
        let c = cfg(serde_json::json!({"cluster": "c", "delay": {"adaptive": {"percentile": 90, "initial_ms": 40, "min_ms": 2, "max_ms": 200, "min_samples": 10, "window_s": 1}}})).unwrap();
        let mut d = DelayTracker::new(c.delay.clone());
        assert_eq!(d.current_us(0), 40_000);
        // 100 samples: 1..=100 ms. p90 = 90 ms.
        for i in 1..=100u64 {
            d.record(1_000_000, i * 1000);
        }
        assert_eq!(d.current_us(1_000_000), 90_000);
        // Clamped to the ceiling, once the cached value is 100 ms old.
        for _ in 0..1000 {
            d.record(1_050_000, 900_000);
        }
        assert_eq!(d.current_us(1_050_000), 90_000, "cached for 100 ms");
        assert_eq!(d.current_us(1_100_000), 200_000);
        // Samples older than the window are dropped: back to initial.
        assert_eq!(d.current_us(10_000_000), 40_000);
    }

    #[test]
    fn budget_is_a_fraction_or_a_floor() {
        let c = cfg(serde_json::json!({"cluster": "c", "budget": {"percent": 10, "per_second_floor": 0, "burst": 5}})).unwrap();
        let mut b = Budget::new(c.budget);
        let mut spent = 0;
        for i in 0..1000u64 {
            b.on_request(i);
            if b.try_spend(i) {
                spent += 1;
            }
        }
        assert!((99..=100).contains(&spent), "{spent}");
        let c = cfg(serde_json::json!({"cluster": "c", "budget": {"percent": 0, "per_second_floor": 2, "burst": 2}})).unwrap();
        let mut b = Budget::new(c.budget);
        assert!(!b.try_spend(0));
        let spent = (1..=10u64).filter(|s| b.try_spend(s * 1_000_000)).count();
        assert_eq!(spent, 10, "two per second, one tried per second");
        let mut zero = Budget::new(BudgetConfig {
            percent: 0.0,
            per_second_floor: 0.0,
            burst: 1.0,
        });
        assert!((0..100).all(|i| {
            zero.on_request(i * 1_000_000);
            !zero.try_spend(i * 1_000_000)
        }));
    }

    #[test]
    fn the_floor_is_not_added_to_a_busy_routes_percentage() {
        let c = cfg(serde_json::json!({"cluster": "c", "budget": {"percent": 5, "per_second_floor": 1, "burst": 10}})).unwrap();
        let mut b = Budget::new(c.budget);
        // 1,000 requests a second for 10 s, each one slow enough to hedge.
        let mut spent = 0;
        for i in 0..10_000u64 {
            let now = i * 1_000;
            b.on_request(now);
            if b.try_spend(now) {
                spent += 1;
            }
        }
        // 5% of 10,000; the floor (10 over 10 s) would have made it 510.
        assert_eq!(spent, 500);
        // A quiet route (one request every 2 s) still hedges every one.
        let mut quiet = Budget::new(c.budget);
        quiet.on_request(0);
        let hedged = (1..=10u64)
            .filter(|k| {
                let now = k * 2_000_000;
                quiet.on_request(now);
                quiet.try_spend(now)
            })
            .count();
        assert_eq!(hedged, 10);
    }

    /// A window of `n` latencies: `slow` of them 300 ms, the rest spread
    /// over 5..9 ms, interleaved.
    fn bimodal(d: &mut DelayTracker, now_us: u64, n: u64, slow: u64) {
        for i in 0..n {
            let latency = if i * slow / n != (i + 1) * slow / n {
                300_000
            } else {
                5_000 + (i * 7_919 % 4_000)
            };
            d.record(now_us, latency);
        }
    }

    #[test]
    fn a_tail_at_the_percentile_leaves_the_delay_at_the_fast_edge() {
        let with_guard = |guard: f64| {
            cfg(serde_json::json!({"cluster": "c", "delay": {"adaptive": {"tail_guard": guard}}}))
                .unwrap()
                .delay
        };
        for slow in [40u64, 48, 50, 52, 60] {
            // 1,000 samples, `slow` per mille at 300 ms, under a p95 delay.
            let mut guarded = DelayTracker::new(with_guard(DEFAULT_TAIL_GUARD));
            bimodal(&mut guarded, 1_000_000, 1_000, slow);
            let delay = guarded.current_us(1_000_000);
            assert!(
                (5_000..=18_000).contains(&delay),
                "{slow}/1000 slow: {delay} us, not at the fast mode's edge"
            );
            let mut bare = DelayTracker::new(with_guard(0.0));
            bimodal(&mut bare, 1_000_000, 1_000, slow);
            let unguarded = bare.current_us(1_000_000);
            if slow > 50 {
                // The bare percentile jumps into the tail: no hedge before 300 ms.
                assert_eq!(unguarded, 300_000, "{slow}/1000 slow");
            } else {
                assert_eq!(unguarded, delay, "{slow}/1000 slow: the guard did not act");
            }
        }
        // A smooth distribution (1..=100 ms) keeps its plain p95.
        let mut smooth = DelayTracker::new(with_guard(DEFAULT_TAIL_GUARD));
        for i in 1..=100u64 {
            smooth.record(1_000_000, i * 1_000);
        }
        assert_eq!(smooth.current_us(1_000_000), 95_000);
    }

    #[test]
    fn tail_guard_is_zero_or_at_least_one() {
        for bad in [0.5, -1.0, 1e9] {
            let err = cfg(
                serde_json::json!({"cluster": "c", "delay": {"adaptive": {"tail_guard": bad}}}),
            )
            .unwrap_err();
            assert!(err.to_string().contains("tail_guard"), "{err}");
        }
    }

    fn complete() -> RequestCopy {
        RequestCopy {
            body_complete: true,
            ..Default::default()
        }
    }

    #[test]
    fn hedge_wins_when_the_primary_is_slow() {
        let mut t = HedgeTable::new(10);
        t.track(1, 0, 0, complete()).unwrap();
        assert!(t.due(9_000, |_| 10_000, |_| 2).is_empty());
        let due = t.due(10_000, |_| 10_000, |_| 2);
        assert_eq!(
            due,
            vec![Due {
                stream: 1,
                route: 0
            }]
        );
        t.hedge_sent(1, 77);
        assert!(
            t.due(50_000, |_| 10_000, |_| 2).is_empty(),
            "at most max_attempts"
        );
        assert_eq!(
            t.on_hedge_response(77, Some(200), true),
            HedgeAction::Reply {
                stream: 1,
                route: 0
            }
        );
        // The local reply passes through the filter's response path: let it go.
        assert_eq!(
            t.on_primary_headers(1, true),
            PrimaryAction::Continue { primary_won: false }
        );
        t.end(1);
        assert!(t.is_empty());
        assert_eq!(t.calls_in_flight(), 0);
    }

    #[test]
    fn primary_wins_and_the_hedge_is_discarded() {
        let mut t = HedgeTable::new(10);
        t.track(1, 0, 0, complete()).unwrap();
        t.hedge_sent(1, 5);
        assert_eq!(
            t.on_primary_headers(1, true),
            PrimaryAction::Continue { primary_won: true }
        );
        assert_eq!(
            t.on_hedge_response(5, Some(200), true),
            HedgeAction::Discard
        );
        // A response for a stream that already ended is discarded too.
        t.track(2, 0, 0, complete()).unwrap();
        t.hedge_sent(2, 6);
        t.end(2);
        assert_eq!(
            t.on_hedge_response(6, Some(200), true),
            HedgeAction::Discard
        );
        assert_eq!(t.calls_in_flight(), 0);
    }

    #[test]
    fn a_409_on_the_hedge_keeps_waiting_for_the_primary() {
        let mut t = HedgeTable::new(10);
        t.track(1, 0, 0, complete()).unwrap();
        t.hedge_sent(1, 5);
        assert_eq!(
            t.on_hedge_response(5, Some(409), true),
            HedgeAction::KeepWaiting
        );
        assert_eq!(
            t.on_primary_headers(1, true),
            PrimaryAction::Continue { primary_won: true }
        );
    }

    #[test]
    fn when_every_attempt_fails_the_primary_answers() {
        let mut t = HedgeTable::new(10);
        t.track(1, 0, 0, complete()).unwrap();
        t.hedge_sent(1, 5);
        assert_eq!(t.on_primary_headers(1, false), PrimaryAction::Hold);
        assert!(t.is_held(1));
        assert_eq!(
            t.on_hedge_response(5, None, false),
            HedgeAction::ReleasePrimary { stream: 1 }
        );
        // ...and if the hedge succeeds instead, it replaces the held 5xx.
        t.track(2, 0, 0, complete()).unwrap();
        t.hedge_sent(2, 6);
        assert_eq!(t.on_primary_headers(2, false), PrimaryAction::Hold);
        assert_eq!(
            t.on_hedge_response(6, Some(200), true),
            HedgeAction::Reply {
                stream: 2,
                route: 0
            }
        );
        // A failing primary with no hedge in flight just passes.
        t.track(3, 0, 0, complete()).unwrap();
        assert_eq!(
            t.on_primary_headers(3, false),
            PrimaryAction::Continue { primary_won: false }
        );
    }

    #[test]
    fn giving_up_stops_hedging_but_is_not_a_primary_win() {
        let mut t = HedgeTable::new(10);
        t.track(1, 0, 0, complete()).unwrap();
        t.give_up(1);
        assert!(t.due(1_000_000, |_| 1, |_| 2).is_empty());
        assert_eq!(
            t.on_primary_headers(1, true),
            PrimaryAction::Continue { primary_won: false }
        );
    }

    #[test]
    fn the_table_is_bounded_and_bodies_are_capped() {
        let mut t = HedgeTable::new(2);
        t.track(1, 0, 0, complete()).unwrap();
        t.track(2, 0, 0, complete()).unwrap();
        assert_eq!(t.track(3, 0, 0, complete()), Err(NotHedged::TableFull));
        t.track(4, 0, 0, RequestCopy::default()).unwrap_err();
        t.end(1);
        t.track(4, 0, 0, RequestCopy::default()).unwrap();
        assert!(
            t.due(u64::MAX / 4, |_| 1, |_| 2)
                .iter()
                .all(|d| d.stream != 4),
            "body not complete yet"
        );
        t.add_body(4, b"hello", false, 8).unwrap();
        assert_eq!(
            t.add_body(4, b"world", true, 8),
            Err(NotHedged::BodyTooLarge)
        );
        assert!(!t.is_tracked(4));
    }

    proptest::proptest! {
        // Whatever the order of events, the table never grows past its cap,
        // never replies twice for a stream, and is empty once every stream ended
        // and every call answered.
        #[test]
        fn events_keep_the_table_consistent(events in proptest::collection::vec((0u8..5, 0u32..6, proptest::prelude::any::<bool>()), 0..200)) {
            let mut t = HedgeTable::new(4);
            let mut replied = std::collections::BTreeSet::new();
            let mut next_token = 0u32;
            let mut tokens: Vec<u32> = vec![];
            for (kind, stream, ok) in events {
                match kind {
                    0 => if !t.is_tracked(stream) { let _ = t.track(stream, 0, 0, complete()); },
                    1 => if t.is_tracked(stream) { next_token += 1; t.hedge_sent(stream, next_token); tokens.push(next_token); },
                    2 => { let _ = t.on_primary_headers(stream, ok); }
                    3 => if let Some(tok) = tokens.pop()
                        && let HedgeAction::Reply { stream, .. } = t.on_hedge_response(tok, Some(if ok { 200 } else { 503 }), ok)
                    {
                        proptest::prop_assert!(replied.insert(stream), "second reply for {}", stream);
                    },
                    _ => { t.end(stream); replied.remove(&stream); }
                }
                proptest::prop_assert!(t.len() <= 4);
            }
            for s in 0..6 { t.end(s); }
            for tok in tokens { t.on_hedge_response(tok, None, false); }
            proptest::prop_assert!(t.is_empty());
            proptest::prop_assert_eq!(t.calls_in_flight(), 0);
        }
    }
}
