//! The one place the filter talks to the host. Every call goes through
//! [`crate::abi`] (statuses as values, bytes as bytes) except the two
//! dispatches the SDK must register (see [`crate::abi`]). Failures are logged
//! and turned into `None`/defaults, because a missing header or metric must
//! not take the request (or the VM) down.
//!
//! Headers, bodies and properties are read as bytes. Text is made from them
//! only where text is needed, lossily (`U+FFFD` for bytes that are not
//! UTF-8): a Latin-1 header value is legal on the wire and must never stop
//! the filter.

use std::hash::{BuildHasher, RandomState};

use prost::Message;
use std::time::Duration;

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status as SdkStatus};

use crate::abi;
pub use crate::abi::Status;

pub fn log(level: LogLevel, message: &str) {
    let _ = abi::log(level as u32, message);
}

/// Envoy's clock, in microseconds since the epoch (0 if unavailable).
pub fn now_us() -> u64 {
    abi::current_time_ns().map_or(0, |ns| ns / 1000)
}

/// 64 random bits. `RandomState` is seeded from WASI's `random_get` once per
/// VM; hashing a counter through it gives a fresh value per call.
pub fn random_u64(counter: u64) -> u64 {
    thread_local!(static SEED: RandomState = RandomState::new());
    SEED.with(|s| s.hash_one(counter))
}

/// Text from peer bytes: lossy, never failing.
pub fn text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn header_bytes(map: MapType, name: &str) -> Option<Vec<u8>> {
    match abi::map_value(map as u32, name) {
        Ok(v) => v,
        Err(status) => {
            log(
                LogLevel::Debug,
                &format!("understudy: reading header {name} failed: {status:?}"),
            );
            None
        }
    }
}

/// A request header as text (lossy for non-UTF-8 bytes).
pub fn request_header(name: &str) -> Option<String> {
    header_bytes(MapType::HttpRequestHeaders, name).map(text)
}

/// A request header's raw bytes.
pub fn request_header_bytes(name: &str) -> Option<Vec<u8>> {
    header_bytes(MapType::HttpRequestHeaders, name)
}

/// A response header as text (lossy for non-UTF-8 bytes).
pub fn response_header(name: &str) -> Option<String> {
    header_bytes(MapType::HttpResponseHeaders, name).map(text)
}

pub fn set_request_header(name: &str, value: &str) {
    if let Err(status) =
        abi::replace_map_value(MapType::HttpRequestHeaders as u32, name, value.as_bytes())
    {
        log(
            LogLevel::Warn,
            &format!("understudy: setting header {name} failed: {status:?}"),
        );
    }
}

pub fn remove_request_header(name: &str) {
    if let Err(status) = abi::remove_map_value(MapType::HttpRequestHeaders as u32, name) {
        log(
            LogLevel::Warn,
            &format!("understudy: removing header {name} failed: {status:?}"),
        );
    }
}

/// Removes every request header whose (lower-case) name starts with
/// `prefix`; returns how many were removed.
pub fn strip_request_headers(prefix: &str) -> usize {
    let names: Vec<String> = headers_bytes(MapType::HttpRequestHeaders)
        .into_iter()
        .filter(|(name, _)| {
            name.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
        })
        .map(|(name, _)| text(name))
        .collect();
    let mut removed = 0;
    for name in &names {
        // A name with non-UTF-8 bytes cannot be named back to the host
        // exactly; Envoy refuses such names at its codecs anyway.
        remove_request_header(name);
        removed += 1;
    }
    removed
}

pub fn add_response_header(name: &str, value: &str) {
    if let Err(status) =
        abi::add_map_value(MapType::HttpResponseHeaders as u32, name, value.as_bytes())
    {
        log(
            LogLevel::Warn,
            &format!("understudy: adding header {name} failed: {status:?}"),
        );
    }
}

/// Serializes a header map the way the ABI expects: count, then (name
/// length, value length) pairs, then each name and value NUL-terminated.
pub fn serialize_map(map: &[(String, String)]) -> Vec<u8> {
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::with_capacity(
        4 + map
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>(),
    );
    out.extend_from_slice(&len32(map.len()));
    for (k, v) in map {
        out.extend_from_slice(&len32(k.len()));
        out.extend_from_slice(&len32(v.len()));
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Parses a serialized header map into raw byte pairs. Malformed input
/// (truncated, lengths past the end) yields the pairs read so far, never a
/// panic: the host is trusted, but this code does not rely on it.
pub fn parse_map(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let read_u32 = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        let arr: [u8; 4] = b.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(arr)).ok()
    };
    let Some(count) = read_u32(0) else {
        return Vec::new();
    };
    let Some(mut p) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    let mut map = Vec::new();
    for n in 0..count {
        let s = 4 + n * 8;
        let (Some(klen), Some(vlen)) = (read_u32(s), read_u32(s + 4)) else {
            break;
        };
        let Some(key) = p.checked_add(klen).and_then(|end| bytes.get(p..end)) else {
            break;
        };
        p = p + klen + 1;
        let Some(value) = p.checked_add(vlen).and_then(|end| bytes.get(p..end)) else {
            break;
        };
        p = p + vlen + 1;
        map.push((key.to_vec(), value.to_vec()));
    }
    map
}

fn send_local(status: u32, headers: &[(String, String)], body: &[u8]) -> Result<(), Status> {
    abi::send_local_response(status, &serialize_map(headers), body)
}

