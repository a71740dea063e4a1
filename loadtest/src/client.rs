//! One app talking to its proxy, as a Beam app would: create tasks, put results, read them by
//! long-poll or Server-Sent Events. Failures come back as the short name the run counts them
//! under (the HTTP status, or `connect`, `timeout`, `lost`, `malformed`, `too_large`: an answer
//! over 256 MiB).
//!
//! Plain requests go through [`photon::http1`] (see there why) to an `http://` proxy, or
//! through reqwest for `https://`, when asked (`--client reqwest`), and for event streams.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use photon::{
    http1,
    urls::{self, Url},
    wire::{
        app::{NewTask, Task, TaskResult},
        to_json, AppId, BodySize, DurationText, FailureStrategy, WorkStatus,
    },
};
use reqwest::{
    header::{self, HeaderValue},
    Client, Method, RequestBuilder, Response,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::target::Endpoint;

/// Why an operation failed, as counted.
pub type Failure = String;

/// The longest a plain request may take, its answer included: well over the longest wait a
/// scenario asks for (30 s). Event streams are bounded by [`READ_LIMIT`] between reads.
pub const CALL_LIMIT: Duration = Duration::from_secs(90);
/// The longest silence on a connection of the reqwest client (event streams get a keep-alive
/// every 15 s, so only a stalled target comes near it).
pub const READ_LIMIT: Duration = Duration::from_secs(90);

fn failure(e: reqwest::Error) -> Failure {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else if e.is_decode() {
        "malformed".into()
    } else {
        "lost".into()
    }
}

/// The HTTP client of the apps' plain requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// The loadtest's own HTTP/1.1 client: lean on CPU, plain `http://` only, connects directly
    /// (no forward proxy). `https://` targets use reqwest.
    Lean,
    /// reqwest: TLS, and `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` from the environment.
    Reqwest,
}

pub struct App {
    http: Client,
    /// The lean client's connections, when it serves this app.
    lean: Option<http1::Pool>,
    pub endpoint: Endpoint,
    pub id: AppId,
    /// `endpoint.url`, parsed once (see [`photon::urls`]).
    base: Url,
    auth: HeaderValue,
    /// `authorization: …`, the line the lean client sends.
    auth_line: String,
    /// `base`'s own path without its trailing `/`, which the lean client's targets start with.
    prefix: String,
}

impl App {
    /// The app at `endpoint`; its plain requests go through `kind` (keeping up to `max_idle`
    /// idle connections when that is the lean client), its event streams through `http`.
    pub fn new(http: Client, endpoint: Endpoint, kind: ClientKind, max_idle: usize) -> Result<Self, String> {
        let id = AppId::parse(&endpoint.app).map_err(|e| format!("app id {:?}: {e}", endpoint.app))?;
        let base = Url::parse(&endpoint.url).map_err(|e| format!("proxy URL {:?}: {e}", endpoint.url))?;
        let credentials = format!("ApiKey {} {}", endpoint.app, endpoint.key);
        let mut auth = HeaderValue::try_from(&credentials)
            .map_err(|_| format!("the API key of {} is not a valid header value", endpoint.app))?;
        auth.set_sensitive(true);
        let lean = match kind {
            ClientKind::Lean => http1::plain_authority(&base)
                .map(|authority| http1::Pool::new(&authority, max_idle, http1::Resend::Unanswered)),
            ClientKind::Reqwest => None,
        };
        let prefix = base.path().trim_end_matches('/').to_owned();
        let auth_line = format!("authorization: {credentials}");
        Ok(Self { http, lean, endpoint, id, base, auth, auth_line, prefix })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, urls::at(&self.base, path)).header(header::AUTHORIZATION, self.auth.clone())
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// A plain request (`body` as JSON when given) whose status must be one of `ok`; its body.
    /// At most [`CALL_LIMIT`]: a target that takes a request and never answers fails it
    /// (`timeout`) rather than holding the run past its duration.
    async fn call(&self, method: Method, path: &str, body: Option<Bytes>, ok: &[u16]) -> Result<Bytes, Failure> {
        tokio::time::timeout(CALL_LIMIT, self.call_unbounded(method, path, body, ok))
            .await
            .unwrap_or_else(|_| Err("timeout".into()))
    }

