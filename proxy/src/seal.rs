//! App bodies ↔ sealed envelopes, at the edge of the proxy (scheme: `photon::crypto::e2e`).
//!
//! Sealing: the recipients are this proxy plus the proxy of every app in `to`; each one's
//! certificate must be valid, or the answer is `424` with the ProxyIds that lack one.
//! Opening: a message is handed to an app only if its envelope verifies under the key the
//! sender's certificate gives, it is addressed to that app, and (tasks) the broker did not
//! stretch its lifetime. Anything else is refused, logged and counted in [`Refusals`].
//! Bodies over [`INLINE_LIMIT`] are sealed and opened on the blocking pool, off the workers.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use actix_web::web;
use bytes::Bytes;
use futures_util::future::join_all;
use parking_lot::Mutex;
use photon::{
    crypto::{
        e2e::{self, KeyId, Recipient, SealError, Subject},
        unix_millis,
    },
    http::ApiError,
    wire::{
        app::{single_line, RawBody, Task, TaskResult},
        broker::{Detached, Envelope, SealedBody, WireResult, WireTask, DETACHED_PATH},
        AppId, ProxyId,
    },
};
use reqwest::{Method, StatusCode};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::{
    http::UPSTREAM_SLACK,
    keyring::{Peer, PeerError},
    upstream::{Upstream, UpstreamError, Whole},
};

/// Bodies (or ciphertexts) larger than this are sealed and opened on the blocking pool.
pub const INLINE_LIMIT: usize = 64 * 1024;
/// Bodies larger than this travel detached (`photon::wire::broker::Detached`): their
/// ciphertext beside the message's JSON, as raw bytes.
pub const DETACH_LIMIT: usize = 64 * 1024;

// A detached upload is never batched: it needs its own request (and query).
const _: () = assert!(DETACH_LIMIT >= crate::batch::ITEM_LIMIT);
/// How far the creator's clock may be off when checking that a task has not expired.
const CLOCK_SKEW_MS: u64 = 300_000;

/// Why an incoming message was refused (never handed to an app).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Seal(#[from] SealError),
    #[error("{0}")]
    Peer(#[from] PeerError),
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("no envelope: unsealed messages are refused")]
    Unsealed,
    #[error("the broker gives a longer lifetime ({broker_ms} ms) than the creator sealed ({sealed_ms} ms)")]
    TtlExtended { broker_ms: u64, sealed_ms: u64 },
    #[error("expired by the lifetime its creator sealed")]
    Expired,
    #[error("a result for task {got} where task {want} was asked for")]
    WrongTask { got: Uuid, want: Uuid },
    #[error("not addressed to {0}")]
    NotAddressed(AppId),
    #[error("its detached body could not be fetched: {0}")]
    Unavailable(String),
}

impl OpenError {
    /// A short name for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Seal(e) => e.reason(),
            Self::Peer(PeerError::NoCertificate(_)) => "no_certificate",
            Self::Peer(PeerError::Expired(_)) => "certificate_expired",
            Self::Peer(PeerError::Revoked(_)) => "certificate_revoked",
            Self::Peer(PeerError::Invalid(..)) => "certificate_invalid",
            Self::Peer(PeerError::UnknownKey(_)) => "unknown_key",
            Self::Peer(PeerError::Unreachable(..)) => "certificate_unreachable",
            Self::Malformed(_) => "malformed",
            Self::Unsealed => "unsealed",
            Self::TtlExtended { .. } => "ttl_extended",
            Self::Expired => "expired",
            Self::WrongTask { .. } => "wrong_task",
            Self::NotAddressed(_) => "not_addressed",
            Self::Unavailable(_) => "detached_unavailable",
        }
    }
}

/// Messages refused since start, by reason (operators see them on `/v1/health`).
#[derive(Default)]
pub struct Refusals {
    by_reason: Mutex<BTreeMap<&'static str, u64>>,
    metrics: photon::ops::Metrics,
}

