//! "Broker in the middle": a relay between the proxies and the broker alters, swaps and replays
//! what it forwards, one case per test. Each is refused at the receiving proxy (counted on its
//! health endpoint) or at the broker, and the app never sees it. Each test also shows the
//! honest path delivers, so a refusal is the tampering's doing.

mod common;

use common::{relay::Relay, *};
use photon::{
    crypto::{
        ca,
        e2e::{self, pair_keys, Party},
        RootCert,
    },
    wire::{broker::Envelope, AppId, FailureStrategy, ProxyId},
};
use serde_json::{json, Value};
use std::time::Duration;

fn mitm() -> Net {
    Net::start_with(Options { relay: true, ..Options::default() })
}

fn relay(net: &Net) -> &Relay {
    net.relay.as_deref().unwrap()
}

async fn todo(net: &Net, app: &str) -> Vec<Value> {
    let res = net.get(app, "/v1/tasks?filter=todo").send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn results(net: &Net, app: &str, task: &str) -> Vec<Value> {
    let res = net.get(app, &format!("/v1/tasks/{task}/results")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn refused(net: &Net, proxy: &str, reason: &str) -> u64 {
    net.refused(proxy).await[reason].as_u64().unwrap_or(0)
}

/// Applies `f` to every task in the broker's answers to task listings.
fn alter_listed_tasks(net: &Net, mut f: impl FnMut(&mut Value) + Send + 'static) {
    relay(net).rewrite_answers(move |what, v| {
        if what.starts_with("GET /v1/tasks?") {
            v.as_array_mut().unwrap().iter_mut().for_each(&mut f);
        }
    });
}

/// Alters task `id` (its metadata) in every listing the broker hands out: its recipient's proxy
/// refuses it as forged, each time.
fn alter_task_on_the_way(net: &Net, id: String) {
    alter_listed_tasks(net, move |t| {
        if t["id"] == json!(id) {
            t["metadata"] = json!("altered");
        }
    });
}

/// Applies `f` to every result in the broker's answers to result reads.
fn alter_results(net: &Net, mut f: impl FnMut(&mut Value) + Send + 'static) {
    relay(net).rewrite_answers(move |what, v| {
        if what.starts_with("GET /v1/tasks/") && what.contains("/results") {
            v.as_array_mut().unwrap().iter_mut().for_each(&mut f);
        }
    });
}

/// A task from app1 to app2 whose listing is altered by `f`: app2 gets nothing, proxy2 counts
/// one refusal for `reason`; once the relay is honest again, app2 gets the task.
async fn task_refused_when(f: impl FnMut(&mut Value) + Send + 'static, reason: &str) {
    let net = mitm();
    let id = net.create(APP1, &[APP2], json!("payload"), "60s").await;
    alter_listed_tasks(&net, f);
    assert!(todo(&net, APP2).await.is_empty(), "the app must not see an altered task");
    assert_eq!(refused(&net, &net.proxy2, reason).await, 1, "{}", net.refused(&net.proxy2).await);
    relay(&net).honest();
    let tasks = todo(&net, APP2).await;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["id"], id.as_str());
    assert_eq!(tasks[0]["body"], "payload");
}

#[tokio::test]
async fn altered_body_ciphertext_is_refused() {
    task_refused_when(
        |t| {
            let ct = t["body"]["ct"].as_str().unwrap().to_owned();
            let first = if ct.starts_with('A') { "B" } else { "A" };
            t["body"]["ct"] = Value::String(format!("{first}{}", &ct[1..]));
        },
        "forged",
    )
    .await;
}

#[tokio::test]
async fn altered_to_is_refused() {
    task_refused_when(|t| t["to"].as_array_mut().unwrap().push(json!(APP3)), "forged").await;
}

#[tokio::test]
async fn altered_from_is_refused() {
    task_refused_when(|t| t["from"] = json!("app9.proxy1.broker"), "forged").await;
}

#[tokio::test]
async fn altered_task_id_is_refused() {
    task_refused_when(|t| t["id"] = json!(uuid::Uuid::new_v4()), "forged").await;
}

#[tokio::test]
async fn stretched_ttl_is_refused() {
    task_refused_when(|t| t["ttl_ms"] = json!(t["ttl_ms"].as_u64().unwrap() * 100), "ttl_extended").await;
}

#[tokio::test]
async fn altered_metadata_is_refused() {
    task_refused_when(|t| t["metadata"] = json!({"kind": "altered"}), "forged").await;
}

#[tokio::test]
async fn altered_failure_strategy_is_refused() {
    task_refused_when(
        |t| t["failure_strategy"] = json!({"retry": {"backoff_millisecs": 1, "max_tries": 99}}),
        "forged",
    )
    .await;
}

#[tokio::test]
async fn altered_result_status_is_refused() {
    let net = mitm();
    let id = net.create(APP1, &[APP2], json!("q"), "60s").await;
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("a")).await, 201);
    alter_results(&net, |r| r["status"] = json!("permfailed"));
    assert!(results(&net, APP1, &id).await.is_empty());
    assert_eq!(refused(&net, &net.proxy1, "forged").await, 1);
    relay(&net).honest();
    let got = results(&net, APP1, &id).await;
    assert_eq!((got[0]["status"].as_str(), got[0]["body"].as_str()), (Some("succeeded"), Some("a")));
}

