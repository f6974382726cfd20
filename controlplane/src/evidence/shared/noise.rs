//! Learned noise and shadow resets across replicas.
//!
//! # Learned noise
//! What A/A calibration teaches is kept in PostgreSQL, so it survives every
//! replica's restart and every replica judges with the same noise. Each
//! replica owns its rows in `learned_noise`, one per route: everything its
//! *own* Envoys' calibration taught ([`Learned`]). It writes the row whole
//! (its last value plus what its book learned since), so a write retried
//! after a lost answer gives the same row, not a double count. Batches read
//! back from other replicas teach nothing here
//! ([`ShadowBook::ingest_read_back`]): their learning arrives in their
//! replica's row. A route's learned noise is the sum of every replica's row
//! at the route's current noise epoch; [`NoiseSync`] reads the rows whose
//! `rev` changed each round and sets the sum in the book
//! ([`ShadowBook::set_learned`]).
//!
//! # Resets
//! `DELETE /v1/shadow/noise/{route}` and `DELETE /v1/shadow/routes/{route}`
//! act on the whole fleet, whichever replica answers: [`ShadowResets::reset`]
//! bumps the route's epoch in `shadow_resets` (a noise reset deletes the
//! older rows in the same transaction) and applies it to this replica's
//! book at once; every other replica applies an epoch newer than the last
//! it applied within a round ([`super::PERIOD`]). Learning still pending
//! from before the reset is dropped, never written under the new epoch.
//! Batches shipped before a live reset are left out of that route's live
//! counts when read later ([`NoiseSync::cut_live`]), so a replica that
//! starts after the reset does not count them again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use understudy_proto::v1::ReportBatch;

use crate::evidence::shadow::{Learned, ShadowBook};
use crate::pg::{Db, PgError};

/// Rows of `learned_noise` and `shadow_resets` a replica keeps in memory;
/// beyond it (a runaway fleet or route count) the rest wait for room.
pub const MAX_ROWS: usize = 65_536;

/// What a fleet-wide reset starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetKind {
    /// A route's learned noise (calibration).
    Noise,
    /// A route's live counts and top paths.
    Live,
}

impl ResetKind {
    fn as_str(self) -> &'static str {
        match self {
            ResetKind::Noise => "noise",
            ResetKind::Live => "live",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "noise" => Some(ResetKind::Noise),
            "live" => Some(ResetKind::Live),
            _ => None,
        }
    }
}

/// The reset epochs this replica has applied, and its learning not yet
/// written: one lock, so a reset and the hand-over of pending learning
/// never interleave.
#[derive(Debug, Default)]
struct Applied {
    epochs: HashMap<(String, ResetKind), i64>,
    /// Learning taken from the book and not yet in this replica's row,
    /// with the noise epoch it was learned under.
    pending: HashMap<String, (i64, Learned)>,
    /// Per route, when its live counts were last reset: batches shipped
    /// before then are not live evidence any more.
    live_cuts: HashMap<String, i64>,
}

impl Applied {
    fn epoch(&self, route: &str, kind: ResetKind) -> i64 {
        self.epochs
            .get(&(route.to_owned(), kind))
            .copied()
            .unwrap_or(0)
    }

    /// Applies `epoch` (a reset made at `at_ms`) to the book if it is newer
    /// than the one applied.
    fn apply(
        &mut self,
        shadow: &ShadowBook,
        (route, kind): (&str, ResetKind),
        (epoch, at_ms): (i64, i64),
    ) -> bool {
        if epoch <= self.epoch(route, kind) {
            return false;
        }
        if self.epochs.len() >= MAX_ROWS && !self.epochs.contains_key(&(route.to_owned(), kind)) {
            return false;
        }
        self.epochs.insert((route.to_owned(), kind), epoch);
        match kind {
            ResetKind::Noise => {
                self.pending.remove(route);
                shadow.forget_noise(route);
            }
            ResetKind::Live => {
                self.live_cuts.insert(route.to_owned(), at_ms);
                shadow.reset_live(route);
            }
        }
        true
    }
}

fn lock(applied: &Mutex<Applied>) -> MutexGuard<'_, Applied> {
    // Map updates only; a panic mid-way leaves a usable map.
    applied.lock().unwrap_or_else(|p| p.into_inner())
}

/// The API's side: fleet-wide resets of a route's shadow measurement.
#[derive(Clone)]
pub struct ShadowResets {
    db: Arc<Db>,
    applied: Arc<Mutex<Applied>>,
    shadow: Arc<ShadowBook>,
}

impl std::fmt::Debug for ShadowResets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowResets").finish_non_exhaustive()
    }
}

