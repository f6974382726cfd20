//! Rollouts judged from Prometheus, end to end: a real Prometheus (Debian's,
//! started by the harness) scrapes the real Envoy's `/stats/prometheus`
//! and both upstreams' own `/metrics` every second; the real control plane
//! reads the step windows and the business metrics from it with
//! `query_range`, judges, and moves Envoy's weights.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use understudy_e2e::prometheus::{Prometheus, Target};
use understudy_e2e::rollouts::{create, failed_checks, follow, rollout};
use understudy_e2e::stack::Stack;
use understudy_e2e::traffic::Load;
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

/// Prometheus scraping Envoy and both upstreams.
async fn prometheus(stack: &Stack) -> Result<Prometheus> {
    Prometheus::start(&[
        Target::new("envoy", stack.envoy.admin).path("/stats/prometheus"),
        Target::new("stable", stack.stable.addr).path("/_upstream/metrics"),
        Target::new("canary", stack.canary.addr).path("/_upstream/metrics"),
    ])
    .await
}

/// A spec reading Prometheus at `prom`; `extra` replaces top-level keys.
fn spec(prom: &Prometheus, extra: Value) -> Value {
    let mut s = json!({
        "service": "demo",
        "owner": "team-checkout",
        "stop_rules": {"max_error_rate_increase_pp": 1.0, "max_p99_ratio": 1.5},
        "steps": [{"weight": 50, "min_duration_s": 120}, {"weight": 100}],
        "defaults": {"min_requests": 20},
        "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 50},
        "evidence": {
            "source": "prometheus",
            "url": format!("http://{}", prom.addr),
            "preset": "envoy",
            "versions": {"stable": "v1", "canary": "v2"}
        }
    });
    if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    s
}

fn last_audit(r: &Value) -> Value {
    r["audit"]
        .as_array()
        .and_then(|a| a.iter().rev().find(|e| e["actor"] == "engine"))
        .cloned()
        .unwrap_or_default()
}

fn queries(judgement: &Value) -> Vec<String> {
    judgement["queries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q.as_str().map(str::to_owned))
        .collect()
}

fn errors(rate: f64) -> Behavior {
    Behavior {
        error_rate: rate,
        error_status: Some(503),
        ..Default::default()
    }
}

/// +5 pp 5xx on the canary, read from Prometheus: rolled back on the
/// error rate, with the queries it ran in the verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_canary_judged_from_prometheus_is_rolled_back() -> Result<()> {
    let stack = Stack::start().await?;
    let prom = prometheus(&stack).await?;
    stack.stable.state.set_behavior(errors(0.01))?;
    stack.canary.state.set_behavior(errors(0.06))?;
    let load = Load::start(&stack.url, 4);
    let r = create(&stack, &spec(&prom, json!({}))).await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    let (r, seen) = follow(&stack, &id, Duration::from_secs(90)).await?;
    load.stop().await;
    assert_eq!(r["phase"]["state"], "rolled_back", "{r:#}");
    assert_eq!(seen.last(), Some(&0), "{seen:?}");
    let last = last_audit(&r);
    assert_eq!(failed_checks(&last["snapshot"]), ["error_rate"], "{last:#}");
    let q = queries(&last["snapshot"]);
    assert!(
        q.iter().any(
            |q| q == r#"envoy_cluster_upstream_rq_completed{envoy_cluster_name="demo-canary"}"#
        ),
        "{q:#?}"
    );
    Ok(())
}

/// Identical versions judged from Prometheus: the rollout succeeds, every
/// promotion on Prometheus' numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_canary_judged_from_prometheus_succeeds() -> Result<()> {
    let stack = Stack::start().await?;
    let prom = prometheus(&stack).await?;
    stack.stable.state.set_behavior(errors(0.01))?;
    stack.canary.state.set_behavior(errors(0.01))?;
    let load = Load::start(&stack.url, 4);
    let s = spec(
        &prom,
        json!({"steps": [{"weight": 50, "min_duration_s": 4}, {"weight": 100, "min_duration_s": 2}]}),
    );
    let r = create(&stack, &s).await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    let (r, seen) = follow(&stack, &id, Duration::from_secs(90)).await?;
    load.stop().await;
    assert_eq!(r["phase"]["state"], "succeeded", "{r:#}");
    assert!(seen.contains(&50), "{seen:?}");
    let promoted: Vec<&Value> = r["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["actor"] == "engine" && e["snapshot"]["checks"].is_array())
        .collect();
    assert!(!promoted.is_empty(), "{r:#}");
    for e in promoted {
        let q = queries(&e["snapshot"]);
        assert!(
            q.iter().any(|q| q.contains("envoy_cluster_upstream_rq_xx")),
            "{e:#}"
        );
    }
    Ok(())
}

