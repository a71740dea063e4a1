//! Test harness: a whole Photon network (broker + two proxies, fresh CA) on free loopback ports,
//! running in its own thread and actix System, plus a small app-side HTTP and SSE client.
#![allow(dead_code)]

pub mod relay;

use std::{
    collections::HashMap,
    net::TcpListener,
    path::PathBuf,
    sync::{mpsc as std_mpsc, Arc},
    thread,
    time::Duration,
};

use futures_util::StreamExt;
use photon::{
    config::{OpsConfig, Secret},
    crypto::ca,
    ops::{StatsdConfig, Stopper},
    wire::ProxyId,
    BrokerConfig,
};
use photon_proxy::ProxyConfig;
use reqwest::{header, Client, Response};
use serde_json::{json, Value};

pub const KEY: &str = "App1Secret";
pub const APP1: &str = "app1.proxy1.broker";
pub const APP2: &str = "app2.proxy2.broker";
/// A second app behind proxy1, for visibility checks.
pub const APP3: &str = "app3.proxy1.broker";

/// Knobs a test may turn.
#[derive(Clone)]
pub struct Options {
    pub keepalive: Duration,
    pub max_body: usize,
    pub max_wait: Duration,
    /// The proxies' `MAX_WAIT`, when it is not the broker's.
    pub proxy_max_wait: Option<Duration>,
    /// The proxies' `CERT_REFRESH`.
    pub cert_refresh: Duration,
    /// Put a [`relay::Relay`] between the proxies and the broker.
    pub relay: bool,
    /// Run the broker as a child process (`photon-broker`, `RUST_LOG=trace`, its log in
    /// [`Net::broker_log`]) instead of in this process.
    pub broker_process: bool,
    /// Send StatsD metrics to this UDP port on 127.0.0.1.
    pub statsd_port: Option<u16>,
    /// The broker's `MONITORING_API_KEY`.
    pub monitoring_key: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(15),
            max_body: 10 * 1024 * 1024,
            max_wait: Duration::from_secs(3600),
            proxy_max_wait: None,
            cert_refresh: Duration::from_secs(60),
            relay: false,
            broker_process: false,
            statsd_port: None,
            monitoring_key: None,
        }
    }
}

pub struct Net {
    pub broker: String,
    pub proxy1: String,
    pub proxy2: String,
    pub pki: PathBuf,
    /// The broker in the middle, when [`Options::relay`] asked for one.
    pub relay: Option<Arc<relay::Relay>>,
    /// The broker child process, when [`Options::broker_process`] asked for one.
    pub broker_child: Option<std::process::Child>,
    pub broker_log: PathBuf,
    /// Stops the in-process broker (when there is one) and the proxies, gracefully.
    pub broker_stop: Option<Stopper>,
    pub proxy_stops: Vec<Stopper>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    pub http: Client,
    /// The URL proxies use for the broker (the relay's, when there is one).
    pub broker_url: String,
    pub opts: Options,
    pub ops: OpsConfig,
}

/// The configuration of proxy `<name>.broker` serving `apps`, as the test network runs it.
pub fn proxy_config(
    pki: &std::path::Path,
    name: &str,
    apps: &[&str],
    broker_url: &str,
    opts: &Options,
    ops: &OpsConfig,
) -> ProxyConfig {
    let proxy_id = ProxyId::parse(&format!("{name}.broker")).unwrap();
    ProxyConfig {
        apps: apps.iter().map(|a| (proxy_id.app(a).unwrap(), KEY.to_string())).collect::<HashMap<_, _>>(),
        privkey_file: pki.join(format!("{proxy_id}.priv.pem")),
        proxy_id,
        broker_url: broker_url.to_owned(),
        broker_id: "broker".into(),
        rootcert_file: pki.join(ca::ROOT_CERT),
        cert_file: None,
        max_body: opts.max_body,
        max_ttl: Duration::from_secs(7 * 86_400),
        max_wait: opts.proxy_max_wait.unwrap_or(opts.max_wait),
        keepalive: opts.keepalive,
        workers: 2,
        cert_refresh: opts.cert_refresh,
        ops: ops.clone(),
    }
}

/// A proxy started on its own (own thread and actix System), e.g. a second instance of one.
pub struct ExtraProxy {
    pub url: String,
    pub stopper: Stopper,
    thread: Option<thread::JoinHandle<()>>,
}

impl ExtraProxy {
    pub fn start(config: ProxyConfig) -> Self {
        let l = listener();
        let url = url(&l);
        let (tx, rx) = std_mpsc::channel();
        let thread = thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let running = photon_proxy::serve(config, l, Duration::from_secs(10)).await.expect("proxy starts");
                tx.send(running.stopper.clone()).unwrap();
                let _ = running.server.await;
            });
        });
        let stopper = rx.recv_timeout(Duration::from_secs(30)).expect("the extra proxy starts");
        Self { url, stopper, thread: Some(thread) }
    }
}

