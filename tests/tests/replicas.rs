//! Replicas on one real PostgreSQL (`serve --database`): three `understudy
//! serve` processes, two real Envoys each on its own replica, a rollout
//! under client load.
//!
//! Each Envoy's `understudy_xds` cluster lists its own replica at priority
//! 0 and another at priority 1, with a TCP health check: what a platform
//! team gives Envoys (a nearest replica, a fallback), and what makes an
//! Envoy whose replica died reconnect to a live one. ADS, the stats stream
//! and the filter's reports all ride that cluster, so each Envoy's evidence
//! reaches whichever replica holds it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use understudy_e2e::cp_process::ControlPlaneProcess;
use understudy_e2e::database::Postgres;
use understudy_e2e::envoy::{self, Envoy};
use understudy_e2e::stack::{self, SERVICE, desired_state, free_port};
use understudy_e2e::traffic::{self, Load};
use understudy_e2e::upstream::{Behavior, UpstreamHandle};
use understudy_e2e::wait;

const NODES: [&str; 2] = ["envoy-a", "envoy-b"];

/// The two tests with three replicas and two Envoys each run one at a
/// time: together they are 6 debug control planes, 4 Envoys and 2 loads on
/// two cores, and the takeover time they measure would be the machine's.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// The replicas' lease (the default).
const LEASE: Duration = Duration::from_secs(4);

struct World {
    pg: Postgres,
    cps: Vec<ControlPlaneProcess>,
    envoys: Vec<Envoy>,
    url: String,
    /// The replica no Envoy is connected to (both fall back to it).
    spare: usize,
    stable: UpstreamHandle,
    _canary: UpstreamHandle,
}

fn replica_args(url: &str, name: &str) -> Vec<String> {
    ["--database", url, "--replica-name", name]
        .map(str::to_owned)
        .to_vec()
}

/// An Envoy of `node` whose control plane is the replica on `primary`,
/// falling back to the one on `fallback` when `primary` stops answering.
async fn envoy_on(
    primary: u16,
    fallback: u16,
    certs: &understudy_controlplane::tls::CertDir,
    node: &str,
) -> Result<Envoy> {
    let endpoints = format!(
        "      endpoints:
      - priority: 0
        lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {primary} }}
      - priority: 1
        lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {fallback} }}
    health_checks:
    - timeout: 0.5s
      interval: 0.5s
      # A long ADS stream counts as no traffic to the health checker,
      # whose default then is one check a minute.
      no_traffic_interval: 0.5s
      unhealthy_threshold: 1
      healthy_threshold: 1
      tcp_health_check: {{}}
"
    );
    let mut replacements = vec![
        ("port_value: 9901", "port_value: 0".to_owned()),
        (
            "      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 18000 }
",
            endpoints,
        ),
        ("id: envoy-1", format!("id: {node}")),
    ];
    replacements.extend(envoy::bootstrap_cert_replacements(certs, node));
    let config = envoy::render("bootstrap.yaml", &replacements)?;
    let envoy = Envoy::start(&config, &[]).await?;
    envoy.wait_ready().await?;
    Ok(envoy)
}

/// PostgreSQL, three replicas (r0, r1, r2) and two Envoys: envoy-a on the
/// leader, envoy-b on a follower, both falling back to the third replica.
async fn world() -> Result<(World, usize)> {
    let pg = Postgres::start().await?;
    let stable = UpstreamHandle::start("v1", Behavior::default()).await?;
    let canary = UpstreamHandle::start("v2", Behavior::default()).await?;
    let port = free_port()?;
    let state = desired_state(port, stable.addr, canary.addr)?;
    let first =
        ControlPlaneProcess::start_with(&state, &NODES, &replica_args(&pg.url(), "r0"), None)
            .await?;
    let mut cps = vec![first];
    for name in ["r1", "r2"] {
        let certs = cps[0].certs.clone();
        cps.push(
            ControlPlaneProcess::start_with(
                &state,
                &NODES,
                &replica_args(&pg.url(), name),
                Some(&certs),
            )
            .await?,
        );
    }
    let leader = wait_leader(&cps, &[], LEASE * 3).await?;
    let follower = (0..3).find(|i| *i != leader).context("no follower")?;
    let spare = (0..3)
        .find(|i| *i != leader && *i != follower)
        .context("no third replica")?;
    let certs = cps[0].certs.clone();
    let a = envoy_on(
        cps[leader].xds.port(),
        cps[spare].xds.port(),
        &certs,
        NODES[0],
    )
    .await?;
    let b = envoy_on(
        cps[follower].xds.port(),
        cps[spare].xds.port(),
        &certs,
        NODES[1],
    )
    .await?;
    let url = format!("http://127.0.0.1:{port}/");
    stack::wait_listener(&traffic::client(), &url).await?;
    // Fleet-wide limits are divided among both Envoys on every replica,
    // though each replica serves one (or none).
    for cp in &cps {
        wait::until(
            "every replica to count both Envoys",
            Duration::from_secs(15),
            || async {
                let r = cp.get("/v1/ratelimit/tenants").await?;
                Ok((r["sharing_limits"] == 2).then_some(()))
            },
        )
        .await?;
    }
    Ok((
        World {
            pg,
            cps,
            envoys: vec![a, b],
            url,
            spare,
            stable,
            _canary: canary,
        },
        leader,
    ))
}

