//! In-process integration tests of the metrics sink: a real tonic server on a
//! loopback listener, fed Envoy-shaped `StreamMetricsMessage`s by the
//! generated gRPC client, then read through the book's windows.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::metrics::v3::metrics_service_client::MetricsServiceClient;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use understudy_controlplane::evidence::Evidence;
use understudy_controlplane::evidence::envoy_stats::{MetricsBook, MetricsSink, StreamStatus};
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Weight,
};
use understudy_controlplane::store::Store;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A sink on a loopback listener, bound before the server is spawned.
async fn start_sink() -> (Arc<MetricsBook>, SocketAddr) {
    let book = Arc::new(MetricsBook::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = MetricsSink::new(Arc::clone(&book)).into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            // Plaintext, as `--insecure-plaintext-xds`: the sink needs to know its peer.
            .layer(tonic::service::InterceptorLayer::new(
                understudy_controlplane::tls::peer_interceptor(false, None),
            ))
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (book, addr)
}

/// A client whose connection attempt gives up after [`common::TIMEOUT`];
/// the stream calls are bounded with [`common::within`].
async fn client(addr: SocketAddr) -> MetricsServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(common::TIMEOUT)
        .connect()
        .await
        .unwrap();
    MetricsServiceClient::new(channel)
}

#[tokio::test]
async fn a_streamed_envoy_fills_windows_and_its_stream_status() {
    let (book, addr) = start_sink().await;
    let mut client = client(addr).await;
    let start = now_ms();
    let (tx, rx) = mpsc::channel(8);
    let call = tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
    tx.send(common::first_message(
        "edge-1",
        common::flush("shop-canary", 7, 3, 40.0),
    ))
    .await
    .unwrap();
    tx.send(common::next_message(common::flush(
        "shop-canary",
        0,
        0,
        0.0,
    )))
    .await
    .unwrap();
    tx.send(common::next_message(common::flush(
        "shop-canary",
        2,
        0,
        3.0,
    )))
    .await
    .unwrap();
    let evidence = common::eventually(
        "the canary's window",
        || book.window("shop-canary", start - 1, now_ms()),
        |e| e.requests == 12,
    )
    .await;
    assert_eq!(evidence.errors, 3);
    // Empty buckets before a non-empty one stay: they give its lower bound.
    assert_eq!(
        evidence.latency_ms,
        vec![(1.0, 0), (5.0, 2), (25.0, 0), (50.0, 10)]
    );
    assert!(evidence.last_update_ms.is_some_and(|t| t >= start));
    assert_eq!(book.window("shop-stable", 0, now_ms()), Evidence::default());

    let streams = book.streams();
    assert_eq!(streams.len(), 1);
    let StreamStatus {
        node,
        connected,
        messages,
        ..
    } = &streams[0];
    assert_eq!((node.as_str(), *connected, *messages), ("edge-1", true, 3));

    // Envoy going away ends the stream: the node is no longer connected.
    drop(tx);
    call.await.unwrap().unwrap();
    common::eventually("the stream closed", || book.streams(), |s| !s[0].connected).await;
    assert!(book.streams()[0].is_silent(now_ms(), 60_000));
}

#[tokio::test]
async fn two_envoys_add_up_and_a_reconnect_keeps_counting() {
    let (book, addr) = start_sink().await;
    let start = now_ms();
    for (node, ok, errors) in [("edge-1", 10, 1), ("edge-2", 20, 2), ("edge-1", 5, 0)] {
        let msgs = vec![common::first_message(
            node,
            common::flush("shop-stable", ok, errors, 8.0),
        )];
        client(addr)
            .await
            .stream_metrics(tokio_stream::iter(msgs))
            .await
            .unwrap();
    }
    let e = book.window("shop-stable", start - 1, now_ms());
    assert_eq!((e.requests, e.errors), (38, 3));
    assert_eq!(e.latency_ms, vec![(5.0, 0), (10.0, 38)]);
    let nodes: Vec<(String, bool)> = book
        .streams()
        .into_iter()
        .map(|s| (s.node, s.connected))
        .collect();
    assert_eq!(
        nodes,
        vec![("edge-1".into(), false), ("edge-2".into(), false)]
    );
}

