//! The daemon through the real client: ordering, concurrency, handler isolation,
//! restart, and the commands' answers.

use bucketly::protocol::ErrorCode;
use bucketly::Client;
use serde_json::json;

use crate::common::{config_in, TestServer};

fn code(e: bucketly::client::ClientError) -> Option<ErrorCode> {
    e.code()
}

// Events sent on one connection with thousands of requests in flight reach the bucket
// in the order sent, and answers come back in request order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipelining_preserves_order() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .create("log", "list", Some(&json!({"max": 100000})))
        .await
        .expect("create");
    let mut pending = Vec::new();
    for i in 0..5000u32 {
        let events = [format!("{}", 2 * i), format!("{}", 2 * i + 1)];
        pending.push(client.start_send("log", &events).await.expect("queued"));
    }
    for p in pending {
        let outcome = Client::finish_send(p).await.expect("sent");
        assert_eq!((outcome.accepted, outcome.rejected), (2, 0));
    }
    let view = client.view("log", None).await.expect("view");
    let got: Vec<u64> = view
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("string").parse().expect("number"))
        .collect();
    assert_eq!(got, (0..10000).collect::<Vec<u64>>());
    server.stop().await;
}

// 8 concurrent senders × 50,000 events into one bucket lose nothing and count nothing
// twice (the issue's acceptance, through the client library).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_lose_nothing() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.create("hits", "counter", None).await.expect("create");
    let mut tasks = Vec::new();
    for sender in 0..8 {
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for batch in 0..50 {
                let events: Vec<String> = (0..1000)
                    .map(|i| format!("k{}", (sender * 50_000 + batch * 1000 + i) % 100))
                    .collect();
                pending.push(client.start_send("hits", &events).await.expect("queued"));
            }
            for p in pending {
                assert_eq!(Client::finish_send(p).await.expect("sent").accepted, 1000);
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let view = admin.view("hits", None).await.expect("view");
    let counts = view.as_object().expect("object");
    assert_eq!(counts.len(), 100);
    assert!(counts.values().all(|v| v == 4000), "{view}");
    let info = admin.info(Some("hits")).await.expect("info");
    assert_eq!(info["events"], 400_000);
    assert_eq!(info["sends"], 400);
    server.stop().await;
}

const FRAGILE: &str = r#"
local H = {}
function H.init() return {n = 0} end
function H.send(s, e)
  if e == "crash" then error("cannot handle crash") end
  s.n = s.n + 1
end
function H.view(s, arg)
  if arg == "crash" then error("view exploded") end
  if arg == "fn" then return function() end end
  return s.n
end
function H.dump(s) local n = s.n; s.n = 0; return n end
return H
"#;

// A handler error answers that request with a clear error and leaves the bucket, its
// state, other buckets and the daemon running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_are_isolated() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("handlers")).expect("mkdir");
    std::fs::write(dir.path().join("handlers/fragile.lua"), FRAGILE).expect("write");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    client.create("f", "fragile", None).await.expect("create");
    client.create("c", "counter", None).await.expect("create");

    let outcome = client.send("f", &["a", "crash", "b"]).await.expect("send");
    assert_eq!((outcome.accepted, outcome.rejected), (2, 1));
    assert_eq!(outcome.reasons[0].0, 1);
    assert!(
        outcome.reasons[0].1.contains("cannot handle crash"),
        "{:?}",
        outcome.reasons
    );

    let err = client
        .view("f", Some(b"crash"))
        .await
        .expect_err("view fails");
    assert_eq!(code(err), Some(ErrorCode::HandlerError));
    let err = client
        .view("f", Some(b"fn"))
        .await
        .expect_err("unconvertible");
    assert!(
        err.to_string().contains("cannot be converted to JSON"),
        "{err}"
    );

    assert_eq!(client.view("f", None).await.expect("view"), json!(2));
    client.send("c", &["x"]).await.expect("other bucket");
    assert_eq!(client.view("c", Some(b"x")).await.expect("view"), json!(1));
    let info = client.info(Some("f")).await.expect("info");
    assert_eq!(
        (info["errors"].clone(), info["rejected"].clone()),
        (json!(2), json!(1))
    );
    server.stop().await;
}

// CREATE validates everything before the bucket exists; DROP removes it; LIST shows
// exactly the live buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_drop_list() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create("b", "counter", None).await.expect("create");
    let dup = client
        .create("b", "counter", None)
        .await
        .expect_err("duplicate");
    assert_eq!(code(dup), Some(ErrorCode::BucketExists));
    let missing = client.create("x", "nope", None).await.expect_err("handler");
    assert_eq!(code(missing), Some(ErrorCode::NoSuchHandler));
    let bad = client
        .create("bad name", "counter", None)
        .await
        .expect_err("name");
    assert_eq!(code(bad), Some(ErrorCode::InvalidArgument));
    let config = client
        .create("l", "list", Some(&json!({"max": "many"})))
        .await
        .expect_err("init rejects config");
    assert!(config.to_string().contains("max"), "{config}");
    assert_eq!(code(config), Some(ErrorCode::HandlerError));

    assert_eq!(
        client.list().await.expect("list"),
        json!([{"name": "b", "handler": "counter"}])
    );
    client.drop_bucket("b").await.expect("drop");
    let gone = client.send("b", &["x"]).await.expect_err("dropped");
    assert_eq!(code(gone), Some(ErrorCode::NoSuchBucket));
    let again = client.drop_bucket("b").await.expect_err("twice");
    assert_eq!(code(again), Some(ErrorCode::NoSuchBucket));
    assert_eq!(client.list().await.expect("list"), json!([]));
    // The name is free again, with fresh state.
    client.create("b", "counter", None).await.expect("recreate");
    assert_eq!(client.view("b", None).await.expect("view"), json!({}));
    server.stop().await;
}

