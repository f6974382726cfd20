//! Envoy's own statistics, streamed to the control plane: what each upstream
//! cluster answered and how fast, per Envoy and per flush, kept as a short
//! time series the rollout engine sums over a step's window.
//!
//! Envoy pushes its stats through the `envoy.stat_sinks.metrics_service` sink
//! (`envoy.service.metrics.v3.MetricsService/StreamMetrics`, served on the xDS
//! port, see `envoy/bootstrap.yaml`): one client stream per Envoy, the node in
//! the first message only, then one message per flush (`stats_flush_interval`)
//! of Prometheus `MetricFamily`s. No Prometheus server sits in between.
//!
//! # What Envoy 1.40 sends (observed, not assumed)
//!
//! With `emit_tags_as_labels: true` and `report_counters_as_deltas: true`, a
//! flush carries, per cluster that has ever been used:
//!
//! - `cluster.upstream_rq_completed` (counter), label `envoy.cluster_name`;
//! - `cluster.upstream_rq_xx` (counter), labels `envoy.response_code_class`
//!   (`"2"`, `"5"`, ...) and `envoy.cluster_name`;
//! - `cluster.upstream_rq` (counter), labels `envoy.response_code` (`"503"`)
//!   and `envoy.cluster_name`;
//! - `cluster.upstream_rq_time` (histogram, ms), label `envoy.cluster_name`.
//!
//! Counters are the change since the previous flush. Histograms are **also
//! per flush**: Envoy's metrics service sink reports each histogram's
//! *interval* statistics (a flush with no requests carries `sample_count: 0`),
//! with Prometheus-style buckets that are cumulative across bounds *within*
//! the flush and no `+Inf` bucket. So nothing is differenced between
//! snapshots: every message is already a delta, which also makes an Envoy
//! restart, a reconnect, or two Envoys sharing a node id harmless (each
//! message simply adds). The same families also come as
//! `cluster.external.*` / `cluster.internal.*` (by request origin); only the
//! unprefixed ones are read, or every request would count twice.
//!
//! Label names are also accepted in their Prometheus-sanitised spelling
//! (`envoy_cluster_name`) and classes as `"5xx"`.
//!
//! # What an Istio sidecar sends
//!
//! Istio's `envoyMetricsService` sink sets neither option (its bootstrap
//! template writes only `transport_api_version` and `grpc_service`), so
//! Envoy's defaults apply: **counters are running totals** and **tags stay
//! inside the names**: `cluster.outbound|9080|canary|reviews.default.svc.cluster.local.upstream_rq_5xx`,
//! with dots inside the cluster name. Histograms are still per flush: the
//! sink always sends a histogram's interval statistics, in either mode.
//!
//! Nothing in a message says whether its counters are deltas or totals (same
//! metric types, `timestamp_ms` set either way), so the rule is by format:
//! **a tagged metric (cluster in a label) is a delta, an untagged one
//! (cluster in the name) a running total**. Envoy defaults both options to
//! false, Istio leaves them so, and our bootstrap sets both; an Envoy that
//! sets only one of them is misread (document, don't mix).
//!
//! An untagged name is read as `cluster.<cluster>.<stat>`: the stat is what
//! follows the last dot (stat names have none) and must be one we read;
//! `<c>.external`, `<c>.internal`, `<c>.canary` and `<c>.zone.<a>.<b>` are
//! sub-scope copies, skipped when the message also carries `cluster.<c>.<stat>`
//! (a cluster really named `api.internal` has no such twin).
//!
//! # Cumulative counters
//!
//! Per stream (not per node: two Envoys claiming one node id never mix) and
//! per (cluster, stat), the last total is kept and the difference counted:
//!
//! - on a stream with no state yet (its first message, or state forgotten),
//!   every total is a **baseline**: it says what happened before the stream,
//!   not in this flush, so it counts nothing;
//! - afterwards a counter seen for the first time counts whole: Envoy sends
//!   every counter it ever used in every flush, so it was 0 one flush ago;
//! - a total lower than the last one is a reset (Envoy restarted, or a
//!   counter was cleared): the new total is what happened since;
//! - a reconnect is a new stream, so its first flush is a baseline again: the
//!   requests of one flush interval are lost, never counted twice.
//!
//! The state is bounded ([`MAX_COUNTERS_PER_STREAM`], [`MAX_COUNTER_ENTRIES`],
//! [`MAX_COUNTER_STREAMS`]); a counter that does not fit is untracked and
//! counts nothing (counted as ignored), since counting its total every flush
//! would count the past again and again. A closed stream's state is dropped.
//!
//! # What is kept
//!
//! Per cluster, a series of [`Sample`]s: (receive time, node, requests, 5xx,
//! latency buckets). The time is the control plane's clock when the message
//! arrived, not Envoy's `timestamp_ms`, so windows never depend on the skew
//! between hosts. A flush in which a cluster did nothing is not stored, but
//! it still refreshes the cluster's `last_update_ms`: a fresh time with zero
//! requests means "no traffic", a stale one means "no data". A silent stream
//! is never "healthy"; [`StreamStatus`] tells which Envoy went quiet.
//!
//! Everything is bounded: samples older than [`RETENTION_MS`] are dropped, at
//! most [`MAX_SAMPLES_PER_CLUSTER`] per cluster and [`MAX_SAMPLES`] in all
//! (the oldest anywhere goes first), [`MAX_CLUSTERS`] clusters (the least
//! recently updated is forgotten), [`MAX_STREAMS`] nodes (a disconnected one,
//! then the quietest, is forgotten), [`MAX_BUCKETS`] buckets per histogram.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use envoy_types::pb::envoy::service::metrics::v3::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use envoy_types::pb::envoy::service::metrics::v3::{StreamMetricsMessage, StreamMetricsResponse};
use envoy_types::pb::io::prometheus::client::{Histogram, Metric, MetricFamily};
use serde::Serialize;
use tonic::{Request, Response, Status, Streaming};

use crate::evidence::Evidence;

/// How long samples are kept: longer than any rollout step's window needs.
pub const RETENTION_MS: u64 = 15 * 60 * 1000;
/// Samples kept per cluster: 15 minutes of 1 s flushes from 9 Envoys. With
/// more Envoys a cluster's history gets shorter, not larger.
pub const MAX_SAMPLES_PER_CLUSTER: usize = 8192;
/// Samples kept in all; when full, the oldest sample of any cluster goes
/// first. A sample is about 100 bytes plus 16 per non-empty latency bucket,
/// so this is some tens of MB at most.
pub const MAX_SAMPLES: usize = 262_144;
/// Clusters the book remembers; the least recently updated is forgotten.
pub const MAX_CLUSTERS: usize = 1024;
/// Envoys (node ids) whose stream status is kept.
pub const MAX_STREAMS: usize = 1024;
/// Longest node id or cluster name accepted, in bytes. Envoy's own names are
/// far shorter; the cap keeps a broken peer from filling memory with keys.
pub const MAX_NAME_LEN: usize = 256;
/// Latency buckets kept per histogram; Envoy's default has 19 bounds. Counts
/// above the last kept bound are folded into the `+Inf` bucket.
pub const MAX_BUCKETS: usize = 64;
/// Largest count one flush may report for one counter; larger values are
/// clamped to it. One Envoy cannot complete 10^12 requests in a flush, and
/// the cap keeps every sum over a window (at most [`MAX_SAMPLES`] samples)
/// far below `u64::MAX`, so no peer number can overflow a sum.
pub const MAX_COUNT_PER_FLUSH: u64 = 1_000_000_000_000;
/// Clusters read from one message; metrics naming further clusters are
/// counted as ignored. The book keeps [`MAX_CLUSTERS`] in all anyway.
pub const MAX_CLUSTERS_PER_MESSAGE: usize = MAX_CLUSTERS;
/// Running-total counters read per cluster from one message; Envoy has a
/// handful (`upstream_rq_completed`, one per class, one per code seen).
pub const MAX_STATS_PER_CLUSTER: usize = 64;
/// Cumulative counters whose last value is kept per stream: more than
/// [`MAX_CLUSTERS`] clusters' worth of the few stats read.
pub const MAX_COUNTERS_PER_STREAM: usize = 8 * MAX_CLUSTERS;
/// Cumulative counter values kept across all streams (a few MB at most).
pub const MAX_COUNTER_ENTRIES: usize = 262_144;
/// Streams whose cumulative counter values are kept; when full, the stream
/// quiet the longest forgets them and baselines again (counting nothing for
/// one flush rather than counting the past twice).
pub const MAX_COUNTER_STREAMS: usize = MAX_STREAMS;

/// What is wrong with a metrics stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// The first message carried no `identifier.node.id`: the samples could
    /// not be told apart by Envoy, and a silent Envoy could not be named.
    #[error("the first StreamMetricsMessage must carry identifier.node.id")]
    MissingNode,
    /// The node id is longer than [`MAX_NAME_LEN`] bytes.
    #[error("node id is {len} bytes long, more than the {MAX_NAME_LEN} allowed")]
    NodeTooLong { len: usize },
}

