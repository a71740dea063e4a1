//! Every row of API.md's endpoint table, over HTTP as an app would, error statuses included.

mod common;

use common::*;
use reqwest::header;
use serde_json::{json, Value};

#[tokio::test]
async fn create_fetch_answer_read() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("what is 6*7?"), "60s").await;

    // The worker finds it with filter=todo, with the remaining ttl in whole seconds.
    let todo = json_of(net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap()).await;
    assert_eq!(todo.as_array().unwrap().len(), 1);
    assert_eq!(todo[0]["id"], id.as_str());
    assert_eq!(todo[0]["body"], "what is 6*7?");
    assert_eq!(todo[0]["metadata"], json!({"kind": "test"}));
    assert_eq!(todo[0]["failure_strategy"], "discard");
    let ttl: u64 = todo[0]["ttl"].as_str().unwrap().parse().unwrap();
    assert!((58..=60).contains(&ttl), "{ttl}");

    // Get by id: creator and recipient see it; another app gets 404, like an unknown id.
    for app in [APP1, APP2] {
        let res = net.get(app, &format!("/v1/tasks/{id}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(json_of(res).await["id"], id.as_str());
    }
    let res = net.get(APP3, &format!("/v1/tasks/{id}")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(net.get(APP1, &format!("/v1/tasks/{unknown}")).send().await.unwrap().status(), 404);

    // Results: 201 new, 204 replaced; claimed never replaces succeeded.
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 201);
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("42")).await, 204);
    assert_eq!(net.answer(APP2, &id, APP1, "claimed", json!(null)).await, 204);
    let results = json_of(net.get(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap()).await;
    assert_eq!(results.as_array().unwrap().len(), 1);
    assert_eq!(results[0]["status"], "succeeded");
    assert_eq!(results[0]["body"], "42");
    assert_eq!(results[0]["from"], APP2);

    // Listings by from and to.
    let from = json_of(net.get(APP1, &format!("/v1/tasks?from={APP1}")).send().await.unwrap()).await;
    assert_eq!(from[0]["id"], id.as_str());
    let to = json_of(net.get(APP2, &format!("/v1/tasks?to={APP2}")).send().await.unwrap()).await;
    assert_eq!(to[0]["id"], id.as_str());
    // Settled: no longer to do.
    let todo = json_of(net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap()).await;
    assert_eq!(todo, json!([]));
}

#[tokio::test]
async fn generated_id_location_and_any_json_body() {
    let net = Net::start();
    let mut t = task("x", APP1, &[APP2], json!({"nested": [1, 2, {"x": null}]}), "1m");
    t.as_object_mut().unwrap().remove("id");
    let res = net.post(APP1, "/v1/tasks").json(&t).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let location = res.headers()[header::LOCATION].to_str().unwrap().to_string();
    let id = location.strip_prefix("/v1/tasks/").unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
    let got = json_of(net.get(APP2, &location).send().await.unwrap()).await;
    assert_eq!(got["body"], json!({"nested": [1, 2, {"x": null}]}));
    // The creator's own proxy reads its task back.
    let own = json_of(net.get(APP1, &location).send().await.unwrap()).await;
    assert_eq!(own["body"], got["body"]);
}

