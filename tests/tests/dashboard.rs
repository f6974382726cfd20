//! The release dashboard in a real browser: headless Chromium driven over
//! WebDriver ([`Browser`]) against the real control plane serving `/ui/`,
//! with a real Envoy, the real filter and real upstreams behind it. What a
//! page shows is checked against what the API says, and what a page does
//! (a button, an applied rule) against what the control plane and Envoy
//! then do.
//!
//! Budgets (issue 14), asserted here and measured by `cargo xtask bench
//! dashboard`: the shadow page's first load transfers at most
//! [`FIRST_LOAD_BUDGET_KB`] including the rule-preview wasm module, and a
//! state change reaches an open page within [`UPDATE_BUDGET`].
//!
//! Every page visited is saved as a screenshot under `target/ui/`.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::browser::Browser;
use understudy_e2e::controlplane::{OPERATOR, OPERATOR_TOKEN, VIEWER_TOKEN};
use understudy_e2e::rollouts::{self, transitions};
use understudy_e2e::stack::{NODE_ID, SERVICE, Stack};
use understudy_e2e::traffic::Load;
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

/// Issue 14: the first load of the shadow page, wasm included.
const FIRST_LOAD_BUDGET_KB: f64 = 300.0;
/// Issue 14: from a state change to the open page showing it.
const UPDATE_BUDGET: Duration = Duration::from_millis(1500);

/// How long a page element may take to appear after a navigation.
const PAGE: Duration = Duration::from_secs(15);
/// The API is polled this often (its per-caller limit is 50/s).
const API_POLL: Duration = Duration::from_millis(200);

/// A spec with short steps (judged every 0.5 s); `extra` replaces top-level keys.
fn spec(extra: Value) -> Value {
    let mut s = json!({
        "service": SERVICE,
        "owner": "team-checkout",
        "stop_rules": {"max_error_rate_increase_pp": 2.0, "max_p99_ratio": 1.5},
        "steps": [{"weight": 1}, {"weight": 5}, {"weight": 20}, {"weight": 50}, {"weight": 100}],
        "defaults": {"min_duration_s": 1, "min_requests": 20},
        "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20}
    });
    if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    s
}

/// A spec whose first step holds for ten minutes: nothing but a person
/// (or the API) moves it.
fn holding_spec() -> Value {
    spec(json!({"steps": [{"weight": 20, "min_duration_s": 600}, {"weight": 100}]}))
}

async fn create(stack: &Stack, spec: &Value) -> Result<String> {
    let r = rollouts::create(stack, spec).await?;
    Ok(r["id"].as_str().context("no rollout id")?.to_owned())
}

/// A browser logged in with `token`, on the Rollouts page.
async fn logged_in(stack: &Stack, token: &str) -> Result<Browser> {
    let browser = Browser::start(&stack.cp.api_url("")).await?;
    browser.login(token).await?;
    Ok(browser)
}

/// What the rollout page shows now, by its DOM contract.
async fn rollout_page(browser: &Browser) -> Result<Value> {
    browser
        .js(
            r#"
            const q = s => document.querySelector(s);
            // The canary steps' rungs (the ladder may also show the
            // shadow stage and the end).
            const lis = [...document.querySelectorAll('#ladder li')]
                .filter(li => /^[0-9]+$/.test(li.dataset.step || ''));
            const phase = q('#phase'), weight = q('#weight'), verdict = q('#verdict');
            return {
                phase: phase ? phase.dataset.phase : null,
                weight: weight ? Number(weight.textContent.trim().replace(/[^0-9.]/g, '')) : null,
                updates: Number(document.body.dataset.updates || 0),
                marker: window.__marker === undefined ? null : window.__marker,
                ladder: lis.length,
                current: lis.findIndex(li => li.classList.contains('current')),
                verdict: verdict ? verdict.dataset.verdict : null,
            };
            "#,
            vec![],
        )
        .await
}

/// Opens rollout `id`'s page and waits until it shows `phase`.
async fn open_rollout(browser: &Browser, id: &str, phase: &str) -> Result<()> {
    browser.goto(&format!("/ui/rollouts/{id}")).await?;
    browser
        .wait_for(&format!("#phase[data-phase={phase}]"), PAGE)
        .await?;
    Ok(())
}

