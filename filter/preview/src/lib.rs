//! `understudy-preview`: the filter's own response comparison, run again over
//! stored samples with edited rules, so a person sees what a compare rule
//! would change before applying it.
//!
//! The rules are the route's `shadow.compare` section exactly as the filter
//! config writes it, parsed and validated by `understudy-core`'s
//! [`RawCompareConfig`] / [`CompareConfig::from_raw`]; each sample is
//! compared by `understudy-core`'s [`compare`]. Nothing here decides what a
//! difference is: this crate only carries JSON in and out.
//!
//! - [`preview`]: the pure function (native and wasm): rules JSON and
//!   samples JSON in, [`Preview`] out (or a [`PreviewError`] naming the field).
//! - [`preview_json`]: the same, answering JSON text; what the browser calls.
//! - On `wasm32`, `wasm::preview` is the `#[wasm_bindgen]` export of
//!   [`preview_json`] (built by `cargo xtask setup`, glue by wasm-bindgen-cli).

// The dashboard runs this in a browser tab: a panic would kill the module.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use understudy_core::ConfigError;
use understudy_core::compare::{
    Bucket, CompareConfig, Comparison, RawCompareConfig, Response, compare,
};

/// The most samples one preview compares (the control plane stores at most
/// 2000 records in all).
pub const MAX_SAMPLES: usize = 2000;

/// The field name the rules' errors are reported under, as the filter config
/// writes it relative to the route (`compare.ignore[0]`).
pub const RULES_FIELD: &str = "compare";

/// Why a preview could not run. The message names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The rules are not a valid `compare` section (same checks as the filter).
    #[error("{0}")]
    Rules(ConfigError),
    /// The samples document is not of the expected shape.
    #[error("samples: {0}")]
    Samples(String),
}

impl PreviewError {
    /// The field the error is about (`compare.ignore[0]`), when one is named.
    pub fn field(&self) -> Option<String> {
        match self {
            PreviewError::Rules(ConfigError::Invalid { field, .. }) => Some(field.clone()),
            _ => None,
        }
    }
}

/// A recorded header.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// One response as the control plane stores it (`ResponseView`): the body as
/// text when it is UTF-8, otherwise as standard base64.
#[derive(Debug, Clone, Deserialize)]
pub struct Side {
    pub status: u16,
    #[serde(default)]
    pub headers: Vec<Header>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_base64: Option<String>,
}

/// One stored pair. Other fields (the control plane adds some) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    pub id: String,
    pub primary: Side,
    pub shadow: Side,
}

/// The samples document: `{"samples": [...]}` (other fields ignored, so the
/// dashboard's `samples.json` can be passed as it is).
#[derive(Debug, Clone, Deserialize)]
pub struct Samples {
    pub samples: Vec<Sample>,
}

/// One sample compared again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleResult {
    pub id: String,
    /// No serious difference (the filter's own [`Comparison::matched`]).
    pub matched: bool,
    pub comparison: Comparison,
}

/// How often one path differed over the samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PathCount {
    pub path: String,
    /// Samples with a serious difference here.
    pub serious: usize,
    /// Samples with a noise difference here.
    pub noise: usize,
}

/// Every sample compared again with the rules.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    pub compared: usize,
    pub matched: usize,
    /// `matched / compared`; `None` with no samples.
    pub match_rate: Option<f64>,
    /// Paths with at least one recorded difference, sorted.
    pub paths: Vec<PathCount>,
    pub samples: Vec<SampleResult>,
}

/// Parses and validates `rules_json` (a `compare` section) the way the filter does.
pub fn parse_rules(rules_json: &str) -> Result<CompareConfig, PreviewError> {
    let de = &mut serde_json::Deserializer::from_str(rules_json);
    // serde_path_to_error puts the field in front of serde's message
    // (`ignore: invalid type ...`), which serde alone omits for type errors.
    let raw: RawCompareConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            RULES_FIELD.to_owned()
        } else {
            format!("{RULES_FIELD}.{path}")
        };
        PreviewError::Rules(ConfigError::Invalid {
            field,
            reason: e.into_inner().to_string(),
        })
    })?;
    CompareConfig::from_raw(raw, RULES_FIELD).map_err(PreviewError::Rules)
}

