//! Live subscribers of a bucket's flush outputs.
//!
//! ```text
//!  bucket actor ──offer (never waits)──▶ PushSink ══ bounded queue ══▶ PushStream ─▶ connection writer
//!                 full or over bytes? ──▶ lagged: the writer sends FATAL SLOW_CONSUMER and closes
//! ```
//!
//! Each connection has one queue for all its subscriptions, bounded in outputs
//! ([`PUSH_QUEUE`]) and in bytes ([`PUSH_QUEUE_BYTES`]). The actor never waits on it:
//! a subscriber that falls behind is disconnected, so a slow reader cannot slow the
//! bucket, other subscribers or the senders.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use crate::error::Error;
use crate::protocol::ErrorCode;

/// Outputs queued for one connection at most.
pub const PUSH_QUEUE: usize = 1024;
/// Bytes of outputs queued for one connection at most.
pub const PUSH_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Subscribers one bucket may have.
pub const MAX_SUBSCRIBERS_PER_BUCKET: usize = 1024;
/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 64;

/// What travels to a connection for one of its subscriptions.
#[derive(Debug)]
pub struct Push {
    /// The subscription: the SUBSCRIBE request's id.
    pub sub: u32,
    /// An output, or the end of the subscription.
    pub kind: PushKind,
}

/// The content of a [`Push`].
#[derive(Debug)]
pub enum PushKind {
    /// One flush output (JSON).
    Output(Bytes),
    /// The subscription ended (the bucket was dropped, the permission revoked).
    End(ErrorCode, String),
}

impl Push {
    fn cost(&self) -> usize {
        match &self.kind {
            PushKind::Output(b) => b.len(),
            PushKind::End(_, m) => m.len(),
        }
    }
}

#[derive(Default)]
struct Shared {
    bytes: AtomicUsize,
    lagged: AtomicBool,
    notify: Notify,
}

/// The sending end of a connection's push queue, held by bucket actors.
#[derive(Clone)]
pub struct PushSink {
    tx: mpsc::Sender<Push>,
    shared: Arc<Shared>,
}

/// The receiving end, held by the connection's writer.
pub struct PushStream {
    rx: mpsc::Receiver<Push>,
    shared: Arc<Shared>,
}

/// A new queue for one connection.
pub fn push_channel() -> (PushSink, PushStream) {
    let (tx, rx) = mpsc::channel(PUSH_QUEUE);
    let shared = Arc::new(Shared::default());
    (
        PushSink {
            tx,
            shared: shared.clone(),
        },
        PushStream { rx, shared },
    )
}

enum Offer {
    Sent,
    Gone,
    Lagged,
}

impl PushSink {
    /// Identifies the connection (for UNSUBSCRIBE).
    pub fn key(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    fn offer(&self, push: Push) -> Offer {
        if self.shared.lagged.load(Ordering::Acquire) {
            return Offer::Lagged;
        }
        let cost = push.cost();
        let before = self.shared.bytes.fetch_add(cost, Ordering::AcqRel);
        let result = if before + cost > PUSH_QUEUE_BYTES {
            Err(mpsc::error::TrySendError::Full(push))
        } else {
            self.tx.try_send(push)
        };
        match result {
            Ok(()) => Offer::Sent,
            Err(e) => {
                self.shared.bytes.fetch_sub(cost, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Closed(_) => Offer::Gone,
                    mpsc::error::TrySendError::Full(_) => {
                        self.shared.lagged.store(true, Ordering::Release);
                        self.shared.notify.notify_one();
                        Offer::Lagged
                    }
                }
            }
        }
    }
}

impl PushStream {
    /// The next push; `None` once no bucket holds this connection's sink any more and
    /// the queue is empty (never while the connection itself keeps a sink).
    pub async fn recv(&mut self) -> Option<Push> {
        let push = self.rx.recv().await?;
        self.shared.bytes.fetch_sub(push.cost(), Ordering::AcqRel);
        Some(push)
    }

    /// The next push if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Push> {
        let push = self.rx.try_recv().ok()?;
        self.shared.bytes.fetch_sub(push.cost(), Ordering::AcqRel);
        Some(push)
    }

    /// Marks the connection as fallen behind (the writer's own overflow).
    pub fn mark_lagged(&self) {
        self.shared.lagged.store(true, Ordering::Release);
        self.shared.notify.notify_one();
    }

    /// Whether an actor found this connection's queue full.
    pub fn is_lagged(&self) -> bool {
        self.shared.lagged.load(Ordering::Acquire)
    }

    /// A handle that waits for the connection to fall behind, usable while the stream
    /// itself is borrowed to receive.
    pub fn lag_signal(&self) -> LagSignal {
        LagSignal(self.shared.clone())
    }
}

/// See [`PushStream::lag_signal`].
pub struct LagSignal(Arc<Shared>);

impl LagSignal {
    /// Completes once an actor (or the writer) found this connection's queue full.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.0.lagged.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Whether the subscriber may still receive a bucket's outputs (its user still holds
/// `subscribe` on it); asked before every output.
pub type StillAllowed = Arc<dyn Fn() -> bool + Send + Sync>;

/// One subscription, as the bucket actor keeps it.
pub struct Subscriber {
    /// Where its outputs go.
    pub sink: PushSink,
    /// The SUBSCRIBE request's id.
    pub sub: u32,
    /// Checked before each output.
    pub allowed: StillAllowed,
}

/// A bucket's subscribers.
#[derive(Default)]
pub(crate) struct Subscribers {
    list: Vec<Subscriber>,
}

/// What a publish did, for the counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Published {
    pub delivered: u64,
    pub lagged: u64,
}

