//! Requests: `opcode:u8 request_id:u32be payload`, one layout per command.
//!
//! | op   | command | payload                                                  |
//! |------|---------|----------------------------------------------------------|
//! | 0x01 | PING    | any bytes, echoed back                                   |
//! | 0x02 | CREATE  | bucket:str16 handler:str16 config:blob32 options:blob32  |
//! | 0x03 | DROP    | bucket:str16                                             |
//! | 0x04 | LIST    | (empty)                                                  |
//! | 0x05 | SEND    | bucket:str16 count:u32be count × event:blob32            |
//! | 0x06 | VIEW    | bucket:str16 arg:opt(blob32)                             |
//! | 0x07 | DUMP    | bucket:str16                                             |
//! | 0x08 | INFO    | bucket:opt(str16)                                        |
//! | 0x09 | ALTER   | bucket:str16 options:blob32                              |
//! | 0x0a | RELOAD  | (empty)                                                  |
//! | 0x10 | LOGIN   | user:str16 password:str16                                |
//! | 0x11 | WHOAMI  | (empty)                                                  |
//! | 0x12 | USER_ADD | user:str16 password:str16                               |
//! | 0x13 | USER_DEL | user:str16                                              |
//! | 0x14 | USER_PASSWD | user:str16 password:str16                            |
//! | 0x15 | USER_LIST | (empty)                                                |
//! | 0x16 | USER_GRANT | user:str16 permission:str16 pattern:str16             |
//! | 0x17 | USER_REVOKE | user:str16 permission:str16 pattern:str16            |
//! | 0x20 | SUBSCRIBE | bucket:str16                                           |
//! | 0x21 | UNSUBSCRIBE | subscription:u32be                                   |

use bytes::{BufMut, Bytes, BytesMut};

use super::codes::ErrorCode;
use super::frame::{check_frame, write_frame, FRAME_HEADER_LEN};
use super::wire::{put_blob32, put_str16, Reader, WireError};

/// Opcode of PING.
pub const OP_PING: u8 = 0x01;
/// Opcode of CREATE.
pub const OP_CREATE: u8 = 0x02;
/// Opcode of DROP.
pub const OP_DROP: u8 = 0x03;
/// Opcode of LIST.
pub const OP_LIST: u8 = 0x04;
/// Opcode of SEND.
pub const OP_SEND: u8 = 0x05;
/// Opcode of VIEW.
pub const OP_VIEW: u8 = 0x06;
/// Opcode of DUMP.
pub const OP_DUMP: u8 = 0x07;
/// Opcode of INFO.
pub const OP_INFO: u8 = 0x08;
/// Opcode of ALTER.
pub const OP_ALTER: u8 = 0x09;
/// Opcode of RELOAD.
pub const OP_RELOAD: u8 = 0x0a;
/// Opcode of TAKE.
pub const OP_TAKE: u8 = 0x0b;
/// Opcode of RELEASE.
pub const OP_RELEASE: u8 = 0x0c;
/// Opcode of SUBSCRIBE.
pub const OP_SUBSCRIBE: u8 = 0x20;
/// Opcode of UNSUBSCRIBE.
pub const OP_UNSUBSCRIBE: u8 = 0x21;
/// Opcode of LOGIN.
pub const OP_LOGIN: u8 = 0x10;
/// Opcode of WHOAMI.
pub const OP_WHOAMI: u8 = 0x11;
/// Opcode of USER_ADD.
pub const OP_USER_ADD: u8 = 0x12;
/// Opcode of USER_DEL.
pub const OP_USER_DEL: u8 = 0x13;
/// Opcode of USER_PASSWD.
pub const OP_USER_PASSWD: u8 = 0x14;
/// Opcode of USER_LIST.
pub const OP_USER_LIST: u8 = 0x15;
/// Opcode of USER_GRANT.
pub const OP_USER_GRANT: u8 = 0x16;
/// Opcode of USER_REVOKE.
pub const OP_USER_REVOKE: u8 = 0x17;

