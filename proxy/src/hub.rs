//! Result hubs: while more than one of an app's result streams or long-poll waiters on one task
//! is open at this proxy, they share one broker stream (a *hub*) instead of holding one each.
//! The hub opens every result once, encodes it once, and fans it out in-process: a thousand
//! waiters on one task cost the broker one subscriber and the proxy one decryption, and a
//! stream costs the proxy one socket (the app's) instead of two.
//!
//! The first reader of an (app, task) goes to the broker directly, as it always did: a lone
//! reader (the common case, one creator waiting for its answers) keeps a stream or long-poll the
//! broker ends cleanly, so its connection is reused. A second reader while the first is open
//! opens the hub; later ones join it until it has no readers left.
//!
//! A hub reads the task's results from the start, so it always knows the current ones; a
//! reader resuming after `Last-Event-ID` gets the hub's current results after that id, then
//! every later event — the same rule as the broker's, none twice, none lost. A stream whose
//! reader falls more than [`CAPACITY`] events behind ends with an error (resume with
//! `Last-Event-ID`), as a broker stream does.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use actix_web::{http::header, HttpResponse};
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use photon::{
    http::ApiError,
    wire::{broker::StreamEvent, AppId, ReadQuery},
};
use reqwest::Method;
use tokio::{
    sync::{broadcast, Notify, OnceCell},
    time::{sleep_until, Instant},
};
use uuid::Uuid;

use crate::ProxyState;

/// Events a hub buffers per reader; a stream further behind ends (and resumes).
pub const CAPACITY: usize = 1024;

/// An app's reads of one task's results.
type Key = (AppId, Uuid);

/// Which way a read goes.
pub enum Route {
    /// To the broker, as the only reader of its key; the guard marks it open.
    Direct(DirectGuard),
    /// Through the key's hub (being opened, or open).
    Shared(Arc<Slot>),
}

/// A hub once opened; readers that arrive while it opens wait for the same opening.
pub type Slot = OnceCell<Arc<Hub>>;

#[derive(Default)]
struct Entry {
    /// Readers of this key that went to the broker directly.
    direct: usize,
    hub: Option<Arc<Slot>>,
}

/// All hubs of this proxy.
#[derive(Default)]
pub struct Hubs {
    entries: Mutex<HashMap<Key, Entry>>,
    /// Hubs whose broker stream is open now.
    open: AtomicUsize,
}

impl Hubs {
    /// Where a new reader of `app`'s results of `task` goes.
    pub fn route(self: &Arc<Self>, app: &AppId, task: Uuid) -> Route {
        let key = (app.clone(), task);
        let mut entries = self.entries.lock();
        let entry = entries.entry(key.clone()).or_default();
        if let Some(slot) = &entry.hub {
            return Route::Shared(slot.clone());
        }
        if entry.direct == 0 {
            entry.direct = 1;
            return Route::Direct(DirectGuard { hubs: self.clone(), key });
        }
        Route::Shared(entry.hub.insert(Arc::new(Slot::new())).clone())
    }

    /// The key's hub, or a new one to open: for a reader that found its hub closed and must
    /// not go direct (it is on the hub path already).
    fn slot(&self, app: &AppId, task: Uuid) -> Arc<Slot> {
        let mut entries = self.entries.lock();
        let entry = entries.entry((app.clone(), task)).or_default();
        entry.hub.get_or_insert_with(|| Arc::new(Slot::new())).clone()
    }

    /// Hubs open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Forgets `key`'s slot if it is `slot` (the hub ended).
    fn forget(&self, key: &Key, slot: &Arc<Slot>) {
        Self::forget_in(&mut self.entries.lock(), key, slot);
    }

    fn forget_in(entries: &mut HashMap<Key, Entry>, key: &Key, slot: &Arc<Slot>) {
        if let Some(entry) = entries.get_mut(key) {
            if entry.hub.as_ref().is_some_and(|s| Arc::ptr_eq(s, slot)) {
                entry.hub = None;
            }
            if entry.direct == 0 && entry.hub.is_none() {
                entries.remove(key);
            }
        }
    }

    /// After a failed opening: forgets the slot unless other readers hold it (they try again).
    fn abandon(&self, key: &Key, slot: &Arc<Slot>) {
        let mut entries = self.entries.lock();
        // The map's reference and ours; clones are only taken under this lock.
        if Arc::strong_count(slot) <= 2 && !slot.initialized() {
            Self::forget_in(&mut entries, key, slot);
        }
    }
}

