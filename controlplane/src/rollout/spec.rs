//! The rollout spec as an operator writes it (YAML or JSON), and its
//! validation into the types the engine and the judge use.
//!
//! ```yaml
//! service: checkout
//! owner: payments-team@example.com
//! description: v2 moves tax calculation to the new engine
//! stop_rules:                      # decided before launch; at least one of the first two
//!   max_error_rate_increase_pp: 1.0  # canary 5xx rate may exceed stable's by at most 1 pp
//!   max_p99_ratio: 1.5               # canary p99 may be at most 1.5 × stable p99
//!   max_unexpected_mismatch_rate: 0.01  # shadow stage only
//!   halt_on_nack: true
//! shadow:                          # optional stage before any user sees the canary
//!   route: checkout
//!   percent: 10
//!   max_serious_rate: 0.02
//! defaults: {min_duration_s: 60, min_requests: 200}
//! steps:
//!   - weight: 5
//!   - weight: 20
//!   - {weight: 50, manual_gate: true}
//!   - weight: 100
//! analysis: {interval_s: 1, max_staleness_s: 10, min_requests_per_side: 100, confidence: 0.99}
//! notifications:                   # optional webhooks, every body signed (HMAC-SHA256)
//!   - url: https://hooks.example.com/releases
//!     secret_file: /etc/understudy/hook.key
//!     format: generic              # or slack
//!     events: [rolled_back, succeeded]   # default: all six
//! flags:                           # circuit-breaker flags (see super::flags)
//!   - {key: new-checkout, description: the new tax engine's code path}
//! ```
//!
//! Parsing goes through private `Raw*` types that accept anything of the
//! right shape (every field optional, unknown fields refused), then
//! [`TryFrom`] checks every rule and fills the defaults, so a
//! [`RolloutSpec`] in hand is always valid. The same path is used when a
//! stored spec is read back (`Deserialize` goes through the raw types), so
//! a spec can never skip validation by being loaded from the database.
//!
//! Backends: the rollout moves traffic between the service's own clusters,
//! `<service>-stable` and `<service>-canary` ([`RolloutSpec::stable_cluster`],
//! [`RolloutSpec::canary_cluster`]). There are no per-rollout overrides:
//! the clusters are what the control plane already builds for the service,
//! and a second way to name them would only be a second way to get it wrong.
//!
//! YAML is read with `serde_norway`: `serde_yaml` is archived and
//! deprecated, and of its maintained forks `serde_norway` has the most
//! recent releases (on a maintained libyaml port) and is licensed like this
//! project. JSON text (starting with `{`) is read with `serde_json` first,
//! because a YAML 1.1 parser refuses some valid JSON, such as
//! tab-indented documents; YAML flow mappings that are not JSON fall back
//! to the YAML parser. `serde_path_to_error` gives every type error the path
//! of its field (`steps[2].weight: invalid type: ...`).

use serde::{Deserialize, Serialize};

use crate::evidence::probes::{self, Expect, JsonExpect, ProbeCheck};
use crate::evidence::prometheus::PromTarget;
use crate::model::{Cohort, MAX_COHORTS, PROBE_HEADER};

mod evidence;
pub use evidence::{EvidenceSpec, MetricLimit, MetricRule};

/// Every default of the spec, in one place.
pub mod defaults {
    /// Canary weights when `steps` is omitted.
    pub const STEP_WEIGHTS: [u32; 5] = [1, 5, 20, 50, 100];
    /// A step's minimum duration unless `defaults` or the step says otherwise.
    pub const STEP_MIN_DURATION_S: f64 = 60.0;
    /// A step's minimum canary requests unless `defaults` or the step says otherwise.
    pub const STEP_MIN_REQUESTS: u64 = 200;
    pub const HALT_ON_NACK: bool = true;
    pub const MIN_P99_INCREASE_MS: f64 = 5.0;
    pub const SHADOW_MIN_DURATION_S: f64 = 60.0;
    pub const SHADOW_MIN_COMPARED: u64 = 200;
    /// Pairs a traffic segment needs before `shadow.per_segment` can fail it.
    pub const SEGMENT_MIN_COMPARED: u64 = 50;
    pub const INTERVAL_S: f64 = 1.0;
    pub const MAX_STALENESS_S: f64 = 10.0;
    pub const MIN_REQUESTS_PER_SIDE: u64 = 100;
    pub const CONFIDENCE: f64 = 0.99;
}

/// The engine evaluates at most this often: below it, evaluations would
/// mostly see the same metrics again.
pub const MIN_INTERVAL_S: f64 = 0.2;
/// Longer intervals, staleness limits or step durations than this are
/// almost certainly unit mistakes (ms written as s).
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// Why a spec was refused. Every message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The text holds no document at all.
    #[error("the rollout spec is empty")]
    Empty,
    /// The text is not YAML or JSON, a field has the wrong type, or a
    /// field is unknown. `path` is where (`steps[2].weight`), empty for the
    /// document itself.
    #[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
    Syntax { path: String, message: String },
    /// A field is missing or its value breaks a rule.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A validated rollout spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSpec")]
pub struct RolloutSpec {
    /// The service in the control plane whose canary is rolled out. Only
    /// its form is checked here; the caller checks that it exists.
    pub service: String,
    /// Who answers for this rollout.
    pub owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub stop_rules: StopRules,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStage>,
    /// Weights strictly increasing, the last one 100.
    pub steps: Vec<CanaryStep>,
    pub analysis: Analysis,
    /// What happens after the last step succeeds.
    #[serde(default)]
    pub finalize: Finalize,
    /// Webhooks told of the rollout's events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Webhook>,
    /// Where the evidence comes from (default: Envoy's stats stream).
    #[serde(skip_serializing_if = "EvidenceSpec::is_envoy")]
    pub evidence: EvidenceSpec,
    /// Business-metric stop rules (with Prometheus evidence).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricRule>,
    /// Synthetic probes sent to stable and canary separately while the
    /// rollout runs and is not paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<Probes>,
    /// Circuit-breaker flags: on for whom the canary serves, off after a
    /// rollback (their state is derived from the phase: [`super::flags`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Flag>,
}

/// A rollout's synthetic probes: each check goes through Envoy to stable
/// and to canary, pinned by a header only the control plane knows, every
/// `every_s`, in every phase (the shadow stage and weight 0 included).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Probes {
    pub checks: Vec<ProbeCheck>,
    /// Canary probe failures a step (or the shadow stage) tolerates; one
    /// more rolls back.
    pub max_failures: u64,
    /// Canary probes that must have passed in the step before it may pass.
    pub min_passed: u64,
    /// A step that saw no live request at all (fresh data, zero requests on
    /// both sides) may pass on probes alone, and its verdict says so.
    pub judge_idle_on_probes: bool,
}

pub use crate::model::{MAX_FLAG_KEY, MAX_FLAGS, is_flag_key};
/// Longest flag description.
pub const MAX_FLAG_DESCRIPTION: usize = 1024;

/// A flag a rollout declares. Its key is `[A-Za-z0-9._-]`, 1 to
/// [`MAX_FLAG_KEY`] characters: safe in a URL path segment, an OFREP body
/// and the `x-understudy-flags` header without escaping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flag {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Most webhooks one rollout may have.
pub const MAX_WEBHOOKS: usize = 8;
/// Longest webhook URL or secret file path.
pub const MAX_WEBHOOK_TEXT: usize = 2048;

/// A receiver of a rollout's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Webhook {
    /// An `http` or `https` URL. It is shown with the rollout: a URL that
    /// is itself a secret (a Slack webhook's) is visible to viewers.
    pub url: String,
    /// A file holding the HMAC-SHA256 key every body is signed with (read
    /// at each delivery, so it can be rotated in place).
    pub secret_file: String,
    pub format: WebhookFormat,
    /// The events sent; empty: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventKind>,
}

impl Webhook {
    pub fn wants(&self, event: EventKind) -> bool {
        self.events.is_empty() || self.events.contains(&event)
    }

    /// The URL without its path and query, for logs and the audit (a
    /// Slack webhook's path is its secret).
    pub fn origin(&self) -> String {
        reqwest::Url::parse(&self.url).map_or_else(
            |_| "(invalid url)".to_owned(),
            |u| u.origin().ascii_serialization(),
        )
    }
}

/// The events a webhook can receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The rollout was created (its first phase is in the event).
    Created,
    /// Traffic moved to a later canary step (or from the shadow stage to
    /// the first step).
    StepAdvanced,
    /// The next step waits for a manual promote.
    AwaitingApproval,
    RolledBack,
    Succeeded,
    Aborted,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Created,
        EventKind::StepAdvanced,
        EventKind::AwaitingApproval,
        EventKind::RolledBack,
        EventKind::Succeeded,
        EventKind::Aborted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::StepAdvanced => "step_advanced",
            EventKind::AwaitingApproval => "awaiting_approval",
            EventKind::RolledBack => "rolled_back",
            EventKind::Succeeded => "succeeded",
            EventKind::Aborted => "aborted",
        }
    }
}

/// A webhook body's shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The event as a JSON object (`crate::rollout::events::RolloutEvent`).
    #[default]
    Generic,
    /// Slack's incoming-webhook body: `{"text": "..."}`.
    Slack,
}

