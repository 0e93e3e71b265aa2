//! [`HandlerInstance`]: one running handler for one bucket. It is a Lua state running
//! the handler's module, or, for the stock `counter` and `unique` handlers, a native Rust
//! implementation with the same semantics ([`super::native`]). A handler file that
//! overrides a stock name with different text runs in Lua.
//!
//! A native state sits behind a lock ([`SharedNative`]) so that a connection may apply
//! SENDs to it directly while the bucket's actor is idle (`engine::lane`).

use std::sync::Arc;

use super::context::FlushInfo;
use super::instance::{Flushed, LuaInstance};
use super::native::Native;
use super::{HandlerSource, ScriptError, ScriptLimits};

/// A handler running for one bucket, used from one OS thread only.
///
/// Every Lua call runs under the time budget. A call stopped by it leaves the state
/// half-updated, so the instance is then *failed*: every later call answers with the
/// failure, and the bucket must be dropped and created again. Native handlers do a
/// bounded amount of work per event and are never stopped.
pub struct HandlerInstance(Inner);

enum Inner {
    Lua(Box<LuaInstance>),
    Native(Arc<SharedNative>),
}

/// A native handler state that threads other than the bucket's may apply events to,
/// under its lock.
pub(crate) struct SharedNative {
    state: parking_lot::Mutex<NativeState>,
}

/// What [`SharedNative`]'s lock guards.
pub(crate) struct NativeState {
    pub native: Native,
    /// Whether connections may apply SENDs here now; set by the actor.
    pub open: bool,
    /// Events accepted by connections since the actor last counted them.
    pub inline_events: u64,
}

impl SharedNative {
    /// The state, locked, waiting at most `wait` for another thread to release it.
    pub fn try_lock_for(
        &self,
        wait: std::time::Duration,
    ) -> Option<parking_lot::MutexGuard<'_, NativeState>> {
        // Tries without waiting first, as `try_lock` does.
        self.state.try_lock_for(wait)
    }

    /// The state, locked, waiting for it.
    fn lock(&self) -> parking_lot::MutexGuard<'_, NativeState> {
        self.state.lock()
    }
}

impl HandlerInstance {
    /// Starts `handler` with `config`: natively when it is a stock handler with a native
    /// implementation, else in a fresh Lua state (whose `init(config)` makes the state).
    ///
    /// # Errors
    /// [`ScriptError::Load`] if the module does not load or has the wrong shape,
    /// [`ScriptError::Runtime`] if `init` fails (for example on a bad config).
    pub fn new(
        handler: &HandlerSource,
        config: &serde_json::Value,
        limits: &ScriptLimits,
    ) -> Result<Self, ScriptError> {
        match Native::for_handler(handler, config, limits) {
            Some(native) => Ok(HandlerInstance(Inner::Native(Arc::new(SharedNative {
                state: parking_lot::Mutex::new(NativeState {
                    native: native?,
                    open: false,
                    inline_events: 0,
                }),
            })))),
            None => Self::new_lua(handler, config, limits),
        }
    }

    /// Starts `handler` in Lua even if it has a native implementation: to compare the
    /// two, in tests and benchmarks.
    ///
    /// # Errors
    /// As for [`HandlerInstance::new`].
    pub fn new_lua(
        handler: &HandlerSource,
        config: &serde_json::Value,
        limits: &ScriptLimits,
    ) -> Result<Self, ScriptError> {
        let lua = LuaInstance::new(handler, config, limits)?;
        Ok(HandlerInstance(Inner::Lua(Box::new(lua))))
    }

    /// Whether this instance runs natively rather than in Lua.
    pub fn is_native(&self) -> bool {
        matches!(self.0, Inner::Native(_))
    }

    /// The native state, for connections to apply SENDs to (`engine::lane`).
    pub(crate) fn shared_native(&self) -> Option<Arc<SharedNative>> {
        match &self.0 {
            Inner::Lua(_) => None,
            Inner::Native(h) => Some(h.clone()),
        }
    }

    /// Events connections applied since the last call (0 for Lua), and whether they may
    /// apply more from now on.
    pub(crate) fn take_inline_events(&self, open: bool) -> u64 {
        match &self.0 {
            Inner::Lua(_) => 0,
            Inner::Native(h) => {
                let mut state = h.lock();
                state.open = open;
                std::mem::take(&mut state.inline_events)
            }
        }
    }

