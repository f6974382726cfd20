//! The release dashboard, served by the control plane under `/ui/` on the
//! API port: server-rendered HTML (maud: templates checked at compile
//! time), nothing beside the binary.
//!
//! | path | page |
//! |---|---|
//! | `/ui/` | **Rollouts**: every rollout with its service, owner, phase, weight, verdict, reason and age; filters |
//! | `/ui/rollouts/{id}` | **Rollout**: the step ladder, stable/canary charts with release marks, the verdict's checks, the audit log, actions |
//! | `/ui/shadow[/{route}]` | **Shadow**: match rates, differing paths, samples, replay, rule preview ([`shadow`]) |
//! | `/ui/fleet` | **Fleet**: connected Envoys with ACKed versions and NACKs; top tenants |
//! | `/ui/assets/{name}` | the vendored front end ([`assets`]) |
//!
//! Pages update live over server-sent events (`/ui/rollouts/{id}/events`).
//!
//! # Actions and CSRF
//! Every POST needs an operator's session and its CSRF token (form field
//! `csrf` or header `x-csrf-token`): the token is derived from the session
//! id, which only the session's own pages know (the cookie is `HttpOnly`),
//! so another site can neither read it nor forge it. Anything else is 403.
//!
//! # Access
//! The API's tokens and roles. `POST /ui/login` exchanges a token for a
//! session cookie: random (256 bits), `HttpOnly`, `SameSite=Strict`,
//! `Path=/ui`, expiring after [`SESSION_TTL`]; the server keeps only its
//! SHA-256, in a bounded table ([`MAX_SESSIONS`]). Failed logins count
//! against the same per-address limit as the API's. No session: a redirect
//! to the login page, never data. `POST /ui/logout` ends the session.

mod assets;
mod pages;
mod rollout;
mod series;
mod session;
mod shadow;

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

use crate::api::ApiState;
use crate::api::auth::{Principal, Role};

/// The session cookie's name.
pub const COOKIE: &str = "understudy_session";

/// What the dashboard reads (everything the API reads) and who may.
#[derive(Clone)]
pub struct UiState {
    pub api: ApiState,
    pub sessions: Arc<Sessions>,
    /// Open live-update streams (capped at [`rollout::MAX_STREAMS`]).
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl UiState {
    pub fn new(api: ApiState) -> Self {
        Self {
            api,
            sessions: Arc::new(Sessions::default()),
            streams: Arc::default(),
        }
    }
}

/// A page's caller: who, and the CSRF token their forms carry.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub principal: Principal,
    pub csrf: String,
}

impl Viewer {
    pub fn is_operator(&self) -> bool {
        self.principal.role == Role::Operator
    }
}

/// The `/ui` routes (they authenticate by session cookie, not bearer
/// token, so they sit outside the API's guard).
pub fn routes(state: UiState) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(rollouts))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/fleet", get(fleet))
        .merge(rollout::routes())
        .merge(shadow::routes())
        .merge(assets::routes())
        .with_state(state)
        // gzip when the browser takes it: the first load's budget.
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
}

/// The session's caller, or the redirect to the login page: every page
/// and every read starts here.
#[allow(clippy::result_large_err)]
pub(crate) fn viewer(state: &UiState, headers: &HeaderMap) -> Result<Viewer, Response> {
    let id = session::cookie_value(headers, COOKIE).ok_or_else(to_login)?;
    let principal = state
        .sessions
        .get(&id, Instant::now())
        .ok_or_else(to_login)?;
    Ok(Viewer {
        principal,
        csrf: session::csrf_token(&id),
    })
}

/// A page's extractor: the session's caller, or the redirect to the
/// login page (so a handler that takes a `Viewer` never runs without one).
impl axum::extract::FromRequestParts<UiState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &UiState,
    ) -> Result<Self, Response> {
        viewer(state, &parts.headers)
    }
}

/// An operator's session with the right CSRF token (`csrf` from the form,
/// else the `x-csrf-token` header), or 403: every action starts here.
#[allow(clippy::result_large_err)]
pub(crate) fn operator(
    state: &UiState,
    headers: &HeaderMap,
    csrf: Option<&str>,
) -> Result<Principal, Response> {
    let forbidden =
        |why: &str| (StatusCode::FORBIDDEN, format!("forbidden: {why}\n")).into_response();
    let id = session::cookie_value(headers, COOKIE).ok_or_else(|| forbidden("no session"))?;
    let principal = state
        .sessions
        .get(&id, Instant::now())
        .ok_or_else(|| forbidden("no session"))?;
    let sent = csrf
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    if !session::csrf_matches(&id, &sent) {
        return Err(forbidden("missing or wrong CSRF token"));
    }
    if principal.role != Role::Operator {
        return Err(forbidden("viewers cannot change anything"));
    }
    Ok(principal)
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
    match state.api.auth.login(&peer, Some(&bearer), now) {
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
    who: Viewer,
    Query(filters): Query<Filters>,
) -> Response {
    let now_ms = crate::time::now_unix_ms();
    let mut all = state.api.engine.list();
    all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    let shown: Vec<_> = all.iter().filter(|r| pages::matches(r, &filters)).collect();
    Html(pages::rollouts(&who, &shown, all.len(), &filters, now_ms).into_string()).into_response()
}

async fn fleet(State(state): State<UiState>, who: Viewer) -> Response {
    let envoys = state.api.registry.envoys();
    let tenants = state.api.usage.top(pages::FLEET_TENANTS);
    let now_ms = crate::time::now_unix_ms();
    Html(pages::fleet(&who, &envoys, &tenants, now_ms).into_string()).into_response()
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
