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

use crate::crypto::CtHasher;

use super::ApiError;
use crate::{
    actors::engine::Wait,
    crypto::session::{body_digest, BodyDigest},
    ops::memory,
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
/// the JSON's length with the ciphertext's digest (`crypto::ct_digest`), or `None` if the upload has no newline.
pub async fn read_detached(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<(Bytes, Option<(usize, [u8; 32])>), ApiError> {
    read_hashing(payload, declared_length(req), limit, Some(CtHashing::default())).await
}

async fn read_body<S, E>(payload: S, declared: Option<u64>, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    Ok(read_hashing(payload, declared, limit, None).await?.0)
}

/// Reads a body whole into one buffer sized by its `Content-Length`, refusing (`413`) anything
/// over `limit` bytes before reading it all, and (`408`) a body that stalls for [`BODY_STALL`]
/// or arrives slower than [`BODY_MIN_RATE`]; with `hashing`, hashes a detached upload's
/// ciphertext meanwhile.
async fn read_hashing<S, E>(
    mut payload: S,
    declared: Option<u64>,
    limit: usize,
    mut hashing: Option<CtHashing>,
) -> Result<(Bytes, Option<(usize, [u8; 32])>), ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let began = Instant::now();
    let capacity = declared.unwrap_or(0).min(limit as u64) as usize;
    let mut tail = match &mut hashing {
        // A detached upload is stored as it came, in memory new to the broker: its pages are
        // made ahead, within the budget the uploads being read share.
        Some(hashing) => {
            let (buf, pages) = memory::upload_buffer(capacity);
            hashing.pages = pages;
            buf
        }
        None => BytesMut::with_capacity(capacity),
    };
    loop {
        let read = hashing.as_ref().map_or(0, CtHashing::front) + tail.len();
        let Some(chunk) = next_chunk(&mut payload, began, read).await? else { break };
        if read + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        tail.extend_from_slice(&chunk);
        if let Some(hashing) = &mut hashing {
            hashing.step(&mut tail).await?;
        }
    }
    match hashing {
        Some(hashing) => hashing.finish(tail).await,
        None => Ok((tail.freeze(), None)),
    }
}

/// Ciphertext hashed by one blocking task: few hand-overs (each wakes a thread), and the first
/// early enough that the hash runs while the rest arrives.
const HASH_BATCH: usize = 256 * 1024;

/// A detached upload's ciphertext hash, made while the upload arrives. Once the newline has
/// come and [`HASH_BATCH`] bytes more are in, they are split off the buffer (no copy: the same
/// allocation) and handed to a blocking task, which hashes them and hands them back; the next
/// piece goes when that task is done. So no thread ever waits for the client (a slow upload
/// holds none), nothing is held twice, and the pieces join again into the one buffer the broker
/// keeps.
struct CtHashing {
    /// The upload's front: hashed, handed back, joined.
    done: BytesMut,
    /// The piece a task has now, and its length.
    task: Option<tokio::task::JoinHandle<(CtHasher, BytesMut)>>,
    in_task: usize,
    /// The hash of the ciphertext so far, while no task has it.
    hasher: Option<CtHasher>,
    /// Where the first newline is, once it has come; how far it has been looked for.
    json_len: Option<usize>,
    scanned: usize,
    /// The buffer's pages made ahead, and its share of their budget, while the upload is read
    /// (given back when this ends: the upload read, refused or dropped).
    pages: Option<memory::Prefault>,
}

impl Default for CtHashing {
    fn default() -> Self {
        Self {
            done: BytesMut::new(),
            task: None,
            in_task: 0,
            hasher: Some(CtHasher::new()),
            json_len: None,
            scanned: 0,
            pages: None,
        }
    }
}

/// The hashing task was lost (the runtime shutting down); the upload's bytes went with it.
fn hashing_lost() -> ApiError {
    ApiError::Unavailable("the broker is shutting down".into())
}

impl CtHashing {
    /// Bytes of the upload not in the tail: done, or with the task.
    fn front(&self) -> usize {
        self.done.len() + self.in_task
    }

    /// Looks for the newline in what came, and hands a piece to a task when one is due and none
    /// is busy.
    async fn step(&mut self, tail: &mut BytesMut) -> Result<(), ApiError> {
        if self.json_len.is_none() {
            // Nothing is split off before the newline: the tail is the whole upload so far.
            self.json_len = memchr::memchr(b'\n', &tail[self.scanned..]).map(|at| self.scanned + at);
            self.scanned = tail.len();
        }
        if self.json_len.is_none() || tail.len() < HASH_BATCH {
            return Ok(());
        }
        if self.task.as_ref().is_some_and(|task| !task.is_finished()) {
            return Ok(());
        }
        self.collect().await?;
        let piece = tail.split();
        let skip = self.ct_skip(piece.len());
        let mut hasher = self.hasher.take().expect("no task has it");
        self.in_task = piece.len();
        self.task = Some(tokio::task::spawn_blocking(move || {
            hasher.update(&piece[skip..]);
            (hasher, piece)
        }));
        Ok(())
    }

    /// Of a piece of `len` bytes starting at [`front`](Self::front), how many are JSON or its
    /// newline (not ciphertext).
    fn ct_skip(&self, len: usize) -> usize {
        let ct_at = self.json_len.expect("known before any piece goes") + 1;
        ct_at.saturating_sub(self.front()).min(len)
    }

    /// Takes back the task's piece and hash, if a task has them.
    async fn collect(&mut self) -> Result<(), ApiError> {
        if let Some(task) = self.task.take() {
            let (hasher, piece) = task.await.map_err(|_| hashing_lost())?;
            self.done.unsplit(piece);
            self.in_task = 0;
            self.hasher = Some(hasher);
        }
        Ok(())
    }

    /// The whole upload, and the JSON's length with the ciphertext's digest (`None` without a
    /// newline). The last piece is hashed here, or on a blocking thread if it is large.
    async fn finish(mut self, mut tail: BytesMut) -> Result<(Bytes, Option<(usize, [u8; 32])>), ApiError> {
        self.collect().await?;
        let Some(json_len) = self.json_len else {
            return Ok((tail.freeze(), None));
        };
        let skip = self.ct_skip(tail.len());
        let mut hasher = self.hasher.take().expect("no task has it");
        if tail.len() - skip >= HASH_BATCH {
            (hasher, tail) = tokio::task::spawn_blocking(move || {
                hasher.update(&tail[skip..]);
                (hasher, tail)
            })
            .await
            .map_err(|_| hashing_lost())?;
        } else {
            hasher.update(&tail[skip..]);
        }
        self.done.unsplit(tail);
        Ok((self.done.freeze(), Some((json_len, *hasher.finalize().as_bytes()))))
    }
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
pub const SLICE: usize = 256 * 1024;

/// An answer body handed to actix [`SLICE`] bytes at a time. actix copies each piece of a body
/// into its connection's write buffer before writing it out: a 1.33 MiB body given whole grows
/// that buffer to 1.33 MiB, freshly mapped and freed again for every answer (14 % of the
/// broker's CPU in the 1 MiB round trip went to the page faults). In slices, the buffer stays
/// at most a slice larger than its usual size. The slice is 256 KiB: with 64 KiB, a megabyte
/// went out in 16 writes, each waking the reader for its 64 KiB, and the 1 MiB round trip took
/// 15.7 ms against 14.3 (8 interleaved pairs, docs/BENCHMARKS.md round 16); 1 MiB slices
/// measured no better than 256 KiB. The length is still sent as `Content-Length`.
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
    /// chunk's start, middle or end, a ciphertext over several pieces or none at all; and the
    /// upload comes back whole, in one buffer.
    #[tokio::test]
    async fn a_detached_uploads_ciphertext_is_hashed_as_it_arrives() {
        let json = br#"{"id":"x"}"#;
        for ct_len in [0, 1, HASH_BATCH - 1, HASH_BATCH, 3 * HASH_BATCH + 17] {
            let ct: Vec<u8> = (0..ct_len).map(|i| (i % 251) as u8).collect();
            let upload = Bytes::from([&json[..], b"\n", &ct].concat());
            for chunk in [1, 7, json.len(), json.len() + 1, 64 * 1024, upload.len()] {
                if chunk == 1 && ct_len > HASH_BATCH {
                    continue; // a million one-byte chunks say nothing more
                }
                let pieces = upload.chunks(chunk).map(|c| Ok::<_, Infallible>(Bytes::copy_from_slice(c)));
                let stream = futures_util::stream::iter(pieces.collect::<Vec<_>>());
                let declared = Some(upload.len() as u64);
                let (read, digest) =
                    read_hashing(stream, declared, 16 << 20, Some(CtHashing::default())).await.unwrap();
                let (json_len, digest) = digest.expect("it has its newline");
                assert_eq!(read, upload, "ct {ct_len}, chunks of {chunk}");
                assert_eq!(json_len, json.len(), "ct {ct_len}, chunks of {chunk}");
                assert_eq!(digest, crate::crypto::ct_digest(&ct), "ct {ct_len}, chunks of {chunk}");
                assert_eq!(
                    crate::crypto::session::detached_digest(&read[..json_len], &digest),
                    crate::crypto::session::detached_upload_digest(&read),
                );
            }
        }
        let stream = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"no newline at all"))]);
        let (read, digest) = read_hashing(stream, None, 1024, Some(CtHashing::default())).await.unwrap();
        assert_eq!((&read[..], digest), (&b"no newline at all"[..], None));
    }

    /// Refused part-way, with pieces already hashed: too large, or too slow.
    #[tokio::test(start_paused = true)]
    async fn a_detached_upload_refused_part_way() {
        let upload = Bytes::from([&b"{}\n"[..], &vec![7u8; 2 * HASH_BATCH]].concat());
        let pieces: Vec<_> = upload.chunks(64 * 1024).map(|c| Ok::<_, Infallible>(Bytes::copy_from_slice(c))).collect();
        let too_large = read_hashing(
            futures_util::stream::iter(pieces),
            None,
            HASH_BATCH + HASH_BATCH / 2,
            Some(CtHashing::default()),
        )
        .await;
        assert!(matches!(too_large, Err(ApiError::TooLarge { .. })), "{too_large:?}");
        // 300 KiB at once, then nothing: the stall is refused, the piece's task long done.
        let stalled = futures_util::stream::iter([Ok::<_, Infallible>(upload.slice(..300 * 1024))])
            .chain(futures_util::stream::pending());
        let refused =
            read_hashing(Box::pin(stalled), Some(upload.len() as u64), 16 << 20, Some(CtHashing::default())).await;
        assert!(matches!(refused, Err(ApiError::RequestTimeout(_))), "{refused:?}");
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
