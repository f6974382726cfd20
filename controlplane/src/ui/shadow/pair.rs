//! Both sides of a stored sample, for the side-by-side diff and the rule
//! preview.
//!
//! A mismatch record keeps the request and both responses, redacted and cut
//! to `record_body_bytes` (`primary` and `shadow` in reports.proto): when
//! both bodies were recorded whole, the pair is exact. A record from a
//! filter that kept the primary's only (or with a body too large to keep)
//! still tells the shadow's answer through the differences the filter
//! recorded, each with the shadow's value at its path. [`pair`] then rebuilds the shadow's status,
//! headers and body by applying those values to the primary's. The result is
//! marked `exact: false` where the record cannot tell the whole shadow
//! answer: differences omitted or a truncated comparison, a truncated body,
//! non-JSON bodies that differ, a shadow array longer than the primary's
//! (its extra elements are not recorded), an order-only change, or ignored
//! paths the filter did not report. The preview still runs over such a
//! sample; the page says how many were exact.
//!
//! Everything here works on the redacted [`RecordView`] (credential headers
//! replaced): nothing else is shown.

use serde::Serialize;
use serde_json::Value;

use crate::evidence::shadow::{DifferenceView, HeaderView, RecordView, ResponseView};

/// One side of a pair, in the shape `understudy-preview` reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SideView {
    pub status: u32,
    pub headers: Vec<HeaderView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// A stored sample with both sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairView {
    pub id: String,
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub primary: SideView,
    pub shadow: SideView,
    /// Whether `shadow` is the shadow's whole answer (see the module doc).
    pub exact: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inexact: Option<String>,
}

/// One step of a rendered result path (`$.a["b c"][2][?(@.sku=="A")]`).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Key(String),
    Index(usize),
    /// An element of an id-matched array: the one whose `field` equals `value`.
    Id {
        field: String,
        value: Value,
    },
}

/// Parses a path as the filter renders it in results; `None` for anything
/// else (headers, `status`, or a malformed path).
pub fn parse_path(path: &str) -> Option<Vec<Step>> {
    let mut rest = path.strip_prefix('$')?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(r.len());
            if end == 0 {
                return None;
            }
            steps.push(Step::Key(r[..end].to_owned()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("[?(@") {
            let (field, r) = if let Some(r) = r.strip_prefix('.') {
                let end = r.find("==")?;
                (r[..end].to_owned(), &r[end + 2..])
            } else {
                let r = r.strip_prefix('[')?;
                let (field, used) = json_prefix(r)?;
                let r = r[used..].strip_prefix("]==")?;
                (field.as_str()?.to_owned(), r)
            };
            // The id value ends at the first `)]` before which it parses
            // (a number is not self-delimiting for a JSON stream reader).
            let (value, end) = r.match_indices(")]").find_map(|(at, _)| {
                serde_json::from_str::<Value>(&r[..at])
                    .ok()
                    .map(|v| (v, at))
            })?;
            rest = &r[end + 2..];
            steps.push(Step::Id { field, value });
        } else if let Some(r) = rest.strip_prefix('[') {
            if r.starts_with('"') {
                let (key, used) = json_prefix(r)?;
                steps.push(Step::Key(key.as_str()?.to_owned()));
                rest = r[used..].strip_prefix(']')?;
            } else {
                let end = r.find(']')?;
                steps.push(Step::Index(r[..end].parse().ok()?));
                rest = &r[end + 1..];
            }
        } else {
            return None;
        }
    }
    Some(steps)
}

/// The JSON value at the start of `text` and how many bytes it took.
fn json_prefix(text: &str) -> Option<(Value, usize)> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    Some((value, stream.byte_offset()))
}

fn step_mut<'v>(v: &'v mut Value, step: &Step) -> Option<&'v mut Value> {
    match (v, step) {
        (Value::Object(map), Step::Key(k)) => map.get_mut(k),
        (Value::Array(items), Step::Index(i)) => items.get_mut(*i),
        (Value::Array(items), Step::Id { field, value }) => {
            items.iter_mut().find(|item| item.get(field) == Some(value))
        }
        _ => None,
    }
}

