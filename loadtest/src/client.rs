//! One app talking to its proxy, as a Beam app would: create tasks, put results, read them by
//! long-poll or Server-Sent Events. Failures come back as the short name the run counts them
//! under (the HTTP status, or `connect`, `timeout`, `lost`, `malformed`).

use std::time::Duration;

use futures_util::StreamExt;
use photon::{
    urls::{self, Url},
    wire::{
        app::{Body, NewTask, Task, TaskResult},
        AppId, DurationText, FailureStrategy, WorkStatus,
    },
};
use reqwest::{
    header::{self, HeaderValue},
    Client, RequestBuilder, Response,
};
use serde_json::Value;
use uuid::Uuid;

use crate::target::Endpoint;

/// Why an operation failed, as counted.
pub type Failure = String;

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

pub struct App {
    http: Client,
    pub endpoint: Endpoint,
    pub id: AppId,
    /// `endpoint.url`, parsed once (see [`photon::urls`]).
    base: Url,
    auth: HeaderValue,
}

impl App {
    pub fn new(http: Client, endpoint: Endpoint) -> Result<Self, String> {
        let id = AppId::parse(&endpoint.app).map_err(|e| format!("app id {:?}: {e}", endpoint.app))?;
        let base = Url::parse(&endpoint.url).map_err(|e| format!("proxy URL {:?}: {e}", endpoint.url))?;
        let mut auth = HeaderValue::try_from(format!("ApiKey {} {}", endpoint.app, endpoint.key))
            .map_err(|_| format!("the API key of {} is not a valid header value", endpoint.app))?;
        auth.set_sensitive(true);
        Ok(Self { http, endpoint, id, base, auth })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.http.request(method, urls::at(&self.base, path)).header(header::AUTHORIZATION, self.auth.clone())
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.request(reqwest::Method::GET, path)
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
    pub async fn create<B: Body + Clone>(&self, to: &AppId, body: &B, ttl: &str) -> Result<Uuid, Failure> {
        self.create_for(std::slice::from_ref(to), body, ttl).await
    }

    /// `POST /v1/tasks` to several recipients.
    pub async fn create_for<B: Body + Clone>(&self, to: &[AppId], body: &B, ttl: &str) -> Result<Uuid, Failure> {
        let id = Uuid::new_v4();
        let task = NewTask {
            id: Some(id),
            from: self.id.clone(),
            to: to.to_vec(),
            body: body.clone(),
            ttl: DurationText(ttl.to_owned()),
            failure_strategy: FailureStrategy::default(),
            metadata: Value::Null,
        };
        let req = self.request(reqwest::Method::POST, "/v1/tasks");
        Self::expect(req.json(&task), &[201]).await?;
        Ok(id)
    }

    /// `PUT` a `succeeded` result for `task` to its creator.
    pub async fn answer<B: Body + Clone>(&self, task: &Task, body: &B) -> Result<(), Failure> {
        self.put_result(task.id, &task.from, body).await
    }

    /// `PUT` a `succeeded` result (new or replacing this app's earlier one) for `task`, to `creator`.
    pub async fn put_result<B: Body + Clone>(&self, task: Uuid, creator: &AppId, body: &B) -> Result<(), Failure> {
        let result = TaskResult {
            from: self.id.clone(),
            to: vec![creator.clone()],
            task,
            status: WorkStatus::Succeeded,
            body: Some(body.clone()),
            metadata: Value::Null,
        };
        let req = self.request(reqwest::Method::PUT, &format!("/v1/tasks/{task}/results/{}", self.id)).json(&result);
        Self::expect(req, &[201, 204]).await.map(drop)
    }

    /// The worker's to-do list, waiting up to `wait` for at least one task.
    pub async fn todo(&self, wait: Duration) -> Result<Vec<Task>, Failure> {
        let path = format!("/v1/tasks?filter=todo&wait_count=1&wait_time={}ms", wait.as_millis());
        Self::expect(self.get(&path), &[200, 206]).await?.json().await.map_err(failure)
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
        Self::expect(self.get(&path), &[200]).await?.json().await.map_err(failure)
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
}

impl Events {
    fn new(res: Response) -> Self {
        Self { body: res.bytes_stream().boxed(), buf: Vec::new(), scanned: 0 }
    }

    /// The next event; `None` at the end of the stream.
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
    use super::{parse_event, Event};

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
