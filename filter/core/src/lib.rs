//! `understudy-core`: everything the Understudy filter decides, as plain Rust.
//!
//! This crate has no proxy-wasm or tokio dependency. It builds natively (where
//! its unit and property tests run) and for `wasm32-wasip1` (inside the filter).
//! The `understudy-filter` crate forwards Envoy's host events into it and
//! carries out what comes back; the control plane uses it to validate filter
//! configuration before pushing it, so both sides agree on what is valid.
//!
//! # Layout
//! Three bottom modules hold what every feature shares; they import nothing
//! from this crate, so the features never reach into each other (or into
//! `config`, which gathers them) for a rule:
//! - [`rules`]: [`ConfigError`] and the rule for names used in stat names.
//! - [`http`]: header-name syntax, replayable response headers, and the
//!   framed hash stable keys are made of.
//! - [`report`]: when a report is due, and the bounded outbox of report
//!   batches (in flight, to retry, dropped).
//!
//! The features, each with its config's `from_raw`:
//! - [`compare`]: comparing a primary and a shadow response (dark launches):
//!   field-level JSON differences, bucketed as serious or noise.
//! - [`config`]: the JSON configuration, parsed into validated types.
//! - [`dedupe`]: suppressing duplicate requests by `Idempotency-Key`.
//! - [`hedge`]: hedged requests: eligibility, adaptive delay, budget, and the
//!   per-worker stream table as a state machine.
//! - [`ratelimit`]: adaptive per-tenant rate limits: identity, tiers, buckets,
//!   AIMD adaptation, the bounded tenant table, IETF RateLimit headers.
//! - [`segment`]: traffic segments (`segment_by`): a request's bounded,
//!   safe label and the capped per-segment tally.
//! - [`shadow`]: shadow copies: sampling, the pair table, and report batches.
//! - [`stats`]: the names of the metrics the filter defines, shared with the
//!   tests and the control plane so nobody spells them twice.

// This code runs inside Envoy's wasm VM, where a panic kills the VM.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod compare;
pub mod config;
pub mod dedupe;
pub mod hedge;
pub mod http;
pub mod ratelimit;
pub mod report;
pub mod rules;
pub mod segment;
pub mod shadow;
pub mod stats;

pub use config::FilterConfig;
pub use rules::ConfigError;
