//! The `understudy` command line: `serve` runs the control plane; the other
//! subcommands are a thin client of its JSON API. Most print the API's JSON;
//! `shadow` prints tables, since its answer is meant to be read at a glance.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

pub mod watch;
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(
    name = "understudy",
    version,
    about = "Understudy control plane and client"
)]
pub struct Cli {
    /// Bearer token for the API (client subcommands).
    #[arg(long, global = true, env = "UNDERSTUDY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) the client trusts for an `https://` API, e.g.
    /// the `ca.pem` of `understudy certs init`.
    #[arg(long, global = true, env = "UNDERSTUDY_CA")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Which [`crate::traffic::TrafficRouter`] `serve` runs rollouts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterKind {
    Ads,
    Istio,
}

// Parsed once per process: the size of `Serve`'s many flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve {
        /// Desired-state file (JSON): listener, filter and services. Every
        /// accepted API change is written back to it, so a restart resumes.
        #[arg(long, env = "UNDERSTUDY_STATE")]
        state: PathBuf,
        /// Address of the ADS gRPC server Envoy connects to.
        #[arg(long, default_value = "127.0.0.1:18000", env = "UNDERSTUDY_XDS_ADDR")]
        xds_addr: SocketAddr,
        /// Address of the JSON API.
        #[arg(long, default_value = "127.0.0.1:18080", env = "UNDERSTUDY_API_ADDR")]
        api_addr: SocketAddr,
        /// API tokens: a file of `name:role:token` lines (role `viewer` or
        /// `operator`). `UNDERSTUDY_TOKENS` may hold the same entries,
        /// comma-separated, instead.
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Serve the API without authentication (every caller is an operator).
        #[arg(long)]
        insecure_no_auth: bool,
        /// The rollout database (redb). Default: the state file's path with
        /// `.rollouts.redb` appended.
        #[arg(long, env = "UNDERSTUDY_ROLLOUTS")]
        rollouts: Option<PathBuf>,
        /// Directory from `understudy certs init`: serve xDS with mutual TLS
        /// using its `server.pem`, `server-key.pem` and `ca.pem`.
        #[arg(long, env = "UNDERSTUDY_TLS_DIR")]
        tls_dir: Option<PathBuf>,
        /// The xDS server's certificate (PEM); with --tls-key and --client-ca,
        /// instead of --tls-dir.
        #[arg(long, requires_all = ["tls_key", "client_ca"], conflicts_with = "tls_dir")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CA whose client certificates (one per Envoy) are accepted.
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
        /// Serve xDS without TLS: anyone who reaches the port can feed the
        /// rollout judge and read the config. Local trials only.
        #[arg(long, conflicts_with_all = ["tls_dir", "tls_cert"])]
        insecure_plaintext_xds: bool,
        /// Also accept Istio workload certificates of this trust domain
        /// (`spiffe://<domain>/ns/<ns>/sa/<sa>`, usually `cluster.local`) on
        /// the xDS port: each speaks only for the Istio node id of its own
        /// pod. Pass the mesh's certificate files (istio-agent's
        /// OUTPUT_CERTS) as --tls-cert/--tls-key/--client-ca.
        #[arg(
            long,
            env = "UNDERSTUDY_ISTIO_TRUST_DOMAIN",
            conflicts_with = "insecure_plaintext_xds"
        )]
        istio_trust_domain: Option<crate::tls::workload::TrustDomain>,
        /// Serve the API over TLS with this certificate (PEM) and --api-key.
        #[arg(long, requires = "api_key")]
        api_cert: Option<PathBuf>,
        #[arg(long, requires = "api_cert")]
        api_key: Option<PathBuf>,
        /// Send rollouts' synthetic probes through the Envoy listener at
        /// this address (`ip:port`, e.g. 127.0.0.1:10000). Without it,
        /// rollouts that declare probes are refused.
        #[arg(long, env = "UNDERSTUDY_PROBE_VIA")]
        probe_via: Option<SocketAddr>,
        /// What moves traffic: `ads` (our own ADS, the default) or `istio`
        /// (VirtualService weights over the Kubernetes API; needs the
        /// `istio` build feature and --istio-config).
        #[arg(long, value_enum, default_value_t = RouterKind::Ads)]
        router: RouterKind,
        /// Istio mode: the services' VirtualServices and the WasmPlugin (YAML).
        #[arg(long, env = "UNDERSTUDY_ISTIO_CONFIG")]
        istio_config: Option<PathBuf>,
        /// Istio mode: the kubeconfig to use; default: in-cluster, then
        /// `KUBECONFIG`, then `~/.kube/config`.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Run as one of several replicas on this PostgreSQL database
        /// (`postgres://user@host:port/db`): the desired state, rollouts
        /// and evidence live there, and one replica at a time (the lease
        /// holder) runs rollouts. Without it: the state file and redb. A
        /// URL with a password is best given in UNDERSTUDY_DATABASE: the
        /// command line is visible to every user of the machine.
        #[arg(long, env = "UNDERSTUDY_DATABASE")]
        database: Option<String>,
        /// Replicas: this replica's name, unique among them (it names the
        /// lease holder and keys the evidence it ships). Default: the API
        /// address it advertises.
        #[arg(long, env = "UNDERSTUDY_REPLICA_NAME", requires = "database")]
        replica_name: Option<String>,
        /// Replicas: where this replica's API is reached by others (shown
        /// by followers as the leader's). Default: `http://<--api-addr>`.
        #[arg(long, env = "UNDERSTUDY_ADVERTISE_API", requires = "database")]
        advertise_api: Option<String>,
        /// Replicas: the leader's lease in milliseconds; a dead leader is
        /// replaced within it (plus one try, an eighth of it).
        #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(500..=60_000), requires = "database")]
        lease_ms: u64,
        /// Concurrent ADS streams accepted, all Envoys together (Envoy
        /// keeps one each; the excess is refused with RESOURCE_EXHAUSTED).
        #[arg(long, default_value_t = crate::xds::server::DEFAULT_MAX_ADS_STREAMS)]
        max_ads_streams: usize,
        /// New ADS streams admitted per second; a reconnect storm beyond
        /// it is refused with UNAVAILABLE, which Envoy retries with backoff.
        #[arg(long, default_value_t = crate::xds::admission::DEFAULT_STREAMS_PER_SECOND, value_parser = clap::value_parser!(u32).range(1..))]
        ads_admission_rate: u32,
        /// New ADS streams admitted at once before the rate applies.
        #[arg(long, default_value_t = crate::xds::admission::DEFAULT_BURST, value_parser = clap::value_parser!(u32).range(1..))]
        ads_admission_burst: u32,
    },
    /// Certificates for mutual TLS between Envoys and the control plane.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Canary rollouts: create, list, read, act on, and watch.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
    /// List services and their canary weights.
    Services {
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
    /// Set a service's canary weight (0..=100).
    SetWeight {
        service: String,
        weight: i64,
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
    /// Show connected Envoys: ACKed versions and NACKs.
    Envoys {
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
    /// Shadow comparison results: every route, or one route with its top
    /// differing paths.
    Shadow {
        route: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:18080", env = "UNDERSTUDY_API")]
        api: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA, the control plane's server certificate and a client
    /// certificate per `--envoy` node id (identity
    /// `spiffe://understudy/envoy/<node-id>`). Keys are written 0600.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// An Envoy node id to issue a client certificate for (repeatable).
        #[arg(long)]
        envoy: Vec<String>,
        /// Another DNS name or IP the control plane is reached by (repeatable;
        /// `understudy-controlplane`, `localhost` and `127.0.0.1` are always in).
        #[arg(long)]
        server_name: Vec<String>,
    },
    /// Issue a client certificate for one more Envoy from the CA in `--dir`.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        envoy: String,
    },
}

/// Runs `understudy certs ...`, printing the files written.
pub fn certs(command: CertsCommand) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now();
    match command {
        CertsCommand::Init {
            dir,
            envoy,
            server_name,
        } => {
            let files = crate::tls::init(&dir, &server_name, &envoy, now)?;
            println!("CA:     {}", files.ca_cert().display());
            println!(
                "server: {} {}",
                files.server_cert().display(),
                files.server_key().display()
            );
            for node in &envoy {
                println!(
                    "envoy {node}: {} {}",
                    files.envoy_cert(node).display(),
                    files.envoy_key(node).display()
                );
            }
            println!(
                "next: understudy serve --tls-dir {} ...",
                files.dir.display()
            );
        }
        CertsCommand::Issue { dir, envoy } => {
            let (cert, key) = crate::tls::issue_envoy(&dir, &envoy, now)?;
            println!("envoy {envoy}: {} {}", cert.display(), key.display());
        }
    }
    Ok(())
}

