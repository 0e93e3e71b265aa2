//! When a bucket flushes: a pure state machine over a [`Schedule`], driven by the
//! bucket's thread with explicit instants (so it is tested without clocks).
//!
//! - `Every(p)`: deadlines at `start + p`, `start + 2p`, …; a flush that runs late
//!   does not shift the later ones, and missed ones are skipped, not run in a burst.
//! - `Threshold { count, timeout }`: a flush once `count` events arrived since the
//!   last flush, or `timeout` after the first of them, whichever comes first.

use std::time::{Duration, Instant};

use super::options::Schedule;

/// A bucket's flush timing.
#[derive(Debug, Clone)]
pub(crate) struct Trigger {
    schedule: Schedule,
    /// Events accepted since the last flush.
    pending: u64,
    /// When the next flush is due by time.
    deadline: Option<Instant>,
}

impl Trigger {
    pub fn new(schedule: Schedule, now: Instant) -> Trigger {
        let deadline = match schedule {
            Schedule::Every(period) => Some(now + period),
            Schedule::Manual | Schedule::Threshold { .. } => None,
        };
        Trigger {
            schedule,
            pending: 0,
            deadline,
        }
    }

    /// The same bucket with a new schedule: pending events stay pending.
    pub fn reschedule(&mut self, schedule: Schedule, now: Instant) {
        let pending = self.pending;
        *self = Trigger::new(schedule, now);
        self.pending = pending;
        if let Schedule::Threshold { timeout, .. } = schedule {
            if pending > 0 {
                self.deadline = Some(now + timeout);
            }
        }
    }

    /// Records one accepted event; true if the bucket must flush now.
    pub fn event(&mut self, now: Instant) -> bool {
        self.pending += 1;
        match self.schedule {
            Schedule::Threshold { count, timeout } => {
                if self.pending == 1 {
                    self.deadline = Some(now + timeout);
                }
                self.pending >= count
            }
            Schedule::Manual | Schedule::Every(_) => false,
        }
    }

    /// Records `n` accepted events at once, as `n` calls of [`Trigger::event`] would,
    /// for a schedule that events never flush (`Every`, `Manual`); a threshold schedule
    /// only starts its timeout.
    pub fn add_pending(&mut self, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        if self.pending == 0 {
            if let Schedule::Threshold { timeout, .. } = self.schedule {
                self.deadline = Some(now + timeout);
            }
        }
        self.pending = self.pending.saturating_add(n);
    }

    /// After a recovery: `pending` events are waiting, the first of them from `now`
    /// as far as a threshold timeout is concerned.
    pub fn set_pending(&mut self, pending: u64, now: Instant) {
        self.pending = pending;
        if let Schedule::Threshold { timeout, .. } = self.schedule {
            self.deadline = (pending > 0).then_some(now + timeout);
        }
    }

