//! Operating Photon: StatsD metrics received by a real UDP listener while the network works;
//! health across states (broker down, certificate expired, proxy disconnected, a duplicate
//! proxy); the monitoring endpoints and their authentication.

mod common;

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use common::*;
use parking_lot::Mutex;
use photon::{
    crypto::ca::{self, Validity},
    wire::ProxyId,
};
use serde_json::{json, Value};

// === a StatsD server ===

/// One parsed StatsD line: `name:value|type|#k:v,k:v`.
#[derive(Debug, Clone)]
struct Metric {
    name: String,
    value: f64,
    kind: String,
    tags: BTreeMap<String, String>,
}

fn parse(line: &str) -> Metric {
    let (name, rest) = line.split_once(':').unwrap_or_else(|| panic!("no value in {line:?}"));
    let mut parts = rest.split('|');
    let value = parts.next().unwrap().parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
    let kind = parts.next().unwrap_or_else(|| panic!("no type in {line:?}")).to_owned();
    let mut tags = BTreeMap::new();
    for part in parts {
        for tag in part.strip_prefix('#').unwrap_or_else(|| panic!("unknown field in {line:?}")).split(',') {
            let (k, v) = tag.split_once(':').unwrap_or((tag, ""));
            tags.insert(k.to_owned(), v.to_owned());
        }
    }
    Metric { name: name.to_owned(), value, kind, tags }
}

/// A UDP listener collecting every metric line it receives.
struct Statsd {
    port: u16,
    metrics: Arc<Mutex<Vec<Metric>>>,
}

impl Statsd {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let metrics = Arc::new(Mutex::new(Vec::new()));
        let sink = metrics.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = std::str::from_utf8(&buf[..n]).expect("StatsD lines are UTF-8");
                sink.lock().extend(text.lines().filter(|l| !l.is_empty()).map(parse));
            }
        });
        Self { port, metrics }
    }

    /// The metrics named `name` of `kind` whose tags include `tags`.
    fn matching(&self, name: &str, kind: &str, tags: &[(&str, &str)]) -> Vec<Metric> {
        self.metrics
            .lock()
            .iter()
            .filter(|m| m.name == name && m.kind == kind)
            .filter(|m| tags.iter().all(|(k, v)| m.tags.get(*k).map(String::as_str) == Some(*v)))
            .cloned()
            .collect()
    }

    fn sum(&self, name: &str, tags: &[(&str, &str)]) -> f64 {
        self.matching(name, "c", tags).iter().map(|m| m.value).sum()
    }

    fn max_gauge(&self, name: &str, tags: &[(&str, &str)]) -> f64 {
        self.matching(name, "g", tags).iter().map(|m| m.value).fold(f64::NEG_INFINITY, f64::max)
    }

    fn last_gauge(&self, name: &str, tags: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, "g", tags).last().map(|m| m.value)
    }

    /// Waits (up to 10 s) for the counter to reach `want`; returns what it reached.
    async fn counter_reaches(&self, name: &str, tags: &[(&str, &str)], want: f64) -> f64 {
        let until = Instant::now() + Duration::from_secs(10);
        while self.sum(name, tags) < want && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.sum(name, tags)
    }
}

const BROKER: (&str, &str) = ("component", "broker");
const PROXY1: (&str, &str) = ("proxy_id", "proxy1.broker");
const PROXY2: (&str, &str) = ("proxy_id", "proxy2.broker");

