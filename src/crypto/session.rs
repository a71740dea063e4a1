//! The proxy↔broker session: a signed handshake once, then one MAC per request.
//!
//! Handshake (`POST /v1/session`): the proxy sends its certificate, an ephemeral P-256 key, a
//! timestamp and a nonce, signed with its certified key. The broker checks the certificate
//! against the root and the signature, answers with its own ephemeral key signed with the
//! broker's certified key, and both derive the session key with ECDH + HKDF over the whole
//! transcript. A captured hello is useless to replay: its session key needs the proxy's
//! ephemeral secret.
//!
//! Requests: HMAC-SHA256 under the session key over method, path and query, acting app,
//! sequence number, timestamp and the body's SHA-256. The broker refuses a request outside the
//! timestamp window or whose sequence number it has seen (sliding window), so a captured request
//! can't be replayed. Public-key operations happen once per session, never per request.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use base64::Engine;
use dashmap::DashMap;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use p256::{
    ecdh::EphemeralSecret,
    ecdsa::{
        signature::{Signer, Verifier},
        Signature, SigningKey, VerifyingKey,
    },
    pkcs8::DecodePrivateKey,
    PublicKey, SecretKey,
};
use parking_lot::Mutex;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};

use super::{b64, put_lp, unix_millis, CryptoError, RootCert, VerifiedCert};
use crate::wire::{
    broker::{SessionAccept, SessionHello},
    ProxyId,
};

/// How far a request's timestamp may be from the broker's clock.
pub const TS_WINDOW_MS: u64 = 300_000;
/// Sequence numbers this far behind the highest seen are refused outright.
///
/// Numbers are drawn as requests are signed, but checked once a request's body has arrived: a
/// large upload (a 10 MiB task takes a few tenths of a second) can arrive after thousands of
/// small requests signed later (creates run at over 10,000/s). 65,536 leaves seconds of that
/// slack at such rates, for an 8 KiB window per session.
const REPLAY_WINDOW: u64 = 1 << 16;

type HmacSha256 = Hmac<Sha256>;

/// A party's certified key: a proxy's or the broker's.
pub struct Identity {
    pub id: String,
    pub secret: SecretKey,
    pub cert_pem: String,
}

impl Identity {
    /// Loads a PKCS#8 PEM private key and checks that `cert_pem` certifies it.
    pub fn new(key_pem: &str, cert_pem: String, cert: &VerifiedCert) -> Result<Self, CryptoError> {
        let secret = SecretKey::from_pkcs8_pem(key_pem)
            .map_err(|_| CryptoError::Key("not a PKCS#8 P-256 private key".into()))?;
        if secret.public_key() != cert.public_key {
            return Err(CryptoError::Key(format!(
                "the private key does not match the certificate for {}",
                cert.subject
            )));
        }
        Ok(Self { id: cert.subject.clone(), secret, cert_pem })
    }

    fn sign(&self, msg: &[u8]) -> String {
        let sig: Signature = SigningKey::from(&self.secret).sign(msg);
        b64().encode(sig.to_der().as_bytes())
    }
}

fn verify_sig(key: &PublicKey, msg: &[u8], sig_b64: &str) -> Result<(), CryptoError> {
    let der = b64().decode(sig_b64).map_err(|_| CryptoError::Malformed("signature encoding"))?;
    let sig = Signature::from_der(&der).map_err(|_| CryptoError::Malformed("signature"))?;
    VerifyingKey::from(key).verify(msg, &sig).map_err(|_| CryptoError::BadSignature)
}

fn decode_point(b64_text: &str) -> Result<PublicKey, CryptoError> {
    let bytes = b64().decode(b64_text).map_err(|_| CryptoError::Malformed("public key encoding"))?;
    PublicKey::from_sec1_bytes(&bytes).map_err(|_| CryptoError::Malformed("P-256 public key"))
}

fn hello_transcript(broker_id: &str, hello: &SessionHello, proxy_id: &str) -> Vec<u8> {
    let mut t = b"photon-session-hello-v1".to_vec();
    put_lp(&mut t, broker_id.as_bytes());
    put_lp(&mut t, proxy_id.as_bytes());
    put_lp(&mut t, hello.eph_pub.as_bytes());
    t.extend_from_slice(&hello.ts.to_be_bytes());
    put_lp(&mut t, hello.nonce.as_bytes());
    t
}

