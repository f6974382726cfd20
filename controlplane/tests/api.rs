//! In-process integration tests of the control plane's JSON API: a real
//! server on loopback listeners, called over HTTP with reqwest.

mod common;

use std::path::Path;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Weight,
};
use understudy_controlplane::store::Store;

/// The weight the test service starts with, so "unchanged" is not just "zero".
const START_WEIGHT: u64 = 10;

/// One service, `shop`, answering to `shop.example`, with stable and canary endpoints.
fn desired_state() -> DesiredState {
    let shop = Service {
        name: "shop".into(),
        domains: vec!["shop.example".into()],
        stable: Backend {
            endpoints: vec!["127.0.0.1:8081".parse().unwrap()],
        },
        canary: Backend {
            endpoints: vec!["127.0.0.1:8082".parse().unwrap()],
        },
        canary_weight: Weight::try_from(i64::try_from(START_WEIGHT).unwrap()).unwrap(),
        sticky: None,
        canary_cohorts: Vec::new(),
        flags: Default::default(),
    };
    DesiredState {
        listener: ListenerSettings {
            address: "127.0.0.1".parse().unwrap(),
            port: 10000,
        },
        filter: FilterSettings {
            wasm_path: "/etc/envoy/understudy.wasm".into(),
            config: understudy_controlplane::model::FilterDoc::parse(
                json!({"routes": [{"name": "api", "path_prefix": "/api"}]}),
            )
            .unwrap(),
            report_cluster: "understudy_xds".into(),
        },
        services: [("shop".to_string(), shop)].into_iter().collect(),
    }
}

/// A response: status, whether it was labelled JSON, and the body parsed as JSON.
#[derive(Debug)]
struct Reply {
    status: u16,
    json_content_type: bool,
    body: Value,
}

/// A client for one running control plane.
struct Api {
    base: String,
    client: reqwest::Client,
}

/// Starts the control plane on loopback listeners (bound before the server is
/// spawned, so it is ready at once) and returns a client for its API.
async fn start(store: Store) -> Api {
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", api.local_addr().unwrap());
    tokio::spawn(understudy_controlplane::run(
        store,
        xds,
        api,
        std::future::pending(),
    ));
    Api {
        base,
        client: common::http(),
    }
}

async fn start_default() -> Api {
    start(Store::new(desired_state()).unwrap()).await
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let json_content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
        Reply {
            status,
            json_content_type,
            body,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(self.client.put(self.url(path)).json(body)).await
    }

    /// A PUT with a raw body and an optional content type.
    async fn put_raw(&self, path: &str, body: &'static str, content_type: Option<&str>) -> Reply {
        let mut req = self.client.put(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        self.send(req).await
    }

    /// GETs `path`, asserting a 200 JSON answer, and returns the body.
    async fn get_ok(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        assert!(r.json_content_type, "GET {path}: {r:?}");
        r.body
    }

    async fn weight(&self, service: &str) -> u64 {
        let svc = self.get_ok(&format!("/v1/services/{service}")).await;
        svc["canary_weight"].as_u64().unwrap()
    }

    async fn generation(&self) -> u64 {
        self.get_ok("/v1/envoys").await["generation"]
            .as_u64()
            .unwrap()
    }
}

/// Asserts `r` is an API error with this status and code and returns its message.
fn assert_error(r: &Reply, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{r:?}");
    assert!(r.json_content_type, "{r:?}");
    assert_eq!(r.body["error"]["code"], code, "{r:?}");
    let message = r.body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(!message.is_empty(), "{r:?}");
    message.to_owned()
}

fn assert_error_mentions(r: &Reply, status: u16, code: &str, needle: &str) {
    let message = assert_error(r, status, code);
    assert!(
        message.contains(needle),
        "message {message:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn health_and_readiness_answer_json() {
    let api = start_default().await;
    assert_eq!(api.get_ok("/healthz").await, json!({"status": "ok"}));
    let ready = api.get_ok("/readyz").await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["generation"], 1);
}

#[tokio::test]
async fn services_are_listed_and_fetched_by_name() {
    let api = start_default().await;
    let list = api.get_ok("/v1/services").await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "shop");

    let shop = api.get_ok("/v1/services/shop").await;
    assert_eq!(shop, list[0]);
    assert_eq!(shop["domains"], json!(["shop.example"]));
    assert_eq!(shop["stable"]["endpoints"], json!(["127.0.0.1:8081"]));
    assert_eq!(shop["canary"]["endpoints"], json!(["127.0.0.1:8082"]));
    assert_eq!(shop["canary_weight"], START_WEIGHT);

    let r = api.get("/v1/services/nope").await;
    assert_error_mentions(&r, 404, "unknown_service", "nope");
    let r = api
        .put("/v1/services/nope/canary-weight", &json!({"weight": 0}))
        .await;
    assert_error_mentions(&r, 404, "unknown_service", "nope");
}

