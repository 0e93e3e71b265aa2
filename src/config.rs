//! Daemon configuration and every default, as named constants in one place.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Default TCP port of `bucketlyd`.
pub const DEFAULT_PORT: u16 = 8484;
/// Default listen address: loopback only, so a first start exposes nothing.
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Default database file, relative to the working directory.
pub const DEFAULT_DATABASE: &str = "bucketly.redb";
/// Default directory searched for extra handler files.
pub const DEFAULT_HANDLERS_DIR: &str = "handlers";
/// Largest frame body accepted (4 MiB). A larger length prefix is answered with
/// `FRAME_TOO_LARGE` and the connection is closed before any body byte is buffered.
pub const DEFAULT_MAX_FRAME: u32 = 4 * 1024 * 1024;
/// Smallest `--max-frame` accepted: must hold a handshake and small requests.
pub const MIN_MAX_FRAME: u32 = 1024;
/// Largest `--max-frame` accepted (64 MiB).
pub const MAX_MAX_FRAME: u32 = 64 * 1024 * 1024;
/// Connections served at once; one more gets `TOO_MANY_CONNECTIONS` and is closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Requests a connection may have in flight (read but not yet answered). At the limit
/// the server stops reading from that socket until a reply is written (back-pressure).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
/// Request bytes a connection may have in flight; same overflow behaviour as above.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;
/// Messages a bucket's mailbox holds; a full mailbox makes its senders wait.
pub const DEFAULT_MAILBOX: usize = 256;
/// Buckets that may exist at once; CREATE beyond it gets `LIMIT_EXCEEDED`.
pub const DEFAULT_MAX_BUCKETS: usize = 10_000;
/// Memory limit of one bucket's Lua state.
pub const DEFAULT_LUA_MEMORY: usize = 64 * 1024 * 1024;
/// Time budget of one handler call (one event's `send`, a `view`, a `dump`, `init`).
pub const DEFAULT_LUA_TIME: std::time::Duration = std::time::Duration::from_millis(100);
/// Size of each of the durable log's two write-ahead segments ([`crate::store::wal`]),
/// zero-filled once and reused in turn. When a segment is reused, the records in it
/// that no snapshot covers move into the database file.
pub const DEFAULT_WAL_SEGMENT: u64 = crate::store::wal::SEGMENT_BYTES;
/// What `--writer-nice` adds to the durable log writer thread's nice value (see
/// [`crate::store::priority`]). A negative value, a higher priority, is granted with
/// `CAP_SYS_NICE`, or as far as `RLIMIT_NICE` allows; else the writer keeps the
/// daemon's priority. Measured on 2 busy cores: about 10% more durable unpipelined
/// SENDs at -10; -19 was slower than 0, as the writer then preempts the threads that
/// send its answers.
pub const DEFAULT_WRITER_NICE: i32 = -10;
/// Smallest `--wal-segment-kib` (64 KiB).
pub const MIN_WAL_SEGMENT: u64 = 64 * 1024;
/// Largest `--wal-segment-kib` (256 MiB): a segment is read into memory whole when its
/// records move into the database file.
pub const MAX_WAL_SEGMENT: u64 = 256 * 1024 * 1024;
/// How long the I/O thread keeps polling for input after the last read before it
/// blocks (see [`crate::server`]'s `spin` module). It keeps one core busy while
/// requests arrive less than this far apart, and saves waking a sleeping core for
/// each: on the 2-core reference VM, one unpipelined connection went from about 5,000
/// to about 30,000 round trips per second. Zero turns it off.
pub const DEFAULT_BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(50);
/// Largest `--busy-poll-us` (10 ms).
pub const MAX_BUSY_POLL_US: u64 = 10_000;
/// Time a new connection has to complete the handshake.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Time graceful shutdown waits for connections to drain before closing them.
pub const SHUTDOWN_GRACE_SECS: u64 = 10;

/// Everything `bucketlyd` needs to run. Build one with [`Config::default`] and adjust.
#[derive(Debug, Clone)]
pub struct Config {
    /// Path of the redb database file.
    pub database: PathBuf,
    /// Directory with extra handler files (`NAME.lua`).
    pub handlers_dir: PathBuf,
    /// Whether a missing `handlers_dir` is an error (it was named explicitly).
    pub handlers_dir_required: bool,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// See [`DEFAULT_MAX_FRAME`].
    pub max_frame: u32,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// See [`DEFAULT_MAX_IN_FLIGHT_BYTES`].
    pub max_in_flight_bytes: usize,
    /// See [`DEFAULT_MAILBOX`].
    pub mailbox: usize,
    /// See [`DEFAULT_MAX_BUCKETS`].
    pub max_buckets: usize,
    /// See [`DEFAULT_LUA_MEMORY`].
    pub lua_memory: usize,
    /// See [`DEFAULT_LUA_TIME`].
    pub lua_time: std::time::Duration,
    /// Handler threads; 0 means one per available core.
    pub workers: usize,
    /// Threads of the async runtime that serves the connections; 0 means half the
    /// available cores, at least one. Read by `bucketlyd`, which builds the runtime.
    pub io_threads: usize,
    /// See [`DEFAULT_BUSY_POLL`].
    pub busy_poll: std::time::Duration,
    /// See [`DEFAULT_WAL_SEGMENT`].
    pub wal_segment: u64,
    /// See [`DEFAULT_WRITER_NICE`]; 0 leaves the writer's priority alone.
    pub writer_nice: i32,
    /// Serve TLS with this certificate chain and key (PEM files) instead of plain TCP.
    pub tls: Option<TlsFiles>,
    /// Whether buckets may have exec sinks (commands run at each flush).
    pub allow_exec: bool,
    /// Where exec sinks write their run directories; `None`: see [`Config::exec_dir`].
    pub exec_dir: Option<PathBuf>,
}

/// A server certificate chain and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: PathBuf::from(DEFAULT_DATABASE),
            handlers_dir: PathBuf::from(DEFAULT_HANDLERS_DIR),
            handlers_dir_required: false,
            listen: SocketAddr::new(DEFAULT_HOST, DEFAULT_PORT),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            mailbox: DEFAULT_MAILBOX,
            max_buckets: DEFAULT_MAX_BUCKETS,
            lua_memory: DEFAULT_LUA_MEMORY,
            lua_time: DEFAULT_LUA_TIME,
            workers: 0,
            io_threads: 0,
            busy_poll: DEFAULT_BUSY_POLL,
            wal_segment: DEFAULT_WAL_SEGMENT,
            writer_nice: DEFAULT_WRITER_NICE,
            tls: None,
            allow_exec: false,
            exec_dir: None,
        }
    }
}

impl Config {
    /// The directory of exec sink runs: the one configured, or `NAME.exec` beside the
    /// database file `NAME.redb`.
    pub fn exec_dir(&self) -> PathBuf {
        if let Some(dir) = &self.exec_dir {
            return dir.clone();
        }
        let mut dir = self.database.clone();
        dir.set_extension("exec");
        dir
    }

    /// The number of connection (async runtime) threads to start. Half the cores by
    /// default: the handler threads, the durable log's writer and, often, the clients on
    /// the same machine need the rest. On 2 cores one runtime thread served every
    /// benchmark shape as fast or faster than two (benches/README.md).
    pub fn io_threads(&self) -> usize {
        if self.io_threads > 0 {
            return self.io_threads;
        }
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
    }

    /// The number of handler threads to start.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}
