//! Which cores a thread may run on. `crypto::bulk` hands half of a large body's work to a helper
//! thread so that both cores work on it; when Linux wakes that helper on the core of the thread
//! that woke it, the two take turns on one core while the other idles (in 122 of 280 seals of a
//! `large` run, docs/BENCHMARKS.md round 14). [`keep_off`] lets the helper run anywhere but there.

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

/// Lets thread `tid` of this process run on the cores this process may use, except `cpu`; if
/// `cpu` is the only one, on it. A hint to the scheduler, nothing more: whether it took is
/// returned, and a failure (another system, a thread gone) changes nothing.
pub fn keep_off(tid: i32, cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Some(mut allowed) = process_cpus() else { return false };
        // SAFETY: `cpu_set_t` is plain bits; the CPU_* helpers check `cpu` against its size.
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

/// The cores this process was allowed at its first call (the main thread's affinity: taskset,
/// a cgroup's cpuset).
#[cfg(target_os = "linux")]
fn process_cpus() -> Option<libc::cpu_set_t> {
    static CPUS: std::sync::OnceLock<Option<libc::cpu_set_t>> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        // SAFETY: a zeroed `cpu_set_t` is the empty set; `sched_getaffinity` fills at most its
        // size, for the process's main thread (its pid).
        #[allow(unsafe_code)]
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let pid = libc::getpid();
            (libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
        }
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A thread kept off a core is never seen on it, and may still run elsewhere.
    #[test]
    fn a_thread_kept_off_a_core_runs_elsewhere() {
        let Some(allowed) = process_cpus() else { return };
        // SAFETY: reading bits of a `cpu_set_t`.
        #[allow(unsafe_code)]
        let count = unsafe { libc::CPU_COUNT(&allowed) };
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
        if count >= 2 {
            // First on that core alone, so that only `keep_off` can take it elsewhere.
            // SAFETY: a zeroed `cpu_set_t` is the empty set; one bit is set in it.
            #[allow(unsafe_code)]
            unsafe {
                let mut only: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut only);
                assert_eq!(libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &only), 0);
            }
        }
        let took = keep_off(tid, cpu);
        set_tx.send(()).unwrap();
        let seen = seen.join().unwrap();
        if count < 2 {
            assert!(!took, "with one core there is nowhere else");
            return;
        }
        assert!(took);
        assert!(!seen.contains(&cpu), "ran on {cpu}: {seen:?}");
        assert!(!keep_off(tid, cpu), "a thread that has ended");
    }
}