#[tokio::test]
async fn statsd_reports_what_the_network_does() {
    let statsd = Statsd::start();
    let net = Net::start_with(Options { statsd_port: Some(statsd.port), ..Default::default() });
    // One long-poll and one event stream held open while the gauges are sampled (on two tasks:
    // on one, the second would share the first's broker stream).
    let held = net.create(APP1, &[APP2], json!("held"), "60s").await;
    let waiter = tokio::spawn(net.get(APP1, &format!("/v1/tasks/{held}/results?wait_count=1&wait_time=3s")).send());
    let streamed = net.create(APP1, &[APP2], json!("streamed"), "60s").await;
    let stream = net.events(APP1, &format!("/v1/tasks/{streamed}/results")).send().await.unwrap();
    let mut events = Sse::new(stream);

    let mut ids = vec![];
    for i in 0..5 {
        ids.push(net.create(APP1, &[APP2], json!(i), "2s").await);
    }
    for id in &ids[..3] {
        assert_eq!(net.answer(APP2, id, APP1, "succeeded", json!("done")).await, 201);
    }
    // A request the broker refuses: no session headers at all.
    let res = net.http.get(format!("{}/v1/tasks?filter=todo", net.broker)).header("x-photon-app", APP1).send().await;
    assert_eq!(res.unwrap().status(), 401);

    // Counters: exactly what was done, from the broker and from each proxy.
    assert_eq!(statsd.counter_reaches("photon.tasks.created", &[BROKER], 7.0).await, 7.0);
    assert_eq!(statsd.counter_reaches("photon.tasks.created", &[PROXY1], 7.0).await, 7.0);
    assert_eq!(statsd.sum("photon.tasks.created", &[PROXY2]), 0.0);
    assert_eq!(statsd.counter_reaches("photon.results.stored", &[BROKER, ("outcome", "created")], 3.0).await, 3.0);
    assert_eq!(statsd.counter_reaches("photon.results.stored", &[PROXY2], 3.0).await, 3.0);
    let created = [("endpoint", "create_task"), ("status", "201")];
    assert_eq!(statsd.counter_reaches("photon.requests", &[PROXY1, created[0], created[1]], 7.0).await, 7.0);
    assert_eq!(statsd.counter_reaches("photon.requests", &[BROKER, created[0], created[1]], 7.0).await, 7.0);
    let refused = [BROKER, ("reason", "malformed")];
    assert_eq!(statsd.counter_reaches("photon.requests.refused", &refused, 1.0).await, 1.0);

    // Timers: one request.duration_ms per request, in fractional milliseconds.
    let timings = statsd.matching("photon.request.duration_ms", "h", &[PROXY1, ("endpoint", "create_task")]);
    assert_eq!(timings.len(), 7, "{timings:?}");
    assert!(timings.iter().all(|m| m.value > 0.0 && m.value < 10_000.0), "{timings:?}");
    assert!(statsd.matching("photon.upstream.duration_ms", "h", &[PROXY1, ("method", "POST")]).len() >= 7);

    // Gauges, sampled every second: the live tasks, the waiter, the stream, both proxies online.
    eventually("gauges sampled", || async {
        statsd.max_gauge("photon.tasks.live", &[BROKER]) >= 7.0
            && statsd.max_gauge("photon.waiters", &[BROKER]) >= 1.0
            && statsd.max_gauge("photon.waiters", &[PROXY1]) >= 1.0
            && statsd.max_gauge("photon.streams.open", &[BROKER]) >= 1.0
            && statsd.max_gauge("photon.streams.open", &[PROXY1]) >= 1.0
            && statsd.last_gauge("photon.proxies.online", &[BROKER]) == Some(2.0)
            && statsd.last_gauge("photon.broker.connected", &[PROXY2]) == Some(1.0)
            && statsd.sum("photon.bytes.in", &[PROXY1]) > 0.0
            && statsd.sum("photon.bytes.out", &[BROKER]) > 0.0
    })
    .await;

    // Expiry: the five 2 s tasks go, and the counter says so.
    assert_eq!(statsd.counter_reaches("photon.tasks.expired", &[BROKER], 5.0).await, 5.0);
    eventually("live tasks back to 2", || async { statsd.last_gauge("photon.tasks.live", &[BROKER]) == Some(2.0) })
        .await;
    drop(events.next(SECS(1)).await);
    let _ = waiter.await;
    eventually("the waiter is gone", || async { statsd.last_gauge("photon.waiters", &[PROXY1]) == Some(0.0) }).await;

    // Every metric carries its component's tags.
    for m in statsd.metrics.lock().iter() {
        match m.tags["component"].as_str() {
            "broker" => assert_eq!(m.tags["broker_id"], "broker", "{m:?}"),
            "proxy" => assert!(m.tags["proxy_id"].ends_with(".broker"), "{m:?}"),
            other => panic!("unknown component {other}"),
        }
        assert!(m.name.starts_with("photon."), "{m:?}");
    }
}

