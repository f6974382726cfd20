//! PostgreSQL for replicas (`serve --database postgres://...`): the shared
//! home of the desired state, the rollouts and their audit, the leader's
//! lease and the evidence each replica received.
//!
//! # One connection, one thread
//! The stores above are synchronous (they are called under their own locks,
//! on the engine's blocking thread or an API handler), and the `postgres`
//! client runs a small runtime of its own, which must not be started on an
//! async worker. So each [`Db`] is one connection owned by one thread, and
//! callers hand it jobs and wait for the answer with a deadline
//! ([`CALL_TIMEOUT`]). A job sees a live connection: a lost one is dropped
//! and dialled again on the next job, so the database going away and coming
//! back needs no restart. Each user (the desired state, rollouts, the
//! lease, evidence, LISTEN) has its own [`Db`], so an open transaction of one
//! never holds up another.
//!
//! # Schema
//! The binary owns it: `controlplane/migrations/` is embedded and run at
//! connect ([`Db::connect`], under an advisory lock, so replicas starting
//! together migrate once). What each table holds, and the fence that refuses
//! a write from a leader whose term has passed, is documented in the
//! migration itself.

pub mod lease;
pub mod listen;

use std::sync::mpsc;
use std::time::Duration;

use postgres::{Client, Config, NoTls};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// How long a caller waits for one job's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling the database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Statements that run longer are cancelled by the server (a lock wait on a
/// dead peer's transaction must not hold a store forever).
const STATEMENT_TIMEOUT_MS: u32 = 5_000;
/// The advisory lock key migrations run under ("undrstdy").
const MIGRATION_LOCK: i64 = 0x756e_6472_7374_6479;

/// The SQLSTATE the fence raises (see the migration).
pub const FENCE_SQLSTATE: &str = "UF001";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The database refused a write because this replica's lease term has
    /// passed (or it gave none): another replica leads.
    #[error("not the leader: {0}")]
    Fenced(String),
    #[error("database: {0}")]
    Db(String),
    #[error("database: no answer within {0:?}")]
    Timeout(Duration),
    #[error("database: the connection thread has stopped")]
    Gone,
    #[error("database: a stored document does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("database schema migration: {0}")]
    Migrate(String),
}

impl From<postgres::Error> for PgError {
    fn from(e: postgres::Error) -> Self {
        if let Some(db) = e.as_db_error()
            && db.code().code() == FENCE_SQLSTATE
        {
            return Self::Fenced(db.message().to_owned());
        }
        // The source chain says what went wrong (refused, reset, timeout).
        Self::Db(crate::outbound::error_chain(&e))
    }
}

/// A job gets the connection, or why there is none.
type Job = Box<dyn FnOnce(&mut Option<Client>, Option<String>) + Send>;

/// One connection to the database, on its own thread.
pub struct Db {
    jobs: mpsc::Sender<Job>,
    /// Shared by every connection made from this one (it is large).
    config: std::sync::Arc<Config>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

/// Parses a `postgres://` URL (or a `key=value` string) into a config with
/// our timeouts.
pub fn config(url: &str) -> Result<Config, PgError> {
    let mut config: Config = url
        .parse()
        .map_err(|e: postgres::Error| PgError::Db(format!("--database: {e}")))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("understudy");
    }
    Ok(config)
}

impl Db {
    /// Connects (the first connection must succeed), runs the schema
    /// migrations, and starts the connection's thread.
    pub fn connect(url: &str, name: &str) -> Result<Self, PgError> {
        let db = Self::start(std::sync::Arc::new(config(url)?), name);
        // On the connection's thread: the client must not start its
        // runtime on the caller's (maybe async) thread.
        db.call(migrate)?;
        Ok(db)
    }

    /// Another connection to the same database (no migrations: [`Db::connect`] ran them).
    pub fn another(&self, name: &str) -> Self {
        Self::start(std::sync::Arc::clone(&self.config), name)
    }

    fn start(config: std::sync::Arc<Config>, name: &str) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let dial_config = std::sync::Arc::clone(&config);
        let spawned = std::thread::Builder::new()
            .name(format!("pg-{name}"))
            .spawn(move || {
                let mut client: Option<Client> = None;
                while let Ok(job) = rx.recv() {
                    if client.as_ref().is_some_and(Client::is_closed) {
                        client = None;
                    }
                    let mut why = None;
                    if client.is_none() {
                        match dial(&dial_config) {
                            Ok(c) => client = Some(c),
                            Err(e) => why = Some(e.to_string()),
                        }
                    }
                    job(&mut client, why);
                }
            });
        if let Err(e) = spawned {
            // Without the thread every call answers `Gone`.
            tracing::error!(error = %e, "could not start a database thread");
        }
        Self { jobs, config }
    }

    /// Runs `f` on the connection and waits for its answer. A job whose
    /// connection fails is answered with the error, and the next job dials
    /// again.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, PgError> + Send + 'static,
    ) -> Result<T, PgError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client: &mut Option<Client>, why: Option<String>| {
            let out = match client.as_mut() {
                Some(c) => f(c),
                None => Err(PgError::Db(format!(
                    "the database is unreachable: {}",
                    why.unwrap_or_default()
                ))),
            };
            if out.is_err() && client.as_ref().is_some_and(Client::is_closed) {
                *client = None;
            }
            let _ = tx.send(out);
        });
        self.jobs.send(job).map_err(|_| PgError::Gone)?;
        match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(out) => out,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(PgError::Timeout(CALL_TIMEOUT)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(PgError::Gone),
        }
    }

    /// The connection settings, for a LISTEN connection of its own.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// Dials the database with our session settings.
pub fn dial(config: &Config) -> Result<Client, PgError> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!(
        "SET statement_timeout = {STATEMENT_TIMEOUT_MS}; SET lock_timeout = {STATEMENT_TIMEOUT_MS}"
    ))?;
    Ok(client)
}

fn migrate(client: &mut Client) -> Result<(), PgError> {
    // Replicas starting together: one migrates, the others wait and find
    // nothing left to do.
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let out = embedded::migrations::runner().run(client);
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])?;
    let report = out.map_err(|e| PgError::Migrate(e.to_string()))?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "database schema migrated");
    }
    Ok(())
}

/// The lease a write is made under: the fence refuses it once `term` has passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub holder: String,
    pub term: i64,
}

/// Who a store's writes are made for: the leader's current lease for the
/// rollout engine's, `None` (refused at once) when this replica leads no more.
pub type Fence = std::sync::Arc<dyn Fn() -> Option<Term> + Send + Sync>;

/// The fence's term, or `Fenced` at once: this replica holds no lease.
pub fn fence_term(fence: &Fence) -> Result<Term, PgError> {
    fence().ok_or_else(|| PgError::Fenced("this replica holds no lease".to_owned()))
}

/// Inside a transaction: names the lease its writes are made under, for the
/// fence triggers (settings local to the transaction).
pub fn set_fence(tx: &mut impl postgres::GenericClient, term: &Term) -> Result<(), PgError> {
    tx.execute(
        "SELECT set_config('understudy.holder', $1, true), set_config('understudy.term', $2, true)",
        &[&term.holder, &term.term.to_string()],
    )?;
    Ok(())
}

/// The channel every change is announced on; the payload says what changed
/// (`state`, `rollout:<id>`).
pub const CHANNEL: &str = "understudy";

/// Inside a transaction: announces `what` to every replica (delivered at commit).
pub fn notify(tx: &mut impl postgres::GenericClient, what: &str) -> Result<(), PgError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &what])?;
    Ok(())
}
