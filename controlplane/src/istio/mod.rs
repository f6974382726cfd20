//! Istio mode: [`IstioRouter`], the [`TrafficRouter`] over the Kubernetes
//! API, for meshes where istiod (not our ADS) configures the Envoys.
//!
//! Like Flagger and Argo Rollouts with subset-level splitting, a rollout
//! moves `VirtualService.spec.http[].route[].weight` between the stable and
//! canary subsets of a DestinationRule, and istiod pushes the result. The
//! filter config (shadow routes, rules) goes to the `pluginConfig` of the
//! WasmPlugin that loads the filter.
//!
//! # Where the weight lives
//! The durable home of the weight is the VirtualService itself: at start
//! ([`IstioRouter::start`]) every configured VirtualService is read and the
//! desired weight starts as what it holds. After that the router keeps the
//! desired weights in memory ([`TrafficRouter::weight`] returns them) and
//! one tokio task ([`IstioRouter::run`]) writes them and reads them back;
//! the trait's methods never wait on the API server.
//!
//! # How a weight is written, and conflicts
//! See [`resources`]: `spec.http` is an atomic list for server-side apply,
//! so the write is a JSON merge patch of the whole list as read, guarded by
//! `metadata.resourceVersion`. The router never overwrites a write it has
//! not seen: a 409 (the object changed since our read), a weight found
//! different from the one we last read or wrote (another writer changed
//! it), a 403 (RBAC) and any other refusal become a [`TrafficRouter::rejection`]
//! naming the object and the reason, and the engine halts the step as it
//! does on an Envoy NACK. A rejected change is not retried; the next change
//! (a rollback, say) is written over a fresh read. Transient failures
//! (timeouts, 5xx) are retried.
//!
//! A change is named `ChangeId { type_url: "kubernetes:VirtualService
//! <ns>/<name>", version: "<start ms>-<n>" }` (`WasmPlugin` likewise); the
//! start time keeps versions of different runs apart in a rollout's record.
//! [`TrafficRouter::routing_applied_everywhere`]: every service's
//! VirtualService, read back, holds its desired weight, and no filter
//! config change is waiting.
//!
//! # Cohorts
//! A rollout's cohort steps become http routes named
//! `understudy-cohort-<service>-<n>` right ahead of the configured route:
//! each a copy of it that also matches the cohort's header (or the
//! `cookie` header's regex) and goes to the canary subset alone. They are
//! written in the same patch as the weight, with the annotation
//! [`resources::COHORTS_ANNOTATION`] naming the cohorts they were rendered
//! from, so a read tells routes as we wrote them from anyone's edit (which
//! is a rejection, as a changed weight is).
//!
//! # Finishing a rollout
//! In Istio terms promotion is the stable workload running the new version
//! (Flagger copies the canary's pod spec into the primary Deployment;
//! Argo re-labels the subsets). That is a change to the user's Deployment,
//! which this router does not own and cannot make. So a rollout here ends
//! with the canary subset at 100 %; [`TrafficRouter::promote_canary_to_stable`]
//! refuses with a sentence saying what to do: update the stable
//! Deployment to the new version, then set the weight back to 0
//! (`understudy` or a new rollout). Set `finalize: {automatic: false}` in
//! Istio-mode rollout specs.

pub mod config;
pub mod resources;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{info, warn};

pub use config::{ConfigError, IstioConfig, IstioService, ObjectRef};

use crate::model::{ClusterNames, Cohort, FlagHeader, MAX_COHORTS};
use crate::store::{ChangeError, Store};
use crate::traffic::{ChangeId, RouterError, ShadowTarget, TrafficRouter};
use resources::Split;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "understudy";
/// Rejections remembered (newest kept).
pub const MAX_REJECTIONS: usize = 256;
/// Every VirtualService is read back at least this often, so a write by
/// someone else is found even when no change is waiting.
pub const RESYNC: Duration = Duration::from_secs(5);
/// The longest one API call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What promotion means here (see the module docs).
pub const PROMOTION: &str = "Istio mode cannot make the canary's version the stable one: \
    that is an update of the stable Deployment, which understudy does not own. \
    The canary subset keeps 100 %; update the stable workload to the new version, \
    then set the weight back to 0";

#[derive(Debug, thiserror::Error)]
pub enum IstioError {
    #[error("reading VirtualService {vs} (service {service:?}): {reason}")]
    Start {
        service: String,
        vs: String,
        reason: String,
    },
}

