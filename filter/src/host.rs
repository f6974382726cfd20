//! Small wrappers over `proxy_wasm::hostcalls`. Each one handles the call's
//! `Status` so the rest of the filter never unwraps; failures are logged and
//! turned into `None`/defaults, because a missing header or metric must not
//! take the request (or the VM) down.

use std::hash::{BuildHasher, RandomState};

use prost::Message;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Envoy's clock, in microseconds since the epoch (0 if unavailable).
pub fn now_us() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 64 random bits. `RandomState` is seeded from WASI's `random_get` once per
/// VM; hashing a counter through it gives a fresh value per call.
pub fn random_u64(counter: u64) -> u64 {
    thread_local!(static SEED: RandomState = RandomState::new());
    SEED.with(|s| s.hash_one(counter))
}

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

pub fn set_request_header(name: &str, value: &str) {
    if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
        log(
            LogLevel::Warn,
            &format!("understudy: setting header {name} failed: {status:?}"),
        );
    }
}

pub fn add_response_header(name: &str, value: &str) {
    if let Err(status) = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value) {
        log(
            LogLevel::Warn,
            &format!("understudy: adding header {name} failed: {status:?}"),
        );
    }
}

/// A local reply from the stream's own context.
pub fn reply(status: u32, headers: &[(String, String)], body: &[u8]) {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Err(s) = hostcalls::send_http_response(status, headers, Some(body)) {
        log(
            LogLevel::Warn,
            &format!("understudy: local reply {status} failed: {s:?}"),
        );
    }
}

pub fn headers(map: MapType) -> Vec<(String, String)> {
    hostcalls::get_map(map).unwrap_or_default()
}

pub fn buffer(kind: BufferType, size: usize) -> Vec<u8> {
    hostcalls::get_buffer(kind, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn define(kind: MetricType, name: &str) -> Result<u32, String> {
    hostcalls::define_metric(kind, name)
        .map_err(|status| format!("defining metric {name:?} failed: {status:?}"))
}

pub fn increment(metric: u32, by: i64) {
    if let Err(status) = hostcalls::increment_metric(metric, by) {
        log(
            LogLevel::Warn,
            &format!("understudy: incrementing metric {metric} failed: {status:?}"),
        );
    }
}

pub fn record(metric: u32, value: u64) {
    if let Err(status) = hostcalls::record_metric(metric, value) {
        log(
            LogLevel::Warn,
            &format!("understudy: recording metric {metric} failed: {status:?}"),
        );
    }
}

pub fn set_tick_period(period: Duration) {
    if let Err(status) = hostcalls::set_tick_period(period) {
        log(
            LogLevel::Error,
            &format!("understudy: setting the tick period failed: {status:?}"),
        );
    }
}

/// Answers the stream whose context is `stream` with a local reply. Called
/// from the root context, so the stream is made the effective context first.
pub fn reply_on(stream: u32, status: u32, headers: &[(String, String)], body: &[u8]) -> bool {
    if let Err(s) = hostcalls::set_effective_context(stream) {
        log(
            LogLevel::Debug,
            &format!("understudy: stream {stream} is gone ({s:?})"),
        );
        return false;
    }
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match hostcalls::send_http_response(status, headers, Some(body)) {
        Ok(()) => true,
        Err(s) => {
            log(
                LogLevel::Warn,
                &format!("understudy: local reply on stream {stream} failed: {s:?}"),
            );
            false
        }
    }
}

/// Lets a held response continue on `stream` (from the root context).
pub fn resume_response_on(stream: u32) {
    match hostcalls::set_effective_context(stream) {
        Ok(()) => {
            if let Err(s) = hostcalls::resume_http_response() {
                log(
                    LogLevel::Warn,
                    &format!("understudy: resuming stream {stream} failed: {s:?}"),
                );
            }
        }
        Err(s) => log(
            LogLevel::Debug,
            &format!("understudy: stream {stream} is gone ({s:?})"),
        ),
    }
}

/// Just the `id` field (1) of Envoy's `config.core.v3.Node`.
#[derive(Clone, PartialEq, prost::Message)]
struct NodeId {
    #[prost(string, tag = "1")]
    id: String,
}

/// This Envoy's node id: the `xds.node` attribute (a serialized `Node`), or
/// the older wasm `node` attribute; empty if the host offers neither.
pub fn node_id() -> String {
    for path in [vec!["xds", "node"], vec!["node"]] {
        if let Ok(Some(bytes)) = hostcalls::get_property(path)
            && let Ok(node) = NodeId::decode(bytes.as_slice())
            && !node.id.is_empty()
        {
            return node.id;
        }
    }
    String::new()
}
