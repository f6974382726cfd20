//! Webhooks for rollout events, in process: the real engine and notifier
//! deliver to real HTTP receivers on loopback. Events arrive in order and
//! signed; a failing receiver is retried and then recorded as failed; a
//! hanging one never holds up a decision.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use understudy_controlplane::evidence::envoy_stats::MetricsBook;
use understudy_controlplane::notify::{self, RetryPolicy, Webhooks};
use understudy_controlplane::rollout::engine::{Action, AuditEntry, Engine, Sources};
use understudy_controlplane::rollout::store::RolloutStore;
use understudy_controlplane::store::Store;
use understudy_controlplane::xds::Registry;

const KEY: &str = "correct horse battery staple";

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Got {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A receiver on loopback answering every POST with `status`.
async fn receiver(status: StatusCode) -> (String, Arc<Mutex<Vec<Got>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hooks/secret-path",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(Got {
                    headers,
                    body: body.to_vec(),
                });
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hooks/secret-path",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

struct Harness {
    engine: Arc<Engine>,
    key_file: String,
    _dir: tempfile::TempDir,
}

fn harness(policy: RetryPolicy) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hook.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let engine = Arc::new(
        Engine::new(
            Store::new(common::desired(json!({}), [common::service("shop", 9001)])).unwrap(),
            RolloutStore::in_memory().unwrap(),
            Sources {
                metrics: Arc::new(MetricsBook::default()),
                shadow: Arc::default(),
                registry: Arc::new(Registry::default()),
            },
        )
        .unwrap(),
    );
    let weak = Arc::downgrade(&engine);
    let recorder: notify::Recorder = Arc::new(move |id: &str, entry| {
        if let Some(engine) = weak.upgrade() {
            engine.record_audit(id, &entry).unwrap();
        }
    });
    let webhooks = Webhooks::new(policy, recorder).unwrap();
    assert!(engine.notify_with(Arc::new(webhooks)).is_ok());
    Harness {
        engine,
        key_file: key_file.to_str().unwrap().to_owned(),
        _dir: dir,
    }
}

fn spec(hooks: Value) -> String {
    json!({
        "service": "shop",
        "owner": "team@example.com",
        "stop_rules": {"max_error_rate_increase_pp": 1.0},
        "steps": [
            {"weight": 5, "min_duration_s": 3600},
            {"weight": 50, "min_duration_s": 3600, "manual_gate": true},
            {"weight": 100, "min_duration_s": 3600}
        ],
        "notifications": hooks
    })
    .to_string()
}

fn deliveries(engine: &Engine, id: &str) -> Vec<AuditEntry> {
    engine
        .view(id)
        .unwrap()
        .audit
        .into_iter()
        .filter(|a| a.actor == notify::NOTIFIER)
        .collect()
}

