//! Primitive field encodings shared by every message:
//! `u8`, `u16be`, `u32be`, `str16` (u16be length + UTF-8), `blob32` (u32be length + bytes)
//! and `opt` (u8 0 = absent, 1 = present, then the value).

use bytes::{BufMut, Bytes, BytesMut};

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The payload ended inside a field.
    #[error("payload truncated in {0}")]
    Truncated(&'static str),
    /// A `str16` field is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// An `opt` marker other than 0 or 1.
    #[error("{0} has an invalid presence marker")]
    BadMarker(&'static str),
    /// Bytes left over after the last field.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
}

/// A cursor over a payload. Fields borrowed as [`Bytes`] share the frame's buffer.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// Starts reading `buf` at its first byte.
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(WireError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads one byte.
    ///
    /// # Errors
    /// [`WireError::Truncated`] at the end of the payload.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    /// Reads a big-endian u16.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a big-endian u32.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a big-endian u64.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut v = [0u8; 8];
        v.copy_from_slice(b);
        Ok(u64::from_be_bytes(v))
    }

    /// Reads `n` raw bytes without copying.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, WireError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..self.pos))
    }

    /// Reads a `str16`.
    ///
    /// # Errors
    /// [`WireError::Truncated`] or [`WireError::NotUtf8`].
    pub fn str16(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| WireError::NotUtf8(what))
    }

    /// Reads a `blob32` without copying.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn blob32(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let n = self.u32(what)? as usize;
        self.bytes(n, what)
    }

    /// Reads an `opt` marker: whether a value follows.
    ///
    /// # Errors
    /// [`WireError::Truncated`] or [`WireError::BadMarker`].
    pub fn present(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadMarker(what)),
        }
    }

    /// Everything not read yet, without copying.
    pub fn rest(&mut self) -> Bytes {
        let rest = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        rest
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Succeeds only if every byte was read.
    ///
    /// # Errors
    /// [`WireError::Trailing`].
    pub fn finish(&self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Writes a `str16`; text longer than 65,535 bytes is cut at a character boundary
/// (only server messages can be that long; names are validated shorter).
pub fn put_str16(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Writes a `blob32`.
pub fn put_blob32(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str16_truncates_long_text_on_a_char_boundary() {
        let s = "é".repeat(40_000);
        let mut out = BytesMut::new();
        put_str16(&mut out, &s);
        let mut r = Reader::new(out.freeze());
        let back = r.str16("s").expect("valid utf-8");
        assert!(back.len() <= u16::MAX as usize && back.chars().all(|c| c == 'é'));
        r.finish().expect("consumed");
    }

    #[test]
    fn truncated_fields_are_errors_not_panics() {
        let mut r = Reader::new(Bytes::from_static(&[0, 5, b'a']));
        assert_eq!(r.str16("name"), Err(WireError::Truncated("name")));
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]));
        assert_eq!(r.blob32("blob"), Err(WireError::Truncated("blob")));
        let mut r = Reader::new(Bytes::from_static(&[2]));
        assert_eq!(r.present("opt"), Err(WireError::BadMarker("opt")));
    }
}
