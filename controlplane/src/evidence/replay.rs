//! Replaying a stored mismatch: send the recorded request again, to the
//! shadow's cluster or another one, and compare the answer with the stored
//! primary response under the route's *current* compare rules. This is how
//! an operator checks that a fix in the new version (or a new ignore rule)
//! makes a pair match, without waiting for live traffic to hit it again.
//!
//! **Trust.** A stored record came from a peer, so a replay sends it only
//! if that peer was an authenticated Envoy ([`Origin::Verified`]), only to
//! the route's own clusters (its shadow cluster and that service's stable
//! and canary), only with a method the route shadows (GET, HEAD, OPTIONS
//! unless the route sets `unsafe_methods`), and never with credentials
//! ([`super::shadow::CREDENTIAL_HEADERS`] plus the route's `strip_headers`). The API
//! writes every attempt, refused or not, to the replay audit log with its
//! actor.
//!
//! The work is split so that everything but the HTTP call is plain logic:
//! [`plan`] checks the record against the desired state and builds the
//! request, [`send`] performs it, [`compare()`] compares.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use understudy_core::compare::{self, Comparison, Response, Scope};
use understudy_core::shadow::{MAX_BODY_BYTES_LIMIT, ShadowConfig};
use understudy_proto::v1::MismatchRecord;

use super::shadow::{Origin, is_credential};
use crate::model::DesiredState;
use crate::outbound::{ReadError, error_chain, read_capped};

/// How long a replay may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Marks the replayed request, so the upstream's logs can tell it apart.
pub const REPLAY_HEADER: &str = "x-understudy-replay";

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1),
/// plus those the HTTP client sets itself.
const NOT_FORWARDED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Why a sample cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The sample's request or primary body was cut when it was recorded.
    #[error(
        "sample {id}: the stored {which} body was too large to keep whole (over the route's record_body_bytes), so it cannot be replayed"
    )]
    BodyTruncated { id: u64, which: &'static str },
    /// The route no longer shadows, so there are no compare rules to apply.
    #[error("route {route:?} has no shadow section in the current filter config")]
    NoShadowConfig { route: String },
    /// Neither the request nor the record names a cluster.
    #[error("the sample names no shadow cluster; pass {{\"cluster\": \"<name>\"}}")]
    NoCluster,
    /// The cluster is not one of the services' clusters.
    #[error("cluster {cluster:?} is not a cluster of any service (known: {known})")]
    UnknownCluster { cluster: String, known: String },
    /// The cluster exists but has nowhere to send to.
    #[error("cluster {cluster:?} has no endpoints")]
    NoEndpoints { cluster: String },
    /// The stored record cannot be turned into a request.
    #[error("sample {id}: {reason}")]
    InvalidRecord { id: u64, reason: String },
    /// The record did not come from an authenticated Envoy.
    #[error(
        "sample {id} did not come from an authenticated Envoy, so it is never replayed (only records reported over mutual TLS are)"
    )]
    Unverified { id: u64 },
    /// The cluster is a known one, but not one of the route's.
    #[error("cluster {cluster:?} is not one of route {route:?}'s clusters (allowed: {allowed})")]
    NotRouteCluster {
        cluster: String,
        route: String,
        allowed: String,
    },
    /// The route does not shadow this method, so it is not replayed either.
    #[error(
        "sample {id}: route {route:?} does not shadow {method} requests (set unsafe_methods to allow them), so it is not replayed"
    )]
    MethodNotAllowed {
        id: u64,
        route: String,
        method: String,
    },
    /// The upstream could not be reached or did not answer in time.
    #[error("replay to {endpoint} failed: {reason}")]
    Upstream {
        endpoint: SocketAddr,
        reason: String,
    },
}

/// A replay ready to send: where, what, and the rules to compare with.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    pub id: u64,
    pub cluster: String,
    pub endpoint: SocketAddr,
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Headers to send: hop-by-hop and credential ones removed, `host` and
    /// the replay marker set.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The recorded request headers, for matching expected-divergence rules.
    request_headers: Vec<(String, String)>,
    primary_status: u16,
    primary_headers: Vec<(String, String)>,
    primary_body: Vec<u8>,
    config: ShadowConfig,
}

