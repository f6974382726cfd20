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
//! - **Learned noise**: each replica's share of what calibration taught is
//!   a row of its own, and every replica sums them; resetting a route's
//!   noise or live counts on any replica resets it on all
//!   ([`crate::evidence::shared::ShadowResets`]).
//!
//! - **Fleet size**: each replica publishes how many Envoys it serves;
//!   fleet-wide rate limits are divided among the sum ([`count_fleet`]).
//!
//! Not shared: rate-limit usage reports (the top-tenants view of a replica
//! shows its own Envoys').

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::evidence::envoy_stats::MetricsBook;
use crate::evidence::shadow::ShadowBook;
use crate::evidence::shared::{ShadowResets, SharedEvidence};
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
    /// This replica's side of the election (to step down on shutdown).
    pub leadership: Arc<Leadership>,
    pub fence: Fence,
    pub leader: Leader,
    pub rollouts: RolloutStore,
    /// The fleet's stats, read back from every replica's rows.
    pub fleet: Arc<MetricsBook>,
    /// Fleet-wide shadow resets, for the API.
    pub resets: ShadowResets,
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
    let resets = shipper.resets();
    std::thread::Builder::new()
        .name("evidence".to_owned())
        .spawn(move || shipper.run())
        .map_err(|e| PgError::Db(format!("could not start the evidence thread: {e}")))?;
    Ok(Started {
        leadership,
        fence: Arc::clone(&fence),
        leader,
        rollouts: RolloutStore::shared(opts.db.another("rollouts"), fence),
        fleet,
        resets,
    })
}

/// How often a replica publishes its Envoy count and reads the fleet's.
pub const FLEET_PERIOD: Duration = Duration::from_secs(1);
/// A replica whose count is older than this is counted out (it died).
pub const FLEET_STALE: Duration = Duration::from_secs(5);

/// Fleet-wide rate limits are divided among every replica's Envoys: each
/// replica publishes how many it serves, and sets the sum in its store.
pub(crate) fn count_fleet(
    opts: &ReplicaOptions,
    local: tokio::sync::watch::Receiver<usize>,
    store: Store,
) -> Result<(), PgError> {
    let db = opts.db.another("fleet");
    let me = opts.name.clone();
    std::thread::Builder::new()
        .name("fleet".to_owned())
        .spawn(move || {
            loop {
                let started = std::time::Instant::now();
                let mine = i64::try_from(*local.borrow()).unwrap_or(i64::MAX);
                let name = me.clone();
                let stale = FLEET_STALE.as_secs_f64();
                match db.call(move |c| {
                    c.execute(
                        "INSERT INTO fleet (replica, envoys, seen_at) VALUES ($1, $2, clock_timestamp()) \
                         ON CONFLICT (replica) DO UPDATE SET envoys = EXCLUDED.envoys, seen_at = EXCLUDED.seen_at",
                        &[&name, &mine],
                    )?;
                    let row = c.query_one(
                        "SELECT coalesce(sum(envoys), 0)::bigint FROM fleet \
                         WHERE seen_at > clock_timestamp() - make_interval(secs => $1)",
                        &[&stale],
                    )?;
                    Ok(row.get::<_, i64>(0))
                }) {
                    Ok(n) => store.set_fleet_size(usize::try_from(n).unwrap_or(usize::MAX)),
                    // The database away: this replica's own count is the
                    // best it knows (never zero: set_fleet_size floors at 1).
                    Err(e) => {
                        tracing::debug!(error = %e, "fleet size not shared");
                        store.set_fleet_size(usize::try_from(mine).unwrap_or(usize::MAX));
                    }
                }
                if let Some(rest) = FLEET_PERIOD.checked_sub(started.elapsed()) {
                    std::thread::park_timeout(rest);
                }
            }
        })
        .map_err(|e| PgError::Db(format!("could not start the fleet thread: {e}")))?;
    Ok(())
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
