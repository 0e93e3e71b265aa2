//! Scheduled flushes through the real daemon and the real client: `every` and
//! `threshold` schedules, subscribers (fan-out, UNSUBSCRIBE, slow consumers), the
//! `forward`, `ctx.emit` and `exec` sinks, ALTER, RELOAD and restarts.
//!
//! Nothing here sleeps to synchronise: tests wait for subscription outputs or answers.
//! Where the absence of an output must be shown, the test waits for the server's own
//! flush clock (a scratch bucket's empty outputs) to pass a wall time. Only the exec
//! tests poll, for the effects of an external process, with a short interval.
//!
//! Tests drop their connections before stopping the server: a shutdown lingers up to a
//! second for each connection that is still open.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bucketly::client::ClientError;
use bucketly::protocol::{Command, ErrorCode, Request, Response, Status};
use bucketly::{Client, Config};
use bytes::BytesMut;
use serde_json::{json, Value};

use crate::common::{bounded, config_in, next_record, TestServer, PATIENCE};

fn code(e: ClientError) -> Option<ErrorCode> {
    e.code()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Waits until the server's flush clock has passed wall time `at_ms`: a scratch bucket
/// that outputs every 50 ms even without events is watched (on its own connection)
/// until one of its records is stamped at or after `at_ms`.
async fn server_clock_passes(server: &TestServer, at_ms: u64) {
    static CLOCKS: AtomicU64 = AtomicU64::new(0);
    let name = format!("clock-{}", CLOCKS.fetch_add(1, Ordering::Relaxed));
    let c = server.client().await;
    c.create_with(
        &name,
        "counter",
        None,
        &json!({"every": 0.05, "emit_empty": true}),
    )
    .await
    .expect("create clock");
    let mut sub = c.subscribe(&name).await.expect("subscribe clock");
    loop {
        let r = next_record(&mut sub).await;
        assert_eq!(r["events"], 0, "{r}");
        if r["time_ms"].as_u64().expect("time_ms") >= at_ms {
            break;
        }
    }
    c.drop_bucket(&name).await.expect("drop clock");
}

/// Calls `probe` every 20 ms until it returns `Some`, for at most [`PATIENCE`]. Only for
/// the effects of exec commands, which run outside the server's request order.
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn strings(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("e{i:03}")).collect()
}

/// Writes `source` as `dir/handlers/NAME.lua`.
fn write_handler(dir: &Path, name: &str, source: &str) {
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers).expect("mkdir handlers");
    std::fs::write(handlers.join(format!("{name}.lua")), source).expect("write handler");
}

// ---------------------------------------------------------------------------------------
// every

// A bucket flushing every 0.2 s under 4 concurrent senders: every event lands in exactly
// one output exactly once, seq numbers run 1, 2, 3, ..., each record's `events` is the
// sum of its counts, and periods without events produce no output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partitions_concurrent_events_among_outputs() {
    const SENDERS: usize = 4;
    const KEYS: usize = 2000;
    const BATCH: usize = 100;
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin
        .create_with("hits", "counter", None, &json!({"every": 0.2}))
        .await
        .expect("create");
    let mut sub = admin.subscribe("hits").await.expect("subscribe");

    // Each sender sends its first half at once, the second half only after an output
    // was received, so the events are certain to span several outputs.
    let (go, ready) = tokio::sync::watch::channel(false);
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let client = server.client().await;
        let mut ready = ready.clone();
        senders.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..KEYS).map(|i| format!("s{s}-k{i:04}")).collect();
            for (n, batch) in keys.chunks(BATCH).enumerate() {
                if n == KEYS / BATCH / 2 {
                    ready.wait_for(|go| *go).await.expect("go");
                }
                let outcome = client.send("hits", batch).await.expect("send");
                assert_eq!((outcome.accepted, outcome.rejected), (BATCH as u32, 0));
            }
        }));
    }

    let total = SENDERS * KEYS;
    let mut records = Vec::new();
    let mut counted = 0usize;
    while counted < total {
        let r = next_record(&mut sub).await;
        let output = r["output"].as_object().expect("a counter output object");
        counted += output
            .values()
            .map(|v| v.as_u64().expect("a count") as usize)
            .sum::<usize>();
        records.push(r);
        let _ = go.send(true);
    }
    for t in senders {
        t.await.expect("sender");
    }
    assert_eq!(counted, total, "more counts than events sent");
    assert!(records.len() >= 2, "{} output(s)", records.len());

    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], json!(i + 1), "seq numbers are consecutive from 1");
        assert_eq!(r["bucket"], "hits");
        let output = r["output"].as_object().expect("object");
        let sum: u64 = output.values().map(|v| v.as_u64().expect("count")).sum();
        assert!(sum > 0, "an output without events: {r}");
        assert_eq!(
            r["events"].as_u64(),
            Some(sum),
            "events of record {}",
            i + 1
        );
        for (key, n) in output {
            assert_eq!(n, 1, "key {key} counted {n} times in output {}", i + 1);
            if let Some(before) = seen.insert(key.clone(), i + 1) {
                panic!("key {key} in outputs {before} and {}", i + 1);
            }
        }
    }
    for s in 0..SENDERS {
        for i in 0..KEYS {
            assert!(
                seen.contains_key(&format!("s{s}-k{i:04}")),
                "s{s}-k{i:04} lost"
            );
        }
    }

    // Two periods or more without events: no output, no flush; the next event is in
    // the very next record.
    let last = records.last().expect("a record")["time_ms"]
        .as_u64()
        .expect("time_ms");
    server_clock_passes(&server, last + 500).await;
    admin.send("hits", &["end"]).await.expect("send");
    let r = next_record(&mut sub).await;
    assert_eq!(r["seq"], json!(records.len() + 1), "{r}");
    assert_eq!(
        (&r["events"], &r["output"]),
        (&json!(1), &json!({"end": 1}))
    );
    let info = admin.info(Some("hits")).await.expect("info");
    assert_eq!(info["outputs"], json!(records.len() + 1), "{info}");
    assert_eq!(info["flushes"], json!(records.len() + 1), "{info}");
    assert_eq!(admin.dump("hits").await.expect("dump"), json!({}));
    drop((admin, sub));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// threshold

