//! The durable log: what durable buckets did, in order, and snapshots of their states.
//!
//! ```text
//!  actors ──Op (bounded queue)──▶ writer thread: take every queued op (up to a batch)
//!                                   records: one write, one fdatasync ([`super::wal`])
//!                                   snapshots, removals: one redb commit
//!                                   then every op's completion, in order
//! ```
//!
//! One writer thread owns durable writes, so many connections' and buckets' records share
//! one commit (group commit): durable throughput grows with concurrency. Records go to
//! the write-ahead file first and reach redb later, in bulk; readers read redb only,
//! after the write-ahead file has been moved into it. Tables:
//!
//! - `log`: (bucket uid, lsn) → record. A record is one SEND batch (or forwarded
//!   batch), DUMP, TAKE, RELEASE or flush: [`Record`].
//! - `snapshots`: bucket uid → `lsn:u64be seq:u64be state`, the state after the record
//!   `lsn`, and the last output `seq`. A snapshot and the removal of the records it
//!   covers are one transaction, so a crash between them cannot lose or repeat anything;
//!   records it covers that are still in the write-ahead file are never moved.
//!
//! A failed commit *latches* the log: every op is refused until the database has been
//! opened again and a write has committed; the writer retries that with a growing pause
//! (1 s, doubling up to 30 s). Completions then report failure, never success. An op
//! that does not continue its bucket's records on disk — queued behind a failed commit,
//! from a state that included the refused records — is refused too ([`chain`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::chain::{self, Chains, Link};
use super::{io, priority, Store, StoreError};

pub(super) const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("log");
pub(super) const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");

/// Ops queued for the writer at most; a full queue makes the durable buckets wait.
pub const QUEUE_OPS: usize = 16 * 1024;
/// Ops one commit takes at most.
pub const BATCH_OPS: usize = 4096;
/// Bytes of records one commit takes at most (one larger record commits alone).
pub const BATCH_BYTES: usize = 32 * 1024 * 1024;
/// First pause before reopening a failed database; doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between reopen attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<(), redb::TableError> {
    tx.open_table(LOG)?;
    tx.open_table(SNAPSHOTS)?;
    Ok(())
}

/// What a durable bucket did, as stored in one log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A SEND batch (or a forwarded one): `count:u32be` then `count` × blob32, exactly
    /// the SEND wire layout after the bucket name.
    Send(&'a [u8]),
    /// A DUMP.
    Dump,
    /// A flush that produced output `seq` (0: it produced none).
    Flush {
        /// The output's sequence number.
        seq: u64,
    },
    /// A TAKE that made take `id` at `taken_ms` (a dump of the state), and its answer.
    Take {
        /// The take's id.
        id: u64,
        /// Its time.
        taken_ms: u64,
        /// The answer, handed out again until the take is released.
        answer: &'a [u8],
    },
    /// A RELEASE of the pending take `id`.
    Release {
        /// The take's id.
        id: u64,
    },
}

