//! Handler threads. Each OS thread owns a fixed subset of buckets (by a hash of the name)
//! and their Lua states, so a state never moves between threads and needs no lock. Lua
//! never runs on a tokio worker.
//!
//! ```text
//!  connection ──post──▶ bucket mailbox (bounded) ──┐
//!                                                  ├─ Run(id) ─▶ thread queue ─▶ actor.run()
//!  connection ──post──▶ bucket mailbox (bounded) ──┘   (at most one Run per bucket queued)
//! ```

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::protocol::{Response, SendOutcome};
use crate::script::{HandlerInstance, HandlerSource, ScriptLimits};

use super::bucket::{BucketMsg, BucketShared};

/// Messages a bucket runs before yielding its thread to other buckets.
const RUN_BUDGET: usize = 64;

/// What a handler thread is asked to do. Its queue is unbounded in type but bounded in
/// fact: at most one `Run` per bucket (guarded by `scheduled`) and one `Create` per
/// bucket being created, and buckets are limited in number.
pub(crate) enum WorkerMsg {
    /// Drain this bucket's mailbox.
    Run(u64),
    /// Start a new bucket on this thread.
    Create(Box<CreateMsg>),
    /// Drop every bucket and end the thread.
    Shutdown,
}

/// Everything a thread needs to start a bucket.
pub(crate) struct CreateMsg {
    pub id: u64,
    pub handler: Arc<HandlerSource>,
    pub config: serde_json::Value,
    pub limits: ScriptLimits,
    pub mailbox: mpsc::Receiver<BucketMsg>,
    pub shared: Arc<BucketShared>,
    /// Answers once the handler's `init` ran.
    pub reply: oneshot::Sender<Result<(), Error>>,
}

/// The running handler threads.
pub(crate) struct WorkerPool {
    senders: Vec<crossbeam_channel::Sender<WorkerMsg>>,
    threads: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    /// Starts `n` threads.
    pub fn start(n: usize) -> std::io::Result<WorkerPool> {
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            let me = tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("bucketly-handler-{i}"))
                .spawn(move || {
                    Worker {
                        me,
                        actors: HashMap::new(),
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

struct Actor {
    instance: HandlerInstance,
    mailbox: mpsc::Receiver<BucketMsg>,
    shared: Arc<BucketShared>,
}

struct Worker {
    me: crossbeam_channel::Sender<WorkerMsg>,
    actors: HashMap<u64, Actor>,
}

impl Worker {
    fn run(mut self, rx: crossbeam_channel::Receiver<WorkerMsg>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                WorkerMsg::Run(id) => self.run_bucket(id),
                WorkerMsg::Create(create) => self.create(*create),
                WorkerMsg::Shutdown => break,
            }
        }
    }

    fn create(&mut self, c: CreateMsg) {
        let result = HandlerInstance::new(&c.handler, &c.config, &c.limits);
        let answer = match result {
            Ok(instance) => {
                c.shared
                    .stats
                    .memory
                    .store(instance.memory_used() as u64, Ordering::Relaxed);
                self.actors.insert(
                    c.id,
                    Actor {
                        instance,
                        mailbox: c.mailbox,
                        shared: c.shared,
                    },
                );
                Ok(())
            }
            Err(e) => Err(Error::Handler(e.to_string())),
        };
        if c.reply.send(answer).is_err() {
            // The creator gave up (its connection closed): forget the bucket.
            self.actors.remove(&c.id);
        }
    }

    fn run_bucket(&mut self, id: u64) {
        let Some(actor) = self.actors.get_mut(&id) else {
            return;
        };
        actor.shared.scheduled.store(false, Ordering::Release);
        for _ in 0..RUN_BUDGET {
            match actor.mailbox.try_recv() {
                Ok(BucketMsg::Stop) => {
                    self.actors.remove(&id);
                    return;
                }
                Ok(msg) => actor.handle(msg),
                Err(_) => break,
            }
        }
        let stats = &actor.shared.stats;
        stats
            .memory
            .store(actor.instance.memory_used() as u64, Ordering::Relaxed);
        if !actor.mailbox.is_empty() && !actor.shared.scheduled.swap(true, Ordering::AcqRel) {
            let _ = self.me.send(WorkerMsg::Run(id));
        }
    }
}

impl Actor {
    fn handle(&mut self, msg: BucketMsg) {
        let stats = &self.shared.stats;
        let (reply, response) = match msg {
            BucketMsg::Send { id, batch, reply } => {
                let mut outcome = SendOutcome::default();
                for (i, event) in batch.iter().enumerate() {
                    match self.instance.send(event) {
                        Ok(()) => outcome.accepted += 1,
                        Err(reason) => outcome.reject(i as u32, || reason),
                    }
                }
                stats.sends.fetch_add(1, Ordering::Relaxed);
                stats
                    .events
                    .fetch_add(u64::from(outcome.accepted), Ordering::Relaxed);
                stats
                    .rejected
                    .fetch_add(u64::from(outcome.rejected), Ordering::Relaxed);
                (reply, Response::ok(id, outcome.encode()))
            }
            BucketMsg::View { id, arg, reply } => {
                stats.views.fetch_add(1, Ordering::Relaxed);
                let result = self.instance.view(arg.as_deref());
                (reply, self.json_response(id, result))
            }
            BucketMsg::Dump { id, reply } => {
                stats.dumps.fetch_add(1, Ordering::Relaxed);
                let result = self.instance.dump();
                (reply, self.json_response(id, result))
            }
            BucketMsg::Stop => return,
        };
        // A closed receiver means the connection went away; nothing to do.
        let _ = reply.send(response);
    }

    fn json_response(
        &self,
        id: u32,
        result: Result<Vec<u8>, crate::script::ScriptError>,
    ) -> Response {
        match result {
            Ok(json) => Response::ok(id, json.into()),
            Err(e) => {
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                let e = Error::Handler(e.to_string());
                Response::error(id, e.code(), &e.to_string())
            }
        }
    }
}
