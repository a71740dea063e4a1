//! Long polling (API.md "Long polling"), claimed/tempfailed rules and `filter=todo`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A proxy bounds its apps' waits by its own `MAX_WAIT`, also when the broker's is longer:
/// a longer `wait_time` is `400`, and a count alone ends after the proxy's maximum with `206`
/// (not with the proxy giving up on the broker: `504`).
#[tokio::test]
async fn the_proxys_max_wait_bounds_every_long_poll() {
    let net = Net::start_with(Options { proxy_max_wait: Some(Duration::from_secs(1)), ..Options::default() });
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    for path in [
        "/v1/tasks?filter=todo&wait_count=2&wait_time=5s",
        &format!("/v1/tasks/{id}/results?wait_count=1&wait_time=2s"),
    ] {
        let res = net.get(APP2, path).send().await.unwrap();
        assert_eq!(res.status(), 400, "{path}");
        assert!(res.text().await.unwrap().contains("wait_time"), "{path}");
    }
    let own = format!("/v1/tasks/{id}/results?wait_count=1");
    for (app, path) in [(APP2, "/v1/tasks?filter=todo&wait_count=2"), (APP1, own.as_str())] {
        let started = Instant::now();
        let res = tokio::time::timeout(SECS(20), net.get(app, path).send()).await.expect("answered").unwrap();
        assert_eq!(res.status(), 206, "{path}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(900) && waited < SECS(10), "{path}: {waited:?}");
    }
}

/// A count alone waits at most the shorter of the proxy's and the broker's `MAX_WAIT` (the
/// broker's comes with its control welcome): asked for the proxy's longer one, the broker
/// would refuse the wait with 400.
#[tokio::test]
async fn a_count_alone_waits_within_the_brokers_max_wait_too() {
    let net = Net::start_with(Options {
        max_wait: Duration::from_secs(1),
        proxy_max_wait: Some(Duration::from_secs(3600)),
        ..Options::default()
    });
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    let own = format!("/v1/tasks/{id}/results?wait_count=1");
    for (app, path) in [(APP2, "/v1/tasks?filter=todo&wait_count=2"), (APP1, own.as_str())] {
        let started = Instant::now();
        let res = tokio::time::timeout(SECS(20), net.get(app, path).send()).await.expect("answered").unwrap();
        assert_eq!(res.status(), 206, "{path}");
        assert!(started.elapsed() >= Duration::from_millis(900), "{path}: {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn results_wait_for_count_time_or_both() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2, APP3], json!("t"), "1m").await;
    let results = |q: &str| net.get(APP1, &format!("/v1/tasks/{id}/results{q}")).send();

    // Neither: at once, empty.
    let res = results("").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await, json!([]));

    // Only wait_time: blocks for it, then answers 200 (nothing was counted).
    let started = Instant::now();
    let res = results("?wait_time=400ms").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!(res.status(), 200);

    // Only wait_count: woken by the result itself.
    let waiter = tokio::spawn({
        let req = net.get(APP1, &format!("/v1/tasks/{id}/results?wait_count=1"));
        async move { req.send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "must wait for the result");
    // A claim does not count towards wait_count.
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 201);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "claimed does not count");
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!(42)).await, 204);
    let res = tokio::time::timeout(SECS(10), waiter).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await[0]["body"], 42);

    // Both: time runs out first with fewer than wait_count → 206 with what there is.
    let res = results("?wait_count=2&wait_time=300ms").await.unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(json_of(res).await.as_array().unwrap().len(), 1);
    // Both: count reached first → 200 at once.
    assert_eq!(net.answer(APP3, &id, APP1, "permfailed", json!("no")).await, 201);
    let res = results("?wait_count=2&wait_time=30s").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn todo_long_poll_wakes_on_new_task() {
    let net = Net::start();
    let waiter = tokio::spawn({
        let req = net.get(APP2, "/v1/tasks?filter=todo&wait_count=1");
        async move { req.send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    let id = net.create(APP1, &[APP2], json!("wake up"), "1m").await;
    let res = tokio::time::timeout(SECS(10), waiter).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let tasks = json_of(res).await;
    assert_eq!(tasks[0]["id"], id.as_str());

    // Fewer than wait_count when the time is up → 206.
    let res = net.get(APP2, "/v1/tasks?filter=todo&wait_count=2&wait_time=300ms").send().await.unwrap();
    assert_eq!(res.status(), 206);
    assert_eq!(json_of(res).await.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn get_by_id_waits_for_the_task() {
    let net = Net::start();
    let id = uuid::Uuid::new_v4().to_string();
    let waiter = tokio::spawn({
        let req = net.get(APP2, &format!("/v1/tasks/{id}?wait_time=20s"));
        async move { req.send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = net.post(APP1, "/v1/tasks").json(&task(&id, APP1, &[APP2], json!("late"), "1m")).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let res = tokio::time::timeout(SECS(10), waiter).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await["body"], "late");
    // Never created: 404 after the wait.
    let other = uuid::Uuid::new_v4();
    let res = net.get(APP2, &format!("/v1/tasks/{other}?wait_time=200ms")).send().await.unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn todo_follows_claimed_tempfailed_succeeded() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    let todo_ids = || async {
        let v = json_of(net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap()).await;
        v.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(todo_ids().await, vec![id.clone()]);
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 201);
    assert!(todo_ids().await.is_empty(), "claimed is not to do");
    assert_eq!(net.answer(APP2, &id, APP1, "tempfailed", json!("retry")).await, 204);
    assert_eq!(todo_ids().await, vec![id.clone()], "tempfailed comes back");
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!(1)).await, 204);
    assert!(todo_ids().await.is_empty());
    // claimed after succeeded: acknowledged and ignored.
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 204);
    let results = json_of(net.get(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap()).await;
    assert_eq!(results[0]["status"], "succeeded");
    assert!(todo_ids().await.is_empty());
    // A task for app2 is not on app1's or app3's list.
    let v = json_of(net.get(APP3, "/v1/tasks?filter=todo").send().await.unwrap()).await;
    assert_eq!(v, json!([]));
}

#[tokio::test]
async fn expiry_wakes_waiters_with_410_and_frees_the_task() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("short-lived"), "1s").await;
    let started = Instant::now();
    let res = net.get(APP1, &format!("/v1/tasks/{id}/results?wait_count=1")).send().await.unwrap();
    assert_eq!(res.status(), 410);
    assert!(started.elapsed() < SECS(30));
    assert_eq!(net.get(APP2, &format!("/v1/tasks/{id}")).send().await.unwrap().status(), 404);
    assert_eq!(json_of(net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap()).await, json!([]));
    assert_eq!(json_of(net.get(APP1, &format!("/v1/tasks?from={APP1}")).send().await.unwrap()).await, json!([]));
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!(1)).await, 404);
    assert_eq!(net.broker_tasks().await, 0);
    // The id is free again.
    let res = net.post(APP1, "/v1/tasks").json(&task(&id, APP1, &[APP2], json!(2), "1m")).send().await.unwrap();
    assert_eq!(res.status(), 201);
}

/// Deadlines reach the expiry actor in batches (only a create that finds none pending wakes
/// it): a burst of concurrent creates with mixed TTLs must still all expire, each at its own.
#[tokio::test]
async fn a_burst_of_creates_all_expire() {
    let net = Net::start();
    let ttls = ["1s", "3s"];
    let created =
        futures_util::future::join_all((0..151).map(|i| net.create(APP1, &[APP2], json!(i), ttls[i % ttls.len()])))
            .await;
    assert_eq!(net.broker_tasks().await, created.len() as u64);
    // The 1 s tasks go first; the 3 s ones are still there.
    eventually("the 1 s tasks expire", || async { net.broker_tasks().await == 75 }).await;
    eventually("every task expires", || async { net.broker_tasks().await == 0 }).await;
    let todo = json_of(net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap()).await;
    assert_eq!(todo, json!([]));
}
