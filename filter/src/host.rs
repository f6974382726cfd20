//! The one place the filter talks to the host: the [`Host`] trait.
//!
//! The glue (`lib.rs` and the feature modules) holds an `Rc<dyn Host>` and
//! calls nothing else, so it runs natively against a fake host in unit tests
//! (`crate::fake`) and inside Envoy against [`AbiHost`] (wasm only), which
//! goes through [`crate::abi`] (statuses as values, bytes as bytes) except
//! for the two dispatches the SDK must register (see [`crate::abi`]).
//!
//! An implementation provides the required methods: the host's primitives,
//! each returning the host's status as a value. The provided methods are what
//! the glue calls: they log failures and turn them into `None`/defaults,
//! because a missing header or metric must not take the request (or the VM)
//! down.
//!
//! Headers, bodies and properties are read as bytes. Text is made from them
//! only where text is needed, lossily (`U+FFFD` for bytes that are not
//! UTF-8): a Latin-1 header value is legal on the wire and must never stop
//! the filter.

use std::time::Duration;

use prost::Message;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

/// A host status code other than `Ok` (0). Named constants for the ones the
/// filter treats specially; anything else is logged with its number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Status(pub u32);

impl Status {
    pub const NOT_FOUND: Status = Status(1);
    pub const BAD_ARGUMENT: Status = Status(2);
    pub const CAS_MISMATCH: Status = Status(8);
}

/// Why a shared-data write did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum SharedSetError {
    /// Someone wrote since our read: read again.
    CasMismatch,
    /// Anything else the host said.
    Failed(Status),
}

/// A header map as raw (name, value) byte pairs.
pub type HeaderPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A request's headers, read from the host once per request (one host call
/// for the whole map) and looked up here by every feature: a host call costs
/// a crossing out of the VM and one back into its allocator, so asking for
/// `:path`, `:method`, a tenant header and a key one by one costs more than
/// reading them all.
///
/// It is taken after the client's `x-understudy-*` headers are removed (see
/// [`Host::strip_internal_headers`]) and never sees what the filter adds
/// later (a hedge's generated key).
#[derive(Debug, Default, Clone)]
pub struct RequestHeaders(HeaderPairs);

impl RequestHeaders {
    pub fn new(pairs: HeaderPairs) -> Self {
        Self(pairs)
    }

    /// The first header called `name` (ASCII case ignored, as Envoy's own
    /// lookup does), as raw bytes.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }

