//! The dashboard's first page, in process: the real control plane on
//! loopback with tokens. No session means the login page, never data; a
//! token becomes an HttpOnly, SameSite=Strict session cookie; the
//! Rollouts table shows every rollout with its phase, weight, verdict and
//! reason, filtered by phase and service; logout ends the session.

mod common;

use serde_json::json;
use tokio::net::TcpListener;
use understudy_controlplane::api::auth::{Auth, Limits};
use understudy_controlplane::store::Store;

const OPERATOR: &str = "operator-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789ab";

fn desired() -> understudy_controlplane::model::DesiredState {
    common::desired(
        json!({}),
        [common::service("shop", 9001), common::service("cart", 9011)],
    )
}

async fn start() -> String {
    let xds = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", api.local_addr().unwrap());
    let auth = Auth::from_entries(
        &format!("ops:operator:{OPERATOR}\nvera:viewer:{VIEWER}"),
        Limits::default(),
    )
    .unwrap();
    let options = understudy_controlplane::Options {
        auth,
        ..Default::default()
    };
    tokio::spawn(understudy_controlplane::run_with(
        Store::new(desired()).unwrap(),
        options,
        xds,
        api,
        std::future::pending(),
    ));
    base
}

/// A client that keeps no cookies and follows no redirects: the test
/// sees every Set-Cookie and Location itself.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(common::TIMEOUT)
        .build()
        .unwrap()
}

