//! The rollout engine against hostile and broken surroundings, in process
//! and with time as an input: NACKs it did not cause, a panicking
//! evaluation, a state file that cannot be written between the decision and
//! its effect, a restart during the shadow stage; and when it looks.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use understudy_controlplane::evidence::envoy_stats::MetricsBook;
use understudy_controlplane::evidence::shadow::ShadowBook;
use understudy_controlplane::model::{DesiredState, Weight};
use understudy_controlplane::rollout::engine::{Action, Engine, Phase, Sources};
use understudy_controlplane::rollout::store::RolloutStore;
use understudy_controlplane::store::Store;
use understudy_controlplane::xds::Registry;
use understudy_controlplane::xds::resources::type_url;
use understudy_controlplane::xds::stream::Nack;
use understudy_proto::v1::{ReportBatch, RouteCounts};

fn desired() -> DesiredState {
    common::desired(
        json!({"routes": [{"name": "orders", "path_prefix": "/orders"}]}),
        [common::service("shop", 9001), common::service("cart", 9011)],
    )
}

/// Two steps that never pass on their own (an hour each): the tests move
/// the rollout, not the judge.
fn canary_spec(service: &str) -> String {
    format!(
        r#"{{"service": "{service}", "owner": "team@example.com",
            "stop_rules": {{"max_error_rate_increase_pp": 1.0, "halt_on_nack": true}},
            "steps": [{{"weight": 5, "min_duration_s": 3600}}, {{"weight": 100}}],
            "analysis": {{"interval_s": 1}}}}"#
    )
}

fn shadow_spec() -> String {
    r#"{"service": "shop", "owner": "team@example.com",
        "stop_rules": {"max_error_rate_increase_pp": 1.0, "max_unexpected_mismatch_rate": 0.5},
        "shadow": {"route": "orders", "percent": 100, "min_duration_s": 3600,
                   "min_compared": 1000000, "max_serious_rate": 0.5},
        "steps": [{"weight": 100}],
        "analysis": {"interval_s": 1}}"#
        .to_owned()
}

struct Parts {
    engine: Engine,
    metrics: Arc<MetricsBook>,
    store: Store,
    registry: Arc<Registry>,
    shadow: Arc<ShadowBook>,
}

fn engine(store: Store, db: RolloutStore, shadow: Arc<ShadowBook>) -> Parts {
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(MetricsBook::default());
    let engine = Engine::new(
        store.clone(),
        db,
        Sources {
            metrics: Arc::clone(&metrics),
            shadow: Arc::clone(&shadow),
            registry: Arc::clone(&registry),
        },
    )
    .unwrap();
    Parts {
        engine,
        metrics,
        store,
        registry,
        shadow,
    }
}

fn in_memory() -> Parts {
    engine(
        Store::new(desired()).unwrap(),
        RolloutStore::in_memory().unwrap(),
        Arc::default(),
    )
}

fn nack(p: &Parts, type_url: &str, version: &str, at: SystemTime) {
    let guard = p.registry.connect(at);
    p.registry.record_nack(
        guard.id,
        Some("envoy-1"),
        Nack {
            type_url: type_url.into(),
            version: version.into(),
            error: "rejected".into(),
            at,
        },
    );
}

fn phase(p: &Parts, id: &str) -> Phase {
    p.engine.view(id).unwrap().rollout.phase
}

#[test]
fn only_a_nack_of_a_version_the_rollout_pushed_halts_it() {
    let p = in_memory();
    let t0 = SystemTime::now();
    let r = p.engine.create(&canary_spec("shop"), "alice", t0).unwrap();
    assert_eq!(r.phase, Phase::Canary { step: 0 });
    let routes = p
        .store
        .snapshot()
        .get(type_url::ROUTE)
        .unwrap()
        .version
        .clone();
    assert!(
        r.pushed
            .iter()
            .any(|v| v.type_url == type_url::ROUTE && v.version == routes),
        "{:?}",
        r.pushed
    );

    // Someone else's change, rejected: a version the rollout never pushed,
    // and another type altogether.
    let t1 = t0 + Duration::from_secs(1);
    nack(&p, type_url::ROUTE, "0123456789abcdef", t1);
    nack(&p, type_url::CLUSTER, "fedcba9876543210", t1);
    p.engine.tick(t0 + Duration::from_secs(2));
    assert_eq!(phase(&p, &r.id), Phase::Canary { step: 0 }, "no halt");
    assert!(
        p.engine
            .view(&r.id)
            .unwrap()
            .rollout
            .last_judgement
            .is_some()
    );

    // Envoy rejects the route version the rollout's 5% produced: halt.
    nack(&p, type_url::ROUTE, &routes, t0 + Duration::from_secs(3));
    p.engine.tick(t0 + Duration::from_secs(4));
    match phase(&p, &r.id) {
        Phase::RolledBack { reason } => assert!(reason.contains(&routes), "{reason}"),
        other => panic!("not halted: {other:?}"),
    }
    assert_eq!(p.store.service("shop").unwrap().canary_weight, Weight::ZERO);
}

