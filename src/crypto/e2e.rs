//! End-to-end sealing of task and result bodies between proxies; the design and why each
//! property holds are in `docs/CRYPTO.md`.
//!
//! - A **pairwise key** per ordered pair of proxies (sender → recipient): static-static P-256
//!   ECDH of their certified keys, then HKDF-SHA256 with both proxy ids and key ids in the info.
//!   Derived once and cached by the proxy ([`pair_keys`]); a new certificate key means new keys.
//! - Per message: a random 32-byte content key and a random 24-byte nonce. The body is sealed
//!   with XChaCha20-Poly1305 under the content key, with the message header ([`Subject`] plus the
//!   envelope's own fields) as associated data. The content key is then wrapped once per
//!   recipient proxy under the sender→recipient pairwise key, with associated data
//!   `SHA-256(header ‖ BLAKE3(ciphertext))` ([`ct_digest`](super::ct_digest)).
//!
//! So a recipient that unwraps its key has proof (under a key only it and the sender hold) of
//! every header field and of the exact ciphertext; it can read the body, but can't make another
//! recipient accept anything: that needs the sender's pairwise key with *that* recipient.
//! Per message, sealing costs one AEAD over the body plus one 32-byte AEAD per recipient; no
//! public-key operation.

use std::fmt;

use base64::Engine;
use chacha20poly1305::{
    aead::{Aead, AeadInPlace, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use hkdf::Hkdf;
use p256::{ecdh::diffie_hellman, PublicKey, SecretKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;
use zeroize::Zeroize;

use super::{b64, bulk, decode_bulk, encode_bulk, put_lp};
use crate::wire::{
    broker::{Envelope, SealAlg, WrappedKey},
    AppId, FailureStrategy, ProxyId, WorkStatus,
};

const PAIR_SALT: &[u8] = b"photon/e2e/pair/v1";
const HEADER_LABEL: &[u8] = b"photon/e2e/header/v1";
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;

/// Why a sealed message was refused. Never carries key material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    #[error("not sealed for this proxy")]
    NotForUs,
    #[error("does not verify: altered, forged, or sealed for another key")]
    Forged,
}

impl SealError {
    /// A short name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::NotForUs => "not_for_us",
            Self::Forged => "forged",
        }
    }
}

// === key ids and pairwise keys ===

/// Names a certified public key: the first 16 bytes of SHA-256 of its compressed SEC1 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 16]);

impl KeyId {
    pub fn of(key: &PublicKey) -> Self {
        let digest = Sha256::digest(p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(key, true));
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }

    pub fn parse(text: &str) -> Result<Self, SealError> {
        let bytes = b64().decode(text).map_err(|_| SealError::Malformed("key id encoding"))?;
        Ok(Self(bytes.try_into().map_err(|_| SealError::Malformed("key id length"))?))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64().encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A symmetric key for one direction between two proxies. Wiped when dropped.
pub struct PairKey([u8; KEY_LEN]);

impl Drop for PairKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairKey(..)")
    }
}

/// One end of a pairwise derivation: a proxy, its certified key and that key's id.
pub struct Party<'a> {
    pub proxy: &'a ProxyId,
    pub key: &'a PublicKey,
}

/// The two directional keys between `me` (holding `secret`) and `peer`: `(me → peer, peer → me)`.
/// Both ends derive the same pair, mirrored. One ECDH and two HKDF expansions.
pub fn pair_keys(secret: &SecretKey, me: &Party<'_>, peer: &Party<'_>) -> (PairKey, PairKey) {
    let shared = diffie_hellman(secret.to_nonzero_scalar(), peer.key.as_affine());
    let hkdf = Hkdf::<Sha256>::new(Some(PAIR_SALT), shared.raw_secret_bytes());
    let derive = |from: &Party<'_>, to: &Party<'_>| {
        let mut info = Vec::with_capacity(128);
        put_lp(&mut info, from.proxy.as_str().as_bytes());
        put_lp(&mut info, &KeyId::of(from.key).0);
        put_lp(&mut info, to.proxy.as_str().as_bytes());
        put_lp(&mut info, &KeyId::of(to.key).0);
        let mut key = [0; KEY_LEN];
        hkdf.expand(&info, &mut key).expect("32 bytes is a valid HKDF-SHA256 length");
        PairKey(key)
    };
    (derive(me, peer), derive(peer, me))
}

