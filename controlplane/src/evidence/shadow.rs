//! Shadow comparison reports, as the filters send them
//! (`understudy.v1.ReportService/Push`, served on the xDS port), turned into
//! what an operator asks: how often does the new version answer like the old
//! one, where does it differ, and what did a differing pair look like.
//!
//! [`ShadowBook`] keeps, per route and separately for A/A calibration and for
//! live traffic:
//!
//! - **totals**, summed from each worker's per-route counter deltas
//!   ([`RouteCounts`]): pairs compared, matched, mismatched (serious or noise
//!   only), unexpected, skipped by reason, and the latency gap;
//! - **rates** per compared pair ([`Stats`]): `serious_rate`,
//!   `unexpected_rate`, `match_rate = 1 - serious_rate` (a pair whose
//!   differences are all noise matches), `exact_match_rate` (no difference at
//!   all), and a 95% Wilson score interval for `match_rate`. With nothing
//!   compared every rate is `None`: no data is never "healthy";
//! - **top differing paths**, from the individual mismatch records, each with
//!   a few samples that point at the stored record;
//! - **learned noise**: what differs between two copies of the *same* version
//!   (calibration) is noise by definition. A path's learned noise rate is the
//!   share of calibration pairs that differed there (see
//!   [`ShadowBook::ingest`] for how live records are reclassified with it).
//!
//! Everything is bounded: [`MAX_ROUTES`] routes (the least recently reported
//! is forgotten first), [`MAX_PATHS`] paths per route and table (the lowest
//! count is evicted), [`MAX_SAMPLES_PER_PATH`] samples per path, and a global
//! FIFO store of at most [`MAX_RECORDS`] full records and [`MAX_RECORD_BYTES`]
//! bytes, which [`replay`] reads. A sample whose record was evicted is dropped
//! when it is read.
//!
//! **Segments.** A route whose shadow config has `segment_by` also keeps,
//! for live traffic, the totals and top paths (with samples) per traffic
//! segment ([`ShadowBook::segments`]): at most
//! [`understudy_core::segment::MAX_SEGMENTS`] segments per route, the first
//! ones reported; any later label, and any label no filter could have made,
//! is counted under `other`. A segment keeps [`MAX_SEGMENT_PATHS`] paths of
//! [`MAX_SEGMENT_SAMPLES`] samples. The route's own totals stay the totals.
//! Calibration is not segmented: noise is learned per route and path.
//!
//! **Replicas.** With [`ShadowBook::share_learning`] a book learns noise
//! from its own Envoys' calibration only and hands it over to be shared
//! through the database; the fleet's sum comes back as its calibration view
//! ([`learned`], [`crate::evidence::shared`]).
//!
//! Aggregation is keyed by route name only (the book's `routes` map). The
//! hook for per-rollout aggregation (a later issue) is that key: make it
//! (route, rollout) and start a fresh live side when a rollout starts; the
//! record store, paths and noise learning do not depend on it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use prost::Message;
use serde::{Deserialize, Serialize};
use understudy_core::segment::SegmentTally;
use understudy_proto::v1::{MismatchRecord, ReportBatch, RouteCounts, SegmentCounts, difference};

use super::PairCounts;
use crate::store::Store;

mod learned;
pub use learned::{Learned, PathCounts};

/// Routes the book remembers; the least recently reported is forgotten first.
pub const MAX_ROUTES: usize = 256;
/// Differing paths kept per route (live and calibration each); when full, the
/// path with the lowest count (then the least recently seen) makes room.
pub const MAX_PATHS: usize = 200;
/// Samples kept per path: the most recent ones.
pub const MAX_SAMPLES_PER_PATH: usize = 5;
/// Differing paths kept per traffic segment of a route.
pub const MAX_SEGMENT_PATHS: usize = 10;
/// Samples kept per path of a traffic segment.
pub const MAX_SEGMENT_SAMPLES: usize = 2;
/// Full mismatch records kept for `GET /v1/shadow/samples/{id}` and replay.
pub const MAX_RECORDS: usize = 2000;
/// A record carries bodies (up to the filter's `record_body_bytes` each), so
/// the store is also bounded in bytes, as encoded on the wire.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// Skip reasons kept per route; a reporter inventing more is folded into `other`.
pub const MAX_SKIP_REASONS: usize = 32;
/// Sample values are for recognising a difference at a glance; the stored
/// record has them whole.
const MAX_SAMPLE_VALUE_CHARS: usize = 200;
/// Headers that carry credentials: shown as [`REDACTED`] in every sample the
/// API shows and never sent by a replay. A route's shadow `strip_headers`
/// (what it already keeps from the shadow) extends the list.
pub const CREDENTIAL_HEADERS: [&str; 10] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-amz-security-token",
    "x-goog-api-key",
];
/// What a credential header's value is shown as.
pub const REDACTED: &str = "[redacted]";
/// Replays remembered in the audit log (`GET /v1/shadow/replays`).
pub const MAX_REPLAY_AUDIT: usize = 1000;
/// A longer node id is cut before it is stored with each record.
const MAX_NODE_CHARS: usize = 256;
/// A longer path is cut (and marked with `…`) before it becomes a table key.
const MAX_PATH_CHARS: usize = 512;
/// The standard normal quantile for a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

// === rates ===

/// The 95% Wilson score interval for a proportion of `successes` out of `n`
/// trials; `None` when `n` is 0. Unlike the normal approximation it stays
/// within [0, 1] and is honest for small `n` and for rates near 1, which is
/// exactly where a shadow match rate lives.
pub fn wilson_95(successes: u64, n: u64) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let successes = successes.min(n);
    let nf = n as f64;
    let p = successes as f64 / nf;
    let z2 = Z_95 * Z_95;
    let denom = 1.0 + z2 / nf;
    let center = (p + z2 / (2.0 * nf)) / denom;
    let half = Z_95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // At the extremes the bound is exactly 0 or 1; floating point lands a hair off.
    let lo = if successes == 0 {
        0.0
    } else {
        (center - half).max(0.0)
    };
    let hi = if successes == n {
        1.0
    } else {
        (center + half).min(1.0)
    };
    Some([lo, hi])
}

fn rate(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part.min(whole) as f64 / whole as f64)
}

/// Counters and rates for one side (live or calibration) of one route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub compared: u64,
    /// Pairs with no difference at all.
    pub matched: u64,
    /// Pairs with at least one serious difference (after noise learning).
    pub mismatched_serious: u64,
    /// Pairs whose differences were all noise (including learned noise).
    pub mismatched_noise: u64,
    /// Pairs with a difference no expected-divergence rule covers.
    pub unexpected: u64,
    pub skipped: BTreeMap<String, u64>,
    /// `1 - serious_rate`: the share of pairs with no serious difference.
    pub match_rate: Option<f64>,
    /// 95% Wilson score interval for `match_rate`.
    pub match_rate_ci: Option<[f64; 2]>,
    /// `matched / compared`: the share of byte-for-byte equivalent answers.
    pub exact_match_rate: Option<f64>,
    pub serious_rate: Option<f64>,
    pub unexpected_rate: Option<f64>,
    /// Mean of (shadow latency - primary latency) over compared pairs.
    pub mean_latency_gap_ms: Option<f64>,
    /// Mismatch records received (the filter also drops some when its queue is full).
    pub records: u64,
    /// Live records moved from serious to noise by learned noise.
    pub reclassified_as_noise: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Totals {
    compared: u64,
    matched: u64,
    mismatched_serious: u64,
    mismatched_noise: u64,
    unexpected: u64,
    skipped: BTreeMap<String, u64>,
    latency_gap_us_sum: i64,
    records: u64,
    reclassified: u64,
}

impl Totals {
    fn add_counts(&mut self, c: &RouteCounts) {
        self.compared = self.compared.saturating_add(c.compared);
        self.matched = self.matched.saturating_add(c.matched);
        self.mismatched_serious = self.mismatched_serious.saturating_add(c.mismatched_serious);
        self.mismatched_noise = self.mismatched_noise.saturating_add(c.mismatched_noise);
        self.unexpected = self.unexpected.saturating_add(c.unexpected);
        self.latency_gap_us_sum = self.latency_gap_us_sum.saturating_add(c.latency_gap_us_sum);
        self.add_skipped(&c.skipped);
    }

    /// Another side's totals (skip reasons capped as [`Totals::add_counts`] caps them).
    fn add(&mut self, o: &Totals) {
        self.compared = self.compared.saturating_add(o.compared);
        self.matched = self.matched.saturating_add(o.matched);
        self.mismatched_serious = self.mismatched_serious.saturating_add(o.mismatched_serious);
        self.mismatched_noise = self.mismatched_noise.saturating_add(o.mismatched_noise);
        self.unexpected = self.unexpected.saturating_add(o.unexpected);
        self.latency_gap_us_sum = self.latency_gap_us_sum.saturating_add(o.latency_gap_us_sum);
        self.records = self.records.saturating_add(o.records);
        self.reclassified = self.reclassified.saturating_add(o.reclassified);
        self.add_skipped(&o.skipped);
    }

