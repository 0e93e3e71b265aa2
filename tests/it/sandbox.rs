//! The handler sandbox through the daemon: a handler that tries to escape its time
//! budget (loops, also inside pcall, coroutines and `<close>` handlers), its memory
//! limit, or the sandbox itself (io, os, require). Each attempt costs only that one
//! event, quickly, while another bucket on another handler thread keeps being served;
//! a CPU escape leaves its bucket failed, the others leave it working.

use std::time::{Duration, Instant};

use bucketly::protocol::ErrorCode;
use bucketly::Client;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::common::{config_in, TestServer};

/// One handler, many ways out: `send` runs the escape its event names, and counts the
/// events that come back from it.
const ESCAPES: &str = r#"
local escapes = {
  spin = function() while true do end end,
  pcall = function() while true do pcall(function() while true do end end) end end,
  coroutine = function()
    while true do
      local co = coroutine.create(function() while true do end end)
      coroutine.resume(co)
    end
  end,
  bomb = function() local t = {} while true do t[#t + 1] = {} end end,
  rep = function() return string.rep('x', 1e9) end,
  io = function() return io.open('/etc/passwd') end,
  os = function() return os.execute('true') end,
  require = function() return require('os') end,
  close = function()
    do
      local guard <close> = setmetatable({}, {__close = function() while true do end end})
    end
  end,
}
local H = {}
function H.init() return {n = 0} end
function H.send(s, e)
  local escape = escapes[e]
  if escape then escape() end
  s.n = s.n + 1
end
function H.view(s) return s.n end
function H.dump(s) local n = s.n; s.n = 0; return n end
return H
"#;

/// A daemon with the escape handler, a small memory limit (so a bomb ends far within
/// the time budget) and several handler threads.
async fn sandbox_server(dir: &std::path::Path) -> TestServer {
    std::fs::create_dir_all(dir.join("handlers")).expect("mkdir");
    std::fs::write(dir.join("handlers/escape.lua"), ESCAPES).expect("write handler");
    let mut config = config_in(dir);
    config.lua_memory = 8 * 1024 * 1024;
    config.workers = 4;
    TestServer::start_with(config).await
}

async fn handler_thread(client: &Client, bucket: &str) -> u64 {
    client.info(Some(bucket)).await.expect("info")["handler_thread"]
        .as_u64()
        .expect("handler_thread")
}

/// Creates a counter bucket that runs on another handler thread than `bucket`.
async fn bucket_on_another_thread(client: &Client, bucket: &str) -> String {
    let avoid = handler_thread(client, bucket).await;
    for i in 0..64 {
        let name = format!("bystander-{i}");
        client.create(&name, "counter", None).await.expect("create");
        if handler_thread(client, &name).await != avoid {
            return name;
        }
        client.drop_bucket(&name).await.expect("drop");
    }
    panic!("every bucket landed on handler thread {avoid}");
}

/// What an escape attempt must end in.
struct Expect {
    /// The rejection reason contains all of these.
    reasons: &'static [&'static str],
    /// The time budget stopped it: the bucket is failed afterwards.
    cpu: bool,
}

const CPU: Expect = Expect {
    reasons: &["time budget"],
    cpu: true,
};
const MEMORY: Expect = Expect {
    reasons: &["memory"],
    cpu: false,
};
/// A global that does not exist in the sandbox.
const fn absent(reasons: &'static [&'static str]) -> Expect {
    Expect {
        reasons,
        cpu: false,
    }
}