// === the header ===

/// The fields of a message a recipient acts on; all of them are bound into the seal.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Task { id: Uuid, from: &'a AppId, to: &'a [AppId], failure_strategy: &'a FailureStrategy, metadata: &'a Value },
    Result { task: Uuid, from: &'a AppId, to: &'a [AppId], status: WorkStatus, metadata: &'a Value },
}

impl Subject<'_> {
    pub fn from(&self) -> &AppId {
        match self {
            Self::Task { from, .. } | Self::Result { from, .. } => from,
        }
    }
}

fn put_json(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    put_lp(out, &serde_json::to_vec(value).expect("wire values serialize"));
}

fn put_apps(out: &mut Vec<u8>, apps: &[AppId]) {
    out.extend_from_slice(&(apps.len() as u32).to_be_bytes());
    for app in apps {
        put_lp(out, app.as_str().as_bytes());
    }
}

/// The associated data of the body: every covered field, length-prefixed so nothing can be
/// re-split. Metadata is bound in serde_json's canonical output of the parsed value, which the
/// broker reproduces exactly (it stores a `Value` and serializes it the same way).
fn header(subject: &Subject<'_>, sk: &str, ts: u64, ttl_ms: Option<u64>, nonce: &str, keys: &[WrappedKey]) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    put_lp(&mut t, HEADER_LABEL);
    match subject {
        Subject::Task { id, from, to, failure_strategy, metadata } => {
            put_lp(&mut t, b"task");
            put_lp(&mut t, id.as_bytes());
            put_lp(&mut t, from.as_str().as_bytes());
            put_apps(&mut t, to);
            put_json(&mut t, failure_strategy);
            put_json(&mut t, metadata);
        }
        Subject::Result { task, from, to, status, metadata } => {
            put_lp(&mut t, b"result");
            put_lp(&mut t, task.as_bytes());
            put_lp(&mut t, from.as_str().as_bytes());
            put_apps(&mut t, to);
            put_json(&mut t, status);
            put_json(&mut t, metadata);
        }
    }
    put_lp(&mut t, sk.as_bytes());
    t.extend_from_slice(&ts.to_be_bytes());
    match ttl_ms {
        Some(ttl) => {
            t.push(1);
            t.extend_from_slice(&ttl.to_be_bytes());
        }
        None => t.push(0),
    }
    put_lp(&mut t, nonce.as_bytes());
    t.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        put_lp(&mut t, k.p.as_str().as_bytes());
        put_lp(&mut t, k.k.as_bytes());
    }
    t
}

/// What each wrapped key authenticates: the header and the exact ciphertext.
fn binding(header: &[u8], ct: &[u8]) -> [u8; 32] {
    binding_of(header, &super::ct_digest(ct))
}

/// [`binding`] from the ciphertext's [`ct_digest`](super::ct_digest).
fn binding_of(header: &[u8], ct_digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(header);
    h.update(ct_digest);
    h.finalize().into()
}

// === sealing ===

/// A recipient proxy of a message: who, under which key, and the sender→recipient pairwise key.
pub struct Recipient<'a> {
    pub proxy: &'a ProxyId,
    pub kid: KeyId,
    pub key: &'a PairKey,
}

