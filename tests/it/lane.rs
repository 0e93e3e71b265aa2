//! The fast lane (`engine::lane`): SENDs to a native bucket applied by the connection
//! itself. The bucket must still behave as one serial actor: a SEND never overtakes what
//! its connection asked before it, and flushes, takes and INFO count the lane's events
//! exactly as if they had come through the mailbox. A durable bucket's lane records are
//! in the log in that same order (`tests/it/durable.rs` restarts from them).

use bucketly::client::PendingReply;
use bucketly::protocol::Command;
use bucketly::Client;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::common::{next_record, TestServer};

fn sum_counts(output: &Value) -> u64 {
    output
        .as_object()
        .expect("a counter output")
        .values()
        .map(|v| v.as_u64().expect("a count"))
        .sum()
}

fn view_key(bucket: &str, key: &str) -> Command {
    Command::View {
        bucket: bucket.into(),
        arg: Some(Bytes::copy_from_slice(key.as_bytes())),
    }
}

async fn number(pending: PendingReply) -> u64 {
    let body = pending.wait().await.expect("view").payload;
    let value: Value = serde_json::from_slice(&body).expect("json");
    value.as_u64().expect("a number")
}

// VIEW, SEND, VIEW pipelined on one connection: the SEND is applied after the first
// VIEW and before the second, even though the VIEWs go through the bucket's thread and
// the SEND could be applied by the connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_never_overtakes_a_request_sent_before_it() {
    never_overtakes(json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_send_never_overtakes_a_request_sent_before_it() {
    never_overtakes(json!({"durable": true})).await;
}

async fn never_overtakes(options: Value) {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .create_with("c", "counter", None, &options)
        .await
        .expect("create");
    let mut rounds = Vec::new();
    for _ in 0..300 {
        let before = client.start(view_key("c", "k")).await.expect("view");
        let send = client.start_send("c", &["k"]).await.expect("send");
        let after = client.start(view_key("c", "k")).await.expect("view");
        rounds.push((before, send, after));
    }
    for (i, (before, send, after)) in rounds.into_iter().enumerate() {
        assert_eq!(number(before).await, i as u64, "VIEW before SEND {i}");
        assert_eq!(Client::finish_send(send).await.expect("sent").accepted, 1);
        assert_eq!(number(after).await, i as u64 + 1, "VIEW after SEND {i}");
    }
    server.stop().await;
}

// Four connections send while a fifth takes and releases in a loop: every event is in
// exactly one take, and each take's `events` is what its output holds; INFO agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_count_every_event_sent_beside_them() {
    takes_count_every_event(json!({})).await;
}

// The same for a durable bucket, whose takes and releases are records between the
// lane's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_takes_count_every_event_sent_beside_them() {
    takes_count_every_event(json!({"durable": true})).await;
}

async fn takes_count_every_event(options: Value) {
    const SENDERS: u64 = 4;
    const FRAMES: u64 = 300;
    const EVENTS: u64 = 5;
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin
        .create_with("c", "counter", None, &options)
        .await
        .expect("create");
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let client = server.client().await;
        senders.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for f in 0..FRAMES {
                let events: Vec<String> = (0..EVENTS)
                    .map(|e| format!("k{}", (s + f + e) % 7))
                    .collect();
                pending.push(client.start_send("c", &events).await.expect("queued"));
                if f % 10 == 9 {
                    // Some unpipelined stretches too.
                    for p in pending.drain(..) {
                        Client::finish_send(p).await.expect("sent");
                    }
                }
            }
            for p in pending {
                Client::finish_send(p).await.expect("sent");
            }
        }));
    }
    let taker = server.client().await;
    let (mut taken, mut takes) = (0u64, 0u64);
    while !senders.iter().all(|t| t.is_finished()) {
        let take = taker.take("c").await.expect("take");
        assert_eq!(take.events, sum_counts(&take.output), "take {}", take.id);
        taken += take.events;
        takes += 1;
        taker.release("c", take.id).await.expect("release");
    }
    for t in senders {
        t.await.expect("sender");
    }
    let last = taker.take("c").await.expect("last take");
    assert_eq!(last.events, sum_counts(&last.output));
    taken += last.events;
    let total = SENDERS * FRAMES * EVENTS;
    assert_eq!(taken, total, "events over {} takes", takes + 1);
    let info = admin.info(Some("c")).await.expect("info");
    assert_eq!(info["events"], json!(total));
    assert_eq!(info["sends"], json!(SENDERS * FRAMES));
    server.stop().await;
}

