//! Shadow traffic with field-level comparison, end to end: real Envoy (two
//! workers), the filter configured over ECDS, stable (`v1`, the primary) and
//! canary (`v2`, the shadow) upstreams, and the control plane's reports.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::stack::Stack;
use understudy_e2e::upstream::{Behavior, LatencyBand, Rounding, Seen};
use understudy_e2e::wait;

fn stat(route: &str, what: &str) -> String {
    format!("wasmcustom.understudy.shadow.{route}.{what}")
}

async fn counter(stack: &Stack, route: &str, what: &str) -> Result<u64> {
    Ok(stack.envoy.stat(&stat(route, what)).await?.unwrap_or(0))
}

/// A config with one shadowed route (everything under `/`).
fn shadow_config(shadow: Value) -> Value {
    let mut s = json!({"cluster": "demo-canary"});
    if let (Some(s), Some(extra)) = (s.as_object_mut(), shadow.as_object()) {
        s.extend(extra.clone());
    }
    json!({"routes": [{"name": "orders", "path_prefix": "/", "shadow": s}]})
}

/// Waits until the sum of the route's counters `what` reaches `n`; on
/// timeout, says what every shadow counter of the route shows.
async fn settled(stack: &Stack, route: &str, what: &[&str], n: u64) -> Result<()> {
    let waited = wait::until(
        &format!("{what:?} on route {route} to reach {n}"),
        Duration::from_secs(15),
        || async {
            let mut total = 0;
            for w in what {
                total += counter(stack, route, w).await?;
            }
            Ok((total >= n).then_some(()))
        },
    )
    .await;
    if waited.is_err() {
        let prefix = stat(route, "");
        let all: Vec<String> = stack
            .envoy
            .stats()
            .await?
            .into_iter()
            .filter(|(k, v)| k.starts_with(&prefix) && v != "0")
            .map(|(k, v)| format!("{}={v}", &k[prefix.len()..]))
            .collect();
        return waited.with_context(|| format!("shadow counters: {}", all.join(" ")));
    }
    waited
}

/// The client's answer through Envoy and the primary's own answer to the
/// same request, fetched directly: they must be equal byte for byte.
struct Answer {
    status: u16,
    version: Option<String>,
    body: Vec<u8>,
    latency: Duration,
}

async fn get(stack: &Stack, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
    let mut req = stack
        .http
        .get(format!("{}{}", stack.url, path.trim_start_matches('/')));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let version = resp
        .headers()
        .get("x-upstream-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await?.to_vec();
    Ok(Answer {
        status,
        version,
        body,
        latency: started.elapsed(),
    })
}

async fn direct(stack: &Stack, path: &str) -> Result<Vec<u8>> {
    let url = format!("http://{}{}", stack.stable.addr, path);
    Ok(stack.http.get(url).send().await?.bytes().await?.to_vec())
}

/// The client got the primary's answer, byte for byte.
async fn is_primary(stack: &Stack, path: &str, a: &Answer) -> Result<()> {
    ensure!(a.status == 200, "client got {} for {path}", a.status);
    ensure!(
        a.version.as_deref() == Some("v1"),
        "client got {:?}'s answer for {path}, not the primary's",
        a.version
    );
    let primary = direct(stack, path).await?;
    ensure!(
        a.body == primary,
        "client body differs from the primary's for {path}:\n  client:  {}\n  primary: {}",
        String::from_utf8_lossy(&a.body),
        String::from_utf8_lossy(&primary)
    );
    Ok(())
}

fn shadow_seen(stack: &Stack) -> Vec<Seen> {
    stack
        .canary
        .state
        .seen()
        .into_iter()
        .filter(|s| !s.path.starts_with("/_upstream"))
        .collect()
}

/// The control plane's report for a route once it has seen `n` compared pairs.
async fn report(stack: &Stack, route: &str, n: u64) -> Result<Value> {
    wait::until(
        &format!("the control plane to report {n} compared pairs on {route}"),
        Duration::from_secs(15),
        || async {
            let r = stack.api_get(&format!("/v1/shadow/routes/{route}")).await?;
            Ok((r["compared"].as_u64().unwrap_or(0) >= n).then_some(r))
        },
    )
    .await
}

fn top_path<'a>(report: &'a Value, path: &str) -> Option<&'a Value> {
    report["top_paths"]
        .as_array()?
        .iter()
        .find(|p| p["path"] == path)
}