#[tokio::test]
async fn bodies_swapped_between_tasks_are_refused() {
    let net = mitm();
    net.create(APP1, &[APP2], json!("first"), "60s").await;
    net.create(APP1, &[APP2], json!("second"), "60s").await;
    relay(&net).rewrite_answers(|what, v| {
        if what.starts_with("GET /v1/tasks?") {
            let tasks = v.as_array_mut().unwrap();
            let body0 = tasks[0]["body"].take();
            tasks[0]["body"] = std::mem::replace(&mut tasks[1]["body"], body0);
        }
    });
    assert!(todo(&net, APP2).await.is_empty());
    assert_eq!(refused(&net, &net.proxy2, "forged").await, 2);
    relay(&net).honest();
    assert_eq!(todo(&net, APP2).await.len(), 2);
}

#[tokio::test]
async fn old_result_replayed_into_another_task_is_refused() {
    let net = mitm();
    let x = net.create(APP1, &[APP2], json!("x"), "60s").await;
    let y = net.create(APP1, &[APP2], json!("y"), "60s").await;
    assert_eq!(net.answer(APP2, &x, APP1, "succeeded", json!("answer to x")).await, 201);
    let captured = relay(&net).requests_to("PUT", &format!("/v1/tasks/{x}/results/"));
    let old: Value = serde_json::from_slice(&captured[0].body).unwrap();
    // Moved into task y, claiming to be y's.
    let (moved, y2) = (old.clone(), y.clone());
    relay(&net).rewrite_answers(move |what, v| {
        if what.starts_with(&format!("GET /v1/tasks/{y2}/results")) {
            let mut r = moved.clone();
            r["task"] = json!(y2);
            *v = json!([r]);
        }
    });
    assert!(results(&net, APP1, &y).await.is_empty());
    assert_eq!(refused(&net, &net.proxy1, "forged").await, 1);
    // Handed over unchanged, as if it were y's.
    let (unchanged, y3) = (old, y.clone());
    relay(&net).rewrite_answers(move |what, v| {
        if what.starts_with(&format!("GET /v1/tasks/{y3}/results")) {
            *v = json!([unchanged.clone()]);
        }
    });
    assert!(results(&net, APP1, &y).await.is_empty());
    assert_eq!(refused(&net, &net.proxy1, "wrong_task").await, 1);
    relay(&net).honest();
    assert_eq!(results(&net, APP1, &x).await[0]["body"], "answer to x");
}

#[tokio::test]
async fn captured_request_replayed_is_refused_by_the_broker() {
    let net = mitm();
    net.create(APP1, &[APP2], json!("once"), "60s").await;
    let post = relay(&net).requests_to("POST", "/v1/tasks").pop().unwrap();
    let mut replay = net.http.post(format!("{}{}", net.broker, post.path)).body(post.body.clone());
    for (k, v) in &post.headers {
        replay = replay.header(k, v);
    }
    let res = replay.send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(json_of(res).await["error"].as_str().unwrap().contains("replay"));
    assert_eq!(net.broker_tasks().await, 1);
}

