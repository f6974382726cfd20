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
//! | DELETE | `/v1/shadow/routes/{route}` | start the route's live counts over (409 during its rollout's shadow stage) |
//! | GET | `/v1/shadow/samples/{id}` | a stored mismatch record in full |
//! | POST | `/v1/shadow/samples/{id}/replay` | replay it (`{"cluster"}` optional) and compare again |
//! | GET | `/v1/shadow/replays` | the replay audit log: who replayed which sample where, and the outcome |
//! | GET | `/v1/shadow/noise` | noise learned from A/A calibration, per route and path |
//! | DELETE | `/v1/shadow/noise/{route}` | forget a route's calibration data |
//! | POST/GET | `/v1/rollouts[/{id}[/{action}]]` | canary rollouts (see [`crate::rollout::api`]) |
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx status.
//! Every path but the probes needs a bearer token (see [`crate::auth`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{self, Auth, Principal};
use crate::model::{FilterSettings, ModelError, Service, Weight};
use crate::shadow::replay::{self, ReplayError, ReplayOutcome};
use crate::shadow::{
    BookCounts, RecordView, ReplayAudit, RouteDetail, RouteNoise, RouteSummary, ShadowBook,
};
use crate::store::{ChangeError, Store};
use crate::usage::{TenantUsage, UsageBook};
use crate::xds::Registry;
use crate::xds::registry::{EnvoyStatus, NackRecord};

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub usage: Arc<UsageBook>,
    pub shadow: Arc<ShadowBook>,
    pub auth: Arc<Auth>,
    pub engine: Arc<crate::rollout::engine::Engine>,
}

pub fn router(state: ApiState) -> Router {
    let auth = Arc::clone(&state.auth);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service).put(put_service))
        .route("/v1/services/{name}/canary-weight", put(set_weight))
        .route("/v1/filter", get(get_filter).put(put_filter))
        .route("/v1/envoys", get(envoys))
        .route("/v1/nacks", get(nacks))
        .route("/v1/ratelimit/tenants", get(top_tenants))
        .route(
            "/v1/ratelimit/tenants/{tenant}",
            put(put_tenant_override).delete(delete_tenant_override),
        )
        .route("/v1/shadow/routes", get(shadow_routes))
        .route(
            "/v1/shadow/routes/{route}",
            get(shadow_route).delete(reset_shadow_route),
        )
        .route("/v1/shadow/samples/{id}", get(shadow_sample))
        .route("/v1/shadow/samples/{id}/replay", post(replay_sample))
        .route("/v1/shadow/replays", get(shadow_replays))
        .route("/v1/shadow/noise", get(shadow_noise))
        .route("/v1/shadow/noise/{route}", delete(forget_noise))
        .merge(crate::rollout::api::routes())
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
        // Outermost: unknown paths and wrong methods need a token too.
        .layer(axum::middleware::from_fn_with_state(auth, auth::guard))
}

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

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        let (status, code) = match &e {
            ReplayError::BodyTruncated { .. } => (StatusCode::CONFLICT, "body_truncated"),
            ReplayError::NoShadowConfig { .. } => (StatusCode::CONFLICT, "no_shadow_config"),
            ReplayError::NoEndpoints { .. } => (StatusCode::CONFLICT, "no_endpoints"),
            ReplayError::InvalidRecord { .. } => (StatusCode::CONFLICT, "invalid_sample"),
            ReplayError::NoCluster => (StatusCode::BAD_REQUEST, "no_cluster"),
            ReplayError::UnknownCluster { .. } => (StatusCode::BAD_REQUEST, "unknown_cluster"),
            ReplayError::InvalidConfig(_) => (StatusCode::INTERNAL_SERVER_ERROR, "invalid_filter"),
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

type ApiResult<T> = Result<Json<T>, ApiError>;

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
    }))
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

#[derive(Deserialize)]
struct TopQuery {
    top: Option<usize>,
}

#[derive(Serialize)]
struct TopTenants {
    envoys: usize,
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
        reports,
        dropped_by_filters: dropped,
        refused: s.usage.refused(),
        tenants: s.usage.top(q.top.unwrap_or(20).min(1000)),
    })
}

/// Edits `rate_limit.tenants` in the filter config; the whole config is then
/// validated (unknown tier, bad rate) before anything is stored or pushed.
async fn put_tenant_override(
    State(s): State<ApiState>,
    Path(tenant): Path<String>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<FilterSettings> {
    let Json(body) = body?;
    if !body.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            r#"expected a JSON object like {"tier": "partner", "rate": 50}"#,
        ));
    }
    edit_tenants(&s, |tenants| {
        tenants.insert(tenant, body);
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
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError>,
) -> ApiResult<FilterSettings> {
    let mut filter = s.store.state().filter;
    let Some(rl) = filter
        .config
        .get_mut("rate_limit")
        .and_then(|v| v.as_object_mut())
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_rate_limit",
            "the filter config has no rate_limit section to add tenant overrides to",
        ));
    };
    let tenants = rl.entry("tenants").or_insert_with(|| json!({}));
    let Some(tenants) = tenants.as_object_mut() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_filter",
            "rate_limit.tenants is not an object",
        ));
    };
    edit(tenants)?;
    Ok(Json(s.store.put_filter(filter)?))
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

/// Ids are numbers; anything else cannot name a sample, so it is unknown too.
fn stored_sample(s: &ApiState, id: &str) -> Result<crate::shadow::StoredRecord, ApiError> {
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
/// default list, for this route.
fn route_credentials(s: &ApiState, route: &str) -> Vec<String> {
    understudy_core::FilterConfig::from_value(&s.store.state().filter.config)
        .ok()
        .and_then(|c| {
            c.routes()
                .iter()
                .find(|r| r.name == route)
                .and_then(|r| r.shadow.as_ref())
                .map(|sh| sh.strip_headers.clone())
        })
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

/// Every attempt that names a stored sample is audited with its actor,
/// whether it was refused, failed or done.
async fn replay_sample(
    State(s): State<ApiState>,
    principal: Option<axum::Extension<Principal>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<ReplayOutcome> {
    let actor = principal.map_or_else(|| "anonymous".to_owned(), |p| p.0.name);
    let body = replay_body(&body)?;
    let stored = stored_sample(&s, &id)?;
    let request = stored.record.request.clone().unwrap_or_default();
    let mut audit = ReplayAudit {
        time: std::time::SystemTime::now(),
        actor,
        sample: id,
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
    Ok(Json(outcome))
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
    if s.shadow.reset_live(&route) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_route(&route))
    }
}

async fn forget_noise(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> Result<StatusCode, ApiError> {
    if s.shadow.forget_noise(&route) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_route(&route))
    }
}