/// The first byte of a [`Record::Send`].
pub const SEND_TAG: u8 = 1;
const SEND: u8 = SEND_TAG;
const DUMP: u8 = 2;
const FLUSH: u8 = 3;
const TAKE: u8 = 4;
const RELEASE: u8 = 5;

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl Record<'_> {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Send(batch) => {
                let mut v = Vec::with_capacity(1 + batch.len());
                v.push(SEND);
                v.extend_from_slice(batch);
                v
            }
            Record::Dump => vec![DUMP],
            Record::Flush { seq } => {
                let mut v = vec![FLUSH];
                v.extend_from_slice(&seq.to_be_bytes());
                v
            }
            Record::Take {
                id,
                taken_ms,
                answer,
            } => {
                let mut v = Vec::with_capacity(17 + answer.len());
                v.push(TAKE);
                v.extend_from_slice(&id.to_be_bytes());
                v.extend_from_slice(&taken_ms.to_be_bytes());
                v.extend_from_slice(answer);
                v
            }
            Record::Release { id } => {
                let mut v = vec![RELEASE];
                v.extend_from_slice(&id.to_be_bytes());
                v
            }
        }
    }

    /// Reads stored bytes.
    ///
    /// # Errors
    /// A description of what is malformed.
    pub fn decode(bytes: &[u8]) -> Result<Record<'_>, String> {
        match bytes.split_first() {
            Some((&SEND, batch)) => Ok(Record::Send(batch)),
            Some((&DUMP, [])) => Ok(Record::Dump),
            Some((&FLUSH, seq)) => {
                let seq: [u8; 8] = seq.try_into().map_err(|_| "malformed flush record")?;
                Ok(Record::Flush {
                    seq: u64::from_be_bytes(seq),
                })
            }
            Some((&TAKE, rest)) if rest.len() >= 16 => {
                let (head, answer) = rest.split_at(16);
                let (id, taken_ms) = (be_u64(&head[..8]), be_u64(&head[8..]));
                match (id, taken_ms) {
                    (Some(id), Some(taken_ms)) => Ok(Record::Take {
                        id,
                        taken_ms,
                        answer,
                    }),
                    _ => Err("malformed take record".into()),
                }
            }
            Some((&RELEASE, id)) => match be_u64(id) {
                Some(id) => Ok(Record::Release { id }),
                None => Err("malformed release record".into()),
            },
            Some((tag, _)) => Err(format!("unknown record tag {tag}")),
            None => Err("empty record".into()),
        }
    }
}

/// How an op ended: committed, or why not.
pub type Outcome<'a> = Result<(), &'a StoreError>;

/// Called once an op has committed or failed, on the writer thread; must not block.
pub type Completion = Box<dyn FnOnce(Outcome<'_>) + Send>;

/// One durable write.
pub enum Op {
    /// Append a record.
    Append {
        /// The bucket's uid.
        uid: u64,
        /// The record's number, increasing per bucket.
        lsn: u64,
        /// [`Record::encode`].
        record: Vec<u8>,
        /// Called after the commit.
        done: Option<Completion>,
    },
    /// Store a snapshot taken after record `lsn`, and remove the records it covers.
    Snapshot {
        /// The bucket's uid.
        uid: u64,
        /// The last record the state includes.
        lsn: u64,
        /// The last output's sequence number.
        seq: u64,
        /// The encoded state.
        state: Vec<u8>,
        /// Called after the commit.
        done: Option<Completion>,
    },
    /// Write nothing; `done` runs once every op queued before it has committed (or
    /// failed): an answer that must not go out before earlier records are on disk. It
    /// fails unless record `lsn` of bucket `uid` is the last one on disk.
    Barrier {
        /// The bucket's uid.
        uid: u64,
        /// The bucket's last record, which must be on disk.
        lsn: u64,
        /// Called after the commit.
        done: Option<Completion>,
    },
    /// Remove every record and the snapshot of a dropped bucket.
    Forget {
        /// The bucket's uid.
        uid: u64,
    },
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append { record, .. } => record.len(),
            Op::Snapshot { state, .. } => state.len(),
            Op::Forget { .. } | Op::Barrier { .. } => 0,
        }
    }

    fn done(&mut self) -> Option<Completion> {
        match self {
            Op::Append { done, .. } | Op::Snapshot { done, .. } | Op::Barrier { done, .. } => {
                done.take()
            }
            Op::Forget { .. } => None,
        }
    }

    fn link(&self) -> Link {
        match *self {
            Op::Append { uid, lsn, .. } => Link::Append { uid, lsn },
            Op::Snapshot { uid, lsn, .. } | Op::Barrier { uid, lsn, .. } => Link::At { uid, lsn },
            Op::Forget { uid } => Link::Forget { uid },
        }
    }
}

/// Whether durable writes are possible, shared with everyone who asks before queueing.
#[derive(Debug, Default)]
pub struct Health {
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// Commits made.
    pub commits: AtomicU64,
    /// Ops committed.
    pub ops: AtomicU64,
    /// Commits that failed.
    pub failures: AtomicU64,
    /// Ops refused because they did not follow their bucket's records on disk.
    pub out_of_order: AtomicU64,
    /// The writer thread's nice value, once it has started, where the OS reports one.
    writer_nice: Mutex<Option<i32>>,
}

