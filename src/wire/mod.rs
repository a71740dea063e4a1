//! The JSON shapes of API.md (what apps send and receive) and of the proxy↔broker protocol.
//! serde only: no I/O, no state. One definition of each message serves broker, proxy and tests.

pub mod app;
pub mod broker;
pub mod duration;
pub mod ids;

use serde::{Deserialize, Serialize};

pub use duration::{parse_duration, DurationError, DurationText};
pub use ids::{may_sign_for, AppId, IdError, ProxyId};

/// How many bytes a message's body takes as JSON, so that writing the message can size its
/// buffer once instead of copying a large body again each time the buffer grows.
pub trait BodySize {
    fn body_size(&self) -> usize;
}

impl BodySize for broker::WireTask {
    fn body_size(&self) -> usize {
        self.body.get().len()
    }
}

impl BodySize for broker::WireResult {
    fn body_size(&self) -> usize {
        self.body.as_ref().map_or(0, |b| b.get().len())
    }
}

/// An app body kept as its JSON text: its length.
impl BodySize for app::RawBody {
    fn body_size(&self) -> usize {
        self.get().len()
    }
}

/// An app body as a tree: unknown without writing it (the buffer grows as it is written).
impl BodySize for serde_json::Value {
    fn body_size(&self) -> usize {
        0
    }
}

impl<B: BodySize + ?Sized> BodySize for &B {
    fn body_size(&self) -> usize {
        (**self).body_size()
    }
}

impl<B: BodySize> BodySize for app::NewTask<B> {
    fn body_size(&self) -> usize {
        self.body.body_size()
    }
}

impl<B: BodySize> BodySize for app::Task<B> {
    fn body_size(&self) -> usize {
        self.body.body_size()
    }
}

impl<B: BodySize> BodySize for app::TaskResult<B> {
    fn body_size(&self) -> usize {
        self.body.as_ref().map_or(0, B::body_size)
    }
}

impl<T: BodySize> BodySize for std::sync::Arc<T> {
    fn body_size(&self) -> usize {
        (**self).body_size()
    }
}

impl<T: BodySize> BodySize for [T] {
    fn body_size(&self) -> usize {
        self.iter().map(|m| m.body_size() + MESSAGE_OVERHEAD).sum()
    }
}

impl<T: BodySize> BodySize for Vec<T> {
    fn body_size(&self) -> usize {
        self.as_slice().body_size()
    }
}

/// Room for a message's fields besides its body (ids, recipients, metadata) when sizing a buffer.
pub const MESSAGE_OVERHEAD: usize = 1024;

/// A message as JSON in a buffer sized for it up front (see [`BodySize`]).
pub fn to_json<T: Serialize + BodySize + ?Sized>(message: &T) -> bytes::Bytes {
    let mut out = Vec::with_capacity(message.body_size() + MESSAGE_OVERHEAD);
    serde_json::to_writer(&mut out, message).expect("messages serialize");
    bytes::Bytes::from(out)
}

/// Every error answer except `424`: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Advisory retry policy, stored and returned unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureStrategy {
    #[default]
    Discard,
    Retry {
        backoff_millisecs: u64,
        max_tries: u32,
    },
}

/// A worker's state for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkStatus {
    Claimed,
    Tempfailed,
    Permfailed,
    Succeeded,
}

impl WorkStatus {
    /// Counts towards `wait_count` (everything but `claimed`).
    pub fn is_answer(self) -> bool {
        self != Self::Claimed
    }

    /// Takes the task off the worker's `filter=todo` list (everything but `tempfailed`).
    pub fn settles(self) -> bool {
        self != Self::Tempfailed
    }
}

/// The query of every read endpoint: listing filters (`from`, `to`, `filter=todo`), long-poll
/// parameters (`wait_count`, `wait_time`), the stream resume point (`last_event_id`) and, between
/// proxy and broker, `stream=1` for a stream of events. One flat struct: serde's `flatten`
/// can't parse numbers from query strings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AppId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AppId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u8>,
}

impl ReadQuery {
    /// `filter=todo` (any other filter value is refused by the caller).
    pub fn todo(&self) -> bool {
        self.filter.as_deref() == Some("todo")
    }
}
