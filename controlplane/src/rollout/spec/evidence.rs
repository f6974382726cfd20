//! The spec's `evidence` (where a rollout's evidence comes from) and
//! `metrics` (business-metric stop rules), and their validation.
//!
//! ```yaml
//! evidence:
//!   source: prometheus             # default: envoy (the stats stream)
//!   url: http://prometheus:9090
//!   preset: istio                  # default: envoy (envoy_cluster_upstream_rq*)
//!   versions: {stable: v1, canary: v2}   # what {{side}} becomes
//!   queries:                       # optional overrides: counter selectors
//!     requests: 'http_requests_total{version="{{side}}"}'
//! metrics:
//!   - name: checkout_completion    # higher is better
//!     events: 'checkout_completed_total{version="{{side}}"}'
//!     total: 'checkout_started_total{version="{{side}}"}'
//!     max_decrease_pp: 2           # canary's share at most 2 pp below stable's
//!   - name: support_tickets        # lower is better, relative to stable
//!     events: 'support_tickets_total{version="{{side}}"}'
//!     total: 'http_requests_total{version="{{side}}"}'
//!     max_ratio: 1.5               # canary's tickets per request at most 1.5 × stable's
//! ```
//!
//! Every rule is relative to stable: nobody has to guess an absolute
//! constant for a 2 am page.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use super::{SpecError, check_f64, invalid, validate_name};
use crate::evidence::prometheus::{
    self, MAX_METRICS, MetricQuery, Preset, PromTarget, Queries, TargetError,
};

/// Where a rollout's evidence comes from.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum EvidenceSpec {
    /// Envoy's stats stream to this control plane.
    #[default]
    Envoy,
    /// A Prometheus server (`target.metrics` is empty here: the spec's
    /// `metrics` are added by [`super::RolloutSpec::prometheus_target`]).
    Prometheus { preset: Preset, target: PromTarget },
}

impl EvidenceSpec {
    pub fn is_envoy(&self) -> bool {
        matches!(self, EvidenceSpec::Envoy)
    }
}

impl Serialize for EvidenceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EvidenceSpec::Envoy => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("source", "envoy")?;
                m.end()
            }
            EvidenceSpec::Prometheus { preset, target } => {
                let mut m = s.serialize_map(Some(5))?;
                m.serialize_entry("source", "prometheus")?;
                m.serialize_entry("url", &target.url)?;
                m.serialize_entry("preset", preset)?;
                m.serialize_entry(
                    "versions",
                    &RawVersions {
                        stable: Some(target.stable_label.clone()),
                        canary: Some(target.canary_label.clone()),
                    },
                )?;
                m.serialize_entry("queries", &target.queries)?;
                m.end()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawSource {
    Envoy,
    Prometheus,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping: source, url, preset, versions, queries"
)]
pub(super) struct RawEvidence {
    source: Option<RawSource>,
    url: Option<String>,
    preset: Option<Preset>,
    versions: Option<RawVersions>,
    queries: Option<RawQueries>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with stable and canary")]
struct RawVersions {
    stable: Option<String>,
    canary: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping: requests, errors, latency_buckets"
)]
struct RawQueries {
    requests: Option<String>,
    errors: Option<String>,
    latency_buckets: Option<String>,
}

fn from_target(prefix: &str, e: TargetError) -> SpecError {
    invalid(format!("{prefix}.{}", e.field), e.reason)
}