impl Health {
    /// `None` when writes are possible, else why not.
    pub fn problem(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(self.error.lock().clone().unwrap_or_default())
    }

    /// Whether writes are possible, without the reason: for the hot path.
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    fn latch(&self, e: &StoreError) {
        *self.error.lock() = Some(e.to_string());
        self.failed.store(true, Ordering::Release);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    fn clear(&self) {
        self.failed.store(false, Ordering::Release);
        *self.error.lock() = None;
    }

    /// The counters as JSON, for server INFO.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "healthy": !self.failed.load(Ordering::Acquire),
            "error": *self.error.lock(),
            "commits": self.commits.load(Ordering::Relaxed),
            "ops": self.ops.load(Ordering::Relaxed),
            "failed_commits": self.failures.load(Ordering::Relaxed),
            "out_of_order": self.out_of_order.load(Ordering::Relaxed),
            "writer_nice": *self.writer_nice.lock(),
        })
    }
}

/// The writer thread and its queue.
pub struct DurableLog {
    tx: Mutex<Option<crossbeam_channel::Sender<Op>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Whether writes are possible.
    pub health: Arc<Health>,
}

impl DurableLog {
    /// Starts the writer thread on `store`, its nice value changed by `nice` (see
    /// [`priority`]; 0 leaves it alone). `recovered` is called (on the writer thread)
    /// each time the store becomes writable again after a failure.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(
        store: Arc<Store>,
        recovered: Box<dyn Fn() + Send>,
        nice: i32,
    ) -> std::io::Result<DurableLog> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_OPS);
        let (started_tx, started) = std::sync::mpsc::sync_channel::<()>(1);
        let health = Arc::new(Health::default());
        let writer = Writer {
            store,
            health: health.clone(),
            recovered,
            chains: Chains::default(),
        };
        let thread = std::thread::Builder::new()
            .name("bucketly-writer".into())
            .spawn(move || {
                writer.prioritise(nice);
                let _ = started_tx.send(());
                writer.run(rx);
            })?;
        // INFO reports the priority from the first request on: wait for the thread to
        // have set it (microseconds). Without its word the thread has ended.
        if started.recv().is_err() {
            let _ = thread.join();
            return Err(std::io::Error::other(
                "the durable log writer stopped as it started",
            ));
        }
        Ok(DurableLog {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            health,
        })
    }

    /// Queues `op`, waiting while the queue is full. A log that is shut down completes
    /// the op with an error at once.
    pub fn submit(&self, mut op: Op) {
        let tx = self.tx.lock().clone();
        let Some(tx) = tx else {
            if let Some(done) = op.done() {
                done(Err(&StoreError::Io("the server is shutting down".into())));
            }
            return;
        };
        if let Err(crossbeam_channel::SendError(mut op)) = tx.send(op) {
            if let Some(done) = op.done() {
                done(Err(&StoreError::Io("the durable log has stopped".into())));
            }
        }
    }

    /// Whether the queue is at most half full, so that an op queued now does not wait:
    /// what a caller that must not block (a connection's thread, in the durable fast
    /// lane) checks before it commits to queueing one. Between the check and the send,
    /// each other producing thread (runtime workers, handler threads: a few dozen at
    /// most) can queue about one op, far from the other half of [`QUEUE_OPS`].
    pub fn has_room(&self) -> bool {
        self.tx
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.len() < QUEUE_OPS / 2)
    }

    /// Commits what is queued and stops the writer. Call after every producer stopped.
    pub fn shutdown(&self) {
        drop(self.tx.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// The pause before each reopen of a failed database: [`FIRST_RETRY`], doubling up to
/// [`MAX_RETRY`]. It starts again from the first only once a write commits (a new
/// `Backoff`), not when a reopen succeeds: a disk that lets the database open but fails
/// every batch is retried ever more slowly, not every second.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_RETRY }
    }
}

