//! Shadow traffic (dark launches): which requests are copied to the new
//! version, what the copy looks like, and the per-worker table that pairs
//! each primary response with its shadow's and turns the pair into counts
//! and mismatch records.
//!
//! Start at [`ShadowConfig`] (one per route), then [`ShadowTable`], the state
//! machine the filter glue drives:
//!
//! 1. request headers: [`ShadowConfig::decide`] (method, sampling), then
//!    [`ShadowTable::start`];
//! 2. request body: [`ShadowTable::request_body`] (copied within the budget);
//! 3. root `on_tick`: [`ShadowTable::to_send`] lists copies ready to go;
//!    the glue dispatches them and reports [`ShadowTable::sent`];
//! 4. the primary's response passes: [`ShadowTable::primary_headers`] and
//!    [`ShadowTable::primary_body`] copy it, never holding it back;
//! 5. the shadow answers: [`ShadowTable::shadow_response`];
//! 6. once both sides are complete (or a side is skipped), the next tick's
//!    [`ShadowTable::finish`] compares the pair into a [`Report`].
//!
//! **Why only safe methods by default**: a shadowed POST or DELETE runs
//! twice, once against each version, and if both versions write to shared
//! state (a database, a payment provider, a queue) the side effect happens
//! twice. GET, HEAD and OPTIONS are safe by HTTP's definition. A route opts
//! in to other methods (`unsafe_methods: true`) only when the shadow's writes
//! are isolated or idempotent.
//!
//! Comparing happens on the tick, after both responses are complete: the
//! client's response is never held for it.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compare::{self, CompareConfig, Comparison, PathPattern, RawCompareConfig, Response};
use crate::http::is_header_name;
use crate::rules::{ConfigError, validate_cluster, validate_name, validate_report_cluster};
use crate::segment::{RawSegmentBy, SegmentBy};

/// The header marking a shadow copy, so the new version (and its logs) can
/// tell copies from real traffic.
pub const SHADOW_MARKER: &str = "x-understudy-shadow";

/// The header that pins a control plane's synthetic probe to one side
/// (the control plane's routes match its secret value). A request that
/// carries it is never shadowed: probes are their own evidence and must
/// not count as compared live traffic. A client that sends it only keeps
/// its own request out of the sample.
pub const PROBE_HEADER: &str = "understudy-probe";
/// Streams one worker pairs at a time; more are skipped as `skipped_capacity`.
pub const MAX_PENDING: usize = 1024;
/// Body bytes one worker holds across all its pairs; a pair that would go
/// over is skipped as `skipped_capacity`.
pub const MAX_TABLE_BYTES: usize = 64 * 1024 * 1024;
/// Budgets are per side and per pair; this bounds one worker's memory.
pub const MAX_BODY_BYTES_LIMIT: usize = 4 * 1024 * 1024;
pub const MAX_EXPECTED_RULES: usize = 64;
/// Pairs compared per tick, so a burst never stalls the worker's event loop.
pub const FINISH_PER_TICK: usize = 64;

// === config ===

/// A route's shadow settings as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadowConfig {
    /// The Envoy cluster the copies go to (the new version).
    pub cluster: String,
    /// Share of eligible requests copied, 0 to 100.
    #[serde(default = "default_percent")]
    pub percent: f64,
    /// A request header (user or tenant id) that makes sampling consistent:
    /// one key is always in or always out. Without it, sampling is random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_key: Option<String>,
    /// Shadow methods other than GET, HEAD and OPTIONS (see the module docs).
    #[serde(default)]
    pub unsafe_methods: bool,
    /// Headers removed from the copy.
    #[serde(default = "default_strip")]
    pub strip_headers: Vec<String>,
    /// Headers added to (or replaced in) the copy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add_headers: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Bytes copied per body (request, primary response, shadow response);
    /// a larger body is skipped as `skipped_too_large`.
    #[serde(default = "default_body_bytes")]
    pub max_body_bytes: usize,
    /// Bytes of each body kept in a mismatch record for replay.
    #[serde(default = "default_record_bytes")]
    pub record_body_bytes: usize,
    #[serde(default)]
    pub compare: RawCompareConfig,
    /// Where differences are intended; anything else is flagged unexpected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected: Vec<RawExpected>,
    /// Paths whose values leave the filter only as `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
    /// A/A calibration: the shadow runs the primary's version, and what
    /// differs is learned as noise by the control plane.
    #[serde(default)]
    pub calibration: bool,
    /// Counts, paths and samples are also kept per traffic segment: a
    /// request header's value, the method, or both (see [`crate::segment`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_by: Option<RawSegmentBy>,
}

/// An expected-divergence rule: requests it matches (by path prefix and/or
/// one header value) may differ at `paths`, and nowhere else. A rule with
/// an empty `paths` declares a segment that must not differ at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpected {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<RawHeaderMatch>,
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    pub name: String,
    pub value: String,
}

impl RawShadowConfig {
    /// Every request copied to `cluster`, everything else at its default
    /// (what `{"cluster": ...}` means when written).
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            percent: default_percent(),
            sample_key: None,
            unsafe_methods: false,
            strip_headers: default_strip(),
            add_headers: BTreeMap::new(),
            timeout_ms: default_timeout(),
            max_body_bytes: default_body_bytes(),
            record_body_bytes: default_record_bytes(),
            compare: RawCompareConfig::default(),
            expected: Vec::new(),
            redact: Vec::new(),
            calibration: false,
            segment_by: None,
        }
    }
}

impl RawShadowReport {
    /// Reports to `cluster` at the default interval and queue size.
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            interval_ms: default_report_interval(),
            max_records: default_max_records(),
        }
    }
}

fn default_percent() -> f64 {
    100.0
}
fn default_strip() -> Vec<String> {
    vec!["authorization".into(), "cookie".into()]
}
fn default_timeout() -> u64 {
    1_000
}
fn default_body_bytes() -> usize {
    256 * 1024
}
fn default_record_bytes() -> usize {
    16 * 1024
}

/// A validated expected-divergence rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub name: String,
    pub path_prefix: Option<String>,
    /// Lower-cased name, exact value.
    pub header: Option<(String, String)>,
    pub paths: Vec<PathPattern>,
}

/// A route's validated shadow settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    pub cluster: String,
    /// Sampled when `hash < threshold` (out of 2^64); `u64::MAX` with
    /// `all` = 100%.
    threshold: u64,
    all: bool,
    pub percent: f64,
    pub sample_key: Option<String>,
    pub unsafe_methods: bool,
    pub strip_headers: Vec<String>,
    pub add_headers: Vec<(String, String)>,
    pub timeout_ms: u64,
    pub max_body_bytes: usize,
    pub record_body_bytes: usize,
    pub compare: CompareConfig,
    pub expected: Vec<Expected>,
    pub redact: Vec<PathPattern>,
    pub calibration: bool,
    pub segment_by: Option<SegmentBy>,
}

