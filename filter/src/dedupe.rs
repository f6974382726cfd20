//! Inbound duplicate suppression glue: carries out [`understudy_core::dedupe`]
//! decisions with shared data (the process-wide store) and local replies.
//!
//! A request with an `Idempotency-Key` on a route with `dedupe` is held until
//! its body is complete (the payload fingerprint needs it), then:
//! forwarded after claiming the key's slot, answered from the stored
//! response, or refused with 409 (first one still in flight) or 422 (same key,
//! other payload). The first response is copied as it streams past and
//! stored when it ends.

use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType};
use understudy_core::dedupe::{self, Decision, DedupeConfig, Entry};
use understudy_core::{FilterConfig, stats};

use std::rc::Rc;

use crate::host::{Host, RequestHeaders, SharedSetError};

/// The header a replayed answer carries.
pub const REPLAYED: &str = "idempotent-replayed";
/// CAS conflicts tolerated before a request is forwarded unprotected.
const CAS_RETRIES: usize = 4;

struct Metrics {
    replayed: u32,
    in_flight_409: u32,
    mismatch_422: u32,
    invalid_key_400: u32,
    slot_busy: u32,
    stored: u32,
    unreadable_slot: u32,
    /// A claim replaced another key's entry that still counted.
    evicted_live: u32,
}

struct RouteDedupe {
    cfg: DedupeConfig,
    metrics: Metrics,
}

/// Per-route dedupe settings of one worker. The store itself is shared data.
pub struct Dedupe {
    host: Rc<dyn Host>,
    prefix: String,
    routes: Vec<Option<RouteDedupe>>,
}

/// How a request starts out with deduplication.
pub enum Start {
    /// No dedupe on the route, or no Idempotency-Key: not involved.
    NotInvolved,
    /// Takes part: hold it until its body is complete, then decide.
    Track(Box<DedupeStream>),
    /// Already answered locally (an invalid key got 400).
    Answered,
}

/// One request's progress through deduplication.
pub struct DedupeStream {
    route: usize,
    /// The caller's scope and the Idempotency-Key ([`dedupe::scoped_key`]).
    key: String,
    caller: String,
    slot: String,
    method: String,
    path: String,
    /// Set once the slot is claimed: this stream's response gets stored.
    claim: Option<Entry>,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    finished: bool,
}

impl Dedupe {
    pub fn new(host: &Rc<dyn Host>, config: &FilterConfig) -> Result<Option<Self>, String> {
        if config.routes().iter().all(|r| r.dedupe.is_none()) {
            return Ok(None);
        }
        let mut routes = Vec::new();
        for r in config.routes() {
            let Some(cfg) = r.dedupe else {
                routes.push(None);
                continue;
            };
            let counter = |what: &str| {
                host.define(MetricType::Counter, &stats::dedupe(config, &r.name, what))
            };
            routes.push(Some(RouteDedupe {
                cfg,
                metrics: Metrics {
                    replayed: counter("replayed")?,
                    in_flight_409: counter("in_flight_409")?,
                    mismatch_422: counter("mismatch_422")?,
                    invalid_key_400: counter("invalid_key_400")?,
                    slot_busy: counter("slot_busy")?,
                    stored: counter("stored")?,
                    unreadable_slot: counter("unreadable_slot")?,
                    evicted_live: counter("evicted_live")?,
                },
            }));
        }
        Ok(Some(Self {
            host: Rc::clone(host),
            prefix: format!("{}/dedupe/", config.stat_prefix()),
            routes,
        }))
    }

    fn route(&self, i: usize) -> Option<&RouteDedupe> {
        self.routes.get(i).and_then(Option::as_ref)
    }

    /// Request headers: whether (and how) the request takes part.
    pub fn on_request_headers(&self, route: usize, headers: &RequestHeaders) -> Start {
        let Some(r) = self.route(route) else {
            return Start::NotInvolved;
        };
        let Some(key) = headers.text(dedupe::HEADER_NAME) else {
            return Start::NotInvolved;
        };
        if let Err(reason) = dedupe::validate_key(&key) {
            self.host.increment(r.metrics.invalid_key_400, 1);
            self.reply_error(400, &format!("invalid Idempotency-Key: {reason}"));
            return Start::Answered;
        }
        let credentials: Vec<(&str, &[u8])> = dedupe::CALLER_HEADERS
            .iter()
            .filter_map(|name| headers.bytes(name).map(|v| (*name, v)))
            .collect();
        let caller = dedupe::caller_scope(&credentials);
        let key = dedupe::scoped_key(&caller, &key);
        Start::Track(Box::new(DedupeStream {
            route,
            slot: dedupe::slot_key(&self.prefix, &key, r.cfg.max_entries),
            key,
            caller,
            method: headers.text(":method").unwrap_or_default(),
            path: headers.text(":path").unwrap_or_default(),
            claim: None,
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
            finished: false,
        }))
    }

