//! Delta (incremental) xDS against a real Envoy 1.40: the same scenarios
//! as the state-of-the-world e2e tests ([`xds_scenarios`]), with the
//! committed bootstrap switched to `api_type: DELTA_GRPC`, plus the checks
//! that Envoy really spoke delta and that the delta bootstrap validates.

use std::time::Duration;

use anyhow::{Context, Result};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use understudy_controlplane::tls::SERVER_NAME;
use understudy_e2e::envoy::{self, XdsProtocol};
use understudy_e2e::stack::{NODE_ID, Stack};
use understudy_e2e::xds_scenarios::{self, wait_stat};
use understudy_e2e::{paths, traffic};

const DELTA: XdsProtocol = XdsProtocol::Delta;
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_canary_weights_split_traffic() -> Result<()> {
    xds_scenarios::canary_weights_split_traffic(DELTA).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nack_is_recorded_sent_once_and_traffic_keeps_flowing() -> Result<()> {
    xds_scenarios::nack_is_recorded_sent_once_and_traffic_keeps_flowing(DELTA).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_control_plane_outage_fails_no_requests() -> Result<()> {
    xds_scenarios::control_plane_outage_fails_no_requests(DELTA).await
}

/// Envoy's own counters show the delta stream at work (not a silent
/// fallback to state of the world): a weight change is one delta RDS update
/// and changes no cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_speaks_delta_and_a_weight_change_moves_only_the_route() -> Result<()> {
    let stack = Stack::start_speaking(DELTA, |_| {}).await?;
    let cds_updates = "cluster_manager.cds.update_success";
    let rds_updates = "http.understudy.rds.understudy_routes.update_success";
    let cds_before = stack
        .envoy
        .stat(cds_updates)
        .await?
        .context("no CDS stat")?;
    let rds_before = stack
        .envoy
        .stat(rds_updates)
        .await?
        .context("no RDS stat")?;
    let (status, body) = stack.set_weight(json!(100)).await?;
    assert_eq!(status, 200, "{body}");
    stack.wait_weights(0, 100, Duration::from_secs(5)).await?;
    wait_stat(
        &stack.envoy,
        rds_updates,
        rds_before + 1,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(stack.envoy.stat(cds_updates).await?, Some(cds_before));
    let tally = traffic::send(&stack.url, 20, 2).await;
    assert_eq!(
        (tally.failures(), tally.version("v2")),
        (0, 20),
        "{tally:?}"
    );
    // The control plane saw the delta method, and every type is ACKed.
    let status = stack.envoy_status().await?.context("Envoy not listed")?;
    assert_eq!(status["protocol"], "delta", "{status}");
    let types = status["types"].as_object().context("no types")?;
    assert_eq!(types.len(), 5, "{status}");
    for (t, st) in types {
        assert_eq!(st["acked_version"], st["sent_version"], "{t}: {st}");
    }
    Ok(())
}

/// The delta variant of the committed bootstrap (the documented one-line
/// change, `api_type: DELTA_GRPC`) passes `envoy --mode validate`.
#[test]
fn delta_bootstrap_validates() -> Result<()> {
    paths::filter_wasm()?;
    let text = envoy::render("bootstrap.yaml", &DELTA.bootstrap_replacements())?;
    assert!(text.contains("api_type: DELTA_GRPC"));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bootstrap-delta.yaml");
    std::fs::write(&path, text)?;
    envoy::validate(&path)?;
    Ok(())
}

/// A delta ADS client over mutual TLS with `node`'s certificate.
async fn delta_client(
    stack: &Stack,
    node: &str,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>> {
    let (cert, key) = stack.cp.envoy_cert(node)?;
    let ca = std::fs::read(stack.cp.certs.ca_cert())?;
    let tls = ClientTlsConfig::new()
        .domain_name(SERVER_NAME)
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    let channel = Endpoint::from_shared(format!("https://{}", stack.cp.xds))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(AggregatedDiscoveryServiceClient::new(channel))
}

/// Sends `first` on a delta stream (kept open) and returns how it ends:
/// the first response, or the error status.
async fn delta_first(
    ads: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    first: DeltaDiscoveryRequest,
) -> Result<Result<DeltaDiscoveryResponse, tonic::Status>> {
    let requests = tokio_stream::iter(vec![first]).chain(tokio_stream::pending());
    let mut responses = match ads.delta_aggregated_resources(requests).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    Ok(match responses.message().await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => anyhow::bail!("delta stream ended without a response or status"),
        Err(status) => Err(status),
    })
}

fn delta_request(node: &str, type_url: &str, names: Vec<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.to_owned(),
            ..Default::default()
        }),
        type_url: type_url.to_owned(),
        resource_names_subscribe: names,
        ..Default::default()
    }
}