/// One service's weight and cohorts as desired and as read back.
#[derive(Debug)]
struct ServiceState {
    /// Its cohorts are always `Some`.
    desired: Split,
    /// The change that set `desired`, until it is read back or rejected.
    pending: Option<ChangeId>,
    /// The last change read back as applied: a later write by someone else
    /// is reported as a rejection of it (the engine halts, as on a NACK).
    applied: Option<ChangeId>,
    /// The split last read back.
    observed: Option<Split>,
    /// The weight understudy last read and accounted for, or wrote: a
    /// read that finds another one found someone else's write. `None`
    /// after a 409: the next read is taken as is.
    known: Option<Split>,
    /// Why the route cannot carry a rollout, from the last read.
    problem: Option<String>,
}

#[derive(Debug, Default)]
struct PluginState {
    /// The last `set_shadow` change not yet read back.
    pending: Option<ChangeId>,
    /// The pluginConfig last read back equal to what we applied.
    applied: Option<Value>,
    /// A pluginConfig the API server refused, and why: not retried until
    /// it changes.
    refused: Option<(Value, String)>,
}

#[derive(Debug)]
struct Rejection {
    change: ChangeId,
    at_ms: u64,
    what: String,
}

#[derive(Debug)]
struct Shared {
    services: BTreeMap<String, ServiceState>,
    plugin: PluginState,
    rejections: VecDeque<Rejection>,
    next: u64,
}

/// The [`TrafficRouter`] over VirtualServices and a WasmPlugin.
pub struct IstioRouter {
    config: IstioConfig,
    store: Store,
    client: Client,
    started_ms: u64,
    shared: Mutex<Shared>,
    wake: Notify,
}

impl std::fmt::Debug for IstioRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioRouter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: format!("{group}/{version}"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// An API call's failure: whether retrying can help, and a sentence.
#[derive(Debug)]
struct CallError {
    /// The API server refused (4xx other than 408/429): final.
    refused: bool,
    code: u16,
    what: String,
}

fn call_error(e: kube::Error) -> CallError {
    match e {
        kube::Error::Api(status) => {
            let code = status.code;
            let refused = (400..500).contains(&code) && code != 408 && code != 429;
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", status.reason)
            };
            CallError {
                refused,
                code,
                what: format!("{code}{reason}: {}", status.message),
            }
        }
        other => CallError {
            refused: false,
            code: 0,
            what: other.to_string(),
        },
    }
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(call_error),
        Err(_) => Err(CallError {
            refused: false,
            code: 0,
            what: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
    }
}

/// Who wrote the object last, other than us (from `managedFields`).
fn other_writer(obj: &DynamicObject) -> String {
    obj.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() != Some(FIELD_MANAGER))
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
        .and_then(|m| m.manager.clone())
        .map_or_else(|| "another writer".to_owned(), |m| format!("{m:?}"))
}

