//! What proxies and the broker exchange. Bodies travel as an opaque [`Envelope`] the broker
//! stores and forwards byte for byte without parsing (`RawValue`).

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{value::RawValue, Value};
use uuid::Uuid;

use super::{AppId, FailureStrategy, ProxyId, WorkStatus};

/// Header naming the app a proxy acts for; the broker checks the proxy may sign for it.
pub const APP_HEADER: &str = "x-photon-app";
/// Header carrying the session id of a proxy's authenticated session.
pub const SESSION_HEADER: &str = "x-photon-session";
/// Header carrying the request's sequence number within the session (anti-replay).
pub const SEQ_HEADER: &str = "x-photon-seq";
/// Header carrying the request's timestamp, Unix milliseconds (anti-replay window).
pub const TS_HEADER: &str = "x-photon-ts";
/// Header carrying the request MAC (base64).
pub const MAC_HEADER: &str = "x-photon-mac";
/// Header naming the proxy process (random per start). While one instance of a proxy holds
/// the control connection, requests from another are refused: two processes with one id are a
/// misconfiguration. Not a security boundary (both hold the same key); the MAC does not cover it.
pub const INSTANCE_HEADER: &str = "x-photon-instance";
/// Set on the broker's `409` to a request from a duplicate proxy instance.
pub const DUPLICATE_HEADER: &str = "x-photon-duplicate";
/// Query flag asking a read endpoint for a stream of [`StreamEvent`] lines instead of JSON.
pub const STREAM_PARAM: &str = "stream";

/// A sealed body (an [`Envelope`]'s JSON) as the broker stores and forwards it: shared, so
/// handing a task out copies no body, and boxed inside the `Arc` so that a body parsed from a
/// request moves in as it is (an `Arc<RawValue>` is one allocation, which costs a copy of the
/// whole body: 3 % of the broker's CPU in the 1 MiB round trip).
pub type SealedBody = Arc<Box<RawValue>>;

/// A task between proxy and broker. On creation `ttl_ms` is the requested lifetime; when the
/// broker hands a task out it is the lifetime left.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireTask {
    pub id: Uuid,
    pub from: AppId,
    pub to: Vec<AppId>,
    pub ttl_ms: u64,
    pub failure_strategy: FailureStrategy,
    pub metadata: Value,
    pub body: SealedBody,
    /// A detached upload as the broker received it ([`Detached`]); never in JSON.
    #[serde(skip)]
    pub detached: Option<Bytes>,
}

/// A result between proxy and broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireResult {
    pub from: AppId,
    pub to: Vec<AppId>,
    pub task: Uuid,
    pub status: WorkStatus,
    pub metadata: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<SealedBody>,
    /// A detached upload as the broker received it ([`Detached`]); never in JSON.
    #[serde(skip)]
    pub detached: Option<Bytes>,
}

/// Large sealed bodies travel between proxy and broker *detached*: their ciphertext as raw bytes
/// beside the message's JSON instead of base64 inside it. A detached upload (`POST /v1/tasks`
/// or a result `PUT`, with the query [`DETACHED_QUERY`]) is the message's JSON, one newline,
/// then the ciphertext (compact JSON has no raw newline); its envelope has an empty `ct` and
/// names the ciphertext's length in `detached`. The broker stores the upload as it came and
/// hands out the message's JSON as usual; a recipient's proxy then fetches the upload whole
/// ([`DETACHED_PATH`] after the task's or the result's path). Neither side writes, scans or
/// decodes a megabyte of base64 inside JSON, and the broker stores and serves the upload
/// without copying it. The request MAC covers the upload's JSON and its ciphertext's digest
/// (`crypto::session::detached_digest`); the envelope binds the ciphertext exactly as it binds
/// an inline one.
pub struct Detached;

/// The query of a detached upload.
pub const DETACHED_QUERY: &str = "body=detached";
/// Appended to a task's path (`/v1/tasks/{id}`) or a result's (`/v1/tasks/{id}/results/{app}`):
/// `GET` answers that message's detached upload.
pub const DETACHED_PATH: &str = "/sealed";

impl Detached {
    /// A detached upload: `json`, a newline, `ct`.
    pub fn join(json: &[u8], ct: &[u8]) -> Bytes {
        let mut upload = Vec::with_capacity(json.len() + 1 + ct.len());
        upload.extend_from_slice(json);
        upload.push(b'\n');
        upload.extend_from_slice(ct);
        upload.into()
    }

    /// A detached upload's JSON and ciphertext; `None` without the newline.
    pub fn split(upload: &[u8]) -> Option<(&[u8], &[u8])> {
        let at = memchr::memchr(b'\n', upload)?;
        Some((&upload[..at], &upload[at + 1..]))
    }
}

/// Path of the upload batch: several task creations and result puts from one proxy in one
/// signed request (`POST`, a JSON array of [`Upload`]). The answer is `200` with one
/// [`Outcome`] per upload, in order; each upload succeeds or fails on its own, with the status
/// and error body its own request would have had.
pub const BATCH_PATH: &str = "/v1/batch";
/// The most uploads one batch may carry.
pub const MAX_BATCH: usize = 256;

/// One upload of a batch: what `POST /v1/tasks` or `PUT /v1/tasks/{id}/results/{app}` carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upload {
    Task(WireTask),
    Result(WireResult),
}

/// What became of one upload of a batch: the status its own request would have answered, and
/// for a failure that request's error body (`{"error": ...}`, or the array of a `424`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Box<RawValue>>,
}

