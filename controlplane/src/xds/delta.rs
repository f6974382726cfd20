//! The delta (incremental) ADS protocol for one Envoy connection, as a plain
//! state machine beside [`crate::xds::stream`]: feed it each
//! [`DeltaDiscoveryRequest`] ([`DeltaStream::on_request`]) and ask it what to
//! send for the current snapshot ([`DeltaStream::pending`]). No I/O.
//!
//! Rules it enforces:
//! - **Per resource versions**: each resource's version is a hash of its
//!   encoded bytes ([`crate::xds::resources::Encoded`]). The stream remembers
//!   which version of each name Envoy has (or was last sent), and a response
//!   carries only the resources whose version differs, plus
//!   `removed_resources` for names Envoy has that the snapshot no longer holds.
//! - **Subscriptions**: `resource_names_subscribe`/`unsubscribe` are applied
//!   from every request, even one with a stale nonce (delta subscriptions are
//!   changes, and dropping one would lose it). CDS and LDS are wildcard when
//!   their first request names nothing, or when a request subscribes `*`;
//!   unsubscribing `*` ends the wildcard.
//! - **Reconnects**: the first request of a type may carry
//!   `initial_resource_versions`; what Envoy already has at the current
//!   version is not sent again, and what it has that no longer exists is
//!   removed. The first request of each type is always answered (possibly
//!   with no resources) so Envoy's initial fetch completes and the ACK shows
//!   the stream is in step.
//! - **Make before break** as in state of the world: CDS, EDS, LDS, RDS,
//!   ECDS, one type awaiting its ACK at a time; a CDS response makes EDS
//!   send its subscribed endpoints again (a changed cluster warms until it
//!   gets them).
//! - **No NACK loop**: a NACKed response's versions count as sent; the next
//!   send for those names happens only when their content changes.
//! - **Bounds**: at most [`MAX_NAMES_PER_TYPE`] names per type and
//!   [`MAX_NAME_BYTES`] bytes per name or version; a request over them ends
//!   the stream ([`RequestEvent::Invalid`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

use super::stream::{Nack, RequestEvent, TypeState};
use crate::xds::resources::{Snapshot, type_url};
use crate::xds::table::TypeTable;
use crate::xds::wire::Wire;

/// Names one stream may subscribe to (or claim to have) per type. Understudy
/// serves a handful per service; Envoy asks only for what it was given.
pub const MAX_NAMES_PER_TYPE: usize = 4096;
/// Longest resource name or version a peer may send, in bytes.
pub const MAX_NAME_BYTES: usize = 512;

/// The subscription name meaning "every resource of this type".
pub const WILDCARD: &str = "*";

/// Bookkeeping for one type URL on one delta stream.
#[derive(Debug, Clone, Default)]
pub struct DeltaTypeState {
    /// Envoy has sent a request for this type.
    pub subscribed: bool,
    pub wildcard: bool,
    /// Names subscribed explicitly (besides the wildcard).
    pub names: BTreeSet<String>,
    /// What Envoy has, name → version: seeded from `initial_resource_versions`
    /// and updated as responses go out.
    pub known: BTreeMap<String, String>,
    /// The first request is answered even when nothing differs.
    answer_due: bool,
    /// Send every subscribed resource again (EDS after CDS).
    resend_all: bool,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub awaiting_reply: bool,
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub responses_sent: u64,
}