/// The canary's checkout completion drops (98% → 85%) while its 5xx and
/// latency match stable's: the business-metric rule rolls it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_metric_rolls_back_what_5xx_and_latency_pass() -> Result<()> {
    let stack = Stack::start().await?;
    let prom = prometheus(&stack).await?;
    let completing = |p: f64| Behavior {
        checkout_completion: Some(p),
        ..Default::default()
    };
    stack.stable.state.set_behavior(completing(0.98))?;
    stack.canary.state.set_behavior(completing(0.85))?;
    let load = Load::start(&stack.url, 4);
    let s = spec(
        &prom,
        json!({"metrics": [{
            "name": "checkout_completion",
            "events": r#"checkout_completed_total{version="{{side}}"}"#,
            "total": r#"checkout_started_total{version="{{side}}"}"#,
            "max_decrease_pp": 2
        }]}),
    );
    let r = create(&stack, &s).await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    let (r, _) = follow(&stack, &id, Duration::from_secs(90)).await?;
    load.stop().await;
    assert_eq!(r["phase"]["state"], "rolled_back", "{r:#}");
    let last = last_audit(&r);
    assert_eq!(
        failed_checks(&last["snapshot"]),
        ["metric:checkout_completion"],
        "{last:#}"
    );
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("checkout_completion: canary "),
        "{reason}"
    );
    // 5xx was judged on the same look, and passed.
    let checks = last["snapshot"]["checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "error_rate" && c["status"] == "pass"),
        "{checks:#?}"
    );
    Ok(())
}

/// Prometheus stops mid-step: the step holds on stale data, past its
/// minimum duration (20 s; Prometheus stops within the first seconds of
/// data), and neither promotes nor rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stopped_mid_step_holds() -> Result<()> {
    let stack = Stack::start().await?;
    let prom = prometheus(&stack).await?;
    let load = Load::start(&stack.url, 4);
    let s = spec(
        &prom,
        json!({
            "steps": [{"weight": 50, "min_duration_s": 20}, {"weight": 100}],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 3, "min_requests_per_side": 20}
        }),
    );
    let r = create(&stack, &s).await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    wait::until(
        "fresh Prometheus data in a verdict",
        Duration::from_secs(30),
        || async {
            let r = rollout(&stack, &id).await?;
            let fresh = r["last_judgement"]["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["name"] == "data" && c["status"] == "pass");
            Ok(fresh.then_some(()))
        },
    )
    .await?;
    drop(prom);
    let stale = wait::until("a hold on stale data", Duration::from_secs(30), || async {
        let r = rollout(&stack, &id).await?;
        let reason = r["last_judgement"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok((reason.contains("stale data") || reason.contains("no data")).then_some(r))
    })
    .await?;
    let started = stale["phase_started_ms"]
        .as_u64()
        .context("phase_started_ms")?;
    // Judged again after the step's minimum duration (and then some): it
    // would have promoted on fresh data.
    let r = wait::until(
        "a look past the minimum duration",
        Duration::from_secs(30),
        || async {
            let r = rollout(&stack, &id).await?;
            let at = r["last_evaluated_ms"].as_u64().unwrap_or_default();
            Ok((at > started + 23_000).then_some(r))
        },
    )
    .await?;
    load.stop().await;
    assert_eq!(r["phase"]["state"], "canary", "{r:#}");
    assert_eq!(r["phase"]["step"], 0, "{r:#}");
    assert_eq!(r["last_judgement"]["verdict"], "hold", "{r:#}");
    let q = queries(&r["last_judgement"]);
    assert!(
        q.iter()
            .any(|q| q.starts_with("last poll failed: prometheus unreachable")),
        "{q:#?}"
    );
    Ok(())
}
