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
//! to act, 429 (with `Retry-After`) for a caller over its rate. That
//! includes `/metrics`: a viewer token is enough to scrape it (see
//! [`crate::api::metrics`] for why it is not open).
//!
//! **Guessing is slow.** Failed logins are counted per peer address (or
//! all together when the server does not pass the address): after
//! [`MAX_FAILED_LOGINS`] failures in [`FAILED_LOGIN_WINDOW`], every request
//! from there is refused with 429 *before* its token is looked at, until the
//! window ends. Only a presented token that is wrong counts: a request
//! with none guessed nothing (a browser's `/favicon.ico`, a probe), so it
//! is refused with 401 but never locks the address out. A token file
//! readable by group or others is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
/// Failed logins allowed from one peer address per [`FAILED_LOGIN_WINDOW`].
pub const MAX_FAILED_LOGINS: u32 = 10;
/// The window failed logins are counted in.
pub const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Peer addresses whose failures are remembered; when full, the entry whose
/// window started first is forgotten.
pub const MAX_FAILED_LOGIN_PEERS: usize = 10_000;

/// Why a token file was not read.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:o} lets group or others read the API tokens; run chmod 600 {path}")]
    Readable { path: String, mode: u32 },
}

/// Reads a token file, refusing one that group or others may read.
pub fn read_token_file(path: &Path) -> Result<String, TokenFileError> {
    let shown = path.display().to_string();
    let io = |source| TokenFileError::Io {
        path: shown.clone(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenFileError::Readable {
                path: shown.clone(),
                mode,
            });
        }
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Failed logins per peer: a fixed window each.
#[derive(Debug, Default)]
struct FailedLogins {
    peers: HashMap<String, (Instant, u32)>,
}

impl FailedLogins {
    /// When `peer` may try again, if it is over its failures now.
    fn blocked(&mut self, peer: &str, now: Instant) -> Option<Duration> {
        let (start, n) = *self.peers.get(peer)?;
        let ends = start + FAILED_LOGIN_WINDOW;
        if now >= ends {
            self.peers.remove(peer);
            return None;
        }
        (n >= MAX_FAILED_LOGINS).then(|| ends - now)
    }

    fn failed(&mut self, peer: &str, now: Instant) {
        if !self.peers.contains_key(peer) && self.peers.len() >= MAX_FAILED_LOGIN_PEERS {
            self.peers
                .retain(|_, (start, _)| now < *start + FAILED_LOGIN_WINDOW);
            if self.peers.len() >= MAX_FAILED_LOGIN_PEERS
                && let Some(oldest) = self
                    .peers
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(k, _)| k.clone())
            {
                self.peers.remove(&oldest);
            }
        }
        let entry = self.peers.entry(peer.to_owned()).or_insert((now, 0));
        if now >= entry.0 + FAILED_LOGIN_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
}

/// Why the guard answered 429, as a response extension for the metrics
/// ([`crate::api::count`]): `rate_limited` or `failed_logins`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled(pub &'static str);

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
    failed: Mutex<FailedLogins>,
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
            failed: Mutex::default(),
        })
    }

    /// No authentication: every caller is the operator `anonymous`. Only
    /// for tests and an explicit `--insecure-no-auth`.
    pub fn disabled() -> Self {
        Self {
            tokens: None,
            limiter: Self::limiter(Limits::default()),
            failed: Mutex::default(),
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

    /// [`Auth::authenticate`] for a caller at `peer`, with failed logins
    /// limited: `Err(wait)` when `peer` is over its failures (the token is
    /// not even looked at), `Ok(None)` for a failed login (counted).
    pub fn login(
        &self,
        peer: &str,
        authorization: Option<&str>,
        now: Instant,
    ) -> Result<Option<Principal>, Duration> {
        if self.tokens.is_none() {
            return Ok(self.authenticate(authorization));
        }
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(wait) = failed.blocked(peer, now) {
            return Err(wait);
        }
        let who = self.authenticate(authorization);
        if who.is_none() && authorization.is_some() {
            failed.failed(peer, now);
        }
        Ok(who)
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

/// The OFREP evaluation paths ([`crate::api::ofrep`]): a viewer may post.
pub const OFREP_PREFIX: &str = "/ofrep/v1/evaluate/";

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
    // The peer's address when the server passes it (`ConnectInfo`); all
    // callers share one budget otherwise.
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map_or_else(|| "*".to_owned(), |c| c.0.ip().to_string());
    let principal = match auth.login(&peer, presented, Instant::now()) {
        Ok(p) => p,
        Err(wait) => {
            let mut response = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failed_logins",
                "too many failed logins from this address; try again later",
            );
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            response.extensions_mut().insert(Throttled("failed_logins"));
            return response;
        }
    };
    let Some(principal) = principal else {
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
        response.extensions_mut().insert(Throttled("rate_limited"));
        response.extensions_mut().insert(principal.role);
        return response;
    }
    // An OFREP evaluation is a POST that only reads (the flags' values).
    let reads = matches!(*request.method(), Method::GET | Method::HEAD)
        || (*request.method() == Method::POST && request.uri().path().starts_with(OFREP_PREFIX));
    if !reads && principal.role < Role::Operator {
        let mut response = refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "{} is a viewer; changing state needs the operator role",
                principal.name
            ),
        );
        response.extensions_mut().insert(principal.role);
        return response;
    }
    let role = principal.role;
    request.extensions_mut().insert(principal);
    let mut response = next.run(request).await;
    // The caller's role, for the request counter outside this guard.
    response.extensions_mut().insert(role);
    response
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
    fn failed_logins_are_limited_per_peer_and_the_window_ends() {
        let auth = Auth::from_entries(&format!("alice:operator:{T1}"), Limits::default()).unwrap();
        let t0 = Instant::now();
        let good = format!("Bearer {T1}");
        for i in 0..MAX_FAILED_LOGINS {
            let guess = format!("Bearer guess-{i:016}");
            assert_eq!(auth.login("10.0.0.1", Some(&guess), t0), Ok(None));
        }
        // Requests with no token at all guess nothing: they never count.
        for _ in 0..3 * MAX_FAILED_LOGINS {
            assert_eq!(auth.login("10.0.0.3", None, t0), Ok(None));
        }
        assert_eq!(
            auth.login("10.0.0.3", Some(&good), t0)
                .unwrap()
                .unwrap()
                .name,
            "alice"
        );
        // Over the budget: even the right token is not looked at.
        let wait = auth.login("10.0.0.1", Some(&good), t0).unwrap_err();
        assert_eq!(wait, FAILED_LOGIN_WINDOW);
        // Another peer is not affected.
        assert_eq!(
            auth.login("10.0.0.2", Some(&good), t0)
                .unwrap()
                .unwrap()
                .name,
            "alice"
        );
        // After the window the peer may log in again.
        let later = t0 + FAILED_LOGIN_WINDOW;
        assert_eq!(
            auth.login("10.0.0.1", Some(&good), later)
                .unwrap()
                .unwrap()
                .name,
            "alice"
        );
    }

    #[test]
    fn the_failed_login_table_is_bounded() {
        let auth = Auth::from_entries(&format!("alice:operator:{T1}"), Limits::default()).unwrap();
        let t0 = Instant::now();
        for i in 0..(MAX_FAILED_LOGIN_PEERS + 10) {
            let _ = auth.login(&format!("p{i}"), None, t0);
        }
        let n = auth.failed.lock().unwrap().peers.len();
        assert!(n <= MAX_FAILED_LOGIN_PEERS, "{n}");
    }

    #[cfg(unix)]
    #[test]
    fn token_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("alice:operator:{T1}")).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_token_file(&path).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_token_file(&path).unwrap().contains("alice"));
    }

    #[test]
    fn disabled_auth_lets_everyone_operate() {
        let auth = Auth::disabled();
        assert!(!auth.enabled());
        assert_eq!(auth.authenticate(None).unwrap().role, Role::Operator);
    }
}