    /// Applies one event.
    ///
    /// # Errors
    /// The rejection reason, when `send` returned `false[, reason]` or `nil, reason`, or
    /// raised an error (the reason is then the error text).
    pub fn send(&mut self, event: &[u8]) -> Result<(), String> {
        match &mut self.0 {
            Inner::Lua(h) => h.send(event),
            Inner::Native(h) => h.lock().native.send(event),
        }
    }

    /// Calls `view(state, arg)` and returns the result as JSON.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] if `view` raises an error or returns a value with no
    /// JSON form.
    pub fn view(&mut self, arg: Option<&[u8]>) -> Result<Vec<u8>, ScriptError> {
        match &mut self.0 {
            Inner::Lua(h) => h.view(arg),
            Inner::Native(h) => Ok(h.lock().native.view(arg)),
        }
    }

    /// Calls `dump(state)`: the aggregate as JSON, after which the handler has reset it.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] as for [`view`](Self::view).
    pub fn dump(&mut self) -> Result<Vec<u8>, ScriptError> {
        match &mut self.0 {
            Inner::Lua(h) => h.dump(),
            Inner::Native(h) => Ok(h.lock().native.dump()),
        }
    }

    /// A scheduled flush: `flush(state, ctx)` if the handler has one, else `dump(state)`.
    /// A `nil` result means there is nothing to output.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] as for [`view`](Self::view); emits of a failed call are
    /// discarded.
    pub fn flush(&mut self, info: &FlushInfo<'_>) -> Result<Flushed, ScriptError> {
        match &mut self.0 {
            Inner::Lua(h) => h.flush(info),
            Inner::Native(h) => Ok(Flushed {
                output: Some(h.lock().native.dump()),
                emits: Vec::new(),
            }),
        }
    }

    /// Why the instance is failed, if it is.
    pub fn failure(&self) -> Option<&str> {
        match &self.0 {
            Inner::Lua(h) => h.failure(),
            Inner::Native(_) => None,
        }
    }

    /// The state as bytes, for a durable bucket's snapshot. A native state is written
    /// in the same format as the Lua state of the same handler, so either can restore it.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] naming what the state holds that cannot be kept (a
    /// function, a shared table, ...); [`ScriptError::Failed`] for a failed instance.
    pub fn snapshot(&self) -> Result<Vec<u8>, ScriptError> {
        match &self.0 {
            Inner::Lua(h) => h.snapshot(),
            Inner::Native(h) => Ok(h.lock().native.snapshot()),
        }
    }

    /// Replaces the state with one made by [`HandlerInstance::snapshot`].
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] if the bytes are not a snapshot or do not fit in memory.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), ScriptError> {
        match &mut self.0 {
            Inner::Lua(h) => h.restore(snapshot),
            Inner::Native(h) => h
                .lock()
                .native
                .restore(snapshot)
                .map_err(|e| ScriptError::Runtime(format!("cannot restore the snapshot: {e}"))),
        }
    }

    /// Whether the handler defines `flush(state, ctx)` (called by scheduled processing).
    pub fn has_flush(&self) -> bool {
        match &self.0 {
            Inner::Lua(h) => h.has_flush(),
            Inner::Native(_) => false,
        }
    }

    /// Stores [`HandlerInstance::memory_used`] in `stat`; for a native state under its
    /// lock, so it cannot overwrite a newer value the fast lane stored.
    pub(crate) fn publish_memory(&self, stat: &std::sync::atomic::AtomicU64) {
        use std::sync::atomic::Ordering::Relaxed;
        match &self.0 {
            Inner::Lua(h) => stat.store(h.memory_used() as u64, Relaxed),
            Inner::Native(h) => {
                let state = h.lock();
                stat.store(state.native.memory_used() as u64, Relaxed);
            }
        }
    }

    /// Bytes used by this instance's state (estimated for a native one).
    pub fn memory_used(&self) -> usize {
        match &self.0 {
            Inner::Lua(h) => h.memory_used(),
            Inner::Native(h) => h.lock().native.memory_used(),
        }
    }
}
