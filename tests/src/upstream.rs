//! A programmable upstream server (axum), used in-process by the e2e tests and
//! as the `understudy-upstream` binary by the demo and benchmarks.
//!
//! Every answer carries `x-upstream-version` (its label). Its behaviour can
//! be set at start or at run time through `PUT /_upstream/behavior`:
//! a latency distribution, an error rate, and a JSON body. It counts requests
//! (`GET /_upstream/count`) and remembers the headers of the most recent ones
//! (`GET /_upstream/stats`).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Requests whose headers are remembered; older ones are dropped.
pub const SEEN_CAPACITY: usize = 10_000;
pub const VERSION_HEADER: &str = "x-upstream-version";

/// A share of requests that take a given time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyBand {
    /// Percent of requests (0..=100) in this band.
    pub pct: f64,
    pub ms: u64,
}

/// How the upstream answers. The default is a fast 200 with a small JSON body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behavior {
    /// Bands tried in order; requests outside every band take `default_ms`.
    /// Example: `[{"pct": 5, "ms": 300}]` with `default_ms: 5`.
    pub latency: Vec<LatencyBand>,
    pub default_ms: u64,
    /// Fraction (0..=1) of requests answered with `error_status`.
    pub error_rate: f64,
    /// Status for errors; 503 when unset.
    pub error_status: Option<u16>,
    /// When set, errors apply only to requests whose header `name` equals `value`.
    pub error_only_for: Option<HeaderMatch>,
    /// Body for successful answers; by default `{"version": ..., "path": ...}`.
    pub body: Option<serde_json::Value>,
    /// Answer `/orders/quote?lines=PRICE*QTY@RATE,...` with an order quote
    /// whose tax is rounded this way (two versions that disagree on cents).
    pub orders: Option<Rounding>,
    /// Add a `generated_at` timestamp (µs) and a random `trace_id` to JSON
    /// bodies: fields that differ on every response.
    pub stamp: bool,
    /// Response headers sent as raw bytes on every answer, e.g. a Latin-1
    /// (obs-text) value or a `set-cookie`.
    pub raw_headers: Vec<RawHeader>,
    /// A successful answer's body as raw bytes (any bytes), instead of JSON.
    pub raw_body: Option<Vec<u8>>,
    /// A business outcome: every successful answer starts a checkout,
    /// which completes with this chance (1 when unset). Counted in
    /// `GET /_upstream/metrics` as `checkout_started_total` and
    /// `checkout_completed_total`, labelled `version`.
    pub checkout_completion: Option<f64>,
}

/// A response header whose value is any bytes HTTP/1.1 allows (obs-text too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeader {
    pub name: String,
    pub value: Vec<u8>,
}

/// How an order quote rounds its tax to cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Sum the lines of each tax rate, then round that group's tax (v1).
    PerGroup,
    /// Round each line's tax, then sum (v2).
    PerLine,
}

/// The quote for `lines` (`PRICE*QTY@RATE`, comma-separated), in cents
/// arithmetic so the only difference between roundings is the rounding.
pub fn quote(lines: &str, rounding: Rounding) -> Option<serde_json::Value> {
    let mut parsed = Vec::new();
    for line in lines.split(',') {
        let (price, rest) = line.split_once('*')?;
        let (qty, rate) = rest.split_once('@')?;
        let cents = (price.parse::<f64>().ok()? * 100.0).round() as i64;
        parsed.push((cents * qty.parse::<i64>().ok()?, rate.parse::<f64>().ok()?));
    }
    let subtotal: i64 = parsed.iter().map(|(c, _)| c).sum();
    let tax: i64 = match rounding {
        Rounding::PerLine => parsed
            .iter()
            .map(|(c, r)| (*c as f64 * r).round() as i64)
            .sum(),
        Rounding::PerGroup => {
            let mut groups: BTreeMap<String, i64> = BTreeMap::new();
            for (c, r) in &parsed {
                *groups.entry(r.to_string()).or_default() += c;
            }
            groups
                .iter()
                .map(|(r, c)| (*c as f64 * r.parse::<f64>().unwrap_or(0.0)).round() as i64)
                .sum()
        }
    };
    let money = |c: i64| serde_json::json!((c as f64) / 100.0);
    Some(serde_json::json!({
        "lines": parsed.len(),
        "subtotal": money(subtotal),
        "tax": money(tax),
        "total": money(subtotal + tax),
        "currency": "EUR",
    }))
}