/// What `serve --router` asks for, read before the Store opens: the Store
/// must know the mesh's clusters to accept them as shadow and hedge targets.
pub enum RouterPlan {
    /// Our own ADS.
    Ads,
    /// Istio mode, with its validated `--istio-config`.
    #[cfg(feature = "istio")]
    Istio(crate::istio::IstioConfig),
}

impl RouterPlan {
    /// Checks the flags and reads `--istio-config`. Without the `istio`
    /// build feature, `--router istio` is refused with what to do.
    pub fn read(
        kind: RouterKind,
        istio_config: Option<&Path>,
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<Self> {
        match kind {
            RouterKind::Ads => {
                if istio_config.is_some() || kubeconfig.is_some() {
                    bail!("--istio-config and --kubeconfig are for --router istio");
                }
                Ok(Self::Ads)
            }
            RouterKind::Istio => Self::istio(istio_config),
        }
    }

    #[cfg(not(feature = "istio"))]
    fn istio(_: Option<&Path>) -> anyhow::Result<Self> {
        bail!(
            "--router istio: this understudy was built without Istio mode; \
             build it with `cargo build -p understudy-controlplane --features istio`"
        )
    }

    #[cfg(feature = "istio")]
    fn istio(istio_config: Option<&Path>) -> anyhow::Result<Self> {
        let path = istio_config.context("--router istio needs --istio-config FILE")?;
        let config = crate::istio::IstioConfig::read(path)
            .with_context(|| format!("in {}", path.display()))?;
        Ok(Self::Istio(config))
    }

    /// The data plane's clusters besides our services' own.
    pub fn mesh_clusters(&self) -> crate::model::MeshClusters {
        match self {
            Self::Ads => crate::model::MeshClusters::default(),
            #[cfg(feature = "istio")]
            Self::Istio(config) => config.mesh_clusters(),
        }
    }
}

/// The router of `plan`: `None` for our own ADS; for Istio, the
/// [`crate::istio::IstioRouter`] over the Kubernetes API, after it has read
/// every configured VirtualService back.
pub async fn traffic_router(
    plan: RouterPlan,
    kubeconfig: Option<&Path>,
    store: &crate::store::Store,
) -> anyhow::Result<Option<std::sync::Arc<dyn crate::traffic::TrafficRouter>>> {
    match plan {
        RouterPlan::Ads => {
            let _ = (kubeconfig, store);
            Ok(None)
        }
        #[cfg(feature = "istio")]
        RouterPlan::Istio(config) => istio_router(config, kubeconfig, store).await.map(Some),
    }
}

#[cfg(feature = "istio")]
async fn istio_router(
    config: crate::istio::IstioConfig,
    kubeconfig: Option<&Path>,
    store: &crate::store::Store,
) -> anyhow::Result<std::sync::Arc<dyn crate::traffic::TrafficRouter>> {
    let kube_config = match kubeconfig {
        Some(file) => {
            let kc = kube::config::Kubeconfig::read_from(file)
                .with_context(|| format!("reading {}", file.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("in {}", file.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes API: not in a cluster, and no KUBECONFIG or ~/.kube/config")?,
    };
    let client = kube::Client::try_from(kube_config).context("the Kubernetes client")?;
    let router = crate::istio::IstioRouter::start(client, config, store.clone()).await?;
    Ok(router)
}

/// How `serve` secures the xDS port, from its flags: mutual TLS from
/// `--tls-dir` or the three files; plaintext only with
/// `--insecure-plaintext-xds` (warned about on every start); otherwise it
/// refuses to start and says how to make certificates.
pub fn xds_security(
    tls_dir: Option<&Path>,
    files: Option<(&Path, &Path, &Path)>,
    insecure_plaintext: bool,
) -> anyhow::Result<crate::tls::XdsSecurity> {
    use crate::tls::{XdsSecurity, XdsTls};
    match (tls_dir, files, insecure_plaintext) {
        (Some(dir), None, false) => Ok(XdsSecurity::Mtls(
            XdsTls::from_dir(dir).context("loading the xDS certificates (--tls-dir)")?,
        )),
        (None, Some((cert, key, ca)), false) => Ok(XdsSecurity::Mtls(
            XdsTls::from_files(cert, key, ca).context("loading the xDS certificates")?,
        )),
        (None, None, true) => {
            tracing::warn!(
                "--insecure-plaintext-xds: the xDS port has no TLS and no authentication; \
                 anyone who reaches it can read the config and feed the rollout judge"
            );
            Ok(XdsSecurity::InsecurePlaintext)
        }
        (None, None, false) => bail!(
            "the xDS port needs mutual TLS. Create certificates with\n  \
             understudy certs init --dir ./certs --envoy <node-id>\n\
             then start with --tls-dir ./certs (or --tls-cert/--tls-key/--client-ca); \
             --insecure-plaintext-xds serves without TLS (local trials only)"
        ),
        _ => bail!("--insecure-plaintext-xds, --tls-dir and --tls-cert exclude each other"),
    }
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout from a YAML or JSON spec file.
    Create {
        file: PathBuf,
    },
    List,
    /// Stage, weights, verdict with its numbers, and the audit log.
    Get {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Advance now (also opens a manual gate).
    Promote {
        id: String,
    },
    /// Stop: canary weight 0.
    Abort {
        id: String,
    },
    /// After success: the canary's backend becomes the stable backend and the
    /// weight returns to 0 (automatic unless the spec says `finalize.automatic: false`).
    Finalize {
        id: String,
    },
    /// Follow a rollout live until it ends; exits non-zero if it does not succeed.
    Watch {
        id: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 1.0)]
        every: f64,
    },
}

/// An API client sending the bearer token, if one is given.
pub fn http_client(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    http_client_with_ca(token, None)
}

/// [`http_client`] that also trusts the CA certificate (PEM) in `ca`, for an
/// API served over TLS with a private CA.
pub fn http_client_with_ca(
    token: Option<&str>,
    ca: Option<&Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the token has characters a header cannot carry")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    // A wedged control plane must not hang the command: every API answer is
    // quick (a replay waits on one upstream request at most).
    let mut builder = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30));
    if let Some(path) = ca {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder.build()?)
}

/// Runs a client subcommand against the API and prints the JSON answer.
pub async fn client(command: Command, token: Option<&str>) -> anyhow::Result<()> {
    client_with_ca(command, token, None).await
}

/// [`client`] trusting the CA certificate in `ca` (`--ca`, `UNDERSTUDY_CA`).
pub async fn client_with_ca(
    command: Command,
    token: Option<&str>,
    ca: Option<&Path>,
) -> anyhow::Result<()> {
    let http = http_client_with_ca(token, ca)?;
    if let Command::Shadow { route, api } = &command {
        return shadow(&http, api, route.as_deref()).await;
    }
    if let Command::Rollout { command, api } = command {
        return rollout(&http, &api, command).await;
    }
    let response = match &command {
        Command::Services { api } => http.get(format!("{api}/v1/services")).send().await,
        Command::SetWeight {
            service,
            weight,
            api,
        } => {
            http.put(format!("{api}/v1/services/{service}/canary-weight"))
                .json(&serde_json::json!({ "weight": weight }))
                .send()
                .await
        }
        Command::Envoys { api } => http.get(format!("{api}/v1/envoys")).send().await,
        Command::Serve { .. }
        | Command::Certs { .. }
        | Command::Shadow { .. }
        | Command::Rollout { .. } => {
            bail!("not a JSON client command")
        }
    }
    .context("calling the control plane API")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("reading the API's answer")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("the API answered {status}");
    }
    Ok(())
}

/// Sends one request and returns the JSON answer, failing on a non-2xx.
async fn call(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request
        .send()
        .await
        .context("calling the control plane API")?;
    let status = response.status();
    let body: Value = response.json().await.context("reading the API's answer")?;
    if !status.is_success() {
        println!("{}", serde_json::to_string_pretty(&body)?);
        bail!("the API answered {status}");
    }
    Ok(body)
}

async fn rollout(http: &reqwest::Client, api: &str, command: RolloutCommand) -> anyhow::Result<()> {
    let url = |rest: &str| format!("{api}/v1/rollouts{rest}");
    let body = match command {
        RolloutCommand::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            call(http.post(url("")).body(text)).await?
        }
        RolloutCommand::List => call(http.get(url(""))).await?,
        RolloutCommand::Get { id } => call(http.get(url(&format!("/{id}")))).await?,
        RolloutCommand::Pause { id } => call(http.post(url(&format!("/{id}/pause")))).await?,
        RolloutCommand::Resume { id } => call(http.post(url(&format!("/{id}/resume")))).await?,
        RolloutCommand::Promote { id } => call(http.post(url(&format!("/{id}/promote")))).await?,
        RolloutCommand::Abort { id } => call(http.post(url(&format!("/{id}/abort")))).await?,
        RolloutCommand::Finalize { id } => call(http.post(url(&format!("/{id}/finalize")))).await?,
        RolloutCommand::Watch { id, every } => {
            return watch::run(http, &url(&format!("/{id}")), every).await;
        }
    };
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

async fn shadow(http: &reqwest::Client, api: &str, route: Option<&str>) -> anyhow::Result<()> {
    let url = match route {
        Some(r) => format!("{api}/v1/shadow/routes/{r}"),
        None => format!("{api}/v1/shadow/routes"),
    };
    let response = http
        .get(url)
        .send()
        .await
        .context("calling the control plane API")?;
    let status = response.status();
    let body: Value = response.json().await.context("reading the API's answer")?;
    if !status.is_success() {
        println!("{}", serde_json::to_string_pretty(&body)?);
        bail!("the API answered {status}");
    }
    match route {
        Some(_) => print!("{}", render_route(&body)),
        None => print!("{}", render_routes(&body)),
    }
    Ok(())
}

// === shadow tables ===

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "no data".to_owned(), |r| format!("{:.2}%", r * 100.0))
}

