//! Scheduling hints for heloguard's own threads.
//!
//! Two kinds of thread share the cores. The event loop and the workers answer clients: they
//! run in bursts of microseconds, and every reply waits for them. The spool writers spend
//! their CPU in the kernel's fsync path, which can wait (SPEC: fsync latency must never stall
//! protocol work). So:
//!
//! * the loop and the workers ask for a short time slice. Linux's EEVDF scheduler (6.12 and
//!   later) takes `sched_attr.sched_runtime` of a normal thread as its slice; a thread with a
//!   short slice gets an early deadline, so when it wakes on a busy core it runs before a
//!   thread in the middle of a long slice, instead of queueing behind it.
//! * the spool writers run at nice 10.
//!
//! Both are hints that need no privilege. When the kernel refuses one (older kernels ignore
//! the slice; a seccomp filter may deny the call) the thread keeps what it had, and the refusal
//! is logged at debug level. The thread's nice value and policy (systemd `Nice=`,
//! `CPUSchedulingPolicy=batch`) are kept; a real-time policy is left alone entirely.

use std::io;
use std::time::Duration;

/// Slice asked for by the threads that answer clients (EEVDF accepts 0.1 to 100 ms).
pub(crate) const ANSWER_SLICE: Duration = Duration::from_micros(100);

/// How much lower than the protocol threads a spool writer runs (nice levels).
pub(crate) const WRITER_NICENESS: libc::c_int = 10;

/// Policies whose slice EEVDF sets from `sched_runtime` (SCHED_OTHER, SCHED_BATCH).
const FAIR_POLICIES: [u32; 2] = [0, 3];

/// Asks for `ANSWER_SLICE` for the calling thread (the event loop, a worker).
pub(crate) fn prefer_short_slices() {
    if let Err(err) = set_own_slice(ANSWER_SLICE) {
        log::debug!("thread keeps the default time slice: {err}");
    }
}

/// Lowers the calling thread's CPU priority to `WRITER_NICENESS` (a spool writer). Linux gives
/// each thread its own nice value.
pub(crate) fn yield_cpu_to_protocol_work() {
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
    let result = unsafe {
        let who = libc::id_t::try_from(libc::gettid()).unwrap_or_default();
        libc::setpriority(libc::PRIO_PROCESS, who, WRITER_NICENESS)
    };
    if result != 0 {
        log::debug!(
            "spool writer keeps its priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// The calling thread's scheduling attributes.
fn own_attributes() -> io::Result<libc::sched_attr> {
    let mut attr = libc::sched_attr {
        size: 0,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    let size = std::mem::size_of::<libc::sched_attr>() as libc::c_uint;
    // SAFETY: `attr` is a valid, writable sched_attr of `size` bytes; pid 0 is this thread.
    let result = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut libc::sched_attr,
            size,
            0,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Sets the calling thread's slice, keeping its policy and nice value.
fn set_own_slice(slice: Duration) -> io::Result<()> {
    let mut attr = own_attributes()?;
    if !FAIR_POLICIES.contains(&attr.sched_policy) {
        return Err(io::Error::other("not a fair-share policy; left alone"));
    }
    attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid sched_attr with `size` set; pid 0 is this thread.
    let result = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread, so the hints do not stay on a test runner thread.
    fn on_new_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread")
    }

    /// Kernel release as (major, minor), from /proc.
    fn kernel_version() -> Option<(u32, u32)> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let mut parts = release.trim().split(['.', '-']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    #[test]
    fn a_short_slice_keeps_the_threads_nice_value_and_policy() {
        let (before, set, after) = on_new_thread(|| {
            // SAFETY: setpriority only reads its arguments; raising one's nice needs no right.
            unsafe {
                let who = libc::id_t::try_from(libc::gettid()).unwrap_or_default();
                libc::setpriority(libc::PRIO_PROCESS, who, 3);
            }
            let before = own_attributes().expect("sched_getattr");
            let set = set_own_slice(ANSWER_SLICE).map_err(|e| e.to_string());
            (before, set, own_attributes().expect("sched_getattr"))
        });
        assert_eq!(set, Ok(()));
        assert_eq!(after.sched_nice, before.sched_nice);
        assert_eq!(after.sched_policy, before.sched_policy);
        // EEVDF keeps a custom slice from Linux 6.12 on; older kernels accept and ignore it.
        if kernel_version().is_some_and(|v| v < (6, 12)) {
            println!("SKIP slice check: Linux before 6.12 keeps no custom slice");
            return;
        }
        assert_eq!(after.sched_runtime, ANSWER_SLICE.as_nanos() as u64);
    }

    #[test]
    fn a_writer_runs_at_nice_ten_or_lower_priority() {
        let nice = on_new_thread(|| {
            yield_cpu_to_protocol_work();
            own_attributes().expect("sched_getattr").sched_nice
        });
        assert!(nice >= WRITER_NICENESS, "nice {nice}");
    }
}
