//! [`IstioRouter`] against an in-process fake of the Kubernetes API paths it
//! uses (no API server can run here): GET and PATCH of one VirtualService
//! and one WasmPlugin, a resourceVersion bumped on every write, merge
//! patches refused with 409 when their resourceVersion is stale,
//! server-side apply with per-field owners (a field another manager owns
//! with another value is a 409 without `force`), and switches for 403.
//! The kube client talks to it over plain HTTP on loopback.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::*;
use crate::evidence::{Counts, Evidence, EvidenceSource, ShadowEvidence, StepWindows};
use crate::model::{DesiredState, FilterDoc};
use crate::rollout::engine::{Engine, Phase};
use crate::rollout::store::RolloutStore;

const VS_PATH: &str = "networking.istio.io/v1/shop/virtualservices/checkout";
const WASM_PATH: &str = "extensions.istio.io/v1alpha1/shop/wasmplugins/understudy";
const HOST: &str = "checkout.shop.svc.cluster.local";

/// The router's config in these tests: the config module's example.
const CONFIG: &str = super::config::EXAMPLE;

/// One stored object and, for `spec.pluginConfig`, who owns each key.
struct Obj {
    body: Value,
    owners: BTreeMap<String, String>,
}

/// What a PATCH carried.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    content_type: String,
    query: BTreeMap<String, String>,
    body: Value,
}

struct Fake {
    objects: Mutex<BTreeMap<String, Obj>>,
    rv: AtomicU64,
    /// Every request answers 403.
    forbid_all: AtomicBool,
    /// PATCHes answer 403 (RBAC with `get` but not `patch`).
    forbid_writes: AtomicBool,
    /// Before the next merge PATCH lands, another writer sets this canary
    /// weight (the race a resourceVersion guards against).
    race: Mutex<Option<u32>>,
    patches: Mutex<Vec<Seen>>,
    /// PATCHes wait while this is false (to see a change before it lands).
    gate: tokio::sync::watch::Sender<bool>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (code, Json(body)).into_response()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        // A patch object onto a non-object merges into an empty object
        // (so its nulls are dropped, not stored).
        (t, p @ Value::Object(_)) => {
            *t = Value::Object(Map::new());
            merge(t, p);
        }
        (t, p) => *t = p.clone(),
    }
}

impl Fake {
    fn new() -> Self {
        Self {
            objects: Mutex::default(),
            rv: AtomicU64::default(),
            forbid_all: AtomicBool::default(),
            forbid_writes: AtomicBool::default(),
            race: Mutex::default(),
            patches: Mutex::default(),
            gate: tokio::sync::watch::channel(true).0,
        }
    }

    fn next_rv(&self) -> String {
        (self.rv.fetch_add(1, Ordering::SeqCst) + 2).to_string()
    }

    /// Records a write by `manager`: a new resourceVersion and a
    /// managedFields entry newer than every other.
    fn stamp(&self, body: &mut Value, manager: &str) {
        let rv = self.next_rv();
        let n: u64 = rv.parse().unwrap_or(0);
        let time = format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            n / 3600 % 24,
            n / 60 % 60,
            n % 60
        );
        body["metadata"]["resourceVersion"] = json!(rv);
        let fields = body["metadata"]["managedFields"]
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut fields: Vec<Value> = fields
            .into_iter()
            .filter(|f| f["manager"] != json!(manager))
            .collect();
        fields.push(
            json!({"manager": manager, "operation": "Update", "apiVersion": "v1", "time": time}),
        );
        body["metadata"]["managedFields"] = json!(fields);
    }

    fn put(&self, path: &str, body: Value) {
        self.objects.lock().unwrap().insert(
            path.to_owned(),
            Obj {
                body,
                owners: BTreeMap::new(),
            },
        );
    }

    fn get(&self, path: &str) -> Value {
        self.objects.lock().unwrap()[path].body.clone()
    }

    /// Another writer edits an object.
    fn write_as(&self, path: &str, manager: &str, edit: impl FnOnce(&mut Value)) {
        let mut objects = self.objects.lock().unwrap();
        let obj = objects.get_mut(path).unwrap();
        let before = obj.body["spec"]["pluginConfig"].clone();
        edit(&mut obj.body);
        if let Some(config) = obj.body["spec"]["pluginConfig"].as_object() {
            for (k, v) in config {
                if before.get(k) != Some(v) {
                    obj.owners.insert(k.clone(), manager.to_owned());
                }
            }
        }
        let mut body = std::mem::take(&mut obj.body);
        self.stamp(&mut body, manager);
        obj.body = body;
    }

    fn weights(&self) -> (i64, i64) {
        let vs = self.get(VS_PATH);
        let primary = vs["spec"]["http"]
            .as_array()
            .and_then(|h| h.iter().find(|r| r["name"] == "primary"))
            .cloned()
            .unwrap_or_default();
        let route = &primary["route"];
        (
            route[0]["weight"].as_i64().unwrap_or(0),
            route[1]["weight"].as_i64().unwrap_or(0),
        )
    }

    fn set_canary(&self, manager: &str, canary: u32) {
        self.write_as(VS_PATH, manager, |vs| {
            vs["spec"]["http"][1]["route"][0]["weight"] = json!(100 - canary);
            vs["spec"]["http"][1]["route"][1]["weight"] = json!(canary);
        });
    }

    /// The PATCHes of one object, in order.
    fn patches(&self, path: &str) -> Vec<Seen> {
        let all = self.patches.lock().unwrap();
        all.iter().filter(|p| p.path == path).cloned().collect()
    }
}

