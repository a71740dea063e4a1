//! Result hubs: an app's concurrent readers of one task's results (streams and long-polls)
//! share one broker stream at their proxy, and each still sees exactly what the broker would
//! have told it alone.

mod common;

use std::time::Duration;

use common::*;
use reqwest::header;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

fn results(net: &Net, id: &str, query: &str) -> reqwest::RequestBuilder {
    net.get(APP1, &format!("/v1/tasks/{id}/results?{query}"))
}

async fn stream(net: &Net, id: &str, query: &str, last_event_id: Option<&str>) -> Sse {
    let mut req = results(net, id, query).header(header::ACCEPT, "text/event-stream");
    if let Some(last) = last_event_id {
        req = req.header("Last-Event-ID", last);
    }
    Sse::new(req.send().await.unwrap())
}

/// Every event up to the stream's end, comments left out.
async fn drain(mut s: Sse) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(e) = s.next_event(T).await {
        events.push(e);
    }
    events
}

/// `(id, from, body)` of each event.
fn summary(events: &[Event]) -> Vec<(String, String, Value)> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e.event, "new_result", "{e:?}");
            let r = e.json();
            (e.id.clone().unwrap(), r["from"].as_str().unwrap().to_owned(), r["body"].clone())
        })
        .collect()
}

async fn counts(net: &Net) -> (Value, Value) {
    let proxy = net.health(&net.proxy1).await.1;
    let broker = net.broker_health().await;
    (json!([proxy["streams"], proxy["waiters"], proxy["hubs"]]), json!([broker["streams"], broker["waiters"]]))
}

#[tokio::test]
async fn concurrent_readers_share_one_broker_stream() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2, APP3], json!("t"), "1m").await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(stream(&net, &id, "wait_count=2", None).await);
    }
    let waiters: Vec<_> = (0..6)
        .map(|_| {
            let req = results(&net, &id, "wait_count=2&wait_time=30s");
            tokio::spawn(async move { req.send().await.unwrap() })
        })
        .collect();
    // The first stream went to the broker alone; the other nine readers share one hub.
    eventually("all readers open", || async { counts(&net).await.0 == json!([4, 6, 1]) }).await;
    assert_eq!(counts(&net).await.1, json!([2, 0]), "the broker holds the first stream and the hub's");
    // A bad wait is refused before it reaches either path.
    assert_eq!(results(&net, &id, "wait_time=soon").send().await.unwrap().status(), 400);

    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 201);
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("a")).await, 204);
    assert_eq!(net.answer(APP3, &id, APP1, "succeeded", json!("b")).await, 201);

    let want = vec![
        ("1".to_owned(), APP2.to_owned(), Value::Null),
        ("2".to_owned(), APP2.to_owned(), json!("a")),
        ("3".to_owned(), APP3.to_owned(), json!("b")),
    ];
    for s in streams {
        assert_eq!(summary(&drain(s).await), want, "each stream sees every event once and ends after 2 answers");
    }
    for w in waiters {
        let res = w.await.unwrap();
        assert_eq!(res.status(), 200);
        let bodies: Vec<Value> = json_of(res).await.as_array().unwrap().iter().map(|r| r["body"].clone()).collect();
        assert_eq!(bodies, vec![json!("a"), json!("b")]);
    }
    // Once its readers are gone, the hub closes its broker stream. (The broker notices at its
    // next keep-alive: it does not watch idle streams for a closed connection.)
    eventually("the hub closed", || async { counts(&net).await.0 == json!([0, 0, 0]) }).await;
}

#[tokio::test]
async fn readers_joining_a_hub_resume_after_their_last_event() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2, APP3], json!("t"), "1m").await;
    let first = stream(&net, &id, "", None).await;
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("a")).await, 201);
    assert_eq!(net.answer(APP3, &id, APP1, "succeeded", json!("b")).await, 201);
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("c")).await, 204);

    // Through the hub, from id 1: the current results after it (APP2's first was replaced).
    let mut resumed = stream(&net, &id, "", Some("1")).await;
    let mut events = Vec::new();
    for _ in 0..2 {
        events.push(resumed.next_event(T).await.unwrap());
    }
    assert_eq!(
        summary(&events),
        vec![("2".to_owned(), APP3.to_owned(), json!("b")), ("3".to_owned(), APP2.to_owned(), json!("c"))]
    );
    // A reader already up to date gets only what comes next, as do the others.
    let mut current = stream(&net, &id, "last_event_id=3", None).await;
    eventually("three streams", || async { counts(&net).await.0[0] == 3 }).await;
    assert_eq!(net.answer(APP3, &id, APP1, "permfailed", json!("d")).await, 204);
    for s in [&mut resumed, &mut current] {
        let e = s.next_event(T).await.unwrap();
        assert_eq!((e.id.as_deref(), e.json()["body"].clone()), (Some("4"), json!("d")));
    }
    // A time-only long-poll through the hub answers at its end with the current results.
    let res = results(&net, &id, "wait_time=300ms").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let bodies: Vec<Value> = json_of(res).await.as_array().unwrap().iter().map(|r| r["body"].clone()).collect();
    assert_eq!(bodies, vec![json!("c"), json!("d")]);
    // Fewer answers than asked for when the wait ends: 206 with what there is.
    let res = results(&net, &id, "wait_count=3&wait_time=300ms").send().await.unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(json_of(res).await.as_array().unwrap().len(), 2);
    drop(first);
}

#[tokio::test]
async fn hub_readers_see_the_task_expire() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("t"), "2s").await;
    let direct = stream(&net, &id, "", None).await;
    let shared = stream(&net, &id, "", None).await;
    let waiter = {
        let req = results(&net, &id, "wait_count=1");
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    eventually("a hub", || async { counts(&net).await.0 == json!([2, 1, 1]) }).await;
    for s in [direct, shared] {
        let events = drain(s).await;
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].event.as_str(), events[0].json()), ("deleted_task", json!({"task_id": id})));
    }
    assert_eq!(waiter.await.unwrap().status(), 410, "a waiter on an expired task gets 410 Gone");
    eventually("the hub closed", || async { counts(&net).await.0 == json!([0, 0, 0]) }).await;
}
