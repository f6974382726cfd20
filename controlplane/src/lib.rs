//! `understudy-controlplane`: serves Envoy over ADS and gives operators a JSON
//! API over the desired state (services, canary weights, the filter).
//!
//! Start at [`run`]: it takes two bound listeners (xDS gRPC and the HTTP API)
//! and a shutdown signal. The `understudy` binary (`src/main.rs`) only parses
//! arguments and calls it, or talks to a running control plane ([`cli`]).
//!
//! # Layout
//! - [`model`]: the desired state and its validation.
//! - [`store`]: where the desired state lives; every change is validated,
//!   translated and published as a snapshot, or rejected with nothing changed.
//! - [`resources`]: desired state → Envoy resources (CDS, EDS, LDS, RDS, ECDS).
//! - [`xds`]: the ADS server: per-stream protocol state, ACK/NACK tracking.
//! - [`api`]: the axum JSON API.
//! - [`cli`]: the `understudy` command's client side.

pub mod api;
pub mod cli;
pub mod model;
pub mod resources;
pub mod store;
pub mod xds;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use crate::model::{DesiredState, ModelError};
use crate::store::Store;
use crate::xds::{AdsServer, Registry};

/// Why the control plane could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    /// The state is well-formed but invalid.
    #[error("invalid desired state: {0}")]
    Invalid(#[from] ModelError),
    #[error("xDS server failed: {0}")]
    Xds(#[from] tonic::transport::Error),
    #[error("API server failed: {0}")]
    Api(std::io::Error),
}

/// Reads and validates a desired-state file (JSON, the shape of [`DesiredState`]).
pub fn load_state(path: &Path) -> Result<DesiredState, RunError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RunError::Read {
        path: shown.clone(),
        source,
    })?;
    let state: DesiredState =
        serde_json::from_str(&text).map_err(|source| RunError::Parse { path: shown, source })?;
    state.validate()?;
    Ok(state)
}

/// Runs the xDS server and the API until `shutdown` completes or either fails.
pub async fn run(
    initial: DesiredState,
    xds_listener: TcpListener,
    api_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let store = Store::new(initial)?;
    let registry = Arc::new(Registry::default());
    let ads = AdsServer::new(store.subscribe(), Arc::clone(&registry));
    let app = api::router(api::ApiState {
        store,
        registry,
    });
    info!(xds = ?xds_listener.local_addr().ok(), api = ?api_listener.local_addr().ok(), "control plane listening");
    let xds = tonic::transport::Server::builder()
        // Envoy keeps one long-lived ADS stream; keepalives find dead peers.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(ads.into_service())
        .serve_with_incoming(TcpListenerStream::new(xds_listener));
    let api = axum::serve(api_listener, app);
    // Shutdown is abrupt on purpose: ADS streams never end by themselves, and
    // Envoy keeps serving its last config and reconnects when we are back.
    tokio::select! {
        r = xds => r?,
        r = api => r.map_err(RunError::Api)?,
        () = shutdown => info!("shutting down"),
    }
    Ok(())
}