/// Parses the samples document, bounded by [`MAX_SAMPLES`].
pub fn parse_samples(samples_json: &str) -> Result<Vec<Sample>, PreviewError> {
    let de = &mut serde_json::Deserializer::from_str(samples_json);
    let doc: Samples = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        PreviewError::Samples(format!("{path}: {}", e.into_inner()))
    })?;
    if doc.samples.len() > MAX_SAMPLES {
        return Err(PreviewError::Samples(format!(
            "at most {MAX_SAMPLES} samples are compared, got {}",
            doc.samples.len()
        )));
    }
    Ok(doc.samples)
}

fn headers(side: &Side) -> Vec<(String, String)> {
    side.headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect()
}

fn body(side: &Side, which: &str, id: &str) -> Result<Vec<u8>, PreviewError> {
    match (&side.body, &side.body_base64) {
        (Some(text), _) => Ok(text.as_bytes().to_vec()),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| PreviewError::Samples(format!("sample {id:?}: {which}.body_base64: {e}"))),
        (None, None) => Ok(Vec::new()),
    }
}

/// Compares every sample again under `rules_json`, with `understudy-core`'s
/// [`compare`] (what the filter runs on each shadow pair).
pub fn preview(rules_json: &str, samples_json: &str) -> Result<Preview, PreviewError> {
    let cfg = parse_rules(rules_json)?;
    let samples = parse_samples(samples_json)?;
    let mut out = Preview {
        compared: 0,
        matched: 0,
        match_rate: None,
        paths: Vec::new(),
        samples: Vec::with_capacity(samples.len()),
    };
    let mut paths: BTreeMap<String, PathCount> = BTreeMap::new();
    for s in &samples {
        let (ph, sh) = (headers(&s.primary), headers(&s.shadow));
        let (pb, sb) = (
            body(&s.primary, "primary", &s.id)?,
            body(&s.shadow, "shadow", &s.id)?,
        );
        let comparison = compare(
            &cfg,
            &Response {
                status: s.primary.status,
                headers: &ph,
                body: &pb,
            },
            &Response {
                status: s.shadow.status,
                headers: &sh,
                body: &sb,
            },
        );
        // A path counts once per sample and bucket, as the control plane's
        // path table counts records.
        let mut seen: Vec<(&str, Bucket)> = Vec::new();
        for d in &comparison.differences {
            if seen.contains(&(d.path.as_str(), d.bucket)) {
                continue;
            }
            seen.push((d.path.as_str(), d.bucket));
            let entry = paths.entry(d.path.clone()).or_insert_with(|| PathCount {
                path: d.path.clone(),
                ..PathCount::default()
            });
            match d.bucket {
                Bucket::Serious => entry.serious += 1,
                Bucket::Noise => entry.noise += 1,
            }
        }
        out.compared += 1;
        let matched = comparison.matched();
        if matched {
            out.matched += 1;
        }
        out.samples.push(SampleResult {
            id: s.id.clone(),
            matched,
            comparison,
        });
    }
    out.match_rate = (out.compared > 0).then(|| out.matched as f64 / out.compared as f64);
    out.paths = paths.into_values().collect();
    Ok(out)
}

/// [`preview`] answering JSON text: the result, or `{"error": ..., "field": ...}`.
/// Never panics: every failure is in the text.
pub fn preview_json(rules_json: &str, samples_json: &str) -> String {
    let value = match preview(rules_json, samples_json) {
        Ok(p) => serde_json::to_value(&p).unwrap_or_else(|e| error_value(&e.to_string(), None)),
        Err(e) => error_value(&e.to_string(), e.field()),
    };
    value.to_string()
}

fn error_value(message: &str, field: Option<String>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert(
        "error".into(),
        serde_json::Value::String(message.to_owned()),
    );
    if let Some(f) = field {
        map.insert("field".into(), serde_json::Value::String(f));
    }
    serde_json::Value::Object(map)
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    // wasm-bindgen's generated glue is `unsafe` inside; this thin export is
    // the only place the crate allows it.
    #![allow(unsafe_code)]
    use wasm_bindgen::prelude::wasm_bindgen;

    /// The browser's entry point: [`super::preview_json`].
    #[wasm_bindgen]
    pub fn preview(rules_json: &str, samples_json: &str) -> String {
        super::preview_json(rules_json, samples_json)
    }
}

#[cfg(test)]
mod tests;
