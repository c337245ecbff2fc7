//! switchyard: a lock-free, sharded WebSocket event broker.
//!
//! **Architecture.** Sharded per-core reactors own connection slabs and take
//! events from lock-free MPSC rings, while an arc-swapped routing table maps
//! user IDs to shards, so the hot path never takes a lock. Each shard
//! ([`shard`]) is an OS thread with a current-thread tokio runtime that
//! exclusively owns its users: their seq counters, histories and connections.
//! The listeners ([`listener`]) run on a separate I/O runtime; they parse and
//! validate, look up the owning shard in the [`routing`] table, and push a
//! command into that shard's ring. Client sockets are authenticated by the
//! client listener and handed over to the owning shard, which finishes the
//! upgrade.
//!
//! **Data path.** publisher (HTTP or `/v1/stream`) → parse + validate
//! (simd-json, [`protocol`]) → routing `load()` → reserve + push into the
//! shard's ring ([`publish`]) → the shard assigns `seq`, encodes the frame once
//! (WebSocket header included), appends it to the user's history and queues
//! the same buffer on each of the user's connections ([`connection`]) → each
//! connection's writer flushes everything queued with one vectored write →
//! the shard's HdrHistogram records publish→write latency ([`metrics`]).

pub mod auth;
pub mod batch;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connection;
pub mod engine;
pub mod fdlimit;
pub mod histdump;
pub mod listener;
pub mod metrics;
pub mod observe;
pub mod protocol;
pub mod publish;
pub mod redact;
pub mod routing;
pub mod shard;
pub mod signals;
pub mod sse;
pub mod wsframe;

pub use broker::{start, Running, Shared, StartError};
pub use config::{Config, Flags};
