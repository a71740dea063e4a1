//! `TaskActor`: one per task. Owns the task's results (one slot per worker) and its
//! subscribers — long-poll waiters and result streams — and tells them about every new or
//! replaced result at once, in order, each with the task's next sequence number.

use std::{collections::HashMap, sync::Arc};

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::{mailbox::Mailboxes, Registry, TaskRecord};
use crate::wire::{broker::WireResult, AppId, WorkStatus};

/// Capacity of each result stream's channel. A stream whose client reads slower than results
/// arrive is dropped when full; its client resumes with `Last-Event-ID` and loses nothing.
pub const STREAM_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("{0} is not among the task's recipients")]
    NotRecipient(AppId),
    #[error("only the task's creator may read its results")]
    NotCreator,
    #[error("the task has expired")]
    Expired,
}

/// What happened to a submitted result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
    /// A `claimed` after `succeeded`/`permfailed`: acknowledged, not stored.
    Ignored,
}

/// One result as a subscriber sees it.
#[derive(Debug, Clone)]
pub struct ResultEvent {
    pub seq: u64,
    /// Non-claimed results visible to the creator, including this one.
    pub n_answers: usize,
    pub result: Arc<WireResult>,
}

/// What a stream receives.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    Result(ResultEvent),
    Deleted,
}

/// How a wait on results ends (the deadline is the waiting side's).
#[derive(Debug)]
pub enum WaitOutcome {
    Ready(Vec<Arc<WireResult>>),
    Gone,
}

/// The results now, or a receiver that gets them once enough are there.
pub enum ReadOutcome {
    Ready(Vec<Arc<WireResult>>),
    Waiting(oneshot::Receiver<WaitOutcome>),
}

// === messages ===

/// Store a worker's result.
#[derive(Message)]
#[rtype(result = "Result<PutOutcome, TaskError>")]
pub struct PutResult(pub WireResult);

/// Read the results addressed to `caller`; with `wait_count`, wait for that many answers.
#[derive(Message)]
#[rtype(result = "Result<ReadOutcome, TaskError>")]
pub struct ReadResults {
    pub caller: AppId,
    pub wait_count: Option<usize>,
}

/// Start a result stream: returns the results after `last_seq` and registers `tx` for all later
/// events, atomically.
#[derive(Message)]
#[rtype(result = "Result<Vec<ResultEvent>, TaskError>")]
pub struct Subscribe {
    pub caller: AppId,
    pub last_seq: u64,
    pub tx: mpsc::Sender<TaskEvent>,
}

/// The task's TTL has passed: tell everyone and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Expire;

// === impl TaskActor ===

struct Slot {
    seq: u64,
    result: Arc<WireResult>,
}

struct Waiter {
    want: usize,
    tx: oneshot::Sender<WaitOutcome>,
}

pub struct TaskActor {
    record: Arc<TaskRecord>,
    registry: Arc<Registry>,
    inboxes: Arc<Mailboxes>,
    outboxes: Arc<Mailboxes>,
    results: HashMap<AppId, Slot>,
    last_seq: u64,
    n_answers: usize,
    waiters: Vec<Waiter>,
    streams: Vec<mpsc::Sender<TaskEvent>>,
}

impl TaskActor {
    pub fn new(
        record: Arc<TaskRecord>,
        registry: Arc<Registry>,
        inboxes: Arc<Mailboxes>,
        outboxes: Arc<Mailboxes>,
    ) -> Self {
        Self {
            record,
            registry,
            inboxes,
            outboxes,
            results: HashMap::new(),
            last_seq: 0,
            n_answers: 0,
            waiters: Vec::new(),
            streams: Vec::new(),
        }
    }

    fn creator(&self) -> &AppId {
        &self.record.task.from
    }

    fn counts(&self, r: &WireResult) -> bool {
        r.status.is_answer() && r.to.contains(self.creator())
    }

    /// Results addressed to `caller`, oldest update first.
    fn visible(&self, caller: &AppId, after: u64) -> Vec<(u64, Arc<WireResult>)> {
        let mut out: Vec<_> = self
            .results
            .values()
            .filter(|s| s.seq > after && s.result.to.contains(caller))
            .map(|s| (s.seq, s.result.clone()))
            .collect();
        out.sort_unstable_by_key(|(seq, _)| *seq);
        out
    }

    fn snapshot(&self, caller: &AppId) -> Vec<Arc<WireResult>> {
        self.visible(caller, 0).into_iter().map(|(_, r)| r).collect()
    }