    async fn call_unbounded(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        ok: &[u16],
    ) -> Result<Bytes, Failure> {
        let Some(pool) = &self.lean else {
            let mut req = self.request(method, path);
            if let Some(body) = body {
                req = req.header(header::CONTENT_TYPE, "application/json").body(body);
            }
            return Self::expect(req, ok).await?.bytes().await.map_err(failure);
        };
        let target = format!("{}{path}", self.prefix);
        let answer = pool
            .send(method.as_str(), &target, &[&self.auth_line], body.as_deref())
            .await
            .map_err(|e| e.name().to_owned())?;
        if ok.contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(answer.status.to_string())
        }
    }

    /// [`call`](Self::call), its answer read as JSON.
    async fn call_json<T: DeserializeOwned>(&self, path: &str, ok: &[u16]) -> Result<T, Failure> {
        let body = self.call(Method::GET, path, None, ok).await?;
        serde_json::from_slice(&body).map_err(|_| "malformed".into())
    }

    async fn expect(req: RequestBuilder, ok: &[u16]) -> Result<Response, Failure> {
        let res = req.send().await.map_err(failure)?;
        if ok.contains(&res.status().as_u16()) {
            Ok(res)
        } else {
            Err(res.status().as_u16().to_string())
        }
    }

    /// `POST /v1/tasks` with a new id; returns it.
    pub async fn create<B: Serialize + BodySize>(&self, to: &AppId, body: &B, ttl: &str) -> Result<Uuid, Failure> {
        self.create_for(std::slice::from_ref(to), body, ttl).await
    }

    /// `POST /v1/tasks` to several recipients.
    pub async fn create_for<B: Serialize + BodySize>(
        &self,
        to: &[AppId],
        body: &B,
        ttl: &str,
    ) -> Result<Uuid, Failure> {
        let id = Uuid::new_v4();
        let task = NewTask {
            id: Some(id),
            from: self.id.clone(),
            to: to.to_vec(),
            body,
            ttl: DurationText(ttl.to_owned()),
            failure_strategy: FailureStrategy::default(),
            metadata: Value::Null,
        };
        self.call(Method::POST, "/v1/tasks", Some(to_json(&task)), &[201]).await?;
        Ok(id)
    }

    /// `PUT` a `succeeded` result for `task` to its creator.
    pub async fn answer<B: Serialize + BodySize>(&self, task: &Task, body: &B) -> Result<(), Failure> {
        self.put_result(task.id, &task.from, body).await
    }

    /// `PUT` a `succeeded` result (new or replacing this app's earlier one) for `task`, to `creator`.
    pub async fn put_result<B: Serialize + BodySize>(
        &self,
        task: Uuid,
        creator: &AppId,
        body: &B,
    ) -> Result<(), Failure> {
        let result = TaskResult {
            from: self.id.clone(),
            to: vec![creator.clone()],
            task,
            status: WorkStatus::Succeeded,
            body: Some(body),
            metadata: Value::Null,
        };
        let path = format!("/v1/tasks/{task}/results/{}", self.id);
        self.call(Method::PUT, &path, Some(to_json(&result)), &[201, 204]).await.map(drop)
    }

    /// The worker's to-do list, waiting up to `wait` for at least one task.
    pub async fn todo(&self, wait: Duration) -> Result<Vec<Task>, Failure> {
        let path = format!("/v1/tasks?filter=todo&wait_count=1&wait_time={}ms", wait.as_millis());
        self.call_json(&path, &[200, 206]).await
    }

    /// The worker's `new_task` event stream.
    pub async fn todo_stream(&self) -> Result<Events, Failure> {
        let req = self.get("/v1/tasks?filter=todo").header(header::ACCEPT, "text/event-stream");
        Ok(Events::new(Self::expect(req, &[200]).await?))
    }

    /// Waits (long-poll) for the first result of `task`.
    pub async fn first_result(&self, task: Uuid, wait: Duration) -> Result<TaskResult, Failure> {
        self.results(task, 1, wait).await?.pop().ok_or_else(|| "no_result".into())
    }

    /// Waits (long-poll) until `task` has `count` results; fewer (206) is a failure.
    pub async fn results(&self, task: Uuid, count: usize, wait: Duration) -> Result<Vec<TaskResult>, Failure> {
        let path = format!("/v1/tasks/{task}/results?wait_count={count}&wait_time={}ms", wait.as_millis());
        self.call_json(&path, &[200]).await
    }

    /// Waits (event stream) for the first result of `task`.
    pub async fn first_result_event(&self, task: Uuid) -> Result<TaskResult, Failure> {
        Ok(self.result_events(task, 1).await?.pop().expect("one result"))
    }

    /// Reads `task`'s result stream until results from `count` different apps arrived.
    pub async fn result_events(&self, task: Uuid, count: usize) -> Result<Vec<TaskResult>, Failure> {
        let mut events = self.result_stream(task, None, &format!("wait_count={count}")).await?;
        let mut results: Vec<TaskResult> = Vec::with_capacity(count);
        while let Some(event) = events.next().await? {
            if event.event == "new_result" {
                let result: TaskResult = serde_json::from_str(&event.data).map_err(|_| "malformed")?;
                results.retain(|r| r.from != result.from);
                results.push(result);
                if results.len() >= count {
                    return Ok(results);
                }
            }
        }
        Err("no_result".into())
    }

    /// `task`'s result event stream with long-poll parameters (`wait_count=1`, `wait_time=60s`:
    /// without either it ends at once), resumed after `last_event_id` when given.
    pub async fn result_stream(&self, task: Uuid, last_event_id: Option<&str>, wait: &str) -> Result<Events, Failure> {
        let mut req = self.get(&format!("/v1/tasks/{task}/results?{wait}")).header(header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        Ok(Events::new(Self::expect(req, &[200]).await?))
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A Server-Sent Events reader; comments are skipped.
pub struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no block end, so a large event is scanned once.
    scanned: usize,
    /// The largest event taken ([`http1::MAX_BODY`]; smaller in tests).
    max: usize,
}

impl Events {
    fn new(res: Response) -> Self {
        Self::of(res.bytes_stream().boxed(), http1::MAX_BODY)
    }

    fn of(body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>, max: usize) -> Self {
        Self { body, buf: Vec::new(), scanned: 0, max }
    }

    /// The next event; `None` at the end of the stream. An event that grows past
    /// [`http1::MAX_BODY`] without ending is `too_large`: a target that streams without end
    /// cannot make the run take all memory.
    pub async fn next(&mut self) -> Result<Option<Event>, Failure> {
        loop {
            let from = self.scanned.saturating_sub(1);
            if let Some(end) = self.buf[from..].windows(2).position(|w| w == b"\n\n").map(|at| from + at) {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                self.scanned = 0;
                if let Some(event) = parse_event(&String::from_utf8_lossy(&block)) {
                    return Ok(Some(event));
                }
                continue;
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                return Err("too_large".into());
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(failure(e)),
                None => return Ok(None),
            }
        }
    }
}

/// One SSE block → its event; `None` for a comment-only block.
pub fn parse_event(block: &str) -> Option<Event> {
    let (mut event, mut id, mut data, mut any) = ("message".to_owned(), None, String::new(), false);
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_owned();
            any = true;
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
            any = true;
        }
    }
    any.then_some(Event { event, id, data })
}

