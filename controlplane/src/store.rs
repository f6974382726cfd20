//! The store: the one place the desired state lives, and the source of the
//! snapshots the xDS server sends.
//!
//! Every change is applied to a copy, validated as a whole, translated into a
//! new [`Snapshot`], and only then committed; a rejected change leaves the
//! stored state exactly as it was. Connected Envoys watch the snapshot
//! through a `tokio::sync::watch` channel, which also coalesces bursts of
//! changes: a slow stream only ever sees the newest one.
//!
//! With a state file ([`Store::open`]), every accepted change is written to
//! it (atomically: a temporary file, then a rename) *before* it is published,
//! so a restarted control plane resumes exactly the state Envoy last received.
//!
//! With a database ([`Store::open_shared`], replicas), the desired state's
//! home is a row in PostgreSQL instead ([`postgres`]): a change locks the
//! row, applies to the newest committed document, and is committed and
//! announced before it is published here; every other replica adopts it
//! ([`Store::refresh`], on the announcement or the periodic reconcile).
//! This store is then a cache of that row, never a second owner.
//!
//! A store opened for a mesh ([`Store::open_or_create_in`]) also accepts the
//! mesh's clusters ([`MeshClusters`]) as hedge and shadow targets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::watch;

use understudy_core::config::RawFilterConfig;
use understudy_core::shadow::RawShadowConfig;

use crate::model::{
    Cohort, DesiredState, FilterDoc, FilterSettings, FlagHeader, MeshClusters, ModelError,
    ProbeKey, Service, Weight,
};
use crate::pg::{Db, PgError};
use crate::traffic::ShadowTarget;
use crate::xds::resources::Snapshot;

pub mod postgres;

pub use crate::pg::Fence;

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Set on the rollout engine's copy in replicas: its writes name the
    /// lease, and the database refuses them once the term has passed.
    fence: Option<Fence>,
}

/// The desired state's row in PostgreSQL, and the version last adopted.
struct Shared {
    db: Db,
    /// Written under the state lock only.
    version: AtomicI64,
}

struct Inner {
    /// The writers' lock and copy: held for a whole change, state-file
    /// write included, so changes apply one at a time in order.
    state: Mutex<DesiredState>,
    /// The committed state for readers, swapped in after each change: a
    /// read (every GET) never waits for a write's disk I/O.
    committed: RwLock<Arc<DesiredState>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    file: Option<PathBuf>,
    /// The data plane's clusters besides the services' own; fixed at start.
    mesh: MeshClusters,
    /// Connected Envoys; fleet-wide limits are divided by it.
    fleet: Mutex<usize>,
    /// (failed state-file writes, the last error).
    failures: Mutex<(u64, Option<String>)>,
    /// The key the probe pins are derived from (see [`crate::model::ProbeKey`]).
    probe_key: ProbeKey,
    /// Replicas: the database row this store caches.
    shared: Option<Shared>,
}

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The file is not JSON of the expected shape.
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    /// The file parses, but describes an invalid state.
    #[error("{path}: {source}")]
    Invalid { path: String, source: ModelError },
    /// The database failed, or refused a write (not the leader).
    #[error(transparent)]
    Shared(#[from] PgError),
    /// Another replica's change won the race; nothing was written.
    #[error("another replica changed the desired state at the same moment; retry")]
    Conflict,
    /// The stored document does not decode or validate.
    #[error("the desired state in the database: {0}")]
    SharedInvalid(String),
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// The change is valid but could not be saved; it was not applied.
    #[error("the change could not be saved, so it was not applied: {0}")]
    Persist(StoreError),
}

impl Store {
    /// Validates the initial state and builds its first snapshot.
    pub fn new(initial: DesiredState) -> Result<Self, ModelError> {
        Self::build(initial, None, MeshClusters::default(), ProbeKey::random())
    }

    /// [`Store::new`] for a data plane that also has `mesh`'s clusters.
    pub fn new_in(initial: DesiredState, mesh: MeshClusters) -> Result<Self, ModelError> {
        Self::build(initial, None, mesh, ProbeKey::random())
    }

