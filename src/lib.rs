//! switchyard: a lock-free, sharded WebSocket event broker.
//!
//! **Architecture.** Sharded per-core reactors own connection slabs and take
//! events from lock-free MPSC rings, while an arc-swapped routing table maps
//! user IDs to shards, so the hot path never takes a lock. Each shard
//! ([`shard`]) is an OS thread with a current-thread tokio runtime that
//! exclusively owns its users: their seq counters, histories and connections.
//! The listeners ([`listener`]) accept on a separate I/O runtime. An API
//! connection (HTTP keep-alive or a `/v1/stream` publisher) is then handed to
//! a shard thread (round-robin) and served there: its publishes are parsed
//! and validated on that thread, looked up in the [`routing`] table, and
//! pushed into the owning shard's ring — its own (no thread crossed; with
//! `--shards 1` no event ever crosses a thread) or another's. Client sockets
//! are authenticated by the client listener and handed over to the owning
//! shard, which finishes the upgrade.
//!
//! **Data path.** publisher (HTTP or `/v1/stream`, on a shard thread) →
//! parse + validate in one pass ([`jsonscan`], [`protocol`]) → routing
//! `load()` → reserve + push into the owning shard's ring ([`publish`]; a
//! stream message's events for one shard go as one batch command holding a
//! ring slot per event) → the shard (a pass takes up to 4,096 events,
//! ending early once a connection's queue is half full, even inside a
//! batch, whose rest opens the next pass) assigns `seq`, encodes the frame once
//! (WebSocket header included), appends it to the user's history and queues
//! the same buffer on each of the user's connections ([`connection`]) → each
//! connection's writer flushes everything queued with one write (small
//! frames gathered into a thread-local buffer first; TLS: one vectored write) →
//! the shard's HdrHistogram records publish→write latency ([`metrics`]).
//! With `--data-dir` the shard also logs each event ([`engine`]) and, with
//! `--fsync always`, answers and fans out only once its batch is synced.
//! With `--cluster` ([`cluster`]) the publish path runs one Lua script per
//! event in Redis (seq, history, idempotency, `PUBLISH`, atomically) and
//! shards deliver only what arrives on Pub/Sub, in seq order, filling gaps
//! from the user's Redis stream.
//!
//! **Module map**, top floor first; a module imports only modules on lower
//! floors (no import circles, no arrow back up):
//!
//! ```text
//! main.rs (binary)  flags → start → signals → drain, or a subcommand
//! cli, signals      switchyard token / check-config; SIGTERM, SIGUSR1
//! broker            assembly: data dir, cluster engine, listeners, shards,
//!                   shutdown order
//! histdump          .hgrm / .hlog files
//! listener/         client (handshake, TLS, hand-over), api (+ stream,
//!                   readcap, watchdog, reply, tls)
//! publish, observe  publish objects → shard commands (or, --cluster, Redis);
//!                   stats, /metrics, dashboard
//! shard/            reactor (owned state; reactor/remote: cluster delivery),
//!                   persist, history, budget, idempotency
//! shared            what every thread reads (config, router, shard handles)
//! inbox             commands a shard takes and its handle
//! cluster/          --cluster: Redis link, Lua scripts, keys, Pub/Sub subscriber
//! connection/       one client socket: queue, writer, readers, transport
//! engine/           --data-dir: locked directory, segment log, records
//! routing, metrics, auth, batch, publish_model (the serde_json model the
//!                   fast publish parser is fuzzed against)
//! protocol, sse     wire vocabulary and framing (encode once)
//! jsonscan, acks,   one-pass JSON validation (no tree); one result block per
//! ring, config,     publish request; the lock-free ring; flags
//! redact, wsframe, fdlimit, hugepages
//! ```
//!
//! **No lock on the per-event path.** The rings are crossbeam's `ArrayQueue`
//! behind an atomic admission counter and an `AtomicWaker`; routing is an
//! `ArcSwap::load`; everything a shard owns is `Rc`/`RefCell` on its own
//! thread; counters are relaxed atomics; shutdown is a ring command (the
//! shard polls no shared token, whose `CancellationToken` holds a mutex).
//! The API tasks on a shard register with the shutdown token once per
//! connection, not per request or reply. Locks remain off the per-event
//! path only, and how we know (read in the sources under
//! `~/.cargo/registry`): tokio's current-thread scheduler takes its
//! injection-queue mutex when a task is woken from *another* thread — a
//! publish message wakes another shard's reactor at most once (one ring
//! reservation per target shard per message, and only if that reactor is
//! parked), and with `--shards 1` it never happens; hyper's connection
//! internals (per request at most); a TLS publisher stream's halves share the session through
//! tokio's `split` (a mutex per read or write, uncontended — a plain stream
//! splits into tokio's lock-free owned halves); and the disk engine's syncer
//! channel (flume), once per reactor pass. Publish results
//! travel through one [`acks`] block per request (atomics and an
//! `AtomicWaker`), not a channel per event (a batch command answers all
//! its events with one counter update); a stream without acks waits on
//! one fence command per shard instead of an ack per event. In cluster mode the path goes
//! through the Redis client (redis-rs: its multiplexed connection queues
//! requests on a tokio mpsc channel, and the Pub/Sub subscriber's requests
//! likewise), which is network I/O, not the per-core data path.

pub mod acks;
pub mod auth;
pub mod batch;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod engine;
pub mod fdlimit;
pub mod histdump;
pub mod hugepages;
pub mod inbox;
pub mod jsonscan;
pub mod listener;
pub mod metrics;
pub mod observe;
pub mod protocol;
pub mod publish;
pub mod publish_model;
pub mod redact;
pub mod ring;
pub mod routing;
pub mod shard;
pub mod shared;
pub mod signals;
pub mod sse;
pub mod wsframe;

pub use broker::{start, Running, Shared, StartError};
pub use config::{Config, Flags};
