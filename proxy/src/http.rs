//! The app API of `../shared/API.md`. Handlers: authenticate the app, check and seal what it
//! sends, make one signed request to the broker, open and check what comes back. Long-polls and
//! streams are relayed as they happen.

use std::{sync::Arc, time::Duration};

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use actix_web_lab::sse;
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use futures_util::StreamExt;
use photon::{
    http::{body, json_answer, on, parse_task_id, ApiError},
    wire::{
        app::{single_line, NewTask, RawBody, Task, TaskResult},
        broker::{StreamEvent, WireResult, WireTask},
        parse_duration, to_json, AppId, ReadQuery,
    },
};
use reqwest::{Method, StatusCode};
use tokio::sync::mpsc;
use uuid::Uuid;

use serde_json::Value;

use crate::{
    batch::{Kind, Upload, Uploads},
    hub::{self, DirectGuard, Route, Waited},
    seal,
    seal::OpenError,
    upstream::{self, Whole},
    ProxyState,
};

type State = web::Data<Arc<ProxyState>>;

/// Extra time over a long-poll's own limit before the proxy gives up on the broker.
pub(crate) const UPSTREAM_SLACK: Duration = Duration::from_secs(30);
/// A broker stream line longer than this ends the stream (a sealed 10 MiB body fits).
const MAX_LINE: usize = 64 * 1024 * 1024;
/// The last line of an event stream the broker ends because it is shutting down.
pub(crate) const BROKER_STOPPING: &str = "the broker is shutting down; reconnect with Last-Event-ID";
/// The last line of an event stream this proxy ends because it is shutting down.
pub(crate) const PROXY_STOPPING: &str = "the proxy is shutting down; reconnect with Last-Event-ID";
/// The message of the `error` event that ends a stream whose broker connection broke off.
pub(crate) const LOST: &str = "lost the connection to the broker; reconnect with Last-Event-ID";

pub fn routes(cfg: &mut web::ServiceConfig) {
    use actix_web::http::Method as M;
    cfg.route("/v1/health", on(M::GET).to(health))
        .route("/v1/health", on(M::HEAD).to(health))
        .route("/v1/tasks", on(M::POST).to(create_task))
        .route("/v1/tasks", on(M::GET).to(list_tasks))
        .route("/v1/tasks/{id}", on(M::GET).to(get_task))
        .route("/v1/tasks/{id}/results", on(M::GET).to(get_results))
        .route("/v1/tasks/{id}/results/{app_id}", on(M::PUT).to(put_result))
        .default_service(web::to(photon::http::no_such_endpoint));
}

fn wants_events(req: &HttpRequest) -> bool {
    req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"))
}

pub(crate) fn query_string(q: &ReadQuery) -> String {
    serde_urlencoded::to_string(q).expect("query fields serialize")
}

/// An error answer from the broker, passed on (its body read within `SMALL_ANSWER`).
pub(crate) async fn relayed(res: reqwest::Response) -> ApiError {
    let status = res.status();
    match upstream::read_within(res, upstream::SMALL_ANSWER).await {
        Ok(body) => relayed_whole(Whole { status, body }),
        Err(e) => ApiError::BadGateway(format!("the broker's answer {status}: {e}")),
    }
}

/// An error answer from the broker, read whole, passed on.
fn relayed_whole(answer: Whole) -> ApiError {
    let status = actix_web::http::StatusCode::from_u16(answer.status.as_u16())
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    ApiError::Relayed { status, body: answer.body }
}

fn read_json<T: serde::de::DeserializeOwned>(answer: &Whole) -> Result<T, ApiError> {
    serde_json::from_slice(&answer.body)
        .map_err(|e| ApiError::BadGateway(format!("malformed answer from the broker: {e}")))
}

fn status_of(answer: &Whole) -> actix_web::http::StatusCode {
    actix_web::http::StatusCode::from_u16(answer.status.as_u16()).expect("statuses from the broker client are valid")
}