// 250 events in one SEND to a threshold-100 bucket: outputs of exactly 100, 100 and then
// 50 events (the last 50 only at the timeout), in order, holding the events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_splits_one_send_into_exact_outputs() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .create_with(
            "batch",
            "list",
            None,
            &json!({"threshold": 100, "timeout": 0.3}),
        )
        .await
        .expect("create");
    let mut sub = client.subscribe("batch").await.expect("subscribe");
    let events = strings(0..250);
    let started = Instant::now();
    let outcome = client.send("batch", &events).await.expect("send");
    assert_eq!((outcome.accepted, outcome.rejected), (250, 0));
    let mut times = Vec::new();
    for (i, range) in [0..100, 100..200, 200..250].into_iter().enumerate() {
        let r = next_record(&mut sub).await;
        assert_eq!(r["seq"], json!(i + 1));
        assert_eq!(r["events"], json!(range.len()), "record {}", i + 1);
        assert_eq!(r["output"], json!(strings(range)), "record {}", i + 1);
        times.push(r["time_ms"].as_u64().expect("time_ms"));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the remainder waits for the timeout"
    );
    assert!(times[2] >= times[1] + 250, "{times:?}");
    assert_eq!(client.view("batch", None).await.expect("view"), json!([]));
    drop((client, sub));
    server.stop().await;
}

// 25 SENDs of 10 events to a threshold-100 bucket give outputs of exactly 100 events,
// whatever the batch boundaries, then the remainder at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_counts_across_small_sends() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .create_with(
            "batch",
            "list",
            None,
            &json!({"threshold": 100, "timeout": 0.3}),
        )
        .await
        .expect("create");
    let mut sub = client.subscribe("batch").await.expect("subscribe");
    let events = strings(0..250);
    let mut pending = Vec::new();
    for chunk in events.chunks(10) {
        pending.push(client.start_send("batch", chunk).await.expect("queued"));
    }
    for p in pending {
        assert_eq!(Client::finish_send(p).await.expect("sent").accepted, 10);
    }
    for (i, range) in [0..100, 100..200, 200..250].into_iter().enumerate() {
        let r = next_record(&mut sub).await;
        assert_eq!(r["seq"], json!(i + 1));
        assert_eq!(r["events"], json!(range.len()), "record {}", i + 1);
        assert_eq!(r["output"], json!(strings(range)), "record {}", i + 1);
    }
    drop((client, sub));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// subscribers

// Two subscriptions on two connections receive byte-identical records, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_identical_records() {
    let server = TestServer::start().await;
    let one = server.client().await;
    let two = server.client().await;
    one.create_with(
        "fan",
        "counter",
        None,
        &json!({"threshold": 2, "timeout": 5}),
    )
    .await
    .expect("create");
    let mut a = one.subscribe("fan").await.expect("subscribe");
    let mut b = two.subscribe("fan").await.expect("subscribe");
    for i in 0..3 {
        let k = format!("k{i}");
        one.send("fan", &[k.as_str(), k.as_str()])
            .await
            .expect("send");
    }
    for i in 0..3 {
        let ra = bounded("a", a.next()).await.expect("open").expect("output");
        let rb = bounded("b", b.next()).await.expect("open").expect("output");
        assert_eq!(ra, rb, "identical records");
        let r: Value = serde_json::from_slice(&ra).expect("json");
        assert_eq!(r["seq"], json!(i + 1));
        assert_eq!(r["output"], json!({ format!("k{i}"): 2 }));
    }
    let info = one.info(Some("fan")).await.expect("info");
    assert_eq!(info["subscribers"], 2, "{info}");
    drop((one, two, a, b));
    server.stop().await;
}

// After unsubscribe() returns, the connection still works and the other subscription of
// the same client receives later outputs; the bucket counts one subscriber less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_keeps_the_connection_and_other_subscriptions() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let sender = server.client().await;
    client
        .create_with("u", "counter", None, &json!({"threshold": 1, "timeout": 5}))
        .await
        .expect("create");
    let mut keep = client.subscribe("u").await.expect("subscribe");
    let mut gone = client.subscribe("u").await.expect("subscribe");
    assert_ne!(keep.id(), gone.id());
    sender.send("u", &["before"]).await.expect("send");
    let (rk, rg) = (next_record(&mut keep).await, next_record(&mut gone).await);
    assert_eq!(rk, rg);
    assert_eq!(rk["output"], json!({"before": 1}));
    assert_eq!(
        client.info(Some("u")).await.expect("info")["subscribers"],
        2
    );

    gone.unsubscribe().await.expect("unsubscribe");
    client.ping().await.expect("the connection still works");
    assert_eq!(client.view("u", None).await.expect("view"), json!({}));
    sender.send("u", &["after"]).await.expect("send");
    let r = next_record(&mut keep).await;
    assert_eq!((&r["seq"], &r["output"]), (&json!(2), &json!({"after": 1})));
    let info = client.info(Some("u")).await.expect("info");
    assert_eq!(info["subscribers"], 1, "{info}");
    drop((client, sender, keep));
    server.stop().await;
}

