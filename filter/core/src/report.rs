//! Report batching, shared by the shadow mismatch reports and the rate
//! limiter's usage reports: when a report is due ([`Schedule`]), the bounded
//! queue of records waiting for one ([`RecordQueue`]), and the batches on
//! their way to the control plane ([`Outbox`]: in flight, kept to send again,
//! and what is dropped when the host or the control plane cannot keep up).
//!
//! A bottom module: it imports nothing from this crate. The filter glue
//! encodes batches (protobuf) and sends them; every choice about *whether*
//! and *what* to send is made here and tested natively.

use std::collections::{BTreeMap, VecDeque};

/// Records sent per report interval; the rest wait for the next one.
pub const RECORDS_PER_BATCH: usize = 32;
/// Batches sent and not yet answered. A gRPC call always ends (the glue's
/// timeout is 5 s), so this bounds memory only against a stuck host.
pub const MAX_IN_FLIGHT: usize = 16;
/// Failed batches kept to send again; beyond this the oldest one's records
/// are counted as dropped (and reported as such in the next batch).
pub const MAX_RETRY_BATCHES: usize = 8;

/// When the next report is due: one every `interval_ms`, on the first tick
/// at or after it. Time is an input; the first report is due at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    last_us: u64,
}

impl Schedule {
    /// Whether a report is due at `now_us`. When it is, the next interval
    /// starts now (a late tick does not make the next report early).
    pub fn due(&mut self, now_us: u64, interval_ms: u64) -> bool {
        if now_us.saturating_sub(self.last_us) < interval_ms.saturating_mul(1000) {
            return false;
        }
        self.last_us = now_us;
        true
    }
}

/// Records waiting for the next report, at most `cap` of them; a record
/// that finds the queue full is dropped and counted, so the next batch can
/// say how many were lost.
#[derive(Debug, Clone)]
pub struct RecordQueue<T> {
    items: VecDeque<T>,
    cap: usize,
    dropped: u64,
}

impl<T> RecordQueue<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            items: VecDeque::new(),
            cap,
            dropped: 0,
        }
    }

    /// Queues `item`; `false` when the queue was full and it was dropped.
    pub fn push(&mut self, item: T) -> bool {
        if self.items.len() >= self.cap {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        self.items.push_back(item);
        true
    }

    /// Counts `n` records lost elsewhere (too large, or a retry batch that
    /// gave way) so the next batch reports them.
    pub fn count_dropped(&mut self, n: u64) {
        self.dropped = self.dropped.saturating_add(n);
    }

    /// The oldest records, at most [`RECORDS_PER_BATCH`] of them.
    pub fn take_batch(&mut self) -> Vec<T> {
        let n = self.items.len().min(RECORDS_PER_BATCH);
        self.items.drain(..n).collect()
    }

    /// Records dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Nothing to report: no records and nothing dropped.
    pub fn is_idle(&self) -> bool {
        self.items.is_empty() && self.dropped == 0
    }
}

/// An encoded report batch and how many records it carries (counted as
/// dropped if the batch is given up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub records: u64,
}

/// What became of a batch the control plane answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// Accepted (gRPC status 0).
    Delivered,
    /// Refused or failed: kept to send again; `dropped` records gave way
    /// to make room for it.
    Refused { dropped: u64 },
}

/// Batches in flight (by call token) and batches waiting to be sent again.
/// Both are bounded ([`MAX_IN_FLIGHT`], [`MAX_RETRY_BATCHES`]).
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    in_flight: BTreeMap<u32, Batch>,
    retry: VecDeque<Batch>,
}