impl Backoff {
    /// A commit or a reopen failed: how long to wait before the next reopen.
    fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        pause
    }
}

/// What [`Writer::commit_batch`] did.
enum Committed {
    /// A transaction with records committed.
    Wrote,
    /// Nothing needed writing (barriers, refused ops).
    Nothing,
    /// The commit failed.
    Failed,
}

struct Writer {
    store: Arc<Store>,
    health: Arc<Health>,
    recovered: Box<dyn Fn() + Send>,
    /// Each durable bucket's log on disk stays an unbroken chain ([`chain`]).
    chains: Chains,
}

impl Writer {
    /// Applies `--writer-nice` to this thread, and reports the nice value in effect.
    fn prioritise(&self, nice: i32) {
        let result = priority::renice_this_thread(nice);
        match &result {
            Ok(_) | Err(_) if nice == 0 => {}
            Ok(now) => tracing::debug!("the durable log writer runs at nice {now}"),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => tracing::info!(
                "the durable log writer keeps the daemon's priority: a lower nice value needs \
                 CAP_SYS_NICE ({e}); durable answers are slower on busy cores \
                 (--writer-nice 0 silences this)"
            ),
            Err(e) => tracing::warn!("cannot change the durable log writer's priority: {e}"),
        }
        // A refused change left the nice value as it was: read it.
        let now = result.or_else(|_| priority::renice_this_thread(0));
        *self.health.writer_nice.lock() = now.ok();
    }