    /// Loads the state file and keeps it up to date with every change.
    /// The file is set to mode 0600 (it names every backend); a file whose
    /// mode cannot be set is still used, with a warning.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_in(path, MeshClusters::default())
    }

    /// [`Store::open`] for a data plane that also has `mesh`'s clusters.
    pub fn open_in(path: &Path, mesh: MeshClusters) -> Result<Self, StoreError> {
        let state = load_state_in(path, &mesh)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                tracing::warn!(path = %path.display(), error = %e, "could not make the state file private (0600)");
            }
        }
        let key = probe_key(path)?;
        Self::build(state, Some(path.to_owned()), mesh, key).map_err(|source| StoreError::Invalid {
            path: path.display().to_string(),
            source,
        })
    }

    /// [`Store::open`], except that a missing state file is a first start:
    /// the store begins with [`first_start_state`] and writes it to `path`
    /// (an existing file that does not parse is still an error, never
    /// overwritten). Returns whether the file was created.
    pub fn open_or_create(path: &Path) -> Result<(Self, bool), StoreError> {
        Self::open_or_create_in(path, MeshClusters::default())
    }

    /// [`Store::open_or_create`] for a data plane that also has `mesh`'s clusters.
    pub fn open_or_create_in(path: &Path, mesh: MeshClusters) -> Result<(Self, bool), StoreError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::open_in(path, mesh)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = first_start_state();
                save_state(path, &state)?;
                let key = probe_key(path)?;
                let store =
                    Self::build(state, Some(path.to_owned()), mesh, key).map_err(|source| {
                        StoreError::Invalid {
                            path: path.display().to_string(),
                            source,
                        }
                    })?;
                Ok((store, true))
            }
            Err(source) => Err(StoreError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn build(
        initial: DesiredState,
        file: Option<PathBuf>,
        mesh: MeshClusters,
        probe_key: ProbeKey,
    ) -> Result<Self, ModelError> {
        initial.validate_in(&mesh)?;
        Self::build_shared(initial, file, mesh, probe_key, None)
    }

    fn build_shared(
        initial: DesiredState,
        file: Option<PathBuf>,
        mesh: MeshClusters,
        probe_key: ProbeKey,
        shared: Option<Shared>,
    ) -> Result<Self, ModelError> {
        initial.validate_in(&mesh)?;
        let snapshot = Arc::new(Snapshot::build_with(&initial, 1, 1, Some(&probe_key)));
        let (snapshots, _) = watch::channel(snapshot);
        Ok(Self {
            inner: Arc::new(Inner {
                committed: RwLock::new(Arc::new(initial.clone())),
                state: Mutex::new(initial),
                snapshots,
                file,
                mesh,
                fleet: Mutex::new(1),
                failures: Mutex::default(),
                probe_key,
                shared,
            }),
            fence: None,
        })
    }

    /// Replicas: the desired state lives in the database `db` (its own
    /// connection). A first replica on an empty database stores `seed`
    /// (the state file, if given and present) or [`first_start_state`];
    /// every later start reads what is stored, and `seed` is ignored.
    pub fn open_shared(
        db: Db,
        seed: Option<&Path>,
        mesh: MeshClusters,
    ) -> Result<Self, StoreError> {
        let initial = match seed {
            Some(path) if path.exists() => load_state_in(path, &mesh)?,
            _ => first_start_state(),
        };
        let initial =
            serde_json::to_value(&initial).map_err(|e| StoreError::SharedInvalid(e.to_string()))?;
        let (version, doc) = postgres::load_or_init(&db, initial)?;
        let state = decode_shared(doc, &mesh)?;
        let key = postgres::probe_key(&db)?;
        let shared = Shared {
            db,
            version: AtomicI64::new(version),
        };
        Self::build_shared(state, None, mesh, key, Some(shared))
            .map_err(|e| StoreError::SharedInvalid(e.to_string()))
    }

    /// This store for the rollout engine of a replica: each change names
    /// the lease `fence` returns, and is refused by the database (or at
    /// once, when `fence` returns `None`) unless that lease is current.
    pub fn fenced(&self, fence: Fence) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            fence: Some(fence),
        }
    }

    /// Whether the desired state lives in a database (replicas).
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Replicas: adopts the database's document if another replica
    /// committed a newer one (validated, translated and published like any
    /// change). `Ok(true)`: a newer one was adopted.
    pub fn refresh(&self) -> Result<bool, StoreError> {
        let Some(shared) = &self.inner.shared else {
            return Ok(false);
        };
        let mut guard = self.lock();
        let known = shared.version.load(Ordering::Acquire);
        let Some((version, doc)) = postgres::newer_than(&shared.db, known)? else {
            return Ok(false);
        };
        let next = decode_shared(doc, &self.inner.mesh)?;
        shared.version.store(version, Ordering::Release);
        self.publish(&mut guard, next);
        Ok(true)
    }

    /// The database version this store holds (0 without a database).
    pub fn shared_version(&self) -> i64 {
        self.inner
            .shared
            .as_ref()
            .map_or(0, |s| s.version.load(Ordering::Acquire))
    }

    /// Makes `next` the committed state and publishes its snapshot.
    fn publish(&self, guard: &mut MutexGuard<'_, DesiredState>, next: DesiredState) {
        if next == **guard {
            return;
        }
        let generation = self.inner.snapshots.borrow().generation + 1;
        let snapshot = Arc::new(Snapshot::build_with(
            &next,
            generation,
            self.fleet(),
            Some(&self.inner.probe_key),
        ));
        *self
            .inner
            .committed
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(next.clone());
        **guard = next;
        self.inner.snapshots.send_replace(snapshot);
    }

    /// A receiver that sees every new snapshot (the xDS streams hold one each).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshots.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshots.borrow().clone()
    }

    /// The committed state (a copy; never waits for a change being saved).
    pub fn state(&self) -> DesiredState {
        self.current().as_ref().clone()
    }

    /// The committed state, shared: for reads that need only a part of it.
    pub fn current(&self) -> Arc<DesiredState> {
        self.inner
            .committed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The [`crate::model::PROBE_HEADER`] value that pins a probe of
    /// `service` to `side` (`stable` or `canary`); the routes match it.
    pub fn probe_pin(&self, service: &str, side: &str) -> String {
        self.inner.probe_key.pin(service, side)
    }

    pub fn service(&self, name: &str) -> Result<Service, ModelError> {
        self.current()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::UnknownService(name.to_owned()))
    }

    pub fn set_canary_weight(&self, name: &str, weight: Weight) -> Result<Service, ChangeError> {
        self.set_canary_weight_with(name, weight, false)
    }

    /// [`Store::set_canary_weight`]; with `forced`, a state file that cannot
    /// be written does not stop the change: it is published in memory and
    /// the error is still returned (a rollback must take the canary out of
    /// traffic at once, whatever the disk does).
    pub fn set_canary_weight_with(
        &self,
        name: &str,
        weight: Weight,
        forced: bool,
    ) -> Result<Service, ChangeError> {
        self.edit_service_with(name, forced, |svc| svc.canary_weight = weight)
    }

    /// Sets a service's canary weight, the cohorts routed to its canary and
    /// the flags its routes render in one change, so Envoy never sees one
    /// without the others; `forced` as for [`Store::set_canary_weight_with`].
    pub fn set_split_with(
        &self,
        name: &str,
        weight: Weight,
        cohorts: &[Cohort],
        flags: &FlagHeader,
        forced: bool,
    ) -> Result<Service, ChangeError> {
        self.edit_service_with(name, forced, |svc| {
            svc.canary_weight = weight;
            svc.canary_cohorts = cohorts.to_vec();
            svc.flags = flags.clone();
        })
    }

    /// One service's routing edited in one change (`forced` as for
    /// [`Store::set_canary_weight_with`]); the service as it now is.
    fn edit_service_with(
        &self,
        name: &str,
        forced: bool,
        edit: impl FnOnce(&mut Service),
    ) -> Result<Service, ChangeError> {
        self.update_with(forced, |state| {
            let svc = state
                .services
                .get_mut(name)
                .ok_or_else(|| ModelError::UnknownService(name.to_owned()))?;
            edit(svc);
            Ok(svc.clone())
        })
    }

    /// Finishes a successful rollout in one change: the canary's endpoints
    /// become the stable backend's, the weight returns to 0 (all traffic on
    /// the stable cluster, now serving the new version), and the canary
    /// keeps its endpoints. Envoy applies it make-before-break: EDS (stable
    /// now on the new version) is ACKed before RDS moves the weight, so no
    /// request meets an empty cluster. Emptying the canary is a separate,
    /// later change ([`Store::empty_canary`]) once every Envoy has the route.
    pub fn promote_canary_to_stable(&self, name: &str) -> Result<Service, ChangeError> {
        self.update(|state| {
            let svc = state
                .services
                .get_mut(name)
                .ok_or_else(|| ModelError::UnknownService(name.to_owned()))?;
            if svc.canary.endpoints.is_empty() {
                return Err(ModelError::InvalidService {
                    service: name.to_owned(),
                    reason: "the canary has no endpoints to promote".to_owned(),
                });
            }
            svc.stable = svc.canary.clone();
            svc.canary_weight = Weight::ZERO;
            // The cohorts' routes go with the weight: the canary is about
            // to be emptied, and a cohort route to it would answer 503.
            svc.canary_cohorts.clear();
            Ok(svc.clone())
        })
    }

    /// Removes the canary's endpoints of a service whose canary weight is 0.
    pub fn empty_canary(&self, name: &str) -> Result<Service, ChangeError> {
        self.update(|state| {
            let svc = state
                .services
                .get_mut(name)
                .ok_or_else(|| ModelError::UnknownService(name.to_owned()))?;
            if svc.canary_weight != Weight::ZERO || !svc.canary_cohorts.is_empty() {
                return Err(ModelError::InvalidService {
                    service: name.to_owned(),
                    reason: "the canary still has traffic".to_owned(),
                });
            }
            svc.canary.endpoints.clear();
            Ok(svc.clone())
        })
    }

    /// Creates or replaces a service.
    pub fn put_service(&self, service: Service) -> Result<Service, ChangeError> {
        self.update(|state| {
            state.services.insert(service.name.clone(), service.clone());
            Ok(service)
        })
    }

    pub fn put_filter(&self, filter: FilterSettings) -> Result<FilterSettings, ChangeError> {
        self.put_filter_with(filter, false)
    }

    /// [`Store::put_filter`], `forced` as in [`Store::set_canary_weight_with`].
    pub fn put_filter_with(
        &self,
        filter: FilterSettings,
        forced: bool,
    ) -> Result<FilterSettings, ChangeError> {
        self.update_with(forced, |state| {
            state.filter = filter.clone();
            Ok(filter)
        })
    }

    /// A filter route's shadow target: `None` if the route does not exist,
    /// `Some(None)` if it is not shadowed.
    pub fn shadow_target(&self, route: &str) -> Option<Option<ShadowTarget>> {
        shadow_target_of(self.current().filter.config.raw(), route)
    }

    /// Edits the filter's config document inside one change: `edit` sees
    /// the current document, the result is validated as a whole, and a
    /// concurrent edit is never lost (each one applies to the last). An
    /// error from `edit` leaves everything as it was.
    pub fn edit_filter<T, E>(
        &self,
        forced: bool,
        edit: impl FnOnce(&mut RawFilterConfig) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<ChangeError> + From<ModelError>,
    {
        self.update_as(forced, |state| {
            let mut out = None;
            state.filter.config = state.filter.config.edited(|raw| {
                out = Some(edit(raw)?);
                Ok::<(), E>(())
            })?;
            out.ok_or_else(|| {
                E::from(ModelError::InvalidFilter(
                    "the edit returned nothing".into(),
                ))
            })
        })
    }

    /// Turns a filter route's shadowing on (to `target`, keeping the
    /// route's comparison rules, dropping any A/A calibration) or off, in
    /// one update: a concurrent filter edit is never lost. `forced` as in
    /// [`Store::set_canary_weight_with`].
    pub fn set_shadow_target(
        &self,
        route: &str,
        target: Option<ShadowTarget>,
        forced: bool,
    ) -> Result<(), ChangeError> {
        if self.shadow_target(route) == Some(target.clone()) {
            return Ok(());
        }
        self.edit_filter(forced, |raw| {
            let r = raw
                .routes
                .iter_mut()
                .find(|r| r.name == route)
                .ok_or_else(|| ModelError::InvalidFilter(format!("no route named {route:?}")))?;
            r.shadow = target.map(|t| {
                let mut shadow = r
                    .shadow
                    .take()
                    .unwrap_or_else(|| RawShadowConfig::new(t.cluster.clone()));
                shadow.cluster = t.cluster;
                shadow.percent = t.percent;
                shadow.calibration = false;
                shadow
            });
            Ok::<(), ChangeError>(())
        })
    }

    /// How many proxies share the fleet-wide limits ([`Store::set_fleet_size`]).
    pub fn fleet(&self) -> usize {
        *self.inner.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of connected Envoys changed: fleet-wide limits get new
    /// per-Envoy shares (only the filter config changes, so only ECDS is sent).
    pub fn set_fleet_size(&self, envoys: usize) {
        let envoys = envoys.max(1);
        let guard = self.lock();
        {
            let mut fleet = self.inner.fleet.lock().unwrap_or_else(|p| p.into_inner());
            if *fleet == envoys {
                return;
            }
            *fleet = envoys;
        }
        let generation = self.inner.snapshots.borrow().generation + 1;
        let snapshot = Arc::new(Snapshot::build_with(
            &guard,
            generation,
            envoys,
            Some(&self.inner.probe_key),
        ));
        self.inner.snapshots.send_replace(snapshot);
    }

    /// Applies `change` to a copy, validates, saves, publishes a snapshot, commits.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut DesiredState) -> Result<T, ModelError>,
    ) -> Result<T, ChangeError> {
        self.update_with(false, change)
    }

    /// [`Store::update`]; with `forced`, a failed save still publishes and
    /// commits the change in memory, and returns the save's error.
    fn update_with<T>(
        &self,
        forced: bool,
        change: impl FnOnce(&mut DesiredState) -> Result<T, ModelError>,
    ) -> Result<T, ChangeError> {
        self.update_as(forced, |state| change(state).map_err(ChangeError::from))
    }

    /// [`Store::update_with`] for changes with their own error type.
    fn update_as<T, E: From<ChangeError>>(
        &self,
        forced: bool,
        change: impl FnOnce(&mut DesiredState) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut guard = self.lock();
        if let Some(shared) = &self.inner.shared {
            return self.update_shared(shared, &mut guard, change);
        }
        let mut next = guard.clone();
        let out = change(&mut next)?;
        next.validate_in(&self.inner.mesh)
            .map_err(|e| E::from(ChangeError::from(e)))?;
        let mut saved = Ok(());
        if next != *guard {
            if let Some(path) = &self.inner.file
                && let Err(e) = save_state(path, &next)
            {
                tracing::error!(error = %e, forced, "the state file could not be written");
                self.note_failure(&e);
                if !forced {
                    return Err(ChangeError::Persist(e).into());
                }
                saved = Err(ChangeError::Persist(e).into());
            }
            self.publish(&mut guard, next);
        }
        saved.map(|()| out)
    }

    /// [`Store::update_as`] with the state in the database: the change is
    /// applied to the newest committed document (row locked), committed
    /// and announced, and only then published here. Nothing is published
    /// that the database did not take, `forced` or not: with replicas, a
    /// change held only in one replica's memory would be undone by the
    /// next reconcile, so a failing database fails the change (a leader
    /// that cannot write has lost its lease anyway; the next one re-applies
    /// the rollback from the stored record).
    fn update_shared<T, E: From<ChangeError>>(
        &self,
        shared: &Shared,
        guard: &mut MutexGuard<'_, DesiredState>,
        change: impl FnOnce(&mut DesiredState) -> Result<T, E>,
    ) -> Result<T, E> {
        let fail = |e: StoreError| {
            self.note_failure(&e);
            E::from(ChangeError::Persist(e))
        };
        let fence = match &self.fence {
            None => None,
            Some(f) => Some(crate::pg::fence_term(f).map_err(|e| fail(e.into()))?),
        };
        let (version, doc) = postgres::lock_current(&shared.db).map_err(|e| fail(e.into()))?;
        let result = (|| {
            let mut base = guard.clone();
            if version != shared.version.load(Ordering::Acquire) {
                base = decode_shared(doc, &self.inner.mesh).map_err(Ok)?;
            }
            let mut next = base.clone();
            let out = change(&mut next).map_err(Err)?;
            next.validate_in(&self.inner.mesh)
                .map_err(|e| Err(E::from(ChangeError::from(e))))?;
            Ok((base, next, out))
        })();
        let (base, next, out) = match result {
            Ok(v) => v,
            Err(e) => {
                postgres::rollback(&shared.db);
                return Err(match e {
                    Ok(store) => fail(store),
                    Err(e) => e,
                });
            }
        };
        if next == base {
            postgres::rollback(&shared.db);
            shared.version.store(version, Ordering::Release);
            self.publish(guard, next);
            return Ok(out);
        }
        let doc = serde_json::to_value(&next)
            .map_err(|e| fail(StoreError::SharedInvalid(e.to_string())))?;
        let committed = postgres::commit(&shared.db, version, doc, fence).map_err(|e| {
            fail(match e {
                postgres::CommitError::Conflict => StoreError::Conflict,
                postgres::CommitError::Db(e) => StoreError::Shared(e),
            })
        })?;
        shared.version.store(committed, Ordering::Release);
        self.publish(guard, next);
        Ok(out)
    }

    fn note_failure(&self, e: &StoreError) {
        let mut f = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.0 = f.0.saturating_add(1);
        f.1 = Some(e.to_string());
    }

    /// State-file writes that failed since start, and the last error: shown
    /// by `GET /readyz`, so a change held only in memory is never silent.
    pub fn persistence_failures(&self) -> (u64, Option<String>) {
        self.inner
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, DesiredState> {
        // A panic while holding the lock cannot leave a half-applied change
        // (changes are applied to a copy), so a poisoned lock is still sound.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The shadow target of `route` in a config document (see [`Store::shadow_target`]).
fn shadow_target_of(raw: &RawFilterConfig, route: &str) -> Option<Option<ShadowTarget>> {
    let r = raw.routes.iter().find(|r| r.name == route)?;
    Some(r.shadow.as_ref().map(|s| ShadowTarget {
        cluster: s.cluster.clone(),
        percent: s.percent,
    }))
}

/// The desired state of a first start: Envoy's listener on `0.0.0.0:10000`,
/// the filter at `/etc/envoy/understudy_filter.wasm` with no routes, and no
/// services. Everything in it can be changed through the API afterwards
/// (`PUT /v1/filter`, `PUT /v1/services/{name}`).
pub fn first_start_state() -> DesiredState {
    DesiredState {
        listener: crate::model::ListenerSettings {
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 10000,
        },
        filter: crate::model::FilterSettings {
            wasm_path: "/etc/envoy/understudy_filter.wasm".to_owned(),
            config: FilterDoc::default(),
            report_cluster: "understudy_xds".to_owned(),
        },
        services: Default::default(),
    }
}

/// A document from the database, decoded and validated (another replica
/// validated it before writing, but a newer binary may have written it).
fn decode_shared(doc: serde_json::Value, mesh: &MeshClusters) -> Result<DesiredState, StoreError> {
    let state: DesiredState =
        serde_json::from_value(doc).map_err(|e| StoreError::SharedInvalid(e.to_string()))?;
    state
        .validate_in(mesh)
        .map_err(|e| StoreError::SharedInvalid(e.to_string()))?;
    Ok(state)
}

/// Reads and validates a desired-state file (JSON, the shape of [`DesiredState`]).
pub fn load_state(path: &Path) -> Result<DesiredState, StoreError> {
    load_state_in(path, &MeshClusters::default())
}

/// [`load_state`] for a data plane that also has `mesh`'s clusters.
pub fn load_state_in(path: &Path, mesh: &MeshClusters) -> Result<DesiredState, StoreError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| StoreError::Io {
        path: shown.clone(),
        source,
    })?;
    let state: DesiredState = serde_json::from_str(&text).map_err(|source| StoreError::Parse {
        path: shown.clone(),
        source,
    })?;
    state
        .validate_in(mesh)
        .map_err(|source| StoreError::Invalid {
            path: shown,
            source,
        })?;
    Ok(state)
}

/// The probe key kept beside the state file at `<path>.probe-key` (32
/// bytes, mode 0600), created when missing: the pin routes it derives stay
/// the same across restarts. A file of another length is an error, never
/// overwritten.
fn probe_key(state_path: &Path) -> Result<ProbeKey, StoreError> {
    use std::io::Write;
    let mut name = state_path.as_os_str().to_owned();
    name.push(".probe-key");
    let path = PathBuf::from(name);
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice())
            .map(ProbeKey::from_bytes)
            .map_err(|_| {
                io(std::io::Error::other(format!(
                    "a probe key is 32 bytes, this file has {}",
                    bytes.len()
                )))
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = ProbeKey::random();
            let mut file = private_file(&path).map_err(io)?;
            file.write_all(key.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_dir(&path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Writes the state next to `path` (mode 0600: it names every backend),
/// fsyncs it, renames it over `path` and fsyncs the directory, so a crash at
/// any point leaves either the previous state or the new one, durably.
fn save_state(path: &Path, state: &DesiredState) -> Result<(), StoreError> {
    use std::io::Write;
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let json = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = private_file(&tmp).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path).map_err(io)
}

/// Creates (or truncates) `path` readable and writable by its owner only.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options.open(path)?;
        // `mode` applies only when the file is created; an older file keeps
        // its bits unless they are set here.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    options.open(path)
}

/// Fsyncs the directory holding `path`, so a rename in it is durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::resources::type_url;

    fn store() -> Store {
        Store::new(crate::model::fixtures::state(0, 8081, false)).unwrap()
    }

    #[test]
    fn a_rejected_change_keeps_the_stored_state() {
        let s = store();
        let before = s.state();
        let gen_before = s.snapshot().generation;
        // No canary endpoints: a weight above zero is refused...
        let err = s
            .set_canary_weight("shop", Weight::try_from(10).unwrap())
            .unwrap_err();
        assert!(matches!(
            err,
            ChangeError::Invalid(ModelError::NoCanaryEndpoints { .. })
        ));
        // ...and nothing changed.
        assert_eq!(s.state(), before);
        assert_eq!(s.snapshot().generation, gen_before);
        // A config the filter would reject cannot even be built...
        let err = FilterSettings::from_json(
            serde_json::json!({"wasm_path": "/f.wasm", "config": {"bogus": 1}}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
        // ...and the settings around it are validated by the store.
        let err = s
            .put_filter(FilterSettings {
                wasm_path: " ".into(),
                config: FilterDoc::default(),
                report_cluster: "understudy_xds".into(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("wasm_path"), "{err}");
        assert_eq!(s.state(), before);
    }

    #[test]
    fn a_change_publishes_a_new_snapshot() {
        let s = store();
        let mut rx = s.subscribe();
        let mut svc = s.service("shop").unwrap();
        svc.canary.endpoints = vec!["127.0.0.1:8082".parse().unwrap()];
        svc.canary_weight = Weight::try_from(5).unwrap();
        s.put_service(svc).unwrap();
        assert!(rx.has_changed().unwrap());
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.generation, 2);
        // Setting the same weight again is not a change.
        s.set_canary_weight("shop", Weight::try_from(5).unwrap())
            .unwrap();
        assert!(!rx.has_changed().unwrap());
        assert!(snap.get(type_url::ROUTE).is_some());
    }

    #[test]
    fn unknown_service() {
        let err = store().set_canary_weight("nope", Weight::ZERO).unwrap_err();
        assert!(matches!(err, ChangeError::Invalid(ModelError::UnknownService(n)) if n == "nope"));
    }

    #[test]
    fn the_state_file_follows_every_change_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, serde_json::to_vec(&store().state()).unwrap()).unwrap();
        let s = Store::open(&path).unwrap();
        let mut svc = s.service("shop").unwrap();
        svc.canary.endpoints = vec!["127.0.0.1:8082".parse().unwrap()];
        s.put_service(svc).unwrap();
        s.set_canary_weight("shop", Weight::try_from(20).unwrap())
            .unwrap();
        // A refused change does not touch the file.
        s.set_canary_weight("nope", Weight::ZERO).unwrap_err();
        let reloaded = Store::open(&path).unwrap();
        assert_eq!(reloaded.state(), s.state());
        assert_eq!(
            reloaded.service("shop").unwrap().canary_weight.percent(),
            20
        );
    }

    #[test]
    fn bad_state_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let missing = Store::open(&path).err().unwrap().to_string();
        assert!(missing.contains("state.json"), "{missing}");
        std::fs::write(&path, r#"{"listener": {"address": "127.0.0.1", "port": 1}, "filter": {"wasm_path": "f"}, "services": [{"name": "a", "domains": ["*"], "stable": {}, "canary_weight": 7}]}"#).unwrap();
        let invalid = Store::open(&path).err().unwrap().to_string();
        assert!(
            invalid.contains("canary weight 7 needs at least one canary endpoint"),
            "{invalid}"
        );
        std::fs::write(&path, "{").unwrap();
        let parse = Store::open(&path).err().unwrap().to_string();
        assert!(parse.contains("EOF"), "{parse}");
        // A broken file is never replaced by a first-start state.
        let again = Store::open_or_create(&path).err().unwrap().to_string();
        assert!(again.contains("EOF"), "{again}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{");
    }

    #[test]
    fn the_probe_key_is_private_kept_across_restarts_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (first, _) = Store::open_or_create(&path).unwrap();
        let key_path = dir.path().join("state.json.probe-key");
        assert_eq!(std::fs::read(&key_path).unwrap().len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pin = first.probe_pin("shop", "canary");
        assert_eq!(Store::open(&path).unwrap().probe_pin("shop", "canary"), pin);
        // The key is not in the desired state (which the API shows).
        let shown = serde_json::to_string(&first.state()).unwrap();
        assert!(!shown.contains(pin.split('/').next().unwrap()));
        // Another control plane (another key) pins differently.
        let elsewhere = tempfile::tempdir().unwrap();
        let (other, _) = Store::open_or_create(&elsewhere.path().join("s.json")).unwrap();
        assert_ne!(other.probe_pin("shop", "canary"), pin);
        // A damaged key file is an error, and left as it is.
        std::fs::write(&key_path, b"short").unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("probe-key") && e.contains("32 bytes"), "{e}");
        assert_eq!(std::fs::read(&key_path).unwrap(), b"short");
    }

    #[test]
    fn a_missing_state_file_is_a_first_start_that_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (store, created) = Store::open_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(store.state(), first_start_state());
        assert!(store.state().services.is_empty());
        // The file exists, holds that state, and a change then persists to it.
        assert_eq!(load_state(&path).unwrap(), first_start_state());
        let svc = crate::model::fixtures::state(0, 8081, false)
            .services
            .into_values()
            .next()
            .unwrap();
        store.put_service(svc.clone()).unwrap();
        let (reopened, created) = Store::open_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(reopened.service(&svc.name).unwrap(), svc);
    }
}
