//! Operator views: `/v1/stats` JSON, `/metrics` Prometheus text, the
//! merged latency histogram as `.hgrm` text, and the `/dashboard` page.
//!
//! `/v1/stats` and `/debug/histograms` (behind the API key) ask each shard
//! through its ring for fresh figures and merge them, so a shard is never
//! stopped or locked to be observed. `/metrics` (no key) only reads what the
//! shards publish on their heartbeat — atomics and a copy of their latency
//! histograms — so a scrape never makes a shard do work.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use tokio::sync::oneshot;

use crate::metrics::{read, Latency, Percentiles};
use crate::protocol::Priority;
use crate::shard::{Command, ShardSnapshot};
use crate::shared::Shared;

/// `GET /dashboard`: one static page, compiled in (no CDN, no external
/// fonts or scripts); everything it shows it reads from `/v1/stats`.
pub const DASHBOARD_HTML: &str = include_str!("observe/dashboard.html");

/// How long an operator view waits for a shard's answer (a shard that is
/// shutting down no longer answers).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Asks every shard the same question through its ring and collects the
/// answers that arrive in time (a shard whose ring is full is skipped).
async fn ask_all<T>(shared: &Shared, ask: impl Fn(oneshot::Sender<T>) -> Command) -> Vec<T> {
    let mut rxs = Vec::new();
    for s in shared.shards.iter() {
        let (tx, rx) = oneshot::channel();
        if s.push(ask(tx)).is_ok() {
            rxs.push(rx);
        }
    }
    let mut out = Vec::with_capacity(rxs.len());
    for rx in rxs {
        if let Ok(Ok(v)) = tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            out.push(v);
        }
    }
    out
}

/// Every shard's snapshot.
pub async fn snapshots(shared: &Shared) -> Vec<ShardSnapshot> {
    ask_all(shared, |reply| Command::Snapshot { reply }).await
}

/// The merged latency histograms of every shard; `reset` clears them after reading.
pub async fn merged_latency(shared: &Shared, reset: bool) -> Latency {
    let mut merged = Latency::default();
    for l in ask_all(shared, |reply| Command::Latency { reset, reply }).await {
        merged.merge(&l);
    }
    merged
}

