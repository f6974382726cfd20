//! Prometheus as an evidence source: a rollout whose spec says
//! `evidence: {source: prometheus, url: ...}` is judged from counters and
//! histograms Prometheus scraped (Envoy's own `envoy_cluster_upstream_rq*`,
//! Istio's `istio_requests_total` and `istio_request_duration_milliseconds`,
//! or queries of the spec's own), plus the spec's business metrics.
//!
//! # How a window is read
//! A background task per tracked service runs `query_range` over the
//! step's window (from a little before its start to now, 1 s resolution;
//! coarser past 10,000 points) for every query of both sides, about once a
//! second. Each returned series is a counter; per series, a drop between
//! two points is a counter reset (the new value is all increase), and the
//! corrected series are summed into one non-decreasing count per side on
//! the query's time grid. A window `(a, b]` is then the count at `b` minus
//! the count at `a`: exact at the scrapes' resolution, never extrapolated
//! (unlike `increase()`), and the same data gives the judge's restarts. A
//! series that first appears inside the window (a new pod) counts from 0.
//!
//! Latency comes from the histogram's cumulative `_bucket` counters: a
//! window's count per `le`, de-cumulated into buckets with their true
//! bounds (empty ones included), the `+Inf` bucket last.
//!
//! # Never healthy by default
//! An unreachable Prometheus, an error answer, or an empty result is no
//! data, and data that stops (a target down: Prometheus marks its series
//! stale) makes the window stale: the judge holds, never promotes, never
//! rolls back on it. The reason is kept with the window
//! ([`PromStatus::error`]) and shown in the verdict.
//!
//! The engine calls [`PrometheusEvidence::track`] on every look at a
//! rollout that uses Prometheus; a service not tracked for a minute stops
//! being polled. The [`EvidenceSource`] reads are reads of the last poll:
//! nothing here blocks the engine on the network.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::outbound::{ReadError, read_capped};

use super::{Counts, Evidence, EvidenceSource, MetricEvidence, ShadowEvidence, StepWindows, Tally};

/// Longest query template, in bytes.
pub const MAX_QUERY_LEN: usize = 4096;
/// Most business metrics per rollout.
pub const MAX_METRICS: usize = 16;
/// Points per series a `query_range` asks for at most (Prometheus refuses
/// more than 11,000).
pub const MAX_POINTS: u64 = 10_000;
/// Series one query may return; more is refused as no data (a query that
/// forgot its `{{side}}` selector can return thousands).
pub const MAX_SERIES: usize = 2_000;
/// Largest answer read from Prometheus.
pub const MAX_ANSWER_BYTES: usize = 32 << 20;
/// A service not tracked for this long is no longer polled.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// How far before a window's start the query begins, to find the
/// counters' values at the start.
const LEAD_MS: u64 = 5_000;

/// Which metric names the default queries use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Envoy's own stats (`/stats/prometheus`), per cluster: `{{cluster}}`
    /// is `<service>-stable` or `<service>-canary`.
    #[default]
    Envoy,
    /// Istio's standard metrics, per `destination_version` (`{{side}}`),
    /// reported by the destination's sidecar.
    Istio,
}

/// The three queries a side's window is read from: counter selectors
/// (no `rate` or `increase`: the source does the counting), each with
/// `{{side}}` or `{{cluster}}` so the two sides differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queries {
    /// Requests completed.
    pub requests: String,
    /// Requests answered 5xx.
    pub errors: String,
    /// The latency histogram's cumulative `_bucket` counters (with `le`),
    /// in milliseconds.
    pub latency_buckets: String,
}

impl Preset {
    pub fn queries(self) -> Queries {
        match self {
            Preset::Envoy => Queries {
                requests: r#"envoy_cluster_upstream_rq_completed{envoy_cluster_name="{{cluster}}"}"#
                    .to_owned(),
                errors: r#"envoy_cluster_upstream_rq_xx{envoy_cluster_name="{{cluster}}",envoy_response_code_class="5"}"#
                    .to_owned(),
                latency_buckets: r#"envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="{{cluster}}"}"#
                    .to_owned(),
            },
            Preset::Istio => Queries {
                requests: r#"istio_requests_total{reporter="destination",destination_service_name="{{service}}",destination_version="{{side}}"}"#
                    .to_owned(),
                errors: r#"istio_requests_total{reporter="destination",destination_service_name="{{service}}",destination_version="{{side}}",response_code=~"5.."}"#
                    .to_owned(),
                latency_buckets: r#"istio_request_duration_milliseconds_bucket{reporter="destination",destination_service_name="{{service}}",destination_version="{{side}}"}"#
                    .to_owned(),
            },
        }
    }
}

