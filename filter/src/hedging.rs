//! Hedging glue: feeds request/response events and timer ticks into
//! [`understudy_core::hedge`] and carries out its decisions with host calls.
//!
//! The technique (proven on Envoy 1.40): the primary goes upstream at once;
//! the root context's `on_tick` finds streams silent past the hedge delay and
//! sends the hedge with `dispatch_http_call` (same headers, same
//! Idempotency-Key); the hedge's answer comes back to the root context, which
//! answers the stream with a local reply if it is still waiting (Envoy then
//! resets the primary's upstream request).

use std::time::Duration;

use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType};

use std::rc::Rc;

use understudy_core::hedge::{
    self, DelayConfig, HedgeAction, HedgeTable, NotHedged, PrimaryAction, RequestCopy, RequestInfo,
    RouteState, TickAction,
};
use understudy_core::{FilterConfig, stats};

use crate::host::{Host, RequestHeaders};

struct Metrics {
    sent: u32,
    hedge_wins: u32,
    primary_wins: u32,
    budget_exhausted: u32,
    delay_ms: u32,
    not_hedged: Vec<(NotHedged, u32)>,
}

/// The coarsest hedging tick, in milliseconds: a hedge may leave this much
/// after its delay.
const MAX_TICK_MS: u64 = 2;

/// One worker's hedging state: per-route state (the core's delay and
/// budget) and metrics, indexed like the config's routes, and the stream table.
pub struct Hedging {
    host: Rc<dyn Host>,
    routes: Vec<Option<RouteState>>,
    metrics: Vec<Option<Metrics>>,
    table: HedgeTable,
    pending: u32,
    keys_generated: u64,
}

