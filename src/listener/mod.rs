//! The two listeners: `client` (GET /ws, /healthz; hands sockets to shards,
//! over TLS when `tls` is configured) and `api` (publishing, the publisher
//! `stream`, operator endpoints).

pub mod api;
pub mod client;
pub mod stream;
pub mod tls;