/// Cohorts as a sentence lists them (`none`; `unreadable` for routes not
/// as understudy wrote them).
fn cohort_list(cohorts: Option<&[Cohort]>) -> String {
    match cohorts {
        None => "unreadable".to_owned(),
        Some([]) => "none".to_owned(),
        Some(c) => c
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn router_error(e: ChangeError) -> RouterError {
    match e {
        ChangeError::Invalid(e) => RouterError::Invalid(e.to_string()),
        ChangeError::Persist(e) => RouterError::NotSaved(e.to_string()),
    }
}

impl IstioRouter {
    /// Reads every configured VirtualService (its weight is where the
    /// desired weight starts) and starts the task that applies changes.
    /// Fails if one cannot be read: the configuration or the RBAC is wrong.
    pub async fn start(
        client: Client,
        config: IstioConfig,
        store: Store,
    ) -> Result<Arc<Self>, IstioError> {
        let router = Arc::new(Self {
            client,
            store,
            started_ms: crate::time::now_unix_ms(),
            shared: Mutex::new(Shared {
                services: BTreeMap::new(),
                plugin: PluginState::default(),
                rejections: VecDeque::new(),
                next: 0,
            }),
            wake: Notify::new(),
            config,
        });
        for (name, svc) in &router.config.services {
            let fail = |reason: String| IstioError::Start {
                service: name.clone(),
                vs: svc.virtual_service.to_string(),
                reason,
            };
            let obj = timed(router.vs_api(svc).get(&svc.virtual_service.name))
                .await
                .map_err(|e| fail(e.what))?;
            let split = resources::http_routes(&obj.data)
                .and_then(|http| {
                    resources::read_split(obj.metadata.annotations.as_ref(), &http, svc, name)
                })
                .map_err(fail)?;
            info!(service = %name, vs = %svc.virtual_service, weight = split.weight,
                cohorts = ?split.cohorts, "Istio: read the canary weight and cohorts back");
            // Cohort routes not as we wrote them start as none desired: the
            // next write (the engine restoring a rollout's cohorts, say)
            // replaces them, as they are ours by name.
            let desired = Split {
                weight: split.weight,
                cohorts: Some(split.cohorts.clone().unwrap_or_default()),
            };
            router.lock().services.insert(
                name.clone(),
                ServiceState {
                    desired,
                    pending: None,
                    applied: None,
                    observed: Some(split.clone()),
                    known: Some(split),
                    problem: None,
                },
            );
        }
        tokio::spawn(Arc::clone(&router).run());
        Ok(router)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vs_api(&self, svc: &IstioService) -> Api<DynamicObject> {
        let ar = resource(
            resources::VS_GROUP,
            resources::VS_VERSION,
            resources::VS_KIND,
            resources::VS_PLURAL,
        );
        Api::namespaced_with(self.client.clone(), &svc.virtual_service.namespace, &ar)
    }

    fn plugin_api(&self, plugin: &ObjectRef) -> Api<DynamicObject> {
        let ar = resource(
            resources::WASM_GROUP,
            resources::WASM_VERSION,
            resources::WASM_KIND,
            resources::WASM_PLURAL,
        );
        Api::namespaced_with(self.client.clone(), &plugin.namespace, &ar)
    }

    /// Istio's Envoy cluster names of a service's two subsets
    /// (`outbound|<port>|<subset>|<host>`), for naming the evidence.
    pub fn cluster_names(&self, service: &str) -> Option<ClusterNames> {
        let svc = self.config.services.get(service)?;
        Some(ClusterNames {
            stable: svc.cluster(&svc.stable_subset),
            canary: svc.cluster(&svc.canary_subset),
        })
    }

    /// The filter config the WasmPlugin carries: the Store's, as each
    /// sidecar gets it, fleet-wide rates divided among the sidecars that
    /// enforce them (the Store's fleet size: in a mesh, those that reported
    /// usage lately).
    pub fn plugin_config(&self) -> Value {
        let doc = crate::xds::resources::per_envoy_config(
            &self.store.current().filter,
            self.store.fleet(),
        );
        serde_json::to_value(doc).unwrap_or(Value::Null)
    }

    fn change_id(&self, shared: &mut Shared, kind: &str, object: &ObjectRef) -> ChangeId {
        shared.next = shared.next.saturating_add(1);
        ChangeId {
            type_url: format!("kubernetes:{kind} {object}"),
            version: format!("{}-{}", self.started_ms, shared.next),
        }
    }

    fn reject(&self, change: ChangeId, what: String) {
        warn!(change = ?change, %what, "Istio: change rejected");
        let mut s = self.lock();
        s.rejections.push_back(Rejection {
            change,
            at_ms: crate::time::now_unix_ms(),
            what,
        });
        while s.rejections.len() > MAX_REJECTIONS {
            s.rejections.pop_front();
        }
    }

    /// The worker: applies desired changes and reads them back, when woken
    /// by a change, when the Store's filter config changes, and every
    /// [`RESYNC`]. Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut snapshots = self.store.subscribe();
        loop {
            self.sync_once().await;
            tokio::select! {
                () = self.wake.notified() => {}
                r = snapshots.changed() => {
                    if r.is_err() {
                        // The Store is gone: only the timer and wakes remain.
                        snapshots = self.store.subscribe();
                    }
                }
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    /// One pass over every service, then the WasmPlugin.
    pub async fn sync_once(&self) {
        for (name, svc) in &self.config.services {
            self.sync_service(name, svc).await;
        }
        if let Some(plugin) = &self.config.wasm_plugin {
            self.sync_plugin(plugin).await;
        }
    }

    async fn sync_service(&self, name: &str, svc: &IstioService) {
        let vs = &svc.virtual_service;
        let api = self.vs_api(svc);
        let obj = match timed(api.get(&vs.name)).await {
            Ok(obj) => obj,
            Err(e) => {
                let pending = self.lock().services.get_mut(name).and_then(|st| {
                    st.problem = Some(format!("reading VirtualService {vs}: {}", e.what));
                    if e.refused { st.pending.take() } else { None }
                });
                match pending {
                    Some(change) => self.reject(
                        change,
                        format!(
                            "the Kubernetes API refused to read VirtualService {vs}: {}",
                            e.what
                        ),
                    ),
                    None => {
                        warn!(service = name, %vs, error = %e.what, "Istio: reading the VirtualService failed")
                    }
                }
                return;
            }
        };
        let rv = obj.metadata.resource_version.clone().unwrap_or_default();
        let annotations = obj.metadata.annotations.as_ref();
        let http = resources::http_routes(&obj.data);
        let current = http
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|h| resources::read_split(annotations, h, svc, name));
        // Decide under the lock, call the API without it.
        enum Next {
            Nothing,
            Reject(ChangeId, String),
            Write(ChangeId, Split),
        }
        let next = {
            let mut s = self.lock();
            let Some(st) = s.services.get_mut(name) else {
                return;
            };
            match current {
                Err(problem) => {
                    st.problem = Some(format!("VirtualService {vs} {problem}"));
                    match st.pending.take() {
                        Some(c) => Next::Reject(c, format!("VirtualService {vs} {problem}")),
                        None => Next::Nothing,
                    }
                }
                Ok(current) => {
                    st.problem = None;
                    st.observed = Some(current.clone());
                    let known = st.known.replace(current.clone());
                    let foreign = known.as_ref().is_some_and(|k| *k != current);
                    let found = |k: Split| {
                        let what = if k.weight == current.weight {
                            format!(
                                "its cohort routes are not the ones ({}) understudy last read or wrote",
                                cohort_list(k.cohorts.as_deref())
                            )
                        } else {
                            format!(
                                "the canary weight is {}, not the {} understudy last read or wrote",
                                current.weight, k.weight
                            )
                        };
                        format!(
                            "VirtualService {vs} {}: {what}: {} changed it (resourceVersion {rv}); not overwritten",
                            svc.route_label(),
                            other_writer(&obj)
                        )
                    };
                    match (st.pending.take(), known) {
                        (Some(c), Some(k)) if foreign => Next::Reject(c, found(k)),
                        (Some(c), _) if current == st.desired => {
                            st.applied = Some(c);
                            Next::Nothing
                        }
                        (Some(c), _) => {
                            st.pending = Some(c.clone());
                            Next::Write(c, st.desired.clone())
                        }
                        // Someone else's write while nothing was waiting: a
                        // rejection of the change it undid, reported once.
                        (None, Some(k)) if foreign => match st.applied.take() {
                            Some(c) => Next::Reject(c, found(k)),
                            None => Next::Nothing,
                        },
                        (None, _) => Next::Nothing,
                    }
                }
            }
        };
        let (change, desired) = match next {
            Next::Nothing => return,
            Next::Reject(c, what) => return self.reject(c, what),
            Next::Write(c, w) => (c, w),
        };
        let cohorts = desired.cohorts.clone().unwrap_or_default();
        let body = match http
            .and_then(|h| resources::with_split(h, svc, name, desired.weight, &cohorts))
        {
            Ok(h) => resources::virtual_service_patch(
                vs,
                &rv,
                &h,
                resources::cohorts_annotation(annotations, name, &cohorts),
            ),
            Err(problem) => return self.reject(change, format!("VirtualService {vs} {problem}")),
        };
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match timed(api.patch(&vs.name, &params, &Patch::Merge(&body))).await {
            Ok(_) => {
                info!(service = name, %vs, weight = desired.weight, cohorts = cohorts.len(), "Istio: canary weight and cohorts written");
                if let Some(st) = self.lock().services.get_mut(name) {
                    st.known = Some(desired.clone());
                }
                // Read it back at once (the pending change clears then).
                self.wake.notify_one();
            }
            Err(e) if e.refused => {
                let why = match e.code {
                    409 => format!(
                        "VirtualService {vs} changed since understudy read it at resourceVersion {rv} \
                         ({}); the other writer's change is not overwritten",
                        e.what
                    ),
                    403 => format!("understudy may not write VirtualService {vs} ({})", e.what),
                    _ => format!(
                        "the Kubernetes API refused the weight {} for VirtualService {vs} ({})",
                        desired.weight, e.what
                    ),
                };
                if let Some(st) = self.lock().services.get_mut(name) {
                    if st.pending.as_ref() == Some(&change) {
                        st.pending = None;
                    }
                    if e.code == 409 {
                        // Whatever the next read finds is the new baseline:
                        // this conflict is the report of it.
                        st.known = None;
                    }
                }
                self.reject(change, why);
            }
            Err(e) => {
                warn!(service = name, %vs, error = %e.what, "Istio: writing the weight failed; will retry")
            }
        }
    }

    async fn sync_plugin(&self, plugin: &ObjectRef) {
        let desired = self.plugin_config();
        let pending = {
            let mut s = self.lock();
            if s.plugin.applied.as_ref() == Some(&desired) && s.plugin.pending.is_none() {
                return;
            }
            if let Some((refused, why)) = &s.plugin.refused
                && *refused == desired
            {
                // A change that asks again for what was refused (the Store
                // publishes before `set_shadow` names its change) is refused
                // for the same reason.
                let why = why.clone();
                let change = s.plugin.pending.take();
                drop(s);
                if let Some(c) = change {
                    self.reject(c, why);
                }
                return;
            }
            s.plugin.pending.clone()
        };
        let api = self.plugin_api(plugin);
        let body = resources::wasm_plugin_patch(plugin, &desired);
        let written = timed(api.patch(
            &plugin.name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&body),
        ))
        .await;
        let refusal = match written {
            Ok(_) => match timed(api.get(&plugin.name)).await {
                Ok(obj) => {
                    let back = obj.data.get("spec").and_then(|s| s.get("pluginConfig"));
                    if back == Some(&desired) {
                        let mut s = self.lock();
                        s.plugin.applied = Some(desired);
                        s.plugin.refused = None;
                        if s.plugin.pending == pending {
                            s.plugin.pending = None;
                        }
                        return;
                    }
                    warn!(%plugin, "Istio: the WasmPlugin's pluginConfig reads back different; will retry");
                    return;
                }
                Err(e) if e.refused => e,
                Err(e) => {
                    warn!(%plugin, error = %e.what, "Istio: reading the WasmPlugin back failed; will retry");
                    return;
                }
            },
            Err(e) if e.refused => e,
            Err(e) => {
                warn!(%plugin, error = %e.what, "Istio: applying the WasmPlugin failed; will retry");
                return;
            }
        };
        let why = match refusal.code {
            409 => format!(
                "WasmPlugin {plugin}: another field manager owns part of spec.pluginConfig ({}); \
                 not overwritten",
                refusal.what
            ),
            403 => format!(
                "understudy may not write WasmPlugin {plugin} ({})",
                refusal.what
            ),
            _ => format!(
                "the Kubernetes API refused the filter config for WasmPlugin {plugin} ({})",
                refusal.what
            ),
        };
        let change = {
            let mut s = self.lock();
            s.plugin.refused = Some((desired, why.clone()));
            if s.plugin.pending == pending {
                s.plugin.pending = None;
            }
            pending
        };
        // A change named after this pass began is refused on the next one.
        self.wake.notify_one();
        match change {
            Some(c) => self.reject(c, why),
            None => warn!(%plugin, %why, "Istio: filter config not applied"),
        }
    }

    fn plugin_ref(&self) -> Result<&ObjectRef, RouterError> {
        self.config.wasm_plugin.as_ref().ok_or_else(|| {
            RouterError::Invalid(
                "Istio mode has no wasm_plugin in --istio-config: a shadow stage needs the \
                 WasmPlugin that carries the filter config"
                    .to_owned(),
            )
        })
    }
}

impl TrafficRouter for IstioRouter {
    fn weight(&self, service: &str) -> Result<u32, RouterError> {
        self.lock()
            .services
            .get(service)
            .map(|s| s.desired.weight)
            .ok_or_else(|| RouterError::UnknownService(service.to_owned()))
    }

    fn set_weight(
        &self,
        service: &str,
        weight: u32,
        forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError> {
        let cohorts = self.cohorts(service)?.unwrap_or_default();
        self.set_split(service, weight, &cohorts, &FlagHeader::default(), forced)
    }

    fn cohorts(&self, service: &str) -> Result<Option<Vec<Cohort>>, RouterError> {
        self.lock()
            .services
            .get(service)
            .map(|s| s.desired.cohorts.clone())
            .ok_or_else(|| RouterError::UnknownService(service.to_owned()))
    }

    fn set_split(
        &self,
        service: &str,
        weight: u32,
        cohorts: &[Cohort],
        _flags: &FlagHeader,
        _forced: bool,
    ) -> Result<Vec<ChangeId>, RouterError> {
        // `forced` needs nothing here: the only durable home is the
        // VirtualService, which the worker writes either way. The flags
        // header is not rendered in Istio mode (OFREP serves the flags).
        if weight > 100 {
            return Err(RouterError::Invalid(format!(
                "weight {weight} is not 0..=100"
            )));
        }
        if cohorts.len() > MAX_COHORTS {
            return Err(RouterError::Invalid(format!(
                "{} cohorts; at most {MAX_COHORTS}",
                cohorts.len()
            )));
        }
        let svc = self
            .config
            .services
            .get(service)
            .ok_or_else(|| RouterError::UnknownService(service.to_owned()))?;
        let wanted = Split {
            weight,
            cohorts: Some(cohorts.to_vec()),
        };
        let change = {
            let mut s = self.lock();
            let desired = s.services.get(service).map(|st| &st.desired);
            if desired == Some(&wanted) {
                return Ok(Vec::new());
            }
            let change = self.change_id(&mut s, "VirtualService", &svc.virtual_service);
            let st = s
                .services
                .get_mut(service)
                .ok_or_else(|| RouterError::UnknownService(service.to_owned()))?;
            st.desired = wanted;
            // A change not yet written is superseded by this one.
            st.pending = Some(change.clone());
            change
        };
        self.wake.notify_one();
        Ok(vec![change])
    }

    fn shadow(&self, route: &str) -> Result<Option<ShadowTarget>, RouterError> {
        self.plugin_ref()?;
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
        let plugin = self.plugin_ref()?;
        let before = self.store.shadow_target(route);
        let result = self.store.set_shadow_target(route, target, forced);
        // A forced change that failed to save is still in the Store's
        // config, so it is still published.
        if self.store.shadow_target(route) == before {
            return result.map(|()| Vec::new()).map_err(router_error);
        }
        let change = {
            let mut s = self.lock();
            let change = self.change_id(&mut s, "WasmPlugin", plugin);
            s.plugin.pending = Some(change.clone());
            change
        };
        self.wake.notify_one();
        result.map(|()| vec![change]).map_err(router_error)
    }

    fn check_service(&self, service: &str) -> Result<(), RouterError> {
        let svc = self
            .config
            .services
            .get(service)
            .ok_or_else(|| RouterError::UnknownService(service.to_owned()))?;
        let s = self.lock();
        match s.services.get(service).and_then(|st| st.problem.clone()) {
            Some(problem) => Err(RouterError::Invalid(problem)),
            None if s.services.contains_key(service) => Ok(()),
            None => Err(RouterError::Invalid(format!(
                "VirtualService {} was never read",
                svc.virtual_service
            ))),
        }
    }

    fn canary_cluster(&self, service: &str) -> String {
        self.data_plane_clusters(service).canary
    }

    fn data_plane_clusters(&self, service: &str) -> ClusterNames {
        self.cluster_names(service)
            .unwrap_or_else(|| ClusterNames::of(service))
    }

    fn rejection(&self, changes: &[ChangeId], since_ms: u64) -> Option<String> {
        self.lock()
            .rejections
            .iter()
            .find(|r| r.at_ms >= since_ms && changes.contains(&r.change))
            .map(|r| r.what.clone())
    }

    fn routing_applied_everywhere(&self) -> bool {
        let s = self.lock();
        s.services
            .values()
            .all(|st| st.pending.is_none() && st.observed.as_ref() == Some(&st.desired))
            && s.plugin.pending.is_none()
    }

    fn manual_promotion(&self, _service: &str) -> Option<String> {
        Some(PROMOTION.to_owned())
    }

    fn sticky_unsupported(&self) -> Option<String> {
        Some(
            "sticky: not available in Istio mode: the VirtualService splits each request \
             at random, and a DestinationRule's consistent hash picks endpoints within a \
             subset, not the subset"
                .to_owned(),
        )
    }

    fn promote_canary_to_stable(&self, _service: &str) -> Result<Vec<String>, RouterError> {
        Err(RouterError::Invalid(PROMOTION.to_owned()))
    }

    fn empty_canary(&self, _service: &str) -> Result<(), RouterError> {
        Err(RouterError::Invalid(PROMOTION.to_owned()))
    }

    fn is_finalized(&self, _service: &str) -> Result<bool, RouterError> {
        Ok(false)
    }
}
