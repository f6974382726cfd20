//! Circuit-breaker flags: a rollout's flags are on for exactly the users
//! its canary serves, and off for everyone after a rollback, an abort or
//! a NACK halt. Pure: no I/O, no clock.
//!
//! A flag's state is never stored. It is [`super::machine::flag_state`]
//! of the rollout's persisted phase, weight and cohorts (as
//! [`super::machine::cohorts`] derives the cohorts), so the transition
//! that records a rollback is the one that turns the flags off: there is
//! no second write to lose. The machine writes the change into that
//! transition's audit entry. This module evaluates a state for one
//! request's context (OFREP).
//!
//! | phase | flags |
//! |---|---|
//! | shadow | off for everyone: no user is served by the canary yet (the shadow's copies are not answers) |
//! | canary step, awaiting approval, paused | on for the step's cohorts and for users whose key hashes under the weight |
//! | succeeded (and finalized) | on for everyone: the new version serves everyone |
//! | rolled back, aborted (a NACK halt is a rollback) | off for everyone |
//!
//! **The split agrees with Envoy.** A sticky service's route hashes the
//! user key with Envoy's `HashUtil::xxHash64` (seed 0) and picks the
//! weighted cluster by `hash % 100` against the running sum of weights,
//! canary first ([`crate::xds::resources`]). [`in_split`] is the same
//! rule, so a user the flag is on for is a user Envoy sends to the canary
//! (`tests/tests/flags.rs` checks it against a real Envoy).
//!
//! **Evaluation context** ([`Context`]): OpenFeature's `targetingKey` is
//! the user key (the sticky header's or cookie's value); any other string
//! attribute named like a cohort's header or cookie (`"x-user-group":
//! "internal"`) matches that cohort. A context is hostile input: at most
//! [`MAX_ATTRIBUTES`] attributes, names of [`MAX_NAME`] bytes and string
//! values of [`MAX_VALUE`] bytes; nested values are refused.

use serde::Serialize;
use xxhash_rust::xxh64::xxh64;

use super::machine::FlagState;
use crate::model::Cohort;

/// Most attributes an evaluation context may carry.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute name, in bytes.
pub const MAX_NAME: usize = 256;
/// Longest string value (the targeting key included), in bytes.
pub const MAX_VALUE: usize = 1024;

/// Whether user key `key` is on the canary at `weight` %: Envoy's rule
/// for a sticky route (`xxHash64(key, 0) % 100 < weight`, canary first).
pub fn in_split(key: &[u8], weight: u32) -> bool {
    xxh64(key, 0) % 100 < u64::from(weight.min(100))
}

/// A validated OpenFeature evaluation context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    pub targeting_key: Option<String>,
    /// String attributes other than the targeting key, by name.
    pub attributes: Vec<(String, String)>,
}

/// Why a context was refused; OFREP's `INVALID_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("context{at}: {reason}")]
pub struct ContextError {
    /// Where, like `.targetingKey` or `["x-user-group"]`; empty for the whole.
    pub at: String,
    pub reason: String,
}