/// Rows of `sql` (text columns) from the test's own connection, off the
/// async runtime (the synchronous client runs a runtime of its own).
async fn db_rows(pg: &Postgres, sql: &str) -> Result<Vec<Vec<String>>> {
    let (url, sql) = (pg.url(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
        let mut out = Vec::new();
        for m in c.simple_query(&sql)? {
            if let postgres::SimpleQueryMessage::Row(r) = m {
                out.push(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or_default().to_owned())
                        .collect(),
                );
            }
        }
        anyhow::Ok(out)
    })
    .await?
}

/// `/readyz` of replica `i`: (leads, state version), or `None` if it does not answer.
async fn replica_status(cp: &ControlPlaneProcess) -> Option<(bool, i64)> {
    let r = cp.get("/readyz").await.ok()?;
    Some((
        r["replica"]["leads"].as_bool()?,
        r["replica"]["state_version"].as_i64()?,
    ))
}

/// The one replica (not among `dead`) that leads, once exactly one does.
async fn wait_leader(
    cps: &[ControlPlaneProcess],
    dead: &[usize],
    deadline: Duration,
) -> Result<usize> {
    wait::until("exactly one replica to lead", deadline, || async {
        let mut leaders = Vec::new();
        for (i, cp) in cps.iter().enumerate() {
            if dead.contains(&i) {
                continue;
            }
            if let Some((true, _)) = replica_status(cp).await {
                leaders.push(i);
            }
        }
        Ok(match leaders.as_slice() {
            [one] => Some(*one),
            [] => None,
            many => bail!("several replicas lead at once: {many:?}"),
        })
    })
    .await
}

/// Waits until the rollout at `path` ends (neither canary nor shadow); its view.
async fn wait_end(cp: &ControlPlaneProcess, path: &str, deadline: Duration) -> Result<Value> {
    wait::until("the rollout to end", deadline, || async {
        let r = cp.get(path).await?;
        Ok(r["phase"]["state"]
            .as_str()
            .is_some_and(|s| s != "canary" && s != "shadow")
            .then_some(r))
    })
    .await
}

/// Waits until every Envoy applies `want` (stable, canary).
async fn wait_weights(envoys: &[Envoy], want: (u64, u64)) -> Result<()> {
    for e in envoys {
        wait::until(
            &format!("every Envoy at {want:?}"),
            Duration::from_secs(20),
            || async { Ok((weights(e).await? == want).then_some(())) },
        )
        .await?;
    }
    Ok(())
}

/// Envoy's applied weights for the service, `(stable, canary)`.
async fn weights(envoy: &Envoy) -> Result<(u64, u64)> {
    envoy.service_weights(SERVICE).await
}

fn spec(steps: Value) -> Value {
    json!({
        "service": SERVICE,
        "owner": "e2e",
        "stop_rules": {"max_error_rate_increase_pp": 2.0},
        "steps": steps,
        "analysis": {"interval_s": 0.5, "max_staleness_s": 10, "min_requests_per_side": 10}
    })
}

