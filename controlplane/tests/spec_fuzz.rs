//! Property tests of the rollout spec parser, the API's door for operator
//! text: whatever bytes arrive as YAML or JSON, parsing returns a value or
//! an error and never panics; and a spec built from the known fields with
//! arbitrary values either validates or names a field.
//!
//! No coverage-guided fuzzer runs here (cargo-fuzz needs a nightly toolchain,
//! and this workspace pins stable), so these are proptest properties.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use understudy_controlplane::rollout::spec::RolloutSpec;

/// Field names the parser knows, so generated documents reach past the
/// first "unknown field" check.
const KEYS: &[&str] = &[
    "service",
    "owner",
    "description",
    "stop_rules",
    "max_error_rate_increase_pp",
    "max_p99_ratio",
    "min_p99_increase_ms",
    "max_unexpected_mismatch_rate",
    "halt_on_nack",
    "shadow",
    "route",
    "percent",
    "min_duration_s",
    "min_compared",
    "max_serious_rate",
    "max_unexpected_rate",
    "defaults",
    "min_requests",
    "steps",
    "weight",
    "manual_gate",
    "analysis",
    "interval_s",
    "max_staleness_s",
    "min_requests_per_side",
    "confidence",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            100.0,
            100.000_001,
            1e-300,
            1e300,
            -1.0,
            0.5,
            5.0,
        ])
        .prop_map(|f| json!(f)),
        "[a-z0-9._-]{0,12}".prop_map(Value::String),
        ".{0,16}".prop_map(Value::String),
    ]
}

fn document() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|kv| {
                let map: Map<String, Value> =
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                Value::Object(map)
            }),
        ]
    })
}

/// A spec with every section present and arbitrary values in it.
fn near_valid() -> impl Strategy<Value = Value> {
    (
        scalar(),
        scalar(),
        scalar(),
        scalar(),
        prop::collection::vec((scalar(), scalar()), 0..5),
        scalar(),
        scalar(),
    )
        .prop_map(|(pp, p99, rate, percent, steps, interval, confidence)| {
            json!({
                "service": "shop",
                "owner": "team@example.com",
                "stop_rules": {"max_error_rate_increase_pp": pp, "max_p99_ratio": p99,
                               "max_unexpected_mismatch_rate": rate},
                "shadow": {"route": "orders", "percent": percent},
                "steps": steps.into_iter().map(|(w, g)| json!({"weight": w, "manual_gate": g}))
                    .collect::<Vec<_>>(),
                "analysis": {"interval_s": interval, "confidence": confidence},
            })
        })
}

fn check(text: &str) {
    // The property is the absence of a panic; an error must say something.
    if let Err(e) = RolloutSpec::from_yaml_or_json(text) {
        assert!(!e.to_string().is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check(&text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_documents_never_panic_as_json_or_yaml(doc in document()) {
        check(&doc.to_string());
        if let Ok(yaml) = serde_norway::to_string(&doc) {
            check(&yaml);
        }
    }

    #[test]
    fn near_valid_specs_validate_or_name_a_field(doc in near_valid()) {
        match RolloutSpec::from_yaml_or_json(&doc.to_string()) {
            Ok(spec) => {
                // What validated is within its documented bounds.
                let last = spec.steps.last().map(|s| s.weight);
                prop_assert_eq!(last, Some(100));
                prop_assert!(spec.steps.iter().all(|s| s.weight <= 100));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
