//! The store: the one place the desired state lives, and the source of the
//! snapshots the xDS server sends.
//!
//! Every change is applied to a copy, validated as a whole, translated into a
//! new [`Snapshot`], and only then committed; a rejected change leaves the
//! stored state exactly as it was. Connected Envoys watch the snapshot
//! through a `tokio::sync::watch` channel, which also coalesces bursts of
//! changes: a slow stream only ever sees the newest one.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::model::{DesiredState, FilterSettings, ModelError, Service, Weight};
use crate::resources::Snapshot;

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<DesiredState>,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Store {
    /// Validates the initial state and builds its first snapshot.
    pub fn new(initial: DesiredState) -> Result<Self, ModelError> {
        initial.validate()?;
        let snapshot = Arc::new(Snapshot::build(&initial, 1));
        let (snapshots, _) = watch::channel(snapshot);
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(initial),
                snapshots,
            }),
        })
    }

    /// A receiver that sees every new snapshot (the xDS streams hold one each).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshots.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshots.borrow().clone()
    }

    pub fn state(&self) -> DesiredState {
        self.lock().clone()
    }

    pub fn service(&self, name: &str) -> Result<Service, ModelError> {
        self.lock()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::UnknownService(name.to_owned()))
    }

    pub fn set_canary_weight(&self, name: &str, weight: Weight) -> Result<Service, ModelError> {
        self.update(|state| {
            let svc = state
                .services
                .get_mut(name)
                .ok_or_else(|| ModelError::UnknownService(name.to_owned()))?;
            svc.canary_weight = weight;
            Ok(svc.clone())
        })
    }

    /// Creates or replaces a service.
    pub fn put_service(&self, service: Service) -> Result<Service, ModelError> {
        self.update(|state| {
            state.services.insert(service.name.clone(), service.clone());
            Ok(service)
        })
    }

    pub fn put_filter(&self, filter: FilterSettings) -> Result<FilterSettings, ModelError> {
        self.update(|state| {
            state.filter = filter.clone();
            Ok(filter)
        })
    }

    /// Applies `change` to a copy, validates, publishes a snapshot, commits.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut DesiredState) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        let mut guard = self.lock();
        let mut next = guard.clone();
        let out = change(&mut next)?;
        next.validate()?;
        if next != *guard {
            let generation = self.inner.snapshots.borrow().generation + 1;
            let snapshot = Arc::new(Snapshot::build(&next, generation));
            *guard = next;
            self.inner.snapshots.send_replace(snapshot);
        }
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, DesiredState> {
        // A panic while holding the lock cannot leave a half-applied change
        // (changes are applied to a copy), so a poisoned lock is still sound.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, ListenerSettings};
    use crate::resources::type_url;

    fn store() -> Store {
        let svc = Service {
            name: "shop".into(),
            domains: vec!["*".into()],
            stable: Backend {
                endpoints: vec!["127.0.0.1:8081".parse().unwrap()],
            },
            canary: Backend::default(),
            canary_weight: Weight::ZERO,
        };
        Store::new(DesiredState {
            listener: ListenerSettings {
                address: "127.0.0.1".parse().unwrap(),
                port: 10000,
            },
            filter: FilterSettings {
                wasm_path: "/f.wasm".into(),
                config: serde_json::json!({}),
            },
            services: [("shop".to_string(), svc)].into_iter().collect(),
        })
        .unwrap()
    }

    #[test]
    fn a_rejected_change_keeps_the_stored_state() {
        let s = store();
        let before = s.state();
        let gen_before = s.snapshot().generation;
        // No canary endpoints: a weight above zero is refused...
        let err = s.set_canary_weight("shop", Weight::try_from(10).unwrap()).unwrap_err();
        assert!(matches!(err, ModelError::NoCanaryEndpoints { .. }));
        // ...and nothing changed.
        assert_eq!(s.state(), before);
        assert_eq!(s.snapshot().generation, gen_before);
        let err = s
            .put_filter(FilterSettings {
                wasm_path: "/f.wasm".into(),
                config: serde_json::json!({"bogus": 1}),
            })
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
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
        s.set_canary_weight("shop", Weight::try_from(5).unwrap()).unwrap();
        assert!(!rx.has_changed().unwrap());
        assert!(snap.get(type_url::ROUTE).is_some());
    }

    #[test]
    fn unknown_service() {
        let err = store().set_canary_weight("nope", Weight::ZERO).unwrap_err();
        assert_eq!(err, ModelError::UnknownService("nope".into()));
    }
}