/// An Envoy's node id: non-empty and at most [`MAX_NAME_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// The node named in a stream's first message.
    pub fn from_message(msg: &StreamMetricsMessage) -> Result<Self, MetricsError> {
        let id = msg
            .identifier
            .as_ref()
            .and_then(|i| i.node.as_ref())
            .map(|n| n.id.as_str())
            .unwrap_or_default();
        Self::try_from(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for NodeId {
    type Error = MetricsError;

    fn try_from(id: &str) -> Result<Self, MetricsError> {
        if id.is_empty() {
            Err(MetricsError::MissingNode)
        } else if id.len() > MAX_NAME_LEN {
            Err(MetricsError::NodeTooLong { len: id.len() })
        } else {
            Ok(Self(Arc::from(id)))
        }
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What one Envoy reported for one cluster in one flush.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Unix ms when the control plane received it.
    pub at_ms: u64,
    pub node: NodeId,
    /// Requests completed (any status).
    pub requests: u64,
    pub errors_5xx: u64,
    /// `(upper bound in ms, count)`, not cumulative, bounds ascending; a
    /// bucket's lower bound is the previous entry's bound (0 for the first),
    /// so a run of empty buckets before a non-empty one is kept as one empty
    /// entry (see [`compact`]); the last bound may be `f64::INFINITY`.
    pub latency_ms: Vec<(f64, u64)>,
}

impl Sample {
    fn is_empty(&self) -> bool {
        self.requests == 0 && self.errors_5xx == 0 && self.latency_ms.is_empty()
    }
}

/// One Envoy's metrics stream, for the API and for telling a quiet Envoy
/// from an idle cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStatus {
    pub node: String,
    /// Whether the stream is open now.
    pub connected: bool,
    /// Unix ms when the current (or last) stream opened.
    pub connected_since_ms: u64,
    /// Unix ms of the newest message.
    pub last_message_ms: u64,
    /// Messages received on the current (or last) stream.
    pub messages: u64,
}

impl StreamStatus {
    /// No message for more than `quiet_ms`, or the stream is closed: this
    /// Envoy's numbers are missing from every window since, so they are "no
    /// data", never "healthy".
    pub fn is_silent(&self, now_ms: u64, quiet_ms: u64) -> bool {
        !self.connected || now_ms.saturating_sub(self.last_message_ms) > quiet_ms
    }
}

/// What one [`MetricsBook::ingest`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Clusters the message reported on (with traffic or not).
    pub clusters: usize,
    /// Samples stored (clusters with traffic in this flush).
    pub samples: usize,
    /// Metrics of the families read that named no usable cluster.
    pub ignored: usize,
}

/// Identifies one stream of a node, so an old stream ending after its
/// replacement opened does not mark the node disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(u64);

/// The per-cluster time series of what Envoys reported; shared (`Arc`)
/// between the gRPC [`MetricsSink`] and the rollout engine.
#[derive(Default)]
pub struct MetricsBook {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    clusters: HashMap<String, Series>,
    /// Samples across all series, kept equal to the sum of their lengths.
    samples: usize,
    streams: BTreeMap<NodeId, Stream>,
    next_stream: u64,
    /// The last cumulative value of each counter, per stream (see
    /// "Cumulative counters" in the module doc).
    counters: HashMap<StreamId, CounterState>,
    /// Entries across all of `counters`, kept equal to the sum of their sizes.
    counter_entries: usize,
    /// Replicas: what this book recorded, waiting to be shipped to the
    /// database ([`MetricsBook::tapped`]); `None` when not tapped.
    outbox: Option<VecDeque<(String, Sample)>>,
    /// Samples dropped because the outbox was full (the database was away
    /// for longer than [`MAX_OUTBOX`] samples take to arrive).
    outbox_dropped: u64,
}

/// Samples an outbox holds before the oldest is dropped (and counted).
pub const MAX_OUTBOX: usize = 65_536;

/// One stream's last cumulative counter values.
struct CounterState {
    last: HashMap<(String, Stat), u64>,
    /// Unix ms of the newest message that used this state: when full, the
    /// stream quiet the longest loses its state (and baselines again).
    used_ms: u64,
}

struct Series {
    /// In arrival order.
    samples: VecDeque<Sample>,
    last_update_ms: u64,
    /// When each Envoy last reported this cluster (with traffic or not):
    /// a window is only as fresh as the stalest Envoy that carried it.
    /// At most [`MAX_STREAMS`] nodes; the longest silent goes first.
    reporters: HashMap<NodeId, u64>,
}

struct Stream {
    id: StreamId,
    connected: bool,
    connected_since_ms: u64,
    last_message_ms: u64,
    messages: u64,
}

// === impl MetricsBook ===

impl MetricsBook {
    /// A book that also keeps every recorded flush (with traffic or not)
    /// for [`MetricsBook::take_outbox`]: a replica ships them to the
    /// database, where the fleet's book is built from every replica's.
    pub fn tapped() -> Self {
        let book = Self::default();
        book.lock().outbox = Some(VecDeque::new());
        book
    }

    /// Up to `max` recorded flushes, oldest first, taken out of the outbox.
    pub fn take_outbox(&self, max: usize) -> Vec<(String, Sample)> {
        let mut inner = self.lock();
        match inner.outbox.as_mut() {
            Some(out) => {
                let n = out.len().min(max);
                out.drain(..n).collect()
            }
            None => Vec::new(),
        }
    }

    /// Puts flushes that could not be shipped back at the front (in order).
    pub fn return_outbox(&self, batch: Vec<(String, Sample)>) {
        let mut inner = self.lock();
        let mut dropped = 0u64;
        if let Some(out) = inner.outbox.as_mut() {
            for item in batch.into_iter().rev() {
                if out.len() >= MAX_OUTBOX {
                    dropped = dropped.saturating_add(1);
                    continue;
                }
                out.push_front(item);
            }
        }
        inner.outbox_dropped = inner.outbox_dropped.saturating_add(dropped);
    }

    /// Flushes the outbox dropped since start (the database was away too long).
    pub fn outbox_dropped(&self) -> u64 {
        self.lock().outbox_dropped
    }

    /// Records a flush another replica (or this one) shipped: the fleet's
    /// book, read from the database, counts each exactly once.
    pub fn record_shipped(&self, cluster: String, sample: Sample) {
        let mut inner = self.lock();
        let at = sample.at_ms;
        inner.record(cluster, sample, at);
        inner.enforce_total_cap();
    }

    /// A stream from `node` opened (its first message arrived).
    pub fn open_stream(&self, node: &NodeId, now_ms: u64) -> StreamId {
        let mut inner = self.lock();
        inner.next_stream = inner.next_stream.wrapping_add(1);
        let id = StreamId(inner.next_stream);
        inner.make_room_for_stream(node);
        inner.streams.insert(
            node.clone(),
            Stream {
                id,
                connected: true,
                connected_since_ms: now_ms,
                last_message_ms: now_ms,
                messages: 0,
            },
        );
        id
    }

    /// The stream `id` from `node` ended. A node that has since opened
    /// another stream stays connected.
    pub fn close_stream(&self, node: &NodeId, id: StreamId) {
        let mut inner = self.lock();
        if let Some(s) = inner.streams.get_mut(node)
            && s.id == id
        {
            s.connected = false;
        }
        inner.drop_counter_state(id);
    }

    /// Records one message from `node`, received at `now_ms`.
    pub fn ingest(&self, node: &NodeId, msg: &StreamMetricsMessage, now_ms: u64) -> Ingested {
        self.ingest_on(None, node, msg, now_ms)
    }

    /// [`MetricsBook::ingest`] for the stream `stream` of `node` (from
    /// [`MetricsBook::open_stream`]): cumulative counters are differenced per
    /// stream, so two streams claiming one node id never mix. `None`: the
    /// node's current stream.
    pub fn ingest_on(
        &self,
        stream: Option<StreamId>,
        node: &NodeId,
        msg: &StreamMetricsMessage,
        now_ms: u64,
    ) -> Ingested {
        // Parsing needs no lock; the API and the engine read concurrently.
        let (mut flushes, mut ignored) = parse(&msg.envoy_metrics);
        let mut inner = self.lock();
        let current = inner.touch_stream(node, now_ms);
        let stream = stream.unwrap_or(current);
        if flushes.values().any(|f| !f.cumulative.is_empty()) {
            ignored =
                ignored.saturating_add(inner.resolve_cumulative(stream, &mut flushes, now_ms));
        }
        let mut done = Ingested {
            clusters: flushes.len(),
            samples: 0,
            ignored,
        };
        for (cluster, flush) in flushes {
            let sample = flush.into_sample(node.clone(), now_ms);
            if inner.outbox.is_some() {
                let item = (cluster.clone(), sample.clone());
                inner.push_outbox(item);
            }
            if inner.record(cluster, sample, now_ms) {
                done.samples = done.samples.saturating_add(1);
            }
        }
        inner.enforce_total_cap();
        done
    }

    /// What `cluster` did in `(since_ms, now_ms]`, summed over Envoys.
    ///
    /// `last_update_ms` is how fresh the window is: the *oldest* latest
    /// report among the Envoys that carried the cluster's traffic in the
    /// window, so an Envoy that went quiet mid-window makes the whole window
    /// stale however fresh the others are (its requests are missing from
    /// it, and they are not known to be healthy). With no traffic in the
    /// window, the newest report that mentioned the cluster (fresh: idle;
    /// old: no data). `None` if it was never reported (or was forgotten).
    pub fn window(&self, cluster: &str, since_ms: u64, now_ms: u64) -> Evidence {
        let inner = self.lock();
        let Some(series) = inner.clusters.get(cluster) else {
            return Evidence::default();
        };
        let mut evidence = Evidence {
            last_update_ms: Some(series.last_update_ms),
            ..Evidence::default()
        };
        let mut histograms = Vec::new();
        let mut stalest: Option<u64> = None;
        for s in series
            .samples
            .iter()
            .filter(|s| s.at_ms > since_ms && s.at_ms <= now_ms)
        {
            evidence.requests = evidence.requests.saturating_add(s.requests);
            evidence.errors = evidence.errors.saturating_add(s.errors_5xx);
            if !s.latency_ms.is_empty() {
                histograms.push(s.latency_ms.as_slice());
            }
            // A node no longer in the table was forgotten: no report since.
            let last = series.reporters.get(&s.node).copied().unwrap_or(s.at_ms);
            stalest = Some(stalest.map_or(last, |t| t.min(last)));
        }
        if stalest.is_some() {
            evidence.last_update_ms = stalest;
        }
        evidence.latency_ms = merge_buckets(&histograms);
        evidence
    }

    /// When any Envoy last reported `cluster` (with traffic or not); `None`
    /// if none ever did (or it was forgotten).
    pub fn last_report_ms(&self, cluster: &str) -> Option<u64> {
        self.lock().clusters.get(cluster).map(|s| s.last_update_ms)
    }

    /// The samples of `cluster` in `(since_ms, now_ms]`, per Envoy and flush,
    /// oldest first: for diagnostics (which Envoy saw the errors).
    pub fn samples(&self, cluster: &str, since_ms: u64, now_ms: u64) -> Vec<Sample> {
        let inner = self.lock();
        inner
            .clusters
            .get(cluster)
            .map(|series| {
                series
                    .samples
                    .iter()
                    .filter(|s| s.at_ms > since_ms && s.at_ms <= now_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every Envoy that has streamed metrics, by node id.
    pub fn streams(&self) -> Vec<StreamStatus> {
        self.lock()
            .streams
            .iter()
            .map(|(node, s)| StreamStatus {
                node: node.to_string(),
                connected: s.connected,
                connected_since_ms: s.connected_since_ms,
                last_message_ms: s.last_message_ms,
                messages: s.messages,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Counts a message from `node` and returns its current stream.
    fn touch_stream(&mut self, node: &NodeId, now_ms: u64) -> StreamId {
        if !self.streams.contains_key(node) {
            // Ingested without `open_stream` (the stream's entry was evicted,
            // or a caller that does not track streams): start one.
            self.make_room_for_stream(node);
            self.next_stream = self.next_stream.wrapping_add(1);
            let id = StreamId(self.next_stream);
            self.streams.insert(
                node.clone(),
                Stream {
                    id,
                    connected: true,
                    connected_since_ms: now_ms,
                    last_message_ms: now_ms,
                    messages: 0,
                },
            );
        }
        match self.streams.get_mut(node) {
            Some(s) => {
                s.last_message_ms = now_ms;
                s.messages = s.messages.saturating_add(1);
                s.id
            }
            // Unreachable: the entry was just made. A fresh id is harmless
            // (its counters baseline).
            None => {
                self.next_stream = self.next_stream.wrapping_add(1);
                StreamId(self.next_stream)
            }
        }
    }

    /// Turns the cumulative counters in `flushes` into what happened since
    /// the stream's previous message, in place; returns how many could not
    /// be tracked (state full) and so count nothing.
    fn resolve_cumulative(
        &mut self,
        stream: StreamId,
        flushes: &mut BTreeMap<String, ClusterFlush>,
        now_ms: u64,
    ) -> usize {
        let fresh = !self.counters.contains_key(&stream);
        if fresh && self.counters.len() >= MAX_COUNTER_STREAMS {
            let quietest = self
                .counters
                .iter()
                .min_by_key(|(_, c)| c.used_ms)
                .map(|(id, _)| *id);
            if let Some(id) = quietest {
                self.drop_counter_state(id);
            }
        }
        let mut entries = self.counter_entries;
        let state = self.counters.entry(stream).or_insert_with(|| CounterState {
            last: HashMap::new(),
            used_ms: now_ms,
        });
        state.used_ms = now_ms;
        let mut untracked: usize = 0;
        for (cluster, flush) in flushes.iter_mut() {
            for (stat, value) in std::mem::take(&mut flush.cumulative) {
                let key = (cluster.clone(), stat);
                let full = state.last.len() >= MAX_COUNTERS_PER_STREAM;
                let delta = match state.last.get(&key) {
                    // Lower than before: Envoy restarted (or the counter was
                    // reset) and counts from zero again.
                    Some(&last) if value < last => value,
                    Some(&last) => value - last,
                    None if full || entries >= MAX_COUNTER_ENTRIES => {
                        // Untracked, never counted: counting its whole value
                        // each time would count the past again and again.
                        untracked = untracked.saturating_add(1);
                        continue;
                    }
                    // The stream's first message: a baseline of everything
                    // before it, not traffic in this flush.
                    None if fresh => 0,
                    // Envoy sends every counter it ever used in every flush,
                    // so one first seen later was zero at the previous flush.
                    None => value,
                };
                if let Some(last) = state.last.get_mut(&key) {
                    *last = value;
                } else {
                    state.last.insert(key, value);
                    entries = entries.saturating_add(1);
                }
                flush.add(stat, delta.min(MAX_COUNT_PER_FLUSH));
            }
        }
        self.counter_entries = entries;
        untracked
    }

    fn drop_counter_state(&mut self, id: StreamId) {
        if let Some(state) = self.counters.remove(&id) {
            self.counter_entries = self.counter_entries.saturating_sub(state.last.len());
        }
    }

    /// Evicts a node when the table is full and `node` is new: a
    /// disconnected one first, then the one quiet the longest.
    fn make_room_for_stream(&mut self, node: &NodeId) {
        if self.streams.contains_key(node) || self.streams.len() < MAX_STREAMS {
            return;
        }
        let victim = self
            .streams
            .iter()
            .min_by_key(|(_, s)| (s.connected, s.last_message_ms))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim
            && let Some(s) = self.streams.remove(&k)
        {
            self.drop_counter_state(s.id);
        }
    }

    /// Adds `sample` to `cluster`'s series (unless it is empty). Returns
    /// whether it was stored.
    fn push_outbox(&mut self, item: (String, Sample)) {
        if let Some(out) = self.outbox.as_mut() {
            if out.len() >= MAX_OUTBOX {
                out.pop_front();
                self.outbox_dropped = self.outbox_dropped.saturating_add(1);
            }
            out.push_back(item);
        }
    }

    fn record(&mut self, cluster: String, sample: Sample, now_ms: u64) -> bool {
        if !self.clusters.contains_key(&cluster) && self.clusters.len() >= MAX_CLUSTERS {
            let victim = self
                .clusters
                .iter()
                .min_by_key(|(_, s)| s.last_update_ms)
                .map(|(k, _)| k.clone());
            if let Some(series) = victim.and_then(|k| self.clusters.remove(&k)) {
                self.samples -= series.samples.len();
            }
        }
        let series = self.clusters.entry(cluster).or_insert_with(|| Series {
            samples: VecDeque::new(),
            last_update_ms: now_ms,
            reporters: HashMap::new(),
        });
        series.last_update_ms = now_ms;
        if !series.reporters.contains_key(&sample.node) && series.reporters.len() >= MAX_STREAMS {
            let quietest = series
                .reporters
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone());
            if let Some(n) = quietest {
                series.reporters.remove(&n);
            }
        }
        series.reporters.insert(sample.node.clone(), now_ms);
        let cutoff = now_ms.saturating_sub(RETENTION_MS);
        let before = series.samples.len();
        while series.samples.front().is_some_and(|s| s.at_ms <= cutoff) {
            series.samples.pop_front();
        }
        let mut removed = before - series.samples.len();
        let stored = !sample.is_empty();
        if stored {
            series.samples.push_back(sample);
            if series.samples.len() > MAX_SAMPLES_PER_CLUSTER {
                series.samples.pop_front();
                removed += 1;
            }
        }
        self.samples = self.samples + usize::from(stored) - removed;
        stored
    }

    /// Drops the oldest samples anywhere until at most [`MAX_SAMPLES`] remain.
    fn enforce_total_cap(&mut self) {
        while self.samples > MAX_SAMPLES {
            let oldest = self
                .clusters
                .values_mut()
                .filter(|s| !s.samples.is_empty())
                .min_by_key(|s| s.samples.front().map_or(u64::MAX, |f| f.at_ms));
            match oldest.and_then(|s| s.samples.pop_front()) {
                Some(_) => self.samples -= 1,
                // Unreachable while the count is kept right; never loop.
                None => break,
            }
        }
    }
}

// === parsing ===

/// Family names as Envoy tags them (`emit_tags_as_labels: true`).
const COMPLETED: &str = "cluster.upstream_rq_completed";
const BY_CLASS: &str = "cluster.upstream_rq_xx";
const BY_CODE: &str = "cluster.upstream_rq";
const LATENCY: &str = "cluster.upstream_rq_time";

/// What one message said about one cluster, before deciding which counter
/// to believe.
#[derive(Debug, Default)]
struct ClusterFlush {
    completed: Option<u64>,
    /// (all classes, 5xx) from `upstream_rq_xx`.
    by_class: Option<(u64, u64)>,
    /// (all codes, 5xx) from `upstream_rq`.
    by_code: Option<(u64, u64)>,
    /// One histogram per latency metric seen (normally one).
    latency: Vec<Vec<(f64, u64)>>,
    /// Counters sent as running totals (untagged names), not yet differenced
    /// against the stream's previous values: see [`Inner::resolve_cumulative`].
    cumulative: Vec<(Stat, u64)>,
}

impl ClusterFlush {
    /// Adds `n` (a count for this flush) to `stat`'s counter. A peer may
    /// repeat a metric; sums saturate and are clamped again, so no number it
    /// sends can overflow.
    fn add(&mut self, stat: Stat, n: u64) {
        let add = |slot: &mut u64, n: u64| *slot = slot.saturating_add(n).min(MAX_COUNT_PER_FLUSH);
        match stat {
            Stat::Completed => add(self.completed.get_or_insert(0), n),
            Stat::Class(class) => {
                let (all, errors) = self.by_class.get_or_insert((0, 0));
                add(all, n);
                if class == 5 {
                    add(errors, n);
                }
            }
            Stat::Code(code) => {
                let (all, errors) = self.by_code.get_or_insert((0, 0));
                add(all, n);
                if (500..600).contains(&code) {
                    add(errors, n);
                }
            }
            // Histograms are never counters.
            Stat::Latency => {}
        }
    }

    fn into_sample(self, node: NodeId, at_ms: u64) -> Sample {
        // Envoy charges `upstream_rq_completed`, `upstream_rq_<class>xx` and
        // `upstream_rq_<code>` together for every answer, so any one of them
        // is the request count; prefer the one meant for it.
        let requests = self
            .completed
            .or(self.by_class.map(|(all, _)| all))
            .or(self.by_code.map(|(all, _)| all))
            .unwrap_or(0);
        let errors_5xx = self.by_class.or(self.by_code).map(|(_, e)| e).unwrap_or(0);
        Sample {
            at_ms,
            node,
            // Never report more errors than requests, even if a peer does.
            requests: requests.max(errors_5xx),
            errors_5xx,
            latency_ms: merge_buckets(&self.latency),
        }
    }
}

/// Which stat a metric is, once its name and labels are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stat {
    Completed,
    Class(u8),
    Code(u16),
    Latency,
}

/// The clusters a message reports on, and how many metrics of the families
/// read could not be attributed to one.
fn parse(families: &[MetricFamily]) -> (BTreeMap<String, ClusterFlush>, usize) {
    let mut out: BTreeMap<String, ClusterFlush> = BTreeMap::new();
    let mut ignored: usize = 0;
    // Every untagged stat name in the message, to tell a sub-scope's
    // duplicate (`cluster.<c>.external.<stat>`) from a cluster whose name
    // ends in `.external`. Envoy sends all of a flush's counters in one
    // message (no `batch_size` in Istio's sink), so both are present.
    let names: HashSet<&str> = families
        .iter()
        .filter_map(|f| f.name.as_deref())
        .filter(|n| n.starts_with("cluster."))
        .collect();
    for family in families {
        let name = family.name.as_deref().unwrap_or_default();
        for metric in &family.metric {
            let Some((cluster, stat, cumulative)) = classify(name, metric, &names) else {
                continue;
            };
            let Some(cluster) = cluster.filter(|c| !c.is_empty() && c.len() <= MAX_NAME_LEN) else {
                ignored = ignored.saturating_add(1);
                continue;
            };
            if !out.contains_key(cluster) && out.len() >= MAX_CLUSTERS_PER_MESSAGE {
                ignored = ignored.saturating_add(1);
                continue;
            }
            let flush = out.entry(cluster.to_owned()).or_default();
            match stat {
                Stat::Latency => {
                    // Histograms are per flush in either sink mode (Envoy's
                    // metrics service sink sends `intervalStatistics()`).
                    if let Some(h) = &metric.histogram {
                        let buckets = histogram_buckets(h);
                        if !buckets.is_empty() {
                            flush.latency.push(buckets);
                        }
                    }
                }
                _ if cumulative => {
                    if flush.cumulative.len() < MAX_STATS_PER_CLUSTER {
                        flush.cumulative.push((stat, counter(metric)));
                    } else {
                        ignored = ignored.saturating_add(1);
                    }
                }
                _ => flush.add(stat, counter(metric)),
            }
        }
    }
    (out, ignored)
}

/// The cluster (`None`: a family we read, but no cluster named), the stat of
/// one metric and whether its counter is a running total (untagged name);
/// `None` for families we do not read.
fn classify<'a>(
    family: &'a str,
    metric: &'a Metric,
    names: &HashSet<&str>,
) -> Option<(Option<&'a str>, Stat, bool)> {
    let label = |names: [&str; 2]| {
        metric
            .label
            .iter()
            .find(|l| l.name.as_deref().is_some_and(|n| names.contains(&n)))
            .and_then(|l| l.value.as_deref())
    };
    let cluster = || label(["envoy.cluster_name", "envoy_cluster_name"]);
    match family {
        COMPLETED => Some((cluster(), Stat::Completed, false)),
        LATENCY => Some((cluster(), Stat::Latency, false)),
        BY_CLASS => {
            let class = label(["envoy.response_code_class", "envoy_response_code_class"])
                .and_then(parse_class)?;
            Some((cluster(), Stat::Class(class), false))
        }
        BY_CODE => {
            let code = label(["envoy.response_code", "envoy_response_code"])?
                .parse()
                .ok()?;
            Some((cluster(), Stat::Code(code), false))
        }
        // A labelled metric is a tagged one, whatever its family's name
        // (`cluster.external.upstream_rq_time` is not cluster "external").
        _ if cluster().is_some() => None,
        _ => {
            let (cluster, stat) = classify_untagged(family, names)?;
            Some((Some(cluster), stat, true))
        }
    }
}

/// Sub-scopes Envoy repeats a cluster's stats under
/// (`cluster.<c>.<scope>.<stat>`): counted in the plain stat already.
const SUB_SCOPES: [&str; 3] = ["external", "internal", "canary"];

/// `cluster.<name>.<stat>`, as Envoy names stats without
/// `emit_tags_as_labels` (Istio's sink). The name may hold dots
/// (`outbound|9080|canary|reviews.default.svc.cluster.local`), a stat never
/// does, so the stat is what follows the last dot and must be one we read.
/// What remains is the cluster, unless it is `<c>.external`, `<c>.internal`,
/// `<c>.canary` or `<c>.zone.<from>.<to>` *and* the message also carries
/// `cluster.<c>.<stat>`: then it is a sub-scope's duplicate, not read.
fn classify_untagged<'a>(family: &'a str, names: &HashSet<&str>) -> Option<(&'a str, Stat)> {
    let (cluster, stat_name) = family.strip_prefix("cluster.")?.rsplit_once('.')?;
    let stat = match stat_name {
        "upstream_rq_completed" => Stat::Completed,
        "upstream_rq_time" => Stat::Latency,
        _ => {
            let rest = stat_name.strip_prefix("upstream_rq_")?;
            if rest.ends_with("xx") {
                Stat::Class(parse_class(rest)?)
            } else if rest.len() == 3 {
                Stat::Code(rest.parse().ok()?)
            } else {
                return None;
            }
        }
    };
    if is_sub_scope(cluster, stat_name, names) {
        return None;
    }
    Some((cluster, stat))
}

/// Whether `cluster.<cluster>.<stat>` is a sub-scope's copy of a shorter
/// cluster's stat that the same message carries.
fn is_sub_scope(cluster: &str, stat: &str, names: &HashSet<&str>) -> bool {
    let base_has_stat = |base: &str| names.contains(format!("cluster.{base}.{stat}").as_str());
    if let Some((base, scope)) = cluster.rsplit_once('.')
        && SUB_SCOPES.contains(&scope)
        && base_has_stat(base)
    {
        return true;
    }
    // `<c>.zone.<from>.<to>`: zone names have no dots.
    let mut parts = cluster.rsplitn(4, '.');
    let (_to, _from, zone, base) = (parts.next(), parts.next(), parts.next(), parts.next());
    matches!((zone, base), (Some("zone"), Some(base)) if base_has_stat(base))
}

/// `"5"` (Envoy's tag value) or `"5xx"` → 5.
fn parse_class(value: &str) -> Option<u8> {
    let digit = value.strip_suffix("xx").unwrap_or(value);
    match digit.parse() {
        Ok(c @ 1..=5) => Some(c),
        _ => None,
    }
}

/// A counter's value as a count; a delta is never negative or fractional,
/// so anything else from a peer counts as nothing, and an absurdly large one
/// is clamped to [`MAX_COUNT_PER_FLUSH`].
fn counter(metric: &Metric) -> u64 {
    let v = metric.counter.as_ref().and_then(|c| c.value).unwrap_or(0.0);
    float_count(v).min(MAX_COUNT_PER_FLUSH)
}

fn float_count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        // Saturating float-to-int conversion: the intent for absurd values.
        v.round() as u64
    } else {
        0
    }
}

/// A Prometheus histogram (buckets cumulative across bounds, maybe without
/// `+Inf`) as per-bucket counts in [`compact`] form; what lies above the
/// last bound kept goes to `+Inf`.
///
/// A bucket's lower bound is the previous *configured* bound, whether or
/// not that bucket has counts: so empty buckets are kept here (compacted,
/// never dropped), or a slow mode behind a gap of empty buckets would be
/// read as spread from the last non-empty bucket up, and smeared downward.
fn histogram_buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let total = h
        .sample_count
        .or(h.sample_count_float.map(float_count))
        .unwrap_or(0);
    let mut cumulative: Vec<(f64, u64)> = h
        .bucket
        .iter()
        .filter_map(|b| {
            let bound = b.upper_bound.filter(|u| !u.is_nan() && *u > 0.0)?;
            let count = b
                .cumulative_count
                .or(b.cumulative_count_float.map(float_count))?;
            Some((bound, count))
        })
        .collect();
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    // A repeated bound would be an empty-width bucket: keep the first.
    cumulative.dedup_by(|b, a| a.0 == b.0);
    cumulative.truncate(MAX_BUCKETS);
    let mut out = Vec::with_capacity(cumulative.len() + 1);
    let mut below = 0;
    for (bound, count) in cumulative {
        // A count that goes down across bounds is malformed; it adds nothing.
        let n = count.saturating_sub(below);
        below = below.max(count);
        out.push((bound, n));
    }
    let above = total.saturating_sub(below);
    match out.last_mut() {
        Some((b, n)) if b.is_infinite() => *n = n.saturating_add(above),
        _ if above > 0 => out.push((f64::INFINITY, above)),
        _ => {}
    }
    compact(out)
}

/// The shortest list of `(upper bound, count)` that keeps every non-empty
/// bucket's true bounds: a run of empty buckets is kept as one empty bucket
/// (its last bound), because the next bucket's lower bound is that bound;
/// empty buckets after the last non-empty one say nothing and go. A list
/// with no counts at all becomes empty.
fn compact(buckets: Vec<(f64, u64)>) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::with_capacity(buckets.len());
    let mut pending_gap: Option<f64> = None;
    for (bound, n) in buckets {
        if n == 0 {
            pending_gap = Some(bound);
            continue;
        }
        if let Some(gap) = pending_gap.take() {
            out.push((gap, 0));
        }
        out.push((bound, n));
    }
    out
}

