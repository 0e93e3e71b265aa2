//! One bucket on its handler thread: the handler instance, its schedule, its
//! subscribers and sinks. Only that thread touches an actor, so nothing here locks.
//!
//! A flush takes the handler's output (`flush(state, ctx)`, or `dump(state)`), wraps it
//! in a record, and hands it to every sink without waiting on any of them:
//!
//! ```text
//!  flush ─▶ record {"bucket","seq","time_ms","events","output"}
//!             ├─▶ subscribers  (bounded queue per connection; a laggard is dropped)
//!             ├─▶ forward      (one event into another bucket's mailbox, via the outbox)
//!             ├─▶ exec         (the events since the last flush, as files, to a command)
//!             └─ ctx.emit ───▶ (events into other buckets, via the outbox)
//! ```

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::protocol::{ErrorCode, Response, SendBatch, SendOutcome};
use crate::script::{FlushInfo, HandlerInstance, ScriptError};

use super::bucket::{BucketMsg, BucketShared};
use super::exec::{ExecSink, Run};
use super::options::BucketOptions;
use super::subscribers::Subscribers;
use super::trigger::Trigger;
use super::{now_ms, Registry, SendCheck};

/// Hops in a row from bucket to bucket: what a flush passes on (forward, emit) travels
/// one hop more than the most-travelled event in that flush, and a 9th hop is dropped
/// (and counted), so a forward or emit loop dies out.
pub const MAX_HOPS: u8 = 8;
/// Events an exec bucket keeps for its next run; reaching it flushes early.
pub const EXEC_MAX_PENDING_EVENTS: usize = 100_000;
/// Bytes of events an exec bucket keeps for its next run; reaching it flushes early.
pub const EXEC_MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// Events waiting in a bucket's outbox for full mailboxes at most; older ones are
/// dropped (and counted) beyond it.
pub const MAX_OUTBOX_EVENTS: usize = 100_000;
/// How soon a delivery to a full mailbox is tried again.
const OUTBOX_RETRY: Duration = Duration::from_millis(20);

/// What every actor shares: where other buckets are, who may send where, and where
/// exec sinks run.
pub(crate) struct ActorEnv {
    pub registry: Arc<RwLock<Registry>>,
    pub may_send: SendCheck,
    pub runtime: tokio::runtime::Handle,
    pub exec_dir: PathBuf,
}

/// Events on their way to another bucket.
struct Parcel {
    target: String,
    events: Vec<Vec<u8>>,
    hops: u8,
}

pub(crate) struct Actor {
    pub name: String,
    pub owner: String,
    pub instance: HandlerInstance,
    pub mailbox: mpsc::Receiver<BucketMsg>,
    pub shared: Arc<BucketShared>,
    options: BucketOptions,
    trigger: Trigger,
    subscribers: Subscribers,
    exec: Option<ExecSink>,
    /// Events since the last flush, kept for the exec sink only.
    retained: Vec<Vec<u8>>,
    retained_bytes: usize,
    /// Events accepted over the bucket's life; numbers the exec inbox files.
    ordinal: u64,
    /// Most hops among the events since the last flush.
    hops: u8,
    outbox: VecDeque<Parcel>,
    outbox_events: usize,
    outbox_retry: Option<Instant>,
    seq: u64,
    flush_failures: u64,
}

impl Actor {
    pub fn new(
        name: String,
        owner: String,
        instance: HandlerInstance,
        mailbox: mpsc::Receiver<BucketMsg>,
        shared: Arc<BucketShared>,
        options: BucketOptions,
        env: &ActorEnv,
    ) -> Actor {
        let now = Instant::now();
        let mut actor = Actor {
            name,
            owner,
            instance,
            mailbox,
            shared,
            trigger: Trigger::new(options.schedule(), now),
            options: BucketOptions::default(),
            subscribers: Subscribers::default(),
            exec: None,
            retained: Vec::new(),
            retained_bytes: 0,
            ordinal: 0,
            hops: 0,
            outbox: VecDeque::new(),
            outbox_events: 0,
            outbox_retry: None,
            seq: 0,
            flush_failures: 0,
        };
        actor.configure(options, env, now);
        actor
    }

