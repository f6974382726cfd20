//! Adaptive per-tenant rate limits: who the tenant is, how many requests it
//! may send now, and how its limit moves with its behaviour.
//!
//! - [`RateLimitConfig`]: identity sources, tiers and per-tenant overrides.
//! - [`identify`]: the tenant of a request (header, hashed API key, or an
//!   unverified JWT claim) and its tier.
//! - [`TenantState`]: one tenant's bucket and adaptive limit, stored in
//!   proxy-wasm shared data so every worker of an Envoy enforces one limit.
//! - [`admit`] / [`Bucket::take`]: the admission decisions.
//! - [`TenantState::observe`]: the AIMD step after each upstream answer.
//! - [`headers_for`]: `Retry-After`, `RateLimit-Policy` and `RateLimit`.
//!
//! # The adaptive limit
//! Each tenant's effective rate `r` starts at its tier's `initial`. After each
//! upstream answer, exponentially weighted averages are updated:
//! `success ← (1−α)·success + α·[status < 500]` and
//! `latency ← (1−α)·latency + α·latency_ms`. At most once per `adjust_ms`
//! (and only if the tenant sent traffic since), the rate moves:
//! - if `success ≥ success_target` and `latency ≤ latency_target_ms`:
//!   `r ← min(max, r + increase)` (additive increase);
//! - otherwise: `r ← max(min, r × decrease)` (multiplicative decrease).
//!
//! # The table
//! Shared data cannot delete or expire keys, so tenants live in a bounded
//! table of `max_tenants` slots. A tenant may sit in one of two slots (two
//! hashes); a new tenant takes a free one, else evicts the one seen least
//! recently. An evicted tenant comes back at `initial`.
//!
//! Every write to a slot is a compare-and-swap, except that Envoy cannot
//! compare against a key that does not exist yet: a slot's first write is
//! claimed beforehand in a fill map (one bit per slot, created at
//! configure), so only one worker fills each slot and the `tenants` gauge
//! counts each slot once. [`TableAdmit`] is that protocol, one shared-data
//! step at a time.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::http::framed_sha256;
use crate::rules::{ConfigError, validate_name, validate_report_cluster};

pub const ANONYMOUS: &str = "anonymous";

/// A tier without `pool_rate` (or `fleet_pool_rate`) still has a pool: this
/// many tenants at the tier's `initial` rate. It bounds what a client gains by
/// rotating tenant ids (each new id starts at `initial`), while staying far
/// above any one tenant. Set `pool_rate` to choose another bound.
pub const DEFAULT_POOL_TENANTS: f64 = 100.0;

// === config ===

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimitConfig {
    pub identity: RawIdentity,
    pub tiers: BTreeMap<String, RawTier>,
    /// Tier of a tenant that is identified but not listed in `tenants`.
    pub default_tier: String,
    /// Per-tenant overrides (the control plane pushes these).
    pub tenants: BTreeMap<String, RawTenant>,
    /// Count would-be rejections without rejecting (to try new limits safely).
    pub shadow: bool,
    pub max_tenants: u32,
    pub adjust_ms: u64,
    /// Also send `RateLimit` on allowed responses.
    pub headers_on_allowed: bool,
    /// Process-wide limits on a route (optionally one method), for all tenants together.
    pub route_limits: Vec<RawRouteLimit>,
    /// Where and how often each worker reports per-tenant usage (gRPC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<RawReport>,
    /// `shared` (default): one bucket per tenant for the whole Envoy process,
    /// in shared data. `per_worker`: each worker enforces `rate / workers`
    /// alone, without shared data (kept to measure against; see the README).
    pub enforcement: Enforcement,
    /// Envoy's `--concurrency`, for `per_worker` shares.
    pub workers: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    #[default]
    Shared,
    PerWorker,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    /// An HTTP/2 cluster that reaches the control plane's gRPC port.
    pub cluster: String,
    #[serde(default = "report_interval")]
    pub interval_ms: u64,
    /// Tenants one worker remembers between reports; more are counted as dropped.
    #[serde(default = "report_tenants")]
    pub max_tenants: usize,
}

impl RawReport {
    /// Reports to `cluster` at the default interval and tenant count.
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            interval_ms: report_interval(),
            max_tenants: report_tenants(),
        }
    }
}

fn report_interval() -> u64 {
    2_000
}
fn report_tenants() -> usize {
    1_000
}

/// Validated usage-report settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub cluster: String,
    pub interval_ms: u64,
    pub max_tenants: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteLimit {
    /// A route name from `routes`.
    pub route: String,
    /// Only this method (e.g. `POST`); all methods when absent.
    #[serde(default)]
    pub method: Option<String>,
    pub rate: f64,
    #[serde(default = "one")]
    pub burst_s: f64,
}

/// A validated route limit.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteLimit {
    pub route: usize,
    pub method: Option<String>,
    pub rate: f64,
    pub burst_s: f64,
}

impl Default for RawRateLimitConfig {
    fn default() -> Self {
        Self {
            identity: RawIdentity::default(),
            tiers: BTreeMap::new(),
            default_tier: "standard".to_owned(),
            tenants: BTreeMap::new(),
            shadow: false,
            max_tenants: 10_000,
            adjust_ms: 1_000,
            headers_on_allowed: false,
            route_limits: Vec::new(),
            report: None,
            enforcement: Enforcement::Shared,
            workers: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    /// A header naming the tenant, e.g. `x-tenant-id`.
    pub header: Option<String>,
    /// A header carrying an API key; the tenant is a hash of it (never logged in clear).
    pub api_key_header: Option<String>,
    /// A claim of the `Authorization: Bearer` JWT. Read, not verified: put
    /// Envoy's `jwt_authn` filter before this one to verify it.
    pub jwt_claim: Option<String>,
}

/// No source by default: identity sources are exactly those configured. (A
/// default `x-tenant-id` once let any client name its own tenant even when
/// only a JWT claim was meant to count.)
impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            header: None,
            api_key_header: None,
            jwt_claim: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// Requests per second a tenant never seen before starts with.
    pub initial: f64,
    pub min: f64,
    pub max: f64,
    /// Bucket size, in seconds of the tenant's current rate (≥ 1 request).
    #[serde(default = "one")]
    pub burst_s: f64,
    /// Capacity of the whole tier (all its tenants together), requests per
    /// second; `None` means only per-tenant limits apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_rate: Option<f64>,
    /// Capacity of the tier across the fleet; divided per Envoy like `fleet_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_pool_rate: Option<f64>,
    #[serde(default = "success_target")]
    pub success_target: f64,
    #[serde(default = "latency_target")]
    pub latency_target_ms: f64,
    /// Requests per second added per adjustment while the tenant behaves.
    #[serde(default = "one")]
    pub increase: f64,
    /// Factor applied per adjustment when errors or latency rise.
    #[serde(default = "half")]
    pub decrease: f64,
    /// EWMA weight of each new observation.
    #[serde(default = "alpha")]
    pub ewma_alpha: f64,
}

fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn alpha() -> f64 {
    0.1
}
fn success_target() -> f64 {
    0.95
}
fn latency_target() -> f64 {
    1_000.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    #[serde(default)]
    pub tier: Option<String>,
    /// A fixed limit for this tenant, bypassing adaptation.
    #[serde(default)]
    pub rate: Option<f64>,
    /// A fixed limit for the whole fleet: the control plane divides it by the
    /// number of connected Envoys and writes the share into `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub name: String,
    pub initial: f64,
    pub min: f64,
    pub max: f64,
    pub burst_s: f64,
    pub pool_rate: Option<f64>,
    pub success_target: f64,
    pub latency_target_ms: f64,
    pub increase: f64,
    pub decrease: f64,
    pub ewma_alpha: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub header: Option<String>,
    pub api_key_header: Option<String>,
    pub jwt_claim: Option<String>,
    pub tiers: Vec<Tier>,
    default_tier: usize,
    anonymous_tier: usize,
    /// tenant → (tier index, fixed rate)
    tenants: BTreeMap<String, (usize, Option<f64>)>,
    pub shadow: bool,
    pub max_tenants: u32,
    pub adjust_us: u64,
    pub headers_on_allowed: bool,
    pub route_limits: Vec<RouteLimit>,
    pub report: Option<Report>,
    pub enforcement: Enforcement,
    pub workers: u32,
}

impl RateLimitConfig {
    /// Validates `raw`; `field` is its place in the document (`rate_limit`),
    /// `routes` the names of the configured routes (route limits refer to them).
    pub fn from_raw(raw: RawRateLimitConfig, field: &str) -> Result<Self, ConfigError> {
        Self::with_routes(raw, field, &[])
    }

