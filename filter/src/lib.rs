//! `understudy-filter`: the Envoy HTTP filter, compiled to `wasm32-wasip1`.
//!
//! This crate is thin glue. It reads Envoy's host events through
//! `proxy_wasm::hostcalls`, hands them to [`understudy_core`] (where every
//! decision is made and tested natively), and carries out the result.
//! Start at [`Root::on_configure`] (config in, metrics defined) and
//! [`Http::on_http_request_headers`] (the per-request hot path).
//!
//! A panic kills the wasm VM and, depending on `failure_policy`, the traffic
//! through it, so this crate never unwraps: every host call's `Status` is
//! handled, and a panic hook logs through the host if something slips through.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// proxy_wasm::main! exports the `_initialize` entry point with #[no_mangle].
#![allow(unsafe_code)]

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use understudy_core::{FilterConfig, stats};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        log(LogLevel::Critical, &format!("understudy: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Logs through the host. A failed log call has nowhere better to be reported.
fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// State shared by the root context and every HTTP context of one VM (one per
/// worker thread): the validated config and the ids of the metrics it defined.
struct Configured {
    config: FilterConfig,
    requests_total: u32,
    /// Indexed like `config.routes()`.
    route_requests: Vec<u32>,
}

impl Configured {
    fn new(config: FilterConfig) -> Result<Self, String> {
        let define = |name: String| {
            hostcalls::define_metric(MetricType::Counter, &name)
                .map_err(|status| format!("defining metric {name:?} failed: {status:?}"))
        };
        let requests_total = define(stats::requests_total(&config))?;
        let route_requests = config
            .routes()
            .iter()
            .map(|r| define(stats::route_requests_total(&config, &r.name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            requests_total,
            route_requests,
        })
    }

    fn count_request(&self, path: Option<&str>) {
        increment(self.requests_total);
        let route = path.and_then(|p| self.config.match_route(p));
        if let Some(id) = route.and_then(|i| self.route_requests.get(i)) {
            increment(*id);
        }
    }
}

fn increment(metric: u32) {
    if let Err(status) = hostcalls::increment_metric(metric, 1) {
        log(
            LogLevel::Warn,
            &format!("understudy: incrementing metric {metric} failed: {status:?}"),
        );
    }
}

/// The root context: one per plugin configuration per VM.
#[derive(Default)]
pub struct Root {
    configured: Option<Rc<Configured>>,
}

impl Context for Root {}

impl RootContext for Root {
    /// Parses and validates the plugin configuration. Returning `false` makes
    /// Envoy reject the configuration (a static listener fails to load; an
    /// ECDS update is NACKed and the previous filter config stays in force).
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        ) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log(
                    LogLevel::Error,
                    &format!("understudy: reading the plugin configuration failed: {status:?}"),
                );
                return false;
            }
        };
        let config = match FilterConfig::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log(
                    LogLevel::Error,
                    &format!("understudy: rejecting configuration: {err}"),
                );
                return false;
            }
        };
        match Configured::new(config) {
            Ok(configured) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "understudy: configured with {} route(s)",
                        configured.config.routes().len()
                    ),
                );
                self.configured = Some(Rc::new(configured));
                true
            }
            Err(reason) => {
                log(
                    LogLevel::Error,
                    &format!("understudy: rejecting configuration: {reason}"),
                );
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Must never return None: the SDK panics on it.
        Some(Box::new(Http {
            configured: self.configured.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
pub struct Http {
    configured: Option<Rc<Configured>>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(configured) = &self.configured {
            let path = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path")
                .ok()
                .flatten();
            configured.count_request(path.as_deref());
        }
        Action::Continue
    }
}
