//! Counters and latency histograms.
//!
//! Counters live per shard in [`ShardMetrics`], cache-padded so shards never
//! share a cache line, and are written almost only by their own shard thread
//! (`Relaxed` increments: they are statistics, ordered with nothing). Readers
//! (stats, /metrics) sum them without stopping anyone.
//!
//! Latency histograms ([`Latency`]) are shard-local plain values (no atomics
//! at all); a snapshot is taken by asking the shard through its ring, so
//! merging never stalls a shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;

use crate::protocol::Priority;

/// Highest latency the histograms track, in µs (1 hour); above is clamped.
const MAX_TRACKABLE_US: u64 = 3_600_000_000;

fn counter() -> CachePadded<AtomicU64> {
    CachePadded::new(AtomicU64::new(0))
}

/// A monotonically increasing, relaxed counter.
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads a relaxed counter.
pub fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One shard's counters.
pub struct ShardMetrics {
    /// Live client connections on this shard (gauge), and how many of them are SSE streams.
    pub connections: CachePadded<AtomicU64>,
    pub sse_connections: CachePadded<AtomicU64>,
    /// Users with state on this shard (gauge).
    pub users: CachePadded<AtomicU64>,
    /// Events given a seq on this shard.
    pub published: CachePadded<AtomicU64>,
    /// Event frames written to sockets.
    pub delivered: CachePadded<AtomicU64>,
    /// Events shed by the slow-consumer policy, by priority.
    pub shed: [CachePadded<AtomicU64>; 3],
    /// Connections closed with 4001 for the per-user limit.
    pub evicted: CachePadded<AtomicU64>,
    /// Connections closed with 1013 (a `high` event could not be queued).
    pub slow_closed: CachePadded<AtomicU64>,
    /// Vectored write calls made, and frames they carried.
    pub write_calls: CachePadded<AtomicU64>,
    pub frames_written: CachePadded<AtomicU64>,
    /// Commands refused because this shard's ring was full (written by producers).
    pub ring_full: CachePadded<AtomicU64>,
    /// Event frames queued on this shard's connections (gauge, as of the last heartbeat).
    pub queued: CachePadded<AtomicU64>,
    /// Deepest connection queue (gauge, as of the last heartbeat).
    pub max_queue_depth: CachePadded<AtomicU64>,
    /// Bytes and events held in this shard's histories (gauges, as of the last heartbeat).
    pub history_bytes: CachePadded<AtomicU64>,
    pub history_events: CachePadded<AtomicU64>,
    /// Held events evicted to stay within `--history-memory`.
    pub history_evicted: CachePadded<AtomicU64>,
    /// Publishes answered as duplicates of an accepted idempotency key
    /// (cluster mode: live messages dropped as already delivered).
    pub duplicates: CachePadded<AtomicU64>,
    /// Cluster mode: reads of a user's stream to fill a seq gap.
    pub catch_ups: CachePadded<AtomicU64>,
    /// Cluster mode: connections closed with 1012 because their user's
    /// history was lost or a gap could not be filled.
    pub resync_closed: CachePadded<AtomicU64>,
    /// With `--data-dir`: bytes and segment files of this shard's log
    /// (gauges), syncs done and the microseconds they took, and whether the
    /// log failed or did not close cleanly (0 or 1).
    pub store_bytes: CachePadded<AtomicU64>,
    pub store_segments: CachePadded<AtomicU64>,
    pub store_syncs: CachePadded<AtomicU64>,
    pub store_sync_us: CachePadded<AtomicU64>,
    pub store_failed: CachePadded<AtomicU64>,
    /// Syncs per latency bucket (`engine::log::SYNC_BUCKETS_US`, last = slower), as of the last heartbeat.
    pub store_sync_buckets: [AtomicU64; 13],
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            connections: counter(),
            sse_connections: counter(),
            users: counter(),
            published: counter(),
            delivered: counter(),
            shed: [counter(), counter(), counter()],
            evicted: counter(),
            slow_closed: counter(),
            write_calls: counter(),
            frames_written: counter(),
            ring_full: counter(),
            queued: counter(),
            max_queue_depth: counter(),
            history_bytes: counter(),
            history_events: counter(),
            history_evicted: counter(),
            duplicates: counter(),
            catch_ups: counter(),
            resync_closed: counter(),
            store_bytes: counter(),
            store_segments: counter(),
            store_syncs: counter(),
            store_sync_us: counter(),
            store_failed: counter(),
            store_sync_buckets: Default::default(),
        }
    }
}

