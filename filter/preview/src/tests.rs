//! The preview equals calling `understudy-core` directly, over several rule
//! sets; bad input is an error naming the field, never a panic.

use super::*;
use serde_json::json;
use understudy_core::compare::{Bucket, Comparison, DiffKind};

fn side(status: u16, body: serde_json::Value) -> serde_json::Value {
    json!({
        "status": status,
        "headers": [{"name": "content-type", "value": "application/json"}],
        "body": body.to_string(),
    })
}

/// Pairs that differ in every way the rules below address.
fn samples() -> serde_json::Value {
    json!({"route": "orders", "samples": [
        {"id": "1", "primary": side(200, json!({"total": 10.0, "meta": {"ts": 1, "host": "a"}, "tags": ["x", "y"]})),
                    "shadow":  side(200, json!({"total": 10.004, "meta": {"ts": 2, "host": "b"}, "tags": ["y", "x"]}))},
        {"id": "2", "primary": side(200, json!({"lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}], "total": 5})),
                    "shadow":  side(200, json!({"lines": [{"sku": "B", "qty": 2}, {"sku": "A", "qty": 1}], "total": 5}))},
        {"id": "3", "primary": side(200, json!({"total": 100, "price": 1000.0})),
                    "shadow":  side(201, json!({"total": 100, "price": 1000.5, "new": true}))},
        {"id": "4", "primary": side(200, json!({"same": 1})), "shadow": side(200, json!({"same": 1}))},
        {"id": "5", "primary": side(200, json!({"total": 3})), "shadow": side(500, json!({"error": "boom"}))},
        {"id": "6", "primary": {"status": 200, "headers": [{"name": "content-type", "value": "text/plain"}], "body_base64": "aGVsbG8="},
                    "shadow":  {"status": 200, "headers": [{"name": "content-type", "value": "text/plain"}], "body": "hello"}},
    ]})
}

/// What the filter computes for each sample: core's own types, called directly.
fn direct(rules: &serde_json::Value, samples: &serde_json::Value) -> Vec<Comparison> {
    let raw: RawCompareConfig = serde_json::from_value(rules.clone()).unwrap();
    let cfg = CompareConfig::from_raw(raw, "compare").unwrap();
    let decode = |s: &serde_json::Value| -> (u16, Vec<(String, String)>, Vec<u8>) {
        let headers = s["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["name"].as_str().unwrap().to_owned(),
                    h["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let body = match s["body"].as_str() {
            Some(t) => t.as_bytes().to_vec(),
            None => base64::engine::general_purpose::STANDARD
                .decode(s["body_base64"].as_str().unwrap())
                .unwrap(),
        };
        (s["status"].as_u64().unwrap() as u16, headers, body)
    };
    samples["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let (ps, ph, pb) = decode(&s["primary"]);
            let (ss, sh, sb) = decode(&s["shadow"]);
            compare(
                &cfg,
                &Response {
                    status: ps,
                    headers: &ph,
                    body: &pb,
                },
                &Response {
                    status: ss,
                    headers: &sh,
                    body: &sb,
                },
            )
        })
        .collect()
}

fn rule_sets() -> Vec<serde_json::Value> {
    vec![
        json!({}),
        json!({"ignore": ["$.meta.*"]}),
        json!({"ignore": ["/meta/ts", "$.new"], "report_ignored": false}),
        json!({"tolerance": [{"path": "$.total", "absolute": 0.01}, {"path": "/price", "relative": 0.001}]}),
        json!({"unordered": ["$.tags"]}),
        json!({"match_by_id": [{"path": "$.lines", "id": "sku"}]}),
        json!({"ignore": ["$.meta"], "tolerance": [{"path": "$.total", "absolute": 0.01}],
               "unordered": ["$.tags"], "match_by_id": [{"path": "$.lines", "id": "sku"}],
               "headers": ["content-type"], "max_differences": 1}),
    ]
}

#[test]
fn preview_equals_core_compare_for_every_rule_set() {
    let samples = samples();
    for rules in rule_sets() {
        let got = preview(&rules.to_string(), &samples.to_string()).unwrap();
        let want = direct(&rules, &samples);
        assert_eq!(got.samples.len(), want.len(), "rules {rules}");
        for (g, w) in got.samples.iter().zip(&want) {
            assert_eq!(&g.comparison, w, "rules {rules}, sample {}", g.id);
            assert_eq!(g.matched, w.matched());
        }
        let matched = want.iter().filter(|c| c.matched()).count();
        assert_eq!(got.compared, want.len());
        assert_eq!(got.matched, matched, "rules {rules}");
        assert_eq!(got.match_rate, Some(matched as f64 / want.len() as f64));
    }
}

#[test]
fn rules_change_what_remains() {
    let samples = samples().to_string();
    let none = preview("{}", &samples).unwrap();
    let ts = |p: &Preview| p.paths.iter().find(|c| c.path == "$.meta.ts").cloned();
    assert_eq!(ts(&none).map(|c| c.serious), Some(1));
    // Ignored and reported: the difference is still listed, as noise.
    let ignored = preview(r#"{"ignore": ["$.meta.*"]}"#, &samples).unwrap();
    assert_eq!(ts(&ignored).map(|c| (c.serious, c.noise)), Some((0, 1)));
    // Ignored and not reported: gone.
    let gone = preview(
        r#"{"ignore": ["$.meta.*"], "report_ignored": false}"#,
        &samples,
    )
    .unwrap();
    assert_eq!(ts(&gone), None);
    // Sample 1 differed in total (tolerable), meta (ignored) and tag order
    // (unordered): all three rules together make it match.
    let all = preview(
        r#"{"ignore": ["$.meta"], "tolerance": [{"path": "$.total", "absolute": 0.01}], "unordered": ["$.tags"]}"#,
        &samples,
    )
    .unwrap();
    let one = |p: &Preview| p.samples.iter().find(|s| s.id == "1").unwrap().matched;
    assert!(!one(&none));
    assert!(one(&all));
    assert!(all.matched > none.matched);
    // The order-only change on an id-matched array is noise.
    let by_id = preview(
        r#"{"match_by_id": [{"path": "$.lines", "id": "sku"}]}"#,
        &samples,
    )
    .unwrap();
    let two = by_id.samples.iter().find(|s| s.id == "2").unwrap();
    assert!(two.matched);
    assert!(
        two.comparison
            .differences
            .iter()
            .all(|d| d.kind == DiffKind::OrderOnly && d.bucket == Bucket::Noise)
    );
}

#[test]
fn no_samples_has_no_rate() {
    let p = preview("{}", r#"{"samples": []}"#).unwrap();
    assert_eq!((p.compared, p.match_rate), (0, None));
}

fn rules_error(rules: &str) -> String {
    let e = preview(rules, &samples().to_string()).unwrap_err();
    assert!(matches!(e, PreviewError::Rules(_)), "{e}");
    e.to_string()
}

#[test]
fn bad_rules_name_the_field() {
    let cases = [
        (r#"{"ignore": ["$.a[x"]}"#, "compare.ignore[0]"),
        (r#"{"ignore": ["$.ok", "no-dollar"]}"#, "compare.ignore[1]"),
        (
            r#"{"tolerance": [{"path": "$.a", "absolute": -1}]}"#,
            "compare.tolerance[0].absolute",
        ),
        (
            r#"{"tolerance": [{"path": "$.a"}]}"#,
            "compare.tolerance[0]",
        ),
        (
            r#"{"match_by_id": [{"path": "$.a", "id": ""}]}"#,
            "compare.match_by_id[0].id",
        ),
        (
            r#"{"unordered": ["$.a"], "match_by_id": [{"path": "$.a", "id": "k"}]}"#,
            "compare.match_by_id[0].path",
        ),
        (r#"{"headers": ["bad header"]}"#, "compare.headers[0]"),
        (r#"{"max_depth": 0}"#, "compare.max_depth"),
        // Shape errors: serde's message, with the path in front.
        (r#"{"ignore": "$.a"}"#, "compare.ignore"),
        (
            r#"{"tolerance": [{"path": "$.a", "absolute": "x"}]}"#,
            "compare.tolerance[0].absolute",
        ),
        (r#"{"ignor": []}"#, "ignor"),
        ("not json", "compare"),
    ];
    for (rules, field) in cases {
        let message = rules_error(rules);
        assert!(
            message.contains(field),
            "{rules}: {message:?} should name {field}"
        );
    }
    let e = preview(r#"{"max_depth": 0}"#, r#"{"samples": []}"#).unwrap_err();
    assert_eq!(e.field().as_deref(), Some("compare.max_depth"));
}

#[test]
fn bad_samples_are_errors() {
    for samples in [
        "",
        "[]",
        r#"{"samples": [{"id": "1"}]}"#,
        r#"{"samples": [{"id": "1", "primary": {"status": 70000}, "shadow": {"status": 200}}]}"#,
        r#"{"samples": [{"id": "1", "primary": {"status": 200, "body_base64": "***"}, "shadow": {"status": 200}}]}"#,
    ] {
        let e = preview("{}", samples).unwrap_err();
        assert!(matches!(e, PreviewError::Samples(_)), "{samples}: {e}");
    }
    let many: Vec<_> = (0..=MAX_SAMPLES)
        .map(
            |i| json!({"id": i.to_string(), "primary": {"status": 200}, "shadow": {"status": 200}}),
        )
        .collect();
    let e = preview("{}", &json!({ "samples": many }).to_string()).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
}

#[test]
fn json_answer_carries_the_error_and_field() {
    let answer: serde_json::Value = serde_json::from_str(&preview_json(
        r#"{"ignore": ["$.a[x"]}"#,
        r#"{"samples": []}"#,
    ))
    .unwrap();
    assert_eq!(answer["field"], "compare.ignore[0]");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("compare.ignore[0]")
    );
    let ok: serde_json::Value =
        serde_json::from_str(&preview_json("{}", &samples().to_string())).unwrap();
    assert_eq!(ok["compared"], 6);
    assert!(ok["samples"][0]["comparison"]["differences"].is_array());
}

proptest::proptest! {
    #[test]
    fn hostile_input_never_panics(rules in ".{0,200}", samples in ".{0,200}") {
        let _ = preview_json(&rules, &samples);
        let _ = preview_json(&rules, r#"{"samples": []}"#);
        let _ = preview_json("{}", &samples);
    }
}
