//! The five stock handlers (`handlers/*.lua`, embedded in the binary), driven through
//! [`HandlerInstance`] without a daemon: each handler's view, view ARG, dump, rejections,
//! whitespace handling and config validation, as documented in `handlers/README.md`.

use std::collections::VecDeque;

use bucketly::script::{HandlerCatalog, HandlerInstance, ScriptLimits};
use serde_json::{json, Value};

/// A fresh instance of stock handler `name` with `config` and the default limits.
fn handler(name: &str, config: Value) -> HandlerInstance {
    try_handler(name, config, &ScriptLimits::default())
        .unwrap_or_else(|e| panic!("creating {name}: {e}"))
}

fn try_handler(
    name: &str,
    config: Value,
    limits: &ScriptLimits,
) -> Result<HandlerInstance, String> {
    let catalog = HandlerCatalog::stock();
    let source = catalog.get(name).expect("a stock handler");
    HandlerInstance::new(&source, &config, limits).map_err(|e| e.to_string())
}

/// The error message `init` raises for `config`.
fn config_error(name: &str, config: Value) -> String {
    match try_handler(name, config.clone(), &ScriptLimits::default()) {
        Ok(_) => panic!("{name} accepted config {config}"),
        Err(e) => e,
    }
}

fn send_all(h: &mut HandlerInstance, events: &[&str]) {
    for e in events {
        h.send(e.as_bytes())
            .unwrap_or_else(|r| panic!("event {e:?} rejected: {r}"));
    }
}

/// The reason `event` is rejected with.
fn rejection(h: &mut HandlerInstance, event: &[u8]) -> String {
    match h.send(event) {
        Ok(()) => panic!("event {:?} accepted", String::from_utf8_lossy(event)),
        Err(reason) => reason,
    }
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("invalid JSON {:?}: {e}", String::from_utf8_lossy(bytes)))
}

fn view(h: &mut HandlerInstance) -> Value {
    parse(&h.view(None).expect("view"))
}

fn view_arg(h: &mut HandlerInstance, arg: &str) -> Value {
    parse(&h.view(Some(arg.as_bytes())).expect("view ARG"))
}

fn dump(h: &mut HandlerInstance) -> Value {
    parse(&h.dump().expect("dump"))
}

#[test]
fn the_stock_catalog_has_the_five_handlers() {
    let catalog = HandlerCatalog::stock();
    for name in ["counter", "unique", "stats", "list", "latest"] {
        assert!(catalog.get(name).is_some(), "{name} missing");
    }
    assert!(catalog.get("nonexistent").is_none());
}

#[test]
fn handlers_without_config_accept_null_and_empty_object_and_reject_anything_else() {
    for name in ["counter", "unique", "latest"] {
        handler(name, json!(null));
        handler(name, json!({}));
        assert!(config_error(name, json!({"max": 3})).contains("no config"));
        assert!(config_error(name, json!(5)).contains("no config"));
    }
}

// ---- counter ----------------------------------------------------------------------

#[test]
fn counter_counts_trimmed_keys() {
    let mut h = handler("counter", json!(null));
    assert_eq!(view(&mut h), json!({}));
    send_all(&mut h, &["a", " a\n", "b", "\tb \r\n", "c", "x y"]);
    assert_eq!(view(&mut h), json!({"a": 2, "b": 2, "c": 1, "x y": 1}));
    assert_eq!(view_arg(&mut h, "a"), json!(2));
    assert_eq!(view_arg(&mut h, "  b\t"), json!(2));
    assert_eq!(view_arg(&mut h, "x y"), json!(1));
    assert_eq!(view_arg(&mut h, "absent"), json!(0));
}

#[test]
fn counter_rejects_empty_events_and_keeps_the_rest_of_its_state() {
    let mut h = handler("counter", json!(null));
    send_all(&mut h, &["a"]);
    for event in [&b""[..], b" ", b"\t\r\n \x0b\x0c"] {
        assert!(rejection(&mut h, event).contains("empty"));
    }
    assert_eq!(view(&mut h), json!({"a": 1}));
}

#[test]
fn counter_keys_are_bytes() {
    let mut h = handler("counter", json!(null));
    h.send(b"\xff").expect("accepted");
    assert_eq!(parse(&h.view(Some(b"\xff")).expect("view")), json!(1));
    assert_eq!(view(&mut h), json!({"\u{fffd}": 1}));
}

#[test]
fn counter_dump_returns_the_view_then_resets() {
    let mut h = handler("counter", json!(null));
    send_all(&mut h, &["a", "a", "b"]);
    assert_eq!(dump(&mut h), json!({"a": 2, "b": 1}));
    assert_eq!(view(&mut h), json!({}));
    assert_eq!(view_arg(&mut h, "a"), json!(0));
    assert_eq!(dump(&mut h), json!({}));
    send_all(&mut h, &["a"]);
    assert_eq!(view(&mut h), json!({"a": 1}));
}

