//! Integration tests: start the real daemon and talk to it.

mod stock_handlers;
