//! Integration tests: start the real daemon and talk to it.

mod auth;
mod cli;
mod client;
mod common;
mod durable;
mod lane;
mod native;
mod raw_protocol;
mod sandbox;
mod schedule;
mod spec_vectors;
mod stock_handlers;
mod take;
mod tls;
mod unique_clicks;
