//! Send throughput of the in-process daemon over loopback, through the real client.
//! Not a test: it reports numbers. `cargo bench --bench send` (add `-- quick` for a
//! shorter run).
//!
//! Workloads (all into one `counter` bucket over 1,000 distinct keys):
//! - batched: SEND frames of 1,000 events, 64 frames in flight, 1 connection;
//! - batched x4: the same over 4 connections;
//! - unpipelined: 1 event per SEND, wait for each answer, 1 connection;
//! - pipelined: 1 event per SEND, 64 in flight, 1 connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bucketly::server::Server;
use bucketly::{Client, Config};

struct Run {
    name: &'static str,
    events: u64,
    frames: u64,
    elapsed: Duration,
}

async fn batched(
    client: &Client,
    events: u64,
    per_frame: usize,
    window: usize,
    offset: u64,
) -> u64 {
    let mut inflight = VecDeque::new();
    let mut frames = 0;
    let mut sent = 0u64;
    while sent < events {
        let n = per_frame.min((events - sent) as usize);
        let batch: Vec<String> = (0..n as u64)
            .map(|i| format!("/page/{}", (offset + sent + i) % 1000))
            .collect();
        if inflight.len() >= window {
            if let Some(p) = inflight.pop_front() {
                Client::finish_send(p).await.expect("send");
            }
        }
        inflight.push_back(client.start_send("bench", &batch).await.expect("queue"));
        sent += n as u64;
        frames += 1;
    }
    for p in inflight {
        Client::finish_send(p).await.expect("send");
    }
    frames
}

async fn measure(
    name: &'static str,
    connections: usize,
    events: u64,
    per_frame: usize,
    window: usize,
    addr: std::net::SocketAddr,
) -> Run {
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(login(addr).await);
    }
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let share = events / connections as u64;
            tokio::spawn(
                async move { batched(&c, share, per_frame, window, i as u64 * share).await },
            )
        })
        .collect();
    let mut frames = 0;
    for t in tasks {
        frames += t.await.expect("task");
    }
    Run {
        name,
        events,
        frames,
        elapsed: start.elapsed(),
    }
}

/// A connection logged in as the bootstrap admin of the fresh database.
async fn login(addr: std::net::SocketAddr) -> Client {
    let client = Client::connect(addr).await.expect("connect");
    client.login("admin", "admin").await.expect("login");
    client
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let scale = if quick { 1 } else { 5 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            database: dir.path().join("bench.redb"),
            handlers_dir: dir.path().join("none"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        let server = Server::bind(config).await.expect("daemon");
        let addr = server.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let admin = login(addr).await;
        admin
            .create("bench", "counter", None)
            .await
            .expect("create");

        let runs = vec![
            measure(
                "batched (1000/frame, 64 in flight)",
                1,
                400_000 * scale,
                1000,
                64,
                addr,
            )
            .await,
            measure("batched x4 connections", 4, 400_000 * scale, 1000, 64, addr).await,
            measure("unpipelined (1/frame)", 1, 4_000 * scale, 1, 1, addr).await,
            measure(
                "pipelined (1/frame, 64 in flight)",
                1,
                40_000 * scale,
                1,
                64,
                addr,
            )
            .await,
        ];
        println!(
            "{:<38} {:>12} {:>14} {:>12}",
            "workload", "events", "events/s", "frames/s"
        );
        for r in &runs {
            let secs = r.elapsed.as_secs_f64();
            println!(
                "{:<38} {:>12} {:>14.0} {:>12.0}",
                r.name,
                r.events,
                r.events as f64 / secs,
                r.frames as f64 / secs
            );
        }
        let _ = stop.send(());
        let _ = daemon.await;
    });
}
