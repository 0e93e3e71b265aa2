//! The `ctx` table a handler's `flush(state, ctx)` receives: facts about the flush, and
//! `ctx.emit(bucket, event)` and `ctx.log(...)`. One table per bucket, refilled before
//! each flush; emits are collected here and delivered by the engine after the call.

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{Lua, Table, Value, Variadic};

use super::json::write_json;

/// Emits one flush may make; one more raises an error in the handler.
pub const MAX_EMITS: usize = 10_000;
/// Bytes of emitted events one flush may make (events plus bucket names).
pub const MAX_EMIT_BYTES: usize = 16 * 1024 * 1024;
/// `ctx.log` lines one call may write; further lines are counted, not written.
pub const MAX_LOG_LINES: usize = 100;
/// Longest `ctx.log` line; longer ones are cut.
pub const MAX_LOG_LINE: usize = 1024;

/// What the engine tells the handler about a flush.
#[derive(Debug, Clone, Copy)]
pub struct FlushInfo<'a> {
    /// The bucket's name.
    pub bucket: &'a str,
    /// The number the output will carry if there is one.
    pub seq: u64,
    /// Events accepted since the last flush.
    pub events: u64,
    /// Wall-clock time of the flush, milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// An event a handler emitted to another bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// The target bucket.
    pub bucket: String,
    /// The event's bytes.
    pub event: Vec<u8>,
}

#[derive(Default)]
struct Collected {
    bucket: String,
    emits: Vec<Emit>,
    bytes: usize,
    log_lines: usize,
}

/// The reusable `ctx` table and what its functions collected.
pub(crate) struct Context {
    table: Table,
    collected: Rc<RefCell<Collected>>,
}

impl Context {
    /// Builds the table with `emit` and `log` in `lua`.
    ///
    /// # Errors
    /// Only on Lua allocation failure.
    pub fn new(lua: &Lua) -> mlua::Result<Context> {
        let collected = Rc::new(RefCell::new(Collected::default()));
        let table = lua.create_table()?;
        let c = collected.clone();
        let emit = lua.create_function(move |_, (bucket, event): (String, Value)| {
            let event = match event {
                Value::String(s) => s.as_bytes().to_vec(),
                other => {
                    let mut out = Vec::new();
                    write_json(&other, &mut out).map_err(|e| {
                        mlua::Error::runtime(format!("ctx.emit: the event {e}"))
                    })?;
                    out
                }
            };
            let mut c = c.borrow_mut();
            if c.emits.len() >= MAX_EMITS || c.bytes + event.len() + bucket.len() > MAX_EMIT_BYTES {
                return Err(mlua::Error::runtime(format!(
                    "ctx.emit: one flush may emit at most {MAX_EMITS} events and {MAX_EMIT_BYTES} bytes"
                )));
            }
            c.bytes += event.len() + bucket.len();
            c.emits.push(Emit { bucket, event });
            Ok(())
        })?;
        let c = collected.clone();
        let log = lua.create_function(move |_, parts: Variadic<Value>| {
            let mut c = c.borrow_mut();
            c.log_lines += 1;
            if c.log_lines > MAX_LOG_LINES {
                return Ok(());
            }
            let mut line = String::new();
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    line.push(' ');
                }
                match part {
                    Value::String(s) => line.push_str(&s.to_string_lossy()),
                    other => {
                        let mut out = Vec::new();
                        match write_json(other, &mut out) {
                            Ok(()) => line.push_str(&String::from_utf8_lossy(&out)),
                            Err(_) => line.push_str(other.type_name()),
                        }
                    }
                }
            }
            if line.len() > MAX_LOG_LINE {
                let mut end = MAX_LOG_LINE;
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
                line.push('…');
            }
            tracing::info!(target: "bucketly::handler", bucket = %c.bucket, "{line}");
            Ok(())
        })?;
        table.raw_set("emit", emit)?;
        table.raw_set("log", log)?;
        Ok(Context { table, collected })
    }

    /// Refills the table for a flush and forgets what the last one collected.
    ///
    /// # Errors
    /// Only on Lua allocation failure.
    pub fn prepare(&self, info: &FlushInfo<'_>) -> mlua::Result<&Table> {
        {
            let mut c = self.collected.borrow_mut();
            c.emits.clear();
            c.bytes = 0;
            c.log_lines = 0;
            if c.bucket != info.bucket {
                c.bucket = info.bucket.to_owned();
            }
        }
        self.table.raw_set("bucket", info.bucket)?;
        self.table.raw_set("seq", info.seq)?;
        self.table.raw_set("events", info.events)?;
        self.table.raw_set("time", info.time_ms as f64 / 1000.0)?;
        Ok(&self.table)
    }

    /// The emits of the last call, and how many log lines it could not write.
    pub fn take(&self) -> (Vec<Emit>, usize) {
        let mut c = self.collected.borrow_mut();
        let suppressed = c.log_lines.saturating_sub(MAX_LOG_LINES);
        c.bytes = 0;
        (std::mem::take(&mut c.emits), suppressed)
    }
}
