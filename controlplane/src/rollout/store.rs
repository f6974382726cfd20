//! Where rollouts live: an embedded redb database, so that after a restart
//! (or a SIGKILL) every rollout resumes exactly where it was.
//!
//! Why redb rather than SQLite: the data is two small keyed tables (a
//! rollout's current record, and its append-only audit log), read whole and
//! written in one transaction per transition; nothing is queried
//! relationally. redb is pure Rust (no C toolchain in the build, nothing to
//! link), ACID with copy-on-write pages, and crash-safe by default: a
//! committed transaction survives SIGKILL, an uncommitted one leaves no trace.
//!
//! Records are stored as JSON, so a human can read a dump and old records
//! stay readable when fields are added (they default).
//!
//! With replicas ([`RolloutStore::shared`]) the same two tables live in
//! PostgreSQL instead, and every write names the leader's lease: the
//! database refuses it once the term has passed (the fence triggers of the
//! migration), and announces it (`NOTIFY understudy, 'rollout:<id>'`) so
//! followers reload what they show.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::pg::{self, Db, Fence, PgError};

const ROLLOUTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("rollouts");
/// Keyed by (rollout id, sequence number), so one rollout's log is a range.
const AUDIT: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("audit");

#[derive(Debug, thiserror::Error)]
pub enum RolloutStoreError {
    /// Replicas: the database failed or refused the write (not the leader).
    #[error("rollout database: {0}")]
    Shared(#[from] PgError),
    #[error("rollout database: {0}")]
    Db(#[from] redb::Error),
    #[error("rollout database: a stored record does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    /// The database file could not be created with its mode.
    #[error("rollout database: {0}")]
    Io(std::io::Error),
}

fn db_err(e: impl Into<redb::Error>) -> RolloutStoreError {
    RolloutStoreError::Db(e.into())
}

/// Appends encoded entries after the last of `id`'s log.
fn append(
    log: &mut redb::Table<'_, (&'static str, u64), &'static [u8]>,
    id: &str,
    entries: &[Vec<u8>],
) -> Result<(), RolloutStoreError> {
    let next = match log
        .range((id, 0)..=(id, u64::MAX))
        .map_err(db_err)?
        .next_back()
    {
        Some(last) => last.map_err(db_err)?.0.value().1 + 1,
        None => 0,
    };
    for (seq, e) in (next..).zip(entries) {
        log.insert((id, seq), e.as_slice()).map_err(db_err)?;
    }
    Ok(())
}

pub struct RolloutStore {
    backend: Backend,
}

enum Backend {
    Redb(Database),
    /// Replicas: PostgreSQL, writes made under `fence`'s lease.
    Shared {
        db: Db,
        fence: Fence,
    },
}

impl std::fmt::Debug for RolloutStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutStore").finish_non_exhaustive()
    }
}

impl RolloutStore {
    /// Opens (or creates) the database file.
    /// A new file is created with mode 0600 (it holds every rollout's
    /// audit log), and an existing one is set to it.
    pub fn open(path: &Path) -> Result<Self, RolloutStoreError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(RolloutStoreError::Io)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(RolloutStoreError::Io)?;
        }
        let db = Database::create(path).map_err(db_err)?;
        // Create both tables up front so reads never meet a missing table.
        Self::init(db)
    }

    /// Replicas: the rollouts in PostgreSQL (`db`, a connection of their
    /// own); each write is made under the lease `fence` names.
    pub fn shared(db: Db, fence: Fence) -> Self {
        Self {
            backend: Backend::Shared { db, fence },
        }
    }

    /// Whether a write now would be refused as not the leader's (replicas).
    pub fn may_write(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => true,
            Backend::Shared { fence, .. } => fence().is_some(),
        }
    }

    /// A database that lives in memory only (tests, trials).
    pub fn in_memory() -> Result<Self, RolloutStoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(db_err)?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, RolloutStoreError> {
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(ROLLOUTS).map_err(db_err)?;
        txn.open_table(AUDIT).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self {
            backend: Backend::Redb(db),
        })
    }

    /// Writes a rollout's record and appends `audit` entries to its log, in
    /// one transaction: a transition is stored whole or not at all.
    pub fn save<R: Serialize, A: Serialize>(
        &self,
        id: &str,
        record: &R,
        audit: &[A],
    ) -> Result<(), RolloutStoreError> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Shared { db, fence } => {
                let record = serde_json::to_value(record)?;
                let entries = audit
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<Vec<_>, _>>()?;
                return shared_write(db, fence, id, Some(record), entries);
            }
        };
        let bytes = serde_json::to_vec(record)?;
        let entries = audit
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut rollouts = txn.open_table(ROLLOUTS).map_err(db_err)?;
            rollouts.insert(id, bytes.as_slice()).map_err(db_err)?;
            let mut log = txn.open_table(AUDIT).map_err(db_err)?;
            append(&mut log, id, &entries)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Appends `audit` entries to a rollout's log without touching its
    /// record: what happened around it (a webhook delivered or not).
    pub fn append_audit<A: Serialize>(
        &self,
        id: &str,
        audit: &[A],
    ) -> Result<(), RolloutStoreError> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Shared { db, fence } => {
                let entries = audit
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<Vec<_>, _>>()?;
                return shared_write(db, fence, id, None, entries);
            }
        };
        let entries = audit
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut log = txn.open_table(AUDIT).map_err(db_err)?;
            append(&mut log, id, &entries)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Every stored rollout record.
    pub fn load_all<R: DeserializeOwned>(&self) -> Result<Vec<R>, RolloutStoreError> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Shared { db, .. } => {
                return shared_read(db, "SELECT record FROM rollouts ORDER BY id", None);
            }
        };
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(ROLLOUTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// One rollout's audit log, oldest first.
    pub fn audit<A: DeserializeOwned>(&self, id: &str) -> Result<Vec<A>, RolloutStoreError> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Shared { db, .. } => {
                return shared_read(
                    db,
                    "SELECT entry FROM audit WHERE rollout = $1 ORDER BY seq",
                    Some(id),
                );
            }
        };
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(AUDIT).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.range((id, 0)..=(id, u64::MAX)).map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }
}

