//! Durable buckets: nothing acknowledged is lost and nothing answered comes back across
//! SIGKILL of the real `bucketlyd`, across a graceful restart, with snapshots bounding
//! the log, and while the disk refuses writes (an injected ENOSPC on an in-process
//! server).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bucketly::client::{ClientError, PendingReply};
use bucketly::protocol::ErrorCode;
use bucketly::store::wal::{IoCheck, Wal, SEGMENT_BYTES};
use bucketly::store::Store;
use bucketly::Client;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use serde_json::{json, Value};

use crate::common::{config_in, Daemon, TestServer};
use crate::unique_clicks::producer::SplitMix64;

/// The bucket the crash harness sends to.
const CRASH_BUCKET: &str = "c";
/// Connections sending at once in each crash cycle.
const CRASH_CLIENTS: usize = 4;
/// SEND frames each connection keeps in flight.
const CRASH_IN_FLIGHT: usize = 8;
/// Events in each SEND frame.
const CRASH_BATCH: usize = 20;
/// Keys the crash bucket may hold before the harness DUMPs it. Unbounded, the state
/// grows by ~20,000 keys a cycle, each check reads it all, and the snapshot of a
/// 400,000-key state stalls the bucket for longer than the longest crash delay.
const CRASH_DUMP_AT: usize = 100_000;

/// A counter bucket's view as key → count.
fn counts(view: &Value) -> BTreeMap<String, u64> {
    view.as_object()
        .unwrap_or_else(|| panic!("a counter view is an object: {view}"))
        .iter()
        .map(|(k, v)| {
            let n = v
                .as_u64()
                .unwrap_or_else(|| panic!("count of {k:?} is not a number: {v}"));
            (k.clone(), n)
        })
        .collect()
}

/// Every key once.
fn once<'a>(keys: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, u64> {
    keys.into_iter().map(|k| (k.clone(), 1)).collect()
}

/// Sends `events` and expects every one accepted.
async fn send_ok<E: AsRef<[u8]>>(client: &Client, bucket: &str, events: &[E]) {
    let outcome = client
        .send(bucket, events)
        .await
        .unwrap_or_else(|e| panic!("SEND to {bucket}: {e}"));
    assert_eq!(outcome.rejected, 0, "{outcome:?}");
    assert_eq!(outcome.accepted as usize, events.len(), "{outcome:?}");
}

/// The bucket's INFO `durable` object, which must be there.
async fn durable_info(client: &Client, bucket: &str) -> Value {
    let info = client.info(Some(bucket)).await.expect("bucket INFO");
    let durable = info["durable"].clone();
    assert!(durable.is_object(), "no durable object in {info}");
    durable
}

/// The bucket's INFO `durable.recovered` object, which must be there (the daemon
/// rebuilt the bucket from disk).
async fn recovered(client: &Client, bucket: &str) -> Value {
    let durable = durable_info(client, bucket).await;
    let recovered = durable["recovered"].clone();
    for field in ["records", "events", "millis", "snapshot_lsn"] {
        assert!(
            recovered[field].is_u64(),
            "recovered.{field} missing: {durable}"
        );
    }
    recovered
}

// ---------------------------------------------------------------------------------------
// The crash harness

/// What one sending connection did before its daemon was killed.
#[derive(Default)]
struct Sent {
    /// Every key put in a SEND frame (answered or not).
    attempted: Vec<String>,
    /// The keys of SEND frames answered OK.
    acked: Vec<String>,
    /// SEND frames started and never answered OK.
    unanswered: usize,
}