    fn add_skipped<'a>(&mut self, skipped: impl IntoIterator<Item = (&'a String, &'a u64)>) {
        for (reason, n) in skipped {
            let key = if self.skipped.contains_key(reason) || self.skipped.len() < MAX_SKIP_REASONS
            {
                reason.clone()
            } else {
                "other".to_owned()
            };
            let slot = self.skipped.entry(key).or_default();
            *slot = slot.saturating_add(*n);
        }
    }

    /// One worker's delta for one traffic segment (no skips: a segment is
    /// a breakdown of compared pairs).
    fn add_segment(&mut self, c: &SegmentCounts) {
        self.compared = self.compared.saturating_add(c.compared);
        self.matched = self.matched.saturating_add(c.matched);
        self.mismatched_serious = self.mismatched_serious.saturating_add(c.mismatched_serious);
        self.mismatched_noise = self.mismatched_noise.saturating_add(c.mismatched_noise);
        self.unexpected = self.unexpected.saturating_add(c.unexpected);
    }

    /// A record arrived: counted, and moved by learned noise as the book
    /// decided (see [`ShadowBook::ingest`]).
    fn add_record(&mut self, reclassified: bool, unexpected_learned: bool) {
        self.records = self.records.saturating_add(1);
        if reclassified {
            self.mismatched_serious = self.mismatched_serious.saturating_sub(1);
            self.mismatched_noise = self.mismatched_noise.saturating_add(1);
            self.reclassified = self.reclassified.saturating_add(1);
        }
        if unexpected_learned {
            self.unexpected = self.unexpected.saturating_sub(1);
        }
    }

    fn stats(&self) -> Stats {
        let n = self.compared;
        // Every reason the filter counts is listed, zero or not, so "nothing
        // skipped" is visible as zeros rather than as a missing key.
        let mut skipped: BTreeMap<String, u64> = understudy_core::shadow::Skip::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), 0))
            .collect();
        skipped.extend(self.skipped.iter().map(|(k, v)| (k.clone(), *v)));
        let serious_rate = rate(self.mismatched_serious, n);
        Stats {
            compared: n,
            matched: self.matched,
            mismatched_serious: self.mismatched_serious,
            mismatched_noise: self.mismatched_noise,
            unexpected: self.unexpected,
            skipped,
            match_rate: serious_rate.map(|r| 1.0 - r),
            match_rate_ci: wilson_95(n.saturating_sub(self.mismatched_serious), n),
            exact_match_rate: rate(self.matched, n),
            serious_rate,
            unexpected_rate: rate(self.unexpected, n),
            mean_latency_gap_ms: (n > 0)
                .then(|| self.latency_gap_us_sum as f64 / n as f64 / 1000.0),
            records: self.records,
            reclassified_as_noise: self.reclassified,
        }
    }
}

// === paths and samples ===

/// How one difference is shown: the filter's bucket, or `noisy` for a serious
/// difference at a path that calibration learned as noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShownBucket {
    Serious,
    Noise,
    Noisy,
}

/// A pointer from a path to a stored record, with the difference found there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleView {
    /// The record's id for `GET /v1/shadow/samples/{id}`.
    pub id: String,
    pub request_id: String,
    pub kind: &'static str,
    pub bucket: ShownBucket,
    /// Values as JSON text, cut to 200 characters; `None` when absent on that side.
    pub primary: Option<String>,
    pub shadow: Option<String>,
}

#[derive(Debug, Clone)]
struct Sample {
    id: u64,
    request_id: String,
    kind: &'static str,
    bucket: ShownBucket,
    primary: Option<String>,
    shadow: Option<String>,
}

/// Records that differed at one path. A record counts once per path.
#[derive(Debug, Clone, Default)]
struct PathStats {
    count: u64,
    serious: u64,
    noise: u64,
    unexpected: u64,
    /// The id of the last record seen here; breaks ties when evicting.
    last_seen: u64,
    samples: VecDeque<Sample>,
}

#[derive(Debug, Clone, Default)]
struct PathTable {
    paths: BTreeMap<String, PathStats>,
}

impl PathTable {
    /// `path`'s entry; a new path evicts another once `max` are kept.
    fn entry(&mut self, path: &str, max: usize) -> &mut PathStats {
        if !self.paths.contains_key(path) && self.paths.len() >= max {
            let victim = self
                .paths
                .iter()
                .min_by_key(|(_, p)| (p.count, p.last_seen))
                .map(|(k, _)| k.clone());
            if let Some(k) = victim {
                self.paths.remove(&k);
            }
        }
        self.paths.entry(path.to_owned()).or_default()
    }
}

/// One differing path, as `GET /v1/shadow/routes/{route}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathView {
    pub path: String,
    /// Records that differed at this path.
    pub count: u64,
    pub serious: u64,
    /// Noise, including serious differences counted as learned noise.
    pub noise: u64,
    pub unexpected: u64,
    /// From calibration: the share of A/A pairs that differed here.
    pub learned_noise_rate: Option<f64>,
    /// The most recent samples whose records are still stored, newest last.
    pub samples: Vec<SampleView>,
}

// === routes ===

#[derive(Debug, Clone)]
struct RouteBook {
    live: Totals,
    calibration: Totals,
    live_paths: PathTable,
    calibration_paths: PathTable,
    /// Live traffic per traffic segment (capped; see the module docs).
    segments: SegmentTally<SegmentBook>,
    last_report: SystemTime,
    /// With replicas: what this replica's Envoys taught since it last
    /// handed it over ([`learned`]); `calibration` above is the fleet's.
    pending: Option<Box<Learned>>,
}

/// One traffic segment of a route: its live totals and differing paths.
#[derive(Debug, Clone, Default)]
struct SegmentBook {
    totals: Totals,
    paths: PathTable,
}

impl RouteBook {
    fn new(now: SystemTime) -> Self {
        Self {
            live: Totals::default(),
            calibration: Totals::default(),
            live_paths: PathTable::default(),
            calibration_paths: PathTable::default(),
            segments: SegmentTally::default(),
            last_report: now,
            pending: None,
        }
    }

    /// The share of calibration pairs that differed at `path`. The
    /// denominator is the calibration pairs compared, or the calibration
    /// records if more of those arrived (counts may lag records by a batch).
    fn learned_rate(&self, path: &str) -> Option<f64> {
        let differed = self.calibration_paths.paths.get(path)?.count;
        let whole = self.calibration.compared.max(self.calibration.records);
        (differed > 0 && whole > 0).then(|| (differed as f64 / whole as f64).min(1.0))
    }

    fn paths_view(&self, table: &PathTable, oldest: u64) -> Vec<PathView> {
        let mut out: Vec<PathView> = table
            .paths
            .iter()
            .map(|(path, p)| PathView {
                path: path.clone(),
                count: p.count,
                serious: p.serious,
                noise: p.noise,
                unexpected: p.unexpected,
                learned_noise_rate: self.learned_rate(path),
                samples: p
                    .samples
                    .iter()
                    .filter(|s| s.id >= oldest)
                    .map(|s| SampleView {
                        id: s.id.to_string(),
                        request_id: s.request_id.clone(),
                        kind: s.kind,
                        bucket: s.bucket,
                        primary: s.primary.clone(),
                        shadow: s.shadow.clone(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.path.cmp(&b.path)));
        out
    }
}

/// One route, as `GET /v1/shadow/routes` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteSummary {
    pub route: String,
    /// Live traffic.
    #[serde(flatten)]
    pub live: Stats,
    /// A/A calibration traffic.
    pub calibration: Stats,
    #[serde(with = "crate::time::serde_unix_ms")]
    pub last_report: SystemTime,
}

/// One route with its differing paths (`GET /v1/shadow/routes/{route}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDetail {
    #[serde(flatten)]
    pub summary: RouteSummary,
    /// Live differing paths, most frequent first.
    pub top_paths: Vec<PathView>,
    /// What differed in calibration (the source of learned noise).
    pub calibration_top_paths: Vec<PathView>,
}

/// One traffic segment of a route (`GET /v1/shadow/routes/{route}/segments`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentView {
    /// The label (`GET|gold`, `gold`, `GET|-` for a missing header), or
    /// `other` for segments beyond the cap.
    pub segment: String,
    #[serde(flatten)]
    pub stats: Stats,
    /// The segment's differing paths, most frequent first.
    pub top_paths: Vec<PathView>,
}

/// A route's live traffic per segment, worst unexpected rate first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteSegments {
    pub route: String,
    /// The most segments kept; later ones are counted under `other`.
    pub max_segments: usize,
    pub segments: Vec<SegmentView>,
}

/// Learned noise at one path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoisePath {
    pub path: String,
    /// Calibration records that differed here.
    pub records: u64,
    pub rate: f64,
}

/// A route's learned noise (`GET /v1/shadow/noise`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteNoise {
    pub route: String,
    pub calibration_compared: u64,
    pub calibration_records: u64,
    /// Highest rate first.
    pub paths: Vec<NoisePath>,
}

/// Book-wide counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BookCounts {
    pub batches: u64,
    /// Pairs compared on accepted routes, live and calibration, summed
    /// from every batch's route counters (it never goes down, unlike the
    /// routes' own totals, which are reset or forgotten).
    pub pairs_compared: u64,
    /// Full records currently stored (samples point at these).
    pub records_stored: usize,
    /// Records the filters dropped because their queues were full: counted,
    /// never seen, so never reclassified by learned noise.
    pub dropped_by_filters: u64,
    /// Records and counters refused because their route name is invalid
    /// or not a route of the current filter config.
    pub rejected: u64,
    /// Counters and records that claimed calibration on a route the control
    /// plane did not put in calibration: counted as live instead.
    pub calibration_refused: u64,
}

