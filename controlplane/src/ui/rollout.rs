//! The Rollout page (`/ui/rollouts/{id}`): the step ladder with the
//! current position, stable and canary charts on one time axis with the
//! stop rules' thresholds and a release mark at every transition, the
//! current verdict with every check's numbers, the audit log, and the
//! actions (operators only, confirmed, CSRF-checked).
//!
//! It updates without a reload: `/ui/rollouts/{id}/events` is a
//! server-sent event stream whose `update` events carry the page's
//! fragments (rendered here, escaped by maud) and the chart data
//! ([`super::series`]). An event goes out as soon as the rollout changes
//! (checked every [`POLL`]) and at least every [`CHART_EVERY`] for the
//! charts. Streams are capped ([`MAX_STREAMS`]) and end with the session.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures::Stream;
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::pages::{layout_with, one_line};
use super::series::{self, Limits, Series};
use super::{UiState, Viewer, age};
use crate::api::rollouts::{action_named, decide};
use crate::rollout::engine::{Phase, Rollout, RolloutView};
use crate::rollout::judge::CheckStatus;
use crate::rollout::machine::AuditEntry;

/// How often an open page's stream looks for a change.
pub const POLL: Duration = Duration::from_millis(200);
/// The longest an open page goes without fresh chart data.
pub const CHART_EVERY: Duration = Duration::from_secs(1);
/// Open event streams at most (each polls; a peer must not open millions).
pub const MAX_STREAMS: usize = 256;
/// Audit entries shown, newest first.
const AUDIT_SHOWN: usize = 200;

pub(super) fn routes() -> Router<UiState> {
    Router::new()
        .route("/ui/rollouts/{id}", get(page))
        .route("/ui/rollouts/{id}/events", get(events))
        .route("/ui/rollouts/{id}/{action}", post(act))
}

/// The chart data of `view` up to `now_ms`, from the rollout's creation
/// (the evidence source keeps the recent past only).
fn chart(state: &UiState, view: &RolloutView, now_ms: u64) -> Series {
    let r = &view.rollout;
    let rules = &r.spec.stop_rules;
    let limits = Limits {
        max_error_increase_pp: rules.max_error_rate_increase_pp,
        max_p99_ratio: rules.max_p99_ratio,
    };
    // An ended rollout's chart stops at its last transition (plus a little).
    let end = if r.phase.is_active() {
        now_ms
    } else {
        view.audit
            .iter()
            .map(|a| a.time_ms)
            .max()
            .map_or(now_ms, |t| t.saturating_add(5_000).min(now_ms))
    };
    let from = r
        .created_ms
        .max(end.saturating_sub(crate::evidence::envoy_stats::RETENTION_MS));
    let source = state.api.engine.evidence_of(r);
    series::build(
        source.as_ref(),
        &r.spec.service,
        from,
        end,
        &view.audit,
        limits,
    )
}

async fn page(State(state): State<UiState>, who: Viewer, Path(id): Path<String>) -> Response {
    let view = match state.api.engine.view(&id) {
        Ok(v) => v,
        Err(e) => return not_found(&who, &e.to_string()),
    };
    let now_ms = crate::time::now_unix_ms();
    let update = Update::of(&state, &who, &view, now_ms);
    Html(whole(&who, &view, &update, now_ms).into_string()).into_response()
}

fn not_found(who: &Viewer, what: &str) -> Response {
    let body = html! {
        h1 { "Not found" }
        p.error { (what) }
        p { a href="/ui/" { "All rollouts" } }
    };
    (
        StatusCode::NOT_FOUND,
        Html(super::pages::layout("Not found", Some(who), body).into_string()),
    )
        .into_response()
}

/// What one live update replaces: each fragment's HTML, and the charts.
#[derive(Debug, Serialize)]
struct Update {
    status: String,
    ladder: String,
    verdict: String,
    audit: String,
    actions: String,
    series: Series,
}

