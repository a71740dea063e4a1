//! The objects apps exchange with their proxy (API.md "Objects"): plaintext bodies, any JSON.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{value::RawValue, Value};
use uuid::Uuid;

use super::{AppId, DurationText, FailureStrategy, WorkStatus};

/// What an app body is held as: any JSON. Apps and tools that look inside use [`Value`] (the
/// default); the proxy, which only seals and opens bodies, keeps them as [`RawBody`].
pub trait Body: Serialize + DeserializeOwned {
    /// The body of a task sent without one: `null`.
    fn absent() -> Self;
}

impl Body for Value {
    fn absent() -> Self {
        Value::Null
    }
}

/// A body as the JSON text it arrived as: checked, but never parsed into a tree nor escaped
/// again on its way through, which is most of the work for a large body.
pub type RawBody = Box<RawValue>;

impl Body for RawBody {
    fn absent() -> Self {
        RawValue::from_string("null".into()).expect("null is JSON")
    }
}

/// `raw` without line breaks: JSON allows them only as whitespace between tokens, and an event
/// stream's `data:` line must not hold one. Each becomes a space, which keeps the text's value
/// exactly (numbers too, whatever their size); bodies without any are kept as they are.
pub fn single_line(raw: RawBody) -> RawBody {
    if memchr::memchr2(b'\n', b'\r', raw.get().as_bytes()).is_none() {
        return raw;
    }
    let mut text = raw.get().as_bytes().to_vec();
    for b in &mut text {
        if matches!(*b, b'\n' | b'\r') {
            *b = b' ';
        }
    }
    // ASCII for ASCII keeps the text UTF-8 and the JSON valid; `raw` stays as it was otherwise.
    String::from_utf8(text).ok().and_then(|t| RawValue::from_string(t).ok()).unwrap_or(raw)
}

/// A task as an app submits it (`POST /v1/tasks`); the loadtest sends it, the proxy reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "B: Serialize", deserialize = "B: Body"))]
pub struct NewTask<B = Value> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    pub from: AppId,
    pub to: Vec<AppId>,
    /// Any JSON; Beam clients send a (double-encoded) string.
    #[serde(default = "Body::absent")]
    pub body: B,
    pub ttl: DurationText,
    #[serde(default)]
    pub failure_strategy: FailureStrategy,
    #[serde(default)]
    pub metadata: Value,
}

/// A task as a proxy hands it to an app; `ttl` is the remaining lifetime in whole seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(bound(serialize = "B: Serialize", deserialize = "B: Body"))]
pub struct Task<B = Value> {
    pub id: Uuid,
    pub from: AppId,
    pub to: Vec<AppId>,
    pub body: B,
    pub ttl: String,
    pub failure_strategy: FailureStrategy,
    pub metadata: Value,
}

/// A result, in both directions. `body` may be omitted for `claimed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(bound(serialize = "B: Serialize", deserialize = "B: Body"))]
pub struct TaskResult<B = Value> {
    pub from: AppId,
    pub to: Vec<AppId>,
    pub task: Uuid,
    pub status: WorkStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<B>,
    #[serde(default)]
    pub metadata: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_keeps_the_value_and_the_digits() {
        let raw = |t: &str| RawValue::from_string(t.to_owned()).unwrap();
        let pretty = raw("{\r\n  \"n\": 1e400,\n  \"s\": \"a\\nb\",\n  \"big\": 123456789012345678901234567890\n}");
        let one = single_line(pretty);
        assert_eq!(one.get(), "{    \"n\": 1e400,   \"s\": \"a\\nb\",   \"big\": 123456789012345678901234567890 }");
        assert_eq!(single_line(raw("[1,2]")).get(), "[1,2]");
    }
}
