//! What both ADS protocols ([`super::stream`], [`super::delta`]) keep per
//! stream besides their own per-type state: the node Envoy named (on its
//! first request only), one entry per type URL served, in make-before-break
//! order ([`type_url::ORDER`]), and the nonce counter.

use envoy_types::pb::envoy::config::core::v3::Node;

use crate::xds::resources::type_url;

#[derive(Debug, Clone)]
pub struct TypeTable<S> {
    node_id: Option<String>,
    node_cluster: Option<String>,
    /// In [`type_url::ORDER`].
    pub types: Vec<(&'static str, S)>,
    next_nonce: u64,
}

impl<S: Default> Default for TypeTable<S> {
    fn default() -> Self {
        Self {
            node_id: None,
            node_cluster: None,
            types: type_url::ORDER.iter().map(|t| (*t, S::default())).collect(),
            next_nonce: 0,
        }
    }
}

impl<S> TypeTable<S> {
    /// Envoy sends its node only on the first request of a stream.
    pub fn note_node(&mut self, node: Option<&Node>) {
        if let Some(node) = node {
            self.node_id = Some(node.id.clone());
            self.node_cluster = Some(node.cluster.clone());
        }
    }

    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    pub fn node_cluster(&self) -> Option<&str> {
        self.node_cluster.as_deref()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &S)> {
        self.types.iter().map(|(t, s)| (*t, s))
    }

    pub fn get(&self, type_url: &str) -> Option<&S> {
        self.types
            .iter()
            .find(|(t, _)| *t == type_url)
            .map(|(_, s)| s)
    }

    /// A served type's state (and its URL), or `None` for a type we do not serve.
    pub fn get_mut(&mut self, type_url: &str) -> Option<(&'static str, &mut S)> {
        self.types
            .iter_mut()
            .find(|(t, _)| *t == type_url)
            .map(|(t, s)| (*t, s))
    }

    /// The next response's nonce.
    pub fn nonce(&mut self) -> String {
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.next_nonce.to_string()
    }
}
