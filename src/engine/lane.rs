//! The fast lane: SENDs applied by the connection that read them, without a trip
//! through the bucket's mailbox and handler thread.
//!
//! It is open only for a bucket whose handler runs natively (`counter`, `unique`), that
//! has no exec sink and no threshold schedule: there a SEND changes the native state and
//! a few counters, and for a durable bucket adds one record to the log, and nothing
//! else. The actor opens and closes it ([`HandlerInstance::take_inline_events`]) as its
//! options change.
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
//! For a durable bucket the lane numbers and queues one record for the whole group while
//! it still holds the lock ([`LaneLog`]), so the log holds the bucket's records in the
//! order their events were applied, as the actor's own records are; the answers go out
//! once it has committed. It posts instead whenever the actor must decide: the bucket
//! refusing durable work, a snapshot due, the writer's queue half full.
//!
//! The lane never waits for the actor's queue: if the actor has work queued, the frames
//! are posted as usual. It waits at most [`LOCK_WAIT`] for the lock (held by another
//! connection's group, or briefly by the actor), then posts. And it takes only groups of
//! at most [`MAX_LANE_EVENTS`] events and [`MAX_LANE_BYTES`] bytes of events, so a
//! connection's thread, which serves other connections too, is never held for long
//! (well under a millisecond); a larger group goes to the handler thread.
//!
//! [`HandlerInstance::take_inline_events`]: crate::script::HandlerInstance
//! [`LaneLog`]: super::durable::LaneLog

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::oneshot;

use crate::protocol::{SendOutcome, SendView};
use crate::script::SharedNative;
use crate::store::log::SEND_TAG;

use super::bucket::{BucketStats, EncodedAnswers};
use super::durable::LaneLog;

/// Longest the lane waits for the state's lock before posting instead.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_micros(50);

/// Most events in a group the lane applies.
pub(crate) const MAX_LANE_EVENTS: usize = 8192;
/// Most bytes of events (as on the wire) in a group the lane applies: a few huge events
/// would otherwise hold the connection's thread while they are hashed and copied.
pub(crate) const MAX_LANE_BYTES: usize = 1 << 20;

/// A bucket's fast lane ([module docs](self)).
#[derive(Default)]
pub(crate) struct Lane {
    queued: AtomicUsize,
    attached: parking_lot::RwLock<Option<Arc<Attached>>>,
}

/// The state the lane applies to, and for a durable bucket the log it writes to.
struct Attached {
    native: Arc<SharedNative>,
    log: Option<LaneLog>,
}

/// SENDs the lane applied.
pub(crate) enum Applied {
    /// Their answers, to send now.
    Now(EncodedAnswers),
    /// A durable bucket's: their answers once their record has committed.
    AfterCommit(oneshot::Receiver<EncodedAnswers>),
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

    /// The native state connections may apply to, if the handler has one, and the log
    /// of a durable bucket. Whether they may now is the state's `open` flag.
    pub fn attach(&self, native: Option<Arc<SharedNative>>, log: Option<LaneLog>) {
        *self.attached.write() = native.map(|native| Arc::new(Attached { native, log }));
    }

    /// Applies consecutive SEND frames here if the lane is open and the actor idle.
    /// `None`: post them.
    pub fn try_apply<'a>(
        &self,
        items: impl Iterator<Item = (u32, SendView<'a>)> + Clone,
        stats: &BucketStats,
    ) -> Option<Applied> {
        let (frames, events, bytes) = items.clone().fold((0, 0, 0), |(f, e, n), (_, b)| {
            (f + 1, e + b.len(), n + b.wire_len())
        });
        if self.queued.load(Ordering::SeqCst) != 0
            || events > MAX_LANE_EVENTS
            || bytes > MAX_LANE_BYTES
        {
            return None;
        }
        let attached = self.attached.read().clone()?;
        // While nothing is queued the lock's other holders are other connections' groups
        // and the actor's brief bookkeeping, so a short wait is worth it; a message posted
        // meanwhile may make the actor hold it for long, hence the bound.
        let mut state = attached.native.try_lock_for(LOCK_WAIT)?;
        if !state.open
            || self.queued.load(Ordering::SeqCst) != 0
            || attached.log.as_ref().is_some_and(|log| !log.open())
        {
            return None;
        }
        let mut out = BytesMut::with_capacity(frames * 19);
        let (mut accepted, mut rejected) = (0u64, 0u64);
        for (id, batch) in items.clone() {
            let mut outcome = SendOutcome::default();
            for (i, event) in batch.iter().enumerate() {
                match state.native.send(event) {
                    Ok(()) => outcome.accepted += 1,
                    Err(reason) => outcome.reject(i as u32, || reason),
                }
            }
            accepted += u64::from(outcome.accepted);
            rejected += u64::from(outcome.rejected);
            outcome.encode_answer(id, &mut out);
        }
        state.inline_events += accepted;
        // Counted under the lock, before the actor can take these events: it stores
        // `pending` only after taking them.
        stats.sends.fetch_add(frames as u64, Ordering::Relaxed);
        stats.events.fetch_add(accepted, Ordering::Relaxed);
        stats.rejected.fetch_add(rejected, Ordering::Relaxed);
        stats.pending.fetch_add(accepted, Ordering::Relaxed);
        let memory = state.native.memory_used() as u64;
        stats.memory.store(memory, Ordering::Relaxed);
        let answers = EncodedAnswers {
            count: frames,
            frames: out.freeze(),
        };
        let Some(log) = &attached.log else {
            return Some(Applied::Now(answers));
        };
        // Queued before the lock is released: see the module docs.
        let record = group_record(items.clone(), events, bytes);
        let ids = items.map(|(id, _)| id).collect();
        let rx = log.append(record, answers, ids);
        drop(state);
        Some(Applied::AfterCommit(rx))
    }
}

