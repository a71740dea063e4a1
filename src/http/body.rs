//! Request plumbing shared by broker and proxy: bounded body reads, JSON and query parsing with
//! errors that say what is wrong, and the long-poll parameters.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use actix_web::{
    body::{BodySize, MessageBody},
    web, HttpRequest,
};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use sha2::{Digest, Sha256};

use super::ApiError;
use crate::{
    actors::engine::Wait,
    crypto::session::{body_digest, BodyDigest},
    wire::{parse_duration, ReadQuery},
};

/// The longest a request body may stall (no byte arriving) before the request is refused with
/// `408`: a live upload, however slow its link, sends far more often, and a client that stops
/// would otherwise hold its buffer and connection for good.
pub const BODY_STALL: Duration = Duration::from_secs(15);

/// The slowest a request body may arrive on average, in bytes per second, after a grace of
/// [`BODY_STALL`]: by then it must have sent `BODY_MIN_RATE` bytes for every second since it
/// began, or it is refused with `408`. A client that trickles a byte now and then never stalls
/// for [`BODY_STALL`], but without this it would hold its connection and buffer for as long as it
/// liked. 4 KiB/s is 32 kbit/s, below any link a site would run on; a 16 MiB body may take 68
/// minutes.
pub const BODY_MIN_RATE: u64 = 4 * 1024;

/// When a body that began at `began` and has `received` bytes so far is too slow: after the
/// grace, one second per [`BODY_MIN_RATE`] bytes received.
fn slow_after(began: Instant, received: usize) -> Instant {
    began + BODY_STALL + Duration::from_millis(received as u64 * 1000 / BODY_MIN_RATE)
}

/// The next chunk of a body, or why it is refused: it stalled for [`BODY_STALL`], or fell below
/// [`BODY_MIN_RATE`]. `None` at its end.
async fn next_chunk<S, E>(payload: &mut S, began: Instant, received: usize) -> Result<Option<Bytes>, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let stalled = Instant::now() + BODY_STALL;
    let slow = slow_after(began, received);
    match tokio::time::timeout_at(stalled.min(slow), payload.next()).await {
        Ok(next) => next.transpose().map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}"))),
        Err(_) if Instant::now() >= stalled => {
            Err(ApiError::RequestTimeout(format!("the request body stalled for {} s", BODY_STALL.as_secs())))
        }
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the request body arrived at under {} KiB/s ({received} bytes in {} s)",
            BODY_MIN_RATE / 1024,
            began.elapsed().as_secs()
        ))),
    }
}

/// Reads the whole body, refusing (`413`) anything over `limit` bytes before reading it all,
/// and (`408`) a body that stalls for [`BODY_STALL`] or arrives slower than [`BODY_MIN_RATE`].
pub async fn read_limited(req: &HttpRequest, payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    read_body(payload, declared_length(req), limit).await
}

