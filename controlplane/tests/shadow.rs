//! In-process integration tests of shadow reporting: batches pushed over
//! real gRPC to the xDS port, read back through the JSON API, and samples
//! replayed against a small HTTP upstream registered as a service's canary.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use understudy_controlplane::api::ApiState;
use understudy_controlplane::api::auth::Auth;
use understudy_controlplane::evidence::envoy_stats::MetricsBook;
use understudy_controlplane::evidence::shadow::{Origin, ShadowBook};
use understudy_controlplane::evidence::usage::{Reports, UsageBook};
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Weight,
};
use understudy_controlplane::rollout::engine::{Engine, Sources};
use understudy_controlplane::rollout::store::RolloutStore;
use understudy_controlplane::store::Store;
use understudy_controlplane::xds::Registry;
use understudy_proto::v1::report_service_client::ReportServiceClient;
use understudy_proto::v1::{
    Difference, Header, MismatchRecord, RecordedRequest, RecordedResponse, ReportBatch,
    RouteCounts, difference,
};

/// The filter config: route `orders` shadows to `shop-canary`, where `$.at`
/// (a timestamp) is ignored.
fn filter_config() -> Value {
    json!({"routes": [{"name": "orders", "path_prefix": "/orders", "shadow": {
        "cluster": "shop-canary",
        "unsafe_methods": true,
        "compare": {"ignore": ["$.at"]}
    }}]})
}

/// A port nothing listens on: bound, then released.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn desired_state() -> DesiredState {
    let shop = Service {
        name: "shop".into(),
        domains: vec!["shop.example".into()],
        stable: Backend {
            endpoints: vec![closed_port().await],
        },
        canary: Backend {
            endpoints: vec![closed_port().await],
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
            config: understudy_controlplane::model::FilterDoc::parse(filter_config()).unwrap(),
            report_cluster: "understudy_xds".into(),
        },
        services: [("shop".to_string(), shop)].into_iter().collect(),
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
}

/// A running control plane: its API and its report service.
struct ControlPlane {
    api: String,
    xds: SocketAddr,
    http: reqwest::Client,
    /// The shadow book behind both, for records from a verified Envoy (the
    /// plain-text report service here marks every record unverified).
    shadow: Arc<ShadowBook>,
}

/// The control plane's parts, composed as `run_with` does, but with the
/// shadow book in the test's hands.
async fn start() -> ControlPlane {
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store = Store::new(desired_state().await).unwrap();
    let registry = Arc::new(Registry::default());
    let usage = Arc::new(UsageBook::default());
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
    let cp = ControlPlane {
        api: format!("http://{}", api.local_addr().unwrap()),
        xds: xds.local_addr().unwrap(),
        http: common::http(),
        shadow: Arc::clone(&shadow),
    };
    let app = understudy_controlplane::api::router(ApiState {
        store,
        registry,
        usage: Arc::clone(&usage),
        shadow: Arc::clone(&shadow),
        shadow_resets: None,
        auth: Arc::new(Auth::disabled()),
        engine,
        metrics: Arc::new(understudy_controlplane::metrics::Metrics::new().unwrap()),
    });
    tokio::spawn(async move { axum::serve(api, app).await });
    let reports = Reports::new(usage, shadow).into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            // As `run_with` serves the port in plaintext mode: every peer
            // is marked unauthenticated (records stay unverified).
            .layer(tonic::service::InterceptorLayer::new(
                understudy_controlplane::tls::peer_interceptor(false, None),
            ))
            .add_service(reports)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(xds)),
    );
    cp
}

impl ControlPlane {
    /// Puts route `orders` in A/A calibration (or takes it out).
    async fn set_calibration(&self, on: bool) {
        let mut filter = self.get_ok("/v1/filter").await;
        filter["config"]["routes"][0]["shadow"]["calibration"] = json!(on);
        let r = self
            .send(self.http.put(self.url("/v1/filter")).json(&filter))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    /// As the report service will for a batch from an Envoy whose client
    /// certificate it verified.
    fn push_verified(&self, batch: ReportBatch) -> u64 {
        let origin = Origin::Verified {
            identity: batch.node_id.clone(),
        };
        self.shadow
            .ingest_from(batch, origin, std::time::SystemTime::now())
            .accepted
    }

    async fn push(&self, batch: ReportBatch) -> u64 {
        let mut client = ReportServiceClient::connect(format!("http://{}", self.xds))
            .await
            .unwrap();
        client.push(batch).await.unwrap().into_inner().accepted
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            assert!(json, "status {status}: not labelled JSON: {text:?}");
            serde_json::from_str(&text).unwrap()
        };
        Reply { status, body }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(self.url(path))).await
    }

    async fn get_ok(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.body
    }

    async fn replay(&self, id: &str, body: Option<&'static str>) -> Reply {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/shadow/samples/{id}/replay")));
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        self.send(req).await
    }
}

