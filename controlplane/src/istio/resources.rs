//! The Istio objects as far as we read and write them, as serde types, and
//! the exact bodies the router sends ([`virtual_service_patch`],
//! [`wasm_plugin_patch`]).
//!
//! # Why a resourceVersion-guarded merge patch for the VirtualService
//! Istio's CRDs (`manifests/charts/base/files/crd-all.gen.yaml`) declare no
//! `x-kubernetes-list-type` on `VirtualService.spec.http` nor on
//! `http[].route`, and a CRD list without one is *atomic* for server-side
//! apply: whoever applies the list owns all of it, and an apply carrying
//! only our two destinations would replace the whole `http` list (every
//! other route, match and retry policy). SSA cannot name "the weight of the
//! second destination of route `primary`". So the weights are written the
//! way `kubectl edit` does it: read the object, change the two weights in
//! our copy of `spec.http`, and send a JSON merge patch with the whole
//! `http` list and `metadata.resourceVersion`. The API server refuses it
//! with 409 if anyone wrote the object since our read, so another writer's
//! change is never overwritten unseen. Every field we do not know is kept
//! as read (`#[serde(flatten)]` into `rest`).
//!
//! # Why server-side apply for the WasmPlugin
//! `WasmPlugin.spec.pluginConfig` is an object with
//! `x-kubernetes-preserve-unknown-fields`: SSA tracks its fields one by one
//! (its lists, like the filter's `routes`, atomically). The filter config is
//! ours alone, so we apply it as field manager `understudy` without
//! `force`: if another manager owns a field of it with another value, the
//! API server answers 409 and the router reports that conflict.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::{IstioService, ObjectRef};
use crate::model::{Cohort, HeaderTest};

pub const VS_GROUP: &str = "networking.istio.io";
pub const VS_VERSION: &str = "v1";
pub const VS_KIND: &str = "VirtualService";
pub const VS_PLURAL: &str = "virtualservices";
pub const WASM_GROUP: &str = "extensions.istio.io";
pub const WASM_VERSION: &str = "v1alpha1";
pub const WASM_KIND: &str = "WasmPlugin";
pub const WASM_PLURAL: &str = "wasmplugins";

/// `VirtualService.spec.http[]`: the fields we read, the rest kept as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `http[].route[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `http[].route[].destination`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PatchMeta<'a> {
    name: &'a str,
    namespace: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_version: Option<&'a str>,
    /// Merged key by key; a `null` value removes the annotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<&'static str, Option<String>>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VirtualServicePatch<'a> {
    api_version: String,
    kind: &'static str,
    metadata: PatchMeta<'a>,
    spec: VirtualServiceSpecPatch<'a>,
}

#[derive(Serialize)]
struct VirtualServiceSpecPatch<'a> {
    http: &'a [HttpRoute],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmPluginApply<'a> {
    api_version: String,
    kind: &'static str,
    metadata: PatchMeta<'a>,
    spec: WasmPluginSpecApply<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmPluginSpecApply<'a> {
    plugin_config: &'a Value,
}

/// The JSON merge patch (`application/merge-patch+json`) that writes a
/// VirtualService's `spec.http` as read at `resource_version`, with our
/// weights in it (see the module docs for why the whole list).
/// `cohorts`: the new [`COHORTS_ANNOTATION`] when it changes (`Some(None)`:
/// removed); `None` leaves the annotations alone.
pub fn virtual_service_patch(
    vs: &ObjectRef,
    resource_version: &str,
    http: &[HttpRoute],
    cohorts: Option<Option<String>>,
) -> Value {
    serde_json::to_value(VirtualServicePatch {
        api_version: format!("{VS_GROUP}/{VS_VERSION}"),
        kind: VS_KIND,
        metadata: PatchMeta {
            name: &vs.name,
            namespace: &vs.namespace,
            resource_version: Some(resource_version),
            annotations: cohorts.map(|c| BTreeMap::from([(COHORTS_ANNOTATION, c)])),
        },
        spec: VirtualServiceSpecPatch { http },
    })
    .unwrap_or(Value::Null)
}

/// The server-side apply body (`application/apply-patch+yaml`, field
/// manager `understudy`, no force) that sets a WasmPlugin's `pluginConfig`.
pub fn wasm_plugin_patch(plugin: &ObjectRef, plugin_config: &Value) -> Value {
    serde_json::to_value(WasmPluginApply {
        api_version: format!("{WASM_GROUP}/{WASM_VERSION}"),
        kind: WASM_KIND,
        metadata: PatchMeta {
            name: &plugin.name,
            namespace: &plugin.namespace,
            resource_version: None,
            annotations: None,
        },
        spec: WasmPluginSpecApply { plugin_config },
    })
    .unwrap_or(Value::Null)
}