/// The replayed upstream's answer.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What `POST /v1/shadow/samples/{id}/replay` answers.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    pub id: String,
    pub cluster: String,
    pub endpoint: String,
    /// The replayed response's status.
    pub status: u16,
    /// No serious difference from the stored primary response.
    pub matched: bool,
    pub comparison: Comparison,
}

/// Checks that record `id` can be replayed against `cluster` (default: the
/// cluster its shadow went to) in the current desired state.
pub fn plan(
    id: u64,
    record: &MismatchRecord,
    origin: &Origin,
    state: &DesiredState,
    cluster: Option<&str>,
) -> Result<ReplayPlan, ReplayError> {
    if !origin.is_verified() {
        return Err(ReplayError::Unverified { id });
    }
    let request = record.request.clone().unwrap_or_default();
    let primary = record.primary.clone().unwrap_or_default();
    if request.body_truncated {
        return Err(ReplayError::BodyTruncated {
            id,
            which: "request",
        });
    }
    if primary.body_truncated {
        return Err(ReplayError::BodyTruncated {
            id,
            which: "primary response",
        });
    }
    let config = state
        .filter
        .config
        .config()
        .routes()
        .iter()
        .find(|r| r.name == record.route)
        .and_then(|r| r.shadow.clone())
        .ok_or_else(|| ReplayError::NoShadowConfig {
            route: record.route.clone(),
        })?;
    let cluster = match cluster {
        Some(c) => c.to_owned(),
        None if !record.shadow_cluster.is_empty() => record.shadow_cluster.clone(),
        None => return Err(ReplayError::NoCluster),
    };
    let backend = state.services.values().find_map(|s| {
        if s.stable_cluster() == cluster {
            Some(&s.stable)
        } else if s.canary_cluster() == cluster {
            Some(&s.canary)
        } else {
            None
        }
    });
    let Some(backend) = backend else {
        let known: Vec<String> = state
            .services
            .values()
            .flat_map(|s| [s.stable_cluster(), s.canary_cluster()])
            .collect();
        return Err(ReplayError::UnknownCluster {
            cluster,
            known: known.join(", "),
        });
    };
    // The route's own clusters: where its shadow goes, and that service's
    // stable and canary (the primary a fix is compared with).
    let allowed: Vec<String> = state
        .services
        .values()
        .filter(|s| s.stable_cluster() == config.cluster || s.canary_cluster() == config.cluster)
        .flat_map(|s| [s.stable_cluster(), s.canary_cluster()])
        .chain(std::iter::once(config.cluster.clone()))
        .collect();
    if !allowed.contains(&cluster) {
        return Err(ReplayError::NotRouteCluster {
            cluster,
            route: record.route.clone(),
            allowed: allowed.join(", "),
        });
    }
    let Some(endpoint) = backend.endpoints.first().copied() else {
        return Err(ReplayError::NoEndpoints { cluster });
    };
    let invalid = |reason: String| ReplayError::InvalidRecord { id, reason };
    if request.method.is_empty() || !request.method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(invalid(format!(
            "the recorded method {:?} is not an HTTP method",
            request.method
        )));
    }
    let method = request.method.to_ascii_uppercase();
    if !config.unsafe_methods && !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        return Err(ReplayError::MethodNotAllowed {
            id,
            route: record.route.clone(),
            method: request.method.clone(),
        });
    }
    if !request.path.starts_with('/') {
        return Err(invalid(format!(
            "the recorded path {:?} does not start with '/'",
            request.path
        )));
    }
    let request_headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    // Headers the request's own `Connection` header names are hop-by-hop too.
    let connection_named: Vec<String> = request_headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut headers: Vec<(String, String)> = request_headers
        .iter()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !k.starts_with(':')
                && k != REPLAY_HEADER
                && !NOT_FORWARDED.contains(&k.as_str())
                && !connection_named.contains(&k)
                && !is_credential(&k, &config.strip_headers)
        })
        .cloned()
        .collect();
    if !request.authority.is_empty() {
        headers.push(("host".to_owned(), request.authority.clone()));
    }
    headers.push((REPLAY_HEADER.to_owned(), id.to_string()));
    let primary_status = u16::try_from(primary.status)
        .ok()
        .filter(|s| (100..=999).contains(s))
        .ok_or_else(|| {
            invalid(format!(
                "the recorded status {} is not valid",
                primary.status
            ))
        })?;
    Ok(ReplayPlan {
        id,
        cluster,
        endpoint,
        method,
        path: request.path,
        headers,
        body: request.body,
        request_headers,
        primary_status,
        primary_headers: primary
            .headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        primary_body: primary.body,
        config,
    })
}

