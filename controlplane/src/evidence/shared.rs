//! Evidence across replicas: each Envoy streams its stats to whichever
//! replica it is connected to; every replica ships what it received to the
//! database, and every replica builds the *fleet's* book from all of it.
//! The rollout engine judges on the fleet's book, so a window counts every
//! Envoy, whichever replica holds it, and a new leader judges on what the
//! old one saw.
//!
//! # Exactly once
//! A flush reaches one replica (the one holding that Envoy's stream), which
//! records it once in its tapped book ([`MetricsBook::tapped`]) and ships it
//! once as a row keyed `(replica, seq)`. One thread per replica commits its
//! rows in `seq` order, so a reader that keeps the last `seq` it read of
//! each replica never skips a row and never reads one twice. (A global
//! serial would not do: two replicas' transactions commit in any order.)
//!
//! # The filter's shadow reports
//! A replica ingests the shadow batches its Envoys push into its own book
//! at once (as without replicas) and also ships them, as received, to
//! `report_batches`; it reads the *other* replicas' batches into the same
//! book. So each book holds every batch once, and the leader's shadow
//! stage is judged on the whole fleet's pairs. The calibration part of a
//! batch read back is the exception: learned noise is shared through each
//! replica's own rows instead ([`noise`]). (Rate-limit usage reports stay
//! local: a replica's top-tenants view shows its own Envoys'.)
//!
//! # Bounded
//! A batch is at most [`BATCH`] rows; the outbox keeps [`super::envoy_stats::MAX_OUTBOX`]
//! flushes while the database is away, then drops the oldest (counted).
//! Rows older than the book's retention are deleted by their replica.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use understudy_proto::v1::ReportBatch;

use super::envoy_stats::{MetricsBook, NodeId, RETENTION_MS, Sample};
use super::shadow::{Origin, ShadowBook};
use super::usage::ReportOutbox;
use crate::pg::{Db, PgError};

mod noise;
pub use noise::{NoiseSync, ResetKind, ShadowResets};

/// Shadow batches shipped or read per round (a batch can be large).
pub const REPORT_BATCH: usize = 200;

/// Rows shipped or read per round.
pub const BATCH: usize = 5_000;
/// How often a replica ships and reads.
pub const PERIOD: Duration = Duration::from_millis(250);

/// Ships this replica's flushes and builds the fleet's book from every
/// replica's; runs on a thread of its own.
pub struct SharedEvidence {
    me: String,
    db: Db,
    /// This replica's Envoys (tapped).
    local: Arc<MetricsBook>,
    /// Every replica's Envoys, read back from the database.
    fleet: Arc<MetricsBook>,
    next_seq: i64,
    /// The last `seq` read of each replica.
    cursors: HashMap<String, i64>,
    last_prune_ms: u64,
    /// Shadow batches this replica received, to ship.
    reports: Arc<ReportOutbox>,
    /// The one shadow book, which this replica's own batches reached already.
    shadow: Arc<ShadowBook>,
    next_report_seq: i64,
    report_cursors: HashMap<String, i64>,
    /// Learned noise and resets ([`noise`]).
    noise: NoiseSync,
    resets: ShadowResets,
}