impl ShadowConfig {
    pub fn from_raw(raw: RawShadowConfig, field: &str) -> Result<Self, ConfigError> {
        let invalid = |what: &str, reason: String| ConfigError::Invalid {
            field: format!("{field}.{what}"),
            reason,
        };
        validate_cluster(&format!("{field}.cluster"), &raw.cluster)?;
        if !(raw.percent.is_finite() && (0.0..=100.0).contains(&raw.percent)) {
            return Err(invalid(
                "percent",
                format!("must be between 0 and 100, got {}", raw.percent),
            ));
        }
        let header = |what: String, h: &str| -> Result<String, ConfigError> {
            if !is_header_name(h) {
                return Err(ConfigError::Invalid {
                    field: format!("{field}.{what}"),
                    reason: format!("{h:?} is not a valid header name"),
                });
            }
            Ok(h.to_ascii_lowercase())
        };
        let sample_key = raw
            .sample_key
            .as_deref()
            .map(|h| header("sample_key".into(), h))
            .transpose()?;
        let mut strip_headers = Vec::with_capacity(raw.strip_headers.len());
        for (i, h) in raw.strip_headers.iter().enumerate() {
            strip_headers.push(header(format!("strip_headers[{i}]"), h)?);
        }
        let mut add_headers = Vec::with_capacity(raw.add_headers.len());
        for (h, v) in &raw.add_headers {
            let name = header(format!("add_headers.{h}"), h)?;
            if name == SHADOW_MARKER || name.starts_with(':') {
                return Err(invalid(
                    &format!("add_headers.{h}"),
                    "this header is set by the filter".into(),
                ));
            }
            if v.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    &format!("add_headers.{h}"),
                    "the value has control characters".into(),
                ));
            }
            add_headers.push((name, v.clone()));
        }
        if raw.timeout_ms == 0 || raw.timeout_ms > 60_000 {
            return Err(invalid(
                "timeout_ms",
                format!("must be between 1 and 60000, got {}", raw.timeout_ms),
            ));
        }
        if raw.max_body_bytes == 0 || raw.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return Err(invalid(
                "max_body_bytes",
                format!(
                    "must be between 1 and {MAX_BODY_BYTES_LIMIT}, got {}",
                    raw.max_body_bytes
                ),
            ));
        }
        if raw.record_body_bytes > raw.max_body_bytes {
            return Err(invalid(
                "record_body_bytes",
                format!(
                    "{} is more than max_body_bytes ({})",
                    raw.record_body_bytes, raw.max_body_bytes
                ),
            ));
        }
        let compare = CompareConfig::from_raw(raw.compare, &format!("{field}.compare"))?;
        if raw.expected.len() > MAX_EXPECTED_RULES {
            return Err(invalid(
                "expected",
                format!(
                    "at most {MAX_EXPECTED_RULES} rules are allowed, got {}",
                    raw.expected.len()
                ),
            ));
        }
        let mut expected: Vec<Expected> = Vec::with_capacity(raw.expected.len());
        for (i, e) in raw.expected.into_iter().enumerate() {
            validate_name(&format!("{field}.expected[{i}].name"), &e.name)?;
            if expected.iter().any(|x| x.name == e.name) {
                return Err(invalid(
                    &format!("expected[{i}].name"),
                    format!("{:?} is used by an earlier rule", e.name),
                ));
            }
            if let Some(p) = &e.path_prefix
                && !p.starts_with('/')
            {
                return Err(invalid(
                    &format!("expected[{i}].path_prefix"),
                    format!("{p:?} must start with '/'"),
                ));
            }
            let header = e
                .header
                .map(|h| {
                    header(format!("expected[{i}].header.name"), &h.name).map(|n| (n, h.value))
                })
                .transpose()?;
            if e.paths.len() > compare::MAX_RULES {
                return Err(invalid(
                    &format!("expected[{i}].paths"),
                    format!("at most {} paths are allowed", compare::MAX_RULES),
                ));
            }
            let paths = e
                .paths
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    PathPattern::parse(p)
                        .map_err(|reason| invalid(&format!("expected[{i}].paths[{j}]"), reason))
                })
                .collect::<Result<_, _>>()?;
            expected.push(Expected {
                name: e.name,
                path_prefix: e.path_prefix,
                header,
                paths,
            });
        }
        if raw.redact.len() > compare::MAX_RULES {
            return Err(invalid(
                "redact",
                format!("at most {} paths are allowed", compare::MAX_RULES),
            ));
        }
        let redact = raw
            .redact
            .iter()
            .enumerate()
            .map(|(i, p)| {
                PathPattern::parse(p).map_err(|reason| invalid(&format!("redact[{i}]"), reason))
            })
            .collect::<Result<_, _>>()?;
        let segment_by = raw
            .segment_by
            .map(|b| SegmentBy::from_raw(b, &format!("{field}.segment_by")))
            .transpose()?;
        let all = raw.percent >= 100.0;
        // f64 -> u64 saturates; 2^64 * p / 100 fits for p < 100.
        let threshold = ((raw.percent / 100.0) * 18_446_744_073_709_551_616.0) as u64;
        Ok(Self {
            cluster: raw.cluster,
            threshold,
            all,
            percent: raw.percent,
            sample_key,
            unsafe_methods: raw.unsafe_methods,
            strip_headers,
            add_headers,
            timeout_ms: raw.timeout_ms,
            max_body_bytes: raw.max_body_bytes,
            record_body_bytes: raw.record_body_bytes,
            compare,
            expected,
            redact,
            calibration: raw.calibration,
            segment_by,
        })
    }

    /// Whether to shadow a request: its method, then sampling. `key` is the
    /// `sample_key` header's value; `random` is fresh randomness for
    /// requests without one.
    pub fn decide(&self, method: &str, key: Option<&str>, random: u64) -> Result<(), Skip> {
        let safe = matches!(method, "GET" | "HEAD" | "OPTIONS");
        if !safe && !self.unsafe_methods {
            return Err(Skip::Method);
        }
        let draw = match key {
            Some(k) if self.sample_key.is_some() => stable_hash(k),
            _ => random,
        };
        if self.all || draw < self.threshold {
            Ok(())
        } else {
            Err(Skip::NotSampled)
        }
    }

    /// The copy's headers: stripped and added as configured, marked, and
    /// with `-shadow` appended to the host (before any port), as Envoy's own
    /// mirroring does, so the new version can tell shadow traffic apart.
    pub fn shadow_headers(&self, headers: &[(String, String)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = headers
            .iter()
            .filter(|(k, _)| {
                let k = k.to_ascii_lowercase();
                k != "transfer-encoding"
                    && k != SHADOW_MARKER
                    && !self.strip_headers.contains(&k)
                    && !self.add_headers.iter().any(|(a, _)| *a == k)
            })
            .map(|(k, v)| {
                if k == ":authority" {
                    (k.clone(), shadow_host(v))
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        out.extend(self.add_headers.iter().cloned());
        out.push((SHADOW_MARKER.to_owned(), "1".to_owned()));
        out
    }

    /// The first expected-divergence rule matching the request.
    pub fn segment(&self, path: &str, headers: &[(String, String)]) -> Option<usize> {
        self.expected.iter().position(|e| {
            e.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
                && e.header.as_ref().is_none_or(|(name, value)| {
                    headers
                        .iter()
                        .any(|(k, v)| k.eq_ignore_ascii_case(name) && v == value)
                })
        })
    }
}

fn shadow_host(host: &str) -> String {
    // An IPv6 literal's colons are inside brackets; the port follows `]:`.
    let split = match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            Some(i)
        }
        _ => None,
    };
    match split {
        Some(i) => format!("{}-shadow{}", &host[..i], &host[i..]),
        None => format!("{host}-shadow"),
    }
}

/// The same value on every worker and every Envoy, so sampling by key is
/// consistent fleet-wide.
fn stable_hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

/// Where mismatch records and counters go, as written (top-level
/// `shadow_report` in the filter config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadowReport {
    /// An HTTP/2 cluster that reaches the control plane's gRPC port.
    pub cluster: String,
    #[serde(default = "default_report_interval")]
    pub interval_ms: u64,
    /// Mismatch records one worker queues between batches; more are dropped
    /// and counted.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
}