type Parts = (String, String, String, String, String);

fn key(p: &Parts) -> String {
    format!("{}/{}/{}/{}/{}", p.0, p.1, p.2, p.3, p.4)
}

async fn get_object(State(fake): State<Arc<Fake>>, Path(p): Path<Parts>) -> Response {
    if fake.forbid_all.load(Ordering::SeqCst) {
        return status(StatusCode::FORBIDDEN, "Forbidden", "get is forbidden");
    }
    match fake.objects.lock().unwrap().get(&key(&p)) {
        Some(obj) => Json(obj.body.clone()).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} {:?} not found", p.3, p.4),
        ),
    }
}

async fn patch_object(
    State(fake): State<Arc<Fake>>,
    Path(p): Path<Parts>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let _ = fake.gate.subscribe().wait_for(|open| *open).await;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Apply bodies are YAML; kube sends JSON, which is YAML.
    let Ok(patch) = serde_json::from_str::<Value>(&body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
    };
    fake.patches.lock().unwrap().push(Seen {
        path: key(&p),
        content_type: content_type.clone(),
        query: query.clone(),
        body: patch.clone(),
    });
    if fake.forbid_all.load(Ordering::SeqCst) || fake.forbid_writes.load(Ordering::SeqCst) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "{} \"{}\" is forbidden: User cannot patch resource",
                p.3, p.4
            ),
        );
    }
    let Some(manager) = query.get("fieldManager").cloned() else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "no fieldManager");
    };
    let path = key(&p);
    if content_type == "application/merge-patch+json"
        && let Some(canary) = fake.race.lock().unwrap().take()
    {
        fake.set_canary("racer", canary);
    }
    let mut objects = fake.objects.lock().unwrap();
    let Some(obj) = objects.get_mut(&path) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "not found");
    };
    match content_type.as_str() {
        "application/merge-patch+json" => {
            let want = &patch["metadata"]["resourceVersion"];
            if !want.is_null() && *want != obj.body["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {}.{} \"{}\": the object has been modified; \
                         please apply your changes to the latest version and try again",
                        p.3, p.0, p.4
                    ),
                );
            }
            let mut patch = patch.clone();
            if let Some(meta) = patch["metadata"].as_object_mut() {
                meta.remove("resourceVersion");
            }
            merge(&mut obj.body, &patch);
        }
        "application/apply-patch+yaml" => {
            let force = query.get("force").is_some_and(|f| f == "true");
            let applied = patch["spec"]["pluginConfig"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let current = obj.body["spec"]["pluginConfig"].clone();
            let conflicts: Vec<String> = applied
                .iter()
                .filter(|(k, v)| {
                    obj.owners.get(*k).is_some_and(|o| *o != manager) && current.get(*k) != Some(*v)
                })
                .map(|(k, _)| {
                    format!(
                        "conflict with \"{}\": .spec.pluginConfig.{k}",
                        obj.owners[k]
                    )
                })
                .collect();
            if !conflicts.is_empty() && !force {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Apply failed with {} conflict: {}",
                        conflicts.len(),
                        conflicts.join("; ")
                    ),
                );
            }
            let mut config = current.as_object().cloned().unwrap_or_default();
            // Fields this manager owned and no longer applies are removed.
            let dropped: Vec<String> = obj
                .owners
                .iter()
                .filter(|(k, o)| **o == manager && !applied.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for k in dropped {
                config.remove(&k);
                obj.owners.remove(&k);
            }
            for (k, v) in applied {
                obj.owners.insert(k.clone(), manager.clone());
                config.insert(k, v);
            }
            obj.body["spec"]["pluginConfig"] = Value::Object(config);
        }
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("{other} is not served here"),
            );
        }
    }
    let mut body = std::mem::take(&mut obj.body);
    fake.stamp(&mut body, &manager);
    obj.body = body.clone();
    Json(body).into_response()
}

fn virtual_service() -> Value {
    let dest = |subset: &str| json!({"host": HOST, "subset": subset, "port": {"number": 8080}});
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "checkout", "namespace": "shop", "resourceVersion": "1",
            "managedFields": [{"manager": "argocd-controller", "operation": "Update", "apiVersion": "networking.istio.io/v1", "time": "2025-12-01T00:00:00Z"}]},
        "spec": {"hosts": [HOST], "http": [
            {"name": "admin", "match": [{"uri": {"prefix": "/admin"}}],
             "route": [{"destination": {"host": HOST, "subset": "stable"}}]},
            {"name": "primary", "retries": {"attempts": 3, "perTryTimeout": "2s"},
             "route": [{"destination": dest("stable"), "weight": 100},
                       {"destination": dest("canary"), "weight": 0}]}
        ]}
    })
}

