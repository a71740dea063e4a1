//! `photon-proxy`: one per site. Apps talk plain HTTP to it with an API key; it checks and seals
//! what they send, relays through the broker over outbound HTTP only, and opens and checks what
//! comes back.
//!
//! Crate map: [`config`] (flags, environment, app keys), [`auth`] (API keys), [`upstream`] (the
//! signed session to the broker; fetches certificates and the revocation list), [`control`]
//! (the long-lived connection that shows this proxy online), [`keyring`] (own and peer keys,
//! pairwise keys, revocation), [`seal`] (bodies ↔ sealed envelopes, refusals), [`http`] (the
//! app API), [`hub`] (one broker result stream shared by an app's concurrent readers of a
//! task). Metrics, request logs and graceful shutdown come from `photon::ops`.
#![forbid(unsafe_code)]

pub mod auth;
pub mod batch;
pub mod config;
pub mod control;
pub mod http;
pub mod hub;
pub mod keyring;
pub mod seal;
pub mod upstream;

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix_web::web;
use photon::{
    crypto::RootCert,
    ops::{
        metrics::spawn_reporter,
        requests::Observer,
        shutdown::{http_server, Running},
        Level, Metrics, Shutdown,
    },
};

pub use config::ProxyConfig;
use upstream::{OwnFiles, Upstream, UpstreamError};

/// What every handler shares.
pub struct ProxyState {
    pub config: ProxyConfig,
    pub keys: auth::AppKeys,
    pub upstream: Upstream,
    pub refusals: seal::Refusals,
    /// The control connection to the broker.
    pub link: control::Link,
    pub observer: Arc<Observer>,
    /// App long-polls waiting now.
    pub waiters: Arc<Level>,
    /// App event streams open now.
    pub streams: Arc<Level>,
    /// Broker result streams shared by several readers.
    pub hubs: Arc<hub::Hubs>,
    /// Task creations and result puts on their way to the broker, batched under load.
    pub uploads: batch::Uploads,
    pub shutdown: Shutdown,
}

impl ProxyState {
    /// How long a wait given only a count may last: this proxy's `MAX_WAIT`, or the broker's if
    /// that is shorter (asked for longer, the broker would refuse the wait with 400).
    pub fn longest_wait(&self) -> std::time::Duration {
        self.upstream.broker_max_wait().map_or(self.config.max_wait, |b| b.min(self.config.max_wait))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Crypto(#[from] photon::crypto::CryptoError),
    #[error("{setting}: {error}")]
    Setting { setting: &'static str, error: photon::crypto::CryptoError },
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Metrics(String),
}

/// Loads keys, gets this proxy's certificate (from `CERT_FILE` or the broker, retrying for up
/// to `patience` while the broker comes up), opens the control connection and builds the
/// server on `listener`. Starts the refresh of the revocation list and of its own certificate
/// every `CERT_REFRESH`. Call inside an actix `System`; await the server and stop it through
/// its [`Stopper`].
pub async fn serve(config: ProxyConfig, listener: TcpListener, patience: Duration) -> Result<Running, StartError> {
    let setting = |setting| move |error| StartError::Setting { setting, error };
    let root = RootCert::load(&config.rootcert_file).map_err(setting("ROOTCERT_FILE"))?;
    photon::crypto::ca::read_to_string(&config.privkey_file).map_err(setting("PRIVKEY_FILE"))?;
    if let Some(cert_file) = &config.cert_file {
        photon::crypto::ca::read_to_string(cert_file).map_err(setting("CERT_FILE"))?;
    }
    let files = OwnFiles { privkey_file: config.privkey_file.clone(), cert_file: config.cert_file.clone() };
    let give_up = tokio::time::Instant::now() + patience;
    let mut upstream = loop {
        match Upstream::connect(
            &config.broker_url,
            &config.broker_id,
            &config.proxy_id,
            files.clone(),
            root.clone(),
            config.cert_refresh,
        )
        .await
        {
            Ok(u) => break u,
            Err(e @ (UpstreamError::Unreachable(_) | UpstreamError::Timeout))
                if tokio::time::Instant::now() < give_up =>
            {
                tracing::info!(error = %e, "waiting for the broker");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let metrics =
        Metrics::start(config.ops.statsd.as_ref(), &[("component", "proxy"), ("proxy_id", config.proxy_id.as_str())])
            .map_err(StartError::Metrics)?;
    upstream.metrics = metrics.clone();
    upstream.max_detached = seal::detached_limit(config.max_body);
    let addr = listener.local_addr()?;
    let workers = config.workers;
    let grace = config.ops.shutdown_grace;
    tracing::info!(%addr, proxy = %config.proxy_id, apps = config.apps.len(), "proxy listening");
    let refresh = config.cert_refresh;
    let (raise, shutdown) = Shutdown::new();
    let state = Arc::new(ProxyState {
        keys: auth::AppKeys::new(&config.apps),
        config,
        upstream,
        refusals: seal::Refusals::new(metrics.clone()),
        link: control::Link::default(),
        observer: Observer::new(metrics.clone()),
        waiters: Default::default(),
        streams: Default::default(),
        hubs: Default::default(),
        uploads: Default::default(),
        shutdown: shutdown.clone(),
    });
    state.upstream.refresh().await;
    // Online before serving when the broker lets us; otherwise the loop keeps trying, and
    // health says why meanwhile.
    let first = match control::open(&state.upstream).await {
        Ok(open) => Some(open),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the control connection yet; retrying in the background");
            state.link.failed(&e);
            None
        }
    };
    let (control_done, control_finished) = tokio::sync::oneshot::channel();
    let control_state = state.clone();
    actix_web::rt::spawn(async move {
        control::run(control_state, first).await;
        let _ = control_done.send(());
    });
    let weak = Arc::downgrade(&state);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            state.upstream.refresh().await;
        }
    });
    let weak = Arc::downgrade(&state);
    spawn_reporter(metrics, Duration::from_secs(1), shutdown, move |m| {
        let Some(state) = weak.upgrade() else { return false };
        m.gauge("waiters", state.waiters.get(), &[]);
        m.gauge("streams.open", state.streams.get(), &[]);
        m.gauge("hubs.open", state.hubs.open() as u64, &[]);
        m.gauge("broker.connected", u64::from(state.link.online_for().is_some()), &[]);
        state.observer.report();
        true
    });
    let observer = state.observer.clone();
    let running = http_server(web::Data::new(state), observer, http::routes, workers, grace, listener, raise)?;
    running.stopper.wait_for(control_finished);
    Ok(running)
}
