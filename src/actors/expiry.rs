//! `ExpiryActor`: a deadline-ordered queue of tasks. It sleeps until the earliest deadline,
//! then takes each due task out of the registry and tells its actor to `Expire` (which wakes
//! its waiters with `410`, ends its streams with `deleted_task` and frees it). After sweeps
//! that freed many tasks it has the allocator give the memory back ([`release_free_memory`]).

use std::{cmp::Reverse, collections::BinaryHeap, sync::Arc, time::Duration};

use actix::prelude::*;
use tokio::time::Instant;
use uuid::Uuid;

use super::{task::Expire, Registry};
use crate::ops::{
    memory::{release_free_memory, TRIM_AFTER_TASKS, TRIM_DELAY, TRIM_EVERY},
    metrics::Total,
};

/// Track a task until `expires_at`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track {
    pub task_id: Uuid,
    pub expires_at: Instant,
}

pub struct ExpiryActor {
    registry: Arc<Registry>,
    queue: BinaryHeap<Reverse<(Instant, Uuid)>>,
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
    pub fn new(registry: Arc<Registry>, n_expired: Arc<Total>) -> Self {
        Self {
            registry,
            queue: BinaryHeap::new(),
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

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Senders wait (backpressure) while this many `Track`s are queued.
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Track> for ExpiryActor {
    type Result = ();

    fn handle(&mut self, msg: Track, ctx: &mut Context<Self>) {
        // Tasks due within the same millisecond share a wake-up.
        let at = msg.expires_at + Duration::from_millis(1);
        self.queue.push(Reverse((at, msg.task_id)));
        self.schedule(ctx);
    }
}
