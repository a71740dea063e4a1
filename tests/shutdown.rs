//! Graceful shutdown of the real binaries: SIGTERM to a proxy and then to the broker while
//! long-polls and event streams are open. Clients get complete answers or clean stream ends;
//! each process exits 0 within its grace period; a restarted proxy's stream clients resume with
//! `Last-Event-ID` and lose nothing. The processes log JSON lines (`LOG_FORMAT=json`,
//! `RUST_LOG=debug`): one per request, never an API key or a body.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};

const GRACE: Duration = Duration::from_secs(5);
/// A body marker that must never appear in a log.
const MARKER: &str = "do-not-log-this-body-9d1c";

fn proxy_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_photon-broker")).with_file_name("photon-proxy");
    assert!(path.exists(), "{} is missing: run the tests with `cargo test --workspace`", path.display());
    path
}

fn common_env(cmd: &mut Command, addr: &str, log: &Path) {
    cmd.env("BIND_ADDR", addr)
        .env("BROKER_ID", "broker")
        .env("SHUTDOWN_GRACE", format!("{}s", GRACE.as_secs()))
        .env("KEEPALIVE", "1s")
        .env("WORKERS", "1")
        .env("RUST_LOG", "debug")
        .env("LOG_FORMAT", "json")
        .stdout(append(log))
        .stderr(append(log));
}

fn start_broker(pki: &Path, addr: &str) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_photon-broker"));
    common_env(&mut cmd, addr, &pki.join("broker.log"));
    cmd.env("BROKER_URL", format!("http://{addr}")).env("PKI_DIR", pki).spawn().expect("photon-broker starts")
}

fn start_proxy(pki: &Path, name: &str, app: &str, addr: &str, broker: &str) -> Child {
    let mut cmd = Command::new(proxy_binary());
    common_env(&mut cmd, addr, &pki.join(format!("{name}.log")));
    cmd.env("BROKER_URL", broker)
        .env("PROXY_ID", format!("{name}.broker"))
        .env("PRIVKEY_FILE", pki.join(format!("{name}.broker.priv.pem")))
        .env("ROOTCERT_FILE", pki.join("root.crt"))
        .env(format!("APP_{app}_KEY"), KEY)
        .spawn()
        .expect("photon-proxy starts")
}

fn free_addr() -> String {
    listener().local_addr().unwrap().to_string()
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
}