/// Opens a task for `caller`; a refusal is logged and counted.
async fn open_task(state: &ProxyState, caller: &AppId, task: Arc<WireTask>) -> Result<Task<RawBody>, OpenError> {
    let (id, from) = (task.id, task.from.clone());
    seal::open_task(&state.upstream, caller, task).await.inspect_err(|e| {
        state.refusals.count(e);
        tracing::warn!(task = %id, %from, reason = e.reason(), error = %e, "refused a task from the broker");
    })
}

/// Opens a result of `task_id` for `caller`; a refusal is logged and counted.
pub(crate) async fn open_result(
    state: &ProxyState,
    caller: &AppId,
    task_id: Uuid,
    result: Arc<WireResult>,
) -> Result<TaskResult<RawBody>, OpenError> {
    let from = result.from.clone();
    seal::open_result(&state.upstream, caller, task_id, result).await.inspect_err(|e| {
        state.refusals.count(e);
        tracing::warn!(task = %task_id, %from, reason = e.reason(), error = %e, "refused a result from the broker");
    })
}

/// Opens each wire task; one that doesn't open is refused and left out.
async fn open_tasks(state: &ProxyState, caller: &AppId, tasks: Vec<WireTask>) -> Vec<Task<RawBody>> {
    let opened = join_all(tasks.into_iter().map(|t| open_task(state, caller, Arc::new(t)))).await;
    opened.into_iter().filter_map(Result::ok).collect()
}

async fn open_results(
    state: &ProxyState,
    caller: &AppId,
    task_id: Uuid,
    results: Vec<WireResult>,
) -> Vec<TaskResult<RawBody>> {
    let opened = join_all(results.into_iter().map(|r| open_result(state, caller, task_id, Arc::new(r)))).await;
    opened.into_iter().filter_map(Result::ok).collect()
}

/// A read relayed as a (possibly long) poll; an error answer from the broker is passed on.
///
/// The wait is this proxy's to bound (API.md: over `MAX_WAIT` is `400`; a count alone waits
/// at most `MAX_WAIT`), so the broker is asked for an explicit `wait_time` within it. Left to
/// the broker, whose maximum may be longer, the proxy would give up first and answer `504`.
async fn long_poll(state: &ProxyState, caller: &AppId, path: &str, mut q: ReadQuery) -> Result<Whole, ApiError> {
    q.stream = None;
    let wait = body::parse_wait(&q, state.config.max_wait)?;
    let waits = wait.count.is_some() || wait.time.is_some();
    let time = wait.time.unwrap_or_else(|| state.longest_wait());
    if waits {
        q.wait_time = Some(format!("{}ms", time.as_millis()));
    }
    let timeout = time + UPSTREAM_SLACK;
    let url = format!("{path}?{}", query_string(&q));
    let _waiting = waits.then(|| state.waiters.hold());
    let res = tokio::select! {
        biased;
        // Shutting down: answer now with what the broker has, as if the wait had passed.
        _ = state.shutdown.started(), if waits => {
            q.wait_time = Some("0s".into());
            let url = format!("{path}?{}", query_string(&q));
            state.upstream.call(Method::GET, &url, caller, Bytes::new(), Some(UPSTREAM_SLACK)).await?
        }
        res = state.upstream.call(Method::GET, &url, caller, Bytes::new(), Some(timeout)) => res?,
    };
    if !res.status.is_success() {
        return Err(relayed_whole(res));
    }
    Ok(res)
}

/// A read relayed as an event stream, resuming after `Last-Event-ID`. `task_id` is the task
/// whose results are streamed (`None` for a `new_task` stream).
async fn open_events(
    state: &Arc<ProxyState>,
    req: &HttpRequest,
    caller: &AppId,
    task_id: Option<Uuid>,
    path: &str,
    mut q: ReadQuery,
    direct: Option<DirectGuard>,
) -> Result<HttpResponse, ApiError> {
    q.last_event_id = Some(body::last_event_id(req, &q)?);
    q.stream = Some(1);
    let wait_count = q.wait_count;
    if wait_count.is_some_and(|n| n > 0) {
        // The stream ends after the tasks or answers this proxy hands out; the broker would
        // count the ones refused here too and end first (for tasks, the app would see a broken
        // stream and get the refused task again on reconnecting). So the broker is asked for
        // all of them.
        q.wait_count = None;
    }
    let url = format!("{path}?{}", query_string(&q));
    let res = state.upstream.send(Method::GET, &url, caller, Bytes::new(), None).await?;
    if !res.status().is_success() {
        return Err(relayed(res).await);
    }
    Ok(relay_events(state.clone(), caller.clone(), task_id, res, wait_count, direct))
}

