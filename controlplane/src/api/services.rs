//! `/v1/services`: services, and the canary weight (409 while a rollout
//! owns the service; set through the traffic router, so in Istio mode it is
//! the VirtualService's).

use super::ApiState;
use super::error::{ApiError, ApiResult, owned_by};
use crate::model::{Service, Weight};
use crate::rollout::engine::EngineError;
use crate::traffic::RouterError;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde::Deserialize;

pub(super) fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service).put(put_service))
        .route("/v1/services/{name}/canary-weight", put(set_weight))
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
    let Json(mut service) = body?;
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
    if service.sticky.is_some()
        && let Some(why) = s.engine.router().sticky_unsupported()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_service",
            why,
        ));
    }
    // The flags' header is the rollouts' to write (with the weight), never
    // an operator's: a body without `flags` keeps what is stored, one with
    // other flags is refused.
    let stored_flags = s.store.service(&name).map(|c| c.flags).unwrap_or_default();
    if !service.flags.is_empty() && service.flags != stored_flags {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_service",
            format!(
                "flags: written by the rollouts of {name:?} only; leave it out or send what GET returns"
            ),
        ));
    }
    service.flags = stored_flags;
    if let Some(r) = s.engine.owner(&name) {
        let stored = s.store.service(&name);
        if stored.as_ref().map(|c| c.canary_weight) != Ok(service.canary_weight) {
            return Err(owned_by(&r, &format!("the canary weight of {name:?}")));
        }
        if stored.as_ref().map(|c| &c.canary_cohorts) != Ok(&service.canary_cohorts) {
            return Err(owned_by(&r, &format!("the canary cohorts of {name:?}")));
        }
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
) -> ApiResult<serde_json::Value> {
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
    // Through the router, as a rollout's steps go: the Store in ADS mode,
    // the VirtualService in Istio mode (where the service is the mesh's,
    // not the Store's). An unknown service is a 404, not a 400.
    let router = s.engine.router();
    let refused = |e: RouterError| match e {
        RouterError::Invalid(message) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_weight", message)
        }
        other => ApiError::from(EngineError::from(other)),
    };
    let current = router.weight(&name).map_err(refused)?;
    if let Some(r) = s.engine.owner(&name)
        && current != weight.percent()
    {
        return Err(owned_by(&r, &format!("the canary weight of {name:?}")));
    }
    router
        .set_weight(&name, weight.percent(), false)
        .map_err(refused)?;
    Ok(Json(match s.store.service(&name) {
        Ok(service) => serde_json::to_value(service).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?,
        // A mesh service: its weight is all there is to show.
        Err(_) => serde_json::json!({"name": name, "canary_weight": weight.percent()}),
    }))
}
