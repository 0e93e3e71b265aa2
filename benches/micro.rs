//! Criterion micro-benchmarks of the hot paths below the network: the SEND codec, the
//! `send` of each stock handler, and the bare Rust→Lua call. No daemon, no socket; for
//! end-to-end throughput see the `send` and `durable` benches.
//!
//! Run all of them with `cargo bench --bench micro` (about a minute: each benchmark
//! warms up for 0.5 s and measures 20 samples over 2 s). A filter after `--` picks
//! benchmarks by name, e.g. `cargo bench --bench micro -- codec` or
//! `cargo bench --bench micro -- handler_send/stats`.
//!
//! Groups (throughput is in events, or calls, per second):
//! - `codec`: a SEND frame of 1 or 100 events of 24 bytes each.
//!   - `encode`: `Request::encode` of a prepared request into a reused buffer;
//!   - `encode_from_events`: the client's whole path, `SendBatch::from_events` from
//!     `&[String]` and then `Request::encode`;
//!   - `decode`: `Request::decode` of the frame body (what the server does per frame);
//!   - `decode_iter`: `decode`, then walking the batch's events, as the bucket does;
//!   - `check_frame/1000`: `check_frame` over a buffer of 1,000 one-event frames,
//!     advancing frame by frame (frames = events here).
//! - `handler_send`: `HandlerInstance::send` of one event, per stock handler, cycling
//!   through 1,000 prepared events so that after warm-up the state has stopped growing
//!   (the steady state of a busy bucket, not the first-sight cost of new keys).
//! - `lua_call`: the fixed cost of one call into Lua, through a handler whose `send`
//!   does nothing and whose `view` returns 0 (`noop_send`, `noop_view`), next to a
//!   `view` of one key and of all 1,000 keys of a `counter` (the whole aggregate
//!   converted to JSON; throughput in keys).
//! - `table`: the lookup the native `counter` does per event (`get_mut` of a present
//!   key by its bytes), in a table of 1,000 keys of 16 hex digits (what `bucketly
//!   bench` sends), hashed with the standard SipHash-1-3 (`siphash13`) and with the
//!   keyed foldhash the native tables use (`foldhash`).

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use bucketly::config::DEFAULT_MAX_FRAME;
use bucketly::protocol::{check_frame, Command, Request, SendBatch, FRAME_HEADER_LEN};
use bucketly::script::{HandlerCatalog, HandlerInstance, HandlerSource, Origin, ScriptLimits};

/// Events each `handler_send` benchmark cycles through.
const ROTATION: usize = 1000;

/// The `i`-th of a family of 24-byte events: a path and a query, like a click log.
fn click(i: usize) -> String {
    format!(
        "/page/{:03}?session={:06}",
        i % 1000,
        (i * 7919) % 1_000_000
    )
}

fn send_request(events: &[String]) -> Request {
    Request {
        id: 7,
        command: Command::Send {
            bucket: "clicks".into(),
            batch: SendBatch::from_events(events),
        },
    }
}

/// The frame body (without its length prefix), as the server hands it to `decode`.
fn frame_body(request: &Request) -> Bytes {
    let mut out = BytesMut::new();
    request.encode(&mut out);
    out.freeze().slice(FRAME_HEADER_LEN..)
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for n in [1usize, 100] {
        let events: Vec<String> = (0..n).map(click).collect();
        let request = send_request(&events);
        let body = frame_body(&request);
        let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + body.len());
        g.throughput(Throughput::Elements(n as u64));

        g.bench_function(BenchmarkId::new("encode", n), |b| {
            b.iter(|| {
                out.clear();
                black_box(&request).encode(&mut out);
                black_box(out.len())
            })
        });
        g.bench_function(BenchmarkId::new("encode_from_events", n), |b| {
            b.iter(|| {
                out.clear();
                send_request(black_box(&events)).encode(&mut out);
                black_box(out.len())
            })
        });
        g.bench_function(BenchmarkId::new("decode", n), |b| {
            b.iter(|| Request::decode(black_box(body.clone())).expect("a valid SEND frame"))
        });
        g.bench_function(BenchmarkId::new("decode_iter", n), |b| {
            b.iter(|| {
                let request = Request::decode(black_box(body.clone())).expect("a valid SEND");
                let Command::Send { batch, .. } = request.command else {
                    unreachable!("decoded a SEND frame");
                };
                batch.iter().map(<[u8]>::len).sum::<usize>()
            })
        });
    }

    const FRAMES: usize = 1000;
    let mut stream = BytesMut::new();
    for i in 0..FRAMES {
        send_request(&[click(i)]).encode(&mut stream);
    }
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function(BenchmarkId::new("check_frame", FRAMES), |b| {
        b.iter(|| {
            let mut rest: &[u8] = black_box(&stream);
            let mut frames = 0usize;
            while let Some(len) = check_frame(rest, DEFAULT_MAX_FRAME).expect("valid framing") {
                rest = &rest[FRAME_HEADER_LEN + len..];
                frames += 1;
            }
            assert_eq!(frames, FRAMES);
            frames
        })
    });
    g.finish();
}