/// A business metric: `events` out of `total`, both counters, per side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricQuery {
    pub name: String,
    pub events: String,
    pub total: String,
}

/// Everything read from Prometheus for one service's rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromTarget {
    /// Base URL (`http://prometheus:9090`); the API is under `/api/v1/`.
    pub url: String,
    pub queries: Queries,
    /// What `{{side}}` becomes for each side.
    pub stable_label: String,
    pub canary_label: String,
    pub metrics: Vec<MetricQuery>,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TargetError {
    /// Relative to the spec's `evidence` (or `metrics[i]`).
    pub field: String,
    pub reason: String,
}

fn target_error(field: impl Into<String>, reason: impl Into<String>) -> TargetError {
    TargetError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a query template: bounded, and different for the two sides.
pub fn check_template(field: &str, template: &str) -> Result<(), TargetError> {
    if template.trim().is_empty() || template.len() > MAX_QUERY_LEN {
        return Err(target_error(
            field,
            format!("must be a PromQL expression of 1 to {MAX_QUERY_LEN} bytes"),
        ));
    }
    if !template.contains("{{side}}") && !template.contains("{{cluster}}") {
        return Err(target_error(
            field,
            "must contain {{side}} or {{cluster}}: otherwise stable and canary read the same series",
        ));
    }
    Ok(())
}

/// Checks a `{{side}}` value: it goes inside a PromQL string.
pub fn check_label(field: &str, value: &str) -> Result<(), TargetError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(target_error(
            field,
            "must be 1 to 128 characters of letters, digits, _ . : -",
        ))
    }
}

/// Checks the base URL.
pub fn check_url(field: &str, url: &str) -> Result<(), TargetError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| target_error(field, format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(target_error(
            field,
            "must be an http or https URL with a host",
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(target_error(field, "must not have a query or fragment"));
    }
    Ok(())
}

/// Which side a query is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Stable,
    Canary,
}

impl PromTarget {
    /// `template` for `side` of `service`.
    pub fn render(&self, template: &str, service: &str, side: Side) -> String {
        let (label, cluster) = match side {
            Side::Stable => (&self.stable_label, format!("{service}-stable")),
            Side::Canary => (&self.canary_label, format!("{service}-canary")),
        };
        template
            .replace("{{side}}", label)
            .replace("{{cluster}}", &cluster)
            .replace("{{service}}", service)
    }

    /// Every query as run, for the verdict.
    pub fn rendered(&self, service: &str) -> Vec<String> {
        let mut out = Vec::new();
        for side in [Side::Stable, Side::Canary] {
            for t in [
                &self.queries.requests,
                &self.queries.errors,
                &self.queries.latency_buckets,
            ] {
                out.push(self.render(t, service, side));
            }
            for m in &self.metrics {
                out.push(self.render(&m.events, service, side));
                out.push(self.render(&m.total, service, side));
            }
        }
        out
    }
}

// === counting ===

/// A non-decreasing count on a time grid: the corrected sum of a query's
/// series at each grid point.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cumulative {
    /// Unix ms of each grid point, ascending.
    pub at_ms: Vec<u64>,
    pub count: Vec<f64>,
    /// The newest grid point at which any series had a sample.
    pub last_sample_ms: Option<u64>,
}

impl Cumulative {
    /// The count at the last grid point at or before `t` (0 before the first).
    pub fn at(&self, t: u64) -> f64 {
        let i = self.at_ms.partition_point(|&a| a <= t);
        i.checked_sub(1)
            .and_then(|i| self.count.get(i))
            .copied()
            .unwrap_or(0.0)
    }

    /// What was counted in `(a, b]`.
    pub fn between(&self, a: u64, b: u64) -> f64 {
        (self.at(b) - self.at(a)).max(0.0)
    }
}

/// One series of a `query_range` answer: `(unix ms, value)` points.
type Series = Vec<(u64, f64)>;
/// A series with its labels.
type Labelled = (BTreeMap<String, String>, Series);