#[tokio::test]
async fn setting_the_canary_weight() {
    let api = start_default().await;
    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 50}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json_content_type, "{r:?}");
    assert_eq!(r.body["name"], "shop");
    assert_eq!(r.body["canary_weight"], 50);
    assert_eq!(api.weight("shop").await, 50);

    // The bounds themselves are accepted.
    for w in [0, 100] {
        let r = api
            .put("/v1/services/shop/canary-weight", &json!({"weight": w}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(api.weight("shop").await, w);
    }
}

#[tokio::test]
async fn bad_weights_are_refused_and_change_nothing() {
    let api = start_default().await;
    let path = "/v1/services/shop/canary-weight";
    let before = api.get_ok("/v1/services/shop").await;
    let generation = api.generation().await;

    // Out of range, not an integer, not a number, null: each message says
    // what a weight must be and echoes the value that was sent.
    for (weight, shown) in [
        (json!(101), "101"),
        (json!(-1), "-1"),
        (json!(50.5), "50.5"),
        (json!("50"), "\"50\""),
        (json!(null), "null"),
    ] {
        let r = api.put(path, &json!({"weight": weight})).await;
        let message = assert_error(&r, 400, "invalid_weight");
        assert!(
            message.contains("integer from 0 to 100"),
            "weight {weight}: {message:?}"
        );
        assert!(
            message.contains(&format!("got {shown}")),
            "weight {weight}: {message:?}"
        );
    }

    // Malformed JSON.
    let r = api
        .put_raw(path, "{\"weight\": ", Some("application/json"))
        .await;
    assert_error(&r, 400, "invalid_body");
    // An unknown field is named.
    let r = api.put(path, &json!({"weight": 5, "x": 1})).await;
    assert_error_mentions(&r, 400, "invalid_body", "unknown field `x`");
    // The weight is required.
    let r = api.put(path, &json!({})).await;
    assert_error_mentions(&r, 400, "invalid_body", "weight");
    // No body and no content type.
    let r = api.put_raw(path, "", None).await;
    assert_error_mentions(&r, 400, "invalid_body", "Content-Type");
    // A JSON body without a JSON content type.
    let r = api
        .put_raw(path, "{\"weight\": 5}", Some("text/plain"))
        .await;
    assert_error_mentions(&r, 400, "invalid_body", "Content-Type");
    // A JSON content type and no body.
    let r = api.put_raw(path, "", Some("application/json")).await;
    assert_error(&r, 400, "invalid_body");

    assert_eq!(api.get_ok("/v1/services/shop").await, before);
    assert_eq!(api.weight("shop").await, START_WEIGHT);
    assert_eq!(api.generation().await, generation);
}

#[tokio::test]
async fn a_canary_weight_needs_canary_endpoints() {
    let mut state = desired_state();
    let shop = state.services.get_mut("shop").unwrap();
    shop.canary.endpoints.clear();
    shop.canary_weight = Weight::ZERO;
    let api = start(Store::new(state).unwrap()).await;

    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 20}))
        .await;
    assert_error_mentions(&r, 400, "invalid_weight", "canary endpoint");
    assert_eq!(api.weight("shop").await, 0);
    // Zero is still fine.
    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 0}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test]
async fn the_filter_is_validated_before_it_is_stored() {
    let api = start_default().await;
    let before = api.get_ok("/v1/filter").await;
    assert_eq!(
        before,
        json!({
            "wasm_path": "/etc/envoy/understudy.wasm",
            "config": {"routes": [{"name": "api", "path_prefix": "/api"}]},
            "report_cluster": "understudy_xds"
        })
    );

    let bad = json!({
        "wasm_path": "/x.wasm",
        "config": {"routes": [{"name": "a", "path_prefix": "nope"}]}
    });
    let r = api.put("/v1/filter", &bad).await;
    assert_error_mentions(&r, 400, "invalid_filter", "routes[0].path_prefix");
    // An unknown key inside the filter config is named too.
    let r = api
        .put(
            "/v1/filter",
            &json!({"wasm_path": "/x.wasm", "config": {"bogus": 1}}),
        )
        .await;
    assert_error_mentions(&r, 400, "invalid_filter", "bogus");
    // An empty wasm path.
    let r = api
        .put("/v1/filter", &json!({"wasm_path": " ", "config": {}}))
        .await;
    assert_error_mentions(&r, 400, "invalid_filter", "wasm_path");
    assert_eq!(api.get_ok("/v1/filter").await, before);

    let good = json!({
        "wasm_path": "/x.wasm",
        "config": {"stat_prefix": "shop", "routes": [{"name": "a", "path_prefix": "/a"}]},
        "report_cluster": "understudy_xds"
    });
    let r = api.put("/v1/filter", &good).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, good);
    assert_eq!(api.get_ok("/v1/filter").await, good);
}

