//! Certificates end to end: unknown and expired recipients get `424`; a revoked proxy is refused
//! by the broker and its peers; a rotated key and certificate are used by everyone without a
//! restart, and messages sealed just before the rotation still open.

mod common;

use std::time::Duration;

use common::*;
use photon::{
    crypto::{
        ca::{self, Validity},
        e2e::KeyId,
        RootCert,
    },
    wire::{broker::Envelope, ProxyId},
};
use serde_json::{json, Value};

fn quick() -> Options {
    Options { cert_refresh: Duration::from_millis(200), relay: true, ..Options::default() }
}

async fn post_task(net: &Net, to: &[&str]) -> reqwest::Response {
    let id = uuid::Uuid::new_v4().to_string();
    net.post(APP1, "/v1/tasks").json(&task(&id, APP1, to, json!("x"), "60s")).send().await.unwrap()
}

/// Polls `check` every 100 ms for up to 10 s.
#[tokio::test]
async fn unknown_recipient_proxy_is_424_with_its_id() {
    let net = Net::start();
    let res = post_task(&net, &[APP2, "app1.proxy9.broker", "app2.proxy9.broker"]).await;
    assert_eq!(res.status(), 424);
    assert_eq!(json_of(res).await, json!(["proxy9.broker"]));
    assert_eq!(net.broker_tasks().await, 0);
}

#[tokio::test]
async fn expired_recipient_certificate_is_424() {
    let net = Net::start();
    let id = ProxyId::parse("proxy3.broker").unwrap();
    let (_, csr) = ca::keygen(&id).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity { not_before: now - time::Duration::days(2), not_after: now - time::Duration::days(1) };
    ca::sign_valid(&net.pki, "broker", &csr, expired).unwrap();
    let res = post_task(&net, &[APP2, "app1.proxy3.broker"]).await;
    assert_eq!(res.status(), 424);
    assert_eq!(json_of(res).await, json!(["proxy3.broker"]));
    // The broker refuses to hand it out as well.
    let res = net.http.get(format!("{}/v1/certs/proxy3.broker", net.broker)).send().await.unwrap();
    assert_eq!(res.status(), 404);
    // A result addressed to it is refused the same way.
    let task_id = net.create(APP1, &[APP2], json!("q"), "60s").await;
    let r = json!({"from": APP2, "to": [APP1, "app1.proxy3.broker"], "task": task_id, "status": "succeeded", "body": 1, "metadata": null});
    let res = net.put(APP2, &format!("/v1/tasks/{task_id}/results/{APP2}")).json(&r).send().await.unwrap();
    assert_eq!(res.status(), 424);
    assert_eq!(json_of(res).await, json!(["proxy3.broker"]));
}