/// A local reply from the stream's own context.
pub fn reply(status: u32, headers: &[(String, String)], body: &[u8]) -> bool {
    match send_local(status, headers, body) {
        Ok(()) => true,
        Err(s) => {
            log(
                LogLevel::Warn,
                &format!("understudy: local reply {status} failed: {s:?}"),
            );
            false
        }
    }
}

/// A header map as raw bytes.
pub fn headers_bytes(map: MapType) -> Vec<(Vec<u8>, Vec<u8>)> {
    match abi::map_pairs(map as u32) {
        Ok(bytes) => parse_map(&bytes),
        Err(status) => {
            log(
                LogLevel::Debug,
                &format!("understudy: reading header map {map:?} failed: {status:?}"),
            );
            Vec::new()
        }
    }
}

/// A header map as text, lossy where a name or value is not UTF-8. Used
/// where headers are copied (hedges, shadows, stored replays) or compared:
/// the SDK's dispatch takes `&str` headers, so a non-UTF-8 byte travels on as
/// U+FFFD rather than stopping the feature.
pub fn headers(map: MapType) -> Vec<(String, String)> {
    headers_bytes(map)
        .into_iter()
        .map(|(k, v)| (text(k), text(v)))
        .collect()
}

pub fn buffer(kind: BufferType, size: usize) -> Vec<u8> {
    match abi::buffer(kind as u32, 0, size) {
        Ok(b) => b.unwrap_or_default(),
        Err(status) => {
            log(
                LogLevel::Debug,
                &format!("understudy: reading buffer {kind:?} failed: {status:?}"),
            );
            Vec::new()
        }
    }
}

pub fn define(kind: MetricType, name: &str) -> Result<u32, String> {
    abi::define_metric(kind as u32, name)
        .map_err(|status| format!("defining metric {name:?} failed: {status:?}"))
}

pub fn increment(metric: u32, by: i64) {
    if let Err(status) = abi::increment_metric(metric, by) {
        log(
            LogLevel::Warn,
            &format!("understudy: incrementing metric {metric} failed: {status:?}"),
        );
    }
}

pub fn record(metric: u32, value: u64) {
    if let Err(status) = abi::record_metric(metric, value) {
        log(
            LogLevel::Warn,
            &format!("understudy: recording metric {metric} failed: {status:?}"),
        );
    }
}

pub fn set_tick_period(period: Duration) {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    if let Err(status) = abi::set_tick_period_ms(ms) {
        log(
            LogLevel::Error,
            &format!("understudy: setting the tick period failed: {status:?}"),
        );
    }
}

/// The plugin configuration's bytes.
pub fn plugin_configuration(size: usize) -> Result<Vec<u8>, Status> {
    abi::buffer(BufferType::PluginConfiguration as u32, 0, size).map(Option::unwrap_or_default)
}

/// Answers the stream whose context is `stream` with a local reply. Called
/// from the root context, so the stream is made the effective context first.
pub fn reply_on(stream: u32, status: u32, headers: &[(String, String)], body: &[u8]) -> bool {
    if let Err(s) = abi::set_effective_context(stream) {
        log(
            LogLevel::Debug,
            &format!("understudy: stream {stream} is gone ({s:?})"),
        );
        return false;
    }
    match send_local(status, headers, body) {
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
    match abi::set_effective_context(stream) {
        Ok(()) => {
            if let Err(s) = abi::continue_response() {
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

/// A shared-data value and its CAS token (0: none).
pub fn shared_get(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    abi::shared_data(key)
}

/// Why a shared-data write did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum SharedSetError {
    /// Someone wrote since our read: read again.
    CasMismatch,
    /// Anything else the host said.
    Failed(Status),
}

pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), SharedSetError> {
    abi::set_shared_data(key, value, cas).map_err(|s| {
        if s == Status::CAS_MISMATCH {
            SharedSetError::CasMismatch
        } else {
            SharedSetError::Failed(s)
        }
    })
}

/// Sends a unary gRPC call through the SDK (which registers the token).
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    message: &[u8],
    timeout: Duration,
) -> Result<u32, SdkStatus> {
    proxy_wasm::hostcalls::dispatch_grpc_call(
        cluster,
        service,
        method,
        vec![],
        Some(message),
        timeout,
    )
}

/// Sends an HTTP call through the SDK (which registers the token).
pub fn http_call(
    cluster: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, SdkStatus> {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout)
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
    for path in [&b"xds\0node"[..], &b"node"[..]] {
        if let Ok(Some(bytes)) = abi::property(path)
            && let Ok(node) = NodeId::decode(bytes.as_slice())
            && !node.id.is_empty()
        {
            return node.id;
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip_and_truncation_never_panics() {
        let map = vec![
            (":path".to_owned(), "/a".to_owned()),
            ("x".to_owned(), String::new()),
        ];
        let bytes = serialize_map(&map);
        let parsed = parse_map(&bytes);
        assert_eq!(
            parsed,
            vec![
                (b":path".to_vec(), b"/a".to_vec()),
                (b"x".to_vec(), Vec::new())
            ]
        );
        for cut in 0..bytes.len() {
            assert!(parse_map(&bytes[..cut]).len() <= 2);
        }
        assert!(parse_map(&[0xff, 0xff, 0xff, 0xff]).is_empty());
    }

    #[test]
    fn text_is_lossy_for_latin1() {
        assert_eq!(text(b"caf\xe9".to_vec()), "caf\u{fffd}");
        assert_eq!(text(b"ok".to_vec()), "ok");
    }
}