impl Context {
    /// Reads an OFREP `context` object. Numbers, booleans and nulls are
    /// accepted and ignored (nothing matches on them); nested objects and
    /// arrays, too many attributes and over-long names or strings are
    /// refused.
    pub fn from_json(value: Option<&serde_json::Value>) -> Result<Self, ContextError> {
        let refuse = |at: String, reason: String| ContextError { at, reason };
        let map = match value {
            None | Some(serde_json::Value::Null) => return Ok(Self::default()),
            Some(serde_json::Value::Object(map)) => map,
            Some(_) => return Err(refuse(String::new(), "must be an object".into())),
        };
        if map.len() > MAX_ATTRIBUTES {
            return Err(refuse(
                String::new(),
                format!("at most {MAX_ATTRIBUTES} attributes, got {}", map.len()),
            ));
        }
        let mut out = Self::default();
        for (name, value) in map {
            let shown: String = name.chars().take(64).collect();
            let at = format!("[{shown:?}]");
            if name.len() > MAX_NAME {
                return Err(refuse(at, format!("names are at most {MAX_NAME} bytes")));
            }
            match value {
                serde_json::Value::String(s) if s.len() > MAX_VALUE => {
                    return Err(refuse(at, format!("at most {MAX_VALUE} bytes")));
                }
                serde_json::Value::String(s) if name == "targetingKey" => {
                    out.targeting_key = Some(s.clone());
                }
                serde_json::Value::String(s) => out.attributes.push((name.clone(), s.clone())),
                serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                    return Err(refuse(at, "nested values are not supported".into()));
                }
                _ if name == "targetingKey" => {
                    return Err(refuse(at, "must be a string".into()));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the context belongs to `cohort`: an attribute named like its
    /// header or cookie, with its value (or any value when it names none).
    pub fn in_cohort(&self, cohort: &Cohort) -> bool {
        let (name, value) = match cohort {
            Cohort::Header { name, value } | Cohort::Cookie { name, value } => (name, value),
        };
        self.attribute(name)
            .is_some_and(|v| value.as_deref().is_none_or(|want| want == v))
    }
}

/// OpenFeature's resolution reasons that an evaluation gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// On (or off) for everyone alike.
    Static,
    /// Off: the rollout has not put anyone on the canary yet.
    Default,
    /// Off: a rollback or abort turned it off.
    Disabled,
    /// On: the context matched a cohort.
    TargetingMatch,
    /// By the hash of the targeting key against the weight.
    Split,
}

/// One flag's value for one context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    pub value: bool,
    pub reason: Reason,
}

impl Evaluation {
    /// OFREP's `variant`: `on` or `off`.
    pub fn variant(&self) -> &'static str {
        if self.value { "on" } else { "off" }
    }
}

/// Why a flag could not be evaluated for a context: OFREP's
/// `TARGETING_KEY_MISSING` (the flag is on for some users only, and the
/// context names no user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the flag is on for {weight} % of users: the context needs a targetingKey (the sticky user key)"
)]
pub struct TargetingKeyMissing {
    pub weight: u32,
}

