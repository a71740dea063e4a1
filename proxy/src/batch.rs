//! Group commit of uploads: task creations and result puts that pile up while the broker is
//! busy go to it together, in one signed request (`POST /v1/batch`, see
//! `photon::wire::broker::BATCH_PATH`).
//!
//! Each HTTP worker thread keeps its own queue and sends from it with at most [`SENDERS`]
//! requests in flight. An upload that finds a sender free goes at once, on its own, as it
//! always did: a quiet proxy adds no wait and no batching. Under load the uploads that arrive
//! while both senders are out are sent together when one comes back. The broker then takes one
//! HTTP exchange, one MAC check and one session lookup for the lot, and this proxy one request
//! and one answer: most of what a small upload costs either of them.
//!
//! Each upload keeps its own answer: the broker stores or refuses each on its own and answers
//! the status and error body its own request would have had. Uploads of more than
//! [`ITEM_LIMIT`] bytes always go on their own (a large body gains nothing from company and
//! would hold the others up). A batch refused as a whole before anything of it was stored
//! (`400`, `404`, `413`) is sent again upload by upload; after a `404` (no batch endpoint: an
//! older broker), every upload goes on its own for a minute. An upload whose app has gone
//! before it was sent is dropped unsent, and one still queued after `QUEUED_AT_MOST` (60 s) is taken
//! back unsent (`504`); a batch's uploads share its fate in the exchange (a timeout or a broker
//! failure answers all of them, as it would have each of them alone).

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix_web::ResponseError;
use bytes::Bytes;
use futures_util::future::join_all;
use photon::{
    crypto::session::{self, BodyDigest},
    http::ApiError,
    wire::{
        broker::{Detached, Outcome, BATCH_PATH, DETACHED_QUERY, MAX_BATCH},
        AppId,
    },
};
use reqwest::{Method, StatusCode};
use thread_local::ThreadLocal;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{
    http::UPSTREAM_SLACK,
    seal::DetachedCt,
    upstream::{self, SignedBody, Whole},
    ProxyState,
};

/// Requests to the broker one thread keeps in flight from its queue.
pub const SENDERS: usize = 2;
/// Uploads larger than this (their JSON, sealed) are never batched.
pub const ITEM_LIMIT: usize = 16 * 1024;
/// The most uploads in one batch (the broker takes up to `MAX_BATCH`).
const MAX_ITEMS: usize = 64;
/// The most bytes of uploads in one batch: well under any broker's body limit.
const BATCH_BYTES: usize = 256 * 1024;

const _: () = assert!(MAX_ITEMS <= MAX_BATCH);

/// What an upload is.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// `POST /v1/tasks`.
    Task,
    /// `PUT /v1/tasks/{id}/results/{app}` for this task.
    Result(Uuid),
}

/// One task creation or result put, sealed and written as JSON, on behalf of `app`.
pub struct Upload {
    pub app: AppId,
    pub kind: Kind,
    /// The message's JSON, or a detached upload (`photon::wire::broker::Detached`).
    pub json: Bytes,
    /// A detached upload's [`BodyDigest`] (`session::detached_digest`); such an upload always
    /// goes on its own.
    pub detached: Option<BodyDigest>,
}

impl Upload {
    /// The upload of a message written as `json`, with its ciphertext beside it if that travels
    /// detached.
    pub fn new(app: AppId, kind: Kind, json: Bytes, detached: Option<DetachedCt>) -> Self {
        match detached {
            Some(d) => {
                let digest = session::detached_digest(&json, &d.digest);
                Self { app, kind, json: Detached::join(&json, &d.ct), detached: Some(digest) }
            }
            None => Self { app, kind, json, detached: None },
        }
    }

    fn method(&self) -> Method {
        match self.kind {
            Kind::Task => Method::POST,
            Kind::Result(_) => Method::PUT,
        }
    }