/// The JSON documents `sql` selects (one column; `$1` is `param` if given), decoded.
fn shared_read<T: DeserializeOwned>(
    db: &Db,
    sql: &'static str,
    param: Option<&str>,
) -> Result<Vec<T>, RolloutStoreError> {
    let param = param.map(str::to_owned);
    let rows: Vec<serde_json::Value> = db.call(move |c| {
        let rows = match &param {
            Some(p) => c.query(sql, &[p])?,
            None => c.query(sql, &[])?,
        };
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })?;
    Ok(rows
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()?)
}

/// One fenced transaction: the record (if any) and the audit entries after
/// the log's last, announced to the other replicas.
fn shared_write(
    db: &Db,
    fence: &Fence,
    id: &str,
    record: Option<serde_json::Value>,
    entries: Vec<serde_json::Value>,
) -> Result<(), RolloutStoreError> {
    let term = pg::fence_term(fence)?;
    let id = id.to_owned();
    db.call(move |c| {
        let mut tx = c.transaction()?;
        pg::set_fence(&mut tx, &term)?;
        if let Some(record) = &record {
            tx.execute(
                "INSERT INTO rollouts (id, record) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&id, record],
            )?;
        }
        if !entries.is_empty() {
            let next: i64 = tx
                .query_one(
                    "SELECT coalesce(max(seq) + 1, 0) FROM audit WHERE rollout = $1",
                    &[&id],
                )?
                .get(0);
            for (seq, entry) in (next..).zip(&entries) {
                tx.execute(
                    "INSERT INTO audit (rollout, seq, entry) VALUES ($1, $2, $3)",
                    &[&id, &seq, entry],
                )?;
            }
        }
        pg::notify(&mut tx, &format!("rollout:{id}"))?;
        tx.commit()?;
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_logs_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollouts.redb");
        {
            let s = RolloutStore::open(&path).unwrap();
            s.save(
                "r1",
                &serde_json::json!({"step": 1}),
                &["created", "step 1"],
            )
            .unwrap();
            s.save("r2", &serde_json::json!({"step": 0}), &["created"])
                .unwrap();
            s.save("r1", &serde_json::json!({"step": 2}), &["step 2"])
                .unwrap();
            s.save::<_, String>("r1", &serde_json::json!({"step": 2}), &[])
                .unwrap();
        }
        let s = RolloutStore::open(&path).unwrap();
        let all: Vec<serde_json::Value> = s.load_all().unwrap();
        assert_eq!(
            all,
            [
                serde_json::json!({"step": 2}),
                serde_json::json!({"step": 0})
            ]
        );
        let log: Vec<String> = s.audit("r1").unwrap();
        assert_eq!(log, ["created", "step 1", "step 2"]);
        let log: Vec<String> = s.audit("r2").unwrap();
        assert_eq!(log, ["created"]);
        assert!(s.audit::<String>("nope").unwrap().is_empty());
    }
}
