//! Shared by the control plane's integration tests: clients that give up on
//! a wedged server, and condition waits with deadlines (never a fixed count
//! of sleeps).
//!
//! Each test file uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

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
