//! The glue's paths, natively: [`Root`] and [`Http`] driven through the
//! proxy-wasm traits as Envoy drives them, against [`FakeHost`]. Each test
//! reads back what the filter asked of its host (replies, calls, metrics,
//! shared data), so a change to the glue that drops or reorders a host call
//! fails here before it reaches an e2e run.

// A failing test panics; the crate-wide deny is for code that runs in Envoy.
#![allow(clippy::panic)]

use std::rc::Rc;

use prost::Message;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use serde_json::{Value, json};
use understudy_core::hedge::HEDGE_MARKER;
use understudy_proto::v1::{ReportBatch, UsageReport};

use crate::fake::{EPOCH_US, FakeHost};
use crate::host::Host;
use crate::{Http, Root};

const REQ: MapType = MapType::HttpRequestHeaders;
const RESP: MapType = MapType::HttpResponseHeaders;

fn configure(host: &Rc<FakeHost>, config: &Value) -> (Root, bool) {
    let bytes = config.to_string().into_bytes();
    let len = bytes.len();
    host.with(|s| s.plugin_config = bytes);
    let dyn_host: Rc<dyn Host> = host.clone();
    let mut root = Root::new(dyn_host);
    let ok = root.on_configure(len);
    (root, ok)
}

fn configured(host: &Rc<FakeHost>, config: Value) -> Root {
    let (root, ok) = configure(host, &config);
    assert!(ok, "config refused: {:?}", host.with(|s| s.logs.clone()));
    root
}

/// Streams are made with `Root::stream`, not through `create_http_context`:
/// a `dyn HttpContext` would pull in the SDK's default trait methods, whose
/// host imports do not exist natively.
fn stream(root: &Root, id: u32) -> Http {
    root.stream(id)
}

/// One request through the request-headers callback (no body).
fn request(root: &Root, host: &FakeHost, id: u32, headers: &[(&str, &str)]) -> (Http, Action) {
    host.set_map(REQ, headers);
    let mut http = stream(root, id);
    let action = http.on_http_request_headers(headers.len(), true);
    (http, action)
}

fn logs(host: &FakeHost) -> String {
    host.with(|s| s.logs.join("\n"))
}

// === config failure ===

#[test]
fn a_config_that_does_not_validate_is_refused_and_traffic_still_flows() {
    let host = FakeHost::new();
    let (root, ok) = configure(&host, &json!({"stat_prefx": "x"}));
    assert!(!ok);
    assert!(
        logs(&host).contains("rejecting configuration") && logs(&host).contains("stat_prefx"),
        "{}",
        logs(&host)
    );
    assert_eq!(
        host.with(|s| s.tick_period_ms),
        None,
        "no tick without a config"
    );
    assert!(host.with(|s| s.metrics.is_empty()));
    // A stream on an unconfigured filter passes untouched (and nothing panics).
    let (mut http, action) = request(
        &root,
        &host,
        2,
        &[(":path", "/a"), ("x-understudy-shadow", "1")],
    );
    assert_eq!(action, Action::Continue);
    assert_eq!(http.on_http_response_headers(1, true), Action::Continue);
    http.on_log();
    assert!(host.replies().is_empty());
}

#[test]
fn an_unreadable_config_or_a_refused_metric_is_refused_too() {
    let host = FakeHost::new();
    host.with(|s| s.fail_plugin_config = true);
    let (_, ok) = configure(&host, &json!({}));
    assert!(!ok);
    assert!(
        logs(&host).contains("reading the plugin configuration failed"),
        "{}",
        logs(&host)
    );

    let host = FakeHost::new();
    host.with(|s| s.fail_define = true);
    let (_, ok) = configure(&host, &json!({"routes": [{"name": "api"}]}));
    assert!(!ok);
    assert!(logs(&host).contains("defining metric"), "{}", logs(&host));

    // The same config on a healthy host is accepted.
    let host = FakeHost::new();
    assert!(configure(&host, &json!({"routes": [{"name": "api"}]})).1);
}

// === request ===

