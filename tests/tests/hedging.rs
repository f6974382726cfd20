//! Hedged retries, end to end: real Envoy (concurrency 2), the filter
//! configured over ECDS by the control plane, programmable upstreams.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use understudy_e2e::stack::Stack;
use understudy_e2e::traffic;
use understudy_e2e::upstream::{Behavior, LatencyBand, Seen};
use understudy_e2e::wait;

const PENDING: &str = "wasmcustom.understudy.hedge.pending";

fn stat(route: &str, what: &str) -> String {
    format!("wasmcustom.understudy.hedge.{route}.{what}")
}

fn slow(pct: f64, ms: u64, default_ms: u64) -> Behavior {
    Behavior {
        latency: vec![LatencyBand { pct, ms }],
        default_ms,
        ..Default::default()
    }
}

fn hedge_config(hedge: Value) -> Value {
    json!({"routes": [{"name": "all", "path_prefix": "/", "hedge": hedge}]})
}

async fn counter(stack: &Stack, name: &str) -> Result<u64> {
    Ok(stack.envoy.stat(name).await?.unwrap_or(0))
}

/// After the traffic, every worker's pending-hedge table is empty again.
async fn tables_drain(stack: &Stack) -> Result<()> {
    wait::until(
        "the hedge tables to empty",
        Duration::from_secs(10),
        || async { Ok((stack.envoy.stat(PENDING).await? == Some(0)).then_some(())) },
    )
    .await
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn by_key(seen: &[Seen]) -> BTreeMap<String, Vec<&Seen>> {
    let mut map: BTreeMap<String, Vec<&Seen>> = BTreeMap::new();
    for s in seen {
        let key = s
            .headers
            .get("idempotency-key")
            .cloned()
            .unwrap_or_default();
        map.entry(key).or_default().push(s);
    }
    map
}

/// 5% of requests take 300 ms: hedging cuts the tail, stays in budget,
/// answers every request once, and both attempts carry one Idempotency-Key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_slow_tail_within_budget() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(slow(5.0, 300, 5))?;
    stack
        .put_filter_config(hedge_config(json!({
            "cluster": "demo-stable",
            "delay": {"fixed": {"ms": 40}},
            "budget": {"percent": 10, "per_second_floor": 1, "burst": 10}
        })))
        .await?;
    let upstream_before = stack.stable.state.requests();
    let seen_before = stack.stable.state.seen().len();
    let started = Instant::now();
    const N: u64 = 400;
    let tally = traffic::send(&stack.url, N as usize, 8).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(tally.total, N);
    assert_eq!(
        tally.failures(),
        0,
        "every request gets exactly one good response: {tally:?}"
    );

    let p99 = percentile(tally.latencies.clone(), 99.0);
    let p50 = percentile(tally.latencies.clone(), 50.0);
    // Unhedged, 5% of requests (about 20 of 400, rarely under 12) take
    // 300 ms. Hedged, a request is slow only when its hedge is slow too
    // (0.25%) or the hedge could not help in time: at most 2% allowed, so
    // a scheduling hiccup on this shared machine does not fail the test,
    // while no hedging at all still does.
    let slow = tally
        .latencies
        .iter()
        .filter(|l| **l >= Duration::from_millis(250))
        .count();
    eprintln!(
        "hedged: p50 {p50:?}, p99 {p99:?}, {slow} of {N} at 250 ms or more (upstream tail 300 ms)"
    );
    assert!(
        slow as u64 <= N / 50,
        "{slow} of {N} requests took 250 ms or more (p99 {p99:?}): the tail was not cut"
    );

    let sent = counter(&stack, &stat("all", "sent")).await?;
    let extra = stack.stable.state.requests() - upstream_before - N;
    assert_eq!(extra, sent, "each hedge is one extra upstream request");
    assert!(sent > 0, "the slow 5% should have been hedged");
    // Budget: 10% of requests, plus 1/s per worker (2 workers), plus nothing up front.
    let bound = 0.10 * N as f64 + 2.0 * elapsed + 1.0;
    assert!(
        (extra as f64) <= bound,
        "{extra} extra requests, budget allows {bound:.1}"
    );
    let wins = counter(&stack, &stat("all", "hedge_wins")).await?;
    assert!(wins > 0, "some hedges should win against a 300 ms primary");
    // A winning hedge ends the stream, and Envoy resets the primary's upstream
    // request (on HTTP/1.1: closes its connection with the request active).
    let resets = counter(
        &stack,
        "cluster.demo-stable.upstream_cx_destroy_local_with_active_rq",
    )
    .await?;
    eprintln!("hedges sent {sent}, won {wins}, primaries reset {resets}");
    assert!(
        resets >= wins,
        "{resets} upstream resets for {wins} hedge wins"
    );

    // The same key on both attempts; the hedge is marked.
    let seen = stack.stable.state.seen();
    let groups = by_key(&seen[seen_before..]);
    assert!(
        !groups.contains_key(""),
        "every hedgeable request carries an Idempotency-Key"
    );
    let hedged: Vec<_> = groups.values().filter(|g| g.len() > 1).collect();
    assert_eq!(hedged.len() as u64, sent);
    for g in hedged {
        let marked = g
            .iter()
            .filter(|s| s.headers.contains_key("x-understudy-hedge"))
            .count();
        assert_eq!((g.len(), marked), (2, 1), "{g:?}");
    }
    tables_drain(&stack).await?;

    // A budget below the slow share binds: 2% of requests may be hedged
    // while 5% are slow, so hedges stop at the budget and the refusals are
    // counted. (At 10% above, the budget never ran out.)
    stack
        .put_filter_config(hedge_config(json!({
            "cluster": "demo-stable",
            "delay": {"fixed": {"ms": 40}},
            "budget": {"percent": 2, "per_second_floor": 0, "burst": 1}
        })))
        .await?;
    let sent_before = counter(&stack, &stat("all", "sent")).await?;
    let exhausted_before = counter(&stack, &stat("all", "budget_exhausted")).await?;
    let upstream_before = stack.stable.state.requests();
    let tally = traffic::send(&stack.url, N as usize, 8).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    let sent = counter(&stack, &stat("all", "sent")).await? - sent_before;
    let extra = stack.stable.state.requests() - upstream_before - N;
    assert_eq!(extra, sent, "each hedge is one extra upstream request");
    // Each worker's bucket starts empty and earns 0.02 per request.
    let bound = (0.02 * N as f64).floor() as u64;
    let exhausted = counter(&stack, &stat("all", "budget_exhausted")).await? - exhausted_before;
    eprintln!("2% budget: {sent} hedges (bound {bound}), {exhausted} refused");
    assert!(sent <= bound, "{sent} hedges, a 2% budget allows {bound}");
    assert!(sent > 0, "the budget allows some hedges");
    assert!(exhausted > 0, "5% slow against a 2% budget must exhaust it");
    tables_drain(&stack).await?;
    Ok(())
}

