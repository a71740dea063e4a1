//! Giving freed memory back to the system. glibc's allocator keeps what a burst of tasks freed
//! in its arenas (measured: 50,000 expired tasks left the broker at 54 MiB resident instead of
//! 9 MiB, and `malloc_trim` brought it to 17 MiB), so a broker that had a busy hour would look
//! as large for ever. After a sweep frees many tasks, the expiry actor asks for a trim; and the
//! broker runs with small per-thread caches ([`small_thread_caches`]), whose chunks a trim
//! can't return.

use std::{
    ffi::{OsStr, OsString},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

/// A trim is asked for once at least this many tasks expired since the last one…
pub const TRIM_AFTER_TASKS: u64 = 256;
/// …this long after the sweep (their actors free them asynchronously)…
pub const TRIM_DELAY: Duration = Duration::from_millis(200);
/// …and at most this often.
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Returns free heap memory to the system (glibc's `malloc_trim`). It walks every arena, so it
/// belongs on a blocking thread; elsewhere than Linux/glibc it does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free pages of glibc's own heaps; it takes the arena
    // locks itself, touches no memory the program owns, and is safe to call from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Buffers at least this large are worth a thread's wake-up to back with pages ahead of use
/// ([`upload_buffer`]): a 1 MiB upload took the broker 256 page faults, a quarter of its CPU in
/// a `large` round trip (perf, docs/BENCHMARKS.md round 14).
pub const PREFAULT_MIN: usize = 256 * 1024;

/// A buffer of `len` bytes' capacity for a detached upload the broker is about to read, with its
/// pages made, or being made, ahead of the bytes (while the caller holds the [`Prefault`]):
/// - the spare one, if there is one of about this size (at most 1/16 larger): made on a blocking
///   thread after the upload before, while the broker had other things to do, so that none of
///   its pages is faulted in by the reading thread, which is the chain a lone large message
///   waits on (in the 1 MiB round trip about a fifth of the broker's reading thread went to
///   those faults with the pages made only beside it; docs/BENCHMARKS.md, round 16);
/// - else a new buffer whose pages a blocking thread makes while the caller fills it from the
///   front.
///
/// Once the caller drops the `Prefault` (its upload read, or refused), a spare is made for an
/// upload of the same size, unless one that fits is there or being made. Spares count against
/// [`PREFAULT_BUDGET`] like the buffers being filled, and one left unused for [`SPARE_IDLE`] is
/// freed: an idle broker holds none. A stored upload keeps its buffer's slack (at most 1/16 of
/// its size). Below [`PREFAULT_MIN`], without a tokio runtime, elsewhere than Linux or once the
/// kernel has refused `MADV_POPULATE_WRITE`: a plain buffer.
pub fn upload_buffer(len: usize) -> (bytes::BytesMut, Option<Prefault>) {
    static UPLOADS: Spares = Spares::new(&UPLOAD_PAGES, SPARE_IDLE);
    UPLOADS.buffer(len)
}

/// How long an unused spare upload buffer is kept.
pub const SPARE_IDLE: Duration = Duration::from_secs(10);

/// The pages made ahead for uploads: the buffers being filled and the spare.
static UPLOAD_PAGES: Budget = Budget::new(PREFAULT_BUDGET);

/// The spare of [`upload_buffer`]: at most one, made for the size of the last upload.
struct Spares {
    budget: &'static Budget,
    idle: Duration,
    slot: Mutex<Slot>,
    made: AtomicU64,
}

/// The spare, and whether one is being made: one lock for both, so a spare seen there is never
/// still counted as being made.
struct Slot {
    spare: Option<Spare>,
    making: bool,
}

struct Spare {
    buf: bytes::BytesMut,
    share: Arc<Share>,
    /// Which spare this is (counted from 1), for its idle timer.
    number: u64,
}

/// Whether a spare of `capacity` bytes is the buffer for an upload of `len`: large enough, and
/// not so much larger that the slack a stored upload keeps matters.
fn fits(capacity: usize, len: usize) -> bool {
    capacity >= len && capacity - len <= len / 16
}

/// The capacity of a spare made after an upload of `len` bytes: room for the next one to be a
/// little larger (its JSON differs), in whole pages.
fn spare_capacity(len: usize) -> usize {
    (len + len / 64).next_multiple_of(4096)
}

impl Spares {
    const fn new(budget: &'static Budget, idle: Duration) -> Self {
        Self { budget, idle, slot: Mutex::new(Slot { spare: None, making: false }), made: AtomicU64::new(0) }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn buffer(&'static self, len: usize) -> (bytes::BytesMut, Option<Prefault>) {
        if len < PREFAULT_MIN {
            return (bytes::BytesMut::with_capacity(len), None);
        }
        let taken = self.slot().spare.take_if(|s| fits(s.buf.capacity(), len));
        let (buf, pages) = match taken {
            Some(spare) => (spare.buf, Some(Prefault { share: spare.share, task: None, then: None })),
            None => {
                let mut buf = bytes::BytesMut::with_capacity(len);
                let pages = prefault_within(&mut buf, self.budget);
                (buf, pages)
            }
        };
        let pages = pages.map(|mut p| {
            p.then = Some((self, len));
            p
        });
        (buf, pages)
    }

    /// Makes a spare for an upload of `len` bytes on a blocking thread, unless one that fits is
    /// there or one is being made, the budget is spent, or there is no runtime.
    fn make(&'static self, len: usize) {
        if POPULATE_REFUSED.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut slot = self.slot();
            if slot.making || slot.spare.as_ref().is_some_and(|s| fits(s.buf.capacity(), len)) {
                return;
            }
            slot.making = true;
        }
        let capacity = spare_capacity(len);
        let runtime = tokio::runtime::Handle::try_current();
        let Some(runtime) = runtime.ok().filter(|_| self.budget.take(capacity)) else {
            self.slot().making = false;
            return;
        };
        let share = Arc::new(Share { budget: self.budget, len: capacity, done_with: AtomicBool::new(false) });
        runtime.clone().spawn_blocking(move || {
            let buf = bytes::BytesMut::with_capacity(capacity);
            if !populate_write(buf.as_ptr() as usize, buf.capacity(), &share.done_with) {
                POPULATE_REFUSED.store(true, Ordering::Relaxed);
                self.slot().making = false;
                return;
            }
            let number = self.made.fetch_add(1, Ordering::AcqRel) + 1;
            let replaced = {
                let mut slot = self.slot();
                slot.making = false;
                slot.spare.replace(Spare { buf, share, number })
            };
            drop(replaced);
            runtime.spawn(async move {
                tokio::time::sleep(self.idle).await;
                let idle = self.slot().spare.take_if(|s| s.number == number);
                // Freed where glibc can give it back: a buffer of about 1 MiB may come from a
                // heap rather than its own mapping, and would stay resident there.
                if let Some(idle) = idle {
                    tokio::task::spawn_blocking(move || {
                        drop(idle);
                        release_free_memory();
                    });
                }
            });
        });
    }

    /// Bytes of the spare, if there is one.
    #[cfg(test)]
    fn spare_bytes(&self) -> Option<usize> {
        self.slot().spare.as_ref().map(|s| s.buf.capacity())
    }
}

/// [`prefault_within`] the uploads' budget.
#[cfg(test)]
fn prefault_beside(buf: &mut bytes::BytesMut) -> Option<Prefault> {
    prefault_within(buf, &UPLOAD_PAGES)
}

/// The most memory [`upload_buffer`] makes ahead of the bytes, over all the buffers still being
/// filled and the spare: sixteen of the broker's largest uploads (16 MiB), or 256 of 1 MiB. (A broker set up
/// for uploads larger than this gets their pages as their bytes come.)
pub const PREFAULT_BUDGET: usize = 256 << 20;

/// Bytes of buffers whose pages are made ahead, out of a limit.
struct Budget {
    limit: usize,
    held: AtomicUsize,
}

impl Budget {
    const fn new(limit: usize) -> Self {
        Self { limit, held: AtomicUsize::new(0) }
    }

    /// Takes `len` bytes if they are left.
    fn take(&self, len: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(len).filter(|after| *after <= self.limit)
            })
            .is_ok()
    }
}

