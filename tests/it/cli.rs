//! The two binaries as a user runs them: `bucketlyd` started on port 0 and the `bucketly`
//! CLI, including the issue's acceptance scenarios.

use std::process::{Output, Stdio};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::{cli, Daemon};

/// Runs `bucketly --port PORT ARGS...`, feeding `stdin`.
async fn run(daemon: &Daemon, args: &[&str], stdin: &[u8]) -> Output {
    let args = args.iter().map(|a| a.to_string()).collect();
    run_owned(daemon.addr.port(), args, stdin.to_vec()).await
}

async fn run_owned(port: u16, args: Vec<String>, stdin: Vec<u8>) -> Output {
    let mut child = tokio::process::Command::new(cli())
        .args(["--port", &port.to_string()])
        .env("BUCKETLY_USER", crate::common::ADMIN)
        .env("BUCKETLY_PASSWORD", crate::common::ADMIN_PASSWORD)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bucketly");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(&stdin).await.expect("write stdin");
    drop(input);
    child.wait_with_output().await.expect("bucketly runs")
}

async fn ok_json(daemon: &Daemon, args: &[&str]) -> Value {
    let out = run(daemon, args, b"").await;
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON value")
}

async fn ok(daemon: &Daemon, args: &[&str], stdin: &[u8]) {
    let out = run(daemon, args, stdin).await;
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// `bucketly send` of 100,000 lines from stdin into a counter bucket over one connection
// completes, and view shows 100,000 in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_100k_lines_from_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    ok(&daemon, &["create", "clicks", "--handler", "counter"], b"").await;
    let lines: String = (0..100_000)
        .map(|i| format!("/page/{}\n", i % 1000))
        .collect();
    ok(&daemon, &["send", "clicks"], lines.as_bytes()).await;
    let view = ok_json(&daemon, &["view", "clicks"]).await;
    let total: u64 = view
        .as_object()
        .expect("object")
        .values()
        .map(|v| v.as_u64().expect("count"))
        .sum();
    assert_eq!(total, 100_000);
    assert_eq!(view["/page/7"], 100);
    assert!(daemon.terminate().await.success());
}

// 8 concurrent `bucketly send` processes × 50,000 events into one bucket lose nothing
// and count nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_cli_senders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    ok(&daemon, &["create", "u", "--handler", "unique"], b"").await;
    let mut senders = Vec::new();
    for s in 0..8 {
        // Sender s contributes members s*50000 .. s*50000+49999 spread over 10 keys.
        let lines: String = (0..50_000)
            .map(|i| format!("k{} m{}\n", i % 10, s * 50_000 + i))
            .collect();
        let args = vec!["send".to_string(), "u".to_string()];
        senders.push(tokio::spawn(run_owned(
            daemon.addr.port(),
            args,
            lines.into_bytes(),
        )));
    }
    for sender in senders {
        let out = sender.await.expect("sender task");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let view = ok_json(&daemon, &["view", "u"]).await;
    for k in 0..10 {
        assert_eq!(view[format!("k{k}")], 40_000, "{view}");
    }
    let info = ok_json(&daemon, &["info", "u"]).await;
    assert_eq!(info["events"], 400_000);
    daemon.terminate().await;
}

