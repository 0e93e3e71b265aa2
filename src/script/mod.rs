//! Lua handlers: the sandbox, the Lua↔JSON mapping, the catalog of handler sources and
//! [`HandlerInstance`], one running handler for one bucket.
//!
//! A `HandlerInstance` owns its own Lua state and is used from one OS thread only (the
//! handler thread that owns its bucket); nothing here is async.

mod catalog;
mod context;
mod handler;
mod instance;
mod json;
mod native;
mod sandbox;
mod snapshot;
mod watchdog;

pub use catalog::{HandlerCatalog, HandlerSource, Origin, MAX_HANDLER_FILE};
pub use context::{Emit, FlushInfo, MAX_EMITS, MAX_EMIT_BYTES};
pub use handler::HandlerInstance;
pub(crate) use handler::SharedNative;
pub use instance::Flushed;
pub use json::MAX_DEPTH;
pub use snapshot::MAX_SNAPSHOT_DEPTH;

/// Limits applied to each handler instance.
#[derive(Debug, Clone)]
pub struct ScriptLimits {
    /// Memory limit of the Lua state, in bytes.
    pub memory: usize,
    /// Time one handler call (init, send of one event, view, dump) may run.
    pub time: std::time::Duration,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            memory: crate::config::DEFAULT_LUA_MEMORY,
            time: crate::config::DEFAULT_LUA_TIME,
        }
    }
}

/// A handler failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// The handler file does not load or does not have the required shape.
    #[error("handler {name}: {message}")]
    Load {
        /// Handler name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A handler function raised an error or returned an unconvertible value.
    #[error("{0}")]
    Runtime(String),
    /// A call was stopped by the time budget; the bucket's state may be half-updated, so
    /// it refuses every call until it is dropped and created again.
    #[error("bucket failed: {0}; drop and create it again")]
    Failed(String),
}

/// One line for a Lua error: the message without the stack traceback.
pub(crate) fn lua_error_message(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return lua_error_message(cause),
        mlua::Error::MemoryError(m) => format!("memory limit exceeded: {m}"),
        other => other.to_string(),
    };
    let text = text.split("\nstack traceback:").next().unwrap_or(&text);
    text.trim().to_owned()
}