    /// The request is complete (`body` is all of it): decide and act.
    pub fn on_request_complete(&self, s: &mut DedupeStream, body: &[u8], now_ms: u64) -> Action {
        let Some(r) = self.route(s.route) else {
            return Action::Continue;
        };
        let fingerprint = dedupe::scoped_fingerprint(&s.caller, &s.method, &s.path, body);
        for _ in 0..CAS_RETRIES {
            let (bytes, cas) = match self.host.shared_get(&s.slot) {
                Ok(v) => v,
                Err(status) => {
                    self.host.log(
                        LogLevel::Warn,
                        &format!("understudy: reading {} failed: {status:?}", s.slot),
                    );
                    return Action::Continue;
                }
            };
            let existing = dedupe::read_slot(bytes.as_deref()).unwrap_or_else(|_| {
                self.host.increment(r.metrics.unreadable_slot, 1);
                None
            });
            match dedupe::decide(existing.as_ref(), &s.key, &fingerprint, now_ms, &r.cfg) {
                Decision::Proceed { claim } => {
                    match self.host.shared_set(&s.slot, &claim.encode(), cas) {
                        Ok(()) => {
                            if dedupe::evicts_live(existing.as_ref(), &s.key, now_ms) {
                                self.host.increment(r.metrics.evicted_live, 1);
                            }
                            s.claim = Some(claim);
                            return Action::Continue;
                        }
                        Err(SharedSetError::CasMismatch) => continue,
                        Err(status) => {
                            self.host.log(
                                LogLevel::Warn,
                                &format!("understudy: claiming {} failed: {status:?}", s.slot),
                            );
                            return Action::Continue;
                        }
                    }
                }
                Decision::Replay {
                    status,
                    mut headers,
                    body,
                } => {
                    self.host.increment(r.metrics.replayed, 1);
                    headers.push((REPLAYED.to_owned(), "true".to_owned()));
                    if !self.host.reply(u32::from(status), &headers, &body) {
                        return Action::Continue;
                    }
                    return Action::Pause;
                }
                Decision::InFlight => {
                    self.host.increment(r.metrics.in_flight_409, 1);
                    self.reply_error(
                        409,
                        "a request with this Idempotency-Key is still being processed; retry later",
                    );
                    return Action::Pause;
                }
                Decision::Mismatch => {
                    self.host.increment(r.metrics.mismatch_422, 1);
                    self.reply_error(
                        422,
                        "this Idempotency-Key was already used with a different request payload",
                    );
                    return Action::Pause;
                }
                Decision::SlotBusy => {
                    self.host.increment(r.metrics.slot_busy, 1);
                    return Action::Continue;
                }
            }
        }
        self.host.increment(r.metrics.slot_busy, 1);
        Action::Continue
    }

    pub fn on_response_headers(&self, s: &mut DedupeStream, end_of_stream: bool, now_ms: u64) {
        if s.claim.is_none() {
            return;
        }
        s.status = self
            .host
            .response_header(":status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        s.headers = self.host.headers(MapType::HttpResponseHeaders);
        if end_of_stream {
            self.finish(s, now_ms);
        }
    }

    /// Copies the response body as it passes (never holding it back).
    pub fn on_response_body(
        &self,
        s: &mut DedupeStream,
        body_size: usize,
        end_of_stream: bool,
        now_ms: u64,
    ) {
        let Some(r) = self.route(s.route) else { return };
        if s.claim.is_none() {
            return;
        }
        // One byte over the budget is enough to know it cannot be stored.
        if s.body.len() <= r.cfg.max_body_bytes {
            s.body
                .extend(self.host.buffer(BufferType::HttpResponseBody, body_size));
        }
        if end_of_stream {
            self.finish(s, now_ms);
        }
    }

    /// Stores the response, or frees the slot, if the slot is still ours.
    fn finish(&self, s: &mut DedupeStream, now_ms: u64) {
        let (Some(r), Some(claim)) = (self.route(s.route), s.claim.as_ref()) else {
            return;
        };
        if s.finished {
            return;
        }
        s.finished = true;
        let done = (s.status != 0)
            .then(|| dedupe::complete(claim, s.status, &s.headers, &s.body, now_ms, &r.cfg))
            .flatten();
        let Ok((bytes, cas)) = self.host.shared_get(&s.slot) else {
            return;
        };
        if dedupe::read_slot(bytes.as_deref()).ok().flatten().as_ref() != Some(claim) {
            return;
        }
        let value = done.as_ref().map(Entry::encode);
        let write =
            self.host
                .shared_set(&s.slot, value.as_deref().unwrap_or(dedupe::FREE_SLOT), cas);
        if write.is_ok() && done.is_some() {
            self.host.increment(r.metrics.stored, 1);
        }
    }

    /// The stream ended: a claim without a stored response frees its slot.
    pub fn on_end(&self, s: &mut DedupeStream, now_ms: u64) {
        if s.claim.is_some() && !s.finished {
            s.status = 0;
            self.finish(s, now_ms);
        }
    }

    fn reply_error(&self, status: u32, message: &str) {
        let body = serde_json::json!({ "error": message }).to_string();
        self.host.reply(
            status,
            &[("content-type".to_owned(), "application/json".to_owned())],
            body.as_bytes(),
        );
    }
}