impl Refusals {
    /// Counts on the health endpoint and as the metric `messages.refused` by reason.
    pub fn new(metrics: photon::ops::Metrics) -> Self {
        Self { by_reason: Mutex::default(), metrics }
    }

    pub fn count(&self, e: &OpenError) {
        *self.by_reason.lock().entry(e.reason()).or_default() += 1;
        self.metrics.count("messages.refused", 1, &[("reason", e.reason())]);
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.by_reason.lock().clone()
    }
}

/// Runs CPU-heavy crypto on the blocking pool (for large bodies; small ones run inline, without
/// the copies a `'static` closure needs).
async fn on_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    web::block(f).await.map_err(|e| ApiError::Unavailable(format!("crypto pool: {e}")))
}

pub fn task_subject(t: &WireTask) -> Subject<'_> {
    Subject::Task { id: t.id, from: &t.from, to: &t.to, failure_strategy: &t.failure_strategy, metadata: &t.metadata }
}

pub fn result_subject(r: &WireResult) -> Subject<'_> {
    Subject::Result { task: r.task, from: &r.from, to: &r.to, status: r.status, metadata: &r.metadata }
}

/// Removes repeated apps from `to`, keeping the first of each (the broker does the same, and
/// `to` is sealed as sent).
pub fn dedup(to: &mut Vec<AppId>) {
    let mut seen = std::collections::HashSet::new();
    to.retain(|app| seen.insert(app.clone()));
}

/// This proxy and the proxies of `to`, each with its pairwise keys; `424` lists those without
/// a valid certificate.
async fn recipients(up: &Upstream, to: &[AppId]) -> Result<Vec<Arc<Peer>>, ApiError> {
    // As the broker requires (it would answer 400 after the sealing): apps of this broker only.
    for app in to {
        app.within(up.keys.broker_id()).map_err(|e| ApiError::BadRequest(format!("to: {e}")))?;
    }
    let mut proxies: Vec<ProxyId> = vec![up.keys.me().clone()];
    for app in to {
        let p = app.proxy_id();
        if !proxies.contains(&p) {
            proxies.push(p);
        }
    }
    let found = join_all(proxies.iter().map(|p| up.peer(p, None))).await;
    let mut peers = Vec::with_capacity(found.len());
    let mut missing = Vec::new();
    for r in found {
        match r {
            Ok(peer) => peers.push(peer),
            Err(e) => match e.proxy_without_certificate() {
                Some(p) => missing.push(p.clone()),
                None => return Err(ApiError::BadGateway(e.to_string())),
            },
        }
    }
    if !missing.is_empty() {
        return Err(ApiError::MissingCerts(missing));
    }
    Ok(peers)
}

/// A ciphertext that travels detached, and its digest (`photon::crypto::ct_digest`).
pub struct DetachedCt {
    pub ct: Vec<u8>,
    pub digest: [u8; 32],
}

/// A sealed body: the envelope, and the ciphertext when it travels detached.
pub type Sealed = (SealedBody, Option<DetachedCt>);

fn seal_with(
    subject: &Subject<'_>,
    sender: KeyId,
    ttl_ms: Option<u64>,
    peers: &[Arc<Peer>],
    plaintext: &[u8],
) -> Sealed {
    let rs: Vec<Recipient<'_>> =
        peers.iter().map(|p| Recipient { proxy: &p.proxy, kid: p.kid, key: &p.to_peer }).collect();
    if plaintext.len() > DETACH_LIMIT {
        let (env, ct, digest) = e2e::seal_detached(subject, sender, unix_millis(), ttl_ms, &rs, plaintext);
        return (Arc::new(env.to_raw()), Some(DetachedCt { ct, digest }));
    }
    let env = e2e::seal(subject, sender, unix_millis(), ttl_ms, &rs, plaintext);
    (Arc::new(env.to_raw()), None)
}

/// A body's JSON text as bytes, without copying it.
fn text_bytes(body: RawBody) -> Vec<u8> {
    Box::<str>::from(body).into_boxed_bytes().into_vec()
}

