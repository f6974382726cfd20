//! Mismatches by segment, end to end (issue 18 item 5): real Envoy, the
//! filter shadowing every request with `segment_by: {header:
//! x-customer-tier, method: true}`, stable (`v1`) and a canary (`v2`) that
//! answers differently only for `x-customer-tier: gold`. The shadow stage
//! gates on its worst segment: gold breaking rolls it back although the
//! route's average stays under the limit; the API shows the breakdown; a
//! client inventing tier values ends up under `other`, with the cap held and
//! the legitimate segments exact.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::rollouts::{create, rollout};
use understudy_e2e::stack::{SERVICE, Stack};
use understudy_e2e::upstream::{Behavior, HeaderMatch};
use understudy_e2e::wait;

const TIER: &str = "x-customer-tier";
/// Tier of request `i`: 3 in 10 gold, 4 silver, 3 bronze.
fn tier(i: u64) -> &'static str {
    match i % 10 {
        0..=2 => "gold",
        3..=6 => "silver",
        _ => "bronze",
    }
}

/// Both versions answer `{"price": 10}`; the canary answers gold 500.
fn behaviors(stack: &Stack) -> Result<()> {
    let body = Behavior {
        body: Some(json!({"price": 10})),
        ..Default::default()
    };
    stack.stable.state.set_behavior(body.clone())?;
    stack.canary.state.set_behavior(Behavior {
        error_rate: 1.0,
        error_status: Some(500),
        error_only_for: Some(HeaderMatch {
            name: TIER.into(),
            value: "gold".into(),
        }),
        ..body
    })?;
    Ok(())
}

/// The `all` route shadowed to the canary, segmented by tier and method.
async fn segmented_route(stack: &Stack) -> Result<()> {
    segmented_route_with(stack, json!({"header": TIER, "method": true})).await
}

async fn segmented_route_with(stack: &Stack, segment_by: Value) -> Result<()> {
    stack
        .put_filter_config(json!({"routes": [{
            "name": "all", "path_prefix": "/",
            "shadow": {"cluster": format!("{SERVICE}-canary"), "percent": 100,
                       "segment_by": segment_by}
        }]}))
        .await
}

