//! Shadow sampling, end to end with real Envoys: `percent` samples at its
//! rate (within a binomial bound), and `sample_key` makes one user always in
//! or always out on every worker of every Envoy.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::envoy::Envoy;
use understudy_e2e::stack::Stack;
use understudy_e2e::{traffic, wait};

const ROUTE: &str = "orders";

fn shadow_config(shadow: Value) -> Value {
    let mut s = json!({"cluster": "demo-canary"});
    if let (Some(s), Some(extra)) = (s.as_object_mut(), shadow.as_object()) {
        s.extend(extra.clone());
    }
    json!({"routes": [{"name": ROUTE, "path_prefix": "/", "shadow": s}]})
}

async fn counter(envoy: &Envoy, what: &str) -> Result<u64> {
    Ok(envoy
        .stat(&format!("wasmcustom.understudy.shadow.{ROUTE}.{what}"))
        .await?
        .unwrap_or(0))
}

/// `(compared, not_sampled)` of one Envoy.
async fn decisions(envoy: &Envoy) -> Result<(u64, u64)> {
    Ok((
        counter(envoy, "compared").await?,
        counter(envoy, "not_sampled").await?,
    ))
}

/// Shadow copies the canary upstream received (not its control paths).
fn copies(stack: &Stack) -> usize {
    stack
        .canary
        .state
        .seen()
        .iter()
        .filter(|s| !s.path.starts_with("/_upstream"))
        .count()
}

/// At 10%, 2,000 requests shadow Binomial(2000, 0.1) of them: mean 200,
/// sd 13.4. The bound is ±5 sd (a false failure about once in 1.7 million
/// runs); 5% or 20% sampling lands far outside it. Every request is counted
/// once, as compared or as not sampled, and the canary got exactly the
/// copies the filter sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_sampling_lands_within_a_binomial_bound() -> Result<()> {
    const N: u64 = 2000;
    let stack = Stack::start().await?;
    stack
        .put_filter_config(shadow_config(json!({"percent": 10})))
        .await?;
    let tally = traffic::send(&format!("{}orders/1", stack.url), N as usize, 8).await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    let (compared, not_sampled) = wait::until(
        "every request to be compared or counted as not sampled",
        Duration::from_secs(20),
        || async {
            let (c, n) = decisions(&stack.envoy).await?;
            Ok((c + n >= N).then_some((c, n)))
        },
    )
    .await?;
    assert_eq!(compared + not_sampled, N, "each request counted once");
    let sd = (N as f64 * 0.1 * 0.9).sqrt();
    let (lo, hi) = (
        (N as f64 * 0.1 - 5.0 * sd) as u64,
        (N as f64 * 0.1 + 5.0 * sd) as u64,
    );
    assert!(
        (lo..=hi).contains(&compared),
        "{compared} of {N} sampled; 10% within ±5 sd is {lo}..={hi}"
    );
    assert_eq!(counter(&stack.envoy, "sent").await?, compared);
    assert_eq!(
        copies(&stack) as u64,
        compared,
        "copies the canary received"
    );
    Ok(())
}

/// Two Envoys, one listener port (SO_REUSEPORT), a fresh connection per
/// request: each request lands on either Envoy and either worker. With
/// `sample_key: x-user-id` at 50%, every user's requests are all shadowed
/// or all not, whichever Envoy took them; users split both ways, and most
/// users' requests met both Envoys (so the agreement is across Envoys, not
/// only within one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_key_decides_the_same_on_every_envoy() -> Result<()> {
    const USERS: usize = 24;
    const PER_USER: usize = 6;
    let stack = Stack::start().await?;
    let second = stack.another_envoy("e2e-envoy-2").await?;
    stack
        .put_filter_config(shadow_config(
            json!({"percent": 50, "sample_key": "x-user-id"}),
        ))
        .await?;
    // The second Envoy has the same config (both ACKed the same version).
    wait::until(
        "both Envoys to run the shadowing config",
        Duration::from_secs(15),
        || async {
            let all = stack.api_get("/v1/envoys").await?;
            let envoys = all["envoys"].as_array().cloned().unwrap_or_default();
            let acked: Vec<&Value> = envoys
                .iter()
                .map(|e| &e["types"]["ecds"]["acked_version"])
                .collect();
            Ok((envoys.len() == 2 && acked[0] == acked[1] && !acked[0].is_null()).then_some(()))
        },
    )
    .await?;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let envoys = [&stack.envoy, &second];
    // user -> [(envoy index, shadowed?)]
    let mut seen: BTreeMap<String, Vec<(usize, bool)>> = BTreeMap::new();
    for round in 0..PER_USER {
        for u in 0..USERS {
            let user = format!("user-{u}");
            let mut before = Vec::new();
            for e in envoys {
                before.push(decisions(e).await?);
            }
            let r = fresh
                .get(format!("{}orders/{round}", stack.url))
                .header("x-user-id", &user)
                .send()
                .await?;
            ensure!(r.status() == 200, "{user}: {}", r.status());
            r.bytes().await?;
            // Which Envoy decided, and what: the one whose counters moved.
            let decided = wait::until(
                &format!("a decision for {user}'s request"),
                Duration::from_secs(10),
                || async {
                    for (i, e) in envoys.iter().enumerate() {
                        let (c, n) = decisions(e).await?;
                        let (c0, n0) = before[i];
                        if c > c0 || n > n0 {
                            ensure!(c + n == c0 + n0 + 1, "more than one decision moved");
                            return Ok(Some((i, c > c0)));
                        }
                    }
                    Ok(None)
                },
            )
            .await?;
            seen.entry(user).or_default().push(decided);
        }
    }
    let mut sampled_users = 0;
    let mut both_envoys = 0;
    for (user, d) in &seen {
        let first = d[0].1;
        assert!(
            d.iter().all(|(_, s)| *s == first),
            "{user} was sampled on some requests and not on others: {d:?}"
        );
        sampled_users += usize::from(first);
        if d.iter().any(|(e, _)| *e == 0) && d.iter().any(|(e, _)| *e == 1) {
            both_envoys += 1;
        }
    }
    assert!(
        (1..USERS).contains(&sampled_users),
        "{sampled_users} of {USERS} users sampled at 50%"
    );
    // Each user's 6 connections miss one Envoy entirely with probability
    // 2 × 2⁻⁶ ≈ 3%, so nearly all users meet both.
    assert!(
        both_envoys >= USERS / 2,
        "only {both_envoys} of {USERS} users reached both Envoys: {seen:?}"
    );
    Ok(())
}
