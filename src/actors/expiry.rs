//! `ExpiryActor`: a deadline-ordered queue of tasks. It sleeps until the earliest deadline,
//! then takes each due task out of the registry and tells its actor to `Expire` (which wakes
//! its waiters with `410`, ends its streams with `deleted_task` and frees it).

use std::{cmp::Reverse, collections::BinaryHeap, sync::Arc, time::Duration};

use actix::prelude::*;
use tokio::time::Instant;
use uuid::Uuid;

use super::{task::Expire, Registry};
use crate::ops::metrics::Total;

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
}

impl ExpiryActor {
    pub fn new(registry: Arc<Registry>, n_expired: Arc<Total>) -> Self {
        Self { registry, queue: BinaryHeap::new(), wakeup: None, n_expired }
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
        }
        self.schedule(ctx);
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
