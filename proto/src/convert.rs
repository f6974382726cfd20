//! The one mapping between the core's comparison enums and the report
//! proto's: the filter encodes with `From`, the control plane decodes with
//! `TryFrom` (a peer may send any number), and the API shows the core's
//! names ([`DiffKind::name`]), so each kind is spelled in one place.

use understudy_core::compare::{Bucket, DiffKind};

use crate::v1::difference;

impl From<DiffKind> for difference::Kind {
    fn from(k: DiffKind) -> Self {
        match k {
            DiffKind::StatusChange => Self::Status,
            DiffKind::MissingField => Self::MissingField,
            DiffKind::ExtraField => Self::ExtraField,
            DiffKind::TypeChange => Self::TypeChange,
            DiffKind::ValueChange => Self::ValueChange,
            DiffKind::ArrayLength => Self::ArrayLength,
            DiffKind::OrderOnly => Self::OrderOnly,
            DiffKind::HeaderChange => Self::HeaderChange,
            DiffKind::BodyDiffers => Self::BodyDiffers,
        }
    }
}

/// A wire kind with no core meaning (`KIND_UNSPECIFIED`, or a number this
/// build does not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownKind(pub i32);

impl TryFrom<difference::Kind> for DiffKind {
    type Error = UnknownKind;

    fn try_from(k: difference::Kind) -> Result<Self, UnknownKind> {
        use difference::Kind;
        Ok(match k {
            Kind::Status => DiffKind::StatusChange,
            Kind::MissingField => DiffKind::MissingField,
            Kind::ExtraField => DiffKind::ExtraField,
            Kind::TypeChange => DiffKind::TypeChange,
            Kind::ValueChange => DiffKind::ValueChange,
            Kind::ArrayLength => DiffKind::ArrayLength,
            Kind::OrderOnly => DiffKind::OrderOnly,
            Kind::HeaderChange => DiffKind::HeaderChange,
            Kind::BodyDiffers => DiffKind::BodyDiffers,
            Kind::Unspecified => return Err(UnknownKind(Kind::Unspecified as i32)),
        })
    }
}

impl From<Bucket> for difference::Bucket {
    fn from(b: Bucket) -> Self {
        match b {
            Bucket::Serious => Self::Serious,
            Bucket::Noise => Self::Noise,
        }
    }
}

/// The core's kind of a wire difference: its `kind` number decoded, `None`
/// for unspecified or unknown numbers.
pub fn diff_kind(d: &crate::v1::Difference) -> Option<DiffKind> {
    difference::Kind::try_from(d.kind)
        .ok()
        .and_then(|k| DiffKind::try_from(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_wire_and_keeps_its_number() {
        for (i, kind) in DiffKind::ALL.into_iter().enumerate() {
            let wire = difference::Kind::from(kind);
            assert_eq!(wire as usize, i + 1, "{kind:?}");
            assert_eq!(DiffKind::try_from(wire), Ok(kind));
        }
        assert_eq!(
            DiffKind::try_from(difference::Kind::Unspecified),
            Err(UnknownKind(0))
        );
    }

    #[test]
    fn unknown_numbers_have_no_kind() {
        let d = crate::v1::Difference {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(diff_kind(&d), None);
    }
}
