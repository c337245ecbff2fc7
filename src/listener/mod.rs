//! The two listeners: `client` (GET /ws, /healthz; hands sockets to shards,
//! over TLS when `tls` is configured) and `api` (publishing, the publisher
//! `stream`, operator endpoints; over TLS with `--api-tls-*`), the raw
//! HTTP `reply` writer both use, `readcap` (bounded reads for publisher
//! streams), and the `watchdog` that bounds how long an
//! API connection may sit idle or half-sent. Both accept on the I/O
//! runtime; the API listener hands each connection to a shard thread's
//! runtime (round-robin), where it is served.

pub mod api;
pub mod client;
pub(crate) mod readcap;
pub mod reply;
pub mod stream;
pub mod tls;
pub mod watchdog;
