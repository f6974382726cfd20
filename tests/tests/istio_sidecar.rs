//! The filter and the control plane's evidence in an Istio-shaped sidecar:
//! a real Envoy configured from `envoy/istio-like-bootstrap.yaml` with no ADS
//! from us (istiod is the only xDS server in a mesh), Istio's cluster names
//! (`outbound|9080|<subset>|reviews.default.svc.cluster.local`), the filter's
//! config inline as the JSON string a WasmPlugin's `pluginConfig` becomes,
//! and Istio's stats sink: running-total counters with tags inside the
//! names. The sidecar's identity is Istio's: node id
//! `sidecar~<pod-ip>~<pod>.<ns>~<ns>.svc.cluster.local` and a workload
//! certificate from the mesh's CA, which the control plane accepts as Istio
//! mode runs it (`--istio-trust-domain`, the mesh's certificate files, the
//! subsets' clusters known to the Store). The real control plane takes the
//! filter's reports through the Istio-named cluster
//! `outbound|18000||understudy...`; Envoy's stats stream goes to a
//! `MetricsSink` + `MetricsBook` (the control plane's own code, over the
//! same mutual TLS) served by the test, because the control plane has no
//! API that reads its book back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use understudy_controlplane::evidence::envoy_stats::{MetricsBook, MetricsSink};
use understudy_controlplane::evidence::shadow::ShadowBook;
use understudy_controlplane::evidence::{EnvoyEvidence, EvidenceSource};
use understudy_controlplane::model::{ClusterNames, MeshClusters};
use understudy_controlplane::tls;
use understudy_e2e::controlplane::{ControlPlane, Mesh, OPERATOR_TOKEN};
use understudy_e2e::envoy::{self, Envoy};
use understudy_e2e::mesh::MeshCerts;
use understudy_e2e::stack::{self, api_client, free_port};
use understudy_e2e::upstream::{Behavior, HeaderMatch, LatencyBand, UpstreamHandle};
use understudy_e2e::{paths, traffic, wait};

const HOST: &str = "reviews.default.svc.cluster.local";
const CANARY: &str = "outbound|9080|canary|reviews.default.svc.cluster.local";
const STABLE: &str = "outbound|9080|stable|reviews.default.svc.cluster.local";
const SHADOW: &str = "outbound|9080|shadow|reviews.default.svc.cluster.local";
const CONTROL_PLANE: &str = "outbound|18000||understudy.understudy-system.svc.cluster.local";
/// The sidecar's node id as Istio names it: the pod's IP (loopback here,
/// where its connections come from), pod name and namespace.
const NODE: &str = "sidecar~127.0.0.1~reviews-v1-abc.default~default.svc.cluster.local";

/// The filter's config as istiod hands it to Envoy: protojson of the
/// WasmPlugin's `pluginConfig` Struct (sorted keys, numbers from doubles).
fn plugin_config() -> String {
    plugin_config_value().to_string()
}

fn plugin_config_value() -> Value {
    json!({
        "rate_limit": {
            "identity": {"header": "x-tenant-id"},
            "report": {"cluster": CONTROL_PLANE, "interval_ms": 300},
            "tenants": {"capped": {"rate": 2}},
            "tiers": {
                "anonymous": {"initial": 1000, "max": 1000, "min": 1},
                "standard": {"initial": 1000, "max": 1000, "min": 1}
            }
        },
        "routes": [
            {"hedge": {
                "budget": {"per_second_floor": 100, "percent": 100},
                "cluster": CANARY,
                "delay": {"fixed": {"ms": 30}}
             },
             "name": "hedged", "path_prefix": "/hedged"},
            {"name": "reviews", "path_prefix": "/reviews",
             "shadow": {"cluster": SHADOW, "percent": 100}},
            {"name": "all", "path_prefix": "/"}
        ],
        "shadow_report": {"cluster": CONTROL_PLANE, "interval_ms": 300}
    })
    // serde_json's map is sorted, as protojson writes a Struct's keys.
}

/// Serves the control plane's stats sink on a loopback port, over the same
/// mutual TLS as the control plane's xDS port in the mesh, into `book`.
async fn serve_sink(mesh: &MeshCerts, book: Arc<MetricsBook>) -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let material = mesh.xds_tls()?;
    let server = tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(
            tls::peer_interceptor(true, material.istio_trust_domain.clone()),
        ))
        .add_service(MetricsSink::new(book).into_service())
        .serve_with_incoming(tls::acceptor::incoming(
            listener,
            tls::acceptor::server_config(&material)?,
        ));
    tokio::spawn(server);
    Ok(port)
}