    /// Events accepted since the last flush.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// When the next flush is due by time, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether a flush is due by time.
    pub fn due(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Records a flush at `now` that took every pending event.
    pub fn flushed(&mut self, now: Instant) {
        self.pending = 0;
        self.deadline = match self.schedule {
            Schedule::Every(period) => Some(next_period(self.deadline, period, now)),
            Schedule::Manual | Schedule::Threshold { .. } => None,
        };
    }

    /// Records a flush at `now` that failed: the pending events stay pending and the
    /// next attempt is one period (or timeout) away, so a failing handler is not retried
    /// in a loop.
    pub fn failed(&mut self, now: Instant) {
        self.deadline = match self.schedule {
            Schedule::Every(period) => Some(next_period(self.deadline, period, now)),
            Schedule::Threshold { timeout, .. } => Some(now + timeout),
            Schedule::Manual => None,
        };
    }
}

/// The first deadline after `now` on the grid of `last + k × period`.
fn next_period(last: Option<Instant>, period: Duration, now: Instant) -> Instant {
    let Some(last) = last else {
        return now + period;
    };
    let next = last + period;
    if next > now {
        return next;
    }
    // Late by one or more periods: skip to the grid point after now.
    let behind = now.duration_since(last).as_nanos() / period.as_nanos().max(1);
    let skip = u32::try_from(behind + 1).unwrap_or(u32::MAX);
    last + period.saturating_mul(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn every_keeps_its_grid_and_skips_missed_periods() {
        let t0 = Instant::now();
        let mut t = Trigger::new(Schedule::Every(S), t0);
        assert_eq!(t.deadline(), Some(t0 + S));
        assert!(!t.due(t0 + S / 2));
        assert!(!t.event(t0), "events never flush an Every bucket");
        assert!(t.due(t0 + S));
        t.flushed(t0 + S + S / 10); // a little late
        assert_eq!(t.deadline(), Some(t0 + 2 * S), "lateness does not drift");
        t.flushed(t0 + 5 * S + S / 2); // very late: 3, 4, 5 are skipped
        assert_eq!(t.deadline(), Some(t0 + 6 * S));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn add_pending_is_n_events_at_once() {
        let t0 = Instant::now();
        let mut every = Trigger::new(Schedule::Every(S), t0);
        every.add_pending(0, t0);
        every.add_pending(5, t0);
        every.add_pending(2, t0 + S / 2);
        assert_eq!((every.pending(), every.deadline()), (7, Some(t0 + S)));
        let threshold = Schedule::Threshold {
            count: 100,
            timeout: S,
        };
        let mut t = Trigger::new(threshold, t0);
        t.add_pending(3, t0 + S / 4);
        t.add_pending(3, t0 + S / 2);
        assert_eq!(t.deadline(), Some(t0 + S + S / 4), "timeout from the first");
        assert_eq!(t.pending(), 6);
    }

    #[test]
    fn threshold_fires_on_count() {
        let t0 = Instant::now();
        let mut t = Trigger::new(
            Schedule::Threshold {
                count: 3,
                timeout: S,
            },
            t0,
        );
        assert_eq!(t.deadline(), None, "no timer without events");
        assert!(!t.event(t0));
        assert_eq!(t.deadline(), Some(t0 + S), "timer from the first event");
        assert!(!t.event(t0 + S / 2));
        assert!(t.event(t0 + S / 2), "the third event");
        t.flushed(t0 + S / 2);
        assert_eq!((t.pending(), t.deadline()), (0, None));
    }

    #[test]
    fn threshold_fires_on_timeout_from_the_first_unflushed_event() {
        let t0 = Instant::now();
        let mut t = Trigger::new(
            Schedule::Threshold {
                count: 100,
                timeout: 2 * S,
            },
            t0,
        );
        t.event(t0 + S);
        t.event(t0 + 2 * S);
        assert!(!t.due(t0 + 2 * S));
        assert!(t.due(t0 + 3 * S), "2 s after the first, not the last");
        t.flushed(t0 + 3 * S);
        assert!(!t.due(t0 + 10 * S));
    }

    #[test]
    fn a_failed_flush_keeps_events_and_backs_off() {
        let t0 = Instant::now();
        let mut t = Trigger::new(
            Schedule::Threshold {
                count: 2,
                timeout: S,
            },
            t0,
        );
        t.event(t0);
        t.event(t0);
        t.failed(t0);
        assert_eq!(t.pending(), 2);
        assert_eq!(t.deadline(), Some(t0 + S));
    }

    #[test]
    fn reschedule_keeps_pending_events() {
        let t0 = Instant::now();
        let mut t = Trigger::new(Schedule::Every(S), t0);
        t.event(t0);
        t.reschedule(
            Schedule::Threshold {
                count: 10,
                timeout: S,
            },
            t0 + S / 2,
        );
        assert_eq!(t.pending(), 1);
        assert_eq!(t.deadline(), Some(t0 + S / 2 + S));
        t.reschedule(Schedule::Manual, t0);
        assert_eq!((t.pending(), t.deadline()), (1, None));
    }
}
