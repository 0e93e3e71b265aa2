//! Client errors.

use crate::protocol::ErrorCode;

/// What can go wrong for a client request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered the request with an error; the connection is still usable
    /// unless the code is a 1xx one.
    #[error("{}: {message}", code_name(*code))]
    Server {
        /// The wire code.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// The request would exceed the server's maximum frame size.
    #[error("request of {len} bytes exceeds the server's maximum frame of {max} bytes")]
    TooLarge {
        /// Body length.
        len: usize,
        /// Server maximum.
        max: usize,
    },
    /// The server sent something that is not bucketly v1.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

fn code_name(code: u16) -> String {
    ErrorCode::from_u16(code).map_or_else(|| format!("error {code}"), |c| c.name().to_owned())
}

impl ClientError {
    /// The server's error code, if this is a server answer with a known code.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }
}