async fn start_envoy(
    cp: &ControlPlane,
    mesh: &MeshCerts,
    sink_port: u16,
    listener_port: u16,
    upstreams: [&UpstreamHandle; 3],
) -> Result<Envoy> {
    let mut replacements = vec![
        ("port_value: 9901", "port_value: 0".to_owned()),
        ("port_value: 15001", format!("port_value: {listener_port}")),
        (
            "port_value: 9081",
            format!("port_value: {}", upstreams[0].addr.port()),
        ),
        (
            "port_value: 9082",
            format!("port_value: {}", upstreams[1].addr.port()),
        ),
        (
            "port_value: 9083",
            format!("port_value: {}", upstreams[2].addr.port()),
        ),
        (
            "port_value: 18000",
            format!("port_value: {}", cp.xds.port()),
        ),
        ("port_value: 18001", format!("port_value: {sink_port}")),
        (
            "filename: target/wasm32-wasip1/release/understudy_filter.wasm",
            format!("filename: {}", paths::filter_wasm()?.display()),
        ),
        (
            r#"value: '{"routes":[{"name":"all","path_prefix":"/"}]}'"#,
            format!("value: '{}'", plugin_config()),
        ),
    ];
    replacements.extend(mesh.sidecar_replacements(&mesh.workload("default", "bookinfo-reviews")));
    let config = envoy::render("istio-like-bootstrap.yaml", &replacements)?;
    let envoy = Envoy::start(&config, &[]).await?;
    envoy.wait_ready().await?;
    Ok(envoy)
}