    fn run(mut self, rx: crossbeam_channel::Receiver<Op>) {
        let mut retry = Backoff::default();
        // Set while the log is latched: when to open the database again.
        let mut reopen_at: Option<Instant> = None;
        loop {
            if let Some(at) = reopen_at {
                match rx.recv_deadline(at) {
                    Ok(op) => {
                        self.refuse(vec![op], &rx);
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
                reopen_at = if self.try_recover() {
                    None
                } else {
                    Some(Instant::now() + retry.failed())
                };
                continue;
            }
            let Ok(first) = rx.recv() else { return };
            let mut batch = vec![first];
            let mut bytes = batch[0].bytes();
            while batch.len() < BATCH_OPS && bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            match self.commit_batch(batch) {
                Committed::Wrote => retry = Backoff::default(),
                Committed::Nothing => {}
                Committed::Failed => reopen_at = Some(Instant::now() + retry.failed()),
            }
        }
    }

    /// Commits the ops that continue their buckets' chains, then runs every op's
    /// completion in queue order. On failure the log is latched.
    fn commit_batch(&mut self, batch: Vec<Op>) -> Committed {
        let mut links = chain::Batch::default();
        let mut broken = Vec::with_capacity(batch.len());
        let mut ops = Vec::with_capacity(batch.len());
        for op in batch {
            match self.chains.admit(&mut links, op.link()) {
                Ok(()) => {
                    ops.push(op);
                    broken.push(None);
                }
                Err(last) => {
                    broken.push(Some((op.link(), last)));
                    ops.push(op);
                }
            }
        }
        let admitted: Vec<&Op> = ops
            .iter()
            .zip(&broken)
            .filter_map(|(op, b)| b.is_none().then_some(op))
            .collect();
        let admitted_writes = admitted
            .iter()
            .filter(|op| !matches!(op, Op::Barrier { .. }))
            .count();
        let refused = broken.iter().filter(|b| b.is_some()).count();
        // Barriers alone need no transaction: everything before them has completed.
        let writes = admitted_writes > 0;
        let result = if writes {
            commit(&self.store, &admitted)
        } else {
            Ok(())
        };
        drop(admitted);
        let committed = result.is_ok();
        match &result {
            Ok(()) => {
                self.health
                    .commits
                    .fetch_add(u64::from(writes), Ordering::Relaxed);
                let n = admitted_writes as u64;
                self.health.ops.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(
                    "durable write failed, {} op(s) not acknowledged; durable buckets refuse \
                     writes until the database can be written again: {e}",
                    ops.len()
                );
                self.health.latch(e);
            }
        }
        self.chains.settle(links, committed);
        if refused > 0 {
            self.health
                .out_of_order
                .fetch_add(refused as u64, Ordering::Relaxed);
        }
        for (mut op, broken) in ops.into_iter().zip(broken) {
            let Some(done) = op.done() else { continue };
            match broken {
                None => done(result.as_ref().map(|_| ())),
                Some((link, last)) => done(Err(&StoreError::Io(format!(
                    "not written: {link:?} does not follow record {last}, the last one on \
                     disk, because an earlier write of the bucket failed; it reloads from disk"
                )))),
            }
        }
        if refused > 0 && committed {
            // Their buckets are diverged now: have them reload, as after an outage
            // (normally they already are: stale ops queued just before a reopen).
            tracing::warn!("{refused} durable op(s) did not follow their bucket's records on disk");
            (self.recovered)();
        }
        match (committed, writes) {
            (false, _) => Committed::Failed,
            (true, true) => Committed::Wrote,
            (true, false) => Committed::Nothing,
        }
    }

    /// Fails `batch` and everything queued behind it while the store is unhealthy.
    fn refuse(&mut self, mut batch: Vec<Op>, rx: &crossbeam_channel::Receiver<Op>) {
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
        }
        let why = StoreError::Io(self.health.problem().unwrap_or_default());
        let mut links = chain::Batch::default();
        for mut op in batch {
            // Anchors a chain not seen before: what the op meant to follow is on disk.
            let _ = self.chains.admit(&mut links, op.link());
            if let Some(done) = op.done() {
                done(Err(&why));
            }
        }
        self.chains.settle(links, false);
    }

    fn try_recover(&mut self) -> bool {
        match self.store.reopen() {
            Ok(()) => {
                tracing::info!("the database can be written again; durable buckets reload from it");
                // What a failed commit wrote may have reached the disk after all: each
                // chain goes on from what the buckets will reload.
                for uid in self.chains.uids() {
                    self.chains.resync(uid, self.store.last_lsn(uid).ok());
                }
                self.health.clear();
                (self.recovered)();
                true
            }
            Err(e) => {
                tracing::warn!("the database still cannot be written: {e}");
                *self.health.error.lock() = Some(e.to_string());
                false
            }
        }
    }
}

/// Appends the batch's records to the write-ahead file, then commits its snapshots and
/// removals to redb in one transaction.
fn commit(store: &Store, batch: &[&Op]) -> Result<(), StoreError> {
    let entries: Vec<_> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Append {
                uid, lsn, record, ..
            } => Some((*uid, *lsn, record.as_slice())),
            _ => None,
        })
        .collect();
    if !entries.is_empty() {
        store.append_wal(&entries)?;
    }
    if !batch
        .iter()
        .any(|op| matches!(op, Op::Snapshot { .. } | Op::Forget { .. }))
    {
        return Ok(());
    }
    store.with(|db| commit_redb(db, batch))?;
    for op in batch {
        if let Op::Forget { uid } = op {
            store.wal.lock().forget(*uid);
        }
    }
    Ok(())
}

fn commit_redb(db: &redb::Database, batch: &[&Op]) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(io)?;
    {
        let mut log = tx.open_table(LOG).map_err(io)?;
        let mut snapshots = tx.open_table(SNAPSHOTS).map_err(io)?;
        for op in batch {
            match op {
                Op::Snapshot {
                    uid,
                    lsn,
                    seq,
                    state,
                    ..
                } => {
                    let mut v = Vec::with_capacity(16 + state.len());
                    v.extend_from_slice(&lsn.to_be_bytes());
                    v.extend_from_slice(&seq.to_be_bytes());
                    v.extend_from_slice(state);
                    snapshots.insert(*uid, v.as_slice()).map_err(io)?;
                    log.retain_in((*uid, 0)..=(*uid, *lsn), |_, _| false)
                        .map_err(io)?;
                }
                Op::Forget { uid } => {
                    snapshots.remove(*uid).map_err(io)?;
                    log.retain_in((*uid, 0)..=(*uid, u64::MAX), |_, _| false)
                        .map_err(io)?;
                }
                Op::Append { .. } | Op::Barrier { .. } => {}
            }
        }
    }
    tx.commit().map_err(io)
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last record the state includes.
    pub lsn: u64,
    /// The last output's sequence number.
    pub seq: u64,
    /// The encoded state.
    pub state: Vec<u8>,
}

