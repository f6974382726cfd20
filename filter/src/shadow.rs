//! Shadow glue: feeds stream events into [`understudy_core::shadow`]'s pair
//! table and carries out what it decides: copies go out from the root
//! context's `on_tick` (a call made from a stream's context would be
//! cancelled when the stream ends, and the shadow is often slower than the
//! primary), comparisons run on the tick after both sides are complete, and
//! results become stats plus batches for the control plane
//! (`understudy.v1.ReportService/Push`).
//!
//! Nothing here ever holds or changes the client's response: response
//! callbacks only copy bytes, within the route's budget.

use std::rc::Rc;
use std::time::Duration;

use prost::Message;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

use understudy_core::report::{Answered, Batch, Outbox, RecordQueue, Schedule};
use understudy_core::segment::SegmentTally;
use understudy_core::shadow::{
    MAX_REPORT_BATCH_BYTES, Mismatch, PROBE_HEADER, RECORD_FRAMING_BYTES, Report, ShadowConfig,
    ShadowReport, ShadowTable, Skip, Verdict, split_batches,
};
use understudy_core::{FilterConfig, stats};
use understudy_proto::v1::{
    self as wire, MismatchRecord, RecordedRequest, RecordedResponse, ReportBatch, RouteCounts,
    SegmentCounts, difference,
};

use crate::host::{Host, RequestHeaders};

struct Metrics {
    sent: u32,
    compared: u32,
    matched: u32,
    serious: u32,
    noise: u32,
    unexpected: u32,
    gap_ms: u32,
    skipped: Vec<(Skip, u32)>,
}

struct RouteShadow {
    name: String,
    cfg: ShadowConfig,
    metrics: Metrics,
    /// Deltas since the last batch.
    counts: RouteCounts,
    /// The compared pairs of `counts` per traffic segment (capped), sent
    /// as `counts.segments` with the batch.
    segments: SegmentTally<SegmentCounts>,
}

/// One worker's shadowing state.
pub struct Shadowing {
    host: Rc<dyn Host>,
    routes: Vec<Option<RouteShadow>>,
    table: ShadowTable,
    report: Option<ShadowReport>,
    /// Mismatch records waiting for a batch (bounded by `max_records`).
    queue: RecordQueue<Mismatch>,
    schedule: Schedule,
    draws: u64,
    pending: u32,
    records_dropped: u32,
    reports_sent: u32,
    reports_failed: u32,
    /// Batches in flight and batches to send again.
    outbox: Outbox,
    /// Records too large for one batch even without their bodies.
    records_oversized: u32,
}

impl Shadowing {
    /// `None` when no route shadows.
    pub fn new(host: &Rc<dyn Host>, config: &FilterConfig) -> Result<Option<Self>, String> {
        if config.routes().iter().all(|r| r.shadow.is_none()) {
            return Ok(None);
        }
        let mut routes = Vec::with_capacity(config.routes().len());
        for r in config.routes() {
            let Some(cfg) = r.shadow.clone() else {
                routes.push(None);
                continue;
            };
            let name = |what: &str| stats::shadow(config, &r.name, what);
            let counter = |what: &str| host.define(MetricType::Counter, &name(what));
            let metrics = Metrics {
                sent: counter("sent")?,
                compared: counter("compared")?,
                matched: counter("matched")?,
                serious: counter("mismatched.serious")?,
                noise: counter("mismatched.noise")?,
                unexpected: counter("unexpected")?,
                gap_ms: host.define(MetricType::Histogram, &name("latency_gap_ms"))?,
                skipped: Skip::ALL
                    .iter()
                    .map(|s| Ok((*s, counter(s.as_str())?)))
                    .collect::<Result<_, String>>()?,
            };
            routes.push(Some(RouteShadow {
                name: r.name.clone(),
                counts: RouteCounts {
                    route: r.name.clone(),
                    calibration: cfg.calibration,
                    ..Default::default()
                },
                cfg,
                metrics,
                segments: SegmentTally::default(),
            }));
        }
        let all = |what: &str| stats::shadow_all(config, what);
        let report = config.shadow_report().cloned();
        Ok(Some(Self {
            host: Rc::clone(host),
            routes,
            table: ShadowTable::default(),
            queue: RecordQueue::new(report.as_ref().map_or(0, |r| r.max_records)),
            report,
            schedule: Schedule::default(),
            draws: 0,
            pending: host.define(MetricType::Gauge, &all("pending"))?,
            records_dropped: host.define(MetricType::Counter, &all("records_dropped"))?,
            reports_sent: host.define(MetricType::Counter, &all("reports_sent"))?,
            reports_failed: host.define(MetricType::Counter, &all("reports_failed"))?,
            outbox: Outbox::default(),
            records_oversized: host.define(MetricType::Counter, &all("records_oversized"))?,
        }))
    }

