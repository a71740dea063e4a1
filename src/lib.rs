//! Photon: a broker that stores and forwards tasks and results between site proxies, reading
//! nothing but their routing fields (bodies are opaque envelopes).
//!
//! Crate map:
//! - [`wire`]: the JSON shapes of the app API and the proxy↔broker protocol (serde only).
//! - [`crypto`]: the built-in CA, certificate checks, the authenticated proxy session.
//! - [`actors`]: the engine — one actor per task, the expiry actor, per-app mailboxes.
//! - [`http`]: the broker's routes; thin handlers over [`actors::Engine`].
//! - [`http1`]: a lean HTTP/1.1 client (the proxy's plain requests to the broker, the loadtest).
//! - [`presence`]: which proxies hold a control connection now (monitoring, one instance per id).
//! - [`ops`]: StatsD metrics, request logs, graceful shutdown (shared with the proxy).
//! - [`config`]: the broker's configuration and its command line.
//!
//! The proxy (`photon-proxy`) uses `wire` and `crypto` from here; it talks to the broker only
//! over HTTP.
// One function calls into the C allocator (`ops::memory`); everything else is safe code.
#![deny(unsafe_code)]

pub mod actors;
pub mod config;
pub mod crypto;
pub mod http;
pub mod http1;
pub mod ops;
pub mod presence;
pub mod urls;
pub mod wire;

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix_web::web;

use crate::{
    actors::{Engine, EngineLimits},
    crypto::{
        ca,
        directory::CertDirectory,
        session::{Identity, SessionStore},
        RootCert,
    },
    http::BrokerState,
    ops::{
        metrics::spawn_reporter,
        requests::Observer,
        shutdown::{http_server, Running},
        Metrics, Shutdown,
    },
};

pub use config::BrokerConfig;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}; run `photon-broker ca init` (or `cargo xtask dev`) to make the CA files")]
    Pki(#[from] crypto::CryptoError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Metrics(String),
}

/// Loads the broker's PKI and builds the server on `listener`. Call inside an actix `System`;
/// await the returned server, and stop it through its [`Stopper`] (binaries: on SIGTERM, with
/// [`ops::shutdown::run_until_signalled`]).
pub fn serve(config: BrokerConfig, listener: TcpListener) -> Result<Running, StartError> {
    let root = RootCert::load(&config.pki_dir.join(ca::ROOT_CERT))?;
    let cert_pem = ca::read_to_string(&config.pki_dir.join(ca::BROKER_CERT))?;
    let cert = root.verify(&cert_pem, (crypto::unix_millis() / 1000) as i64)?;
    if cert.subject != config.broker_id {
        return Err(crypto::CryptoError::Certificate(format!(
            "broker.crt names {:?} but BROKER_URL gives broker id {:?}",
            cert.subject, config.broker_id
        ))
        .into());
    }
    let key_pem = ca::read_to_string(&config.pki_dir.join(ca::BROKER_KEY))?;
    let identity = Identity::new(&key_pem, cert_pem, &cert)?;
    let root_key = config.pki_dir.join(ca::ROOT_KEY);
    if root_key.exists() {
        // Fine for a dev network; in production it undoes what the seal promises against the
        // broker (docs/CRYPTO.md, section 9).
        tracing::warn!(path = %root_key.display(), "the CA's root key is on the broker host: with it the broker could issue certificates for any site; keep it elsewhere (the broker never reads it)");
    }
    let limits =
        EngineLimits { broker_id: config.broker_id.clone(), max_ttl: config.max_ttl, max_wait: config.max_wait };
    let (raise, shutdown) = Shutdown::new();
    let metrics = Metrics::start(
        config.ops.statsd.as_ref(),
        &[("component", "broker"), ("broker_id", config.broker_id.as_str())],
    )
    .map_err(StartError::Metrics)?;
    let state = Arc::new(BrokerState {
        engine: Engine::start(limits, config.workers, shutdown.clone()),
        sessions: SessionStore::new(identity, root.clone(), config.broker_id.clone(), config.session_lifetime),
        certs: CertDirectory::new(config.pki_dir.clone(), root),
        max_body: config.max_body,
        keepalive: config.keepalive,
        presence: Default::default(),
        observer: Observer::new(metrics.clone()),
        waiters: Default::default(),
        streams: Default::default(),
        shutdown: shutdown.clone(),
        monitoring_key: config.monitoring_api_key.clone(),
        cert_not_after: cert.not_after_unix,
        started: std::time::Instant::now(),
    });
    spawn_housekeeping(&state);
    let weak = Arc::downgrade(&state);
    spawn_reporter(metrics, Duration::from_secs(1), shutdown, move |m| {
        let Some(state) = weak.upgrade() else { return false };
        m.gauge("tasks.live", state.engine.n_tasks() as u64, &[]);
        m.gauge("waiters", state.waiters.get(), &[]);
        m.gauge("streams.open", state.streams.get(), &[]);
        m.gauge("proxies.online", state.presence.n_online() as u64, &[]);
        state.engine.n_expired.report(m, "tasks.expired");
        state.observer.report();
        true
    });
    let addr = listener.local_addr()?;
    let observer = state.observer.clone();
    let grace = config.ops.shutdown_grace;
    let running = http_server(web::Data::new(state), observer, http::routes, config.workers, grace, listener, raise)?;
    tracing::info!(%addr, broker_id = %config.broker_id, "broker listening");
    Ok(running)
}

/// Every second: a changed revocation list ends the revoked proxies' sessions and control
/// connections at once. Every minute: expired sessions are swept.
fn spawn_housekeeping(state: &Arc<BrokerState>) {
    let weak = Arc::downgrade(state);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for n in 0u64.. {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            if let Some(crl) = state.certs.reload_crl() {
                let ended = state.sessions.drop_revoked(&crl);
                for proxy in &ended {
                    state.presence.kick(proxy, "the proxy's certificate is revoked");
                }
                if !ended.is_empty() {
                    tracing::info!(proxies = ?ended, "ended the sessions of revoked certificates");
                }
            }
            if n % 60 == 59 {
                state.sessions.sweep();
            }
        }
    });
}