/// v1 rounds tax per tax-rate group, v2 per line: carts with several small
/// lines at one rate disagree by a cent, single-line carts agree. The
/// report names `$.total` and `$.tax` with both values, bucketed serious.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_total_rounding_change_is_named_with_both_values() -> Result<()> {
    let stack = Stack::start().await?;
    let orders = |r| Behavior {
        orders: Some(r),
        ..Default::default()
    };
    stack
        .stable
        .state
        .set_behavior(orders(Rounding::PerGroup))?;
    stack.canary.state.set_behavior(orders(Rounding::PerLine))?;
    stack.put_filter_config(shadow_config(json!({}))).await?;

    let disagree = "/orders/quote?lines=0.15*1@0.1,0.15*1@0.1,0.15*1@0.1";
    let agree = "/orders/quote?lines=19.99*2@0.2";
    for i in 0..40 {
        let path = if i % 2 == 0 { disagree } else { agree };
        let a = get(&stack, path, &[]).await?;
        is_primary(&stack, path, &a).await?;
    }
    settled(&stack, "orders", &["compared"], 40).await?;
    assert_eq!(counter(&stack, "orders", "matched").await?, 20);
    assert_eq!(counter(&stack, "orders", "mismatched.serious").await?, 20);
    assert_eq!(counter(&stack, "orders", "sent").await?, 40);
    assert_eq!(shadow_seen(&stack).len(), 40, "one copy per request");

    let r = report(&stack, "orders", 40).await?;
    assert_eq!(r["matched"], 20, "{r:#}");
    assert_eq!(r["mismatched_serious"], 20, "{r:#}");
    assert_eq!(r["match_rate"].as_f64(), Some(0.5), "{r:#}");
    for (path, primary, shadow) in [("$.total", "0.5", "0.51"), ("$.tax", "0.05", "0.06")] {
        let p = top_path(&r, path).with_context(|| format!("{path} not reported: {r:#}"))?;
        assert_eq!(p["count"], 20, "{p:#}");
        assert_eq!(p["serious"], 20, "{p:#}");
        let sample = &p["samples"][0];
        assert_eq!(sample["bucket"], "serious", "{sample:#}");
        assert_eq!(sample["primary"], primary, "{sample:#}");
        assert_eq!(sample["shadow"], shadow, "{sample:#}");
    }
    assert!(top_path(&r, "$.subtotal").is_none(), "{r:#}");
    Ok(())
}

/// Fields that differ on every response are serious until ignored, then no
/// longer reported; an invalid rule set is refused and the rules in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_fields_are_serious_until_ignored() -> Result<()> {
    let stack = Stack::start().await?;
    // The same document from both versions, but for its stamps.
    let stamped = Behavior {
        stamp: true,
        body: Some(json!({"item": 1, "name": "lamp"})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(stamped.clone())?;
    stack.canary.state.set_behavior(stamped)?;
    stack.put_filter_config(shadow_config(json!({}))).await?;
    for _ in 0..10 {
        assert_eq!(get(&stack, "/items/1", &[]).await?.status, 200);
    }
    settled(&stack, "orders", &["compared"], 10).await?;
    assert_eq!(counter(&stack, "orders", "mismatched.serious").await?, 10);
    let r = report(&stack, "orders", 10).await?;
    for path in ["$.generated_at", "$.trace_id"] {
        let p = top_path(&r, path).with_context(|| format!("{path} not reported: {r:#}"))?;
        assert_eq!(p["serious"], 10, "{p:#}");
    }

    // An invalid rule is refused, naming the field; nothing changes.
    let before = stack.api_get("/v1/filter").await?;
    let bad = shadow_config(json!({"compare": {"ignore": ["generated_at"]}}));
    let (status, answer) = stack
        .api_put(
            "/v1/filter",
            &json!({"wasm_path": understudy_e2e::paths::filter_wasm()?.display().to_string(), "config": bad}),
        )
        .await?;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("routes[0].shadow.compare.ignore[0]"),
        "{message}"
    );
    let filter = stack.api_get("/v1/filter").await?;
    assert_eq!(filter, before, "the stored rules changed");

    let quiet = shadow_config(json!({"compare": {
        "ignore": ["$.generated_at", "/trace_id"],
        "report_ignored": false
    }}));
    stack.put_filter_config(quiet).await?;
    for _ in 0..10 {
        assert_eq!(get(&stack, "/items/1", &[]).await?.status, 200);
    }
    // Envoy keeps a stat across filter configs: the totals move on from 10.
    settled(&stack, "orders", &["matched"], 10).await?;
    assert_eq!(counter(&stack, "orders", "mismatched.serious").await?, 10);
    let r = report(&stack, "orders", 20).await?;
    assert_eq!(r["matched"], 10, "{r:#}");
    let p = top_path(&r, "$.generated_at").context("still listed")?;
    assert_eq!(p["count"], 10, "no new differences were reported: {p:#}");
    Ok(())
}

