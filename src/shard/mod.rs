//! Shards: per-core reactors that exclusively own users.
//!
//! Each shard is one OS thread running a current-thread tokio runtime. It owns
//! its users' sequence counters, histories and connections (a slab); nothing it
//! owns is touched by another thread. Everyone else talks to a shard only by
//! pushing a [`Command`] into its ring ([`crate::inbox`], which also holds
//! the handle others use). The thread's runtime also serves the API
//! connections the API listener hands it (they reach the shard's state only
//! through rings, its own included). Submodules: `reactor` (the loop that applies
//! commands), `history` (per-user resume
//! buffer), `budget` (the shard's share of `--history-memory`),
//! `idempotency` (per-user publish keys), `persist` (the disk engine's
//! shard side, with `--data-dir`).

pub mod budget;
pub mod history;
pub mod idempotency;
pub mod persist;
pub mod reactor;

pub use crate::inbox::*;
pub use crate::ring::{Permit, Ring, RingFull};