    pub fn with_routes(
        raw: RawRateLimitConfig,
        field: &str,
        routes: &[&str],
    ) -> Result<Self, ConfigError> {
        let invalid = |what: String, reason: String| ConfigError::Invalid {
            field: format!("{field}.{what}"),
            reason,
        };
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !raw.tiers.contains_key(ANONYMOUS) {
            return Err(invalid(
                "tiers".into(),
                format!("a tier named {ANONYMOUS:?} is required for requests without a tenant"),
            ));
        }
        let mut tiers = Vec::new();
        for (name, t) in &raw.tiers {
            validate_name(&format!("{field}.tiers.{name}"), name)?;
            let f = |what: &str| format!("tiers.{name}.{what}");
            for (what, v) in [
                ("initial", t.initial),
                ("min", t.min),
                ("max", t.max),
                ("burst_s", t.burst_s),
                ("increase", t.increase),
            ] {
                if !positive(v) {
                    return Err(invalid(f(what), format!("must be a rate above 0, got {v}")));
                }
            }
            if t.min > t.max {
                return Err(invalid(
                    f("min"),
                    format!("min ({}) is above max ({})", t.min, t.max),
                ));
            }
            if !(t.min..=t.max).contains(&t.initial) {
                return Err(invalid(
                    f("initial"),
                    format!(
                        "{} is outside [min, max] = [{}, {}]",
                        t.initial, t.min, t.max
                    ),
                ));
            }
            if let Some(p) = t.pool_rate.or(t.fleet_pool_rate)
                && !positive(p)
            {
                return Err(invalid(f("pool_rate"), format!("must be above 0, got {p}")));
            }
            if !(t.decrease > 0.0 && t.decrease < 1.0) {
                return Err(invalid(
                    f("decrease"),
                    format!("must be in (0, 1), got {}", t.decrease),
                ));
            }
            if !(t.ewma_alpha > 0.0 && t.ewma_alpha <= 1.0) {
                return Err(invalid(
                    f("ewma_alpha"),
                    format!("must be in (0, 1], got {}", t.ewma_alpha),
                ));
            }
            if !(0.0..=1.0).contains(&t.success_target) {
                return Err(invalid(
                    f("success_target"),
                    format!("must be in [0, 1], got {}", t.success_target),
                ));
            }
            if !positive(t.latency_target_ms) {
                return Err(invalid(
                    f("latency_target_ms"),
                    format!("must be above 0, got {}", t.latency_target_ms),
                ));
            }
            tiers.push(Tier {
                name: name.clone(),
                initial: t.initial,
                min: t.min,
                max: t.max,
                burst_s: t.burst_s,
                pool_rate: Some(
                    t.pool_rate
                        .or(t.fleet_pool_rate)
                        .unwrap_or(t.initial * DEFAULT_POOL_TENANTS),
                ),
                success_target: t.success_target,
                latency_target_ms: t.latency_target_ms,
                increase: t.increase,
                decrease: t.decrease,
                ewma_alpha: t.ewma_alpha,
            });
        }
        let index = |name: &str| tiers.iter().position(|t| t.name == name);
        let default_tier = index(&raw.default_tier).ok_or_else(|| {
            invalid(
                "default_tier".into(),
                format!("unknown tier {:?}", raw.default_tier),
            )
        })?;
        let anonymous_tier = index(ANONYMOUS).unwrap_or(default_tier);
        let mut tenants = BTreeMap::new();
        for (id, t) in raw.tenants {
            let tier = match &t.tier {
                Some(name) => index(name).ok_or_else(|| {
                    invalid(
                        format!("tenants.{id}.tier"),
                        format!("unknown tier {name:?}"),
                    )
                })?,
                None => default_tier,
            };
            let rate = t.rate.or(t.fleet_rate);
            if let Some(r) = rate
                && !positive(r)
            {
                return Err(invalid(
                    format!("tenants.{id}.rate"),
                    format!("must be a rate above 0, got {r}"),
                ));
            }
            tenants.insert(id, (tier, rate));
        }
        if raw.max_tenants == 0 || raw.max_tenants > 1_000_000 {
            return Err(invalid(
                "max_tenants".into(),
                format!("must be within 1..=1000000, got {}", raw.max_tenants),
            ));
        }
        if raw.adjust_ms == 0 {
            return Err(invalid("adjust_ms".into(), "must be at least 1".into()));
        }
        let mut route_limits = Vec::new();
        for (i, l) in raw.route_limits.into_iter().enumerate() {
            let route = routes.iter().position(|r| *r == l.route).ok_or_else(|| {
                invalid(
                    format!("route_limits[{i}].route"),
                    format!("unknown route {:?}", l.route),
                )
            })?;
            if !positive(l.rate) || !positive(l.burst_s) {
                return Err(invalid(
                    format!("route_limits[{i}]"),
                    format!(
                        "rate and burst_s must be above 0, got {} and {}",
                        l.rate, l.burst_s
                    ),
                ));
            }
            if let Some(m) = &l.method
                && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(invalid(
                    format!("route_limits[{i}].method"),
                    format!("{m:?} is not an upper-case HTTP method"),
                ));
            }
            route_limits.push(RouteLimit {
                route,
                method: l.method,
                rate: l.rate,
                burst_s: l.burst_s,
            });
        }
        let identity = raw.identity;
        if identity.header.is_none()
            && identity.api_key_header.is_none()
            && identity.jwt_claim.is_none()
        {
            return Err(invalid(
                "identity".into(),
                "at least one of header, api_key_header, jwt_claim is needed (there is no default tenant header)".into(),
            ));
        }
        Ok(Self {
            header: identity.header.map(|h| h.to_ascii_lowercase()),
            api_key_header: identity.api_key_header.map(|h| h.to_ascii_lowercase()),
            jwt_claim: identity.jwt_claim,
            tiers,
            default_tier,
            anonymous_tier,
            tenants,
            shadow: raw.shadow,
            max_tenants: raw.max_tenants,
            adjust_us: raw.adjust_ms.saturating_mul(1000),
            headers_on_allowed: raw.headers_on_allowed,
            route_limits,
            enforcement: raw.enforcement,
            workers: if raw.workers == 0 || raw.workers > 1024 {
                return Err(invalid(
                    "workers".into(),
                    format!("must be within 1..=1024, got {}", raw.workers),
                ));
            } else {
                raw.workers
            },
            report: match raw.report {
                None => None,
                Some(r) => {
                    if r.cluster.trim().is_empty()
                        || r.interval_ms < 100
                        || r.max_tenants == 0
                        || r.max_tenants > 100_000
                    {
                        return Err(invalid(
                            "report".into(),
                            "needs a cluster, interval_ms of at least 100 and max_tenants within 1..=100000".into(),
                        ));
                    }
                    validate_report_cluster(&format!("{field}.report.cluster"), &r.cluster)?;
                    Some(Report {
                        cluster: r.cluster,
                        interval_ms: r.interval_ms,
                        max_tenants: r.max_tenants,
                    })
                }
            },
        })
    }

    /// The route limits that apply to a request, with their indexes.
    pub fn route_limits_for<'a>(
        &'a self,
        route: Option<usize>,
        method: &'a str,
    ) -> impl Iterator<Item = (usize, &'a RouteLimit)> + 'a {
        self.route_limits.iter().enumerate().filter(move |(_, l)| {
            Some(l.route) == route && l.method.as_deref().is_none_or(|m| m == method)
        })
    }

    pub fn tier(&self, i: usize) -> Option<&Tier> {
        self.tiers.get(i)
    }
}

// === identity ===

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    /// Index into [`RateLimitConfig::tiers`].
    pub tier: usize,
    /// A fixed rate from an override, if any.
    fixed_rate: Option<FixedRate>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct FixedRate(f64);
impl Eq for FixedRate {}

/// The request values identity may come from.
#[derive(Debug, Clone, Default)]
pub struct IdentityInput<'a> {
    pub header: Option<&'a str>,
    pub api_key: Option<&'a str>,
    pub authorization: Option<&'a str>,
}

/// The tenant of a request: the first configured source that yields one, in
/// the order header, API key (hashed), JWT claim; otherwise `anonymous`.
pub fn identify(cfg: &RateLimitConfig, input: &IdentityInput<'_>) -> Tenant {
    // Only configured sources count, whatever the caller passed in.
    let id = input
        .header
        .filter(|_| cfg.header.is_some())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .or_else(|| {
            input
                .api_key
                .filter(|k| !k.is_empty() && cfg.api_key_header.is_some())
                .map(hash_api_key)
        })
        .or_else(|| {
            let claim = cfg.jwt_claim.as_deref()?;
            jwt_claim(input.authorization?, claim)
        });
    let Some(id) = id else {
        return Tenant {
            id: ANONYMOUS.to_owned(),
            tier: cfg.anonymous_tier,
            fixed_rate: None,
        };
    };
    let (tier, fixed) = cfg
        .tenants
        .get(&id)
        .copied()
        .unwrap_or((cfg.default_tier, None));
    Tenant {
        id,
        tier,
        fixed_rate: fixed.map(FixedRate),
    }
}

/// `key:` and the first 16 hex digits of SHA-256: stable, not reversible.
pub fn hash_api_key(key: &str) -> String {
    let h = framed_sha256("understudy/ratelimit/api-key/v1", &[key.as_bytes()]);
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("key:{hex}")
}

/// Reads (does not verify) a claim from `Authorization: Bearer <jwt>`.
pub fn jwt_claim(authorization: &str, claim: &str) -> Option<String> {
    let token = authorization
        .strip_prefix("Bearer ")
        .or_else(|| authorization.strip_prefix("bearer "))?;
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match json.get(claim)? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= 128 => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A short, stable, non-reversible form of a tenant id for the `pk` parameter.
///
/// `pk` is an RFC 9651 byte sequence, which is *standard* base64 (`+` and `/`),
/// not the URL-safe alphabet: strict parsers reject `-` and `_`. Nine bytes
/// encode to twelve characters, so there is never any `=` padding.
pub fn partition_key(tenant: &str) -> String {
    let h = framed_sha256("understudy/ratelimit/pk/v1", &[tenant.as_bytes()]);
    STANDARD.encode(&h[..9])
}

// === buckets ===

/// The first byte of every limiter value in shared data: the binary layout's
/// version. JSON (which older filters wrote, starting with `{`) never
/// starts with it, so an old value reads as absent instead of as garbage.
const SHARED_FORMAT: u8 = 1;

/// A limiter value for shared data: [`SHARED_FORMAT`], then postcard (a
/// compact binary serde format). Every request reads and writes its
/// tenant's slot under Envoy's process-wide lock; JSON made that the
/// limiter's main cost (about 3x the bytes, and float printing and parsing).
pub fn encode_shared<T: Serialize>(value: &T) -> Vec<u8> {
    // Empty on a serializer error (none for these types): an empty value
    // reads back as absent.
    postcard::to_extend(value, vec![SHARED_FORMAT]).unwrap_or_default()
}

/// What [`encode_shared`] wrote; `None` for anything else.
pub fn decode_shared<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&SHARED_FORMAT, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// A token bucket: `tokens` at `at_us`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub tokens: f64,
    pub at_us: u64,
}

impl Bucket {
    pub fn full(rate: f64, burst_s: f64, now_us: u64) -> Self {
        Self {
            tokens: capacity(rate, burst_s),
            at_us: now_us,
        }
    }

    /// Refills at `rate`/s up to `rate × burst_s` (at least one), then takes
    /// one token if there is one. Returns whether it was taken.
    pub fn take(&mut self, rate: f64, burst_s: f64, now_us: u64) -> bool {
        let dt = now_us.saturating_sub(self.at_us) as f64 / 1e6;
        self.tokens = (self.tokens + dt * rate).min(capacity(rate, burst_s));
        self.at_us = self.at_us.max(now_us);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Seconds until one token is available at `rate` (0 if one is).
    pub fn wait_s(&self, rate: f64) -> f64 {
        if self.tokens >= 1.0 || rate <= 0.0 {
            0.0
        } else {
            (1.0 - self.tokens) / rate
        }
    }
}

fn capacity(rate: f64, burst_s: f64) -> f64 {
    (rate * burst_s).max(1.0)
}

/// One tenant, as kept in its shared-data slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantState {
    pub tenant: String,
    pub tier: usize,
    /// Current effective rate, requests per second.
    pub rate: f64,
    pub bucket: Bucket,
    pub success: f64,
    pub latency_ms: f64,
    pub observed_since_adjust: u32,
    pub adjusted_us: u64,
    pub seen_us: u64,
    pub allowed: u64,
    pub limited: u64,
}

impl TenantState {
    /// A tenant never seen before (or evicted): at its tier's `initial`.
    pub fn new(tenant: &Tenant, cfg: &RateLimitConfig, now_us: u64) -> Self {
        let tier = cfg.tier(tenant.tier);
        let rate = tenant
            .fixed_rate
            .map(|f| f.0)
            .or(tier.map(|t| t.initial))
            .unwrap_or(1.0);
        let burst_s = tier.map_or(1.0, |t| t.burst_s);
        Self {
            tenant: tenant.id.clone(),
            tier: tenant.tier,
            rate,
            bucket: Bucket::full(rate, burst_s, now_us),
            success: 1.0,
            latency_ms: 0.0,
            observed_since_adjust: 0,
            adjusted_us: now_us,
            seen_us: now_us,
            allowed: 0,
            limited: 0,
        }
    }

    /// The state as shared data holds it: [`encode_shared`].
    pub fn encode(&self) -> Vec<u8> {
        encode_shared(self)
    }

