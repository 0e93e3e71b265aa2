//! One client connection: handshake, then two halves.
//!
//! ```text
//!  socket ─read─▶ reader: decode every buffered frame ─▶ route ─▶ pending FIFO (bounded)
//!                                                                      │
//!  socket ◀─write─ writer: answers in request order, one flush per batch ◀┘
//!                      ▲
//!                      └── pushes of this connection's subscriptions (bounded queue)
//! ```
//!
//! Pushes are written between answers, never before the OK of their SUBSCRIBE nor
//! after the OK of their UNSUBSCRIBE.
//!
//! The reader never waits for an answer, so a client can pipeline; it waits only when
//! the FIFO, the in-flight byte budget or a bucket mailbox is full, and that stops it
//! reading the socket (back-pressure to the peer). Framing errors answer FATAL and close;
//! request errors answer ERROR and the connection stays.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::budget::{Budget, InFlight};
use super::dispatch::{ConnState, Pending, Services};
use super::group::{SendGroup, Spare};

use crate::auth::Permission;
use crate::auth::Session;
use crate::config::{Config, HANDSHAKE_TIMEOUT_SECS};
use crate::engine::{push_channel, Push, PushKind, PushStream, PUSH_QUEUE};
use crate::engine::{Applied, BucketMsg, EncodedAnswers};
use crate::protocol::frame::check_frame;
use crate::protocol::handshake::{not_a_hello_message, FLAG_LOGIN_REQUIRED, MAX_HELLO_LEN};
use crate::protocol::{
    ClientHello, Command, ErrorCode, FrameError, Request, Response, SendBatch, ServerHello, Status,
};

/// Per-connection limits, copied from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    max_frame: u32,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Limits {
            max_frame: c.max_frame,
            max_in_flight: c.max_in_flight.max(1),
            max_in_flight_bytes: c.max_in_flight_bytes.clamp(1, Semaphore::MAX_PERMITS),
        }
    }
}

