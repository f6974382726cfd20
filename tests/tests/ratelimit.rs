//! Adaptive per-tenant rate limits, end to end: real Envoy with two workers,
//! the filter configured over ECDS, limits enforced across both workers.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use understudy_e2e::stack::Stack;
use understudy_e2e::traffic::{self, Answer};
use understudy_e2e::upstream::{Behavior, HeaderMatch};
use understudy_e2e::wait;

fn config(extra: Value) -> Value {
    let mut rl = json!({
        "identity": {"header": "x-tenant-id", "api_key_header": "x-api-key"},
        "tiers": {
            "anonymous": {"initial": 20, "min": 5, "max": 20, "burst_s": 0.05, "pool_rate": 20},
            "standard": {"initial": 20, "min": 4, "max": 200, "burst_s": 0.2, "increase": 10},
            "partner": {"initial": 100, "min": 50, "max": 500, "burst_s": 0.05, "pool_rate": 500}
        },
        "tenants": {"acme": {"tier": "partner"}, "steady": {"rate": 20}, "quiet": {"rate": 20}},
        "adjust_ms": 300,
        "headers_on_allowed": true,
        "max_tenants": 1000
    });
    if let (Some(r), Some(e)) = (rl.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    json!({"routes": [{"name": "all"}], "rate_limit": rl})
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

/// Parses a `RateLimit` / `RateLimit-Policy` field as a strict RFC 9651
/// parser would (a List of one Item) and returns its parameters, integers as
/// digits and byte sequences as `:base64:`. A field a strict client would
/// reject fails the test here.
fn params(field: &str) -> Vec<(String, String)> {
    let list: sfv::List = sfv::Parser::new(field)
        .parse()
        .unwrap_or_else(|e| panic!("{field:?} is not an RFC 9651 list: {e}"));
    let Some(sfv::ListEntry::Item(item)) = list.first() else {
        panic!("{field:?}: no item")
    };
    item.params
        .iter()
        .map(|(k, v)| {
            let v = match v {
                sfv::BareItem::Integer(i) => i.to_string(),
                sfv::BareItem::ByteSequence(b) => {
                    use base64::Engine;
                    format!(":{}:", base64::engine::general_purpose::STANDARD.encode(b))
                }
                other => panic!("{field:?}: unexpected parameter {k} = {other:?}"),
            };
            (k.as_str().to_owned(), v)
        })
        .collect()
}

fn param(field: &str, key: &str) -> Option<String> {
    params(field)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// The tenant's current limit, as its `RateLimit-Policy` announces it.
fn quota(a: &Answer) -> Option<u64> {
    a.headers
        .get("ratelimit-policy")
        .and_then(|p| param(p, "q"))
        .and_then(|q| q.parse().ok())
}

async fn stat(stack: &Stack, name: &str) -> Result<u64> {
    Ok(stack
        .envoy
        .stat(&format!("wasmcustom.understudy.ratelimit.{name}"))
        .await?
        .unwrap_or(0))
}

/// A tenant at 3× its rate gets its rate (±10%) and clear 429s; another
/// tenant under its rate at the same time sees none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_gets_its_rate_and_clear_429s() -> Result<()> {
    let stack = Stack::start().await?;
    stack.put_filter_config(config(json!({}))).await?;
    let secs = 4.0;
    let (loud, quiet) = tokio::join!(
        traffic::paced(
            &stack.url,
            60.0,
            Duration::from_secs_f64(secs),
            &[("x-tenant-id", "steady")]
        ),
        traffic::paced(
            &stack.url,
            10.0,
            Duration::from_secs_f64(secs),
            &[("x-tenant-id", "quiet")]
        ),
    );
    let admitted = count(&loud, 200) as f64;
    // The rate over the run, plus the bucket's initial burst (20/s × 0.2 s).
    let expected = 20.0 * secs + 4.0;
    eprintln!(
        "loud tenant: {admitted} admitted of {} (expected {expected})",
        loud.len()
    );
    assert!(
        (admitted - expected).abs() <= 0.10 * expected,
        "admitted {admitted}, expected {expected} ±10%"
    );
    assert_eq!(
        count(&loud, 200) + count(&loud, 429),
        loud.len(),
        "only 200s and 429s"
    );
    assert_eq!(count(&quiet, 429), 0, "the quiet tenant is never limited");
    assert_eq!(count(&quiet, 200), quiet.len());

    let limited = loud
        .iter()
        .find(|a| a.status == 429)
        .context("no 429 at 3x the rate")?;
    let retry: u64 = limited
        .headers
        .get("retry-after")
        .context("Retry-After")?
        .parse()?;
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let policy = limited
        .headers
        .get("ratelimit-policy")
        .context("RateLimit-Policy")?;
    assert_eq!(param(policy, "q").as_deref(), Some("20"));
    assert_eq!(param(policy, "w").as_deref(), Some("1"));
    let rl = limited.headers.get("ratelimit").context("RateLimit")?;
    assert_eq!(param(rl, "r").as_deref(), Some("0"));
    assert!(param(rl, "t").and_then(|t| t.parse::<u64>().ok()).is_some());
    let pk = param(rl, "pk").context("pk")?;
    assert!(
        pk.starts_with(':') && pk.ends_with(':') && !pk.contains("steady"),
        "{pk}"
    );
    Ok(())
}

/// A new tenant starts at `initial`; sustained success raises its limit and
/// more of its requests pass. Another tenant's 5xx lower only that tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_adapt_to_each_tenants_behaviour() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(Behavior {
        error_rate: 1.0,
        error_status: Some(503),
        error_only_for: Some(HeaderMatch {
            name: "x-tenant-id".into(),
            value: "flaky".into(),
        }),
        ..Default::default()
    })?;
    stack.put_filter_config(config(json!({}))).await?;
    let before = traffic::paced(
        &stack.url,
        40.0,
        Duration::from_secs(1),
        &[("x-tenant-id", "newcomer")],
    )
    .await;
    let first = before
        .iter()
        .find_map(quota)
        .context("no RateLimit-Policy on allowed answers")?;
    assert_eq!(first, 20, "a new tenant starts at initial");
    let admitted_before = count(&before, 200);

    // Keep it busy and successful until its limit has risen.
    let risen = wait::until(
        "the newcomer's limit to rise",
        Duration::from_secs(15),
        || async {
            let answers = traffic::paced(
                &stack.url,
                20.0,
                Duration::from_millis(500),
                &[("x-tenant-id", "newcomer")],
            )
            .await;
            Ok(answers.iter().filter_map(quota).max().filter(|q| *q >= 60))
        },
    )
    .await?;
    let after = traffic::paced(
        &stack.url,
        40.0,
        Duration::from_secs(1),
        &[("x-tenant-id", "newcomer")],
    )
    .await;
    eprintln!(
        "newcomer: limit 20 -> {risen}; admitted {admitted_before} then {}",
        count(&after, 200)
    );
    assert!(
        count(&after, 200) > admitted_before,
        "more requests pass once the limit rose"
    );

    // The flaky tenant's upstream errors cut its limit; a healthy one is untouched.
    let (flaky, healthy) = tokio::join!(
        traffic::paced(
            &stack.url,
            15.0,
            Duration::from_secs(2),
            &[("x-tenant-id", "flaky")]
        ),
        traffic::paced(
            &stack.url,
            15.0,
            Duration::from_secs(2),
            &[("x-tenant-id", "healthy")]
        ),
    );
    assert!(count(&flaky, 503) > 0);
    let flaky_q = flaky.iter().filter_map(quota).min().unwrap_or(u64::MAX);
    let healthy_q = healthy.iter().filter_map(quota).min().unwrap_or(0);
    eprintln!("flaky limit down to {flaky_q}, healthy at least {healthy_q}");
    assert!(
        flaky_q < 20,
        "5xx must lower the flaky tenant's limit, got {flaky_q}"
    );
    assert!(
        healthy_q >= 20,
        "the healthy tenant keeps its limit, got {healthy_q}"
    );
    Ok(())
}

