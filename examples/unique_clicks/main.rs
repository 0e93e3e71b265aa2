//! Unique clicks per URL, buffered in bucketly and flushed to PostgreSQL once a minute.
//! See README.md beside this file for the design and how to run it.
//!
//! ```text
//! cargo run --release --example unique_clicks -- setup --pg 'host=127.0.0.1 user=postgres'
//! cargo run --release --example unique_clicks -- produce --rate 20000 --urls 1000 --users 100000
//! cargo run --release --example unique_clicks -- flush --pg 'host=127.0.0.1 user=postgres'
//! ```

mod flusher;
mod producer;

use std::time::Duration;

use bucketly::protocol::ErrorCode;
use bucketly::Client;
use clap::{Parser, Subcommand};

use flusher::{Backoff, Connections, FlushError, Hook, Report, Step};

type Error = Box<dyn std::error::Error>;

#[derive(Parser)]
#[command(
    about = "Unique clicks per URL: bucketly buffers, PostgreSQL stores one row per URL per window"
)]
struct Cli {
    /// bucketlyd's address.
    #[arg(long, env = "BUCKETLY_ADDR", default_value_t = format!("127.0.0.1:{}", bucketly::config::DEFAULT_PORT))]
    addr: String,
    /// bucketly user.
    #[arg(long, env = "BUCKETLY_USER", default_value = "admin")]
    user: String,
    /// bucketly password.
    #[arg(
        long,
        env = "BUCKETLY_PASSWORD",
        default_value = "admin",
        hide_env_values = true
    )]
    password: String,
    /// The bucket that aggregates the clicks.
    #[arg(long, default_value = "clicks")]
    bucket: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the bucket (`unique` handler) and the PostgreSQL tables; both may exist.
    Setup {
        /// PostgreSQL connection string, e.g. 'host=127.0.0.1 port=5432 user=postgres'.
        #[arg(long)]
        pg: String,
        /// Make the bucket durable: its events and pending take survive a daemon crash.
        #[arg(long)]
        durable: bool,
    },
    /// Send simulated clicks ("URL USER" events) at a steady rate, until Ctrl-C,
    /// --count or --duration.
    Produce(producer::Plan),
    /// Every interval, move the bucket's aggregate into PostgreSQL (TAKE, one
    /// transaction, RELEASE), until Ctrl-C or --windows.
    Flush {
        /// PostgreSQL connection string.
        #[arg(long)]
        pg: String,
        /// Interval between flushes (e.g. 60s, 10s, 1m); the first is at start.
        #[arg(long, default_value = "60s", value_parser = producer::parse_duration)]
        every: Duration,
        /// Stop after this many flushes.
        #[arg(long)]
        windows: Option<u64>,
        /// Longest wait between retries of a failed flush.
        #[arg(long, default_value = "10s", value_parser = producer::parse_duration)]
        max_backoff: Duration,
        /// Print each step of each flush.
        #[arg(long)]
        verbose: bool,
        /// Exit right after the first COMMIT, before its RELEASE, as a crash would (the
        /// next run writes the same take again, with the same result).
        #[arg(long)]
        crash_after_commit: bool,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("unique_clicks: {}", flusher::with_causes(&*e));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Setup { ref pg, durable } => setup(&cli, pg, durable).await,
        Command::Produce(ref plan) => produce(&cli, plan).await,
        Command::Flush {
            ref pg,
            every,
            windows,
            max_backoff,
            verbose,
            crash_after_commit,
        } => {
            let backoff = Backoff {
                max: max_backoff,
                ..Backoff::default()
            };
            let hook = LogHook {
                verbose,
                crash_after_commit,
            };
            flush(&cli, pg, every, windows, backoff, hook).await
        }
    }
}

async fn connect(cli: &Cli) -> Result<Client, Error> {
    let client = Client::connect(cli.addr.as_str())
        .await
        .map_err(|e| format!("cannot reach bucketlyd at {}: {e}", cli.addr))?;
    client.login(&cli.user, &cli.password).await?;
    Ok(client)
}

async fn setup(cli: &Cli, pg: &str, durable: bool) -> Result<(), Error> {
    let client = connect(cli).await?;
    let options = serde_json::json!({ "durable": durable });
    match client
        .create_with(&cli.bucket, "unique", None, &options)
        .await
    {
        Ok(()) => println!(
            "created bucket {:?} (unique, durable: {durable})",
            cli.bucket
        ),
        Err(e) if e.code() == Some(ErrorCode::BucketExists) => {
            let list = client.list().await?;
            let handler = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["name"] == cli.bucket.as_str())
                .and_then(|b| b["handler"].as_str())
                .unwrap_or("?");
            println!("bucket {:?} exists (handler {handler})", cli.bucket);
            if handler != "unique" {
                eprintln!("warning: the flusher expects the unique handler's output");
            }
        }
        Err(e) => return Err(e.into()),
    }
    let pg = flusher::connect_pg(pg).await?;
    flusher::create_schema(&pg).await?;
    println!("tables url_clicks and bucketly_windows are ready");
    Ok(())
}

