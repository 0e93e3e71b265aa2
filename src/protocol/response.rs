//! Responses: `status:u8 request_id:u32be payload`.
//!
//! OK payloads depend on the command; ERROR and FATAL payloads are
//! `code:u16be message:str16`. After a FATAL response the server closes the connection.

use bytes::{BufMut, Bytes, BytesMut};

use super::codes::ErrorCode;
use super::frame::write_frame;
use super::wire::{put_str16, Reader, WireError};

/// The first byte of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The request succeeded; the payload is the command's result.
    Ok = 0,
    /// The request failed; the connection stays usable.
    Error = 1,
    /// The connection failed; the server closes it after this frame.
    Fatal = 2,
    /// An output of a subscription; the id is the SUBSCRIBE request's, the payload the
    /// output (JSON). Not an answer: it never takes a request's place in the order.
    Push = 3,
    /// The subscription with this id has ended (`code:u16 message:str16`); the
    /// connection stays usable.
    End = 4,
}

/// One response frame, decoded generically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request id this answers (0 for the handshake and for connection errors
    /// that no request caused).
    pub id: u32,
    /// OK, ERROR or FATAL.
    pub status: Status,
    /// The command result, or `code message` for ERROR and FATAL.
    pub payload: Bytes,
}

/// Largest error message sent; longer ones are cut (handler errors can be long).
pub const MAX_ERROR_MESSAGE: usize = 4096;

impl Response {
    /// An OK response with `payload`.
    pub fn ok(id: u32, payload: Bytes) -> Self {
        Response {
            id,
            status: Status::Ok,
            payload,
        }
    }

    /// A PUSH frame: an output of subscription `id`.
    pub fn push(id: u32, payload: Bytes) -> Self {
        Response {
            id,
            status: Status::Push,
            payload,
        }
    }

    /// An END frame: subscription `id` is over, for the reason `code`.
    pub fn end(id: u32, code: ErrorCode, message: &str) -> Self {
        Response {
            status: Status::End,
            ..Response::error(id, code, message)
        }
    }

    /// An OK response with an empty payload.
    pub fn empty(id: u32) -> Self {
        Response::ok(id, Bytes::new())
    }

    /// An ERROR (or, for 1xx codes, FATAL) response.
    pub fn error(id: u32, code: ErrorCode, message: &str) -> Self {
        let mut b = BytesMut::with_capacity(8 + message.len().min(MAX_ERROR_MESSAGE));
        b.put_u16(code.as_u16());
        let mut end = message.len().min(MAX_ERROR_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        put_str16(&mut b, &message[..end]);
        let status = if code.is_fatal() {
            Status::Fatal
        } else {
            Status::Error
        };
        Response {
            id,
            status,
            payload: b.freeze(),
        }
    }

    /// For ERROR and FATAL responses: the raw code and the message.
    ///
    /// # Errors
    /// [`WireError`] if the error payload is malformed.
    pub fn failure(&self) -> Result<Option<(u16, String)>, WireError> {
        if matches!(self.status, Status::Ok | Status::Push) {
            return Ok(None);
        }
        let mut r = Reader::new(self.payload.clone());
        let code = r.u16("error code")?;
        let message = r.str16("error message")?;
        Ok(Some((code, message)))
    }

    /// Appends this response as a frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        write_frame(out, |b| {
            b.put_u8(self.status as u8);
            b.put_u32(self.id);
            b.extend_from_slice(&self.payload);
        });
    }

    /// Reads a response body (the frame without its length prefix).
    ///
    /// # Errors
    /// [`WireError`] if the body is shorter than its header or the status is unknown.
    pub fn decode(body: Bytes) -> Result<Response, WireError> {
        let mut r = Reader::new(body);
        let status = match r.u8("status")? {
            0 => Status::Ok,
            1 => Status::Error,
            2 => Status::Fatal,
            3 => Status::Push,
            4 => Status::End,
            _ => return Err(WireError::BadMarker("status")),
        };
        let id = r.u32("request id")?;
        Ok(Response {
            id,
            status,
            payload: r.rest(),
        })
    }
}

/// Rejection reasons carried in one SEND reply at most; the counts are always exact.
pub const MAX_REJECTION_REASONS: usize = 16;
/// Longest rejection reason carried; longer ones are cut.
pub const MAX_REASON_LEN: usize = 512;

/// The OK payload of SEND:
/// `accepted:u32be rejected:u32be n:u16be n × (index:u32be reason:str16)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Events the handler applied.
    pub accepted: u32,
    /// Events the handler rejected.
    pub rejected: u32,
    /// The first [`MAX_REJECTION_REASONS`] rejections: index in the batch and reason.
    pub reasons: Vec<(u32, String)>,
}

