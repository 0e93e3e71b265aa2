//! The durable log writer's scheduling priority.
//!
//! A durable SEND is answered only after the writer's `fdatasync`, and the next group
//! commit starts only once the writer has run again. When the connections' threads and
//! the clients keep every core busy, a writer that waits for its turn after each sync
//! lengthens every commit cycle, and so every durable answer. Asking the kernel for a
//! lower nice value for this one thread (`--writer-nice`) lets it run as soon as its
//! sync returns. Lowering a nice value needs `CAP_SYS_NICE` (or root), or an
//! `RLIMIT_NICE` that allows it: the value asked for, else as low as the limit allows.
//! Without either the writer keeps the daemon's priority, which is correct, only
//! slower. Linux only: elsewhere the setting is ignored.

/// Changes the calling thread's nice value by `delta` (negative: higher priority),
/// clamped to the kernel's range; where `RLIMIT_NICE` allows only part of a lowering,
/// as far as it allows. Returns the nice value in effect afterwards.
///
/// # Errors
/// The OS error when the kernel refuses any change (`EACCES` or `EPERM` without the
/// privilege: both are `PermissionDenied`).
#[cfg(target_os = "linux")]
pub fn renice_this_thread(delta: i32) -> std::io::Result<i32> {
    let tid = this_thread();
    let now = current(tid)?;
    let target = now.saturating_add(delta).clamp(-20, 19);
    if target != now {
        if let Err(e) = set(tid, target) {
            match nice_floor().filter(|&floor| floor > target && floor < now) {
                Some(floor) => set(tid, floor)?,
                None => return Err(e),
            }
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

#[cfg(target_os = "linux")]
fn set(tid: libc::id_t, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and only acts on the thread `tid`, which
    // is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The lowest nice value `RLIMIT_NICE` allows without privilege (a limit of n allows
/// down to 20 - n), if it can be read.
#[cfg(target_os = "linux")]
fn nice_floor() -> Option<i32> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } != 0 {
        return None;
    }
    let cur = i32::try_from(limit.rlim_cur.min(40)).ok()?;
    Some(20 - cur)
}

/// The nice value of thread `tid` (0: the calling thread).
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

    fn in_a_thread(delta: i32) -> (i32, i32) {
        std::thread::spawn(move || {
            let before = current(this_thread()).expect("nice");
            (before, renice_this_thread(delta).expect("renice"))
        })
        .join()
        .expect("thread")
    }

    // Raising the nice value is always allowed, so this runs unprivileged; the thread
    // ends with the test, and the change with it.
    #[test]
    fn a_thread_changes_only_its_own_nice_value() {
        // PRIO_PROCESS with the pid addresses the main thread, with 0 the caller.
        // SAFETY: getpid has no preconditions.
        let main = unsafe { libc::getpid() } as libc::id_t;
        let main_before = current(main).expect("nice");
        let caller_before = current(0).expect("nice");
        let (before, after) = in_a_thread(2);
        assert_eq!(after, (before + 2).min(19));
        assert_eq!(current(main).expect("nice"), main_before, "the main thread");
        assert_eq!(
            current(0).expect("nice"),
            caller_before,
            "the test's thread"
        );
        let (before, after) = in_a_thread(0);
        assert_eq!(before, after);
        let (_, after) = in_a_thread(i32::MAX);
        assert_eq!(after, 19, "clamped, not overflowed");
    }
}
