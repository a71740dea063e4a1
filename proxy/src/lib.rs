//! `photon-proxy`: one per site. Apps talk plain HTTP to it with an API key; it checks and seals
//! what they send, relays through the broker over outbound HTTP only, and opens and checks what
//! comes back.
//!
//! Crate map: [`config`] (flags, environment, app keys), [`auth`] (API keys), [`upstream`] (the
//! signed session to the broker; fetches certificates and the revocation list), [`keyring`]
//! (own and peer keys, pairwise keys, revocation), [`seal`] (bodies ↔ sealed envelopes, refusals),
//! [`http`] (the app API).
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod http;
pub mod keyring;
pub mod seal;
pub mod upstream;

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix_web::{web, App, HttpServer};
use photon::crypto::RootCert;

pub use config::ProxyConfig;
use upstream::{OwnFiles, Upstream, UpstreamError};

/// What every handler shares.
pub struct ProxyState {
    pub config: ProxyConfig,
    pub keys: auth::AppKeys,
    pub upstream: Upstream,
    pub refusals: seal::Refusals,
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
}

/// Loads keys, gets this proxy's certificate (from `CERT_FILE` or the broker, retrying for up
/// to `patience` while the broker comes up) and builds the server on `listener`. Starts the
/// refresh of the revocation list and of its own certificate every `CERT_REFRESH`. Call inside
/// an actix `System`.
pub async fn serve(
    config: ProxyConfig,
    listener: TcpListener,
    patience: Duration,
) -> Result<actix_web::dev::Server, StartError> {
    let setting = |setting| move |error| StartError::Setting { setting, error };
    let root = RootCert::load(&config.rootcert_file).map_err(setting("ROOTCERT_FILE"))?;
    photon::crypto::ca::read_to_string(&config.privkey_file).map_err(setting("PRIVKEY_FILE"))?;
    if let Some(cert_file) = &config.cert_file {
        photon::crypto::ca::read_to_string(cert_file).map_err(setting("CERT_FILE"))?;
    }
    let files = OwnFiles { privkey_file: config.privkey_file.clone(), cert_file: config.cert_file.clone() };
    let give_up = tokio::time::Instant::now() + patience;
    let upstream = loop {
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
            Err(UpstreamError::Unreachable(e)) if tokio::time::Instant::now() < give_up => {
                tracing::info!(error = %e, "waiting for the broker");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let addr = listener.local_addr()?;
    let workers = config.workers;
    tracing::info!(%addr, proxy = %config.proxy_id, apps = config.apps.len(), "proxy listening");
    let refresh = config.cert_refresh;
    let state = Arc::new(ProxyState {
        keys: auth::AppKeys::new(&config.apps),
        config,
        upstream,
        refusals: seal::Refusals::default(),
    });
    state.upstream.refresh().await;
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
    let data = web::Data::new(state);
    Ok(HttpServer::new(move || App::new().app_data(data.clone()).configure(http::routes))
        .workers(workers)
        .listen(listener)?
        .run())
}