/// POST without a key is never hedged; with a key it is, carrying body and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_need_an_idempotency_key() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(slow(100.0, 200, 0))?;
    stack
        .put_filter_config(hedge_config(json!({
            "cluster": "demo-stable",
            "delay": {"fixed": {"ms": 30}},
            "budget": {"percent": 100, "per_second_floor": 10}
        })))
        .await?;
    let before = stack.stable.state.requests();
    for i in 0..5 {
        let r = stack
            .http
            .post(&stack.url)
            .body(format!("order {i}"))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        stack.stable.state.requests() - before,
        5,
        "no POST without a key is hedged"
    );
    assert_eq!(
        counter(&stack, &stat("all", "not_hedged.unsafe_method")).await?,
        5
    );
    assert_eq!(counter(&stack, &stat("all", "sent")).await?, 0);

    let seen_before = stack.stable.state.seen().len();
    for i in 0..5 {
        let r = stack
            .http
            .post(&stack.url)
            .header("idempotency-key", format!("order-{i}"))
            .body(format!("order {i}"))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        r.bytes().await?;
    }
    assert_eq!(counter(&stack, &stat("all", "sent")).await?, 5);
    let seen = stack.stable.state.seen();
    let groups = by_key(&seen[seen_before..]);
    for i in 0..5 {
        let g = groups
            .get(&format!("order-{i}"))
            .context("key missing upstream")?;
        assert_eq!(g.len(), 2, "primary and hedge carry the client's key");
        assert!(
            g.iter()
                .all(|s| s.method == "POST" && s.body_len == format!("order {i}").len())
        );
    }
    tables_drain(&stack).await?;
    Ok(())
}

/// A 409 from the hedge is not fatal: the primary's success reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_on_the_hedge_waits_for_the_primary() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(slow(100.0, 200, 0))?;
    stack.canary.state.set_behavior(Behavior {
        error_rate: 1.0,
        error_status: Some(409),
        ..Default::default()
    })?;
    stack
        .put_filter_config(hedge_config(json!({
            "cluster": "demo-canary",
            "delay": {"fixed": {"ms": 20}},
            "budget": {"percent": 100, "per_second_floor": 10}
        })))
        .await?;
    for _ in 0..4 {
        let r = stack.http.get(&stack.url).send().await?;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-upstream-version"],
            "v1",
            "the primary's answer"
        );
    }
    assert_eq!(counter(&stack, &stat("all", "sent")).await?, 4);
    assert_eq!(
        stack.canary.state.requests(),
        4,
        "the hedges went to the alternate cluster"
    );
    assert_eq!(counter(&stack, &stat("all", "hedge_wins")).await?, 0);
    assert_eq!(counter(&stack, &stat("all", "primary_wins")).await?, 4);
    tables_drain(&stack).await?;
    Ok(())
}

