//! Rate-limit glue: carries out [`understudy_core::ratelimit`] decisions
//! against proxy-wasm shared data, so one limit holds for the whole Envoy
//! process rather than per worker. Every decision (admission with the tier
//! pool, each read, claim and compare-and-swap of the shared table, the
//! verdict, the 429, the per-worker table) is made in the core; this module
//! reads headers, performs the shared-data steps the core asks for, counts,
//! and sends usage reports.
//!
//! Why shared data with compare-and-swap rather than per-worker shares: a
//! tenant's requests land on whichever worker its connection is on, often all
//! on one. Fixed per-worker shares (rate ÷ workers) would then admit only half
//! its rate on a 2-worker Envoy, and rebalancing them from the root context
//! lags by a tick. A CAS on one small slot per request is exact at process
//! level; its cost (a process-wide lock around a few hundred bytes) is what
//! the `rate_limit` benchmark's `limiter_overhead_ratio` measures.

use std::rc::Rc;
use std::time::Duration;

use prost::Message;
use proxy_wasm::types::{LogLevel, MetricType};

use understudy_core::ratelimit::{
    self, Answer, Bucket, Counted, Enforcement, IdentityInput, LocalTable, PendingAnswers,
    Placement, RateLimitConfig, Rejection, Seat, SetResult, TABLE_STEPS, TableAdmit, TableKey,
    TableStep, Tenant, TenantState, UsageTable, Verdict,
};
use understudy_core::report::Schedule;
use understudy_core::{FilterConfig, stats};
use understudy_proto::v1::{TenantUsage, UsageReport};

use crate::host::{Host, RequestHeaders, SharedSetError, Status};

/// Attempts of a read-modify-CAS before giving up on exactness (and allowing).
const CAS_RETRIES: usize = 8;

struct TierMetrics {
    allowed: u32,
    limited: u32,
    shadow_limited: u32,
}

pub struct Limiter {
    host: Rc<dyn Host>,
    cfg: RateLimitConfig,
    prefix: String,
    tiers: Vec<TierMetrics>,
    tenants: u32,
    evictions: u32,
    route_limited: u32,
    usage: UsageTable,
    schedule: Schedule,
    reports_failed: u32,
    /// `per_worker` enforcement only: this worker's tenants and tier pools.
    local: LocalTable,
    /// Shared enforcement: answers not yet written to their tenants' slots.
    pending: PendingAnswers,
}

/// A request the limiter admitted: its answer feeds the tenant's adaptive limit.
pub struct Admitted {
    tenant: Tenant,
    started_us: u64,
    /// From this time on, the answer may move the tenant's rate and is
    /// written at once (shared enforcement; `u64::MAX`: never).
    adjust_due_us: u64,
    /// `RateLimit` headers to add to the response, when configured.
    pub headers: Option<Vec<(String, String)>>,
}

/// What to do with a request.
pub enum Decision {
    Allow(Box<Admitted>),
    Reject(Rejection),
}

struct Slot {
    key: String,
    state: Option<TenantState>,
    cas: u32,
}

impl Limiter {
    pub fn new(host: &Rc<dyn Host>, config: &FilterConfig) -> Result<Option<Self>, String> {
        let Some(cfg) = config.rate_limit().cloned() else {
            return Ok(None);
        };
        let counter = |name: String| host.define(MetricType::Counter, &name);
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
        let limiter = Self {
            host: Rc::clone(host),
            prefix: format!("{}/ratelimit", config.stat_prefix()),
            tenants: host.define(MetricType::Gauge, &stats::ratelimit(config, "tenants"))?,
            evictions: counter(stats::ratelimit(config, "evictions"))?,
            route_limited: counter(stats::ratelimit(config, "route_limited"))?,
            reports_failed: counter(stats::ratelimit(config, "reports_failed"))?,
            usage: UsageTable::new(cfg.report.as_ref().map_or(0, |r| r.max_tenants)),
            schedule: Schedule::default(),
            local: LocalTable::default(),
            pending: PendingAnswers::default(),
            tiers,
            cfg,
        };
        if limiter.cfg.enforcement == Enforcement::Shared {
            limiter.create_fill_map();
        }
        Ok(Some(limiter))
    }

    fn slot_keys(&self, tenant: &str) -> [String; 2] {
        ratelimit::candidate_slots(tenant, self.cfg.max_tenants)
            .map(|s| self.table_key(TableKey::Slot(s)))
    }

