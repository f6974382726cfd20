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

use crate::evidence::shadow::ShadowBook;

/// Tenants the book remembers; the least recently reported is forgotten first.
pub const MAX_TENANTS: usize = 10_000;
/// Longest node id, tenant or tier accepted, in bytes. Longer ones are a
/// broken or hostile peer: the report (node id) or the entry is refused.
pub const MAX_NAME_LEN: usize = 256;
/// Tenant entries read from one report; the rest count as dropped. A worker
/// reports at most its table's tenants, 10,000 by default.
pub const MAX_TENANTS_PER_REPORT: usize = MAX_TENANTS;
/// (tenant, Envoy) limit entries kept in all: each costs some tens of bytes,
/// so this bounds what many node ids times many tenants can take. When full,
/// a new pair is not recorded (counted in `refused`), known pairs update.
pub const MAX_LIMIT_ENTRIES: usize = 200_000;
/// Largest per-Envoy limit believed, requests/s; a peer's larger, negative
/// or non-finite value counts as this bound or zero.
pub const MAX_LIMIT_RPS: f64 = 1e9;

/// Node ids whose last report time is kept (for [`UsageBook::reporters_since`]);
/// when full, the longest-silent one makes room.
pub const MAX_REPORTERS: usize = 10_000;

#[derive(Debug, Clone, Serialize)]
pub struct TenantUsage {
    pub tenant: String,
    pub tier: String,
    pub allowed: u64,
    pub limited: u64,
    /// The tenant's limit at each Envoy (node id → requests/s), as last reported.
    pub limit_rps_by_envoy: BTreeMap<Arc<str>, f64>,
    /// Their sum: the tenant's limit across the fleet.
    pub fleet_limit_rps: f64,
    #[serde(with = "crate::time::serde_unix_ms")]
    pub last_report: SystemTime,
    /// Position in the book's recency index.
    #[serde(skip)]
    seq: u64,
}

/// What [`UsageBook::record`] did with a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Tenant entries counted.
    pub accepted: u64,
    /// Entries refused: a name too long or empty, over the per-report cap,
    /// or a new (tenant, Envoy) pair with the limit table full.
    pub refused: u64,
}

#[derive(Default)]
pub struct UsageBook {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tenants: BTreeMap<String, TenantUsage>,
    /// Recency index: seq → tenant, oldest first, so eviction is O(log n)
    /// rather than a scan of every tenant under the lock.
    by_age: BTreeMap<u64, String>,
    next_seq: u64,
    /// Node ids, shared by every tenant entry that names them (with how
    /// many do): one copy per Envoy, however many tenants it reports.
    nodes: BTreeMap<Arc<str>, usize>,
    /// When each node id last reported (at most [`MAX_REPORTERS`]).
    last_seen: BTreeMap<Arc<str>, SystemTime>,
    limit_entries: usize,
    reports: u64,
    dropped: u64,
    refused: u64,
}

impl Inner {
    /// The shared copy of node id `id`, or a new one (kept once an entry uses it).
    fn node(&self, id: &str) -> Arc<str> {
        self.nodes
            .get_key_value(id)
            .map_or_else(|| Arc::from(id), |(n, _)| Arc::clone(n))
    }

    fn seen(&mut self, node: &Arc<str>, now: SystemTime) {
        if let Some(t) = self.last_seen.get_mut(node) {
            *t = now;
            return;
        }
        if self.last_seen.len() >= MAX_REPORTERS
            && let Some(oldest) = self
                .last_seen
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| Arc::clone(n))
        {
            self.last_seen.remove(&oldest);
        }
        self.last_seen.insert(Arc::clone(node), now);
    }

    fn evict_oldest(&mut self) {
        let Some((_, name)) = self.by_age.pop_first() else {
            return;
        };
        if let Some(old) = self.tenants.remove(&name) {
            for node in old.limit_rps_by_envoy.keys() {
                self.release(node);
            }
        }
    }

    fn hold(&mut self, node: &Arc<str>) {
        self.limit_entries = self.limit_entries.saturating_add(1);
        *self.nodes.entry(Arc::clone(node)).or_default() += 1;
    }

    fn release(&mut self, node: &Arc<str>) {
        self.limit_entries = self.limit_entries.saturating_sub(1);
        if let Some(n) = self.nodes.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.nodes.remove(node);
            }
        }
    }
}