    fn path(&self) -> String {
        let query = if self.detached.is_some() { format!("?{DETACHED_QUERY}") } else { String::new() };
        match self.kind {
            Kind::Task => format!("/v1/tasks{query}"),
            Kind::Result(task) => format!("/v1/tasks/{task}/results/{}{query}", self.app),
        }
    }
}

/// The broker's answer to an upload: its status and body, or why there is none.
pub type Answer = Result<Whole, ApiError>;

struct Queued {
    /// Its place in its thread's queue, to find it there again.
    ticket: u64,
    upload: Upload,
    done: oneshot::Sender<Answer>,
}

/// One thread's uploads waiting for a sender, and how many senders it has out.
#[derive(Default)]
struct Queue {
    waiting: RefCell<VecDeque<Queued>>,
    senders: Cell<usize>,
    tickets: Cell<u64>,
}

/// Every thread's upload queue (see the module's documentation).
pub struct Uploads {
    queues: ThreadLocal<Queue>,
    /// The clock of `unbatched_until` (monotonic).
    started: Instant,
    /// Until when (ms after `started`) every upload goes on its own: a while after the broker
    /// answered a batch `404` (no such endpoint: an older broker, or a gateway's hiccup).
    unbatched_until: AtomicU64,
}

impl Default for Uploads {
    fn default() -> Self {
        Self { queues: ThreadLocal::new(), started: Instant::now(), unbatched_until: AtomicU64::new(0) }
    }
}

/// How long uploads go on their own after a batch was answered `404`.
const UNBATCHED_FOR: Duration = Duration::from_secs(60);

/// An upload still queued after this long (its thread's senders held up by a broker that does
/// not answer) is taken back unsent and answered `504`. Once taken it is in an exchange, which
/// has its own bounds, and its app waits for that exchange's answer.
const QUEUED_AT_MOST: Duration = Duration::from_secs(2 * UPSTREAM_SLACK.as_secs());

impl Uploads {
    /// Sends `upload` to the broker, with others if there is a queue; its own answer.
    /// Call on an HTTP worker (the senders are spawned on the calling thread).
    pub async fn send(state: &Arc<ProxyState>, upload: Upload) -> Answer {
        let this = &state.uploads;
        if upload.detached.is_some() {
            fetchable(state, &upload)?;
        }
        if upload.detached.is_some() || upload.json.len() > ITEM_LIMIT || !this.batching() {
            return single(state, upload).await;
        }
        let (done, mut answer) = oneshot::channel();
        let queue = this.queues.get_or_default();
        let ticket = queue.tickets.get();
        queue.tickets.set(ticket + 1);
        queue.waiting.borrow_mut().push_back(Queued { ticket, upload, done });
        if queue.senders.get() < SENDERS {
            actix_web::rt::spawn(drain(Sender::count(state.clone())));
        }
        let stopped = |_| Err(ApiError::Unavailable("the proxy is shutting down".into()));
        if let Ok(answered) = tokio::time::timeout(QUEUED_AT_MOST, &mut answer).await {
            return answered.unwrap_or_else(stopped);
        }
        let unsent = {
            let mut waiting = queue.waiting.borrow_mut();
            waiting.iter().position(|q| q.ticket == ticket).and_then(|i| waiting.remove(i))
        };
        if unsent.is_some() {
            return Err(ApiError::GatewayTimeout(format!(
                "the broker took no upload for {} s; this one was not sent",
                QUEUED_AT_MOST.as_secs()
            )));
        }
        answer.await.unwrap_or_else(stopped)
    }

    /// Milliseconds on this instance's monotonic clock.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn batching(&self) -> bool {
        self.now_ms() >= self.unbatched_until.load(Ordering::Relaxed)
    }
}

/// A sender, counted on this thread's queue from before it is spawned until it is dropped,
/// however it ends (dropped unpolled with its worker included).
struct Sender {
    state: Arc<ProxyState>,
}

impl Sender {
    fn count(state: Arc<ProxyState>) -> Self {
        let queue = state.uploads.queues.get_or_default();
        queue.senders.set(queue.senders.get() + 1);
        Self { state }
    }

