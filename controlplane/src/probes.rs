//! The probe runner: sends each running rollout's probe checks through
//! Envoy (`serve --probe-via`, the data plane's listener) to stable and to
//! canary separately, pinned by the service's probe header
//! ([`crate::model::PROBE_HEADER`], a value derived from the store's private
//! key), and records what came back in a bounded book.
//!
//! It implements the [`Prober`] port: the engine alone tells it what to run
//! (a rollout started, resumed, paused, ended) and reads the results. Rate
//! and concurrency come from the pure [`due`] schedule: one send per check
//! per `every_s`, never while the previous one is in flight. A plan removed
//! (paused, ended) sends nothing more from the moment `set_plan` returns,
//! and answers still in flight for it are dropped, not recorded.
//!
//! Every answer is read as bytes, at most
//! [`MAX_RESPONSE_BYTES`](crate::evidence::probes::MAX_RESPONSE_BYTES), within
//! [`PROBE_TIMEOUT`]; error texts are bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::evidence::probes::{
    MAX_RESPONSE_BYTES, ProbeBook, ProbeCheck, ProbeResult, ProbeTally, Prober, Schedule, Side,
    bounded_detail, due,
};
use crate::model::PROBE_HEADER;
use crate::outbound::{ReadError, error_chain, read_capped};
use crate::store::Store;

/// How long one probe may take, connection included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the scheduler looks for due checks.
pub const TICK: Duration = Duration::from_millis(50);

/// A service's running checks, each with its schedule.
struct Plan {
    /// Distinguishes this plan from an earlier one of the same service, so
    /// answers to a stopped plan's probes are dropped.
    generation: u64,
    checks: Vec<(ProbeCheck, Schedule)>,
}

#[derive(Default)]
struct State {
    plans: BTreeMap<String, Plan>,
    book: ProbeBook,
    generations: u64,
}

struct Inner {
    via: SocketAddr,
    store: Store,
    client: reqwest::Client,
    state: Mutex<State>,
    ticks: AtomicU64,
}

/// The runner; clones share it.
#[derive(Clone)]
pub struct ProbeRunner {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProbeRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeRunner")
            .field("via", &self.inner.via)
            .finish_non_exhaustive()
    }
}