/// One SEND record of every event of the group (`SEND_TAG count events`), as the actor
/// gathers a group's records into one.
fn group_record<'a>(
    items: impl Iterator<Item = (u32, SendView<'a>)>,
    events: usize,
    bytes: usize,
) -> Vec<u8> {
    let mut record = Vec::with_capacity(5 + bytes);
    record.push(SEND_TAG);
    record.extend_from_slice(&(events as u32).to_be_bytes());
    for (_, batch) in items {
        batch.write_events(&mut record);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SendBatch;
    use crate::script::{HandlerCatalog, HandlerInstance, ScriptLimits};

    fn views(group: &[(u32, SendBatch)]) -> impl Iterator<Item = (u32, SendView<'_>)> + Clone {
        group.iter().map(|(id, b)| (*id, b.view()))
    }

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
            lane.try_apply(views(&group), &stats).is_none(),
            "no state attached"
        );
        lane.attach(instance.shared_native(), None);
        assert!(
            lane.try_apply(views(&group), &stats).is_none(),
            "attached closed"
        );
        assert_eq!(instance.take_inline_events(true), 0);

        let Some(Applied::Now(answers)) = lane.try_apply(views(&group), &stats) else {
            panic!("applied at once");
        };
        assert_eq!(answers.count, 3);
        assert_eq!(stats.events.load(Ordering::Relaxed), 12);
        assert_eq!(stats.sends.load(Ordering::Relaxed), 3);
        assert_eq!(stats.pending.load(Ordering::Relaxed), 12);

        let queued = lane.queue();
        assert!(
            lane.try_apply(views(&group), &stats).is_none(),
            "a message is queued"
        );
        drop(queued);
        let too_big = frames(2, MAX_LANE_EVENTS / 2 + 1);
        assert!(
            lane.try_apply(views(&too_big), &stats).is_none(),
            "too large a group"
        );
        let huge = vec![(9, SendBatch::from_events(&["k".repeat(MAX_LANE_BYTES)]))];
        assert!(
            lane.try_apply(views(&huge), &stats).is_none(),
            "too many bytes in a group"
        );

        assert_eq!(instance.take_inline_events(false), 12, "handed over once");
        assert_eq!(instance.take_inline_events(false), 0);
        assert!(
            lane.try_apply(views(&group), &stats).is_none(),
            "closed again"
        );
        assert_eq!(stats.events.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_durable_group_is_one_record_answered_after_its_commit() {
        use crate::store::log::{DurableLog, Record};
        use crate::store::Store;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("db.redb")).expect("open"));
        let log = Arc::new(DurableLog::start(store.clone(), Box::new(|| {}), 0).expect("writer"));
        let (lane, stats, instance) = (Lane::default(), BucketStats::default(), counter());
        let durable = super::super::durable::Durable::new(7);
        lane.attach(instance.shared_native(), Some(durable.lane_log(&log)));
        instance.take_inline_events(true);

        let group = frames(3, 4);
        for lsn in 1..=2 {
            let Some(Applied::AfterCommit(rx)) = lane.try_apply(views(&group), &stats) else {
                panic!("a durable group waits for its commit");
            };
            let answers = rx.blocking_recv().expect("answered after the commit");
            assert_eq!(answers.count, 3);
            assert_eq!(durable.next_lsn(), lsn + 1, "one lsn for the group");
        }
        assert_eq!(instance.take_inline_events(false), 24);

        log.shutdown();
        store.reopen().expect("reopen moves the write-ahead file");
        let mut records = Vec::new();
        store
            .replay(7, 0, |lsn, bytes| {
                records.push((lsn, bytes.to_vec()));
                Ok(())
            })
            .expect("replay");
        assert_eq!(records.len(), 2, "one record per group");
        let Ok(Record::Send(batch)) = Record::decode(&records[0].1) else {
            panic!("a SEND record");
        };
        let events: Vec<Vec<u8>> = SendBatch::from_record(batch)
            .expect("batch")
            .iter()
            .map(<[u8]>::to_vec)
            .collect();
        let sent: Vec<Vec<u8>> = group
            .iter()
            .flat_map(|(_, b)| b.iter().map(<[u8]>::to_vec).collect::<Vec<_>>())
            .collect();
        assert_eq!(events, sent, "every event of the group, in order");
    }
}