/// The flag's value for `ctx` in `state`.
pub fn evaluate(state: &FlagState, ctx: &Context) -> Result<Evaluation, TargetingKeyMissing> {
    let off = |reason| Evaluation {
        value: false,
        reason,
    };
    match state {
        FlagState::Nobody { disabled: true } => Ok(off(Reason::Disabled)),
        FlagState::Nobody { disabled: false } => Ok(off(Reason::Default)),
        FlagState::Everyone => Ok(Evaluation {
            value: true,
            reason: Reason::Static,
        }),
        FlagState::Canary { weight, cohorts } => {
            // Cohort routes come first in Envoy, whatever the weight.
            if cohorts.iter().any(|c| ctx.in_cohort(c)) {
                return Ok(Evaluation {
                    value: true,
                    reason: Reason::TargetingMatch,
                });
            }
            match (&ctx.targeting_key, *weight) {
                (_, 0) => Ok(off(Reason::Default)),
                (_, 100) => Ok(Evaluation {
                    value: true,
                    reason: Reason::Static,
                }),
                (Some(key), w) => Ok(Evaluation {
                    value: in_split(key.as_bytes(), w),
                    reason: Reason::Split,
                }),
                (None, w) => Err(TargetingKeyMissing { weight: w }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FlagHeader;
    use crate::rollout::judge::Verdict;
    use crate::rollout::machine::{
        Action, Event, Phase, Rollout, decide, flag_header as header, flag_state as state, start,
    };
    use crate::rollout::spec::RolloutSpec;

    const T0: u64 = 1_700_000_000_000;

    fn rollout(shadow: bool) -> Rollout {
        let mut s = serde_json::json!({
            "service": "shop", "owner": "team",
            "steps": [
                {"cohort": {"header": {"name": "x-user-group", "value": "internal"}}},
                {"weight": 20},
                {"weight": 100, "manual_gate": true},
            ],
            "stop_rules": {"max_error_rate_increase_pp": 1.0},
            "flags": [{"key": "new-checkout"}, {"key": "tax-v2"}],
        });
        if shadow {
            s["shadow"] = serde_json::json!({"route": "all", "percent": 100,
                "max_serious_rate": 0.01, "max_unexpected_rate": 0.01});
            s["stop_rules"]["max_unexpected_mismatch_rate"] = serde_json::json!(0.01);
        }
        let spec = RolloutSpec::from_yaml_or_json(&s.to_string()).unwrap();
        let mut r = start("shop-1".into(), spec, "ana", 0, T0).rollout;
        r.applied = true;
        r
    }

    fn judged(r: &Rollout, verdict: Verdict) -> crate::rollout::machine::Decision {
        let judgement = crate::rollout::judge::Judgement {
            verdict,
            reason: "test".into(),
            checks: Vec::new(),
            queries: Vec::new(),
        };
        decide(r, Event::Judged(judgement), T0 + 1).unwrap()
    }

    fn audit_reason(d: &crate::rollout::machine::Decision) -> String {
        d.audit()
            .first()
            .map(|a| a.reason.clone())
            .unwrap_or_default()
    }

    fn ctx(key: Option<&str>, attrs: &[(&str, &str)]) -> Context {
        Context {
            targeting_key: key.map(str::to_owned),
            attributes: attrs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn flags_follow_the_phase_through_steps_and_off_at_a_rollback() {
        let internal = Cohort::Header {
            name: "x-user-group".into(),
            value: Some("internal".into()),
        };
        let r = rollout(true);
        assert_eq!(state(&r), FlagState::Nobody { disabled: false });
        // Shadow passes: the cohort step turns the flags on for the cohort.
        let d = judged(&r, Verdict::Promote);
        assert_eq!(
            state(&d.rollout),
            FlagState::Canary {
                weight: 0,
                cohorts: vec![internal.clone()]
            }
        );
        assert!(
            audit_reason(&d)
                .ends_with("; flags on for the canary (0 % of users, x-user-group: internal): new-checkout, tax-v2"),
            "{}",
            audit_reason(&d)
        );
        let d = judged(&d.rollout, Verdict::Promote);
        assert_eq!(
            state(&d.rollout),
            FlagState::Canary {
                weight: 20,
                cohorts: vec![internal.clone()]
            }
        );
        // The gated last step waits at 20 %: the flags stay as they are,
        // and the audit entry says nothing of them.
        let gated = judged(&d.rollout, Verdict::Promote);
        assert_eq!(state(&gated.rollout), state(&d.rollout));
        assert!(!audit_reason(&gated).contains("flags"));
        // A rollback at 20 % turns them off in the same transition.
        let back = judged(&d.rollout, Verdict::Rollback);
        assert_eq!(state(&back.rollout), FlagState::Nobody { disabled: true });
        assert!(
            audit_reason(&back).ends_with("; flags off: new-checkout, tax-v2"),
            "{}",
            audit_reason(&back)
        );
        // Abort, and a NACK halt, likewise.
        let abort = decide(
            &d.rollout,
            Event::Verb {
                action: Action::Abort,
                actor: "bo".into(),
            },
            T0 + 2,
        )
        .unwrap();
        assert_eq!(state(&abort.rollout), FlagState::Nobody { disabled: true });
        assert!(audit_reason(&abort).ends_with("; flags off: new-checkout, tax-v2"));
        let halt = decide(&gated.rollout, Event::Rejected("NACK".into()), T0 + 2).unwrap();
        assert_eq!(state(&halt.rollout), FlagState::Nobody { disabled: true });
        assert!(audit_reason(&halt).ends_with("; flags off: new-checkout, tax-v2"));
        // Promoted through the gate: on for everyone.
        let open = decide(
            &gated.rollout,
            Event::Verb {
                action: Action::Promote,
                actor: "bo".into(),
            },
            T0 + 3,
        )
        .unwrap();
        let done = judged(&open.rollout, Verdict::Promote);
        assert_eq!(done.rollout.phase, Phase::Succeeded);
        assert_eq!(state(&done.rollout), FlagState::Everyone);
        assert!(audit_reason(&done).ends_with("; flags on for everyone: new-checkout, tax-v2"));
    }

    #[test]
    fn the_routes_header_follows_the_state_and_is_empty_without_flags() {
        let r = rollout(false);
        let h = header(&r);
        assert_eq!((h.keys.len(), h.canary, h.stable), (2, true, false));
        assert_eq!(h.value(true), "new-checkout=on,tax-v2=on");
        assert_eq!(h.value(false), "new-checkout=off,tax-v2=off");
        let back = judged(&r, Verdict::Rollback).rollout;
        let h = header(&back);
        assert_eq!((h.canary, h.stable), (false, false));
        let mut done = r.clone();
        done.phase = Phase::Succeeded;
        let h = header(&done);
        assert_eq!((h.canary, h.stable), (true, true));
        done.spec.flags.clear();
        assert_eq!(header(&done), FlagHeader::default());
    }

    #[test]
    fn a_rollout_without_flags_audits_as_before() {
        let mut r = rollout(false);
        r.spec.flags.clear();
        let d = judged(&r, Verdict::Rollback);
        assert!(!audit_reason(&d).contains("flags"), "{}", audit_reason(&d));
    }

    #[test]
    fn the_split_is_envoys_xxhash64_mod_100() {
        // xxHash64 of the empty input with seed 0 (the algorithm's test vector).
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert!(!in_split(b"anyone", 0));
        assert!(in_split(b"anyone", 100));
        // Monotone in the weight: a user on at 20 % stays on at 50 %.
        let users: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let on = |w| {
            users
                .iter()
                .filter(|u| in_split(u.as_bytes(), w))
                .cloned()
                .collect::<Vec<_>>()
        };
        let (at20, at50) = (on(20), on(50));
        assert!(at20.iter().all(|u| at50.contains(u)));
        // About a fifth: binomial(2000, 0.2) sd ≈ 18.
        assert!((330..=470).contains(&at20.len()), "{}", at20.len());
    }

    #[test]
    fn evaluation_by_cohort_key_and_weight() {
        let internal = Cohort::Header {
            name: "x-user-group".into(),
            value: Some("internal".into()),
        };
        let beta = Cohort::Cookie {
            name: "beta".into(),
            value: None,
        };
        let canary = FlagState::Canary {
            weight: 20,
            cohorts: vec![internal, beta],
        };
        let ok = |s: &FlagState, c: &Context| evaluate(s, c).unwrap();
        let hit = ok(&canary, &ctx(None, &[("x-user-group", "internal")]));
        assert_eq!((hit.value, hit.reason), (true, Reason::TargetingMatch));
        assert_eq!(
            ok(&canary, &ctx(None, &[("beta", "anything")])).reason,
            Reason::TargetingMatch
        );
        // Another group value is no match; without a key, no answer.
        assert_eq!(
            evaluate(&canary, &ctx(None, &[("x-user-group", "external")])),
            Err(TargetingKeyMissing { weight: 20 })
        );
        for i in 0..200 {
            let key = format!("u{i}");
            let e = ok(&canary, &ctx(Some(&key), &[]));
            assert_eq!(e.value, in_split(key.as_bytes(), 20));
            assert_eq!(e.reason, Reason::Split);
            assert_eq!(e.variant(), if e.value { "on" } else { "off" });
        }
        let zero = FlagState::Canary {
            weight: 0,
            cohorts: vec![],
        };
        assert_eq!(ok(&zero, &ctx(None, &[])).reason, Reason::Default);
        assert!(ok(&FlagState::Everyone, &ctx(None, &[])).value);
        let off = ok(&FlagState::Nobody { disabled: true }, &ctx(Some("u1"), &[]));
        assert_eq!((off.value, off.reason), (false, Reason::Disabled));
    }

    #[test]
    fn a_hostile_context_is_refused_and_a_fair_one_read() {
        let read = |v: serde_json::Value| Context::from_json(Some(&v));
        let fair = read(serde_json::json!({
            "targetingKey": "user-1", "x-user-group": "internal", "age": 3, "vip": true, "x": null,
        }))
        .unwrap();
        assert_eq!(fair.targeting_key.as_deref(), Some("user-1"));
        assert_eq!(
            fair.attributes,
            vec![("x-user-group".into(), "internal".into())]
        );
        assert_eq!(Context::from_json(None).unwrap(), Context::default());
        let too_many: serde_json::Map<String, serde_json::Value> = (0..=MAX_ATTRIBUTES)
            .map(|i| (format!("a{i}"), serde_json::json!("v")))
            .collect();
        for (bad, says) in [
            (serde_json::json!([1]), "context: must be an object"),
            (serde_json::Value::Object(too_many), "at most 64 attributes"),
            (
                serde_json::json!({"targetingKey": 7}),
                "[\"targetingKey\"]: must be a string",
            ),
            (serde_json::json!({"a": {"b": 1}}), "[\"a\"]: nested values"),
            (serde_json::json!({"a": ["b"]}), "[\"a\"]: nested values"),
            (
                serde_json::json!({"a": "v".repeat(MAX_VALUE + 1)}),
                "at most 1024 bytes",
            ),
            (
                serde_json::json!({"a".repeat(MAX_NAME + 1): "v"}),
                "names are at most 256 bytes",
            ),
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
