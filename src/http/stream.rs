//! Broker→proxy event streams: newline-delimited [`StreamEvent`] JSON, an empty line as
//! keep-alive. Each stream is a task pumping the engine's subscription into the response body;
//! it ends on its own end condition, when the proxy goes away, or on shutdown (after a
//! `shutting_down` line, so the proxy ends its apps' streams cleanly).

use std::{convert::Infallible, time::Duration};

use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{
    sync::mpsc,
    time::{sleep_until, Instant},
};
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use super::{ApiError, BrokerState};
use crate::{
    actors::{engine::Wait, task::TaskEvent},
    wire::{broker::StreamEvent, AppId},
};

/// Lines buffered towards one proxy connection before the pump waits for it.
const BODY_BUFFER: usize = 64;

/// One JSON value as a newline-terminated line.
pub(super) fn json_line(value: &impl serde::Serialize) -> Bytes {
    let mut v = serde_json::to_vec(value).expect("stream lines serialize");
    v.push(b'\n');
    Bytes::from(v)
}

fn line(ev: &StreamEvent) -> Bytes {
    json_line(ev)
}

pub(super) fn respond(rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("cache-control", "no-cache"))
        .streaming(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
}

/// What ends a stream besides its events: the `wait_time` deadline (never, without one).
async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn results(
    state: &BrokerState,
    caller: &AppId,
    id: Uuid,
    wait: Wait,
    last_seq: u64,
) -> Result<HttpResponse, ApiError> {
    let (snapshot, mut events) = state.engine.subscribe_results(caller, id, last_seq).await?;
    let (out, rx) = mpsc::channel(BODY_BUFFER);
    let keepalive = state.keepalive;
    let until = wait.time.map(|t| Instant::now() + t);
    let done = move |n_answers: usize| wait.count.is_some_and(|c| n_answers >= c);
    let (open, shutdown) = (state.streams.hold(), state.shutdown.clone());
    actix_web::rt::spawn(async move {
        let _open = open;
        for ev in snapshot {
            let end = done(ev.n_answers);
            if out
                .send(line(&StreamEvent::NewResult { seq: ev.seq, n_answers: ev.n_answers, result: ev.result }))
                .await
                .is_err()
                || end
            {
                return;
            }
        }
        if wait.count == Some(0) || out.send(line(&StreamEvent::CaughtUp)).await.is_err() {
            return;
        }
        let mut ka = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        loop {
            let msg = tokio::select! {
                ev = events.recv() => match ev {
                    Some(TaskEvent::Result(ev)) => {
                        let end = done(ev.n_answers);
                        let msg = line(&StreamEvent::NewResult { seq: ev.seq, n_answers: ev.n_answers, result: ev.result });
                        if end { let _ = out.send(msg).await; return; }
                        msg
                    }
                    Some(TaskEvent::Deleted) => { let _ = out.send(line(&StreamEvent::DeletedTask { task_id: id })).await; return; }
                    None => { let _ = out.send(line(&StreamEvent::Error { message: "stream fell behind; reconnect with Last-Event-ID".into() })).await; return; }
                },
                _ = deadline(until) => { let _ = out.send(line(&StreamEvent::WaitExpired)).await; return; }
                _ = shutdown.started() => { let _ = out.send(line(&StreamEvent::ShuttingDown)).await; return; }
                _ = ka.tick() => Bytes::from_static(b"\n"),
                _ = out.closed() => return,
            };
            if out.send(msg).await.is_err() {
                return;
            }
        }
    });
    Ok(respond(rx))
}

pub(super) fn tasks(state: &BrokerState, caller: &AppId, wait: Wait, last_seq: u64) -> HttpResponse {
    let (snapshot, mut delivered) = state.engine.subscribe_tasks(caller, last_seq);
    let (out, rx) = mpsc::channel(BODY_BUFFER);
    let keepalive: Duration = state.keepalive;
    let until = wait.time.map(|t| Instant::now() + t);
    let (open, shutdown) = (state.streams.hold(), state.shutdown.clone());
    actix_web::rt::spawn(async move {
        let _open = open;
        let mut n_sent = 0usize;
        let full = |n: usize| wait.count.is_some_and(|c| n >= c);
        if full(0) {
            return;
        }
        for d in snapshot {
            if d.task.expires_at <= Instant::now() {
                continue;
            }
            let task = std::sync::Arc::new(d.task.to_wire(Instant::now()));
            n_sent += 1;
            if out.send(line(&StreamEvent::NewTask { seq: d.seq, task })).await.is_err() || full(n_sent) {
                return;
            }
        }
        let mut ka = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        loop {
            let msg = tokio::select! {
                d = delivered.recv() => match d {
                    Some(d) => {
                        n_sent += 1;
                        line(&StreamEvent::NewTask { seq: d.seq, task: std::sync::Arc::new(d.task.to_wire(Instant::now())) })
                    }
                    None => { let _ = out.send(line(&StreamEvent::Error { message: "stream fell behind; reconnect with Last-Event-ID".into() })).await; return; }
                },
                _ = deadline(until) => { let _ = out.send(line(&StreamEvent::WaitExpired)).await; return; }
                _ = shutdown.started() => { let _ = out.send(line(&StreamEvent::ShuttingDown)).await; return; }
                _ = ka.tick() => Bytes::from_static(b"\n"),
                _ = out.closed() => return,
            };
            if out.send(msg).await.is_err() || full(n_sent) {
                return;
            }
        }
    });
    respond(rx)
}
