//! The xDS side: an ADS gRPC server for Envoy, state of the world and delta
//! (incremental) on the same port and service.
//!
//! - [`stream`]: the state-of-the-world rules for one connection, as a pure state machine.
//! - [`delta`]: the delta (incremental) rules for one connection, likewise.
//! - [`wire`]: responses written from resources encoded once per snapshot.
//! - [`admission`]: the rate at which new ADS streams are admitted.
//! - [`registry`]: connected Envoys and their ACK/NACK status, for the API.
//! - [`server`]: the tonic service that ties a gRPC stream to the two above.

pub mod admission;
pub mod delta;
pub mod registry;
pub mod resources;
pub mod router;
pub mod server;
pub mod stream;
pub mod table;
pub mod wire;

pub use registry::Registry;
pub use server::AdsServer;