impl Update {
    fn of(state: &UiState, who: &Viewer, view: &RolloutView, now_ms: u64) -> Self {
        let r = &view.rollout;
        Update {
            status: status(view).into_string(),
            ladder: ladder(r).into_string(),
            verdict: verdict(r).into_string(),
            audit: audit(&view.audit, now_ms).into_string(),
            actions: actions(r, who).into_string(),
            series: chart(state, view, now_ms),
        }
    }
}

fn whole(who: &Viewer, view: &RolloutView, update: &Update, now_ms: u64) -> Markup {
    let r = &view.rollout;
    let head = html! {
        link rel="stylesheet" href="/ui/assets/uplot-1.6.32.css";
        script src="/ui/assets/uplot-1.6.32.js" defer {}
        script src="/ui/assets/rollout.js" defer {}
    };
    let initial = serde_json::to_string(&update.series).unwrap_or_else(|_| "{}".into());
    layout_with(
        &format!("Rollout {}", r.id),
        Some(who),
        head,
        html! {
            h1 { "Rollout " (r.id) }
            p.meta {
                "Service " strong { (r.spec.service) } " · owner " (r.spec.owner)
                " · created " (age(now_ms, r.created_ms)) " ago by " (r.created_by)
                @if let Some(d) = &r.spec.description { " · " (d) }
            }
            @if view.engine.panics > 0 || view.engine.persistence_failures > 0 {
                p.error {
                    "The engine caught " (view.engine.panics) " panics and "
                    (view.engine.persistence_failures) " persistence failures: see /readyz."
                }
            }
            div #status-box { (maud::PreEscaped(&update.status)) }
            div #actions-box { (maud::PreEscaped(&update.actions)) }
            h2 { "Steps" }
            div #ladder-box { (maud::PreEscaped(&update.ladder)) }
            h2 { "Stable and canary" }
            div #charts data-rollout=(r.id) {
                div #chart-rps {}
                div #chart-errors {}
                div #chart-latency {}
            }
            script #initial-series type="application/json" { (maud::PreEscaped(json_in_html(&initial))) }
            h2 { "Verdict" }
            div #verdict-box { (maud::PreEscaped(&update.verdict)) }
            h2 { "Audit log" }
            div #audit-box { (maud::PreEscaped(&update.audit)) }
        },
    )
}

/// JSON safe inside a `<script>` element: no `</script>` or `<!--` can
/// appear (every `<` is escaped, which JSON allows).
fn json_in_html(json: &str) -> String {
    json.replace('<', "\\u003c")
}

fn status(view: &RolloutView) -> Markup {
    let r = &view.rollout;
    html! {
        p #status {
            "Phase " span #phase class={ "phase-" (r.phase.state()) } data-phase=(r.phase.state()) data-paused=(r.paused) {
                (view.stage)
            }
            @if r.paused { strong #paused { " (paused)" } }
            " · canary weight " span #weight { (r.weight) } "%"
            " · stable " (view.weights.stable) "%"
        }
    }
}