/// Seals `body` (its JSON text as the app sent it) into `task.body` (`task` holds every other
/// field already; `to` deduplicated). Returns the ciphertext if it travels detached.
pub async fn seal_task(up: &Upstream, task: &mut WireTask, body: RawBody) -> Result<Option<DetachedCt>, ApiError> {
    dedup(&mut task.to);
    let peers = recipients(up, &task.to).await?;
    let plaintext = text_bytes(body);
    let sender = up.keys.own().kid;
    let (sealed, detached) = if plaintext.len() <= INLINE_LIMIT {
        seal_with(&task_subject(task), sender, Some(task.ttl_ms), &peers, &plaintext)
    } else {
        let header = task.clone();
        on_pool(move || seal_with(&task_subject(&header), sender, Some(header.ttl_ms), &peers, &plaintext)).await?
    };
    task.body = sealed;
    Ok(detached)
}

/// Seals `body` (an absent body is sealed too, so every field stays covered) into
/// `result.body`. Returns the ciphertext if it travels detached.
pub async fn seal_result(
    up: &Upstream,
    result: &mut WireResult,
    body: Option<RawBody>,
) -> Result<Option<DetachedCt>, ApiError> {
    dedup(&mut result.to);
    let peers = recipients(up, &result.to).await?;
    // An absent body seals as empty bytes, which is no JSON text.
    let plaintext = body.map(text_bytes).unwrap_or_default();
    let sender = up.keys.own().kid;
    let (sealed, detached) = if plaintext.len() <= INLINE_LIMIT {
        seal_with(&result_subject(result), sender, None, &peers, &plaintext)
    } else {
        let header = result.clone();
        on_pool(move || seal_with(&result_subject(&header), sender, None, &peers, &plaintext)).await?
    };
    result.body = Some(sealed);
    Ok(detached)
}

/// A message's envelope, and its ciphertext if that travelled detached. For a detached one the
/// message is fetched again with it from the broker (`path`, as `caller`), and that message is
/// the one returned, never half old and half new: a result replaced meanwhile comes back whole
/// in its newer version (which `open_result` then leaves out: it opens only the version listed).
async fn envelope_of<M: serde::de::DeserializeOwned>(
    up: &Upstream,
    caller: &AppId,
    message: Arc<M>,
    raw: fn(&M) -> Option<&RawValue>,
    path: impl FnOnce(&M) -> String,
) -> Result<(Arc<M>, Envelope, Option<Bytes>), OpenError> {
    let malformed = |e: &dyn std::fmt::Display| OpenError::Malformed(e.to_string());
    let env: Envelope =
        serde_json::from_str(raw(&message).ok_or(OpenError::Unsealed)?.get()).map_err(|e| malformed(&e))?;
    if env.detached.is_none() {
        return Ok((message, env, None));
    }
    let fetched = fetch_detached(up, caller, &path(&message)).await?;
    let (json, _) =
        Detached::split(&fetched.body).ok_or_else(|| malformed(&"a detached upload without its newline"))?;
    let ct_at = json.len() + 1;
    let message: M = serde_json::from_slice(json).map_err(|e| malformed(&e))?;
    let env: Envelope =
        serde_json::from_str(raw(&message).ok_or(OpenError::Unsealed)?.get()).map_err(|e| malformed(&e))?;
    Ok((Arc::new(message), env, Some(fetched.body.slice(ct_at..))))
}

/// The longest detached upload a proxy whose apps may send `max_body` bytes fetches: such a body
/// sealed (its ciphertext is as long, and 16 bytes), as much again for the message around it (its
/// metadata, recipients and envelope), and 1 MiB. Whatever a broker answers beyond it is refused
/// unread, so a broker (or anyone on a plain `http://` link) cannot make a proxy take in more.
pub fn detached_limit(max_body: usize) -> usize {
    max_body.saturating_mul(2).saturating_add(1 << 20)
}