fn limit(rps: f64) -> f64 {
    if rps.is_finite() && rps > 0.0 {
        rps.min(MAX_LIMIT_RPS)
    } else {
        0.0
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN
}

impl UsageBook {
    /// Adds one report. Every peer number saturates; names and counts are
    /// capped (see the constants), so a report costs bounded memory and time.
    /// A report whose node id is empty or longer than [`MAX_NAME_LEN`] is
    /// refused whole (every entry counts as refused).
    pub fn record(&self, report: &UsageReport, now: SystemTime) -> Recorded {
        let mut inner = self.lock();
        if !valid_name(&report.node_id) {
            let n = report.tenants.len() as u64;
            inner.refused = inner.refused.saturating_add(n);
            return Recorded {
                accepted: 0,
                refused: n,
            };
        }
        inner.reports = inner.reports.saturating_add(1);
        inner.dropped = inner.dropped.saturating_add(report.dropped);
        let node = inner.node(&report.node_id);
        inner.seen(&node, now);
        let mut out = Recorded::default();
        let over = report.tenants.len().saturating_sub(MAX_TENANTS_PER_REPORT);
        out.refused = out.refused.saturating_add(over as u64);
        for t in report.tenants.iter().take(MAX_TENANTS_PER_REPORT) {
            if !valid_name(&t.tenant) || t.tier.len() > MAX_NAME_LEN {
                out.refused = out.refused.saturating_add(1);
                continue;
            }
            if !inner.tenants.contains_key(&t.tenant) && inner.tenants.len() >= MAX_TENANTS {
                inner.evict_oldest();
            }
            inner.next_seq = inner.next_seq.saturating_add(1);
            let seq = inner.next_seq;
            let full = inner.limit_entries >= MAX_LIMIT_ENTRIES;
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
                    seq,
                });
            let old_seq = std::mem::replace(&mut entry.seq, seq);
            if entry.tier != t.tier {
                entry.tier = t.tier.clone();
            }
            entry.allowed = entry.allowed.saturating_add(t.allowed);
            entry.limited = entry.limited.saturating_add(t.limited);
            let mut added = false;
            let mut refused = false;
            match entry.limit_rps_by_envoy.get_mut(&node) {
                Some(v) => *v = limit(t.limit_rps),
                None if !full => {
                    entry
                        .limit_rps_by_envoy
                        .insert(Arc::clone(&node), limit(t.limit_rps));
                    added = true;
                }
                None => refused = true,
            }
            entry.fleet_limit_rps = entry.limit_rps_by_envoy.values().sum();
            entry.last_report = now;
            let name = entry.tenant.clone();
            inner.by_age.remove(&old_seq);
            inner.by_age.insert(seq, name);
            if added {
                inner.hold(&node);
            }
            if refused {
                out.refused = out.refused.saturating_add(1);
            } else {
                out.accepted = out.accepted.saturating_add(1);
            }
        }
        inner.refused = inner.refused.saturating_add(out.refused);
        out
    }

    /// How many distinct proxies reported at or after `since`: in a mesh,
    /// the sidecars enforcing tenant limits, among which a fleet-wide rate
    /// is shared (a proxy reports only when it saw traffic).
    pub fn reporters_since(&self, since: SystemTime) -> usize {
        self.lock()
            .last_seen
            .values()
            .filter(|t| **t >= since)
            .count()
    }

    /// The `n` tenants with the most requests (admitted and limited).
    pub fn top(&self, n: usize) -> Vec<TenantUsage> {
        let mut all: Vec<TenantUsage> = self.lock().tenants.values().cloned().collect();
        let total = |u: &TenantUsage| u.allowed.saturating_add(u.limited);
        all.sort_by(|a, b| total(b).cmp(&total(a)).then(a.tenant.cmp(&b.tenant)));
        all.truncate(n);
        all
    }

    /// (reports received, tenants dropped by full worker tables)
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.reports, inner.dropped)
    }

    /// Tenant entries refused by the book's caps, since start.
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Replicas: the shadow batches this replica received, encoded, waiting to
/// be shipped to the other replicas ([`crate::evidence::shared`]). Bounded
/// by bytes: when full, the oldest is dropped and counted.
#[derive(Debug, Default)]
pub struct ReportOutbox {
    queue: Mutex<OutboxQueue>,
}

