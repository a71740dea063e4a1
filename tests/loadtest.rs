//! The loadtest's scenarios against a real network, small and bounded: every operation
//! succeeds, is counted once, and the summary adds up. (Figures come from real runs; see
//! docs/BENCHMARKS.md.)

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use photon_loadtest::{
    client::App,
    scenario::{self, Plan, Via},
    stats::Recorder,
    target::Endpoint,
};

fn apps(net: &Net) -> (Arc<App>, Arc<App>) {
    let http = reqwest::Client::new();
    let at = |url: &str, app: &str| Endpoint { url: url.into(), app: app.into(), key: KEY.into() };
    (
        Arc::new(App::new(http.clone(), at(&net.proxy1, APP1)).unwrap()),
        Arc::new(App::new(http, at(&net.proxy2, APP2)).unwrap()),
    )
}

fn plan(clients: usize, count: u64, via: Via) -> Plan {
    Plan { clients, count, duration: Duration::from_secs(60), body_bytes: 100, via }
}

#[tokio::test]
async fn create_makes_exactly_count_tasks() {
    let net = Net::start();
    let (creator, worker) = apps(&net);
    let rec = Arc::new(Recorder::new());
    scenario::create(creator, &worker, &plan(4, 40, Via::LongPoll), rec.clone()).await;
    let summary = rec.summary("create", serde_json::json!({}));
    assert_eq!((summary.ok, summary.errors.len()), (40, 0), "{summary:?}");
    assert_eq!(net.broker_tasks().await, 40);
    assert!(summary.latency_ms.unwrap().p50 > 0.0);
}

#[tokio::test]
async fn roundtrips_by_long_poll_and_by_events() {
    let net = Net::start();
    for via in [Via::LongPoll, Via::Sse] {
        let (creator, worker) = apps(&net);
        let rec = Arc::new(Recorder::new());
        scenario::roundtrip(creator, worker, &plan(3, 15, via), rec.clone()).await;
        let summary = rec.summary("roundtrip", serde_json::json!({}));
        assert_eq!((summary.ok, summary.errors.clone()), (15, Default::default()), "{via:?}: {summary:?}");
    }
    // Each round trip's task was answered: nothing is left to do.
    let todo: serde_json::Value = net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap().json().await.unwrap();
    assert_eq!(todo, serde_json::json!([]));
}

#[tokio::test]
async fn failures_are_counted_by_status() {
    let net = Net::start();
    let http = reqwest::Client::new();
    let wrong_key = Endpoint { url: net.proxy1.clone(), app: APP1.into(), key: "wrong".into() };
    let creator = Arc::new(App::new(http, wrong_key).unwrap());
    let (_, worker) = apps(&net);
    let rec = Arc::new(Recorder::new());
    scenario::create(creator, &worker, &plan(2, 6, Via::LongPoll), rec.clone()).await;
    let summary = rec.summary("create", serde_json::json!({}));
    assert_eq!(summary.ok, 0);
    assert_eq!(summary.errors, std::collections::BTreeMap::from([("401".to_string(), 6)]));
}
