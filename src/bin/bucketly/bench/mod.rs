//! `bucketly bench`: a load generator for `bucketlyd`, in the manner of
//! `redis-benchmark`. Setup (create the bucket, drop it after) goes through the client
//! library; the load itself is raw protocol on its own runtime ([`load`]).

mod events;
mod load;
mod report;
mod round;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bucketly::client::ClientError;
use bucketly::Client;
use clap::Args;

use load::{Load, Shared};

/// What to run.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Connections, each its own socket.
    #[arg(short = 'c', long, default_value_t = 50)]
    connections: usize,
    /// SEND frames written together per round trip (1 = unpipelined), like
    /// `redis-benchmark -P`.
    #[arg(short = 'P', long, default_value_t = 1)]
    pipeline: usize,
    /// Events in each SEND frame.
    #[arg(short = 'e', long, default_value_t = 1)]
    events_per_frame: usize,
    /// SEND frames in all (like `redis-benchmark -n`); ignored with --duration.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    requests: u64,
    /// Run for this many seconds instead of a number of frames.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Distinct key indexes the events draw from (the key cardinality).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Take key indexes in order (each once per pass) instead of at random.
    #[arg(long)]
    sequential: bool,
    /// Event template: {} is the key index as 16 hex digits, {n} in decimal.
    /// Default by handler: unique "k {}", latest "{} v", stats "{n}", others "{}".
    #[arg(long)]
    event: Option<String>,
    /// Pad every event with '_' to at least this many bytes.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    event_size: usize,
    /// Handler of the bucket the bench creates.
    #[arg(long, default_value = "counter")]
    handler: String,
    /// Handler config as JSON.
    #[arg(long)]
    config: Option<String>,
    /// Create the bucket durable (sends acknowledged once on disk).
    #[arg(long)]
    durable: bool,
    /// Bucket to send to; created for the run and dropped after it.
    #[arg(long, default_value = "bench")]
    bucket: String,
    /// Send to the bucket if it exists already (it is then not dropped).
    #[arg(long)]
    reuse: bool,
    /// Keep the bucket after the run (to view it, or to measure the server's memory).
    #[arg(long)]
    keep: bool,
    /// Threads driving the connections (redis-benchmark uses 1 by default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Where and as whom to connect.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

/// Runs the bench and prints its report.
pub async fn run(client: &Client, target: Target, args: BenchArgs) -> Result<(), String> {
    if args.connections == 0 || args.pipeline == 0 || args.events_per_frame == 0 {
        return Err("--connections, --pipeline and --events-per-frame must be at least 1".into());
    }
    let template = args
        .event
        .clone()
        .unwrap_or_else(|| events::default_template(&args.handler).to_owned());
    let parts = events::parse_template(&template)?;
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", target.host))?;
    let created = create_bucket(client, &args).await?;

    let shared = Arc::new(Shared {
        budget: AtomicU64::new(if args.duration.is_some() {
            u64::MAX
        } else {
            args.requests
        }),
        stop: AtomicBool::new(false),
        frames_done: AtomicU64::new(0),
    });
    let next_index = args.sequential.then(|| Arc::new(AtomicU64::new(0)));
    let loads: Vec<Load> = (0..args.connections)
        .map(|i| Load {
            addr,
            user: target.user.clone(),
            password: target.password.clone(),
            bucket: args.bucket.clone(),
            pipeline: args.pipeline,
            per_frame: args.events_per_frame,
            events: events::EventGen::new(
                parts.clone(),
                args.keys,
                args.event_size,
                next_index.clone(),
                i as u64,
            ),
        })
        .collect();
    // The load gets a runtime of its own, on its own thread: this one is the CLI's.
    let (done, outcome) = tokio::sync::oneshot::channel();
    let drive_args = args.clone();
    std::thread::spawn(move || {
        let _ = done.send(drive(loads, &drive_args, shared));
    });
    let outcome = outcome
        .await
        .unwrap_or_else(|_| Err("the load thread failed".into()));
    if created && !args.keep {
        client
            .drop_bucket(&args.bucket)
            .await
            .map_err(crate::text)?;
    }
    let (results, elapsed) = outcome?;
    let summary = report::Summary::new(&args_line(&args, &template), results, elapsed)?;
    if args.json {
        summary.print_json();
    } else {
        summary.print_table();
    }
    Ok(())
}

/// Creates the bench bucket; false when it existed and `--reuse` allows that.
async fn create_bucket(client: &Client, args: &BenchArgs) -> Result<bool, String> {
    let config = args
        .config
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
        .transpose()
        .map_err(|e| format!("--config is not valid JSON: {e}"))?;
    let options = serde_json::json!({ "durable": args.durable });
    match client
        .create_with(&args.bucket, &args.handler, config.as_ref(), &options)
        .await
    {
        Ok(()) => Ok(true),
        Err(ClientError::Server { code, .. })
            if args.reuse && code == bucketly::protocol::ErrorCode::BucketExists.as_u16() =>
        {
            Ok(false)
        }
        Err(e) => Err(format!(
            "cannot create bucket {:?}: {} (pass --reuse to send to an existing one)",
            args.bucket,
            crate::text(e)
        )),
    }
}

/// Connects every load, then runs them all at once on a runtime of `--threads`.
fn drive(
    loads: Vec<Load>,
    args: &BenchArgs,
    shared: Arc<Shared>,
) -> Result<(Vec<load::ConnResult>, Duration), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the bench runtime: {e}"))?;
    let total = args.duration.is_none().then_some(args.requests);
    let duration = args.duration.map(Duration::from_secs_f64);
    let progress = !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    runtime.block_on(async move {
        let mut ready = Vec::with_capacity(loads.len());
        for load in loads {
            let (socket, buf) = load::connect(&load).await?;
            ready.push((load, socket, buf));
        }
        let start = Instant::now();
        let tasks: Vec<_> = ready
            .into_iter()
            .map(|(load, socket, buf)| tokio::spawn(load::run(load, socket, buf, shared.clone())))
            .collect();
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        let mut all = futures_join(tasks);
        let results = loop {
            tokio::select! {
                r = &mut all => break r?,
                _ = ticker.tick() => {
                    let elapsed = start.elapsed();
                    if duration.is_some_and(|d| elapsed >= d) {
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    if progress {
                        report::progress(shared.frames_done.load(Ordering::Relaxed), total, duration, elapsed);
                    }
                }
            }
        };
        let elapsed = start.elapsed();
        if progress {
            report::progress_done();
        }
        Ok((results, elapsed))
    })
}

/// Awaits every task; the first error wins.
fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<Result<load::ConnResult, String>>>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<load::ConnResult>, String>> + Send>,
> {
    Box::pin(async move {
        let mut results = Vec::with_capacity(tasks.len());
        for t in tasks {
            results.push(t.await.map_err(|e| format!("a load task failed: {e}"))??);
        }
        Ok(results)
    })
}

/// The run's parameters, for the report.
fn args_line(args: &BenchArgs, template: &str) -> serde_json::Value {
    serde_json::json!({
        "connections": args.connections,
        "pipeline": args.pipeline,
        "events_per_frame": args.events_per_frame,
        "keys": args.keys,
        "sequential": args.sequential,
        "event": template,
        "event_size": args.event_size,
        "handler": args.handler,
        "durable": args.durable,
        "bucket": args.bucket,
        "threads": args.threads,
    })
}
