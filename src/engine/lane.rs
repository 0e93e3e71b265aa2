//! The fast lane: SENDs applied by the connection that read them, without a trip
//! through the bucket's mailbox and handler thread.
//!
//! It is open only for a bucket whose handler runs natively (`counter`, `unique`), that
//! is in memory, has no exec sink and no threshold schedule: there a SEND changes the
//! native state and a few counters and nothing else. The actor opens and closes it
//! ([`HandlerInstance::take_inline_events`]) as its options change.
//!
//! The bucket stays one serial actor:
//! - the native state is behind its lock, which the lane holds for a whole group of
//!   frames and the actor holds for each of its calls;
//! - `queued` counts mailbox messages posted and not yet handled (and a tick while it
//!   runs). The lane applies only while it is 0, checked under the lock, so a SEND never
//!   overtakes a message its connection posted before it (that message is still
//!   counted), and the actor never sees the state change in the middle of a message;
//! - the events the lane accepted are counted in the state and handed to the actor at
//!   the start of its next message or tick, under the same lock, so flush counts, take
//!   counts and INFO `pending` are what they would have been through the mailbox.
//!
//! The lane never waits for the actor's queue: if the actor has work queued, the frames
//! are posted as usual. It waits at most [`LOCK_WAIT`] for the lock (held by another
//! connection's group, or briefly by the actor), then posts. And it takes only groups of
//! at most [`MAX_LANE_EVENTS`] events, so a connection's thread, which serves other
//! connections too, is never held for long (well under a millisecond); a larger group
//! goes to the handler thread.
//!
//! [`HandlerInstance::take_inline_events`]: crate::script::HandlerInstance

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;

use crate::protocol::{SendBatch, SendOutcome};
use crate::script::SharedNative;

use super::bucket::{BucketStats, EncodedAnswers};

/// Longest the lane waits for the state's lock before posting instead.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_micros(50);

/// Most events in a group the lane applies.
pub(crate) const MAX_LANE_EVENTS: usize = 8192;

/// A bucket's fast lane ([module docs](self)).
#[derive(Default)]
pub(crate) struct Lane {
    queued: AtomicUsize,
    native: parking_lot::RwLock<Option<Arc<SharedNative>>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// One mailbox message (or tick) counted in [`Lane::queued`] until dropped.
pub(crate) struct Queued<'a>(&'a Lane);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lane {
    /// Counts a message about to be posted, or a tick about to run, until the guard is
    /// dropped (or [`std::mem::forget`] hands the count to the actor, which calls
    /// [`Lane::handled`]).
    pub fn queue(&self) -> Queued<'_> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        Queued(self)
    }

    /// The actor handled one posted message.
    pub fn handled(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// The native state connections may apply to, if the handler has one. Whether they
    /// may now is the state's `open` flag.
    pub fn attach(&self, native: Option<Arc<SharedNative>>) {
        *self.native.write() = native;
    }

    /// Applies consecutive SEND frames here if the lane is open and the actor idle; their
    /// encoded answers then. `None`: post them.
    pub fn try_apply(
        &self,
        items: &[(u32, SendBatch)],
        stats: &BucketStats,
    ) -> Option<EncodedAnswers> {
        if self.queued.load(Ordering::SeqCst) != 0
            || items.iter().map(|(_, b)| b.len()).sum::<usize>() > MAX_LANE_EVENTS
        {
            return None;
        }
        let native = self.native.read().clone()?;
        // While nothing is queued the lock's other holders are other connections' groups
        // and the actor's brief bookkeeping, so a short wait is worth it; a message posted
        // meanwhile may make the actor hold it for long, hence the bound.
        let mut state = native.try_lock_for(LOCK_WAIT)?;
        if !state.open || self.queued.load(Ordering::SeqCst) != 0 {
            return None;
        }
        let mut frames = BytesMut::with_capacity(items.len() * 19);
        let (mut accepted, mut rejected) = (0u64, 0u64);
        for (id, batch) in items {
            let mut outcome = SendOutcome::default();
            for (i, event) in batch.iter().enumerate() {
                match state.native.send(event) {
                    Ok(()) => outcome.accepted += 1,
                    Err(reason) => outcome.reject(i as u32, || reason),
                }
            }
            accepted += u64::from(outcome.accepted);
            rejected += u64::from(outcome.rejected);
            outcome.encode_answer(*id, &mut frames);
        }
        state.inline_events += accepted;
        // Counted under the lock, before the actor can take these events: it stores
        // `pending` only after taking them.
        stats.sends.fetch_add(items.len() as u64, Ordering::Relaxed);
        stats.events.fetch_add(accepted, Ordering::Relaxed);
        stats.rejected.fetch_add(rejected, Ordering::Relaxed);
        stats.pending.fetch_add(accepted, Ordering::Relaxed);
        let memory = state.native.memory_used() as u64;
        stats.memory.store(memory, Ordering::Relaxed);
        drop(state);
        Some(EncodedAnswers {
            count: items.len(),
            frames: frames.freeze(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::{HandlerCatalog, HandlerInstance, ScriptLimits};

    fn counter() -> HandlerInstance {
        let source = HandlerCatalog::stock()
            .get("counter")
            .expect("stock counter");
        HandlerInstance::new(&source, &serde_json::Value::Null, &ScriptLimits::default())
            .expect("starts")
    }

    fn frames(n: usize, events: usize) -> Vec<(u32, SendBatch)> {
        let batch: Vec<String> = (0..events).map(|i| format!("k{}", i % 3)).collect();
        (0..n as u32)
            .map(|id| (id, SendBatch::from_events(&batch)))
            .collect()
    }

    #[test]
    fn applies_only_while_open_and_idle_and_hands_the_count_over() {
        let (lane, stats, instance) = (Lane::default(), BucketStats::default(), counter());
        let group = frames(3, 4);
        assert!(
            lane.try_apply(&group, &stats).is_none(),
            "no state attached"
        );
        lane.attach(instance.shared_native());
        assert!(lane.try_apply(&group, &stats).is_none(), "attached closed");
        assert_eq!(instance.take_inline_events(true), 0);

        let answers = lane.try_apply(&group, &stats).expect("applied");
        assert_eq!(answers.count, 3);
        assert_eq!(stats.events.load(Ordering::Relaxed), 12);
        assert_eq!(stats.sends.load(Ordering::Relaxed), 3);
        assert_eq!(stats.pending.load(Ordering::Relaxed), 12);

        let queued = lane.queue();
        assert!(
            lane.try_apply(&group, &stats).is_none(),
            "a message is queued"
        );
        drop(queued);
        let too_big = frames(2, MAX_LANE_EVENTS / 2 + 1);
        assert!(
            lane.try_apply(&too_big, &stats).is_none(),
            "too large a group"
        );

        assert_eq!(instance.take_inline_events(false), 12, "handed over once");
        assert_eq!(instance.take_inline_events(false), 0);
        assert!(lane.try_apply(&group, &stats).is_none(), "closed again");
        assert_eq!(stats.events.load(Ordering::Relaxed), 12);
    }
}
