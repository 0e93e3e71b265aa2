//! The client's socket tasks: a writer that coalesces queued frames into few writes, and
//! a reader that hands each answer to the oldest waiting request.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::ClientError;
use crate::protocol::frame::check_frame;
use crate::protocol::{ClientHello, Response, ServerHello, Status, PROTOCOL_VERSION};

/// Largest answer the client accepts (the server never sends more than a JSON view).
const MAX_REPLY_FRAME: u32 = 256 * 1024 * 1024;
const WRITE_CHUNK: usize = 64 * 1024;

pub(super) struct Outgoing {
    pub id: u32,
    pub frame: Bytes,
    pub reply: oneshot::Sender<Result<Response, ClientError>>,
    /// The request's in-flight slot; held only to be released (dropped) when its
    /// answer arrives.
    pub _permit: OwnedSemaphorePermit,
}

/// Requests written and not yet answered, oldest first, and the connection's fate once
/// the reader has ended. Both sit under one lock, so a request is either queued before
/// the reader drains the queue or answered at once with the fate: none waits forever.
#[derive(Default)]
struct Pending {
    queue: VecDeque<Outgoing>,
    fate: Option<Fate>,
}

type Waiting = Arc<Mutex<Pending>>;

/// What a subscription receives: an output (JSON), or why it ended.
pub(super) type SubEvent = Result<Bytes, ClientError>;

/// Live subscriptions by id: the reader hands each PUSH to its subscription, waiting
/// while that subscription's queue is full (so a slow consumer slows the socket, and
/// the server disconnects it rather than buffering without bound).
pub(super) type Subscriptions = Arc<Mutex<HashMap<u32, mpsc::Sender<SubEvent>>>>;

/// Why the connection ended: the server's FATAL, another error, or a plain close.
enum Fate {
    Server { code: u16, message: String },
    Protocol(String),
    Closed,
}

impl Fate {
    fn new(failure: Option<ClientError>) -> Fate {
        match failure {
            Some(ClientError::Server { code, message }) => Fate::Server { code, message },
            Some(other) => Fate::Protocol(other.to_string()),
            None => Fate::Closed,
        }
    }

    fn error(&self) -> ClientError {
        match self {
            Fate::Server { code, message } => ClientError::Server {
                code: *code,
                message: message.clone(),
            },
            Fate::Protocol(m) => ClientError::Protocol(m.clone()),
            Fate::Closed => ClientError::Closed,
        }
    }
}

/// Handshakes, then spawns the reader and writer tasks.
pub(super) async fn start<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut socket: S,
) -> Result<(ServerHello, mpsc::Sender<Outgoing>, Subscriptions), ClientError> {
    let mut out = BytesMut::new();
    ClientHello::v1().encode(&mut out);
    socket.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let response = read_response(&mut socket, &mut buf)
        .await?
        .ok_or(ClientError::Closed)?;
    if let Some((code, message)) = response
        .failure()
        .map_err(|e| ClientError::Protocol(e.to_string()))?
    {
        return Err(ClientError::Server { code, message });
    }
    let hello = ServerHello::decode(response.payload).map_err(ClientError::Protocol)?;
    if hello.version != PROTOCOL_VERSION {
        return Err(ClientError::Protocol(format!(
            "server speaks protocol version {}, this client {PROTOCOL_VERSION}",
            hello.version
        )));
    }
    let (rd, wr) = tokio::io::split(socket);
    let (tx, rx) = mpsc::channel(256);
    let waiting: Waiting = Default::default();
    let subs: Subscriptions = Default::default();
    tokio::spawn(write_loop(wr, rx, waiting.clone()));
    tokio::spawn(read_loop(rd, buf, waiting, subs.clone()));
    Ok((hello, tx, subs))
}

async fn read_response(
    rd: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
) -> Result<Option<Response>, ClientError> {
    loop {
        match check_frame(buf, MAX_REPLY_FRAME) {
            Ok(Some(len)) => {
                let frame = buf.split_to(4 + len).freeze();
                let response = Response::decode(frame.slice(4..))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Ok(Some(response));
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        buf.reserve(WRITE_CHUNK);
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn write_loop<W: AsyncWrite>(
    mut wr: WriteHalf<W>,
    mut rx: mpsc::Receiver<Outgoing>,
    waiting: Waiting,
) {
    let mut out = BytesMut::with_capacity(WRITE_CHUNK);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(o) = next.take() {
            out.extend_from_slice(&o.frame);
            // Registered before the bytes leave, so the reader always finds it.
            let mut pending = waiting.lock();
            match &pending.fate {
                Some(fate) => {
                    let _ = o.reply.send(Err(fate.error()));
                    return;
                }
                None => pending.queue.push_back(o),
            }
            drop(pending);
            if out.len() < WRITE_CHUNK {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead>(
    mut rd: ReadHalf<R>,
    mut buf: BytesMut,
    waiting: Waiting,
    subs: Subscriptions,
) {
    let failure = loop {
        let response = match read_response(&mut rd, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        if response.status == Status::Fatal {
            let err = match response.failure() {
                Ok(Some((code, message))) => ClientError::Server { code, message },
                _ => ClientError::Protocol("malformed fatal answer".into()),
            };
            break Some(err);
        }
        if matches!(response.status, Status::Push | Status::End) {
            deliver(&subs, response).await;
            continue;
        }
        let Some(Outgoing { id, reply, .. }) = waiting.lock().queue.pop_front() else {
            break Some(ClientError::Protocol(format!(
                "unexpected answer for request {}",
                response.id
            )));
        };
        if id != response.id {
            let msg = format!(
                "answer for request {} arrived while {id} was expected",
                response.id
            );
            let _ = reply.send(Err(ClientError::Protocol(msg.clone())));
            break Some(ClientError::Protocol(msg));
        }
        let _ = reply.send(Ok(response));
    };
    // Everything still waiting, and everything queued later, fails with the fate.
    let fate = Fate::new(failure);
    let mut pending = waiting.lock();
    for Outgoing { reply, .. } in pending.queue.drain(..) {
        let _ = reply.send(Err(fate.error()));
    }
    let ended: Vec<_> = subs.lock().drain().map(|(_, tx)| tx).collect();
    for tx in ended {
        let _ = tx.try_send(Err(fate.error()));
    }
    pending.fate = Some(fate);
}

/// Hands a PUSH or END to its subscription; one nobody listens to any more is
/// forgotten.
async fn deliver(subs: &Subscriptions, response: Response) {
    let id = response.id;
    let end = response.status == Status::End;
    let tx = if end {
        subs.lock().remove(&id)
    } else {
        subs.lock().get(&id).cloned()
    };
    let Some(tx) = tx else { return };
    let event = match response.failure() {
        Ok(None) => Ok(response.payload),
        Ok(Some((code, message))) => Err(ClientError::Server { code, message }),
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    };
    if tx.send(event).await.is_err() {
        subs.lock().remove(&id);
    }
}
