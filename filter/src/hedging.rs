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

use understudy_core::hedge::{
    self, Budget, DelayConfig, DelayTracker, HedgeAction, HedgeConfig, HedgeTable, NotHedged,
    PrimaryAction, RequestCopy, RequestInfo,
};
use understudy_core::{FilterConfig, stats};

use crate::host;

struct Metrics {
    sent: u32,
    hedge_wins: u32,
    primary_wins: u32,
    budget_exhausted: u32,
    delay_ms: u32,
    not_hedged: Vec<(NotHedged, u32)>,
}

struct RouteHedge {
    cfg: HedgeConfig,
    delay: DelayTracker,
    budget: Budget,
    metrics: Metrics,
    last_delay_ms: Option<u64>,
}

/// One worker's hedging state: per-route settings and the stream table.
pub struct Hedging {
    routes: Vec<Option<RouteHedge>>,
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
    pub fn run(self) {
        match self {
            Deferred::Reply {
                stream,
                status,
                headers,
                body,
            } => {
                host::reply_on(stream, status, &headers, &body);
            }
            Deferred::Resume { stream } => host::resume_response_on(stream),
        }
    }
}

impl Hedging {
    /// `None` when no route hedges.
    pub fn new(config: &FilterConfig) -> Result<Option<Self>, String> {
        if config.routes().iter().all(|r| r.hedge.is_none()) {
            return Ok(None);
        }
        let mut routes = Vec::with_capacity(config.routes().len());
        for r in config.routes() {
            let Some(cfg) = r.hedge.clone() else {
                routes.push(None);
                continue;
            };
            let name = |what: &str| stats::hedge(config, &r.name, what);
            let counter = |what: &str| host::define(MetricType::Counter, &name(what));
            let metrics = Metrics {
                sent: counter("sent")?,
                hedge_wins: counter("hedge_wins")?,
                primary_wins: counter("primary_wins")?,
                budget_exhausted: counter("budget_exhausted")?,
                delay_ms: host::define(MetricType::Gauge, &name("delay_ms"))?,
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
            routes.push(Some(RouteHedge {
                delay: DelayTracker::new(cfg.delay.clone()),
                budget: Budget::new(cfg.budget),
                cfg,
                metrics,
                last_delay_ms: None,
            }));
        }
        Ok(Some(Self {
            routes,
            table: HedgeTable::default(),
            pending: host::define(MetricType::Gauge, &stats::hedge_pending(config))?,
            keys_generated: 0,
        }))
    }

    /// How often `on_tick` should run: fine enough for the smallest delay.
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
        Duration::from_millis((smallest_ms / 4).clamp(1, 10))
    }

    fn not_hedged(&self, route: usize, reason: NotHedged) {
        if let Some(Some(r)) = self.routes.get(route)
            && let Some((_, id)) = r.metrics.not_hedged.iter().find(|(n, _)| *n == reason)
        {
            host::increment(*id, 1);
        }
    }

