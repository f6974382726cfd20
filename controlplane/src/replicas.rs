//! Replicas: several control planes on one PostgreSQL
//! (`serve --database postgres://...`). The wiring of [`crate::pg`]'s parts:
//!
//! - **State**: the desired state's home is the database
//!   ([`crate::store::Store::open_shared`]); every replica serves ADS from
//!   its copy, refreshed on `NOTIFY` and by a periodic reconcile
//!   ([`RECONCILE`]), so a committed change reaches every replica's
//!   snapshot within that bound even if a notification is lost.
//! - **Leader**: one replica holds the lease ([`crate::pg::lease`]) and runs
//!   the rollout engine; its writes (rollout records, audit, the weights it
//!   sets) name its term and the database refuses them once it has passed.
//!   The others refuse verbs with `503 not_leader`, naming the leader.
//! - **Evidence**: every replica ships its Envoys' stats and the filter's
//!   shadow batches to the database and reads the others' back
//!   ([`crate::evidence::shared`]); the engine judges on the fleet's.
//!
//! Not shared: rate-limit usage reports (each replica shares fleet-wide
//! limits among the Envoys connected to it).

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::evidence::envoy_stats::MetricsBook;
use crate::evidence::shadow::ShadowBook;
use crate::evidence::shared::SharedEvidence;
use crate::evidence::usage::ReportOutbox;
use crate::pg::lease::{Leadership, LeaseTiming};
use crate::pg::listen::{self, Change};
use crate::pg::{Db, Fence, PgError};
use crate::rollout::engine::{Engine, Leader};
use crate::rollout::store::RolloutStore;
use crate::store::Store;

/// The longest a replica goes without comparing its state with the
/// database's, notifications or not.
pub const RECONCILE: Duration = Duration::from_secs(2);

/// How a replica joins the others.
#[derive(Debug)]
pub struct ReplicaOptions {
    /// A connection to the shared database (migrated); more are opened from it.
    pub db: Db,
    /// Unique among the replicas: it names the lease holder and keys the
    /// evidence this replica ships.
    pub name: String,
    /// Where this replica's API answers, shown by followers as the leader's.
    pub api: String,
    pub lease: LeaseTiming,
}

/// What [`start`] gives the engine's wiring.
pub(crate) struct Started {
    pub fence: Fence,
    pub leader: Leader,
    pub rollouts: RolloutStore,
    /// The fleet's stats, read back from every replica's rows.
    pub fleet: Arc<MetricsBook>,
}

/// Starts the lease and evidence threads. `local` is this replica's own
/// (tapped) stats book.
pub(crate) fn start(
    opts: &ReplicaOptions,
    local: Arc<MetricsBook>,
    (reports, shadow): (Arc<ReportOutbox>, Arc<ShadowBook>),
) -> Result<Started, PgError> {
    let leadership = Arc::new(Leadership::new(
        opts.db.another("lease"),
        &opts.name,
        &opts.api,
        opts.lease,
    ));
    let runner = Arc::clone(&leadership);
    std::thread::Builder::new()
        .name("lease".to_owned())
        .spawn(move || runner.run())
        .map_err(|e| PgError::Db(format!("could not start the lease thread: {e}")))?;
    let term = Arc::clone(&leadership);
    let fence: Fence = Arc::new(move || term.term());
    let asked = Arc::clone(&leadership);
    let leader = Leader {
        me: opts.name.clone(),
        term: Arc::clone(&fence),
        who: Arc::new(move || match asked.holder() {
            Ok((holder, term, api, true)) => format!("{holder} (term {term}, API {api})"),
            Ok((holder, term, _, false)) => {
                format!("no replica now (the lease of {holder}, term {term}, has expired)")
            }
            Err(e) => format!("unknown ({e})"),
        }),
    };
    let fleet = Arc::new(MetricsBook::default());
    let shipper = SharedEvidence::new(
        &opts.name,
        opts.db.another("evidence"),
        (local, Arc::clone(&fleet)),
        (reports, shadow),
    )?;
    std::thread::Builder::new()
        .name("evidence".to_owned())
        .spawn(move || shipper.run())
        .map_err(|e| PgError::Db(format!("could not start the evidence thread: {e}")))?;
    Ok(Started {
        fence: Arc::clone(&fence),
        leader,
        rollouts: RolloutStore::shared(opts.db.another("rollouts"), fence),
        fleet,
    })
}

/// Keeps this replica's copies in step with the database: the desired
/// state on every change, and (on a follower) the rollouts it shows.
pub(crate) fn follow(opts: &ReplicaOptions, store: Store, engine: Weak<Engine>) {
    let on = move |change: Change| {
        if matches!(change, Change::State | Change::Reconcile)
            && let Err(e) = store.refresh()
        {
            tracing::warn!(error = %e, "could not read the shared desired state");
        }
        if matches!(change, Change::Rollout(_) | Change::Reconcile)
            && let Some(engine) = engine.upgrade()
            && let Err(e) = engine.reload()
        {
            tracing::warn!(error = %e, "could not read the shared rollouts");
        }
    };
    listen::spawn(opts.db.config().clone(), RECONCILE, Arc::new(on));
}
