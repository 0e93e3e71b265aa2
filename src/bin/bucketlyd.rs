//! `bucketlyd`: the daemon. Parses the command line, sets up logging and runs
//! [`bucketly::server::Server`] until SIGINT or SIGTERM; SIGHUP reloads handler files.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use bucketly::config::{self, Config};
use clap::Parser;

/// bucketly event-aggregation daemon.
#[derive(Parser, Debug)]
#[command(name = "bucketlyd", version, about, long_about = None)]
struct Args {
    /// Database file (redb); created if missing.
    #[arg(default_value = config::DEFAULT_DATABASE)]
    database: PathBuf,
    /// Directory of extra handler files (NAME.lua); stock handlers are built in.
    #[arg(long, alias = "bucket_handlers", value_name = "DIR")]
    handlers: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, alias = "hostname", default_value_t = config::DEFAULT_HOST)]
    host: IpAddr,
    /// TCP port (0 picks a free one).
    #[arg(long, default_value_t = config::DEFAULT_PORT)]
    port: u16,
    /// Largest frame body accepted, in bytes.
    #[arg(long, default_value_t = config::DEFAULT_MAX_FRAME,
          value_parser = clap::value_parser!(u32).range(config::MIN_MAX_FRAME as i64..=config::MAX_MAX_FRAME as i64))]
    max_frame: u32,
    /// Connections served at once; more are refused with TOO_MANY_CONNECTIONS.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Buckets that may exist at once.
    #[arg(long, default_value_t = config::DEFAULT_MAX_BUCKETS)]
    max_buckets: usize,
    /// Handler threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Threads serving the connections (0: half the cores, at least 1).
    #[arg(long, default_value_t = 0)]
    io_threads: usize,
    /// Keep polling for input this many microseconds after the last read instead of sleeping (0: off); costs a busy core while requests keep coming.
    #[arg(long, value_name = "US", default_value_t = config::DEFAULT_BUSY_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=config::MAX_BUSY_POLL_US))]
    busy_poll_us: u64,
    /// Size of the durable log's write-ahead segment, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = config::DEFAULT_WAL_SEGMENT >> 10,
          value_parser = clap::value_parser!(u64).range((config::MIN_WAL_SEGMENT >> 10)..=(config::MAX_WAL_SEGMENT >> 10)))]
    wal_segment_kib: u64,
    /// Add N to the durable log writer thread's nice value (negative: higher priority, granted with CAP_SYS_NICE or as far as RLIMIT_NICE allows; 0: leave it).
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_WRITER_NICE, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    writer_nice: i32,
    /// Time budget of one handler call, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = config::DEFAULT_LUA_TIME.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    handler_time_ms: u64,
    /// Memory limit of one bucket's handler state, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = (config::DEFAULT_LUA_MEMORY >> 20) as u64,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    handler_memory_mib: u64,
    /// Allow exec sinks: buckets (created by an admin) may run commands at each flush.
    #[arg(long)]
    allow_exec: bool,
    /// Where exec sinks write their run directories [default: NAME.exec beside the database NAME.redb].
    #[arg(long, value_name = "DIR")]
    exec_dir: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM); needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// glibc's allocator, tuned for a long-running server: at most 2 arenas (a thread
/// arena per core keeps memory that other threads freed), and every allocation of
/// 1 MiB or more served by mmap, so that it returns to the system when freed (each
/// password check allocates argon2's 19 MiB; large states grow and are dropped), while
/// up to 16 MiB free at the top of a heap is kept for reuse. Without the fixed
/// threshold glibc raises it after the first such free and keeps those blocks.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        // Fixing the mmap threshold also fixes the trim threshold at 128 KiB, which
        // hands the top of the heap back and faults it in again on every burst.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config {
        database: args.database,
        listen: SocketAddr::new(args.host, args.port),
        max_frame: args.max_frame,
        max_connections: args.max_connections,
        max_buckets: args.max_buckets,
        workers: args.workers,
        io_threads: args.io_threads,
        busy_poll: std::time::Duration::from_micros(args.busy_poll_us),
        wal_segment: args.wal_segment_kib << 10,
        writer_nice: args.writer_nice,
        lua_time: std::time::Duration::from_millis(args.handler_time_ms),
        lua_memory: (args.handler_memory_mib as usize) << 20,
        allow_exec: args.allow_exec,
        exec_dir: args.exec_dir,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(config::TlsFiles { cert, key }),
            _ => None,
        },
        ..Config::default()
    };
    if let Some(dir) = args.handlers {
        config.handlers_dir = dir;
        config.handlers_dir_required = true;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bucketlyd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let server = match bucketly::server::Server::bind(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("bucketlyd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match server.local_addr() {
        // One line on stdout that scripts and tests can wait for.
        Ok(addr) => println!(
            "bucketlyd {} listening on {addr}",
            env!("CARGO_PKG_VERSION")
        ),
        Err(e) => {
            eprintln!("bucketlyd: {e}");
            return ExitCode::FAILURE;
        }
    }
    reload_on_sighup(server.engine().clone());
    server.run(shutdown_signal()).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGHUP reads the handler files again (for buckets created afterwards).
fn reload_on_sighup(engine: std::sync::Arc<bucketly::engine::Engine>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; use `bucketly handler reload`");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = engine.reload() {
                    tracing::warn!("SIGHUP: {e}");
                }
            }
        });
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("signal received");
}