/// Waits for the process to exit, at most the grace period and a little slack; returns its
/// status and how long it took.
async fn exits(child: &mut Child) -> (ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(started.elapsed() < GRACE + Duration::from_secs(3), "still running after the grace period");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn healthy(http: &reqwest::Client, base: &str) {
    eventually(&format!("{base} healthy"), || async {
        matches!(http.get(format!("{base}/v1/health")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
}

/// Kills whatever is still running when the test ends, pass or fail.
struct Processes(Vec<Child>);

/// Where each process is in the test's `Processes`.
const BROKER: usize = 0;
const PROXY1: usize = 1;

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn sigterm_finishes_requests_ends_streams_and_resumes_after_restart() {
    let pki = make_pki();
    let (b, p1, p2) = (free_addr(), free_addr(), free_addr());
    let broker_url = format!("http://{b}");
    let (url1, url2) = (format!("http://{p1}"), format!("http://{p2}"));
    // Killed when the test ends, pass or fail.
    let mut procs = Processes(vec![
        start_broker(&pki, &b),
        start_proxy(&pki, "proxy1", "app1", &p1, &broker_url),
        start_proxy(&pki, "proxy2", "app2", &p2, &broker_url),
    ]);
    let http = reqwest::Client::new();
    healthy(&http, &url1).await;
    healthy(&http, &url2).await;
    // The broker restarted itself as it began, with glibc's small per-thread caches, as the
    // same process: the signals below reach the pid it was spawned with.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let environ = std::fs::read(format!("/proc/{}/environ", procs.0[BROKER].id())).unwrap();
        let tunable = format!(
            "GLIBC_TUNABLES={}",
            photon::ops::memory::tunables_with_small_tcache(None).unwrap().to_str().unwrap()
        );
        assert!(
            environ.split(|b| *b == 0).any(|v| v == tunable.as_bytes()),
            "{tunable} not in the broker's environment"
        );
    }
    let auth = |app: &str| format!("ApiKey {app} {KEY}");

    // A task from app1 to app2, with one result so far.
    let id = uuid::Uuid::new_v4().to_string();
    let res = http
        .post(format!("{url1}/v1/tasks"))
        .header("authorization", auth(APP1))
        .json(&task(&id, APP1, &[APP2], json!(MARKER), "5m"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let put = |status: &str, body: &str| {
        let r = json!({"from": APP2, "to": [APP1], "task": id, "status": status, "body": body, "metadata": null});
        http.put(format!("{url2}/v1/tasks/{id}/results/{APP2}")).header("authorization", auth(APP2)).json(&r).send()
    };
    assert_eq!(put("claimed", "first").await.unwrap().status(), 201);

    // === SIGTERM to proxy1, with a stream and a long-poll open on it ===
    let results = format!("{url1}/v1/tasks/{id}/results");
    let stream = http.get(&results).header("authorization", auth(APP1)).header("accept", "text/event-stream");
    let mut events = Sse::new(stream.send().await.unwrap());
    let first = events.next_event(SECS(5)).await.expect("the stored result");
    assert_eq!(first.json()["body"], "first");
    let last_id = first.id.clone().expect("new_result events carry ids");
    let long_poll = tokio::spawn(
        http.get(format!("{results}?wait_count=1&wait_time=60s")).header("authorization", auth(APP1)).send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // the long-poll is waiting at the broker

    sigterm(&procs.0[PROXY1]);
    // The long-poll answers at once, complete: the one (claimed) result, 206 as it is short.
    let answer = tokio::time::timeout(GRACE, long_poll).await.expect("the long-poll answers").unwrap().unwrap();
    assert_eq!(answer.status(), 206);
    let got: Value = answer.json().await.expect("a complete JSON answer");
    assert_eq!(got.as_array().unwrap().len(), 1);
    // The stream ends cleanly: a last comment, then the end.
    let mut tail = vec![];
    while let Some(ev) = events.next(GRACE).await {
        tail.push(ev);
    }
    assert!(tail.iter().any(|e| e.event == "comment" && e.data.contains("shutting down")), "{tail:?}");
    assert!(tail.iter().all(|e| e.event == "comment"), "nothing else after the last result: {tail:?}");
    let (status, took) = exits(&mut procs.0[PROXY1]).await;
    assert!(status.success(), "proxy1 exited with {status}");
    eprintln!("proxy1 exited {status} after {took:?}");

    // While proxy1 is down, app2 answers for good.
    assert_eq!(put("succeeded", "second").await.unwrap().status(), 204);

    // proxy1 comes back on the same port; its stream client resumes after the last id it saw.
    procs.0[PROXY1] = start_proxy(&pki, "proxy1", "app1", &p1, &broker_url);
    healthy(&http, &url1).await;
    let resumed = http
        .get(&results)
        .header("authorization", auth(APP1))
        .header("accept", "text/event-stream")
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    let mut events = Sse::new(resumed);
    let next = events.next_event(SECS(5)).await.expect("the result sent while proxy1 was down");
    assert_eq!((next.json()["body"].clone(), next.json()["status"].clone()), (json!("second"), json!("succeeded")));
    assert_ne!(next.id, Some(last_id), "nothing twice");

    // === SIGTERM to the broker, with a long-poll and a new_task stream open ===
    let res = http
        .post(format!("{url1}/v1/tasks"))
        .header("authorization", auth(APP1))
        .json(&task(&uuid::Uuid::new_v4().to_string(), APP1, &[APP2], json!("more work"), "5m"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let todo = http
        .get(format!("{url2}/v1/tasks?filter=todo"))
        .header("authorization", auth(APP2))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut todo = Sse::new(todo);
    assert_eq!(todo.next_event(SECS(5)).await.unwrap().event, "new_task");
    // With the resumed stream still open, this waiter shares its proxy's hub for the task.
    let waiting = tokio::spawn(
        http.get(format!("{results}?wait_count=2&wait_time=60s")).header("authorization", auth(APP1)).send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&procs.0[BROKER]);
    let answer = tokio::time::timeout(GRACE, waiting).await.expect("the long-poll answers").unwrap().unwrap();
    assert_eq!(answer.status(), 206, "answered with what there was");
    assert_eq!(answer.json::<Value>().await.unwrap().as_array().unwrap().len(), 1);
    let mut tail = vec![];
    while let Some(ev) = todo.next(GRACE).await {
        tail.push(ev);
    }
    assert!(tail.iter().any(|e| e.event == "comment" && e.data.contains("broker is shutting down")), "{tail:?}");
    let (status, took) = exits(&mut procs.0[BROKER]).await;
    assert!(status.success(), "the broker exited with {status}");
    eprintln!("broker exited {status} after {took:?}");
    // The proxies stay up and say why they are unhealthy.
    eventually("proxy2 reports the broker gone", || async {
        let res = http.get(format!("{url2}/v1/health")).send().await.unwrap();
        res.status() == 503
    })
    .await;
    for p in &mut procs.0[PROXY1..] {
        assert!(p.try_wait().unwrap().is_none(), "a proxy outlives its broker");
    }
    // The broker comes back (empty: tasks live in memory): the proxies reconnect by themselves.
    procs.0[BROKER] = start_broker(&pki, &b);
    healthy(&http, &url1).await;
    healthy(&http, &url2).await;
    drop(procs);

    // === the logs ===
    for name in ["broker", "proxy1", "proxy2"] {
        let log = std::fs::read_to_string(pki.join(format!("{name}.log"))).unwrap();
        let mut n_requests = 0;
        for line in log.lines() {
            let entry: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
            assert!(entry["level"].is_string() && entry["timestamp"].is_string(), "{line}");
            if entry["message"] == "request" {
                n_requests += 1;
                assert!(entry["endpoint"].is_string() && entry["status"].is_u64(), "{line}");
            }
            assert!(!line.contains(KEY), "{name} logged an API key: {line}");
            assert!(!line.contains(MARKER), "{name} logged a body: {line}");
        }
        assert!(n_requests >= 3, "{name}: {n_requests} request lines");
    }
    let _ = std::fs::remove_dir_all(&pki);
}