    /// Copies go out on the tick: it must be short for the copy to follow
    /// its primary closely.
    pub fn tick_period(&self) -> Duration {
        Duration::from_millis(5)
    }

    fn route(&self, route: usize) -> Option<&RouteShadow> {
        self.routes.get(route).and_then(Option::as_ref)
    }

    /// Request headers of a stream on `route`. Returns whether it is paired.
    pub fn on_request_headers(
        &mut self,
        stream: u32,
        route: usize,
        headers: &RequestHeaders,
        end_of_stream: bool,
        now_us: u64,
    ) -> bool {
        self.draws += 1;
        let Some(r) = self.route(route) else {
            return false;
        };
        let method = headers.text(":method").unwrap_or_default();
        let key = r.cfg.sample_key.as_deref().and_then(|k| headers.text(k));
        let decision = if headers.bytes(PROBE_HEADER).is_some() {
            Err(Skip::NotSampled)
        } else {
            r.cfg
                .decide(&method, key.as_deref(), self.host.random_u64(self.draws))
        };
        if let Err(reason) = decision {
            self.apply(Report::Skipped { route, reason });
            return false;
        }
        // The label is made from the bytes as received (never text).
        let segment = r.cfg.segment_by.as_ref().map(|by| {
            let value = by.header.as_deref().and_then(|h| headers.bytes(h));
            by.label(headers.bytes(":method"), value)
        });
        let headers = r.cfg.shadow_headers(&headers.all_text());
        match self
            .table
            .start_in(stream, route, segment, headers, end_of_stream, now_us)
        {
            Ok(()) => {
                self.host.increment(self.pending, 1);
                true
            }
            Err(report) => {
                self.apply(report);
                false
            }
        }
    }

    pub fn on_request_body(&mut self, stream: u32, chunk: &[u8], end_of_stream: bool) {
        let Some(max) = self.budget_of(stream) else {
            return;
        };
        if let Some(report) = self.table.request_body(stream, chunk, end_of_stream, max) {
            self.apply(report);
        }
    }

    fn budget_of(&self, stream: u32) -> Option<usize> {
        let route = self.table.route_of(stream)?;
        Some(self.route(route)?.cfg.max_body_bytes)
    }

    pub fn on_response_headers(&mut self, stream: u32, end_of_stream: bool, now_us: u64) {
        let Some(max) = self.budget_of(stream) else {
            return;
        };
        let headers = self.host.headers(MapType::HttpResponseHeaders);
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        if let Some(report) =
            self.table
                .primary_headers(stream, status, headers, end_of_stream, max, now_us)
        {
            self.apply(report);
        }
    }

    /// A response body chunk as it passes: copied, never held.
    pub fn on_response_body(
        &mut self,
        stream: u32,
        body_size: usize,
        end_of_stream: bool,
        now_us: u64,
    ) {
        let Some(max) = self.budget_of(stream) else {
            return;
        };
        let chunk = if body_size == 0 {
            Vec::new()
        } else {
            self.host.buffer(BufferType::HttpResponseBody, body_size)
        };
        if let Some(report) = self
            .table
            .primary_body(stream, &chunk, end_of_stream, max, now_us)
        {
            self.apply(report);
        }
    }

    pub fn on_end(&mut self, stream: u32) {
        if let Some(report) = self.table.stream_end(stream) {
            self.apply(report);
        }
    }

    /// Whether call `token` is a shadow copy (its answer belongs here).
    pub fn owns_call(&self, token: u32) -> bool {
        self.table.has_call(token)
    }

