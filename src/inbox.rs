//! What the rest of the broker may say to a shard, and how: the commands a
//! shard takes ([`Command`]), what comes back ([`Delivery`], [`UserInfo`],
//! ...), and the [`ShardHandle`] everyone pushes them through (the shard's
//! lock-free ring, its counters, its published latency copy). It sits below
//! the shared context and the shard itself, so both can name it.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::connection::HandedSocket;
use crate::metrics::{Latency, ShardMetrics};
use crate::protocol::{PreparedEvent, UserId};
use crate::ring::{Permit, Ring, RingFull};

pub use crate::acks::{Ack, BatchAcks, Delivery};

/// One event for one user.
pub struct PublishCmd {
    pub user: UserId,
    pub event: PreparedEvent,
    /// When the publish was accepted (latency starts here).
    pub accepted: Instant,
    /// Publish time, unix ms (the frame's `ts`).
    pub ts_ms: u64,
    /// Idempotency key.
    pub id: Option<Arc<str>>,
    /// Where the result goes (its slot in the request's ack block).
    pub reply: Option<Ack>,
    /// Its slot in the request's ack block when the [`Batch`] carrying it
    /// answers for it (`reply` is then `None`).
    pub slot: u32,
}

/// Several events from one request for one shard, in order (see
/// [`Command::PublishBatch`]).
pub struct Batch {
    pub events: Vec<PublishCmd>,
    /// With a result per event: the answers owed, one per event, each to
    /// its event's `slot`.
    pub acks: Option<BatchAcks>,
}

/// A resume request from `?since=&epoch=`.
#[derive(Debug, Clone)]
pub struct Resume {
    pub since: u64,
    pub epoch: Option<String>,
}

/// Who is on the other end of an attached socket.
#[derive(Debug, Clone)]
pub enum Peer {
    /// An authenticated user, maybe resuming; `sse` for a `GET /sse` stream.
    User { user: UserId, resume: Option<Resume>, sse: bool },
    /// An `--echo-path` connection (conformance aid): no user, no events.
    Echo,
}

/// A validated (and for users, authenticated) upgrade handed over to a shard.
pub struct AttachCmd {
    pub peer: Peer,
    pub socket: HandedSocket,
    /// The `101 Switching Protocols` (or SSE `200`) response, written first.
    pub response: Bytes,
    /// Bytes the listener read past the request head (already client frames).
    pub leftover: Bytes,
}

/// Broadcast results from one shard.
#[derive(Debug, Clone, Copy, Default)]
pub struct BroadcastOutcome {
    pub users: u64,
    pub delivered: u64,
}

/// A user as seen by `GET /v1/users/{id}`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserInfo {
    pub user: String,
    pub connections: usize,
    pub seq: u64,
    pub history: usize,
    pub history_bytes: usize,
    pub epoch: String,
    /// Event frames queued on each of the user's connections.
    pub queued: Vec<usize>,
}

/// A shard's figures for `/v1/stats` and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub connections: usize,
    pub users: usize,
    pub queued: usize,
    pub max_queue_depth: usize,
    pub history_events: usize,
    pub history_bytes: usize,
}

/// Everything a shard can be asked to do.
pub enum Command {
    /// Stop: everything pushed before this has been applied; drain the
    /// connections (flush, close 1001) until `deadline`.
    Shutdown {
        deadline: Instant,
    },
    Publish(PublishCmd),
    /// Several events from one request, in order, pushed as one command (one
    /// ring push and pop instead of one per event). It holds a ring slot per
    /// event, so the ring still bounds events; the shard gives the extra
    /// ones back when it takes it, and may apply it over several passes.
    PublishBatch(Batch),
    /// Answer this once everything pushed before it (by the same producer)
    /// has been applied: a fire-and-forget publisher's flow control.
    Fence(Ack),
    Broadcast {
        event: PreparedEvent,
        accepted: Instant,
        ts_ms: u64,
        reply: oneshot::Sender<BroadcastOutcome>,
    },
    Attach(Box<AttachCmd>),
    UserInfo {
        user: UserId,
        reply: oneshot::Sender<Option<UserInfo>>,
    },
    DropUser {
        user: UserId,
        reply: oneshot::Sender<usize>,
    },
    Snapshot {
        reply: oneshot::Sender<ShardSnapshot>,
    },
    Latency {
        reset: bool,
        reply: oneshot::Sender<Box<Latency>>,
    },
    /// Cluster mode: a message from Redis Pub/Sub for this shard.
    Live(crate::cluster::live::Live),
}

/// The shared face of a shard: its inbox and its counters.
pub struct ShardHandle {
    pub id: usize,
    pub ring: Ring<Command>,
    pub metrics: ShardMetrics,
    /// The shard's latency histograms as of its last heartbeat, for
    /// `/metrics` (read without asking the shard).
    pub latency: ArcSwap<Latency>,
    /// The shard thread's runtime, set once when the shard starts: the API
    /// listener spawns each accepted connection onto a shard with it, so
    /// publishers are served on the shard threads.
    runtime: OnceLock<tokio::runtime::Handle>,
}

impl ShardHandle {
    pub fn new(id: usize, ring_capacity: usize) -> Self {
        ShardHandle {
            id,
            ring: Ring::new(ring_capacity),
            metrics: ShardMetrics::default(),
            latency: ArcSwap::from_pointee(Latency::default()),
            runtime: OnceLock::new(),
        }
    }

    /// Called by the shard thread once its runtime is built.
    pub fn set_runtime(&self, rt: tokio::runtime::Handle) {
        let _ = self.runtime.set(rt);
    }

    /// The shard thread's runtime, once it has started.
    pub fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.get()
    }

    /// Reserves room for `n` commands, counting a refusal in `ring_full`.
    pub fn reserve(&self, n: usize) -> Result<Permit<'_, Command>, RingFull> {
        self.ring.reserve(n).inspect_err(|_| crate::metrics::bump(&self.metrics.ring_full, 1))
    }

    /// Pushes one command, counting a refusal in `ring_full`. A refused
    /// command comes back by value for the caller to answer: the large
    /// `Err` is built only on that rare path, and ring slots hold commands
    /// by value anyway.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, cmd: Command) -> Result<(), (RingFull, Command)> {
        self.ring.push(cmd).inspect_err(|_| crate::metrics::bump(&self.metrics.ring_full, 1))
    }
}
