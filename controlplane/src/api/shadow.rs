//! `/v1/shadow/...`: shadow comparison summaries, stored samples and their
//! replay, learned noise.

use super::ApiState;
use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use crate::evidence::replay::{self, ReplayOutcome};
use crate::evidence::shadow::{
    BookCounts, RecordView, ReplayAudit, RouteDetail, RouteNoise, RouteSegments, RouteSummary,
};
use crate::evidence::shared::ResetKind;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};

pub(super) fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/v1/shadow/routes", get(shadow_routes))
        .route(
            "/v1/shadow/routes/{route}",
            get(shadow_route).delete(reset_shadow_route),
        )
        .route("/v1/shadow/routes/{route}/segments", get(shadow_segments))
        .route("/v1/shadow/samples/{id}", get(shadow_sample))
        .route("/v1/shadow/samples/{id}/replay", post(replay_sample))
        .route("/v1/shadow/replays", get(shadow_replays))
        .route("/v1/shadow/noise", get(shadow_noise))
        .route("/v1/shadow/noise/{route}", delete(forget_noise))
}

#[derive(Serialize)]
struct ShadowRoutes {
    #[serde(flatten)]
    counts: BookCounts,
    routes: Vec<RouteSummary>,
}

async fn shadow_routes(State(s): State<ApiState>) -> Json<ShadowRoutes> {
    Json(ShadowRoutes {
        counts: s.shadow.counts(),
        routes: s.shadow.summaries(),
    })
}

fn unknown_route(route: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_route",
        format!("no shadow reports for route {route:?}"),
    )
}

async fn shadow_route(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> ApiResult<RouteDetail> {
    s.shadow
        .route(&route)
        .map(Json)
        .ok_or_else(|| unknown_route(&route))
}

/// The route's live traffic per segment (`segment_by`), worst first.
async fn shadow_segments(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> ApiResult<RouteSegments> {
    s.shadow
        .segments(&route)
        .map(Json)
        .ok_or_else(|| unknown_route(&route))
}

/// Ids are numbers; anything else cannot name a sample, so it is unknown too.
fn stored_sample(
    s: &ApiState,
    id: &str,
) -> Result<crate::evidence::shadow::StoredRecord, ApiError> {
    id.parse::<u64>()
        .ok()
        .and_then(|n| s.shadow.record(n))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_sample",
                format!(
                    "no stored sample {id:?} (unknown, or evicted: only the most recent are kept)"
                ),
            )
        })
}

/// The route's shadow `strip_headers`: credential headers beyond the
/// default list, for this route (the dashboard redacts with them too).
pub(crate) fn route_credentials(s: &ApiState, route: &str) -> Vec<String> {
    s.store
        .current()
        .filter
        .config
        .config()
        .routes()
        .iter()
        .find(|r| r.name == route)
        .and_then(|r| r.shadow.as_ref())
        .map(|sh| sh.strip_headers.clone())
        .unwrap_or_default()
}

async fn shadow_sample(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<RecordView> {
    let stored = stored_sample(&s, &id)?;
    let extra = route_credentials(&s, &stored.record.route);
    Ok(Json(stored.view(&extra)))
}

#[derive(Serialize)]
struct Replays {
    replays: Vec<ReplayAudit>,
}

async fn shadow_replays(State(s): State<ApiState>) -> Json<Replays> {
    Json(Replays {
        replays: s.shadow.replays(),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    cluster: Option<String>,
}

/// The body is optional: empty means "replay to the sample's shadow cluster".
fn replay_body(body: &[u8]) -> Result<ReplayBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReplayBody::default());
    }
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", m);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(invalid(
            r#"expected a JSON object like {"cluster": "shop-canary"}"#.into(),
        ));
    }
    serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
}

