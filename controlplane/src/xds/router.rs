//! [`AdsRouter`]: the [`TrafficRouter`] over our own ADS. The weight is the
//! service's `canary_weight` in the desired state (an RDS weighted-clusters
//! push); a shadow is the filter config's route `shadow` (an ECDS push);
//! what Envoy made of them comes from the [`Registry`]'s ACKs and NACKs.

use std::sync::Arc;

use crate::model::{ClusterNames, Cohort, FlagHeader, ModelError, Weight};
use crate::store::{ChangeError, Store};
use crate::traffic::{ChangeId, RouterError, ShadowTarget, TrafficRouter};
use crate::xds::Registry;
use crate::xds::resources::{Snapshot, type_url};

/// The desired state's resource types a rollout's changes can touch.
const TYPES: [&str; 5] = [
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
    type_url::EXTENSION_CONFIG,
];

#[derive(Clone)]
pub struct AdsRouter {
    pub store: Store,
    pub registry: Arc<Registry>,
}

impl AdsRouter {
    pub fn new(store: Store, registry: Arc<Registry>) -> Self {
        Self { store, registry }
    }

    /// Runs `change` and names the resource versions it published.
    fn publishing(
        &self,
        change: impl FnOnce() -> Result<(), ChangeError>,
    ) -> Result<Vec<ChangeId>, RouterError> {
        let before = self.store.snapshot();
        let result = change();
        // A forced change that failed to save was still published: its
        // versions count as pushed either way.
        let pushed = changed_versions(&before, &self.store.snapshot());
        result.map(|()| pushed).map_err(router_error)
    }
}

fn changed_versions(before: &Snapshot, after: &Snapshot) -> Vec<ChangeId> {
    TYPES
        .iter()
        .filter_map(|url| {
            let now = after.get(url)?;
            if before.get(url).is_some_and(|b| b.version == now.version) {
                return None;
            }
            Some(ChangeId {
                type_url: (*url).to_owned(),
                version: now.version.clone(),
            })
        })
        .collect()
}

fn router_error(e: ChangeError) -> RouterError {
    match e {
        ChangeError::Invalid(ModelError::UnknownService(s)) => RouterError::UnknownService(s),
        ChangeError::Invalid(e) => RouterError::Invalid(e.to_string()),
        ChangeError::Persist(e) => RouterError::NotSaved(e.to_string()),
    }
}

impl TrafficRouter for AdsRouter {
    /// Our ADS builds each service's probe pin routes (`xds::resources`).
    fn probe_pins(&self) -> bool {
        true
    }

    fn weight(&self, service: &str) -> Result<u32, RouterError> {
        let svc = self
            .store
            .service(service)
            .map_err(|e| router_error(e.into()))?;
        Ok(svc.canary_weight.percent())
    }

    fn set_weight(
        &self,
        service: &str,
        weight: u32,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError> {
        let weight = valid_weight(weight)?;
        self.publishing(|| {
            self.store
                .set_canary_weight_with(service, weight, forced)
                .map(drop)
        })
    }

    fn cohorts(&self, service: &str) -> Result<Option<Vec<Cohort>>, RouterError> {
        let svc = self
            .store
            .service(service)
            .map_err(|e| router_error(e.into()))?;
        Ok(Some(svc.canary_cohorts))
    }

    fn flags(&self, service: &str) -> Result<Option<FlagHeader>, RouterError> {
        let svc = self
            .store
            .service(service)
            .map_err(|e| router_error(e.into()))?;
        Ok(Some(svc.flags))
    }

    fn set_split(
        &self,
        service: &str,
        weight: u32,
        cohorts: &[Cohort],
        flags: &FlagHeader,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError> {
        let weight = valid_weight(weight)?;
        self.publishing(|| {
            self.store
                .set_split_with(service, weight, cohorts, flags, forced)
                .map(drop)
        })
    }

    fn shadow(&self, route: &str) -> Result<Option<ShadowTarget>, RouterError> {
        self.store
            .shadow_target(route)
            .ok_or_else(|| RouterError::UnknownRoute(route.to_owned()))
    }

    fn set_shadow(
        &self,
        route: &str,
        target: Option<ShadowTarget>,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError> {
        self.publishing(|| self.store.set_shadow_target(route, target, forced))
    }

    fn check_service(&self, service: &str) -> Result<(), RouterError> {
        let svc = self
            .store
            .service(service)
            .map_err(|_| RouterError::UnknownService(service.to_owned()))?;
        if svc.canary.endpoints.is_empty() {
            return Err(RouterError::Invalid(format!(
                "service {service:?} has no canary endpoints"
            )));
        }
        Ok(())
    }

    fn canary_cluster(&self, service: &str) -> String {
        ClusterNames::of(service).canary
    }

    fn rejection(&self, changes: &[ChangeId], since_ms: u64) -> Option<String> {
        self.registry
            .nacks()
            .into_iter()
            .filter(|n| crate::time::unix_ms(n.nack.at) >= since_ms)
            .find(|n| {
                changes
                    .iter()
                    .any(|p| p.type_url == n.nack.type_url && p.version == n.nack.version)
            })
            .map(|n| {
                format!(
                    "Envoy {} rejected {} version {}: {}",
                    n.node_id.as_deref().unwrap_or("?"),
                    n.nack.type_url.rsplit('.').next().unwrap_or(""),
                    n.nack.version,
                    n.nack.error
                )
            })
    }

    fn routing_applied_everywhere(&self) -> bool {
        let snapshot = self.store.snapshot();
        let Some(routes) = snapshot.get(type_url::ROUTE) else {
            return false;
        };
        let rds = type_url::short(type_url::ROUTE);
        self.registry.envoys().iter().all(|e| {
            e.types.get(rds).and_then(|s| s.acked_version.as_deref())
                == Some(routes.version.as_str())
        })
    }

    fn promote_canary_to_stable(&self, service: &str) -> Result<Vec<String>, RouterError> {
        let promoted = self
            .store
            .promote_canary_to_stable(service)
            .map_err(router_error)?;
        Ok(promoted
            .stable
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect())
    }

    fn empty_canary(&self, service: &str) -> Result<(), RouterError> {
        self.store
            .empty_canary(service)
            .map(drop)
            .map_err(router_error)
    }

    fn is_finalized(&self, service: &str) -> Result<bool, RouterError> {
        let svc = self
            .store
            .service(service)
            .map_err(|e| router_error(e.into()))?;
        Ok(svc.canary_weight.percent() == 0
            && !svc.stable.endpoints.is_empty()
            && svc.stable.endpoints == svc.canary.endpoints)
    }
}

/// A weight from the engine or the API as the Store takes it.
fn valid_weight(weight: u32) -> Result<Weight, RouterError> {
    Weight::try_from(i64::from(weight)).map_err(|e| RouterError::Invalid(e.to_string()))
}