async fn create(base: &str, spec: serde_json::Value) -> String {
    let r = common::http()
        .post(format!("{base}/v1/rollouts"))
        .bearer_auth(OPERATOR)
        .body(spec.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

fn spec(service: &str) -> serde_json::Value {
    json!({
        "service": service, "owner": format!("team-{service}"),
        "stop_rules": {"max_error_rate_increase_pp": 1.0},
        "steps": [{"weight": 5, "min_duration_s": 3600}, {"weight": 100}]
    })
}

async fn login(base: &str, token: &str) -> reqwest::Response {
    browser()
        .post(format!("{base}/ui/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

fn session_cookie(r: &reqwest::Response) -> String {
    let set = r
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=28800"] {
        assert!(set.contains(attribute), "{set}");
    }
    set.split(';').next().unwrap().to_owned()
}

async fn page(base: &str, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut req = browser().get(format!("{base}{path}"));
    if let Some(c) = cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn without_a_session_every_page_is_the_login_page() {
    let base = start().await;
    for path in ["/ui/", "/ui/?phase=active"] {
        let r = page(&base, path, None).await;
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/ui/login");
        assert!(
            r.text().await.unwrap().is_empty(),
            "no data without a session"
        );
    }
    // A forged or stale cookie is no session either.
    let r = page(&base, "/ui/", Some("understudy_session=deadbeef")).await;
    assert_eq!(r.status(), 303);
    let r = page(&base, "/ui/login", None).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(r#"name="token""#));
    // A wrong token: 401, no cookie.
    let r = login(&base, "not-a-token-at-all-xxxxxxxx").await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get(reqwest::header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn a_viewer_logs_in_and_sees_every_rollout_filtered() {
    let base = start().await;
    let shop = create(&base, spec("shop")).await;
    let cart = create(&base, spec("cart")).await;
    let abort = common::http()
        .post(format!("{base}/v1/rollouts/{cart}/abort"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert!(abort.status().is_success());

    let r = login(&base, VIEWER).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/");
    let cookie = session_cookie(&r);

    let r = page(&base, "/ui/", Some(&cookie)).await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    for text in [
        format!(r#"data-rollout="{shop}""#),
        format!(r#"data-rollout="{cart}""#),
        "team-shop".to_owned(),
        "canary step 1".to_owned(),
        "5%".to_owned(),
        "aborted".to_owned(),
        "vera (viewer)".to_owned(),
        "2 of 2 rollouts".to_owned(),
    ] {
        assert!(html.contains(&text), "{text} missing from {html}");
    }
    // No action for a viewer on this page.
    assert!(!html.contains("/abort"), "{html}");

    let active = page(&base, "/ui/?phase=active", Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(active.contains(&format!(r#"data-rollout="{shop}""#)));
    assert!(
        !active.contains(&format!(r#"data-rollout="{cart}""#)),
        "{active}"
    );
    assert!(active.contains("1 of 2 rollouts"));
    let cart_only = page(&base, "/ui/?service=cart", Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(cart_only.contains(&format!(r#"data-rollout="{cart}""#)));
    assert!(!cart_only.contains(&format!(r#"data-rollout="{shop}""#)));

    // Text from a spec is escaped, never markup.
    let hostile = create(
        &base,
        json!({
            "service": "cart", "owner": "<script>alert(1)</script>",
            "stop_rules": {"max_error_rate_increase_pp": 1.0},
            "steps": [{"weight": 100}]
        }),
    )
    .await;
    let _ = hostile;
    let html = page(&base, "/ui/", Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(!html.contains("<script>alert(1)</script>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));

    // Logout ends the session: the same cookie is no session any more.
    let r = browser()
        .post(format!("{base}/ui/logout"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(page(&base, "/ui/", Some(&cookie)).await.status(), 303);
}

/// The page's CSRF token, from its `<meta name="csrf-token">`.
fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf-token" content=""#)
        .expect("a csrf-token meta");
    let rest = &html[at + r#"name="csrf-token" content=""#.len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

async fn post_action(
    base: &str,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
) -> reqwest::Response {
    let mut req = browser()
        .post(format!("{base}{path}"))
        .header(reqwest::header::COOKIE, cookie);
    if let Some(token) = csrf {
        req = req.form(&[("csrf", token)]);
    }
    req.send().await.unwrap()
}

async fn rollout_json(base: &str, id: &str) -> serde_json::Value {
    common::http()
        .get(format!("{base}/v1/rollouts/{id}"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_rollout_page_shows_the_ladder_and_only_operators_act_with_their_token() {
    let base = start().await;
    let shop = create(&base, spec("shop")).await;
    let path = format!("/ui/rollouts/{shop}");

    // No session: the login page, for the page and its event stream.
    for p in [path.clone(), format!("{path}/events")] {
        let r = page(&base, &p, None).await;
        assert_eq!(r.status(), 303, "{p}");
        assert_eq!(r.headers()["location"], "/ui/login");
    }

    let viewer = session_cookie(&login(&base, VIEWER).await);
    let html = page(&base, &path, Some(&viewer))
        .await
        .text()
        .await
        .unwrap();
    for text in [
        r#"id="ladder""#,
        r#"class="current" data-step="1""#,
        r#"data-phase="canary""#,
        r#"id="chart-rps""#,
        r#"id="audit""#,
        "/ui/assets/uplot-1.6.32.js",
    ] {
        assert!(html.contains(text), "{text} missing from {html}");
    }
    assert!(
        !html.contains("data-action="),
        "a viewer gets no buttons: {html}"
    );
    let viewer_csrf = csrf_of(&html);
    // A viewer's POST is refused even with its own valid token.
    let r = post_action(&base, &format!("{path}/abort"), &viewer, Some(&viewer_csrf)).await;
    assert_eq!(r.status(), 403);

    let operator = session_cookie(&login(&base, OPERATOR).await);
    let html = page(&base, &path, Some(&operator))
        .await
        .text()
        .await
        .unwrap();
    for action in ["pause", "promote", "abort"] {
        assert!(
            html.contains(&format!(r#"data-action="{action}""#)),
            "{action} missing: {html}"
        );
    }
    assert!(html.contains("data-confirm="), "actions ask first");
    let csrf = csrf_of(&html);
    assert_ne!(csrf, viewer_csrf, "a token per session");

    // Forged: no token, another session's token, no session at all.
    for (cookie, token) in [
        (operator.as_str(), None),
        (operator.as_str(), Some(viewer_csrf.as_str())),
        ("understudy_session=forged", Some(csrf.as_str())),
    ] {
        let r = post_action(&base, &format!("{path}/pause"), cookie, token).await;
        assert_eq!(r.status(), 403, "{cookie} {token:?}");
    }
    assert_eq!(
        rollout_json(&base, &shop).await["paused"],
        false,
        "nothing changed"
    );

    // The operator's own form: the rollout pauses, the audit names them.
    let r = post_action(&base, &format!("{path}/pause"), &operator, Some(&csrf)).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], path.as_str());
    let view = rollout_json(&base, &shop).await;
    assert_eq!(view["paused"], true);
    let actors: Vec<_> = view["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["actor"].as_str().unwrap().to_owned())
        .collect();
    assert!(actors.contains(&"ops".to_owned()), "{actors:?}");
    // The header's token works too (scripts), and a refused action shows why.
    let r = browser()
        .post(format!("{base}{path}/pause"))
        .header(reqwest::header::COOKIE, &operator)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "already paused");
    assert!(r.text().await.unwrap().contains("refusal"));
}

/// Reads server-sent events from `r` until one satisfies `done`, or the
/// deadline passes.
async fn next_update(
    r: &mut reqwest::Response,
    buffer: &mut String,
    deadline: tokio::time::Instant,
) -> Option<serde_json::Value> {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: update") {
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                return serde_json::from_str(&data).ok();
            }
            continue;
        }
        let chunk = tokio::time::timeout_at(deadline, r.chunk())
            .await
            .ok()?
            .ok()??;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn an_open_page_hears_a_change_within_the_budget() {
    let base = start().await;
    let shop = create(&base, spec("shop")).await;
    let cookie = session_cookie(&login(&base, VIEWER).await);
    let mut stream = page(&base, &format!("/ui/rollouts/{shop}/events"), Some(&cookie)).await;
    assert_eq!(stream.status(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buffer = String::new();
    let soon = || tokio::time::Instant::now() + common::TIMEOUT;
    let first = next_update(&mut stream, &mut buffer, soon())
        .await
        .expect("a first update");
    assert!(
        first["status"]
            .as_str()
            .unwrap()
            .contains(r#"data-paused="false""#)
    );
    assert!(first["series"]["t"].is_array());
    assert!(first["ladder"].as_str().unwrap().contains("current"));

    let changed = std::time::Instant::now();
    let r = common::http()
        .post(format!("{base}/v1/rollouts/{shop}/pause"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let budget = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    loop {
        let u = next_update(&mut stream, &mut buffer, budget)
            .await
            .expect("the pause reached the page within 1.5 s");
        if u["status"]
            .as_str()
            .unwrap()
            .contains(r#"data-paused="true""#)
        {
            assert!(changed.elapsed() < std::time::Duration::from_millis(1500));
            assert!(
                u["actions"].as_str().unwrap().is_empty(),
                "a viewer's stream has no buttons"
            );
            break;
        }
    }
}

#[tokio::test]
async fn the_fleet_page_and_assets_are_served_compressed() {
    let base = start().await;
    let cookie = session_cookie(&login(&base, VIEWER).await);
    let r = page(&base, "/ui/fleet", Some(&cookie)).await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(
        html.contains(r#"id="envoys""#) && html.contains(r#"id="tenants""#),
        "{html}"
    );

    // uPlot, gzip-compressed when asked (the first-load budget).
    let r = browser()
        .get(format!("{base}/ui/assets/uplot-1.6.32.js"))
        .header(reqwest::header::ACCEPT_ENCODING, "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap().len();
    assert!(gz < 30_000, "uPlot gzipped is {gz} bytes");
    assert_eq!(page(&base, "/ui/assets/nope.js", None).await.status(), 404);
}
