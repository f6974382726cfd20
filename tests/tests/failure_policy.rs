//! What Envoy does when the filter fails, end to end, with the filter built
//! with its test-only `fault-injection` feature (`filter/src/fault.rs`,
//! built by `cargo xtask setup` into `target/fault/`):
//! - the first filter config over ECDS is rejected, or the module is not
//!   on the node: the listener serves on the ECDS `default_config` (a
//!   header-mutation filter that only removes `x-understudy-*` headers), and
//!   the filter takes over once a good config is pushed;
//! - a VM traps on a request: that request gets Envoy's 503
//!   (`FAIL_RELOAD` falls back to fail-closed for it), Envoy starts a fresh
//!   VM, and the following requests flow through a working filter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use understudy_controlplane::model::FilterDoc;
use understudy_e2e::stack::Stack;
use understudy_e2e::{paths, traffic, wait};

/// `filter/src/fault.rs`: the header that traps the VM, and the
/// `stat_prefix` its `on_configure` refuses.
const TRAP_HEADER: &str = "x-fault-injection";
const REJECTED_STAT_PREFIX: &str = "fault_injection_reject";

const ECDS_REJECTED: &str = "extension_config_discovery.http_filter.understudy.update_rejected";
/// Envoy's FAIL_RELOAD stats for the filter (`wasm.<plugin>.vm_reload_*`).
const RELOAD_SUCCESS: &str = "wasm.understudy.vm_reload_success";
const RELOAD_BACKOFF: &str = "wasm.understudy.vm_reload_backoff";

fn fault_wasm() -> Result<String> {
    Ok(paths::fault_filter_wasm()?.display().to_string())
}

fn requests_total(prefix: &str) -> String {
    format!("wasmcustom.{prefix}.requests_total")
}

async fn wait_stat(stack: &Stack, name: &str, at_least: u64) -> Result<u64> {
    wait::until(
        &format!("{name} >= {at_least}"),
        Duration::from_secs(15),
        || async move {
            let v = stack.envoy.stat(name).await?.unwrap_or(0);
            Ok((v >= at_least).then_some(v))
        },
    )
    .await
}

/// Every Envoy stat whose name contains `part`, for failure messages.
async fn stats_with(stack: &Stack, part: &str) -> Result<Vec<(String, String)>> {
    Ok(stack
        .envoy
        .stats()
        .await?
        .into_iter()
        .filter(|(k, _)| k.contains(part))
        .collect())
}

/// A request carrying an internal header a client must not send: a filter
/// that runs strips it before the upstream sees it. Returns the status and
/// whether the upstream saw the header.
async fn forged(stack: &Stack) -> Result<(u16, bool)> {
    let before = stack.stable.state.seen().len();
    let r = stack
        .http
        .get(&stack.url)
        .header("x-understudy-shadow", "1")
        .send()
        .await?;
    let status = r.status().as_u16();
    let seen = stack.stable.state.seen();
    let leaked = seen
        .get(before..)
        .unwrap_or_default()
        .iter()
        .any(|s| s.headers.contains_key("x-understudy-shadow"));
    Ok((status, leaked))
}

