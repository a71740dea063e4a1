//! Server-Sent Events: order, ids, resume, keep-alive, end conditions, `new_task` streams.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn results_in_order_with_ids_and_resume() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2, APP3], json!("t"), "1m").await;
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 201);

    let mut s = Sse::new(net.events(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap());
    let first = s.next_event(T).await.unwrap();
    assert_eq!((first.event.as_str(), first.id.as_deref()), ("new_result", Some("1")));
    assert_eq!(first.json()["status"], "claimed");
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("a")).await, 204);
    assert_eq!(net.answer(APP3, &id, APP1, "tempfailed", json!("b")).await, 201);
    let e2 = s.next_event(T).await.unwrap();
    let e3 = s.next_event(T).await.unwrap();
    assert_eq!((e2.id.as_deref(), e2.json()["from"].as_str()), (Some("2"), Some(APP2)));
    assert_eq!(e2.json()["body"], "a");
    assert_eq!((e3.id.as_deref(), e3.json()["from"].as_str()), (Some("3"), Some(APP3)));
    drop(s); // the connection drops

    // Meanwhile another update; a reconnect from id 2 gets exactly what came after.
    assert_eq!(net.answer(APP3, &id, APP1, "succeeded", json!("c")).await, 204);
    let res = net.events(APP1, &format!("/v1/tasks/{id}/results")).header("Last-Event-ID", "2").send().await.unwrap();
    let mut s = Sse::new(res);
    let e = s.next_event(T).await.unwrap();
    assert_eq!((e.id.as_deref(), e.json()["body"].as_str()), (Some("4"), Some("c")));
    // The same resume point through the query parameter.
    let mut q = Sse::new(net.events(APP1, &format!("/v1/tasks/{id}/results?last_event_id=2")).send().await.unwrap());
    assert_eq!(q.next_event(T).await.unwrap().id.as_deref(), Some("4"));
    // Nothing twice: the next thing on the stream is a new update.
    assert_eq!(net.answer(APP2, &id, APP1, "permfailed", json!("d")).await, 204);
    let e = s.next_event(T).await.unwrap();
    assert_eq!((e.id.as_deref(), e.json()["status"].as_str()), (Some("5"), Some("permfailed")));
}

#[tokio::test]
async fn stream_ends_after_wait_count_answers() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    let mut s = Sse::new(net.events(APP1, &format!("/v1/tasks/{id}/results?wait_count=1")).send().await.unwrap());
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 201);
    assert_eq!(s.next_event(T).await.unwrap().json()["status"], "claimed");
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!(1)).await, 204);
    assert_eq!(s.next_event(T).await.unwrap().json()["status"], "succeeded");
    assert_eq!(s.next_event(T).await, None, "the stream ends after wait_count answers");
}

#[tokio::test]
async fn wait_expired_and_keep_alive() {
    let net = Net::start_with(Options { keepalive: Duration::from_millis(300), ..Options::default() });
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    let mut s = Sse::new(net.events(APP1, &format!("/v1/tasks/{id}/results?wait_time=1500ms")).send().await.unwrap());
    let mut n_comments = 0;
    let end = loop {
        let e = s.next(T).await.unwrap();
        if e.event == "comment" {
            assert_eq!(e.data, "keep-alive");
            n_comments += 1;
        } else {
            break e;
        }
    };
    assert!(n_comments >= 2, "keep-alive comments while idle: {n_comments}");
    assert_eq!(end.event, "wait_expired");
    assert_eq!(end.data, "null");
    assert_eq!(s.next(T).await, None);
}

#[tokio::test]
async fn deleted_task_ends_streams_on_expiry() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("t"), "1s").await;
    let mut s = Sse::new(net.events(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap());
    let e = s.next_event(T).await.unwrap();
    assert_eq!(e.event, "deleted_task");
    assert_eq!(e.json(), json!({"task_id": id}));
    assert_eq!(s.next(T).await, None);
    // Streams on an unknown task are refused with 404, not opened.
    let res = net.events(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn new_task_stream_pushes_and_resumes() {
    let net = Net::start();
    let old = net.create(APP1, &[APP2], json!("old"), "1m").await;
    let mut s = Sse::new(net.events(APP2, "/v1/tasks?filter=todo").send().await.unwrap());
    let e = s.next_event(T).await.unwrap();
    assert_eq!(e.event, "new_task");
    assert_eq!(e.json()["id"], old.as_str());
    let old_seq = e.id.clone().unwrap();
    let new = net.create(APP1, &[APP2], json!({"n": 2}), "1m").await;
    let e = s.next_event(T).await.unwrap();
    assert_eq!((e.event.as_str(), e.json()["id"].as_str()), ("new_task", Some(new.as_str())));
    assert_eq!(e.json()["body"], json!({"n": 2}));
    drop(s);

    // Resume after the first: only the second comes back.
    let res = net.events(APP2, "/v1/tasks?filter=todo").header("Last-Event-ID", old_seq).send().await.unwrap();
    let mut s = Sse::new(res);
    assert_eq!(s.next_event(T).await.unwrap().json()["id"], new.as_str());
    // A claimed task that then fails temporarily comes back on the stream.
    assert_eq!(net.answer(APP2, &old, APP1, "claimed", json!(null)).await, 201);
    assert_eq!(net.answer(APP2, &old, APP1, "tempfailed", json!(null)).await, 204);
    assert_eq!(s.next_event(T).await.unwrap().json()["id"], old.as_str());

    // Streams of tasks need filter=todo.
    let res = net.events(APP2, &format!("/v1/tasks?to={APP2}")).send().await.unwrap();
    assert_eq!(res.status(), 400);
}