/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// Output flushed once this much is buffered, even if more answers are ready.
const WRITE_CHUNK: usize = 64 * 1024;
/// After a FATAL answer, input is read and discarded for at most this long (or this many
/// bytes) so that closing does not reset the connection before the peer reads it.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 16 * 1024 * 1024;
/// A write that makes no progress for this long means the peer stopped reading (a slow
/// consumer): the connection is closed and the answers it was owed are dropped. This
/// bounds how long pending output is held.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended, for the log.
#[derive(Debug)]
pub(crate) enum CloseReason {
    PeerClosed,
    Shutdown,
    Fatal(ErrorCode),
    SlowConsumer,
    Tls(String),
    Io(std::io::Error),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => write!(f, "peer closed"),
            CloseReason::Shutdown => write!(f, "server shutdown"),
            CloseReason::Fatal(code) => write!(f, "protocol violation: {code}"),
            CloseReason::SlowConsumer => write!(
                f,
                "peer stopped reading its answers (slow consumer) or the write failed"
            ),
            CloseReason::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            CloseReason::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

/// A pending answer and the in-flight budget its requests hold: their bytes and their
/// number (a slot answers several consecutive SENDs read together).
struct Slot {
    pending: Pending,
    _budget: Option<Budget>,
}

/// A connection's byte stream: TCP, or TLS over TCP.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

pub(crate) async fn serve<S: Stream>(
    mut socket: S,
    peer: IpAddr,
    services: Services,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> CloseReason {
    let engine = services.engine.clone();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let handshake = tokio::time::timeout(
        Duration::from_secs(HANDSHAKE_TIMEOUT_SECS),
        handshake(&mut socket, &mut buf, limits),
    );
    let hello = tokio::select! {
        r = handshake => r.unwrap_or(Err(HandshakeError::Fatal(ErrorCode::HandshakeTimeout,
            format!("no handshake within {HANDSHAKE_TIMEOUT_SECS}s")))),
        _ = stop.changed() => Err(HandshakeError::Fatal(ErrorCode::ShuttingDown, "the server is shutting down".into())),
    };
    let mut out = BytesMut::new();
    match hello {
        Ok(hello) => Response::ok(0, hello.payload()).encode(&mut out),
        Err(HandshakeError::Io(reason)) => return reason,
        Err(HandshakeError::Fatal(code, msg)) => {
            if code != ErrorCode::ShuttingDown {
                engine.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            close_with(socket, Response::error(0, code, &msg)).await;
            return CloseReason::Fatal(code);
        }
    }
    if let Err(e) = socket.write_all(&out).await {
        return CloseReason::Io(e);
    }
    let (rd, wr) = tokio::io::split(socket);
    let (tx, rx) = mpsc::channel(limits.max_in_flight);
    let (sink, pushes) = push_channel();
    // Aborted if this task is (after the shutdown grace), so the socket closes.
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(wr, rx, pushes)));
    let mut reader = Reader {
        rd,
        buf,
        services,
        conn: ConnState {
            session: None,
            sink,
            subscriptions: Default::default(),
        },
        peer,
        limits,
        tx,
        in_flight: InFlight::new(limits.max_in_flight, limits.max_in_flight_bytes),
        group: None,
        spare: Spare::default(),
    };
    let reason = reader.run(&mut stop).await;
    if let CloseReason::Fatal(_) = reason {
        engine.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
    let Reader { mut rd, tx, .. } = reader;
    drop(tx);
    // The writer answers everything queued, then closes its half.
    let _ = (&mut writer.0).await;
    if matches!(reason, CloseReason::Fatal(_) | CloseReason::Shutdown) {
        linger(&mut rd).await;
    }
    reason
}

/// Sends one last (FATAL) answer on a socket that has no writer task, then closes it
/// without resetting: used for handshake failures and refused connections.
pub(crate) async fn close_with<S: Stream>(socket: S, last: Response) {
    let mut out = BytesMut::new();
    last.encode(&mut out);
    let (mut rd, mut wr) = tokio::io::split(socket);
    if tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out))
        .await
        .is_ok()
    {
        let _ = wr.shutdown().await;
        linger(&mut rd).await;
    }
}