impl Subscribers {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Adds a subscriber, first forgetting those whose connection is gone.
    ///
    /// # Errors
    /// `LimitExceeded` at [`MAX_SUBSCRIBERS_PER_BUCKET`].
    pub fn add(&mut self, s: Subscriber) -> Result<(), Error> {
        self.list.retain(|s| !s.sink.tx.is_closed());
        if self.list.len() >= MAX_SUBSCRIBERS_PER_BUCKET {
            return Err(Error::LimitExceeded(format!(
                "the bucket has its maximum of {MAX_SUBSCRIBERS_PER_BUCKET} subscribers"
            )));
        }
        self.list.push(s);
        Ok(())
    }

    /// Forgets subscription `sub` of connection `key`.
    pub fn remove(&mut self, key: usize, sub: u32) {
        self.list.retain(|s| !(s.sink.key() == key && s.sub == sub));
    }

    /// Offers `output` to every subscriber. Those whose connection is gone or lagging
    /// are dropped; those whose permission was revoked get an END.
    pub fn publish(&mut self, bucket: &str, output: &Bytes) -> Published {
        let mut p = Published::default();
        self.list.retain(|s| {
            if !(s.allowed)() {
                let msg = format!("permission subscribe on bucket {bucket:?} was revoked");
                let _ = s.sink.offer(Push {
                    sub: s.sub,
                    kind: PushKind::End(ErrorCode::PermissionDenied, msg),
                });
                return false;
            }
            let push = Push {
                sub: s.sub,
                kind: PushKind::Output(output.clone()),
            };
            match s.sink.offer(push) {
                Offer::Sent => {
                    p.delivered += 1;
                    true
                }
                Offer::Gone => false,
                Offer::Lagged => {
                    p.lagged += 1;
                    false
                }
            }
        });
        p
    }

    /// Ends every subscription (the bucket is going away).
    pub fn end_all(&mut self, code: ErrorCode, message: &str) {
        for s in self.list.drain(..) {
            let _ = s.sink.offer(Push {
                sub: s.sub,
                kind: PushKind::End(code, message.to_owned()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(sink: &PushSink, sub: u32, allowed: bool) -> Subscriber {
        Subscriber {
            sink: sink.clone(),
            sub,
            allowed: Arc::new(move || allowed),
        }
    }

    #[tokio::test]
    async fn outputs_reach_every_subscriber_in_order() {
        let (sink, mut stream) = push_channel();
        let mut subs = Subscribers::default();
        subs.add(subscriber(&sink, 1, true)).expect("add");
        subs.add(subscriber(&sink, 2, true)).expect("add");
        let p = subs.publish("b", &Bytes::from_static(b"1"));
        assert_eq!(p.delivered, 2);
        subs.remove(sink.key(), 1);
        subs.publish("b", &Bytes::from_static(b"2"));
        let mut got = Vec::new();
        for _ in 0..3 {
            let push = stream.recv().await.expect("push");
            let PushKind::Output(b) = push.kind else {
                panic!("output expected")
            };
            got.push((push.sub, b));
        }
        assert_eq!(
            got,
            [
                (1, Bytes::from_static(b"1")),
                (2, Bytes::from_static(b"1")),
                (2, Bytes::from_static(b"2"))
            ]
        );
    }

    #[tokio::test]
    async fn a_full_queue_marks_the_connection_lagged_and_drops_it() {
        let (sink, stream) = push_channel();
        let mut subs = Subscribers::default();
        subs.add(subscriber(&sink, 1, true)).expect("add");
        for _ in 0..PUSH_QUEUE {
            assert_eq!(subs.publish("b", &Bytes::from_static(b"x")).delivered, 1);
        }
        let p = subs.publish("b", &Bytes::from_static(b"x"));
        assert_eq!(
            p,
            Published {
                delivered: 0,
                lagged: 1
            }
        );
        assert_eq!(subs.len(), 0, "the lagging subscriber is dropped");
        stream.lag_signal().wait().await;
    }

    #[tokio::test]
    async fn the_byte_bound_holds_too() {
        let (sink, stream) = push_channel();
        let mut subs = Subscribers::default();
        subs.add(subscriber(&sink, 1, true)).expect("add");
        let big = Bytes::from(vec![b'x'; PUSH_QUEUE_BYTES / 2 + 1]);
        assert_eq!(subs.publish("b", &big).delivered, 1);
        assert_eq!(subs.publish("b", &big).lagged, 1);
        stream.lag_signal().wait().await;
    }

    #[tokio::test]
    async fn revoked_subscribers_get_an_end() {
        let (sink, mut stream) = push_channel();
        let mut subs = Subscribers::default();
        subs.add(subscriber(&sink, 9, false)).expect("add");
        assert_eq!(subs.publish("b", &Bytes::from_static(b"x")).delivered, 0);
        let push = stream.recv().await.expect("end");
        assert!(matches!(
            push.kind,
            PushKind::End(ErrorCode::PermissionDenied, _)
        ));
        assert_eq!(subs.len(), 0);
    }
}