// ---- unique -----------------------------------------------------------------------

#[test]
fn unique_counts_distinct_members_per_key() {
    let mut h = handler("unique", json!(null));
    assert_eq!(view(&mut h), json!({}));
    send_all(
        &mut h,
        &[
            "home alice",
            "home bob",
            "home alice",
            " home   bob \n",
            "cart bob",
            "q a b",
            "q a  b",
        ],
    );
    // The member is everything after the first space, trimmed: "a b" and "a  b" differ.
    assert_eq!(view(&mut h), json!({"cart": 1, "home": 2, "q": 2}));
    assert_eq!(view_arg(&mut h, "home"), json!(2));
    assert_eq!(view_arg(&mut h, " cart "), json!(1));
    assert_eq!(view_arg(&mut h, "absent"), json!(0));
}

#[test]
fn unique_rejects_events_without_key_and_member() {
    let mut h = handler("unique", json!(null));
    for event in ["cart", " cart ", "cart\tbob"] {
        let reason = rejection(&mut h, event.as_bytes());
        assert!(reason.contains("expected KEY MEMBER"), "{reason}");
    }
    assert!(rejection(&mut h, b"  ").contains("empty"));
    assert_eq!(view(&mut h), json!({}));
}

#[test]
fn unique_dump_forgets_members() {
    let mut h = handler("unique", json!(null));
    send_all(&mut h, &["k a", "k b"]);
    assert_eq!(dump(&mut h), json!({"k": 2}));
    assert_eq!(view(&mut h), json!({}));
    send_all(&mut h, &["k a"]);
    assert_eq!(view(&mut h), json!({"k": 1}));
}

// ---- stats ------------------------------------------------------------------------

#[test]
fn stats_of_one_to_a_hundred() {
    let mut h = handler("stats", json!(null));
    // Every number once, out of order (37 is coprime with 100).
    for i in 0..100 {
        let n = (i * 37) % 100 + 1;
        h.send(format!(" {n}\n").as_bytes()).expect("a number");
    }
    let expected = json!({
        "count": 100, "sum": 5050, "min": 1, "max": 100, "mean": 50.5,
        "p50": 50, "p90": 90, "p99": 99,
    });
    assert_eq!(view(&mut h), expected);
    assert_eq!(view_arg(&mut h, "p50"), json!(50));
    assert_eq!(view_arg(&mut h, " p90 "), json!(90));
    assert_eq!(view_arg(&mut h, "p99"), json!(99));
    assert_eq!(view_arg(&mut h, "mean"), json!(50.5));
    assert_eq!(view_arg(&mut h, "p75"), json!(null));
    assert_eq!(dump(&mut h), expected);
    assert_eq!(view(&mut h), json!({"count": 0, "sum": 0}));
}

#[test]
fn stats_without_events_has_only_count_and_sum() {
    let mut h = handler("stats", json!(null));
    assert_eq!(view(&mut h), json!({"count": 0, "sum": 0}));
    assert_eq!(view_arg(&mut h, "count"), json!(0));
    assert_eq!(view_arg(&mut h, "sum"), json!(0));
    for field in ["min", "max", "mean", "p50", "p90", "p99", "bogus"] {
        assert_eq!(view_arg(&mut h, field), json!(null), "{field}");
    }
    assert_eq!(dump(&mut h), json!({"count": 0, "sum": 0}));
}

#[test]
fn stats_mixes_floats_and_integers() {
    let mut h = handler("stats", json!(null));
    send_all(&mut h, &["1.5", "2", "-0.5", "1e1", "0x10"]);
    let v = view(&mut h);
    assert_eq!(v["count"], json!(5));
    assert_eq!(v["sum"].as_f64(), Some(29.0));
    assert_eq!(v["min"], json!(-0.5));
    assert_eq!(v["max"], json!(16));
    assert_eq!(v["mean"].as_f64(), Some(5.8));
}

#[test]
fn stats_integer_sum_overflow_continues_in_floating_point() {
    let mut h = handler("stats", json!(null));
    send_all(&mut h, &[&i64::MAX.to_string(), "1"]);
    let v = view(&mut h);
    assert_eq!(v["max"], json!(i64::MAX));
    assert_eq!(v["sum"].as_f64(), Some(i64::MAX as f64 + 1.0));
}

