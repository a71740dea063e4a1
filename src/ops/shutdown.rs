//! Graceful shutdown. One flag, raised once (SIGTERM, Ctrl-C, or [`Stopper::stop`]):
//! - health answers 503, so a load balancer stops sending;
//! - long-polls answer at once with what they have (as if their `wait_time` had passed);
//! - event streams end cleanly after a last comment, so clients reconnect and resume with
//!   `Last-Event-ID`;
//! - then the HTTP server stops accepting and gives in-flight requests the grace period
//!   (`SHUTDOWN_GRACE`) to finish before it closes what is left.

use std::{io, sync::Arc, time::Duration};

use actix_web::dev::{Server, ServerHandle};
use tokio::sync::{oneshot, watch};

/// Where a process is in its life: serving, draining (the shutdown flag is up: in-flight
/// requests finish, no wait starts), or drained (the server has stopped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Serving,
    Draining,
    Drained,
}

/// Watches the shutdown flag; cheap to clone into every long wait.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<Stage>);

impl Shutdown {
    /// A new flag, lowered, and the sender that raises it.
    pub fn new() -> (watch::Sender<Stage>, Self) {
        let (tx, rx) = watch::channel(Stage::Serving);
        (tx, Self(rx))
    }

    pub fn is_started(&self) -> bool {
        *self.0.borrow() >= Stage::Draining
    }

    /// Resolves once the flag is raised (never, if the sender is gone without raising it).
    pub async fn started(&self) {
        self.reached(Stage::Draining).await;
    }

    /// Resolves once the server has stopped: every in-flight request has finished (or the
    /// grace period is over).
    pub async fn drained(&self) {
        self.reached(Stage::Drained).await;
    }

    async fn reached(&self, stage: Stage) {
        let mut rx = self.0.clone();
        if rx.wait_for(|now| *now >= stage).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How long background work (a proxy's goodbye) may take after the drain.
const AFTER_DRAIN: Duration = Duration::from_secs(3);

/// Stops a running server: raise the flag, then stop gracefully.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<watch::Sender<Stage>>,
    server: ServerHandle,
    grace: Duration,
    /// Background work that must finish its own way out too (a proxy's goodbye to the broker).
    finishing: Arc<parking_lot::Mutex<Vec<oneshot::Receiver<()>>>>,
}

impl Stopper {
    pub fn new(flag: watch::Sender<Stage>, server: ServerHandle, grace: Duration) -> Self {
        Self { flag: Arc::new(flag), server, grace, finishing: Default::default() }
    }

    /// Makes [`Stopper::stop`] also wait (within the grace period) until `done` fires or drops.
    pub fn wait_for(&self, done: oneshot::Receiver<()>) {
        self.finishing.lock().push(done);
    }

    /// Raises the flag and stops the server gracefully; resolves when it and the work given
    /// to [`Stopper::wait_for`] have finished (at most the grace period after in-flight
    /// requests were asked to finish).
    /// Background work may wait for the drain ([`Shutdown::drained`]; the proxy holds its
    /// control connection until then, so that its last requests are still its instance's), and
    /// gets a few seconds after it.
    pub async fn stop(&self) {
        self.flag.send_replace(Stage::Draining);
        let finishing: Vec<_> = std::mem::take(&mut *self.finishing.lock());
        let drain = async {
            self.server.stop(true).await;
            self.flag.send_replace(Stage::Drained);
        };
        let background = tokio::time::timeout(self.grace + AFTER_DRAIN, futures_util::future::join_all(finishing));
        let (_, _) = tokio::join!(drain, background);
    }

    /// Raises the flag and stops the server without waiting for in-flight requests.
    pub async fn stop_now(&self) {
        self.flag.send_replace(Stage::Drained);
        self.server.stop(false).await;
    }

    /// Whether a stop has begun.
    pub fn is_stopping(&self) -> bool {
        *self.flag.borrow() >= Stage::Draining
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }
}

/// The grace period as the whole seconds actix takes (rounded up, at least one).
pub fn grace_secs(grace: Duration) -> u64 {
    grace.as_secs_f64().ceil().max(1.0) as u64
}

/// A server and the way to stop it.
pub struct Running {
    pub server: Server,
    pub stopper: Stopper,
}

/// Builds a Photon HTTP server (broker or proxy) the one way: `routes` with `state`, every request
/// observed by `observer`, actix's own signal handling off (ours raises the flag first), and
/// the grace period as its shutdown timeout.
pub fn http_server<S: Send + Sync + 'static>(
    state: actix_web::web::Data<S>,
    observer: Arc<super::requests::Observer>,
    routes: fn(&mut actix_web::web::ServiceConfig),
    workers: usize,
    grace: Duration,
    listener: std::net::TcpListener,
    flag: watch::Sender<Stage>,
) -> io::Result<Running> {
    let server = actix_web::HttpServer::new(move || {
        let observer = observer.clone();
        actix_web::App::new()
            .app_data(state.clone())
            .wrap(actix_web::middleware::from_fn(move |req, next| {
                super::requests::observe(observer.clone(), req, next)
            }))
            .configure(routes)
    })
    // Events and long-poll answers go out in several small writes (an SSE event's chunk
    // framing, then its lines); with Nagle's algorithm each write after the first waits for the
    // peer's ACK, which a stream reader delays by up to 40 ms. Measured: a round trip whose
    // worker and creator listen by SSE took 44 ms instead of about 1.
    .on_connect(|conn, _| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            if let Err(e) = tune_connection(tcp) {
                tracing::debug!(error = %e, "cannot set the TCP options of a connection");
            }
        }
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(grace_secs(grace))
    .listen(listener)?
    .run();
    let stopper = Stopper::new(flag, server.handle(), grace);
    Ok(Running { server, stopper })
}

/// How long data a server sent may stay unacknowledged before the connection counts as dead.
pub const DEAD_PEER: Duration = Duration::from_secs(45);
/// An idle connection is probed after this long without traffic (then every 15 s, 3 times).
pub const IDLE_PROBE: Duration = Duration::from_secs(60);

/// The TCP options of every accepted connection:
/// - `TCP_NODELAY`, see [`http_server`];
/// - `TCP_USER_TIMEOUT` of [`DEAD_PEER`]: a peer that vanished without a reset (host lost,
///   network cut, moved to a new address) leaves a writer's data unacknowledged, and Linux
///   would otherwise retransmit for about 15 minutes before the write fails. Until then the
///   broker would count that proxy online and refuse its restarted instance with 409;
/// - keep-alive probes after [`IDLE_PROBE`], for connections with nothing to write (a
///   long-poll), so a dead client's wait ends too.
pub fn tune_connection(tcp: &actix_web::rt::net::TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = socket2::SockRef::from(tcp);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(DEAD_PEER))?;
    let probes = socket2::TcpKeepalive::new().with_time(IDLE_PROBE).with_interval(Duration::from_secs(15));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "freebsd"))]
    let probes = probes.with_retries(3);
    socket.set_tcp_keepalive(&probes)
}

