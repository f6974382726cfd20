//! Hostile and broken surroundings, end to end: real Envoy with the real
//! filter reporting to the real control plane.
//!
//! - A control plane restarted during the shadow stage keeps counting every
//!   serious mismatch (the stage re-baselines instead of subtracting a stored
//!   baseline from counters that restarted at zero).
//! - Replay sends only what an authenticated Envoy recorded, to the route's
//!   own clusters, for the methods it shadows, without credentials; records
//!   an insider Envoy plants are refused where they break those rules.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use understudy_e2e::stack::Stack;
use understudy_e2e::traffic::Load;
use understudy_e2e::upstream::Behavior;
use understudy_e2e::wait;

fn price(v: u64) -> Behavior {
    Behavior {
        body: Some(json!({"price": v})),
        ..Default::default()
    }
}

/// Route `all` shadows every request to the canary; the price difference
/// is declared, so it is serious but not unexpected: the stage holds and
/// counts instead of stopping at once.
fn shadowing_config() -> Value {
    json!({"routes": [{"name": "all", "path_prefix": "/", "shadow": {
        "cluster": "demo-canary",
        "percent": 100,
        "expected": [{"name": "price", "path_prefix": "/", "paths": ["$.price"]}]
    }}]})
}

async fn live_serious(stack: &Stack) -> Result<u64> {
    let r = stack.api_get("/v1/shadow/routes/all").await;
    Ok(r.ok()
        .and_then(|r| r["mismatched_serious"].as_u64())
        .unwrap_or(0))
}

async fn rollout(stack: &Stack, id: &str) -> Result<Value> {
    stack.api_get(&format!("/v1/rollouts/{id}")).await
}

