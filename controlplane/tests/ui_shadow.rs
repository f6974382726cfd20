//! The Shadow pages in process: the real API and dashboard router on
//! loopback with tokens, shadow records ingested as the report service
//! would. No session means the login page; a viewer sees no replay or apply
//! button and a viewer's (or a forged) POST gets 403; bodies are shown
//! redacted and escaped; applied rules go through the filter's validation
//! (a refusal names the field and changes nothing) and show in
//! `GET /v1/filter`; the preview module and script are served embedded.

mod common;

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use understudy_controlplane::api::ApiState;
use understudy_controlplane::api::auth::{Auth, Limits};
use understudy_controlplane::evidence::envoy_stats::MetricsBook;
use understudy_controlplane::evidence::shadow::{Origin, ShadowBook};
use understudy_controlplane::evidence::usage::UsageBook;
use understudy_controlplane::rollout::engine::{Engine, Sources};
use understudy_controlplane::rollout::store::RolloutStore;
use understudy_controlplane::store::Store;
use understudy_controlplane::xds::Registry;
use understudy_proto::v1::{
    Difference, Header, MismatchRecord, RecordedRequest, RecordedResponse, ReportBatch,
    RouteCounts, difference,
};

const OPERATOR: &str = "operator-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789ab";

struct Cp {
    base: String,
    shadow: Arc<ShadowBook>,
}

async fn start() -> Cp {
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store = Store::new(common::desired(
        json!({"routes": [{"name": "orders", "path_prefix": "/orders", "shadow": {
            "cluster": "shop-canary", "compare": {"ignore": ["$.at"]}
        }}]}),
        [common::service("shop", 9001)],
    ))
    .unwrap();
    let registry = Arc::new(Registry::default());
    let shadow = Arc::new(ShadowBook::default());
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            RolloutStore::in_memory().unwrap(),
            Sources {
                metrics: Arc::new(MetricsBook::default()),
                shadow: Arc::clone(&shadow),
                registry: Arc::clone(&registry),
            },
        )
        .unwrap(),
    );
    let auth = Auth::from_entries(
        &format!("ops:operator:{OPERATOR}\nvera:viewer:{VIEWER}"),
        Limits::default(),
    )
    .unwrap();
    let app = understudy_controlplane::api::router(ApiState {
        store,
        registry,
        usage: Arc::new(UsageBook::default()),
        shadow: Arc::clone(&shadow),
        shadow_resets: None,
        auth: Arc::new(auth),
        engine,
        metrics: Arc::new(understudy_controlplane::metrics::Metrics::new().unwrap()),
    });
    let base = format!("http://{}", api.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(api, app).await });
    Cp { base, shadow }
}

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.into(),
    }
}

/// A live record of route `orders`: the primary answered `body`, the
/// shadow differed at `$.total` (and at `$.at`, ignored: noise).
fn record(request_id: &str, body: &str) -> MismatchRecord {
    let diff = |path: &str, serious: bool, p: &str, s: &str| Difference {
        path: path.into(),
        kind: difference::Kind::ValueChange as i32,
        bucket: if serious {
            difference::Bucket::Serious
        } else {
            difference::Bucket::Noise
        } as i32,
        primary: p.into(),
        shadow: s.into(),
        unexpected: serious,
    };
    MismatchRecord {
        route: "orders".into(),
        request_id: request_id.into(),
        serious: true,
        unexpected: true,
        differences: vec![
            diff("$.total", true, "10", "11"),
            diff("$.at", false, "\"a\"", "\"b\""),
        ],
        time_unix_ms: 1_700_000_000_000,
        request: Some(RecordedRequest {
            method: "GET".into(),
            path: "/orders/1".into(),
            authority: "shop.example".into(),
            headers: vec![
                header("x-request-id", request_id),
                header("authorization", "Bearer secret-request-token"),
            ],
            body: Vec::new(),
            body_truncated: false,
        }),
        primary: Some(RecordedResponse {
            status: 200,
            headers: vec![
                header("content-type", "application/json"),
                header("set-cookie", "sid=secret-cookie-value"),
            ],
            body: body.as_bytes().to_vec(),
            body_truncated: false,
        }),
        shadow_cluster: "shop-canary".into(),
        ..Default::default()
    }
}

