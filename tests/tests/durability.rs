//! The control plane as a process of its own (`understudy serve`), killed
//! with SIGKILL and wedged with SIGSTOP, with a real Envoy: a decision
//! survives a SIGKILL between its writes, a resumed rollout keeps its step,
//! and a wedged control plane fails a test in seconds instead of hanging it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use rustix::process::Signal;
use serde_json::{Value, json};
use understudy_e2e::cp_process::ControlPlaneProcess;
use understudy_e2e::envoy::Envoy;
use understudy_e2e::stack::{
    self, API_TIMEOUT, NODE_ID, SERVICE, desired_state, free_port, start_envoy_at,
};
use understudy_e2e::traffic::{self, Load};
use understudy_e2e::upstream::{Behavior, UpstreamHandle};
use understudy_e2e::wait;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Envoy's applied weights for the service, `(stable, canary)`.
async fn weights(envoy: &Envoy) -> Result<(u64, u64)> {
    envoy.service_weights(SERVICE).await
}

async fn wait_weights(envoy: &Envoy, want: (u64, u64), deadline: Duration) -> Result<()> {
    wait::until(
        &format!("Envoy to apply weights {want:?}"),
        deadline,
        || async { Ok((weights(envoy).await? == want).then_some(())) },
    )
    .await
}

/// The service's canary weight in the state file on disk.
fn canary_weight_on_disk(cp: &ControlPlaneProcess) -> Result<u64> {
    let state = cp.state_on_disk()?;
    state["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == SERVICE)
        .and_then(|s| s["canary_weight"].as_u64())
        .with_context(|| format!("no weight for {SERVICE} in {state:#}"))
}

/// The rollout's view, or the error that kept the API from giving it.
async fn view(cp: &ControlPlaneProcess, id: &str) -> Result<Value> {
    cp.get(&format!("/v1/rollouts/{id}")).await
}

/// Upstreams, the control plane binary and an Envoy of its, with the
/// listener answering.
struct World {
    stable: UpstreamHandle,
    canary: UpstreamHandle,
    cp: ControlPlaneProcess,
    envoy: Envoy,
    url: String,
}

async fn world() -> Result<World> {
    let stable = UpstreamHandle::start("v1", Behavior::default()).await?;
    let canary = UpstreamHandle::start("v2", Behavior::default()).await?;
    let port = free_port()?;
    let cp =
        ControlPlaneProcess::start(&desired_state(port, stable.addr, canary.addr)?, &[NODE_ID])
            .await?;
    let envoy = start_envoy_at(cp.xds.port(), &cp.certs, NODE_ID).await?;
    let url = format!("http://127.0.0.1:{port}/");
    stack::wait_listener(&traffic::client(), &url).await?;
    Ok(World {
        stable,
        canary,
        cp,
        envoy,
        url,
    })
}

/// A SIGKILL mid-step keeps the rollout in its step with its step start;
/// a SIGKILL *between* a rollback's writes (decision committed, state file
/// not yet written) keeps the rollback: after the restart the rollout is
/// rolled back, the state file and Envoy's route have the canary at 0, and
/// Envoy served throughout.
///
/// The second kill is placed exactly: a FIFO where the state file's
/// temporary copy goes makes the control plane block opening it (no reader),
/// so it is killed while holding a committed decision and an old state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_survives_a_sigkill_between_its_writes() -> Result<()> {
    let mut w = world().await?;
    let load = Load::start(&w.url, 4);
    let spec = json!({
        "service": SERVICE,
        "owner": "e2e",
        "stop_rules": {"max_error_rate_increase_pp": 2.0},
        "steps": [{"weight": 20, "min_duration_s": 3600}, {"weight": 100}],
        "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20}
    });
    let (status, created) = w.cp.post("/v1/rollouts", &spec).await?;
    ensure!(status == 201, "creating the rollout: {status} {created}");
    let id = created["id"].as_str().context("no id")?.to_owned();
    wait_weights(&w.envoy, (80, 20), Duration::from_secs(30)).await?;
    let before = view(&w.cp, &id).await?;
    assert_eq!(before["phase"]["state"], "canary", "{before:#}");

    // 1. SIGKILL mid-step: Envoy keeps serving its last config.
    w.cp.sigkill()?;
    let served = load.snapshot().total;
    wait::until(
        "Envoy to serve 100 more requests without its control plane",
        Duration::from_secs(20),
        || async { Ok((load.snapshot().total >= served + 100).then_some(())) },
    )
    .await?;
    assert_eq!(weights(&w.envoy).await?, (80, 20));
    w.cp.restart().await?;
    let after = view(&w.cp, &id).await?;
    assert_eq!(after["phase"], before["phase"], "{after:#}");
    assert_eq!(after["phase_started_ms"], before["phase_started_ms"]);
    assert_eq!(after["marks"], before["marks"]);

    // 2. SIGKILL between the writes of a rollback.
    let fifo = {
        let mut p = w.cp.state_file.clone().into_os_string();
        p.push(".tmp");
        std::path::PathBuf::from(p)
    };
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .context("making the FIFO")?;
    w.canary.state.set_behavior(Behavior {
        error_rate: 0.5,
        error_status: Some(503),
        ..Default::default()
    })?;
    let cp = &w.cp;
    wait::until(
        "the control plane to decide the rollback and block writing the state file",
        Duration::from_secs(60),
        || async { Ok(cp.blocked_on_fifo()?.then_some(())) },
    )
    .await?;
    let killed_ms = now_ms();
    w.cp.sigkill()?;
    assert_eq!(
        canary_weight_on_disk(&w.cp)?,
        20,
        "the kill must land before the state file changes"
    );
    assert_eq!(weights(&w.envoy).await?, (80, 20), "not published yet");
    std::fs::remove_file(&fifo)?;
    // Healthy again: only a decision that survived can roll it back now.
    w.canary.state.set_behavior(Behavior::default())?;
    w.cp.restart().await?;

    let r = view(&w.cp, &id).await?;
    assert_eq!(r["phase"]["state"], "rolled_back", "{r:#}");
    assert_eq!(r["weights"]["canary"], 0, "{r:#}");
    let last = r["audit"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["to"], "rolled_back", "{last:#}");
    assert_eq!(last["actor"], "engine", "{last:#}");
    let decided = last["time_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        decided <= killed_ms,
        "decided at {decided}, after the kill at {killed_ms}: re-decided, not kept"
    );
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("canary 5xx "),
        "the error check failed: {reason}"
    );
    assert_eq!(canary_weight_on_disk(&w.cp)?, 0);
    wait_weights(&w.envoy, (100, 0), Duration::from_secs(30)).await?;

    let tally = load.stop().await;
    assert_eq!(
        tally.transport_errors, 0,
        "Envoy served throughout: {tally:?}"
    );
    assert!(
        tally.by_status.keys().all(|s| *s == 200 || *s == 503),
        "{tally:?}"
    );
    let after = traffic::send(&w.url, 50, 4).await;
    assert_eq!(after.version("v1"), 50, "all traffic on stable: {after:?}");
    drop(w.stable);
    Ok(())
}

