//! One writer per fact, end to end: while a rollout owns a service, the
//! canary weight and the shadow stage's filter route are the rollout's to
//! change. A direct write is refused (409, naming the rollout and its
//! verbs); a change that bypassed the API (the state file edited while the
//! control plane was down) is found, recorded in the audit and undone; and
//! a rollback always leaves Envoy at weight 0, whatever was written before.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::stack::Stack;
use understudy_e2e::traffic::Load;
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

async fn canary_weight(stack: &Stack) -> Result<u64> {
    stack.canary_weight().await
}

fn audit(r: &Value) -> Vec<Value> {
    r["audit"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_leaves_weight_0_whatever_was_written_while_the_rollout_owned_the_service()
-> Result<()> {
    let mut stack = Stack::start().await?;
    let body = |v| Behavior {
        body: Some(json!({"price": v})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(body(10))?;
    stack.canary.state.set_behavior(body(12))?;
    let spec = json!({
        "service": "demo",
        "owner": "team-checkout",
        "stop_rules": {"max_error_rate_increase_pp": 2.0, "max_unexpected_mismatch_rate": 0.01},
        "shadow": {"route": "all", "percent": 100, "min_duration_s": 30, "min_compared": 20,
                   "max_serious_rate": 0.01, "max_unexpected_rate": 0.01},
        "steps": [{"weight": 10}, {"weight": 100}],
        "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20}
    });
    let r = stack
        .api
        .post(stack.cp.api_url("/v1/rollouts"))
        .body(spec.to_string())
        .send()
        .await?;
    ensure!(r.status() == 201, "create answered {}", r.status());
    let created: Value = r.json().await?;
    let id = created["id"].as_str().context("no id")?.to_owned();
    assert_eq!(created["phase"]["state"], "shadow", "{created:#}");

    // 1. The API refuses a hand-set weight while the rollout owns the service.
    let (status, answer) = stack.set_weight(json!(30)).await?;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "owned_by_rollout", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&id), "{message}");
    for verb in ["pause", "promote", "abort"] {
        assert!(message.contains(verb), "{message}");
    }
    // The same through a whole-service PUT, and through the filter: the
    // shadow stage's route is the rollout's too.
    let mut service = stack.api_get("/v1/services/demo").await?;
    service["canary_weight"] = json!(30);
    let (status, answer) = stack.api_put("/v1/services/demo", &service).await?;
    assert_eq!(status, 409, "{answer}");
    let mut filter = stack.api_get("/v1/filter").await?;
    assert!(
        !filter["config"]["routes"][0]["shadow"].is_null(),
        "{filter:#}"
    );
    filter["config"]["routes"][0]
        .as_object_mut()
        .context("route")?
        .remove("shadow");
    let (status, answer) = stack.api_put("/v1/filter", &filter).await?;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "owned_by_rollout", "{answer}");
    // Other services and other filter edits are still the operator's.
    let mut other = stack.api_get("/v1/filter").await?;
    other["config"]["routes"]
        .as_array_mut()
        .context("routes")?
        .push(json!({"name": "other", "path_prefix": "/other"}));
    let (status, answer) = stack.api_put("/v1/filter", &other).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(canary_weight(&stack).await?, 0);

    // 2. A weight written where the API cannot see it: the state file,
    // edited while the control plane is down.
    stack.cp.kill();
    let path = stack.cp.state_file().to_owned();
    let mut state: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let services = state["services"].as_array_mut().context("services")?;
    let demo = services
        .iter_mut()
        .find(|s| s["name"] == "demo")
        .context("no demo service in the state file")?;
    demo["canary_weight"] = json!(30);
    std::fs::write(&path, serde_json::to_vec_pretty(&state)?)?;
    stack.cp.restart().await?;
    let r = wait::until(
        "the restarted engine to record the weight it found",
        Duration::from_secs(20),
        || async {
            let r = stack.api_get(&format!("/v1/rollouts/{id}")).await?;
            Ok(audit(&r)
                .iter()
                .any(|e| e["reason"].as_str().unwrap_or_default().contains("30"))
                .then_some(r))
        },
    )
    .await?;
    let found = audit(&r)
        .into_iter()
        .find(|e| e["reason"].as_str().unwrap_or_default().contains("30"))
        .context("no audit entry")?;
    assert_eq!(found["from"], "shadow", "{found:#}");
    assert_eq!(found["to"], "shadow", "{found:#}");
    assert_eq!(found["snapshot"]["found"]["canary_weight"], 30, "{found:#}");
    assert_eq!(
        found["snapshot"]["restored"]["canary_weight"], 0,
        "{found:#}"
    );
    let service = stack.api_get("/v1/services/demo").await?;
    assert_eq!(service["canary_weight"], 0, "{service:#}");
    stack.wait_weights(100, 0, Duration::from_secs(20)).await?;

    // 3. The shadow stage fails: the rollback leaves Envoy at weight 0.
    let load = Load::start(&stack.url, 4);
    let r = wait::until(
        "the shadow stage to fail",
        Duration::from_secs(60),
        || async {
            let r = stack.api_get(&format!("/v1/rollouts/{id}")).await?;
            Ok((r["phase"]["state"] == "rolled_back").then_some(r))
        },
    )
    .await?;
    load.stop().await;
    let last = audit(&r).last().cloned().context("no audit")?;
    assert_eq!(last["to"], "rolled_back", "{r:#}");
    stack.wait_weights(100, 0, Duration::from_secs(10)).await?;
    let dump = stack.envoy.config_dump("dynamic_route_configs").await?;
    let text = dump.to_string();
    assert!(text.contains("demo-canary"), "{text}");
    assert_eq!(canary_weight(&stack).await?, 0, "{dump:#}");
    // Once the rollout has ended the service is the operator's again.
    let (status, answer) = stack.set_weight(json!(5)).await?;
    assert_eq!(status, 200, "{answer}");
    Ok(())
}