    fn notify(&mut self, event: ResultEvent) {
        if event.result.to.contains(self.creator()) {
            let ev = TaskEvent::Result(event);
            self.streams.retain(|tx| tx.try_send(ev.clone()).is_ok());
        }
        if self.waiters.is_empty() {
            return;
        }
        let n = self.n_answers;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiters).into_iter().filter(|w| !w.tx.is_closed()).partition(|w| w.want <= n);
        self.waiters = waiting;
        if !ready.is_empty() {
            let creator = self.creator().clone();
            let results = self.snapshot(&creator);
            for w in ready {
                let _ = w.tx.send(WaitOutcome::Ready(results.clone()));
            }
        }
    }
}

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Requests queue here under backpressure: `Addr::send` waits while the mailbox is full.
        ctx.set_mailbox_capacity(256);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        let id = self.record.task.id;
        for app in &self.record.task.to {
            self.inboxes.remove(app, &self.record);
        }
        self.outboxes.remove(&self.record.task.from, &self.record);
        self.registry.remove_if(&id, |_, h| Arc::ptr_eq(&h.record, &self.record));
        tracing::debug!(task = %id, "task actor stopped");
    }
}

impl Handler<PutResult> for TaskActor {
    type Result = Result<PutOutcome, TaskError>;

    fn handle(&mut self, PutResult(result): PutResult, _ctx: &mut Context<Self>) -> Self::Result {
        if !self.record.task.to.contains(&result.from) {
            return Err(TaskError::NotRecipient(result.from));
        }
        let worker = result.from.clone();
        let old = self.results.get(&worker);
        if result.status == WorkStatus::Claimed
            && old.is_some_and(|o| matches!(o.result.status, WorkStatus::Succeeded | WorkStatus::Permfailed))
        {
            return Ok(PutOutcome::Ignored);
        }
        if old.is_some_and(|o| self.counts(&o.result)) {
            self.n_answers -= 1;
        }
        if self.counts(&result) {
            self.n_answers += 1;
        }
        if result.status.settles() {
            self.inboxes.settle(&worker, self.record.task.id);
        } else {
            self.inboxes.reopen(&worker, self.record.task.id);
        }
        self.last_seq += 1;
        let result = Arc::new(result);
        let seq = self.last_seq;
        let replaced = self.results.insert(worker, Slot { seq, result: result.clone() }).is_some();
        tracing::debug!(task = %self.record.task.id, seq, n_answers = self.n_answers, "result stored");
        self.notify(ResultEvent { seq, n_answers: self.n_answers, result });
        Ok(if replaced { PutOutcome::Replaced } else { PutOutcome::Created })
    }
}

impl Handler<ReadResults> for TaskActor {
    type Result = Result<ReadOutcome, TaskError>;

    fn handle(&mut self, msg: ReadResults, _ctx: &mut Context<Self>) -> Self::Result {
        if &msg.caller != self.creator() {
            return Err(TaskError::NotCreator);
        }
        match msg.wait_count {
            Some(want) if want > self.n_answers => {
                let (tx, rx) = oneshot::channel();
                if self.waiters.len() >= 64 && self.waiters.len().is_power_of_two() {
                    self.waiters.retain(|w| !w.tx.is_closed());
                }
                self.waiters.push(Waiter { want, tx });
                Ok(ReadOutcome::Waiting(rx))
            }
            _ => Ok(ReadOutcome::Ready(self.snapshot(&msg.caller))),
        }
    }
}

impl Handler<Subscribe> for TaskActor {
    type Result = Result<Vec<ResultEvent>, TaskError>;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) -> Self::Result {
        if &msg.caller != self.creator() {
            return Err(TaskError::NotCreator);
        }
        // Each replayed result carries the answer count as of its own update, so a stream
        // that ends after `wait_count` answers ends at the same place on every replay.
        let visible = self.visible(&msg.caller, 0);
        let mut n = 0;
        let mut events = Vec::new();
        for (seq, result) in visible {
            if self.counts(&result) {
                n += 1;
            }
            if seq > msg.last_seq {
                events.push(ResultEvent { seq, n_answers: n, result });
            }
        }
        self.streams.retain(|s| !s.is_closed());
        self.streams.push(msg.tx);
        Ok(events)
    }
}

impl Handler<Expire> for TaskActor {
    type Result = ();

    fn handle(&mut self, _: Expire, ctx: &mut Context<Self>) {
        for w in self.waiters.drain(..) {
            let _ = w.tx.send(WaitOutcome::Gone);
        }
        for s in self.streams.drain(..) {
            let _ = s.try_send(TaskEvent::Deleted);
        }
        tracing::debug!(task = %self.record.task.id, "task expired");
        ctx.stop();
    }
}