/// A password: compared and encoded like a string, but never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The password text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Bytes before the payload: opcode and request id.
pub const REQUEST_HEADER_LEN: usize = 5;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client, echoed in the response.
    pub id: u32,
    /// What to do.
    pub command: Command,
}

/// The commands of bucketly v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Liveness check; the payload is echoed.
    Ping(Bytes),
    /// Create a bucket running `handler`.
    Create {
        /// Bucket name.
        bucket: String,
        /// Handler name.
        handler: String,
        /// Handler config, JSON text; empty means none (`nil` in Lua).
        config: Bytes,
        /// Bucket options, a JSON object; empty means `{}`.
        options: Bytes,
    },
    /// Drop a bucket and its state.
    Drop {
        /// Bucket name.
        bucket: String,
    },
    /// List buckets.
    List,
    /// Send a batch of events to one bucket.
    Send {
        /// Bucket name.
        bucket: String,
        /// The events.
        batch: SendBatch,
    },
    /// Read the aggregate.
    View {
        /// Bucket name.
        bucket: String,
        /// Optional argument passed to the handler's `view`.
        arg: Option<Bytes>,
    },
    /// Read the aggregate, then reset it.
    Dump {
        /// Bucket name.
        bucket: String,
    },
    /// The first phase of a two-phase dump: the bucket's pending take, made from the
    /// aggregate (which is reset) if there is none.
    Take {
        /// Bucket name.
        bucket: String,
    },
    /// The second phase: forget the pending take `take`, now safely stored elsewhere.
    Release {
        /// Bucket name.
        bucket: String,
        /// The take's id.
        take: u64,
    },
    /// Server counters, or one bucket's.
    Info {
        /// Bucket name, or none for the server.
        bucket: Option<String>,
    },
    /// Change a bucket's options (schedule and sinks), keeping its state.
    Alter {
        /// Bucket name.
        bucket: String,
        /// Changes: a JSON object; each key replaces the option, `null` removes it.
        options: Bytes,
    },
    /// Read the handler files again (admin).
    Reload,
    /// Receive a bucket's flush outputs on this connection, as PUSH frames carrying
    /// this request's id.
    Subscribe {
        /// Bucket name.
        bucket: String,
    },
    /// End a subscription of this connection.
    Unsubscribe {
        /// The SUBSCRIBE request's id.
        subscription: u32,
    },
    /// Log in; required before any command but PING.
    Login {
        /// User name.
        user: String,
        /// Password.
        password: Secret,
    },
    /// The session's user and grants.
    Whoami,
    /// Create a user (admin).
    UserAdd {
        /// User name.
        user: String,
        /// Initial password.
        password: Secret,
    },
    /// Delete a user and close its connections (admin).
    UserDel {
        /// User name.
        user: String,
    },
    /// Set a password (one's own, or anyone's as admin).
    UserPasswd {
        /// User name.
        user: String,
        /// New password.
        password: Secret,
    },
    /// List users and grants (admin).
    UserList,
    /// Add a grant (admin).
    UserGrant {
        /// User name.
        user: String,
        /// Permission name.
        permission: String,
        /// Bucket-name glob.
        pattern: String,
    },
    /// Remove a grant (admin).
    UserRevoke {
        /// User name.
        user: String,
        /// Permission name.
        permission: String,
        /// Bucket-name glob.
        pattern: String,
    },
}

