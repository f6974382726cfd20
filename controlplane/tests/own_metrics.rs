//! The control plane's own `GET /metrics`, in process: a real server on
//! loopback, driven through its API, an ADS client that ACKs and NACKs, and
//! a filter-shaped shadow reporter; each scrape is read back series by
//! series. (`tests/tests/metrics.rs` lints a real stack's scrape with
//! `promtool check metrics` and scrapes it with a real Prometheus.)

mod common;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use understudy_controlplane::api::auth::{Auth, Limits};
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Weight,
};
use understudy_controlplane::store::Store;
use understudy_controlplane::xds::resources::type_url;
use understudy_proto::v1::report_service_client::ReportServiceClient;
use understudy_proto::v1::{ReportBatch, RouteCounts};

const OPERATOR: &str = "metrics-operator-0123456789";
const VIEWER: &str = "metrics-viewer-0123456789";

fn state() -> DesiredState {
    let endpoint = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
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

struct Cp {
    api: String,
    xds: String,
    http: reqwest::Client,
}

impl Cp {
    async fn start(limits: Limits) -> Self {
        let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp = Self {
            api: format!("http://{}", api.local_addr().unwrap()),
            xds: format!("http://{}", xds.local_addr().unwrap()),
            http: common::http(),
        };
        let auth = Auth::from_entries(
            &format!("op:operator:{OPERATOR},view:viewer:{VIEWER}"),
            limits,
        )
        .unwrap();
        let options = understudy_controlplane::Options {
            auth,
            ..Default::default()
        };
        tokio::spawn(understudy_controlplane::run_with(
            Store::new(state()).unwrap(),
            options,
            xds,
            api,
            std::future::pending(),
        ));
        cp
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> u16 {
        let mut req = self.http.request(method, format!("{}{path}", self.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().status().as_u16()
    }

    /// One scrape as the viewer: (status, content type, body).
    async fn scrape_raw(&self, token: Option<&str>) -> (u16, String, String) {
        let mut req = self.http.get(format!("{}/metrics", self.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, ct, r.text().await.unwrap())
    }

    async fn scrape(&self) -> Scraped {
        let (status, _, body) = self.scrape_raw(Some(VIEWER)).await;
        assert_eq!(status, 200, "{body}");
        Scraped::parse(&body)
    }
}

/// A scrape's series: `name{labels}` exactly as written → value.
#[derive(Debug)]
struct Scraped {
    text: String,
    series: BTreeMap<String, f64>,
}

impl Scraped {
    fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect();
        Self {
            text: text.to_owned(),
            series,
        }
    }

    /// The value of `series` (`name{a="x",b="y"}`, labels in name order), or `None`.
    fn get(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }

    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.text))
    }
}

fn ads_request(type_url: &str, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_need_a_token_and_a_viewer_may_scrape() {
    let cp = Cp::start(Limits::default()).await;
    let (status, _, body) = cp.scrape_raw(None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = cp.scrape_raw(Some("not-a-token-at-all-0000")).await;
    assert_eq!(status, 401);
    let (status, ct, body) = cp.scrape_raw(Some(VIEWER)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(body.contains("# TYPE understudy_api_requests_total counter"));
    // The refused scrapes were counted, without a role; no token or a
    // wrong one never shows up as someone.
    let s = cp.scrape().await;
    assert_eq!(
        s.value(r#"understudy_api_requests_total{role="none",route="/metrics",status="401"}"#),
        2.0
    );
    assert!(
        !s.text.contains(VIEWER) && !s.text.contains(OPERATOR),
        "no token in the output"
    );
}

#[tokio::test]
async fn api_requests_are_counted_by_route_template_status_and_role() {
    let cp = Cp::start(Limits::default()).await;
    let get = reqwest::Method::GET;
    let put = reqwest::Method::PUT;
    assert_eq!(
        cp.call(get.clone(), "/v1/services/shop", Some(VIEWER))
            .await,
        200
    );
    assert_eq!(
        cp.call(get.clone(), "/v1/services/nosuch", Some(VIEWER))
            .await,
        404
    );
    assert_eq!(
        cp.call(get.clone(), "/v1/services/other", Some(VIEWER))
            .await,
        404
    );
    // A viewer may not act: 403, still counted as the viewer.
    assert_eq!(
        cp.call(put, "/v1/services/shop/canary-weight", Some(VIEWER))
            .await,
        403
    );
    // An unknown path: no template, and never the raw path as a label.
    assert_eq!(
        cp.call(get.clone(), "/no/such/path/xyz123", Some(OPERATOR))
            .await,
        404
    );
    let s = cp.scrape().await;
    let c = |labels: &str| s.get(&format!("understudy_api_requests_total{{{labels}}}"));
    assert_eq!(
        c(r#"role="viewer",route="/v1/services/{name}",status="200""#),
        Some(1.0)
    );
    assert_eq!(
        c(r#"role="viewer",route="/v1/services/{name}",status="404""#),
        Some(2.0)
    );
    assert_eq!(
        c(r#"role="viewer",route="/v1/services/{name}/canary-weight",status="403""#),
        Some(1.0)
    );
    assert_eq!(c(r#"role="operator",route="none",status="404""#), Some(1.0));
    assert!(!s.text.contains("xyz123"), "a raw path became a label");
    assert!(!s.text.contains("nosuch"), "a raw path became a label");
}

#[tokio::test]
async fn throttled_requests_are_counted_by_reason() {
    // The operator may send 3 requests at once; the viewer scrapes on its own budget.
    let limits = Limits {
        per_second: NonZeroU32::new(1).unwrap(),
        burst: NonZeroU32::new(3).unwrap(),
    };
    let cp = Cp::start(limits).await;
    let mut statuses = vec![];
    for _ in 0..5 {
        statuses.push(
            cp.call(reqwest::Method::GET, "/v1/services", Some(OPERATOR))
                .await,
        );
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 1, "{statuses:?}");
    // Failed logins from another loopback address: that peer is shut out,
    // the scraper at 127.0.0.1 is not.
    let guesser = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut last = 0;
    for i in 0..12 {
        last = guesser
            .get(format!("{}/v1/services", cp.api))
            .bearer_auth(format!("guess-{i:020}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
    }
    assert_eq!(last, 429, "the guesser is throttled");
    let s = cp.scrape().await;
    assert_eq!(
        s.value(r#"understudy_api_throttled_total{reason="rate_limited"}"#),
        limited as f64
    );
    assert_eq!(
        s.value(r#"understudy_api_throttled_total{reason="failed_logins"}"#),
        2.0,
        "guesses 11 and 12"
    );
    assert_eq!(
        s.value(
            r#"understudy_api_requests_total{role="operator",route="/v1/services",status="429"}"#
        ),
        limited as f64
    );
    assert_eq!(
        s.value(r#"understudy_api_requests_total{role="none",route="/v1/services",status="429"}"#),
        2.0
    );
}

#[tokio::test]
async fn xds_rollout_and_shadow_series_follow_what_happens() {
    let cp = Cp::start(Limits::default()).await;
    let before = cp.scrape().await;
    assert_eq!(before.value("understudy_xds_connected_envoys"), 0.0);
    assert_eq!(
        before.value(r#"understudy_xds_pushes_total{type="cds"}"#),
        0.0
    );
    assert_eq!(before.value(r#"understudy_rollouts{phase="canary"}"#), 0.0);

    // An Envoy-shaped ADS client: CDS and LDS wildcard, ACK CDS, NACK LDS.
    let channel = common::endpoint(cp.xds.clone()).connect().await.unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "metrics-envoy".into(),
            ..Default::default()
        }),
        ..ads_request(type_url::CLUSTER, "", "")
    })
    .await
    .unwrap();
    tx.send(ads_request(type_url::LISTENER, "", ""))
        .await
        .unwrap();
    let mut responses = common::within(
        "the ADS stream",
        ads.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    let cds = common::within("the CDS response", responses.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cds.type_url, type_url::CLUSTER);
    // A peer's type URL never becomes a label: an unknown type, even
    // with a "NACK", is not counted at all (and the stream goes on).
    tx.send(DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "evil".into(),
            details: vec![],
        }),
        ..ads_request("type.googleapis.com/evil\"}\n{x", "", "1")
    })
    .await
    .unwrap();
    tx.send(ads_request(
        type_url::CLUSTER,
        &cds.version_info,
        &cds.nonce,
    ))
    .await
    .unwrap();
    let lds = common::within("the LDS response", responses.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lds.type_url, type_url::LISTENER);
    tx.send(DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "refused for the test".into(),
            details: vec![],
        }),
        ..ads_request(type_url::LISTENER, "", &lds.nonce)
    })
    .await
    .unwrap();
    let s = common::eventually_async(
        "the NACK to be counted",
        || cp.scrape(),
        |s| s.get(r#"understudy_xds_nacks_total{type="lds"}"#) == Some(1.0),
    )
    .await;
    assert_eq!(s.value(r#"understudy_xds_pushes_total{type="cds"}"#), 1.0);
    assert_eq!(s.value(r#"understudy_xds_pushes_total{type="lds"}"#), 1.0);
    assert_eq!(s.value(r#"understudy_xds_acks_total{type="cds"}"#), 1.0);
    assert_eq!(s.value(r#"understudy_xds_acks_total{type="lds"}"#), 0.0);
    assert_eq!(s.value(r#"understudy_xds_nacks_total{type="cds"}"#), 0.0);
    assert_eq!(s.value("understudy_xds_connected_envoys"), 1.0);
    assert!(!s.text.contains("evil"), "{}", s.text);
    assert!(!s.text.contains(r#"type="unknown""#), "{}", s.text);

    // A rollout: its weight, phase and (once judged) verdict and checks.
    let spec = json!({
        "service": "shop", "owner": "team",
        "stop_rules": {"max_error_rate_increase_pp": 1.0},
        "steps": [{"weight": 20}, {"weight": 100}],
        "analysis": {"interval_s": 0.2}
    });
    let r = cp
        .http
        .post(format!("{}/v1/rollouts", cp.api))
        .bearer_auth(OPERATOR)
        .body(spec.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let s = common::eventually_async(
        "the rollout to be judged",
        || cp.scrape(),
        |s| {
            s.get(r#"understudy_rollout_verdict{rollout="shop-1",service="shop",verdict="hold"}"#)
                == Some(1.0)
        },
    )
    .await;
    assert_eq!(s.value(r#"understudy_rollouts{phase="canary"}"#), 1.0);
    assert_eq!(s.value(r#"understudy_rollouts{phase="succeeded"}"#), 0.0);
    assert_eq!(
        s.value(r#"understudy_rollout_canary_weight_percent{rollout="shop-1",service="shop"}"#),
        20.0
    );
    assert_eq!(
        s.value(r#"understudy_rollout_phase{phase="canary",rollout="shop-1",service="shop"}"#),
        1.0
    );
    assert_eq!(
        s.value(
            r#"understudy_rollout_verdict{rollout="shop-1",service="shop",verdict="rollback"}"#
        ),
        0.0
    );
    // No Envoy reports stats: the data check is insufficient, never a pass.
    assert_eq!(
        s.value(r#"understudy_rollout_check_status{check="data",rollout="shop-1",service="shop",status="insufficient"}"#),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.value(r#"understudy_rollout_check_status{check="data",rollout="shop-1",service="shop",status="pass"}"#),
        0.0
    );

    // Shadow reports: batches, pairs and what was dropped, by reason.
    let channel = common::endpoint(cp.xds.clone()).connect().await.unwrap();
    let mut reports = ReportServiceClient::new(channel);
    let counts = |route: &str, compared| RouteCounts {
        route: route.into(),
        compared,
        matched: compared,
        ..Default::default()
    };
    reports
        .push(ReportBatch {
            node_id: "metrics-envoy".into(),
            dropped: 2,
            routes: vec![counts("api", 5), counts("not-a-route", 7)],
            ..Default::default()
        })
        .await
        .unwrap();
    let s = cp.scrape().await;
    assert_eq!(s.value("understudy_shadow_report_batches_total"), 1.0);
    assert_eq!(s.value("understudy_shadow_pairs_compared_total"), 5.0);
    assert_eq!(
        s.value(r#"understudy_shadow_dropped_total{reason="filter_queue_full"}"#),
        2.0
    );
    assert_eq!(
        s.value(r#"understudy_shadow_dropped_total{reason="unknown_route"}"#),
        1.0
    );

    // The Envoy leaves: the gauge follows the registry.
    drop(tx);
    drop(responses);
    common::eventually_async(
        "the Envoy to be gone",
        || cp.scrape(),
        |s| s.get("understudy_xds_connected_envoys") == Some(0.0),
    )
    .await;
}

#[tokio::test]
async fn per_rollout_series_follow_each_services_latest_rollout_only() {
    let cp = Cp::start(Limits::default()).await;
    let post = |path: String, body: String| {
        cp.http
            .post(format!("{}{path}", cp.api))
            .bearer_auth(OPERATOR)
            .body(body)
            .send()
    };
    let spec = json!({
        "service": "shop", "owner": "team",
        "stop_rules": {"max_error_rate_increase_pp": 1.0},
        "steps": [{"weight": 20}, {"weight": 100}]
    })
    .to_string();
    for (id, weight) in [("shop-1", 20.0), ("shop-2", 20.0)] {
        let r = post("/v1/rollouts".into(), spec.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
        let s = cp.scrape().await;
        assert_eq!(
            s.value(&format!(
                r#"understudy_rollout_canary_weight_percent{{rollout="{id}",service="shop"}}"#
            )),
            weight
        );
        let r = post(format!("/v1/rollouts/{id}/abort"), "{}".into())
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    }
    let s = cp.scrape().await;
    // Both are counted by phase; only the latest has series of its own.
    assert_eq!(s.value(r#"understudy_rollouts{phase="aborted"}"#), 2.0);
    assert_eq!(s.value(r#"understudy_rollouts{phase="canary"}"#), 0.0);
    assert!(!s.text.contains(r#"rollout="shop-1""#), "{}", s.text);
    assert_eq!(
        s.value(r#"understudy_rollout_phase{phase="aborted",rollout="shop-2",service="shop"}"#),
        1.0
    );
    assert_eq!(
        s.value(r#"understudy_rollout_canary_weight_percent{rollout="shop-2",service="shop"}"#),
        0.0,
        "an aborted rollout took its canary out"
    );
}