fn encode(id: u32, command: Command) -> BytesMut {
    let mut out = BytesMut::new();
    Request { id, command }.encode(&mut out);
    out
}

fn push_output(r: &Response) -> Value {
    assert_eq!(r.status, Status::Push, "{r:?}");
    let record: Value = serde_json::from_slice(&r.payload).expect("push is JSON");
    record["output"].clone()
}

// On the wire: once UNSUBSCRIBE's OK has arrived, no PUSH of that subscription follows,
// while the connection's other subscription keeps receiving every later output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_push_of_an_unsubscribed_id_follows_the_ok() {
    let server = TestServer::start().await;
    let sender = server.client().await;
    sender
        .create_with("u", "counter", None, &json!({"threshold": 1, "timeout": 5}))
        .await
        .expect("create");
    let mut raw = server.raw().await;
    let subscribe = |id| encode(id, Command::Subscribe { bucket: "u".into() });
    raw.write(&subscribe(10)).await;
    raw.write(&subscribe(11)).await;
    for id in [10, 11] {
        let r = bounded("SUBSCRIBE answer", raw.read())
            .await
            .expect("answer");
        assert_eq!((r.status, r.id), (Status::Ok, id), "{r:?}");
    }
    sender.send("u", &["before"]).await.expect("send");
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = bounded("push", raw.read()).await.expect("push");
        assert_eq!(push_output(&r), json!({"before": 1}));
        got.push(r.id);
    }
    got.sort_unstable();
    assert_eq!(got, [10, 11], "both subscriptions were live");

    raw.write(&encode(12, Command::Unsubscribe { subscription: 10 }))
        .await;
    let r = bounded("UNSUBSCRIBE answer", raw.read())
        .await
        .expect("answer");
    assert_eq!((r.status, r.id), (Status::Ok, 12), "{r:?}");

    for i in 0..5 {
        sender
            .send("u", &[format!("after{i}")])
            .await
            .expect("send");
    }
    for i in 0..5 {
        let r = bounded("push", raw.read()).await.expect("push");
        assert_eq!(r.id, 11, "a push for the unsubscribed id 10: {r:?}");
        assert_eq!(push_output(&r), json!({ format!("after{i}"): 1 }));
    }
    raw.write(&encode(13, Command::Unsubscribe { subscription: 10 }))
        .await;
    let (status, id, code, _) = bounded("answer", raw.read_error()).await;
    assert_eq!((status, id, code), (Status::Error, 13, 202));
    raw.write(&encode(14, Command::Ping(b"still".to_vec().into())))
        .await;
    let r = bounded("PING answer", raw.read()).await.expect("answer");
    assert_eq!(
        (r.status, r.id, &r.payload[..]),
        (Status::Ok, 14, &b"still"[..])
    );
    drop((sender, raw));
    server.stop().await;
}

// A connection that subscribes and then never reads is cut off as a slow consumer
// (FATAL 108, then the socket closes) and counted in `subscribers_lagged`, while
// another client keeps sending to and viewing the same buckets, promptly served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_disconnected() {
    const TICKS: usize = 40;
    let server = TestServer::start().await;
    let client = server.client().await;
    let often = json!({"every": 0.01, "emit_empty": true});
    client
        .create_with("firehose", "list", None, &often)
        .await
        .expect("create");
    let ticks: Vec<String> = (0..TICKS).map(|i| format!("tick-{i:02}")).collect();
    for t in &ticks {
        client
            .create_with(t, "counter", None, &often)
            .await
            .expect("create");
    }
    // One connection subscribes to all of them: its queue (1024 outputs) fills with
    // ~4000 outputs a second once its socket is full.
    let mut slow = server.raw().await;
    let buckets: Vec<&str> = std::iter::once("firehose")
        .chain(ticks.iter().map(String::as_str))
        .collect();
    for (i, b) in buckets.iter().enumerate() {
        let bucket = (*b).to_owned();
        slow.write(&encode(100 + i as u32, Command::Subscribe { bucket }))
            .await;
    }
    let mut answered = 0;
    while answered < buckets.len() {
        let r = bounded("SUBSCRIBE answers", slow.read())
            .await
            .expect("answer");
        match r.status {
            Status::Ok => answered += 1,
            Status::Push => {}
            _ => panic!("SUBSCRIBE failed: {r:?}"),
        }
    }
    // From here on `slow` is not read until the end.

    // Big outputs (1 MiB events through the list bucket, one per flush) fill the slow
    // connection's socket buffers, then the ticks' small outputs fill its queue.
    let big = vec![b'a'; 1 << 20];
    let started = Instant::now();
    for i in 0.. {
        let t = Instant::now();
        let info = client.info(Some("firehose")).await.expect("info");
        if info["subscribers_lagged"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the slow subscriber was never disconnected: {info}"
        );
        if info["pending"] == 0 {
            let outcome = client.send("firehose", &[&big]).await.expect("send");
            assert_eq!(outcome.accepted, 1);
        }
        let tick = &ticks[i % TICKS];
        let outcome = client.send(tick, &["k"]).await.expect("send");
        assert_eq!(outcome.accepted, 1);
        client.view(tick, None).await.expect("view");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "INFO, SEND and VIEW took {:?} with a slow subscriber",
            t.elapsed()
        );
    }

    // The normal client is unaffected.
    assert_eq!(
        client.view("firehose", Some(b"0")).await.expect("view"),
        json!([])
    );
    client.send("firehose", &["small"]).await.expect("send");
    client.ping().await.expect("ping");

    // The slow connection: whatever was buffered, then FATAL 108, then the end.
    let mut pushes = 0;
    let mut fatal = None;
    bounded("the slow connection to close", async {
        while let Some(r) = slow.read().await {
            match r.status {
                Status::Push => pushes += 1,
                Status::Fatal => fatal = Some(r.failure().expect("fatal").expect("code").0),
                other => panic!("unexpected {other:?} on the slow connection: {r:?}"),
            }
        }
    })
    .await;
    assert!(pushes > 0);
    assert_eq!(fatal, Some(108), "FATAL SLOW_CONSUMER before the close");
    let info = client.info(Some("firehose")).await.expect("info");
    assert_eq!(info["subscribers"], 0, "{info}");
    assert_eq!(info["subscribers_lagged"], 1, "{info}");
    drop((client, slow));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// forward and emit

