//! Response comparison for shadow traffic (dark launches): the primary answers
//! the client, a shadow copy of the request goes to the new version, and this
//! module says how the two responses differ and whether that matters.
//!
//! - [`CompareConfig`]: validated rules ([`RawCompareConfig`] is the wire form):
//!   paths to ignore, numeric tolerances, unordered arrays, arrays matched by
//!   an id field, headers to compare, and the work limits.
//! - [`compare`]: the pure engine. It compares the status, the configured
//!   headers and the body; JSON bodies field by field, anything else by
//!   equality and a SHA-256 of each side.
//! - [`Comparison`] / [`Difference`]: what was found, each difference with its
//!   path (`$.total`, `$.lines[2].tax`), both values as compact JSON text, a
//!   [`DiffKind`] and a [`Bucket`].
//!
//! **Paths in the configuration** are written either as a JSON Pointer
//! (`/lines/0/tax`; a numeric token matches an array index or an object key)
//! or as a glob (`$.items[*].id`, `$.meta.*`, `$.lines[2]`). `*` matches any
//! one key or index, `[*]` any index. A rule matches a value when its pattern
//! matches the value's path or one of its ancestors for `ignore`; for
//! `tolerance`, `unordered` and `match_by_id` it must match the path exactly.
//!
//! **Paths in results** are rendered as `$`, `.key` (or `["key"]` when the key
//! is not a plain identifier) and `[index]`. Elements of a `match_by_id` array
//! render as `[?(@.sku=="A")]` (the id value as JSON); rules see them as the
//! element's index in the primary (or in the shadow, for extra elements).
//! The status is reported at path `status`, headers at `header:<name>`.
//!
//! **Buckets.** Serious: a status class change (2xx vs 5xx), a field or array
//! element missing in the shadow, a type change, a value change outside any
//! ignore or tolerance rule, an array length change, a differing configured
//! header, and a differing non-JSON body. Noise: a status change within one
//! class (200 vs 201), ignored paths, numeric changes within tolerance,
//! order-only changes on unordered or id-matched arrays, and extra fields in
//! the shadow (additive changes are what tolerant readers accept; they are
//! still reported so people can see them). Ignored paths are reported as Noise
//! unless `report_ignored` is false.
//!
//! **Limits.** Bodies nested deeper than `max_depth` are not parsed as JSON
//! (this is checked by a lexical scan before parsing, so no deep recursion
//! ever happens); the walk itself uses an explicit stack and stops after
//! `max_nodes` value pairs. Either way the result is marked `truncated` with
//! the reason. At most `max_differences` differences are recorded; the rest
//! are counted in `omitted` (and still in `serious` / `noise`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::rules::ConfigError;

/// The deepest `max_depth` accepted (serde_json itself refuses input nested
/// much deeper than this, and the engine's helpers recurse up to this depth).
pub const MAX_DEPTH_LIMIT: usize = 100;
pub const DEFAULT_MAX_DEPTH: usize = 64;
pub const DEFAULT_MAX_NODES: usize = 100_000;
pub const DEFAULT_MAX_DIFFERENCES: usize = 100;
/// Rules per list (`ignore`, `tolerance`, ...): each is matched against every value.
pub const MAX_RULES: usize = 256;

// === config ===

/// The comparison rules as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompareConfig {
    /// Paths whose differences are Noise (pointer `/a/b/0` or glob `$.meta.*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
    /// Numeric tolerances per path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerance: Vec<RawTolerance>,
    /// Arrays compared as multisets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unordered: Vec<String>,
    /// Arrays whose elements are paired by an id field instead of by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_by_id: Vec<RawMatchById>,
    /// Response headers to compare (case-insensitive names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Whether differences on ignored paths are reported (as Noise).
    #[serde(default = "default_true")]
    pub report_ignored: bool,
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    #[serde(default = "default_max_nodes")]
    pub max_nodes: usize,
    #[serde(default = "default_max_differences")]
    pub max_differences: usize,
}

impl Default for RawCompareConfig {
    fn default() -> Self {
        Self {
            ignore: Vec::new(),
            tolerance: Vec::new(),
            unordered: Vec::new(),
            match_by_id: Vec::new(),
            headers: Vec::new(),
            report_ignored: true,
            max_depth: DEFAULT_MAX_DEPTH,
            max_nodes: DEFAULT_MAX_NODES,
            max_differences: DEFAULT_MAX_DIFFERENCES,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_depth() -> usize {
    DEFAULT_MAX_DEPTH
}
fn default_max_nodes() -> usize {
    DEFAULT_MAX_NODES
}
fn default_max_differences() -> usize {
    DEFAULT_MAX_DIFFERENCES
}

/// `{"path": "$.total", "absolute": 0.01}` or `{"path": "$.price", "relative": 0.001}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTolerance {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative: Option<f64>,
}

/// `{"path": "$.lines", "id": "sku"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatchById {
    pub path: String,
    pub id: String,
}

/// One step of a configured path pattern.
#[derive(Debug, Clone, PartialEq)]
enum PatSeg {
    /// `.name` / `["name"]`: that object key.
    Key(String),
    /// `[3]`: that array index.
    Index(usize),
    /// A JSON Pointer token: the key, or the index if it is a number.
    Token(String),
    /// `.*` or `/*`: any one key or index.
    Any,
    /// `[*]`: any one index.
    AnyIndex,
}

/// A validated path pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct PathPattern {
    text: String,
    segs: Vec<PatSeg>,
}

impl PathPattern {
    /// Parses a JSON Pointer (`/a/b/0`, `""` for the root) or a glob
    /// (`$`, `$.a.b`, `$.items[*].id`, `$.meta.*`, `$["odd key"]`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let segs = if text.is_empty() {
            Vec::new()
        } else if let Some(rest) = text.strip_prefix('/') {
            parse_pointer(rest)?
        } else if let Some(rest) = text.strip_prefix('$') {
            parse_glob(rest)?
        } else {
            return Err(format!(
                "{text:?} is neither a JSON Pointer (starting with '/') nor a path (starting with '$')"
            ));
        };
        Ok(Self {
            text: text.to_owned(),
            segs,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches `path` exactly.
    fn matches(&self, path: &[Seg<'_>]) -> bool {
        self.segs.len() == path.len() && self.matches_prefix(path)
    }

    /// Whether the pattern matches `path` or one of its ancestors.
    fn matches_prefix(&self, path: &[Seg<'_>]) -> bool {
        self.segs.len() <= path.len() && self.segs.iter().zip(path).all(|(p, s)| seg_matches(p, s))
    }
}

fn seg_matches(p: &PatSeg, s: &Seg<'_>) -> bool {
    match (p, s) {
        (PatSeg::Any, _) => true,
        (PatSeg::AnyIndex, s) => s.index().is_some(),
        (PatSeg::Key(k), Seg::Key(n)) => k.as_str() == n.as_ref(),
        (PatSeg::Index(i), s) => s.index() == Some(*i),
        (PatSeg::Token(t), Seg::Key(n)) => t.as_str() == n.as_ref(),
        (PatSeg::Token(t), s) => s
            .index()
            .is_some_and(|i| t.parse::<usize>().ok() == Some(i)),
        (PatSeg::Key(_), _) => false,
    }
}

fn parse_pointer(rest: &str) -> Result<Vec<PatSeg>, String> {
    let mut segs = Vec::new();
    for token in rest.split('/') {
        if token == "*" {
            segs.push(PatSeg::Any);
            continue;
        }
        let mut out = String::with_capacity(token.len());
        let mut chars = token.chars();
        while let Some(c) = chars.next() {
            if c == '~' {
                match chars.next() {
                    Some('0') => out.push('~'),
                    Some('1') => out.push('/'),
                    _ => return Err(format!("'~' in {token:?} must be followed by '0' or '1'")),
                }
            } else {
                out.push(c);
            }
        }
        segs.push(PatSeg::Token(out));
    }
    Ok(segs)
}

fn parse_glob(rest: &str) -> Result<Vec<PatSeg>, String> {
    let mut segs = Vec::new();
    let chars: Vec<char> = rest.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars.get(i) {
            Some('.') => {
                let start = i + 1;
                let mut end = start;
                while end < chars.len() && chars.get(end).is_some_and(|c| *c != '.' && *c != '[') {
                    end += 1;
                }
                let name: String = chars.get(start..end).unwrap_or_default().iter().collect();
                if name.is_empty() {
                    return Err(format!("empty key at position {i} (after '$')"));
                }
                if name.contains(']') {
                    return Err(format!("unexpected ']' in key {name:?}"));
                }
                segs.push(if name == "*" {
                    PatSeg::Any
                } else {
                    PatSeg::Key(name)
                });
                i = end;
            }
            Some('[') => {
                let close = chars
                    .iter()
                    .skip(i)
                    .position(|c| *c == ']')
                    .map(|p| p + i)
                    .ok_or_else(|| format!("'[' at position {i} (after '$') is never closed"))?;
                let inner: String = chars.get(i + 1..close).unwrap_or_default().iter().collect();
                if inner == "*" {
                    segs.push(PatSeg::AnyIndex);
                } else if inner.starts_with('"') {
                    let key: String = serde_json::from_str(&inner)
                        .map_err(|_| format!("[{inner}] is not a quoted key"))?;
                    segs.push(PatSeg::Key(key));
                } else {
                    let index = inner
                        .parse::<usize>()
                        .map_err(|_| format!("[{inner}] must be an index, [*] or a quoted key"))?;
                    segs.push(PatSeg::Index(index));
                }
                i = close + 1;
            }
            _ => {
                return Err(format!("expected '.' or '[' at position {i} (after '$')"));
            }
        }
    }
    Ok(segs)
}

/// A validated numeric tolerance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// `|primary - shadow| <= x`
    Absolute(f64),
    /// `|primary - shadow| <= x * max(|primary|, |shadow|)`
    Relative(f64),
}

impl Tolerance {
    fn within(self, a: f64, b: f64) -> bool {
        let d = (a - b).abs();
        match self {
            Tolerance::Absolute(x) => d <= x,
            Tolerance::Relative(x) => d <= x * a.abs().max(b.abs()),
        }
    }
}

/// The validated comparison rules.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareConfig {
    pub ignore: Vec<PathPattern>,
    pub tolerance: Vec<(PathPattern, Tolerance)>,
    pub unordered: Vec<PathPattern>,
    /// Array pattern and the id field its elements are matched by.
    pub match_by_id: Vec<(PathPattern, String)>,
    /// Lower-cased header names.
    pub headers: Vec<String>,
    pub report_ignored: bool,
    pub max_depth: usize,
    pub max_nodes: usize,
    pub max_differences: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            ignore: Vec::new(),
            tolerance: Vec::new(),
            unordered: Vec::new(),
            match_by_id: Vec::new(),
            headers: Vec::new(),
            report_ignored: true,
            max_depth: DEFAULT_MAX_DEPTH,
            max_nodes: DEFAULT_MAX_NODES,
            max_differences: DEFAULT_MAX_DIFFERENCES,
        }
    }
}