/// Sums `series` into one count on the grid `start + k·step` (`points`
/// points), correcting each series' resets. A series counts from 0 (the
/// first value it shows is increase) unless it has a point at the grid's
/// first instant, which is then its baseline.
pub fn accumulate(series: &[Series], start_ms: u64, step_ms: u64, points: usize) -> Cumulative {
    let at_ms: Vec<u64> = (0..points as u64)
        .map(|k| start_ms.saturating_add(k.saturating_mul(step_ms)))
        .collect();
    let mut count = vec![0.0; points];
    let mut last_sample_ms = None;
    for s in series {
        let mut corrected = 0.0;
        let mut prev: Option<f64> = None;
        let mut value_at = vec![None; points];
        for &(t, v) in s {
            if !v.is_finite() || v < 0.0 {
                continue;
            }
            let Some(slot) = at_ms.iter().position(|&a| a == t) else {
                continue;
            };
            let increase = match prev {
                None if slot == 0 => 0.0,
                None => v,
                Some(p) if v >= p => v - p,
                Some(_) => v,
            };
            // Prometheus' numbers are a peer's: a sum never leaves the finite.
            corrected = finite_sum(corrected, increase);
            prev = Some(v);
            value_at[slot] = Some(corrected);
            last_sample_ms = last_sample_ms.max(Some(t));
        }
        // Between and after samples a series keeps its last count.
        let mut carried = 0.0;
        for (slot, c) in value_at.iter().enumerate() {
            if let Some(c) = c {
                carried = *c;
            }
            count[slot] = finite_sum(count[slot], carried);
        }
    }
    Cumulative {
        at_ms,
        count,
        last_sample_ms,
    }
}

/// `a + b`, at most `f64::MAX` (inputs are finite and non-negative).
fn finite_sum(a: f64, b: f64) -> f64 {
    (a + b).min(f64::MAX)
}

/// Parses a `query_range` answer into series, each labelled by its labels
/// (for grouping histogram buckets by `le`).
pub fn parse_matrix(body: &[u8]) -> Result<Vec<Labelled>, String> {
    #[derive(Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(rename = "resultType")]
        result_type: String,
        result: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        metric: BTreeMap<String, String>,
        #[serde(default)]
        values: Vec<(f64, String)>,
    }
    let a: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if a.status != "success" {
        return Err(format!(
            "Prometheus said {}: {}",
            a.status,
            a.error.unwrap_or_default()
        ));
    }
    let data = a.data.ok_or("Prometheus answer without data")?;
    if data.result_type != "matrix" {
        return Err(format!("expected a range vector, got {}", data.result_type));
    }
    if data.result.len() > MAX_SERIES {
        return Err(format!(
            "{} series (at most {MAX_SERIES}): is the query missing a selector?",
            data.result.len()
        ));
    }
    Ok(data
        .result
        .into_iter()
        .map(|item| {
            let points = item
                .values
                .into_iter()
                .filter_map(|(t, v)| {
                    let ms = (t * 1000.0).round();
                    (ms.is_finite() && ms >= 0.0)
                        .then(|| (ms as u64, v.parse::<f64>().unwrap_or(f64::NAN)))
                })
                .collect();
            (item.metric, points)
        })
        .collect())
}

/// Histogram buckets by upper bound (`le`), each a [`Cumulative`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, Cumulative)>);

impl Buckets {
    fn from_series(series: Vec<Labelled>, start_ms: u64, step_ms: u64, points: usize) -> Self {
        let mut by_le: BTreeMap<u64, (f64, Vec<Series>)> = BTreeMap::new();
        for (labels, s) in series {
            let Some(le) = labels.get("le").and_then(|l| parse_le(l)) else {
                continue;
            };
            // Non-negative floats (and +∞) order as their bits do.
            by_le
                .entry(le.to_bits())
                .or_insert_with(|| (le, Vec::new()))
                .1
                .push(s);
        }
        Buckets(
            by_le
                .into_values()
                .map(|(le, s)| (le, accumulate(&s, start_ms, step_ms, points)))
                .collect(),
        )
    }

    /// The histogram of `(a, b]`: counts per bucket, not cumulative.
    fn between(&self, a: u64, b: u64) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(self.0.len());
        let mut below = 0.0;
        for (le, c) in &self.0 {
            let cum = c.between(a, b).max(below);
            out.push((*le, (cum - below).round() as u64));
            below = cum;
        }
        out
    }
}

fn parse_le(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        t => t.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0),
    }
}