#[tokio::test]
async fn refused_messages_are_counted_by_reason() {
    let statsd = Statsd::start();
    let net = Net::start_with(Options { statsd_port: Some(statsd.port), relay: true, ..Default::default() });
    let relay = net.relay.clone().unwrap();
    let id = net.create(APP1, &[APP2], json!("x"), "60s").await;
    // The broker in the middle changes the metadata: the seal no longer verifies.
    relay.rewrite_answers(|_, v| {
        if let Some(tasks) = v.as_array_mut() {
            for t in tasks {
                t["metadata"] = json!("changed");
            }
        }
    });
    let tasks: Value = net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap().json().await.unwrap();
    assert_eq!(tasks, json!([]), "the altered task is not shown");
    let reason = net.refused(&net.proxy2).await.as_object().unwrap().keys().next().cloned().unwrap();
    assert_eq!(statsd.counter_reaches("photon.messages.refused", &[PROXY2, ("reason", &reason)], 1.0).await, 1.0);
    relay.honest();
    let tasks: Value = net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap().json().await.unwrap();
    assert_eq!(tasks[0]["id"], id.as_str());
}

// === health ===

#[tokio::test]
async fn proxy_health_follows_the_broker() {
    let net = Net::start();
    assert_eq!(net.health(&net.proxy1).await.0, 200);
    net.broker_stop.as_ref().unwrap().stop().await;
    eventually("proxy1 reports the broker gone", || async {
        let (status, body) = net.health(&net.proxy1).await;
        status == 503 && body["error"].as_str().unwrap_or("").contains("broker")
    })
    .await;
    // It keeps serving: apps get a clear error, not a hang or a reset.
    let res =
        net.post(APP1, "/v1/tasks").json(&task(&uuid::Uuid::new_v4().to_string(), APP1, &[APP2], json!(1), "60s"));
    assert_eq!(res.send().await.unwrap().status(), 502);
}

#[tokio::test]
async fn an_expired_own_certificate_makes_a_proxy_unhealthy() {
    let net = Net::start_with(Options { cert_refresh: SECS(1), ..Default::default() });
    // proxy2's site renews with a certificate that is valid for three more seconds.
    let id = ProxyId::parse("proxy2.broker").unwrap();
    let (key, csr) = ca::keygen(&id).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let short = Validity { not_before: now - time::Duration::minutes(1), not_after: now + time::Duration::seconds(3) };
    ca::sign_valid(&net.pki, "broker", &csr, short).unwrap();
    ca::write_private(&net.pki.join("proxy2.broker.priv.pem"), &key).unwrap();
    eventually("proxy2 reports its expired certificate", || async {
        let (status, body) = net.health(&net.proxy2).await;
        status == 503 && body["error"].as_str().unwrap_or("").contains("expired")
    })
    .await;
    assert_eq!(net.health(&net.proxy1).await.0, 200);
}

// === monitoring ===

fn basic(password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!(":{password}")))
}

#[tokio::test]
async fn monitoring_is_off_without_a_key() {
    let net = Net::start();
    let res = net.http.get(format!("{}/v1/health/proxies", net.broker)).header("authorization", basic("x")).send();
    let res = res.await.unwrap();
    assert_eq!(res.status(), 501);
    assert!(json_of(res).await["error"].as_str().unwrap().contains("MONITORING_API_KEY"));
}

