//! The proxy's only connection: outbound HTTP to the broker (through `HTTPS_PROXY`/`HTTP_PROXY`
//! when set — reqwest reads them). Keeps one authenticated session, opened with a signed
//! handshake and renewed before it runs out, and signs every request with it. Also fetches
//! what the [`Keyring`] needs: peers' certificates, the revocation list, and this proxy's own
//! renewed certificate.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use parking_lot::RwLock;
use photon::{
    crypto::{
        ca,
        cert::VerifiedCert,
        e2e::KeyId,
        session::{self, BodyDigest, ClientSession, Identity},
        unix_millis, CryptoError, RootCert,
    },
    http::{error::REAUTH_HEADER, ApiError},
    http1,
    urls::{self, Url},
    wire::{
        broker::{self as bw, SessionAccept},
        AppId, ErrorBody, ProxyId,
    },
};
use reqwest::{
    header::{HeaderName, HeaderValue, CONTENT_TYPE},
    Method, StatusCode,
};
use thread_local::ThreadLocal;

use crate::keyring::{Keyring, Own, Peer, PeerError};

/// After a fetched certificate did not carry the key a message names, that peer is not asked
/// for again for this long (a flood of messages naming unknown keys can't flood the broker).
const REFETCH_AFTER: Duration = Duration::from_secs(1);

// The session headers, named once (`.header("x-…", …)` would parse each name per request).
const APP: HeaderName = HeaderName::from_static(bw::APP_HEADER);
const INSTANCE: HeaderName = HeaderName::from_static(bw::INSTANCE_HEADER);
const SESSION: HeaderName = HeaderName::from_static(bw::SESSION_HEADER);
const SEQ: HeaderName = HeaderName::from_static(bw::SEQ_HEADER);
const TS: HeaderName = HeaderName::from_static(bw::TS_HEADER);
const MAC: HeaderName = HeaderName::from_static(bw::MAC_HEADER);
/// How a signed request's body is typed.
#[derive(Clone, Copy)]
enum BodyType {
    Json,
    /// A detached upload: JSON, a newline, the ciphertext.
    Octets,
}

impl BodyType {
    fn value(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Octets => "application/octet-stream",
        }
    }

    /// As the lean client's header line.
    fn line(self) -> &'static str {
        match self {
            Self::Json => "content-type: application/json",
            Self::Octets => "content-type: application/octet-stream",
        }
    }
}

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the broker: {0}")]
    Unreachable(String),
    #[error("the broker did not answer in time")]
    Timeout,
    #[error("the broker refused this proxy: {0}")]
    Refused(String),
    /// Another process with this proxy id is online at the broker.
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// An answer longer than the request allowed (see [`Upstream::call_within`]).
    #[error("the broker's answer is longer than the {0} bytes this request takes")]
    TooLarge(usize),
}

impl UpstreamError {
    /// A short name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Timeout => "timeout",
            Self::Refused(_) => "refused",
            Self::Duplicate(_) => "duplicate",
            Self::Crypto(_) => "crypto",
            Self::TooLarge(_) => "too_large",
        }
    }
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
            UpstreamError::Duplicate(_) => ApiError::Unavailable(format!("this proxy is refused by the broker: {e}")),
            _ => ApiError::BadGateway(e.to_string()),
        }
    }
}

/// Where this proxy's own key and certificate come from; read again on every refresh, so a
/// renewed certificate (or a new key with its certificate) is taken up without a restart.
#[derive(Clone, Debug)]
pub struct OwnFiles {
    pub privkey_file: PathBuf,
    /// Without it, the certificate is fetched from the broker.
    pub cert_file: Option<PathBuf>,
}

