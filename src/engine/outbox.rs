//! A bucket's outbox: events its flushes send to other buckets (`forward`, `ctx.emit`),
//! delivered in order without ever waiting on a full mailbox.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::protocol::SendBatch;

use super::actor::ActorEnv;
use super::bucket::{BucketMsg, BucketStats};

/// Hops in a row from bucket to bucket: what a flush passes on (forward, emit) travels
/// one hop more than the most-travelled event in that flush, and a 9th hop is dropped
/// (and counted), so a forward or emit loop dies out.
pub const MAX_HOPS: u8 = 8;
/// Events waiting in a bucket's outbox for full mailboxes at most; older ones are
/// dropped (and counted) beyond it.
pub const MAX_OUTBOX_EVENTS: usize = 100_000;
/// How soon a delivery to a full mailbox is tried again.
const RETRY: Duration = Duration::from_millis(20);

/// Events on their way to another bucket.
struct Parcel {
    target: String,
    events: Vec<Vec<u8>>,
    hops: u8,
}

/// Who sends: the bucket's name (for logs) and owner (whose `send` permission counts).
pub(crate) struct Sender<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub stats: &'a BucketStats,
}

#[derive(Default)]
pub(crate) struct Outbox {
    parcels: VecDeque<Parcel>,
    events: usize,
    retry: Option<Instant>,
}

impl Outbox {
    /// When [`Outbox::deliver`] must run again, if anything waits.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry
    }

    /// Queues events for `target`, unless that would exceed the hop limit.
    pub fn post(&mut self, from: &Sender<'_>, target: String, events: Vec<Vec<u8>>, hops: u8) {
        if hops > MAX_HOPS {
            from.stats
                .forward_dropped
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            tracing::warn!(bucket = %from.name, target = %target,
                "dropped {} event(s) that would make more than {MAX_HOPS} hops in a row: a forward or emit loop?", events.len());
            return;
        }
        self.events += events.len();
        self.parcels.push_back(Parcel {
            target,
            events,
            hops,
        });
        while self.events > MAX_OUTBOX_EVENTS {
            let Some(old) = self.parcels.pop_front() else {
                break;
            };
            self.events -= old.events.len();
            from.stats
                .forward_dropped
                .fetch_add(old.events.len() as u64, Ordering::Relaxed);
            tracing::warn!(bucket = %from.name, target = %old.target,
                "outbox full ({MAX_OUTBOX_EVENTS} events): dropped {} event(s)", old.events.len());
        }
    }

    /// Delivers in order; stops at the first full mailbox and retries soon.
    pub fn deliver(&mut self, from: &Sender<'_>, env: &ActorEnv, now: Instant) {
        self.retry = None;
        while let Some(parcel) = self.parcels.pop_front() {
            let n = parcel.events.len();
            match try_deliver(from, env, parcel) {
                Ok(()) | Err(None) => self.events -= n,
                Err(Some(parcel)) => {
                    self.parcels.push_front(parcel);
                    self.retry = Some(now + RETRY);
                    return;
                }
            }
        }
    }
}

/// `Err(Some)`: try again later; `Err(None)`: dropped (and counted, and logged).
fn try_deliver(from: &Sender<'_>, env: &ActorEnv, parcel: Parcel) -> Result<(), Option<Parcel>> {
    let n = parcel.events.len() as u64;
    let drop = |why: &str| {
        from.stats.forward_dropped.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(bucket = %from.name, target = %parcel.target, "dropped {n} event(s): {why}");
        Err(None)
    };
    if !(env.may_send)(from.owner, &parcel.target) {
        let why = format!(
            "the bucket's owner {:?} lacks permission send on it",
            from.owner
        );
        return drop(&why);
    }
    let handle = env.registry.read().buckets.get(&parcel.target).cloned();
    let Some(handle) = handle else {
        return drop("no such bucket");
    };
    let msg = BucketMsg::Forwarded {
        batch: SendBatch::from_events(&parcel.events),
        hops: parcel.hops,
    };
    match handle.try_post(msg) {
        Ok(()) => {
            from.stats.forwarded.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
        Err(Some(_)) => Err(Some(parcel)),
        Err(None) => drop("the bucket was dropped"),
    }
}
