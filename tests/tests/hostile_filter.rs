//! Hostile traffic against the filter, end to end (issue 10, filter side):
//! real Envoy, the real filter .wasm and the real control plane.
//!
//! Each test sends what an attacker (or messy real traffic) sends, shows the
//! attack fails, and then shows legitimate traffic still gets every feature.
//! Requests that must reach Envoy byte for byte (Latin-1 header values, odd
//! path spellings) go over a raw TCP socket: an HTTP client library would
//! refuse or normalize them first.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use understudy_e2e::stack::Stack;
use understudy_e2e::upstream::{Behavior, RawHeader};
use understudy_e2e::wait;

/// `{"alg":"none"}` . `{"sub":"attacker"}` . signature (unverified by the filter).
const JWT_ATTACKER: &str = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhdHRhY2tlciJ9.sig";
/// `{"alg":"none"}` . `{"sub":"vip"}` . signature.
const JWT_VIP: &str = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ2aXAifQ.sig";

/// An answer read off a raw socket.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Sends one HTTP/1.1 request exactly as given (`target` and header bytes
/// untouched) and reads the answer's status and headers.
async fn raw(
    stack: &Stack,
    method: &str,
    target: &[u8],
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<RawAnswer> {
    let addr = stack
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    let mut sock = TcpStream::connect(&addr).await?;
    sock.write_all(&req).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .context("Envoy did not answer within 10 s")??;
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no header end in {:?}", String::from_utf8_lossy(&out)))?;
    let mut lines = out[..end].split(|b| *b == b'\n');
    let status_line = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let colon = l.iter().position(|b| *b == b':')?;
            let name = String::from_utf8_lossy(&l[..colon]).to_ascii_lowercase();
            let value = l[colon + 1..].trim_ascii().to_vec();
            Some((name, value))
        })
        .collect();
    Ok(RawAnswer { status, headers })
}

async fn stat(stack: &Stack, name: &str) -> Result<u64> {
    Ok(stack
        .envoy
        .stat(&format!("wasmcustom.understudy.{name}"))
        .await?
        .unwrap_or(0))
}

async fn stat_reaches(stack: &Stack, name: &str, at_least: u64) -> Result<u64> {
    wait::until(
        &format!("{name} to reach {at_least}"),
        Duration::from_secs(15),
        || async {
            let v = stat(stack, name).await?;
            Ok((v >= at_least).then_some(v))
        },
    )
    .await
}

