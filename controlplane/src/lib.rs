//! `understudy-controlplane`: serves Envoy over ADS and gives operators a JSON
//! API over the desired state (services, canary weights, the filter).
//!
//! Start at [`run`]: it takes the [`store::Store`], two bound listeners (xDS gRPC and the HTTP API)
//! and a shutdown signal. The `understudy` binary (`src/main.rs`) only parses
//! arguments and calls it, or talks to a running control plane ([`cli`]).
//!
//! # Layout (by area; imports point down this list, never up)
//! - [`ui`]: the release dashboard under `/ui/` (server-rendered, session
//!   cookie from an API token).
//! - [`api`]: the axum JSON API: router, errors, bearer-token auth, one
//!   file per resource (services, filter, envoys, rate limits, shadow,
//!   rollouts).
//! - [`notify`]: webhooks for rollout events (signed, retried, recorded
//!   in the audit log), behind the [`rollout::events::Notifier`] port.
//! - [`cli`]: the `understudy` command's client side.
//! - [`metrics`]: the control plane's own counters (xDS, API) behind
//!   `GET /metrics`; state gauges are built from their owners per scrape.
//! - [`rollout`]: canary rollouts: the spec, the judge (statistics), the
//!   pure state machine, and the engine that persists and applies it.
//! - [`evidence`]: what the data plane measured (Envoy's stats stream, the
//!   filter's shadow and usage reports, replay) and the
//!   [`evidence::EvidenceSource`] port rollouts read it through.
//! - [`traffic`]: the [`traffic::TrafficRouter`] port: set a service's
//!   canary weight or a route's shadow, read back what the data plane applied.
//! - `istio` (feature `istio`): `IstioRouter`, the router over the
//!   Kubernetes API (VirtualService weights, WasmPlugin filter config).
//! - [`xds`]: the ADS server, the desired state → Envoy resources
//!   translation, and [`xds::router::AdsRouter`], the router over them.
//! - [`store`]: where the desired state lives; every change is validated,
//!   translated and published as a snapshot, or rejected with nothing changed.
//! - [`model`]: the desired state and its validation.
//! - [`tls`]: certificates (`understudy certs`), mutual TLS on the xDS port
//!   with each Envoy's node id bound to its certificate, and TLS for the API.
//! - [`time`]: Unix milliseconds, the one time helper.

pub mod api;
pub mod cli;
pub mod evidence;
#[cfg(feature = "istio")]
pub mod istio;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod outbound;
pub mod pg;
pub mod probes;
pub mod replicas;
pub mod rollout;
pub mod store;
pub mod time;
pub mod tls;
pub mod traffic;
pub mod ui;
pub mod xds;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use crate::store::Store;
use crate::xds::{AdsServer, Registry};