#[tokio::test]
async fn request_altered_on_the_way_is_refused_by_the_broker() {
    let net = mitm();
    relay(&net).rewrite_requests(|what, v| {
        if what.starts_with("POST /v1/tasks") {
            v["to"] = json!([APP3]);
        }
    });
    let res =
        net.post(APP1, "/v1/tasks").json(&task(&uuid::Uuid::new_v4().to_string(), APP1, &[APP2], json!(1), "60s"));
    let res = res.send().await.unwrap();
    assert_eq!(res.status(), 502, "the broker refuses the request; the app hears of it");
    assert_eq!(net.broker_tasks().await, 0, "nothing stored");
    relay(&net).honest();
    net.create(APP1, &[APP2], json!(1), "60s").await;
    assert_eq!(net.broker_tasks().await, 1);
}

/// proxy2 is a legitimate recipient of a task to app2 and app3 (on proxy1). With what it holds
/// it re-encrypts the body; proxy1 refuses that for app3.
#[tokio::test]
async fn a_recipient_cannot_forge_for_another() {
    let net = mitm();
    net.create(APP1, &[APP2, APP3], json!("genuine"), "60s").await;
    let root = RootCert::load(&net.pki.join(ca::ROOT_CERT)).unwrap();
    let now = photon::crypto::unix_millis() as i64 / 1000;
    let cert = |p: &str| {
        let pem = std::fs::read_to_string(net.pki.join(format!("certs/{p}.crt"))).unwrap();
        root.verify(&pem, now).unwrap()
    };
    let (p1, p2) = (ProxyId::parse("proxy1.broker").unwrap(), ProxyId::parse("proxy2.broker").unwrap());
    let (c1, c2) = (cert("proxy1.broker"), cert("proxy2.broker"));
    let key2_pem = std::fs::read_to_string(net.pki.join("proxy2.broker.priv.pem")).unwrap();
    let secret2: p256::SecretKey = p256::pkcs8::DecodePrivateKey::from_pkcs8_pem(&key2_pem).unwrap();
    // proxy2's key from proxy1 (proxy1 → proxy2).
    let (_, from_p1) =
        pair_keys(&secret2, &Party { proxy: &p2, key: &c2.public_key }, &Party { proxy: &p1, key: &c1.public_key });
    relay(&net).rewrite_answers(move |what, v| {
        if !what.starts_with("GET /v1/tasks?") {
            return;
        }
        for t in v.as_array_mut().unwrap() {
            let env: Envelope = serde_json::from_value(t["body"].clone()).unwrap();
            let (from, to) = (
                AppId::parse(t["from"].as_str().unwrap()).unwrap(),
                vec![AppId::parse(APP2).unwrap(), AppId::parse(APP3).unwrap()],
            );
            let subject = e2e::Subject::Task {
                id: t["id"].as_str().unwrap().parse().unwrap(),
                from: &from,
                to: &to,
                failure_strategy: &FailureStrategy::Discard,
                metadata: &t["metadata"],
            };
            let forged = e2e::reseal_as_recipient(&env, &subject, &p2, &from_p1, b"\"forged\"").unwrap();
            t["body"] = serde_json::to_value(forged).unwrap();
        }
    });
    // proxy1 refuses it for app3 (and proxy2's own wrapped key binds the original ciphertext too).
    assert!(todo(&net, APP3).await.is_empty());
    assert!(todo(&net, APP2).await.is_empty());
    assert_eq!(refused(&net, &net.proxy1, "forged").await, 1);
    relay(&net).honest();
    assert_eq!(todo(&net, APP3).await[0]["body"], "genuine");
}

/// On an event stream, an altered task is left out and the stream goes on with the next one.
#[tokio::test]
async fn altered_task_on_a_stream_is_skipped() {
    let net = mitm();
    let mut n = 0;
    relay(&net).rewrite_answers(move |what, v| {
        if what.contains("stream=1") && v.get("new_task").is_some() {
            n += 1;
            if n == 1 {
                v["new_task"]["task"]["metadata"] = json!("altered");
            }
        }
    });
    let bad = net.create(APP1, &[APP2], json!("first"), "60s").await;
    let good = net.create(APP1, &[APP2], json!("second"), "60s").await;
    let res = net.events(APP2, "/v1/tasks?filter=todo").send().await.unwrap();
    let mut sse = Sse::new(res);
    let ev = sse.next_event(SECS(10)).await.unwrap();
    assert_eq!(ev.event, "new_task");
    assert_eq!(ev.json()["id"], good.as_str(), "the altered {bad} is not delivered");
    assert_eq!(refused(&net, &net.proxy2, "forged").await, 1);
}