/// Completes when the session's user is deleted; never without a session.
async fn revoked(session: &mut Option<Session>) {
    match session {
        Some(s) => s.revoked().await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum HandshakeError {
    Fatal(ErrorCode, String),
    Io(CloseReason),
}

async fn handshake<S: Stream>(
    socket: &mut S,
    buf: &mut BytesMut,
    limits: Limits,
) -> Result<ServerHello, HandshakeError> {
    let body_len = loop {
        match check_frame(buf, MAX_HELLO_LEN) {
            Ok(Some(len)) => break len,
            Ok(None) => {}
            Err(_) => {
                return Err(HandshakeError::Fatal(
                    ErrorCode::BadHandshake,
                    not_a_hello_message(buf),
                ))
            }
        }
        match socket.read_buf(buf).await {
            Ok(0) => return Err(HandshakeError::Io(CloseReason::PeerClosed)),
            Ok(_) => {}
            Err(e) => return Err(HandshakeError::Io(CloseReason::Io(e))),
        }
    };
    let frame = buf.split_to(4 + body_len);
    ClientHello::decode(&frame[4..]).map_err(|(code, msg)| HandshakeError::Fatal(code, msg))?;
    Ok(ServerHello {
        version: crate::protocol::PROTOCOL_VERSION,
        flags: FLAG_LOGIN_REQUIRED,
        max_frame: limits.max_frame,
        server: format!("bucketlyd {}", env!("CARGO_PKG_VERSION")),
    })
}

/// Reads and discards input for a short, bounded while, so the peer can read our last
/// frame before the socket closes (closing with unread input would reset it).
async fn linger(rd: &mut (impl AsyncReadExt + Unpin)) {
    let mut scratch = vec![0u8; 64 * 1024];
    let mut total = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while total < LINGER_BYTES {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

struct Reader<S> {
    rd: ReadHalf<S>,
    buf: BytesMut,
    services: Services,
    conn: ConnState,
    peer: IpAddr,
    limits: Limits,
    tx: mpsc::Sender<Slot>,
    in_flight: Arc<InFlight>,
    group: Option<SendGroup>,
    /// An emptied group's vectors, kept for the next group.
    spare: Spare,
}

impl<S: Stream> Reader<S> {
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> CloseReason {
        loop {
            // Route every complete frame already buffered before reading again.
            loop {
                // The SENDs that follow a routed one to the same bucket join its group
                // straight from the buffer (`SendGroup::gather`). That first SEND was
                // routed, its user and permission checked, after the read that brought
                // it, and nothing was awaited since (`route` posts another bucket's
                // group before its checks). These came in the same read (a group is
                // posted before every read), so that check covers them, as the spec
                // allows (protocol-spec/PROTOCOL.md §6).
                let (max_frame, max_cost) =
                    (self.limits.max_frame, self.limits.max_in_flight_bytes);
                let gathered = (self.group.as_mut())
                    .and_then(|g| g.gather(&mut self.buf, max_frame, max_cost));
                if let Some(full) = gathered {
                    if full && !self.flush_group().await {
                        return CloseReason::PeerClosed;
                    }
                    continue;
                }
                match check_frame(&self.buf, self.limits.max_frame) {
                    Ok(Some(len)) => {
                        let mut body = self.buf.split_to(4 + len).freeze();
                        body.advance(4);
                        if let Some(reason) = self.route(body).await {
                            return reason;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let code = match e {
                            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                            FrameError::Empty => ErrorCode::ProtocolError,
                        };
                        self.answer(Response::error(0, code, &e.to_string()), None)
                            .await;
                        return CloseReason::Fatal(code);
                    }
                }
            }
            // Nothing more buffered: post what was gathered before waiting for input.
            if !self.flush_group().await {
                return CloseReason::PeerClosed;
            }
            // Grow towards the announced frame (validated above) no faster than bytes
            // arrive: at most doubling, so a bare header cannot make us reserve max_frame.
            let wanted = match self.buf.first_chunk::<4>() {
                Some(h) => (4 + u32::from_be_bytes(*h) as usize).saturating_sub(self.buf.len()),
                None => 4,
            };
            self.buf
                .reserve(wanted.min(READ_CHUNK.max(self.buf.len())).max(1));
            tokio::select! {
                read = self.rd.read_buf(&mut self.buf) => match read {
                    Ok(0) => return CloseReason::PeerClosed,
                    Ok(_) => self.services.spin.touch(),
                    Err(e) => return CloseReason::Io(e),
                },
                _ = stop.changed() => {
                    let msg = "the server is shutting down";
                    self.answer(Response::error(0, ErrorCode::ShuttingDown, msg), None).await;
                    return CloseReason::Shutdown;
                }
                // The writer gave up (slow consumer or write error): stop reading too.
                _ = self.tx.closed() => return CloseReason::SlowConsumer,
                _ = revoked(&mut self.conn.session) => return self.user_deleted().await,
            }
        }
    }

    /// The session's user was deleted: a FATAL answer, then the connection closes.
    async fn user_deleted(&mut self) -> CloseReason {
        let msg = "this connection's user was deleted";
        self.answer(Response::error(0, ErrorCode::UserDeleted, msg), None)
            .await;
        CloseReason::Fatal(ErrorCode::UserDeleted)
    }

    /// Queues an answer after the SENDs gathered before it; false if the writer is gone
    /// (the socket failed).
    async fn answer(&mut self, response: Response, budget: Option<Budget>) -> bool {
        self.queue(Pending::Ready(response), budget).await
    }

    /// Queues a pending answer after the SENDs gathered before it.
    async fn queue(&mut self, pending: Pending, budget: Option<Budget>) -> bool {
        if !self.flush_group().await {
            return false;
        }
        let slot = Slot {
            pending,
            _budget: budget,
        };
        self.tx.send(slot).await.is_ok()
    }

    /// Takes the request's share of the in-flight budget, waiting while it is spent. The
    /// gathered SENDs hold budget too, so they are posted before any wait (else they
    /// would wait for themselves).
    async fn acquire(&mut self, cost: u32) -> Option<Budget> {
        if let Some(budget) = self.in_flight.try_take(cost) {
            return Some(budget);
        }
        if !self.flush_group().await {
            return None;
        }
        Some(self.in_flight.take(cost).await)
    }

    /// Adds a SEND to the group, posting the group first if it is for another bucket
    /// and after if it is full.
    async fn gather(
        &mut self,
        id: u32,
        bucket: String,
        batch: SendBatch,
        budget: Option<Budget>,
    ) -> bool {
        if self.group.as_ref().is_some_and(|g| g.bucket != bucket) && !self.flush_group().await {
            return false;
        }
        let group = self
            .group
            .get_or_insert_with(|| SendGroup::new(bucket, std::mem::take(&mut self.spare)));
        if group.add(id, batch, budget) {
            return self.flush_group().await;
        }
        true
    }

    /// Posts the gathered SENDs to their bucket; false if the writer is gone.
    async fn flush_group(&mut self) -> bool {
        let Some(mut group) = self.group.take() else {
            return true;
        };
        let stats = &self.services.engine.stats;
        stats.requests.fetch_add(group.uncounted, Ordering::Relaxed);
        let refused = |ids: Vec<u32>, e: crate::error::Error| {
            let answers = ids
                .into_iter()
                .map(|id| Response::error(id, e.code(), &e.to_string()))
                .collect();
            Pending::ReadyMany(answers)
        };
        let pending = match self.services.engine.bucket(&group.bucket) {
            Err(e) => refused(group.ids(), e),
            // Applied right here when the bucket allows it and is idle (`engine::lane`).
            Ok(handle) => match handle
                .shared
                .lane
                .try_apply(group.views(), &handle.shared.stats)
            {
                Some(Applied::Now(answers)) => Pending::Encoded(answers),
                Some(Applied::AfterCommit(rx)) => Pending::WaitingMany {
                    ids: group.ids(),
                    rx,
                },
                // One frame (the unpipelined case): a plain SEND, nothing to gather.
                None if group.len() == 1 => {
                    let (id, batch) = group.batches().remove(0);
                    let (reply, rx) = oneshot::channel();
                    match handle.post(BucketMsg::Send { id, batch, reply }).await {
                        Ok(()) => Pending::Waiting { id, rx },
                        Err(e) => refused(vec![id], e),
                    }
                }
                None => {
                    let (reply, rx) = oneshot::channel();
                    let items = group.batches();
                    match handle.post(BucketMsg::SendMany { items, reply }).await {
                        Ok(()) => Pending::WaitingMany {
                            ids: group.ids(),
                            rx,
                        },
                        Err(e) => refused(group.ids(), e),
                    }
                }
            },
        };
        let slot = Slot {
            pending,
            _budget: group.budget.take(),
        };
        self.spare = group.into_spare();
        self.tx.send(slot).await.is_ok()
    }

    /// Decodes one request body and routes it. Returns a reason to stop reading.
    async fn route(&mut self, body: Bytes) -> Option<CloseReason> {
        self.services
            .engine
            .stats
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let cost = body.len().clamp(1, self.limits.max_in_flight_bytes) as u32;
        let budget = self.acquire(cost).await;
        let request = match Request::decode(body) {
            Ok(request) => request,
            Err(e) => {
                let fatal = e.id.is_none();
                let sent = self
                    .answer(
                        Response::error(e.id.unwrap_or(0), e.code, &e.message),
                        budget,
                    )
                    .await;
                return match (fatal, sent) {
                    (true, _) => Some(CloseReason::Fatal(e.code)),
                    (false, true) => None,
                    (false, false) => Some(CloseReason::PeerClosed),
                };
            }
        };
        // A SEND to another bucket than the one gathered posts that group first: then
        // nothing waits between this SEND's checks below and the frames that
        // `gather_more` adds after it, which those checks cover.
        if let Command::Send { bucket, .. } = &request.command {
            if self.group.as_ref().is_some_and(|g| g.bucket != *bucket) && !self.flush_group().await
            {
                return Some(CloseReason::PeerClosed);
            }
        }
        if self.conn.session.as_ref().is_some_and(Session::is_revoked) {
            return Some(self.user_deleted().await);
        }
        let id = request.id;
        // A permitted SEND joins the group; the bucket is looked up when it is posted.
        let request = match (request.command, self.conn.session.as_ref()) {
            (Command::Send { bucket, batch }, Some(s)) => {
                let sent = match s.check(Permission::Send, Some(&bucket)) {
                    Ok(()) => self.gather(id, bucket, batch, budget).await,
                    Err(e) => {
                        self.answer(Response::error(id, e.code(), &e.to_string()), budget)
                            .await
                    }
                };
                return (!sent).then_some(CloseReason::PeerClosed);
            }
            (command, _) => Request { id, command },
        };
        if !self.flush_group().await {
            return Some(CloseReason::PeerClosed);
        }
        let pending = match self
            .services
            .dispatch(&mut self.conn, self.peer, request)
            .await
        {
            Ok(pending) => pending,
            Err(e) => Pending::Ready(Response::error(id, e.code(), &e.to_string())),
        };
        match self.queue(pending, budget).await {
            true => None,
            false => Some(CloseReason::PeerClosed),
        }
    }
}

/// Writes all of `out` unless a write makes no progress for [`WRITE_TIMEOUT`]: a slow
/// but steady reader gets everything, one that stopped reading is dropped.
async fn flush<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut BytesMut) -> bool {
    let mut at = 0;
    let mut ok = true;
    while at < out.len() {
        match tokio::time::timeout(WRITE_TIMEOUT, wr.write(&out[at..])).await {
            Ok(Ok(n)) if n > 0 => at += n,
            _ => {
                ok = false;
                break;
            }
        }
    }
    if !ok {
        tracing::info!(
            "closing connection: no write progress for {}s (slow consumer) or write failed",
            WRITE_TIMEOUT.as_secs()
        );
    }
    out.clear();
    ok
}

/// What the writer waits for next.
enum Wake {
    Slot(Option<Slot>),
    /// The awaited answers (none if their sender was dropped).
    Answer(Option<Answers>),
    Push(Option<Push>),
    Lagged,
}

/// Where the awaited answers come from: one request, or a group of SENDs.
enum AwaitRx {
    One(oneshot::Receiver<Response>),
    Many(oneshot::Receiver<EncodedAnswers>),
}

/// Awaited answers as they arrive.
enum Answers {
    One(Response),
    /// A SEND group's answers, encoded by the bucket: neither FATAL nor SUBSCRIBE.
    Encoded(EncodedAnswers),
}

/// A slot whose answer is not ready yet.
struct Awaited {
    /// The requests answered, for the error if the answer never comes.
    ids: Vec<u32>,
    rx: AwaitRx,
    subscribe: bool,
    _budget: Option<Budget>,
}

impl Awaited {
    fn try_take(&mut self) -> Option<Wake> {
        use oneshot::error::TryRecvError;
        let got = match &mut self.rx {
            AwaitRx::One(rx) => rx.try_recv().map(Answers::One),
            AwaitRx::Many(rx) => rx.try_recv().map(Answers::Encoded),
        };
        match got {
            Ok(r) => Some(Wake::Answer(Some(r))),
            Err(TryRecvError::Closed) => Some(Wake::Answer(None)),
            Err(TryRecvError::Empty) => None,
        }
    }

    async fn wait(&mut self) -> Wake {
        Wake::Answer(match &mut self.rx {
            AwaitRx::One(rx) => rx.await.ok().map(Answers::One),
            AwaitRx::Many(rx) => rx.await.ok().map(Answers::Encoded),
        })
    }
}

/// The writer's view of the subscriptions: pushes of `acked` ones are written, pushes of
/// ones whose SUBSCRIBE answer is not written yet are `parked`, pushes of `closed` ones
/// are dropped.
struct Writer<S> {
    wr: WriteHalf<S>,
    out: BytesMut,
    acked: HashSet<u32>,
    closed: HashSet<u32>,
    parked: Vec<Push>,
}

impl<S: Stream> Writer<S> {
    /// Encodes a response; false if it is FATAL (the last one).
    fn answer(&mut self, response: &Response) -> bool {
        response.encode(&mut self.out);
        response.status != Status::Fatal
    }

    /// Encodes or parks a push; false if the parking lot overflowed (slow consumer).
    fn push(&mut self, push: Push) -> bool {
        if self.acked.contains(&push.sub) {
            self.encode_push(push);
        } else if !self.closed.contains(&push.sub) {
            if self.parked.len() >= PUSH_QUEUE {
                return false;
            }
            self.parked.push(push);
        }
        true
    }

    fn encode_push(&mut self, push: Push) {
        let response = match push.kind {
            PushKind::Output(payload) => Response::push(push.sub, payload),
            PushKind::End(code, message) => {
                self.acked.remove(&push.sub);
                self.closed.insert(push.sub);
                Response::end(push.sub, code, &message)
            }
        };
        response.encode(&mut self.out);
    }

    /// The SUBSCRIBE answer for `id` was written: release its parked pushes, or drop
    /// them if it failed.
    fn subscribed(&mut self, id: u32, ok: bool) {
        let parked = std::mem::take(&mut self.parked);
        let (mine, others): (Vec<Push>, Vec<Push>) = parked.into_iter().partition(|p| p.sub == id);
        self.parked = others;
        if ok {
            self.closed.remove(&id);
            self.acked.insert(id);
            for push in mine {
                self.encode_push(push);
            }
        }
    }

    fn unsubscribed(&mut self, sub: u32) {
        self.acked.remove(&sub);
        self.closed.insert(sub);
        self.parked.retain(|p| p.sub != sub);
    }

    async fn flush(&mut self) -> bool {
        self.out.is_empty() || flush(&mut self.wr, &mut self.out).await
    }
}

/// Writes answers in request order, and subscription pushes between them. Whatever is
/// ready is coalesced into one write; before waiting, whatever is buffered is flushed.
async fn write_loop<S: Stream>(
    wr: WriteHalf<S>,
    mut rx: mpsc::Receiver<Slot>,
    mut pushes: PushStream,
) {
    let mut w = Writer {
        wr,
        out: BytesMut::with_capacity(WRITE_CHUNK),
        acked: HashSet::new(),
        closed: HashSet::new(),
        parked: Vec::new(),
    };
    let mut awaited: Option<Awaited> = None;
    let mut pushes_open = true;
    let lag = pushes.lag_signal();
    loop {
        if w.out.len() >= WRITE_CHUNK && !w.flush().await {
            return;
        }
        let ready = if pushes.is_lagged() {
            Some(Wake::Lagged)
        } else if let Some(a) = &mut awaited {
            a.try_take()
                .or_else(|| pushes.try_recv().map(|p| Wake::Push(Some(p))))
        } else {
            match rx.try_recv() {
                Ok(slot) => Some(Wake::Slot(Some(slot))),
                Err(mpsc::error::TryRecvError::Disconnected) => Some(Wake::Slot(None)),
                Err(mpsc::error::TryRecvError::Empty) => {
                    pushes.try_recv().map(|p| Wake::Push(Some(p)))
                }
            }
        };
        let wake = match ready {
            Some(wake) => wake,
            None => {
                if !w.flush().await {
                    return;
                }
                match &mut awaited {
                    Some(a) => tokio::select! {
                        biased;
                        _ = lag.wait() => Wake::Lagged,
                        w = a.wait() => w,
                        p = pushes.recv(), if pushes_open => Wake::Push(p),
                    },
                    None => tokio::select! {
                        biased;
                        _ = lag.wait() => Wake::Lagged,
                        s = rx.recv() => Wake::Slot(s),
                        p = pushes.recv(), if pushes_open => Wake::Push(p),
                    },
                }
            }
        };
        match wake {
            Wake::Lagged => {
                let msg = format!(
                    "this connection fell behind the outputs of its subscriptions \
                     (more than {PUSH_QUEUE} outputs or {} MiB queued)",
                    crate::engine::PUSH_QUEUE_BYTES >> 20
                );
                w.answer(&Response::error(0, ErrorCode::SlowConsumer, &msg));
                tracing::info!("closing connection: slow subscriber");
                break;
            }
            Wake::Push(None) => pushes_open = false,
            Wake::Push(Some(push)) => {
                if !w.push(push) {
                    pushes.mark_lagged();
                }
            }
            Wake::Slot(None) => break,
            Wake::Slot(Some(slot)) => match slot.pending {
                Pending::Ready(r) => {
                    drop(slot._budget);
                    if !w.answer(&r) {
                        break;
                    }
                }
                Pending::Unsubscribed { id, sub } => {
                    drop(slot._budget);
                    w.unsubscribed(sub);
                    w.answer(&Response::empty(id));
                }
                Pending::ReadyMany(answers) => {
                    drop(slot._budget);
                    if !answers.iter().all(|r| w.answer(r)) {
                        break;
                    }
                }
                Pending::Encoded(answers) => {
                    drop(slot._budget);
                    w.out.extend_from_slice(&answers.frames);
                }
                Pending::Waiting { id, rx } => {
                    awaited = Some(Awaited {
                        ids: vec![id],
                        rx: AwaitRx::One(rx),
                        subscribe: false,
                        _budget: slot._budget,
                    });
                }
                Pending::WaitingMany { ids, rx } => {
                    awaited = Some(Awaited {
                        ids,
                        rx: AwaitRx::Many(rx),
                        subscribe: false,
                        _budget: slot._budget,
                    });
                }
                Pending::Subscribed { id, rx } => {
                    awaited = Some(Awaited {
                        ids: vec![id],
                        rx: AwaitRx::One(rx),
                        subscribe: true,
                        _budget: slot._budget,
                    });
                }
            },
            Wake::Answer(r) => {
                let Some(a) = awaited.take() else { continue };
                let answers = match r {
                    Some(Answers::Encoded(e)) if e.count == a.ids.len() => {
                        w.out.extend_from_slice(&e.frames);
                        continue;
                    }
                    Some(Answers::One(r)) if a.ids.len() == 1 => vec![r],
                    _ => a.ids.iter().map(|&id| dropped(id)).collect(),
                };
                drop(a._budget);
                let more = answers.iter().all(|r| w.answer(r));
                if a.subscribe {
                    let ok = answers.first().is_some_and(|r| r.status == Status::Ok);
                    if let Some(&id) = a.ids.first() {
                        w.subscribed(id, ok);
                    }
                }
                if !more {
                    break;
                }
            }
        }
    }
    if w.flush().await {
        let _ = w.wr.shutdown().await;
    }
}

/// The answer for a request whose bucket was dropped before running it.
fn dropped(id: u32) -> Response {
    let msg = "the bucket was dropped before this request ran";
    Response::error(id, crate::protocol::ErrorCode::NoSuchBucket, msg)
}
