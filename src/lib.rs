//! bucketly: an event-aggregation daemon.
//!
//! Applications send events (opaque bytes) over long-lived TCP connections to named
//! buckets. Each bucket is an actor that keeps an aggregate through a Lua handler.
//!
//! The modules follow the path of a request:
//!
//! ```text
//! server::listener ─accept─▶ server::connection ─frame─▶ protocol ─Request─▶ engine
//!                                   ▲                                          │
//!                                   └──────── Response (in request order) ◀────┘
//! ```
//!
//! - [`protocol`]: the "bucketly v1" wire format, pure functions over bytes.
//! - [`server`]: listener, connection limits, per-connection pipelining.
//! - [`engine`]: bucket registry, bucket actors and the handler threads that run them.
//! - [`script`]: the Lua sandbox and the handler API.
//! - [`store`]: the redb database file.
//! - [`client`]: the async Rust client used by the CLI and the tests.

pub mod auth;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod protocol;
pub mod script;
pub mod server;
pub mod store;
pub mod tls;

pub use client::{Client, Take};
pub use config::Config;