impl Command {
    /// The opcode on the wire.
    pub fn opcode(&self) -> u8 {
        match self {
            Command::Ping(_) => OP_PING,
            Command::Create { .. } => OP_CREATE,
            Command::Drop { .. } => OP_DROP,
            Command::List => OP_LIST,
            Command::Send { .. } => OP_SEND,
            Command::View { .. } => OP_VIEW,
            Command::Dump { .. } => OP_DUMP,
            Command::Take { .. } => OP_TAKE,
            Command::Release { .. } => OP_RELEASE,
            Command::Info { .. } => OP_INFO,
            Command::Alter { .. } => OP_ALTER,
            Command::Reload => OP_RELOAD,
            Command::Subscribe { .. } => OP_SUBSCRIBE,
            Command::Unsubscribe { .. } => OP_UNSUBSCRIBE,
            Command::Login { .. } => OP_LOGIN,
            Command::Whoami => OP_WHOAMI,
            Command::UserAdd { .. } => OP_USER_ADD,
            Command::UserDel { .. } => OP_USER_DEL,
            Command::UserPasswd { .. } => OP_USER_PASSWD,
            Command::UserList => OP_USER_LIST,
            Command::UserGrant { .. } => OP_USER_GRANT,
            Command::UserRevoke { .. } => OP_USER_REVOKE,
        }
    }

    /// The command's name, for logs and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping(_) => "PING",
            Command::Create { .. } => "CREATE",
            Command::Drop { .. } => "DROP",
            Command::List => "LIST",
            Command::Send { .. } => "SEND",
            Command::View { .. } => "VIEW",
            Command::Dump { .. } => "DUMP",
            Command::Take { .. } => "TAKE",
            Command::Release { .. } => "RELEASE",
            Command::Info { .. } => "INFO",
            Command::Alter { .. } => "ALTER",
            Command::Reload => "RELOAD",
            Command::Subscribe { .. } => "SUBSCRIBE",
            Command::Unsubscribe { .. } => "UNSUBSCRIBE",
            Command::Login { .. } => "LOGIN",
            Command::Whoami => "WHOAMI",
            Command::UserAdd { .. } => "USER_ADD",
            Command::UserDel { .. } => "USER_DEL",
            Command::UserPasswd { .. } => "USER_PASSWD",
            Command::UserList => "USER_LIST",
            Command::UserGrant { .. } => "USER_GRANT",
            Command::UserRevoke { .. } => "USER_REVOKE",
        }
    }
}

/// The events of one SEND frame: `count` then `count` blob32s, validated once at decode
/// time and then iterated without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendBatch {
    count: u32,
    /// Exactly `count` blob32 fields, nothing more.
    data: Bytes,
}

impl SendBatch {
    /// Builds a batch from events (copies them once).
    pub fn from_events<E: AsRef<[u8]>>(events: &[E]) -> SendBatch {
        let len: usize = events.iter().map(|e| 4 + e.as_ref().len()).sum();
        let mut data = BytesMut::with_capacity(len);
        for e in events {
            put_blob32(&mut data, e.as_ref());
        }
        SendBatch {
            count: events.len() as u32,
            data: data.freeze(),
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// Whether the batch has no events.
    pub fn is_empty(&self) -> bool {
        self.view().is_empty()
    }

    /// Bytes the batch occupies on the wire (without bucket and count).
    pub fn wire_len(&self) -> usize {
        self.view().wire_len()
    }

    /// The batch as stored in a durable log record: `count:u32be` then the events, the
    /// wire layout after the bucket name.
    pub fn to_record(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        self.write_record(&mut v);
        v
    }

    /// Appends what [`SendBatch::to_record`] returns to `out`.
    pub fn write_record(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Reads what [`SendBatch::to_record`] wrote.
    ///
    /// # Errors
    /// [`WireError`] if the bytes do not match the layout.
    pub fn from_record(bytes: &[u8]) -> Result<SendBatch, WireError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        SendBatch::decode(&mut r)
    }

    /// The events in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.view().iter()
    }

    /// The batch, borrowed.
    pub fn view(&self) -> SendView<'_> {
        SendView {
            count: self.count,
            data: &self.data,
        }
    }

    /// The batch `frame` found in `run` (which [`send_frame_to`] read it from).
    pub(crate) fn of_frame(run: &Bytes, frame: &SendFrame) -> SendBatch {
        match frame.events.end <= run.len() {
            true => SendBatch::from_parts(frame.count, run.slice(frame.events.clone())),
            false => SendBatch::from_parts(0, Bytes::new()),
        }
    }