    fn configure(&mut self, options: BucketOptions, env: &ActorEnv, now: Instant) {
        self.trigger.reschedule(options.schedule(), now);
        let exec_changed =
            options.exec != self.options.exec || options.exec_timeout != self.options.exec_timeout;
        if exec_changed {
            self.exec = options.exec.as_ref().map(|command| {
                ExecSink::start(
                    &env.runtime,
                    &self.name,
                    command,
                    options.exec_timeout(),
                    env.exec_dir.join(&self.name),
                    self.shared.exec.clone(),
                )
            });
            if self.exec.is_none() {
                self.retained = Vec::new();
                self.retained_bytes = 0;
            }
        }
        self.options = options;
    }

    /// When the thread must call [`Actor::tick`] next, if ever.
    pub fn wakeup(&self) -> Option<Instant> {
        match (self.trigger.deadline(), self.outbox_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what is due by time: a scheduled flush, a delivery retry.
    pub fn tick(&mut self, env: &ActorEnv, now: Instant) {
        if self.trigger.due(now) {
            self.flush(env, now);
        }
        if self.outbox_retry.is_some_and(|t| now >= t) {
            self.deliver(env, now);
        }
    }

    /// Handles one mailbox message; false once the bucket is dropped.
    pub fn handle(&mut self, msg: BucketMsg, env: &ActorEnv) -> bool {
        let (reply, response) = match msg {
            BucketMsg::Send { id, batch, reply } => {
                let outcome = self.apply(&batch, 0, env);
                self.shared.stats.sends.fetch_add(1, Ordering::Relaxed);
                (reply, Response::ok(id, outcome.encode()))
            }
            BucketMsg::Forwarded { batch, hops } => {
                let outcome = self.apply(&batch, hops, env);
                let stats = &self.shared.stats;
                stats
                    .received
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if outcome.rejected > 0 {
                    tracing::debug!(bucket = %self.name, rejected = outcome.rejected,
                        "forwarded events rejected by the handler");
                }
                return true;
            }
            BucketMsg::View { id, arg, reply } => {
                self.shared.stats.views.fetch_add(1, Ordering::Relaxed);
                let result = self.instance.view(arg.as_deref());
                (reply, self.json_response(id, result))
            }
            BucketMsg::Dump { id, reply } => {
                self.shared.stats.dumps.fetch_add(1, Ordering::Relaxed);
                let result = self.instance.dump();
                (reply, self.json_response(id, result))
            }
            BucketMsg::Subscribe {
                id,
                subscriber,
                reply,
            } => {
                let response = match self.subscribers.add(subscriber) {
                    Ok(()) => Response::empty(id),
                    Err(e) => Response::error(id, e.code(), &e.to_string()),
                };
                self.count_subscribers();
                (reply, response)
            }
            BucketMsg::Unsubscribe { key, sub } => {
                self.subscribers.remove(key, sub);
                self.count_subscribers();
                return true;
            }
            BucketMsg::Reconfigure { options } => {
                self.configure(options, env, Instant::now());
                return true;
            }
            BucketMsg::Stop => {
                let msg = format!("bucket {:?} was dropped", self.name);
                self.subscribers.end_all(ErrorCode::NoSuchBucket, &msg);
                return false;
            }
        };
        // A closed receiver means the connection went away; nothing to do.
        let _ = reply.send(response);
        true
    }

    /// Applies a batch event by event; a threshold reached mid-batch flushes right
    /// there, so every output holds exactly `threshold` events.
    fn apply(&mut self, batch: &SendBatch, hops: u8, env: &ActorEnv) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        let now = Instant::now();
        let keep = self.exec.is_some();
        for (i, event) in batch.iter().enumerate() {
            if let Err(reason) = self.instance.send(event) {
                outcome.reject(i as u32, || reason);
                self.note_failure();
                continue;
            }
            outcome.accepted += 1;
            self.ordinal += 1;
            self.hops = self.hops.max(hops);
            if keep {
                self.retained_bytes += event.len();
                self.retained.push(event.to_vec());
            }
            let full = keep
                && (self.retained.len() >= EXEC_MAX_PENDING_EVENTS
                    || self.retained_bytes >= EXEC_MAX_PENDING_BYTES);
            if self.trigger.event(now) || full {
                self.flush(env, now);
            }
        }
        let stats = &self.shared.stats;
        stats
            .events
            .fetch_add(u64::from(outcome.accepted), Ordering::Relaxed);
        stats
            .rejected
            .fetch_add(u64::from(outcome.rejected), Ordering::Relaxed);
        stats
            .pending
            .store(self.trigger.pending(), Ordering::Relaxed);
        outcome
    }

    fn json_response(&self, id: u32, result: Result<Vec<u8>, ScriptError>) -> Response {
        match result {
            Ok(json) => Response::ok(id, json.into()),
            Err(e) => {
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.note_failure();
                let e = Error::Handler(e.to_string());
                Response::error(id, e.code(), &e.to_string())
            }
        }
    }

    fn note_failure(&self) {
        if let Some(why) = self.instance.failure() {
            let mut failure = self.shared.stats.failure.lock();
            if failure.is_none() {
                tracing::warn!(bucket = %self.name, "handler failed: {why}; drop and create the bucket again");
                *failure = Some(why.to_owned());
            }
        }
    }

    fn count_subscribers(&self) {
        self.shared
            .stats
            .subscribers
            .store(self.subscribers.len() as u64, Ordering::Relaxed);
    }

    /// A scheduled flush: the handler's output to every sink.
    fn flush(&mut self, env: &ActorEnv, now: Instant) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let events = self.trigger.pending();
        if events == 0 && !self.options.emit_empty {
            self.trigger.flushed(now);
            return;
        }
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        let time_ms = now_ms();
        let info = FlushInfo {
            bucket: &self.name,
            seq: self.seq + 1,
            events,
            time_ms,
        };
        let flushed = match self.instance.flush(&info) {
            Ok(flushed) => flushed,
            Err(e) => {
                self.trigger.failed(now);
                stats.flush_errors.fetch_add(1, Ordering::Relaxed);
                self.flush_failures += 1;
                // The first failure, then every 100th: a broken handler must not
                // flood the log at every period.
                if self.flush_failures % 100 == 1 {
                    tracing::warn!(bucket = %self.name, failures = self.flush_failures,
                        "flush failed; its events stay for the next flush: {e}");
                }
                self.note_failure();
                return;
            }
        };
        self.trigger.flushed(now);
        stats.pending.store(0, Ordering::Relaxed);
        let hops = self.hops.saturating_add(1);
        self.hops = 0;
        let retained = std::mem::take(&mut self.retained);
        self.retained_bytes = 0;
        let first = self.ordinal + 1 - retained.len() as u64;
        for emit in flushed.emits {
            self.post(emit.bucket, vec![emit.event], hops);
        }
        // A `flush` that returned nil outputs nothing, but an exec sink still gets the
        // events (with a null output).
        if flushed.output.is_some() || self.exec.is_some() {
            self.seq += 1;
            stats.outputs.store(self.seq, Ordering::Relaxed);
            let output = flushed.output.as_deref().unwrap_or(b"null");
            let record = record(&self.name, self.seq, time_ms, events, output);
            if flushed.output.is_some() {
                self.publish(&record, hops);
            }
            if let Some(exec) = &self.exec {
                exec.submit(Run {
                    seq: self.seq,
                    first,
                    events: retained,
                    output: record,
                });
            }
        }
        self.deliver(env, now);
    }