/// Unsealed or garbled bodies from the broker: refused, counted, the proxy keeps serving.
#[tokio::test]
async fn bad_crypto_input_is_refused_and_the_proxy_keeps_serving() {
    let net = mitm();
    net.create(APP1, &[APP2], json!("fine"), "60s").await;
    type Garble = Box<dyn Fn(&mut Value) + Send + Sync>;
    let cases: Vec<(&str, Garble)> = vec![
        ("malformed", Box::new(|t: &mut Value| t["body"] = json!({"alg": "plain", "data": "hi"}))),
        ("malformed", Box::new(|t: &mut Value| t["body"]["ct"] = json!("not base64 at all!"))),
        ("malformed", Box::new(|t: &mut Value| t["body"]["n"] = json!("AAAA"))),
        (
            "forged",
            Box::new(|t: &mut Value| {
                let ct = t["body"]["ct"].as_str().unwrap();
                t["body"]["ct"] = json!(ct[..ct.len() - 8].to_owned());
            }),
        ),
        ("unknown_key", Box::new(|t: &mut Value| t["body"]["sk"] = json!("AAAAAAAAAAAAAAAAAAAAAA=="))),
        ("not_for_us", Box::new(|t: &mut Value| t["body"]["keys"] = json!([]))),
        ("malformed", Box::new(|t: &mut Value| t["body"] = json!("a string"))),
    ];
    let cases = std::sync::Arc::new(cases);
    for i in 0..cases.len() {
        let c = cases.clone();
        alter_listed_tasks(&net, move |t| (c[i].1)(t));
        assert!(todo(&net, APP2).await.is_empty(), "case {i}");
    }
    let counts = net.refused(&net.proxy2).await;
    for (reason, _) in cases.iter() {
        assert!(counts[reason].as_u64().is_some_and(|n| n >= 1), "{reason}: {counts}");
    }
    assert_eq!(counts.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>(), cases.len() as u64);
    relay(&net).honest();
    assert_eq!(todo(&net, APP2).await[0]["body"], "fine");
    let health = net.http.get(format!("{}/v1/health", net.proxy2)).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Metadata is bound into the seal and re-serialized by the broker: numbers that are hard to
/// round-trip must still come out identical, or honest messages would be refused.
#[tokio::test]
async fn honest_metadata_with_awkward_numbers_opens() {
    let net = mitm();
    let mut t = task(&uuid::Uuid::new_v4().to_string(), APP1, &[APP2], json!("b"), "60s");
    let metadata = json!({"f": [130.65331632653061, 0.1, 1e-300, 2.2250738585072014e-308, 9007199254740993u64, -0.0],
        "unicode": "é\u{1F600}\\\"", "nested": {"z": 1, "a": [null, true]}});
    t["metadata"] = metadata.clone();
    assert_eq!(net.post(APP1, "/v1/tasks").json(&t).send().await.unwrap().status(), 201);
    let tasks = todo(&net, APP2).await;
    assert_eq!(tasks.len(), 1, "{}", net.refused(&net.proxy2).await);
    assert_eq!(tasks[0]["metadata"], metadata);
}

/// A task the worker's proxy refuses does not end the worker's wait (it stays on the broker's
/// list, so it would, again and again: a tight loop of polls): the wait goes on until a task
/// that opens comes, or ends when its time is up, with 206.
#[tokio::test]
async fn a_refused_task_does_not_end_a_workers_wait() {
    let net = mitm();
    alter_task_on_the_way(&net, net.create(APP1, &[APP2], json!("altered on the way"), "60s").await);
    let started = std::time::Instant::now();
    let res = net.get(APP2, "/v1/tasks?filter=todo&wait_count=1&wait_time=1500ms").send().await.unwrap();
    assert_eq!(res.status(), 206);
    assert!(started.elapsed() >= Duration::from_millis(1400), "ended after {:?}", started.elapsed());
    assert_eq!(json_of(res).await, json!([]));
    assert!(refused(&net, &net.proxy2, "forged").await >= 1);

    let waiter = tokio::spawn(net.get(APP2, "/v1/tasks?filter=todo&wait_count=1&wait_time=10s").send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the refused task does not end the wait");
    let good = net.create(APP1, &[APP2], json!("fine"), "60s").await;
    let res = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let tasks: Vec<Value> = res.json().await.unwrap();
    assert_eq!(tasks.iter().map(|t| t["id"].clone()).collect::<Vec<_>>(), vec![json!(good)]);
}

/// On a task stream with `wait_count`, only tasks handed to the app count: an altered one
/// does not end the stream (which the app would see as broken, and get the altered task
/// again on reconnecting). A stream with `wait_count=0` ends at once, cleanly.
#[tokio::test]
async fn a_refused_task_does_not_count_on_a_stream() {
    let net = mitm();
    let bad = net.create(APP1, &[APP2], json!("altered on the way"), "60s").await;
    relay(&net).rewrite_answers(move |what, v| {
        if what.contains("stream=1") && v["new_task"]["task"]["id"] == json!(bad) {
            v["new_task"]["task"]["metadata"] = json!("altered");
        }
    });
    let open = |q: &str| net.events(APP2, &format!("/v1/tasks?filter=todo{q}")).send();
    let mut sse = Sse::new(open("&wait_count=1").await.unwrap());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sse.next_event(SECS(10))).await.is_err(),
        "nothing for the app yet, and no end"
    );
    let good = net.create(APP1, &[APP2], json!("fine"), "60s").await;
    let ev = sse.next_event(SECS(10)).await.unwrap();
    assert_eq!((ev.event.as_str(), ev.json()["id"].clone()), ("new_task", json!(good)));
    assert_eq!(sse.next_event(SECS(10)).await, None, "the count is met: the stream ends, without an error");

    for q in ["&wait_count=0", "&wait_count=0&last_event_id=999999999"] {
        let mut sse = Sse::new(open(q).await.unwrap());
        assert_eq!(sse.next_event(SECS(10)).await, None, "{q}");
    }
}

