//! The traffic port: how a rollout moves traffic, whatever carries it.
//!
//! A rollout only ever asks for four things: the canary's share of a
//! service's traffic, a route's shadow copy to the canary on or off, what
//! the data plane made of those changes (rejections, and whether every
//! proxy has applied the routing), and at the end, the canary's backend
//! becoming the stable one. [`TrafficRouter`] is those questions; today's
//! implementation is our own ADS ([`crate::xds::router::AdsRouter`]: RDS
//! weighted clusters, and the filter's route config over ECDS). An Istio
//! router would set a VirtualService's weights instead, behind the same
//! trait: the engine does not change.
//!
//! The desired state a router keeps is the one home of the weight: the
//! engine compares every target with [`TrafficRouter::weight`], never with
//! a copy of its own.

use serde::{Deserialize, Serialize};

use crate::model::{Cohort, FlagHeader};

/// One change a router published, as the data plane will name it when it
/// rejects it: for ADS the resource type URL and the config version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeId {
    pub type_url: String,
    pub version: String,
}

/// Where a route's shadow copies go while a shadow stage runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowTarget {
    /// The canary's cluster.
    pub cluster: String,
    /// Share of the route's requests copied, 0..=100.
    pub percent: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error("no route named {0:?} in the filter config")]
    UnknownRoute(String),
    /// The change is invalid for the router (nothing was changed).
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made durable. With `forced` it was still
    /// published (the data plane has it); without, nothing changed.
    #[error("not saved: {0}")]
    NotSaved(String),
}

/// Moves a service's traffic between its stable and canary backends.
///
/// Every method is synchronous and quick (an in-memory change plus, for
/// writes, one durable write of the desired state); none waits for the
/// data plane. `forced` on a write means: publish it to the data plane even
/// if it cannot be made durable, and still return the error (rollbacks take
/// traffic off the canary whatever the disk does).
pub trait TrafficRouter: Send + Sync {
    /// The service's canary weight (0..=100) as desired now.
    fn weight(&self, service: &str) -> Result<u32, RouterError>;

    /// Sets the canary weight; the changes published (empty when it was
    /// already so).
    fn set_weight(
        &self,
        service: &str,
        weight: u32,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError>;

    /// The cohorts routed to the service's canary as desired now; `None`
    /// for routers that keep none (a rollout with cohort steps is refused
    /// there).
    fn cohorts(&self, _service: &str) -> Result<Option<Vec<Cohort>>, RouterError> {
        Ok(None)
    }

    /// The flags header the service's routes render as desired now; `None`
    /// for routers that render none.
    fn flags(&self, _service: &str) -> Result<Option<FlagHeader>, RouterError> {
        Ok(None)
    }

    /// Sets the canary weight, the cohorts routed to the canary and the
    /// flags the routes tell the app (`x-understudy-flags`) in one change.
    /// Routers without cohorts set the weight alone, refuse a cohort, and
    /// render no flags header (the flags are still served over OFREP).
    fn set_split(
        &self,
        service: &str,
        weight: u32,
        cohorts: &[Cohort],
        _flags: &FlagHeader,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError> {
        if !cohorts.is_empty() {
            return Err(RouterError::Invalid(
                "this traffic router cannot send a cohort to the canary".to_owned(),
            ));
        }
        self.set_weight(service, weight, forced)
    }

    /// A route's shadow target as desired now; `None`: not shadowed.
    fn shadow(&self, route: &str) -> Result<Option<ShadowTarget>, RouterError>;

    /// Turns a route's shadowing on (to `target`) or off (`None`), keeping
    /// any comparison rules the route has.
    fn set_shadow(
        &self,
        route: &str,
        target: Option<ShadowTarget>,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError>;

    /// Whether a rollout may start on `service`: it exists and its canary
    /// has somewhere to send traffic.
    fn check_service(&self, service: &str) -> Result<(), RouterError>;

    /// The canary's cluster, for a shadow target.
    fn canary_cluster(&self, service: &str) -> String;

    /// The data-plane cluster names of a service's two backends, under
    /// which the proxies' stats arrive (the evidence is read by them). Our
    /// ADS names them `<service>-stable`/`-canary`; a mesh has its own.
    fn data_plane_clusters(&self, service: &str) -> crate::model::ClusterNames {
        crate::model::ClusterNames::of(service)
    }

    /// The first rejection, at or after `since_ms` (Unix ms), of one of
    /// `changes`, as a sentence naming who rejected what and why.
    fn rejection(&self, changes: &[ChangeId], since_ms: u64) -> Option<String>;

    /// Whether every connected proxy has applied the current routing.
    fn routing_applied_everywhere(&self) -> bool;

    /// `Some(why)` when promotion is not this router's to make (Istio mode:
    /// it is an update of the user's stable Deployment). Automatic
    /// finalizing then records once that it was not done, and why, instead
    /// of retrying every tick.
    fn manual_promotion(&self, _service: &str) -> Option<String> {
        None
    }

    /// Whether this router's routes pin a request carrying a service's
    /// probe header to one backend (see "Synthetic probes" in the README).
    /// Without it, rollouts that declare probes are refused.
    fn probe_pins(&self) -> bool {
        false
    }

    /// `Some(why)` when this router cannot keep each user on one version
    /// ([`crate::model::Service::sticky`]): the API then refuses a sticky
    /// service instead of storing a setting nothing would apply.
    fn sticky_unsupported(&self) -> Option<String> {
        None
    }

    /// Finishing a rollout: the canary's backend becomes the stable one and
    /// the weight returns to 0, in one change the data plane applies
    /// make-before-break. Returns the stable backend's endpoints.
    fn promote_canary_to_stable(&self, service: &str) -> Result<Vec<String>, RouterError>;

    /// Removes the canary's endpoints (after [`Self::promote_canary_to_stable`]).
    fn empty_canary(&self, service: &str) -> Result<(), RouterError>;

    /// Whether the service's stable and canary backends are the same and
    /// the weight is 0 (a finalize already happened).
    fn is_finalized(&self, service: &str) -> Result<bool, RouterError>;
}
