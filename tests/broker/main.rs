//! Integration tests: the real broker on ephemeral loopback ports, driven by
//! independent clients over real sockets.

mod redis_util;
mod util;

mod api;
mod auth;
mod bad_input;
mod chaos;
mod cluster;
mod conformance;
mod core;
mod delivery;
mod durable;
mod hostile;
mod limits;
mod observability;
mod process;
mod robustness;
mod sse;
mod tls;