async fn replay_sample(
    State(s): State<ApiState>,
    principal: Option<axum::Extension<Principal>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<ReplayOutcome> {
    let actor = principal.map_or_else(|| "anonymous".to_owned(), |p| p.0.name);
    let body = replay_body(&body)?;
    replay(&s, actor, &id, body.cluster).await.map(Json)
}

/// Replays stored sample `id` to `cluster` (default: its shadow cluster)
/// and compares again; the API and the dashboard both call this. Every
/// attempt that names a stored sample is audited with its actor, whether it
/// was refused, failed or done.
pub(crate) async fn replay(
    s: &ApiState,
    actor: String,
    id: &str,
    cluster: Option<String>,
) -> Result<ReplayOutcome, ApiError> {
    let body = ReplayBody { cluster };
    let stored = stored_sample(s, id)?;
    let request = stored.record.request.clone().unwrap_or_default();
    let mut audit = ReplayAudit {
        time: std::time::SystemTime::now(),
        actor,
        sample: id.to_owned(),
        route: Some(stored.record.route.clone()),
        cluster: body.cluster.clone(),
        method: Some(request.method),
        path: Some(request.path),
        outcome: String::new(),
    };
    let plan = match replay::plan(
        stored.id,
        &stored.record,
        &stored.origin,
        &s.store.state(),
        body.cluster.as_deref(),
    ) {
        Ok(p) => p,
        Err(e) => {
            audit.outcome = format!("refused: {e}");
            s.shadow.audit_replay(audit);
            return Err(e.into());
        }
    };
    audit.cluster = Some(plan.cluster.clone());
    let replayed = match replay::send(&plan).await {
        Ok(r) => r,
        Err(e) => {
            audit.outcome = format!("failed: {e}");
            s.shadow.audit_replay(audit);
            return Err(e.into());
        }
    };
    let outcome = replay::outcome(&plan, &replayed);
    audit.outcome = if outcome.matched {
        "matched"
    } else {
        "differs"
    }
    .to_owned();
    s.shadow.audit_replay(audit);
    Ok(outcome)
}

#[derive(Serialize)]
struct ShadowNoise {
    routes: Vec<RouteNoise>,
}

async fn shadow_noise(State(s): State<ApiState>) -> Json<ShadowNoise> {
    Json(ShadowNoise {
        routes: s.shadow.noise(),
    })
}

/// Starts a route's live counts over, unless a rollout is judging its
/// shadow stage on them right now (its evidence would vanish mid-stage).
async fn reset_shadow_route(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> Result<StatusCode, ApiError> {
    if let Some(r) = s.engine.list().into_iter().find(|r| {
        r.phase == crate::rollout::engine::Phase::Shadow
            && r.spec.shadow.as_ref().is_some_and(|st| st.route == route)
    }) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "rollout_active",
            format!(
                "rollout {} is judging route {route:?} in its shadow stage; \
                 abort it or wait for the stage to end",
                r.id
            ),
        ));
    }
    reset(&s, route, ResetKind::Live).await
}

async fn forget_noise(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> Result<StatusCode, ApiError> {
    reset(&s, route, ResetKind::Noise).await
}

/// Resets a route this replica knows: with replicas, for the whole fleet
/// through the database (refused while it is away, so no replica is left
/// measuring the old way); alone, in its own book.
async fn reset(s: &ApiState, route: String, kind: ResetKind) -> Result<StatusCode, ApiError> {
    if !s.shadow.knows(&route) {
        return Err(unknown_route(&route));
    }
    let Some(resets) = s.shadow_resets.clone() else {
        match kind {
            ResetKind::Noise => s.shadow.forget_noise(&route),
            ResetKind::Live => s.shadow.reset_live(&route),
        };
        return Ok(StatusCode::NO_CONTENT);
    };
    let name = route.clone();
    match tokio::task::spawn_blocking(move || resets.reset(&name, kind, crate::time::now_unix_ms()))
        .await
    {
        Ok(Ok(_)) => Ok(StatusCode::NO_CONTENT),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            format!("the reset of route {route:?} was not recorded for every replica: {e}"),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the reset of route {route:?} did not finish: {e}"),
        )),
    }
}
