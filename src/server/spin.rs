//! Busy polling: for a short window after each read, the I/O thread polls for input
//! instead of blocking, so that the next request does not wait for a sleeping core.
//!
//! A runtime thread with nothing to do blocks in `epoll_wait` and its core goes idle;
//! the next request then waits for the kernel (in a virtual machine, the hypervisor)
//! to wake that core. On the 2-core reference VM that wake-up was most of an
//! unpipelined round trip (benches/README.md, item 20). For the window after
//! the last read one task keeps the runtime busy: it yields, so the thread polls the
//! socket driver without blocking and runs whatever became ready, and it gives up
//! the core (`sched_yield`) to any other thread that wants it. The cost is one busy
//! core while reads keep arriving within the window; an idle daemon blocks as
//! before. It is the user-space version of Linux's `busy_read` socket option, whose
//! suggested value is also 50 µs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::engine::ServerStats;

/// Shared by the connections, which [`Spin::touch`] it on every read, and the task
/// that polls ([`Spin::run`]).
#[derive(Debug)]
pub(crate) struct Spin {
    window: Duration,
    /// Whether a read came since the task last looked.
    read: AtomicBool,
    polling: AtomicBool,
    wake: Notify,
}

impl Spin {
    /// Polls for `window` after the last read; zero turns busy polling off.
    pub(crate) fn new(window: Duration) -> Arc<Spin> {
        Arc::new(Spin {
            window,
            read: AtomicBool::new(false),
            polling: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    /// Called after each read from a client: keeps the polling going, or starts it.
    #[inline]
    pub(crate) fn touch(&self) {
        if self.window.is_zero() {
            return;
        }
        // A load first: while reads keep coming the flag is already set, and the
        // connections do not write to the shared line on every read.
        if !self.read.load(Ordering::Relaxed) {
            self.read.store(true, Ordering::Relaxed);
        }
        if !self.polling.load(Ordering::Relaxed) {
            // Stores a permit if the task is not waiting yet: no read is missed.
            self.wake.notify_one();
        }
    }

    /// Whether the task is polling now.
    #[cfg(test)]
    fn polling(&self) -> bool {
        self.polling.load(Ordering::Relaxed)
    }

    /// The polling task, counting its episodes and time in `stats`. Returns at once if
    /// busy polling is off; otherwise runs until aborted.
    pub(crate) async fn run(self: Arc<Spin>, engine: Arc<crate::engine::Engine>) {
        self.run_with(Instant::now, &engine.stats).await;
    }

    async fn run_with(&self, now: impl Fn() -> Instant, stats: &ServerStats) {
        if self.window.is_zero() {
            return;
        }
        loop {
            self.wake.notified().await;
            self.polling.store(true, Ordering::Relaxed);
            stats.busy_polls.fetch_add(1, Ordering::Relaxed);
            let start = now();
            self.read.store(false, Ordering::Relaxed);
            let mut last = start;
            loop {
                tokio::task::yield_now().await;
                std::thread::yield_now();
                let t = now();
                if self.read.swap(false, Ordering::Relaxed) {
                    last = t;
                } else if t.duration_since(last) >= self.window {
                    let micros = t.duration_since(start).as_micros();
                    stats
                        .busy_poll_micros
                        .fetch_add(micros as u64, Ordering::Relaxed);
                    break;
                }
            }
            self.polling.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Yields until `cond` holds; fails after many turns.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn polls_from_a_read_until_the_window_passes_without_one() {
        let stats = Arc::new(ServerStats::new(&crate::Config::default()));
        let spin = Spin::new(Duration::from_micros(50));
        let clock = Arc::new(Mutex::new(Instant::now()));
        let task = tokio::spawn({
            let (spin, clock, stats) = (spin.clone(), clock.clone(), stats.clone());
            async move { spin.run_with(|| *clock.lock(), &stats).await }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!spin.polling(), "polling before any read");
        spin.touch();
        until("polling after a read", || spin.polling()).await;
        // Reads within the window keep it polling, however long that goes on.
        for _ in 0..5 {
            *clock.lock() += Duration::from_micros(40);
            spin.touch();
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert!(spin.polling(), "stopped with reads 40 µs apart");
        }
        *clock.lock() += Duration::from_micros(49);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(spin.polling(), "stopped before the window passed");
        *clock.lock() += Duration::from_micros(1);
        until("stopped after the window", || !spin.polling()).await;
        assert_eq!(stats.busy_polls.load(Ordering::Relaxed), 1);
        assert_eq!(stats.busy_poll_micros.load(Ordering::Relaxed), 250);
        // The next read starts another episode.
        spin.touch();
        until("polling again", || spin.polling()).await;
        assert_eq!(stats.busy_polls.load(Ordering::Relaxed), 2);
        task.abort();
    }

    #[tokio::test]
    async fn a_zero_window_never_polls() {
        let stats = ServerStats::new(&crate::Config::default());
        let spin = Spin::new(Duration::ZERO);
        spin.touch();
        spin.run_with(Instant::now, &stats).await;
        assert_eq!(stats.busy_polls.load(Ordering::Relaxed), 0);
    }
}