impl Cp {
    fn push(&self, records: Vec<MismatchRecord>) {
        let n = records.len() as u64;
        let batch = ReportBatch {
            node_id: "envoy-1".into(),
            dropped: 0,
            routes: vec![RouteCounts {
                route: "orders".into(),
                calibration: false,
                compared: 10,
                matched: 10 - n,
                mismatched_serious: n,
                mismatched_noise: 0,
                unexpected: n,
                skipped: [("body_too_large".to_owned(), 3)].into_iter().collect(),
                latency_gap_us_sum: 0,
                segments: Vec::new(),
            }],
            mismatches: records,
        };
        let origin = Origin::Verified {
            identity: "envoy-1".into(),
        };
        let accepted = self
            .shadow
            .ingest_from(batch, origin, std::time::SystemTime::now())
            .accepted;
        assert_eq!(accepted, n);
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn login(&self, token: &str) -> String {
        let r = browser()
            .post(self.url("/ui/login"))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        let set = r.headers()[reqwest::header::SET_COOKIE].to_str().unwrap();
        set.split(';').next().unwrap().to_owned()
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut req = browser().get(self.url(path));
        if let Some(c) = cookie {
            req = req.header(reqwest::header::COOKIE, c);
        }
        req.send().await.unwrap()
    }

    async fn html(&self, path: &str, cookie: &str) -> String {
        let r = self.get(path, Some(cookie)).await;
        assert_eq!(r.status(), 200, "{path}");
        r.text().await.unwrap()
    }

    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        csrf: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let mut req = browser()
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned());
        if let Some(c) = cookie {
            req = req.header(reqwest::header::COOKIE, c);
        }
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn filter_compare(&self) -> Value {
        let f: Value = common::http()
            .get(self.url("/v1/filter"))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        f["config"]["routes"][0]["shadow"]["compare"].clone()
    }
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(common::TIMEOUT)
        .build()
        .unwrap()
}

