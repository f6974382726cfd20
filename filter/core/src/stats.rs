//! Metric names. Envoy's proxy-wasm ABI has no tags, so dimensions (the route)
//! are encoded in the name; Envoy shows every one under `wasmcustom.`.

use crate::FilterConfig;

/// The namespace Envoy puts every proxy-wasm metric under.
pub const ENVOY_NAMESPACE: &str = "wasmcustom";

/// Counter of every request the filter saw.
pub fn requests_total(config: &FilterConfig) -> String {
    format!("{}.requests_total", config.stat_prefix())
}

/// Counter of client-sent `x-understudy-*` request headers the filter
/// removed at ingress.
pub fn internal_headers_stripped(config: &FilterConfig) -> String {
    format!("{}.internal_headers_stripped", config.stat_prefix())
}

/// Counter of requests matched to one configured route.
pub fn route_requests_total(config: &FilterConfig, route: &str) -> String {
    format!("{}.route.{route}.requests_total", config.stat_prefix())
}

/// A per-route hedging stat: `sent`, `hedge_wins`, `primary_wins`,
/// `budget_exhausted`, `delay_ms` (gauge), `not_hedged.<reason>`.
pub fn hedge(config: &FilterConfig, route: &str, what: &str) -> String {
    format!("{}.hedge.{route}.{what}", config.stat_prefix())
}

/// Gauge: streams in this Envoy's hedge tables (all workers summed).
pub fn hedge_pending(config: &FilterConfig) -> String {
    format!("{}.hedge.pending", config.stat_prefix())
}

/// A per-route dedupe stat: `replayed`, `in_flight_409`, `mismatch_422`,
/// `invalid_key_400`, `slot_busy`, `stored`, `unreadable_slot`,
/// `evicted_live` (a new key's claim replaced another key's unexpired entry).
pub fn dedupe(config: &FilterConfig, route: &str, what: &str) -> String {
    format!("{}.dedupe.{route}.{what}", config.stat_prefix())
}

/// A rate-limit stat: `<tier>.allowed`, `<tier>.limited`,
/// `<tier>.shadow_limited`, `tenants` (gauge: slots in use), `evictions`.
pub fn ratelimit(config: &FilterConfig, what: &str) -> String {
    format!("{}.ratelimit.{what}", config.stat_prefix())
}

/// A per-route shadow stat: `sent`, `compared`, `matched`,
/// `mismatched.serious`, `mismatched.noise`, `unexpected`, `latency_gap_ms`
/// (histogram: shadow minus primary, clamped at 0), and one counter per
/// [`crate::shadow::Skip`] reason (`skipped_too_large`, `shadow_timeout`, ...).
pub fn shadow(config: &FilterConfig, route: &str, what: &str) -> String {
    format!("{}.shadow.{route}.{what}", config.stat_prefix())
}

/// A worker-wide shadow stat: `pending` (gauge), `records_dropped`,
/// `reports_sent`, `reports_failed`.
pub fn shadow_all(config: &FilterConfig, what: &str) -> String {
    format!("{}.shadow.{what}", config.stat_prefix())
}

/// The full name as it appears in Envoy's `/stats`.
pub fn in_envoy(name: &str) -> String {
    format!("{ENVOY_NAMESPACE}.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let c =
            FilterConfig::from_json(br#"{"stat_prefix":"us","routes":[{"name":"cart"}]}"#).unwrap();
        assert_eq!(
            in_envoy(&requests_total(&c)),
            "wasmcustom.us.requests_total"
        );
        assert_eq!(
            route_requests_total(&c, "cart"),
            "us.route.cart.requests_total"
        );
    }
}