/// Sends the planned request with a [`TIMEOUT`], following no redirects
/// (the answer itself is what is compared) and reading at most
/// [`MAX_BODY_BYTES_LIMIT`] bytes of the body.
pub async fn send(plan: &ReplayPlan) -> Result<Replayed, ReplayError> {
    let upstream = |reason: String| ReplayError::Upstream {
        endpoint: plan.endpoint,
        reason,
    };
    let invalid = |reason: String| ReplayError::InvalidRecord {
        id: plan.id,
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| upstream(error_chain(&e)))?;
    let method = reqwest::Method::from_bytes(plan.method.as_bytes())
        .map_err(|e| invalid(format!("method {:?}: {e}", plan.method)))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &plan.headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| invalid(format!("header {k:?}: {e}")))?;
        let value = reqwest::header::HeaderValue::from_str(v)
            .map_err(|e| invalid(format!("header {k:?}: {e}")))?;
        headers.append(name, value);
    }
    let url = format!("http://{}{}", plan.endpoint, plan.path);
    let mut response = client
        .request(method, url)
        .headers(headers)
        .body(plan.body.clone())
        .send()
        .await
        .map_err(|e| upstream(error_chain(&e)))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = read_capped(&mut response, MAX_BODY_BYTES_LIMIT)
        .await
        .map_err(|e| match e {
            ReadError::Cut(e) => upstream(error_chain(&e)),
            ReadError::TooLarge => upstream(format!(
                "the response body is larger than {MAX_BODY_BYTES_LIMIT} bytes"
            )),
        })?;
    Ok(Replayed {
        status,
        headers,
        body,
    })
}

/// Compares the replayed answer with the stored primary response, under the
/// route's current compare rules and the expected-divergence rule the request
/// matches now. The stored primary body was redacted by the filter, so the
/// replayed body is redacted the same way first; a body that cannot be
/// redacted (not JSON) is compared as it is, which reports only hashes.
pub fn compare(plan: &ReplayPlan, replayed: &Replayed) -> Comparison {
    let cfg = &plan.config;
    let segment = cfg.segment(&plan.path, &plan.request_headers);
    let expected = segment
        .and_then(|i| cfg.expected.get(i))
        .map_or(&[][..], |e| e.paths.as_slice());
    let body = compare::redact_body(&replayed.body, &cfg.redact, cfg.compare.max_depth)
        .unwrap_or_else(|| replayed.body.clone());
    compare::compare_in(
        &cfg.compare,
        Scope {
            expected,
            redact: &cfg.redact,
        },
        &Response {
            status: plan.primary_status,
            headers: &plan.primary_headers,
            body: &plan.primary_body,
        },
        &Response {
            status: replayed.status,
            headers: &replayed.headers,
            body: &body,
        },
    )
}