/// Reads `spec.http` of a VirtualService's `data` (the object minus its
/// metadata).
pub fn http_routes(data: &Value) -> Result<Vec<HttpRoute>, String> {
    let http = data
        .get("spec")
        .and_then(|s| s.get("http"))
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    serde_json::from_value(http).map_err(|e| format!("spec.http does not parse: {e}"))
}

/// The index of the configured route in `http`, and of its stable and
/// canary destinations; a sentence when the route is not as a rollout
/// needs it (exactly two destinations: the host's stable and canary subsets).
pub fn locate(http: &[HttpRoute], svc: &IstioService) -> Result<(usize, usize, usize), String> {
    let index = match &svc.route {
        Some(name) => http
            .iter()
            .position(|r| r.name.as_deref() == Some(name.as_str()))
            .ok_or_else(|| format!("has no http route named {name:?}"))?,
        // Our cohort routes go ahead of the configured one: "the first"
        // is the first that is not one of them.
        None => http
            .iter()
            .position(|r| !is_cohort_route(r))
            .ok_or_else(|| "has no http route".to_owned())?,
    };
    let route = &http[index];
    let find = |subset: &str| {
        route.route.iter().position(|d| {
            d.destination.host == svc.host && d.destination.subset.as_deref() == Some(subset)
        })
    };
    let stable = find(&svc.stable_subset);
    let canary = find(&svc.canary_subset);
    match (stable, canary) {
        (Some(s), Some(c)) if route.route.len() == 2 => Ok((index, s, c)),
        (Some(_), Some(_)) => Err(format!(
            "{}: has {} destinations; a rollout needs exactly the two subsets {:?} and {:?} of {}",
            svc.route_label(),
            route.route.len(),
            svc.stable_subset,
            svc.canary_subset,
            svc.host
        )),
        _ => Err(format!(
            "{}: has no destination for subset {:?} of {}",
            svc.route_label(),
            if stable.is_none() {
                &svc.stable_subset
            } else {
                &svc.canary_subset
            },
            svc.host
        )),
    }
}

/// The canary's weight in the configured route (an absent weight is 0).
pub fn canary_weight(http: &[HttpRoute], svc: &IstioService) -> Result<u32, String> {
    let (i, _, c) = locate(http, svc)?;
    let w = http[i].route[c].weight.unwrap_or(0);
    u32::try_from(w)
        .ok()
        .filter(|w| *w <= 100)
        .ok_or_else(|| format!("{}: canary weight {w} is not 0..=100", svc.route_label()))
}

/// `http` with the configured route's weights set to `100 - canary` and
/// `canary`, everything else as it was.
pub fn with_weight(
    mut http: Vec<HttpRoute>,
    svc: &IstioService,
    canary: u32,
) -> Result<Vec<HttpRoute>, String> {
    let (i, s, c) = locate(&http, svc)?;
    let canary = canary.min(100);
    let stable = 100 - canary;
    // Both fit in i32: they are at most 100.
    http[i].route[s].weight = Some(stable as i32);
    http[i].route[c].weight = Some(canary as i32);
    Ok(http)
}

/// The name prefix of the http routes understudy writes for cohorts:
/// `understudy-cohort-<service>-<n>`, ahead of the configured route.
pub const COHORT_ROUTE: &str = "understudy-cohort-";
/// The VirtualService annotation that names, per service, the cohorts its
/// cohort routes carry (a JSON object: service → cohorts). The routes are
/// what Istio acts on; the annotation says which cohorts we rendered them
/// from, so a read can tell ours, as we wrote them, from anyone's edit.
pub const COHORTS_ANNOTATION: &str = "understudy.io/cohorts";

fn is_cohort_route(r: &HttpRoute) -> bool {
    r.name
        .as_deref()
        .is_some_and(|n| n.starts_with(COHORT_ROUTE))
}

fn cohort_route_prefix(service: &str) -> String {
    format!("{COHORT_ROUTE}{service}-")
}

/// A service's split as its VirtualService holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub weight: u32,
    /// The cohorts routed to the canary; `None` when the cohort routes
    /// are not what understudy rendered from the annotation's cohorts
    /// (someone edited, added or removed one).
    pub cohorts: Option<Vec<Cohort>>,
}

/// The annotation's map of service → cohorts; empty when absent, `None`
/// when it does not parse.
fn annotated(
    annotations: Option<&BTreeMap<String, String>>,
) -> Option<BTreeMap<String, Vec<Cohort>>> {
    match annotations.and_then(|a| a.get(COHORTS_ANNOTATION)) {
        None => Some(BTreeMap::new()),
        Some(text) => serde_json::from_str(text).ok(),
    }
}

