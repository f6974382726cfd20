//! Which Envoys are connected and what each has accepted or rejected: the
//! data behind `GET /v1/envoys` and `GET /v1/nacks`.
//!
//! A stream registers on connect and is removed when its [`StreamGuard`]
//! drops, so per-connection state is freed however the stream ends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

use super::stream::{AdsStream, Nack, TypeState};
use crate::xds::resources::type_url;

/// NACKs kept for `GET /v1/nacks`, newest last; older ones are dropped.
pub const NACK_HISTORY: usize = 100;
/// Longest NACK error message kept, in bytes: Envoy's are a line or two, and
/// a peer's megabytes times [`NACK_HISTORY`] must not fill memory.
pub const MAX_NACK_ERROR_BYTES: usize = 2048;
/// Longest node id, type URL or version kept with a NACK, in bytes.
pub const MAX_NACK_FIELD_BYTES: usize = 256;

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvoyStatus {
    pub connection_id: u64,
    pub node_id: Option<String>,
    pub node_cluster: Option<String>,
    #[serde(with = "crate::time::serde_unix_ms")]
    pub connected_at: SystemTime,
    /// The ADS flavour of this stream: `sotw` (state of the world) or `delta`.
    pub protocol: &'static str,
    /// Keyed by short type name: `cds`, `eds`, `lds`, `rds`, `ecds`.
    pub types: BTreeMap<&'static str, TypeState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NackRecord {
    pub connection_id: u64,
    pub node_id: Option<String>,
    #[serde(flatten)]
    pub nack: Nack,
}

pub struct Registry {
    inner: Mutex<Inner>,
    /// Distinct node ids connected now: the fleet a fleet-wide limit is divided by.
    fleet: tokio::sync::watch::Sender<usize>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            fleet: tokio::sync::watch::channel(0).0,
        }
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    streams: BTreeMap<u64, EnvoyStatus>,
    /// Streams per node id, kept as streams change so counting the fleet
    /// costs nothing per update (a scan of 10,000 streams on every ACK of
    /// every stream would be quadratic in the fleet).
    nodes: HashMap<String, usize>,
    nacks: VecDeque<NackRecord>,
}

impl Inner {
    fn count_node(&mut self, node: Option<&str>, up: bool) {
        let Some(node) = node else { return };
        if up {
            let n = self.nodes.entry(node.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
        } else if let Some(n) = self.nodes.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.nodes.remove(node);
            }
        }
    }
}

/// Removes its stream from the registry when dropped.
pub struct StreamGuard {
    registry: Arc<Registry>,
    pub id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        {
            let mut inner = self.registry.lock();
            if let Some(gone) = inner.streams.remove(&self.id) {
                inner.count_node(gone.node_id.as_deref(), false);
            }
        }
        self.registry.publish_fleet();
    }
}

impl Registry {
    pub fn connect(self: &Arc<Self>, now: SystemTime) -> StreamGuard {
        self.connect_speaking(now, "sotw")
    }

    /// Registers a stream of the ADS flavour `protocol` (`sotw`, `delta`).
    pub fn connect_speaking(
        self: &Arc<Self>,
        now: SystemTime,
        protocol: &'static str,
    ) -> StreamGuard {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.streams.insert(
            id,
            EnvoyStatus {
                connection_id: id,
                node_id: None,
                node_cluster: None,
                connected_at: now,
                protocol,
                types: BTreeMap::new(),
            },
        );
        StreamGuard {
            registry: Arc::clone(self),
            id,
        }
    }

    /// Copies a stream's protocol state into its status entry.
    pub fn update(&self, id: u64, stream: &AdsStream) {
        self.update_with(
            id,
            stream.node_id(),
            stream.node_cluster(),
            stream
                .types()
                .filter(|(_, st)| st.subscribed)
                .map(|(url, st)| (url, st.clone())),
        );
    }

