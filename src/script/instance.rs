//! One handler running for one bucket, in its own sandboxed Lua state.

use mlua::{Function, Lua, MultiValue, Table, Value};

use super::context::{Context, Emit, FlushInfo};
use super::json::{to_lua, write_json};
use super::sandbox::new_state;
use super::watchdog;
use super::{lua_error_message, HandlerSource, ScriptError, ScriptLimits};

/// A handler module loaded into a fresh state: its functions and its state table.
///
/// Every call into Lua runs under the time budget. A call stopped by it leaves the state
/// half-updated, so the instance is then *failed*: every later call answers with the
/// failure, and the bucket must be dropped and created again.
pub(crate) struct LuaInstance {
    lua: Lua,
    main: *mut mlua::ffi::lua_State,
    budget: std::time::Duration,
    failed: Option<String>,
    state: Value,
    send: Function,
    view: Function,
    dump: Function,
    flush: Option<Function>,
    /// Built at the first flush of a handler that has `flush`.
    ctx: Option<Context>,
}

/// What a flush produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// The output as JSON; `None` when the handler's `flush` returned `nil`.
    pub output: Option<Vec<u8>>,
    /// Events emitted with `ctx.emit`, in order.
    pub emits: Vec<Emit>,
}

struct Module {
    lua: Lua,
    main: *mut mlua::ffi::lua_State,
    table: Table,
}

/// Loads `handler` into a fresh sandbox and checks that it returns a table with `send`,
/// `view` and `dump` functions.
pub(crate) fn compile(handler: &HandlerSource) -> Result<(), ScriptError> {
    load_module(handler, &ScriptLimits::default()).map(|_| ())
}

fn load_module(handler: &HandlerSource, limits: &ScriptLimits) -> Result<Module, ScriptError> {
    let load_err = |message: String| ScriptError::Load {
        name: handler.name.clone(),
        message,
    };
    let lua = new_state(limits).map_err(|e| load_err(lua_error_message(&e)))?;
    let main = watchdog::main_state(&lua).map_err(|e| load_err(lua_error_message(&e)))?;
    let value = watchdog::within(main, limits.time, || {
        lua.load(handler.source.as_str())
            .set_name(format!("={}.lua", handler.name))
            .set_mode(mlua::chunk::ChunkMode::Text)
            .eval::<Value>()
    })
    .ok_or_else(|| load_err(budget_message("loading the module", limits.time)))?
    .map_err(|e| load_err(lua_error_message(&e)))?;
    let Value::Table(table) = value else {
        return Err(load_err(format!(
            "the file must return a table of functions, not a {}",
            value.type_name()
        )));
    };
    for required in ["send", "view", "dump"] {
        if !matches!(table.raw_get::<Value>(required), Ok(Value::Function(_))) {
            return Err(load_err(format!("missing function {required}(state, ...)")));
        }
    }
    for optional in ["init", "flush"] {
        match table.raw_get::<Value>(optional) {
            Ok(Value::Nil) | Ok(Value::Function(_)) => {}
            _ => return Err(load_err(format!("{optional} must be a function"))),
        }
    }
    Ok(Module { lua, main, table })
}

fn budget_message(what: &str, budget: std::time::Duration) -> String {
    format!(
        "{what} exceeded the time budget of {} ms",
        budget.as_millis()
    )
}

fn runtime(what: &str, e: &mlua::Error) -> ScriptError {
    ScriptError::Runtime(format!("{what}: {}", lua_error_message(e)))
}