/// One side's last poll.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SideData {
    pub requests: Cumulative,
    pub errors: Cumulative,
    pub latency: Buckets,
    /// Per business metric, by name: `(events, total)`.
    pub metrics: Vec<(String, Cumulative, Cumulative)>,
}

impl SideData {
    fn window(&self, a: u64, b: u64) -> Evidence {
        Evidence {
            requests: self.requests.between(a, b).round() as u64,
            errors: self.errors.between(a, b).round() as u64,
            latency_ms: self.latency.between(a, b),
            last_update_ms: self.requests.last_sample_ms,
        }
    }
}

/// What the poller knows of one service.
#[derive(Debug, Clone, Default)]
pub struct PromStatus {
    pub target: Option<PromTarget>,
    /// The window's start the poller reads from.
    pub since_ms: u64,
    pub stable: SideData,
    pub canary: SideData,
    /// When the last successful poll finished.
    pub polled_ms: Option<u64>,
    /// The last poll's failure, if it failed.
    pub error: Option<String>,
    /// When the engine last asked for this service.
    tracked_ms: u64,
    /// Whether a poller task runs for it.
    polling: bool,
}

/// The Prometheus [`EvidenceSource`].
#[derive(Clone)]
pub struct PrometheusEvidence {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    poll: Duration,
    services: Mutex<HashMap<String, PromStatus>>,
}