impl Drop for ExtraProxy {
    fn drop(&mut self) {
        let stopper = self.stopper.clone();
        // Stop from a runtime of its own: Drop may run inside the test's runtime.
        let _ = thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(stopper.stop_now())
        })
        .join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fresh CA for broker `broker` in a temporary directory, with keys and certificates for
/// proxy1.broker and proxy2.broker.
pub fn make_pki() -> PathBuf {
    let pki = std::env::temp_dir().join(format!("photon-test-{}", uuid::Uuid::new_v4()));
    ca::init(&pki, "broker", 30).unwrap();
    for proxy in ["proxy1.broker", "proxy2.broker"] {
        let id = ProxyId::parse(proxy).unwrap();
        let (key, csr) = ca::keygen(&id).unwrap();
        ca::write_private(&pki.join(format!("{proxy}.priv.pem")), &key).unwrap();
        ca::sign(&pki, "broker", &csr, 30).unwrap();
    }
    pki
}

pub fn append(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()
}

pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port")
}

fn url(l: &TcpListener) -> String {
    format!("http://{}", l.local_addr().unwrap())
}

impl Net {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        let pki = make_pki();
        let (b, p1, p2) = (listener(), listener(), listener());
        let (broker, proxy1, proxy2) = (url(&b), url(&p1), url(&p2));
        let broker_log = pki.join("broker.log");
        let (b, broker_child) = if opts.broker_process {
            let addr = b.local_addr().unwrap();
            drop(b); // the child binds the port
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_photon-broker"))
                .env("BIND_ADDR", addr.to_string())
                .env("BROKER_URL", &broker)
                .env("BROKER_ID", "broker")
                .env("PKI_DIR", &pki)
                .env("RUST_LOG", "trace")
                .env("WORKERS", "2")
                .stdout(append(&broker_log))
                .stderr(append(&broker_log))
                .spawn()
                .expect("photon-broker starts");
            (None, Some(child))
        } else {
            (Some(b), None)
        };
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = opts.relay.then(|| Arc::new(relay::Relay::default()));
        let relay_listener = opts.relay.then(listener);
        let broker_url = match &relay_listener {
            Some(l) => url(l),
            None => broker.clone(),
        };
        if let Some(r) = &relay {
            *r.broker.lock() = broker.clone();
        }
        let relay_for_thread = relay.clone();
        let dir = pki.clone();
        let ops = OpsConfig {
            statsd: opts.statsd_port.map(|port| StatsdConfig {
                host: "127.0.0.1".into(),
                port,
                prefix: "photon".into(),
            }),
            shutdown_grace: Duration::from_secs(5),
        };
        let (net_opts, net_ops, net_broker_url) = (opts.clone(), ops.clone(), broker_url.clone());
        let (stops_tx, stops_rx) = std_mpsc::channel::<(Option<Stopper>, Vec<Stopper>)>();
        let thread = thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let config = BrokerConfig {
                    broker_id: "broker".into(),
                    pki_dir: dir.clone(),
                    max_ttl: Duration::from_secs(7 * 86_400),
                    max_wait: opts.max_wait,
                    max_body: opts.max_body * 2,
                    keepalive: opts.keepalive,
                    workers: 2,
                    session_lifetime: Duration::from_secs(3600),
                    monitoring_api_key: opts.monitoring_key.clone().map(Secret),
                    ops: ops.clone(),
                };
                let mut broker_stop = None;
                if let Some(b) = b {
                    let broker = photon::serve(config, b).expect("broker starts");
                    broker_stop = Some(broker.stopper.clone());
                    actix_web::rt::spawn(broker.server);
                }
                let mut handles = vec![];
                let mut proxy_stops = vec![];
                if let (Some(relay), Some(l)) = (relay_for_thread, relay_listener) {
                    let data = actix_web::web::Data::new(relay);
                    let server = actix_web::HttpServer::new(move || {
                        actix_web::App::new().app_data(data.clone()).configure(relay::routes)
                    })
                    .workers(1)
                    .listen(l)
                    .unwrap()
                    .run();
                    handles.push(server.handle());
                    actix_web::rt::spawn(server);
                }
                for (listener, name, apps) in
                    [(p1, "proxy1", ["app1", "app3"].as_slice()), (p2, "proxy2", ["app2"].as_slice())]
                {
                    let config = proxy_config(&dir, name, apps, &broker_url, &opts, &ops);
                    let running =
                        photon_proxy::serve(config, listener, Duration::from_secs(10)).await.expect("proxy starts");
                    proxy_stops.push(running.stopper.clone());
                    actix_web::rt::spawn(running.server);
                }
                stops_tx.send((broker_stop.clone(), proxy_stops.clone())).unwrap();
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
                for h in handles {
                    h.stop(false).await;
                }
                for s in proxy_stops {
                    s.stop_now().await;
                }
                if let Some(s) = broker_stop {
                    s.stop_now().await;
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("network starts");
        let (broker_stop, proxy_stops) = stops_rx.recv().unwrap();
        Net {
            broker_stop,
            proxy_stops,
            broker,
            proxy1,
            proxy2,
            pki,
            relay,
            broker_child,
            broker_log,
            stop: Some(stop_tx),
            thread: Some(thread),
            http: Client::new(),
            broker_url: net_broker_url,
            opts: net_opts,
            ops: net_ops,
        }
    }