impl CompareConfig {
    /// Validates `raw`; errors name the offending field under `field`.
    pub fn from_raw(raw: RawCompareConfig, field: &str) -> Result<Self, ConfigError> {
        let invalid = |what: String, reason: String| ConfigError::Invalid {
            field: format!("{field}.{what}"),
            reason,
        };
        for (name, len) in [
            ("ignore", raw.ignore.len()),
            ("tolerance", raw.tolerance.len()),
            ("unordered", raw.unordered.len()),
            ("match_by_id", raw.match_by_id.len()),
            ("headers", raw.headers.len()),
        ] {
            if len > MAX_RULES {
                return Err(invalid(
                    name.into(),
                    format!("at most {MAX_RULES} entries are allowed, got {len}"),
                ));
            }
        }
        let pattern = |what: String, text: &str| {
            PathPattern::parse(text).map_err(|reason| invalid(what, reason))
        };
        let mut ignore = Vec::with_capacity(raw.ignore.len());
        for (i, p) in raw.ignore.iter().enumerate() {
            ignore.push(pattern(format!("ignore[{i}]"), p)?);
        }
        let mut tolerance = Vec::with_capacity(raw.tolerance.len());
        for (i, t) in raw.tolerance.iter().enumerate() {
            let p = pattern(format!("tolerance[{i}].path"), &t.path)?;
            let (name, x, tol) = match (t.absolute, t.relative) {
                (Some(a), None) => ("absolute", a, Tolerance::Absolute(a)),
                (None, Some(r)) => ("relative", r, Tolerance::Relative(r)),
                _ => {
                    return Err(invalid(
                        format!("tolerance[{i}]"),
                        "set exactly one of \"absolute\" and \"relative\"".into(),
                    ));
                }
            };
            if !(x.is_finite() && x >= 0.0) {
                return Err(invalid(
                    format!("tolerance[{i}].{name}"),
                    format!("must be a finite number >= 0, got {x}"),
                ));
            }
            tolerance.push((p, tol));
        }
        let mut unordered = Vec::with_capacity(raw.unordered.len());
        for (i, p) in raw.unordered.iter().enumerate() {
            unordered.push(pattern(format!("unordered[{i}]"), p)?);
        }
        let mut match_by_id = Vec::with_capacity(raw.match_by_id.len());
        for (i, m) in raw.match_by_id.iter().enumerate() {
            let p = pattern(format!("match_by_id[{i}].path"), &m.path)?;
            if m.id.is_empty() {
                return Err(invalid(
                    format!("match_by_id[{i}].id"),
                    "must name the id field".into(),
                ));
            }
            if unordered.iter().any(|u| u.segs == p.segs) {
                return Err(invalid(
                    format!("match_by_id[{i}].path"),
                    format!("{:?} is also listed in unordered; choose one", m.path),
                ));
            }
            match_by_id.push((p, m.id.clone()));
        }
        let mut headers = Vec::with_capacity(raw.headers.len());
        for (i, h) in raw.headers.iter().enumerate() {
            if !crate::http::is_header_name(h) {
                return Err(invalid(
                    format!("headers[{i}]"),
                    format!("{h:?} is not a valid header name"),
                ));
            }
            let h = h.to_ascii_lowercase();
            if !headers.contains(&h) {
                headers.push(h);
            }
        }
        if raw.max_depth == 0 || raw.max_depth > MAX_DEPTH_LIMIT {
            return Err(invalid(
                "max_depth".into(),
                format!(
                    "must be between 1 and {MAX_DEPTH_LIMIT}, got {}",
                    raw.max_depth
                ),
            ));
        }
        if raw.max_nodes == 0 {
            return Err(invalid("max_nodes".into(), "must be at least 1".into()));
        }
        Ok(Self {
            ignore,
            tolerance,
            unordered,
            match_by_id,
            headers,
            report_ignored: raw.report_ignored,
            max_depth: raw.max_depth,
            max_nodes: raw.max_nodes,
            max_differences: raw.max_differences,
        })
    }