/// A direct reader, counted while it is open.
pub struct DirectGuard {
    hubs: Arc<Hubs>,
    key: Key,
}

impl Drop for DirectGuard {
    fn drop(&mut self) {
        let mut entries = self.hubs.entries.lock();
        if let Some(entry) = entries.get_mut(&self.key) {
            entry.direct = entry.direct.saturating_sub(1);
            if entry.direct == 0 && entry.hub.is_none() {
                entries.remove(&self.key);
            }
        }
    }
}

/// One result as a hub's readers see it.
#[derive(Debug)]
struct Item {
    seq: u64,
    /// The worker whose result this is.
    from: AppId,
    /// Counts towards `wait_count` (not `claimed`).
    answers: bool,
    /// The opened result as JSON, and as a `new_result` frame; `None` when it was refused.
    opened: Option<(Bytes, Bytes)>,
}

/// Why a hub ended.
#[derive(Debug, Clone)]
enum End {
    /// The task expired.
    Deleted,
    /// The broker ended the stream because of trouble on its side.
    Error(String),
    /// The broker is shutting down.
    BrokerStopping,
    /// The connection to the broker broke off.
    Lost,
}

/// What a hub tells its readers.
#[derive(Debug, Clone)]
enum Event {
    /// A new or replaced result, with the task's answer count after it.
    Result {
        item: Arc<Item>,
        n_answers: usize,
    },
    /// The broker has sent every result stored before the hub opened.
    CaughtUp,
    End(End),
}

#[derive(Default)]
struct HubState {
    /// The latest result of each worker.
    latest: HashMap<AppId, Arc<Item>>,
    n_answers: usize,
    caught_up: bool,
    readers: usize,
    /// Set once the hub takes no more readers.
    closed: bool,
    end: Option<End>,
    /// The current results as a JSON array, built once per change for long-polls.
    listing: Option<Bytes>,
}

impl HubState {
    /// The current results after `last_seq`, in order, each with the answer count up to it.
    fn replay(&self, last_seq: u64) -> Replay {
        let mut items: Vec<_> = self.latest.values().cloned().collect();
        items.sort_by_key(|i| i.seq);
        let mut n = 0;
        let mut out = Vec::new();
        for item in items {
            n += usize::from(item.counts());
            if item.seq > last_seq {
                out.push((item, n));
            }
        }
        out
    }

    fn listing(&mut self) -> Bytes {
        if let Some(listing) = &self.listing {
            return listing.clone();
        }
        let mut items: Vec<_> = self.latest.values().filter(|i| i.opened.is_some()).collect();
        items.sort_by_key(|i| i.seq);
        let mut out = BytesMut::with_capacity(2 + items.iter().map(|i| json_of(i).len() + 1).sum::<usize>());
        out.put_u8(b'[');
        for (k, item) in items.iter().enumerate() {
            if k > 0 {
                out.put_u8(b',');
            }
            out.put_slice(json_of(item));
        }
        out.put_u8(b']');
        let listing = out.freeze();
        self.listing = Some(listing.clone());
        listing
    }
}

impl Item {
    /// Counts towards `wait_count`: an answer (not `claimed`) that opened.
    fn counts(&self) -> bool {
        self.answers && self.opened.is_some()
    }
}

fn json_of(item: &Item) -> &[u8] {
    item.opened.as_ref().map_or(&[][..], |(json, _)| &json[..])
}

/// One shared broker stream of an app's results of one task.
pub struct Hub {
    state: Mutex<HubState>,
    tx: broadcast::Sender<Event>,
    /// Woken when the last reader leaves.
    idle: Notify,
}

/// The current results a joining reader has not seen, each with the answer count up to it.
type Replay = Vec<(Arc<Item>, usize)>;

/// A reader of a hub; leaves it when dropped.
pub struct Reader {
    hub: Arc<Hub>,
    rx: broadcast::Receiver<Event>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut state = self.hub.state.lock();
        state.readers -= 1;
        if state.readers == 0 {
            self.hub.idle.notify_one();
        }
    }
}

impl Hub {
    /// Joins as a reader after `last_seq`: the current results after it, and the receiver of
    /// everything later. `None` if the hub has closed (open a new one).
    fn join(self: &Arc<Self>, last_seq: u64) -> Option<(Reader, Replay)> {
        let mut state = self.state.lock();
        if state.closed {
            return None;
        }
        state.readers += 1;
        // Under the lock: no event falls between the replay and the subscription.
        let rx = self.tx.subscribe();
        let replay = state.replay(last_seq);
        Some((Reader { hub: self.clone(), rx }, replay))
    }
}

