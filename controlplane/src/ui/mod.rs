//! The release dashboard, served by the control plane under `/ui/` on the
//! API port: server-rendered HTML (maud: templates checked at compile
//! time), nothing beside the binary.
//!
//! This first part: the login and the **Rollouts** page (every rollout with
//! its service, owner, phase, weight, current verdict and its one-line
//! reason, and age; filters by phase and service). Issue 14 lists the rest
//! (the rollout page with charts and actions, shadow, fleet, rule preview).
//!
//! # Access
//! The API's tokens and roles. `POST /ui/login` exchanges a token for a
//! session cookie: random (256 bits), `HttpOnly`, `SameSite=Strict`,
//! `Path=/ui`, expiring after [`SESSION_TTL`]; the server keeps only its
//! SHA-256, in a bounded table ([`MAX_SESSIONS`]). Failed logins count
//! against the same per-address limit as the API's. No session: a redirect
//! to the login page, never data. `POST /ui/logout` ends the session.

mod pages;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, FromRequest, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

pub use session::{MAX_SESSIONS, SESSION_TTL, Sessions};

use crate::api::auth::{Auth, Principal};
use crate::rollout::engine::Engine;

/// The session cookie's name.
pub const COOKIE: &str = "understudy_session";

/// What the dashboard reads and who may.
#[derive(Clone)]
pub struct UiState {
    pub auth: Arc<Auth>,
    pub sessions: Arc<Sessions>,
    pub engine: Arc<Engine>,
}

/// The `/ui` routes (they authenticate by session cookie, not bearer
/// token, so they sit outside the API's guard).
pub fn routes(state: UiState) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(rollouts))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .with_state(state)
}

/// The session's caller, from the request's cookie.
fn caller(state: &UiState, headers: &HeaderMap, now: Instant) -> Option<Principal> {
    let id = session::cookie_value(headers, COOKIE)?;
    state.sessions.get(&id, now)
}

fn to_login() -> Response {
    Redirect::to("/ui/login").into_response()
}

async fn login_page() -> Html<String> {
    Html(pages::login(None).into_string())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<UiState>, request: axum::extract::Request) -> Response {
    // The peer's address when the server passes it, as the API's guard.
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "*".to_owned(), |c| c.0.ip().to_string());
    let form = match axum::Form::<LoginForm>::from_request(request, &()).await {
        Ok(axum::Form(form)) => form,
        Err(e) => return (StatusCode::BAD_REQUEST, e.body_text()).into_response(),
    };
    let now = Instant::now();
    let bearer = format!("Bearer {}", form.token.trim());
    match state.auth.login(&peer, Some(&bearer), now) {
        Err(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0);
            (
                StatusCode::TOO_MANY_REQUESTS,
                Html(
                    pages::login(Some(&format!(
                        "Too many failed logins from this address: try again in {secs} s."
                    )))
                    .into_string(),
                ),
            )
                .into_response()
        }
        Ok(None) => (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(Some("That token is not valid.")).into_string()),
        )
            .into_response(),
        Ok(Some(principal)) => {
            let id = state.sessions.create(principal, now);
            let cookie = format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            let mut response = Redirect::to("/ui/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
    }
}

async fn logout(State(state): State<UiState>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_value(&headers, COOKIE) {
        state.sessions.remove(&id);
    }
    let mut response = to_login();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "understudy_session=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0",
        ),
    );
    response
}

/// The Rollouts page's filters (`?phase=active&service=shop`).
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    /// `active`, `succeeded`, `rolled_back`, `aborted`, or empty for all.
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub service: String,
}

async fn rollouts(
    State(state): State<UiState>,
    headers: HeaderMap,
    Query(filters): Query<Filters>,
) -> Response {
    let now = Instant::now();
    let Some(who) = caller(&state, &headers, now) else {
        return to_login();
    };
    let now_ms = crate::time::now_unix_ms();
    let mut all = state.engine.list();
    all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    let shown: Vec<_> = all.iter().filter(|r| pages::matches(r, &filters)).collect();
    Html(pages::rollouts(&who, &shown, all.len(), &filters, now_ms).into_string()).into_response()
}

/// How long ago `then_ms` was, for people ("3 m", "2 h").
pub fn age(now_ms: u64, then_ms: u64) -> String {
    let s = Duration::from_millis(now_ms.saturating_sub(then_ms)).as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} m", s / 60),
        3600..86400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}
