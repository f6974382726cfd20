//! The API's errors: `{"error": {"code", "message"}}` with a 4xx/5xx
//! status, and how every lower layer's error maps onto one.

use crate::evidence::replay::ReplayError;
use crate::model::ModelError;
use crate::store::ChangeError;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The sentence for people (the dashboard shows it).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// 409 for a write to something an active rollout owns: the message names
/// the rollout and the verbs that change it instead.
pub(crate) fn owned_by(r: &crate::rollout::engine::Rollout, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "owned_by_rollout",
        format!(
            "{what} belongs to rollout {id} ({stage}) until it ends: use POST /v1/rollouts/{id}/pause, /resume, /promote or /abort (abort sets the canary weight to 0)",
            id = r.id,
            stage = r.phase.label(),
        ),
    )
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

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        let (status, code) = match &e {
            ReplayError::BodyTruncated { .. } => (StatusCode::CONFLICT, "body_truncated"),
            ReplayError::NoShadowConfig { .. } => (StatusCode::CONFLICT, "no_shadow_config"),
            ReplayError::NoEndpoints { .. } => (StatusCode::CONFLICT, "no_endpoints"),
            ReplayError::InvalidRecord { .. } => (StatusCode::CONFLICT, "invalid_sample"),
            ReplayError::NoCluster => (StatusCode::BAD_REQUEST, "no_cluster"),
            ReplayError::UnknownCluster { .. } => (StatusCode::BAD_REQUEST, "unknown_cluster"),
            ReplayError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            ReplayError::Unverified { .. } => (StatusCode::FORBIDDEN, "unverified_sample"),
            ReplayError::NotRouteCluster { .. } => (StatusCode::FORBIDDEN, "cluster_not_allowed"),
            ReplayError::MethodNotAllowed { .. } => (StatusCode::FORBIDDEN, "method_not_allowed"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", r.body_text())
    }
}

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;
