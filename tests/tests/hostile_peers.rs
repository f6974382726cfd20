//! Hostile and broken surroundings, end to end: real Envoy with the real
//! filter reporting to the real control plane.
//!
//! - A control plane restarted during the shadow stage keeps counting every
//!   serious mismatch (the stage re-baselines instead of subtracting a stored
//!   baseline from counters that restarted at zero).
//! - A record planted over the plain-text report port is shown (credentials
//!   redacted) but never replayed.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::stack::Stack;
use understudy_e2e::traffic::Load;
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

fn price(v: u64) -> Behavior {
    Behavior {
        body: Some(json!({"price": v})),
        ..Default::default()
    }
}

/// Route `all` shadows every request to the canary; the price difference
/// is declared, so it is serious but not unexpected: the stage holds and
/// counts instead of stopping at once.
fn shadowing_config() -> Value {
    json!({"routes": [{"name": "all", "path_prefix": "/", "shadow": {
        "cluster": "demo-canary",
        "percent": 100,
        "expected": [{"name": "price", "path_prefix": "/", "paths": ["$.price"]}]
    }}]})
}

async fn live_serious(stack: &Stack) -> Result<u64> {
    let r = stack.api_get("/v1/shadow/routes/all").await;
    Ok(r.ok()
        .and_then(|r| r["mismatched_serious"].as_u64())
        .unwrap_or(0))
}

async fn rollout(stack: &Stack, id: &str) -> Result<Value> {
    stack.api_get(&format!("/v1/rollouts/{id}")).await
}

/// The rollout's serious count once it agrees with the shadow book:
/// `seen == carried + (book - baseline)` after an evaluation.
async fn settled_seen(stack: &Stack, id: &str, want_book: u64) -> Result<(u64, Value)> {
    wait::until(
        "the rollout to count the book's serious mismatches",
        Duration::from_secs(30),
        || async {
            let book = live_serious(stack).await?;
            let r = rollout(stack, id).await?;
            let seen = r["shadow_seen"]["serious"].as_u64().unwrap_or(0);
            let carried = r["shadow_carried"]["serious"].as_u64().unwrap_or(0);
            let base = r["shadow_baseline"]["serious"].as_u64().unwrap_or(0);
            Ok(
                (book >= want_book && seen == carried + book.saturating_sub(base))
                    .then_some((seen, r)),
            )
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_shadow_stage_keeps_counting_every_serious_mismatch() -> Result<()> {
    let mut stack = Stack::start().await?;
    stack.stable.state.set_behavior(price(10))?;
    stack.canary.state.set_behavior(price(12))?;
    stack.put_filter_config(shadowing_config()).await?;

    // Pairs from before the stage: the stage's stored baseline is large.
    let load = Load::start(&stack.url, 4);
    wait::until("pre-stage mismatches", Duration::from_secs(60), || async {
        Ok((live_serious(&stack).await? >= 120).then_some(()))
    })
    .await?;
    let spec = json!({
        "service": "demo",
        "owner": "team-checkout",
        "stop_rules": {"max_error_rate_increase_pp": 2.0, "max_unexpected_mismatch_rate": 0.01},
        "shadow": {"route": "all", "percent": 100, "min_duration_s": 600,
                   "min_compared": 1000000, "max_serious_rate": 0.5},
        "steps": [{"weight": 100}],
        "analysis": {"interval_s": 0.5, "max_staleness_s": 30, "min_requests_per_side": 1}
    });
    let r = stack
        .api
        .post(stack.cp.api_url("/v1/rollouts"))
        .body(spec.to_string())
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {}", r.text().await?);
    let created: Value = r.json().await?;
    let id = created["id"].as_str().context("no id")?.to_owned();
    let baseline = created["shadow_baseline"]["serious"].as_u64().unwrap_or(0);
    ensure!(baseline >= 120, "baseline {baseline}");
    wait::until(
        "mismatches in the stage",
        Duration::from_secs(60),
        || async {
            let r = rollout(&stack, &id).await?;
            Ok((r["shadow_seen"]["serious"].as_u64().unwrap_or(0) >= 20).then_some(()))
        },
    )
    .await?;
    load.stop().await;
    // Everything sent has been reported and counted.
    let book = live_serious(&stack).await?;
    let (before, _) = settled_seen(&stack, &id, book).await?;
    ensure!(before >= 20, "{before}");

    // Restart: the shadow book starts at zero, far below the baseline.
    stack.cp.kill();
    stack.cp.restart()?;
    const N: u64 = 40;
    for i in 0..N {
        let r = stack.http.get(format!("{}n{i}", stack.url)).send().await?;
        ensure!(r.status() == 200, "request {i}: {}", r.status());
    }
    let (after, r) = settled_seen(&stack, &id, N).await?;
    let book = live_serious(&stack).await?;
    ensure!(book < baseline, "the book restarted below the old baseline");
    assert_eq!(
        after,
        before + book,
        "every serious mismatch after the restart counts: {:#}",
        r["last_judgement"]
    );
    assert!(after >= before + N, "{after} < {before} + {N}");
    assert_eq!(r["phase"]["state"], "shadow", "{r:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_record_is_shown_redacted_and_never_replayed() -> Result<()> {
    use understudy_proto::v1::report_service_client::ReportServiceClient;
    use understudy_proto::v1::{
        Difference, Header, MismatchRecord, RecordedRequest, RecordedResponse, ReportBatch,
        difference,
    };
    let stack = Stack::start().await?;
    stack.put_filter_config(shadowing_config()).await?;
    let mut client = ReportServiceClient::connect(format!("http://{}", stack.cp.xds))
        .await
        .context("the report port")?;
    let planted = MismatchRecord {
        route: "all".into(),
        request_id: "planted".into(),
        serious: true,
        shadow_cluster: "demo-canary".into(),
        differences: vec![Difference {
            path: "$.x".into(),
            kind: difference::Kind::ValueChange as i32,
            bucket: difference::Bucket::Serious as i32,
            primary: "1".into(),
            shadow: "2".into(),
            unexpected: true,
        }],
        request: Some(RecordedRequest {
            method: "GET".into(),
            path: "/planted".into(),
            authority: "demo".into(),
            headers: vec![Header {
                name: "authorization".into(),
                value: "Bearer stolen-by-replay".into(),
            }],
            body: Vec::new(),
            body_truncated: false,
        }),
        primary: Some(RecordedResponse {
            status: 200,
            headers: Vec::new(),
            body: b"{}".to_vec(),
            body_truncated: false,
        }),
        ..Default::default()
    };
    let ack = client
        .push(ReportBatch {
            node_id: "not-an-envoy".into(),
            mismatches: vec![planted],
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(ack.accepted == 1, "{ack:?}");
    let before = stack.canary.state.requests();
    let shown = stack.api_get("/v1/shadow/samples/1").await?;
    assert_eq!(shown["origin"]["kind"], "unverified", "{shown:#}");
    assert!(!shown.to_string().contains("stolen-by-replay"), "{shown:#}");
    let r = stack
        .api
        .post(stack.cp.api_url("/v1/shadow/samples/1/replay"))
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    assert_eq!(status, 403, "{body:#}");
    assert_eq!(body["error"]["code"], "unverified_sample");
    assert_eq!(stack.canary.state.requests(), before, "nothing was sent");
    let audit = stack.api_get("/v1/shadow/replays").await?;
    assert!(
        audit["replays"][0]["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("refused")),
        "{audit:#}"
    );
    // Real traffic still flows.
    let r = stack.http.get(&stack.url).send().await?;
    assert_eq!(r.status(), 200);
    Ok(())
}
