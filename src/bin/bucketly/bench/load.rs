//! One load connection: raw protocol over a plain socket, no client library in the hot
//! loop. It logs in, then repeats rounds like `redis-benchmark -P`: write `pipeline`
//! SEND frames in one write, read their answers, record each answer's latency from the
//! round's write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bucketly::protocol::{
    check_frame, ClientHello, Command, Request, Response, Secret, SendOutcome, Status,
};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::events::EventGen;
use super::round::Round;

/// Largest answer the bench accepts (SEND answers are a few bytes; this is generous).
const MAX_ANSWER: u32 = 1 << 20;

/// What every connection shares: where to stop, and counters for the progress line.
pub struct Shared {
    /// Frames still to send, over all connections (`u64::MAX` = until `stop`).
    pub budget: AtomicU64,
    /// Set when the duration is over.
    pub stop: AtomicBool,
    /// Frames answered so far, for the progress line.
    pub frames_done: AtomicU64,
}

impl Shared {
    /// Claims up to `want` frames of the budget; 0 when the run is over.
    fn claim(&self, want: u64) -> u64 {
        if self.stop.load(Ordering::Relaxed) {
            return 0;
        }
        let mut left = self.budget.load(Ordering::Relaxed);
        loop {
            if left == u64::MAX {
                return want;
            }
            let take = want.min(left);
            if take == 0 {
                return 0;
            }
            match self.budget.compare_exchange_weak(
                left,
                left - take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take,
                Err(now) => left = now,
            }
        }
    }
}

/// What one connection measured.
pub struct ConnResult {
    pub frames: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Answer latencies in microseconds.
    pub latency: Histogram<u64>,
}

/// The load of one connection.
pub struct Load {
    pub addr: std::net::SocketAddr,
    pub user: String,
    pub password: String,
    pub bucket: String,
    pub pipeline: usize,
    pub per_frame: usize,
    pub events: EventGen,
}

/// Opens a connection and logs in; the socket is ready for requests.
pub async fn connect(load: &Load) -> Result<(TcpStream, BytesMut), String> {
    let mut socket = TcpStream::connect(load.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", load.addr))?;
    let _ = socket.set_nodelay(true);
    let mut out = BytesMut::new();
    ClientHello::v1().encode(&mut out);
    Request {
        id: 1,
        command: Command::Login {
            user: load.user.clone(),
            password: Secret(load.password.clone()),
        },
    }
    .encode(&mut out);
    socket.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    for what in ["server hello", "login"] {
        let answer = read_answer(&mut socket, &mut buf).await?;
        if let Ok(Some((code, message))) = answer.failure() {
            return Err(format!("{what} refused: {message} ({code})"));
        }
    }
    Ok((socket, buf))
}

async fn read_answer(socket: &mut TcpStream, buf: &mut BytesMut) -> Result<Response, String> {
    loop {
        if let Some(len) = check_frame(buf, MAX_ANSWER).map_err(|e| e.to_string())? {
            let frame = buf.split_to(4 + len).freeze();
            return Response::decode(frame.slice(4..)).map_err(|e| e.to_string());
        }
        match socket.read_buf(buf).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Runs rounds until the shared budget or duration is used up.
pub async fn run(
    mut load: Load,
    mut socket: TcpStream,
    mut buf: BytesMut,
    shared: Arc<Shared>,
) -> Result<ConnResult, String> {
    let mut result = ConnResult {
        frames: 0,
        accepted: 0,
        rejected: 0,
        errors: 0,
        first_error: None,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    };
    let mut round = Round::new();
    let mut id: u32 = 2;
    loop {
        let frames = shared.claim(load.pipeline as u64);
        if frames == 0 {
            break;
        }
        let out = round.next(
            &mut load.events,
            &load.bucket,
            frames as usize,
            load.per_frame,
            &mut id,
        );
        let start = Instant::now();
        socket.write_all(out).await.map_err(|e| e.to_string())?;
        let mut owed = frames;
        while owed > 0 {
            buf.reserve(64 * 1024);
            match socket.read_buf(&mut buf).await {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
            // Every answer completed by this read arrived now.
            let micros = start.elapsed().as_micros().max(1) as u64;
            let mut answered = 0;
            while owed > 0 {
                let Some(len) = check_frame(&buf, MAX_ANSWER).map_err(|e| e.to_string())? else {
                    break;
                };
                match SendOutcome::plain_counts(&buf[4..4 + len]) {
                    Some((accepted, rejected)) => {
                        result.accepted += u64::from(accepted);
                        result.rejected += u64::from(rejected);
                    }
                    None => settle(&mut result, buf[4..4 + len].to_vec().into())?,
                }
                buf.advance(4 + len);
                answered += 1;
                owed -= 1;
            }
            if answered > 0 {
                let _ = result.latency.record_n(micros, answered);
            }
        }
        result.frames += frames;
        shared.frames_done.fetch_add(frames, Ordering::Relaxed);
    }
    Ok(result)
}

/// Counts one SEND answer.
fn settle(result: &mut ConnResult, body: bytes::Bytes) -> Result<(), String> {
    let response = Response::decode(body).map_err(|e| e.to_string())?;
    match response.status {
        Status::Ok => {
            let outcome = SendOutcome::decode(response.payload).map_err(|e| e.to_string())?;
            result.accepted += u64::from(outcome.accepted);
            result.rejected += u64::from(outcome.rejected);
            if result.first_error.is_none() {
                if let Some((_, reason)) = outcome.reasons.first() {
                    result.first_error = Some(format!("event rejected: {reason}"));
                }
            }
        }
        Status::Fatal => {
            let msg = response
                .failure()
                .ok()
                .flatten()
                .map_or_else(|| "FATAL".to_owned(), |(c, m)| format!("{m} ({c})"));
            return Err(format!("the server closed the connection: {msg}"));
        }
        _ => {
            result.errors += 1;
            if result.first_error.is_none() {
                if let Ok(Some((code, message))) = response.failure() {
                    result.first_error = Some(format!("{message} ({code})"));
                }
            }
        }
    }
    Ok(())
}