fn assert_error(r: &Reply, status: u16, code: &str, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.body["error"]["code"], code, "{r:?}");
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?}"
    );
}

fn counts(calibration: bool, c: [u64; 5], gap_us: i64) -> RouteCounts {
    RouteCounts {
        route: "orders".into(),
        calibration,
        compared: c[0],
        matched: c[1],
        mismatched_serious: c[2],
        mismatched_noise: c[3],
        unexpected: c[4],
        skipped: Default::default(),
        latency_gap_us_sum: gap_us,
        segments: Vec::new(),
    }
}

fn diff(path: &str, serious: bool, primary: &str, shadow: &str) -> Difference {
    Difference {
        path: path.into(),
        kind: difference::Kind::ValueChange as i32,
        bucket: if serious {
            difference::Bucket::Serious
        } else {
            difference::Bucket::Noise
        } as i32,
        primary: primary.into(),
        shadow: shadow.into(),
        unexpected: serious,
    }
}

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.into(),
    }
}

/// A live mismatch on `path` whose primary answered `{"total": 10, "at": "a"}`.
fn record(request_id: &str, method: &str, path: &str, diffs: Vec<Difference>) -> MismatchRecord {
    MismatchRecord {
        route: "orders".into(),
        request_id: request_id.into(),
        serious: diffs
            .iter()
            .any(|d| d.bucket == difference::Bucket::Serious as i32),
        unexpected: diffs.iter().any(|d| d.unexpected),
        differences: diffs,
        latency_gap_us: 2500,
        calibration: false,
        time_unix_ms: 1_700_000_000_000,
        segment: String::new(),
        request: Some(RecordedRequest {
            method: method.into(),
            path: path.into(),
            authority: "shop.example-shadow".into(),
            headers: vec![
                header("x-request-id", request_id),
                header("content-type", "application/json"),
                header("connection", "keep-alive"),
                header("x-understudy-shadow", "1"),
            ],
            body: if method == "POST" {
                br#"{"qty": 2}"#.to_vec()
            } else {
                Vec::new()
            },
            body_truncated: false,
        }),
        primary: Some(RecordedResponse {
            status: 200,
            headers: vec![header("content-type", "application/json")],
            body: br#"{"total": 10, "at": "a"}"#.to_vec(),
            body_truncated: false,
        }),
        shadow_cluster: "shop-canary".into(),
        ..Default::default()
    }
}

fn batch(routes: Vec<RouteCounts>, mismatches: Vec<MismatchRecord>) -> ReportBatch {
    ReportBatch {
        node_id: "envoy-1".into(),
        mismatches,
        dropped: 0,
        routes,
    }
}