/// The filter never panicked: the panic hook logs `understudy: panic`, and a
/// failed VM shows up as Envoy's wasm failure messages.
fn no_panic_logged(stack: &Stack) -> Result<()> {
    let log = stack.envoy.log();
    for needle in [
        "understudy: panic",
        "Plugin configured to fail",
        "wasm_fail",
    ] {
        ensure!(
            !log.contains(needle),
            "Envoy's log shows a filter failure ({needle:?}):\n{}",
            log.lines()
                .filter(|l| l.contains(needle) || l.contains("panic"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// Latin-1 and arbitrary bytes in request and response headers and bodies go
/// through rate limiting, dedupe, shadowing and hedging; no request fails
/// because of the filter, and every feature still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_never_switch_the_filter_off() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(json!({
            "routes": [
                {"name": "orders", "path_prefix": "/orders", "dedupe": {"ttl_s": 60, "max_entries": 1000}},
                {"name": "shadowed", "path_prefix": "/shadowed", "shadow": {"cluster": "demo-canary"}},
                {"name": "hedged", "path_prefix": "/hedged", "hedge": {
                    "cluster": "demo-stable",
                    "delay": {"fixed": {"ms": 20}},
                    "budget": {"percent": 100, "per_second_floor": 100}
                }},
                {"name": "all", "path_prefix": "/"}
            ],
            "rate_limit": {
                "identity": {"header": "x-tenant-id"},
                "tiers": {
                    "anonymous": {"initial": 1000, "min": 1, "max": 1000},
                    "standard": {"initial": 1000, "min": 1, "max": 1000}
                },
                "tenants": {"slow": {"rate": 1}}
            }
        }))
        .await?;
    // Both versions answer with a Latin-1 header value and a body that is
    // not UTF-8; the stable one slowly enough for hedges to go out.
    let hostile = Behavior {
        raw_headers: vec![RawHeader {
            name: "x-latin1".into(),
            value: b"caf\xe9 \xff\x80".to_vec(),
        }],
        raw_body: Some(vec![0xff, 0x00, 0xe9, 0xfe, b'{', 0x80]),
        ..Default::default()
    };
    stack.stable.state.set_behavior(Behavior {
        default_ms: 40,
        ..hostile.clone()
    })?;
    stack.canary.state.set_behavior(hostile)?;
    let before = stat(&stack, "requests_total").await?;

    let junk_headers: Vec<(&str, &[u8])> = vec![
        ("x-tenant-id", b"caf\xe9"),
        ("user-agent", b"\xe9\xff\x80 agent"),
        ("x-junk", b"\x80\x81\xfe\xff"),
        ("accept", b"text/\xe9"),
        ("authorization", b"Bearer \xff\xfe.\xe9"),
        ("x-understudy-shadow", b"1"),
        ("x-understudy-hedge", b"\xe9"),
    ];
    let body: Vec<u8> = (0..=255u8).collect();
    let mut sent = 0;
    for path in ["/orders/1", "/shadowed/1", "/hedged/1", "/other"] {
        for method in ["GET", "POST"] {
            let mut headers = junk_headers.clone();
            // A valid key (so dedupe tracks, stores and replays the hostile
            // answer) and an invalid Latin-1 one (answered 400 by the filter).
            for key in [&b"hostile-key-1"[..], &b"k\xe9y"[..]] {
                headers.retain(|(k, _)| *k != "idempotency-key");
                headers.push(("idempotency-key", key));
                let a = raw(&stack, method, path.as_bytes(), &headers, &body).await?;
                sent += 1;
                ensure!(
                    a.status != 503 && a.status != 500,
                    "{method} {path} with hostile bytes got {}: the filter failed",
                    a.status
                );
            }
        }
    }
    no_panic_logged(&stack)?;
    // Hostile bytes came back to the client unchanged where nothing stored them.
    let a = raw(&stack, "GET", b"/other", &[], b"").await?;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-latin1"), Some(&b"caf\xe9 \xff\x80"[..]));
    stat_reaches(&stack, "requests_total", before + sent + 1).await?;

    // Forged internal headers never reached an upstream, and were counted.
    assert!(stat(&stack, "internal_headers_stripped").await? >= 2 * sent);
    for seen in stack.stable.state.seen() {
        assert!(
            !seen.headers.contains_key("x-understudy-shadow"),
            "a client's x-understudy-shadow reached the primary: {seen:?}"
        );
    }

    // The features still work on the following requests.
    // Rate limit: tenant `slow` (1 request/s) gets a 429 in a quick burst.
    let mut limited = 0;
    for _ in 0..10 {
        let a = raw(&stack, "GET", b"/other", &[("x-tenant-id", b"slow")], b"").await?;
        if a.status == 429 {
            limited += 1;
        }
    }
    assert!(
        limited >= 5,
        "only {limited} of 10 burst requests were limited"
    );
    // Dedupe: a retry with the same key is replayed, not run again.
    let key: &[(&str, &[u8])] = &[("idempotency-key", b"legit-after-hostile")];
    let first = raw(&stack, "POST", b"/orders/2", key, b"{\"n\":1}").await?;
    assert_eq!(first.status, 200);
    let runs = stack.stable.state.requests();
    let again = raw(&stack, "POST", b"/orders/2", key, b"{\"n\":1}").await?;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some(&b"true"[..]));
    assert_eq!(stack.stable.state.requests(), runs, "the retry ran again");
    // Shadowing: another pair is still compared.
    let compared = stat(&stack, "shadow.shadowed.compared").await?;
    let a = raw(&stack, "GET", b"/shadowed/2", &[], b"").await?;
    assert_eq!(a.status, 200);
    stat_reaches(&stack, "shadow.shadowed.compared", compared + 1).await?;
    // Hedging: a slow primary (40 ms, hedge delay 20 ms) still gets a hedge.
    let hedges = stat(&stack, "hedge.hedged.sent").await?;
    let a = raw(&stack, "GET", b"/hedged/2", &[], b"").await?;
    assert_eq!(a.status, 200);
    stat_reaches(&stack, "hedge.hedged.sent", hedges + 1).await?;
    no_panic_logged(&stack)?;
    Ok(())
}

