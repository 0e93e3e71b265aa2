//! The per-call time budget.
//!
//! A count hook checks the deadline every [`CHECK_EVERY`] VM instructions. Once the
//! deadline passes the watchdog stays *fired* until the call returns to Rust: every hook
//! tick raises again, and `pcall`, `xpcall` and `coroutine.resume` re-raise after they
//! return, so no amount of catching or nesting keeps a handler running. Coroutines
//! inherit the hook from the thread that creates them (Lua 5.4 copies it).
//!
//! The hook is a raw C hook rather than mlua's `set_hook`: mlua's hook error path resets
//! the stack top inside the hook, which runs the frame's `<close>` handlers with hooks
//! disabled, an escape. Raising a plain string error keeps Lua's own unwinding, which
//! runs `__close` with hooks back on.
//!
//! The state is thread-local: a handler thread runs one Lua call at a time, whichever
//! bucket's state it belongs to.
//!
//! Not covered: a single C library call (a pathological `string.find` pattern, say) runs
//! without hook ticks until it returns.

use std::cell::Cell;
use std::ffi::CStr;
use std::time::{Duration, Instant};

use mlua::{ffi, Function, Lua, Table};

/// Instructions between deadline checks.
const CHECK_EVERY: i32 = 1000;

/// The error text of a stopped call.
pub(crate) const KILLED: &str = "time budget exceeded";
const KILLED_C: &CStr = c"time budget exceeded";

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static FIRED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `call` under `budget` on this thread; `None` if the budget stopped it.
pub(crate) fn within<R>(budget: Duration, call: impl FnOnce() -> R) -> Option<R> {
    FIRED.set(false);
    let outer = DEADLINE.replace(Some(Instant::now() + budget));
    let result = call();
    DEADLINE.set(outer);
    (!FIRED.replace(false)).then_some(result)
}

fn fired() -> bool {
    FIRED.get()
}

/// Whether the current call must stop now; latches.
fn expired() -> bool {
    if FIRED.get() {
        return true;
    }
    let late = DEADLINE.get().is_some_and(|d| Instant::now() >= d);
    if late {
        FIRED.set(true);
    }
    late
}

unsafe extern "C-unwind" fn budget_hook(state: *mut ffi::lua_State, _ar: *mut ffi::lua_Debug) {
    // No value with a destructor may be live here: lua_error does not return.
    if expired() {
        unsafe {
            ffi::lua_pushstring(state, KILLED_C.as_ptr());
            ffi::lua_error(state);
        }
    }
}

/// Installs the hook on `lua`'s main thread and replaces the functions that could catch
/// a kill with guarded ones.
///
/// # Errors
/// Only on Lua allocation failure.
pub(crate) fn install(lua: &Lua) -> mlua::Result<()> {
    // SAFETY: exec_raw hands us the main thread of a state we own; lua_sethook only
    // stores the hook and does not touch the stack.
    unsafe {
        lua.exec_raw::<()>((), |state| {
            ffi::lua_sethook(state, Some(budget_hook), ffi::LUA_MASKCOUNT, CHECK_EVERY);
        })?;
    }
    let globals = lua.globals();
    let coroutine: Table = globals.raw_get("coroutine")?;
    let fired = lua.create_function(|_, ()| Ok(fired()))?;
    let guard: Function = lua
        .load(GUARDS)
        .set_name("=bucketly watchdog")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .eval()?;
    guard.call::<()>((
        fired,
        globals.raw_get::<Function>("pcall")?,
        globals.raw_get::<Function>("xpcall")?,
        coroutine.raw_get::<Function>("resume")?,
        KILLED,
    ))
}

/// Replaces pcall, xpcall, coroutine.resume and setmetatable with versions that cannot
/// hide a kill. (`coroutine.wrap` re-raises by itself.)
const GUARDS: &str = r#"
return function(fired, raw_pcall, raw_xpcall, raw_resume, killed)
  local error, type, rawget, raw_setmetatable = error, type, rawget, setmetatable
  local function check(...)
    if fired() then error(killed, 0) end
    return ...
  end
  _G.pcall = function(...) return check(raw_pcall(...)) end
  -- Lua runs a message handler with hooks off when the error came from a hook, so
  -- the user's handler must not run at all once the watchdog has fired.
  _G.xpcall = function(f, handler, ...)
    if type(handler) ~= "function" then return raw_xpcall(f, handler, ...) end
    local function guarded(...)
      if fired() then return killed end
      return handler(...)
    end
    return check(raw_xpcall(f, guarded, ...))
  end
  coroutine.resume = function(...) return check(raw_resume(...)) end
  -- Finalizers run with hooks off, so a __gc loop would never be stopped: refuse them.
  -- (Lua marks an object for finalization only if its metatable has __gc when set.)
  _G.setmetatable = function(t, mt)
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
      error("__gc metamethods are not allowed in handlers", 2)
    end
    return raw_setmetatable(t, mt)
  end
