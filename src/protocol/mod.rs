//! The "bucketly v1" wire protocol (specified in `protocol-spec/PROTOCOL.md`).
//!
//! Everything here is a pure function over bytes: no I/O, no async. The server and the
//! client share these encoders and decoders, so they cannot disagree.
//!
//! ```text
//! frame    = length:u32be body            (1 <= length <= max_frame)
//! request  = opcode:u8 request_id:u32be payload
//! response = status:u8 request_id:u32be payload
//! ```

pub mod codes;
pub mod frame;
pub mod handshake;
pub mod request;
pub mod response;
pub mod wire;

#[cfg(test)]
mod proptests;

pub use codes::ErrorCode;
pub use frame::{check_frame, FrameError, FRAME_HEADER_LEN};
pub use handshake::{ClientHello, ServerHello, MAGIC, PROTOCOL_VERSION};
pub use request::{
    encode_send, send_frame_to, Command, Request, RequestError, Secret, SendBatch, SendFrame,
    SendView,
};
pub use response::{Response, SendOutcome, Status};