#[tokio::test]
async fn services_are_created_and_domain_conflicts_refused() {
    let api = start_default().await;
    let generation = api.generation().await;

    let conflicting = json!({
        "name": "search",
        "domains": ["shop.example"],
        "stable": {"endpoints": ["127.0.0.1:9001"]}
    });
    let r = api.put("/v1/services/search", &conflicting).await;
    assert_error_mentions(&r, 400, "invalid_service", "shop.example");
    // Domains are compared case-insensitively, as Envoy does.
    let mut upper = conflicting.clone();
    upper["domains"] = json!(["SHOP.example"]);
    let r = api.put("/v1/services/search", &upper).await;
    assert_error(&r, 400, "invalid_service");
    // The body must name the service of the path.
    let mut renamed = conflicting.clone();
    renamed["domains"] = json!(["search.example"]);
    let r = api.put("/v1/services/other", &renamed).await;
    assert_error_mentions(&r, 400, "invalid_service", "other");
    assert_error(
        &api.get("/v1/services/search").await,
        404,
        "unknown_service",
    );
    assert_eq!(api.generation().await, generation);

    let good = json!({
        "name": "search",
        "domains": ["search.example"],
        "stable": {"endpoints": ["127.0.0.1:9001"]}
    });
    let r = api.put("/v1/services/search", &good).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["name"], "search");
    // Defaults are filled in.
    assert_eq!(r.body["canary_weight"], 0);
    assert_eq!(r.body["canary"], json!({"endpoints": []}));
    let names: Vec<Value> = api
        .get_ok("/v1/services")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, [json!("search"), json!("shop")]);
    assert_eq!(api.get_ok("/v1/services/search").await, r.body);
    assert_eq!(api.generation().await, generation + 1);
}

fn read_state_file(path: &Path) -> (Vec<u8>, Value) {
    let bytes = std::fs::read(path).unwrap();
    let value = serde_json::from_slice(&bytes).unwrap();
    (bytes, value)
}

fn file_weight(state: &Value, service: &str) -> u64 {
    let services = state["services"].as_array().unwrap();
    let svc = services.iter().find(|s| s["name"] == service).unwrap();
    svc["canary_weight"].as_u64().unwrap()
}

#[tokio::test]
async fn the_state_file_follows_accepted_changes_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&desired_state()).unwrap()).unwrap();
    let api = start(Store::open(&path).unwrap()).await;

    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 35}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (saved, state) = read_state_file(&path);
    assert_eq!(file_weight(&state, "shop"), 35);
    // What is on disk is what a restart would load.
    let reloaded = Store::open(&path).unwrap();
    assert_eq!(
        reloaded.service("shop").unwrap().canary_weight.percent(),
        35
    );

    // Refused changes of every kind leave the file as it was, byte for byte.
    let refused = [
        api.put("/v1/services/shop/canary-weight", &json!({"weight": 101}))
            .await,
        api.put("/v1/services/nope/canary-weight", &json!({"weight": 1}))
            .await,
        api.put(
            "/v1/filter",
            &json!({"wasm_path": "/x.wasm", "config": {"routes": [{"name": "a", "path_prefix": "nope"}]}}),
        )
        .await,
        api.put(
            "/v1/services/search",
            &json!({"name": "search", "domains": ["shop.example"], "stable": {"endpoints": ["127.0.0.1:9001"]}}),
        )
        .await,
    ];
    for r in &refused {
        assert!((400..500).contains(&r.status), "{r:?}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), saved);
    assert!(
        !dir.path().join("state.json.tmp").exists(),
        "no temporary file is left behind"
    );
}

#[tokio::test]
async fn envoys_and_the_generation() {
    let api = start_default().await;
    let envoys = api.get_ok("/v1/envoys").await;
    assert_eq!(envoys, json!({"generation": 1, "envoys": []}));
    assert_eq!(api.get_ok("/v1/nacks").await, json!([]));

    // An accepted change: one generation more.
    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 60}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.generation().await, 2);
    assert_eq!(api.get_ok("/readyz").await["generation"], 2);

    // A refused change: none.
    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 101}))
        .await;
    assert_error(&r, 400, "invalid_weight");
    assert_eq!(api.generation().await, 2);

    // Setting the weight it already has is accepted but is not a change.
    let r = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 60}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.generation().await, 2);
    assert_eq!(
        api.get_ok("/v1/envoys").await,
        json!({"generation": 2, "envoys": []})
    );
}