impl ShadowResets {
    /// Commits a reset of `route` for every replica and applies it here;
    /// the others apply it within a round. Blocks on the database (call it
    /// off the async threads). The new epoch.
    pub fn reset(&self, route: &str, kind: ResetKind, now_ms: u64) -> Result<i64, PgError> {
        let name = route.to_owned();
        let at = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let epoch = self.db.call(move |c| {
            let mut tx = c.transaction()?;
            let epoch: i64 = tx
                .query_one(
                    "INSERT INTO shadow_resets (route, kind, epoch, at_ms) VALUES ($1, $2, 1, $3) \
                     ON CONFLICT (route, kind) DO UPDATE \
                     SET epoch = shadow_resets.epoch + 1, at_ms = EXCLUDED.at_ms \
                     RETURNING epoch",
                    &[&name, &kind.as_str(), &at],
                )?
                .get(0);
            if kind == ResetKind::Noise {
                tx.execute(
                    "DELETE FROM learned_noise WHERE route = $1 AND epoch < $2",
                    &[&name, &epoch],
                )?;
            }
            tx.commit()?;
            Ok(epoch)
        })?;
        lock(&self.applied).apply(&self.shadow, (route, kind), (epoch, at));
        Ok(epoch)
    }
}

/// A `learned_noise` row as last read or written.
#[derive(Debug, Clone)]
struct Row {
    epoch: i64,
    rev: i64,
    learned: Learned,
}

/// The evidence thread's side: applies resets, writes this replica's
/// learning and reads every replica's back (module docs).
pub struct NoiseSync {
    me: String,
    shadow: Arc<ShadowBook>,
    applied: Arc<Mutex<Applied>>,
    /// Every replica's rows, this one's included, keyed (replica, route).
    rows: HashMap<(String, String), Row>,
    /// This replica's own rows were read once: only then is a write the
    /// old value plus what was learned (a restarted replica continues).
    read_once: bool,
}

