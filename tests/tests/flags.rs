//! Circuit-breaker flags end to end (issue 18): a rollout's flag, read
//! over OFREP as an OpenFeature SDK reads it, is on for exactly the users
//! a real Envoy sends to the canary, and an OpenFeature-style polling
//! client sees it turn off within one poll of the rollback.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::controlplane::VIEWER_TOKEN;
use understudy_e2e::rollouts::{create, rollout};
use understudy_e2e::stack::{SERVICE, Stack, api_client};
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

const FLAG: &str = "new-checkout";
const USERS: usize = 300;
/// The polling client's interval (OpenFeature's OFREP providers poll the
/// bulk endpoint; 200 ms is a short setting of theirs).
const POLL: Duration = Duration::from_millis(200);
/// Evaluations are paced under the API's per-caller rate (50/s).
const PACE: Duration = Duration::from_millis(25);

/// Waits until Envoy routes `canary`% to the canary.
async fn wait_canary(stack: &Stack, canary: u64) -> Result<()> {
    wait::until(
        &format!("Envoy to route {canary}% to the canary"),
        Duration::from_secs(10),
        || async { Ok((stack.canary_weight().await? == canary).then_some(())) },
    )
    .await
}

/// One GET through Envoy as `user`: the version that answered.
async fn version_for(http: &reqwest::Client, url: &str, user: &str) -> Result<String> {
    let r = http
        .get(format!("{url}checkout"))
        .header("x-user-id", user)
        // A client's own value never reaches the app.
        .header("x-understudy-flags", "new-checkout=forged")
        .send()
        .await?;
    ensure!(r.status() == 200, "{user}: {}", r.status());
    let v = r
        .headers()
        .get("x-upstream-version")
        .and_then(|v| v.to_str().ok())
        .context("no x-upstream-version")?
        .to_owned();
    r.bytes().await?;
    Ok(v)
}

/// An OFREP call as a viewer: status, ETag and body (`Null` when empty).
async fn ofrep(
    viewer: &reqwest::Client,
    url: String,
    body: &str,
    if_none_match: Option<&str>,
) -> Result<(u16, Option<String>, Value)> {
    let mut req = viewer
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(tag) = if_none_match {
        req = req.header("if-none-match", tag);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = r.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("{status}: {text:?}"))?
    };
    Ok((status, etag, body))
}

fn context_of(user: &str) -> String {
    json!({"context": {"targetingKey": user}}).to_string()
}

/// What the polling client saw: (Unix ms when the answer arrived, value).
type Seen = Arc<Mutex<Vec<(u64, bool)>>>;

fn now_ms() -> u64 {
    understudy_controlplane::time::now_unix_ms()
}

/// An OpenFeature-style polling client: the bulk endpoint every [`POLL`]
/// with `If-None-Match`, keeping the last value of [`FLAG`] it was given.
fn spawn_poller(viewer: reqwest::Client, url: String, user: String, seen: Seen) {
    tokio::spawn(async move {
        let mut etag: Option<String> = None;
        let mut ticker = tokio::time::interval(POLL);
        loop {
            ticker.tick().await;
            let Ok((status, tag, body)) =
                ofrep(&viewer, url.clone(), &context_of(&user), etag.as_deref()).await
            else {
                continue;
            };
            let at = now_ms();
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            match status {
                200 => {
                    etag = tag;
                    let value = body["flags"]
                        .as_array()
                        .and_then(|f| f.iter().find(|i| i["key"] == FLAG))
                        .and_then(|i| i["value"].as_bool());
                    if let Some(v) = value {
                        seen.push((at, v));
                    }
                }
                // Not modified: the client keeps its value.
                304 => {
                    if let Some(&(_, v)) = seen.last() {
                        seen.push((at, v));
                    }
                }
                _ => {}
            }
        }
    });
}