/// Sends frames of `CRASH_BATCH` unique keys with `CRASH_IN_FLIGHT` in flight until the
/// connection dies; `outstanding` counts frames started and not yet answered.
async fn send_until_killed(
    client: Client,
    cycle: u32,
    task: usize,
    outstanding: Arc<AtomicUsize>,
) -> Sent {
    let mut sent = Sent::default();
    let mut queue: VecDeque<(Vec<String>, PendingReply)> = VecDeque::new();
    let mut n = 0u64;
    'send: loop {
        while queue.len() < CRASH_IN_FLIGHT {
            let keys: Vec<String> = (0..CRASH_BATCH)
                .map(|_| {
                    n += 1;
                    format!("c{cycle}-t{task}-{n}")
                })
                .collect();
            // Recorded before the frame can leave: a key in a view must be among these.
            sent.attempted.extend(keys.iter().cloned());
            match client.start_send(CRASH_BUCKET, &keys).await {
                Ok(pending) => {
                    outstanding.fetch_add(1, Ordering::SeqCst);
                    queue.push_back((keys, pending));
                }
                Err(_) => break 'send,
            }
        }
        let Some((keys, pending)) = queue.pop_front() else {
            break;
        };
        let answer = Client::finish_send(pending).await;
        outstanding.fetch_sub(1, Ordering::SeqCst);
        match answer {
            Ok(outcome) => {
                assert_eq!(outcome.rejected, 0, "counter rejected {outcome:?}");
                assert_eq!(outcome.accepted as usize, keys.len(), "{outcome:?}");
                sent.acked.extend(keys);
            }
            Err(e) => {
                assert!(
                    !matches!(&e, ClientError::Server { .. }),
                    "a SEND was refused while the daemon was up: {e}"
                );
                sent.unanswered += 1;
                break;
            }
        }
    }
    // Answers already read before the connection died still count as acknowledged.
    for (keys, pending) in queue {
        match Client::finish_send(pending).await {
            Ok(_) => sent.acked.extend(keys),
            Err(_) => sent.unanswered += 1,
        }
    }
    sent
}

/// Checks a restarted daemon against what was sent: every acknowledged key counted
/// exactly once, no key that was never sent, no count above 1.
async fn check_crash_view(
    daemon: &Daemon,
    acked: &HashSet<String>,
    attempted: &HashSet<String>,
    cycle: u32,
) {
    let client = daemon.client().await;
    let view = counts(&client.view(CRASH_BUCKET, None).await.expect("VIEW c"));
    let mut lost: Vec<&String> = acked.iter().filter(|k| !view.contains_key(*k)).collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "cycle {cycle}: {} acknowledged key(s) lost after SIGKILL, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    for (key, n) in &view {
        assert!(
            attempted.contains(key),
            "cycle {cycle}: key {key:?} in the view was never sent"
        );
        assert_eq!(*n, 1, "cycle {cycle}: key {key:?} counted {n} times");
    }
    recovered(&client, CRASH_BUCKET).await;
}

