//! Webhooks: delivers rollout events (spec `notifications`) over HTTP,
//! signed, retried, and recorded in the rollout's audit log.
//!
//! - **Never in the engine's way.** [`Webhooks::notify`] only queues: one
//!   bounded queue and one delivery task per receiver URL, so a dead or
//!   slow receiver delays only its own later events. A full queue drops the
//!   event and records that it did.
//! - **In order.** A receiver gets a rollout's events in decision order:
//!   its task delivers one at a time, retries included.
//! - **Signed.** Every attempt carries `X-Understudy-Timestamp` (Unix
//!   seconds) and `X-Understudy-Signature: v1=<hex HMAC-SHA256(key,
//!   "<timestamp>.<body>")>`, the key read from the webhook's
//!   `secret_file` at each attempt (rotate it in place). A receiver checks
//!   the signature and refuses old timestamps (replays).
//!   `X-Understudy-Delivery` identifies the event across retries, for
//!   receivers that deduplicate.
//! - **Bounded retries.** Connection errors, timeouts, 429 and 5xx are
//!   retried with doubling backoff up to [`RetryPolicy::attempts`]; any
//!   other answer ends the delivery. Each outcome (delivered, failed and
//!   why) is appended to the rollout's audit log with actor `notifier`. The
//!   audit shows the receiver's origin only: a Slack webhook's path is its
//!   secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::warn;

use crate::rollout::events::{Notifier, RolloutEvent};
use crate::rollout::machine::AuditEntry;
use crate::rollout::spec::{Webhook, WebhookFormat};

/// Events waiting per receiver; more are dropped (and recorded).
pub const QUEUE: usize = 256;
/// Receivers with a delivery task at once; events for more are dropped.
pub const MAX_RECEIVERS: usize = 256;
/// The largest key read from a `secret_file`.
pub const MAX_KEY_BYTES: u64 = 4096;
/// The actor of delivery records in the audit log.
pub const NOTIFIER: &str = "notifier";

/// How hard a delivery tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The wait after the first failed attempt; it doubles after each.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// One attempt's limit, connecting included.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            timeout: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Where delivery outcomes go: `(rollout id, audit entry)`.
pub type Recorder = Arc<dyn Fn(&str, AuditEntry) + Send + Sync>;

/// The webhook [`Notifier`].
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    policy: RetryPolicy,
    record: Recorder,
    runtime: tokio::runtime::Handle,
    queues: Mutex<HashMap<String, mpsc::Sender<Job>>>,
}

struct Job {
    event: Arc<RolloutEvent>,
    hook: Webhook,
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub delivered: bool,
    pub attempts: u32,
    /// The last answer's status, if there was one.
    pub status: Option<u16>,
    /// Why it failed (the last attempt's reason).
    pub error: Option<String>,
}