impl std::fmt::Debug for NoiseSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseSync")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl NoiseSync {
    /// Shares `shadow`'s learning as replica `me` (from now on the book
    /// learns from this replica's own Envoys only); `db` is the API's
    /// connection for resets.
    pub fn new(me: &str, shadow: Arc<ShadowBook>, db: Db) -> (Self, ShadowResets) {
        shadow.share_learning();
        let applied = Arc::new(Mutex::new(Applied::default()));
        let resets = ShadowResets {
            db: Arc::new(db),
            applied: Arc::clone(&applied),
            shadow: Arc::clone(&shadow),
        };
        let sync = Self {
            me: me.to_owned(),
            shadow,
            applied,
            rows: HashMap::new(),
            read_once: false,
        };
        (sync, resets)
    }

    /// Leaves out of `batch` (shipped at `at_ms` by another replica) the
    /// live parts of routes whose live counts were reset since.
    pub fn cut_live(&self, batch: &mut ReportBatch, at_ms: i64) {
        let applied = lock(&self.applied);
        if applied.live_cuts.is_empty() {
            return;
        }
        let counts = |route: &str| applied.live_cuts.get(route).is_none_or(|cut| at_ms > *cut);
        batch.routes.retain(|c| c.calibration || counts(&c.route));
        batch
            .mismatches
            .retain(|m| m.calibration || counts(&m.route));
    }

    /// One round: resets, then every replica's rows, then this replica's
    /// new learning; the book gets the sum of each route that changed.
    pub fn round(&mut self, db: &Db) -> Result<(), PgError> {
        let mut changed = self.apply_resets(db)?;
        changed.extend(self.read(db)?);
        self.read_once = true;
        let written = self.write(db);
        changed.extend(written.0);
        self.publish(&changed);
        written.1
    }

    fn apply_resets(&mut self, db: &Db) -> Result<BTreeSet<String>, PgError> {
        let limit = i64::try_from(MAX_ROWS).unwrap_or(i64::MAX);
        let rows: Vec<(String, String, i64, i64)> = db.call(move |c| {
            Ok(c.query(
                "SELECT route, kind, epoch, at_ms FROM shadow_resets ORDER BY route, kind LIMIT $1",
                &[&limit],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
        })?;
        let mut applied = lock(&self.applied);
        let mut changed = BTreeSet::new();
        for (route, kind, epoch, at_ms) in rows {
            let Some(kind) = ResetKind::parse(&kind) else {
                continue;
            };
            if applied.apply(&self.shadow, (&route, kind), (epoch, at_ms))
                && kind == ResetKind::Noise
            {
                changed.insert(route);
            }
        }
        Ok(changed)
    }

    /// Reads the rows whose `rev` changed (and forgets deleted ones); the
    /// routes they belong to.
    fn read(&mut self, db: &Db) -> Result<BTreeSet<String>, PgError> {
        let limit = i64::try_from(MAX_ROWS).unwrap_or(i64::MAX);
        let revs: Vec<(String, String, i64, i64)> = db.call(move |c| {
            Ok(c.query(
                "SELECT replica, route, epoch, rev FROM learned_noise \
                 ORDER BY replica, route LIMIT $1",
                &[&limit],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
        })?;
        let mut changed = BTreeSet::new();
        let listed: BTreeSet<(String, String)> = revs
            .iter()
            .map(|(replica, route, ..)| (replica.clone(), route.clone()))
            .collect();
        self.rows.retain(|key, _| {
            let keep = listed.contains(key);
            if !keep {
                changed.insert(key.1.clone());
            }
            keep
        });
        // This replica's own rows are read once, at start: after that it
        // is their only writer, and a write whose answer was lost must be
        // written again from the old value, not from its own result.
        let stale: Vec<(String, String)> = revs
            .into_iter()
            .filter(|(replica, route, epoch, rev)| {
                (!self.read_once || *replica != self.me)
                    && self
                        .rows
                        .get(&(replica.clone(), route.clone()))
                        .is_none_or(|r| r.rev != *rev || r.epoch != *epoch)
            })
            .map(|(replica, route, ..)| (replica, route))
            .collect();
        if stale.is_empty() {
            return Ok(changed);
        }
        let (replicas, routes): (Vec<String>, Vec<String>) = stale.into_iter().unzip();
        let fetched: Vec<(String, String, i64, i64, serde_json::Value)> = db.call(move |c| {
            Ok(c.query(
                "SELECT n.replica, n.route, n.epoch, n.rev, n.learned FROM learned_noise n \
                 JOIN unnest($1::text[], $2::text[]) AS s(replica, route) \
                 ON s.replica = n.replica AND s.route = n.route",
                &[&replicas, &routes],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
        })?;
        for (replica, route, epoch, rev, value) in fetched {
            let learned = match serde_json::from_value::<Learned>(value) {
                Ok(l) if l.is_bounded() => l,
                // One bad row must not stop the fleet's learning.
                Ok(_) => {
                    tracing::warn!(replica, route, "a learned-noise row is over the bounds");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(replica, route, error = %e, "a learned-noise row does not decode");
                    continue;
                }
            };
            if self.rows.len() >= MAX_ROWS
                && !self.rows.contains_key(&(replica.clone(), route.clone()))
            {
                continue;
            }
            changed.insert(route.clone());
            self.rows.insert(
                (replica, route),
                Row {
                    epoch,
                    rev,
                    learned,
                },
            );
        }
        Ok(changed)
    }

    /// Adds what the book learned since the last round to this replica's
    /// rows; the routes written, and the first error (what was not written
    /// stays pending for the next round).
    fn write(&mut self, db: &Db) -> (BTreeSet<String>, Result<(), PgError>) {
        let mut written = BTreeSet::new();
        if !self.read_once {
            return (written, Ok(()));
        }
        // Take and tag under the lock: a reset between the two would
        // otherwise let learning from before it be written after it.
        let work: Vec<(String, i64, Learned)> = {
            let mut applied = lock(&self.applied);
            for (route, learned) in self.shadow.take_learned() {
                let epoch = applied.epoch(&route, ResetKind::Noise);
                let slot = applied
                    .pending
                    .entry(route)
                    .or_insert_with(|| (epoch, Learned::default()));
                if slot.0 != epoch {
                    *slot = (epoch, Learned::default());
                }
                slot.1.add(&learned);
            }
            applied
                .pending
                .iter()
                .map(|(route, (epoch, l))| (route.clone(), *epoch, l.clone()))
                .collect()
        };
        for (route, epoch, learned) in work {
            let key = (self.me.clone(), route.clone());
            let mut row = match self.rows.get(&key) {
                Some(r) if r.epoch == epoch => r.learned.clone(),
                _ => Learned::default(),
            };
            row.add(&learned);
            let value = match serde_json::to_value(&row) {
                Ok(v) => v,
                Err(e) => return (written, Err(PgError::Db(e.to_string()))),
            };
            let (me, name) = (self.me.clone(), route.clone());
            let rev = db.call(move |c| {
                Ok(c.query_one(
                    "INSERT INTO learned_noise (replica, route, epoch, rev, learned) \
                     VALUES ($1, $2, $3, 1, $4) ON CONFLICT (replica, route) DO UPDATE \
                     SET epoch = EXCLUDED.epoch, rev = learned_noise.rev + 1, \
                         learned = EXCLUDED.learned \
                     RETURNING rev",
                    &[&me, &name, &epoch, &value],
                )?
                .get::<_, i64>(0))
            });
            let rev = match rev {
                Ok(rev) => rev,
                Err(e) => return (written, Err(e)),
            };
            let mut applied = lock(&self.applied);
            // A reset that came meanwhile dropped this learning already.
            if applied
                .pending
                .get(&route)
                .is_some_and(|(e, l)| *e == epoch && *l == learned)
            {
                applied.pending.remove(&route);
            }
            drop(applied);
            self.rows.insert(
                key,
                Row {
                    epoch,
                    rev,
                    learned: row,
                },
            );
            written.insert(route);
        }
        (written, Ok(()))
    }

    /// Sets each route's sum (rows at its current epoch, plus learning not
    /// yet written) in the book.
    fn publish(&self, routes: &BTreeSet<String>) {
        let applied = lock(&self.applied);
        let now = SystemTime::now();
        for route in routes {
            let epoch = applied.epoch(route, ResetKind::Noise);
            let mut sum = Learned::default();
            for ((_, r), row) in &self.rows {
                if r == route && row.epoch == epoch {
                    sum.add(&row.learned);
                }
            }
            if let Some((e, l)) = applied.pending.get(route)
                && *e == epoch
            {
                sum.add(l);
            }
            self.shadow.set_learned(route, &sum, now);
        }
    }
}
