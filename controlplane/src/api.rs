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
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx status.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model::{FilterSettings, ModelError, Service, Weight};
use crate::store::{ChangeError, Store};
use crate::xds::Registry;
use crate::xds::registry::{EnvoyStatus, NackRecord};

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub registry: Arc<Registry>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service).put(put_service))
        .route("/v1/services/{name}/canary-weight", put(set_weight))
        .route("/v1/filter", get(get_filter).put(put_filter))
        .route("/v1/envoys", get(envoys))
        .route("/v1/nacks", get(nacks))
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
        .with_state(state)
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let (status, code) = match &e {
            ModelError::UnknownService(_) => (StatusCode::NOT_FOUND, "unknown_service"),
            ModelError::WeightOutOfRange(_) => (StatusCode::BAD_REQUEST, "invalid_weight"),
            ModelError::NoCanaryEndpoints { .. } => (StatusCode::BAD_REQUEST, "invalid_weight"),
            ModelError::InvalidFilter(_) => (StatusCode::BAD_REQUEST, "invalid_filter"),
            ModelError::InvalidService { .. } | ModelError::DomainConflict { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_service")
            }
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid(e) => e.into(),
            ChangeError::Persist(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "persist_failed",
                e.to_string(),
            ),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", r.body_text())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn ready(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({"status": "ready", "generation": s.store.snapshot().generation}))
}

async fn list_services(State(s): State<ApiState>) -> Json<Vec<Service>> {
    Json(s.store.state().services.into_values().collect())
}

async fn get_service(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Service> {
    Ok(Json(s.store.service(&name)?))
}

async fn put_service(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<Service>, JsonRejection>,
) -> ApiResult<Service> {
    let Json(service) = body?;
    if service.name != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_service",
            format!(
                "the body names service {:?} but the path names {name:?}",
                service.name
            ),
        ));
    }
    Ok(Json(s.store.put_service(service)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: serde_json::Value,
}

async fn set_weight(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Service> {
    let Json(body) = body?;
    // serde would also read a struct from a JSON array (`[50]`); only the
    // documented object form is accepted.
    if !body.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            r#"expected a JSON object like {"weight": 20}"#,
        ));
    }
    let body: WeightBody = serde_json::from_value(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let weight = match body.weight.as_i64() {
        Some(w) => Weight::try_from(w)?,
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_weight",
                format!(
                    "canary weight must be an integer from 0 to 100, got {}",
                    body.weight
                ),
            ));
        }
    };
    // Check the service exists first so an unknown name is a 404, not a 400.
    s.store.service(&name)?;
    Ok(Json(s.store.set_canary_weight(&name, weight)?))
}

async fn get_filter(State(s): State<ApiState>) -> Json<FilterSettings> {
    Json(s.store.state().filter)
}

async fn put_filter(
    State(s): State<ApiState>,
    body: Result<Json<FilterSettings>, JsonRejection>,
) -> ApiResult<FilterSettings> {
    let Json(filter) = body?;
    Ok(Json(s.store.put_filter(filter)?))
}

#[derive(Serialize)]
struct Envoys {
    generation: u64,
    envoys: Vec<EnvoyStatus>,
}

async fn envoys(State(s): State<ApiState>) -> Json<Envoys> {
    Json(Envoys {
        generation: s.store.snapshot().generation,
        envoys: s.registry.envoys(),
    })
}

async fn nacks(State(s): State<ApiState>) -> Json<Vec<NackRecord>> {
    Json(s.registry.nacks())
}