/// The first filter config Envoy is sent is one the filter refuses (as an
/// older filter refuses a newer control plane's field), so the first ECDS
/// fetch fails (a NACK) while LDS, RDS and CDS succeed. The listener still
/// serves, on its `default_config`: the filter is off (nothing counts), and
/// forged internal headers are still removed; a good config pushed
/// afterwards is ACKed and takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_first_filter_config_leaves_the_listener_serving_on_the_default() -> Result<()> {
    let wasm = fault_wasm()?;
    let bad = json!({
        "stat_prefix": REJECTED_STAT_PREFIX,
        "routes": [{"name": "all", "path_prefix": "/"}]
    });
    // `Stack::start_with` returns once the listener answers 200.
    let stack = Stack::start_with(|s| {
        s.filter.wasm_path = wasm.clone();
        s.filter.config = FilterDoc::parse(bad.clone()).expect("the control plane accepts it");
    })
    .await?;
    // The first ECDS fetch failed: NACKed, recorded, nothing ACKed.
    wait_stat(&stack, ECDS_REJECTED, 1).await?;
    let status = stack.envoy_status().await?.context("Envoy not listed")?;
    let ecds = &status["types"]["ecds"];
    assert!(ecds["acked_version"].is_null(), "{ecds:#}");
    assert_eq!(
        ecds["last_nack"]["version"], ecds["sent_version"],
        "{ecds:#}"
    );
    // (Envoy's `ecds_filters` config dump lists the refused config all the
    // same, so what is in force is read from the filter's own stats.)
    let nacks = stack.api_get("/v1/nacks").await?;
    assert_eq!(
        nacks[0]["type_url"], "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "{nacks:#}"
    );

    // The listener serves, on the fallback: no filter runs.
    let tally = traffic::send(&stack.url, 50, 4).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    assert_eq!(tally.version("v1"), 50, "{tally:?}");
    let (status, leaked) = forged(&stack).await?;
    assert_eq!(status, 200);
    assert!(
        !leaked,
        "the fallback filter did not remove x-understudy-shadow"
    );
    for prefix in ["understudy", REJECTED_STAT_PREFIX] {
        assert_eq!(
            stack.envoy.stat(&requests_total(prefix)).await?,
            None,
            "a Wasm filter counted requests ({prefix})"
        );
    }

    // A good config comes, is ACKed, and the filter runs on it.
    let good = json!({"stat_prefix": "recovered", "routes": [{"name": "all", "path_prefix": "/"}]});
    let (code, answer) = stack
        .api_put("/v1/filter", &json!({"wasm_path": wasm, "config": good}))
        .await?;
    assert_eq!(code, 200, "{answer}");
    wait::until(
        "Envoy to apply the good filter config",
        Duration::from_secs(15),
        || async {
            let applied = stack.applied_filter_config().await?;
            Ok(
                (applied.as_ref().map(|c| &c["stat_prefix"]) == Some(&json!("recovered")))
                    .then_some(()),
            )
        },
    )
    .await?;
    let status = stack.envoy_status().await?.context("Envoy not listed")?;
    let ecds = &status["types"]["ecds"];
    assert_eq!(ecds["acked_version"], ecds["sent_version"], "{ecds:#}");
    let tally = traffic::send(&stack.url, 30, 3).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    wait_stat(&stack, &requests_total("recovered"), 30).await?;
    wait_stat(&stack, "wasmcustom.recovered.route.all.requests_total", 30)
        .await
        .with_context(|| "the route metric of the good config")?;
    Ok(())
}

/// Sends one request that traps the VM of the worker `client`'s connection
/// is on; asserts Envoy answered it (503) without the upstream seeing it.
async fn trap(stack: &Stack, client: &reqwest::Client) -> Result<()> {
    let upstream_before = stack.stable.state.requests();
    let r = client
        .get(&stack.url)
        .header(TRAP_HEADER, "trap")
        .send()
        .await?;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert_eq!(
        stack.stable.state.requests(),
        upstream_before,
        "the trapped request reached the upstream"
    );
    Ok(())
}

/// A VM that traps mid-request: that request gets Envoy's 503 and never
/// reaches the upstream; Envoy starts a fresh VM (FAIL_RELOAD), and the
/// filter works again on that worker: it counts requests, strips forged
/// internal headers, and every request flows. The requests that came while
/// Envoy waited out its reload backoff are counted: each got a 503, and
/// Envoy's `vm_reload_backoff` says so (see the next test for why that is
/// a problem).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapped_vm_answers_503_and_envoy_reloads_a_working_filter() -> Result<()> {
    let wasm = fault_wasm()?;
    let stack = Stack::start_with(|s| s.filter.wasm_path = wasm.clone()).await?;
    let tally = traffic::send(&stack.url, 20, 2).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    let reloads_before = stack.envoy.stat(RELOAD_SUCCESS).await?.unwrap_or(0);
    let backoff_before = stack.envoy.stat(RELOAD_BACKOFF).await?.unwrap_or(0);

    // `stack.http` keeps one connection, so every request below lands on
    // the worker whose VM trapped.
    trap(&stack, &stack.http).await?;
    let failed_after = AtomicU64::new(0);
    wait::until(
        "a request after the trap to be served",
        Duration::from_secs(10),
        || {
            let r = stack.http.get(&stack.url).send();
            let failed = &failed_after;
            async move {
                let status = r.await?.status().as_u16();
                if status == 503 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                Ok((status == 200).then_some(()))
            }
        },
    )
    .await?;
    let reloads = wait_stat(&stack, RELOAD_SUCCESS, reloads_before + 1).await?;
    assert_eq!(
        reloads,
        reloads_before + 1,
        "{:?}",
        stats_with(&stack, "vm_reload").await?
    );
    // Every request refused after the trap was refused by the reload
    // backoff, none by anything else.
    assert_eq!(
        stack.envoy.stat(RELOAD_BACKOFF).await?.unwrap_or(0),
        backoff_before + failed_after.load(Ordering::Relaxed),
        "{:?}",
        stats_with(&stack, "vm_reload").await?
    );

    // The reloaded filter runs, and traffic flows.
    let counted = stack
        .envoy
        .stat(&requests_total("understudy"))
        .await?
        .unwrap_or(0);
    let tally = traffic::send(&stack.url, 200, 4).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    wait_stat(&stack, &requests_total("understudy"), counted + 200).await?;
    for _ in 0..8 {
        let (status, leaked) = forged(&stack).await?;
        assert_eq!(status, 200);
        assert!(!leaked, "a request went through without the filter");
    }
    Ok(())
}