/// A buffer's pages being made ahead of use. Its share of the budget is given back once both
/// this is dropped and the task making the pages is done; dropping it also stops that task at
/// its next step (a buffer given up, or filled, needs no more pages made).
pub struct Prefault {
    share: Arc<Share>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Where to make a spare for the next upload of this size, once this one is done.
    then: Option<(&'static Spares, usize)>,
}

/// One buffer's part of the budget, held by its [`Prefault`] and by the task.
struct Share {
    budget: &'static Budget,
    len: usize,
    /// Set when the [`Prefault`] is dropped.
    done_with: AtomicBool,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.len, Ordering::AcqRel);
    }
}

impl Prefault {
    /// Waits until the pages are made (for tests; nothing else needs to).
    pub async fn made(mut self) {
        if let Some(task) = self.task.take() {
            task.await.expect("the populating task does not panic");
        }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.share.done_with.store(true, Ordering::Release);
        if let Some((spares, len)) = self.then {
            spares.make(len);
        }
    }
}

/// Backs `buf`'s capacity with memory now, on a blocking thread, while the caller fills it:
/// `madvise(MADV_POPULATE_WRITE)` makes 64 KiB of pages per call, where writing into fresh
/// memory takes one page fault per page. So a large upload's pages are made on the idle core
/// instead of in the reading thread; between calls the task yields, so that a reader waiting for
/// the same core gets it (in one call it had kept the reader off its core for 0.6 ms; in steps
/// the 1 MiB round trip measured 20.9 against 20.0 ms). A page the caller reaches first is
/// faulted there; the kernel never changes a page's contents, so the two may race freely.
///
/// The whole capacity becomes resident at once, not as bytes arrive, so the buffers being
/// filled share a budget ([`PREFAULT_BUDGET`] for uploads): the caller holds the returned [`Prefault`] until its buffer
/// is filled or given up, and a buffer that finds the budget spent gets its pages as its bytes
/// come, like any other. However many uploads trickle in, or stall until they time out, what
/// they hold beyond the bytes they sent is at most the budget. Does nothing below
/// [`PREFAULT_MIN`], without a tokio runtime, elsewhere than Linux, or once the kernel has
/// refused the call (before 5.14).
fn prefault_within(buf: &mut bytes::BytesMut, budget: &'static Budget) -> Option<Prefault> {
    let len = buf.capacity();
    if !cfg!(target_os = "linux")
        || len < PREFAULT_MIN
        || POPULATE_REFUSED.load(Ordering::Relaxed)
        || tokio::runtime::Handle::try_current().is_err()
        || !budget.take(len)
    {
        return None;
    }
    let share = Arc::new(Share { budget, len, done_with: AtomicBool::new(false) });
    // An empty view of the same allocation: it keeps the memory allocated until the task is
    // done, even if the caller drops `buf` (a refused upload) or moves past it.
    let keep = buf.split_to(0);
    let at = buf.as_ptr() as usize;
    let task = tokio::task::spawn_blocking({
        let share = share.clone();
        move || {
            if !populate_write(at, len, &share.done_with) && !POPULATE_REFUSED.swap(true, Ordering::Relaxed) {
                tracing::debug!("MADV_POPULATE_WRITE refused (a kernel before 5.14?): uploads fault their pages in");
            }
            drop(keep);
        }
    });
    Some(Prefault { share, task: Some(task), then: None })
}

