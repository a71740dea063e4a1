//! A local Photon network of real processes: one broker and its proxies, with the CA, keys and
//! certificates made by the binaries' own `ca init`, `keygen` and `ca sign`. `cargo xtask dev`
//! starts API.md's dev network with it; `photon-loadtest` starts a fresh one on free loopback
//! ports when no target is given, so every run starts from an empty broker and knows the
//! process ids whose memory it samples.
//!
//! Synchronous (std::process) so that xtask needs no runtime.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// API.md's dev defaults.
pub const BROKER_ID: &str = "broker";
pub const DEV_KEY: &str = "App1Secret";

/// One proxy: its name (`proxy1` → `proxy1.broker`), its listen address and its apps, all
/// with the same API key.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    pub name: String,
    pub addr: String,
    pub apps: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Spec {
    /// Where `photon-broker` and `photon-proxy` are.
    pub bin_dir: PathBuf,
    /// The PKI directory; made on first start and reused after.
    pub pki: PathBuf,
    pub broker_addr: String,
    pub proxies: Vec<ProxySpec>,
    pub app_key: String,
    pub monitoring_key: Option<String>,
    /// Where each process's stdout and stderr go (`<dir>/<name>.log`); inherited when `None`.
    pub logs: Option<PathBuf>,
    /// Extra environment for every process (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Start each process in a process group of its own, so that a terminal's Ctrl-C reaches
    /// only the caller, which then stops them gracefully (once). For a caller that handles
    /// Ctrl-C; otherwise the processes would outlive it.
    pub own_process_groups: bool,
}