/// Tries of a detached body's fetch that fails on the way (not with a 4xx), and the pause before
/// the second; each further pause doubles.
const FETCH_TRIES: u32 = 3;
const FETCH_PAUSE: Duration = Duration::from_millis(100);

/// A detached upload from the broker. A failure on the way (unreachable, a timeout, a 5xx) is
/// tried again a few times, so that a broker restarting or a moment's overload does not cost a
/// stream reader its message; a 4xx (the message has expired, or never had one) is final.
async fn fetch_detached(up: &Upstream, caller: &AppId, path: &str) -> Result<Whole, OpenError> {
    let mut pause = FETCH_PAUSE;
    for attempt in 1..=FETCH_TRIES {
        let fetched =
            up.call_within(Method::GET, path, caller.as_str(), Bytes::new(), Some(UPSTREAM_SLACK), up.max_detached);
        let failed = match fetched.await {
            Ok(fetched) if fetched.status == StatusCode::OK => return Ok(fetched),
            // Larger again the next time: not tried again.
            Err(e @ UpstreamError::TooLarge(_)) => return Err(OpenError::Unavailable(format!("{path}: {e}"))),
            Ok(fetched) if fetched.status.is_client_error() => {
                return Err(OpenError::Unavailable(format!("the broker answered {} for {path}", fetched.status)))
            }
            Ok(fetched) => format!("the broker answered {} for {path}", fetched.status),
            Err(e) => e.to_string(),
        };
        if attempt == FETCH_TRIES {
            return Err(OpenError::Unavailable(failed));
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    unreachable!("the last try returns")
}

/// Checks and opens the envelope of a message from `from` (its ciphertext `ct` if detached):
/// the sender's key (certificate valid, unrevoked) and this proxy's wrapped key must verify
/// every covered field.
async fn open_envelope<M: Send + Sync + 'static>(
    up: &Upstream,
    message: Arc<M>,
    env: Envelope,
    ct: Option<Bytes>,
    from: &AppId,
    subject: fn(&M) -> Subject<'_>,
) -> Result<(Envelope, Vec<u8>), OpenError> {
    let wrap = e2e::wrap_for(&env, up.keys.me())?;
    let my_kid = KeyId::parse(&wrap.k)?;
    let mine = up.keys.own_by_kid(&my_kid).ok_or(SealError::NotForUs)?;
    up.keys.check_own(&mine)?;
    let sender = up.peer(&from.proxy_id(), Some(KeyId::parse(&env.sk)?)).await?;
    let keys = up.keys.open_key(&mine, sender);
    let ct_len = ct.as_ref().map_or(env.ct.len(), Bytes::len);
    let open = move |env: &Envelope, wrap: &photon::wire::broker::WrappedKey| match &ct {
        Some(ct) => e2e::open_detached(env, ct, &subject(&message), wrap, keys.key()),
        None => e2e::open(env, &subject(&message), wrap, keys.key()),
    };
    if ct_len <= INLINE_LIMIT {
        let plaintext = open(&env, wrap)?;
        return Ok((env, plaintext));
    }
    let wrap = wrap.clone();
    on_pool(move || open(&env, &wrap).map(|plaintext| (env, plaintext)))
        .await
        .map_err(|e| OpenError::Malformed(e.to_string()))?
        .map_err(OpenError::from)
}

/// The opened body as JSON text, checked, on one line.
fn json_body(plaintext: Vec<u8>) -> Result<RawBody, OpenError> {
    let malformed = |e: &dyn std::fmt::Display| OpenError::Malformed(format!("sealed body is not JSON: {e}"));
    let text = String::from_utf8(plaintext).map_err(|e| malformed(&e))?;
    Ok(single_line(RawValue::from_string(text).map_err(|e| malformed(&e))?))
}

/// The task as the app `caller` sees it, if it verifies and is addressed to or from `caller`.
pub async fn open_task(up: &Upstream, caller: &AppId, task: Arc<WireTask>) -> Result<Task<RawBody>, OpenError> {
    let addressed = |t: &WireTask| match &t.from == caller || t.to.contains(caller) {
        true => Ok(()),
        false => Err(OpenError::NotAddressed(caller.clone())),
    };
    addressed(&task)?;
    let (listed_id, listed_ttl_ms) = (task.id, task.ttl_ms);
    let path = |t: &WireTask| format!("/v1/tasks/{}{DETACHED_PATH}", t.id);
    let (task, env, ct) = envelope_of(up, caller, task, |t| Some(&*t.body), path).await?;
    // Fetched again (detached): the same task, with the lifetime it had when it was listed.
    if task.id != listed_id {
        return Err(OpenError::Malformed(format!("the detached upload of task {listed_id} is of {}", task.id)));
    }
    addressed(&task)?;
    let task = match task.ttl_ms == listed_ttl_ms {
        true => task,
        false => Arc::new(WireTask { ttl_ms: listed_ttl_ms, ..(*task).clone() }),
    };
    let (env, plaintext) = open_envelope(up, task.clone(), env, ct, &task.from, task_subject).await?;
    let sealed_ms = env.ttl_ms.ok_or(OpenError::Malformed("a task envelope without ttl_ms".into()))?;
    if task.ttl_ms > sealed_ms {
        return Err(OpenError::TtlExtended { broker_ms: task.ttl_ms, sealed_ms });
    }
    if env.ts.saturating_add(sealed_ms).saturating_add(CLOCK_SKEW_MS) < unix_millis() {
        return Err(OpenError::Expired);
    }
    Ok(Task {
        body: json_body(plaintext)?,
        id: task.id,
        from: task.from.clone(),
        to: task.to.clone(),
        ttl: (task.ttl_ms / 1000).to_string(),
        failure_strategy: task.failure_strategy.clone(),
        metadata: task.metadata.clone(),
    })
}

/// A result of task `task_id` as its creator `caller` sees it, if it verifies.
pub async fn open_result(
    up: &Upstream,
    caller: &AppId,
    task_id: Uuid,
    result: Arc<WireResult>,
) -> Result<TaskResult<RawBody>, OpenError> {
    let check = |r: &WireResult| {
        if r.task != task_id {
            return Err(OpenError::WrongTask { got: r.task, want: task_id });
        }
        match r.to.contains(caller) {
            true => Ok(()),
            false => Err(OpenError::NotAddressed(caller.clone())),
        }
    };
    check(&result)?;
    let listed = result.clone();
    let path = |r: &WireResult| format!("/v1/tasks/{}/results/{}{DETACHED_PATH}", r.task, r.from);
    let (result, env, ct) = envelope_of(up, caller, result, |r| r.body.as_deref().map(|b| &**b), path).await?;
    // Fetched again (detached): the result as listed, or its newer version if it was replaced
    // meanwhile. Only the listed one is opened: callers count what they hand out by the status
    // listed, and a newer version comes in its own listing or event.
    if result.from != listed.from {
        return Err(OpenError::Malformed(format!(
            "the detached upload of {}'s result is {}'s",
            listed.from, result.from
        )));
    }
    if (result.status, &result.to, &result.metadata) != (listed.status, &listed.to, &listed.metadata) {
        return Err(OpenError::Unavailable(format!("{}'s result was replaced since it was listed", result.from)));
    }
    check(&result)?;
    let (env, plaintext) = open_envelope(up, result.clone(), env, ct, &result.from, result_subject).await?;
    if env.ttl_ms.is_some() {
        return Err(OpenError::Malformed("a result envelope with ttl_ms".into()));
    }
    Ok(TaskResult {
        body: if plaintext.is_empty() { None } else { Some(json_body(plaintext)?) },
        from: result.from.clone(),
        to: result.to.clone(),
        task: result.task,
        status: result.status,
        metadata: result.metadata.clone(),
    })
}
