//! The Shadow pages and the compare-rule preview.
//!
//! - `GET /ui/shadow`: every route with its compared count, match rate and
//!   its 95% interval, serious / noise / unexpected rates and skips.
//! - `GET /ui/shadow/{route}`: those numbers, skips by reason, a tree of the
//!   differing paths with counts and learned noise, recent samples side by
//!   side with the differing fields highlighted, a replay button per sample,
//!   and the rule editor (`assets/shadow.js`).
//! - `GET /ui/shadow/{route}/samples.json`: the route's stored samples, both
//!   sides ([`pair`]), redacted: what the editor previews rules over.
//! - `POST /ui/shadow/samples/{id}/replay`: the API's replay
//!   ([`crate::api::shadow::replay`]), for an operator with the CSRF token.
//! - `POST /ui/shadow/{route}/rules`: sets the route's compare rules through
//!   the same validation and rollout ownership as `PUT /v1/filter`.
//! - `GET /ui/shadow-assets/{file}`: `shadow.js` and the preview module
//!   (`understudy-preview` built by `cargo xtask setup`, embedded by
//!   `build.rs`), versioned by content so browsers may cache them for good.
//!
//! The numbers come from [`crate::evidence::shadow`] as the API shows them;
//! the preview runs `understudy-core`'s compare in the browser (wasm).

mod page;
pub mod pair;

use std::sync::LazyLock;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use understudy_core::ConfigError;
use understudy_core::compare::{CompareConfig, RawCompareConfig};

use super::{UiState, Viewer};
use crate::api::error::owned_by;
use crate::evidence::shadow::RecordView;
use crate::model::ModelError;
use crate::store::ChangeError;

/// The most samples `samples.json` carries (newest first).
pub const MAX_PREVIEW_SAMPLES: usize = 500;
/// Samples shown side by side on the route page (newest first).
pub const SHOWN_SAMPLES: usize = 10;
/// The largest compare-rules body `POST .../rules` reads.
pub const MAX_RULES_BYTES: usize = 64 * 1024;

const SHADOW_JS: &str = include_str!("assets/shadow.js");
const PREVIEW_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/understudy_preview_bg.wasm"));
const PREVIEW_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/understudy_preview.js"));
/// Whether `build.rs` found the preview (`cargo xtask setup` builds it).
pub const PREVIEW_BUILT: bool = matches!(env!("UNDERSTUDY_PREVIEW_BUILT").as_bytes(), b"1");

/// The assets' version: a hash of all three, in every URL that names them.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut h = Sha256::new();
    for part in [SHADOW_JS.as_bytes(), PREVIEW_JS, PREVIEW_WASM] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
});

/// `/ui/shadow-assets/{name}?v=...`.
fn asset_url(name: &str) -> String {
    format!("/ui/shadow-assets/{name}?v={}", *ASSET_VERSION)
}

