//! The xDS scenarios every ADS flavour must pass against a real Envoy:
//! weights split traffic, a NACK is recorded and traffic keeps flowing, a
//! control-plane outage fails no request and Envoy reconnects. Each takes an
//! [`XdsProtocol`]; `tests/tests/e2e.rs` runs them in state of the world and
//! `tests/tests/delta_xds.rs` in delta.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::envoy::{Envoy, XdsProtocol};
use crate::stack::{Stack, default_filter_config};
use crate::traffic::{self, Load};
use crate::wait;

/// The filter's request counter.
pub const REQUESTS_TOTAL: &str = "wasmcustom.understudy.requests_total";
/// Envoy's count of ECDS updates it rejected.
pub const ECDS_REJECTED: &str = "extension_config_discovery.http_filter.understudy.update_rejected";
/// Envoy's gauge: 1 while its ADS stream is up.
pub const CONNECTED: &str = "control_plane.connected_state";

/// Waits until Envoy's stat `name` equals `want`.
pub async fn wait_stat(envoy: &Envoy, name: &str, want: u64, deadline: Duration) -> Result<()> {
    wait::until(&format!("{name} == {want}"), deadline, || async move {
        Ok((envoy.stat(name).await? == Some(want)).then_some(()))
    })
    .await
}

/// (b) Weights 0, 100 and 50 split 400 requests as set; Envoy applies each
/// weight within 1 s of the API call.
pub async fn canary_weights_split_traffic(protocol: XdsProtocol) -> Result<()> {
    let stack = Stack::start_speaking(protocol, |_| {}).await?;
    const N: u64 = 400;
    for (canary, check) in [(100u64, "all canary"), (0, "all stable"), (50, "binomial")] {
        let (status, body) = stack.set_weight(json!(canary)).await?;
        assert_eq!(status, 200, "{body}");
        let called = Instant::now();
        stack
            .wait_weights(100 - canary, canary, Duration::from_secs(1))
            .await?;
        let applied_in = called.elapsed();
        eprintln!("weight {canary}: applied in Envoy after {applied_in:?}");

        let (v1_before, v2_before) = (stack.stable.state.requests(), stack.canary.state.requests());
        let tally = traffic::send(&stack.url, N as usize, 8).await;
        assert_eq!(tally.failures(), 0, "{tally:?}");
        assert_eq!(tally.total, N);
        let (v1, v2) = (tally.version("v1"), tally.version("v2"));
        // The upstreams agree with what the clients saw.
        assert_eq!(stack.stable.state.requests() - v1_before, v1);
        assert_eq!(stack.canary.state.requests() - v2_before, v2);
        match check {
            "all canary" => assert_eq!((v1, v2), (0, N)),
            "all stable" => assert_eq!((v1, v2), (N, 0)),
            _ => {
                // 99.9% two-sided binomial bound: z = 3.29, sd = sqrt(n p (1-p)).
                let bound = 3.29 * (N as f64 * 0.25).sqrt();
                let off = (v2 as f64 - N as f64 / 2.0).abs();
                assert!(
                    off <= bound,
                    "canary got {v2}/{N}, outside ±{bound:.1} of 50%"
                );
            }
        }
    }
    Ok(())
}

