//! A durable bucket's side of the durable log ([`crate::store::log`]): numbering its
//! records, taking snapshots, and counting what is in flight.
//!
//! The actor applies a request to the handler state, then queues its record; the answer
//! (or, for a flush, the delivery of the output) waits for the commit. SENDs the fast
//! lane applies (`super::lane`) are numbered and queued the same way, by the connection,
//! through [`LaneLog`]. Records are queued
//! in the order the actor applied them and the writer commits in queue order, so the log
//! replays to the same state. A record whose commit fails leaves the in-memory state
//! ahead of the disk: the bucket is then *diverged* and refuses durable work until it
//! has been reloaded from disk (when the store is writable again, or at restart).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::oneshot;

use crate::protocol::{ErrorCode, Response};
use crate::script::HandlerInstance;
use crate::store::log::{Completion, DurableLog, Op, Outcome};
use crate::store::StoreError;

use super::actor::ActorEnv;
use super::bucket::EncodedAnswers;
use super::take::Takes;

/// Records between snapshots: bounds the log, and so the recovery time.
pub const SNAPSHOT_EVERY_RECORDS: u64 = 10_000;
/// Bytes of records between snapshots.
pub const SNAPSHOT_EVERY_BYTES: usize = 64 * 1024 * 1024;
/// How long a reload waits for the bucket's records still being committed.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// What the last recovery did, for INFO and the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The snapshot's lsn, 0 without one.
    pub snapshot_lsn: u64,
    /// Records replayed after it.
    pub records: u64,
    /// Events those records held.
    pub events: u64,
    /// Milliseconds it took.
    pub millis: u64,
}

pub(crate) struct Durable {
    pub uid: u64,
    /// Where the bucket's records stand, shared with the fast lane.
    pos: Arc<Position>,
    pub snapshot_lsn: u64,
    snapshot_error: Option<String>,
    pub recovery: Option<Recovery>,
}

/// A durable bucket's place in its log. The actor writes it while it handles a message
/// or tick, the fast lane ([`LaneLog`]) under the native state's lock while the actor is
/// idle: never both at once (`engine::lane`).
#[derive(Debug, Default)]
pub(crate) struct Position {
    /// The last lsn given out.
    lsn: AtomicU64,
    since_snapshot: AtomicU64,
    bytes_since: AtomicU64,
    in_flight: AtomicU64,
    diverged: AtomicBool,
}

impl Position {
    /// Numbers a record of `bytes` as the next lsn.
    fn next(&self, bytes: usize) -> u64 {
        self.since_snapshot.fetch_add(1, Ordering::AcqRel);
        self.bytes_since.fetch_add(bytes as u64, Ordering::AcqRel);
        self.lsn.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Acquire)
    }

    /// Writes the INFO fields that change with every record into `info`, so INFO is
    /// current while only the fast lane logs (the actor publishes the rest).
    pub fn overlay(&self, info: &mut serde_json::Value) {
        info["lsn"] = self.lsn().into();
        info["records_since_snapshot"] = self.since_snapshot.load(Ordering::Relaxed).into();
        info["in_flight"] = self.in_flight.load(Ordering::Relaxed).into();
        info["diverged"] = self.diverged.load(Ordering::Acquire).into();
    }

    fn snapshot_due(&self) -> bool {
        self.since_snapshot.load(Ordering::Acquire) >= SNAPSHOT_EVERY_RECORDS
            || self.bytes_since.load(Ordering::Acquire) >= SNAPSHOT_EVERY_BYTES as u64
    }

    fn snapshotted(&self, records_since: u64) {
        self.since_snapshot.store(records_since, Ordering::Release);
        self.bytes_since.store(0, Ordering::Release);
    }

    /// Counts an op in flight until its completion, and marks the bucket diverged if it
    /// fails.
    fn track(self: &Arc<Self>, done: Option<Completion>) -> Completion {
        let pos = self.clone();
        pos.in_flight.fetch_add(1, Ordering::AcqRel);
        Box::new(move |outcome| {
            if outcome.is_err() {
                pos.diverged.store(true, Ordering::Release);
            }
            if let Some(done) = done {
                done(outcome);
            }
            pos.in_flight.fetch_sub(1, Ordering::AcqRel);
        })
    }
}

