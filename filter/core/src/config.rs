//! The filter's JSON configuration: the wire form ([`RawFilterConfig`]) and the
//! validated form ([`FilterConfig`]) the rest of the logic works with.
//!
//! The same document arrives inline in an Envoy bootstrap, as an Istio
//! WasmPlugin `pluginConfig`, or through ECDS from the control plane. The
//! control plane runs the same validation before it pushes, so a config the
//! filter would reject never leaves the API.

use serde::{Deserialize, Serialize};

use crate::dedupe::{DedupeConfig, RawDedupeConfig};
use crate::hedge::{HedgeConfig, RawHedgeConfig};
use crate::ratelimit::{RateLimitConfig, RawRateLimitConfig};
use crate::shadow::{RawShadowConfig, RawShadowReport, ShadowConfig, ShadowReport};
// The rules live in the bottom module `rules`; re-exported so callers keep
// one path for everything about the config.
pub use crate::http::is_header_name;
pub use crate::rules::{
    ConfigError, MAX_CLUSTER_LEN, MAX_NAME_LEN, validate_cluster, validate_name,
};

/// Routes are matched linearly on every request; the cap keeps that bounded.
pub const MAX_ROUTES: usize = 256;

/// The configuration exactly as written, before validation.
///
/// Unknown fields are rejected so that a typo (`"stat_prefx"`) is an error
/// rather than a silently ignored setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilterConfig {
    /// Prefix of every metric the filter defines (under Envoy's `wasmcustom.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat_prefix: Option<String>,
    /// Routes the filter knows by name, matched in order by path prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RawRoute>,
    /// Adaptive per-tenant rate limits for every request (see [`crate::ratelimit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RawRateLimitConfig>,
    /// Where shadow mismatch records and counters are sent (see [`crate::shadow`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_report: Option<RawShadowReport>,
}

/// One route as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Hedged retries for this route (see [`crate::hedge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<RawHedgeConfig>,
    /// Inbound duplicate suppression by Idempotency-Key (see [`crate::dedupe`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<RawDedupeConfig>,
    /// Shadow traffic with response comparison (see [`crate::shadow`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<RawShadowConfig>,
}

fn default_prefix() -> String {
    "/".to_owned()
}

/// A validated filter configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    stat_prefix: String,
    routes: Vec<Route>,
    rate_limit: Option<RateLimitConfig>,
    shadow_report: Option<ShadowReport>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub path_prefix: String,
    pub hedge: Option<HedgeConfig>,
    pub dedupe: Option<DedupeConfig>,
    pub shadow: Option<ShadowConfig>,
}

impl FilterConfig {
    /// Parses and validates the plugin configuration bytes Envoy hands the
    /// filter. Empty input means "all defaults", as when no configuration is set.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Self::try_from(RawFilterConfig::default());
        }
        let raw: RawFilterConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        Self::try_from(raw)
    }

    /// Validates a JSON value already parsed (tests, and tools that read
    /// the config out of a larger document).
    pub fn from_value(value: &serde_json::Value) -> Result<Self, ConfigError> {
        let raw =
            RawFilterConfig::deserialize(value).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        Self::try_from(raw)
    }

    pub fn stat_prefix(&self) -> &str {
        &self.stat_prefix
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn rate_limit(&self) -> Option<&RateLimitConfig> {
        self.rate_limit.as_ref()
    }

    pub fn shadow_report(&self) -> Option<&ShadowReport> {
        self.shadow_report.as_ref()
    }

    /// The first route (in configured order, as Envoy does) whose prefix matches `path`.
    pub fn match_route(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| path.starts_with(r.path_prefix.as_str()))
    }
}

/// What an empty config (`{}`) validates to: the default metric prefix,
/// no routes, no limits.
impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            stat_prefix: DEFAULT_STAT_PREFIX.to_owned(),
            routes: Vec::new(),
            rate_limit: None,
            shadow_report: None,
        }
    }
}

/// The metric prefix when the config names none.
pub const DEFAULT_STAT_PREFIX: &str = "understudy";

impl TryFrom<RawFilterConfig> for FilterConfig {
    type Error = ConfigError;