/// `cycles` rounds of: four connections pipelining SENDs, SIGKILL at a chosen instant,
/// restart on the same database, check the view. The restarted daemon serves the next
/// round, so keys must survive several crashes (and the snapshots taken in between)
/// until the state reaches [`CRASH_DUMP_AT`] keys and is DUMPed. `args` go to every
/// daemon start. Returns how many write-ahead segments filled up before the kills.
async fn crash_cycles(cycles: u32, args: &[&str]) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start(dir.path(), args).await;
    daemon
        .client()
        .await
        .create_with(CRASH_BUCKET, "counter", None, &json!({"durable": true}))
        .await
        .expect("create durable counter");
    // Since the last answered DUMP: keys acknowledged, and keys sent at all.
    let mut acked: HashSet<String> = HashSet::new();
    let mut attempted: HashSet<String> = HashSet::new();
    let (mut kills_in_flight, mut unanswered_total) = (0u32, 0usize);
    let (mut acked_total, mut sent_total, mut dumps) = (0usize, 0usize, 0u32);
    // Write-ahead segments filled (and moved into the database file) before the kills.
    let mut seals = 0;
    for cycle in 0..cycles {
        if acked.len() >= CRASH_DUMP_AT {
            // The view was just checked and nothing was sent since: the DUMP returns
            // exactly it, and none of its keys may come back after later crashes (a
            // key that did would be "never sent" for the next checks).
            let client = daemon.client().await;
            let view = client.view(CRASH_BUCKET, None).await.expect("VIEW c");
            let dumped = client.dump(CRASH_BUCKET).await.expect("DUMP c");
            assert_eq!(dumped, view, "cycle {cycle}: the DUMP returns the view");
            acked.clear();
            attempted.clear();
            dumps += 1;
        }
        // Seeded per cycle, so a failing cycle can be replayed with the same crash point.
        let mut rng = SplitMix64(0xB0C4_E71D ^ (u64::from(cycle) << 32));
        let delay = Duration::from_millis(30 + rng.below(271));
        let mut clients = Vec::new();
        for _ in 0..CRASH_CLIENTS {
            clients.push(daemon.client().await);
        }
        let observer = daemon.client().await;
        let outstanding = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(task, client)| {
                tokio::spawn(send_until_killed(client, cycle, task, outstanding.clone()))
            })
            .collect();
        // The crash point, not a synchronisation: the kill lands wherever the sends are.
        tokio::time::sleep(delay).await;
        let storage = observer.info(None).await.expect("INFO")["storage"].clone();
        seals += storage["wal"]["seals"].as_u64().expect("storage.wal.seals");
        let in_flight = outstanding.load(Ordering::SeqCst);
        let status = daemon.kill().await;
        assert!(!status.success(), "cycle {cycle}: killed daemon exited 0");
        let mut unanswered = 0;
        for task in tasks {
            let sent = task.await.expect("sender task");
            unanswered += sent.unanswered;
            sent_total += sent.attempted.len();
            acked_total += sent.acked.len();
            attempted.extend(sent.attempted);
            acked.extend(sent.acked);
        }
        if in_flight > 0 && unanswered > 0 {
            kills_in_flight += 1;
        }
        unanswered_total += unanswered;
        daemon = Daemon::start(dir.path(), args).await;
        check_crash_view(&daemon, &acked, &attempted, cycle).await;
    }
    daemon.terminate().await;
    let events = acked_total;
    eprintln!(
        "{cycles} kill cycles: {events} events acknowledged, {sent_total} sent, \
         {unanswered_total} SEND frame(s) unanswered, {kills_in_flight} kill(s) with sends \
         in flight, {dumps} DUMP(s), {seals} write-ahead segment(s) filled"
    );
    assert!(
        events >= 20 * cycles as usize * CRASH_BATCH,
        "only {events} events acknowledged over {cycles} cycles: the harness barely sent"
    );
    assert!(
        kills_in_flight * 2 >= cycles,
        "only {kills_in_flight} of {cycles} kills happened with sends in flight"
    );
    seals
}

// Across 20 SIGKILLs of the real daemon while four connections pipeline SENDs to a
// durable counter, every acknowledged event is counted exactly once after each restart
// (until an answered DUMP, which the harness takes to bound the state, resets it), and
// no event that was never sent, or was dumped, or is counted twice, appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_event() {
    crash_cycles(20, &[]).await;
}

// The crash harness of `kill_9_loses_no_acknowledged_event` over 200 kill cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 200 kill cycles"]
async fn kill_9_loses_no_acknowledged_event_long() {
    crash_cycles(200, &[]).await;
}

