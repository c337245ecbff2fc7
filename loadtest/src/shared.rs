//! What every task of a run shares: the run's state and counters, the
//! naming both sides of the check agree on (users, broadcast sources), and
//! the WebSocket settings.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use switchyard_load::check::MAX_SOURCES;
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::args::Common;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Shared run state.
pub(crate) struct Run {
    pub(crate) common: Common,
    pub(crate) start: Instant,
    /// Events the broker accepted, per user.
    pub(crate) sent: Vec<AtomicU64>,
    /// Broadcasts the broker accepted (owed to every connection).
    pub(crate) broadcasts: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) stop: AtomicBool,
    /// Fires when the run ends, so idle clients need no polling timer.
    pub(crate) stopped: tokio::sync::watch::Sender<bool>,
    pub(crate) resumes: AtomicU64,
    pub(crate) resume_failed: AtomicU64,
    /// Publisher streams replaced after an ack timeout or a failure.
    pub(crate) retries: AtomicU64,
    pub(crate) latency_tx: flume::Sender<Vec<u64>>,
    /// How late events were written to the broker (µs), merged from every
    /// publisher as it ends.
    pub(crate) send_lag: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    /// Microseconds after `start` at which the measured window opens (set
    /// when publishing starts); earlier events are not sampled for latency.
    pub(crate) measure_from_us: AtomicU64,
    /// The client listeners of the nodes (`--target`, split).
    pub(crate) targets: Vec<String>,
    /// Every user's name ([`user_name`]), made once: publishers name a
    /// user in every event.
    pub(crate) names: Vec<String>,
}

/// Longest latency a histogram holds (µs): an hour.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// A histogram for latencies in µs (1 µs to an hour, 3 digits).
pub(crate) fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("static bounds")
}

/// Records a latency in µs, clamped into the histogram's range.
pub(crate) fn record_latency(h: &mut hdrhistogram::Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, LATENCY_MAX_US));
}

/// Splits a comma-separated listener list, without trailing slashes.
pub(crate) fn node_list(raw: &str) -> Vec<String> {
    raw.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).collect()
}

pub(crate) fn user_name(i: usize) -> String {
    format!("load-{i}")
}

/// The `u` of a broadcast event's data: owed to every connection.
pub(crate) const EVERYONE: &str = "*";

/// Which broadcaster sends the broadcast with this nonce.
pub(crate) fn broadcast_source(nonce: u64, sources: usize) -> usize {
    (nonce % sources.clamp(1, MAX_SOURCES) as u64) as usize
}

/// The WebSocket settings of the publisher streams (and the relay's).
pub(crate) use switchyard_load::ws_config;