/// A POST is not shadowed unless its route opts in; the copy is marked,
/// carries the `-shadow` host and no credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_need_opt_in_and_copies_carry_no_credentials() -> Result<()> {
    let stack = Stack::start().await?;
    stack.put_filter_config(shadow_config(json!({}))).await?;
    let post = |stack: &Stack| {
        stack
            .http
            .post(format!("{}orders", stack.url))
            .header("authorization", "Bearer secret")
            .header("cookie", "session=abc")
            .header("x-tenant", "t1")
            .body(r#"{"sku":"A","qty":2}"#)
            .send()
    };
    assert_eq!(post(&stack).await?.status(), 200);
    settled(&stack, "orders", &["skipped_method"], 1).await?;
    assert_eq!(counter(&stack, "orders", "sent").await?, 0);
    assert!(shadow_seen(&stack).is_empty(), "a POST was shadowed");

    stack
        .put_filter_config(shadow_config(json!({"unsafe_methods": true})))
        .await?;
    let answer = post(&stack).await?;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer
            .headers()
            .get("x-upstream-version")
            .and_then(|v| v.to_str().ok()),
        Some("v1")
    );
    settled(&stack, "orders", &["compared"], 1).await?;
    let seen = shadow_seen(&stack);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let copy = &seen[0];
    assert_eq!(copy.method, "POST");
    assert_eq!(copy.body_len, r#"{"sku":"A","qty":2}"#.len());
    assert_eq!(
        copy.headers.get("x-understudy-shadow").map(String::as_str),
        Some("1")
    );
    assert!(!copy.headers.contains_key("authorization"), "{copy:?}");
    assert!(!copy.headers.contains_key("cookie"), "{copy:?}");
    assert_eq!(copy.headers.get("x-tenant").map(String::as_str), Some("t1"));
    let host = copy.headers.get("host").cloned().unwrap_or_default();
    assert!(host.contains("-shadow"), "host {host:?}");
    // The primary got the credentials.
    let primary = stack.stable.state.seen();
    let p = primary
        .iter()
        .rev()
        .find(|s| s.method == "POST")
        .context("no POST at v1")?;
    assert_eq!(
        p.headers.get("authorization").map(String::as_str),
        Some("Bearer secret")
    );
    Ok(())
}

/// A shadow answering 500 where the primary answers 200 is a serious status
/// mismatch; the client sees only the primary's 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_500_is_a_serious_status_mismatch() -> Result<()> {
    let stack = Stack::start().await?;
    stack.canary.state.set_behavior(Behavior {
        error_rate: 1.0,
        error_status: Some(500),
        ..Default::default()
    })?;
    stack.put_filter_config(shadow_config(json!({}))).await?;
    for _ in 0..10 {
        let a = get(&stack, "/items/7", &[]).await?;
        is_primary(&stack, "/items/7", &a).await?;
    }
    settled(&stack, "orders", &["compared"], 10).await?;
    assert_eq!(counter(&stack, "orders", "mismatched.serious").await?, 10);
    let r = report(&stack, "orders", 10).await?;
    let p = top_path(&r, "status").with_context(|| format!("status not reported: {r:#}"))?;
    assert_eq!(p["serious"], 10, "{p:#}");
    assert_eq!(p["samples"][0]["primary"], "200", "{p:#}");
    assert_eq!(p["samples"][0]["shadow"], "500", "{p:#}");
    Ok(())
}