/// A sticky service (`x-user-id`) and a rollout with flag `new-checkout` at
/// weight 20. (a) For 300 users, the flag's value over OFREP (single and
/// bulk) equals whether Envoy routed the user to the canary. (c) No token
/// is 401, a bad body 400, and the service keeps answering. (b) An
/// OpenFeature-style client polling every 200 ms sees the flag turn off
/// within one poll of the rollback the judge records when the canary fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_follows_envoys_split_and_turns_off_within_one_poll_of_a_rollback() -> Result<()> {
    let stack = Stack::start().await?;
    let path = format!("/v1/services/{SERVICE}");
    let mut service: Value = stack.api_get(&path).await?;
    service["sticky"] = json!({"header": "x-user-id"});
    let (status, answer) = stack.api_put(&path, &service).await?;
    assert_eq!(status, 200, "{answer}");
    let r = create(
        &stack,
        &json!({
            "service": SERVICE,
            "owner": "team-e2e",
            "stop_rules": {"max_error_rate_increase_pp": 2.0},
            "steps": [
                {"weight": 20, "min_duration_s": 600, "min_requests": 100000},
                {"weight": 100},
            ],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20},
            "flags": [{"key": FLAG, "description": "the new checkout code path"}],
        }),
    )
    .await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    wait_canary(&stack, 20).await?;

    // (a) Envoy's choice against the flag, user by user.
    let viewer = api_client(VIEWER_TOKEN)?;
    let single = stack
        .cp
        .api_url(&format!("/ofrep/v1/evaluate/flags/{FLAG}"));
    let bulk = stack.cp.api_url("/ofrep/v1/evaluate/flags");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut pace = tokio::time::interval(PACE);
    let (mut on_canary, mut flag_on, mut disagree) = (0, 0, Vec::new());
    let mut canary_user = None;
    for i in 0..USERS {
        let user = format!("user-{i}");
        let version = version_for(&http, &stack.url, &user).await?;
        // Envoy's choice is per key: a second request agrees.
        ensure!(version_for(&http, &stack.url, &user).await? == version);
        pace.tick().await;
        let value = if i % 2 == 0 {
            let (status, _, b) = ofrep(&viewer, single.clone(), &context_of(&user), None).await?;
            ensure!(status == 200, "{user}: {status} {b}");
            ensure!(b["key"] == FLAG && b["reason"] == "SPLIT", "{b}");
            ensure!(b["metadata"]["rollout"] == id.as_str(), "{b}");
            b["value"].as_bool().context("no value")?
        } else {
            let (status, _, b) = ofrep(&viewer, bulk.clone(), &context_of(&user), None).await?;
            ensure!(status == 200, "{user}: {status} {b}");
            b["flags"][0]["value"].as_bool().context("no value")?
        };
        let canary = version == "v2";
        on_canary += usize::from(canary);
        flag_on += usize::from(value);
        if canary {
            canary_user.get_or_insert(user.clone());
        }
        if value != canary {
            disagree.push((user, version, value));
        }
    }
    eprintln!(
        "weight 20: {on_canary} of {USERS} users on the canary, flag on for {flag_on}, {} disagreements",
        disagree.len()
    );
    assert!(disagree.is_empty(), "flag and Envoy disagree: {disagree:?}");
    // What the apps received: the route's header for the branch taken,
    // never the client's.
    let mut headers = BTreeMap::new();
    for (side, want) in [
        (&stack.stable, "new-checkout=off"),
        (&stack.canary, "new-checkout=on"),
    ] {
        for seen in side.state.seen() {
            if seen.path != "/checkout" {
                continue;
            }
            let got = seen.headers.get("x-understudy-flags").cloned();
            *headers.entry((want, got.clone())).or_insert(0) += 1;
            assert_eq!(got.as_deref(), Some(want), "{seen:?}");
        }
    }
    eprintln!("x-understudy-flags at the upstreams (want, got): count = {headers:?}");
    assert_eq!(headers.values().sum::<usize>(), 2 * USERS);
    assert!(
        (30..=95).contains(&on_canary),
        "{on_canary} of {USERS} on the canary at 20 %"
    );

    // (c) Hostile callers: refused; the flags and the service still answer.
    let anonymous = reqwest::Client::new();
    let r = anonymous
        .post(&bulk)
        .body(context_of("user-1"))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    let (status, _, b) = ofrep(&viewer, single.clone(), "{\"context\": [", None).await?;
    assert_eq!(
        (status, &b["errorCode"]),
        (400, &json!("PARSE_ERROR")),
        "{b}"
    );
    let (status, _, b) = ofrep(
        &viewer,
        bulk.clone(),
        &json!({"context": {"x": {"nested": true}}}).to_string(),
        None,
    )
    .await?;
    assert_eq!(
        (status, &b["errorCode"]),
        (400, &json!("INVALID_CONTEXT")),
        "{b}"
    );
    let (status, _, _) = ofrep(&viewer, bulk.clone(), &context_of("user-1"), None).await?;
    assert_eq!(status, 200);
    version_for(&http, &stack.url, "user-1").await?;

    // (b) A polling client for a user on the canary: the flag is on.
    let user = canary_user.context("no user on the canary")?;
    let seen: Seen = Arc::default();
    spawn_poller(
        viewer.clone(),
        bulk.clone(),
        user.clone(),
        Arc::clone(&seen),
    );
    wait::until(
        "the poller to see the flag on",
        Duration::from_secs(5),
        || async { Ok((seen.lock().unwrap().last().map(|s| s.1) == Some(true)).then_some(())) },
    )
    .await?;

    // The canary fails: the judge rolls back.
    stack.canary.state.set_behavior(Behavior {
        error_rate: 1.0,
        ..Default::default()
    })?;
    let mut n = 0;
    let ended = wait::until(
        "the rollout to end on the canary's errors",
        Duration::from_secs(60),
        || {
            n += 1;
            let (http, stack, id) = (&http, &stack, &id);
            async move {
                for k in 0..10 {
                    let _ = http
                        .get(format!("{}checkout", stack.url))
                        .header("x-user-id", format!("load-{n}-{k}"))
                        .send()
                        .await;
                }
                let r = rollout(stack, id).await?;
                let state = r["phase"]["state"].as_str().unwrap_or_default().to_owned();
                Ok((state != "canary").then_some(r))
            }
        },
    )
    .await?;
    assert_eq!(ended["phase"]["state"], "rolled_back", "{ended:#}");
    let entry = ended["audit"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["to"] == "rolled_back"))
        .context("no rolled_back audit entry")?
        .clone();
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.ends_with("; flags off: new-checkout"), "{reason}");
    let rolled_back_ms = entry["time_ms"].as_u64().context("no time_ms")?;

    let started = Instant::now();
    let off_ms = wait::until("the poller to see the flag off", POLL * 5, || async {
        Ok(seen
            .lock()
            .unwrap()
            .iter()
            .find(|(at, v)| !v && *at >= rolled_back_ms)
            .map(|(at, _)| *at))
    })
    .await?;
    let lag = off_ms.saturating_sub(rolled_back_ms);
    eprintln!(
        "rollback recorded at {rolled_back_ms}, the poller saw the flag off {lag} ms later (poll {} ms; waited {:?} here)",
        POLL.as_millis(),
        started.elapsed()
    );
    // One poll interval, plus the poll's own round trip and the time from
    // the decision's timestamp to its publication (a database write with
    // fsync, the route push) on a shared 2-core machine: 250 ms of slack.
    assert!(
        lag <= POLL.as_millis() as u64 + 250,
        "the flag turned off {lag} ms after the rollback"
    );
    // Never on again after that.
    let after: Vec<(u64, bool)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= off_ms)
        .copied()
        .collect();
    assert!(after.iter().all(|(_, v)| !v), "{after:?}");
    // Everyone gets it off now, by OFREP's reason for a tripped breaker.
    let (status, _, b) = ofrep(&viewer, single.clone(), &context_of(&user), None).await?;
    assert_eq!(status, 200);
    assert_eq!(
        (&b["value"], &b["reason"]),
        (&json!(false), &json!("DISABLED"))
    );
    Ok(())
}