/// Seals `plaintext` for `recipients` (distinct proxies; the sender includes itself to read its
/// own messages back). `sender_kid` names the sender's certified key; `ts` is now (Unix ms).
pub fn seal(
    subject: &Subject<'_>,
    sender_kid: KeyId,
    ts: u64,
    ttl_ms: Option<u64>,
    recipients: &[Recipient<'_>],
    plaintext: &[u8],
) -> Envelope {
    let (mut env, ct, _) = seal_detached(subject, sender_kid, ts, ttl_ms, recipients, plaintext);
    env.detached = None;
    env.ct = encode_bulk(&ct);
    env
}

/// [`seal`], with the ciphertext beside the envelope instead of in it: the envelope's `ct` is
/// empty and `detached` its length (see `wire::broker::Detached`). What is sealed and bound is
/// the same either way. Also returns the ciphertext's [`ct_digest`](super::ct_digest) (a
/// detached upload's request MAC covers it, `session::detached_digest`).
pub fn seal_detached(
    subject: &Subject<'_>,
    sender_kid: KeyId,
    ts: u64,
    ttl_ms: Option<u64>,
    recipients: &[Recipient<'_>],
    plaintext: &[u8],
) -> (Envelope, Vec<u8>, [u8; 32]) {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let mut content_key: [u8; KEY_LEN] = rand::random();
    let nonce = XNonce::from_slice(&nonce_bytes);
    let mut env = Envelope {
        alg: SealAlg::V2,
        sk: sender_kid.to_string(),
        ts,
        ttl_ms,
        n: b64().encode(nonce_bytes),
        keys: recipients
            .iter()
            .map(|r| WrappedKey { p: r.proxy.clone(), k: r.kid.to_string(), w: String::new() })
            .collect(),
        detached: None,
        ct: String::new(),
    };
    let header = header(subject, &env.sk, env.ts, env.ttl_ms, &env.n, &env.keys);
    let (ct, ct_digest) = bulk::seal(&content_key, &nonce_bytes, &header, plaintext);
    let bound = binding_of(&header, &ct_digest);
    for (slot, r) in env.keys.iter_mut().zip(recipients) {
        let wrapped = XChaCha20Poly1305::new(&r.key.0.into())
            .encrypt(nonce, Payload { msg: &content_key, aad: &bound })
            .expect("a 32-byte key seals");
        slot.w = b64().encode(wrapped);
    }
    content_key.zeroize();
    env.detached = Some(ct.len() as u64);
    (env, ct, ct_digest)
}

// === opening ===

/// The wrapped key addressed to `me`, if the message has one.
pub fn wrap_for<'e>(env: &'e Envelope, me: &ProxyId) -> Result<&'e WrappedKey, SealError> {
    env.keys.iter().find(|k| &k.p == me).ok_or(SealError::NotForUs)
}

fn decode_nonce(env: &Envelope) -> Result<[u8; NONCE_LEN], SealError> {
    let bytes = b64().decode(&env.n).map_err(|_| SealError::Malformed("nonce encoding"))?;
    bytes.try_into().map_err(|_| SealError::Malformed("nonce length"))
}

/// Checks and opens a message: `subject` is built from the fields the broker handed over, `wrap`
/// is this proxy's entry, `key` the sender→this proxy pairwise key for the key ids it names.
/// Any change to a covered field, the ciphertext or the wrap makes it [`SealError::Forged`].
pub fn open(env: &Envelope, subject: &Subject<'_>, wrap: &WrappedKey, key: &PairKey) -> Result<Vec<u8>, SealError> {
    if env.detached.is_some() {
        return Err(SealError::Malformed("a detached ciphertext opened as inline"));
    }
    let ct = decode_bulk(&env.ct).ok_or(SealError::Malformed("ciphertext encoding"))?;
    open_with(env, &ct, subject, wrap, key)
}

/// [`open`] for a message whose ciphertext `ct` travelled detached: `env.detached` must give its
/// length, and `env.ct` must be empty.
pub fn open_detached(
    env: &Envelope,
    ct: &[u8],
    subject: &Subject<'_>,
    wrap: &WrappedKey,
    key: &PairKey,
) -> Result<Vec<u8>, SealError> {
    if env.detached != Some(ct.len() as u64) || !env.ct.is_empty() {
        return Err(SealError::Malformed("detached ciphertext length"));
    }
    open_with(env, ct, subject, wrap, key)
}