// === the record store ===

/// A stored record with what the book concluded about it on arrival.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub id: u64,
    pub node_id: String,
    pub received: SystemTime,
    pub record: MismatchRecord,
    /// Per difference: the learned noise rate that made a serious difference
    /// `noisy` (live records only).
    pub learned: Vec<Option<f64>>,
    /// The record was moved from serious to noise by learned noise.
    pub reclassified: bool,
    /// Who sent it; only a record from an authenticated Envoy may be replayed.
    pub origin: Origin,
    size: usize,
}

/// Where a report came from, as the report service established it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// The sender was not authenticated (plain-text port, or an origin the
    /// service did not establish): its records are shown, never replayed.
    #[default]
    Unverified,
    /// An Envoy whose client certificate the xDS port verified; `identity`
    /// is the identity taken from that certificate.
    Verified { identity: String },
}

impl Origin {
    pub fn is_verified(&self) -> bool {
        matches!(self, Origin::Verified { .. })
    }
}

/// What the control plane's own filter config says about each route: the
/// only routes whose reports are accepted, and whether the control plane
/// itself put the route in A/A calibration. A reporter's `calibration` flag
/// counts only where this says so; a made-up route name is refused, so it
/// can never take a real route's place in the book.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Route name → the control plane configured calibration there.
    routes: BTreeMap<String, bool>,
}

impl RoutePolicy {
    /// From the validated filter config as stored (the one pushed to Envoy).
    pub fn from_config(config: &understudy_core::FilterConfig) -> Self {
        let routes = config
            .routes()
            .iter()
            .map(|r| {
                let calibration = r.shadow.as_ref().is_some_and(|s| s.calibration);
                (r.name.clone(), calibration)
            })
            .collect();
        Self { routes }
    }

    pub fn knows(&self, route: &str) -> bool {
        self.routes.contains_key(route)
    }

    /// The control plane put `route` in calibration.
    pub fn calibration(&self, route: &str) -> bool {
        self.routes.get(route).copied().unwrap_or(false)
    }
}

/// One difference of a stored record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DifferenceView {
    pub path: String,
    pub kind: &'static str,
    pub bucket: ShownBucket,
    pub primary: Option<String>,
    pub shadow: Option<String>,
    pub unexpected: bool,
    /// Set when the difference is shown as `noisy`.
    pub learned_noise_rate: Option<f64>,
}

/// A header as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderView {
    pub name: String,
    pub value: String,
}

/// The recorded request (`GET /v1/shadow/samples/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestView {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub headers: Vec<HeaderView>,
    /// The body as text when it is UTF-8...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// ...and as base64 otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    pub body_truncated: bool,
}

/// The recorded primary response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseView {
    pub status: u32,
    pub headers: Vec<HeaderView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    pub body_truncated: bool,
}

/// A stored record as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordView {
    pub id: String,
    pub route: String,
    pub request_id: String,
    pub node_id: String,
    /// Who sent the record; only a verified one can be replayed.
    pub origin: Origin,
    /// When the filter compared the pair, milliseconds since the Unix epoch.
    pub time: u64,
    #[serde(with = "crate::time::serde_unix_ms")]
    pub received: SystemTime,
    pub calibration: bool,
    /// As the filter judged it: at least one serious difference...
    pub serious: bool,
    pub unexpected: bool,
    /// ...and whether learned noise moved it to noise here.
    pub reclassified_as_noise: bool,
    pub latency_gap_ms: f64,
    /// The expected-divergence rule that matched the request.
    pub segment: Option<String>,
    /// The request's traffic segment (`segment_by`), if the route segments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_segment: Option<String>,
    pub shadow_cluster: String,
    /// Differences found beyond those listed.
    pub omitted: u32,
    pub truncated: Option<String>,
    pub differences: Vec<DifferenceView>,
    pub request: RequestView,
    pub primary: ResponseView,
    /// The shadow's response as recorded; `None` from a filter that
    /// records the primary's only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ResponseView>,
}

/// `name` is a credential header: in [`CREDENTIAL_HEADERS`] or in `extra`
/// (case-insensitive).
pub fn is_credential(name: &str, extra: &[String]) -> bool {
    CREDENTIAL_HEADERS
        .iter()
        .any(|c| c.eq_ignore_ascii_case(name))
        || extra.iter().any(|c| c.eq_ignore_ascii_case(name))
}

fn headers_view(headers: &[understudy_proto::v1::Header], extra: &[String]) -> Vec<HeaderView> {
    headers
        .iter()
        .map(|h| HeaderView {
            name: h.name.clone(),
            value: if is_credential(&h.name, extra) {
                REDACTED.to_owned()
            } else {
                h.value.clone()
            },
        })
        .collect()
}

fn body_view(body: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(body) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (None, Some(base64(body))),
    }
}

/// Standard base64 with padding (RFC 4648 §4): only the API's binary bodies
/// need it, not worth a dependency.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl StoredRecord {
    /// The record as the API shows it; credential headers (the default list
    /// and `extra`) are redacted.
    pub fn view(&self, extra: &[String]) -> RecordView {
        let r = &self.record;
        let request = r.request.clone().unwrap_or_default();
        let primary = r.primary.clone().unwrap_or_default();
        let (req_body, req_b64) = body_view(&request.body);
        let response = |recorded: &understudy_proto::v1::RecordedResponse| {
            let (body, body_base64) = body_view(&recorded.body);
            ResponseView {
                status: recorded.status,
                headers: headers_view(&recorded.headers, extra),
                body,
                body_base64,
                body_truncated: recorded.body_truncated,
            }
        };
        RecordView {
            id: self.id.to_string(),
            route: r.route.clone(),
            request_id: r.request_id.clone(),
            node_id: self.node_id.clone(),
            origin: self.origin.clone(),
            time: r.time_unix_ms,
            received: self.received,
            calibration: r.calibration,
            serious: r.serious,
            unexpected: r.unexpected,
            reclassified_as_noise: self.reclassified,
            latency_gap_ms: r.latency_gap_us as f64 / 1000.0,
            segment: (!r.segment.is_empty()).then(|| r.segment.clone()),
            traffic_segment: (!r.traffic_segment.is_empty()).then(|| {
                clip(
                    &r.traffic_segment,
                    understudy_core::segment::MAX_LABEL_BYTES,
                )
            }),
            shadow_cluster: r.shadow_cluster.clone(),
            omitted: r.omitted,
            truncated: (!r.truncated.is_empty()).then(|| r.truncated.clone()),
            differences: r
                .differences
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let learned = self.learned.get(i).copied().flatten();
                    DifferenceView {
                        path: d.path.clone(),
                        kind: kind_name(d),
                        bucket: shown_bucket(d, learned),
                        primary: (!d.primary.is_empty()).then(|| d.primary.clone()),
                        shadow: (!d.shadow.is_empty()).then(|| d.shadow.clone()),
                        unexpected: d.unexpected,
                        learned_noise_rate: learned,
                    }
                })
                .collect(),
            request: RequestView {
                method: request.method,
                path: request.path,
                authority: request.authority,
                headers: headers_view(&request.headers, extra),
                body: req_body,
                body_base64: req_b64,
                body_truncated: request.body_truncated,
            },
            primary: response(&primary),
            shadow: r.shadow.as_ref().map(response),
        }
    }
}

/// One replay attempt, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayAudit {
    #[serde(with = "crate::time::serde_unix_ms")]
    pub time: SystemTime,
    /// The API caller who asked.
    pub actor: String,
    pub sample: String,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    /// `matched`, `differs`, or `refused: <why>` / `failed: <why>`.
    pub outcome: String,
}

// === the book ===

/// What [`ShadowBook::ingest`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Mismatch records stored and counted.
    pub accepted: u64,
    /// Records and route counters refused (invalid route name).
    pub rejected: u64,
}

/// Shadow comparison results from every filter, shared by the gRPC service
/// and the API.
#[derive(Default)]
pub struct ShadowBook {
    inner: Mutex<Book>,
    /// The store whose filter config decides which routes exist and which
    /// are in calibration ([`ShadowBook::follow`]); without one (unit tests)
    /// every valid route name is accepted and the reporter's flag is taken.
    config: OnceLock<Store>,
}

#[derive(Debug, Default)]
struct Book {
    /// Keyed by route name; the hook for per-rollout aggregation (module docs).
    routes: BTreeMap<String, RouteBook>,
    records: VecDeque<StoredRecord>,
    record_bytes: usize,
    /// The id the next record gets; ids only grow, so the store is sorted.
    next_id: u64,
    batches: u64,
    pairs_compared: u64,
    dropped: u64,
    rejected: u64,
    calibration_refused: u64,
    replays: VecDeque<ReplayAudit>,
    /// The policy and the snapshot generation it was built from.
    policy: Option<(u64, RoutePolicy)>,
    /// Replicas share learned noise ([`ShadowBook::share_learning`]).
    sharing: bool,
}

