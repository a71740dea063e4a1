//! Photon: a broker that stores and forwards tasks and results between site proxies, reading
//! nothing but their routing fields (bodies are opaque envelopes).
//!
//! Crate map:
//! - [`wire`]: the JSON shapes of the app API and the proxy↔broker protocol (serde only).
//! - [`crypto`]: the built-in CA, certificate checks, the authenticated proxy session.
//! - [`actors`]: the engine — one actor per task, the expiry actor, per-app mailboxes.
//! - [`http`]: the broker's routes; thin handlers over [`actors::Engine`].
//! - [`config`]: the broker's configuration and its command line.
//!
//! The proxy (`photon-proxy`) uses `wire` and `crypto` from here; it talks to the broker only
//! over HTTP.
#![forbid(unsafe_code)]

pub mod actors;
pub mod config;
pub mod crypto;
pub mod http;
pub mod wire;

use std::{net::TcpListener, sync::Arc};

use actix_web::{web, App, HttpServer};

use crate::{
    actors::{Engine, EngineLimits},
    crypto::{
        ca,
        directory::CertDirectory,
        session::{Identity, SessionStore},
        RootCert,
    },
    http::BrokerState,
};

pub use config::BrokerConfig;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}; run `photon-broker ca init` (or `cargo xtask dev`) to make the CA files")]
    Pki(#[from] crypto::CryptoError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Loads the broker's PKI and builds the server on `listener`. Call inside an actix `System`;
/// await the returned server (tests spawn it and stop it through its handle).
pub fn serve(config: BrokerConfig, listener: TcpListener) -> Result<actix_web::dev::Server, StartError> {
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
    let limits =
        EngineLimits { broker_id: config.broker_id.clone(), max_ttl: config.max_ttl, max_wait: config.max_wait };
    let state = Arc::new(BrokerState {
        engine: Engine::start(limits, config.workers),
        sessions: SessionStore::new(identity, root.clone(), config.broker_id.clone(), config.session_lifetime),
        certs: CertDirectory::new(config.pki_dir.clone(), root),
        max_body: config.max_body,
        keepalive: config.keepalive,
    });
    let weak = Arc::downgrade(&state);
    actix_web::rt::spawn(async move {
        // Every second: a changed revocation list ends the revoked proxies' sessions at once.
        // Every minute: expired sessions are swept.
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        for n in 0u64.. {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            if let Some(crl) = state.certs.reload_crl() {
                let ended = state.sessions.drop_revoked(&crl);
                if ended > 0 {
                    tracing::info!(ended, "ended the sessions of revoked certificates");
                }
            }
            if n % 60 == 59 {
                state.sessions.sweep();
            }
        }
    });
    let addr = listener.local_addr()?;
    let data = web::Data::new(state);
    let server = HttpServer::new(move || App::new().app_data(data.clone()).configure(http::routes))
        .workers(config.workers)
        .listen(listener)?
        .run();
    tracing::info!(%addr, broker_id = %config.broker_id, "broker listening");
    Ok(server)
}

/// Sets up tracing from `RUST_LOG` (default `info`). Safe to call more than once.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}
