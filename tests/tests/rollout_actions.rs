//! Rollout actions, end to end against real Envoy: every verb
//! (`POST /v1/rollouts/{id}/{action}`) is checked twice, in the API's answer
//! and audit log (state, actor = the token's name, reason) and in what
//! Envoy applied (the canary weight in its route config, the shadow in its
//! ECDS filter config). With "One owner per fact": a second rollout on the
//! same service is refused (409) and a viewer may not act (403), and
//! neither changes anything. And the NACK halt: a change the rollout made
//! that Envoy rejects stops the rollout, with the audit saying why.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::controlplane::{OPERATOR, VIEWER_TOKEN};
use understudy_e2e::stack::{NODE_ID, SERVICE, Stack, api_client};
use understudy_e2e::traffic::{self, Load};
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

/// The API is polled this often: a faster poll over a long wait runs into
/// the operator's per-caller rate limit.
const API_POLL: Duration = Duration::from_millis(200);

/// A spec with short steps (evaluated every 0.5 s); `extra` replaces
/// top-level keys.
fn spec(extra: Value) -> Value {
    let mut s = json!({
        "service": SERVICE,
        "owner": "team-checkout",
        "stop_rules": {"max_error_rate_increase_pp": 5.0},
        "defaults": {"min_duration_s": 1, "min_requests": 20},
        "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20}
    });
    if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    s
}