impl SendOutcome {
    /// Counts one rejection, keeping its reason if there is room.
    pub fn reject(&mut self, index: u32, reason: impl FnOnce() -> String) {
        self.rejected += 1;
        if self.reasons.len() < MAX_REJECTION_REASONS {
            let mut reason = reason();
            if reason.len() > MAX_REASON_LEN {
                let mut end = MAX_REASON_LEN;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            self.reasons.push((index, reason));
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(10 + self.reasons.len() * 64);
        self.put(&mut b);
        b.freeze()
    }

    /// Appends the whole OK response frame to request `id` carrying this outcome: the
    /// bytes of `Response::ok(id, self.encode())`, without building it.
    pub fn encode_answer(&self, id: u32, out: &mut BytesMut) {
        if self.reasons.is_empty() {
            // The usual answer, in one copy: length 15, OK, id, counts, no reasons.
            let mut frame = [0u8; 19];
            frame[3] = 15;
            frame[4] = Status::Ok as u8;
            frame[5..9].copy_from_slice(&id.to_be_bytes());
            frame[9..13].copy_from_slice(&self.accepted.to_be_bytes());
            frame[13..17].copy_from_slice(&self.rejected.to_be_bytes());
            out.extend_from_slice(&frame);
            return;
        }
        write_frame(out, |b| {
            b.put_u8(Status::Ok as u8);
            b.put_u32(id);
            self.put(b);
        });
    }

    fn put(&self, b: &mut BytesMut) {
        b.put_u32(self.accepted);
        b.put_u32(self.rejected);
        b.put_u16(self.reasons.len() as u16);
        for (index, reason) in &self.reasons {
            b.put_u32(*index);
            put_str16(b, reason);
        }
    }

    /// The accepted and rejected counts of a response body that is an OK answer to a
    /// SEND carrying no reasons, read in place; `None` for any other body, which
    /// [`Response::decode`] and [`SendOutcome::decode`] then read. For a client that
    /// counts many answers (the load generator).
    pub fn plain_counts(body: &[u8]) -> Option<(u32, u32)> {
        let b: &[u8; 15] = body.try_into().ok()?;
        let [status, _, _, _, _, a0, a1, a2, a3, r0, r1, r2, r3, 0, 0] = *b else {
            return None;
        };
        (status == Status::Ok as u8).then_some((
            u32::from_be_bytes([a0, a1, a2, a3]),
            u32::from_be_bytes([r0, r1, r2, r3]),
        ))
    }

    /// Reads the payload bytes.
    ///
    /// # Errors
    /// [`WireError`] if the payload does not match the layout.
    pub fn decode(payload: Bytes) -> Result<SendOutcome, WireError> {
        let mut r = Reader::new(payload);
        let accepted = r.u32("accepted")?;
        let rejected = r.u32("rejected")?;
        let n = r.u16("reason count")?;
        let mut reasons = Vec::with_capacity(usize::from(n).min(MAX_REJECTION_REASONS));
        for _ in 0..n {
            reasons.push((r.u32("reason index")?, r.str16("reason")?));
        }
        r.finish()?;
        Ok(SendOutcome {
            accepted,
            rejected,
            reasons,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_outcome_encodes_as_its_ok_response() {
        use super::*;
        let mut outcome = SendOutcome {
            accepted: 3,
            ..SendOutcome::default()
        };
        let counts_only = SendOutcome {
            accepted: 0x0102_0304,
            rejected: 0xA0B0_C0D0,
            reasons: Vec::new(),
        };
        for o in [outcome.clone(), counts_only, {
            outcome.reject(1, || "bad".into());
            outcome
        }] {
            let (mut direct, mut via) = (BytesMut::new(), BytesMut::new());
            o.encode_answer(7, &mut direct);
            Response::ok(7, o.encode()).encode(&mut via);
            assert_eq!(direct, via);
        }
    }

    use super::*;

    #[test]
    fn fatal_codes_get_fatal_status() {
        assert_eq!(
            Response::error(0, ErrorCode::FrameTooLarge, "x").status,
            Status::Fatal
        );
        assert_eq!(
            Response::error(1, ErrorCode::NoSuchBucket, "x").status,
            Status::Error
        );
    }

    #[test]
    fn send_outcome_keeps_counts_exact_and_reasons_bounded() {
        let mut o = SendOutcome::default();
        for i in 0..100 {
            o.reject(i, || "x".repeat(2000));
        }
        assert_eq!(o.rejected, 100);
        assert_eq!(o.reasons.len(), MAX_REJECTION_REASONS);
        assert!(o.reasons.iter().all(|(_, r)| r.len() == MAX_REASON_LEN));
        assert_eq!(SendOutcome::decode(o.encode()), Ok(o));
    }
}