// Bucket a (counter, every 0.1, forward b) puts each output record, as JSON text, into
// bucket b as one event; the counters of both say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_puts_records_into_the_next_bucket() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .create_with("b", "list", None, &json!({"threshold": 1, "timeout": 1}))
        .await
        .expect("create b");
    client
        .create_with("a", "counter", None, &json!({"every": 0.1, "forward": "b"}))
        .await
        .expect("create a");
    let mut sub_a = client.subscribe("a").await.expect("subscribe a");
    let mut sub_b = client.subscribe("b").await.expect("subscribe b");
    client.send("a", &["x", "y", "x"]).await.expect("send");

    let ra = next_record(&mut sub_a).await;
    assert_eq!(ra["output"], json!({"x": 2, "y": 1}));
    let rb = next_record(&mut sub_b).await;
    assert_eq!(rb["events"], 1);
    let texts = rb["output"].as_array().expect("list output");
    assert_eq!(texts.len(), 1, "{rb}");
    let forwarded: Value =
        serde_json::from_str(texts[0].as_str().expect("an event is text")).expect("JSON text");
    assert_eq!(forwarded, ra, "b received a's record");

    // Barriers: each bucket's thread has finished what it did before these answers (a
    // counts `forwarded` just after handing the event over, b `received` after applying).
    client.view("a", None).await.expect("a is done delivering");
    client
        .view("b", None)
        .await
        .expect("b has handled the event");
    let info_a = client.info(Some("a")).await.expect("info");
    let info_b = client.info(Some("b")).await.expect("info");
    assert_eq!(info_a["forwarded"], 1, "{info_a}");
    assert_eq!(info_a["forward_dropped"], 0, "{info_a}");
    assert_eq!(info_b["received"], 1, "{info_b}");
    drop((client, sub_a, sub_b));
    server.stop().await;
}

// A forward that would lead back to the bucket is refused, at CREATE and at ALTER, with
// INVALID_ARGUMENT naming the loop; the buckets keep their options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_loops_are_refused() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let err = client
        .create_with("s", "counter", None, &json!({"every": 1, "forward": "s"}))
        .await
        .expect_err("self loop");
    assert!(err.to_string().contains("forward loop"), "{err}");
    assert_eq!(code(err), Some(ErrorCode::InvalidArgument));
    assert_eq!(client.list().await.expect("list"), json!([]));

    client
        .create_with("c", "counter", None, &json!({"every": 1}))
        .await
        .expect("create c");
    client
        .create_with("b", "counter", None, &json!({"every": 1, "forward": "c"}))
        .await
        .expect("create b");
    client
        .create_with("a", "counter", None, &json!({"every": 1, "forward": "b"}))
        .await
        .expect("create a");
    let err = client
        .alter("c", &json!({"forward": "a"}))
        .await
        .expect_err("loop through a and b");
    assert!(err.to_string().contains("forward loop"), "{err}");
    assert_eq!(code(err), Some(ErrorCode::InvalidArgument));
    let info = client.info(Some("c")).await.expect("info");
    assert_eq!(info["options"], json!({"every": 1.0}), "{info}");

    // A forward to a bucket whose chain ends elsewhere is fine.
    client
        .create_with("d", "counter", None, &json!({"every": 1, "forward": "a"}))
        .await
        .expect("no loop");
    let err = client
        .create_with("x", "counter", None, &json!({"every": 1, "forward": "x"}))
        .await
        .expect_err("self loop");
    assert_eq!(code(err), Some(ErrorCode::InvalidArgument));
    drop(client);
    server.stop().await;
}