#[tokio::test]
async fn authentication() {
    let net = Net::start();
    let url = format!("{}/v1/tasks?filter=todo", net.proxy1);
    for auth in [
        None,
        Some(format!("ApiKey {APP1} wrong")),
        Some(format!("ApiKey app9.proxy1.broker {KEY}")),
        Some(format!("Bearer {KEY}")),
        Some("ApiKey".to_string()),
    ] {
        let mut req = net.http.get(&url);
        if let Some(a) = &auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{auth:?}");
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "ApiKey");
        assert!(json_of(res).await["error"].is_string());
    }
    // An app of proxy2 is unknown at proxy1.
    let res = net.http.get(&url).header(header::AUTHORIZATION, format!("ApiKey {APP2} {KEY}")).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn create_errors() {
    let net = Net::start();
    let post =
        |body: String| net.post(APP1, "/v1/tasks").header(header::CONTENT_TYPE, "application/json").body(body).send();
    let status = |id: &str, ttl: serde_json::Value| {
        serde_json::to_string(&json!({"id": id, "from": APP1, "to": [APP2], "body": "b", "ttl": ttl})).unwrap()
    };
    let id = uuid::Uuid::new_v4().to_string();

    for (body, why) in [
        ("{not json".to_string(), "malformed JSON"),
        ("[]".to_string(), "wrong shape"),
        (
            serde_json::to_string(&json!({"id": "nope", "from": APP1, "to": [APP2], "ttl": "1m"})).unwrap(),
            "bad task id",
        ),
        (serde_json::to_string(&json!({"from": "bad id!", "to": [APP2], "ttl": "1m"})).unwrap(), "bad from"),
        (serde_json::to_string(&json!({"from": APP1, "to": ["app2..broker"], "ttl": "1m"})).unwrap(), "bad to"),
        (serde_json::to_string(&json!({"from": APP1, "to": [], "ttl": "1m"})).unwrap(), "no recipients"),
        (
            serde_json::to_string(&json!({"from": APP1, "to": ["app2.proxy2.other"], "ttl": "1m"})).unwrap(),
            "a recipient of another broker",
        ),
        (status(&id, json!("inf")), "ttl inf"),
        (status(&id, json!("-5s")), "negative ttl"),
        (status(&id, json!("99999d")), "huge ttl"),
        (status(&id, json!(1e300)), "huge numeric ttl"),
        (status(&id, json!("soon")), "non-numeric ttl"),
    ] {
        let res = post(body).await.unwrap();
        assert_eq!(res.status(), 400, "{why}");
        let err = json_of(res).await["error"].as_str().unwrap().to_string();
        assert!(!err.is_empty(), "{why}");
    }
    let res =
        post(serde_json::to_string(&json!({"from": "bad id!", "to": [APP2], "ttl": "1m"})).unwrap()).await.unwrap();
    assert!(json_of(res).await["error"].as_str().unwrap().contains("bad id!"), "the message names the bad id");

    // 403: from is not the caller.
    let res = net.post(APP1, "/v1/tasks").json(&task(&id, APP3, &[APP2], json!(1), "1m")).send().await.unwrap();
    assert_eq!(res.status(), 403);
    // 424: a recipient without a certificate; the body is the array of proxy ids.
    let res = net
        .post(APP1, "/v1/tasks")
        .json(&task(&id, APP1, &[APP2, "app1.proxy9.broker"], json!(1), "1m"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 424);
    assert_eq!(json_of(res).await, json!(["proxy9.broker"]));
    // 413: an 11 MiB body.
    let big = "x".repeat(11 * 1024 * 1024);
    let res = net.post(APP1, "/v1/tasks").json(&task(&id, APP1, &[APP2], json!(big), "1m")).send().await.unwrap();
    assert_eq!(res.status(), 413);
    // 409: an unexpired task with this id.
    let res = net.post(APP1, "/v1/tasks").json(&task(&id, APP1, &[APP2], json!(1), "1m")).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let res = net.post(APP1, "/v1/tasks").json(&task(&id, APP1, &[APP2], json!(2), "1m")).send().await.unwrap();
    assert_eq!(res.status(), 409);

    // Nothing above stopped a process or lost the stored task.
    assert_eq!(net.broker_tasks().await, 1);
    let got = json_of(net.get(APP2, &format!("/v1/tasks/{id}")).send().await.unwrap()).await;
    assert_eq!(got["body"], 1);
    assert_eq!(net.http.get(format!("{}/v1/health", net.proxy1)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn read_errors() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    let code = |res: reqwest::Response| res.status().as_u16();
    assert_eq!(code(net.get(APP1, "/v1/tasks").send().await.unwrap()), 400, "neither from nor to");
    assert_eq!(code(net.get(APP1, &format!("/v1/tasks?from={APP2}")).send().await.unwrap()), 403);
    assert_eq!(code(net.get(APP1, &format!("/v1/tasks?to={APP2}")).send().await.unwrap()), 403);
    assert_eq!(code(net.get(APP1, "/v1/tasks?filter=all").send().await.unwrap()), 400);
    assert_eq!(code(net.get(APP1, "/v1/tasks?filter=todo&wait_time=inf").send().await.unwrap()), 400);
    assert_eq!(code(net.get(APP1, "/v1/tasks?filter=todo&wait_count=-1").send().await.unwrap()), 400);
    assert_eq!(code(net.get(APP1, "/v1/tasks/not-a-uuid").send().await.unwrap()), 400);
    assert_eq!(code(net.get(APP1, &format!("/v1/tasks/{id}?wait_count=2")).send().await.unwrap()), 400);
    assert_eq!(code(net.get(APP2, &format!("/v1/tasks/{id}/results")).send().await.unwrap()), 403, "not the creator");
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(code(net.get(APP1, &format!("/v1/tasks/{unknown}/results")).send().await.unwrap()), 404);
    assert_eq!(code(net.get(APP1, "/v1/nothing").send().await.unwrap()), 404);
}

#[tokio::test]
async fn result_errors() {
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("t"), "1m").await;
    let result = |from: &str, task: &str| json!({"from": from, "to": [APP1], "task": task, "status": "succeeded", "body": "x", "metadata": null});
    let put = |app: &str, path_task: &str, path_app: &str, body: serde_json::Value| {
        net.put(app, &format!("/v1/tasks/{path_task}/results/{path_app}")).json(&body).send()
    };
    // Path and body disagree.
    assert_eq!(put(APP2, &id, APP2, result(APP2, &uuid::Uuid::new_v4().to_string())).await.unwrap().status(), 400);
    assert_eq!(put(APP2, &id, APP1, result(APP2, &id)).await.unwrap().status(), 400);
    // from is not the caller.
    assert_eq!(put(APP2, &id, APP1, result(APP1, &id)).await.unwrap().status(), 403);
    // The caller is not among the task's recipients.
    assert_eq!(put(APP3, &id, APP3, result(APP3, &id)).await.unwrap().status(), 403);
    // Unknown task.
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(put(APP2, &unknown, APP2, result(APP2, &unknown)).await.unwrap().status(), 404);
    // Malformed JSON and a bad status.
    let res = net
        .put(APP2, &format!("/v1/tasks/{id}/results/{APP2}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let mut bad = result(APP2, &id);
    bad["status"] = json!("done");
    assert_eq!(put(APP2, &id, APP2, bad).await.unwrap().status(), 400);
    // And a good one still works.
    assert_eq!(put(APP2, &id, APP2, result(APP2, &id)).await.unwrap().status(), 201);
}

#[tokio::test]
async fn health_answers_get_and_head() {
    let net = Net::start();
    for base in [&net.proxy1, &net.proxy2, &net.broker] {
        let res = net.http.get(format!("{base}/v1/health")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(json_of(res).await["summary"], "healthy");
        assert_eq!(net.http.head(format!("{base}/v1/health")).send().await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn bodies_arrive_as_sent_and_streams_stay_one_line_each() {
    let net = Net::start();
    let id = uuid::Uuid::new_v4().to_string();
    // Sent pretty-printed, with escapes and numbers a float would round.
    let body = "{\n  \"text\": \"caf\\u00e9 \\\"quoted\\\"\\nline\",\n  \"big\": 12345678901234567890,\n  \"list\": [1.5e300, -0.0]\n}";
    let want: serde_json::Value = serde_json::from_str(body).unwrap();
    let sent = format!(r#"{{"id":"{id}","from":"{APP1}","to":["{APP2}"],"ttl":"1m","metadata":null,"body":{body}}}"#);
    let res = net.post(APP1, "/v1/tasks").header(header::CONTENT_TYPE, "application/json").body(sent).send().await;
    assert_eq!(res.unwrap().status(), 201);
    let got = net.get(APP2, &format!("/v1/tasks/{id}")).send().await.unwrap().text().await.unwrap();
    assert!(got.contains("12345678901234567890"), "big numbers pass untouched: {got}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&got).unwrap()["body"], want);
    let mut todo = Sse::new(net.events(APP2, "/v1/tasks?filter=todo").send().await.unwrap());
    assert_eq!(todo.next_event(SECS(10)).await.unwrap().json()["body"], want);

    // A result sent pretty-printed reaches both a lone stream and one sharing a hub intact.
    let results_stream = || async {
        let req = net.events(APP1, &format!("/v1/tasks/{id}/results"));
        Sse::new(req.send().await.unwrap())
    };
    let streams = [results_stream().await, results_stream().await];
    let result = format!(r#"{{"from":"{APP2}","to":["{APP1}"],"task":"{id}","status":"succeeded","body":{body}}}"#);
    let res = net
        .put(APP2, &format!("/v1/tasks/{id}/results/{APP2}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(result)
        .send()
        .await;
    assert_eq!(res.unwrap().status(), 201);
    for mut s in streams {
        assert_eq!(s.next_event(SECS(10)).await.unwrap().json()["body"], want);
    }
    // A number no float holds, on lines of its own: kept digit for digit, nothing breaks.
    let huge = uuid::Uuid::new_v4().to_string();
    let sent =
        format!(r#"{{"id":"{huge}","from":"{APP1}","to":["{APP2}"],"ttl":"1m","body":[{}1e400{}]}}"#, '\n', '\n');
    let res = net.post(APP1, "/v1/tasks").header(header::CONTENT_TYPE, "application/json").body(sent).send().await;
    assert_eq!(res.unwrap().status(), 201);
    let got = net.get(APP2, &format!("/v1/tasks/{huge}")).send().await.unwrap().text().await.unwrap();
    assert!(got.contains(r#""body":[ 1e400 ]"#), "{got}");

    // Without a body: a task's is null, a result has none.
    let bare = uuid::Uuid::new_v4().to_string();
    let sent = format!(r#"{{"id":"{bare}","from":"{APP1}","to":["{APP2}"],"ttl":"1m"}}"#);
    let res = net.post(APP1, "/v1/tasks").header(header::CONTENT_TYPE, "application/json").body(sent).send().await;
    assert_eq!(res.unwrap().status(), 201);
    assert_eq!(json_of(net.get(APP2, &format!("/v1/tasks/{bare}")).send().await.unwrap()).await["body"], json!(null));
    assert_eq!(net.answer(APP2, &bare, APP1, "claimed", json!(null)).await, 201);
    let results = json_of(net.get(APP1, &format!("/v1/tasks/{bare}/results")).send().await.unwrap()).await;
    assert_eq!(results[0]["body"], json!(null));
}

/// A client that stops sending its request body is answered 408 after `BODY_STALL`, rather than
/// holding its buffer and connection for good; the proxy keeps serving.
#[tokio::test]
async fn a_stalled_body_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let net = Net::start();
    let authority = net.proxy1.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nhost: {authority}\r\nauthorization: ApiKey {APP1} {KEY}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"from\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0; 512];
    let limit = photon::http::body::BODY_STALL + SECS(10);
    let n = tokio::time::timeout(limit, tcp.read(&mut answer)).await.expect("answered").unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= photon::http::body::BODY_STALL - SECS(1));
    assert_eq!(net.http.get(format!("{}/v1/health", net.proxy1)).send().await.unwrap().status(), 200);
}

/// A burst of task creations: 40 new ids, 8 of them sent twice. Returns each upload's status
/// and body, in the order sent.
async fn create_burst(net: &Net, ids: &[uuid::Uuid]) -> Vec<(u16, String)> {
    let sends = ids.iter().chain(&ids[..8]).map(|id| async move {
        let t = task(&id.to_string(), APP1, &[APP2], json!({"n": id.to_string()}), "60s");
        let res = net.post(APP1, "/v1/tasks").json(&t).send().await.unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    });
    futures_util::future::join_all(sends).await
}

/// How many uploads reached the broker: on their own, and inside batches (and how many batches).
fn uploads_seen(relay: &common::relay::Relay) -> (usize, usize, usize) {
    let single = relay.requests_to("POST", "/v1/tasks").len() + relay.requests_to("PUT", "/v1/tasks/").len();
    let batches = relay.requests_to("POST", "/v1/batch");
    // Each upload in a batch opens with its kind (the proxy writes them so; sealed bodies are
    // base64 and the tests' metadata never holds these words).
    let batched = batches
        .iter()
        .map(|b| {
            let text = String::from_utf8_lossy(&b.body);
            text.matches("{\"task\":").count() + text.matches("{\"result\":").count()
        })
        .sum();
    (single, batched, batches.len())
}

/// Creations and results that pile up while the broker is busy go to it together (`POST
/// /v1/batch`, one signed request), each exactly once, and each app still gets its own answer:
/// a duplicate id its 409, every other task its 201 and its results.
#[tokio::test]
async fn concurrent_uploads_travel_in_batches_with_their_own_answers() {
    // Through a relay: it counts what reaches the broker, and its slower forwarding makes the
    // uploads pile up behind the ones in flight.
    let net = Net::start_with(Options { relay: true, ..Options::default() });
    let relay = net.relay.as_deref().unwrap();
    let mut created = Vec::new();
    for _ in 0..5 {
        let ids: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::new_v4()).collect();
        let answers = create_burst(&net, &ids).await;
        for j in 0..8 {
            let mut pair = [&answers[j], &answers[40 + j]];
            pair.sort_by_key(|(status, _)| *status);
            assert_eq!((pair[0].0, pair[1].0), (201, 409), "one of the two sends of {} is stored", ids[j]);
            assert!(serde_json::from_str::<Value>(&pair[1].1).unwrap()["error"].is_string(), "{:?}", pair[1]);
        }
        assert_eq!(answers.iter().filter(|(s, _)| *s == 201).count(), 40, "{answers:?}");
        created.extend(ids);
        if uploads_seen(relay).2 > 0 {
            break;
        }
    }
    let (single, batched, batches) = uploads_seen(relay);
    assert!(batches > 0, "no burst was batched");
    assert_eq!(single + batched, created.len() / 40 * 48, "every upload reached the broker exactly once");

    // The worker answers them all at once: each result reaches the broker once (alone or in a
    // batch) and its creator.
    let todo = json_of(net.get(APP2, "/v1/tasks?filter=todo&wait_count=1000&wait_time=2s").send().await.unwrap()).await;
    assert_eq!(todo.as_array().unwrap().len(), created.len());
    let net = &net;
    let puts = todo.as_array().unwrap().iter().map(|t| {
        let id = t["id"].as_str().unwrap().to_owned();
        let body = json!({"echo": t["body"]["n"]});
        async move { net.answer(APP2, &id, APP1, "succeeded", body).await }
    });
    let statuses = futures_util::future::join_all(puts).await;
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    let (single, batched, _) = uploads_seen(relay);
    assert_eq!(single + batched, created.len() / 40 * 48 + created.len(), "every result reached the broker once");
    for id in &created {
        let results = json_of(net.get(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap()).await;
        assert_eq!(results.as_array().unwrap().len(), 1, "{id}");
        assert_eq!(results[0]["body"], json!({"echo": id.to_string()}), "{id}");
    }
}

/// A broker without the batch endpoint (an older version, `404`) gets each upload on its own:
/// none is lost, and the proxy stops trying batches.
#[tokio::test]
async fn uploads_go_on_their_own_to_a_broker_without_batches() {
    let net = Net::start_with(Options { relay: true, ..Options::default() });
    let relay = net.relay.as_deref().unwrap();
    relay.without_endpoint("POST /v1/batch");
    let mut created = 0;
    for _ in 0..5 {
        let ids: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::new_v4()).collect();
        let answers = create_burst(&net, &ids).await;
        assert_eq!(answers.iter().filter(|(s, _)| *s == 201).count(), 40, "{answers:?}");
        assert_eq!(answers.iter().filter(|(s, _)| *s == 409).count(), 8, "{answers:?}");
        created += 40;
        if uploads_seen(relay).2 > 0 {
            break;
        }
    }
    let (_, _, tried) = uploads_seen(relay);
    assert!(tried > 0, "no burst tried a batch");
    assert_eq!(net.broker_tasks().await, created as u64);
    let ids: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::new_v4()).collect();
    let answers = create_burst(&net, &ids).await;
    assert_eq!(answers.iter().filter(|(s, _)| *s == 201).count(), 40, "{answers:?}");
    assert_eq!(uploads_seen(relay).2, tried, "no batch is tried again");
}

/// A batch the broker can't read whole is sent again upload by upload, and each gets the answer
/// its own request gets. Here one task's metadata is nested as deep as its own request may be,
/// which is too deep inside a batch (two levels more).
#[tokio::test]
async fn an_upload_that_spoils_its_batch_still_gets_its_own_answer() {
    let net = Net::start_with(Options { relay: true, ..Options::default() });
    let relay = net.relay.as_deref().unwrap();
    let deep = |depth: usize| -> Value {
        serde_json::from_str(&format!("{}{}", "[".repeat(depth), "]".repeat(depth))).unwrap()
    };
    let mut deep_ids = Vec::new();
    let mut sent = 0;
    for _ in 0..5 {
        let ids: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::new_v4()).collect();
        let sends = ids.iter().enumerate().map(|(i, id)| {
            let mut t = task(&id.to_string(), APP1, &[APP2], json!(i), "60s");
            if i == 20 {
                t["metadata"] = deep(126);
            }
            let net = &net;
            async move { net.post(APP1, "/v1/tasks").json(&t).send().await.unwrap().status().as_u16() }
        });
        let statuses = futures_util::future::join_all(sends).await;
        assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
        sent += 40;
        deep_ids.push(ids[20].to_string());
        let spoiled = relay.requests_to("POST", "/v1/batch").iter().any(|b| {
            let text = String::from_utf8_lossy(&b.body);
            deep_ids.iter().any(|id| text.contains(id.as_str()))
        });
        if spoiled {
            let (single, batched, _) = uploads_seen(relay);
            assert!(single + batched > sent, "the spoiled batch's uploads were sent again on their own");
            assert_eq!(net.broker_tasks().await, sent as u64, "each stored once");
            return;
        }
    }
    panic!("no deep task was sent in a batch");
}