fn wasm_plugin() -> Value {
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"name": "understudy", "namespace": "shop", "resourceVersion": "1"},
        "spec": {"url": "oci://registry.example/understudy:1", "phase": "STATS", "pluginConfig": {}}
    })
}

/// The fake API server on a loopback port, and a client pointed at it.
async fn fake_api() -> (Arc<Fake>, kube::Client) {
    let fake = Arc::new(Fake::new());
    fake.put(VS_PATH, virtual_service());
    fake.put(WASM_PATH, wasm_plugin());
    let app = axum::Router::new()
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
            axum::routing::get(get_object).patch(patch_object),
        )
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = kube::Config::new(url.parse().unwrap());
    (fake, kube::Client::try_from(config).unwrap())
}

fn store() -> Store {
    let mut state: DesiredState = crate::model::fixtures::state(0, 8081, true);
    state.filter.config =
        FilterDoc::parse(json!({"routes": [{"name": "checkout", "path_prefix": "/"}]})).unwrap();
    Store::new_in(state, IstioConfig::parse(CONFIG).unwrap().mesh_clusters()).unwrap()
}

async fn router(client: kube::Client) -> Arc<IstioRouter> {
    IstioRouter::start(client, IstioConfig::parse(CONFIG).unwrap(), store())
        .await
        .unwrap()
}

/// The whole control plane in Istio mode over `router` (and its Store), no
/// authentication, plaintext xDS: (xDS, API) addresses.
async fn serve(router: &Arc<IstioRouter>) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let xds = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (xds.local_addr().unwrap(), api.local_addr().unwrap());
    tokio::spawn(crate::run_with_router(
        router.store.clone(),
        crate::Options::default(),
        Some(Arc::clone(router) as Arc<dyn TrafficRouter>),
        xds,
        api,
        std::future::pending(),
    ));
    addrs
}

/// An engine over `router`, with healthy evidence and rollouts in memory.
fn engine(router: &Arc<IstioRouter>) -> Engine {
    Engine::with_ports(
        Arc::clone(router) as Arc<dyn TrafficRouter>,
        Arc::new(Healthy),
        RolloutStore::in_memory().unwrap(),
    )
    .unwrap()
}

/// Waits for `cond` with a deadline (the worker runs on its own task).
async fn until(what: &str, cond: impl FnMut() -> bool) {
    until_within(what, Duration::from_secs(10), cond).await
}