fn count(v: &Value) -> String {
    v.as_u64().unwrap_or(0).to_string()
}

/// `99.10% [98.20–99.60]`, or `no data`.
fn match_rate(stats: &Value) -> String {
    let rate = percent(&stats["match_rate"]);
    match (
        stats["match_rate_ci"][0].as_f64(),
        stats["match_rate_ci"][1].as_f64(),
    ) {
        (Some(lo), Some(hi)) => format!("{rate} [{:.2}–{:.2}]", lo * 100.0, hi * 100.0),
        _ => rate,
    }
}

fn gap(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |g| format!("{g:+.1}"))
}

fn skipped(stats: &Value) -> String {
    stats["skipped"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum::<u64>())
        .unwrap_or(0)
        .to_string()
}

fn summary_row(r: &Value) -> Vec<String> {
    vec![
        r["route"].as_str().unwrap_or("?").to_owned(),
        count(&r["compared"]),
        match_rate(r),
        percent(&r["exact_match_rate"]),
        count(&r["mismatched_serious"]),
        count(&r["unexpected"]),
        skipped(r),
        gap(&r["mean_latency_gap_ms"]),
        format!(
            "{} / {}",
            count(&r["calibration"]["compared"]),
            match_rate(&r["calibration"])
        ),
    ]
}