/// Set once the kernel refused `MADV_POPULATE_WRITE`: it will again.
static POPULATE_REFUSED: AtomicBool = AtomicBool::new(false);

/// Pages made per `madvise` call: about 35 µs of work here, after which the thread lets a
/// waiting one run.
const POPULATE_STEP: usize = 64 * 1024;

/// The size of a page.
#[cfg(target_os = "linux")]
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: `sysconf` only reads a system constant.
        #[allow(unsafe_code)]
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
    })
}

/// The addresses of the whole pages within `len` bytes at `at`.
#[cfg(target_os = "linux")]
fn whole_pages(at: usize, len: usize) -> std::ops::Range<usize> {
    let page = page_size();
    at.next_multiple_of(page)..(at + len) / page * page
}

/// `madvise(MADV_POPULATE_WRITE)` over the whole pages within `len` bytes at `at`, from the end
/// backwards (the caller fills the buffer from the front) and a step at a time, yielding between
/// steps, until done or `stop` is set. `false` if the kernel refused it.
fn populate_write(at: usize, len: usize, stop: &AtomicBool) -> bool {
    #[cfg(target_os = "linux")]
    {
        let step = POPULATE_STEP.max(page_size());
        let std::ops::Range { start, mut end } = whole_pages(at, len);
        while end > start && !stop.load(Ordering::Acquire) {
            let from = end.saturating_sub(step).max(start);
            // SAFETY: whole pages within one live allocation (the caller keeps it allocated
            // until this returns). MADV_POPULATE_WRITE only makes its pages present and writable,
            // as a write would, without writing: no byte of it changes, so whatever another
            // thread writes there meanwhile stays as written.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::madvise(from as *mut libc::c_void, end - from, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                return false;
            }
            end = from;
            std::thread::yield_now();
        }
        true
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (at, len, stop);
        false
    }
}