#[tokio::test]
async fn unknown_paths_are_json_404s() {
    let api = start_default().await;
    for path in ["/nope", "/v1", "/v1/services/shop/nope", "/v2/services"] {
        let r = api.get(path).await;
        assert_error(&r, 404, "not_found");
    }
    let r = api.put("/v1/nope", &json!({})).await;
    assert_error(&r, 404, "not_found");
}

#[tokio::test]
async fn wrong_methods_are_json_405s() {
    let api = start_default().await;
    let http = common::http();
    for req in [
        http.post(api.url("/v1/services")),
        http.delete(api.url("/v1/services/shop")),
        http.post(api.url("/v1/filter")),
    ] {
        let r = api.send(req).await;
        assert_error(&r, 405, "method_not_allowed");
    }
}

#[tokio::test]
async fn a_weight_body_must_be_an_object() {
    let api = start_default().await;
    let before = api.weight("shop").await;
    let r = api
        .put("/v1/services/shop/canary-weight", &json!([50]))
        .await;
    assert_error_mentions(&r, 400, "invalid_body", "JSON object");
    assert_eq!(api.weight("shop").await, before);
}

/// The real `understudy` binary against the API: what it prints is the
/// API's answer, and what it changes shows in the API afterwards.
#[tokio::test]
async fn the_cli_client_drives_the_api() {
    let api = start_default().await;
    let base = api.url("");
    let run = common::cli(&["set-weight", "shop", "30", "--api", &base]).await;
    assert!(run.success, "{run:?}");
    let printed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(printed["name"], "shop", "{printed}");
    assert_eq!(printed["canary_weight"], 30, "{printed}");
    assert_eq!(api.weight("shop").await, 30);

    let run = common::cli(&["set-weight", "shop", "130", "--api", &base]).await;
    assert!(!run.success, "{run:?}");
    assert!(run.stderr.contains("400"), "{run:?}");
    let printed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(printed["error"]["code"].is_string(), "{printed}");
    assert_eq!(api.weight("shop").await, 30);

    let run = common::cli(&["services", "--api", &base]).await;
    assert!(run.success, "{run:?}");
    let printed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(printed, api.get("/v1/services").await.body);
    assert_eq!(printed[0]["canary_weight"], 30, "{printed}");

    let run = common::cli(&["envoys", "--api", &base]).await;
    assert!(run.success, "{run:?}");
    let printed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        printed["envoys"],
        json!([]),
        "no Envoy connected: {printed}"
    );
    assert_eq!(printed["generation"], api.generation().await, "{printed}");
}

/// With tokens configured: probes stay open, reads need a viewer, changes an
/// operator, and each caller is held to its rate with a 429 and Retry-After.
#[tokio::test]
async fn tokens_roles_and_rate_limits_guard_the_api() {
    use std::num::NonZeroU32;
    use understudy_controlplane::api::auth::{Auth, Limits};
    const OPS: &str = "operator-token-0123456789";
    const VIEW: &str = "viewer-token-0123456789";
    let limits = Limits {
        per_second: NonZeroU32::new(1).unwrap(),
        burst: NonZeroU32::new(3).unwrap(),
    };
    let auth =
        Auth::from_entries(&format!("ops:operator:{OPS}\nview:viewer:{VIEW}"), limits).unwrap();
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let options = understudy_controlplane::Options {
        auth,
        rollouts: None,
        ..Default::default()
    };
    tokio::spawn(understudy_controlplane::run_with(
        Store::new(desired_state()).unwrap(),
        options,
        xds,
        listener,
        std::future::pending(),
    ));
    let http = common::http();
    let url = |p: &str| format!("{base}{p}");
    assert_eq!(
        http.get(url("/healthz")).send().await.unwrap().status(),
        200
    );
    let r = http.get(url("/v1/services")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let get_as = |token: &str, path: &str| http.get(url(path)).bearer_auth(token).send();
    assert_eq!(
        get_as("not-a-token-at-all", "/v1/services")
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(get_as(VIEW, "/v1/services").await.unwrap().status(), 200);
    let r = http
        .put(url("/v1/services/shop/canary-weight"))
        .bearer_auth(VIEW)
        .json(&json!({"weight": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(get_as(VIEW, "/v1/services").await.unwrap().status(), 200);
    // The viewer has used its burst of 3 (the refused change counts): the next one waits.
    let r = get_as(VIEW, "/v1/services").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Another caller has its own budget; the refused change was not applied.
    let r = get_as(OPS, "/v1/services/shop").await.unwrap();
    assert_eq!(r.status(), 200);
    let shop: Value = r.json().await.unwrap();
    assert_eq!(shop["canary_weight"], START_WEIGHT);
}
