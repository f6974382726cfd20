//! The xDS side: an ADS (state of the world) gRPC server for Envoy.
//!
//! - [`stream`]: the protocol rules for one connection, as a pure state machine.
//! - [`registry`]: connected Envoys and their ACK/NACK status, for the API.
//! - [`server`]: the tonic service that ties a gRPC stream to the two above.

pub mod registry;
pub mod resources;
pub mod router;
pub mod server;
pub mod stream;

pub use registry::Registry;
pub use server::AdsServer;