/// glibc's tunable for how many freed chunks of each small size a thread keeps to itself.
pub const TCACHE_TUNABLE: &str = "glibc.malloc.tcache_count";
/// The broker's value for it (glibc's default is 7).
pub const TCACHE_COUNT: u32 = 2;

/// `GLIBC_TUNABLES` with the broker's `tcache_count` added to what `current` sets, or `None`
/// when `current` sets a `tcache_count` already (the operator's choice stands).
pub fn tunables_with_small_tcache(current: Option<&OsStr>) -> Option<OsString> {
    let mut tunables = current.map(OsStr::to_os_string).unwrap_or_default();
    if tunables.to_string_lossy().split(':').any(|t| t.split('=').next() == Some(TCACHE_TUNABLE)) {
        return None;
    }
    if !tunables.is_empty() {
        tunables.push(":");
    }
    tunables.push(format!("{TCACHE_TUNABLE}={TCACHE_COUNT}"));
    Some(tunables)
}

/// Set in the environment of the restarted broker, so that it never restarts again.
pub const RESTARTED_ENV: &str = "PHOTON_BROKER_RESTARTED";

/// The `GLIBC_TUNABLES` to restart with, or `None` to go on as this process is: the tunable is
/// set already, this process is the restart, or it runs in glibc's secure mode (which ignores
/// the variable).
pub fn restart_tunables(current: Option<&OsStr>, restarted: bool, secure: bool) -> Option<OsString> {
    if restarted || secure {
        return None;
    }
    tunables_with_small_tcache(current)
}

