//! What every thread may read: the validated configuration, the routing
//! table, the shards' handles (rings and counters), the live-connection
//! count, and the per-process pieces built at start (boot id, redactor,
//! authenticator). Immutable after start except for atomics, and what every
//! thread holds an `Arc` of. It sits low in the house: it imports only the
//! modules whose types it holds, and everything above reads it.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::inbox::ShardHandle;
use crate::metrics::ApiErrors;
use crate::redact::Redactor;
use crate::routing::Router;

/// The broker-wide context shared by every thread.
pub struct Shared {
    pub config: Config,
    pub router: Router,
    /// Indexed by shard id.
    pub shards: Box<[ShardHandle]>,
    /// Client connections admitted (handed over or live), across shards:
    /// enforces `--max-connections` without asking the shards.
    pub(crate) live: AtomicUsize,
    /// 64 random bits from the operating system, drawn at start: the prefix
    /// of every user epoch, so a restart changes them all and an old epoch
    /// never matches new history (a shard and a per-shard counter follow,
    /// so no two states of a run share an epoch either).
    pub boot: String,
    pub redactor: Redactor,
    pub auth: Authenticator,
    pub api_errors: ApiErrors,
    /// With `--cluster`: the Redis engine.
    pub cluster: Option<std::sync::Arc<crate::cluster::Engine>>,
    /// With `--data-dir`: whether the broker that last used it stopped cleanly.
    pub store_was_clean: bool,
}

impl Shared {
    /// Admits one more client connection if under `--max-connections`.
    pub fn try_acquire_connection(&self) -> bool {
        // Relaxed: a counter bounding admissions; it orders nothing else.
        let prev = self.live.fetch_add(1, Ordering::Relaxed);
        if prev >= self.config.max_connections {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn release_connection(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}