#[test]
fn a_request_is_counted_by_route_and_loses_forged_internal_headers() {
    let host = FakeHost::new();
    let root = configured(
        &host,
        json!({"routes": [{"name": "api", "path_prefix": "/api"}]}),
    );
    let (_, action) = request(
        &root,
        &host,
        2,
        &[
            (":path", "/api/cart"),
            (":method", "GET"),
            ("X-Understudy-Shadow", "1"),
            ("accept", "*/*"),
        ],
    );
    assert_eq!(action, Action::Continue);
    assert_eq!(host.metric("understudy.requests_total"), Some(1));
    assert_eq!(host.metric("understudy.route.api.requests_total"), Some(1));
    assert_eq!(host.metric("understudy.internal_headers_stripped"), Some(1));
    assert_eq!(host.header(REQ, "x-understudy-shadow"), None);
    assert_eq!(
        host.header(REQ, "accept").as_deref(),
        Some("*/*"),
        "others stay"
    );
    // Off every route: counted in the total only.
    request(&root, &host, 3, &[(":path", "/other")]);
    assert_eq!(host.metric("understudy.requests_total"), Some(2));
    assert_eq!(host.metric("understudy.route.api.requests_total"), Some(1));
}

fn rate_limited(extra: Value) -> Value {
    let mut rl = json!({
        "identity": {"header": "x-tenant"},
        "tiers": {
            "anonymous": {"initial": 1, "min": 1, "max": 1},
            "standard": {"initial": 2, "min": 1, "max": 10, "burst_s": 1, "increase": 1}
        },
        "adjust_ms": 1000,
        "headers_on_allowed": true,
        "max_tenants": 100
    });
    if let (Some(r), Some(e)) = (rl.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    json!({"routes": [{"name": "all"}], "rate_limit": rl})
}

#[test]
fn a_tenant_over_its_rate_gets_a_429_with_retry_signals() {
    let host = FakeHost::new();
    let root = configured(&host, rate_limited(json!({})));
    let headers = [(":path", "/x"), ("x-tenant", "t1")];
    for id in [2, 3] {
        assert_eq!(request(&root, &host, id, &headers).1, Action::Continue);
    }
    let (_, action) = request(&root, &host, 4, &headers);
    assert_eq!(
        action,
        Action::Pause,
        "the third request in a second is over 2/s"
    );
    let replies = host.replies();
    assert_eq!(replies.len(), 1);
    let r = &replies[0];
    assert_eq!(r.status, 429);
    let get = |k: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("retry-after").as_deref(), Some("1"));
    assert!(get("ratelimit").is_some_and(|v| v.starts_with("\"tenant\";r=0;t=1;pk=:")));
    let body: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    assert_eq!(body["tier"], "standard");
    assert_eq!(
        host.metric("understudy.ratelimit.standard.allowed"),
        Some(2)
    );
    assert_eq!(
        host.metric("understudy.ratelimit.standard.limited"),
        Some(1)
    );
    assert_eq!(host.metric("understudy.ratelimit.tenants"), Some(1));
    // Another tenant is unaffected, and a second later t1 is let in again.
    assert_eq!(
        request(&root, &host, 5, &[(":path", "/x"), ("x-tenant", "t2")]).1,
        Action::Continue
    );
    host.advance_ms(1000);
    assert_eq!(request(&root, &host, 6, &headers).1, Action::Continue);
}

#[test]
fn shadow_mode_counts_and_lets_through() {
    let host = FakeHost::new();
    let root = configured(&host, rate_limited(json!({"shadow": true})));
    for id in 2..6 {
        assert_eq!(
            request(&root, &host, id, &[(":path", "/x"), ("x-tenant", "t1")]).1,
            Action::Continue
        );
    }
    assert!(host.replies().is_empty());
    assert_eq!(
        host.metric("understudy.ratelimit.standard.allowed"),
        Some(2)
    );
    assert_eq!(
        host.metric("understudy.ratelimit.standard.shadow_limited"),
        Some(2)
    );
    assert_eq!(
        host.metric("understudy.ratelimit.standard.limited"),
        Some(0)
    );
}