    /// `None` for anything [`Self::encode`] did not write (the slot is then
    /// treated as free; a state from an older filter version starts again).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        decode_shared(bytes)
    }

    /// From when an answer may move the rate (`adjust_us` after the last
    /// adjustment); `u64::MAX` for a tenant at a fixed rate, which never moves.
    pub fn next_adjust_us(&self, tenant: &Tenant, cfg: &RateLimitConfig) -> u64 {
        if tenant.fixed_rate.is_some() {
            u64::MAX
        } else {
            self.adjusted_us.saturating_add(cfg.adjust_us)
        }
    }

    /// [`Self::observe`] for each answer, in order.
    pub fn observe_all(&mut self, tenant: &Tenant, cfg: &RateLimitConfig, answers: &[Answer]) {
        for a in answers {
            self.observe(tenant, cfg, a.status, a.latency_ms, a.at_us);
        }
    }

    /// One upstream answer for this tenant: update the averages and, at most
    /// once per `adjust_us`, move the rate (AIMD). Fixed-rate tenants only average.
    pub fn observe(
        &mut self,
        tenant: &Tenant,
        cfg: &RateLimitConfig,
        status: u16,
        latency_ms: f64,
        now_us: u64,
    ) {
        let Some(t) = cfg.tier(self.tier) else { return };
        let ok = if status < 500 { 1.0 } else { 0.0 };
        self.success = (1.0 - t.ewma_alpha) * self.success + t.ewma_alpha * ok;
        self.latency_ms = (1.0 - t.ewma_alpha) * self.latency_ms + t.ewma_alpha * latency_ms;
        self.observed_since_adjust = self.observed_since_adjust.saturating_add(1);
        if tenant.fixed_rate.is_some() || now_us.saturating_sub(self.adjusted_us) < cfg.adjust_us {
            return;
        }
        let healthy = self.success >= t.success_target && self.latency_ms <= t.latency_target_ms;
        self.rate = if healthy {
            (self.rate + t.increase).min(t.max)
        } else {
            (self.rate * t.decrease).max(t.min)
        };
        self.adjusted_us = now_us;
        self.observed_since_adjust = 0;
    }
}

/// One upstream answer for a tenant, as [`TenantState::observe`] takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub latency_ms: f64,
    pub at_us: u64,
}

/// Tenants one worker holds answers for, at most (beyond, answers are
/// written at once).
pub const MAX_PENDING_TENANTS: usize = 256;
/// Answers held per tenant, at most (the one that fills it is written at once,
/// with the rest).
pub const MAX_PENDING_PER_TENANT: usize = 64;

/// Answers a worker observed but has not yet written to their tenants'
/// shared state. Writing each answer would cost a second read-modify-CAS per
/// request under Envoy's process-wide lock; instead the next write of the
/// tenant's slot (its next admission, which writes it anyway) folds them
/// in. An answer is written at once only when it may move the rate (an
/// adjustment is due), or when this table is full.
#[derive(Debug, Default)]
pub struct PendingAnswers {
    by_tenant: BTreeMap<String, Vec<Answer>>,
}

impl PendingAnswers {
    /// Holds `answer` for `tenant` and returns `true`, or returns `false`
    /// when it must be written now: `adjust_due` (the tenant's rate may move
    /// on this answer), the table is full, or the tenant's list is.
    pub fn defer(&mut self, tenant: &str, answer: Answer, adjust_due: bool) -> bool {
        if adjust_due {
            return false;
        }
        if let Some(list) = self.by_tenant.get_mut(tenant) {
            if list.len() + 1 >= MAX_PENDING_PER_TENANT {
                return false;
            }
            list.push(answer);
            return true;
        }
        if self.by_tenant.len() >= MAX_PENDING_TENANTS {
            return false;
        }
        self.by_tenant.insert(tenant.to_owned(), vec![answer]);
        true
    }

    /// The answers held for `tenant`, oldest first.
    pub fn of(&self, tenant: &str) -> &[Answer] {
        self.by_tenant.get(tenant).map_or(&[], Vec::as_slice)
    }

    /// They were written: forget them.
    pub fn written(&mut self, tenant: &str) {
        self.by_tenant.remove(tenant);
    }

    pub fn tenants(&self) -> usize {
        self.by_tenant.len()
    }
}

/// What a request's admission decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub allowed: bool,
    /// Seconds until the tenant has a token again (for `Retry-After`).
    pub retry_after_s: f64,
    /// The tenant's current limit (requests per second) and tokens left.
    pub rate: f64,
    pub remaining: f64,
}

/// Takes a token from the tenant's bucket at its current rate.
pub fn admit(
    state: &mut TenantState,
    tenant: &Tenant,
    cfg: &RateLimitConfig,
    now_us: u64,
) -> Admission {
    admit_share(state, tenant, cfg, 1.0, now_us)
}

/// Like [`admit`], for a bucket that enforces `share` of the tenant's rate
/// (a worker's part under `per_worker` enforcement).
pub fn admit_share(
    state: &mut TenantState,
    tenant: &Tenant,
    cfg: &RateLimitConfig,
    share: f64,
    now_us: u64,
) -> Admission {
    // The config may have changed since the state was written (an override,
    // a new fleet share, a new tier): the config wins.
    let moved = state.tier != tenant.tier;
    state.tier = tenant.tier;
    if let Some(FixedRate(rate)) = tenant.fixed_rate {
        state.rate = rate;
    } else if let Some(t) = cfg.tier(tenant.tier) {
        // A tenant moved to another tier starts over at that tier's initial.
        state.rate = if moved {
            t.initial
        } else {
            state.rate.clamp(t.min, t.max)
        };
    }
    let burst_s = cfg.tier(state.tier).map_or(1.0, |t| t.burst_s);
    let bucket_rate = state.rate * share;
    let allowed = state.bucket.take(bucket_rate, burst_s, now_us);
    state.seen_us = now_us;
    if allowed {
        state.allowed += 1;
    } else {
        state.limited += 1;
    }
    Admission {
        allowed,
        retry_after_s: state.bucket.wait_s(bucket_rate),
        rate: state.rate,
        remaining: state.bucket.tokens.max(0.0),
    }
}

// === the table ===

/// The two slots a tenant may occupy.
pub fn candidate_slots(tenant: &str, slots: u32) -> [u32; 2] {
    let h = framed_sha256("understudy/ratelimit/slot/v1", &[tenant.as_bytes()]);
    let n = u64::from(slots.max(1));
    let a = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) % n;
    let b = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]) % n;
    [u32::try_from(a).unwrap_or(0), u32::try_from(b).unwrap_or(0)]
}

/// Where a tenant goes, given what its two candidate slots hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The tenant already lives in candidate `i`.
    Found(usize),
    /// Candidate `i` is free.
    Free(usize),
    /// Both hold other tenants: evict candidate `i` (seen least recently).
    Evict(usize),
}

pub fn place(tenant: &str, candidates: [Option<&TenantState>; 2]) -> Placement {
    if let Some(i) = candidates
        .iter()
        .position(|c| c.is_some_and(|s| s.tenant == tenant))
    {
        return Placement::Found(i);
    }
    if let Some(i) = candidates.iter().position(Option::is_none) {
        return Placement::Free(i);
    }
    let seen = |i: usize| candidates[i].map_or(0, |s| s.seen_us);
    Placement::Evict(if seen(0) <= seen(1) { 0 } else { 1 })
}

// === the admission of one request ===

/// The tier pool a request must also take a token from, at the rate the
/// caller's bucket enforces (the whole pool, or a worker's share of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pool<'a> {
    /// The tier's index and name (shared data keys the pool by name).
    pub tier: usize,
    pub name: &'a str,
    pub rate: f64,
    pub burst_s: f64,
}

/// The tenant's own bucket (at `share` of its rate), then, if that allowed,
/// a token from its tier's pool through `take_pool` (a bucket in shared data,
/// or a worker's own). A pool refusal gives the tenant its token back and
/// counts the request as limited, not allowed: the tenant did not get in.
///
/// This is the one admission rule for both enforcements: `shared` calls it
/// with `share` 1 inside its compare-and-swap loop, `per_worker` through
/// [`LocalTable::admit`].
pub fn admit_with_pool(
    state: &mut TenantState,
    tenant: &Tenant,
    cfg: &RateLimitConfig,
    share: f64,
    now_us: u64,
    take_pool: impl FnOnce(Pool<'_>) -> bool,
) -> Admission {
    let mut a = admit_share(state, tenant, cfg, share, now_us);
    if !a.allowed {
        return a;
    }
    let Some(t) = cfg.tier(tenant.tier) else {
        return a;
    };
    let Some(rate) = t.pool_rate else { return a };
    let pool = Pool {
        tier: tenant.tier,
        name: &t.name,
        rate: rate * share,
        burst_s: t.burst_s,
    };
    if take_pool(pool) {
        return a;
    }
    state.bucket.tokens += 1.0;
    state.allowed = state.allowed.saturating_sub(1);
    state.limited = state.limited.saturating_add(1);
    a.allowed = false;
    a.retry_after_s = a.retry_after_s.max(1.0);
    a
}

/// One attempt at admitting a tenant into the shared table: which of its two
/// candidate slots it takes, the state to write there (with that slot's CAS
/// token), and the decision.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotWrite {
    pub placement: Placement,
    /// Index into the candidates (`0` or `1`).
    pub slot: usize,
    pub state: TenantState,
    pub admission: Admission,
}

/// Admits `tenant` given what its two candidate slots hold now (see
/// [`candidate_slots`], [`place`]): found, a free slot, or the least
/// recently seen of the two evicted (the newcomer starts at `initial`).
pub fn admit_in_table(
    tenant: &Tenant,
    cfg: &RateLimitConfig,
    candidates: [Option<&TenantState>; 2],
    now_us: u64,
    take_pool: impl FnOnce(Pool<'_>) -> bool,
) -> SlotWrite {
    let placement = place(&tenant.id, candidates);
    let (slot, found) = match placement {
        Placement::Found(i) => (i, candidates[i].cloned()),
        Placement::Free(i) | Placement::Evict(i) => (i, None),
    };
    let mut state = found.unwrap_or_else(|| TenantState::new(tenant, cfg, now_us));
    let admission = admit_with_pool(&mut state, tenant, cfg, 1.0, now_us, take_pool);
    SlotWrite {
        placement,
        slot,
        state,
        admission,
    }
}

// === the shared table's protocol ===
//
// Envoy's shared data checks a write's CAS token only against a key that
// exists: a write to an absent key always succeeds, whatever token it
// carries (proxy-wasm-cpp-host `SharedData::set`). So the first write of a
// slot cannot be a compare-and-swap. Two workers that both read a slot as
// absent used to both write it: the second write silently replaced the
// first tenant, and both counted a new tenant in the `tenants` gauge (CI
// saw 65 for a table of 64). A slot's first write is therefore claimed
// first, by compare-and-swap, in a fill map whose keys exist before any
// slot is written (configure creates them): only the claim's winner writes
// the absent slot, so each slot is filled, and counted, once.
//
// A chunk's own first write is the one unconditional write left (no
// shared-data call creates a key only if it is absent). Each worker's
// configure makes an absent chunk before that worker admits anyone, so a
// claim races with it only inside another worker's configure, between its
// read and its write of the chunk. If configure's write failed, an
// admission creates the chunk with its claim and reads both back, which
// narrows that race but cannot close it.

/// Slots per fill-map chunk: one bit each, one shared-data key per chunk.
pub const FILL_CHUNK_SLOTS: u32 = 4096;
const FILL_CHUNK_BYTES: usize = (FILL_CHUNK_SLOTS / 8) as usize;

/// Attempts at one admission into the shared table before giving up on
/// exactness (the caller then allows the request, uncounted: the limiter
/// never blocks traffic on its own fault).
pub const TABLE_ATTEMPTS: u32 = 8;

/// Steps one [`TableAdmit`] takes at most: eight per attempt (two slot
/// reads, the decision, the claim's read, write and read-back, the slot's
/// re-read and write), then [`TableStep::Done`].
pub const TABLE_STEPS: u32 = TABLE_ATTEMPTS * 8 + 1;

/// How many fill-map chunks a table of `slots` slots has.
pub fn fill_chunks(slots: u32) -> u32 {
    slots.max(1).div_ceil(FILL_CHUNK_SLOTS)
}

/// A fill-map chunk with no slot claimed: what configure writes where a
/// chunk is absent.
pub fn empty_fill_chunk() -> Vec<u8> {
    vec![0; FILL_CHUNK_BYTES]
}

/// The chunk holding `slot`'s claim, the byte within it and the bit's mask.
fn fill_bit(slot: u32) -> (u32, usize, u8) {
    let bit = slot % FILL_CHUNK_SLOTS;
    (slot / FILL_CHUNK_SLOTS, (bit / 8) as usize, 1 << (bit % 8))
}

/// Whether `slot`'s first write is claimed in `chunk` (a short or garbled
/// chunk claims nothing it does not hold).
pub fn fill_claimed(chunk: &[u8], slot: u32) -> bool {
    let (_, byte, mask) = fill_bit(slot);
    chunk.get(byte).is_some_and(|b| b & mask != 0)
}

/// `chunk` with `slot` claimed; `None` when it already is.
pub fn claim_fill(chunk: &[u8], slot: u32) -> Option<Vec<u8>> {
    if fill_claimed(chunk, slot) {
        return None;
    }
    let (_, byte, mask) = fill_bit(slot);
    let mut claimed = chunk.to_vec();
    claimed.resize(FILL_CHUNK_BYTES, 0);
    if let Some(b) = claimed.get_mut(byte) {
        *b |= mask;
    }
    Some(claimed)
}

/// A shared-data key of the table; the glue names it under its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TableKey {
    /// A tenant's slot, `0..max_tenants`.
    Slot(u32),
    /// A fill-map chunk: the claims on the first writes of
    /// [`FILL_CHUNK_SLOTS`] slots.
    Fill(u32),
}

