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
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

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

/// Reads the whole body, refusing (`413`) anything over `limit` bytes before reading it all,
/// and (`408`) a body that stalls for [`BODY_STALL`].
pub async fn read_limited(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let declared = declared_length(req);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    loop {
        let next = tokio::time::timeout(BODY_STALL, payload.next()).await.map_err(|_| {
            ApiError::RequestTimeout(format!("the request body stalled for {} s", BODY_STALL.as_secs()))
        })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
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
/// for [`BODY_STALL`]): for a request refused before its body was read, so that a client still
/// sending it reads the refusal cleanly rather than a broken connection. Nothing is kept.
pub async fn discard(req: &HttpRequest, mut payload: web::Payload, limit: usize) {
    if declared_length(req).is_some_and(|n| n > limit as u64) {
        return; // it would not be read whole anyway
    }
    let mut read = 0;
    while read <= limit {
        match tokio::time::timeout(BODY_STALL, payload.next()).await {
            Ok(Some(Ok(chunk))) => read += chunk.len(),
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
