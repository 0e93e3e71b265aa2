//! Server-wide counters reported by INFO.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;

use crate::config::Config;

/// Counters updated by the listener and connections.
#[derive(Debug)]
pub struct ServerStats {
    started: Instant,
    max_frame: u32,
    max_connections: usize,
    busy_poll: std::time::Duration,
    /// Times the I/O thread started busy polling ([`crate::config::DEFAULT_BUSY_POLL`]).
    pub busy_polls: AtomicU64,
    /// Microseconds of wall time it spent busy polling.
    pub busy_poll_micros: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused at the limit.
    pub connections_refused: AtomicU64,
    /// Requests decoded since start.
    pub requests: AtomicU64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: AtomicU64,
}

impl ServerStats {
    /// Zeroed counters.
    pub fn new(config: &Config) -> Self {
        ServerStats {
            started: Instant::now(),
            max_frame: config.max_frame,
            max_connections: config.max_connections,
            busy_poll: config.busy_poll,
            busy_polls: AtomicU64::new(0),
            busy_poll_micros: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
        }
    }

    /// The counters as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "server": "bucketlyd",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": crate::protocol::PROTOCOL_VERSION,
            "uptime_secs": self.started.elapsed().as_secs(),
            "max_frame": self.max_frame,
            "connections": {
                "current": load(&self.connections),
                "total": load(&self.connections_total),
                "refused": load(&self.connections_refused),
                "max": self.max_connections,
            },
            "busy_poll": {
                "window_us": self.busy_poll.as_micros() as u64,
                "episodes": load(&self.busy_polls),
                "polling_ms": load(&self.busy_poll_micros) / 1000,
            },
            "requests": load(&self.requests),
            "protocol_errors": load(&self.protocol_errors),
        })
    }
}