    /// A batch of `count` events whose bytes the caller already validated.
    pub(crate) fn from_parts(count: u32, data: Bytes) -> SendBatch {
        SendBatch { count, data }
    }

    /// The event count and the events' bytes (what [`SendBatch::from_parts`] takes).
    pub(crate) fn into_parts(self) -> (u32, Bytes) {
        (self.count, self.data)
    }

    fn decode(r: &mut Reader) -> Result<SendBatch, WireError> {
        let count = r.u32("event count")?;
        let data = r.rest();
        SendBatch::fits(count, &data)?;
        Ok(SendBatch { count, data })
    }

    /// Succeeds if `count` events laid out as blob32s fill `data` exactly.
    fn fits(count: u32, data: &[u8]) -> Result<(), WireError> {
        let mut pos = 0usize;
        for _ in 0..count {
            let header = data
                .get(pos..pos + 4)
                .ok_or(WireError::Truncated("event"))?;
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            pos = len
                .checked_add(4)
                .and_then(|n| pos.checked_add(n))
                .filter(|&p| p <= data.len())
                .ok_or(WireError::Truncated("event"))?;
        }
        if pos != data.len() {
            return Err(WireError::Trailing(data.len() - pos));
        }
        Ok(())
    }
}

/// The events of one SEND frame, borrowed from the buffer they were read into: what a
/// [`SendBatch`] holds, without owning (or counting a reference to) the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendView<'a> {
    count: u32,
    /// Exactly `count` blob32 fields, nothing more.
    data: &'a [u8],
}

impl<'a> SendView<'a> {
    /// The events of `frame` in `buf`, the buffer [`send_frame_to`] read it from.
    pub fn of_frame(buf: &'a [u8], frame: &SendFrame) -> SendView<'a> {
        SendView {
            count: frame.count,
            data: buf.get(frame.events.clone()).unwrap_or_default(),
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch has no events.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the events occupy on the wire (without bucket and count).
    pub fn wire_len(&self) -> usize {
        self.data.len()
    }

    /// The events in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut rest: &'a [u8] = self.data;
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            // Invariant from `decode`/`from_events`/`send_frame_to`: every length fits.
            let (event, tail) = tail.split_at(len.min(tail.len()));
            rest = tail;
            Some(event)
        })
    }

    /// Appends the events alone (without the count) to `out`: to join batches into one
    /// record.
    pub fn write_events(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.data);
    }
}

/// Where [`send_frame_to`] found a SEND frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFrame {
    /// The request id.
    pub id: u32,
    /// The number of events.
    pub count: u32,
    /// Where the events lie in the buffer.
    pub events: std::ops::Range<usize>,
    /// The length of the whole frame, its header included.
    pub len: usize,
}

/// The frame at the start of `buf`, if it is complete (and at most `max` bytes long) and
/// a well-formed SEND to `bucket`: what [`Request::decode`] would read from its body,
/// found without copying anything, for a server that gathers consecutive SENDs to one
/// bucket. `None` for anything else, which the framing and [`Request::decode`] then
/// read and, if it is wrong, report.
pub fn send_frame_to(buf: &[u8], bucket: &str, max: u32) -> Option<SendFrame> {
    let len = check_frame(buf, max).ok()??;
    let body = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len)?;
    let (id, count, at) = send_header_to(body, bucket)?;
    SendBatch::fits(count, &body[at..]).ok()?;
    Some(SendFrame {
        id,
        count,
        events: FRAME_HEADER_LEN + at..FRAME_HEADER_LEN + len,
        len: FRAME_HEADER_LEN + len,
    })
}