    /// Copies any stream's state (state of the world or delta) into its
    /// status entry: the node, and each subscribed type's status.
    pub fn update_with(
        &self,
        id: u64,
        node_id: Option<&str>,
        node_cluster: Option<&str>,
        types: impl Iterator<Item = (&'static str, TypeState)>,
    ) {
        {
            let mut inner = self.lock();
            let mut moved = None;
            if let Some(status) = inner.streams.get_mut(&id) {
                if status.node_id.as_deref() != node_id {
                    moved = Some(std::mem::replace(
                        &mut status.node_id,
                        node_id.map(str::to_owned),
                    ));
                }
                status.node_cluster = node_cluster.map(str::to_owned);
                status.types = types.map(|(url, st)| (type_url::short(url), st)).collect();
            }
            if let Some(old) = moved {
                inner.count_node(old.as_deref(), false);
                inner.count_node(node_id, true);
            }
        }
        self.publish_fleet();
    }

    /// Watches the number of distinct connected Envoys.
    pub fn fleet(&self) -> tokio::sync::watch::Receiver<usize> {
        self.fleet.subscribe()
    }

    fn publish_fleet(&self) {
        let n = self.lock().nodes.len();
        self.fleet
            .send_if_modified(|current| std::mem::replace(current, n) != n);
    }

    /// Keeps a NACK, its peer-supplied texts cut to bounded lengths.
    pub fn record_nack(&self, id: u64, node_id: Option<&str>, mut nack: Nack) {
        nack.error = cut(nack.error, MAX_NACK_ERROR_BYTES);
        nack.type_url = cut(nack.type_url, MAX_NACK_FIELD_BYTES);
        nack.version = cut(nack.version, MAX_NACK_FIELD_BYTES);
        let node_id = node_id.map(|n| cut(n.to_owned(), MAX_NACK_FIELD_BYTES));
        let mut inner = self.lock();
        if inner.nacks.len() == NACK_HISTORY {
            inner.nacks.pop_front();
        }
        inner.nacks.push_back(NackRecord {
            connection_id: id,
            node_id,
            nack,
        });
    }

    pub fn envoys(&self) -> Vec<EnvoyStatus> {
        self.lock().streams.values().cloned().collect()
    }

    pub fn nacks(&self) -> Vec<NackRecord> {
        self.lock().nacks.iter().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_freed_on_drop_and_nacks_are_bounded() {
        let r = Arc::new(Registry::default());
        let g1 = r.connect(SystemTime::UNIX_EPOCH);
        let g2 = r.connect(SystemTime::UNIX_EPOCH);
        assert_eq!(r.envoys().len(), 2);
        drop(g1);
        let left: Vec<u64> = r.envoys().iter().map(|e| e.connection_id).collect();
        assert_eq!(left, vec![g2.id]);
        for i in 0..(NACK_HISTORY + 5) {
            r.record_nack(
                g2.id,
                Some("n"),
                Nack {
                    type_url: "t".into(),
                    version: i.to_string(),
                    error: "e".into(),
                    at: SystemTime::UNIX_EPOCH,
                },
            );
        }
        let nacks = r.nacks();
        assert_eq!(nacks.len(), NACK_HISTORY);
        assert_eq!(nacks[0].nack.version, "5", "oldest dropped first");
    }

    #[test]
    fn the_fleet_counts_distinct_nodes_as_streams_come_and_go() {
        let r = Arc::new(Registry::default());
        let fleet = r.fleet();
        let update = |id, node: Option<&str>| r.update_with(id, node, None, std::iter::empty());
        let a1 = r.connect(SystemTime::UNIX_EPOCH);
        let a2 = r.connect(SystemTime::UNIX_EPOCH);
        let b = r.connect(SystemTime::UNIX_EPOCH);
        update(a1.id, Some("a"));
        update(a2.id, Some("a"));
        update(b.id, None);
        assert_eq!(*fleet.borrow(), 1);
        update(b.id, Some("b"));
        assert_eq!(*fleet.borrow(), 2);
        update(b.id, Some("b"));
        assert_eq!(*fleet.borrow(), 2);
        drop(a1);
        assert_eq!(*fleet.borrow(), 2, "a still has a stream");
        drop(a2);
        assert_eq!(*fleet.borrow(), 1);
        drop(b);
        assert_eq!(*fleet.borrow(), 0);
    }

    #[test]
    fn nack_texts_are_bounded() {
        let r = Arc::new(Registry::default());
        let g = r.connect(SystemTime::UNIX_EPOCH);
        let long = "é".repeat(1_000_000);
        r.record_nack(
            g.id,
            Some(&long),
            Nack {
                type_url: long.clone(),
                version: long.clone(),
                error: long.clone(),
                at: SystemTime::UNIX_EPOCH,
            },
        );
        let n = &r.nacks()[0];
        assert!(n.nack.error.len() <= MAX_NACK_ERROR_BYTES);
        assert!(n.nack.error.starts_with("éé"));
        assert!(n.nack.version.len() <= MAX_NACK_FIELD_BYTES);
        assert!(n.nack.type_url.len() <= MAX_NACK_FIELD_BYTES);
        assert!(n.node_id.as_ref().unwrap().len() <= MAX_NACK_FIELD_BYTES);
    }
}
