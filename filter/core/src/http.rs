//! HTTP helpers shared by the features: what a header name may be, which
//! response headers may be handed to another client, and the framed hash
//! every stable key (slots, fingerprints, partition keys) is made from. A
//! bottom module: it imports nothing from this crate.

use sha2::{Digest, Sha256};

/// An HTTP header name as RFC 9110 allows it (a token).
pub fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// SHA-256 over a domain tag and each part, every one prefixed by its length,
/// so that no two different part lists hash the same input bytes
/// (`("a", "bc")` vs `("ab", "c")`). The tag keeps the slot hash and the
/// fingerprint independent.
pub fn framed_sha256(domain: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in std::iter::once(domain.as_bytes()).chain(parts.iter().copied()) {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones Envoy recomputes for every
/// response it sends.
const NOT_REPLAYED: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "date",
    // Credentials one caller's answer hands out: never given to a replay.
    "set-cookie",
    "set-cookie2",
    "authentication-info",
];

/// Headers worth storing for a replay: everything but hop-by-hop and
/// per-response ones (`connection`, `keep-alive`, `transfer-encoding`, `te`,
/// `trailer`, `upgrade`, `proxy-*`, `content-length`, `date`, `:status` and
/// any other pseudo-header), and credentials the answer hands out
/// (`set-cookie`, `set-cookie2`, `authentication-info`): a replay must never
/// give one caller's session to a retry.
///
/// Headers that a `Connection` header names are hop-by-hop too (RFC 9110
/// §7.6.1), so they are dropped as well. Names compare case-insensitively.
pub fn replayable_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    let named_by_connection: Vec<&str> = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let per_hop = name.starts_with(':')
                || NOT_REPLAYED.iter().any(|h| name.eq_ignore_ascii_case(h))
                || name
                    .get(..6)
                    .is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
                || named_by_connection
                    .iter()
                    .any(|t| name.eq_ignore_ascii_case(t));
            !per_hop
        })
        .cloned()
        .collect()
}

/// Headers only the filter (and its hedges and shadow copies) may set.
/// (The control plane's fallback filter, used until Envoy has accepted the
/// filter, removes the same headers.)
pub const INTERNAL_HEADER_PREFIX: &str = "x-understudy-";

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn replayable_headers_drop_per_hop_and_per_response_ones() {
        let headers = vec![
            h(":status", "200"),
            h("Content-Type", "application/json"),
            h("Connection", "keep-alive, X-Hop"),
            h("keep-alive", "timeout=5"),
            h("transfer-encoding", "chunked"),
            h("TE", "trailers"),
            h("trailer", "x-checksum"),
            h("upgrade", "h2c"),
            h("proxy-authenticate", "Basic"),
            h("Proxy-Connection", "close"),
            h("content-length", "12"),
            h("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
            h("x-hop", "1"),
            h("set-cookie", "a=1"),
            h("set-cookie", "b=2"),
            h("location", "/orders/7"),
            h("etag", "\"v1\""),
            h("proxy", "not-a-prefix-match"),
        ];
        assert_eq!(
            replayable_headers(&headers),
            vec![
                h("Content-Type", "application/json"),
                h("location", "/orders/7"),
                h("etag", "\"v1\""),
                h("proxy", "not-a-prefix-match"),
            ]
        );
        assert!(replayable_headers(&[]).is_empty());
        // A multibyte name must not trip the prefix check.
        assert_eq!(
            replayable_headers(&[h("prøxy-x", "1")]),
            vec![h("prøxy-x", "1")]
        );
    }

    // --- encoding ---
}
