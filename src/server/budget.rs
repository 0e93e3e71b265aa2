//! A connection's in-flight budget: how many requests, and how many bytes of them, its
//! reader may have read and not yet seen answered (`max_in_flight`,
//! `max_in_flight_bytes`). A request takes its share before it is routed and gives it
//! back when its answer is written; while the budget is spent the reader stops reading
//! the socket.
//!
//! A [`Budget`] holds the shares of one or more requests as plain counts, so a reader
//! gathering a pipelined run of SENDs adds each frame's share to the run's budget with
//! two atomic operations and no reference count.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// The two limits of one connection.
pub(crate) struct InFlight {
    bytes: Semaphore,
    requests: Semaphore,
}

impl InFlight {
    /// A budget of `requests` requests and `bytes` bytes (each at least 1 and at most
    /// [`Semaphore::MAX_PERMITS`]).
    pub(crate) fn new(requests: usize, bytes: usize) -> Arc<InFlight> {
        let clamp = |n: usize| n.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(InFlight {
            bytes: Semaphore::new(clamp(bytes)),
            requests: Semaphore::new(clamp(requests)),
        })
    }

    /// One request of `cost` bytes, if the budget has room now.
    pub(crate) fn try_take(self: &Arc<Self>, cost: u32) -> Option<Budget> {
        let mut budget = self.empty();
        budget.try_add(cost).then_some(budget)
    }

    /// One request of `cost` bytes, waiting for room. `cost` must not exceed the byte
    /// limit, or this waits forever.
    pub(crate) async fn take(self: &Arc<Self>, cost: u32) -> Budget {
        let mut budget = self.empty();
        // Never closed, so the acquires cannot fail.
        if let Ok(p) = self.bytes.acquire_many(cost).await {
            p.forget();
            budget.bytes = u64::from(cost);
        }
        if let Ok(p) = self.requests.acquire().await {
            p.forget();
            budget.requests = 1;
        }
        budget
    }

    fn empty(self: &Arc<Self>) -> Budget {
        Budget {
            pool: self.clone(),
            bytes: 0,
            requests: 0,
        }
    }
}

/// Shares of the budget, given back when dropped.
pub(crate) struct Budget {
    pool: Arc<InFlight>,
    bytes: u64,
    requests: u64,
}

impl Budget {
    /// Adds one more request of `cost` bytes if the budget has room now; false (and
    /// nothing taken) if it has not.
    pub(crate) fn try_add(&mut self, cost: u32) -> bool {
        self.try_add_many(1, cost)
    }

    /// Adds `requests` more requests of `cost` bytes in all if the budget has room for
    /// all of them now; false (and nothing taken) if it has not.
    pub(crate) fn try_add_many(&mut self, requests: u32, cost: u32) -> bool {
        let Ok(bytes) = self.pool.bytes.try_acquire_many(cost) else {
            return false;
        };
        let Ok(request) = self.pool.requests.try_acquire_many(requests) else {
            return false;
        };
        bytes.forget();
        request.forget();
        self.bytes += u64::from(cost);
        self.requests += u64::from(requests);
        true
    }

    /// Takes over the shares of `other` (of the same connection).
    pub(crate) fn merge(&mut self, mut other: Budget) {
        self.bytes += std::mem::take(&mut other.bytes);
        self.requests += std::mem::take(&mut other.requests);
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.pool.bytes.add_permits(self.bytes as usize);
        self.pool.requests.add_permits(self.requests as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_back_when_their_budget_is_dropped() {
        let pool = InFlight::new(3, 100);
        let mut run = pool.try_take(40).expect("room");
        assert!(run.try_add(40));
        // 110 bytes would exceed 100: nothing is taken.
        assert!(!run.try_add(30));
        let third = pool.try_take(10).expect("room for a third request");
        // A fourth request is refused by the request limit after its byte was taken.
        assert!(pool.try_take(1).is_none());
        drop(third);
        // That byte was given back: exactly 20 are free.
        let more = pool.try_take(20).expect("20 bytes free");
        assert!(pool.try_take(1).is_none());
        run.merge(more);
        // 100 bytes and 3 requests are out.
        assert!(!run.try_add(0));
        drop(run);
        // Many at once: all or nothing.
        let mut run = pool.try_take(10).expect("room");
        assert!(!run.try_add_many(3, 10), "4 requests exceed 3");
        assert!(!run.try_add_many(2, 91), "101 bytes exceed 100");
        assert!(run.try_add_many(2, 90));
        assert!(pool.try_take(0).is_none(), "all 3 requests are out");
        drop(run);
        let all = pool.try_take(100).expect("everything was given back");
        drop(all);
        assert!(pool.try_take(100).is_some());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn take_waits_for_room() {
        let pool = InFlight::new(1, 10);
        let held = pool.take(10).await;
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.take(5).await.bytes }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.expect("joined"), 5);
    }
}