/// A count the chart object reports for `side`: its points (an array) or
/// the number itself.
fn points(chart: &Value, side: &str) -> usize {
    match &chart[side] {
        Value::Array(a) => a.len(),
        Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
        _ => 0,
    }
}

/// 1. No session: every dashboard page is the login page, a bad token is
///    refused on it with an error, and a good one opens the Rollouts page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_every_page_is_the_login_page() -> Result<()> {
    let stack = Stack::start().await?;
    let id = create(&stack, &holding_spec()).await?;
    let browser = Browser::start(&stack.cp.api_url("")).await?;
    for page in [
        "/ui/".to_owned(),
        format!("/ui/rollouts/{id}"),
        "/ui/rollouts/x".to_owned(),
        "/ui/fleet".to_owned(),
        "/ui/shadow".to_owned(),
    ] {
        browser.goto(&page).await?;
        browser
            .wait_path("/ui/login", PAGE)
            .await
            .with_context(|| format!("{page} without a session"))?;
        browser.wait_for("input#token", PAGE).await?;
        let source = browser.client().source().await?;
        ensure!(
            !source.contains(&id) && !source.contains("team-checkout"),
            "{page} leaked rollout data to the login page"
        );
    }
    browser.screenshot("login").await?;

    browser.submit_login("not-a-token").await?;
    let error = browser.wait_for(".error", PAGE).await?.text().await?;
    assert!(error.contains("not valid"), "{error}");
    assert_eq!(browser.path().await?, "/ui/login");
    browser.screenshot("login-refused").await?;
    // Still no session: the pages still send the browser back.
    browser.goto(&format!("/ui/rollouts/{id}")).await?;
    browser.wait_path("/ui/login", PAGE).await?;

    browser.login(VIEWER_TOKEN).await?;
    browser
        .wait_for(&format!("table#rollouts tr[data-rollout='{id}']"), PAGE)
        .await?;
    browser.close().await
}

