//! Rollout flags over OFREP, in process: the real control plane on
//! loopback with tokens, driven over HTTP. Shapes, errors, the bulk
//! endpoint's ETag, the viewer's access, and a flag turned off by an abort
//! in the same transition its audit entry records.

mod common;

use std::num::NonZeroU32;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use understudy_controlplane::api::auth::{Auth, Limits};
use understudy_controlplane::model::{
    Backend, DesiredState, FilterSettings, ListenerSettings, Service, Sticky, Weight,
};
use understudy_controlplane::rollout::flags::in_split;
use understudy_controlplane::store::Store;

const OPS: &str = "operator-token-0123456789";
const VIEW: &str = "viewer-token-0123456789";

fn service(name: &str, port: u16) -> Service {
    Service {
        name: name.into(),
        domains: vec![format!("{name}.example")],
        stable: Backend {
            endpoints: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
        },
        canary: Backend {
            endpoints: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port + 1))],
        },
        canary_weight: Weight::ZERO,
        sticky: Some(Sticky::Header("x-user-id".into())),
        canary_cohorts: Vec::new(),
        flags: Default::default(),
    }
}

fn state() -> DesiredState {
    DesiredState {
        listener: ListenerSettings {
            address: "127.0.0.1".parse().unwrap(),
            port: 10000,
        },
        filter: FilterSettings {
            wasm_path: "/etc/envoy/understudy.wasm".into(),
            config: understudy_controlplane::model::FilterDoc::parse(
                json!({"routes": [{"name": "api", "path_prefix": "/"}]}),
            )
            .unwrap(),
            report_cluster: "understudy_xds".into(),
        },
        services: [
            ("shop".to_string(), service("shop", 8081)),
            ("cart".to_string(), service("cart", 8091)),
        ]
        .into_iter()
        .collect(),
    }
}

struct Cp {
    base: String,
    http: reqwest::Client,
}

impl Cp {
    async fn start() -> Self {
        let limits = Limits {
            per_second: NonZeroU32::new(1000).unwrap(),
            burst: NonZeroU32::new(1000).unwrap(),
        };
        let auth =
            Auth::from_entries(&format!("ops:operator:{OPS}\nview:viewer:{VIEW}"), limits).unwrap();
        let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", api.local_addr().unwrap());
        let options = understudy_controlplane::Options {
            auth,
            rollouts: None,
            ..Default::default()
        };
        tokio::spawn(understudy_controlplane::run_with(
            Store::new(state()).unwrap(),
            options,
            xds,
            api,
            std::future::pending(),
        ));
        Self {
            base,
            http: common::http(),
        }
    }

    /// POST as `token` (none: no Authorization): status, headers, body
    /// (`Null` when empty).
    async fn post(
        &self,
        token: Option<&str>,
        path: &str,
        body: &str,
        if_none_match: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(tag) = if_none_match {
            req = req.header("if-none-match", tag);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}"))
        };
        (status, headers, body)
    }

    async fn eval(&self, key: &str, context: Value) -> (u16, Value) {
        let (s, _, b) = self
            .post(
                Some(VIEW),
                &format!("/ofrep/v1/evaluate/flags/{key}"),
                &json!({"context": context}).to_string(),
                None,
            )
            .await;
        (s, b)
    }

    async fn get_service(&self, name: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/services/{name}", self.base))
            .bearer_auth(VIEW)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    async fn put_service(&self, name: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}/v1/services/{name}", self.base))
            .bearer_auth(OPS)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn audit(&self, id: &str) -> Vec<Value> {
        let r = self
            .http
            .get(format!("{}/v1/rollouts/{id}", self.base))
            .bearer_auth(VIEW)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["audit"].as_array().unwrap().clone()
    }
}

fn spec(service: &str, flag: &str) -> String {
    json!({
        "service": service, "owner": "team",
        "stop_rules": {"max_error_rate_increase_pp": 1.0},
        "steps": [
            {"cohort": {"header": {"name": "x-user-group", "value": "internal"}}, "weight": 20},
            {"weight": 100},
        ],
        "flags": [{"key": flag, "description": "the new checkout"}],
    })
    .to_string()
}

