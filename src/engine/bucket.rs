//! A bucket as the rest of the server sees it: a cloneable handle with a bounded mailbox.
//! The state itself lives on the handler thread that owns the bucket ([`super::worker`]),
//! except that a native one may be applied to by connections ([`super::lane`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::protocol::{Response, SendBatch};
use crate::store::BucketSpec;

use super::exec::ExecStats;
use super::lane::Lane;
use super::options::BucketOptions;
use super::subscribers::Subscriber;
use super::worker::WorkerMsg;

/// Where the actor sends its answer to one request.
pub type Reply = oneshot::Sender<Response>;

/// The answers to a [`BucketMsg::SendMany`], already encoded: `count` response frames,
/// in request order, for the connection's writer to copy out as they are.
#[derive(Debug)]
pub struct EncodedAnswers {
    /// Frames in `frames`.
    pub count: usize,
    /// The response frames, each with its length prefix.
    pub frames: Bytes,
}

/// A message in a bucket's mailbox. One SEND frame is one message, whatever its size.
pub enum BucketMsg {
    /// Apply a batch of events.
    Send {
        /// Request id, echoed in the response.
        id: u32,
        /// The events.
        batch: SendBatch,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Consecutive SEND frames of one connection, read together: applied in order as
    /// if they were separate `Send` messages, answered together (one answer each).
    SendMany {
        /// Request ids and events, in request order.
        items: Vec<(u32, SendBatch)>,
        /// Where the answers go, in the same order.
        reply: oneshot::Sender<EncodedAnswers>,
    },
    /// Read the aggregate.
    View {
        /// Request id.
        id: u32,
        /// Argument for the handler's `view`.
        arg: Option<Bytes>,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Read the aggregate and reset it.
    Dump {
        /// Request id.
        id: u32,
        /// Where the answer goes.
        reply: Reply,
    },
    /// The pending take, made from the aggregate if there is none ([`super::take`]).
    Take {
        /// Request id.
        id: u32,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Forget the pending take `take`.
    Release {
        /// Request id.
        id: u32,
        /// The take's id.
        take: u64,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Events another bucket's flush sent here (`forward` or `ctx.emit`); no answer.
    Forwarded {
        /// The events.
        batch: SendBatch,
        /// Flushes the events went through on their way here (bounds loops).
        hops: u8,
    },
    /// Start sending this subscriber the bucket's outputs.
    Subscribe {
        /// Request id.
        id: u32,
        /// The subscriber.
        subscriber: Subscriber,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Forget subscription `sub` of the connection `key`; no answer.
    Unsubscribe {
        /// [`super::PushSink::key`] of the connection.
        key: usize,
        /// The SUBSCRIBE request's id.
        sub: u32,
    },
    /// New options (ALTER): the schedule and sinks change, the state stays.
    Reconfigure {
        /// The checked options.
        options: BucketOptions,
    },
    /// The bucket was dropped: the actor answers what is queued before this and ends.
    Stop,
}

/// Counters shared between the actor (writer) and INFO (reader).
#[derive(Debug, Default)]
pub struct BucketStats {
    /// Events the handler accepted.
    pub events: AtomicU64,
    /// Events the handler rejected.
    pub rejected: AtomicU64,
    /// Handler errors in view and dump.
    pub errors: AtomicU64,
    /// SEND frames applied.
    pub sends: AtomicU64,
    /// VIEW requests answered.
    pub views: AtomicU64,
    /// DUMP requests answered.
    pub dumps: AtomicU64,
    /// Takes made (the last one's id).
    pub takes: AtomicU64,
    /// The pending take's id, 0 if there is none.
    pub take_pending: AtomicU64,
    /// Bytes used by the handler state after the last message or fast-lane group.
    pub memory: AtomicU64,
    /// Scheduled flushes that ran (including those with nothing to output).
    pub flushes: AtomicU64,
    /// Outputs produced (the last one's `seq`).
    pub outputs: AtomicU64,
    /// Flushes whose handler call failed (the events stay for the next one).
    pub flush_errors: AtomicU64,
    /// Live subscribers.
    pub subscribers: AtomicU64,
    /// Subscribers disconnected for falling behind.
    pub lagged: AtomicU64,
    /// Events sent on to other buckets (`forward` and `ctx.emit`).
    pub forwarded: AtomicU64,
    /// Events that could not be sent on (no such bucket, no permission, loop, overflow).
    pub forward_dropped: AtomicU64,
    /// Events received from other buckets.
    pub received: AtomicU64,
    /// Events waiting for the next flush.
    pub pending: AtomicU64,
    /// Why the bucket's handler is failed (time budget), if it is.
    pub failure: parking_lot::Mutex<Option<String>>,
    /// A durable bucket's last snapshot and recovery, as INFO shows them, published by
    /// the actor.
    pub durable: parking_lot::Mutex<Option<serde_json::Value>>,
    /// A durable bucket's log position, which the fast lane moves too: INFO reads it live.
    pub(crate) position: std::sync::OnceLock<Arc<super::durable::Position>>,
}

/// State shared by a bucket's handle and its actor.
#[derive(Debug, Default)]
pub struct BucketShared {
    /// True while the bucket is queued to run on its handler thread (or running). Lets
    /// senders skip waking the thread; see the protocol in [`BucketHandle::post`].
    pub(crate) scheduled: AtomicBool,
    /// Counters for INFO.
    pub stats: BucketStats,
    /// Counters of the exec sink.
    pub exec: Arc<ExecStats>,
    /// SENDs applied by connections while the actor is idle ([`super::lane`]).
    pub(crate) lane: Lane,
}

/// A cloneable reference to one bucket.
pub struct BucketHandle {
    pub(crate) id: u64,
    /// Bucket name.
    pub name: String,
    /// Configuration as created or last altered (and stored).
    pub spec: BucketSpec,
    /// `spec.options`, checked.
    pub options: BucketOptions,
    /// Index of the handler thread that owns the bucket.
    pub worker_index: usize,
    pub(crate) tx: mpsc::Sender<BucketMsg>,
    pub(crate) worker: crossbeam_channel::Sender<WorkerMsg>,
    /// Shared counters.
    pub shared: Arc<BucketShared>,
}

impl BucketHandle {
    /// Queues `msg` for the actor, waiting while the mailbox is full (back-pressure
    /// reaches the sending connection, which stops reading its socket).
    ///
    /// # Errors
    /// [`Error::NoSuchBucket`] if the bucket was dropped meanwhile.
    pub async fn post(&self, msg: BucketMsg) -> Result<(), Error> {
        let queued = self.shared.lane.queue();
        self.tx
            .send(msg)
            .await
            .map_err(|_| Error::NoSuchBucket(self.name.clone()))?;
        // The actor counts it as handled.
        std::mem::forget(queued);
        self.wake();
        Ok(())
    }

    /// Queues `msg` without waiting; gives it back if the mailbox is full or the bucket
    /// gone (`None` then).
    pub(crate) fn try_post(&self, msg: BucketMsg) -> Result<(), Option<BucketMsg>> {
        let queued = self.shared.lane.queue();
        match self.tx.try_send(msg) {
            Ok(()) => {
                std::mem::forget(queued);
                self.wake();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(msg)) => Err(Some(msg)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }

    fn wake(&self) {
        // The thread clears `scheduled` before draining the mailbox, so either it sees
        // our message or we see `false` here and wake it. A spare wake-up is harmless.
        if !self.shared.scheduled.swap(true, Ordering::AcqRel) {
            let _ = self.worker.send(WorkerMsg::Run(self.id));
        }
    }

    /// Messages waiting in the mailbox.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Mailbox capacity.
    pub fn queue_capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

/// Largest bucket name, in bytes.
pub const MAX_BUCKET_NAME: usize = 255;

/// Checks a bucket name: 1 to 255 of `A-Z a-z 0-9 . _ - :`.
///
/// # Errors
/// [`Error::InvalidArgument`] describing the rule.
pub fn validate_bucket_name(name: &str) -> Result<(), Error> {
    let ok = (1..=MAX_BUCKET_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid bucket name {name:?}: use 1 to {MAX_BUCKET_NAME} characters of A-Z a-z 0-9 . _ - :"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in ["a", "clicks.home", "A-b_c:1", &"x".repeat(255)] {
            validate_bucket_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a b", "a*", "é", &"x".repeat(256)] {
            assert!(validate_bucket_name(bad).is_err(), "{bad:?}");
        }
    }
}
