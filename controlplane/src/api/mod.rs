//! The operator-facing JSON API (axum).
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | the process is up |
//! | GET | `/readyz` | the store holds a valid state and xDS is serving |
//! | GET | `/v1/services` | all services |
//! | GET/PUT | `/v1/services/{name}` | one service; PUT creates or replaces it |
//! | PUT | `/v1/services/{name}/canary-weight` | `{"weight": 0..=100}` |
//! | GET/PUT | `/v1/filter` | the filter's wasm path and JSON config |
//! | GET | `/v1/envoys` | connected Envoys: node, ACKed versions, last NACK |
//! | GET | `/v1/nacks` | the most recent NACKs from any Envoy |
//! | GET | `/v1/ratelimit/tenants?top=N` | top tenants: usage and current limits, from filter reports |
//! | PUT/DELETE | `/v1/ratelimit/tenants/{id}` | a per-tenant override: `{"tier", "rate" or "fleet_rate"}` |
//! | GET | `/v1/shadow/routes` | per-route shadow comparison summaries (rates null without data) |
//! | GET | `/v1/shadow/routes/{route}` | one route's summary with its top differing paths and samples |
//! | GET | `/v1/shadow/routes/{route}/segments` | the route's live counts, rates and top paths per traffic segment (`segment_by`), worst unexpected rate first |
//! | DELETE | `/v1/shadow/routes/{route}` | start the route's live counts over (409 during its rollout's shadow stage) |
//! | GET | `/v1/shadow/samples/{id}` | a stored mismatch record in full |
//! | POST | `/v1/shadow/samples/{id}/replay` | replay it (`{"cluster"}` optional) and compare again |
//! | GET | `/v1/shadow/replays` | the replay audit log: who replayed which sample where, and the outcome |
//! | GET | `/v1/shadow/noise` | noise learned from A/A calibration, per route and path |
//! | DELETE | `/v1/shadow/noise/{route}` | forget a route's calibration data |
//! | POST/GET | `/v1/rollouts[/{id}[/{action}]]` | canary rollouts (see [`crate::api::rollouts`]) |
//! | GET | `/metrics` | the control plane's own metrics, Prometheus text format (see [`crate::api::metrics`]) |
//! | POST | `/ofrep/v1/evaluate/flags[/{key}]` | rollout flags over OpenFeature's OFREP (see [`crate::api::ofrep`]); a viewer may post |
//!
//! One file per resource: [`services`], [`filter`], [`envoys`],
//! [`ratelimit`], [`shadow`], [`rollouts`], [`metrics`], [`ofrep`]; [`error`] maps
//! every error onto the answer below, and [`auth`] guards every path. Every
//! answer, refusals included, is counted by route template, status and
//! caller role ([`count`]).
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx status.
//! Every path but the probes needs a bearer token (see [`crate::api::auth`]).

use std::sync::Arc;

use axum::extract::{MatchedPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

pub mod auth;
pub mod envoys;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod ofrep;
pub mod ratelimit;
pub mod rollouts;
pub mod services;
pub mod shadow;

use self::auth::Auth;
pub use self::error::ApiError;
use crate::evidence::shadow::ShadowBook;
use crate::evidence::usage::UsageBook;
use crate::store::Store;
use crate::xds::Registry;

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub usage: Arc<UsageBook>,
    pub shadow: Arc<ShadowBook>,
    /// With replicas: shadow resets reach every replica through the database.
    pub shadow_resets: Option<crate::evidence::shared::ShadowResets>,
    pub auth: Arc<Auth>,
    pub engine: Arc<crate::rollout::engine::Engine>,
    /// The control plane's own counters (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub fn router(state: ApiState) -> Router {
    let auth = Arc::clone(&state.auth);
    let counters = Arc::clone(&state.metrics);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .merge(services::routes())
        .merge(filter::routes())
        .merge(envoys::routes())
        .merge(ratelimit::routes())
        .merge(shadow::routes())
        .merge(rollouts::routes())
        .merge(metrics::routes())
        .merge(ofrep::routes())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .with_state(state.clone())
        // Unknown paths and wrong methods need a token too.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&auth),
            auth::guard,
        ))
        // The dashboard: its own session cookie, outside the token guard.
        .merge(crate::ui::routes(crate::ui::UiState::new(state)))
        // Outermost, so refusals by the guard (401, 403, 429) are counted.
        .layer(axum::middleware::from_fn_with_state(counters, count))
}

/// Counts every answer in `understudy_api_requests_total` by route
/// template (axum's [`MatchedPath`]: bounded, unlike the raw path; `none`
/// when no route matched), status and the caller's role (`none` when the
/// guard refused before knowing it), and each 429 by its reason.
async fn count(
    State(metrics): State<Arc<crate::metrics::Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "none".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let role = match response.extensions().get::<auth::Role>() {
        Some(auth::Role::Operator) => "operator",
        Some(auth::Role::Viewer) => "viewer",
        None => "none",
    };
    metrics.api_request(&route, response.status().as_u16(), role);
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        let reason = response
            .extensions()
            .get::<auth::Throttled>()
            .map_or("rate_limited", |t| t.0);
        metrics.api_throttled(reason);
    }
    response
}

/// Ready, with what an operator must not miss: the engine's caught panics
/// and persistence failures, and state-file writes that failed (a change
/// then lives in memory only).
async fn ready(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let (failures, last_error) = s.store.persistence_failures();
    Json(json!({
        "status": "ready",
        "generation": s.store.snapshot().generation,
        "engine": s.engine.health(),
        "state_file": {"write_failures": failures, "last_error": last_error},
        "replica": s.engine.replica().map(|(name, leads)| json!({
            "name": name,
            "leads": leads,
            "state_version": s.store.shared_version(),
        })),
    }))
}