/// Finishing a successful rollout: the canary's backend becomes the
/// service's stable backend and the weight returns to 0, so the service is
/// ready for the next rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with automatic and canary")]
pub struct Finalize {
    /// Finalize as soon as the rollout succeeds (default), or wait for
    /// `understudy rollout finalize <id>`.
    #[serde(default = "yes")]
    pub automatic: bool,
    /// What the canary backend keeps afterwards.
    #[serde(default)]
    pub canary: CanaryAfterFinalize,
}

fn yes() -> bool {
    true
}

impl Default for Finalize {
    fn default() -> Self {
        Self {
            automatic: true,
            canary: CanaryAfterFinalize::default(),
        }
    }
}

/// The canary backend after finalizing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryAfterFinalize {
    /// Keep its endpoints (at weight 0 they serve nothing): the default.
    #[default]
    Keep,
    /// Remove them, once every connected Envoy has moved its traffic.
    Empty,
}

/// When the rollout must stop, decided before launch. At least one of
/// `max_error_rate_increase_pp` and `max_p99_ratio` is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StopRules {
    /// Canary 5xx rate minus stable's, in percentage points (1.0: stable at
    /// 1% allows the canary up to 2%). 0 means no increase at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_error_rate_increase_pp: Option<f64>,
    /// Canary p99 latency ÷ stable p99 latency; above 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// The smallest p99 increase (ms) that counts as a regression, whatever
    /// the ratio: at a few milliseconds a ratio is scheduling noise (a
    /// canary at 1% sees few requests, so one slow one moves its tail).
    pub min_p99_increase_ms: f64,
    /// Shadow stage: share of compared pairs with a difference no
    /// expected-divergence rule covers (0.01 = 1%). Required with a shadow stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unexpected_mismatch_rate: Option<f64>,
    /// Halt (roll back) when an Envoy rejects anything pushed for the rollout.
    pub halt_on_nack: bool,
    /// Stop rules on other quantiles and on the slow share.
    #[serde(flatten)]
    pub latency: LatencyRules,
}

/// Latency stop rules besides p99, all optional: ratios of the canary's
/// quantile to stable's (each above 1), and "share of requests slower than
/// `slow_request_ms`", canary minus stable, in percentage points (both or
/// neither; exact when `slow_request_ms` is one of Envoy's bucket bounds).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencyRules {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_p50_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_p90_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_p999_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_request_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_slow_share_increase_pp: Option<f64>,
}

/// The optional shadow stage: the canary answers a sampled copy of live
/// traffic and is compared with stable before it serves anyone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowStage {
    /// The filter route whose traffic is shadowed.
    pub route: String,
    /// Share of the route's requests copied, in (0, 100].
    pub percent: f64,
    pub min_duration_s: f64,
    pub min_compared: u64,
    /// To pass, the serious-mismatch rate must be shown (upper confidence
    /// bound) at or below this fraction.
    pub max_serious_rate: f64,
    /// To pass, the unexpected-mismatch rate must be shown at or below this
    /// fraction; defaults to `stop_rules.max_unexpected_mismatch_rate`.
    pub max_unexpected_rate: f64,
    /// A stop rule per traffic segment (the filter route's `segment_by`):
    /// the worst segment rolls the stage back even when the average passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_segment: Option<SegmentGate>,
}

/// `shadow.per_segment`: any one traffic segment whose unexpected-mismatch
/// rate is significantly above `max_unexpected_rate`, once it has at least
/// `min_compared` pairs, fails the shadow stage (a rollback).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SegmentGate {
    pub max_unexpected_rate: f64,
    /// Pairs a segment needs before it can fail the gate.
    pub min_compared: u64,
}

/// One canary step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CanaryStep {
    /// Canary share of traffic, 0..=100 (0 only for a step whose cohort
    /// alone sees the canary).
    pub weight: u32,
    /// A cohort that goes to the canary from this step on, whatever the
    /// weight (until the rollout ends: a rollback removes it at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cohort: Option<Cohort>,
    /// The step lasts at least this long before it may pass.
    pub min_duration_s: f64,
    /// The canary serves at least this many requests in the step before it may pass.
    pub min_requests: u64,
    /// Wait for a manual promote before this step's weight goes out.
    pub manual_gate: bool,
}

/// How the judge looks at the evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    /// The longest the engine goes between looks, in seconds (fractions
    /// allowed, at least 0.2); it also looks as soon as newer evidence
    /// arrives (see the engine's `MIN_LOOK_GAP_MS`).
    pub interval_s: f64,
    /// Data older than this is stale: the rollout holds.
    pub max_staleness_s: f64,
    /// Fewer requests than this on either side: no statistical verdict.
    pub min_requests_per_side: u64,
    /// Each stop rule's test rolls back a canary that is as good as stable
    /// with probability at most `1 - confidence`, however often it looks.
    pub confidence: f64,
}

impl Analysis {
    /// The error allowed to each stop rule's test: `1 - confidence`.
    pub fn alpha(&self) -> f64 {
        1.0 - self.confidence
    }
}

impl RolloutSpec {
    /// Parses and validates a spec written in YAML or JSON.
    pub fn from_yaml_or_json(text: &str) -> Result<Self, SpecError> {
        Self::try_from(parse_raw(text)?)
    }

    /// The service's stable cluster, where traffic not sent to the canary goes.
    pub fn stable_cluster(&self) -> String {
        format!("{}-stable", self.service)
    }

    /// The service's canary cluster.
    pub fn canary_cluster(&self) -> String {
        format!("{}-canary", self.service)
    }

    /// What to read from Prometheus, business metrics included; `None`
    /// when the evidence is Envoy's stats stream.
    pub fn prometheus_target(&self) -> Option<PromTarget> {
        match &self.evidence {
            EvidenceSpec::Envoy => None,
            EvidenceSpec::Prometheus { target, .. } => Some(PromTarget {
                metrics: evidence::metric_queries(&self.metrics),
                ..target.clone()
            }),
        }
    }
}

// === raw (as written) ===

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rollout spec: a mapping with service, owner, stop_rules, ..."
)]
struct RawSpec {
    service: Option<String>,
    owner: Option<String>,
    description: Option<String>,
    stop_rules: Option<RawStopRules>,
    shadow: Option<RawShadow>,
    defaults: Option<RawDefaults>,
    steps: Option<Vec<RawStep>>,
    analysis: Option<RawAnalysis>,
    finalize: Option<Finalize>,
    notifications: Option<Vec<RawWebhook>>,
    evidence: Option<evidence::RawEvidence>,
    metrics: Option<Vec<evidence::RawMetric>>,
    probes: Option<RawProbes>,
    flags: Option<Vec<RawFlag>>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with checks, max_failures, ..."
)]
struct RawProbes {
    checks: Option<Vec<RawProbeCheck>>,
    max_failures: Option<u64>,
    min_passed: Option<u64>,
    judge_idle_on_probes: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping describing one probe check"
)]
struct RawProbeCheck {
    name: Option<String>,
    method: Option<String>,
    path: Option<String>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    body: Option<String>,
    expect: Option<RawExpect>,
    every_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with status and optionally json"
)]
struct RawExpect {
    status: Option<u16>,
    json: Option<RawJsonExpect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with pointer and equals")]
struct RawJsonExpect {
    pointer: Option<String>,
    equals: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping describing one flag: key, description"
)]
struct RawFlag {
    key: Option<String>,
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping describing one webhook")]
struct RawWebhook {
    url: Option<String>,
    secret_file: Option<String>,
    format: Option<WebhookFormat>,
    events: Option<Vec<EventKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of stop rules")]
struct RawStopRules {
    max_error_rate_increase_pp: Option<f64>,
    max_p99_ratio: Option<f64>,
    min_p99_increase_ms: Option<f64>,
    max_unexpected_mismatch_rate: Option<f64>,
    halt_on_nack: Option<bool>,
    max_p50_ratio: Option<f64>,
    max_p90_ratio: Option<f64>,
    max_p999_ratio: Option<f64>,
    slow_request_ms: Option<f64>,
    max_slow_share_increase_pp: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping describing the shadow stage"
)]
struct RawShadow {
    route: Option<String>,
    percent: Option<f64>,
    min_duration_s: Option<f64>,
    min_compared: Option<u64>,
    max_serious_rate: Option<f64>,
    max_unexpected_rate: Option<f64>,
    per_segment: Option<RawSegmentGate>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with max_unexpected_rate and min_compared"
)]
struct RawSegmentGate {
    max_unexpected_rate: Option<f64>,
    min_compared: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of step defaults")]
struct RawDefaults {
    min_duration_s: Option<f64>,
    min_requests: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping describing one step")]
struct RawStep {
    weight: Option<u32>,
    cohort: Option<Cohort>,
    min_duration_s: Option<f64>,
    min_requests: Option<u64>,
    manual_gate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of analysis settings")]
struct RawAnalysis {
    interval_s: Option<f64>,
    max_staleness_s: Option<f64>,
    min_requests_per_side: Option<u64>,
    confidence: Option<f64>,
}

fn parse_raw(text: &str) -> Result<RawSpec, SpecError> {
    let mut json_error = None;
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = serde_path_to_error::deserialize::<_, RawSpec>(&mut de)
            .map_err(|e| (e.path().to_string(), e.into_inner()))
            .and_then(|raw| de.end().map(|()| raw).map_err(|e| (String::new(), e)));
        match parsed {
            Ok(raw) => return Ok(raw),
            // Maybe not JSON but a YAML flow mapping: YAML decides.
            Err((_, e)) if e.is_syntax() || e.is_eof() => json_error = Some(e.to_string()),
            Err((path, e)) => return Err(syntax(&path, e.to_string())),
        }
    }
    let value: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| match &json_error {
            Some(json) => syntax("", format!("neither JSON ({json}) nor YAML ({e})")),
            None => syntax("", e.to_string()),
        })?;
    if value.is_null() {
        return Err(SpecError::Empty);
    }
    serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        syntax(&path, strip_path(&path, e.into_inner().to_string()))
    })
}