impl Webhooks {
    /// Deliveries run on the current tokio runtime (call from within it).
    pub fn new(policy: RetryPolicy, record: Recorder) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                policy,
                record,
                runtime: tokio::runtime::Handle::current(),
                queues: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn queue(&self, url: &str) -> Option<mpsc::Sender<Job>> {
        let mut queues = self.inner.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get(url) {
            return Some(q.clone());
        }
        if queues.len() >= MAX_RECEIVERS {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        queues.insert(url.to_owned(), tx.clone());
        let inner = Arc::clone(&self.inner);
        self.inner.runtime.spawn(deliver_all(inner, rx));
        Some(tx)
    }

    fn dropped(&self, event: &RolloutEvent, hook: &Webhook, why: &str) {
        warn!(rollout = %event.rollout, receiver = %hook.origin(), why, "webhook event dropped");
        (self.inner.record)(
            &event.rollout,
            entry(
                event,
                hook,
                &Outcome {
                    delivered: false,
                    attempts: 0,
                    status: None,
                    error: Some(why.to_owned()),
                },
            ),
        );
    }
}

impl Notifier for Webhooks {
    fn notify(&self, event: RolloutEvent) {
        let event = Arc::new(event);
        for hook in &event.webhooks {
            let job = Job {
                event: Arc::clone(&event),
                hook: hook.clone(),
            };
            match self.queue(&hook.url) {
                Some(q) => {
                    if let Err(e) = q.try_send(job) {
                        let why = match e {
                            mpsc::error::TrySendError::Full(_) => "queue full",
                            mpsc::error::TrySendError::Closed(_) => "delivery stopped",
                        };
                        self.dropped(&event, hook, why);
                    }
                }
                None => self.dropped(&event, hook, "too many receivers"),
            }
        }
    }
}

async fn deliver_all(inner: Arc<Inner>, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.recv().await {
        let outcome = deliver(&inner.client, &inner.policy, &job.event, &job.hook).await;
        if !outcome.delivered {
            warn!(rollout = %job.event.rollout, receiver = %job.hook.origin(),
                  error = ?outcome.error, attempts = outcome.attempts, "webhook delivery failed");
        }
        (inner.record)(&job.event.rollout, entry(&job.event, &job.hook, &outcome));
    }
}

/// Delivers one event to one webhook, retrying as `policy` says.
pub async fn deliver(
    client: &reqwest::Client,
    policy: &RetryPolicy,
    event: &RolloutEvent,
    hook: &Webhook,
) -> Outcome {
    let body = body(event, hook.format);
    let delivery = format!("{}-{}-{}", event.rollout, event.at_ms, event.event.name());
    let mut outcome = Outcome {
        delivered: false,
        attempts: 0,
        status: None,
        error: None,
    };
    let attempts = policy.attempts.max(1);
    for n in 1..=attempts {
        outcome.attempts = n;
        let retry = match attempt(client, event, hook, &body, &delivery).await {
            Ok(status) => {
                outcome.status = Some(status);
                if (200..300).contains(&status) {
                    outcome.delivered = true;
                    outcome.error = None;
                    return outcome;
                }
                outcome.error = Some(format!("answered HTTP {status}"));
                status == 429 || status >= 500
            }
            Err(AttemptError::Key(e)) => {
                // The key can be fixed in place: worth another try.
                outcome.error = Some(e);
                true
            }
            Err(AttemptError::Send(e)) => {
                outcome.status = None;
                outcome.error = Some(e);
                true
            }
        };
        if !retry || n == attempts {
            break;
        }
        tokio::time::sleep(policy.backoff(n)).await;
    }
    outcome
}

enum AttemptError {
    Key(String),
    Send(String),
}

async fn attempt(
    client: &reqwest::Client,
    event: &RolloutEvent,
    hook: &Webhook,
    body: &[u8],
    delivery: &str,
) -> Result<u16, AttemptError> {
    let key = read_key(&hook.secret_file)
        .await
        .map_err(|e| AttemptError::Key(format!("secret_file {}: {e}", hook.secret_file)))?;
    let ts = crate::time::unix_ms(SystemTime::now()) / 1000;
    let signature = sign(&key, ts, body);
    let answer = client
        .post(&hook.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("x-understudy-event", event.event.name())
        .header("x-understudy-delivery", delivery)
        .header("x-understudy-timestamp", ts.to_string())
        .header("x-understudy-signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| AttemptError::Send(send_error(&e)))?;
    Ok(answer.status().as_u16())
}

/// reqwest's error without the URL (its path may be the secret).
fn send_error(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut cause = String::new();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

async fn read_key(path: &str) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut key = Vec::new();
    file.take(MAX_KEY_BYTES + 1)
        .read_to_end(&mut key)
        .await
        .map_err(|e| e.to_string())?;
    if key.len() as u64 > MAX_KEY_BYTES {
        return Err(format!("longer than {MAX_KEY_BYTES} bytes"));
    }
    while key.last().is_some_and(u8::is_ascii_whitespace) {
        key.pop();
    }
    if key.is_empty() {
        return Err("empty".to_owned());
    }
    Ok(key)
}

/// `v1=<hex HMAC-SHA256(key, "<ts>.<body>")>`.
pub fn sign(key: &[u8], ts: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The body a webhook of `format` receives.
pub fn body(event: &RolloutEvent, format: WebhookFormat) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Generic => serde_json::to_value(event).unwrap_or_default(),
        WebhookFormat::Slack => json!({
            "text": format!(
                "Rollout {} of {}: {} ({}, canary at {}%) by {}. {}",
                event.rollout,
                event.service,
                event.event.name().replace('_', " "),
                event.phase,
                event.weight,
                event.actor,
                event.reason
            )
        }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The audit entry recording one delivery's outcome.
fn entry(event: &RolloutEvent, hook: &Webhook, outcome: &Outcome) -> AuditEntry {
    let origin = hook.origin();
    let reason = if outcome.delivered {
        format!(
            "{} event delivered to {origin} (HTTP {}, attempt {})",
            event.event.name(),
            outcome.status.unwrap_or_default(),
            outcome.attempts
        )
    } else {
        format!(
            "{} event not delivered to {origin} after {} attempt(s): {}",
            event.event.name(),
            outcome.attempts,
            outcome.error.as_deref().unwrap_or("unknown")
        )
    };
    AuditEntry {
        time_ms: crate::time::unix_ms(SystemTime::now()),
        from: event.phase.clone(),
        to: event.phase.clone(),
        actor: NOTIFIER.to_owned(),
        reason,
        snapshot: json!({
            "webhook": origin,
            "event": event.event.name(),
            "delivered": outcome.delivered,
            "attempts": outcome.attempts,
            "status": outcome.status,
            "error": outcome.error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000]);
        assert_eq!(p.backoff(u32::MAX), p.max_backoff);
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 gives HMAC-SHA256("Jefe", "what do ya want
        // for nothing?"); here the message is "<ts>.<body>".
        let s = sign(b"Jefe", 0, b"what do ya want for nothing?");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("v1={hex}"));
        assert_ne!(sign(b"Jefe", 1, b"x"), sign(b"Jefe", 2, b"x"));
        assert_ne!(sign(b"Jefe", 1, b"x"), sign(b"Jeff", 1, b"x"));
    }
}