/// A result the creator's proxy refuses does not count towards `wait_count`, on a long-poll
/// (which would otherwise end at once, again and again) or on a stream (which would end
/// without the answer the app waits for).
#[tokio::test]
async fn a_refused_result_does_not_count_towards_wait_count() {
    let net = mitm();
    let id = net.create(APP1, &[APP2, APP3], json!("t"), "60s").await;
    relay(&net).rewrite_answers(|what, v| {
        if !what.contains("/results") {
            return;
        }
        let alter = |r: &mut Value| {
            if r["from"] == APP2 {
                r["metadata"] = json!("altered");
            }
        };
        if let Some(results) = v.as_array_mut() {
            results.iter_mut().for_each(alter);
        } else if v.get("new_result").is_some() {
            alter(&mut v["new_result"]["result"]);
        }
    });
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("altered on the way")).await, 201);

    let started = std::time::Instant::now();
    let res = net.get(APP1, &format!("/v1/tasks/{id}/results?wait_count=1&wait_time=1500ms")).send().await.unwrap();
    assert_eq!(res.status(), 206);
    assert!(started.elapsed() >= Duration::from_millis(1400), "ended after {:?}", started.elapsed());
    assert_eq!(json_of(res).await, json!([]));
    // Waiters beside the first share one broker stream (the proxy's hub): the same for them.
    let waits: Vec<_> = (0..3)
        .map(|_| tokio::spawn(net.get(APP1, &format!("/v1/tasks/{id}/results?wait_count=1&wait_time=1500ms")).send()))
        .collect();
    for w in waits {
        let res = w.await.unwrap().unwrap();
        assert_eq!(res.status(), 206);
        assert_eq!(json_of(res).await, json!([]));
    }

    let res = net.events(APP1, &format!("/v1/tasks/{id}/results?wait_count=1")).send().await.unwrap();
    let mut sse = Sse::new(res);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sse.next_event(SECS(10))).await.is_err(),
        "nothing for the app yet, and no end"
    );
    assert_eq!(net.answer(APP3, &id, APP1, "succeeded", json!("fine")).await, 201);
    let ev = sse.next_event(SECS(10)).await.unwrap();
    assert_eq!((ev.event.as_str(), ev.json()["from"].clone()), ("new_result", json!(APP3)));
    assert_eq!(sse.next_event(SECS(10)).await, None, "the count is met: the stream ends");
    assert!(refused(&net, &net.proxy1, "forged").await >= 2);
}