pub(super) fn routes() -> Router<UiState> {
    Router::new()
        .route("/ui/shadow", get(list))
        .route("/ui/shadow/{route}", get(route_page))
        .route("/ui/shadow/{route}/samples.json", get(samples_json))
        .route("/ui/shadow/{route}/rules", post(apply_rules))
        .route("/ui/shadow/samples/{id}/replay", post(replay))
        .route("/ui/shadow-assets/{file}", get(asset))
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match file.as_str() {
        "shadow.js" => (SHADOW_JS.as_bytes(), "text/javascript; charset=utf-8"),
        "understudy_preview.js" if PREVIEW_BUILT => (PREVIEW_JS, "text/javascript; charset=utf-8"),
        "understudy_preview_bg.wasm" if PREVIEW_BUILT => (PREVIEW_WASM, "application/wasm"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_str(kind)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ),
            // Every URL carries the content's hash (`?v=`): a new build is a
            // new URL, so an old copy may be kept for good.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=31536000, immutable"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Compare rules of the filter route `route`, if it shadows.
fn route_rules(state: &UiState, route: &str) -> Option<RawCompareConfig> {
    state
        .api
        .store
        .current()
        .filter
        .config
        .raw()
        .routes
        .iter()
        .find(|r| r.name == route)
        .and_then(|r| r.shadow.as_ref())
        .map(|s| s.compare.clone())
}

/// Routes with reports, and routes the filter shadows that have none yet.
async fn list(State(state): State<UiState>, who: Viewer) -> Response {
    let summaries = state.api.shadow.summaries();
    let configured: Vec<String> = state
        .api
        .store
        .current()
        .filter
        .config
        .raw()
        .routes
        .iter()
        .filter(|r| r.shadow.is_some())
        .map(|r| r.name.clone())
        .filter(|name| !summaries.iter().any(|s| &s.route == name))
        .collect();
    Html(page::list(&who, &summaries, &configured).into_string()).into_response()
}

/// The stored live samples of `route`, newest first, redacted.
fn samples(state: &UiState, route: &str, limit: usize) -> Vec<RecordView> {
    let Some(detail) = state.api.shadow.route(route) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = detail
        .top_paths
        .iter()
        .flat_map(|p| p.samples.iter())
        .filter_map(|s| s.id.parse().ok())
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.dedup();
    let extra = crate::api::shadow::route_credentials(&state.api, route);
    ids.into_iter()
        .filter_map(|id| state.api.shadow.record(id))
        .filter(|r| r.record.route == route && !r.record.calibration)
        .take(limit)
        .map(|r| r.view(&extra))
        .collect()
}

async fn route_page(
    State(state): State<UiState>,
    who: Viewer,
    Path(route): Path<String>,
) -> Response {
    let detail = state.api.shadow.route(&route);
    let rules = route_rules(&state, &route);
    if detail.is_none() && rules.is_none() {
        let body = page::unknown(&who, &route);
        return (StatusCode::NOT_FOUND, Html(body.into_string())).into_response();
    }
    let shown = samples(&state, &route, SHOWN_SAMPLES);
    let assets = page::Assets {
        script: asset_url("shadow.js"),
        glue: PREVIEW_BUILT.then(|| asset_url("understudy_preview.js")),
        wasm: PREVIEW_BUILT.then(|| asset_url("understudy_preview_bg.wasm")),
    };
    Html(
        page::route(
            &who,
            &route,
            detail.as_ref(),
            rules.as_ref(),
            &shown,
            &assets,
        )
        .into_string(),
    )
    .into_response()
}

#[derive(Serialize)]
struct SamplesDoc {
    route: String,
    /// The route's current compare rules (`null` if it no longer shadows).
    rules: Option<RawCompareConfig>,
    samples: Vec<pair::PairView>,
}

async fn samples_json(
    State(state): State<UiState>,
    _who: Viewer,
    Path(route): Path<String>,
) -> Response {
    let doc = SamplesDoc {
        rules: route_rules(&state, &route),
        samples: samples(&state, &route, MAX_PREVIEW_SAMPLES)
            .iter()
            .map(pair::pair)
            .collect(),
        route,
    };
    axum::Json(doc).into_response()
}

async fn replay(
    State(state): State<UiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let principal = match super::operator(&state, &headers, None) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match crate::api::shadow::replay(&state.api, principal.name, &id, None).await {
        Ok(outcome) => axum::Json(outcome).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A refusal with the field it is about: `{"error": {...}, "field": ...}`.
fn refused(
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
) -> Response {
    (
        status,
        axum::Json(json!({
            "error": {"code": code, "message": message},
            "field": field,
        })),
    )
        .into_response()
}

/// Sets `route`'s compare rules. The rules are parsed as the filter's
/// `compare` section, then the whole filter config is validated again inside
/// one store update (as `PUT /v1/filter` does); while an active rollout owns
/// the route's shadow it is refused, as there.
async fn apply_rules(
    State(state): State<UiState>,
    headers: HeaderMap,
    Path(route): Path<String>,
    body: Bytes,
) -> Response {
    let principal = match super::operator(&state, &headers, None) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if body.len() > MAX_RULES_BYTES {
        return refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_body",
            format!("the rules may be at most {MAX_RULES_BYTES} bytes"),
            None,
        );
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let rules: RawCompareConfig = match serde_path_to_error::deserialize(de) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." {
                "compare".to_owned()
            } else {
                format!("compare.{path}")
            };
            let message = format!("{field}: {}", e.into_inner());
            return refused(
                StatusCode::BAD_REQUEST,
                "invalid_filter",
                message,
                Some(field),
            );
        }
    };
    let Some(index) = state
        .api
        .store
        .current()
        .filter
        .config
        .raw()
        .routes
        .iter()
        .position(|r| r.name == route && r.shadow.is_some())
    else {
        return refused(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no filter route {route:?} with shadow traffic"),
            None,
        );
    };
    // The filter's own check of a compare section, first, for the field it
    // names; the whole config is validated again inside the update below.
    let field = format!("routes[{index}].shadow.compare");
    if let Err(e) = CompareConfig::from_raw(rules.clone(), &field) {
        let field = match &e {
            ConfigError::Invalid { field, .. } => Some(field.clone()),
            _ => Some(field),
        };
        return refused(
            StatusCode::BAD_REQUEST,
            "invalid_filter",
            e.to_string(),
            field,
        );
    }
    // As `PUT /v1/filter`: an active rollout's shadow stage owns its route's
    // `shadow`, so changing what it compares is refused while it runs.
    if route_rules(&state, &route).as_ref() != Some(&rules)
        && let Some(r) = state.api.engine.list().into_iter().find(|r| {
            r.phase.is_active() && r.spec.shadow.as_ref().is_some_and(|s| s.route == route)
        })
    {
        return owned_by(&r, &format!("the shadow of filter route {route:?}")).into_response();
    }
    let edited = state.api.store.edit_filter(false, |raw| {
        let shadow = raw
            .routes
            .iter_mut()
            .find(|r| r.name == route)
            .and_then(|r| r.shadow.as_mut())
            .ok_or_else(|| {
                ModelError::InvalidFilter(format!("route {route:?} no longer shadows"))
            })?;
        shadow.compare = rules.clone();
        Ok::<(), ChangeError>(())
    });
    match edited {
        Ok(()) => {
            tracing::info!(actor = %principal.name, route = %route, "compare rules applied from the dashboard");
            axum::Json(json!({"route": route, "compare": rules})).into_response()
        }
        Err(e @ ChangeError::Persist(_)) => refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "persist_failed",
            e.to_string(),
            None,
        ),
        Err(ChangeError::Invalid(e)) => {
            let message = e.to_string();
            let field = field_of(&message);
            refused(StatusCode::BAD_REQUEST, "invalid_filter", message, field)
        }
    }
}

/// The field a validation message names (`filter config: routes[0].shadow.
/// compare.ignore[0]: reason` → `routes[0].shadow.compare.ignore[0]`).
fn field_of(message: &str) -> Option<String> {
    let rest = message.rsplit_once("config: ").map_or(message, |(_, r)| r);
    let (field, _) = rest.split_once(": ")?;
    (!field.is_empty() && !field.contains(' ')).then(|| field.to_owned())
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn the_field_is_read_from_the_message() {
        assert_eq!(
            field_of("filter config: routes[0].shadow.compare.ignore[0]: \"x\" is neither")
                .as_deref(),
            Some("routes[0].shadow.compare.ignore[0]")
        );
        assert_eq!(field_of("no filter route named \"x\""), None);
    }
}
