//! The per-call time budget, at no cost to calls that stay within it.
//!
//! A Lua count hook would stop a runaway call, but Lua then traps every VM instruction,
//! which costs about a quarter of the send throughput. So no hook is installed while a
//! call is within its budget. Instead:
//!
//! ```text
//!  handler thread: within(budget, call)      watchdog thread (one per process)
//!    slot.deadline = now + budget  ───────▶   every TICK: deadline passed?
//!    run the Lua call                            └─ pthread_kill(thread, SIGURG)
//!    slot.deadline = 0               signal handler (on the handler thread):
//!                                      FIRED = true; lua_sethook(every running state)
//! ```
//!
//! The hook then raises at the next instruction, and stays fired until the call
//! returns to Rust: `pcall`, `xpcall`, `coroutine.resume`, `coroutine.wrap` and
//! `coroutine.close` re-raise after they return, so no amount of catching or nesting
//! keeps a handler running. "Every running state" is the main state plus the stack of
//! coroutines being resumed, which the resume wrapper records; coroutines created after
//! the hook is set inherit it (Lua 5.4 copies hooks to new threads). Lua documents
//! `lua_sethook` as safe to call from a signal handler; `lua.c` stops scripts on SIGINT
//! the same way.
//!
//! The hook is a raw C hook rather than mlua's `set_hook`: mlua's hook error path resets
//! the stack top inside the hook, which runs the frame's `<close>` handlers with hooks
//! disabled, an escape.
//!
//! Not covered: a single C library call (a pathological `string.find` pattern, say) runs
//! without hook ticks until it returns.

use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mlua::{ffi, Function, Lua, Table};
use parking_lot::Mutex;

/// How often the watchdog thread looks at the deadlines; a stop comes at most this
/// late.
const TICK: Duration = Duration::from_millis(5);
/// The signal that makes a handler thread install the stopping hook.
const SIGNAL: libc::c_int = libc::SIGURG;
/// Coroutines that can be resumed inside each other (Lua's C-stack limit is 200).
const MAX_DEPTH: usize = 256;

/// The error text of a stopped call.
pub(crate) const KILLED: &str = "time budget exceeded";
const KILLED_C: &CStr = c"time budget exceeded";

/// A handler thread as the watchdog sees it.
struct Slot {
    thread: libc::pthread_t,
    /// Milliseconds since the watchdog's start at which the running call must stop;
    /// 0 when idle.
    deadline: AtomicU64,
    /// Counts calls, so a signal meant for one call never stops the next one.
    call: AtomicU64,
    /// The call the watchdog signalled for.
    target: AtomicU64,
}

struct Watchdog {
    slots: Mutex<Vec<Arc<Slot>>>,
    start: Instant,
}

impl Watchdog {
    /// Milliseconds since the watchdog started, rounded up: a deadline computed from it
    /// is never early.
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }
}

static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();

fn watchdog() -> &'static Watchdog {
    WATCHDOG.get_or_init(|| {
        install_signal_handler();
        let start = Instant::now();
        if let Err(e) = std::thread::Builder::new()
            .name("bucketly-watchdog".into())
            .spawn(watch)
        {
            tracing::error!("cannot start the handler watchdog, time budgets will not hold: {e}");
        }
        Watchdog {
            slots: Mutex::new(Vec::new()),
            start,
        }
    })
}

fn watch() {
    loop {
        std::thread::sleep(TICK);
        let w = watchdog();
        let now = w.start.elapsed().as_millis() as u64;
        // Under the lock: a thread deregisters (and exits) only after we are done with
        // its pthread_t.
        for slot in w.slots.lock().iter() {
            let deadline = slot.deadline.load(Ordering::Acquire);
            let call = slot.call.load(Ordering::Acquire);
            if deadline != 0 && now >= deadline && slot.target.swap(call, Ordering::AcqRel) != call
            {
                // SAFETY: the thread is registered, hence alive (see above).
                unsafe {
                    libc::pthread_kill(slot.thread, SIGNAL);
                }
            }
        }
    }
}

/// This thread's registration; deregisters at thread exit.
struct Registration(Arc<Slot>);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = SLOT.try_with(|s| s.store(ptr::null_mut(), Ordering::SeqCst));
        let mut slots = watchdog().slots.lock();
        slots.retain(|s| !Arc::ptr_eq(s, &self.0));
    }
}

