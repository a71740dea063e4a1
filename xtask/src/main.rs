//! Developer commands, run as `cargo xtask <command>`:
//! - `dev`: build and start the local network (broker + two proxies with API.md's dev defaults),
//!   making the CA, keys and certificates in `.dev/` on first start and reusing them after.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

const BROKER_ID: &str = "broker";
const BROKER_ADDR: &str = "127.0.0.1:8080";
const PROXIES: [(&str, &str, &str); 2] = [("proxy1", "127.0.0.1:8081", "app1"), ("proxy2", "127.0.0.1:8082", "app2")];
const DEV_KEY: &str = "App1Secret";
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

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn dev(release: bool) -> Result<()> {
    let root = root();
    let profile = if release { "release" } else { "debug" };
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(&root).args(["build", "-j2", "-p", "photon", "-p", "photon-proxy", "--bins"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let bin = |name: &str| root.join("target").join(profile).join(name);
    let broker_url = format!("http://{BROKER_ADDR}");
    let pki = root.join(".dev").join("pki");

    if !pki.join("root.key").exists() {
        println!("making the dev CA in {}", pki.display());
        run(Command::new(bin("photon-broker"))
            .args(["ca", "init", "--broker-url", &broker_url, "--broker-id", BROKER_ID])
            .arg("--dir")
            .arg(&pki))?;
    }
    for (name, _, _) in PROXIES {
        let proxy_id = format!("{name}.{BROKER_ID}");
        let key = pki.join(format!("{proxy_id}.priv.pem"));
        if !key.exists() || !pki.join("certs").join(format!("{proxy_id}.crt")).exists() {
            run(Command::new(bin("photon-proxy")).args(["keygen", "--proxy-id", &proxy_id]).arg("--out").arg(&pki))?;
            let csr = pki.join(format!("{proxy_id}.csr.pem"));
            run(Command::new(bin("photon-broker"))
                .args(["ca", "sign", "--broker-url", &broker_url, "--broker-id", BROKER_ID])
                .arg("--dir")
                .arg(&pki)
                .arg("--csr")
                .arg(&csr))?;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("cannot install the Ctrl-C handler")?;

    let mut children: Vec<(String, Child)> = Vec::new();
    let outcome = (|| -> Result<()> {
        let broker = Command::new(bin("photon-broker"))
            .env("BIND_ADDR", BROKER_ADDR)
            .env("BROKER_URL", &broker_url)
            .env("BROKER_ID", BROKER_ID)
            .env("PKI_DIR", &pki)
            .env("MONITORING_API_KEY", DEV_MONITORING_KEY)
            .spawn()
            .context("cannot start photon-broker")?;
        children.push(("broker".into(), broker));
        wait_healthy(BROKER_ADDR, &stop)?;
        for (name, addr, app) in PROXIES {
            let proxy_id = format!("{name}.{BROKER_ID}");
            let child = Command::new(bin("photon-proxy"))
                .env("BIND_ADDR", addr)
                .env("BROKER_URL", &broker_url)
                .env("BROKER_ID", BROKER_ID)
                .env("PROXY_ID", &proxy_id)
                .env("PRIVKEY_FILE", pki.join(format!("{proxy_id}.priv.pem")))
                .env("ROOTCERT_FILE", pki.join("root.crt"))
                .env(format!("APP_{app}_KEY"), DEV_KEY)
                .spawn()
                .with_context(|| format!("cannot start photon-proxy for {proxy_id}"))?;
            children.push((proxy_id, child));
        }
        for (_, addr, _) in PROXIES {
            wait_healthy(addr, &stop)?;
        }
        print_banner();
        while !stop.load(Ordering::SeqCst) {
            for (name, child) in children.iter_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("{name} exited: {status}");
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    // Graceful: the proxies first (they say goodbye to the broker), then the broker.
    for (_, child) in children.iter_mut().rev() {
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let _ = child.wait();
    }
    println!("dev network stopped");
    outcome
}

fn wait_healthy(addr: &str, stop: &AtomicBool) -> Result<()> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(s, "GET /v1/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("{addr} did not become healthy")
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
