//! A fake [`Host`] for the glue's native unit tests: header maps, buffers,
//! metrics, shared data with CAS tokens, and every call, reply and resume
//! recorded, with switches to make the host fail the way Envoy can. Tests
//! drive [`crate::Root`] and [`crate::Http`] through the proxy-wasm traits
//! exactly as Envoy would, then read what the filter asked of its host.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use prost::Message;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

use crate::host::{HeaderPairs, Host, NodeId, Status};

/// 2023-11-14T22:13:20Z, where every fake host's clock starts.
pub const EPOCH_US: u64 = 1_700_000_000_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub kind: MetricType,
    pub value: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrpcCall {
    pub token: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub message: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The effective context when it was sent (`None`: the stream's own).
    pub context: Option<u32>,
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Everything the fake host holds; tests set and read it directly.
#[derive(Debug, Default)]
pub struct State {
    pub now_us: u64,
    pub plugin_config: Vec<u8>,
    pub maps: BTreeMap<u32, Vec<(String, String)>>,
    pub buffers: BTreeMap<u32, Vec<u8>>,
    pub metrics: Vec<Metric>,
    pub shared: BTreeMap<String, (Vec<u8>, u32)>,
    pub http_calls: Vec<HttpCall>,
    pub grpc_calls: Vec<GrpcCall>,
    pub replies: Vec<Reply>,
    pub resumed: Vec<u32>,
    pub effective_context: Option<u32>,
    pub tick_period_ms: Option<u32>,
    pub logs: Vec<String>,
    pub node_id: String,
    /// Calls that read request headers (one header or the whole map).
    pub request_header_reads: u32,
    next_token: u32,
    /// Host failures to simulate.
    pub fail_plugin_config: bool,
    pub fail_define: bool,
    /// HTTP and gRPC calls fail to start.
    pub fail_calls: bool,
    /// Only gRPC calls (reports) fail to start.
    pub fail_grpc: bool,
    pub fail_shared: bool,
    /// The next this many shared-data writes see another worker's write first.
    pub cas_conflicts: u32,
}

/// Another worker's work, run by the fake host just before this worker's
/// next shared-data write to a key starting with `prefix`: what Envoy's other
/// workers may do between one worker's read and its write.
pub struct Interleave {
    pub prefix: String,
    pub run: Box<dyn FnOnce()>,
}

impl std::fmt::Debug for Interleave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interleave")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub struct FakeHost {
    pub state: RefCell<State>,
    /// Kept apart from `state`: the other worker's calls borrow `state`.
    pub interleave: RefCell<Option<Interleave>>,
}

impl FakeHost {
    fn count_read(&self, map: MapType) {
        if map == MapType::HttpRequestHeaders {
            self.with(|s| s.request_header_reads += 1);
        }
    }

    /// A host whose clock reads a real epoch time (the filter's first
    /// reports are due at once, as in Envoy).
    pub fn new() -> Rc<Self> {
        let host = Self::default();
        host.with(|s| s.now_us = EPOCH_US);
        Rc::new(host)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.borrow_mut())
    }

    pub fn set_map(&self, map: MapType, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.with(|s| s.maps.insert(map as u32, headers));
    }

    pub fn set_buffer(&self, kind: BufferType, bytes: &[u8]) {
        self.with(|s| s.buffers.insert(kind as u32, bytes.to_vec()));
    }

    pub fn advance_ms(&self, ms: u64) {
        self.with(|s| s.now_us += ms * 1000);
    }

    /// A metric's value by its full name (`None`: never defined).
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.with(|s| s.metrics.iter().find(|m| m.name == name).map(|m| m.value))
    }

    pub fn map(&self, map: MapType) -> Vec<(String, String)> {
        self.with(|s| s.maps.get(&(map as u32)).cloned().unwrap_or_default())
    }

    pub fn header(&self, map: MapType, name: &str) -> Option<String> {
        self.map(map)
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn replies(&self) -> Vec<Reply> {
        self.with(|s| s.replies.clone())
    }

    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.with(|s| s.http_calls.clone())
    }

    pub fn grpc_calls(&self) -> Vec<GrpcCall> {
        self.with(|s| s.grpc_calls.clone())
    }

    fn token(s: &mut State) -> u32 {
        s.next_token += 1;
        s.next_token
    }
}

impl Host for FakeHost {
    fn log(&self, level: LogLevel, message: &str) {
        self.with(|s| s.logs.push(format!("{level:?}: {message}")));
    }

    fn now_us(&self) -> u64 {
        self.with(|s| s.now_us)
    }