/// Joins `key`'s hub through `slot`, opening it first if nobody has: one broker stream for
/// `app`'s results of `task` from the start.
async fn join(
    state: &Arc<ProxyState>,
    slot: Arc<Slot>,
    app: &AppId,
    task: Uuid,
    last_seq: u64,
) -> Result<(Reader, Replay), ApiError> {
    let key = (app.clone(), task);
    let mut slot = slot;
    loop {
        let opening = Opening { hubs: &state.hubs, key: &key, slot: Some(slot) };
        let held = opening.slot.as_ref().expect("set above");
        let opened = held.get_or_try_init(|| open(state, key.clone(), held.clone())).await.cloned();
        slot = opening.done();
        let hub = match opened {
            Ok(hub) => hub,
            Err(e) => {
                state.hubs.abandon(&key, &slot);
                return Err(e);
            }
        };
        if let Some(joined) = hub.join(last_seq) {
            return Ok(joined);
        }
        // It closed meanwhile: take (or make) the key's next hub.
        slot = state.hubs.slot(app, task);
    }
}

/// A reader's part in opening a hub. If the reader goes away while the opening is under way
/// (its client left, or its wait ended), the slot is abandoned as after a failed opening, so
/// an unopened slot nobody waits on does not stay in the map for good.
struct Opening<'a> {
    hubs: &'a Hubs,
    key: &'a Key,
    slot: Option<Arc<Slot>>,
}

impl Opening<'_> {
    /// The opening ran its course (opened or failed): the caller carries on with the slot.
    fn done(mut self) -> Arc<Slot> {
        self.slot.take().expect("taken once")
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.hubs.abandon(self.key, &slot);
        }
    }
}

/// Opens the broker stream and starts the hub's pump.
async fn open(state: &Arc<ProxyState>, key: Key, slot: Arc<Slot>) -> Result<Arc<Hub>, ApiError> {
    let q = ReadQuery { stream: Some(1), last_event_id: Some(0), ..Default::default() };
    let path = format!("/v1/tasks/{}/results?{}", key.1, crate::http::query_string(&q));
    let res = state.upstream.send(Method::GET, &path, &key.0, Bytes::new(), None).await?;
    if !res.status().is_success() {
        return Err(crate::http::relayed(res).await);
    }
    let (tx, _) = broadcast::channel(CAPACITY);
    let hub = Arc::new(Hub { state: Mutex::new(HubState::default()), tx, idle: Notify::new() });
    state.hubs.open.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(app = %key.0, task = %key.1, "result hub opened");
    actix_web::rt::spawn(pump(state.clone(), key, slot, hub.clone(), res));
    Ok(hub)
}

/// Reads the hub's broker stream until it ends or the hub has no readers.
async fn pump(state: Arc<ProxyState>, key: Key, slot: Arc<Slot>, hub: Arc<Hub>, res: reqwest::Response) {
    let end = tokio::select! {
        end = read_stream(&state, &key, &hub, res) => Some(end),
        () = idle(&hub) => None,
    };
    {
        let mut hub_state = hub.state.lock();
        hub_state.closed = true;
        if let Some(end) = end {
            hub_state.end = Some(end.clone());
            let _ = hub.tx.send(Event::End(end));
        }
    }
    state.hubs.forget(&key, &slot);
    state.hubs.open.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(app = %key.0, task = %key.1, "result hub closed");
}

/// Resolves once the hub has no readers, and closes it to new ones in the same step.
async fn idle(hub: &Hub) {
    loop {
        hub.idle.notified().await;
        let mut state = hub.state.lock();
        if state.readers == 0 {
            state.closed = true;
            return;
        }
    }
}