/// 200 when this proxy's certificate is valid and unrevoked and its control connection to the
/// broker is up; 503 with the reason otherwise (also while shutting down). Both carry the
/// count of refused messages by reason.
async fn health(state: State) -> HttpResponse {
    let problem = if state.shutdown.is_started() {
        Some("shutting down".to_owned())
    } else if let Some(problem) = state.upstream.keys.own_problem() {
        Some(problem.to_string())
    } else {
        state.link.problem()
    };
    let refused = state.refusals.snapshot();
    match problem {
        None => HttpResponse::Ok().json(serde_json::json!({
            "summary": "healthy",
            "refused": refused,
            "broker_online_s": state.link.online_for().map(|d| d.as_secs()),
            "waiters": state.waiters.get(),
            "streams": state.streams.get(),
            "hubs": state.hubs.open(),
        })),
        Some(error) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"summary": "unhealthy", "error": error, "refused": refused})),
    }
}

async fn create_task(state: State, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let caller = state.keys.authenticate(&req)?;
    let body = body::read_limited(&req, payload, state.config.max_body).await?;
    let new: NewTask<RawBody> = body::parse_json(&body)?;
    if new.from != caller {
        return Err(ApiError::Forbidden(format!("from is {}, but you are {caller}", new.from)));
    }
    let ttl =
        parse_duration(&new.ttl.0, state.config.max_ttl).map_err(|e| ApiError::BadRequest(format!("ttl: {e}")))?;
    let id = new.id.unwrap_or_else(Uuid::new_v4);
    let mut wire = WireTask {
        id,
        from: new.from,
        to: new.to,
        ttl_ms: ttl.as_millis() as u64,
        failure_strategy: new.failure_strategy,
        metadata: new.metadata,
        body: Arc::new(serde_json::value::to_raw_value(&Value::Null).expect("null serializes")),
        detached: None,
    };
    let detached = seal::seal_task(&state.upstream, &mut wire, single_line(new.body)).await?;
    let upload = Upload::new(caller, Kind::Task, to_json(&wire), detached);
    let res = Uploads::send(&state, upload).await?;
    if res.status != StatusCode::CREATED {
        return Err(relayed_whole(res));
    }
    state.observer.metrics.count("tasks.created", 1, &[]);
    Ok(HttpResponse::Created().insert_header((header::LOCATION, format!("/v1/tasks/{id}"))).finish())
}

async fn list_tasks(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.keys.authenticate(&req)?;
    let q: ReadQuery = body::parse_query(&req)?;
    if wants_events(&req) {
        if !q.todo() {
            return Err(ApiError::BadRequest("a task event stream needs filter=todo".into()));
        }
        return open_events(&state, &req, &caller, None, "/v1/tasks", q, None).await;
    }
    let (state, caller) = (&state, &caller);
    poll_and_open(state, caller, "/v1/tasks", q, |res| async move {
        let listed: Vec<WireTask> = read_json(&res)?;
        let n_listed = listed.len();
        let tasks = open_tasks(state, caller, listed).await;
        Ok(Opened { counted: tasks.len(), refused: n_listed - tasks.len(), items: tasks })
    })
    .await
}

/// What a broker answer came to for the app: the items it gets, how many of them count
/// towards `wait_count`, and how many that the broker counted this proxy refused.
struct Opened<T> {
    items: Vec<T>,
    counted: usize,
    refused: usize,
}

