//! `dashboard`: the release dashboard's two budgets (issue 14), measured in
//! headless Chromium ([`Browser`]) against the e2e [`Stack`] (control plane
//! in-process, real Envoy, real upstreams).
//!
//! - `first_load_kb`: what the shadow route page transfers on a first visit,
//!   the rule-preview wasm module included (Performance API; compressed
//!   sizes when served compressed). Each round is a fresh browser profile.
//!   Budget: 300 KB.
//! - `update_latency_s`: from just before an API abort is sent until the
//!   open rollout page shows `aborted` (the page's clock, a
//!   `MutationObserver`), one fresh rollout per round. Budget: 1.5 s.
//!
//! Medians with min and max, like every scenario; the e2e test
//! `tests/tests/dashboard.rs` asserts the same budgets on single runs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{round3, spread};
use crate::browser::Browser;
use crate::controlplane::{OPERATOR_TOKEN, VIEWER_TOKEN};
use crate::stack::{SERVICE, Stack};
use crate::upstream::Behavior;
use crate::{rollouts, wait};

/// Update-latency rounds (issue 14: the median of 10).
const UPDATE_ROUNDS: usize = 10;
/// First-load rounds: each starts a browser, and the figure barely moves.
const LOAD_ROUNDS: usize = 3;
/// Shadowed requests stored before the first load (the page lists samples).
const SHADOWED: usize = 50;
const FIRST_LOAD_BUDGET_KB: f64 = 300.0;
const UPDATE_BUDGET_S: f64 = 1.5;
const PAGE: Duration = Duration::from_secs(15);

/// A rollout whose only step holds for ten minutes: only the abort moves it.
fn holding_spec() -> Value {
    json!({
        "service": SERVICE,
        "owner": "bench",
        "stop_rules": {"max_error_rate_increase_pp": 2.0},
        "steps": [{"weight": 20, "min_duration_s": 600}, {"weight": 100}],
        "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20}
    })
}

pub(super) async fn dashboard() -> Result<Value> {
    let started = Instant::now();
    // `free_port` releases the port for Envoy to bind; on a busy machine
    // another process may take it first: start again on fresh ports.
    let mut attempt = 1;
    let stack = loop {
        match Stack::start().await {
            Ok(stack) => break stack,
            Err(e) if attempt < 3 => {
                eprintln!("dashboard: the stack did not start ({e:#}); again");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };

    // A shadow route with a differing field, and samples stored for it.
    let body = |total: u64| Behavior {
        body: Some(json!({"item": 1, "total": total, "note": "same"})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(body(10))?;
    stack.canary.state.set_behavior(body(11))?;
    stack
        .put_filter_config(json!({"routes": [{"name": "orders", "path_prefix": "/",
            "shadow": {"cluster": format!("{SERVICE}-canary")}}]}))
        .await?;
    for i in 0..SHADOWED {
        let r = stack
            .http
            .get(format!("{}items/{i}", stack.url))
            .send()
            .await?;
        if r.status() != 200 {
            bail!("shadowed request {i}: {}", r.status());
        }
    }
    wait::until_every(
        "the shadowed requests to be reported",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let r = stack.api_get("/v1/shadow/routes/orders").await?;
            Ok((r["compared"].as_u64().unwrap_or(0) >= SHADOWED as u64).then_some(()))
        },
    )
    .await?;

    let mut loads_kb = Vec::new();
    let mut entries = Vec::new();
    for round in 0..LOAD_ROUNDS {
        let browser = Browser::start(&stack.cp.api_url("")).await?;
        browser.login(OPERATOR_TOKEN).await?;
        browser.goto("/ui/shadow/orders").await?;
        browser
            .wait_js(
                "the rule preview to load",
                "typeof window.understudyPreview === 'function'",
                PAGE,
            )
            .await?;
        let t = browser.transferred_with_wasm().await?;
        eprintln!("dashboard: first load {round}: {:.1} KB", t.kb());
        loads_kb.push(t.kb());
        entries = t.entries;
        browser.close().await?;
    }

    let browser = Browser::start(&stack.cp.api_url("")).await?;
    browser.login(VIEWER_TOKEN).await?;
    let mut latencies = Vec::new();
    for round in 0..UPDATE_ROUNDS {
        let created = rollouts::create(&stack, &holding_spec()).await?;
        let id = created["id"].as_str().context("no rollout id")?.to_owned();
        browser.goto(&format!("/ui/rollouts/{id}")).await?;
        browser.wait_for("#phase[data-phase=canary]", PAGE).await?;
        let latency = browser.abort_latency(&stack, &id).await?;
        eprintln!("dashboard: update {round}: {latency:?}");
        latencies.push(latency.as_secs_f64());
    }
    browser.close().await?;

    let mut figures = serde_json::Map::new();
    spread(&mut figures, "first_load_kb", &loads_kb);
    spread(&mut figures, "update_latency_s", &latencies);
    let first_load_kb = figures["first_load_kb"].as_f64().unwrap_or(f64::NAN);
    let update_latency_s = figures["update_latency_s"].as_f64().unwrap_or(f64::NAN);
    figures.extend(
        json!({
            "duration_s": round3(started.elapsed().as_secs_f64()),
            "first_load_budget_kb": FIRST_LOAD_BUDGET_KB,
            "first_load_within_budget": first_load_kb <= FIRST_LOAD_BUDGET_KB,
            "first_load_rounds": LOAD_ROUNDS,
            "first_load_entries": entries
                .iter()
                .map(|(url, bytes)| json!({"url": url, "bytes": bytes}))
                .collect::<Vec<_>>(),
            "first_load_note": "the shadow route page (/ui/shadow/orders, 50 stored samples) in a fresh browser profile, wasm module included: per entry transferSize (headers and the body as sent, compressed when served compressed), or encodedBodySize where the cache answered; the live-update stream is open and not counted",
            "update_latency_budget_s": UPDATE_BUDGET_S,
            "update_latency_within_budget": update_latency_s <= UPDATE_BUDGET_S,
            "update_rounds": UPDATE_ROUNDS,
            "update_latency_note": "from just before POST /v1/rollouts/<id>/abort is sent to the open rollout page's #phase showing data-phase=aborted (Date.now() in a MutationObserver; one clock on one machine); one fresh rollout per round, viewer session",
            "aggregation": "median of rounds; _min and _max are the extremes",
            "browser": "headless Chromium over chromedriver (Debian chromium, chromium-driver)",
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    Ok(Value::Object(figures))
}