/// Merges histograms (each `(upper bound, count)`, ascending, a bucket's
/// lower bound the previous entry's bound or 0) into one whose every bucket
/// holds exactly the samples between its bounds.
///
/// Envoys with the same bucket settings merge bucket by bucket. Where
/// settings differ, a bound is kept only if it cuts no non-empty bucket of
/// any source (a source's bucket `(lo, hi]` says nothing about where in it
/// its samples lie): the finest partition that is still exact. Never
/// interpolated, so a merged histogram is as honest as its sources.
/// At most [`MAX_BUCKETS`] finite bounds come out; beyond that, bounds are
/// thinned (merging neighbours stays exact).
fn merge_buckets<B: AsRef<[(f64, u64)]>>(sources: &[B]) -> Vec<(f64, u64)> {
    let mut cuts: Vec<f64> = sources
        .iter()
        .flat_map(AsRef::as_ref)
        .map(|b| b.0)
        .filter(|b| b.is_finite() && *b > 0.0)
        .collect();
    cuts.sort_by(f64::total_cmp);
    cuts.dedup();
    let mut valid = vec![true; cuts.len()];
    for source in sources {
        let mut lower = 0.0;
        for &(upper, n) in source.as_ref() {
            if n > 0 {
                // Cuts strictly inside (lower, upper) split this bucket.
                let from = cuts.partition_point(|c| *c <= lower);
                let to = cuts.partition_point(|c| *c < upper);
                for v in valid.iter_mut().take(to).skip(from) {
                    *v = false;
                }
            }
            lower = upper;
        }
    }
    let mut cuts: Vec<f64> = cuts
        .into_iter()
        .zip(valid)
        .filter_map(|(c, ok)| ok.then_some(c))
        .collect();
    if cuts.len() > MAX_BUCKETS {
        let step = cuts.len().div_ceil(MAX_BUCKETS);
        let last = cuts.last().copied();
        cuts = cuts.into_iter().skip(step - 1).step_by(step).collect();
        if let Some(last) = last
            && cuts.last() != Some(&last)
        {
            if cuts.len() >= MAX_BUCKETS {
                cuts.pop();
            }
            cuts.push(last);
        }
    }
    let mut counts = vec![0u64; cuts.len()];
    let mut overflow = 0u64;
    for &(upper, n) in sources.iter().flat_map(AsRef::as_ref) {
        // The first cut at or above the bucket's upper bound holds it whole.
        let i = cuts.partition_point(|c| *c < upper);
        match counts.get_mut(i) {
            Some(c) => *c = c.saturating_add(n),
            None => overflow = overflow.saturating_add(n),
        }
    }
    let mut out: Vec<(f64, u64)> = cuts.into_iter().zip(counts).collect();
    if overflow > 0 {
        out.push((f64::INFINITY, overflow));
    }
    compact(out)
}