impl LuaInstance {
    /// Loads `handler` and calls its `init(config)`; the state is what `init` returns,
    /// or an empty table when there is no `init` or it returns nil.
    ///
    /// # Errors
    /// [`ScriptError::Load`] if the module does not load or has the wrong shape,
    /// [`ScriptError::Runtime`] if `init` fails (for example on a bad config).
    pub fn new(
        handler: &HandlerSource,
        config: &serde_json::Value,
        limits: &ScriptLimits,
    ) -> Result<Self, ScriptError> {
        let Module { lua, main, table } = load_module(handler, limits)?;
        let get = |name: &str| {
            table
                .raw_get::<Function>(name)
                .map_err(|e| runtime(name, &e))
        };
        let (send, view, dump) = (get("send")?, get("view")?, get("dump")?);
        let flush = table.raw_get::<Option<Function>>("flush").ok().flatten();
        let config = to_lua(&lua, config).map_err(|e| runtime("config", &e))?;
        let state = match table.raw_get::<Option<Function>>("init").ok().flatten() {
            Some(init) => watchdog::within(main, limits.time, || init.call::<Value>(config))
                .ok_or_else(|| ScriptError::Runtime(budget_message("init", limits.time)))?
                .map_err(|e| runtime("init", &e))?,
            None => Value::Nil,
        };
        let state = match state {
            Value::Nil => Value::Table(lua.create_table().map_err(|e| runtime("init", &e))?),
            other => other,
        };
        Ok(LuaInstance {
            lua,
            main,
            budget: limits.time,
            failed: None,
            state,
            send,
            view,
            dump,
            flush,
            ctx: None,
        })
    }

    /// Applies one event.
    ///
    /// # Errors
    /// The rejection reason, when `send` returned `false[, reason]` or `nil, reason`, or
    /// raised an error (the reason is then the error text).
    pub fn send(&mut self, event: &[u8]) -> Result<(), String> {
        let event = self
            .lua
            .create_string(event)
            .map_err(|e| lua_error_message(&e))?;
        let ret = self
            .guarded("send", |h| h.send.call::<MultiValue>((&h.state, event)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("handler error: {}", lua_error_message(&e)))?;
        let mut ret = ret.into_iter();
        let (first, second) = (ret.next(), ret.next());
        let reason = match (first, second) {
            (Some(Value::Boolean(false)), reason) => reason,
            (Some(Value::Nil), Some(reason @ Value::String(_))) => Some(reason),
            _ => return Ok(()),
        };
        Err(match reason {
            Some(Value::String(s)) => s.to_string_lossy(),
            _ => "rejected by handler".to_owned(),
        })
    }

    /// Calls `view(state, arg)` and returns the result as JSON.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] if `view` raises an error or returns a value with no
    /// JSON form.
    pub fn view(&mut self, arg: Option<&[u8]>) -> Result<Vec<u8>, ScriptError> {
        let arg = match arg {
            Some(a) => Value::String(self.lua.create_string(a).map_err(|e| runtime("view", &e))?),
            None => Value::Nil,
        };
        let v = self
            .guarded("view", |h| h.view.call::<Value>((&h.state, arg)))?
            .map_err(|e| runtime("view", &e))?;
        to_json("view", &v)
    }

    /// Calls `dump(state)`: the aggregate as JSON, after which the handler has reset it.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] as for [`view`](Self::view).
    pub fn dump(&mut self) -> Result<Vec<u8>, ScriptError> {
        let v = self
            .guarded("dump", |h| h.dump.call::<Value>(&h.state))?
            .map_err(|e| runtime("dump", &e))?;
        to_json("dump", &v)
    }

    /// A scheduled flush: `flush(state, ctx)` if the handler has one, else `dump(state)`.
    /// A `nil` result means there is nothing to output.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] as for [`view`](Self::view); emits of a failed call are
    /// discarded.
    pub fn flush(&mut self, info: &FlushInfo<'_>) -> Result<Flushed, ScriptError> {
        let Some(flush) = self.flush.clone() else {
            let output = self.dump()?;
            return Ok(Flushed {
                output: (output != b"null").then_some(output),
                emits: Vec::new(),
            });
        };
        if self.ctx.is_none() {
            self.ctx = Some(Context::new(&self.lua).map_err(|e| runtime("flush", &e))?);
        }
        let ctx = match &self.ctx {
            Some(ctx) => ctx.prepare(info).map_err(|e| runtime("flush", &e))?.clone(),
            None => return Err(ScriptError::Runtime("flush: no context".into())),
        };
        let v = self.guarded("flush", |h| flush.call::<Value>((&h.state, ctx)));
        let (emits, suppressed) = self.ctx.as_ref().map(Context::take).unwrap_or_default();
        if suppressed > 0 {
            tracing::info!(
                bucket = info.bucket,
                "ctx.log: {suppressed} more lines not written"
            );
        }
        let v = v?.map_err(|e| runtime("flush", &e))?;
        if v.is_nil() {
            return Ok(Flushed::default());
        }
        Ok(Flushed {
            output: Some(to_json("flush", &v)?),
            emits,
        })
    }

    /// Runs `call` under the time budget. The outer error means the instance is failed
    /// (now or before); the inner result is the call's own.
    fn guarded<R>(
        &mut self,
        what: &str,
        call: impl FnOnce(&Self) -> mlua::Result<R>,
    ) -> Result<mlua::Result<R>, ScriptError> {
        if let Some(why) = &self.failed {
            return Err(ScriptError::Failed(why.clone()));
        }
        match watchdog::within(self.main, self.budget, || call(self)) {
            Some(result) => Ok(result),
            None => {
                let why = budget_message(what, self.budget);
                self.failed = Some(why.clone());
                Err(ScriptError::Failed(why))
            }
        }
    }

    /// Why the instance is failed, if it is.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The state as bytes, for a durable bucket's snapshot.
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] naming what the state holds that cannot be kept (a
    /// function, a shared table, ...); [`ScriptError::Failed`] for a failed instance.
    pub fn snapshot(&self) -> Result<Vec<u8>, ScriptError> {
        if let Some(why) = &self.failed {
            return Err(ScriptError::Failed(why.clone()));
        }
        let mut out = Vec::new();
        super::snapshot::encode(&self.state, &mut out).map_err(ScriptError::Runtime)?;
        Ok(out)
    }

    /// Replaces the state with one made by [`LuaInstance::snapshot`].
    ///
    /// # Errors
    /// [`ScriptError::Runtime`] if the bytes are not a snapshot or do not fit in memory.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), ScriptError> {
        self.state = super::snapshot::decode(&self.lua, snapshot)
            .map_err(|e| ScriptError::Runtime(format!("cannot restore the snapshot: {e}")))?;
        Ok(())
    }