/// What the glue does next for a [`TableAdmit`].
#[derive(Debug, Clone, PartialEq)]
pub enum TableStep {
    /// Read the key, then call [`TableAdmit::got`].
    Get(TableKey),
    /// Admit with what was read: call [`TableAdmit::decide`].
    Decide,
    /// Write `value` with `cas` (0: the key was absent), then call
    /// [`TableAdmit::set`].
    Set {
        key: TableKey,
        value: Vec<u8>,
        cas: u32,
    },
    /// Finished. `None`: shared data failed or kept conflicting, and the
    /// request is allowed without counting.
    Done(Option<TableAdmitted>),
}

/// What a shared-data write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetResult {
    Ok,
    CasMismatch,
    Failed,
}

/// An admission written to the table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableAdmitted {
    /// `Free`: the tenant filled a slot that held none (the tenants gauge
    /// goes up); `Evict`: it replaced another tenant; `Found`: it was there.
    pub placement: Placement,
    /// What the slot now holds.
    pub state: TenantState,
    pub admission: Admission,
}

/// A slot as read: its tenant (if it holds one that decodes) and its CAS
/// token (0: the key is absent).
#[derive(Debug, Clone)]
struct SlotRead {
    state: Option<TenantState>,
    cas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ReadFirst,
    ReadSecond,
    Decide,
    /// Reading the fill-map chunk of the absent slot it chose.
    ClaimRead,
    /// Writing the claim (`created`: the chunk was absent).
    ClaimSet {
        created: bool,
    },
    /// Reading back a chunk it created: another worker's creation may have
    /// replaced it.
    ClaimVerify,
    /// Claimed: reading the slot again before its unconditional first write.
    Recheck,
    Write,
    Done,
}

/// One tenant's admission into the shared table as a sequence of
/// shared-data reads and writes: read the two candidate slots, decide
/// ([`admit_in_table`]), claim a never-written slot in the fill map, write
/// the slot with its CAS token; on a conflict, read again (at most
/// [`TABLE_ATTEMPTS`] times). The glue performs each [`TableStep`] and
/// feeds back its result.
#[derive(Debug, Clone)]
pub struct TableAdmit {
    slots: [u32; 2],
    reads: [Option<SlotRead>; 2],
    /// Candidates claimed by another worker and still absent: it is writing
    /// them now, so this admission places the tenant elsewhere.
    reserved: [bool; 2],
    write: Option<SlotWrite>,
    /// The tier pool's answer: a token is taken once per request, however
    /// many attempts the table takes.
    pool: Option<bool>,
    attempts: u32,
    phase: Phase,
}

impl TableAdmit {
    /// Starts the admission of `tenant` into a table of `slots` slots.
    pub fn start(tenant: &str, slots: u32) -> (Self, TableStep) {
        let slots = candidate_slots(tenant, slots);
        let admit = Self {
            slots,
            reads: [None, None],
            reserved: [false; 2],
            write: None,
            pool: None,
            attempts: 0,
            phase: Phase::ReadFirst,
        };
        (admit, TableStep::Get(TableKey::Slot(slots[0])))
    }

    /// The value and CAS token of the key the last [`TableStep::Get`] named
    /// (`(None, 0)` when absent; Envoy never gives an existing key token 0).
    pub fn got(&mut self, tenant: &str, value: Option<&[u8]>, cas: u32) -> TableStep {
        match self.phase {
            Phase::ReadFirst => {
                let read = self.slot_read(0, value, cas);
                let here = read.state.as_ref().is_some_and(|s| s.tenant == tenant);
                self.reads[0] = Some(read);
                if here {
                    // Each shared-data call takes Envoy's process-wide
                    // lock: the second slot is not needed (and never
                    // written: the tenant is found in the first).
                    self.reads[1] = Some(SlotRead {
                        state: None,
                        cas: 0,
                    });
                    self.phase = Phase::Decide;
                    return TableStep::Decide;
                }
                self.phase = Phase::ReadSecond;
                TableStep::Get(TableKey::Slot(self.slots[1]))
            }
            Phase::ReadSecond => {
                self.reads[1] = Some(self.slot_read(1, value, cas));
                self.phase = Phase::Decide;
                TableStep::Decide
            }
            Phase::ClaimRead => {
                let Some(slot) = self.chosen_slot() else {
                    return self.finish(None);
                };
                if cas == 0 {
                    // No chunk yet (configure could not create it): create
                    // it with the claim, then read it back.
                    self.phase = Phase::ClaimSet { created: true };
                    return TableStep::Set {
                        key: TableKey::Fill(fill_bit(slot).0),
                        value: claim_fill(&[], slot).unwrap_or_else(empty_fill_chunk),
                        cas: 0,
                    };
                }
                match claim_fill(value.unwrap_or_default(), slot) {
                    Some(claimed) => {
                        self.phase = Phase::ClaimSet { created: false };
                        TableStep::Set {
                            key: TableKey::Fill(fill_bit(slot).0),
                            value: claimed,
                            cas,
                        }
                    }
                    None => {
                        // Another worker is filling it (or has, since our read).
                        self.reserve(slot);
                        self.retry()
                    }
                }
            }
            Phase::ClaimVerify => match self.chosen_slot() {
                Some(slot) if fill_claimed(value.unwrap_or_default(), slot) => {
                    self.phase = Phase::Recheck;
                    TableStep::Get(TableKey::Slot(slot))
                }
                _ => self.retry(),
            },
            Phase::Recheck => {
                // Written meanwhile: only by a worker whose claim on the same
                // slot survived a concurrent creation of the chunk. Read again.
                if cas != 0 {
                    return self.retry();
                }
                match (self.chosen_slot(), &self.write) {
                    (Some(slot), Some(w)) => {
                        self.phase = Phase::Write;
                        TableStep::Set {
                            key: TableKey::Slot(slot),
                            value: w.state.encode(),
                            cas: 0,
                        }
                    }
                    _ => self.finish(None),
                }
            }
            _ => self.finish(None),
        }
    }

    /// Admits the tenant with what its candidates hold ([`admit_in_table`]),
    /// folding in `answers` (this worker's held upstream answers). Takes a
    /// token from the tier pool through `take_pool` at most once per request.
    pub fn decide(
        &mut self,
        tenant: &Tenant,
        cfg: &RateLimitConfig,
        answers: &[Answer],
        now_us: u64,
        take_pool: impl FnOnce(Pool<'_>) -> bool,
    ) -> TableStep {
        let (Phase::Decide, Some(r0), Some(r1)) = (self.phase, &self.reads[0], &self.reads[1])
        else {
            return self.finish(None);
        };
        // A reserved candidate is left out: the tenant goes to the other one
        // (offered twice, so `place` sees only it).
        let pick = match self.reserved {
            [false, false] => [0, 1],
            [false, true] => [0, 0],
            [true, false] => [1, 1],
            [true, true] => return self.retry(),
        };
        let reads = [r0, r1];
        let candidates = [reads[pick[0]].state.as_ref(), reads[pick[1]].state.as_ref()];
        let pool = &mut self.pool;
        let mut write = admit_in_table(tenant, cfg, candidates, now_us, |p| {
            *pool.get_or_insert_with(|| take_pool(p))
        });
        write.slot = pick[write.slot.min(1)];
        write.placement = match write.placement {
            Placement::Found(_) => Placement::Found(write.slot),
            Placement::Free(_) => Placement::Free(write.slot),
            Placement::Evict(_) => Placement::Evict(write.slot),
        };
        write.state.observe_all(tenant, cfg, answers);
        let cas = reads[write.slot].cas;
        let slot = self.slots[write.slot];
        let found = matches!(write.placement, Placement::Found(_));
        let value = write.state.encode();
        self.write = Some(write);
        if cas == 0 && !found {
            // Absent: its first write cannot be a compare-and-swap. Claim it.
            self.phase = Phase::ClaimRead;
            return TableStep::Get(TableKey::Fill(fill_bit(slot).0));
        }
        self.phase = Phase::Write;
        TableStep::Set {
            key: TableKey::Slot(slot),
            value,
            cas,
        }
    }

    /// The result of the last [`TableStep::Set`].
    pub fn set(&mut self, result: SetResult) -> TableStep {
        match (self.phase, result) {
            (_, SetResult::Failed) => self.finish(None),
            (Phase::ClaimSet { .. } | Phase::Write, SetResult::CasMismatch) => self.retry(),
            (Phase::ClaimSet { created: true }, SetResult::Ok) => match self.chosen_slot() {
                Some(slot) => {
                    self.phase = Phase::ClaimVerify;
                    TableStep::Get(TableKey::Fill(fill_bit(slot).0))
                }
                None => self.finish(None),
            },
            (Phase::ClaimSet { created: false }, SetResult::Ok) => match self.chosen_slot() {
                Some(slot) => {
                    self.phase = Phase::Recheck;
                    TableStep::Get(TableKey::Slot(slot))
                }
                None => self.finish(None),
            },
            (Phase::Write, SetResult::Ok) => {
                let done = self.write.take().map(|w| TableAdmitted {
                    placement: w.placement,
                    state: w.state,
                    admission: w.admission,
                });
                self.finish(done)
            }
            _ => self.finish(None),
        }
    }

    fn slot_read(&mut self, i: usize, value: Option<&[u8]>, cas: u32) -> SlotRead {
        if cas != 0 {
            // It exists now: no longer being filled by anyone.
            self.reserved[i] = false;
        }
        SlotRead {
            state: value.and_then(TenantState::decode),
            cas,
        }
    }

    fn chosen_slot(&self) -> Option<u32> {
        self.write
            .as_ref()
            .and_then(|w| self.slots.get(w.slot))
            .copied()
    }

    /// Both candidates may be the same slot: reserve it in both.
    fn reserve(&mut self, slot: u32) {
        for (i, s) in self.slots.iter().enumerate() {
            if *s == slot {
                self.reserved[i] = true;
            }
        }
    }

    fn retry(&mut self) -> TableStep {
        self.attempts += 1;
        if self.attempts >= TABLE_ATTEMPTS {
            return self.finish(None);
        }
        self.reads = [None, None];
        self.write = None;
        self.phase = Phase::ReadFirst;
        TableStep::Get(TableKey::Slot(self.slots[0]))
    }

    fn finish(&mut self, done: Option<TableAdmitted>) -> TableStep {
        self.phase = Phase::Done;
        TableStep::Done(done)
    }
}

/// How a tenant came to its seat in a worker's [`LocalTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seat {
    Known,
    /// A new tenant in a free seat (the tenants gauge goes up).
    Added,
    /// A new tenant in the seat of the least recently seen one.
    Evicted,
}