/// Pools: a partner is unaffected while anonymous traffic floods its own pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_is_unaffected_by_an_anonymous_flood() -> Result<()> {
    let stack = Stack::start().await?;
    stack.put_filter_config(config(json!({}))).await?;
    let (flood, partner) = tokio::join!(
        traffic::paced(&stack.url, 120.0, Duration::from_secs(3), &[]),
        traffic::paced(
            &stack.url,
            40.0,
            Duration::from_secs(3),
            &[("x-tenant-id", "acme")]
        ),
    );
    eprintln!(
        "anonymous: {} of {} limited",
        count(&flood, 429),
        flood.len()
    );
    assert!(
        count(&flood, 429) > flood.len() / 2,
        "the anonymous pool holds at 20/s"
    );
    assert_eq!(count(&partner, 429), 0, "the partner never sees a 429");
    assert_eq!(count(&partner, 200), partner.len());
    assert!(stat(&stack, "anonymous.limited").await? > 0);
    assert_eq!(stat(&stack, "partner.limited").await?, 0);
    Ok(())
}

/// A tier's pool caps the sum of its tenants: four tenants each well under
/// their own 50/s send 15/s each (60/s together) into a 30/s pool, and the
/// tier admits the pool's rate, not the tenants'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_pool_caps_the_sum_of_its_tenants() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(config(json!({
            "tiers": {
                "anonymous": {"initial": 20, "min": 5, "max": 20, "burst_s": 0.05, "pool_rate": 20},
                "standard": {"initial": 50, "min": 50, "max": 50, "burst_s": 0.5, "pool_rate": 30}
            },
            "tenants": {}
        })))
        .await?;
    let started = std::time::Instant::now();
    let window = Duration::from_secs(4);
    let (a, b, c, d) = tokio::join!(
        traffic::paced(&stack.url, 15.0, window, &[("x-tenant-id", "t0")]),
        traffic::paced(&stack.url, 15.0, window, &[("x-tenant-id", "t1")]),
        traffic::paced(&stack.url, 15.0, window, &[("x-tenant-id", "t2")]),
        traffic::paced(&stack.url, 15.0, window, &[("x-tenant-id", "t3")]),
    );
    let elapsed = started.elapsed().as_secs_f64();
    let all: Vec<_> = [a, b, c, d].into_iter().flatten().collect();
    let admitted = count(&all, 200) as f64;
    let limited = count(&all, 429);
    assert_eq!(count(&all, 200) + limited, all.len(), "only 200s and 429s");
    // The pool's 30/s over the run (the last answers may come a little after
    // the last request was sent), plus its burst of 30 × 0.5 s. (The four
    // clients tick together: a burst of 0.05 s, 1.5 tokens, could not hold
    // their simultaneous arrivals and would admit about half the rate.)
    let most = 30.0 * elapsed + 15.0 + 3.0;
    let least = 0.85 * 30.0 * window.as_secs_f64();
    eprintln!(
        "pool: {admitted} admitted, {limited} limited in {elapsed:.2} s (bounds {least:.0}..{most:.0})"
    );
    assert!(
        admitted <= most,
        "{admitted} admitted, the 30/s pool allows {most:.0}"
    );
    assert!(
        admitted >= least,
        "{admitted} admitted, the pool should let {least:.0} through"
    );
    assert!(limited > 0);
    assert!(stat(&stack, "standard.limited").await? > 0);
    Ok(())
}

