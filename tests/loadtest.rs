//! The loadtest's scenarios against a real network, small and bounded: every operation
//! succeeds, is counted once, and the summary adds up. (Figures come from real runs; see
//! docs/BENCHMARKS.md.)

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use photon_loadtest::{
    client::{App, ClientKind},
    scenario::{self, Ctx, Plan, Via},
    stats::{Recorder, Summary},
    target::Endpoint,
};

fn app(url: &str, app: &str, key: &str, client: ClientKind) -> Arc<App> {
    let endpoint = Endpoint { url: url.into(), app: app.into(), key: key.into() };
    Arc::new(App::new(reqwest::Client::new(), endpoint, client, 16).unwrap())
}

/// The creator app1 at proxy1, the worker app2 at proxy2, and the broker's health to settle on.
fn ctx(net: &Net, clients: usize, count: u64, via: Via) -> Ctx {
    ctx_with(net, clients, count, via, ClientKind::Lean)
}

fn ctx_with(net: &Net, clients: usize, count: u64, via: Via, client: ClientKind) -> Ctx {
    Ctx {
        creator: app(&net.proxy1, APP1, KEY, client),
        workers: vec![app(&net.proxy2, APP2, KEY, client)],
        plan: Plan {
            clients,
            count,
            duration: Duration::from_secs(60),
            body_bytes: 100,
            via,
            ttl: "5m".into(),
            rate: 100.0,
            recipients: 1,
            client,
        },
        rec: Arc::new(Recorder::new()),
        broker_url: Some(net.broker.clone()),
        memory: None,
        http: reqwest::Client::new(),
    }
}

fn summary(ctx: &Ctx) -> Summary {
    ctx.rec.summary("test", serde_json::json!({}))
}

#[tokio::test]
async fn create_makes_exactly_count_tasks() {
    let net = Net::start();
    let ctx = ctx(&net, 4, 40, Via::LongPoll);
    scenario::create(&ctx).await;
    let summary = summary(&ctx);
    assert_eq!((summary.ok, summary.errors.len()), (40, 0), "{summary:?}");
    assert_eq!(net.broker_tasks().await, 40);
    assert!(summary.latency_ms.unwrap().p50 > 0.0);
}

#[tokio::test]
async fn roundtrips_by_long_poll_and_by_events() {
    let net = Net::start();
    for (via, client) in
        [(Via::LongPoll, ClientKind::Lean), (Via::Sse, ClientKind::Lean), (Via::LongPoll, ClientKind::Reqwest)]
    {
        let ctx = ctx_with(&net, 3, 15, via, client);
        scenario::roundtrip(&ctx, false).await;
        let summary = summary(&ctx);
        assert_eq!((summary.ok, summary.errors.clone()), (15, Default::default()), "{via:?} {client:?}: {summary:?}");
    }
    // Soak: 10 round trips at 50 per second take about 0.2 s to start.
    let mut soak = ctx(&net, 1, 10, Via::LongPoll);
    soak.plan.rate = 50.0;
    scenario::soak(&soak).await;
    let s = summary(&soak);
    assert_eq!((s.ok, s.errors.len()), (10, 0), "{s:?}");
    // Each round trip's task was answered: nothing is left to do.
    let todo: serde_json::Value = net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap().json().await.unwrap();
    assert_eq!(todo, serde_json::json!([]));
}

#[tokio::test]
async fn failures_are_counted_by_status() {
    let net = Net::start();
    let mut ctx = ctx(&net, 2, 6, Via::LongPoll);
    ctx.creator = app(&net.proxy1, APP1, "wrong", ClientKind::Lean);
    scenario::create(&ctx).await;
    let summary = summary(&ctx);
    assert_eq!(summary.ok, 0);
    assert_eq!(summary.errors, std::collections::BTreeMap::from([("401".to_string(), 6)]));
}

#[tokio::test]
async fn every_stream_gets_every_update() {
    let net = Net::start();
    let ctx = ctx(&net, 4, 25, Via::Sse);
    scenario::sse(&ctx).await;
    let s = summary(&ctx);
    assert_eq!((s.ok, s.errors.len()), (100, 0), "{s:?}");
    let figure = |k: &str| s.figures[k].as_u64().unwrap();
    assert_eq!((figure("streams"), figure("updates"), figure("events_expected")), (4, 25, 100));
    assert_eq!((figure("events_delivered"), figure("events_lost"), figure("duplicates")), (100, 0, 0));
}

/// A run cut short by its duration delivers what was sent, with none lost, and its throughput
/// counts the time the updates took, not the streams' final check that nothing more comes
/// (10 s of silence before the fix, which halved the events per second of a short run).
#[tokio::test]
async fn an_sse_run_cut_short_by_its_duration_counts_what_was_sent() {
    let net = Net::start();
    let mut ctx = ctx(&net, 2, 1_000_000, Via::Sse);
    ctx.plan.duration = Duration::from_millis(500);
    scenario::sse(&ctx).await;
    let s = summary(&ctx);
    let figure = |k: &str| s.figures[k].as_u64().unwrap();
    assert!(figure("updates") > 0 && figure("updates") < 1_000_000, "{s:?}");
    assert_eq!(figure("events_lost"), 0, "{s:?}");
    assert_eq!(s.ok, figure("events_delivered"));
    assert!(s.elapsed_s < 5.0, "the measured time ends with the last delivery: {} s", s.elapsed_s);
}

#[tokio::test]
async fn waiters_are_all_woken_and_fanout_waits_for_every_recipient() {
    let net = Net::start();
    let ctx = ctx(&net, 30, 2, Via::LongPoll);
    scenario::waiters(&ctx).await;
    let s = summary(&ctx);
    assert_eq!((s.ok, s.errors.len()), (60, 0), "{s:?}");
    assert_eq!(s.figures["woken_all_ms"].as_array().unwrap().len(), 2);
    // The warm-up round ran, and neither its waiters nor its figure count among the rounds.
    assert!(s.figures["warmup_woken_all_ms"].as_f64().is_some(), "{s:?}");

    // Fanout to app2 at proxy2 and app3 at proxy1: each task has two answers.
    let mut fan = self::ctx(&net, 2, 6, Via::LongPoll);
    fan.workers.push(app(&net.proxy1, APP3, KEY, ClientKind::Lean));
    scenario::roundtrip(&fan, true).await;
    let s = summary(&fan);
    assert_eq!((s.ok, s.errors.len()), (6, 0), "{s:?}");
    let todo: serde_json::Value = net.get(APP3, "/v1/tasks?filter=todo").send().await.unwrap().json().await.unwrap();
    assert_eq!(todo, serde_json::json!([]), "app3 answered all");
}