    /// Whether the handler defines `flush(state, ctx)` (called by scheduled processing).
    pub fn has_flush(&self) -> bool {
        self.flush.is_some()
    }

    /// Bytes used by this instance's Lua state.
    pub fn memory_used(&self) -> usize {
        self.lua.used_memory()
    }
}

fn to_json(what: &str, v: &Value) -> Result<Vec<u8>, ScriptError> {
    let mut out = Vec::with_capacity(64);
    write_json(v, &mut out).map_err(|e| ScriptError::Runtime(format!("{what} returned {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::LuaInstance as HandlerInstance;
    use super::*;
    use crate::script::Origin;

    fn handler(source: &str) -> HandlerSource {
        HandlerSource {
            name: "t".into(),
            source: source.into(),
            origin: Origin::Stock,
        }
    }

    const ECHO: &str = r#"
        local H = {}
        function H.init(c) return {n = 0, c = c} end
        function H.send(s, e)
            if e == "bad" then return false, "bad event" end
            if e == "boom" then error("kaboom") end
            s.n = s.n + 1
        end
        function H.view(s, arg) if arg == "err" then error("view failed") end return s.n end
        function H.dump(s) local n = s.n s.n = 0 return n end
        return H"#;

    #[test]
    fn rejections_and_errors_leave_the_state_intact() {
        let mut h = HandlerInstance::new(
            &handler(ECHO),
            &serde_json::Value::Null,
            &ScriptLimits::default(),
        )
        .expect("loads");
        assert_eq!(h.send(b"a"), Ok(()));
        assert_eq!(h.send(b"bad"), Err("bad event".into()));
        let boom = h.send(b"boom").expect_err("raises");
        assert!(boom.contains("kaboom"), "{boom}");
        assert!(h.view(Some(b"err")).is_err());
        assert_eq!(h.view(None), Ok(b"1".to_vec()));
        assert_eq!(h.dump(), Ok(b"1".to_vec()));
        assert_eq!(h.view(None), Ok(b"0".to_vec()));
    }

    #[test]
    fn bytecode_is_refused() {
        let err = HandlerInstance::new(
            &handler("\x1bLua"),
            &serde_json::Value::Null,
            &ScriptLimits::default(),
        )
        .err()
        .expect("binary chunk");
        assert!(matches!(err, ScriptError::Load { .. }), "{err}");
    }

    #[test]
    fn flush_gets_ctx_and_collects_emits() {
        let src = r#"
            local H = {}
            function H.send(s, e) s[#s + 1] = e end
            function H.view(s) return #s end
            function H.dump(s) local n = #s for i = #s, 1, -1 do s[i] = nil end return n end
            function H.flush(s, ctx)
              if #s == 0 then return nil end
              for _, e in ipairs(s) do ctx.emit("out", e) end
              ctx.emit("out", {n = #s})
              ctx.log("flushing", #s, "events")
              local out = {bucket = ctx.bucket, seq = ctx.seq, events = ctx.events, n = #s}
              for i = #s, 1, -1 do s[i] = nil end
              return out
            end
            return H"#;
        let mut h = HandlerInstance::new(
            &handler(src),
            &serde_json::Value::Null,
            &ScriptLimits::default(),
        )
        .expect("loads");
        h.send(b"a").expect("a");
        h.send(b"b").expect("b");
        let info = FlushInfo {
            bucket: "b1",
            seq: 4,
            events: 2,
            time_ms: 1_000,
        };
        let f = h.flush(&info).expect("flush");
        assert_eq!(
            f.output.as_deref(),
            Some(&br#"{"bucket":"b1","events":2,"n":2,"seq":4}"#[..])
        );
        let emitted: Vec<_> = f
            .emits
            .iter()
            .map(|e| (e.bucket.as_str(), &e.event[..]))
            .collect();
        assert_eq!(
            emitted,
            [("out", &b"a"[..]), ("out", b"b"), ("out", br#"{"n":2}"#)]
        );
        // nil: nothing to output, and the emits of the last call are not repeated.
        assert_eq!(h.flush(&info), Ok(Flushed::default()));
    }

    #[test]
    fn flush_without_a_flush_function_dumps() {
        let mut h = HandlerInstance::new(
            &handler(ECHO),
            &serde_json::Value::Null,
            &ScriptLimits::default(),
        )
        .expect("loads");
        h.send(b"a").expect("a");
        let info = FlushInfo {
            bucket: "b",
            seq: 1,
            events: 1,
            time_ms: 0,
        };
        assert_eq!(h.flush(&info).expect("flush").output, Some(b"1".to_vec()));
        assert_eq!(h.view(None), Ok(b"0".to_vec()), "dump reset the state");
    }

    #[test]
    fn emits_are_bounded_per_flush() {
        let src = r#"
            local f = function() end
            return {send = f, view = f, dump = f, flush = function(s, ctx)
              for i = 1, 20000 do ctx.emit("t", "x") end
              return 1
            end}"#;
        let mut h = HandlerInstance::new(
            &handler(src),
            &serde_json::Value::Null,
            &ScriptLimits::default(),
        )
        .expect("loads");
        let info = FlushInfo {
            bucket: "b",
            seq: 1,
            events: 0,
            time_ms: 0,
        };
        let err = h.flush(&info).expect_err("too many emits");
        assert!(err.to_string().contains("at most 10000 events"), "{err}");
    }

    #[test]
    fn init_failure_is_reported() {
        let src = "local f = function() end return {init = function() error('bad config') end, send = f, view = f, dump = f}";
        let err = HandlerInstance::new(
            &handler(src),
            &serde_json::Value::Null,
            &ScriptLimits::default(),
        )
        .err()
        .expect("init fails");
        assert!(err.to_string().contains("bad config"), "{err}");
    }
}
