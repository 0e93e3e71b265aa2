//! TAKE and RELEASE, the two-phase dump: a take is handed out again until released,
//! windows follow each other without gap, and a durable bucket's pending take survives
//! a graceful restart (snapshot) and SIGKILL (log replay).

use bucketly::protocol::{Command, ErrorCode};
use bucketly::{Client, Take};
use serde_json::{json, Value};

use crate::common::{cli, Daemon, TestServer};

async fn send(client: &Client, bucket: &str, events: &[&str]) {
    let outcome = client.send(bucket, events).await.expect("send");
    assert_eq!(outcome.accepted as usize, events.len(), "{outcome:?}");
}

fn code_of<T: std::fmt::Debug>(result: Result<T, bucketly::client::ClientError>) -> ErrorCode {
    result
        .expect_err("an error")
        .code()
        .expect("a server error code")
}

async fn take_info(client: &Client, bucket: &str) -> (Value, Value) {
    let info = client.info(Some(bucket)).await.expect("info");
    (info["takes"].clone(), info["take_pending"].clone())
}

#[tokio::test]
async fn a_take_is_handed_out_again_until_released() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create("u", "unique", None).await.expect("create");
    let created = client.info(Some("u")).await.expect("info")["created_ms"].clone();
    assert_eq!(take_info(&client, "u").await, (json!(0), Value::Null));

    send(&client, "u", &["/a x", "/a y", "/a x", "/b x"]).await;
    let first = client.take("u").await.expect("take");
    assert_eq!(first.id, 1);
    assert_eq!(first.output, json!({"/a": 2, "/b": 1}));
    assert_eq!(first.events, 4);
    assert_eq!(json!(first.since_ms), created);
    assert!(first.taken_ms > first.since_ms, "{first:?}");

    // Events sent while it is pending go to the live aggregate, not into the take.
    send(&client, "u", &["/a z", "/c x"]).await;
    assert_eq!(client.take("u").await.expect("again"), first);
    assert_eq!(
        client.view("u", None).await.expect("view"),
        json!({"/a": 1, "/c": 1})
    );
    assert_eq!(take_info(&client, "u").await, (json!(1), json!(1)));

    // A take no bucket handed out is refused; a repeated release is fine.
    assert_eq!(
        code_of(client.release("u", 2).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(client.release("u", 0).await),
        ErrorCode::InvalidArgument
    );
    client.release("u", 1).await.expect("release");
    client.release("u", 1).await.expect("released again");
    assert_eq!(take_info(&client, "u").await, (json!(1), Value::Null));

    let second = client.take("u").await.expect("second take");
    assert_eq!(second.id, 2);
    assert_eq!(second.output, json!({"/a": 1, "/c": 1}));
    assert_eq!(second.events, 2);
    assert_eq!(second.since_ms, first.taken_ms, "windows follow each other");
    assert!(second.taken_ms > second.since_ms);
    client
        .release("u", 1)
        .await
        .expect("an older take: already released");
    assert_eq!(take_info(&client, "u").await, (json!(2), json!(2)));
    client.release("u", 2).await.expect("release second");
    let third = client.take("u").await.expect("empty take");
    assert_eq!((third.id, third.output, third.events), (3, json!({}), 0));

    assert_eq!(code_of(client.take("nope").await), ErrorCode::NoSuchBucket);
    assert_eq!(
        code_of(client.release("nope", 1).await),
        ErrorCode::NoSuchBucket
    );
    server.stop().await;
}

#[tokio::test]
async fn take_and_release_need_the_dump_permission() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.create("u", "unique", None).await.expect("create");
    admin.user_add("viewer", "pw").await.expect("user");
    admin
        .user_grant("viewer", "view", "*")
        .await
        .expect("grant");
    let viewer = server.client_as("viewer", "pw").await;
    assert_eq!(code_of(viewer.take("u").await), ErrorCode::PermissionDenied);
    assert_eq!(
        code_of(viewer.release("u", 1).await),
        ErrorCode::PermissionDenied
    );
    admin
        .user_grant("viewer", "dump", "u")
        .await
        .expect("grant dump");
    let take = viewer.take("u").await.expect("take with dump");
    viewer
        .release("u", take.id)
        .await
        .expect("release with dump");
    server.stop().await;
}

