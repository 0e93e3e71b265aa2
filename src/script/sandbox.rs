//! The sandboxed Lua state: only pure libraries, no way to reach files, processes,
//! other states or bytecode.

use mlua::{Lua, LuaOptions, StdLib, Table, Value};

use super::json::{to_lua, write_json};
use super::watchdog;
use super::ScriptLimits;

/// Metatable field that tells the JSON mapping how to encode a table.
pub(crate) const JSON_KIND_FIELD: &str = "__bucketly_json";

/// Globals removed from the base library: code loading, file access, GC control and
/// stdout. `string.dump` is removed too, so no bytecode can be produced or loaded.
const REMOVED_GLOBALS: [&str; 6] = [
    "load",
    "loadfile",
    "dofile",
    "require",
    "collectgarbage",
    "print",
];

/// A new state with `table`, `string`, `math`, `utf8` and `coroutine`, the pure parts
/// of the base library, the `bucketly` helper table, the memory limit and the
/// [`watchdog`] hook (armed per call by the caller with [`watchdog::within`]).
///
/// # Errors
/// Only if Lua cannot allocate the state.
pub(crate) fn new_state(limits: &ScriptLimits) -> mlua::Result<Lua> {
    let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
    let lua = Lua::new_with(libs, LuaOptions::new())?;
    let globals = lua.globals();
    for name in REMOVED_GLOBALS {
        globals.raw_set(name, Value::Nil)?;
    }
    let string: Table = globals.raw_get("string")?;
    string.raw_set("dump", Value::Nil)?;
    globals.raw_set("bucketly", helpers(&lua)?)?;
    globals.raw_set("json", json_table(&lua)?)?;
    watchdog::install(&lua)?;
    lua.set_memory_limit(limits.memory)?;
    Ok(lua)
}

/// `json.encode(v)` (the mapping of handlers/README.md) and `json.decode(s)` (arrays
/// come back marked as arrays, `null` as `nil`).
fn json_table(lua: &Lua) -> mlua::Result<Table> {
    let json = lua.create_table()?;
    let encode = lua.create_function(|lua, v: Value| {
        let mut out = Vec::new();
        write_json(&v, &mut out).map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))?;
        lua.create_string(&out)
    })?;
    let decode = lua.create_function(|lua, s: mlua::LuaString| {
        let v: serde_json::Value = serde_json::from_slice(&s.as_bytes())
            .map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))?;
        to_lua(lua, &v)
    })?;
    json.raw_set("encode", encode)?;
    json.raw_set("decode", decode)?;
    Ok(json)
}

/// Lua helpers (trim, split, quote, describe) shared by every handler; see the file.
const PRELUDE: &str = include_str!("prelude.lua");

/// The `bucketly` table: the prelude's helpers, plus `bucketly.array(t)` and
/// `bucketly.object(t)`, which mark a table's JSON shape (so an empty list can still be
/// `[]`) by setting a metatable, and return the table.
fn helpers(lua: &Lua) -> mlua::Result<Table> {
    let t: Table = lua
        .load(PRELUDE)
        .set_name("=bucketly prelude")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .eval()?;
    for kind in ["array", "object"] {
        let mt = lua.create_table()?;
        mt.raw_set(JSON_KIND_FIELD, kind)?;
        let f = lua.create_function(move |_, table: Table| {
            table.set_metatable(Some(mt.clone()))?;
            Ok(table)
        })?;
        t.raw_set(kind, f)?;
    }
    let time = lua.create_function(|_, ()| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Ok((now * 1000.0).floor() / 1000.0)
    })?;
    t.raw_set("time", time)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_globals_are_absent() {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        for expr in [
            "io",
            "os",
            "package",
            "require",
            "load",
            "loadfile",
            "dofile",
            "debug",
            "string.dump",
            "collectgarbage",
            "print",
        ] {
            let v: Value = lua.load(format!("return {expr}")).eval().expect("eval");
            assert!(v.is_nil(), "{expr} is reachable");
        }
    }

    fn eval_json(lua: &Lua, code: &str) -> String {
        let v: Value = lua
            .load(code)
            .eval()
            .unwrap_or_else(|e| panic!("{code}: {e}"));
        let mut out = Vec::new();
        write_json(&v, &mut out).expect("json");
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn helpers_json_time_and_splitall() {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        assert_eq!(
            eval_json(&lua, r#"return json.encode({b = {1, 2}, a = "x"})"#),
            r#""{\"a\":\"x\",\"b\":[1,2]}""#
        );
        assert_eq!(
            eval_json(&lua, r#"return json.decode('{"a":[],"b":null,"c":1.5}')"#),
            r#"{"a":[],"c":1.5}"#
        );
        let err = lua
            .load("return json.decode('{')")
            .eval::<Value>()
            .expect_err("bad");
        assert!(err.to_string().contains("json.decode"), "{err}");
        let t: f64 = lua.load("return bucketly.time()").eval().expect("time");
        assert!(t > 1.7e9, "{t}");
        assert_eq!(
            eval_json(&lua, r#"return bucketly.splitall("a,b,,c", ",")"#),
            r#"["a","b","","c"]"#
        );
        assert_eq!(
            eval_json(&lua, r#"return bucketly.splitall("a b c", nil, 2)"#),
            r#"["a","b c"]"#
        );
        assert_eq!(
            eval_json(&lua, r#"return bucketly.splitall("", ",")"#),
            r#"[""]"#
        );
        assert!(lua
            .load(r#"return bucketly.splitall("a", "")"#)
            .exec()
            .is_err());
    }

    #[test]
    fn memory_limit_stops_a_string_bomb() {
        let limits = ScriptLimits {
            memory: 4 << 20,
            ..ScriptLimits::default()
        };
        let lua = new_state(&limits).expect("state");
        let r = lua
            .load("local s = string.rep('x', 64 * 1024 * 1024)")
            .exec();
        assert!(matches!(r, Err(mlua::Error::MemoryError(_))), "{r:?}");
    }
}
