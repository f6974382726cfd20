//! Fault injection for end-to-end tests of Envoy's failure handling
//! (`tests/tests/failure_policy.rs`). Compiled only with the
//! `fault-injection` feature, which the shipped `.wasm` never has: `cargo
//! xtask setup` builds this variant into its own target directory
//! (`target/fault/`), so it cannot overwrite the production module.
//!
//! The production filter never fails on traffic or on a config the control
//! plane accepted, so these hooks make both happen on demand:
//! - a request with [`TRAP_HEADER`]` = trap` traps the VM (a wasm
//!   `unreachable`, as a Rust panic would), so Envoy's `failure_policy`
//!   decides what happens to it and to the requests after it;
//! - a config whose `stat_prefix` is [`REJECTED_STAT_PREFIX`] is refused by
//!   `on_configure`, so Envoy NACKs it, as it would a config the filter
//!   cannot run.

use proxy_wasm::types::LogLevel;

use crate::host::Host;

/// The request header that traps the VM (value `trap`). Not an
/// `x-understudy-*` header: those are stripped before anything else runs.
pub const TRAP_HEADER: &str = "x-fault-injection";

/// A `stat_prefix` (valid for the control plane) that `on_configure` refuses.
pub const REJECTED_STAT_PREFIX: &str = "fault_injection_reject";

/// Traps the VM if the request asks for it.
pub fn on_request_headers(host: &dyn Host) {
    if host.request_header(TRAP_HEADER).as_deref() == Some("trap") {
        host.log(
            LogLevel::Warn,
            "understudy: fault injection: trapping the VM",
        );
        trap();
    }
}

/// Whether `on_configure` must refuse this config.
pub fn rejects(config: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(config)
        .is_ok_and(|c| c["stat_prefix"] == REJECTED_STAT_PREFIX)
}

/// Ends the VM the way a panic under `panic = "abort"` does: a wasm trap.
#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

/// Natively (unit tests of the glue) there is no VM to trap: the process ends.
#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}
