//! The umbrella error of the engine: every failure a request can meet, each mapped to a
//! wire code in exactly one place ([`Error::code`]).

use crate::protocol::ErrorCode;

/// A request-level failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No bucket of that name.
    #[error("no bucket named {0:?}")]
    NoSuchBucket(String),
    /// The bucket exists.
    #[error("bucket {0:?} exists already")]
    BucketExists(String),
    /// No handler of that name.
    #[error("no handler named {0:?}")]
    NoSuchHandler(String),
    /// A well-formed request with a bad value.
    #[error("{0}")]
    InvalidArgument(String),
    /// The handler's Lua code failed.
    #[error("handler error: {0}")]
    Handler(String),
    /// A server limit.
    #[error("{0}")]
    LimitExceeded(String),
    /// An exec sink on a daemon started without `--allow-exec`.
    #[error(
        "exec sinks are disabled: start bucketlyd with --allow-exec to run commands at flushes"
    )]
    ExecDisabled,
    /// The database file failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// The server is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A bug or an unexpected condition.
    #[error("internal error: {0}")]
    Internal(String),
    /// A command other than PING or LOGIN before LOGIN.
    #[error("log in first: send LOGIN with a user name and password")]
    AuthRequired,
    /// Wrong user name or password (deliberately not saying which).
    #[error("invalid user name or password")]
    LoginFailed,
    /// Too many failed logins from this address or for this user.
    #[error("too many failed logins; retry in {0} s")]
    LoginThrottled(u64),
    /// The session's user lacks a permission.
    #[error("user {user:?} lacks permission {permission}{}", bucket.as_ref().map(|b| format!(" on bucket {b:?}")).unwrap_or_default())]
    PermissionDenied {
        /// Who asked.
        user: String,
        /// What was needed.
        permission: crate::auth::Permission,
        /// On which bucket, if any.
        bucket: Option<String>,
    },
    /// No user of that name.
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    /// The user exists.
    #[error("user {0:?} exists already")]
    UserExists(String),
    /// The change would leave no admin.
    #[error("user {0:?} is the last admin: grant admin to another user first")]
    LastAdmin(String),
}

impl Error {
    /// The wire code for this error; the only place that mapping lives.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NoSuchBucket(_) => ErrorCode::NoSuchBucket,
            Error::BucketExists(_) => ErrorCode::BucketExists,
            Error::NoSuchHandler(_) => ErrorCode::NoSuchHandler,
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::Handler(_) => ErrorCode::HandlerError,
            Error::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Error::ExecDisabled => ErrorCode::ExecDisabled,
            Error::Storage(_) => ErrorCode::StorageError,
            // Request-level: the connection may stay; the listener sends the FATAL one.
            Error::ShuttingDown => ErrorCode::Internal,
            Error::Internal(_) => ErrorCode::Internal,
            Error::AuthRequired => ErrorCode::AuthRequired,
            Error::LoginFailed => ErrorCode::LoginFailed,
            Error::LoginThrottled(_) => ErrorCode::LoginThrottled,
            Error::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            Error::NoSuchUser(_) => ErrorCode::NoSuchUser,
            Error::UserExists(_) => ErrorCode::UserExists,
            Error::LastAdmin(_) => ErrorCode::LastAdmin,
        }
    }
}
