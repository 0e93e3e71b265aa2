//! Handler threads. Each OS thread owns a fixed subset of buckets (by a hash of the name)
//! and their Lua states, so a Lua state never moves between threads and needs no lock.
//! Lua never runs on a tokio worker. (A native state is locked, for the fast lane.)
//!
//! ```text
//!  connection ──post──▶ bucket mailbox (bounded) ──┐
//!                                                  ├─ Run(id) ─▶ thread queue ─▶ actor.handle()
//!  connection ──post──▶ bucket mailbox (bounded) ──┘   (at most one Run per bucket queued)
//!
//!  thread timers (min-heap of deadlines) ──when due──▶ actor.tick()  (flushes, retries)
//! ```
//!
//! The thread waits on its queue until the earliest deadline of its buckets, so
//! scheduled flushes need no other thread and no tokio timer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::script::{HandlerInstance, HandlerSource, ScriptLimits};

use super::actor::{Actor, ActorEnv, ActorInit};
use super::bucket::{BucketMsg, BucketShared};
use super::options::BucketOptions;

/// Messages a bucket runs before yielding its thread to other buckets.
const RUN_BUDGET: usize = 64;

/// What a handler thread is asked to do. Its queue is unbounded in type but bounded in
/// fact: at most one `Run` per bucket (guarded by `scheduled`) and one `Create` per
/// bucket being created, and buckets are limited in number. `Recover` comes once per
/// durable bucket each time the log asks for reloads: after an outage, or after a commit
/// that refused ops of a diverged bucket (rare, and one per commit at most).
pub(crate) enum WorkerMsg {
    /// Drain this bucket's mailbox.
    Run(u64),
    /// Start a new bucket on this thread.
    Create(Box<CreateMsg>),
    /// A durable bucket's flush records up to `lsn` have committed (or failed).
    Committed {
        /// The bucket.
        id: u64,
        /// Its last flush record concerned.
        lsn: u64,
        /// Whether the commit succeeded.
        ok: bool,
    },
    /// The database can be written again: reload this durable bucket from it.
    Recover(u64),
    /// Drop every bucket and end the thread.
    Shutdown,
}

/// Everything a thread needs to start a bucket.
pub(crate) struct CreateMsg {
    pub start: BucketStart,
    /// Answers once the handler's `init` ran (and, when recovering, the log replayed).
    pub reply: oneshot::Sender<Result<(), Error>>,
}

/// What a thread starts a bucket from.
pub(crate) struct BucketStart {
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub options: BucketOptions,
    pub handler: Arc<HandlerSource>,
    pub config: serde_json::Value,
    pub limits: ScriptLimits,
    /// The durable log uid; 0 for an in-memory bucket.
    pub uid: u64,
    /// Where the first take's window starts (ms since the epoch); see `Takes::new`.
    pub first_window_ms: u64,
    /// Rebuild the state from the durable log (at start-up).
    pub recover: bool,
    pub mailbox: mpsc::Receiver<BucketMsg>,
    pub shared: Arc<BucketShared>,
}

/// The running handler threads.
pub(crate) struct WorkerPool {
    senders: Vec<crossbeam_channel::Sender<WorkerMsg>>,
    threads: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    /// Starts `n` threads.
    pub fn start(n: usize, env: Arc<ActorEnv>) -> std::io::Result<WorkerPool> {
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            let me = tx.clone();
            let env = env.clone();
            let thread = std::thread::Builder::new()
                .name(format!("bucketly-handler-{i}"))
                .spawn(move || {
                    Worker {
                        me,
                        env,
                        actors: HashMap::new(),
                        timers: BinaryHeap::new(),
                    }
                    .run(rx)
                })?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(WorkerPool {
            senders,
            threads: parking_lot::Mutex::new(threads),
        })
    }

    /// Number of threads.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// The queue of thread `index`.
    pub fn sender(&self, index: usize) -> &crossbeam_channel::Sender<WorkerMsg> {
        &self.senders[index % self.senders.len()]
    }

    /// Stops every thread and waits for them. Queued requests are dropped, which their
    /// connections see as a failed reply.
    pub fn shutdown(&self) {
        for tx in &self.senders {
            let _ = tx.send(WorkerMsg::Shutdown);
        }
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
    }
}

/// A bucket on its thread, and the deadline it is armed for in the thread's heap.
struct Slot {
    actor: Actor,
    armed: Option<Instant>,
}