/// One line of a broker stream (newline-delimited JSON; an empty line is a keep-alive).
/// Externally tagged (`{"new_result":{...}}`): internally tagged enums buffer their content,
/// which `RawValue` bodies can't pass through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    /// A stored, new or replaced result; `n_answers` counts the task's non-claimed results after it.
    NewResult { seq: u64, n_answers: usize, result: Arc<WireResult> },
    /// A task for the streaming worker.
    NewTask { seq: u64, task: Arc<WireTask> },
    /// A result stream has sent every result stored when it opened; live ones follow.
    CaughtUp,
    /// `wait_time` passed.
    WaitExpired,
    /// The task expired.
    DeletedTask { task_id: Uuid },
    /// The stream ends because of trouble on the broker's side.
    Error { message: String },
    /// The broker is shutting down; the stream ends here, cleanly.
    ShuttingDown,
}

/// One line of the control connection (`GET /v1/control`), which a proxy holds open for as long
/// as it runs; the broker counts it online meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum ControlEvent {
    /// First line: the connection is accepted; a line (this, a heartbeat) follows at least every
    /// `heartbeat_ms`, so the proxy can tell a dead connection from a quiet one.
    Welcome {
        heartbeat_ms: u64,
        /// The broker's `MAX_WAIT`: a proxy asks for no longer wait on its apps' behalf.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_wait_ms: Option<u64>,
    },
    Heartbeat,
    /// The broker ends the connection (shutting down, certificate revoked, replaced).
    Bye {
        reason: String,
    },
}

/// How a message body travels: sealed end to end by the sender's proxy (see `crypto::e2e`).
/// The broker never looks inside; every field is base64 or a number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub alg: SealAlg,
    /// The sender's key id (its certified key).
    pub sk: String,
    /// When the sender sealed it, Unix ms (sender's clock).
    pub ts: u64,
    /// The lifetime the creator asked for (tasks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// 24-byte XChaCha20 nonce.
    pub n: String,
    /// The content key, wrapped once per recipient proxy (the sender's own included).
    pub keys: Vec<WrappedKey>,
    /// The ciphertext's length when it travels detached (see [`Detached`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached: Option<u64>,
    /// The body's ciphertext with its tag, base64; empty when it travels detached.
    pub ct: String,
}

impl Envelope {
    /// The envelope as JSON, with `ct` written as it is rather than escaped: base64 never needs
    /// escaping, and a large body's ciphertext is most of the message. (Falls back to the
    /// escaping writer for a `ct` that would need it, which sealing never makes.)
    pub fn to_raw(&self) -> Box<RawValue> {
        /// Every field but `ct`, in the order `Envelope` writes them.
        #[derive(Serialize)]
        struct Head<'a> {
            alg: SealAlg,
            sk: &'a str,
            ts: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            ttl_ms: Option<u64>,
            n: &'a str,
            keys: &'a [WrappedKey],
            #[serde(skip_serializing_if = "Option::is_none")]
            detached: Option<u64>,
        }
        // Only a `"` or `\\` could end the string early; anything else invalid fails the check below.
        if memchr::memchr2(b'"', b'\\', self.ct.as_bytes()).is_some() {
            return serde_json::value::to_raw_value(self).expect("envelopes serialize");
        }
        let head = Head {
            alg: self.alg,
            sk: &self.sk,
            ts: self.ts,
            ttl_ms: self.ttl_ms,
            n: &self.n,
            keys: &self.keys,
            detached: self.detached,
        };
        let mut json = serde_json::to_string(&head).expect("envelopes serialize");
        json.pop(); // the closing brace
        json.reserve(self.ct.len() + 9);
        json.push_str(",\"ct\":\"");
        json.push_str(&self.ct);
        json.push_str("\"}");
        RawValue::from_string(json)
            .unwrap_or_else(|_| serde_json::value::to_raw_value(self).expect("envelopes serialize"))
    }
}

/// The one sealing scheme there is; any other `alg` does not parse and is refused.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SealAlg {
    #[serde(rename = "p256-hkdf-xchacha20poly1305-blake3")]
    V2,
}

/// The content key for one recipient proxy, sealed under the sender→recipient pairwise key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WrappedKey {
    /// The recipient proxy.
    pub p: ProxyId,
    /// The recipient's key id.
    pub k: String,
    /// The wrapped content key (32 bytes + tag).
    pub w: String,
}

/// Answer of `POST /v1/session`'s handshake, see `crypto::session`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionHello {
    /// The proxy's certificate (PEM).
    pub cert: String,
    /// The proxy's ephemeral P-256 public key (SEC1, base64).
    pub eph_pub: String,
    /// Unix milliseconds.
    pub ts: u64,
    /// 16 random bytes, base64.
    pub nonce: String,
    /// ECDSA P-256 SHA-256 signature (DER, base64) over the hello transcript.
    pub sig: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionAccept {
    pub session: String,
    pub proxy_id: ProxyId,
    /// The broker's certificate (PEM).
    pub cert: String,
    pub eph_pub: String,
    pub sig: String,
    /// Seconds the session is valid; the proxy renews before.
    pub expires_in: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(ttl_ms: Option<u64>, ct: &str) -> Envelope {
        Envelope {
            alg: SealAlg::V2,
            sk: "kid".into(),
            ts: 1,
            ttl_ms,
            n: "bm9uY2U=".into(),
            keys: vec![WrappedKey { p: ProxyId::parse("proxy1.broker").unwrap(), k: "k".into(), w: "dw==".into() }],
            detached: None,
            ct: ct.into(),
        }
    }

    #[test]
    fn raw_envelopes_read_back_as_written() {
        for env in [envelope(Some(5), "Y2lwaGVy+/="), envelope(None, ""), envelope(None, "a\"b\\c\n")] {
            let raw = env.to_raw();
            assert_eq!(serde_json::from_str::<Envelope>(raw.get()).unwrap(), env, "{}", raw.get());
            assert_eq!(raw.get(), serde_json::to_string(&env).unwrap());
        }
    }
}