impl DeltaTypeState {
    /// The status the API shows, in the same shape as state of the world's.
    pub fn status(&self) -> TypeState {
        let mut t = TypeState::default();
        t.subscribed = self.subscribed;
        t.resource_names = self.names.clone();
        t.sent_version = self.sent_version.clone();
        t.sent_nonce = self.sent_nonce.clone();
        t.awaiting_reply = self.awaiting_reply;
        t.acked_version = self.acked_version.clone();
        t.last_nack = self.last_nack.clone();
        t.responses_sent = self.responses_sent;
        t
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One delta ADS stream's protocol state.
#[derive(Debug, Clone)]
pub struct DeltaStream {
    table: TypeTable<DeltaTypeState>,
}

impl Default for DeltaStream {
    fn default() -> Self {
        Self::new()
    }
}

fn too_long(s: &str) -> bool {
    s.len() > MAX_NAME_BYTES
}

impl DeltaStream {
    pub fn new() -> Self {
        Self {
            table: TypeTable::default(),
        }
    }

    pub fn node_id(&self) -> Option<&str> {
        self.table.node_id()
    }

    pub fn node_cluster(&self) -> Option<&str> {
        self.table.node_cluster()
    }

    pub fn types(&self) -> impl Iterator<Item = (&'static str, &DeltaTypeState)> {
        self.table.iter()
    }

    pub fn type_state(&self, type_url: &str) -> Option<&DeltaTypeState> {
        self.table.get(type_url)
    }

    /// Records what a request says: subscription changes, then ACK or NACK.
    pub fn on_request(&mut self, req: &DeltaDiscoveryRequest, now: SystemTime) -> RequestEvent {
        self.table.note_node(req.node.as_ref());
        let Some((url, st)) = self.table.get_mut(&req.type_url) else {
            return RequestEvent::Unknown {
                type_url: req.type_url.clone(),
            };
        };
        let url: &'static str = url;
        if let Some(reason) = over_bounds(req) {
            return RequestEvent::Invalid { reason };
        }
        let first = !st.subscribed;
        if first {
            st.subscribed = true;
            st.answer_due = true;
            // Legacy wildcard: a first CDS/LDS request that names nothing.
            st.wildcard = req.resource_names_subscribe.is_empty()
                && matches!(url, type_url::CLUSTER | type_url::LISTENER);
            // Only the first request may say what Envoy already has.
            st.known = req
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
        }
        for name in &req.resource_names_subscribe {
            if name == WILDCARD {
                st.wildcard = true;
            } else {
                st.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == WILDCARD {
                st.wildcard = false;
            } else {
                st.names.remove(name);
            }
        }
        // Envoy forgets what it unsubscribed from; so do we.
        let DeltaTypeState {
            known,
            wildcard,
            names,
            ..
        } = st;
        known.retain(|n, _| *wildcard || names.contains(n));
        if st.names.len() > MAX_NAMES_PER_TYPE || st.known.len() > MAX_NAMES_PER_TYPE {
            return RequestEvent::Invalid {
                reason: format!("more than {MAX_NAMES_PER_TYPE} resource names for one type"),
            };
        }
        let type_url = req.type_url.clone();
        if req.response_nonce.is_empty() {
            return RequestEvent::Subscribed { type_url };
        }
        if st.sent_nonce.as_deref() != Some(req.response_nonce.as_str()) {
            return RequestEvent::Stale { type_url };
        }
        st.awaiting_reply = false;
        let version = st.sent_version.clone().unwrap_or_default();
        match &req.error_detail {
            Some(status) => {
                let nack = Nack {
                    type_url,
                    version,
                    error: status.message.clone(),
                    at: now,
                };
                st.last_nack = Some(nack.clone());
                RequestEvent::Nack(nack)
            }
            None => {
                st.acked_version = Some(version.clone());
                RequestEvent::Ack { type_url, version }
            }
        }
    }

    /// The responses to send now for `snapshot`, in order (at most one: the
    /// next type waits for this one's ACK). Nothing when nothing is due.
    pub fn pending(
        &mut self,
        snapshot: &Snapshot,
        control_plane_id: &str,
    ) -> Vec<Wire<DeltaDiscoveryResponse>> {
        let mut out = Vec::new();
        for i in 0..self.table.types.len() {
            let (url, st) = &mut self.table.types[i];
            let url: &'static str = url;
            if st.awaiting_reply {
                break;
            }
            if !st.subscribed {
                continue;
            }
            let Some(desired) = snapshot.get(url) else {
                continue;
            };
            let mut resources = Vec::new();
            let mut updated = Vec::new();
            for (name, enc) in &desired.encoded {
                if st.wants(name) && (st.resend_all || st.known.get(name) != Some(&enc.version)) {
                    resources.push(Arc::clone(&enc.delta));
                    updated.push((name.clone(), enc.version.clone()));
                }
            }
            let removed: Vec<String> = st
                .known
                .keys()
                .filter(|n| !desired.encoded.contains_key(*n))
                .cloned()
                .collect();
            st.resend_all = false;
            if resources.is_empty() && removed.is_empty() && !st.answer_due {
                continue;
            }
            st.answer_due = false;
            for (name, version) in updated {
                st.known.insert(name, version);
            }
            for name in &removed {
                st.known.remove(name);
            }
            let nonce = self.table.nonce();
            let st = &mut self.table.types[i].1;
            st.sent_version = Some(desired.version.clone());
            st.sent_nonce = Some(nonce.clone());
            st.awaiting_reply = true;
            st.responses_sent = st.responses_sent.saturating_add(1);
            let pushed_clusters = url == type_url::CLUSTER && !resources.is_empty();
            out.push(Wire::new(
                DeltaDiscoveryResponse {
                    system_version_info: desired.version.clone(),
                    type_url: url.to_owned(),
                    removed_resources: removed,
                    nonce,
                    control_plane: Some(ControlPlane {
                        identifier: control_plane_id.to_owned(),
                    }),
                    ..Default::default()
                },
                resources,
            ));
            if pushed_clusters && let Some((_, eds)) = self.table.get_mut(type_url::ENDPOINT) {
                eds.resend_all = true;
            }
            break;
        }
        out
    }
}

/// Why a request breaks a bound, if it does.
fn over_bounds(req: &DeltaDiscoveryRequest) -> Option<String> {
    let lists = req.resource_names_subscribe.len() > MAX_NAMES_PER_TYPE
        || req.resource_names_unsubscribe.len() > MAX_NAMES_PER_TYPE
        || req.initial_resource_versions.len() > MAX_NAMES_PER_TYPE;
    if lists {
        return Some(format!(
            "more than {MAX_NAMES_PER_TYPE} resource names in one request"
        ));
    }
    let long = req
        .resource_names_subscribe
        .iter()
        .chain(&req.resource_names_unsubscribe)
        .any(|n| too_long(n))
        || req
            .initial_resource_versions
            .iter()
            .any(|(n, v)| too_long(n) || too_long(v));
    long.then(|| format!("a resource name or version longer than {MAX_NAME_BYTES} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredState;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::rpc::Status;
    use prost::Message;

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;
    const EDS_NAMES: [&str; 2] = ["shop-canary", "shop-stable"];

    fn state(weight: u32, stable_port: u16) -> DesiredState {
        crate::model::fixtures::state(weight, stable_port, true)
    }

    fn snap(weight: u32, port: u16, generation: u64) -> Snapshot {
        Snapshot::build(&state(weight, port), generation, 1)
    }

    fn sub(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ack(type_url: &str, nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(type_url: &str, nonce: &str, msg: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..ack(type_url, nonce)
        }
    }

    /// The response as Envoy decodes it.
    fn decoded(w: &Wire<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse::decode(w.encode_to_vec().as_slice()).unwrap()
    }

    fn names(w: &Wire<DeltaDiscoveryResponse>) -> Vec<String> {
        decoded(w).resources.into_iter().map(|r| r.name).collect()
    }

    /// Plays Envoy's startup (CDS and LDS wildcard, then EDS, RDS and ECDS
    /// by name), ACKing each response; returns the short types in send order.
    fn converge(s: &mut DeltaStream, snap: &Snapshot) -> Vec<String> {
        let mut order = vec![];
        s.on_request(
            &DeltaDiscoveryRequest {
                node: Some(Node {
                    id: "envoy-1".into(),
                    ..Default::default()
                }),
                ..sub(type_url::CLUSTER, &[])
            },
            NOW,
        );
        s.on_request(&sub(type_url::LISTENER, &[]), NOW);
        for _ in 0..10 {
            let out = s.pending(snap, "cp");
            let Some(resp) = out.first() else { break };
            assert_eq!(out.len(), 1, "one type at a time");
            order.push(type_url::short(&resp.type_url).to_string());
            match resp.type_url.as_str() {
                type_url::CLUSTER => {
                    s.on_request(&sub(type_url::ENDPOINT, &EDS_NAMES), NOW);
                }
                type_url::LISTENER => {
                    s.on_request(&sub(type_url::ROUTE, &["understudy_routes"]), NOW);
                    s.on_request(&sub(type_url::EXTENSION_CONFIG, &["understudy"]), NOW);
                }
                _ => {}
            }
            let ev = s.on_request(&ack(&resp.type_url, &resp.nonce), NOW);
            assert!(matches!(ev, RequestEvent::Ack { .. }), "{ev:?}");
        }
        order
    }

    #[test]
    fn startup_goes_out_in_make_before_break_order_and_then_rests() {
        let snap = snap(0, 8081, 1);
        let mut s = DeltaStream::new();
        assert_eq!(
            converge(&mut s, &snap),
            ["cds", "eds", "lds", "rds", "ecds"]
        );
        assert_eq!(s.node_id(), Some("envoy-1"));
        assert!(
            s.pending(&snap, "cp").is_empty(),
            "nothing more once converged"
        );
        for (url, st) in s.types() {
            assert_eq!(st.responses_sent, 1, "{url}");
            assert_eq!(st.acked_version, st.sent_version);
            assert_eq!(
                st.known.len(),
                snap.get(url).unwrap().encoded.len(),
                "{url}: Envoy has every resource"
            );
        }
    }

    #[test]
    fn responses_carry_per_resource_versions_of_the_shared_bytes() {
        let snap = snap(0, 8081, 1);
        let mut s = DeltaStream::new();
        s.on_request(&sub(type_url::CLUSTER, &[]), NOW);
        let out = s.pending(&snap, "cp");
        let resp = decoded(&out[0]);
        let cds = snap.get(type_url::CLUSTER).unwrap();
        assert_eq!(resp.system_version_info, cds.version);
        assert_eq!(resp.resources.len(), cds.encoded.len());
        for r in &resp.resources {
            let enc = &cds.encoded[&r.name];
            assert_eq!(r.version, enc.version);
            assert_eq!(r.resource.as_ref(), cds.resources.get(&r.name));
        }
        // The very same allocation as the snapshot's, not a copy.
        let first = cds.encoded.values().next().unwrap();
        assert!(Arc::ptr_eq(&out[0].resources[0], &first.delta));
    }

    #[test]
    fn a_weight_change_sends_only_the_route_resource() {
        let mut s = DeltaStream::new();
        converge(&mut s, &snap(0, 8081, 1));
        let out = s.pending(&snap(50, 8081, 2), "cp");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].type_url, type_url::ROUTE);
        assert_eq!(names(&out[0]), ["understudy_routes"]);
        assert!(out[0].removed_resources.is_empty());
    }

    #[test]
    fn only_changed_resources_go_out_and_deleted_ones_are_removed() {
        let mut s = DeltaStream::new();
        converge(&mut s, &snap(0, 8081, 1));
        // The stable endpoints move: only that assignment is sent.
        let moved = snap(0, 8082, 2);
        let out = s.pending(&moved, "cp");
        assert_eq!(out[0].type_url, type_url::ENDPOINT);
        assert_eq!(names(&out[0]), ["shop-stable"]);
        s.on_request(&ack(type_url::ENDPOINT, &out[0].nonce), NOW);
        // The service goes away: its clusters are removed by name.
        let mut empty = state(0, 8082);
        empty.services.clear();
        let gone = Snapshot::build(&empty, 3, 1);
        let out = s.pending(&gone, "cp");
        assert_eq!(out[0].type_url, type_url::CLUSTER);
        assert!(out[0].resources.is_empty());
        let mut removed = out[0].removed_resources.clone();
        removed.sort();
        assert_eq!(removed, EDS_NAMES);
        assert!(s.type_state(type_url::CLUSTER).unwrap().known.is_empty());
    }

    #[test]
    fn subscriptions_are_honoured_and_unsubscribed_names_forgotten() {
        let snap = snap(0, 8081, 1);
        let mut s = DeltaStream::new();
        s.on_request(&sub(type_url::ENDPOINT, &["shop-stable"]), NOW);
        let out = s.pending(&snap, "cp");
        assert_eq!(
            names(&out[0]),
            ["shop-stable"],
            "EDS is never wildcard by default"
        );
        s.on_request(&ack(type_url::ENDPOINT, &out[0].nonce), NOW);
        // Subscribing another name sends just that one.
        s.on_request(&sub(type_url::ENDPOINT, &["shop-canary"]), NOW);
        let out = s.pending(&snap, "cp");
        assert_eq!(names(&out[0]), ["shop-canary"]);
        s.on_request(&ack(type_url::ENDPOINT, &out[0].nonce), NOW);
        // Unsubscribing drops it without a removal, and a later change to
        // it is not sent.
        s.on_request(
            &DeltaDiscoveryRequest {
                type_url: type_url::ENDPOINT.into(),
                resource_names_unsubscribe: vec!["shop-canary".into()],
                ..Default::default()
            },
            NOW,
        );
        assert!(s.pending(&snap, "cp").is_empty());
        let st = s.type_state(type_url::ENDPOINT).unwrap();
        assert_eq!(st.known.keys().collect::<Vec<_>>(), ["shop-stable"]);
        // A name that does not exist is not invented.
        s.on_request(&sub(type_url::ENDPOINT, &["nope"]), NOW);
        assert!(s.pending(&snap, "cp").is_empty());
    }

    #[test]
    fn the_explicit_wildcard_and_its_unsubscription() {
        let snap = snap(0, 8081, 1);
        let mut s = DeltaStream::new();
        // A first CDS request naming a cluster is not wildcard...
        s.on_request(&sub(type_url::CLUSTER, &["shop-stable"]), NOW);
        assert!(!s.type_state(type_url::CLUSTER).unwrap().wildcard);
        let out = s.pending(&snap, "cp");
        assert_eq!(names(&out[0]), ["shop-stable"]);
        // ...until it subscribes `*`, and gets the rest.
        let mut req = sub(type_url::CLUSTER, &[WILDCARD]);
        req.response_nonce = out[0].nonce.clone();
        s.on_request(&req, NOW);
        let out = s.pending(&snap, "cp");
        assert_eq!(names(&out[0]), ["shop-canary"]);
        s.on_request(&ack(type_url::CLUSTER, &out[0].nonce), NOW);
        // Dropping `*` keeps the explicit name only.
        s.on_request(
            &DeltaDiscoveryRequest {
                type_url: type_url::CLUSTER.into(),
                resource_names_unsubscribe: vec![WILDCARD.into()],
                ..Default::default()
            },
            NOW,
        );
        let st = s.type_state(type_url::CLUSTER).unwrap();
        assert!(!st.wildcard);
        assert_eq!(st.known.keys().collect::<Vec<_>>(), ["shop-stable"]);
    }

    #[test]
    fn a_reconnect_does_not_resend_what_envoy_has() {
        let old = snap(0, 8081, 1);
        let mut first = DeltaStream::new();
        converge(&mut first, &old);
        let have = |url: &str| -> std::collections::HashMap<String, String> {
            first
                .type_state(url)
                .unwrap()
                .known
                .clone()
                .into_iter()
                .collect()
        };
        // The control plane restarted; meanwhile only the weight changed.
        let now = snap(30, 8081, 2);
        let mut s = DeltaStream::new();
        let mut counts = BTreeMap::new();
        for (url, names) in [
            (type_url::CLUSTER, vec![]),
            (type_url::ENDPOINT, EDS_NAMES.to_vec()),
            (type_url::LISTENER, vec![]),
            (type_url::ROUTE, vec!["understudy_routes"]),
            (type_url::EXTENSION_CONFIG, vec!["understudy"]),
        ] {
            let mut req = sub(url, &names);
            req.initial_resource_versions = have(url);
            s.on_request(&req, NOW);
        }
        for _ in 0..10 {
            let out = s.pending(&now, "cp");
            let Some(resp) = out.first() else { break };
            counts.insert(type_url::short(&resp.type_url), names(resp));
            s.on_request(&ack(&resp.type_url, &resp.nonce), NOW);
        }
        // Every type answered once, but only the route carries anything.
        assert_eq!(counts.len(), 5, "{counts:?}");
        for (t, sent) in &counts {
            if *t == "rds" {
                assert_eq!(sent, &["understudy_routes"]);
            } else {
                assert!(sent.is_empty(), "{t}: resent {sent:?}");
            }
        }
        // A version Envoy claims for a resource that no longer exists is removed.
        let mut s = DeltaStream::new();
        let mut req = sub(type_url::CLUSTER, &[]);
        req.initial_resource_versions = [("old-cluster".to_string(), "1".to_string())].into();
        s.on_request(&req, NOW);
        let out = s.pending(&now, "cp");
        assert_eq!(out[0].removed_resources, ["old-cluster"]);
        assert_eq!(out[0].resources.len(), 2);
    }

    #[test]
    fn a_cluster_change_resends_the_endpoints_after_the_ack() {
        let mut s = DeltaStream::new();
        converge(&mut s, &snap(0, 8081, 1));
        // A new cluster version (as if its connect timeout changed).
        s.table.types[0]
            .1
            .known
            .insert("shop-stable".into(), "older".into());
        let snap = snap(0, 8081, 2);
        let out = s.pending(&snap, "cp");
        assert_eq!(out[0].type_url, type_url::CLUSTER);
        assert_eq!(names(&out[0]), ["shop-stable"]);
        assert!(
            s.pending(&snap, "cp").is_empty(),
            "EDS waits for the CDS ACK"
        );
        s.on_request(&ack(type_url::CLUSTER, &out[0].nonce), NOW);
        let out = s.pending(&snap, "cp");
        assert_eq!(out[0].type_url, type_url::ENDPOINT, "EDS follows CDS");
        assert_eq!(names(&out[0]), EDS_NAMES, "unchanged endpoints, sent again");
    }

    #[test]
    fn a_nack_is_recorded_and_not_resent() {
        let mut s = DeltaStream::new();
        converge(&mut s, &snap(0, 8081, 1));
        let bad = snap(0, 9999, 2);
        let out = s.pending(&bad, "cp");
        assert_eq!(out[0].type_url, type_url::ENDPOINT);
        let ev = s.on_request(&nack(type_url::ENDPOINT, &out[0].nonce, "malformed"), NOW);
        let RequestEvent::Nack(n) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(n.version, out[0].system_version_info);
        assert_eq!(n.error, "malformed");
        let st = s.type_state(type_url::ENDPOINT).unwrap();
        assert_ne!(st.acked_version.as_ref(), Some(&n.version));
        assert!(s.pending(&bad, "cp").is_empty(), "no NACK loop");
        assert!(s.pending(&bad, "cp").is_empty());
        assert_eq!(s.type_state(type_url::ENDPOINT).unwrap().responses_sent, 2);
        // A new desired state goes out.
        let out = s.pending(&snap(0, 8083, 3), "cp");
        assert_eq!(out[0].type_url, type_url::ENDPOINT);
        assert_eq!(names(&out[0]), ["shop-stable"]);
    }

    #[test]
    fn stale_nonces_change_subscriptions_but_not_acks() {
        let mut s = DeltaStream::new();
        let snap1 = snap(0, 8081, 1);
        converge(&mut s, &snap1);
        let old = s
            .type_state(type_url::ROUTE)
            .unwrap()
            .sent_nonce
            .clone()
            .unwrap();
        let out = s.pending(&snap(10, 8081, 2), "cp");
        assert_eq!(out[0].type_url, type_url::ROUTE);
        let ev = s.on_request(&nack(type_url::ROUTE, &old, "old"), NOW);
        assert!(matches!(ev, RequestEvent::Stale { .. }));
        let st = s.type_state(type_url::ROUTE).unwrap();
        assert!(st.last_nack.is_none());
        assert!(st.awaiting_reply);
        // A stale request still carries its subscription change.
        let mut req = sub(type_url::EXTENSION_CONFIG, &["another"]);
        req.response_nonce = "12345".into();
        assert!(matches!(
            s.on_request(&req, NOW),
            RequestEvent::Stale { .. }
        ));
        assert!(
            s.type_state(type_url::EXTENSION_CONFIG)
                .unwrap()
                .names
                .contains("another")
        );
    }

    #[test]
    fn hostile_requests_are_bounded() {
        let mut s = DeltaStream::new();
        let many: Vec<String> = (0..=MAX_NAMES_PER_TYPE).map(|i| format!("n{i}")).collect();
        let mut req = sub(type_url::ENDPOINT, &[]);
        req.resource_names_subscribe = many.clone();
        assert!(matches!(
            s.on_request(&req, NOW),
            RequestEvent::Invalid { .. }
        ));
        // Two requests of half each also cross the bound.
        let (a, b) = many.split_at(many.len() / 2);
        req.resource_names_subscribe = a.to_vec();
        assert!(matches!(
            s.on_request(&req, NOW),
            RequestEvent::Subscribed { .. }
        ));
        req.resource_names_subscribe = b.to_vec();
        assert!(matches!(
            s.on_request(&req, NOW),
            RequestEvent::Invalid { .. }
        ));
        let mut s = DeltaStream::new();
        let long = sub(type_url::ROUTE, &[&"x".repeat(MAX_NAME_BYTES + 1)]);
        assert!(matches!(
            s.on_request(&long, NOW),
            RequestEvent::Invalid { .. }
        ));
        let mut req = sub(type_url::CLUSTER, &[]);
        req.initial_resource_versions = [("c".into(), "v".repeat(MAX_NAME_BYTES + 1))].into();
        assert!(matches!(
            s.on_request(&req, NOW),
            RequestEvent::Invalid { .. }
        ));
    }

    #[test]
    fn unknown_types_get_nothing() {
        let mut s = DeltaStream::new();
        let ev = s.on_request(&sub("type.googleapis.com/envoy.Whatever", &[]), NOW);
        assert!(matches!(ev, RequestEvent::Unknown { .. }));
        assert!(s.pending(&snap(0, 8081, 1), "cp").is_empty());
    }

    #[test]
    fn resources_decode_as_envoy_reads_them() {
        let snap = snap(0, 8081, 1);
        let mut s = DeltaStream::new();
        s.on_request(&sub(type_url::ROUTE, &["understudy_routes"]), NOW);
        let out = s.pending(&snap, "cp");
        let r: &Resource = &decoded(&out[0]).resources[0];
        let rds = snap.get(type_url::ROUTE).unwrap();
        assert_eq!(r.name, "understudy_routes");
        assert_eq!(r.resource.as_ref(), rds.resources.get("understudy_routes"));
    }
}