thread_local! {
    static REGISTRATION: std::cell::OnceCell<Registration> = const { std::cell::OnceCell::new() };
    // What the signal handler reads: constant-initialised, without destructors, so
    // reading them there is async-signal-safe.
    static SLOT: AtomicPtr<Slot> = const { AtomicPtr::new(ptr::null_mut()) };
    static FIRED: AtomicBool = const { AtomicBool::new(false) };
    static MAIN: AtomicPtr<ffi::lua_State> = const { AtomicPtr::new(ptr::null_mut()) };
    static DEPTH: AtomicUsize = const { AtomicUsize::new(0) };
    static RESUMED: [AtomicPtr<ffi::lua_State>; MAX_DEPTH] =
        const { [const { AtomicPtr::new(ptr::null_mut()) }; MAX_DEPTH] };
}

fn this_slot() -> Option<Arc<Slot>> {
    REGISTRATION
        .try_with(|r| {
            r.get_or_init(|| {
                let slot = Arc::new(Slot {
                    // SAFETY: pthread_self has no preconditions.
                    thread: unsafe { libc::pthread_self() },
                    deadline: AtomicU64::new(0),
                    call: AtomicU64::new(0),
                    target: AtomicU64::new(0),
                });
                watchdog().slots.lock().push(slot.clone());
                SLOT.with(|s| s.store(Arc::as_ptr(&slot).cast_mut(), Ordering::SeqCst));
                Registration(slot)
            })
            .0
            .clone()
        })
        .ok()
}

/// Runs `call` on `main` (the state's main thread) under `budget`; `None` if the
/// budget stopped it. Calls do not nest.
pub(crate) fn within<R>(
    main: *mut ffi::lua_State,
    budget: Duration,
    call: impl FnOnce() -> R,
) -> Option<R> {
    let slot = this_slot();
    FIRED.with(|f| f.store(false, Ordering::SeqCst));
    DEPTH.with(|d| d.store(0, Ordering::SeqCst));
    MAIN.with(|m| m.store(main, Ordering::SeqCst));
    if let Some(slot) = &slot {
        let w = watchdog();
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX / 2);
        slot.call.fetch_add(1, Ordering::AcqRel);
        let deadline = w.now_ms().saturating_add(ms.max(1));
        slot.deadline.store(deadline, Ordering::Release);
    }
    let result = call();
    if let Some(slot) = &slot {
        slot.deadline.store(0, Ordering::Release);
    }
    MAIN.with(|m| m.store(ptr::null_mut(), Ordering::SeqCst));
    let fired = FIRED.with(|f| f.swap(false, Ordering::SeqCst));
    if fired {
        // SAFETY: `main` is the live main thread of the state the call ran on.
        unsafe { ffi::lua_sethook(main, None, 0, 0) };
    }
    (!fired).then_some(result)
}

fn fired() -> bool {
    FIRED.with(|f| f.load(Ordering::SeqCst))
}

extern "C" fn on_signal(_: libc::c_int) {
    let slot = SLOT.with(|s| s.load(Ordering::SeqCst));
    if slot.is_null() {
        return;
    }
    // SAFETY: SLOT points at this thread's registered slot, alive until deregistered,
    // which clears SLOT first.
    let slot = unsafe { &*slot };
    let call = slot.call.load(Ordering::SeqCst);
    if slot.deadline.load(Ordering::SeqCst) == 0 || slot.target.load(Ordering::SeqCst) != call {
        return; // that call has ended
    }
    FIRED.with(|f| f.store(true, Ordering::SeqCst));
    let hook = |l: *mut ffi::lua_State| {
        if !l.is_null() {
            // SAFETY: the main state and the coroutines being resumed are alive while
            // the call runs; lua_sethook may be called from a signal handler.
            unsafe { ffi::lua_sethook(l, Some(budget_hook), ffi::LUA_MASKCOUNT, 1) };
        }
    };
    hook(MAIN.with(|m| m.load(Ordering::SeqCst)));
    let depth = DEPTH.with(|d| d.load(Ordering::SeqCst)).min(MAX_DEPTH);
    RESUMED.with(|r| {
        for l in &r[..depth] {
            hook(l.load(Ordering::SeqCst));
        }
    });
}

fn install_signal_handler() {
    // SAFETY: a zeroed sigaction with a handler and an empty mask is valid; the
    // handler only touches constant thread-locals and calls lua_sethook.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(SIGNAL, &action, ptr::null_mut()) != 0 {
            tracing::error!(
                "cannot install the watchdog's signal handler, time budgets will not hold"
            );
        }
    }
}

unsafe extern "C-unwind" fn budget_hook(state: *mut ffi::lua_State, _ar: *mut ffi::lua_Debug) {
    // No value with a destructor may be live here: lua_error does not return.
    if fired() {
        unsafe {
            ffi::lua_pushstring(state, KILLED_C.as_ptr());
            ffi::lua_error(state);
        }
    }
}