fn accept_transcript(hello_t: &[u8], accept: &SessionAccept) -> Vec<u8> {
    let mut t = b"photon-session-accept-v1".to_vec();
    put_lp(&mut t, &Sha256::digest(hello_t));
    put_lp(&mut t, accept.session.as_bytes());
    put_lp(&mut t, accept.eph_pub.as_bytes());
    t.extend_from_slice(&accept.expires_in.to_be_bytes());
    t
}

fn derive_key(eph: EphemeralSecret, peer: &PublicKey, nonce: &str, accept_t: &[u8]) -> [u8; 32] {
    let shared = eph.diffie_hellman(peer);
    let hk = Hkdf::<Sha256>::new(Some(nonce.as_bytes()), shared.raw_secret_bytes());
    let mut key = [0u8; 32];
    hk.expand(&Sha256::digest(accept_t), &mut key).expect("32 bytes is a valid HKDF output length");
    key
}

/// The SHA-256 of a request body, which its MAC covers. The broker may compute it beside
/// parsing the body (see `http::body::digest_beside`).
pub type BodyDigest = [u8; 32];

/// The [`BodyDigest`] of an empty body (every GET), the SHA-256 of nothing.
pub const EMPTY_BODY: BodyDigest = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41,
    0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The [`BodyDigest`] of `body`.
pub fn body_digest(body: &[u8]) -> BodyDigest {
    Sha256::digest(body).into()
}

/// The [`BodyDigest`] of a detached upload (`wire::broker::Detached`: `json`, a newline, the
/// ciphertext), from its JSON and the ciphertext's [`ct_digest`](super::ct_digest):
/// `SHA-256("photon-detached-v2" ‖ u64(len json) ‖ json ‖ BLAKE3(ct))`. The sending proxy has
/// the ciphertext's digest already (the envelope binds it), so it hashes the megabyte once, not
/// twice; the broker hashes it once either way.
pub fn detached_digest(json: &[u8], ct_digest: &[u8; 32]) -> BodyDigest {
    let mut h = Sha256::new();
    h.update(b"photon-detached-v2");
    h.update((json.len() as u64).to_be_bytes());
    h.update(json);
    h.update(ct_digest);
    h.finalize().into()
}

/// The [`BodyDigest`] of a whole detached upload, as the broker computes it (it hashes the
/// ciphertext as it arrives, `http::body::read_detached`, then calls [`detached_digest`]). The
/// broker refuses an upload without its newline before its MAC; should one get here, it is
/// digested under a label of its own, so that its digest is neither a plain body's nor a
/// detached upload's.
pub fn detached_upload_digest(upload: &[u8]) -> BodyDigest {
    match crate::wire::broker::Detached::split(upload) {
        Some((json, ct)) => detached_digest(json, &super::ct_digest(ct)),
        None => Sha256::new().chain_update(b"photon-detached-unsplit-v1").chain_update(upload).finalize().into(),
    }
}

fn request_mac(
    key: &[u8; 32],
    method: &str,
    path_and_query: &str,
    app: &str,
    seq: u64,
    ts: u64,
    body: &BodyDigest,
) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    let mut head = b"photon-request-v1".to_vec();
    put_lp(&mut head, method.as_bytes());
    put_lp(&mut head, path_and_query.as_bytes());
    put_lp(&mut head, app.as_bytes());
    head.extend_from_slice(&seq.to_be_bytes());
    head.extend_from_slice(&ts.to_be_bytes());
    mac.update(&head);
    mac.update(body);
    mac
}

// === proxy side ===

/// A hello in flight: what the proxy must keep to finish the handshake.
pub struct PendingHello {
    pub hello: SessionHello,
    eph: EphemeralSecret,
    transcript: Vec<u8>,
}

/// Starts a handshake with the broker `broker_id`.
pub fn client_hello(identity: &Identity, broker_id: &str) -> PendingHello {
    let eph = EphemeralSecret::random(&mut OsRng);
    let mut hello = SessionHello {
        cert: identity.cert_pem.clone(),
        eph_pub: b64().encode(eph.public_key().to_sec1_bytes()),
        ts: unix_millis(),
        nonce: b64().encode(rand::random::<[u8; 16]>()),
        sig: String::new(),
    };
    let transcript = hello_transcript(broker_id, &hello, &identity.id);
    hello.sig = identity.sign(&transcript);
    PendingHello { hello, eph, transcript }
}