impl Behavior {
    pub fn validate(&self) -> Result<()> {
        let total: f64 = self.latency.iter().map(|b| b.pct).sum();
        if self.latency.iter().any(|b| !(0.0..=100.0).contains(&b.pct)) || total > 100.0 {
            bail!(
                "latency: each pct must be within 0..=100 and their sum at most 100, got {total}"
            );
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            bail!("error_rate must be within 0..=1, got {}", self.error_rate);
        }
        if let Some(p) = self.checkout_completion
            && !(0.0..=1.0).contains(&p)
        {
            bail!("checkout_completion must be within 0..=1, got {p}");
        }
        if let Some(s) = self.error_status
            && StatusCode::from_u16(s).is_err()
        {
            bail!("error_status {s} is not an HTTP status");
        }
        for h in &self.raw_headers {
            if axum::http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
                || axum::http::HeaderValue::from_bytes(&h.value).is_err()
            {
                bail!("raw header {:?} is not a valid HTTP header", h.name);
            }
        }
        Ok(())
    }

    fn pick_latency(&self, roll: f64) -> Duration {
        let mut acc = 0.0;
        for band in &self.latency {
            acc += band.pct;
            if roll * 100.0 < acc {
                return Duration::from_millis(band.ms);
            }
        }
        Duration::from_millis(self.default_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body_len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStats {
    pub version: String,
    pub requests: u64,
    pub seen: Vec<Seen>,
}

/// The upstream's state, shared by its handlers and (in-process) the test.
pub struct Upstream {
    version: String,
    behavior: Mutex<Behavior>,
    requests: AtomicU64,
    checkouts_started: AtomicU64,
    checkouts_completed: AtomicU64,
    seen: Mutex<VecDeque<Seen>>,
}

impl Upstream {
    pub fn new(version: &str, behavior: Behavior) -> Result<Arc<Self>> {
        behavior.validate()?;
        Ok(Arc::new(Self {
            version: version.to_owned(),
            behavior: Mutex::new(behavior),
            requests: AtomicU64::new(0),
            checkouts_started: AtomicU64::new(0),
            checkouts_completed: AtomicU64::new(0),
            seen: Mutex::new(VecDeque::new()),
        }))
    }

    pub fn set_behavior(&self, behavior: Behavior) -> Result<()> {
        behavior.validate()?;
        *lock(&self.behavior) = behavior;
        Ok(())
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).iter().cloned().collect()
    }

    /// Its counters in Prometheus' text format (what a service's own
    /// `/metrics` would show, for business-metric stop rules).
    pub fn metrics_text(&self) -> String {
        let v = &self.version;
        format!(
            "# HELP checkout_started_total Checkouts started.\n# TYPE checkout_started_total counter\n\
             checkout_started_total{{version=\"{v}\"}} {}\n\
             # HELP checkout_completed_total Checkouts completed.\n# TYPE checkout_completed_total counter\n\
             checkout_completed_total{{version=\"{v}\"}} {}\n",
            self.checkouts_started.load(Ordering::Relaxed),
            self.checkouts_completed.load(Ordering::Relaxed),
        )
    }

    pub fn stats(&self) -> UpstreamStats {
        UpstreamStats {
            version: self.version.clone(),
            requests: self.requests(),
            seen: self.seen(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn router(state: Arc<Upstream>) -> Router {
    Router::new()
        .route(
            "/_upstream/stats",
            get(|State(s): State<Arc<Upstream>>| async move { Json(s.stats()) }),
        )
        .route(
            "/_upstream/metrics",
            get(|State(s): State<Arc<Upstream>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    s.metrics_text(),
                )
            }),
        )
        .route(
            "/_upstream/count",
            get(|State(s): State<Arc<Upstream>>| async move {
                Json(serde_json::json!({"requests": s.requests()}))
            }),
        )
        .route(
            "/_upstream/behavior",
            get(|State(s): State<Arc<Upstream>>| async move { Json(lock(&s.behavior).clone()) })
                .put(
                    |State(s): State<Arc<Upstream>>, Json(b): Json<Behavior>| async move {
                        match s.set_behavior(b) {
                            Ok(()) => StatusCode::NO_CONTENT.into_response(),
                            Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
                        }
                    },
                ),
        )
        .fallback(serve)
        .with_state(state)
}

async fn serve(
    State(s): State<Arc<Upstream>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    {
        let mut seen = lock(&s.seen);
        if seen.len() == SEEN_CAPACITY {
            seen.pop_front();
        }
        seen.push_back(Seen {
            method: method.to_string(),
            path: uri.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_len: body.len(),
        });
    }
    let behavior = lock(&s.behavior).clone();
    let (latency_roll, error_roll) = {
        let mut rng = rand::rng();
        (rng.random::<f64>(), rng.random::<f64>())
    };
    let delay = behavior.pick_latency(latency_roll);
    if !delay.is_zero() {
        // The configured latency is the behaviour under test, not synchronization.
        tokio::time::sleep(delay).await;
    }
    let version = [(VERSION_HEADER, s.version.clone())];
    let mut raw = HeaderMap::new();
    for h in &behavior.raw_headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(h.name.as_bytes()),
            axum::http::HeaderValue::from_bytes(&h.value),
        ) {
            raw.append(name, value);
        }
    }
    let targeted = behavior.error_only_for.as_ref().is_none_or(|m| {
        headers.get(m.name.as_str()).and_then(|v| v.to_str().ok()) == Some(m.value.as_str())
    });
    if targeted && error_roll < behavior.error_rate {
        let status = behavior
            .error_status
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return (
            status,
            version,
            raw,
            Json(serde_json::json!({"error": "injected"})),
        )
            .into_response();
    }
    let lines = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("lines=")));
    let quoted = match (behavior.orders, lines) {
        (Some(rounding), Some(lines)) if uri.path() == "/orders/quote" => {
            match quote(lines, rounding) {
                Some(q) => Some(q),
                None => {
                    return (StatusCode::BAD_REQUEST, version, "bad lines").into_response();
                }
            }
        }
        _ => None,
    };
    let mut body = quoted
        .or(behavior.body)
        .unwrap_or_else(|| serde_json::json!({"version": s.version, "path": uri.path()}));
    if behavior.stamp
        && let Some(obj) = body.as_object_mut()
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        obj.insert("generated_at".into(), serde_json::json!(now));
        obj.insert(
            "trace_id".into(),
            serde_json::json!(format!("{:016x}", rand::rng().random::<u64>())),
        );
    }
    s.checkouts_started.fetch_add(1, Ordering::Relaxed);
    if rand::rng().random::<f64>() < behavior.checkout_completion.unwrap_or(1.0) {
        s.checkouts_completed.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(bytes) = behavior.raw_body {
        return (StatusCode::OK, version, raw, bytes).into_response();
    }
    (StatusCode::OK, version, raw, Json(body)).into_response()
}

