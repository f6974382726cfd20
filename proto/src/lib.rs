//! `understudy-proto`: the project's own protobuf API, generated at build time.
//!
//! The `.proto` sources live next to this crate in `understudy/v1/`. They are
//! compiled with protox (pure Rust, no `protoc`) and prost. The filter uses
//! the messages only (build with `default-features = false`); the control
//! plane enables the `grpc` feature for the tonic service.

pub mod convert;

/// `understudy.v1`: what the filter reports to the control plane.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/understudy.v1.rs"));
}

#[cfg(test)]
mod tests {
    use super::v1::{Difference, MismatchRecord, ReportBatch, difference::Kind};
    use prost::Message;

    #[test]
    fn a_batch_survives_the_wire() {
        let batch = ReportBatch {
            node_id: "envoy-1".into(),
            mismatches: vec![MismatchRecord {
                route: "checkout".into(),
                request_id: "r-1".into(),
                differences: vec![Difference {
                    path: "$.total".into(),
                    kind: Kind::ValueChange as i32,
                    primary: "49.90".into(),
                    shadow: "51.40".into(),
                    ..Default::default()
                }],
                latency_gap_us: -1200,
                ..Default::default()
            }],
            dropped: 3,
            ..Default::default()
        };
        let decoded = ReportBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(
            decoded.mismatches[0].differences[0].kind(),
            Kind::ValueChange
        );
    }
}
