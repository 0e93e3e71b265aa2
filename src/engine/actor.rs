//! One bucket on its handler thread: the handler instance, its schedule, its
//! subscribers and sinks, and for a durable bucket its log. Only that thread touches an
//! actor; the only lock is a native handler's state, which the connections' fast lane
//! ([`super::lane`]) shares while the actor is idle.
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
//!
//! A durable bucket answers SEND and DUMP, and delivers a flush's output, only once the
//! request's log record has committed ([`super::durable`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::protocol::{ErrorCode, Response, SendBatch, SendOutcome};
use crate::script::{Emit, FlushInfo, HandlerInstance, HandlerSource, ScriptError, ScriptLimits};
use crate::store::log::{Completion, DurableLog, Outcome, Record, SEND_TAG};
use crate::store::{Store, StoreError};

use super::bucket::{BucketMsg, BucketShared, EncodedAnswers, Reply};
use super::durable::{not_written, Durable, Recovery};
use super::exec::{ExecSink, Run};
use super::options::{BucketOptions, Schedule};
use super::outbox::{Outbox, Sender};
use super::subscribers::Subscribers;
use super::take::{Release, Takes};
use super::trigger::Trigger;
use super::worker::WorkerMsg;
use super::{now_ms, Registry, SendCheck};

/// Events an exec bucket keeps for its next run; reaching it flushes early.
pub const EXEC_MAX_PENDING_EVENTS: usize = 100_000;
/// Bytes of events an exec bucket keeps for its next run; reaching it flushes early.
pub const EXEC_MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;

/// What every actor shares: where other buckets are, who may send where, where exec
/// sinks run, and the durable log.
pub(crate) struct ActorEnv {
    pub registry: Arc<RwLock<Registry>>,
    pub may_send: SendCheck,
    pub runtime: tokio::runtime::Handle,
    pub exec_dir: PathBuf,
    pub store: Arc<Store>,
    pub log: Arc<DurableLog>,
}

/// Everything a new actor starts from.
pub(crate) struct ActorInit {
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub instance: HandlerInstance,
    pub mailbox: mpsc::Receiver<BucketMsg>,
    pub shared: Arc<BucketShared>,
    pub options: BucketOptions,
    pub handler: Arc<HandlerSource>,
    pub config: serde_json::Value,
    pub limits: ScriptLimits,
    pub worker: crossbeam_channel::Sender<WorkerMsg>,
    /// The durable log uid; 0 for an in-memory bucket.
    pub uid: u64,
    /// Where the first take's window starts (ms since the epoch); see `Takes::new`.
    pub first_window_ms: u64,
}

/// Where a flush's output goes; for a durable bucket, once its record has committed.
struct Delivery {
    record: Option<Bytes>,
    hops: u8,
    run: Option<Run>,
    emits: Vec<Emit>,
}

pub(crate) struct Actor {
    id: u64,
    pub name: String,
    owner: String,
    pub instance: HandlerInstance,
    pub mailbox: mpsc::Receiver<BucketMsg>,
    pub shared: Arc<BucketShared>,
    handler: Arc<HandlerSource>,
    config: serde_json::Value,
    limits: ScriptLimits,
    worker: crossbeam_channel::Sender<WorkerMsg>,
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
    outbox: Outbox,
    seq: u64,
    flush_failures: u64,
    durable: Option<Durable>,
    /// Flush outputs of a durable bucket waiting for their records to commit.
    awaiting: VecDeque<(u64, Delivery)>,
    /// The records of the SEND group being applied, gathered into one.
    group_record: Option<GroupRecord>,
    /// Where the first take's window starts; recovery resets to it before replay.
    first_window_ms: u64,
    /// The two-phase dump's pending take ([`super::take`]).
    takes: Takes,
}

/// A completion that sends `response` (or the failure) to `reply`.
fn answer_after_commit(id: u32, reply: Reply, response: Response) -> Completion {
    Box::new(move |outcome: Outcome<'_>| {
        let _ = reply.send(match outcome {
            Ok(()) => response,
            Err(e) => not_written(id, e),
        });
    })
}

