//! What a run measures: every operation's latency (an HDR histogram in microseconds, 3
//! significant digits, up to an hour), errors by status, and successes per second of the run
//! (throughput over time), and figures particular to a scenario. [`Summary`] is the JSON line a
//! run ends with; the report reads it back.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::memory::Memory;

/// Shared by every client of a run.
pub struct Recorder {
    started: Mutex<Instant>,
    /// Where the measured time ends, when not at the summary (see [`Recorder::stop_at`]).
    stopped: Mutex<Option<Instant>>,
    /// Latencies and successes per whole second since the start, under one lock: `ok` is the
    /// hot path (up to ~50,000 calls a second in `sse`).
    successes: Mutex<(Histogram<u64>, Vec<u64>)>,
    errors: Mutex<BTreeMap<String, u64>>,
    ok: AtomicU64,
    failed: AtomicU64,
    figures: Mutex<BTreeMap<String, serde_json::Value>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            started: Mutex::new(Instant::now()),
            stopped: Mutex::new(None),
            successes: Mutex::new((Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"), Vec::new())),
            errors: Mutex::default(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            figures: Mutex::default(),
        }
    }

    /// One operation that succeeded after `latency`.
    pub fn ok(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        let second = self.elapsed().as_secs() as usize;
        let mut guard = self.successes.lock();
        let (latency_us, per_second) = &mut *guard;
        latency_us.record(us).expect("clamped into the histogram's range");
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += 1;
        drop(guard);
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    /// One operation that failed: `what` is the HTTP status (`"503"`) or the kind of failure
    /// (`"connect"`, `"timeout"`, `"lost"`).
    pub fn error(&self, what: impl Into<String>) {
        *self.errors.lock().entry(what.into()).or_default() += 1;
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` failures of one kind at once (errors of a set-up phase kept apart from the run's).
    pub fn errors_of(&self, what: &str, n: u64) {
        *self.errors.lock().entry(what.to_owned()).or_default() += n;
        self.failed.fetch_add(n, Ordering::Relaxed);
    }

    /// Failures so far, by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().clone()
    }

    /// A figure particular to the scenario, e.g. `events_lost` or `woken_max_ms`.
    pub fn figure(&self, name: &str, value: impl Into<serde_json::Value>) {
        self.figures.lock().insert(name.to_owned(), value.into());
    }

    pub fn n_ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn n_failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        let started = *self.started.lock();
        match *self.stopped.lock() {
            Some(stopped) => stopped.saturating_duration_since(started),
            None => started.elapsed(),
        }
    }

    /// Starts the clock again, for scenarios with a set-up that is not part of the measurement
    /// (opening streams, registering waiters). Call it before the first operation is recorded.
    pub fn restart(&self) {
        *self.started.lock() = Instant::now();
        *self.stopped.lock() = None;
    }

    /// Ends the measured time at `at`, for a scenario whose last part is waiting rather than
    /// working (making sure nothing more arrives): throughput counts the time the work took.
    pub fn stop_at(&self, at: Instant) {
        *self.stopped.lock() = Some(at);
    }

    /// The run's summary so far.
    pub fn summary(&self, scenario: &str, params: serde_json::Value) -> Summary {
        let elapsed = self.elapsed().as_secs_f64();
        let successes = self.successes.lock();
        let (h, per_second) = &*successes;
        let ms = |us: u64| us as f64 / 1e3;
        let latency = (!h.is_empty()).then(|| Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1e3,
        });
        let distribution = if h.is_empty() {
            Vec::new()
        } else {
            DISTRIBUTION.iter().map(|&p| (p, ms(h.value_at_quantile(p / 100.0)))).collect()
        };
        let ok = self.n_ok();
        Summary {
            scenario: scenario.to_owned(),
            params,
            ok,
            errors: self.errors.lock().clone(),
            elapsed_s: elapsed,
            per_s: if elapsed > 0.0 { ok as f64 / elapsed } else { 0.0 },
            latency_ms: latency,
            per_second: per_second.clone(),
            distribution,
            figures: self.figures.lock().clone(),
            memory: BTreeMap::new(),
        }
    }
}

/// The percentiles of the latency distribution a summary keeps (and the report draws).
const DISTRIBUTION: [f64; 16] =
    [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 99.9999, 100.0];

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// A run's result, written as one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: String,
    /// The scenario's parameters (clients, count, body size …).
    pub params: serde_json::Value,
    /// Operations that succeeded.
    pub ok: u64,
    /// Failed operations by status or kind.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Successes per second over the whole run.
    pub per_s: f64,
    /// `None` when nothing succeeded.
    pub latency_ms: Option<Latency>,
    /// Successes in each second of the run.
    pub per_second: Vec<u64>,
    /// `(percentile, ms)` from 0 to 100.
    #[serde(default)]
    pub distribution: Vec<(f64, f64)>,
    /// Figures particular to the scenario.
    #[serde(default)]
    pub figures: BTreeMap<String, serde_json::Value>,
    /// Each sampled process's memory, by name (`broker`, `proxy1.broker`, …).
    #[serde(default)]
    pub memory: BTreeMap<String, Memory>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let r = Recorder::new();
        // 1..=1000 ms, once each: p50 = 500 ms, p99 = 990 ms, max = 1000 ms (3 significant digits).
        for ms in 1..=1000u64 {
            r.ok(Duration::from_millis(ms));
        }
        r.error("503");
        r.error("503");
        r.error("timeout");
        let s = r.summary("unit", serde_json::json!({}));
        let l = s.latency_ms.unwrap();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(close(l.p50, 500.0), "{l:?}");
        assert!(close(l.p90, 900.0), "{l:?}");
        assert!(close(l.p99, 990.0), "{l:?}");
        assert!(close(l.p999, 999.0), "{l:?}");
        assert!(close(l.max, 1000.0), "{l:?}");
        assert!(close(l.mean, 500.5), "{l:?}");
        assert_eq!(s.ok, 1000);
        assert_eq!(s.errors, BTreeMap::from([("503".to_string(), 2), ("timeout".to_string(), 1)]));
        assert_eq!(s.per_second.iter().sum::<u64>(), 1000);
        let median = s.distribution.iter().find(|(p, _)| *p == 50.0).unwrap().1;
        assert!(close(median, 500.0) && s.distribution.last().unwrap().0 == 100.0, "{:?}", s.distribution);
        assert!(s.distribution.windows(2).all(|w| w[0].1 <= w[1].1), "monotonic");
    }

    #[test]
    fn sub_millisecond_and_huge_latencies_are_kept() {
        let r = Recorder::new();
        r.ok(Duration::from_micros(250));
        r.ok(Duration::from_nanos(10)); // below the histogram's floor: counted as 1 µs
        r.ok(Duration::from_secs(7200)); // above its ceiling: counted as one hour
        let l = r.summary("unit", serde_json::json!({})).latency_ms.unwrap();
        assert!(l.p50 > 0.2 && l.p50 < 0.3, "{l:?}");
        assert!((l.max - 3_600_000.0).abs() < 3_600.0, "{l:?}");
    }

    #[test]
    fn an_empty_run_has_no_latency() {
        let s = Recorder::new().summary("unit", serde_json::json!({"clients": 1}));
        assert!(s.latency_ms.is_none());
        let line = serde_json::to_string(&s).unwrap();
        assert!(line.contains(r#""latency_ms":null"#) && line.contains(r#""clients":1"#), "{line}");
    }
}