/// Checks the broker's answer (its certificate names `broker_id` and signed the transcript)
/// and derives the session.
pub fn client_finish(
    pending: PendingHello,
    accept: &SessionAccept,
    root: &RootCert,
    broker_id: &str,
) -> Result<ClientSession, CryptoError> {
    let now = (unix_millis() / 1000) as i64;
    let broker = root.verify(&accept.cert, now)?;
    if broker.subject != broker_id {
        return Err(CryptoError::Session(format!(
            "the broker's certificate names {:?}, expected {broker_id:?}",
            broker.subject
        )));
    }
    let accept_t = accept_transcript(&pending.transcript, accept);
    verify_sig(&broker.public_key, &accept_t, &accept.sig)?;
    let peer = decode_point(&accept.eph_pub)?;
    let key = derive_key(pending.eph, &peer, &pending.hello.nonce, &accept_t);
    Ok(ClientSession {
        id: accept.session.clone(),
        key,
        next_seq: AtomicU64::new(1),
        renew_at: Instant::now() + Duration::from_secs(accept.expires_in.saturating_mul(4) / 5),
        // A margin for the request in flight: used until a tenth (at most 10 s) before the end.
        expires_at: Instant::now() + Duration::from_secs(accept.expires_in)
            - Duration::from_secs(accept.expires_in / 10).min(Duration::from_secs(10)),
    })
}

/// The proxy's half of a session: signs each request.
pub struct ClientSession {
    pub id: String,
    key: [u8; 32],
    next_seq: AtomicU64,
    renew_at: Instant,
    expires_at: Instant,
}

/// The authentication headers of one request.
pub struct RequestAuth {
    pub session: String,
    pub seq: u64,
    pub ts: u64,
    pub mac: String,
}

impl ClientSession {
    pub fn sign(&self, method: &str, path_and_query: &str, app: &str, body: &[u8]) -> RequestAuth {
        self.sign_digest(method, path_and_query, app, &body_digest(body))
    }

    /// [`sign`](Self::sign) a request whose body's [`BodyDigest`] is `digest`.
    pub fn sign_digest(&self, method: &str, path_and_query: &str, app: &str, digest: &BodyDigest) -> RequestAuth {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let ts = unix_millis();
        let mac = request_mac(&self.key, method, path_and_query, app, seq, ts, digest).finalize().into_bytes();
        RequestAuth { session: self.id.clone(), seq, ts, mac: b64().encode(mac) }
    }

    /// True once the session is old enough that the proxy should make a new one.
    pub fn needs_renewal(&self) -> bool {
        Instant::now() >= self.renew_at
    }

    /// True once the broker may no longer take it (less 10 s of margin).
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at
    }
}

// === broker side ===

/// Why the broker refused to authenticate a request.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or malformed authentication header {0}")]
    Header(&'static str),
    #[error("unknown or expired session; make a new one")]
    UnknownSession,
    #[error("request timestamp outside the allowed window; check the clock")]
    Clock,
    #[error("request MAC does not verify")]
    BadMac,
    #[error("replayed request")]
    Replay,
}

impl AuthError {
    /// A short name for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Header(_) => "malformed",
            Self::UnknownSession => "unknown_session",
            Self::Clock => "clock",
            Self::BadMac => "bad_mac",
            Self::Replay => "replay",
        }
    }
}

struct ServerSession {
    proxy: ProxyId,
    /// The serial of the certificate the session was opened with (for revocation).
    serial: String,
    key: [u8; 32],
    expires_at: Instant,
    window: Mutex<ReplayWindow>,
}