/// Reads a detached upload whole, like [`read_limited`], and hashes its ciphertext (all after
/// the first newline) on a blocking thread while the rest arrives: on two cores the broker's
/// check of a 1 MiB upload's MAC then adds little latency of its own. Returns the upload, and
/// the JSON's length with the ciphertext's SHA-256, or `None` if the upload has no newline.
pub async fn read_detached(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<(Bytes, Option<(usize, [u8; 32])>), ApiError> {
    let mut hasher = CtHasher::default();
    let upload = read_body_seen(payload, declared_length(req), limit, |chunk| hasher.push(chunk)).await?;
    let digest = hasher.finish(&upload).await;
    Ok((upload, digest))
}

/// Ciphertext handed to the hashing thread at once: few hand-overs (each wakes it), and the
/// first early enough that it hashes while the rest arrives.
const HASH_BATCH: usize = 256 * 1024;

/// The SHA-256 of a detached upload's ciphertext, computed as its chunks arrive: once
/// [`HASH_BATCH`] bytes of it are in, they go to a blocking thread, which hashes each batch in
/// order; a shorter ciphertext is hashed at the end, here.
#[derive(Default)]
struct CtHasher {
    /// Bytes of the upload seen so far.
    seen: usize,
    /// Where the first newline is, once it has come.
    json_len: Option<usize>,
    batch: Vec<Bytes>,
    batched: usize,
    thread: Option<HashingThread>,
}

/// Where batches go, and the digest that comes back once the feed is dropped.
type HashingThread = (std::sync::mpsc::Sender<Vec<Bytes>>, tokio::task::JoinHandle<[u8; 32]>);

impl CtHasher {
    fn push(&mut self, chunk: &Bytes) {
        let ct = match self.json_len {
            Some(_) => chunk.clone(),
            None => match memchr::memchr(b'\n', chunk) {
                Some(at) => {
                    self.json_len = Some(self.seen + at);
                    chunk.slice(at + 1..)
                }
                None => Bytes::new(),
            },
        };
        self.seen += chunk.len();
        if ct.is_empty() {
            return;
        }
        self.batched += ct.len();
        self.batch.push(ct);
        if self.batched >= HASH_BATCH {
            self.hand_over();
        }
    }

    fn hand_over(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.batched = 0;
        let (feed, _) = self.thread.get_or_insert_with(|| {
            let (feed, batches) = std::sync::mpsc::channel::<Vec<Bytes>>();
            let hashing = tokio::task::spawn_blocking(move || {
                let mut h = Sha256::new();
                for batch in batches {
                    batch.iter().for_each(|piece| h.update(piece));
                }
                h.finalize().into()
            });
            (feed, hashing)
        });
        let _ = feed.send(batch);
    }

    async fn finish(mut self, upload: &[u8]) -> Option<(usize, [u8; 32])> {
        let json_len = self.json_len?;
        let Some((feed, hashing)) = self.thread.take() else {
            let mut h = Sha256::new();
            self.batch.iter().for_each(|piece| h.update(piece));
            return Some((json_len, h.finalize().into()));
        };
        let _ = feed.send(std::mem::take(&mut self.batch));
        drop(feed);
        // The blocking pool is shutting down: hash here instead.
        let digest = hashing.await.unwrap_or_else(|_| Sha256::digest(&upload[json_len + 1..]).into());
        Some((json_len, digest))
    }
}

async fn read_body<S, E>(payload: S, declared: Option<u64>, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    read_body_seen(payload, declared, limit, |_| {}).await
}

/// [`read_body`], showing each chunk to `seen` as it comes.
async fn read_body_seen<S, E>(
    mut payload: S,
    declared: Option<u64>,
    limit: usize,
    mut seen: impl FnMut(&Bytes),
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let began = Instant::now();
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    while let Some(chunk) = next_chunk(&mut payload, began, body.len()).await? {
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
        seen(&chunk);
    }
    Ok(body.freeze())
}

fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads and drops the rest of a request body (at most `limit` bytes, stopping when it stalls
/// for [`BODY_STALL`] or falls below [`BODY_MIN_RATE`]): for a request refused before its body
/// was read, so that a client still sending it reads the refusal cleanly rather than a broken
/// connection. Nothing is kept.
pub async fn discard(req: &HttpRequest, mut payload: web::Payload, limit: usize) {
    if declared_length(req).is_some_and(|n| n > limit as u64) {
        return; // it would not be read whole anyway
    }
    let began = Instant::now();
    let mut read = 0;
    while read <= limit {
        match next_chunk(&mut payload, began, read).await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => return,
        }
    }
}

/// The largest piece of an answer handed to actix at once.
pub const SLICE: usize = 64 * 1024;

/// An answer body handed to actix [`SLICE`] bytes at a time. actix copies each piece of a body
/// into its connection's write buffer before writing it out: a 1.33 MiB body given whole grows
/// that buffer to 1.33 MiB, freshly mapped and freed again for every answer (14 % of the
/// broker's CPU in the 1 MiB round trip went to the page faults). In slices, the buffer stays
/// at its usual size and in cache. The length is still sent as `Content-Length`.
pub struct Sliced(pub Bytes);

impl MessageBody for Sliced {
    type Error = Infallible;

    /// What is left to send: the whole length until the first slice is taken.
    fn size(&self) -> BodySize {
        BodySize::Sized(self.0.len() as u64)
    }

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Bytes, Infallible>>> {
        if self.0.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.0.len().min(SLICE);
        Poll::Ready(Some(Ok(self.0.split_to(n))))
    }
}

/// Bodies from this size on are hashed on a blocking thread while the handler parses them.
const HASH_BESIDE: usize = 256 * 1024;

/// The body's digest (for its request MAC) and `parse(body)`. A large body is hashed on another
/// thread meanwhile: on two cores a 1 MiB body's MAC check then adds little latency of its own.
/// The parsed value must not be acted on before the MAC verifies.
pub async fn digest_beside<T>(body: &Bytes, parse: impl FnOnce(&[u8]) -> T) -> (BodyDigest, T) {
    if body.len() < HASH_BESIDE {
        return (body_digest(body), parse(body));
    }
    let hashing = tokio::task::spawn_blocking({
        let body = body.clone();
        move || body_digest(&body)
    });
    let parsed = parse(body);
    let digest = match hashing.await {
        Ok(digest) => digest,
        Err(_) => body_digest(body), // the blocking pool is shutting down: hash here instead
    };
    (digest, parsed)
}

/// Parses a JSON body; the error says where and what.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Parses a query string.
pub fn parse_query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))
}

/// Turns `wait_count`/`wait_time` into a [`Wait`], bounded by `max_wait`.
pub fn parse_wait(q: &ReadQuery, max_wait: Duration) -> Result<Wait, ApiError> {
    let time = q
        .wait_time
        .as_deref()
        .map(|t| parse_duration(t, max_wait))
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("wait_time: {e}")))?;
    Ok(Wait { count: q.wait_count, time })
}

/// The stream resume point: the `Last-Event-ID` header, else the `last_event_id` parameter.
pub fn last_event_id(req: &HttpRequest, q: &ReadQuery) -> Result<u64, ApiError> {
    match req.headers().get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a non-negative integer".into())),
        None => Ok(q.last_event_id.unwrap_or(0)),
    }
}