impl std::fmt::Debug for SharedEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedEvidence")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl SharedEvidence {
    /// `me` must be unique among replicas: it keys this replica's rows.
    pub fn new(
        me: &str,
        db: Db,
        (local, fleet): (Arc<MetricsBook>, Arc<MetricsBook>),
        (reports, shadow): (Arc<ReportOutbox>, Arc<ShadowBook>),
    ) -> Result<Self, PgError> {
        let name = me.to_owned();
        let (next_seq, next_report_seq) = db.call(move |c| {
            let row = c.query_one(
                "SELECT (SELECT coalesce(max(seq) + 1, 0) FROM stat_samples WHERE replica = $1), \
                        (SELECT coalesce(max(seq) + 1, 0) FROM report_batches WHERE replica = $1)",
                &[&name],
            )?;
            Ok((row.get(0), row.get(1)))
        })?;
        let (noise, resets) = NoiseSync::new(me, Arc::clone(&shadow), db.another("shadow-resets"));
        Ok(Self {
            me: me.to_owned(),
            noise,
            resets,
            db,
            local,
            fleet,
            next_seq,
            cursors: HashMap::new(),
            last_prune_ms: 0,
            reports,
            shadow,
            next_report_seq,
            report_cursors: HashMap::new(),
        })
    }

    /// Ships the shadow batches this replica received since the last round.
    pub fn ship_reports(&mut self, now_ms: u64) -> Result<usize, PgError> {
        let batch = self.reports.take(REPORT_BATCH);
        if batch.is_empty() {
            return Ok(0);
        }
        let first = self.next_report_seq;
        let me = self.me.clone();
        let at = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let rows: Vec<(i64, Vec<u8>, Option<String>)> = batch
            .iter()
            .zip(first..)
            .map(|((bytes, id), seq)| (seq, bytes.clone(), id.clone()))
            .collect();
        let n = rows.len();
        match insert_all(
            &self.db,
            "INSERT INTO report_batches (replica, seq, at_ms, identity, batch) VALUES ($1, $2, $3, $4, $5)",
            rows,
            move |tx, stmt, (seq, bytes, id)| tx.execute(stmt, &[&me, seq, &at, id, bytes]),
        ) {
            Ok(()) => {
                self.next_report_seq = after(first, n);
                Ok(n)
            }
            Err(e) => {
                self.reports.put_back(batch);
                Err(e)
            }
        }
    }

    /// Reads the other replicas' shadow batches after the cursors into the
    /// shadow book (this replica's own reached it when they arrived).
    pub fn read_reports(&mut self, now_ms: u64) -> Result<usize, PgError> {
        let (names, seqs): (Vec<String>, Vec<i64>) = self
            .report_cursors
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .unzip();
        let horizon = i64::try_from(now_ms.saturating_sub(RETENTION_MS)).unwrap_or(i64::MAX);
        let limit = i64::try_from(REPORT_BATCH).unwrap_or(i64::MAX);
        let me = self.me.clone();
        let rows: Vec<ShippedBatch> = self.db.call(move |c| {
            Ok(c.query(
                "SELECT b.replica, b.seq, b.identity, b.batch, b.at_ms FROM report_batches b \
                 LEFT JOIN unnest($1::text[], $2::int8[]) AS c(replica, seq) ON c.replica = b.replica \
                 WHERE b.replica <> $5 AND b.seq > coalesce(c.seq, -1) AND b.at_ms > $3 \
                 ORDER BY b.replica, b.seq LIMIT $4",
                &[&names, &seqs, &horizon, &limit, &me],
            )?
            .iter()
            .map(|r| ShippedBatch {
                replica: r.get(0),
                seq: r.get(1),
                identity: r.get(2),
                bytes: r.get(3),
                at_ms: r.get(4),
            })
            .collect())
        })?;
        let n = rows.len();
        for ShippedBatch {
            replica,
            seq,
            identity,
            bytes,
            at_ms,
        } in rows
        {
            match ReportBatch::decode(bytes.as_slice()) {
                Ok(mut batch) => {
                    self.noise.cut_live(&mut batch, at_ms);
                    let origin = match identity {
                        Some(identity) => Origin::Verified { identity },
                        None => Origin::Unverified,
                    };
                    self.shadow
                        .ingest_read_back(batch, origin, std::time::SystemTime::now());
                }
                // One bad row must not stop the fleet's evidence.
                Err(e) => {
                    tracing::warn!(replica, seq, error = %e, "a shared report batch does not decode")
                }
            }
            self.report_cursors.insert(replica, seq);
        }
        Ok(n)
    }

    /// Ships what this replica's book recorded since the last round; on a
    /// database error the batch goes back to the outbox for the next one.
    pub fn ship(&mut self) -> Result<usize, PgError> {
        let batch = self.local.take_outbox(BATCH);
        if batch.is_empty() {
            return Ok(0);
        }
        let first = self.next_seq;
        let rows: Vec<Row> = batch
            .iter()
            .zip(first..)
            .map(|((cluster, s), seq)| Row::of(seq, cluster, s))
            .collect();
        let me = self.me.clone();
        let n = rows.len();
        match insert_all(
            &self.db,
            "INSERT INTO stat_samples (replica, seq, cluster, node, at_ms, requests, errors, latency) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            rows,
            move |tx, stmt, r: &Row| {
                tx.execute(
                    stmt,
                    &[
                        &me,
                        &r.seq,
                        &r.cluster,
                        &r.node,
                        &r.at_ms,
                        &r.requests,
                        &r.errors,
                        &r.latency,
                    ],
                )
            },
        ) {
            Ok(()) => {
                self.next_seq = after(first, n);
                Ok(n)
            }
            Err(e) => {
                self.local.return_outbox(batch);
                Err(e)
            }
        }
    }

    /// Reads every replica's rows after the cursors into the fleet's book.
    pub fn read(&mut self, now_ms: u64) -> Result<usize, PgError> {
        let (names, seqs): (Vec<String>, Vec<i64>) =
            self.cursors.iter().map(|(k, v)| (k.clone(), *v)).unzip();
        let horizon = i64::try_from(now_ms.saturating_sub(RETENTION_MS)).unwrap_or(i64::MAX);
        let limit = i64::try_from(BATCH).unwrap_or(i64::MAX);
        let rows: Vec<(String, Row)> = self.db.call(move |c| {
            Ok(c.query(
                "SELECT s.replica, s.seq, s.cluster, s.node, s.at_ms, s.requests, s.errors, s.latency \
                 FROM stat_samples s \
                 LEFT JOIN unnest($1::text[], $2::int8[]) AS c(replica, seq) ON c.replica = s.replica \
                 WHERE s.seq > coalesce(c.seq, -1) AND s.at_ms > $3 \
                 ORDER BY s.replica, s.seq LIMIT $4",
                &[&names, &seqs, &horizon, &limit],
            )?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Row {
                        seq: r.get(1),
                        cluster: r.get(2),
                        node: r.get(3),
                        at_ms: r.get(4),
                        requests: r.get(5),
                        errors: r.get(6),
                        latency: r.get(7),
                    },
                )
            })
            .collect())
        })?;
        let n = rows.len();
        for (replica, row) in rows {
            let seq = row.seq;
            if let Some((cluster, sample)) = row.into_sample() {
                self.fleet.record_shipped(cluster, sample);
            }
            self.cursors.insert(replica, seq);
        }
        Ok(n)
    }

    /// Deletes this replica's rows the books no longer keep (once a minute).
    fn prune(&mut self, now_ms: u64) -> Result<(), PgError> {
        if now_ms.saturating_sub(self.last_prune_ms) < 60_000 {
            return Ok(());
        }
        self.last_prune_ms = now_ms;
        let me = self.me.clone();
        let horizon = i64::try_from(now_ms.saturating_sub(RETENTION_MS)).unwrap_or(i64::MAX);
        self.db.call(move |c| {
            c.execute(
                "DELETE FROM stat_samples WHERE replica = $1 AND at_ms <= $2",
                &[&me, &horizon],
            )?;
            c.execute(
                "DELETE FROM report_batches WHERE replica = $1 AND at_ms <= $2",
                &[&me, &horizon],
            )?;
            Ok(())
        })
    }

    /// Applies fleet-wide shadow resets, and shares learned noise: this
    /// replica's written, every replica's read back ([`noise`]).
    pub fn share_noise(&mut self) -> Result<(), PgError> {
        self.noise.round(&self.db)
    }

    /// The API's handle for fleet-wide shadow resets.
    pub fn resets(&self) -> ShadowResets {
        self.resets.clone()
    }

    /// One round at `now_ms`: every step runs even if one before it
    /// failed (a step's failure is logged, and retried next round). The
    /// number of steps that failed.
    pub fn round(&mut self, now_ms: u64) -> usize {
        let steps: [(&str, Result<(), PgError>); 6] = [
            ("evidence not shipped yet", self.ship().map(drop)),
            ("fleet evidence not read", self.read(now_ms).map(drop)),
            (
                "shadow reports not shipped yet",
                self.ship_reports(now_ms).map(drop),
            ),
            // Resets before reading: batches shipped before a live reset
            // are then left out as they are read (a replica just started
            // reads them all).
            ("learned noise not shared", self.share_noise()),
            (
                "other replicas' shadow reports not read",
                self.read_reports(now_ms).map(drop),
            ),
            ("old evidence not pruned", self.prune(now_ms)),
        ];
        steps
            .into_iter()
            .filter(|(what, step)| {
                if let Err(e) = step {
                    tracing::debug!(error = %e, "{what}");
                }
                step.is_err()
            })
            .count()
    }

    /// Ships and reads every [`PERIOD`] until the process ends.
    pub fn run(mut self) {
        loop {
            let started = std::time::Instant::now();
            self.round(crate::time::now_unix_ms());
            if let Some(rest) = PERIOD.checked_sub(started.elapsed()) {
                std::thread::park_timeout(rest);
            }
        }
    }
}

