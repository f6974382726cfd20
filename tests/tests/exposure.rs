//! How a change is exposed, end to end with real Envoys (issue 18): sticky
//! users, one version per user on every request and every Envoy, and a
//! growing weight that only moves users onto the canary; cohort steps, where
//! only a cohort sees the canary until a rollback takes it away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::envoy::Envoy;
use understudy_e2e::rollouts::{create, rollout};
use understudy_e2e::stack::{SERVICE, Stack};
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

const USERS: usize = 1_000;
const REQUESTS_PER_USER: usize = 20;

/// Waits until `envoy` routes `canary`% to the canary (order-free: a sticky
/// route lists the canary first).
async fn wait_canary(envoy: &Envoy, canary: u64) -> Result<()> {
    let want = vec![
        (format!("{SERVICE}-canary"), canary),
        (format!("{SERVICE}-stable"), 100 - canary),
    ];
    wait::until(
        &format!("Envoy to route {canary}% to the canary"),
        Duration::from_secs(10),
        || async {
            let mut got = envoy.route_weights().await?;
            got.sort();
            Ok((got == want).then_some(()))
        },
    )
    .await
}

/// Requests the Envoy passed to either backend.
async fn upstream_requests(envoy: &Envoy) -> Result<u64> {
    let mut total = 0;
    for side in ["stable", "canary"] {
        total += envoy
            .stat(&format!("cluster.{SERVICE}-{side}.upstream_rq_total"))
            .await?
            .unwrap_or(0);
    }
    Ok(total)
}

/// Sends `per_user` GETs for each of [`USERS`] users (`x-user-id:
/// user-<n>`), users interleaved, 32 at a time, each on a new connection so
/// that the kernel spreads them over both Envoys' listeners (SO_REUSEPORT).
/// Returns each user's versions (`x-upstream-version`).
async fn send_as_users(url: &str, per_user: usize) -> Result<BTreeMap<usize, BTreeSet<String>>> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let jobs: Vec<usize> = (0..per_user).flat_map(|_| 0..USERS).collect();
    let jobs = Arc::new(jobs);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen: Arc<Mutex<BTreeMap<usize, BTreeSet<String>>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (http, url, jobs, next, seen) = (
            http.clone(),
            url.to_owned(),
            jobs.clone(),
            next.clone(),
            seen.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&user) = jobs.get(i) else {
                    return Ok::<(), anyhow::Error>(());
                };
                let r = http
                    .get(format!("{url}orders/{i}"))
                    .header("x-user-id", format!("user-{user}"))
                    .send()
                    .await?;
                ensure!(r.status() == 200, "user-{user}: {}", r.status());
                let version = r
                    .headers()
                    .get("x-upstream-version")
                    .and_then(|v| v.to_str().ok())
                    .context("no x-upstream-version")?
                    .to_owned();
                r.bytes().await?;
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(user)
                    .or_default()
                    .insert(version);
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(seen)
}

/// Users on the canary (`v2`); fails if any user saw both versions.
fn canary_users(seen: &BTreeMap<usize, BTreeSet<String>>) -> Result<BTreeSet<usize>> {
    ensure!(
        seen.len() == USERS,
        "{} of {USERS} users answered",
        seen.len()
    );
    let flipped: Vec<_> = seen.iter().filter(|(_, v)| v.len() != 1).collect();
    ensure!(
        flipped.is_empty(),
        "{} users saw both versions, e.g. {:?}",
        flipped.len(),
        flipped.first()
    );
    Ok(seen
        .iter()
        .filter(|(_, v)| v.contains("v2"))
        .map(|(u, _)| *u)
        .collect())
}

/// 99.9% two-sided binomial bound on the number of canary users at `pct`.
fn within_binomial(canary: usize, pct: f64) -> bool {
    let (n, p) = (USERS as f64, pct / 100.0);
    let sd = (n * p * (1.0 - p)).sqrt();
    (canary as f64 - n * p).abs() <= 3.29 * sd
}