pub struct Upstream {
    /// One client per thread. reqwest drives each pooled connection on the runtime that opened
    /// it, and every HTTP worker is its own runtime: with one shared client, most requests went
    /// through another worker's thread and back (two cross-thread wake-ups per exchange). Each
    /// thread now keeps its own pool of connections to the broker.
    http: ThreadLocal<reqwest::Client>,
    /// Per thread too, the lean client's connections for plain requests ([`Upstream::call`]),
    /// when the broker is `http://` and no forward proxy is configured.
    lean: Option<(String, ThreadLocal<http1::Pool>)>,
    /// The broker's URL, parsed once: each request's URL is a copy with its path and query set
    /// ([`photon::urls::at`]), so the host (IDNA included) is not parsed again every time.
    base: Url,
    broker_id: String,
    files: OwnFiles,
    pub keys: Keyring,
    session: RwLock<Option<Arc<ClientSession>>>,
    /// Serializes handshakes so a burst of requests makes one session, not many.
    handshake: tokio::sync::Mutex<()>,
    /// The broker's `MAX_WAIT` in ms as its control welcome gave it; 0 until known.
    broker_max_wait_ms: std::sync::atomic::AtomicU64,
    /// When the last handshake failed, and why (see `session`).
    last_failure: parking_lot::Mutex<Option<(Instant, String)>>,
    /// When each peer's certificate was last fetched because of an unknown key id.
    refetched: dashmap::DashMap<ProxyId, Instant>,
    /// This process, as the broker tells instances of one proxy apart (random per start).
    instance: HeaderValue,
    /// Where `upstream.duration_ms` and `upstream.errors` go (off until set).
    pub metrics: photon::ops::Metrics,
    /// The longest detached upload a fetch takes (`seal::detached_limit`; until set, the lean
    /// client's bound).
    pub max_detached: usize,
}

impl Upstream {
    /// Loads the key and root; the certificate comes from `files.cert_file` or, without one,
    /// from the broker (checked against the root and against the private key either way).
    /// Peer certificates older than `max_age` are fetched again.
    pub async fn connect(
        broker_url: &str,
        broker_id: &str,
        proxy_id: &ProxyId,
        files: OwnFiles,
        root: RootCert,
        max_age: Duration,
    ) -> Result<Self, UpstreamError> {
        let base = Url::parse(broker_url).map_err(|e| UpstreamError::Unreachable(format!("{broker_url}: {e}")))?;
        let http = ThreadLocal::new();
        let own = load_own(http.get_or_try(client)?, &base, proxy_id, &files, &root).await?;
        let lean = lean_authority(&base, forward_proxy_set()).map(|authority| (authority, ThreadLocal::new()));
        Ok(Self {
            http,
            lean,
            base,
            broker_id: broker_id.to_owned(),
            files,
            keys: Keyring::new(proxy_id.clone(), root, own, max_age),
            session: RwLock::new(None),
            handshake: tokio::sync::Mutex::new(()),
            last_failure: parking_lot::Mutex::new(None),
            broker_max_wait_ms: std::sync::atomic::AtomicU64::new(0),
            refetched: dashmap::DashMap::new(),
            instance: HeaderValue::try_from(uuid::Uuid::new_v4().to_string()).expect("a UUID is a header value"),
            metrics: photon::ops::Metrics::off(),
            max_detached: http1::MAX_BODY,
        })
    }

    /// This thread's client, built on its first request.
    fn http(&self) -> Result<&reqwest::Client, UpstreamError> {
        self.http.get_or_try(client)
    }

    /// GETs an unauthenticated broker resource (certificates, the revocation list), its text
    /// at most `max` bytes.
    async fn fetch(&self, path: &str, max: usize) -> Result<Option<String>, UpstreamError> {
        let res = self.http()?.get(urls::at(&self.base, path)).timeout(Duration::from_secs(10)).send().await?;
        match res.status() {
            StatusCode::OK => Ok(Some(text_within(res, max).await?)),
            StatusCode::NOT_FOUND => Ok(None),
            other => Err(answered(other, format!("{path} answered {other}"))),
        }
    }

    /// A peer's certificate and pairwise keys: from the cache while fresh, else fetched from the
    /// broker and verified. With `want`, the certificate must carry that key (a message names
    /// it); a peer that rotated is fetched again, at most once per [`REFETCH_AFTER`].
    pub async fn peer(&self, proxy: &ProxyId, want: Option<KeyId>) -> Result<Arc<Peer>, PeerError> {
        if let Some(peer) = self.keys.fresh(proxy, want) {
            return Ok(peer);
        }
        if want.is_some() && self.refetched.get(proxy).is_some_and(|t| t.elapsed() < REFETCH_AFTER) {
            return Err(PeerError::UnknownKey(proxy.clone()));
        }
        let fetched = match self.fetch(&format!("/v1/certs/{proxy}"), SMALL_ANSWER).await {
            Ok(Some(pem)) => self.keys.install(proxy, &pem),
            Ok(None) => Err(self.keys.why_missing(proxy)),
            Err(e) => match self.keys.stale(proxy) {
                Some(peer) if want.is_none() => {
                    tracing::warn!(peer = %proxy, error = %e, "using a cached certificate; the broker did not answer");
                    return Ok(peer);
                }
                _ => return Err(PeerError::Unreachable(proxy.clone(), e.to_string())),
            },
        };
        let peer = fetched?;
        match want {
            Some(kid) if kid != peer.kid => self.keys.fresh(proxy, Some(kid)).ok_or_else(|| {
                self.refetched.insert(proxy.clone(), Instant::now());
                PeerError::UnknownKey(proxy.clone())
            }),
            _ => Ok(peer),
        }
    }

