//! Synthetic probes end to end (issue 18), through a real Envoy: the control
//! plane sends each declared check to stable and to canary separately,
//! pinned by a header value only it knows. A canary failing its probe at
//! weight 0 (the shadow stage) is rolled back on that evidence; a service
//! with no live traffic is advanced on probes, and the verdict says so; a
//! paused rollout sends no probe; a client guessing the pin is routed like
//! any client, and probe traffic never shows in the live evidence.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::rollouts::{create, rollout};
use understudy_e2e::stack::{SERVICE, Stack};
use understudy_e2e::upstream::{Behavior, UpstreamHandle};
use understudy_e2e::wait;

const PROBE_HEADER: &str = "understudy-probe";

fn answering(status: &str) -> Behavior {
    Behavior {
        body: Some(json!({ "status": status })),
        ..Behavior::default()
    }
}

/// Probe requests (`/health`) an upstream has received.
fn probes_seen(upstream: &UpstreamHandle) -> usize {
    upstream
        .state
        .seen()
        .iter()
        .filter(|s| s.path == "/health")
        .count()
}

fn health_probes(every_s: f64, idle: bool) -> Value {
    json!({
        "judge_idle_on_probes": idle,
        "min_passed": 3,
        "checks": [{
            "name": "health",
            "path": "/health",
            "headers": {"accept": "application/json"},
            "expect": {"status": 200, "json": {"pointer": "/status", "equals": "ok"}},
            "every_s": every_s,
        }],
    })
}

async fn probe_status(stack: &Stack, id: &str) -> Result<Value> {
    stack.api_get(&format!("/v1/rollouts/{id}/probes")).await
}

async fn act(stack: &Stack, id: &str, action: &str) -> Result<()> {
    let r = stack
        .api
        .post(stack.cp.api_url(&format!("/v1/rollouts/{id}/{action}")))
        .send()
        .await?;
    ensure!(r.status() == 200, "{action}: {}", r.text().await?);
    Ok(())
}

async fn wait_phase(stack: &Stack, id: &str, state: &str, within: Duration) -> Result<Value> {
    wait::until(&format!("rollout {id} to be {state}"), within, || async {
        let r = rollout(stack, id).await?;
        Ok((r["phase"]["state"] == state).then_some(r))
    })
    .await
}

/// The check named `name` in a judgement.
fn check<'a>(judgement: &'a Value, name: &str) -> Option<&'a Value> {
    judgement["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// A canary whose health answers `{"status":"degraded"}` sits at weight 0
/// in the shadow stage, where no user sees it and no live request reaches
/// it: its probes fail while stable's pass, and the rollout is rolled back
/// on that evidence, the verdict naming the probe, what it expected, what
/// the canary answered, and stable beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_its_probe_at_weight_0_is_rolled_back() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(answering("ok"))?;
    stack.canary.state.set_behavior(answering("degraded"))?;
    let started = std::time::Instant::now();
    let r = create(
        &stack,
        &json!({
            "service": SERVICE,
            "owner": "team-e2e",
            "stop_rules": {"max_error_rate_increase_pp": 1.0, "max_unexpected_mismatch_rate": 0.01},
            "shadow": {"route": "all", "percent": 10, "max_serious_rate": 0.02,
                       "min_duration_s": 600, "min_compared": 100000},
            "steps": [{"weight": 100}],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20},
            "probes": health_probes(0.25, false),
        }),
    )
    .await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    assert_eq!(r["phase"]["state"], "shadow");
    let r = wait_phase(&stack, &id, "rolled_back", Duration::from_secs(30)).await?;
    let reason = r["phase"]["reason"].as_str().unwrap_or_default().to_owned();
    eprintln!(
        "rolled back {:.1} s after creation: {reason}",
        started.elapsed().as_secs_f64()
    );
    for part in [
        "probe health failed on canary",
        "expected status 200 and /status == \"ok\"",
        "canary got status 200, /status = \"degraded\"",
        "stable passed",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    let probes = check(&r["last_judgement"], "probes").context("no probes check")?;
    assert_eq!(probes["status"], "fail");
    ensure!(
        probes["measured"]["stable_passed"].as_f64() >= Some(1.0)
            && probes["measured"]["stable_failed"].as_f64() == Some(0.0),
        "stable's probes should pass: {probes:#}"
    );
    // Weight 0 all along: the canary's only requests were probes.
    assert_eq!(stack.canary_weight().await?, 0);
    // The pin never reaches a backend.
    for upstream in [&stack.stable, &stack.canary] {
        assert!(
            upstream
                .state
                .seen()
                .iter()
                .all(|s| !s.headers.contains_key(PROBE_HEADER)),
            "the probe header reached {}",
            upstream.state.stats().version
        );
    }
    eprintln!(
        "probes seen: stable {}, canary {}",
        probes_seen(&stack.stable),
        probes_seen(&stack.canary)
    );
    Ok(())
}