/// The id and event count of a SEND body to `bucket`, and where its events start.
fn send_header_to(body: &[u8], bucket: &str) -> Option<(u32, u32, usize)> {
    let (header, rest) = body.split_first_chunk::<REQUEST_HEADER_LEN>()?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let len = u16::from_be_bytes(*len) as usize;
    if header[0] != OP_SEND || rest.get(..len)? != bucket.as_bytes() {
        return None;
    }
    let count = rest.get(len..len + 4)?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
    let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    Some((id, count, REQUEST_HEADER_LEN + 2 + len + 4))
}

/// Appends a SEND frame for `events` to `out` without building a [`SendBatch`]: the
/// same bytes as [`Request::encode`] of `Command::Send`, for callers that generate
/// events on the fly (the load generator).
pub fn encode_send<'a>(
    out: &mut BytesMut,
    id: u32,
    bucket: &str,
    events: impl ExactSizeIterator<Item = &'a [u8]>,
) {
    write_frame(out, |b| {
        b.put_u8(OP_SEND);
        b.put_u32(id);
        put_str16(b, bucket);
        b.put_u32(events.len() as u32);
        for e in events {
            put_blob32(b, e);
        }
    });
}

/// A request that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The request id, when the body was long enough to carry one. Without it the
    /// framing is unusable and the error is FATAL.
    pub id: Option<u32>,
    /// `UNKNOWN_COMMAND`, `MALFORMED_REQUEST` or `PROTOCOL_ERROR`.
    pub code: ErrorCode,
    /// What is wrong, for the peer.
    pub message: String,
}

impl Request {
    /// Reads a request body (the frame without its length prefix).
    ///
    /// # Errors
    /// [`RequestError`]: unknown opcode, or a payload that does not match its layout.
    pub fn decode(body: Bytes) -> Result<Request, RequestError> {
        if body.len() < REQUEST_HEADER_LEN {
            return Err(RequestError {
                id: None,
                code: ErrorCode::ProtocolError,
                message: format!(
                    "request body of {} bytes is shorter than its {REQUEST_HEADER_LEN}-byte header",
                    body.len()
                ),
            });
        }
        let opcode = body[0];
        let id = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        let mut r = Reader::new(body.slice(REQUEST_HEADER_LEN..));
        let malformed = |e: WireError| RequestError {
            id: Some(id),
            code: ErrorCode::MalformedRequest,
            message: format!("malformed request (opcode 0x{opcode:02x}): {e}"),
        };
        let command = match opcode {
            OP_PING => Command::Ping(r.rest()),
            OP_CREATE => Command::Create {
                bucket: r.str16("bucket").map_err(malformed)?,
                handler: r.str16("handler").map_err(malformed)?,
                config: r.blob32("config").map_err(malformed)?,
                options: r.blob32("options").map_err(malformed)?,
            },
            OP_DROP => Command::Drop {
                bucket: r.str16("bucket").map_err(malformed)?,
            },
            OP_LIST => Command::List,
            OP_SEND => Command::Send {
                bucket: r.str16("bucket").map_err(malformed)?,
                batch: SendBatch::decode(&mut r).map_err(malformed)?,
            },
            OP_VIEW => {
                let bucket = r.str16("bucket").map_err(malformed)?;
                let arg = match r.present("arg").map_err(malformed)? {
                    true => Some(r.blob32("arg").map_err(malformed)?),
                    false => None,
                };
                Command::View { bucket, arg }
            }
            OP_DUMP => Command::Dump {
                bucket: r.str16("bucket").map_err(malformed)?,
            },
            OP_TAKE => Command::Take {
                bucket: r.str16("bucket").map_err(malformed)?,
            },
            OP_RELEASE => Command::Release {
                bucket: r.str16("bucket").map_err(malformed)?,
                take: r.u64("take").map_err(malformed)?,
            },
            OP_INFO => {
                let bucket = match r.present("bucket").map_err(malformed)? {
                    true => Some(r.str16("bucket").map_err(malformed)?),
                    false => None,
                };
                Command::Info { bucket }
            }
            OP_ALTER => Command::Alter {
                bucket: r.str16("bucket").map_err(malformed)?,
                options: r.blob32("options").map_err(malformed)?,
            },
            OP_RELOAD => Command::Reload,
            OP_SUBSCRIBE => Command::Subscribe {
                bucket: r.str16("bucket").map_err(malformed)?,
            },
            OP_UNSUBSCRIBE => Command::Unsubscribe {
                subscription: r.u32("subscription").map_err(malformed)?,
            },
            OP_LOGIN => Command::Login {
                user: r.str16("user").map_err(malformed)?,
                password: Secret(r.str16("password").map_err(malformed)?),
            },
            OP_WHOAMI => Command::Whoami,
            OP_USER_ADD => Command::UserAdd {
                user: r.str16("user").map_err(malformed)?,
                password: Secret(r.str16("password").map_err(malformed)?),
            },
            OP_USER_DEL => Command::UserDel {
                user: r.str16("user").map_err(malformed)?,
            },
            OP_USER_PASSWD => Command::UserPasswd {
                user: r.str16("user").map_err(malformed)?,
                password: Secret(r.str16("password").map_err(malformed)?),
            },
            OP_USER_LIST => Command::UserList,
            OP_USER_GRANT | OP_USER_REVOKE => {
                let user = r.str16("user").map_err(malformed)?;
                let permission = r.str16("permission").map_err(malformed)?;
                let pattern = r.str16("pattern").map_err(malformed)?;
                if opcode == OP_USER_GRANT {
                    Command::UserGrant {
                        user,
                        permission,
                        pattern,
                    }
                } else {
                    Command::UserRevoke {
                        user,
                        permission,
                        pattern,
                    }
                }
            }
            _ => {
                return Err(RequestError {
                    id: Some(id),
                    code: ErrorCode::UnknownCommand,
                    message: format!("unknown command opcode 0x{opcode:02x}"),
                })
            }
        };
        r.finish().map_err(malformed)?;
        Ok(Request { id, command })
    }

