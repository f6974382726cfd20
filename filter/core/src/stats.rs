//! Metric names. Envoy's proxy-wasm ABI has no tags, so dimensions (the route)
//! are encoded in the name; Envoy shows every one under `wasmcustom.`.

use crate::FilterConfig;

/// The namespace Envoy puts every proxy-wasm metric under.
pub const ENVOY_NAMESPACE: &str = "wasmcustom";

/// Counter of every request the filter saw.
pub fn requests_total(config: &FilterConfig) -> String {
    format!("{}.requests_total", config.stat_prefix())
}

/// Counter of requests matched to one configured route.
pub fn route_requests_total(config: &FilterConfig, route: &str) -> String {
    format!("{}.route.{route}.requests_total", config.stat_prefix())
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
