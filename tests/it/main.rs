//! Integration tests: start the real daemon and talk to it.

mod cli;
mod client;
mod common;
mod spec_vectors;
mod stock_handlers;