/// `per_worker` enforcement: this worker alone enforces `1 / workers` of
/// each rate (tenant buckets and tier pools), with no shared data. Bounded
/// like the shared table, at `max_tenants`; a newcomer evicts the tenant
/// seen least recently.
#[derive(Debug, Clone, Default)]
pub struct LocalTable {
    tenants: BTreeMap<String, TenantState>,
    pools: BTreeMap<usize, Bucket>,
}

impl LocalTable {
    pub fn admit(
        &mut self,
        tenant: &Tenant,
        cfg: &RateLimitConfig,
        now_us: u64,
    ) -> (Admission, Seat) {
        let share = 1.0 / f64::from(cfg.workers.max(1));
        let mut seat = Seat::Known;
        if !self.tenants.contains_key(&tenant.id) {
            seat = Seat::Added;
            if self.tenants.len() >= cfg.max_tenants as usize {
                let oldest = self
                    .tenants
                    .iter()
                    .min_by_key(|(_, s)| s.seen_us)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.tenants.remove(&k);
                    seat = Seat::Evicted;
                }
            }
            self.tenants
                .insert(tenant.id.clone(), TenantState::new(tenant, cfg, now_us));
        }
        let Some(state) = self.tenants.get_mut(&tenant.id) else {
            // Just inserted; never happens. Allow: the limiter must not
            // block traffic on its own fault.
            return (
                Admission {
                    allowed: true,
                    retry_after_s: 0.0,
                    rate: 0.0,
                    remaining: 0.0,
                },
                seat,
            );
        };
        let pools = &mut self.pools;
        let a = admit_with_pool(state, tenant, cfg, share, now_us, |pool| {
            pools
                .entry(pool.tier)
                .or_insert_with(|| Bucket::full(pool.rate, pool.burst_s, now_us))
                .take(pool.rate, pool.burst_s, now_us)
        });
        (a, seat)
    }

    /// The upstream answered one of this tenant's requests.
    pub fn observe(
        &mut self,
        tenant: &Tenant,
        cfg: &RateLimitConfig,
        status: u16,
        latency_ms: f64,
        now_us: u64,
    ) {
        if let Some(state) = self.tenants.get_mut(&tenant.id) {
            state.observe(tenant, cfg, status, latency_ms, now_us);
        }
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn get(&self, tenant: &str) -> Option<&TenantState> {
        self.tenants.get(tenant)
    }
}

/// What becomes of a request after admission.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Let it through; add these `RateLimit` headers to its response.
    Allow {
        headers: Option<Vec<(String, String)>>,
    },
    Reject(Rejection),
}

/// A 429: these headers and this JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Which of the tier's counters a decision counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Allowed,
    /// Over the limit, let through because the limiter is in shadow mode.
    ShadowLimited,
    Limited,
}

/// The verdict on a tenant's request. `None` admission means the limiter
/// could not decide (shared data failed): the request goes on, uncounted,
/// because the limiter never blocks traffic on its own fault.
pub fn verdict(
    tenant: &Tenant,
    cfg: &RateLimitConfig,
    admission: Option<&Admission>,
) -> (Verdict, Option<Counted>) {
    let Some(a) = admission else {
        return (Verdict::Allow { headers: None }, None);
    };
    if a.allowed {
        let headers = cfg.headers_on_allowed.then(|| headers_for(tenant, a));
        return (Verdict::Allow { headers }, Some(Counted::Allowed));
    }
    if cfg.shadow {
        return (
            Verdict::Allow { headers: None },
            Some(Counted::ShadowLimited),
        );
    }
    let mut headers = headers_for(tenant, a);
    headers.push(("content-type".to_owned(), "application/json".to_owned()));
    (
        Verdict::Reject(Rejection {
            headers,
            body: limited_body(tenant, cfg, a),
        }),
        Some(Counted::Limited),
    )
}

/// The 429 for route limit `index` (its position in `route_limits`) whose
/// process-wide bucket is `bucket` after a refused take. `shadow` does not
/// apply to it (the glue never consulted it for route limits).
pub fn route_rejection(index: usize, limit: &RouteLimit, bucket: &Bucket) -> Rejection {
    let a = Admission {
        allowed: false,
        retry_after_s: bucket.wait_s(limit.rate),
        rate: limit.rate,
        remaining: 0.0,
    };
    // `pk` must be a valid RFC 9651 byte sequence, like the tenant one.
    let pk = partition_key(&format!("route/{index}"));
    let mut headers = policy_headers("route", &pk, &a);
    headers.push(("content-type".to_owned(), "application/json".to_owned()));
    let body = serde_json::json!({
        "error": "rate_limited",
        "message": format!("route limit of {:.1} requests per second exceeded", limit.rate),
        "retry_after_s": a.retry_after_s.ceil().max(1.0),
    })
    .to_string();
    Rejection { headers, body }
}

// === usage reports ===

/// One tenant's usage on one worker since the last report.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub tier: usize,
    pub allowed: u64,
    pub limited: u64,
    pub limit_rps: f64,
}

/// Usage per tenant between two reports, bounded: tenants beyond `cap` are
/// counted in `dropped` instead of remembered.
#[derive(Debug, Clone, Default)]
pub struct UsageTable {
    cap: usize,
    pub tenants: BTreeMap<String, Usage>,
    pub dropped: u64,
}

impl UsageTable {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            tenants: BTreeMap::new(),
            dropped: 0,
        }
    }

    pub fn record(&mut self, tenant: &Tenant, a: &Admission) {
        let full = self.tenants.len() >= self.cap;
        match self.tenants.get_mut(&tenant.id) {
            Some(u) => {
                u.allowed += u64::from(a.allowed);
                u.limited += u64::from(!a.allowed);
                u.limit_rps = a.rate;
            }
            None if full => self.dropped += 1,
            None => {
                self.tenants.insert(
                    tenant.id.clone(),
                    Usage {
                        tier: tenant.tier,
                        allowed: u64::from(a.allowed),
                        limited: u64::from(!a.allowed),
                        limit_rps: a.rate,
                    },
                );
            }
        }
    }

    /// Everything since the last report, leaving the table empty.
    pub fn take(&mut self) -> (BTreeMap<String, Usage>, u64) {
        (
            std::mem::take(&mut self.tenants),
            std::mem::take(&mut self.dropped),
        )
    }
}

// === headers ===

/// Response headers for a decision: `RateLimit-Policy` and `RateLimit`
/// (draft-ietf-httpapi-ratelimit-headers, structured fields) and, when
/// limited, `Retry-After`. The policy's quota is the tenant's current rate
/// per 1-second window; `pk` is a hash of the tenant, never the id itself.
pub fn headers_for(tenant: &Tenant, a: &Admission) -> Vec<(String, String)> {
    policy_headers("tenant", &partition_key(&tenant.id), a)
}

/// `RateLimit-Policy`, `RateLimit` and (when limited) `Retry-After` for the
/// policy `name`, partitioned by `pk`.
pub fn policy_headers(name: &str, pk: &str, a: &Admission) -> Vec<(String, String)> {
    let quota = a.rate.round().max(1.0) as u64;
    let remaining = a.remaining.floor().max(0.0) as u64;
    let reset = a
        .retry_after_s
        .ceil()
        .max(if a.allowed { 0.0 } else { 1.0 }) as u64;
    let mut h = vec![
        (
            "ratelimit-policy".to_owned(),
            format!("\"{name}\";q={quota};w=1;pk=:{pk}:"),
        ),
        (
            "ratelimit".to_owned(),
            format!("\"{name}\";r={remaining};t={reset};pk=:{pk}:"),
        ),
    ];
    if !a.allowed {
        h.push(("retry-after".to_owned(), reset.to_string()));
    }
    h
}

