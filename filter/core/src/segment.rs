//! Traffic segments (mismatches by segment): which class of request a
//! shadow pair belongs to, so that one customer class breaking is not hidden
//! by the average of the rest.
//!
//! A shadow route names its segmentation with `segment_by` (a request header
//! such as the customer tier, the method, or both). The filter turns each
//! sampled request into a *label* ([`SegmentBy::label`]) from the bytes it
//! already read, and counts compared pairs per route and label
//! ([`SegmentTally`]). The control plane keeps the same counts over time,
//! with the same bound.
//!
//! The header's value comes from the client, so a label is made safe before
//! it goes anywhere: at most [`MAX_VALUE_BYTES`] of the value, every byte
//! that is not an HTTP token character replaced by `_`, and a missing or
//! empty header is `-`. Distinct labels are capped at [`MAX_SEGMENTS`] per
//! route; the first labels seen keep their own counts and any later one is
//! counted under [`OTHER`], so a client inventing values costs one counter,
//! never memory.
//!
//! A bottom module for the features: it imports only [`crate::http`] and
//! [`crate::rules`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::http::is_header_name;
use crate::rules::ConfigError;

/// Distinct segments kept per route (besides [`OTHER`]).
pub const MAX_SEGMENTS: usize = 32;
/// The segment that counts every label beyond [`MAX_SEGMENTS`].
pub const OTHER: &str = "other";
/// Bytes of a header value kept in a label.
pub const MAX_VALUE_BYTES: usize = 64;
/// Bytes of a method kept in a label (the longest registered method is 17).
pub const MAX_METHOD_BYTES: usize = 24;
/// The longest label: method, separator, value.
pub const MAX_LABEL_BYTES: usize = MAX_METHOD_BYTES + 1 + MAX_VALUE_BYTES;
/// A missing (or empty) header's value in a label.
pub const MISSING: &str = "-";
/// Between the method and the header value (`GET|gold`); never a token
/// byte that a value keeps, since `|` is replaced in values.
pub const SEPARATOR: char = '|';

/// `segment_by` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSegmentBy {
    /// A request header whose value names the segment (customer tier,
    /// client type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The request method is part of the segment.
    #[serde(default)]
    pub method: bool,
    /// The header values that are segments of their own; any other value
    /// is labelled `other` (a missing header stays `-`). Empty: every value
    /// is its own segment, up to the cap. With a list, a client inventing
    /// values can never take a known segment's place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Validated `segment_by`: at least one of the two, the header lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentBy {
    pub header: Option<String>,
    pub method: bool,
    pub values: Vec<String>,
}

impl SegmentBy {
    /// `field` is where the section sits (`routes[0].shadow.segment_by`).
    pub fn from_raw(raw: RawSegmentBy, field: &str) -> Result<Self, ConfigError> {
        if let Some(h) = &raw.header
            && !is_header_name(h)
        {
            return Err(ConfigError::Invalid {
                field: format!("{field}.header"),
                reason: format!("{h:?} is not a valid header name"),
            });
        }
        if raw.header.is_none() && !raw.method {
            return Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason: "names nothing to segment by: set `header`, `method: true`, or both".into(),
            });
        }
        if !raw.values.is_empty() && raw.header.is_none() {
            return Err(ConfigError::Invalid {
                field: format!("{field}.values"),
                reason: "lists header values, but no `header` is set".into(),
            });
        }
        if raw.values.len() > MAX_SEGMENTS {
            return Err(ConfigError::Invalid {
                field: format!("{field}.values"),
                reason: format!(
                    "at most {MAX_SEGMENTS} values are allowed, got {}",
                    raw.values.len()
                ),
            });
        }
        for (i, v) in raw.values.iter().enumerate() {
            let safe = !v.is_empty()
                && v.len() <= MAX_VALUE_BYTES
                && v.bytes().all(is_label_byte)
                && v != OTHER
                && v != MISSING;
            if !safe {
                return Err(ConfigError::Invalid {
                    field: format!("{field}.values[{i}]"),
                    reason: format!(
                        "{v:?} must be 1 to {MAX_VALUE_BYTES} HTTP token characters other than '|', \
                         and not `{OTHER}` or `{MISSING}`"
                    ),
                });
            }
        }
        Ok(Self {
            header: raw.header.map(|h| h.to_ascii_lowercase()),
            method: raw.method,
            values: raw.values,
        })
    }

    /// The label of a request whose method is `method` and whose
    /// [`Self::header`] is `value` (raw bytes, absent as `None`): `GET|gold`,
    /// `GET`, or `gold`. Always at most [`MAX_LABEL_BYTES`] of token bytes.
    pub fn label(&self, method: Option<&[u8]>, value: Option<&[u8]>) -> String {
        let mut out = String::new();
        if self.method {
            push_safe(&mut out, method.unwrap_or_default(), MAX_METHOD_BYTES);
        }
        if self.header.is_some() {
            if self.method {
                out.push(SEPARATOR);
            }
            let value = value.unwrap_or_default();
            let listed = self.values.is_empty()
                || value.is_empty()
                || self.values.iter().any(|v| v.as_bytes() == value);
            if listed {
                push_safe(&mut out, value, MAX_VALUE_BYTES);
            } else {
                out.push_str(OTHER);
            }
        }
        out
    }
}

