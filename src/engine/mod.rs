//! The engine: the registry of buckets, the handler threads that run them, and the
//! commands that change them (CREATE, ALTER, DROP) or describe them (LIST, INFO).
//!
//! Invariant: a bucket is in `Registry::buckets` only after its handler's `init` ran
//! and its spec is on disk; while that happens its name is held in `creating`.

mod actor;
mod bucket;
mod durable;
mod exec;
mod lane;
mod options;
mod outbox;
mod stats;
mod subscribers;
mod take;
mod trigger;
mod worker;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

pub use actor::{EXEC_MAX_PENDING_BYTES, EXEC_MAX_PENDING_EVENTS};
pub use bucket::{
    validate_bucket_name, BucketHandle, BucketMsg, BucketShared, EncodedAnswers, Reply,
    MAX_BUCKET_NAME,
};
pub use durable::{SNAPSHOT_EVERY_BYTES, SNAPSHOT_EVERY_RECORDS};
pub use exec::{ExecStats, MAX_KEPT_RUNS, QUEUE_RUNS};
pub(crate) use lane::Applied;
pub use options::{requested_sinks, BucketOptions, Schedule};
pub use outbox::{MAX_HOPS, MAX_OUTBOX_EVENTS};
pub use stats::ServerStats;
pub use subscribers::{
    push_channel, Push, PushKind, PushSink, PushStream, StillAllowed, Subscriber,
    MAX_SUBSCRIBERS_PER_BUCKET, MAX_SUBSCRIPTIONS_PER_CONNECTION, PUSH_QUEUE, PUSH_QUEUE_BYTES,
};

use crate::config::Config;
use crate::error::Error;
use crate::script::{HandlerCatalog, ScriptLimits};
use crate::store::log::DurableLog;
use crate::store::{BucketSpec, Store};
use actor::ActorEnv;
use worker::{BucketStart, CreateMsg, WorkerMsg, WorkerPool};

/// Whether user `.0` may send to bucket `.1`; asked before a flush delivers events to
/// another bucket on behalf of the bucket's owner.
pub type SendCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) buckets: HashMap<String, Arc<BucketHandle>>,
    creating: HashSet<String>,
}

/// Where handler files come from, for RELOAD.
struct HandlerDir {
    dir: PathBuf,
    required: bool,
}

/// Buckets, handler threads and the database, shared by every connection.
pub struct Engine {
    registry: Arc<RwLock<Registry>>,
    workers: WorkerPool,
    store: Arc<Store>,
    log: Arc<DurableLog>,
    catalog: RwLock<Arc<HandlerCatalog>>,
    handler_dir: HandlerDir,
    limits: ScriptLimits,
    mailbox: usize,
    max_buckets: usize,
    allow_exec: bool,
    next_id: AtomicU64,
    /// Server-wide counters.
    pub stats: ServerStats,
}

/// Releases a name reserved in `creating` on every exit path of CREATE.
struct Reservation<'a> {
    engine: &'a Engine,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.engine.registry.write().creating.remove(&self.name);
    }
}