/// 2 and 3. A healthy rollout advances on its open page without a reload:
///    the phase and weight follow the engine step by step over live
///    updates, the step ladder marks the current step; at the end the
///    chart has points for both sides and one release mark per transition
///    in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_rollout_advances_on_the_open_page() -> Result<()> {
    let stack = Stack::start().await?;
    let same = Behavior {
        body: Some(json!({"cart": [1, 2], "total": 3})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(same.clone())?;
    stack.canary.state.set_behavior(same)?;
    let load = Load::start(&stack.url, 4);
    let browser = logged_in(&stack, OPERATOR_TOKEN).await?;
    let id = create(&stack, &spec(json!({}))).await?;
    open_rollout(&browser, &id, "canary").await?;
    browser.js("window.__marker = 1; return 1;", vec![]).await?;
    let first = rollout_page(&browser).await?;
    assert_eq!(first["ladder"], 5, "one ladder entry per step: {first}");
    browser.screenshot("rollout-start").await?;

    // Everything the page showed, in order (a change at a time).
    let shown: Mutex<Vec<Value>> = Mutex::new(vec![first.clone()]);
    let end = wait::until_every(
        "the open page to show the rollout succeeded",
        Duration::from_secs(120),
        Duration::from_millis(50),
        || async {
            let now = rollout_page(&browser).await?;
            let mut shown = shown.lock().unwrap_or_else(|p| p.into_inner());
            let key = |v: &Value| {
                (
                    v["phase"].clone(),
                    v["weight"].clone(),
                    v["current"].clone(),
                )
            };
            if shown.last().map(key) != Some(key(&now)) {
                shown.push(now.clone());
            }
            Ok((now["phase"] == "succeeded").then_some(now))
        },
    )
    .await;
    let shown = shown.into_inner().unwrap_or_else(|p| p.into_inner());
    let end = end.with_context(|| format!("the page showed: {shown:#?}"))?;
    load.stop().await;
    browser.screenshot("rollout-succeeded").await?;

    assert_eq!(end["marker"], 1, "the page was reloaded: {end}");
    let updates = end["updates"].as_u64().unwrap_or(0);
    let changes = shown.len() as u64 - 1;
    assert!(
        updates >= changes && updates > first["updates"].as_u64().unwrap_or(0),
        "{updates} live updates applied for {changes} changes seen: {shown:#?}"
    );
    // The weights the page showed went up the ladder, in order.
    let weights: Vec<u64> = shown
        .iter()
        .filter(|s| s["phase"] == "canary")
        .filter_map(|s| s["weight"].as_f64())
        .map(|w| w as u64)
        .fold(Vec::new(), |mut v, w| {
            if v.last() != Some(&w) {
                v.push(w);
            }
            v
        });
    let ladder = [1, 5, 20, 50, 100];
    assert!(
        weights.len() >= 3
            && weights.windows(2).all(|p| p[0] < p[1])
            && weights.iter().all(|w| ladder.contains(w)),
        "weights shown: {weights:?} ({shown:#?})"
    );
    // While in canary, the current ladder entry is the step the weight is.
    for s in shown.iter().filter(|s| s["phase"] == "canary") {
        let w = s["weight"].as_f64().map(|w| w as u64);
        let step = ladder.iter().position(|l| Some(*l) == w);
        assert_eq!(
            s["current"].as_i64().and_then(|c| usize::try_from(c).ok()),
            step,
            "{s}"
        );
    }

    // The chart: both sides have points, and a mark per audit transition
    // (finalizing comes a moment after success: wait for the API to say
    // so, then for the chart to show as many marks).
    let r = wait::until_every(
        "the rollout to be finalized",
        Duration::from_secs(15),
        API_POLL,
        || async {
            let r = rollouts::rollout(&stack, &id).await?;
            Ok((r["finalized"]["state"] == "done").then_some(r))
        },
    )
    .await?;
    let transitions = transitions(&r).len();
    assert!(transitions >= 6, "{:#}", r["audit"]);
    let chart = browser
        .wait_js(
            &format!("the chart to show {transitions} release marks"),
            &format!(
                "window.understudyChart && window.understudyChart.marks === {transitions} && window.understudyChart"
            ),
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("audit: {:#}", r["audit"]))?;
    assert!(points(&chart, "stable") > 0, "{chart}");
    assert!(points(&chart, "canary") > 0, "{chart}");
    assert!(browser.count("#charts canvas, #charts svg").await? > 0);
    let audit_rows = browser.count("#audit tr").await?;
    assert!(
        audit_rows >= transitions,
        "{audit_rows} audit rows for {transitions} transitions"
    );
    browser.screenshot("rollout").await?;
    browser.close().await
}

/// 4. A failed canary (6% 5xx against 1%) shows `rolled_back` on the open
///    page, the rollback verdict, and the failing check with its numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_canary_shows_the_rollback_and_its_numbers() -> Result<()> {
    let stack = Stack::start().await?;
    let errors = |rate| Behavior {
        error_rate: rate,
        error_status: Some(503),
        ..Default::default()
    };
    stack.stable.state.set_behavior(errors(0.01))?;
    stack.canary.state.set_behavior(errors(0.06))?;
    let load = Load::start(&stack.url, 4);
    let browser = logged_in(&stack, VIEWER_TOKEN).await?;
    let id = create(
        &stack,
        &spec(json!({"steps": [{"weight": 20, "min_duration_s": 60}, {"weight": 100}]})),
    )
    .await?;
    open_rollout(&browser, &id, "canary").await?;
    browser.js("window.__marker = 1; return 1;", vec![]).await?;
    browser
        .wait_for("#phase[data-phase=rolled_back]", Duration::from_secs(60))
        .await?;
    load.stop().await;
    let page = rollout_page(&browser).await?;
    assert_eq!(page["marker"], 1, "the page was reloaded: {page}");
    browser
        .wait_for("#verdict[data-verdict=rollback]", PAGE)
        .await?;

    let r = rollouts::rollout(&stack, &id).await?;
    assert_eq!(r["phase"]["state"], "rolled_back", "{r:#}");
    let last = r["audit"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    let failed = rollouts::failed_checks(&last["snapshot"]);
    assert_eq!(failed, ["error_rate"], "{last:#}");
    let check = last["snapshot"]["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "error_rate"))
        .cloned()
        .context("no error_rate check")?;
    let row = browser
        .wait_for("#checks tr[data-check=error_rate]", PAGE)
        .await?
        .text()
        .await?;
    // The row carries the check's own sentence, numbers and all.
    let detail = check["detail"].as_str().unwrap_or_default();
    assert!(!detail.is_empty(), "{check:#}");
    assert!(
        row.contains(detail),
        "the row {row:?} does not show {detail:?}"
    );
    let verdict = browser.text("#verdict").await?;
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(
        verdict.contains(reason) || row.contains(reason),
        "the verdict {verdict:?} does not give the reason {reason:?}"
    );
    browser.screenshot("rollout-rolled-back").await?;
    browser.close().await
}

/// `POST` from inside the page (the session cookie goes along, as in a
/// forged form): `fields` form-encoded, `csrf` (if any) also in the
/// `x-csrf-token` header. The HTTP status.
async fn page_post(
    browser: &Browser,
    url: &str,
    fields: &Value,
    csrf: Option<&str>,
) -> Result<u64> {
    let status = browser
        .js(
            r#"
            const [url, fields, csrf] = arguments;
            const headers = {'content-type': 'application/x-www-form-urlencoded'};
            if (csrf) { headers['x-csrf-token'] = csrf; }
            const body = new URLSearchParams(fields).toString();
            return fetch(url, {method: 'POST', headers, body, redirect: 'manual', credentials: 'same-origin'})
                .then(r => r.status);
            "#,
            vec![json!(url), fields.clone(), json!(csrf)],
        )
        .await?;
    status.as_u64().context("no status")
}

/// The `csrf-token` the page's `<meta>` carries.
async fn csrf(browser: &Browser) -> Result<String> {
    browser
        .attr("meta[name=csrf-token]", "content")
        .await?
        .context("the page has no csrf-token meta")
}

/// Clicks the action button `verb` and accepts its confirmation.
async fn act(browser: &Browser, verb: &str) -> Result<()> {
    browser
        .wait_for(&format!("button[data-action={verb}]"), PAGE)
        .await?
        .click()
        .await?;
    wait::until_every(
        &format!("the {verb} confirmation"),
        PAGE,
        Duration::from_millis(25),
        || async { Ok(browser.client().get_alert_text().await.ok()) },
    )
    .await?;
    browser.client().accept_alert().await?;
    Ok(())
}

/// 6 (and the update budget). An operator pauses and resumes from the
/// page, each confirmed first; a viewer sees no action buttons, and a
/// forged POST (no CSRF token, a wrong one, or a viewer's session with its
/// own token) gets 403 and changes nothing. An API abort reaches the
/// viewer's open page within [`UPDATE_BUDGET`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_act_viewers_cannot_and_changes_arrive_in_time() -> Result<()> {
    let stack = Stack::start().await?;
    let id = create(&stack, &holding_spec()).await?;
    let operator = logged_in(&stack, OPERATOR_TOKEN).await?;
    open_rollout(&operator, &id, "canary").await?;
    for verb in ["pause", "promote", "abort"] {
        operator
            .wait_for(&format!("form button[data-action={verb}]"), PAGE)
            .await?;
    }
    // The pause form as the page has it: where it posts, what it sends.
    let form = operator
        .js(
            r#"
            const button = document.querySelector('button[data-action=pause]');
            const form = button.closest('form');
            const url = button.getAttribute('hx-post') || button.getAttribute('formaction')
                || form.getAttribute('hx-post') || form.getAttribute('action');
            return {action: new URL(url, location.href).href,
                    fields: Object.fromEntries(new FormData(form))};
            "#,
            vec![],
        )
        .await?;
    let action = form["action"]
        .as_str()
        .context("no form action")?
        .to_owned();
    let fields = form["fields"].clone();
    let token = csrf(&operator).await?;
    let without_csrf: serde_json::Map<String, Value> = fields
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_str() != Some(token.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        page_post(
            &operator,
            &action,
            &Value::Object(without_csrf.clone()),
            None
        )
        .await?,
        403,
        "a POST without the CSRF token"
    );
    let mut wrong = without_csrf.clone();
    wrong.insert("csrf".into(), json!("0".repeat(token.len())));
    assert_eq!(
        page_post(
            &operator,
            &action,
            &Value::Object(wrong),
            Some(&"0".repeat(token.len()))
        )
        .await?,
        403,
        "a POST with a wrong CSRF token"
    );

    let viewer = logged_in(&stack, VIEWER_TOKEN).await?;
    open_rollout(&viewer, &id, "canary").await?;
    assert_eq!(
        viewer.count("button[data-action]").await?,
        0,
        "a viewer sees actions"
    );
    viewer.screenshot("rollout-viewer").await?;
    let viewer_token = csrf(&viewer).await?;
    let mut forged = without_csrf.clone();
    forged.insert("csrf".into(), json!(viewer_token));
    assert_eq!(
        page_post(
            &viewer,
            &action,
            &Value::Object(forged),
            Some(&viewer_token)
        )
        .await?,
        403,
        "a viewer's POST with its own CSRF token"
    );
    let r = rollouts::rollout(&stack, &id).await?;
    assert_eq!(
        r["paused"], false,
        "a refused POST paused the rollout: {r:#}"
    );
    assert_eq!(transitions(&r).len(), 1, "{:#}", r["audit"]);

    // The legitimate way still works: the operator's buttons, confirmed.
    act(&operator, "pause").await?;
    let paused = wait::until_every("the pause to apply", PAGE, API_POLL, || async {
        let r = rollouts::rollout(&stack, &id).await?;
        Ok((r["paused"] == true).then_some(r))
    })
    .await?;
    let (_, _, actor) = transitions(&paused).pop().unwrap_or_default();
    assert_eq!(actor, OPERATOR, "{:#}", paused["audit"]);
    operator.screenshot("rollout-paused").await?;
    act(&operator, "resume").await?;
    wait::until_every("the resume to apply", PAGE, API_POLL, || async {
        let r = rollouts::rollout(&stack, &id).await?;
        Ok((r["paused"] == false).then_some(()))
    })
    .await?;

    // An API change reaches the viewer's open page in time.
    viewer.js("window.__marker = 1; return 1;", vec![]).await?;
    let latency = viewer.abort_latency(&stack, &id).await?;
    assert!(
        latency <= UPDATE_BUDGET,
        "the abort reached the open page after {latency:?} (budget {UPDATE_BUDGET:?})"
    );
    assert_eq!(
        rollout_page(&viewer).await?["marker"],
        1,
        "the page was reloaded"
    );
    eprintln!("update latency: {latency:?}");

    // The fleet page lists this Envoy.
    viewer.goto("/ui/fleet").await?;
    viewer
        .wait_for(&format!("#envoys tr[data-node='{NODE_ID}']"), PAGE)
        .await?;
    viewer.screenshot("fleet").await?;
    viewer.goto("/ui/").await?;
    viewer
        .wait_for(
            &format!("table#rollouts tr[data-rollout='{id}'][data-phase=aborted]"),
            PAGE,
        )
        .await?;
    viewer.screenshot("rollouts").await?;
    viewer.close().await?;
    operator.close().await
}

/// The report's entry for `path`, if listed.
fn top_path<'a>(report: &'a Value, path: &str) -> Option<&'a Value> {
    report["top_paths"]
        .as_array()?
        .iter()
        .find(|p| p["path"] == path)
}