// A scheduled bucket's outputs say how many events they hold, and those held are
// exactly those sent, whichever way each SEND was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_records_count_the_events_they_hold() {
    const TOTAL: u64 = 4 * 2000;
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin
        .create_with("c", "counter", None, &json!({"every": 0.02}))
        .await
        .expect("create");
    let mut sub = admin.subscribe("c").await.expect("subscribe");
    let mut senders = Vec::new();
    for s in 0..4 {
        let client = server.client().await;
        senders.push(tokio::spawn(async move {
            for i in 0..TOTAL / 4 {
                let outcome = client.send("c", &[format!("k{}", (s + i) % 13)]).await;
                assert_eq!(outcome.expect("send").accepted, 1);
            }
        }));
    }
    let mut counted = 0;
    while counted < TOTAL {
        let r = next_record(&mut sub).await;
        assert_eq!(r["events"], json!(sum_counts(&r["output"])), "{r}");
        counted += sum_counts(&r["output"]);
    }
    assert_eq!(counted, TOTAL);
    for t in senders {
        t.await.expect("sender");
    }
    assert_eq!(
        admin.info(Some("c")).await.expect("info")["pending"],
        json!(0)
    );
    server.stop().await;
}

// ALTER to a threshold schedule closes the lane: from then on outputs hold exactly
// `threshold` events, counting those sent before the ALTER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_schedule_counts_every_event() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create("c", "counter", None).await.expect("create");
    let mut sub = client.subscribe("c").await.expect("subscribe");
    for _ in 0..5 {
        client.send("c", &["a"]).await.expect("send");
    }
    client
        .alter("c", &json!({"threshold": 10, "timeout": 3600}))
        .await
        .expect("alter");
    for _ in 0..22 {
        client.send("c", &["b"]).await.expect("send");
    }
    let first = next_record(&mut sub).await;
    assert_eq!(first["events"], json!(10));
    assert_eq!(first["output"], json!({"a": 5, "b": 5}));
    let second = next_record(&mut sub).await;
    assert_eq!(second["events"], json!(10));
    assert_eq!(second["output"], json!({"b": 10}));
    let info = client.info(Some("c")).await.expect("info");
    assert_eq!(info["pending"], json!(7));
    drop(sub);
    server.stop().await;
}

// SENDs the lane logs move the durable position INFO shows at once, with no request
// through the bucket's thread in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_info_follows_the_lanes_records() {
    const FRAMES: u64 = 40;
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .create_with("c", "counter", None, &json!({"durable": true}))
        .await
        .expect("create");
    let before = client.info(Some("c")).await.expect("info")["durable"].clone();
    for f in 0..FRAMES {
        client.send("c", &[format!("k{f}")]).await.expect("send");
    }
    let after = client.info(Some("c")).await.expect("info")["durable"].clone();
    let field = |v: &Value, name: &str| v[name].as_u64().expect(name);
    assert_eq!(
        field(&after, "lsn"),
        field(&before, "lsn") + FRAMES,
        "{after}"
    );
    assert_eq!(
        field(&after, "records_since_snapshot"),
        field(&before, "records_since_snapshot") + FRAMES,
        "{after}"
    );
    assert_eq!(after["diverged"], json!(false));
    server.stop().await;
}