/// A long-poll whose items are opened for the app. Items this proxy refuses stay with the
/// broker, so they would meet the broker's count again and again, and the app would poll in a
/// tight loop: the wait goes on for as many more as were refused, until enough open or its
/// time is up. 200 or 206 follows from the items the app gets.
async fn poll_and_open<T, Fut>(
    state: &ProxyState,
    caller: &AppId,
    path: &str,
    q: ReadQuery,
    open: impl Fn(Whole) -> Fut,
) -> Result<HttpResponse, ApiError>
where
    T: serde::Serialize + photon::wire::BodySize,
    Fut: std::future::Future<Output = Result<Opened<T>, ApiError>>,
{
    let Some(want) = q.wait_count else {
        let res = long_poll(state, caller, path, q).await?;
        let status = status_of(&res);
        return Ok(json_answer(status, &open(res).await?.items));
    };
    let wait = body::parse_wait(&q, state.config.max_wait)?;
    let until = tokio::time::Instant::now() + wait.time.unwrap_or_else(|| state.longest_wait());
    let mut ask = q;
    // Whether the last question to the broker covered all the time left, so that its answer
    // is final when nothing in it was refused.
    let mut whole_time = true;
    loop {
        let batch = open(long_poll(state, caller, path, ask.clone()).await?).await?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let done = batch.counted >= want || left.is_zero() || state.shutdown.is_started();
        if done || (batch.refused == 0 && whole_time) {
            use actix_web::http::StatusCode as Status;
            let status = if batch.counted >= want { Status::OK } else { Status::PARTIAL_CONTENT };
            return Ok(json_answer(status, &batch.items));
        }
        if batch.refused == 0 {
            // What was refused is gone (expired or replaced): wait the rest as asked.
            ask.wait_count = Some(want);
            ask.wait_time = Some(format!("{}ms", left.as_millis()));
            whole_time = true;
        } else {
            // The refused stay with the broker until they expire or are replaced (a worker's
            // new answer), which the broker's count does not show: ask again in slices, so
            // that a change among them costs at most a slice, not the rest of the wait.
            ask.wait_count = Some(want + batch.refused);
            ask.wait_time = Some(format!("{}ms", left.min(REFUSED_SLICE).as_millis()));
            whole_time = left <= REFUSED_SLICE;
        }
    }
}

/// How long a long-poll waits at a time while some of what the broker counts is refused here.
const REFUSED_SLICE: Duration = Duration::from_secs(1);

async fn get_task(state: State, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.keys.authenticate(&req)?;
    let id = parse_task_id(&path)?;
    let q: ReadQuery = body::parse_query(&req)?;
    let res = long_poll(&state, &caller, &format!("/v1/tasks/{id}"), q).await?;
    let task: WireTask = read_json(&res)?;
    if task.id != id {
        let e = OpenError::WrongTask { got: task.id, want: id };
        state.refusals.count(&e);
        return Err(ApiError::BadGateway(format!("the broker's answer was refused: {e}")));
    }
    let task = open_task(&state, &caller, Arc::new(task))
        .await
        .map_err(|e| ApiError::BadGateway(format!("the broker's answer was refused: {e}")))?;
    Ok(json_answer(actix_web::http::StatusCode::OK, &task))
}

async fn put_result(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = state.keys.authenticate(&req)?;
    let body = body::read_limited(&req, payload, state.config.max_body).await?;
    let (task_text, app_text) = path.into_inner();
    let id = parse_task_id(&task_text)?;
    let result: TaskResult<RawBody> = body::parse_json(&body)?;
    if result.task != id || result.from.as_str() != app_text {
        return Err(ApiError::BadRequest(
            "the task id and app id in the path must match the result's task and from".into(),
        ));
    }
    if result.from != caller {
        return Err(ApiError::Forbidden(format!("from is {}, but you are {caller}", result.from)));
    }
    let mut wire = WireResult {
        body: None,
        from: result.from,
        to: result.to,
        task: id,
        status: result.status,
        metadata: result.metadata,
        detached: None,
    };
    let detached = seal::seal_result(&state.upstream, &mut wire, result.body.map(single_line)).await?;
    let upload = Upload::new(caller, Kind::Result(id), to_json(&wire), detached);
    let res = Uploads::send(&state, upload).await?;
    let answer = match res.status {
        StatusCode::CREATED => HttpResponse::Created().finish(),
        StatusCode::NO_CONTENT => HttpResponse::NoContent().finish(),
        _ => return Err(relayed_whole(res)),
    };
    state.observer.metrics.count("results.stored", 1, &[]);
    Ok(answer)
}