    fn random_u64(&self, counter: u64) -> u64 {
        // Deterministic, spread over the range (splitmix64's finalizer).
        let mut z = counter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn map_value(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
        self.count_read(map);
        Ok(self.header(map, name).map(String::into_bytes))
    }

    fn map_pairs(&self, map: MapType) -> Result<HeaderPairs, Status> {
        self.count_read(map);
        Ok(self
            .map(map)
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
            .collect())
    }

    fn replace_map_value(&self, map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
        let value = String::from_utf8_lossy(value).into_owned();
        self.with(|s| {
            let headers = s.maps.entry(map as u32).or_default();
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            headers.push((name.to_owned(), value));
        });
        Ok(())
    }

    fn add_map_value(&self, map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
        let value = String::from_utf8_lossy(value).into_owned();
        self.with(|s| {
            s.maps
                .entry(map as u32)
                .or_default()
                .push((name.to_owned(), value))
        });
        Ok(())
    }

    fn remove_map_value(&self, map: MapType, name: &str) -> Result<(), Status> {
        self.with(|s| {
            s.maps
                .entry(map as u32)
                .or_default()
                .retain(|(k, _)| !k.eq_ignore_ascii_case(name))
        });
        Ok(())
    }

    fn buffer_bytes(&self, kind: BufferType, max: usize) -> Result<Option<Vec<u8>>, Status> {
        self.with(|s| {
            if matches!(kind, BufferType::PluginConfiguration) {
                if s.fail_plugin_config {
                    return Err(Status(11));
                }
                return Ok(Some(s.plugin_config.iter().copied().take(max).collect()));
            }
            Ok(s.buffers
                .get(&(kind as u32))
                .map(|b| b.iter().copied().take(max).collect()))
        })
    }

    fn send_local_response(
        &self,
        status: u32,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(), Status> {
        self.with(|s| {
            s.replies.push(Reply {
                context: s.effective_context,
                status,
                headers: headers.to_vec(),
                body: body.to_vec(),
            })
        });
        Ok(())
    }

    fn set_effective_context(&self, context: u32) -> Result<(), Status> {
        self.with(|s| s.effective_context = Some(context));
        Ok(())
    }

    fn continue_response(&self) -> Result<(), Status> {
        self.with(|s| {
            if let Some(c) = s.effective_context {
                s.resumed.push(c);
            }
        });
        Ok(())
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        self.with(|s| {
            if s.fail_define {
                return Err(Status::BAD_ARGUMENT);
            }
            // Envoy gives one id per name: defining twice returns the first.
            if let Some(i) = s.metrics.iter().position(|m| m.name == name) {
                return Ok(i as u32);
            }
            s.metrics.push(Metric {
                name: name.to_owned(),
                kind,
                value: 0,
            });
            Ok(s.metrics.len() as u32 - 1)
        })
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status> {
        self.with(|s| match s.metrics.get_mut(id as usize) {
            Some(m) => {
                m.value += by;
                Ok(())
            }
            None => Err(Status::NOT_FOUND),
        })
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.with(|s| match s.metrics.get_mut(id as usize) {
            Some(m) => {
                m.value = value as i64;
                Ok(())
            }
            None => Err(Status::NOT_FOUND),
        })
    }

    fn set_tick_period_ms(&self, period: u32) -> Result<(), Status> {
        self.with(|s| s.tick_period_ms = Some(period));
        Ok(())
    }

    fn shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        self.with(|s| {
            if s.fail_shared {
                return Err(Status(11));
            }
            Ok(match s.shared.get(key) {
                Some((v, cas)) => (Some(v.clone()), *cas),
                None => (None, 0),
            })
        })
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let due = self
            .interleave
            .borrow()
            .as_ref()
            .is_some_and(|i| key.starts_with(&i.prefix));
        let other = if due {
            self.interleave.borrow_mut().take()
        } else {
            None
        };
        if let Some(other) = other {
            (other.run)();
        }
        self.with(|s| {
            if s.fail_shared {
                return Err(Status(11));
            }
            // Envoy's rule: the CAS token is checked only against a key
            // that exists; a write to an absent key always succeeds.
            let current = s.shared.get(key).map_or(0, |(_, c)| *c);
            if s.cas_conflicts > 0 {
                // Another worker wrote between our read and this write.
                s.cas_conflicts -= 1;
                let entry = s.shared.entry(key.to_owned()).or_default();
                entry.1 = current + 1;
                return Err(Status::CAS_MISMATCH);
            }
            if cas != 0 && cas != current {
                return Err(Status::CAS_MISMATCH);
            }
            s.shared
                .insert(key.to_owned(), (value.to_vec(), current + 1));
            Ok(())
        })
    }

    fn property(&self, path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        self.with(|s| {
            Ok((path == b"xds\0node" && !s.node_id.is_empty()).then(|| {
                NodeId {
                    id: s.node_id.clone(),
                }
                .encode_to_vec()
            }))
        })
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
        _timeout: Duration,
    ) -> Result<u32, Status> {
        self.with(|s| {
            if s.fail_calls {
                return Err(Status::BAD_ARGUMENT);
            }
            let token = Self::token(s);
            s.http_calls.push(HttpCall {
                token,
                cluster: cluster.to_owned(),
                headers: headers.to_vec(),
                body: body.map(<[u8]>::to_vec),
            });
            Ok(token)
        })
    }

    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        _timeout: Duration,
    ) -> Result<u32, Status> {
        self.with(|s| {
            if s.fail_calls || s.fail_grpc {
                return Err(Status::BAD_ARGUMENT);
            }
            let token = Self::token(s);
            s.grpc_calls.push(GrpcCall {
                token,
                cluster: cluster.to_owned(),
                service: service.to_owned(),
                method: method.to_owned(),
                message: message.to_vec(),
            });
            Ok(token)
        })
    }
}
