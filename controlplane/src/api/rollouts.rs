//! The rollout endpoints of the JSON API (merged into [`crate::api::router`]).
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/v1/rollouts` | create from a YAML or JSON spec (the request body) |
//! | GET | `/v1/rollouts` | all rollouts, one line each |
//! | GET | `/v1/rollouts/{id}` | stage, weights, verdict with its numbers, audit log, release marks |
//! | GET | `/v1/rollouts/{id}/probes` | its synthetic probes: running or not, results in the current phase, the scheduler's ticks |
//! | POST | `/v1/rollouts/{id}/{action}` | `pause`, `resume`, `promote` or `abort` |

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Serialize;

use crate::api::auth::Principal;
use crate::api::{ApiError, ApiState};
use crate::rollout::engine::{Action, EngineError, Phase, ProbeStatus, Rollout, RolloutView};
use crate::traffic::RouterError;

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, code) = match &e {
            EngineError::Router(RouterError::UnknownService(_)) => {
                (StatusCode::NOT_FOUND, "unknown_service")
            }
            EngineError::Router(RouterError::UnknownRoute(_) | RouterError::Invalid(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_change")
            }
            EngineError::Router(RouterError::NotSaved(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "persist_failed")
            }
            EngineError::Spec(_) | EngineError::Invalid { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_spec")
            }
            EngineError::Unknown(_) => (StatusCode::NOT_FOUND, "unknown_rollout"),
            EngineError::UnknownService(_) => (StatusCode::NOT_FOUND, "unknown_service"),
            EngineError::Busy { .. } => (StatusCode::CONFLICT, "rollout_active"),
            EngineError::FlagTaken { .. } => (StatusCode::CONFLICT, "flag_taken"),
            EngineError::Conflict { .. } => (StatusCode::CONFLICT, "invalid_action"),
            EngineError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "persist_failed"),
            EngineError::NotLeader { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/rollouts", get(list).post(create))
        .route("/v1/rollouts/{id}", get(read))
        .route("/v1/rollouts/{id}/probes", get(probes))
        .route("/v1/rollouts/{id}/{action}", post(act))
}

/// One rollout in the list.
#[derive(Debug, Serialize)]
pub struct Line {
    pub id: String,
    pub service: String,
    pub owner: String,
    pub stage: String,
    pub phase: Phase,
    pub paused: bool,
    pub canary_weight: u32,
    pub verdict: Option<String>,
    pub reason: Option<String>,
    pub created_ms: u64,
}

impl From<Rollout> for Line {
    fn from(r: Rollout) -> Self {
        let (verdict, reason) = match &r.last_judgement {
            Some(j) => (
                serde_json::to_value(j.verdict)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned)),
                Some(j.reason.clone()),
            ),
            None => (None, None),
        };
        Line {
            id: r.id,
            service: r.spec.service,
            owner: r.spec.owner,
            stage: String::new(),
            phase: r.phase,
            paused: r.paused,
            canary_weight: r.weight,
            verdict,
            reason,
            created_ms: r.created_ms,
        }
    }
}

async fn create(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    body: String,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let engine = Arc::clone(&s.engine);
    let rollout = decide(move || engine.create(&body, &who.name, SystemTime::now())).await?;
    Ok((StatusCode::CREATED, Json(s.engine.view(&rollout.id)?)))
}

/// The action a path segment names (`pause`, `resume`, `promote`, `abort`,
/// `finalize`): the API's verbs and the dashboard's buttons.
pub(crate) fn action_named(name: &str) -> Result<Action, ApiError> {
    match name {
        "pause" => Ok(Action::Pause),
        "resume" => Ok(Action::Resume),
        "promote" => Ok(Action::Promote),
        "abort" => Ok(Action::Abort),
        "finalize" => Ok(Action::Finalize),
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_action",
            format!("{other:?} is not an action (pause, resume, promote, abort, finalize)"),
        )),
    }
}

/// Runs a decision on a blocking thread: it waits for the engine's one
/// writer, which holds its turn through the decision's disk writes, and the
/// async runtime's workers must keep serving everything else meanwhile
/// (reads never wait for the writer at all).
pub(crate) async fn decide<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the decision did not complete: {e}"),
        )),
    }
}

async fn list(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let lines: Vec<Line> = s
        .engine
        .list()
        .into_iter()
        .map(|r| {
            let stage = s.engine.view(&r.id).map(|v| v.stage).unwrap_or_default();
            Line {
                stage,
                ..Line::from(r)
            }
        })
        .collect();
    Json(serde_json::json!({"rollouts": lines}))
}

async fn read(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    Ok(Json(s.engine.view(&id)?))
}

async fn probes(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ProbeStatus>, ApiError> {
    Ok(Json(s.engine.probe_status(&id)?))
}

async fn act(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let action = action_named(&action)?;
    let engine = Arc::clone(&s.engine);
    let target = id.clone();
    decide(move || engine.act(&target, action, &who.name, SystemTime::now())).await?;
    Ok(Json(s.engine.view(&id)?))
}