fn last_look_ms(p: &Parts, id: &str) -> u64 {
    p.engine.view(id).unwrap().rollout.last_evaluated_ms
}

/// A stats flush is judged when it lands, not an `interval_s` later; with
/// nothing new the interval decides, and looks on fresh evidence are at
/// least `MIN_LOOK_GAP_MS` apart.
#[test]
fn a_fresh_stats_flush_is_judged_at_once() {
    use understudy_controlplane::evidence::envoy_stats::NodeId;
    use understudy_controlplane::rollout::engine::MIN_LOOK_GAP_MS;
    use understudy_controlplane::time::unix_ms;

    let p = in_memory();
    let spec = canary_spec("shop").replace(r#""interval_s": 1"#, r#""interval_s": 10"#);
    let t0 = SystemTime::now();
    let r = p.engine.create(&spec, "alice", t0).unwrap();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    p.engine.tick(at(1_000));
    let first = last_look_ms(&p, &r.id);
    assert_eq!(first, unix_ms(at(1_000)), "the first look is due at once");

    // Nothing new: the 10 s interval holds.
    p.engine.tick(at(3_000));
    assert_eq!(last_look_ms(&p, &r.id), first);

    // A flush lands at 3.5 s: judged on the next tick.
    let node = NodeId::try_from("edge-1").unwrap();
    p.metrics.ingest(
        &node,
        &common::first_message("edge-1", common::flush("shop-canary", 50, 0, 3.0)),
        unix_ms(at(3_500)),
    );
    p.engine.tick(at(3_600));
    assert_eq!(last_look_ms(&p, &r.id), unix_ms(at(3_600)));
    let judged = p
        .engine
        .view(&r.id)
        .unwrap()
        .rollout
        .last_judgement
        .unwrap();
    assert!(
        judged.reason.contains("not enough data") || judged.reason.contains("stable"),
        "{}",
        judged.reason
    );

    // Another flush right away: not before the gap has passed.
    p.metrics.ingest(
        &node,
        &common::next_message(common::flush("shop-stable", 50, 0, 3.0)),
        unix_ms(at(3_650)),
    );
    p.engine.tick(at(3_600 + MIN_LOOK_GAP_MS - 50));
    assert_eq!(last_look_ms(&p, &r.id), unix_ms(at(3_600)));
    p.engine.tick(at(3_600 + MIN_LOOK_GAP_MS));
    assert_eq!(
        last_look_ms(&p, &r.id),
        unix_ms(at(3_600 + MIN_LOOK_GAP_MS))
    );

    // And with nothing new since, the interval again.
    p.engine.tick(at(9_000));
    assert_eq!(
        last_look_ms(&p, &r.id),
        unix_ms(at(3_600 + MIN_LOOK_GAP_MS))
    );
}

#[test]
fn a_panicking_evaluation_is_caught_counted_and_the_others_are_judged() {
    let p = in_memory();
    let t0 = SystemTime::now();
    let shop = p.engine.create(&canary_spec("shop"), "alice", t0).unwrap();
    let cart = p.engine.create(&canary_spec("cart"), "alice", t0).unwrap();
    let bad = shop.id.clone();
    *p.engine.fault.lock().unwrap() = Some(Arc::new(move |id: &str| {
        assert!(id != bad, "injected fault in {id}");
    }));
    for i in 1..=3 {
        p.engine.tick(t0 + Duration::from_secs(2 * i));
    }
    let health = p.engine.health();
    assert_eq!(health.panics, 3, "{health:?}");
    assert!(
        health
            .last_panic
            .as_deref()
            .unwrap()
            .contains("injected fault"),
        "{health:?}"
    );
    // The other rollout was judged on every tick despite the panics.
    let judged = p.engine.view(&cart.id).unwrap();
    assert!(judged.rollout.last_judgement.is_some());
    assert_eq!(judged.engine.panics, 3, "the view shows it");
    // Once the fault is gone the panicking rollout is judged again.
    *p.engine.fault.lock().unwrap() = None;
    p.engine.tick(t0 + Duration::from_secs(10));
    assert!(
        p.engine
            .view(&shop.id)
            .unwrap()
            .rollout
            .last_judgement
            .is_some()
    );
    assert_eq!(p.engine.health().panics, 3);
}

fn weight_on_disk(path: &Path) -> u64 {
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let services = &state["services"];
    let shop = services.get("shop").cloned().unwrap_or_else(|| {
        services
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "shop").cloned())
            .unwrap_or_else(|| panic!("no shop in {state}"))
    });
    shop["canary_weight"]
        .as_u64()
        .unwrap_or_else(|| panic!("{shop}"))
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The crash between the two writes: the rollback is decided (redb) but its
/// state-file write fails. Traffic leaves the canary at once anyway, the
/// failure is visible, and after a restart from the files the decision is
/// applied to the state file.
#[test]
fn a_rollback_that_cannot_be_saved_still_leaves_the_canary_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state.json");
    let db_path = dir.path().join("rollouts.redb");
    std::fs::write(&state_path, serde_json::to_vec(&desired()).unwrap()).unwrap();
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&db_path).unwrap(),
        Arc::default(),
    );
    let t0 = SystemTime::now();
    let r = p.engine.create(&canary_spec("shop"), "alice", t0).unwrap();
    assert_eq!(weight_on_disk(&state_path), 5);
    #[cfg(unix)]
    {
        assert_eq!(mode(&state_path), 0o600, "state file");
        assert_eq!(mode(&db_path), 0o600, "rollout database");
    }

    // The disk refuses the next state file (its temporary name is taken by
    // a directory, which fails even for root).
    let tmp = dir.path().join("state.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let err = p
        .engine
        .act(&r.id, Action::Abort, "alice", t0 + Duration::from_secs(1))
        .unwrap_err();
    assert!(err.to_string().contains("state.json"), "{err}");
    // Out of traffic at once: the published snapshot and the state in memory.
    assert_eq!(p.store.service("shop").unwrap().canary_weight, Weight::ZERO);
    let health = p.engine.health();
    assert!(health.persistence_failures >= 1, "{health:?}");
    assert!(p.store.persistence_failures().0 >= 1);
    assert_eq!(weight_on_disk(&state_path), 5, "the disk still says 5");
    assert!(matches!(phase(&p, &r.id), Phase::Aborted { .. }));

    // Crash; the disk recovers; start again from the files.
    drop(p);
    std::fs::remove_dir(&tmp).unwrap();
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&db_path).unwrap(),
        Arc::default(),
    );
    assert!(matches!(phase(&p, &r.id), Phase::Aborted { .. }));
    assert!(p.engine.view(&r.id).unwrap().rollout.applied);
    assert_eq!(p.store.service("shop").unwrap().canary_weight, Weight::ZERO);
    assert_eq!(weight_on_disk(&state_path), 0, "reconciled at start");
}

