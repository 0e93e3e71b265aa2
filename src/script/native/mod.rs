//! Native Rust implementations of stock handlers, used instead of Lua when a bucket runs
//! the embedded `counter` or `unique` handler: the same events accepted and rejected
//! with the same reasons, the same views, dumps and JSON, and snapshots in the same
//! format as the Lua state (so a Lua instance of the handler can restore a native
//! snapshot and the other way round). `tests/it/native.rs` checks them against Lua.
//!
//! Why: a Lua call costs about 0.4 µs before the handler does anything, and a Lua table
//! of short strings costs about 100 bytes an entry. The native `counter` and `unique`
//! apply an event in tens of nanoseconds and keep a member in about 50 bytes.
//!
//! Memory: each state keeps an estimate of its heap use (what INFO shows as `memory`)
//! and refuses, like the Lua memory limit, an event that would take it past the
//! bucket's limit. Time: every call does bounded work per event, so the time budget
//! does not apply to them.

mod counter;
mod key;
mod snap;
mod unique;

use std::io::Write as _;

use super::catalog::stock_source;
use super::{HandlerSource, ScriptError, ScriptLimits};

pub(crate) use counter::Counter;
pub(crate) use unique::Unique;

/// The hash tables of the native states. Their keys come from clients, so the hash
/// must not let anyone choose keys that collide: foldhash, keyed per table from a
/// random per-process seed. A lookup of a 16-byte key takes half the time it takes
/// with the standard SipHash-1-3 (14 against 29 ns, `cargo bench --bench micro --
/// table`; benches/README.md, item 22). What foldhash lacks against SipHash is a
/// proof, not a known attack; and a table's order, which could hint at its key, never
/// leaves the daemon: views and dumps sort their keys, snapshots go only to the
/// database file.
type Table<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;
type Set<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;

/// A native handler state.
pub(crate) enum Native {
    Counter(Counter),
    Unique(Unique),
}

/// What the Lua memory limit says when it is hit, and so what a native state says.
const OUT_OF_MEMORY: &str = "handler error: memory limit exceeded: not enough memory";

impl Native {
    /// The native implementation of `handler`, if its source is exactly that of a stock
    /// handler that has one (embedded, or a file with the same text, as the checkout's
    /// `handlers/` directory holds); `Some(Err)` for a config the handler refuses. A
    /// file that differs in any byte runs in Lua.
    pub fn for_handler(
        handler: &HandlerSource,
        config: &serde_json::Value,
        limits: &ScriptLimits,
    ) -> Option<Result<Native, ScriptError>> {
        if stock_source(&handler.name) != Some(&handler.source) {
            return None;
        }
        let make: fn(usize) -> Native = match handler.name.as_str() {
            "counter" => |limit| Native::Counter(Counter::new(limit)),
            "unique" => |limit| Native::Unique(Unique::new(limit)),
            _ => return None,
        };
        Some(match no_config(&handler.name, config) {
            Ok(()) => Ok(make(limits.memory)),
            Err(e) => Err(e),
        })
    }

    pub fn send(&mut self, event: &[u8]) -> Result<(), String> {
        match self {
            Native::Counter(h) => h.send(event),
            Native::Unique(h) => h.send(event),
        }
    }

    pub fn view(&self, arg: Option<&[u8]>) -> Vec<u8> {
        match (self, arg) {
            (Native::Counter(h), None) => h.view(),
            (Native::Counter(h), Some(k)) => h.view_key(trim(k)).to_string().into_bytes(),
            (Native::Unique(h), None) => h.view(),
            (Native::Unique(h), Some(k)) => h.view_key(trim(k)).to_string().into_bytes(),
        }
    }

    pub fn dump(&mut self) -> Vec<u8> {
        let out = self.view(None);
        match self {
            Native::Counter(h) => h.clear(),
            Native::Unique(h) => h.clear(),
        }
        out
    }

    pub fn snapshot(&self) -> Vec<u8> {
        match self {
            Native::Counter(h) => h.snapshot(),
            Native::Unique(h) => h.snapshot(),
        }
    }

    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let state = snap::decode(bytes)?;
        match self {
            Native::Counter(h) => h.restore(&state),
            Native::Unique(h) => h.restore(&state),
        }
    }

    pub fn memory_used(&self) -> usize {
        match self {
            Native::Counter(h) => h.memory_used(),
            Native::Unique(h) => h.memory_used(),
        }
    }
}

/// The config check of the stock handlers that take none: null, `{}` or `[]`.
fn no_config(name: &str, config: &serde_json::Value) -> Result<(), ScriptError> {
    use serde_json::Value as J;
    match config {
        J::Null => Ok(()),
        J::Object(m) if m.is_empty() => Ok(()),
        J::Array(a) if a.is_empty() => Ok(()),
        _ => Err(ScriptError::Runtime(format!(
            "init: runtime error: {name}: takes no config (expected null or {{}})"
        ))),
    }
}

/// `bucketly.trim`: without leading and trailing bytes that Lua's `%s` matches.
pub(crate) fn trim(s: &[u8]) -> &[u8] {
    let space = |b: &u8| *b == b' ' || (9..=13).contains(b);
    let start = s.iter().position(|b| !space(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !space(b)).map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

/// `bucketly.quote`: the text in double quotes, cut after 64 bytes (on a UTF-8
/// boundary) with "...".
fn quote(s: &[u8]) -> String {
    if s.len() <= 64 {
        return format!("\"{}\"", String::from_utf8_lossy(s));
    }
    let mut n = 64;
    while n > 0 && (s[n] & 0xC0) == 0x80 {
        n -= 1;
    }
    format!("\"{}...\"", String::from_utf8_lossy(&s[..n]))
}

/// Writes `{"key": n, ...}` with keys as the Lua JSON mapping writes them: invalid
/// UTF-8 replaced, sorted.
fn write_counts<'a>(entries: impl Iterator<Item = (&'a [u8], i64)>) -> Vec<u8> {
    let mut keyed: Vec<(std::borrow::Cow<'a, str>, i64)> = entries
        .map(|(k, n)| (String::from_utf8_lossy(k), n))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(2 + keyed.len() * 16);
    out.push(b'{');
    for (i, (k, n)) in keyed.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Serialising a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, k.as_ref());
        let _ = write!(out, ":{n}");
    }
    out.push(b'}');
    out
}

/// Heap bytes a boxed byte string of `len` takes with malloc's header and rounding.
fn boxed_cost(len: usize) -> usize {
    (len + 8).next_multiple_of(16).max(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_matches_lua_percent_s() {
        assert_eq!(trim(b"  a b \t\r\n\x0b\x0c"), b"a b");
        assert_eq!(trim(b" \t "), b"");
        assert_eq!(trim(b""), b"");
        assert_eq!(trim(b"\xa0x\xa0"), b"\xa0x\xa0");
    }

    #[test]
    fn quote_cuts_long_text_on_a_character_boundary() {
        assert_eq!(quote(b"ab"), "\"ab\"");
        let long = "é".repeat(40);
        let q = quote(long.as_bytes());
        assert!(q.ends_with("...\"") && q.len() == 64 + 5, "{q}");
    }
}
