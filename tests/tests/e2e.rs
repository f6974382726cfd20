//! End-to-end: real Envoy 1.40 (V8) + the real filter `.wasm` + the real
//! control plane + upstreams on loopback. Each test brings up its own stack
//! on free ports. Without Envoy or the `.wasm`, every test here fails with
//! the setup command in its message.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_core::FilterConfig;
use understudy_core::stats;
use understudy_e2e::envoy::{self, Envoy};
use understudy_e2e::stack::{Stack, default_filter_config};
use understudy_e2e::traffic::{self, Load};
use understudy_e2e::upstream::{Behavior, UpstreamHandle};
use understudy_e2e::{paths, wait};

const REQUESTS_TOTAL: &str = "wasmcustom.understudy.requests_total";
const ECDS_REJECTED: &str = "extension_config_discovery.http_filter.understudy.update_rejected";
const CONNECTED: &str = "control_plane.connected_state";

async fn wait_stat(envoy: &Envoy, name: &str, want: u64, deadline: Duration) -> Result<()> {
    wait::until(&format!("{name} == {want}"), deadline, || async move {
        Ok((envoy.stat(name).await? == Some(want)).then_some(()))
    })
    .await
}

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

/// (b) Weights 0, 100 and 50 split 400 requests as set; Envoy applies each
/// weight within 1 s of the API call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_weights_split_traffic() -> Result<()> {
    let stack = Stack::start().await?;
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_recorded_sent_once_and_traffic_keeps_flowing() -> Result<()> {
    let stack = Stack::start().await?;
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_fails_no_requests() -> Result<()> {
    let mut stack = Stack::start().await?;
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
