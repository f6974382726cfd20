//! Client traffic through Envoy, tallied by the upstream version that answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::upstream::VERSION_HEADER;

/// What a batch of requests got back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub total: u64,
    /// Answers by `x-upstream-version` (absent: `"none"`).
    pub by_version: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer at all (connection refused, reset...).
    pub transport_errors: u64,
    /// Client-side latencies, in the order the answers arrived.
    pub latencies: Vec<Duration>,
}

impl Tally {
    /// Requests that did not end in a 2xx answer.
    pub fn failures(&self) -> u64 {
        self.transport_errors
            + self
                .by_status
                .iter()
                .filter(|(s, _)| !(200..300).contains(*s))
                .map(|(_, n)| n)
                .sum::<u64>()
    }

    pub fn version(&self, v: &str) -> u64 {
        self.by_version.get(v).copied().unwrap_or(0)
    }

    fn record(&mut self, outcome: Result<(u16, Option<String>), ()>, latency: Duration) {
        self.total += 1;
        self.latencies.push(latency);
        match outcome {
            Ok((status, version)) => {
                *self.by_status.entry(status).or_default() += 1;
                *self
                    .by_version
                    .entry(version.unwrap_or_else(|| "none".into()))
                    .or_default() += 1;
            }
            Err(()) => self.transport_errors += 1,
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

async fn one(http: &reqwest::Client, url: &str) -> Result<(u16, Option<String>), ()> {
    match http.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let version = r
                .headers()
                .get(VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // Read the body so the request is complete before it is counted.
            match r.bytes().await {
                Ok(_) => Ok((status, version)),
                Err(_) => Err(()),
            }
        }
        Err(_) => Err(()),
    }
}

/// Sends `n` GETs to `url`, `concurrency` at a time.
pub async fn send(url: &str, n: usize, concurrency: usize) -> Tally {
    let http = client();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, tally, next) = (http.clone(), url.to_owned(), tally.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let start = Instant::now();
                let outcome = one(&http, &url).await;
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                t.record(outcome, start.elapsed());
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    read(&tally)
}

fn read(tally: &Mutex<Tally>) -> Tally {
    tally.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Continuous load in the background until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, concurrency: usize) -> Self {
        let http = client();
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let workers = (0..concurrency.max(1))
            .map(|_| {
                let (http, url, stop, tally) =
                    (http.clone(), url.to_owned(), stop.clone(), tally.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let outcome = one(&http, &url).await;
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        t.record(outcome, start.elapsed());
                    }
                })
            })
            .collect();
        Self {
            stop,
            tally,
            workers,
        }
    }

    /// The tally so far.
    pub fn snapshot(&self) -> Tally {
        read(&self.tally)
    }

    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.await;
        }
        read(&self.tally)
    }
}

/// One answer, with the headers a test may need to read.
#[derive(Debug, Clone)]
pub struct Answer {
    /// 0 when the request got no HTTP answer.
    pub status: u16,
    pub headers: BTreeMap<String, String>,
}

/// Open-loop load: `rps` requests per second for `duration`, each started on
/// schedule whatever the previous ones are doing, with `headers` on each.
pub async fn paced(
    url: &str,
    rps: f64,
    duration: Duration,
    headers: &[(&str, &str)],
) -> Vec<Answer> {
    let http = client();
    let total = (rps * duration.as_secs_f64()).round() as usize;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total);
    for _ in 0..total {
        ticker.tick().await;
        let mut req = http.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        tasks.push(tokio::spawn(async move {
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let headers = r
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                        .collect();
                    let _ = r.bytes().await;
                    Answer { status, headers }
                }
                Err(_) => Answer {
                    status: 0,
                    headers: BTreeMap::new(),
                },
            }
        }));
    }
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        if let Ok(a) = t.await {
            out.push(a);
        }
    }
    out
}