    fn queue(&self) -> &Queue {
        self.state.uploads.queues.get_or_default()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let queue = self.queue();
        queue.senders.set(queue.senders.get().saturating_sub(1));
    }
}

/// One sender: sends what is queued on this thread, as it comes, until the queue is empty.
async fn drain(sender: Sender) {
    let state = &sender.state;
    loop {
        let mut batch = take(&mut sender.queue().waiting.borrow_mut());
        match batch.len() {
            0 => return,
            1 => {
                let queued = batch.pop().expect("one upload");
                let answer = single(state, queued.upload).await;
                let _ = queued.done.send(answer);
            }
            _ if !state.uploads.batching() => each_alone(state, batch).await,
            _ => many(state, batch).await,
        }
    }
}

/// The next batch from the front of the queue: at most [`MAX_ITEMS`] uploads and
/// [`BATCH_BYTES`] bytes (at least one upload if there is any). Uploads whose app has gone
/// (its request dropped) are dropped unsent, as they would have been without a queue.
fn take(waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
    waiting.retain(|q| !q.done.is_closed());
    let mut bytes = 0;
    let n = waiting
        .iter()
        .take(MAX_ITEMS)
        .take_while(|q| {
            bytes += q.upload.json.len();
            bytes <= BATCH_BYTES
        })
        .count()
        .max(waiting.len().min(1));
    waiting.drain(..n).collect()
}

/// Refuses (`413`) a detached upload longer than a proxy with this one's `MAX_BODY` fetches
/// (`seal::detached_limit`), rather than have it stored and then refused by every recipient:
/// possible only when what surrounds the body (metadata, recipients) grows much in sealing.
fn fetchable(state: &ProxyState, upload: &Upload) -> Result<(), ApiError> {
    let limit = crate::seal::detached_limit(state.config.max_body);
    if upload.json.len() > limit {
        return Err(ApiError::SealedTooLarge(format!(
            "sealed, this message is {} bytes, more than the {limit} its recipients take",
            upload.json.len()
        )));
    }
    Ok(())
}

/// The upload on its own, as its own request.
async fn single(state: &ProxyState, upload: Upload) -> Answer {
    let (path, method) = (upload.path(), upload.method());
    let body = match upload.detached {
        Some(digest) => SignedBody::detached(upload.json, digest),
        None => upload.json.into(),
    };
    Ok(state.upstream.call(method, &path, &upload.app, body, Some(UPSTREAM_SLACK)).await?)
}

/// The uploads as one batch; each gets its own answer.
async fn many(state: &ProxyState, batch: Vec<Queued>) {
    let mut body = Vec::with_capacity(batch.iter().map(|q| q.upload.json.len() + 12).sum::<usize>() + 2);
    body.push(b'[');
    for (i, queued) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(match queued.upload.kind {
            Kind::Task => b"{\"task\":",
            Kind::Result(_) => b"{\"result\":",
        });
        body.extend_from_slice(&queued.upload.json);
        body.push(b'}');
    }
    body.push(b']');
    let proxy = state.config.proxy_id.as_str();
    let sent = state.upstream.call_within(
        Method::POST,
        BATCH_PATH,
        proxy,
        Bytes::from(body),
        Some(UPSTREAM_SLACK),
        upstream::PLAIN_ANSWER,
    );
    let sent = sent.await;
    let answer = match sent {
        Ok(answer) => {
            state.upstream.metrics.count("uploads.batched", batch.len() as u64, &[]);
            answer
        }
        Err(e) => {
            let e = ApiError::from(e);
            let (status, body) = (e.status_code(), e.json_body());
            for queued in batch {
                let _ = queued.done.send(Err(ApiError::Relayed { status, body: body.clone() }));
            }
            return;
        }
    };
    match answer.status {
        StatusCode::OK => match serde_json::from_slice::<Vec<Outcome>>(&answer.body) {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                for (queued, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = queued.done.send(Ok(answered(outcome)));
                }
            }
            _ => {
                for queued in batch {
                    let _ =
                        queued.done.send(Err(ApiError::BadGateway("malformed batch answer from the broker".into())));
                }
            }
        },
        // Refused as a batch before anything of it was stored: an older broker without
        // batches (404), a body over the broker's limit (413), or a batch the broker could not
        // read whole (400: fewer uploads allowed, or one nested deeper than the batch's parse
        // allows, which its own request may not be). Each upload goes on its own and gets the
        // answer its own request gets.
        StatusCode::NOT_FOUND | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::BAD_REQUEST => {
            if answer.status == StatusCode::NOT_FOUND {
                let uploads = &state.uploads;
                let until = uploads.now_ms() + UNBATCHED_FOR.as_millis() as u64;
                if uploads.unbatched_until.swap(until, Ordering::Relaxed) < uploads.now_ms() {
                    tracing::info!(
                        seconds = UNBATCHED_FOR.as_secs(),
                        "the broker has no batch endpoint; sending every upload on its own for a while"
                    );
                }
            }
            each_alone(state, batch).await;
        }
        // Refused as a whole (the proxy's session, ...): each upload gets that answer.
        _ => {
            for queued in batch {
                let _ = queued.done.send(Ok(Whole { status: answer.status, body: answer.body.clone() }));
            }
        }
    }
}

