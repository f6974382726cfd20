//! How fast new ADS streams are admitted.
//!
//! When the control plane restarts (or a network blip ends), every Envoy
//! reconnects at once. Each new stream costs a task, a registry entry and a
//! full initial push; thousands in the same instant would make everyone wait
//! on everyone. A token bucket admits a steady rate with a burst on top; a
//! stream over the rate is refused with `Unavailable`, which Envoy treats
//! like a failed connection and retries after its own jittered backoff, so
//! the stampede is spread out by the clients themselves.
//!
//! The bucket guards the ADS stream only: a TLS handshake before it is
//! already paid (tonic's acceptor), but it is the cheaper part of a reconnect.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tonic::Status;
use tracing::debug;

/// New ADS streams admitted per second, sustained. A full initial push is a
/// few KB and a few hundred microseconds of CPU: 1,000 a second keeps a
/// restart of 10,000 Envoys within ~10 s without starving running streams.
pub const DEFAULT_STREAMS_PER_SECOND: u32 = 1000;
/// New ADS streams admitted at once on top of the rate: a fleet of this
/// size reconnects with no refusal at all.
pub const DEFAULT_BURST: u32 = 2000;

/// A token bucket for new ADS streams, on `C`'s clock (tests use a fake one).
pub struct Admission<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

/// The bucket's shape was impossible (a zero rate or burst).
#[derive(Debug, thiserror::Error)]
#[error(
    "the ADS admission rate and burst must both be at least 1 (got {per_second}/s, burst {burst})"
)]
pub struct InvalidAdmission {
    pub per_second: u32,
    pub burst: u32,
}

impl Admission<DefaultClock> {
    pub fn new(per_second: u32, burst: u32) -> Result<Self, InvalidAdmission> {
        Self::with_clock(per_second, burst, DefaultClock::default())
    }
}

impl Default for Admission<DefaultClock> {
    fn default() -> Self {
        Self::new(DEFAULT_STREAMS_PER_SECOND, DEFAULT_BURST)
            .unwrap_or_else(|_| unreachable!("the defaults are non-zero"))
    }
}

impl<C: Clock> Admission<C> {
    pub fn with_clock(per_second: u32, burst: u32, clock: C) -> Result<Self, InvalidAdmission> {
        let err = InvalidAdmission { per_second, burst };
        let (Some(rate), Some(max_burst)) = (NonZeroU32::new(per_second), NonZeroU32::new(burst))
        else {
            return Err(err);
        };
        let quota = Quota::per_second(rate).allow_burst(max_burst);
        Ok(Self {
            limiter: RateLimiter::direct_with_clock(quota, clock),
        })
    }

    /// Takes a token for one new stream, or refuses it with `Unavailable`
    /// (retryable: Envoy backs off and comes back).
    pub fn admit(&self) -> Result<(), Status> {
        self.limiter.check().map_err(|_| {
            // Debug: a reconnect storm refuses thousands, each retried.
            debug!("ADS stream refused: new streams arrive faster than the admission rate");
            Status::unavailable("too many new ADS streams at once; retry after a backoff")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn a_burst_is_admitted_then_the_rate_and_refusals_are_retryable() {
        let clock = FakeRelativeClock::default();
        let a = Admission::with_clock(10, 5, clock.clone()).unwrap();
        for i in 0..5 {
            assert!(a.admit().is_ok(), "stream {i} of the burst");
        }
        let refused = a.admit().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        // 10 per second: one more every 100 ms, no more.
        clock.advance(Duration::from_millis(100));
        assert!(a.admit().is_ok());
        assert!(a.admit().is_err());
        // A quiet second refills the burst, not more.
        clock.advance(Duration::from_secs(10));
        let admitted = (0..20).filter(|_| a.admit().is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn a_zero_rate_or_burst_is_rejected() {
        assert!(Admission::new(0, 1).is_err());
        assert!(Admission::new(1, 0).is_err());
        assert!(Admission::new(1, 1).is_ok());
    }
}
