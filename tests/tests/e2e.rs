//! End-to-end: real Envoy 1.40 (V8) + the real filter `.wasm` + the real
//! control plane + upstreams on loopback. Each test brings up its own stack
//! on free ports. Without Envoy or the `.wasm`, every test here fails with
//! the setup command in its message.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use understudy_core::FilterConfig;
use understudy_core::stats;
use understudy_e2e::envoy::{self, Envoy, XdsProtocol};
use understudy_e2e::stack::{Stack, default_filter_config};
use understudy_e2e::traffic;
use understudy_e2e::upstream::{Behavior, UpstreamHandle};
use understudy_e2e::{paths, wait};

use understudy_e2e::xds_scenarios::{self, REQUESTS_TOTAL, wait_stat};

/// (a) The filter loads from ECDS into Envoy's V8 runtime and its metric counts every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_loads_and_counts_requests() -> Result<()> {
    let stack = Stack::start().await?;
    // Stack::start sent requests while waiting for the listener; count from here.
    let before = stack
        .envoy
        .stat(REQUESTS_TOTAL)
        .await?
        .context("filter metric missing from /stats")?;
    let route_metric = stats::in_envoy(&stats::route_requests_total(
        &FilterConfig::from_value(&default_filter_config())?,
        "all",
    ));
    let route_before = stack
        .envoy
        .stat(&route_metric)
        .await?
        .context("route metric missing")?;
    let tally = traffic::send(&stack.url, 25, 4).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    wait_stat(
        &stack.envoy,
        REQUESTS_TOTAL,
        before + 25,
        Duration::from_secs(5),
    )
    .await?;
    wait_stat(
        &stack.envoy,
        &route_metric,
        route_before + 25,
        Duration::from_secs(5),
    )
    .await?;
    // The filter is loaded in V8 and its config came over ECDS.
    let dump = stack.envoy.config_dump("ecds_filters").await?;
    let runtime = envoy::find_key(&dump, "runtime").and_then(Value::as_str);
    assert_eq!(runtime, Some("envoy.wasm.runtime.v8"));

    // The control plane lists this Envoy while connected and frees its
    // per-connection state when it goes away.
    assert!(stack.envoy_status().await?.is_some());
    let mut stack = stack;
    stack.envoy.kill();
    wait::until(
        "the control plane to drop the disconnected Envoy",
        Duration::from_secs(10),
        || async {
            let all = stack.api_get("/v1/envoys").await?;
            Ok(all["envoys"]
                .as_array()
                .is_some_and(|l| l.is_empty())
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// (b) Weights 0, 100 and 50 split traffic as set ([`xds_scenarios`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_weights_split_traffic() -> Result<()> {
    xds_scenarios::canary_weights_split_traffic(XdsProtocol::StateOfTheWorld).await
}

/// (c) A rejected config is NACKed, recorded, sent once; traffic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_recorded_sent_once_and_traffic_keeps_flowing() -> Result<()> {
    xds_scenarios::nack_is_recorded_sent_once_and_traffic_keeps_flowing(
        XdsProtocol::StateOfTheWorld,
    )
    .await
}

/// (d) Killing the control plane costs no requests; Envoy reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_fails_no_requests() -> Result<()> {
    xds_scenarios::control_plane_outage_fails_no_requests(XdsProtocol::StateOfTheWorld).await
}

/// (e) The filter itself rejects an invalid config: Envoy logs the reason
/// from `on_configure` and refuses to start with it. A valid one loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_rejects_invalid_config() -> Result<()> {
    let upstream = UpstreamHandle::start("v1", Behavior::default()).await?;
    let cases = [
        (
            r#"{"routes":[{"name":"all","path_prefix":"nope"}]}"#,
            r#"routes[0].path_prefix: "nope" must start with '/'"#,
        ),
        (r#"{"routez":[]}"#, "unknown field `routez`"),
        (r#"{"routes":["#, "filter config is not valid"),
        (r#"{"stat_prefix":"a.b"}"#, "stat_prefix"),
    ];
    for (bad, reason) in cases {
        let (config, _, _) = envoy::render_static_filter(upstream.addr.port(), bad)?;
        let mut envoy = Envoy::start(&config, &[]).await.or_else(|e| {
            // Envoy may exit before it even writes its admin address.
            ensure!(e.to_string().contains("exited"), "{e:#}");
            Err(e)
        });
        let log = match &mut envoy {
            Ok(envoy) => {
                let status = envoy.wait_exit(Duration::from_secs(30)).await?;
                assert!(!status.success(), "Envoy must refuse the config {bad}");
                envoy.log()
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(
            log.contains("understudy: rejecting configuration: ") && log.contains(reason),
            "config {bad}: Envoy's log should give the filter's reason {reason:?}:\n{log}"
        );
    }
    // The valid config loads, and only the filtered listener counts requests.
    let (config, with, plain) =
        envoy::render_static_filter(upstream.addr.port(), envoy::STATIC_FILTER_CONFIG)?;
    let envoy = Envoy::start(&config, &[]).await?;
    envoy.wait_ready().await?;
    let a = traffic::send(&format!("http://127.0.0.1:{with}/"), 10, 2).await;
    let b = traffic::send(&format!("http://127.0.0.1:{plain}/"), 7, 2).await;
    assert_eq!((a.failures(), b.failures()), (0, 0));
    wait_stat(&envoy, REQUESTS_TOTAL, 10, Duration::from_secs(5)).await?;
    Ok(())
}

/// Every Envoy config committed under `envoy/` passes `envoy --mode validate`
/// (which also runs the filter's `on_configure` on inline configs).
#[test]
fn committed_envoy_configs_validate() -> Result<()> {
    paths::filter_wasm()?;
    let mut checked = 0;
    for entry in std::fs::read_dir(paths::repo_root().join("envoy"))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            envoy::validate(&path)?;
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the committed configs, found {checked}"
    );
    Ok(())
}