/// serde_norway starts a nested error with the path of the map it is in;
/// the error's own path (which for an unknown field includes the field)
/// replaces it.
fn strip_path(path: &str, message: String) -> String {
    if let Some((head, rest)) = message.split_once(": ")
        && !head.is_empty()
        && path
            .strip_prefix(head)
            .is_some_and(|tail| tail.is_empty() || tail.starts_with(['.', '[']))
    {
        return rest.to_owned();
    }
    message
}

fn syntax(path: &str, message: String) -> SpecError {
    SpecError::Syntax {
        // serde_path_to_error names the document itself ".".
        path: if path == "." {
            String::new()
        } else {
            path.to_owned()
        },
        message,
    }
}

// === validation ===

impl TryFrom<RawSpec> for RolloutSpec {
    type Error = SpecError;

    fn try_from(raw: RawSpec) -> Result<Self, SpecError> {
        let service = raw.service.ok_or_else(|| {
            invalid(
                "service",
                "required: the name of the service whose canary is rolled out",
            )
        })?;
        validate_name("service", &service)?;
        let owner = raw
            .owner
            .ok_or_else(|| invalid("owner", "required: who answers for this rollout"))?;
        if owner.trim().is_empty() {
            return Err(invalid("owner", "must not be empty"));
        }
        let stop_rules = raw.stop_rules.ok_or_else(|| {
            invalid(
                "stop_rules",
                "required: decide before launch when the rollout must stop \
                 (max_error_rate_increase_pp and/or max_p99_ratio)",
            )
        })?;
        let stop_rules = StopRules::try_from(stop_rules)?;
        let shadow = raw
            .shadow
            .map(|s| ShadowStage::validate(s, &stop_rules))
            .transpose()?;
        let steps = validate_steps(raw.defaults, raw.steps)?;
        let evidence = evidence::validate_evidence(raw.evidence)?;
        let analysis = Analysis::try_from(raw.analysis.unwrap_or(RawAnalysis {
            interval_s: None,
            max_staleness_s: None,
            min_requests_per_side: None,
            confidence: None,
        }))?;
        Ok(Self {
            service,
            owner,
            description: raw.description,
            stop_rules,
            shadow,
            steps,
            analysis,
            finalize: raw.finalize.unwrap_or_default(),
            notifications: validate_webhooks(raw.notifications.unwrap_or_default())?,
            metrics: evidence::validate_metrics(raw.metrics, &evidence)?,
            evidence,
            probes: raw.probes.map(validate_probes).transpose()?,
            flags: validate_flags(raw.flags.unwrap_or_default())?,
        })
    }
}

/// Defaults of the `probes` block.
pub mod probe_defaults {
    pub const EVERY_S: f64 = 1.0;
    pub const METHOD: &str = "GET";
    pub const MAX_FAILURES: u64 = 0;
    pub const MIN_PASSED: u64 = 3;
    pub const JUDGE_IDLE_ON_PROBES: bool = false;
}

/// Methods a probe may use.
const PROBE_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
/// Headers a probe may not set: the pin (the control plane's own), and
/// those that frame or route the request (the client sets them).
const PROBE_RESERVED_HEADERS: [&str; 6] = [
    PROBE_HEADER,
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
];
const MAX_PROBE_HEADERS: usize = 16;
const MAX_PROBE_TEXT: usize = 2048;

fn validate_probes(raw: RawProbes) -> Result<Probes, SpecError> {
    let checks = raw.checks.unwrap_or_default();
    if checks.is_empty() {
        return Err(invalid("probes.checks", "required: at least one check"));
    }
    if checks.len() > probes::MAX_CHECKS {
        return Err(invalid(
            "probes.checks",
            format!(
                "at most {} checks, got {}",
                probes::MAX_CHECKS,
                checks.len()
            ),
        ));
    }
    let mut out: Vec<ProbeCheck> = Vec::with_capacity(checks.len());
    for (i, c) in checks.into_iter().enumerate() {
        let field = |f: &str| format!("probes.checks[{i}].{f}");
        let name = c
            .name
            .ok_or_else(|| invalid(field("name"), "required: the name verdicts use"))?;
        validate_name(&field("name"), &name)?;
        if out.iter().any(|o| o.name == name) {
            return Err(invalid(field("name"), format!("{name:?} is used twice")));
        }
        let method = c
            .method
            .unwrap_or_else(|| probe_defaults::METHOD.to_owned());
        if !PROBE_METHODS.contains(&method.as_str()) {
            return Err(invalid(
                field("method"),
                format!("{method:?} is not one of {}", PROBE_METHODS.join(", ")),
            ));
        }
        let path = c
            .path
            .ok_or_else(|| invalid(field("path"), "required: the path to request, like /health"))?;
        if !path.starts_with('/')
            || path.len() > MAX_PROBE_TEXT
            || !path.chars().all(|ch| ch.is_ascii_graphic() && ch != '#')
        {
            return Err(invalid(
                field("path"),
                format!(
                    "must start with / and be at most {MAX_PROBE_TEXT} visible ASCII characters without #"
                ),
            ));
        }
        let headers = c.headers.unwrap_or_default();
        if headers.len() > MAX_PROBE_HEADERS {
            return Err(invalid(
                field("headers"),
                format!("at most {MAX_PROBE_HEADERS} headers"),
            ));
        }
        for (k, v) in &headers {
            crate::model::check_header_name(k)
                .map_err(|why| invalid(format!("{}.{k}", field("headers")), why))?;
            if PROBE_RESERVED_HEADERS.contains(&k.as_str()) || k.starts_with("x-understudy-") {
                return Err(invalid(
                    format!("{}.{k}", field("headers")),
                    "is set by the control plane or the client, not by a probe",
                ));
            }
            if v.len() > MAX_PROBE_TEXT || !v.chars().all(|ch| ch == ' ' || ch.is_ascii_graphic()) {
                return Err(invalid(
                    format!("{}.{k}", field("headers")),
                    format!("must be at most {MAX_PROBE_TEXT} visible ASCII characters"),
                ));
            }
        }
        if let Some(body) = &c.body
            && body.len() > probes::MAX_BODY_BYTES
        {
            return Err(invalid(
                field("body"),
                format!("at most {} bytes", probes::MAX_BODY_BYTES),
            ));
        }
        let expect = c.expect.ok_or_else(|| {
            invalid(
                field("expect"),
                "required: the status (and optionally a JSON field) a healthy answer has",
            )
        })?;
        let status = expect
            .status
            .ok_or_else(|| invalid(field("expect.status"), "required: like 200"))?;
        if !(100..=599).contains(&status) {
            return Err(invalid(
                field("expect.status"),
                format!("must be an HTTP status from 100 to 599, got {status}"),
            ));
        }
        let json = expect
            .json
            .map(|j| {
                let pointer = j.pointer.ok_or_else(|| {
                    invalid(field("expect.json.pointer"), "required: like /status")
                })?;
                if !(pointer.starts_with('/') && pointer.len() <= 256) {
                    return Err(invalid(
                        field("expect.json.pointer"),
                        "must be a JSON pointer (RFC 6901) starting with /, at most 256 characters",
                    ));
                }
                let equals = j.equals.ok_or_else(|| {
                    invalid(field("expect.json.equals"), "required: the value expected")
                })?;
                if equals.to_string().len() > 256 {
                    return Err(invalid(
                        field("expect.json.equals"),
                        "at most 256 characters of JSON",
                    ));
                }
                Ok(JsonExpect { pointer, equals })
            })
            .transpose()?;
        let every_s = check_f64(
            &field("every_s"),
            c.every_s.unwrap_or(probe_defaults::EVERY_S),
            |v| (probes::MIN_EVERY_S..=3600.0).contains(&v),
            &format!("must be from {} to 3600 seconds", probes::MIN_EVERY_S),
        )?;
        out.push(ProbeCheck {
            name,
            method,
            path,
            headers,
            body: c.body,
            expect: Expect { status, json },
            every_s,
        });
    }
    // Each check is sent to both sides.
    let rate: f64 = out.iter().map(|c| 2.0 / c.every_s).sum();
    if rate > probes::MAX_RATE_PER_S {
        return Err(invalid(
            "probes.checks",
            format!(
                "{rate:.1} probes per second (each check to both sides), at most {}: raise every_s",
                probes::MAX_RATE_PER_S
            ),
        ));
    }
    let min_passed = raw.min_passed.unwrap_or(probe_defaults::MIN_PASSED);
    if min_passed == 0 {
        return Err(invalid(
            "probes.min_passed",
            "must be at least 1: no verdict on probes that never ran",
        ));
    }
    Ok(Probes {
        checks: out,
        max_failures: raw.max_failures.unwrap_or(probe_defaults::MAX_FAILURES),
        min_passed,
        judge_idle_on_probes: raw
            .judge_idle_on_probes
            .unwrap_or(probe_defaults::JUDGE_IDLE_ON_PROBES),
    })
}