/// Keeps its events; each flush emits every one of them to `config.target` and outputs
/// how many it emitted.
const EMITTER: &str = r#"
local H = {}
function H.init(config) return {target = config.target, keys = {}} end
function H.send(s, e) s.keys[#s.keys + 1] = e end
function H.view(s) return #s.keys end
function H.dump(s) local n = #s.keys; s.keys = {}; return n end
function H.flush(s, ctx)
  for _, k in ipairs(s.keys) do ctx.emit(s.target, k) end
  local n = #s.keys
  s.keys = {}
  return n
end
return H
"#;

// A handler's flush that calls ctx.emit for each of its events delivers them, in order,
// into the target bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitted_events_reach_their_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_handler(dir.path(), "emitter", EMITTER);
    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    client
        .create_with(
            "target",
            "list",
            None,
            &json!({"threshold": 3, "timeout": 5}),
        )
        .await
        .expect("create target");
    client
        .create_with(
            "src",
            "emitter",
            Some(&json!({"target": "target"})),
            &json!({"threshold": 3, "timeout": 5}),
        )
        .await
        .expect("create src");
    let mut sub_src = client.subscribe("src").await.expect("subscribe");
    let mut sub_target = client.subscribe("target").await.expect("subscribe");
    client.send("src", &["k1", "k2", "k3"]).await.expect("send");
    let r = next_record(&mut sub_src).await;
    assert_eq!((&r["events"], &r["output"]), (&json!(3), &json!(3)));
    let r = next_record(&mut sub_target).await;
    assert_eq!(r["output"], json!(["k1", "k2", "k3"]));
    client
        .view("src", None)
        .await
        .expect("src is done delivering");
    client
        .view("target", None)
        .await
        .expect("target has handled the events");
    assert_eq!(
        client.info(Some("src")).await.expect("info")["forwarded"],
        3
    );
    assert_eq!(
        client.info(Some("target")).await.expect("info")["received"],
        3
    );
    drop((client, sub_src, sub_target));
    server.stop().await;
}

// A handler that emits its events back into its own bucket (threshold 1) loops, but the
// loop dies out at the hop limit: an event is dropped and counted in forward_dropped,
// outputs stop, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_loop_dies_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_handler(dir.path(), "emitter", EMITTER);
    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    client
        .create_with(
            "echo",
            "emitter",
            Some(&json!({"target": "echo"})),
            &json!({"threshold": 1, "timeout": 5}),
        )
        .await
        .expect("create");
    let mut sub = client.subscribe("echo").await.expect("subscribe");
    client.send("echo", &["ping"]).await.expect("send");
    // The loop runs on while the records are read: wait for the drop, then for the
    // bucket to be idle, then read every record it produced.
    let mut records = 0u64;
    loop {
        let r = next_record(&mut sub).await;
        records += 1;
        assert_eq!(r["seq"], json!(records));
        assert_eq!((&r["events"], &r["output"]), (&json!(1), &json!(1)));
        let info = client.info(Some("echo")).await.expect("info");
        if info["forward_dropped"].as_u64() >= Some(1) {
            break;
        }
        assert!(records < 20, "the loop does not die out: {info}");
    }
    // Two round trips through the bucket's mailbox: nothing more is flowing.
    let mut outputs = None;
    for _ in 0..2 {
        assert_eq!(client.view("echo", None).await.expect("view"), json!(0));
        let info = client.info(Some("echo")).await.expect("info");
        let n = info["outputs"].as_u64().expect("outputs");
        assert_eq!(*outputs.get_or_insert(n), n, "still flushing: {info}");
        assert_eq!(info["pending"], 0, "{info}");
        assert_eq!(info["forward_dropped"], 1, "{info}");
        assert_eq!(info["received"], n - 1, "{info}");
        assert_eq!(info["forwarded"], n - 1, "{info}");
    }
    let outputs = outputs.expect("outputs");
    // The client's event has no hop; flushes 1 to 8 pass it on (hops 1 to 8), and what
    // the 9th would pass on would be a 9th hop (spec §8).
    assert_eq!(outputs, 9, "flushes before the loop died out");
    while records < outputs {
        let r = next_record(&mut sub).await;
        records += 1;
        assert_eq!(r["seq"], json!(records));
    }
    client
        .create("other", "counter", None)
        .await
        .expect("create");
    client.send("other", &["k"]).await.expect("send");
    assert_eq!(
        client.view("other", None).await.expect("view"),
        json!({"k": 1})
    );
    drop((client, sub));
    server.stop().await;
}

