//! Benchmarks: real Envoy, real load generator (oha), figures as JSON under
//! `target/bench/<scenario>.json`.
//!
//! The machine is small and shared, so every scenario compares variants
//! *side by side in one run*, alternating rounds (A, B, A, B, ...), and
//! reports ratios; absolute numbers are only context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::envoy::{self, Envoy};
use crate::paths;
use crate::process::ChildGuard;
use crate::stack::free_port;

/// Every scenario, by name.
pub const SCENARIOS: &[&str] = &["filter_overhead", "hedging", "rate_limit"];

pub async fn run(name: Option<&str>, oha: &Path) -> Result<()> {
    let selected: Vec<&str> = match name {
        Some(n) if SCENARIOS.contains(&n) => vec![n],
        Some(n) => bail!("unknown scenario {n:?}; known: {}", SCENARIOS.join(", ")),
        None => SCENARIOS.to_vec(),
    };
    let oha = Oha {
        bin: oha.to_path_buf(),
    };
    for scenario in selected {
        let figures = match scenario {
            "filter_overhead" => filter_overhead(&oha).await?,
            "hedging" => hedging(&oha).await?,
            "rate_limit" => rate_limit(&oha).await?,
            _ => unreachable!("checked above"),
        };
        let path = write(scenario, figures)?;
        println!("{scenario}: {}", path.display());
        println!("{}", std::fs::read_to_string(&path)?);
    }
    Ok(())
}

/// One oha run's summary.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub success_rate: f64,
    /// Requests sent, answered or cut off at the deadline.
    pub requests: u64,
    /// Wall-clock seconds oha ran (its `summary.total`).
    pub seconds: f64,
    /// Answers by HTTP status (`"200"`, `"429"`, ...).
    pub statuses: BTreeMap<String, u64>,
    /// Requests without an answer (connection errors, cut off at the deadline).
    pub errors: u64,
}

impl LoadResult {
    /// Answers with this HTTP status.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code.to_string()).copied().unwrap_or(0)
    }
}

/// How oha loads a URL.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    pub seconds: u64,
    pub connections: u32,
    /// Open loop at this many requests per second (oha `-q`); closed loop
    /// (each connection sends as soon as it has its answer) when `None`.
    pub qps: Option<u32>,
    /// Extra request headers, `"name: value"`.
    pub headers: &'a [&'a str],
}

pub struct Oha {
    bin: PathBuf,
}

impl Oha {
    /// `oha -z <seconds>s -c <connections>` against `url` (closed loop).
    pub async fn run(&self, url: &str, seconds: u64, connections: u32) -> Result<LoadResult> {
        self.load(
            url,
            Load {
                seconds,
                connections,
                qps: None,
                headers: &[],
            },
        )
        .await
    }

