//! The `understudy` binary: parse arguments, then hand over to the library.

use anyhow::Context;
use clap::Parser;
use understudy_controlplane::Options;
use understudy_controlplane::api::auth::{Auth, Limits};
use understudy_controlplane::cli::{
    Cli, Command, RouterPlan, certs, client_with_ca, traffic_router, xds_security,
};
use understudy_controlplane::pg::Db;
use understudy_controlplane::pg::lease::LeaseTiming;
use understudy_controlplane::replicas::ReplicaOptions;
use understudy_controlplane::rollout::store::RolloutStore;
use understudy_controlplane::tls::ApiTls;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            state,
            xds_addr,
            api_addr,
            tokens,
            insecure_no_auth,
            rollouts,
            tls_dir,
            tls_cert,
            tls_key,
            client_ca,
            insecure_plaintext_xds,
            istio_trust_domain,
            api_cert,
            api_key,
            router,
            istio_config,
            kubeconfig,
            probe_via,
            database,
            replica_name,
            advertise_api,
            lease_ms,
            max_ads_streams,
            ads_admission_rate,
            ads_admission_burst,
        } => {
            let files = match (&tls_cert, &tls_key, &client_ca) {
                (Some(c), Some(k), Some(a)) => Some((c.as_path(), k.as_path(), a.as_path())),
                _ => None,
            };
            let mut xds_security = xds_security(tls_dir.as_deref(), files, insecure_plaintext_xds)?;
            if let Some(td) = istio_trust_domain {
                match &mut xds_security {
                    understudy_controlplane::tls::XdsSecurity::Mtls(tls) => {
                        tls.istio_trust_domain = Some(td);
                    }
                    understudy_controlplane::tls::XdsSecurity::InsecurePlaintext => {
                        anyhow::bail!("--istio-trust-domain needs mutual TLS on the xDS port")
                    }
                }
            }
            let api_tls = match (api_cert, api_key) {
                (Some(cert), Some(key)) => {
                    Some(ApiTls::from_files(&cert, &key).context("loading the API certificate")?)
                }
                _ => None,
            };
            let auth = match (tokens, std::env::var("UNDERSTUDY_TOKENS").ok()) {
                (Some(file), _) => {
                    let text = understudy_controlplane::api::auth::read_token_file(&file)?;
                    Auth::from_entries(&text, Limits::default())
                        .with_context(|| format!("in {}", file.display()))?
                }
                (None, Some(entries)) => Auth::from_entries(&entries, Limits::default())
                    .context("in UNDERSTUDY_TOKENS")?,
                (None, None) if insecure_no_auth => {
                    tracing::warn!("the API is open: every caller is an operator");
                    Auth::disabled()
                }
                (None, None) => anyhow::bail!(
                    "no API tokens: pass --tokens FILE or set UNDERSTUDY_TOKENS \
                     (name:role:token entries), or --insecure-no-auth for a local trial"
                ),
            };
            let rollouts = rollouts.unwrap_or_else(|| {
                let mut p = state.clone().into_os_string();
                p.push(".rollouts.redb");
                p.into()
            });
            let plan = RouterPlan::read(router, istio_config.as_deref(), kubeconfig.as_deref())?;
            let (store, created, replicas) = match &database {
                Some(url) => {
                    let db = Db::connect(url, "state").context("connecting to --database")?;
                    let api = advertise_api.unwrap_or_else(|| format!("http://{api_addr}"));
                    let replica = ReplicaOptions {
                        db: db.another("setup"),
                        name: replica_name.unwrap_or_else(|| api.clone()),
                        api,
                        lease: LeaseTiming::of(std::time::Duration::from_millis(lease_ms)),
                    };
                    // The state file, if present, seeds an empty database only.
                    let store = understudy_controlplane::store::Store::open_shared(
                        db,
                        Some(&state),
                        plan.mesh_clusters(),
                    )?;
                    tracing::info!(replica = %replica.name, "a replica on the shared database");
                    (store, false, Some(replica))
                }
                None => {
                    let (store, created) =
                        understudy_controlplane::store::Store::open_or_create_in(
                            &state,
                            plan.mesh_clusters(),
                        )?;
                    (store, created, None)
                }
            };
            if created {
                tracing::info!(
                    state = %state.display(),
                    "no state file: starting with an empty desired state (listener 0.0.0.0:10000, \
                     filter at /etc/envoy/understudy_filter.wasm, no services) and created it; \
                     change it with `understudy` or the API"
                );
            }
            let router = traffic_router(plan, kubeconfig.as_deref(), &store).await?;
            let xds = tokio::net::TcpListener::bind(xds_addr).await?;
            let api = tokio::net::TcpListener::bind(api_addr).await?;
            let shutdown = shutdown_signal()?;
            // Replicas keep rollouts in the database; the redb file is not opened.
            let rollouts = match replicas {
                Some(_) => None,
                None => Some(
                    RolloutStore::open(&rollouts)
                        .with_context(|| format!("opening {}", rollouts.display()))?,
                ),
            };
            let options = Options {
                auth,
                rollouts,
                xds_security,
                api_tls,
                probe_via,
                replicas,
                ads_limits: Some(understudy_controlplane::AdsLimits {
                    max_streams: max_ads_streams,
                    admission_per_second: ads_admission_rate,
                    admission_burst: ads_admission_burst,
                }),
            };
            understudy_controlplane::run_with_router(store, options, router, xds, api, shutdown)
                .await?;
        }
        Command::Certs { command } => certs(command)?,
        other => client_with_ca(other, cli.token.as_deref(), cli.ca.as_deref()).await?,
    }
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: what a terminal, systemd and
/// Kubernetes send to stop a process. Either is a clean shutdown, so a
/// replica that leads gives its lease up rather than letting it run out.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}