/// A promote whose state-file write fails is not half-done: the record goes
/// back to the step it was at, and the weight stays.
#[test]
fn a_promote_that_cannot_be_saved_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state.json");
    std::fs::write(&state_path, serde_json::to_vec(&desired()).unwrap()).unwrap();
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&dir.path().join("r.redb")).unwrap(),
        Arc::default(),
    );
    let t0 = SystemTime::now();
    let r = p.engine.create(&canary_spec("shop"), "alice", t0).unwrap();
    std::fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
    assert!(
        p.engine
            .act(&r.id, Action::Promote, "alice", t0 + Duration::from_secs(1))
            .is_err()
    );
    let view = p.engine.view(&r.id).unwrap();
    assert_eq!(view.rollout.phase, Phase::Canary { step: 0 });
    assert_eq!(view.rollout.weight, 5);
    assert!(view.rollout.applied);
    assert_eq!(p.store.service("shop").unwrap().canary_weight.percent(), 5);
    assert!(
        view.audit
            .iter()
            .any(|e| e.reason.starts_with("not applied")),
        "{:?}",
        view.audit
    );
}

fn live(compared: u64, serious: u64) -> ReportBatch {
    ReportBatch {
        node_id: "envoy-1".into(),
        routes: vec![RouteCounts {
            route: "orders".into(),
            calibration: false,
            compared,
            matched: compared - serious,
            mismatched_serious: serious,
            mismatched_noise: 0,
            unexpected: 0,
            skipped: Default::default(),
            latency_gap_us_sum: 0,
            segments: Vec::new(),
        }],
        ..Default::default()
    }
}