#[derive(Debug, Default)]
struct OutboxQueue {
    /// (encoded `ReportBatch`, the sender's verified identity)
    items: std::collections::VecDeque<(Vec<u8>, Option<String>)>,
    bytes: usize,
    dropped: u64,
}

/// Bytes of batches an outbox holds (the database away for that long).
pub const MAX_REPORT_OUTBOX_BYTES: usize = 64 << 20;

impl OutboxQueue {
    fn make_room(&mut self, n: usize) {
        while self.bytes.saturating_add(n) > MAX_REPORT_OUTBOX_BYTES {
            let Some((old, _)) = self.items.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(old.len());
            self.dropped = self.dropped.saturating_add(1);
        }
    }
}

impl ReportOutbox {
    fn lock(&self) -> MutexGuard<'_, OutboxQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a batch as received from a sender of `identity` (`None`: unverified).
    pub fn push(&self, batch: &ReportBatch, identity: Option<String>) {
        let bytes = prost::Message::encode_to_vec(batch);
        let mut q = self.lock();
        q.make_room(bytes.len());
        q.bytes = q.bytes.saturating_add(bytes.len());
        q.items.push_back((bytes, identity));
    }

    /// Up to `max` batches, oldest first.
    pub fn take(&self, max: usize) -> Vec<(Vec<u8>, Option<String>)> {
        let mut q = self.lock();
        let n = q.items.len().min(max);
        let out: Vec<_> = q.items.drain(..n).collect();
        let taken: usize = out.iter().map(|(b, _)| b.len()).sum();
        q.bytes = q.bytes.saturating_sub(taken);
        out
    }

    /// Puts batches that could not be shipped back at the front, in order
    /// (dropping the oldest if they no longer fit).
    pub fn put_back(&self, batch: Vec<(Vec<u8>, Option<String>)>) {
        let mut q = self.lock();
        for item in batch.into_iter().rev() {
            if q.bytes.saturating_add(item.0.len()) > MAX_REPORT_OUTBOX_BYTES {
                q.dropped = q.dropped.saturating_add(1);
                continue;
            }
            q.bytes = q.bytes.saturating_add(item.0.len());
            q.items.push_front(item);
        }
    }

    /// Batches dropped since start because the outbox was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

/// The gRPC service the filters report to.
#[derive(Clone)]
pub struct Reports {
    book: Arc<UsageBook>,
    shadow: Arc<ShadowBook>,
    /// Replicas: every accepted shadow batch is also queued here.
    outbox: Option<Arc<ReportOutbox>>,
}

impl Reports {
    pub fn new(book: Arc<UsageBook>, shadow: Arc<ShadowBook>) -> Self {
        Self {
            book,
            shadow,
            outbox: None,
        }
    }