/// (c) A config Envoy rejects is NACKed, recorded with Envoy's error, sent
/// exactly once, and traffic keeps flowing on the last good config.
pub async fn nack_is_recorded_sent_once_and_traffic_keeps_flowing(
    protocol: XdsProtocol,
) -> Result<()> {
    let stack = Stack::start_speaking(protocol, |_| {}).await?;
    let status = stack
        .envoy_status()
        .await?
        .context("Envoy not listed in /v1/envoys")?;
    let good_version = status["types"]["ecds"]["acked_version"].clone();
    let sent_before = status["types"]["ecds"]["responses_sent"]
        .as_u64()
        .unwrap_or(0);

    // The control plane cannot see Envoy's file system, so it accepts this
    // path; Envoy fails to load the module and NACKs the ECDS update.
    let bad =
        json!({"wasm_path": "/nonexistent/understudy.wasm", "config": default_filter_config()});
    let (code, body) = stack.api_put("/v1/filter", &bad).await?;
    assert_eq!(code, 200, "{body}");
    let nack = wait::until(
        "the NACK to be recorded",
        Duration::from_secs(10),
        || async {
            let nacks = stack.api_get("/v1/nacks").await?;
            Ok(nacks.as_array().and_then(|l| l.first()).cloned())
        },
    )
    .await?;
    assert_eq!(
        nack["type_url"],
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    );
    assert!(
        nack["error"]
            .as_str()
            .unwrap_or("")
            .contains("/nonexistent/understudy.wasm"),
        "NACK should carry Envoy's error_detail: {nack}"
    );
    wait_stat(&stack.envoy, ECDS_REJECTED, 1, Duration::from_secs(5)).await?;

    // Traffic keeps flowing through the previous filter config meanwhile.
    let counted_before = stack.envoy.stat(REQUESTS_TOTAL).await?.unwrap_or(0);
    let tally = traffic::send(&stack.url, 300, 4).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    wait_stat(
        &stack.envoy,
        REQUESTS_TOTAL,
        counted_before + 300,
        Duration::from_secs(5),
    )
    .await?;

    // Sent once: after the NACK and all that traffic, no further ECDS
    // response went out and Envoy rejected exactly one update.
    let status = stack
        .envoy_status()
        .await?
        .context("Envoy gone from /v1/envoys")?;
    let ecds = &status["types"]["ecds"];
    assert_eq!(
        ecds["responses_sent"].as_u64(),
        Some(sent_before + 1),
        "{ecds}"
    );
    assert_eq!(
        ecds["acked_version"], good_version,
        "the last good version stays ACKed"
    );
    assert_eq!(ecds["last_nack"]["version"], nack["version"]);
    assert_eq!(stack.envoy.stat(ECDS_REJECTED).await?, Some(1));

    // A change of desired state is sent again, and Envoy takes it.
    let fixed_config = json!({"stat_prefix": "fixed", "routes": [{"name": "all"}]});
    stack.put_filter_config(fixed_config).await?;
    let ecds = stack.envoy_status().await?.context("Envoy gone")?["types"]["ecds"].clone();
    assert_eq!(
        ecds["responses_sent"].as_u64(),
        Some(sent_before + 2),
        "{ecds}"
    );
    let tally = traffic::send(&stack.url, 10, 2).await;
    assert_eq!(tally.failures(), 0);
    wait_stat(
        &stack.envoy,
        "wasmcustom.fixed.requests_total",
        10,
        Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

/// (d) Killing the control plane costs no requests; after a restart Envoy
/// reconnects and converges on the desired state (which survived in the state file).
pub async fn control_plane_outage_fails_no_requests(protocol: XdsProtocol) -> Result<()> {
    let mut stack = Stack::start_speaking(protocol, |_| {}).await?;
    let (status, _) = stack.set_weight(json!(100)).await?;
    assert_eq!(status, 200);
    stack.wait_weights(0, 100, Duration::from_secs(5)).await?;

    let load = Load::start(&stack.url, 4);
    let progressed = |load: &Load, n: u64| {
        let from = load.snapshot().total;
        move |l: &Load| l.snapshot().total >= from + n
    };
    let warm = progressed(&load, 100);
    wait::until(
        "load before the outage",
        Duration::from_secs(20),
        || async { Ok(warm(&load).then_some(())) },
    )
    .await?;

    stack.cp.kill();
    wait_stat(&stack.envoy, CONNECTED, 0, Duration::from_secs(15)).await?;
    let during = progressed(&load, 300);
    wait::until(
        "load during the outage",
        Duration::from_secs(30),
        || async { Ok(during(&load).then_some(())) },
    )
    .await?;
    let mid = load.snapshot();
    assert_eq!(
        mid.failures(),
        0,
        "requests failed while the control plane was down: {mid:?}"
    );

    stack.cp.restart().await?;
    wait_stat(&stack.envoy, CONNECTED, 1, Duration::from_secs(30)).await?;
    // Converged: every type the new stream sent is ACKed, and the weights are the persisted ones.
    wait::until(
        "Envoy to ACK everything after reconnecting",
        Duration::from_secs(15),
        || async {
            let Some(s) = stack.envoy_status().await? else {
                return Ok(None);
            };
            let types = s["types"].as_object().cloned().unwrap_or_default();
            let all_acked = types.len() == 5
                && types.values().all(|t| {
                    !t["sent_version"].is_null() && t["acked_version"] == t["sent_version"]
                });
            Ok(all_acked.then_some(()))
        },
    )
    .await?;
    stack.wait_weights(0, 100, Duration::from_secs(5)).await?;

    // The new stream carries changes again.
    let (status, _) = stack.set_weight(json!(0)).await?;
    assert_eq!(status, 200);
    stack.wait_weights(100, 0, Duration::from_secs(5)).await?;
    let after = progressed(&load, 100);
    wait::until(
        "load after the restart",
        Duration::from_secs(20),
        || async { Ok(after(&load).then_some(())) },
    )
    .await?;

    let tally = load.stop().await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    assert!(
        tally.version("v2") > 0 && tally.version("v1") > 0,
        "{tally:?}"
    );
    eprintln!(
        "outage test: {} requests, 0 failed, by version {:?}",
        tally.total, tally.by_version
    );
    Ok(())
}
