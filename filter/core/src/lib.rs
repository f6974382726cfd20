//! `understudy-core`: everything the Understudy filter decides, as plain Rust.
//!
//! This crate has no proxy-wasm or tokio dependency. It builds natively (where
//! its unit and property tests run) and for `wasm32-wasip1` (inside the filter).
//! The `understudy-filter` crate forwards Envoy's host events into it and
//! carries out what comes back; the control plane uses it to validate filter
//! configuration before pushing it, so both sides agree on what is valid.
//!
//! # Layout
//! - [`compare`]: comparing a primary and a shadow response (dark launches):
//!   field-level JSON differences, bucketed as serious or noise.
//! - [`config`]: the JSON configuration, parsed into validated types.
//! - [`dedupe`]: suppressing duplicate requests by `Idempotency-Key`.
//! - [`hedge`]: hedged requests: eligibility, adaptive delay, budget, and the
//!   per-worker stream table as a state machine.
//! - [`ratelimit`]: adaptive per-tenant rate limits: identity, tiers, buckets,
//!   AIMD adaptation, the bounded tenant table, IETF RateLimit headers.
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
pub mod ratelimit;
pub mod shadow;
pub mod stats;

pub use config::{ConfigError, FilterConfig};