/// A SIGSTOPped control plane accepts connections and never answers: every
/// API call of the harness fails within its timeout, and a wait on it fails
/// at its deadline; both far below a CI timeout. Let go (SIGCONT), the same
/// call answers, so the failure was the wedge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_control_plane_fails_a_test_in_seconds() -> Result<()> {
    let w = world().await?;
    let bound = API_TIMEOUT * 3;
    w.cp.signal(Signal::STOP)?;
    let started = Instant::now();
    let call = tokio::time::timeout(bound, w.cp.get("/v1/services")).await;
    let took = started.elapsed();
    assert!(
        matches!(call, Ok(Err(_))),
        "the call must fail by its own timeout (after {took:?}): {call:?}"
    );
    assert!(took < API_TIMEOUT * 2, "{took:?}");

    let started = Instant::now();
    let waited = tokio::time::timeout(
        bound,
        wait::until("a wedged API", Duration::from_secs(2), || async {
            Ok(w.cp.get("/healthz").await.ok())
        }),
    )
    .await;
    let took = started.elapsed();
    assert!(matches!(waited, Ok(Err(_))), "{waited:?}");
    assert!(
        took < Duration::from_secs(4),
        "the wait ended after {took:?}"
    );

    w.cp.signal(Signal::CONT)?;
    let services = w.cp.get("/v1/services").await?;
    assert_eq!(services[0]["name"], SERVICE, "{services}");
    Ok(())
}