/// With no budget, nothing is hedged and each refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_stops_hedging() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(slow(100.0, 60, 0))?;
    stack
        .put_filter_config(hedge_config(json!({
            "cluster": "demo-stable",
            "delay": {"fixed": {"ms": 10}},
            "budget": {"percent": 0, "per_second_floor": 0}
        })))
        .await?;
    let before = stack.stable.state.requests();
    let tally = traffic::send(&stack.url, 20, 4).await;
    assert_eq!(tally.failures(), 0);
    assert_eq!(stack.stable.state.requests() - before, 20);
    assert_eq!(counter(&stack, &stat("all", "sent")).await?, 0);
    assert_eq!(counter(&stack, &stat("all", "budget_exhausted")).await?, 20);
    tables_drain(&stack).await?;
    Ok(())
}

/// An invalid hedge config is refused by the API with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_hedge_configs_are_refused() -> Result<()> {
    let stack = Stack::start().await?;
    for (hedge, needle) in [
        (
            json!({"cluster": "demo-stable", "max_attempts": 0}),
            "routes[0].hedge.max_attempts",
        ),
        (
            json!({"cluster": "demo-stable", "budget": {"percent": 150}}),
            "routes[0].hedge.budget.percent",
        ),
        (
            json!({"cluster": "demo-stable", "delay": {"adaptive": {"min_ms": 50, "max_ms": 5}}}),
            "above the ceiling",
        ),
    ] {
        let body = json!({"wasm_path": "/ignored.wasm", "config": hedge_config(hedge)});
        let (status, answer) = stack.api_put("/v1/filter", &body).await?;
        assert_eq!(status, 400, "{answer}");
        let msg = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{msg}");
    }
    Ok(())
}

fn dedupe_stat(what: &str) -> String {
    format!("wasmcustom.understudy.dedupe.all.{what}")
}

