//! Turning app bodies into the envelopes that travel through the broker, and back.
//!
//! Today the envelope is `plain`; the end-to-end encryption issue replaces what is inside
//! without changing the callers or anything else on the wire.

use std::sync::Arc;

use photon::{
    http::ApiError,
    wire::{
        app::{Task, TaskResult},
        broker::{Envelope, WireResult, WireTask},
    },
};
use serde_json::{value::RawValue, Value};

/// Why an incoming envelope was refused (never handed to an app).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

pub fn seal(body: &Value) -> Result<Arc<RawValue>, ApiError> {
    let raw = serde_json::value::to_raw_value(&Envelope::Plain { data: body.clone() })
        .map_err(|e| ApiError::BadRequest(format!("cannot encode the body: {e}")))?;
    Ok(Arc::from(raw))
}

pub fn open(envelope: &RawValue) -> Result<Value, OpenError> {
    match serde_json::from_str::<Envelope>(envelope.get()).map_err(|e| OpenError::Malformed(e.to_string()))? {
        Envelope::Plain { data } => Ok(data),
    }
}

/// The task as the app sees it: body opened, `ttl` the whole seconds left.
pub fn open_task(task: WireTask) -> Result<Task, OpenError> {
    Ok(Task {
        body: open(&task.body)?,
        id: task.id,
        from: task.from,
        to: task.to,
        ttl: (task.ttl_ms / 1000).to_string(),
        failure_strategy: task.failure_strategy,
        metadata: task.metadata,
    })
}

pub fn open_result(result: &WireResult) -> Result<TaskResult, OpenError> {
    Ok(TaskResult {
        body: result.body.as_deref().map(open).transpose()?,
        from: result.from.clone(),
        to: result.to.clone(),
        task: result.task,
        status: result.status,
        metadata: result.metadata.clone(),
    })
}