impl PrometheusEvidence {
    /// Polls every `poll` on the current tokio runtime (call from within it).
    pub fn new(poll: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                runtime: tokio::runtime::Handle::current(),
                poll,
                services: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PromStatus>> {
        self.inner
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `service` from `target` for a window starting at `since_ms`,
    /// from now on (polling starts if it was not running). Cheap: the
    /// engine calls it on every look.
    pub fn track(&self, service: &str, target: &PromTarget, since_ms: u64, now_ms: u64) {
        let start = {
            let mut services = self.lock();
            let status = services.entry(service.to_owned()).or_default();
            if status.target.as_ref() != Some(target) || status.since_ms != since_ms {
                // A new window: what was read for the old one is not evidence.
                *status = PromStatus {
                    target: Some(target.clone()),
                    since_ms,
                    polling: status.polling,
                    ..PromStatus::default()
                };
            }
            status.tracked_ms = now_ms;
            !std::mem::replace(&mut status.polling, true)
        };
        if start {
            let me = self.clone();
            let service = service.to_owned();
            self.inner
                .runtime
                .spawn(async move { me.poll_loop(service).await });
        }
    }

    /// What the poller knows of `service` now.
    pub fn status(&self, service: &str) -> Option<PromStatus> {
        self.lock().get(service).cloned()
    }

    /// The business metrics' counts over `(since_ms, now_ms]`.
    pub fn metric_counts(&self, service: &str, since_ms: u64, now_ms: u64) -> Vec<MetricEvidence> {
        let Some(s) = self.status(service) else {
            return Vec::new();
        };
        let counts = |c: &(String, Cumulative, Cumulative)| Tally {
            events: c.1.between(since_ms, now_ms).round() as u64,
            total: c.2.between(since_ms, now_ms).round() as u64,
        };
        s.stable
            .metrics
            .iter()
            .zip(&s.canary.metrics)
            .map(|(st, ca)| MetricEvidence {
                name: st.0.clone(),
                stable: counts(st),
                canary: counts(ca),
                last_update_ms: match (st.2.last_sample_ms, ca.2.last_sample_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    _ => None,
                },
            })
            .collect()
    }

    async fn poll_loop(self, service: String) {
        let mut ticker = tokio::time::interval(self.inner.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = crate::time::unix_ms(SystemTime::now());
            let job = {
                let mut services = self.lock();
                let Some(s) = services.get_mut(&service) else {
                    return;
                };
                if now.saturating_sub(s.tracked_ms) > FORGET_AFTER.as_millis() as u64 {
                    services.remove(&service);
                    return;
                }
                s.target.clone().map(|t| (t, s.since_ms))
            };
            let Some((target, since)) = job else {
                continue;
            };
            let result = self.read_window(&target, &service, since, now).await;
            let mut services = self.lock();
            let Some(s) = services.get_mut(&service) else {
                return;
            };
            if s.target.as_ref() != Some(&target) || s.since_ms != since {
                continue; // the window moved while we read the old one
            }
            match result {
                Ok((stable, canary)) => {
                    s.stable = stable;
                    s.canary = canary;
                    s.polled_ms = Some(now);
                    s.error = None;
                }
                Err(e) => {
                    debug!(service, error = %e, "prometheus poll failed");
                    s.error = Some(e);
                }
            }
        }
    }

    async fn read_window(
        &self,
        target: &PromTarget,
        service: &str,
        since_ms: u64,
        now_ms: u64,
    ) -> Result<(SideData, SideData), String> {
        let start = since_ms.saturating_sub(LEAD_MS);
        let span = now_ms.saturating_sub(start).max(1);
        let step = (span.div_ceil(MAX_POINTS)).max(1000).div_ceil(1000) * 1000;
        let points = (span / step + 1) as usize;
        let mut sides = Vec::with_capacity(2);
        for side in [Side::Stable, Side::Canary] {
            let q = |t: &str| target.render(t, service, side);
            let range = |query: String| self.query_range(target, query, start, step, points);
            let requests = accumulate(
                &strip(range(q(&target.queries.requests)).await?),
                start,
                step,
                points,
            );
            let errors = accumulate(
                &strip(range(q(&target.queries.errors)).await?),
                start,
                step,
                points,
            );
            let latency = Buckets::from_series(
                range(q(&target.queries.latency_buckets)).await?,
                start,
                step,
                points,
            );
            let mut metrics = Vec::with_capacity(target.metrics.len());
            for m in &target.metrics {
                let events = accumulate(&strip(range(q(&m.events)).await?), start, step, points);
                let total = accumulate(&strip(range(q(&m.total)).await?), start, step, points);
                metrics.push((m.name.clone(), events, total));
            }
            sides.push(SideData {
                requests,
                errors,
                latency,
                metrics,
            });
        }
        let canary = sides.pop().unwrap_or_default();
        let stable = sides.pop().unwrap_or_default();
        Ok((stable, canary))
    }

    async fn query_range(
        &self,
        target: &PromTarget,
        query: String,
        start_ms: u64,
        step_ms: u64,
        points: usize,
    ) -> Result<Vec<Labelled>, String> {
        let end_ms = start_ms.saturating_add(step_ms.saturating_mul(points as u64 - 1));
        let secs = |ms: u64| format!("{}.{:03}", ms / 1000, ms % 1000);
        let url = format!("{}/api/v1/query_range", target.url.trim_end_matches('/'));
        let mut answer = self
            .inner
            .client
            .get(url)
            .query(&[
                ("query", query.as_str()),
                ("start", &secs(start_ms)),
                ("end", &secs(end_ms)),
                ("step", &format!("{}ms", step_ms)),
            ])
            .send()
            .await
            .map_err(|e| format!("prometheus unreachable: {}", without_url(&e)))?;
        let status = answer.status();
        let body = read_capped(&mut answer, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::Cut(e) => format!("prometheus answer cut off: {}", without_url(&e)),
                ReadError::TooLarge => format!("prometheus answer over {MAX_ANSWER_BYTES} bytes"),
            })?;
        if !status.is_success() && body.is_empty() {
            return Err(format!("prometheus answered HTTP {status}"));
        }
        parse_matrix(&body).map_err(|e| format!("{query}: {e}"))
    }
}

fn strip(series: Vec<Labelled>) -> Vec<Series> {
    series.into_iter().map(|(_, s)| s).collect()
}

fn without_url(e: &reqwest::Error) -> String {
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        "timed out".to_owned()
    } else if cause.is_empty() {
        "request failed".to_owned()
    } else {
        cause
    }
}

impl EvidenceSource for PrometheusEvidence {
    fn step_windows(&self, service: &str, since_ms: u64, now_ms: u64) -> StepWindows {
        let Some(s) = self.status(service) else {
            return StepWindows::default();
        };
        if s.polled_ms.is_none() {
            return StepWindows::default();
        }
        StepWindows {
            stable: s.stable.window(since_ms, now_ms),
            canary: s.canary.window(since_ms, now_ms),
        }
    }

    fn shadow_pairs(&self, _route: &str) -> Option<ShadowEvidence> {
        None
    }

    fn counts_since(&self, service: &str, starts_ms: &[u64], now_ms: u64) -> Vec<(Counts, Counts)> {
        let Some(s) = self.status(service) else {
            return vec![(Counts::default(), Counts::default()); starts_ms.len()];
        };
        let counts = |side: &SideData, a: u64| Counts {
            requests: side.requests.between(a, now_ms).round() as u64,
            errors: side.errors.between(a, now_ms).round() as u64,
        };
        starts_ms
            .iter()
            .map(|&a| (counts(&s.stable, a), counts(&s.canary, a)))
            .collect()
    }