/// The rollout's serious count once it agrees with the shadow book:
/// `seen == carried + (book - baseline)` after an evaluation.
async fn settled_seen(stack: &Stack, id: &str, want_book: u64) -> Result<(u64, Value)> {
    wait::until(
        "the rollout to count the book's serious mismatches",
        Duration::from_secs(30),
        || async {
            let book = live_serious(stack).await?;
            let r = rollout(stack, id).await?;
            let seen = r["shadow_seen"]["serious"].as_u64().unwrap_or(0);
            let carried = r["shadow_carried"]["serious"].as_u64().unwrap_or(0);
            let base = r["shadow_baseline"]["serious"].as_u64().unwrap_or(0);
            Ok(
                (book >= want_book && seen == carried + book.saturating_sub(base))
                    .then_some((seen, r)),
            )
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_shadow_stage_keeps_counting_every_serious_mismatch() -> Result<()> {
    let mut stack = Stack::start().await?;
    stack.stable.state.set_behavior(price(10))?;
    stack.canary.state.set_behavior(price(12))?;
    stack.put_filter_config(shadowing_config()).await?;

    // Pairs from before the stage: the stage's stored baseline is large.
    let load = Load::start(&stack.url, 4);
    wait::until("pre-stage mismatches", Duration::from_secs(60), || async {
        Ok((live_serious(&stack).await? >= 120).then_some(()))
    })
    .await?;
    let spec = json!({
        "service": "demo",
        "owner": "team-checkout",
        "stop_rules": {"max_error_rate_increase_pp": 2.0, "max_unexpected_mismatch_rate": 0.01},
        "shadow": {"route": "all", "percent": 100, "min_duration_s": 600,
                   "min_compared": 1000000, "max_serious_rate": 0.5},
        "steps": [{"weight": 100}],
        "analysis": {"interval_s": 0.5, "max_staleness_s": 30, "min_requests_per_side": 1}
    });
    let created = understudy_e2e::rollouts::create(&stack, &spec).await?;
    let id = created["id"].as_str().context("no id")?.to_owned();
    let baseline = created["shadow_baseline"]["serious"].as_u64().unwrap_or(0);
    ensure!(baseline >= 120, "baseline {baseline}");
    wait::until(
        "mismatches in the stage",
        Duration::from_secs(60),
        || async {
            let r = rollout(&stack, &id).await?;
            Ok((r["shadow_seen"]["serious"].as_u64().unwrap_or(0) >= 20).then_some(()))
        },
    )
    .await?;
    load.stop().await;
    // Everything sent has been reported and counted.
    let book = live_serious(&stack).await?;
    let (before, _) = settled_seen(&stack, &id, book).await?;
    ensure!(before >= 20, "{before}");

    // Restart: the shadow book starts at zero, far below the baseline.
    stack.cp.kill();
    stack.cp.restart().await?;
    const N: u64 = 40;
    for i in 0..N {
        let r = stack.http.get(format!("{}n{i}", stack.url)).send().await?;
        ensure!(r.status() == 200, "request {i}: {}", r.status());
    }
    let (after, r) = settled_seen(&stack, &id, N).await?;
    let book = live_serious(&stack).await?;
    ensure!(book < baseline, "the book restarted below the old baseline");
    assert_eq!(
        after,
        before + book,
        "every serious mismatch after the restart counts: {:#}",
        r["last_judgement"]
    );
    assert!(after >= before + N, "{after} < {before} + {N}");
    assert_eq!(r["phase"]["state"], "shadow", "{r:#}");
    Ok(())
}

/// Replay sends only what an authenticated Envoy recorded, only to the
/// route's own clusters, only for methods the route shadows, and never with
/// credentials. A peer without a certificate cannot plant records at all
/// (`hostile_xds.rs`); here an *insider* (a valid Envoy certificate) plants
/// them, and a real mismatch recorded by the real Envoy is replayed for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_only_verified_records_where_and_how_the_route_allows() -> Result<()> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use understudy_proto::v1::report_service_client::ReportServiceClient;
    use understudy_proto::v1::{
        Difference, Header, MismatchRecord, RecordedRequest, RecordedResponse, ReportBatch,
        difference,
    };
    let stack = Stack::start().await?;
    stack.stable.state.set_behavior(price(1))?;
    stack.canary.state.set_behavior(price(2))?;
    stack.put_filter_config(shadowing_config()).await?;

    // A legitimate record: real traffic, a real price difference.
    let r = stack.http.get(format!("{}real", stack.url)).send().await?;
    assert_eq!(r.status(), 200);
    let real = wait::until(
        "the real mismatch to be recorded",
        Duration::from_secs(15),
        || async {
            let r = stack.api_get("/v1/shadow/routes/all").await?;
            let id = r["top_paths"]
                .as_array()
                .and_then(|p| p.first())
                .and_then(|p| p["samples"][0]["id"].as_str())
                .and_then(|id| id.parse::<u64>().ok());
            Ok(id)
        },
    )
    .await?;
    let shown = stack.api_get(&format!("/v1/shadow/samples/{real}")).await?;
    assert_eq!(shown["origin"]["kind"], "verified", "{shown:#}");

    // An insider Envoy plants records (its certificate is valid).
    let (cert, key) = stack.cp.envoy_cert("insider")?;
    let tls = ClientTlsConfig::new()
        .domain_name(understudy_controlplane::tls::SERVER_NAME)
        .ca_certificate(Certificate::from_pem(std::fs::read(
            stack.cp.certs.ca_cert(),
        )?))
        .identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    let channel = Endpoint::from_shared(format!("https://{}", stack.cp.xds))?
        .connect_timeout(understudy_e2e::stack::API_TIMEOUT)
        .timeout(understudy_e2e::stack::API_TIMEOUT)
        .tls_config(tls)?
        .connect()
        .await
        .context("the report port, as an insider")?;
    let mut client = ReportServiceClient::new(channel);
    let planted = |method: &str, path: &str| MismatchRecord {
        route: "all".into(),
        request_id: format!("planted-{method}"),
        serious: true,
        shadow_cluster: "demo-canary".into(),
        differences: vec![Difference {
            path: "$.x".into(),
            kind: difference::Kind::ValueChange as i32,
            bucket: difference::Bucket::Serious as i32,
            primary: "1".into(),
            shadow: "2".into(),
            unexpected: true,
        }],
        request: Some(RecordedRequest {
            method: method.into(),
            path: path.into(),
            authority: "demo".into(),
            headers: vec![Header {
                name: "authorization".into(),
                value: "Bearer stolen-by-replay".into(),
            }],
            body: Vec::new(),
            body_truncated: false,
        }),
        primary: Some(RecordedResponse {
            status: 200,
            headers: Vec::new(),
            body: br#"{"price": 1}"#.to_vec(),
            body_truncated: false,
        }),
        ..Default::default()
    };
    let ack = client
        .push(ReportBatch {
            node_id: "insider".into(),
            mismatches: vec![
                planted("GET", "/planted-get"),
                planted("DELETE", "/planted-delete"),
            ],
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(ack.accepted == 2, "{ack:?}");
    let find = |path: &'static str| {
        let stack = &stack;
        async move {
            for id in 1..=20u64 {
                if let Ok(s) = stack.api_get(&format!("/v1/shadow/samples/{id}")).await
                    && s.to_string().contains(path)
                {
                    return Ok(id);
                }
            }
            anyhow::bail!("no sample for {path}")
        }
    };
    let get_id = find("/planted-get").await?;
    let delete_id = find("/planted-delete").await?;
    let shown = stack
        .api_get(&format!("/v1/shadow/samples/{get_id}"))
        .await?;
    assert!(!shown.to_string().contains("stolen-by-replay"), "{shown:#}");

    let replay = |id: u64, body: Option<Value>| {
        let stack = &stack;
        async move {
            let mut req = stack
                .api
                .post(stack.cp.api_url(&format!("/v1/shadow/samples/{id}/replay")));
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await?;
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            Ok::<_, anyhow::Error>((status, body))
        }
    };
    let seen_before = stack.canary.state.seen().len();
    // A method the route does not shadow, and a cluster not the route's: refused.
    let (status, body) = replay(delete_id, None).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("method_not_allowed")),
        "{body:#}"
    );
    let (status, body) = replay(get_id, Some(json!({"cluster": "understudy_xds"}))).await?;
    assert!(matches!(status, 400 | 403), "{status}: {body:#}");
    assert!(
        matches!(
            body["error"]["code"].as_str(),
            Some("cluster_not_allowed" | "unknown_cluster")
        ),
        "{body:#}"
    );
    assert_eq!(
        stack.canary.state.seen().len(),
        seen_before,
        "nothing was sent"
    );
    // Allowed: sent to the canary, without the credentials it was recorded with.
    let (status, body) = replay(get_id, None).await?;
    assert_eq!(status, 200, "{body:#}");
    let (status, body) = replay(real, None).await?;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["status"], 200, "{body:#}");
    let seen: Vec<_> = stack.canary.state.seen()[seen_before..].to_vec();
    let planted_seen = seen
        .iter()
        .find(|s| s.path == "/planted-get")
        .context("the allowed replay reached the canary")?;
    assert!(
        !planted_seen.headers.contains_key("authorization"),
        "credentials were replayed: {planted_seen:?}"
    );
    assert!(seen.iter().all(|s| s.method != "DELETE"), "{seen:?}");
    // Every attempt is in the audit log with its actor.
    let audit = stack.api_get("/v1/shadow/replays").await?;
    let entries = audit["replays"].as_array().context("replays")?;
    assert_eq!(entries.len(), 4, "{audit:#}");
    assert!(
        entries
            .iter()
            .all(|e| e["actor"] == understudy_e2e::controlplane::OPERATOR),
        "{audit:#}"
    );
    let refused = entries
        .iter()
        .filter(|e| {
            e["outcome"]
                .as_str()
                .is_some_and(|o| o.starts_with("refused"))
        })
        .count();
    assert_eq!(refused, 2, "{audit:#}");
    Ok(())
}