#[test]
fn failing_shared_data_never_blocks_traffic_and_cas_conflicts_are_retried() {
    let host = FakeHost::new();
    let root = configured(&host, rate_limited(json!({})));
    host.with(|s| s.fail_shared = true);
    for id in 2..10 {
        assert_eq!(
            request(&root, &host, id, &[(":path", "/x"), ("x-tenant", "t1")]).1,
            Action::Continue
        );
    }
    assert!(host.replies().is_empty());
    assert_eq!(
        host.metric("understudy.ratelimit.standard.allowed"),
        Some(0),
        "uncounted"
    );
    // Configure wrote the fill map before the host started failing; no
    // tenant was written since.
    assert!(
        logs(&host).contains("rate-limit write failed")
            || host.with(|s| !s
                .shared
                .keys()
                .any(|k| k.starts_with("understudy/ratelimit/t/")))
    );

    host.with(|s| {
        s.fail_shared = false;
        s.cas_conflicts = 3;
    });
    assert_eq!(
        request(&root, &host, 20, &[(":path", "/x"), ("x-tenant", "t1")]).1,
        Action::Continue
    );
    assert_eq!(
        host.metric("understudy.ratelimit.standard.allowed"),
        Some(1)
    );
    assert_eq!(
        host.with(|s| s.cas_conflicts),
        0,
        "every conflict was read again"
    );
}

// === response ===

#[test]
fn an_answer_carries_ratelimit_headers_and_adapts_the_tenants_limit() {
    let host = FakeHost::new();
    let root = configured(&host, rate_limited(json!({})));
    let (mut http, _) = request(&root, &host, 2, &[(":path", "/x"), ("x-tenant", "t1")]);
    host.advance_ms(1500);
    host.set_map(RESP, &[(":status", "200")]);
    assert_eq!(http.on_http_response_headers(1, true), Action::Continue);
    let policy = host.header(RESP, "ratelimit-policy");
    assert!(
        policy
            .as_deref()
            .is_some_and(|p| p.starts_with("\"tenant\";q=2;w=1;pk=:")),
        "{policy:?}"
    );
    // adjust_ms passed and the answer was healthy: additive increase 2 → 3.
    let slot = host.with(|s| {
        s.shared
            .iter()
            .find(|(k, _)| k.starts_with("understudy/ratelimit/t/"))
            .map(|(_, (v, _))| v.clone())
    });
    let state = slot
        .as_deref()
        .and_then(understudy_core::ratelimit::TenantState::decode)
        .unwrap_or_else(|| panic!("no tenant slot"));
    assert_eq!(state.tenant, "t1");
    assert_eq!(state.rate, 3.0);
    assert!(state.latency_ms > 0.0, "the answer's latency was observed");
}

#[test]
fn answers_are_written_with_the_next_admission_until_an_adjustment_is_due() {
    let host = FakeHost::new();
    let root = configured(&host, rate_limited(json!({})));
    let slot = || {
        host.with(|s| {
            s.shared
                .iter()
                .find(|(k, _)| k.starts_with("understudy/ratelimit/t/"))
                .map(|(_, (v, cas))| (v.clone(), *cas))
        })
        .unwrap_or_else(|| panic!("no tenant slot"))
    };
    let state = |bytes: &[u8]| {
        understudy_core::ratelimit::TenantState::decode(bytes)
            .unwrap_or_else(|| panic!("undecodable slot"))
    };
    let (mut http, _) = request(&root, &host, 2, &[(":path", "/x"), ("x-tenant", "t1")]);
    let (_, written) = slot();
    // Answered well before the next adjustment: nothing is written.
    host.advance_ms(10);
    host.set_map(RESP, &[(":status", "503")]);
    http.on_http_response_headers(1, true);
    assert_eq!(slot().1, written, "the answer waits");
    // The tenant's next admission writes its slot anyway, with the answer in.
    request(&root, &host, 3, &[(":path", "/x"), ("x-tenant", "t1")]);
    let (bytes, cas) = slot();
    assert_ne!(cas, written);
    let s = state(&bytes);
    assert!(s.success < 1.0, "the 503 was folded in: {s:?}");
    assert_eq!(s.rate, 2.0, "no adjustment yet");
}