/// The answers of a [`BucketMsg::SendMany`]: sent together once every answer is set
/// and every record of the group has committed (or failed, which turns that frame's
/// answer into the refusal).
#[derive(Clone)]
struct GroupReply(Arc<parking_lot::Mutex<GroupState>>);

/// The tails of a durable group's frames, gathered into one log record (one op and one
/// commit entry for the group instead of one per frame). Logged before any other record
/// of the bucket, so replay sees the events in the order they were applied.
struct GroupRecord {
    group: GroupReply,
    /// `SEND_TAG`, then the count (patched when logged), then the events.
    record: Vec<u8>,
    count: u32,
    /// The frames it answers: (index in the group, request id).
    frames: Vec<(usize, u32)>,
}

/// The answer to one SEND: its outcome (encoded straight into the group's frames, no
/// response built), or a refusal.
enum Answer {
    Sent(u32, SendOutcome),
    Other(Response),
}

impl Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Sent(id, outcome) => Response::ok(id, outcome.encode()),
            Answer::Other(response) => response,
        }
    }
}

struct GroupState {
    responses: Vec<Option<Answer>>,
    /// Commits still awaited, plus one while the actor is still applying the group.
    outstanding: usize,
    reply: Option<oneshot::Sender<EncodedAnswers>>,
}

impl GroupState {
    fn settle(&mut self) {
        self.outstanding -= 1;
        if self.outstanding == 0 {
            if let Some(reply) = self.reply.take() {
                let answers = std::mem::take(&mut self.responses);
                let mut frames = BytesMut::with_capacity(answers.len() * 19);
                let mut count = 0;
                for answer in answers.into_iter().flatten() {
                    match answer {
                        Answer::Sent(id, outcome) => outcome.encode_answer(id, &mut frames),
                        Answer::Other(response) => response.encode(&mut frames),
                    }
                    count += 1;
                }
                let frames = frames.freeze();
                let _ = reply.send(EncodedAnswers { count, frames });
            }
        }
    }
}

impl GroupReply {
    fn new(n: usize, reply: oneshot::Sender<EncodedAnswers>) -> GroupReply {
        GroupReply(Arc::new(parking_lot::Mutex::new(GroupState {
            responses: (0..n).map(|_| None).collect(),
            outstanding: 1,
            reply: Some(reply),
        })))
    }

    /// Sets frame `index`'s answer, unless its commit already failed.
    fn set(&self, index: usize, response: Answer) {
        let mut state = self.0.lock();
        if let Some(slot @ None) = state.responses.get_mut(index) {
            *slot = Some(response);
        }
    }

    /// A completion for the record holding `frames` (index in the group, request id).
    fn after_commit(&self, frames: Vec<(usize, u32)>) -> Completion {
        self.0.lock().outstanding += 1;
        let state = self.0.clone();
        Box::new(move |outcome: Outcome<'_>| {
            let mut state = state.lock();
            if let Err(e) = outcome {
                for (index, id) in frames {
                    if let Some(slot) = state.responses.get_mut(index) {
                        *slot = Some(Answer::Other(not_written(id, e)));
                    }
                }
            }
            state.settle();
        })
    }

    /// The actor is done with the group.
    fn release(self) {
        self.0.lock().settle();
    }
}

impl Actor {
    pub fn new(init: ActorInit, env: &ActorEnv) -> Actor {
        let now = Instant::now();
        let mut actor = Actor {
            id: init.id,
            name: init.name,
            owner: init.owner,
            instance: init.instance,
            mailbox: init.mailbox,
            shared: init.shared,
            handler: init.handler,
            config: init.config,
            limits: init.limits,
            worker: init.worker,
            trigger: Trigger::new(init.options.schedule(), now),
            options: BucketOptions::default(),
            subscribers: Subscribers::default(),
            exec: None,
            retained: Vec::new(),
            retained_bytes: 0,
            ordinal: 0,
            hops: 0,
            outbox: Outbox::default(),
            seq: 0,
            flush_failures: 0,
            durable: (init.uid != 0).then(|| Durable::new(init.uid)),
            awaiting: VecDeque::new(),
            group_record: None,
            first_window_ms: init.first_window_ms,
            takes: Takes::new(init.first_window_ms),
        };
        actor.attach_lane(env);
        actor.configure(init.options, env, now);
        actor
    }

