//! Rate-limit glue: carries out [`understudy_core::ratelimit`] decisions
//! against proxy-wasm shared data, so one limit holds for the whole Envoy
//! process rather than per worker.
//!
//! Why shared data with compare-and-swap rather than per-worker shares: a
//! tenant's requests land on whichever worker its connection is on, often all
//! on one. Fixed per-worker shares (rate ÷ workers) would then admit only half
//! its rate on a 2-worker Envoy, and rebalancing them from the root context
//! lags by a tick. A CAS on one small slot per request is exact at process
//! level; its cost (a process-wide lock around a few hundred bytes) is what
//! the `rate_limit` benchmark's `limiter_overhead_ratio` measures.

use proxy_wasm::types::{LogLevel, MetricType};
use std::time::Duration;

use prost::Message;
use std::collections::BTreeMap;

use understudy_core::ratelimit::{
    self, Admission, Bucket, Enforcement, IdentityInput, Placement, RateLimitConfig, Tenant,
    TenantState, UsageTable,
};
use understudy_core::{FilterConfig, stats};
use understudy_proto::v1::{TenantUsage, UsageReport};

use crate::host::{self, SharedSetError, Status};

/// Attempts of a read-modify-CAS before giving up on exactness (and allowing).
const CAS_RETRIES: usize = 8;

struct TierMetrics {
    allowed: u32,
    limited: u32,
    shadow_limited: u32,
}

pub struct Limiter {
    cfg: RateLimitConfig,
    prefix: String,
    tiers: Vec<TierMetrics>,
    tenants: u32,
    evictions: u32,
    route_limited: u32,
    usage: UsageTable,
    last_report_us: u64,
    reports_failed: u32,
    /// `per_worker` enforcement only: this worker's tenants and tier pools.
    local: BTreeMap<String, TenantState>,
    local_pools: BTreeMap<usize, Bucket>,
}

/// A request the limiter admitted: its answer feeds the tenant's adaptive limit.
pub struct Admitted {
    tenant: Tenant,
    started_us: u64,
    /// `RateLimit` headers to add to the response, when configured.
    pub headers: Option<Vec<(String, String)>>,
}

/// What to do with a request.
pub enum Verdict {
    Allow(Box<Admitted>),
    /// Answer 429 with these headers and body.
    Reject {
        headers: Vec<(String, String)>,
        body: String,
    },
}

struct Slot {
    key: String,
    state: Option<TenantState>,
    cas: u32,
}

fn read_slot(key: String) -> Result<Slot, Status> {
    let (bytes, cas) = host::shared_get(&key)?;
    let state = bytes.as_deref().and_then(TenantState::decode);
    Ok(Slot { key, state, cas })
}