impl Store {
    /// The snapshot of bucket `uid`, if any.
    ///
    /// # Errors
    /// [`StoreError::Io`], or a malformed snapshot.
    pub fn snapshot(&self, uid: u64) -> Result<Option<Snapshot>, StoreError> {
        self.with(|db| {
            let tx = db.begin_read().map_err(io)?;
            let table = tx.open_table(SNAPSHOTS).map_err(io)?;
            let Some(v) = table.get(uid).map_err(io)? else {
                return Ok(None);
            };
            let v = v.value();
            if v.len() < 16 {
                return Err(StoreError::Io(format!(
                    "snapshot of bucket {uid} is truncated"
                )));
            }
            let (lsn, rest) = v.split_at(8);
            let (seq, state) = rest.split_at(8);
            let n = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
            Ok(Some(Snapshot {
                lsn: n(lsn),
                seq: n(seq),
                state: state.to_vec(),
            }))
        })
    }

    /// Calls `f` with each record of bucket `uid` after `after`, in order; stops at the
    /// first error `f` returns. Returns the last lsn seen (`after` if none).
    ///
    /// # Errors
    /// [`StoreError::Io`], or what `f` returned.
    pub fn replay(
        &self,
        uid: u64,
        after: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        self.with(|db| {
            let tx = db.begin_read().map_err(io)?;
            let table = tx.open_table(LOG).map_err(io)?;
            let mut last = after;
            let start = after.saturating_add(1);
            for row in table.range((uid, start)..=(uid, u64::MAX)).map_err(io)? {
                let (k, v) = row.map_err(io)?;
                let (_, lsn) = k.value();
                f(lsn, v.value())?;
                last = lsn;
            }
            Ok(last)
        })
    }

    /// The last record of bucket `uid` on disk: what a reload of the bucket starts from
    /// (the snapshot's lsn when no record follows it, 0 when there is neither).
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn last_lsn(&self, uid: u64) -> Result<u64, StoreError> {
        let after = self.snapshot(uid)?.map_or(0, |s| s.lsn);
        let last = self.with(|db| {
            let tx = db.begin_read().map_err(io)?;
            let table = tx.open_table(LOG).map_err(io)?;
            let last = table
                .range((uid, 0)..=(uid, u64::MAX))
                .map_err(io)?
                .next_back();
            match last {
                Some(row) => Ok(row.map_err(io)?.0.value().1),
                None => Ok(0),
            }
        })?;
        Ok(after.max(last))
    }

    /// Removes the log records and snapshots of every uid not in `live` (left by a
    /// bucket dropped just before a crash). Returns how many buckets' data it removed.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn forget_all_but(&self, live: &HashSet<u64>) -> Result<usize, StoreError> {
        self.with(|db| {
            let mut dead = HashSet::new();
            {
                let tx = db.begin_read().map_err(io)?;
                for row in tx.open_table(SNAPSHOTS).map_err(io)?.iter().map_err(io)? {
                    let uid = row.map_err(io)?.0.value();
                    if !live.contains(&uid) {
                        dead.insert(uid);
                    }
                }
                let log = tx.open_table(LOG).map_err(io)?;
                let mut next = Some((0u64, 0u64));
                // One range read per uid present: jump past each uid's records.
                while let Some(from) = next {
                    let mut range = log.range(from..).map_err(io)?;
                    next = match range.next() {
                        Some(row) => {
                            let (uid, _) = row.map_err(io)?.0.value();
                            if !live.contains(&uid) {
                                dead.insert(uid);
                            }
                            uid.checked_add(1).map(|u| (u, 0))
                        }
                        None => None,
                    };
                }
            }
            if dead.is_empty() {
                return Ok(0);
            }
            let tx = db.begin_write().map_err(io)?;
            {
                let mut log = tx.open_table(LOG).map_err(io)?;
                let mut snapshots = tx.open_table(SNAPSHOTS).map_err(io)?;
                for &uid in &dead {
                    snapshots.remove(uid).map_err(io)?;
                    log.retain_in((uid, 0)..=(uid, u64::MAX), |_, _| false)
                        .map_err(io)?;
                }
            }
            tx.commit().map_err(io)?;
            Ok(dead.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_grows_until_a_write_commits() {
        let s = Duration::from_secs;
        let mut retry = Backoff::default();
        // A reopen that succeeds does not reset it; only a committed write (a new one).
        let pauses: Vec<Duration> = (0..7).map(|_| retry.failed()).collect();
        assert_eq!(pauses, [s(1), s(2), s(4), s(8), s(16), s(30), s(30)]);
        assert_eq!(Backoff::default().failed(), FIRST_RETRY);
    }

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("db.redb")).expect("open"));
        (dir, store)
    }