    /// Appends this request as a frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        write_frame(out, |b| {
            b.put_u8(self.command.opcode());
            b.put_u32(self.id);
            match &self.command {
                Command::Ping(payload) => b.extend_from_slice(payload),
                Command::Create {
                    bucket,
                    handler,
                    config,
                    options,
                } => {
                    put_str16(b, bucket);
                    put_str16(b, handler);
                    put_blob32(b, config);
                    put_blob32(b, options);
                }
                Command::Drop { bucket }
                | Command::Dump { bucket }
                | Command::Take { bucket }
                | Command::Subscribe { bucket } => put_str16(b, bucket),
                Command::Release { bucket, take } => {
                    put_str16(b, bucket);
                    b.put_u64(*take);
                }
                Command::List | Command::Whoami | Command::UserList | Command::Reload => {}
                Command::Alter { bucket, options } => {
                    put_str16(b, bucket);
                    put_blob32(b, options);
                }
                Command::Unsubscribe { subscription } => b.put_u32(*subscription),
                Command::Login { user, password }
                | Command::UserAdd { user, password }
                | Command::UserPasswd { user, password } => {
                    put_str16(b, user);
                    put_str16(b, password.expose());
                }
                Command::UserDel { user } => put_str16(b, user),
                Command::UserGrant {
                    user,
                    permission,
                    pattern,
                }
                | Command::UserRevoke {
                    user,
                    permission,
                    pattern,
                } => {
                    put_str16(b, user);
                    put_str16(b, permission);
                    put_str16(b, pattern);
                }
                Command::Send { bucket, batch } => {
                    put_str16(b, bucket);
                    b.put_u32(batch.count);
                    b.extend_from_slice(&batch.data);
                }
                Command::View { bucket, arg } => {
                    put_str16(b, bucket);
                    match arg {
                        Some(arg) => {
                            b.put_u8(1);
                            put_blob32(b, arg);
                        }
                        None => b.put_u8(0),
                    }
                }
                Command::Info { bucket } => match bucket {
                    Some(bucket) => {
                        b.put_u8(1);
                        put_str16(b, bucket);
                    }
                    None => b.put_u8(0),
                },
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(command: Command) {
        let req = Request { id: 42, command };
        let mut out = BytesMut::new();
        req.encode(&mut out);
        let body = out.freeze().slice(4..);
        assert_eq!(Request::decode(body), Ok(req));
    }

    #[test]
    fn encode_send_matches_request_encode() {
        let events: [&[u8]; 3] = [b"a", b"", b"ccc"];
        let mut expected = BytesMut::new();
        Request {
            id: 7,
            command: Command::Send {
                bucket: "b".into(),
                batch: SendBatch::from_events(&events),
            },
        }
        .encode(&mut expected);
        let mut out = BytesMut::new();
        encode_send(&mut out, 7, "b", events.into_iter());
        assert_eq!(out, expected);
    }

    #[test]
    fn every_command_round_trips() {
        round_trip(Command::Ping(Bytes::from_static(b"hi")));
        round_trip(Command::Create {
            bucket: "b".into(),
            handler: "counter".into(),
            config: Bytes::from_static(b"{}"),
            options: Bytes::new(),
        });
        round_trip(Command::Drop { bucket: "b".into() });
        round_trip(Command::List);
        round_trip(Command::Send {
            bucket: "b".into(),
            batch: SendBatch::from_events(&["a", "", "ccc"]),
        });
        round_trip(Command::View {
            bucket: "b".into(),
            arg: Some(Bytes::from_static(b"k")),
        });
        round_trip(Command::View {
            bucket: "b".into(),
            arg: None,
        });
        round_trip(Command::Dump { bucket: "b".into() });
        round_trip(Command::Take { bucket: "b".into() });
        round_trip(Command::Release {
            bucket: "b".into(),
            take: u64::MAX - 1,
        });
        round_trip(Command::Alter {
            bucket: "b".into(),
            options: Bytes::from_static(b"{\"every\":1}"),
        });
        round_trip(Command::Reload);
        round_trip(Command::Subscribe { bucket: "b".into() });
        round_trip(Command::Unsubscribe { subscription: 7 });
        round_trip(Command::Info { bucket: None });
        round_trip(Command::Info {
            bucket: Some("b".into()),
        });
        let secret = || Secret("pw".into());
        round_trip(Command::Login {
            user: "u".into(),
            password: secret(),
        });
        round_trip(Command::Whoami);
        round_trip(Command::UserAdd {
            user: "u".into(),
            password: secret(),
        });
        round_trip(Command::UserDel { user: "u".into() });
        round_trip(Command::UserPasswd {
            user: "u".into(),
            password: secret(),
        });
        round_trip(Command::UserList);
        let (user, permission, pattern) = ("u".to_string(), "send".to_string(), "a.*".to_string());
        round_trip(Command::UserGrant {
            user: user.clone(),
            permission: permission.clone(),
            pattern: pattern.clone(),
        });
        round_trip(Command::UserRevoke {
            user,
            permission,
            pattern,
        });
    }

    #[test]
    fn passwords_never_appear_in_debug_output() {
        let c = Command::Login {
            user: "u".into(),
            password: Secret("hunter2".into()),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn send_batch_with_a_lying_count_is_malformed() {
        // count says 2, one event present
        let body =
            Bytes::from_static(b"\x05\x00\x00\x00\x01\x00\x01b\x00\x00\x00\x02\x00\x00\x00\x01a");
        let err = Request::decode(body).expect_err("truncated");
        assert_eq!((err.id, err.code), (Some(1), ErrorCode::MalformedRequest));
    }

    #[test]
    fn unknown_opcode_keeps_the_request_id() {
        let err =
            Request::decode(Bytes::from_static(b"\x7f\x00\x00\x00\x09")).expect_err("unknown");
        assert_eq!((err.id, err.code), (Some(9), ErrorCode::UnknownCommand));
    }
}