/// The delta method keeps state of the world's rules: a certificate binds
/// the node id (an impostor is refused and never listed), a request over a
/// bound ends the stream, and a real client gets the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_streams_obey_the_same_auth_and_bounds() -> Result<()> {
    let stack = Stack::start_speaking(DELTA, |_| {}).await?;
    // Another node's certificate claiming the real Envoy's node id.
    let mut impostor = delta_client(&stack, "impostor").await?;
    let refused = delta_first(&mut impostor, delta_request(NODE_ID, CDS, vec![]))
        .await?
        .expect_err("an impostor was sent config");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Its own node id, but a name over the bound.
    let mut greedy = delta_client(&stack, "greedy").await?;
    let long = "x".repeat(understudy_controlplane::xds::delta::MAX_NAME_BYTES + 1);
    let refused = delta_first(&mut greedy, delta_request("greedy", CDS, vec![long]))
        .await?
        .expect_err("an oversized name was accepted");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // Its own node id, within bounds: the clusters, as delta resources.
    let mut honest = delta_client(&stack, "honest").await?;
    let first = delta_first(&mut honest, delta_request("honest", CDS, vec![]))
        .await?
        .map_err(|s| anyhow::anyhow!("refused: {s:?}"))?;
    assert_eq!(first.type_url, CDS);
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    for want in ["demo-stable", "demo-canary"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(first.resources.iter().all(|r| !r.version.is_empty()));
    // Only the real Envoy and the honest client were ever listed.
    let envoys = stack.api_get("/v1/envoys").await?;
    let nodes: Vec<&str> = envoys["envoys"]
        .as_array()
        .context("envoys")?
        .iter()
        .filter_map(|e| e["node_id"].as_str())
        .collect();
    assert!(
        !nodes.contains(&"greedy") && nodes.contains(&NODE_ID),
        "{nodes:?}"
    );
    assert_eq!(
        nodes.iter().filter(|n| **n == NODE_ID).count(),
        1,
        "{nodes:?}"
    );
    assert!(
        stack
            .api_get("/v1/nacks")
            .await?
            .as_array()
            .context("nacks")?
            .is_empty()
    );
    Ok(())
}

/// A burst of new ADS streams over the admission rate: the excess is
/// refused with `Unavailable` (Envoy retries those after its backoff), on
/// both methods, and admitted once the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_streams_over_the_admission_rate_are_refused_retryably() -> Result<()> {
    use std::sync::Arc;
    use understudy_controlplane::metrics::Metrics;
    use understudy_controlplane::xds::admission::Admission;
    use understudy_controlplane::xds::resources::Snapshot;
    use understudy_controlplane::xds::{AdsServer, Registry};

    let state =
        understudy_e2e::stack::desired_state(1, "127.0.0.1:9".parse()?, "127.0.0.1:9".parse()?)?;
    let (_snapshots, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::build(&state, 1, 1)));
    // Two at once, then one a second.
    let server = AdsServer::new(rx, Arc::new(Registry::default()), Arc::new(Metrics::new()?))
        .with_admission(Admission::new(1, 2)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(
                understudy_controlplane::tls::peer_interceptor(false, None),
            ))
            .add_service(server.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let mut outcomes = Vec::new();
    for i in 0..4 {
        let node = format!("burst-{i}");
        outcomes.push(delta_first(&mut ads, delta_request(&node, CDS, vec![])).await?);
    }
    let codes: Vec<tonic::Code> = outcomes
        .iter()
        .map(|o| o.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok))
        .collect();
    assert_eq!(
        codes,
        [
            tonic::Code::Ok,
            tonic::Code::Ok,
            tonic::Code::Unavailable,
            tonic::Code::Unavailable
        ]
    );
    // State of the world shares the bucket; after a second, one more is admitted.
    let sotw = ads
        .stream_aggregated_resources(tokio_stream::iter(vec![
            envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
                type_url: CDS.into(),
                ..Default::default()
            },
        ]))
        .await;
    assert_eq!(sotw.err().map(|s| s.code()), Some(tonic::Code::Unavailable));
    let admitted = understudy_e2e::wait::until(
        "the bucket to admit a stream again",
        Duration::from_secs(5),
        || {
            let mut ads = ads.clone();
            async move {
                Ok(delta_first(&mut ads, delta_request("later", CDS, vec![]))
                    .await?
                    .ok())
            }
        },
    )
    .await?;
    assert_eq!(admitted.type_url, CDS);
    Ok(())
}
