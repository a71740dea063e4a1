//! Which cores a thread may run on. `crypto::bulk` hands half of a large body's work to a helper
//! thread so that both cores work on it; when Linux wakes that helper on the core of the thread
//! that woke it, the two take turns on one core while the other idles (in 122 of 280 seals of a
//! `large` run, docs/BENCHMARKS.md round 14). [`keep_off`] lets the helper run anywhere but there.
//! `unsafe` here is for `gettid`, `sched_getcpu`, `sched_getaffinity`, `sched_setaffinity`,
//! `getpid` and libc's `CPU_*` bit helpers.

/// The kernel's id of the calling thread, for [`keep_off`]; `None` elsewhere than Linux.
pub fn thread_id() -> Option<i32> {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` only returns the calling thread's id.
    #[allow(unsafe_code)]
    return Some(unsafe { libc::gettid() });
    #[cfg(not(target_os = "linux"))]
    None
}

/// The core the calling thread runs on at this moment (it may move at any time after).
pub fn current_cpu() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `sched_getcpu` only reads the calling thread's scheduling state.
        #[allow(unsafe_code)]
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).ok()
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Restricts thread `tid` (meant for this process's own) to the cores this process may use now,
/// except `cpu`: the thread may no longer run there at all, until its affinity is set again. Not
/// done, and `false`, when `cpu` is the only core or not among them, or on failure (another
/// system, a thread gone); the thread then stays as it was.
pub fn keep_off(tid: i32, cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Some(mut allowed) = cpus_of(0) else { return false };
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: `cpu_set_t` is plain bits and `cpu` is within it (checked above).
        #[allow(unsafe_code)]
        unsafe {
            if libc::CPU_COUNT(&allowed) < 2 || !libc::CPU_ISSET(cpu, &allowed) {
                return false;
            }
            libc::CPU_CLR(cpu, &mut allowed);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &allowed) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, cpu);
        false
    }
}

/// The cores thread `tid` may run on (`0`: the process's main thread, whose set is the
/// process's: taskset, a cgroup's cpuset).
#[cfg(target_os = "linux")]
fn cpus_of(tid: i32) -> Option<libc::cpu_set_t> {
    // SAFETY: a zeroed `cpu_set_t` is the empty set; `sched_getaffinity` fills at most its size.
    #[allow(unsafe_code)]
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let tid = if tid == 0 { libc::getpid() } else { tid };
        (libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
    }
}

/// For tests: whether thread `tid` may run on `cpu`, and `tid` put on `cpu` alone.
#[cfg(all(test, target_os = "linux"))]
pub(crate) mod testing {
    pub fn may_run_on(tid: i32, cpu: usize) -> bool {
        // SAFETY: reading one bit of a `cpu_set_t`; `cpu` is a core this machine reported.
        #[allow(unsafe_code)]
        super::cpus_of(tid).is_some_and(|set| unsafe { libc::CPU_ISSET(cpu, &set) })
    }

    pub fn pin(tid: i32, cpu: usize) {
        // SAFETY: a zeroed `cpu_set_t` is the empty set; one bit is set in it.
        #[allow(unsafe_code)]
        unsafe {
            let mut only: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut only);
            assert_eq!(libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &only), 0);
        }
    }

    /// How many cores this process may use.
    pub fn cores() -> usize {
        // SAFETY: counting the bits of a `cpu_set_t`.
        #[allow(unsafe_code)]
        super::cpus_of(0).map_or(1, |set| unsafe { libc::CPU_COUNT(&set) } as usize)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::{testing::*, *};

    /// A thread kept off a core is never seen on it, and may still run elsewhere.
    #[test]
    fn a_thread_kept_off_a_core_runs_elsewhere() {
        let cpu = current_cpu().expect("Linux knows");
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (set_tx, set_rx) = std::sync::mpsc::channel::<()>();
        let seen = std::thread::spawn(move || {
            tid_tx.send(thread_id().expect("Linux")).unwrap();
            set_rx.recv().unwrap();
            (0..200)
                .map(|_| {
                    std::thread::yield_now();
                    current_cpu().unwrap()
                })
                .collect::<Vec<_>>()
        });
        let tid = tid_rx.recv().unwrap();
        if cores() >= 2 {
            // First on that core alone, so that only `keep_off` can take it elsewhere.
            pin(tid, cpu);
        }
        let took = keep_off(tid, cpu);
        set_tx.send(()).unwrap();
        let seen = seen.join().unwrap();
        if cores() < 2 {
            assert!(!took, "with one core there is nowhere else");
            return;
        }
        assert!(took);
        assert!(!seen.contains(&cpu), "ran on {cpu}: {seen:?}");
    }
}