/// The broker's sessions, by id. At most `MAX_SESSIONS_PER_PROXY` per proxy: a new handshake
/// evicts that proxy's oldest session.
pub struct SessionStore {
    identity: Identity,
    root: RootCert,
    broker_id: String,
    lifetime: Duration,
    sessions: DashMap<String, std::sync::Arc<ServerSession>>,
    by_proxy: DashMap<ProxyId, Vec<String>>,
    /// The hellos accepted within the timestamp window, by proxy and nonce, with their
    /// timestamps: a captured hello replayed within the window would otherwise open a session
    /// (useless without the proxy's ephemeral secret) that evicts one of the proxy's own.
    hellos: DashMap<(ProxyId, String), u64>,
}

const MAX_SESSIONS_PER_PROXY: usize = 16;

impl SessionStore {
    pub fn new(identity: Identity, root: RootCert, broker_id: String, lifetime: Duration) -> Self {
        Self {
            identity,
            root,
            broker_id,
            lifetime,
            sessions: DashMap::new(),
            by_proxy: DashMap::new(),
            hellos: DashMap::new(),
        }
    }

    pub fn root(&self) -> &RootCert {
        &self.root
    }

    /// Checks a proxy's hello and opens a session for it. The session ends no later than the
    /// certificate does; `is_revoked` refuses certificates on the revocation list.
    pub fn accept(
        &self,
        hello: &SessionHello,
        is_revoked: impl Fn(&VerifiedCert) -> bool,
    ) -> Result<(SessionAccept, VerifiedCert), CryptoError> {
        let now_ms = unix_millis();
        if now_ms.abs_diff(hello.ts) > TS_WINDOW_MS {
            return Err(CryptoError::Session("hello timestamp outside the allowed window; check the clock".into()));
        }
        let cert = self.root.verify(&hello.cert, (now_ms / 1000) as i64)?;
        if is_revoked(&cert) {
            return Err(CryptoError::Certificate(format!("the certificate of {} is revoked", cert.subject)));
        }
        let proxy = ProxyId::parse(&cert.subject).map_err(|e| CryptoError::Certificate(e.to_string()))?;
        proxy.within(&self.broker_id).map_err(|e| CryptoError::Certificate(e.to_string()))?;
        let hello_t = hello_transcript(&self.broker_id, hello, proxy.as_str());
        verify_sig(&cert.public_key, &hello_t, &hello.sig)?;
        let peer = decode_point(&hello.eph_pub)?;
        match self.hellos.entry((proxy.clone(), hello.nonce.clone())) {
            dashmap::Entry::Occupied(_) => {
                return Err(CryptoError::Session("this hello was used before: a replay".into()));
            }
            dashmap::Entry::Vacant(seen) => {
                seen.insert(hello.ts);
            }
        }

        let cert_left = Duration::from_millis(((cert.not_after_unix.max(0) as u64) * 1000).saturating_sub(now_ms));
        let lifetime = self.lifetime.min(cert_left).max(Duration::from_secs(1));
        let eph = EphemeralSecret::random(&mut OsRng);
        let mut accept = SessionAccept {
            session: b64().encode(rand::random::<[u8; 18]>()),
            proxy_id: proxy.clone(),
            cert: self.identity.cert_pem.clone(),
            eph_pub: b64().encode(eph.public_key().to_sec1_bytes()),
            sig: String::new(),
            expires_in: lifetime.as_secs(),
        };
        let accept_t = accept_transcript(&hello_t, &accept);
        accept.sig = self.identity.sign(&accept_t);
        let key = derive_key(eph, &peer, &hello.nonce, &accept_t);
        let session = ServerSession {
            proxy: proxy.clone(),
            serial: cert.serial.clone(),
            key,
            expires_at: Instant::now() + lifetime,
            window: Mutex::new(ReplayWindow::default()),
        };
        self.sessions.insert(accept.session.clone(), std::sync::Arc::new(session));
        let mut ids = self.by_proxy.entry(proxy).or_default();
        ids.push(accept.session.clone());
        if ids.len() > MAX_SESSIONS_PER_PROXY {
            let oldest = ids.remove(0);
            self.sessions.remove(&oldest);
        }
        Ok((accept, cert))
    }

