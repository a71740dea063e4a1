//! What operators see and do, shared by broker and proxy: StatsD [`metrics`], one log line per
//! request ([`requests`]), graceful [`shutdown`], the log format ([`init_tracing`]), and giving
//! freed memory back to the system ([`memory`]), and keeping a helper thread off its caller's core
//! ([`cpu`]).

pub mod cpu;
pub mod memory;
pub mod metrics;
pub mod requests;
pub mod shutdown;

use std::time::{SystemTime, UNIX_EPOCH};

pub use metrics::{Level, Metrics, StatsdConfig};
pub use shutdown::{Shutdown, Stopper};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Sets up tracing from `RUST_LOG` (default `info`) in the given format, to stdout. Safe to
/// call more than once (later calls do nothing).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// A wall-clock time as RFC 3339 (`2026-11-22T10:00:00.123Z`), for operators' eyes.
pub fn rfc3339(t: SystemTime) -> String {
    let nanos = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