impl ProbeRunner {
    /// A runner that sends through the Envoy listener at `via`, reading the
    /// services' domains and probe pins from `store`. Start it with
    /// [`ProbeRunner::run`].
    pub fn new(via: SocketAddr, store: Store) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .connect_timeout(PROBE_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                via,
                store,
                client,
                state: Mutex::default(),
                ticks: AtomicU64::new(0),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends due checks until the process ends.
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.tick(crate::time::now_unix_ms());
        }
    }

    /// Starts every check due at `now_ms`.
    fn tick(&self, now_ms: u64) {
        let mut started = Vec::new();
        {
            let mut state = self.lock();
            for (service, plan) in &mut state.plans {
                for (check, schedule) in &mut plan.checks {
                    let every_ms = (check.every_s * 1000.0) as u64;
                    if due(now_ms, every_ms, *schedule) {
                        *schedule = Schedule {
                            last_sent_ms: Some(now_ms),
                            in_flight: true,
                        };
                        started.push((service.clone(), plan.generation, check.clone()));
                    }
                }
            }
        }
        // Counted after the look, so a test that sees the count move knows
        // a whole look happened in between.
        self.inner.ticks.fetch_add(1, Ordering::Relaxed);
        for (service, generation, check) in started {
            let runner = self.clone();
            tokio::spawn(async move {
                let (stable, canary) = tokio::join!(
                    runner.send(&service, &check, Side::Stable, now_ms),
                    runner.send(&service, &check, Side::Canary, now_ms),
                );
                let mut state = runner.lock();
                let current = state
                    .plans
                    .get_mut(&service)
                    .filter(|p| p.generation == generation);
                let Some(plan) = current else {
                    return;
                };
                if let Some((_, s)) = plan.checks.iter_mut().find(|(c, _)| c.name == check.name) {
                    s.in_flight = false;
                }
                state.book.record(&service, stable);
                state.book.record(&service, canary);
            });
        }
    }

    /// One probe of `check` to `side`, and its outcome.
    async fn send(
        &self,
        service: &str,
        check: &ProbeCheck,
        side: Side,
        now_ms: u64,
    ) -> ProbeResult {
        let started = Instant::now();
        let outcome = self.exchange(service, check, side).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (passed, status, detail) = match outcome {
            Ok((status, body)) => match check.expect.judge(status, &body) {
                Ok(()) => (true, Some(status), String::new()),
                Err(why) => (false, Some(status), why),
            },
            Err(why) => (false, None, why),
        };
        ProbeResult {
            time_ms: now_ms,
            check: check.name.clone(),
            side,
            passed,
            status,
            latency_ms,
            detail: bounded_detail(&detail),
        }
    }

    async fn exchange(
        &self,
        service: &str,
        check: &ProbeCheck,
        side: Side,
    ) -> Result<(u16, Vec<u8>), String> {
        let host = {
            let state = self.inner.store.current();
            let svc = state
                .services
                .get(service)
                .ok_or_else(|| format!("no service {service:?} in the desired state"))?;
            probe_host(svc.domains.first().map_or("*", String::as_str))
        };
        let method = reqwest::Method::from_bytes(check.method.as_bytes())
            .map_err(|e| format!("method {:?}: {e}", check.method))?;
        let mut request = self
            .inner
            .client
            .request(method, format!("http://{}{}", self.inner.via, check.path))
            .header(reqwest::header::HOST, host)
            .header(
                PROBE_HEADER,
                self.inner.store.probe_pin(service, side.name()),
            );
        for (k, v) in &check.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Some(body) = &check.body {
            request = request.body(body.clone());
        }
        let mut response = request.send().await.map_err(|e| error_chain(&e))?;
        let status = response.status().as_u16();
        let body = read_capped(&mut response, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::Cut(e) => error_chain(&e),
                ReadError::TooLarge => {
                    format!("got status {status}, a body larger than {MAX_RESPONSE_BYTES} bytes")
                }
            })?;
        Ok((status, body))
    }
}

/// The `Host` a probe of a service with first domain `domain` sends: the
/// domain itself, or with its wildcard filled in (`*` → `probe`,
/// `*.example.com` → `probe.example.com`).
fn probe_host(domain: &str) -> String {
    domain.replacen('*', "probe", 1)
}

impl Prober for ProbeRunner {
    fn set_plan(&self, service: &str, checks: Option<Vec<ProbeCheck>>) {
        let mut state = self.lock();
        let Some(checks) = checks else {
            state.plans.remove(service);
            return;
        };
        // The same checks keep their schedule (the engine says what runs
        // after every decision, not only when it changes).
        if let Some(plan) = state.plans.get(service)
            && plan.checks.len() == checks.len()
            && plan.checks.iter().zip(&checks).all(|((a, _), b)| a == b)
        {
            return;
        }
        state.generations = state.generations.wrapping_add(1);
        let generation = state.generations;
        state.plans.insert(
            service.to_owned(),
            Plan {
                generation,
                checks: checks
                    .into_iter()
                    .map(|c| (c, Schedule::default()))
                    .collect(),
            },
        );
    }

    fn tally(&self, service: &str, since_ms: u64) -> ProbeTally {
        self.lock().book.tally(service, since_ms)
    }

    fn ticks(&self) -> u64 {
        self.inner.ticks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_fills_a_wildcard_in() {
        assert_eq!(probe_host("*"), "probe");
        assert_eq!(probe_host("*.example.com"), "probe.example.com");
        assert_eq!(probe_host("shop.example.com"), "shop.example.com");
    }
}
