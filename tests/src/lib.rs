//! `understudy-e2e`: the end-to-end harness, and the project's task runner.
//!
//! The tests in `tests/tests/` start a real Envoy 1.40 (V8) with the real
//! filter `.wasm`, the real control plane and programmable upstreams on
//! loopback, and wait on conditions (never sleeps). Start with [`stack::Stack`].
//!
//! # Layout
//! - [`paths`]: where Envoy, the `.wasm` and the configs are; the setup hint.
//! - [`envoy`]: one Envoy process (config rendering, admin API, log on failure).
//! - [`controlplane`]: the control plane in-process, killable and restartable.
//! - [`mesh`]: a stand-in for istiod's CA (workload certificates for Istio mode).
//! - [`cp_process`]: the `understudy` binary as its own process (SIGKILL, SIGSTOP).
//! - [`upstream`]: the programmable upstream (also the `understudy-upstream` binary).
//! - [`process`]: child processes killed on drop.
//! - [`prometheus`]: a real Prometheus scraping the stack, its query API, and `promtool`.
//! - [`traffic`]: client load and its tally.
//! - [`oci`]: the filter as an OCI image (`cargo xtask package`), push and pull, Istio's extraction rules.
//! - [`registry`]: a real OCI registry (Debian `docker-registry`) on loopback.
//! - [`database`]: a real PostgreSQL (Debian's server, `initdb` in a temporary directory) for replicas.
//! - [`stack`]: all of the above wired together.
//! - [`rollouts`]: rollouts through the API: create, read, follow to the end.
//! - [`wait`]: condition waits with deadlines.
//! - [`browser`]: headless Chromium over WebDriver, for the dashboard's pages.
//! - [`k8s`]: the Kubernetes/Istio manifests rendered (kustomize) and validated offline.
//! - [`xds_scenarios`]: the e2e xDS scenarios, run once per ADS flavour (state of the world, delta).
//! - [`bench`]: benchmark scenarios (`cargo xtask bench`).
//!
//! The `xtask` binary (`cargo xtask ...`) sets up, tests, demos and benchmarks.

pub mod bench;
pub mod browser;
pub mod controlplane;
pub mod cp_process;
pub mod database;
pub mod envoy;
pub mod k8s;
pub mod mesh;
pub mod oci;
pub mod paths;
pub mod process;
pub mod prometheus;
pub mod registry;
pub mod rollouts;
pub mod stack;
pub mod traffic;
pub mod upstream;
pub mod wait;
pub mod xds_scenarios;