/// The main thread of `lua`.
pub(crate) fn main_state(lua: &Lua) -> mlua::Result<*mut ffi::lua_State> {
    let mut main = ptr::null_mut();
    // SAFETY: exec_raw hands us the main thread of a state we own; we only read the
    // pointer.
    unsafe {
        lua.exec_raw::<()>((), |state| main = state)?;
    }
    Ok(main)
}

/// Replaces the functions that could catch a kill or run code on an untracked
/// coroutine with guarded ones.
///
/// # Errors
/// Only on Lua allocation failure.
pub(crate) fn install(lua: &Lua) -> mlua::Result<()> {
    let globals = lua.globals();
    let coroutine: Table = globals.raw_get("coroutine")?;
    let fired = lua.create_function(|_, ()| Ok(fired()))?;
    let track = lua.create_function(|_, co: mlua::Thread| {
        let depth = DEPTH.with(|d| d.load(Ordering::SeqCst));
        if depth >= MAX_DEPTH {
            return Err(mlua::Error::runtime("coroutines nested too deeply"));
        }
        RESUMED.with(|r| r[depth].store(co.state(), Ordering::SeqCst));
        DEPTH.with(|d| d.store(depth + 1, Ordering::SeqCst));
        Ok(())
    })?;
    let untrack = lua.create_function(|_, ()| {
        DEPTH.with(|d| {
            let depth = d.load(Ordering::SeqCst);
            d.store(depth.saturating_sub(1), Ordering::SeqCst);
        });
        Ok(())
    })?;
    let guard: Function = lua
        .load(GUARDS)
        .set_name("=bucketly watchdog")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .eval()?;
    guard.call::<()>((
        fired,
        track,
        untrack,
        globals.raw_get::<Function>("pcall")?,
        globals.raw_get::<Function>("xpcall")?,
        coroutine.raw_get::<Function>("resume")?,
        coroutine.raw_get::<Function>("close")?,
        KILLED,
    ))
}

/// Replaces pcall, xpcall, coroutine.resume, coroutine.wrap, coroutine.close and
/// setmetatable with versions that cannot hide a kill.
const GUARDS: &str = r#"
return function(fired, track, untrack, raw_pcall, raw_xpcall, raw_resume, raw_close, killed)
  local error, type, rawget, raw_setmetatable = error, type, rawget, setmetatable
  local pack, unpack = table.pack, table.unpack
  local function check(...)
    if fired() then error(killed, 0) end
    return ...
  end
  local function untracked(...)
    untrack()
    return check(...)
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
  -- Resumed coroutines are tracked so that the watchdog can stop them too.
  local function resume(co, ...)
    if type(co) ~= "thread" then return raw_resume(co, ...) end
    track(co)
    return untracked(raw_resume(co, ...))
  end
  coroutine.resume = resume
  coroutine.wrap = function(f)
    local co = coroutine.create(f)
    return function(...)
      local r = pack(resume(co, ...))
      if r[1] then return unpack(r, 2, r.n) end
      error(r[2], 0)
    end
  end
  -- Closing a suspended coroutine runs its pending <close> handlers on it.
  coroutine.close = function(co)
    if type(co) ~= "thread" then return raw_close(co) end
    track(co)
    return untracked(raw_close(co))
  end
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
        send_once_within(body, Duration::from_millis(50))
    }

    /// [`send_once`] under another time budget.
    fn send_once_within(body: &str, time: Duration) -> (Result<(), String>, Option<String>) {
        let h = handler(body);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let limits = ScriptLimits {
                memory: 16 << 20,
                time,
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
            "local co = coroutine.create(function() local t <close> = setmetatable({}, {__close = function() while true do end end}) coroutine.yield() end) coroutine.resume(co) coroutine.close(co)",
            "local function deep(n) if n == 0 then while true do end end local co = coroutine.create(function() deep(n - 1) end) coroutine.resume(co) end deep(50)",
            "coroutine.wrap(function() coroutine.wrap(function() while true do end end)() end)()",
            "local co = coroutine.wrap(function() while true do coroutine.yield() end end) while true do co() end",
            "local ok = coroutine.resume(coroutine.create(function() while true do end end)) while true do end",
            "string.gsub('xyz', '.', function() while true do end end)",
            "table.sort({3, 2, 1}, function(a, b) while true do end end)",
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
            // A budget far above what filling 16 MiB takes, even in a loaded debug build:
            // this is about the memory limit, not the clock.
            let (result, failure) = send_once_within(body, Duration::from_secs(5));
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
