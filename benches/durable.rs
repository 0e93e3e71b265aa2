//! Durable buckets: acknowledged events/s, and recovery time. Not a test: it reports
//! numbers. `cargo bench --bench durable` (add `-- quick` for a shorter run).
//!
//! The daemon runs in-process with its database in a temporary directory (on the disk
//! that holds `$TMPDIR`), clients on loopback, every event one SEND frame acknowledged
//! only once committed:
//! - unpipelined: each connection waits for each answer;
//! - pipelined: each connection keeps 64 frames in flight;
//! - recovery: the time a restart takes to replay 1,000,000 logged events (kept under
//!   the snapshot interval, so all of them are replayed), and after a graceful stop (a
//!   snapshot, nothing to replay).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bucketly::server::Server;
use bucketly::{Client, Config};

struct Daemon {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: &Config) -> (Daemon, Duration) {
    let started = Instant::now();
    let server = Server::bind(config.clone()).await.expect("daemon");
    let took = started.elapsed();
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (Daemon { addr, stop, task }, took)
}

impl Daemon {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The real `bucketlyd` on port 0 in `dir`; returns it, its address, and the time from
/// spawn to its listen line (which it prints once every bucket is recovered).
async fn spawn_daemon(
    dir: &std::path::Path,
) -> (tokio::process::Child, std::net::SocketAddr, Duration) {
    use tokio::io::AsyncBufReadExt;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bucketlyd"))
        .arg(dir.join("bench.redb"))
        .args(["--port", "0", "--handlers", "none-such"])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn bucketlyd");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("listen line");
    let took = started.elapsed();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("address");
    (child, addr, took)
}

/// 1,000,110 events in 9,010 records of 111 (below the snapshot interval, so a crash
/// leaves all of them to replay), then SIGKILL and restart; then SIGTERM (snapshot) and
/// restart.
async fn recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("none-such")).expect("handlers dir");
    let (mut child, addr, _) = spawn_daemon(dir.path()).await;
    let c = login(addr).await;
    c.create_with("r", "counter", None, &serde_json::json!({"durable": true}))
        .await
        .expect("create r");
    let batch: Vec<String> = (0..111).map(|i| format!("key{i}")).collect();
    let mut inflight = VecDeque::new();
    for _ in 0..9_010 {
        if inflight.len() >= 64 {
            if let Some(p) = inflight.pop_front() {
                Client::finish_send(p).await.expect("acked");
            }
        }
        inflight.push_back(c.start_send("r", &batch).await.expect("queue"));
    }
    for p in inflight {
        Client::finish_send(p).await.expect("acked");
    }
    drop(c);
    child.kill().await.expect("SIGKILL");
    let (child, addr, took) = spawn_daemon(dir.path()).await;
    let c = login(addr).await;
    let info = c.info(Some("r")).await.expect("info");
    println!(
        "{:<44} {:>10.0} ms  ({} records, {} events replayed)",
        "start after kill -9, ~1M logged events",
        took.as_secs_f64() * 1000.0,
        info["durable"]["recovered"]["records"],
        info["durable"]["recovered"]["events"]
    );
    drop(c);
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    let mut child = child;
    let _ = child.wait().await;
    let (_child, _, took) = spawn_daemon(dir.path()).await;
    println!(
        "{:<44} {:>10.0} ms",
        "start after a graceful stop (snapshot)",
        took.as_secs_f64() * 1000.0
    );
}

async fn login(addr: std::net::SocketAddr) -> Client {
    let client = Client::connect(addr).await.expect("connect");
    client.login("admin", "admin").await.expect("login");
    client
}

/// `per_connection` single-event SENDs on each of `clients`, `window` in flight each.
async fn run(clients: &[Client], per_connection: u64, window: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .enumerate()
        .map(|(c, client)| {
            tokio::spawn(async move {
                let mut inflight = VecDeque::new();
                for n in 0..per_connection {
                    if inflight.len() >= window {
                        if let Some(p) = inflight.pop_front() {
                            Client::finish_send(p).await.expect("acknowledged");
                        }
                    }
                    let key = [format!("k{}", (c as u64 * per_connection + n) % 1000)];
                    inflight.push_back(client.start_send("d", &key).await.expect("queue"));
                }
                for p in inflight {
                    Client::finish_send(p).await.expect("acknowledged");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (clients.len() as u64 * per_connection) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let scale: u64 = if quick { 1 } else { 4 };
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
        let (daemon, _) = start(&config).await;
        let admin = login(daemon.addr).await;
        let durable = serde_json::json!({"durable": true});
        admin
            .create_with("d", "counter", None, &durable)
            .await
            .expect("create");
        let mut clients = vec![admin.clone()];
        while clients.len() < 200 {
            clients.push(login(daemon.addr).await);
        }
        println!(
            "{:<44} {:>12}",
            "durable counter, 1 event per SEND", "acked ev/s"
        );
        for (connections, window, per) in [
            (1, 1, 500 * scale),
            (50, 1, 50 * scale),
            (200, 1, 20 * scale),
            (1, 64, 5_000 * scale),
            (50, 64, 1_000 * scale),
            (200, 64, 250 * scale),
        ] {
            let rate = run(&clients[..connections], per, window).await;
            let shape = if window == 1 {
                "unpipelined".to_owned()
            } else {
                format!("pipelined {window} deep")
            };
            println!(
                "{:<44} {:>12.0}",
                format!("{connections} connections, {shape}"),
                rate
            );
        }
        drop(clients);

        drop(admin);
        daemon.stop().await;
        recovery().await;
    });
}