/// Makes sure the broker runs with small per-thread caches in glibc's allocator: if
/// `GLIBC_TUNABLES` does not set `tcache_count` yet, this process starts itself again (same pid,
/// same arguments and environment) with it set to [`TCACHE_COUNT`]. Call it before the broker
/// starts any thread or opens any socket.
///
/// Why: each thread keeps up to 7 freed chunks of every small size (up to 1 KiB) for its own
/// next allocations, and `malloc_trim` can't give back the pages they sit in. After a burst of
/// tasks expired, those chunks lie all over the pages the tasks used, and kept 1.5-1.9 MiB of
/// them resident (heaptrack: only 90 KiB were live). With 2 per size the broker is back at its
/// baseline within a second (0.4-0.9 s measured), at the same CPU per request
/// (docs/BENCHMARKS.md). glibc reads the tunable only as the process starts, so it has to be
/// in the environment then.
///
/// Restarts at most once: the restarted process carries [`RESTARTED_ENV`], and a process in
/// glibc's secure mode (setuid, or file capabilities such as `cap_net_bind_service` to listen
/// on a low port) is not restarted at all, because glibc drops `GLIBC_TUNABLES` there and every
/// restart would find it missing again.
///
/// Returns when nothing needs doing; if the restart fails, the broker goes on as it is.
pub fn small_thread_caches() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: `getauxval` only reads the auxiliary vector the kernel gave this process.
        #[allow(unsafe_code)]
        let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
        let restarted = std::env::var_os(RESTARTED_ENV).is_some();
        let Some(tunables) = restart_tunables(std::env::var_os("GLIBC_TUNABLES").as_deref(), restarted, secure) else {
            return;
        };
        // The executable by its path, not `/proc/self/exe`: the process is named after it
        // (`pgrep photon-broker`). A binary replaced since it started can't be run again.
        let Ok(exe) = std::env::current_exe() else { return };
        let mut args = std::env::args_os();
        let mut again = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            again.arg0(arg0);
        }
        let error = again.args(args).env("GLIBC_TUNABLES", tunables).env(RESTARTED_ENV, "1").exec();
        eprintln!("photon-broker: could not restart with smaller allocator caches ({error}); going on without");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of the whole pages in `buf`'s capacity are in memory (`mincore`).
    #[cfg(target_os = "linux")]
    fn resident_pages(buf: &bytes::BytesMut) -> (usize, usize) {
        let (range, page) = (whole_pages(buf.as_ptr() as usize, buf.capacity()), page_size());
        let (start, pages) = (range.start, range.len() / page);
        let mut flags = vec![0u8; pages];
        // SAFETY: the range lies within `buf`'s live allocation; `flags` has one byte per page.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, pages * page, flags.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        (flags.iter().filter(|f| *f & 1 == 1).count(), pages)
    }

    /// Whether this kernel has `MADV_POPULATE_WRITE` (5.14 and later), asked directly.
    #[cfg(target_os = "linux")]
    fn kernel_populates() -> bool {
        let page = page_size();
        let buf = vec![0u8; 2 * page];
        let at = (buf.as_ptr() as usize).next_multiple_of(page);
        // SAFETY: one whole page inside `buf`, which lives until the end of this function.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::madvise(at as *mut libc::c_void, page, libc::MADV_POPULATE_WRITE) };
        rc == 0
    }

    /// A large buffer's pages are made by the task, without a write of the caller's.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_large_buffers_pages_are_made_ahead_of_use() {
        if !kernel_populates() {
            return eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE");
        }
        // Over glibc's largest mmap threshold (32 MiB): always mapped fresh, no page made yet.
        let mut buf = bytes::BytesMut::with_capacity(40 << 20);
        let (resident, pages) = resident_pages(&buf);
        assert!(resident < pages / 4, "{resident} of {pages} pages in memory before");
        prefault_beside(&mut buf).expect("large enough").made().await;
        assert_eq!(resident_pages(&buf), (pages, pages));
        // Small buffers, and callers without a runtime, are left alone.
        assert!(prefault_beside(&mut bytes::BytesMut::with_capacity(PREFAULT_MIN - 1)).is_none());
        let mut outside = bytes::BytesMut::with_capacity(PREFAULT_MIN);
        assert!(std::thread::spawn(move || prefault_beside(&mut outside).is_none()).join().unwrap());
    }

    /// What the caller writes while the pages are being made stays as written, and the task
    /// lets go of the buffer when it is done, also of one dropped before that.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_buffer_filled_or_dropped_while_its_pages_are_made() {
        if !kernel_populates() {
            return eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE");
        }
        let pattern: Vec<u8> = (0..(8 << 20)).map(|i: usize| (i % 253) as u8).collect();
        let mut buf = bytes::BytesMut::with_capacity(pattern.len());
        let task = prefault_beside(&mut buf).expect("large enough");
        for chunk in pattern.chunks(64 * 1024) {
            buf.extend_from_slice(chunk);
        }
        assert!(buf[..] == pattern[..], "the contents changed");
        task.made().await;
        let filled = buf.freeze();
        assert!(filled[..] == pattern[..], "the contents changed");
        assert!(filled.is_unique(), "the task still holds the buffer");
        let mut dropped = bytes::BytesMut::with_capacity(pattern.len());
        let task = prefault_beside(&mut dropped).expect("large enough");
        drop(dropped);
        task.made().await;
    }

    /// Buffers being filled share the budget: one that finds it spent is left to fault its pages
    /// as its bytes come, and what a finished (or abandoned) one held is free again.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn buffers_share_the_budget_of_pages_made_ahead() {
        if !kernel_populates() {
            return eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE");
        }
        // Each over glibc's largest mmap threshold (32 MiB): mapped fresh, no page made yet.
        static SMALL: Budget = Budget::new(64 << 20);
        let mut first = bytes::BytesMut::with_capacity(40 << 20);
        let mut second = bytes::BytesMut::with_capacity(36 << 20);
        let held = prefault_within(&mut first, &SMALL).expect("within the budget");
        assert!(prefault_within(&mut second, &SMALL).is_none(), "over the budget");
        let (resident, pages) = resident_pages(&second);
        assert!(resident < pages / 4, "{resident} of {pages} pages made for a buffer over the budget");
        held.made().await;
        assert_eq!(SMALL.held.load(Ordering::Acquire), 0);
        prefault_within(&mut second, &SMALL).expect("free again").made().await;
        assert!(SMALL.take(64 << 20), "all of it free again");
    }

    /// Polls `f` every 10 ms until it holds, for at most 10 s.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    /// Once an upload is read, a spare buffer with its pages made waits for the next of about its
    /// size; one of another size gets a buffer of its own; an unused spare is freed, and every
    /// share of the budget comes back.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_upload_of_a_size_gets_a_spare_with_its_pages_made() {
        if !kernel_populates() {
            return eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE");
        }
        static BUDGET: Budget = Budget::new(256 << 20);
        static SPARES: Spares = Spares::new(&BUDGET, Duration::from_secs(2));
        // Over glibc's largest mmap threshold (32 MiB): mapped fresh, no page made yet.
        let len = 40 << 20;
        let (first, pages) = SPARES.buffer(len);
        assert_eq!(first.capacity(), len);
        assert!(pages.is_some() && SPARES.spare_bytes().is_none());
        drop(pages); // the upload read: a spare for the next is made
        eventually("a spare is made", || SPARES.spare_bytes() == Some(spare_capacity(len))).await;

        let (next, pages) = SPARES.buffer(len + 100);
        assert_eq!(next.capacity(), spare_capacity(len), "the spare, not a new buffer");
        let (resident, all) = resident_pages(&next);
        assert_eq!(resident, all, "its pages were made before a byte was written");
        assert!(SPARES.spare_bytes().is_none(), "taken");
        drop(pages);
        eventually("another spare is made", || SPARES.spare_bytes().is_some()).await;

        let other = 34 << 20;
        let (mine, pages) = SPARES.buffer(other);
        assert_eq!(mine.capacity(), other, "a spare 7 MiB larger is not taken");
        assert!(SPARES.spare_bytes().is_some_and(|c| c > other));
        drop(pages);
        eventually("a spare of the new size replaces it", || SPARES.spare_bytes() == Some(spare_capacity(other))).await;

        eventually("an unused spare is freed", || SPARES.spare_bytes().is_none()).await;
        eventually("all of the budget is back", || BUDGET.held.load(Ordering::Acquire) == 0).await;
        assert!(SPARES.buffer(PREFAULT_MIN - 1).1.is_none(), "small buffers are left alone");
        drop((first, next, mine));
    }

    /// A buffer given up (or filled) needs no more pages: its task stops at its next step.
    #[cfg(target_os = "linux")]
    #[test]
    fn making_pages_stops_when_told() {
        if !kernel_populates() {
            return eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE");
        }
        let buf = bytes::BytesMut::with_capacity(40 << 20);
        let (at, len) = (buf.as_ptr() as usize, buf.capacity());
        assert!(populate_write(at, len, &AtomicBool::new(true)));
        let (resident, pages) = resident_pages(&buf);
        assert!(resident < pages / 4, "{resident} of {pages} pages made after the stop");
    }

    #[test]
    fn the_tcache_tunable_is_added_once_and_never_overrides_the_operators() {
        let add = |current: Option<&str>| {
            tunables_with_small_tcache(current.map(OsStr::new)).map(|t| t.into_string().unwrap())
        };
        assert_eq!(add(None).as_deref(), Some("glibc.malloc.tcache_count=2"));
        assert_eq!(add(Some("")).as_deref(), Some("glibc.malloc.tcache_count=2"));
        assert_eq!(
            add(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=2")
        );
        assert_eq!(add(Some("glibc.malloc.tcache_count=7")), None);
        assert_eq!(add(Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0")), None);
        // Another tunable whose name merely starts the same is not this one.
        assert!(add(Some("glibc.malloc.tcache_count_x=1")).is_some());
    }

    #[test]
    fn the_broker_restarts_at_most_once_and_never_in_secure_mode() {
        assert!(restart_tunables(None, false, false).is_some());
        // glibc dropped the tunable on the way (secure mode) or the restart is running: a
        // second restart would find it missing again, and again.
        assert_eq!(restart_tunables(None, true, false), None);
        assert_eq!(restart_tunables(None, false, true), None);
        assert_eq!(restart_tunables(Some(OsStr::new("glibc.malloc.tcache_count=2")), false, false), None);
    }
}
