//! `bucketly send` reading stdin: lines in pipelined batches.

use std::collections::VecDeque;
use std::io::BufRead;

use bucketly::client::PendingReply;
use bucketly::Client;

use crate::text;

/// SEND frames kept in flight while streaming stdin.
const SEND_WINDOW: usize = 64;
/// Bytes of events per SEND frame when streaming stdin (well under the server maximum).
const SEND_BATCH_BYTES: usize = 256 * 1024;

/// Streams stdin as batches of lines, keeping up to [`SEND_WINDOW`] frames in flight.
/// Lines lose their `\n` (and a `\r` before it); nothing else is changed.
pub async fn send_stdin(client: &Client, bucket: &str, batch: usize) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<Vec<u8>>>>(4);
    std::thread::spawn(move || read_batches(batch, tx));
    let mut window: VecDeque<(u64, PendingReply)> = VecDeque::new();
    let (mut sent, mut accepted, mut rejected, mut first_reason) = (0u64, 0u64, 0u64, None);
    let mut settle = |outcome: bucketly::protocol::SendOutcome, offset: u64| {
        accepted += u64::from(outcome.accepted);
        rejected += u64::from(outcome.rejected);
        if first_reason.is_none() {
            first_reason = outcome
                .reasons
                .first()
                .map(|(i, r)| (offset as u32 + i, r.clone()));
        }
    };
    while let Some(events) = rx.recv().await {
        let events = events.map_err(|e| format!("reading stdin: {e}"))?;
        if window.len() >= SEND_WINDOW {
            if let Some((offset, p)) = window.pop_front() {
                settle(Client::finish_send(p).await.map_err(text)?, offset);
            }
        }
        let pending = client.start_send(bucket, &events).await.map_err(text)?;
        window.push_back((sent, pending));
        sent += events.len() as u64;
    }
    for (offset, p) in window {
        settle(Client::finish_send(p).await.map_err(text)?, offset);
    }
    report(accepted, rejected, first_reason)
}

fn read_batches(batch: usize, tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<Vec<u8>>>>) {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut events = Vec::with_capacity(batch);
    let mut bytes = 0;
    loop {
        let mut line = Vec::new();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                bytes += line.len() + 4;
                events.push(line);
                if events.len() >= batch || bytes >= SEND_BATCH_BYTES {
                    bytes = 0;
                    if tx.blocking_send(Ok(std::mem::take(&mut events))).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
    if !events.is_empty() {
        let _ = tx.blocking_send(Ok(events));
    }
}

pub fn report(accepted: u64, rejected: u64, first: Option<(u32, String)>) -> Result<(), String> {
    if rejected == 0 {
        return Ok(());
    }
    let first = first
        .map(|(i, r)| format!("; first: event {i}: {r}"))
        .unwrap_or_default();
    Err(format!(
        "{rejected} of {} events rejected{first}",
        accepted + rejected
    ))
}