/// A refused task that expires during a worker's wait does not end the wait early (with 206)
/// nor stall it: the good task that comes later is delivered at once.
#[tokio::test]
async fn a_refused_task_that_expires_during_a_wait_leaves_the_wait_to_the_next_task() {
    let net = mitm();
    alter_task_on_the_way(&net, net.create(APP1, &[APP2], json!("altered on the way"), "1s").await);
    let waiter = tokio::spawn(net.get(APP2, "/v1/tasks?filter=todo&wait_count=1&wait_time=8s").send());
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!waiter.is_finished(), "the refused task expired; the wait goes on");
    let started = std::time::Instant::now();
    let good = net.create(APP1, &[APP2], json!("fine"), "60s").await;
    let res = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(3), "woken by the task: {:?}", started.elapsed());
    let tasks: Vec<Value> = res.json().await.unwrap();
    assert_eq!(tasks.iter().map(|t| t["id"].clone()).collect::<Vec<_>>(), vec![json!(good)]);
}

/// Large bodies travel detached: the ciphertext beside the message's JSON, fetched by the
/// recipient's proxy from the broker on its own. Whatever the broker does to that fetch (a
/// changed ciphertext byte, a shortened ciphertext, a changed field in the message fetched with
/// it, no separator, no answer) is refused and counted like any other tampering, and the app
/// sees nothing; honest, the task and its result arrive whole. The body is over 256 KiB, so it
/// is sealed with the hash on a helper thread, hashed by the broker as it arrives, and opened
/// while its wrap is checked (`crypto::bulk`).
#[tokio::test]
async fn detached_bodies_are_checked_like_inline_ones() {
    let net = mitm();
    let big = "x".repeat(300_000);
    let id = net.create(APP1, &[APP2], json!(big), "60s").await;
    let uploads = relay(&net).requests_to("POST", "/v1/tasks?body=detached");
    assert_eq!(uploads.len(), 1, "a large task goes detached");
    let typed = uploads[0].headers.iter().find(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    assert_eq!(typed.map(|(_, v)| v.as_str()), Some("application/octet-stream"), "JSON, a newline, bytes");
    let sealed = &uploads[0].body;
    let at = sealed.iter().position(|b| *b == b'\n').unwrap();
    let json: Value = serde_json::from_slice(&sealed[..at]).unwrap();
    assert_eq!(json["body"]["ct"], "", "no ciphertext inside the JSON");
    assert_eq!(json["body"]["detached"], sealed.len() - at - 1);

    type Garble = Box<dyn Fn(&mut Vec<u8>) + Send + Sync>;
    let newline = |b: &Vec<u8>| b.iter().position(|c| *c == b'\n').unwrap();
    let cases: Vec<(&str, Garble)> = vec![
        ("forged", Box::new(|b: &mut Vec<u8>| *b.last_mut().unwrap() ^= 1)),
        (
            "forged",
            Box::new(move |b: &mut Vec<u8>| {
                let first = newline(b) + 1;
                b[first] ^= 0x80;
            }),
        ),
        ("malformed", Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 1))),
        (
            "forged",
            Box::new(move |b: &mut Vec<u8>| {
                let at = newline(b);
                let mut task: Value = serde_json::from_slice(&b[..at]).unwrap();
                task["metadata"] = json!("altered");
                let mut out = serde_json::to_vec(&task).unwrap();
                out.extend_from_slice(&b[at..]);
                *b = out;
            }),
        ),
        ("malformed", Box::new(move |b: &mut Vec<u8>| b.retain(|c| *c != b'\n'))),
        ("malformed", Box::new(|b: &mut Vec<u8>| b.clear())),
    ];
    let cases = std::sync::Arc::new(cases);
    for i in 0..cases.len() {
        let c = cases.clone();
        relay(&net).rewrite_raw_answers(move |what, b| {
            if what.ends_with("/sealed") {
                (c[i].1)(b);
            }
        });
        assert!(todo(&net, APP2).await.is_empty(), "case {i}");
    }
    relay(&net).honest();
    relay(&net).without_endpoint(&format!("GET /v1/tasks/{id}/sealed"));
    assert!(todo(&net, APP2).await.is_empty(), "no detached body to fetch");
    let counts = net.refused(&net.proxy2).await;
    for reason in ["forged", "malformed"] {
        let want = cases.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(counts[reason].as_u64(), Some(want), "{reason}: {counts}");
    }
    assert_eq!(counts["detached_unavailable"], 1, "{counts}");
    // A fetch that fails on the way (a 503) is tried again: twice is still delivered, and not
    // counted; three times is a refusal.
    relay(&net).honest();
    relay(&net).fail_next(&format!("GET /v1/tasks/{id}/sealed"), 3);
    assert!(todo(&net, APP2).await.is_empty(), "three failed fetches");
    assert_eq!(net.refused(&net.proxy2).await["detached_unavailable"], 2);
    relay(&net).fail_next(&format!("GET /v1/tasks/{id}/sealed"), 2);
    assert_eq!(todo(&net, APP2).await.len(), 1, "delivered on the third try");
    assert_eq!(net.refused(&net.proxy2).await["detached_unavailable"], 2);
    relay(&net).honest();
    let tasks = todo(&net, APP2).await;
    assert_eq!(tasks.len(), 1);
    assert_eq!((tasks[0]["id"].as_str(), tasks[0]["body"].as_str()), (Some(id.as_str()), Some(big.as_str())));

    // A large result: the same.
    let answer = "y".repeat(90_000);
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!(answer)).await, 201);
    assert_eq!(relay(&net).requests_to("PUT", &format!("/v1/tasks/{id}/results/{APP2}?body=detached")).len(), 1);
    relay(&net).rewrite_raw_answers(|what, b| {
        if what.ends_with("/sealed") {
            *b.last_mut().unwrap() ^= 1;
        }
    });
    assert!(results(&net, APP1, &id).await.is_empty());
    assert_eq!(refused(&net, &net.proxy1, "forged").await, 1);
    relay(&net).honest();
    let got = results(&net, APP1, &id).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["body"], answer.as_str());
}