// CREATE and ALTER check the sinks' permissions: forwarding needs `send` on the target,
// and exec needs `admin` (302 even where exec is disabled: permissions come first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_need_permissions() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin
        .create("secret", "counter", None)
        .await
        .expect("create");
    admin.create("open", "list", None).await.expect("create");
    admin.user_add("bob", "bob-password").await.expect("user");
    admin.user_grant("bob", "create", "*").await.expect("grant");
    admin
        .user_grant("bob", "send", "open")
        .await
        .expect("grant");
    let bob = server.client_as("bob", "bob-password").await;

    let err = bob
        .create_with(
            "mine",
            "counter",
            None,
            &json!({"every": 1, "forward": "secret"}),
        )
        .await
        .expect_err("no send on secret");
    assert_eq!(code(err), Some(ErrorCode::PermissionDenied));
    bob.create_with(
        "mine",
        "counter",
        None,
        &json!({"every": 1, "forward": "open"}),
    )
    .await
    .expect("send on open suffices");
    let err = bob
        .alter("mine", &json!({"forward": "secret"}))
        .await
        .expect_err("no send on secret");
    assert!(err.to_string().contains("secret"), "{err}");
    assert_eq!(code(err), Some(ErrorCode::PermissionDenied));

    let err = bob
        .create_with(
            "runs",
            "counter",
            None,
            &json!({"every": 1, "exec": "true"}),
        )
        .await
        .expect_err("exec needs admin");
    assert_eq!(code(err), Some(ErrorCode::PermissionDenied));
    let err = bob
        .alter("mine", &json!({"exec": "true"}))
        .await
        .expect_err("exec needs admin");
    assert_eq!(code(err), Some(ErrorCode::PermissionDenied));

    let info = admin.info(Some("mine")).await.expect("info");
    assert_eq!(
        info["options"],
        json!({"every": 1.0, "forward": "open"}),
        "{info}"
    );
    assert_eq!(
        admin.list().await.expect("list"),
        json!([
            {"name": "mine", "handler": "counter"},
            {"name": "open", "handler": "list"},
            {"name": "secret", "handler": "counter"},
        ])
    );
    drop((admin, bob));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// exec

/// A daemon that may run exec sinks, with its run directories in `dir/exec`.
fn exec_config(dir: &Path) -> Config {
    let mut config = config_in(dir);
    config.allow_exec = true;
    config.exec_dir = Some(dir.join("exec"));
    config
}

fn quoted(path: &Path) -> String {
    let s = path.display().to_string();
    assert!(!s.contains('\''), "{s}");
    format!("'{s}'")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

// An exec sink on a threshold-100 bucket: 250 events in one SEND make three runs of
// 100, 100 and 50 event files named by 12-digit increasing numbers, holding the events,
// with the environment and output.json describing the flush; each successful run's
// directory is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_command_per_flush_with_the_events_as_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let results = dir.path().join("results");
    std::fs::create_dir(&results).expect("mkdir");
    let server = TestServer::start_with(exec_config(dir.path())).await;
    let client = server.client().await;
    let command = format!(
        r#"d={}/$BUCKETLY_SEQ && mkdir -p "$d/inbox" && ls "$BUCKETLY_INBOX" > "$d/ls" && echo "$BUCKETLY_SEQ $BUCKETLY_EVENTS $BUCKETLY_BUCKET" > "$d/env" && cp "$BUCKETLY_OUTPUT" "$d/output.json" && cp "$BUCKETLY_INBOX"/* "$d/inbox/" && pwd > "$d/pwd" && touch "$d/done""#,
        quoted(&results)
    );
    client
        .create_with(
            "jobs",
            "list",
            None,
            &json!({"threshold": 100, "timeout": 0.5, "exec": command}),
        )
        .await
        .expect("create");
    let events = strings(0..250);
    let outcome = client.send("jobs", &events).await.expect("send");
    assert_eq!(outcome.accepted, 250);

    let results_dir = &results;
    poll("three recorded runs", || async move {
        (1..=3)
            .all(|seq| results_dir.join(format!("{seq}/done")).exists())
            .then_some(())
    })
    .await;

    let mut run_dirs = Vec::new();
    let mut number = 1u64;
    for (seq, range) in [(1, 0..100), (2, 100..200), (3, 200..250)] {
        let d = results.join(seq.to_string());
        let names = lines(&d.join("ls"));
        let expected: Vec<String> = (number..number + range.len() as u64)
            .map(|n| format!("{n:012}"))
            .collect();
        assert_eq!(names, expected, "inbox of run {seq}");
        number += range.len() as u64;
        for (name, event) in names.iter().zip(&events[range.clone()]) {
            let content = std::fs::read(d.join("inbox").join(name)).expect("event file");
            assert_eq!(content, event.as_bytes(), "file {name} of run {seq}");
        }
        assert_eq!(
            lines(&d.join("env")),
            [format!("{seq} {} jobs", range.len())]
        );
        let output: Value =
            serde_json::from_slice(&std::fs::read(d.join("output.json")).expect("output.json"))
                .expect("output.json is JSON");
        assert_eq!(output["seq"], seq);
        assert_eq!(output["bucket"], "jobs");
        assert_eq!(output["events"], json!(range.len()));
        assert_eq!(output["output"], json!(events[range]));
        let run_dir = PathBuf::from(lines(&d.join("pwd")).remove(0));
        assert!(
            run_dir.starts_with(dir.path().join("exec").join("jobs")),
            "{}",
            run_dir.display()
        );
        run_dirs.push(run_dir);
    }
    let run_dirs = &run_dirs;
    poll("the run directories to be removed", || async move {
        run_dirs.iter().all(|d| !d.exists()).then_some(())
    })
    .await;
    let c = &client;
    let info = poll("INFO to count the runs", || async move {
        let info = c.info(Some("jobs")).await.expect("info");
        (info["exec"]["runs"] == 3).then_some(info)
    })
    .await;
    let exec = &info["exec"];
    assert_eq!(
        (&exec["failures"], &exec["timeouts"], &exec["skipped"]),
        (&json!(0), &json!(0), &json!(0)),
        "{info}"
    );
    assert_eq!(exec["last"]["seq"], 3, "{info}");
    assert_eq!(exec["last"]["events"], 50, "{info}");
    assert_eq!(exec["last"]["ok"], true, "{info}");
    assert_eq!(exec["last"]["kept"], Value::Null, "{info}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("exec").join("jobs"))
        .expect("bucket exec dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(client);
    server.stop().await;
}

// Without allow_exec, CREATE and ALTER with an exec sink get EXEC_DISABLED (405).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_is_refused_unless_allowed() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let err = client
        .create_with(
            "jobs",
            "list",
            None,
            &json!({"threshold": 1, "timeout": 1, "exec": "true"}),
        )
        .await
        .expect_err("exec disabled");
    assert_eq!(err.code(), Some(ErrorCode::ExecDisabled), "{err}");
    assert_eq!(client.list().await.expect("list"), json!([]));
    client
        .create_with("jobs", "list", None, &json!({"threshold": 1, "timeout": 1}))
        .await
        .expect("create");
    let err = client
        .alter("jobs", &json!({"exec": "true"}))
        .await
        .expect_err("exec disabled");
    assert_eq!(err.code(), Some(ErrorCode::ExecDisabled), "{err}");
    let info = client.info(Some("jobs")).await.expect("info");
    assert_eq!(info["exec"], Value::Null, "{info}");
    drop(client);
    server.stop().await;
}

// A command that exits 3 is counted as a failure, INFO names its exit status and stderr,
// and its run directory (inbox and output.json) is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_exec_keeps_its_run_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(exec_config(dir.path())).await;
    let client = server.client().await;
    client
        .create_with(
            "fails",
            "list",
            None,
            &json!({"threshold": 1, "timeout": 1, "exec": "echo oops >&2; exit 3"}),
        )
        .await
        .expect("create");
    client.send("fails", &["ev1"]).await.expect("send");
    let c = &client;
    let info = poll("the run to be recorded", || async move {
        let info = c.info(Some("fails")).await.expect("info");
        (info["exec"]["runs"].as_u64() >= Some(1)).then_some(info)
    })
    .await;
    let exec = &info["exec"];
    assert!(exec["failures"].as_u64() >= Some(1), "{info}");
    let last = &exec["last"];
    assert_eq!(last["ok"], false, "{info}");
    let status = last["status"].as_str().expect("status");
    assert!(status.contains("exit status 3"), "{status}");
    assert!(
        last["stderr_tail"]
            .as_str()
            .expect("stderr")
            .contains("oops"),
        "{info}"
    );
    let kept = PathBuf::from(last["kept"].as_str().expect("kept directory"));
    assert!(
        kept.starts_with(dir.path().join("exec").join("fails")),
        "{}",
        kept.display()
    );
    assert_eq!(
        std::fs::read(kept.join("inbox/000000000001")).expect("kept event"),
        b"ev1"
    );
    let output: Value =
        serde_json::from_slice(&std::fs::read(kept.join("output.json")).expect("output.json"))
            .expect("JSON");
    assert_eq!(output["output"], json!(["ev1"]));
    drop(client);
    server.stop().await;
}