#[tokio::test]
async fn a_stream_that_names_no_node_is_refused() {
    let (book, addr) = start_sink().await;
    let err = client(addr)
        .await
        .stream_metrics(tokio_stream::iter(vec![common::next_message(
            common::flush("c", 1, 0, 1.0),
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("identifier.node.id"),
        "{}",
        err.message()
    );
    assert!(book.streams().is_empty());
    assert_eq!(book.window("c", 0, now_ms()), Evidence::default());
}

/// `run` serves the sink on the xDS port, where Envoy's `understudy_xds`
/// cluster already points.
#[tokio::test]
async fn the_control_plane_serves_the_sink_on_the_xds_port() {
    let shop = Service {
        name: "shop".into(),
        domains: vec!["shop.example".into()],
        stable: Backend {
            endpoints: vec!["127.0.0.1:8081".parse().unwrap()],
        },
        canary: Backend {
            endpoints: vec!["127.0.0.1:8082".parse().unwrap()],
        },
        canary_weight: Weight::ZERO,
        sticky: None,
        canary_cohorts: Vec::new(),
        flags: Default::default(),
    };
    let state = DesiredState {
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
    };
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = xds.local_addr().unwrap();
    let api = api_listener.local_addr().unwrap();
    tokio::spawn(understudy_controlplane::run(
        Store::new(state).unwrap(),
        xds,
        api_listener,
        std::future::pending(),
    ));
    // What arrives on the xDS port is what the rollout engine judges: a
    // rollout's sample-size check counts exactly the streamed requests.
    let api = format!("http://{api}");
    let http = common::http();
    let spec = json!({
        "service": "shop", "owner": "team",
        "stop_rules": {"max_error_rate_increase_pp": 1.0},
        "steps": [{"weight": 50, "min_duration_s": 3600}, {"weight": 100}],
        "analysis": {"interval_s": 0.5, "min_requests_per_side": 100000}
    });
    let r = http
        .post(format!("{api}/v1/rollouts"))
        .body(spec.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let both = || {
        let mut f = common::flush("shop-stable", 11, 0, 1.0);
        f.extend(common::flush("shop-canary", 7, 0, 1.0));
        f
    };
    let mut client = client(addr).await;
    let (tx, rx) = mpsc::channel(8);
    let call = tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
    tx.send(common::first_message("edge-1", both()))
        .await
        .unwrap();
    // A step's evidence starts a flush interval after the step: keep
    // flushing, as Envoy does, until the engine has counted some.
    let deadline = tokio::time::Instant::now() + common::DEADLINE * 2;
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(200));
    let (stable, canary) = loop {
        ticker.tick().await;
        tx.send(common::next_message(both())).await.unwrap();
        let r: serde_json::Value = http
            .get(format!("{api}/v1/rollouts/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sample = r["last_judgement"]["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "sample_size")
            .cloned()
            .unwrap_or_default();
        let n = |side: &str| sample["measured"][format!("{side}_requests")].as_f64();
        if let (Some(s), Some(c)) = (n("stable"), n("canary"))
            && s > 0.0
            && c > 0.0
        {
            break (s, c);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine never counted the streamed requests: {:#}",
            r["last_judgement"]
        );
    };
    // Whole flushes, each side its own cluster's.
    assert_eq!(stable % 11.0, 0.0, "stable {stable}");
    assert_eq!(canary % 7.0, 0.0, "canary {canary}");
    assert_eq!(
        stable / 11.0,
        canary / 7.0,
        "the same flushes on both sides"
    );
    drop(tx);
    call.await.unwrap().unwrap();
}

/// Counters at u64::MAX (and beyond: 1e300, repeated in one message) from a
/// real gRPC client: clamped per flush, sums never overflow, nothing panics,
/// and a legitimate cluster in the same stream still counts exactly.
#[tokio::test]
async fn huge_counters_are_clamped_and_never_overflow() {
    use understudy_controlplane::evidence::envoy_stats::MAX_COUNT_PER_FLUSH;
    let (book, addr) = start_sink().await;
    let mut client = client(addr).await;
    let start = now_ms();
    let (tx, rx) = mpsc::channel(8);
    let call = tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
    let c = || common::label("envoy.cluster_name", "evil");
    let hostile = || {
        let mut families = Vec::new();
        for v in [u64::MAX as f64, 1e300, u64::MAX as f64] {
            families.push(common::counter(
                "cluster.upstream_rq_completed",
                vec![c()],
                v,
            ));
            families.push(common::counter(
                "cluster.upstream_rq_xx",
                vec![common::label("envoy.response_code_class", "5"), c()],
                v,
            ));
            families.push(common::counter(
                "cluster.upstream_rq",
                vec![common::label("envoy.response_code", "503"), c()],
                v,
            ));
        }
        families
    };
    tx.send(common::first_message("edge-1", hostile()))
        .await
        .unwrap();
    for _ in 0..4 {
        tx.send(common::next_message(hostile())).await.unwrap();
    }
    let mut legit = vec![common::counter(
        "cluster.upstream_rq_completed",
        vec![common::label("envoy.cluster_name", "ok")],
        7.0,
    )];
    legit.extend(hostile());
    tx.send(common::next_message(legit)).await.unwrap();
    let ok = common::eventually(
        "the legitimate cluster",
        || book.window("ok", start - 1, now_ms()),
        |e| e.requests == 7,
    )
    .await;
    assert_eq!(ok.errors, 0);
    let evil = book.window("evil", start - 1, now_ms());
    assert_eq!(evil.requests, 6 * MAX_COUNT_PER_FLUSH, "clamped per flush");
    assert_eq!(evil.errors, 6 * MAX_COUNT_PER_FLUSH);
    drop(tx);
    call.await.unwrap().unwrap();
}