fn validate_flags(raw: Vec<RawFlag>) -> Result<Vec<Flag>, SpecError> {
    if raw.len() > MAX_FLAGS {
        return Err(invalid(
            "flags",
            format!("at most {MAX_FLAGS} flags, got {}", raw.len()),
        ));
    }
    let mut out: Vec<Flag> = Vec::with_capacity(raw.len());
    for (i, f) in raw.into_iter().enumerate() {
        let field = |f: &str| format!("flags[{i}].{f}");
        let key = f
            .key
            .ok_or_else(|| invalid(field("key"), "required: the flag's name in OpenFeature"))?;
        if !is_flag_key(&key) {
            let shown: String = key.chars().take(MAX_FLAG_KEY).collect();
            return Err(invalid(
                field("key"),
                format!("{shown:?} must be 1 to {MAX_FLAG_KEY} characters of A-Z a-z 0-9 . _ -"),
            ));
        }
        if out.iter().any(|o| o.key == key) {
            return Err(invalid(field("key"), format!("{key:?} is declared twice")));
        }
        if let Some(d) = &f.description
            && d.chars().count() > MAX_FLAG_DESCRIPTION
        {
            return Err(invalid(
                field("description"),
                format!("at most {MAX_FLAG_DESCRIPTION} characters"),
            ));
        }
        out.push(Flag {
            key,
            description: f.description,
        });
    }
    Ok(out)
}

fn validate_webhooks(raw: Vec<RawWebhook>) -> Result<Vec<Webhook>, SpecError> {
    if raw.len() > MAX_WEBHOOKS {
        return Err(invalid(
            "notifications",
            format!("at most {MAX_WEBHOOKS} webhooks, got {}", raw.len()),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, w)| {
            let field = |f: &str| format!("notifications[{i}].{f}");
            let url = w
                .url
                .ok_or_else(|| invalid(field("url"), "required: where the events go"))?;
            if url.len() > MAX_WEBHOOK_TEXT {
                return Err(invalid(
                    field("url"),
                    format!("at most {MAX_WEBHOOK_TEXT} characters"),
                ));
            }
            let parsed = reqwest::Url::parse(&url)
                .map_err(|e| invalid(field("url"), format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(invalid(
                    field("url"),
                    "must be an http or https URL with a host",
                ));
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(invalid(
                    field("url"),
                    "must not carry credentials (it is shown with the rollout)",
                ));
            }
            let secret_file = w.secret_file.ok_or_else(|| {
                invalid(
                    field("secret_file"),
                    "required: a file with the key every body is signed with (HMAC-SHA256)",
                )
            })?;
            if !secret_file.starts_with('/') || secret_file.len() > MAX_WEBHOOK_TEXT {
                return Err(invalid(
                    field("secret_file"),
                    format!("must be an absolute path of at most {MAX_WEBHOOK_TEXT} characters"),
                ));
            }
            if w.events.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(
                    field("events"),
                    "must not be empty (omit it for all events)",
                ));
            }
            let mut events: Vec<EventKind> = Vec::new();
            for e in w.events.unwrap_or_default() {
                if !events.contains(&e) {
                    events.push(e);
                }
            }
            Ok(Webhook {
                url,
                secret_file,
                format: w.format.unwrap_or_default(),
                events,
            })
        })
        .collect()
}

fn validate_name(field: &str, value: &str) -> Result<(), SpecError> {
    understudy_core::config::validate_name(field, value).map_err(|e| match e {
        understudy_core::config::ConfigError::InvalidName { value, reason, .. } => {
            invalid(field, format!("{value:?} is not a valid name: {reason}"))
        }
        other => invalid(field, other.to_string()),
    })
}