fn default_report_interval() -> u64 {
    1_000
}
fn default_max_records() -> usize {
    256
}

/// Validated [`RawShadowReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowReport {
    pub cluster: String,
    pub interval_ms: u64,
    pub max_records: usize,
}

impl ShadowReport {
    pub fn from_raw(raw: RawShadowReport, field: &str) -> Result<Self, ConfigError> {
        validate_report_cluster(&format!("{field}.cluster"), &raw.cluster)?;
        if !(100..=60_000).contains(&raw.interval_ms) {
            return Err(ConfigError::Invalid {
                field: format!("{field}.interval_ms"),
                reason: format!("must be between 100 and 60000, got {}", raw.interval_ms),
            });
        }
        if !(1..=10_000).contains(&raw.max_records) {
            return Err(ConfigError::Invalid {
                field: format!("{field}.max_records"),
                reason: format!("must be between 1 and 10000, got {}", raw.max_records),
            });
        }
        Ok(Self {
            cluster: raw.cluster,
            interval_ms: raw.interval_ms,
            max_records: raw.max_records,
        })
    }
}

// === outcomes ===

/// Why a request was not shadowed or a pair not compared. Every one is
/// counted under its own stat, so nothing is silently dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skip {
    /// Not in the sample (not a failure; counted as `not_sampled`).
    NotSampled,
    /// An unsafe method on a route that did not opt in.
    Method,
    /// The worker's table is full.
    Capacity,
    /// A body (request, primary or shadow) over `max_body_bytes`.
    TooLarge,
    ShadowTimeout,
    /// The shadow call failed (no response, or could not be sent).
    ShadowError,
    /// The primary stream ended before its response was complete (reset).
    PrimaryIncomplete,
    /// A body says it is JSON and does not parse.
    Unparseable,
}

impl Skip {
    pub const ALL: [Skip; 8] = [
        Skip::NotSampled,
        Skip::Method,
        Skip::Capacity,
        Skip::TooLarge,
        Skip::ShadowTimeout,
        Skip::ShadowError,
        Skip::PrimaryIncomplete,
        Skip::Unparseable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotSampled => "not_sampled",
            Skip::Method => "skipped_method",
            Skip::Capacity => "skipped_capacity",
            Skip::TooLarge => "skipped_too_large",
            Skip::ShadowTimeout => "shadow_timeout",
            Skip::ShadowError => "shadow_error",
            Skip::PrimaryIncomplete => "primary_incomplete",
            Skip::Unparseable => "unparseable_body",
        }
    }
}

/// A compared pair's verdict, for the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Matched,
    /// Differences, all noise.
    Noise,
    /// At least one serious difference.
    Serious,
}

/// One captured message (the request copy, or a response).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Captured {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A pair that differed: what the control plane stores and shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub route: usize,
    pub request_id: String,
    pub comparison: Comparison,
    pub latency_gap_us: i64,
    pub time_us: u64,
    /// The expected-divergence rule that matched the request.
    pub segment: Option<String>,
    /// The request's traffic segment label (`segment_by`), if the route
    /// segments.
    pub traffic_segment: Option<String>,
    pub method: String,
    pub path: String,
    pub authority: String,
    /// The copy's headers (after stripping), and its body (redacted, cut to
    /// `record_body_bytes`).
    pub request: Captured,
    pub request_body_truncated: bool,
    /// The primary's response (redacted, cut to `record_body_bytes`).
    pub primary: Captured,
    pub primary_body_truncated: bool,
    /// The shadow's response, recorded the same way, so the dashboard can
    /// compare the very pair again with other rules.
    pub shadow: Captured,
    pub shadow_body_truncated: bool,
}

/// What [`ShadowTable::finish`] and the other transitions produce.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Skipped {
        route: usize,
        reason: Skip,
    },
    Compared {
        route: usize,
        verdict: Verdict,
        unexpected: bool,
        latency_gap_us: i64,
        /// The traffic segment label, when the route has `segment_by`.
        traffic_segment: Option<String>,
        mismatch: Option<Box<Mismatch>>,
    },
}

// === the pair table ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// The request is still arriving.
    Receiving,
    /// Complete, waiting for the next tick to send it.
    Ready,
    Sent {
        token: u32,
        sent_us: u64,
    },
    Answered,
}

#[derive(Debug)]
struct Pair {
    route: usize,
    /// The traffic segment label, made once from the request's headers.
    traffic_segment: Option<String>,
    started_us: u64,
    request: Captured,
    call: Call,
    primary: Option<Captured>,
    primary_done_us: Option<u64>,
    shadow: Option<(Captured, u64)>,
}

/// A copy to send: the glue hands these to `dispatch_http_call`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub stream: u32,
    pub route: usize,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// One worker's pairs in progress, keyed by stream (context) id.
#[derive(Debug, Default)]
pub struct ShadowTable {
    pairs: BTreeMap<u32, Pair>,
    calls: BTreeMap<u32, u32>,
    /// Pairs with both sides complete, compared on the next tick.
    done: VecDeque<u32>,
    /// Body bytes held by all pairs.
    bytes: usize,
}

impl Pair {
    fn bytes(&self) -> usize {
        self.request.body.len()
            + self.primary.as_ref().map_or(0, |p| p.body.len())
            + self.shadow.as_ref().map_or(0, |(s, _)| s.body.len())
    }
}