/// Sets the value at `steps` (creating an object key, never array slots).
fn set(root: &mut Value, steps: &[Step], value: Value) -> bool {
    let Some((last, parents)) = steps.split_last() else {
        *root = value;
        return true;
    };
    let mut v = root;
    for s in parents {
        match step_mut(v, s) {
            Some(next) => v = next,
            None => return false,
        }
    }
    if let (Value::Object(map), Step::Key(k)) = (&mut *v, last) {
        map.insert(k.clone(), value);
        return true;
    }
    match step_mut(v, last) {
        Some(slot) => {
            *slot = value;
            true
        }
        None => false,
    }
}

/// Removes an object key at `steps` (array elements are handled by length).
fn remove(root: &mut Value, steps: &[Step]) -> bool {
    let Some((Step::Key(k), parents)) = steps.split_last() else {
        return false;
    };
    let mut v = root;
    for s in parents {
        match step_mut(v, s) {
            Some(next) => v = next,
            None => return false,
        }
    }
    v.as_object_mut().is_some_and(|m| m.remove(k).is_some())
}

fn side(r: &ResponseView) -> SideView {
    SideView {
        status: r.status,
        headers: r.headers.clone(),
        body: r.body.clone(),
        body_base64: r.body_base64.clone(),
    }
}

/// Both sides of `view` (see the module doc for how exact the shadow is).
pub fn pair(view: &RecordView) -> PairView {
    if let Some(recorded) = &view.shadow
        && !recorded.body_truncated
        && !view.primary.body_truncated
    {
        return PairView {
            id: view.id.clone(),
            request_id: view.request_id.clone(),
            method: view.request.method.clone(),
            path: view.request.path.clone(),
            primary: side(&view.primary),
            shadow: side(recorded),
            exact: true,
            inexact: None,
        };
    }
    let (primary, shadow, why) = rebuild(
        &view.primary,
        &view.differences,
        view.omitted,
        view.truncated.as_deref(),
    );
    PairView {
        id: view.id.clone(),
        request_id: view.request_id.clone(),
        method: view.request.method.clone(),
        path: view.request.path.clone(),
        primary,
        shadow,
        exact: why.is_empty(),
        inexact: (!why.is_empty()).then(|| why.join("; ")),
    }
}

