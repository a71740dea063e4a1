//! `Engine`: the broker's task store as the HTTP layer sees it. Each method is one step: look
//! the task up, send its actor one message (or touch one mailbox), map the answer. Callers are
//! already authenticated; `caller` is the app a proxy acts for.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::prelude::*;
use dashmap::DashMap;
use tokio::{
    sync::{mpsc, oneshot},
    time::{timeout_at, Instant},
};
use uuid::Uuid;

use super::{
    expiry::Expiry,
    mailbox::{Delivered, ListFilter, ListWait, Mailboxes},
    task::{
        self, PutOutcome, ReadOutcome, ReadResults, ResultEvent, Subscribe, TaskActor, TaskError, TaskEvent,
        WaitOutcome,
    },
    Registry, TaskHandle, TaskRecord,
};
use crate::{
    ops::{metrics::Total, Shutdown},
    wire::{
        broker::{WireResult, WireTask},
        AppId,
    },
};

/// Configured bounds the engine enforces.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    pub broker_id: String,
    pub max_ttl: Duration,
    pub max_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such task, or not visible to the caller")]
    NotFound,
    #[error("a task with id {0} exists and has not expired; use another id")]
    Conflict(Uuid),
    #[error("the task expired while waiting")]
    Gone,
    #[error("the broker is shutting down or overloaded; retry")]
    Unavailable,
    #[error("{0}")]
    Internal(String),
}

impl From<TaskError> for EngineError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::NotRecipient(_) | TaskError::NotCreator => Self::Forbidden(e.to_string()),
            TaskError::Expired => Self::NotFound,
            TaskError::Failed => Self::Internal(e.to_string()),
        }
    }
}

/// The long-poll parameters after parsing: wait for `count` items and/or for `time`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    pub count: Option<usize>,
    pub time: Option<Duration>,
}

impl Wait {
    pub fn is_none(&self) -> bool {
        self.count.is_none() && self.time.is_none()
    }

    /// How many items end the wait early: `count`, or never (time-only waits run their time).
    fn want(&self) -> usize {
        self.count.unwrap_or(usize::MAX)
    }

    fn deadline(&self, max_wait: Duration) -> Instant {
        Instant::now() + self.time.unwrap_or(max_wait).min(max_wait)
    }
}

/// A listing and whether it is short of what a waiter asked for (`206`).
pub struct Listing<T> {
    pub items: Vec<T>,
    pub partial: bool,
}

pub struct Engine {
    limits: EngineLimits,
    registry: Arc<Registry>,
    inboxes: Arc<Mailboxes>,
    outboxes: Arc<Mailboxes>,
    /// Get-by-id waiters for tasks that don't exist yet, woken by `create`.
    id_waiters: DashMap<Uuid, Vec<oneshot::Sender<()>>>,
    expiry: Expiry,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    /// Raised on shutdown: every wait ends at once, answering with what it has.
    shutdown: Shutdown,
    /// Tasks that reached their TTL (for metrics).
    pub n_expired: Arc<Total>,
}

/// Waits for `rx` until `deadline` or until shutdown begins, whichever is first; `None` when it
/// did not come in time (the caller then answers with what there is).
async fn wait_for<T>(
    shutdown: &Shutdown,
    deadline: Instant,
    rx: impl std::future::Future<Output = Result<T, oneshot::error::RecvError>>,
) -> Option<Result<T, oneshot::error::RecvError>> {
    tokio::select! {
        got = timeout_at(deadline, rx) => got.ok(),
        _ = shutdown.started() => None,
    }
}

/// A wait for a task id to be created. However it ends (the task came, the time ran out, or
/// the request was dropped because its client went away) it leaves no closed sender behind in
/// `id_waiters`: a wait for an id that never comes would otherwise stay there for good.
struct IdWait<'a> {
    waiters: &'a DashMap<Uuid, Vec<oneshot::Sender<()>>>,
    id: Uuid,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for IdWait<'_> {
    fn drop(&mut self) {
        drop(self.rx.take()); // closes this wait's sender
        self.waiters.remove_if_mut(&self.id, |_, v| {
            v.retain(|tx| !tx.is_closed());
            v.is_empty()
        });
    }
}