struct Worker {
    me: crossbeam_channel::Sender<WorkerMsg>,
    env: Arc<ActorEnv>,
    actors: HashMap<u64, Slot>,
    /// Deadlines of this thread's buckets. An entry whose bucket has since been armed
    /// for another instant (or dropped) is stale and skipped when it comes up.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Worker {
    fn run(mut self, rx: crossbeam_channel::Receiver<WorkerMsg>) {
        loop {
            let msg = match self.timers.peek() {
                Some(Reverse((deadline, _))) => match rx.recv_deadline(*deadline) {
                    Ok(msg) => Some(msg),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => break,
                },
            };
            match msg {
                Some(WorkerMsg::Run(id)) => self.run_bucket(id),
                Some(WorkerMsg::Create(create)) => self.create(*create),
                Some(WorkerMsg::Committed { id, lsn, ok }) => {
                    if let Some(slot) = self.actors.get_mut(&id) {
                        slot.actor.committed(lsn, ok, &self.env);
                        self.arm(id);
                    }
                }
                Some(WorkerMsg::Recover(id)) => {
                    if let Some(slot) = self.actors.get_mut(&id) {
                        if let Err(e) = slot.actor.reload_after_outage(&self.env) {
                            tracing::error!(bucket = %slot.actor.name,
                                "cannot reload the durable bucket from disk; it keeps refusing writes: {e}");
                        }
                    }
                }
                Some(WorkerMsg::Shutdown) => {
                    for slot in self.actors.values_mut() {
                        slot.actor.shutdown(&self.env);
                    }
                    break;
                }
                None => {}
            }
            self.fire_timers();
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((deadline, id))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.actors.get_mut(&id) else {
                continue;
            };
            if slot.armed != Some(deadline) {
                continue;
            }
            slot.armed = None;
            let shared = slot.actor.shared.clone();
            let _queued = shared.lane.queue();
            slot.actor.tick(&self.env, now);
            self.arm(id);
        }
    }

    /// Puts the bucket's next wake-up in the heap if it changed.
    fn arm(&mut self, id: u64) {
        let Some(slot) = self.actors.get_mut(&id) else {
            return;
        };
        let wakeup = slot.actor.wakeup();
        if wakeup != slot.armed {
            slot.armed = wakeup;
            if let Some(at) = wakeup {
                self.timers.push(Reverse((at, id)));
            }
        }
    }

    fn create(&mut self, c: CreateMsg) {
        let id = c.start.id;
        if c.reply.send(self.start(c.start)).is_err() {
            // The creator gave up (its connection closed): forget the bucket.
            self.actors.remove(&id);
        }
    }

    fn start(&mut self, c: BucketStart) -> Result<(), Error> {
        let id = c.id;
        let instance = HandlerInstance::new(&c.handler, &c.config, &c.limits)
            .map_err(|e| Error::Handler(e.to_string()))?;
        if c.uid != 0 {
            if let Err(e) = instance.snapshot() {
                let msg = format!(
                    "handler {:?} cannot be used for a durable bucket: {e}",
                    c.handler.name
                );
                return Err(Error::Handler(msg));
            }
        }
        c.shared
            .stats
            .memory
            .store(instance.memory_used() as u64, Ordering::Relaxed);
        let init = ActorInit {
            id,
            name: c.name,
            owner: c.owner,
            instance,
            mailbox: c.mailbox,
            shared: c.shared,
            options: c.options,
            handler: c.handler,
            config: c.config,
            limits: c.limits,
            worker: self.me.clone(),
            uid: c.uid,
            first_window_ms: c.first_window_ms,
        };
        let mut actor = Actor::new(init, &self.env);
        if c.recover {
            actor
                .recover(&self.env, false)
                .map_err(|e| Error::Storage(format!("cannot recover the durable state: {e}")))?;
        }
        actor.publish_info();
        self.actors.insert(id, Slot { actor, armed: None });
        self.arm(id);
        Ok(())
    }

    fn run_bucket(&mut self, id: u64) {
        let Some(slot) = self.actors.get_mut(&id) else {
            return;
        };
        let actor = &mut slot.actor;
        actor.shared.scheduled.store(false, Ordering::Release);
        for _ in 0..RUN_BUDGET {
            match actor.mailbox.try_recv() {
                Ok(msg) => {
                    if !actor.handle(msg, &self.env) {
                        self.actors.remove(&id);
                        return;
                    }
                    actor.shared.lane.handled();
                }
                Err(_) => break,
            }
        }
        actor.instance.publish_memory(&actor.shared.stats.memory);
        actor.publish_info();
        if !actor.mailbox.is_empty() && !actor.shared.scheduled.swap(true, Ordering::AcqRel) {
            let _ = self.me.send(WorkerMsg::Run(id));
        }
        self.arm(id);
    }
}