pub(super) fn validate_evidence(raw: Option<RawEvidence>) -> Result<EvidenceSpec, SpecError> {
    let Some(raw) = raw else {
        return Ok(EvidenceSpec::Envoy);
    };
    match raw.source.unwrap_or(RawSource::Envoy) {
        RawSource::Envoy => {
            if raw.url.is_some()
                || raw.preset.is_some()
                || raw.versions.is_some()
                || raw.queries.is_some()
            {
                return Err(invalid(
                    "evidence",
                    "url, preset, versions and queries are for source: prometheus",
                ));
            }
            Ok(EvidenceSpec::Envoy)
        }
        RawSource::Prometheus => {
            let url = raw.url.ok_or_else(|| {
                invalid(
                    "evidence.url",
                    "required with source: prometheus (http://host:9090)",
                )
            })?;
            prometheus::check_url("url", &url).map_err(|e| from_target("evidence", e))?;
            let preset = raw.preset.unwrap_or_default();
            let mut queries: Queries = preset.queries();
            if let Some(q) = raw.queries {
                for (name, given, slot) in [
                    ("requests", q.requests, &mut queries.requests),
                    ("errors", q.errors, &mut queries.errors),
                    (
                        "latency_buckets",
                        q.latency_buckets,
                        &mut queries.latency_buckets,
                    ),
                ] {
                    if let Some(given) = given {
                        prometheus::check_template(&format!("queries.{name}"), &given)
                            .map_err(|e| from_target("evidence", e))?;
                        *slot = given;
                    }
                }
            }
            let versions = raw.versions.unwrap_or(RawVersions {
                stable: None,
                canary: None,
            });
            let stable_label = versions.stable.unwrap_or_else(|| "stable".to_owned());
            let canary_label = versions.canary.unwrap_or_else(|| "canary".to_owned());
            prometheus::check_label("versions.stable", &stable_label)
                .map_err(|e| from_target("evidence", e))?;
            prometheus::check_label("versions.canary", &canary_label)
                .map_err(|e| from_target("evidence", e))?;
            if stable_label == canary_label {
                return Err(invalid(
                    "evidence.versions",
                    "stable and canary must differ: otherwise both sides read the same series",
                ));
            }
            Ok(EvidenceSpec::Prometheus {
                preset,
                target: PromTarget {
                    url,
                    queries,
                    stable_label,
                    canary_label,
                    metrics: Vec::new(),
                },
            })
        }
    }
}

/// A business-metric stop rule: `events / total` per side, canary
/// against stable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRule {
    pub name: String,
    /// Counter selector with `{{side}}` (or `{{cluster}}`).
    pub events: String,
    pub total: String,
    #[serde(flatten)]
    pub limit: MetricLimit,
}

/// How far the canary may be from stable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricLimit {
    /// A share where higher is better (completions per start): canary's
    /// may be at most this many percentage points below stable's.
    MaxDecreasePp(f64),
    /// A share where lower is better: at most this many points above.
    MaxIncreasePp(f64),
    /// A rate where lower is better (tickets per request): canary's at
    /// most this multiple of stable's.
    MaxRatio(f64),
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping describing one business metric"
)]
pub(super) struct RawMetric {
    name: Option<String>,
    events: Option<String>,
    total: Option<String>,
    max_decrease_pp: Option<f64>,
    max_increase_pp: Option<f64>,
    max_ratio: Option<f64>,
}

pub(super) fn validate_metrics(
    raw: Option<Vec<RawMetric>>,
    evidence: &EvidenceSpec,
) -> Result<Vec<MetricRule>, SpecError> {
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    if evidence.is_envoy() {
        return Err(invalid(
            "metrics",
            "business metrics are read from Prometheus: set evidence.source: prometheus",
        ));
    }
    if raw.len() > MAX_METRICS {
        return Err(invalid(
            "metrics",
            format!("at most {MAX_METRICS} rules, got {}", raw.len()),
        ));
    }
    let mut out: Vec<MetricRule> = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let field = |f: &str| format!("metrics[{i}].{f}");
        let name = m
            .name
            .ok_or_else(|| invalid(field("name"), "required: how the verdict names it"))?;
        validate_name(&field("name"), &name)?;
        if out.iter().any(|r| r.name == name) {
            return Err(invalid(field("name"), format!("{name:?} is used twice")));
        }
        let query = |f: &str, q: Option<String>| -> Result<String, SpecError> {
            let q =
                q.ok_or_else(|| invalid(field(f), "required: a counter selector with {{side}}"))?;
            prometheus::check_template(&field(f), &q).map_err(|e| invalid(e.field, e.reason))?;
            Ok(q)
        };
        let events = query("events", m.events)?;
        let total = query("total", m.total)?;
        let pp = |f: &str, v: f64| {
            check_f64(
                &field(f),
                v,
                |v| (0.0..=100.0).contains(&v),
                "must be 0 to 100 percentage points",
            )
        };
        let limit = match (m.max_decrease_pp, m.max_increase_pp, m.max_ratio) {
            (Some(v), None, None) => MetricLimit::MaxDecreasePp(pp("max_decrease_pp", v)?),
            (None, Some(v), None) => MetricLimit::MaxIncreasePp(pp("max_increase_pp", v)?),
            (None, None, Some(v)) => MetricLimit::MaxRatio(check_f64(
                &field("max_ratio"),
                v,
                |v| v > 1.0 && v <= 100.0,
                "must be above 1 and at most 100",
            )?),
            _ => {
                return Err(invalid(
                    format!("metrics[{i}]"),
                    "exactly one of max_decrease_pp, max_increase_pp, max_ratio",
                ));
            }
        };
        out.push(MetricRule {
            name,
            events,
            total,
            limit,
        });
    }
    Ok(out)
}

