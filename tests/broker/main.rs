//! Integration tests: the real broker on ephemeral loopback ports, driven by
//! independent clients over real sockets.

mod util;

mod core;