    /// Authenticates one request, given its body's [`BodyDigest`]; returns the proxy it came from.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        session: &str,
        seq: u64,
        ts: u64,
        mac_b64: &str,
        method: &str,
        path_and_query: &str,
        app: &str,
        body: &BodyDigest,
    ) -> Result<ProxyId, AuthError> {
        let session = self.live(session)?;
        let tag = b64().decode(mac_b64).map_err(|_| AuthError::Header("x-photon-mac"))?;
        request_mac(&session.key, method, path_and_query, app, seq, ts, body)
            .verify_slice(&tag)
            .map_err(|_| AuthError::BadMac)?;
        if unix_millis().abs_diff(ts) > TS_WINDOW_MS {
            return Err(AuthError::Clock);
        }
        if !session.window.lock().accept(seq) {
            return Err(AuthError::Replay);
        }
        Ok(session.proxy.clone())
    }

    /// What can be checked of a request before its body is read: a live session, a timestamp
    /// within the window, and a sequence number the window would still accept. A request that
    /// fails here is refused without reading (or hashing and parsing) what may be megabytes
    /// from anyone. [`verify`](Self::verify) checks it all again, with the MAC, afterwards.
    pub fn precheck(&self, session: &str, seq: u64, ts: u64) -> Result<(), AuthError> {
        let session = self.live(session)?;
        if unix_millis().abs_diff(ts) > TS_WINDOW_MS {
            return Err(AuthError::Clock);
        }
        if !session.window.lock().would_accept(seq) {
            return Err(AuthError::Replay);
        }
        Ok(())
    }

    /// The session `id`, if it is known and has not expired.
    fn live(&self, id: &str) -> Result<std::sync::Arc<ServerSession>, AuthError> {
        let session = self.sessions.get(id).map(|s| s.clone()).ok_or(AuthError::UnknownSession)?;
        if Instant::now() >= session.expires_at {
            return Err(AuthError::UnknownSession);
        }
        Ok(session)
    }

    /// Ends every session opened with a certificate `crl` revokes; returns their proxies.
    pub fn drop_revoked(&self, crl: &super::cert::Crl) -> Vec<ProxyId> {
        let mut ended = Vec::new();
        self.sessions.retain(|_, s| {
            let revoked = crl.serials.contains(&s.serial);
            if revoked && !ended.contains(&s.proxy) {
                ended.push(s.proxy.clone());
            }
            !revoked
        });
        ended
    }

    /// Drops expired sessions, and hellos too old to be accepted again; called periodically.
    pub fn sweep(&self) {
        let now_ms = unix_millis();
        self.hellos.retain(|_, ts| ts.saturating_add(TS_WINDOW_MS) >= now_ms);
        let now = Instant::now();
        self.sessions.retain(|_, s| s.expires_at > now);
        self.by_proxy.retain(|_, ids| {
            ids.retain(|id| self.sessions.contains_key(id));
            !ids.is_empty()
        });
    }
}

/// Sliding anti-replay window over sequence numbers (as in IPsec): accepts each number once,
/// and nothing more than `REPLAY_WINDOW` behind the highest seen.
struct ReplayWindow {
    top: u64,
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self { top: 0, seen: [0; (REPLAY_WINDOW / 64) as usize] }
    }
}

impl ReplayWindow {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % REPLAY_WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Whether [`accept`](Self::accept) would take `seq` now (it records nothing).
    fn would_accept(&self, seq: u64) -> bool {
        if seq == 0 || seq + REPLAY_WINDOW <= self.top {
            return false;
        }
        let (w, b) = Self::bit(seq);
        seq > self.top || self.seen[w] & b == 0
    }

    fn accept(&mut self, seq: u64) -> bool {
        if seq == 0 || seq + REPLAY_WINDOW <= self.top {
            return false;
        }
        if seq > self.top {
            // Clear the slots that the window slides over.
            let from = self.top.max(seq.saturating_sub(REPLAY_WINDOW)) + 1;
            for s in from..seq {
                let (w, b) = Self::bit(s);
                self.seen[w] &= !b;
            }
            self.top = seq;
            let (w, b) = Self::bit(seq);
            self.seen[w] |= b;
            return true;
        }
        let (w, b) = Self::bit(seq);
        if self.seen[w] & b != 0 {
            return false;
        }
        self.seen[w] |= b;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ca;

    struct Pki {
        dir: std::path::PathBuf,
        root: RootCert,
    }

    impl Pki {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("photon-session-{}", uuid::Uuid::new_v4()));
            ca::init(&dir, "broker", 30).unwrap();
            let root = RootCert::load(&dir.join(ca::ROOT_CERT)).unwrap();
            Self { dir, root }
        }