/// No client sends anything: the Envoy reports fresh zero counts, so each
/// step is judged on probes alone (its `min_requests` cannot be met by
/// live traffic), and the verdicts say "no live traffic: judged on N
/// probes only".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_service_is_advanced_on_probes_and_the_verdict_says_so() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(answering("ok"))?;
    stack.canary.state.set_behavior(answering("ok"))?;
    let r = create(
        &stack,
        &json!({
            "service": SERVICE,
            "owner": "team-e2e",
            "stop_rules": {"max_error_rate_increase_pp": 1.0},
            "defaults": {"min_duration_s": 2, "min_requests": 50},
            "steps": [{"weight": 50}, {"weight": 100}],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20},
            "probes": health_probes(0.25, true),
        }),
    )
    .await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    let r = wait_phase(&stack, &id, "succeeded", Duration::from_secs(60)).await?;
    let advanced: Vec<String> = r["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["actor"] == "engine")
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        // Finalizing afterwards is the engine's too, and not a step.
        .filter(|reason| !reason.starts_with("finalized"))
        .collect();
    eprintln!("engine transitions: {advanced:#?}");
    assert_eq!(advanced.len(), 2, "{advanced:?}");
    for reason in &advanced {
        assert!(
            reason.starts_with("no live traffic: judged on ") && reason.contains(" probes only"),
            "{reason}"
        );
    }
    // Probes never counted as live requests: Envoy's live clusters saw none.
    let live = stack
        .envoy
        .stat(&format!("cluster.{SERVICE}-canary.upstream_rq_total"))
        .await?
        .unwrap_or(0);
    let probed = stack
        .envoy
        .stat(&format!("cluster.{SERVICE}-canary-probe.upstream_rq_total"))
        .await?
        .unwrap_or(0);
    eprintln!("canary cluster requests: live {live}, probe {probed}");
    assert_eq!(live, 0);
    assert!(probed >= 6, "{probed} probes on the canary's probe cluster");
    Ok(())
}