    fn try_from(raw: RawFilterConfig) -> Result<Self, Self::Error> {
        let stat_prefix = raw
            .stat_prefix
            .unwrap_or_else(|| DEFAULT_STAT_PREFIX.to_owned());
        validate_name("stat_prefix", &stat_prefix)?;
        if raw.routes.len() > MAX_ROUTES {
            return Err(ConfigError::TooManyRoutes {
                count: raw.routes.len(),
                max: MAX_ROUTES,
            });
        }
        let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.into_iter().enumerate() {
            validate_name(&format!("routes[{i}].name"), &r.name)?;
            if !r.path_prefix.starts_with('/') {
                return Err(ConfigError::InvalidPathPrefix {
                    field: format!("routes[{i}].path_prefix"),
                    value: r.path_prefix,
                });
            }
            if let Some(first) = routes.iter().position(|x| x.name == r.name) {
                return Err(ConfigError::DuplicateRoute {
                    name: r.name,
                    first,
                    second: i,
                });
            }
            let hedge = r
                .hedge
                .map(|h| HedgeConfig::from_raw(h, &format!("routes[{i}].hedge")))
                .transpose()?;
            let dedupe = r
                .dedupe
                .map(|d| DedupeConfig::from_raw(d, &format!("routes[{i}].dedupe")))
                .transpose()?;
            let shadow = r
                .shadow
                .map(|s| ShadowConfig::from_raw(s, &format!("routes[{i}].shadow")))
                .transpose()?;
            routes.push(Route {
                name: r.name,
                path_prefix: r.path_prefix,
                hedge,
                dedupe,
                shadow,
            });
        }
        let route_names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        let rate_limit = raw
            .rate_limit
            .map(|r| RateLimitConfig::with_routes(r, "rate_limit", &route_names))
            .transpose()?;
        let shadow_report = raw
            .shadow_report
            .map(|r| ShadowReport::from_raw(r, "shadow_report"))
            .transpose()?;
        Ok(Self {
            stat_prefix,
            routes,
            rate_limit,
            shadow_report,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_means_defaults() {
        let c = FilterConfig::from_json(b"  ").unwrap();
        assert_eq!(c.stat_prefix(), "understudy");
        assert!(c.routes().is_empty());
        assert_eq!(FilterConfig::from_json(b"{}").unwrap(), c);
    }

    #[test]
    fn routes_match_in_order() {
        let c = FilterConfig::from_json(
            br#"{"routes":[{"name":"api","path_prefix":"/api"},{"name":"all"}]}"#,
        )
        .unwrap();
        assert_eq!(c.match_route("/api/cart"), Some(0));
        assert_eq!(c.match_route("/index.html"), Some(1));
        let only_api =
            FilterConfig::from_json(br#"{"routes":[{"name":"api","path_prefix":"/api"}]}"#)
                .unwrap();
        assert_eq!(only_api.match_route("/"), None);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = FilterConfig::from_json(br#"{"stat_prefx":"x"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `stat_prefx`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_is_a_syntax_error() {
        let err = FilterConfig::from_json(b"{\"routes\": [").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
        let err = FilterConfig::from_json(b"[1,2]").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"stat_prefix":"a.b"}"#, "stat_prefix: \"a.b\""),
            (
                r#"{"stat_prefix":""}"#,
                "stat_prefix: \"\" is not a valid name: it is empty",
            ),
            (
                r#"{"routes":[{"name":"ok"},{"name":"x y"}]}"#,
                "routes[1].name",
            ),
            (
                r#"{"routes":[{"name":"a","path_prefix":"api"}]}"#,
                "routes[0].path_prefix: \"api\" must start with '/'",
            ),
            (
                r#"{"routes":[{"name":"a"},{"name":"a"}]}"#,
                "routes[1].name: \"a\" is already used by routes[0]",
            ),
        ];
        for (json, expected) in cases {
            let err = FilterConfig::from_json(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "{json}: got {err:?}, want {expected:?}"
            );
        }
    }

    #[test]
    fn too_many_routes_is_refused() {
        let routes: Vec<_> = (0..=MAX_ROUTES)
            .map(|i| serde_json::json!({"name": format!("r{i}")}))
            .collect();
        let err = FilterConfig::from_value(&serde_json::json!({ "routes": routes })).unwrap_err();
        assert_eq!(
            err,
            ConfigError::TooManyRoutes {
                count: MAX_ROUTES + 1,
                max: MAX_ROUTES
            }
        );
    }

    proptest::proptest! {
        // Whatever bytes arrive, parsing returns (never panics), and a config
        // that validates always re-validates identically after a round trip.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = FilterConfig::from_json(&bytes);
        }

        #[test]
        fn valid_names_round_trip(names in proptest::collection::btree_set("[a-z0-9_-]{1,20}", 0..8)) {
            let raw = RawFilterConfig {
                stat_prefix: None,
                rate_limit: None,
                shadow_report: None,
                routes: names.iter().map(|n| RawRoute { name: n.clone(), path_prefix: format!("/{n}"), hedge: None, dedupe: None, shadow: None }).collect(),
            };
            let json = serde_json::to_vec(&raw).unwrap();
            let parsed = FilterConfig::from_json(&json).unwrap();
            proptest::prop_assert_eq!(parsed.routes().len(), names.len());
            for (i, n) in names.iter().enumerate() {
                let path = format!("/{n}/x");
                let hit = parsed.match_route(&path).unwrap();
                // Order matters: the first route (in config order) whose
                // prefix starts the path wins, which may be an earlier one
                // (`/a` before `/ab`) but is never a later one.
                let first = names
                    .iter()
                    .position(|m| path.starts_with(&format!("/{m}")))
                    .unwrap();
                proptest::prop_assert_eq!(hit, first);
                proptest::prop_assert!(first <= i);
            }
        }
    }

    /// A config exactly as Istio delivers a WasmPlugin's `pluginConfig`:
    /// istiod marshals the Struct with protojson into a
    /// `google.protobuf.StringValue` (sorted keys, numbers written from
    /// doubles, optional spaces after colons), and Envoy hands the filter
    /// that string's bytes. Every cluster is an Istio one.
    #[test]
    fn a_config_as_istio_delivers_it_parses_with_istio_cluster_names() {
        let delivered = br#"{"rate_limit":{"identity":{"header":"x-tenant-id"},"report":{"cluster":"outbound|18000||understudy.understudy-system.svc.cluster.local","interval_ms":300},"tiers":{"anonymous":{"initial":5, "max":5,"min":1},"standard":{"initial":10,"max":10,"min":1}}},"routes":[{"hedge":{"budget":{"per_second_floor":100,"percent":100},"cluster":"outbound|9080|stable|reviews.default.svc.cluster.local","delay":{"fixed":{"ms":20}}},"name":"hedged","path_prefix":"/hedged"},{"name":"shadowed","path_prefix":"/","shadow":{"cluster":"outbound|9080|shadow|reviews.default.svc.cluster.local","percent":100}}],"shadow_report":{"cluster":"outbound|18000||understudy.understudy-system.svc.cluster.local","interval_ms":300}}"#;
        let c = FilterConfig::from_json(delivered).unwrap();
        let cp = "outbound|18000||understudy.understudy-system.svc.cluster.local";
        assert_eq!(
            c.routes()[0].hedge.as_ref().map(|h| h.cluster.as_str()),
            Some("outbound|9080|stable|reviews.default.svc.cluster.local")
        );
        assert_eq!(
            c.routes()[1].shadow.as_ref().map(|s| s.cluster.as_str()),
            Some("outbound|9080|shadow|reviews.default.svc.cluster.local")
        );
        assert_eq!(c.shadow_report().map(|r| r.cluster.as_str()), Some(cp));
        assert_eq!(
            c.rate_limit()
                .and_then(|r| r.report.as_ref())
                .map(|r| r.cluster.as_str()),
            Some(cp)
        );
        // A malformed Istio name is refused at config time, naming the field.
        let bad = String::from_utf8_lossy(delivered).replace("|9080|shadow|", "|9080|shadow");
        let err = FilterConfig::from_json(bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("routes[1].shadow.cluster"), "{err}");
    }

    #[test]
    fn the_default_is_what_an_empty_config_validates_to() {
        assert_eq!(
            FilterConfig::from_json(b"{}").unwrap(),
            FilterConfig::default()
        );
    }
}