fn csrf_of(html: &str) -> String {
    let key = r#"name="csrf-token" content=""#;
    let at = html.find(key).expect("a csrf-token meta");
    let rest = &html[at + key.len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

#[tokio::test]
async fn without_a_session_no_shadow_data() {
    let cp = start().await;
    cp.push(vec![record("r1", r#"{"total": 10, "at": "a"}"#)]);
    for path in [
        "/ui/shadow",
        "/ui/shadow/orders",
        "/ui/shadow/orders/samples.json",
    ] {
        let r = cp.get(path, None).await;
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/ui/login");
        assert!(
            r.text().await.unwrap().is_empty(),
            "{path}: no data without a session"
        );
    }
    let (status, _) = cp.post("/ui/shadow/orders/rules", None, None, "{}").await;
    assert_eq!(status, 403);
    let (status, _) = cp.post("/ui/shadow/samples/1/replay", None, None, "").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn pages_show_rates_paths_and_redacted_escaped_samples() {
    let cp = start().await;
    cp.push(vec![
        record(
            "r1",
            r#"{"total": 10, "at": "a", "note": "<script>alert(1)</script>"}"#,
        ),
        record("r2", r#"{"total": 10, "at": "a"}"#),
    ]);
    let viewer = cp.login(VIEWER).await;
    let list = cp.html("/ui/shadow", &viewer).await;
    assert!(list.contains(r#"<tr data-route="orders">"#), "{list}");
    assert!(list.contains(r#"href="/ui/shadow/orders""#));
    // 2 serious of 10 compared.
    assert!(list.contains("80.0%"), "{list}");

    let page = cp.html("/ui/shadow/orders", &viewer).await;
    for text in [
        r#"data-path="$.total""#,
        r#"data-path="$.at""#,
        r#"class="sample" data-sample="#,
        "body_too_large",
        r#"class="differs""#,
        r#"id="rule-editor""#,
        r#"id="rule-ignore-input""#,
        r#"id="preview-match-rate""#,
    ] {
        assert!(page.contains(text), "{text} missing from the route page");
    }
    // The body's script is text, never markup.
    assert!(!page.contains("<script>alert(1)"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    // A viewer has nothing to press.
    assert!(!page.contains("button class=\"replay\""), "{page}");
    assert!(!page.contains(r#"id="apply-rules""#));

    // The samples for the preview: redacted, both sides, the shadow rebuilt.
    let r = cp
        .get("/ui/shadow/orders/samples.json", Some(&viewer))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("secret-cookie-value"), "{text}");
    assert!(!text.contains("secret-request-token"), "{text}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["rules"]["ignore"], json!(["$.at"]));
    let samples = doc["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    let headers = &samples[0]["primary"]["headers"];
    assert!(
        headers
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "set-cookie" && h["value"] == "[redacted]"),
        "{headers}"
    );
    let shadow: Value =
        serde_json::from_str(samples[0]["shadow"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        (shadow["total"].clone(), shadow["at"].clone()),
        (json!(11), json!("b"))
    );
    assert_eq!(samples[0]["exact"], true);

    // The operator gets the buttons.
    let operator = cp.login(OPERATOR).await;
    let page = cp.html("/ui/shadow/orders", &operator).await;
    assert!(page.contains(r#"<button class="replay""#), "{page}");
    assert!(page.contains(r#"id="apply-rules""#));
    assert!(!page.contains("secret-cookie-value"));
}

#[tokio::test]
async fn only_an_operator_with_the_token_applies_rules_through_the_filter_validation() {
    let cp = start().await;
    let before = cp.filter_compare().await;
    assert_eq!(before["ignore"], json!(["$.at"]));
    let rules =
        r#"{"ignore": ["$.at", "$.meta.*"], "tolerance": [{"path": "$.total", "absolute": 1}]}"#;

    // A viewer, even with its own token: 403, nothing changes.
    let viewer = cp.login(VIEWER).await;
    let token = csrf_of(&cp.html("/ui/shadow/orders", &viewer).await);
    let (status, _) = cp
        .post(
            "/ui/shadow/orders/rules",
            Some(&viewer),
            Some(&token),
            rules,
        )
        .await;
    assert_eq!(status, 403);
    // An operator without (or with a forged) CSRF token: 403.
    let operator = cp.login(OPERATOR).await;
    for forged in [None, Some("forged-token")] {
        let (status, _) = cp
            .post("/ui/shadow/orders/rules", Some(&operator), forged, rules)
            .await;
        assert_eq!(status, 403, "{forged:?}");
    }
    assert_eq!(cp.filter_compare().await, before);

    let token = csrf_of(&cp.html("/ui/shadow/orders", &operator).await);
    // Invalid rules: refused, naming the field, and the config is unchanged.
    for (bad, field) in [
        (
            r#"{"ignore": ["$.at", "no-dollar"]}"#,
            "routes[0].shadow.compare.ignore[1]",
        ),
        (
            r#"{"tolerance": [{"path": "$.total", "absolute": -1}]}"#,
            "routes[0].shadow.compare.tolerance[0].absolute",
        ),
        (r#"{"ignore": "$.at"}"#, "compare.ignore"),
        (r#"{"ignor": []}"#, "compare.ignor"),
    ] {
        let (status, body) = cp
            .post(
                "/ui/shadow/orders/rules",
                Some(&operator),
                Some(&token),
                bad,
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["field"], field, "{bad}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    assert_eq!(cp.filter_compare().await, before);
    let (status, _) = cp
        .post(
            "/ui/shadow/nope/rules",
            Some(&operator),
            Some(&token),
            rules,
        )
        .await;
    assert_eq!(status, 404);

    // Valid: applied, and the filter config shows it.
    let (status, body) = cp
        .post(
            "/ui/shadow/orders/rules",
            Some(&operator),
            Some(&token),
            rules,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let after = cp.filter_compare().await;
    assert_eq!(after["ignore"], json!(["$.at", "$.meta.*"]), "{after}");
    assert_eq!(
        after["tolerance"],
        json!([{"path": "$.total", "absolute": 1.0}]),
        "{after}"
    );
}

#[tokio::test]
async fn replay_is_the_apis_replay_for_operators_only() {
    let cp = start().await;
    cp.push(vec![record("r1", r#"{"total": 10, "at": "a"}"#)]);
    let viewer = cp.login(VIEWER).await;
    let id = {
        let r = cp
            .get("/ui/shadow/orders/samples.json", Some(&viewer))
            .await;
        let doc: Value = r.json().await.unwrap();
        doc["samples"][0]["id"].as_str().unwrap().to_owned()
    };
    let path = format!("/ui/shadow/samples/{id}/replay");
    let token = csrf_of(&cp.html("/ui/shadow/orders", &viewer).await);
    let (status, _) = cp.post(&path, Some(&viewer), Some(&token), "").await;
    assert_eq!(status, 403);

    let operator = cp.login(OPERATOR).await;
    let token = csrf_of(&cp.html("/ui/shadow/orders", &operator).await);
    let (status, body) = cp.post(&path, Some(&operator), Some(&token), "").await;
    // Nothing serves the canary here, so both say the same refusal.
    let api = common::http()
        .post(cp.url(&format!("/v1/shadow/samples/{id}/replay")))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(status, api.status().as_u16(), "{body}");
    let ui: Value = serde_json::from_str(&body).unwrap();
    let api: Value = api.json().await.unwrap();
    assert_eq!(ui["error"]["code"], api["error"]["code"]);
    // Audited with the dashboard user's name.
    let replays: Value = common::http()
        .get(cp.url("/v1/shadow/replays"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        replays["replays"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "ops" && r["sample"] == id.as_str()),
        "{replays}"
    );
    let (status, _) = cp
        .post(
            "/ui/shadow/samples/999999/replay",
            Some(&operator),
            Some(&token),
            "",
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_preview_module_is_served_from_the_binary() {
    let cp = start().await;
    let viewer = cp.login(VIEWER).await;
    let page = cp.html("/ui/shadow/orders", &viewer).await;
    let url = |name: &str| {
        let at = page
            .find(&format!("/ui/shadow-assets/{name}?v="))
            .unwrap_or_else(|| panic!("{name} in {page}"));
        let rest = &page[at..];
        rest[..rest.find('"').unwrap()].to_owned()
    };
    for (name, kind) in [
        ("shadow.js", "text/javascript; charset=utf-8"),
        ("understudy_preview.js", "text/javascript; charset=utf-8"),
        ("understudy_preview_bg.wasm", "application/wasm"),
    ] {
        let r = cp.get(&url(name), None).await;
        assert_eq!(r.status(), 200, "{name}: built by `cargo xtask setup`");
        assert_eq!(r.headers()[reqwest::header::CONTENT_TYPE], kind);
        assert!(
            r.headers()[reqwest::header::CACHE_CONTROL]
                .to_str()
                .unwrap()
                .contains("immutable")
        );
        let body = r.bytes().await.unwrap();
        if name.ends_with(".wasm") {
            assert_eq!(&body[..4], b"\0asm");
        }
    }
    assert!(!page.contains("rule preview not built"));
}
