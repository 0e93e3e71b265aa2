//! The durable log writer's scheduling priority.
//!
//! A durable SEND is answered only after the writer's `fdatasync`, and the next group
//! commit starts only once the writer has run again. When the connections' threads and
//! the clients keep every core busy, a writer that waits for its turn after each sync
//! lengthens every commit cycle, and so every durable answer. Asking the kernel for a
//! lower nice value for this one thread (`--writer-nice`) lets it run as soon as its
//! sync returns. Lowering a nice value needs `CAP_SYS_NICE` (or root, or an
//! `RLIMIT_NICE` that allows it); without it the writer keeps the daemon's priority,
//! which is correct, only slower. Linux only: elsewhere the setting is ignored.

/// Changes the calling thread's nice value by `delta` (negative: higher priority),
/// clamped to the kernel's range. Returns the nice value in effect afterwards.
///
/// # Errors
/// The OS error when the kernel refuses (`EPERM` without the privilege).
#[cfg(target_os = "linux")]
pub fn renice_this_thread(delta: i32) -> std::io::Result<i32> {
    let tid = this_thread();
    let now = current(tid)?;
    let target = (now + delta).clamp(-20, 19);
    if target != now {
        // SAFETY: setpriority takes plain integers and only acts on the thread `tid`,
        // which is the calling thread.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, target) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    current(tid)
}

/// Elsewhere: no change, and no nice value to report.
///
/// # Errors
/// Always `Unsupported`.
#[cfg(not(target_os = "linux"))]
pub fn renice_this_thread(_delta: i32) -> std::io::Result<i32> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(target_os = "linux")]
fn this_thread() -> libc::id_t {
    // SAFETY: gettid has no preconditions. On Linux, PRIO_PROCESS with a thread id
    // addresses that one thread.
    unsafe { libc::gettid() as libc::id_t }
}

/// The nice value of thread `tid`.
#[cfg(target_os = "linux")]
fn current(tid: libc::id_t) -> std::io::Result<i32> {
    // getpriority may return -1 as a value: errno tells an error apart.
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain integers in, an integer out.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if nice == -1 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error().is_some_and(|code| code != 0) {
            return Err(e);
        }
    }
    Ok(nice)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    // Raising the nice value is always allowed, so this runs unprivileged; the thread
    // ends with the test, and the change with it.
    #[test]
    fn a_thread_changes_only_its_own_nice_value() {
        let process = current(0).expect("the process's nice value");
        let (before, after) = std::thread::spawn(|| {
            let before = current(this_thread()).expect("nice");
            (before, renice_this_thread(2).expect("renice"))
        })
        .join()
        .expect("thread");
        assert_eq!(after, (before + 2).min(19));
        assert_eq!(
            current(0).expect("nice"),
            process,
            "the process is unchanged"
        );
        let same = std::thread::spawn(|| {
            let before = current(this_thread()).expect("nice");
            (before, renice_this_thread(0).expect("no change"))
        })
        .join()
        .expect("thread");
        assert_eq!(same.0, same.1);
    }
}
