//! `xds_scale`: how the control plane's ADS cost grows with connected
//! clients (issue 17): 1,000, 5,000 and 10,000 simulated Envoys, state of the
//! world against delta at each size.
//!
//! - The control plane is the real `understudy serve` binary in a process of
//!   its own (so its resident memory and CPU time are its own, read from
//!   `/proc`), with plaintext xDS on loopback: 10,000 client certificates and
//!   handshakes would measure rustls, not ADS (left out; see the README).
//! - Each simulated client is what an Envoy is to the control plane: one
//!   HTTP/2 connection of its own (one tonic channel, from its own loopback
//!   source address so 10,000 connections never run out of ephemeral ports)
//!   carrying one ADS stream that subscribes like Envoy (CDS and LDS
//!   wildcard, then EDS for the clusters, RDS and ECDS by name) and ACKs
//!   every response. Many streams per connection would be cheaper for the
//!   server and would not be what it meets in production.
//! - Refused streams (admission rate, caps) are retried after a jittered
//!   backoff, as Envoy does.
//!
//! Figures per protocol and size (median, min, max):
//! - `converge_s`: from just before the weight change's API call until the
//!   last client ACKed the new routes.
//! - `rss_kb_per_client`: the control plane's RSS after every client
//!   converged minus before any connected, divided by the clients.
//! - `cpu_s_per_push`: the control plane's CPU time from the API call to
//!   convergence (the snapshot build, N responses, N ACKs).
//! - `push_bytes_per_client` and `initial_bytes_per_client`: protobuf bytes
//!   of the responses a client received for the weight change and for its
//!   initial config.
//!
//! The clients run in this process on the same two cores as the control
//! plane, so `converge_s` includes their share of the CPU.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{cpu_time_us, round3, rounds, spread};
use crate::controlplane::{OPERATOR, OPERATOR_TOKEN};
use crate::envoy::XdsProtocol;
use crate::process::ChildGuard;
use crate::stack::{SERVICE, api_client, desired_state, free_port};
use crate::{paths, wait};

/// Fleet sizes measured.
const SIZES: [usize; 3] = [1_000, 5_000, 10_000];
/// Overrides the sizes (comma-separated), for a quick smoke run only.
pub const SIZES_ENV: &str = "UNDERSTUDY_XDS_SCALE_CLIENTS";

fn sizes() -> Vec<usize> {
    std::env::var(SIZES_ENV)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect::<Vec<usize>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| SIZES.to_vec())
}
/// Weight changes timed per connected fleet.
const PUSHES: usize = 3;
/// The goal at 10,000 clients (issue 17).
const GOAL_CONVERGE_S: f64 = 2.0;
const GOAL_KB_PER_CLIENT: f64 = 50.0;
/// Connecting a fleet: at the default admission rate (1,000 new streams a
/// second after a burst of 2,000) 10,000 clients need about 8 s.
const CONNECT_DEADLINE: Duration = Duration::from_secs(120);
const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);
/// Connection attempts in flight at once (the listener's backlog is 1,024).
const CONNECTING: usize = 256;
/// File descriptors: a client connection each here; the control plane
/// (which inherits the limit) needs one per client too.
const FDS_NEEDED: u64 = 12_000;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const ROUTES: &str = "understudy_routes";
const FILTER: &str = "understudy";

/// What the clients report, shared by all of them.
#[derive(Default)]
struct Fleet {
    /// Clients that have ACKed their whole initial config.
    ready: AtomicUsize,
    /// Route (RDS) responses ACKed, by every client together.
    route_acks: AtomicU64,
    /// The latest route ACK, in ns since `origin`.
    last_route_ack_ns: AtomicU64,
    /// Protobuf bytes of every response received.
    bytes: AtomicU64,
    /// Streams the control plane refused (and that were retried).
    refused: AtomicU64,
    /// Streams or connections that failed otherwise (and were retried).
    stream_errors: AtomicU64,
}

