//! The state-of-the-world ADS protocol for one Envoy connection, as a plain
//! state machine: feed it each [`DiscoveryRequest`] ([`AdsStream::on_request`])
//! and ask it what to send for the current snapshot ([`AdsStream::pending`]).
//! It does no I/O, so every protocol rule is unit-tested without a network.
//!
//! Rules it enforces:
//! - **Per type URL**: subscribed names, last version and nonce sent, the
//!   version Envoy last ACKed, and the last NACK with Envoy's `error_detail`.
//! - **Make before break**: types go out in the order CDS, EDS, LDS, RDS,
//!   ECDS, and a type is only sent once every earlier type has no response
//!   awaiting Envoy's ACK or NACK. A CDS response forces its EDS out again,
//!   because Envoy keeps a changed cluster warming until it gets endpoints.
//! - **No NACK loop**: a rejected version is never sent again on this stream;
//!   the next send for that type happens only when the desired content (or
//!   the subscription) changes.
//! - **Stale nonces** (replies to an older response) are ignored, as the xDS
//!   protocol specifies.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use serde::Serialize;

use crate::xds::resources::{Snapshot, type_url};
use crate::xds::table::TypeTable;
use crate::xds::wire::Wire;

/// A rejected config, as Envoy reported it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Nack {
    pub type_url: String,
    /// The version Envoy rejected.
    pub version: String,
    /// Envoy's `error_detail.message`.
    pub error: String,
    #[serde(with = "crate::time::serde_unix_ms")]
    pub at: SystemTime,
}

/// What one request meant.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestEvent {
    /// First request for a type on this stream (or a resubscription).
    Subscribed { type_url: String },
    /// Envoy accepted `version`.
    Ack { type_url: String, version: String },
    /// Envoy rejected a version.
    Nack(Nack),
    /// A reply to a response that has since been superseded.
    Stale { type_url: String },
    /// A type Understudy does not serve; it gets no response.
    Unknown { type_url: String },
    /// A request over a bound (too many names, too long a name): the stream ends.
    Invalid { reason: String },
}

/// Bookkeeping for one type URL on one stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeState {
    pub subscribed: bool,
    /// Names Envoy asked for. Empty means "all" (wildcard) for CDS and LDS.
    pub resource_names: BTreeSet<String>,
    pub sent_version: Option<String>,
    #[serde(skip)]
    sent_names: BTreeSet<String>,
    pub sent_nonce: Option<String>,
    /// A response went out and Envoy has not ACKed or NACKed it yet.
    pub awaiting_reply: bool,
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub responses_sent: u64,
    /// Set when a CDS push requires the endpoints to follow (EDS only).
    #[serde(skip)]
    force_resend: bool,
}

/// One ADS stream's protocol state.
#[derive(Debug, Clone)]
pub struct AdsStream {
    table: TypeTable<TypeState>,
}

impl Default for AdsStream {
    fn default() -> Self {
        Self::new()
    }
}

impl AdsStream {
    pub fn new() -> Self {
        Self {
            table: TypeTable::default(),
        }
    }

    /// Envoy sends its node only on the first request of a stream.
    pub fn node_id(&self) -> Option<&str> {
        self.table.node_id()
    }

    pub fn node_cluster(&self) -> Option<&str> {
        self.table.node_cluster()
    }

    pub fn types(&self) -> impl Iterator<Item = (&'static str, &TypeState)> {
        self.table.iter()
    }

    pub fn type_state(&self, type_url: &str) -> Option<&TypeState> {
        self.table.get(type_url)
    }

