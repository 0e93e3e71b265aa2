//! The mapping between Lua values and JSON (documented in `handlers/README.md`):
//! nil → null; booleans; integers; finite floats (NaN and ±inf → null); strings (invalid
//! UTF-8 replaced by U+FFFD); a table whose keys are exactly 1..n with n ≥ 1, or one
//! marked by `bucketly.array`, → array; any other table → object with keys sorted.

use std::io::Write;

use mlua::{Lua, Table, Value};

use super::sandbox::JSON_KIND_FIELD;

/// Deepest nesting converted; deeper (or cyclic) values are an error.
pub const MAX_DEPTH: usize = 64;

/// Appends `v` as JSON to `out`.
///
/// # Errors
/// A message for functions, userdata, threads, unsupported table keys, or nesting deeper
/// than [`MAX_DEPTH`].
pub(crate) fn write_json(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    write_value(v, out, 0)
}

fn write_value(v: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
    match v {
        Value::Nil => out.extend_from_slice(b"null"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Integer(i) => write!(out, "{i}").map_err(|e| e.to_string())?,
        Value::Number(n) => write_float(*n, out),
        Value::String(s) => write_str(&s.to_string_lossy(), out),
        Value::Table(t) => write_table(t, out, depth + 1)?,
        other => {
            return Err(format!(
                "a {} cannot be converted to JSON",
                other.type_name()
            ))
        }
    }
    Ok(())
}

fn write_float(n: f64, out: &mut Vec<u8>) {
    match serde_json::Number::from_f64(n) {
        Some(n) => out.extend_from_slice(n.to_string().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json_kind(t: &Table) -> Option<String> {
    t.metatable()?
        .raw_get::<Option<String>>(JSON_KIND_FIELD)
        .ok()?
}

fn write_table(t: &Table, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "value nested deeper than {MAX_DEPTH} levels (or a cycle)"
        ));
    }
    let kind = json_kind(t);
    let len = t.raw_len();
    let is_array = match kind.as_deref() {
        Some("array") => true,
        Some("object") => false,
        _ => len > 0 && t.pairs::<Value, Value>().count() == len,
    };
    if is_array {
        out.push(b'[');
        for i in 1..=len {
            if i > 1 {
                out.push(b',');
            }
            let v: Value = t.raw_get(i).map_err(|e| e.to_string())?;
            write_value(&v, out, depth)?;
        }
        out.push(b']');
        return Ok(());
    }
    let mut entries = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| e.to_string())?;
        entries.push((key_string(&k)?, v));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    out.push(b'{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        write_value(v, out, depth)?;
    }
    out.push(b'}');
    Ok(())
}

fn key_string(k: &Value) -> Result<String, String> {
    Ok(match k {
        Value::String(s) => s.to_string_lossy(),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => {
            return Err(format!(
                "a {} cannot be a JSON object key",
                other.type_name()
            ))
        }
    })
}

/// Converts JSON to a Lua value: arrays become sequences (marked as arrays so they
/// convert back to `[]` even when empty), objects become tables, null becomes nil.
///
/// # Errors
/// Only on Lua allocation failure (memory limit).
pub(crate) fn to_lua(lua: &Lua, v: &serde_json::Value) -> mlua::Result<Value> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::String(lua.create_string(s)?),
        J::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            let array: mlua::Function = lua.globals().get::<Table>("bucketly")?.get("array")?;
            array.call::<Value>(t)?
        }
        J::Object(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, item) in map {
                t.raw_set(k.as_str(), to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::{sandbox::new_state, ScriptLimits};

    fn json_of(code: &str) -> Result<String, String> {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        let v: Value = lua.load(code).eval().expect("eval");
        let mut out = Vec::new();
        write_json(&v, &mut out)?;
        Ok(String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn mapping_matches_the_documented_table() {
        assert_eq!(json_of("return nil").as_deref(), Ok("null"));
        assert_eq!(json_of("return {}").as_deref(), Ok("{}"));
        assert_eq!(json_of("return bucketly.array({})").as_deref(), Ok("[]"));
        assert_eq!(
            json_of("return {1, 'a', true}").as_deref(),
            Ok("[1,\"a\",true]")
        );
        assert_eq!(
            json_of("return {b=1, a=2.5}").as_deref(),
            Ok("{\"a\":2.5,\"b\":1}")
        );
        assert_eq!(
            json_of("return {[1]=1, [3]=3}").as_deref(),
            Ok("{\"1\":1,\"3\":3}")
        );
        assert_eq!(json_of("return 0/0").as_deref(), Ok("null"));
        assert_eq!(
            json_of("return 'a\\255\"'").as_deref(),
            Ok("\"a\u{fffd}\\\"\"")
        );
        assert_eq!(
            json_of("return bucketly.object({1})").as_deref(),
            Ok("{\"1\":1}")
        );
    }

    #[test]
    fn cycles_and_functions_are_errors() {
        assert!(json_of("local t = {} t.t = t return t").is_err());
        assert!(json_of("return {f = function() end}").is_err());
    }

    #[test]
    fn json_round_trips_through_lua() {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        let j = serde_json::json!({"a": [1, 2.5, "x", []], "b": {"c": true}});
        let v = to_lua(&lua, &j).expect("to lua");
        let mut out = Vec::new();
        write_json(&v, &mut out).expect("to json");
        let back: serde_json::Value = serde_json::from_slice(&out).expect("parse");
        assert_eq!(back, j);
    }
}