    fn table_key(&self, key: TableKey) -> String {
        match key {
            TableKey::Slot(s) => format!("{}/t/{s}", self.prefix),
            TableKey::Fill(c) => format!("{}/fill/{c}", self.prefix),
        }
    }

    /// Creates the fill map's absent chunks before this worker admits
    /// anyone: a chunk's own first write is unconditional (Envoy checks CAS
    /// only on existing keys), so it is made here rather than in a race
    /// with the claims it holds. Failures are left to the admission path,
    /// which creates a missing chunk itself and reads it back.
    fn create_fill_map(&self) {
        for chunk in 0..ratelimit::fill_chunks(self.cfg.max_tenants) {
            let key = self.table_key(TableKey::Fill(chunk));
            if let Ok((None, 0)) = self.host.shared_get(&key) {
                let _ = self
                    .host
                    .shared_set(&key, &ratelimit::empty_fill_chunk(), 0);
            }
        }
    }

    fn read_slot(&self, key: String) -> Result<Slot, Status> {
        let (bytes, cas) = self.host.shared_get(&key)?;
        let state = bytes.as_deref().and_then(TenantState::decode);
        Ok(Slot { key, state, cas })
    }

    /// Decides whether this request (on `route`, if it matched one) may go on.
    pub fn on_request(
        &mut self,
        route: Option<usize>,
        headers: &RequestHeaders,
        now_us: u64,
    ) -> Decision {
        if let Some(rejection) = self.check_route_limits(route, headers, now_us) {
            return rejection;
        }
        let header = self.cfg.header.as_deref().and_then(|h| headers.text(h));
        let api_key = self
            .cfg
            .api_key_header
            .as_deref()
            .and_then(|h| headers.text(h));
        let authorization = self
            .cfg
            .jwt_claim
            .as_ref()
            .and_then(|_| headers.text("authorization"));
        let tenant = ratelimit::identify(
            &self.cfg,
            &IdentityInput {
                header: header.as_deref(),
                api_key: api_key.as_deref(),
                authorization: authorization.as_deref(),
            },
        );
        let (admission, adjust_due_us) = match self.admit(&tenant, now_us) {
            Some((a, due)) => (Some(a), due),
            None => (None, u64::MAX),
        };
        if let (Some(a), Some(_)) = (&admission, &self.cfg.report) {
            self.usage.record(&tenant, a);
        }
        let (verdict, counted) = ratelimit::verdict(&tenant, &self.cfg, admission.as_ref());
        if let (Some(m), Some(counted)) = (self.tiers.get(tenant.tier), counted) {
            let metric = match counted {
                Counted::Allowed => m.allowed,
                Counted::ShadowLimited => m.shadow_limited,
                Counted::Limited => m.limited,
            };
            self.host.increment(metric, 1);
        }
        match verdict {
            Verdict::Allow { headers } => Decision::Allow(Box::new(Admitted {
                tenant,
                started_us: now_us,
                adjust_due_us,
                headers,
            })),
            Verdict::Reject(r) => Decision::Reject(r),
        }
    }

    /// Process-wide route (and method) limits, before any tenant's token is spent.
    fn check_route_limits(
        &self,
        route: Option<usize>,
        headers: &RequestHeaders,
        now_us: u64,
    ) -> Option<Decision> {
        if self.cfg.route_limits.is_empty() {
            return None;
        }
        let method = headers.text(":method").unwrap_or_default();
        for (i, limit) in self.cfg.route_limits_for(route, &method) {
            let key = format!("{}/route/{i}", self.prefix);
            let Some((taken, bucket)) =
                take_shared_bucket(self.host.as_ref(), &key, limit.rate, limit.burst_s, now_us)
            else {
                continue;
            };
            if !taken {
                self.host.increment(self.route_limited, 1);
                return Some(Decision::Reject(ratelimit::route_rejection(
                    i, limit, &bucket,
                )));
            }
        }
        None
    }