/// Route features match the normalized path: no spelling of `/admin`
/// escapes its route limit, escaped slashes are refused, and ordinary paths
/// still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_spellings_cannot_bypass_a_route_limit() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(json!({
            "routes": [
                {"name": "admin", "path_prefix": "/admin"},
                {"name": "all", "path_prefix": "/"}
            ],
            "rate_limit": {
                "identity": {"header": "x-tenant-id"},
                "tiers": {"anonymous": {"initial": 1000, "min": 1, "max": 1000}},
                "default_tier": "anonymous",
                // One token, refilled once every 100 s.
                "route_limits": [{"route": "admin", "rate": 0.01, "burst_s": 100}]
            }
        }))
        .await?;
    assert_eq!(raw(&stack, "GET", b"/admin", &[], b"").await?.status, 200);
    assert_eq!(raw(&stack, "GET", b"/admin", &[], b"").await?.status, 429);
    for spelling in [
        &b"//admin"[..],
        b"/./admin",
        b"/%2e/admin",
        b"/%2E/admin",
        b"/a/../admin",
        b"/x/%2e%2e/admin",
        b"///admin/",
        b"/admin/./",
    ] {
        let a = raw(&stack, "GET", spelling, &[], b"").await?;
        assert_eq!(
            a.status,
            429,
            "{} escaped the route limit",
            String::from_utf8_lossy(spelling)
        );
    }
    // Escaped slashes are refused outright, never read two ways.
    for spelling in [&b"/%2Fadmin"[..], b"/x%2F..%2Fadmin", b"/%5Cadmin"] {
        let a = raw(&stack, "GET", spelling, &[], b"").await?;
        assert_eq!(
            a.status,
            400,
            "{} was not refused",
            String::from_utf8_lossy(spelling)
        );
    }
    // Ordinary paths (and messy spellings of them) still work, normalized.
    let before = stack.stable.state.requests();
    for path in [&b"/orders/1"[..], b"//orders//2", b"/a/../orders/3"] {
        assert_eq!(raw(&stack, "GET", path, &[], b"").await?.status, 200);
    }
    assert_eq!(stack.stable.state.requests(), before + 3);
    let paths: Vec<String> = stack
        .stable
        .state
        .seen()
        .into_iter()
        .map(|s| s.path)
        .collect();
    for want in ["/orders/1", "/orders/2", "/orders/3"] {
        assert!(paths.iter().any(|p| p == want), "{want} not in {paths:?}");
    }
    Ok(())
}

/// With `identity: {"jwt_claim": "sub"}` the tenant header means nothing: a
/// client cannot borrow another tenant's limit by naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_header_cannot_override_a_jwt_identity() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(json!({
            "routes": [{"name": "all", "path_prefix": "/"}],
            "rate_limit": {
                "identity": {"jwt_claim": "sub"},
                "tiers": {
                    "anonymous": {"initial": 1, "min": 1, "max": 1},
                    "standard": {"initial": 1000, "min": 1, "max": 1000}
                },
                "tenants": {"attacker": {"rate": 1}, "vip": {"rate": 1000}}
            }
        }))
        .await?;
    let send = |jwt: Option<&'static str>, tenant: Option<&'static str>| {
        let http = stack.http.clone();
        let url = format!("{}items", stack.url);
        async move {
            let mut req = http.get(url);
            if let Some(jwt) = jwt {
                req = req.header("authorization", format!("Bearer {jwt}"));
            }
            if let Some(t) = tenant {
                req = req.header("x-tenant-id", t);
            }
            Ok::<u16, anyhow::Error>(req.send().await?.status().as_u16())
        }
    };
    // The attack: the attacker's JWT plus `x-tenant-id: vip`.
    let mut limited = 0;
    for _ in 0..6 {
        if send(Some(JWT_ATTACKER), Some("vip")).await? == 429 {
            limited += 1;
        }
    }
    assert!(
        limited >= 4,
        "the attacker borrowed vip's limit: {limited}/6 limited"
    );
    // No JWT but the header: anonymous (1 request/s), not vip.
    let mut anonymous_limited = 0;
    for _ in 0..6 {
        if send(None, Some("vip")).await? == 429 {
            anonymous_limited += 1;
        }
    }
    assert!(anonymous_limited >= 4, "{anonymous_limited}/6 limited");
    // The real vip is not limited.
    for _ in 0..6 {
        assert_eq!(send(Some(JWT_VIP), None).await?, 200);
    }
    Ok(())
}