impl Spec {
    /// The dev network's shape at the given addresses: `proxy1` with `app1`, `proxy2` with `app2`
    /// and `extra_apps` more.
    pub fn dev(bin_dir: PathBuf, pki: PathBuf, addrs: [String; 3], extra_apps: &[String]) -> Self {
        let [broker_addr, p1, p2] = addrs;
        let mut apps2 = vec!["app2".to_owned()];
        apps2.extend(extra_apps.iter().cloned());
        Self {
            bin_dir,
            pki,
            broker_addr,
            proxies: vec![
                ProxySpec { name: "proxy1".into(), addr: p1, apps: vec!["app1".into()] },
                ProxySpec { name: "proxy2".into(), addr: p2, apps: apps2 },
            ],
            app_key: DEV_KEY.into(),
            monitoring_key: None,
            logs: None,
            env: Vec::new(),
            own_process_groups: false,
        }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    pub fn broker_url(&self) -> String {
        format!("http://{}", self.broker_addr)
    }
}

/// The running processes; stopped gracefully (proxies first, then the broker) on `stop` or drop.
pub struct Network {
    pub spec: Spec,
    /// `("broker", child)`, then `("proxy1.broker", child)` …
    children: Vec<(String, Child)>,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Makes the CA and each proxy's key and certificate, unless they exist.
fn make_pki(spec: &Spec) -> Result<()> {
    let (pki, broker_url) = (&spec.pki, spec.broker_url());
    if !pki.join("root.key").exists() {
        run(Command::new(spec.bin("photon-broker"))
            .args(["ca", "init", "--broker-url", &broker_url, "--broker-id", BROKER_ID])
            .arg("--dir")
            .arg(pki))?;
    }
    for p in &spec.proxies {
        let proxy_id = format!("{}.{BROKER_ID}", p.name);
        let key = pki.join(format!("{proxy_id}.priv.pem"));
        if !key.exists() || !pki.join("certs").join(format!("{proxy_id}.crt")).exists() {
            run(Command::new(spec.bin("photon-proxy"))
                // A key without its certificate is replaced along with it.
                .args(["keygen", "--force", "--proxy-id", &proxy_id])
                .arg("--out")
                .arg(pki))?;
            run(Command::new(spec.bin("photon-broker"))
                .args(["ca", "sign", "--broker-url", &broker_url, "--broker-id", BROKER_ID])
                .arg("--dir")
                .arg(pki)
                .arg("--csr")
                .arg(pki.join(format!("{proxy_id}.csr.pem"))))?;
        }
    }
    Ok(())
}

impl Network {
    /// Makes the PKI if needed, starts the broker and the proxies, and waits until each is
    /// healthy (at most 60 s, or until `cancel` is raised).
    pub fn start(spec: Spec, cancel: &AtomicBool) -> Result<Self> {
        for bin in ["photon-broker", "photon-proxy"] {
            if !spec.bin(bin).exists() {
                bail!(
                    "{} is missing: build the binaries into {} (`cargo build -j2 --workspace --bins`, with \
                     --release for target/release), or say where they are (--bin-dir)",
                    spec.bin(bin).display(),
                    spec.bin_dir.display()
                );
            }
        }
        std::fs::create_dir_all(&spec.pki).with_context(|| spec.pki.display().to_string())?;
        make_pki(&spec)?;
        let mut net = Self { spec, children: Vec::new() };
        let spec = net.spec.clone();
        let broker_url = spec.broker_url();
        let mut broker = Command::new(spec.bin("photon-broker"));
        broker
            .env("BIND_ADDR", &spec.broker_addr)
            .env("BROKER_URL", &broker_url)
            .env("BROKER_ID", BROKER_ID)
            .env("PKI_DIR", &spec.pki);
        if let Some(key) = &spec.monitoring_key {
            broker.env("MONITORING_API_KEY", key);
        }
        net.spawn("broker", broker)?;
        net.wait_healthy("broker", &spec.broker_addr, BROKER_HEALTH, cancel)?;
        let proxy_ids: Vec<String> = spec.proxies.iter().map(|p| format!("{}.{BROKER_ID}", p.name)).collect();
        for (p, proxy_id) in spec.proxies.iter().zip(&proxy_ids) {
            let mut proxy = Command::new(spec.bin("photon-proxy"));
            proxy
                .env("BIND_ADDR", &p.addr)
                .env("BROKER_URL", &broker_url)
                .env("BROKER_ID", BROKER_ID)
                .env("PROXY_ID", proxy_id)
                .env("PRIVKEY_FILE", spec.pki.join(format!("{proxy_id}.priv.pem")))
                .env("ROOTCERT_FILE", spec.pki.join("root.crt"));
            for app in &p.apps {
                proxy.env(format!("APP_{app}_KEY"), &spec.app_key);
            }
            net.spawn(proxy_id, proxy)?;
        }
        for (p, proxy_id) in spec.proxies.iter().zip(&proxy_ids) {
            net.wait_healthy(proxy_id, &p.addr, PROXY_HEALTH, cancel)?;
        }
        Ok(net)
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<()> {
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        if let Some(dir) = &self.spec.logs {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log")))?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        #[cfg(unix)]
        if self.spec.own_process_groups {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// `(name, pid)` of each process: `broker`, `proxy1.broker`, …
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children.iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    /// The first process that has exited, if any.
    pub fn exited(&mut self) -> Result<Option<String>> {
        for (name, child) in self.children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(format!("{name} exited: {status}")));
            }
        }
        Ok(None)
    }

    /// Stops every process gracefully: SIGTERM, the proxies first (they say goodbye to the
    /// broker), each waited for.
    pub fn stop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
                let _ = child.wait();
            }
        }
        self.children.clear();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `N` distinct free loopback addresses: all bound at once, then released (so that no two are
/// the same port; another process may still take one meanwhile, which [`Network::start`]
/// notices).
pub fn free_addrs<const N: usize>() -> Result<[String; N]> {
    let listeners = (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    let addrs = listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<std::io::Result<Vec<_>>>()?;
    Ok(addrs.try_into().expect("N addresses"))
}

/// A field only the broker's `/v1/health` answer has…
const BROKER_HEALTH: &str = "\"proxies_online\"";
/// …and one only a proxy's has: a health check answered by another process on the port is not
/// taken for the one started.
const PROXY_HEALTH: &str = "\"broker_online_s\"";

impl Network {
    /// Waits (at most 60 s, or until `cancel`) until `name`, just started, answers its health
    /// check on `addr` with `marker` in it. Fails at once if any process started has exited:
    /// when a port was taken meanwhile, the process that should serve it does not, and some
    /// other one may answer.
    fn wait_healthy(&mut self, name: &str, addr: &str, marker: &str, cancel: &AtomicBool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !cancel.load(Ordering::SeqCst) {
            if let Some(exit) = self.exited()? {
                let log = self.spec.logs.as_ref().map(|d| format!(" (logs in {})", d.display())).unwrap_or_default();
                bail!("{exit} while {name} was starting on {addr}{log}");
            }
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(s, "GET /v1/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 200") && answer.contains(marker) {
                    return Ok(());
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!("{name} did not become healthy on {addr}")
    }
}

/// The directory of the running executable: where cargo puts the sibling binaries.
pub fn own_bin_dir() -> Option<PathBuf> {
    std::env::current_exe().ok()?.parent().map(Path::to_path_buf)
}