    fn wait(log: &DurableLog, op: impl FnOnce(Completion) -> Op) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        log.submit(op(Box::new(move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })));
        rx.recv().expect("completion")
    }

    fn append(uid: u64, lsn: u64, record: Record<'_>) -> impl FnOnce(Completion) -> Op {
        let record = record.encode();
        move |done| Op::Append {
            uid,
            lsn,
            record,
            done: Some(done),
        }
    }

    /// What a restart would replay: opening the store moves the write-ahead file's
    /// records into the database first.
    fn records(store: &Store, uid: u64, after: u64) -> Vec<(u64, Vec<u8>)> {
        store.reopen().expect("reopen");
        let mut out = Vec::new();
        store
            .replay(uid, after, |lsn, r| {
                out.push((lsn, r.to_vec()));
                Ok(())
            })
            .expect("replay");
        out
    }

    #[test]
    fn records_round_trip() {
        for r in [
            Record::Send(b"\x00\x00\x00\x00"),
            Record::Dump,
            Record::Flush { seq: 9 },
            Record::Take {
                id: 3,
                taken_ms: 1_764_547_200_000,
                answer: b"{\"id\":3}",
            },
            Record::Take {
                id: 4,
                taken_ms: 5,
                answer: b"",
            },
            Record::Release { id: u64::MAX },
        ] {
            assert_eq!(Record::decode(&r.encode()), Ok(r.clone()));
        }
        assert!(Record::decode(b"").is_err());
        assert!(Record::decode(b"\x09").is_err());
        assert!(Record::decode(b"\x03\x00").is_err());
        assert!(Record::decode(b"\x04\x00\x00").is_err());
        assert!(Record::decode(b"\x05\x00").is_err());
    }

    #[test]
    fn appends_snapshots_and_forgets() {
        let (_dir, store) = store();
        let log = DurableLog::start(store.clone(), Box::new(|| {}), 0).expect("start");
        for lsn in 1..=5 {
            wait(&log, append(7, lsn, Record::Dump)).expect("append");
        }
        wait(&log, append(8, 1, Record::Dump)).expect("other bucket");
        assert_eq!(records(&store, 7, 0).len(), 5);
        assert_eq!(
            records(&store, 7, 3)
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            [4, 5]
        );
        wait(&log, |done| Op::Snapshot {
            uid: 7,
            lsn: 3,
            seq: 2,
            state: b"st".to_vec(),
            done: Some(done),
        })
        .expect("snapshot");
        assert_eq!(
            store.snapshot(7).expect("read"),
            Some(Snapshot {
                lsn: 3,
                seq: 2,
                state: b"st".to_vec()
            })
        );
        assert_eq!(
            records(&store, 7, 0)
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            [4, 5]
        );
        log.submit(Op::Forget { uid: 7 });
        log.shutdown();
        assert_eq!(store.snapshot(7).expect("read"), None);
        assert!(records(&store, 7, 0).is_empty());
        assert_eq!(records(&store, 8, 0).len(), 1, "other buckets untouched");
        let live: HashSet<u64> = [].into_iter().collect();
        assert_eq!(store.forget_all_but(&live).expect("forget"), 1);
        assert!(records(&store, 8, 0).is_empty());
    }

    #[test]
    fn records_survive_full_write_ahead_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let open = || Arc::new(Store::open_sized(&path, 64 * 1024).expect("open"));
        let store = open();
        let log = DurableLog::start(store.clone(), Box::new(|| {}), 0).expect("start");
        let event = [b'x'; 200];
        let mut batch = Vec::new();
        for lsn in 1..=2000u64 {
            batch.extend_from_slice(&(event.len() as u32).to_be_bytes());
            batch.extend_from_slice(&event);
            let record = Record::Send(&batch).encode();
            let (uid, record) = (7, record.clone());
            wait(&log, |done| Op::Append {
                uid,
                lsn,
                record,
                done: Some(done),
            })
            .expect("append");
            wait(&log, append(8, lsn, Record::Dump)).expect("append");
            batch.clear();
            if lsn == 900 {
                wait(&log, |done| Op::Snapshot {
                    uid: 7,
                    lsn,
                    seq: 0,
                    state: b"st".to_vec(),
                    done: Some(done),
                })
                .expect("snapshot");
            }
        }
        let seals = store.wal_info()["seals"].as_u64().expect("seals");
        assert!(seals >= 5, "only {seals} segment(s) filled");
        log.shutdown();
        drop(log);
        drop(store);
        let store = open();
        let lsns = |uid| -> Vec<u64> { records(&store, uid, 0).iter().map(|r| r.0).collect() };
        assert_eq!(lsns(7), (901..=2000).collect::<Vec<_>>());
        assert_eq!(lsns(8), (1..=2000).collect::<Vec<_>>());
        // Two segment files at most: the one being written, and the full or spare one.
        let files = std::fs::read_dir(dir.path().join("db.wal"))
            .expect("ls")
            .count();
        assert!(files <= 2, "{files} files in the write-ahead directory");
        // Records moved at every open stay moved: nothing is lost or repeated.
        drop(store);
        let store = open();
        assert_eq!(records(&store, 8, 0).len(), 2000);
    }

    #[test]
    fn an_op_that_does_not_continue_its_chain_is_refused() {
        let (_dir, store) = store();
        let reloads = Arc::new(AtomicU64::new(0));
        let asked = reloads.clone();
        let reload = Box::new(move || {
            asked.fetch_add(1, Ordering::Relaxed);
        });
        let log = DurableLog::start(store.clone(), reload, 0).expect("start");
        let barrier = |uid, lsn| {
            move |done| Op::Barrier {
                uid,
                lsn,
                done: Some(done),
            }
        };
        wait(&log, append(7, 1, Record::Dump)).expect("the first record starts the chain");
        let gap = wait(&log, append(7, 3, Record::Dump)).expect_err("record 2 is missing");
        assert!(gap.contains("does not follow record 1"), "{gap}");
        wait(&log, barrier(7, 2)).expect_err("record 2 is not on disk");
        wait(&log, barrier(7, 1)).expect("record 1 is");
        wait(&log, append(7, 2, Record::Dump)).expect("record 2 continues");
        wait(&log, barrier(9, 4)).expect("a bucket not seen yet");
        assert_eq!(records(&store, 7, 0).len(), 2);
        assert_eq!(store.last_lsn(7).expect("last"), 2);
        assert_eq!(log.health.out_of_order.load(Ordering::Relaxed), 2);
        assert_eq!(
            reloads.load(Ordering::Relaxed),
            2,
            "diverged buckets reload"
        );
        log.shutdown();
    }

    #[test]
    fn a_shut_down_log_refuses_at_once() {
        let (_dir, store) = store();
        let log = DurableLog::start(store, Box::new(|| {}), 0).expect("start");
        log.shutdown();
        assert!(wait(&log, append(1, 1, Record::Dump)).is_err());
    }
}
