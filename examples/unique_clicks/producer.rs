//! Simulated traffic: users clicking URLs, sent to a bucket as `"URL USER"` events at
//! a steady rate. The clicks come from a seeded generator, so a test can recompute
//! exactly what was sent. The tests include this file as a module.

use std::future::Future;
use std::time::{Duration, Instant};

use bucketly::client::ClientError;
use bucketly::Client;

/// How often the producer sends a batch.
pub const TICK: Duration = Duration::from_millis(10);
/// The most events in one SEND; a producer that fell behind catches up in batches of
/// this size, so its memory stays bounded whatever the rate.
pub const MAX_BATCH: usize = 10_000;

/// `n` clicks as (URL, user): URL `/page/0` to `/page/{urls-1}` and user `user0` to
/// `user{users-1}`, each drawn uniformly and independently. The same arguments give
/// the same clicks.
pub fn clicks(seed: u64, n: u64, urls: u64, users: u64) -> impl Iterator<Item = (String, String)> {
    let mut rng = SplitMix64(seed);
    (0..n).map(move |_| {
        let url = rng.below(urls);
        let user = rng.below(users);
        (format!("/page/{url}"), format!("user{user}"))
    })
}

/// The event the stock `unique` handler reads: `KEY MEMBER`.
pub fn event(url: &str, user: &str) -> String {
    format!("{url} {user}")
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for traffic.
/// The tests use it too, for anything that must be random but replayable.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n ≥ 1), by multiply-and-shift; the bias is below 2^-40 here.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n.max(1))) >> 64) as u64
    }
}

/// What to send (also the `produce` subcommand's options).
#[derive(Debug, Clone, clap::Args)]
pub struct Plan {
    /// Clicks per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Distinct URLs.
    #[arg(long, default_value_t = 100)]
    pub urls: u64,
    /// Distinct users.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Generator seed: the same seed sends the same clicks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stop after this many clicks.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. 60s, 2m, 500ms).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// `60s`, `1.5s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s, 500ms or 2m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|e| format!("{s:?}: {e}"))
}

/// What was sent.
#[derive(Debug, Clone, Default)]
pub struct Produced {
    /// Events sent.
    pub sent: u64,
    /// Events the bucket accepted.
    pub accepted: u64,
    /// Events the bucket rejected.
    pub rejected: u64,
    /// Time spent sending.
    pub elapsed: Duration,
}

/// Sends `plan`'s clicks to `bucket`, one batch per [`TICK`], holding the rate over the
/// whole run: each tick sends what is due since the start (at most [`MAX_BATCH`]).
/// Ends at the plan's count or duration, or when `stop` completes.
///
/// # Errors
/// The first failed SEND.
pub async fn produce(
    client: &Client,
    bucket: &str,
    plan: &Plan,
    stop: impl Future<Output = ()>,
) -> Result<Produced, ClientError> {
    let total = plan.count.unwrap_or(u64::MAX);
    let mut clicks = clicks(plan.seed, total, plan.urls, plan.users);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut done = Produced::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(stop);
    let start = Instant::now();
    while done.sent < total {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let elapsed = start.elapsed();
        if plan.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let due = (plan.rate as f64 * elapsed.as_secs_f64()) as u64;
        let n = due
            .min(total)
            .saturating_sub(done.sent)
            .min(MAX_BATCH as u64);
        if n == 0 {
            continue;
        }
        batch.clear();
        batch.extend(clicks.by_ref().take(n as usize).map(|(u, v)| event(&u, &v)));
        let outcome = client.send(bucket, &batch).await?;
        done.sent += batch.len() as u64;
        done.accepted += u64::from(outcome.accepted);
        done.rejected += u64::from(outcome.rejected);
    }
    done.elapsed = start.elapsed();
    Ok(done)
}
