//! Per-app mailboxes: for each app, the live tasks addressed to it (its inbox) or sent by it
//! (its outbox), in arrival order, with which of them are still to do, and who waits for more.
//!
//! A mailbox is a small struct behind its own mutex, looked up in a `DashMap`; critical
//! sections are a few map operations and never await, so there is no global lock and a listing
//! or wait touches only the caller's own mailbox.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::TaskRecord;
use crate::wire::AppId;

/// Which tasks of a mailbox a listing wants.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only tasks still to do for the mailbox's app.
    pub todo: bool,
    /// Only tasks from this creator.
    pub from: Option<AppId>,
    /// Only tasks addressed to this app.
    pub to: Option<AppId>,
}

/// A mailbox-side event for `new_task` streams.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub seq: u64,
    pub task: Arc<TaskRecord>,
}

/// The answer to a wait: the listing, now or once enough tasks are there.
pub enum ListWait {
    Ready(Vec<Arc<TaskRecord>>),
    Waiting(oneshot::Receiver<Vec<Arc<TaskRecord>>>),
}

struct Entry {
    task: Arc<TaskRecord>,
    todo: bool,
}

struct Waiter {
    filter: ListFilter,
    want: usize,
    tx: oneshot::Sender<Vec<Arc<TaskRecord>>>,
}

#[derive(Default)]
struct Mailbox {
    by_seq: BTreeMap<u64, Entry>,
    seq_of: HashMap<Uuid, u64>,
    n_todo: usize,
    waiters: Vec<Waiter>,
    /// `new_task` streams (todo tasks only). Bounded channels: a stream that falls behind by
    /// more than its capacity is dropped; its client resumes with `Last-Event-ID`.
    streams: Vec<mpsc::Sender<Delivered>>,
}

impl Mailbox {
    fn matches(entry: &Entry, f: &ListFilter) -> bool {
        (!f.todo || entry.todo)
            && f.from.as_ref().is_none_or(|from| &entry.task.task.from == from)
            && f.to.as_ref().is_none_or(|to| entry.task.task.to.contains(to))
    }

    fn count(&self, f: &ListFilter) -> usize {
        match f {
            ListFilter { todo: true, from: None, to: None } => self.n_todo,
            ListFilter { todo: false, from: None, to: None } => self.by_seq.len(),
            _ => self.by_seq.values().filter(|e| Self::matches(e, f)).count(),
        }
    }

    fn list(&self, f: &ListFilter) -> Vec<Arc<TaskRecord>> {
        self.by_seq.values().filter(|e| Self::matches(e, f)).map(|e| e.task.clone()).collect()
    }

    fn insert(&mut self, seq: u64, task: Arc<TaskRecord>) {
        let id = task.task.id;
        self.by_seq.insert(seq, Entry { task: task.clone(), todo: true });
        self.seq_of.insert(id, seq);
        self.n_todo += 1;
        self.streams.retain(|tx| tx.try_send(Delivered { seq, task: task.clone() }).is_ok());
        self.wake();
    }

    fn wake(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            if w.tx.is_closed() {
                continue;
            }
            if self.count(&w.filter) >= w.want {
                let _ = w.tx.send(self.list(&w.filter));
            } else {
                self.waiters.push(w);
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.by_seq.is_empty() && self.waiters.is_empty() && self.streams.iter().all(|s| s.is_closed())
    }
}

/// All mailboxes of one kind (inboxes or outboxes). Sequence numbers are unique across all
/// mailboxes and never reused, so a stream can resume after any restart of its mailbox.
pub struct Mailboxes {
    boxes: DashMap<AppId, Arc<Mutex<Mailbox>>>,
    next_seq: Arc<AtomicU64>,
}

impl Mailboxes {
    pub fn new(next_seq: Arc<AtomicU64>) -> Self {
        Self { boxes: DashMap::new(), next_seq }
    }

    // Lock order: a DashMap shard, then a mailbox. Both helpers hold the shard guard while the
    // mailbox is used, so `remove` can't drop a mailbox between lookup and use.