/// A shard's latency histograms (publish accepted → frame written), in µs.
#[derive(Clone)]
pub struct Latency {
    pub all: Histogram<u64>,
    pub by_priority: [Histogram<u64>; 3],
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant figures over 1 µs .. 1 h: fixed parameters, cannot fail.
    Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3)
        .unwrap_or_else(|e| unreachable!("static histogram bounds: {e}"))
}

impl Default for Latency {
    fn default() -> Self {
        Latency { all: new_histogram(), by_priority: [new_histogram(), new_histogram(), new_histogram()] }
    }
}

impl Latency {
    /// Records one event frame written `elapsed` after its publish was accepted.
    pub fn record(&mut self, priority: Priority, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, MAX_TRACKABLE_US);
        // Values are clamped into range, so recording cannot fail.
        let _ = self.all.record(us);
        let _ = self.by_priority[priority.index()].record(us);
    }

    /// Adds `other` into `self` (same bounds, so this cannot fail).
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.all.add(&other.all);
        for (a, b) in self.by_priority.iter_mut().zip(&other.by_priority) {
            let _ = a.add(b);
        }
    }

    pub fn reset(&mut self) {
        self.all.reset();
        for h in &mut self.by_priority {
            h.reset();
        }
    }
}

/// p50/p90/p99/p99.9/max of a histogram, in µs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }
}

/// Error codes counted for publish items (batch and stream).
pub const ITEM_ERROR_CODES: [&str; 10] = [
    "invalid_json",
    "missing_field",
    "invalid_user",
    "invalid_event",
    "invalid_priority",
    "payload_too_large",
    "overloaded",
    "unavailable",
    "too_many_items",
    "other",
];

/// HTTP statuses counted for API responses that were errors.
pub const ERROR_STATUSES: [u16; 8] = [400, 401, 404, 405, 413, 426, 503, 0];

/// API error counters, written by whichever thread serves the API connection.
pub struct ApiErrors {
    by_code: [CachePadded<AtomicU64>; ITEM_ERROR_CODES.len()],
    by_status: [CachePadded<AtomicU64>; ERROR_STATUSES.len()],
}

impl Default for ApiErrors {
    fn default() -> Self {
        ApiErrors {
            by_code: std::array::from_fn(|_| counter()),
            by_status: std::array::from_fn(|_| counter()),
        }
    }
}

impl ApiErrors {
    /// Counts one failed publish item by its error code.
    pub fn count(&self, code: &str) {
        let i = ITEM_ERROR_CODES.iter().position(|c| *c == code).unwrap_or(ITEM_ERROR_CODES.len() - 1);
        bump(&self.by_code[i], 1);
    }

    /// Counts one error response by HTTP status (0 = any other status).
    pub fn count_status(&self, status: u16) {
        let i = ERROR_STATUSES.iter().position(|s| *s == status).unwrap_or(ERROR_STATUSES.len() - 1);
        bump(&self.by_status[i], 1);
    }

    pub fn codes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ITEM_ERROR_CODES.iter().zip(&self.by_code).map(|(c, v)| (*c, read(v)))
    }

    pub fn statuses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        ERROR_STATUSES.iter().zip(&self.by_status).map(|(c, v)| (*c, read(v)))
    }
}