    /// Gives the fast lane ([`super::lane`]) the handler's native state, if it has one,
    /// and a durable bucket's log.
    fn attach_lane(&self, env: &ActorEnv) {
        if let Some(d) = &self.durable {
            // Set once: a bucket's position lives as long as its actor.
            let _ = self.shared.stats.position.set(d.position());
        }
        let log = self.durable.as_ref().map(|d| d.lane_log(&env.log));
        self.shared.lane.attach(self.instance.shared_native(), log);
    }

    /// Counts the events connections applied through the lane ([`super::lane`]) as if
    /// they had come through the mailbox, and opens or closes the lane for what follows:
    /// it is open for a native handler without an exec sink or a threshold schedule.
    /// Called at the start of every message and tick.
    fn sync_lane(&mut self) {
        let open =
            self.exec.is_none() && !matches!(self.options.schedule(), Schedule::Threshold { .. });
        self.take_lane_events(open);
    }

    /// Counts the events the lane applied, and leaves it `open` or closed.
    fn take_lane_events(&mut self, open: bool) {
        let events = self.instance.take_inline_events(open);
        if events > 0 {
            self.trigger.add_pending(events, Instant::now());
            self.takes.events += events;
            self.ordinal += events;
        }
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
        self.sync_lane();
    }

    fn sender(&self) -> Sender<'_> {
        Sender {
            name: &self.name,
            owner: &self.owner,
            stats: &self.shared.stats,
        }
    }

    /// When the thread must call [`Actor::tick`] next, if ever.
    pub fn wakeup(&self) -> Option<Instant> {
        match (self.trigger.deadline(), self.outbox.retry_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what is due by time: a scheduled flush, a delivery retry.
    pub fn tick(&mut self, env: &ActorEnv, now: Instant) {
        self.sync_lane();
        if self.trigger.due(now) {
            self.flush(env, now);
        }
        if self.outbox.retry_at().is_some_and(|t| now >= t) {
            let mut outbox = std::mem::take(&mut self.outbox);
            outbox.deliver(&self.sender(), env, now);
            self.outbox = outbox;
        }
    }

    /// Why a durable request must be refused now, if it must.
    fn unavailable(&self, env: &ActorEnv) -> Option<String> {
        self.durable.as_ref().and_then(|d| d.unavailable(env))
    }

    /// Handles one mailbox message; false once the bucket is dropped.
    pub fn handle(&mut self, msg: BucketMsg, env: &ActorEnv) -> bool {
        self.sync_lane();
        let (reply, response) = match msg {
            BucketMsg::Send { id, batch, reply } => match self.send(id, &batch, env) {
                (answer, None) => (reply, answer.into_response()),
                (answer, Some(record)) => {
                    let done = answer_after_commit(id, reply, answer.into_response());
                    self.append(env, record, Some(done));
                    return true;
                }
            },
            BucketMsg::SendMany { items, reply } => {
                let group = GroupReply::new(items.len(), reply);
                for (index, (id, batch)) in items.into_iter().enumerate() {
                    let (response, record) = self.send(id, &batch, env);
                    if let Some(record) = record {
                        self.gather_record(&group, index, id, &record);
                    }
                    group.set(index, response);
                }
                self.log_group_record(env);
                group.release();
                return true;
            }
            BucketMsg::Forwarded { batch, hops } => {
                self.forwarded(&batch, hops, env);
                return true;
            }
            BucketMsg::View { id, arg, reply } => {
                self.shared.stats.views.fetch_add(1, Ordering::Relaxed);
                let result = self.instance.view(arg.as_deref());
                (reply, self.json_response(id, result))
            }
            BucketMsg::Dump { id, reply } => {
                self.shared.stats.dumps.fetch_add(1, Ordering::Relaxed);
                if let Some(why) = self.unavailable(env) {
                    (reply, Response::error(id, ErrorCode::StorageError, &why))
                } else {
                    let result = self.instance.dump();
                    let ok = result.is_ok();
                    if ok {
                        self.takes.events = 0;
                    }
                    let response = self.json_response(id, result);
                    if ok && self.durable.is_some() {
                        let done = answer_after_commit(id, reply, response);
                        self.append(env, Record::Dump.encode(), Some(done));
                        return true;
                    }
                    (reply, response)
                }
            }
            BucketMsg::Take { id, reply } => {
                self.take(id, reply, env);
                return true;
            }
            BucketMsg::Release { id, take, reply } => {
                self.release(id, take, reply, env);
                return true;
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
                self.instance.take_inline_events(false);
                self.shared.lane.attach(None, None);
                let msg = format!("bucket {:?} was dropped", self.name);
                self.subscribers.end_all(ErrorCode::NoSuchBucket, &msg);
                if let Some(d) = &self.durable {
                    d.forget(env);
                }
                return false;
            }
        };
        // A closed receiver means the connection went away; nothing to do.
        let _ = reply.send(response);
        true
    }

    /// Applies one SEND frame: its answer, and for a durable bucket the record to log
    /// before the answer may go out.
    fn send(&mut self, id: u32, batch: &SendBatch, env: &ActorEnv) -> (Answer, Option<Vec<u8>>) {
        self.shared.stats.sends.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = self.unavailable(env) {
            let refused = Response::error(id, ErrorCode::StorageError, &why);
            return (Answer::Other(refused), None);
        }
        let (outcome, tail) = self.apply(batch, 0, env);
        (Answer::Sent(id, outcome), tail)
    }

    fn forwarded(&mut self, batch: &SendBatch, hops: u8, env: &ActorEnv) {
        let stats = &self.shared.stats;
        if let Some(why) = self.unavailable(env) {
            stats
                .forward_dropped
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::warn!(bucket = %self.name, "dropped {} forwarded event(s): {why}", batch.len());
            return;
        }
        stats
            .received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (outcome, tail) = self.apply(batch, hops, env);
        if let Some(record) = tail {
            self.append(env, record, None);
        }
        if outcome.rejected > 0 {
            tracing::debug!(bucket = %self.name, rejected = outcome.rejected,
                "forwarded events rejected by the handler");
        }
    }

    /// Applies a batch event by event; a threshold reached mid-batch flushes right
    /// there, so every output holds exactly `threshold` events. For a durable bucket,
    /// the events before such a flush are logged before it, and the rest are returned
    /// as the record for the caller to log (with the answer).
    fn apply(
        &mut self,
        batch: &SendBatch,
        hops: u8,
        env: &ActorEnv,
    ) -> (SendOutcome, Option<Vec<u8>>) {
        let mut outcome = SendOutcome::default();
        let now = Instant::now();
        let keep = self.exec.is_some();
        let durable = self.durable.is_some();
        let mut logged = 0; // events of the batch already in a record
        for (i, event) in batch.iter().enumerate() {
            if let Err(reason) = self.instance.send(event) {
                outcome.reject(i as u32, || reason);
                self.note_failure();
                continue;
            }
            outcome.accepted += 1;
            self.ordinal += 1;
            self.takes.events += 1;
            self.hops = self.hops.max(hops);
            if keep {
                self.retained_bytes += event.len();
                self.retained.push(event.to_vec());
            }
            let full = keep
                && (self.retained.len() >= EXEC_MAX_PENDING_EVENTS
                    || self.retained_bytes >= EXEC_MAX_PENDING_BYTES);
            if self.trigger.event(now) || full {
                if durable {
                    let record = send_record(batch, logged..i + 1);
                    self.append(env, record, None);
                    logged = i + 1;
                }
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
        // The rest (possibly none: an empty record still carries the answer).
        let tail = durable.then(|| send_record(batch, logged..batch.len()));
        (outcome, tail)
    }

    /// Adds one frame's SEND record (`SEND_TAG count events`) to the group's record.
    fn gather_record(&mut self, group: &GroupReply, index: usize, id: u32, record: &[u8]) {
        let (Some(&tag), Some(count), Some(events)) =
            (record.first(), record.get(1..5), record.get(5..))
        else {
            return;
        };
        let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
        let g = self.group_record.get_or_insert_with(|| GroupRecord {
            group: group.clone(),
            record: vec![tag, 0, 0, 0, 0],
            count: 0,
            frames: Vec::new(),
        });
        g.record.extend_from_slice(events);
        g.count += count;
        g.frames.push((index, id));
    }

    /// Logs the gathered group record, if any.
    fn log_group_record(&mut self, env: &ActorEnv) {
        let Some(mut g) = self.group_record.take() else {
            return;
        };
        g.record[1..5].copy_from_slice(&g.count.to_be_bytes());
        let done = g.group.after_commit(g.frames);
        self.append(env, g.record, Some(done));
    }

    /// Queues a record of this durable bucket (after the gathered group record, which
    /// holds earlier events), then snapshots if one is due.
    fn append(&mut self, env: &ActorEnv, record: Vec<u8>, done: Option<Completion>) {
        self.log_group_record(env);
        if let Some(d) = &mut self.durable {
            d.append(env, record, done);
            if d.snapshot_due() {
                d.snapshot(env, &self.instance, &self.takes, self.seq, &self.name);
            }
        }
    }

    /// TAKE: the pending take again, or a new one made from the aggregate.
    fn take(&mut self, id: u32, reply: Reply, env: &ActorEnv) {
        if let Some(why) = self.unavailable(env) {
            let _ = reply.send(Response::error(id, ErrorCode::StorageError, &why));
            return;
        }
        if let Some(pending) = &self.takes.pending {
            // Handed out again: on disk already, unless its record is still queued.
            let response = Response::ok(id, pending.answer.clone());
            return self.answer_after_log(env, id, reply, response);
        }
        let output = match self.instance.dump() {
            Ok(output) => output,
            Err(e) => {
                let _ = reply.send(self.json_response(id, Err(e)));
                return;
            }
        };
        let (take, taken_ms) = self.takes.next(now_ms());
        let answer = self.takes.answer(take, taken_ms, &output);
        self.takes.taken(take, taken_ms, answer.clone());
        let stats = &self.shared.stats;
        stats.takes.store(take, Ordering::Relaxed);
        stats.take_pending.store(take, Ordering::Relaxed);
        let response = Response::ok(id, answer.clone());
        if self.durable.is_none() {
            let _ = reply.send(response);
            return;
        }
        let record = Record::Take {
            id: take,
            taken_ms,
            answer: &answer,
        }
        .encode();
        self.append(env, record, Some(answer_after_commit(id, reply, response)));
    }

    /// RELEASE: the pending take `take` is stored elsewhere and can be forgotten.
    fn release(&mut self, id: u32, take: u64, reply: Reply, env: &ActorEnv) {
        if let Some(why) = self.unavailable(env) {
            let _ = reply.send(Response::error(id, ErrorCode::StorageError, &why));
            return;
        }
        match self.takes.release(take) {
            Release::Released => {
                self.shared.stats.take_pending.store(0, Ordering::Relaxed);
                let response = Response::empty(id);
                if self.durable.is_none() {
                    let _ = reply.send(response);
                    return;
                }
                let record = Record::Release { id: take }.encode();
                self.append(env, record, Some(answer_after_commit(id, reply, response)));
            }
            Release::Already => self.answer_after_log(env, id, reply, Response::empty(id)),
            Release::Unknown => {
                let last = self.takes.last_id;
                let msg = format!(
                    "bucket {:?} handed out no take {take} (its last take is {last})",
                    self.name
                );
                let _ = reply.send(Response::error(id, ErrorCode::InvalidArgument, &msg));
            }
        }
    }

    /// Sends `response` once everything this bucket has queued for the disk has
    /// committed (at once for an in-memory bucket).
    fn answer_after_log(&mut self, env: &ActorEnv, id: u32, reply: Reply, response: Response) {
        self.log_group_record(env);
        match &mut self.durable {
            Some(d) => d.barrier(env, answer_after_commit(id, reply, response)),
            None => {
                let _ = reply.send(response);
            }
        }
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
        if let Some(why) = self.unavailable(env) {
            self.trigger.failed(now);
            stats.flush_errors.fetch_add(1, Ordering::Relaxed);
            self.flush_failed(&why);
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
                self.flush_failed(&e.to_string());
                self.note_failure();
                return;
            }
        };
        self.trigger.flushed(now);
        self.takes.events = 0;
        stats.pending.store(0, Ordering::Relaxed);
        let hops = self.hops.saturating_add(1);
        self.hops = 0;
        let retained = std::mem::take(&mut self.retained);
        self.retained_bytes = 0;
        let first = self.ordinal + 1 - retained.len() as u64;
        let mut delivery = Delivery {
            record: None,
            hops,
            run: None,
            emits: flushed.emits,
        };
        // A `flush` that returned nil outputs nothing, but an exec sink still gets the
        // events (with a null output).
        if flushed.output.is_some() || self.exec.is_some() {
            self.seq += 1;
            stats.outputs.store(self.seq, Ordering::Relaxed);
            let output = flushed.output.as_deref().unwrap_or(b"null");
            let record = record(&self.name, self.seq, time_ms, events, output);
            if self.exec.is_some() {
                delivery.run = Some(Run {
                    seq: self.seq,
                    first,
                    events: retained,
                    output: record.clone(),
                });
            }
            if flushed.output.is_some() {
                delivery.record = Some(record);
            }
        }
        if self.durable.is_some() {
            let seq = if delivery.record.is_some() || delivery.run.is_some() {
                self.seq
            } else {
                0
            };
            let (worker, id) = (self.worker.clone(), self.id);
            let lsn = self.durable.as_ref().map_or(0, Durable::next_lsn);
            let done: Completion = Box::new(move |outcome: Outcome<'_>| {
                let ok = outcome.is_ok();
                let _ = worker.send(WorkerMsg::Committed { id, lsn, ok });
            });
            self.append(env, Record::Flush { seq }.encode(), Some(done));
            self.awaiting.push_back((lsn, delivery));
        } else {
            self.deliver(delivery, env, now);
        }
    }

    /// The first failure, then every 100th: a broken handler or store must not flood the
    /// log at every period.
    fn flush_failed(&mut self, why: &str) {
        self.flush_failures += 1;
        if self.flush_failures % 100 == 1 {
            tracing::warn!(bucket = %self.name, failures = self.flush_failures,
                "flush failed; its events stay for the next flush: {why}");
        }
    }

    /// The flush records of this durable bucket up to `lsn` have committed (or failed):
    /// their outputs go out (or are dropped).
    /// The database can be written again after a failure. A bucket with a write that
    /// failed reloads from disk, dropping what it applied but never had acknowledged; the
    /// outputs of its flushes whose records did commit are delivered first. A bucket
    /// whose every write committed is in step with the disk and keeps its state, and
    /// the outputs that wait for their commit messages.
    ///
    /// # Errors
    /// Why the state could not be rebuilt.
    pub fn reload_after_outage(&mut self, env: &ActorEnv) -> Result<(), String> {
        // A bucket diverges in the completion of a failed op, which runs before the log
        // reports the recovery; an op failing later triggers another one.
        if !self.durable.as_ref().is_some_and(Durable::is_diverged) {
            return Ok(());
        }
        // Not a message: the lane may be applying. It declines a diverged bucket, but
        // one may have checked just before the divergence and not yet queued its record:
        // closed first, the drain below waits for that record too. The next message or
        // tick reopens it.
        self.take_lane_events(false);
        let Some(d) = &self.durable else {
            return Ok(());
        };
        if !d.drain() {
            return Err("records of the bucket are still being written".into());
        }
        // The records on disk form an unbroken chain (`store::chain`), so every record
        // up to its end committed. Some may have been written since the store was
        // reopened (queued just before), so far only to the write-ahead file.
        env.store.drain_wal().map_err(|e| e.to_string())?;
        let on_disk = env.store.last_lsn(d.uid).map_err(|e| e.to_string())?;
        self.committed(on_disk, true, env);
        self.recover(env, true)
    }

    pub fn committed(&mut self, lsn: u64, ok: bool, env: &ActorEnv) {
        while self.awaiting.front().is_some_and(|(l, _)| *l <= lsn) {
            let Some((_, delivery)) = self.awaiting.pop_front() else {
                break;
            };
            if ok {
                self.deliver(delivery, env, Instant::now());
            }
        }
    }

    fn deliver(&mut self, delivery: Delivery, env: &ActorEnv, now: Instant) {
        let mut outbox = std::mem::take(&mut self.outbox);
        {
            let from = self.sender();
            for emit in delivery.emits {
                outbox.post(&from, emit.bucket, vec![emit.event], delivery.hops);
            }
        }
        if let Some(record) = &delivery.record {
            let published = self.subscribers.publish(&self.name, record);
            if published.lagged > 0 {
                self.shared
                    .stats
                    .lagged
                    .fetch_add(published.lagged, Ordering::Relaxed);
                tracing::info!(bucket = %self.name, "disconnected {} subscriber(s) that fell behind", published.lagged);
            }
            self.count_subscribers();
            if let Some(target) = self.options.forward.clone() {
                outbox.post(&self.sender(), target, vec![record.to_vec()], delivery.hops);
            }
        }
        if let (Some(run), Some(exec)) = (delivery.run, &self.exec) {
            exec.submit(run);
        }
        outbox.deliver(&self.sender(), env, now);
        self.outbox = outbox;
    }

    /// Graceful shutdown: a durable bucket snapshots its state.
    pub fn shutdown(&mut self, env: &ActorEnv) {
        // Not a message: the lane may be applying. Closed, it cannot change the state
        // between the snapshot's lsn and its encoding.
        self.take_lane_events(false);
        if let Some(d) = &mut self.durable {
            d.snapshot(env, &self.instance, &self.takes, self.seq, &self.name);
        }
    }

    /// The durable INFO fields, refreshed into the shared counters.
    pub fn publish_info(&self) {
        if let Some(d) = &self.durable {
            *self.shared.stats.durable.lock() = Some(d.to_json());
        }
    }

    /// Rebuilds a durable bucket's state from disk: the snapshot, then the records after
    /// it. `fresh` starts from a new handler instance (after a failed write); at start-up
    /// the instance `init` just made is used.
    ///
    /// # Errors
    /// Why the state could not be rebuilt.
    pub fn recover(&mut self, env: &ActorEnv, fresh: bool) -> Result<(), String> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        if !d.drain() {
            return Err("records of the bucket are still being written".into());
        }
        let uid = d.uid;
        let started = Instant::now();
        if fresh {
            // The caller closed the lane before draining, so nothing it applied to the
            // state about to be replaced can be missing from the replay; closed again
            // here in case of another caller.
            self.instance.take_inline_events(false);
            self.instance = HandlerInstance::new(&self.handler, &self.config, &self.limits)
                .map_err(|e| e.to_string())?;
            self.attach_lane(env);
            self.retained.clear();
            self.retained_bytes = 0;
            self.awaiting.clear();
        }
        let snapshot = env.store.snapshot(uid).map_err(|e| e.to_string())?;
        self.takes = Takes::new(self.first_window_ms);
        let (mut seq, snapshot_lsn) = match &snapshot {
            Some(s) => {
                let (takes, state) = Takes::decode_header(&s.state)?;
                self.instance.restore(state).map_err(|e| e.to_string())?;
                if let Some(takes) = takes {
                    self.takes = takes;
                }
                (s.seq, s.lsn)
            }
            None => (0, 0),
        };
        let mut recovery = Recovery {
            snapshot_lsn,
            ..Recovery::default()
        };
        let keep = self.exec.is_some();
        let (instance, retained, takes) = (&mut self.instance, &mut self.retained, &mut self.takes);
        let (mut pending, mut ordinal) = (0u64, self.ordinal);
        let bucket = self.name.clone();
        let last = env
            .store
            .replay(uid, snapshot_lsn, |lsn, bytes| {
                recovery.records += 1;
                match Record::decode(bytes) {
                    Ok(Record::Send(batch)) => {
                        let batch = SendBatch::from_record(batch)
                            .map_err(|e| StoreError::Io(format!("record {lsn}: {e}")))?;
                        for event in batch.iter() {
                            if instance.send(event).is_ok() {
                                recovery.events += 1;
                                pending += 1;
                                ordinal += 1;
                                takes.events += 1;
                                if keep {
                                    retained.push(event.to_vec());
                                }
                            }
                        }
                    }
                    Ok(Record::Dump) => {
                        let _ = instance.dump();
                        takes.events = 0;
                    }
                    Ok(Record::Take {
                        id,
                        taken_ms,
                        answer,
                    }) => {
                        // The state is reset as the take did; the answer is the one
                        // handed out, not a new rendering of it.
                        let _ = instance.dump();
                        takes.taken(id, taken_ms, Bytes::copy_from_slice(answer));
                    }
                    Ok(Record::Release { id }) => {
                        takes.release(id);
                    }
                    Ok(Record::Flush { seq: s }) => {
                        let info = FlushInfo {
                            bucket: &bucket,
                            seq: s,
                            events: pending,
                            time_ms: now_ms(),
                        };
                        let _ = instance.flush(&info);
                        pending = 0;
                        takes.events = 0;
                        retained.clear();
                        if s > 0 {
                            seq = s;
                        }
                    }
                    Err(e) => {
                        return Err(StoreError::Io(format!("record {lsn} is unreadable: {e}")))
                    }
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        if let Some(why) = self.instance.failure() {
            return Err(format!("replaying the log failed the handler: {why}"));
        }
        self.retained_bytes = self.retained.iter().map(Vec::len).sum();
        self.ordinal = ordinal;
        let stats = &self.shared.stats;
        stats.takes.store(self.takes.last_id, Ordering::Relaxed);
        let pending_take = self.takes.pending.as_ref().map_or(0, |p| p.id);
        stats.take_pending.store(pending_take, Ordering::Relaxed);
        self.seq = seq;
        self.shared.stats.outputs.store(seq, Ordering::Relaxed);
        self.trigger.set_pending(pending, Instant::now());
        self.shared.stats.pending.store(pending, Ordering::Relaxed);
        recovery.millis = started.elapsed().as_millis() as u64;
        tracing::info!(
            bucket = %self.name,
            snapshot_lsn,
            records = recovery.records,
            events = recovery.events,
            millis = recovery.millis,
            "durable bucket recovered: snapshot at record {snapshot_lsn}, {} record(s) with {} event(s) replayed in {} ms",
            recovery.records, recovery.events, recovery.millis
        );
        if let Some(d) = &mut self.durable {
            let replayed = recovery.records;
            d.reloaded(last, snapshot_lsn, recovery);
            // A long replay is snapshotted now, before the bucket serves, rather than at
            // its first request: the next restart is then short, even if it comes soon.
            if replayed >= super::durable::SNAPSHOT_EVERY_RECORDS / 2 {
                d.snapshot(env, &self.instance, &self.takes, self.seq, &self.name);
            }
        }
        self.publish_info();
        Ok(())
    }
}

/// A SEND record of the batch's events in `range`. The whole batch (the usual case) is
/// copied as it is; only a batch split by a mid-batch flush is re-encoded.
fn send_record(batch: &SendBatch, range: std::ops::Range<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(SEND_TAG);
    if range == (0..batch.len()) {
        batch.write_record(&mut out);
    } else {
        let events: Vec<&[u8]> = batch.iter().skip(range.start).take(range.len()).collect();
        SendBatch::from_events(&events).write_record(&mut out);
    }
    out
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