impl ShadowTable {
    /// Body bytes the table holds (bounded by [`MAX_TABLE_BYTES`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `more` bytes fit both the pair's budget (`len + more <= max`)
    /// and the table's; the reason to skip otherwise.
    fn room(&self, len: usize, more: usize, max: usize) -> Result<(), Skip> {
        if len + more > max {
            Err(Skip::TooLarge)
        } else if self.bytes + more > MAX_TABLE_BYTES {
            Err(Skip::Capacity)
        } else {
            Ok(())
        }
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Starts pairing a sampled request. `headers` are the copy's (already
    /// built by [`ShadowConfig::shadow_headers`]).
    pub fn start(
        &mut self,
        stream: u32,
        route: usize,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
        now_us: u64,
    ) -> Result<(), Report> {
        self.start_in(stream, route, None, headers, end_of_stream, now_us)
    }

    /// [`ShadowTable::start`] for a request in traffic segment
    /// `traffic_segment` ([`crate::segment::SegmentBy::label`]): its
    /// comparison is reported with the label.
    pub fn start_in(
        &mut self,
        stream: u32,
        route: usize,
        traffic_segment: Option<String>,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
        now_us: u64,
    ) -> Result<(), Report> {
        if self.pairs.len() >= MAX_PENDING {
            return Err(Report::Skipped {
                route,
                reason: Skip::Capacity,
            });
        }
        self.pairs.insert(
            stream,
            Pair {
                route,
                traffic_segment,
                started_us: now_us,
                request: Captured {
                    status: 0,
                    headers,
                    body: Vec::new(),
                },
                call: if end_of_stream {
                    Call::Ready
                } else {
                    Call::Receiving
                },
                primary: None,
                primary_done_us: None,
                shadow: None,
            },
        );
        Ok(())
    }

    pub fn is_tracked(&self, stream: u32) -> bool {
        self.pairs.contains_key(&stream)
    }

    /// Whether call `token` is one of this table's shadow copies.
    pub fn has_call(&self, token: u32) -> bool {
        self.calls.contains_key(&token)
    }

    pub fn route_of(&self, stream: u32) -> Option<usize> {
        self.pairs.get(&stream).map(|p| p.route)
    }

    /// A request body chunk. Over the budget, the pair is dropped (skipped).
    pub fn request_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
        max: usize,
    ) -> Option<Report> {
        let pair = self.pairs.get(&stream)?;
        if pair.call != Call::Receiving {
            return None;
        }
        if let Err(reason) = self.room(pair.request.body.len(), chunk.len(), max) {
            return self.drop_pair(stream, reason);
        }
        self.bytes += chunk.len();
        let pair = self.pairs.get_mut(&stream)?;
        pair.request.body.extend_from_slice(chunk);
        if end_of_stream {
            pair.call = Call::Ready;
        }
        None
    }

    /// Copies whose requests are complete and not yet sent.
    pub fn to_send(&self) -> Vec<Outgoing> {
        self.pairs
            .iter()
            .filter(|(_, p)| p.call == Call::Ready)
            .map(|(stream, p)| {
                let mut headers = p.request.headers.clone();
                if !p.request.body.is_empty() {
                    // The copy's body is complete: a fixed length replaces chunking.
                    headers.retain(|(k, _)| !k.eq_ignore_ascii_case("content-length"));
                    headers.push(("content-length".into(), p.request.body.len().to_string()));
                }
                Outgoing {
                    stream: *stream,
                    route: p.route,
                    headers,
                    body: p.request.body.clone(),
                }
            })
            .collect()
    }

    /// The copy went out as call `token`.
    pub fn sent(&mut self, stream: u32, token: u32, now_us: u64) {
        if let Some(p) = self.pairs.get_mut(&stream) {
            p.call = Call::Sent {
                token,
                sent_us: now_us,
            };
            self.calls.insert(token, stream);
        }
    }

    /// The copy could not be sent.
    pub fn send_failed(&mut self, stream: u32) -> Option<Report> {
        self.drop_pair(stream, Skip::ShadowError)
    }

    /// The primary's response headers. A declared length over the budget
    /// skips the pair at once, before any copying.
    pub fn primary_headers(
        &mut self,
        stream: u32,
        status: u16,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
        max: usize,
        now_us: u64,
    ) -> Option<Report> {
        // A HEAD answer declares the length of a body it does not have.
        let too_large = !end_of_stream
            && headers.iter().any(|(k, v)| {
                k.eq_ignore_ascii_case("content-length")
                    && v.parse::<usize>().is_ok_and(|n| n > max)
            });
        if too_large {
            return self.drop_pair(stream, Skip::TooLarge);
        }
        let pair = self.pairs.get_mut(&stream)?;
        pair.primary = Some(Captured {
            status,
            headers,
            body: Vec::new(),
        });
        if end_of_stream {
            self.primary_complete(stream, now_us);
        }
        None
    }

    /// A primary response body chunk, copied as it passes.
    pub fn primary_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
        max: usize,
        now_us: u64,
    ) -> Option<Report> {
        let len = self.pairs.get(&stream)?.primary.as_ref()?.body.len();
        if let Err(reason) = self.room(len, chunk.len(), max) {
            return self.drop_pair(stream, reason);
        }
        self.bytes += chunk.len();
        let primary = self.pairs.get_mut(&stream)?.primary.as_mut()?;
        primary.body.extend_from_slice(chunk);
        if end_of_stream {
            self.primary_complete(stream, now_us);
        }
        None
    }

    fn primary_complete(&mut self, stream: u32, now_us: u64) {
        if let Some(p) = self.pairs.get_mut(&stream)
            && p.primary_done_us.is_none()
        {
            p.primary_done_us = Some(now_us);
            if p.shadow.is_some() {
                self.done.push_back(stream);
            }
        }
    }

    /// The primary stream ended. A response that never completed (a reset)
    /// cannot be compared; a complete one waits for its shadow.
    pub fn stream_end(&mut self, stream: u32) -> Option<Report> {
        let p = self.pairs.get(&stream)?;
        // A request whose body never completed can no longer be sent.
        if p.primary_done_us.is_none() || p.call == Call::Receiving {
            return self.drop_pair(stream, Skip::PrimaryIncomplete);
        }
        None
    }

    /// The shadow call `token` answered: `status` is `None` when the call
    /// failed (Envoy gives a failed call zero headers). A failure at or
    /// past the timeout is a timeout.
    pub fn shadow_response(
        &mut self,
        token: u32,
        status: Option<u16>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        cfg_of: impl Fn(usize) -> Option<(u64, usize)>,
        now_us: u64,
    ) -> Option<Report> {
        let stream = self.calls.remove(&token)?;
        let pair = self.pairs.get_mut(&stream)?;
        let Call::Sent { sent_us, .. } = pair.call else {
            return None;
        };
        let (timeout_ms, max) = cfg_of(pair.route)?;
        // Envoy's timer may fire a little early or late; 90% is a timeout.
        let timed_out = now_us.saturating_sub(sent_us) >= timeout_ms * 900;
        let Some(status) = status else {
            let reason = if timed_out {
                Skip::ShadowTimeout
            } else {
                Skip::ShadowError
            };
            return self.drop_pair(stream, reason);
        };
        // Envoy answers a call that ran out of time with its own 504: that
        // is the timeout, not the new version's answer.
        if status == 504 && timed_out {
            return self.drop_pair(stream, Skip::ShadowTimeout);
        }
        if let Err(reason) = self.room(0, body.len(), max) {
            return self.drop_pair(stream, reason);
        }
        self.bytes += body.len();
        let pair = self.pairs.get_mut(&stream)?;
        pair.call = Call::Answered;
        pair.shadow = Some((
            Captured {
                status,
                headers,
                body,
            },
            now_us.saturating_sub(sent_us),
        ));
        if pair.primary_done_us.is_some() {
            self.done.push_back(stream);
        }
        None
    }

    /// Drops calls that never answered well past their timeout (Envoy
    /// should have answered them; this bounds the table regardless).
    pub fn expire(&mut self, now_us: u64, timeout_ms: impl Fn(usize) -> u64) -> Vec<Report> {
        let stale: Vec<u32> = self
            .pairs
            .iter()
            .filter_map(|(s, p)| match p.call {
                Call::Sent { sent_us, .. }
                    if now_us.saturating_sub(sent_us) > (timeout_ms(p.route) + 5_000) * 1000 =>
                {
                    Some(*s)
                }
                _ => None,
            })
            .collect();
        stale
            .into_iter()
            .filter_map(|s| self.drop_pair(s, Skip::ShadowTimeout))
            .collect()
    }

    fn remove(&mut self, stream: u32) -> Option<Pair> {
        let pair = self.pairs.remove(&stream)?;
        self.bytes = self.bytes.saturating_sub(pair.bytes());
        Some(pair)
    }

    fn drop_pair(&mut self, stream: u32, reason: Skip) -> Option<Report> {
        let pair = self.remove(stream)?;
        if let Call::Sent { token, .. } = pair.call {
            self.calls.remove(&token);
        }
        Some(Report::Skipped {
            route: pair.route,
            reason,
        })
    }

    /// Compares up to [`FINISH_PER_TICK`] complete pairs. `cfg_of` gives a
    /// route's shadow settings (a pair whose route lost them is dropped).
    pub fn finish<'c>(
        &mut self,
        cfg_of: impl Fn(usize) -> Option<&'c ShadowConfig>,
        now_us: u64,
    ) -> Vec<Report> {
        let mut out = Vec::new();
        while out.len() < FINISH_PER_TICK {
            let Some(stream) = self.done.pop_front() else {
                break;
            };
            let Some(pair) = self.remove(stream) else {
                continue;
            };
            if let Some(cfg) = cfg_of(pair.route) {
                out.push(evaluate(pair, cfg, now_us));
            }
        }
        out
    }
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> &'h str {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.as_str())
}

