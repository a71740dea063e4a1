//! The proxy's only connection: outbound HTTP to the broker (through `HTTPS_PROXY`/`HTTP_PROXY`
//! when set — reqwest reads them). Keeps one authenticated session, opened with a signed
//! handshake and renewed before it runs out, and signs every request with it.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use parking_lot::RwLock;
use photon::{
    crypto::{
        cert::VerifiedCert,
        session::{self, ClientSession, Identity},
        unix_millis, CryptoError, RootCert,
    },
    http::{error::REAUTH_HEADER, ApiError},
    wire::{
        broker::{self as bw, SessionAccept},
        AppId, ErrorBody, ProxyId,
    },
};
use reqwest::{Method, StatusCode};

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the broker: {0}")]
    Unreachable(String),
    #[error("the broker did not answer in time")]
    Timeout,
    #[error("the broker refused this proxy: {0}")]
    Refused(String),
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

impl From<reqwest::Error> for UpstreamError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else {
            // Without the URL: it holds nothing secret, but the chain is what helps.
            let e = e.without_url();
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            Self::Unreachable(msg)
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout => ApiError::GatewayTimeout(e.to_string()),
            _ => ApiError::BadGateway(e.to_string()),
        }
    }
}

pub struct Upstream {
    http: reqwest::Client,
    base: String,
    broker_id: String,
    root: RootCert,
    identity: Identity,
    session: RwLock<Option<Arc<ClientSession>>>,
    /// Serializes handshakes so a burst of requests makes one session, not many.
    handshake: tokio::sync::Mutex<()>,
}

impl Upstream {
    /// Loads the key and root; the certificate comes from `cert_file` or, without one, from
    /// the broker (checked against the root and against the private key either way).
    pub async fn connect(
        broker_url: &str,
        broker_id: &str,
        proxy_id: &ProxyId,
        key_pem: &str,
        root: RootCert,
        cert_pem: Option<String>,
    ) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let cert_pem = match cert_pem {
            Some(pem) => pem,
            None => {
                let url = format!("{broker_url}/v1/certs/{proxy_id}");
                let res = http.get(url).timeout(Duration::from_secs(10)).send().await?;
                if !res.status().is_success() {
                    return Err(UpstreamError::Refused(format!(
                        "no certificate for {proxy_id} at the broker ({}); sign this proxy's CSR with `photon-broker ca sign`",
                        res.status()
                    )));
                }
                res.text().await?
            }
        };
        let cert: VerifiedCert = root.verify(&cert_pem, (unix_millis() / 1000) as i64)?;
        if cert.subject != proxy_id.as_str() {
            return Err(
                CryptoError::Certificate(format!("the certificate names {:?}, not {proxy_id}", cert.subject)).into()
            );
        }
        let identity = Identity::new(key_pem, cert_pem, &cert)?;
        Ok(Self {
            http,
            base: broker_url.to_owned(),
            broker_id: broker_id.to_owned(),
            root,
            identity,
            session: RwLock::new(None),
            handshake: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> Option<Arc<ClientSession>> {
        self.session.read().as_ref().filter(|s| !s.needs_renewal()).cloned()
    }

    async fn session(&self) -> Result<Arc<ClientSession>, UpstreamError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _one_at_a_time = self.handshake.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let pending = session::client_hello(&self.identity, &self.broker_id);
        let res = self
            .http
            .post(format!("{}/v1/session", self.base))
            .json(&pending.hello)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        if !res.status().is_success() {
            let status = res.status();
            let reason = res.json::<ErrorBody>().await.map(|e| e.error).unwrap_or_default();
            return Err(UpstreamError::Refused(format!("handshake answered {status}: {reason}")));
        }
        let accept: SessionAccept = res.json().await?;
        let s = Arc::new(session::client_finish(pending, &accept, &self.root, &self.broker_id)?);
        tracing::info!(proxy = %self.identity.id, "session with the broker opened");
        *self.session.write() = Some(s.clone());
        Ok(s)
    }

    fn forget(&self, stale: &ClientSession) {
        let mut guard = self.session.write();
        if guard.as_ref().is_some_and(|s| s.id == stale.id) {
            *guard = None;
        }
    }

    /// Opens (or checks) the session now; used at start and by health.
    pub async fn ensure_session(&self) -> Result<(), UpstreamError> {
        self.session().await.map(drop)
    }

    /// Sends one signed request for `app`. A session the broker no longer knows is replaced
    /// once, transparently. `timeout` bounds the whole exchange when given (not for streams).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        app: &AppId,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = reqwest::Url::parse(&format!("{}{path_and_query}", self.base))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let signed_path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        for attempt in 0..2 {
            let session = self.session().await?;
            let auth = session.sign(method.as_str(), &signed_path, app.as_str(), &body);
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header(bw::APP_HEADER, app.as_str())
                .header(bw::SESSION_HEADER, &auth.session)
                .header(bw::SEQ_HEADER, auth.seq)
                .header(bw::TS_HEADER, auth.ts)
                .header(bw::MAC_HEADER, &auth.mac);
            if !body.is_empty() {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let res = req.send().await?;
            if res.status() == StatusCode::UNAUTHORIZED && res.headers().contains_key(REAUTH_HEADER) && attempt == 0 {
                self.forget(&session);
                continue;
            }
            if res.status() == StatusCode::UNAUTHORIZED {
                let reason = res.json::<ErrorBody>().await.map(|e| e.error).unwrap_or_default();
                return Err(UpstreamError::Refused(reason));
            }
            return Ok(res);
        }
        Err(UpstreamError::Refused("session renewal failed".into()))
    }

    /// The broker's health endpoint answers.
    pub async fn broker_healthy(&self) -> Result<(), UpstreamError> {
        let res = self.http.get(format!("{}/v1/health", self.base)).timeout(Duration::from_secs(3)).send().await?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(UpstreamError::Refused(format!("broker health answered {}", res.status())))
        }
    }
}