async fn until_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn generated(name: &str, value: &Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/k8s/generated");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_weight_change_is_applied_and_read_back() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    assert_eq!(router.weight("checkout").unwrap(), 0);
    assert!(router.routing_applied_everywhere());
    assert!(router.check_service("checkout").is_ok());
    assert!(matches!(
        router.weight("nope"),
        Err(RouterError::UnknownService(_))
    ));

    // Writes wait at the API server until the gate opens.
    fake.gate.send_replace(false);
    let changes = router.set_weight("checkout", 5, false).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].type_url,
        "kubernetes:VirtualService shop/checkout"
    );
    assert_eq!(router.weight("checkout").unwrap(), 5);
    // Desired, not yet read back.
    assert!(!router.routing_applied_everywhere());
    fake.gate.send_replace(true);
    until("the weight read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    assert_eq!(fake.weights(), (95, 5));
    assert_eq!(router.rejection(&changes, 0), None);
    // The same weight again is no change.
    assert!(router.set_weight("checkout", 5, false).unwrap().is_empty());
    assert!(router.set_weight("checkout", 101, false).is_err());

    // Exactly one write: a merge patch of the whole http list as read, at
    // the resourceVersion read, by field manager understudy.
    let patches = fake.patches(VS_PATH);
    assert_eq!(patches.len(), 1, "{patches:?}");
    let p = &patches[0];
    assert_eq!(p.path, VS_PATH);
    assert_eq!(p.content_type, "application/merge-patch+json");
    assert_eq!(
        p.query.get("fieldManager").map(String::as_str),
        Some("understudy")
    );
    assert_eq!(p.body["metadata"]["resourceVersion"], "1");
    let mut expected = virtual_service()["spec"]["http"].clone();
    expected[1]["route"][0]["weight"] = json!(95);
    expected[1]["route"][1]["weight"] = json!(5);
    assert_eq!(p.body["spec"]["http"], expected);
    assert_eq!(fake.get(VS_PATH)["spec"]["http"], expected);
    // The exact body, as `virtual_service_patch` builds it, for the lead's
    // check against Istio's CRD schema.
    let svc = &IstioConfig::parse(CONFIG).unwrap().services["checkout"];
    let http = resources::with_weight(resources::http_routes(&virtual_service()).unwrap(), svc, 5)
        .unwrap();
    let body = resources::virtual_service_patch(&svc.virtual_service, "1", &http, None);
    assert_eq!(body, p.body);
    generated("virtualservice-patch.json", &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_another_writers_weight_is_a_rejection_and_not_overwritten() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    // Someone edits the weight by hand after understudy read it.
    fake.set_canary("kubectl-edit", 30);
    let changes = router.set_weight("checkout", 5, false).unwrap();
    until("the rejection", || router.rejection(&changes, 0).is_some()).await;
    let what = router.rejection(&changes, 0).unwrap();
    assert!(what.contains("VirtualService shop/checkout"), "{what}");
    assert!(what.contains("canary weight is 30, not the 0"), "{what}");
    assert!(what.contains("\"kubectl-edit\""), "{what}");
    assert!(what.contains("not overwritten"), "{what}");
    assert_eq!(fake.weights(), (70, 30));
    assert!(fake.patches(VS_PATH).is_empty());
    assert!(!router.routing_applied_everywhere());
    // A rejection older than `since` is not this step's.
    let later = crate::time::now_unix_ms() + 60_000;
    assert_eq!(router.rejection(&changes, later), None);

    // The next decision (the rollback the engine makes) is written over a
    // fresh read.
    let rollback = router.set_weight("checkout", 0, true).unwrap();
    until("the rollback read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    assert_eq!(fake.weights(), (100, 0));
    assert_eq!(router.rejection(&rollback, 0), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_stale_resource_version_is_a_rejection_and_not_overwritten() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    // Another writer lands between understudy's read and its write.
    *fake.race.lock().unwrap() = Some(40);
    let changes = router.set_weight("checkout", 5, false).unwrap();
    until("the rejection", || router.rejection(&changes, 0).is_some()).await;
    let what = router.rejection(&changes, 0).unwrap();
    assert!(
        what.contains(
            "VirtualService shop/checkout changed since understudy read it at resourceVersion 1"
        ),
        "{what}"
    );
    assert!(what.contains("409 Conflict"), "{what}");
    assert!(what.contains("not overwritten"), "{what}");
    assert_eq!(fake.weights(), (60, 40));
    // The conflict was the report: the next read is the new baseline, and
    // the next decision is written over it.
    let next = router.set_weight("checkout", 0, true).unwrap();
    until("the next change read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    assert_eq!(fake.weights(), (100, 0));
    assert_eq!(router.rejection(&next, 0), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_forbidden_write_is_a_rejection() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    fake.forbid_writes.store(true, Ordering::SeqCst);
    let changes = router.set_weight("checkout", 20, false).unwrap();
    until("the rejection", || router.rejection(&changes, 0).is_some()).await;
    let what = router.rejection(&changes, 0).unwrap();
    assert!(
        what.contains("may not write VirtualService shop/checkout"),
        "{what}"
    );
    assert!(what.contains("403 Forbidden"), "{what}");
    assert_eq!(fake.weights(), (100, 0));
    assert!(!router.routing_applied_everywhere());

    // Without even `get`, a change is refused as soon as it is read.
    fake.forbid_all.store(true, Ordering::SeqCst);
    let changes = router.set_weight("checkout", 50, false).unwrap();
    until("the rejection", || router.rejection(&changes, 0).is_some()).await;
    let what = router.rejection(&changes, 0).unwrap();
    assert!(
        what.contains("refused to read VirtualService shop/checkout"),
        "{what}"
    );
    assert!(router.check_service("checkout").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_shadow_lands_in_the_wasm_plugin_config() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    // At start the Store's filter config is published as it is.
    until("the first pluginConfig", || {
        fake.get(WASM_PATH)["spec"]["pluginConfig"]["routes"][0]["name"] == "checkout"
    })
    .await;
    assert_eq!(router.shadow("checkout").unwrap(), None);
    assert_eq!(
        router.canary_cluster("checkout"),
        format!("outbound|8080|canary|{HOST}")
    );
    // The shadow stage targets the canary subset under Istio's name: the
    // Store takes it because it was opened with the mesh's clusters, and
    // refuses it otherwise.
    let cluster = router.canary_cluster("checkout");
    let plain = Store::new(store().current().as_ref().clone()).unwrap();
    let refused = plain
        .set_shadow_target(
            "checkout",
            Some(ShadowTarget {
                cluster: cluster.clone(),
                percent: 10.0,
            }),
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("is not a cluster of any service"),
        "{refused}"
    );
    let changes = router
        .set_shadow(
            "checkout",
            Some(ShadowTarget {
                cluster: cluster.clone(),
                percent: 10.0,
            }),
            false,
        )
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].type_url, "kubernetes:WasmPlugin shop/understudy");
    until("the shadow applied", || router.routing_applied_everywhere()).await;
    let plugin = fake.get(WASM_PATH);
    let route = &plugin["spec"]["pluginConfig"]["routes"][0];
    assert_eq!(route["shadow"]["cluster"], json!(cluster));
    assert_eq!(route["shadow"]["percent"], json!(10.0));
    // What the plugin carries is the filter config the filter accepts.
    let text = serde_json::to_string(&plugin["spec"]["pluginConfig"]).unwrap();
    understudy_core::FilterConfig::from_json(text.as_bytes()).unwrap();
    assert_eq!(plugin["spec"]["url"], "oci://registry.example/understudy:1");
    let apply = fake.patches(WASM_PATH).into_iter().last().unwrap();
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert_eq!(
        apply.query.get("fieldManager").map(String::as_str),
        Some("understudy")
    );
    assert_ne!(apply.query.get("force").map(String::as_str), Some("true"));
    let body = resources::wasm_plugin_patch(
        IstioConfig::parse(CONFIG)
            .unwrap()
            .wasm_plugin
            .as_ref()
            .unwrap(),
        &router.plugin_config(),
    );
    assert_eq!(apply.body, body);
    generated("wasmplugin-patch.json", &body);

    // Off again.
    let off = router.set_shadow("checkout", None, false).unwrap();
    assert_eq!(off.len(), 1);
    until("the shadow removed", || router.routing_applied_everywhere()).await;
    let plugin = fake.get(WASM_PATH);
    assert_eq!(
        plugin["spec"]["pluginConfig"]["routes"][0].get("shadow"),
        None
    );

    // Another manager owns the routes with another value: a conflict,
    // reported, and their value stays.
    fake.write_as(WASM_PATH, "gitops", |p| {
        p["spec"]["pluginConfig"]["routes"] = json!([{"name": "checkout", "path_prefix": "/v1"}]);
    });
    let on = router
        .set_shadow(
            "checkout",
            Some(ShadowTarget {
                cluster,
                percent: 5.0,
            }),
            false,
        )
        .unwrap();
    until("the conflict", || router.rejection(&on, 0).is_some()).await;
    let what = router.rejection(&on, 0).unwrap();
    assert!(what.contains("WasmPlugin shop/understudy"), "{what}");
    assert!(what.contains("conflict with \"gitops\""), "{what}");
    assert!(what.contains("not overwritten"), "{what}");
    assert_eq!(
        fake.get(WASM_PATH)["spec"]["pluginConfig"]["routes"],
        json!([{"name": "checkout", "path_prefix": "/v1"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_restart_reads_the_weight_back() {
    let (fake, client) = fake_api().await;
    let first = router(client.clone()).await;
    first.set_weight("checkout", 20, false).unwrap();
    until("the weight read back", || {
        first.routing_applied_everywhere()
    })
    .await;
    let second = router(client.clone()).await;
    assert_eq!(second.weight("checkout").unwrap(), 20);
    // Whatever the VirtualService holds is where a restart starts.
    fake.set_canary("kubectl-edit", 35);
    let third = router(client.clone()).await;
    assert_eq!(third.weight("checkout").unwrap(), 35);

    // A route that cannot carry a rollout refuses the start, saying why.
    let bad = CONFIG.replace("route: primary", "route: admin");
    let e = IstioRouter::start(client, IstioConfig::parse(&bad).unwrap(), store())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("http route \"admin\": has no destination for subset \"canary\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cluster_names_are_istios() {
    let (_fake, client) = fake_api().await;
    let router = router(client).await;
    let names = router.cluster_names("checkout").unwrap();
    assert_eq!(names.stable, format!("outbound|8080|stable|{HOST}"));
    assert_eq!(names.canary, format!("outbound|8080|canary|{HOST}"));
    assert!(router.cluster_names("nope").is_none());
    let e = router.promote_canary_to_stable("checkout").unwrap_err();
    assert!(e.to_string().contains("update the stable workload"), "{e}");
    assert!(!router.is_finalized("checkout").unwrap());
}

/// Both sides healthy: 100 requests a second, no errors, the same latency.
struct Healthy;

impl EvidenceSource for Healthy {
    fn step_windows(&self, _: &str, since: u64, now: u64) -> StepWindows {
        let secs = now.saturating_sub(since) / 1000;
        let side = || Evidence {
            requests: 100 * secs,
            errors: 0,
            latency_ms: vec![(10.0, 99 * secs), (50.0, secs)],
            last_update_ms: Some(now),
        };
        StepWindows {
            stable: side(),
            canary: side(),
        }
    }
    fn shadow_pairs(&self, _: &str) -> Option<ShadowEvidence> {
        None
    }
    fn counts_since(&self, _: &str, starts: &[u64], _: u64) -> Vec<(Counts, Counts)> {
        vec![Default::default(); starts.len()]
    }
}

const SPEC: &str = r#"
service: checkout
owner: test
stop_rules: {max_error_rate_increase_pp: 1.0}
defaults: {min_duration_s: 1, min_requests: 10}
steps: [{weight: 5}, {weight: 50}, {weight: 100}]
analysis: {interval_s: 1, max_staleness_s: 10, min_requests_per_side: 10, confidence: 0.99}
finalize: {automatic: false}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_rollout_walks_the_virtual_service_weights() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    let engine = engine(&router);
    let t0 = SystemTime::now();
    let id = engine.create(SPEC, "test", t0).unwrap().id;
    let mut seen = Vec::new();
    for i in 1..=60u64 {
        until("the step's weight read back", || {
            router.routing_applied_everywhere()
        })
        .await;
        let canary = fake.weights().1;
        if seen.last() != Some(&canary) {
            seen.push(canary);
        }
        if engine.view(&id).unwrap().rollout.phase == Phase::Succeeded {
            break;
        }
        engine.tick(t0 + Duration::from_secs(2 * i));
    }
    assert_eq!(seen, vec![5, 50, 100]);
    let view = engine.view(&id).unwrap();
    assert_eq!(view.rollout.phase, Phase::Succeeded);
    assert_eq!(router.weight("checkout").unwrap(), 100);
    // Promotion is the user's: finalizing says so and changes nothing.
    let e = engine
        .act(
            &id,
            crate::rollout::engine::Action::Finalize,
            "test",
            t0 + Duration::from_secs(200),
        )
        .unwrap_err();
    assert!(e.to_string().contains("update the stable workload"), "{e}");
    assert_eq!(fake.weights(), (0, 100));
}

/// With `finalize: {automatic: true}` the engine cannot promote in Istio
/// mode either: it records once that it did not, and why, and leaves the
/// weights alone (no refusal retried every tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_automatic_finalize_is_recorded_once_as_the_users_to_do() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    let engine = engine(&router);
    let spec = SPEC
        .replace(
            "finalize: {automatic: false}",
            "finalize: {automatic: true}",
        )
        .replace(
            "[{weight: 5}, {weight: 50}, {weight: 100}]",
            "[{weight: 100}]",
        );
    let t0 = SystemTime::now();
    let id = engine.create(&spec, "test", t0).unwrap().id;
    for i in 1..=30u64 {
        until("the step's weight read back", || {
            router.routing_applied_everywhere()
        })
        .await;
        let r = engine.view(&id).unwrap().rollout;
        if r.phase == Phase::Succeeded && r.finalized.is_some() {
            break;
        }
        engine.tick(t0 + Duration::from_secs(2 * i));
    }
    for i in 31..=35u64 {
        engine.tick(t0 + Duration::from_secs(2 * i));
    }
    let view = engine.view(&id).unwrap();
    assert!(
        matches!(
            view.rollout.finalized,
            Some(crate::rollout::machine::FinalizeState::Skipped { ref reason, .. })
                if reason.contains("update the stable workload")
        ),
        "{:?}",
        view.rollout.finalized
    );
    let skips = view
        .audit
        .iter()
        .filter(|a| a.reason.contains("not finalized automatically"))
        .count();
    assert_eq!(skips, 1, "{:#?}", view.audit);
    assert_eq!(fake.weights(), (0, 100));
}

/// `PUT /v1/services/{s}/canary-weight` in Istio mode goes through the
/// router to the VirtualService, as a rollout's steps do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_manual_weight_from_the_api_lands_in_the_virtual_service() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    let (_, api) = serve(&router).await;
    let url = format!("http://{api}");
    let http = reqwest::Client::new();
    let put = |service: &'static str, weight: u32| {
        http.put(format!("{url}/v1/services/{service}/canary-weight"))
            .json(&json!({ "weight": weight }))
            .timeout(Duration::from_secs(10))
            .send()
    };
    let answer = put("checkout", 30).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        json!({"name": "checkout", "canary_weight": 30})
    );
    until("the weight in the VirtualService", || {
        router.routing_applied_everywhere() && fake.weights() == (70, 30)
    })
    .await;
    assert_eq!(put("nope", 10).await.unwrap().status(), 404);
    // Sticky users cannot be kept by a VirtualService split: refused, and
    // the service as it was.
    let shop = || async {
        let r = http.get(format!("{url}/v1/services/shop")).send().await;
        r.unwrap().json::<Value>().await.unwrap()
    };
    let mut service = shop().await;
    service["sticky"] = json!({"header": "x-user-id"});
    let answer = http
        .put(format!("{url}/v1/services/shop"))
        .json(&service)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Istio mode"),
        "{body}"
    );
    let stored = shop().await;
    assert!(stored.get("sticky").is_none(), "{stored}");
}

/// A fleet-wide tenant rate is shared among the sidecars that enforce it:
/// once two sidecars report usage, the WasmPlugin carries half the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_fleet_rates_are_divided_among_the_reporting_sidecars() {
    use understudy_proto::v1::report_service_client::ReportServiceClient;
    use understudy_proto::v1::{TenantUsage, UsageReport};
    let (fake, client) = fake_api().await;
    let mut state: DesiredState = crate::model::fixtures::state(0, 8081, true);
    state.filter.config = FilterDoc::parse(json!({
        "routes": [{"name": "checkout", "path_prefix": "/"}],
        "rate_limit": {
            "identity": {"header": "x-tenant"},
            "tenants": {"acme": {"fleet_rate": 100}},
            "tiers": {
                "anonymous": {"initial": 10, "max": 10, "min": 1},
                "standard": {"initial": 10, "max": 10, "min": 1}
            }
        }
    }))
    .unwrap();
    let config = IstioConfig::parse(CONFIG).unwrap();
    let store = Store::new_in(state, config.mesh_clusters()).unwrap();
    let router = IstioRouter::start(client, config, store.clone())
        .await
        .unwrap();
    let (xds, _) = serve(&router).await;
    let xds_url = format!("http://{xds}");
    let rate = || {
        fake.get(WASM_PATH)["spec"]["pluginConfig"]["rate_limit"]["tenants"]["acme"]["rate"].clone()
    };
    until("the whole rate for one sidecar", || rate() == json!(100.0)).await;
    let mut reports = ReportServiceClient::connect(xds_url).await.unwrap();
    for node in ["sidecar-a", "sidecar-b"] {
        reports
            .push_usage(UsageReport {
                node_id: node.into(),
                dropped: 0,
                tenants: vec![TenantUsage {
                    tenant: "acme".into(),
                    tier: "standard".into(),
                    allowed: 1,
                    limited: 0,
                    limit_rps: 100.0,
                }],
            })
            .await
            .unwrap();
    }
    // Recounted every MESH_FLEET_PERIOD (5 s): the deadline allows for it.
    until_within(
        "half the rate for each of two",
        Duration::from_secs(20),
        || rate() == json!(50.0),
    )
    .await;
}

fn cohorts() -> Vec<Cohort> {
    vec![
        Cohort::Header {
            name: "x-user-group".into(),
            value: Some("internal".into()),
        },
        Cohort::Cookie {
            name: "beta".into(),
            value: None,
        },
    ]
}

/// Cohorts are routes to the canary subset alone, ahead of the configured
/// route, copies of it (its retries) that also match the cohort; written
/// with the weight in one patch, read back, and read again by a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cohorts_are_routes_ahead_of_the_configured_one() {
    let (fake, client) = fake_api().await;
    let router = router(client.clone()).await;
    assert_eq!(router.cohorts("checkout").unwrap(), Some(Vec::new()));
    let changes = router
        .set_split("checkout", 0, &cohorts(), &FlagHeader::default(), false)
        .unwrap();
    assert_eq!(changes.len(), 1);
    until("the cohorts read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    assert_eq!(router.rejection(&changes, 0), None);
    assert_eq!(router.cohorts("checkout").unwrap(), Some(cohorts()));
    let patches = fake.patches(VS_PATH);
    assert_eq!(patches.len(), 1, "one patch for the weight and cohorts");
    let http = fake.get(VS_PATH)["spec"]["http"].clone();
    let names: Vec<&str> = http
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "admin",
            "understudy-cohort-checkout-0",
            "understudy-cohort-checkout-1",
            "primary"
        ]
    );
    let canary =
        json!([{"destination": {"host": HOST, "subset": "canary", "port": {"number": 8080}}}]);
    assert_eq!(
        http[1],
        json!({"name": "understudy-cohort-checkout-0",
            "match": [{"headers": {"x-user-group": {"exact": "internal"}}}],
            "retries": {"attempts": 3, "perTryTimeout": "2s"},
            "route": canary})
    );
    assert_eq!(
        http[2]["match"],
        json!([{"headers": {"cookie": {"regex": "(^|.*[;,]\\s*)beta=[^;,]*\\s*([;,].*)?$"}}}])
    );
    assert_eq!(http[2]["route"], canary);
    assert_eq!(fake.weights(), (100, 0));
    let annotation = fake.get(VS_PATH)["metadata"]["annotations"][resources::COHORTS_ANNOTATION]
        .as_str()
        .unwrap()
        .to_owned();
    let parsed: BTreeMap<String, Vec<Cohort>> = serde_json::from_str(&annotation).unwrap();
    assert_eq!(parsed["checkout"], cohorts());
    generated("virtualservice-cohorts-patch.json", &patches[0].body);

    // A restart reads the cohorts back from the routes it wrote.
    let second = super::tests::router(client.clone()).await;
    assert_eq!(second.cohorts("checkout").unwrap(), Some(cohorts()));
    assert!(second.routing_applied_everywhere());

    // A weight change keeps them; an empty list removes the routes and
    // the annotation.
    router.set_weight("checkout", 20, false).unwrap();
    until("the weight read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    assert_eq!(
        fake.get(VS_PATH)["spec"]["http"].as_array().unwrap().len(),
        4
    );
    assert_eq!(fake.weights(), (80, 20));
    router
        .set_split("checkout", 20, &[], &FlagHeader::default(), false)
        .unwrap();
    until("no cohorts read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    let http = fake.get(VS_PATH)["spec"]["http"].clone();
    assert_eq!(http.as_array().unwrap().len(), 2, "{http}");
    assert_eq!(fake.weights(), (80, 20));
    assert!(
        fake.get(VS_PATH)["metadata"]["annotations"]
            .get(resources::COHORTS_ANNOTATION)
            .is_none()
    );
    assert!(
        router
            .set_split(
                "checkout",
                0,
                &vec![cohorts()[0].clone(); 9],
                &FlagHeader::default(),
                false,
            )
            .is_err()
    );
}

/// A cohort route edited by someone else is found, reported as a
/// rejection naming the writer, and not overwritten; the next decision is
/// written over a fresh read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_an_edited_cohort_route_is_a_rejection() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    let changes = router
        .set_split("checkout", 0, &cohorts(), &FlagHeader::default(), false)
        .unwrap();
    until("the cohorts read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    fake.write_as(VS_PATH, "kubectl-edit", |vs| {
        vs["spec"]["http"][1]["match"][0]["headers"]["x-user-group"] = json!({"exact": "everyone"});
    });
    // The next read (a resync, hurried by a change to another field) finds it.
    router.wake.notify_one();
    until("the rejection", || router.rejection(&changes, 0).is_some()).await;
    let what = router.rejection(&changes, 0).unwrap();
    assert!(
        what.contains(
            "cohort routes are not the ones (x-user-group: internal, cookie beta present)"
        ),
        "{what}"
    );
    assert!(what.contains("\"kubectl-edit\""), "{what}");
    assert_eq!(
        fake.get(VS_PATH)["spec"]["http"][1]["match"][0]["headers"]["x-user-group"],
        json!({"exact": "everyone"}),
        "not overwritten"
    );
    let rollback = router
        .set_split("checkout", 0, &[], &FlagHeader::default(), true)
        .unwrap();
    until("the rollback read back", || {
        router.routing_applied_everywhere()
    })
    .await;
    assert_eq!(router.rejection(&rollback, 0), None);
    assert_eq!(
        fake.get(VS_PATH)["spec"]["http"].as_array().unwrap().len(),
        2
    );
}