    fn newest_arrival_ms(&self, service: &str) -> Option<u64> {
        self.status(service).and_then(|s| s.polled_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_corrected_and_series_summed() {
        // Grid 0, 1000, ..., 5000. Series a: baseline 10 at the first
        // point, +5, reset to 3 (3 more), +2. Series b appears at 2000.
        let a = vec![(0, 10.0), (1000, 15.0), (2000, 3.0), (3000, 5.0)];
        let b = vec![(2000, 4.0), (4000, 6.0)];
        let c = accumulate(&[a, b], 0, 1000, 6);
        assert_eq!(c.count, [0.0, 5.0, 12.0, 14.0, 16.0, 16.0]);
        assert_eq!(c.between(1000, 4000), 11.0);
        assert_eq!(c.between(0, 5000), 16.0);
        assert_eq!(c.last_sample_ms, Some(4000));
        assert_eq!(c.at(500), 0.0);
        // Garbage is skipped, not counted.
        let bad = vec![(0, 1.0), (1000, f64::NAN), (2000, -5.0), (3000, 2.0)];
        assert_eq!(accumulate(&[bad], 0, 1000, 4).count, [0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn an_empty_result_is_no_data() {
        let empty = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        let series = strip(parse_matrix(empty).unwrap());
        let side = SideData {
            requests: accumulate(&series, 0, 1000, 5),
            errors: accumulate(&series, 0, 1000, 5),
            ..SideData::default()
        };
        let w = side.window(0, 4000);
        assert_eq!((w.requests, w.last_update_ms), (0, None));
    }

    #[test]
    fn histograms_keep_every_bucket_with_its_bounds() {
        let answer = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"le":"10"},"values":[[0,"5"],[1,"105"]]},
            {"metric":{"le":"50"},"values":[[0,"5"],[1,"105"]]},
            {"metric":{"le":"100"},"values":[[0,"6"],[1,"111"]]},
            {"metric":{"le":"+Inf"},"values":[[0,"6"],[1,"111"]]}]}}"#;
        let series = parse_matrix(answer).unwrap();
        let b = Buckets::from_series(series, 0, 1000, 2);
        assert_eq!(
            b.between(0, 1000),
            [(10.0, 100), (50.0, 0), (100.0, 5), (f64::INFINITY, 0)]
        );
    }

    #[test]
    fn answers_that_are_not_data_are_errors() {
        assert!(parse_matrix(b"<html>").is_err());
        let e = parse_matrix(br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#)
            .unwrap_err();
        assert!(e.contains("parse error"), "{e}");
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(parse_matrix(vector).is_err());
        let many = format!(
            r#"{{"status":"success","data":{{"resultType":"matrix","result":[{}]}}}}"#,
            vec![r#"{"metric":{},"values":[]}"#; MAX_SERIES + 1].join(",")
        );
        assert!(
            parse_matrix(many.as_bytes())
                .unwrap_err()
                .contains("series")
        );
    }

    #[test]
    fn templates_must_tell_the_sides_apart() {
        assert!(check_template("q", "up").is_err());
        assert!(check_template("q", "").is_err());
        assert!(check_template("q", r#"x{v="{{side}}"}"#).is_ok());
        assert!(check_label("l", r#"v1"}or{"#).is_err());
        assert!(check_label("l", "v2-canary.1").is_ok());
        assert!(check_url("u", "http://prom:9090").is_ok());
        assert!(check_url("u", "file:///etc/passwd").is_err());
        let t = PromTarget {
            url: "http://p".into(),
            queries: Preset::Istio.queries(),
            stable_label: "v1".into(),
            canary_label: "v2".into(),
            metrics: vec![],
        };
        let r = t.rendered("shop");
        assert!(r[0].contains(r#"destination_version="v1""#), "{}", r[0]);
        assert!(r[3].contains(r#"destination_version="v2""#), "{}", r[3]);
        assert!(r[0].contains(r#"destination_service_name="shop""#));
        let e = Preset::Envoy.queries();
        assert!(
            t.render(&e.requests, "shop", Side::Canary)
                .contains("shop-canary")
        );
    }
}