#[tokio::test]
async fn monitoring_lists_connected_proxies_behind_the_key() {
    let net = Net::start_with(Options { monitoring_key: Some("MonitorMe".into()), ..Default::default() });
    let get = |path: &str, auth: Option<String>| {
        let mut req = net.http.get(format!("{}/v1/health/proxies{path}", net.broker));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    let res = get("", None).await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));
    assert_eq!(get("", Some(basic("wrong"))).await.unwrap().status(), 401);
    use base64::Engine;
    let with_user = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("admin:MonitorMe"));
    assert_eq!(get("", Some(with_user)).await.unwrap().status(), 401, "the user must be empty");
    assert_eq!(get("/proxy1.broker", Some(basic("wrong"))).await.unwrap().status(), 401);

    let key = || Some(basic("MonitorMe"));
    let res = get("", key()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await, json!(["proxy1.broker", "proxy2.broker"]));
    let res = get("/proxy1.broker", key()).await.unwrap();
    assert_eq!(res.status(), 200);
    let status = json_of(res).await;
    assert_eq!((status["online"].clone(), status["last_disconnect"].clone()), (json!(true), Value::Null));
    assert_eq!(get("/proxy9.broker", key()).await.unwrap().status(), 404, "never seen");
    assert_eq!(get("/not%20an%20id", key()).await.unwrap().status(), 400);

    // proxy2 shuts down: it is known but gone, with the time it went.
    net.proxy_stops[1].stop().await;
    let res = get("/proxy2.broker", key()).await.unwrap();
    assert_eq!(res.status(), 503);
    let status = json_of(res).await;
    assert_eq!(status["online"], false);
    assert!(status["last_disconnect"].as_str().unwrap().contains('T'), "{status}");
    assert_eq!(json_of(get("", key()).await.unwrap()).await, json!(["proxy1.broker"]));
    assert_eq!(net.broker_health().await["proxies_online"], 1);
}

#[tokio::test]
async fn a_second_proxy_with_the_same_id_is_refused_and_neither_dies() {
    let net = Net::start_with(Options { monitoring_key: Some("m".into()), ..Default::default() });
    let config = proxy_config(&net.pki, "proxy2", &["app2"], &net.broker_url, &net.opts, &net.ops);
    let twin = ExtraProxy::start(config);

    // The twin starts, serves, and says why it is unhealthy; the original is untouched.
    let (status, body) = net.health(&twin.url).await;
    assert_eq!(status, 503);
    assert!(body["error"].as_str().unwrap().contains("another instance of proxy2.broker"), "{body}");
    let via_twin = net
        .http
        .get(format!("{}/v1/tasks?filter=todo", twin.url))
        .header("authorization", format!("ApiKey {APP2} {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(via_twin.status(), 503, "the broker refuses the twin's requests");
    assert_eq!(net.health(&net.proxy2).await.0, 200);
    let id = net.create(APP1, &[APP2], json!("still works"), "60s").await;
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!("yes")).await, 201);
    let status: Value = net
        .http
        .get(format!("{}/v1/health/proxies/proxy2.broker", net.broker))
        .header("authorization", basic("m"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((status["online"].clone(), status["connections"].clone()), (json!(true), json!(1)));

    // The original stops; the twin, which kept retrying, takes over.
    net.proxy_stops[1].stop().await;
    eventually("the twin comes online", || async { net.health(&twin.url).await.0 == 200 }).await;
}

/// A proxy that shuts down stays online at the broker while its in-flight requests finish, and
/// says goodbye after them: a replacement instance connecting in between would make them 409.
#[tokio::test]
async fn a_stopping_proxy_says_goodbye_after_its_last_request() {
    let net = Net::start_with(Options { relay: true, ..Options::default() });
    let id = net.create(APP1, &[APP2], json!("t"), "60s").await;
    let waiting = tokio::spawn(net.get(APP1, &format!("/v1/tasks/{id}/results?wait_count=1&wait_time=30s")).send());
    eventually("the wait reached the broker", || async { net.broker_health().await["waiters"] == 1 }).await;
    net.proxy_stops[0].stop().await;
    let res = waiting.await.unwrap().unwrap();
    assert!(res.status().is_success(), "answered with what there is: {}", res.status());
    let relay = net.relay.as_ref().unwrap();
    let order: Vec<String> = relay
        .captured
        .lock()
        .iter()
        .filter(|c| c.path.contains("/results") || (c.method == "DELETE" && c.path.starts_with("/v1/control")))
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert!(order.len() >= 3, "the wait, its answer at shutdown and the goodbye: {order:?}");
    assert!(order.last().unwrap().starts_with("DELETE"), "the goodbye comes last: {order:?}");
}
