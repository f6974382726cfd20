//! The real control plane, run in-process on a runtime of its own so a test
//! can kill it (every socket closes at once, as with SIGKILL) and restart it
//! on the same ports from its state file.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use anyhow::{Context, Result};
use understudy_controlplane::Options;
use understudy_controlplane::api::auth::{Auth, Limits};
use understudy_controlplane::model::{DesiredState, MeshClusters};
use understudy_controlplane::rollout::store::RolloutStore;
use understudy_controlplane::store::Store;
use understudy_controlplane::tls::{CertDir, XdsSecurity, XdsTls};

use crate::wait;

/// The API tokens every harness control plane accepts.
pub const OPERATOR_TOKEN: &str = "e2e-operator-0123456789";
pub const VIEWER_TOKEN: &str = "e2e-viewer-0123456789";
/// The actor names those tokens carry (recorded in audit logs).
pub const OPERATOR: &str = "e2e-operator";
pub const VIEWER: &str = "e2e-viewer";

pub struct ControlPlane {
    pub xds: SocketAddr,
    pub api: SocketAddr,
    /// The CA, the server certificate and the Envoys' client certificates
    /// (made by the library's `certs init`); the xDS port is mutual TLS.
    pub certs: CertDir,
    state_file: PathBuf,
    rollouts_file: PathBuf,
    mesh: Mesh,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

/// How a control plane in an Istio mesh differs from our own-ADS one.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    /// The xDS port's TLS instead of [`ControlPlane::certs`]' (the mesh's
    /// workload certificate, its root, and the trust domain accepted).
    pub xds_tls: Option<XdsTls>,
    /// The subset clusters the Store accepts as shadow and hedge targets.
    pub clusters: MeshClusters,
}

impl ControlPlane {
    /// Writes `state` to a fresh state file and starts on free loopback ports.
    pub async fn start(state: &DesiredState) -> Result<Self> {
        Self::start_in(state, Mesh::default()).await
    }

    /// [`ControlPlane::start`] as Istio mode runs it ([`Mesh`]).
    pub async fn start_in(state: &DesiredState, mesh: Mesh) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let state_file = dir.path().join("state.json");
        let rollouts_file = dir.path().join("rollouts.redb");
        std::fs::write(&state_file, serde_json::to_vec_pretty(state)?)?;
        let certs = understudy_controlplane::tls::init(
            &dir.path().join("certs"),
            &[],
            &[],
            std::time::SystemTime::now(),
        )?;
        let xds = std::net::TcpListener::bind("127.0.0.1:0")?;
        let api = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut cp = Self {
            xds: xds.local_addr()?,
            api: api.local_addr()?,
            certs,
            state_file,
            rollouts_file,
            mesh,
            runtime: None,
            _dir: dir,
        };
        cp.serve(xds, api).await?;
        Ok(cp)
    }

    /// `node`'s client certificate and key, issued on first use.
    pub fn envoy_cert(&self, node: &str) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = (self.certs.envoy_cert(node), self.certs.envoy_key(node));
        if cert.exists() && key.exists() {
            return Ok((cert, key));
        }
        Ok(understudy_controlplane::tls::issue_envoy(
            &self.certs.dir,
            node,
            std::time::SystemTime::now(),
        )?)
    }

    /// The desired state file the control plane starts from (an operator
    /// may edit it while it is stopped).
    pub fn state_file(&self) -> &std::path::Path {
        &self.state_file
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Stops abruptly: the runtime is dropped with every task and socket.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Starts again on the same ports, from the state file (as the binary does).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let xds = Self::rebind(self.xds)
            .await
            .context("rebinding the xDS port")?;
        let api = Self::rebind(self.api)
            .await
            .context("rebinding the API port")?;
        self.serve(xds, api).await
    }

    /// Binds `addr` again. A killed runtime closes its listeners on its
    /// worker threads as they stop, so the port may still be taken for a
    /// moment: retry, with a deadline (waiting on the test's runtime, never
    /// blocking one of its threads).
    async fn rebind(addr: SocketAddr) -> Result<std::net::TcpListener> {
        wait::until(
            &format!("{addr} to be free again"),
            Duration::from_secs(10),
            || async move { Ok(Some(std::net::TcpListener::bind(addr)?)) },
        )
        .await
    }

    async fn serve(
        &mut self,
        xds: std::net::TcpListener,
        api: std::net::TcpListener,
    ) -> Result<()> {
        xds.set_nonblocking(true)?;
        api.set_nonblocking(true)?;
        let store = Store::open_in(&self.state_file, self.mesh.clusters.clone())?;
        // Probes go through the test's Envoy, which listens on loopback at
        // the state's listener port.
        let probe_via = Some(SocketAddr::new(
            "127.0.0.1".parse()?,
            store.current().listener.port,
        ));
        let xds_tls = match &self.mesh.xds_tls {
            Some(tls) => tls.clone(),
            None => XdsTls::from_dir(&self.certs.dir)?,
        };
        let xds_security = XdsSecurity::Mtls(xds_tls);
        let rollouts = self.open_rollouts().await?;
        let auth = Auth::from_entries(
            &format!("{OPERATOR}:operator:{OPERATOR_TOKEN},{VIEWER}:viewer:{VIEWER_TOKEN}"),
            Limits::default(),
        )?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("controlplane")
            .enable_all()
            .build()?;
        runtime.spawn(async move {
            let xds = tokio::net::TcpListener::from_std(xds)?;
            let api = tokio::net::TcpListener::from_std(api)?;
            let options = Options {
                auth,
                rollouts: Some(rollouts),
                xds_security,
                api_tls: None,
                probe_via,
                replicas: None,
                ads_limits: None,
            };
            understudy_controlplane::run_with(store, options, xds, api, std::future::pending())
                .await?;
            anyhow::Ok(())
        });
        self.runtime = Some(runtime);
        Ok(())
    }
}

impl ControlPlane {
    /// Opens the rollout database. A killed runtime drops its tasks (and
    /// the database they hold) on its worker threads as they stop, so the
    /// file may still be locked for a moment: wait for it, with a deadline.
    async fn open_rollouts(&self) -> Result<RolloutStore> {
        let file = &self.rollouts_file;
        wait::until(
            "the rollout database to open",
            Duration::from_secs(10),
            || async move { Ok(Some(RolloutStore::open(file)?)) },
        )
        .await
        .context("opening the rollout database")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}
