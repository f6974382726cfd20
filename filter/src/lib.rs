//! `understudy-filter`: the Envoy HTTP filter, compiled to `wasm32-wasip1`.
//!
//! This crate is thin glue. It reads Envoy's host events through the
//! [`host::Host`] trait, hands them to [`understudy_core`] (where every
//! decision is made and tested natively), and carries out the result. Start
//! at [`Root::on_configure`] (config in, metrics defined) and
//! [`Http::on_http_request_headers`] (the per-request hot path).
//!
//! # Layout
//! - [`host`]: the [`host::Host`] trait the glue calls (every `Status`
//!   handled), and `AbiHost`, its implementation over the ABI (wasm only).
//!   Unit tests drive [`Root`] and [`Http`] natively against a fake host.
//! - [`hedging`]: hedged requests (per-worker table, `on_tick`, hedge replies).
//! - [`dedupe`]: inbound duplicate suppression by Idempotency-Key (shared data).
//! - [`ratelimit`]: adaptive per-tenant rate limits (shared data with CAS).
//! - [`shadow`]: shadow copies, response capture and comparison reports.
//!
//! One VM runs per Envoy worker thread; its root context and HTTP contexts
//! share a [`Worker`] through `Rc<RefCell<..>>`. Every borrow is a
//! `try_borrow_mut` released before any host call that can re-enter the
//! filter (a local reply runs the stream's response callbacks).
//!
//! A panic kills the wasm VM, so this crate never unwraps, and a panic hook
//! logs through the host if something slips through.
//!
//! Time is an input: the glue reads it from the host (`Host::now_us`) where
//! a feature needs it and passes it down as a value.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(target_arch = "wasm32")]
mod abi;
pub mod dedupe;
#[cfg(test)]
mod fake;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod hedging;
pub mod host;
pub mod ratelimit;
pub mod shadow;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MetricType};
use understudy_core::{FilterConfig, stats};

use crate::dedupe::{Dedupe, DedupeStream, Start};
use crate::hedging::Hedging;
use crate::host::Host;
use crate::ratelimit::{Admitted, Decision, Limiter};
use crate::shadow::Shadowing;
use understudy_core::ratelimit::Rejection;

/// The VM's entry point (wasm only: natively there is no host to enter from).
#[cfg(target_arch = "wasm32")]
mod entry {
    // proxy_wasm::main! exports the `_initialize` entry point with
    // #[no_mangle], which the unsafe_code lint counts as unsafe.
    #![allow(unsafe_code)]

    use proxy_wasm::traits::RootContext;
    use proxy_wasm::types::LogLevel;

    use super::Root;
    use crate::host::{AbiHost, Host};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        std::panic::set_hook(Box::new(|info| {
            AbiHost.log(LogLevel::Critical, &format!("understudy: panic: {info}"));
        }));
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(Root::new(std::rc::Rc::new(AbiHost)))
        });
    }}
}

/// Everything one VM (worker) knows: the config, its metrics, and the
/// per-feature state.
pub struct Worker {
    config: FilterConfig,
    requests_total: u32,
    /// Client-sent `x-understudy-*` headers removed at ingress.
    internal_headers_stripped: u32,
    /// Indexed like `config.routes()`.
    route_requests: Vec<u32>,
    hedging: Option<Hedging>,
    dedupe: Option<Dedupe>,
    limiter: Option<Limiter>,
    shadowing: Option<Shadowing>,
}

type Shared = Rc<RefCell<Worker>>;

pub use understudy_core::http::INTERNAL_HEADER_PREFIX;