/// A finite number, in range.
fn check_f64(
    field: &str,
    value: f64,
    ok: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64, SpecError> {
    if value.is_finite() && ok(value) {
        Ok(value)
    } else {
        Err(invalid(field, format!("{rule}, got {value}")))
    }
}

fn check_seconds(field: &str, value: f64) -> Result<f64, SpecError> {
    check_f64(
        field,
        value,
        |v| (0.0..=MAX_SECONDS).contains(&v),
        "must be a number of seconds from 0 to 604800 (a week)",
    )
}

impl TryFrom<RawStopRules> for StopRules {
    type Error = SpecError;

    fn try_from(raw: RawStopRules) -> Result<Self, SpecError> {
        let pp = raw
            .max_error_rate_increase_pp
            .map(|v| {
                check_f64(
                    "stop_rules.max_error_rate_increase_pp",
                    v,
                    |v| (0.0..100.0).contains(&v),
                    "must be from 0 to below 100 percentage points",
                )
            })
            .transpose()?;
        let ratio = raw
            .max_p99_ratio
            .map(|v| check_f64("stop_rules.max_p99_ratio", v, |v| v > 1.0, "must be > 1"))
            .transpose()?;
        let min_increase = check_f64(
            "stop_rules.min_p99_increase_ms",
            raw.min_p99_increase_ms
                .unwrap_or(defaults::MIN_P99_INCREASE_MS),
            |v| (0.0..=60_000.0).contains(&v),
            "must be from 0 to 60000 ms",
        )?;
        let unexpected = raw
            .max_unexpected_mismatch_rate
            .map(|v| {
                check_f64(
                    "stop_rules.max_unexpected_mismatch_rate",
                    v,
                    |v| (0.0..1.0).contains(&v),
                    "must be a fraction from 0 to below 1 (0.01 = 1%)",
                )
            })
            .transpose()?;
        let quantile_ratio = |field: &str, v: Option<f64>| {
            v.map(|v| check_f64(field, v, |v| v > 1.0, "must be > 1"))
                .transpose()
        };
        let latency = LatencyRules {
            max_p50_ratio: quantile_ratio("stop_rules.max_p50_ratio", raw.max_p50_ratio)?,
            max_p90_ratio: quantile_ratio("stop_rules.max_p90_ratio", raw.max_p90_ratio)?,
            max_p999_ratio: quantile_ratio("stop_rules.max_p999_ratio", raw.max_p999_ratio)?,
            slow_request_ms: raw
                .slow_request_ms
                .map(|v| {
                    check_f64(
                        "stop_rules.slow_request_ms",
                        v,
                        |v| v > 0.0 && v <= 3_600_000.0,
                        "must be above 0 and at most 3600000 ms",
                    )
                })
                .transpose()?,
            max_slow_share_increase_pp: raw
                .max_slow_share_increase_pp
                .map(|v| {
                    check_f64(
                        "stop_rules.max_slow_share_increase_pp",
                        v,
                        |v| (0.0..100.0).contains(&v),
                        "must be from 0 to below 100 percentage points",
                    )
                })
                .transpose()?,
        };
        if latency.slow_request_ms.is_some() != latency.max_slow_share_increase_pp.is_some() {
            return Err(invalid(
                "stop_rules.slow_request_ms",
                "set slow_request_ms and max_slow_share_increase_pp together",
            ));
        }
        if pp.is_none() && ratio.is_none() {
            return Err(invalid(
                "stop_rules",
                "set at least one of max_error_rate_increase_pp and max_p99_ratio",
            ));
        }
        Ok(Self {
            max_error_rate_increase_pp: pp,
            max_p99_ratio: ratio,
            min_p99_increase_ms: min_increase,
            max_unexpected_mismatch_rate: unexpected,
            halt_on_nack: raw.halt_on_nack.unwrap_or(defaults::HALT_ON_NACK),
            latency,
        })
    }
}

impl ShadowStage {
    fn validate(raw: RawShadow, rules: &StopRules) -> Result<Self, SpecError> {
        let route = raw.route.ok_or_else(|| {
            invalid(
                "shadow.route",
                "required: the filter route whose traffic is shadowed",
            )
        })?;
        validate_name("shadow.route", &route)?;
        let percent = raw.percent.ok_or_else(|| {
            invalid(
                "shadow.percent",
                "required: the share of the route's requests to copy (0 to 100)",
            )
        })?;
        let percent = check_f64(
            "shadow.percent",
            percent,
            |v| v > 0.0 && v <= 100.0,
            "must be above 0 and at most 100",
        )?;
        let min_duration_s = check_seconds(
            "shadow.min_duration_s",
            raw.min_duration_s
                .unwrap_or(defaults::SHADOW_MIN_DURATION_S),
        )?;
        let min_compared = raw.min_compared.unwrap_or(defaults::SHADOW_MIN_COMPARED);
        if min_compared == 0 {
            return Err(invalid("shadow.min_compared", "must be at least 1"));
        }
        // The stage is the gate before any user sees the canary, so the
        // unexpected-mismatch stop rule must be decided with it.
        let stop = rules.max_unexpected_mismatch_rate.ok_or_else(|| {
            invalid(
                "stop_rules.max_unexpected_mismatch_rate",
                "required when a shadow stage is set",
            )
        })?;
        // Rates of 0 could never be shown by a confidence bound, so the
        // stage could never pass.
        let fraction = "must be a fraction above 0 and below 1 (0.01 = 1%)";
        let max_serious_rate = raw.max_serious_rate.ok_or_else(|| {
            invalid(
                "shadow.max_serious_rate",
                "required: the serious-mismatch rate the stage must show it stays under",
            )
        })?;
        let max_serious_rate = check_f64(
            "shadow.max_serious_rate",
            max_serious_rate,
            |v| v > 0.0 && v < 1.0,
            fraction,
        )?;
        let max_unexpected_rate = match raw.max_unexpected_rate {
            Some(v) => {
                let v = check_f64(
                    "shadow.max_unexpected_rate",
                    v,
                    |v| v > 0.0 && v < 1.0,
                    fraction,
                )?;
                if v > stop {
                    return Err(invalid(
                        "shadow.max_unexpected_rate",
                        format!(
                            "{v} is above stop_rules.max_unexpected_mismatch_rate {stop}: \
                             the stage would pass rates the stop rule rolls back"
                        ),
                    ));
                }
                v
            }
            None if stop > 0.0 => stop,
            None => {
                return Err(invalid(
                    "shadow.max_unexpected_rate",
                    "required when stop_rules.max_unexpected_mismatch_rate is 0 \
                     (a rate of 0 can never be shown)",
                ));
            }
        };
        let per_segment = raw
            .per_segment
            .map(|g| {
                let max = g.max_unexpected_rate.ok_or_else(|| {
                    invalid(
                        "shadow.per_segment.max_unexpected_rate",
                        "required: the unexpected-mismatch rate no one segment may exceed",
                    )
                })?;
                let max_unexpected_rate = check_f64(
                    "shadow.per_segment.max_unexpected_rate",
                    max,
                    |v| v > 0.0 && v < 1.0,
                    fraction,
                )?;
                let min_compared = g.min_compared.unwrap_or(defaults::SEGMENT_MIN_COMPARED);
                if min_compared == 0 {
                    return Err(invalid(
                        "shadow.per_segment.min_compared",
                        "must be at least 1",
                    ));
                }
                Ok(SegmentGate {
                    max_unexpected_rate,
                    min_compared,
                })
            })
            .transpose()?;
        Ok(Self {
            route,
            percent,
            min_duration_s,
            min_compared,
            max_serious_rate,
            max_unexpected_rate,
            per_segment,
        })
    }
}

fn validate_steps(
    step_defaults: Option<RawDefaults>,
    steps: Option<Vec<RawStep>>,
) -> Result<Vec<CanaryStep>, SpecError> {
    let (default_duration, default_requests) = match step_defaults {
        Some(d) => (
            check_seconds(
                "defaults.min_duration_s",
                d.min_duration_s.unwrap_or(defaults::STEP_MIN_DURATION_S),
            )?,
            d.min_requests.unwrap_or(defaults::STEP_MIN_REQUESTS),
        ),
        None => (defaults::STEP_MIN_DURATION_S, defaults::STEP_MIN_REQUESTS),
    };
    let Some(raw_steps) = steps else {
        return Ok(defaults::STEP_WEIGHTS
            .iter()
            .map(|&weight| CanaryStep {
                weight,
                cohort: None,
                min_duration_s: default_duration,
                min_requests: default_requests,
                manual_gate: false,
            })
            .collect());
    };
    if raw_steps.is_empty() {
        return Err(invalid(
            "steps",
            "must not be empty (omit it for the default weights 1, 5, 20, 50, 100)",
        ));
    }
    let last = raw_steps.len() - 1;
    let mut out: Vec<CanaryStep> = Vec::with_capacity(raw_steps.len());
    for (i, raw) in raw_steps.into_iter().enumerate() {
        let field = |name: &str| format!("steps[{i}].{name}");
        if let Some(cohort) = &raw.cohort {
            cohort
                .validate()
                .map_err(|(at, why)| invalid(format!("{}.{at}", field("cohort")), why))?;
            if out.iter().filter(|s| s.cohort.is_some()).count() >= MAX_COHORTS {
                return Err(invalid(
                    field("cohort"),
                    format!("at most {MAX_COHORTS} steps may name a cohort"),
                ));
            }
        }
        let previous = out.last().map_or(0, |p| p.weight);
        // A cohort step may keep the weight (0 before any weight step): the
        // cohort is what it adds.
        let weight = match (raw.weight, &raw.cohort) {
            (Some(w), _) => w,
            (None, Some(_)) => previous,
            (None, None) => {
                return Err(invalid(
                    field("weight"),
                    "required: the canary's share, 1 to 100 (or a cohort)",
                ));
            }
        };
        if weight > 100 || (weight == 0 && raw.cohort.is_none()) {
            return Err(invalid(
                field("weight"),
                format!("must be from 1 to 100 (0 only with a cohort), got {weight}"),
            ));
        }
        if raw.cohort.is_some() {
            if weight < previous {
                return Err(invalid(
                    field("weight"),
                    format!("{weight} is below the previous step's {previous}"),
                ));
            }
        } else if !out.is_empty() && weight <= previous {
            return Err(invalid(
                field("weight"),
                format!("{weight} is not above the previous step's {previous}"),
            ));
        }
        if i == last && weight != 100 {
            return Err(invalid(
                field("weight"),
                format!("the last step must be 100, got {weight}"),
            ));
        }
        let min_duration_s = check_seconds(
            &field("min_duration_s"),
            raw.min_duration_s.unwrap_or(default_duration),
        )?;
        out.push(CanaryStep {
            weight,
            cohort: raw.cohort,
            min_duration_s,
            min_requests: raw.min_requests.unwrap_or(default_requests),
            manual_gate: raw.manual_gate.unwrap_or(false),
        });
    }
    Ok(out)
}

impl TryFrom<RawAnalysis> for Analysis {
    type Error = SpecError;

    fn try_from(raw: RawAnalysis) -> Result<Self, SpecError> {
        let interval_s = check_f64(
            "analysis.interval_s",
            raw.interval_s.unwrap_or(defaults::INTERVAL_S),
            |v| (MIN_INTERVAL_S..=MAX_SECONDS).contains(&v),
            "must be at least 0.2 s (and at most a week)",
        )?;
        let max_staleness_s = check_f64(
            "analysis.max_staleness_s",
            raw.max_staleness_s.unwrap_or(defaults::MAX_STALENESS_S),
            |v| v > 0.0 && v <= MAX_SECONDS,
            "must be above 0 s (and at most a week)",
        )?;
        let min_requests_per_side = raw
            .min_requests_per_side
            .unwrap_or(defaults::MIN_REQUESTS_PER_SIDE);
        if min_requests_per_side == 0 {
            return Err(invalid(
                "analysis.min_requests_per_side",
                "must be at least 1: no verdict is ever made without data",
            ));
        }
        let confidence = check_f64(
            "analysis.confidence",
            raw.confidence.unwrap_or(defaults::CONFIDENCE),
            |v| (0.5..=0.999_999).contains(&v),
            "must be from 0.5 to 0.999999 (0.99: each stop rule rolls back a good canary at most 1% of the time)",
        )?;
        Ok(Self {
            interval_s,
            max_staleness_s,
            min_requests_per_side,
            confidence,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "service: checkout\nowner: alice\nstop_rules: {max_error_rate_increase_pp: 1.0}\n";

    fn parse(text: &str) -> Result<RolloutSpec, SpecError> {
        RolloutSpec::from_yaml_or_json(text)
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(spec) => panic!("accepted: {spec:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The minimal spec plus `extra` YAML lines.
    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    #[test]
    fn cohort_steps_keep_or_raise_the_weight_and_name_their_field() {
        let spec = parse(&with(
            "steps:\n  - cohort: {header: {name: x-user-group, value: internal}}\n  - {cohort: {cookie: {name: beta}}, weight: 5}\n  - weight: 20\n  - weight: 100\n",
        ))
        .unwrap();
        let steps: Vec<(u32, Option<Cohort>)> = spec
            .steps
            .iter()
            .map(|s| (s.weight, s.cohort.clone()))
            .collect();
        assert_eq!(
            steps,
            vec![
                (
                    0,
                    Some(Cohort::Header {
                        name: "x-user-group".into(),
                        value: Some("internal".into())
                    })
                ),
                (
                    5,
                    Some(Cohort::Cookie {
                        name: "beta".into(),
                        value: None
                    })
                ),
                (20, None),
                (100, None),
            ]
        );
        for (steps, field) in [
            // A weight step must still raise the weight.
            (
                "[{cohort: {header: {name: a}}, weight: 5}, {weight: 5}, {weight: 100}]",
                "steps[1].weight",
            ),
            // Weight 0 only with a cohort.
            ("[{weight: 0}, {weight: 100}]", "steps[0].weight"),
            // A cohort step may not lower it.
            (
                "[{weight: 5}, {cohort: {header: {name: a}}, weight: 1}, {weight: 100}]",
                "steps[1].weight",
            ),
            (
                "[{cohort: {header: {name: X-Group}}}, {weight: 100}]",
                "steps[0].cohort.header.name",
            ),
            (
                "[{cohort: {cookie: {name: b, value: 'a;b'}}}, {weight: 100}]",
                "steps[0].cohort.cookie.value",
            ),
            (
                "[{cohort: {query: {name: a}}}, {weight: 100}]",
                "steps[0].cohort",
            ),
        ] {
            let e = err(&with(&format!("steps: {steps}\n")));
            assert!(e.contains(field), "{steps}: {e}");
        }
        let many: Vec<String> = (0..=MAX_COHORTS)
            .map(|i| format!("{{cohort: {{header: {{name: g{i}}}}}}}"))
            .chain(["{weight: 100}".to_owned()])
            .collect();
        let e = err(&with(&format!("steps: [{}]\n", many.join(", "))));
        assert!(e.contains("at most 8 steps may name a cohort"), "{e}");
    }

    #[test]
    fn flags_are_validated_and_name_their_field() {
        let spec = parse(&with(
            "flags:\n  - {key: new-checkout, description: the new tax path}\n  - key: Tax_2.v-1\n",
        ))
        .unwrap();
        assert_eq!(
            spec.flags,
            vec![
                Flag {
                    key: "new-checkout".into(),
                    description: Some("the new tax path".into())
                },
                Flag {
                    key: "Tax_2.v-1".into(),
                    description: None
                },
            ]
        );
        // A stored spec reads back through the same validation.
        let back = RolloutSpec::from_yaml_or_json(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        assert!(parse(MINIMAL).unwrap().flags.is_empty());
        let long = "k".repeat(MAX_FLAG_KEY + 1);
        let long_description = "d".repeat(MAX_FLAG_DESCRIPTION + 1);
        for (flags, field) in [
            ("[{key: 'a b'}]", "flags[0].key"),
            ("[{key: ''}]", "flags[0].key"),
            ("[{key: 'a=b'}]", "flags[0].key"),
            ("[{key: 'a,b'}]", "flags[0].key"),
            ("[{key: 'é'}]", "flags[0].key"),
            (
                &format!("[{{key: a}}, {{key: {long}}}]") as &str,
                "flags[1].key",
            ),
            (
                "[{key: a}, {key: a}]",
                "flags[1].key: \"a\" is declared twice",
            ),
            ("[{description: x}]", "flags[0].key: required"),
            ("[{key: a, on: true}]", "flags[0]"),
            (
                &format!("[{{key: a, description: {long_description}}}]"),
                "flags[0].description",
            ),
        ] {
            let e = err(&with(&format!("flags: {flags}\n")));
            assert!(e.contains(field), "{flags}: {e}");
        }
        let many: Vec<String> = (0..=MAX_FLAGS).map(|i| format!("{{key: f{i}}}")).collect();
        let e = err(&with(&format!("flags: [{}]\n", many.join(", "))));
        assert!(e.contains("flags: at most 16 flags, got 17"), "{e}");
        let exact = "k".repeat(MAX_FLAG_KEY);
        assert!(parse(&with(&format!("flags: [{{key: {exact}}}]\n"))).is_ok());
    }

    #[test]
    fn minimal_spec_gets_every_default() {
        let spec = parse(MINIMAL).unwrap();
        assert_eq!(spec.service, "checkout");
        assert_eq!(spec.owner, "alice");
        assert_eq!(spec.description, None);
        assert_eq!(spec.stop_rules.max_error_rate_increase_pp, Some(1.0));
        assert_eq!(spec.stop_rules.max_p99_ratio, None);
        assert!(spec.stop_rules.halt_on_nack);
        assert!(spec.shadow.is_none());
        let weights: Vec<u32> = spec.steps.iter().map(|s| s.weight).collect();
        assert_eq!(weights, vec![1, 5, 20, 50, 100]);
        for s in &spec.steps {
            assert_eq!(s.min_duration_s, 60.0);
            assert_eq!(s.min_requests, 200);
            assert!(!s.manual_gate);
        }
        assert_eq!(spec.analysis.interval_s, 1.0);
        assert_eq!(spec.analysis.max_staleness_s, 10.0);
        assert_eq!(spec.analysis.min_requests_per_side, 100);
        assert_eq!(spec.analysis.confidence, 0.99);
        assert!((spec.analysis.alpha() - 0.01).abs() < 1e-12);
        assert_eq!(spec.stable_cluster(), "checkout-stable");
        assert_eq!(spec.canary_cluster(), "checkout-canary");
    }

    const FULL: &str = r#"
service: checkout
owner: payments-team@example.com
description: v2 moves tax calculation to the new engine
stop_rules:
  max_error_rate_increase_pp: 0.5
  max_p99_ratio: 1.5
  max_unexpected_mismatch_rate: 0.01
  halt_on_nack: false
shadow:
  route: checkout
  percent: 12.5
  min_duration_s: 120
  min_compared: 500
  max_serious_rate: 0.02
  max_unexpected_rate: 0.005
  per_segment:
    max_unexpected_rate: 0.02
    min_compared: 100
defaults: {min_duration_s: 30, min_requests: 1000}
steps:
  - weight: 5
  - {weight: 20, min_duration_s: 90.5}
  - {weight: 50, manual_gate: true, min_requests: 5000}
  - weight: 100
analysis:
  interval_s: 0.5
  max_staleness_s: 5
  min_requests_per_side: 50
  confidence: 0.995
"#;

    #[test]
    fn full_spec_parses_every_field() {
        let spec = parse(FULL).unwrap();
        assert_eq!(
            spec.description.as_deref(),
            Some("v2 moves tax calculation to the new engine")
        );
        assert_eq!(
            spec.stop_rules,
            StopRules {
                max_error_rate_increase_pp: Some(0.5),
                max_p99_ratio: Some(1.5),
                min_p99_increase_ms: 5.0,
                max_unexpected_mismatch_rate: Some(0.01),
                halt_on_nack: false,
                latency: LatencyRules::default(),
            }
        );
        assert_eq!(
            spec.shadow,
            Some(ShadowStage {
                route: "checkout".into(),
                percent: 12.5,
                min_duration_s: 120.0,
                min_compared: 500,
                max_serious_rate: 0.02,
                max_unexpected_rate: 0.005,
                per_segment: Some(SegmentGate {
                    max_unexpected_rate: 0.02,
                    min_compared: 100,
                }),
            })
        );
        let step = |weight, min_duration_s, min_requests, manual_gate| CanaryStep {
            weight,
            cohort: None,
            min_duration_s,
            min_requests,
            manual_gate,
        };
        assert_eq!(
            spec.steps,
            vec![
                step(5, 30.0, 1000, false),
                step(20, 90.5, 1000, false),
                step(50, 30.0, 5000, true),
                step(100, 30.0, 1000, false),
            ]
        );
        assert_eq!(
            spec.analysis,
            Analysis {
                interval_s: 0.5,
                max_staleness_s: 5.0,
                min_requests_per_side: 50,
                confidence: 0.995,
            }
        );
    }

    #[test]
    fn json_is_accepted_including_tab_indentation() {
        let json = "{\n\t\"service\": \"checkout\",\n\t\"owner\": \"alice\",\n\t\"stop_rules\": {\"max_p99_ratio\": 2},\n\t\"steps\": [{\"weight\": 50}, {\"weight\": 100, \"manual_gate\": true}]\n}";
        let spec = parse(json).unwrap();
        assert_eq!(spec.stop_rules.max_p99_ratio, Some(2.0));
        assert_eq!(spec.steps.len(), 2);
        assert!(spec.steps[1].manual_gate);
    }

    #[test]
    fn yaml_flow_mapping_that_is_not_json_falls_back_to_yaml() {
        let spec =
            parse("{service: checkout, owner: bob, stop_rules: {max_p99_ratio: 1.2}}").unwrap();
        assert_eq!(spec.owner, "bob");
    }

    #[test]
    fn round_trips_through_json_and_yaml() {
        for text in [MINIMAL, FULL] {
            let spec = parse(text).unwrap();
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), spec);
            assert_eq!(parse(&json).unwrap(), spec, "{json}");
            let yaml = serde_norway::to_string(&spec).unwrap();
            assert_eq!(parse(&yaml).unwrap(), spec, "{yaml}");
        }
    }

    #[test]
    fn stored_specs_are_validated_again_when_loaded() {
        let mut value = serde_json::to_value(parse(MINIMAL).unwrap()).unwrap();
        value["steps"][0]["weight"] = serde_json::json!(0);
        let e = serde_json::from_value::<RolloutSpec>(value).unwrap_err();
        assert!(
            e.to_string()
                .contains("steps[0].weight: must be from 1 to 100 (0 only with a cohort), got 0"),
            "{e}"
        );
    }

    #[test]
    fn empty_documents_are_refused() {
        for text in ["", "   \n", "# only a comment\n", "---\n", "null"] {
            assert_eq!(parse(text), Err(SpecError::Empty), "{text:?}");
        }
    }

    #[test]
    fn malformed_text_is_a_syntax_error() {
        let e = err("service: [unclosed");
        assert!(e.contains("line 1"), "{e}");
        let e = err("{\"service\": \"checkout\",");
        assert!(e.starts_with("neither JSON (EOF while parsing"), "{e}");
        let e = err("- just\n- a list\n");
        assert!(
            e.contains("invalid type: sequence, expected a rollout spec: a mapping"),
            "{e}"
        );
        let e = err("just a string");
        assert!(e.contains("expected a rollout spec"), "{e}");
        // Two documents in one text: which one is meant?
        let e = err(&format!("{MINIMAL}---\n{MINIMAL}"));
        assert!(e.contains("more than one document"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err(&with(
            "steps:\n  - weight: 5\n  - weight: twenty\n  - weight: 100\n",
        ));
        assert!(
            e.starts_with("steps[1].weight: invalid type: string \"twenty\""),
            "{e}"
        );
        let e = err(&with("analysis: {confidence: high}\n"));
        assert!(e.starts_with("analysis.confidence: invalid type"), "{e}");
        let e = err(&with("steps: [{weight: -5}, {weight: 100}]\n"));
        assert!(
            e.starts_with("steps[0].weight: invalid type: integer `-5`, expected u32"),
            "{e}"
        );
        let e = err(&with("steps: [{weight: 20.5}, {weight: 100}]\n"));
        assert!(
            e.starts_with("steps[0].weight: invalid type: floating point"),
            "{e}"
        );
        let e = err(&with("defaults: {min_requests: 1.5}\n"));
        assert!(e.starts_with("defaults.min_requests: invalid type"), "{e}");
        let e = err(
            "service: checkout\nowner: alice\nstop_rules: {halt_on_nack: maybe, max_p99_ratio: 2}\n",
        );
        assert!(
            e.starts_with("stop_rules.halt_on_nack: invalid type"),
            "{e}"
        );
        let e = err("service: [a]\nowner: alice\nstop_rules: {max_p99_ratio: 2}\n");
        assert!(
            e.starts_with("service: invalid type: sequence, expected a string"),
            "{e}"
        );
        let e = err(&with("steps: 5\n"));
        assert!(
            e.starts_with("steps: invalid type: integer `5`, expected a sequence"),
            "{e}"
        );
        let e = err(
            "{\"service\": \"checkout\", \"owner\": \"a\", \"stop_rules\": {\"max_p99_ratio\": \"2\"}}",
        );
        assert!(
            e.starts_with("stop_rules.max_p99_ratio: invalid type: string \"2\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = err(&with("colour: blue\n"));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err(
            "service: checkout\nowner: alice\nstop_rules: {max_p99_ratio: 2, max_error_rate: 1}\n",
        );
        assert!(e.contains("unknown field `max_error_rate`"), "{e}");
        assert!(e.starts_with("stop_rules"), "{e}");
        let e = err(&with("steps: [{weight: 100, wieght: 5}]\n"));
        assert!(
            e.contains("unknown field `wieght`") && e.starts_with("steps[0]"),
            "{e}"
        );
        let e = err(&with("analysis: {interval: 1}\n"));
        assert!(
            e.contains("unknown field `interval`") && e.starts_with("analysis"),
            "{e}"
        );
        let e = err(
            "{\"service\": \"checkout\", \"owner\": \"a\", \"stop_rules\": {\"max_p99_ratio\": 2}, \"extra\": 1}",
        );
        assert!(e.contains("unknown field `extra`"), "{e}");
        // Fields only the engine sets are not accepted from the operator.
        let e = err(&with("stable_cluster: other-stable\n"));
        assert!(e.contains("unknown field `stable_cluster`"), "{e}");
    }

    #[test]
    fn service_must_be_a_valid_name() {
        assert_eq!(
            err("owner: a\nstop_rules: {max_p99_ratio: 2}\n"),
            "service: required: the name of the service whose canary is rolled out"
        );
        let e = err("service: check out\nowner: a\nstop_rules: {max_p99_ratio: 2}\n");
        assert_eq!(
            e,
            "service: \"check out\" is not a valid name: only letters, digits, '_' and '-' are allowed"
        );
        let e = err("service: ''\nowner: a\nstop_rules: {max_p99_ratio: 2}\n");
        assert!(e.starts_with("service: \"\" is not a valid name"), "{e}");
    }

    #[test]
    fn owner_is_required_and_not_blank() {
        assert_eq!(
            err("service: checkout\nstop_rules: {max_p99_ratio: 2}\n"),
            "owner: required: who answers for this rollout"
        );
        assert_eq!(
            err("service: checkout\nowner: '  '\nstop_rules: {max_p99_ratio: 2}\n"),
            "owner: must not be empty"
        );
    }

    #[test]
    fn stop_rules_are_required() {
        let e = err("service: checkout\nowner: alice\n");
        assert!(
            e.starts_with("stop_rules: required: decide before launch"),
            "{e}"
        );
        let e = err("service: checkout\nowner: alice\nstop_rules: {}\n");
        assert_eq!(
            e,
            "stop_rules: set at least one of max_error_rate_increase_pp and max_p99_ratio"
        );
        let e = err(
            "service: checkout\nowner: alice\nstop_rules: {max_unexpected_mismatch_rate: 0.01, halt_on_nack: true}\n",
        );
        assert!(e.contains("at least one of"), "{e}");
    }

    #[test]
    fn latency_stop_rules_beyond_p99() {
        let base = "service: checkout\nowner: alice\nstop_rules: ";
        let spec = parse(&format!(
            "{base}{{max_p99_ratio: 1.5, max_p50_ratio: 1.2, max_p90_ratio: 1.3, max_p999_ratio: 2, slow_request_ms: 100, max_slow_share_increase_pp: 0.5}}\n"
        ))
        .unwrap();
        assert_eq!(
            spec.stop_rules.latency,
            LatencyRules {
                max_p50_ratio: Some(1.2),
                max_p90_ratio: Some(1.3),
                max_p999_ratio: Some(2.0),
                slow_request_ms: Some(100.0),
                max_slow_share_increase_pp: Some(0.5),
            }
        );
        // Flattened: the rules serialize as written.
        let json = serde_json::to_value(&spec.stop_rules).unwrap();
        assert_eq!(json["max_p50_ratio"], 1.2);
        assert_eq!(json["slow_request_ms"], 100.0);
        let e = err(&format!("{base}{{max_p99_ratio: 1.5, max_p90_ratio: 1}}\n"));
        assert_eq!(e, "stop_rules.max_p90_ratio: must be > 1, got 1");
        let e = err(&format!(
            "{base}{{max_p99_ratio: 1.5, slow_request_ms: 100}}\n"
        ));
        assert_eq!(
            e,
            "stop_rules.slow_request_ms: set slow_request_ms and max_slow_share_increase_pp together"
        );
        let e = err(&format!(
            "{base}{{max_p99_ratio: 1.5, slow_request_ms: -3, max_slow_share_increase_pp: 1}}\n"
        ));
        assert!(
            e.starts_with("stop_rules.slow_request_ms: must be above 0"),
            "{e}"
        );
    }

    #[test]
    fn stop_rule_values_are_checked() {
        let base = "service: checkout\nowner: alice\nstop_rules: ";
        let e = err(&format!("{base}{{max_p99_ratio: 0.5}}\n"));
        assert_eq!(e, "stop_rules.max_p99_ratio: must be > 1, got 0.5");
        let e = err(&format!("{base}{{max_p99_ratio: 1}}\n"));
        assert_eq!(e, "stop_rules.max_p99_ratio: must be > 1, got 1");
        let e = err(&format!("{base}{{max_p99_ratio: .nan}}\n"));
        assert_eq!(e, "stop_rules.max_p99_ratio: must be > 1, got NaN");
        let e = err(&format!("{base}{{max_p99_ratio: .inf}}\n"));
        assert_eq!(e, "stop_rules.max_p99_ratio: must be > 1, got inf");
        let e = err(&format!("{base}{{max_error_rate_increase_pp: -1}}\n"));
        assert_eq!(
            e,
            "stop_rules.max_error_rate_increase_pp: must be from 0 to below 100 percentage points, got -1"
        );
        let e = err(&format!("{base}{{max_error_rate_increase_pp: 100}}\n"));
        assert!(
            e.starts_with("stop_rules.max_error_rate_increase_pp: must be"),
            "{e}"
        );
        let e = err(&format!(
            "{base}{{max_p99_ratio: 2, max_unexpected_mismatch_rate: 1}}\n"
        ));
        assert_eq!(
            e,
            "stop_rules.max_unexpected_mismatch_rate: must be a fraction from 0 to below 1 (0.01 = 1%), got 1"
        );
        // 0 pp: any significant increase stops the rollout.
        let spec = parse(&format!("{base}{{max_error_rate_increase_pp: 0}}\n")).unwrap();
        assert_eq!(spec.stop_rules.max_error_rate_increase_pp, Some(0.0));
    }

    fn shadow_spec(shadow: &str, unexpected_rule: &str) -> String {
        format!(
            "service: checkout\nowner: alice\nstop_rules: {{max_p99_ratio: 2{unexpected_rule}}}\nshadow: {shadow}\n"
        )
    }

    #[test]
    fn shadow_stage_rules() {
        let rule = ", max_unexpected_mismatch_rate: 0.01";
        let spec = parse(&shadow_spec(
            "{route: checkout, percent: 10, max_serious_rate: 0.05}",
            rule,
        ))
        .unwrap();
        let stage = spec.shadow.unwrap();
        assert_eq!(stage.min_duration_s, 60.0);
        assert_eq!(stage.min_compared, 200);
        assert_eq!(stage.max_unexpected_rate, 0.01, "defaults to the stop rule");

        let cases = [
            (
                "{percent: 10, max_serious_rate: 0.05}",
                rule,
                "shadow.route: required",
            ),
            (
                "{route: 'a b', percent: 10, max_serious_rate: 0.05}",
                rule,
                "shadow.route: \"a b\" is not a valid name",
            ),
            (
                "{route: r, max_serious_rate: 0.05}",
                rule,
                "shadow.percent: required",
            ),
            (
                "{route: r, percent: 0, max_serious_rate: 0.05}",
                rule,
                "shadow.percent: must be above 0 and at most 100, got 0",
            ),
            (
                "{route: r, percent: 101, max_serious_rate: 0.05}",
                rule,
                "shadow.percent: must be above 0 and at most 100, got 101",
            ),
            (
                "{route: r, percent: 10}",
                rule,
                "shadow.max_serious_rate: required",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0}",
                rule,
                "shadow.max_serious_rate: must be a fraction above 0 and below 1",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 5}",
                rule,
                "shadow.max_serious_rate: must be a fraction above 0 and below 1 (0.01 = 1%), got 5",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, min_compared: 0}",
                rule,
                "shadow.min_compared: must be at least 1",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, per_segment: {min_compared: 10}}",
                rule,
                "shadow.per_segment.max_unexpected_rate: required",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, per_segment: {max_unexpected_rate: 2}}",
                rule,
                "shadow.per_segment.max_unexpected_rate: must be a fraction",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, per_segment: {max_unexpected_rate: 0.1, min_compared: 0}}",
                rule,
                "shadow.per_segment.min_compared: must be at least 1",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, per_segment: {max_rate: 0.1}}",
                rule,
                "unknown field `max_rate`",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, min_duration_s: -1}",
                rule,
                "shadow.min_duration_s: must be a number of seconds",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, max_unexpected_rate: 0.05}",
                rule,
                "shadow.max_unexpected_rate: 0.05 is above stop_rules.max_unexpected_mismatch_rate 0.01",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1}",
                "",
                "stop_rules.max_unexpected_mismatch_rate: required when a shadow stage is set",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1}",
                ", max_unexpected_mismatch_rate: 0",
                "shadow.max_unexpected_rate: required when",
            ),
            (
                "{route: r, percent: 10, max_serious_rate: 0.1, sample: 3}",
                rule,
                "unknown field `sample`",
            ),
        ];
        for (shadow, rule, want) in cases {
            let e = err(&shadow_spec(shadow, rule));
            assert!(e.contains(want), "{shadow}: {e}");
        }
    }

    const PROBES: &str = "probes:\n  judge_idle_on_probes: true\n  checks:\n    - name: health\n      path: /health\n      headers: {accept: application/json}\n      expect: {status: 200, json: {pointer: /status, equals: ok}}\n      every_s: 0.5\n";

    #[test]
    fn probes_parse_with_defaults_and_round_trip() {
        let spec = parse(&with(PROBES)).unwrap();
        let p = spec.probes.clone().unwrap();
        assert_eq!(p.checks.len(), 1);
        let c = &p.checks[0];
        assert_eq!((c.method.as_str(), c.every_s), ("GET", 0.5));
        assert_eq!(c.expect.describe(), "status 200 and /status == \"ok\"");
        assert_eq!(
            (p.max_failures, p.min_passed, p.judge_idle_on_probes),
            (0, 3, true)
        );
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(RolloutSpec::from_yaml_or_json(&json).unwrap(), spec);
    }

    #[test]
    fn probe_rules_name_the_field() {
        let check = |extra: &str| {
            format!(
                "probes:\n  checks:\n    - {{name: h, path: /h, expect: {{status: 200}}{extra}}}\n"
            )
        };
        for (probes, field) in [
            ("probes: {checks: []}\n".to_owned(), "probes.checks"),
            (check(", every_s: 0.1"), "probes.checks[0].every_s"),
            (check(", method: TRACE"), "probes.checks[0].method"),
            (check(", headers: {X-Big: a}"), "probes.checks[0].headers.X-Big"),
            (check(", headers: {understudy-probe: guess/canary}"), "probes.checks[0].headers.understudy-probe"),
            (check(", headers: {host: evil}"), "probes.checks[0].headers.host"),
            (check(", headers: {a: \"x\\u0001\"}"), "probes.checks[0].headers.a"),
            (format!("probes:\n  checks:\n    - {{name: h, path: /h, expect: {{status: 200}}, body: {}}}\n", "x".repeat(16 * 1024 + 1)), "probes.checks[0].body"),
            ("probes:\n  checks:\n    - {name: h, path: health, expect: {status: 200}}\n".to_owned(), "probes.checks[0].path"),
            ("probes:\n  checks:\n    - {name: h, path: /h, expect: {status: 900}}\n".to_owned(), "probes.checks[0].expect.status"),
            ("probes:\n  checks:\n    - {name: h, path: /h, expect: {status: 200, json: {pointer: status, equals: ok}}}\n".to_owned(), "probes.checks[0].expect.json.pointer"),
            ("probes:\n  checks:\n    - {name: h, path: /h}\n".to_owned(), "probes.checks[0].expect"),
            ("probes:\n  checks:\n    - {name: h, path: /h, expect: {status: 200}, bogus: 1}\n".to_owned(), "probes.checks[0]"),
            ("probes:\n  min_passed: 0\n  checks:\n    - {name: h, path: /h, expect: {status: 200}}\n".to_owned(), "probes.min_passed"),
        ] {
            let e = err(&with(&probes));
            assert!(e.contains(field), "{probes}: {e}");
        }
        // Names are unique; at most MAX_CHECKS; the total rate is capped.
        let many = |n: usize, every: f64| {
            let checks: Vec<String> = (0..n)
                .map(|i| format!("    - {{name: c{i}, path: /h, expect: {{status: 200}}, every_s: {every}}}\n"))
                .collect();
            format!("probes:\n  checks:\n{}", checks.concat())
        };
        assert!(err(&with(&many(probes::MAX_CHECKS + 1, 10.0))).contains("at most 8 checks"));
        let e = err(&with(&many(4, 0.2)));
        assert!(e.contains("probes.checks: 40.0 probes per second"), "{e}");
        assert!(parse(&with(&many(4, 0.4))).is_ok());
        let twice = "probes:\n  checks:\n    - {name: h, path: /h, expect: {status: 200}}\n    - {name: h, path: /i, expect: {status: 200}}\n";
        assert!(err(&with(twice)).contains("probes.checks[1].name"));
    }

    #[test]
    fn step_rules() {
        let cases = [
            ("steps: []", "steps: must not be empty"),
            (
                "steps: [{weight: 0}, {weight: 100}]",
                "steps[0].weight: must be from 1 to 100 (0 only with a cohort), got 0",
            ),
            (
                "steps: [{weight: 5}, {weight: 101}]",
                "steps[1].weight: must be from 1 to 100 (0 only with a cohort), got 101",
            ),
            (
                "steps: [{weight: 5}, {weight: 50}, {weight: 20}, {weight: 100}]",
                "steps[2].weight: 20 is not above the previous step's 50",
            ),
            (
                "steps: [{weight: 50}, {weight: 50}, {weight: 100}]",
                "steps[1].weight: 50 is not above the previous step's 50",
            ),
            (
                "steps: [{weight: 5}, {weight: 50}]",
                "steps[1].weight: the last step must be 100, got 50",
            ),
            (
                "steps: [{min_requests: 5}, {weight: 100}]",
                "steps[0].weight: required",
            ),
            (
                "steps: [{weight: 5, min_duration_s: -3}, {weight: 100}]",
                "steps[0].min_duration_s: must be a number of seconds from 0 to 604800 (a week), got -3",
            ),
            (
                "steps: [{weight: 5, min_duration_s: 1e9}, {weight: 100}]",
                "steps[0].min_duration_s: must be a number of seconds",
            ),
            (
                "steps: [{weight: 5, manual_gate: 1}, {weight: 100}]",
                "steps[0].manual_gate: invalid type",
            ),
            (
                "defaults: {min_duration_s: -1}",
                "defaults.min_duration_s: must be a number of seconds",
            ),
            (
                "defaults: {min_requests: 5, weight: 3}",
                "unknown field `weight`",
            ),
        ];
        for (yaml, want) in cases {
            let e = err(&with(&format!("{yaml}\n")));
            assert!(e.starts_with(want) || e.contains(want), "{yaml}: {e}");
        }
        let spec = parse(&with("steps: [{weight: 100}]\n")).unwrap();
        assert_eq!(spec.steps.len(), 1);
        let spec = parse(&with("defaults: {min_requests: 7}\n")).unwrap();
        assert_eq!(spec.steps.len(), 5);
        assert!(
            spec.steps
                .iter()
                .all(|s| s.min_requests == 7 && s.min_duration_s == 60.0)
        );
    }

    #[test]
    fn analysis_rules() {
        let cases = [
            (
                "{interval_s: 0.1}",
                "analysis.interval_s: must be at least 0.2 s (and at most a week), got 0.1",
            ),
            (
                "{interval_s: 0}",
                "analysis.interval_s: must be at least 0.2 s",
            ),
            (
                "{max_staleness_s: 0}",
                "analysis.max_staleness_s: must be above 0 s (and at most a week), got 0",
            ),
            (
                "{min_requests_per_side: 0}",
                "analysis.min_requests_per_side: must be at least 1",
            ),
            (
                "{confidence: 1}",
                "analysis.confidence: must be from 0.5 to 0.999999",
            ),
            (
                "{confidence: 0.3}",
                "analysis.confidence: must be from 0.5 to 0.999999 (0.99: each stop rule rolls back a good canary at most 1% of the time), got 0.3",
            ),
            ("{confidence: 99}", "analysis.confidence: must be from 0.5"),
        ];
        for (yaml, want) in cases {
            let e = err(&with(&format!("analysis: {yaml}\n")));
            assert!(e.starts_with(want), "{yaml}: {e}");
        }
        let spec = parse(&with("analysis: {interval_s: 0.2}\n")).unwrap();
        assert_eq!(spec.analysis.interval_s, 0.2);
        assert_eq!(spec.analysis.confidence, 0.99, "unset fields keep defaults");
    }
}
