//! The tonic ADS service: one task per Envoy stream, driving a pure
//! protocol state machine from two inputs (Envoy's requests and new
//! snapshots). Both flavours of ADS are served on the same port and service:
//! state of the world ([`AdsStream`]) and delta ([`DeltaStream`]); Envoy
//! picks one with `api_type` (`GRPC` or `DELTA_GRPC`) in its bootstrap.
//!
//! A stream is served only for the node its client certificate binds
//! ([`crate::tls`]): the first request's `node.id` (and any later one) must
//! match, or the stream ends with `PermissionDenied` before it is registered,
//! counted in the fleet, sent any config or able to NACK. Concurrent streams
//! are capped in total ([`DEFAULT_MAX_ADS_STREAMS`], [`AdsServer::with_caps`])
//! and per certificate identity ([`MAX_ADS_STREAMS_PER_NODE`]); the excess is
//! refused with `ResourceExhausted`. (In plaintext mode there is no identity,
//! so only the total cap applies.) New streams are admitted at a bounded rate
//! ([`Admission`]); the excess is refused with `Unavailable` and Envoy retries.
//!
//! Responses are [`Wire`] messages: their resources are the snapshot's bytes,
//! encoded once and shared by every stream (so the generated
//! `AggregatedDiscoveryServiceServer`, which wants owned prost messages, is
//! replaced by [`AdsService`], the same two gRPC methods over that codec).

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, StdError, http};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::admission::Admission;
use super::delta::DeltaStream;
use super::registry::Registry;
use super::stream::{AdsStream, RequestEvent, TypeState};
use super::wire::Wire;
use crate::metrics::Metrics;
use crate::tls::{self, Peer};
use crate::xds::resources::{Snapshot, type_url};

/// Identifies this control plane in every response (`control_plane.identifier`).
pub const CONTROL_PLANE_ID: &str = "understudy";

/// Responses queued per stream before its task waits for Envoy to read.
/// A stream has at most one response awaiting Envoy's ACK (make before
/// break), so a second place only lets the task finish its turn; more would
/// be per-connection memory that buys nothing. The bytes queued are shared
/// (`Arc`s into the snapshot), so a slow reader holds references, not copies.
const OUTBOUND_BUFFER: usize = 2;

/// Concurrent ADS streams, all peers together, unless [`AdsServer::with_caps`]
/// says otherwise. A connected Envoy costs about 50–57 KB of resident memory
/// (the `xds_scale` benchmark in the README), so 16,384 streams stay under
/// 1 GB; the cap exists so a flood of peers cannot take the whole machine,
/// and it is well above the 10,000 Envoys the benchmark connects.
pub const DEFAULT_MAX_ADS_STREAMS: usize = 16_384;
/// Concurrent ADS streams per certificate identity. Envoy keeps one; a few
/// more cover a reconnect racing the old stream's teardown and a hot restart.
pub const MAX_ADS_STREAMS_PER_NODE: usize = 4;