/// Appends up to `max` bytes of `bytes`, token bytes kept and anything else
/// (controls, spaces, `|`, non-ASCII, quotes) as `_`; empty as [`MISSING`].
fn push_safe(out: &mut String, bytes: &[u8], max: usize) {
    if bytes.is_empty() {
        out.push_str(MISSING);
        return;
    }
    for &b in bytes.iter().take(max) {
        out.push(if is_label_byte(b) { char::from(b) } else { '_' });
    }
}

/// An HTTP token byte other than the separator.
fn is_label_byte(b: u8) -> bool {
    b != SEPARATOR as u8 && (b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`~".contains(&b))
}

/// Whether `label` could have been made by [`SegmentBy::label`]: what the
/// control plane accepts from a report (anything else is counted under
/// [`OTHER`]).
pub fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_BYTES
        && label.bytes().filter(|&b| b == SEPARATOR as u8).count() <= 1
        && label
            .bytes()
            .all(|b| b == SEPARATOR as u8 || is_label_byte(b))
}

/// Per-label values with at most [`MAX_SEGMENTS`] labels plus [`OTHER`]:
/// the first labels seen keep their own entry, later ones share `other`.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentTally<T> {
    entries: BTreeMap<String, T>,
}

impl<T> Default for SegmentTally<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<T: Default> SegmentTally<T> {
    /// The entry `label` counts in: its own, or [`OTHER`] once the table is
    /// full (or when the label is not one [`is_label`] accepts).
    pub fn entry(&mut self, label: &str) -> &mut T {
        let own = is_label(label)
            && (self.entries.contains_key(label)
                || self.entries.keys().filter(|k| *k != OTHER).count() < MAX_SEGMENTS);
        let key = if own { label } else { OTHER };
        self.entries.entry(key.to_owned()).or_default()
    }
}

impl<T> SegmentTally<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, label: &str) -> Option<&T> {
        self.entries.get(label)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut T)> {
        self.entries.iter_mut()
    }

    /// Everything counted so far, leaving the tally empty.
    pub fn take(&mut self) -> BTreeMap<String, T> {
        std::mem::take(&mut self.entries)
    }
}

impl<T: Default> SegmentTally<T> {
    /// Every entry's value, each reset to its default: the labels stay
    /// admitted, so a client who floods new labels between two reports
    /// cannot push a segment seen before into `other` (the filter sends
    /// deltas each report).
    pub fn drain(&mut self) -> Vec<(String, T)> {
        self.entries
            .iter_mut()
            .map(|(k, v)| (k.clone(), std::mem::take(v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn by(header: Option<&str>, method: bool) -> SegmentBy {
        SegmentBy::from_raw(
            RawSegmentBy {
                header: header.map(str::to_owned),
                method,
                values: Vec::new(),
            },
            "routes[0].shadow.segment_by",
        )
        .unwrap()
    }

    #[test]
    fn labels_name_the_method_and_the_value() {
        let both = by(Some("X-Customer-Tier"), true);
        assert_eq!(both.header.as_deref(), Some("x-customer-tier"));
        assert_eq!(both.label(Some(b"GET"), Some(b"gold")), "GET|gold");
        assert_eq!(by(None, true).label(Some(b"POST"), None), "POST");
        assert_eq!(
            by(Some("x-tier"), false).label(Some(b"GET"), Some(b"silver")),
            "silver"
        );
    }

    #[test]
    fn a_missing_or_empty_header_is_its_own_value() {
        let both = by(Some("x-tier"), true);
        assert_eq!(both.label(Some(b"GET"), None), "GET|-");
        assert_eq!(both.label(Some(b"GET"), Some(b"")), "GET|-");
        assert_eq!(by(Some("x-tier"), false).label(None, None), "-");
    }

    #[test]
    fn hostile_values_are_cut_and_made_safe() {
        let b = by(Some("x-tier"), true);
        let long = vec![b'a'; 10_000];
        let label = b.label(Some(b"GET"), Some(&long));
        assert_eq!(label.len(), 3 + 1 + MAX_VALUE_BYTES);
        // Latin-1, controls, spaces, quotes, the separator and JSON syntax.
        let label = b.label(Some(b"G\xffT"), Some(b"g\x00o l\"d|{}\xe9"));
        assert_eq!(label, "G_T|g_o_l_d____");
        assert!(is_label(&label));
    }

    #[test]
    fn the_config_names_its_field() {
        let err = SegmentBy::from_raw(
            RawSegmentBy {
                header: Some("x tier".into()),
                method: false,
                values: Vec::new(),
            },
            "routes[0].shadow.segment_by",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "routes[0].shadow.segment_by.header: \"x tier\" is not a valid header name"
        );
        let err = SegmentBy::from_raw(RawSegmentBy::default(), "routes[1].shadow.segment_by")
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("routes[1].shadow.segment_by: names nothing"),
            "{err}"
        );
    }

    #[test]
    fn the_tally_keeps_the_first_segments_and_folds_the_rest_into_other() {
        let mut t: SegmentTally<u64> = SegmentTally::default();
        *t.entry("gold") += 1;
        *t.entry("silver") += 1;
        for i in 0..10_000 {
            *t.entry(&format!("x{i}")) += 1;
        }
        *t.entry("gold") += 1;
        assert_eq!(t.len(), MAX_SEGMENTS + 1);
        assert_eq!(t.get("gold"), Some(&2));
        assert_eq!(t.get("silver"), Some(&1));
        assert_eq!(t.get(OTHER), Some(&(10_000 - (MAX_SEGMENTS as u64 - 2))));
        // A label no filter could make is counted, under `other`.
        *t.entry("a|b|c") += 1;
        *t.entry("") += 1;
        assert_eq!(t.get(OTHER), Some(&(10_002 - (MAX_SEGMENTS as u64 - 2))));
    }

    #[test]
    fn listed_values_keep_their_segments_and_any_other_value_is_other() {
        let raw = RawSegmentBy {
            header: Some("x-tier".into()),
            method: true,
            values: vec!["gold".into(), "silver".into()],
        };
        let b = SegmentBy::from_raw(raw.clone(), "s").unwrap();
        assert_eq!(b.label(Some(b"GET"), Some(b"gold")), "GET|gold");
        assert_eq!(b.label(Some(b"GET"), Some(b"tier-9")), "GET|other");
        assert_eq!(b.label(Some(b"GET"), Some(b"Gold")), "GET|other");
        assert_eq!(b.label(Some(b"GET"), None), "GET|-");
        let bad = |values: Vec<&str>, header: Option<&str>| {
            SegmentBy::from_raw(
                RawSegmentBy {
                    header: header.map(str::to_owned),
                    method: true,
                    values: values.into_iter().map(str::to_owned).collect(),
                },
                "s",
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad(vec!["go ld"], Some("x-tier")).starts_with("s.values[0]: \"go ld\""));
        assert!(bad(vec!["a", "other"], Some("x-tier")).starts_with("s.values[1]"));
        assert!(bad(vec!["gold"], None).starts_with("s.values: lists header values"));
        let many: Vec<String> = (0..=MAX_SEGMENTS).map(|i| format!("v{i}")).collect();
        assert!(
            bad(many.iter().map(String::as_str).collect(), Some("x-tier"))
                .starts_with("s.values: at most 32")
        );
    }

    #[test]
    fn draining_keeps_the_labels_admitted() {
        let mut t: SegmentTally<u64> = SegmentTally::default();
        *t.entry("gold") += 3;
        assert_eq!(t.drain(), vec![("gold".to_owned(), 3)]);
        for i in 0..100 {
            *t.entry(&format!("x{i}")) += 1;
        }
        *t.entry("gold") += 1;
        let drained: BTreeMap<String, u64> = t.drain().into_iter().collect();
        assert_eq!(drained["gold"], 1, "still its own segment");
        assert_eq!(drained[OTHER], 100 - (MAX_SEGMENTS as u64 - 1));
    }

    proptest! {
        /// Whatever bytes a client sends, the label is bounded and valid.
        #[test]
        fn every_label_is_bounded_and_valid(
            method in proptest::collection::vec(any::<u8>(), 0..100),
            value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        ) {
            let label = by(Some("x-tier"), true).label(Some(&method), value.as_deref());
            prop_assert!(label.len() <= MAX_LABEL_BYTES);
            prop_assert!(is_label(&label), "{label:?}");
        }
    }
}