/// The crash harness over `cycles` with write-ahead segments of 64 KiB, so that many
/// fill up and their records move into the database file while the sends go on and the
/// kills land; at least one segment per cycle must have filled.
async fn small_segment_cycles(cycles: u32) {
    let seals = crash_cycles(cycles, &["--wal-segment-kib", "64"]).await;
    assert!(
        seals >= u64::from(cycles),
        "only {seals} segment(s) filled before the kills"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_small_write_ahead_segments() {
    small_segment_cycles(15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 200 kill cycles"]
async fn kill_9_with_small_write_ahead_segments_long() {
    small_segment_cycles(200).await;
}

// ---------------------------------------------------------------------------------------

// Once a DUMP of a durable counter has been answered, a SIGKILL and restart bring back
// only the events sent after it, never those it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_dump_does_not_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    client
        .create_with("d", "counter", None, &json!({"durable": true}))
        .await
        .expect("create");
    let before: Vec<String> = (0..60).map(|i| format!("before-{i}")).collect();
    for chunk in before.chunks(7) {
        send_ok(&client, "d", chunk).await;
    }
    let dumped = counts(&client.dump("d").await.expect("DUMP"));
    assert_eq!(dumped, once(&before), "the DUMP returns what was sent");
    let after: Vec<String> = (0..45).map(|i| format!("after-{i}")).collect();
    for chunk in after.chunks(4) {
        send_ok(&client, "d", chunk).await;
    }
    assert_eq!(
        counts(&client.view("d", None).await.expect("VIEW")),
        once(&after)
    );
    drop(client);
    daemon.kill().await;

    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    let view = counts(&client.view("d", None).await.expect("VIEW after restart"));
    let back: Vec<&String> = dumped.keys().filter(|k| view.contains_key(*k)).collect();
    assert!(back.is_empty(), "dumped keys came back: {back:?}");
    assert_eq!(view, once(&after), "exactly the keys sent after the DUMP");
    recovered(&client, "d").await;
    daemon.terminate().await;
}

// Pipelined SENDs to a durable bucket are logged a group at a time, and a threshold
// flush inside a group splits it: replay after a SIGKILL must see the events before the
// flush, the flush, then the rest, in that order. With a threshold of 10, 95 one-event
// frames make 9 flushes and leave exactly the last 5 events pending; a record logged
// out of order would leave a different count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_flushes_inside_pipelined_groups_replay_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    let options = json!({"durable": true, "threshold": 10, "timeout": 600});
    client
        .create_with("t", "counter", None, &options)
        .await
        .expect("create");
    let mut pending = Vec::new();
    for i in 0..95u32 {
        // The key says which ten the event belongs to: the last five are "k9".
        let key = format!("k{}", i / 10);
        pending.push(client.start_send("t", &[key]).await.expect("start SEND"));
    }
    for reply in pending {
        Client::finish_send(reply).await.expect("SEND acknowledged");
    }
    let want = BTreeMap::from([("k9".to_owned(), 5u64)]);
    assert_eq!(counts(&client.view("t", None).await.expect("VIEW")), want);
    drop(client);
    daemon.kill().await;

    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(
        counts(&client.view("t", None).await.expect("VIEW after restart")),
        want,
        "the events pending since the last flush, exactly"
    );
    let info = client.info(Some("t")).await.expect("INFO");
    assert_eq!(info["pending"], 5, "{info}");
    daemon.terminate().await;
}

// A durable `unique` bucket shows the same view after a SIGKILL and restart, and again
// after a graceful restart, which replays no record (its shutdown snapshot covers all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_view_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    client
        .create_with("u", "unique", None, &json!({"durable": true}))
        .await
        .expect("create");
    // Key k has k+1 members, each sent three times, interleaved across batches.
    let mut events = Vec::new();
    for round in 0..3 {
        for k in 0..12 {
            for m in 0..=k {
                events.push(format!("key{k} member{}", (m + round) % (k + 1)));
            }
        }
    }
    for chunk in events.chunks(9) {
        send_ok(&client, "u", chunk).await;
    }
    let view = client.view("u", None).await.expect("VIEW");
    let expected: Value = (0..12)
        .map(|k| (format!("key{k}"), json!(k + 1)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    assert_eq!(view, expected, "the aggregate before any restart");
    drop(client);
    daemon.kill().await;

    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(
        client.view("u", None).await.expect("VIEW after SIGKILL"),
        view,
        "after SIGKILL"
    );
    let after_kill = recovered(&client, "u").await;
    assert!(
        after_kill["records"].as_u64().unwrap_or(0) > 0,
        "no snapshot was written, so records were replayed: {after_kill}"
    );
    // More members (old and new) before the graceful restart.
    send_ok(
        &client,
        "u",
        &["key0 member0", "key0 fresh", "key12 a", "key12 a"],
    )
    .await;
    let view = client.view("u", None).await.expect("VIEW");
    assert_eq!(view["key0"], json!(2));
    assert_eq!(view["key12"], json!(1));
    let lsn = durable_info(&client, "u").await["lsn"].as_u64();
    drop(client);
    let status = daemon.terminate().await;
    assert!(status.success(), "graceful shutdown: {status}");

    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(
        client.view("u", None).await.expect("VIEW after SIGTERM"),
        view,
        "after a graceful restart"
    );
    let after_term = recovered(&client, "u").await;
    assert_eq!(
        after_term["records"],
        json!(0),
        "the shutdown snapshot covers everything: {after_term}"
    );
    assert_eq!(after_term["snapshot_lsn"].as_u64(), lsn, "{after_term}");
    daemon.terminate().await;
}

// More SEND frames than the snapshot interval: after a SIGKILL the file holds a snapshot
// and only the records after it, the view is right, and the restart replayed only those
// records, not the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_log() {
    const FRAMES: u64 = 12_000;
    const KEYS: u64 = 40;
    const { assert!(FRAMES > bucketly::engine::SNAPSHOT_EVERY_RECORDS) };
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    client
        .create_with("s", "counter", None, &json!({"durable": true}))
        .await
        .expect("create");
    // Consecutive SENDs to one bucket share a log record; a SEND to another bucket in
    // between keeps every frame to "s" a record of its own.
    client
        .create("other", "counter", None)
        .await
        .expect("create other");
    let mut pending = VecDeque::new();
    for i in 0..FRAMES {
        let key = format!("k{}", i % KEYS);
        pending.push_back(client.start_send("s", &[key]).await.expect("start SEND"));
        pending.push_back(
            client
                .start_send("other", &["x"])
                .await
                .expect("start SEND"),
        );
        if pending.len() >= 512 {
            let reply = pending.pop_front().expect("pending");
            Client::finish_send(reply).await.expect("SEND acknowledged");
        }
    }
    for reply in pending {
        Client::finish_send(reply).await.expect("SEND acknowledged");
    }
    let expected: BTreeMap<String, u64> = (0..KEYS)
        .map(|k| (format!("k{k}"), FRAMES / KEYS))
        .collect();
    assert_eq!(
        counts(&client.view("s", None).await.expect("VIEW")),
        expected
    );
    let uid = durable_info(&client, "s").await["uid"]
        .as_u64()
        .expect("durable.uid");
    drop(client);
    daemon.kill().await;

    // What the file holds: a snapshot, and only the records after it.
    let path = dir.path().join("bucketly.redb");
    let (stored, snapshot) = tokio::task::spawn_blocking(move || {
        let store = Store::open(&path).expect("open the killed daemon's database");
        let mut stored = 0u64;
        store
            .replay(uid, 0, |_, _| {
                stored += 1;
                Ok(())
            })
            .expect("read the log");
        (stored, store.snapshot(uid).expect("read the snapshot"))
    })
    .await
    .expect("blocking read");
    let snapshot = snapshot.expect("a snapshot is stored");
    assert!(
        stored < FRAMES,
        "the log holds all {stored} records: the snapshot did not remove those it covers"
    );
    assert_eq!(
        snapshot.lsn + stored,
        FRAMES,
        "the snapshot (lsn {}) and the {stored} stored records cover every SEND",
        snapshot.lsn
    );

    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    assert_eq!(
        counts(&client.view("s", None).await.expect("VIEW after restart")),
        expected,
        "after SIGKILL"
    );
    let durable = durable_info(&client, "s").await;
    let recovered = recovered(&client, "s").await;
    let records = recovered["records"].as_u64().expect("records");
    let snapshot_lsn = recovered["snapshot_lsn"].as_u64().expect("snapshot_lsn");
    assert!(records < FRAMES, "replayed the whole log: {durable}");
    assert!(snapshot_lsn > 0, "no snapshot was taken: {durable}");
    assert_eq!(snapshot_lsn, snapshot.lsn, "{durable}");
    assert_eq!(records, stored, "every stored record replayed: {durable}");
    assert_eq!(
        Some(snapshot_lsn + records),
        durable["lsn"].as_u64(),
        "the snapshot and the replayed records cover every record: {durable}"
    );
    daemon.terminate().await;
}

// ---------------------------------------------------------------------------------------
// Fault injection

/// A file backend whose writes and syncs fail with ENOSPC while `fail` is set.
#[derive(Debug)]
struct FaultyBackend {
    inner: FileBackend,
    fail: Arc<AtomicBool>,
}

impl FaultyBackend {
    fn check(&self) -> std::io::Result<()> {
        enospc_if(&self.fail)
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// ENOSPC while `fail` is set.
fn enospc_if(fail: &AtomicBool) -> std::io::Result<()> {
    if fail.load(Ordering::SeqCst) {
        Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
    } else {
        Ok(())
    }
}

/// The database at `path` on a [`FaultyBackend`] driven by `fail`, and its write-ahead
/// file failing the same way.
fn faulty_store(path: &Path, fail: Arc<AtomicBool>) -> Store {
    let wal_fail = fail.clone();
    let check: IoCheck = Arc::new(move |_| enospc_if(&wal_fail));
    let wal = Wal::new(Wal::dir_beside(path), SEGMENT_BYTES, Some(check));
    let path = path.to_owned();
    Store::open_with(
        "test".into(),
        Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            let backend = FaultyBackend {
                inner: FileBackend::new(file)?,
                fail: fail.clone(),
            };
            redb::Builder::new().create_with_backend(backend)
        }),
        wal,
    )
    .expect("open the store")
}

/// Expects a SEND refused with STORAGE_ERROR, never OK.
async fn send_refused(client: &Client, bucket: &str, events: &[&str]) {
    match client.send(bucket, events).await {
        Ok(outcome) => panic!("SEND {events:?} acknowledged on a failing disk: {outcome:?}"),
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::StorageError), "{e}");
            assert!(
                matches!(e, ClientError::Server { code: 501, .. }),
                "STORAGE_ERROR is 501: {e:?}"
            );
        }
    }
}