    fn ignored(&self, path: &[Seg<'_>]) -> bool {
        self.ignore.iter().any(|p| p.matches_prefix(path))
    }

    fn tolerance_at(&self, path: &[Seg<'_>]) -> Option<Tolerance> {
        self.tolerance
            .iter()
            .find(|(p, _)| p.matches(path))
            .map(|(_, t)| *t)
    }

    fn unordered_at(&self, path: &[Seg<'_>]) -> bool {
        self.unordered.iter().any(|p| p.matches(path))
    }

    fn id_field_at(&self, path: &[Seg<'_>]) -> Option<&str> {
        self.match_by_id
            .iter()
            .find(|(p, _)| p.matches(path))
            .map(|(_, id)| id.as_str())
    }
}

// === results ===

/// One response as the filter saw it.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    StatusChange,
    /// Present in the primary, absent in the shadow.
    MissingField,
    /// Absent in the primary, present in the shadow.
    ExtraField,
    TypeChange,
    ValueChange,
    /// Values are the array lengths.
    ArrayLength,
    /// Same elements, different order (unordered or id-matched arrays).
    OrderOnly,
    HeaderChange,
    /// Non-JSON bodies differ; values are `sha256:<hex>` of each body.
    BodyDiffers,
}

impl DiffKind {
    /// Every kind, in wire order (the report proto numbers them 1..=9).
    pub const ALL: [DiffKind; 9] = [
        DiffKind::StatusChange,
        DiffKind::MissingField,
        DiffKind::ExtraField,
        DiffKind::TypeChange,
        DiffKind::ValueChange,
        DiffKind::ArrayLength,
        DiffKind::OrderOnly,
        DiffKind::HeaderChange,
        DiffKind::BodyDiffers,
    ];

    /// The kind's name: the same snake_case string serde writes, which the
    /// API and the dashboard show (a unit test holds the two together).
    pub fn name(self) -> &'static str {
        match self {
            DiffKind::StatusChange => "status_change",
            DiffKind::MissingField => "missing_field",
            DiffKind::ExtraField => "extra_field",
            DiffKind::TypeChange => "type_change",
            DiffKind::ValueChange => "value_change",
            DiffKind::ArrayLength => "array_length",
            DiffKind::OrderOnly => "order_only",
            DiffKind::HeaderChange => "header_change",
            DiffKind::BodyDiffers => "body_differs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Serious,
    Noise,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub path: String,
    pub kind: DiffKind,
    pub bucket: Bucket,
    /// The primary's value as compact JSON text (absent when missing).
    pub primary: Option<String>,
    /// The shadow's value as compact JSON text (absent when missing).
    pub shadow: Option<String>,
    /// A serious difference that no expected-divergence path covers (see
    /// [`Scope`]). Noise is never unexpected.
    pub unexpected: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    /// The first `max_differences` differences found.
    pub differences: Vec<Difference>,
    /// Serious differences found, recorded or not.
    pub serious: usize,
    /// Noise differences found, recorded or not.
    pub noise: usize,
    /// Unexpected differences found, recorded or not.
    pub unexpected: usize,
    /// Differences found but not recorded (beyond `max_differences`).
    pub omitted: usize,
    /// Why the comparison stopped early or skipped part of the bodies.
    pub truncated: Option<String>,
    /// The side (`primary` or `shadow`) whose body says it is JSON (by its
    /// content-type) but does not parse; the bodies were compared as bytes.
    pub unparseable: Option<&'static str>,
}

impl Comparison {
    /// No serious difference (noise is allowed). A truncated comparison can
    /// still match: check `truncated` to know whether everything was seen.
    pub fn matched(&self) -> bool {
        self.serious == 0
    }

    fn push(&mut self, cap: usize, d: Difference) {
        match d.bucket {
            Bucket::Serious => self.serious += 1,
            Bucket::Noise => self.noise += 1,
        }
        if d.unexpected {
            self.unexpected += 1;
        }
        if self.differences.len() < cap {
            self.differences.push(d);
        } else {
            self.omitted += 1;
        }
    }

    fn truncate(&mut self, reason: String) {
        if self.truncated.is_none() {
            self.truncated = Some(reason);
        }
    }
}

// === engine ===

/// One step of a concrete path. Keys and id fields borrow from the
/// documents and the config being compared, so walking a document
/// allocates no path text; only the rare id-matched element owns its id.
#[derive(Debug, Clone, PartialEq)]
enum Seg<'a> {
    Key(Cow<'a, str>),
    Index(usize),
    /// An element of an id-matched array: its index (in the primary, or the
    /// shadow for extra elements), the id field and the id as JSON text.
    Id {
        index: usize,
        field: &'a str,
        value: String,
    },
}

impl Seg<'_> {
    fn index(&self) -> Option<usize> {
        match self {
            Seg::Key(_) => None,
            Seg::Index(i) | Seg::Id { index: i, .. } => Some(*i),
        }
    }
}

fn is_identifier(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

fn render(path: &[Seg<'_>]) -> String {
    let mut out = String::from("$");
    for s in path {
        match s {
            Seg::Key(k) if is_identifier(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Key(k) => {
                let _ = write!(out, "[{}]", json_string(k));
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Seg::Id { field, value, .. } if is_identifier(field) => {
                let _ = write!(out, "[?(@.{field}=={value})]");
            }
            Seg::Id { field, value, .. } => {
                let _ = write!(out, "[?(@[{}]=={value})]", json_string(field));
            }
        }
    }
    out
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Numbers are equal when equal as integers, or (otherwise) as f64, so that
/// `1` and `1.0` are the same value.
fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x == y;
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// A canonical text for multiset comparison: sorted keys, normalised numbers.
/// Recursion is bounded by the depth check done before parsing.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => {
                let _ = write!(out, "{i}");
            }
            (None, Some(u), _) => {
                let _ = write!(out, "{u}");
            }
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                let _ = write!(out, "{}", f as i64);
            }
            _ => out.push_str(&n.to_string()),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&json_string(k));
                out.push(':');
                if let Some(item) = map.get(k) {
                    canonical(item, out);
                }
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn canonical_text(v: &Value) -> String {
    let mut s = String::new();
    canonical(v, &mut s);
    s
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        (Value::Array(_) | Value::Object(_), _) => canonical_text(a) == canonical_text(b),
        _ => a == b,
    }
}

/// The deepest bracket nesting in `body`, scanning lexically (strings and
/// escapes respected), stopping early once `limit` is exceeded.
fn nesting_depth(body: &[u8], limit: usize) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in body {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    max = depth;
                    if max > limit {
                        return max;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn sha256_text(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Replaces every value at (or under) a `redact` path in a JSON body with
/// the string `sha256:<hex>` of its compact text, as differences report it.
/// Two bodies redacted this way still compare equal exactly where their
/// clear values were equal, so stored samples can be compared again.
/// Returns `None` when the body is not JSON nested at most `max_depth`
/// deep: it cannot be redacted, so it must not be kept.
pub fn redact_body(body: &[u8], redact: &[PathPattern], max_depth: usize) -> Option<Vec<u8>> {
    if redact.is_empty() {
        return Some(body.to_vec());
    }
    if nesting_depth(body, max_depth) > max_depth {
        return None;
    }
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut path = Vec::new();
    redact_value(&mut value, redact, &mut path);
    serde_json::to_vec(&value).ok()
}

/// Recursion is bounded by the depth check in [`redact_body`].
fn redact_value(v: &mut Value, redact: &[PathPattern], path: &mut Vec<Seg<'static>>) {
    if redact.iter().any(|r| r.matches_prefix(path)) {
        *v = Value::String(sha256_text(v.to_string().as_bytes()));
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                path.push(Seg::Key(Cow::Owned(k.clone())));
                redact_value(child, redact, path);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                redact_value(child, redact, path);
                path.pop();
            }
        }
        _ => {}
    }
}

fn header_value(headers: &[(String, String)], name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn declares_json(headers: &[(String, String)]) -> bool {
    header_value(headers, "content-type").is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
}

fn declares_non_json(headers: &[(String, String)]) -> bool {
    header_value(headers, "content-type").is_some_and(|ct| {
        let ct = ct.to_ascii_lowercase();
        !ct.contains("json")
    })
}

/// Where differences are intended, and which values must not leave the
/// filter in clear. The default scope expects nothing and redacts nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope<'a> {
    /// Paths where this request is expected to differ (from the matching
    /// expected-divergence rule). A serious difference elsewhere is
    /// unexpected; with no rule matched, every serious difference is.
    pub expected: &'a [PathPattern],
    /// Values at (or under) these paths are reported as `sha256:<hex>`.
    pub redact: &'a [PathPattern],
}

/// Compares the shadow's response with the primary's under `cfg`.
pub fn compare(cfg: &CompareConfig, primary: &Response<'_>, shadow: &Response<'_>) -> Comparison {
    compare_in(cfg, Scope::default(), primary, shadow)
}

/// [`compare`], with expected-divergence paths and redaction.
pub fn compare_in(
    cfg: &CompareConfig,
    scope: Scope<'_>,
    primary: &Response<'_>,
    shadow: &Response<'_>,
) -> Comparison {
    let mut out = Comparison::default();
    let cap = cfg.max_differences;
    if primary.status != shadow.status {
        let bucket = if primary.status / 100 != shadow.status / 100 {
            Bucket::Serious
        } else {
            Bucket::Noise
        };
        out.push(
            cap,
            Difference {
                path: "status".into(),
                kind: DiffKind::StatusChange,
                bucket,
                primary: Some(primary.status.to_string()),
                shadow: Some(shadow.status.to_string()),
                unexpected: bucket == Bucket::Serious,
            },
        );
    }
    for name in &cfg.headers {
        let a = header_value(primary.headers, name);
        let b = header_value(shadow.headers, name);
        if a != b {
            out.push(
                cap,
                Difference {
                    path: format!("header:{name}"),
                    kind: DiffKind::HeaderChange,
                    bucket: Bucket::Serious,
                    primary: a.map(|v| json_string(&v)),
                    shadow: b.map(|v| json_string(&v)),
                    unexpected: true,
                },
            );
        }
    }
    compare_bodies(cfg, scope, primary, shadow, &mut out);
    out
}

fn compare_bodies(
    cfg: &CompareConfig,
    scope: Scope<'_>,
    p: &Response<'_>,
    s: &Response<'_>,
    out: &mut Comparison,
) {
    // Byte-equal bodies hold equal values, so no rule can find a difference
    // in them; most shadow pairs agree, and this skips both parses.
    if p.body == s.body {
        return;
    }
    let mut json = !(declares_non_json(p.headers) || declares_non_json(s.headers));
    if json {
        for (side, body) in [("primary", p.body), ("shadow", s.body)] {
            if nesting_depth(body, cfg.max_depth) > cfg.max_depth {
                out.truncate(format!(
                    "{side} body is nested deeper than max_depth ({}); compared as bytes",
                    cfg.max_depth
                ));
                json = false;
            }
        }
    }
    let parsed = if json {
        match (
            serde_json::from_slice::<Value>(p.body),
            serde_json::from_slice::<Value>(s.body),
        ) {
            (Ok(a), Ok(b)) => Some((a, b)),
            (a, b) => {
                out.unparseable = [
                    ("primary", a.is_err(), p.headers),
                    ("shadow", b.is_err(), s.headers),
                ]
                .into_iter()
                .find(|(_, failed, headers)| *failed && declares_json(headers))
                .map(|(side, _, _)| side);
                None
            }
        }
    } else {
        None
    };
    match parsed {
        Some((a, b)) => walk(cfg, scope, &a, &b, out),
        None => {
            if p.body != s.body {
                out.push(
                    cfg.max_differences,
                    Difference {
                        path: "$".into(),
                        kind: DiffKind::BodyDiffers,
                        bucket: Bucket::Serious,
                        primary: Some(sha256_text(p.body)),
                        shadow: Some(sha256_text(s.body)),
                        unexpected: !scope.expected.iter().any(|e| e.matches_prefix(&[])),
                    },
                );
            }
        }
    }
}

struct Walker<'c> {
    cfg: &'c CompareConfig,
    scope: Scope<'c>,
    out: &'c mut Comparison,
}

impl Walker<'_> {
    /// Records a difference, applying the ignore rules.
    fn record(
        &mut self,
        path: &[Seg<'_>],
        kind: DiffKind,
        bucket: Bucket,
        primary: Option<&Value>,
        shadow: Option<&Value>,
    ) {
        let bucket = if self.cfg.ignored(path) {
            if !self.cfg.report_ignored {
                return;
            }
            Bucket::Noise
        } else {
            bucket
        };
        self.record_text(
            path,
            kind,
            bucket,
            primary.map(Value::to_string),
            shadow.map(Value::to_string),
        );
    }

    fn record_text(
        &mut self,
        path: &[Seg<'_>],
        kind: DiffKind,
        bucket: Bucket,
        primary: Option<String>,
        shadow: Option<String>,
    ) {
        let (primary, shadow) = if self.scope.redact.iter().any(|r| r.matches_prefix(path)) {
            (
                primary.map(|v| sha256_text(v.as_bytes())),
                shadow.map(|v| sha256_text(v.as_bytes())),
            )
        } else {
            (primary, shadow)
        };
        let unexpected = bucket == Bucket::Serious
            && !self.scope.expected.iter().any(|e| e.matches_prefix(path));
        self.out.push(
            self.cfg.max_differences,
            Difference {
                path: render(path),
                kind,
                bucket,
                primary,
                shadow,
                unexpected,
            },
        );
    }
}

impl Walker<'_> {
    /// Records a difference at the child `seg` of `path` (one with no pair
    /// to walk), leaving `path` as it was.
    fn record_child<'a>(
        &mut self,
        path: &mut Vec<Seg<'a>>,
        seg: Seg<'a>,
        kind: DiffKind,
        bucket: Bucket,
        primary: Option<&Value>,
        shadow: Option<&Value>,
    ) {
        path.push(seg);
        self.record(path, kind, bucket, primary, shadow);
        path.pop();
    }
}

/// A pair still to walk: the length of its parent's path, its own step
/// (none for the root), and the two values.
type Pending<'a> = (usize, Option<Seg<'a>>, &'a Value, &'a Value);

/// Walks both documents with an explicit stack (depth-first, document order).
///
/// One path is shared by every pair: a pair's step is pushed when the pair
/// is popped, after cutting the path back to its parent's length. Depth
/// first, that is exactly the pair's own path, so no pair copies its path.
fn walk<'a>(
    cfg: &'a CompareConfig,
    scope: Scope<'_>,
    a: &'a Value,
    b: &'a Value,
    out: &mut Comparison,
) {
    let mut w = Walker { cfg, scope, out };
    let mut path: Vec<Seg<'a>> = Vec::new();
    let mut stack: Vec<Pending<'a>> = vec![(0, None, a, b)];
    let mut visited = 0usize;
    while let Some((parent_len, seg, a, b)) = stack.pop() {
        path.truncate(parent_len);
        if let Some(seg) = seg {
            path.push(seg);
        }
        visited += 1;
        if visited > cfg.max_nodes {
            w.out.truncate(format!(
                "more than max_nodes ({}) values; comparison stopped",
                cfg.max_nodes
            ));
            return;
        }
        if path.len() > cfg.max_depth {
            w.out.truncate(format!(
                "values nested deeper than max_depth ({}) were not compared",
                cfg.max_depth
            ));
            continue;
        }
        if cfg.ignored(&path) {
            if cfg.report_ignored && !values_equal(a, b) {
                let kind = if type_name(a) == type_name(b) {
                    DiffKind::ValueChange
                } else {
                    DiffKind::TypeChange
                };
                w.record(&path, kind, Bucket::Noise, Some(a), Some(b));
            }
            continue;
        }
        let first_child = stack.len();
        let here = path.len();
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&'a String> = x
                    .keys()
                    .chain(y.keys().filter(|k| !x.contains_key(*k)))
                    .collect();
                keys.sort();
                for k in keys {
                    let seg = Seg::Key(Cow::Borrowed(k.as_str()));
                    match (x.get(k), y.get(k)) {
                        (Some(va), Some(vb)) => stack.push((here, Some(seg), va, vb)),
                        (Some(va), None) => w.record_child(
                            &mut path,
                            seg,
                            DiffKind::MissingField,
                            Bucket::Serious,
                            Some(va),
                            None,
                        ),
                        (None, Some(vb)) => w.record_child(
                            &mut path,
                            seg,
                            DiffKind::ExtraField,
                            Bucket::Noise,
                            None,
                            Some(vb),
                        ),
                        (None, None) => {}
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                if let Some(id) = cfg.id_field_at(&path) {
                    if !match_by_id(&mut w, &mut path, id, x, y, &mut stack) {
                        by_index(&mut w, &path, x, y, &mut stack);
                    }
                } else if cfg.unordered_at(&path) {
                    unordered(&mut w, &mut path, x, y);
                } else {
                    by_index(&mut w, &path, x, y, &mut stack);
                }
            }
            (Value::Number(x), Value::Number(y)) => {
                if !numbers_equal(x, y) {
                    let within = match (cfg.tolerance_at(&path), x.as_f64(), y.as_f64()) {
                        (Some(t), Some(fx), Some(fy)) => t.within(fx, fy),
                        _ => false,
                    };
                    let bucket = if within {
                        Bucket::Noise
                    } else {
                        Bucket::Serious
                    };
                    w.record(&path, DiffKind::ValueChange, bucket, Some(a), Some(b));
                }
            }
            _ if type_name(a) != type_name(b) => {
                w.record(
                    &path,
                    DiffKind::TypeChange,
                    Bucket::Serious,
                    Some(a),
                    Some(b),
                );
            }
            _ => {
                if a != b {
                    w.record(
                        &path,
                        DiffKind::ValueChange,
                        Bucket::Serious,
                        Some(a),
                        Some(b),
                    );
                }
            }
        }
        // The children went on in document order; the stack pops its end.
        if let Some(children) = stack.get_mut(first_child..) {
            children.reverse();
        }
    }
}

fn by_index<'a>(
    w: &mut Walker<'_>,
    path: &[Seg<'a>],
    x: &'a [Value],
    y: &'a [Value],
    stack: &mut Vec<Pending<'a>>,
) {
    if x.len() != y.len() {
        w.record_len(path, x.len(), y.len());
    }
    for (i, (va, vb)) in x.iter().zip(y).enumerate() {
        stack.push((path.len(), Some(Seg::Index(i)), va, vb));
    }
}

impl Walker<'_> {
    fn record_len(&mut self, path: &[Seg<'_>], a: usize, b: usize) {
        let (pa, pb) = (Value::from(a), Value::from(b));
        self.record(
            path,
            DiffKind::ArrayLength,
            Bucket::Serious,
            Some(&pa),
            Some(&pb),
        );
    }
}

/// Compares arrays as multisets: elements missing in the shadow are Serious,
/// extra ones Noise; the same elements in another order are one OrderOnly.
fn unordered(w: &mut Walker<'_>, path: &mut Vec<Seg<'_>>, x: &[Value], y: &[Value]) {
    let cx: Vec<String> = x.iter().map(canonical_text).collect();
    let cy: Vec<String> = y.iter().map(canonical_text).collect();
    let mut remaining: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (j, c) in cy.iter().enumerate().rev() {
        remaining.entry(c.as_str()).or_default().push(j);
    }
    let mut any_diff = false;
    for (i, c) in cx.iter().enumerate() {
        if remaining.get_mut(c.as_str()).and_then(Vec::pop).is_none() {
            any_diff = true;
            w.record_child(
                path,
                Seg::Index(i),
                DiffKind::MissingField,
                Bucket::Serious,
                x.get(i),
                None,
            );
        }
    }
    let mut extras: Vec<usize> = remaining.into_values().flatten().collect();
    extras.sort_unstable();
    for j in extras {
        any_diff = true;
        w.record_child(
            path,
            Seg::Index(j),
            DiffKind::ExtraField,
            Bucket::Noise,
            None,
            y.get(j),
        );
    }
    if !any_diff && cx != cy {
        w.record(
            path,
            DiffKind::OrderOnly,
            Bucket::Noise,
            Some(&Value::Array(x.to_vec())),
            Some(&Value::Array(y.to_vec())),
        );
    }
}

/// The id of each element as canonical JSON text, or `None` when an element
/// has no id or two elements share one (the array is then compared by index).
fn ids(items: &[Value], field: &str) -> Option<Vec<String>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let id = canonical_text(item.as_object()?.get(field)?);
        if !seen.insert(id.clone()) {
            return None;
        }
        out.push(id);
    }
    Some(out)
}

