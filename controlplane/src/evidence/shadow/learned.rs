//! What A/A calibration taught about one route, in the form replicas share
//! it ([`Learned`]): the calibration totals and, per differing path, its
//! counts. Samples are left out: they point at one replica's stored
//! records, which the others do not have.
//!
//! With replicas ([`super::ShadowBook::share_learning`]) a replica's book
//! learns from its own Envoys' calibration only; what it learned since it
//! last handed it over waits in the route's `pending` [`Learned`], which
//! [`crate::evidence::shared`] adds to this replica's row in the database.
//! The book's calibration view is then the sum of every replica's row plus
//! what is still pending ([`super::ShadowBook::set_learned`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use understudy_proto::v1::{MismatchRecord, RouteCounts};

use super::{
    MAX_PATH_CHARS, MAX_PATHS, MAX_SKIP_REASONS, PathStats, PathTable, Totals, note_paths,
};

/// One path's counts, as [`PathStats`] without samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCounts {
    pub count: u64,
    pub serious: u64,
    pub noise: u64,
    pub unexpected: u64,
}

impl PathCounts {
    fn of(p: &PathStats) -> Self {
        Self {
            count: p.count,
            serious: p.serious,
            noise: p.noise,
            unexpected: p.unexpected,
        }
    }

    fn add(&mut self, o: &PathCounts) {
        self.count = self.count.saturating_add(o.count);
        self.serious = self.serious.saturating_add(o.serious);
        self.noise = self.noise.saturating_add(o.noise);
        self.unexpected = self.unexpected.saturating_add(o.unexpected);
    }
}

/// What calibration taught about one route: its totals and at most
/// [`MAX_PATHS`] paths.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Learned {
    pub(super) totals: Totals,
    pub(super) paths: BTreeMap<String, PathCounts>,
}

impl Learned {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Calibration pairs compared (as the book counts them).
    pub fn compared(&self) -> u64 {
        self.totals.compared
    }

    /// Calibration records received.
    pub fn records(&self) -> u64 {
        self.totals.records
    }

    /// How many records differed at `path`.
    pub fn differed_at(&self, path: &str) -> u64 {
        self.paths.get(path).map_or(0, |p| p.count)
    }

    /// Within the bounds the book keeps; a row read from the database that
    /// is not is refused rather than trusted.
    pub fn is_bounded(&self) -> bool {
        self.paths.len() <= MAX_PATHS
            && self.totals.skipped.len() <= MAX_SKIP_REASONS + 1
            && self
                .paths
                .keys()
                .all(|p| p.chars().count() <= MAX_PATH_CHARS + 1)
    }

    /// Adds `o`, then keeps the [`MAX_PATHS`] paths with the highest counts
    /// (ties: the first by name), as the book's own table would.
    pub fn add(&mut self, o: &Learned) {
        self.totals.add(&o.totals);
        for (path, counts) in &o.paths {
            self.paths.entry(path.clone()).or_default().add(counts);
        }
        self.cap();
    }

    fn cap(&mut self) {
        if self.paths.len() <= MAX_PATHS {
            return;
        }
        let mut by_count: Vec<(u64, String)> = self
            .paths
            .iter()
            .map(|(k, v)| (v.count, k.clone()))
            .collect();
        by_count.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, path) in by_count.into_iter().skip(MAX_PATHS) {
            self.paths.remove(&path);
        }
    }

    /// One worker's calibration counters.
    pub(super) fn note_counts(&mut self, c: &RouteCounts) {
        self.totals.add_counts(c);
    }

    /// One calibration record: counted once, and once per differing path,
    /// by the book's own rule ([`note_paths`]; calibration has no learned
    /// rates of its own to apply, and samples are not shared).
    pub(super) fn note_record(&mut self, record: &MismatchRecord) {
        let mut table = PathTable::default();
        let unlearned = vec![None; record.differences.len()];
        note_paths(&mut table, (MAX_PATHS, 0), record, &unlearned, 0);
        let mut one = Learned {
            totals: Totals::default(),
            paths: table
                .paths
                .iter()
                .map(|(path, p)| (path.clone(), PathCounts::of(p)))
                .collect(),
        };
        one.totals.add_record(false, false);
        self.add(&one);
    }

    /// The book's table for these counts, keeping the samples `old` has for
    /// the same paths (this replica's own records).
    pub(super) fn table(&self, old: &PathTable) -> PathTable {
        let paths = self
            .paths
            .iter()
            .map(|(path, c)| {
                let kept = old.paths.get(path);
                let stats = PathStats {
                    count: c.count,
                    serious: c.serious,
                    noise: c.noise,
                    unexpected: c.unexpected,
                    last_seen: kept.map_or(0, |p| p.last_seen),
                    samples: kept.map(|p| p.samples.clone()).unwrap_or_default(),
                };
                (path.clone(), stats)
            })
            .collect();
        PathTable { paths }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_proto::v1::Difference;

    fn record(paths: &[&str]) -> MismatchRecord {
        MismatchRecord {
            route: "r".into(),
            calibration: true,
            differences: paths
                .iter()
                .map(|p| Difference {
                    path: (*p).to_owned(),
                    unexpected: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_counts_once_per_path_and_sums_add() {
        let mut a = Learned::default();
        a.note_record(&record(&["/id", "/id", "/at"]));
        a.note_counts(&RouteCounts {
            route: "r".into(),
            compared: 10,
            ..Default::default()
        });
        assert_eq!((a.compared(), a.records()), (10, 1));
        assert_eq!(a.differed_at("/id"), 1);
        let mut b = Learned::default();
        b.note_record(&record(&["/id"]));
        b.add(&a);
        assert_eq!(
            (b.compared(), b.records(), b.differed_at("/id")),
            (10, 2, 2)
        );
        assert_eq!(b.paths["/id"].unexpected, 2);
        // The database's form gives back the same value.
        let text = serde_json::to_value(&b).unwrap();
        assert_eq!(serde_json::from_value::<Learned>(text).unwrap(), b);
    }

    #[test]
    fn the_sum_keeps_the_most_counted_paths() {
        let mut a = Learned::default();
        for i in 0..MAX_PATHS {
            a.note_record(&record(&[&format!("/p{i}")]));
        }
        let mut b = Learned::default();
        b.note_record(&record(&["/hot"]));
        b.note_record(&record(&["/hot"]));
        a.add(&b);
        assert_eq!(a.paths.len(), MAX_PATHS);
        assert_eq!(a.differed_at("/hot"), 2);
        assert!(a.is_bounded());
    }

    #[test]
    fn an_unbounded_row_is_refused() {
        let mut a = Learned::default();
        for i in 0..=MAX_PATHS {
            a.paths.insert(format!("/p{i}"), PathCounts::default());
        }
        assert!(!a.is_bounded());
    }
}