/// A shadow slower than its timeout counts as `shadow_timeout`, a body over
/// the budget as `skipped_too_large`; the client waits for neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_large_are_skipped_and_never_delay_the_client() -> Result<()> {
    let stack = Stack::start().await?;
    stack.canary.state.set_behavior(Behavior {
        latency: vec![LatencyBand {
            pct: 100.0,
            ms: 1_500,
        }],
        ..Default::default()
    })?;
    stack
        .put_filter_config(shadow_config(json!({"timeout_ms": 300})))
        .await?;
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let a = get(&stack, "/items/2", &[]).await?;
        is_primary(&stack, "/items/2", &a).await?;
        worst = worst.max(a.latency);
    }
    // The shadow takes 1.5 s and times out at 0.3 s; the client took neither.
    assert!(
        worst < Duration::from_millis(250),
        "worst client latency {worst:?}"
    );
    settled(&stack, "orders", &["shadow_timeout"], 10).await?;
    assert_eq!(counter(&stack, "orders", "compared").await?, 0);

    // A primary body over the budget: skipped, and still delivered whole.
    stack.canary.state.set_behavior(Behavior::default())?;
    stack.stable.state.set_behavior(Behavior {
        body: Some(json!({"blob": "x".repeat(4096)})),
        ..Default::default()
    })?;
    stack
        .put_filter_config(shadow_config(
            json!({"max_body_bytes": 1024, "record_body_bytes": 512}),
        ))
        .await?;
    for _ in 0..5 {
        let a = get(&stack, "/items/3", &[]).await?;
        is_primary(&stack, "/items/3", &a).await?;
        assert!(a.body.len() > 4096);
    }
    settled(&stack, "orders", &["skipped_too_large"], 5).await?;
    assert_eq!(counter(&stack, "orders", "compared").await?, 0);
    wait::until(
        "the pair tables to empty",
        Duration::from_secs(10),
        || async {
            Ok((stack
                .envoy
                .stat("wasmcustom.understudy.shadow.pending")
                .await?
                == Some(0))
            .then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Inference jobs are expected to change their allocation; training jobs are
/// declared unchanged. The same difference is expected on one segment and
/// flagged unexpected on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_on_a_segment_declared_unchanged_is_unexpected() -> Result<()> {
    let stack = Stack::start().await?;
    let body = |alloc: &str| Behavior {
        body: Some(json!({"allocation": {"pool": alloc}, "queue": "q1"})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(body("gpu-a"))?;
    stack.canary.state.set_behavior(body("gpu-b"))?;
    stack
        .put_filter_config(shadow_config(json!({"expected": [
            {"name": "inference", "header": {"name": "x-job-type", "value": "inference"},
             "paths": ["$.allocation"]},
            {"name": "training", "header": {"name": "x-job-type", "value": "training"}}
        ]})))
        .await?;
    for _ in 0..6 {
        get(&stack, "/jobs", &[("x-job-type", "inference")]).await?;
    }
    settled(&stack, "orders", &["compared"], 6).await?;
    assert_eq!(counter(&stack, "orders", "mismatched.serious").await?, 6);
    assert_eq!(counter(&stack, "orders", "unexpected").await?, 0);
    for _ in 0..4 {
        get(&stack, "/jobs", &[("x-job-type", "training")]).await?;
    }
    settled(&stack, "orders", &["compared"], 10).await?;
    assert_eq!(counter(&stack, "orders", "unexpected").await?, 4);
    let r = report(&stack, "orders", 10).await?;
    assert_eq!(r["unexpected"], 4, "{r:#}");
    assert_eq!(r["unexpected_rate"].as_f64(), Some(0.4), "{r:#}");
    let p = top_path(&r, "$.allocation.pool").context("allocation not reported")?;
    assert_eq!(
        (p["serious"].as_u64(), p["unexpected"].as_u64()),
        (Some(10), Some(4)),
        "{p:#}"
    );
    Ok(())
}

/// A/A calibration: the shadow runs the primary's own version, so whatever
/// differs is noise. Learned per path, it keeps those paths from counting
/// as serious once the real shadow runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_learns_noise_that_live_comparisons_then_discount() -> Result<()> {
    let stack = Stack::start().await?;
    let stamped = Behavior {
        stamp: true,
        body: Some(json!({"item": 1, "name": "lamp"})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(stamped.clone())?;
    stack.canary.state.set_behavior(stamped)?;
    stack
        .put_filter_config(shadow_config(
            json!({"cluster": "demo-stable", "calibration": true}),
        ))
        .await?;
    for _ in 0..10 {
        assert_eq!(get(&stack, "/items/1", &[]).await?.status, 200);
    }
    let noise = wait::until(
        "the control plane to learn noise from 10 calibration pairs",
        Duration::from_secs(15),
        || async {
            let n = stack.api_get("/v1/shadow/noise").await?;
            let route = n["routes"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["route"] == "orders"))
                .cloned();
            Ok(route.filter(|r| r["calibration_compared"].as_u64() >= Some(10)))
        },
    )
    .await?;
    let rate = |path: &str| {
        noise["paths"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["path"] == path))
            .and_then(|p| p["rate"].as_f64())
    };
    assert_eq!(rate("$.generated_at"), Some(1.0), "{noise:#}");
    assert_eq!(rate("$.trace_id"), Some(1.0), "{noise:#}");
    assert_eq!(rate("$.name"), None, "{noise:#}");
    // Calibration pairs are not live evidence.
    let r = stack.api_get("/v1/shadow/routes/orders").await?;
    assert_eq!(r["compared"], 0, "{r:#}");

    stack.put_filter_config(shadow_config(json!({}))).await?;
    for _ in 0..10 {
        assert_eq!(get(&stack, "/items/1", &[]).await?.status, 200);
    }
    // The filter still sees the stamps differ...
    settled(&stack, "orders", &["mismatched.serious"], 20).await?;
    // ...the control plane discounts them as learned noise.
    let r = report(&stack, "orders", 10).await?;
    assert_eq!(r["reclassified_as_noise"], 10, "{r:#}");
    assert_eq!(r["mismatched_serious"], 0, "{r:#}");
    assert_eq!(r["match_rate"].as_f64(), Some(1.0), "{r:#}");
    let p = top_path(&r, "$.generated_at").context("stamp not listed")?;
    assert_eq!(p["samples"][0]["bucket"], "noisy", "{p:#}");
    assert_eq!(p["learned_noise_rate"].as_f64(), Some(1.0), "{p:#}");
    Ok(())
}

/// At 50% sampling, every request is either copied or counted as
/// `not_sampled`, and the API shows the same numbers as Envoy (it used to show
/// `skipped: {}`); `DELETE` starts the route's live counts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_out_requests_show_in_the_api_and_counts_start_over() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(shadow_config(json!({"percent": 50})))
        .await?;
    for i in 0..80 {
        let a = get(&stack, &format!("/orders/{i}"), &[]).await?;
        ensure!(a.status == 200, "request {i}: {}", a.status);
    }
    settled(&stack, "orders", &["compared", "not_sampled"], 80).await?;
    let not_sampled = counter(&stack, "orders", "not_sampled").await?;
    let compared = counter(&stack, "orders", "compared").await?;
    assert_eq!(not_sampled + compared, 80);
    // Binomial(80, 0.5): mean 40, sd 4.5; ±4.5 sd.
    assert!((20..=60).contains(&not_sampled), "{not_sampled} of 80");
    let r = wait::until(
        "the API to show Envoy's counts",
        Duration::from_secs(15),
        || async {
            let r = stack.api_get("/v1/shadow/routes/orders").await?;
            let shown = (r["skipped"]["not_sampled"].as_u64(), r["compared"].as_u64());
            Ok((shown == (Some(not_sampled), Some(compared))).then_some(r))
        },
    )
    .await?;
    // Every reason is listed, zero or not.
    for reason in understudy_core::shadow::Skip::ALL {
        assert!(
            r["skipped"].get(reason.as_str()).is_some(),
            "{reason:?} missing: {:#}",
            r["skipped"]
        );
    }
    assert_eq!(r["skipped"]["shadow_timeout"], 0, "{r:#}");

    let url = stack.cp.api_url("/v1/shadow/routes/orders");
    let deleted = stack.api.delete(&url).send().await?;
    assert_eq!(deleted.status(), 204);
    let r = stack.api_get("/v1/shadow/routes/orders").await?;
    assert_eq!(
        (r["compared"].as_u64(), r["skipped"]["not_sampled"].as_u64()),
        (Some(0), Some(0)),
        "{r:#}"
    );
    for i in 0..20 {
        get(&stack, &format!("/orders/again/{i}"), &[]).await?;
    }
    settled(&stack, "orders", &["compared", "not_sampled"], 100).await?;
    let envoy_total = counter(&stack, "orders", "compared").await?
        + counter(&stack, "orders", "not_sampled").await?;
    assert_eq!(envoy_total, 100);
    // Only the 20 requests after the reset count.
    wait::until(
        "the API to count the 20 new requests",
        Duration::from_secs(15),
        || async {
            let r = stack.api_get("/v1/shadow/routes/orders").await?;
            let n = r["compared"].as_u64().unwrap_or(0)
                + r["skipped"]["not_sampled"].as_u64().unwrap_or(0);
            ensure!(n <= 20, "more than the new requests counted: {r:#}");
            Ok((n == 20).then_some(()))
        },
    )
    .await?;
    let gone = stack
        .api
        .delete(stack.cp.api_url("/v1/shadow/routes/nope"))
        .send()
        .await?;
    assert_eq!(gone.status(), 404);
    Ok(())
}