/// The step ladder: the shadow stage (if any), each canary step, the end.
fn ladder(r: &Rollout) -> Markup {
    let current = match &r.phase {
        Phase::Shadow => Some(0),
        Phase::Canary { step } | Phase::AwaitingApproval { step } => Some(step + 1),
        _ => None,
    };
    let done_before = match &r.phase {
        Phase::Succeeded => usize::MAX,
        _ => current.unwrap_or(0),
    };
    html! {
        ol #ladder {
            @if let Some(s) = &r.spec.shadow {
                li class=(rung(0, current, done_before)) data-step="shadow" {
                    "Shadow " (s.percent) "% of route " code { (s.route) }
                    " · at least " (s.min_duration_s) " s and " (s.min_compared) " pairs"
                }
            }
            @for (i, step) in r.spec.steps.iter().enumerate() {
                li class=(rung(i + 1, current, done_before)) data-step=(i + 1) {
                    "Canary " (step.weight) "%"
                    @if let Some(c) = &step.cohort { " + cohort " code { (c) } }
                    @if step.min_duration_s > 0.0 { " · at least " (step.min_duration_s) " s" }
                    @if step.min_requests > 0 { " · " (step.min_requests) " requests" }
                    @if step.manual_gate { " · manual gate" }
                    @if matches!(r.phase, Phase::AwaitingApproval { step } if step == i) {
                        strong { " · awaiting approval" }
                    }
                }
            }
            li class={ "end " (match &r.phase { Phase::Succeeded => "done", Phase::RolledBack{..} | Phase::Aborted{..} => "stopped", _ => "" }) } data-step="end" {
                (match &r.phase {
                    Phase::RolledBack { reason } => format!("Rolled back: {}", one_line(reason)),
                    Phase::Aborted { reason } => format!("Aborted: {}", one_line(reason)),
                    Phase::Succeeded => "Succeeded".to_owned(),
                    _ => "Done".to_owned(),
                })
            }
        }
    }
}

fn rung(i: usize, current: Option<usize>, done_before: usize) -> &'static str {
    if current == Some(i) {
        "current"
    } else if i < done_before {
        "done"
    } else {
        ""
    }
}

fn verdict(r: &Rollout) -> Markup {
    let Some(j) = &r.last_judgement else {
        return html! { p #verdict data-verdict="" { "No verdict yet." } };
    };
    let name = serde_json::to_value(j.verdict)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    html! {
        p #verdict data-verdict=(name) {
            strong class={ "verdict-" (name) } { (name) } ": " (j.reason)
        }
        table #checks {
            thead { tr { th { "Check" } th { "Status" } th { "Threshold" } th { "Measured" } th { "Detail" } } }
            tbody {
                @for c in &j.checks {
                    tr data-check=(c.name) data-status=(check_status(c.status)) {
                        td { (c.name) }
                        td class={ "check-" (check_status(c.status)) } { (check_status(c.status)) }
                        td { @if let Some(t) = c.threshold { (number(t)) } }
                        td.measured {
                            @for (k, v) in &c.measured { span { (k) "=" (number(*v)) } " " }
                        }
                        td { (c.detail) }
                    }
                }
            }
        }
        @if !j.queries.is_empty() {
            details { summary { "Queries" } ul { @for q in &j.queries { li { code { (q) } } } } }
        }
    }
}

fn check_status(s: CheckStatus) -> &'static str {
    match s {
        CheckStatus::Pass => "pass",
        CheckStatus::Fail => "fail",
        CheckStatus::Insufficient => "insufficient",
    }
}

/// A number for people: up to 4 significant decimals, no trailing zeros.
fn number(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_owned() }
}

fn audit(entries: &[AuditEntry], now_ms: u64) -> Markup {
    html! {
        table #audit {
            thead { tr { th { "When" } th { "From" } th { "To" } th { "Actor" } th { "Reason" } } }
            tbody {
                @for a in entries.iter().rev().take(AUDIT_SHOWN) {
                    tr data-transition=(a.from != a.to) {
                        td title=(a.time_ms) { (age(now_ms, a.time_ms)) " ago" }
                        td { (a.from) } td { (a.to) } td.actor { (a.actor) }
                        td.reason { (a.reason) }
                    }
                }
            }
        }
    }
}