/// Sends `event` to a bucket of the escape handler while another connection keeps
/// using a bucket on another handler thread, and checks the outcome.
async fn escape(event: &str, expect: Expect) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = sandbox_server(dir.path()).await;
    let attacker = server.client().await;
    attacker
        .create("esc", "escape", None)
        .await
        .expect("create");
    let outcome = attacker.send("esc", &["ok"]).await.expect("send");
    assert_eq!(outcome.accepted, 1);

    // The bystander: SEND and VIEW in a loop on its own connection, reporting when each
    // answer arrived, until told to stop.
    let bystander = server.client().await;
    let other = bucket_on_another_thread(&bystander, "esc").await;
    let (stop, stopped) = watch::channel(false);
    let (answered, mut answers) = mpsc::unbounded_channel::<Instant>();
    let task = {
        let other = other.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !*stopped.borrow() {
                bystander
                    .send(&other, &["k"])
                    .await
                    .expect("bystander send");
                sent += 1;
                let _ = answered.send(Instant::now());
                let seen = bystander.view(&other, Some(b"k")).await.expect("view");
                assert_eq!(seen, json!(sent), "bystander view");
                let _ = answered.send(Instant::now());
            }
            sent
        })
    };
    tokio::time::timeout(Duration::from_secs(10), answers.recv())
        .await
        .expect("the bystander runs")
        .expect("an answer");

    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), attacker.send("esc", &[event]))
        .await
        .expect("SEND answered")
        .expect("SEND is OK");
    let took = started.elapsed();
    let ended = Instant::now();
    assert!(took < Duration::from_secs(1), "{event}: SEND took {took:?}");
    assert_eq!((outcome.accepted, outcome.rejected), (0, 1), "{event}");
    let reason = &outcome.reasons[0].1;
    assert!(
        expect.reasons.iter().all(|r| reason.contains(r)),
        "{event}: reason {reason:?}, expected {:?}",
        expect.reasons
    );

    let _ = stop.send(true);
    let sent = task.await.expect("bystander");
    let mut during = 0;
    while let Ok(at) = answers.try_recv() {
        if at > started && at < ended {
            during += 1;
        }
    }
    if expect.cpu {
        // The attempt held its handler thread for the whole budget; the other thread
        // kept answering meanwhile.
        assert!(
            took >= Duration::from_millis(100),
            "{event}: stopped after {took:?}, before the budget"
        );
        assert!(
            during > 0,
            "{event}: the bystander got no answer during the {took:?} attempt"
        );
    }
    assert_eq!(
        attacker.view(&other, Some(b"k")).await.expect("view"),
        json!(sent)
    );

    let info = attacker.info(Some("esc")).await.expect("info");
    assert_eq!(info["rejected"], 1, "{info}");
    if expect.cpu {
        let err = attacker.view("esc", None).await.expect_err("failed bucket");
        assert_eq!(err.code(), Some(ErrorCode::HandlerError), "{err}");
        assert!(
            err.to_string().contains("drop and create it again"),
            "{event}: {err}"
        );
        let info = attacker.info(Some("esc")).await.expect("info");
        let failed = info["failed"].as_str().unwrap_or_else(|| panic!("{info}"));
        assert!(failed.contains("time budget"), "{failed}");
        let outcome = attacker.send("esc", &["ok"]).await.expect("send");
        assert_eq!(outcome.rejected, 1, "a failed bucket rejects every event");
        assert!(
            outcome.reasons[0].1.contains("drop and create it again"),
            "{:?}",
            outcome.reasons
        );
        // Dropping and creating it again is the way out.
        attacker.drop_bucket("esc").await.expect("drop");
        attacker
            .create("esc", "escape", None)
            .await
            .expect("create");
        attacker.send("esc", &["ok"]).await.expect("send");
        assert_eq!(attacker.view("esc", None).await.expect("view"), json!(1));
    } else {
        assert_eq!(info["failed"], Value::Null, "{info}");
        assert_eq!(attacker.view("esc", None).await.expect("view"), json!(1));
        let outcome = attacker.send("esc", &["ok"]).await.expect("send");
        assert_eq!(outcome.accepted, 1, "the bucket still works");
        assert_eq!(attacker.view("esc", None).await.expect("view"), json!(2));
    }
    // Closed connections let the server stop without lingering for them.
    drop(attacker);
    server.stop().await;
}

// `while true do end` is stopped at the time budget and fails its bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped() {
    escape("spin", CPU).await;
}

// An endless loop around pcall of an endless loop cannot catch the budget's stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcall_cannot_catch_the_budget() {
    escape("pcall", CPU).await;
}

// Endless loops inside coroutines, resumed in an endless loop, are stopped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coroutines_cannot_hide_a_loop() {
    escape("coroutine", CPU).await;
}

// A `<close>` variable whose __close loops is stopped as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_close_handler_is_stopped() {
    escape("close", CPU).await;
}

// Allocating tables without end hits the memory limit: the event is rejected and the
// bucket keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_costs_only_its_event() {
    escape("bomb", MEMORY).await;
}

// string.rep of a gigabyte hits the memory limit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_string_costs_only_its_event() {
    escape("rep", MEMORY).await;
}

// There is no io library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_is_not_available() {
    escape("io", absent(&["attempt to index a nil value", "'io'"])).await;
}

// There is no os library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_is_not_available() {
    escape("os", absent(&["attempt to index a nil value", "'os'"])).await;
}

// There is no require.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_is_not_available() {
    escape(
        "require",
        absent(&["attempt to call a nil value", "'require'"]),
    )
    .await;
}

// A SEND stopped by the budget shows in bucket INFO's `failed` at once, before any
// other request touched the bucket (spec §8: the bucket is failed and INFO shows why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_stop_in_send_shows_in_info_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = sandbox_server(dir.path()).await;
    let client = server.client().await;
    client.create("esc", "escape", None).await.expect("create");
    let outcome = client.send("esc", &["spin"]).await.expect("send");
    assert_eq!(outcome.rejected, 1);
    let info = client.info(Some("esc")).await.expect("info");
    assert!(info["failed"].is_string(), "failed not reported: {info}");
    drop(client);
    server.stop().await;
}
