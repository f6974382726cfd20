//! The control plane's own `/metrics` end to end: the real stack (control
//! plane, Envoy with the filter, upstreams) scraped by a real Prometheus
//! (the Debian package's binary, see `cargo xtask setup`), which also
//! scrapes Envoy's `/stats/prometheus`; every assertion is a PromQL query,
//! as a dashboard would ask. The same scrape is linted by `promtool check
//! metrics`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use understudy_e2e::controlplane::VIEWER_TOKEN;
use understudy_e2e::prometheus::{Prometheus, Sample, Target, promtool_check_metrics};
use understudy_e2e::stack::{SERVICE, Stack, api_client};
use understudy_e2e::traffic;

/// How long a series may take to show in Prometheus: a scrape a second,
/// plus Envoy's and the engine's own periods, on a busy 2-core machine.
const SERIES_DEADLINE: Duration = Duration::from_secs(30);

fn one_value(s: &[Sample]) -> Option<f64> {
    match s {
        [only] => Some(only.value),
        _ => None,
    }
}

/// Starts a rollout of the stack's service that holds at its first step
/// (20%): it asks for far more requests than the test sends.
async fn hold_at_20(stack: &Stack) -> Result<String> {
    let spec = json!({
        "service": SERVICE,
        "owner": "team-metrics",
        "stop_rules": {"max_error_rate_increase_pp": 2.0},
        "steps": [{"weight": 20}, {"weight": 100}],
        "analysis": {"interval_s": 0.5, "min_requests_per_side": 1000000}
    });
    let body = understudy_e2e::rollouts::create(stack, &spec).await?;
    body["id"]
        .as_str()
        .map(str::to_owned)
        .context("the rollout has no id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_control_plane_and_envoy() -> Result<()> {
    let stack = Stack::start().await?;
    let prom = Prometheus::start(&[
        Target::new("understudy", stack.cp.api)
            .path("/metrics")
            .bearer(VIEWER_TOKEN),
        Target::new("envoy", stack.envoy.admin).path("/stats/prometheus"),
    ])
    .await?;
    let id = hold_at_20(&stack).await?;
    stack.wait_weights(80, 20, Duration::from_secs(15)).await?;
    let tally = traffic::send(&stack.url, 200, 4).await;
    ensure!(tally.failures() == 0, "traffic failed: {tally:?}");

    // Both targets are scraped, the control plane with the viewer's token.
    for job in ["understudy", "envoy"] {
        prom.wait_for(
            &format!("{job} to be up"),
            &format!("up{{job=\"{job}\"}}"),
            SERIES_DEADLINE,
            |s| one_value(s) == Some(1.0),
        )
        .await?;
    }
    prom.wait_for(
        "one connected Envoy",
        "understudy_xds_connected_envoys",
        SERIES_DEADLINE,
        |s| one_value(s) == Some(1.0),
    )
    .await?;
    // Envoy ACKed its listener, routes and clusters (and the weight change's RDS).
    for t in ["cds", "lds", "rds", "ecds"] {
        prom.wait_for(
            &format!("ACKs for {t}"),
            &format!("understudy_xds_acks_total{{type=\"{t}\"}}"),
            SERIES_DEADLINE,
            |s| one_value(s).is_some_and(|v| v >= 1.0),
        )
        .await?;
    }
    prom.wait_for(
        "RDS pushed at least twice (start, then the rollout's 20%)",
        "understudy_xds_pushes_total{type=\"rds\"}",
        SERIES_DEADLINE,
        |s| one_value(s).is_some_and(|v| v >= 2.0),
    )
    .await?;
    prom.wait_for(
        "no NACKs",
        "sum(understudy_xds_nacks_total)",
        SERIES_DEADLINE,
        |s| one_value(s) == Some(0.0),
    )
    .await?;
    prom.wait_for(
        "the rollout's weight series",
        &format!(
            "understudy_rollout_canary_weight_percent{{rollout=\"{id}\",service=\"{SERVICE}\"}}"
        ),
        SERIES_DEADLINE,
        |s| one_value(s) == Some(20.0),
    )
    .await?;
    prom.wait_for(
        "one rollout in canary",
        "understudy_rollouts{phase=\"canary\"}",
        SERIES_DEADLINE,
        |s| one_value(s) == Some(1.0),
    )
    .await?;
    prom.wait_for(
        "the rollout holding (far fewer requests than it asks for)",
        &format!("understudy_rollout_verdict{{rollout=\"{id}\",verdict=\"hold\"}}"),
        SERIES_DEADLINE,
        |s| one_value(s) == Some(1.0),
    )
    .await?;
    // The API requests the harness made are counted by template and role.
    prom.wait_for(
        "the rollout's creation counted",
        "understudy_api_requests_total{route=\"/v1/rollouts\",status=\"201\",role=\"operator\"}",
        SERIES_DEADLINE,
        |s| one_value(s) == Some(1.0),
    )
    .await?;
    // Envoy's own stats, from the same Prometheus: the stable cluster served traffic.
    let stable = format!("{SERVICE}-stable");
    prom.wait_for(
        "requests completed on the stable cluster",
        &format!("envoy_cluster_upstream_rq_completed{{envoy_cluster_name=\"{stable}\"}}"),
        SERIES_DEADLINE,
        |s| one_value(s).is_some_and(|v| v > 0.0),
    )
    .await?;

    // The control plane's output passes Prometheus' linter, every family in it.
    let body = api_client(VIEWER_TOKEN)?
        .get(stack.cp.api_url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        body.contains("understudy_rollout_check_status{"),
        "a judged rollout's checks are in the scrape:\n{body}"
    );
    promtool_check_metrics(&body).with_context(|| format!("the scrape:\n{body}"))?;
    Ok(())
}

#[tokio::test]
async fn promtool_rejects_what_breaks_the_conventions() -> Result<()> {
    // The lint is real: a counter without `_total` and a family without
    // HELP are refused, so a clean pass above means something.
    let bad = "# TYPE understudy_bad counter\nunderstudy_bad 1\n";
    let e = promtool_check_metrics(bad).unwrap_err().to_string();
    ensure!(e.contains("understudy_bad"), "{e}");
    promtool_check_metrics(
        "# HELP understudy_ok_total Fine.\n# TYPE understudy_ok_total counter\nunderstudy_ok_total 1\n",
    )?;
    Ok(())
}
