//! Framing: `length:u32be body`. "Check, then parse": [`check_frame`] decides from the
//! bytes buffered so far whether a whole frame is there, and rejects an over-limit
//! length from the 4-byte header alone, before any body byte is buffered.

use bytes::{BufMut, BytesMut};

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// A framing error; both close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced body length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A zero-length frame.
    #[error("zero-length frame")]
    Empty,
}

/// Checks the start of `buf` for one frame.
///
/// Returns `Ok(Some(body_len))` when the header and `body_len` body bytes are all in
/// `buf`, `Ok(None)` when more bytes are needed.
///
/// # Errors
/// [`FrameError`] as soon as the header is complete and announces a length of 0 or
/// above `max`.
pub fn check_frame(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len = len as usize;
    Ok((buf.len() >= FRAME_HEADER_LEN + len).then_some(len))
}

/// Appends one frame to `out`: reserves the header, lets `body` write the body, then
/// patches the length in. Encoders never fail; the receiver enforces the maximum.
pub fn write_frame(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - start - FRAME_HEADER_LEN) as u32;
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_header_and_body_need_more() {
        assert_eq!(check_frame(&[], 10), Ok(None));
        assert_eq!(check_frame(&[0, 0, 0], 10), Ok(None));
        assert_eq!(check_frame(&[0, 0, 0, 2, 7], 10), Ok(None));
        assert_eq!(check_frame(&[0, 0, 0, 2, 7, 8, 9], 10), Ok(Some(2)));
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        assert_eq!(
            check_frame(&[0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(check_frame(&[0, 0, 0, 0], 10), Err(FrameError::Empty));
    }

    #[test]
    fn write_frame_patches_the_length() {
        let mut out = BytesMut::new();
        write_frame(&mut out, |b| b.extend_from_slice(b"abc"));
        assert_eq!(&out[..], &[0, 0, 0, 3, b'a', b'b', b'c']);
    }
}