#[test]
fn stats_rejects_what_is_not_a_finite_number() {
    let mut h = handler("stats", json!(null));
    assert!(rejection(&mut h, b" ").contains("empty"));
    let reason = rejection(&mut h, b"abc");
    assert!(
        reason.contains("not a number") && reason.contains("abc"),
        "{reason}"
    );
    assert!(rejection(&mut h, b"nan").contains("not a number"));
    assert!(rejection(&mut h, b"12 apples").contains("not a number"));
    for event in ["1e999", "-1e999"] {
        assert!(
            rejection(&mut h, event.as_bytes()).contains("not a finite number"),
            "{event}"
        );
    }
    // Long events are cut in the reason.
    let reason = rejection(&mut h, "x".repeat(10_000).as_bytes());
    assert!(reason.len() < 100 && reason.ends_with("...\""), "{reason}");
    assert_eq!(view(&mut h), json!({"count": 0, "sum": 0}));
}

#[test]
fn stats_beyond_max_samples_keeps_exact_totals_and_estimates_percentiles() {
    let mut h = handler("stats", json!({"max_samples": 50}));
    for n in 1..=10_000 {
        h.send(n.to_string().as_bytes()).expect("a number");
    }
    let v = view(&mut h);
    assert_eq!(v["count"], json!(10_000));
    assert_eq!(v["sum"], json!(50_005_000));
    assert_eq!(v["min"], json!(1));
    assert_eq!(v["max"], json!(10_000));
    assert_eq!(v["mean"], json!(5000.5));
    let p = |f: &str| v[f].as_i64().unwrap_or_else(|| panic!("{f} is {}", v[f]));
    assert!(1 <= p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= 10_000);
}

#[test]
fn stats_memory_stays_bounded_by_max_samples() {
    // Unbounded, 300k samples would need several MiB; the reservoir needs a few KiB.
    let limits = ScriptLimits {
        memory: 2 << 20,
        ..ScriptLimits::default()
    };
    let mut h = try_handler("stats", json!({"max_samples": 100}), &limits).expect("created");
    for n in 0..300_000 {
        h.send(n.to_string().as_bytes())
            .expect("within the memory limit");
    }
    assert_eq!(view_arg(&mut h, "count"), json!(300_000));
}

#[test]
fn stats_validates_max_samples() {
    handler("stats", json!({"max_samples": 1}));
    handler("stats", json!({"max_samples": 1_000_000}));
    for bad in [
        json!("x"),
        json!(0),
        json!(-5),
        json!(1.5),
        json!(1_000_001),
        json!([10]),
    ] {
        let e = config_error("stats", json!({ "max_samples": bad }));
        assert!(e.contains("max_samples must be an integer"), "{e}");
    }
    assert!(config_error("stats", json!({"maxsamples": 10})).contains("unknown config key"));
    assert!(config_error("stats", json!("x")).contains("config must be an object"));
}

// ---- list -------------------------------------------------------------------------

#[test]
fn list_keeps_events_as_sent() {
    let mut h = handler("list", json!(null));
    assert_eq!(view(&mut h), json!([]));
    assert_eq!(view_arg(&mut h, "5"), json!([]));
    send_all(&mut h, &[" a ", "", "b\n"]);
    assert_eq!(view(&mut h), json!([" a ", "", "b\n"]));
    assert_eq!(view_arg(&mut h, " 2 "), json!(["", "b\n"]));
    assert_eq!(view_arg(&mut h, "0"), json!([]));
    assert_eq!(view_arg(&mut h, "100"), json!([" a ", "", "b\n"]));
}

#[test]
fn list_default_max_is_a_thousand() {
    let mut h = handler("list", json!(null));
    for n in 1..=2500 {
        h.send(n.to_string().as_bytes()).expect("accepted");
    }
    let v = view(&mut h);
    let items = v.as_array().expect("an array");
    assert_eq!(items.len(), 1000);
    assert_eq!(items[0], json!("1501"));
    assert_eq!(items[999], json!("2500"));
}

#[test]
fn list_ring_buffer_wraps_around_in_arrival_order() {
    for max in 1..=5usize {
        let mut h = handler("list", json!({ "max": max }));
        let mut model = VecDeque::new();
        for n in 0..13 {
            let event = format!("e{n}");
            h.send(event.as_bytes()).expect("accepted");
            model.push_back(event);
            if model.len() > max {
                model.pop_front();
            }
            assert_eq!(view(&mut h), json!(model), "max {max} after {n}");
            for k in 0..=max + 1 {
                let tail: Vec<_> = model.iter().skip(model.len().saturating_sub(k)).collect();
                assert_eq!(
                    view_arg(&mut h, &k.to_string()),
                    json!(tail),
                    "max {max}, view {k}"
                );
            }
        }
    }
}