/// Shadow mode rejects nothing and counts what it would have rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_only_counts() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(config(json!({"shadow": true})))
        .await?;
    let answers = traffic::paced(
        &stack.url,
        60.0,
        Duration::from_secs(2),
        &[("x-tenant-id", "steady")],
    )
    .await;
    assert_eq!(count(&answers, 429), 0);
    assert_eq!(count(&answers, 200), answers.len());
    let would = stat(&stack, "standard.shadow_limited").await?;
    eprintln!(
        "shadow mode: {would} would-be rejections of {}",
        answers.len()
    );
    assert!(
        would >= 60,
        "about 80 of 120 would be limited, counted {would}"
    );
    assert_eq!(stat(&stack, "standard.limited").await?, 0);
    Ok(())
}

/// Thousands of distinct tenants stay within the table's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_tenants_stay_within_the_table_bound() -> Result<()> {
    let stack = Stack::start().await?;
    // The default tier pool (100 × initial) exists to bound exactly this
    // kind of tenant-id rotation; here it is lifted, so what is measured is
    // the table alone.
    stack
        .put_filter_config(config(json!({
            "max_tenants": 64,
            "tiers": {
                "anonymous": {"initial": 20, "min": 5, "max": 20, "burst_s": 0.05, "pool_rate": 20},
                "standard": {"initial": 20, "min": 4, "max": 200, "burst_s": 0.2, "increase": 10,
                             "pool_rate": 1000000},
                "partner": {"initial": 100, "min": 50, "max": 500, "burst_s": 0.05, "pool_rate": 500}
            }
        })))
        .await?;
    let ids: Vec<String> = (0..3000).map(|i| format!("tenant-{i}")).collect();
    let http = stack.http.clone();
    let mut ok = 0;
    for chunk in ids.chunks(16) {
        let answers = futures_like_join(chunk.iter().map(|id| {
            let http = http.clone();
            let url = stack.url.clone();
            let id = id.clone();
            async move {
                http.get(url)
                    .header("x-tenant-id", id)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        }))
        .await;
        ok += answers.iter().filter(|s| **s == 200).count();
    }
    assert_eq!(
        ok,
        ids.len(),
        "each new tenant starts with its initial allowance"
    );
    let tracked = stat(&stack, "tenants").await?;
    let evictions = stat(&stack, "evictions").await?;
    eprintln!("3000 tenants: {tracked} slots in use, {evictions} evictions");
    assert!(
        tracked <= 64,
        "the table holds at most max_tenants, got {tracked}"
    );
    assert!(evictions >= 3000 - 64);
    Ok(())
}