/// Pairs elements by id: a primary element whose id the shadow lacks is a
/// Serious MissingField, a shadow-only id a Noise ExtraField, and the same ids
/// in another order a Noise OrderOnly. The pairs to compare go on `stack`.
/// Returns `false`, having recorded and stacked nothing, when an element has
/// no id or two share one: the array is then compared by index.
fn match_by_id<'a>(
    w: &mut Walker<'_>,
    path: &mut Vec<Seg<'a>>,
    field: &'a str,
    x: &'a [Value],
    y: &'a [Value],
    stack: &mut Vec<Pending<'a>>,
) -> bool {
    let (Some(ix), Some(iy)) = (ids(x, field), ids(y, field)) else {
        return false;
    };
    let by_id: BTreeMap<&str, usize> = iy
        .iter()
        .enumerate()
        .map(|(j, id)| (id.as_str(), j))
        .collect();
    let seg = |index: usize, value: &str| Seg::Id {
        index,
        field,
        value: value.to_owned(),
    };
    let here = path.len();
    let mut common_x = Vec::new();
    for (i, (id, va)) in ix.iter().zip(x).enumerate() {
        match by_id.get(id.as_str()).and_then(|j| y.get(*j)) {
            Some(vb) => {
                common_x.push(id.as_str());
                stack.push((here, Some(seg(i, id)), va, vb));
            }
            None => w.record_child(
                path,
                seg(i, id),
                DiffKind::MissingField,
                Bucket::Serious,
                Some(va),
                None,
            ),
        }
    }
    let in_x: std::collections::BTreeSet<&str> = ix.iter().map(String::as_str).collect();
    let mut common_y = Vec::new();
    for (j, (id, vb)) in iy.iter().zip(y).enumerate() {
        if in_x.contains(id.as_str()) {
            common_y.push(id.as_str());
        } else {
            w.record_child(
                path,
                seg(j, id),
                DiffKind::ExtraField,
                Bucket::Noise,
                None,
                Some(vb),
            );
        }
    }
    if common_x != common_y {
        let order = |v: &[&str]| format!("[{}]", v.join(","));
        w.record_text(
            path,
            DiffKind::OrderOnly,
            Bucket::Noise,
            Some(order(&common_x)),
            Some(order(&common_y)),
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> CompareConfig {
        let raw: RawCompareConfig = serde_json::from_value(json).unwrap();
        CompareConfig::from_raw(raw, "compare").unwrap()
    }

    fn cfg_err(json: serde_json::Value) -> ConfigError {
        let raw: RawCompareConfig = serde_json::from_value(json).unwrap();
        CompareConfig::from_raw(raw, "compare").unwrap_err()
    }

    fn field_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("unexpected error {other:?}"),
        }
    }

    fn json_resp(body: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
        (200, Vec::new(), body.as_bytes().to_vec())
    }

    fn cmp_bodies(c: &CompareConfig, a: &str, b: &str) -> Comparison {
        let (sa, ha, ba) = json_resp(a);
        let (sb, hb, bb) = json_resp(b);
        compare(
            c,
            &Response {
                status: sa,
                headers: &ha,
                body: &ba,
            },
            &Response {
                status: sb,
                headers: &hb,
                body: &bb,
            },
        )
    }

    fn resp(status: u16, body: &[u8]) -> Response<'_> {
        Response {
            status,
            headers: &[],
            body,
        }
    }

    #[test]
    fn byte_equal_bodies_are_not_parsed() {
        let cfg = cfg(serde_json::json!({"max_depth": 2}));
        let deep = b"[[[[[[1]]]]]]";
        let c = compare(&cfg, &resp(200, deep), &resp(200, deep));
        assert_eq!(c, Comparison::default(), "not even the depth check ran");
        let c = compare(&cfg, &resp(200, b"{\"a\":"), &resp(200, b"{\"a\":"));
        assert_eq!(c, Comparison::default());
    }

    #[test]
    fn unexpected_is_serious_outside_the_expected_paths() {
        let cfg = cfg(serde_json::json!({}));
        let expected = [PathPattern::parse("$.allocation").unwrap()];
        let scope = Scope {
            expected: &expected,
            redact: &[],
        };
        let a = br#"{"allocation":{"gpu":1},"queue":"a","extra":null}"#;
        let b = br#"{"allocation":{"gpu":2},"queue":"b","extra":null,"new":1}"#;
        let c = compare_in(&cfg, scope, &resp(200, a), &resp(500, b));
        assert!(!find(&c, "$.allocation.gpu").unexpected);
        assert!(find(&c, "$.queue").unexpected);
        assert!(find(&c, "status").unexpected);
        assert!(!find(&c, "$.new").unexpected, "noise is never unexpected");
        assert_eq!((c.serious, c.unexpected), (3, 2));
        // No rule matched the request: every serious difference is unexpected.
        let c = compare(&cfg, &resp(200, a), &resp(200, b));
        assert_eq!((c.serious, c.unexpected), (2, 2));
    }

    #[test]
    fn redacted_values_are_hashed_in_differences_and_bodies() {
        let cfg = cfg(serde_json::json!({}));
        let redact = [PathPattern::parse("$.customer").unwrap()];
        let scope = Scope {
            expected: &[],
            redact: &redact,
        };
        let a = br#"{"customer":{"email":"a@x.io"},"n":1}"#;
        let b = br#"{"customer":{"email":"b@x.io"},"n":1}"#;
        let c = compare_in(&cfg, scope, &resp(200, a), &resp(200, b));
        let d = find(&c, "$.customer.email");
        assert_eq!(
            d.primary.as_deref(),
            Some(sha256_text(br#""a@x.io""#).as_str())
        );
        assert!(!format!("{c:?}").contains("x.io"));
        let ra = redact_body(a, &redact, 64).unwrap();
        let rb = redact_body(b, &redact, 64).unwrap();
        assert!(!String::from_utf8_lossy(&ra).contains("x.io"));
        // Redacted bodies still differ where the clear values did, and only there.
        let c = compare(&cfg, &resp(200, &ra), &resp(200, &rb));
        assert_eq!(c.differences.len(), 1);
        assert_eq!(c.differences[0].path, "$.customer");
        assert_eq!(redact_body(a, &redact, 64), redact_body(a, &redact, 64));
        assert_eq!(redact_body(b"not json", &redact, 64), None);
        assert_eq!(redact_body(b"[[[[1]]]]", &redact, 2), None);
        assert_eq!(redact_body(b"x", &[], 2).as_deref(), Some(&b"x"[..]));
    }

    fn find<'c>(c: &'c Comparison, path: &str) -> &'c Difference {
        c.differences
            .iter()
            .find(|d| d.path == path)
            .unwrap_or_else(|| panic!("no difference at {path} in {:#?}", c.differences))
    }

    const V1: &str = r#"{"order": "o-1", "total": 49.90, "tax": 4.00,
        "generated_at": "2026-01-01T00:00:00Z",
        "lines": [{"sku": "A", "qty": 1, "tax": 1.00}, {"sku": "B", "qty": 2, "tax": 3.00}]}"#;
    const V2: &str = r#"{"order": "o-1", "total": 51.40, "tax": 5.50,
        "generated_at": "2026-01-01T00:00:07Z",
        "lines": [{"sku": "A", "qty": 1, "tax": 1.00}, {"sku": "B", "qty": 2, "tax": 4.50}]}"#;

    #[test]
    fn issue_example_order_totals() {
        let c = cmp_bodies(&CompareConfig::default(), V1, V2);
        let total = find(&c, "$.total");
        assert_eq!(total.kind, DiffKind::ValueChange);
        assert_eq!(total.bucket, Bucket::Serious);
        assert_eq!(total.primary.as_deref(), Some("49.9"));
        assert_eq!(total.shadow.as_deref(), Some("51.4"));
        assert_eq!(find(&c, "$.tax").primary.as_deref(), Some("4.0"));
        let line = find(&c, "$.lines[1].tax");
        assert_eq!(line.kind, DiffKind::ValueChange);
        assert_eq!(find(&c, "$.generated_at").bucket, Bucket::Serious);
        assert_eq!(c.serious, 4);
        assert!(!c.matched());
        assert!(c.truncated.is_none());
    }

    #[test]
    fn ignored_field_becomes_noise_or_disappears() {
        let a = r#"{"id": 1, "generated_at": "x"}"#;
        let b = r#"{"id": 1, "generated_at": "y"}"#;
        let c = cmp_bodies(&CompareConfig::default(), a, b);
        assert_eq!(find(&c, "$.generated_at").bucket, Bucket::Serious);
        assert!(!c.matched());

        for pattern in ["$.generated_at", "/generated_at", "$.*"] {
            let c = cmp_bodies(&cfg(serde_json::json!({"ignore": [pattern]})), a, b);
            let d = find(&c, "$.generated_at");
            assert_eq!(d.bucket, Bucket::Noise, "{pattern}");
            assert_eq!(d.primary.as_deref(), Some("\"x\""));
            assert!(c.matched());
            assert_eq!((c.serious, c.noise), (0, 1));
        }

        let quiet = cfg(serde_json::json!({"ignore": ["$.generated_at"], "report_ignored": false}));
        let c = cmp_bodies(&quiet, a, b);
        assert!(c.differences.is_empty());
        assert_eq!((c.serious, c.noise), (0, 0));
    }

    #[test]
    fn ignore_globs_cover_subtrees_and_array_elements() {
        let c = cfg(serde_json::json!({"ignore": ["$.items[*].id", "$.meta.*", "/lines/0"]}));
        let r = cmp_bodies(
            &c,
            r#"{"items": [{"id": 1, "n": 1}, {"id": 2, "n": 2}], "meta": {"a": 1, "b": {"c": 1}}, "lines": [1, 2]}"#,
            r#"{"items": [{"id": 9, "n": 1}, {"id": 8, "n": 2}], "meta": {"a": 2, "b": {"c": 2}, "d": 0}, "lines": [5, 2]}"#,
        );
        assert!(r.matched(), "{:#?}", r.differences);
        assert!(r.differences.iter().all(|d| d.bucket == Bucket::Noise));
        assert_eq!(find(&r, "$.items[1].id").primary.as_deref(), Some("2"));
        assert_eq!(find(&r, "$.meta.b").shadow.as_deref(), Some(r#"{"c":2}"#));
        assert_eq!(find(&r, "$.lines[0]").kind, DiffKind::ValueChange);
        // Still serious where not ignored.
        let r = cmp_bodies(
            &c,
            r#"{"items": [{"id": 1, "n": 1}]}"#,
            r#"{"items": [{"id": 1, "n": 2}]}"#,
        );
        assert_eq!(find(&r, "$.items[0].n").bucket, Bucket::Serious);
    }

    #[test]
    fn status_changes() {
        let c = CompareConfig::default();
        let h = Vec::new();
        let r = compare(
            &c,
            &Response {
                status: 500,
                headers: &h,
                body: b"{}",
            },
            &Response {
                status: 200,
                headers: &h,
                body: b"{}",
            },
        );
        let d = find(&r, "status");
        assert_eq!(d.kind, DiffKind::StatusChange);
        assert_eq!(d.bucket, Bucket::Serious);
        assert_eq!(
            (d.primary.as_deref(), d.shadow.as_deref()),
            (Some("500"), Some("200"))
        );
        let r = compare(
            &c,
            &Response {
                status: 200,
                headers: &h,
                body: b"{}",
            },
            &Response {
                status: 201,
                headers: &h,
                body: b"{}",
            },
        );
        assert_eq!(find(&r, "status").bucket, Bucket::Noise);
        assert!(r.matched());
    }

    #[test]
    fn unordered_arrays_report_order_only() {
        let c = cfg(serde_json::json!({"unordered": ["$.tags", "$.objs"]}));
        let r = cmp_bodies(
            &c,
            r#"{"tags": ["a", "b", "b"], "objs": [{"x": 1, "y": 2}, {"x": 3}]}"#,
            r#"{"tags": ["b", "a", "b"], "objs": [{"x": 3.0}, {"y": 2, "x": 1}]}"#,
        );
        assert_eq!(find(&r, "$.tags").kind, DiffKind::OrderOnly);
        assert_eq!(find(&r, "$.objs").kind, DiffKind::OrderOnly);
        assert!(r.matched());
        assert_eq!(r.noise, 2);
        // Without the rule, the same arrays differ seriously.
        let r = cmp_bodies(
            &CompareConfig::default(),
            r#"{"tags": ["a", "b"]}"#,
            r#"{"tags": ["b", "a"]}"#,
        );
        assert_eq!(r.serious, 2);
        // A real multiset difference.
        let r = cmp_bodies(
            &c,
            r#"{"tags": ["a", "b", "b"]}"#,
            r#"{"tags": ["b", "c", "a"]}"#,
        );
        let missing = find(&r, "$.tags[2]");
        assert_eq!(
            (missing.kind, missing.bucket),
            (DiffKind::MissingField, Bucket::Serious)
        );
        let extra = find(&r, "$.tags[1]");
        assert_eq!(
            (extra.kind, extra.shadow.as_deref()),
            (DiffKind::ExtraField, Some("\"c\""))
        );
        assert!(r.differences.iter().all(|d| d.kind != DiffKind::OrderOnly));
    }

    #[test]
    fn match_by_id_pairs_elements_despite_reordering() {
        let c = cfg(serde_json::json!({"match_by_id": [{"path": "$.lines", "id": "sku"}]}));
        let r = cmp_bodies(
            &c,
            r#"{"lines": [{"sku": "A", "tax": 1}, {"sku": "B", "tax": 3}, {"sku": "C", "tax": 0}]}"#,
            r#"{"lines": [{"sku": "B", "tax": 4.5}, {"sku": "A", "tax": 1}, {"sku": "D", "tax": 0}]}"#,
        );
        let tax = find(&r, r#"$.lines[?(@.sku=="B")].tax"#);
        assert_eq!(tax.kind, DiffKind::ValueChange);
        assert_eq!(
            (tax.primary.as_deref(), tax.shadow.as_deref()),
            (Some("3"), Some("4.5"))
        );
        assert_eq!(
            find(&r, r#"$.lines[?(@.sku=="C")]"#).kind,
            DiffKind::MissingField
        );
        assert_eq!(
            find(&r, r#"$.lines[?(@.sku=="D")]"#).kind,
            DiffKind::ExtraField
        );
        assert_eq!(find(&r, "$.lines").kind, DiffKind::OrderOnly);
        assert!(r.differences.iter().all(|d| !d.path.contains("sku=\"A\"")));
        assert_eq!(r.serious, 2);

        // Rules see the element as its primary index.
        let c = cfg(serde_json::json!({
            "match_by_id": [{"path": "$.lines", "id": "sku"}],
            "tolerance": [{"path": "$.lines[*].tax", "absolute": 2}]
        }));
        let r = cmp_bodies(
            &c,
            r#"{"lines": [{"sku": "A", "tax": 1}, {"sku": "B", "tax": 3}]}"#,
            r#"{"lines": [{"sku": "B", "tax": 4.5}, {"sku": "A", "tax": 1}]}"#,
        );
        assert!(r.matched(), "{:#?}", r.differences);

        // Elements without ids fall back to comparing by index.
        let c = cfg(serde_json::json!({"match_by_id": [{"path": "$.lines", "id": "sku"}]}));
        let r = cmp_bodies(
            &c,
            r#"{"lines": [{"tax": 1}]}"#,
            r#"{"lines": [{"tax": 2}]}"#,
        );
        assert_eq!(find(&r, "$.lines[0].tax").kind, DiffKind::ValueChange);
    }

    #[test]
    fn tolerance_absolute_and_relative() {
        let c = cfg(serde_json::json!({"tolerance": [
            {"path": "$.total", "absolute": 0.01},
            {"path": "/price", "relative": 0.001}
        ]}));
        let r = cmp_bodies(
            &c,
            r#"{"total": 10.00, "price": 1000}"#,
            r#"{"total": 10.005, "price": 1000.9}"#,
        );
        assert!(r.matched());
        assert_eq!(r.noise, 2);
        assert!(
            r.differences
                .iter()
                .all(|d| d.kind == DiffKind::ValueChange)
        );
        let r = cmp_bodies(
            &c,
            r#"{"total": 10.00, "price": 1000}"#,
            r#"{"total": 10.02, "price": 1002}"#,
        );
        assert_eq!(r.serious, 2);
        // Integers and floats of equal value are equal.
        let r = cmp_bodies(&CompareConfig::default(), r#"{"n": 1}"#, r#"{"n": 1.0}"#);
        assert!(r.differences.is_empty());
    }

    #[test]
    fn type_missing_extra_and_length() {
        let r = cmp_bodies(
            &CompareConfig::default(),
            r#"{"a": 1, "b": "x", "c": [1, 2, 3], "gone": null}"#,
            r#"{"a": "1", "b": "x", "c": [1, 2], "new": true}"#,
        );
        let a = find(&r, "$.a");
        assert_eq!((a.kind, a.bucket), (DiffKind::TypeChange, Bucket::Serious));
        assert_eq!(a.shadow.as_deref(), Some("\"1\""));
        let gone = find(&r, "$.gone");
        assert_eq!(
            (gone.kind, gone.bucket, gone.shadow.clone()),
            (DiffKind::MissingField, Bucket::Serious, None)
        );
        let new = find(&r, "$.new");
        assert_eq!(
            (new.kind, new.bucket, new.primary.clone()),
            (DiffKind::ExtraField, Bucket::Noise, None)
        );
        let len = find(&r, "$.c");
        assert_eq!(
            (len.kind, len.primary.as_deref(), len.shadow.as_deref()),
            (DiffKind::ArrayLength, Some("3"), Some("2"))
        );
        assert_eq!((r.serious, r.noise), (3, 1));
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        let r = cmp_bodies(
            &CompareConfig::default(),
            r#"{"a b": {"x.y": 1}}"#,
            r#"{"a b": {"x.y": 2}}"#,
        );
        find(&r, r#"$["a b"]["x.y"]"#);
        let c = cfg(serde_json::json!({"ignore": [r#"$["a b"]"#]}));
        assert!(cmp_bodies(&c, r#"{"a b": 1}"#, r#"{"a b": 2}"#).matched());
    }

    #[test]
    fn headers_allow_list() {
        let c = cfg(serde_json::json!({"headers": ["Content-Type", "x-version"]}));
        let ha = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("x-version".to_owned(), "1".to_owned()),
            ("date".to_owned(), "a".to_owned()),
        ];
        let hb = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("date".to_owned(), "b".to_owned()),
        ];
        let r = compare(
            &c,
            &Response {
                status: 200,
                headers: &ha,
                body: b"{}",
            },
            &Response {
                status: 200,
                headers: &hb,
                body: b"{}",
            },
        );
        assert_eq!(r.differences.len(), 1);
        let d = find(&r, "header:x-version");
        assert_eq!(
            (d.kind, d.bucket),
            (DiffKind::HeaderChange, Bucket::Serious)
        );
        assert_eq!(
            (d.primary.as_deref(), d.shadow.as_deref()),
            (Some("\"1\""), None)
        );
    }

    #[test]
    fn non_json_bodies_compare_by_hash() {
        let c = CompareConfig::default();
        let h = Vec::new();
        let same = compare(
            &c,
            &Response {
                status: 200,
                headers: &h,
                body: b"<html>hi</html>",
            },
            &Response {
                status: 200,
                headers: &h,
                body: b"<html>hi</html>",
            },
        );
        assert!(same.differences.is_empty());
        let r = compare(
            &c,
            &Response {
                status: 200,
                headers: &h,
                body: b"<html>hi</html>",
            },
            &Response {
                status: 200,
                headers: &h,
                body: b"<html>ho</html>",
            },
        );
        let d = find(&r, "$");
        assert_eq!((d.kind, d.bucket), (DiffKind::BodyDiffers, Bucket::Serious));
        let (pa, pb) = (d.primary.clone().unwrap(), d.shadow.clone().unwrap());
        assert!(pa.starts_with("sha256:") && pa.len() == 71);
        assert_ne!(pa, pb);
        // sha256("") is well known.
        assert_eq!(
            sha256_text(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // One side JSON, the other not.
        let r = compare(
            &c,
            &Response {
                status: 200,
                headers: &h,
                body: b"{}",
            },
            &Response {
                status: 200,
                headers: &h,
                body: b"oops",
            },
        );
        assert_eq!(find(&r, "$").kind, DiffKind::BodyDiffers);
        // A non-JSON content type is compared as bytes even when it parses.
        let text = vec![("content-type".to_owned(), "text/plain".to_owned())];
        let r = compare(
            &c,
            &Response {
                status: 200,
                headers: &text,
                body: b"{\"n\": 1}",
            },
            &Response {
                status: 200,
                headers: &text,
                body: b"{\"n\":1}",
            },
        );
        assert_eq!(find(&r, "$").kind, DiffKind::BodyDiffers);
    }

    #[test]
    fn deep_nesting_is_truncated_not_crashed() {
        let deep = |n: usize, leaf: &str| format!("{}{leaf}{}", "[".repeat(n), "]".repeat(n));
        let objs = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
        let c = CompareConfig::default();
        for (a, b) in [
            (deep(10_000, "1"), deep(10_000, "2")),
            (deep(10_000, "1"), deep(10_001, "1")),
            (objs(10_000), objs(10_001)),
            (deep(100_000, ""), "{}".to_owned()),
        ] {
            let r = cmp_bodies(&c, &a, &b);
            assert!(
                r.truncated.as_deref().unwrap().contains("max_depth"),
                "{:?}",
                r.truncated
            );
        }
        // Within the limit, deep values are compared normally.
        let r = cmp_bodies(&c, &deep(60, "1"), &deep(60, "2"));
        assert!(r.truncated.is_none());
        assert_eq!(r.differences[0].path, format!("${}", "[0]".repeat(60)));
    }

    #[test]
    fn node_limit_and_difference_cap() {
        let a: Vec<u32> = (0..1000).collect();
        let b: Vec<u32> = (1..1001).collect();
        let (a, b) = (
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap(),
        );
        let r = cmp_bodies(&cfg(serde_json::json!({"max_differences": 10})), &a, &b);
        assert_eq!(r.differences.len(), 10);
        assert_eq!(r.serious, 1000);
        assert_eq!(r.omitted, 990);
        assert!(r.truncated.is_none());
        let r = cmp_bodies(&cfg(serde_json::json!({"max_nodes": 100})), &a, &b);
        assert!(r.truncated.as_deref().unwrap().contains("max_nodes"));
        assert_eq!(r.serious, 99);
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"ignore": ["$.a", "$.items[*"]}),
                "compare.ignore[1]",
            ),
            (
                serde_json::json!({"ignore": ["items.id"]}),
                "compare.ignore[0]",
            ),
            (serde_json::json!({"ignore": ["$..a"]}), "compare.ignore[0]"),
            (serde_json::json!({"ignore": ["$[x]"]}), "compare.ignore[0]"),
            (serde_json::json!({"ignore": ["/a~2"]}), "compare.ignore[0]"),
            (
                serde_json::json!({"tolerance": [{"path": "$.t", "absolute": -0.5}]}),
                "compare.tolerance[0].absolute",
            ),
            (
                serde_json::json!({"tolerance": [{"path": "$.t", "relative": -1}]}),
                "compare.tolerance[0].relative",
            ),
            (
                serde_json::json!({"tolerance": [{"path": "$.t"}]}),
                "compare.tolerance[0]",
            ),
            (
                serde_json::json!({"tolerance": [{"path": "$.t", "absolute": 1, "relative": 1}]}),
                "compare.tolerance[0]",
            ),
            (
                serde_json::json!({"tolerance": [{"path": "t", "absolute": 1}]}),
                "compare.tolerance[0].path",
            ),
            (
                serde_json::json!({"unordered": ["$.a["]}),
                "compare.unordered[0]",
            ),
            (
                serde_json::json!({"match_by_id": [{"path": "$.l", "id": ""}]}),
                "compare.match_by_id[0].id",
            ),
            (
                serde_json::json!({"unordered": ["$.l"], "match_by_id": [{"path": "$.l", "id": "x"}]}),
                "compare.match_by_id[0].path",
            ),
            (
                serde_json::json!({"headers": ["bad header"]}),
                "compare.headers[0]",
            ),
            (serde_json::json!({"max_depth": 0}), "compare.max_depth"),
            (serde_json::json!({"max_depth": 1000}), "compare.max_depth"),
            (serde_json::json!({"max_nodes": 0}), "compare.max_nodes"),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(cfg_err(json.clone())), field, "{json}");
        }
        assert!(
            serde_json::from_value::<RawCompareConfig>(serde_json::json!({"ignroe": []})).is_err()
        );
        let ok = CompareConfig::from_raw(RawCompareConfig::default(), "compare").unwrap();
        assert_eq!(ok, CompareConfig::default());
    }

    #[test]
    fn pattern_parsing() {
        let p = PathPattern::parse("$.items[*].id").unwrap();
        assert_eq!(
            p.segs,
            vec![
                PatSeg::Key("items".into()),
                PatSeg::AnyIndex,
                PatSeg::Key("id".into())
            ]
        );
        let p = PathPattern::parse("/a~1b/0/~0").unwrap();
        assert_eq!(
            p.segs,
            vec![
                PatSeg::Token("a/b".into()),
                PatSeg::Token("0".into()),
                PatSeg::Token("~".into())
            ]
        );
        assert!(PathPattern::parse("$").unwrap().segs.is_empty());
        assert!(PathPattern::parse("").unwrap().segs.is_empty());
        let path = [Seg::Key("a".into()), Seg::Index(0)];
        assert!(PathPattern::parse("/a/0").unwrap().matches(&path));
        assert!(PathPattern::parse("$.a[0]").unwrap().matches(&path));
        assert!(!PathPattern::parse("$.a.*").unwrap().matches(&path[..1]));
        assert!(PathPattern::parse("$.a").unwrap().matches_prefix(&path));
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1000i64..1000).prop_map(Value::from),
            (-1.0e12f64..1.0e12).prop_map(Value::from),
            "[a-z\"\\\\ ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z ]{0,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// `v` as other JSON text with the same value: keys in reverse order,
    /// spaces and newlines, and integers that fit an f64 exactly written
    /// with a fraction (`1.0`). The bytes always differ from `v.to_string()`,
    /// so a comparison of the two takes the JSON walk, never the byte-equal
    /// shortcut.
    fn respelled(v: &Value) -> String {
        fn go(v: &Value, out: &mut String) {
            match v {
                Value::Object(m) => {
                    out.push_str("{ ");
                    for (i, (k, x)) in m.iter().rev().enumerate() {
                        if i > 0 {
                            out.push_str(" ,\n ");
                        }
                        out.push_str(&Value::String(k.clone()).to_string());
                        out.push_str(" : ");
                        go(x, out);
                    }
                    out.push_str(" }");
                }
                Value::Array(a) => {
                    out.push_str("[ ");
                    for (i, x) in a.iter().enumerate() {
                        if i > 0 {
                            out.push_str(" , ");
                        }
                        go(x, out);
                    }
                    out.push_str(" ]");
                }
                // Only integers well inside f64's exact range: serde_json's
                // default float parser is not correctly rounded, so `N.0`
                // near 2^53 can come back one ulp off (a known limit, see
                // the `float_roundtrip` feature).
                Value::Number(n) if n.as_i64().is_some_and(|i| i.unsigned_abs() < 1 << 31) => {
                    out.push_str(&format!("{n}.0"));
                }
                other => out.push_str(&other.to_string()),
            }
        }
        let mut out = String::from(" ");
        go(v, &mut out);
        out.push('\n');
        out
    }

    proptest::proptest! {
        #[test]
        fn a_value_equals_itself_however_it_is_spelled(v in arb_json(), unordered in proptest::prelude::any::<bool>()) {
            let text = v.to_string();
            let other = respelled(&v);
            proptest::prop_assert_ne!(&text, &other);
            let c = if unordered { cfg(serde_json::json!({"unordered": ["$"], "match_by_id": [{"path": "$.*", "id": "a"}]})) } else { CompareConfig::default() };
            for (a, b) in [(&text, &other), (&other, &text)] {
                let r = cmp_bodies(&c, a, b);
                proptest::prop_assert!(r.differences.is_empty(), "{a} vs {b}: {:?}", r.differences);
                proptest::prop_assert_eq!((r.serious, r.noise, r.omitted), (0, 0, 0));
                proptest::prop_assert!(r.truncated.is_none() && r.unparseable.is_none());
            }
        }

        #[test]
        fn shuffled_arrays_differ_only_in_order_where_order_does_not_count(
            items in proptest::collection::vec(arb_json(), 2..8),
            seed in proptest::prelude::any::<u64>(),
        ) {
            // The same elements in another order: a rotation by 1..n-1
            // places, never the identity for distinct elements.
            let turn = 1 + (seed as usize) % (items.len() - 1);
            let mut shuffled = items.clone();
            shuffled.rotate_left(turn);
            let unordered = cfg(serde_json::json!({"unordered": ["$.items"]}));
            let a = serde_json::json!({"items": items}).to_string();
            let b = respelled(&serde_json::json!({"items": shuffled}));
            let r = cmp_bodies(&unordered, &a, &b);
            proptest::prop_assert_eq!(r.serious, 0, "{:?}", r.differences);
            proptest::prop_assert!(r.differences.iter().all(|d| d.kind == DiffKind::OrderOnly), "{:?}", r.differences);
            // By id: each line keeps its id and content, in another order.
            let lines = |xs: &[Value]| -> Vec<Value> {
                xs.iter().enumerate().map(|(i, x)| serde_json::json!({"id": i, "v": x})).collect()
            };
            let mut by_id = lines(&items);
            let a = serde_json::json!({"lines": by_id.clone()}).to_string();
            by_id.rotate_left(turn);
            let b = respelled(&serde_json::json!({"lines": by_id}));
            let matched = cfg(serde_json::json!({"match_by_id": [{"path": "$.lines", "id": "id"}]}));
            let r = cmp_bodies(&matched, &a, &b);
            proptest::prop_assert_eq!(r.serious, 0, "{:?}", r.differences);
            proptest::prop_assert!(r.differences.iter().all(|d| d.kind == DiffKind::OrderOnly), "{:?}", r.differences);
            proptest::prop_assert!(r.differences.len() <= 1);
            // The same shuffle where order counts is serious.
            let r = cmp_bodies(&CompareConfig::default(), &a, &b);
            proptest::prop_assert!(r.serious > 0);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            sa in proptest::prelude::any::<u16>(),
            sb in proptest::prelude::any::<u16>(),
        ) {
            let h = Vec::new();
            let c = cfg(serde_json::json!({"max_depth": 3, "max_nodes": 10, "max_differences": 2, "unordered": ["$"]}));
            for c in [&c, &CompareConfig::default()] {
                let r = compare(c, &Response { status: sa, headers: &h, body: &a }, &Response { status: sb, headers: &h, body: &b });
                proptest::prop_assert!(r.differences.len() <= c.max_differences);
                proptest::prop_assert_eq!(r.differences.len() + r.omitted, r.serious + r.noise);
            }
        }

        #[test]
        fn never_panics_on_arbitrary_json(a in arb_json(), b in arb_json()) {
            let c = cfg(serde_json::json!({
                "max_depth": 3, "unordered": ["$.*"], "ignore": ["$[0]"],
                "match_by_id": [{"path": "$", "id": "a"}],
                "tolerance": [{"path": "$.*", "relative": 0.1}]
            }));
            let r = cmp_bodies(&c, &a.to_string(), &b.to_string());
            proptest::prop_assert_eq!(r.differences.len() + r.omitted, r.serious + r.noise);
        }

        #[test]
        fn a_changed_leaf_is_found(
            map in proptest::collection::btree_map("[a-z]{1,8}", proptest::prelude::any::<i64>(), 1..10),
            pick in proptest::prelude::any::<usize>(),
        ) {
            let key = map.keys().nth(pick % map.len()).unwrap().clone();
            let mut changed = map.clone();
            let old = changed[&key];
            changed.insert(key.clone(), old.wrapping_add(1));
            let wrap = |m: &std::collections::BTreeMap<String, i64>| serde_json::json!({"data": {"items": [m]}}).to_string();
            let r = cmp_bodies(&CompareConfig::default(), &wrap(&map), &wrap(&changed));
            proptest::prop_assert_eq!(r.differences.len(), 1);
            let d = &r.differences[0];
            proptest::prop_assert_eq!(&d.path, &format!("$.data.items[0].{key}"));
            proptest::prop_assert_eq!(d.kind, DiffKind::ValueChange);
            proptest::prop_assert_eq!(d.bucket, Bucket::Serious);
            let old_text = old.to_string();
            proptest::prop_assert_eq!(d.primary.as_deref(), Some(old_text.as_str()));
        }
    }

    #[test]
    fn kind_names_are_the_serde_names() {
        for kind in DiffKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
    }
}