// === impl MetricsSink ===

/// The gRPC service Envoy's metrics sink streams to, served on the xDS port.
#[derive(Clone)]
pub struct MetricsSink {
    book: Arc<MetricsBook>,
}

/// A flush of every stat of a large Envoy can exceed tonic's 4 MiB default;
/// refusing it would lose the whole flush. Envoy's `batch_size` splits it.
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

impl MetricsSink {
    pub fn new(book: Arc<MetricsBook>) -> Self {
        Self { book }
    }

    pub fn into_service(self) -> MetricsServiceServer<Self> {
        MetricsServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Marks the stream closed however it ends, including when tonic drops the
/// handler because Envoy reset the stream.
struct OpenStream {
    book: Arc<MetricsBook>,
    node: NodeId,
    id: StreamId,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.book.close_stream(&self.node, self.id);
    }
}

#[tonic::async_trait]
impl MetricsService for MetricsSink {
    async fn stream_metrics(
        &self,
        request: Request<Streaming<StreamMetricsMessage>>,
    ) -> Result<Response<StreamMetricsResponse>, Status> {
        // Only the Envoy a client certificate names may stream its stats.
        let peer = crate::tls::peer(request.extensions())?;
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Ok(Response::new(StreamMetricsResponse {}));
        };
        let node = NodeId::from_message(&first).map_err(|e| {
            tracing::warn!(error = %e, "metrics stream refused");
            Status::invalid_argument(e.to_string())
        })?;
        crate::tls::authorize(&peer, node.as_str(), "stats stream")?;
        let open = OpenStream {
            book: Arc::clone(&self.book),
            node: node.clone(),
            id: self.book.open_stream(&node, crate::time::now_unix_ms()),
        };
        tracing::info!(%node, "metrics stream opened");
        let mut msg = first;
        loop {
            let got = self
                .book
                .ingest_on(Some(open.id), &node, &msg, crate::time::now_unix_ms());
            if got.ignored > 0 {
                tracing::debug!(%node, ignored = got.ignored, "cluster metrics without a usable cluster name");
            }
            match stream.message().await {
                Ok(Some(next)) => msg = next,
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(%node, %status, "metrics stream broken");
                    return Err(status);
                }
            }
        }
        tracing::info!(%node, "metrics stream closed");
        Ok(Response::new(StreamMetricsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::metrics::v3::stream_metrics_message::Identifier;
    use envoy_types::pb::io::prometheus::client::{Bucket, Counter, LabelPair, MetricType};

    const DEFAULT_BOUNDS: [f64; 19] = [
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ];

    fn node(id: &str) -> NodeId {
        NodeId::try_from(id).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
        pairs
            .iter()
            .map(|(n, v)| LabelPair {
                name: Some(n.to_string()),
                value: Some(v.to_string()),
            })
            .collect()
    }

    fn counter_family(name: &str, metrics: &[(&[(&str, &str)], f64)]) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            r#type: Some(MetricType::Counter as i32),
            metric: metrics
                .iter()
                .map(|(l, v)| Metric {
                    label: labels(l),
                    counter: Some(Counter {
                        value: Some(*v),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Envoy's shape: default bounds, cumulative across bounds, no +Inf.
    /// `values` are the latencies (ms) observed in this flush.
    fn latency_family(cluster: &str, values: &[f64]) -> MetricFamily {
        let bucket = DEFAULT_BOUNDS
            .iter()
            .map(|b| Bucket {
                upper_bound: Some(*b),
                cumulative_count: Some(values.iter().filter(|v| *v <= b).count() as u64),
                ..Default::default()
            })
            .collect();
        MetricFamily {
            name: Some(LATENCY.into()),
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                label: labels(&[("envoy.cluster_name", cluster)]),
                histogram: Some(Histogram {
                    sample_count: Some(values.len() as u64),
                    sample_sum: Some(values.iter().sum()),
                    bucket,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// One flush for one cluster as Envoy 1.40 sends it: completed, by class,
    /// by code, the `external` duplicates, and the latency histogram.
    fn flush(cluster: &str, ok: u64, errors: u64, latencies: &[f64]) -> Vec<MetricFamily> {
        let c = ("envoy.cluster_name", cluster);
        let total = (ok + errors) as f64;
        let mut families = Vec::new();
        for prefix in ["cluster.", "cluster.external."] {
            let name = |stat: &str| format!("{prefix}{stat}");
            families.push(counter_family(
                &name("upstream_rq_completed"),
                &[(&[c], total)],
            ));
            families.push(counter_family(
                &name("upstream_rq_xx"),
                &[
                    (&[("envoy.response_code_class", "2"), c], ok as f64),
                    (&[("envoy.response_code_class", "5"), c], errors as f64),
                ],
            ));
            families.push(counter_family(
                &name("upstream_rq"),
                &[
                    (&[("envoy.response_code", "200"), c], ok as f64),
                    (&[("envoy.response_code", "503"), c], errors as f64),
                ],
            ));
        }
        families.push(counter_family(
            "cluster.upstream_rq_total",
            &[(&[c], total)],
        ));
        families.push(latency_family(cluster, latencies));
        families
    }

    fn message(families: Vec<MetricFamily>) -> StreamMetricsMessage {
        StreamMetricsMessage {
            identifier: None,
            envoy_metrics: families,
        }
    }

    fn ingest(book: &MetricsBook, n: &str, families: Vec<MetricFamily>, at: u64) -> Ingested {
        book.ingest(&node(n), &message(families), at)
    }

    #[test]
    fn counters_are_deltas_and_add_up_without_the_external_duplicates() {
        let book = MetricsBook::default();
        let got = ingest(&book, "e1", flush("shop-stable", 7, 3, &[2.0; 10]), 1_000);
        assert_eq!(
            got,
            Ingested {
                clusters: 1,
                samples: 1,
                ignored: 0
            }
        );
        ingest(&book, "e1", flush("shop-stable", 2, 0, &[2.0; 2]), 2_000);
        let e = book.window("shop-stable", 0, 2_000);
        assert_eq!((e.requests, e.errors), (12, 3));
        assert_eq!(e.latency_ms, vec![(1.0, 0), (5.0, 12)]);
        assert_eq!(e.last_update_ms, Some(2_000));
    }

    #[test]
    fn histograms_are_per_flush_and_not_differenced() {
        // Observed from Envoy 1.40: 7 requests, then a flush with none
        // (sample_count 0), then 2. Differencing would give 7, 0, 0.
        let book = MetricsBook::default();
        ingest(&book, "e1", flush("c", 7, 0, &[3.0; 7]), 1_000);
        ingest(&book, "e1", flush("c", 0, 0, &[]), 2_000);
        ingest(&book, "e1", flush("c", 2, 0, &[3.0; 2]), 3_000);
        assert_eq!(
            book.window("c", 0, 3_000).latency_ms,
            vec![(1.0, 0), (5.0, 9)]
        );
        assert_eq!(
            book.samples("c", 0, 3_000).len(),
            2,
            "the empty flush is not stored"
        );
    }

    #[test]
    fn an_envoy_restart_is_just_another_delta() {
        // A restarted Envoy's first flush carries what it did since start;
        // smaller numbers than before are not a reset to undo.
        let book = MetricsBook::default();
        ingest(&book, "e1", flush("c", 100, 10, &[30.0; 110]), 1_000);
        ingest(&book, "e1", flush("c", 3, 1, &[30.0; 4]), 2_000);
        let e = book.window("c", 0, 2_000);
        assert_eq!((e.requests, e.errors), (114, 11));
        assert_eq!(e.latency_ms, vec![(25.0, 0), (50.0, 114)]);
    }

    #[test]
    fn cumulative_buckets_become_per_bucket_counts_with_an_overflow_bucket() {
        let book = MetricsBook::default();
        let latencies = [0.2, 0.7, 7.0, 7.0, 120.0, 4_000_000.0];
        ingest(&book, "e1", flush("c", 6, 0, &latencies), 1_000);
        let e = book.window("c", 0, 1_000);
        assert_eq!(
            e.latency_ms,
            vec![
                (0.5, 1),
                (1.0, 1),
                (5.0, 0),
                (10.0, 2),
                (100.0, 0),
                (250.0, 1),
                (3_600_000.0, 0),
                (f64::INFINITY, 1)
            ]
        );
        assert_eq!(e.latency_ms.iter().map(|b| b.1).sum::<u64>(), e.requests);
    }

    #[test]
    fn an_envoy_that_went_quiet_makes_the_window_stale() {
        let book = MetricsBook::default();
        for t in [1_000, 2_000] {
            ingest(&book, "e1", flush("c", 10, 0, &[1.0; 10]), t);
            ingest(&book, "e2", flush("c", 10, 0, &[1.0; 10]), t);
        }
        // e1 disappears; e2 goes on with traffic.
        for t in [3_000, 4_000, 20_000] {
            ingest(&book, "e2", flush("c", 10, 0, &[1.0; 10]), t);
        }
        let e = book.window("c", 0, 20_000);
        assert_eq!(e.requests, 70);
        assert_eq!(e.last_update_ms, Some(2_000), "as fresh as e1, the stalest");
        // An Envoy still reporting, just idle, is fresh.
        ingest(&book, "e1", flush("c", 0, 0, &[]), 20_000);
        assert_eq!(book.window("c", 0, 20_000).last_update_ms, Some(20_000));
        // A window e1 carried nothing in does not wait for it.
        let e = book.window("c", 2_000, 20_000);
        assert_eq!((e.requests, e.last_update_ms), (30, Some(20_000)));
    }

    #[test]
    fn windows_sum_envoys_and_exclude_their_start() {
        let book = MetricsBook::default();
        ingest(&book, "e1", flush("c", 1, 0, &[1.0]), 1_000);
        ingest(&book, "e2", flush("c", 10, 5, &[1.0; 15]), 1_000);
        ingest(&book, "e1", flush("c", 100, 0, &[1.0; 100]), 2_000);
        ingest(&book, "e2", flush("c", 1000, 0, &[1.0; 1000]), 3_000);
        let e = book.window("c", 1_000, 2_000);
        assert_eq!((e.requests, e.errors), (100, 0), "(1000, 2000]");
        let e = book.window("c", 999, 3_000);
        assert_eq!((e.requests, e.errors), (1116, 5));
        let e = book.window("c", 3_000, 9_000);
        assert_eq!((e.requests, e.latency_ms.len()), (0, 0));
        assert_eq!(
            e.last_update_ms,
            Some(3_000),
            "newest report, even outside the window"
        );
        let per_node: Vec<(String, u64)> = book
            .samples("c", 0, 1_000)
            .into_iter()
            .map(|s| (s.node.to_string(), s.requests))
            .collect();
        assert_eq!(per_node, vec![("e1".into(), 1), ("e2".into(), 15)]);
    }

    #[test]
    fn an_idle_cluster_is_fresh_with_zero_requests_an_unknown_one_has_no_data() {
        let book = MetricsBook::default();
        ingest(&book, "e1", flush("idle", 0, 0, &[]), 5_000);
        let e = book.window("idle", 0, 5_000);
        assert_eq!(
            e,
            Evidence {
                last_update_ms: Some(5_000),
                ..Evidence::default()
            }
        );
        assert_eq!(book.window("never", 0, 5_000), Evidence::default());
        assert_eq!(book.window("never", 0, 5_000).last_update_ms, None);
    }

    #[test]
    fn errors_come_from_5xx_only_and_never_exceed_requests() {
        let book = MetricsBook::default();
        let c = ("envoy.cluster_name", "c");
        let classes = counter_family(
            BY_CLASS,
            &[
                (&[("envoy.response_code_class", "4"), c], 7.0),
                (&[("envoy.response_code_class", "5"), c], 2.0),
            ],
        );
        ingest(&book, "e1", vec![classes], 1_000);
        let e = book.window("c", 0, 1_000);
        assert_eq!(
            (e.requests, e.errors),
            (9, 2),
            "requests from the class sum"
        );
        // A peer claiming more errors than completions.
        let completed = counter_family(COMPLETED, &[(&[c], 1.0)]);
        let classes = counter_family(BY_CLASS, &[(&[("envoy.response_code_class", "5"), c], 3.0)]);
        ingest(&book, "e1", vec![completed, classes], 2_000);
        let e = book.window("c", 1_000, 2_000);
        assert_eq!((e.requests, e.errors), (3, 3));
    }

    #[test]
    fn per_code_counters_are_used_when_no_class_counters_came() {
        let book = MetricsBook::default();
        let c = ("envoy.cluster_name", "c");
        let codes = counter_family(
            BY_CODE,
            &[
                (&[("envoy.response_code", "200"), c], 5.0),
                (&[("envoy.response_code", "504"), c], 1.0),
                (&[("envoy.response_code", "499"), c], 1.0),
            ],
        );
        ingest(&book, "e1", vec![codes], 1_000);
        let e = book.window("c", 0, 1_000);
        assert_eq!((e.requests, e.errors), (7, 1));
    }

    #[test]
    fn label_spellings_and_untagged_names_are_understood() {
        let book = MetricsBook::default();
        // Prometheus-sanitised label names and "5xx" class values.
        let c = ("envoy_cluster_name", "a");
        let classes = counter_family(
            BY_CLASS,
            &[
                (&[("envoy_response_code_class", "2xx"), c], 4.0),
                (&[("envoy_response_code_class", "5xx"), c], 1.0),
            ],
        );
        ingest(&book, "e1", vec![classes], 1_000);
        let e = book.window("a", 0, 1_000);
        assert_eq!((e.requests, e.errors), (5, 1));
        // Without emit_tags_as_labels: one family per stat, no labels, and
        // (Envoy's default that goes with it) running totals.
        let untagged = |n: f64| {
            vec![
                counter_family("cluster.b.upstream_rq_completed", &[(&[], 3.0 * n)]),
                counter_family("cluster.b.upstream_rq_2xx", &[(&[], 2.0 * n)]),
                counter_family("cluster.b.upstream_rq_5xx", &[(&[], n)]),
                counter_family("cluster.b.upstream_rq_503", &[(&[], n)]),
                counter_family("cluster.b.external.upstream_rq_5xx", &[(&[], n)]),
                counter_family("cluster.b.upstream_rq_total", &[(&[], 3.0 * n)]),
            ]
        };
        let got = ingest(&book, "e1", untagged(2.0), 1_000);
        assert_eq!(got.clusters, 1);
        ingest(&book, "e1", untagged(4.0), 2_000);
        let e = book.window("b", 0, 2_000);
        assert_eq!((e.requests, e.errors), (6, 2));
    }

    #[test]
    fn metrics_without_a_usable_cluster_are_counted_not_stored() {
        let book = MetricsBook::default();
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let families = vec![
            counter_family(COMPLETED, &[(&[], 3.0)]),
            counter_family(
                COMPLETED,
                &[(&[("envoy.cluster_name", long.as_str())], 3.0)],
            ),
            counter_family("server.uptime", &[(&[], 1.0)]),
        ];
        let got = ingest(&book, "e1", families, 1_000);
        assert_eq!(
            got,
            Ingested {
                clusters: 0,
                samples: 0,
                ignored: 2
            }
        );
    }

    #[test]
    fn a_slow_mode_behind_empty_buckets_keeps_its_bounds() {
        // Issue 11: 95 fast requests and 5 at 90 ms. The 5 are in (50, 100],
        // not in (5, 100] as when empty buckets were dropped.
        let book = MetricsBook::default();
        let mut latencies = vec![2.0; 95];
        latencies.extend([90.0; 5]);
        ingest(&book, "e1", flush("c", 100, 0, &latencies), 1_000);
        ingest(&book, "e1", flush("c", 100, 0, &latencies), 2_000);
        let e = book.window("c", 0, 2_000);
        assert_eq!(
            e.latency_ms,
            vec![(1.0, 0), (5.0, 190), (50.0, 0), (100.0, 10)]
        );
    }

    #[test]
    fn merging_keeps_only_bounds_that_cut_no_source_bucket() {
        // (0,5]:1 (5,20]:2 with default-bounds (1,5]:1 (25,50]:1: 10 would
        // cut (5,20], 0.5 and 1 would cut (0,5]; 20 and 25 cut nothing.
        let a = vec![(5.0, 1), (20.0, 2)];
        let b = vec![(1.0, 0), (5.0, 1), (25.0, 0), (50.0, 1)];
        assert_eq!(
            merge_buckets(&[a.clone(), b.clone()]),
            vec![(5.0, 2), (20.0, 2), (25.0, 0), (50.0, 1)]
        );
        // Same settings: bucket by bucket; order of sources does not matter.
        assert_eq!(
            merge_buckets(&[b.clone(), b.clone()]),
            merge_buckets(&[b.clone(), b.clone()])
        );
        assert_eq!(
            merge_buckets(&[b.clone(), a]),
            merge_buckets(&[vec![(5.0, 1), (20.0, 2)], b])
        );
        // Too many distinct bounds from a peer: thinned, still exact in sum.
        let many: Vec<Vec<(f64, u64)>> = (1..=1000).map(|i| vec![(f64::from(i), 1)]).collect();
        let m = merge_buckets(&many);
        assert!(m.len() <= MAX_BUCKETS, "{}", m.len());
        assert_eq!(m.iter().map(|b| b.1).sum::<u64>(), 1000);
        assert_eq!(m.last(), Some(&(1000.0, m.last().map_or(0, |b| b.1))));
    }

    #[test]
    fn envoys_with_different_buckets_merge_by_bound() {
        let book = MetricsBook::default();
        let custom = MetricFamily {
            name: Some(LATENCY.into()),
            metric: vec![Metric {
                label: labels(&[("envoy.cluster_name", "c")]),
                histogram: Some(Histogram {
                    sample_count: Some(3),
                    bucket: vec![
                        Bucket {
                            upper_bound: Some(5.0),
                            cumulative_count: Some(1),
                            ..Default::default()
                        },
                        Bucket {
                            upper_bound: Some(20.0),
                            cumulative_count: Some(3),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        ingest(&book, "e1", vec![custom], 1_000);
        ingest(&book, "e2", vec![latency_family("c", &[3.0, 40.0])], 1_000);
        assert_eq!(
            book.window("c", 0, 1_000).latency_ms,
            vec![(5.0, 2), (20.0, 2), (25.0, 0), (50.0, 1)]
        );
    }

    #[test]
    fn samples_older_than_the_retention_are_dropped() {
        let book = MetricsBook::default();
        ingest(&book, "e1", flush("c", 1, 0, &[]), 1_000);
        ingest(&book, "e1", flush("c", 2, 0, &[]), 1_000 + RETENTION_MS);
        let e = book.window("c", 0, 1_000 + RETENTION_MS);
        assert_eq!(e.requests, 2);
        assert_eq!(book.lock().samples, 1);
    }

    #[test]
    fn a_cluster_keeps_at_most_its_cap_of_samples_newest_first() {
        let book = MetricsBook::default();
        for t in 1..=(MAX_SAMPLES_PER_CLUSTER as u64 + 10) {
            ingest(&book, "e1", flush("c", 1, 0, &[]), t);
        }
        let e = book.window("c", 0, u64::MAX);
        assert_eq!(e.requests, MAX_SAMPLES_PER_CLUSTER as u64);
        assert_eq!(
            book.window("c", 10, u64::MAX).requests,
            e.requests,
            "the oldest went"
        );
        assert_eq!(book.lock().samples, MAX_SAMPLES_PER_CLUSTER);
    }

    #[test]
    fn the_least_recently_updated_cluster_is_forgotten_when_full() {
        let book = MetricsBook::default();
        for i in 0..MAX_CLUSTERS as u64 {
            ingest(&book, "e1", flush(&format!("c{i}"), 1, 0, &[]), 1_000 + i);
        }
        // c0 reports again, so c1 is now the least recently updated.
        ingest(&book, "e1", flush("c0", 1, 0, &[]), 5_000);
        ingest(&book, "e1", flush("new", 1, 0, &[]), 6_000);
        assert_eq!(book.window("c1", 0, 9_000), Evidence::default());
        assert_eq!(book.window("c0", 0, 9_000).requests, 2);
        assert_eq!(book.window("new", 0, 9_000).requests, 1);
        let inner = book.lock();
        assert_eq!(inner.clusters.len(), MAX_CLUSTERS);
        assert_eq!(inner.samples, MAX_CLUSTERS + 1, "c0 has two, c1's one went");
    }

    #[test]
    fn the_total_cap_drops_the_oldest_samples_anywhere() {
        let book = MetricsBook::default();
        let clusters = MAX_SAMPLES / MAX_SAMPLES_PER_CLUSTER + 1;
        // Fill every cluster to its own cap; together they exceed the total.
        let names: Vec<String> = (0..clusters).map(|i| format!("c{i}")).collect();
        let labelled: Vec<(&str, &str)> = names
            .iter()
            .map(|n| ("envoy.cluster_name", n.as_str()))
            .collect();
        let metrics: Vec<(&[(&str, &str)], f64)> = labelled
            .iter()
            .map(|l| (std::slice::from_ref(l), 1.0))
            .collect();
        let families = vec![counter_family(COMPLETED, &metrics)];
        for t in 0..MAX_SAMPLES_PER_CLUSTER as u64 {
            ingest(&book, "e1", families.clone(), 1 + t);
        }
        let inner = book.lock();
        assert_eq!(inner.samples, MAX_SAMPLES);
        let kept: usize = inner.clusters.values().map(|s| s.samples.len()).sum();
        assert_eq!(kept, MAX_SAMPLES);
        let oldest = inner
            .clusters
            .values()
            .filter_map(|s| s.samples.front().map(|f| f.at_ms))
            .min();
        let evicted = clusters * MAX_SAMPLES_PER_CLUSTER - MAX_SAMPLES;
        assert_eq!(
            oldest,
            Some(1 + (evicted / clusters) as u64),
            "oldest times went first"
        );
    }

    #[test]
    fn streams_show_who_is_connected_and_who_went_quiet() {
        let book = MetricsBook::default();
        let e1 = node("e1");
        let first = book.open_stream(&e1, 1_000);
        book.ingest(&e1, &message(flush("c", 1, 0, &[])), 1_000);
        book.ingest(&e1, &message(flush("c", 1, 0, &[])), 2_000);
        let s = &book.streams()[0];
        assert_eq!(
            s,
            &StreamStatus {
                node: "e1".into(),
                connected: true,
                connected_since_ms: 1_000,
                last_message_ms: 2_000,
                messages: 2,
            }
        );
        assert!(!s.is_silent(4_000, 5_000));
        assert!(s.is_silent(8_000, 5_000), "6 s without a message");
        // A reconnect opens a second stream before the first one's end is seen.
        let second = book.open_stream(&e1, 9_000);
        book.close_stream(&e1, first);
        assert!(
            book.streams()[0].connected,
            "the old stream's end does not count"
        );
        book.close_stream(&e1, second);
        let s = &book.streams()[0];
        assert!(!s.connected && s.is_silent(9_000, 5_000));
    }

    #[test]
    fn the_stream_table_forgets_disconnected_envoys_first() {
        let book = MetricsBook::default();
        for i in 0..MAX_STREAMS {
            let n = node(&format!("e{i}"));
            let id = book.open_stream(&n, 1_000 + i as u64);
            if i == 7 {
                book.close_stream(&n, id);
            }
        }
        book.open_stream(&node("late"), 9_000);
        let streams = book.streams();
        assert_eq!(streams.len(), MAX_STREAMS);
        assert!(!streams.iter().any(|s| s.node == "e7"));
        assert!(streams.iter().any(|s| s.node == "e0"));
    }

    #[test]
    fn node_ids_are_validated() {
        let mut msg = message(Vec::new());
        assert_eq!(NodeId::from_message(&msg), Err(MetricsError::MissingNode));
        msg.identifier = Some(Identifier {
            node: Some(Node {
                id: "edge-1".into(),
                ..Default::default()
            }),
        });
        assert_eq!(NodeId::from_message(&msg).unwrap().as_str(), "edge-1");
        let long = "n".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            NodeId::try_from(long.as_str()),
            Err(MetricsError::NodeTooLong {
                len: MAX_NAME_LEN + 1
            })
        );
    }

    #[test]
    fn malformed_histograms_count_nothing_extra() {
        let h = Histogram {
            sample_count: Some(2),
            bucket: vec![
                Bucket {
                    upper_bound: Some(f64::NAN),
                    cumulative_count: Some(9),
                    ..Default::default()
                },
                Bucket {
                    upper_bound: Some(10.0),
                    cumulative_count: Some(2),
                    ..Default::default()
                },
                Bucket {
                    upper_bound: Some(5.0),
                    cumulative_count: Some(3),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        // Sorted by bound: 5 → 3, then 10 → 2 (going down: nothing more).
        assert_eq!(histogram_buckets(&h), vec![(5.0, 3)]);
        assert_eq!(float_count(-3.0), 0);
        assert_eq!(float_count(f64::INFINITY), 0);
    }

    const RQ: &str = "outbound|9080|canary|reviews.default.svc.cluster.local";

    /// One flush as an Istio sidecar's sink sends it (Envoy's defaults:
    /// untagged names, running totals, histograms per flush as both a
    /// summary and a histogram family): `ok`/`errors` are the totals so far,
    /// `latencies` the requests of this flush.
    fn istio_flush(cluster: &str, ok: u64, errors: u64, latencies: &[f64]) -> Vec<MetricFamily> {
        let total = (ok + errors) as f64;
        let mut families = Vec::new();
        for scope in ["", "external."] {
            let name = |stat: &str| format!("cluster.{cluster}.{scope}{stat}");
            families.push(counter_family(
                &name("upstream_rq_completed"),
                &[(&[], total)],
            ));
            families.push(counter_family(
                &name("upstream_rq_2xx"),
                &[(&[], ok as f64)],
            ));
            families.push(counter_family(
                &name("upstream_rq_200"),
                &[(&[], ok as f64)],
            ));
            if errors > 0 {
                families.push(counter_family(
                    &name("upstream_rq_5xx"),
                    &[(&[], errors as f64)],
                ));
                families.push(counter_family(
                    &name("upstream_rq_503"),
                    &[(&[], errors as f64)],
                ));
            }
        }
        families.push(counter_family(
            &format!("cluster.{cluster}.upstream_rq_total"),
            &[(&[], total)],
        ));
        let mut latency = latency_family(cluster, latencies);
        latency.name = Some(format!("cluster.{cluster}.upstream_rq_time"));
        latency.metric[0].label.clear();
        let summary = MetricFamily {
            name: latency.name.clone(),
            r#type: Some(MetricType::Summary as i32),
            metric: vec![Metric::default()],
            ..Default::default()
        };
        families.push(summary);
        families.push(latency);
        families
    }

    #[test]
    fn istio_running_totals_count_their_differences_after_a_baseline() {
        let book = MetricsBook::default();
        // The stream's first flush: what the sidecar did before is history.
        let got = ingest(
            &book,
            "sidecar~10.1.2.3~r-1.default~default.svc.cluster.local",
            istio_flush(RQ, 100, 10, &[3.0; 4]),
            1_000,
        );
        assert_eq!((got.clusters, got.ignored), (1, 0));
        let e = book.window(RQ, 0, 1_000);
        assert_eq!((e.requests, e.errors), (0, 0), "a baseline is no traffic");
        assert_eq!(
            e.latency_ms,
            vec![(1.0, 0), (5.0, 4)],
            "histograms are per flush"
        );
        // 7 more, 2 of them 5xx; the `.external.` copies are not added.
        ingest(
            &book,
            "sidecar~10.1.2.3~r-1.default~default.svc.cluster.local",
            istio_flush(RQ, 105, 12, &[3.0; 7]),
            2_000,
        );
        let e = book.window(RQ, 1_000, 2_000);
        assert_eq!((e.requests, e.errors), (7, 2));
        assert_eq!(e.latency_ms, vec![(1.0, 0), (5.0, 7)]);
        // Unchanged totals: an idle flush, fresh but empty.
        ingest(
            &book,
            "sidecar~10.1.2.3~r-1.default~default.svc.cluster.local",
            istio_flush(RQ, 105, 12, &[]),
            3_000,
        );
        let e = book.window(RQ, 2_000, 3_000);
        assert_eq!((e.requests, e.last_update_ms), (0, Some(3_000)));
        assert_eq!(book.samples(RQ, 2_000, 3_000).len(), 0);
    }

    #[test]
    fn a_running_total_going_backwards_is_a_restart_counted_from_zero() {
        let book = MetricsBook::default();
        ingest(&book, "n", istio_flush(RQ, 100, 0, &[]), 1_000);
        ingest(&book, "n", istio_flush(RQ, 4, 1, &[]), 2_000);
        let e = book.window(RQ, 0, 2_000);
        assert_eq!((e.requests, e.errors), (5, 1));
        ingest(&book, "n", istio_flush(RQ, 6, 1, &[]), 3_000);
        assert_eq!(book.window(RQ, 0, 3_000).requests, 7);
    }

    #[test]
    fn a_counter_first_used_after_the_baseline_counts_whole() {
        // Envoy sends only counters it ever used; a cluster's first 5xx
        // makes `upstream_rq_5xx` appear with its whole (new) value.
        let book = MetricsBook::default();
        ingest(&book, "n", istio_flush(RQ, 10, 0, &[]), 1_000);
        ingest(&book, "n", istio_flush(RQ, 10, 3, &[]), 2_000);
        let e = book.window(RQ, 0, 2_000);
        assert_eq!((e.requests, e.errors), (3, 3));
        // A cluster first seen on a running stream counts whole as well.
        ingest(
            &book,
            "n",
            istio_flush("outbound|80||new.ns.svc.cluster.local", 4, 0, &[]),
            3_000,
        );
        assert_eq!(
            book.window("outbound|80||new.ns.svc.cluster.local", 0, 3_000)
                .requests,
            4
        );
    }

    #[test]
    fn each_stream_baselines_and_streams_sharing_a_node_never_mix() {
        let book = MetricsBook::default();
        let n = node("n");
        let a = book.open_stream(&n, 1_000);
        book.ingest_on(Some(a), &n, &message(istio_flush(RQ, 100, 0, &[])), 1_000);
        // A second Envoy claiming the same node id, with other totals.
        let b = book.open_stream(&n, 1_500);
        book.ingest_on(Some(b), &n, &message(istio_flush(RQ, 7, 0, &[])), 1_500);
        book.ingest_on(Some(a), &n, &message(istio_flush(RQ, 103, 0, &[])), 2_000);
        book.ingest_on(Some(b), &n, &message(istio_flush(RQ, 9, 0, &[])), 2_000);
        assert_eq!(book.window(RQ, 0, 2_000).requests, 5, "3 + 2, no resets");
        // A reconnect is a new stream: its first flush is a baseline again.
        book.close_stream(&n, a);
        let c = book.open_stream(&n, 3_000);
        book.ingest_on(Some(c), &n, &message(istio_flush(RQ, 150, 0, &[])), 3_000);
        assert_eq!(book.window(RQ, 0, 3_000).requests, 5);
        assert!(
            !book.lock().counters.contains_key(&a),
            "a closed stream's totals go"
        );
    }

    #[test]
    fn a_cluster_named_like_a_sub_scope_is_still_a_cluster() {
        let book = MetricsBook::default();
        // `outbound|80||api.internal` exists on its own: no
        // `cluster.outbound|80||api.upstream_rq_completed` beside it.
        let own = "outbound|80||api.internal";
        ingest(&book, "n", istio_flush(own, 1, 0, &[]), 1_000);
        ingest(&book, "n", istio_flush(own, 3, 0, &[]), 2_000);
        assert_eq!(book.window(own, 0, 2_000).requests, 2);
        // Zone and canary copies of a cluster are not clusters.
        let mut families = istio_flush(RQ, 1, 0, &[]);
        families.push(counter_family(
            &format!("cluster.{RQ}.zone.a.b.upstream_rq_completed"),
            &[(&[], 1.0)],
        ));
        families.push(counter_family(
            &format!("cluster.{RQ}.canary.upstream_rq_completed"),
            &[(&[], 1.0)],
        ));
        let got = ingest(&book, "n", families, 3_000);
        assert_eq!(got.clusters, 1);
    }

    #[test]
    fn hostile_running_totals_cannot_inflate_or_exhaust_the_book() {
        let book = MetricsBook::default();
        // Absurd and malformed totals: clamped, never overflowing, and a
        // repeated absurd total is no traffic.
        let absurd = |v: f64| {
            vec![counter_family(
                &format!("cluster.{RQ}.upstream_rq_completed"),
                &[(&[], v)],
            )]
        };
        ingest(&book, "n", absurd(1e30), 1_000);
        ingest(&book, "n", absurd(1e30), 2_000);
        ingest(&book, "n", absurd(f64::NAN), 3_000);
        ingest(&book, "n", absurd(-5.0), 4_000);
        ingest(&book, "n", absurd(f64::INFINITY), 5_000);
        let e = book.window(RQ, 0, 5_000);
        assert!(e.requests <= MAX_COUNT_PER_FLUSH, "{}", e.requests);
        // Thousands of names in one flush: the per-message cluster cap
        // holds and the rest are counted as ignored.
        let names: Vec<String> = (0..3 * MAX_CLUSTERS)
            .map(|i| {
                format!("cluster.outbound|80||s{i}.ns.svc.cluster.local.upstream_rq_completed")
            })
            .collect();
        let flood: Vec<MetricFamily> = names
            .iter()
            .map(|n| counter_family(n, &[(&[], 1.0)]))
            .collect();
        let got = ingest(&book, "flood", flood.clone(), 6_000);
        assert_eq!(got.clusters, MAX_CLUSTERS_PER_MESSAGE);
        assert_eq!(got.ignored, 3 * MAX_CLUSTERS - MAX_CLUSTERS_PER_MESSAGE);
        // Dozens of codes per cluster are capped too.
        let codes: Vec<MetricFamily> = (100..600)
            .map(|c| counter_family(&format!("cluster.{RQ}.upstream_rq_{c}"), &[(&[], 1.0)]))
            .collect();
        let got = ingest(&book, "codes", codes, 6_000);
        assert_eq!(got.ignored, 500 - MAX_STATS_PER_CLUSTER);
        // State is bounded across streams: once full, new counters are
        // untracked and count nothing, however often they come.
        for i in 0..(MAX_COUNTER_ENTRIES / MAX_CLUSTERS + 2) {
            ingest(&book, &format!("f{i}"), flood.clone(), 7_000);
        }
        assert!(book.lock().counter_entries <= MAX_COUNTER_ENTRIES);
        let late = format!("f{}", MAX_COUNTER_ENTRIES / MAX_CLUSTERS + 1);
        let got = ingest(&book, &late, flood.clone(), 8_000);
        assert!(got.ignored >= MAX_CLUSTERS_PER_MESSAGE, "{got:?}");
        // Legitimate traffic on a tracked stream still counts exactly.
        ingest(&book, "n", istio_flush(RQ, 1_000, 0, &[]), 9_000);
        ingest(&book, "n", istio_flush(RQ, 1_010, 0, &[]), 10_000);
        assert_eq!(book.window(RQ, 9_000, 10_000).requests, 10);
    }
}