    /// A shadow copy answered (or failed: zero headers).
    pub fn on_call_response(&mut self, token: u32, body_size: usize, now_us: u64) {
        let headers = self.host.headers(MapType::HttpCallResponseHeaders);
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse().ok());
        let body = if body_size == 0 {
            Vec::new()
        } else {
            self.host
                .buffer(BufferType::HttpCallResponseBody, body_size)
        };
        let routes = &self.routes;
        let report = self.table.shadow_response(
            token,
            status,
            headers,
            body,
            |route| {
                let r = routes.get(route)?.as_ref()?;
                Some((r.cfg.timeout_ms, r.cfg.max_body_bytes))
            },
            now_us,
        );
        if let Some(report) = report {
            self.apply(report);
        }
    }

    /// Sends due copies, compares complete pairs, expires lost calls, and
    /// sends a report batch when one is due.
    pub fn on_tick(&mut self, now_us: u64) {
        if !self.table.is_empty() {
            for out in self.table.to_send() {
                let Some(r) = self.route(out.route) else {
                    continue;
                };
                let body = (!out.body.is_empty()).then_some(out.body.as_slice());
                let sent = self.host.http_call(
                    &r.cfg.cluster,
                    &out.headers,
                    body,
                    Duration::from_millis(r.cfg.timeout_ms),
                );
                match sent {
                    Ok(token) => {
                        self.host.increment(r.metrics.sent, 1);
                        self.table.sent(out.stream, token, now_us);
                    }
                    Err(status) => {
                        self.host.log(
                            LogLevel::Warn,
                            &format!(
                                "understudy: shadow to cluster {:?} failed to start: {status:?}",
                                r.cfg.cluster
                            ),
                        );
                        if let Some(report) = self.table.send_failed(out.stream) {
                            self.apply(report);
                        }
                    }
                }
            }
            let routes = &self.routes;
            let mut reports = self.table.expire(now_us, |route| {
                routes
                    .get(route)
                    .and_then(Option::as_ref)
                    .map_or(0, |r| r.cfg.timeout_ms)
            });
            reports.extend(self.table.finish(
                |route| routes.get(route).and_then(Option::as_ref).map(|r| &r.cfg),
                now_us,
            ));
            for report in reports {
                self.apply(report);
            }
        }
        self.report_if_due(now_us);
    }

    /// Counts a result in the stats and the next batch; queues its record.
    fn apply(&mut self, report: Report) {
        match report {
            Report::Skipped { route, reason } => {
                // Every reason goes to the stats and to the next batch, so the
                // API shows what Envoy counts (`not_sampled` included).
                let Some(Some(r)) = self.routes.get_mut(route) else {
                    return;
                };
                if let Some((_, id)) = r.metrics.skipped.iter().find(|(s, _)| *s == reason) {
                    self.host.increment(*id, 1);
                }
                let n = r
                    .counts
                    .skipped
                    .entry(reason.as_str().to_owned())
                    .or_default();
                *n = n.saturating_add(1);
                // Those three never held a table entry (no pending pair).
                if !matches!(reason, Skip::NotSampled | Skip::Method | Skip::Capacity) {
                    self.host.increment(self.pending, -1);
                }
            }
            Report::Compared {
                route,
                verdict,
                unexpected,
                latency_gap_us,
                traffic_segment,
                mismatch,
            } => {
                self.host.increment(self.pending, -1);
                let Some(Some(r)) = self.routes.get_mut(route) else {
                    return;
                };
                let m = &r.metrics;
                self.host.increment(m.compared, 1);
                r.counts.compared += 1;
                match verdict {
                    Verdict::Matched => {
                        self.host.increment(m.matched, 1);
                        r.counts.matched += 1;
                    }
                    Verdict::Noise => {
                        self.host.increment(m.noise, 1);
                        r.counts.mismatched_noise += 1;
                    }
                    Verdict::Serious => {
                        self.host.increment(m.serious, 1);
                        r.counts.mismatched_serious += 1;
                    }
                }
                if unexpected {
                    self.host.increment(m.unexpected, 1);
                    r.counts.unexpected += 1;
                }
                if let Some(label) = traffic_segment {
                    let c = r.segments.entry(&label);
                    c.compared += 1;
                    match verdict {
                        Verdict::Matched => c.matched += 1,
                        Verdict::Noise => c.mismatched_noise += 1,
                        Verdict::Serious => c.mismatched_serious += 1,
                    }
                    if unexpected {
                        c.unexpected += 1;
                    }
                }
                self.host
                    .record(m.gap_ms, u64::try_from(latency_gap_us / 1000).unwrap_or(0));
                r.counts.latency_gap_us_sum += latency_gap_us;
                if let Some(mismatch) = mismatch {
                    self.enqueue(*mismatch);
                }
            }
        }
    }

    fn enqueue(&mut self, mismatch: Mismatch) {
        if self.report.is_some() && !self.queue.push(mismatch) {
            self.host.increment(self.records_dropped, 1);
        }
    }

    fn report_if_due(&mut self, now_us: u64) {
        let Some(report) = self.report.clone() else {
            return;
        };
        if !self.schedule.due(now_us, report.interval_ms) {
            return;
        }
        self.resend(&report.cluster);
        let counts: Vec<RouteCounts> = self
            .routes
            .iter_mut()
            .flatten()
            .filter(|r| r.counts.compared > 0 || !r.counts.skipped.is_empty())
            .map(|r| {
                let fresh = RouteCounts {
                    route: r.counts.route.clone(),
                    calibration: r.counts.calibration,
                    ..Default::default()
                };
                let mut counts = std::mem::replace(&mut r.counts, fresh);
                counts.segments = r
                    .segments
                    .drain()
                    .into_iter()
                    .filter(|(_, c)| c.compared > 0)
                    .map(|(segment, c)| SegmentCounts { segment, ..c })
                    .collect();
                counts
            })
            .collect();
        if counts.is_empty() && self.queue.is_idle() {
            return;
        }
        let drained = self.queue.take_batch();
        let mut mismatches: Vec<MismatchRecord> = Vec::with_capacity(drained.len());
        for m in drained {
            let mut record = self.record(m);
            if record.encoded_len() + RECORD_FRAMING_BYTES > MAX_REPORT_BATCH_BYTES {
                shrink(&mut record);
            }
            if record.encoded_len() + RECORD_FRAMING_BYTES > MAX_REPORT_BATCH_BYTES {
                self.host.increment(self.records_oversized, 1);
                self.host.increment(self.records_dropped, 1);
                self.queue.count_dropped(1);
                continue;
            }
            mismatches.push(record);
        }
        let mut head = ReportBatch {
            node_id: self.host.node_id(),
            mismatches: Vec::new(),
            dropped: self.queue.take_dropped(),
            routes: counts,
        };
        // Every part carries the node id: the control plane checks it against
        // the client certificate (`head` is emptied when the first part goes).
        let node_id = head.node_id.clone();
        let sizes: Vec<usize> = mismatches.iter().map(Message::encoded_len).collect();
        let ranges = split_batches(&sizes, head.encoded_len(), MAX_REPORT_BATCH_BYTES);
        let mut records = mismatches.into_iter();
        for (n, range) in ranges.into_iter().enumerate() {
            let part: Vec<MismatchRecord> = records.by_ref().take(range.len()).collect();
            let batch = if n == 0 {
                head.mismatches = part;
                std::mem::take(&mut head)
            } else {
                ReportBatch {
                    node_id: node_id.clone(),
                    mismatches: part,
                    dropped: 0,
                    routes: Vec::new(),
                }
            };
            let records = batch.mismatches.len() as u64;
            self.send(
                &report.cluster,
                Batch {
                    bytes: batch.encode_to_vec(),
                    records,
                },
            );
        }
    }

    /// Sends the batches that failed before (oldest first) while there is
    /// room in flight. Called before new batches go out; a batch that fails
    /// again waits for the next report.
    fn resend(&mut self, cluster: &str) {
        for batch in self.outbox.retries() {
            self.send(cluster, batch);
        }
    }

    fn send(&mut self, cluster: &str, batch: Batch) {
        if !self.outbox.has_room() {
            self.keep_for_retry(batch);
            return;
        }
        match self.host.grpc_call(
            cluster,
            "understudy.v1.ReportService",
            "Push",
            &batch.bytes,
            Duration::from_secs(5),
        ) {
            Ok(token) => self.outbox.sent(token, batch),
            Err(status) => {
                self.host.increment(self.reports_failed, 1);
                self.host.log(
                    LogLevel::Debug,
                    &format!("understudy: shadow report not sent: {status:?}"),
                );
                self.keep_for_retry(batch);
            }
        }
    }

    /// Keeps a failed batch to send again; records that give way for it are
    /// counted as dropped (and reported in the next batch).
    fn keep_for_retry(&mut self, batch: Batch) {
        let dropped = self.outbox.keep(batch);
        self.count_dropped(dropped);
    }

    fn count_dropped(&mut self, records: u64) {
        if records > 0 {
            self.queue.count_dropped(records);
            self.host.increment(
                self.records_dropped,
                i64::try_from(records).unwrap_or(i64::MAX),
            );
        }
    }

    /// Whether `token` is one of this worker's report calls.
    pub fn owns_report(&self, token: u32) -> bool {
        self.outbox.owns(token)
    }

    /// The control plane answered a report call (`status` is the gRPC
    /// status: 0 is OK). A refused or failed batch is counted and queued to
    /// be sent again.
    pub fn on_report_response(&mut self, token: u32, status: u32) {
        match self.outbox.answered(token, status) {
            None => {}
            Some(Answered::Delivered) => self.host.increment(self.reports_sent, 1),
            Some(Answered::Refused { dropped }) => {
                self.host.increment(self.reports_failed, 1);
                self.host.log(
                    LogLevel::Debug,
                    &format!("understudy: shadow report refused (gRPC status {status})"),
                );
                self.count_dropped(dropped);
            }
        }
    }

    fn record(&self, m: Mismatch) -> MismatchRecord {
        let r = self.route(m.route);
        let headers = |h: Vec<(String, String)>| {
            h.into_iter()
                .map(|(name, value)| wire::Header { name, value })
                .collect()
        };
        MismatchRecord {
            route: r.map(|r| r.name.clone()).unwrap_or_default(),
            request_id: m.request_id,
            differences: m
                .comparison
                .differences
                .into_iter()
                .map(|d| wire::Difference {
                    path: d.path,
                    kind: difference::Kind::from(d.kind) as i32,
                    bucket: difference::Bucket::from(d.bucket) as i32,
                    primary: d.primary.unwrap_or_default(),
                    shadow: d.shadow.unwrap_or_default(),
                    unexpected: d.unexpected,
                })
                .collect(),
            latency_gap_us: m.latency_gap_us,
            calibration: r.is_some_and(|r| r.cfg.calibration),
            time_unix_ms: m.time_us / 1000,
            serious: m.comparison.serious > 0,
            unexpected: m.comparison.unexpected > 0,
            omitted: u32::try_from(m.comparison.omitted).unwrap_or(u32::MAX),
            truncated: m.comparison.truncated.unwrap_or_default(),
            segment: m.segment.unwrap_or_default(),
            traffic_segment: m.traffic_segment.unwrap_or_default(),
            request: Some(RecordedRequest {
                method: m.method,
                path: m.path,
                authority: m.authority,
                headers: headers(m.request.headers),
                body: m.request.body,
                body_truncated: m.request_body_truncated,
            }),
            primary: Some(RecordedResponse {
                status: u32::from(m.primary.status),
                headers: headers(m.primary.headers),
                body: m.primary.body,
                body_truncated: m.primary_body_truncated,
            }),
            shadow: Some(RecordedResponse {
                status: u32::from(m.shadow.status),
                headers: headers(m.shadow.headers),
                body: m.shadow.body,
                body_truncated: m.shadow_body_truncated,
            }),
            shadow_cluster: r.map(|r| r.cfg.cluster.clone()).unwrap_or_default(),
        }
    }
}

/// Makes a record that would not fit in a batch smaller: the bodies go (the
/// differences stay), marked as truncated.
fn shrink(record: &mut MismatchRecord) {
    if let Some(r) = record.request.as_mut() {
        r.body.clear();
        r.body_truncated = true;
    }
    for r in [record.primary.as_mut(), record.shadow.as_mut()]
        .into_iter()
        .flatten()
    {
        r.body.clear();
        r.body_truncated = true;
    }
    for d in &mut record.differences {
        truncate_chars(&mut d.primary, 1024);
        truncate_chars(&mut d.shadow, 1024);
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate_chars(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
    }
}