/// Why the control plane stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("xDS server failed: {0}")]
    Xds(#[from] tonic::transport::Error),
    #[error("API server failed: {0}")]
    Api(std::io::Error),
    #[error("xDS TLS: {0}")]
    XdsTls(#[from] tls::TlsError),
    #[error("API TLS certificate or key: {0}")]
    ApiTls(std::io::Error),
    #[error(transparent)]
    Rollouts(#[from] rollout::store::RolloutStoreError),
    #[error("loading rollouts: {0}")]
    Engine(#[from] rollout::engine::EngineError),
    #[error("HTTP client (webhooks, Prometheus): {0}")]
    Webhooks(String),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("replicas: {0}")]
    Replicas(#[from] pg::PgError),
    #[error("replicas run with our own ADS only, not with --router istio")]
    ReplicasNeedAds,
    #[error("ADS limits: {0}")]
    AdsLimits(String),
}

/// How often the engine looks for rollouts due an evaluation (each
/// rollout's own `analysis.interval_s` decides when it is judged).
pub const ENGINE_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// How often a rollout's Prometheus queries run (a typical scrape interval
/// is longer; the 1 s stats flush is the comparison).
pub const PROMETHEUS_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// In a mesh: a sidecar that reported usage within this window shares the
/// fleet-wide tenant rates, recounted every [`MESH_FLEET_PERIOD`].
pub const MESH_FLEET_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);
pub const MESH_FLEET_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// What the control plane runs with beyond its desired state.
#[derive(Debug)]
pub struct Options {
    /// Who may call the API.
    pub auth: api::auth::Auth,
    /// The rollout database; `None` keeps rollouts in memory only.
    pub rollouts: Option<rollout::store::RolloutStore>,
    /// Mutual TLS on the xDS port, or (explicitly) none.
    pub xds_security: tls::XdsSecurity,
    /// Serve the API over TLS with this certificate; `None`: plain HTTP.
    pub api_tls: Option<tls::ApiTls>,
    /// The Envoy listener synthetic probes are sent through (`serve
    /// --probe-via`); `None`: no probes, and rollouts declaring them are
    /// refused.
    pub probe_via: Option<std::net::SocketAddr>,
    /// Run as one of several replicas on a shared database (the store must
    /// be [`Store::open_shared`] on it); `None`: alone.
    pub replicas: Option<replicas::ReplicaOptions>,
    /// The ADS port's stream cap and new-stream rate; `None`: the defaults
    /// ([`xds::server::DEFAULT_MAX_ADS_STREAMS`], [`xds::admission`]).
    pub ads_limits: Option<AdsLimits>,
}

/// `serve --max-ads-streams`, `--ads-admission-rate`, `--ads-admission-burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdsLimits {
    pub max_streams: usize,
    pub admission_per_second: u32,
    pub admission_burst: u32,
}

impl Default for Options {
    /// No authentication, plaintext xDS and in-memory rollouts: for
    /// in-process tests that are not about them. The `understudy serve`
    /// binary never starts like this without `--insecure-plaintext-xds`.
    fn default() -> Self {
        Self {
            auth: api::auth::Auth::disabled(),
            rollouts: None,
            xds_security: tls::XdsSecurity::InsecurePlaintext,
            api_tls: None,
            probe_via: None,
            replicas: None,
            ads_limits: None,
        }
    }
}

/// [`run_with`] default [`Options`] (no API authentication).
pub async fn run(
    store: Store,
    xds_listener: TcpListener,
    api_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with(
        store,
        Options::default(),
        xds_listener,
        api_listener,
        shutdown,
    )
    .await
}

/// Runs the xDS server and the API until `shutdown` completes or either fails.
pub async fn run_with(
    store: Store,
    options: Options,
    xds_listener: TcpListener,
    api_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_router(store, options, None, xds_listener, api_listener, shutdown).await
}

/// [`run_with`], with rollouts moving traffic through `router` instead of
/// our own ADS (`None`): Istio mode. Evidence still comes from Envoy's
/// stats stream and the filter's reports.
pub async fn run_with_router(
    store: Store,
    options: Options,
    router: Option<Arc<dyn traffic::TrafficRouter>>,
    xds_listener: TcpListener,
    api_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let registry = Arc::new(Registry::default());
    let usage = Arc::new(evidence::usage::UsageBook::default());
    let shadow = Arc::new(evidence::shadow::ShadowBook::default());
    // A replica ships what its Envoys report (a tapped book, an outbox).
    let report_outbox = Arc::new(evidence::usage::ReportOutbox::default());
    let metrics = Arc::new(match options.replicas {
        Some(_) => evidence::envoy_stats::MetricsBook::tapped(),
        None => evidence::envoy_stats::MetricsBook::default(),
    });
    // One rustls crypto backend (ring) for the API's TLS; tonic picks its own.
    // An error only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rollouts = match options.rollouts {
        Some(db) => db,
        None => rollout::store::RolloutStore::in_memory()?,
    };
    let sources = rollout::engine::Sources {
        metrics: Arc::clone(&metrics),
        shadow: Arc::clone(&shadow),
        registry: Arc::clone(&registry),
    };
    // In a mesh, istiod (not our ADS) serves the proxies.
    let in_mesh = router.is_some();
    // Replicas: the lease, given up on a clean shutdown.
    let mut leadership = None;
    let mut shadow_resets = None;
    // Every stored rollout resumes where it was.
    let engine = Arc::new(match (router, &options.replicas) {
        (None, None) => rollout::engine::Engine::new(store.clone(), rollouts, sources)?,
        (None, Some(replica)) => {
            // Only the lease holder decides; its writes carry its term.
            let started = replicas::start(
                replica,
                Arc::clone(&metrics),
                (Arc::clone(&report_outbox), Arc::clone(&shadow)),
            )?;
            shadow.follow(store.clone());
            let engine = rollout::engine::Engine::standby(
                Arc::new(xds::router::AdsRouter::new(
                    store.fenced(Arc::clone(&started.fence)),
                    Arc::clone(&registry),
                )),
                Arc::new(evidence::EnvoyEvidence::new(
                    started.fleet,
                    Arc::clone(&shadow),
                )),
                started.rollouts,
            )?;
            let _ = engine.lead_with(started.leader);
            leadership = Some(started.leadership);
            shadow_resets = Some(started.resets);
            engine
        }
        (Some(_), Some(_)) => return Err(RunError::ReplicasNeedAds),
        (Some(router), None) => {
            // Reports are judged against the config this control plane holds.
            shadow.follow(store.clone());
            // The sidecars' stats arrive under the mesh's cluster names.
            let naming = Arc::clone(&router);
            let evidence = evidence::EnvoyEvidence::new(Arc::clone(&metrics), Arc::clone(&shadow))
                .with_naming(move |service| naming.data_plane_clusters(service));
            rollout::engine::Engine::with_ports(router, Arc::new(evidence), rollouts)?
        }
    });
    // Webhook outcomes go to the rollout's audit log; the notifier must
    // not keep the engine alive, hence the weak reference.
    let weak = Arc::downgrade(&engine);
    let recorder: notify::Recorder = Arc::new(move |id: &str, entry| {
        if let Some(engine) = weak.upgrade()
            && let Err(e) = engine.record_audit(id, &entry)
        {
            tracing::warn!(rollout = id, error = %e, "webhook outcome not recorded");
        }
    });
    let webhooks = notify::Webhooks::new(notify::RetryPolicy::default(), recorder)
        .map_err(|e| RunError::Webhooks(e.to_string()))?;
    let _ = engine.notify_with(Arc::new(webhooks));
    let prometheus = evidence::prometheus::PrometheusEvidence::new(PROMETHEUS_POLL)
        .map_err(|e| RunError::Webhooks(e.to_string()))?;
    let _ = engine.read_prometheus_with(Arc::new(prometheus));
    if let Some(via) = options.probe_via {
        let runner = probes::ProbeRunner::new(via, store.clone())
            .map_err(|e| RunError::Webhooks(e.to_string()))?;
        tokio::spawn(runner.clone().run());
        let _ = engine.probe_with(Arc::new(runner));
    }
    if let Some(replica) = &options.replicas {
        replicas::follow(replica, store.clone(), Arc::downgrade(&engine));
    }
    tokio::spawn(Arc::clone(&engine).run(ENGINE_PERIOD));
    // The control plane's own counters (`GET /metrics`), shared by the xDS
    // server and the API.
    let own_metrics = Arc::new(metrics::Metrics::new()?);
    let mut ads = AdsServer::new(
        store.subscribe(),
        Arc::clone(&registry),
        Arc::clone(&own_metrics),
    );
    if let Some(limits) = options.ads_limits {
        let admission =
            xds::admission::Admission::new(limits.admission_per_second, limits.admission_burst)
                .map_err(|e| RunError::AdsLimits(e.to_string()))?;
        ads = ads
            .with_caps(limits.max_streams, xds::server::MAX_ADS_STREAMS_PER_NODE)
            .with_admission(admission);
    }
    // Fleet-wide limits are shared among the proxies that enforce them:
    // the Envoys connected to our ADS, or in a mesh the sidecars that
    // reported usage lately (every one gets the same WasmPlugin config).
    let fleet_store = store.clone();
    if in_mesh {
        let usage = Arc::clone(&usage);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MESH_FLEET_PERIOD);
            loop {
                tick.tick().await;
                let since = std::time::SystemTime::now()
                    .checked_sub(MESH_FLEET_WINDOW)
                    .unwrap_or(std::time::UNIX_EPOCH);
                fleet_store.set_fleet_size(usage.reporters_since(since));
            }
        });
    } else if let Some(replica) = &options.replicas {
        // Every replica's Envoys share the limits, not this replica's alone.
        replicas::count_fleet(replica, registry.fleet(), fleet_store)?;
    } else {
        let mut fleet = registry.fleet();
        tokio::spawn(async move {
            while fleet.changed().await.is_ok() {
                let n = *fleet.borrow_and_update();
                fleet_store.set_fleet_size(n);
            }
        });
    }
    let app = api::router(api::ApiState {
        store,
        registry,
        usage: Arc::clone(&usage),
        shadow: Arc::clone(&shadow),
        shadow_resets,
        auth: Arc::new(options.auth),
        engine,
        metrics: own_metrics,
    });
    info!(xds = ?xds_listener.local_addr().ok(), api = ?api_listener.local_addr().ok(), xds_mtls = matches!(options.xds_security, tls::XdsSecurity::Mtls(_)), api_tls = options.api_tls.is_some(), "control plane listening");
    // Windows, stream limits and keepalives sized for many idle Envoys.
    let xds = crate::xds::server::tuned_transport(tonic::transport::Server::builder());
    // Our own TLS acceptor rather than tonic's: it re-reads a rotated
    // server certificate (tls::acceptor).
    let (tls_config, workloads) = match &options.xds_security {
        tls::XdsSecurity::Mtls(material) => (
            Some(tls::acceptor::server_config(material)?),
            material.istio_trust_domain.clone(),
        ),
        tls::XdsSecurity::InsecurePlaintext => (None, None),
    };
    let mtls = tls_config.is_some();
    let xds = xds
        // Every service learns who the peer is (its certificate's node id) from this.
        .layer(tonic::service::InterceptorLayer::new(
            tls::peer_interceptor(mtls, workloads),
        ))
        .add_service(ads.into_service())
        // Filters report on the same port they already reach for xDS.
        .add_service(
            match options.replicas {
                Some(_) => evidence::usage::Reports::new(usage, shadow).sharing(report_outbox),
                None => evidence::usage::Reports::new(usage, shadow),
            }
            .into_service(),
        )
        // Envoy's stats sink streams on the same port too (`understudy_xds`).
        .add_service(evidence::envoy_stats::MetricsSink::new(Arc::clone(&metrics)).into_service());
    let xds = async move {
        match tls_config {
            Some(config) => {
                xds.serve_with_incoming(tls::acceptor::incoming(xds_listener, config))
                    .await
            }
            None => {
                xds.serve_with_incoming(TcpListenerStream::new(xds_listener))
                    .await
            }
        }
    };
    let api = async move {
        match options.api_tls {
            // The peer's address reaches the auth layer (`ConnectInfo`), so
            // failed logins are limited per peer rather than for everyone.
            None => axum::serve(
                api_listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .map_err(RunError::Api),
            Some(material) => {
                let config = axum_server::tls_rustls::RustlsConfig::from_pem(
                    material.cert_pem,
                    material.key_pem,
                )
                .await
                .map_err(RunError::ApiTls)?;
                let listener = api_listener.into_std().map_err(RunError::Api)?;
                axum_server::from_tcp_rustls(listener, config)
                    .serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
                    .await
                    .map_err(RunError::Api)
            }
        }
    };
    // Shutdown is abrupt on purpose: ADS streams never end by themselves, and
    // Envoy keeps serving its last config and reconnects when we are back.
    tokio::select! {
        r = xds => r?,
        r = api => r?,
        () = shutdown => info!("shutting down"),
    }
    // A follower takes over at once rather than after the lease.
    if let Some(leadership) = leadership {
        leadership.step_down();
    }
    Ok(())
}