/// A stock handler with a config it accepts and `ROTATION` events it accepts.
fn instance(name: &str, config: serde_json::Value) -> HandlerInstance {
    let source = HandlerCatalog::stock()
        .get(name)
        .unwrap_or_else(|| panic!("no stock handler {name}"));
    HandlerInstance::new(&source, &config, &ScriptLimits::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Events in the format each handler's header comment gives.
fn handler_events(name: &str) -> Vec<Vec<u8>> {
    (0..ROTATION)
        .map(|i| {
            let event = match name {
                // KEY: 1,000 distinct keys.
                "counter" => click(i),
                // KEY MEMBER: 100 keys of 10 members each.
                "unique" => format!("/page/{:03} user-{:06}", i % 100, (i * 7919) % 1_000_000),
                // Any bytes.
                "list" => click(i),
                // KEY VALUE: 100 keys, each value overwritten.
                "latest" => format!("/page/{:03} status={}", i % 100, i),
                // A number: integers, with every fourth event a float.
                "stats" if i % 4 == 0 => format!("{}.25", (i * 7919) % 100_000),
                "stats" => format!("{}", (i * 7919) % 100_000),
                other => panic!("no events for handler {other}"),
            };
            event.into_bytes()
        })
        .collect()
}

fn handler_send(c: &mut Criterion) {
    let mut g = c.benchmark_group("handler_send");
    g.throughput(Throughput::Elements(1));
    let cases = [
        ("counter", serde_json::Value::Null),
        ("unique", serde_json::Value::Null),
        ("list", serde_json::json!({ "max": 1000 })),
        ("latest", serde_json::Value::Null),
        ("stats", serde_json::json!({ "max_samples": 10000 })),
    ];
    for (name, config) in cases {
        let mut h = instance(name, config);
        let events = handler_events(name);
        for e in &events {
            h.send(e)
                .unwrap_or_else(|why| panic!("{name} rejected an event: {why}"));
        }
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                let event = &events[i % ROTATION];
                i = i.wrapping_add(1);
                h.send(black_box(event)).expect("event accepted")
            })
        });
    }
    g.finish();
}

/// A handler that does nothing, to measure the call itself: copying the event into a
/// Lua string, the time-budget bookkeeping, the call and reading its results.
const NOOP: &str = r#"
local H = {}
function H.send(state, event) end
function H.view(state, arg) return 0 end
function H.dump(state) return 0 end
return H
"#;

fn lua_call(c: &mut Criterion) {
    let mut g = c.benchmark_group("lua_call");
    g.throughput(Throughput::Elements(1));
    let noop = HandlerSource {
        name: "noop".into(),
        source: NOOP.into(),
        // Inline source, like the crate's own tests of ad-hoc handlers.
        origin: Origin::Stock,
    };
    let mut h = HandlerInstance::new(&noop, &serde_json::Value::Null, &ScriptLimits::default())
        .expect("the noop handler loads");
    let event = click(1).into_bytes();
    g.bench_function("noop_send", |b| {
        b.iter(|| h.send(black_box(&event)).expect("noop accepts everything"))
    });
    g.bench_function("noop_view", |b| {
        b.iter(|| h.view(black_box(None)).expect("noop view"))
    });

    let mut counter = instance("counter", serde_json::Value::Null);
    for e in handler_events("counter") {
        counter.send(&e).expect("counter accepts a key");
    }
    let key = click(1).into_bytes();
    g.bench_function("counter_view_key", |b| {
        b.iter(|| counter.view(black_box(Some(&key))).expect("counter view K"))
    });
    g.throughput(Throughput::Elements(ROTATION as u64));
    g.bench_function(BenchmarkId::new("counter_view_all", ROTATION), |b| {
        b.iter(|| counter.view(black_box(None)).expect("counter view"))
    });
    g.finish();
}

fn table_with<S: std::hash::BuildHasher + Default>(c: &mut Criterion, name: &str) {
    let keys: Vec<Vec<u8>> = (0..ROTATION)
        .map(|i| format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).into_bytes())
        .collect();
    let mut table: std::collections::HashMap<Box<[u8]>, i64, S> = Default::default();
    for k in &keys {
        table.insert(k.as_slice().into(), 0);
    }
    let mut i = 0usize;
    c.benchmark_group("table")
        .throughput(Throughput::Elements(1))
        .bench_function(name, |b| {
            b.iter(|| {
                let key = &keys[i % ROTATION];
                i = i.wrapping_add(1);
                if let Some(n) = table.get_mut(black_box(key.as_slice())) {
                    *n += 1;
                }
            })
        });
}

fn table(c: &mut Criterion) {
    table_with::<std::collections::hash_map::RandomState>(c, "siphash13");
    table_with::<foldhash::quality::RandomState>(c, "foldhash");
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = micro;
    config = config();
    targets = codec, handler_send, lua_call, table
}
criterion_main!(micro);