impl Worker {
    fn new(host: &Rc<dyn Host>, config: FilterConfig) -> Result<Self, String> {
        let requests_total = host.define(MetricType::Counter, &stats::requests_total(&config))?;
        let internal_headers_stripped = host.define(
            MetricType::Counter,
            &stats::internal_headers_stripped(&config),
        )?;
        let route_requests = config
            .routes()
            .iter()
            .map(|r| {
                host.define(
                    MetricType::Counter,
                    &stats::route_requests_total(&config, &r.name),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let hedging = Hedging::new(host, &config)?;
        let dedupe = Dedupe::new(host, &config)?;
        let limiter = Limiter::new(host, &config)?;
        let shadowing = Shadowing::new(host, &config)?;
        Ok(Self {
            limiter,
            shadowing,
            config,
            requests_total,
            internal_headers_stripped,
            route_requests,
            hedging,
            dedupe,
        })
    }
}

/// The root context: one per plugin configuration per VM.
pub struct Root {
    host: Rc<dyn Host>,
    worker: Option<Shared>,
}

impl Root {
    pub fn new(host: Rc<dyn Host>) -> Self {
        Self { host, worker: None }
    }

    /// The context of a new HTTP stream.
    pub fn stream(&self, context_id: u32) -> Http {
        Http {
            id: context_id,
            host: Rc::clone(&self.host),
            worker: self.worker.clone(),
            hedged: false,
            shadowed: false,
            dedupe: None,
            admitted: None,
        }
    }
}

impl Context for Root {
    /// A hedge's or a shadow copy's answer (calls made from `on_tick`
    /// come back here).
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(worker) = &self.worker else { return };
        let now = self.host.now_us();
        let deferred = match worker.try_borrow_mut() {
            Ok(mut w) => match w.shadowing.as_mut() {
                Some(s) if s.owns_call(token_id) => {
                    s.on_call_response(token_id, body_size, now);
                    None
                }
                _ => w
                    .hedging
                    .as_mut()
                    .and_then(|h| h.on_call_response(token_id, body_size, now)),
            },
            Err(_) => None,
        };
        // The borrow is released: the local reply may re-enter the stream.
        if let Some(d) = deferred {
            d.run(self.host.as_ref());
        }
    }

    /// A report call ended (`status_code` is its gRPC status).
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, _response_size: usize) {
        self.grpc_response(token_id, status_code);
    }
}

impl Root {
    fn grpc_response(&mut self, token_id: u32, status_code: u32) {
        let Some(worker) = &self.worker else { return };
        if let Ok(mut w) = worker.try_borrow_mut()
            && let Some(s) = w.shadowing.as_mut()
            && s.owns_report(token_id)
        {
            s.on_report_response(token_id, status_code);
        }
    }
}

impl RootContext for Root {
    /// Parses and validates the plugin configuration. Returning `false` makes
    /// Envoy reject the configuration (a static listener fails to load; an
    /// ECDS update is NACKed and the previous filter config stays in force).
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let host = &self.host;
        let bytes = match host.plugin_configuration(plugin_configuration_size) {
            Ok(bytes) => bytes,
            Err(status) => {
                host.log(
                    LogLevel::Error,
                    &format!("understudy: reading the plugin configuration failed: {status:?}"),
                );
                return false;
            }
        };
        #[cfg(feature = "fault-injection")]
        if fault::rejects(&bytes) {
            host.log(
                LogLevel::Error,
                "understudy: fault injection: rejecting configuration",
            );
            return false;
        }
        let worker = FilterConfig::from_json(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|config| Worker::new(host, config));
        match worker {
            Ok(worker) => {
                host.log(
                    LogLevel::Info,
                    &format!(
                        "understudy: configured with {} route(s)",
                        worker.config.routes().len()
                    ),
                );
                let ticks = [
                    worker.hedging.as_ref().map(Hedging::tick_period),
                    worker.limiter.as_ref().and_then(Limiter::report_interval),
                    worker.shadowing.as_ref().map(Shadowing::tick_period),
                ];
                if let Some(period) = ticks.into_iter().flatten().min() {
                    host.set_tick_period(period);
                }
                self.worker = Some(Rc::new(RefCell::new(worker)));
                true
            }
            Err(reason) => {
                host.log(
                    LogLevel::Error,
                    &format!("understudy: rejecting configuration: {reason}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(worker) = &self.worker else { return };
        if let Ok(mut w) = worker.try_borrow_mut() {
            let now = self.host.now_us();
            if let Some(h) = w.hedging.as_mut() {
                h.on_tick(now);
            }
            if let Some(l) = w.limiter.as_mut() {
                l.report_if_due(now);
            }
            if let Some(s) = w.shadowing.as_mut() {
                s.on_tick(now);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Must never return None: the SDK panics on it.
        Some(Box::new(self.stream(context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
pub struct Http {
    id: u32,
    host: Rc<dyn Host>,
    worker: Option<Shared>,
    /// Tracked by the hedging table.
    hedged: bool,
    /// Paired with a shadow copy.
    shadowed: bool,
    /// Taking part in duplicate suppression.
    dedupe: Option<Box<DedupeStream>>,
    /// Admitted by the rate limiter: its answer adapts the tenant's limit.
    admitted: Option<Box<Admitted>>,
}

impl Http {
    /// Runs `f` on the worker state if it is configured and not borrowed.
    fn with<T>(&self, default: T, f: impl FnOnce(&mut Worker) -> T) -> T {
        match self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            Some(Ok(mut w)) => f(&mut w),
            _ => default,
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let host = Rc::clone(&self.host);
        #[cfg(feature = "fault-injection")]
        fault::on_request_headers(&*host);
        // Before anything else: a client must not speak for the filter. The
        // filter's own hedges and shadow copies leave through
        // `dispatch_http_call` straight to their cluster, never through this
        // listener, so any `x-understudy-*` header seen here came from a
        // client (e.g. a forged `x-understudy-shadow: 1` that would make the
        // primary treat a real request as a side-effect-free copy).
        //
        // The request's headers are read here once, and every feature looks
        // its own up in this snapshot rather than asking the host again.
        if self.worker.is_none() {
            return Action::Continue;
        }
        let (headers, stripped) = host.strip_internal_headers(INTERNAL_HEADER_PREFIX);
        // The clock is read once too: every feature decides at this instant.
        let now_us = std::cell::OnceCell::new();
        let now = || *now_us.get_or_init(|| host.now_us());
        // Rate limits first: a rejected request does no other work.
        // The route is matched once per request; every feature uses it.
        let (verdict, route) = self.with((None, None), |w| {
            if stripped > 0 {
                host.increment(w.internal_headers_stripped, stripped as i64);
            }
            host.increment(w.requests_total, 1);
            let route = headers
                .bytes(":path")
                .and_then(|p| w.config.match_route(&String::from_utf8_lossy(p)));
            let verdict = w
                .limiter
                .as_mut()
                .map(|l| l.on_request(route, &headers, now()));
            (verdict, route)
        });
        match verdict {
            Some(Decision::Reject(Rejection { headers, body })) => {
                host.reply(429, &headers, body.as_bytes());
                return Action::Pause;
            }
            Some(Decision::Allow(admitted)) => self.admitted = Some(admitted),
            None => {}
        }
        let id = self.id;
        let Some(route) = route else {
            return Action::Continue;
        };
        let (hedged, shadowed, dedupe) = self.with((false, false, Start::NotInvolved), |w| {
            if let Some(metric) = w.route_requests.get(route) {
                host.increment(*metric, 1);
            }
            // Dedupe first: it may answer locally, and then there is nothing to hedge.
            let dedupe = w.dedupe.as_ref().map_or(Start::NotInvolved, |d| {
                d.on_request_headers(route, &headers)
            });
            // Shadow before hedging: the copy carries the client's headers,
            // not the key hedging may add.
            let shadowed = !matches!(dedupe, Start::Answered)
                && w.shadowing.as_mut().is_some_and(|s| {
                    s.on_request_headers(id, route, &headers, end_of_stream, now())
                });
            let hedged = !matches!(dedupe, Start::Answered)
                && w.hedging.as_mut().is_some_and(|h| {
                    h.on_request_headers(id, route, &headers, end_of_stream, now())
                });
            (hedged, shadowed, dedupe)
        });
        self.hedged = hedged;
        self.shadowed = shadowed;
        match dedupe {
            Start::Answered => Action::Pause,
            Start::Track(stream) => {
                self.dedupe = Some(stream);
                if end_of_stream {
                    self.dedupe_decide(&[])
                } else {
                    Action::Pause
                }
            }
            Start::NotInvolved => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let host = Rc::clone(&self.host);
        if self.dedupe.is_some() {
            // Held (and buffered by Envoy) until complete: the fingerprint needs all of it.
            if !end_of_stream {
                return Action::Pause;
            }
            let body = host.buffer(BufferType::HttpRequestBody, body_size);
            let action = self.dedupe_decide(&body);
            if action == Action::Continue {
                self.copy_request_body(&body, true);
            }
            return action;
        }
        if self.hedged || self.shadowed {
            let chunk = host.buffer(BufferType::HttpRequestBody, body_size);
            self.copy_request_body(&chunk, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let host = Rc::clone(&self.host);
        if let Some(admitted) = self.admitted.take() {
            let status = host
                .response_header(":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            self.with((), |w| {
                if let Some(l) = w.limiter.as_mut() {
                    l.on_response(&admitted, status, host.now_us());
                }
            });
            for (k, v) in admitted.headers.iter().flatten() {
                host.add_response_header(k, v);
            }
        }
        let id = self.id;
        let hedged = self.hedged;
        let shadowed = self.shadowed;
        let mut dedupe = self.dedupe.take();
        let action = self.with(Action::Continue, |w| {
            if let (Some(d), Some(s)) = (w.dedupe.as_ref(), dedupe.as_mut()) {
                d.on_response_headers(s, end_of_stream, host.now_us() / 1000);
            }
            if shadowed && let Some(s) = w.shadowing.as_mut() {
                s.on_response_headers(id, end_of_stream, host.now_us());
            }
            match w.hedging.as_mut() {
                Some(h) if hedged => h.on_response_headers(id, host.now_us()),
                _ => Action::Continue,
            }
        });
        self.dedupe = dedupe;
        action
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let host = Rc::clone(&self.host);
        let id = self.id;
        // A held primary (failed while a hedge is out) keeps its body back too.
        if self.hedged && self.with(false, |w| w.hedging.as_ref().is_some_and(|h| h.is_held(id))) {
            return Action::Pause;
        }
        let mut dedupe = self.dedupe.take();
        if let Some(s) = dedupe.as_mut() {
            self.with((), |w| {
                if let Some(d) = w.dedupe.as_ref() {
                    d.on_response_body(s, body_size, end_of_stream, host.now_us() / 1000);
                }
            });
        }
        self.dedupe = dedupe;
        if self.shadowed {
            self.with((), |w| {
                if let Some(s) = w.shadowing.as_mut() {
                    s.on_response_body(id, body_size, end_of_stream, host.now_us());
                }
            });
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let host = Rc::clone(&self.host);
        let id = self.id;
        let hedged = self.hedged;
        let shadowed = self.shadowed;
        let mut dedupe = self.dedupe.take();
        self.with((), |w| {
            if let (Some(d), Some(s)) = (w.dedupe.as_ref(), dedupe.as_mut()) {
                d.on_end(s, host.now_us() / 1000);
            }
            if shadowed && let Some(s) = w.shadowing.as_mut() {
                s.on_end(id);
            }
            if hedged && let Some(h) = w.hedging.as_mut() {
                h.on_end(id);
            }
        });
    }
}

impl Http {
    /// Hands a request body chunk to the features that copy it.
    fn copy_request_body(&mut self, chunk: &[u8], end_of_stream: bool) {
        let (id, hedged, shadowed) = (self.id, self.hedged, self.shadowed);
        self.with((), |w| {
            if hedged && let Some(h) = w.hedging.as_mut() {
                h.on_request_body(id, chunk, end_of_stream);
            }
            if shadowed && let Some(s) = w.shadowing.as_mut() {
                s.on_request_body(id, chunk, end_of_stream);
            }
        });
    }

    /// The request is complete: let dedupe decide. A local answer (replay,
    /// 409, 422) ends the stream here, so hedging stops tracking it first.
    fn dedupe_decide(&mut self, body: &[u8]) -> Action {
        let host = Rc::clone(&self.host);
        let Some(mut stream) = self.dedupe.take() else {
            return Action::Continue;
        };
        let id = self.id;
        let hedged = self.hedged;
        // Decided while holding the worker state; a local reply made inside
        // re-enters only callbacks that skip when the state is borrowed.
        let action = self.with(Action::Continue, |w| {
            let Some(d) = w.dedupe.as_ref() else {
                return Action::Continue;
            };
            let action = d.on_request_complete(&mut stream, body, host.now_us() / 1000);
            if action == Action::Pause
                && hedged
                && let Some(h) = w.hedging.as_mut()
            {
                h.on_end(id);
            }
            action
        });
        if action == Action::Pause {
            self.hedged = false;
        }
        self.dedupe = Some(stream);
        action
    }
}
