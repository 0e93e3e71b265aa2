//! The unique-clicks example against a real PostgreSQL server: each window lands in
//! `url_clicks` exactly once, whatever fails between TAKE and RELEASE (PostgreSQL
//! going down mid-flush, the flusher crashing after COMMIT, bucketlyd being killed).
//! The expected counts are recomputed here from the seeded clicks that were sent. The
//! failures are injected by a [`Hook`] at the flusher's steps: it stops PostgreSQL after
//! TAKE, or returns an error after COMMIT, as a crash before RELEASE would.

#[allow(dead_code)]
#[path = "../../examples/unique_clicks/flusher.rs"]
mod flusher;
#[allow(dead_code)]
#[path = "../../examples/unique_clicks/producer.rs"]
pub(crate) mod producer;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bucketly::Client;
use flusher::{Backoff, Connections, FlushError, Hook, Report, Step};
use serde_json::json;

use crate::common::postgres::PgServer;
use crate::common::{Daemon, TestServer, ADMIN, ADMIN_PASSWORD};

const BUCKET: &str = "clicks";
/// Retries without real waiting: the outage ends inside the hook, not by time.
const FAST: Backoff = Backoff {
    first: Duration::from_millis(1),
    max: Duration::from_millis(10),
};

type Clicks = Vec<(String, String)>;

/// `n` seeded clicks over few URLs and users, so that windows share URLs and users.
fn clicks(seed: u64, n: u64) -> Clicks {
    producer::clicks(seed, n, 40, 60).collect()
}

/// Distinct users per URL over `batches`: what one window must hold.
fn expected(batches: &[&Clicks]) -> BTreeMap<String, i64> {
    let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (url, user) in batches.iter().flat_map(|b| b.iter()) {
        users.entry(url.clone()).or_default().insert(user.clone());
    }
    users
        .into_iter()
        .map(|(u, s)| (u, s.len() as i64))
        .collect()
}

async fn send(client: &Client, batch: &Clicks) {
    let events: Vec<String> = batch.iter().map(|(u, v)| producer::event(u, v)).collect();
    let outcome = client.send(BUCKET, &events).await.expect("send");
    assert_eq!(
        (outcome.accepted as usize, outcome.rejected),
        (events.len(), 0)
    );
}

/// What the hook saw.
#[derive(Debug, PartialEq)]
enum Seen {
    Taken(u64),
    Committed(u64),
    /// A failed attempt, and whether PostgreSQL was what failed.
    Failed {
        postgres: bool,
    },
}

/// PostgreSQL goes down right after the first TAKE; `meanwhile` is sent while it is
/// down, and it comes back at the first failed attempt.
struct Outage<'a> {
    pg: &'a mut PgServer,
    client: &'a Client,
    meanwhile: &'a Clicks,
    done: bool,
}

#[derive(Default)]
struct TestHook<'a> {
    seen: Vec<Seen>,
    outage: Option<Outage<'a>>,
    /// Stop at the first COMMIT, before RELEASE, as a crash would.
    crash_after_commit: bool,
}