/// Polls `probe` every 50 ms until it holds, for at most `budget`.
async fn wait_until<F, Fut>(budget: Duration, what: &str, mut probe: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, Value)>,
{
    let until = Instant::now() + budget;
    loop {
        let (done, seen) = probe().await;
        if done {
            return seen;
        }
        assert!(
            Instant::now() < until,
            "{what} within {budget:?}; last: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `bucket` has reloaded from disk after the store recovered (INFO
/// `durable.recovered` appears), so that the next request does not race the reload.
async fn reloaded(client: &Client, bucket: &str) {
    let what = format!("{bucket} reloaded from disk");
    wait_until(Duration::from_secs(15), &what, || {
        let client = client.clone();
        async move {
            let durable = client.info(Some(bucket)).await.expect("INFO")["durable"].clone();
            (durable["recovered"].is_object(), durable)
        }
    })
    .await;
}

// While the disk fails writes (ENOSPC), a durable bucket refuses SENDs with
// STORAGE_ERROR and never acknowledges one, in-memory buckets keep working and server
// INFO reports the store unhealthy; once the disk works again the store recovers, the
// bucket accepts SENDs and holds exactly the acknowledged events, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_refuses_durable_writes_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path());
    let fail = Arc::new(AtomicBool::new(false));
    let store = faulty_store(&config.database, fail.clone());
    let server = TestServer::start_with_store(config.clone(), store).await;
    let client = server.client().await;
    client
        .create_with("d", "counter", None, &json!({"durable": true}))
        .await
        .expect("create durable");
    client
        .create("m", "counter", None)
        .await
        .expect("create in-memory");
    client
        .create_with("quiet", "counter", None, &json!({"durable": true}))
        .await
        .expect("create a durable bucket that writes nothing during the outage");
    send_ok(&client, "d", &["a", "b"]).await;
    send_ok(&client, "m", &["m1"]).await;
    send_ok(&client, "quiet", &["q"]).await;
    let storage = client.info(None).await.expect("INFO")["storage"].clone();
    assert_eq!(storage["healthy"], json!(true), "{storage}");

    fail.store(true, Ordering::SeqCst);
    send_refused(&client, "d", &["refused-1", "refused-2"]).await;
    send_refused(&client, "d", &["refused-3"]).await;
    send_refused(&client, "d", &["refused-4"]).await;
    send_ok(&client, "m", &["m2", "m1"]).await;
    assert_eq!(
        client.view("m", None).await.expect("VIEW m"),
        json!({"m1": 2, "m2": 1}),
        "the in-memory bucket keeps working"
    );
    let storage = client.info(None).await.expect("INFO")["storage"].clone();
    assert_eq!(storage["healthy"], json!(false), "{storage}");
    assert!(
        storage["error"].as_str().is_some_and(|e| !e.is_empty()),
        "an unhealthy store says why: {storage}"
    );
    assert!(
        storage["failed_commits"].as_u64().unwrap_or(0) >= 1,
        "{storage}"
    );
    send_refused(&client, "d", &["refused-5"]).await;

    fail.store(false, Ordering::SeqCst);
    // The writer reopens after 1 s, then 2 s, 4 s...: poll INFO until it has.
    wait_until(Duration::from_secs(15), "storage healthy again", || {
        let client = client.clone();
        async move {
            let storage = client.info(None).await.expect("INFO")["storage"].clone();
            (storage["healthy"] == json!(true), storage)
        }
    })
    .await;
    // The store reports healthy before the bucket has reloaded from disk.
    reloaded(&client, "d").await;
    send_ok(&client, "d", &["c", "a"]).await;
    // A durable bucket none of whose writes failed is in step with the disk: it keeps
    // its state without a reload (its recovery message came before this SEND's).
    send_ok(&client, "quiet", &["q"]).await;
    assert_eq!(
        client.view("quiet", None).await.expect("VIEW quiet"),
        json!({"q": 2})
    );
    assert_eq!(
        durable_info(&client, "quiet").await["recovered"],
        Value::Null
    );
    let expected = json!({"a": 2, "b": 1, "c": 1});
    assert_eq!(
        client.view("d", None).await.expect("VIEW d"),
        expected,
        "exactly the acknowledged events, none of the refused ones"
    );
    assert_eq!(
        client.info(None).await.expect("INFO")["storage"]["healthy"],
        json!(true)
    );
    drop(client);
    server.stop().await;

    let server = TestServer::start_with(config).await;
    let client = server.client().await;
    assert_eq!(
        client.view("d", None).await.expect("VIEW d after restart"),
        expected,
        "after a restart on the same file"
    );
    assert_eq!(
        client.view("m", None).await.expect("VIEW m after restart"),
        json!({}),
        "the in-memory bucket comes back empty"
    );
    server.stop().await;
}

// A TAKE whose record cannot be written is refused and makes no take: once the disk
// works again, the bucket has reloaded the events and the next TAKE hands them out,
// as take 1 of the same window. A TAKE made meanwhile on another connection is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_refused_by_a_failing_disk_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path());
    let fail = Arc::new(AtomicBool::new(false));
    let store = faulty_store(&config.database, fail.clone());
    let server = TestServer::start_with_store(config, store).await;
    let client = server.client().await;
    client
        .create_with("d", "unique", None, &json!({"durable": true}))
        .await
        .expect("create durable");
    send_ok(&client, "d", &["/a x", "/a y", "/b x"]).await;

    // The second TAKE comes on another connection: if it reaches the bucket while the
    // first one's record is being written, it is a re-delivery that must wait for that
    // record (a barrier), and fail with it.
    let other = server.client().await;
    fail.store(true, Ordering::SeqCst);
    let (first, second) = tokio::join!(client.take("d"), other.take("d"));
    for refused in [first, second] {
        match refused {
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::StorageError), "{e}"),
            Ok(take) => panic!("a take answered on a failing disk: {take:?}"),
        }
    }

    fail.store(false, Ordering::SeqCst);
    reloaded(&client, "d").await;
    let take = client.take("d").await.expect("take after recovery");
    assert_eq!((take.id, take.events), (1, 3));
    assert_eq!(take.output, json!({"/a": 2, "/b": 1}));
    let created = client.info(Some("d")).await.expect("INFO d")["created_ms"].clone();
    assert_eq!(json!(take.since_ms), created);
    server.stop().await;
}

// `--writer-nice` reaches the writer thread, and INFO shows the nice value in effect.
// Raising a nice value needs no privilege, so this checks +3 against 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_shows_the_writer_priority_it_was_given() {
    let mut nice = Vec::new();
    for writer_nice in [0, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = TestServer::start_with(bucketly::Config {
            writer_nice,
            ..config_in(dir.path())
        })
        .await;
        let info = server.client().await.info(None).await.expect("INFO");
        nice.push(info["storage"]["writer_nice"].as_i64());
        server.stop().await;
    }
    if cfg!(target_os = "linux") {
        let base = nice[0].expect("the writer's nice value");
        assert_eq!(nice[1], Some((base + 3).min(19)), "{nice:?}");
    } else {
        assert_eq!(nice, [None, None]);
    }
}
