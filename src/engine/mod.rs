//! History engines: where a shard's per-user state (seq, epoch, history,
//! idempotency keys) lives beyond its own memory (see `../shared/DESIGN.md`,
//! "History engines"). Today this holds the building blocks of the disk
//! engine (`--data-dir`): the locked data directory with its clean-shutdown
//! marker ([`datadir`]), the per-shard checksummed, group-committed segment
//! log ([`log`]) and what is written in it ([`records`]); the shard's
//! `persist` module drives them.
//!
//! Arrows: this module uses only std, the log's own crates and its own
//! submodules; nothing here knows about sockets or the reactor.

pub mod datadir;
pub mod log;
pub mod records;