async fn get_results(state: State, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.keys.authenticate(&req)?;
    let id = parse_task_id(&path)?;
    let mut q: ReadQuery = body::parse_query(&req)?;
    let path = format!("/v1/tasks/{id}/results");
    let events = wants_events(&req);
    let waits = q.wait_count.is_some() || q.wait_time.is_some();
    // A read that stays open meets the others of its key: the first goes to the broker, the
    // ones beside it share a hub (see `hub`).
    let mut direct = None;
    if (events || waits) && q.wait_count != Some(0) {
        // Bad input is refused before a route is taken (a taken hub slot expects its reader).
        let wait = body::parse_wait(&q, state.config.max_wait)?;
        let last = if events { body::last_event_id(&req, &q)? } else { 0 };
        match state.hubs.route(&caller, id) {
            Route::Direct(guard) => direct = Some(guard),
            Route::Shared(slot) if events => {
                return hub::stream(&state, slot, &caller, id, last, wait).await;
            }
            Route::Shared(slot) => match hub::wait(&state, slot, &caller, id, wait).await? {
                Waited::Answer(answer) => return Ok(answer),
                Waited::Direct { left } => q.wait_time = Some(format!("{}ms", left.as_millis())),
            },
        }
    }
    if events {
        return open_events(&state, &req, &caller, Some(id), &path, q, direct).await;
    }
    let (st, who) = (&state, &caller);
    let answer = poll_and_open(st, who, &path, q, |res| async move {
        let listed: Vec<WireResult> = read_json(&res)?;
        let n_counting = listed.iter().filter(|r| r.status.is_answer()).count();
        let results = open_results(st, who, id, listed).await;
        let counted = results.iter().filter(|r| r.status.is_answer()).count();
        Ok(Opened { counted, refused: n_counting.saturating_sub(counted), items: results })
    })
    .await;
    drop(direct);
    answer
}

// === event streams ===

/// Where an event stream is, for deciding when it ends.
struct StreamPos {
    state: Arc<ProxyState>,
    caller: AppId,
    /// The task whose results are streamed; `None` for a `new_task` stream.
    task_id: Option<Uuid>,
    wait_count: Option<usize>,
    n_tasks: usize,
    /// Per worker, whether its latest result was refused here although the broker counts it
    /// towards `wait_count` (an answer, not `claimed`).
    refused: std::collections::HashMap<AppId, bool>,
}

/// What one broker stream line becomes for the app, and whether the stream ends with it. A
/// message that is refused is left out (and counted) and the stream goes on.
async fn to_sse(ev: StreamEvent, pos: &mut StreamPos) -> (Option<sse::Event>, bool) {
    let wait_count = pos.wait_count;
    let reached = |n: usize| wait_count.is_some_and(|c| n >= c);
    fn data(name: &str, json: impl serde::Serialize) -> sse::Data {
        sse::Data::new_json(json).expect("wire values serialize").event(name.to_owned())
    }
    match ev {
        // The broker's count covers every current result, also those before a resume point,
        // and also those refused here: the ones refused on this stream come off it.
        StreamEvent::NewResult { seq, n_answers, result } => {
            let Some(task_id) = pos.task_id else {
                return (None, false);
            };
            let (from, counts) = (result.from.clone(), result.status.is_answer());
            let opened = open_result(&pos.state, &pos.caller, task_id, result).await;
            pos.refused.insert(from, opened.is_err() && counts);
            let n = n_answers.saturating_sub(pos.refused.values().filter(|r| **r).count());
            let event = opened.ok().map(|r| sse::Event::Data(data("new_result", &r).id(seq.to_string())));
            (event, reached(n))
        }
        StreamEvent::NewTask { seq, task } => match open_task(&pos.state, &pos.caller, task).await {
            Ok(t) => {
                pos.n_tasks += 1;
                (Some(sse::Event::Data(data("new_task", &t).id(seq.to_string()))), reached(pos.n_tasks))
            }
            Err(_) => (None, false),
        },
        StreamEvent::CaughtUp => (None, false),
        StreamEvent::WaitExpired => (Some(sse::Event::Data(sse::Data::new("null").event("wait_expired"))), true),
        StreamEvent::DeletedTask { task_id } => {
            (Some(sse::Event::Data(data("deleted_task", serde_json::json!({ "task_id": task_id })))), true)
        }
        StreamEvent::Error { message } => (Some(sse::Event::Data(data("error", &message))), true),
        StreamEvent::ShuttingDown => (Some(sse::Event::Comment(BROKER_STOPPING.into())), true),
    }
}