async fn futures_like_join<F: std::future::Future<Output = u16> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<u16> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap_or(0));
    }
    out
}

/// Invalid rate-limit configs are refused with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_limits_are_refused() -> Result<()> {
    let stack = Stack::start().await?;
    for (rl, needle) in [
        (
            json!({"tiers": {"anonymous": {"initial": 5, "min": 10, "max": 1}}}),
            "min (10) is above max (1)",
        ),
        (
            json!({"tiers": {"anonymous": {"initial": 0, "min": 0, "max": 1}}, "default_tier": "anonymous"}),
            "must be a rate above 0",
        ),
        (
            json!({"tiers": {"anonymous": {"initial": 1, "min": 1, "max": 1}}, "default_tier": "anonymous", "tenants": {"x": {"tier": "gold"}}}),
            "unknown tier \"gold\"",
        ),
    ] {
        let body = json!({"wasm_path": "/ignored.wasm", "config": {"rate_limit": rl}});
        let (status, answer) = stack.api_put("/v1/filter", &body).await?;
        assert_eq!(status, 400, "{answer}");
        let msg = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{msg}");
    }
    Ok(())
}

/// A per-route, per-method limit holds for all tenants together, and other
/// methods on the route are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_method_limits_apply_alongside_tenant_limits() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(config(json!({"route_limits": [{"route": "all", "method": "POST", "rate": 5, "burst_s": 0.2}]})))
        .await?;
    let mut posts = Vec::new();
    for i in 0..20 {
        let tenant = format!("poster-{}", i % 4);
        let r = stack
            .http
            .post(&stack.url)
            .header("x-tenant-id", tenant)
            .body("x")
            .send()
            .await?;
        posts.push((
            r.status().as_u16(),
            r.headers()
                .get("ratelimit-policy")
                .map(|v| v.to_str().unwrap_or("").to_owned()),
        ));
    }
    let limited: Vec<_> = posts.iter().filter(|(s, _)| *s == 429).collect();
    assert!(limited.len() >= 10, "20 quick POSTs against 5/s: {posts:?}");
    assert!(
        limited.iter().all(
            |(_, p)| p.as_deref().is_some_and(|p| p.starts_with("\"route\";")
                && param(p, "q").as_deref() == Some("5")
                && param(p, "pk").is_some())
        ),
        "{limited:?}"
    );
    let gets = traffic::paced(
        &stack.url,
        20.0,
        Duration::from_secs(1),
        &[("x-tenant-id", "reader")],
    )
    .await;
    assert_eq!(count(&gets, 429), 0, "GETs are not under the POST limit");
    assert!(stat(&stack, "route_limited").await? >= 10);
    Ok(())
}