/// The spec's metrics as the source's queries.
pub(super) fn metric_queries(rules: &[MetricRule]) -> Vec<MetricQuery> {
    rules
        .iter()
        .map(|r| MetricQuery {
            name: r.name.clone(),
            events: r.events.clone(),
            total: r.total.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::RolloutSpec;
    use super::*;

    fn with(extra: &str) -> Result<RolloutSpec, SpecError> {
        RolloutSpec::from_yaml_or_json(&format!(
            "service: shop\nowner: team\nstop_rules: {{max_error_rate_increase_pp: 1}}\n{extra}"
        ))
    }

    #[test]
    fn prometheus_evidence_and_metrics_parse_and_round_trip() {
        let spec = with(
            r#"evidence:
  source: prometheus
  url: http://127.0.0.1:9090
  preset: istio
  versions: {stable: v1, canary: v2}
  queries: {requests: 'http_requests_total{version="{{side}}"}'}
metrics:
  - name: checkout_completion
    events: 'checkout_completed_total{version="{{side}}"}'
    total: 'checkout_started_total{version="{{side}}"}'
    max_decrease_pp: 2
  - name: tickets
    events: 'tickets_total{version="{{side}}"}'
    total: 'http_requests_total{version="{{side}}"}'
    max_ratio: 1.5
"#,
        )
        .unwrap();
        let target = spec.prometheus_target().unwrap();
        assert_eq!(
            target.queries.requests,
            r#"http_requests_total{version="{{side}}"}"#
        );
        assert!(target.queries.errors.contains("istio_requests_total"));
        assert_eq!(
            (target.stable_label.as_str(), target.canary_label.as_str()),
            ("v1", "v2")
        );
        assert_eq!(target.metrics.len(), 2);
        assert_eq!(spec.metrics[1].limit, MetricLimit::MaxRatio(1.5));
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            RolloutSpec::from_yaml_or_json(&text).unwrap(),
            spec,
            "{text}"
        );
        // The default stays out of a stored spec.
        let plain = with("").unwrap();
        assert!(plain.prometheus_target().is_none());
        assert!(!serde_json::to_string(&plain).unwrap().contains("evidence"));
    }

    #[test]
    fn bad_evidence_and_metrics_name_their_field() {
        let metric = |limit: &str| {
            format!(
                "evidence: {{source: prometheus, url: 'http://p:9090'}}\nmetrics:\n  - {{name: m, events: 'e{{v=\"{{{{side}}}}\"}}', total: 't{{v=\"{{{{side}}}}\"}}'{limit}}}\n"
            )
        };
        for (extra, field) in [
            ("evidence: {source: prometheus}\n", "evidence.url"),
            (
                "evidence: {source: prometheus, url: 'ftp://p'}\n",
                "evidence.url",
            ),
            ("evidence: {source: envoy, url: 'http://p'}\n", "evidence"),
            ("evidence: {source: graphite}\n", "evidence.source"),
            (
                "evidence: {source: prometheus, url: 'http://p', queries: {errors: 'up'}}\n",
                "evidence.queries.errors",
            ),
            (
                "evidence: {source: prometheus, url: 'http://p', versions: {stable: a, canary: a}}\n",
                "evidence.versions",
            ),
            (
                "evidence: {source: prometheus, url: 'http://p', versions: {stable: 'a\"}', canary: b}}\n",
                "evidence.versions.stable",
            ),
            (
                "metrics: [{name: m, events: 'e{v=\"{{side}}\"}', total: 't{v=\"{{side}}\"}', max_ratio: 2}]\n",
                "metrics",
            ),
            (&metric(""), "metrics[0]"),
            (&metric(", max_ratio: 1"), "metrics[0].max_ratio"),
            (&metric(", max_ratio: 2, max_decrease_pp: 1"), "metrics[0]"),
            (
                &metric(", max_decrease_pp: 101"),
                "metrics[0].max_decrease_pp",
            ),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.starts_with(field), "{extra}: {e}");
        }
        let e = with(
            "evidence: {source: prometheus, url: 'http://p'}\nmetrics:\n  - {name: m, events: 'up', total: 't{v=\"{{side}}\"}', max_ratio: 2}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("metrics[0].events"), "{e}");
    }
}
