//! Delta (incremental) xDS against a real Envoy 1.40: the same scenarios
//! as the state-of-the-world e2e tests ([`xds_scenarios`]), with the
//! committed bootstrap switched to `api_type: DELTA_GRPC`, plus the checks
//! that Envoy really spoke delta and that the delta bootstrap validates.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use understudy_e2e::envoy::{self, XdsProtocol};
use understudy_e2e::stack::Stack;
use understudy_e2e::xds_scenarios::{self, wait_stat};
use understudy_e2e::{paths, traffic};

const DELTA: XdsProtocol = XdsProtocol::Delta;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_canary_weights_split_traffic() -> Result<()> {
    xds_scenarios::canary_weights_split_traffic(DELTA).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nack_is_recorded_sent_once_and_traffic_keeps_flowing() -> Result<()> {
    xds_scenarios::nack_is_recorded_sent_once_and_traffic_keeps_flowing(DELTA).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_control_plane_outage_fails_no_requests() -> Result<()> {
    xds_scenarios::control_plane_outage_fails_no_requests(DELTA).await
}

/// Envoy's own counters show the delta stream at work (not a silent
/// fallback to state of the world): a weight change is one delta RDS update
/// and changes no cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_speaks_delta_and_a_weight_change_moves_only_the_route() -> Result<()> {
    let stack = Stack::start_speaking(DELTA, |_| {}).await?;
    let cds_updates = "cluster_manager.cds.update_success";
    let rds_updates = "http.understudy.rds.understudy_routes.update_success";
    let cds_before = stack
        .envoy
        .stat(cds_updates)
        .await?
        .context("no CDS stat")?;
    let rds_before = stack
        .envoy
        .stat(rds_updates)
        .await?
        .context("no RDS stat")?;
    let (status, body) = stack.set_weight(json!(100)).await?;
    assert_eq!(status, 200, "{body}");
    stack.wait_weights(0, 100, Duration::from_secs(5)).await?;
    wait_stat(
        &stack.envoy,
        rds_updates,
        rds_before + 1,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(stack.envoy.stat(cds_updates).await?, Some(cds_before));
    let tally = traffic::send(&stack.url, 20, 2).await;
    assert_eq!(
        (tally.failures(), tally.version("v2")),
        (0, 20),
        "{tally:?}"
    );
    // The control plane saw the delta method, and every type is ACKed.
    let status = stack.envoy_status().await?.context("Envoy not listed")?;
    assert_eq!(status["protocol"], "delta", "{status}");
    let types = status["types"].as_object().context("no types")?;
    assert_eq!(types.len(), 5, "{status}");
    for (t, st) in types {
        assert_eq!(st["acked_version"], st["sent_version"], "{t}: {st}");
    }
    Ok(())
}

/// The delta variant of the committed bootstrap (the documented one-line
/// change, `api_type: DELTA_GRPC`) passes `envoy --mode validate`.
#[test]
fn delta_bootstrap_validates() -> Result<()> {
    paths::filter_wasm()?;
    let text = envoy::render("bootstrap.yaml", &DELTA.bootstrap_replacements())?;
    assert!(text.contains("api_type: DELTA_GRPC"));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bootstrap-delta.yaml");
    std::fs::write(&path, text)?;
    envoy::validate(&path)?;
    Ok(())
}
