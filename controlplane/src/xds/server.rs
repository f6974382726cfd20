//! The tonic ADS service: one task per Envoy stream, driving an
//! [`AdsStream`] from two inputs (Envoy's requests and new snapshots).
//!
//! A stream is served only for the node its client certificate binds
//! ([`crate::tls`]): the first request's `node.id` (and any later one) must
//! match, or the stream ends with `PermissionDenied` before it is registered,
//! counted in the fleet, sent any config or able to NACK. Concurrent streams
//! are capped in total ([`MAX_ADS_STREAMS`]) and per certificate identity
//! ([`MAX_ADS_STREAMS_PER_NODE`]); the excess is refused with
//! `ResourceExhausted`. (In plaintext mode there is no identity, so only the
//! total cap applies.)

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
use crate::metrics::Metrics;
use crate::tls::{self, Peer};
use crate::xds::resources::{Snapshot, type_url};

/// Identifies this control plane in every response (`control_plane.identifier`).
pub const CONTROL_PLANE_ID: &str = "understudy";

/// Responses buffered per stream before the task waits for Envoy to read.
const OUTBOUND_BUFFER: usize = 8;

/// Concurrent ADS streams, all peers together.
pub const MAX_ADS_STREAMS: usize = 1024;
/// Concurrent ADS streams per certificate identity. Envoy keeps one; a few
/// more cover a reconnect racing the old stream's teardown and a hot restart.
pub const MAX_ADS_STREAMS_PER_NODE: usize = 4;

/// Counts open ADS streams against the caps; a [`StreamSlot`] gives its place back on drop.
pub struct StreamCaps {
    total: usize,
    per_node: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
}

impl StreamCaps {
    pub fn new(total: usize, per_node: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_node,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for one more stream of `identity` (`None`: unknown, plaintext),
    /// or `ResourceExhausted`.
    pub fn acquire(self: &Arc<Self>, identity: Option<&str>) -> Result<StreamSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 >= self.total {
            warn!(cap = self.total, "ADS stream refused: too many streams");
            return Err(Status::resource_exhausted("too many ADS streams"));
        }
        if let Some(id) = identity {
            let n = open.1.get(id).copied().unwrap_or(0);
            if n >= self.per_node {
                warn!(
                    node = id,
                    cap = self.per_node,
                    "ADS stream refused: too many streams for this node"
                );
                return Err(Status::resource_exhausted(
                    "too many ADS streams for this node",
                ));
            }
            open.1.insert(id.to_owned(), n.saturating_add(1));
        }
        open.0 = open.0.saturating_add(1);
        Ok(StreamSlot {
            caps: Arc::clone(self),
            identity: identity.map(str::to_owned),
        })
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

pub struct StreamSlot {
    caps: Arc<StreamCaps>,
    identity: Option<String>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(id) = &self.identity
            && let Some(n) = open.1.get_mut(id)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(id);
            }
        }
    }
}

#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
    caps: Arc<StreamCaps>,
    /// Pushes, ACKs and NACKs are counted here, where they happen.
    metrics: Arc<Metrics>,
}

impl AdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            snapshots,
            registry,
            caps: StreamCaps::new(MAX_ADS_STREAMS, MAX_ADS_STREAMS_PER_NODE),
            metrics,
        }
    }

    /// Other stream caps (tests).
    pub fn with_caps(mut self, total: usize, per_node: usize) -> Self {
        self.caps = StreamCaps::new(total, per_node);
        self
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
        let peer = tls::peer(request.extensions())?;
        let slot = self.caps.acquire(peer.verified())?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        tokio::spawn(serve_stream(
            inbound,
            tx,
            self.snapshots.clone(),
            Arc::clone(&self.registry),
            Arc::clone(&self.metrics),
            peer,
            slot,
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
    metrics: Arc<Metrics>,
    peer: Peer,
    _slot: StreamSlot,
) {
    // The first request names the node: nothing is registered, counted or
    // sent before it is checked against the certificate.
    let first = tokio::select! {
        msg = inbound.message() => match msg {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(status) => {
                debug!(%status, "ADS stream ended before its first request");
                return;
            }
        },
        () = tx.closed() => return,
    };
    if let Err(status) = check_node(&peer, &first, true) {
        let _ = tx.send(Err(status)).await;
        return;
    }
    let guard = registry.connect(SystemTime::now());
    let id = guard.id;
    let mut stream = AdsStream::new();
    info!(
        connection = id,
        verified = peer.verified().is_some(),
        "ADS stream opened"
    );
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            if let Err(status) = check_node(&peer, &req, false) {
                let _ = tx.send(Err(status)).await;
                break;
            }
            handle_request(&mut stream, &registry, &metrics, id, &req);
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
            let short = type_url::short(&response.type_url);
            if tx.send(Ok(response)).await.is_err() {
                break;
            }
            metrics.xds_pushed(short);
        }
        registry.update(id, &stream);
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => next = Some(req),
                Ok(None) => break,
                Err(status) => {
                    debug!(connection = id, %status, "ADS stream ended with an error");
                    break;
                }
            },
            changed = snapshots.changed() => if changed.is_err() { break },
            () = tx.closed() => break,
        }
    }
    info!(
        connection = id,
        node = stream.node_id().unwrap_or("?"),
        "ADS stream closed"
    );
    drop(guard);
}

/// A request may name only the certificate's node; with a certificate, the
/// first request must name it.
fn check_node(peer: &Peer, req: &DiscoveryRequest, first: bool) -> Result<(), Status> {
    match (&req.node, peer) {
        (Some(node), _) => tls::authorize(peer, &node.id, "ADS stream"),
        (None, peer) if first && peer.verified().is_some() => {
            warn!(certificate = ?peer.verified(), "ADS stream refused: the first request has no node");
            Err(Status::permission_denied(
                "the first ADS request must carry node.id",
            ))
        }
        (None, _) => Ok(()),
    }
}

fn handle_request(
    stream: &mut AdsStream,
    registry: &Registry,
    metrics: &Metrics,
    id: u64,
    req: &DiscoveryRequest,
) {
    let event = stream.on_request(req, SystemTime::now());
    let node = stream.node_id().unwrap_or("?").to_owned();
    match event {
        RequestEvent::Subscribed { type_url } => {
            debug!(connection = id, %node, r#type = type_url::short(&type_url), names = ?req.resource_names, "subscribed");
        }
        RequestEvent::Ack { type_url, version } => {
            metrics.xds_acked(type_url::short(&type_url));
            debug!(connection = id, %node, r#type = type_url::short(&type_url), %version, "ACK");
        }
        RequestEvent::Nack(nack) => {
            metrics.xds_nacked(type_url::short(&nack.type_url));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_in_total_and_per_identity_and_slots_come_back() {
        let caps = StreamCaps::new(5, 2);
        let a1 = caps.acquire(Some("a")).unwrap();
        let _a2 = caps.acquire(Some("a")).unwrap();
        let third = caps.acquire(Some("a")).err().unwrap();
        assert_eq!(third.code(), tonic::Code::ResourceExhausted);
        // Another identity, and unknown (plaintext) peers, have their own room.
        let _b = caps.acquire(Some("b")).unwrap();
        let _p1 = caps.acquire(None).unwrap();
        let _p2 = caps.acquire(None).unwrap();
        assert_eq!(caps.open(), 5);
        let total = caps.acquire(Some("c")).err().unwrap();
        assert_eq!(total.code(), tonic::Code::ResourceExhausted);
        // A closed stream frees its place, for its identity too.
        drop(a1);
        assert_eq!(caps.open(), 4);
        let _a3 = caps.acquire(Some("a")).unwrap();
    }
}