fn open_with(
    env: &Envelope,
    ct: &[u8],
    subject: &Subject<'_>,
    wrap: &WrappedKey,
    key: &PairKey,
) -> Result<Vec<u8>, SealError> {
    let nonce_bytes = decode_nonce(env)?;
    if ct.len() < bulk::TAG_LEN {
        return Err(SealError::Malformed("ciphertext shorter than its tag"));
    }
    let wrapped = b64().decode(&wrap.w).map_err(|_| SealError::Malformed("wrapped key encoding"))?;
    if wrapped.len() != KEY_LEN + bulk::TAG_LEN {
        return Err(SealError::Malformed("wrapped key length"));
    }
    let header = header(subject, &env.sk, env.ts, env.ttl_ms, &env.n, &env.keys);
    if ct.len() < bulk::PARALLEL_MIN + bulk::TAG_LEN {
        let content_key = unwrap_key(key, &nonce_bytes, &binding(&header, ct), wrapped)?;
        let content_key: &[u8; KEY_LEN] = content_key[..].try_into().map_err(|_| SealError::Forged)?;
        return bulk::open(content_key, &nonce_bytes, &header, ct).map_err(|_| SealError::Forged);
    }
    // A large body is opened while its wrap is checked, under the key the wrap gives unchecked:
    // a helper checks the body's tag under that key and hashes the ciphertext (one pass), then
    // computes the binding and unwraps the content key in full, while this thread decrypts the
    // body. The body counts only if its tag verified and the checked key is that very key;
    // otherwise what was decrypted is wiped (also if the helper panicked).
    let guess = bulk::unwrap_unchecked(
        &key.0,
        &nonce_bytes,
        wrapped[..KEY_LEN].try_into().expect("its length was checked above"),
    );
    let ((tag_ok, unwrapped), mut plaintext) = bulk::beside(
        || {
            let (tag_ok, digest) = bulk::check_and_digest(&guess, &nonce_bytes, &header, ct);
            (tag_ok, unwrap_key(key, &nonce_bytes, &binding_of(&header, &digest), wrapped))
        },
        || bulk::decrypt_unchecked(&guess, &nonce_bytes, ct),
    );
    let same_key = unwrapped.is_ok_and(|checked| bool::from(checked[..].ct_eq(&guess[..])));
    if tag_ok && same_key {
        Ok(std::mem::take(&mut *plaintext))
    } else {
        Err(SealError::Forged)
    }
}

/// The content key from this proxy's `wrapped` entry, checked against `bound` (the binding).
/// Unwrapped in place, in a buffer wiped when dropped (all of it, spare capacity included): the
/// content key is never copied to memory that is freed unwiped.
fn unwrap_key(
    key: &PairKey,
    nonce: &[u8; NONCE_LEN],
    bound: &[u8; 32],
    wrapped: Vec<u8>,
) -> Result<zeroize::Zeroizing<Vec<u8>>, SealError> {
    let mut content_key = zeroize::Zeroizing::new(wrapped);
    XChaCha20Poly1305::new(&key.0.into())
        .decrypt_in_place(XNonce::from_slice(nonce), bound, &mut *content_key)
        .map_err(|_| SealError::Forged)?;
    Ok(content_key)
}

