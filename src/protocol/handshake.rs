//! The handshake: the client's first frame names the protocol and its version, so a
//! wrong peer (an HTTP client, a future v2) gets a clear FATAL error instead of a hang.
//!
//! ```text
//! client hello = "BUCKETLY" version:u16be flags:u16be [reserved bytes, ignored]
//! server hello = OK response, request id 0, payload:
//!                "BUCKETLY" version:u16be flags:u32be max_frame:u32be server:str16
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use super::codes::ErrorCode;
use super::wire::{put_str16, Reader};

/// The 8 bytes that open both hellos.
pub const MAGIC: &[u8; 8] = b"BUCKETLY";
/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest client hello body accepted; a larger length prefix is not a handshake.
pub const MAX_HELLO_LEN: u32 = 256;
/// Server hello flag: the client must LOGIN before other commands (always set by this server).
pub const FLAG_LOGIN_REQUIRED: u32 = 1;

/// The client's first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// The protocol version the client speaks.
    pub version: u16,
    /// Reserved; 0 in v1.
    pub flags: u16,
}

impl ClientHello {
    /// The hello this client library sends.
    pub fn v1() -> Self {
        ClientHello {
            version: PROTOCOL_VERSION,
            flags: 0,
        }
    }

    /// Appends the hello frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        super::frame::write_frame(out, |b| {
            b.extend_from_slice(MAGIC);
            b.put_u16(self.version);
            b.put_u16(self.flags);
        });
    }

    /// Reads a hello body and checks magic and version.
    ///
    /// # Errors
    /// `BAD_HANDSHAKE` for anything that is not a hello, `UNSUPPORTED_VERSION` for a
    /// hello of another version; both with a message for the peer.
    pub fn decode(body: &[u8]) -> Result<ClientHello, (ErrorCode, String)> {
        if body.len() < MAGIC.len() + 4 || &body[..MAGIC.len()] != MAGIC {
            return Err((ErrorCode::BadHandshake, not_a_hello_message(body)));
        }
        let version = u16::from_be_bytes([body[8], body[9]]);
        let flags = u16::from_be_bytes([body[10], body[11]]);
        if version != PROTOCOL_VERSION {
            return Err((
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this server speaks bucketly v{PROTOCOL_VERSION}"),
            ));
        }
        Ok(ClientHello { version, flags })
    }
}

/// The message for a first frame that is not a hello. `start` is whatever the peer sent
/// first (the length prefix included when it was already rejected as too long).
pub fn not_a_hello_message(start: &[u8]) -> String {
    let text = start.len() >= 4
        && start[..4]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ');
    if text {
        "expected a bucketly v1 handshake; this port speaks the bucketly binary protocol, not HTTP or text".into()
    } else {
        "expected a bucketly v1 handshake (a frame starting with \"BUCKETLY\")".into()
    }
}

/// The server's answer to a good hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The protocol version the server will speak.
    pub version: u16,
    /// Bit set; see [`FLAG_LOGIN_REQUIRED`].
    pub flags: u32,
    /// The largest frame body the server accepts.
    pub max_frame: u32,
    /// Server software and version, for humans.
    pub server: String,
}

impl ServerHello {
    /// The payload of the OK response that carries this hello.
    pub fn payload(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(32 + self.server.len());
        b.extend_from_slice(MAGIC);
        b.put_u16(self.version);
        b.put_u32(self.flags);
        b.put_u32(self.max_frame);
        put_str16(&mut b, &self.server);
        b.freeze()
    }

    /// Reads the payload of the server's first response.
    ///
    /// # Errors
    /// A description when the payload is not a server hello.
    pub fn decode(payload: Bytes) -> Result<ServerHello, String> {
        let mut r = Reader::new(payload);
        let magic = r.bytes(MAGIC.len(), "magic").map_err(|e| e.to_string())?;
        if &magic[..] != MAGIC {
            return Err("the peer is not a bucketly server".into());
        }
        let hello = (|| {
            Ok::<_, super::wire::WireError>(ServerHello {
                version: r.u16("version")?,
                flags: r.u32("flags")?,
                max_frame: r.u32("max_frame")?,
                server: r.str16("server")?,
            })
        })()
        .map_err(|e| e.to_string())?;
        Ok(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_other_versions_are_refused_clearly() {
        let (code, msg) = ClientHello::decode(b"GET / HTTP/1.1\r\n").expect_err("not a hello");
        assert_eq!(code, ErrorCode::BadHandshake);
        assert!(msg.contains("not HTTP"), "{msg}");
        let (code, _) = ClientHello::decode(b"BUCKETLY\x00\x02\x00\x00").expect_err("v2");
        assert_eq!(code, ErrorCode::UnsupportedVersion);
    }

    #[test]
    fn extra_hello_bytes_are_reserved_and_ignored() {
        let hello = ClientHello::decode(b"BUCKETLY\x00\x01\x00\x00future").expect("v1");
        assert_eq!(hello, ClientHello::v1());
    }
}