/// The service's weight and cohorts as the VirtualService holds them.
pub fn read_split(
    annotations: Option<&BTreeMap<String, String>>,
    http: &[HttpRoute],
    svc: &IstioService,
    service: &str,
) -> Result<Split, String> {
    let weight = canary_weight(http, svc)?;
    let claimed = annotated(annotations).map(|mut all| all.remove(service).unwrap_or_default());
    // Ours as we wrote them: rendering the claimed cohorts into the
    // routes gives back exactly what was read.
    let cohorts = claimed.filter(|claimed| {
        with_split(http.to_vec(), svc, service, weight, claimed).as_deref() == Ok(http)
    });
    Ok(Split { weight, cohorts })
}

/// The annotation's new value with `service`'s cohorts set, when that
/// changes it (`Some(None)`: no service has any left, so it goes); `None`
/// when it stays as it is.
pub fn cohorts_annotation(
    annotations: Option<&BTreeMap<String, String>>,
    service: &str,
    cohorts: &[Cohort],
) -> Option<Option<String>> {
    let mut all = annotated(annotations).unwrap_or_default();
    if cohorts.is_empty() {
        all.remove(service);
    } else {
        all.insert(service.to_owned(), cohorts.to_vec());
    }
    let new = (!all.is_empty()).then(|| serde_json::to_string(&all).unwrap_or_default());
    let old = annotations.and_then(|a| a.get(COHORTS_ANNOTATION)).cloned();
    (new != old).then_some(new)
}

/// `http` with the configured route's weights set (as [`with_weight`]) and
/// the service's cohort routes replaced by one per cohort, in order, right
/// ahead of the configured route. Each is a copy of the configured route
/// (its timeouts, retries, rewrites and headers) that matches what the
/// configured route matches *and* the cohort, and goes to the canary
/// subset alone.
pub fn with_split(
    http: Vec<HttpRoute>,
    svc: &IstioService,
    service: &str,
    canary: u32,
    cohorts: &[Cohort],
) -> Result<Vec<HttpRoute>, String> {
    let prefix = cohort_route_prefix(service);
    let mut http: Vec<HttpRoute> = http
        .into_iter()
        .filter(|r| !r.name.as_deref().is_some_and(|n| n.starts_with(&prefix)))
        .collect();
    http = with_weight(http, svc, canary)?;
    let (i, _, c) = locate(&http, svc)?;
    let main = &http[i];
    let routes = cohorts
        .iter()
        .enumerate()
        .map(|(n, cohort)| {
            let mut rest = main.rest.clone();
            rest.insert("match".to_owned(), cohort_match(main, svc, cohort)?);
            let to = &main.route[c];
            Ok(HttpRoute {
                name: Some(format!("{prefix}{n}")),
                route: vec![RouteDestination {
                    destination: to.destination.clone(),
                    weight: None,
                    rest: to.rest.clone(),
                }],
                rest,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    http.splice(i..i, routes);
    Ok(http)
}

/// The configured route's match clauses (one that matches everything if
/// it has none), each with the cohort's header test added. A clause that
/// already tests that header cannot take a second test of it.
fn cohort_match(main: &HttpRoute, svc: &IstioService, cohort: &Cohort) -> Result<Value, String> {
    let (name, test) = cohort.header_test();
    let test = match test {
        HeaderTest::Exact(v) => serde_json::json!({ "exact": v }),
        // Istio reads `.*` as presence; Envoy, given it as a regex, also
        // matches only a header that is there.
        HeaderTest::Present => serde_json::json!({ "regex": ".*" }),
        HeaderTest::Regex(r) => serde_json::json!({ "regex": r }),
    };
    let clauses = match main.rest.get("match") {
        None | Some(Value::Null) => vec![Value::Object(Map::new())],
        Some(Value::Array(clauses)) if !clauses.is_empty() => clauses.clone(),
        Some(Value::Array(_)) => vec![Value::Object(Map::new())],
        Some(_) => return Err(format!("{}: `match` is not a list", svc.route_label())),
    };
    clauses
        .into_iter()
        .map(|mut clause| {
            let obj = clause.as_object_mut().ok_or_else(|| {
                format!("{}: a `match` entry is not an object", svc.route_label())
            })?;
            let headers = obj
                .entry("headers")
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .ok_or_else(|| {
                    format!("{}: a match's `headers` is not an object", svc.route_label())
                })?;
            if headers.contains_key(&name) {
                return Err(format!(
                    "{} already matches header {name:?}: a cohort on it cannot be added (cohort {cohort})",
                    svc.route_label()
                ));
            }
            headers.insert(name.clone(), test.clone());
            Ok(clause)
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Value::Array)
}