fn header<'a>(g: &'a Got, name: &str) -> &'a str {
    g.headers.get(name).unwrap().to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_gets_every_event_in_order_and_signed() {
    let (url, got) = receiver(StatusCode::OK).await;
    let h = harness(RetryPolicy::default());
    let text = spec(json!([{"url": url, "secret_file": h.key_file}]));
    let t0 = SystemTime::now();
    let r = h.engine.create(&text, "alice", t0).unwrap();
    // Step 1 → the gate before step 2 → step 2 → step 3 → succeeded.
    for (i, action) in [Action::Promote; 4].into_iter().enumerate() {
        h.engine
            .act(&r.id, action, "bob", t0 + Duration::from_secs(i as u64 + 1))
            .unwrap();
    }
    let entries = common::eventually(
        "five deliveries recorded",
        || deliveries(&h.engine, &r.id),
        |d| d.len() >= 5,
    )
    .await;
    assert!(
        entries.iter().all(|e| e.snapshot["delivered"] == true),
        "{entries:#?}"
    );
    // The audit names the receiver's origin, never its (secret) path.
    assert!(
        entries.iter().all(|e| !e.reason.contains("secret-path")),
        "{entries:#?}"
    );

    let got = got.lock().unwrap().clone();
    let names: Vec<&str> = got
        .iter()
        .map(|g| header(g, "x-understudy-event"))
        .collect();
    assert_eq!(
        names,
        [
            "created",
            "awaiting_approval",
            "step_advanced",
            "step_advanced",
            "succeeded"
        ]
    );
    let now_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for g in &got {
        let ts: u64 = header(g, "x-understudy-timestamp").parse().unwrap();
        assert!(now_s.abs_diff(ts) < 60, "timestamp {ts} vs now {now_s}");
        assert_eq!(
            header(g, "x-understudy-signature"),
            notify::sign(KEY.as_bytes(), ts, &g.body),
            "the body is signed with the key (trailing newline trimmed)"
        );
        assert_ne!(
            header(g, "x-understudy-signature"),
            notify::sign(b"another key", ts, &g.body)
        );
        let body: Value = serde_json::from_slice(&g.body).unwrap();
        assert_eq!(body["rollout"], r.id.as_str());
        assert_eq!(body["service"], "shop");
        assert_eq!(body["event"], header(g, "x-understudy-event"));
    }
    let last: Value = serde_json::from_slice(&got[4].body).unwrap();
    assert_eq!(
        (last["weight"].as_u64(), &last["actor"]),
        (Some(100), &json!("bob"))
    );
    let first: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(first["actor"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receivers_are_retried_then_recorded_and_never_hold_the_engine() {
    let (failing, failing_got) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let (refusing, refusing_got) = receiver(StatusCode::BAD_REQUEST).await;
    let (slack, slack_got) = receiver(StatusCode::OK).await;
    // Accepts connections and never answers.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}/hook", hanging.local_addr().unwrap());
    let h = harness(RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        timeout: Duration::from_secs(30),
    });
    let text = spec(json!([
        {"url": hanging_url, "secret_file": h.key_file},
        {"url": failing, "secret_file": h.key_file, "events": ["created", "aborted"]},
        {"url": refusing, "secret_file": h.key_file, "events": ["created"]},
        {"url": slack, "secret_file": h.key_file, "format": "slack", "events": ["aborted"]},
    ]));
    let t0 = SystemTime::now();
    let started = Instant::now();
    let r = h.engine.create(&text, "alice", t0).unwrap();
    h.engine
        .act(&r.id, Action::Abort, "bob", t0 + Duration::from_secs(1))
        .unwrap();
    // The hanging receiver holds its own queue for 30 s; the decisions did not wait.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "decisions took {:?}",
        started.elapsed()
    );

    let entries = common::eventually(
        "the failing and refusing receivers' outcomes recorded",
        || deliveries(&h.engine, &r.id),
        |d| d.len() >= 4,
    )
    .await;
    let of = |url: &str| -> Vec<&AuditEntry> {
        let origin = url.split("/hooks").next().unwrap().to_owned();
        entries
            .iter()
            .filter(|e| e.snapshot["webhook"] == origin.as_str())
            .collect()
    };
    let failed = of(&failing);
    assert_eq!(failed.len(), 2, "{entries:#?}");
    for e in &failed {
        assert_eq!(e.snapshot["delivered"], false);
        assert_eq!(e.snapshot["attempts"], 3);
        assert!(e.reason.contains("answered HTTP 500"), "{}", e.reason);
    }
    assert_eq!(failing_got.lock().unwrap().len(), 6, "3 attempts per event");
    let ids: Vec<String> = failing_got
        .lock()
        .unwrap()
        .iter()
        .map(|g| header(g, "x-understudy-delivery").to_owned())
        .collect();
    assert_eq!(ids[0], ids[2], "retries keep the delivery id");
    assert_ne!(ids[0], ids[3]);

    // A 400 is the receiver's final word: one attempt.
    let refused = of(&refusing);
    assert_eq!(refused.len(), 1, "{entries:#?}");
    assert_eq!(refused[0].snapshot["attempts"], 1);
    assert_eq!(refusing_got.lock().unwrap().len(), 1);

    // Slack's body, for the one event it asked for.
    let delivered = of(&slack);
    assert_eq!(delivered.len(), 1, "{entries:#?}");
    assert_eq!(delivered[0].snapshot["delivered"], true);
    let body: Value = serde_json::from_slice(&slack_got.lock().unwrap()[0].body).unwrap();
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains(&r.id) && text.contains("aborted") && text.contains("bob"),
        "{text}"
    );
}

#[test]
fn webhook_specs_are_validated() {
    use understudy_controlplane::rollout::spec::RolloutSpec;
    let bad = [
        (
            json!([{"url": "ftp://x.example/h", "secret_file": "/k"}]),
            "notifications[0].url",
        ),
        (
            json!([{"url": "http://u:p@x.example/h", "secret_file": "/k"}]),
            "notifications[0].url",
        ),
        (
            json!([{"url": "http://x.example/h"}]),
            "notifications[0].secret_file",
        ),
        (
            json!([{"url": "http://x.example/h", "secret_file": "k"}]),
            "notifications[0].secret_file",
        ),
        (
            json!([{"url": "http://x.example/h", "secret_file": "/k", "events": []}]),
            "notifications[0].events",
        ),
        (
            json!([{"url": "http://x.example/h", "secret_file": "/k", "events": ["exploded"]}]),
            "notifications[0].events",
        ),
        (
            json!([{"url": "http://x.example/h", "secret_file": "/k", "colour": "red"}]),
            "notifications[0]",
        ),
        (
            json!(vec![
                json!({"url": "http://x.example/h", "secret_file": "/k"});
                9
            ]),
            "notifications",
        ),
    ];
    for (hooks, field) in bad {
        let e = RolloutSpec::from_yaml_or_json(&spec(hooks.clone())).unwrap_err();
        assert!(e.to_string().starts_with(field), "{hooks}: {e}");
    }
    let ok = RolloutSpec::from_yaml_or_json(&spec(json!([
        {"url": "https://hooks.example/a", "secret_file": "/k", "events": ["rolled_back", "rolled_back"]}
    ])))
    .unwrap();
    assert_eq!(ok.notifications[0].events.len(), 1);
    // A stored spec reads back the same.
    let text = serde_json::to_string(&ok).unwrap();
    assert_eq!(RolloutSpec::from_yaml_or_json(&text).unwrap(), ok);
}