impl Book {
    fn route_entry<'a>(
        routes: &'a mut BTreeMap<String, RouteBook>,
        policy: Option<&RoutePolicy>,
        (name, sharing): (&str, bool),
        now: SystemTime,
    ) -> &'a mut RouteBook {
        if !routes.contains_key(name) && routes.len() >= MAX_ROUTES {
            // Routes no longer configured go first; a configured route only
            // makes room for another configured one.
            let oldest = routes
                .iter()
                .min_by_key(|(k, r)| (policy.is_some_and(|p| p.knows(k)), r.last_report))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                routes.remove(&k);
            }
        }
        let route = routes
            .entry(name.to_owned())
            .or_insert_with(|| RouteBook::new(now));
        route.last_report = now;
        if sharing && route.pending.is_none() {
            route.pending = Some(Box::default());
        }
        route
    }

    /// The smallest id still stored; samples below it point at evicted records.
    fn oldest_id(&self) -> u64 {
        self.records.front().map_or(self.next_id, |r| r.id)
    }

    fn add_record(
        &mut self,
        record: MismatchRecord,
        node_id: &str,
        origin: &Origin,
        now: SystemTime,
    ) {
        self.next_id = self.next_id.saturating_add(1);
        let id = self.next_id;
        let policy = self.policy.as_ref().map(|(_, p)| p);
        let route = Self::route_entry(&mut self.routes, policy, (&record.route, self.sharing), now);
        let calibration = record.calibration;
        let learned: Vec<Option<f64>> = record
            .differences
            .iter()
            .map(|d| {
                (!calibration && is_serious(d))
                    .then(|| route.learned_rate(&path_key(&d.path)))
                    .flatten()
            })
            .collect();
        // A record with unlisted differences (omitted, or a comparison cut
        // short) may hide a serious one that was never learned: keep it.
        let complete = record.omitted == 0 && record.truncated.is_empty();
        let all_learned = |pick: &dyn Fn(&understudy_proto::v1::Difference) -> bool| {
            let mut any = false;
            for (d, l) in record.differences.iter().zip(&learned) {
                if pick(d) {
                    any = true;
                    if l.is_none() {
                        return false;
                    }
                }
            }
            any
        };
        let reclassified =
            !calibration && complete && record.serious && all_learned(&|d| is_serious(d));
        let unexpected_learned =
            !calibration && complete && record.unexpected && all_learned(&|d| d.unexpected);

        if calibration && let Some(pending) = route.pending.as_mut() {
            pending.note_record(&record);
        }
        let (totals, table) = if calibration {
            (&mut route.calibration, &mut route.calibration_paths)
        } else {
            (&mut route.live, &mut route.live_paths)
        };
        totals.add_record(reclassified, unexpected_learned);
        note_paths(
            table,
            (MAX_PATHS, MAX_SAMPLES_PER_PATH),
            &record,
            &learned,
            id,
        );
        // The record's segment sees the same decision; calibration is not
        // segmented (module docs).
        if !calibration && !record.traffic_segment.is_empty() {
            let segment = route.segments.entry(&record.traffic_segment);
            segment.totals.add_record(reclassified, unexpected_learned);
            note_paths(
                &mut segment.paths,
                (MAX_SEGMENT_PATHS, MAX_SEGMENT_SAMPLES),
                &record,
                &learned,
                id,
            );
        }

        let size = record.encoded_len();
        self.record_bytes = self.record_bytes.saturating_add(size);
        self.records.push_back(StoredRecord {
            id,
            node_id: clip(node_id, MAX_NODE_CHARS),
            received: now,
            record,
            learned,
            reclassified,
            origin: origin.clone(),
            size,
        });
        while self.records.len() > MAX_RECORDS || self.record_bytes > MAX_RECORD_BYTES {
            let Some(old) = self.records.pop_front() else {
                break;
            };
            self.record_bytes = self.record_bytes.saturating_sub(old.size);
        }
    }
}

/// Counts `record`'s differing paths in `table` (each path once), keeping
/// at most `max.0` paths of `max.1` samples each (none when `max.1` is 0).
fn note_paths(
    table: &mut PathTable,
    max: (usize, usize),
    record: &MismatchRecord,
    learned: &[Option<f64>],
    id: u64,
) {
    let mut seen = BTreeSet::new();
    for (d, l) in record.differences.iter().zip(learned) {
        let path = path_key(&d.path);
        if !seen.insert(path.clone()) {
            continue;
        }
        let bucket = shown_bucket(d, *l);
        let p = table.entry(&path, max.0);
        p.count = p.count.saturating_add(1);
        p.last_seen = id;
        if bucket == ShownBucket::Serious {
            p.serious = p.serious.saturating_add(1);
        } else {
            p.noise = p.noise.saturating_add(1);
        }
        if d.unexpected && l.is_none() {
            p.unexpected = p.unexpected.saturating_add(1);
        }
        if max.1 == 0 {
            continue;
        }
        while p.samples.len() >= max.1 {
            p.samples.pop_front();
        }
        p.samples.push_back(Sample {
            id,
            request_id: record.request_id.clone(),
            kind: kind_name(d),
            bucket,
            primary: sample_value(&d.primary),
            shadow: sample_value(&d.shadow),
        });
    }
}

/// The bucket is an enum on the wire; anything but noise (including an
/// unknown value) is treated as serious, so nothing is hidden by mistake.
fn is_serious(d: &understudy_proto::v1::Difference) -> bool {
    difference::Bucket::try_from(d.bucket) != Ok(difference::Bucket::Noise)
}

/// The kind as the core names it ([`understudy_core::compare::DiffKind::name`]),
/// `unspecified` for a number no kind has (a peer may send any).
pub fn kind_name(d: &understudy_proto::v1::Difference) -> &'static str {
    understudy_proto::convert::diff_kind(d).map_or("unspecified", |k| k.name())
}

/// The bucket a stored difference is shown with.
pub fn shown_bucket(d: &understudy_proto::v1::Difference, learned: Option<f64>) -> ShownBucket {
    match (is_serious(d), learned) {
        (true, None) => ShownBucket::Serious,
        (true, Some(_)) => ShownBucket::Noisy,
        (false, _) => ShownBucket::Noise,
    }
}

fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

fn path_key(path: &str) -> String {
    clip(path, MAX_PATH_CHARS)
}

/// Values travel as JSON text, which is never empty; empty means absent.
fn sample_value(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| clip(v, MAX_SAMPLE_VALUE_CHARS))
}

/// Route names come from the filter config, which allows only these.
fn valid_route(name: &str) -> bool {
    understudy_core::config::validate_name("route", name).is_ok()
}

impl ShadowBook {
    /// Adds one batch received at `now`: route counters first, then the
    /// records, so a record's reclassification applies to counts that
    /// include it.
    ///
    /// **Noise learning.** Calibration records teach each (route, path) a
    /// noise rate. In a live record, a serious difference at a path whose
    /// learned rate is above zero is shown as `noisy`. A live record whose
    /// serious differences are *all* noisy (and whose differences were all
    /// listed) moves from `mismatched_serious` to `mismatched_noise`; one
    /// whose unexpected differences are all noisy leaves `unexpected`. Both
    /// saturate at zero. Only records that reach the control plane can be
    /// reclassified: those the filters dropped are counted in
    /// `dropped_by_filters` and stay serious.
    ///
    /// **Trust.** With a followed store, only routes of the current filter
    /// config are accepted, and a counter or record counts as calibration
    /// only if the reporter says so *and* the control plane configured
    /// calibration on that route: a reporter cannot teach noise, and a
    /// record the control plane thinks is live stays live (serious).
    ///
    /// The batch's origin is [`Origin::Unverified`]; the report service
    /// calls [`ShadowBook::ingest_from`] with the verified peer identity.
    pub fn ingest(&self, batch: ReportBatch, now: SystemTime) -> Ingested {
        self.ingest_from(batch, Origin::Unverified, now)
    }

    /// [`ShadowBook::ingest`] of a batch whose sender the report service
    /// established: records keep `origin`, and only verified ones replay.
    pub fn ingest_from(&self, batch: ReportBatch, origin: Origin, now: SystemTime) -> Ingested {
        self.ingest_batch(batch, origin, now, true)
    }

    /// [`ShadowBook::ingest_from`] of a batch another replica received
    /// (read back from the database): its live part counts here, but its
    /// calibration is that replica's to learn and share
    /// ([`ShadowBook::share_learning`]), so it is left out rather than
    /// counted twice.
    pub fn ingest_read_back(
        &self,
        batch: ReportBatch,
        origin: Origin,
        now: SystemTime,
    ) -> Ingested {
        self.ingest_batch(batch, origin, now, false)
    }

    fn ingest_batch(
        &self,
        batch: ReportBatch,
        origin: Origin,
        now: SystemTime,
        learn: bool,
    ) -> Ingested {
        let mut book = self.lock();
        let sharing = book.sharing;
        self.refresh_policy(&mut book);
        book.batches = book.batches.saturating_add(1);
        book.dropped = book.dropped.saturating_add(batch.dropped);
        let mut out = Ingested {
            accepted: 0,
            rejected: 0,
        };
        let policy = book.policy.as_ref().map(|(_, p)| p.clone());
        let accepts =
            |route: &str| valid_route(route) && policy.as_ref().is_none_or(|p| p.knows(route));
        let calibration_allowed =
            |route: &str| policy.as_ref().is_none_or(|p| p.calibration(route));
        let mut calibration_refused = 0u64;
        for counts in &batch.routes {
            if !accepts(&counts.route) {
                out.rejected = out.rejected.saturating_add(1);
                continue;
            }
            book.pairs_compared = book.pairs_compared.saturating_add(counts.compared);
            let calibration = counts.calibration && calibration_allowed(&counts.route);
            if counts.calibration && !calibration {
                calibration_refused = calibration_refused.saturating_add(1);
            }
            if calibration && !learn {
                continue;
            }
            let route = Book::route_entry(
                &mut book.routes,
                policy.as_ref(),
                (&counts.route, sharing),
                now,
            );
            if calibration {
                route.calibration.add_counts(counts);
                if let Some(pending) = route.pending.as_mut() {
                    pending.note_counts(counts);
                }
            } else {
                route.live.add_counts(counts);
                for c in &counts.segments {
                    route.segments.entry(&c.segment).totals.add_segment(c);
                }
            }
        }
        for mut record in batch.mismatches {
            if !accepts(&record.route) {
                out.rejected = out.rejected.saturating_add(1);
                continue;
            }
            if record.calibration && !calibration_allowed(&record.route) {
                record.calibration = false;
                calibration_refused = calibration_refused.saturating_add(1);
            }
            if record.calibration && !learn {
                continue;
            }
            book.add_record(record, &batch.node_id, &origin, now);
            out.accepted = out.accepted.saturating_add(1);
        }
        book.rejected = book.rejected.saturating_add(out.rejected);
        book.calibration_refused = book.calibration_refused.saturating_add(calibration_refused);
        out
    }