/// A stored answer belongs to its caller: another caller's request with the
/// same Idempotency-Key runs fresh, and no replay hands out `set-cookie`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_answers_are_scoped_per_caller() -> Result<()> {
    let stack = Stack::start().await?;
    stack
        .put_filter_config(json!({"routes": [
            {"name": "all", "path_prefix": "/", "dedupe": {"ttl_s": 60, "max_entries": 1000}}
        ]}))
        .await?;
    stack.stable.state.set_behavior(Behavior {
        raw_headers: vec![RawHeader {
            name: "set-cookie".into(),
            value: b"session=alice-secret; HttpOnly".to_vec(),
        }],
        body: Some(json!({"order": 17})),
        ..Default::default()
    })?;
    let post = |who: &'static str| {
        let http = stack.http.clone();
        let url = format!("{}orders", stack.url);
        async move {
            let r = http
                .post(url)
                .header("authorization", format!("Bearer {who}"))
                .header("idempotency-key", "shared-key-1")
                .body("{\"item\":1}")
                .send()
                .await?;
            let replayed = r.headers().contains_key("idempotent-replayed");
            let cookie = r.headers().contains_key("set-cookie");
            Ok::<_, anyhow::Error>((r.status().as_u16(), replayed, cookie))
        }
    };
    let runs = stack.stable.state.requests();
    assert_eq!(post("alice").await?, (200, false, true));
    // Alice's retry is a replay, without her cookie.
    assert_eq!(post("alice").await?, (200, true, false));
    assert_eq!(stack.stable.state.requests(), runs + 1);
    // Mallory guesses the key: her request runs fresh (no replay of alice's answer).
    let (status, replayed, _) = post("mallory").await?;
    assert_eq!((status, replayed), (200, false));
    assert_eq!(stack.stable.state.requests(), runs + 2);
    // And her own retry is replayed to her.
    assert_eq!(post("mallory").await?, (200, true, false));
    assert_eq!(stack.stable.state.requests(), runs + 2);
    Ok(())
}

/// Mismatch records whose batch would be over the control plane's 4 MiB
/// gRPC limit are split by the filter and all arrive: counts, paths and
/// records. (Before, the whole batch was refused and silently lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_report_batches_are_split_and_arrive() -> Result<()> {
    let stack = Stack::start().await?;
    // ~300 KB answers that differ in one field: each record carries the
    // primary's body, so 20 records are ~6 MB in one interval.
    let blob = "x".repeat(300 * 1024);
    stack.stable.state.set_behavior(Behavior {
        body: Some(json!({"blob": blob, "v": 1})),
        ..Default::default()
    })?;
    stack.canary.state.set_behavior(Behavior {
        body: Some(json!({"blob": blob, "v": 2})),
        ..Default::default()
    })?;
    stack
        .put_filter_config(
            json!({"routes": [{"name": "big", "path_prefix": "/", "shadow": {
                "cluster": "demo-canary",
                "max_body_bytes": 1048576,
                "record_body_bytes": 1048576
            }}]}),
        )
        .await?;
    let n = 20;
    for i in 0..n {
        let r = stack
            .http
            .get(format!("{}big/{i}", stack.url))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await?;
    }
    stat_reaches(&stack, "shadow.big.compared", n).await?;
    let r = wait::until(
        "the control plane to hold every big record",
        Duration::from_secs(30),
        || async {
            let r = stack.api_get("/v1/shadow/routes/big").await?;
            let serious = r["top_paths"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["path"] == "$.v"))
                .and_then(|p| p["serious"].as_u64())
                .unwrap_or(0);
            Ok((r["compared"].as_u64().unwrap_or(0) >= n && serious >= n).then_some(r))
        },
    )
    .await?;
    assert_eq!(r["mismatched_serious"], n, "{r:#}");
    // More than one batch went, and none failed.
    assert!(stat(&stack, "shadow.reports_sent").await? >= 2);
    assert_eq!(stat(&stack, "shadow.reports_failed").await?, 0);
    assert_eq!(stat(&stack, "shadow.records_dropped").await?, 0);
    Ok(())
}