pub(super) async fn xds_scale() -> Result<Value> {
    raise_fd_limit()?;
    let bin = paths::controlplane_binary()?;
    let rounds = rounds();
    let sizes = sizes();
    let protocols = [XdsProtocol::StateOfTheWorld, XdsProtocol::Delta];
    // [protocol][size] -> samples
    let mut converge = vec![vec![Vec::new(); sizes.len()]; 2];
    let mut rss = converge.clone();
    let mut cpu = converge.clone();
    let mut push_bytes = converge.clone();
    let mut initial_bytes = converge.clone();
    let mut connect_s = converge.clone();
    let mut refused = converge.clone();
    let mut stream_errors = converge.clone();
    for round in 0..rounds {
        for (s, &size) in sizes.iter().enumerate() {
            // Alternate which protocol goes first, so drift hits both alike.
            for k in 0..2 {
                let p = (k + round) % 2;
                let run = run_fleet(&bin, protocols[p], size, round)
                    .await
                    .with_context(|| {
                        format!("{:?} with {size} clients, round {round}", protocols[p])
                    })?;
                eprintln!(
                    "xds_scale {:?} {size}: connected in {:.1}s, {:.1} KB/client, pushes converged in {:?} s",
                    protocols[p], run.connect_s, run.rss_kb_per_client, run.converge_s
                );
                rss[p][s].push(run.rss_kb_per_client);
                initial_bytes[p][s].push(run.initial_bytes_per_client);
                connect_s[p][s].push(run.connect_s);
                refused[p][s].push(run.refused as f64);
                stream_errors[p][s].push(run.stream_errors as f64);
                converge[p][s].extend(run.converge_s);
                cpu[p][s].extend(run.cpu_s);
                push_bytes[p][s].extend(run.push_bytes_per_client);
            }
        }
    }
    let mut figures = serde_json::Map::new();
    for (p, name) in ["sotw", "delta"].iter().enumerate() {
        for (s, size) in sizes.iter().enumerate() {
            let prefix = format!("{name}_{size}");
            for (figure, values) in [
                ("converge_s", &converge[p][s]),
                ("rss_kb_per_client", &rss[p][s]),
                ("cpu_s_per_push", &cpu[p][s]),
                ("push_bytes_per_client", &push_bytes[p][s]),
                ("initial_bytes_per_client", &initial_bytes[p][s]),
                ("connect_s", &connect_s[p][s]),
                ("refused_streams", &refused[p][s]),
                ("stream_errors", &stream_errors[p][s]),
            ] {
                spread(&mut figures, &format!("{prefix}_{figure}"), values);
            }
        }
    }
    let big = sizes.iter().copied().max().unwrap_or(0);
    for name in ["sotw", "delta"] {
        let at = |f: &str| {
            figures
                .get(&format!("{name}_{big}_{f}"))
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        let meets =
            at("converge_s") <= GOAL_CONVERGE_S && at("rss_kb_per_client") <= GOAL_KB_PER_CLIENT;
        figures.insert(format!("{name}_{big}_meets_goal"), json!(meets));
    }
    figures.insert(
        "goal".into(),
        json!(format!(
            "{big} clients converge in <= {GOAL_CONVERGE_S} s at <= {GOAL_KB_PER_CLIENT} KB each"
        )),
    );
    figures.insert("rounds".into(), json!(rounds));
    figures.insert("clients".into(), json!(sizes));
    figures.insert("pushes_per_round".into(), json!(PUSHES));
    figures.insert(
        "method".into(),
        json!("`understudy serve` (dev profile, plaintext xDS) as its own process; each client one HTTP/2 connection with one ADS stream from its own loopback address, subscribing and ACKing like Envoy; clients in the bench process on the same cores"),
    );
    figures.insert(
        "aggregation".into(),
        json!("median with min and max: memory and connect time over rounds, push figures over every push of every round"),
    );
    Ok(Value::Object(figures))
}

/// One connected fleet's figures.
struct FleetRun {
    connect_s: f64,
    rss_kb_per_client: f64,
    initial_bytes_per_client: f64,
    refused: u64,
    stream_errors: u64,
    converge_s: Vec<f64>,
    cpu_s: Vec<f64>,
    push_bytes_per_client: Vec<f64>,
}

async fn run_fleet(
    bin: &std::path::Path,
    protocol: XdsProtocol,
    size: usize,
    round: usize,
) -> Result<FleetRun> {
    let cp = ServeProcess::start(bin).await?;
    let rss_before = rss_kb(cp.pid)?;
    let fleet = Arc::new(Fleet::default());
    let origin = Instant::now();
    let mut clients = JoinSet::new();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let started = Instant::now();
    for i in 0..size {
        let (fleet, connecting) = (Arc::clone(&fleet), Arc::clone(&connecting));
        let source = source_address(round, i);
        let xds = cp.xds;
        clients.spawn(async move {
            if let Err(e) = client(protocol, xds, source, i, fleet, connecting, origin).await {
                eprintln!("xds_scale client {i}: {e:#}");
            }
        });
    }
    let waited = {
        let fleet = Arc::clone(&fleet);
        wait::until(
            &format!("{size} clients to converge"),
            CONNECT_DEADLINE,
            || {
                let fleet = Arc::clone(&fleet);
                async move { Ok((fleet.ready.load(Ordering::Acquire) >= size).then_some(())) }
            },
        )
        .await
    };
    if let Err(e) = waited {
        bail!(
            "{e:#}: only {} of {size} clients converged ({} streams refused, {} failed)",
            fleet.ready.load(Ordering::Acquire),
            fleet.refused.load(Ordering::Acquire),
            fleet.stream_errors.load(Ordering::Acquire)
        );
    }
    let connect_s = started.elapsed().as_secs_f64();
    let rss_after = rss_kb(cp.pid)?;
    let initial_bytes = fleet.bytes.load(Ordering::Acquire);
    let mut run = FleetRun {
        connect_s,
        rss_kb_per_client: rss_after.saturating_sub(rss_before) as f64 / size as f64,
        initial_bytes_per_client: initial_bytes as f64 / size as f64,
        refused: fleet.refused.load(Ordering::Acquire),
        stream_errors: fleet.stream_errors.load(Ordering::Acquire),
        converge_s: Vec::new(),
        cpu_s: Vec::new(),
        push_bytes_per_client: Vec::new(),
    };
    let api = api_client(OPERATOR_TOKEN)?;
    for push in 0..PUSHES {
        let base = fleet.route_acks.load(Ordering::Acquire);
        let bytes_before = fleet.bytes.load(Ordering::Acquire);
        let cpu_before = cpu_time_us(cp.pid)?;
        // Weights 10, 20, 30...: each push really changes the routes.
        let weight = (push as u64 + 1) * 10 + (round as u64 % 5);
        let called = origin.elapsed();
        let r = api
            .put(format!(
                "http://{}/v1/services/{SERVICE}/canary-weight",
                cp.api
            ))
            .json(&json!({ "weight": weight }))
            .send()
            .await
            .context("setting the weight")?;
        if !r.status().is_success() {
            bail!("weight change refused: {} {}", r.status(), r.text().await?);
        }
        let target = base + size as u64;
        let fleet2 = Arc::clone(&fleet);
        wait::until(
            &format!("{size} clients to ACK the new routes"),
            CONVERGE_DEADLINE,
            || {
                let fleet = Arc::clone(&fleet2);
                async move { Ok((fleet.route_acks.load(Ordering::Acquire) >= target).then_some(())) }
            },
        )
        .await?;
        let cpu_after = cpu_time_us(cp.pid)?;
        let last = Duration::from_nanos(fleet.last_route_ack_ns.load(Ordering::Acquire));
        run.converge_s
            .push(round3(last.saturating_sub(called).as_secs_f64()));
        run.cpu_s.push(round3((cpu_after - cpu_before) / 1e6));
        run.push_bytes_per_client
            .push((fleet.bytes.load(Ordering::Acquire) - bytes_before) as f64 / size as f64);
    }
    clients.abort_all();
    while clients.join_next().await.is_some() {}
    drop(cp);
    Ok(run)
}

/// A distinct loopback source address per client and round: each address
/// has its own ephemeral ports, so 10,000 connections (and the TIME_WAITs of
/// earlier rounds) never exhaust them.
fn source_address(round: usize, i: usize) -> IpAddr {
    let n = i as u32;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (round % 200) as u8,
        (n / 250) as u8,
        (n % 250 + 1) as u8,
    ))
}