/// The state letter of process `pid` in /proc, `None` once it is gone.
fn process_state(pid: &str) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

// A command still running at exec_timeout is killed with its process group and counted
// as a timeout; meanwhile the bucket keeps answering VIEW quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_exec_is_killed_at_its_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("sleep.pid");
    let server = TestServer::start_with(exec_config(dir.path())).await;
    let client = server.client().await;
    let command = format!("sleep 30 & echo $! > {}; wait", quoted(&pidfile));
    client
        .create_with(
            "hangs",
            "list",
            None,
            &json!({"threshold": 1, "timeout": 1, "exec": command, "exec_timeout": 0.3}),
        )
        .await
        .expect("create");
    let started = Instant::now();
    client.send("hangs", &["x"]).await.expect("send");
    // VIEW keeps answering quickly while the command hangs, until it is killed.
    let deadline = Instant::now() + PATIENCE;
    let mut views = 0;
    let info = loop {
        let t = Instant::now();
        assert_eq!(client.view("hangs", None).await.expect("view"), json!([]));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "VIEW took {:?}",
            t.elapsed()
        );
        views += 1;
        let info = client.info(Some("hangs")).await.expect("info");
        if info["exec"]["timeouts"].as_u64() >= Some(1) {
            break info;
        }
        assert!(Instant::now() < deadline, "no timeout recorded: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(views >= 2, "VIEW was answered while the command hung");
    assert!(started.elapsed() < Duration::from_secs(10));
    let last = &info["exec"]["last"];
    assert_eq!(last["ok"], false, "{info}");
    assert!(
        last["status"]
            .as_str()
            .expect("status")
            .contains("killed after the timeout"),
        "{info}"
    );
    assert!(info["exec"]["failures"].as_u64() >= Some(1), "{info}");
    assert!(last["duration_ms"].as_u64() < Some(5000), "{info}");
    // The backgrounded sleep was in the command's process group: it is gone (or a
    // zombie waiting for a reaper that is not ours).
    let pid = lines(&pidfile).remove(0);
    let pid = &pid;
    poll("the sleep to be killed", || async move {
        matches!(process_state(pid), None | Some('Z')).then_some(())
    })
    .await;
    drop(client);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// ALTER, RELOAD, restart

// ALTER gives a bucket a schedule that flushes the events sent before it (the state is
// kept); `null` removes it again; a bad ALTER is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_changes_the_schedule_and_keeps_the_state() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create("alt", "counter", None).await.expect("create");
    let mut sub = client.subscribe("alt").await.expect("subscribe");
    client.send("alt", &["a", "b", "a"]).await.expect("send");
    client
        .alter("alt", &json!({"every": 0.1}))
        .await
        .expect("alter");
    let r = next_record(&mut sub).await;
    assert_eq!(r["seq"], 1);
    assert_eq!(
        (&r["events"], &r["output"]),
        (&json!(3), &json!({"a": 2, "b": 1}))
    );
    let info = client.info(Some("alt")).await.expect("info");
    assert_eq!(info["options"], json!({"every": 0.1}), "{info}");

    client
        .alter("alt", &json!({"every": null}))
        .await
        .expect("remove the schedule");
    assert_eq!(
        client.info(Some("alt")).await.expect("info")["options"],
        json!({})
    );
    client.send("alt", &["c"]).await.expect("send");
    server_clock_passes(&server, now_ms() + 350).await;
    assert_eq!(
        client.view("alt", None).await.expect("view"),
        json!({"c": 1})
    );
    let info = client.info(Some("alt")).await.expect("info");
    assert_eq!(
        (&info["outputs"], &info["pending"]),
        (&json!(1), &json!(1)),
        "{info}"
    );

    for bad in [
        json!({"evry": 1}),
        json!({"every": 0}),
        json!({"threshold": 5}),
        json!({"every": 1, "threshold": 5, "timeout": 1}),
    ] {
        let err = client.alter("alt", &bad).await.expect_err("bad options");
        assert_eq!(code(err), Some(ErrorCode::InvalidArgument), "{bad}");
    }
    let err = client
        .alter("alt", &json!({"evry": 1}))
        .await
        .expect_err("unknown option");
    assert!(err.to_string().contains("unknown bucket option"), "{err}");
    let info = client.info(Some("alt")).await.expect("info");
    assert_eq!(info["options"], json!({}), "{info}");
    assert_eq!(
        client.view("alt", None).await.expect("view"),
        json!({"c": 1})
    );
    let err = client
        .alter("nope", &json!({"every": 1}))
        .await
        .expect_err("no bucket");
    assert_eq!(code(err), Some(ErrorCode::NoSuchBucket));
    drop((client, sub));
    server.stop().await;
}

