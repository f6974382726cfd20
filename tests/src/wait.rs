//! Waiting on conditions with deadlines: the only way the harness synchronizes.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

/// How often a condition is re-checked. This is a polling interval, not a
/// guess at how long something takes: the deadline bounds the wait.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, or fails after `deadline` with a
/// message naming `what` and the last state seen.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    until_every(what, deadline, POLL, check).await
}

/// [`until`], re-checking every `poll`: for checks that call the control
/// plane's API, whose per-caller rate limit (50/s) a 20 ms poll would use
/// up over a long wait.
pub async fn until_every<T, F, Fut>(
    what: &str,
    deadline: Duration,
    poll: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut ticker = tokio::time::interval(poll);
    let mut last_error = None;
    loop {
        ticker.tick().await;
        // A check that hangs (a wedged server that accepts and never
        // answers) must fail the wait at its deadline too, not only a
        // check that keeps answering "not yet".
        let left = deadline.saturating_sub(start.elapsed()).max(poll);
        match tokio::time::timeout(left, check()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => last_error = Some(anyhow!("the check itself hung for {left:?}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hung_check_fails_at_the_deadline() {
        let started = Instant::now();
        let r: Result<()> = until(
            "a check that never returns",
            Duration::from_millis(200),
            std::future::pending,
        )
        .await;
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("hung"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_check_that_succeeds_ends_the_wait() {
        let mut n = 0;
        let v = until("the third try", Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move { Ok((n >= 3).then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }
}