/// Sends `jobs` (request number, tier bytes) from 32 tasks.
async fn send_all(
    http: &reqwest::Client,
    url: &str,
    jobs: Vec<(u64, Option<Vec<u8>>)>,
) -> Result<()> {
    let jobs = Arc::new(jobs);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (http, url, jobs, next) = (http.clone(), url.to_owned(), jobs.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((i, t)) = jobs.get(k) else {
                    return Ok::<(), anyhow::Error>(());
                };
                get(&http, &url, *i, t.as_deref()).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(())
}

/// A GET with `tier` (raw bytes; `None`: no header). The client must get
/// the primary's answer whatever the shadow does.
async fn get(http: &reqwest::Client, url: &str, i: u64, tier: Option<&[u8]>) -> Result<()> {
    let mut req = http.get(format!("{url}orders/{i}"));
    if let Some(t) = tier {
        req = req.header(TIER, reqwest::header::HeaderValue::from_bytes(t)?);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let version = r
        .headers()
        .get("x-upstream-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = r.bytes().await?;
    ensure!(
        status == 200 && version == "v1" && body.as_ref() == br#"{"price":10}"#,
        "request {i}: {status} from {version:?}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// Tiered traffic (see [`tier`]) from `workers` tasks until stopped.
struct TierLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl TierLoad {
    fn start(url: &str, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let workers = (0..workers)
            .map(|_| {
                let (http, url, stop, sent) =
                    (http.clone(), url.to_owned(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let i = sent.fetch_add(1, Ordering::Relaxed);
                        get(&http, &url, i, Some(tier(i).as_bytes())).await?;
                    }
                    Ok(())
                })
            })
            .collect();
        Self {
            stop,
            sent,
            workers,
        }
    }

    async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await??;
        }
        Ok(self.sent.load(Ordering::Relaxed))
    }
}

/// The route's segments by label, once `pred` holds for the route's report.
async fn segments_when(
    stack: &Stack,
    what: &str,
    pred: impl Fn(&Value, &BTreeMap<String, Value>) -> bool,
) -> Result<(Value, BTreeMap<String, Value>)> {
    wait::until_every(
        what,
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let route = stack.api_get("/v1/shadow/routes/all").await?;
            let s = stack.api_get("/v1/shadow/routes/all/segments").await?;
            let by: BTreeMap<String, Value> = s["segments"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    (
                        v["segment"].as_str().unwrap_or_default().to_owned(),
                        v.clone(),
                    )
                })
                .collect();
            Ok(pred(&route, &by).then_some((route, by)))
        },
    )
    .await
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Gold is 30% of the traffic and the canary fails every gold request: 30%
/// unexpected on average, under the stage's 50% stop rule, but 100% in
/// `GET|gold`, over the per-segment 10%. The stage rolls back with a verdict
/// naming gold; the average check passed in the same judgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tier_breaking_rolls_the_shadow_stage_back_while_the_average_passes() -> Result<()> {
    let stack = Stack::start().await?;
    behaviors(&stack)?;
    segmented_route(&stack).await?;
    let load = TierLoad::start(&stack.url, 4);
    let r = create(
        &stack,
        &json!({
            "service": SERVICE,
            "owner": "team-e2e",
            "stop_rules": {"max_error_rate_increase_pp": 2.0, "max_unexpected_mismatch_rate": 0.5},
            "shadow": {"route": "all", "percent": 100, "min_duration_s": 600, "min_compared": 20,
                       "max_serious_rate": 0.5, "max_unexpected_rate": 0.5,
                       "per_segment": {"max_unexpected_rate": 0.1, "min_compared": 30}},
            "steps": [{"weight": 100}],
            "analysis": {"interval_s": 0.5, "max_staleness_s": 5, "min_requests_per_side": 20},
        }),
    )
    .await?;
    let id = r["id"].as_str().context("no id")?.to_owned();
    assert_eq!(r["phase"]["state"], "shadow", "{r:#}");
    let ended = wait::until_every(
        "the shadow stage to end",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let r = rollout(&stack, &id).await?;
            Ok((r["phase"]["state"] != "shadow").then_some(r))
        },
    )
    .await?;
    let sent = load.stop().await?;
    assert_eq!(ended["phase"]["state"], "rolled_back", "{ended:#}");
    let reason = ended["phase"]["reason"].as_str().unwrap_or_default();
    eprintln!("rolled back after {sent} requests: {reason}");
    assert!(
        reason.contains("shadow segment \"GET|gold\": unexpected mismatches"),
        "{reason}"
    );

    // The judgement that rolled back: the average passed, gold failed.
    let j = &ended["last_judgement"];
    let check = |name: &str| -> Result<Value> {
        j["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .cloned()
            .with_context(|| format!("no {name} check: {j:#}"))
    };
    let avg = check("unexpected_mismatch_rate")?;
    let seg = check("segment_unexpected_mismatch_rate")?;
    eprintln!("average: {}", avg["detail"]);
    eprintln!("segment: {}", seg["detail"]);
    assert_eq!(avg["status"], "pass", "{avg:#}");
    assert_eq!(seg["status"], "fail", "{seg:#}");
    let avg_rate = avg["measured"]["rate"]
        .as_f64()
        .context("no average rate")?;
    let gold_rate = seg["measured"]["rate"]
        .as_f64()
        .context("no segment rate")?;
    assert!(
        avg_rate < 0.5 && (0.15..0.45).contains(&avg_rate),
        "{avg:#}"
    );
    assert_eq!(gold_rate, 1.0, "{seg:#}");
    assert_eq!(
        seg["measured"]["segments_tested"].as_f64(),
        Some(3.0),
        "{seg:#}"
    );
    assert_eq!(seg["measured"]["average_rate"].as_f64(), Some(avg_rate));

    // The breakdown: gold's pairs all unexpected, silver's and bronze's none,
    // and the segments add up to the route's totals.
    let (route, by) = segments_when(&stack, "the breakdown", |route, by| {
        let sum: u64 = by.values().map(|v| n(v, "compared")).sum();
        n(route, "compared") > 0 && sum == n(route, "compared")
    })
    .await?;
    let labels: Vec<&String> = by.keys().collect();
    assert_eq!(labels, ["GET|bronze", "GET|gold", "GET|silver"], "{by:#?}");
    let gold = &by["GET|gold"];
    eprintln!(
        "route: {} compared, {} unexpected; gold {}/{}, silver {}/{}, bronze {}/{}",
        n(&route, "compared"),
        n(&route, "unexpected"),
        n(gold, "unexpected"),
        n(gold, "compared"),
        n(&by["GET|silver"], "unexpected"),
        n(&by["GET|silver"], "compared"),
        n(&by["GET|bronze"], "unexpected"),
        n(&by["GET|bronze"], "compared"),
    );
    assert!(n(gold, "compared") >= 30, "{gold:#}");
    assert_eq!(n(gold, "unexpected"), n(gold, "compared"), "{gold:#}");
    let gold_paths: Vec<&str> = gold["top_paths"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["path"].as_str())
        .collect();
    assert!(gold_paths.contains(&"status"), "{gold:#}");
    for clean in ["GET|silver", "GET|bronze"] {
        assert_eq!(n(&by[clean], "unexpected"), 0, "{:#}", by[clean]);
        assert!(n(&by[clean], "compared") > 0, "{:#}", by[clean]);
    }
    assert_eq!(n(&route, "unexpected"), n(gold, "unexpected"));
    Ok(())
}

