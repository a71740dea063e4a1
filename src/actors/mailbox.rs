//! Per-app mailboxes: for each app, the live tasks addressed to it (its inbox) or sent by it
//! (its outbox), in arrival order, with which of them are still to do, and who waits for more.
//!
//! A mailbox is a small struct behind its own mutex, looked up in a `DashMap`; critical
//! sections are a few map operations and never await, so there is no global lock and a listing
//! or wait touches only the caller's own mailbox.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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

struct Waiter {
    filter: ListFilter,
    want: usize,
    tx: oneshot::Sender<Vec<Arc<TaskRecord>>>,
}

#[derive(Default)]
struct Mailbox {
    by_seq: BTreeMap<u64, Arc<TaskRecord>>,
    seq_of: HashMap<Uuid, u64>,
    /// The sequence numbers of the tasks still to do, so that a to-do listing or count costs
    /// what is to do, not every answered task that has yet to expire.
    todo: BTreeSet<u64>,
    waiters: Vec<Waiter>,
    /// `new_task` streams (todo tasks only). Bounded channels: a stream that falls behind by
    /// more than its capacity is dropped; its client resumes with `Last-Event-ID`.
    streams: Vec<mpsc::Sender<Delivered>>,
}

impl Mailbox {
    /// The tasks `f` asks for, in order: from the to-do set when it wants those only.
    fn matching<'a>(&'a self, f: &'a ListFilter) -> Box<dyn Iterator<Item = &'a Arc<TaskRecord>> + 'a> {
        let wanted = |task: &&Arc<TaskRecord>| {
            f.from.as_ref().is_none_or(|from| &task.task.from == from)
                && f.to.as_ref().is_none_or(|to| task.task.to.contains(to))
        };
        if f.todo {
            Box::new(self.todo.iter().map(|seq| &self.by_seq[seq]).filter(wanted))
        } else {
            Box::new(self.by_seq.values().filter(wanted))
        }
    }

    fn count(&self, f: &ListFilter) -> usize {
        match f {
            ListFilter { todo: true, from: None, to: None } => self.todo.len(),
            ListFilter { todo: false, from: None, to: None } => self.by_seq.len(),
            _ => self.matching(f).count(),
        }
    }

    fn list(&self, f: &ListFilter) -> Vec<Arc<TaskRecord>> {
        self.matching(f).cloned().collect()
    }

    fn insert(&mut self, seq: u64, task: Arc<TaskRecord>) {
        let id = task.task.id;
        self.by_seq.insert(seq, task.clone());
        if let Some(old) = self.seq_of.insert(id, seq) {
            // A task created again under the id of an expired one not yet swept: the old record
            // goes now. Its actor's `remove` will find the new record under the id and leave it
            // alone, so nothing else would take the old one out. (A reopened task's old entry
            // is gone already.)
            self.by_seq.remove(&old);
            self.todo.remove(&old);
        }
        self.todo.insert(seq);
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
        // A waiter whose client gave up (its wait timed out) is pruned only on the next wake-up,
        // which an empty mailbox may never have.
        self.by_seq.is_empty()
            && self.waiters.iter().all(|w| w.tx.is_closed())
            && self.streams.iter().all(|s| s.is_closed())
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

    // A task's sequence number is drawn under its mailbox's lock, so that a mailbox's streams
    // receive their tasks in sequence order: a stream that resumes after the last id it got
    // must not skip one that was numbered before it but delivered after.

    /// Puts a new task into `app`'s mailbox, waking waiters and streams.
    pub fn deliver(&self, app: &AppId, task: Arc<TaskRecord>) {
        self.with_or_make(app, |b| b.insert(self.next_seq(), task));
    }

    /// The app has answered the task for good (`claimed`, `succeeded`, `permfailed`).
    pub fn settle(&self, app: &AppId, task_id: Uuid) {
        self.with(app, |b| {
            if let Some(seq) = b.seq_of.get(&task_id).copied() {
                b.todo.remove(&seq);
            }
        });
    }

    /// The task is to do again (`tempfailed`): it moves to the end with a new sequence number,
    /// so streams see it again.
    pub fn reopen(&self, app: &AppId, task_id: Uuid) {
        self.with(app, |b| {
            let Some(old) = b.seq_of.get(&task_id).copied() else {
                return;
            };
            if b.todo.contains(&old) {
                return;
            }
            let task = b.by_seq.remove(&old).expect("seq_of and by_seq agree");
            b.insert(self.next_seq(), task);
        });
    }

    /// Forgets an expired task — only `record` itself, never a later task with the same id —
    /// and drops the mailbox once nothing is left in it.
    pub fn remove(&self, app: &AppId, record: &Arc<TaskRecord>) {
        let task_id = record.task.id;
        let idle = self.with(app, |b| {
            let Some(seq) = b.seq_of.get(&task_id).copied() else { return b.is_idle() };
            if !Arc::ptr_eq(&b.by_seq[&seq], record) {
                return b.is_idle();
            }
            b.seq_of.remove(&task_id);
            b.by_seq.remove(&seq);
            b.todo.remove(&seq);
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
                .todo
                .range(last_seq.saturating_add(1)..)
                .map(|seq| Delivered { seq: *seq, task: b.by_seq[seq].clone() })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{broker::WireTask, FailureStrategy};

    fn record(to: &AppId) -> Arc<TaskRecord> {
        let task = WireTask {
            id: Uuid::new_v4(),
            from: AppId::parse("app1.proxy1.broker").unwrap(),
            to: vec![to.clone()],
            ttl_ms: 60_000,
            failure_strategy: FailureStrategy::Discard,
            metadata: serde_json::Value::Null,
            body: Arc::new(serde_json::value::to_raw_value("x").unwrap()),
            detached: None,
        };
        Arc::new(TaskRecord { task, expires_at: tokio::time::Instant::now() + std::time::Duration::from_secs(60) })
    }

    fn ids<'a>(tasks: impl IntoIterator<Item = &'a Arc<TaskRecord>>) -> Vec<Uuid> {
        tasks.into_iter().map(|t| t.task.id).collect()
    }

    fn listed(boxes: &Mailboxes, app: &AppId, filter: ListFilter) -> Vec<Uuid> {
        match boxes.list_or_wait(app, filter, None) {
            ListWait::Ready(tasks) => ids(&tasks),
            ListWait::Waiting(_) => unreachable!("no wait asked"),
        }
    }

    /// The to-do set follows settle, reopen and remove; listings keep arrival order.
    #[test]
    fn todo_follows_answers() {
        let boxes = Mailboxes::new(Arc::new(AtomicU64::new(0)));
        let app = AppId::parse("app2.proxy2.broker").unwrap();
        let (a, b, c) = (record(&app), record(&app), record(&app));
        for t in [&a, &b, &c] {
            boxes.deliver(&app, t.clone());
        }
        let todo = || listed(&boxes, &app, ListFilter { todo: true, ..ListFilter::default() });
        let all = || listed(&boxes, &app, ListFilter::default());
        assert_eq!(todo(), ids([&a, &b, &c]));

        boxes.settle(&app, a.task.id);
        boxes.settle(&app, c.task.id);
        assert_eq!(todo(), ids([&b]));
        assert_eq!(all(), ids([&a, &b, &c]), "answered tasks stay listed until they expire");
        // A to-do count that is short makes a waiter; one more to-do task wakes it.
        let ListWait::Waiting(mut waiter) =
            boxes.list_or_wait(&app, ListFilter { todo: true, ..ListFilter::default() }, Some(2))
        else {
            panic!("one task is to do, two were wanted")
        };
        // tempfailed: `a` is to do again, after `b`, with a new sequence number.
        boxes.reopen(&app, a.task.id);
        assert_eq!(ids(&waiter.try_recv().unwrap()), ids([&b, &a]));
        assert_eq!(todo(), ids([&b, &a]));
        assert_eq!(all(), ids([&b, &c, &a]));
        // Reopening a task that is still to do changes nothing.
        boxes.reopen(&app, b.task.id);
        assert_eq!(todo(), ids([&b, &a]));

        // A stream resuming after `b` gets the to-do tasks after it only.
        let (tx, _rx) = mpsc::channel(4);
        let b_seq = boxes.subscribe(&app, 0, tx.clone())[0].seq;
        let after_b: Vec<Uuid> = boxes.subscribe(&app, b_seq, tx).iter().map(|d| d.task.task.id).collect();
        assert_eq!(after_b, ids([&a]));

        for t in [&a, &b, &c] {
            boxes.remove(&app, t);
        }
        assert!(todo().is_empty() && all().is_empty());
    }

    /// A task created again under the id of an expired one that was not swept yet replaces it
    /// in the mailbox; the old record's late removal leaves the new one, and nothing stays.
    #[test]
    fn a_task_recreated_under_an_expired_ones_id_replaces_it() {
        let boxes = Mailboxes::new(Arc::new(AtomicU64::new(0)));
        let app = AppId::parse("app2.proxy2.broker").unwrap();
        let old = record(&app);
        let again = Arc::new(TaskRecord {
            task: old.task.clone(),
            expires_at: old.expires_at + std::time::Duration::from_secs(1),
        });
        boxes.deliver(&app, old.clone());
        boxes.deliver(&app, again.clone());
        let todo = ListFilter { todo: true, ..ListFilter::default() };
        let ListWait::Ready(listed) = boxes.list_or_wait(&app, todo.clone(), None) else { unreachable!() };
        assert!(listed.len() == 1 && Arc::ptr_eq(&listed[0], &again), "only the new record is listed");
        boxes.remove(&app, &old);
        assert_eq!(listed_count(&boxes, &app, todo.clone()), 1, "the old record's removal leaves the new one");
        boxes.remove(&app, &again);
        assert_eq!(listed_count(&boxes, &app, todo), 0);
        assert!(boxes.is_empty(), "the mailbox is gone");
    }

    fn listed_count(boxes: &Mailboxes, app: &AppId, filter: ListFilter) -> usize {
        listed(boxes, app, filter).len()
    }

    /// A mailbox whose only waiter timed out (its client gone) is dropped once its last task
    /// expires.
    #[test]
    fn a_gone_waiter_does_not_keep_a_mailbox() {
        let boxes = Mailboxes::new(Arc::new(AtomicU64::new(0)));
        let app = AppId::parse("app2.proxy2.broker").unwrap();
        let task = record(&app);
        boxes.deliver(&app, task.clone());
        let ListWait::Waiting(waiter) =
            boxes.list_or_wait(&app, ListFilter { todo: true, ..ListFilter::default() }, Some(2))
        else {
            panic!("one task, two wanted")
        };
        drop(waiter);
        boxes.remove(&app, &task);
        assert!(boxes.is_empty());
    }

    /// Tasks delivered from several threads at once reach a stream in sequence order, so a
    /// client resuming after the last id it got misses none.
    #[test]
    fn a_stream_gets_its_tasks_in_sequence_order_under_concurrent_deliveries() {
        const PER_THREAD: usize = 20_000;
        let boxes = Arc::new(Mailboxes::new(Arc::new(AtomicU64::new(0))));
        let app = AppId::parse("app2.proxy2.broker").unwrap();
        let (tx, mut rx) = mpsc::channel(4 * PER_THREAD);
        assert!(boxes.subscribe(&app, 0, tx).is_empty());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (boxes, app) = (boxes.clone(), app.clone());
                std::thread::spawn(move || (0..PER_THREAD).for_each(|_| boxes.deliver(&app, record(&app))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let mut seqs = Vec::new();
        while let Ok(d) = rx.try_recv() {
            seqs.push(d.seq);
        }
        assert_eq!(seqs.len(), 4 * PER_THREAD, "the stream kept up");
        let out_of_order = seqs.windows(2).filter(|w| w[0] > w[1]).count();
        assert_eq!(out_of_order, 0, "{out_of_order} tasks arrived after a later-numbered one");
    }
}