end
"#;

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use crate::script::{HandlerInstance, HandlerSource, Origin, ScriptError, ScriptLimits};

    /// A handler whose `send` runs `body`.
    fn handler(body: &str) -> HandlerSource {
        let source = format!(
            "local H = {{}}
             function H.send(s, e) {body} end
             function H.view(s) return s.n or 0 end
             function H.dump(s) return 0 end
             return H"
        );
        HandlerSource {
            name: "escape".into(),
            source,
            origin: Origin::Stock,
        }
    }

    /// Sends one event to a fresh instance on its own thread; the 10 s guard turns a
    /// regression into a failure instead of a hung suite.
    fn send_once(body: &str) -> (Result<(), String>, Option<String>) {
        let h = handler(body);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let limits = ScriptLimits {
                memory: 16 << 20,
                time: Duration::from_millis(50),
            };
            let mut inst =
                HandlerInstance::new(&h, &serde_json::Value::Null, &limits).expect("loads");
            let r = inst.send(b"x");
            let _ = tx.send((r, inst.failure().map(str::to_owned)));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the call was stopped")
    }

    #[test]
    fn every_cpu_escape_is_stopped_and_fails_the_bucket() {
        for body in [
            "while true do end",
            "while true do pcall(function() while true do end end) end",
            "while true do pcall(pcall, function() while true do end end) end",
            "while true do xpcall(function() while true do end end, function() while true do end end) end",
            "local co = coroutine.create(function() while true do end end) while true do coroutine.resume(co) end",
            "while true do pcall(coroutine.wrap(function() while true do end end)) end",
            "local function f() return pcall(f) end while true do f() end",
            "local t = {} for i = 1, 1e9 do t[#t % 100 + 1] = i end",
            "local s = string.rep('a', 1000) while true do s:find('b') end",
            "local t <close> = setmetatable({}, {__close = function() while true do end end}) while true do end",
        ] {
            let (result, failure) = send_once(body);
            let reason = result.expect_err(body);
            assert!(reason.contains("time budget"), "{body}: {reason}");
            assert!(failure.is_some_and(|f| f.contains("send exceeded")), "{body}");
        }
    }

    #[test]
    fn memory_bombs_are_rejected_without_failing_the_bucket() {
        for body in [
            "local t = {} while true do t[#t + 1] = {} end",
            "local s = string.rep('x', 1e9)",
            "local s = 'x' while true do s = s .. s end",
        ] {
            let (result, failure) = send_once(body);
            let reason = result.expect_err(body);
            assert!(reason.contains("memory"), "{body}: {reason}");
            assert_eq!(failure, None, "{body}");
        }
    }

    #[test]
    fn finalizers_are_refused_because_they_run_without_hooks() {
        let (result, failure) = send_once(
            "setmetatable({}, {__gc = function() while true do end end}) for i = 1, 1e6 do local t = {} end",
        );
        let reason = result.expect_err("refused");
        assert!(
            reason.contains("__gc metamethods are not allowed"),
            "{reason}"
        );
        assert_eq!(failure, None);
    }

    #[test]
    fn a_failed_instance_refuses_every_call() {
        let h = handler("if e == 'spin' then while true do end end s.n = (s.n or 0) + 1");
        let limits = ScriptLimits {
            memory: 16 << 20,
            time: Duration::from_millis(20),
        };
        let mut inst = HandlerInstance::new(&h, &serde_json::Value::Null, &limits).expect("loads");
        inst.send(b"ok").expect("normal event");
        assert_eq!(inst.view(None), Ok(b"1".to_vec()));
        assert!(inst.send(b"spin").is_err());
        assert!(matches!(inst.view(None), Err(ScriptError::Failed(_))));
        assert!(inst
            .send(b"ok")
            .expect_err("failed")
            .contains("drop and create it again"));
    }

    #[test]
    fn load_and_init_are_budgeted_too() {
        let limits = ScriptLimits {
            memory: 16 << 20,
            time: Duration::from_millis(20),
        };
        let top = HandlerSource {
            name: "top".into(),
            source: "while true do end".into(),
            origin: Origin::Stock,
        };
        let err = HandlerInstance::new(&top, &serde_json::Value::Null, &limits)
            .err()
            .expect("stopped");
        assert!(err.to_string().contains("time budget"), "{err}");
        let init = HandlerSource {
            name: "init".into(),
            source: "local f = function() end return {init = function() while true do end end, send = f, view = f, dump = f}".into(),
            origin: Origin::Stock,
        };
        let err = HandlerInstance::new(&init, &serde_json::Value::Null, &limits)
            .err()
            .expect("stopped");
        assert!(err.to_string().contains("init exceeded"), "{err}");
    }
}