/// Sends `n` requests through Envoy and waits for the control plane to
/// report at least `total` compared pairs on route `orders`.
async fn shadowed(stack: &Stack, n: usize, total: u64) -> Result<Value> {
    for i in 0..n {
        let r = stack
            .http
            .get(format!("{}items/{i}", stack.url))
            .send()
            .await?;
        ensure!(r.status() == 200, "request {i}: {}", r.status());
    }
    wait::until_every(
        &format!("{total} compared pairs on route orders"),
        Duration::from_secs(20),
        API_POLL,
        || async {
            let r = stack.api_get("/v1/shadow/routes/orders").await?;
            Ok((r["compared"].as_u64().unwrap_or(0) >= total).then_some(r))
        },
    )
    .await
}

/// The `li[data-path]` of the list `css` (in the page).
async fn listed(browser: &Browser, css: &str) -> Result<Vec<String>> {
    let v = browser
        .js(
            "return [...document.querySelectorAll(arguments[0])].map(li => li.dataset.path);",
            vec![json!(format!("{css} li[data-path]"))],
        )
        .await?;
    Ok(serde_json::from_value(v)?)
}

/// 5 (and the first-load budget). Shadow route `orders` where v2 answers a
/// different `total` and `note`: on its page an ignore rule for `$.total`
/// moves that path to the gone list and leaves `$.note`, the browser's
/// preview equals the native one on the same inputs, and the operator's
/// apply changes what the filter reports afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_preview_matches_the_filter_and_applying_changes_reports() -> Result<()> {
    let stack = Stack::start().await?;
    let body = |total: u64, note: &str| Behavior {
        body: Some(json!({"item": 1, "total": total, "note": note})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(body(10, "a"))?;
    stack.canary.state.set_behavior(body(11, "b"))?;
    stack
        .put_filter_config(json!({"routes": [{"name": "orders", "path_prefix": "/",
            "shadow": {"cluster": "demo-canary"}}]}))
        .await?;
    let r = shadowed(&stack, 20, 20).await?;
    for path in ["$.total", "$.note"] {
        ensure!(top_path(&r, path).is_some(), "{path} not reported: {r:#}");
    }

    // The first load, with an empty cache: everything the page needs,
    // the wasm module included.
    let browser = logged_in(&stack, OPERATOR_TOKEN).await?;
    browser.goto("/ui/shadow").await?;
    browser
        .wait_for("#shadow-routes tr[data-route=orders]", PAGE)
        .await?;
    browser.screenshot("shadow").await?;
    browser.goto("/ui/shadow/orders").await?;
    browser
        .wait_js(
            "the rule preview to load",
            "typeof window.understudyPreview === 'function'",
            PAGE,
        )
        .await?;
    let transfer = browser.transferred_with_wasm().await?;
    assert!(
        transfer
            .entries
            .iter()
            .any(|(url, _)| url.split('?').next().is_some_and(|u| u.ends_with(".wasm"))),
        "no wasm module among {:?}",
        transfer.entries
    );
    assert!(
        transfer.kb() <= FIRST_LOAD_BUDGET_KB,
        "the shadow page's first load transferred {:.1} KB (budget {FIRST_LOAD_BUDGET_KB} KB): {:?}",
        transfer.kb(),
        transfer.entries
    );
    eprintln!("first load: {:.1} KB", transfer.kb());
    for path in ["$.total", "$.note"] {
        browser
            .wait_for(&format!("#paths li[data-path='{path}']"), PAGE)
            .await?;
    }
    browser
        .wait_for("#samples .sample[data-sample]", PAGE)
        .await?;
    browser.screenshot("shadow-route").await?;

    // An ignore rule for $.total: it disappears from the preview, $.note stays.
    browser
        .find("#rule-ignore-input")
        .await?
        .send_keys("$.total")
        .await?;
    browser.find("#rule-ignore-add").await?.click().await?;
    browser
        .wait_for("#preview-gone li[data-path='$.total']", PAGE)
        .await?;
    let remaining = listed(&browser, "#preview-remaining").await?;
    let gone = listed(&browser, "#preview-gone").await?;
    assert!(remaining.contains(&"$.note".to_owned()), "{remaining:?}");
    assert!(!remaining.contains(&"$.total".to_owned()), "{remaining:?}");
    assert!(!gone.contains(&"$.note".to_owned()), "{gone:?}");
    // Every sample still differs in $.note: nothing matches yet.
    let rate = browser.text("#preview-match-rate").await?;
    assert!(rate.starts_with('0'), "match rate shown: {rate:?}");
    browser.screenshot("shadow-preview").await?;

    // The browser's engine on the stored samples: what each rule set
    // leaves, and exactly what the native engine says on the same inputs.
    let samples = browser
        .js(
            "return fetch(arguments[0], {credentials: 'same-origin'}).then(r => r.text());",
            vec![json!("/ui/shadow/orders/samples.json")],
        )
        .await?;
    let samples = samples.as_str().context("samples.json as text")?.to_owned();
    let stored = serde_json::from_str::<Value>(&samples)?["samples"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(stored > 0, "no stored samples: {samples}");
    // The filter recorded both responses: every pair is the very one it
    // compared, not a rebuild.
    let parsed: Value = serde_json::from_str(&samples)?;
    for s in parsed["samples"].as_array().into_iter().flatten() {
        assert_eq!(s["exact"], true, "{s:#}");
    }
    // (rules, matched samples, serious paths)
    let cases = [
        (json!({}), 0, vec!["$.note", "$.total"]),
        (json!({"ignore": ["$.total"]}), 0, vec!["$.note"]),
        (json!({"ignore": ["$.total", "$.note"]}), stored, vec![]),
        (
            json!({"tolerance": [{"path": "$.total", "absolute": 1.0}]}),
            0,
            vec!["$.note"],
        ),
    ];
    for (rules, matched, serious) in cases {
        let rules = rules.to_string();
        let got = browser_preview(&browser, &rules, &samples).await?;
        let native: Value =
            serde_json::from_str(&understudy_preview::preview_json(&rules, &samples))?;
        assert_eq!(got, native, "rules {rules}: browser and native differ");
        assert_eq!(got["compared"], stored, "rules {rules}: {got:#}");
        assert_eq!(got["matched"], matched, "rules {rules}: {got:#}");
        let mut paths: Vec<&str> = got["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["serious"].as_u64().unwrap_or(0) > 0)
            .filter_map(|p| p["path"].as_str())
            .collect();
        paths.sort_unstable();
        assert_eq!(paths, serious, "rules {rules}: {got:#}");
    }

    // Apply: the filter's rules change, Envoy gets them, and new reports
    // no longer count $.total as a difference.
    browser.find("#apply-rules").await?.click().await?;
    if browser.client().get_alert_text().await.is_ok() {
        browser.client().accept_alert().await?;
    }
    let result = browser
        .wait_js(
            "the apply result",
            "((t) => t && !t.startsWith('Applying') && t)((document.querySelector('#apply-result') || {}).textContent)",
            PAGE,
        )
        .await?;
    let result = result.as_str().unwrap_or_default().to_owned();
    ensure!(
        !result.contains("Refused"),
        "applying the rules was refused: {result}"
    );
    browser.screenshot("shadow-applied").await?;
    wait::until_every(
        "Envoy to apply the ignore rule",
        Duration::from_secs(15),
        API_POLL,
        || async {
            let applied = stack.applied_filter_config().await?.unwrap_or_default();
            let ignore = &applied["routes"][0]["shadow"]["compare"]["ignore"];
            Ok(ignore
                .as_array()
                .is_some_and(|i| i.iter().any(|p| p == "$.total"))
                .then_some(()))
        },
    )
    .await
    .with_context(|| format!("the page said {result}"))?;
    let reset = stack
        .api
        .delete(stack.cp.api_url("/v1/shadow/routes/orders"))
        .send()
        .await?;
    assert_eq!(reset.status(), 204);
    let r = shadowed(&stack, 20, 20).await?;
    let total = top_path(&r, "$.total");
    assert!(
        total.is_none_or(|p| p["serious"] == 0),
        "$.total still counted after the rule: {r:#}"
    );
    let note =
        top_path(&r, "$.note").with_context(|| format!("$.note no longer reported: {r:#}"))?;
    assert!(note["serious"].as_u64() >= Some(20), "{note:#}");
    browser.close().await
}

/// `window.understudyPreview(rules, samples)` in the page, as JSON.
async fn browser_preview(browser: &Browser, rules: &str, samples: &str) -> Result<Value> {
    let got = browser
        .js(
            "return Promise.resolve(window.understudyPreview(arguments[0], arguments[1]));",
            vec![json!(rules), json!(samples)],
        )
        .await?;
    Ok(match got {
        Value::String(s) => serde_json::from_str(&s).context("the browser's preview")?,
        v => v,
    })
}