impl Engine {
    /// Starts the handler threads. Buckets stored in `store` are not loaded yet; call
    /// [`Engine::restore`].
    ///
    /// # Errors
    /// If a thread cannot be spawned.
    ///
    /// Call it inside a tokio runtime: exec sinks run their commands on it.
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        catalog: HandlerCatalog,
        may_send: SendCheck,
    ) -> std::io::Result<Engine> {
        let registry = Arc::new(RwLock::new(Registry::default()));
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let reload = registry.clone();
        let log = Arc::new(DurableLog::start(
            store.clone(),
            Box::new(move || {
                // Every durable bucket with a failed write reloads from disk.
                for h in reload.read().buckets.values() {
                    if h.options.durable {
                        let _ = h.worker.send(WorkerMsg::Recover(h.id));
                    }
                }
            }),
            config.writer_nice,
        )?);
        let env = Arc::new(ActorEnv {
            registry: registry.clone(),
            may_send,
            runtime,
            // Absolute: commands run in their run directory and get these paths.
            exec_dir: std::path::absolute(config.exec_dir())?,
            store: store.clone(),
            log: log.clone(),
        });
        Ok(Engine {
            registry,
            workers: WorkerPool::start(config.worker_threads(), env)?,
            store,
            log,
            catalog: RwLock::new(Arc::new(catalog)),
            handler_dir: HandlerDir {
                dir: config.handlers_dir.clone(),
                required: config.handlers_dir_required,
            },
            limits: ScriptLimits {
                memory: config.lua_memory,
                time: config.lua_time,
            },
            mailbox: config.mailbox.max(1),
            max_buckets: config.max_buckets,
            allow_exec: config.allow_exec,
            next_id: AtomicU64::new(1),
            stats: ServerStats::new(config),
        })
    }

    /// Creates again every bucket stored in the database, with empty state. A bucket
    /// that cannot start (its handler is gone or fails `init`) is skipped and reported;
    /// its record stays, so it comes back once the handler is fixed.
    pub async fn restore(&self) -> Vec<String> {
        let stored = match self.store.blocking(|s| s.buckets()).await {
            Ok(stored) => stored,
            Err(e) => return vec![format!("cannot read buckets: {e}")],
        };
        let mut problems = Vec::new();
        let live: HashSet<u64> = stored
            .iter()
            .filter_map(|(_, spec)| spec.as_ref().ok().map(|s| s.uid))
            .filter(|&uid| uid != 0)
            .collect();
        match self.store.blocking(move |s| s.forget_all_but(&live)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed the durable data of {n} dropped bucket(s)"),
            Err(e) => problems.push(format!("cannot clean the durable log: {e}")),
        }
        for (name, spec) in stored {
            let result = match spec {
                Ok(spec) => self.start_bucket(name.clone(), spec, false).await,
                Err(e) => Err(Error::Storage(format!("unreadable record: {e}"))),
            };
            if let Err(e) = result {
                problems.push(format!("bucket {name:?} not restored: {e}"));
            }
        }
        problems
    }

    /// The live bucket called `name`.
    ///
    /// # Errors
    /// [`Error::NoSuchBucket`].
    pub fn bucket(&self, name: &str) -> Result<Arc<BucketHandle>, Error> {
        self.registry
            .read()
            .buckets
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NoSuchBucket(name.to_owned()))
    }

    /// CREATE: validates, runs the handler's `init` on the bucket's thread, stores the
    /// spec, then publishes the bucket. `owner` is the creating user: events the bucket
    /// forwards or emits are sent with that user's permissions.
    ///
    /// # Errors
    /// `InvalidArgument` (name, config or options, a forward loop), `ExecDisabled`,
    /// `NoSuchHandler`, `BucketExists`, `LimitExceeded`, `HandlerError` (init failed)
    /// or `StorageError`.
    pub async fn create(
        &self,
        name: &str,
        handler: &str,
        config: &[u8],
        options: &[u8],
        owner: &str,
    ) -> Result<(), Error> {
        validate_bucket_name(name)?;
        let config = match config {
            [] => serde_json::Value::Null,
            text => serde_json::from_slice(text)
                .map_err(|e| Error::InvalidArgument(format!("config is not valid JSON: {e}")))?,
        };
        let options = BucketOptions::parse(options)?;
        self.check_options(name, &options)?;
        let created_ms = now_ms();
        let uid = if options.durable {
            // Unique over the file's life: a dropped bucket's records never mix in.
            (created_ms << 20) | (self.next_id.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF)
        } else {
            0
        };
        let spec = BucketSpec {
            handler: handler.to_owned(),
            config,
            options: options.to_map(),
            created_ms,
            owner: owner.to_owned(),
            uid,
        };
        self.start_bucket(name.to_owned(), spec, true).await
    }

    /// What the server allows beyond the options' own rules: exec only with
    /// `--allow-exec`, and no forward chain that leads back to the bucket.
    fn check_options(&self, name: &str, options: &BucketOptions) -> Result<(), Error> {
        if options.exec.is_some() && !self.allow_exec {
            return Err(Error::ExecDisabled);
        }
        let Some(first) = &options.forward else {
            return Ok(());
        };
        let reg = self.registry.read();
        let mut chain = vec![name.to_owned()];
        let mut next = Some(first.clone());
        while let Some(target) = next {
            let looped = target == name;
            chain.push(target.clone());
            if looped {
                return Err(Error::InvalidArgument(format!(
                    "forward loop: {}",
                    chain.join(" -> ")
                )));
            }
            if chain.len() > reg.buckets.len() + 2 {
                break; // a loop elsewhere in the chain, not through this bucket
            }
            next = reg
                .buckets
                .get(&target)
                .and_then(|h| h.options.forward.clone());
        }
        Ok(())
    }

    async fn start_bucket(
        &self,
        name: String,
        spec: BucketSpec,
        persist: bool,
    ) -> Result<(), Error> {
        let options = BucketOptions::from_value(serde_json::Value::Object(spec.options.clone()))?;
        if options.exec.is_some() && !self.allow_exec {
            return Err(Error::ExecDisabled);
        }
        let handler = self
            .catalog
            .read()
            .get(&spec.handler)
            .ok_or_else(|| Error::NoSuchHandler(spec.handler.clone()))?;
        let _reservation = self.reserve(&name)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let worker_index = worker_for(&name, self.workers.len());
        let worker = self.workers.sender(worker_index).clone();
        let (tx, mailbox) = mpsc::channel(self.mailbox);
        let shared = Arc::new(BucketShared::default());
        let (reply, initialised) = oneshot::channel();
        if options.durable && spec.uid == 0 {
            return Err(Error::Storage("durable bucket without a log uid".into()));
        }
        let create = CreateMsg {
            start: BucketStart {
                id,
                name: name.clone(),
                owner: spec.owner.clone(),
                options: options.clone(),
                handler,
                config: spec.config.clone(),
                limits: self.limits.clone(),
                uid: if options.durable { spec.uid } else { 0 },
                // A durable bucket's takes continue from its log. An in-memory bucket
                // loaded at start-up lost its aggregate and take history: its windows
                // start afresh now, so none can claim a window stored before the restart.
                first_window_ms: if persist || options.durable {
                    spec.created_ms
                } else {
                    now_ms().max(spec.created_ms)
                },
                recover: options.durable && !persist,
                mailbox,
                shared: shared.clone(),
            },
            reply,
        };
        worker
            .send(WorkerMsg::Create(Box::new(create)))
            .map_err(|_| Error::ShuttingDown)?;
        initialised.await.map_err(|_| Error::ShuttingDown)??;
        let handle = Arc::new(BucketHandle {
            id,
            name: name.clone(),
            spec,
            options,
            worker_index,
            tx,
            worker,
            shared,
        });
        if persist {
            let (key, spec) = (name.clone(), handle.spec.clone());
            if let Err(e) = self
                .store
                .blocking(move |s| s.put_bucket(&key, &spec))
                .await
            {
                let _ = handle.post(BucketMsg::Stop).await;
                return Err(Error::Storage(e.to_string()));
            }
        }
        self.registry.write().buckets.insert(name, handle);
        Ok(())
    }

    fn reserve(&self, name: &str) -> Result<Reservation<'_>, Error> {
        let mut reg = self.registry.write();
        if reg.buckets.contains_key(name) || reg.creating.contains(name) {
            return Err(Error::BucketExists(name.to_owned()));
        }
        if reg.buckets.len() + reg.creating.len() >= self.max_buckets {
            return Err(Error::LimitExceeded(format!(
                "the server holds its maximum of {} buckets",
                self.max_buckets
            )));
        }
        reg.creating.insert(name.to_owned());
        Ok(Reservation {
            engine: self,
            name: name.to_owned(),
        })
    }

    /// DROP: removes the spec from disk, unpublishes the bucket, and lets its actor answer
    /// what was queued before it ends.
    ///
    /// # Errors
    /// `NoSuchBucket` or `StorageError` (the bucket then stays).
    pub async fn drop_bucket(&self, name: &str) -> Result<(), Error> {
        let handle = self.bucket(name)?;
        let key = name.to_owned();
        self.store
            .blocking(move |s| s.delete_bucket(&key))
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        let removed = {
            let mut reg = self.registry.write();
            match reg.buckets.get(name) {
                Some(h) if h.id == handle.id => reg.buckets.remove(name),
                _ => None,
            }
        };
        let Some(handle) = removed else {
            return Err(Error::NoSuchBucket(name.to_owned()));
        };
        handle.post(BucketMsg::Stop).await
    }

    /// The options ALTER would give bucket `name` for `changes` (checked).
    ///
    /// # Errors
    /// `NoSuchBucket`, `InvalidArgument`, `ExecDisabled`.
    pub fn altered_options(&self, name: &str, changes: &[u8]) -> Result<BucketOptions, Error> {
        let options = self.bucket(name)?.options.altered(changes)?;
        self.check_options(name, &options)?;
        Ok(options)
    }

    /// ALTER: stores `options` (from [`Engine::altered_options`]) as the bucket's, then
    /// hands them to its actor, which keeps its state and its pending events.
    ///
    /// # Errors
    /// `NoSuchBucket` or `StorageError` (the bucket then keeps its old options).
    pub async fn alter(&self, name: &str, options: BucketOptions) -> Result<(), Error> {
        let old = self.bucket(name)?;
        let spec = BucketSpec {
            options: options.to_map(),
            ..old.spec.clone()
        };
        let (key, stored) = (name.to_owned(), spec.clone());
        self.store
            .blocking(move |s| s.put_bucket(&key, &stored))
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        let handle = Arc::new(BucketHandle {
            id: old.id,
            name: old.name.clone(),
            spec,
            options: options.clone(),
            worker_index: old.worker_index,
            tx: old.tx.clone(),
            worker: old.worker.clone(),
            shared: old.shared.clone(),
        });
        {
            let mut reg = self.registry.write();
            match reg.buckets.get(name) {
                Some(h) if h.id == old.id => reg.buckets.insert(name.to_owned(), handle.clone()),
                _ => return Err(Error::NoSuchBucket(name.to_owned())),
            };
        }
        handle.post(BucketMsg::Reconfigure { options }).await
    }

    /// Reads the handler files again. Buckets created afterwards use the new files;
    /// existing buckets keep running the code they were created with.
    ///
    /// # Errors
    /// `InvalidArgument` if the handlers directory cannot be read (the handlers stay
    /// as they were).
    pub fn reload(&self) -> Result<serde_json::Value, Error> {
        let HandlerDir { dir, required } = &self.handler_dir;
        let (catalog, warnings) = if !dir.is_dir() && !required {
            (HandlerCatalog::stock(), Vec::new())
        } else {
            HandlerCatalog::with_dir(dir).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot read handlers directory {}: {e}",
                    dir.display()
                ))
            })?
        };
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let names: Vec<String> = catalog.iter().map(|h| h.name.clone()).collect();
        tracing::info!(handlers = ?names, "handlers reloaded");
        *self.catalog.write() = Arc::new(catalog);
        Ok(json!({"handlers": names, "warnings": warnings}))
    }

    /// LIST: every bucket `visible` accepts, as `{"name", "handler"}`, sorted by name.
    pub fn list_json(&self, visible: impl Fn(&str) -> bool) -> Vec<u8> {
        let mut rows: Vec<_> = self
            .registry
            .read()
            .buckets
            .values()
            .filter(|h| visible(&h.name))
            .map(|h| (h.name.clone(), h.spec.handler.clone()))
            .collect();
        rows.sort();
        let rows: Vec<_> = rows
            .into_iter()
            .map(|(name, handler)| json!({"name": name, "handler": handler}))
            .collect();
        serde_json::to_vec(&rows).unwrap_or_default()
    }

    /// INFO: server counters, or one bucket's. Read from shared counters without going
    /// through the bucket's mailbox, so a busy bucket still answers INFO at once.
    ///
    /// # Errors
    /// `NoSuchBucket`.
    pub fn info(&self, bucket: Option<&str>) -> Result<serde_json::Value, Error> {
        let value = match bucket {
            Some(name) => bucket_info(&*self.bucket(name)?),
            None => {
                let reg = self.registry.read();
                let (mut events, mut memory) = (0u64, 0u64);
                for h in reg.buckets.values() {
                    events += h.shared.stats.events.load(Ordering::Relaxed);
                    memory += h.shared.stats.memory.load(Ordering::Relaxed);
                }
                let mut v = self.stats.to_json();
                v["buckets"] = json!(reg.buckets.len());
                v["events"] = json!(events);
                v["handler_memory_bytes"] = json!(memory);
                v["handler_threads"] = json!(self.workers.len());
                v["storage"] = self.storage_json();
                v["handlers"] = json!(self
                    .catalog
                    .read()
                    .iter()
                    .map(|h| h.name.clone())
                    .collect::<Vec<_>>());
                v
            }
        };
        Ok(value)
    }

    /// Stops the handler threads (durable buckets snapshot their state first), then
    /// commits what the durable log holds. Requests still queued are dropped. Call
    /// after the connections have drained.
    pub fn shutdown(&self) {
        self.registry.write().buckets.clear();
        self.workers.shutdown();
        self.log.shutdown();
    }

    /// Whether durable writes are possible now, and the durable log's counters (`wal`:
    /// its write-ahead file's).
    pub fn storage_json(&self) -> serde_json::Value {
        let mut json = self.log.health.to_json();
        json["wal"] = self.store.wal_info();
        json
    }
}