/// The promise "a VM that fails keeps traffic flowing": after one trapped
/// request, the next requests on that worker are served. Requests come
/// every 20 ms on the trapped worker's connection for 1.5 s, and the
/// filter counts each of them.
///
/// FAIL_RELOAD waits out `reload_config.backoff` before it reloads and
/// answers every request on that worker 503 meanwhile; with Envoy's default
/// base of 1 s that was about 50 requests here (under real load, every
/// request of that worker for a second), so the control plane sets a 10 ms
/// base (`controlplane/src/xds/resources.rs`, `wasm_filter`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requests_after_a_trapped_one_are_served() -> Result<()> {
    let wasm = fault_wasm()?;
    let stack = Stack::start_with(|s| s.filter.wasm_path = wasm.clone()).await?;
    let tally = traffic::send(&stack.url, 20, 2).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    trap(&stack, &stack.http).await?;
    let counted = stack
        .envoy
        .stat(&requests_total("understudy"))
        .await?
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_millis(1500) {
        ticker.tick().await;
        let r = stack.http.get(&stack.url).send().await?;
        statuses.push((started.elapsed().as_millis(), r.status().as_u16()));
    }
    let failed: Vec<_> = statuses.iter().filter(|(_, s)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests after the trapped one failed (the last at {} ms): {:?}",
        failed.len(),
        statuses.len(),
        failed.last().map_or(0, |(t, _)| *t),
        stats_with(&stack, "vm_reload").await?
    );
    // Served through the filter, not around it (FAIL_OPEN would serve them
    // with the filter off): it counted every one.
    wait_stat(
        &stack,
        &requests_total("understudy"),
        counted + statuses.len() as u64,
    )
    .await?;
    Ok(())
}

/// The most common failed first fetch on a fresh node: the filter's module
/// is not on its disk (a bad deploy, a wrong `wasm_path`). The listener
/// must still serve.
///
/// A Wasm `default_config` with the same `wasm_path` made Envoy reject the
/// listener itself (LDS NACK, "Invalid path: ..."), so nothing listened;
/// the default is a header-mutation filter that needs no module. Once a
/// module that exists is configured, the filter takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_module_on_a_fresh_envoy_leaves_the_listener_serving() -> Result<()> {
    let stack = Stack::start_with(|s| s.filter.wasm_path = "/nonexistent/understudy.wasm".into())
        .await
        .context("the listener never answered (Envoy rejects LDS when the default_config's module is missing)")?;
    let tally = traffic::send(&stack.url, 20, 2).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    let (status, leaked) = forged(&stack).await?;
    assert_eq!(status, 200);
    assert!(!leaked, "the fallback did not remove x-understudy-shadow");
    // The module arrives (a fixed deploy, a corrected path): the filter
    // takes over.
    let (code, answer) = stack
        .api_put(
            "/v1/filter",
            &json!({"wasm_path": paths::filter_wasm()?.display().to_string(),
                    "config": {"routes": [{"name": "all", "path_prefix": "/"}]}}),
        )
        .await?;
    assert_eq!(code, 200, "{answer}");
    wait::until(
        "the filter to count requests",
        Duration::from_secs(15),
        || async {
            stack.http.get(&stack.url).send().await?;
            let n = stack.envoy.stat(&requests_total("understudy")).await?;
            Ok(n.filter(|n| *n > 0))
        },
    )
    .await?;
    Ok(())
}

/// The hooks above are test-only: the module `cargo xtask setup` builds for
/// shipping has none of them (their log lines are not in it), and the fault
/// build does.
#[test]
fn the_shipped_module_has_no_fault_hooks() -> Result<()> {
    let has = |path: std::path::PathBuf| -> Result<bool> {
        let bytes = std::fs::read(&path)?;
        let marker = b"fault injection: trapping the VM";
        Ok(bytes.windows(marker.len()).any(|w| w == marker))
    };
    assert!(
        !has(paths::filter_wasm()?)?,
        "the shipped module has the fault hooks"
    );
    assert!(
        has(paths::fault_filter_wasm()?)?,
        "the fault build has no fault hooks"
    );
    Ok(())
}
