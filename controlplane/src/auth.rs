//! Who may call the API: bearer tokens with a role, and a per-caller rate
//! limit (governor).
//!
//! Tokens are configured as `name:role:token` entries, comma- or
//! newline-separated, from a file (`understudy serve --tokens FILE`) or the
//! `UNDERSTUDY_TOKENS` environment variable. `viewer` may read (GET);
//! `operator` may also change things and act on rollouts. The caller's name
//! is the actor recorded in rollout audit logs.
//!
//! `/healthz` and `/readyz` are open (probes carry no tokens); every other
//! path needs a token: 401 without a valid one, 403 for a viewer that tries
//! to act, 429 (with `Retry-After`) for a caller over its rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Tokens shorter than this are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
}

/// An authenticated caller, available to handlers as a request extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("tokens[{index}]: expected name:role:token, got {got} field(s)")]
    Shape { index: usize, got: usize },
    #[error("tokens[{index}].name: {reason}")]
    Name { index: usize, reason: String },
    #[error("tokens[{index}].role: {role:?} is not a role (viewer or operator)")]
    Role { index: usize, role: String },
    #[error("tokens[{index}].token: must be at least {MIN_TOKEN_LEN} characters")]
    Short { index: usize },
    #[error("tokens[{index}].token: the same token is already given to {other:?}")]
    Duplicate { index: usize, other: String },
    #[error("no tokens configured")]
    Empty,
}

/// Requests per second one caller may make, with a burst allowance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_second: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// The API's access rules.
pub struct Auth {
    /// SHA-256 of the token → caller; `None`: authentication is off.
    tokens: Option<HashMap<[u8; 32], Principal>>,
    limiter: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.tokens.is_some())
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    /// Parses `name:role:token` entries (comma- or newline-separated; blank
    /// lines and `#` comments are skipped).
    pub fn from_entries(text: &str, limits: Limits) -> Result<Self, AuthError> {
        let mut tokens: HashMap<[u8; 32], Principal> = HashMap::new();
        let entries = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (index, entry) in entries.enumerate() {
            let fields: Vec<&str> = entry.splitn(3, ':').collect();
            let [name, role, token] = fields.as_slice() else {
                return Err(AuthError::Shape {
                    index,
                    got: fields.len(),
                });
            };
            understudy_core::config::validate_name("name", name).map_err(|e| AuthError::Name {
                index,
                reason: e.to_string(),
            })?;
            let role = match *role {
                "viewer" => Role::Viewer,
                "operator" => Role::Operator,
                other => {
                    return Err(AuthError::Role {
                        index,
                        role: other.to_owned(),
                    });
                }
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(AuthError::Short { index });
            }
            let principal = Principal {
                name: (*name).to_owned(),
                role,
            };
            if let Some(other) = tokens.insert(digest(token), principal) {
                return Err(AuthError::Duplicate {
                    index,
                    other: other.name,
                });
            }
        }
        if tokens.is_empty() {
            return Err(AuthError::Empty);
        }
        Ok(Self {
            tokens: Some(tokens),
            limiter: Self::limiter(limits),
        })
    }

    /// No authentication: every caller is the operator `anonymous`. Only
    /// for tests and an explicit `--insecure-no-auth`.
    pub fn disabled() -> Self {
        Self {
            tokens: None,
            limiter: Self::limiter(Limits::default()),
        }
    }

    fn limiter(limits: Limits) -> DefaultKeyedRateLimiter<String> {
        RateLimiter::keyed(Quota::per_second(limits.per_second).allow_burst(limits.burst))
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// Who presents `authorization` (the header's value), if anyone valid.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Principal> {
        let Some(tokens) = &self.tokens else {
            return Some(Principal {
                name: "anonymous".into(),
                role: Role::Operator,
            });
        };
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        tokens.get(&digest(token)).cloned()
    }
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"understudy\""),
        );
    }
    response
}

/// The axum middleware: authenticates, authorizes by method, rate-limits
/// per caller, and hands the [`Principal`] to the handler.
pub async fn guard(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(principal) = auth.authenticate(presented) else {
        let message = if presented.is_some() {
            "the bearer token is not valid"
        } else {
            "this API needs a bearer token (Authorization: Bearer <token>)"
        };
        return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", message);
    };
    // Charged before the role check: refused attempts count too.
    if let Err(not_until) = auth.limiter.check_key(&principal.name) {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let mut response = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("{} is over its request rate", principal.name),
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads && principal.role < Role::Operator {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "{} is a viewer; changing state needs the operator role",
                principal.name
            ),
        );
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef-alice";
    const T2: &str = "0123456789abcdef-bob";

    #[test]
    fn entries_parse_into_callers_with_roles() {
        let auth = Auth::from_entries(
            &format!("# ops\nalice:operator:{T1}\n\n bob:viewer:{T2} "),
            Limits::default(),
        )
        .unwrap();
        let who = |t: &str| auth.authenticate(Some(&format!("Bearer {t}")));
        assert_eq!(who(T1).unwrap().role, Role::Operator);
        assert_eq!(who(T2).unwrap().name, "bob");
        assert_eq!(who("wrong-token-0000000000"), None);
        assert_eq!(auth.authenticate(None), None);
        assert_eq!(auth.authenticate(Some(T1)), None, "the scheme is required");
    }

    #[test]
    fn bad_entries_name_what_is_wrong() {
        let l = Limits::default();
        let cases = [
            (format!("alice:{T1}"), "tokens[0]: expected name:role:token"),
            (format!("a b:viewer:{T1}"), "tokens[0].name"),
            (format!("alice:admin:{T1}"), "tokens[0].role: \"admin\""),
            (
                "alice:viewer:short".to_owned(),
                "tokens[0].token: must be at least 16",
            ),
            (
                format!("alice:viewer:{T1},bob:operator:{T1}"),
                "tokens[1].token: the same token is already given to \"alice\"",
            ),
            ("# nothing\n".to_owned(), "no tokens configured"),
        ];
        for (text, want) in cases {
            let e = Auth::from_entries(&text, l).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn disabled_auth_lets_everyone_operate() {
        let auth = Auth::disabled();
        assert!(!auth.enabled());
        assert_eq!(auth.authenticate(None).unwrap().role, Role::Operator);
    }
}