/// A broker stream's events (newline-delimited JSON), keep-alives skipped. Ends when the
/// stream does, breaks off, or sends a line over [`MAX_LINE`]. `next_event` is cancel-safe.
pub(crate) struct Lines {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    buf: BytesMut,
    /// How much of `buf` is known to hold no line end, so a long line is scanned once.
    scanned: usize,
    /// The stream broke off (a read error, or a line over [`MAX_LINE`]) rather than ending.
    broke: bool,
}

impl Lines {
    pub(crate) fn new(res: reqwest::Response) -> Self {
        Self { body: res.bytes_stream().boxed(), buf: BytesMut::new(), scanned: 0, broke: false }
    }

    /// After `next_event` gave `None`: whether the stream broke off rather than ended.
    pub(crate) fn broke(&self) -> bool {
        self.broke
    }

    /// The next event, skipping (and logging) lines that are not one.
    pub(crate) async fn next_event(&mut self) -> Option<StreamEvent> {
        loop {
            match serde_json::from_slice::<StreamEvent>(&self.next().await?) {
                Ok(event) => return Some(event),
                Err(e) => tracing::warn!(error = %e, "malformed stream line from the broker"),
            }
        }
    }

    async fn next(&mut self) -> Option<BytesMut> {
        loop {
            while let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
                let mut line = self.buf.split_to(self.scanned + pos + 1);
                self.scanned = 0;
                line.truncate(line.len() - 1);
                if !line.is_empty() {
                    return Some(line);
                }
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                self.broke = true;
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) => {
                    self.broke = true;
                    return None;
                }
                // A clean end, unless it cut a line short.
                None => {
                    self.broke = !self.buf.is_empty();
                    return None;
                }
            }
        }
    }
}

/// Relays a broker event stream to the app as Server-Sent Events, one event as soon as its line
/// arrives. If the broker's stream breaks off before its end, the app gets `event: error` and
/// reconnects with `Last-Event-ID`. `direct` marks the stream open to the hubs until it ends.
fn relay_events(
    state: Arc<ProxyState>,
    caller: AppId,
    task_id: Option<Uuid>,
    res: reqwest::Response,
    wait_count: Option<usize>,
    direct: Option<DirectGuard>,
) -> HttpResponse {
    let keepalive = state.config.keepalive;
    let (tx, rx) = mpsc::channel::<sse::Event>(64);
    let (open, shutdown) = (state.streams.hold(), state.shutdown.clone());
    actix_web::rt::spawn(async move {
        let (_open, _direct) = (open, direct);
        let mut lines = Lines::new(res);
        let mut stream = StreamPos { state, caller, task_id, wait_count, n_tasks: 0, refused: Default::default() };
        loop {
            let ev = tokio::select! {
                ev = lines.next_event() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                _ = shutdown.started() => {
                    let _ = tx.send(sse::Event::Comment(PROXY_STOPPING.into())).await;
                    return;
                }
                _ = tx.closed() => return,
            };
            let (event, end) = to_sse(ev, &mut stream).await;
            if let Some(event) = event {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
        if wait_count == Some(0) && !lines.broke() {
            return; // asked for nothing more than what was there: the broker's end is the end
        }
        let lost = sse::Data::new_json(LOST).expect("strings serialize");
        let _ = tx.send(sse::Event::Data(lost.event("error"))).await;
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_ENCODING, "identity"))
        .body(sse::Sse::from_infallible_receiver(rx).with_keep_alive(keepalive))
}
