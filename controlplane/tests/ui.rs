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
