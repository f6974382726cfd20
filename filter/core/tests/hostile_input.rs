//! Property tests: the core's entry points fed arbitrary bytes and JSON
//! never panic (issue 10). cargo-fuzz needs nightly and the toolchain is
//! pinned to stable, so these are proptest runs with explicit case counts
//! (each `with_cases(N)` below is the number of cases run per test).

use proptest::prelude::*;
use serde_json::{Value, json};
use understudy_core::FilterConfig;
use understudy_core::compare::{self, CompareConfig, Response};
use understudy_core::dedupe::{self, Entry};
use understudy_core::ratelimit::{self, IdentityInput, RateLimitConfig};

/// Arbitrary JSON, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("routes".to_owned()),
                    Just("name".to_owned()),
                    Just("path_prefix".to_owned()),
                    Just("rate_limit".to_owned()),
                    Just("identity".to_owned()),
                    Just("tiers".to_owned()),
                    Just("dedupe".to_owned()),
                    Just("shadow".to_owned()),
                    Just("hedge".to_owned()),
                    Just("compare".to_owned()),
                    ".{0,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A filter config shaped like a real one, with arbitrary values in it.
fn arb_shaped_config() -> impl Strategy<Value = Value> {
    (arb_json(), arb_json(), arb_json(), arb_json()).prop_map(|(rl, dd, sh, cmp)| {
        json!({
            "routes": [
                {"name": "a", "path_prefix": "/a", "dedupe": dd},
                {"name": "b", "path_prefix": "/", "shadow": {"cluster": "c", "compare": cmp}},
                {"name": "c", "path_prefix": "/c", "shadow": sh}
            ],
            "rate_limit": rl
        })
    })
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((".{0,10}", ".{0,20}"), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn config_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = FilterConfig::from_json(&bytes);
    }

    #[test]
    fn identity_extraction_never_panics(
        header in proptest::option::of(".{0,200}"),
        api_key in proptest::option::of(".{0,64}"),
        authorization in proptest::option::of(".{0,300}"),
        claim in ".{0,12}",
    ) {
        let raw = json!({
            "identity": {"header": "x-tenant-id", "api_key_header": "x-api-key", "jwt_claim": claim},
            "tiers": {"anonymous": {"initial": 1, "min": 1, "max": 1}, "standard": {"initial": 1, "min": 1, "max": 1}}
        });
        let cfg = RateLimitConfig::from_raw(serde_json::from_value(raw).unwrap(), "rate_limit").unwrap();
        let t = ratelimit::identify(&cfg, &IdentityInput {
            header: header.as_deref(),
            api_key: api_key.as_deref(),
            authorization: authorization.as_deref(),
        });
        prop_assert!(!t.id.is_empty());
        prop_assert!(t.id.len() <= 1024);
        let _ = ratelimit::jwt_claim(authorization.as_deref().unwrap_or_default(), &claim);
    }

    #[test]
    fn dedupe_scope_and_fingerprint_never_panic_and_separate_callers(
        a in prop::collection::vec(any::<u8>(), 0..64),
        b in prop::collection::vec(any::<u8>(), 0..64),
        key in "[!-~]{1,64}",
        method in ".{0,8}",
        path in ".{0,64}",
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let ca = dedupe::caller_scope(&[("authorization", &a)]);
        let cb = dedupe::caller_scope(&[("authorization", &b)]);
        prop_assert_eq!(ca == cb, a == b);
        let (ka, kb) = (dedupe::scoped_key(&ca, &key), dedupe::scoped_key(&cb, &key));
        prop_assert_eq!(ka == kb, a == b);
        let fa = dedupe::scoped_fingerprint(&ca, &method, &path, &body);
        let fb = dedupe::scoped_fingerprint(&cb, &method, &path, &body);
        prop_assert_eq!(fa == fb, a == b);
        let _ = dedupe::slot_key("p", &ka, 1000);
        let _ = dedupe::validate_key(&String::from_utf8_lossy(&body));
    }

    #[test]
    fn stored_entries_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Entry::decode(&bytes);
        let _ = dedupe::read_slot(Some(&bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn config_parser_never_panics_on_json(v in arb_json()) {
        let _ = FilterConfig::from_json(v.to_string().as_bytes());
    }

    #[test]
    fn config_parser_never_panics_on_shaped_json(v in arb_shaped_config()) {
        let _ = FilterConfig::from_json(v.to_string().as_bytes());
    }

    #[test]
    fn comparison_never_panics(
        status in (any::<u16>(), any::<u16>()),
        h in (headers(), headers()),
        body in (prop::collection::vec(any::<u8>(), 0..256), prop::collection::vec(any::<u8>(), 0..256)),
        json_bodies in (arb_json(), arb_json()),
        use_json in any::<bool>(),
    ) {
        let cfg = CompareConfig::default();
        let (pb, sb) = if use_json {
            (json_bodies.0.to_string().into_bytes(), json_bodies.1.to_string().into_bytes())
        } else {
            body
        };
        let primary = Response { status: status.0, headers: &h.0, body: &pb };
        let shadow = Response { status: status.1, headers: &h.1, body: &sb };
        let c = compare::compare(&cfg, &primary, &shadow);
        // Comparing a response with itself always matches.
        let same = compare::compare(&cfg, &primary, &primary);
        prop_assert!(same.matched(), "{same:?}");
        let _ = c.matched();
    }
}
