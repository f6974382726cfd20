//! A real OCI registry for the tests: the Debian package's `docker-registry`
//! (the CNCF distribution registry 2.8, unpacked by `cargo xtask setup`, see
//! [`paths::docker_registry`]) on a free loopback port, plain HTTP, no
//! authentication, storing into a temporary directory, killed on drop.
//!
//! ```ignore
//! let registry = Registry::start().await?;
//! let client = oci::RegistryClient::new(&registry.host(), true)?;
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::ChildGuard;
use crate::{paths, stack, wait};

/// How long the registry may take to start answering `GET /v2/`.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

pub struct Registry {
    pub addr: SocketAddr,
    log: PathBuf,
    // Dropped in this order: the process first, then its storage.
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the registry and waits until `GET /v2/` answers 200 (the
    /// distribution API's version check), failing with its log after
    /// [`START_DEADLINE`].
    pub async fn start() -> Result<Self> {
        let bin = paths::docker_registry()?;
        let dir = tempfile::tempdir()?;
        let port = stack::free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        // The package's own config turns on htpasswd auth and a storage
        // health check; this one has neither, and stores under `dir`.
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            serde_json::to_string(&dir.path().join("data").display().to_string())?
        );
        let config_file = dir.path().join("config.yml");
        std::fs::write(&config_file, config)?;
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let registry = Self {
            addr,
            log,
            _child: ChildGuard::new(child),
            _dir: dir,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("http://{addr}/v2/");
        wait::until("the registry to answer GET /v2/", START_DEADLINE, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                Ok(http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                    .then_some(()))
            }
        })
        .await
        .with_context(|| format!("registry log:\n{}", registry.log()))?;
        Ok(registry)
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// What the registry logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