// === tick and call response: hedging ===

#[test]
fn every_feature_reads_the_request_headers_from_one_host_call() {
    let host = FakeHost::new();
    let root = configured(
        &host,
        json!({
            "routes": [{"name": "all",
                "hedge": {"cluster": "backup"},
                "shadow": {"cluster": "canary", "percent": 100, "sample_key": "X-User"},
                "dedupe": {"ttl_s": 60, "max_entries": 100}}],
            "rate_limit": {"identity": {"header": "x-tenant-id"},
                "tiers": {"anonymous": {"initial": 100, "min": 1, "max": 100},
                    "standard": {"initial": 100, "min": 1, "max": 100}}}
        }),
    );
    let (_, action) = request(
        &root,
        &host,
        2,
        &[
            (":path", "/a"),
            (":method", "GET"),
            ("x-tenant-id", "acme"),
            ("x-user", "u1"),
            ("x-understudy-hedge", "1"),
        ],
    );
    assert_eq!(action, Action::Continue);
    assert_eq!(host.with(|s| s.request_header_reads), 1);
    assert_eq!(
        host.metric("understudy.ratelimit.standard.allowed"),
        Some(1)
    );
    assert_eq!(host.metric("understudy.internal_headers_stripped"), Some(1));
    // The snapshot is taken after the forged header is gone, and the hedge's
    // generated key is added to the primary (and will be to its copy).
    assert_eq!(host.header(REQ, "x-understudy-hedge"), None);
    assert!(host.header(REQ, "idempotency-key").is_some());
}

fn hedged() -> Value {
    json!({"routes": [{"name": "all", "hedge": {
        "cluster": "backup",
        "delay": {"fixed": {"ms": 40}},
        "budget": {"percent": 100, "per_second_floor": 10, "burst": 10}
    }}]})
}

#[test]
fn a_silent_request_is_hedged_on_the_tick_and_the_hedge_answers_the_client() {
    let host = FakeHost::new();
    let mut root = configured(&host, hedged());
    assert_eq!(
        host.with(|s| s.tick_period_ms),
        Some(2),
        "a 40 ms delay, ticked every 2 ms"
    );
    let (mut http, action) = request(&root, &host, 7, &[(":path", "/slow"), (":method", "GET")]);
    assert_eq!(action, Action::Continue);
    let key = host.header(REQ, "idempotency-key").unwrap_or_default();
    assert!(!key.is_empty(), "the primary gets a generated key");

    host.advance_ms(10);
    root.on_tick();
    assert!(host.http_calls().is_empty(), "not due before the delay");
    host.advance_ms(40);
    root.on_tick();
    let calls = host.http_calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.cluster, "backup");
    let get = |k: &str| {
        call.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        get("idempotency-key"),
        Some(key),
        "both attempts carry one key"
    );
    assert_eq!(get(HEDGE_MARKER).as_deref(), Some("1"));
    assert_eq!(host.metric("understudy.hedge.all.sent"), Some(1));
    assert_eq!(host.metric("understudy.hedge.all.delay_ms"), Some(40));

    // The hedge answers first: the root replies on the stream's context.
    host.set_map(
        MapType::HttpCallResponseHeaders,
        &[(":status", "200"), ("set-cookie", "s=1"), ("etag", "v")],
    );
    host.set_buffer(BufferType::HttpCallResponseBody, b"hedged");
    root.on_http_call_response(call.token, 2, 6, 0);
    let replies = host.replies();
    assert_eq!(replies.len(), 1);
    let r = &replies[0];
    assert_eq!(
        (r.context, r.status, r.body.as_slice()),
        (Some(7), 200, &b"hedged"[..])
    );
    assert!(
        r.headers
            .contains(&(HEDGE_MARKER.to_owned(), "won".to_owned()))
    );
    assert!(r.headers.contains(&("etag".to_owned(), "v".to_owned())));
    assert!(
        !r.headers.iter().any(|(k, _)| k == "set-cookie"),
        "never another caller's cookie"
    );
    assert_eq!(host.metric("understudy.hedge.all.hedge_wins"), Some(1));
    http.on_log();
    assert_eq!(host.metric("understudy.hedge.pending"), Some(0));
}