impl Hook for TestHook<'_> {
    async fn at(&mut self, step: Step<'_>) -> Result<(), FlushError> {
        match step {
            Step::Taken(take) => {
                self.seen.push(Seen::Taken(take.id));
                if let Some(o) = self
                    .outage
                    .as_mut()
                    .filter(|o| !o.done && o.pg.is_running())
                {
                    o.pg.stop().await;
                    send(o.client, o.meanwhile).await;
                }
            }
            Step::Committed(take) => {
                self.seen.push(Seen::Committed(take.id));
                if self.crash_after_commit {
                    return Err(FlushError::Stopped("simulated crash".into()));
                }
            }
            Step::Failed { error, .. } => {
                let postgres = matches!(error, FlushError::Postgres(_));
                self.seen.push(Seen::Failed { postgres });
                if let Some(o) = self.outage.as_mut().filter(|o| !o.done) {
                    o.pg.start().await;
                    o.done = true;
                }
            }
        }
        Ok(())
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// Every `url_clicks` row: (window start ms, url) → unique visitors.
async fn url_clicks(db: &tokio_postgres::Client) -> BTreeMap<(u64, String), i64> {
    let rows = db
        .query(
            "SELECT window_start, url, unique_visitors FROM url_clicks",
            &[],
        )
        .await
        .expect("select url_clicks");
    rows.iter()
        .map(|r| ((ms(r.get(0)), r.get(1)), r.get(2)))
        .collect()
}

/// One window's rows: url → unique visitors.
async fn window(db: &tokio_postgres::Client, since_ms: u64) -> BTreeMap<String, i64> {
    url_clicks(db)
        .await
        .into_iter()
        .filter(|((start, _), _)| *start == since_ms)
        .map(|((_, url), n)| (url, n))
        .collect()
}

/// The ledger as (window start, window end, take id, events, urls), oldest first.
async fn ledger(db: &tokio_postgres::Client) -> Vec<(u64, u64, i64, i64, i64)> {
    let rows = db
        .query(
            "SELECT window_start, window_end, take_id, events, urls FROM bucketly_windows \
             WHERE bucket = $1 ORDER BY window_start",
            &[&BUCKET],
        )
        .await
        .expect("select bucketly_windows");
    rows.iter()
        .map(|r| (ms(r.get(0)), ms(r.get(1)), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// The ledger row a report must have left.
fn ledger_row(r: &Report, window: &BTreeMap<String, i64>) -> (u64, u64, i64, i64, i64) {
    let (id, events) = (r.take_id as i64, r.events as i64);
    (r.since_ms, r.taken_ms, id, events, window.len() as i64)
}

/// After the last window: the tables hold exactly `windows` (one per report), and the
/// bucket has nothing pending: the next take is a new, empty one.
async fn check_final(
    db: &tokio_postgres::Client,
    client: &Client,
    windows: &[(&Report, BTreeMap<String, i64>)],
) {
    let mut want = BTreeMap::new();
    for (r, counts) in windows {
        for (url, n) in counts {
            want.insert((r.since_ms, url.clone()), *n);
        }
    }
    assert_eq!(url_clicks(db).await, want, "url_clicks");
    let rows: Vec<_> = windows.iter().map(|(r, c)| ledger_row(r, c)).collect();
    assert_eq!(ledger(db).await, rows, "bucketly_windows");

    let last = windows.last().expect("a window").0;
    let take = client.take(BUCKET).await.expect("final take");
    assert!(take.id > last.take_id, "{take:?} after {last:?}");
    assert_eq!(
        (take.since_ms, take.events, &take.output),
        (last.taken_ms, 0, &json!({}))
    );
}

async fn schema(pg: &PgServer) -> tokio_postgres::Client {
    let db = pg.connect().await;
    flusher::create_schema(&db).await.expect("schema");
    flusher::create_schema(&db)
        .await
        .expect("schema again: idempotent");
    db
}

#[tokio::test]
async fn each_window_lands_once_through_outage_and_crash() {
    let Some(mut pg) = PgServer::start_or_skip().await else {
        return;
    };
    let db = schema(&pg).await;
    let server = TestServer::start().await;
    let client = server.client().await;
    client.create(BUCKET, "unique", None).await.expect("create");
    let addr = server.addr.to_string();
    let mut conns = Connections::new(&addr, ADMIN, ADMIN_PASSWORD, &pg.config());

    // Window 1: nothing fails.
    let w1 = clicks(1, 300);
    send(&client, &w1).await;
    let mut hook = TestHook::default();
    let r1 = flusher::flush(&mut conns, BUCKET, FAST, &mut hook)
        .await
        .expect("window 1");
    let id1 = r1.take_id;
    assert_eq!(hook.seen, [Seen::Taken(id1), Seen::Committed(id1)]);
    assert_eq!((r1.events, r1.rows, r1.attempts), (300, 40, 1));
    assert_eq!(window(&db, r1.since_ms).await, expected(&[&w1]));

    // Window 2: PostgreSQL stops after TAKE, so the write fails and nothing is
    // released; clicks sent during the outage go to window 3. Once PostgreSQL is back,
    // the retry gets the same take and commits it.
    let (w2, w3a) = (clicks(2, 300), clicks(3, 200));
    send(&client, &w2).await;
    let outage = Outage {
        pg: &mut pg,
        client: &client,
        meanwhile: &w3a,
        done: false,
    };
    let mut hook = TestHook {
        outage: Some(outage),
        ..TestHook::default()
    };
    let r2 = flusher::flush(&mut conns, BUCKET, FAST, &mut hook)
        .await
        .expect("window 2, after the outage");
    let id2 = r2.take_id;
    assert!(id2 > id1);
    assert_eq!(
        hook.seen,
        [
            Seen::Taken(id2),
            Seen::Failed { postgres: true },
            Seen::Taken(id2),
            Seen::Committed(id2)
        ]
    );
    assert_eq!((r2.since_ms, r2.events, r2.attempts), (r1.taken_ms, 300, 2));
    drop(hook);
    let db = pg.connect().await; // the outage closed the old connection

    // Window 3: the flusher crashes after COMMIT, before RELEASE. The rows are there;
    // a new flusher gets the same take, writes it again (same rows) and releases it.
    let w3b = clicks(4, 200);
    send(&client, &w3b).await;
    let want3 = expected(&[&w3a, &w3b]);
    let mut hook = TestHook {
        crash_after_commit: true,
        ..TestHook::default()
    };
    let crash = flusher::flush(&mut conns, BUCKET, FAST, &mut hook).await;
    assert!(matches!(crash, Err(FlushError::Stopped(_))), "{crash:?}");
    let [Seen::Taken(id3), Seen::Committed(c)] = hook.seen[..] else {
        panic!("{:?}", hook.seen);
    };
    assert_eq!(c, id3);
    drop(conns); // the crashed flusher's connections go with it
    assert_eq!(
        window(&db, r2.taken_ms).await,
        want3,
        "committed before the crash"
    );

    let mut conns = Connections::new(&addr, ADMIN, ADMIN_PASSWORD, &pg.config());
    let mut hook = TestHook::default();
    let r3 = flusher::flush(&mut conns, BUCKET, FAST, &mut hook)
        .await
        .expect("window 3, re-delivered");
    assert_eq!(hook.seen, [Seen::Taken(id3), Seen::Committed(id3)]);
    assert_eq!(
        (r3.take_id, r3.since_ms, r3.events),
        (id3, r2.taken_ms, 400)
    );

    let windows = [
        (&r1, expected(&[&w1])),
        (&r2, expected(&[&w2])),
        (&r3, want3),
    ];
    check_final(&db, &client, &windows).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_take_survives_kill_9_between_commit_and_release() {
    let Some(pg) = PgServer::start_or_skip().await else {
        return;
    };
    let db = schema(&pg).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    let durable = json!({ "durable": true });
    client
        .create_with(BUCKET, "unique", None, &durable)
        .await
        .expect("create durable");
    let connect =
        |d: &Daemon| Connections::new(&d.addr.to_string(), ADMIN, ADMIN_PASSWORD, &pg.config());

    let w1 = clicks(11, 300);
    send(&client, &w1).await;
    let r1 = flusher::flush(
        &mut connect(&daemon),
        BUCKET,
        FAST,
        &mut TestHook::default(),
    )
    .await
    .expect("window 1");

    // Window 2 is committed, then the flusher and bucketlyd die before RELEASE.
    let w2 = clicks(12, 300);
    send(&client, &w2).await;
    let mut hook = TestHook {
        crash_after_commit: true,
        ..TestHook::default()
    };
    let crash = flusher::flush(&mut connect(&daemon), BUCKET, FAST, &mut hook).await;
    assert!(matches!(crash, Err(FlushError::Stopped(_))), "{crash:?}");
    let [Seen::Taken(id2), Seen::Committed(_)] = hook.seen[..] else {
        panic!("{:?}", hook.seen);
    };
    drop(client);
    daemon.kill().await;

    // After the restart the pending take comes back from disk, unchanged; clicks sent
    // after the restart belong to the next window.
    let daemon = Daemon::start(dir.path(), &[]).await;
    let client = daemon.client().await;
    let w3 = clicks(13, 200);
    send(&client, &w3).await;
    let mut conns = connect(&daemon);
    let mut hook = TestHook::default();
    let r2 = flusher::flush(&mut conns, BUCKET, FAST, &mut hook)
        .await
        .expect("window 2, re-delivered");
    assert_eq!(hook.seen, [Seen::Taken(id2), Seen::Committed(id2)]);
    assert_eq!((r2.since_ms, r2.events), (r1.taken_ms, 300));
    let r3 = flusher::flush(&mut conns, BUCKET, FAST, &mut TestHook::default())
        .await
        .expect("window 3");
    assert_eq!((r3.since_ms, r3.events), (r2.taken_ms, 200));

    let windows = [
        (&r1, expected(&[&w1])),
        (&r2, expected(&[&w2])),
        (&r3, expected(&[&w3])),
    ];
    check_final(&db, &client, &windows).await;
}

/// A take is identified by its bucket, id and window; if another take ever claims a
/// stored window (say, a bucket whose take history restarted, or another bucket), the
/// write is refused and the stored rows stay as they were.
#[tokio::test]
async fn another_take_never_overwrites_a_window() {
    let Some(pg) = PgServer::start_or_skip().await else {
        return;
    };
    let mut db = schema(&pg).await;
    let take = |taken_ms, output| bucketly::Take {
        id: 1,
        since_ms: 1_000,
        taken_ms,
        events: 3,
        output,
    };
    let first = take(2_000, json!({"/a": 2, "/b": 1}));
    let rows = |n: i64| BTreeMap::from([((1_000, "/a".into()), n), ((1_000, "/b".into()), 1)]);

    assert_eq!(
        flusher::write(&mut db, BUCKET, &first)
            .await
            .expect("write"),
        2
    );
    assert_eq!(
        flusher::write(&mut db, BUCKET, &first)
            .await
            .expect("again"),
        2
    );
    assert_eq!(url_clicks(&db).await, rows(2));

    let other = take(3_000, json!({"/a": 7, "/b": 1}));
    let refused = flusher::write(&mut db, BUCKET, &other).await;
    assert!(
        matches!(refused, Err(FlushError::Take { .. })),
        "{refused:?}"
    );
    assert_eq!(url_clicks(&db).await, rows(2));
    assert_eq!(ledger(&db).await, [(1_000, 2_000, 1, 3, 2)]);

    // Another bucket's window with the same start would share the url_clicks rows.
    let refused = flusher::write(&mut db, "other", &other).await;
    assert!(
        matches!(&refused, Err(FlushError::Take { detail, .. }) if detail.contains("\"clicks\"")),
        "{refused:?}"
    );
    assert_eq!(url_clicks(&db).await, rows(2));
}
