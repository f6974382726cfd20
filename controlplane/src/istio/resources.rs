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

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::{IstioService, ObjectRef};

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
pub fn virtual_service_patch(vs: &ObjectRef, resource_version: &str, http: &[HttpRoute]) -> Value {
    serde_json::to_value(VirtualServicePatch {
        api_version: format!("{VS_GROUP}/{VS_VERSION}"),
        kind: VS_KIND,
        metadata: PatchMeta {
            name: &vs.name,
            namespace: &vs.namespace,
            resource_version: Some(resource_version),
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
        None if http.is_empty() => return Err("has no http route".to_owned()),
        None => 0,
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