    /// The tenant's admission: shared (the core's [`TableAdmit`] steps: read
    /// its slots, the tier pool, a fill-map claim for a never-written slot,
    /// the slot's compare-and-swap, folding in this worker's held answers)
    /// or this worker's own table. With it, when an answer may next move the
    /// rate.
    fn admit(&mut self, tenant: &Tenant, now_us: u64) -> Option<(ratelimit::Admission, u64)> {
        if self.cfg.enforcement == Enforcement::PerWorker {
            let (a, seat) = self.local.admit(tenant, &self.cfg, now_us);
            match seat {
                Seat::Added => self.host.increment(self.tenants, 1),
                Seat::Evicted => self.host.increment(self.evictions, 1),
                Seat::Known => {}
            }
            return Some((a, u64::MAX));
        }
        let (mut table, mut step) = TableAdmit::start(&tenant.id, self.cfg.max_tenants);
        // The machine ends within TABLE_STEPS steps (its `Done` included).
        for _ in 0..TABLE_STEPS {
            step = match step {
                TableStep::Get(key) => match self.host.shared_get(&self.table_key(key)) {
                    Ok((value, cas)) => table.got(&tenant.id, value.as_deref(), cas),
                    Err(_) => return None,
                },
                TableStep::Decide => {
                    let (host, prefix) = (self.host.as_ref(), &self.prefix);
                    table.decide(
                        tenant,
                        &self.cfg,
                        self.pending.of(&tenant.id),
                        now_us,
                        |pool| {
                            let key = format!("{prefix}/pool/{}", pool.name);
                            take_shared_bucket(host, &key, pool.rate, pool.burst_s, now_us)
                                .is_none_or(|(taken, _)| taken)
                        },
                    )
                }
                TableStep::Set { key, value, cas } => {
                    let result = match self.host.shared_set(&self.table_key(key), &value, cas) {
                        Ok(()) => SetResult::Ok,
                        Err(SharedSetError::CasMismatch) => SetResult::CasMismatch,
                        Err(status) => {
                            self.host.log(
                                LogLevel::Warn,
                                &format!("understudy: rate-limit write failed: {status:?}"),
                            );
                            SetResult::Failed
                        }
                    };
                    table.set(result)
                }
                TableStep::Done(done) => {
                    let done = done?;
                    self.pending.written(&tenant.id);
                    match done.placement {
                        Placement::Free(_) => self.host.increment(self.tenants, 1),
                        Placement::Evict(_) => self.host.increment(self.evictions, 1),
                        Placement::Found(_) => {}
                    }
                    let adjust_due_us = done.state.next_adjust_us(tenant, &self.cfg);
                    return Some((done.admission, adjust_due_us));
                }
            };
        }
        None
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
        if !self.schedule.due(now_us, report.interval_ms) {
            return;
        }
        let (tenants, dropped) = self.usage.take();
        if tenants.is_empty() && dropped == 0 {
            return;
        }
        let message = UsageReport {
            node_id: self.host.node_id(),
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
        let sent = self.host.grpc_call(
            &report.cluster,
            "understudy.v1.ReportService",
            "PushUsage",
            &message,
            Duration::from_secs(5),
        );
        if let Err(status) = sent {
            self.host.increment(self.reports_failed, 1);
            self.host.log(
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
            self.local
                .observe(tenant, &self.cfg, status, latency_ms, now_us);
            return;
        }
        let answer = Answer {
            status,
            latency_ms,
            at_us: now_us,
        };
        if self
            .pending
            .defer(&tenant.id, answer, now_us >= admitted.adjust_due_us)
        {
            return;
        }
        let mut answers = self.pending.of(&tenant.id).to_vec();
        answers.push(answer);
        // Written now or never: a tenant evicted meanwhile starts again anyway.
        self.pending.written(&tenant.id);
        for _ in 0..CAS_RETRIES {
            let found = self.slot_keys(&tenant.id).into_iter().find_map(|k| {
                let slot = self.read_slot(k).ok()?;
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
            state.observe_all(tenant, &self.cfg, &answers);
            match self.host.shared_set(&key, &state.encode(), cas) {
                Err(SharedSetError::CasMismatch) => continue,
                _ => return,
            }
        }
    }
}

/// Takes a token from a process-wide bucket kept in shared data (read, take,
/// compare-and-swap). `None` when shared data fails: callers then allow,
/// since the limiter must never block traffic on its own fault.
fn take_shared_bucket(
    host: &dyn Host,
    key: &str,
    rate: f64,
    burst_s: f64,
    now_us: u64,
) -> Option<(bool, Bucket)> {
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = host.shared_get(key).ok()?;
        let mut bucket = bytes
            .as_deref()
            .and_then(ratelimit::decode_shared::<Bucket>)
            .unwrap_or_else(|| Bucket::full(rate, burst_s, now_us));
        let taken = bucket.take(rate, burst_s, now_us);
        match host.shared_set(key, &ratelimit::encode_shared(&bucket), cas) {
            Ok(()) => return Some((taken, bucket)),
            Err(SharedSetError::CasMismatch) => continue,
            Err(_) => return None,
        }
    }
    None
}
