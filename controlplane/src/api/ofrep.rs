//! Rollout flags over the OpenFeature Remote Evaluation Protocol (OFREP),
//! so any OpenFeature SDK's OFREP provider reads them (merged into
//! [`crate::api::router`]).
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/ofrep/v1/evaluate/flags/{key}` | one flag for `{"context": {...}}`: `{key, value, reason, variant, metadata}` |
//! | POST | `/ofrep/v1/evaluate/flags` | every flag: `{"flags": [...]}` with an `ETag`; `If-None-Match` with it gives 304 |
//!
//! Both are behind the API's bearer tokens; a viewer's is enough (an
//! evaluation reads, though it is a POST: the guard,
//! [`crate::api::auth::guard`], lets viewers post here). The values come
//! from [`crate::rollout::flags`]: a flag is the newest rollout's that
//! declares it, and its state is that rollout's phase, so a rollback turns
//! it off with the record that decides the rollback.
//!
//! Errors follow OFREP: `{key, errorCode, errorDetails}` with 400
//! (`PARSE_ERROR` for a body that is not `{"context": {...}}`,
//! `INVALID_CONTEXT` for a context over the limits, `TARGETING_KEY_MISSING`
//! for a split flag and no user key) or 404 (`FLAG_NOT_FOUND`); in a bulk
//! answer a flag that needs a targeting key is an item with its
//! `errorCode`. Bodies are at most [`MAX_BODY`] bytes.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::ApiState;
use crate::rollout::engine::FlagView;
use crate::rollout::flags::{self, Context};
use crate::rollout::spec::is_flag_key;

/// Largest request body: a context of [`flags::MAX_ATTRIBUTES`] short
/// attributes fits many times over.
pub const MAX_BODY: usize = 16 * 1024;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/ofrep/v1/evaluate/flags", post(bulk))
        .route("/ofrep/v1/evaluate/flags/{key}", post(single))
        // Above MAX_BODY the body extractor fails, and the handler answers
        // PARSE_ERROR (never reading more than the limit).
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// An OFREP evaluation request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluationRequest {
    context: Option<Value>,
}

/// An OFREP failure: `{key?, errorCode, errorDetails}`.
fn failure(status: StatusCode, key: Option<&str>, code: &str, details: &str) -> Response {
    let mut body = json!({"errorCode": code, "errorDetails": details});
    if let Some(k) = key {
        body["key"] = json!(k);
    }
    (status, axum::Json(body)).into_response()
}

/// The body's context, or the OFREP failure (status, code, details).
fn read_context(
    body: Result<Bytes, BytesRejection>,
) -> Result<Context, (StatusCode, &'static str, String)> {
    let parse = |d: String| (StatusCode::BAD_REQUEST, "PARSE_ERROR", d);
    let body =
        body.map_err(|e| parse(format!("unreadable body (at most {MAX_BODY} bytes): {e}")))?;
    // An empty body is an empty context (some clients send none).
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Context::default());
    }
    let request: EvaluationRequest = serde_json::from_slice(&body)
        .map_err(|e| parse(format!("the body must be {{\"context\": {{...}}}}: {e}")))?;
    Context::from_json(request.context.as_ref())
        .map_err(|e| (StatusCode::BAD_REQUEST, "INVALID_CONTEXT", e.to_string()))
}

/// One flag's evaluation as an OFREP item: success or failure.
fn item(key: &str, view: &FlagView, ctx: &Context) -> Result<Value, Value> {
    let metadata = json!({
        "rollout": view.rollout,
        "service": view.service,
        "phase": view.phase,
    });
    match flags::evaluate(&view.state, ctx) {
        Ok(e) => Ok(json!({
            "key": key,
            "value": e.value,
            "reason": e.reason,
            "variant": e.variant(),
            "metadata": metadata,
        })),
        Err(e) => Err(json!({
            "key": key,
            "errorCode": "TARGETING_KEY_MISSING",
            "errorDetails": e.to_string(),
        })),
    }
}

async fn single(
    State(s): State<ApiState>,
    Path(key): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A key that could never be declared is simply not there; it is not
    // echoed back beyond the length a key may have.
    let shown: String = key
        .chars()
        .take(crate::rollout::spec::MAX_FLAG_KEY)
        .collect();
    let ctx = match read_context(body) {
        Ok(c) => c,
        Err((status, code, details)) => return failure(status, Some(&shown), code, &details),
    };
    let view = if is_flag_key(&key) {
        s.engine.flag(&key)
    } else {
        None
    };
    let Some(view) = view else {
        return failure(
            StatusCode::NOT_FOUND,
            Some(&shown),
            "FLAG_NOT_FOUND",
            "no rollout declares this flag",
        );
    };
    match item(&key, &view, &ctx) {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(v) => (StatusCode::BAD_REQUEST, axum::Json(v)).into_response(),
    }
}

async fn bulk(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ctx = match read_context(body) {
        Ok(c) => c,
        Err((status, code, details)) => return failure(status, None, code, &details),
    };
    let items: Vec<Value> = s
        .engine
        .flags()
        .iter()
        .map(|(key, view)| item(key, view, &ctx).unwrap_or_else(|e| e))
        .collect();
    let body = json!({"flags": items}).to_string();
    let tag = etag(body.as_bytes());
    let mut response = if none_match(&headers, &tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

/// A strong entity tag of the answer's bytes: the same flags for the same
/// context give the same tag, on every control plane.
pub fn etag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// Whether `If-None-Match` names `tag` (or `*`); weak tags compare by
/// their opaque part, as RFC 9110 says for `If-None-Match`.
fn none_match(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_stable_and_if_none_match_reads_lists_and_weak_tags() {
        let tag = etag(b"{\"flags\":[]}");
        assert_eq!(tag, etag(b"{\"flags\":[]}"));
        assert_ne!(tag, etag(b"{\"flags\":[1]}"));
        assert_eq!(tag.len(), 34);
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(none_match(&with(&tag), &tag));
        assert!(none_match(&with(&format!("\"x\", W/{tag}")), &tag));
        assert!(none_match(&with("*"), &tag));
        assert!(!none_match(&with("\"other\""), &tag));
        assert!(!none_match(&HeaderMap::new(), &tag));
    }

    #[test]
    fn bodies_parse_into_a_context_or_an_ofrep_error() {
        let read = |b: &[u8]| read_context(Ok(Bytes::copy_from_slice(b)));
        assert_eq!(read(b"").unwrap(), Context::default());
        assert_eq!(read(b"{}").unwrap(), Context::default());
        let c = read(br#"{"context": {"targetingKey": "u1"}}"#).unwrap();
        assert_eq!(c.targeting_key.as_deref(), Some("u1"));
        assert_eq!(read(b"{not json").unwrap_err().1, "PARSE_ERROR");
        assert_eq!(read(br#"{"ctx": {}}"#).unwrap_err().1, "PARSE_ERROR");
        assert_eq!(read(br#"{"context": 5}"#).unwrap_err().1, "INVALID_CONTEXT");
        assert_eq!(
            read(br#"{"context": {"a": {"b": 1}}}"#).unwrap_err(),
            (
                StatusCode::BAD_REQUEST,
                "INVALID_CONTEXT",
                "context[\"a\"]: nested values are not supported".to_owned()
            )
        );
    }
}