/// `sticky: {header: x-user-id}`: 1,000 users with 20 requests each through
/// two Envoys. Every user sees one version; at weight 20 the canary's share
/// of users is within a binomial bound; raising the weight to 50 moves no
/// user from canary back to stable. A bad key is refused and the service
/// keeps working; a request without the key is served (split at random).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_stay_on_one_version_on_every_envoy_as_the_weight_grows() -> Result<()> {
    let stack = Stack::start().await?;
    let second = stack.another_envoy("e2e-envoy-2").await?;
    let path = format!("/v1/services/{SERVICE}");
    let mut service: Value = stack.api_get(&path).await?;

    // A header name Envoy would not match is refused; nothing changes.
    service["sticky"] = json!({"header": "X-User-Id"});
    let (status, answer) = stack.api_put(&path, &service).await?;
    assert_eq!(status, 400, "{answer}");
    assert!(stack.api_get(&path).await?.get("sticky").is_none());

    service["sticky"] = json!({"header": "x-user-id"});
    service["canary_weight"] = json!(20);
    let (status, answer) = stack.api_put(&path, &service).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["sticky"], json!({"header": "x-user-id"}));
    for envoy in [&stack.envoy, &second] {
        wait_canary(envoy, 20).await?;
    }

    let before = [
        upstream_requests(&stack.envoy).await?,
        upstream_requests(&second).await?,
    ];
    let at_20 = canary_users(&send_as_users(&stack.url, REQUESTS_PER_USER).await?)?;
    eprintln!("weight 20: {} of {USERS} users on the canary", at_20.len());
    assert!(
        within_binomial(at_20.len(), 20.0),
        "{} of {USERS} users on the canary at weight 20",
        at_20.len()
    );
    // Both Envoys carried a large share: a user's 20 connections all
    // landing on one Envoy has probability about 2 × 2⁻²⁰, so the users'
    // agreement is across Envoys.
    let total = (USERS * REQUESTS_PER_USER) as u64;
    for (i, envoy) in [&stack.envoy, &second].into_iter().enumerate() {
        let served = upstream_requests(envoy).await? - before[i];
        assert!(
            served >= total / 5,
            "Envoy {i} served {served} of {total} requests"
        );
    }

    let (status, answer) = stack.set_weight(json!(50)).await?;
    assert_eq!(status, 200, "{answer}");
    for envoy in [&stack.envoy, &second] {
        wait_canary(envoy, 50).await?;
    }
    let at_50 = canary_users(&send_as_users(&stack.url, REQUESTS_PER_USER / 2).await?)?;
    eprintln!("weight 50: {} of {USERS} users on the canary", at_50.len());
    let moved_back: Vec<_> = at_20.difference(&at_50).collect();
    assert!(
        moved_back.is_empty(),
        "{} users went from canary back to stable, e.g. {:?}",
        moved_back.len(),
        moved_back.first()
    );
    assert!(
        within_binomial(at_50.len(), 50.0),
        "{} of {USERS} users on the canary at weight 50",
        at_50.len()
    );

    // No key: still served, by either version.
    let tally = understudy_e2e::traffic::send(&stack.url, 50, 4).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    Ok(())
}

/// One GET through Envoy, as a member of the `internal` cohort or not:
/// the status and the version that answered.
async fn get_as(http: &reqwest::Client, url: &str, internal: bool) -> Result<(u16, String)> {
    let group = if internal { "internal" } else { "external" };
    let r = http
        .get(format!("{url}cohort"))
        .header("x-user-group", group)
        .send()
        .await?;
    let status = r.status().as_u16();
    let version = r
        .headers()
        .get("x-upstream-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    r.bytes().await?;
    Ok((status, version))
}

/// `n` requests of one kind: how many each version answered.
async fn versions_of(
    http: &reqwest::Client,
    url: &str,
    internal: bool,
    n: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (status, version) = get_as(http, url, internal).await?;
        ensure!(
            status == 200,
            "internal={internal}: {status} from {version}"
        );
        *seen.entry(version).or_default() += 1;
    }
    Ok(seen)
}

/// Waits up to `within` for the cohort's requests to reach `version`, then
/// checks that 50 of 50 do.
async fn cohort_settles_on(
    http: &reqwest::Client,
    url: &str,
    version: &str,
    within: Duration,
) -> Result<()> {
    wait::until(&format!("the cohort on {version}"), within, || async {
        Ok((get_as(http, url, true).await?.1 == version).then_some(()))
    })
    .await?;
    assert_eq!(
        versions_of(http, url, true, 50).await?,
        BTreeMap::from([(version.to_owned(), 50)])
    );
    Ok(())
}

/// A cohort step (`x-user-group: internal`) at weight 0: the cohort's
/// requests, and only they, reach the canary. When the canary then fails
/// them, the judge rolls back on the cohort's evidence, and the cohort's
/// route is gone with the weight: the cohort is back on stable at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cohort_step_exposes_only_the_cohort_and_a_rollback_takes_it_away() -> Result<()> {
    let stack = Stack::start().await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let r = create(
        &stack,
        &json!({
            "service": SERVICE,
            "owner": "team-e2e",
            "stop_rules": {"max_error_rate_increase_pp": 2.0},
            "steps": [
                {"cohort": {"header": {"name": "x-user-group", "value": "internal"}},
                 "min_duration_s": 600, "min_requests": 100000},
                {"weight": 100},
            ],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20},
        }),
    )
    .await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    cohort_settles_on(&http, &stack.url, "v2", Duration::from_secs(10)).await?;
    assert_eq!(
        versions_of(&http, &stack.url, false, 50).await?,
        BTreeMap::from([("v1".to_owned(), 50)])
    );
    assert_eq!(stack.canary_weight().await?, 0);

    // The canary fails the cohort: rolled back on the cohort's evidence.
    stack.canary.state.set_behavior(Behavior {
        error_rate: 1.0,
        ..Default::default()
    })?;
    let ended = wait::until(
        "the rollout to end on the cohort's errors",
        Duration::from_secs(60),
        || async {
            for internal in [true, false, false] {
                get_as(&http, &stack.url, internal).await?;
            }
            let r = rollout(&stack, &id).await?;
            let state = r["phase"]["state"].as_str().unwrap_or_default().to_owned();
            Ok((state != "canary").then_some(r))
        },
    )
    .await?;
    assert_eq!(ended["phase"]["state"], "rolled_back", "{ended:#}");
    let reason = ended["phase"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("canary 5xx "), "{reason}");
    // The cohort's route went with the rollback: stable answers it, with
    // no wait beyond Envoy applying the route.
    cohort_settles_on(&http, &stack.url, "v1", Duration::from_secs(5)).await?;
    let svc = stack.api_get(&format!("/v1/services/{SERVICE}")).await?;
    assert!(svc.get("canary_cohorts").is_none(), "{svc}");
    Ok(())
}