    /// Records what a request says: subscription, ACK or NACK.
    pub fn on_request(&mut self, req: &DiscoveryRequest, now: SystemTime) -> RequestEvent {
        self.table.note_node(req.node.as_ref());
        let Some((_, st)) = self.table.get_mut(&req.type_url) else {
            return RequestEvent::Unknown {
                type_url: req.type_url.clone(),
            };
        };
        let type_url = req.type_url.clone();
        if !req.response_nonce.is_empty()
            && st.sent_nonce.as_deref() != Some(req.response_nonce.as_str())
        {
            return RequestEvent::Stale { type_url };
        }
        st.subscribed = true;
        st.resource_names = req.resource_names.iter().cloned().collect();
        if req.response_nonce.is_empty() {
            return RequestEvent::Subscribed { type_url };
        }
        st.awaiting_reply = false;
        match &req.error_detail {
            Some(status) => {
                let nack = Nack {
                    type_url,
                    version: st.sent_version.clone().unwrap_or_default(),
                    error: status.message.clone(),
                    at: now,
                };
                st.last_nack = Some(nack.clone());
                RequestEvent::Nack(nack)
            }
            None => {
                st.acked_version = Some(req.version_info.clone());
                RequestEvent::Ack {
                    type_url,
                    version: req.version_info.clone(),
                }
            }
        }
    }

    /// The responses to send now for `snapshot`, in order. Call after every
    /// request and every snapshot change; it returns nothing when nothing is due.
    pub fn pending(
        &mut self,
        snapshot: &Snapshot,
        control_plane_id: &str,
    ) -> Vec<Wire<DiscoveryResponse>> {
        let mut out = Vec::new();
        for i in 0..self.table.types.len() {
            let (url, st) = &self.table.types[i];
            let url = *url;
            if st.awaiting_reply {
                // Make before break: nothing after this type until Envoy answers.
                break;
            }
            if !st.subscribed {
                continue;
            }
            let Some(desired) = snapshot.get(url) else {
                continue;
            };
            let wildcard = st.resource_names.is_empty()
                && matches!(url, type_url::CLUSTER | type_url::LISTENER);
            let names: BTreeSet<String> = if wildcard {
                BTreeSet::new()
            } else {
                st.resource_names.clone()
            };
            let due = st.force_resend
                || st.sent_version.as_deref() != Some(desired.version.as_str())
                || st.sent_names != names;
            if !due {
                continue;
            }
            // Shared bytes, encoded once per snapshot: no per-stream copy.
            let resources = desired
                .encoded
                .iter()
                .filter(|(name, _)| wildcard || names.contains(*name))
                .map(|(_, enc)| Arc::clone(&enc.any))
                .collect();
            let nonce = self.table.nonce();
            let st = &mut self.table.types[i].1;
            st.sent_version = Some(desired.version.clone());
            st.sent_names = names;
            st.sent_nonce = Some(nonce.clone());
            st.awaiting_reply = true;
            st.force_resend = false;
            st.responses_sent += 1;
            out.push(Wire::new(
                DiscoveryResponse {
                    version_info: desired.version.clone(),
                    type_url: url.to_owned(),
                    nonce,
                    control_plane: Some(ControlPlane {
                        identifier: control_plane_id.to_owned(),
                    }),
                    ..Default::default()
                },
                resources,
            ));
            if url == type_url::CLUSTER
                && let Some((_, eds)) = self.table.get_mut(type_url::ENDPOINT)
            {
                eds.force_resend = true;
            }
            // This type now awaits its reply; later types wait for it.
            break;
        }
        out
    }
}