#[test]
fn list_view_argument_must_be_a_count() {
    let mut h = handler("list", json!(null));
    send_all(&mut h, &["a"]);
    for arg in ["x", "-1", "1.5", ""] {
        let e = h.view(Some(arg.as_bytes())).expect_err(arg).to_string();
        assert!(e.contains("non-negative integer"), "{arg:?}: {e}");
    }
    assert_eq!(view(&mut h), json!(["a"]));
}

#[test]
fn list_dump_returns_the_view_then_empties() {
    let mut h = handler("list", json!({"max": 2}));
    send_all(&mut h, &["a", "b", "c"]);
    assert_eq!(dump(&mut h), json!(["b", "c"]));
    assert_eq!(view(&mut h), json!([]));
    assert_eq!(dump(&mut h), json!([]));
    send_all(&mut h, &["d"]);
    assert_eq!(view(&mut h), json!(["d"]));
}

#[test]
fn list_validates_max() {
    handler("list", json!({"max": 1}));
    handler("list", json!({"max": 1_000_000}));
    for bad in [
        json!("x"),
        json!(0),
        json!(-1),
        json!(2.5),
        json!(1_000_001),
        json!({}),
    ] {
        let e = config_error("list", json!({ "max": bad }));
        assert!(e.contains("max must be an integer"), "{e}");
    }
    assert!(config_error("list", json!({"size": 3})).contains("unknown config key"));
    assert!(config_error("list", json!(3)).contains("config must be an object"));
}

// ---- latest -----------------------------------------------------------------------

#[test]
fn latest_keeps_the_last_value_per_key() {
    let mut h = handler("latest", json!(null));
    assert_eq!(view(&mut h), json!({}));
    send_all(
        &mut h,
        &["eu-1 ok", "us-1 degraded: disk 91%", " eu-1   down \n"],
    );
    assert_eq!(
        view(&mut h),
        json!({"eu-1": "down", "us-1": "degraded: disk 91%"})
    );
    assert_eq!(view_arg(&mut h, "us-1"), json!("degraded: disk 91%"));
    assert_eq!(view_arg(&mut h, " eu-1 "), json!("down"));
    assert_eq!(view_arg(&mut h, "ap-1"), json!(null));
}

#[test]
fn latest_rejects_events_without_key_and_value() {
    let mut h = handler("latest", json!(null));
    for event in ["eu-1", "eu-1 \t", "eu-1\tdown"] {
        let reason = rejection(&mut h, event.as_bytes());
        assert!(reason.contains("expected KEY VALUE"), "{reason}");
    }
    assert!(rejection(&mut h, b"").contains("empty"));
    assert_eq!(view(&mut h), json!({}));
}

#[test]
fn latest_dump_returns_the_view_then_forgets() {
    let mut h = handler("latest", json!(null));
    send_all(&mut h, &["a 1", "a 2", "b 3"]);
    assert_eq!(dump(&mut h), json!({"a": "2", "b": "3"}));
    assert_eq!(view(&mut h), json!({}));
    assert_eq!(view_arg(&mut h, "a"), json!(null));
}

// Every stock handler can be durable: its state, after events and a dump, snapshots and
// restores into a fresh instance that then gives the same views and takes further
// events the same way (handlers/README.md, Durable buckets).
#[test]
fn every_stock_state_survives_a_snapshot() {
    let cases: [(&str, Value, &[&str]); 5] = [
        ("counter", Value::Null, &["a", "b", "a", " c "]),
        ("unique", Value::Null, &["k x", "k y", "k x", "j z"]),
        (
            "stats",
            json!({"max_samples": 3}),
            &["1", "2.5", "-3", "40", "5"],
        ),
        ("list", json!({"max": 3}), &["a", "", "c", "d"]),
        ("latest", Value::Null, &["eu ok", "us down", "eu degraded"]),
    ];
    for (name, config, events) in cases {
        let mut h = handler(name, config.clone());
        send_all(&mut h, events);
        let snapshot = h.snapshot().unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut back = handler(name, config.clone());
        back.restore(&snapshot)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view(&mut back), view(&mut h), "{name}");
        send_all(&mut h, &events[..1]);
        send_all(&mut back, &events[..1]);
        if name != "stats" {
            // stats samples at random once past max_samples; its exact fields still agree.
            assert_eq!(view(&mut back), view(&mut h), "{name} after one more event");
        } else {
            assert_eq!(view_arg(&mut back, "count"), view_arg(&mut h, "count"));
            assert_eq!(view_arg(&mut back, "sum"), view_arg(&mut h, "sum"));
        }
        h.dump().expect("dump");
        let snapshot = h.snapshot().expect("empty state");
        let mut back = handler(name, config);
        back.restore(&snapshot).expect("restore");
        assert_eq!(view(&mut back), view(&mut h), "{name} after dump");
    }
}