/// One simulated Envoy: connects, then keeps an ADS stream open, retrying
/// refused streams after a jittered backoff.
async fn client(
    protocol: XdsProtocol,
    xds: SocketAddr,
    source: IpAddr,
    i: usize,
    fleet: Arc<Fleet>,
    connecting: Arc<Semaphore>,
    origin: Instant,
) -> Result<()> {
    let mut backoff = Backoff {
        next: Duration::from_millis(50),
        client: i,
    };
    let channel = loop {
        let permit = connecting.acquire().await?;
        let attempt = Endpoint::from_shared(format!("http://{xds}"))?
            .local_address(Some(source))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await;
        drop(permit);
        match attempt {
            Ok(c) => break c,
            Err(_) => {
                fleet.refused.fetch_add(1, Ordering::Relaxed);
                backoff.wait(true).await;
            }
        }
    };
    // A retried client counts as ready once, whatever its streams do.
    let ready = AtomicBool::new(false);
    let node = Node {
        id: format!("bench-{i}"),
        cluster: "bench".into(),
        ..Default::default()
    };
    loop {
        let outcome = match protocol {
            XdsProtocol::StateOfTheWorld => sotw(&channel, &node, &fleet, &ready, origin).await,
            XdsProtocol::Delta => delta(&channel, &node, &fleet, &ready, origin).await,
        };
        match outcome {
            // Refused (admission, caps): back off and open the stream again.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                ) =>
            {
                fleet.refused.fetch_add(1, Ordering::Relaxed);
                backoff.wait(true).await;
            }
            // Anything else (a reset connection in a connect storm, a
            // stream the server ended): Envoy reconnects, and so do we.
            Err(_) => {
                fleet.stream_errors.fetch_add(1, Ordering::Relaxed);
                backoff.wait(true).await;
            }
            // The server ended the stream cleanly: reconnect as well.
            Ok(()) => {
                fleet.stream_errors.fetch_add(1, Ordering::Relaxed);
                backoff.wait(false).await;
            }
        }
    }
}