/// The outcome as the API shows it.
pub fn outcome(plan: &ReplayPlan, replayed: &Replayed) -> ReplayOutcome {
    let comparison = compare(plan, replayed);
    ReplayOutcome {
        id: plan.id.to_string(),
        cluster: plan.cluster.clone(),
        endpoint: plan.endpoint.to_string(),
        status: replayed.status,
        matched: comparison.matched(),
        comparison,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FilterDoc, ModelError};
    use serde_json::json;
    use understudy_proto::v1::{Header, RecordedRequest, RecordedResponse};

    fn state() -> DesiredState {
        let mut s = crate::model::fixtures::state(0, 8081, true);
        s.filter.config = FilterDoc::parse(json!({"routes": [{"name": "api", "shadow": {
            "cluster": "shop-canary",
            "unsafe_methods": true,
            "strip_headers": ["x-tenant-secret"],
            "compare": {"ignore": ["$.at"]},
            "redact": ["$.card"],
            "expected": [{"name": "v2-tax", "path_prefix": "/cart", "paths": ["$.tax"]}]
        }}]}))
        .unwrap();
        s
    }

    fn verified() -> Origin {
        Origin::Verified {
            identity: "envoy-1".into(),
        }
    }

    #[test]
    fn a_record_from_an_unauthenticated_peer_is_never_replayed() {
        let err = plan(1, &record(), &Origin::Unverified, &state(), None).unwrap_err();
        assert_eq!(err, ReplayError::Unverified { id: 1 });
        // The same record from a verified Envoy plans.
        assert!(plan(1, &record(), &verified(), &state(), None).is_ok());
    }

    #[test]
    fn replays_go_only_to_the_routes_own_clusters() {
        let mut s = state();
        // Another service's cluster is known, but not this route's.
        let mut other = s.services.values().next().unwrap().clone();
        other.name = "billing".into();
        other.domains = vec!["billing.example".into()];
        s.services.insert("billing".into(), other);
        let err = plan(1, &record(), &verified(), &s, Some("billing-stable")).unwrap_err();
        assert!(
            matches!(&err, ReplayError::NotRouteCluster { cluster, .. } if cluster == "billing-stable"),
            "{err:?}"
        );
        // A forged record naming another cluster as its shadow is refused too.
        let mut forged = record();
        forged.shadow_cluster = "billing-canary".into();
        assert!(matches!(
            plan(1, &forged, &verified(), &s, None),
            Err(ReplayError::NotRouteCluster { .. })
        ));
        // The route's own stable and canary work.
        assert!(plan(1, &record(), &verified(), &s, Some("shop-stable")).is_ok());
        assert!(plan(1, &record(), &verified(), &s, Some("shop-canary")).is_ok());
    }

    #[test]
    fn only_methods_the_route_shadows_are_replayed() {
        let mut s = state();
        s.filter.config = s
            .filter
            .config
            .edited(|raw| {
                if let Some(shadow) = raw.routes[0].shadow.as_mut() {
                    shadow.unsafe_methods = false;
                }
                Ok::<(), ModelError>(())
            })
            .unwrap();
        for method in ["POST", "DELETE", "PUT", "PATCH"] {
            let mut r = record();
            r.request.as_mut().unwrap().method = method.into();
            assert!(
                matches!(
                    plan(1, &r, &verified(), &s, None),
                    Err(ReplayError::MethodNotAllowed { .. })
                ),
                "{method}"
            );
        }
        let mut r = record();
        r.request.as_mut().unwrap().method = "GET".into();
        assert_eq!(plan(1, &r, &verified(), &s, None).unwrap().method, "GET");
    }

    #[test]
    fn credentials_are_never_replayed() {
        let mut r = record();
        let headers = &mut r.request.as_mut().unwrap().headers;
        for (k, v) in [
            ("Authorization", "Bearer secret"),
            ("cookie", "session=1"),
            ("x-api-key", "k"),
            ("proxy-authorization", "Basic x"),
            ("x-tenant-secret", "route-specific"),
            ("x-kept", "yes"),
        ] {
            headers.push(header(k, v));
        }
        let p = plan(1, &r, &verified(), &state(), None).unwrap();
        let names: Vec<String> = p
            .headers
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        for gone in [
            "authorization",
            "cookie",
            "x-api-key",
            "proxy-authorization",
            "x-tenant-secret",
        ] {
            assert!(!names.contains(&gone.to_owned()), "{gone} in {names:?}");
        }
        assert!(names.contains(&"x-kept".to_owned()));
    }

    fn header(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    fn record() -> MismatchRecord {
        MismatchRecord {
            route: "api".into(),
            shadow_cluster: "shop-canary".into(),
            request: Some(RecordedRequest {
                method: "POST".into(),
                path: "/cart/1?x=1".into(),
                authority: "shop.example-shadow".into(),
                headers: vec![
                    header("content-type", "application/json"),
                    header("connection", "x-private"),
                    header("x-private", "1"),
                    header("transfer-encoding", "chunked"),
                    header("x-request-id", "r-1"),
                ],
                body: br#"{"q": 1}"#.to_vec(),
                body_truncated: false,
            }),
            primary: Some(RecordedResponse {
                status: 200,
                headers: vec![header("content-type", "application/json")],
                body: br#"{"total": 10, "tax": 1, "at": 5, "card": "sha256:x"}"#.to_vec(),
                body_truncated: false,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_plan_resolves_the_cluster_and_cleans_the_headers() {
        let p = plan(7, &record(), &verified(), &state(), None).unwrap();
        assert_eq!(p.cluster, "shop-canary");
        assert_eq!(p.endpoint, "127.0.0.1:8082".parse().unwrap());
        let names: Vec<&str> = p.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-request-id", "host", REPLAY_HEADER]
        );
        assert_eq!(p.headers[2].1, "shop.example-shadow");
        let p = plan(7, &record(), &verified(), &state(), Some("shop-stable")).unwrap();
        assert_eq!(p.endpoint, "127.0.0.1:8081".parse().unwrap());
    }

    #[test]
    fn plans_that_cannot_work_say_why() {
        let err = plan(1, &record(), &verified(), &state(), Some("nope")).unwrap_err();
        assert!(matches!(&err, ReplayError::UnknownCluster { cluster, .. } if cluster == "nope"));
        assert!(
            err.to_string().contains("shop-stable, shop-canary"),
            "{err}"
        );

        let mut r = record();
        if let Some(req) = r.request.as_mut() {
            req.body_truncated = true;
        }
        let err = plan(1, &r, &verified(), &state(), None).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let mut r = record();
        if let Some(p) = r.primary.as_mut() {
            p.body_truncated = true;
        }
        let err = plan(1, &r, &verified(), &state(), None).unwrap_err();
        assert!(matches!(
            err,
            ReplayError::BodyTruncated {
                which: "primary response",
                ..
            }
        ));

        let mut s = state();
        s.filter.config = FilterDoc::parse(json!({"routes": [{"name": "api"}]})).unwrap();
        let err = plan(1, &record(), &verified(), &s, None).unwrap_err();
        assert_eq!(
            err,
            ReplayError::NoShadowConfig {
                route: "api".into()
            }
        );

        let mut r = record();
        r.shadow_cluster.clear();
        assert_eq!(
            plan(1, &r, &verified(), &state(), None).unwrap_err(),
            ReplayError::NoCluster
        );

        let mut s = state();
        if let Some(svc) = s.services.get_mut("shop") {
            svc.canary.endpoints.clear();
        }
        let err = plan(1, &record(), &verified(), &s, None).unwrap_err();
        assert!(matches!(err, ReplayError::NoEndpoints { .. }));
    }

    #[test]
    fn the_replayed_body_is_redacted_and_compared_with_current_rules() {
        let mut p = plan(7, &record(), &verified(), &state(), None).unwrap();
        // The filter stored the primary body redacted: the card as its hash.
        p.primary_body = compare::redact_body(
            br#"{"total": 10, "tax": 1, "at": 5, "card": "4111"}"#,
            &p.config.redact,
            64,
        )
        .unwrap();
        let answer = |body: &str| Replayed {
            status: 200,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.as_bytes().to_vec(),
        };
        // Only the ignored `at` differs (noise); the clear card in the
        // replayed body is redacted to the same hash before comparing.
        let o = outcome(
            &p,
            &answer(r#"{"total": 10, "tax": 1, "at": 6, "card": "4111"}"#),
        );
        assert!(o.matched, "{:?}", o.comparison);
        assert_eq!((o.comparison.serious, o.comparison.noise), (0, 1));
        assert_eq!((o.id.as_str(), o.status), ("7", 200));
        // A tax change is serious, but expected in the request's segment.
        let o = outcome(
            &p,
            &answer(r#"{"total": 10, "tax": 2, "at": 5, "card": "4111"}"#),
        );
        assert!(!o.matched);
        assert_eq!((o.comparison.serious, o.comparison.unexpected), (1, 0));
        // A total change is serious and unexpected.
        let o = outcome(
            &p,
            &answer(r#"{"total": 11, "tax": 1, "at": 5, "card": "4111"}"#),
        );
        assert!(!o.matched);
        assert_eq!(o.comparison.differences[0].path, "$.total");
        assert_eq!(o.comparison.unexpected, 1);
        // A different card is reported by hash only.
        let o = outcome(
            &p,
            &answer(r#"{"total": 10, "tax": 1, "at": 5, "card": "5500"}"#),
        );
        let card = &o.comparison.differences[0];
        assert_eq!(card.path, "$.card");
        assert!(
            card.shadow.as_deref().unwrap().contains("sha256:"),
            "{card:?}"
        );
    }
}
