//! The dashboard's pages as maud templates: escaped by construction, checked
//! at compile time, no files beside the binary.

use maud::{DOCTYPE, Markup, html};

use super::{Filters, Viewer, age};
use crate::api::auth::Role;
use crate::evidence::usage::TenantUsage;
use crate::rollout::engine::{Phase, Rollout};
use crate::xds::registry::EnvoyStatus;

/// Tenants the Fleet page lists.
pub const FLEET_TENANTS: usize = 50;

/// The longest reason shown in a table row (the rollout page has it whole).
const REASON_CHARS: usize = 160;

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232a}
header{background:#1d232a;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#fff}
header form{margin-left:auto}
main{padding:1em 1.2em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #dde}
td.reason{max-width:40em;color:#445}
.phase-rolled_back,.verdict-rollback{color:#b00020;font-weight:600}
.phase-succeeded,.verdict-promote{color:#1b7f3b;font-weight:600}
.phase-canary,.phase-shadow,.phase-awaiting_approval,.verdict-hold{color:#8a5a00}
form.filters{display:flex;gap:.8em;margin-bottom:1em;align-items:end}
.error{color:#b00020}
p.meta{color:#445}
#ladder li{padding:.2em 0;color:#667}
#ladder li.done{color:#1b7f3b}
#ladder li.current{color:#1d232a;font-weight:700}
#ladder li.current::after{content:' ◀ now'}
#ladder li.stopped{color:#b00020;font-weight:600}
#actions{display:flex;gap:.6em;margin:.6em 0}
#actions button{padding:.35em 1em}
#charts>div{margin-bottom:1em}
.check-fail{color:#b00020;font-weight:600}
.check-pass{color:#1b7f3b}
.check-insufficient{color:#8a5a00}
td.measured span{white-space:nowrap}
";

/// Every page: the header with navigation and the caller, and the CSRF
/// token in `<meta name="csrf-token">` for scripts that POST.
pub fn layout(title: &str, who: Option<&Viewer>, body: Markup) -> Markup {
    layout_with(title, who, html! {}, body)
}

/// [`layout`] with extra `<head>` content (scripts, styles).
pub fn layout_with(title: &str, who: Option<&Viewer>, head: Markup, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(who) = who {
                    meta name="csrf-token" content=(who.csrf);
                }
                title { (title) " · Understudy" }
                style { (STYLE) }
                (head)
            }
            body {
                header {
                    strong { "Understudy" }
                    @if let Some(who) = who {
                        a href="/ui/" { "Rollouts" }
                        a href="/ui/shadow" { "Shadow" }
                        a href="/ui/fleet" { "Fleet" }
                        span { (who.principal.name) " (" (role(who.principal.role)) ")" }
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(who.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn role(r: Role) -> &'static str {
    match r {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
    }
}

/// The login page, with `error` above the form.
pub fn login(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            h1 { "Log in" }
            @if let Some(e) = error {
                p.error { (e) }
            }
            form method="post" action="/ui/login" {
                label for="token" { "API token " }
                input #token type="password" name="token" autocomplete="current-password" required;
                " "
                button type="submit" { "Log in" }
            }
            p { "The same tokens as the API: a viewer sees everything and changes nothing." }
        },
    )
}

/// Whether `r` passes the page's filters.
pub fn matches(r: &Rollout, f: &Filters) -> bool {
    let phase_ok = match f.phase.as_str() {
        "" => true,
        "active" => r.phase.is_active(),
        p => r.phase.state() == p,
    };
    let service = f.service.trim();
    phase_ok && (service.is_empty() || r.spec.service == service)
}

pub(super) fn one_line(text: &str) -> String {
    let mut s: String = text.chars().take(REASON_CHARS).collect();
    if text.chars().count() > REASON_CHARS {
        s.push('…');
    }
    s
}

/// The Rollouts page: `shown` of `total` rollouts, newest first.
pub fn rollouts(
    who: &Viewer,
    shown: &[&Rollout],
    total: usize,
    filters: &Filters,
    now_ms: u64,
) -> Markup {
    let phases = [
        ("", "all"),
        ("active", "active"),
        ("succeeded", "succeeded"),
        ("rolled_back", "rolled back"),
        ("aborted", "aborted"),
    ];
    layout(
        "Rollouts",
        Some(who),
        html! {
            h1 { "Rollouts" }
            form.filters method="get" action="/ui/" {
                label { "Phase "
                    select name="phase" {
                        @for (value, label) in phases {
                            option value=(value) selected[filters.phase == value] { (label) }
                        }
                    }
                }
                label { "Service " input type="text" name="service" value=(filters.service); }
                button type="submit" { "Filter" }
            }
            p { (shown.len()) " of " (total) " rollouts" }
            table #rollouts {
                thead { tr {
                    th { "Rollout" } th { "Service" } th { "Owner" } th { "Phase" }
                    th { "Weight" } th { "Verdict" } th { "Reason" } th { "Age" }
                } }
                tbody {
                    @for r in shown {
                        @let verdict = r.last_judgement.as_ref();
                        @let reason = match &r.phase {
                            Phase::RolledBack { reason } | Phase::Aborted { reason } => reason.clone(),
                            _ => verdict.map(|j| j.reason.clone()).unwrap_or_default(),
                        };
                        tr data-rollout=(r.id) data-phase=(r.phase.state()) {
                            td { a href={ "/ui/rollouts/" (r.id) } { (r.id) } }
                            td { (r.spec.service) }
                            td { (r.spec.owner) }
                            td class={ "phase phase-" (r.phase.state()) } {
                                (r.phase.label())
                                @if r.paused { " (paused)" }
                            }
                            td { (r.weight) "%" }
                            td {
                                @if let Some(j) = verdict {
                                    @let v = serde_json::to_value(j.verdict).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                                    span class={ "verdict-" (v) } { (v) }
                                }
                            }
                            td.reason title=(reason) { (one_line(&reason)) }
                            td { (age(now_ms, r.created_ms)) }
                        }
                    }
                }
            }
        },
    )
}

/// The Fleet page: connected Envoys with each xDS type's ACKed version and
/// last NACK, and the top tenants by usage.
pub fn fleet(who: &Viewer, envoys: &[EnvoyStatus], tenants: &[TenantUsage], now_ms: u64) -> Markup {
    layout(
        "Fleet",
        Some(who),
        html! {
            h1 { "Fleet" }
            h2 { "Envoys (" (envoys.len()) " connected)" }
            table #envoys {
                thead { tr {
                    th { "Node" } th { "Cluster" } th { "Connected" } th { "Type" }
                    th { "ACKed version" } th { "Sent" } th { "Last NACK" }
                } }
                tbody {
                    @for e in envoys {
                        @let node = e.node_id.clone().unwrap_or_else(|| "(no node id)".into());
                        @let rows = e.types.len().max(1);
                        @for (i, (ty, state)) in e.types.iter().enumerate() {
                            tr data-node=(node) data-type=(ty) {
                                @if i == 0 {
                                    td rowspan=(rows) { (node) }
                                    td rowspan=(rows) { (e.node_cluster.as_deref().unwrap_or("")) }
                                    td rowspan=(rows) { (age(now_ms, crate::time::unix_ms(e.connected_at))) " ago" }
                                }
                                td { (ty) }
                                td.acked { (state.acked_version.as_deref().unwrap_or("—")) }
                                td { (state.sent_version.as_deref().unwrap_or("—"))
                                    @if state.awaiting_reply { " (awaiting reply)" } }
                                td.nack {
                                    @if let Some(n) = &state.last_nack {
                                        span.error { "version " (n.version) ": " (n.error) }
                                    }
                                }
                            }
                        }
                        @if e.types.is_empty() {
                            tr data-node=(node) { td { (node) } td colspan="6" { "subscribed to nothing yet" } }
                        }
                    }
                }
            }
            h2 { "Tenants (top " (FLEET_TENANTS) " by requests)" }
            table #tenants {
                thead { tr {
                    th { "Tenant" } th { "Tier" } th { "Allowed" } th { "Limited (429)" }
                    th { "Limit across the fleet (req/s)" } th { "Envoys reporting" }
                } }
                tbody {
                    @for t in tenants {
                        tr data-tenant=(t.tenant) {
                            td { (t.tenant) } td { (t.tier) } td { (t.allowed) } td { (t.limited) }
                            td { (format!("{:.1}", t.fleet_limit_rps)) } td { (t.limit_rps_by_envoy.len()) }
                        }
                    }
                }
            }
        },
    )
}
