//! `/v1/filter`: the filter's wasm path and config (a shadow stage's route
//! is its rollout's while it runs).

use super::ApiState;
use super::error::{ApiResult, owned_by};
use crate::model::FilterSettings;
use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::routing::get;

pub(super) fn routes() -> axum::Router<ApiState> {
    axum::Router::new().route("/v1/filter", get(get_filter).put(put_filter))
}

async fn get_filter(State(s): State<ApiState>) -> Json<FilterSettings> {
    Json(s.store.state().filter)
}

async fn put_filter(
    State(s): State<ApiState>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<FilterSettings> {
    let Json(body) = body?;
    let filter = FilterSettings::from_json(body)?;
    // A shadow stage's route is its rollout's: its `shadow` may not change.
    let shadow_of = |f: &FilterSettings, route: &str| {
        f.config
            .raw()
            .routes
            .iter()
            .find(|r| r.name == route)
            .and_then(|r| r.shadow.clone())
    };
    let current = s.store.state().filter;
    for r in s.engine.list().into_iter().filter(|r| r.phase.is_active()) {
        if let Some(stage) = &r.spec.shadow
            && shadow_of(&current, &stage.route) != shadow_of(&filter, &stage.route)
        {
            return Err(owned_by(
                &r,
                &format!("the shadow of filter route {:?}", stage.route),
            ));
        }
    }
    Ok(Json(s.store.put_filter(filter)?))
}