/// `POST /v1/rollouts`; returns the HTTP status and body.
async fn create(client: &reqwest::Client, stack: &Stack, spec: &Value) -> Result<(u16, Value)> {
    let r = client
        .post(stack.cp.api_url("/v1/rollouts"))
        .body(spec.to_string())
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn create_ok(stack: &Stack, spec: &Value) -> Result<String> {
    let (status, body) = create(&stack.api, stack, spec).await?;
    ensure!(
        status == 201,
        "creating the rollout answered {status}: {body:#}"
    );
    Ok(body["id"].as_str().context("no id")?.to_owned())
}

/// `POST /v1/rollouts/{id}/{verb}` as `client`; returns status and body.
async fn act(
    client: &reqwest::Client,
    stack: &Stack,
    id: &str,
    verb: &str,
) -> Result<(u16, Value)> {
    let r = client
        .post(stack.cp.api_url(&format!("/v1/rollouts/{id}/{verb}")))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn rollout(stack: &Stack, id: &str) -> Result<Value> {
    stack.api_get(&format!("/v1/rollouts/{id}")).await
}

fn last_audit(r: &Value) -> Value {
    r["audit"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default()
}

/// Asserts the newest audit entry: `from` → `to`, by `actor`, for `reason`.
fn assert_audit(r: &Value, from: &str, to: &str, actor: &str, reason: &str) {
    let e = last_audit(r);
    assert_eq!(e["from"], from, "{e:#}");
    assert_eq!(e["to"], to, "{e:#}");
    assert_eq!(e["actor"], actor, "{e:#}");
    assert_eq!(e["reason"], reason, "{e:#}");
}

/// Waits until the rollout's phase is `state` (at `step`, if given).
async fn wait_phase(stack: &Stack, id: &str, state: &str, step: Option<u64>) -> Result<Value> {
    wait::until_every(
        &format!("rollout {id} to be {state} {step:?}"),
        Duration::from_secs(60),
        API_POLL,
        || async {
            let r = rollout(stack, id).await?;
            let at = r["phase"]["state"] == state
                && step.is_none_or(|s| r["phase"]["step"].as_u64() == Some(s));
            Ok(at.then_some(r))
        },
    )
    .await
}

/// Requests Envoy's canary cluster has completed so far.
async fn canary_requests(stack: &Stack) -> Result<u64> {
    Ok(stack
        .envoy
        .stat(&format!("cluster.{SERVICE}-canary.upstream_rq_completed"))
        .await?
        .unwrap_or(0))
}

/// Waits until the current step has what would end it if the engine judged
/// it: over 3 s (the 1 s minimum, the engine's 1 s flush settle and a 1 s
/// stats flush) and 100 more canary requests (5 × the minimum) under load;
/// then checks the rollout is still where it was and Envoy still has
/// `weight`. This is how "holds" is shown: long enough that a rollout that
/// did not hold would have moved.
async fn assert_holds(stack: &Stack, id: &str, weight: u64) -> Result<()> {
    let before = rollout(stack, id).await?;
    let started = Instant::now();
    let from = canary_requests(stack).await?;
    wait::until_every(
        "evidence that would end the step",
        Duration::from_secs(60),
        API_POLL,
        || async move {
            Ok((started.elapsed() > Duration::from_secs(3)
                && canary_requests(stack).await? >= from + 100)
                .then_some(()))
        },
    )
    .await?;
    let after = rollout(stack, id).await?;
    assert_eq!(after["phase"], before["phase"], "{:#}", after["audit"]);
    assert_eq!(
        after["audit"].as_array().map(Vec::len),
        before["audit"].as_array().map(Vec::len),
        "{:#}",
        after["audit"]
    );
    assert_eq!(stack.canary_weight().await?, weight);
    Ok(())
}

/// The shadow Envoy applied on filter route `route`: its target cluster, or
/// `None` when the route has no shadow (or Envoy no filter config yet).
async fn applied_shadow(stack: &Stack, route: &str) -> Result<Option<String>> {
    let config = stack.applied_filter_config().await?.unwrap_or_default();
    Ok(config["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == route)
        .and_then(|r| r["shadow"]["cluster"].as_str())
        .map(str::to_owned))
}

async fn wait_shadow(stack: &Stack, want: Option<&str>) -> Result<()> {
    wait::until(
        &format!("Envoy to apply shadow {want:?} on route all"),
        Duration::from_secs(15),
        || async { Ok((applied_shadow(stack, "all").await?.as_deref() == want).then_some(())) },
    )
    .await
}

/// Pause holds the weight while evidence would promote; resume goes on; a
/// manual gate waits in `awaiting_approval` with Envoy's weight unchanged
/// until promoted; promote jumps a long step at once; a second rollout and
/// a viewer's verbs are refused and change nothing; abort sets Envoy's
/// weight to 0. Each verb's audit entry names the operator's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbs_move_envoy_as_the_api_says_and_record_who_acted() -> Result<()> {
    let stack = Stack::start().await?;
    let load = Load::start(&stack.url, 4);
    let id = create_ok(
        &stack,
        &spec(json!({"steps": [
            {"weight": 10},
            {"weight": 30},
            {"weight": 60, "manual_gate": true, "min_duration_s": 600},
            {"weight": 100, "min_duration_s": 600}
        ]})),
    )
    .await?;

    // Pause at once: step 1 cannot end within its first second.
    let (status, r) = act(&stack.api, &stack, &id, "pause").await?;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["paused"], true, "{r:#}");
    assert_eq!(r["phase"]["state"], "canary", "{r:#}");
    assert_eq!(r["phase"]["step"], 0, "{r:#}");
    assert_audit(
        &r,
        "canary step 1",
        "canary step 1",
        OPERATOR,
        "paused by e2e-operator",
    );
    stack.wait_weights(90, 10, Duration::from_secs(10)).await?;
    assert_holds(&stack, &id, 10).await?;
    // Pausing twice is refused.
    let (status, r) = act(&stack.api, &stack, &id, "pause").await?;
    assert_eq!(status, 409, "{r:#}");
    assert_eq!(r["error"]["code"], "invalid_action", "{r:#}");

    // A viewer may read but not act; nothing changes.
    let viewer = api_client(VIEWER_TOKEN)?;
    for verb in ["resume", "promote", "abort"] {
        let (status, r) = act(&viewer, &stack, &id, verb).await?;
        assert_eq!(status, 403, "{verb}: {r:#}");
    }
    let r = rollout(&stack, &id).await?;
    assert_eq!(r["paused"], true, "{r:#}");
    assert_eq!(r["phase"]["step"], 0, "{r:#}");
    assert_eq!(stack.canary_weight().await?, 10);

    // Resume: the engine judges again and moves on, through step 2 (30),
    // to the gate before step 3.
    let (status, r) = act(&stack.api, &stack, &id, "resume").await?;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["paused"], false, "{r:#}");
    assert_audit(
        &r,
        "canary step 1",
        "canary step 1",
        OPERATOR,
        "resumed by e2e-operator",
    );
    let r = wait_phase(&stack, &id, "awaiting_approval", Some(2)).await?;
    assert_audit(
        &r,
        "canary step 2",
        "awaiting approval for step 3",
        "engine",
        last_audit(&r)["reason"].as_str().unwrap_or_default(),
    );
    let tos: Vec<&str> = r["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["to"].as_str())
        .collect();
    assert_eq!(
        tos,
        [
            "canary step 1",
            "canary step 1",
            "canary step 1",
            "canary step 2",
            "awaiting approval for step 3"
        ],
        "{:#}",
        r["audit"]
    );
    // Who created it is recorded too; the engine's own moves are its.
    assert_eq!(r["created_by"], OPERATOR, "{r:#}");
    assert_eq!(r["audit"][0]["actor"], OPERATOR, "{r:#}");
    assert_eq!(r["audit"][0]["reason"], "created by e2e-operator", "{r:#}");
    assert_eq!(r["audit"][3]["actor"], "engine", "{r:#}");
    // The gate holds step 2's weight in Envoy until someone approves.
    stack.wait_weights(70, 30, Duration::from_secs(10)).await?;
    assert_holds(&stack, &id, 30).await?;
    assert_eq!(r["weights"]["canary"], 30, "{r:#}");

    // Promote opens the gate: step 3's weight goes out.
    let (status, r) = act(&stack.api, &stack, &id, "promote").await?;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["phase"]["state"], "canary", "{r:#}");
    assert_eq!(r["phase"]["step"], 2, "{r:#}");
    assert_audit(
        &r,
        "awaiting approval for step 3",
        "canary step 3",
        OPERATOR,
        "promoted by e2e-operator",
    );
    stack.wait_weights(40, 60, Duration::from_secs(10)).await?;
    // Promote again: step 3 would last 600 s; the next step's weight is in
    // Envoy at once.
    let (status, r) = act(&stack.api, &stack, &id, "promote").await?;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["phase"]["step"], 3, "{r:#}");
    assert_audit(
        &r,
        "canary step 3",
        "canary step 4",
        OPERATOR,
        "promoted by e2e-operator",
    );
    stack.wait_weights(0, 100, Duration::from_secs(10)).await?;

    // A second rollout on the same service: 409 naming the active one, and
    // nothing changes (no new rollout, Envoy's weight untouched).
    let (status, answer) = create(&stack.api, &stack, &spec(json!({}))).await?;
    assert_eq!(status, 409, "{answer:#}");
    assert_eq!(answer["error"]["code"], "rollout_active", "{answer:#}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&id), "{message}");
    let all = stack.api_get("/v1/rollouts").await?;
    assert_eq!(all["rollouts"].as_array().map(Vec::len), Some(1), "{all:#}");
    assert_eq!(stack.canary_weight().await?, 100);
    assert_eq!(rollout(&stack, &id).await?["phase"]["step"], 3);

    // Abort from the canary at 100: Envoy goes back to 0.
    let (status, r) = act(&stack.api, &stack, &id, "abort").await?;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["phase"]["state"], "aborted", "{r:#}");
    assert_eq!(r["phase"]["reason"], "aborted by e2e-operator", "{r:#}");
    assert_audit(
        &r,
        "canary step 4",
        "aborted",
        OPERATOR,
        "aborted by e2e-operator",
    );
    stack.wait_weights(100, 0, Duration::from_secs(10)).await?;
    let svc = stack.api_get(&format!("/v1/services/{SERVICE}")).await?;
    assert_eq!(svc["canary_weight"], 0, "{svc:#}");
    // An ended rollout takes no verb.
    for verb in ["pause", "resume", "promote", "abort"] {
        let (status, r) = act(&stack.api, &stack, &id, verb).await?;
        assert_eq!(status, 409, "{verb}: {r:#}");
    }
    let tally = load.stop().await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    assert!(tally.version("v2") > 0, "{tally:?}");
    Ok(())
}