/// `GET /v1/stats`.
pub async fn stats(shared: &Shared) -> serde_json::Value {
    let snaps = snapshots(shared).await;
    let lat = merged_latency(shared, false).await;
    let mut shards = Vec::new();
    let (mut published, mut delivered, mut shed) = (0, 0, [0u64; 3]);
    let (mut calls, mut frames, mut evicted, mut slow) = (0, 0, 0, 0);
    for h in shared.shards.iter() {
        let m = &h.metrics;
        let s_shed = [read(&m.shed[0]), read(&m.shed[1]), read(&m.shed[2])];
        let snap = snaps.iter().find(|s| s.shard == h.id).cloned().unwrap_or_default();
        published += read(&m.published);
        delivered += read(&m.delivered);
        calls += read(&m.write_calls);
        frames += read(&m.frames_written);
        evicted += read(&m.evicted);
        slow += read(&m.slow_closed);
        for (t, v) in shed.iter_mut().zip(s_shed) {
            *t += v;
        }
        shards.push(serde_json::json!({
            "shard": h.id,
            "connections": read(&m.connections),
            "sse_connections": read(&m.sse_connections),
            "users": read(&m.users),
            "queued": snap.queued,
            "max_queue_depth": snap.max_queue_depth,
            "history_events": snap.history_events,
            "history_bytes": snap.history_bytes,
            "history_evicted": read(&m.history_evicted),
            "store": {
                "bytes": read(&m.store_bytes),
                "segments": read(&m.store_segments),
                "fsyncs": read(&m.store_syncs),
                "fsync_us_total": read(&m.store_sync_us),
                "failed": read(&m.store_failed) > 0,
            },
            "duplicates": read(&m.duplicates),
            "published": read(&m.published),
            "delivered": read(&m.delivered),
            "shed": {"high": s_shed[0], "normal": s_shed[1], "low": s_shed[2]},
            "ring_len": h.ring.len(),
            "ring_capacity": h.ring.capacity(),
            "ring_full": read(&m.ring_full),
            "write_calls": read(&m.write_calls),
            "frames_written": read(&m.frames_written),
        }));
    }
    let by_priority: serde_json::Map<_, _> = Priority::ALL
        .iter()
        .map(|p| {
            (
                p.as_str().to_string(),
                serde_json::to_value(Percentiles::of(&lat.by_priority[p.index()])).unwrap_or_default(),
            )
        })
        .collect();
    let store = shared.config.data.as_ref().map(|d| {
        let sum = |f: &dyn Fn(&crate::metrics::ShardMetrics) -> u64| sum_shards(shared, f);
        let (syncs, us) = (sum(&|m| read(&m.store_syncs)), sum(&|m| read(&m.store_sync_us)));
        serde_json::json!({
            "dir": d.dir.display().to_string(),
            "fsync": format!("{:?}", d.fsync).to_lowercase(),
            "bytes": sum(&|m| read(&m.store_bytes)),
            "segments": sum(&|m| read(&m.store_segments)),
            "fsyncs": syncs,
            "fsync_mean_us": if syncs == 0 { 0.0 } else { us as f64 / syncs as f64 },
            "fsync_us_buckets": crate::engine::log::SYNC_BUCKETS_US.iter().enumerate().map(|(i, le)| {
                serde_json::json!({"le": le, "count": sum(&|m| read(&m.store_sync_buckets[i]))})
            }).chain(std::iter::once(serde_json::json!({
                "le": "+Inf", "count": sum(&|m| read(&m.store_sync_buckets[crate::engine::log::SYNC_BUCKETS_US.len()]))
            }))).collect::<Vec<_>>(),
        })
    });
    let cluster = shared.cluster.as_ref().map(|e| {
        let sum = |f: &dyn Fn(&crate::metrics::ShardMetrics) -> u64| sum_shards(shared, f);
        serde_json::json!({
            "node": e.node_id,
            "nodes_seen": e.nodes_seen(),
            "engine_up": e.health.is_up(),
            "ready": e.health.is_ready(),
            "engine_rtt_us": e.health.rtt_us.load(std::sync::atomic::Ordering::Relaxed),
            "engine_failures": e.health.failures.load(std::sync::atomic::Ordering::Relaxed),
            "catch_ups": sum(&|m| read(&m.catch_ups)),
            "resync_closed": sum(&|m| read(&m.resync_closed)),
        })
    });
    serde_json::json!({
        "cluster": cluster,
        "store": store,
        "connections": shared.live_connections(),
        "sse_connections": shared.shards.iter().map(|h| read(&h.metrics.sse_connections)).sum::<u64>(),
        "users": shared.shards.iter().map(|h| read(&h.metrics.users)).sum::<u64>(),
        "shards": shards,
        "events": {
            "published": published,
            "delivered": delivered,
            "shed": shed.iter().sum::<u64>(),
            "shed_by_priority": {"high": shed[0], "normal": shed[1], "low": shed[2]},
        },
        "evicted": evicted,
        "slow_consumers_closed": slow,
        "write_calls": calls,
        "frames_written": frames,
        "frames_per_write": if calls == 0 { 0.0 } else { frames as f64 / calls as f64 },
        "latency_us": Percentiles::of(&lat.all),
        "latency_us_by_priority": by_priority,
    })
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4, from what the
/// shards publish (atomics and their heartbeat's histogram copy): a scrape,
/// which needs no key, never makes a shard do work.
pub fn prometheus(shared: &Shared) -> String {
    let mut lat = Latency::default();
    for h in shared.shards.iter() {
        lat.merge(&h.latency.load());
    }
    let mut out = String::with_capacity(4096);
    let shards = &shared.shards;
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP switchyard_{name} {help}");
        let _ = writeln!(out, "# TYPE switchyard_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "switchyard_{name}{labels} {v}");
        }
    };
    let per_shard = |f: &dyn Fn(&crate::metrics::ShardMetrics) -> u64| -> Vec<(String, f64)> {
        shards.iter().map(|h| (format!("{{shard=\"{}\"}}", h.id), f(&h.metrics) as f64)).collect()
    };
    family("connections", "gauge", "Live client connections.", per_shard(&|m| read(&m.connections)));
    family(
        "sse_connections",
        "gauge",
        "Live client connections that are SSE streams (included in connections).",
        per_shard(&|m| read(&m.sse_connections)),
    );
    family("users", "gauge", "Users with state (seq, history) held.", per_shard(&|m| read(&m.users)));
    family("events_published_total", "counter", "Events assigned a seq.", per_shard(&|m| read(&m.published)));
    family(
        "events_delivered_total",
        "counter",
        "Event frames written to client sockets.",
        per_shard(&|m| read(&m.delivered)),
    );
    let mut shed_rows = Vec::new();
    for h in shards.iter() {
        for p in Priority::ALL {
            shed_rows.push((
                format!("{{shard=\"{}\",priority=\"{}\"}}", h.id, p.as_str()),
                read(&h.metrics.shed[p.index()]) as f64,
            ));
        }
    }
    family("events_shed_total", "counter", "Events shed by the slow-consumer policy.", shed_rows);
    family(
        "evictions_total",
        "counter",
        "Connections evicted at the per-user limit (4001).",
        per_shard(&|m| read(&m.evicted)),
    );
    family(
        "slow_consumer_closes_total",
        "counter",
        "Connections closed with 1013.",
        per_shard(&|m| read(&m.slow_closed)),
    );
    family(
        "ring_full_total",
        "counter",
        "Commands refused because a shard ring was full.",
        per_shard(&|m| read(&m.ring_full)),
    );
    family("write_calls_total", "counter", "Vectored socket writes.", per_shard(&|m| read(&m.write_calls)));
    family(
        "frames_written_total",
        "counter",
        "Frames carried by those writes.",
        per_shard(&|m| read(&m.frames_written)),
    );
    family(
        "queue_depth",
        "gauge",
        "Event frames queued on client connections.",
        per_shard(&|m| read(&m.queued)),
    );
    family(
        "history_bytes",
        "gauge",
        "Bytes held in users' histories.",
        per_shard(&|m| read(&m.history_bytes)),
    );
    family(
        "history_events",
        "gauge",
        "Events held in users' histories.",
        per_shard(&|m| read(&m.history_events)),
    );
    family(
        "history_evicted_total",
        "counter",
        "Held events evicted to stay within --history-memory.",
        per_shard(&|m| read(&m.history_evicted)),
    );
    family(
        "store_bytes",
        "gauge",
        "Bytes of the shard's log on disk (--data-dir).",
        per_shard(&|m| read(&m.store_bytes)),
    );
    family(
        "store_segments",
        "gauge",
        "Segment files of the shard's log.",
        per_shard(&|m| read(&m.store_segments)),
    );
    family(
        "store_fsyncs_total",
        "counter",
        "Syncs of the shard's log.",
        per_shard(&|m| read(&m.store_syncs)),
    );
    family(
        "duplicate_publishes_total",
        "counter",
        "Publishes answered as duplicates of an accepted idempotency key.",
        per_shard(&|m| read(&m.duplicates)),
    );
    family(
        "api_errors_total",
        "counter",
        "API error responses by HTTP status (0 = other).",
        shared.api_errors.statuses().map(|(s, v)| (format!("{{status=\"{s}\"}}"), v as f64)).collect(),
    );
    family(
        "publish_item_errors_total",
        "counter",
        "Rejected publish items in batches and streams, by code.",
        shared.api_errors.codes().map(|(c, v)| (format!("{{code=\"{c}\"}}"), v as f64)).collect(),
    );
    if shared.config.data.is_some() {
        store_sync_histogram(&mut out, shared);
    }
    latency_histogram(&mut out, &lat);
    cluster_metrics(&mut out, shared);
    match &shared.cluster {
        Some(engine) => label_every_sample(&out, "node", &engine.node_id),
        None => out,
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets.
const LATENCY_BUCKETS_S: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Publish→write latency as a Prometheus histogram (cumulative buckets, sum
/// and count per priority), so nodes' figures can be added up.
fn latency_histogram(out: &mut String, lat: &Latency) {
    let _ = writeln!(out, "# HELP switchyard_latency_seconds Publish accepted to frame written.");
    let _ = writeln!(out, "# TYPE switchyard_latency_seconds histogram");
    for p in Priority::ALL {
        let h = &lat.by_priority[p.index()];
        let prio = p.as_str();
        for le in LATENCY_BUCKETS_S {
            let n = if h.is_empty() { 0 } else { h.count_between(0, (le * 1e6) as u64) };
            let _ = writeln!(out, "switchyard_latency_seconds_bucket{{priority=\"{prio}\",le=\"{le}\"}} {n}");
        }
        let _ =
            writeln!(out, "switchyard_latency_seconds_bucket{{priority=\"{prio}\",le=\"+Inf\"}} {}", h.len());
        let sum: f64 =
            h.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum();
        let _ = writeln!(out, "switchyard_latency_seconds_sum{{priority=\"{prio}\"}} {}", sum / 1e6);
        let _ = writeln!(out, "switchyard_latency_seconds_count{{priority=\"{prio}\"}} {}", h.len());
    }
}

/// One counter summed over every shard.
fn sum_shards(shared: &Shared, f: &dyn Fn(&crate::metrics::ShardMetrics) -> u64) -> u64 {
    shared.shards.iter().map(|h| f(&h.metrics)).sum()
}

/// Cluster mode: the engine's health and the shards' gap handling.
fn cluster_metrics(out: &mut String, shared: &Shared) {
    let Some(e) = &shared.cluster else { return };
    let sum = |f: &dyn Fn(&crate::metrics::ShardMetrics) -> u64| sum_shards(shared, f);
    let rows: [(&str, &str, &str, f64); 6] = [
        (
            "cluster_engine_up",
            "gauge",
            "1 while Redis answers commands.",
            f64::from(u8::from(e.health.is_up())),
        ),
        (
            "cluster_ready",
            "gauge",
            "1 while commands and Pub/Sub both reach Redis.",
            f64::from(u8::from(e.health.is_ready())),
        ),
        (
            "cluster_engine_rtt_seconds",
            "gauge",
            "Round trip of the last ping to Redis.",
            e.health.rtt_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6,
        ),
        ("cluster_nodes_seen", "gauge", "Nodes heard from in the last 5 s.", e.nodes_seen() as f64),
        (
            "cluster_catch_ups_total",
            "counter",
            "Reads of a user's stream to fill a seq gap.",
            sum(&|m| read(&m.catch_ups)) as f64,
        ),
        (
            "cluster_resync_closes_total",
            "counter",
            "Connections closed with 1012 after a lost epoch or an unfillable gap.",
            sum(&|m| read(&m.resync_closed)) as f64,
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(out, "# HELP switchyard_{name} {help}");
        let _ = writeln!(out, "# TYPE switchyard_{name} {kind}");
        let _ = writeln!(out, "switchyard_{name} {v}");
    }
}

/// Adds `name="value"` to every sample line of an exposition.
fn label_every_sample(text: &str, name: &str, value: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            out.push_str(line);
        } else {
            let metric_end = line.find([' ', '{']).unwrap_or(line.len());
            let (metric, rest) = line.split_at(metric_end);
            out.push_str(metric);
            match rest.strip_prefix('{') {
                Some(labels) => {
                    let _ = write!(out, "{{{name}=\"{value}\",{labels}");
                }
                None => {
                    let _ = write!(out, "{{{name}=\"{value}\"}}{rest}");
                }
            }
        }
        out.push('\n');
    }
    out
}

/// The log syncs' latency as a Prometheus histogram per shard (cumulative
/// `_bucket`s, `_sum`, `_count`), so nodes and shards can be summed.
fn store_sync_histogram(out: &mut String, shared: &Shared) {
    use crate::engine::log::SYNC_BUCKETS_US;
    let _ = writeln!(
        out,
        "# HELP switchyard_store_fsync_seconds Time each sync of a shard's log took (--data-dir)."
    );
    let _ = writeln!(out, "# TYPE switchyard_store_fsync_seconds histogram");
    for h in shared.shards.iter() {
        let m = &h.metrics;
        let mut cumulative = 0;
        for (i, le) in SYNC_BUCKETS_US.iter().enumerate() {
            cumulative += read(&m.store_sync_buckets[i]);
            let _ = writeln!(
                out,
                "switchyard_store_fsync_seconds_bucket{{shard=\"{}\",le=\"{}\"}} {cumulative}",
                h.id,
                *le as f64 / 1e6
            );
        }
        cumulative += read(&m.store_sync_buckets[SYNC_BUCKETS_US.len()]);
        let _ = writeln!(
            out,
            "switchyard_store_fsync_seconds_bucket{{shard=\"{}\",le=\"+Inf\"}} {cumulative}",
            h.id
        );
        let _ = writeln!(
            out,
            "switchyard_store_fsync_seconds_sum{{shard=\"{}\"}} {}",
            h.id,
            read(&m.store_sync_us) as f64 / 1e6
        );
        let _ = writeln!(out, "switchyard_store_fsync_seconds_count{{shard=\"{}\"}} {cumulative}", h.id);
    }
}

/// `GET /debug/histograms`: merged latency as `.hgrm` text.
pub async fn hgrm_text(shared: &Shared, reset: bool) -> String {
    let lat = merged_latency(shared, reset).await;
    hgrm(&lat.all)
}

/// Formats `h` (µs) as HdrHistogram's percentile distribution text (`.hgrm`),
/// the format `outputPercentileDistribution` prints and plotters read.
///
/// Rows are at the same percentile ticks as HdrHistogram's (5 per halving
/// distance to 100%), and each row's value is exactly `value_at_quantile` of
/// its percentile, so the text parses back into the figures `/v1/stats` shows.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        for q in percentile_ticks(h) {
            let value = h.value_at_quantile(q);
            let count = h.count_between(0, value);
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                    value as f64,
                    q,
                    count,
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{:>12.3} {:>2.12} {:>10}", value as f64, q, count);
            }
        }
    }
    let _ = writeln!(out, "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]", h.mean(), h.stdev());
    let _ = writeln!(out, "#[Max     = {:>12.3}, Total count    = {:>12}]", h.max() as f64, h.len());
    let _ = writeln!(out, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", h.buckets(), sub_buckets(h));
    out
}

/// Quantiles 0, 0.1, …, 0.5, 0.55, …, 0.75, 0.775, … (5 ticks per halving of
/// the distance to 1), up to the first that reaches the maximum, then 1.
fn percentile_ticks(h: &Histogram<u64>) -> Vec<f64> {
    let max = h.max();
    let mut ticks = Vec::new();
    let mut p = 0.0f64; // percent
    while ticks.len() < 400 {
        let q = p / 100.0;
        if q >= 1.0 || (q > 0.0 && h.equivalent(h.value_at_quantile(q), max)) {
            break;
        }
        ticks.push(q);
        let half = 2f64.powi((100.0 / (100.0 - p)).log2().floor() as i32 + 1);
        p += 100.0 / (half * 5.0);
    }
    ticks.push(1.0);
    ticks
}

/// HdrHistogram's sub-bucket count for the histogram's precision.
fn sub_buckets(h: &Histogram<u64>) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(h.sigfig()));
    largest.next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_has_header_rows_and_footer() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        assert!(text.contains("#[Max     =     1000.000, Total count    =         1000]"), "{text}");
        let last_row = text.lines().rfind(|l| !l.starts_with('#')).unwrap();
        assert!(last_row.contains("1.000000000000"), "{last_row}");
    }
}