#[tokio::test]
async fn flags_are_evaluated_over_ofrep_and_turned_off_by_an_abort() {
    let cp = Cp::start().await;
    // Before any rollout declares it: FLAG_NOT_FOUND.
    let (s, b) = cp.eval("new-checkout", json!({"targetingKey": "u1"})).await;
    assert_eq!((s, &b["errorCode"]), (404, &json!("FLAG_NOT_FOUND")), "{b}");
    assert_eq!(b["key"], "new-checkout");

    let (s, _, r) = cp
        .post(
            Some(OPS),
            "/v1/rollouts",
            &spec("shop", "new-checkout"),
            None,
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let id = r["id"].as_str().unwrap().to_owned();
    assert!(
        r["audit"][0]["reason"].as_str().unwrap().ends_with(
            "flags on for the canary (20 % of users, x-user-group: internal): new-checkout"
        ),
        "{r}"
    );

    // The routes' header is written with the split, and only by rollouts.
    let svc = cp.get_service("shop").await;
    assert_eq!(
        svc["flags"],
        json!({"keys": ["new-checkout"], "canary": true, "stable": false})
    );
    let mut forged = svc.clone();
    forged["flags"]["stable"] = json!(true);
    let (s, b) = cp.put_service("shop", &forged).await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("flags:"),
        "{b}"
    );
    let (s, b) = cp.put_service("shop", &svc).await;
    assert_eq!(s, 200, "{b}");
    // Left out, it is kept.
    let mut without = svc.clone();
    without.as_object_mut().unwrap().remove("flags");
    let (s, b) = cp.put_service("shop", &without).await;
    assert_eq!((s, &b["flags"]), (200, &svc["flags"]), "{b}");

    // Single evaluation: the split by the targeting key, Envoy's rule.
    let mut on = 0;
    for i in 0..100 {
        let key = format!("user-{i}");
        let (s, b) = cp.eval("new-checkout", json!({"targetingKey": key})).await;
        assert_eq!(s, 200, "{b}");
        let want = in_split(key.as_bytes(), 20);
        on += usize::from(want);
        assert_eq!(b["value"], want, "{key}: {b}");
        assert_eq!(b["reason"], "SPLIT");
        assert_eq!(b["variant"], if want { "on" } else { "off" });
        assert_eq!(b["key"], "new-checkout");
        assert_eq!(
            b["metadata"],
            json!({"rollout": id, "service": "shop", "phase": "canary"})
        );
    }
    assert!((5..=40).contains(&on), "{on} of 100 on at 20 %");
    // The cohort, by an attribute named like its header.
    let (s, b) = cp
        .eval("new-checkout", json!({"x-user-group": "internal"}))
        .await;
    assert_eq!(
        (s, &b["value"], &b["reason"]),
        (200, &json!(true), &json!("TARGETING_MATCH"))
    );
    // No user key for a split flag: TARGETING_KEY_MISSING.
    let (s, b) = cp.eval("new-checkout", json!({})).await;
    assert_eq!(
        (s, &b["errorCode"]),
        (400, &json!("TARGETING_KEY_MISSING")),
        "{b}"
    );

    // Hostile bodies: refused with OFREP's codes; the next request is served.
    for (body, code) in [
        ("{not json", "PARSE_ERROR"),
        (r#"{"context": {"a": {"deep": 1}}}"#, "INVALID_CONTEXT"),
        (r#"{"context": [1, 2]}"#, "INVALID_CONTEXT"),
        (r#"{"contxt": {}}"#, "PARSE_ERROR"),
    ] {
        let (s, _, b) = cp
            .post(
                Some(VIEW),
                "/ofrep/v1/evaluate/flags/new-checkout",
                body,
                None,
            )
            .await;
        assert_eq!((s, &b["errorCode"]), (400, &json!(code)), "{body}: {b}");
        let (s, _, b) = cp
            .post(Some(VIEW), "/ofrep/v1/evaluate/flags", body, None)
            .await;
        assert_eq!(
            (s, &b["errorCode"]),
            (400, &json!(code)),
            "bulk {body}: {b}"
        );
    }
    let huge = format!(
        r#"{{"context": {{"targetingKey": "{}"}}}}"#,
        "k".repeat(64 * 1024)
    );
    let (s, _, b) = cp
        .post(Some(VIEW), "/ofrep/v1/evaluate/flags", &huge, None)
        .await;
    assert_eq!((s, &b["errorCode"]), (400, &json!("PARSE_ERROR")), "{b}");
    let (s, _, b) = cp
        .post(Some(VIEW), "/ofrep/v1/evaluate/flags/a%20b", "{}", None)
        .await;
    assert_eq!((s, &b["errorCode"]), (404, &json!("FLAG_NOT_FOUND")), "{b}");
    let (s, b) = cp
        .eval("new-checkout", json!({"targetingKey": "user-1"}))
        .await;
    assert_eq!(s, 200, "{b}");

    // Auth: no token 401, a wrong one 401; a viewer may evaluate (above).
    let ctx = r#"{"context": {"targetingKey": "user-1"}}"#;
    for token in [None, Some("not-a-valid-token-at-all")] {
        let (s, _, _) = cp.post(token, "/ofrep/v1/evaluate/flags", ctx, None).await;
        assert_eq!(s, 401);
        let (s, _, _) = cp
            .post(token, "/ofrep/v1/evaluate/flags/new-checkout", ctx, None)
            .await;
        assert_eq!(s, 401);
    }
    // The viewer's POST reaches only OFREP: acting on a rollout is still 403.
    let (s, _, _) = cp
        .post(Some(VIEW), &format!("/v1/rollouts/{id}/abort"), "{}", None)
        .await;
    assert_eq!(s, 403);

    // Another service's rollout may not take an active flag.
    let (s, _, b) = cp
        .post(
            Some(OPS),
            "/v1/rollouts",
            &spec("cart", "new-checkout"),
            None,
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("flags[0].key:"),
        "{b}"
    );

    // Bulk: every flag, an ETag, and 304 for the same answer.
    let (s, h, b) = cp
        .post(Some(VIEW), "/ofrep/v1/evaluate/flags", ctx, None)
        .await;
    assert_eq!(s, 200);
    let item = &b["flags"][0];
    assert_eq!(item["key"], "new-checkout");
    assert_eq!(item["value"], in_split(b"user-1", 20));
    let tag = h["etag"].to_str().unwrap().to_owned();
    let (s, h, b) = cp
        .post(Some(VIEW), "/ofrep/v1/evaluate/flags", ctx, Some(&tag))
        .await;
    assert_eq!((s, &b), (304, &Value::Null));
    assert_eq!(h["etag"].to_str().unwrap(), tag);

    // Abort: the flag is off for everyone, the ETag changes, and the
    // abort's audit entry says so.
    let (s, _, _) = cp
        .post(Some(OPS), &format!("/v1/rollouts/{id}/abort"), "{}", None)
        .await;
    assert_eq!(s, 200);
    let (s, h, b) = cp
        .post(Some(VIEW), "/ofrep/v1/evaluate/flags", ctx, Some(&tag))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_ne!(h["etag"].to_str().unwrap(), tag);
    assert_eq!(b["flags"][0]["value"], false);
    assert_eq!(b["flags"][0]["reason"], "DISABLED");
    let (s, b) = cp
        .eval("new-checkout", json!({"x-user-group": "internal"}))
        .await;
    assert_eq!(
        (s, &b["value"], &b["variant"]),
        (200, &json!(false), &json!("off"))
    );
    assert_eq!(
        cp.get_service("shop").await["flags"],
        json!({"keys": ["new-checkout"], "canary": false, "stable": false})
    );
    let audit = cp.audit(&id).await;
    let last = audit.last().unwrap();
    assert_eq!(last["to"], "aborted");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .ends_with("; flags off: new-checkout"),
        "{last}"
    );
    // Now another service's rollout may take the key; the newest answers.
    let (s, _, b) = cp
        .post(
            Some(OPS),
            "/v1/rollouts",
            &spec("cart", "new-checkout"),
            None,
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (_, b) = cp
        .eval("new-checkout", json!({"x-user-group": "internal"}))
        .await;
    assert_eq!(b["metadata"]["service"], "cart");
    assert_eq!(b["value"], true);
}