/// What a dishonest *recipient* can do with what it legitimately holds: unwrap the content key
/// with its own pairwise key and seal another body under it, keeping every wrapped key as it
/// was. The other recipients must refuse the result; tests use this to show that they do.
#[doc(hidden)]
pub fn reseal_as_recipient(
    env: &Envelope,
    subject: &Subject<'_>,
    me: &ProxyId,
    key: &PairKey,
    plaintext: &[u8],
) -> Result<Envelope, SealError> {
    let nonce_bytes = decode_nonce(env)?;
    let nonce = XNonce::from_slice(&nonce_bytes);
    let header = header(subject, &env.sk, env.ts, env.ttl_ms, &env.n, &env.keys);
    let ct = decode_bulk(&env.ct).ok_or(SealError::Malformed("ciphertext encoding"))?;
    let wrapped = b64().decode(&wrap_for(env, me)?.w).map_err(|_| SealError::Malformed("wrapped key encoding"))?;
    let content_key: [u8; KEY_LEN] = XChaCha20Poly1305::new(&key.0.into())
        .decrypt(nonce, Payload { msg: &wrapped, aad: &binding(&header, &ct) })
        .map_err(|_| SealError::Forged)?
        .try_into()
        .map_err(|_| SealError::Forged)?;
    let forged = XChaCha20Poly1305::new(&content_key.into())
        .encrypt(nonce, Payload { msg: plaintext, aad: &header })
        .map_err(|_| SealError::Forged)?;
    Ok(Envelope { ct: encode_bulk(&forged), ..env.clone() })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    struct Site {
        proxy: ProxyId,
        secret: SecretKey,
        public: PublicKey,
    }

    impl Site {
        fn new(name: &str) -> Self {
            let secret = SecretKey::random(&mut rand::rngs::OsRng);
            let public = secret.public_key();
            Self { proxy: ProxyId::parse(name).unwrap(), secret, public }
        }
        fn party(&self) -> Party<'_> {
            Party { proxy: &self.proxy, key: &self.public }
        }
        fn kid(&self) -> KeyId {
            KeyId::of(&self.public)
        }
        /// (self → peer, peer → self)
        fn keys_with(&self, peer: &Site) -> (PairKey, PairKey) {
            pair_keys(&self.secret, &self.party(), &peer.party())
        }
    }

    struct Fixture {
        a: Site,
        b: Site,
        c: Site,
        from: AppId,
        to: Vec<AppId>,
        meta: Value,
    }

    fn fixture() -> Fixture {
        Fixture {
            a: Site::new("a.broker"),
            b: Site::new("b.broker"),
            c: Site::new("c.broker"),
            from: AppId::parse("app.a.broker").unwrap(),
            to: vec![AppId::parse("app.b.broker").unwrap(), AppId::parse("app.c.broker").unwrap()],
            meta: json!({"kind": "test", "n": 1}),
        }
    }

    fn task<'a>(f: &'a Fixture, id: Uuid) -> Subject<'a> {
        Subject::Task { id, from: &f.from, to: &f.to, failure_strategy: &FailureStrategy::Discard, metadata: &f.meta }
    }

    /// A from a's site to b and c (and a itself).
    fn sealed(f: &Fixture, subject: &Subject<'_>, body: &[u8]) -> Envelope {
        let (ab, _) = f.a.keys_with(&f.b);
        let (ac, _) = f.a.keys_with(&f.c);
        let (aa, _) = f.a.keys_with(&f.a);
        let rs = [
            Recipient { proxy: &f.a.proxy, kid: f.a.kid(), key: &aa },
            Recipient { proxy: &f.b.proxy, kid: f.b.kid(), key: &ab },
            Recipient { proxy: &f.c.proxy, kid: f.c.kid(), key: &ac },
        ];
        seal(subject, f.a.kid(), 1_000, Some(60_000), &rs, body)
    }

    fn open_at(site: &Site, sender: &Site, env: &Envelope, subject: &Subject<'_>) -> Result<Vec<u8>, SealError> {
        let (_, from_sender) = site.keys_with(sender);
        open(env, subject, wrap_for(env, &site.proxy)?, &from_sender)
    }

    #[test]
    fn every_recipient_and_the_sender_open_it() {
        let f = fixture();
        let id = Uuid::new_v4();
        let env = sealed(&f, &task(&f, id), b"\"secret body\"");
        assert!(!serde_json::to_string(&env).unwrap().contains("secret"));
        for site in [&f.a, &f.b, &f.c] {
            assert_eq!(open_at(site, &f.a, &env, &task(&f, id)).unwrap(), b"\"secret body\"");
        }
        let stranger = Site::new("d.broker");
        assert_eq!(open_at(&stranger, &f.a, &env, &task(&f, id)), Err(SealError::NotForUs));
    }

    #[test]
    fn pairwise_keys_are_directional_and_mirrored() {
        let f = fixture();
        let (ab, ba) = f.a.keys_with(&f.b);
        let (ba2, ab2) = f.b.keys_with(&f.a);
        assert_eq!(ab.0, ab2.0);
        assert_eq!(ba.0, ba2.0);
        assert_ne!(ab.0, ba.0);
    }

    #[test]
    fn each_covered_field_is_bound() {
        let f = fixture();
        let id = Uuid::new_v4();
        let env = sealed(&f, &task(&f, id), b"{}");
        let other_to = vec![f.to[0].clone()];
        let other_from = AppId::parse("other.a.broker").unwrap();
        let other_meta = json!({"kind": "test", "n": 2});
        let retry = FailureStrategy::Retry { backoff_millisecs: 1, max_tries: 2 };
        let altered: Vec<Subject<'_>> = vec![
            task(&f, Uuid::new_v4()),
            Subject::Task {
                id,
                from: &other_from,
                to: &f.to,
                failure_strategy: &FailureStrategy::Discard,
                metadata: &f.meta,
            },
            Subject::Task {
                id,
                from: &f.from,
                to: &other_to,
                failure_strategy: &FailureStrategy::Discard,
                metadata: &f.meta,
            },
            Subject::Task { id, from: &f.from, to: &f.to, failure_strategy: &retry, metadata: &f.meta },
            Subject::Task {
                id,
                from: &f.from,
                to: &f.to,
                failure_strategy: &FailureStrategy::Discard,
                metadata: &other_meta,
            },
            Subject::Result { task: id, from: &f.from, to: &f.to, status: WorkStatus::Succeeded, metadata: &f.meta },
        ];
        for subject in &altered {
            assert_eq!(open_at(&f.b, &f.a, &env, subject), Err(SealError::Forged), "{subject:?}");
        }
        let mut envs = vec![];
        let mut e = env.clone();
        e.ttl_ms = Some(3_600_000);
        envs.push(e);
        let mut e = env.clone();
        e.ts += 1;
        envs.push(e);
        let mut e = env.clone();
        e.keys.swap(1, 2);
        envs.push(e);
        let mut e = env.clone();
        let mut ct = b64().decode(&e.ct).unwrap();
        ct[0] ^= 1;
        e.ct = b64().encode(ct);
        envs.push(e);
        let mut e = env.clone();
        e.n = b64().encode([7u8; NONCE_LEN]);
        envs.push(e);
        for e in &envs {
            assert_eq!(open_at(&f.b, &f.a, e, &task(&f, id)), Err(SealError::Forged), "{e:?}");
        }
    }

    #[test]
    fn statuses_of_results_are_bound() {
        let f = fixture();
        let id = Uuid::new_v4();
        let result = |status| Subject::Result { task: id, from: &f.from, to: &f.to, status, metadata: &f.meta };
        let env = sealed(&f, &result(WorkStatus::Tempfailed), b"");
        assert_eq!(open_at(&f.b, &f.a, &env, &result(WorkStatus::Tempfailed)).unwrap(), b"");
        assert_eq!(open_at(&f.b, &f.a, &env, &result(WorkStatus::Succeeded)), Err(SealError::Forged));
    }

    #[test]
    fn bodies_swapped_between_messages_are_refused() {
        let f = fixture();
        let (id1, id2) = (Uuid::new_v4(), Uuid::new_v4());
        let (e1, e2) = (sealed(&f, &task(&f, id1), b"1"), sealed(&f, &task(&f, id2), b"2"));
        assert_eq!(open_at(&f.b, &f.a, &e2, &task(&f, id1)), Err(SealError::Forged));
        let mut mixed = e1.clone();
        mixed.ct = e2.ct.clone();
        assert_eq!(open_at(&f.b, &f.a, &mixed, &task(&f, id1)), Err(SealError::Forged));
    }

    /// b is a legitimate recipient: it learns the content key, but can't make c accept a
    /// changed body, neither by keeping a's wrap for c nor by wrapping with its own keys.
    #[test]
    fn a_recipient_cannot_forge_for_another() {
        let f = fixture();
        let id = Uuid::new_v4();
        let subject = task(&f, id);
        let env = sealed(&f, &subject, b"\"original\"");
        // What b knows: its pairwise key from a, hence the content key.
        let (_, a_to_b) = f.b.keys_with(&f.a);
        let nonce_bytes = decode_nonce(&env).unwrap();
        let nonce = XNonce::from_slice(&nonce_bytes);
        let h = header(&subject, &env.sk, env.ts, env.ttl_ms, &env.n, &env.keys);
        let ct = b64().decode(&env.ct).unwrap();
        let ck: [u8; 32] = XChaCha20Poly1305::new(&a_to_b.0.into())
            .decrypt(
                nonce,
                Payload { msg: &b64().decode(&wrap_for(&env, &f.b.proxy).unwrap().w).unwrap(), aad: &binding(&h, &ct) },
            )
            .unwrap()
            .try_into()
            .unwrap();
        let forged_ct = XChaCha20Poly1305::new(&ck.into())
            .encrypt(nonce, Payload { msg: b"\"forged\"".as_slice(), aad: &h })
            .unwrap();
        let mut forged = env.clone();
        forged.ct = b64().encode(&forged_ct);
        assert_eq!(open_at(&f.c, &f.a, &forged, &subject), Err(SealError::Forged));
        // b re-wraps for c with the only key it shares with c.
        let (b_to_c, _) = f.b.keys_with(&f.c);
        let rewrapped = XChaCha20Poly1305::new(&b_to_c.0.into())
            .encrypt(nonce, Payload { msg: ck.as_slice(), aad: &binding(&h, &forged_ct) })
            .unwrap();
        forged.keys[2].w = b64().encode(rewrapped);
        assert_eq!(open_at(&f.c, &f.a, &forged, &subject), Err(SealError::Forged));
        // The untouched message still opens at c.
        assert_eq!(open_at(&f.c, &f.a, &env, &subject).unwrap(), b"\"original\"");
    }

    /// From `bulk::PARALLEL_MIN` a body is opened while its wrap is checked, under the key the
    /// wrap gives unchecked: every change is still refused, including each that leaves that key
    /// right (a wrap's tag, another body under the same key).
    #[test]
    fn a_large_body_is_checked_as_a_small_one() {
        let f = fixture();
        let id = Uuid::new_v4();
        let subject = task(&f, id);
        for len in [bulk::PARALLEL_MIN - 1, bulk::PARALLEL_MIN, bulk::PARALLEL_MIN + 1] {
            let body = vec![b'x'; len];
            let env = sealed(&f, &subject, &body);
            for site in [&f.a, &f.b, &f.c] {
                assert_eq!(open_at(site, &f.a, &env, &subject).unwrap(), body, "length {len}");
            }
            let mut e = env.clone();
            e.keys[1].w = b64().encode(b64().decode(&e.keys[1].w).unwrap().iter().map(|b| b ^ 1).collect::<Vec<_>>());
            assert_eq!(open_at(&f.b, &f.a, &e, &subject), Err(SealError::Forged), "length {len}");
        }
        let body = vec![b'x'; bulk::PARALLEL_MIN + 100];
        let env = sealed(&f, &subject, &body);
        let other_meta = json!({"kind": "test", "n": 2});
        let altered = Subject::Task {
            id,
            from: &f.from,
            to: &f.to,
            failure_strategy: &FailureStrategy::Discard,
            metadata: &other_meta,
        };
        assert_eq!(open_at(&f.b, &f.a, &env, &task(&f, Uuid::new_v4())), Err(SealError::Forged));
        assert_eq!(open_at(&f.b, &f.a, &env, &altered), Err(SealError::Forged));
        assert_eq!(open_at(&f.b, &f.c, &env, &subject), Err(SealError::Forged), "another sender's key");
        let ct = b64().decode(&env.ct).unwrap();
        for at in [0, ct.len() / 2, ct.len() - 1] {
            let mut flipped = ct.clone();
            flipped[at] ^= 1;
            let e = Envelope { ct: b64().encode(flipped), ..env.clone() };
            assert_eq!(open_at(&f.b, &f.a, &e, &subject), Err(SealError::Forged), "ciphertext byte {at}");
        }
        let w = b64().decode(&wrap_for(&env, &f.b.proxy).unwrap().w).unwrap();
        for at in [0, KEY_LEN - 1, KEY_LEN, w.len() - 1] {
            let mut flipped = w.clone();
            flipped[at] ^= 1;
            let mut e = env.clone();
            e.keys[1].w = b64().encode(flipped);
            assert_eq!(open_at(&f.b, &f.a, &e, &subject), Err(SealError::Forged), "wrap byte {at}");
        }
        // b, a recipient, seals another large body under the content key it learnt; the
        // key c guesses from a's wrap is right, and the body's tag verifies under it.
        let (_, a_to_b) = f.b.keys_with(&f.a);
        let forged = reseal_as_recipient(&env, &subject, &f.b.proxy, &a_to_b, &vec![b'y'; body.len()]).unwrap();
        assert_eq!(open_at(&f.c, &f.a, &forged, &subject), Err(SealError::Forged));
    }

    /// A large body whose tag is wrong is refused even under a wrap that binds that very
    /// ciphertext (what only its sender, or a recipient re-wrapping for itself, can make): the
    /// one case in which the body's own tag decides, not the binding. The same re-wrap over the
    /// ciphertext as sealed opens.
    #[test]
    fn a_large_body_with_a_bad_tag_is_refused_under_a_good_wrap() {
        let f = fixture();
        let subject = task(&f, Uuid::new_v4());
        let body = vec![b'x'; bulk::PARALLEL_MIN + 100];
        let env = sealed(&f, &subject, &body);
        let (_, a_to_b) = f.b.keys_with(&f.a);
        let nonce = decode_nonce(&env).unwrap();
        let header = header(&subject, &env.sk, env.ts, env.ttl_ms, &env.n, &env.keys);
        let ct = decode_bulk(&env.ct).unwrap();
        let w = b64().decode(&wrap_for(&env, &f.b.proxy).unwrap().w).unwrap();
        let content_key = unwrap_key(&a_to_b, &nonce, &binding(&header, &ct), w).unwrap();
        let rewrapped = |ct: &[u8]| {
            let w = XChaCha20Poly1305::new(&a_to_b.0.into())
                .encrypt(XNonce::from_slice(&nonce), Payload { msg: &content_key[..], aad: &binding(&header, ct) })
                .unwrap();
            let mut e = Envelope { ct: encode_bulk(ct), ..env.clone() };
            let at = e.keys.iter().position(|k| k.p == f.b.proxy).unwrap();
            e.keys[at].w = b64().encode(w);
            e
        };
        assert_eq!(open_at(&f.b, &f.a, &rewrapped(&ct), &subject).unwrap(), body, "the re-wrap itself opens");
        for at in [ct.len() - bulk::TAG_LEN, ct.len() - 1] {
            let mut bad_tag = ct.clone();
            bad_tag[at] ^= 1;
            assert_eq!(open_at(&f.b, &f.a, &rewrapped(&bad_tag), &subject), Err(SealError::Forged), "tag byte {at}");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let f = fixture();
        let id = Uuid::new_v4();
        let env = sealed(&f, &task(&f, id), b"\"body\"");
        let mut e = env.clone();
        e.ct = "!!not base64!!".into();
        assert_eq!(open_at(&f.b, &f.a, &e, &task(&f, id)), Err(SealError::Malformed("ciphertext encoding")));
        let mut e = env.clone();
        e.ct = b64().encode([0u8; 5]);
        assert!(matches!(open_at(&f.b, &f.a, &e, &task(&f, id)), Err(SealError::Malformed(_))));
        let mut e = env.clone();
        let ct = b64().decode(&e.ct).unwrap();
        e.ct = b64().encode(&ct[..ct.len() - 1]);
        assert_eq!(open_at(&f.b, &f.a, &e, &task(&f, id)), Err(SealError::Forged));
        let mut e = env.clone();
        e.n = b64().encode([0u8; 12]);
        assert_eq!(open_at(&f.b, &f.a, &e, &task(&f, id)), Err(SealError::Malformed("nonce length")));
        let mut e = env.clone();
        e.keys[1].w = b64().encode([0u8; 10]);
        assert_eq!(open_at(&f.b, &f.a, &e, &task(&f, id)), Err(SealError::Malformed("wrapped key length")));
        // Opened with the wrong key: b thinks c sent it.
        assert_eq!(open_at(&f.b, &f.c, &env, &task(&f, id)), Err(SealError::Forged));
        assert!(KeyId::parse("AAAA").is_err());
        assert!(serde_json::from_str::<Envelope>(r#"{"alg":"plain","data":1}"#).is_err());
    }
}
