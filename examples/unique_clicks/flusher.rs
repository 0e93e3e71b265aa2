//! The hand-over from bucketly to PostgreSQL, one window at a time:
//!
//! ```text
//!  TAKE ──▶ BEGIN; upsert ledger row; upsert url_clicks rows; COMMIT ──▶ RELEASE
//!   │            (any failure: ROLLBACK, no RELEASE; TAKE again later)
//!   └─ a pending take is handed out again, unchanged, until it is released
//! ```
//!
//! Invariant: a take is released only after its rows are committed, and the rows are
//! upserts keyed by (url, window_start = the take's since_ms) that *set* the values, so
//! writing one take twice (a crash between COMMIT and RELEASE) gives the same rows.
//! The tests include this file as a module, so it depends on nothing else in the example.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bucketly::client::{ClientError, Take};
use bucketly::Client;

/// The tables, as idempotent `CREATE TABLE IF NOT EXISTS` statements.
pub const SCHEMA: &str = include_str!("schema.sql");

/// The ledger row of the window. A take handed out again is identical, so a row with
/// another id or end is another take's: nothing is updated then (see [`write`]).
const UPSERT_WINDOW: &str = "\
    INSERT INTO bucketly_windows (bucket, window_start, window_end, take_id, events, urls)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (bucket, window_start) DO UPDATE
    SET window_end = EXCLUDED.window_end, events = EXCLUDED.events, urls = EXCLUDED.urls
    WHERE bucketly_windows.take_id = EXCLUDED.take_id
      AND bucketly_windows.window_end = EXCLUDED.window_end";

/// `url_clicks` keys rows by (url, window_start) alone, so two buckets flushing into one
/// table must not share a window start: serialise the writers of one window start
/// (`$1`, in ms), then look for another bucket's ledger row of it.
const LOCK_WINDOW: &str = "SELECT pg_advisory_xact_lock($1)";
const OTHER_BUCKET: &str = "\
    SELECT bucket FROM bucketly_windows WHERE window_start = $1 AND bucket <> $2 LIMIT 1";

/// Every URL of the window in one statement: `$1` URLs, `$2` window start, `$3` counts.
const UPSERT_CLICKS: &str = "\
    INSERT INTO url_clicks (url, window_start, unique_visitors)
    SELECT url, $2, n FROM unnest($1::text[], $3::bigint[]) AS t(url, n)
    ON CONFLICT (url, window_start) DO UPDATE SET unique_visitors = EXCLUDED.unique_visitors";

/// Creates the tables if they are missing.
///
/// # Errors
/// PostgreSQL's error.
pub async fn create_schema(pg: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    pg.batch_execute(SCHEMA).await
}

/// Connects to PostgreSQL (`config` is a libpq-style string such as
/// `host=127.0.0.1 port=5432 user=postgres`) and drives the connection in a task.
///
/// # Errors
/// PostgreSQL's error.
pub async fn connect_pg(config: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(config, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("PostgreSQL connection closed: {}", with_causes(&e));
        }
    });
    Ok(client)
}

/// One window handed over to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The take's id.
    pub take_id: u64,
    /// The window, in ms since the Unix epoch: `since_ms..taken_ms`.
    pub since_ms: u64,
    /// End of the window.
    pub taken_ms: u64,
    /// Events bucketly absorbed in the window.
    pub events: u64,
    /// `url_clicks` rows written (one per URL; the ledger row comes on top).
    pub rows: u64,
    /// Attempts it took (1 if nothing failed).
    pub attempts: u32,
    /// From the first TAKE to the RELEASE.
    pub duration: Duration,
}

/// Why a flush did not complete. The take stays pending in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// bucketly refused or the connection failed.
    #[error("bucketly: {0}")]
    Bucketly(#[from] ClientError),
    /// PostgreSQL failed; the transaction was rolled back.
    #[error("PostgreSQL: {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The take cannot be written as it is: retrying would not help.
    #[error("take {take}: {detail}")]
    Take {
        /// The take's id.
        take: u64,
        /// What is wrong.
        detail: String,
    },
    /// A [`Hook`] stopped the flush (a simulated crash).
    #[error("stopped: {0}")]
    Stopped(String),
}