#[tokio::test]
async fn revoked_proxy_is_refused_everywhere() {
    let net = Net::start_with(quick());
    // Before: proxy2 works, and has answered a task whose result proxy1 has not read yet.
    let before = net.create(APP1, &[APP2], json!("q"), "60s").await;
    assert_eq!(net.answer(APP2, &before, APP1, "succeeded", json!("sealed by proxy2")).await, 201);

    let serial = ca::revoke(&net.pki, &ProxyId::parse("proxy2.broker").unwrap()).unwrap();
    assert!(!serial.is_empty());

    // proxy1 learns of it from the revocation list and refuses to seal for proxy2.
    eventually("proxy1 refuses to send to proxy2", || async {
        let res = post_task(&net, &[APP2]).await;
        res.status() == 424 && json_of(res).await == json!(["proxy2.broker"])
    })
    .await;
    // Once proxy1 has the new list, the result proxy2 sealed before is not handed to app1.
    eventually("proxy1 refuses what proxy2 sealed", || async {
        let res = net.get(APP1, &format!("/v1/tasks/{before}/results")).send().await.unwrap();
        json_of(res).await == json!([])
    })
    .await;
    assert!(net.refused(&net.proxy1).await["certificate_revoked"].as_u64().unwrap() >= 1);
    // The broker ended proxy2's session and refuses a new one: app2 can't reach it.
    eventually("proxy2 is cut off", || async {
        net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap().status() == 502
    })
    .await;
    // proxy2 reports itself unhealthy; proxy1 is fine.
    eventually("proxy2 unhealthy", || async {
        net.http.get(format!("{}/v1/health", net.proxy2)).send().await.unwrap().status() == 503
    })
    .await;
    let health = net.http.get(format!("{}/v1/health", net.proxy1)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // The broker itself refuses it as a recipient too.
    let res = net.http.get(format!("{}/v1/certs/proxy2.broker", net.broker)).send().await.unwrap();
    assert_eq!(res.status(), 404);
}

fn wrap_kid_for(body: &[u8], proxy: &str) -> String {
    let task: Value = serde_json::from_slice(body).unwrap();
    let env: Envelope = serde_json::from_value(task["body"].clone()).unwrap();
    env.keys.iter().find(|k| k.p.as_str() == proxy).unwrap().k.clone()
}

#[tokio::test]
async fn rotated_key_and_certificate_are_used_without_restart() {
    let net = Net::start_with(quick());
    let relay = net.relay.clone().unwrap();
    // Sealed for proxy2's first key, not yet read.
    let early = net.create(APP1, &[APP2], json!("before the rotation"), "60s").await;
    // Sealed by proxy2 itself with its first key (for itself and proxy1).
    let own = net.create(APP2, &[APP1], json!("proxy2's own, before"), "60s").await;

    // proxy2's site makes a new key; the CA signs it; both files are replaced in place.
    let id = ProxyId::parse("proxy2.broker").unwrap();
    let (key, csr) = ca::keygen(&id).unwrap();
    let (_, cert_path) = ca::sign(&net.pki, "broker", &csr, 30).unwrap();
    ca::write_private(&net.pki.join("proxy2.broker.priv.pem"), &key).unwrap();
    let root = RootCert::load(&net.pki.join(ca::ROOT_CERT)).unwrap();
    let now = photon::crypto::unix_millis() as i64 / 1000;
    let new_cert = root.verify(&std::fs::read_to_string(&cert_path).unwrap(), now).unwrap();
    let new_kid = KeyId::of(&new_cert.public_key).to_string();

    // The broker serves the new certificate (it looks at the file again within a second).
    let new_pem = std::fs::read_to_string(&cert_path).unwrap();
    eventually("the broker serves the new certificate", || async {
        let served = net.http.get(format!("{}/v1/certs/proxy2.broker", net.broker)).send().await.unwrap();
        served.text().await.unwrap() == new_pem
    })
    .await;
    // proxy1 seals for the new key once its cached copy is refreshed.
    eventually("proxy1 seals for proxy2's new key", || async {
        net.create(APP1, &[APP2], json!("after"), "60s").await;
        let post = relay.requests_to("POST", "/v1/tasks").pop().unwrap();
        wrap_kid_for(&post.body, "proxy2.broker") == new_kid
    })
    .await;
    // proxy2 opens both: the early task with its previous key, the new ones with the new key.
    eventually("proxy2 opens old and new", || async {
        let tasks: Vec<Value> = net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap().json().await.unwrap();
        tasks.iter().any(|t| t["id"] == early.as_str()) && tasks.iter().any(|t| t["body"] == "after")
    })
    .await;
    // proxy2 still opens what it sealed itself before its rotation.
    let res = net.get(APP2, &format!("/v1/tasks/{own}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await["body"], "proxy2's own, before");
    // A result proxy2 seals with its new key opens at proxy1.
    assert_eq!(net.answer(APP2, &early, APP1, "succeeded", json!("from the new key")).await, 201);
    let res = net.get(APP1, &format!("/v1/tasks/{early}/results")).send().await.unwrap();
    assert_eq!(json_of(res).await[0]["body"], "from the new key");
    assert_eq!(net.refused(&net.proxy1).await, json!({}));
    // proxy1 may seal for proxy2's new key a moment before proxy2 has read it (each looks again
    // every CERT_REFRESH): such a task is refused `not_for_us` until proxy2 has, then opens
    // (above). Nothing else is refused.
    let refused = net.refused(&net.proxy2).await;
    assert!(refused.as_object().unwrap().keys().all(|reason| reason == "not_for_us"), "{refused}");
}
