//! The snapshot format of `super::super::snapshot`, read and written without Lua, for
//! the states native handlers hold:
//!
//! ```text
//! value = 0 nil | 1 false | 2 true | 3 i64le | 4 f64le | 5 len:u32le bytes
//!       | 6 shape:u8 n:u32le n × (key value)
//! ```

/// A decoded value.
#[derive(Debug, PartialEq)]
pub(crate) enum V {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Vec<u8>),
    Table(Vec<(V, V)>),
}

impl V {
    /// The value at string key `name` of a table.
    pub fn field(&self, name: &str) -> Option<&V> {
        match self {
            V::Table(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, V::Str(s) if s == name.as_bytes()))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The entries of a table, or an error naming `what`.
    pub fn entries(&self, what: &str) -> Result<&[(V, V)], String> {
        match self {
            V::Table(entries) => Ok(entries),
            _ => Err(format!("{what} is not a table")),
        }
    }
}

/// Deepest table nesting the native states use, with room to spare.
const MAX_DEPTH: usize = 8;

/// Decodes a whole snapshot.
///
/// # Errors
/// A message for truncated, malformed or over-deep input, or bytes left over.
pub(crate) fn decode(bytes: &[u8]) -> Result<V, String> {
    let mut r = Reader { bytes, at: 0 };
    let v = r.value(0)?;
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the state", bytes.len() - r.at));
    }
    Ok(v)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("the snapshot is cut short")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<[u8; 8], String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn value(&mut self, depth: usize) -> Result<V, String> {
        let tag = self.take(1)?[0];
        Ok(match tag {
            0 => V::Nil,
            1 => V::Bool(false),
            2 => V::Bool(true),
            3 => V::Int(i64::from_le_bytes(self.u64()?)),
            4 => V::Float(f64::from_le_bytes(self.u64()?)),
            5 => {
                let len = self.u32()? as usize;
                V::Str(self.take(len)?.to_vec())
            }
            6 => {
                if depth >= MAX_DEPTH {
                    return Err("tables nested too deep for this handler's state".into());
                }
                let _shape = self.take(1)?;
                let n = self.u32()? as usize;
                // Each entry takes at least 2 bytes: never reserve more than the input holds.
                let mut entries = Vec::with_capacity(n.min(self.bytes.len() / 2));
                for _ in 0..n {
                    let k = self.value(depth + 1)?;
                    let v = self.value(depth + 1)?;
                    entries.push((k, v));
                }
                V::Table(entries)
            }
            other => return Err(format!("unknown value tag {other}")),
        })
    }
}

/// Appends a string value.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(5);
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

/// Appends an integer value.
pub(crate) fn put_int(out: &mut Vec<u8>, n: i64) {
    out.push(3);
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends `true`.
pub(crate) fn put_true(out: &mut Vec<u8>) {
    out.push(2);
}

/// Appends the header of a plain table of `n` entries; the entries follow.
pub(crate) fn put_table(out: &mut Vec<u8>, n: usize) {
    out.push(6);
    out.push(0);
    out.extend_from_slice(&(n as u32).to_le_bytes());
}