/// A broker that answers a detached body's fetch with more than any message this proxy takes
/// (twice its apps' largest body, and 1 MiB) is refused unread and not asked again; the message
/// is counted unavailable, and delivered once the broker answers honestly.
#[tokio::test]
async fn an_oversized_detached_answer_is_refused_unread() {
    let net = Net::start_with(Options { relay: true, max_body: 200_000, ..Options::default() });
    let big = "x".repeat(150_000);
    let id = net.create(APP1, &[APP2], json!(big), "60s").await;
    let fetch = format!("/v1/tasks/{id}/sealed");
    assert_eq!(relay(&net).requests_to("POST", "/v1/tasks?body=detached").len(), 1, "it goes detached");
    relay(&net).rewrite_raw_answers(|what, b| {
        if what.ends_with("/sealed") {
            b.resize(b.len() + (2 << 20), b'x');
        }
    });
    assert!(todo(&net, APP2).await.is_empty());
    assert_eq!(refused(&net, &net.proxy2, "detached_unavailable").await, 1);
    assert_eq!(relay(&net).requests_to("GET", &fetch).len(), 1, "not tried again");
    relay(&net).honest();
    let tasks = todo(&net, APP2).await;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["body"].as_str(), Some(big.as_str()));
}

/// A message within the body limit whose surroundings grow in sealing (numbers written in
/// full) past what its recipients would fetch is refused by its sender's proxy (`413`), not
/// stored at the broker to be refused by every recipient.
#[tokio::test]
async fn a_message_larger_sealed_than_its_recipients_take_is_refused_at_once() {
    let net = Net::start_with(Options { max_body: 4 << 20, ..Options::default() });
    let id = uuid::Uuid::new_v4().to_string();
    let task = task(&id, APP1, &[APP2], json!("x".repeat(70_000)), "60s");
    // In the metadata, 5 bytes each as sent, 19 as written again (1000000000000000.0).
    let numbers = format!("\"numbers\":[{}1e15]}}", "1e15,".repeat(780_000));
    let text =
        serde_json::to_string(&task).unwrap().replace(r#""kind":"test"}"#, &format!(r#""kind":"test",{numbers}"#));
    assert!(text.len() < 4 << 20 && text.contains("\"numbers\""));
    let res = net.post(APP1, "/v1/tasks").header("content-type", "application/json").body(text).send().await.unwrap();
    assert_eq!(res.status(), 413);
    assert!(res.text().await.unwrap().contains("its recipients take"));
    assert_eq!(net.broker_tasks().await, 0, "nothing stored");
    // Without the numbers, the same task goes.
    let res = net.post(APP1, "/v1/tasks").json(&task).send().await.unwrap();
    assert_eq!(res.status(), 201);
}