// After a restart the buckets exist again, with their handler and config, and empty state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    client
        .create("keep", "list", Some(&json!({"max": 2})))
        .await
        .expect("create");
    client
        .create("gone", "counter", None)
        .await
        .expect("create");
    client.send("keep", &["a", "b", "c"]).await.expect("send");
    client.drop_bucket("gone").await.expect("drop");
    drop(client);
    server.stop().await;

    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    assert_eq!(
        client.list().await.expect("list"),
        json!([{"name": "keep", "handler": "list"}])
    );
    assert_eq!(client.view("keep", None).await.expect("view"), json!([]));
    client.send("keep", &["1", "2", "3"]).await.expect("send");
    // The stored config (max 2) is in force again.
    assert_eq!(
        client.view("keep", None).await.expect("view"),
        json!(["2", "3"])
    );
    server.stop().await;
}

// DUMP answers what VIEW would and resets, atomically with respect to sends: every event
// lands in exactly one dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dumps_partition_the_events() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create("c", "counter", None).await.expect("create");
    let sender = server.client().await;
    let send = tokio::spawn(async move {
        for _ in 0..200 {
            sender.send("c", &["k"; 50]).await.expect("send");
        }
    });
    let mut total = 0u64;
    while !send.is_finished() {
        total += client.dump("c").await.expect("dump")["k"]
            .as_u64()
            .unwrap_or(0);
    }
    send.await.expect("sender");
    total += client.dump("c").await.expect("dump")["k"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(total, 10_000);
    assert_eq!(client.view("c", None).await.expect("view"), json!({}));
    server.stop().await;
}

// A full mailbox slows the sender instead of growing memory: with a one-message mailbox
// and a slow handler, many pipelined sends still all complete, and the queue depth
// reported by INFO never exceeds the capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_mailbox_applies_back_pressure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_in(dir.path());
    config.mailbox = 1;
    let server = TestServer::start_with(config).await;
    let client = server.client().await;
    client.create("c", "counter", None).await.expect("create");
    let mut pending = Vec::new();
    for i in 0..500 {
        pending.push(
            client
                .start_send("c", &[format!("k{}", i % 7)])
                .await
                .expect("queued"),
        );
        let info = client.info(Some("c")).await.expect("info");
        assert!(
            info["queue_depth"].as_u64() <= info["queue_capacity"].as_u64(),
            "{info}"
        );
    }
    for p in pending {
        Client::finish_send(p).await.expect("sent");
    }
    let info = client.info(Some("c")).await.expect("info");
    assert_eq!(info["events"], 500);
    server.stop().await;
}

// INFO reports the server and the bucket counters the protocol spec lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_counters() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create("u", "unique", None).await.expect("create");
    client
        .send("u", &["k a", "k b", "nospace"])
        .await
        .expect("send");
    let info = client.info(None).await.expect("info");
    assert_eq!(info["buckets"], 1);
    assert_eq!(info["events"], 2);
    assert_eq!(info["connections"]["current"], 1);
    assert_eq!(info["protocol"], 1);
    let b = client.info(Some("u")).await.expect("info");
    assert_eq!(
        (b["events"].clone(), b["rejected"].clone()),
        (json!(2), json!(1))
    );
    assert!(b["memory_bytes"].as_u64().expect("memory") > 0);
    let missing = client.info(Some("nope")).await.expect_err("missing");
    assert_eq!(code(missing), Some(ErrorCode::NoSuchBucket));
    server.stop().await;
}

// A read starts the I/O thread's busy polling (or not, with the window at zero), and
// INFO reports the window and the episodes.
#[tokio::test]
async fn info_shows_busy_polling_started_by_reads() {
    for (window_us, polled) in [(0, false), (50, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = TestServer::start_with(bucketly::Config {
            busy_poll: std::time::Duration::from_micros(window_us),
            ..config_in(dir.path())
        })
        .await;
        // The LOGIN read has started an episode by the time the login is answered.
        let info = server.client().await.info(None).await.expect("INFO");
        let poll = &info["busy_poll"];
        assert_eq!(poll["window_us"], window_us, "{poll}");
        let episodes = poll["episodes"].as_u64().expect("episodes");
        assert_eq!(episodes > 0, polled, "{poll}");
        server.stop().await;
    }
}
