//! LISTEN/NOTIFY: how a replica learns at once that another one committed a
//! change, with a periodic reconcile as the safety net (a notification is
//! lost while the connection is down, and a reconnect cannot tell what it
//! missed).
//!
//! One thread, one connection of its own. Every notification, every
//! reconnect and every quiet `period` calls the handler; the handler reads
//! what is newer than what it holds, so a duplicate or a spurious call
//! costs one small query and nothing else.

use std::sync::Arc;
use std::time::Duration;

use postgres::Config;
use postgres::fallible_iterator::FallibleIterator;

use super::{CHANNEL, dial};

/// What a call to the handler is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The desired state changed.
    State,
    /// A rollout's record or audit changed.
    Rollout(String),
    /// No notification for a while, or the connection was (re)made:
    /// compare everything.
    Reconcile,
}

impl Change {
    fn parse(payload: &str) -> Self {
        match payload.split_once(':') {
            None if payload == "state" => Self::State,
            Some(("rollout", id)) => Self::Rollout(id.to_owned()),
            _ => Self::Reconcile,
        }
    }
}

/// Starts the listening thread; `on` runs on it for every [`Change`].
pub fn spawn(config: Config, period: Duration, on: Arc<dyn Fn(Change) + Send + Sync>) {
    let spawned = std::thread::Builder::new()
        .name("pg-listen".to_owned())
        .spawn(move || {
            loop {
                match dial(&config) {
                    Ok(mut client) => {
                        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")) {
                            tracing::warn!(error = %e, "LISTEN failed");
                        } else {
                            on(Change::Reconcile);
                            listen(&mut client, period, on.as_ref());
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "database unreachable; listening again soon");
                    }
                }
                // While the database is away, the reconcile still runs (it
                // fails fast), and the dial is retried at this pace.
                on(Change::Reconcile);
                std::thread::park_timeout(period);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the LISTEN thread");
    }
}

/// Delivers notifications until the connection fails.
fn listen(client: &mut postgres::Client, period: Duration, on: &(dyn Fn(Change) + Send + Sync)) {
    loop {
        let next = client.notifications().timeout_iter(period).next();
        match next {
            Ok(Some(n)) => on(Change::parse(n.payload())),
            Ok(None) => {
                if client.is_closed() {
                    return;
                }
                on(Change::Reconcile);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the LISTEN connection failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_what_changed() {
        assert_eq!(Change::parse("state"), Change::State);
        assert_eq!(
            Change::parse("rollout:api-3"),
            Change::Rollout("api-3".into())
        );
        assert_eq!(Change::parse("rollout:a:b"), Change::Rollout("a:b".into()));
        assert_eq!(Change::parse("something else"), Change::Reconcile);
    }
}