/// Inserts `rows` with `sql` (each bound by `bind`) in one transaction:
/// all or none, so a replica's `seq` stays gapless for the readers' cursors.
fn insert_all<R: Send + 'static>(
    db: &Db,
    sql: &'static str,
    rows: Vec<R>,
    bind: impl Fn(
        &mut postgres::Transaction<'_>,
        &postgres::Statement,
        &R,
    ) -> Result<u64, postgres::Error>
    + Send
    + 'static,
) -> Result<(), PgError> {
    db.call(move |c| {
        let mut tx = c.transaction()?;
        let stmt = tx.prepare(sql)?;
        for row in &rows {
            bind(&mut tx, &stmt, row)?;
        }
        tx.commit()?;
        Ok(())
    })
}

/// The next `seq` after `n` rows shipped from `first`.
fn after(first: i64, n: usize) -> i64 {
    first.saturating_add(i64::try_from(n).unwrap_or(i64::MAX))
}

/// One shadow batch as another replica shipped it.
struct ShippedBatch {
    replica: String,
    seq: i64,
    /// The verified identity of the Envoy that sent it, if any.
    identity: Option<String>,
    bytes: Vec<u8>,
    at_ms: i64,
}

/// One flush as stored.
struct Row {
    seq: i64,
    cluster: String,
    node: String,
    at_ms: i64,
    requests: i64,
    errors: i64,
    latency: serde_json::Value,
}

