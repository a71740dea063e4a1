//! The `photon-loadtest` binary end to end, small and bounded: with no target it starts its own
//! network of real broker and proxy processes, runs the scenario, samples their memory, writes
//! JSON lines, and `report` turns them into an HTML page. Bad flags are named, exit 2.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

fn loadtest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_photon-loadtest"))
}

/// Where cargo put photon-broker and photon-proxy (built by `cargo test --workspace`).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_photon-loadtest")).parent().unwrap().to_path_buf();
    for bin in ["photon-broker", "photon-proxy"] {
        assert!(dir.join(bin).exists(), "{bin} is missing: run the tests with `cargo test --workspace`");
    }
    dir
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("photon-loadtest-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str], out: &Path) -> Value {
    let output: Output =
        loadtest().args(["run", "-q", "--bin-dir"]).arg(bin_dir()).args(args).arg("--out").arg(out).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn scenarios_on_a_network_of_its_own_then_a_report() {
    let dir = scratch("e2e");
    let out = dir.join("runs.jsonl");

    let sse = run(&["sse", "-c", "3", "-n", "20"], &out);
    assert_eq!((sse["ok"].as_u64(), sse["errors"].as_object().unwrap().len()), (Some(60), 0), "{sse}");
    assert_eq!(sse["figures"]["events_lost"], 0);
    // Its own processes were sampled: the broker and both proxies.
    let memory = sse["memory"].as_object().unwrap();
    assert_eq!(memory.keys().collect::<Vec<_>>(), ["broker", "proxy1.broker", "proxy2.broker"]);
    assert!(memory
        .values()
        .all(|m| m["peak_kib"].as_u64().unwrap() > 0 && !m["series"].as_array().unwrap().is_empty()));
    assert!(sse["figures"]["stream_kib.proxy1.broker"].is_number(), "{sse}");

    let fanout = run(&["fanout", "--recipients", "3", "-c", "2", "-n", "6"], &out);
    assert_eq!((fanout["ok"].as_u64(), fanout["errors"].as_object().unwrap().len()), (Some(6), 0), "{fanout}");

    let waiters = run(&["waiters", "-c", "20", "-n", "1"], &out);
    assert_eq!(waiters["ok"].as_u64(), Some(20), "{waiters}");

    let expiry = run(&["expiry", "-c", "4", "-n", "200", "--ttl", "1s"], &out);
    assert_eq!(expiry["ok"].as_u64(), Some(200), "{expiry}");
    for figure in ["baseline_kib", "loaded_kib", "after_2s_kib", "threshold_kib"] {
        assert!(expiry["figures"][figure].as_u64().unwrap() > 0, "{figure}: {expiry}");
    }

    let report = dir.join("report.html");
    let made = loadtest().arg("report").arg(&out).arg("-o").arg(&report).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let html = std::fs::read_to_string(&report).unwrap();
    assert_eq!(html.matches("<section").count(), 4);
    assert!(html.matches("<svg").count() >= 8, "latency and throughput charts for each run");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_and_files_are_named() {
    let bad = loadtest().args(["run", "create", "-n", "0"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("more than 0"));

    let remote = loadtest()
        .args(["run", "create", "--creator-url", "http://192.0.2.1:8081", "--worker-url", "http://192.0.2.1:8082"])
        .output()
        .unwrap();
    assert_eq!(remote.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&remote.stderr).contains("--allow-remote"));

    let dir = scratch("bad");
    let junk = dir.join("junk.jsonl");
    std::fs::write(&junk, "{\"scenario\":\"x\"}\n").unwrap();
    let report = loadtest().arg("report").arg(&junk).arg("-o").arg(dir.join("r.html")).output().unwrap();
    assert_eq!(report.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&report.stderr).contains("line 1"), "{report:?}");

    // A given network that is not there: a clear failure, not a hang.
    let down = loadtest()
        .args(["run", "create", "-q", "--creator-url", "http://127.0.0.1:9", "--worker-url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("does not answer"), "{down:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A port taken by another server when the network starts: the proxy that should serve it can't
/// bind and exits, and the stranger's healthy-looking answers are not taken for it.
#[test]
fn a_network_whose_port_is_taken_fails_to_start() {
    use std::{io::Write, net::TcpListener, sync::atomic::AtomicBool};

    use photon_loadtest::network::{free_addrs, Network, Spec};

    let stranger = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = stranger.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut conn in stranger.incoming().flatten() {
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
        }
    });
    let [broker, proxy2] = free_addrs().unwrap();
    let dir = scratch("taken");
    let spec = Spec::dev(bin_dir(), dir.join("pki"), [broker, taken.clone(), proxy2], &[]);
    let started = std::time::Instant::now();
    let error = match Network::start(spec, &AtomicBool::new(false)) {
        Ok(_) => panic!("started, with {taken} served by another process"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("proxy1.broker exited") && error.contains(&taken), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "noticed at once, not at the timeout");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn free_addresses_are_distinct() {
    let addrs: [String; 16] = photon_loadtest::network::free_addrs().unwrap();
    let distinct: std::collections::HashSet<_> = addrs.iter().collect();
    assert_eq!(distinct.len(), 16, "{addrs:?}");
}