/// Runs `running` until it stops; SIGTERM or Ctrl-C stop it gracefully, a second signal ends
/// the process at once (exit code 1). For binaries; tests call [`Stopper::stop`].
pub async fn run_until_signalled(running: Running) -> io::Result<()> {
    let stopper = running.stopper.clone();
    let (stopped, stop_done) = oneshot::channel::<()>();
    actix_web::rt::spawn(async move {
        let Ok(signal) = next_signal().await else {
            tracing::error!("cannot listen for SIGTERM; stop with SIGKILL");
            return;
        };
        tracing::info!(signal, grace_s = stopper.grace().as_secs_f64(), "shutting down: finishing in-flight requests");
        tokio::select! {
            _ = stopper.stop() => { let _ = stopped.send(()); }
            second = next_signal() => {
                tracing::warn!(signal = second.unwrap_or("?"), "second signal: stopping now");
                std::process::exit(1);
            }
        }
    });
    running.server.await?;
    // The server is done; the stop's background work (the goodbye) may still be under way.
    if running.stopper.is_stopping() {
        let _ = tokio::time::timeout(AFTER_DRAIN + Duration::from_secs(1), stop_done).await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn next_signal() -> io::Result<&'static str> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|()| "Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_give_up_on_a_dead_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        tune_connection(&tcp).unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert!(tcp.nodelay().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(DEAD_PEER));
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), IDLE_PROBE);
    }

    #[tokio::test]
    async fn the_flag_wakes_every_watcher() {
        let (tx, flag) = Shutdown::new();
        let watchers: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn({
                    let f = flag.clone();
                    async move { f.started().await }
                })
            })
            .collect();
        assert!(!flag.is_started());
        tx.send_replace(Stage::Draining);
        for w in watchers {
            tokio::time::timeout(Duration::from_secs(5), w).await.unwrap().unwrap();
        }
        assert!(flag.is_started());
        // A watcher that starts after the flag went up returns at once.
        tokio::time::timeout(Duration::from_secs(1), flag.started()).await.unwrap();
    }

    #[test]
    fn grace_rounds_up_to_whole_seconds() {
        assert_eq!(grace_secs(Duration::from_millis(10)), 1);
        assert_eq!(grace_secs(Duration::from_millis(2500)), 3);
        assert_eq!(grace_secs(Duration::from_secs(10)), 10);
    }
}