/// Envoy's reconnect backoff, which the simulated clients reproduce: the
/// pause is the behaviour being simulated (clients that do not retry in
/// lockstep), not a wait standing in for a condition.
struct Backoff {
    next: Duration,
    client: usize,
}

impl Backoff {
    /// Pauses for the current backoff (jittered); with `grow`, the next
    /// one doubles, up to 2 s.
    async fn wait(&mut self, grow: bool) {
        tokio::time::sleep(jitter(self.next, self.client)).await;
        if grow {
            self.next = (self.next * 2).min(Duration::from_secs(2));
        }
    }
}

/// `base` spread over [base/2, base*3/2) by the client's number (no RNG
/// needed: what matters is that clients do not retry in lockstep).
fn jitter(base: Duration, i: usize) -> Duration {
    let frac = (i.wrapping_mul(2_654_435_761) % 1000) as u32;
    base / 2 + base * frac / 1000
}

fn now_ns(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A state-of-the-world client: Envoy's subscription order and ACKs.
async fn sotw(
    channel: &Channel,
    node: &Node,
    fleet: &Fleet,
    ready: &AtomicBool,
    origin: Instant,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let request = |type_url: &str, names: &[String]| DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.to_vec(),
        ..Default::default()
    };
    let send = |req: DiscoveryRequest| {
        let tx = tx.clone();
        async move {
            tx.send(req)
                .await
                .map_err(|_| tonic::Status::cancelled("closed"))
        }
    };
    send(DiscoveryRequest {
        node: Some(node.clone()),
        ..request(CDS, &[])
    })
    .await?;
    send(request(LDS, &[])).await?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel.clone());
    let mut responses = ads
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut eds_names: Option<Vec<String>> = None;
    let mut lds_seen = false;
    let (routes, filter) = (vec![ROUTES.to_owned()], vec![FILTER.to_owned()]);
    while let Some(resp) = responses.message().await? {
        fleet
            .bytes
            .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        let ack = |names: &[String], resp: &DiscoveryResponse| DiscoveryRequest {
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            ..request(&resp.type_url, names)
        };
        match resp.type_url.as_str() {
            CDS => {
                send(ack(&[], &resp)).await?;
                if eds_names.is_none() {
                    let names: Vec<String> = resp
                        .resources
                        .iter()
                        .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                        .map(|c| c.name)
                        .collect();
                    send(request(EDS, &names)).await?;
                    eds_names = Some(names);
                }
            }
            EDS => send(ack(eds_names.as_deref().unwrap_or(&[]), &resp)).await?,
            LDS => {
                send(ack(&[], &resp)).await?;
                if !lds_seen {
                    lds_seen = true;
                    send(request(RDS, &routes)).await?;
                    send(request(ECDS, &filter)).await?;
                }
            }
            RDS => {
                send(ack(&routes, &resp)).await?;
                fleet
                    .last_route_ack_ns
                    .fetch_max(now_ns(origin), Ordering::AcqRel);
                fleet.route_acks.fetch_add(1, Ordering::AcqRel);
            }
            ECDS => {
                send(ack(&filter, &resp)).await?;
                if !ready.swap(true, Ordering::AcqRel) {
                    fleet.ready.fetch_add(1, Ordering::AcqRel);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A delta client: Envoy's subscriptions, one ACK per response.
async fn delta(
    channel: &Channel,
    node: &Node,
    fleet: &Fleet,
    ready: &AtomicBool,
    origin: Instant,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    let subscribe = |type_url: &str, names: Vec<String>| DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    let send = |req: DeltaDiscoveryRequest| {
        let tx = tx.clone();
        async move {
            tx.send(req)
                .await
                .map_err(|_| tonic::Status::cancelled("closed"))
        }
    };
    send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        ..subscribe(CDS, vec![])
    })
    .await?;
    send(subscribe(LDS, vec![])).await?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel.clone());
    let mut responses = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (mut cds_seen, mut lds_seen) = (false, false);
    while let Some(resp) = responses.message().await? {
        fleet
            .bytes
            .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        match resp.type_url.as_str() {
            CDS if !cds_seen => {
                cds_seen = true;
                let names = resp.resources.iter().map(|r| r.name.clone()).collect();
                send(subscribe(EDS, names)).await?;
            }
            LDS if !lds_seen => {
                lds_seen = true;
                send(subscribe(RDS, vec![ROUTES.into()])).await?;
                send(subscribe(ECDS, vec![FILTER.into()])).await?;
            }
            RDS => {
                fleet
                    .last_route_ack_ns
                    .fetch_max(now_ns(origin), Ordering::AcqRel);
                fleet.route_acks.fetch_add(1, Ordering::AcqRel);
            }
            ECDS if !ready.swap(true, Ordering::AcqRel) => {
                fleet.ready.fetch_add(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }
    Ok(())
}

/// `understudy serve` with plaintext xDS on free loopback ports, killed on drop.
struct ServeProcess {
    _child: ChildGuard,
    pid: u32,
    xds: SocketAddr,
    api: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    async fn start(bin: &std::path::Path) -> Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir()?;
        // The upstreams are never called: only the config is measured.
        let state = desired_state(free_port()?, "127.0.0.1:9".parse()?, "127.0.0.1:9".parse()?)?;
        let state_file = dir.path().join("state.json");
        std::fs::write(&state_file, serde_json::to_vec_pretty(&state)?)?;
        let tokens = dir.path().join("tokens.txt");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tokens)?
            .write_all(format!("{OPERATOR}:operator:{OPERATOR_TOKEN}\n").as_bytes())?;
        let xds = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = std::fs::File::create(dir.path().join("controlplane.log"))?;
        let child = std::process::Command::new(bin)
            .arg("serve")
            .arg("--state")
            .arg(&state_file)
            .arg("--rollouts")
            .arg(dir.path().join("rollouts.redb"))
            .arg("--tokens")
            .arg(&tokens)
            .arg("--insecure-plaintext-xds")
            .arg("--xds-addr")
            .arg(xds.to_string())
            .arg("--api-addr")
            .arg(api.to_string())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let cp = Self {
            _child: ChildGuard::named(child, "understudy serve"),
            pid,
            xds,
            api,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let url = format!("http://{api}/healthz");
        wait::until(
            "the control plane's /healthz",
            Duration::from_secs(30),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    Ok(match http.get(&url).send().await {
                        Ok(r) if r.status().is_success() => Some(()),
                        _ => None,
                    })
                }
            },
        )
        .await?;
        Ok(cp)
    }
}

/// The process's resident set, in KB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Raises this process's open-file limit (which the control plane child
/// inherits) to what 10,000 connections need, within the hard limit.
fn raise_fd_limit() -> Result<()> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(FDS_NEEDED, |max| {
        max.min(FDS_NEEDED.max(limit.current.unwrap_or(0)))
    });
    if limit.current.is_some_and(|c| c >= want) {
        return Ok(());
    }
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        },
    )?;
    if want < FDS_NEEDED {
        bail!("the open-file limit is {want}; xds_scale needs {FDS_NEEDED} (raise the hard limit)");
    }
    Ok(())
}