/// Work the root context must do after releasing its borrow of the state
/// (a local reply re-enters the filter's response callbacks).
pub enum Deferred {
    Reply {
        stream: u32,
        status: u32,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Resume {
        stream: u32,
    },
}

impl Deferred {
    pub fn run(self, host: &dyn Host) {
        match self {
            Deferred::Reply {
                stream,
                status,
                headers,
                body,
            } => {
                host.reply_on(stream, status, &headers, &body);
            }
            Deferred::Resume { stream } => host.resume_response_on(stream),
        }
    }
}

impl Hedging {
    /// `None` when no route hedges.
    pub fn new(host: &Rc<dyn Host>, config: &FilterConfig) -> Result<Option<Self>, String> {
        if config.routes().iter().all(|r| r.hedge.is_none()) {
            return Ok(None);
        }
        let mut routes = Vec::with_capacity(config.routes().len());
        let mut all_metrics = Vec::with_capacity(config.routes().len());
        for r in config.routes() {
            let Some(cfg) = r.hedge.clone() else {
                routes.push(None);
                all_metrics.push(None);
                continue;
            };
            let name = |what: &str| stats::hedge(config, &r.name, what);
            let counter = |what: &str| host.define(MetricType::Counter, &name(what));
            let metrics = Metrics {
                sent: counter("sent")?,
                hedge_wins: counter("hedge_wins")?,
                primary_wins: counter("primary_wins")?,
                budget_exhausted: counter("budget_exhausted")?,
                delay_ms: host.define(MetricType::Gauge, &name("delay_ms"))?,
                not_hedged: NotHedged::ALL
                    .iter()
                    .map(|reason| {
                        Ok((
                            *reason,
                            counter(&format!("not_hedged.{}", reason.as_str()))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            };
            routes.push(Some(RouteState::new(cfg)));
            all_metrics.push(Some(metrics));
        }
        Ok(Some(Self {
            host: Rc::clone(host),
            routes,
            metrics: all_metrics,
            table: HedgeTable::default(),
            pending: host.define(MetricType::Gauge, &stats::hedge_pending(config))?,
            keys_generated: 0,
        }))
    }

    /// How often `on_tick` should run: fine enough for the smallest delay,
    /// and never coarser than 2 ms, since a hedge goes out at the first tick
    /// after its delay (a 10 ms tick added 5 ms to a 40 ms delay on average).
    /// An idle tick costs a few microseconds per worker.
    pub fn tick_period(&self) -> Duration {
        let smallest_ms = self
            .routes
            .iter()
            .flatten()
            .map(|r| match r.cfg.delay {
                DelayConfig::Fixed { ms } => ms,
                DelayConfig::Adaptive { min_ms, .. } => min_ms,
            })
            .min()
            .unwrap_or(10);
        Duration::from_millis((smallest_ms / 4).clamp(1, MAX_TICK_MS))
    }

    fn not_hedged(&self, route: usize, reason: NotHedged) {
        if let Some(m) = self.metrics(route)
            && let Some((_, id)) = m.not_hedged.iter().find(|(n, _)| *n == reason)
        {
            self.host.increment(*id, 1);
        }
    }

    /// Request headers of a stream on `route`. Returns whether it is tracked.
    pub fn on_request_headers(
        &mut self,
        stream: u32,
        route: usize,
        headers: &RequestHeaders,
        end_of_stream: bool,
        now_us: u64,
    ) -> bool {
        let Some(Some(r)) = self.routes.get_mut(route) else {
            return false;
        };
        r.budget.on_request(now_us);
        let method = headers.text(":method").unwrap_or_default();
        let key = headers.text(hedge::IDEMPOTENCY_KEY);
        let upgrade = headers.bytes("upgrade").is_some();
        let content_type = headers.text("content-type");
        let accept = headers.text("accept");
        let content_length = headers.text("content-length").and_then(|v| v.parse().ok());
        let info = RequestInfo {
            method: &method,
            idempotency_key: key.as_deref(),
            upgrade,
            content_type: content_type.as_deref(),
            accept: accept.as_deref(),
            content_length,
        };
        if let Err(reason) = hedge::eligibility(&r.cfg, &info) {
            self.not_hedged(route, reason);
            return false;
        }
        let mut copied = headers.all_text();
        if key.is_none() {
            // Both attempts must carry the same key, so the primary gets it too.
            self.keys_generated += 1;
            let key = hedge::generate_key(
                self.host.random_u64(self.keys_generated),
                self.keys_generated,
            );
            self.host.set_request_header(hedge::IDEMPOTENCY_KEY, &key);
            copied.push((hedge::IDEMPOTENCY_KEY.to_owned(), key));
        }
        let copy = RequestCopy {
            headers: copied,
            body: Vec::new(),
            body_complete: end_of_stream,
        };
        match self.table.track(stream, route, now_us, copy) {
            Ok(()) => {
                self.host.increment(self.pending, 1);
                true
            }
            Err(reason) => {
                self.not_hedged(route, reason);
                false
            }
        }
    }

    /// A request body chunk (the whole body, when something held it back).
    pub fn on_request_body(&mut self, stream: u32, chunk: &[u8], end_of_stream: bool) {
        let Some(route) = self.table.route_of(stream) else {
            return;
        };
        let max = match self.routes.get(route) {
            Some(Some(r)) => r.cfg.max_body_bytes,
            _ => return,
        };
        if let Err(reason) = self.table.add_body(stream, chunk, end_of_stream, max) {
            self.host.increment(self.pending, -1);
            self.not_hedged(route, reason);
        }
    }

    pub fn on_response_headers(&mut self, stream: u32, now_us: u64) -> Action {
        let Some(route) = self.table.route_of(stream) else {
            return Action::Continue;
        };
        let status = self.host.response_status();
        let Some(Some(r)) = self.routes.get_mut(route) else {
            return Action::Continue;
        };
        match self
            .table
            .on_primary_headers(stream, r.cfg.acceptable(status))
        {
            PrimaryAction::Hold => Action::Pause,
            PrimaryAction::Continue { primary_won } => {
                if primary_won && let Some(Some(m)) = self.metrics.get(route) {
                    self.host.increment(m.primary_wins, 1);
                }
                if let Some(started) = self.table.started_us(stream) {
                    r.delay.record(now_us, now_us.saturating_sub(started));
                }
                Action::Continue
            }
        }
    }

    /// The primary's response is held waiting for a hedge.
    pub fn is_held(&self, stream: u32) -> bool {
        self.table.is_held(stream)
    }

    pub fn on_end(&mut self, stream: u32) {
        if self.table.is_tracked(stream) {
            self.table.end(stream);
            self.host.increment(self.pending, -1);
        }
    }

    /// Sends the hedges that are due (the core chooses them, within each
    /// route's budget) and shows each route's current delay.
    pub fn on_tick(&mut self, now_us: u64) {
        for action in hedge::tick(&mut self.routes, &mut self.table, now_us) {
            self.carry_out(action);
        }
    }

    fn metrics(&self, route: usize) -> Option<&Metrics> {
        self.metrics.get(route).and_then(Option::as_ref)
    }

    fn carry_out(&mut self, action: TickAction) {
        match action {
            TickAction::ShowDelay { route, ms } => {
                if let Some(m) = self.metrics(route) {
                    self.host.record(m.delay_ms, ms);
                }
            }
            TickAction::BudgetExhausted { route, .. } => {
                if let Some(m) = self.metrics(route) {
                    self.host.increment(m.budget_exhausted, 1);
                }
            }
            TickAction::Send(call) => {
                let sent = self.host.http_call(
                    &call.cluster,
                    &call.headers,
                    call.body.as_deref(),
                    Duration::from_millis(call.timeout_ms),
                );
                match sent {
                    Ok(token) => {
                        self.table.hedge_sent(call.stream, token);
                        if let Some(m) = self.metrics(call.route) {
                            self.host.increment(m.sent, 1);
                        }
                    }
                    Err(status) => {
                        self.host.log(
                            LogLevel::Warn,
                            &format!(
                                "understudy: hedge to cluster {:?} failed to start: {status:?}",
                                call.cluster
                            ),
                        );
                        self.table.give_up(call.stream);
                    }
                }
            }
        }
    }

    /// A hedge call answered (or failed: zero headers). Returns what the root
    /// must do once it has released the state.
    pub fn on_call_response(
        &mut self,
        token: u32,
        body_size: usize,
        now_us: u64,
    ) -> Option<Deferred> {
        let route = self.table.route_of_call(token);
        let headers = self.host.headers(MapType::HttpCallResponseHeaders);
        let status: Option<u16> = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse().ok());
        let acceptable = match (route.and_then(|i| self.routes.get(i)), status) {
            (Some(Some(r)), Some(s)) => r.cfg.acceptable(s),
            _ => false,
        };
        match self.table.on_hedge_response(token, status, acceptable) {
            HedgeAction::Discard | HedgeAction::KeepWaiting => None,
            HedgeAction::Reply { stream, route } => {
                if let Some(m) = self.metrics(route) {
                    self.host.increment(m.hedge_wins, 1);
                }
                let Some(Some(r)) = self.routes.get_mut(route) else {
                    return None;
                };
                if let Some(started) = self.table.started_us(stream) {
                    // The primary took at least this long: a censored sample.
                    r.delay.record(now_us, now_us.saturating_sub(started));
                }
                let (status, headers) = hedge::reply_from_hedge(&headers, status);
                Some(Deferred::Reply {
                    stream,
                    status,
                    headers,
                    body: self
                        .host
                        .buffer(BufferType::HttpCallResponseBody, body_size),
                })
            }
            HedgeAction::ReleasePrimary { stream } => {
                if let Some(m) = route.and_then(|i| self.metrics(i)) {
                    self.host.increment(m.primary_wins, 1);
                }
                Some(Deferred::Resume { stream })
            }
        }
    }
}
