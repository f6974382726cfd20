//! Per-tenant rate-limit usage, learned from the filters' reports: every
//! worker of every Envoy sends what it admitted and limited per tenant since
//! its last report (`understudy.v1.ReportService/PushUsage`, served on the
//! xDS port). The book keeps running totals and each Envoy's current limit,
//! for `GET /v1/ratelimit/tenants`.
//!
//! The same gRPC service ([`Reports`]) receives the shadow comparison
//! batches (`Push`) and hands them to the [`ShadowBook`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;
use tonic::{Request, Response, Status};
use understudy_proto::v1::report_service_server::{ReportService, ReportServiceServer};
use understudy_proto::v1::{PushAck, ReportBatch, UsageReport};

use crate::shadow::ShadowBook;
use crate::xds::stream::unix_ms;

/// Tenants the book remembers; the least recently reported is forgotten first.
pub const MAX_TENANTS: usize = 10_000;

#[derive(Debug, Clone, Serialize)]
pub struct TenantUsage {
    pub tenant: String,
    pub tier: String,
    pub allowed: u64,
    pub limited: u64,
    /// The tenant's limit at each Envoy (node id → requests/s), as last reported.
    pub limit_rps_by_envoy: BTreeMap<String, f64>,
    /// Their sum: the tenant's limit across the fleet.
    pub fleet_limit_rps: f64,
    #[serde(with = "unix_ms")]
    pub last_report: SystemTime,
}

#[derive(Default)]
pub struct UsageBook {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tenants: BTreeMap<String, TenantUsage>,
    reports: u64,
    dropped: u64,
}

impl UsageBook {
    pub fn record(&self, report: &UsageReport, now: SystemTime) {
        let mut inner = self.lock();
        inner.reports += 1;
        inner.dropped += report.dropped;
        for t in &report.tenants {
            if !inner.tenants.contains_key(&t.tenant) && inner.tenants.len() >= MAX_TENANTS {
                let oldest = inner
                    .tenants
                    .iter()
                    .min_by_key(|(_, u)| u.last_report)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    inner.tenants.remove(&k);
                }
            }
            let entry = inner
                .tenants
                .entry(t.tenant.clone())
                .or_insert_with(|| TenantUsage {
                    tenant: t.tenant.clone(),
                    tier: t.tier.clone(),
                    allowed: 0,
                    limited: 0,
                    limit_rps_by_envoy: BTreeMap::new(),
                    fleet_limit_rps: 0.0,
                    last_report: now,
                });
            entry.tier = t.tier.clone();
            entry.allowed += t.allowed;
            entry.limited += t.limited;
            entry
                .limit_rps_by_envoy
                .insert(report.node_id.clone(), t.limit_rps);
            entry.fleet_limit_rps = entry.limit_rps_by_envoy.values().sum();
            entry.last_report = now;
        }
    }

    /// The `n` tenants with the most requests (admitted and limited).
    pub fn top(&self, n: usize) -> Vec<TenantUsage> {
        let mut all: Vec<TenantUsage> = self.lock().tenants.values().cloned().collect();
        all.sort_by(|a, b| {
            (b.allowed + b.limited)
                .cmp(&(a.allowed + a.limited))
                .then(a.tenant.cmp(&b.tenant))
        });
        all.truncate(n);
        all
    }

    /// (reports received, tenants dropped by full worker tables)
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.reports, inner.dropped)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The gRPC service the filters report to.
#[derive(Clone)]
pub struct Reports {
    book: Arc<UsageBook>,
    shadow: Arc<ShadowBook>,
}

impl Reports {
    pub fn new(book: Arc<UsageBook>, shadow: Arc<ShadowBook>) -> Self {
        Self { book, shadow }
    }

    pub fn into_service(self) -> ReportServiceServer<Self> {
        ReportServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ReportService for Reports {
    /// A batch is accepted as a whole; `accepted` counts the mismatch
    /// records stored (records naming an invalid route are refused, and the
    /// filter has no use for a per-record error).
    async fn push(&self, request: Request<ReportBatch>) -> Result<Response<PushAck>, Status> {
        // `peer.verified()` is the certificate's node id: the origin of this batch.
        let peer = crate::tls::peer(request.extensions())?;
        let batch = request.into_inner();
        crate::tls::authorize(&peer, &batch.node_id, "shadow report")?;
        let node = batch.node_id.clone();
        let got = self.shadow.ingest(batch, SystemTime::now());
        if got.rejected > 0 {
            tracing::warn!(
                node,
                rejected = got.rejected,
                "shadow report entries with invalid route names"
            );
        }
        Ok(Response::new(PushAck {
            accepted: got.accepted,
        }))
    }

    async fn push_usage(&self, request: Request<UsageReport>) -> Result<Response<PushAck>, Status> {
        let peer = crate::tls::peer(request.extensions())?;
        let report = request.into_inner();
        crate::tls::authorize(&peer, &report.node_id, "usage report")?;
        self.book.record(&report, SystemTime::now());
        Ok(Response::new(PushAck {
            accepted: report.tenants.len() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_proto::v1::TenantUsage as Wire;

    fn report(node: &str, tenants: &[(&str, u64, u64, f64)]) -> UsageReport {
        UsageReport {
            node_id: node.into(),
            dropped: 0,
            tenants: tenants
                .iter()
                .map(|(t, a, l, r)| Wire {
                    tenant: t.to_string(),
                    tier: "standard".into(),
                    allowed: *a,
                    limited: *l,
                    limit_rps: *r,
                })
                .collect(),
        }
    }

    #[test]
    fn totals_add_up_across_reports_and_envoys() {
        let book = UsageBook::default();
        let t0 = SystemTime::UNIX_EPOCH;
        book.record(&report("e1", &[("a", 10, 2, 20.0), ("b", 1, 0, 20.0)]), t0);
        book.record(&report("e2", &[("a", 5, 0, 20.0)]), t0);
        book.record(&report("e1", &[("a", 3, 1, 25.0)]), t0);
        let top = book.top(10);
        assert_eq!(top[0].tenant, "a");
        assert_eq!((top[0].allowed, top[0].limited), (18, 3));
        assert_eq!(top[0].fleet_limit_rps, 45.0, "e1 at 25 plus e2 at 20");
        assert_eq!(book.top(1).len(), 1);
        assert_eq!(book.counts(), (3, 0));
    }
}