/// The answer to a durable request whose record did not commit.
pub(crate) fn not_written(id: u32, e: &StoreError) -> Response {
    let msg = format!("not written to disk, so not acknowledged: {e}");
    Response::error(id, ErrorCode::StorageError, &msg)
}

/// What the fast lane needs to log the SENDs it applies to a durable bucket. The lane
/// calls it under the native state's lock, so its records are numbered and queued in the
/// order their events were applied, and before anything the actor queues once it has
/// taken the lock after them.
pub(crate) struct LaneLog {
    uid: u64,
    pos: Arc<Position>,
    log: Arc<DurableLog>,
}

impl LaneLog {
    /// Whether the lane may log now. Not when the bucket must refuse durable work, nor
    /// when a snapshot is due (the actor takes it), nor when the writer's queue is half
    /// full (a connection's thread must not wait there): the SENDs are then posted to
    /// the actor, which answers, snapshots or waits.
    pub fn open(&self) -> bool {
        !self.pos.diverged.load(Ordering::Acquire)
            && self.log.health.is_healthy()
            && !self.pos.snapshot_due()
            && self.log.has_room()
    }

    /// Queues `record` as the bucket's next lsn. The receiver gets `answers` once it has
    /// committed, or each of the frames `ids` refused if it failed.
    pub fn append(
        &self,
        record: Vec<u8>,
        answers: EncodedAnswers,
        ids: Vec<u32>,
    ) -> oneshot::Receiver<EncodedAnswers> {
        let (tx, rx) = oneshot::channel();
        let lsn = self.pos.next(record.len());
        let done = self.pos.track(Some(Box::new(move |outcome: Outcome<'_>| {
            let answers = match outcome {
                Ok(()) => answers,
                Err(e) => {
                    let mut frames = BytesMut::new();
                    for &id in &ids {
                        not_written(id, e).encode(&mut frames);
                    }
                    EncodedAnswers {
                        count: ids.len(),
                        frames: frames.freeze(),
                    }
                }
            };
            let _ = tx.send(answers);
        })));
        self.log.submit(Op::Append {
            uid: self.uid,
            lsn,
            record,
            done: Some(done),
        });
        rx
    }
}

impl Durable {
    pub fn new(uid: u64) -> Durable {
        Durable {
            uid,
            pos: Arc::default(),
            snapshot_lsn: 0,
            snapshot_error: None,
            recovery: None,
        }
    }

    /// What the fast lane needs to log for this bucket to `log`.
    pub fn lane_log(&self, log: &Arc<DurableLog>) -> LaneLog {
        LaneLog {
            uid: self.uid,
            pos: self.pos.clone(),
            log: log.clone(),
        }
    }

    /// Why durable work must be refused now, if it must.
    pub fn unavailable(&self, env: &ActorEnv) -> Option<String> {
        if let Some(problem) = env.log.health.problem() {
            return Some(format!(
                "durable storage is unavailable after a failed write ({problem}); \
                 it is retried, and the bucket reloads from disk once it can be written"
            ));
        }
        if self.is_diverged() {
            return Some(
                "a durable write of this bucket failed; it reloads from disk once the \
                 database can be written again"
                    .to_owned(),
            );
        }
        None
    }

    pub fn is_diverged(&self) -> bool {
        self.pos.diverged.load(Ordering::Acquire)
    }

    /// The lsn the next record gets.
    pub fn next_lsn(&self) -> u64 {
        self.pos.lsn() + 1
    }

