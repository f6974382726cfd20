//! Waiting on conditions with deadlines: the only way the harness synchronizes.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often a condition is re-checked. This is a polling interval, not a
/// guess at how long something takes: the deadline bounds the wait.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, or fails after `deadline` with a
/// message naming `what` and the last state seen.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut ticker = tokio::time::interval(POLL);
    let mut last_error = None;
    loop {
        ticker.tick().await;
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {deadline:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {deadline:?} waiting for {what}"),
            }
        }
    }
}