    /// Fetches the revocation list and this proxy's own certificate and key again. Called
    /// every `CERT_REFRESH`; a failure is logged and the old state kept.
    pub async fn refresh(&self) {
        match self.fetch("/v1/crl", LIST_ANSWER).await {
            Ok(Some(pem)) => match self.keys.root().verify_crl(&pem) {
                Ok(crl) => {
                    let number = crl.number;
                    if self.keys.set_crl(crl) {
                        tracing::info!(number, "revocation list updated");
                    }
                }
                Err(e) => tracing::error!(error = %e, "the broker served a revocation list that does not verify"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot fetch the revocation list"),
        }
        let me = self.keys.me().clone();
        let own = async { load_own(self.http()?, &self.base, &me, &self.files, self.keys.root()).await };
        match own.await {
            Ok(own) if *own.cert.pem != *self.keys.own().cert.pem => {
                tracing::info!(serial = %own.cert.serial, "own certificate renewed; using it from now on");
                self.keys.rotate(own);
                // Bound first: the read guard must be gone before `forget` takes the write lock.
                let current = self.session.read().clone();
                if let Some(s) = current {
                    self.forget(&s);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload this proxy's key and certificate; keeping the current ones")
            }
        }
    }

    fn current(&self) -> Option<Arc<ClientSession>> {
        self.session.read().as_ref().filter(|s| !s.needs_renewal()).cloned()
    }

    /// The session to sign with: the current one, or a new one after a handshake. While a
    /// renewal fails, the old session serves until it expires. A failed handshake answers the
    /// requests queued behind it for a second, rather than each trying again in turn (each
    /// attempt may take its 10 s timeout).
    async fn session(&self) -> Result<Arc<ClientSession>, UpstreamError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _one_at_a_time = self.handshake.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        if let Some((at, why)) = self.last_failure.lock().as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return self.usable_old().ok_or_else(|| UpstreamError::Unreachable(why.clone()));
            }
        }
        match self.handshake().await {
            Ok(s) => {
                *self.last_failure.lock() = None;
                Ok(s)
            }
            Err(e) => {
                *self.last_failure.lock() = Some((Instant::now(), format!("the last handshake failed: {e}")));
                match self.usable_old() {
                    Some(old) => {
                        tracing::warn!(error = %e, "cannot renew the session with the broker; the current one serves until it expires");
                        Ok(old)
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// Keeps the broker's `MAX_WAIT` from its control welcome (a broker that does not say
    /// leaves it unknown).
    pub fn learn_broker_max_wait(&self, max_wait: Option<Duration>) {
        let ms = max_wait.map_or(0, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        self.broker_max_wait_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The broker's `MAX_WAIT`, once its control welcome said.
    pub fn broker_max_wait(&self) -> Option<Duration> {
        let ms = self.broker_max_wait_ms.load(std::sync::atomic::Ordering::Relaxed);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// The session held, if it has not expired (though due for renewal).
    fn usable_old(&self) -> Option<Arc<ClientSession>> {
        self.session.read().as_ref().filter(|s| !s.is_expired()).cloned()
    }

    async fn handshake(&self) -> Result<Arc<ClientSession>, UpstreamError> {
        let identity = self.keys.own().identity.clone();
        let pending = session::client_hello(&identity, &self.broker_id);
        let res = self
            .http()?
            .post(urls::at(&self.base, "/v1/session"))
            .json(&pending.hello)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        if !res.status().is_success() {
            let status = res.status();
            let reason = refusal_reason(res).await;
            return Err(answered(status, format!("handshake answered {status}: {reason}")));
        }
        let accept: SessionAccept = serde_json::from_slice(&read_within(res, SMALL_ANSWER).await?)
            .map_err(|e| UpstreamError::Unreachable(format!("the broker's handshake answer: {e}")))?;
        let s = Arc::new(session::client_finish(pending, &accept, self.keys.root(), &self.broker_id)?);
        tracing::info!(proxy = %identity.id, "session with the broker opened");
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
        body: impl Into<SignedBody>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_as(method, path_and_query, app.as_str(), body, timeout).await
    }

    /// [`Upstream::send`] acting as `actor`: an app of this proxy, or the proxy itself (its
    /// control connection). Times the exchange up to the answer's head (`upstream.duration_ms`)
    /// and counts failures (`upstream.errors`).
    pub async fn send_as(
        &self,
        method: Method,
        path_and_query: &str,
        actor: &str,
        body: impl Into<SignedBody>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let started = Instant::now();
        let sent = self.signed(method.clone(), path_and_query, actor, &body.into(), timeout).await;
        self.record(&method, started, &sent);
        sent
    }

    /// A plain signed request for `app`, its answer read whole: through the lean client when
    /// the broker can be reached with it, else through reqwest. Otherwise as [`Upstream::send`]
    /// (metrics included); a signed request is never sent twice.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        app: &AppId,
        body: impl Into<SignedBody>,
        timeout: Option<Duration>,
    ) -> Result<Whole, UpstreamError> {
        self.call_within(method, path_and_query, app.as_str(), body, timeout, PLAIN_ANSWER).await
    }

    /// [`Upstream::call`] acting as `actor` (an app of this proxy, or the proxy itself: its
    /// upload batches), taking an answer of at most `max_answer` bytes ([`PLAIN_ANSWER`] unless
    /// the request knows better): a longer one fails (`TooLarge`) as soon as its length or its
    /// bytes so far show it, unread beyond.
    pub async fn call_within(
        &self,
        method: Method,
        path_and_query: &str,
        actor: &str,
        body: impl Into<SignedBody>,
        timeout: Option<Duration>,
        max_answer: usize,
    ) -> Result<Whole, UpstreamError> {
        let body = body.into();
        let Some((authority, pools)) = &self.lean else {
            let res = self.send_as(method, path_and_query, actor, body, timeout).await?;
            let status = res.status();
            // `send` counted a failure up to the head; one while reading the body counts too.
            let read = read_within(res, max_answer).await;
            if let Err(e) = &read {
                self.count_error(e);
            }
            return Ok(Whole { status, body: read? });
        };
        let started = Instant::now();
        let pool = pools.get_or(|| http1::Pool::new(authority, LEAN_IDLE, http1::Resend::Never));
        let sent = self.signed_lean(pool, &method, path_and_query, actor, &body, timeout, max_answer).await;
        self.record(&method, started, &sent);
        sent
    }

    /// `upstream.duration_ms` for a request sent at `started`, or `upstream.errors`.
    fn record<T>(&self, method: &Method, started: Instant, sent: &Result<T, UpstreamError>) {
        if self.metrics.is_on() {
            match sent {
                Ok(_) => self.metrics.time("upstream.duration_ms", started.elapsed(), &[("method", method.as_str())]),
                Err(e) => self.count_error(e),
            }
        }
    }

    /// `upstream.errors`, by kind.
    fn count_error(&self, e: &UpstreamError) {
        self.metrics.count("upstream.errors", 1, &[("kind", e.kind())]);
    }

    #[allow(clippy::too_many_arguments)]
    async fn signed_lean(
        &self,
        pool: &http1::Pool,
        method: &Method,
        path_and_query: &str,
        app: &str,
        body: &SignedBody,
        timeout: Option<Duration>,
        max_answer: usize,
    ) -> Result<Whole, UpstreamError> {
        let (_, target) = self.signed_url(path_and_query);
        let SignedBody { bytes: body, digest, content_type } = body;
        for attempt in 0..2 {
            let session = self.bounded_session(timeout).await?;
            let auth = session.sign_digest(method.as_str(), &target, app, digest);
            let signed = [
                format!("{}: {app}", bw::APP_HEADER),
                format!("{}: {}", bw::INSTANCE_HEADER, self.instance.to_str().unwrap_or_default()),
                format!("{}: {}", bw::SESSION_HEADER, auth.session),
                format!("{}: {}", bw::SEQ_HEADER, auth.seq),
                format!("{}: {}", bw::TS_HEADER, auth.ts),
                format!("{}: {}", bw::MAC_HEADER, auth.mac),
            ];
            let [a, b, c, d, e, f] = signed.each_ref().map(String::as_str);
            let headers = [a, b, c, d, e, f, content_type.line()];
            // The content type (the last line) goes with a body only.
            let headers = if body.is_empty() { &headers[..headers.len() - 1] } else { &headers[..] };
            let sent = pool.send_within(
                method.as_str(),
                &target,
                headers,
                (!body.is_empty()).then_some(&body[..]),
                max_answer,
            );
            let answer = match timeout {
                Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| UpstreamError::Timeout)?,
                None => sent.await,
            }
            .map_err(|e| match e {
                http1::Error::TooLarge => UpstreamError::TooLarge(max_answer),
                e => UpstreamError::Unreachable(format!("the broker's connection: {}", e.name())),
            })?;
            let status = StatusCode::from_u16(answer.status)
                .map_err(|_| UpstreamError::Unreachable(format!("the broker answered status {}", answer.status)))?;
            match refusal(status, |name| answer.header(name).is_some(), attempt) {
                Some(Refusal::Renew) => self.forget(&session),
                Some(refused) => {
                    let reason = serde_json::from_slice::<ErrorBody>(&answer.body).map(|e| e.error);
                    return Err(refused.error(reason.unwrap_or_default()));
                }
                None => return Ok(Whole { status, body: answer.body }),
            }
        }
        Err(UpstreamError::Refused("session renewal failed".into()))
    }

    /// [`session`](Self::session) within the request's own timeout, if it has one: a handshake
    /// (or the queue for one) counts towards it.
    async fn bounded_session(&self, timeout: Option<Duration>) -> Result<Arc<ClientSession>, UpstreamError> {
        match timeout {
            Some(t) => tokio::time::timeout(t, self.session()).await.map_err(|_| UpstreamError::Timeout)?,
            None => self.session().await,
        }
    }

    /// The URL of `path_and_query` at the broker, and its path and query as the MAC covers them
    /// (after the broker URL's own path, if it has one).
    fn signed_url(&self, path_and_query: &str) -> (Url, String) {
        let url = urls::at(&self.base, path_and_query);
        let signed = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        (url, signed)
    }

    async fn signed(
        &self,
        method: Method,
        path_and_query: &str,
        app: &str,
        body: &SignedBody,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let (url, signed_path) = self.signed_url(path_and_query);
        let SignedBody { bytes: body, digest, content_type } = body;
        for attempt in 0..2 {
            let session = self.bounded_session(timeout).await?;
            let auth = session.sign_digest(method.as_str(), &signed_path, app, digest);
            let mut req = self
                .http()?
                .request(method.clone(), url.clone())
                .header(APP, app)
                .header(INSTANCE, self.instance.clone())
                .header(SESSION, &auth.session)
                .header(SEQ, auth.seq)
                .header(TS, auth.ts)
                .header(MAC, &auth.mac);
            if !body.is_empty() {
                req = req.header(CONTENT_TYPE, content_type.value()).body(body.clone());
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let res = req.send().await?;
            match refusal(res.status(), |name| res.headers().contains_key(name), attempt) {
                Some(Refusal::Renew) => self.forget(&session),
                Some(refused) => return Err(refused.error(refusal_reason(res).await)),
                None => return Ok(res),
            }
        }
        Err(UpstreamError::Refused("session renewal failed".into()))
    }
}

/// A request body and the [`BodyDigest`] its MAC covers: JSON and the SHA-256 of its bytes
/// (`From<Bytes>`), or a detached upload ([`SignedBody::detached`]).
pub struct SignedBody {
    pub bytes: Bytes,
    pub digest: BodyDigest,
    content_type: BodyType,
}

impl From<Bytes> for SignedBody {
    fn from(bytes: Bytes) -> Self {
        let digest = if bytes.is_empty() { session::EMPTY_BODY } else { session::body_digest(&bytes) };
        Self { bytes, digest, content_type: BodyType::Json }
    }
}

impl SignedBody {
    /// A detached upload (`bw::Detached`: JSON, a newline, the ciphertext), sent as
    /// `application/octet-stream`; `digest` is `session::detached_digest` of its JSON and its
    /// ciphertext's digest.
    pub fn detached(bytes: Bytes, digest: BodyDigest) -> Self {
        Self { bytes, digest, content_type: BodyType::Octets }
    }
}

/// `res`'s body, whole, if it is at most `max` bytes: one announced as longer is refused before
/// it is read, one that turns out longer as soon as it does. A body in one piece (the usual
/// case) is taken as it came; pieces are copied into one buffer as they come, so what is held
/// is the body's bytes, however small the pieces.
pub(crate) async fn read_within(res: reqwest::Response, max: usize) -> Result<Bytes, UpstreamError> {
    let announced = res.content_length();
    if announced.is_some_and(|n| n > max as u64) {
        return Err(UpstreamError::TooLarge(max));
    }
    let mut stream = res.bytes_stream();
    let (mut first, mut body) = (None::<Bytes>, BytesMut::new());
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        let so_far = first.as_ref().map_or(body.len(), Bytes::len);
        if so_far + piece.len() > max {
            return Err(UpstreamError::TooLarge(max));
        }
        match first.take() {
            None if body.is_empty() => first = Some(piece),
            earlier => {
                if let Some(earlier) = earlier {
                    body.reserve(announced.map_or(0, |n| n as usize).max(earlier.len() + piece.len()));
                    body.extend_from_slice(&earlier);
                }
                body.extend_from_slice(&piece);
            }
        }
    }
    Ok(first.unwrap_or_else(|| body.freeze()))
}

/// [`read_within`] as text (an error's reason, a certificate), lossy where it is not UTF-8.
pub(crate) async fn text_within(res: reqwest::Response, max: usize) -> Result<String, UpstreamError> {
    Ok(String::from_utf8_lossy(&read_within(res, max).await?).into_owned())
}

/// The `error` of a refusal's JSON body (empty if it has none), read within [`SMALL_ANSWER`].
async fn refusal_reason(res: reqwest::Response) -> String {
    let body = read_within(res, SMALL_ANSWER).await.unwrap_or_default();
    serde_json::from_slice::<ErrorBody>(&body).map(|e| e.error).unwrap_or_default()
}

/// The most the proxy reads of a plain answer that has no bound of its own (a listing, an
/// upload's answer): the lean client's.
pub const PLAIN_ANSWER: usize = http1::MAX_BODY;
/// The most the proxy reads of an answer that is only ever short: a refusal's reason, the
/// handshake's, a certificate (its own or a peer's).
pub(crate) const SMALL_ANSWER: usize = 64 * 1024;
/// The most it reads of the revocation list.
const LIST_ANSWER: usize = 16 * 1024 * 1024;

/// A broker answer read whole.
#[derive(Debug)]
pub struct Whole {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Idle connections to the broker the lean client keeps per thread.
const LEAN_IDLE: usize = 256;

/// Whether a forward proxy for plain HTTP is set in the environment (reqwest would use it).
fn forward_proxy_set() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// `host:port` of a broker the lean client can reach: `http://`, and not `proxied` (NO_PROXY
/// exceptions are left to reqwest).
fn lean_authority(base: &Url, proxied: bool) -> Option<String> {
    http1::plain_authority(base).filter(|_| !proxied)
}

/// How the broker refused a signed request, whichever client carried it.
enum Refusal {
    /// The session is unknown to the broker: make a new one and send again (first attempt only).
    Renew,
    Refused,
    /// Another process with this proxy id is online.
    Duplicate,
}

impl Refusal {
    /// The error a refusal ends the request with (`Renew` only once the renewal was refused too).
    fn error(self, reason: String) -> UpstreamError {
        match self {
            Refusal::Renew | Refusal::Refused => UpstreamError::Refused(reason),
            Refusal::Duplicate => UpstreamError::Duplicate(reason),
        }
    }
}

/// The error for an unexpected answer (`text` says which): a server error (the broker failing, or a
/// gateway in front of it that can't reach it yet) is the broker being unreachable, which is
/// worth waiting out; anything else is a refusal.
fn answered(status: StatusCode, text: String) -> UpstreamError {
    if status.is_server_error() {
        UpstreamError::Unreachable(text)
    } else {
        UpstreamError::Refused(text)
    }
}

fn refusal(status: StatusCode, has_header: impl Fn(&str) -> bool, attempt: u32) -> Option<Refusal> {
    match status {
        StatusCode::UNAUTHORIZED if attempt == 0 && has_header(REAUTH_HEADER) => Some(Refusal::Renew),
        StatusCode::UNAUTHORIZED => Some(Refusal::Refused),
        StatusCode::CONFLICT if has_header(bw::DUPLICATE_HEADER) => Some(Refusal::Duplicate),
        _ => None,
    }
}

/// A client for the broker.
fn client() -> Result<reqwest::Client, UpstreamError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        // A signed request must not be sent twice (its sequence number is spent), and with no
        // retries reqwest does not copy every request in case it needs one.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .build()
        .map_err(|e| UpstreamError::Unreachable(e.to_string()))
}

/// Reads this proxy's key and certificate (from `CERT_FILE`, or from the broker) and checks the
/// certificate against the root, its CN against `proxy_id` and its key against the private key.
async fn load_own(
    http: &reqwest::Client,
    broker: &Url,
    proxy_id: &ProxyId,
    files: &OwnFiles,
    root: &RootCert,
) -> Result<Own, UpstreamError> {
    let key_pem = ca::read_to_string(&files.privkey_file)?;
    let cert_pem = match &files.cert_file {
        Some(path) => ca::read_to_string(path)?,
        None => {
            let url = urls::at(broker, &format!("/v1/certs/{proxy_id}"));
            let res = http.get(url).timeout(Duration::from_secs(10)).send().await?;
            if !res.status().is_success() {
                return Err(UpstreamError::Refused(format!(
                    "no certificate for {proxy_id} at the broker ({}); sign this proxy's CSR with `photon-broker ca sign`",
                    res.status()
                )));
            }
            text_within(res, SMALL_ANSWER).await?
        }
    };
    let cert: VerifiedCert = root.verify(&cert_pem, (unix_millis() / 1000) as i64)?;
    if cert.subject != proxy_id.as_str() {
        return Err(
            CryptoError::Certificate(format!("the certificate names {:?}, not {proxy_id}", cert.subject)).into()
        );
    }
    let identity = Identity::new(&key_pem, cert_pem, &cert)?;
    Ok(Own::new(identity, cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers each connection's request with the next of `answers`, and keeps
    /// the connection open until the client closes it.
    async fn serve(answers: Vec<&'static str>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for answer in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
                while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            }
        });
        url
    }

    /// Through reqwest (a broker behind TLS or a forward proxy), an answer is bounded as the
    /// lean client bounds it: by its length, or as its pieces come; a body in pieces within the
    /// bound arrives whole.
    #[tokio::test]
    async fn reqwest_answers_are_read_within_their_bound() {
        let url = serve(vec![
            // Refused by its length: the body that never comes is not waited for.
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcd",
        ])
        .await;
        let read = || async {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let res = client.get(&url).send().await.unwrap();
            // Bounded: a refusal that waited for more would hang, not fail.
            tokio::time::timeout(Duration::from_secs(5), read_within(res, 4)).await.unwrap()
        };
        assert!(matches!(read().await, Err(UpstreamError::TooLarge(4))));
        assert!(matches!(read().await, Err(UpstreamError::TooLarge(4))));
        assert_eq!(&read().await.unwrap()[..], b"abcd");
        assert_eq!(&read().await.unwrap()[..], b"abcd");
    }

    /// A gateway's 502/503 while the broker comes up is waited out at start (`Unreachable`);
    /// a 4xx is the broker's answer.
    #[test]
    fn server_errors_are_the_broker_unreachable_and_other_answers_refusals() {
        for status in [StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE, StatusCode::INTERNAL_SERVER_ERROR] {
            assert!(matches!(answered(status, "x".into()), UpstreamError::Unreachable(_)), "{status}");
        }
        for status in [StatusCode::FORBIDDEN, StatusCode::BAD_REQUEST, StatusCode::UNAUTHORIZED] {
            assert!(matches!(answered(status, "x".into()), UpstreamError::Refused(_)), "{status}");
        }
    }

    #[test]
    fn the_lean_client_only_for_a_direct_plain_broker() {
        let url = |u: &str| Url::parse(u).unwrap();
        assert_eq!(lean_authority(&url("http://127.0.0.1:8080"), false).as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(lean_authority(&url("http://broker.example/"), false).as_deref(), Some("broker.example:80"));
        assert_eq!(lean_authority(&url("http://[::1]:9/"), false).as_deref(), Some("[::1]:9"));
        assert_eq!(lean_authority(&url("http://127.0.0.1:8080"), true), None);
        assert_eq!(lean_authority(&url("https://broker.example"), false), None);
    }
}