/// A task id from a path segment; `400` naming it otherwise.
pub fn parse_task_id(text: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(text).map_err(|_| ApiError::BadRequest(format!("invalid task id {text:?}: expected a UUID")))
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// A detached upload's ciphertext digest, however its chunks fall: the newline at a
    /// chunk's start, middle or end, a ciphertext over several hand-overs or none at all.
    #[tokio::test]
    async fn a_detached_uploads_ciphertext_is_hashed_as_it_arrives() {
        let json = br#"{"id":"x"}"#;
        for ct_len in [0, 1, HASH_BATCH - 1, HASH_BATCH, 3 * HASH_BATCH + 17] {
            let ct: Vec<u8> = (0..ct_len).map(|i| (i % 251) as u8).collect();
            let upload = Bytes::from([&json[..], b"\n", &ct].concat());
            for chunk in [1, 7, json.len(), json.len() + 1, 64 * 1024, upload.len().max(1)] {
                let mut hasher = CtHasher::default();
                let mut at = 0;
                while at < upload.len() {
                    let end = (at + chunk).min(upload.len());
                    hasher.push(&upload.slice(at..end));
                    at = end;
                }
                let (json_len, digest) = hasher.finish(&upload).await.expect("it has its newline");
                assert_eq!(json_len, json.len(), "ct {ct_len}, chunks of {chunk}");
                assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&ct)), "ct {ct_len}, chunks of {chunk}");
            }
        }
        let mut hasher = CtHasher::default();
        hasher.push(&Bytes::from_static(b"no newline at all"));
        assert_eq!(hasher.finish(b"no newline at all").await, None);
    }

    #[allow(non_snake_case)]
    const fn SECS(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A body that sends `piece` bytes every `every`, `pieces` times.
    fn trickle(piece: usize, every: Duration, pieces: usize) -> impl Stream<Item = Result<Bytes, Infallible>> + Unpin {
        Box::pin(futures_util::stream::unfold(0, move |sent| async move {
            (sent < pieces).then_some(())?;
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![b'x'; piece])), sent + 1))
        }))
    }

    async fn read_timed(
        body: impl Stream<Item = Result<Bytes, Infallible>> + Unpin,
    ) -> (Result<Bytes, ApiError>, Duration) {
        let began = Instant::now();
        let read = read_body(body, None, 16 << 20).await;
        (read, began.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_trickled_below_the_minimum_rate_is_408_once_it_falls_behind() {
        // A byte every 10 s never stalls for BODY_STALL, and is far below BODY_MIN_RATE.
        let (read, took) = read_timed(trickle(1, SECS(10), 1_000)).await;
        assert!(matches!(&read, Err(ApiError::RequestTimeout(m)) if m.contains("KiB/s")), "{read:?}");
        // Refused at the end of the grace, plus a millisecond or two for the bytes it sent.
        assert!(took >= BODY_STALL && took < BODY_STALL + SECS(1), "{took:?}");

        // Half the minimum rate: refused once what it sent no longer covers the time taken.
        let half = BODY_MIN_RATE as usize / 2;
        let (read, took) = read_timed(trickle(half, SECS(1), 1_000)).await;
        assert!(matches!(read, Err(ApiError::RequestTimeout(_))));
        assert!(took >= SECS(29) && took <= SECS(31), "{took:?}"); // t/2 s of data = 15 s + t/2
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_at_the_minimum_rate_is_read_whole() {
        let (read, took) = read_timed(trickle(BODY_MIN_RATE as usize, SECS(1), 100)).await;
        assert_eq!(read.unwrap().len(), 100 * BODY_MIN_RATE as usize);
        assert_eq!(took, SECS(100));
        // Pauses up to just under BODY_STALL are fine while the average keeps up.
        let (read, _) = read_timed(trickle(16 * BODY_MIN_RATE as usize, SECS(14), 10)).await;
        assert_eq!(read.unwrap().len(), 160 * BODY_MIN_RATE as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_is_408_after_the_stall_limit() {
        let stops =
            futures_util::stream::iter([Ok(Bytes::from(vec![b'x'; 1 << 20]))]).chain(futures_util::stream::pending());
        let (read, took) = read_timed(stops).await;
        assert!(matches!(&read, Err(ApiError::RequestTimeout(m)) if m.contains("stalled")), "{read:?}");
        assert_eq!(took, BODY_STALL);
    }

    #[tokio::test]
    async fn a_sliced_body_is_the_whole_body_in_pieces_no_larger_than_a_slice() {
        for len in [0, 1, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 17] {
            let whole: Bytes = (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
            let mut body = Box::pin(Sliced(whole.clone()));
            assert!(matches!(body.size(), BodySize::Sized(n) if n == len as u64));
            let mut joined = BytesMut::new();
            while let Some(piece) = poll_fn(|cx| body.as_mut().poll_next(cx)).await {
                let piece = piece.unwrap();
                assert!(!piece.is_empty() && piece.len() <= SLICE, "a piece of {} bytes", piece.len());
                joined.extend_from_slice(&piece);
            }
            assert_eq!(joined.freeze(), whole, "{len} bytes");
        }
    }
}