/// One sidecar-shaped Envoy, its evidence read under Istio's names, and
/// every feature of the filter working through Istio-named clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_and_the_evidence_work_in_an_istio_sidecar() -> Result<()> {
    let stable = UpstreamHandle::start("v1", Behavior::default()).await?;
    let canary = UpstreamHandle::start(
        "v2",
        Behavior {
            error_rate: 1.0,
            error_only_for: Some(HeaderMatch {
                name: "x-fail".into(),
                value: "1".into(),
            }),
            ..Default::default()
        },
    )
    .await?;
    // The shadow subset answers with another body: every pair mismatches.
    let shadow = UpstreamHandle::start("v3", Behavior::default()).await?;
    let listener_port = free_port()?;
    let mut state = stack::desired_state(free_port()?, stable.addr, canary.addr)?;
    // In a mesh the control plane's filter config is what the WasmPlugin
    // carries; its shadow book judges reports against it (routes it knows).
    // The Store takes the mesh's subset clusters as targets, as
    // `--istio-config` tells it.
    state.filter.config = understudy_controlplane::model::FilterDoc::parse(plugin_config_value())?;
    let certs = MeshCerts::new()?;
    let mesh = Mesh {
        xds_tls: Some(certs.xds_tls()?),
        clusters: MeshClusters::new([STABLE, CANARY, SHADOW].map(str::to_owned)),
    };
    let cp = ControlPlane::start_in(&state, mesh).await?;
    let book = Arc::new(MetricsBook::default());
    let sink_port = serve_sink(&certs, Arc::clone(&book)).await?;
    let envoy = start_envoy(
        &cp,
        &certs,
        sink_port,
        listener_port,
        [&stable, &canary, &shadow],
    )
    .await?;
    let url = format!("http://127.0.0.1:{listener_port}");
    let http = traffic::client();
    stack::wait_listener(&http, &format!("{url}/")).await?;
    let evidence = EnvoyEvidence::new(Arc::clone(&book), Arc::new(ShadowBook::default()))
        .with_naming(|_service| ClusterNames::istio(HOST, 9080, "stable", "canary"));

    // 1. Evidence: the stream's first flush is a baseline; after it, the
    //    canary's running totals count exactly what was sent, under Istio's
    //    names, and keep counting exactly over later flushes.
    // The listener check's request went to the stable subset: wait until a
    // flush carried it, so it is not in the window.
    wait::until(
        "the sidecar's stats stream to report the stable subset",
        Duration::from_secs(15),
        || async { Ok(book.last_report_ms(STABLE).map(|_| ())) },
    )
    .await?;
    let since = understudy_controlplane::time::now_unix_ms();
    for i in 0..30 {
        let mut req = http
            .get(format!("{url}/items/{i}"))
            .header("x-subset", "canary");
        if i % 3 == 0 {
            req = req.header("x-fail", "1");
        }
        req.send().await?;
    }
    for i in 0..20 {
        http.get(format!("{url}/items/{i}")).send().await?;
    }
    let windows = wait::until(
        "the canary's 30 requests in the evidence window",
        Duration::from_secs(15),
        || {
            let evidence = &evidence;
            async move {
                let now = understudy_controlplane::time::now_unix_ms();
                let w = evidence.step_windows("reviews", since, now);
                Ok((w.canary.requests >= 30 && w.stable.requests >= 20).then_some(w))
            }
        },
    )
    .await?;
    assert_eq!((windows.canary.requests, windows.canary.errors), (30, 10));
    assert_eq!((windows.stable.requests, windows.stable.errors), (20, 0));
    assert_eq!(
        windows.canary.latency_ms.iter().map(|b| b.1).sum::<u64>(),
        30,
        "histograms are per flush, not running totals"
    );
    // Two more flushes carry the same totals: still exactly 30 and 20.
    let messages = book
        .streams()
        .iter()
        .find(|s| s.node == NODE)
        .map_or(0, |s| s.messages);
    wait::until("two more flushes", Duration::from_secs(10), || async {
        Ok(book
            .streams()
            .iter()
            .any(|s| s.node == NODE && s.messages >= messages + 2)
            .then_some(()))
    })
    .await?;
    let now = understudy_controlplane::time::now_unix_ms();
    let w = evidence.step_windows("reviews", since, now);
    assert_eq!((w.canary.requests, w.stable.requests), (30, 20));
    assert!(
        book.samples(CANARY, 0, now)
            .iter()
            .all(|s| s.node.as_str() == NODE),
        "samples carry the sidecar's node id"
    );
    // Nothing was read under our own names, nor from the `.external.` copies.
    assert_eq!(book.window("reviews-canary", 0, now).requests, 0);
    assert_eq!(
        book.window(&format!("{CANARY}.external"), 0, now).requests,
        0
    );

    // 2. Shadow: every pair through the Istio-named shadow subset mismatches,
    //    and the control plane's summary says so.
    let api = api_client(OPERATOR_TOKEN)?;
    for i in 0..10 {
        let r = http.get(format!("{url}/reviews/{i}")).send().await?;
        assert_eq!(
            r.headers().get("x-upstream-version").map(|v| v.as_bytes()),
            Some(&b"v1"[..])
        );
    }
    let report = match wait::until(
        "the control plane to report the shadow mismatches",
        Duration::from_secs(15),
        || {
            let api = api.clone();
            let u = cp.api_url("/v1/shadow/routes/reviews");
            async move {
                let r = api.get(&u).send().await?;
                if !r.status().is_success() {
                    return Ok(None);
                }
                let v: Value = r.json().await?;
                Ok((v["compared"].as_u64().unwrap_or(0) >= 10).then_some(v))
            }
        },
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let stats = envoy.stats().await?;
            for (k, v) in stats.iter().filter(|(k, _)| {
                k.contains("shadow") || k.contains("18000") || k.contains("report")
            }) {
                eprintln!("{k}: {v}");
            }
            let all: Value = api
                .get(cp.api_url("/v1/shadow/routes"))
                .send()
                .await?
                .json()
                .await?;
            eprintln!("routes: {all:#}");
            return Err(e);
        }
    };
    let mismatched = report["mismatched_serious"].as_u64().unwrap_or(0)
        + report["mismatched_noise"].as_u64().unwrap_or(0);
    assert!(mismatched > 0, "{report:#}");
    assert!(
        shadow.state.requests() >= 10,
        "shadows reached the shadow subset"
    );

    // 3. Hedging: the stable subset is slow; hedges to the canary subset win.
    stable.state.set_behavior(Behavior {
        latency: vec![LatencyBand {
            pct: 100.0,
            ms: 400,
        }],
        ..Default::default()
    })?;
    let before = canary.state.requests();
    let mut hedged_wins = 0;
    for i in 0..8 {
        let r = http.get(format!("{url}/hedged/{i}")).send().await?;
        assert_eq!(r.status(), 200);
        if r.headers().get("x-upstream-version").map(|v| v.as_bytes()) == Some(&b"v2"[..]) {
            hedged_wins += 1;
        }
    }
    assert!(
        hedged_wins >= 6,
        "only {hedged_wins} of 8 answered by the hedge"
    );
    assert!(canary.state.requests() >= before + 8);
    let wins = envoy
        .stat("wasmcustom.understudy.hedge.hedged.hedge_wins")
        .await?;
    assert!(wins.unwrap_or(0) >= 6, "hedge_wins {wins:?}");
    stable.state.set_behavior(Behavior::default())?;

    // 4. Tenant limits: 2/s for "capped": clear 429s, and its usage reaches
    //    the control plane through the Istio-named control plane cluster.
    let answers = traffic::paced(
        &format!("{url}/"),
        20.0,
        Duration::from_secs(1),
        &[("x-tenant-id", "capped")],
    )
    .await;
    let limited = answers.iter().filter(|a| a.status == 429).count();
    assert!(limited >= 10, "{limited} of {} limited", answers.len());
    let r = http
        .get(format!("{url}/"))
        .header("x-tenant-id", "capped")
        .send()
        .await?;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await?;
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("requests per second exceeded"),
        "{body}"
    );
    let usage = wait::until(
        "usage reports for the capped tenant",
        Duration::from_secs(15),
        || {
            let api = api.clone();
            let u = cp.api_url("/v1/ratelimit/tenants?top=5");
            async move {
                let top: Value = api.get(&u).send().await?.json().await?;
                let t = top["tenants"]
                    .as_array()
                    .and_then(|l| l.iter().find(|t| t["tenant"] == "capped").cloned());
                Ok(t.filter(|t| t["limited"].as_u64().unwrap_or(0) >= 10))
            }
        },
    )
    .await
    .context("usage never reached the control plane")?;
    assert!(usage["allowed"].as_u64().unwrap_or(0) >= 1, "{usage}");
    Ok(())
}
