//! A durable bucket's side of the durable log ([`crate::store::log`]): numbering its
//! records, taking snapshots, and counting what is in flight.
//!
//! The actor applies a request to the handler state, then queues its record; the answer
//! (or, for a flush, the delivery of the output) waits for the commit. Records are queued
//! in the order the actor applied them and the writer commits in queue order, so the log
//! replays to the same state. A record whose commit fails leaves the in-memory state
//! ahead of the disk: the bucket is then *diverged* and refuses durable work until it
//! has been reloaded from disk (when the store is writable again, or at restart).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::script::HandlerInstance;
use crate::store::log::{Completion, Op};

use super::actor::ActorEnv;
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
    /// The last lsn given out.
    pub lsn: u64,
    pub snapshot_lsn: u64,
    since_snapshot: u64,
    bytes_since: usize,
    in_flight: Arc<AtomicU64>,
    diverged: Arc<AtomicBool>,
    snapshot_error: Option<String>,
    pub recovery: Option<Recovery>,
}

impl Durable {
    pub fn new(uid: u64) -> Durable {
        Durable {
            uid,
            lsn: 0,
            snapshot_lsn: 0,
            since_snapshot: 0,
            bytes_since: 0,
            in_flight: Arc::default(),
            diverged: Arc::default(),
            snapshot_error: None,
            recovery: None,
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
        if self.diverged.load(Ordering::Acquire) {
            return Some(
                "a durable write of this bucket failed; it reloads from disk once the \
                 database can be written again"
                    .to_owned(),
            );
        }
        None
    }

    pub fn is_diverged(&self) -> bool {
        self.diverged.load(Ordering::Acquire)
    }

    /// The lsn the next record gets.
    pub fn next_lsn(&self) -> u64 {
        self.lsn + 1
    }

    /// Queues `record` as the next lsn; `done` runs after its commit (or failure).
    pub fn append(&mut self, env: &ActorEnv, record: Vec<u8>, done: Option<Completion>) -> u64 {
        self.lsn += 1;
        self.since_snapshot += 1;
        self.bytes_since += record.len();
        let done = self.track(done);
        env.log.submit(Op::Append {
            uid: self.uid,
            lsn: self.lsn,
            record,
            done: Some(done),
        });
        self.lsn
    }

    /// Runs `done` once every op queued before now has committed (or failed).
    pub fn barrier(&mut self, env: &ActorEnv, done: Completion) {
        let done = self.track(Some(done));
        env.log.submit(Op::Barrier {
            uid: self.uid,
            lsn: self.lsn,
            done: Some(done),
        });
    }

    /// Counts the op in flight until its completion, and marks the bucket diverged if
    /// it fails.
    fn track(&self, done: Option<Completion>) -> Completion {
        let (in_flight, diverged) = (self.in_flight.clone(), self.diverged.clone());
        in_flight.fetch_add(1, Ordering::AcqRel);
        Box::new(move |outcome| {
            if outcome.is_err() {
                diverged.store(true, Ordering::Release);
            }
            if let Some(done) = done {
                done(outcome);
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Whether enough has been logged since the last snapshot to take one.
    pub fn snapshot_due(&self) -> bool {
        self.since_snapshot >= SNAPSHOT_EVERY_RECORDS || self.bytes_since >= SNAPSHOT_EVERY_BYTES
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
        if self.lsn == self.snapshot_lsn || self.unavailable(env).is_some() {
            return;
        }
        self.since_snapshot = 0;
        self.bytes_since = 0;
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
                    lsn = self.lsn,
                    "snapshot encoded in {} ms",
                    started.elapsed().as_millis()
                );
                self.snapshot_error = None;
                self.snapshot_lsn = self.lsn;
                let done = self.track(None);
                env.log.submit(Op::Snapshot {
                    uid: self.uid,
                    lsn: self.lsn,
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
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A reload from disk succeeded: the bucket is in step with the disk again.
    pub fn reloaded(&mut self, lsn: u64, snapshot_lsn: u64, recovery: Recovery) {
        self.lsn = lsn;
        self.snapshot_lsn = snapshot_lsn;
        self.since_snapshot = recovery.records;
        self.bytes_since = 0;
        self.recovery = Some(recovery);
        self.diverged.store(false, Ordering::Release);
    }

    /// INFO fields.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "uid": self.uid,
            "lsn": self.lsn,
            "snapshot_lsn": self.snapshot_lsn,
            "records_since_snapshot": self.since_snapshot,
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "diverged": self.is_diverged(),
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
