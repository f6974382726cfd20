//! The tonic ADS service: one task per Envoy stream, driving an
//! [`AdsStream`] from two inputs (Envoy's requests and new snapshots).

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::registry::Registry;
use super::stream::{AdsStream, RequestEvent};
use crate::resources::{Snapshot, type_url};

/// Identifies this control plane in every response (`control_plane.identifier`).
pub const CONTROL_PLANE_ID: &str = "understudy";

/// Responses buffered per stream before the task waits for Envoy to read.
const OUTBOUND_BUFFER: usize = 8;

#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
}

impl AdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, registry: Arc<Registry>) -> Self {
        Self {
            snapshots,
            registry,
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        tokio::spawn(serve_stream(
            inbound,
            tx,
            self.snapshots.clone(),
            Arc::clone(&self.registry),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "Understudy serves state-of-the-world ADS; set api_type: GRPC in ads_config",
        ))
    }
}

async fn serve_stream(
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
) {
    let guard = registry.connect(SystemTime::now());
    let id = guard.id;
    let mut stream = AdsStream::new();
    info!(connection = id, "ADS stream opened");
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => handle_request(&mut stream, &registry, id, &req),
                Ok(None) => break,
                Err(status) => {
                    debug!(connection = id, %status, "ADS stream ended with an error");
                    break;
                }
            },
            changed = snapshots.changed() => if changed.is_err() { break },
            () = tx.closed() => break,
        }
        let snapshot = snapshots.borrow_and_update().clone();
        for response in stream.pending(&snapshot, CONTROL_PLANE_ID) {
            info!(
                connection = id,
                node = stream.node_id().unwrap_or("?"),
                r#type = type_url::short(&response.type_url),
                version = %response.version_info,
                nonce = %response.nonce,
                resources = response.resources.len(),
                generation = snapshot.generation,
                "sending"
            );
            if tx.send(Ok(response)).await.is_err() {
                break;
            }
        }
        registry.update(id, &stream);
    }
    info!(
        connection = id,
        node = stream.node_id().unwrap_or("?"),
        "ADS stream closed"
    );
    drop(guard);
}

fn handle_request(stream: &mut AdsStream, registry: &Registry, id: u64, req: &DiscoveryRequest) {
    let event = stream.on_request(req, SystemTime::now());
    let node = stream.node_id().unwrap_or("?").to_owned();
    match event {
        RequestEvent::Subscribed { type_url } => {
            debug!(connection = id, %node, r#type = type_url::short(&type_url), names = ?req.resource_names, "subscribed");
        }
        RequestEvent::Ack { type_url, version } => {
            debug!(connection = id, %node, r#type = type_url::short(&type_url), %version, "ACK");
        }
        RequestEvent::Nack(nack) => {
            warn!(
                connection = id,
                %node,
                r#type = type_url::short(&nack.type_url),
                version = %nack.version,
                error = %nack.error,
                "Envoy rejected the config (NACK); keeping its last good config and not re-sending this version"
            );
            registry.record_nack(id, stream.node_id(), nack);
        }
        RequestEvent::Stale { type_url } => {
            debug!(connection = id, %node, r#type = type_url::short(&type_url), "stale nonce ignored");
        }
        RequestEvent::Unknown { type_url } => {
            warn!(connection = id, %node, %type_url, "request for a type Understudy does not serve");
        }
    }
}