/// The primary as recorded, the shadow rebuilt, and why it is not exact.
fn rebuild(
    recorded: &ResponseView,
    differences: &[DifferenceView],
    omitted: u32,
    truncated: Option<&str>,
) -> (SideView, SideView, Vec<String>) {
    let primary = side(recorded);
    let mut shadow = primary.clone();
    let mut why: Vec<String> = Vec::new();
    if omitted > 0 {
        why.push(format!("{omitted} differences were not recorded"));
    }
    if let Some(t) = truncated {
        why.push(format!("the comparison stopped early: {t}"));
    }
    if recorded.body_truncated {
        why.push("the primary body was cut to the record budget".into());
    }
    let mut body: Option<Value> = recorded
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok());
    let mut shorten: Vec<(Vec<Step>, usize)> = Vec::new();
    for d in differences {
        let shadow_value = d.shadow.as_deref();
        if d.path == "status" {
            match shadow_value.and_then(|v| v.parse().ok()) {
                Some(s) => shadow.status = s,
                None => why.push("the shadow status is not recorded".into()),
            }
            continue;
        }
        if let Some(name) = d.path.strip_prefix("header:") {
            shadow
                .headers
                .retain(|h| !h.name.eq_ignore_ascii_case(name));
            if let Some(v) = shadow_value {
                match serde_json::from_str::<String>(v) {
                    Ok(v) => shadow.headers.push(HeaderView {
                        name: name.to_owned(),
                        value: v,
                    }),
                    Err(_) => why.push(format!("header {name} is not recorded as text")),
                }
            }
            continue;
        }
        let (Some(steps), Some(json)) = (parse_path(&d.path), body.as_mut()) else {
            why.push(format!("{} at {} cannot be rebuilt", d.kind, d.path));
            continue;
        };
        let done = match d.kind {
            "missing_field" => remove(json, &steps),
            "array_length" => {
                let (a, b) = (
                    d.primary.as_deref().and_then(|v| v.parse::<usize>().ok()),
                    shadow_value.and_then(|v| v.parse::<usize>().ok()),
                );
                match (a, b) {
                    // Shorter: its elements are the primary's first ones
                    // (with their recorded differences applied).
                    (Some(a), Some(b)) if b < a => {
                        shorten.push((steps, b));
                        true
                    }
                    _ => false,
                }
            }
            "value_change" | "type_change" | "extra_field" => {
                match shadow_value.and_then(|v| serde_json::from_str(v).ok()) {
                    Some(v) => set(json, &steps, v),
                    None => false,
                }
            }
            _ => false,
        };
        if !done {
            why.push(format!("{} at {} cannot be rebuilt", d.kind, d.path));
        }
    }
    if let Some(json) = body.as_mut() {
        // After every element's own differences were applied by index.
        for (steps, len) in shorten {
            let mut v = Some(&mut *json);
            for s in &steps {
                v = v.and_then(|v| step_mut(v, s));
            }
            if let Some(Value::Array(items)) = v {
                items.truncate(len);
            }
        }
        shadow.body = Some(json.to_string());
        shadow.body_base64 = None;
    }
    (primary, shadow, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_core::compare::{CompareConfig, Response, compare};

    #[test]
    fn parses_every_rendered_step() {
        assert_eq!(parse_path("$"), Some(vec![]));
        assert_eq!(
            parse_path(r#"$.a["b c"][2][?(@.sku=="A")].x[?(@["id x"]==3)]"#),
            Some(vec![
                Step::Key("a".into()),
                Step::Key("b c".into()),
                Step::Index(2),
                Step::Id {
                    field: "sku".into(),
                    value: Value::from("A")
                },
                Step::Key("x".into()),
                Step::Id {
                    field: "id x".into(),
                    value: Value::from(3)
                },
            ])
        );
        // A key holding the characters that end a step.
        assert_eq!(
            parse_path(r#"$["a)]\"]"]"#),
            Some(vec![Step::Key("a)]\"]".into())])
        );
        for bad in [
            "status",
            "header:x",
            "$.",
            "$[x]",
            "$[\"a\"",
            "$..a",
            "$[?(@.a==)]",
        ] {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }

    /// Records a pair the way the filter does (core's compare, default
    /// rules) and checks the rebuilt shadow compares the same.
    fn round_trip(primary: Value, shadow: Value) -> (SideView, Vec<String>) {
        let headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        let (pb, sb) = (primary.to_string(), shadow.to_string());
        let cfg = CompareConfig::default();
        let c = compare(
            &cfg,
            &Response {
                status: 200,
                headers: &headers,
                body: pb.as_bytes(),
            },
            &Response {
                status: 200,
                headers: &headers,
                body: sb.as_bytes(),
            },
        );
        let differences: Vec<DifferenceView> = c
            .differences
            .iter()
            .map(|d| DifferenceView {
                path: d.path.clone(),
                kind: d.kind.name(),
                bucket: crate::evidence::shadow::ShownBucket::Serious,
                primary: d.primary.clone(),
                shadow: d.shadow.clone(),
                unexpected: d.unexpected,
                learned_noise_rate: None,
            })
            .collect();
        let recorded = ResponseView {
            status: 200,
            headers: vec![HeaderView {
                name: "content-type".into(),
                value: "application/json".into(),
            }],
            body: Some(pb),
            body_base64: None,
            body_truncated: false,
        };
        let (_, shadow, why) = rebuild(&recorded, &differences, 0, None);
        (shadow, why)
    }

    #[test]
    fn rebuilds_the_shadow_body_from_its_differences() {
        let shadow = serde_json::json!({"a": 2, "b": {"c": "x"}, "new": [1], "list": [1, 9]});
        let (side, why) = round_trip(
            serde_json::json!({"a": 1, "b": {"c": 1, "gone": true}, "list": [1, 2, 3]}),
            shadow.clone(),
        );
        assert!(why.is_empty(), "{why:?}");
        let got: Value = serde_json::from_str(side.body.as_deref().unwrap()).unwrap();
        assert_eq!(got, shadow);
    }

    #[test]
    fn a_longer_shadow_array_is_inexact() {
        let (_, why) = round_trip(
            serde_json::json!({"l": [1]}),
            serde_json::json!({"l": [1, 2]}),
        );
        assert!(
            why.iter().any(|w| w.contains("array_length at $.l")),
            "{why:?}"
        );
    }
}