    /// `oha -z <seconds>s -c <connections> [-q <qps>] [-H <header>]...` against `url`.
    pub async fn load(&self, url: &str, load: Load<'_>) -> Result<LoadResult> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["--no-tui", "--output-format", "json", "-z"])
            .arg(format!("{}s", load.seconds))
            .arg("-c")
            .arg(load.connections.to_string());
        if let Some(qps) = load.qps {
            cmd.arg("-q").arg(qps.to_string());
        }
        for header in load.headers {
            cmd.arg("-H").arg(header);
        }
        let out = cmd
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("parsing oha's JSON")?;
        let ms = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
        let counts = |k: &str| -> BTreeMap<String, u64> {
            v[k].as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let statuses = counts("statusCodeDistribution");
        let errors = counts("errorDistribution").values().sum::<u64>();
        Ok(LoadResult {
            rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
            p50_ms: ms("p50"),
            p90_ms: ms("p90"),
            p99_ms: ms("p99"),
            p999_ms: ms("p99.9"),
            success_rate: v["summary"]["successRate"].as_f64().unwrap_or(0.0),
            requests: statuses.values().sum::<u64>() + errors,
            seconds: v["summary"]["total"].as_f64().unwrap_or(f64::NAN),
            statuses,
            errors,
        })
    }
}

/// Runs `load` against `a` and `b` for `rounds` rounds, alternating which
/// goes first so drift in machine load hits both alike. Returns the runs of
/// each, in round order.
async fn alternate(
    oha: &Oha,
    rounds: usize,
    (a_name, a): (&str, &str),
    (b_name, b): (&str, &str),
    load: Load<'_>,
) -> Result<(Vec<LoadResult>, Vec<LoadResult>)> {
    let (mut a_runs, mut b_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for second in order {
            let (name, url) = if second { (b_name, b) } else { (a_name, a) };
            let r = oha.load(url, load).await?;
            eprintln!("round {round} {name}: {r:?}");
            if second {
                b_runs.push(r)
            } else {
                a_runs.push(r)
            }
        }
    }
    Ok((a_runs, b_runs))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Writes `target/bench/<scenario>.json` with the fields every scenario carries.
fn write(scenario: &str, figures: Value) -> Result<PathBuf> {
    let dir = paths::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let mut doc = json!({
        "scenario": scenario,
        "envoy_version": paths::ENVOY_VERSION,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    if let (Some(d), Some(f)) = (doc.as_object_mut(), figures.as_object()) {
        d.extend(f.clone());
    }
    let path = dir.join(format!("{scenario}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    Ok(path)
}

/// The release `understudy-upstream` binary on a free port, with `behavior` (JSON).
fn start_upstream(behavior: &str) -> Result<(ChildGuard, u16)> {
    let port = free_port()?;
    let bin = paths::repo_root().join("target/release/understudy-upstream");
    let child = std::process::Command::new(&bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--label",
            "v1",
            "--behavior",
            behavior,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (cargo xtask bench builds it)", bin.display()))?;
    Ok((ChildGuard::new(child), port))
}

/// Plain Envoy against Envoy with the filter loaded and passing traffic: one
/// Envoy, two listeners (`envoy/static-filter.yaml`), same upstream,
/// alternating rounds at a fixed connection count.
async fn filter_overhead(oha: &Oha) -> Result<Value> {
    const ROUNDS: usize = 3;
    const SECONDS: u64 = 5;
    const CONNECTIONS: u32 = 16;
    let (_upstream, upstream_port) = start_upstream("{}")?;
    let (config, with, plain) =
        envoy::render_static_filter(upstream_port, envoy::STATIC_FILTER_CONFIG)?;
    let envoy = Envoy::start(&config, &[]).await?;
    envoy.wait_ready().await?;
    let url_with = format!("http://127.0.0.1:{with}/");
    let url_plain = format!("http://127.0.0.1:{plain}/");
    // Warm both paths (connections, V8 tiers) before measuring.
    oha.run(&url_plain, 1, CONNECTIONS).await?;
    oha.run(&url_with, 1, CONNECTIONS).await?;
    let closed = Load {
        seconds: SECONDS,
        connections: CONNECTIONS,
        qps: None,
        headers: &[],
    };
    let (plain_runs, filter_runs) = alternate(
        oha,
        ROUNDS,
        ("plain", &url_plain),
        ("filter", &url_with),
        closed,
    )
    .await?;
    let counted = envoy
        .stat("wasmcustom.understudy.requests_total")
        .await?
        .unwrap_or(0);
    if counted == 0 {
        bail!("the filter counted no requests: it was not on the measured path");
    }
    let pick =
        |runs: &[LoadResult], f: fn(&LoadResult) -> f64| median(runs.iter().map(f).collect());
    let rps_plain = pick(&plain_runs, |r| r.rps);
    let rps_filter = pick(&filter_runs, |r| r.rps);
    Ok(json!({
        "duration_s": ROUNDS as u64 * SECONDS * 2,
        "connections": CONNECTIONS,
        "rounds": ROUNDS,
        "seconds_per_round": SECONDS,
        "aggregation": "median of rounds",
        "rps_plain": round3(rps_plain),
        "rps_filter": round3(rps_filter),
        "throughput_ratio": round3(rps_filter / rps_plain),
        "p50_ms_plain": round3(pick(&plain_runs, |r| r.p50_ms)),
        "p50_ms_filter": round3(pick(&filter_runs, |r| r.p50_ms)),
        "p99_ms_plain": round3(pick(&plain_runs, |r| r.p99_ms)),
        "p99_ms_filter": round3(pick(&filter_runs, |r| r.p99_ms)),
        "success_rate_min": plain_runs.iter().chain(&filter_runs).map(|r| r.success_rate).fold(1.0, f64::min),
        "filter_counted_requests": counted,
        "runs": {"plain": plain_runs, "filter": filter_runs},
    }))
}

/// Requests an upstream has served.
async fn upstream_count(http: &reqwest::Client, port: u16) -> Result<u64> {
    let v: Value = http
        .get(format!("http://127.0.0.1:{port}/_upstream/count"))
        .send()
        .await?
        .json()
        .await?;
    v["requests"].as_u64().context("upstream count missing")
}

/// The same slow-tail upstream (5% of requests take 300 ms, the rest 5 ms)
/// behind four listeners of one Envoy (`envoy/bench-hedging.yaml`): no
/// hedging, Envoy's native per-try-timeout hedge, and the filter with a
/// fixed and an adaptive delay. Rounds alternate the modes.
async fn hedging(oha: &Oha) -> Result<Value> {
    const ROUNDS: usize = 2;
    const SECONDS: u64 = 8;
    const CONNECTIONS: u32 = 8;
    const BEHAVIOR: &str = r#"{"latency":[{"pct":5,"ms":300}],"default_ms":5}"#;
    let modes = [
        ("none", 10010u16, 8091u16),
        ("native", 10011, 8092),
        ("fixed", 10012, 8093),
        ("adaptive", 10013, 8094),
    ];
    let mut upstreams = Vec::new();
    let mut replacements: Vec<(&str, String)> = vec![
        ("port_value: 9901", "port_value: 0".into()),
        (
            "filename: target/wasm32-wasip1/release/understudy_filter.wasm",
            format!("filename: {}", paths::filter_wasm()?.display()),
        ),
    ];
    let mut ports = Vec::new();
    let listener_patterns: Vec<String> = modes
        .iter()
        .map(|m| format!("port_value: {}", m.1))
        .collect();
    let upstream_patterns: Vec<String> = modes
        .iter()
        .map(|m| format!("port_value: {}", m.2))
        .collect();
    for (i, _) in modes.iter().enumerate() {
        let (guard, up) = start_upstream(BEHAVIOR)?;
        upstreams.push(guard);
        let listen = free_port()?;
        ports.push((listen, up));
        replacements.push((
            listener_patterns[i].as_str(),
            format!("port_value: {listen}"),
        ));
        replacements.push((upstream_patterns[i].as_str(), format!("port_value: {up}")));
    }
    let envoy = Envoy::start(&envoy::render("bench-hedging.yaml", &replacements)?, &[]).await?;
    envoy.wait_ready().await?;
    let http = reqwest::Client::new();
    let url = |i: usize| format!("http://127.0.0.1:{}/", ports[i].0);
    // Warm every path (and fill the adaptive window) before counting.
    for i in 0..modes.len() {
        oha.run(&url(i), 2, CONNECTIONS).await?;
    }
    let mut upstream_before = Vec::new();
    for (_, up) in &ports {
        upstream_before.push(upstream_count(&http, *up).await?);
    }
    let mut runs: Vec<Vec<LoadResult>> = vec![Vec::new(); modes.len()];
    let mut delays = serde_json::Map::new();
    for round in 0..ROUNDS {
        for k in 0..modes.len() {
            let i = if round % 2 == 0 {
                k
            } else {
                modes.len() - 1 - k
            };
            let r = oha.run(&url(i), SECONDS, CONNECTIONS).await?;
            eprintln!("round {round} {}: {r:?}", modes[i].0);
            runs[i].push(r);
            // The delay the filter used, read while its latency window is fresh.
            if modes[i].0 == "fixed" || modes[i].0 == "adaptive" {
                let name = format!("wasmcustom.{}.hedge.all.delay_ms", modes[i].0);
                if let Some(ms) = envoy.stat(&name).await? {
                    delays.insert(format!("{}_delay_ms", modes[i].0), json!(ms));
                }
            }
        }
    }
    let mut figures = serde_json::Map::new();
    for (i, (mode, _, _)) in modes.iter().enumerate() {
        let served = upstream_count(&http, ports[i].1).await? - upstream_before[i];
        let sent: u64 = runs[i].iter().map(|r| r.requests).sum();
        let pick = |f: fn(&LoadResult) -> f64| round3(median(runs[i].iter().map(f).collect()));
        figures.insert(format!("{mode}_p50_ms"), json!(pick(|r| r.p50_ms)));
        figures.insert(format!("{mode}_p90_ms"), json!(pick(|r| r.p90_ms)));
        figures.insert(format!("{mode}_p99_ms"), json!(pick(|r| r.p99_ms)));
        figures.insert(format!("{mode}_p999_ms"), json!(pick(|r| r.p999_ms)));
        figures.insert(format!("{mode}_rps"), json!(pick(|r| r.rps)));
        figures.insert(format!("{mode}_client_requests"), json!(sent));
        figures.insert(format!("{mode}_upstream_requests"), json!(served));
        figures.insert(
            format!("{mode}_extra_load_pct"),
            json!(round3((served as f64 / sent.max(1) as f64 - 1.0) * 100.0)),
        );
    }
    figures.extend(delays);
    figures.insert(
        "duration_s".into(),
        json!(ROUNDS as u64 * SECONDS * modes.len() as u64),
    );
    figures.insert("connections".into(), json!(CONNECTIONS));
    figures.insert("rounds".into(), json!(ROUNDS));
    figures.insert("aggregation".into(), json!("median of rounds"));
    figures.insert(
        "upstream".into(),
        json!("5% of requests 300 ms, the rest 5 ms"),
    );
    figures.insert(
        "modes".into(),
        json!({
            "none": "no hedging",
            "native": "Envoy retry_policy per_try_timeout 40 ms + hedge_on_per_try_timeout",
            "fixed": "Understudy, fixed 40 ms, budget 10% + 1/s",
            "adaptive": "Understudy, p90 of recent latency within 10..200 ms, budget 10% + 1/s"
        }),
    );
    Ok(Value::Object(figures))
}

/// A stat of the filter in `envoy`, 0 if Envoy does not have it.
async fn filter_stat(envoy: &Envoy, name: &str) -> Result<u64> {
    Ok(envoy
        .stat(&format!("wasmcustom.{name}"))
        .await?
        .unwrap_or(0))
}

/// Per-tenant rate limits, one Envoy (`envoy/bench-ratelimit.yaml`), three
/// listeners running the filter on one upstream:
/// - accuracy: one tenant with a fixed rate R sends 2R/s open loop; admitted
///   (200s) per second over R, at process level (two workers, one limit);
/// - isolation: a tenant under its limit sends while another sends ten times
///   its own limit, both open loop at once; the first one's success rate;
/// - overhead: the limiter on but never limiting vs. the filter without
///   `rate_limit`, closed loop, alternating rounds.
async fn rate_limit(oha: &Oha) -> Result<Value> {
    // The `limited` listener's tenants; checked against the YAML below.
    const RATE: f64 = 200.0;
    const BURST_S: f64 = 0.1;
    const VICTIM_RATE: f64 = 50.0;
    const AGGRESSOR_RATE: f64 = 50.0;
    // Open-loop load.
    const ACCURACY_SECONDS: u64 = 20;
    const OFFERED_QPS: u32 = 2 * RATE as u32;
    const CONTENTION_SECONDS: u64 = 10;
    const VICTIM_QPS: u32 = 25;
    const AGGRESSOR_QPS: u32 = 10 * AGGRESSOR_RATE as u32;
    const OPEN_LOOP_CONNECTIONS: u32 = 32;
    // Closed-loop overhead rounds.
    const ROUNDS: usize = 3;
    const SECONDS: u64 = 5;
    const CONNECTIONS: u32 = 16;

    let (_upstream, upstream_port) = start_upstream("{}")?;
    let (limited, on, off) = (free_port()?, free_port()?, free_port()?);
    let (limited_pw, on_pw) = (free_port()?, free_port()?);
    let config = envoy::render(
        "bench-ratelimit.yaml",
        &[
            ("port_value: 9901", "port_value: 0".into()),
            ("port_value: 10020", format!("port_value: {limited}")),
            ("port_value: 10021", format!("port_value: {on}")),
            ("port_value: 10022", format!("port_value: {off}")),
            ("port_value: 10023", format!("port_value: {limited_pw}")),
            ("port_value: 10024", format!("port_value: {on_pw}")),
            ("port_value: 8095", format!("port_value: {upstream_port}")),
            (
                "filename: target/wasm32-wasip1/release/understudy_filter.wasm",
                format!("filename: {}", paths::filter_wasm()?.display()),
            ),
        ],
    )?;
    for expected in [
        format!(
            r#""tenants":{{"bench":{{"rate":{RATE}}},"victim":{{"rate":{VICTIM_RATE}}},"aggressor":{{"rate":{AGGRESSOR_RATE}}}}}"#
        ),
        format!(r#""burst_s":{BURST_S}}}"#),
    ] {
        if !config.contains(&expected) {
            bail!(
                "envoy/bench-ratelimit.yaml no longer has {expected}; update the rate_limit benchmark's constants"
            );
        }
    }
    let envoy = Envoy::start(&config, &[]).await?;
    envoy.wait_ready().await?;
    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    // Warm every path (connections, V8 tiers); anonymous requests are not
    // limited on `limited`, so its tenants start with full buckets.
    oha.run(&url(limited), 1, OPEN_LOOP_CONNECTIONS).await?;
    let bench_header = ["x-tenant-id: bench"];
    let closed = Load {
        seconds: SECONDS,
        connections: CONNECTIONS,
        qps: None,
        headers: &bench_header,
    };
    let warm = Load {
        seconds: 1,
        ..closed
    };
    oha.load(&url(on), warm).await?;
    oha.load(&url(off), warm).await?;

    // Accuracy: R/s configured, 2R/s offered.
    let acc = oha
        .load(
            &url(limited),
            Load {
                seconds: ACCURACY_SECONDS,
                connections: OPEN_LOOP_CONNECTIONS,
                qps: Some(OFFERED_QPS),
                headers: &bench_header,
            },
        )
        .await?;
    eprintln!("accuracy: {acc:?}");
    let admitted = acc.status(200);
    let rejected = acc.status(429);
    let burst = (RATE * BURST_S).max(1.0);
    let filter_allowed = filter_stat(&envoy, "rl.ratelimit.standard.allowed").await?;
    let filter_limited = filter_stat(&envoy, "rl.ratelimit.standard.limited").await?;

    // Isolation: victim under its limit, aggressor at 10x its own, at once.
    let victim_header = ["x-tenant-id: victim"];
    let aggressor_header = ["x-tenant-id: aggressor"];
    let url_limited = url(limited);
    let (victim, aggressor) = tokio::join!(
        oha.load(
            &url_limited,
            Load {
                seconds: CONTENTION_SECONDS,
                connections: 4,
                qps: Some(VICTIM_QPS),
                headers: &victim_header,
            },
        ),
        oha.load(
            &url_limited,
            Load {
                seconds: CONTENTION_SECONDS,
                connections: OPEN_LOOP_CONNECTIONS,
                qps: Some(AGGRESSOR_QPS),
                headers: &aggressor_header,
            },
        ),
    );
    let (victim, aggressor) = (victim?, aggressor?);
    eprintln!("victim: {victim:?}\naggressor: {aggressor:?}");
    let victim_answered: u64 = victim.statuses.values().sum();

    // Overhead: limiter on (never limiting) vs. off, both running the filter.
    let (off_runs, on_runs) = alternate(
        oha,
        ROUNDS,
        ("limiter off", &url(off)),
        ("limiter on", &url(on)),
        closed,
    )
    .await?;
    let on_total = filter_stat(&envoy, "rl_on.requests_total").await?;
    let on_allowed = filter_stat(&envoy, "rl_on.ratelimit.standard.allowed").await?;
    let on_limited = filter_stat(&envoy, "rl_on.ratelimit.standard.limited").await?;
    let off_total = filter_stat(&envoy, "rl_off.requests_total").await?;
    if on_allowed == 0 || off_total == 0 {
        bail!("the limiter-on or limiter-off filter counted no requests: not on the measured path");
    }
    if on_limited > 0 {
        bail!("the limiter-on listener limited {on_limited} requests; it must never limit");
    }
    let pick =
        |runs: &[LoadResult], f: fn(&LoadResult) -> f64| median(runs.iter().map(f).collect());
    let rps_off = pick(&off_runs, |r| r.rps);
    let rps_on = pick(&on_runs, |r| r.rps);

    // Shared data with CAS against per-worker shares, side by side: accuracy
    // with load spread over both workers (32 connections) and with all of it
    // on one worker (one connection), and the cost of each.
    let mut comparison = serde_json::Map::new();
    for (mode, port, never_limiting) in [("shared", limited, on), ("per_worker", limited_pw, on_pw)]
    {
        let mut figures = serde_json::Map::new();
        for (label, connections) in [
            ("32_connections", OPEN_LOOP_CONNECTIONS),
            ("1_connection", 1),
        ] {
            let r = oha
                .load(
                    &url(port),
                    Load {
                        seconds: CONTENTION_SECONDS,
                        connections,
                        qps: Some(OFFERED_QPS),
                        headers: &bench_header,
                    },
                )
                .await?;
            eprintln!("{mode} {label}: {r:?}");
            figures.insert(
                format!("accuracy_ratio_{label}"),
                json!(round3((r.status(200) as f64 - burst) / r.seconds / RATE)),
            );
        }
        let (off_runs, on_runs) = alternate(
            oha,
            ROUNDS,
            ("limiter off", &url(off)),
            (mode, &url(never_limiting)),
            closed,
        )
        .await?;
        let ratios = on_runs
            .iter()
            .zip(&off_runs)
            .map(|(on, off)| on.rps / off.rps)
            .collect();
        figures.insert("overhead_ratio".into(), json!(round3(median(ratios))));
        comparison.insert(mode.into(), Value::Object(figures));
    }

    Ok(json!({
        "duration_s": ACCURACY_SECONDS + CONTENTION_SECONDS + ROUNDS as u64 * SECONDS * 2
            + 2 * (2 * CONTENTION_SECONDS + ROUNDS as u64 * SECONDS * 2),
        "enforcement_comparison": comparison,
        "enforcement_note": "accuracy ratios exclude the initial burst; one connection puts all of a tenant's load on one worker, where per-worker shares admit only rate/workers",
        "accuracy_ratio": round3(admitted as f64 / acc.seconds / RATE),
        "accuracy_ratio_without_burst": round3((admitted as f64 - burst) / acc.seconds / RATE),
        "accuracy": {
            "note": "admitted includes the bucket's initial burst (rate x burst_s requests, the bucket starts full); accuracy_ratio_without_burst subtracts it",
            "tenant_rate": RATE,
            "offered_qps": OFFERED_QPS,
            "seconds": round3(acc.seconds),
            "connections": OPEN_LOOP_CONNECTIONS,
            "burst_s": BURST_S,
            "burst_requests": burst,
            "expected_admitted": round3(RATE * acc.seconds + burst),
            "admitted_200": admitted,
            "limited_429": rejected,
            "other_statuses": acc.statuses.values().sum::<u64>() - admitted - rejected,
            "errors": acc.errors,
            "sent": acc.requests,
            "admitted_per_s": round3(admitted as f64 / acc.seconds),
            "filter_allowed": filter_allowed,
            "filter_limited": filter_limited,
        },
        "victim_success_pct": round3(100.0 * victim.status(200) as f64 / victim_answered.max(1) as f64),
        "isolation": {
            "seconds": CONTENTION_SECONDS,
            "victim_rate": VICTIM_RATE,
            "victim_offered_qps": VICTIM_QPS,
            "victim_200": victim.status(200),
            "victim_429": victim.status(429),
            "victim_answered": victim_answered,
            "victim_errors": victim.errors,
            "victim_p99_ms": round3(victim.p99_ms),
            "aggressor_rate": AGGRESSOR_RATE,
            "aggressor_offered_qps": AGGRESSOR_QPS,
            "aggressor_200": aggressor.status(200),
            "aggressor_429": aggressor.status(429),
            "aggressor_errors": aggressor.errors,
            "aggressor_admitted_per_s": round3(aggressor.status(200) as f64 / aggressor.seconds),
        },
        "limiter_overhead_ratio": round3(rps_on / rps_off),
        "overhead": {
            "connections": CONNECTIONS,
            "rounds": ROUNDS,
            "seconds_per_round": SECONDS,
            "aggregation": "median of rounds",
            "rps_limiter_off": round3(rps_off),
            "rps_limiter_on": round3(rps_on),
            "p50_ms_limiter_off": round3(pick(&off_runs, |r| r.p50_ms)),
            "p50_ms_limiter_on": round3(pick(&on_runs, |r| r.p50_ms)),
            "p99_ms_limiter_off": round3(pick(&off_runs, |r| r.p99_ms)),
            "p99_ms_limiter_on": round3(pick(&on_runs, |r| r.p99_ms)),
            "success_rate_min": off_runs.iter().chain(&on_runs).map(|r| r.success_rate).fold(1.0, f64::min),
            "limiter_on_filter_requests": on_total,
            "limiter_on_filter_allowed": on_allowed,
            // Requests the limiter let through without a decision (shared data
            // failed or CAS retries ran out): 0 means every one paid full price.
            "limiter_on_fail_open": on_total.saturating_sub(on_allowed + on_limited),
            "limiter_off_filter_requests": off_total,
            "runs": {"limiter_off": off_runs, "limiter_on": on_runs},
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