/// A body as a record keeps it: redacted, and only when it fits the record
/// budget whole (a cut JSON document could not be compared again).
fn recorded_body(body: &[u8], cfg: &ShadowConfig) -> (Vec<u8>, bool) {
    match compare::redact_body(body, &cfg.redact, cfg.compare.max_depth) {
        Some(b) if b.len() <= cfg.record_body_bytes => (b, false),
        _ => (Vec::new(), true),
    }
}

fn evaluate(pair: Pair, cfg: &ShadowConfig, now_us: u64) -> Report {
    let route = pair.route;
    let (Some(primary), Some(done_us), Some((shadow, shadow_us))) =
        (pair.primary, pair.primary_done_us, pair.shadow)
    else {
        // Only complete pairs are queued; anything else is a bug, counted.
        return Report::Skipped {
            route,
            reason: Skip::PrimaryIncomplete,
        };
    };
    let primary_us = done_us.saturating_sub(pair.started_us);
    let latency_gap_us = i64::try_from(shadow_us).unwrap_or(i64::MAX)
        - i64::try_from(primary_us).unwrap_or(i64::MAX);
    let req = &pair.request;
    let traffic_segment = pair.traffic_segment.clone();
    let path = header(&req.headers, ":path");
    let segment = cfg.segment(path, &req.headers);
    let scope = compare::Scope {
        expected: segment
            .and_then(|i| cfg.expected.get(i))
            .map_or(&[][..], |e| e.paths.as_slice()),
        redact: &cfg.redact,
    };
    let comparison = compare::compare_in(
        &cfg.compare,
        scope,
        &Response {
            status: primary.status,
            headers: &primary.headers,
            body: &primary.body,
        },
        &Response {
            status: shadow.status,
            headers: &shadow.headers,
            body: &shadow.body,
        },
    );
    if comparison.unparseable.is_some() {
        return Report::Skipped {
            route,
            reason: Skip::Unparseable,
        };
    }
    let verdict = if comparison.serious > 0 {
        Verdict::Serious
    } else if comparison.noise > 0 {
        Verdict::Noise
    } else {
        Verdict::Matched
    };
    let unexpected = comparison.unexpected > 0;
    let mismatch = (verdict != Verdict::Matched).then(|| {
        let (request_body, request_body_truncated) = recorded_body(&req.body, cfg);
        let (primary_body, primary_body_truncated) = recorded_body(&primary.body, cfg);
        let (shadow_body, shadow_body_truncated) = recorded_body(&shadow.body, cfg);
        // The headers the comparison looks at, and the content type.
        let kept = |headers: &[(String, String)]| -> Vec<(String, String)> {
            headers
                .iter()
                .filter(|(k, _)| {
                    let k = k.to_ascii_lowercase();
                    k == "content-type" || cfg.compare.headers.contains(&k)
                })
                .cloned()
                .collect()
        };
        Box::new(Mismatch {
            route,
            request_id: header(&req.headers, "x-request-id").to_owned(),
            latency_gap_us,
            time_us: now_us,
            segment: segment
                .and_then(|i| cfg.expected.get(i))
                .map(|e| e.name.clone()),
            traffic_segment: traffic_segment.clone(),
            method: header(&req.headers, ":method").to_owned(),
            path: path.to_owned(),
            authority: header(&req.headers, ":authority").to_owned(),
            request: Captured {
                status: 0,
                headers: req
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.starts_with(':'))
                    .cloned()
                    .collect(),
                body: request_body,
            },
            request_body_truncated,
            primary: Captured {
                status: primary.status,
                headers: kept(&primary.headers),
                body: primary_body,
            },
            primary_body_truncated,
            shadow: Captured {
                status: shadow.status,
                headers: kept(&shadow.headers),
                body: shadow_body,
            },
            shadow_body_truncated,
            comparison,
        })
    });
    Report::Compared {
        route,
        verdict,
        unexpected,
        latency_gap_us,
        traffic_segment,
        mismatch,
    }
}

// === report batches ===

/// Largest encoded report batch the filter sends. The control plane's gRPC
/// server refuses messages over 4 MiB (tonic's default decode limit) without
/// the filter learning why, so batches stay well below it.
pub const MAX_REPORT_BATCH_BYTES: usize = 1024 * 1024;

/// Bytes a record adds to a batch beyond its own encoding: the field tag and
/// the length prefix (at most 5 bytes of varint for 32-bit lengths).
pub const RECORD_FRAMING_BYTES: usize = 6;