/// The configured route's own matches stay: each becomes a clause that
/// also tests the cohort; a clause already testing the header refuses.
#[test]
fn istio_cohort_routes_keep_the_configured_routes_matches() {
    let svc = &IstioConfig::parse(CONFIG).unwrap().services["checkout"];
    let mut vs = virtual_service();
    vs["spec"]["http"][1]["match"] = json!([
        {"uri": {"prefix": "/api"}},
        {"uri": {"prefix": "/v2"}, "headers": {"x-tier": {"exact": "gold"}}}
    ]);
    let http = resources::http_routes(&vs).unwrap();
    let out = resources::with_split(http.clone(), svc, "checkout", 5, &cohorts()[..1]).unwrap();
    assert_eq!(
        serde_json::to_value(&out[1]).unwrap()["match"],
        json!([
            {"uri": {"prefix": "/api"}, "headers": {"x-user-group": {"exact": "internal"}}},
            {"uri": {"prefix": "/v2"}, "headers": {"x-tier": {"exact": "gold"}, "x-user-group": {"exact": "internal"}}}
        ])
    );
    // The configured route is found again after them, and rendering twice
    // changes nothing.
    assert_eq!(
        resources::with_split(out.clone(), svc, "checkout", 5, &cohorts()[..1]).unwrap(),
        out
    );
    let clash = Cohort::Header {
        name: "x-tier".into(),
        value: None,
    };
    let e = resources::with_split(http, svc, "checkout", 5, &[clash]).unwrap_err();
    assert!(e.contains("already matches header \"x-tier\""), "{e}");
    // With no route name, "the first" is the first that is not a cohort's.
    let unnamed = IstioConfig::parse(&CONFIG.replace("    route: primary\n", "")).unwrap();
    let unnamed = &unnamed.services["checkout"];
    let mut vs = virtual_service();
    vs["spec"]["http"].as_array_mut().unwrap().remove(0);
    let http = resources::http_routes(&vs).unwrap();
    let out = resources::with_split(http, unnamed, "checkout", 7, &cohorts()).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(resources::canary_weight(&out, unnamed), Ok(7));
}

