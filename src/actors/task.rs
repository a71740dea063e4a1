//! `TaskActor`: one per task. Owns the task's results (one slot per worker) and its
//! subscribers — long-poll waiters and result streams — and tells them about every new or
//! replaced result at once, in order, each with the task's next sequence number.

use std::{
    collections::HashMap,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
};

use actix::prelude::*;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

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
    /// A handler panicked (a bug): the task was ended rather than the thread it shares with an
    /// HTTP worker and other tasks.
    #[error("the broker failed handling this task and ended it; its log says why")]
    Failed,
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

    /// Runs a handler's body. A panic in it is a bug, but it must not unwind into the arbiter:
    /// that thread is an HTTP worker's and hosts other tasks' actors, and actix-server would
    /// restart it without them. So the panic is logged, this task's actor stops (its waiters
    /// and streams end, it leaves the registry), and the caller gets [`TaskError::Failed`].
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        what: &'static str,
        body: impl FnOnce(&mut Self, &mut Context<Self>) -> Result<R, TaskError>,
    ) -> Result<R, TaskError> {
        match catch_unwind(AssertUnwindSafe(|| body(self, ctx))) {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(task = %self.record.task.id, message = what, "a task actor's handler panicked; the task is ended");
                ctx.stop();
                Err(TaskError::Failed)
            }
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

    fn handle(&mut self, PutResult(result): PutResult, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, "PutResult", |act, _| act.put(result))
    }
}

impl TaskActor {
    fn put(&mut self, result: WireResult) -> Result<PutOutcome, TaskError> {
        // The engine checked before sending, but the message may have waited in this actor's
        // queue past the expiry: a result accepted now would be deleted with the task at once.
        if self.record.expires_at <= Instant::now() {
            return Err(TaskError::Expired);
        }
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

    fn handle(&mut self, msg: ReadResults, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, "ReadResults", |act, _| act.read(msg))
    }
}

impl TaskActor {
    fn read(&mut self, msg: ReadResults) -> Result<ReadOutcome, TaskError> {
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

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, "Subscribe", |act, _| act.subscribe(msg))
    }
}

impl TaskActor {
    fn subscribe(&mut self, msg: Subscribe) -> Result<Vec<ResultEvent>, TaskError> {
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
        let _ = self.guarded(ctx, "Expire", |act, ctx| {
            for w in act.waiters.drain(..) {
                let _ = w.tx.send(WaitOutcome::Gone);
            }
            for s in act.streams.drain(..) {
                let _ = s.try_send(TaskEvent::Deleted);
            }
            tracing::debug!(task = %act.record.task.id, "task expired");
            ctx.stop();
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicU64, time::Duration};

    use serde_json::Value;
    use uuid::Uuid;

    use super::*;
    use crate::{
        actors::TaskHandle,
        wire::{broker::WireTask, FailureStrategy},
    };

    /// Only in tests: a handler with a bug.
    #[derive(Message)]
    #[rtype(result = "Result<(), TaskError>")]
    struct Panic;

    impl Handler<Panic> for TaskActor {
        type Result = Result<(), TaskError>;

        fn handle(&mut self, _: Panic, ctx: &mut Context<Self>) -> Self::Result {
            self.guarded(ctx, "Panic", |_, _| panic!("a bug in a handler"))
        }
    }

    fn app(name: &str) -> AppId {
        AppId::parse(name).unwrap()
    }

    /// A task actor started on the current arbiter, registered as the engine would.
    fn start(registry: &Arc<Registry>, mailboxes: &Arc<Mailboxes>) -> (Uuid, Addr<TaskActor>) {
        start_expiring(registry, mailboxes, Duration::from_secs(60))
    }

    fn start_expiring(registry: &Arc<Registry>, mailboxes: &Arc<Mailboxes>, ttl: Duration) -> (Uuid, Addr<TaskActor>) {
        let task = WireTask {
            id: Uuid::new_v4(),
            from: app("app1.proxy1.broker"),
            to: vec![app("app2.proxy2.broker")],
            ttl_ms: 60_000,
            failure_strategy: FailureStrategy::default(),
            metadata: Value::Null,
            body: serde_json::value::to_raw_value("sealed").unwrap().into(),
            detached: None,
        };
        let record = Arc::new(TaskRecord { task, expires_at: Instant::now() + ttl });
        let actor = TaskActor::new(record.clone(), registry.clone(), mailboxes.clone(), mailboxes.clone());
        let addr = actor.start();
        registry.insert(record.task.id, TaskHandle { record: record.clone(), addr: addr.clone() });
        (record.task.id, addr)
    }

    #[test]
    fn a_panicking_handler_ends_its_task_not_the_thread() {
        actix::System::new().block_on(async {
            let registry = Arc::new(Registry::new());
            let mailboxes = Arc::new(Mailboxes::new(Arc::new(AtomicU64::new(0))));
            let (broken, a) = start(&registry, &mailboxes);
            let (fine, b) = start(&registry, &mailboxes);
            let read = || ReadResults { caller: app("app1.proxy1.broker"), wait_count: None };

            assert_eq!(a.send(Panic).await.unwrap(), Err(TaskError::Failed));
            // That task's actor is gone, and so is its registry entry; the other task's actor,
            // on the same thread, still answers.
            assert!(a.send(read()).await.is_err());
            assert!(registry.get(&broken).is_none());
            assert!(matches!(b.send(read()).await.unwrap(), Ok(ReadOutcome::Ready(r)) if r.is_empty()));
            assert!(registry.get(&fine).is_some());
        });
    }

    /// A result that reaches the task's actor after the task expired (it waited in the queue
    /// while the expiry came) is refused, not stored and answered 201 just before the task goes.
    #[test]
    fn a_result_for_an_expired_task_is_refused() {
        actix::System::new().block_on(async {
            let registry = Arc::new(Registry::new());
            let mailboxes = Arc::new(Mailboxes::new(Arc::new(AtomicU64::new(0))));
            let (id, addr) = start_expiring(&registry, &mailboxes, Duration::from_millis(30));
            let result = WireResult {
                from: app("app2.proxy2.broker"),
                to: vec![app("app1.proxy1.broker")],
                task: id,
                status: WorkStatus::Succeeded,
                metadata: Value::Null,
                body: None,
                detached: None,
            };
            assert_eq!(addr.send(PutResult(result.clone())).await.unwrap(), Ok(PutOutcome::Created));
            tokio::time::sleep(Duration::from_millis(40)).await;
            assert_eq!(addr.send(PutResult(result)).await.unwrap(), Err(TaskError::Expired));
        });
    }
}