/// Two TAKEs pipelined on a durable bucket: both get the same take, the second one
/// re-delivered from memory (after a barrier on the log).
async fn pipelined_takes(client: &Client, bucket: &str) -> Take {
    let take = || Command::Take {
        bucket: bucket.into(),
    };
    let a = client.start(take()).await.expect("start take");
    let b = client.start(take()).await.expect("start take");
    let (a, b) = (a.wait().await.expect("a"), b.wait().await.expect("b"));
    assert_eq!(a.payload, b.payload, "the same take twice");
    serde_json::from_slice(&a.payload).expect("take json")
}

/// An in-memory bucket forgets its takes with the process: after a restart its windows
/// start afresh, later than every window handed out before, so a consumer keyed by
/// (bucket, since_ms) never sees a stored window claimed by a new take.
#[tokio::test]
async fn an_in_memory_bucket_restarts_its_windows_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    client.create("m", "unique", None).await.expect("create");
    send(&client, "m", &["/a 1"]).await;
    let before = client.take("m").await.expect("take");
    client.release("m", before.id).await.expect("release");

    assert!(daemon.terminate().await.success());
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    send(&client, "m", &["/b 1"]).await;
    let after = client.take("m").await.expect("take after restart");
    assert_eq!((after.id, &after.output), (1, &json!({"/b": 1})));
    assert!(
        after.since_ms >= before.taken_ms,
        "{after:?} after {before:?}"
    );
}

#[tokio::test]
async fn a_durable_pending_take_survives_restart_and_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    client
        .create_with("d", "unique", None, &json!({"durable": true}))
        .await
        .expect("create durable");
    send(&client, "d", &["/a 1", "/a 2", "/b 1"]).await;
    let first = pipelined_takes(&client, "d").await;
    assert_eq!((first.id, &first.output), (1, &json!({"/a": 2, "/b": 1})));
    send(&client, "d", &["/a 3", "/c 1"]).await;

    // Graceful stop: the snapshot holds the pending take and the live aggregate.
    assert!(daemon.terminate().await.success());
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(client.take("d").await.expect("after restart"), first);
    client.release("d", 1).await.expect("release");
    let second = client.take("d").await.expect("second");
    assert_eq!(second.id, 2);
    assert_eq!(second.output, json!({"/a": 1, "/c": 1}));
    assert_eq!((second.since_ms, second.events), (first.taken_ms, 2));

    // SIGKILL: the take record after the snapshot is replayed, answer and all.
    daemon.kill().await;
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(take_info(&client, "d").await, (json!(2), json!(2)));
    assert_eq!(client.take("d").await.expect("after kill"), second);
    client.release("d", 2).await.expect("release second");

    daemon.kill().await;
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(take_info(&client, "d").await, (json!(2), Value::Null));
    client.release("d", 2).await.expect("the release was kept");
    let third = client.take("d").await.expect("third");
    assert_eq!((third.id, &third.output, third.events), (3, &json!({}), 0));
    assert_eq!(third.since_ms, second.taken_ms);

    // The CLI speaks both phases.
    let port = daemon.addr.port().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(cli())
            .args(["--port", &port])
            .env("BUCKETLY_USER", crate::common::ADMIN)
            .env("BUCKETLY_PASSWORD", crate::common::ADMIN_PASSWORD)
            .args(args)
            .output()
            .expect("bucketly runs")
    };
    let out = run(&["take", "d"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Take = serde_json::from_slice(&out.stdout).expect("take json");
    assert_eq!(printed, third);
    let out = run(&["release", "d", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["release", "d", "9"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.terminate().await;
}