#[test]
fn a_failed_primary_is_held_until_every_hedge_failed_then_released() {
    let host = FakeHost::new();
    let mut root = configured(&host, hedged());
    let (mut http, _) = request(&root, &host, 9, &[(":path", "/x"), (":method", "GET")]);
    host.advance_ms(50);
    root.on_tick();
    let token = host.http_calls()[0].token;
    host.set_map(RESP, &[(":status", "503")]);
    assert_eq!(
        http.on_http_response_headers(1, false),
        Action::Pause,
        "held for the hedge"
    );
    assert_eq!(http.on_http_response_body(10, true), Action::Pause);
    host.set_map(MapType::HttpCallResponseHeaders, &[(":status", "502")]);
    root.on_http_call_response(token, 1, 0, 0);
    assert_eq!(host.with(|s| s.resumed.clone()), vec![9]);
    assert!(host.replies().is_empty());
    assert_eq!(host.metric("understudy.hedge.all.primary_wins"), Some(1));
}

#[test]
fn a_spent_budget_or_a_refused_call_gives_the_stream_up() {
    let host = FakeHost::new();
    let mut root = configured(
        &host,
        json!({"routes": [{"name": "all", "hedge": {
            "cluster": "backup",
            "delay": {"fixed": {"ms": 40}},
            "budget": {"percent": 100, "per_second_floor": 1, "burst": 1}
        }}]}),
    );
    for id in [2, 3] {
        request(&root, &host, id, &[(":path", "/x"), (":method", "GET")]);
    }
    host.advance_ms(50);
    root.on_tick();
    assert_eq!(host.http_calls().len(), 1, "one token in the budget");
    assert_eq!(
        host.metric("understudy.hedge.all.budget_exhausted"),
        Some(1)
    );
    host.advance_ms(100);
    root.on_tick();
    assert_eq!(
        host.http_calls().len(),
        1,
        "the refused stream is not tried again"
    );

    host.with(|s| s.fail_calls = true);
    host.advance_ms(2000);
    request(&root, &host, 4, &[(":path", "/x"), (":method", "GET")]);
    host.advance_ms(50);
    root.on_tick();
    root.on_tick();
    assert_eq!(
        logs(&host).matches("failed to start").count(),
        1,
        "given up after one refusal"
    );
}

// === tick and call responses: reports ===

#[test]
fn usage_reports_go_out_on_the_tick_with_the_node_id() {
    let host = FakeHost::new();
    host.with(|s| s.node_id = "envoy-7".to_owned());
    let mut root = configured(
        &host,
        rate_limited(json!({"report": {"cluster": "understudy_xds", "interval_ms": 1000}})),
    );
    for id in 2..6 {
        request(&root, &host, id, &[(":path", "/x"), ("x-tenant", "t1")]);
    }
    root.on_tick();
    let calls = host.grpc_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].service.as_str(), calls[0].method.as_str()),
        ("understudy.v1.ReportService", "PushUsage")
    );
    let report = UsageReport::decode(calls[0].message.as_slice()).unwrap_or_default();
    assert_eq!(report.node_id, "envoy-7");
    assert_eq!(report.tenants.len(), 1);
    assert_eq!(
        (report.tenants[0].allowed, report.tenants[0].limited),
        (2, 2)
    );
    // Not due again within the interval, and nothing to say after it.
    root.on_tick();
    host.advance_ms(1000);
    root.on_tick();
    assert_eq!(host.grpc_calls().len(), 1);
}

fn shadowed() -> Value {
    json!({
        "routes": [{"name": "orders", "shadow": {"cluster": "canary", "percent": 100}}],
        "shadow_report": {"cluster": "understudy_xds", "interval_ms": 1000, "max_records": 10}
    })
}