/// Splits records (given by encoded size) into consecutive batches whose
/// total stays within `limit`, the first batch also carrying `first_overhead`
/// bytes (counts, node id). Every record lands in exactly one batch, in
/// order; a record that alone exceeds `limit` gets a batch of its own (the
/// caller shrinks such records before, or drops and counts them).
pub fn split_batches(
    sizes: &[usize],
    first_overhead: usize,
    limit: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut used = first_overhead;
    for (i, size) in sizes.iter().enumerate() {
        let size = size.saturating_add(RECORD_FRAMING_BYTES);
        if i > start && used.saturating_add(size) > limit {
            batches.push(start..i);
            start = i;
            used = 0;
        }
        used = used.saturating_add(size);
    }
    if start < sizes.len() || batches.is_empty() {
        batches.push(start..sizes.len());
    }
    batches
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_split_under_the_limit_and_keep_every_record() {
        assert_eq!(split_batches(&[], 10, 100), vec![0..0]);
        assert_eq!(split_batches(&[10, 10], 0, 100), vec![0..2]);
        // 60 + 6 each: two do not fit in 100.
        assert_eq!(split_batches(&[60, 60, 60], 0, 100), vec![0..1, 1..2, 2..3]);
        // An oversized record stands alone.
        assert_eq!(
            split_batches(&[10, 500, 10], 0, 100),
            vec![0..1, 1..2, 2..3]
        );
        // The first batch's overhead counts.
        assert_eq!(split_batches(&[40, 40], 50, 100), vec![0..1, 1..2]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn split_batches_covers_all_in_order_within_the_limit(
            sizes in proptest::collection::vec(0usize..3000, 0..200),
            overhead in 0usize..500,
            limit in 1usize..5000,
        ) {
            let batches = split_batches(&sizes, overhead, limit);
            let mut next = 0;
            for (n, b) in batches.iter().enumerate() {
                proptest::prop_assert_eq!(b.start, next);
                next = b.end;
                let total: usize = sizes[b.clone()].iter().map(|s| s + RECORD_FRAMING_BYTES).sum::<usize>()
                    + if n == 0 { overhead } else { 0 };
                // Over the limit only when a single record is.
                proptest::prop_assert!(total <= limit || b.len() <= 1);
            }
            proptest::prop_assert_eq!(next, sizes.len());
        }
    }

    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn cfg(extra: serde_json::Value) -> ShadowConfig {
        let mut raw = json!({"cluster": "shop-canary"});
        if let (Some(r), Some(e)) = (raw.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        ShadowConfig::from_raw(serde_json::from_value(raw).unwrap(), "routes[0].shadow").unwrap()
    }

    fn err(extra: serde_json::Value) -> String {
        let mut raw = json!({"cluster": "shop-canary"});
        if let (Some(r), Some(e)) = (raw.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        ShadowConfig::from_raw(serde_json::from_value(raw).unwrap(), "routes[0].shadow")
            .unwrap_err()
            .to_string()
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn invalid_settings_name_their_field() {
        for (extra, field) in [
            (json!({"percent": 101}), "routes[0].shadow.percent"),
            (json!({"percent": -1}), "routes[0].shadow.percent"),
            (
                json!({"sample_key": "bad header"}),
                "routes[0].shadow.sample_key",
            ),
            (
                json!({"strip_headers": ["ok", ""]}),
                "routes[0].shadow.strip_headers[1]",
            ),
            (
                json!({"add_headers": {"x-understudy-shadow": "0"}}),
                "add_headers.x-understudy-shadow",
            ),
            (json!({"add_headers": {"x-a": "a\nb"}}), "add_headers.x-a"),
            (json!({"timeout_ms": 0}), "routes[0].shadow.timeout_ms"),
            (
                json!({"max_body_bytes": 0}),
                "routes[0].shadow.max_body_bytes",
            ),
            (
                json!({"max_body_bytes": 10, "record_body_bytes": 11}),
                "record_body_bytes",
            ),
            (
                json!({"compare": {"ignore": ["total"]}}),
                "routes[0].shadow.compare.ignore[0]",
            ),
            (
                json!({"redact": ["$.a", "x"]}),
                "routes[0].shadow.redact[1]",
            ),
            (
                json!({"expected": [{"name": "a"}, {"name": "a"}]}),
                "expected[1].name",
            ),
            (
                json!({"expected": [{"name": "a", "path_prefix": "x"}]}),
                "expected[0].path_prefix",
            ),
            (
                json!({"expected": [{"name": "a", "paths": ["$["]}]}),
                "expected[0].paths[0]",
            ),
        ] {
            let e = err(extra.clone());
            assert!(e.contains(field), "{extra}: {e}");
        }
        assert!(err(json!({"cluster": ""})).contains("routes[0].shadow.cluster"));
        let unknown: Result<RawShadowConfig, _> =
            serde_json::from_value(json!({"cluster": "c", "percnt": 5}));
        assert!(unknown.unwrap_err().to_string().contains("percnt"));
    }

    #[test]
    fn only_safe_methods_unless_the_route_opts_in() {
        let c = cfg(json!({}));
        for m in ["GET", "HEAD", "OPTIONS"] {
            assert_eq!(c.decide(m, None, 0), Ok(()));
        }
        for m in ["POST", "PUT", "PATCH", "DELETE"] {
            assert_eq!(c.decide(m, None, 0), Err(Skip::Method));
        }
        assert_eq!(
            cfg(json!({"unsafe_methods": true})).decide("POST", None, 0),
            Ok(())
        );
    }

    #[test]
    fn zero_percent_never_samples_and_hundred_always_does() {
        let none = cfg(json!({"percent": 0}));
        let all = cfg(json!({"percent": 100}));
        for r in [0, 1, u64::MAX / 2, u64::MAX] {
            assert_eq!(none.decide("GET", None, r), Err(Skip::NotSampled));
            assert_eq!(all.decide("GET", None, r), Ok(()));
        }
    }

    proptest! {
        #[test]
        fn keyed_sampling_is_consistent_and_near_the_percentage(
            percent in 1.0f64..99.0,
            seed in any::<u64>(),
        ) {
            let c = cfg(json!({"percent": percent, "sample_key": "X-User"}));
            let keys: Vec<String> = (0..2000u64).map(|i| format!("user-{}", seed.wrapping_add(i))).collect();
            let mut inside = 0usize;
            for k in &keys {
                let first = c.decide("GET", Some(k), 0);
                // The random draw is ignored when a key is present.
                prop_assert_eq!(first, c.decide("GET", Some(k), u64::MAX));
                if first.is_ok() {
                    inside += 1;
                }
            }
            let share = inside as f64 / keys.len() as f64 * 100.0;
            // 2000 draws: the standard error is at most 1.12 points; allow 5.
            prop_assert!((share - percent).abs() < 5.0, "{share} vs {percent}");
        }
    }

    #[test]
    fn copies_are_marked_scrubbed_and_sent_to_the_shadow_host() {
        let c = cfg(json!({"add_headers": {"x-env": "shadow", "x-tenant": "t-shadow"}}));
        let out = c.shadow_headers(&h(&[
            (":method", "GET"),
            (":authority", "shop.example:8080"),
            ("Authorization", "Bearer x"),
            ("cookie", "a=b"),
            ("x-tenant", "t1"),
            ("transfer-encoding", "chunked"),
            ("x-understudy-shadow", "spoofed"),
            ("accept", "application/json"),
        ]));
        let get = |k: &str| {
            out.iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get(":authority"), ["shop.example-shadow:8080"]);
        assert!(get("authorization").is_empty() && get("cookie").is_empty());
        assert!(get("transfer-encoding").is_empty());
        assert_eq!(get("x-understudy-shadow"), ["1"]);
        assert_eq!(get("x-tenant"), ["t-shadow"], "added headers replace");
        assert_eq!(get("x-env"), ["shadow"]);
        assert_eq!(get("accept"), ["application/json"]);
        assert_eq!(shadow_host("shop"), "shop-shadow");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_host("[::1]"), "[::1]-shadow");
    }

    #[test]
    fn segments_match_by_prefix_and_header_in_order() {
        let c = cfg(json!({"expected": [
            {"name": "inference", "header": {"name": "X-Job", "value": "inference"}, "paths": ["$.alloc"]},
            {"name": "training", "path_prefix": "/jobs", "header": {"name": "x-job", "value": "training"}},
            {"name": "rest", "path_prefix": "/"}
        ]}));
        assert_eq!(c.segment("/jobs", &h(&[("x-job", "inference")])), Some(0));
        assert_eq!(c.segment("/jobs/1", &h(&[("x-job", "training")])), Some(1));
        assert_eq!(c.segment("/other", &h(&[("x-job", "training")])), Some(2));
    }

    const S: u32 = 7;

    fn primary_ok(t: &mut ShadowTable, body: &[u8], now: u64) -> Option<Report> {
        let r = t.primary_headers(
            S,
            200,
            h(&[("content-type", "application/json")]),
            false,
            1 << 20,
            now,
        );
        assert!(r.is_none());
        t.primary_body(S, body, true, 1 << 20, now)
    }

    fn limits(_: usize) -> Option<(u64, usize)> {
        Some((1_000, 1 << 20))
    }

    fn request(path: &str) -> Vec<(String, String)> {
        h(&[
            (":method", "GET"),
            (":path", path),
            (":authority", "shop-shadow"),
            ("x-request-id", "r-1"),
        ])
    }

    #[test]
    fn a_pair_compares_in_either_order_and_reports_the_differences() {
        let c = cfg(json!({"redact": ["$.email"]}));
        for shadow_first in [false, true] {
            let mut t = ShadowTable::default();
            t.start(S, 0, request("/orders/1"), true, 1_000).unwrap();
            let out = t.to_send();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].stream, S);
            t.sent(S, 42, 2_000);
            assert!(t.to_send().is_empty(), "sent once");
            assert!(t.has_call(42));
            let shadow_body = br#"{"total":51.4,"email":"b@x"}"#.to_vec();
            let shadow_headers = h(&[(":status", "200"), ("content-type", "application/json")]);
            if shadow_first {
                assert!(
                    t.shadow_response(
                        42,
                        Some(200),
                        shadow_headers.clone(),
                        shadow_body.clone(),
                        limits,
                        12_000
                    )
                    .is_none()
                );
                assert!(
                    t.finish(|_| Some(&c), 12_000).is_empty(),
                    "primary not done"
                );
                assert!(primary_ok(&mut t, br#"{"total":49.9,"email":"a@x"}"#, 21_000).is_none());
            } else {
                assert!(primary_ok(&mut t, br#"{"total":49.9,"email":"a@x"}"#, 21_000).is_none());
                assert!(
                    t.stream_end(S).is_none(),
                    "a complete primary waits for its shadow"
                );
                assert!(
                    t.shadow_response(42, Some(200), shadow_headers, shadow_body, limits, 12_000)
                        .is_none()
                );
            }
            let reports = t.finish(|_| Some(&c), 30_000);
            assert!(t.is_empty() && !t.has_call(42));
            let [
                Report::Compared {
                    verdict,
                    unexpected,
                    latency_gap_us,
                    mismatch: Some(m),
                    ..
                },
            ] = reports.as_slice()
            else {
                panic!("{reports:?}");
            };
            assert_eq!(*verdict, Verdict::Serious);
            assert!(*unexpected);
            // Shadow 10 ms after dispatch, primary 20 ms after the start.
            assert_eq!(*latency_gap_us, 10_000 - 20_000);
            assert_eq!(m.request_id, "r-1");
            assert_eq!(m.path, "/orders/1");
            let total = m
                .comparison
                .differences
                .iter()
                .find(|d| d.path == "$.total")
                .unwrap();
            assert_eq!(
                (total.primary.as_deref(), total.shadow.as_deref()),
                (Some("49.9"), Some("51.4"))
            );
            let text = format!("{m:?}");
            assert!(
                !text.contains("a@x") && !text.contains("b@x"),
                "redacted: {text}"
            );
        }
    }

    #[test]
    fn equal_answers_match_without_a_record() {
        let c = cfg(json!({}));
        let mut t = ShadowTable::default();
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.sent(S, 1, 0);
        primary_ok(&mut t, br#"{"a":1}"#, 5);
        t.shadow_response(
            1,
            Some(200),
            h(&[("content-type", "application/json")]),
            br#"{"a":1.0}"#.to_vec(),
            limits,
            5,
        );
        let r = t.finish(|_| Some(&c), 10);
        assert!(
            matches!(
                r.as_slice(),
                [Report::Compared {
                    verdict: Verdict::Matched,
                    mismatch: None,
                    ..
                }]
            ),
            "{r:?}"
        );
    }

    #[test]
    fn a_segmented_pair_reports_its_label_with_the_counts_and_the_record() {
        let c = cfg(json!({"segment_by": {"header": "X-Customer-Tier", "method": true}}));
        let by = c.segment_by.clone().unwrap();
        assert_eq!(by.header.as_deref(), Some("x-customer-tier"));
        let label = by.label(Some(b"GET"), Some(b"gold"));
        let mut t = ShadowTable::default();
        t.start_in(S, 0, Some(label), request("/a"), true, 0)
            .unwrap();
        t.sent(S, 1, 0);
        primary_ok(&mut t, br#"{"a":1}"#, 5);
        t.shadow_response(
            1,
            Some(200),
            h(&[("content-type", "application/json")]),
            br#"{"a":2}"#.to_vec(),
            limits,
            5,
        );
        let r = t.finish(|_| Some(&c), 10);
        let [
            Report::Compared {
                traffic_segment,
                mismatch: Some(m),
                ..
            },
        ] = r.as_slice()
        else {
            panic!("{r:?}");
        };
        assert_eq!(traffic_segment.as_deref(), Some("GET|gold"));
        assert_eq!(m.traffic_segment.as_deref(), Some("GET|gold"));
    }

    #[test]
    fn segment_by_errors_name_their_field() {
        assert_eq!(
            err(json!({"segment_by": {"header": "x tier"}})),
            "routes[0].shadow.segment_by.header: \"x tier\" is not a valid header name"
        );
        let unknown = serde_json::from_value::<RawShadowConfig>(
            json!({"cluster": "c", "segment_by": {"headr": "x-tier"}}),
        )
        .unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `headr`"),
            "{unknown}"
        );
    }

    #[test]
    fn every_skip_has_its_reason() {
        let skipped = |r: Option<Report>| match r {
            Some(Report::Skipped { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        // Request body over budget.
        let mut t = ShadowTable::default();
        t.start(S, 0, request("/a"), false, 0).unwrap();
        assert!(t.request_body(S, b"12345", false, 8).is_none());
        assert_eq!(skipped(t.request_body(S, b"6789", true, 8)), Skip::TooLarge);
        assert!(t.is_empty());
        // Declared primary length over budget.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        let r = t.primary_headers(S, 200, h(&[("content-length", "9")]), false, 8, 0);
        assert_eq!(skipped(r), Skip::TooLarge);
        // Streamed primary over budget.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.primary_headers(S, 200, vec![], false, 8, 0);
        assert_eq!(
            skipped(t.primary_body(S, b"123456789", false, 8, 0)),
            Skip::TooLarge
        );
        // Primary reset.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.primary_headers(S, 200, vec![], false, 8, 0);
        assert_eq!(skipped(t.stream_end(S)), Skip::PrimaryIncomplete);
        // Failed call: early is an error, at the timeout a timeout, and so
        // is the 504 Envoy answers a timed-out call with.
        for (status, after_us, reason) in [
            (None, 10_000, Skip::ShadowError),
            (None, 1_000_000, Skip::ShadowTimeout),
            (Some(504), 990_000, Skip::ShadowTimeout),
        ] {
            t.start(S, 0, request("/a"), true, 0).unwrap();
            t.sent(S, 9, 0);
            let r = t.shadow_response(9, status, vec![], vec![], limits, after_us);
            assert_eq!(skipped(r), reason);
            assert!(!t.has_call(9));
        }
        // A quick 504 is the new version's answer.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.sent(S, 9, 0);
        let r = t.shadow_response(9, Some(504), vec![], vec![], limits, 10_000);
        assert_eq!(r, None);
        assert_eq!(skipped(t.stream_end(S)), Skip::PrimaryIncomplete);
        // Shadow body over budget.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.sent(S, 9, 0);
        let small = |_: usize| Some((1_000, 4));
        assert_eq!(
            skipped(t.shadow_response(9, Some(200), vec![], b"12345".to_vec(), small, 1)),
            Skip::TooLarge
        );
        // A call never answered is expired well past its timeout.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.sent(S, 9, 0);
        assert!(t.expire(5_000_000, |_| 1_000).is_empty());
        assert_eq!(
            t.expire(7_000_000, |_| 1_000),
            vec![Report::Skipped {
                route: 0,
                reason: Skip::ShadowTimeout
            }]
        );
        // Could not be sent.
        t.start(S, 0, request("/a"), true, 0).unwrap();
        assert_eq!(skipped(t.send_failed(S)), Skip::ShadowError);
        // JSON that does not parse.
        let c = cfg(json!({}));
        t.start(S, 0, request("/a"), true, 0).unwrap();
        t.sent(S, 9, 0);
        primary_ok(&mut t, b"{\"a\":", 1);
        t.shadow_response(9, Some(200), vec![], b"{}".to_vec(), limits, 1);
        assert_eq!(
            t.finish(|_| Some(&c), 2),
            vec![Report::Skipped {
                route: 0,
                reason: Skip::Unparseable
            }]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn the_table_is_capped() {
        let mut t = ShadowTable::default();
        for s in 0..MAX_PENDING as u32 {
            t.start(s, 0, vec![], true, 0).unwrap();
        }
        assert_eq!(
            t.start(u32::MAX, 0, vec![], true, 0),
            Err(Report::Skipped {
                route: 0,
                reason: Skip::Capacity
            })
        );
    }

    #[test]
    fn finishing_is_bounded_per_tick() {
        let c = cfg(json!({}));
        let mut t = ShadowTable::default();
        let n = FINISH_PER_TICK as u32 + 3;
        for s in 0..n {
            t.start(s, 0, vec![], true, 0).unwrap();
            t.sent(s, 1000 + s, 0);
            t.primary_headers(s, 200, vec![], true, 64, 1);
            t.shadow_response(1000 + s, Some(200), vec![], vec![], limits, 1);
        }
        assert_eq!(t.finish(|_| Some(&c), 2).len(), FINISH_PER_TICK);
        assert_eq!(t.finish(|_| Some(&c), 2).len(), 3);
        assert!(t.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Start(u8, bool),
        Body(u8, u8, bool),
        Send(u8),
        PrimaryHeaders(u8, bool),
        PrimaryBody(u8, u8, bool),
        End(u8),
        Answer(u8, bool, u8),
        Tick(u32),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u8..6, any::<bool>()).prop_map(|(s, e)| Ev::Start(s, e)),
            (0u8..6, 0u8..40, any::<bool>()).prop_map(|(s, n, e)| Ev::Body(s, n, e)),
            (0u8..6).prop_map(Ev::Send),
            (0u8..6, any::<bool>()).prop_map(|(s, e)| Ev::PrimaryHeaders(s, e)),
            (0u8..6, 0u8..40, any::<bool>()).prop_map(|(s, n, e)| Ev::PrimaryBody(s, n, e)),
            (0u8..6).prop_map(Ev::End),
            (0u8..6, any::<bool>(), 0u8..40).prop_map(|(s, ok, n)| Ev::Answer(s, ok, n)),
            (0u32..3_000).prop_map(Ev::Tick),
        ]
    }

    proptest! {
        /// Any order of events: every started pair ends in exactly one
        /// report once its stream has ended and time has passed, and the
        /// table empties.
        #[test]
        fn every_pair_ends_once_whatever_the_order(events in proptest::collection::vec(ev(), 0..60)) {
            let c = cfg(json!({"max_body_bytes": 64, "record_body_bytes": 64}));
            let lim = |_: usize| Some((c.timeout_ms, c.max_body_bytes));
            let mut t = ShadowTable::default();
            let mut now = 0u64;
            let mut started = 0usize;
            let mut reports = 0usize;
            let mut live: BTreeMap<u32, bool> = BTreeMap::new(); // stream -> ended
            let count = |r: Option<Report>| usize::from(r.is_some());
            for e in events {
                now += 100;
                match e {
                    Ev::Start(s, eos) => {
                        let s = u32::from(s);
                        if !t.is_tracked(s) && !live.contains_key(&s) {
                            t.start(s, 0, request("/p"), eos, now).unwrap();
                            live.insert(s, false);
                            started += 1;
                        }
                    }
                    Ev::Body(s, n, eos) => reports += count(t.request_body(u32::from(s), &vec![b'x'; usize::from(n)], eos, 64)),
                    Ev::Send(s) => {
                        for o in t.to_send() {
                            if o.stream == u32::from(s) {
                                t.sent(o.stream, 100 + o.stream, now);
                            }
                        }
                    }
                    Ev::PrimaryHeaders(s, eos) => reports += count(t.primary_headers(u32::from(s), 200, vec![], eos, 64, now)),
                    Ev::PrimaryBody(s, n, eos) => reports += count(t.primary_body(u32::from(s), &vec![b'{'; usize::from(n)], eos, 64, now)),
                    Ev::End(s) => {
                        let s = u32::from(s);
                        if let Some(ended) = live.get_mut(&s) && !*ended {
                            *ended = true;
                            reports += count(t.stream_end(s));
                        }
                    }
                    Ev::Answer(s, ok, n) => {
                        let status = ok.then_some(200);
                        reports += count(t.shadow_response(100 + u32::from(s), status, vec![], vec![b'1'; usize::from(n)], lim, now));
                    }
                    Ev::Tick(ms) => {
                        now += u64::from(ms) * 1000;
                        reports += t.expire(now, |_| c.timeout_ms).len();
                        reports += t.finish(|_| Some(&c), now).len();
                    }
                }
                // A stream id is reusable once its pair is gone and its stream ended.
                live.retain(|s, ended| !*ended || t.is_tracked(*s));
            }
            // Drain: end every stream, answer every call, let time pass.
            for s in 0..6u32 {
                if let Some(false) = live.get(&s) {
                    reports += count(t.stream_end(s));
                }
                for o in t.to_send() {
                    t.sent(o.stream, 100 + o.stream, now);
                }
                reports += count(t.shadow_response(100 + s, None, vec![], vec![], lim, now));
            }
            now += 100_000_000;
            reports += t.expire(now, |_| c.timeout_ms).len();
            while !t.done.is_empty() {
                reports += t.finish(|_| Some(&c), now).len();
            }
            prop_assert_eq!(reports, started);
            prop_assert!(t.is_empty() && t.calls.is_empty());
        }
    }
}