    /// Decides routes and calibration from `store`'s filter config from now
    /// on (the first call wins; the engine makes it at start).
    pub fn follow(&self, store: Store) {
        let _ = self.config.set(store);
    }

    /// Rebuilds the policy when the store published a new snapshot.
    fn refresh_policy(&self, book: &mut Book) {
        let Some(store) = self.config.get() else {
            return;
        };
        let generation = store.snapshot().generation;
        if book.policy.as_ref().is_some_and(|(g, _)| *g == generation) {
            return;
        }
        let policy = RoutePolicy::from_config(store.current().filter.config.config());
        book.policy = Some((generation, policy));
    }

    /// Appends a replay (done or refused) to the audit log.
    pub fn audit_replay(&self, entry: ReplayAudit) {
        tracing::info!(actor = %entry.actor, sample = %entry.sample, cluster = ?entry.cluster, outcome = %entry.outcome, "shadow replay");
        let mut book = self.lock();
        if book.replays.len() >= MAX_REPLAY_AUDIT {
            book.replays.pop_front();
        }
        book.replays.push_back(entry);
    }

    /// The replay audit log, oldest first.
    pub fn replays(&self) -> Vec<ReplayAudit> {
        self.lock().replays.iter().cloned().collect()
    }

    /// Every route, by name.
    pub fn summaries(&self) -> Vec<RouteSummary> {
        let book = self.lock();
        book.routes
            .iter()
            .map(|(name, r)| summary(name, r))
            .collect()
    }

    /// One route with its top paths; samples of evicted records are dropped.
    pub fn route(&self, name: &str) -> Option<RouteDetail> {
        let mut book = self.lock();
        let oldest = book.oldest_id();
        let route = book.routes.get_mut(name)?;
        for table in [&mut route.live_paths, &mut route.calibration_paths] {
            for p in table.paths.values_mut() {
                p.samples.retain(|s| s.id >= oldest);
            }
        }
        Some(RouteDetail {
            summary: summary(name, route),
            top_paths: route.paths_view(&route.live_paths, oldest),
            calibration_top_paths: route.paths_view(&route.calibration_paths, oldest),
        })
    }

    /// A route's live traffic per segment, worst unexpected rate first (then
    /// most compared); samples of evicted records are left out. `None`: no
    /// reports for the route. Empty when the route does not segment.
    pub fn segments(&self, name: &str) -> Option<RouteSegments> {
        let book = self.lock();
        let oldest = book.oldest_id();
        let route = book.routes.get(name)?;
        let mut segments: Vec<SegmentView> = route
            .segments
            .iter()
            .map(|(label, s)| SegmentView {
                segment: label.clone(),
                stats: s.totals.stats(),
                top_paths: route.paths_view(&s.paths, oldest),
            })
            .collect();
        segments.sort_by(|a, b| {
            let rate = |v: &SegmentView| v.stats.unexpected_rate.unwrap_or(0.0);
            rate(b)
                .total_cmp(&rate(a))
                .then_with(|| b.stats.compared.cmp(&a.stats.compared))
                .then_with(|| a.segment.cmp(&b.segment))
        });
        Some(RouteSegments {
            route: name.to_owned(),
            max_segments: understudy_core::segment::MAX_SEGMENTS,
            segments,
        })
    }

    /// A route's live counts per segment, as the judge reads them (learned
    /// noise applied). Empty for an unknown or unsegmented route.
    pub fn segment_counts(&self, name: &str) -> BTreeMap<String, PairCounts> {
        let book = self.lock();
        book.routes.get(name).map_or_else(BTreeMap::new, |r| {
            r.segments
                .iter()
                .map(|(label, s)| {
                    (
                        label.clone(),
                        PairCounts {
                            compared: s.totals.compared,
                            serious: s.totals.mismatched_serious,
                            unexpected: s.totals.unexpected,
                        },
                    )
                })
                .collect()
        })
    }

    /// A stored record by id, if it has not been evicted.
    pub fn record(&self, id: u64) -> Option<StoredRecord> {
        let book = self.lock();
        let i = book.records.binary_search_by_key(&id, |r| r.id).ok()?;
        book.records.get(i).cloned()
    }

    /// Learned noise per route and path (routes with calibration data only).
    pub fn noise(&self) -> Vec<RouteNoise> {
        let book = self.lock();
        book.routes
            .iter()
            .filter(|(_, r)| r.calibration.compared > 0 || r.calibration.records > 0)
            .map(|(name, r)| {
                let mut paths: Vec<NoisePath> = r
                    .calibration_paths
                    .paths
                    .iter()
                    .filter_map(|(path, p)| {
                        r.learned_rate(path).map(|rate| NoisePath {
                            path: path.clone(),
                            records: p.count,
                            rate,
                        })
                    })
                    .collect();
                paths.sort_by(|a, b| b.rate.total_cmp(&a.rate).then_with(|| a.path.cmp(&b.path)));
                RouteNoise {
                    route: name.clone(),
                    calibration_compared: r.calibration.compared,
                    calibration_records: r.calibration.records,
                    paths,
                }
            })
            .collect()
    }

    /// The book has `route` (some filter reported it, or learned noise
    /// for it arrived from another replica).
    pub fn knows(&self, route: &str) -> bool {
        self.lock().routes.contains_key(route)
    }

    /// Forgets a route's calibration counts and learned noise (after the
    /// new version changed, say). Live counts already reclassified stay as
    /// they are. `false` if the route is unknown.
    pub fn forget_noise(&self, route: &str) -> bool {
        let mut book = self.lock();
        match book.routes.get_mut(route) {
            Some(r) => {
                r.calibration = Totals::default();
                r.calibration_paths = PathTable::default();
                if let Some(pending) = r.pending.as_mut() {
                    **pending = Learned::default();
                }
                true
            }
            None => false,
        }
    }

    /// Starts a route's live measurement over: its live counters and top
    /// differing paths go back to zero (to measure a new rule set without
    /// renaming the route). Calibration data and learned noise stay (see
    /// [`ShadowBook::forget_noise`]), and stored records stay addressable by
    /// id. `false` if the route is unknown.
    pub fn reset_live(&self, route: &str) -> bool {
        let mut book = self.lock();
        match book.routes.get_mut(route) {
            Some(r) => {
                r.live = Totals::default();
                r.live_paths = PathTable::default();
                r.segments = SegmentTally::default();
                true
            }
            None => false,
        }
    }

    /// Replicas share learned noise from now on: each route keeps what
    /// this replica's Envoys teach as pending ([`ShadowBook::take_learned`])
    /// until the fleet's sum comes back ([`ShadowBook::set_learned`]).
    /// Batches read back from other replicas teach nothing here
    /// ([`ShadowBook::ingest_read_back`]).
    pub fn share_learning(&self) {
        let mut book = self.lock();
        book.sharing = true;
        for r in book.routes.values_mut() {
            r.pending.get_or_insert_with(Box::default);
        }
    }

    /// What this replica's Envoys taught since the last call, per route
    /// (routes that learned nothing are left out). The book's view keeps
    /// it; the caller adds it to this replica's share.
    pub fn take_learned(&self) -> Vec<(String, Learned)> {
        let mut book = self.lock();
        book.routes
            .iter_mut()
            .filter_map(|(name, r)| {
                let pending = r.pending.as_mut()?;
                (!pending.is_empty()).then(|| (name.clone(), std::mem::take(&mut **pending)))
            })
            .collect()
    }

    /// A route's calibration is now `fleet` (every replica's share, with
    /// what this replica took and has not yet shared) plus what is pending
    /// here. A route the book does not have is added if the filter config
    /// still has it; `false` if it was not.
    pub fn set_learned(&self, route: &str, fleet: &Learned, now: SystemTime) -> bool {
        let mut book = self.lock();
        self.refresh_policy(&mut book);
        let known = book.policy.as_ref().is_none_or(|(_, p)| p.knows(route));
        if !book.routes.contains_key(route) && (fleet.is_empty() || !known || !valid_route(route)) {
            return false;
        }
        let sharing = book.sharing;
        let policy = book.policy.as_ref().map(|(_, p)| p.clone());
        let r = match book.routes.get_mut(route) {
            Some(r) => r,
            None => Book::route_entry(&mut book.routes, policy.as_ref(), (route, sharing), now),
        };
        let mut sum = fleet.clone();
        if let Some(pending) = r.pending.as_ref() {
            sum.add(pending);
        }
        r.calibration_paths = sum.table(&r.calibration_paths);
        r.calibration = sum.totals;
        true
    }