impl FlushError {
    /// Whether trying again can succeed ([`flush`] retries exactly these).
    pub fn is_retryable(&self) -> bool {
        matches!(self, FlushError::Bucketly(_) | FlushError::Postgres(_))
    }
}

/// A point in a flush where a [`Hook`] is called.
#[derive(Debug)]
pub enum Step<'a> {
    /// TAKE answered; nothing is written yet.
    Taken(&'a Take),
    /// The transaction committed; RELEASE comes next.
    Committed(&'a Take),
    /// An attempt failed with a retryable error; [`flush`] waits, then tries again.
    Failed {
        /// What failed.
        error: &'a FlushError,
        /// Attempts so far, this one included.
        attempt: u32,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
}

/// Called at each [`Step`]: for logging (the flusher itself prints nothing), and for
/// tests to inject failures. An error stops the flush at that point, as a crash of the
/// flusher would.
pub trait Hook {
    /// See the trait.
    fn at(&mut self, step: Step<'_>) -> impl Future<Output = Result<(), FlushError>>;
}

/// One attempt: TAKE, write the take in one transaction, RELEASE.
///
/// # Errors
/// The first failure; nothing is released then, so the next TAKE returns the same take.
pub async fn flush_once<H: Hook>(
    bucketly: &Client,
    bucket: &str,
    pg: &mut tokio_postgres::Client,
    hook: &mut H,
) -> Result<Report, FlushError> {
    let started = Instant::now();
    let take = bucketly.take(bucket).await?;
    hook.at(Step::Taken(&take)).await?;
    let rows = write(pg, bucket, &take).await?;
    hook.at(Step::Committed(&take)).await?;
    bucketly.release(bucket, take.id).await?;
    Ok(Report {
        take_id: take.id,
        since_ms: take.since_ms,
        taken_ms: take.taken_ms,
        events: take.events,
        rows,
        attempts: 1,
        duration: started.elapsed(),
    })
}

/// Writes `take` in one transaction: its ledger row, then one `url_clicks` row per URL.
/// Returns the number of `url_clicks` rows. Writing the same take again gives the same
/// rows. A ledger row for the same window from a *different* take, or from another
/// bucket, is refused rather than overwritten.
///
/// # Errors
/// PostgreSQL's error (the transaction is rolled back), or [`FlushError::Take`] when
/// the output is not `{URL: count}` or the window is another take's.
pub async fn write(
    pg: &mut tokio_postgres::Client,
    bucket: &str,
    take: &Take,
) -> Result<u64, FlushError> {
    let bad = |detail: String| FlushError::Take {
        take: take.id,
        detail,
    };
    let (urls, counts) = counts(&take.output).map_err(bad)?;
    let int = |what: &str, n: u64| i64::try_from(n).map_err(|_| bad(format!("{what} {n} > i64")));
    let (id, events, n_urls) = (
        int("id", take.id)?,
        int("events", take.events)?,
        int("urls", urls.len() as u64)?,
    );
    let (start, end) = (at(take.since_ms), at(take.taken_ms));

    let lock = int("window start", take.since_ms)?;
    let tx = pg.transaction().await?;
    tx.execute(LOCK_WINDOW, &[&lock]).await?;
    if let Some(row) = tx.query_opt(OTHER_BUCKET, &[&start, &bucket]).await? {
        let other: String = row.get(0);
        return Err(bad(format!(
            "window starting at {} ms is already stored for bucket {other:?}",
            take.since_ms
        )));
    }
    let ledger = tx
        .execute(
            UPSERT_WINDOW,
            &[&bucket, &start, &end, &id, &events, &n_urls],
        )
        .await?;
    if ledger == 0 {
        return Err(bad(format!(
            "window starting at {} ms already holds another take",
            take.since_ms
        )));
    }
    let rows = if urls.is_empty() {
        0
    } else {
        tx.execute(UPSERT_CLICKS, &[&urls, &start, &counts]).await?
    };
    tx.commit().await?;
    Ok(rows)
}

/// `{"URL": distinct users, ...}` as two parallel columns.
fn counts(output: &serde_json::Value) -> Result<(Vec<String>, Vec<i64>), String> {
    let map = output
        .as_object()
        .ok_or_else(|| format!("output is not a JSON object: {output}"))?;
    let mut urls = Vec::with_capacity(map.len());
    let mut counts = Vec::with_capacity(map.len());
    for (url, n) in map {
        let n = n
            .as_i64()
            .ok_or_else(|| format!("count of {url:?} is not an integer: {n}"))?;
        urls.push(url.clone());
        counts.push(n);
    }
    Ok((urls, counts))
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `error: cause: cause…`; tokio-postgres puts the server's message in the cause.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(&format!(": {e}"));
        cause = e.source();
    }
    text
}

/// How long [`flush`] waits between attempts: `first`, doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Where the flusher connects, and the connections it holds open between flushes.
/// A connection that failed is dropped and opened again at the next attempt.
pub struct Connections {
    bucketly_addr: String,
    user: String,
    password: String,
    pg_config: String,
    bucketly: Option<Client>,
    pg: Option<tokio_postgres::Client>,
}

impl Connections {
    /// Nothing is connected until the first flush.
    pub fn new(bucketly_addr: &str, user: &str, password: &str, pg_config: &str) -> Self {
        Connections {
            bucketly_addr: bucketly_addr.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            pg_config: pg_config.to_owned(),
            bucketly: None,
            pg: None,
        }
    }

    async fn bucketly(&mut self) -> Result<Client, ClientError> {
        if let Some(client) = &self.bucketly {
            return Ok(client.clone());
        }
        let client = Client::connect(self.bucketly_addr.as_str()).await?;
        client.login(&self.user, &self.password).await?;
        self.bucketly = Some(client.clone());
        Ok(client)
    }

    async fn pg(&mut self) -> Result<&mut tokio_postgres::Client, tokio_postgres::Error> {
        let pg = match self.pg.take() {
            Some(pg) if !pg.is_closed() => pg,
            _ => connect_pg(&self.pg_config).await?,
        };
        Ok(self.pg.insert(pg))
    }

    /// Drops the connection that `error` came from, unless it is still usable.
    fn forget_broken(&mut self, error: &FlushError) {
        match error {
            // A server answer leaves the connection usable.
            FlushError::Bucketly(ClientError::Server { .. }) => {}
            FlushError::Bucketly(_) => self.bucketly = None,
            FlushError::Postgres(_) => self.pg = None,
            _ => {}
        }
    }
}

/// Flushes one window, retrying retryable failures (with `backoff`, reconnecting what
/// failed) until it is written and released. Each retry TAKEs again, which hands out
/// the same pending take.
///
/// # Errors
/// Only what is not retryable: [`FlushError::Take`], or a hook's error.
pub async fn flush<H: Hook>(
    conns: &mut Connections,
    bucket: &str,
    backoff: Backoff,
    hook: &mut H,
) -> Result<Report, FlushError> {
    let started = Instant::now();
    let mut wait = backoff.first;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match attempt(conns, bucket, hook).await {
            Ok(report) => {
                return Ok(Report {
                    attempts,
                    duration: started.elapsed(),
                    ..report
                })
            }
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => e,
        };
        conns.forget_broken(&error);
        let step = Step::Failed {
            error: &error,
            attempt: attempts,
            retry_in: wait,
        };
        hook.at(step).await?;
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(backoff.max);
    }
}

async fn attempt<H: Hook>(
    conns: &mut Connections,
    bucket: &str,
    hook: &mut H,
) -> Result<Report, FlushError> {
    let bucketly = conns.bucketly().await?;
    let pg = conns.pg().await?;
    flush_once(&bucketly, bucket, pg, hook).await
}
