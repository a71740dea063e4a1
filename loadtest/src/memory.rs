//! Memory of the network's processes, sampled during a run from `/proc/<pid>/status`
//! (Linux): the resident set (`VmRSS`) over time, and its peak. The kernel's own high-water mark
//! (`VmHWM`) is reported too; it counts from the process's start, not the run's.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// How often the sampler reads each process.
pub const EVERY: Duration = Duration::from_millis(100);

/// `(VmRSS, VmHWM)` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// `(VmRSS, VmHWM)` in KiB of a live process; `None` when it is gone or not on Linux.
pub fn read(pid: u32) -> Option<(u64, u64)> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// One process's memory during a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Memory {
    pub pid: u32,
    /// Resident set at the start and the end of the run, and its largest sample.
    pub start_kib: u64,
    pub end_kib: u64,
    pub peak_kib: u64,
    /// The kernel's high-water mark at the end (since the process started).
    pub hwm_kib: u64,
    /// `(seconds since the start, KiB)`, one sample per [`EVERY`] at first; halved whenever it
    /// reaches [`MAX_POINTS`], so a long soak stays a few hundred points.
    pub series: Vec<(f64, u64)>,
}

/// A process being sampled: what is kept, and how many samples make one point of its series.
#[derive(Debug, Default)]
struct Sampled {
    memory: Memory,
    stride: usize,
    skipped: usize,
}

/// The most points a memory series keeps.
pub const MAX_POINTS: usize = 600;

/// Samples a set of processes every [`EVERY`] until dropped or finished.
pub struct Sampler {
    started: Instant,
    state: Arc<Mutex<BTreeMap<String, Sampled>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub fn start(pids: &[(String, u32)]) -> Self {
        let started = Instant::now();
        let state: Arc<Mutex<BTreeMap<String, Sampled>>> =
            Arc::new(Mutex::new(pids.iter().map(|(name, pid)| (name.clone(), Sampled::of(*pid))).collect()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                sample(&shared, started);
            }
        });
        Self { started, state, task }
    }

    /// The latest resident set of `name`, read now.
    pub fn now_kib(&self, name: &str) -> Option<u64> {
        let pid = self.state.lock().get(name)?.memory.pid;
        read(pid).map(|(rss, _)| rss)
    }

    /// `(name, resident KiB)` of every process still running, read now.
    pub fn now_all(&self) -> Vec<(String, u64)> {
        let pids: Vec<_> = self.state.lock().iter().map(|(n, s)| (n.clone(), s.memory.pid)).collect();
        pids.into_iter().filter_map(|(n, pid)| Some((n, read(pid)?.0))).collect()
    }

    /// Stops sampling after one last sample; what was sampled.
    pub fn finish(&self) -> BTreeMap<String, Memory> {
        self.task.abort();
        sample(&self.state, self.started);
        self.state.lock().iter().map(|(n, s)| (n.clone(), s.memory.clone())).collect()
    }
}

impl Sampled {
    fn of(pid: u32) -> Self {
        Self { memory: Memory { pid, ..Memory::default() }, stride: 1, skipped: 0 }
    }
}

fn sample(state: &Mutex<BTreeMap<String, Sampled>>, started: Instant) {
    let t = started.elapsed().as_secs_f64();
    for s in state.lock().values_mut() {
        let m = &mut s.memory;
        let Some((rss, hwm)) = read(m.pid) else { continue };
        if m.series.is_empty() {
            m.start_kib = rss;
        }
        s.skipped += 1;
        if s.skipped >= s.stride {
            s.skipped = 0;
            m.series.push(((t * 10.0).round() / 10.0, rss));
            if m.series.len() >= MAX_POINTS {
                m.series = m.series.iter().step_by(2).copied().collect();
                s.stride *= 2;
            }
        }
        m.end_kib = rss;
        m.peak_kib = m.peak_kib.max(rss);
        m.hwm_kib = hwm;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let status = "Name:\tphoton-broker\nVmPeak:\t  200000 kB\nVmHWM:\t   18432 kB\nVmRSS:\t   16384 kB\n";
        assert_eq!(parse_status(status), Some((16_384, 18_432)));
        assert_eq!(parse_status("Name: x\nVmRSS: 12 kB\n"), None);
        assert_eq!(parse_status("VmRSS: lots kB\nVmHWM: 1 kB\n"), None);
    }

    #[tokio::test]
    async fn samples_this_process() {
        let me = std::process::id();
        let sampler = Sampler::start(&[("me".into(), me), ("gone".into(), u32::MAX)]);
        tokio::time::sleep(EVERY * 3).await;
        assert!(sampler.now_kib("me").unwrap() > 0);
        let mem = sampler.finish();
        let m = &mem["me"];
        assert!(m.series.len() >= 2, "{m:?}");
        assert!(m.start_kib > 0 && m.peak_kib >= m.start_kib && m.hwm_kib >= m.peak_kib, "{m:?}");
        assert!(mem["gone"].series.is_empty());
    }

    #[test]
    fn long_series_are_thinned() {
        let state = Mutex::new(BTreeMap::from([("me".to_string(), Sampled::of(std::process::id()))]));
        let started = Instant::now();
        for _ in 0..5 * MAX_POINTS {
            sample(&state, started);
        }
        let m = &state.lock()["me"].memory;
        assert!(m.series.len() < MAX_POINTS && m.series.len() > MAX_POINTS / 4, "{}", m.series.len());
        assert!(m.series.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}