        fn identity(&self, key_file: &str, cert_file: &std::path::Path) -> Identity {
            let pem = std::fs::read_to_string(cert_file).unwrap();
            let cert = self.root.verify(&pem, (unix_millis() / 1000) as i64).unwrap();
            Identity::new(&std::fs::read_to_string(self.dir.join(key_file)).unwrap(), pem, &cert).unwrap()
        }

        fn proxy(&self, id: &str) -> Identity {
            let (key, csr) = ca::keygen(&ProxyId::parse(id).unwrap()).unwrap();
            let key_file = format!("{id}.key");
            std::fs::write(self.dir.join(&key_file), key).unwrap();
            let (_, cert) = ca::sign(&self.dir, "broker", &csr, 30).unwrap();
            self.identity(&key_file, &cert)
        }

        fn store(&self) -> SessionStore {
            let broker = self.identity(ca::BROKER_KEY, &self.dir.join(ca::BROKER_CERT));
            SessionStore::new(broker, self.root.clone(), "broker".into(), Duration::from_secs(60))
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn handshake_then_requests_verify_once() {
        let pki = Pki::new();
        let store = pki.store();
        let proxy = pki.proxy("proxy1.broker");
        let pending = client_hello(&proxy, "broker");
        let (accept, _) = store.accept(&pending.hello, |_| false).unwrap();
        let session = client_finish(pending, &accept, &pki.root, "broker").unwrap();

        let auth = session.sign("POST", "/v1/tasks", "app1.proxy1.broker", b"{}");
        let verify = |a: &RequestAuth, method: &str, path: &str, app: &str, body: &[u8]| {
            store.verify(&a.session, a.seq, a.ts, &a.mac, method, path, app, &body_digest(body))
        };
        assert_eq!(verify(&auth, "POST", "/v1/tasks", "app1.proxy1.broker", b"{}").unwrap().as_str(), "proxy1.broker");
        // The same request again is a replay.
        assert!(matches!(verify(&auth, "POST", "/v1/tasks", "app1.proxy1.broker", b"{}"), Err(AuthError::Replay)));
        // Any changed field breaks the MAC.
        let auth = session.sign("POST", "/v1/tasks", "app1.proxy1.broker", b"{}");
        assert!(matches!(verify(&auth, "POST", "/v1/tasks", "app1.proxy1.broker", b"{ }"), Err(AuthError::BadMac)));
        assert!(matches!(verify(&auth, "PUT", "/v1/tasks", "app1.proxy1.broker", b"{}"), Err(AuthError::BadMac)));
        assert!(matches!(verify(&auth, "POST", "/v1/tasks?x", "app1.proxy1.broker", b"{}"), Err(AuthError::BadMac)));
        assert!(matches!(verify(&auth, "POST", "/v1/tasks", "app2.proxy1.broker", b"{}"), Err(AuthError::BadMac)));
        let mut forged = session.sign("GET", "/", "a.proxy1.broker", b"");
        forged.seq += 1000;
        assert!(matches!(verify(&forged, "GET", "/", "a.proxy1.broker", b""), Err(AuthError::BadMac)));
        assert!(matches!(
            store.verify("nope", 1, unix_millis(), "AAAA", "GET", "/", "a.b.c", &body_digest(b"")),
            Err(AuthError::UnknownSession)
        ));
    }

    #[test]
    fn a_detached_uploads_digest_covers_its_json_and_its_ciphertexts_digest() {
        let (json, ct) = (br#"{"id":1}"#.as_slice(), b"cipher\ntext".as_slice());
        let upload = [json, b"\n", ct].concat();
        let digest = detached_digest(json, &crate::crypto::ct_digest(ct));
        assert_eq!(detached_upload_digest(&upload), digest);
        assert_ne!(digest, body_digest(&upload), "not the plain digest of its bytes");
        // Where the JSON ends is covered: the same bytes split elsewhere digest differently.
        assert_ne!(detached_digest(br#"{"id":1}"#, &crate::crypto::ct_digest(b"\ncipher\ntext")), digest);
        // Without the newline: neither a plain body's digest nor a detached upload's. (Were it
        // the plain digest of its bytes, the bytes a detached digest hashes, sent as a body
        // without a newline, would carry that upload's MAC.)
        assert_ne!(detached_upload_digest(json), body_digest(json));
        let hashed =
            [b"photon-detached-v2".as_slice(), &(json.len() as u64).to_be_bytes(), json, &crate::crypto::ct_digest(ct)]
                .concat();
        assert!(!hashed.contains(&b'\n'));
        assert_ne!(detached_upload_digest(&hashed), digest);
    }

    #[test]
    fn empty_body_digest() {
        assert_eq!(EMPTY_BODY, body_digest(b""));
    }

    /// Ephemeral keys that are not P-256 points are a clear error, never a panic.
    #[test]
    fn refuses_points_off_the_curve() {
        let on_curve = SecretKey::random(&mut OsRng).public_key().to_sec1_bytes().to_vec();
        assert!(decode_point(&b64().encode(&on_curve)).is_ok());
        let mut off = on_curve.clone();
        off[64] ^= 1; // y no longer matches x
        let compressed_bad_x = [&[0x02u8][..], &[0xff; 32]].concat(); // x ≥ p
        let too_short = vec![0x04u8; 49]; // a P-192-sized point
        for bad in [off, compressed_bad_x, too_short, vec![], vec![0x00]] {
            assert!(matches!(decode_point(&b64().encode(&bad)), Err(CryptoError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn refuses_foreign_and_tampered_hellos() {
        let pki = Pki::new();
        let store = pki.store();
        // A proxy certified by another CA.
        let other = Pki::new();
        let stranger = other.proxy("proxy1.broker");
        assert!(store.accept(&client_hello(&stranger, "broker").hello, |_| false).is_err());
        // A hello whose signed fields were changed.
        let proxy = pki.proxy("proxy2.broker");
        let mut hello = client_hello(&proxy, "broker").hello;
        hello.ts -= 1;
        assert!(matches!(store.accept(&hello, |_| false), Err(CryptoError::BadSignature)));
        // An old hello.
        let mut hello = client_hello(&proxy, "broker").hello;
        hello.ts -= TS_WINDOW_MS + 1;
        assert!(store.accept(&hello, |_| false).is_err());
        // Garbage in every field is an error, not a panic.
        let mut hello = client_hello(&proxy, "broker").hello;
        hello.eph_pub = "!!".into();
        hello.sig = "AAAA".into();
        assert!(store.accept(&hello, |_| false).is_err());
        // A captured hello, replayed: refused, and the proxy's session stays.
        let pending = client_hello(&proxy, "broker");
        let (accept, _) = store.accept(&pending.hello, |_| false).unwrap();
        for _ in 0..=MAX_SESSIONS_PER_PROXY {
            assert!(matches!(store.accept(&pending.hello, |_| false), Err(CryptoError::Session(_))));
        }
        assert!(store.sessions.contains_key(&accept.session));
        store.sweep();
        assert_eq!(store.hellos.len(), 1, "kept while it could still be accepted");
        // A broker answer signed by someone else is refused by the proxy.
        let pending = client_hello(&proxy, "broker");
        let (mut accept, _) = store.accept(&pending.hello, |_| false).unwrap();
        accept.expires_in += 1;
        assert!(client_finish(pending, &accept, &pki.root, "broker").is_err());
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        // `would_accept` (checked before a body is read) always agrees with `accept`.
        let mut accept = |seq: u64| {
            let would = w.would_accept(seq);
            assert_eq!(would, w.accept(seq), "seq {seq}");
            would
        };
        assert!(accept(1));
        assert!(!accept(1));
        assert!(accept(3));
        assert!(accept(2));
        assert!(!accept(2));
        let top = 10 * REPLAY_WINDOW;
        assert!(accept(top));
        assert!(!accept(3), "far behind the window");
        assert!(accept(top - 1));
        assert!(!accept(top - 1));
        assert!(accept(top - REPLAY_WINDOW + 1), "the oldest number the window still holds");
        assert!(!accept(top - REPLAY_WINDOW), "just behind it");
        assert!(accept(top + REPLAY_WINDOW + 5));
        assert!(!accept(top));
        assert!(!accept(0));
    }
}
