//! Responses written from shared, pre-encoded resources.
//!
//! prost's `DiscoveryResponse` owns its resources (`Vec<Any>`, each `Any`
//! owning a `Vec<u8>`), so a push to N streams built from those types copies
//! every resource N times and encodes it N times. [`Wire`] is the same
//! message on the wire, but its repeated `resources` field (tag 2 in both
//! `DiscoveryResponse` and `DeltaDiscoveryResponse`) is a list of `Arc`s to
//! bytes encoded once per snapshot ([`crate::xds::resources::Encoded`]).
//! Protobuf lets fields appear in any order, so the head (type URL, version,
//! nonce, ...) is encoded by prost and the resources are appended as they
//! are. A client decodes a [`Wire`] as the ordinary message.

use std::ops::Deref;
use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};

/// The `resources` field's number in both ADS response messages.
pub const RESOURCES_TAG: u32 = 2;

/// An ADS response: `head` without resources, plus the shared resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wire<H> {
    pub head: H,
    /// Each element is one encoded `Any` (state of the world) or `Resource` (delta).
    pub resources: Vec<Arc<[u8]>>,
}

impl<H> Wire<H> {
    pub fn new(head: H, resources: Vec<Arc<[u8]>>) -> Self {
        Self { head, resources }
    }

    /// Bytes of resources this response carries (shared, not copied).
    pub fn resource_bytes(&self) -> usize {
        self.resources.iter().map(|r| r.len()).sum()
    }
}

/// Reads the head's fields (`type_url`, `nonce`, ...) directly.
impl<H> Deref for Wire<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.head
    }
}

impl<H: Message + Default> Message for Wire<H> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.head.encode_raw(buf);
        for r in &self.resources {
            encoding::encode_key(RESOURCES_TAG, WireType::LengthDelimited, buf);
            encoding::encode_varint(r.len() as u64, buf);
            buf.put_slice(r);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == RESOURCES_TAG {
            let mut bytes: Vec<u8> = Vec::new();
            encoding::bytes::merge(wire_type, &mut bytes, buf, ctx)?;
            self.resources.push(bytes.into());
            Ok(())
        } else {
            self.head.merge_field(tag, wire_type, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        let key = encoding::key_len(RESOURCES_TAG);
        self.resources.iter().fold(self.head.encoded_len(), |n, r| {
            n.saturating_add(key)
                .saturating_add(encoding::encoded_len_varint(r.len() as u64))
                .saturating_add(r.len())
        })
    }

    fn clear(&mut self) {
        self.head.clear();
        self.resources.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource,
    };
    use envoy_types::pb::google::protobuf::Any;

    #[test]
    fn a_wire_response_decodes_as_the_ordinary_message() {
        let any = Any {
            type_url: "t".into(),
            value: vec![1, 2, 3],
        };
        let head = DiscoveryResponse {
            version_info: "v1".into(),
            type_url: "t".into(),
            nonce: "7".into(),
            ..Default::default()
        };
        let shared: Arc<[u8]> = any.encode_to_vec().into();
        let wire = Wire::new(head.clone(), vec![Arc::clone(&shared), shared]);
        let bytes = wire.encode_to_vec();
        assert_eq!(bytes.len(), wire.encoded_len());
        let plain = DiscoveryResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            plain,
            DiscoveryResponse {
                resources: vec![any.clone(), any.clone()],
                ..head
            }
        );
        // And back: a Wire decodes what prost wrote (fields in another order).
        let again = Wire::<DiscoveryResponse>::decode(plain.encode_to_vec().as_slice()).unwrap();
        assert_eq!(again.resources.len(), 2);
        assert_eq!(
            DiscoveryResponse::decode(again.encode_to_vec().as_slice()).unwrap(),
            plain
        );

        let res = Resource {
            name: "n".into(),
            version: "1".into(),
            resource: Some(any),
            ..Default::default()
        };
        let delta = Wire::new(
            DeltaDiscoveryResponse {
                removed_resources: vec!["gone".into()],
                ..Default::default()
            },
            vec![res.encode_to_vec().into()],
        );
        let plain = DeltaDiscoveryResponse::decode(delta.encode_to_vec().as_slice()).unwrap();
        assert_eq!(plain.resources, vec![res]);
        assert_eq!(plain.removed_resources, vec!["gone".to_string()]);
    }
}