    /// Request headers of a stream on `route`. Returns whether it is tracked.
    pub fn on_request_headers(
        &mut self,
        stream: u32,
        route: usize,
        end_of_stream: bool,
        now_us: u64,
    ) -> bool {
        let Some(Some(r)) = self.routes.get_mut(route) else {
            return false;
        };
        r.budget.on_request(now_us);
        let method = host::request_header(":method").unwrap_or_default();
        let key = host::request_header(hedge::IDEMPOTENCY_KEY);
        let upgrade = host::request_header("upgrade").is_some();
        let content_type = host::request_header("content-type");
        let accept = host::request_header("accept");
        let content_length = host::request_header("content-length").and_then(|v| v.parse().ok());
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
        if key.is_none() {
            // Both attempts must carry the same key, so the primary gets it too.
            self.keys_generated += 1;
            let key =
                hedge::generate_key(host::random_u64(self.keys_generated), self.keys_generated);
            host::set_request_header(hedge::IDEMPOTENCY_KEY, &key);
        }
        let copy = RequestCopy {
            headers: host::headers(MapType::HttpRequestHeaders),
            body: Vec::new(),
            body_complete: end_of_stream,
        };
        match self.table.track(stream, route, now_us, copy) {
            Ok(()) => {
                host::increment(self.pending, 1);
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
            host::increment(self.pending, -1);
            self.not_hedged(route, reason);
        }
    }

    pub fn on_response_headers(&mut self, stream: u32, now_us: u64) -> Action {
        let Some(route) = self.table.route_of(stream) else {
            return Action::Continue;
        };
        let Some(Some(r)) = self.routes.get_mut(route) else {
            return Action::Continue;
        };
        let status: u16 = host::response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        match self
            .table
            .on_primary_headers(stream, r.cfg.acceptable(status))
        {
            PrimaryAction::Hold => Action::Pause,
            PrimaryAction::Continue { primary_won } => {
                if primary_won {
                    host::increment(r.metrics.primary_wins, 1);
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
            host::increment(self.pending, -1);
        }
    }

    /// Sends the hedges that are due.
    pub fn on_tick(&mut self, now_us: u64) {
        let Self { routes, table, .. } = self;
        // Per route: (delay now, attempt limit); u64::MAX for routes that do not hedge.
        let limits: Vec<(u64, u32)> = routes
            .iter_mut()
            .map(|r| match r {
                Some(r) => {
                    let us = r.delay.current_us(now_us);
                    // Every VM shares the gauge, including the main thread's,
                    // which sees no traffic: only a VM with latency samples
                    // (or a fixed delay) reports its delay.
                    let informed =
                        r.delay.samples() > 0 || matches!(r.cfg.delay, DelayConfig::Fixed { .. });
                    if informed && r.last_delay_ms != Some(us / 1000) {
                        host::record(r.metrics.delay_ms, us / 1000);
                        r.last_delay_ms = Some(us / 1000);
                    }
                    (us, r.cfg.max_attempts)
                }
                None => (u64::MAX, 1),
            })
            .collect();
        if table.is_empty() {
            return;
        }
        let due = table.due(
            now_us,
            |route| limits.get(route).map_or(u64::MAX, |l| l.0),
            |route| limits.get(route).map_or(1, |l| l.1),
        );
        for d in due {
            let Some(Some(r)) = routes.get_mut(d.route) else {
                continue;
            };
            if !r.budget.try_spend(now_us) {
                host::increment(r.metrics.budget_exhausted, 1);
                table.give_up(d.stream);
                continue;
            }
            let Some(request) = table.request(d.stream) else {
                continue;
            };
            let mut headers: Vec<(String, String)> = request
                .headers
                .iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("transfer-encoding"))
                .cloned()
                .collect();
            headers.push((hedge::HEDGE_MARKER.to_owned(), "1".to_owned()));
            let body = (!request.body.is_empty()).then_some(request.body.as_slice());
            match host::http_call(
                &r.cfg.cluster,
                &headers,
                body,
                Duration::from_millis(r.cfg.timeout_ms),
            ) {
                Ok(token) => {
                    table.hedge_sent(d.stream, token);
                    host::increment(r.metrics.sent, 1);
                }
                Err(status) => {
                    host::log(
                        LogLevel::Warn,
                        &format!(
                            "understudy: hedge to cluster {:?} failed to start: {status:?}",
                            r.cfg.cluster
                        ),
                    );
                    table.give_up(d.stream);
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
        let headers = host::headers(MapType::HttpCallResponseHeaders);
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
                let Some(Some(r)) = self.routes.get_mut(route) else {
                    return None;
                };
                host::increment(r.metrics.hedge_wins, 1);
                if let Some(started) = self.table.started_us(stream) {
                    // The primary took at least this long: a censored sample.
                    r.delay.record(now_us, now_us.saturating_sub(started));
                }
                let mut reply_headers = understudy_core::dedupe::replayable_headers(&headers);
                reply_headers.push((hedge::HEDGE_MARKER.to_owned(), "won".to_owned()));
                Some(Deferred::Reply {
                    stream,
                    status: u32::from(status.unwrap_or(200)),
                    headers: reply_headers,
                    body: host::buffer(BufferType::HttpCallResponseBody, body_size),
                })
            }
            HedgeAction::ReleasePrimary { stream } => {
                if let Some(Some(r)) = route.and_then(|i| self.routes.get(i)) {
                    host::increment(r.metrics.primary_wins, 1);
                }
                Some(Deferred::Resume { stream })
            }
        }
    }
}
