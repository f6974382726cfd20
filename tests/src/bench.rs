//! Benchmarks: real Envoy, real load generator (oha), figures as JSON under
//! `target/bench/<scenario>.json`.
//!
//! The machine is small and shared, so every scenario compares variants
//! *side by side in one run*, alternating rounds (A, B, A, B, ...), and
//! reports ratios; absolute numbers are only context.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::envoy::{self, Envoy};
use crate::paths;
use crate::stack::free_port;

/// Every scenario, by name.
pub const SCENARIOS: &[&str] = &["filter_overhead", "hedging"];

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
}

pub struct Oha {
    bin: PathBuf,
}

impl Oha {
    /// `oha -z <seconds>s -c <connections>` against `url`.
    pub async fn run(&self, url: &str, seconds: u64, connections: u32) -> Result<LoadResult> {
        let out = tokio::process::Command::new(&self.bin)
            .args(["--no-tui", "--output-format", "json", "-z"])
            .arg(format!("{seconds}s"))
            .arg("-c")
            .arg(connections.to_string())
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
        let sum = |k: &str| {
            v[k].as_object()
                .map(|m| m.values().filter_map(Value::as_u64).sum::<u64>())
                .unwrap_or(0)
        };
        Ok(LoadResult {
            rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
            p50_ms: ms("p50"),
            p90_ms: ms("p90"),
            p99_ms: ms("p99"),
            p999_ms: ms("p99.9"),
            success_rate: v["summary"]["successRate"].as_f64().unwrap_or(0.0),
            requests: sum("statusCodeDistribution") + sum("errorDistribution"),
        })
    }
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

/// A child process killed when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    Ok((ChildGuard(child), port))
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
    let (mut plain_runs, mut filter_runs) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first so drift in machine load hits both alike.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for filtered in order {
            let url = if filtered { &url_with } else { &url_plain };
            let r = oha.run(url, SECONDS, CONNECTIONS).await?;
            eprintln!(
                "round {round} {}: {r:?}",
                if filtered { "filter" } else { "plain" }
            );
            if filtered {
                filter_runs.push(r)
            } else {
                plain_runs.push(r)
            }
        }
    }
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
    for mode in ["fixed", "adaptive"] {
        let delay = envoy
            .stat(&format!("wasmcustom.{mode}.hedge.all.delay_ms"))
            .await?;
        figures.insert(format!("{mode}_delay_ms_at_end"), json!(delay));
    }
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
