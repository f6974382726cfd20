//! Shared by the control plane's integration tests: clients that give up on
//! a wedged server, and condition waits with deadlines (never a fixed count
//! of sleeps).
//!
//! Each test file uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsMessage;
use envoy_types::pb::envoy::service::metrics::v3::stream_metrics_message::Identifier;
use envoy_types::pb::io::prometheus::client::{
    Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

/// How long one call to the control plane under test may take. It answers
/// in milliseconds; a wedged one must fail the test in seconds.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a condition may take to hold (the server ingests asynchronously).
pub const DEADLINE: Duration = Duration::from_secs(5);

/// An HTTP client whose every request times out after [`TIMEOUT`].
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .build()
        .expect("a reqwest client with timeouts builds")
}

/// A gRPC endpoint that gives up connecting and calling after [`TIMEOUT`].
pub fn endpoint(url: String) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(url)
        .expect("a valid endpoint URL")
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
}

/// Reads until `check` holds, re-reading every 10 ms, and panics with the
/// last value once [`DEADLINE`] has passed. The deadline is wall-clock: it
/// does not grow with how long each read takes.
pub async fn eventually<T: std::fmt::Debug>(
    what: &str,
    mut read: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    loop {
        ticker.tick().await;
        let v = read();
        if check(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {v:?} after {DEADLINE:?}"
        );
    }
}

/// [`eventually`] for an async read (a call to the server under test).
pub async fn eventually_async<T: std::fmt::Debug, F: Future<Output = T>>(
    what: &str,
    mut read: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    loop {
        ticker.tick().await;
        let v = read().await;
        if check(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {v:?} after {DEADLINE:?}"
        );
    }
}

/// Awaits `f`, failing after [`TIMEOUT`] with `what`: for calls whose client
/// has no timeout of its own (the CLI's, a streaming gRPC call).
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {TIMEOUT:?}"),
    }
}

/// What one run of the real `understudy` binary printed.
#[derive(Debug)]
pub struct CliRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real `understudy` binary with `args` (no token or API from the
/// environment), bounded by [`TIMEOUT`], and returns what it printed: the
/// tests read back the CLI's output, not only whether it ran.
pub async fn cli(args: &[&str]) -> CliRun {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(args)
        .env_remove("UNDERSTUDY_TOKEN")
        .env_remove("UNDERSTUDY_API")
        .env_remove("UNDERSTUDY_CA")
        .kill_on_drop(true)
        .output();
    let out = within(&format!("understudy {args:?}"), run)
        .await
        .expect("the understudy binary runs");
    CliRun {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// === Envoy-shaped stats flushes ===

pub fn label(name: &str, value: &str) -> LabelPair {
    LabelPair {
        name: Some(name.into()),
        value: Some(value.into()),
    }
}

pub fn counter(name: &str, labels: Vec<LabelPair>, value: f64) -> MetricFamily {
    MetricFamily {
        name: Some(name.into()),
        r#type: Some(MetricType::Counter as i32),
        metric: vec![Metric {
            label: labels,
            counter: Some(Counter {
                value: Some(value),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One flush for `cluster` the way Envoy 1.40 sends it with
/// `emit_tags_as_labels` and `report_counters_as_deltas`: per-flush counts,
/// histogram buckets cumulative across bounds, no `+Inf` bucket.
pub fn flush(cluster: &str, ok: u64, errors: u64, latency_ms: f64) -> Vec<MetricFamily> {
    let c = || label("envoy.cluster_name", cluster);
    let total = ok + errors;
    let bounds = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0];
    vec![
        counter("cluster.upstream_rq_completed", vec![c()], total as f64),
        counter(
            "cluster.upstream_rq_xx",
            vec![label("envoy.response_code_class", "2"), c()],
            ok as f64,
        ),
        counter(
            "cluster.upstream_rq_xx",
            vec![label("envoy.response_code_class", "5"), c()],
            errors as f64,
        ),
        // Same requests again, by origin: must not count twice.
        counter(
            "cluster.external.upstream_rq_completed",
            vec![c()],
            total as f64,
        ),
        MetricFamily {
            name: Some("cluster.upstream_rq_time".into()),
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                label: vec![c()],
                histogram: Some(Histogram {
                    sample_count: Some(total),
                    sample_sum: Some(latency_ms * total as f64),
                    bucket: bounds
                        .iter()
                        .map(|b| Bucket {
                            upper_bound: Some(*b),
                            cumulative_count: Some(if latency_ms <= *b { total } else { 0 }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
    ]
}

pub fn first_message(node: &str, families: Vec<MetricFamily>) -> StreamMetricsMessage {
    StreamMetricsMessage {
        identifier: Some(Identifier {
            node: Some(Node {
                id: node.into(),
                ..Default::default()
            }),
        }),
        envoy_metrics: families,
    }
}

pub fn next_message(families: Vec<MetricFamily>) -> StreamMetricsMessage {
    StreamMetricsMessage {
        identifier: None,
        envoy_metrics: families,
    }
}

// === desired states ===

/// A service on loopback: stable at `port`, canary at `port + 1`, weight 0.
pub fn service(name: &str, port: u16) -> (String, understudy_controlplane::model::Service) {
    use understudy_controlplane::model::{Backend, Service, Weight};
    (
        name.to_owned(),
        Service {
            name: name.into(),
            domains: vec![format!("{name}.example")],
            stable: Backend {
                endpoints: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            },
            canary: Backend {
                endpoints: vec![SocketAddr::from(([127, 0, 0, 1], port + 1))],
            },
            canary_weight: Weight::ZERO,
            sticky: None,
            canary_cohorts: Vec::new(),
            flags: Default::default(),
        },
    )
}

/// A desired state with `services` and the filter config `filter`.
pub fn desired(
    filter: serde_json::Value,
    services: impl IntoIterator<Item = (String, understudy_controlplane::model::Service)>,
) -> understudy_controlplane::model::DesiredState {
    use understudy_controlplane::model::{
        DesiredState, FilterDoc, FilterSettings, ListenerSettings,
    };
    DesiredState {
        listener: ListenerSettings {
            address: "127.0.0.1".parse().expect("an address"),
            port: 10000,
        },
        filter: FilterSettings {
            wasm_path: "/etc/envoy/understudy.wasm".into(),
            config: FilterDoc::parse(filter).expect("a valid filter config"),
            report_cluster: "understudy_xds".into(),
        },
        services: services.into_iter().collect(),
    }
}