/// Timestamps as milliseconds since the Unix epoch in JSON.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredState;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::rpc::Status;
    use prost::Message;

    fn state(weight: u32, stable_port: u16) -> DesiredState {
        crate::model::fixtures::state(weight, stable_port, true)
    }

    fn req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    /// A NACK as Envoy sends it: same subscription, the rejected nonce, an error.
    fn nack(type_url: &str, names: &[&str], nonce: &str, msg: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..req(type_url, names, "", nonce)
        }
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    /// Plays Envoy's startup: CDS+LDS wildcard, then EDS/RDS/ECDS by name, ACKing each.
    fn converge(s: &mut AdsStream, snap: &Snapshot) -> Vec<String> {
        let mut order = vec![];
        s.on_request(
            &DiscoveryRequest {
                node: Some(Node {
                    id: "envoy-1".into(),
                    ..Default::default()
                }),
                ..req(type_url::CLUSTER, &[], "", "")
            },
            NOW,
        );
        s.on_request(&req(type_url::LISTENER, &[], "", ""), NOW);
        for _ in 0..10 {
            let out = s.pending(snap, "cp");
            let Some(resp) = out.first() else { break };
            assert_eq!(out.len(), 1, "one type at a time");
            order.push(type_url::short(&resp.type_url).to_string());
            match resp.type_url.as_str() {
                type_url::CLUSTER => {
                    s.on_request(
                        &req(type_url::ENDPOINT, &["shop-canary", "shop-stable"], "", ""),
                        NOW,
                    );
                }
                type_url::LISTENER => {
                    s.on_request(&req(type_url::ROUTE, &["understudy_routes"], "", ""), NOW);
                    s.on_request(
                        &req(type_url::EXTENSION_CONFIG, &["understudy"], "", ""),
                        NOW,
                    );
                }
                _ => {}
            }
            let names: Vec<String> = s
                .type_state(&resp.type_url)
                .unwrap()
                .resource_names
                .iter()
                .cloned()
                .collect();
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let ev = s.on_request(
                &req(&resp.type_url, &names, &resp.version_info, &resp.nonce),
                NOW,
            );
            assert!(matches!(ev, RequestEvent::Ack { .. }), "{ev:?}");
        }
        order
    }

    #[test]
    fn startup_goes_out_in_make_before_break_order() {
        let snap = Snapshot::build(&state(0, 8081), 1, 1);
        let mut s = AdsStream::new();
        assert_eq!(
            converge(&mut s, &snap),
            ["cds", "eds", "lds", "rds", "ecds"]
        );
        assert_eq!(s.node_id(), Some("envoy-1"));
        assert!(
            s.pending(&snap, "cp").is_empty(),
            "nothing more once converged"
        );
        for (_, st) in s.types() {
            assert_eq!(st.responses_sent, 1);
            assert_eq!(st.acked_version, st.sent_version);
        }
    }

    #[test]
    fn eds_only_lists_requested_clusters() {
        let snap = Snapshot::build(&state(0, 8081), 1, 1);
        let mut s = AdsStream::new();
        converge(&mut s, &snap);
        s.on_request(
            &req(
                type_url::ENDPOINT,
                &["shop-stable"],
                "x",
                s.type_state(type_url::ENDPOINT)
                    .unwrap()
                    .sent_nonce
                    .clone()
                    .unwrap()
                    .as_str(),
            ),
            NOW,
        );
        let out = s.pending(&snap, "cp");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resources.len(), 1, "only the subscribed cluster");
    }

    #[test]
    fn a_weight_change_sends_only_routes() {
        let mut s = AdsStream::new();
        converge(&mut s, &Snapshot::build(&state(0, 8081), 1, 1));
        let out = s.pending(&Snapshot::build(&state(50, 8081), 2, 1), "cp");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].type_url, type_url::ROUTE);
    }

    #[test]
    fn a_cluster_change_resends_its_endpoints_after_the_ack() {
        let mut s = AdsStream::new();
        converge(&mut s, &Snapshot::build(&state(0, 8081), 1, 1));
        // A change to the clusters alone (say, a new connect timeout).
        let mut snap = Snapshot::build(&state(0, 8081), 2, 1);
        let eds_version = snap.get(type_url::ENDPOINT).unwrap().version.clone();
        snap.set_version_for_test(type_url::CLUSTER, "changed");
        let out = s.pending(&snap, "cp");
        assert_eq!(out[0].type_url, type_url::CLUSTER);
        assert!(
            s.pending(&snap, "cp").is_empty(),
            "EDS waits for the CDS ACK"
        );
        s.on_request(
            &req(type_url::CLUSTER, &[], &out[0].version_info, &out[0].nonce),
            NOW,
        );
        let out = s.pending(&snap, "cp");
        assert_eq!(out[0].type_url, type_url::ENDPOINT, "EDS follows CDS");
        assert_eq!(
            out[0].version_info, eds_version,
            "same endpoints, sent again"
        );
    }

    #[test]
    fn a_nack_is_recorded_and_not_resent() {
        let mut s = AdsStream::new();
        converge(&mut s, &Snapshot::build(&state(0, 8081), 1, 1));
        let bad = Snapshot::build(&state(0, 9999), 2, 1);
        let out = s.pending(&bad, "cp");
        assert_eq!(out[0].type_url, type_url::ENDPOINT);
        let ev = s.on_request(
            &nack(
                type_url::ENDPOINT,
                &["shop-canary", "shop-stable"],
                &out[0].nonce,
                "malformed",
            ),
            NOW,
        );
        let RequestEvent::Nack(n) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(n.version, out[0].version_info);
        assert_eq!(n.error, "malformed");
        // The NACK is itself a request; answering it with the same version
        // would be the go-control-plane loop. Nothing is due.
        assert!(s.pending(&bad, "cp").is_empty());
        assert!(s.pending(&bad, "cp").is_empty());
        assert_eq!(s.type_state(type_url::ENDPOINT).unwrap().responses_sent, 2);
        // A new desired state is sent.
        let fixed = Snapshot::build(&state(0, 8083), 3, 1);
        let out = s.pending(&fixed, "cp");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].type_url, type_url::ENDPOINT);
    }

    #[test]
    fn stale_nonces_are_ignored() {
        let mut s = AdsStream::new();
        let snap = Snapshot::build(&state(0, 8081), 1, 1);
        converge(&mut s, &snap);
        let first_nonce = s
            .type_state(type_url::ROUTE)
            .unwrap()
            .sent_nonce
            .clone()
            .unwrap();
        let out = s.pending(&Snapshot::build(&state(10, 8081), 2, 1), "cp");
        assert_eq!(out[0].type_url, type_url::ROUTE);
        let ev = s.on_request(
            &nack(type_url::ROUTE, &["understudy_routes"], &first_nonce, "old"),
            NOW,
        );
        assert!(matches!(ev, RequestEvent::Stale { .. }));
        assert!(s.type_state(type_url::ROUTE).unwrap().last_nack.is_none());
        assert!(s.type_state(type_url::ROUTE).unwrap().awaiting_reply);
    }

    #[test]
    fn every_stream_sends_the_snapshots_own_bytes() {
        let snap = Snapshot::build(&state(0, 8081), 1, 1);
        let (mut a, mut b) = (AdsStream::new(), AdsStream::new());
        for s in [&mut a, &mut b] {
            s.on_request(&req(type_url::CLUSTER, &[], "", ""), NOW);
        }
        let (ra, rb) = (a.pending(&snap, "cp"), b.pending(&snap, "cp"));
        let cds = snap.get(type_url::CLUSTER).unwrap();
        assert_eq!(ra[0].resources.len(), cds.encoded.len());
        for ((x, y), enc) in ra[0]
            .resources
            .iter()
            .zip(&rb[0].resources)
            .zip(cds.encoded.values())
        {
            // One allocation, encoded once, shared by both streams.
            assert!(Arc::ptr_eq(x, &enc.any) && Arc::ptr_eq(y, &enc.any));
        }
        // And Envoy reads the same resources as before.
        let decoded =
            DiscoveryResponse::decode(prost::Message::encode_to_vec(&ra[0]).as_slice()).unwrap();
        assert_eq!(
            decoded.resources,
            cds.resources.values().cloned().collect::<Vec<_>>()
        );
        assert_eq!(decoded.version_info, cds.version);
    }

    #[test]
    fn unknown_types_get_nothing() {
        let mut s = AdsStream::new();
        let ev = s.on_request(&req("type.googleapis.com/envoy.Whatever", &[], "", ""), NOW);
        assert!(matches!(ev, RequestEvent::Unknown { .. }));
        assert!(
            s.pending(&Snapshot::build(&state(0, 8081), 1, 1), "cp")
                .is_empty()
        );
    }
}