/// The audit's transitions as (from, to) labels.
fn transitions(view: &Value) -> Vec<(String, String)> {
    view["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["from"] != e["to"])
        .map(|e| {
            (
                e["from"].as_str().unwrap_or_default().to_owned(),
                e["to"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A rollout runs on three replicas; the leader is SIGKILLed mid-step.
/// Another replica leads within the lease, the rollout goes on from the
/// same step with the same step start, no step is skipped or repeated in
/// the audit, both Envoys end on the final weights, and no client request
/// fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_the_rollout_goes_on() -> Result<()> {
    let _one_at_a_time = HEAVY.lock().await;
    let (mut w, leader) = world().await?;
    let load = Load::start(&w.url, 4);
    // A follower refuses a verb and names the leader.
    let follower = (0..3).find(|i| *i != leader).context("no follower")?;
    let (status, refused) = w.cps[follower]
        .post("/v1/rollouts", &spec(json!([{"weight": 100}])))
        .await?;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["code"], "not_leader", "{refused}");
    let named = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(named.contains(&format!("r{leader}")), "{named}");

    let (status, created) = w.cps[leader]
        .post(
            "/v1/rollouts",
            &spec(json!([
                {"weight": 10, "min_duration_s": 2},
                {"weight": 50, "min_duration_s": 20},
                {"weight": 100, "min_duration_s": 2}
            ])),
        )
        .await?;
    ensure!(status == 201, "creating the rollout: {status} {created}");
    let id = created["id"].as_str().context("no id")?.to_owned();
    let path = format!("/v1/rollouts/{id}");
    // Step 2 (index 1), on both Envoys; every replica shows the same.
    let before = wait::until(
        "the rollout's second step",
        Duration::from_secs(60),
        || async {
            let r = w.cps[leader].get(&path).await?;
            Ok((r["phase"]["step"] == 1).then_some(r))
        },
    )
    .await?;
    wait_weights(&w.envoys, (50, 50)).await?;
    // The evidence of both Envoys counts: the fleet's windows include
    // envoy-b, whose stats reach a follower only.
    let judged = w.cps[leader].get(&path).await?;
    for cp in &w.cps {
        let seen = wait::until(
            "every replica to show the step",
            Duration::from_secs(10),
            || async {
                let r = cp.get(&path).await?;
                Ok((r["phase"] == before["phase"]).then_some(r))
            },
        )
        .await?;
        assert_eq!(seen["phase_started_ms"], before["phase_started_ms"]);
    }
    drop(judged);

    // SIGKILL the leader mid-step.
    w.cps[leader].sigkill()?;
    let killed = Instant::now();
    let next = wait_leader(&w.cps, &[leader], LEASE * 3).await?;
    let took = killed.elapsed();
    eprintln!("replica r{next} leads {took:?} after the SIGKILL of r{leader}");
    // The lease (4 s) plus one try (0.5 s), plus this test's polling.
    assert!(
        took <= LEASE + Duration::from_millis(1_500),
        "a new leader after {took:?}"
    );
    let resumed = w.cps[next].get(&path).await?;
    assert_eq!(resumed["phase"], before["phase"], "{resumed:#}");
    assert_eq!(resumed["phase_started_ms"], before["phase_started_ms"]);

    let done = wait_end(&w.cps[next], &path, Duration::from_secs(90)).await?;
    assert_eq!(done["phase"]["state"], "succeeded", "{:#}", done["audit"]);
    // Each step entered once, in order, whoever led.
    let steps: Vec<String> = transitions(&done).into_iter().map(|(_, to)| to).collect();
    let expected = [
        "canary step 1",
        "canary step 2",
        "canary step 3",
        "succeeded",
    ];
    let entered: Vec<&str> = steps
        .iter()
        .map(String::as_str)
        .filter(|s| s.starts_with("canary") || *s == "succeeded")
        .collect();
    assert_eq!(entered, expected, "{:#}", done["audit"]);
    // Both Envoys end on the final weights (the canary promoted, all on stable).
    wait_weights(&w.envoys, (100, 0)).await?;
    let tally = load.stop().await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    assert!(tally.total > 200, "{tally:?}");

    // Evidence: each Envoy's flushes were shipped by the replica holding
    // it (envoy-a by the killed leader, then by its fallback), and every
    // request envoy-b's canary served is in the database exactly once.
    let shipped = db_rows(
        &w.pg,
        "SELECT replica, node FROM stat_samples GROUP BY replica, node ORDER BY replica, node",
    )
    .await?;
    let spare = (0..3)
        .find(|i| *i != leader && *i != follower)
        .context("no spare")?;
    for want in [
        [format!("r{leader}"), NODES[0].to_owned()],
        [format!("r{spare}"), NODES[0].to_owned()],
        [format!("r{follower}"), NODES[1].to_owned()],
    ] {
        assert!(
            shipped.iter().any(|r| r[..] == want[..]),
            "{want:?} not in {shipped:?}"
        );
    }
    let b = &w.envoys[1];
    let canary = format!("cluster.{SERVICE}-canary.upstream_rq_completed");
    wait::until(
        "envoy-b's canary requests in the database, each once",
        Duration::from_secs(15),
        || async {
            let served = b.stat(&canary).await?.unwrap_or(0);
            let rows = db_rows(
                &w.pg,
                &format!(
                    "SELECT coalesce(sum(requests), 0) FROM stat_samples \
                     WHERE node = '{}' AND cluster = '{SERVICE}-canary'",
                    NODES[1]
                ),
            )
            .await?;
            let stored: u64 = rows[0][0].parse()?;
            ensure!(
                stored <= served,
                "{stored} stored > {served} served: counted twice"
            );
            Ok((stored == served && served > 0).then_some(()))
        },
    )
    .await?;
    drop(w.pg);
    Ok(())
}

/// PostgreSQL is stopped for 10 s mid-rollout. Meanwhile the Envoys keep
/// their last config and serve, no replica leads once its lease has run
/// out (none writes), a change is refused, and the rollout holds. Then it
/// resumes under a new term, and nothing accepted before the stop is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_holds_the_rollout_and_loses_nothing() -> Result<()> {
    let _one_at_a_time = HEAVY.lock().await;
    let (mut w, leader) = world().await?;
    let load = Load::start(&w.url, 4);
    let follower = (0..3).find(|i| *i != leader).context("no follower")?;
    // An operator's change, accepted by a follower before the outage.
    let mut extra = w.cps[follower]
        .get(&format!("/v1/services/{SERVICE}"))
        .await?;
    extra["name"] = json!("extra");
    extra["domains"] = json!(["extra.example"]);
    let r = w.cps[follower]
        .http
        .put(w.cps[follower].api_url("/v1/services/extra"))
        .json(&extra)
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "PUT extra: {} {}",
        r.status(),
        r.text().await?
    );

    let (status, created) = w.cps[leader]
        .post(
            "/v1/rollouts",
            &spec(json!([
                {"weight": 20, "min_duration_s": 8},
                {"weight": 100, "min_duration_s": 1}
            ])),
        )
        .await?;
    ensure!(status == 201, "creating the rollout: {status} {created}");
    let id = created["id"].as_str().context("no id")?.to_owned();
    let path = format!("/v1/rollouts/{id}");
    wait_weights(&w.envoys, (80, 20)).await?;
    let before = w.cps[leader].get(&path).await?;
    let term_before: i64 = db_rows(&w.pg, "SELECT term FROM lease").await?[0][0].parse()?;

    w.pg.stop()?;
    let stopped_ms = now_ms();
    let stopped = Instant::now();
    // Ten seconds without the database, checked all along.
    let served = load.snapshot().total;
    let mut refused = false;
    wait::until("ten seconds of outage", Duration::from_secs(30), || async {
        for e in &w.envoys {
            ensure!(weights(e).await? == (80, 20), "an Envoy's weights changed");
        }
        for cp in &w.cps {
            let r = cp.get(&path).await?;
            ensure!(
                r["phase"] == before["phase"],
                "the rollout moved: {:#}",
                r["phase"]
            );
        }
        Ok((stopped.elapsed() >= Duration::from_secs(10)).then_some(()))
    })
    .await?;
    // By now every lease has run out: no replica leads, and a change is refused.
    for cp in &w.cps {
        let r = cp.get("/readyz").await?;
        assert_eq!(r["replica"]["leads"], false, "{r}");
        let mut other = extra.clone();
        other["name"] = json!("during-outage");
        other["domains"] = json!(["during.example"]);
        let answer = cp
            .http
            .put(cp.api_url("/v1/services/during-outage"))
            .json(&other)
            .send()
            .await?;
        refused |= answer.status().is_server_error();
        assert!(
            !answer.status().is_success(),
            "a write without the database: {}",
            answer.status()
        );
    }
    assert!(refused);
    assert!(
        load.snapshot().total > served + 100,
        "Envoy stopped serving"
    );

    w.pg.restart().await?;
    let restarted_ms = now_ms();
    let next = wait_leader(&w.cps, &[], LEASE * 3).await?;
    let term_after: i64 = db_rows(&w.pg, "SELECT term FROM lease").await?[0][0].parse()?;
    assert!(
        term_after > term_before,
        "terms {term_before} → {term_after}"
    );
    let done = wait_end(&w.cps[next], &path, Duration::from_secs(60)).await?;
    assert_eq!(done["phase"]["state"], "succeeded", "{:#}", done["audit"]);
    // Nothing accepted before the stop is lost: the audit then is a prefix
    // of the audit now, and the follower's service is on every replica.
    let then = before["audit"].as_array().context("no audit")?;
    let now = done["audit"].as_array().context("no audit")?;
    assert_eq!(&now[..then.len()], &then[..]);
    // And nothing was written while the database was away.
    for e in now {
        let t = e["time_ms"].as_u64().unwrap_or(0);
        assert!(
            t < stopped_ms || t >= restarted_ms,
            "written during the outage: {e}"
        );
    }
    for cp in &w.cps {
        ensure!(
            cp.get("/v1/services/during-outage").await.is_err(),
            "a change refused during the outage was applied"
        );
        wait::until(
            "the service accepted before the outage",
            Duration::from_secs(10),
            || async { Ok(cp.get("/v1/services/extra").await.is_ok().then_some(())) },
        )
        .await?;
    }
    wait_weights(&w.envoys, (100, 0)).await?;
    let tally = load.stop().await;
    assert_eq!(tally.failures(), 0, "{tally:?}");
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The shared state without Envoy (the cheapest level that proves it):
/// two stores on one database never lose each other's changes, and a write
/// made under a lease term that has passed is refused by the database
/// itself (the fence triggers), for the desired state and for rollouts,
/// while the current term's writes go through.
#[test]
fn the_database_refuses_a_passed_term_and_keeps_every_change() -> Result<()> {
    use std::sync::Arc;
    use understudy_controlplane::pg::{Db, Fence, PgError, Term, lease};
    use understudy_controlplane::rollout::store::{RolloutStore, RolloutStoreError};
    use understudy_controlplane::store::{ChangeError, Store, StoreError};

    let rt = tokio::runtime::Runtime::new()?;
    let pg = rt.block_on(Postgres::start())?;
    let stable = "127.0.0.1:1".parse()?;
    let canary = "127.0.0.1:2".parse()?;
    let seed = tempfile::tempdir()?;
    let seed_file = seed.path().join("state.json");
    std::fs::write(
        &seed_file,
        serde_json::to_vec(&desired_state(free_port()?, stable, canary)?)?,
    )?;
    let open = |name: &str| -> Result<Store> {
        let db = Db::connect(&pg.url(), name)?;
        Ok(Store::open_shared(
            db,
            Some(&seed_file),
            Default::default(),
        )?)
    };
    let a = open("a")?;
    let b = open("b")?;
    // Two replicas' operators change different services: both stay.
    let mut one = a.service(SERVICE)?;
    one.name = "one".into();
    one.domains = vec!["one.example".into()];
    a.put_service(one.clone())?;
    let mut two = one.clone();
    two.name = "two".into();
    two.domains = vec!["two.example".into()];
    // `b` has not refreshed: its change still applies to the newest document.
    b.put_service(two)?;
    assert!(b.service("one").is_ok(), "b's change lost a's");
    assert!(a.refresh()?, "a did not see b's change");
    assert!(a.service("two").is_ok());
    assert_eq!(a.shared_version(), b.shared_version());

    // Leases: `a` leads under term 1, then its lease passes and `b` takes term 2.
    let setup = Db::connect(&pg.url(), "setup")?;
    let t1 = lease::acquire(&setup, "a", "", Duration::from_secs(60))?.context("no term")?;
    let old = Term {
        holder: "a".into(),
        term: t1,
    };
    let stale: Fence = Arc::new(move || Some(old.clone()));
    let weight = |store: &Store, w: i64| {
        let w = understudy_controlplane::model::Weight::try_from(w).expect("a weight");
        store.set_canary_weight(SERVICE, w)
    };
    weight(&a.fenced(Arc::clone(&stale)), 10)?;
    let rollouts_a = RolloutStore::shared(setup.another("rollouts-a"), Arc::clone(&stale));
    rollouts_a.save("r-1", &json!({"step": 0}), &["created"])?;
    setup.call(|c| {
        c.execute(
            "UPDATE lease SET expires_at = clock_timestamp() - interval '1 second'",
            &[],
        )?;
        Ok(())
    })?;
    let t2 = lease::acquire(&setup, "b", "", Duration::from_secs(60))?.context("no term")?;
    assert_eq!(t2, t1 + 1);
    // `a` still names term 1 (a paused leader that believes): refused by
    // the database, and nothing changes.
    let refused = weight(&a.fenced(Arc::clone(&stale)), 50);
    assert!(
        matches!(
            refused,
            Err(ChangeError::Persist(StoreError::Shared(PgError::Fenced(_))))
        ),
        "{refused:?}"
    );
    let refused = rollouts_a.save("r-1", &json!({"step": 1}), &["step 2"]);
    assert!(
        matches!(refused, Err(RolloutStoreError::Shared(PgError::Fenced(_)))),
        "{refused:?}"
    );
    // A write that names no lease at all is refused too (the trigger, not us).
    let bare = setup.call(|c| {
        c.execute(
            "INSERT INTO rollouts (id, record) VALUES ('r-2', '{}')",
            &[],
        )?;
        Ok(())
    });
    assert!(matches!(bare, Err(PgError::Fenced(_))), "{bare:?}");
    // The current term writes.
    let current = Term {
        holder: "b".into(),
        term: t2,
    };
    let fresh: Fence = Arc::new(move || Some(current.clone()));
    weight(&b.fenced(Arc::clone(&fresh)), 30)?;
    RolloutStore::shared(setup.another("rollouts-b"), fresh).save(
        "r-1",
        &json!({"step": 1}),
        &["step 2"],
    )?;
    assert!(a.refresh()?);
    assert_eq!(a.service(SERVICE)?.canary_weight.percent(), 30);
    let log: Vec<String> = rollouts_a.audit("r-1")?;
    assert_eq!(log, ["created", "step 2"]);
    let records: Vec<Value> = rollouts_a.load_all()?;
    assert_eq!(records, [json!({"step": 1})]);
    drop(rt);
    Ok(())
}

/// A replica's evidence side without the rest of the binary: its shadow
/// book, the outbox its report service fills, and the thread's rounds
/// (called by the test instead of the thread).
struct Replica {
    shared: understudy_controlplane::evidence::shared::SharedEvidence,
    outbox: std::sync::Arc<understudy_controlplane::evidence::usage::ReportOutbox>,
    shadow: std::sync::Arc<understudy_controlplane::evidence::shadow::ShadowBook>,
}

impl Replica {
    fn start(db: &understudy_controlplane::pg::Db, name: &str) -> Result<Self> {
        use std::sync::Arc;
        use understudy_controlplane::evidence::envoy_stats::MetricsBook;
        let outbox = Arc::new(Default::default());
        let shadow = Arc::new(Default::default());
        let shared = understudy_controlplane::evidence::shared::SharedEvidence::new(
            name,
            db.another(name),
            (
                Arc::new(MetricsBook::tapped()),
                Arc::new(MetricsBook::default()),
            ),
            (Arc::clone(&outbox), Arc::clone(&shadow)),
        )?;
        Ok(Self {
            shared,
            outbox,
            shadow,
        })
    }
}

/// The filter's shadow batches two replicas receive, shipped through a real
/// PostgreSQL: each replica's book ends with both replicas' counts, each
/// exactly once however often they read, and a replica started later (a
/// new leader) reads the same totals. (Stats flushes: the SIGKILL test
/// checks one Envoy's canary requests in the database exactly once.)
#[test]
fn shipped_evidence_counts_every_report_exactly_once() -> Result<()> {
    use understudy_controlplane::pg::Db;
    use understudy_proto::v1::{ReportBatch, RouteCounts};

    let rt = tokio::runtime::Runtime::new()?;
    let pg = rt.block_on(Postgres::start())?;
    let setup = Db::connect(&pg.url(), "setup")?;
    let replica = |name: &str| Replica::start(&setup, name);
    let batch = |node: &str, compared: u64, serious: u64| ReportBatch {
        node_id: node.to_owned(),
        routes: vec![RouteCounts {
            route: "checkout".to_owned(),
            compared,
            matched: compared - serious,
            mismatched_serious: serious,
            unexpected: serious,
            ..Default::default()
        }],
        ..Default::default()
    };
    let compared = |r: &Replica| -> (u64, u64) {
        r.shadow
            .summaries()
            .into_iter()
            .find(|s| s.route == "checkout")
            .map_or((0, 0), |s| (s.live.compared, s.live.mismatched_serious))
    };
    let mut a = replica("a")?;
    let mut b = replica("b")?;
    // What the report service does on each replica: ingest, and queue.
    for (r, report) in [
        (&a, batch("envoy-a", 10, 2)),
        (&a, batch("envoy-a", 4, 0)),
        (&b, batch("envoy-b", 5, 1)),
    ] {
        r.shadow
            .ingest(report.clone(), std::time::SystemTime::now());
        r.outbox.push(&report, Some(report.node_id.clone()));
    }
    let now = now_ms();
    assert_eq!(a.shared.ship_reports(now)?, 2);
    assert_eq!(b.shared.ship_reports(now)?, 1);
    for _ in 0..3 {
        a.shared.read_reports(now)?;
        b.shared.read_reports(now)?;
    }
    assert_eq!(compared(&a), (19, 3), "replica a");
    assert_eq!(compared(&b), (19, 3), "replica b");
    // One more batch on b reaches a once.
    let more = batch("envoy-b", 1, 1);
    b.shadow.ingest(more.clone(), std::time::SystemTime::now());
    b.outbox.push(&more, None);
    b.shared.ship_reports(now)?;
    a.shared.read_reports(now)?;
    a.shared.read_reports(now)?;
    assert_eq!(compared(&a), (20, 4));
    // A replica that starts now reads everyone's, once.
    let mut c = replica("c")?;
    c.shared.read_reports(now)?;
    c.shared.read_reports(now)?;
    assert_eq!(compared(&c), (20, 4), "a late replica");
    drop(rt);
    Ok(())
}

/// Learned noise through a real PostgreSQL: what two replicas' Envoys
/// taught in A/A calibration is summed in both books (and not counted again
/// through the shipped batches); a restarted replica continues from its
/// row; a reset on one replica empties every replica's noise or live
/// counts (a replica started later included), and learning pending from
/// before a reset is never written after.
#[test]
fn learned_noise_is_shared_kept_across_restarts_and_reset_fleet_wide() -> Result<()> {
    use understudy_controlplane::evidence::shared::ResetKind;
    use understudy_controlplane::pg::Db;
    use understudy_proto::v1::{Difference, MismatchRecord, ReportBatch, RouteCounts};

    let rt = tokio::runtime::Runtime::new()?;
    let pg = rt.block_on(Postgres::start())?;
    let setup = Db::connect(&pg.url(), "setup")?;
    let replica = |name: &str| Replica::start(&setup, name);
    // What the report service does: ingest, and queue to ship.
    let receive = |r: &Replica, report: ReportBatch| {
        r.shadow
            .ingest(report.clone(), std::time::SystemTime::now());
        r.outbox.push(&report, Some(report.node_id.clone()));
    };
    // `compared` pairs, of which `at` differed at $.at (calibration or live).
    let batch = |node: &str, calibration: bool, compared: u64, at: u64| ReportBatch {
        node_id: node.to_owned(),
        routes: vec![RouteCounts {
            route: "checkout".to_owned(),
            calibration,
            compared,
            matched: compared - at,
            mismatched_serious: at,
            unexpected: at,
            ..Default::default()
        }],
        mismatches: (0..at)
            .map(|i| MismatchRecord {
                route: "checkout".to_owned(),
                request_id: format!("{node}-{i}"),
                calibration,
                serious: true,
                unexpected: true,
                differences: vec![Difference {
                    path: "$.at".to_owned(),
                    unexpected: true,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    // (calibration pairs, records that differed at $.at) in a book.
    let noise = |r: &Replica| -> (u64, u64) {
        r.shadow
            .noise()
            .into_iter()
            .find(|n| n.route == "checkout")
            .map_or((0, 0), |n| {
                let at = n.paths.iter().find(|p| p.path == "$.at");
                (n.calibration_compared, at.map_or(0, |p| p.records))
            })
    };
    let live = |r: &Replica| -> u64 {
        r.shadow
            .summaries()
            .into_iter()
            .find(|s| s.route == "checkout")
            .map_or(0, |s| s.live.compared)
    };
    // Two rounds of each replica's evidence thread, in turn.
    let rounds = |replicas: &mut [&mut Replica]| -> Result<()> {
        for _ in 0..2 {
            for r in replicas.iter_mut() {
                ensure!(r.shared.round(now_ms()) == 0, "a step failed");
            }
        }
        Ok(())
    };
    let rows = |sql: &'static str| -> Result<i64> {
        Ok(setup.call(move |c| Ok(c.query_one(sql, &[])?.get::<_, i64>(0)))?)
    };

    let mut a = replica("a")?;
    let mut b = replica("b")?;
    receive(&a, batch("envoy-a", true, 10, 4));
    receive(&b, batch("envoy-b", true, 20, 2));
    receive(&b, batch("envoy-b", false, 7, 0));
    rounds(&mut [&mut a, &mut b])?;
    assert_eq!(
        noise(&a),
        (30, 6),
        "replica a: both replicas' calibration, once"
    );
    assert_eq!(noise(&b), (30, 6), "replica b");
    assert_eq!(live(&a), 7, "live batches still cross replicas");

    // `a` restarts (a fresh book, the same name): it reads the fleet's
    // noise, and what it learns next is added to its row, not written over it.
    drop(a);
    let mut a = replica("a")?;
    rounds(&mut [&mut a])?;
    assert_eq!(
        noise(&a),
        (30, 6),
        "a restarted replica keeps learned noise"
    );
    receive(&a, batch("envoy-a", true, 5, 1));
    rounds(&mut [&mut a, &mut b])?;
    assert_eq!(noise(&a), (35, 7));
    assert_eq!(noise(&b), (35, 7));
    assert_eq!(
        rows(
            "SELECT (learned->'totals'->>'compared')::bigint FROM learned_noise WHERE replica = 'a'"
        )?,
        15
    );

    // `a` learns something, then `b` forgets the route's noise before `a`
    // hands it over: it is dropped with the rest, on both.
    receive(&a, batch("envoy-a", true, 3, 3));
    b.shared
        .resets()
        .reset("checkout", ResetKind::Noise, now_ms())?;
    assert_eq!(noise(&b), (0, 0), "the replica that reset, at once");
    rounds(&mut [&mut a, &mut b])?;
    assert_eq!(noise(&a), (0, 0), "every replica forgets");
    assert_eq!(noise(&b), (0, 0));
    assert_eq!(rows("SELECT count(*) FROM learned_noise")?, 0);
    // Learning after the reset counts, under the new epoch.
    receive(&a, batch("envoy-a", true, 4, 1));
    rounds(&mut [&mut a, &mut b])?;
    assert_eq!(noise(&b), (4, 1));
    assert_eq!(
        rows("SELECT count(*) FROM learned_noise WHERE epoch = 1")?,
        1
    );

    // Live counts start over on every replica; learned noise stays.
    assert_eq!(live(&a), 7);
    b.shared
        .resets()
        .reset("checkout", ResetKind::Live, now_ms())?;
    rounds(&mut [&mut a, &mut b])?;
    assert_eq!((live(&a), live(&b)), (0, 0));
    assert_eq!(noise(&a), (4, 1));
    // A replica that starts now reads the retained batches, but not those
    // shipped before the reset as live evidence; new ones count.
    receive(&b, batch("envoy-b", false, 3, 0));
    let mut c = replica("c")?;
    rounds(&mut [&mut b, &mut c])?;
    assert_eq!(live(&c), 3, "the batch before the reset is left out");
    assert_eq!(noise(&c), (4, 1));
    drop(rt);
    Ok(())
}

/// What one replica shows of the route's learned noise: (calibration pairs,
/// rate at `$.generated_at`); `(0, None)` when it has none.
async fn noise_on(cp: &ControlPlaneProcess, route: &str) -> Result<(u64, Option<f64>)> {
    let n = cp.get("/v1/shadow/noise").await?;
    let Some(r) = n["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["route"] == route))
    else {
        return Ok((0, None));
    };
    let rate = r["paths"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["path"] == "$.generated_at"))
        .and_then(|p| p["rate"].as_f64());
    Ok((r["calibration_compared"].as_u64().unwrap_or(0), rate))
}

/// Learned noise through real replicas: the A/A calibration pairs two
/// Envoys report to two replicas show on all three replicas, each pair
/// once; a replica killed and restarted shows them again (from the
/// database); and forgetting the route's noise on the replica that serves
/// no Envoy forgets it on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_noise_reaches_every_replica_and_a_reset_on_any_clears_it() -> Result<()> {
    let _one_at_a_time = HEAVY.lock().await;
    let (mut w, leader) = world().await?;
    // A/A: the shadow is the stable version itself; its answers differ
    // only in a timestamp and a trace id (noise by definition).
    w.stable.state.set_behavior(Behavior {
        stamp: true,
        body: Some(json!({"item": 1})),
        ..Default::default()
    })?;
    let route = "orders";
    let config = json!({
        "wasm_path": understudy_e2e::paths::filter_wasm()?.display().to_string(),
        "config": {"routes": [{"name": route, "path_prefix": "/",
            "shadow": {"cluster": format!("{SERVICE}-stable"), "calibration": true}}]}
    });
    let (status, answer) = w.cps[leader].put("/v1/filter", &config).await?;
    ensure!(status == 200, "PUT /v1/filter answered {status}: {answer}");
    let compared = format!("wasmcustom.understudy.shadow.{route}.compared");
    // Requests until both Envoys (on two replicas) have compared pairs. Both
    // listen on one port; the kernel spreads new connections between them,
    // so none is kept for reuse.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    wait::until(
        "both Envoys to compare calibration pairs",
        Duration::from_secs(20),
        || async {
            for _ in 0..8 {
                let r = client.get(&w.url).send().await?;
                ensure!(r.status() == 200, "a client request failed: {}", r.status());
            }
            let mut both = true;
            for e in &w.envoys {
                both &= e.stat(&compared).await?.unwrap_or(0) > 0;
            }
            Ok(both.then_some(()))
        },
    )
    .await?;
    // Every replica shows the sum of both Envoys' pairs, once. (An
    // Envoy counts a pair before it reports it: a replica showing more than
    // the Envoys counted has counted one twice.)
    let counted = || async {
        let mut total = 0;
        for e in &w.envoys {
            total += e.stat(&compared).await?.unwrap_or(0);
        }
        anyhow::Ok(total)
    };
    let mut total = 0;
    for (i, cp) in w.cps.iter().enumerate() {
        let (n, rate) = wait::until(
            &format!("replica r{i} to show every calibration pair"),
            Duration::from_secs(15),
            || async {
                let (n, rate) = noise_on(cp, route).await?;
                let total = counted().await?;
                ensure!(n <= total, "r{i} shows {n} pairs of {total}: counted twice");
                Ok((n == total).then_some((n, rate)))
            },
        )
        .await?;
        assert_eq!(rate, Some(1.0), "r{i}: the stamp's learned rate");
        total = n;
    }
    assert_eq!(total, counted().await?, "no pair arrived late");
    // The replica with no Envoy restarts and shows the same, from the database.
    let spare = w.spare;
    w.cps[spare].sigkill()?;
    w.cps[spare].restart().await?;
    wait::until(
        "the restarted replica to show the learned noise",
        Duration::from_secs(15),
        || async { Ok((noise_on(&w.cps[spare], route).await?.0 == total).then_some(())) },
    )
    .await?;
    // Forgotten there, forgotten everywhere.
    let (status, body) = w.cps[spare]
        .delete(&format!("/v1/shadow/noise/{route}"))
        .await?;
    ensure!(status == 204, "DELETE answered {status}: {body}");
    for (i, cp) in w.cps.iter().enumerate() {
        wait::until(
            &format!("replica r{i} to forget the noise"),
            Duration::from_secs(10),
            || async { Ok((noise_on(cp, route).await? == (0, None)).then_some(())) },
        )
        .await?;
    }
    drop(w.pg);
    Ok(())
}

/// A leader stopped the way Kubernetes stops a pod (SIGTERM) gives its
/// lease up on the way out: the other replica leads long before the lease
/// would have run out (20 s here, so a lease left to expire could not pass),
/// and the stopped one exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_by_sigterm_hands_over_at_once() -> Result<()> {
    use rustix::process::Signal;
    let pg = Postgres::start().await?;
    let stable = UpstreamHandle::start("v1", Behavior::default()).await?;
    let canary = UpstreamHandle::start("v2", Behavior::default()).await?;
    let state = desired_state(free_port()?, stable.addr, canary.addr)?;
    let lease = Duration::from_secs(20);
    let args = |name: &str| {
        let mut a = replica_args(&pg.url(), name);
        a.extend(["--lease-ms".to_owned(), lease.as_millis().to_string()]);
        a
    };
    let first = ControlPlaneProcess::start_with(&state, &NODES, &args("r0"), None).await?;
    let certs = first.certs.clone();
    let second = ControlPlaneProcess::start_with(&state, &NODES, &args("r1"), Some(&certs)).await?;
    let mut cps = vec![first, second];
    let leader = wait_leader(&cps, &[], lease * 2).await?;
    let other = 1 - leader;
    // When the leader's lease runs out if nobody gives it up, by the
    // database's clock (the machine's: PostgreSQL runs here).
    let expires_ms: f64 = db_rows(
        &pg,
        "SELECT extract(epoch FROM expires_at) * 1000 FROM lease",
    )
    .await?[0][0]
        .parse()?;
    cps[leader].signal(Signal::TERM)?;
    let status = cps[leader].wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "the stopped leader exited with {status}");
    let took_over = wait_leader(&cps, &[leader], lease).await?;
    assert_eq!(took_over, other);
    let now_ms = now_ms() as f64;
    assert!(
        now_ms < expires_ms,
        "the other replica led only {:.1} s after the old lease's expiry: it was not given up",
        (now_ms - expires_ms) / 1000.0
    );
    let holder = db_rows(&pg, "SELECT holder FROM lease").await?;
    assert_eq!(holder[0][0], format!("r{other}"));
    Ok(())
}