#[cfg(test)]
mod tests {
    use super::{parse_event, Event, Events};
    use futures_util::StreamExt;

    /// Events split anywhere between pieces come whole; one that never ends is refused once it
    /// passes the bound, not read for ever.
    #[tokio::test]
    async fn events_come_whole_and_an_endless_one_is_refused() {
        let pieces = ["event: a\nda", "ta: 1\n", "\n: keep\n\nevent: b\ndata: 2\n\n"];
        let stream = futures_util::stream::iter(pieces.map(|p| Ok(bytes::Bytes::from(p))));
        let mut events = Events::of(stream.boxed(), 64);
        assert_eq!(events.next().await.unwrap().unwrap().data, "1");
        assert_eq!(events.next().await.unwrap().unwrap().event, "b");
        assert_eq!(events.next().await, Ok(None));
        // 2 MiB without an end, against a bound of 1 MiB (without the bound: the stream's end).
        let endless = futures_util::stream::repeat_with(|| Ok(bytes::Bytes::from(vec![b'x'; 1 << 10]))).take(2048);
        let mut events = Events::of(endless.boxed(), 1 << 20);
        assert_eq!(events.next().await, Err("too_large".to_owned()));
    }

    #[test]
    fn sse_blocks() {
        let event = |e: &str, id: Option<&str>, d: &str| {
            Some(Event { event: e.into(), id: id.map(Into::into), data: d.into() })
        };
        assert_eq!(
            parse_event("event: new_task\nid: 7\ndata: {\"a\":1}\n\n"),
            event("new_task", Some("7"), "{\"a\":1}")
        );
        assert_eq!(parse_event(": keep-alive\n\n"), None);
        assert_eq!(parse_event("data: a\ndata: b\n\n"), event("message", None, "a\nb"));
    }
}