async fn read_stream(state: &ProxyState, key: &Key, hub: &Hub, res: reqwest::Response) -> End {
    let mut lines = crate::http::Lines::new(res);
    while let Some(ev) = lines.next_event().await {
        let event = match ev {
            // The broker's answer count includes results this proxy refuses; the hub counts
            // the ones its readers get.
            StreamEvent::NewResult { seq, n_answers: _, result } => {
                let (answers, from) = (result.status.is_answer(), result.from.clone());
                let opened = crate::http::open_result(state, &key.0, key.1, result).await.ok().map(|r| {
                    let json = photon::wire::to_json(&r);
                    let frame = frame("new_result", Some(seq), &json);
                    // Listings take the JSON from the frame's data: one copy of the body, not two.
                    let data_end = frame.len() - 2;
                    (frame.slice(data_end - json.len()..data_end), frame)
                });
                let item = Arc::new(Item { seq, from, answers, opened });
                let mut hub_state = hub.state.lock();
                hub_state.latest.insert(item.from.clone(), item.clone());
                let n_answers = hub_state.latest.values().filter(|i| i.counts()).count();
                hub_state.n_answers = n_answers;
                hub_state.listing = None;
                let _ = hub.tx.send(Event::Result { item, n_answers });
                continue;
            }
            StreamEvent::CaughtUp => {
                hub.state.lock().caught_up = true;
                Event::CaughtUp
            }
            StreamEvent::NewTask { .. } => continue,
            StreamEvent::DeletedTask { .. } => return End::Deleted,
            StreamEvent::Error { message } => return End::Error(message),
            StreamEvent::ShuttingDown => return End::BrokerStopping,
            StreamEvent::WaitExpired => return End::Error("the broker ended a stream without a wait".into()),
        };
        let _ = hub.tx.send(event);
    }
    End::Lost
}

// === readers ===

/// One Server-Sent Event as bytes: `data` must hold no line break (JSON never does).
fn frame(event: &str, id: Option<u64>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + event.len() + 40);
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    if let Some(id) = id {
        out.put_slice(format!("\nid: {id}").as_bytes());
    }
    out.put_slice(b"\ndata: ");
    out.put_slice(data);
    out.put_slice(b"\n\n");
    out.freeze()
}

fn comment(text: &str) -> Bytes {
    Bytes::from(format!(": {text}\n\n"))
}

fn json_frame(event: &str, value: impl serde::Serialize) -> Bytes {
    frame(event, None, &serde_json::to_vec(&value).expect("values serialize"))
}

/// What ends a read besides its events: its deadline (never, without one).
async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// An app's event stream fed by a hub.
struct Feed {
    reader: Reader,
    task: Uuid,
    /// The current results the reader has not seen, when it joined.
    backlog: VecDeque<(Arc<Item>, usize)>,
    last_seq: u64,
    wait_count: Option<usize>,
    until: Option<Instant>,
    keepalive: tokio::time::Interval,
    shutdown: photon::ops::Shutdown,
    done: bool,
    _open: photon::ops::metrics::LevelGuard,
}

impl Feed {
    /// The next bytes for the app; `None` once the stream has ended.
    async fn next(&mut self) -> Option<Bytes> {
        while !self.done {
            if let Some((item, n)) = self.backlog.pop_front() {
                if let Some(frame) = self.deliver(&item, n) {
                    return Some(frame);
                }
                continue;
            }
            let ev = tokio::select! {
                ev = self.reader.rx.recv() => ev,
                () = deadline(self.until) => return self.last(frame("wait_expired", None, b"null")),
                () = self.shutdown.started() => return self.last(comment(crate::http::PROXY_STOPPING)),
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
            };
            match ev {
                Ok(Event::Result { item, n_answers }) => {
                    if let Some(frame) = self.deliver(&item, n_answers) {
                        return Some(frame);
                    }
                }
                Ok(Event::CaughtUp) => {}
                Ok(Event::End(end)) => return self.last(self.end_frame(end)),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return self.last(json_frame("error", "stream fell behind; reconnect with Last-Event-ID"))
                }
                Err(broadcast::error::RecvError::Closed) => return self.last(self.end_frame(End::Lost)),
            }
        }
        None
    }

    fn last(&mut self, frame: Bytes) -> Option<Bytes> {
        self.done = true;
        Some(frame)
    }

    /// The frame of a result for this reader, if it is new to it and opened; the stream is
    /// done once `wait_count` answers are in.
    fn deliver(&mut self, item: &Item, n_answers: usize) -> Option<Bytes> {
        if item.seq <= self.last_seq {
            return None;
        }
        self.last_seq = item.seq;
        if self.wait_count.is_some_and(|c| n_answers >= c) {
            self.done = true;
        }
        item.opened.as_ref().map(|(_, frame)| frame.clone())
    }

    fn end_frame(&self, end: End) -> Bytes {
        match end {
            End::Deleted => json_frame("deleted_task", serde_json::json!({ "task_id": self.task })),
            End::Error(message) => json_frame("error", message),
            End::BrokerStopping => comment(crate::http::BROKER_STOPPING),
            End::Lost => json_frame("error", crate::http::LOST),
        }
    }
}

