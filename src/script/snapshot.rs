//! A handler state as bytes, for durable buckets' snapshots: exact for every value a
//! state may hold (strings are bytes, integers stay integers, `bucketly.array` and
//! `bucketly.object` marks are kept), and a clear error for what it cannot hold.
//!
//! ```text
//! value = 0 nil | 1 false | 2 true | 3 i64le | 4 f64le | 5 len:u32le bytes
//!       | 6 shape:u8 n:u32le n × (key value)        shape: 0 plain, 1 array, 2 object
//! ```
//!
//! A state must be a tree: a table reached twice (shared or cyclic) is refused, as are
//! functions, coroutines, userdata and metatables other than the JSON shape marks.

use std::collections::HashSet;

use mlua::{Lua, Table, Value};

use super::sandbox::JSON_KIND_FIELD;

/// Tables nested deeper than this are refused.
pub const MAX_SNAPSHOT_DEPTH: usize = 128;

const NIL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 4;
const STRING: u8 = 5;
const TABLE: u8 = 6;

/// Encodes `v`.
///
/// # Errors
/// Why the value cannot be kept, naming the path to the offending part.
pub(crate) fn encode(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    let mut seen = HashSet::new();
    write(v, out, &mut seen, 0).map_err(|fail| {
        let mut path = fail.path;
        path.reverse();
        let at = if path.is_empty() {
            "the state".to_owned()
        } else {
            format!("state.{}", path.join("."))
        };
        format!("{at} {}", fail.why)
    })
}

/// A failure and the keys leading to it, innermost first (built on the way up, so the
/// success path allocates nothing for names).
struct Fail {
    path: Vec<String>,
    why: String,
}

fn fail(why: impl Into<String>) -> Fail {
    Fail {
        path: Vec::new(),
        why: why.into(),
    }
}

fn write(
    v: &Value,
    out: &mut Vec<u8>,
    seen: &mut HashSet<usize>,
    depth: usize,
) -> Result<(), Fail> {
    match v {
        Value::Nil => out.push(NIL),
        Value::Boolean(false) => out.push(FALSE),
        Value::Boolean(true) => out.push(TRUE),
        Value::Integer(i) => {
            out.push(INT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Number(n) => {
            out.push(FLOAT);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Value::String(s) => {
            let b = s.as_bytes();
            let len = u32::try_from(b.len()).map_err(|_| fail("is too long"))?;
            out.push(STRING);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&b);
        }
        Value::Table(t) => write_table(t, out, seen, depth)?,
        other => {
            return Err(fail(format!(
                "is a {}, which a durable state cannot hold",
                other.type_name()
            )))
        }
    }
    Ok(())
}

fn shape(t: &Table) -> Result<u8, Fail> {
    let Some(mt) = t.metatable() else {
        return Ok(0);
    };
    match mt
        .raw_get::<Option<String>>(JSON_KIND_FIELD)
        .ok()
        .flatten()
        .as_deref()
    {
        Some("array") => Ok(1),
        Some("object") => Ok(2),
        _ => Err(fail("has a metatable, which a durable state cannot hold")),
    }
}

fn write_table(
    t: &Table,
    out: &mut Vec<u8>,
    seen: &mut HashSet<usize>,
    depth: usize,
) -> Result<(), Fail> {
    if depth >= MAX_SNAPSHOT_DEPTH {
        return Err(fail(format!(
            "is nested more than {MAX_SNAPSHOT_DEPTH} tables deep"
        )));
    }
    if !seen.insert(t.to_pointer() as usize) {
        return Err(fail(
            "is a table that appears twice in the state; a durable state must be a tree",
        ));
    }
    out.push(TABLE);
    out.push(shape(t)?);
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut n = 0u32;
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| fail(e.to_string()))?;
        if matches!(k, Value::Table(_)) {
            return Err(fail(
                "has a table as a key, which a durable state cannot hold",
            ));
        }
        write(&k, out, seen, depth + 1)?;
        write(&v, out, seen, depth + 1).map_err(|mut f| {
            f.path.push(key_name(&k));
            f
        })?;
        n = n
            .checked_add(1)
            .ok_or_else(|| fail("has too many entries"))?;
    }
    out[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
    Ok(())
}

fn key_name(k: &Value) -> String {
    match k {
        Value::String(s) => {
            let s = s.to_string_lossy();
            let mut end = s.len().min(32);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_owned()
        }
        Value::Integer(i) => format!("[{i}]"),
        other => format!("[{}]", other.type_name()),
    }
}

/// Decodes bytes made by [`encode`] into a value of `lua`.
///
/// # Errors
/// Malformed bytes, or a Lua allocation failure (memory limit).
pub(crate) fn decode(lua: &Lua, bytes: &[u8]) -> Result<Value, String> {
    let mut r = Cursor { bytes, at: 0 };
    let v = read(lua, &mut r, 0)?;
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the state", bytes.len() - r.at));
    }
    Ok(v)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("truncated state")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn eight(&mut self) -> Result<[u8; 8], String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(a)
    }
}