    /// A record to the subscribers and the forward target.
    fn publish(&mut self, record: &Bytes, hops: u8) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let published = self.subscribers.publish(&self.name, record);
        if published.lagged > 0 {
            stats.lagged.fetch_add(published.lagged, Ordering::Relaxed);
            tracing::info!(bucket = %self.name, "disconnected {} subscriber(s) that fell behind", published.lagged);
        }
        self.count_subscribers();
        if let Some(target) = self.options.forward.clone() {
            self.post(target, vec![record.to_vec()], hops);
        }
    }

    /// Queues events for another bucket, unless that would exceed the hop limit.
    fn post(&mut self, target: String, events: Vec<Vec<u8>>, hops: u8) {
        let stats = &self.shared.stats;
        if hops > MAX_HOPS {
            stats
                .forward_dropped
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            tracing::warn!(bucket = %self.name, target = %target,
                "dropped {} event(s) that would make more than {MAX_HOPS} hops in a row: a forward or emit loop?", events.len());
            return;
        }
        self.outbox_events += events.len();
        self.outbox.push_back(Parcel {
            target,
            events,
            hops,
        });
        while self.outbox_events > MAX_OUTBOX_EVENTS {
            let Some(old) = self.outbox.pop_front() else {
                break;
            };
            self.outbox_events -= old.events.len();
            stats
                .forward_dropped
                .fetch_add(old.events.len() as u64, Ordering::Relaxed);
            tracing::warn!(bucket = %self.name, target = %old.target,
                "outbox full ({MAX_OUTBOX_EVENTS} events): dropped {} event(s)", old.events.len());
        }
    }

    /// Delivers the outbox in order; stops at the first full mailbox and retries soon.
    fn deliver(&mut self, env: &ActorEnv, now: Instant) {
        self.outbox_retry = None;
        while let Some(parcel) = self.outbox.pop_front() {
            let n = parcel.events.len();
            match self.try_deliver(env, parcel) {
                Ok(()) => {
                    self.outbox_events -= n;
                }
                Err(Some(parcel)) => {
                    self.outbox.push_front(parcel);
                    self.outbox_retry = Some(now + OUTBOX_RETRY);
                    return;
                }
                Err(None) => {
                    self.outbox_events -= n;
                }
            }
        }
    }

    /// `Err(Some)`: try again later; `Err(None)`: dropped (and counted, and logged).
    fn try_deliver(&self, env: &ActorEnv, parcel: Parcel) -> Result<(), Option<Parcel>> {
        let stats = &self.shared.stats;
        let n = parcel.events.len() as u64;
        let drop = |why: &str| {
            stats.forward_dropped.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(bucket = %self.name, target = %parcel.target, "dropped {n} event(s): {why}");
            Err(None)
        };
        if !(env.may_send)(&self.owner, &parcel.target) {
            let why = format!(
                "the bucket's owner {:?} lacks permission send on it",
                self.owner
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
                stats.forwarded.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(Some(_)) => Err(Some(parcel)),
            Err(None) => drop("the bucket was dropped"),
        }
    }
}

/// The output record: `{"bucket","seq","time_ms","events","output"}`, keys sorted like
/// every JSON object the server writes.
fn record(bucket: &str, seq: u64, time_ms: u64, events: u64, output: &[u8]) -> Bytes {
    let name = serde_json::to_string(bucket).unwrap_or_else(|_| "\"\"".into());
    let mut out = Vec::with_capacity(output.len() + name.len() + 80);
    out.extend_from_slice(b"{\"bucket\":");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(format!(",\"events\":{events},\"output\":").as_bytes());
    out.extend_from_slice(output);
    out.extend_from_slice(format!(",\"seq\":{seq},\"time_ms\":{time_ms}}}").as_bytes());
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_is_json_with_sorted_keys() {
        let r = super::record("b", 3, 17, 2, br#"{"a":2}"#);
        let v: serde_json::Value = serde_json::from_slice(&r).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"bucket": "b", "events": 2, "output": {"a": 2}, "seq": 3, "time_ms": 17})
        );
        assert_eq!(&r[..10], br#"{"bucket":"#);
    }
}