    /// [`Self::bytes`] as text, lossy where it is not UTF-8.
    pub fn text(&self, name: &str) -> Option<String> {
        self.bytes(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every header as text, lossy (see [`Host::headers`]): what copies carry.
    pub fn all_text(&self) -> Vec<(String, String)> {
        text_pairs(self.0.clone())
    }
}

/// What the filter needs from its host (Envoy's proxy-wasm ABI).
pub trait Host {
    fn log(&self, level: LogLevel, message: &str);
    /// The host's clock, in microseconds since the epoch (0 if unavailable).
    fn now_us(&self) -> u64;
    /// 64 random bits for draw number `counter`.
    fn random_u64(&self, counter: u64) -> u64;
    /// One header's raw bytes; `Ok(None)` when absent.
    fn map_value(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status>;
    /// Every header of a map, as raw byte pairs.
    fn map_pairs(&self, map: MapType) -> Result<HeaderPairs, Status>;
    fn replace_map_value(&self, map: MapType, name: &str, value: &[u8]) -> Result<(), Status>;
    fn add_map_value(&self, map: MapType, name: &str, value: &[u8]) -> Result<(), Status>;
    fn remove_map_value(&self, map: MapType, name: &str) -> Result<(), Status>;
    /// Up to `max` bytes of a buffer; `Ok(None)` when it does not exist.
    fn buffer_bytes(&self, kind: BufferType, max: usize) -> Result<Option<Vec<u8>>, Status>;
    /// A local reply on the current (effective) stream.
    fn send_local_response(
        &self,
        status: u32,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(), Status>;
    /// Makes stream `context` the one later calls act on (from the root context).
    fn set_effective_context(&self, context: u32) -> Result<(), Status>;
    /// Lets the current stream's held response continue.
    fn continue_response(&self) -> Result<(), Status>;
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status>;
    fn set_tick_period_ms(&self, period: u32) -> Result<(), Status>;
    /// A shared-data value and its CAS token; `(None, 0)` when absent.
    fn shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status>;
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status>;
    /// A property (`path` is NUL-separated); `Ok(None)` when absent.
    fn property(&self, path: &[u8]) -> Result<Option<Vec<u8>>, Status>;
    /// Starts an HTTP call; its answer arrives at the root context by token.
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status>;
    /// Starts a unary gRPC call; its end arrives at the root context by token.
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, Status>;

    // === provided: what the glue calls ===

    /// A request header as text (lossy for non-UTF-8 bytes).
    fn request_header(&self, name: &str) -> Option<String> {
        self.header_bytes(MapType::HttpRequestHeaders, name)
            .map(text)
    }

    /// A response header as text (lossy for non-UTF-8 bytes).
    fn response_header(&self, name: &str) -> Option<String> {
        self.header_bytes(MapType::HttpResponseHeaders, name)
            .map(text)
    }

    /// The response's `:status` (0 when absent or not a number).
    fn response_status(&self) -> u16 {
        self.response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header_bytes(&self, map: MapType, name: &str) -> Option<Vec<u8>> {
        match self.map_value(map, name) {
            Ok(v) => v,
            Err(status) => {
                self.log(
                    LogLevel::Debug,
                    &format!("understudy: reading header {name} failed: {status:?}"),
                );
                None
            }
        }
    }

    fn set_request_header(&self, name: &str, value: &str) {
        if let Err(status) =
            self.replace_map_value(MapType::HttpRequestHeaders, name, value.as_bytes())
        {
            self.log(
                LogLevel::Warn,
                &format!("understudy: setting header {name} failed: {status:?}"),
            );
        }
    }

    fn remove_request_header(&self, name: &str) {
        if let Err(status) = self.remove_map_value(MapType::HttpRequestHeaders, name) {
            self.log(
                LogLevel::Warn,
                &format!("understudy: removing header {name} failed: {status:?}"),
            );
        }
    }

    /// Reads the request's headers (one host call), removes from the
    /// request every header whose name starts with `prefix` (ASCII case
    /// ignored), and returns the rest with how many were removed.
    fn strip_internal_headers(&self, prefix: &str) -> (RequestHeaders, usize) {
        let (internal, rest): (HeaderPairs, HeaderPairs) = self
            .headers_bytes(MapType::HttpRequestHeaders)
            .into_iter()
            .partition(|(name, _)| {
                name.get(..prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
            });
        let mut removed_names: Vec<&[u8]> = Vec::new();
        for (name, _) in &internal {
            // Once per name: the host removes every value of it at once.
            if removed_names.contains(&name.as_slice()) {
                continue;
            }
            removed_names.push(name);
            // A name with non-UTF-8 bytes cannot be named back to the host
            // exactly; Envoy refuses such names at its codecs anyway.
            self.remove_request_header(&String::from_utf8_lossy(name));
        }
        (RequestHeaders::new(rest), internal.len())
    }

    fn add_response_header(&self, name: &str, value: &str) {
        if let Err(status) =
            self.add_map_value(MapType::HttpResponseHeaders, name, value.as_bytes())
        {
            self.log(
                LogLevel::Warn,
                &format!("understudy: adding header {name} failed: {status:?}"),
            );
        }
    }

    /// A local reply from the stream's own context.
    fn reply(&self, status: u32, headers: &[(String, String)], body: &[u8]) -> bool {
        match self.send_local_response(status, headers, body) {
            Ok(()) => true,
            Err(s) => {
                self.log(
                    LogLevel::Warn,
                    &format!("understudy: local reply {status} failed: {s:?}"),
                );
                false
            }
        }
    }

    /// Answers the stream whose context is `stream` with a local reply.
    /// Called from the root context, so the stream is made the effective
    /// context first.
    fn reply_on(
        &self,
        stream: u32,
        status: u32,
        headers: &[(String, String)],
        body: &[u8],
    ) -> bool {
        if let Err(s) = self.set_effective_context(stream) {
            self.log(
                LogLevel::Debug,
                &format!("understudy: stream {stream} is gone ({s:?})"),
            );
            return false;
        }
        match self.send_local_response(status, headers, body) {
            Ok(()) => true,
            Err(s) => {
                self.log(
                    LogLevel::Warn,
                    &format!("understudy: local reply on stream {stream} failed: {s:?}"),
                );
                false
            }
        }
    }

    /// Lets a held response continue on `stream` (from the root context).
    fn resume_response_on(&self, stream: u32) {
        match self.set_effective_context(stream) {
            Ok(()) => {
                if let Err(s) = self.continue_response() {
                    self.log(
                        LogLevel::Warn,
                        &format!("understudy: resuming stream {stream} failed: {s:?}"),
                    );
                }
            }
            Err(s) => self.log(
                LogLevel::Debug,
                &format!("understudy: stream {stream} is gone ({s:?})"),
            ),
        }
    }

    /// A header map as raw bytes.
    fn headers_bytes(&self, map: MapType) -> HeaderPairs {
        match self.map_pairs(map) {
            Ok(pairs) => pairs,
            Err(status) => {
                self.log(
                    LogLevel::Debug,
                    &format!("understudy: reading header map {map:?} failed: {status:?}"),
                );
                Vec::new()
            }
        }
    }

    /// A header map as text, lossy where a name or value is not UTF-8. Used
    /// where headers are copied (hedges, shadows, stored replays) or
    /// compared: the SDK's dispatch takes `&str` headers, so a non-UTF-8 byte
    /// travels on as U+FFFD rather than stopping the feature.
    fn headers(&self, map: MapType) -> Vec<(String, String)> {
        text_pairs(self.headers_bytes(map))
    }

    /// A buffer's first `size` bytes (empty when unreadable).
    fn buffer(&self, kind: BufferType, size: usize) -> Vec<u8> {
        match self.buffer_bytes(kind, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                self.log(
                    LogLevel::Debug,
                    &format!("understudy: reading buffer {kind:?} failed: {status:?}"),
                );
                Vec::new()
            }
        }
    }

    fn define(&self, kind: MetricType, name: &str) -> Result<u32, String> {
        self.define_metric(kind, name)
            .map_err(|status| format!("defining metric {name:?} failed: {status:?}"))
    }

    fn increment(&self, metric: u32, by: i64) {
        if let Err(status) = self.increment_metric(metric, by) {
            self.log(
                LogLevel::Warn,
                &format!("understudy: incrementing metric {metric} failed: {status:?}"),
            );
        }
    }

    fn record(&self, metric: u32, value: u64) {
        if let Err(status) = self.record_metric(metric, value) {
            self.log(
                LogLevel::Warn,
                &format!("understudy: recording metric {metric} failed: {status:?}"),
            );
        }
    }

    fn set_tick_period(&self, period: Duration) {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        if let Err(status) = self.set_tick_period_ms(ms) {
            self.log(
                LogLevel::Error,
                &format!("understudy: setting the tick period failed: {status:?}"),
            );
        }
    }

    /// The plugin configuration's bytes.
    fn plugin_configuration(&self, size: usize) -> Result<Vec<u8>, Status> {
        self.buffer_bytes(BufferType::PluginConfiguration, size)
            .map(Option::unwrap_or_default)
    }

    /// A shared-data value and its CAS token (0: none).
    fn shared_get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        self.shared_data(key)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedSetError> {
        self.set_shared_data(key, value, cas).map_err(|s| {
            if s == Status::CAS_MISMATCH {
                SharedSetError::CasMismatch
            } else {
                SharedSetError::Failed(s)
            }
        })
    }

    /// This Envoy's node id: the `xds.node` attribute (a serialized `Node`),
    /// or the older wasm `node` attribute; empty if the host offers neither.
    fn node_id(&self) -> String {
        for path in [&b"xds\0node"[..], &b"node"[..]] {
            if let Ok(Some(bytes)) = self.property(path)
                && let Ok(node) = NodeId::decode(bytes.as_slice())
                && !node.id.is_empty()
            {
                return node.id;
            }
        }
        String::new()
    }
}

/// Text from peer bytes: lossy, never failing.
pub fn text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// Header pairs as text, lossy where a name or value is not UTF-8.
fn text_pairs(pairs: HeaderPairs) -> Vec<(String, String)> {
    pairs.into_iter().map(|(k, v)| (text(k), text(v))).collect()
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

/// Just the `id` field (1) of Envoy's `config.core.v3.Node`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct NodeId {
    #[prost(string, tag = "1")]
    pub(crate) id: String,
}

/// The real host: Envoy's proxy-wasm ABI. Only in the wasm build; native
/// builds (the unit tests) never link the host's imports.
#[cfg(target_arch = "wasm32")]
#[derive(Debug, Default, Clone, Copy)]
pub struct AbiHost;

#[cfg(target_arch = "wasm32")]
impl Host for AbiHost {
    fn log(&self, level: LogLevel, message: &str) {
        let _ = abi::log(level as u32, message);
    }

    fn now_us(&self) -> u64 {
        abi::current_time_ns().map_or(0, |ns| ns / 1000)
    }

    /// `RandomState` is seeded from WASI's `random_get` once per VM; hashing
    /// a counter through it gives a fresh value per call.
    fn random_u64(&self, counter: u64) -> u64 {
        use std::hash::{BuildHasher, RandomState};
        thread_local!(static SEED: RandomState = RandomState::new());
        SEED.with(|s| s.hash_one(counter))
    }

    fn map_value(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
        abi::map_value(map as u32, name)
    }

    fn map_pairs(&self, map: MapType) -> Result<HeaderPairs, Status> {
        abi::map_pairs(map as u32).map(|bytes| parse_map(&bytes))
    }

    fn replace_map_value(&self, map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
        abi::replace_map_value(map as u32, name, value)
    }

    fn add_map_value(&self, map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
        abi::add_map_value(map as u32, name, value)
    }

    fn remove_map_value(&self, map: MapType, name: &str) -> Result<(), Status> {
        abi::remove_map_value(map as u32, name)
    }

    fn buffer_bytes(&self, kind: BufferType, max: usize) -> Result<Option<Vec<u8>>, Status> {
        abi::buffer(kind as u32, 0, max)
    }

    fn send_local_response(
        &self,
        status: u32,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(), Status> {
        abi::send_local_response(status, &serialize_map(headers), body)
    }

    fn set_effective_context(&self, context: u32) -> Result<(), Status> {
        abi::set_effective_context(context)
    }

    fn continue_response(&self) -> Result<(), Status> {
        abi::continue_response()
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        abi::define_metric(kind as u32, name)
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status> {
        abi::increment_metric(id, by)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        abi::record_metric(id, value)
    }

    fn set_tick_period_ms(&self, period: u32) -> Result<(), Status> {
        abi::set_tick_period_ms(period)
    }

    fn shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        abi::shared_data(key)
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        abi::set_shared_data(key, value, cas)
    }

    fn property(&self, path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        abi::property(path)
    }

    /// Through the SDK, which must register the token.
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout)
            .map_err(|s| Status(s as u32))
    }

    /// Through the SDK, which must register the token. An Istio cluster
    /// name goes as a `GrpcService` with a valid authority
    /// ([`understudy_core::rules::grpc_upstream`]).
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, Status> {
        let upstream = understudy_core::rules::grpc_upstream(cluster)
            .map_err(|_| Status(proxy_wasm::types::Status::BadArgument as u32))?;
        proxy_wasm::hostcalls::dispatch_grpc_call(
            &upstream,
            service,
            method,
            vec![],
            Some(message),
            timeout,
        )
        .map_err(|s| Status(s as u32))
    }
}

#[cfg(target_arch = "wasm32")]
use crate::abi;

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