/// A cohort step holds the canary at weight 0 (no client is in the
/// cohort). A client that guesses the pin header gets stable, like anyone;
/// the canary's probes pass but its live evidence stays at zero requests.
/// Then a pause: while paused, the scheduler keeps ticking and no probe
/// reaches either upstream; a resume starts them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessed_pin_routes_normally_probes_stay_out_of_live_evidence_and_a_pause_stops_them()
-> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(answering("ok"))?;
    stack.canary.state.set_behavior(answering("ok"))?;
    let r = create(
        &stack,
        &json!({
            "service": SERVICE,
            "owner": "team-e2e",
            "stop_rules": {"max_error_rate_increase_pp": 1.0},
            "steps": [
                {"cohort": {"header": {"name": "x-user-group", "value": "internal"}},
                 "min_duration_s": 600, "min_requests": 100000},
                {"weight": 100},
            ],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20},
            "probes": health_probes(0.2, false),
        }),
    )
    .await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    wait::until(
        "canary probes to arrive",
        Duration::from_secs(20),
        || async { Ok((probes_seen(&stack.canary) >= 3).then_some(())) },
    )
    .await?;

    // Hostile: guesses at the pin, of every shape, all reach stable.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let guesses = [
        "canary".to_owned(),
        "/canary".to_owned(),
        format!("{}/canary", "0".repeat(32)),
        format!("{}/canary", "f".repeat(32)),
        format!("{}/canary ", "0".repeat(32)),
        "*/canary".to_owned(),
    ];
    let mut versions = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..10 {
        for guess in &guesses {
            let r = http
                .get(format!("{}guess/{round}", stack.url))
                .header(PROBE_HEADER, guess.as_str())
                .send()
                .await?;
            ensure!(r.status() == 200, "{guess:?}: {}", r.status());
            let v = r
                .headers()
                .get("x-upstream-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            *versions.entry(v).or_default() += 1;
        }
    }
    eprintln!("guessed pins answered by: {versions:?}");
    assert_eq!(versions, [("v1".to_owned(), 60)].into_iter().collect());
    // Legitimate traffic still works, and the guessing clients' header
    // reached stable as they sent it (it is theirs), never the canary.
    assert!(
        stack
            .canary
            .state
            .seen()
            .iter()
            .all(|s| !s.path.starts_with("/guess") && !s.headers.contains_key(PROBE_HEADER))
    );

    // Live evidence: the judge sees zero canary requests while canary
    // probes pass.
    let judged = wait::until(
        "a judgement with passing canary probes",
        Duration::from_secs(20),
        || async {
            let r = rollout(&stack, &id).await?;
            let j = &r["last_judgement"];
            let passed = check(j, "probes")
                .and_then(|c| c["measured"]["canary_passed"].as_f64())
                .unwrap_or(0.0);
            Ok((passed >= 3.0).then(|| j.clone()))
        },
    )
    .await?;
    let canary_live = check(&judged, "step_requests")
        .and_then(|c| c["measured"]["canary_requests"].as_f64())
        .or_else(|| {
            check(&judged, "sample_size").and_then(|c| c["measured"]["canary_requests"].as_f64())
        })
        .unwrap_or(0.0);
    let live = stack
        .envoy
        .stat(&format!("cluster.{SERVICE}-canary.upstream_rq_total"))
        .await?
        .unwrap_or(0);
    let probed = stack
        .envoy
        .stat(&format!("cluster.{SERVICE}-canary-probe.upstream_rq_total"))
        .await?
        .unwrap_or(0);
    eprintln!(
        "canary: live requests judged {canary_live}, Envoy live cluster {live}, probe cluster {probed}; probes check: {}",
        check(&judged, "probes").map_or(Value::Null, Clone::clone)
    );
    assert_eq!(canary_live, 0.0);
    assert_eq!(live, 0);
    assert!(probed >= 3);

    // Pause: once the pause is in, the scheduler goes on ticking and no
    // probe leaves.
    act(&stack, &id, "pause").await?;
    let ticks = |s: &Value| s["ticks"].as_u64().unwrap_or(0);
    let at_pause = probe_status(&stack, &id).await?;
    assert_eq!(at_pause["running"], false, "{at_pause:#}");
    // A probe sent just before the pause may still be on its way: let a few
    // looks pass before taking the counts.
    let t0 = ticks(&at_pause);
    wait::until("3 scheduler ticks", Duration::from_secs(5), || async {
        Ok((ticks(&probe_status(&stack, &id).await?) >= t0 + 3).then_some(()))
    })
    .await?;
    let before = (probes_seen(&stack.stable), probes_seen(&stack.canary));
    let t1 = ticks(&probe_status(&stack, &id).await?);
    // 20 looks at 50 ms: five of the check's 0.2 s periods.
    wait::until(
        "20 more scheduler ticks",
        Duration::from_secs(10),
        || async { Ok((ticks(&probe_status(&stack, &id).await?) >= t1 + 20).then_some(())) },
    )
    .await?;
    let after = (probes_seen(&stack.stable), probes_seen(&stack.canary));
    eprintln!(
        "paused: probes seen (stable, canary) {before:?} → {after:?} over {} ticks",
        ticks(&probe_status(&stack, &id).await?) - t1
    );
    assert_eq!(before, after, "probes were sent while paused");

    // Resume: they start again (the counts above could have moved).
    act(&stack, &id, "resume").await?;
    wait::until(
        "probes after the resume",
        Duration::from_secs(10),
        || async {
            Ok(
                (probes_seen(&stack.canary) > after.1 && probes_seen(&stack.stable) > after.0)
                    .then_some(()),
            )
        },
    )
    .await?;
    Ok(())
}