fn read(lua: &Lua, r: &mut Cursor<'_>, depth: usize) -> Result<Value, String> {
    let lua_err = |e: mlua::Error| super::lua_error_message(&e);
    Ok(match r.u8()? {
        NIL => Value::Nil,
        FALSE => Value::Boolean(false),
        TRUE => Value::Boolean(true),
        INT => Value::Integer(i64::from_le_bytes(r.eight()?)),
        FLOAT => Value::Number(f64::from_le_bytes(r.eight()?)),
        STRING => {
            let n = r.u32()? as usize;
            Value::String(lua.create_string(r.take(n)?).map_err(lua_err)?)
        }
        TABLE => {
            if depth >= MAX_SNAPSHOT_DEPTH {
                return Err("state nested too deeply".into());
            }
            let shape = r.u8()?;
            let n = r.u32()?;
            let t = lua.create_table().map_err(lua_err)?;
            for _ in 0..n {
                let k = read(lua, r, depth + 1)?;
                let v = read(lua, r, depth + 1)?;
                t.raw_set(k, v).map_err(lua_err)?;
            }
            match shape {
                0 => {}
                1 | 2 => {
                    let kind = if shape == 1 { "array" } else { "object" };
                    let mark: mlua::Function = lua
                        .globals()
                        .raw_get::<Table>("bucketly")
                        .and_then(|b| b.raw_get(kind))
                        .map_err(lua_err)?;
                    mark.call::<()>(&t).map_err(lua_err)?;
                }
                other => return Err(format!("unknown table shape {other}")),
            }
            Value::Table(t)
        }
        other => return Err(format!("unknown value tag {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::json::write_json;
    use crate::script::{sandbox::new_state, ScriptLimits};

    fn round_trip(code: &str) -> (Vec<u8>, Vec<u8>) {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        let v: Value = lua.load(code).eval().expect("eval");
        let mut bytes = Vec::new();
        encode(&v, &mut bytes).expect("encode");
        let back = decode(&lua, &bytes).expect("decode");
        let mut again = Vec::new();
        encode(&back, &mut again).expect("encode again");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_json(&v, &mut a).expect("json");
        write_json(&back, &mut b).expect("json");
        assert_eq!(a, b, "{code}");
        (bytes, again)
    }

    #[test]
    fn states_round_trip_exactly() {
        for code in [
            "return nil",
            "return {}",
            r#"return {counts = {["/home"] = 3, ["a\0b"] = 1}, n = 2^53, f = 1.5, t = true}"#,
            "return {1, 2, {3, {4}}, 'x'}",
            "return bucketly.array({})",
            "return {inner = bucketly.object({1, 2})}",
            "return {[1.5] = 'float key', [true] = 'bool key', [-7] = 'neg'}",
            r#"return {bin = "\255\254"}"#,
        ] {
            let (a, b) = round_trip(code);
            assert_eq!(a.len(), b.len(), "{code}");
        }
    }

    #[test]
    fn integer_and_float_stay_distinct() {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        let v: Value = lua.load("return {i = 3, f = 3.0}").eval().expect("eval");
        let mut bytes = Vec::new();
        encode(&v, &mut bytes).expect("encode");
        let back = decode(&lua, &bytes).expect("decode");
        let Value::Table(t) = back else { panic!() };
        assert!(matches!(t.raw_get::<Value>("i"), Ok(Value::Integer(3))));
        assert!(matches!(t.raw_get::<Value>("f"), Ok(Value::Number(f)) if f == 3.0));
    }

    #[test]
    fn what_cannot_be_kept_is_named() {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        for (code, why) in [
            ("return {f = function() end}", "state.f is a function"),
            ("local t = {} return {a = t, b = t}", "appears twice"),
            ("local t = {} t.self = t return t", "appears twice"),
            (
                "return {co = coroutine.create(function() end)}",
                "is a thread",
            ),
            ("return setmetatable({}, {__index = {}})", "has a metatable"),
            ("return {[{}] = 1}", "a table as a key"),
        ] {
            let v: Value = lua.load(code).eval().expect("eval");
            let err = encode(&v, &mut Vec::new()).expect_err(code);
            assert!(err.contains(why), "{code}: {err}");
        }
    }

    #[test]
    fn malformed_bytes_are_errors() {
        let lua = new_state(&ScriptLimits::default()).expect("state");
        for bytes in [
            &b""[..],
            b"\x09",
            b"\x05\xff\xff\xff\xff",
            b"\x06\x00\x01\x00\x00\x00",
            b"\x00\x00",
        ] {
            assert!(decode(&lua, bytes).is_err(), "{bytes:?}");
        }
    }
}
