//! A stand-in for istiod's CA: the mesh's root, the control plane's workload
//! certificate and the sidecars', at the paths Istio mounts them
//! (`/etc/certs/`) in `envoy/istio-like-bootstrap.yaml`, so the e2e tests
//! run the control plane as `serve --istio-trust-domain cluster.local`
//! does with istio-agent's OUTPUT_CERTS.

use std::path::PathBuf;

use anyhow::Result;
use understudy_controlplane::tls::XdsTls;
use understudy_controlplane::tls::test_ca::TestCa;

/// The mesh's trust domain (Istio's default).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The control plane's workload identity (namespace `understudy-system`,
/// service account `understudy`), which sidecars check.
pub const CONTROL_PLANE_IDENTITY: &str =
    "spiffe://cluster.local/ns/understudy-system/sa/understudy";
/// Where the bootstrap names a sidecar's certificate, key and the root.
pub const SIDECAR_CERT: &str = "/etc/certs/cert-chain.pem";
pub const SIDECAR_KEY: &str = "/etc/certs/key.pem";
pub const ROOT_CERT: &str = "/etc/certs/root-cert.pem";

pub struct MeshCerts {
    ca: TestCa,
    pub root: PathBuf,
    pub control_plane: (PathBuf, PathBuf),
    dir: tempfile::TempDir,
}

impl MeshCerts {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("istiod");
        let root = dir.path().join("root-cert.pem");
        std::fs::write(&root, &ca.cert_pem)?;
        let control_plane = ca
            .leaf(&[CONTROL_PLANE_IDENTITY])
            .write(dir.path(), "understudy");
        Ok(Self {
            ca,
            root,
            control_plane,
            dir,
        })
    }

    /// A workload certificate for service account `sa` in `namespace`.
    pub fn workload(&self, namespace: &str, sa: &str) -> (PathBuf, PathBuf) {
        self.ca
            .leaf(&[&format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}")])
            .write(self.dir.path(), &format!("{namespace}-{sa}"))
    }

    /// The control plane's xDS TLS in the mesh: its workload certificate,
    /// the mesh's root for clients, and the trust domain accepted.
    pub fn xds_tls(&self) -> Result<XdsTls> {
        Ok(
            XdsTls::from_files(&self.control_plane.0, &self.control_plane.1, &self.root)?
                .accepting_istio_workloads(TRUST_DOMAIN.parse().map_err(anyhow::Error::msg)?),
        )
    }

    /// The bootstrap's certificate paths, pointed at `workload`'s files.
    pub fn sidecar_replacements(
        &self,
        workload: &(PathBuf, PathBuf),
    ) -> Vec<(&'static str, String)> {
        vec![
            (SIDECAR_CERT, workload.0.display().to_string()),
            (SIDECAR_KEY, workload.1.display().to_string()),
            (ROOT_CERT, self.root.display().to_string()),
        ]
    }
}