/// Serves an app's result event stream from the key's hub.
pub async fn stream(
    state: &Arc<ProxyState>,
    slot: Arc<Slot>,
    app: &AppId,
    task: Uuid,
    last_seq: u64,
    wait: photon::actors::engine::Wait,
) -> Result<HttpResponse, ApiError> {
    let (reader, replay) = join(state, slot, app, task, last_seq).await?;
    let keepalive = state.config.keepalive;
    let feed = Feed {
        reader,
        task,
        backlog: replay.into(),
        last_seq,
        wait_count: wait.count,
        until: wait.time.map(|t| Instant::now() + t),
        keepalive: tokio::time::interval_at(Instant::now() + keepalive, keepalive),
        shutdown: state.shutdown.clone(),
        done: false,
        _open: state.streams.hold(),
    };
    let body = futures_util::stream::unfold(feed, |mut feed| async move {
        feed.next().await.map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), feed))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_ENCODING, "identity"))
        .streaming(body))
}

/// How a long-poll through a hub ended.
pub enum Waited {
    Answer(HttpResponse),
    /// The hub could not answer (it ended, or had not caught up): ask the broker directly,
    /// waiting at most this much longer.
    Direct {
        left: Duration,
    },
}

/// Serves an app's long-poll on results from the key's hub: answers once `wait_count` answers
/// are in, or at the wait's end, with the current results (`206` if fewer than asked for).
pub async fn wait(
    state: &Arc<ProxyState>,
    slot: Arc<Slot>,
    app: &AppId,
    task: Uuid,
    wait: photon::actors::engine::Wait,
) -> Result<Waited, ApiError> {
    let _waiting = state.waiters.hold();
    let until = Instant::now() + wait.time.unwrap_or_else(|| state.longest_wait());
    let left = || Waited::Direct { left: until.saturating_duration_since(Instant::now()) };
    // Opening the hub is a request to the broker: it must not hold the wait past its time, nor
    // past the shutdown flag (the direct read that follows answers with what there is).
    let (mut reader, _) = tokio::select! {
        joined = join(state, slot, app, task, u64::MAX) => joined?,
        () = sleep_until(until) => return Ok(left()),
        () = state.shutdown.started() => return Ok(left()),
    };
    loop {
        {
            let hub = reader.hub.state.lock();
            match &hub.end {
                Some(End::Deleted) => return Err(ApiError::Gone("the task expired while waiting".into())),
                // As the broker answers its own waiters when it stops: with what there is.
                Some(End::BrokerStopping) => break,
                Some(_) => return Ok(left()),
                None => {}
            }
            if hub.caught_up && wait.count.is_some_and(|c| hub.n_answers >= c) {
                break;
            }
        }
        tokio::select! {
            ev = reader.rx.recv() => if let Err(broadcast::error::RecvError::Closed) = ev {
                return Ok(left());
            },
            () = sleep_until(until) => break,
            () = state.shutdown.started() => break,
        }
    }
    let mut hub = reader.hub.state.lock();
    if !hub.caught_up {
        return Ok(left());
    }
    let partial = wait.count.is_some_and(|c| hub.n_answers < c);
    let mut answer = if partial { HttpResponse::PartialContent() } else { HttpResponse::Ok() };
    Ok(Waited::Answer(answer.content_type("application/json").body(hub.listing())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reader_goes_direct_the_next_share_and_a_rejoin_never_goes_direct() {
        let hubs = Arc::new(Hubs::default());
        let (app, task) = (AppId::parse("app1.proxy1.broker").unwrap(), Uuid::new_v4());
        let first = hubs.route(&app, task);
        assert!(matches!(first, Route::Direct(_)));
        let (Route::Shared(a), Route::Shared(b)) = (hubs.route(&app, task), hubs.route(&app, task)) else {
            panic!("readers beside a direct one share a hub");
        };
        assert!(Arc::ptr_eq(&a, &b));
        // The hub ends and the direct reader leaves: nothing is kept for the key.
        hubs.forget(&(app.clone(), task), &a);
        drop(first);
        assert!(hubs.entries.lock().is_empty());
        // A reader that found its hub closed gets a new one to open, not a direct route, and
        // later readers join that one.
        let again = hubs.slot(&app, task);
        assert!(!Arc::ptr_eq(&again, &a));
        assert!(matches!(hubs.route(&app, task), Route::Shared(s) if Arc::ptr_eq(&s, &again)));
    }
}