impl Limiter {
    pub fn new(config: &FilterConfig) -> Result<Option<Self>, String> {
        let Some(cfg) = config.rate_limit().cloned() else {
            return Ok(None);
        };
        let counter = |name: String| host::define(MetricType::Counter, &name);
        let tiers = cfg
            .tiers
            .iter()
            .map(|t| {
                Ok(TierMetrics {
                    allowed: counter(stats::ratelimit(config, &format!("{}.allowed", t.name)))?,
                    limited: counter(stats::ratelimit(config, &format!("{}.limited", t.name)))?,
                    shadow_limited: counter(stats::ratelimit(
                        config,
                        &format!("{}.shadow_limited", t.name),
                    ))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Some(Self {
            prefix: format!("{}/ratelimit", config.stat_prefix()),
            tenants: host::define(MetricType::Gauge, &stats::ratelimit(config, "tenants"))?,
            evictions: counter(stats::ratelimit(config, "evictions"))?,
            route_limited: counter(stats::ratelimit(config, "route_limited"))?,
            reports_failed: counter(stats::ratelimit(config, "reports_failed"))?,
            usage: UsageTable::new(cfg.report.as_ref().map_or(0, |r| r.max_tenants)),
            last_report_us: 0,
            local: BTreeMap::new(),
            local_pools: BTreeMap::new(),
            tiers,
            cfg,
        }))
    }

    fn slot_keys(&self, tenant: &str) -> [String; 2] {
        ratelimit::candidate_slots(tenant, self.cfg.max_tenants)
            .map(|s| format!("{}/t/{s}", self.prefix))
    }

    /// Decides whether this request (on `route`, if it matched one) may go on.
    pub fn on_request(&mut self, route: Option<usize>, now_us: u64) -> Verdict {
        if let Some(rejection) = self.check_route_limits(route, now_us) {
            return rejection;
        }
        let header = self.cfg.header.as_deref().and_then(host::request_header);
        let api_key = self
            .cfg
            .api_key_header
            .as_deref()
            .and_then(host::request_header);
        let authorization = self
            .cfg
            .jwt_claim
            .as_ref()
            .and_then(|_| host::request_header("authorization"));
        let tenant = ratelimit::identify(
            &self.cfg,
            &IdentityInput {
                header: header.as_deref(),
                api_key: api_key.as_deref(),
                authorization: authorization.as_deref(),
            },
        );
        let admission = self.admit(&tenant, now_us);
        if let (Some(a), Some(_)) = (&admission, &self.cfg.report) {
            self.usage.record(&tenant, a);
        }
        let metrics = self.tiers.get(tenant.tier);
        let Some(a) = admission else {
            // Shared data failed: never block traffic on our own fault.
            return Verdict::Allow(Box::new(Admitted {
                tenant,
                started_us: now_us,
                headers: None,
            }));
        };
        if a.allowed {
            if let Some(m) = metrics {
                host::increment(m.allowed, 1);
            }
            let headers = self
                .cfg
                .headers_on_allowed
                .then(|| ratelimit::headers_for(&tenant, &a));
            return Verdict::Allow(Box::new(Admitted {
                tenant,
                started_us: now_us,
                headers,
            }));
        }
        if self.cfg.shadow {
            if let Some(m) = metrics {
                host::increment(m.shadow_limited, 1);
            }
            return Verdict::Allow(Box::new(Admitted {
                tenant,
                started_us: now_us,
                headers: None,
            }));
        }
        if let Some(m) = metrics {
            host::increment(m.limited, 1);
        }
        let mut headers = ratelimit::headers_for(&tenant, &a);
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
        let body = ratelimit::limited_body(&tenant, &self.cfg, &a);
        Verdict::Reject { headers, body }
    }

    /// Process-wide route (and method) limits, before any tenant's token is spent.
    fn check_route_limits(&self, route: Option<usize>, now_us: u64) -> Option<Verdict> {
        if self.cfg.route_limits.is_empty() {
            return None;
        }
        let method = host::request_header(":method").unwrap_or_default();
        for (i, limit) in self.cfg.route_limits_for(route, &method) {
            let key = format!("{}/route/{i}", self.prefix);
            let Some((taken, bucket)) = take_shared_bucket(&key, limit.rate, limit.burst_s, now_us)
            else {
                continue;
            };
            if !taken {
                host::increment(self.route_limited, 1);
                let a = Admission {
                    allowed: false,
                    retry_after_s: bucket.wait_s(limit.rate),
                    rate: limit.rate,
                    remaining: 0.0,
                };
                // `pk` must be a valid RFC 9651 byte sequence, like the tenant one.
                let pk = ratelimit::partition_key(&format!("route/{i}"));
                let mut headers = ratelimit::policy_headers("route", &pk, &a);
                headers.push(("content-type".to_owned(), "application/json".to_owned()));
                let body = serde_json::json!({
                    "error": "rate_limited",
                    "message": format!("route limit of {:.1} requests per second exceeded", limit.rate),
                    "retry_after_s": a.retry_after_s.ceil().max(1.0),
                })
                .to_string();
                return Some(Verdict::Reject { headers, body });
            }
        }
        None
    }

    /// Tenant bucket, then the tier's pool, as one read-modify-CAS of the
    /// tenant's slot (a pool refusal gives the tenant its token back).
    fn admit(&mut self, tenant: &Tenant, now_us: u64) -> Option<Admission> {
        if self.cfg.enforcement == Enforcement::PerWorker {
            return Some(self.admit_locally(tenant, now_us));
        }
        let [k0, k1] = self.slot_keys(&tenant.id);
        for _ in 0..CAS_RETRIES {
            // Each shared-data call takes Envoy's process-wide lock: skip the
            // second slot when the tenant already sits in the first.
            let first = read_slot(k0.clone()).ok()?;
            let second = if first.state.as_ref().is_some_and(|s| s.tenant == tenant.id) {
                Slot {
                    key: k1.clone(),
                    state: None,
                    cas: 0,
                }
            } else {
                read_slot(k1.clone()).ok()?
            };
            let slots = [first, second];
            let placement = ratelimit::place(
                &tenant.id,
                [slots[0].state.as_ref(), slots[1].state.as_ref()],
            );
            let (i, mut state) = match placement {
                Placement::Found(i) => (i, slots[i].state.clone()?),
                Placement::Free(i) | Placement::Evict(i) => {
                    (i, TenantState::new(tenant, &self.cfg, now_us))
                }
            };
            let mut a = ratelimit::admit(&mut state, tenant, &self.cfg, now_us);
            if a.allowed && !self.take_from_pool(tenant.tier, now_us) {
                state.bucket.tokens += 1.0;
                state.allowed -= 1;
                state.limited += 1;
                a.allowed = false;
                a.retry_after_s = a.retry_after_s.max(1.0);
            }
            match host::shared_set(&slots[i].key, &state.encode(), slots[i].cas) {
                Ok(()) => {
                    match placement {
                        Placement::Free(_) => host::increment(self.tenants, 1),
                        Placement::Evict(_) => host::increment(self.evictions, 1),
                        Placement::Found(_) => {}
                    }
                    return Some(a);
                }
                Err(SharedSetError::CasMismatch) => continue,
                Err(status) => {
                    host::log(
                        LogLevel::Warn,
                        &format!("understudy: rate-limit write failed: {status:?}"),
                    );
                    return None;
                }
            }
        }
        None
    }

    /// `per_worker`: this worker alone enforces `1 / workers` of each rate,
    /// with no shared data. Bounded like the shared table; the least recently
    /// seen tenant is evicted.
    fn admit_locally(&mut self, tenant: &Tenant, now_us: u64) -> Admission {
        let share = 1.0 / f64::from(self.cfg.workers.max(1));
        if !self.local.contains_key(&tenant.id) {
            if self.local.len() >= self.cfg.max_tenants as usize {
                let oldest = self
                    .local
                    .iter()
                    .min_by_key(|(_, s)| s.seen_us)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.local.remove(&k);
                    host::increment(self.evictions, 1);
                }
            } else {
                host::increment(self.tenants, 1);
            }
            self.local.insert(
                tenant.id.clone(),
                TenantState::new(tenant, &self.cfg, now_us),
            );
        }
        let Some(state) = self.local.get_mut(&tenant.id) else {
            return Admission {
                allowed: true,
                retry_after_s: 0.0,
                rate: 0.0,
                remaining: 0.0,
            };
        };
        let mut a = ratelimit::admit_share(state, tenant, &self.cfg, share, now_us);
        if a.allowed
            && let Some(t) = self.cfg.tier(tenant.tier)
            && let Some(rate) = t.pool_rate
        {
            let pool = self
                .local_pools
                .entry(tenant.tier)
                .or_insert_with(|| Bucket::full(rate * share, t.burst_s, now_us));
            if !pool.take(rate * share, t.burst_s, now_us) {
                state.bucket.tokens += 1.0;
                a.allowed = false;
                a.retry_after_s = a.retry_after_s.max(1.0);
            }
        }
        a
    }

    /// The tier's shared capacity, if it has one.
    fn take_from_pool(&self, tier: usize, now_us: u64) -> bool {
        let Some(t) = self.cfg.tier(tier) else {
            return true;
        };
        let Some(rate) = t.pool_rate else { return true };
        let key = format!("{}/pool/{}", self.prefix, t.name);
        take_shared_bucket(&key, rate, t.burst_s, now_us).is_none_or(|(taken, _)| taken)
    }

    /// How often the root context must tick for reports, if they are on.
    pub fn report_interval(&self) -> Option<Duration> {
        self.cfg
            .report
            .as_ref()
            .map(|r| Duration::from_millis(r.interval_ms))
    }

    /// Sends this worker's usage since the last report, when one is due.
    pub fn report_if_due(&mut self, now_us: u64) {
        let Some(report) = &self.cfg.report else {
            return;
        };
        if now_us.saturating_sub(self.last_report_us) < report.interval_ms * 1000 {
            return;
        }
        self.last_report_us = now_us;
        let (tenants, dropped) = self.usage.take();
        if tenants.is_empty() && dropped == 0 {
            return;
        }
        let node_id = host::node_id();
        let message = UsageReport {
            node_id,
            dropped,
            tenants: tenants
                .into_iter()
                .map(|(tenant, u)| TenantUsage {
                    tenant,
                    tier: self
                        .cfg
                        .tier(u.tier)
                        .map(|t| t.name.clone())
                        .unwrap_or_default(),
                    allowed: u.allowed,
                    limited: u.limited,
                    limit_rps: u.limit_rps,
                })
                .collect(),
        }
        .encode_to_vec();
        let sent = host::grpc_call(
            &report.cluster,
            "understudy.v1.ReportService",
            "PushUsage",
            &message,
            Duration::from_secs(5),
        );
        if let Err(status) = sent {
            host::increment(self.reports_failed, 1);
            host::log(
                LogLevel::Debug,
                &format!("understudy: usage report not sent: {status:?}"),
            );
        }
    }

    /// The upstream answered an admitted request: adapt the tenant's limit.
    pub fn on_response(&mut self, admitted: &Admitted, status: u16, now_us: u64) {
        let latency_ms = now_us.saturating_sub(admitted.started_us) as f64 / 1000.0;
        let tenant = &admitted.tenant;
        if self.cfg.enforcement == Enforcement::PerWorker {
            if let Some(state) = self.local.get_mut(&tenant.id) {
                state.observe(tenant, &self.cfg, status, latency_ms, now_us);
            }
            return;
        }
        for _ in 0..CAS_RETRIES {
            let found = self.slot_keys(&tenant.id).into_iter().find_map(|k| {
                let slot = read_slot(k).ok()?;
                slot.state
                    .as_ref()
                    .is_some_and(|s| s.tenant == tenant.id)
                    .then_some(slot)
            });
            // Evicted meanwhile: it starts again at `initial` next time.
            let Some(Slot {
                key,
                state: Some(mut state),
                cas,
            }) = found
            else {
                return;
            };
            state.observe(tenant, &self.cfg, status, latency_ms, now_us);
            match host::shared_set(&key, &state.encode(), cas) {
                Err(SharedSetError::CasMismatch) => continue,
                _ => return,
            }
        }
    }
}

/// Takes a token from a process-wide bucket kept in shared data (read, take,
/// compare-and-swap). `None` when shared data fails: callers then allow,
/// since the limiter must never block traffic on its own fault.
fn take_shared_bucket(key: &str, rate: f64, burst_s: f64, now_us: u64) -> Option<(bool, Bucket)> {
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = host::shared_get(key).ok()?;
        let mut bucket = bytes
            .as_deref()
            .and_then(|b| serde_json::from_slice::<Bucket>(b).ok())
            .unwrap_or_else(|| Bucket::full(rate, burst_s, now_us));
        let taken = bucket.take(rate, burst_s, now_us);
        let encoded = serde_json::to_vec(&bucket).ok()?;
        match host::shared_set(key, &encoded, cas) {
            Ok(()) => return Some((taken, bucket)),
            Err(SharedSetError::CasMismatch) => continue,
            Err(_) => return None,
        }
    }
    None
}
