//! Dashboard sessions: a random id in an `HttpOnly` cookie, its SHA-256 in
//! a bounded table with an expiry. Time is an input.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::api::auth::Principal;

/// How long a session lasts from login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most; the one expiring first goes when full.
pub const MAX_SESSIONS: usize = 10_000;
/// The longest cookie value looked at.
const MAX_COOKIE_VALUE: usize = 128;

struct Session {
    principal: Principal,
    expires: Instant,
}

/// The live sessions.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `principal`; its id (the cookie's value).
    pub fn create(&self, principal: Principal, now: Instant) -> String {
        let bytes: [u8; 32] = rand::rng().random();
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut table = self.lock();
        table.retain(|_, s| s.expires > now);
        if table.len() >= MAX_SESSIONS
            && let Some(first) = table.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            table.remove(&first);
        }
        table.insert(
            digest(&id),
            Session {
                principal,
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// Who holds session `id`, if it is live at `now`.
    pub fn get(&self, id: &str, now: Instant) -> Option<Principal> {
        let key = digest(id);
        let mut table = self.lock();
        match table.get(&key) {
            Some(s) if s.expires > now => Some(s.principal.clone()),
            Some(_) => {
                table.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The CSRF token of session `id`: derived from the id (which only the
/// session's own pages can know: the cookie is `HttpOnly`), so nothing
/// more is stored.
pub fn csrf_token(id: &str) -> String {
    let d = Sha256::new()
        .chain_update(b"understudy-ui-csrf\0")
        .chain_update(id.as_bytes())
        .finalize();
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `sent` is session `id`'s CSRF token, compared in constant time.
pub fn csrf_matches(id: &str, sent: &str) -> bool {
    let want = csrf_token(id);
    want.len() == sent.len()
        && want
            .bytes()
            .zip(sent.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty() && v.len() <= MAX_COOKIE_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::Role;

    fn alice() -> Principal {
        Principal {
            name: "alice".into(),
            role: Role::Viewer,
        }
    }

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let id = s.create(alice(), t0);
        assert_eq!(id.len(), 64);
        assert_eq!(s.get(&id, t0 + Duration::from_secs(60)), Some(alice()));
        assert_eq!(s.get("f00", t0), None);
        assert_eq!(s.get(&id, t0 + SESSION_TTL), None, "expired");
        assert!(s.is_empty(), "an expired session is dropped when met");
        let id = s.create(alice(), t0);
        s.remove(&id);
        assert_eq!(s.get(&id, t0), None);
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let a = csrf_token("session-a");
        assert_eq!(a.len(), 64);
        assert!(csrf_matches("session-a", &a));
        assert!(!csrf_matches("session-b", &a), "another session's token");
        assert!(!csrf_matches("session-a", ""));
        assert!(!csrf_matches("session-a", &a[..63]));
        assert_ne!(a, csrf_token("session-b"));
    }

    #[test]
    fn the_table_is_bounded() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.create(alice(), t0);
        for i in 1..=MAX_SESSIONS {
            s.create(alice(), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(s.get(&first, t0), None, "the one expiring first went");
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; understudy_session=abc ; b=2".parse().unwrap(),
        );
        assert_eq!(
            cookie_value(&h, "understudy_session").as_deref(),
            Some("abc")
        );
        assert_eq!(cookie_value(&h, "c"), None);
        let mut long = HeaderMap::new();
        long.append(
            header::COOKIE,
            format!("x={}", "a".repeat(500)).parse().unwrap(),
        );
        assert_eq!(cookie_value(&long, "x"), None);
    }
}