    pub fn counts(&self) -> BookCounts {
        let book = self.lock();
        BookCounts {
            batches: book.batches,
            pairs_compared: book.pairs_compared,
            records_stored: book.records.len(),
            dropped_by_filters: book.dropped,
            rejected: book.rejected,
            calibration_refused: book.calibration_refused,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        // Every change is a few counter updates; a panic mid-way cannot leave
        // anything worse than a count off by one, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn summary(name: &str, r: &RouteBook) -> RouteSummary {
    RouteSummary {
        route: name.to_owned(),
        live: r.live.stats(),
        calibration: r.calibration.stats(),
        last_report: r.last_report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use understudy_proto::v1::Difference;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn counts(route: &str, calibration: bool, c: [u64; 5]) -> RouteCounts {
        RouteCounts {
            route: route.into(),
            calibration,
            compared: c[0],
            matched: c[1],
            mismatched_serious: c[2],
            mismatched_noise: c[3],
            unexpected: c[4],
            skipped: Default::default(),
            latency_gap_us_sum: 0,
            segments: Vec::new(),
        }
    }

    fn seg(label: &str, c: [u64; 5]) -> SegmentCounts {
        SegmentCounts {
            segment: label.into(),
            compared: c[0],
            matched: c[1],
            mismatched_serious: c[2],
            mismatched_noise: c[3],
            unexpected: c[4],
        }
    }

    #[test]
    fn segments_are_kept_per_route_with_their_paths() {
        let book = ShadowBook::default();
        let mut c = counts("api", false, [100, 80, 20, 0, 20]);
        c.segments = vec![
            seg("gold", [30, 10, 20, 0, 20]),
            seg("silver", [70, 70, 0, 0, 0]),
        ];
        let mut r = record("api", false, vec![diff("$.total", true, true)]);
        r.traffic_segment = "gold".into();
        book.ingest(batch(vec![c], vec![r]), T0);
        let s = book.segments("api").unwrap();
        let labels: Vec<&str> = s.segments.iter().map(|v| v.segment.as_str()).collect();
        assert_eq!(labels, ["gold", "silver"], "worst first");
        let gold = &s.segments[0];
        assert_eq!(
            (
                gold.stats.compared,
                gold.stats.unexpected,
                gold.stats.records
            ),
            (30, 20, 1)
        );
        assert_eq!(gold.top_paths[0].path, "$.total");
        assert_eq!(gold.top_paths[0].samples.len(), 1);
        let id: u64 = gold.top_paths[0].samples[0].id.parse().unwrap();
        let view = book.record(id).unwrap().view(&[]);
        assert_eq!(view.traffic_segment.as_deref(), Some("gold"));
        assert!(s.segments[1].top_paths.is_empty());
        // The route's totals are what the filter counted, not a sum of segments.
        assert_eq!(book.summaries()[0].live.compared, 100);
        let counts = book.segment_counts("api");
        assert_eq!(
            counts["gold"],
            PairCounts {
                compared: 30,
                serious: 20,
                unexpected: 20
            }
        );
        // A reset starts the segments over with the route's live counts.
        assert!(book.reset_live("api"));
        assert!(book.segments("api").unwrap().segments.is_empty());
    }

    #[test]
    fn a_client_inventing_segments_is_folded_into_other_and_legitimate_ones_stay_exact() {
        use understudy_core::segment::{MAX_SEGMENTS, OTHER};
        let book = ShadowBook::default();
        let mut c = counts("api", false, [20, 20, 0, 0, 0]);
        c.segments = vec![
            seg("gold", [10, 10, 0, 0, 0]),
            seg("silver", [10, 10, 0, 0, 0]),
        ];
        book.ingest(batch(vec![c], vec![]), T0);
        // 10,000 distinct values, in batches, plus labels no filter makes.
        for chunk in 0..100 {
            let mut c = counts("api", false, [102, 102, 0, 0, 0]);
            c.segments = (0..100)
                .map(|i| seg(&format!("t{chunk}-{i}"), [1, 1, 0, 0, 0]))
                .chain([
                    seg("gold", [1, 1, 0, 0, 0]),
                    seg(&"x".repeat(10_000), [1, 1, 0, 0, 0]),
                ])
                .collect();
            let mut r = record("api", false, vec![diff(&format!("$.p{chunk}"), true, true)]);
            r.traffic_segment = format!("bad label {chunk}\n");
            book.ingest(batch(vec![c], vec![r]), T0);
        }
        let s = book.segments("api").unwrap();
        assert_eq!(s.segments.len(), MAX_SEGMENTS + 1);
        let by: BTreeMap<&str, &SegmentView> =
            s.segments.iter().map(|v| (v.segment.as_str(), v)).collect();
        assert_eq!(by["gold"].stats.compared, 110);
        assert_eq!(by["silver"].stats.compared, 10);
        let kept: u64 = s.segments.iter().map(|v| v.stats.compared).sum();
        assert_eq!(kept, 20 + 100 * 102, "nothing is lost, only folded");
        let other = by[OTHER];
        assert_eq!(other.stats.records, 100);
        assert!(other.top_paths.len() <= MAX_SEGMENT_PATHS);
        assert!(
            other
                .top_paths
                .iter()
                .all(|p| p.samples.len() <= MAX_SEGMENT_SAMPLES)
        );
    }

    fn diff(path: &str, serious: bool, unexpected: bool) -> Difference {
        Difference {
            path: path.into(),
            kind: difference::Kind::ValueChange as i32,
            bucket: if serious {
                difference::Bucket::Serious
            } else {
                difference::Bucket::Noise
            } as i32,
            primary: "1".into(),
            shadow: "2".into(),
            unexpected,
        }
    }

    fn record(route: &str, calibration: bool, diffs: Vec<Difference>) -> MismatchRecord {
        MismatchRecord {
            route: route.into(),
            request_id: format!("req-{}", diffs.len()),
            serious: diffs.iter().any(is_serious),
            unexpected: diffs.iter().any(|d| d.unexpected),
            differences: diffs,
            calibration,
            ..Default::default()
        }
    }

    fn batch(routes: Vec<RouteCounts>, mismatches: Vec<MismatchRecord>) -> ReportBatch {
        ReportBatch {
            node_id: "envoy-1".into(),
            mismatches,
            dropped: 0,
            routes,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn wilson_matches_known_values() {
        // Reference values: Wilson (1927) / statsmodels proportion_confint(method="wilson").
        for (x, n, lo, hi) in [
            (95, 100, 0.888_249_530_768_080_8, 0.978_456_320_845_631_9),
            (8, 10, 0.490_162_471_536_641_83, 0.943_317_848_545_624_7),
            (1, 2, 0.094_531_205_734_230_74, 0.905_468_794_265_769_3),
            (10, 10, 0.722_467_200_137_110_7, 1.0),
            (0, 10, 0.0, 0.277_532_799_862_889_2),
        ] {
            let [l, h] = wilson_95(x, n).unwrap();
            assert!(close(l, lo) && close(h, hi), "{x}/{n}: [{l}, {h}]");
        }
        assert_eq!(wilson_95(0, 0), None);
        // More successes than trials (inconsistent reports) is clamped.
        assert_eq!(wilson_95(12, 10).unwrap()[1], 1.0);
    }

    #[test]
    fn no_data_means_null_rates_not_healthy() {
        let book = ShadowBook::default();
        let mut skipped = counts("api", false, [0; 5]);
        skipped.skipped.insert("shadow_timeout".into(), 4);
        book.ingest(batch(vec![skipped], vec![]), T0);
        let s = &book.summaries()[0];
        assert_eq!(s.live.compared, 0);
        assert_eq!(s.live.skipped["shadow_timeout"], 4);
        for r in [
            s.live.match_rate,
            s.live.exact_match_rate,
            s.live.serious_rate,
            s.live.unexpected_rate,
            s.live.mean_latency_gap_ms,
        ] {
            assert_eq!(r, None);
        }
        assert_eq!(s.live.match_rate_ci, None);
        assert_eq!(s.calibration.match_rate, None);
        let json = serde_json::to_value(s).unwrap();
        assert!(json["match_rate"].is_null() && json["match_rate_ci"].is_null());
        assert!(json["calibration"]["match_rate"].is_null());
    }

    #[test]
    fn counts_and_records_aggregate_per_route_and_side() {
        let book = ShadowBook::default();
        let mut c1 = counts("api", false, [60, 50, 6, 4, 3]);
        c1.latency_gap_us_sum = 120_000;
        c1.skipped.insert("shadow_timeout".into(), 2);
        let mut c2 = counts("api", false, [40, 35, 4, 1, 2]);
        c2.latency_gap_us_sum = -20_000;
        c2.skipped.insert("shadow_timeout".into(), 1);
        c2.skipped.insert("skipped_too_large".into(), 5);
        let cal = counts("api", true, [10, 10, 0, 0, 0]);
        let mut b = batch(
            vec![c1, cal],
            vec![record("api", false, vec![diff("$.total", true, true)])],
        );
        b.dropped = 7;
        let got = book.ingest(b, T0);
        assert_eq!(
            got,
            Ingested {
                accepted: 1,
                rejected: 0
            }
        );
        book.ingest(batch(vec![c2], vec![]), T0 + Duration::from_secs(5));
        let s = book.summaries().remove(0);
        assert_eq!(s.route, "api");
        let l = &s.live;
        assert_eq!(
            (
                l.compared,
                l.matched,
                l.mismatched_serious,
                l.mismatched_noise,
                l.unexpected
            ),
            (100, 85, 10, 5, 5)
        );
        assert_eq!(l.skipped["shadow_timeout"], 3);
        assert_eq!(l.skipped["skipped_too_large"], 5);
        assert!(close(l.serious_rate.unwrap(), 0.10));
        assert!(close(l.match_rate.unwrap(), 0.90), "noise-only pairs match");
        assert!(close(l.exact_match_rate.unwrap(), 0.85));
        assert!(close(l.unexpected_rate.unwrap(), 0.05));
        assert!(
            close(l.mean_latency_gap_ms.unwrap(), 1.0),
            "100 ms / 100 pairs"
        );
        let [lo, hi] = l.match_rate_ci.unwrap();
        assert!(lo < 0.9 && hi > 0.9 && close(lo, wilson_95(90, 100).unwrap()[0]));
        assert_eq!(l.records, 1);
        assert_eq!(s.calibration.compared, 10);
        assert_eq!(s.calibration.match_rate, Some(1.0));
        assert_eq!(s.last_report, T0 + Duration::from_secs(5));
        let c = book.counts();
        assert_eq!(
            (c.batches, c.records_stored, c.dropped_by_filters),
            (2, 1, 7)
        );
        assert_eq!(c.pairs_compared, 110, "live and calibration pairs");
    }

    #[test]
    fn top_paths_count_records_and_keep_samples() {
        let book = ShadowBook::default();
        let mut recs = Vec::new();
        for i in 0..8 {
            let mut r = record(
                "api",
                false,
                vec![diff("$.total", true, true), diff("$.meta.at", false, false)],
            );
            r.request_id = format!("r{i}");
            recs.push(r);
        }
        recs.push(record("api", false, vec![diff("$.tax", true, false)]));
        book.ingest(batch(vec![], recs), T0);
        let d = book.route("api").unwrap();
        let paths: Vec<(&str, u64)> = d
            .top_paths
            .iter()
            .map(|p| (p.path.as_str(), p.count))
            .collect();
        assert_eq!(paths, [("$.meta.at", 8), ("$.total", 8), ("$.tax", 1)]);
        let total = &d.top_paths[1];
        assert_eq!((total.serious, total.noise, total.unexpected), (8, 0, 8));
        assert_eq!(d.top_paths[0].noise, 8);
        assert_eq!(total.samples.len(), MAX_SAMPLES_PER_PATH);
        // The most recent samples are kept, newest last.
        assert_eq!(total.samples[4].request_id, "r7");
        assert_eq!(total.samples[4].id, "8");
        assert_eq!(total.samples[4].kind, "value_change");
        assert_eq!(total.samples[4].bucket, ShownBucket::Serious);
        assert_eq!(total.samples[4].primary.as_deref(), Some("1"));
        let stored = book.record(8).unwrap();
        assert_eq!(stored.record.request_id, "r7");
        assert!(book.record(99).is_none());
        assert!(book.route("nope").is_none());
    }

    #[test]
    fn invalid_route_names_are_refused() {
        let book = ShadowBook::default();
        let got = book.ingest(
            batch(
                vec![counts("bad name", false, [1, 1, 0, 0, 0])],
                vec![record("", false, vec![]), record("ok", false, vec![])],
            ),
            T0,
        );
        assert_eq!(
            got,
            Ingested {
                accepted: 1,
                rejected: 2
            }
        );
        assert_eq!(book.counts().rejected, 2);
        assert_eq!(book.summaries().len(), 1);
    }

    #[test]
    fn tables_are_bounded() {
        let book = ShadowBook::default();
        // Routes: the least recently reported is forgotten.
        for i in 0..=MAX_ROUTES {
            let at = T0 + Duration::from_secs(i as u64);
            book.ingest(
                batch(vec![counts(&format!("r{i}"), false, [1; 5])], vec![]),
                at,
            );
        }
        let names: Vec<String> = book.summaries().into_iter().map(|s| s.route).collect();
        assert_eq!(names.len(), MAX_ROUTES);
        assert!(!names.contains(&"r0".to_owned()) && names.contains(&"r256".to_owned()));

        // Paths: a frequent path survives, the lowest count makes room.
        let book = ShadowBook::default();
        let hot = || record("api", false, vec![diff("$.hot", true, false)]);
        book.ingest(batch(vec![], vec![hot(), hot()]), T0);
        for i in 0..MAX_PATHS + 10 {
            book.ingest(
                batch(
                    vec![],
                    vec![record(
                        "api",
                        false,
                        vec![diff(&format!("$.p{i}"), true, false)],
                    )],
                ),
                T0,
            );
        }
        let d = book.route("api").unwrap();
        assert_eq!(d.top_paths.len(), MAX_PATHS);
        assert_eq!(d.top_paths[0].path, "$.hot");
        assert!(
            d.top_paths
                .iter()
                .any(|p| p.path == format!("$.p{}", MAX_PATHS + 9))
        );

        // Records: FIFO; samples of evicted records disappear when read.
        let book = ShadowBook::default();
        let recs: Vec<_> = (0..MAX_RECORDS + 3).map(|_| hot()).collect();
        book.ingest(batch(vec![], recs), T0);
        assert_eq!(book.counts().records_stored, MAX_RECORDS);
        assert!(book.record(3).is_none() && book.record(4).is_some());
        let total = MAX_RECORDS as u64 + 3;
        assert!(book.record(total).is_some());
        let d = book.route("api").unwrap();
        assert_eq!(d.top_paths[0].count, total);
        assert_eq!(d.top_paths[0].samples.len(), MAX_SAMPLES_PER_PATH);

        // A path whose samples were all evicted keeps its counts, not its samples.
        let book = ShadowBook::default();
        book.ingest(
            batch(
                vec![],
                vec![record("api", false, vec![diff("$.rare", true, false)])],
            ),
            T0,
        );
        let recs: Vec<_> = (0..MAX_RECORDS).map(|_| hot()).collect();
        book.ingest(batch(vec![], recs), T0);
        let d = book.route("api").unwrap();
        let rare = d.top_paths.iter().find(|p| p.path == "$.rare").unwrap();
        assert_eq!((rare.count, rare.samples.len()), (1, 0));

        // Skip reasons are bounded too.
        let book = ShadowBook::default();
        let mut c = counts("api", false, [0; 5]);
        for i in 0..MAX_SKIP_REASONS + 5 {
            c.skipped.insert(format!("reason{i:02}"), 1);
        }
        book.ingest(batch(vec![c], vec![]), T0);
        let s = book.summaries().remove(0);
        let made_up = s
            .live
            .skipped
            .keys()
            .filter(|k| k.starts_with("reason"))
            .count();
        assert_eq!(made_up, MAX_SKIP_REASONS);
        assert_eq!(s.live.skipped["other"], 5);
    }

    #[test]
    fn every_skip_reason_is_listed_and_live_counts_can_start_over() {
        let book = ShadowBook::default();
        let mut c = counts("api", false, [10, 4, 6, 0, 1]);
        c.skipped.insert("not_sampled".into(), 40);
        book.ingest(
            batch(vec![c, counts("api", true, [5, 5, 0, 0, 0])], vec![]),
            T0,
        );
        let s = book.summaries().remove(0);
        for reason in understudy_core::shadow::Skip::ALL {
            assert!(s.live.skipped.contains_key(reason.as_str()), "{reason:?}");
        }
        assert_eq!(s.live.skipped["not_sampled"], 40);
        assert_eq!(s.live.skipped["shadow_timeout"], 0);
        assert_eq!(s.live.compared, 10);

        assert!(book.reset_live("api"));
        assert!(!book.reset_live("nope"));
        let s = book.summaries().remove(0);
        assert_eq!(s.live.compared, 0);
        assert_eq!(s.live.skipped["not_sampled"], 0);
        assert_eq!(s.live.match_rate, None);
        // Calibration is kept: it has its own reset (forget_noise).
        assert_eq!(s.calibration.compared, 5);
        assert!(book.route("api").unwrap().top_paths.is_empty());
    }

    #[test]
    fn record_bytes_are_bounded() {
        let book = ShadowBook::default();
        let big = |i: usize| {
            let mut r = record("api", false, vec![diff("$.x", true, false)]);
            r.request = Some(understudy_proto::v1::RecordedRequest {
                body: vec![b'x'; 1024 * 1024],
                ..Default::default()
            });
            r.request_id = format!("r{i}");
            r
        };
        for i in 0..70 {
            book.ingest(batch(vec![], vec![big(i)]), T0);
        }
        let stored = book.counts().records_stored;
        assert!((60..64).contains(&stored), "{stored}");
        assert!(book.record(70).is_some());
    }

    /// With replicas, a book learns from its own Envoys only and hands the
    /// learning over; the fleet's sum comes back as its view, samples kept.
    #[test]
    fn a_sharing_book_hands_over_its_learning_and_shows_the_fleets() {
        let book = ShadowBook::default();
        book.share_learning();
        let cal = vec![
            record("api", true, vec![diff("$.at", true, true)]),
            record(
                "api",
                true,
                vec![diff("$.at", true, true), diff("$.id", true, true)],
            ),
        ];
        book.ingest(batch(vec![counts("api", true, [10, 8, 2, 0, 2])], cal), T0);
        // Another replica's batch: its live part counts here, its
        // calibration is that replica's to share.
        let theirs = batch(
            vec![
                counts("api", true, [50, 0, 50, 0, 50]),
                counts("api", false, [7, 7, 0, 0, 0]),
            ],
            vec![record("api", true, vec![diff("$.other", true, true)])],
        );
        book.ingest_read_back(theirs, Origin::Unverified, T0);
        let d = book.route("api").unwrap();
        assert_eq!(d.summary.calibration.compared, 10);
        assert_eq!(d.summary.live.compared, 7);
        assert!(d.calibration_top_paths.iter().all(|p| p.path != "$.other"));

        let taken = book.take_learned();
        assert_eq!(taken.len(), 1);
        let (route, mine) = &taken[0];
        assert_eq!(route, "api");
        assert_eq!(
            (mine.compared(), mine.records(), mine.differed_at("$.at")),
            (10, 2, 2)
        );
        assert!(book.take_learned().is_empty(), "handed over once");
        // Until the sum comes back, the view still has it.
        assert_eq!(book.noise()[0].calibration_compared, 10);

        // The fleet: this replica's share plus another's 30 pairs, 3 at $.at.
        let mut other = Learned::default();
        other.note_counts(&counts("api", true, [30, 27, 3, 0, 3]));
        for _ in 0..3 {
            other.note_record(&record("api", true, vec![diff("$.at", true, true)]));
        }
        let mut fleet = mine.clone();
        fleet.add(&other);
        // Something learned meanwhile is still pending and counts too.
        book.ingest(
            batch(vec![counts("api", true, [2, 2, 0, 0, 0])], vec![]),
            T0,
        );
        assert!(book.set_learned("api", &fleet, T0));
        let noise = &book.noise()[0];
        assert_eq!(noise.calibration_compared, 42);
        let at = noise.paths.iter().find(|p| p.path == "$.at").unwrap();
        assert_eq!(at.records, 5);
        assert!(close(at.rate, 5.0 / 42.0));
        // This replica's own samples survive the rebuild.
        let d = book.route("api").unwrap();
        let at = d
            .calibration_top_paths
            .iter()
            .find(|p| p.path == "$.at")
            .unwrap();
        assert_eq!(at.samples.len(), 2);
        // Forgetting drops what is pending as well.
        assert!(book.forget_noise("api"));
        assert!(book.take_learned().is_empty());
        assert!(book.noise().is_empty());
        // A route it never saw arrives with the fleet's learning.
        assert!(book.set_learned("search", &other, T0));
        assert!(book.knows("search"));
        assert!(!book.set_learned("nothing", &Learned::default(), T0));
    }

    #[test]
    fn calibration_teaches_noise_and_live_records_are_reclassified() {
        let book = ShadowBook::default();
        // A/A: 10 pairs, 4 differed at $.at (a timestamp), 1 at $.id.
        let mut cal = vec![];
        for _ in 0..4 {
            cal.push(record("api", true, vec![diff("$.at", true, true)]));
        }
        cal.push(record("api", true, vec![diff("$.id", true, true)]));
        book.ingest(batch(vec![counts("api", true, [10, 5, 5, 0, 5])], cal), T0);
        let noise = book.noise();
        assert_eq!(noise.len(), 1);
        assert_eq!(noise[0].calibration_compared, 10);
        let at = &noise[0].paths[0];
        assert_eq!((at.path.as_str(), at.records), ("$.at", 4));
        assert!(close(at.rate, 0.4));
        assert!(close(noise[0].paths[1].rate, 0.1));

        // Live: 3 serious records. Only learned-noisy paths → noise; one with
        // an unlearned serious difference stays serious.
        let live = vec![
            record("api", false, vec![diff("$.at", true, true)]),
            record(
                "api",
                false,
                vec![diff("$.at", true, true), diff("$.id", true, false)],
            ),
            record(
                "api",
                false,
                vec![diff("$.at", true, true), diff("$.total", true, false)],
            ),
        ];
        book.ingest(
            batch(vec![counts("api", false, [20, 17, 3, 0, 3])], live),
            T0,
        );
        let d = book.route("api").unwrap();
        let l = &d.summary.live;
        assert_eq!((l.mismatched_serious, l.mismatched_noise), (1, 2));
        assert_eq!(l.reclassified_as_noise, 2);
        // Every record's unexpected differences were at $.at (learned).
        assert_eq!(l.unexpected, 0);
        assert!(close(l.match_rate.unwrap(), 19.0 / 20.0));
        let at = d.top_paths.iter().find(|p| p.path == "$.at").unwrap();
        assert_eq!((at.serious, at.noise, at.unexpected), (0, 3, 0));
        assert!(close(at.learned_noise_rate.unwrap(), 0.4));
        assert!(at.samples.iter().all(|s| s.bucket == ShownBucket::Noisy));
        let total = d.top_paths.iter().find(|p| p.path == "$.total").unwrap();
        assert_eq!((total.serious, total.learned_noise_rate), (1, None));
        let stored = book.record(6).unwrap();
        assert!(stored.reclassified);
        assert!(close(stored.learned[0].unwrap(), 0.4));
        assert!(!book.record(8).unwrap().reclassified);
        // Calibration counts are untouched by learning.
        assert_eq!(d.summary.calibration.mismatched_serious, 5);
        assert_eq!(d.calibration_top_paths[0].path, "$.at");

        // A record with omitted differences is never reclassified.
        let mut partial = record("api", false, vec![diff("$.at", true, true)]);
        partial.omitted = 3;
        book.ingest(
            batch(vec![counts("api", false, [1, 0, 1, 0, 1])], vec![partial]),
            T0,
        );
        let l = book.route("api").unwrap().summary.live;
        assert_eq!((l.mismatched_serious, l.unexpected), (2, 1));

        // Counts saturate at zero when a record arrives without its counts.
        let book2 = ShadowBook::default();
        book2.ingest(
            batch(
                vec![],
                vec![record("api", true, vec![diff("$.at", true, true)])],
            ),
            T0,
        );
        assert!(
            close(book2.noise()[0].paths[0].rate, 1.0),
            "records stand in for counts"
        );
        book2.ingest(
            batch(
                vec![],
                vec![record("api", false, vec![diff("$.at", true, true)])],
            ),
            T0,
        );
        let l = book2.summaries().remove(0).live;
        assert_eq!(
            (l.mismatched_serious, l.mismatched_noise, l.unexpected),
            (0, 1, 0)
        );

        // Forgetting calibration stops the learning.
        assert!(book.forget_noise("api"));
        assert!(!book.forget_noise("nope"));
        assert!(book.noise().is_empty());
        book.ingest(
            batch(
                vec![counts("api", false, [1, 0, 1, 0, 1])],
                vec![record("api", false, vec![diff("$.at", true, true)])],
            ),
            T0,
        );
        let d = book.route("api").unwrap();
        assert_eq!(d.summary.live.mismatched_serious, 3);
        assert_eq!(d.summary.calibration.compared, 0);
        assert!(d.calibration_top_paths.is_empty());
    }

    #[test]
    fn a_record_view_shows_text_or_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x80]), "//4AgA==");
        let book = ShadowBook::default();
        let mut r = record("api", false, vec![diff("$.total", true, true)]);
        r.latency_gap_us = -1500;
        r.segment = "v2".into();
        r.request = Some(understudy_proto::v1::RecordedRequest {
            method: "GET".into(),
            path: "/a".into(),
            body: b"{}".to_vec(),
            ..Default::default()
        });
        r.primary = Some(understudy_proto::v1::RecordedResponse {
            status: 200,
            body: vec![0xff, 0x00],
            ..Default::default()
        });
        book.ingest(batch(vec![], vec![r]), T0 + Duration::from_millis(42));
        let v = serde_json::to_value(book.record(1).unwrap().view(&[])).unwrap();
        assert_eq!(v["id"], "1");
        assert_eq!(v["node_id"], "envoy-1");
        assert_eq!(v["received"], 42);
        assert_eq!(v["latency_gap_ms"], -1.5);
        assert_eq!(v["segment"], "v2");
        assert!(v["truncated"].is_null());
        assert_eq!(v["differences"][0]["kind"], "value_change");
        assert_eq!(v["differences"][0]["bucket"], "serious");
        assert_eq!(v["request"]["body"], "{}");
        assert!(v["request"].get("body_base64").is_none());
        assert_eq!(v["primary"]["body_base64"], "/wA=");
        assert!(v["primary"].get("body").is_none());
    }

    #[test]
    fn kinds_use_the_core_names() {
        let mut d = diff("$.a", true, false);
        assert_eq!(kind_name(&d), "value_change");
        d.kind = difference::Kind::Status as i32;
        assert_eq!(kind_name(&d), "status_change");
        d.kind = difference::Kind::HeaderChange as i32;
        assert_eq!(kind_name(&d), "header_change");
        d.kind = difference::Kind::BodyDiffers as i32;
        assert_eq!(kind_name(&d), "body_differs");
        d.kind = 99;
        assert_eq!(kind_name(&d), "unspecified");
        // An unknown bucket counts as serious.
        d.bucket = 7;
        assert!(is_serious(&d));
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(sample_value(""), None);
    }
}