/// Inbound mode: a duplicate after completion is answered from the store, a
/// concurrent duplicate gets 409, the same key with another body gets 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_duplicates_are_suppressed() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(json!({"routes": [{"name": "all", "path_prefix": "/", "dedupe": {"ttl_s": 60, "max_entries": 1000}}]}))
        .await?;
    stack.stable.state.set_behavior(Behavior {
        body: Some(json!({"order": 17, "charged": "49.90"})),
        ..Default::default()
    })?;
    let post = |key: &str, body: &str| {
        stack
            .http
            .post(format!("{}orders", stack.url))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    let before = stack.stable.state.requests();
    let first = post("pay-1", r#"{"amount": 49.90}"#).await?;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.text().await?;
    // The response is stored when it ends; the duplicate then gets it back.
    wait::until(
        "the first response to be stored",
        Duration::from_secs(5),
        || async { Ok((stack.envoy.stat(&dedupe_stat("stored")).await? == Some(1)).then_some(())) },
    )
    .await?;
    let again = post("pay-1", r#"{"amount": 49.90}"#).await?;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.text().await?,
        first_body,
        "the stored response, byte for byte"
    );
    assert_eq!(
        stack.stable.state.requests() - before,
        1,
        "the upstream saw the request once"
    );

    // Same key, different payload.
    let other = post("pay-1", r#"{"amount": 99.00}"#).await?;
    assert_eq!(other.status(), 422);
    assert_eq!(stack.stable.state.requests() - before, 1);

    // A duplicate while the first is still in flight.
    stack.stable.state.set_behavior(slow(100.0, 1500, 0))?;
    let slow_first = tokio::spawn({
        let (http, url) = (stack.http.clone(), format!("{}orders", stack.url));
        async move {
            http.post(url)
                .header("idempotency-key", "pay-2")
                .body("x")
                .send()
                .await
        }
    });
    wait::until(
        "the first request to reach the upstream",
        Duration::from_secs(5),
        || async { Ok((stack.stable.state.requests() - before == 2).then_some(())) },
    )
    .await?;
    let dup = post("pay-2", "x").await?;
    assert_eq!(dup.status(), 409);
    let first = slow_first.await??;
    assert_eq!(first.status(), 200);
    assert_eq!(stack.stable.state.requests() - before, 2);

    for (what, n) in [("replayed", 1), ("mismatch_422", 1), ("in_flight_409", 1)] {
        assert_eq!(
            stack.envoy.stat(&dedupe_stat(what)).await?,
            Some(n),
            "{what}"
        );
    }
    // A request without a key is not affected.
    let plain = stack
        .http
        .post(format!("{}orders", stack.url))
        .body("y")
        .send()
        .await?;
    assert_eq!(plain.status(), 200);
    Ok(())
}

/// The primary fails while a hedge is out: its 5xx is held; a good hedge
/// replaces it, and when every attempt fails the client gets the primary's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_primary_waits_for_the_hedge() -> Result<()> {
    let stack = Stack::start().await?;
    let failing = |ms: u64, status: u16| Behavior {
        latency: vec![LatencyBand { pct: 100.0, ms }],
        error_rate: 1.0,
        error_status: Some(status),
        ..Default::default()
    };
    stack.stable.state.set_behavior(failing(80, 503))?;
    stack.canary.state.set_behavior(slow(100.0, 200, 0))?;
    stack
        .put_filter_config(hedge_config(json!({
            "cluster": "demo-canary",
            "delay": {"fixed": {"ms": 20}},
            "budget": {"percent": 100, "per_second_floor": 10}
        })))
        .await?;
    let r = stack.http.get(&stack.url).send().await?;
    assert_eq!(r.status(), 200, "the hedge's success replaces the held 503");
    assert_eq!(r.headers()["x-upstream-version"], "v2");
    assert_eq!(r.headers()["x-understudy-hedge"], "won");

    stack.canary.state.set_behavior(failing(200, 502))?;
    let r = stack.http.get(&stack.url).send().await?;
    assert_eq!(
        r.status(),
        503,
        "every attempt failed: the primary's answer"
    );
    assert_eq!(r.headers()["x-upstream-version"], "v1");
    assert_eq!(r.text().await?, r#"{"error":"injected"}"#, "with its body");
    assert_eq!(counter(&stack, &stat("all", "hedge_wins")).await?, 1);
    assert_eq!(counter(&stack, &stat("all", "primary_wins")).await?, 1);
    tables_drain(&stack).await?;
    Ok(())
}

/// The adaptive delay starts at `initial_ms` and then tracks the configured
/// percentile of observed latency, shown in the `delay_ms` gauge. The
/// upstream is bimodal (30% of answers at 150 ms, the rest at 5 ms), so the
/// percentile matters: the route at p50 waits about the fast mode, the route
/// at p90 about the slow one. One delay for both, or the wrong percentile,
/// fails one of the two.
///
/// Each Envoy worker keeps its own window and the gauge shows whichever
/// worker wrote last, so every worker needs enough samples for its p90 to
/// land in the slow mode: 400 requests and `min_samples` 30 make a worker
/// with too few slow answers (p90 in the fast mode) a 1-in-500 event even
/// if the kernel gives one worker only 1 of the 8 connections (with 160
/// requests and `min_samples` 10 it was about 1 in 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_delay_tracks_its_percentile() -> Result<()> {
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(slow(30.0, 150, 5))?;
    let route = |name: &str, percentile: u32| {
        json!({"name": name, "path_prefix": format!("/{name}"), "hedge": {
            "cluster": "demo-stable",
            "delay": {"adaptive": {"percentile": percentile, "initial_ms": 400, "min_ms": 1,
                                   "max_ms": 1000, "min_samples": 30, "window_s": 30}},
            "budget": {"percent": 0, "per_second_floor": 0}
        }})
    };
    stack
        .put_filter_config(json!({"routes": [route("p50", 50), route("p90", 90)]}))
        .await?;
    for name in ["p50", "p90"] {
        let tally = traffic::send(&format!("{}{name}/x", stack.url), 400, 8).await;
        assert_eq!(tally.failures(), 0, "{tally:?}");
    }
    let delay = |name: &'static str| {
        let stack = &stack;
        async move {
            wait::until(
                &format!("the {name} delay gauge to leave its initial 400 ms"),
                Duration::from_secs(5),
                || async {
                    let d = stack.envoy.stat(&stat(name, "delay_ms")).await?;
                    Ok(d.filter(|d| *d != 400))
                },
            )
            .await
        }
    };
    let p50 = delay("p50").await?;
    let p90 = delay("p90").await?;
    assert!(
        (1..60).contains(&p50),
        "p50 of a 70% fast (5 ms) mode: {p50} ms"
    );
    assert!(
        (140..400).contains(&p90),
        "p90 of a 30% slow (150 ms) mode: {p90} ms"
    );
    for name in ["p50", "p90"] {
        assert_eq!(
            counter(&stack, &stat(name, "sent")).await?,
            0,
            "no budget, no hedges"
        );
    }
    tables_drain(&stack).await?;
    Ok(())
}