    fn with_or_make<R>(&self, app: &AppId, f: impl FnOnce(&mut Mailbox) -> R) -> R {
        if let Some(b) = self.boxes.get(app) {
            return f(&mut b.lock());
        }
        let b = self.boxes.entry(app.clone()).or_default();
        let mut guard = b.lock();
        f(&mut guard)
    }

    fn with<R>(&self, app: &AppId, f: impl FnOnce(&mut Mailbox) -> R) -> Option<R> {
        let b = self.boxes.get(app)?;
        let mut guard = b.lock();
        Some(f(&mut guard))
    }

    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Puts a new task into `app`'s mailbox, waking waiters and streams.
    pub fn deliver(&self, app: &AppId, task: Arc<TaskRecord>) {
        let seq = self.next_seq();
        self.with_or_make(app, |b| b.insert(seq, task));
    }

    /// The app has answered the task for good (`claimed`, `succeeded`, `permfailed`).
    pub fn settle(&self, app: &AppId, task_id: Uuid) {
        self.with(app, |b| {
            if let Some(seq) = b.seq_of.get(&task_id) {
                let entry = b.by_seq.get_mut(seq).expect("seq_of and by_seq agree");
                if entry.todo {
                    entry.todo = false;
                    b.n_todo -= 1;
                }
            }
        });
    }

    /// The task is to do again (`tempfailed`): it moves to the end with a new sequence number,
    /// so streams see it again.
    pub fn reopen(&self, app: &AppId, task_id: Uuid) {
        let seq = self.next_seq();
        self.with(app, |b| {
            let Some(old) = b.seq_of.get(&task_id).copied() else {
                return;
            };
            if b.by_seq[&old].todo {
                return;
            }
            let entry = b.by_seq.remove(&old).expect("seq_of and by_seq agree");
            b.insert(seq, entry.task);
        });
    }

    /// Forgets an expired task — only `record` itself, never a later task with the same id —
    /// and drops the mailbox once nothing is left in it.
    pub fn remove(&self, app: &AppId, record: &Arc<TaskRecord>) {
        let task_id = record.task.id;
        let idle = self.with(app, |b| {
            let Some(seq) = b.seq_of.get(&task_id).copied() else { return b.is_idle() };
            if !Arc::ptr_eq(&b.by_seq[&seq].task, record) {
                return b.is_idle();
            }
            b.seq_of.remove(&task_id);
            if b.by_seq.remove(&seq).is_some_and(|e| e.todo) {
                b.n_todo -= 1;
            }
            b.is_idle()
        });
        if idle == Some(true) {
            self.boxes.remove_if(app, |_, b| b.lock().is_idle());
        }
    }

    /// Lists at once, or registers a waiter that gets the listing once `want` tasks match.
    pub fn list_or_wait(&self, app: &AppId, filter: ListFilter, want: Option<usize>) -> ListWait {
        let Some(want) = want else {
            return ListWait::Ready(self.with(app, |b| b.list(&filter)).unwrap_or_default());
        };
        self.with_or_make(app, |b| {
            if b.count(&filter) >= want {
                return ListWait::Ready(b.list(&filter));
            }
            let (tx, rx) = oneshot::channel();
            // Waiters whose clients gave up are pruned whenever the list doubles.
            if b.waiters.len() >= 64 && b.waiters.len().is_power_of_two() {
                b.waiters.retain(|w| !w.tx.is_closed());
            }
            b.waiters.push(Waiter { filter, want, tx });
            ListWait::Waiting(rx)
        })
    }

    /// Subscribes a `new_task` stream: returns the to-do tasks after `last_seq` and registers
    /// `tx` for every later one, atomically, so nothing falls between.
    pub fn subscribe(&self, app: &AppId, last_seq: u64, tx: mpsc::Sender<Delivered>) -> Vec<Delivered> {
        self.with_or_make(app, |b| {
            let snapshot = b
                .by_seq
                .range(last_seq.saturating_add(1)..)
                .filter(|(_, e)| e.todo)
                .map(|(seq, e)| Delivered { seq: *seq, task: e.task.clone() })
                .collect();
            b.streams.retain(|s| !s.is_closed());
            b.streams.push(tx);
            snapshot
        })
    }

    /// Number of apps with a mailbox (for health and tests of memory release).
    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }
}