// Every CLI error is one line on stderr and a non-zero exit; results are JSON on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let ping = run(&daemon, &["ping"], b"").await;
    assert_eq!(String::from_utf8_lossy(&ping.stdout).trim(), "PONG");
    ok(&daemon, &["create", "s", "--handler", "stats"], b"").await;
    ok(
        &daemon,
        &[
            "create",
            "l",
            "--handler",
            "list",
            "--config",
            r#"{"max": 2}"#,
        ],
        b"",
    )
    .await;
    ok(&daemon, &["send", "s", "1", "2", "3"], b"").await;
    ok(&daemon, &["send", "l", "a", "b", "c"], b"").await;
    assert_eq!(ok_json(&daemon, &["view", "s", "max"]).await, json!(3));
    assert_eq!(ok_json(&daemon, &["dump", "l"]).await, json!(["b", "c"]));
    assert_eq!(ok_json(&daemon, &["view", "l"]).await, json!([]));
    let list = ok_json(&daemon, &["list"]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    assert_eq!(ok_json(&daemon, &["info"]).await["buckets"], 2);

    for (args, needle) in [
        (vec!["view", "nope"], "NO_SUCH_BUCKET"),
        (vec!["create", "x", "--handler", "nope"], "NO_SUCH_HANDLER"),
        (
            vec!["create", "x", "--handler", "list", "--config", "{"],
            "not valid JSON",
        ),
        (vec!["send", "s", "1", "abc"], "1 of 2 events rejected"),
    ] {
        let out = run(&daemon, &args, b"").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr.contains(needle) && stderr.trim().lines().count() == 1,
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(
        daemon.terminate().await.success(),
        "graceful exit on SIGTERM"
    );

    let out = tokio::process::Command::new(cli())
        .args(["--port", "1", "ping"])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

// A database locked by another process, a corrupt one, or a file that is not redb stops
// the start with one clear line and a non-zero exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_databases_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let start = |db: std::path::PathBuf| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_bucketlyd"))
            .arg(db)
            .args(["--port", "0"])
            .output()
            .await
            .expect("run bucketlyd")
    };
    let locked = start(dir.path().join("bucketly.redb")).await;
    let stderr = String::from_utf8_lossy(&locked.stderr);
    assert!(!locked.status.success());
    assert!(stderr.contains("locked by another process"), "{stderr}");
    daemon.terminate().await;

    let junk = dir.path().join("junk.redb");
    std::fs::write(
        &junk,
        b"this is not a database, just some text that is long enough".repeat(100),
    )
    .expect("write");
    let corrupt = start(junk).await;
    let stderr = String::from_utf8_lossy(&corrupt.stderr);
    assert!(!corrupt.status.success());
    assert!(
        stderr.contains("corrupt or not a bucketly database"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

// The original daemon's spellings --hostname and --bucket_handlers are accepted, and a
// handler from the directory overrides the stock one of the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_flags_and_handler_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = dir.path().join("my-handlers");
    std::fs::create_dir(&handlers).expect("mkdir");
    let counter = "local H = {} function H.send() end function H.view() return 'mine' end function H.dump() return 'mine' end return H";
    std::fs::write(handlers.join("counter.lua"), counter).expect("write");
    let handlers = handlers.to_string_lossy().into_owned();
    let daemon = Daemon::start(
        dir.path(),
        &["--hostname", "127.0.0.1", "--bucket_handlers", &handlers],
    )
    .await;
    ok(&daemon, &["create", "c", "--handler", "counter"], b"").await;
    assert_eq!(ok_json(&daemon, &["view", "c"]).await, json!("mine"));
    ok(&daemon, &["create", "s", "--handler", "stats"], b"").await;
    daemon.terminate().await;

    let missing = tokio::process::Command::new(env!("CARGO_BIN_EXE_bucketlyd"))
        .arg(dir.path().join("other.redb"))
        .args(["--port", "0", "--handlers", "/nonexistent/handlers"])
        .output()
        .await
        .expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read handlers directory"));
    // A refused start used to create the database (and its admin user) before it
    // checked the handlers directory; it now leaves nothing behind.
    assert!(
        !dir.path().join("other.redb").exists(),
        "a refused start created the database"
    );
}

// `bucketly bench` sends exactly what it reports: with --keep, the bucket it created
// holds every event (each key index once per pass with --sequential), the JSON report
// counts the same, and its latency percentiles are in order. Without --keep the bucket
// is gone afterwards; a name in use is refused unless --reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sends_exactly_what_it_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let report = ok_json(
        &daemon,
        &[
            "bench",
            "--json",
            "-q",
            "-c",
            "3",
            "-P",
            "4",
            "-e",
            "5",
            "-n",
            "60",
            "--handler",
            "unique",
            "--keys",
            "300",
            "--sequential",
            "--bucket",
            "b",
            "--keep",
        ],
    )
    .await;
    assert_eq!(report["frames"], 60, "{report}");
    assert_eq!(report["events"], 300);
    assert_eq!(report["accepted"], 300);
    assert_eq!(
        (report["rejected"].clone(), report["errors"].clone()),
        (json!(0), json!(0))
    );
    let l = &report["latency_ms"];
    let at = |k: &str| l[k].as_f64().expect("a number");
    assert!(
        at("p50") <= at("p90") && at("p90") <= at("p99") && at("p99") <= at("max"),
        "{l}"
    );
    // 300 events over 300 sequential indexes: every member once.
    assert_eq!(ok_json(&daemon, &["view", "b", "k"]).await, json!(300));

    let out = run(&daemon, &["bench", "-q", "-n", "1", "--bucket", "b"], b"").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reuse"));

    ok(
        &daemon,
        &["bench", "-q", "-c", "1", "-n", "10", "--bucket", "t"],
        b"",
    )
    .await;
    let list = ok_json(&daemon, &["list"]).await;
    assert_eq!(
        list,
        json!([{"name": "b", "handler": "unique"}]),
        "the bench dropped t"
    );
}