impl Outbox {
    /// Whether another call may be started now.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// The batches that failed before, oldest first, as many as there is
    /// room in flight for. Each is taken out; hand it back through
    /// [`Outbox::sent`] or [`Outbox::keep`]. A batch that fails again waits
    /// for the next report, so a host that refuses every call costs one try
    /// per batch per report, never a loop.
    pub fn retries(&mut self) -> Vec<Batch> {
        let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight.len());
        let n = room.min(self.retry.len());
        self.retry.drain(..n).collect()
    }

    /// The call for `batch` started as `token`.
    pub fn sent(&mut self, token: u32, batch: Batch) {
        self.in_flight.insert(token, batch);
    }

    /// Keeps a batch that could not go (no room, or the host refused the
    /// call) to send again. When the retry queue is full its oldest batch
    /// gives way; returns how many records were dropped for it.
    pub fn keep(&mut self, batch: Batch) -> u64 {
        let mut dropped = 0;
        if self.retry.len() >= MAX_RETRY_BATCHES
            && let Some(old) = self.retry.pop_front()
        {
            dropped = old.records;
        }
        self.retry.push_back(batch);
        dropped
    }

    /// Whether `token` is one of these batches' calls.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.contains_key(&token)
    }

    /// The control plane answered call `token` with gRPC `status`. `None`
    /// when the token is not ours.
    pub fn answered(&mut self, token: u32, status: u32) -> Option<Answered> {
        let batch = self.in_flight.remove(&token)?;
        if status == 0 {
            return Some(Answered::Delivered);
        }
        Some(Answered::Refused {
            dropped: self.keep(batch),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn waiting(&self) -> usize {
        self.retry.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(records: u64) -> Batch {
        Batch {
            bytes: vec![records as u8],
            records,
        }
    }

    #[test]
    fn a_report_is_due_once_per_interval() {
        let mut s = Schedule::default();
        assert!(s.due(5_000_000, 2_000), "the first one is due at once");
        assert!(!s.due(6_999_999, 2_000));
        assert!(s.due(7_000_000, 2_000));
        // A late tick restarts the interval from itself.
        assert!(s.due(9_500_000, 2_000));
        assert!(!s.due(11_000_000, 2_000));
        assert!(s.due(11_500_000, 2_000));
    }

    #[test]
    fn the_record_queue_drops_and_counts_beyond_its_cap() {
        let mut q = RecordQueue::new(2);
        assert!(q.is_idle());
        assert!(q.push(1));
        assert!(q.push(2));
        assert!(!q.push(3));
        q.count_dropped(4);
        assert_eq!(q.take_batch(), vec![1, 2]);
        assert_eq!(q.take_dropped(), 5);
        assert_eq!(q.take_dropped(), 0);
        assert!(q.is_idle());
    }

    #[test]
    fn a_batch_takes_at_most_records_per_batch() {
        let mut q = RecordQueue::new(100);
        for i in 0..RECORDS_PER_BATCH + 3 {
            q.push(i);
        }
        assert_eq!(q.take_batch().len(), RECORDS_PER_BATCH);
        assert_eq!(q.take_batch(), vec![32, 33, 34]);
    }

    #[test]
    fn refused_batches_are_kept_and_the_oldest_gives_way() {
        let mut o = Outbox::default();
        for token in 0..MAX_RETRY_BATCHES as u32 + 1 {
            o.sent(token, batch(u64::from(token) + 1));
        }
        let mut dropped = 0;
        for token in 0..MAX_RETRY_BATCHES as u32 {
            assert_eq!(
                o.answered(token, 14),
                Some(Answered::Refused { dropped: 0 })
            );
        }
        // The ninth refusal pushes out the first batch (1 record).
        match o.answered(MAX_RETRY_BATCHES as u32, 14) {
            Some(Answered::Refused { dropped: d }) => dropped += d,
            other => panic!("{other:?}"),
        }
        assert_eq!(dropped, 1);
        assert_eq!(o.waiting(), MAX_RETRY_BATCHES);
        assert_eq!(o.answered(99, 0), None, "not our token");
        let again = o.retries();
        assert_eq!(again.first().map(|b| b.records), Some(2), "oldest first");
        assert_eq!(again.len(), MAX_RETRY_BATCHES);
    }

    #[test]
    fn retries_are_bounded_by_room_in_flight() {
        let mut o = Outbox::default();
        for t in 0..MAX_IN_FLIGHT as u32 - 2 {
            o.sent(t, batch(1));
        }
        for _ in 0..5 {
            o.keep(batch(1));
        }
        assert_eq!(o.retries().len(), 2);
        assert_eq!(o.waiting(), 3);
    }

    #[test]
    fn a_delivered_batch_is_forgotten() {
        let mut o = Outbox::default();
        o.sent(7, batch(3));
        assert!(o.owns(7));
        assert_eq!(o.answered(7, 0), Some(Answered::Delivered));
        assert!(!o.owns(7));
        assert_eq!(o.waiting(), 0);
    }

    proptest! {
        /// Whatever the host and the control plane do, the outbox stays
        /// within its bounds and every record is either in a batch we still
        /// hold, delivered, or counted as dropped.
        #[test]
        fn records_are_never_lost_silently(ops in proptest::collection::vec((0u8..4, 1u64..5), 0..200)) {
            let mut o = Outbox::default();
            let mut next_token = 0u32;
            let (mut made, mut delivered, mut dropped) = (0u64, 0u64, 0u64);
            for (op, records) in ops {
                match op {
                    0 => {
                        made += records;
                        let b = batch(records);
                        if o.has_room() { o.sent(next_token, b); next_token += 1; } else { dropped += o.keep(b); }
                    }
                    1 => {
                        for b in o.retries() { o.sent(next_token, b); next_token += 1; }
                    }
                    2 | 3 => {
                        let Some(&token) = o.in_flight.keys().next() else { continue };
                        let held = o.in_flight.get(&token).map_or(0, |b| b.records);
                        match o.answered(token, u32::from(op == 3)) {
                            Some(Answered::Delivered) => delivered += held,
                            Some(Answered::Refused { dropped: d }) => dropped += d,
                            None => prop_assert!(false, "token {token} was ours"),
                        }
                    }
                    _ => unreachable!(),
                }
                prop_assert!(o.in_flight() <= MAX_IN_FLIGHT);
                prop_assert!(o.waiting() <= MAX_RETRY_BATCHES);
                let held: u64 = o.in_flight.values().chain(o.retry.iter()).map(|b| b.records).sum();
                prop_assert_eq!(made, held + delivered + dropped);
            }
        }
    }
}