/// A rollout's cohort step lands in the VirtualService as the cohort's
/// route at weight 0; later steps keep it; an abort takes it away with
/// the weight, in one patch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cohort_step_routes_the_cohort_and_an_abort_removes_it() {
    let (fake, client) = fake_api().await;
    let router = router(client).await;
    let engine = engine(&router);
    let spec = SPEC.replace(
        "steps: [{weight: 5}",
        "steps: [{cohort: {header: {name: x-user-group, value: internal}}}, {weight: 5}",
    );
    let t0 = SystemTime::now();
    let id = engine.create(&spec, "test", t0).unwrap().id;
    let cohort_routes = || {
        fake.get(VS_PATH)["spec"]["http"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("understudy-cohort-")
            })
            .count()
    };
    until("the cohort step read back", || {
        router.routing_applied_everywhere() && cohort_routes() == 1
    })
    .await;
    assert_eq!(fake.weights(), (100, 0));
    let mut i = 1;
    while fake.weights().1 != 5 {
        assert!(i < 60, "never reached weight 5");
        engine.tick(t0 + Duration::from_secs(2 * i));
        until("the step read back", || router.routing_applied_everywhere()).await;
        i += 1;
    }
    assert_eq!(cohort_routes(), 1, "a later step keeps the cohort");
    let patches = fake.patches(VS_PATH).len();
    engine
        .act(
            &id,
            crate::rollout::machine::Action::Abort,
            "test",
            t0 + Duration::from_secs(2 * i),
        )
        .unwrap();
    until("the abort read back", || {
        router.routing_applied_everywhere() && cohort_routes() == 0
    })
    .await;
    assert_eq!(fake.weights(), (100, 0));
    assert_eq!(fake.patches(VS_PATH).len(), patches + 1, "one patch");
    assert_eq!(router.cohorts("checkout").unwrap(), Some(Vec::new()));
    assert!(matches!(
        engine.view(&id).unwrap().rollout.phase,
        Phase::Aborted { .. }
    ));
}