#[tokio::test]
async fn pushed_reports_are_summarised_with_paths_and_samples() {
    let cp = start().await;
    cp.set_calibration(true).await;
    let mut live = counts(false, [10, 6, 3, 1, 2], 30_000);
    live.skipped.insert("shadow_timeout".into(), 2);
    let mut b = batch(
        vec![live, counts(true, [4, 4, 0, 0, 0], 0)],
        vec![
            record(
                "r1",
                "GET",
                "/orders/1",
                vec![diff("$.total", true, "10", "11")],
            ),
            record(
                "r2",
                "POST",
                "/orders/2",
                vec![
                    diff("$.total", true, "10", "12"),
                    diff("$.at", false, "\"a\"", "\"b\""),
                ],
            ),
        ],
    );
    b.dropped = 3;
    assert_eq!(cp.push(b).await, 2);

    let list = cp.get_ok("/v1/shadow/routes").await;
    assert_eq!(list["records_stored"], 2);
    assert_eq!(list["dropped_by_filters"], 3);
    let s = &list["routes"][0];
    assert_eq!(s["route"], "orders");
    assert_eq!(
        (
            &s["compared"],
            &s["matched"],
            &s["mismatched_serious"],
            &s["mismatched_noise"]
        ),
        (&json!(10), &json!(6), &json!(3), &json!(1))
    );
    assert_eq!(s["unexpected"], 2);
    assert_eq!(s["skipped"]["shadow_timeout"], 2);
    // Every other reason is listed, at zero.
    let skipped = s["skipped"].as_object().unwrap();
    assert_eq!(skipped.len(), understudy_core::shadow::Skip::ALL.len());
    assert_eq!(skipped.values().filter_map(|v| v.as_u64()).sum::<u64>(), 2);
    assert_eq!(s["match_rate"], 0.7);
    assert_eq!(s["exact_match_rate"], 0.6);
    assert_eq!(s["serious_rate"], 0.3);
    assert_eq!(s["unexpected_rate"], 0.2);
    assert_eq!(s["mean_latency_gap_ms"], 3.0);
    assert_eq!(s["records"], 2);
    let ci = s["match_rate_ci"].as_array().unwrap();
    let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
    assert!(
        (lo - 0.3968).abs() < 1e-3 && (hi - 0.8922).abs() < 1e-3,
        "{ci:?}"
    );
    assert_eq!(s["calibration"]["compared"], 4);
    assert_eq!(s["calibration"]["match_rate"], 1.0);
    assert_eq!(s["calibration"]["calibration"], Value::Null);

    let d = cp.get_ok("/v1/shadow/routes/orders").await;
    assert_eq!(d["compared"], 10);
    let paths = d["top_paths"].as_array().unwrap();
    assert_eq!(paths[0]["path"], "$.total");
    assert_eq!(
        (
            &paths[0]["count"],
            &paths[0]["serious"],
            &paths[0]["noise"],
            &paths[0]["unexpected"]
        ),
        (&json!(2), &json!(2), &json!(0), &json!(2))
    );
    assert_eq!(paths[0]["learned_noise_rate"], Value::Null);
    assert_eq!(
        paths[0]["samples"][1],
        json!({"id": "2", "request_id": "r2", "kind": "value_change", "bucket": "serious",
               "primary": "10", "shadow": "12"})
    );
    assert_eq!(paths[1]["path"], "$.at");
    assert_eq!(paths[1]["noise"], 1);

    let r = cp.get_ok("/v1/shadow/samples/2").await;
    assert_eq!(r["id"], "2");
    assert_eq!(r["route"], "orders");
    assert_eq!(r["request_id"], "r2");
    assert_eq!(r["node_id"], "envoy-1");
    assert_eq!(r["time"], 1_700_000_000_000u64);
    assert_eq!(r["latency_gap_ms"], 2.5);
    assert_eq!(r["calibration"], false);
    assert_eq!(r["shadow_cluster"], "shop-canary");
    assert_eq!(r["segment"], Value::Null);
    assert_eq!(
        r["differences"][1],
        json!({"path": "$.at", "kind": "value_change", "bucket": "noise",
               "primary": "\"a\"", "shadow": "\"b\"", "unexpected": false,
               "learned_noise_rate": null})
    );
    assert_eq!(r["request"]["method"], "POST");
    assert_eq!(r["request"]["path"], "/orders/2");
    assert_eq!(r["request"]["body"], r#"{"qty": 2}"#);
    assert_eq!(
        r["request"]["headers"][0],
        json!({"name": "x-request-id", "value": "r2"})
    );
    assert_eq!(r["primary"]["status"], 200);
    assert_eq!(r["primary"]["body"], r#"{"total": 10, "at": "a"}"#);
    assert_eq!(r["primary"]["body_truncated"], false);

    // Unknown things are JSON 404s.
    assert_error(
        &cp.get("/v1/shadow/routes/nope").await,
        404,
        "unknown_route",
        "nope",
    );
    for id in ["999", "abc", "-1"] {
        let r = cp.get(&format!("/v1/shadow/samples/{id}")).await;
        assert_error(&r, 404, "unknown_sample", id);
    }
}

#[tokio::test]
async fn no_data_is_null_not_healthy() {
    let cp = start().await;
    assert_eq!(cp.get_ok("/v1/shadow/routes").await["routes"], json!([]));
    let mut skipped = counts(false, [0; 5], 0);
    skipped.skipped.insert("skipped_too_large".into(), 5);
    assert_eq!(cp.push(batch(vec![skipped], vec![])).await, 0);
    let s = &cp.get_ok("/v1/shadow/routes").await["routes"][0];
    for key in [
        "match_rate",
        "match_rate_ci",
        "exact_match_rate",
        "serious_rate",
        "unexpected_rate",
        "mean_latency_gap_ms",
    ] {
        assert_eq!(s[key], Value::Null, "{key}: {s:#}");
        assert_eq!(
            s["calibration"][key],
            Value::Null,
            "calibration {key}: {s:#}"
        );
    }
    assert_eq!(s["skipped"]["skipped_too_large"], 5);
}

/// What the test upstream received.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// An upstream that answers `/orders/fixed*` like the primary did (only the
/// ignored `$.at` differs) and anything else with a different total.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let app = axum::Router::new()
        .fallback(
            |State(seen): State<Arc<Mutex<Vec<Received>>>>,
             method: Method,
             uri: Uri,
             headers: HeaderMap,
             body: Bytes| async move {
                let total = if uri.path().starts_with("/orders/fixed") {
                    10
                } else {
                    11
                };
                seen.lock().unwrap().push(Received {
                    method,
                    uri,
                    headers,
                    body,
                });
                axum::Json(json!({"total": total, "at": "replayed"}))
            },
        )
        .with_state(Arc::clone(&seen));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[tokio::test]
async fn samples_replay_against_a_cluster_and_compare_again() {
    let cp = start().await;
    let (addr, seen) = upstream().await;
    let mut shop = cp.get_ok("/v1/services/shop").await;
    shop["canary"]["endpoints"] = json!([addr.to_string()]);
    let r = cp
        .send(cp.http.put(cp.url("/v1/services/shop")).json(&shop))
        .await;
    assert_eq!(r.status, 200, "{r:?}");

    let total = || vec![diff("$.total", true, "10", "11")];
    let mut truncated = record("r3", "GET", "/orders/fixed", total());
    if let Some(p) = truncated.primary.as_mut() {
        p.body = Vec::new();
        p.body_truncated = true;
    }
    let accepted = cp.push_verified(batch(
        vec![],
        vec![
            record("r1", "GET", "/orders/fixed?x=1", total()),
            record("r2", "POST", "/orders/broken", total()),
            truncated,
        ],
    ));
    assert_eq!(accepted, 3);

    // The new version was fixed: only the ignored timestamp differs now.
    let r = cp.replay("1", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["id"], "1");
    assert_eq!(r.body["cluster"], "shop-canary");
    assert_eq!(r.body["endpoint"], addr.to_string());
    assert_eq!(r.body["status"], 200);
    assert_eq!(r.body["matched"], true, "{r:?}");
    assert_eq!(r.body["comparison"]["serious"], 0);
    assert_eq!(r.body["comparison"]["noise"], 1);
    assert_eq!(r.body["comparison"]["differences"][0]["path"], "$.at");
    {
        let got = seen.lock().unwrap();
        let req = &got[0];
        assert_eq!(req.method, Method::GET);
        assert_eq!(req.uri, "/orders/fixed?x=1");
        assert_eq!(req.headers["x-request-id"], "r1");
        assert_eq!(req.headers["x-understudy-replay"], "1");
        assert_eq!(req.headers["host"], "shop.example-shadow");
        assert_eq!(req.headers["x-understudy-shadow"], "1");
    }

    // Still broken: the difference is reported again, serious and unexpected.
    let r = cp.replay("2", Some("{}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["matched"], false, "{r:?}");
    let d = r.body["comparison"]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == "$.total")
        .unwrap_or_else(|| panic!("no $.total difference: {r:?}"));
    assert_eq!(
        (
            &d["path"],
            &d["kind"],
            &d["bucket"],
            &d["primary"],
            &d["shadow"]
        ),
        (
            &json!("$.total"),
            &json!("value_change"),
            &json!("serious"),
            &json!("10"),
            &json!("11")
        )
    );
    assert_eq!(r.body["comparison"]["unexpected"], 1);
    {
        let got = seen.lock().unwrap();
        assert_eq!(got[1].method, Method::POST);
        assert_eq!(&got[1].body[..], br#"{"qty": 2}"#);
    }

    // Bad inputs, each with its own status and a message naming the problem.
    assert_error(&cp.replay("999", None).await, 404, "unknown_sample", "999");
    assert_error(&cp.replay("x", None).await, 404, "unknown_sample", "x");
    let r = cp.replay("1", Some(r#"{"cluster": "nope"}"#)).await;
    assert_error(&r, 400, "unknown_cluster", "nope");
    assert_error(
        &cp.replay("1", Some("{")).await,
        400,
        "invalid_body",
        "not JSON",
    );
    assert_error(
        &cp.replay("1", Some("[1]")).await,
        400,
        "invalid_body",
        "JSON object",
    );
    let r = cp
        .replay("1", Some(r#"{"cluster": "shop-canary", "x": 1}"#))
        .await;
    assert_error(&r, 400, "invalid_body", "unknown field `x`");
    assert_error(
        &cp.replay("3", None).await,
        409,
        "body_truncated",
        "too large",
    );
    // The stable endpoint refuses connections.
    let r = cp.replay("1", Some(r#"{"cluster": "shop-stable"}"#)).await;
    assert_error(&r, 502, "upstream_failed", "refused");
    assert_eq!(seen.lock().unwrap().len(), 2, "failed replays sent nothing");

    // A record pushed by an unauthenticated peer is shown but never sent.
    let mut forged = record("forged", "GET", "/orders/fixed", total());
    if let Some(req) = forged.request.as_mut() {
        req.headers.push(Header {
            name: "authorization".into(),
            value: "Bearer planted".into(),
        });
    }
    assert_eq!(cp.push(batch(vec![], vec![forged])).await, 1);
    let shown = cp.get_ok("/v1/shadow/samples/4").await;
    assert_eq!(shown["origin"]["kind"], "unverified");
    // Viewers never see credentials in a sample.
    let headers = shown["request"]["headers"].as_array().unwrap();
    assert!(
        headers
            .iter()
            .any(|h| h["name"] == "authorization" && h["value"] == "[redacted]"),
        "{shown}"
    );
    assert!(!shown.to_string().contains("planted"), "{shown}");
    let r = cp.replay("4", None).await;
    assert_error(&r, 403, "unverified_sample", "authenticated Envoy");
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the forged record was not sent"
    );
    // Every attempt is in the audit log with its actor.
    let audit = cp.get_ok("/v1/shadow/replays").await;
    let entries = audit["replays"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["actor"] == "anonymous"), "{audit}");
    assert!(
        entries
            .iter()
            .any(|e| e["sample"] == "1" && e["outcome"] == "matched"),
        "{audit}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["sample"] == "4" && e["outcome"].as_str().unwrap().starts_with("refused")),
        "{audit}"
    );

    // The route stops shadowing: there are no rules to compare with.
    let mut filter = cp.get_ok("/v1/filter").await;
    filter["config"] = json!({"routes": [{"name": "orders", "path_prefix": "/orders"}]});
    let r = cp
        .send(cp.http.put(cp.url("/v1/filter")).json(&filter))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_error(
        &cp.replay("1", None).await,
        409,
        "no_shadow_config",
        "orders",
    );
}

#[tokio::test]
async fn calibration_noise_is_learned_shown_and_forgotten() {
    let cp = start().await;
    // The control plane itself puts the route in A/A calibration; only then
    // does a reporter's calibration flag count.
    cp.set_calibration(true).await;
    let at = || diff("$.at", true, "\"a\"", "\"b\"");
    let mut cal = record("c1", "GET", "/orders/1", vec![at()]);
    cal.calibration = true;
    cp.push(batch(vec![counts(true, [4, 3, 1, 0, 1], 0)], vec![cal]))
        .await;

    let noise = cp.get_ok("/v1/shadow/noise").await;
    assert_eq!(
        noise,
        json!({"routes": [{"route": "orders", "calibration_compared": 4, "calibration_records": 1,
                           "paths": [{"path": "$.at", "records": 1, "rate": 0.25}]}]})
    );

    // A live pair differing only at the learned path counts as noise.
    cp.push(batch(
        vec![counts(false, [2, 1, 1, 0, 1], 0)],
        vec![record("l1", "GET", "/orders/1", vec![at()])],
    ))
    .await;
    let d = cp.get_ok("/v1/shadow/routes/orders").await;
    assert_eq!(
        (&d["mismatched_serious"], &d["mismatched_noise"]),
        (&json!(0), &json!(1))
    );
    assert_eq!(d["unexpected"], 0);
    assert_eq!(d["reclassified_as_noise"], 1);
    assert_eq!(d["match_rate"], 1.0);
    let p = &d["top_paths"][0];
    assert_eq!(p["learned_noise_rate"], 0.25);
    assert_eq!(p["samples"][0]["bucket"], "noisy");
    let sample = cp.get_ok("/v1/shadow/samples/2").await;
    assert_eq!(sample["reclassified_as_noise"], true);
    assert_eq!(sample["differences"][0]["bucket"], "noisy");
    assert_eq!(sample["differences"][0]["learned_noise_rate"], 0.25);

    let r = cp
        .send(cp.http.delete(cp.url("/v1/shadow/noise/orders")))
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(cp.get_ok("/v1/shadow/noise").await, json!({"routes": []}));
    let r = cp
        .send(cp.http.delete(cp.url("/v1/shadow/noise/nope")))
        .await;
    assert_error(&r, 404, "unknown_route", "nope");
    // Without learned noise, the same difference is serious again.
    cp.push(batch(
        vec![counts(false, [1, 0, 1, 0, 1], 0)],
        vec![record("l2", "GET", "/orders/1", vec![at()])],
    ))
    .await;
    let d = cp.get_ok("/v1/shadow/routes/orders").await;
    assert_eq!(d["mismatched_serious"], 1);
}

/// The real `understudy shadow` prints the API's answers as tables: the
/// printed text is the rendering of what the API serves, and it names the
/// route, its counts and the differing field with both values.
#[tokio::test]
async fn the_cli_prints_shadow_tables() {
    use understudy_controlplane::cli::{render_route, render_routes};
    let cp = start().await;
    cp.push(batch(
        vec![counts(false, [1, 0, 1, 0, 1], 0)],
        vec![record(
            "r1",
            "GET",
            "/orders/1",
            vec![diff("$.total", true, "10", "11")],
        )],
    ))
    .await;
    let run = common::cli(&["shadow", "--api", &cp.api]).await;
    assert!(run.success, "{run:?}");
    assert_eq!(
        run.stdout,
        render_routes(&cp.get_ok("/v1/shadow/routes").await)
    );
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("orders "))
        .unwrap_or_else(|| panic!("no row for the route: {}", run.stdout));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "1", "compared: {row}");

    let run = common::cli(&["shadow", "orders", "--api", &cp.api]).await;
    assert!(run.success, "{run:?}");
    assert_eq!(
        run.stdout,
        render_route(&cp.get_ok("/v1/shadow/routes/orders").await)
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("$.total"))
        .unwrap_or_else(|| panic!("no line for the differing field: {}", run.stdout));
    assert!(line.contains("10") && line.contains("11"), "{line}");

    let run = common::cli(&["shadow", "nope", "--api", &cp.api]).await;
    assert!(!run.success, "{run:?}");
    assert!(run.stderr.contains("404"), "{run:?}");
}

/// A reporter cannot teach noise: on a route the control plane did not put
/// in calibration, "calibration" counters and records count as live, so a
/// real serious mismatch stays serious.
#[tokio::test]
async fn a_reporter_cannot_declare_calibration() {
    let cp = start().await;
    let at = || diff("$.total", true, "10", "11");
    let mut fake = record("fake-cal", "GET", "/orders/1", vec![at()]);
    fake.calibration = true;
    cp.push(batch(vec![counts(true, [50, 0, 50, 0, 0], 0)], vec![fake]))
        .await;
    // The same difference in live traffic.
    cp.push(batch(
        vec![counts(false, [1, 0, 1, 0, 0], 0)],
        vec![record("live", "GET", "/orders/2", vec![at()])],
    ))
    .await;
    let list = cp.get_ok("/v1/shadow/routes").await;
    assert_eq!(list["calibration_refused"], 2, "{list}");
    let s = &list["routes"][0];
    assert_eq!(s["calibration"]["compared"], 0, "{s}");
    assert_eq!(s["compared"], 51, "counted as live: {s}");
    assert_eq!(s["mismatched_serious"], 51, "nothing was reclassified: {s}");
    assert_eq!(s["reclassified_as_noise"], 0);
    let noise = cp.get_ok("/v1/shadow/noise").await;
    assert_eq!(noise["routes"], json!([]), "no noise learned: {noise}");

    // Once the control plane configures calibration, the same report teaches.
    cp.set_calibration(true).await;
    let mut cal = record("cal", "GET", "/orders/3", vec![at()]);
    cal.calibration = true;
    cp.push(batch(vec![counts(true, [4, 3, 1, 0, 0], 0)], vec![cal]))
        .await;
    let s = cp.get_ok("/v1/shadow/routes/orders").await;
    assert_eq!(s["calibration"]["compared"], 4, "{s}");
}

/// Made-up route names are refused, so they cannot evict a real route's
/// totals however many there are; the real route keeps counting.
#[tokio::test]
async fn route_name_flooding_evicts_nothing() {
    let cp = start().await;
    cp.push(batch(vec![counts(false, [10, 9, 1, 0, 0], 0)], vec![]))
        .await;
    let mut flood = Vec::new();
    for i in 0..1000 {
        let mut c = counts(false, [1, 1, 0, 0, 0], 0);
        c.route = format!("made-up-{i}");
        flood.push(c);
    }
    let mut records = Vec::new();
    for i in 0..300 {
        let mut r = record(&format!("f{i}"), "GET", "/x", vec![]);
        r.route = format!("fake-{i}");
        records.push(r);
    }
    assert_eq!(
        cp.push(batch(flood, records)).await,
        0,
        "no record accepted"
    );
    let list = cp.get_ok("/v1/shadow/routes").await;
    let routes = list["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{list}");
    assert_eq!(routes[0]["route"], "orders");
    assert_eq!(routes[0]["compared"], 10);
    assert_eq!(list["rejected"], 1300);
    // Legitimate reports still count.
    cp.push(batch(vec![counts(false, [5, 5, 0, 0, 0], 0)], vec![]))
        .await;
    let s = cp.get_ok("/v1/shadow/routes/orders").await;
    assert_eq!(s["compared"], 15);
}

/// Counters at u64::MAX from a real gRPC client saturate: nothing panics,
/// and the API keeps answering.
#[tokio::test]
async fn huge_shadow_counters_saturate() {
    let cp = start().await;
    for _ in 0..3 {
        let mut c = counts(false, [u64::MAX; 5], 0);
        c.latency_gap_us_sum = i64::MAX;
        cp.push(batch(vec![c], vec![])).await;
    }
    let s = cp.get_ok("/v1/shadow/routes/orders").await;
    assert_eq!(s["compared"], json!(u64::MAX));
    assert_eq!(s["match_rate"], json!(0.0));
}

/// Usage reports with u64::MAX counters, non-finite limits and an oversized
/// node id, from a real gRPC client: nothing panics or grows, the API keeps
/// answering, and a legitimate report still counts.
#[tokio::test]
async fn hostile_usage_reports_are_clamped_and_capped() {
    use understudy_proto::v1::{TenantUsage, UsageReport};
    let cp = start().await;
    let mut client = ReportServiceClient::connect(format!("http://{}", cp.xds))
        .await
        .unwrap();
    let tenant = |name: &str, n: u64, rps: f64| TenantUsage {
        tenant: name.into(),
        tier: "standard".into(),
        allowed: n,
        limited: n,
        limit_rps: rps,
    };
    for rps in [f64::NAN, f64::INFINITY, -5.0] {
        client
            .push_usage(UsageReport {
                node_id: "edge-1".into(),
                tenants: vec![tenant("acme", u64::MAX, rps)],
                dropped: u64::MAX,
            })
            .await
            .unwrap();
    }
    // A node id of 0.4 MB, once per tenant: refused whole, nothing stored.
    let huge = "n".repeat(400_000);
    client
        .push_usage(UsageReport {
            node_id: huge,
            tenants: (0..200).map(|i| tenant(&format!("t{i}"), 1, 1.0)).collect(),
            dropped: 0,
        })
        .await
        .unwrap();
    client
        .push_usage(UsageReport {
            node_id: "edge-2".into(),
            tenants: vec![tenant("small", 3, 10.0)],
            dropped: 0,
        })
        .await
        .unwrap();
    let top = cp.get_ok("/v1/ratelimit/tenants?top=1000").await;
    let tenants = top["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 2, "{top}");
    let acme = tenants.iter().find(|t| t["tenant"] == "acme").unwrap();
    assert_eq!(acme["allowed"], json!(u64::MAX));
    assert_eq!(
        acme["fleet_limit_rps"],
        json!(0.0),
        "non-finite limits count as 0"
    );
    assert_eq!(top["dropped_by_filters"], json!(u64::MAX));
    assert_eq!(top["refused"], 200);
    let small = tenants.iter().find(|t| t["tenant"] == "small").unwrap();
    assert_eq!(
        (&small["allowed"], &small["fleet_limit_rps"]),
        (&json!(3), &json!(10.0))
    );
}
