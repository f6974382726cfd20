//! `/v1/ratelimit/tenants`: top tenants from the filters' reports, and
//! per-tenant overrides in the filter config.

use super::ApiState;
use super::error::{ApiError, ApiResult};
use crate::evidence::usage::TenantUsage;
use crate::model::FilterSettings;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use understudy_core::ratelimit::RawTenant;

pub(super) fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/v1/ratelimit/tenants", get(top_tenants))
        .route(
            "/v1/ratelimit/tenants/{tenant}",
            put(put_tenant_override).delete(delete_tenant_override),
        )
}

#[derive(Deserialize)]
struct TopQuery {
    top: Option<usize>,
}

#[derive(Serialize)]
struct TopTenants {
    /// Envoys connected to this control plane.
    envoys: usize,
    /// Envoys fleet-wide limits are divided among (with replicas: every
    /// replica's).
    sharing_limits: usize,
    reports: u64,
    dropped_by_filters: u64,
    /// Tenant entries the book refused (names too long, caps reached).
    refused: u64,
    tenants: Vec<TenantUsage>,
}

async fn top_tenants(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<TopQuery>,
) -> Json<TopTenants> {
    let (reports, dropped) = s.usage.counts();
    let envoys = *s.registry.fleet().borrow();
    Json(TopTenants {
        envoys,
        sharing_limits: s.store.fleet(),
        reports,
        dropped_by_filters: dropped,
        refused: s.usage.refused(),
        tenants: s.usage.top(q.top.unwrap_or(20).min(1000)),
    })
}

/// Edits `rate_limit.tenants` in the filter config, inside one store change
/// (a concurrent edit is never lost); the whole config is then validated
/// (unknown tier, bad rate) before anything is stored or pushed.
async fn put_tenant_override(
    State(s): State<ApiState>,
    Path(tenant): Path<String>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<FilterSettings> {
    let Json(body) = body?;
    let entry: RawTenant = serde_json::from_value(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!(r#"expected a JSON object like {{"tier": "partner", "rate": 50}}: {e}"#),
        )
    })?;
    edit_tenants(&s, |tenants| {
        tenants.insert(tenant, entry);
        Ok(())
    })
}

async fn delete_tenant_override(
    State(s): State<ApiState>,
    Path(tenant): Path<String>,
) -> ApiResult<FilterSettings> {
    edit_tenants(&s, |tenants| match tenants.remove(&tenant) {
        Some(_) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_tenant",
            format!("no override for tenant {tenant:?}"),
        )),
    })
}

fn edit_tenants(
    s: &ApiState,
    edit: impl FnOnce(&mut BTreeMap<String, RawTenant>) -> Result<(), ApiError>,
) -> ApiResult<FilterSettings> {
    s.store.edit_filter(false, |raw| {
        let Some(rl) = raw.rate_limit.as_mut() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_rate_limit",
                "the filter config has no rate_limit section to add tenant overrides to",
            ));
        };
        edit(&mut rl.tenants)
    })?;
    Ok(Json(s.store.state().filter))
}