/// A running in-process upstream.
pub struct UpstreamHandle {
    pub addr: SocketAddr,
    pub state: Arc<Upstream>,
    task: tokio::task::JoinHandle<()>,
}

impl UpstreamHandle {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start(version: &str, behavior: Behavior) -> Result<Self> {
        let state = Upstream::new(version, behavior)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = router(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }
}

impl Drop for UpstreamHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_bands_split_by_roll() {
        let b = Behavior {
            latency: vec![LatencyBand { pct: 5.0, ms: 300 }],
            default_ms: 5,
            ..Default::default()
        };
        assert_eq!(b.pick_latency(0.01), Duration::from_millis(300));
        assert_eq!(b.pick_latency(0.049), Duration::from_millis(300));
        assert_eq!(b.pick_latency(0.05), Duration::from_millis(5));
        assert_eq!(b.pick_latency(0.99), Duration::from_millis(5));
    }

    #[test]
    fn quotes_differ_only_by_rounding() {
        // 3 x 0.15 at 10%: per line 0.02 x 3 = 0.06; per group 0.045 -> 0.05.
        let g = quote("0.15*1@0.1,0.15*1@0.1,0.15*1@0.1", Rounding::PerGroup).unwrap();
        let l = quote("0.15*1@0.1,0.15*1@0.1,0.15*1@0.1", Rounding::PerLine).unwrap();
        assert_eq!(
            (g["tax"].as_f64(), l["tax"].as_f64()),
            (Some(0.05), Some(0.06))
        );
        assert_eq!(
            (g["total"].as_f64(), l["total"].as_f64()),
            (Some(0.5), Some(0.51))
        );
        // One line: no grouping, so both agree.
        let g = quote("19.99*2@0.2", Rounding::PerGroup).unwrap();
        assert_eq!(g, quote("19.99*2@0.2", Rounding::PerLine).unwrap());
        assert_eq!(quote("x", Rounding::PerLine), None);
    }

    #[test]
    fn bad_behaviors_are_refused() {
        let over = Behavior {
            latency: vec![
                LatencyBand { pct: 60.0, ms: 1 },
                LatencyBand { pct: 50.0, ms: 2 },
            ],
            ..Default::default()
        };
        assert!(over.validate().is_err());
        let rate = Behavior {
            error_rate: 1.5,
            ..Default::default()
        };
        assert!(rate.validate().is_err());
    }
}
