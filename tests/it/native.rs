//! The native `counter` and `unique` (src/script/native/) against their Lua originals
//! in `handlers/`: the same answer to every event (accepted, or the same rejection
//! reason), the same view, view KEY and dump, the same config errors, and snapshots that
//! each side restores from the other.

use bucketly::script::{HandlerCatalog, HandlerInstance, ScriptLimits};
use serde_json::{json, Value};

fn pair(name: &str, config: &Value) -> (HandlerInstance, HandlerInstance) {
    let source = HandlerCatalog::stock().get(name).expect("stock handler");
    let limits = ScriptLimits::default();
    let native = HandlerInstance::new(&source, config, &limits).expect("native");
    let lua = HandlerInstance::new_lua(&source, config, &limits).expect("lua");
    assert!(native.is_native(), "{name} has a native implementation");
    assert!(!lua.is_native());
    (native, lua)
}

/// Events from a small alphabet of the bytes that matter: spaces and the other `%s`
/// bytes, tabs inside, invalid UTF-8, multi-byte characters, and long runs.
fn event(rng: &mut u64) -> Vec<u8> {
    const PIECES: [&[u8]; 12] = [
        b" ",
        b"  ",
        b"\t",
        b"\r\n",
        b"\x0b",
        b"k",
        b"key",
        b"m1",
        b"\xff",
        "é".as_bytes(),
        b"a b",
        b"",
    ];
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let n = next() % 6;
    let mut e = Vec::new();
    for _ in 0..n {
        e.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
    }
    if next() % 50 == 0 {
        e.extend(std::iter::repeat_n(b'x', 70));
        e.extend_from_slice(" é".as_bytes());
    }
    e
}

fn same_views(native: &mut HandlerInstance, lua: &mut HandlerInstance, what: &str) {
    assert_eq!(native.view(None), lua.view(None), "{what}: view");
    for k in [&b"k"[..], b" key ", b"\xff", b"absent", b""] {
        assert_eq!(
            native.view(Some(k)),
            lua.view(Some(k)),
            "{what}: view {k:?}"
        );
    }
}

#[test]
fn native_handlers_answer_like_their_lua_originals() {
    for name in ["counter", "unique"] {
        let (mut native, mut lua) = pair(name, &Value::Null);
        let mut rng = 0x2545_F491_4F6C_DD1D;
        for round in 0..20 {
            for _ in 0..200 {
                let e = event(&mut rng);
                assert_eq!(native.send(&e), lua.send(&e), "{name}: event {e:?}");
            }
            same_views(&mut native, &mut lua, name);
            if round % 5 == 4 {
                assert_eq!(native.dump(), lua.dump(), "{name}: dump");
            }
        }
    }
}

#[test]
fn native_and_lua_restore_each_others_snapshots() {
    for name in ["counter", "unique"] {
        let (mut native, mut lua) = pair(name, &Value::Null);
        let mut rng = 7;
        for _ in 0..500 {
            let e = event(&mut rng);
            let _ = (native.send(&e), lua.send(&e));
        }
        let (mut native_back, mut lua_back) = pair(name, &Value::Null);
        lua_back
            .restore(&native.snapshot().expect("native snapshot"))
            .expect("lua restores native");
        native_back
            .restore(&lua.snapshot().expect("lua snapshot"))
            .expect("native restores lua");
        same_views(&mut native_back, &mut lua_back, name);
        same_views(&mut native_back, &mut native, name);
        // And they go on alike.
        for _ in 0..100 {
            let e = event(&mut rng);
            assert_eq!(native_back.send(&e), lua_back.send(&e), "{name}: {e:?}");
        }
        same_views(&mut native_back, &mut lua_back, name);
        assert!(native_back.restore(b"\x06\x00\xff").is_err(), "cut short");
    }
}

#[test]
fn native_config_errors_match_lua() {
    for name in ["counter", "unique"] {
        let source = HandlerCatalog::stock().get(name).expect("stock handler");
        let limits = ScriptLimits::default();
        for config in [
            json!(null),
            json!({}),
            json!([]),
            json!({"a": 1}),
            json!(5),
            json!("x"),
        ] {
            let native = HandlerInstance::new(&source, &config, &limits).map(|_| ());
            let lua = HandlerInstance::new_lua(&source, &config, &limits).map(|_| ());
            assert_eq!(native, lua, "{name} with config {config}");
        }
    }
}

#[test]
fn native_state_stays_within_the_memory_limit() {
    let source = HandlerCatalog::stock()
        .get("unique")
        .expect("stock handler");
    let limits = ScriptLimits {
        memory: 1 << 20,
        ..ScriptLimits::default()
    };
    let mut h = HandlerInstance::new(&source, &Value::Null, &limits).expect("native");
    let mut accepted = 0u64;
    let mut refusal = None;
    for i in 0..100_000u64 {
        match h.send(format!("k {i:016x}").as_bytes()) {
            Ok(()) => accepted += 1,
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("the limit is reached");
    // The same words as the Lua memory limit's.
    let mut lua = HandlerInstance::new_lua(&source, &Value::Null, &limits).expect("lua");
    let lua_refusal = (0..100_000u64)
        .find_map(|i| lua.send(format!("k {i:016x}").as_bytes()).err())
        .expect("the Lua limit is reached");
    assert_eq!(refusal, lua_refusal);
    assert!(h.memory_used() <= 1 << 20);
    assert!(accepted > 10_000, "only {accepted} members fit in 1 MiB");
    // Known members are still accepted (they cost nothing), and the count is exact.
    assert_eq!(h.send(b"k 0000000000000000"), Ok(()));
    assert_eq!(
        h.view(Some(b"k")).expect("view"),
        accepted.to_string().into_bytes()
    );
}

#[test]
fn only_the_stock_text_runs_natively() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stock = HandlerCatalog::stock().get("counter").expect("counter");
    // The same text (as in the checkout's handlers/) is the same handler; any change
    // makes it the operator's own code, which runs in Lua.
    std::fs::write(dir.path().join("counter.lua"), &stock.source).expect("write");
    let unique = HandlerCatalog::stock().get("unique").expect("unique");
    let changed = format!("{}\n-- changed\n", unique.source);
    std::fs::write(dir.path().join("unique.lua"), changed).expect("write");
    let (catalog, warnings) = HandlerCatalog::with_dir(dir.path()).expect("catalog");
    assert!(warnings.is_empty(), "{warnings:?}");
    let start = |name: &str| {
        let file = catalog.get(name).expect("handler");
        HandlerInstance::new(&file, &Value::Null, &ScriptLimits::default()).expect("starts")
    };
    assert!(start("counter").is_native());
    assert!(!start("unique").is_native());
}
