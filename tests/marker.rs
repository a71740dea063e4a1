//! Confidentiality against the broker: a marker string sent in task and result bodies never
//! appears in the bytes the broker receives, in its log at trace level, or anywhere in its
//! memory (the broker runs as its own process; its memory is read from `/proc/<pid>/mem`).
//! Positive controls show each of these places does hold what the broker may see (the
//! plaintext metadata, the task id), so the scan itself can't silently pass.

mod common;

use std::io::{Read, Seek, SeekFrom};

use common::*;
use serde_json::json;

/// Every readable mapping of process `pid`, concatenated (unreadable ones are skipped).
fn memory_of(pid: u32) -> Vec<u8> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        if !perms.starts_with('r') {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut region = vec![0; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_ok() && mem.read_exact(&mut region).is_ok() {
            all.extend_from_slice(&region);
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_never_reaches_the_broker() {
    let net = Net::start_with(Options { relay: true, broker_process: true, ..Options::default() });
    let marker = format!("MARKER-{}", uuid::Uuid::new_v4().simple());
    let canary = format!("CANARY-{}", uuid::Uuid::new_v4().simple());
    // The marker in task and result bodies, in a string, in an object and (large) in a long one.
    let body = json!({"secret": marker, "nested": [marker.clone(), {"again": marker}], "big": marker.repeat(20_000)});
    let id = uuid::Uuid::new_v4().to_string();
    let mut t = task(&id, APP1, &[APP2], body.clone(), "300s");
    t["metadata"] = json!({"canary": canary});
    let res = net.post(APP1, "/v1/tasks").json(&t).send().await.unwrap();
    assert_eq!(res.status(), 201);
    // The recipient reads the body as sent and answers with the marker too.
    let got = net.get(APP2, &format!("/v1/tasks/{id}")).send().await.unwrap().json::<serde_json::Value>().await;
    assert_eq!(got.unwrap()["body"], body);
    assert_eq!(net.answer(APP2, &id, APP1, "succeeded", json!(format!("result {marker}"))).await, 201);
    let results: serde_json::Value =
        net.get(APP1, &format!("/v1/tasks/{id}/results")).send().await.unwrap().json().await.unwrap();
    assert_eq!(results[0]["body"], format!("result {marker}"));

    // The bytes the broker received.
    let received = net.relay.as_ref().unwrap().bytes_in.lock().clone();
    assert!(contains(&received, &canary), "control: the relay saw the plaintext metadata");
    assert!(!contains(&received, &marker), "the marker crossed the wire to the broker");

    // Its memory, while it holds the task and the result.
    let pid = net.broker_child.as_ref().unwrap().id();
    let memory = memory_of(pid);
    assert!(contains(&memory, &canary), "control: the broker's memory holds the task's metadata");
    assert!(!contains(&memory, &marker), "the marker is in the broker's memory");

    // Its log at trace level.
    let log = std::fs::read(&net.broker_log).unwrap();
    assert!(contains(&log, &id), "control: the trace log names the task");
    assert!(!contains(&log, &marker), "the marker is in the broker's log");
}