    /// Queues `record` as the next lsn; `done` runs after its commit (or failure).
    pub fn append(&mut self, env: &ActorEnv, record: Vec<u8>, done: Option<Completion>) -> u64 {
        let lsn = self.pos.next(record.len());
        let done = self.pos.track(done);
        env.log.submit(Op::Append {
            uid: self.uid,
            lsn,
            record,
            done: Some(done),
        });
        lsn
    }

    /// Runs `done` once every op queued before now has committed (or failed).
    pub fn barrier(&mut self, env: &ActorEnv, done: Completion) {
        let done = self.pos.track(Some(done));
        env.log.submit(Op::Barrier {
            uid: self.uid,
            lsn: self.pos.lsn(),
            done: Some(done),
        });
    }

    /// Whether enough has been logged since the last snapshot to take one.
    pub fn snapshot_due(&self) -> bool {
        self.pos.snapshot_due()
    }

    /// Stores the state (the take header, then the handler state) as of the last
    /// record and drops the records it covers.
    pub fn snapshot(
        &mut self,
        env: &ActorEnv,
        instance: &HandlerInstance,
        takes: &Takes,
        seq: u64,
        bucket: &str,
    ) {
        let lsn = self.pos.lsn();
        if lsn == self.snapshot_lsn || self.unavailable(env).is_some() {
            return;
        }
        self.pos.snapshotted(0);
        let started = Instant::now();
        match instance.snapshot() {
            Ok(handler_state) => {
                let mut state = Vec::with_capacity(64 + handler_state.len());
                takes.encode_header(&mut state);
                state.extend_from_slice(&handler_state);
                drop(handler_state);
                tracing::debug!(
                    bucket,
                    bytes = state.len(),
                    lsn,
                    "snapshot encoded in {} ms",
                    started.elapsed().as_millis()
                );
                self.snapshot_error = None;
                self.snapshot_lsn = lsn;
                let done = self.pos.track(None);
                env.log.submit(Op::Snapshot {
                    uid: self.uid,
                    lsn,
                    seq,
                    state,
                    done: Some(done),
                });
            }
            Err(e) => {
                if self.snapshot_error.is_none() {
                    tracing::warn!(
                        bucket,
                        "cannot snapshot the durable state, the log keeps growing: {e}"
                    );
                }
                self.snapshot_error = Some(e.to_string());
            }
        }
    }

    /// Removes the bucket's records and snapshot (DROP).
    pub fn forget(&self, env: &ActorEnv) {
        env.log.submit(Op::Forget { uid: self.uid });
    }

    /// Waits until every queued op of this bucket has completed, so the disk holds
    /// all it ever will of them. False if that takes longer than [`DRAIN_WAIT`].
    pub fn drain(&self) -> bool {
        let until = Instant::now() + DRAIN_WAIT;
        while self.pos.in_flight.load(Ordering::Acquire) > 0 {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A reload from disk succeeded: the bucket is in step with the disk again.
    pub fn reloaded(&mut self, lsn: u64, snapshot_lsn: u64, recovery: Recovery) {
        self.pos.lsn.store(lsn, Ordering::Release);
        self.snapshot_lsn = snapshot_lsn;
        self.pos.snapshotted(recovery.records);
        self.recovery = Some(recovery);
        self.pos.diverged.store(false, Ordering::Release);
    }

    /// The position INFO reads live ([`Position::overlay`]).
    pub fn position(&self) -> Arc<Position> {
        self.pos.clone()
    }

    /// INFO fields but the position's, which INFO adds live ([`Position::overlay`]).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "uid": self.uid,
            "snapshot_lsn": self.snapshot_lsn,
            "snapshot_error": self.snapshot_error,
            "recovered": self.recovery.as_ref().map(|r| serde_json::json!({
                "snapshot_lsn": r.snapshot_lsn,
                "records": r.records,
                "events": r.events,
                "millis": r.millis,
            })),
        })
    }
}