/// The buttons an operator may use now; nothing for a viewer or an ended
/// rollout (the server refuses anyway).
fn actions(r: &Rollout, who: &Viewer) -> Markup {
    if !who.is_operator() || !r.phase.is_active() {
        return html! {};
    }
    let mut shown = vec![if r.paused { "resume" } else { "pause" }];
    shown.extend(["promote", "abort"]);
    html! {
        div #actions {
            @for action in shown {
                form.action method="post" action={ "/ui/rollouts/" (r.id) "/" (action) }
                    data-confirm={ (action) " rollout " (r.id) "?" } {
                    input type="hidden" name="csrf" value=(who.csrf);
                    button type="submit" data-action=(action) { (action) }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn act(
    State(state): State<UiState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    form: Result<axum::Form<ActionForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    // No form (a script's POST): the token may come in the header instead.
    let csrf = form.as_ref().ok().map(|f| f.csrf.as_str());
    let who = match super::operator(&state, &headers, csrf) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let action = match action_named(&action) {
        Ok(a) => a,
        Err(e) => return (e.status(), e.message().to_owned()).into_response(),
    };
    let engine = Arc::clone(&state.api.engine);
    let target = id.clone();
    match decide(move || engine.act(&target, action, &who.name, SystemTime::now())).await {
        Ok(_) => Redirect::to(&format!("/ui/rollouts/{id}")).into_response(),
        Err(e) => (
            e.status(),
            Html(
                super::pages::layout(
                    "Refused",
                    None,
                    html! {
                        h1 { "Refused" }
                        p.error #refusal { (e.message()) }
                        p { a href={ "/ui/rollouts/" (id) } { "Back to the rollout" } }
                    },
                )
                .into_string(),
            ),
        )
            .into_response(),
    }
}

/// What, when changed, makes a stream send at once.
fn key(view: &RolloutView) -> (String, u32, bool, Option<String>, usize) {
    let r = &view.rollout;
    (
        view.stage.clone(),
        r.weight,
        r.paused,
        r.last_judgement.as_ref().map(|j| j.reason.clone()),
        view.audit.len(),
    )
}

/// Releases a stream's slot when the stream is dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn events(
    State(state): State<UiState>,
    who: Viewer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if state.api.engine.view(&id).is_err() {
        return (StatusCode::NOT_FOUND, "no such rollout\n").into_response();
    }
    let open = Arc::clone(&state.streams);
    if open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_STREAMS {
        open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open dashboards\n",
        )
            .into_response();
    }
    let slot = Slot(open);
    let cookie = super::session::cookie_value(&headers, super::COOKIE).unwrap_or_default();
    Sse::new(stream(state, who, cookie, id, slot))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn stream(
    state: UiState,
    who: Viewer,
    cookie: String,
    id: String,
    slot: Slot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Looking {
        state: UiState,
        who: Viewer,
        cookie: String,
        id: String,
        last: Option<(String, u32, bool, Option<String>, usize)>,
        sent: Option<Instant>,
        _slot: Slot,
    }
    let start = Looking {
        state,
        who,
        cookie,
        id,
        last: None,
        sent: None,
        _slot: slot,
    };
    futures::stream::unfold(start, |mut l| async move {
        loop {
            if l.sent.is_some() {
                tokio::time::sleep(POLL).await;
                // The session may have ended (logout, expiry): stop.
                l.state.sessions.get(&l.cookie, Instant::now())?;
            }
            let view = l.state.api.engine.view(&l.id).ok()?;
            let k = key(&view);
            let due = l.sent.is_none_or(|t| t.elapsed() >= CHART_EVERY);
            if l.last.as_ref() != Some(&k) || due {
                let now_ms = crate::time::now_unix_ms();
                let update = Update::of(&l.state, &l.who, &view, now_ms);
                let data = serde_json::to_string(&update).ok()?;
                l.last = Some(k);
                l.sent = Some(Instant::now());
                return Some((Ok(Event::default().event("update").data(data)), l));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_inside_a_script_cannot_close_it() {
        let s = json_in_html(r#"{"label":"</script><script>alert(1)</script>"}"#);
        assert!(!s.contains("</script"), "{s}");
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["label"], "</script><script>alert(1)</script>");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(1.0), "1");
        assert_eq!(number(0.012345), "0.0123");
        assert_eq!(number(-0.00001), "0");
        assert_eq!(number(250.5), "250.5");
    }
}