/// A client sends 10,000 distinct tier values (and hostile bytes: Latin-1,
/// 4 KiB, the separator) after gold, silver and bronze were seen: the
/// route keeps 32 segments plus `other`, every label is short and safe,
/// the legitimate segments' counts are exact, and every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_inventing_tiers_is_counted_under_other() -> Result<()> {
    let stack = Stack::start().await?;
    behaviors(&stack)?;
    segmented_route(&stack).await?;
    // A new connection per request, so both Envoy workers (each with its
    // own tally) see every legitimate tier before the flood.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let url = stack.url.clone();
    // Legitimate traffic first: 60 requests, 18 gold, 24 silver, 18 bronze.
    for i in 0..60 {
        get(&http, &url, i, Some(tier(i).as_bytes())).await?;
    }
    segments_when(&stack, "the legitimate segments", |route, _| {
        n(route, "compared") >= 60
    })
    .await?;

    // The flood, 32 at a time, with 60 more legitimate requests in it.
    const INVENTED: u64 = 10_000;
    let hostile: Vec<Vec<u8>> = (0..INVENTED)
        .map(|i| match i % 4 {
            0 => format!("tier-{i}").into_bytes(),
            1 => [b"caf\xe9-".as_slice(), i.to_string().as_bytes()].concat(),
            2 => [vec![b'x'; 4096], i.to_string().into_bytes()].concat(),
            _ => format!("g|o l\"d{{{i}}}").into_bytes(),
        })
        .collect();
    let jobs: Vec<(u64, Option<Vec<u8>>)> = hostile
        .into_iter()
        .enumerate()
        .map(|(i, t)| (100_000 + i as u64, Some(t)))
        .chain((60..120).map(|i| (i, Some(tier(i).as_bytes().to_vec()))))
        .collect();
    send_all(&http, &url, jobs).await?;
    let total = 120 + INVENTED;
    let (route, by) = segments_when(&stack, "every pair counted", |route, by| {
        let sum: u64 = by.values().map(|v| n(v, "compared")).sum();
        n(route, "compared") >= total && sum == n(route, "compared")
    })
    .await?;
    let of = |label: &str| by.get(label).map_or(0, |v| n(v, "compared"));
    eprintln!(
        "{} compared in {} segments; other {}; gold {}, silver {}, bronze {}",
        n(&route, "compared"),
        by.len(),
        of("other"),
        of("GET|gold"),
        of("GET|silver"),
        of("GET|bronze"),
    );
    assert_eq!(n(&route, "compared"), total, "{route:#}");
    assert_eq!(
        by.len(),
        33,
        "32 segments and other, not {} segments",
        by.len()
    );
    // Legitimate segments exact: 36 gold, 48 silver, 36 bronze; gold all
    // unexpected (the canary fails gold), the invented tiers never.
    assert_eq!(n(&by["GET|gold"], "compared"), 36);
    assert_eq!(n(&by["GET|gold"], "unexpected"), 36);
    assert_eq!(n(&by["GET|silver"], "compared"), 48);
    assert_eq!(n(&by["GET|bronze"], "compared"), 36);
    assert_eq!(n(&route, "unexpected"), 36);
    let invented: u64 = by
        .iter()
        .filter(|(k, _)| !["GET|gold", "GET|silver", "GET|bronze"].contains(&k.as_str()))
        .map(|(_, v)| n(v, "compared"))
        .sum();
    assert_eq!(
        invented, INVENTED,
        "every invented tier is counted somewhere"
    );
    // At most 29 invented labels have their own segment (4 KiB values all
    // cut to the same 64 bytes, so one of them may hold a quarter).
    let other = of("other");
    assert!(other >= INVENTED / 2, "other {other}");
    for label in by.keys() {
        ensure!(
            label.len() <= 4 + 64
                && label
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"\"{}\\ ".contains(&b)),
            "unsafe label {label:?}"
        );
    }

    // With the tiers listed (`values`), a flood that comes first cannot
    // take their place: unknown values are `GET|other` at the source.
    segmented_route_with(
        &stack,
        json!({"header": TIER, "method": true, "values": ["gold", "silver", "bronze"]}),
    )
    .await?;
    let reset = stack
        .api
        .delete(stack.cp.api_url("/v1/shadow/routes/all"))
        .send()
        .await?;
    ensure!(
        reset.status() == 204 || reset.status() == 200,
        "reset: {}",
        reset.status()
    );
    let flood: Vec<(u64, Option<Vec<u8>>)> = (0..500u64)
        .map(|i| (200_000 + i, Some(format!("first-{i}").into_bytes())))
        .collect();
    send_all(&http, &url, flood).await?;
    let legit: Vec<(u64, Option<Vec<u8>>)> = (0..60)
        .map(|i| (i, Some(tier(i).as_bytes().to_vec())))
        .collect();
    send_all(&http, &url, legit).await?;
    let (route, by) = segments_when(&stack, "the listed tiers", |route, by| {
        let sum: u64 = by.values().map(|v| n(v, "compared")).sum();
        n(route, "compared") >= 560 && sum == n(route, "compared")
    })
    .await?;
    let got: BTreeMap<&str, u64> = by
        .iter()
        .map(|(k, v)| (k.as_str(), n(v, "compared")))
        .collect();
    eprintln!("with values: {got:?}");
    assert_eq!(n(&route, "compared"), 560);
    assert_eq!(
        got,
        BTreeMap::from([
            ("GET|bronze", 18),
            ("GET|gold", 18),
            ("GET|other", 500),
            ("GET|silver", 24)
        ])
    );
    Ok(())
}