/// Before: a restart subtracted the stage's stored baseline from counters
/// that restarted at zero, hiding serious mismatches. Now the evidence seen
/// before the restart is carried, and new counts add to it.
#[test]
fn a_restart_in_the_shadow_stage_keeps_counting_every_serious_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state.json");
    let db_path = dir.path().join("rollouts.redb");
    std::fs::write(&state_path, serde_json::to_vec(&desired()).unwrap()).unwrap();
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&db_path).unwrap(),
        Arc::default(),
    );
    let t0 = SystemTime::now();
    // Pairs from before the stage: the stage's baseline.
    p.shadow.ingest(live(500, 0), t0);
    let r = p.engine.create(&shadow_spec(), "alice", t0).unwrap();
    assert_eq!(r.phase, Phase::Shadow);
    assert_eq!(r.shadow_baseline.compared, 500);
    p.shadow
        .ingest(live(100, 1), t0 + Duration::from_millis(500));
    p.engine.tick(t0 + Duration::from_secs(2));
    let seen = p.engine.view(&r.id).unwrap().rollout.shadow_seen;
    assert_eq!((seen.compared, seen.serious), (100, 1));

    // Restart: the shadow book starts empty.
    drop(p);
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&db_path).unwrap(),
        Arc::default(),
    );
    let t1 = t0 + Duration::from_secs(3);
    p.shadow.ingest(live(239, 71), t1);
    p.engine.tick(t1 + Duration::from_secs(2));
    let view = p.engine.view(&r.id).unwrap();
    let seen = view.rollout.shadow_seen;
    assert_eq!(
        (seen.compared, seen.serious),
        (339, 72),
        "every pair counts once"
    );
    // With 72/339 serious the stage fails its 50%? No: 21% < 50%, it holds;
    // the judge saw all of them.
    let judged = serde_json::to_value(view.rollout.last_judgement.unwrap()).unwrap();
    assert!(judged.to_string().contains("72"), "{judged}");
}

/// One batch of live pairs on `orders`, per traffic segment
/// `(label, compared, unexpected)`, with the route's totals their sums.
fn live_segments(segs: &[(&str, u64, u64)]) -> ReportBatch {
    let mut counts = RouteCounts {
        route: "orders".into(),
        ..Default::default()
    };
    for (label, compared, unexpected) in segs {
        counts.compared += compared;
        counts.matched += compared - unexpected;
        counts.mismatched_serious += unexpected;
        counts.unexpected += unexpected;
        counts.segments.push(understudy_proto::v1::SegmentCounts {
            segment: (*label).into(),
            compared: *compared,
            matched: compared - unexpected,
            mismatched_serious: *unexpected,
            unexpected: *unexpected,
            ..Default::default()
        });
    }
    ReportBatch {
        node_id: "envoy-1".into(),
        routes: vec![counts],
        ..Default::default()
    }
}

/// The per-segment counts are baselined at the stage's start and carried
/// across a restart like the route's: gold's 20 of 30 before the restart
/// (under the segment minimum of 50) and 30 of 40 after add up to 50 of 70,
/// which fails the worst-segment gate, while the average (36%) stays under
/// the stage's 50%.
#[test]
fn segment_counts_are_baselined_and_carried_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state.json");
    let db_path = dir.path().join("rollouts.redb");
    std::fs::write(&state_path, serde_json::to_vec(&desired()).unwrap()).unwrap();
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&db_path).unwrap(),
        Arc::default(),
    );
    let spec = shadow_spec().replace(
        r#""max_serious_rate": 0.5}"#,
        r#""max_serious_rate": 0.9,
           "per_segment": {"max_unexpected_rate": 0.1, "min_compared": 50}}"#,
    );
    let t0 = SystemTime::now();
    p.shadow
        .ingest(live_segments(&[("gold", 100, 0), ("silver", 100, 0)]), t0);
    let r = p.engine.create(&spec, "alice", t0).unwrap();
    assert_eq!(r.phase, Phase::Shadow);
    assert_eq!(r.shadow_baseline.segments["gold"].compared, 100);
    p.shadow.ingest(
        live_segments(&[("gold", 30, 20), ("silver", 30, 0)]),
        t0 + Duration::from_millis(500),
    );
    p.engine.tick(t0 + Duration::from_secs(2));
    let view = p.engine.view(&r.id).unwrap();
    assert_eq!(
        view.rollout.phase,
        Phase::Shadow,
        "gold is under its minimum"
    );
    let gold = view.rollout.shadow_seen.segments["gold"];
    assert_eq!((gold.compared, gold.unexpected), (30, 20));

    // Restart: the shadow book starts empty; what was seen is carried.
    drop(p);
    let p = engine(
        Store::open(&state_path).unwrap(),
        RolloutStore::open(&db_path).unwrap(),
        Arc::default(),
    );
    let t1 = t0 + Duration::from_secs(3);
    p.shadow
        .ingest(live_segments(&[("gold", 40, 30), ("silver", 40, 0)]), t1);
    p.engine.tick(t1 + Duration::from_secs(2));
    let view = p.engine.view(&r.id).unwrap();
    let Phase::RolledBack { reason } = &view.rollout.phase else {
        panic!("{:?}", view.rollout.phase);
    };
    assert!(
        reason.starts_with("shadow segment \"gold\": unexpected mismatches 50 of 70 pairs"),
        "{reason}"
    );
    assert!(
        reason.contains("the route's average is 35.7% (50 of 140)"),
        "{reason}"
    );
}
