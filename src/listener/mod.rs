//! The two listeners: `client` (GET /ws, /healthz; hands sockets to shards,
//! over TLS when `tls` is configured) and `api` (publishing, the publisher
//! `stream`, operator endpoints; over TLS with `--api-tls-*`), the raw
//! HTTP `reply` writer both use, and the `watchdog` that bounds how long an
//! API connection may sit idle or half-sent.

pub mod api;
pub mod client;
pub mod reply;
pub mod stream;
pub mod tls;
pub mod watchdog;