fn bucket_info(h: &BucketHandle) -> serde_json::Value {
    let s = &h.shared.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    json!({
        "name": h.name,
        "handler": h.spec.handler,
        "config": h.spec.config,
        "created_ms": h.spec.created_ms,
        "events": load(&s.events),
        "rejected": load(&s.rejected),
        "errors": load(&s.errors),
        "sends": load(&s.sends),
        "views": load(&s.views),
        "dumps": load(&s.dumps),
        "takes": load(&s.takes),
        "take_pending": match load(&s.take_pending) {
            0 => serde_json::Value::Null,
            id => id.into(),
        },
        "queue_depth": h.queue_depth(),
        "queue_capacity": h.queue_capacity(),
        "memory_bytes": load(&s.memory),
        "handler_thread": h.worker_index,
        "options": h.spec.options,
        "owner": h.spec.owner,
        "pending": load(&s.pending),
        "flushes": load(&s.flushes),
        "outputs": load(&s.outputs),
        "flush_errors": load(&s.flush_errors),
        "subscribers": load(&s.subscribers),
        "subscribers_lagged": load(&s.lagged),
        "forwarded": load(&s.forwarded),
        "forward_dropped": load(&s.forward_dropped),
        "received": load(&s.received),
        "failed": *s.failure.lock(),
        "exec": h.options.exec.is_some().then(|| h.shared.exec.to_json()),
        "durable": durable_info(s),
    })
}

fn durable_info(s: &bucket::BucketStats) -> Option<serde_json::Value> {
    let mut info = s.durable.lock().clone()?;
    if let Some(pos) = s.position.get() {
        pos.overlay(&mut info);
    }
    Some(info)
}

fn worker_for(name: &str, n: usize) -> usize {
    // DefaultHasher::new() has fixed keys: the same name maps to the same thread.
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
