//! The engine: the registry of buckets, the handler threads that run them, and the
//! commands that change them (CREATE, DROP) or describe them (LIST, INFO).
//!
//! Invariant: a bucket is in `Registry::buckets` only after its handler's `init` ran
//! and its spec is on disk; while that happens its name is held in `creating`.

mod bucket;
mod stats;
mod worker;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

pub use bucket::{
    validate_bucket_name, BucketHandle, BucketMsg, BucketShared, Reply, MAX_BUCKET_NAME,
};
pub use stats::ServerStats;

use crate::config::Config;
use crate::error::Error;
use crate::script::{HandlerCatalog, ScriptLimits};
use crate::store::{BucketSpec, Store};
use worker::{CreateMsg, WorkerMsg, WorkerPool};

#[derive(Default)]
struct Registry {
    buckets: HashMap<String, Arc<BucketHandle>>,
    creating: HashSet<String>,
}

/// Buckets, handler threads and the database, shared by every connection.
pub struct Engine {
    registry: RwLock<Registry>,
    workers: WorkerPool,
    store: Arc<Store>,
    catalog: HandlerCatalog,
    limits: ScriptLimits,
    mailbox: usize,
    max_buckets: usize,
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
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        catalog: HandlerCatalog,
    ) -> std::io::Result<Engine> {
        Ok(Engine {
            registry: RwLock::new(Registry::default()),
            workers: WorkerPool::start(config.worker_threads())?,
            store,
            catalog,
            limits: ScriptLimits {
                memory: config.lua_memory,
                time: config.lua_time,
            },
            mailbox: config.mailbox.max(1),
            max_buckets: config.max_buckets,
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
    /// spec, then publishes the bucket.
    ///
    /// # Errors
    /// `InvalidArgument` (name, config or options), `NoSuchHandler`, `BucketExists`,
    /// `LimitExceeded`, `HandlerError` (init failed) or `StorageError`.
    pub async fn create(
        &self,
        name: &str,
        handler: &str,
        config: &[u8],
        options: &[u8],
    ) -> Result<(), Error> {
        validate_bucket_name(name)?;
        let config = match config {
            [] => serde_json::Value::Null,
            text => serde_json::from_slice(text)
                .map_err(|e| Error::InvalidArgument(format!("config is not valid JSON: {e}")))?,
        };
        let options = parse_options(options)?;
        let spec = BucketSpec {
            handler: handler.to_owned(),
            config,
            options,
            created_ms: now_ms(),
        };
        self.start_bucket(name.to_owned(), spec, true).await
    }

    async fn start_bucket(
        &self,
        name: String,
        spec: BucketSpec,
        persist: bool,
    ) -> Result<(), Error> {
        let handler = self
            .catalog
            .get(&spec.handler)
            .ok_or_else(|| Error::NoSuchHandler(spec.handler.clone()))?;
        let _reservation = self.reserve(&name)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let worker_index = worker_for(&name, self.workers.len());
        let worker = self.workers.sender(worker_index).clone();
        let (tx, mailbox) = mpsc::channel(self.mailbox);
        let shared = Arc::new(BucketShared::default());
        let (reply, initialised) = oneshot::channel();
        let create = CreateMsg {
            id,
            handler,
            config: spec.config.clone(),
            limits: self.limits.clone(),
            mailbox,
            shared: shared.clone(),
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
                v["handlers"] = json!(self
                    .catalog
                    .iter()
                    .map(|h| h.name.clone())
                    .collect::<Vec<_>>());
                v
            }
        };
        Ok(value)
    }

    /// Stops the handler threads; requests still queued are dropped. Call after the
    /// connections have drained.
    pub fn shutdown(&self) {
        self.registry.write().buckets.clear();
        self.workers.shutdown();
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
        "queue_depth": h.queue_depth(),
        "queue_capacity": h.queue_capacity(),
        "memory_bytes": load(&s.memory),
        "handler_thread": h.worker_index,
    })
}

/// Bucket options accepted by CREATE. None exist in this release; the field is there so
/// later ones (durability, triggers) need no new wire layout.
const KNOWN_OPTIONS: [&str; 0] = [];

fn parse_options(options: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    if options.is_empty() {
        return Ok(Default::default());
    }
    let value: serde_json::Value = serde_json::from_slice(options)
        .map_err(|e| Error::InvalidArgument(format!("options are not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::InvalidArgument(
            "options must be a JSON object".into(),
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !KNOWN_OPTIONS.contains(&k.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "unknown bucket option {unknown:?}"
        )));
    }
    Ok(map)
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
