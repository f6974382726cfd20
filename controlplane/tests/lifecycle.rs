//! A rollout's life cycle around its judged steps, in process: the real
//! control plane on loopback, driven through its API. Finalizing a succeeded
//! rollout (promoted by hand here: no Envoy, so no evidence; the e2e suite
//! finalizes under real traffic), and what the shadow stage protects.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Weight,
};
use understudy_controlplane::store::Store;

fn endpoint(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn state() -> DesiredState {
    let shop = Service {
        name: "shop".into(),
        domains: vec!["shop.example".into()],
        stable: Backend {
            endpoints: vec![endpoint(8081)],
        },
        canary: Backend {
            endpoints: vec![endpoint(8082)],
        },
        canary_weight: Weight::ZERO,
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

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn start() -> Self {
        let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", api.local_addr().unwrap());
        tokio::spawn(understudy_controlplane::run(
            Store::new(state()).unwrap(),
            xds,
            api,
            std::future::pending(),
        ));
        let http = common::http();
        Self { base, http }
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self
            .call(self.http.get(format!("{}{path}", self.base)))
            .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(
            self.http
                .post(format!("{}{path}", self.base))
                .body(body.to_string()),
        )
        .await
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Creates a two-step rollout of `shop` and promotes it by hand to success.
    async fn succeed(&self, finalize: Value) -> String {
        let spec = json!({
            "service": "shop", "owner": "team",
            "stop_rules": {"max_error_rate_increase_pp": 1.0},
            "steps": [{"weight": 50}, {"weight": 100}],
            "finalize": finalize
        });
        let (status, r) = self.post("/v1/rollouts", &spec).await;
        assert_eq!(status, 201, "{r}");
        let id = r["id"].as_str().unwrap().to_owned();
        for _ in 0..2 {
            let (status, r) = self
                .post(&format!("/v1/rollouts/{id}/promote"), &json!({}))
                .await;
            assert_eq!(status, 200, "{r}");
        }
        let r = self.get(&format!("/v1/rollouts/{id}")).await;
        assert_eq!(r["phase"]["state"], "succeeded", "{r:#}");
        id
    }

    /// Polls a rollout until `done` holds for it (the engine ticks every 100 ms).
    async fn until(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        loop {
            ticker.tick().await;
            let r = self.get(&format!("/v1/rollouts/{id}")).await;
            if done(&r) {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: still {:#}",
                r["finalized"]
            );
        }
    }
}

fn audit_tos(r: &Value) -> Vec<String> {
    r["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_manual_finalize_with_an_emptied_canary_leaves_the_service_ready_for_the_next_rollout() {
    let api = Api::start().await;
    let id = api
        .succeed(json!({"automatic": false, "canary": "empty"}))
        .await;
    // Not automatic: nothing happens by itself.
    let svc = api.get("/v1/services/shop").await;
    assert_eq!(svc["canary_weight"], 100, "{svc}");
    assert!(api.get(&format!("/v1/rollouts/{id}")).await["finalized"].is_null());

    let (status, r) = api
        .post(&format!("/v1/rollouts/{id}/finalize"), &json!({}))
        .await;
    assert_eq!(status, 200, "{r}");
    // With no Envoy connected, emptying the canary is safe at once.
    let r = api
        .until(&id, "the canary to be emptied", |r| {
            r["finalized"]["state"] == "done"
        })
        .await;
    let svc = api.get("/v1/services/shop").await;
    assert_eq!(svc["canary_weight"], 0, "{svc}");
    assert_eq!(
        svc["stable"]["endpoints"],
        json!(["127.0.0.1:8082"]),
        "{svc}"
    );
    assert_eq!(svc["canary"]["endpoints"], json!([]), "{svc}");
    assert_eq!(r["weights"], json!({"stable": 100, "canary": 0}));
    let tos = audit_tos(&r);
    assert_eq!(
        &tos[tos.len() - 3..],
        ["succeeded", "finalized", "finalized"]
    );
    let entry = &r["audit"][tos.len() - 2];
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .contains("stable backend is now the new version (127.0.0.1:8082)"),
        "{entry}"
    );
    assert_eq!(entry["actor"], "anonymous", "{entry}");

    // Once only, and never for an active rollout.
    let (status, r) = api
        .post(&format!("/v1/rollouts/{id}/finalize"), &json!({}))
        .await;
    assert_eq!(status, 409, "{r}");
    let (status, body) = api
        .put(
            "/v1/services/shop",
            &json!({"name": "shop", "domains": ["shop.example"],
                    "stable": {"endpoints": ["127.0.0.1:8082"]},
                    "canary": {"endpoints": ["127.0.0.1:8083"]}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, r) = api
        .post(
            "/v1/rollouts",
            &json!({"service": "shop", "owner": "team",
                    "stop_rules": {"max_error_rate_increase_pp": 1.0},
                    "steps": [{"weight": 100}]}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let next = r["id"].as_str().unwrap();
    let (status, r) = api
        .post(&format!("/v1/rollouts/{next}/finalize"), &json!({}))
        .await;
    assert_eq!(status, 409, "an active rollout cannot be finalized: {r}");
}

#[tokio::test]
async fn finalizing_is_automatic_by_default_and_refuses_a_service_that_changed_since() {
    let api = Api::start().await;
    let id = api.succeed(json!({})).await;
    let r = api
        .until(&id, "automatic finalize", |r| {
            r["finalized"]["state"] == "done"
        })
        .await;
    assert_eq!(r["finalized"]["actor"], "engine", "{r}");
    let svc = api.get("/v1/services/shop").await;
    assert_eq!(svc["canary_weight"], 0, "{svc}");
    assert_eq!(svc["stable"]["endpoints"], json!(["127.0.0.1:8082"]));
    // The default keeps the canary's endpoints (at weight 0 they serve nothing).
    assert_eq!(svc["canary"]["endpoints"], json!(["127.0.0.1:8082"]));

    // A manual one whose service an operator changed after success is
    // recorded as not finalized, and the service is left as the operator set it.
    let id = api.succeed(json!({"automatic": false})).await;
    let (status, _) = api
        .put("/v1/services/shop/canary-weight", &json!({"weight": 30}))
        .await;
    assert_eq!(status, 200);
    let (status, r) = api
        .post(&format!("/v1/rollouts/{id}/finalize"), &json!({}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["finalized"]["state"], "skipped", "{r}");
    assert!(
        r["finalized"]["reason"]
            .as_str()
            .unwrap()
            .contains("canary weight is 30"),
        "{r}"
    );
    assert_eq!(audit_tos(&r).last().unwrap(), "not finalized");
    assert_eq!(api.get("/v1/services/shop").await["canary_weight"], 30);
}

#[tokio::test]
async fn a_routes_counts_cannot_be_reset_while_a_shadow_stage_judges_them() {
    let api = Api::start().await;
    let spec = json!({
        "service": "shop", "owner": "team",
        "stop_rules": {"max_error_rate_increase_pp": 1.0, "max_unexpected_mismatch_rate": 0.01},
        "shadow": {"route": "api", "percent": 100, "max_serious_rate": 0.01},
        "steps": [{"weight": 100}]
    });
    let (status, r) = api.post("/v1/rollouts", &spec).await;
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/shadow/routes/api", api.base);
    let (status, body) = api.call(api.http.delete(&url)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "rollout_active");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&id),
        "{body}"
    );
    let (status, _) = api
        .post(&format!("/v1/rollouts/{id}/abort"), &json!({}))
        .await;
    assert_eq!(status, 200);
    // No longer judged: the reset goes through (404: no reports for it yet).
    let (status, body) = api.call(api.http.delete(&url)).await;
    assert_eq!(status, 404, "{body}");
}