/// Abort from the shadow stage turns the shadow off in Envoy. Then the NACK
/// halt: the filter's module becomes unreadable on the Envoy host, so the
/// next rollout's own change (the shadow on, an ECDS push) is rejected by
/// Envoy; the engine rolls the rollout back, naming Envoy's rejection in
/// the audit, while Envoy keeps serving its last good config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_ends_the_shadow_and_a_nack_of_the_rollouts_change_halts_it() -> Result<()> {
    // The filter from a copy the test can take away.
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("understudy_filter.wasm");
    std::fs::copy(understudy_e2e::paths::filter_wasm()?, &wasm)?;
    let wasm_path = wasm.display().to_string();
    let stack = Stack::start_with(|s| s.filter.wasm_path = wasm_path.clone()).await?;
    let same = Behavior {
        body: Some(json!({"total": 3})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(same.clone())?;
    stack.canary.state.set_behavior(same)?;
    let shadowed = |extra: Value| {
        let mut s = spec(json!({
            "stop_rules": {"max_error_rate_increase_pp": 5.0, "max_unexpected_mismatch_rate": 0.5},
            "shadow": {"route": "all", "percent": 100, "min_duration_s": 600, "min_compared": 20,
                       "max_serious_rate": 0.5, "max_unexpected_rate": 0.5},
            "steps": [{"weight": 50}, {"weight": 100}]
        }));
        if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        s
    };
    wait_shadow(&stack, None).await?;

    // 1. Abort from the shadow stage.
    let id = create_ok(&stack, &shadowed(json!({}))).await?;
    wait_shadow(&stack, Some("demo-canary")).await?;
    let (status, r) = act(&stack.api, &stack, &id, "abort").await?;
    assert_eq!(status, 200, "{r:#}");
    assert_eq!(r["phase"]["state"], "aborted", "{r:#}");
    assert_audit(&r, "shadow", "aborted", OPERATOR, "aborted by e2e-operator");
    wait_shadow(&stack, None).await?;
    assert_eq!(stack.canary_weight().await?, 0);
    let filter = stack.api_get("/v1/filter").await?;
    assert!(
        filter["config"]["routes"][0]["shadow"].is_null(),
        "{filter:#}"
    );

    // 2. The NACK halt. The module disappears from the Envoy host (a bad
    // deploy); the control plane cannot see that and pushes the next
    // rollout's shadow as usual.
    let moved = dir.path().join("moved-away.wasm");
    std::fs::rename(&wasm, &moved)?;
    let id = create_ok(&stack, &shadowed(json!({}))).await?;
    let r = wait_phase(&stack, &id, "rolled_back", None).await?;
    let reason = r["phase"]["reason"].as_str().unwrap_or_default().to_owned();
    let e = last_audit(&r);
    assert_eq!(e["from"], "shadow", "{e:#}");
    assert_eq!(e["to"], "rolled_back", "{e:#}");
    assert_eq!(e["actor"], "engine", "{e:#}");
    assert_eq!(e["reason"], reason.as_str(), "{e:#}");
    // The rejection named is Envoy's, of a version this rollout pushed.
    let prefix = format!("halted: Envoy {NODE_ID} rejected TypedExtensionConfig version ");
    let version = reason
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split(':').next())
        .with_context(|| format!("not a NACK halt: {reason}"))?;
    assert!(
        reason.contains(&wasm_path),
        "Envoy's error names the module: {reason}"
    );
    let pushed: Vec<&str> = r["pushed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["type_url"] == "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
        })
        .filter_map(|p| p["version"].as_str())
        .collect();
    assert!(pushed.contains(&version), "{version} not in {pushed:?}");
    let nacks = stack.api_get("/v1/nacks").await?;
    assert!(
        nacks
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["version"] == version),
        "{nacks:#}"
    );
    // Envoy kept its last good config: no shadow, weight 0, and traffic
    // flows through the filter.
    assert_eq!(applied_shadow(&stack, "all").await?, None);
    assert_eq!(stack.canary_weight().await?, 0);
    let tally = traffic::send(&stack.url, 50, 4).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    assert_eq!(tally.version("v1"), 50, "{tally:?}");
    std::fs::rename(&moved, &wasm)?;
    Ok(())
}