/// The uploads, each as its own request, side by side (those whose app has gone meanwhile are
/// dropped unsent).
async fn each_alone(state: &ProxyState, batch: Vec<Queued>) {
    join_all(batch.into_iter().filter(|queued| !queued.done.is_closed()).map(|queued| async move {
        let answer = single(state, queued.upload).await;
        let _ = queued.done.send(answer);
    }))
    .await;
}

/// One upload's outcome as if it had been its own request's answer.
fn answered(outcome: Outcome) -> Whole {
    Whole {
        status: StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::BAD_GATEWAY),
        body: outcome.error.map(|e| Bytes::from(String::from(Box::<str>::from(e)))).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued upload of `bytes` bytes, and the receiver of its answer (its app, waiting).
    fn queued(bytes: usize) -> (Queued, oneshot::Receiver<Answer>) {
        let (done, answer) = oneshot::channel();
        let app = AppId::parse("app1.proxy1.broker").unwrap();
        (Queued { ticket: 0, upload: Upload::new(app, Kind::Task, Bytes::from(vec![b' '; bytes]), None), done }, answer)
    }

    fn queue(sizes: impl IntoIterator<Item = usize>) -> (VecDeque<Queued>, Vec<oneshot::Receiver<Answer>>) {
        sizes.into_iter().map(queued).unzip()
    }

    #[test]
    fn a_batch_takes_from_the_front_within_its_limits() {
        let (mut waiting, _apps) = queue([100; 100]);
        assert_eq!(take(&mut waiting).len(), MAX_ITEMS);
        assert_eq!(take(&mut waiting).len(), 100 - MAX_ITEMS);
        assert!(take(&mut waiting).is_empty());

        let (mut waiting, _apps) = queue([ITEM_LIMIT; 40]);
        assert_eq!(take(&mut waiting).len(), BATCH_BYTES / ITEM_LIMIT);

        // One upload over the byte limit still goes (on its own).
        let (mut waiting, _apps) = queue([BATCH_BYTES + 1, 10]);
        assert_eq!(take(&mut waiting).len(), 1);
        assert_eq!(take(&mut waiting).len(), 1);
    }

    #[test]
    fn uploads_whose_app_has_gone_are_not_sent() {
        let (mut waiting, mut apps) = queue([10, 20, 30, 40]);
        drop(apps.remove(2)); // the app of the 30-byte upload
        drop(apps.remove(0)); // the app of the 10-byte upload
        let sizes: Vec<usize> = take(&mut waiting).iter().map(|q| q.upload.json.len()).collect();
        assert_eq!(sizes, [20, 40]);
        assert!(waiting.is_empty());
    }
}