fn pushes(host: &FakeHost) -> Vec<crate::fake::GrpcCall> {
    host.grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Push")
        .collect()
}

/// One shadowed request whose copy answers differently.
fn mismatch(root: &mut Root, host: &FakeHost, id: u32) {
    mismatch_with(root, host, id, &[(":path", "/o"), (":method", "GET")]);
}

fn mismatch_with(root: &mut Root, host: &FakeHost, id: u32, headers: &[(&str, &str)]) {
    let (mut http, _) = request(root, host, id, headers);
    host.set_map(
        RESP,
        &[(":status", "200"), ("content-type", "application/json")],
    );
    http.on_http_response_headers(2, false);
    host.set_buffer(BufferType::HttpResponseBody, br#"{"total":1}"#);
    http.on_http_response_body(11, true);
    http.on_log();
    root.on_tick();
    let token = host.http_calls().last().map_or(0, |c| c.token);
    host.set_map(
        MapType::HttpCallResponseHeaders,
        &[(":status", "200"), ("content-type", "application/json")],
    );
    host.set_buffer(BufferType::HttpCallResponseBody, br#"{"total":2}"#);
    root.on_http_call_response(token, 2, 11, 0);
    root.on_tick();
}

#[test]
fn a_shadow_mismatch_is_reported_and_a_refused_batch_is_sent_again() {
    let host = FakeHost::new();
    let mut root = configured(&host, shadowed());
    mismatch(&mut root, &host, 2);
    assert_eq!(host.metric("understudy.shadow.orders.compared"), Some(1));
    assert_eq!(
        host.metric("understudy.shadow.orders.mismatched.serious"),
        Some(1)
    );
    // The tick that sent the copy was a report time with nothing to say;
    // the record waits for the next interval.
    assert!(pushes(&host).is_empty());
    host.advance_ms(1000);
    root.on_tick();
    let reports = pushes(&host);
    assert_eq!(reports.len(), 1);
    let batch = ReportBatch::decode(reports[0].message.as_slice()).unwrap_or_default();
    assert_eq!(batch.mismatches.len(), 1);
    assert_eq!(batch.mismatches[0].differences[0].path, "$.total");

    // The control plane refuses it: counted, and sent again with the next report.
    root.on_grpc_call_response(reports[0].token, 14, 0);
    assert_eq!(host.metric("understudy.shadow.reports_failed"), Some(1));
    host.advance_ms(1000);
    root.on_tick();
    let again = pushes(&host);
    assert_eq!(again.len(), 2);
    assert_eq!(again[1].message, reports[0].message);
    root.on_grpc_call_response(again[1].token, 0, 0);
    assert_eq!(host.metric("understudy.shadow.reports_sent"), Some(1));
}

#[test]
fn a_host_that_refuses_every_report_costs_one_try_per_batch_per_interval() {
    let host = FakeHost::new();
    let mut root = configured(&host, shadowed());
    let failed = |h: &FakeHost| h.metric("understudy.shadow.reports_failed").unwrap_or(0);
    // From now on the host refuses every report call at once (copies still go).
    host.with(|s| s.fail_grpc = true);
    mismatch(&mut root, &host, 2);
    host.advance_ms(1000);
    root.on_tick();
    assert_eq!(failed(&host), 1, "the batch failed and is kept");
    for n in 2..5 {
        host.advance_ms(1000);
        root.on_tick();
        // One more try of the kept batch per report, and the tick returns
        // (before, a failing resend was put back and taken again at once).
        assert_eq!(failed(&host), n);
    }
    assert!(pushes(&host).is_empty());
    // The host recovers: the kept batch goes out with the next report.
    host.with(|s| s.fail_grpc = false);
    host.advance_ms(1000);
    root.on_tick();
    let sent = pushes(&host);
    assert_eq!(sent.len(), 1);
    let batch = ReportBatch::decode(sent[0].message.as_slice()).unwrap_or_default();
    assert_eq!(
        batch.mismatches.len(),
        1,
        "the record survived the failures"
    );
}

// === the 100k-tenant bound, through the real glue (issue 19) ===

#[test]
fn a_hundred_thousand_tenants_stay_within_the_table_through_the_glue() {
    let host = FakeHost::new();
    // The tier's pool is lifted: this test is about the table, not the pool.
    let root = configured(
        &host,
        rate_limited(json!({
            "max_tenants": 1000,
            "tiers": {
                "anonymous": {"initial": 1, "min": 1, "max": 1},
                "standard": {"initial": 2, "min": 1, "max": 10, "pool_rate": 1e9}
            }
        })),
    );
    let mut http = stream(&root, 2);
    for i in 0..100_000u64 {
        let tenant = format!("tenant-{i}");
        host.set_map(REQ, &[(":path", "/x"), ("x-tenant", &tenant)]);
        host.with(|s| s.now_us = EPOCH_US + i);
        assert_eq!(
            http.on_http_request_headers(2, true),
            Action::Continue,
            "a new tenant starts with its allowance"
        );
    }
    let slots = host.with(|s| {
        s.shared
            .keys()
            .filter(|k| k.starts_with("understudy/ratelimit/t/"))
            .count()
    });
    assert!(slots <= 1000, "{slots} slots for max_tenants 1000");
    assert!(slots > 950, "two choices fill the table: {slots}");
    let tenants = host.metric("understudy.ratelimit.tenants").unwrap_or(0);
    let evictions = host.metric("understudy.ratelimit.evictions").unwrap_or(0);
    assert_eq!(tenants as usize, slots, "the gauge counts slots in use");
    assert_eq!(
        tenants + evictions,
        100_000,
        "every newcomer took a free slot or evicted"
    );
    assert!(host.replies().is_empty());
}

/// Two workers race for a slot never written before (CI once saw the
/// tenants gauge at 65 for a table of 64). Envoy checks a write's CAS
/// token only against a key that exists, so two workers that both read
/// the slot as absent both "succeed": the second write silently replaced
/// the first tenant, and both counted a new tenant. Here worker 2's whole
/// request runs just before one of worker 1's writes (the tenant slot,
/// the tier pool, the fill map): whatever the interleaving, the gauge is
/// the number of slots holding a tenant, and every counted admission
/// either took a free slot or counted an eviction.
#[test]
fn two_workers_racing_for_a_never_written_slot_count_one_tenant() {
    for prefix in [
        "understudy/ratelimit/t/",
        "understudy/ratelimit/pool/",
        "understudy/ratelimit/fill/",
    ] {
        let host = FakeHost::new();
        // One slot: every tenant's two candidates are slot 0.
        let config = rate_limited(json!({
            "max_tenants": 1,
            "tiers": {
                "anonymous": {"initial": 1, "min": 1, "max": 1},
                "standard": {"initial": 2, "min": 1, "max": 10, "pool_rate": 1e9}
            }
        }));
        let worker1 = configured(&host, config.clone());
        let worker2 = configured(&host, config);
        let other = Rc::clone(&host);
        *host.interleave.borrow_mut() = Some(crate::fake::Interleave {
            prefix: prefix.to_owned(),
            run: Box::new(move || {
                let action = request(&worker2, &other, 3, &[(":path", "/x"), ("x-tenant", "b")]).1;
                assert_eq!(action, Action::Continue, "{prefix}: b is let in");
            }),
        });
        let (_, action) = request(&worker1, &host, 2, &[(":path", "/x"), ("x-tenant", "a")]);
        assert_eq!(action, Action::Continue, "{prefix}: a is let in");
        assert!(
            host.interleave.borrow().is_none(),
            "{prefix}: worker 2 ran inside worker 1's admission"
        );
        let held: Vec<String> = host.with(|s| {
            s.shared
                .iter()
                .filter(|(k, _)| k.starts_with("understudy/ratelimit/t/"))
                .filter_map(|(_, (v, _))| understudy_core::ratelimit::TenantState::decode(v))
                .map(|t| t.tenant)
                .collect()
        });
        let tenants = host.metric("understudy.ratelimit.tenants").unwrap_or(0);
        let evictions = host.metric("understudy.ratelimit.evictions").unwrap_or(0);
        let admitted = host
            .metric("understudy.ratelimit.standard.allowed")
            .unwrap_or(0);
        assert_eq!(held.len(), 1, "{prefix}: one slot");
        assert_eq!(
            tenants, 1,
            "{prefix}: the gauge counts the one slot in use, not two writes ({held:?})"
        );
        assert_eq!(
            tenants + evictions,
            admitted,
            "{prefix}: each counted newcomer took a free slot or evicted"
        );
        assert!(
            admitted >= 1,
            "{prefix}: at least one admission was counted"
        );
    }
}

/// `segment_by`: each pair's counts travel in its segment, the record names
/// the segment, and a hostile value (spaces, the separator, a huge value)
/// becomes a short safe label; the route's totals are unchanged.
#[test]
fn shadow_counts_travel_per_segment_with_safe_labels() {
    let host = FakeHost::new();
    let mut config = shadowed();
    config["routes"][0]["shadow"]["segment_by"] =
        json!({"header": "X-Customer-Tier", "method": true});
    let mut root = configured(&host, config);
    let huge = "z".repeat(5_000);
    for (id, tier) in [
        (2, Some("gold")),
        (4, Some("gold")),
        (6, None),
        (8, Some("a b|c")),
        (10, Some(huge.as_str())),
    ] {
        let mut headers = vec![(":path", "/o"), (":method", "GET")];
        if let Some(t) = tier {
            headers.push(("x-customer-tier", t));
        }
        mismatch_with(&mut root, &host, id, &headers);
    }
    host.advance_ms(1000);
    root.on_tick();
    let reports = pushes(&host);
    assert_eq!(reports.len(), 1);
    let batch = ReportBatch::decode(reports[0].message.as_slice()).unwrap_or_default();
    let route = &batch.routes[0];
    assert_eq!(route.compared, 5, "the route's totals stay the totals");
    let segments: Vec<(String, u64, u64)> = route
        .segments
        .iter()
        .map(|s| (s.segment.clone(), s.compared, s.mismatched_serious))
        .collect();
    let long = format!(
        "GET|{}",
        "z".repeat(understudy_core::segment::MAX_VALUE_BYTES)
    );
    let mut want = vec![
        ("GET|-".to_owned(), 1, 1),
        ("GET|a_b_c".to_owned(), 1, 1),
        ("GET|gold".to_owned(), 2, 2),
        (long, 1, 1),
    ];
    want.sort();
    assert_eq!(segments, want);
    let labels: Vec<&str> = batch
        .mismatches
        .iter()
        .map(|m| m.traffic_segment.as_str())
        .collect();
    assert_eq!(labels[..3], ["GET|gold", "GET|gold", "GET|-"]);
}

/// A synthetic probe (pinned by the control plane's header) is never
/// shadowed, so probes cannot pass for compared live traffic; the next
/// request without the header is.
#[test]
fn a_probe_request_is_not_shadowed() {
    let host = FakeHost::new();
    let mut root = configured(&host, shadowed());
    let (mut http, _) = request(
        &root,
        &host,
        2,
        &[
            (":path", "/o"),
            (":method", "GET"),
            ("understudy-probe", "0123456789abcdef/canary"),
        ],
    );
    host.set_map(
        RESP,
        &[(":status", "200"), ("content-type", "application/json")],
    );
    http.on_http_response_headers(2, false);
    host.set_buffer(BufferType::HttpResponseBody, br#"{"total":1}"#);
    http.on_http_response_body(11, true);
    http.on_log();
    root.on_tick();
    assert!(host.http_calls().is_empty(), "no copy of a probe");
    assert_eq!(host.metric("understudy.shadow.orders.not_sampled"), Some(1));
    mismatch(&mut root, &host, 4);
    assert_eq!(host.http_calls().len(), 1);
    assert_eq!(host.metric("understudy.shadow.orders.compared"), Some(1));
}
