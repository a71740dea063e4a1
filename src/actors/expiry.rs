//! `ExpiryActor`: a deadline-ordered queue of tasks. It sleeps until the earliest deadline,
//! then takes each due task out of the registry and tells its actor to `Expire` (which wakes
//! its waiters with `410`, ends its streams with `deleted_task` and frees it). After sweeps
//! that freed many tasks it has the allocator give the memory back ([`release_free_memory`]).
//!
//! New deadlines reach it through an [`Expiry`] handle in batches: a create appends to a shared
//! list, and only the create that finds the list empty wakes the actor's thread (`Drain`),
//! which takes the list in [`GATHER`] later. One message and wake-up per create cost the broker
//! about a tenth of its CPU under load; now it is at most two wake-ups per `GATHER`.

use std::{cmp::Reverse, collections::BinaryHeap, sync::Arc, time::Duration};

use actix::prelude::*;
use parking_lot::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use super::{task::Expire, Registry};
use crate::ops::{
    memory::{release_free_memory, TRIM_AFTER_TASKS, TRIM_DELAY, TRIM_EVERY},
    metrics::Total,
};

/// How long a `Drain` waits before taking the pending deadlines in, gathering the creates of
/// that time into one batch. A task can expire this much later than its deadline.
const GATHER: Duration = Duration::from_millis(10);

/// Deadlines handed to the actor and not yet taken in.
type Pending = Arc<Mutex<Vec<(Instant, Uuid)>>>;

/// Has the actor take the pending deadlines in, [`GATHER`] later. Sent by the [`Expiry::track`]
/// that found the list empty: the list is emptied only by that take-in, so whenever a deadline
/// is appended, a take-in that has not yet run is scheduled or on its way.
#[derive(Message)]
#[rtype(result = "()")]
struct Drain;

/// The engine's side of the expiry actor.
pub struct Expiry {
    pending: Pending,
    addr: Addr<ExpiryActor>,
}

impl Expiry {
    /// Starts the actor on the current arbiter.
    pub fn start(registry: Arc<Registry>, n_expired: Arc<Total>) -> Self {
        let pending = Pending::default();
        let addr = ExpiryActor::new(registry, n_expired, pending.clone()).start();
        Self { pending, addr }
    }

    /// Tracks a task until `expires_at`; false if the actor is gone (the System is stopping).
    pub fn track(&self, task_id: Uuid, expires_at: Instant) -> bool {
        if !self.addr.connected() {
            return false;
        }
        let first = {
            let mut pending = self.pending.lock();
            pending.push((expires_at, task_id));
            pending.len() == 1
        };
        if first {
            self.addr.do_send(Drain);
        }
        true
    }
}

pub struct ExpiryActor {
    registry: Arc<Registry>,
    queue: BinaryHeap<Reverse<(Instant, Uuid)>>,
    pending: Pending,
    /// Swapped with `pending` on each drain, so neither list allocates again.
    taken: Vec<(Instant, Uuid)>,
    /// A drain is scheduled.
    draining: bool,
    /// When the pending wake-up fires, and its handle.
    wakeup: Option<(Instant, SpawnHandle)>,
    /// Counts the tasks expired, for metrics.
    n_expired: Arc<Total>,
    /// Tasks expired since the last trim, and whether one is scheduled.
    untrimmed: u64,
    trim_pending: bool,
    last_trim: Option<Instant>,
}

impl ExpiryActor {
    fn new(registry: Arc<Registry>, n_expired: Arc<Total>, pending: Pending) -> Self {
        Self {
            registry,
            queue: BinaryHeap::new(),
            pending,
            taken: Vec::new(),
            draining: false,
            wakeup: None,
            n_expired,
            untrimmed: 0,
            trim_pending: false,
            last_trim: None,
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let Some(Reverse((next, _))) = self.queue.peek().copied() else {
            return;
        };
        if let Some((at, handle)) = self.wakeup {
            if at <= next {
                return;
            }
            ctx.cancel_future(handle);
        }
        let delay = next.saturating_duration_since(Instant::now());
        let handle = ctx.run_later(delay, |act, ctx| {
            act.wakeup = None;
            act.fire(ctx);
        });
        self.wakeup = Some((next, handle));
    }

    fn fire(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut n_expired = 0usize;
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            // Only the record this deadline was set for: a task made later with the same id
            // has its own entry in the queue.
            if let Some((_, handle)) = self.registry.remove_if(&id, |_, h| h.record.expires_at <= now) {
                handle.addr.do_send(Expire);
                n_expired += 1;
            }
        }
        if n_expired > 0 {
            self.n_expired.add(n_expired as u64);
            tracing::debug!(n_expired, queued = self.queue.len(), "tasks expired");
            self.untrimmed += n_expired as u64;
            self.schedule_trim(ctx);
        }
        self.schedule(ctx);
    }

    /// Once enough tasks expired: a trim `TRIM_DELAY` later (the last sweep's actors have
    /// freed their tasks by then), at most once per `TRIM_EVERY`, on a blocking thread.
    fn schedule_trim(&mut self, ctx: &mut Context<Self>) {
        if self.trim_pending || self.untrimmed < TRIM_AFTER_TASKS {
            return;
        }
        let since = self.last_trim.map_or(TRIM_EVERY, |t| t.elapsed());
        self.trim_pending = true;
        ctx.run_later(TRIM_DELAY.max(TRIM_EVERY.saturating_sub(since)), |act, _| {
            // Hash tables and heaps keep their peak capacity; after a burst that is most of
            // what remains.
            act.registry.shrink_to_fit();
            if act.queue.capacity() > 4 * act.queue.len() + 1024 {
                act.queue.shrink_to_fit();
            }
            act.trim_pending = false;
            act.untrimmed = 0;
            act.last_trim = Some(Instant::now());
            tokio::task::spawn_blocking(release_free_memory);
        });
    }
}

impl Actor for ExpiryActor {
    type Context = Context<Self>;
}

impl Handler<Drain> for ExpiryActor {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        self.draining = true;
        ctx.run_later(GATHER, |act, ctx| {
            act.draining = false;
            std::mem::swap(&mut *act.pending.lock(), &mut act.taken);
            // Tasks due within the same millisecond share a wake-up.
            let late = Duration::from_millis(1);
            act.queue.extend(act.taken.drain(..).map(|(at, id)| Reverse((at + late, id))));
            act.schedule(ctx);
        });
    }
}