/// HTTP/2 flow-control window per stream: what one peer's stream may have
/// in flight to us before we read it. Envoy's xDS requests are a few KB (node
/// metadata once, then names and nonces), so 64 KiB never stalls them, while
/// hyper's 1 MiB default would let each stream park a megabyte on us.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 window per connection, shared by its streams: an Envoy opens ADS,
/// the stats stream (batches of up to 1,000 stats) and filter reports on one
/// connection. 256 KiB covers a stats batch plus ADS without stalling, and
/// bounds what a connection can make us buffer (hyper's default: 1 MiB).
pub const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Concurrent HTTP/2 streams per connection: Envoy needs ADS, the stats
/// stream and a few concurrent report calls. hyper's default (200) lets one
/// connection hold 200 times the per-stream cost.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// The xDS port's transport, sized for many long-lived, mostly idle
/// connections (see each constant for why).
pub fn tuned_transport(builder: tonic::transport::Server) -> tonic::transport::Server {
    builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // A fixed window: adaptive sizing would grow it back towards megabytes.
        .http2_adaptive_window(Some(false))
        // Envoy keeps one long-lived ADS stream; keepalives find dead peers.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Responses are small and latency matters more than packing.
        .tcp_nodelay(true)
}

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
    admission: Arc<Admission>,
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
            caps: StreamCaps::new(DEFAULT_MAX_ADS_STREAMS, MAX_ADS_STREAMS_PER_NODE),
            admission: Arc::new(Admission::default()),
            metrics,
        }
    }

    /// Other stream caps: in total (a `serve` flag) and per identity (tests).
    pub fn with_caps(mut self, total: usize, per_node: usize) -> Self {
        self.caps = StreamCaps::new(total, per_node);
        self
    }

    /// Another admission rate for new streams ([`Admission`]).
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Arc::new(admission);
        self
    }

    /// The gRPC service: `StreamAggregatedResources` and `DeltaAggregatedResources`.
    pub fn into_service(self) -> AdsService {
        AdsService {
            inner: Arc::new(self),
        }
    }

    /// Checks a new stream's caps and rate, and starts its task.
    fn open<P: Protocol>(
        &self,
        request: Request<Streaming<P::Request>>,
    ) -> Result<Response<ResponseStream<Wire<P::Head>>>, Status> {
        let peer = tls::peer(request.extensions())?;
        let slot = self.caps.acquire(peer.verified())?;
        // After the caps: a refused stream takes no token from the bucket.
        self.admission.admit()?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        tokio::spawn(serve_stream::<P>(
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
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One flavour of ADS: its messages and its pure state machine.
trait Protocol: Default + Send + 'static {
    type Request: Message + Default + Send + 'static;
    type Head: Message + Default + Send + 'static;
    /// For logs.
    const NAME: &'static str;
    /// For the API (`GET /v1/envoys`: `protocol`).
    const SHORT: &'static str;
    fn node(req: &Self::Request) -> Option<&Node>;
    fn on_request(&mut self, req: &Self::Request, now: SystemTime) -> RequestEvent;
    fn pending(&mut self, snapshot: &Snapshot, id: &str) -> Vec<Wire<Self::Head>>;
    fn node_id(&self) -> Option<&str>;
    fn node_cluster(&self) -> Option<&str>;
    /// Each subscribed type's status, for the registry.
    fn status(&self) -> BTreeMap<&'static str, TypeState>;
    /// The response's type URL, version and nonce, for logs.
    fn describe(head: &Self::Head) -> (&str, &str, &str);
}

impl Protocol for AdsStream {
    type Request = DiscoveryRequest;
    type Head = DiscoveryResponse;
    const NAME: &'static str = "ADS";
    const SHORT: &'static str = "sotw";
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&mut self, req: &DiscoveryRequest, now: SystemTime) -> RequestEvent {
        AdsStream::on_request(self, req, now)
    }
    fn pending(&mut self, snapshot: &Snapshot, id: &str) -> Vec<Wire<DiscoveryResponse>> {
        AdsStream::pending(self, snapshot, id)
    }
    fn node_id(&self) -> Option<&str> {
        AdsStream::node_id(self)
    }
    fn node_cluster(&self) -> Option<&str> {
        AdsStream::node_cluster(self)
    }
    fn status(&self) -> BTreeMap<&'static str, TypeState> {
        self.types()
            .filter(|(_, st)| st.subscribed)
            .map(|(url, st)| (url, st.clone()))
            .collect()
    }
    fn describe(head: &DiscoveryResponse) -> (&str, &str, &str) {
        (&head.type_url, &head.version_info, &head.nonce)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Head = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta ADS";
    const SHORT: &'static str = "delta";
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&mut self, req: &DeltaDiscoveryRequest, now: SystemTime) -> RequestEvent {
        DeltaStream::on_request(self, req, now)
    }
    fn pending(&mut self, snapshot: &Snapshot, id: &str) -> Vec<Wire<DeltaDiscoveryResponse>> {
        DeltaStream::pending(self, snapshot, id)
    }
    fn node_id(&self) -> Option<&str> {
        DeltaStream::node_id(self)
    }
    fn node_cluster(&self) -> Option<&str> {
        DeltaStream::node_cluster(self)
    }
    fn status(&self) -> BTreeMap<&'static str, TypeState> {
        self.types()
            .filter(|(_, st)| st.subscribed)
            .map(|(url, st)| (url, st.status()))
            .collect()
    }
    fn describe(head: &DeltaDiscoveryResponse) -> (&str, &str, &str) {
        (&head.type_url, &head.system_version_info, &head.nonce)
    }
}

/// The ADS gRPC service (`envoy.service.discovery.v3.AggregatedDiscoveryService`),
/// both methods, writing [`Wire`] responses.
#[derive(Clone)]
pub struct AdsService {
    inner: Arc<AdsServer>,
}