/// Fleet: a fleet-wide tenant limit is split across the connected Envoys and
/// recomputed when one joins or leaves; the filters' usage reports show up in
/// the API; per-tenant overrides are pushed through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shares_limits_and_reports_usage() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(config(json!({
            "tenants": {"big": {"fleet_rate": 40}},
            "report": {"cluster": "understudy_xds", "interval_ms": 300}
        })))
        .await?;
    let quota_of = |tenant: &'static str| {
        let stack = &stack;
        async move {
            let r = stack
                .http
                .get(&stack.url)
                .header("x-tenant-id", tenant)
                .send()
                .await?;
            let a = Answer {
                status: r.status().as_u16(),
                headers: r
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                    .collect(),
            };
            anyhow::Ok(quota(&a))
        }
    };
    assert_eq!(
        quota_of("big").await?,
        Some(40),
        "one Envoy: the whole fleet rate"
    );

    let mut second = stack.another_envoy("e2e-envoy-2").await?;
    wait::until(
        "the share to halve with two Envoys",
        Duration::from_secs(15),
        || async { Ok((quota_of("big").await? == Some(20)).then_some(())) },
    )
    .await?;
    second.kill();
    wait::until(
        "the share to come back when the second Envoy leaves",
        Duration::from_secs(15),
        || async { Ok((quota_of("big").await? == Some(40)).then_some(())) },
    )
    .await?;

    // Usage learned from the filters' reports.
    traffic::paced(
        &stack.url,
        30.0,
        Duration::from_secs(1),
        &[("x-tenant-id", "big")],
    )
    .await;
    let usage = wait::until(
        "usage reports for the tenant",
        Duration::from_secs(10),
        || async {
            let top = stack.api_get("/v1/ratelimit/tenants?top=5").await?;
            let big = top["tenants"]
                .as_array()
                .and_then(|l| l.iter().find(|t| t["tenant"] == "big").cloned());
            Ok(big.filter(|b| b["allowed"].as_u64().unwrap_or(0) >= 30))
        },
    )
    .await?;
    assert_eq!(usage["limit_rps_by_envoy"]["e2e-envoy"], 40.0, "{usage}");
    assert_eq!(usage["tier"], "standard");

    // Overrides through the API: validated, pushed, and removable. The tenant
    // is known (in `standard`) before it is moved to `partner`.
    assert_eq!(quota_of("vip").await?, Some(20));
    let (status, body) = stack
        .api_put("/v1/ratelimit/tenants/vip", &json!({"tier": "platinum"}))
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown tier \"platinum\""),
        "{body}"
    );
    let (status, body) = stack
        .api_put("/v1/ratelimit/tenants/vip", &json!({"tier": "partner"}))
        .await?;
    assert_eq!(status, 200, "{body}");
    wait::until(
        "the override to reach Envoy",
        Duration::from_secs(10),
        || async { Ok((quota_of("vip").await? == Some(100)).then_some(())) },
    )
    .await?;
    let r = stack
        .api
        .delete(stack.cp.api_url("/v1/ratelimit/tenants/vip"))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    Ok(())
}