impl Row {
    fn of(seq: i64, cluster: &str, s: &Sample) -> Self {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            seq,
            cluster: cluster.to_owned(),
            node: s.node.as_str().to_owned(),
            at_ms: clamp(s.at_ms),
            requests: clamp(s.requests),
            errors: clamp(s.errors_5xx),
            // JSON has no infinity: the open last bucket is `null`.
            latency: serde_json::Value::Array(
                s.latency_ms
                    .iter()
                    .map(|(bound, n)| {
                        let b = if bound.is_finite() {
                            serde_json::json!(bound)
                        } else {
                            serde_json::Value::Null
                        };
                        serde_json::json!([b, n])
                    })
                    .collect(),
            ),
        }
    }

    /// The flush back; `None` for a row that does not decode (skipped:
    /// one bad row must not stop the fleet's evidence).
    fn into_sample(self) -> Option<(String, Sample)> {
        let node = NodeId::try_from(self.node.as_str()).ok()?;
        let latency_ms = self
            .latency
            .as_array()?
            .iter()
            .map(|pair| {
                let bound = match pair.get(0)? {
                    serde_json::Value::Null => f64::INFINITY,
                    v => v.as_f64()?,
                };
                Some((bound, pair.get(1)?.as_u64()?))
            })
            .collect::<Option<Vec<_>>>()?;
        Some((
            self.cluster,
            Sample {
                at_ms: u64::try_from(self.at_ms).ok()?,
                node,
                requests: u64::try_from(self.requests).ok()?,
                errors_5xx: u64::try_from(self.errors).ok()?,
                latency_ms,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gives_back_its_flush_open_bucket_included() {
        let s = Sample {
            at_ms: 1_700,
            node: NodeId::try_from("envoy-a").unwrap(),
            requests: 12,
            errors_5xx: 3,
            latency_ms: vec![(0.5, 0), (25.0, 9), (f64::INFINITY, 3)],
        };
        let (cluster, back) = Row::of(4, "api-canary", &s).into_sample().unwrap();
        assert_eq!(cluster, "api-canary");
        assert_eq!(back, s);
    }

    #[test]
    fn a_row_that_does_not_decode_is_skipped() {
        let mut r = Row::of(
            0,
            "c",
            &Sample {
                at_ms: 1,
                node: NodeId::try_from("n").unwrap(),
                requests: 1,
                errors_5xx: 0,
                latency_ms: vec![],
            },
        );
        r.latency = serde_json::json!([["x", 1]]);
        assert!(r.into_sample().is_none());
        let mut r = Row::of(
            0,
            "c",
            &Sample {
                at_ms: 1,
                node: NodeId::try_from("n").unwrap(),
                requests: 1,
                errors_5xx: 0,
                latency_ms: vec![],
            },
        );
        r.requests = -1;
        assert!(r.into_sample().is_none());
    }
}