async fn produce(cli: &Cli, plan: &producer::Plan) -> Result<(), Error> {
    let client = connect(cli).await?;
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let done = producer::produce(&client, &cli.bucket, plan, stop).await?;
    let secs = done.elapsed.as_secs_f64().max(1e-9);
    println!(
        "sent {} clicks in {secs:.1} s ({:.0}/s; target {}/s): {} accepted, {} rejected",
        done.sent,
        done.sent as f64 / secs,
        plan.rate,
        done.accepted,
        done.rejected
    );
    Ok(())
}

async fn flush(
    cli: &Cli,
    pg: &str,
    every: Duration,
    windows: Option<u64>,
    backoff: Backoff,
    mut hook: LogHook,
) -> Result<(), Error> {
    let mut conns = Connections::new(&cli.addr, &cli.user, &cli.password, pg);
    let mut summary = Summary::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let result = loop {
        if windows.is_some_and(|n| summary.windows >= n) {
            break Ok(());
        }
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = tick.tick() => {}
        }
        // Ctrl-C mid-flush is safe: whatever was not released is handed out again.
        let report = tokio::select! {
            _ = &mut stop => break Ok(()),
            r = flusher::flush(&mut conns, &cli.bucket, backoff, &mut hook) => r,
        };
        match report {
            Ok(report) => {
                if report.attempts > 1 {
                    // After an outage the schedule restarts, so the next window is a
                    // full interval rather than whatever was left of it.
                    tick.reset();
                }
                println!("{}", line(&report));
                summary.add(&report);
            }
            Err(e) => break Err(e),
        }
    };
    println!("{}", summary.text());
    Ok(result?)
}

/// Logs failures (and, verbose, every step); can exit after a COMMIT, as a crash would.
struct LogHook {
    verbose: bool,
    crash_after_commit: bool,
}

impl Hook for LogHook {
    async fn at(&mut self, step: Step<'_>) -> Result<(), FlushError> {
        match step {
            Step::Taken(take) if self.verbose => eprintln!(
                "take {}: {} events, window {}–{}",
                take.id,
                take.events,
                clock(take.since_ms),
                clock(take.taken_ms)
            ),
            Step::Committed(take) if self.crash_after_commit => {
                return Err(FlushError::Stopped(format!(
                    "--crash-after-commit: take {} is committed and not released",
                    take.id
                )))
            }
            Step::Committed(take) if self.verbose => {
                eprintln!("take {}: committed, releasing", take.id)
            }
            Step::Failed {
                error,
                attempt,
                retry_in,
            } => eprintln!(
                "flush attempt {attempt} failed: {error}; the take stays pending, \
                 trying again in {retry_in:?}"
            ),
            _ => {}
        }
        Ok(())
    }
}

/// One line per flushed window.
fn line(r: &Report) -> String {
    let retried = match r.attempts {
        1 => String::new(),
        n => format!(" after {n} attempts"),
    };
    format!(
        "window {}–{} UTC ({:.1} s), take {}: {} events absorbed, {} rows written in {:.1} ms{retried}",
        clock(r.since_ms),
        clock(r.taken_ms),
        r.taken_ms.saturating_sub(r.since_ms) as f64 / 1000.0,
        r.take_id,
        r.events,
        r.rows,
        r.duration.as_secs_f64() * 1000.0,
    )
}

/// `HH:MM:SS.mmm` of a Unix time in ms (UTC).
fn clock(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    let (h, m, s) = (day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", day_ms % 1000)
}

#[derive(Default)]
struct Summary {
    windows: u64,
    events: u64,
    rows: u64,
    window_ms: u64,
}

impl Summary {
    fn add(&mut self, r: &Report) {
        self.windows += 1;
        self.events += r.events;
        self.rows += r.rows;
        self.window_ms += r.taken_ms.saturating_sub(r.since_ms);
    }

    fn text(&self) -> String {
        let secs = (self.window_ms as f64 / 1000.0).max(1e-9);
        let reduction = match self.rows {
            0 => "n/a".to_owned(),
            rows => format!("{:.1}x", self.events as f64 / rows as f64),
        };
        format!(
            "summary: {} windows over {secs:.1} s: {} clicks absorbed ({:.0}/s), \
             {} url_clicks rows written ({:.1}/s); reduction {reduction}",
            self.windows,
            self.events,
            self.events as f64 / secs,
            self.rows,
            self.rows as f64 / secs,
        )
    }
}