    /// The proxy an app lives behind.
    pub fn proxy_of(&self, app: &str) -> &str {
        if app.contains(".proxy2.") {
            &self.proxy2
        } else {
            &self.proxy1
        }
    }

    pub fn get(&self, app: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.proxy_of(app)))
            .header(header::AUTHORIZATION, format!("ApiKey {app} {KEY}"))
    }

    /// `GET path` as `app`, asking for Server-Sent Events.
    pub fn events(&self, app: &str, path: &str) -> reqwest::RequestBuilder {
        self.get(app, path).header(header::ACCEPT, "text/event-stream")
    }

    pub fn post(&self, app: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.proxy_of(app)))
            .header(header::AUTHORIZATION, format!("ApiKey {app} {KEY}"))
    }

    pub fn put(&self, app: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .put(format!("{}{path}", self.proxy_of(app)))
            .header(header::AUTHORIZATION, format!("ApiKey {app} {KEY}"))
    }

    /// Creates a task from `from` to `to` and returns its id.
    pub async fn create(&self, from: &str, to: &[&str], body: Value, ttl: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let res = self.post(from, "/v1/tasks").json(&task(&id, from, to, body, ttl)).send().await.unwrap();
        assert_eq!(res.status(), 201, "{:?}", res.text().await);
        id
    }

    /// Puts a result; returns the status code.
    pub async fn answer(&self, worker: &str, task_id: &str, to: &str, status: &str, body: Value) -> u16 {
        let r = json!({"from": worker, "to": [to], "task": task_id, "status": status, "body": body, "metadata": null});
        let res = self.put(worker, &format!("/v1/tasks/{task_id}/results/{worker}")).json(&r).send().await.unwrap();
        res.status().as_u16()
    }

    /// The counts of refused messages a proxy reports on its health endpoint.
    pub async fn refused(&self, proxy: &str) -> Value {
        let health: Value = self.http.get(format!("{proxy}/v1/health")).send().await.unwrap().json().await.unwrap();
        health["refused"].clone()
    }

    /// The broker's health answer (whatever its status).
    pub async fn broker_health(&self) -> Value {
        self.http.get(format!("{}/v1/health", self.broker)).send().await.unwrap().json().await.unwrap()
    }

    /// A proxy's health: status and answer.
    pub async fn health(&self, proxy: &str) -> (u16, Value) {
        let res = self.http.get(format!("{proxy}/v1/health")).send().await.unwrap();
        (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
    }

    pub async fn broker_tasks(&self) -> u64 {
        let health: Value =
            self.http.get(format!("{}/v1/health", self.broker)).send().await.unwrap().json().await.unwrap();
        health["tasks"].as_u64().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(mut child) = self.broker_child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pki);
    }
}

pub fn task(id: &str, from: &str, to: &[&str], body: Value, ttl: &str) -> Value {
    json!({"id": id, "from": from, "to": to, "body": body, "ttl": ttl, "failure_strategy": "discard", "metadata": {"kind": "test"}})
}

pub async fn json_of(res: Response) -> Value {
    res.json().await.unwrap()
}

/// One Server-Sent Event, or a comment line (`event` = "comment").
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// Reads an SSE response event by event.
pub struct Sse {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    pub fn new(res: Response) -> Self {
        assert_eq!(res.status(), 200);
        assert!(res.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
        Self { body: res.bytes_stream().boxed(), buf: String::new() }
    }

    /// The next event or comment; `None` when the stream ends. Panics after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Event> {
        tokio::time::timeout(within, self.next_inner()).await.expect("an SSE event in time")
    }

    async fn next_inner(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Event { event: "message".into(), id: None, data: String::new() };
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.event = "comment".into();
                        ev.data = c.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        ev.data.push_str(v.trim_start());
                    }
                }
                return Some(ev);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                _ => return None,
            }
        }
    }

    /// The next event that is not a comment.
    pub async fn next_event(&mut self, within: Duration) -> Option<Event> {
        loop {
            match self.next(within).await {
                Some(e) if e.event == "comment" => continue,
                other => return other,
            }
        }
    }
}

pub const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Polls `check` every 100 ms until it holds; fails the test after 15 s.
pub async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(std::time::Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