const FRESH: &str = r#"
local H = {}
function H.init() return {n = 0} end
function H.send(s, e) s.n = s.n + #e end
function H.view(s) return {bytes = s.n} end
function H.dump(s) local n = s.n; s.n = 0; return {bytes = n} end
return H
"#;

// A handler file written after the start is served after RELOAD (admin only), and a
// file that does not load is named in the warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_picks_up_new_handler_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("handlers")).expect("mkdir");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let admin = server.client().await;
    admin
        .user_add("carol", "carol-password")
        .await
        .expect("user");
    admin
        .user_grant("carol", "create", "*")
        .await
        .expect("grant");
    let carol = server.client_as("carol", "carol-password").await;

    write_handler(dir.path(), "fresh", FRESH);
    write_handler(dir.path(), "broken", "return {");
    let err = admin
        .create("f", "fresh", None)
        .await
        .expect_err("not loaded yet");
    assert_eq!(code(err), Some(ErrorCode::NoSuchHandler));

    let err = carol.reload().await.expect_err("admin only");
    assert_eq!(code(err), Some(ErrorCode::PermissionDenied));
    let err = carol
        .create("f", "fresh", None)
        .await
        .expect_err("still not loaded");
    assert_eq!(code(err), Some(ErrorCode::NoSuchHandler));

    let reloaded = admin.reload().await.expect("reload");
    let handlers: Vec<&str> = reloaded["handlers"]
        .as_array()
        .expect("handlers")
        .iter()
        .map(|h| h.as_str().expect("name"))
        .collect();
    assert!(handlers.contains(&"fresh"), "{reloaded}");
    assert!(handlers.contains(&"counter"), "{reloaded}");
    assert!(!handlers.contains(&"broken"), "{reloaded}");
    let warnings = reloaded["warnings"].to_string();
    assert!(warnings.contains("broken"), "{reloaded}");

    admin.create("f", "fresh", None).await.expect("create");
    admin.send("f", &["abc", "de"]).await.expect("send");
    assert_eq!(
        admin.view("f", None).await.expect("view"),
        json!({"bytes": 5})
    );
    let info = admin.info(None).await.expect("info");
    assert!(info["handlers"].to_string().contains("fresh"), "{info}");
    drop((admin, carol));
    server.stop().await;
}

// A bucket's options survive a restart: its schedule runs again and outputs reach a new
// subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_schedule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    client
        .create_with("tick", "counter", None, &json!({"every": 0.1}))
        .await
        .expect("create");
    drop(client);
    server.stop().await;

    let server = TestServer::start_with(config_in(dir.path())).await;
    let client = server.client().await;
    let info = client.info(Some("tick")).await.expect("info");
    assert_eq!(info["options"], json!({"every": 0.1}), "{info}");
    let mut sub = client.subscribe("tick").await.expect("subscribe");
    client.send("tick", &["a", "a"]).await.expect("send");
    let r = next_record(&mut sub).await;
    assert_eq!(r["seq"], 1, "seq starts again at 1");
    assert_eq!((&r["events"], &r["output"]), (&json!(2), &json!({"a": 2})));
    drop((client, sub));
    server.stop().await;
}
