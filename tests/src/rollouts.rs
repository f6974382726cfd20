//! Rollouts through the API, for the e2e tests: create one, read it, follow
//! it to its end while sampling the weight Envoy applied, and read the
//! audit log's transitions and failed checks.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;

use crate::stack::Stack;
use crate::wait;

pub async fn create(stack: &Stack, spec: &Value) -> Result<Value> {
    let r = stack
        .api
        .post(stack.cp.api_url("/v1/rollouts"))
        .body(spec.to_string())
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    ensure!(
        status == 201,
        "creating the rollout answered {status}: {body:#}"
    );
    Ok(body)
}

pub async fn rollout(stack: &Stack, id: &str) -> Result<Value> {
    stack.api_get(&format!("/v1/rollouts/{id}")).await
}

pub fn transitions(r: &Value) -> Vec<(String, String, String)> {
    r["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["from"].as_str().unwrap_or_default().to_owned(),
                e["to"].as_str().unwrap_or_default().to_owned(),
                e["actor"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Follows a rollout until it ends, sampling Envoy's applied canary weight
/// all along; returns the final view and the distinct weights seen, in order.
pub async fn follow(stack: &Stack, id: &str, deadline: Duration) -> Result<(Value, Vec<u64>)> {
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(wait::POLL);
    let mut seen: Vec<u64> = Vec::new();
    loop {
        ticker.tick().await;
        let w = canary_weight(stack).await?;
        if seen.last() != Some(&w) {
            seen.push(w);
        }
        let r = rollout(stack, id).await?;
        if !matches!(
            r["phase"]["state"].as_str(),
            Some("shadow" | "canary" | "awaiting_approval")
        ) {
            // Envoy applies the last weight a moment after the decision
            // (and a succeeded rollout may still be finalizing: read again).
            wait::until(
                "Envoy to apply the final weight",
                Duration::from_secs(5),
                || async {
                    let r = rollout(stack, id).await?;
                    let want = r["weights"]["canary"].as_u64().unwrap_or(0);
                    Ok((canary_weight(stack).await? == want).then_some(()))
                },
            )
            .await?;
            let r = rollout(stack, id).await?;
            let w = canary_weight(stack).await?;
            if seen.last() != Some(&w) {
                seen.push(w);
            }
            return Ok((r, seen));
        }
        ensure!(
            started.elapsed() < deadline,
            "rollout {id} still {} after {deadline:?}: {:#}",
            r["stage"],
            r["last_judgement"]
        );
    }
}

/// The names of the checks a judgement (an audit entry's `snapshot`) failed.
pub fn failed_checks(judgement: &Value) -> Vec<String> {
    judgement["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "fail")
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

pub async fn canary_weight(stack: &Stack) -> Result<u64> {
    stack.canary_weight().await
}
