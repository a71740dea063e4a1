//! Developer commands, run as `cargo xtask <command>`:
//! - `dev`: build and start the local network (broker + two proxies with API.md's dev defaults),
//!   making the CA, keys and certificates in `.dev/` on first start and reusing them after
//!   (`photon_loadtest::network`, which the loadtest also uses to start networks of its own).

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use photon_loadtest::network::{Network, Spec, BROKER_ID, DEV_KEY};

const BROKER_ADDR: &str = "127.0.0.1:8080";
const PROXY1_ADDR: &str = "127.0.0.1:8081";
const PROXY2_ADDR: &str = "127.0.0.1:8082";
/// The monitoring endpoints' password in the dev network (`curl -u :DevMonitor ...`).
const DEV_MONITORING_KEY: &str = "DevMonitor";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("dev") => dev(args.iter().any(|a| a == "--release")),
        _ => {
            eprintln!("usage: cargo xtask dev [--release]   start broker + two proxies (API.md's dev network)");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn dev(release: bool) -> Result<()> {
    let root = root();
    let profile = if release { "release" } else { "debug" };
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(&root).args(["build", "-j2", "-p", "photon", "-p", "photon-proxy", "--bins"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build failed: {status}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("cannot install the Ctrl-C handler")?;

    let addrs = [BROKER_ADDR, PROXY1_ADDR, PROXY2_ADDR].map(String::from);
    // Where cargo put the binaries: CARGO_TARGET_DIR when set, as cargo itself reads it.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let mut spec = Spec::dev(target.join(profile), root.join(".dev").join("pki"), addrs, &[]);
    spec.monitoring_key = Some(DEV_MONITORING_KEY.into());
    // Ctrl-C reaches xtask alone, which stops the network gracefully; reaching the processes
    // too, it made xtask's SIGTERM their second signal, which ends them at once.
    spec.own_process_groups = true;
    if !spec.pki.join("root.key").exists() {
        println!("making the dev CA in {}", spec.pki.display());
    }
    let mut net = Network::start(spec, &stop)?;
    print_banner();
    let outcome = loop {
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        if let Some(exit) = net.exited()? {
            break Err(anyhow::anyhow!(exit));
        }
        thread::sleep(Duration::from_millis(200));
    };
    net.stop();
    println!("dev network stopped");
    outcome
}

fn print_banner() {
    println!(
        r#"
Photon dev network is up (Ctrl-C stops it):
  broker         http://{BROKER_ADDR}   (id {BROKER_ID})
  proxy1.broker  http://127.0.0.1:8081  app app1, key {DEV_KEY}
  proxy2.broker  http://127.0.0.1:8082  app app2, key {DEV_KEY}

Try:
  curl -i -H 'Authorization: ApiKey app1.proxy1.broker {DEV_KEY}' \
    --json '{{"id":"70c0aa90-bfcf-4312-a6af-42cbd57dc0b8","from":"app1.proxy1.broker","to":["app2.proxy2.broker"],"body":"hi","ttl":"60s","failure_strategy":"discard","metadata":null}}' \
    http://127.0.0.1:8081/v1/tasks
  curl -H 'Authorization: ApiKey app2.proxy2.broker {DEV_KEY}' 'http://127.0.0.1:8082/v1/tasks?filter=todo&wait_count=1'
  curl -u ':{DEV_MONITORING_KEY}' http://{BROKER_ADDR}/v1/health/proxies
"#
    );
}