impl Engine {
    /// Starts the expiry actor and `n_arbiters` arbiter threads for task actors. Must run
    /// inside an actix `System`.
    pub fn start(limits: EngineLimits, n_arbiters: usize, shutdown: Shutdown) -> Self {
        let registry = Arc::new(Registry::new());
        let seq = Arc::new(AtomicU64::new(0));
        let n_expired = Arc::new(Total::default());
        let expiry = Expiry::start(registry.clone(), n_expired.clone());
        let arbiters = (0..n_arbiters.max(1))
            .map(|_| {
                let arbiter = Arbiter::new();
                let handle = arbiter.handle();
                // The arbiter thread lives as long as the System; dropping `Arbiter` does not stop it.
                drop(arbiter);
                handle
            })
            .collect();
        Self {
            limits,
            registry,
            inboxes: Arc::new(Mailboxes::new(seq.clone())),
            outboxes: Arc::new(Mailboxes::new(seq)),
            id_waiters: DashMap::new(),
            expiry,
            arbiters,
            next_arbiter: AtomicUsize::new(0),
            shutdown,
            n_expired,
        }
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// Live tasks (for health and tests of memory release).
    pub fn n_tasks(&self) -> usize {
        self.registry.len()
    }

    /// Apps with a non-empty or watched inbox or outbox.
    pub fn n_mailboxes(&self) -> usize {
        self.inboxes.len() + self.outboxes.len()
    }

    fn handle(&self, id: Uuid) -> Result<TaskHandle, EngineError> {
        let handle = self.registry.get(&id).map(|h| h.clone()).ok_or(EngineError::NotFound)?;
        if handle.record.expires_at <= Instant::now() {
            return Err(EngineError::NotFound);
        }
        Ok(handle)
    }

    fn check_member(&self, app: &AppId) -> Result<(), EngineError> {
        app.within(&self.limits.broker_id).map_err(|e| EngineError::BadRequest(e.to_string()))
    }

    /// Stores a new task from `caller`. Checks ids, TTL and that `from` is the caller.
    pub async fn create(&self, caller: &AppId, mut task: WireTask) -> Result<Uuid, EngineError> {
        if &task.from != caller {
            return Err(EngineError::Forbidden(format!("from is {}, but the caller is {caller}", task.from)));
        }
        self.check_member(&task.from)?;
        if task.to.is_empty() {
            return Err(EngineError::BadRequest("to must name at least one recipient".into()));
        }
        let mut seen = std::collections::HashSet::new();
        task.to.retain(|app| seen.insert(app.clone()));
        for app in &task.to {
            self.check_member(app)?;
        }
        let ttl = Duration::from_millis(task.ttl_ms);
        if ttl.is_zero() || ttl > self.limits.max_ttl {
            return Err(EngineError::BadRequest(format!(
                "ttl must be more than 0 and at most {} s",
                self.limits.max_ttl.as_secs()
            )));
        }
        let id = task.id;
        let record = Arc::new(TaskRecord { task, expires_at: Instant::now() + ttl });

        match self.registry.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().record.expires_at > Instant::now() {
                    return Err(EngineError::Conflict(id));
                }
                // Expired but not swept yet: end it now and take its place.
                e.get().addr.do_send(task::Expire);
                e.insert(self.spawn(record.clone()));
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(self.spawn(record.clone()));
            }
        }
        for app in &record.task.to {
            self.inboxes.deliver(app, record.clone());
        }
        self.outboxes.deliver(&record.task.from, record.clone());
        // Not awaited: the expiry actor runs on another thread, and a round trip to it on every
        // create costs two thread wake-ups. It only stops with the System.
        if !self.expiry.track(id, record.expires_at) {
            return Err(EngineError::Unavailable);
        }
        if let Some((_, waiters)) = self.id_waiters.remove(&id) {
            for tx in waiters {
                let _ = tx.send(());
            }
        }
        tracing::debug!(task = %id, from = %record.task.from, n_to = record.task.to.len(), "task created");
        Ok(id)
    }

    /// Starts the task's actor on the arbiter of the thread creating it (an HTTP worker's), so
    /// that the requests that worker serves reach the actor without waking another thread;
    /// outside any arbiter, on the engine's own ones in turn. (A panic does not take the
    /// worker, and so these actors, down: `ops::requests::observe` answers a request handler's
    /// with 500, and `TaskActor::guarded` ends only the task whose handler panicked.)
    fn spawn(&self, record: Arc<TaskRecord>) -> TaskHandle {
        let (registry, inboxes, outboxes) = (self.registry.clone(), self.inboxes.clone(), self.outboxes.clone());
        let actor_record = record.clone();
        let actor = move |_: &mut Context<TaskActor>| TaskActor::new(actor_record, registry, inboxes, outboxes);
        let addr = if Arbiter::try_current().is_some() {
            TaskActor::create(actor)
        } else {
            let i = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
            TaskActor::start_in_arbiter(&self.arbiters[i], actor)
        };
        TaskHandle { record, addr }
    }

    /// One task, if the caller created it or is among its recipients; with a wait, waits for
    /// it to be created.
    pub async fn get(&self, caller: &AppId, id: Uuid, wait: Wait) -> Result<WireTask, EngineError> {
        let visible = |h: TaskHandle| {
            if h.record.visible_to(caller) {
                Ok(h.record.to_wire(Instant::now()))
            } else {
                Err(EngineError::NotFound)
            }
        };
        if let Ok(h) = self.handle(id) {
            return visible(h);
        }
        if wait.is_none() {
            return Err(EngineError::NotFound);
        }
        let (tx, rx) = oneshot::channel();
        self.id_waiters.entry(id).or_default().push(tx);
        let mut waiting = IdWait { waiters: &self.id_waiters, id, rx: Some(rx) };
        // Created between the first look and registering the waiter?
        if let Ok(h) = self.handle(id) {
            return visible(h);
        }
        let rx = waiting.rx.as_mut().expect("set above");
        wait_for(&self.shutdown, wait.deadline(self.limits.max_wait), rx).await;
        drop(waiting);
        visible(self.handle(id)?)
    }

    /// Stores a worker's result.
    pub async fn put_result(&self, caller: &AppId, result: WireResult) -> Result<PutOutcome, EngineError> {
        if &result.from != caller {
            return Err(EngineError::Forbidden(format!("from is {}, but the caller is {caller}", result.from)));
        }
        for app in &result.to {
            self.check_member(app)?;
        }
        let handle = self.handle(result.task)?;
        Ok(handle.addr.send(task::PutResult(result)).await.map_err(|_| EngineError::NotFound)??)
    }

    /// The results of a task for its creator, at once or after a wait.
    pub async fn read_results(
        &self,
        caller: &AppId,
        id: Uuid,
        wait: Wait,
    ) -> Result<Listing<Arc<WireResult>>, EngineError> {
        let handle = self.handle(id)?;
        let read = |want| ReadResults { caller: caller.clone(), wait_count: want };
        let want = (!wait.is_none()).then(|| wait.want());
        let results = match handle.addr.send(read(want)).await.map_err(|_| EngineError::NotFound)?? {
            ReadOutcome::Ready(results) => results,
            ReadOutcome::Waiting(rx) => match wait_for(&self.shutdown, wait.deadline(self.limits.max_wait), rx).await {
                Some(Ok(WaitOutcome::Ready(results))) => results,
                Some(Ok(WaitOutcome::Gone)) | Some(Err(_)) => return Err(EngineError::Gone),
                None => match handle.addr.send(read(None)).await {
                    Ok(Ok(ReadOutcome::Ready(results))) => results,
                    Ok(Err(e)) => return Err(e.into()),
                    Ok(Ok(ReadOutcome::Waiting(_))) | Err(_) => return Err(EngineError::Gone),
                },
            },
        };
        let n_answers = results.iter().filter(|r| r.status.is_answer()).count();
        Ok(Listing { partial: wait.count.is_some_and(|c| n_answers < c), items: results })
    }

    /// Starts a result stream for the task's creator.
    pub async fn subscribe_results(
        &self,
        caller: &AppId,
        id: Uuid,
        last_seq: u64,
    ) -> Result<(Vec<ResultEvent>, mpsc::Receiver<TaskEvent>), EngineError> {
        let handle = self.handle(id)?;
        let (tx, rx) = mpsc::channel(task::STREAM_CAPACITY);
        let snapshot = handle
            .addr
            .send(Subscribe { caller: caller.clone(), last_seq, tx })
            .await
            .map_err(|_| EngineError::NotFound)??;
        Ok((snapshot, rx))
    }

    fn mailbox_for(&self, filter: &ListFilter) -> &Mailboxes {
        if filter.todo || filter.to.is_some() {
            &self.inboxes
        } else {
            &self.outboxes
        }
    }

    /// `GET /v1/tasks`: the caller's inbox (with `to` or `todo`) or outbox (with `from`),
    /// at once or after a wait. `from`/`to`, when given, are the caller (checked by the caller).
    pub async fn list(&self, caller: &AppId, filter: ListFilter, wait: Wait) -> Result<Listing<WireTask>, EngineError> {
        let mailbox = self.mailbox_for(&filter);
        let own = ListFilter {
            todo: filter.todo,
            // The caller's inbox holds only tasks to the caller, its outbox only tasks from it.
            from: if filter.todo || filter.to.is_some() { filter.from.clone() } else { None },
            to: None,
        };
        let want = (!wait.is_none()).then(|| wait.want());
        let records = match mailbox.list_or_wait(caller, own.clone(), want) {
            ListWait::Ready(list) => list,
            ListWait::Waiting(rx) => match wait_for(&self.shutdown, wait.deadline(self.limits.max_wait), rx).await {
                Some(Ok(list)) => list,
                _ => match mailbox.list_or_wait(caller, own, None) {
                    ListWait::Ready(list) => list,
                    ListWait::Waiting(_) => unreachable!("no wait asked"),
                },
            },
        };
        let now = Instant::now();
        let items: Vec<WireTask> = records.iter().filter(|r| r.expires_at > now).map(|r| r.to_wire(now)).collect();
        Ok(Listing { partial: wait.count.is_some_and(|c| items.len() < c), items })
    }

    /// Starts a `new_task` stream of the caller's to-do tasks after `last_seq`.
    pub fn subscribe_tasks(&self, caller: &AppId, last_seq: u64) -> (Vec<Delivered>, mpsc::Receiver<Delivered>) {
        let (tx, rx) = mpsc::channel(task::STREAM_CAPACITY);
        let snapshot = self.inboxes.subscribe(caller, last_seq, tx);
        (snapshot, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that gives up on a wait for a task id (its request is dropped) leaves nothing
    /// behind, nor does one whose wait runs out.
    #[actix_web::test]
    async fn waits_for_a_task_id_leave_nothing_behind() {
        let limits = EngineLimits {
            broker_id: "broker".into(),
            max_ttl: Duration::from_secs(60),
            max_wait: Duration::from_secs(3600),
        };
        let (_raise, shutdown) = Shutdown::new();
        let engine = Engine::start(limits, 1, shutdown);
        let app = AppId::parse("app1.proxy1.broker").unwrap();
        let long = Wait { count: None, time: Some(Duration::from_secs(3600)) };
        for _ in 0..3 {
            let dropped = tokio::time::timeout(Duration::from_millis(20), engine.get(&app, Uuid::new_v4(), long)).await;
            assert!(dropped.is_err(), "no such task: the wait is still on when its request is dropped");
        }
        let short = Wait { count: None, time: Some(Duration::from_millis(10)) };
        assert!(matches!(engine.get(&app, Uuid::new_v4(), short).await, Err(EngineError::NotFound)));
        assert_eq!(engine.id_waiters.len(), 0);
    }
}
