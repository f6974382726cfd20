//! The Shadow pages as maud templates (escaped by construction): the route
//! table, the route page with its path tree, side-by-side samples and the
//! rule editor's markup (`shadow.js` drives it).

use std::collections::{BTreeMap, BTreeSet};

use maud::{Markup, PreEscaped, html};
use serde_json::Value;
use understudy_core::compare::RawCompareConfig;

use super::pair::{self, Step};
use crate::evidence::shadow::{PathView, RecordView, RouteDetail, RouteSummary, Stats};
use crate::ui::Viewer;
use crate::ui::pages::{layout, layout_with};

/// Bodies longer than this are shown as text, not as a highlighted tree.
const MAX_SHOWN_BODY: usize = 32 * 1024;

const STYLE: &str = "
.num{text-align:right;font-variant-numeric:tabular-nums}
#paths ul{list-style:none;padding-left:1.2em;margin:0}
#paths>ul{padding-left:0}
#paths li{margin:.1em 0}
.count{color:#445;font-size:.9em;margin-left:.6em}
.serious{color:#b00020}.noise,.noisy{color:#8a5a00}
.sample{border:1px solid #dde;margin:1em 0;padding:.5em}
.diff{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.diff pre{background:#f6f7f9;padding:.5em;overflow:auto;max-height:30em;margin:0}
.differs{background:#ffe08a;outline:1px solid #d4a000}
#rule-editor fieldset{margin:.5em 0}
#rule-editor li button{margin-left:.5em}
.preview-lists{display:grid;grid-template-columns:1fr 1fr 1fr;gap:1em}
";

fn pct(rate: Option<f64>) -> String {
    rate.map_or_else(|| "–".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn ci(stats: &Stats) -> String {
    stats.match_rate_ci.map_or_else(String::new, |[lo, hi]| {
        format!("[{:.1}%, {:.1}%]", lo * 100.0, hi * 100.0)
    })
}

fn noise_rate(stats: &Stats) -> Option<f64> {
    (stats.compared > 0)
        .then(|| stats.mismatched_noise.min(stats.compared) as f64 / stats.compared as f64)
}

fn route_href(route: &str) -> String {
    format!("/ui/shadow/{}", percent_path(route))
}

/// Route names are validated as `[A-Za-z0-9_-]` by the filter config, but a
/// reporter may send anything: encode all else.
fn percent_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/ui/shadow`: the route table.
pub fn list(who: &Viewer, routes: &[RouteSummary], configured: &[String]) -> Markup {
    layout(
        "Shadow",
        Some(who),
        html! {
            style { (STYLE) }
            h1 { "Shadow" }
            p { "Live shadow comparisons per filter route. Match rate: pairs with no serious difference (95% interval)." }
            table #shadow-routes {
                thead { tr {
                    th { "Route" } th.num { "Compared" } th.num { "Match rate" } th { "95% interval" }
                    th.num { "Serious" } th.num { "Noise" } th.num { "Unexpected" } th.num { "Skipped" }
                } }
                tbody {
                    @for r in routes {
                        @let skipped: u64 = r.live.skipped.values().fold(0u64, |a, b| a.saturating_add(*b));
                        tr data-route=(r.route) {
                            td { a href=(route_href(&r.route)) { (r.route) } }
                            td.num { (r.live.compared) }
                            td.num.match-rate { (pct(r.live.match_rate)) }
                            td { (ci(&r.live)) }
                            td.num.serious { (pct(r.live.serious_rate)) }
                            td.num.noise { (pct(noise_rate(&r.live))) }
                            td.num { (pct(r.live.unexpected_rate)) }
                            td.num { a href={ (route_href(&r.route)) "#skips" } { (skipped) } }
                        }
                    }
                    @for name in configured {
                        tr data-route=(name) {
                            td { a href=(route_href(name)) { (name) } }
                            td.num { "0" }
                            td colspan="6" { "no reports yet" }
                        }
                    }
                }
            }
            @if routes.is_empty() && configured.is_empty() {
                p { "No filter route shadows traffic yet." }
            }
        },
    )
}

pub fn unknown(who: &Viewer, route: &str) -> Markup {
    layout(
        "Shadow",
        Some(who),
        html! {
            h1 { "Shadow: " (route) }
            p.error { "No shadow reports and no shadowing filter route named " (route) "." }
            p { a href="/ui/shadow" { "All routes" } }
        },
    )
}

/// Where the page's scripts are (`None`: the preview was not built).
pub struct Assets {
    pub script: String,
    pub glue: Option<String>,
    pub wasm: Option<String>,
}

/// `/ui/shadow/{route}`.
pub fn route(
    who: &Viewer,
    route: &str,
    detail: Option<&RouteDetail>,
    rules: Option<&RawCompareConfig>,
    samples: &[RecordView],
    assets: &Assets,
) -> Markup {
    let head = html! {
        style { (STYLE) }
        script type="module" src=(assets.script) {}
    };
    let live = detail.map(|d| &d.summary.live);
    layout_with(
        &format!("Shadow {route}"),
        Some(who),
        head,
        html! {
            h1 { "Shadow: " (route) }
            p { a href="/ui/shadow" { "All routes" } }
            @if let Some(s) = live {
                table #route-stats {
                    tr { th { "Compared" } td.num #compared { (s.compared) } }
                    tr { th { "Match rate" } td.num #match-rate { (pct(s.match_rate)) } td { (ci(s)) } }
                    tr { th { "Serious" } td.num.serious { (pct(s.serious_rate)) } td { (s.mismatched_serious) " pairs" } }
                    tr { th { "Noise" } td.num.noise { (pct(noise_rate(s))) } td { (s.mismatched_noise) " pairs" } }
                    tr { th { "Unexpected" } td.num { (pct(s.unexpected_rate)) } td { (s.unexpected) " pairs" } }
                }
                h2 #skips { "Skips by reason" }
                @if s.skipped.is_empty() {
                    p { "None." }
                } @else {
                    table #skip-reasons {
                        @for (reason, n) in &s.skipped {
                            tr data-reason=(reason) { td { (reason) } td.num { (n) } }
                        }
                    }
                }
            } @else {
                p { "No reports for this route yet." }
            }
            h2 { "Differing paths" }
            @match detail {
                Some(d) if !d.top_paths.is_empty() => (path_tree(&d.top_paths)),
                _ => p { "None recorded." },
            }
            h2 { "Recent samples" }
            @if samples.is_empty() {
                p { "No stored samples." }
            }
            div #samples {
                @for s in samples {
                    (sample(who, s))
                }
            }
            div #replay-result role="status" aria-live="polite" {}
            h2 { "Compare rules" }
            (editor(who, route, rules, assets))
        },
    )
}

/// One node of the path tree: its own counts if it is a reported path.
#[derive(Default)]
struct Node<'a> {
    own: Option<&'a PathView>,
    children: BTreeMap<String, Node<'a>>,
}

fn step_text(step: &Step) -> String {
    match step {
        Step::Key(k)
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            format!(".{k}")
        }
        Step::Key(k) => format!("[{}]", Value::String(k.clone())),
        Step::Index(i) => format!("[{i}]"),
        Step::Id { field, value } => format!("[?(@.{field}=={value})]"),
    }
}

/// The reported paths as a nested list: `$.a.b` under `$.a` under `$`.
fn path_tree(paths: &[PathView]) -> Markup {
    let mut root: BTreeMap<String, Node<'_>> = BTreeMap::new();
    for p in paths {
        // Steps as labels; `status` and `header:x` stay one label each.
        let labels: Vec<String> = match pair::parse_path(&p.path) {
            Some(steps) => std::iter::once("$".to_owned())
                .chain(steps.iter().map(step_text))
                .collect(),
            None => vec![p.path.clone()],
        };
        let mut level = &mut root;
        let last = labels.len().saturating_sub(1);
        for (i, label) in labels.into_iter().enumerate() {
            let n = level.entry(label).or_default();
            if i == last {
                n.own = Some(p);
                break;
            }
            level = &mut n.children;
        }
    }
    html! {
        div #paths { (tree_level(&root, "")) }
    }
}

fn tree_level(level: &BTreeMap<String, Node<'_>>, prefix: &str) -> Markup {
    html! {
        ul {
            @for (label, node) in level {
                @let full = if prefix.is_empty() { label.clone() } else { format!("{prefix}{label}") };
                @if let Some(p) = node.own {
                    li data-path=(p.path) {
                        code { (label) }
                        span.count {
                            (p.count) " records"
                            @if p.serious > 0 { ", " span.serious { (p.serious) " serious" } }
                            @if p.noise > 0 { ", " span.noise { (p.noise) " noise" } }
                            @if p.unexpected > 0 { ", " (p.unexpected) " unexpected" }
                            @if let Some(l) = p.learned_noise_rate { ", learned noise " (pct(Some(l))) }
                        }
                        @if !node.children.is_empty() { (tree_level(&node.children, &full)) }
                    }
                } @else {
                    li data-prefix=(full) {
                        code { (label) }
                        @if !node.children.is_empty() { (tree_level(&node.children, &full)) }
                    }
                }
            }
        }
    }
}

/// One stored sample: its differences and both bodies side by side.
fn sample(who: &Viewer, view: &RecordView) -> Markup {
    let p = pair::pair(view);
    let differing: BTreeSet<&str> = view.differences.iter().map(|d| d.path.as_str()).collect();
    html! {
        div.sample data-sample=(view.id) {
            p {
                strong { "Sample " (view.id) }
                " · " code { (view.request.method) " " (view.request.path) }
                " · request " code { (view.request_id) }
                @if view.serious { " · " span.serious { "serious" } }
                @if who.is_operator() {
                    " " button.replay type="button" data-sample=(view.id) { "Replay" }
                }
            }
            table.differences {
                thead { tr { th { "Path" } th { "Kind" } th { "Bucket" } th { "Primary" } th { "Shadow" } } }
                tbody {
                    @for d in &view.differences {
                        @let bucket = serde_json::to_value(d.bucket).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                        tr data-path=(d.path) {
                            td { code { (d.path) } }
                            td { (d.kind) }
                            td class=(bucket) { (bucket) }
                            td { code { (d.primary.as_deref().unwrap_or("(absent)")) } }
                            td { code { (d.shadow.as_deref().unwrap_or("(absent)")) } }
                        }
                    }
                }
            }
            @if view.omitted > 0 { p { (view.omitted) " more differences not listed." } }
            @if let Some(why) = &p.inexact {
                p.note { "The shadow body is rebuilt from the recorded differences and may be incomplete: " (why) }
            }
            div.diff {
                div.side.primary {
                    h4 { "Primary · " (p.primary.status) }
                    (body(p.primary.body.as_deref(), p.primary.body_base64.as_deref(), &differing))
                }
                div.side.shadow {
                    h4 { "Shadow · " (p.shadow.status) }
                    (body(p.shadow.body.as_deref(), p.shadow.body_base64.as_deref(), &differing))
                }
            }
        }
    }
}

fn body(text: Option<&str>, base64: Option<&str>, differing: &BTreeSet<&str>) -> Markup {
    if let Some(b64) = base64 {
        return html! { pre { "(binary body, base64) " (b64.chars().take(200).collect::<String>()) } };
    }
    let text = text.unwrap_or("");
    if text.len() <= MAX_SHOWN_BODY
        && let Ok(value) = serde_json::from_str::<Value>(text)
    {
        let mut out = String::new();
        json_markup(&value, &mut Vec::new(), differing, 0, &mut out);
        return html! { pre.json { (PreEscaped(out)) } };
    }
    let shown: String = text.chars().take(MAX_SHOWN_BODY).collect();
    let whole = differing.contains("$");
    html! { pre { @if whole { span.differs { (shown) } } @else { (shown) } } }
}

/// Escapes text for HTML (the JSON tree is built as a string: deep bodies
/// would otherwise nest one maud closure per level).
fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

fn render_path(steps: &[String]) -> String {
    let mut s = String::from("$");
    for step in steps {
        s.push_str(step);
    }
    s
}

/// Pretty JSON with every value at a differing path wrapped in
/// `<span class="differs">`. `depth` is bounded by serde_json's own parse
/// limit (128), so the recursion is too.
fn json_markup(
    v: &Value,
    path: &mut Vec<String>,
    differing: &BTreeSet<&str>,
    depth: usize,
    out: &mut String,
) {
    let here = render_path(path);
    let mark = differing.contains(here.as_str());
    if mark {
        out.push_str("<span class=\"differs\" data-path=\"");
        escape(&here, out);
        out.push_str("\">");
    }
    let indent = "  ".repeat(depth + 1);
    let close = "  ".repeat(depth);
    match v {
        Value::Object(map) if !map.is_empty() => {
            out.push_str("{\n");
            for (i, (k, item)) in map.iter().enumerate() {
                out.push_str(&indent);
                escape(&Value::String(k.clone()).to_string(), out);
                out.push_str(": ");
                path.push(step_text(&Step::Key(k.clone())));
                json_markup(item, path, differing, depth + 1, out);
                path.pop();
                if i + 1 < map.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&close);
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&indent);
                path.push(format!("[{i}]"));
                json_markup(item, path, differing, depth + 1, out);
                path.pop();
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&close);
            out.push(']');
        }
        other => escape(&other.to_string(), out),
    }
    if mark {
        out.push_str("</span>");
    }
}

/// The rule editor's markup; `shadow.js` fills and drives it.
fn editor(who: &Viewer, route: &str, rules: Option<&RawCompareConfig>, assets: &Assets) -> Markup {
    let rules_json = rules.map_or_else(
        || "null".to_owned(),
        |r| serde_json::to_string(r).unwrap_or_else(|_| "null".into()),
    );
    html! {
        @if assets.glue.is_none() {
            p.error #preview-missing { "rule preview not built: run `cargo xtask setup`" }
        }
        @if rules.is_none() {
            p { "The filter no longer shadows this route: there are no rules to edit." }
        }
        div #rule-editor
            data-route=(route)
            data-rules=(rules_json)
            data-samples={ "/ui/shadow/" (percent_path(route)) "/samples.json" }
            data-apply={ "/ui/shadow/" (percent_path(route)) "/rules" }
            data-glue=[assets.glue.as_deref()]
            data-wasm=[assets.wasm.as_deref()]
            data-operator=(if who.is_operator() { "1" } else { "0" })
        {
            fieldset {
                legend { "Ignore (JSON Pointer or glob)" }
                ul #rules-ignore {}
                input #rule-ignore-input type="text" placeholder="$.meta.* or /meta/ts";
                " " button #rule-ignore-add type="button" { "Add" }
            }
            fieldset {
                legend { "Tolerance" }
                ul #rules-tolerance {}
                input #rule-tolerance-path type="text" placeholder="$.total";
                select #rule-tolerance-kind { option value="absolute" { "absolute" } option value="relative" { "relative" } }
                input #rule-tolerance-value type="number" step="any" min="0" placeholder="0.01";
                " " button #rule-tolerance-add type="button" { "Add" }
            }
            fieldset {
                legend { "Unordered arrays" }
                ul #rules-unordered {}
                input #rule-unordered-input type="text" placeholder="$.tags";
                " " button #rule-unordered-add type="button" { "Add" }
            }
            fieldset {
                legend { "Match array elements by id" }
                ul #rules-match-by-id {}
                input #rule-match-path type="text" placeholder="$.lines";
                input #rule-match-id type="text" placeholder="sku";
                " " button #rule-match-add type="button" { "Add" }
            }
            p #preview-status role="status" { "Loading the preview…" }
            p { "Match rate over the stored samples with these rules: " strong #preview-match-rate { "–" }
                " (now " span #preview-base-rate { "–" } ")" }
            div.preview-lists {
                div { h4 { "Remaining serious differences" } ul #preview-remaining {} }
                div { h4 { "No longer serious" } ul #preview-gone {} }
                div { h4 { "Noise" } ul #preview-noise {} }
            }
            @if who.is_operator() && rules.is_some() {
                button #apply-rules type="button" { "Apply these rules to the filter" }
            }
            div #apply-result role="status" aria-live="polite" {}
        }
    }
}
