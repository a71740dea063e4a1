//! The broker's engine. One [`TaskActor`](task::TaskActor) per task owns its results and
//! subscribers; the [`ExpiryActor`](expiry::ExpiryActor) ends tasks at their deadline;
//! per-app [`Mailboxes`](mailbox::Mailboxes) index who a task is for and who sent it, so
//! listings and waits never scan all tasks. [`Engine`](engine::Engine) is the one facade the
//! HTTP layer calls.

pub mod engine;
pub mod expiry;
pub mod mailbox;
pub mod task;

use std::sync::Arc;

use tokio::time::Instant;

use dashmap::DashMap;
use uuid::Uuid;

pub use engine::{Engine, EngineError, EngineLimits};

use crate::wire::{broker::WireTask, AppId};

/// A task as the broker keeps it: immutable once created (results live in its actor).
#[derive(Debug)]
pub struct TaskRecord {
    /// As the creating proxy sent it (`ttl_ms` is the requested lifetime).
    pub task: WireTask,
    pub expires_at: Instant,
}

impl TaskRecord {
    /// The task as handed out now: `ttl_ms` is what is left of its life.
    pub fn to_wire(&self, now: Instant) -> WireTask {
        let mut task = self.task.clone();
        task.ttl_ms = self.expires_at.saturating_duration_since(now).as_millis() as u64;
        task
    }

    /// Creator or recipient.
    pub fn visible_to(&self, app: &AppId) -> bool {
        &self.task.from == app || self.task.to.contains(app)
    }
}

/// Registry entry of a live task.
#[derive(Clone)]
pub struct TaskHandle {
    pub record: Arc<TaskRecord>,
    pub addr: actix::Addr<task::TaskActor>,
}

/// Task id → live task. Entries are removed by the expiry actor (and by the task actor when it
/// stops), only ever for the same record they were made for.
pub type Registry = DashMap<Uuid, TaskHandle>;
