//! The objects apps exchange with their proxy (API.md "Objects"): plaintext bodies, any JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{AppId, DurationText, FailureStrategy, WorkStatus};

/// A task as an app submits it (`POST /v1/tasks`); the loadtest sends it, the proxy reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewTask {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    pub from: AppId,
    pub to: Vec<AppId>,
    /// Any JSON; Beam clients send a (double-encoded) string.
    #[serde(default)]
    pub body: Value,
    pub ttl: DurationText,
    #[serde(default)]
    pub failure_strategy: FailureStrategy,
    #[serde(default)]
    pub metadata: Value,
}

/// A task as a proxy hands it to an app; `ttl` is the remaining lifetime in whole seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub id: Uuid,
    pub from: AppId,
    pub to: Vec<AppId>,
    pub body: Value,
    pub ttl: String,
    pub failure_strategy: FailureStrategy,
    pub metadata: Value,
}

/// A result, in both directions. `body` may be omitted for `claimed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskResult {
    pub from: AppId,
    pub to: Vec<AppId>,
    pub task: Uuid,
    pub status: WorkStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    #[serde(default)]
    pub metadata: Value,
}