/// The JSON body of a 429.
pub fn limited_body(tenant: &Tenant, cfg: &RateLimitConfig, a: &Admission) -> String {
    let tier = cfg.tier(tenant.tier).map_or("unknown", |t| t.name.as_str());
    serde_json::json!({
        "error": "rate_limited",
        "message": format!("tenant limit of {:.1} requests per second exceeded; retry after {} s", a.rate, a.retry_after_s.ceil().max(1.0)),
        "tier": tier,
        "retry_after_s": a.retry_after_s.ceil().max(1.0),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(extra: serde_json::Value) -> RateLimitConfig {
        let mut raw = json!({
            "identity": {"header": "x-tenant-id"},
            "tiers": {
                "anonymous": {"initial": 5, "min": 1, "max": 10},
                "standard": {"initial": 10, "min": 2, "max": 100, "increase": 5},
                "partner": {"initial": 100, "min": 50, "max": 1000}
            },
            "tenants": {"acme": {"tier": "partner"}, "fixed": {"rate": 3}}
        });
        if let (Some(r), Some(e)) = (raw.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        RateLimitConfig::from_raw(serde_json::from_value(raw).unwrap(), "rate_limit").unwrap()
    }

    fn err(raw: serde_json::Value) -> String {
        match serde_json::from_value::<RawRateLimitConfig>(raw) {
            Ok(r) => RateLimitConfig::from_raw(r, "rate_limit")
                .unwrap_err()
                .to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let anon = json!({"initial": 1, "min": 1, "max": 1});
        for (raw, needle) in [
            (
                json!({"tiers": {}}),
                "a tier named \"anonymous\" is required",
            ),
            (
                json!({"tiers": {"anonymous": {"initial": 5, "min": 10, "max": 1}}}),
                "rate_limit.tiers.anonymous.min: min (10) is above max (1)",
            ),
            (
                json!({"tiers": {"anonymous": {"initial": 0, "min": 0, "max": 1}}}),
                "must be a rate above 0",
            ),
            (
                json!({"tiers": {"anonymous": anon, "standard": anon}, "tenants": {"x": {"tier": "gold"}}}),
                "rate_limit.tenants.x.tier: unknown tier \"gold\"",
            ),
            (
                json!({"tiers": {"anonymous": anon}}),
                "rate_limit.default_tier: unknown tier \"standard\"",
            ),
            (
                json!({"tiers": {"anonymous": {"initial": 5, "min": 1, "max": 10, "decrease": 1.5}}, "default_tier": "anonymous"}),
                "decrease",
            ),
            (
                json!({"tiers": {"anonymous": anon}, "default_tier": "anonymous", "tenants": {"x": {"rate": -2}}}),
                "rate_limit.tenants.x.rate",
            ),
        ] {
            let e = err(raw.clone());
            assert!(e.contains(needle), "{raw}: {e}");
        }
    }

    #[test]
    fn identity_sources_are_exactly_those_configured() {
        // Only a JWT claim: the tenant header names nobody.
        let c = cfg(json!({"identity": {"jwt_claim": "sub"}}));
        assert_eq!(c.header, None);
        // {"sub":"attacker"}
        let jwt = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhdHRhY2tlciJ9.sig";
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("acme"),
                authorization: Some(jwt),
                ..Default::default()
            },
        );
        assert_eq!(t.id, "attacker");
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("acme"),
                ..Default::default()
            },
        );
        assert_eq!(t.id, ANONYMOUS);
        // No identity at all is refused, not defaulted to a header.
        let raw = json!({"tiers": {"anonymous": {"initial": 1, "min": 1, "max": 1}}, "default_tier": "anonymous"});
        let e = err(raw);
        assert!(e.contains("there is no default tenant header"), "{e}");
    }

    #[test]
    fn every_tier_has_a_pool_by_default() {
        let c = cfg(json!({}));
        for t in &c.tiers {
            assert_eq!(
                t.pool_rate,
                Some(t.initial * DEFAULT_POOL_TENANTS),
                "{}",
                t.name
            );
        }
        let c = cfg(
            json!({"tiers": {"anonymous": {"initial": 5, "min": 1, "max": 10, "pool_rate": 7}}, "default_tier": "anonymous", "tenants": {}}),
        );
        assert_eq!(c.tiers[0].pool_rate, Some(7.0));
    }

    #[test]
    fn identity_precedence_and_tiers() {
        let c = cfg(
            json!({"identity": {"header": "x-tenant-id", "api_key_header": "x-api-key", "jwt_claim": "sub"}}),
        );
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("acme"),
                api_key: Some("k"),
                ..Default::default()
            },
        );
        assert_eq!(
            (t.id.as_str(), c.tiers[t.tier].name.as_str()),
            ("acme", "partner")
        );
        let t = identify(
            &c,
            &IdentityInput {
                api_key: Some("secret-key"),
                ..Default::default()
            },
        );
        assert!(
            t.id.starts_with("key:") && !t.id.contains("secret"),
            "{}",
            t.id
        );
        assert_eq!(c.tiers[t.tier].name, "standard");
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"jwt-tenant","exp":1}"#);
        let auth = format!("Bearer e30.{payload}.sig");
        let t = identify(
            &c,
            &IdentityInput {
                authorization: Some(&auth),
                ..Default::default()
            },
        );
        assert_eq!(t.id, "jwt-tenant");
        let t = identify(
            &c,
            &IdentityInput {
                authorization: Some("Bearer not-a-jwt"),
                ..Default::default()
            },
        );
        assert_eq!(
            (t.id.as_str(), c.tiers[t.tier].name.as_str()),
            ("anonymous", "anonymous")
        );
    }

    #[test]
    fn a_bucket_admits_its_rate() {
        let mut b = Bucket::full(10.0, 1.0, 0);
        // 10 in the initial burst, then 10 per second.
        let admitted = (0..1000u64)
            .filter(|i| b.take(10.0, 1.0, i * 10_000))
            .count();
        assert!((108..=111).contains(&admitted), "{admitted}");
        let mut empty = Bucket {
            tokens: 0.25,
            at_us: 0,
        };
        assert!(!empty.take(2.0, 1.0, 0));
        assert!((empty.wait_s(2.0) - 0.375).abs() < 1e-9);
    }

    #[test]
    fn aimd_raises_when_healthy_and_cuts_on_errors() {
        let c = cfg(json!({}));
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("new"),
                ..Default::default()
            },
        );
        let mut s = TenantState::new(&t, &c, 0);
        assert_eq!(s.rate, 10.0, "starts at initial");
        for sec in 1..=5u64 {
            s.observe(&t, &c, 200, 10.0, sec * 1_000_000);
        }
        assert_eq!(s.rate, 35.0, "additive +5 per second");
        for i in 0..30u64 {
            s.observe(&t, &c, 503, 10.0, 6_000_000 + i * 100_000);
        }
        assert!(s.rate < 35.0 / 2.0 && s.rate >= 2.0, "{}", s.rate);
        // Never below min.
        for i in 0..100u64 {
            s.observe(&t, &c, 503, 10.0, 10_000_000 + i * 1_000_000);
        }
        assert_eq!(s.rate, 2.0);
        // Slow answers count against the tenant too.
        let mut slow = TenantState::new(&t, &c, 0);
        for sec in 1..=5u64 {
            slow.observe(&t, &c, 200, 5_000.0, sec * 1_000_000);
        }
        assert!(slow.rate < 10.0, "{}", slow.rate);
    }

    fn new_tenant(c: &RateLimitConfig) -> Tenant {
        identify(
            c,
            &IdentityInput {
                header: Some("new"),
                ..Default::default()
            },
        )
    }

    /// Healthy answers raise the rate by one `increase` per `adjust_ms`
    /// (1 s here), however many arrive in the window; the window counts
    /// from the last adjustment.
    #[test]
    fn aimd_raises_once_per_adjust_window_however_many_answers() {
        let c = cfg(json!({}));
        let t = new_tenant(&c);
        let mut s = TenantState::new(&t, &c, 0);
        for i in 1..100u64 {
            s.observe(&t, &c, 200, 10.0, i * 10_000);
        }
        assert_eq!(
            s.rate, 10.0,
            "99 answers within the first second: no change"
        );
        s.observe(&t, &c, 200, 10.0, 1_000_000);
        assert_eq!(s.rate, 15.0, "one +5 at the end of the window");
        for i in 1..100u64 {
            s.observe(&t, &c, 200, 10.0, 1_000_000 + i * 10_000);
        }
        assert_eq!(s.rate, 15.0, "the next window starts at the adjustment");
        s.observe(&t, &c, 200, 10.0, 2_000_000);
        assert_eq!(s.rate, 20.0);
    }

    /// Errors cut the rate by one `decrease` factor per `adjust_ms`,
    /// however many errors arrive in the window, and never below `min`.
    #[test]
    fn aimd_cuts_once_per_adjust_window_however_many_errors() {
        let c = cfg(json!({}));
        let t = new_tenant(&c);
        let mut s = TenantState::new(&t, &c, 0);
        s.observe(&t, &c, 503, 10.0, 1_000_000);
        assert_eq!(s.rate, 5.0, "one error at the window's end: one halving");
        for i in 1..100u64 {
            s.observe(&t, &c, 503, 10.0, 1_000_000 + i * 10_000);
        }
        assert_eq!(s.rate, 5.0, "99 more errors in the next window: no cut yet");
        s.observe(&t, &c, 503, 10.0, 2_000_000);
        assert_eq!(s.rate, 2.5, "one halving per window");
        s.observe(&t, &c, 503, 10.0, 3_000_000);
        assert_eq!(s.rate, 2.0, "1.25 is below min 2");
    }

    #[test]
    fn fixed_overrides_do_not_adapt() {
        let c = cfg(json!({}));
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("fixed"),
                ..Default::default()
            },
        );
        let mut s = TenantState::new(&t, &c, 0);
        for sec in 1..=5u64 {
            s.observe(&t, &c, 200, 1.0, sec * 1_000_000);
        }
        assert_eq!(s.rate, 3.0);
    }

    /// [`admit_in_table`] over a map standing in for shared data: 100,000
    /// distinct tenants never occupy more than `max_tenants` slots. (The
    /// glue's own loop around it, with the host's shared data, is tested in
    /// `understudy-filter`.)
    #[test]
    fn a_hundred_thousand_tenants_stay_within_the_table() {
        let c = cfg(json!({"max_tenants": 1000}));
        let mut shared: std::collections::HashMap<u32, TenantState> = Default::default();
        let mut evictions = 0;
        for i in 0..100_000u64 {
            let id = format!("tenant-{i}");
            let t = identify(
                &c,
                &IdentityInput {
                    header: Some(&id),
                    ..Default::default()
                },
            );
            let slots = candidate_slots(&t.id, c.max_tenants);
            let write = admit_in_table(
                &t,
                &c,
                [shared.get(&slots[0]), shared.get(&slots[1])],
                i,
                |_| true,
            );
            evictions += u64::from(matches!(write.placement, Placement::Evict(_)));
            assert!(
                write.admission.allowed,
                "a new tenant starts with its allowance"
            );
            shared.insert(slots[write.slot], write.state);
        }
        assert!(shared.len() <= 1000, "{}", shared.len());
        assert!(
            shared.len() > 950,
            "two choices fill the table: {}",
            shared.len()
        );
        assert_eq!(evictions + shared.len() as u64, 100_000);
    }

    fn tenant(c: &RateLimitConfig, id: &str) -> Tenant {
        identify(
            c,
            &IdentityInput {
                header: Some(id),
                ..Default::default()
            },
        )
    }

    /// The two admission paths used to differ here: `per_worker` gave the
    /// token back on a pool refusal but still counted the request as
    /// allowed. Both now count it as limited.
    #[test]
    fn a_pool_refusal_gives_the_token_back_and_counts_as_limited() {
        let c = cfg(json!({}));
        let t = tenant(&c, "someone");
        let mut s = TenantState::new(&t, &c, 0);
        let before = s.bucket.tokens;
        let mut asked = None;
        let a = admit_with_pool(&mut s, &t, &c, 1.0, 0, |pool| {
            asked = Some((pool.name.to_owned(), pool.rate));
            false
        });
        assert!(!a.allowed);
        assert!(a.retry_after_s >= 1.0);
        assert_eq!(s.bucket.tokens, before, "the token is back");
        assert_eq!((s.allowed, s.limited), (0, 1));
        // The pool is the tier's default: 100 tenants at `initial` 10.
        assert_eq!(asked, Some(("standard".to_owned(), 1000.0)));
        // A refusal by the tenant's own bucket never asks the pool.
        let mut empty = TenantState::new(&t, &c, 0);
        empty.bucket.tokens = 0.0;
        let a = admit_with_pool(&mut empty, &t, &c, 1.0, 0, |_| panic!("asked the pool"));
        assert!(!a.allowed);
        assert_eq!((empty.allowed, empty.limited), (0, 1));
    }

    #[test]
    fn the_local_table_enforces_a_share_evicts_the_oldest_and_shares_the_pool_rule() {
        let c = cfg(json!({"max_tenants": 2, "workers": 2}));
        let mut table = LocalTable::default();
        let (a, seat) = table.admit(&tenant(&c, "a"), &c, 0);
        assert!(a.allowed);
        assert_eq!(seat, Seat::Added);
        assert_eq!(table.admit(&tenant(&c, "b"), &c, 1).1, Seat::Added);
        assert_eq!(table.admit(&tenant(&c, "a"), &c, 2).1, Seat::Known);
        // `b` was seen least recently: it gives way to `c`.
        assert_eq!(table.admit(&tenant(&c, "c"), &c, 3).1, Seat::Evicted);
        assert!(table.get("b").is_none() && table.get("a").is_some());
        assert_eq!(table.len(), 2);
        // Half of `standard`'s 10/s with burst 1 s: 5 tokens on this worker.
        let mut table = LocalTable::default();
        let t = tenant(&c, "a");
        let allowed = (0..20).filter(|_| table.admit(&t, &c, 0).0.allowed).count();
        assert_eq!(allowed, 5);
        let s = table.get("a").map(|s| (s.allowed, s.limited));
        assert_eq!(s, Some((5, 15)));

        // A pool smaller than the tenants' sum: refused requests count as limited.
        let c = cfg(json!({
            "workers": 1,
            "tiers": {
                "anonymous": {"initial": 5, "min": 1, "max": 10},
                "standard": {"initial": 10, "min": 2, "max": 100, "pool_rate": 3},
                "partner": {"initial": 100, "min": 50, "max": 1000}
            }
        }));
        let mut table = LocalTable::default();
        let allowed = ["x", "y", "z", "w"]
            .iter()
            .filter(|id| table.admit(&tenant(&c, id), &c, 0).0.allowed)
            .count();
        assert_eq!(allowed, 3, "the pool's burst is 3");
        let limited: u64 = ["x", "y", "z", "w"]
            .iter()
            .filter_map(|id| table.get(id))
            .map(|s| s.limited)
            .sum();
        assert_eq!(limited, 1);
    }

    #[test]
    fn verdicts_follow_admission_shadow_and_headers_on_allowed() {
        let t = |c: &RateLimitConfig| tenant(c, "someone");
        let yes = Admission {
            allowed: true,
            retry_after_s: 0.0,
            rate: 10.0,
            remaining: 4.0,
        };
        let no = Admission {
            allowed: false,
            retry_after_s: 0.2,
            remaining: 0.0,
            ..yes
        };
        let plain = cfg(json!({}));
        assert_eq!(
            verdict(&t(&plain), &plain, None),
            (Verdict::Allow { headers: None }, None),
            "an undecided request goes on, uncounted"
        );
        assert_eq!(
            verdict(&t(&plain), &plain, Some(&yes)),
            (Verdict::Allow { headers: None }, Some(Counted::Allowed))
        );
        let with_headers = cfg(json!({"headers_on_allowed": true}));
        match verdict(&t(&with_headers), &with_headers, Some(&yes)) {
            (Verdict::Allow { headers: Some(h) }, Some(Counted::Allowed)) => {
                assert!(
                    h.iter()
                        .any(|(k, v)| k == "ratelimit" && v.contains("r=4;t=0"))
                );
            }
            other => panic!("{other:?}"),
        }
        let shadow = cfg(json!({"shadow": true}));
        assert_eq!(
            verdict(&t(&shadow), &shadow, Some(&no)),
            (
                Verdict::Allow { headers: None },
                Some(Counted::ShadowLimited)
            )
        );
        match verdict(&t(&plain), &plain, Some(&no)) {
            (Verdict::Reject(r), Some(Counted::Limited)) => {
                assert!(
                    r.headers
                        .contains(&("retry-after".to_owned(), "1".to_owned()))
                );
                assert!(
                    r.headers
                        .contains(&("content-type".to_owned(), "application/json".to_owned()))
                );
                let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(body["tier"], "standard");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_route_rejection_names_its_limit_and_wait() {
        let limit = RouteLimit {
            route: 0,
            method: None,
            rate: 4.0,
            burst_s: 1.0,
        };
        let bucket = Bucket {
            tokens: 0.5,
            at_us: 0,
        };
        let r = route_rejection(3, &limit, &bucket);
        let get = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("retry-after").as_deref(), Some("1"));
        let pk = partition_key("route/3");
        assert_eq!(
            get("ratelimit-policy"),
            Some(format!("\"route\";q=4;w=1;pk=:{pk}:"))
        );
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["retry_after_s"], 1.0);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("4.0 requests per second"))
        );
    }

    #[test]
    fn usage_is_bounded_and_taken_once() {
        let c = cfg(json!({}));
        let mut u = UsageTable::new(2);
        let a = Admission {
            allowed: true,
            retry_after_s: 0.0,
            rate: 10.0,
            remaining: 1.0,
        };
        let no = Admission {
            allowed: false,
            ..a
        };
        for id in ["a", "b", "a", "c"] {
            let t = identify(
                &c,
                &IdentityInput {
                    header: Some(id),
                    ..Default::default()
                },
            );
            u.record(&t, if id == "a" { &no } else { &a });
        }
        let (tenants, dropped) = u.take();
        assert_eq!(dropped, 1, "c did not fit");
        assert_eq!((tenants["a"].allowed, tenants["a"].limited), (0, 2));
        assert!(u.take().0.is_empty());
    }

    #[test]
    fn admission_follows_config_changes() {
        let before = cfg(json!({"tenants": {"t": {"rate": 40}}}));
        let t = identify(
            &before,
            &IdentityInput {
                header: Some("t"),
                ..Default::default()
            },
        );
        let mut s = TenantState::new(&t, &before, 0);
        let after = cfg(json!({"tenants": {"t": {"rate": 20}}}));
        let t = identify(
            &after,
            &IdentityInput {
                header: Some("t"),
                ..Default::default()
            },
        );
        assert_eq!(admit(&mut s, &t, &after, 1).rate, 20.0);
        let moved = cfg(json!({"tenants": {"t": {"tier": "partner"}}}));
        let t = identify(
            &moved,
            &IdentityInput {
                header: Some("t"),
                ..Default::default()
            },
        );
        let a = admit(&mut s, &t, &moved, 2);
        assert_eq!(
            a.rate, 100.0,
            "a tenant moved to the partner tier starts at its initial"
        );
    }

    #[test]
    fn a_per_worker_share_admits_its_part() {
        let c =
            cfg(json!({"enforcement": "per_worker", "workers": 2, "tenants": {"t": {"rate": 10}}}));
        assert_eq!(c.enforcement, Enforcement::PerWorker);
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("t"),
                ..Default::default()
            },
        );
        let mut s = TenantState::new(&t, &c, 0);
        s.bucket.tokens = 0.0;
        let admitted = (1..=100u64)
            .filter(|i| admit_share(&mut s, &t, &c, 0.5, i * 100_000).allowed)
            .count();
        assert!(
            (49..=51).contains(&admitted),
            "half of 10/s over 10 s: {admitted}"
        );
    }

    #[test]
    fn fleet_rates_stand_in_for_rates() {
        let c = cfg(json!({"tenants": {"big": {"fleet_rate": 40}}}));
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("big"),
                ..Default::default()
            },
        );
        assert_eq!(TenantState::new(&t, &c, 0).rate, 40.0);
    }

    #[test]
    fn route_limits_name_routes_and_methods() {
        let raw: RawRateLimitConfig = serde_json::from_value(json!({
            "identity": {"header": "x-tenant-id"},
            "tiers": {"anonymous": {"initial": 1, "min": 1, "max": 1}},
            "default_tier": "anonymous",
            "route_limits": [{"route": "orders", "method": "POST", "rate": 5}, {"route": "all", "rate": 100}]
        }))
        .unwrap();
        let c =
            RateLimitConfig::with_routes(raw.clone(), "rate_limit", &["orders", "all"]).unwrap();
        let hits: Vec<usize> = c
            .route_limits_for(Some(0), "POST")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hits, vec![0]);
        assert_eq!(c.route_limits_for(Some(0), "GET").count(), 0);
        assert_eq!(c.route_limits_for(Some(1), "GET").count(), 1);
        let e = RateLimitConfig::with_routes(raw, "rate_limit", &["all"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rate_limit.route_limits[0].route: unknown route \"orders\""),
            "{e}"
        );
    }

    #[test]
    fn placement_prefers_the_tenant_then_free_then_least_recent() {
        let c = cfg(json!({}));
        let mk = |id: &str, seen: u64| {
            let mut s = TenantState::new(
                &identify(
                    &c,
                    &IdentityInput {
                        header: Some(id),
                        ..Default::default()
                    },
                ),
                &c,
                0,
            );
            s.seen_us = seen;
            s
        };
        let (a, b) = (mk("a", 5), mk("b", 9));
        assert_eq!(place("b", [Some(&a), Some(&b)]), Placement::Found(1));
        assert_eq!(place("c", [Some(&a), None]), Placement::Free(1));
        assert_eq!(place("c", [Some(&a), Some(&b)]), Placement::Evict(0));
    }

    #[test]
    fn headers_parse_as_structured_fields() {
        let c = cfg(json!({}));
        let t = identify(
            &c,
            &IdentityInput {
                header: Some("acme"),
                ..Default::default()
            },
        );
        let a = Admission {
            allowed: false,
            retry_after_s: 0.3,
            rate: 100.0,
            remaining: 0.2,
        };
        let h: BTreeMap<_, _> = headers_for(&t, &a).into_iter().collect();
        assert_eq!(h["retry-after"], "1");
        let pk = sf_pk(&h["ratelimit-policy"], &[("q", 100), ("w", 1)]);
        assert_eq!(sf_pk(&h["ratelimit"], &[("r", 0), ("t", 1)]), pk);
        assert_eq!(pk, STANDARD.decode(partition_key("acme")).unwrap());
        assert!(!h["ratelimit"].contains("acme"));
        let body: serde_json::Value = serde_json::from_str(&limited_body(&t, &c, &a)).unwrap();
        assert_eq!(body["tier"], "partner");
    }

    /// Parses `value` as an RFC 9651 List holding one String item named
    /// `"tenant"`, checks its integer parameters, and returns its `pk` bytes.
    fn sf_pk(value: &str, ints: &[(&str, i64)]) -> Vec<u8> {
        let list: sfv::List = sfv::Parser::new(value)
            .parse()
            .unwrap_or_else(|e| panic!("{value:?} is not an RFC 9651 list: {e}"));
        assert_eq!(list.len(), 1, "{value}");
        let sfv::ListEntry::Item(item) = &list[0] else {
            panic!("{value}: not an item")
        };
        assert_eq!(
            item.bare_item.as_string().map(|s| s.as_str()),
            Some("tenant")
        );
        for (k, want) in ints {
            let got = item.params.get(*k).and_then(|v| v.as_integer());
            assert_eq!(got.map(i64::from), Some(*want), "{value}: parameter {k}");
        }
        match item.params.get("pk") {
            Some(sfv::BareItem::ByteSequence(b)) => b.clone(),
            other => panic!("{value}: pk is {other:?}, not a byte sequence"),
        }
    }

    #[test]
    fn every_tenant_id_gives_headers_strict_parsers_accept() {
        // URL-safe base64 put `-` or `_` in about 3 of 10 of these.
        let a = Admission {
            allowed: false,
            retry_after_s: 2.5,
            rate: 40.0,
            remaining: 0.0,
        };
        for i in 0..2_000 {
            let tenant = format!("tenant-{i}");
            let pk = partition_key(&tenant);
            let h: BTreeMap<_, _> = policy_headers("tenant", &pk, &a).into_iter().collect();
            let want = STANDARD.decode(&pk).unwrap();
            assert_eq!(want.len(), 9);
            assert_eq!(sf_pk(&h["ratelimit-policy"], &[("q", 40), ("w", 1)]), want);
            assert_eq!(sf_pk(&h["ratelimit"], &[("r", 0), ("t", 3)]), want);
            let retry: sfv::Item = sfv::Parser::new(h["retry-after"].as_str()).parse().unwrap();
            assert_eq!(retry.bare_item.as_integer().map(i64::from), Some(3));
        }
    }

    /// The tenant a request with header value `p` is.
    fn tenant_p(c: &RateLimitConfig) -> Tenant {
        identify(
            c,
            &IdentityInput {
                header: Some("p"),
                ..Default::default()
            },
        )
    }

    #[test]
    fn answers_wait_for_the_next_write_unless_they_may_move_the_rate() {
        let mut p = PendingAnswers::default();
        let a = |at_us| Answer {
            status: 200,
            latency_ms: 1.0,
            at_us,
        };
        assert!(p.defer("t", a(1), false));
        assert!(p.defer("t", a(2), false));
        assert_eq!(p.of("t"), &[a(1), a(2)]);
        assert!(!p.defer("t", a(3), true), "an adjustment is due: write now");
        p.written("t");
        assert!(p.of("t").is_empty());
        // Bounded per tenant: the answer that fills the list goes with it.
        for i in 0..(MAX_PENDING_PER_TENANT as u64 - 1) {
            assert!(p.defer("t", a(i), false));
        }
        assert!(!p.defer("t", a(99), false));
        // And in tenants.
        let mut q = PendingAnswers::default();
        for i in 0..MAX_PENDING_TENANTS {
            assert!(q.defer(&format!("t{i}"), a(0), false));
        }
        assert!(!q.defer("one more", a(0), false));
        assert!(q.defer("t0", a(1), false), "known tenants still wait");
        assert_eq!(q.tenants(), MAX_PENDING_TENANTS);
    }

    #[test]
    fn folded_answers_move_the_averages_as_one_by_one_would() {
        let c = cfg(json!({}));
        let t = tenant_p(&c);
        let answers: Vec<Answer> = (0..10u64)
            .map(|i| Answer {
                status: if i % 3 == 0 { 503 } else { 200 },
                latency_ms: i as f64,
                at_us: 1_000 + i,
            })
            .collect();
        let mut one_by_one = TenantState::new(&t, &c, 0);
        for a in &answers {
            one_by_one.observe(&t, &c, a.status, a.latency_ms, a.at_us);
        }
        let mut folded = TenantState::new(&t, &c, 0);
        folded.observe_all(&t, &c, &answers);
        assert_eq!(folded, one_by_one);
        assert!(folded.success < 1.0 && folded.latency_ms > 0.0);
    }

    #[test]
    fn shared_values_are_binary_and_old_json_reads_as_absent() {
        let c = cfg(json!({}));
        let t = tenant_p(&c);
        let s = TenantState::new(&t, &c, 7);
        let bytes = s.encode();
        assert_eq!(bytes.first(), Some(&SHARED_FORMAT));
        let json = serde_json::to_vec(&s).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {} bytes",
            bytes.len(),
            json.len()
        );
        assert_eq!(TenantState::decode(&json), None);
        assert_eq!(TenantState::decode(&[]), None);
        let b = Bucket::full(10.0, 1.0, 5);
        assert_eq!(decode_shared::<Bucket>(&encode_shared(&b)), Some(b));
    }

    #[test]
    fn a_fill_claim_is_taken_once_and_garbled_chunks_claim_nothing() {
        let empty = empty_fill_chunk();
        assert_eq!(fill_chunks(1), 1);
        assert_eq!(fill_chunks(FILL_CHUNK_SLOTS), 1);
        assert_eq!(fill_chunks(FILL_CHUNK_SLOTS + 1), 2);
        assert_eq!(fill_chunks(1_000_000), 245);
        let one = claim_fill(&empty, 4097).unwrap_or_default();
        assert!(fill_claimed(&one, 4097), "the claim is in its chunk");
        assert!(
            fill_claimed(&one, 1),
            "4097 and 1 share bit 1 of their chunks"
        );
        assert!(!fill_claimed(&one, 4096));
        assert_eq!(claim_fill(&one, 4097), None, "a claim is taken once");
        // A short or garbled chunk is padded; it never panics.
        assert!(!fill_claimed(&[], 9));
        assert_eq!(claim_fill(&[0xff], 9).map(|c| c.len()), Some(empty.len()));
        assert_eq!(claim_fill(&[0xff], 7), None);
    }

    /// Envoy's shared data as proxy-wasm-cpp-host keeps it (`SharedData`):
    /// one CAS counter for every key, never 0, and the token checked only
    /// against a key that exists: a write to an absent key always succeeds.
    #[derive(Default)]
    struct EnvoyShared {
        map: BTreeMap<TableKey, (Vec<u8>, u32)>,
        cas: u32,
    }

    impl EnvoyShared {
        fn get(&self, key: TableKey) -> (Option<Vec<u8>>, u32) {
            self.map
                .get(&key)
                .map_or((None, 0), |(v, c)| (Some(v.clone()), *c))
        }

        fn set(&mut self, key: TableKey, value: Vec<u8>, cas: u32) -> SetResult {
            if let Some((_, current)) = self.map.get(&key)
                && cas != 0
                && cas != *current
            {
                return SetResult::CasMismatch;
            }
            self.cas += 1;
            self.map.insert(key, (value, self.cas));
            SetResult::Ok
        }

        /// Slots holding a tenant, and which tenants.
        fn tenants(&self) -> Vec<String> {
            self.map
                .iter()
                .filter(|(k, _)| matches!(k, TableKey::Slot(_)))
                .filter_map(|(_, (v, _))| TenantState::decode(v))
                .map(|s| s.tenant)
                .collect()
        }
    }

    /// One worker: its queue of new tenants, and the admission in progress.
    struct Worker {
        queue: Vec<Tenant>,
        current: Option<(Tenant, TableAdmit, TableStep)>,
        /// Steps the admission in progress has taken.
        steps: u32,
    }

    #[derive(Default)]
    struct Tally {
        /// What the tenants gauge adds up to, and the evictions counter.
        fills: u64,
        evictions: u64,
        admitted: u64,
        /// The most steps any admission took.
        most_steps: u32,
    }

    /// Advances `w` by one step: at most one shared-data call, as atomic
    /// as Envoy's lock makes it. Returns false when the worker is idle.
    fn step(
        w: &mut Worker,
        c: &RateLimitConfig,
        shared: &mut EnvoyShared,
        counted: &mut Tally,
        now_us: u64,
    ) -> bool {
        let Some((tenant, mut admit, next)) = w.current.take().or_else(|| {
            let t = w.queue.pop()?;
            let (admit, first) = TableAdmit::start(&t.id, c.max_tenants);
            Some((t, admit, first))
        }) else {
            return false;
        };
        w.steps += 1;
        let next = match next {
            TableStep::Get(k) => {
                let (v, cas) = shared.get(k);
                admit.got(&tenant.id, v.as_deref(), cas)
            }
            TableStep::Decide => admit.decide(&tenant, c, &[], now_us, |_| true),
            TableStep::Set { key, value, cas } => admit.set(shared.set(key, value, cas)),
            TableStep::Done(done) => {
                counted.most_steps = counted.most_steps.max(w.steps);
                w.steps = 0;
                if let Some(d) = done {
                    counted.admitted += 1;
                    match d.placement {
                        Placement::Free(_) => counted.fills += 1,
                        Placement::Evict(_) => counted.evictions += 1,
                        Placement::Found(_) => {}
                    }
                }
                return true;
            }
        };
        w.current = Some((tenant, admit, next));
        true
    }

    /// Configure could not create the fill map: an admission creates the
    /// chunk with its claim, reads it back, and fills the slot; later
    /// admissions claim by compare-and-swap. A tenant already there is
    /// written back with its slot's token.
    #[test]
    fn without_a_fill_map_the_first_admission_creates_it() {
        let c = cfg(json!({"max_tenants": 3}));
        let mut shared = EnvoyShared::default();
        let mut w = Worker {
            queue: ["a", "b", "c", "d", "a"]
                .iter()
                .rev()
                .map(|id| tenant(&c, id))
                .collect(),
            current: None,
            steps: 0,
        };
        let mut counted = Tally::default();
        let mut steps = 0;
        while step(&mut w, &c, &mut shared, &mut counted, steps) {
            steps += 1;
        }
        assert!(shared.map.contains_key(&TableKey::Fill(0)));
        let held = shared.tenants();
        assert_eq!(counted.admitted, 5, "every admission was written");
        assert_eq!(counted.fills, held.len() as u64, "{held:?}");
        // A fresh admission of a tenant in the table: read, decide, write.
        let found = held.first().cloned().unwrap_or_default();
        let (mut admit, first) = TableAdmit::start(&found, 3);
        let TableStep::Get(k) = first else {
            panic!("starts with a read: {first:?}")
        };
        let (v, cas) = shared.get(k);
        let mut next = admit.got(&found, v.as_deref(), cas);
        if let TableStep::Get(k) = next {
            let (v, cas) = shared.get(k);
            next = admit.got(&found, v.as_deref(), cas);
        }
        assert_eq!(next, TableStep::Decide);
        let next = admit.decide(&tenant(&c, &found), &c, &[], 99, |_| true);
        assert!(
            matches!(next, TableStep::Set { cas, .. } if cas != 0),
            "written back with its token: {next:?}"
        );
    }

    proptest::proptest! {
        /// Workers admitting distinct new tenants into a small table, their
        /// shared-data calls interleaved in any order (each worker's
        /// read-decide-write split by the others' steps, as Envoy's workers
        /// do on their own threads). The fill map exists, as configure
        /// leaves it. At every step the tenants gauge (slots counted as
        /// filled) is at most the slots that hold a tenant, never above
        /// `max_tenants`; at the end it is exactly that, no tenant sits in
        /// two slots, and every counted admission filled a slot or counted
        /// an eviction. Without the fill-map claim two workers that both
        /// read a slot as absent both wrote it and both counted it.
        #[test]
        fn interleaved_workers_count_exactly_the_slots_in_use(
            slots in 1u32..6,
            workers in 2usize..4,
            per_worker in 1usize..10,
            schedule in proptest::collection::vec(0usize..3, 0..800),
        ) {
            let c = cfg(json!({"max_tenants": slots}));
            let mut shared = EnvoyShared::default();
            for chunk in 0..fill_chunks(slots) {
                shared.set(TableKey::Fill(chunk), empty_fill_chunk(), 0);
            }
            let mut ws: Vec<Worker> = (0..workers)
                .map(|w| Worker {
                    queue: (0..per_worker).map(|i| tenant(&c, &format!("w{w}-t{i}"))).collect(),
                    current: None,
                    steps: 0,
                })
                .collect();
            let mut counted = Tally::default();
            let mut now_us = 0;
            let picks = schedule.into_iter().map(|p| p % workers).chain(
                // Then every worker to the end, in turn.
                (0..workers * per_worker * 200).map(|i| i % workers),
            );
            for w in picks {
                now_us += 10;
                step(&mut ws[w], &c, &mut shared, &mut counted, now_us);
                let held = shared.tenants().len() as u64;
                proptest::prop_assert!(counted.fills <= held, "gauge {} above the {} slots in use", counted.fills, held);
                proptest::prop_assert!(held <= u64::from(slots));
            }
            proptest::prop_assert!(ws.iter().all(|w| w.queue.is_empty() && w.current.is_none()), "every admission ended");
            let mut held = shared.tenants();
            proptest::prop_assert_eq!(counted.fills, held.len() as u64, "the gauge is the slots in use: {:?}", held);
            held.sort();
            held.dedup();
            proptest::prop_assert_eq!(counted.fills, held.len() as u64, "no tenant in two slots");
            proptest::prop_assert_eq!(counted.fills + counted.evictions, counted.admitted);
            proptest::prop_assert!(counted.most_steps <= TABLE_STEPS, "{} steps", counted.most_steps);
        }
    }

    proptest::proptest! {
        #[test]
        fn state_round_trips_and_garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), rate in 0.1f64..1e6) {
            let _ = TenantState::decode(&bytes);
            let c = cfg(json!({}));
            let t = tenant_p(&c);
            let mut s = TenantState::new(&t, &c, 7);
            s.rate = rate;
            let back = TenantState::decode(&s.encode());
            proptest::prop_assert!(back.is_some());
            let back = back.unwrap_or_else(|| s.clone());
            proptest::prop_assert_eq!(back.rate, rate);
            proptest::prop_assert_eq!(back.tenant, s.tenant);
            proptest::prop_assert_eq!(back.bucket.at_us, s.bucket.at_us);
        }

        #[test]
        fn the_rate_stays_within_its_tier(statuses in proptest::collection::vec(proptest::prelude::any::<bool>(), 1..300)) {
            let c = cfg(json!({}));
            let t = tenant_p(&c);
            let mut s = TenantState::new(&t, &c, 0);
            for (i, ok) in statuses.iter().enumerate() {
                s.observe(&t, &c, if *ok { 200 } else { 500 }, 5.0, i as u64 * 400_000);
                proptest::prop_assert!(s.rate >= 2.0 && s.rate <= 100.0, "{}", s.rate);
            }
        }

        #[test]
        fn slots_are_in_range(id in ".{0,40}", n in 1u32..100_000) {
            for s in candidate_slots(&id, n) {
                proptest::prop_assert!(s < n);
            }
        }
    }
}
