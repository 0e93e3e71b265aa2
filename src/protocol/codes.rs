//! Stable numeric error codes. The table in `protocol-spec/PROTOCOL.md` lists the same
//! numbers; a test checks that every code here appears there.

/// An error code carried by ERROR and FATAL responses.
///
/// 1xx close the connection (sent with status FATAL); all others answer one request
/// (status ERROR) and the connection stays usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The framing is broken (a zero-length frame, a body shorter than its header).
    ProtocolError,
    /// A length prefix above the server's maximum frame size.
    FrameTooLarge,
    /// The first frame is not a bucketly handshake (for example an HTTP request).
    BadHandshake,
    /// The handshake names a protocol version this server does not speak.
    UnsupportedVersion,
    /// The server is at its connection limit.
    TooManyConnections,
    /// The server is shutting down.
    ShuttingDown,
    /// The handshake did not arrive in time.
    HandshakeTimeout,
    /// The connection's user was deleted.
    UserDeleted,
    /// The connection fell behind the outputs of its subscriptions.
    SlowConsumer,
    /// The opcode is not known to this server.
    UnknownCommand,
    /// The payload does not match the command's layout.
    MalformedRequest,
    /// A well-formed request with an invalid value (bad name, bad JSON, ...).
    InvalidArgument,
    /// A command other than PING or LOGIN was sent before LOGIN.
    AuthRequired,
    /// Wrong user name or password.
    LoginFailed,
    /// The user lacks a permission.
    PermissionDenied,
    /// Too many failed logins from this address or for this user name.
    LoginThrottled,
    /// No user has that name.
    NoSuchUser,
    /// A user with that name exists already.
    UserExists,
    /// The change would leave no user with `admin`.
    LastAdmin,
    /// No bucket has that name.
    NoSuchBucket,
    /// A bucket with that name exists already.
    BucketExists,
    /// No handler has that name.
    NoSuchHandler,
    /// The handler's Lua code failed for this request.
    HandlerError,
    /// A server limit was reached (for example the number of buckets).
    LimitExceeded,
    /// An exec sink, and the daemon was not started with `--allow-exec`.
    ExecDisabled,
    /// An unexpected server-side failure.
    Internal,
    /// The database file could not be read or written.
    StorageError,
}

impl ErrorCode {
    /// Every code, in table order.
    pub const ALL: [ErrorCode; 27] = [
        ErrorCode::ProtocolError,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadHandshake,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooManyConnections,
        ErrorCode::ShuttingDown,
        ErrorCode::HandshakeTimeout,
        ErrorCode::UserDeleted,
        ErrorCode::SlowConsumer,
        ErrorCode::UnknownCommand,
        ErrorCode::MalformedRequest,
        ErrorCode::InvalidArgument,
        ErrorCode::AuthRequired,
        ErrorCode::LoginFailed,
        ErrorCode::PermissionDenied,
        ErrorCode::LoginThrottled,
        ErrorCode::NoSuchUser,
        ErrorCode::UserExists,
        ErrorCode::LastAdmin,
        ErrorCode::NoSuchBucket,
        ErrorCode::BucketExists,
        ErrorCode::NoSuchHandler,
        ErrorCode::HandlerError,
        ErrorCode::LimitExceeded,
        ErrorCode::ExecDisabled,
        ErrorCode::Internal,
        ErrorCode::StorageError,
    ];

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::ProtocolError => 100,
            ErrorCode::FrameTooLarge => 101,
            ErrorCode::BadHandshake => 102,
            ErrorCode::UnsupportedVersion => 103,
            ErrorCode::TooManyConnections => 104,
            ErrorCode::ShuttingDown => 105,
            ErrorCode::HandshakeTimeout => 106,
            ErrorCode::UserDeleted => 107,
            ErrorCode::SlowConsumer => 108,
            ErrorCode::UnknownCommand => 200,
            ErrorCode::MalformedRequest => 201,
            ErrorCode::InvalidArgument => 202,
            ErrorCode::AuthRequired => 300,
            ErrorCode::LoginFailed => 301,
            ErrorCode::PermissionDenied => 302,
            ErrorCode::LoginThrottled => 303,
            ErrorCode::NoSuchUser => 310,
            ErrorCode::UserExists => 311,
            ErrorCode::LastAdmin => 312,
            ErrorCode::NoSuchBucket => 400,
            ErrorCode::BucketExists => 401,
            ErrorCode::NoSuchHandler => 402,
            ErrorCode::HandlerError => 403,
            ErrorCode::LimitExceeded => 404,
            ErrorCode::ExecDisabled => 405,
            ErrorCode::Internal => 500,
            ErrorCode::StorageError => 501,
        }
    }

    /// The code for a wire number, if this version knows it.
    pub fn from_u16(n: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_u16() == n)
    }

    /// The symbolic name used in the spec and in CLI messages.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::ProtocolError => "PROTOCOL_ERROR",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::BadHandshake => "BAD_HANDSHAKE",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::HandshakeTimeout => "HANDSHAKE_TIMEOUT",
            ErrorCode::UserDeleted => "USER_DELETED",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::MalformedRequest => "MALFORMED_REQUEST",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::LoginFailed => "LOGIN_FAILED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::LoginThrottled => "LOGIN_THROTTLED",
            ErrorCode::NoSuchUser => "NO_SUCH_USER",
            ErrorCode::UserExists => "USER_EXISTS",
            ErrorCode::LastAdmin => "LAST_ADMIN",
            ErrorCode::NoSuchBucket => "NO_SUCH_BUCKET",
            ErrorCode::BucketExists => "BUCKET_EXISTS",
            ErrorCode::NoSuchHandler => "NO_SUCH_HANDLER",
            ErrorCode::HandlerError => "HANDLER_ERROR",
            ErrorCode::LimitExceeded => "LIMIT_EXCEEDED",
            ErrorCode::ExecDisabled => "EXEC_DISABLED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::StorageError => "STORAGE_ERROR",
        }
    }

    /// Whether the server closes the connection after sending this code.
    pub fn is_fatal(self) -> bool {
        (100..200).contains(&self.as_u16())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()), "duplicate {code}");
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
    }
}
