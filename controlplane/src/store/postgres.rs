//! The desired state's row in PostgreSQL (replicas): one JSON document with
//! a version, read and written by [`super::Store`] only.
//!
//! A change is two calls on the store's own connection: [`lock_current`]
//! opens a transaction and locks the row (reading the newest document, so a
//! change always applies to what another replica last committed), then
//! [`commit`] writes the new document under a compare-and-swap on the
//! version, announces it (`NOTIFY understudy, 'state'`) and commits. The
//! compare-and-swap keeps a change safe even if the connection was lost and
//! dialled again between the two calls (the lock is then gone): a document
//! written meanwhile makes it a conflict, never a lost update.

use serde_json::Value;

use crate::model::ProbeKey;
use crate::pg::{self, Db, PgError, Term};

/// Writes `initial` as version 1 unless a document exists; returns the
/// stored (version, document) either way.
pub fn load_or_init(db: &Db, initial: Value) -> Result<(i64, Value), PgError> {
    db.call(move |c| {
        c.execute(
            "INSERT INTO desired_state (id, version, doc) VALUES (1, 1, $1) ON CONFLICT (id) DO NOTHING",
            &[&initial],
        )?;
        let row = c.query_one("SELECT version, doc FROM desired_state WHERE id = 1", &[])?;
        Ok((row.get(0), row.get(1)))
    })
}

/// The newest document if its version is above `known`.
pub fn newer_than(db: &Db, known: i64) -> Result<Option<(i64, Value)>, PgError> {
    db.call(move |c| {
        let row = c.query_opt(
            "SELECT version, doc FROM desired_state WHERE id = 1 AND version > $1",
            &[&known],
        )?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    })
}

/// Opens a transaction holding the row's lock; the stored (version, document).
pub fn lock_current(db: &Db) -> Result<(i64, Value), PgError> {
    db.call(|c| {
        c.batch_execute("BEGIN")?;
        match c.query_one(
            "SELECT version, doc FROM desired_state WHERE id = 1 FOR UPDATE",
            &[],
        ) {
            Ok(row) => Ok((row.get(0), row.get(1))),
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK");
                Err(e.into())
            }
        }
    })
}

/// Why [`commit`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("another replica changed the desired state at the same moment; retry")]
    Conflict,
    #[error(transparent)]
    Db(#[from] PgError),
}

/// Writes `doc` as the version after `expected` (made under `fence`'s
/// lease when it is the engine's), announces it and commits the
/// transaction [`lock_current`] opened. On any error the transaction is
/// rolled back.
pub fn commit(db: &Db, expected: i64, doc: Value, fence: Option<Term>) -> Result<i64, CommitError> {
    db.call(move |c| {
        let out = (|| -> Result<Option<i64>, PgError> {
            if let Some(term) = &fence {
                pg::set_fence(c, term)?;
            }
            let n = c.execute(
                "UPDATE desired_state SET doc = $1, version = version + 1 WHERE id = 1 AND version = $2",
                &[&doc, &expected],
            )?;
            if n == 0 {
                return Ok(None);
            }
            pg::notify(c, "state")?;
            c.batch_execute("COMMIT")?;
            Ok(Some(expected + 1))
        })();
        match out {
            Ok(Some(v)) => Ok(Ok(v)),
            Ok(None) => {
                let _ = c.batch_execute("ROLLBACK");
                Ok(Err(CommitError::Conflict))
            }
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK");
                Err(e)
            }
        }
    })?
}

/// Ends the transaction [`lock_current`] opened without writing.
pub fn rollback(db: &Db) {
    if let Err(e) = db.call(|c| Ok(c.batch_execute("ROLLBACK")?)) {
        tracing::debug!(error = %e, "rollback of an unchanged desired state");
    }
}

/// The shared probe key: created by the first replica, read by the rest.
pub fn probe_key(db: &Db) -> Result<ProbeKey, PgError> {
    let fresh = ProbeKey::random().as_bytes().to_vec();
    let stored: Vec<u8> = db.call(move |c| {
        c.execute(
            "INSERT INTO probe_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            &[&fresh],
        )?;
        Ok(c.query_one("SELECT key FROM probe_key WHERE id = 1", &[])?
            .get(0))
    })?;
    <[u8; 32]>::try_from(stored.as_slice())
        .map(ProbeKey::from_bytes)
        .map_err(|_| PgError::Db("the stored probe key is not 32 bytes".to_owned()))
}
