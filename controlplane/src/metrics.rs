//! The control plane's own metrics, served at `GET /metrics` in the
//! Prometheus text exposition format (0.0.4) by [`crate::api::metrics`].
//!
//! **One owner per fact.** Counters live where their event happens and are
//! kept here, in one [`Metrics`] (a `prometheus::Registry` with typed
//! families) that the xDS server and the API share:
//!
//! | metric | labels | counted where |
//! |---|---|---|
//! | `understudy_xds_pushes_total` | `type` | a response went out on an ADS stream |
//! | `understudy_xds_acks_total` | `type` | Envoy accepted a version |
//! | `understudy_xds_nacks_total` | `type` | Envoy rejected a version |
//! | `understudy_api_requests_total` | `route`, `status`, `role` | every API answer |
//! | `understudy_api_throttled_total` | `reason` | a 429: `rate_limited` or `failed_logins` |
//!
//! Gauges that mirror stored state (rollouts, connected Envoys) and counters
//! another part already keeps (the shadow book's) are built from their owner
//! on each scrape ([`crate::api::metrics`]), never copied here.
//!
//! **Bounded labels.** `type` is the short xDS type name (`cds`, `eds`,
//! `lds`, `rds`, `ecds`, or `unknown`: a peer's type URL is never a label);
//! `route` is the axum route template (`/v1/rollouts/{id}`), never the raw
//! path; `status` is a status code this server produced; `role` is
//! `operator`, `viewer` or `none`. Every other label value (service, rollout
//! id, check name) is cut to [`MAX_LABEL_BYTES`] with [`label`].
//!
//! Not `prometheus-client`: it writes OpenMetrics only, whose counters
//! (family `x`, sample `x_total`) `promtool check metrics` rejects. This
//! crate writes the classic format both Prometheus and promtool read.

use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

/// Longest label value written, in bytes. Label values are operator-given
/// names (services, rollouts, checks): this caps what one series costs.
pub const MAX_LABEL_BYTES: usize = 128;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why building or writing the metrics failed (a family defined twice, or
/// inconsistent labels: a bug, found by the unit tests).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The counters, each owned by the place its event happens.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    xds_pushes: IntCounterVec,
    xds_acks: IntCounterVec,
    xds_nacks: IntCounterVec,
    api_requests: IntCounterVec,
    api_throttled: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let xds_pushes = counter(
            &r,
            "understudy_xds_pushes_total",
            "xDS responses sent to Envoys, by short type name.",
            &["type"],
        )?;
        let xds_acks = counter(
            &r,
            "understudy_xds_acks_total",
            "xDS versions Envoys accepted (ACK), by short type name.",
            &["type"],
        )?;
        let xds_nacks = counter(
            &r,
            "understudy_xds_nacks_total",
            "xDS versions Envoys rejected (NACK), by short type name.",
            &["type"],
        )?;
        // Families with no series yet are not written at all; the xDS ones
        // start at 0 for every type so `rate()` and `increase()` see the
        // first event, and a dashboard shows 0 rather than "no data".
        for t in ["cds", "eds", "lds", "rds", "ecds"] {
            for c in [&xds_pushes, &xds_acks, &xds_nacks] {
                c.with_label_values(&[t]);
            }
        }
        let api_requests = counter(
            &r,
            "understudy_api_requests_total",
            "API requests answered, by route template, status code and caller role.",
            &["route", "status", "role"],
        )?;
        let api_throttled = counter(
            &r,
            "understudy_api_throttled_total",
            "API requests refused with 429: rate_limited (a caller over its rate) or failed_logins (a peer over its failed logins).",
            &["reason"],
        )?;
        for reason in ["rate_limited", "failed_logins"] {
            api_throttled.with_label_values(&[reason]);
        }
        Ok(Self {
            registry: r,
            xds_pushes,
            xds_acks,
            xds_nacks,
            api_requests,
            api_throttled,
        })
    }

    /// An xDS response of `short_type` (see [`crate::xds::resources::type_url::short`]) went out.
    pub fn xds_pushed(&self, short_type: &'static str) {
        self.xds_pushes.with_label_values(&[short_type]).inc();
    }

    pub fn xds_acked(&self, short_type: &'static str) {
        self.xds_acks.with_label_values(&[short_type]).inc();
    }

    pub fn xds_nacked(&self, short_type: &'static str) {
        self.xds_nacks.with_label_values(&[short_type]).inc();
    }

    /// One API answer. `route` must be a route template (or a fixed word);
    /// the caller cuts nothing, so never pass a raw path.
    pub fn api_request(&self, route: &str, status: u16, role: &'static str) {
        let status = status.to_string();
        self.api_requests
            .with_label_values(&[route, status.as_str(), role])
            .inc();
    }

    /// A 429, with why: `rate_limited` or `failed_logins`.
    pub fn api_throttled(&self, reason: &'static str) {
        self.api_throttled.with_label_values(&[reason]).inc();
    }

    /// The counters, then `extra` (families built from state at scrape
    /// time), in the text exposition format.
    pub fn encode(&self, extra: Vec<MetricFamily>) -> Result<String, MetricsError> {
        let mut families = self.registry.gather();
        families.extend(extra);
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// `value` cut to at most [`MAX_LABEL_BYTES`] bytes, on a character boundary.
pub fn label(value: &str) -> &str {
    if value.len() <= MAX_LABEL_BYTES {
        return value;
    }
    let mut end = MAX_LABEL_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Families built on one scrape, from state: [`Scrape::gauge`] and
/// [`Scrape::counter`] define a family, and each `set` adds a series.
#[derive(Default)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// A gauge family with `labels`.
    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<prometheus::GaugeVec, MetricsError> {
        let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    /// A counter family whose values another part keeps (written as they
    /// are: they only grow there).
    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<prometheus::IntCounterVec, MetricsError> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    pub fn families(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_start_at_zero_for_every_type_and_count() {
        let m = Metrics::new().unwrap();
        m.xds_pushed("rds");
        m.xds_nacked("eds");
        m.api_request("/v1/rollouts/{id}", 404, "viewer");
        m.api_throttled("rate_limited");
        let text = m.encode(vec![]).unwrap();
        assert!(
            text.contains("understudy_xds_pushes_total{type=\"rds\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("understudy_xds_pushes_total{type=\"cds\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("understudy_xds_nacks_total{type=\"eds\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("understudy_xds_acks_total{type=\"ecds\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "understudy_api_requests_total{role=\"viewer\",route=\"/v1/rollouts/{id}\",status=\"404\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("understudy_api_throttled_total{reason=\"rate_limited\"} 1\n"));
        assert!(text.contains("understudy_api_throttled_total{reason=\"failed_logins\"} 0\n"));
        assert!(text.contains("# HELP understudy_xds_pushes_total "));
        assert!(text.contains("# TYPE understudy_xds_pushes_total counter"));
    }

    #[test]
    fn scrape_families_follow_the_counters_and_labels_are_cut() {
        let m = Metrics::new().unwrap();
        let s = Scrape::default();
        let g = s
            .gauge("understudy_test_value", "A test.", &["name"])
            .unwrap();
        let long = "é".repeat(1000);
        g.with_label_values(&[label(&long)]).set(2.5);
        let text = m.encode(s.families()).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("understudy_test_value{"))
            .unwrap();
        assert!(line.ends_with("} 2.5"), "{line}");
        assert!(line.len() < MAX_LABEL_BYTES + 64, "{line}");
        assert!(label(&long).len() <= MAX_LABEL_BYTES);
        assert_eq!(label("short"), "short");
    }
}