const SUMMARY_HEADERS: [&str; 9] = [
    "ROUTE",
    "COMPARED",
    "MATCH RATE [95% CI]",
    "EXACT",
    "SERIOUS",
    "UNEXPECTED",
    "SKIPPED",
    "GAP MS",
    "CALIBRATION (COMPARED / MATCH)",
];

/// The `GET /v1/shadow/routes` answer as a table.
pub fn render_routes(body: &Value) -> String {
    let routes = body["routes"].as_array().cloned().unwrap_or_default();
    if routes.is_empty() {
        return "no shadow reports yet\n".to_owned();
    }
    let rows: Vec<Vec<String>> = routes.iter().map(summary_row).collect();
    let mut out = table(&SUMMARY_HEADERS, &rows);
    out.push_str(&format!(
        "\nrecords stored: {}, dropped by filters: {}\n",
        count(&body["records_stored"]),
        count(&body["dropped_by_filters"])
    ));
    out
}

/// The `GET /v1/shadow/routes/{route}` answer: the summary, then the paths.
pub fn render_route(body: &Value) -> String {
    let mut out = table(&SUMMARY_HEADERS, &[summary_row(body)]);
    let paths = body["top_paths"].as_array().cloned().unwrap_or_default();
    out.push('\n');
    if paths.is_empty() {
        out.push_str("no differing paths recorded\n");
        return out;
    }
    let rows: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let sample =
                p["samples"]
                    .as_array()
                    .and_then(|s| s.last())
                    .map_or_else(String::new, |s| {
                        let side = |v: &Value| v.as_str().unwrap_or("(absent)").to_owned();
                        format!(
                            "#{} {} → {}",
                            s["id"].as_str().unwrap_or("?"),
                            side(&s["primary"]),
                            side(&s["shadow"])
                        )
                    });
            vec![
                p["path"].as_str().unwrap_or("?").to_owned(),
                count(&p["count"]),
                count(&p["serious"]),
                count(&p["noise"]),
                count(&p["unexpected"]),
                percent(&p["learned_noise_rate"]).replace("no data", "-"),
                sample,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "PATH",
            "COUNT",
            "SERIOUS",
            "NOISE",
            "UNEXPECTED",
            "LEARNED NOISE",
            "LATEST SAMPLE",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn serve_router_flags_are_checked() {
        let store = crate::store::Store::new(crate::store::first_start_state()).unwrap();
        let file = Path::new("istio.yaml");
        let e = RouterPlan::read(RouterKind::Ads, Some(file), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("are for --router istio"), "{e}");
        let plan = RouterPlan::read(RouterKind::Ads, None, None).unwrap();
        assert_eq!(plan.mesh_clusters(), crate::model::MeshClusters::default());
        assert!(traffic_router(plan, None, &store).await.unwrap().is_none());
        let e = RouterPlan::read(RouterKind::Istio, None, None)
            .err()
            .unwrap()
            .to_string();
        // Without the feature, the build command; with it, the missing file.
        #[cfg(not(feature = "istio"))]
        assert!(e.contains("--features istio"), "{e}");
        #[cfg(feature = "istio")]
        assert!(e.contains("needs --istio-config"), "{e}");
    }

    /// Istio mode: the Store is told the subsets' clusters before it opens,
    /// so a state file shadowing to one loads.
    #[cfg(feature = "istio")]
    #[test]
    fn istio_plan_names_the_subset_clusters() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("istio.yaml");
        std::fs::write(&file, crate::istio::config::EXAMPLE).unwrap();
        let plan = RouterPlan::read(RouterKind::Istio, Some(&file), None).unwrap();
        let mesh = plan.mesh_clusters();
        assert!(
            mesh.iter()
                .any(|c| c.starts_with("outbound|") && c.contains("|canary|")),
            "{mesh:?}"
        );
    }

    #[test]
    fn serve_refuses_plaintext_xds_unless_asked_and_loads_certificates() {
        let err = xds_security(None, None, false).unwrap_err().to_string();
        assert!(err.contains("understudy certs init --dir"), "{err}");
        assert!(matches!(
            xds_security(None, None, true).unwrap(),
            crate::tls::XdsSecurity::InsecurePlaintext
        ));
        let tmp = tempfile::tempdir().unwrap();
        let missing = xds_security(Some(tmp.path()), None, false).unwrap_err();
        assert!(
            format!("{missing:#}").contains("ca.pem")
                || format!("{missing:#}").contains("server.pem"),
            "{missing:#}"
        );
        crate::tls::init(tmp.path(), &[], &[], std::time::SystemTime::now()).unwrap();
        assert!(matches!(
            xds_security(Some(tmp.path()), None, false).unwrap(),
            crate::tls::XdsSecurity::Mtls(_)
        ));
        assert!(xds_security(Some(tmp.path()), None, true).is_err());
        // The flags parse as documented, and conflicting ones are refused.
        let parse = |args: &[&str]| {
            Cli::try_parse_from(
                ["understudy", "serve", "--state", "s.json"]
                    .iter()
                    .chain(args),
            )
        };
        assert!(parse(&["--insecure-plaintext-xds"]).is_ok());
        assert!(parse(&["--tls-dir", "d", "--insecure-plaintext-xds"]).is_err());
        assert!(
            parse(&["--tls-cert", "c"]).is_err(),
            "--tls-cert needs its key and CA"
        );
        assert!(parse(&["--tls-cert", "c", "--tls-key", "k", "--client-ca", "a"]).is_ok());
        assert!(parse(&["--api-cert", "c"]).is_err());
    }

    #[test]
    fn shadow_tables_read_at_a_glance() {
        let summary = json!({
            "route": "checkout", "compared": 100, "matched": 85, "mismatched_serious": 10,
            "unexpected": 5, "skipped": {"shadow_timeout": 2, "skipped_too_large": 1},
            "match_rate": 0.9, "match_rate_ci": [0.8256, 0.9448], "exact_match_rate": 0.85,
            "mean_latency_gap_ms": 1.25,
            "calibration": {"compared": 0, "match_rate": null, "match_rate_ci": null},
            "top_paths": [{"path": "$.total", "count": 10, "serious": 10, "noise": 0,
                "unexpected": 5, "learned_noise_rate": null,
                "samples": [{"id": "17", "primary": "49.90", "shadow": "51.40"}]},
                {"path": "$.at", "count": 3, "serious": 0, "noise": 3, "unexpected": 0,
                "learned_noise_rate": 0.25, "samples": []}]
        });
        let list = render_routes(
            &json!({"routes": [summary.clone()], "records_stored": 12, "dropped_by_filters": 0}),
        );
        assert!(list.starts_with("ROUTE "), "{list}");
        assert!(list.contains("checkout"), "{list}");
        assert!(list.contains("90.00% [82.56–94.48]"), "{list}");
        assert!(list.contains("+1.2"), "{list}");
        assert!(list.contains("0 / no data"), "{list}");
        assert!(list.contains("records stored: 12"), "{list}");
        let route = render_route(&summary);
        assert!(route.contains("$.total"), "{route}");
        assert!(route.contains("#17 49.90 → 51.40"), "{route}");
        assert!(route.contains("25.00%"), "{route}");
        // Columns line up: every path row starts its COUNT column at the same place.
        let col = |line: &str| {
            let gap = line.find("  ").unwrap();
            gap + line[gap..].find(|c: char| c != ' ').unwrap()
        };
        let lines: Vec<&str> = route
            .lines()
            .skip_while(|l| !l.starts_with("PATH"))
            .collect();
        assert_eq!(col(lines[1]), col(lines[2]));
        assert_eq!(
            render_routes(&json!({"routes": []})),
            "no shadow reports yet\n"
        );
    }
}
