//! `/v1/envoys` and `/v1/nacks`: connected Envoys and what they rejected.

use super::ApiState;
use crate::xds::registry::{EnvoyStatus, NackRecord};
use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;

pub(super) fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/v1/envoys", get(envoys))
        .route("/v1/nacks", get(nacks))
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