    /// Replicas: shadow batches are ingested here and queued in `outbox`
    /// for the other replicas.
    pub fn sharing(mut self, outbox: Arc<ReportOutbox>) -> Self {
        self.outbox = Some(outbox);
        self
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
        // `peer.verified()` is the certificate's node id: the origin of this
        // batch. Only records from a verified Envoy may ever be replayed.
        let peer = crate::tls::peer(request.extensions())?;
        let batch = request.into_inner();
        crate::tls::authorize(&peer, &batch.node_id, "shadow report")?;
        let node = batch.node_id.clone();
        let identity = peer.verified().map(str::to_owned);
        let origin = match &identity {
            Some(id) => crate::evidence::shadow::Origin::Verified {
                identity: id.clone(),
            },
            None => crate::evidence::shadow::Origin::Unverified,
        };
        if let Some(outbox) = &self.outbox {
            outbox.push(&batch, identity);
        }
        let got = self.shadow.ingest_from(batch, origin, SystemTime::now());
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
    use std::time::Duration;
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
    fn reporters_are_counted_by_recency_and_bounded() {
        let book = UsageBook::default();
        let t0 = SystemTime::UNIX_EPOCH;
        let at = |s: u64| t0 + Duration::from_secs(s);
        book.record(&report("e1", &[("a", 1, 0, 1.0)]), at(0));
        book.record(&report("e2", &[("a", 1, 0, 1.0)]), at(10));
        book.record(&report("e1", &[("a", 1, 0, 1.0)]), at(20));
        assert_eq!(book.reporters_since(at(0)), 2);
        assert_eq!(book.reporters_since(at(15)), 1, "only e1 spoke since");
        assert_eq!(book.reporters_since(at(21)), 0);
        // A refused node id is not a reporter.
        book.record(&report("", &[("a", 1, 0, 1.0)]), at(30));
        assert_eq!(book.reporters_since(at(0)), 2);
        // Many node ids: the table stays bounded, the newest kept.
        for i in 0..(MAX_REPORTERS + 5) {
            book.record(&report(&format!("n{i}"), &[]), at(100 + i as u64));
        }
        assert_eq!(book.reporters_since(at(0)), MAX_REPORTERS);
        assert_eq!(
            book.reporters_since(at(100 + MAX_REPORTERS as u64)),
            5,
            "the newest are all there"
        );
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

    #[test]
    fn peer_numbers_saturate_and_bad_names_are_refused() {
        let book = UsageBook::default();
        let t0 = SystemTime::UNIX_EPOCH;
        book.record(&report("e1", &[("a", u64::MAX, u64::MAX, f64::NAN)]), t0);
        book.record(&report("e1", &[("a", u64::MAX, 1, f64::INFINITY)]), t0);
        let top = book.top(10);
        assert_eq!((top[0].allowed, top[0].limited), (u64::MAX, u64::MAX));
        assert_eq!(top[0].fleet_limit_rps, 0.0);
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let got = book.record(&report(&long, &[("b", 1, 0, 1.0)]), t0);
        assert_eq!(
            got,
            Recorded {
                accepted: 0,
                refused: 1
            }
        );
        let got = book.record(&report("e1", &[(&long, 1, 0, 1.0), ("", 1, 0, 1.0)]), t0);
        assert_eq!(got.refused, 2);
        assert_eq!(book.top(10).len(), 1);
        assert_eq!(book.refused(), 3);
    }

    #[test]
    fn the_least_recently_reported_tenant_goes_first_and_node_ids_are_shared() {
        let book = UsageBook::default();
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        for i in 0..MAX_TENANTS {
            book.record(&report("e1", &[(&format!("t{i}"), 1, 0, 1.0)]), t(1));
        }
        // t0 reports again: t1 is now the least recent.
        book.record(&report("e1", &[("t0", 1, 0, 1.0)]), t(2));
        book.record(&report("e1", &[("new", 1, 0, 1.0)]), t(3));
        let names: Vec<String> = book
            .top(MAX_TENANTS + 1)
            .into_iter()
            .map(|u| u.tenant)
            .collect();
        assert_eq!(names.len(), MAX_TENANTS);
        assert!(names.contains(&"t0".to_owned()) && names.contains(&"new".to_owned()));
        assert!(!names.contains(&"t1".to_owned()));
        let inner = book.lock();
        assert_eq!(inner.nodes.len(), 1, "one copy of the node id");
        assert_eq!(inner.limit_entries, MAX_TENANTS);
        assert_eq!(inner.by_age.len(), MAX_TENANTS);
    }
}