/// The service's gRPC name, as Envoy calls it.
pub const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

impl tonic::server::NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

/// Initial size of a stream's encode and decode buffers. tonic's default
/// (8 KiB each) is a fixed 16 KiB per stream, most of a connected Envoy's
/// cost; its requests are under 1 KiB after the first (which carries the
/// node) and our responses a few KiB, and both buffers grow when needed.
pub const CODEC_BUFFER: usize = 1024;
/// Bytes encoded before a stream yields to others (tonic's default).
const CODEC_YIELD: usize = 32 * 1024;

/// prost's codec with [`CODEC_BUFFER`]-sized buffers.
struct SmallBuffers<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(CODEC_BUFFER, CODEC_YIELD)
}

/// One method: streams of protocol `P`.
struct Method<P>(Arc<AdsServer>, PhantomData<fn() -> P>);

impl<P: Protocol> tonic::server::StreamingService<P::Request> for Method<P> {
    type Response = Wire<P::Head>;
    type ResponseStream = ResponseStream<Wire<P::Head>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<P::Request>>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.open::<P>(request) })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let codec =
                    tonic_prost::ProstCodec::<Wire<DiscoveryResponse>, DiscoveryRequest>::default();
                let method = Method::<AdsStream>(inner, PhantomData);
                Ok(tonic::server::Grpc::new(codec).streaming(method, req).await)
            }),
            DELTA_PATH => Box::pin(async move {
                let codec =
                    SmallBuffers::<Wire<DeltaDiscoveryResponse>, DeltaDiscoveryRequest>::default();
                let method = Method::<DeltaStream>(inner, PhantomData);
                Ok(tonic::server::Grpc::new(codec).streaming(method, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

async fn serve_stream<P: Protocol>(
    mut inbound: Streaming<P::Request>,
    tx: mpsc::Sender<Result<Wire<P::Head>, Status>>,
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
    if let Err(status) = check_node(&peer, P::node(&first), true) {
        let _ = tx.send(Err(status)).await;
        return;
    }
    let guard = registry.connect_speaking(SystemTime::now(), P::SHORT);
    let id = guard.id;
    let mut stream = P::default();
    info!(
        connection = id,
        protocol = P::NAME,
        verified = peer.verified().is_some(),
        "ADS stream opened"
    );
    let mut next = Some(first);
    'stream: loop {
        if let Some(req) = next.take() {
            if let Err(status) = check_node(&peer, P::node(&req), false) {
                let _ = tx.send(Err(status)).await;
                break;
            }
            if let Err(status) = handle_request(&mut stream, &registry, &metrics, id, &req) {
                let _ = tx.send(Err(status)).await;
                break;
            }
        }
        let snapshot = snapshots.borrow_and_update().clone();
        for response in stream.pending(&snapshot, CONTROL_PLANE_ID) {
            let (url, version, nonce) = P::describe(&response.head);
            let short = type_url::short(url);
            // Debug, not info: a push to 10,000 Envoys would be 10,000 lines.
            debug!(
                connection = id,
                node = stream.node_id().unwrap_or("?"),
                protocol = P::NAME,
                r#type = short,
                %version,
                %nonce,
                resources = response.resources.len(),
                generation = snapshot.generation,
                "sending"
            );
            if tx.send(Ok(response)).await.is_err() {
                break 'stream;
            }
            metrics.xds_pushed(short);
        }
        registry.update_with(
            id,
            stream.node_id(),
            stream.node_cluster(),
            stream.status().into_iter(),
        );
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
fn check_node(peer: &Peer, node: Option<&Node>, first: bool) -> Result<(), Status> {
    match (node, peer) {
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

/// Applies one request; an `Err` ends the stream.
fn handle_request<P: Protocol>(
    stream: &mut P,
    registry: &Registry,
    metrics: &Metrics,
    id: u64,
    req: &P::Request,
) -> Result<(), Status> {
    let event = stream.on_request(req, SystemTime::now());
    let node = stream.node_id().unwrap_or("?").to_owned();
    match event {
        RequestEvent::Subscribed { type_url } => {
            debug!(connection = id, %node, r#type = type_url::short(&type_url), "subscribed");
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
        RequestEvent::Invalid { reason } => {
            warn!(connection = id, %node, %reason, "ADS stream ended: the request is over a bound");
            return Err(Status::invalid_argument(reason));
        }
    }
    Ok(())
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
