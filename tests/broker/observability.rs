//! Observability (contract §7): histograms, .hgrm, Prometheus metrics, SIGUSR1 dumps.

use std::process::Command;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

use crate::util::*;

/// Parses `.hgrm` text: the (value, percentile, total count) rows and the footer's total.
fn parse_hgrm(text: &str) -> (Vec<(f64, f64, u64)>, u64) {
    let mut rows = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("#[Max") {
            let n = rest.rsplit('=').next().unwrap().trim_end_matches(']').trim();
            total = Some(n.parse().unwrap());
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 3 {
            if let (Ok(v), Ok(p), Ok(c)) = (cols[0].parse(), cols[1].parse(), cols[2].parse()) {
                rows.push((v, p, c));
            }
        }
    }
    (rows, total.expect("footer with total count"))
}

async fn deliver(b: &TestBroker, users: usize, per_user: usize) -> Vec<Ws> {
    let mut socks = Vec::new();
    for u in 0..users {
        socks.push(b.connect(&format!("o{u}")).await.0);
    }
    for i in 0..per_user {
        for u in 0..users {
            let prio = ["high", "normal", "low"][i % 3];
            b.post(
                "/v1/publish",
                json!({"user": format!("o{u}"), "event": "e", "priority": prio}).to_string(),
            )
            .await;
        }
    }
    for ws in socks.iter_mut() {
        next_events(ws, per_user).await;
    }
    socks
}

#[tokio::test]
async fn histogram_counts_every_delivered_frame_and_round_trips() {
    let b = TestBroker::with(|c| c.shards = 2);
    let _socks = deliver(&b, 4, 30).await; // 120 event frames written
    let (status, text) = b.get_text("/debug/histograms").await;
    assert_eq!(status, 200);
    let (rows, total) = parse_hgrm(&text);
    assert_eq!(total, 120, "{text}");
    assert_eq!(rows.last().unwrap().2, 120);
    // The rows at the 50th and 90th percentile and the last row give back the
    // same figures /v1/stats computes from the histogram itself.
    let (_, stats) = b.get("/v1/stats").await;
    let lat = &stats["latency_us"];
    assert_eq!(lat["count"], 120);
    let h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    for (q, key) in [(0.5, "p50"), (0.9, "p90"), (1.0, "max")] {
        let row =
            rows.iter().find(|r| (r.1 - q).abs() < 1e-9).unwrap_or_else(|| panic!("a row at {q}: {text}"));
        let theirs = lat[key].as_u64().unwrap();
        assert!(h.equivalent(row.0 as u64, theirs), "{key}: hgrm {} vs stats {theirs}", row.0);
    }
    // Rows are monotonic and cumulative counts never exceed the total.
    for w in rows.windows(2) {
        assert!(w[0].0 <= w[1].0 && w[0].1 < w[1].1 && w[0].2 <= w[1].2, "{text}");
    }
    for p in ["high", "normal", "low"] {
        assert_eq!(stats["latency_us_by_priority"][p]["count"], 40, "{p}");
    }
    // ?reset=1 returns the data, then starts over.
    let (_, before) = b.get_text("/debug/histograms?reset=1").await;
    assert_eq!(parse_hgrm(&before).1, 120);
    let (_, after) = b.get_text("/debug/histograms").await;
    assert_eq!(parse_hgrm(&after).1, 0);
    b.stop().await;
}

#[tokio::test]
async fn prometheus_metrics_parse_and_match() {
    let b = TestBroker::with(|c| c.shards = 2);
    let _socks = deliver(&b, 3, 10).await;
    let (status, _) = b.post("/v1/publish", "{bad").await;
    assert_eq!(status, 400);
    let (status, text) = b.get_text("/metrics").await;
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let sum = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(sum("switchyard_events_published_total"), 30.0);
    assert_eq!(sum("switchyard_events_delivered_total"), 30.0);
    assert_eq!(sum("switchyard_connections"), 3.0);
    assert_eq!(sum("switchyard_users"), 3.0);
    assert_eq!(sum("switchyard_events_shed_total"), 0.0);
    let bad = scrape
        .samples
        .iter()
        .find(|s| s.metric == "switchyard_api_errors_total" && s.labels.get("status") == Some("400"))
        .expect("400 counted");
    assert!(matches!(bad.value, prometheus_parse::Value::Counter(v) if v == 1.0));
    assert!(scrape.samples.iter().any(|s| s.metric == "switchyard_latency_seconds"));
    assert!(sum("switchyard_frames_written_total") >= 30.0);
    b.stop().await;
}

#[tokio::test]
async fn user_endpoint_reports_state() {
    let b = TestBroker::start();
    let (_a, _) = b.connect("info").await;
    let (_c, _) = b.connect("info").await;
    b.publish("info", "e", json!(1)).await;
    b.publish("info", "e", json!(2)).await;
    let (status, v) = b.get("/v1/users/info").await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["user"].clone(), v["connections"].clone(), v["seq"].clone(), v["history"].clone()),
        (json!("info"), json!(2), json!(2), json!(2))
    );
    let (status, v) = b.get("/v1/users/bad%20id").await;
    assert_eq!(status, 400, "{v}");
    b.stop().await;
}

#[test]
fn sigusr1_and_shutdown_write_hgrm_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--hist-interval",
            "100ms",
            "--hist-dir",
        ])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let count = |ext: &str| {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == ext))
            .count()
    };
    // Bounded wait for the broker to be up (the interval log appears at start).
    poll_until("interval log created", || count("hlog") == 1);
    Command::new("kill").args(["-USR1", &child.id().to_string()]).status().unwrap();
    poll_until("SIGUSR1 wrote a .hgrm", || count("hgrm") == 1);
    // Bounded wait for the interval log to hold at least one interval.
    let hlog = std::fs::read_dir(dir.path())
        .unwrap()
        .find(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "hlog"))
        .unwrap()
        .unwrap()
        .path();
    let intervals = || {
        let log = std::fs::read(&hlog).unwrap();
        hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log)
            .filter(|e| matches!(e, Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(_))))
            .count()
    };
    poll_until("the interval log holds intervals", || intervals() >= 1);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(count("hgrm"), 2, "shutdown wrote another");
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .find(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "hgrm"))
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(file.path()).unwrap();
    assert!(text.contains("Value     Percentile TotalCount 1/(1-Percentile)"), "{text}");
}

/// Polls `done` every 10 ms for at most 5 s (for effects outside the process,
/// such as files a signal handler writes, that offer nothing to await).
fn poll_until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("timed out waiting: {what}");
}

#[tokio::test]
async fn metrics_come_from_what_the_shards_publish_on_their_heartbeat() {
    // /metrics (no key) never asks a shard: gauges and latency are what each
    // shard published on its last heartbeat (25 ms here).
    let b = TestBroker::with(|c| {
        c.shards = 2;
        c.ping_interval = Duration::from_millis(100);
    });
    let _socks = deliver(&b, 4, 25).await;
    b.post("/v1/publish", serde_json::json!({"user": "m", "event": "e", "id": "k"}).to_string()).await;
    b.post("/v1/publish", serde_json::json!({"user": "m", "event": "e", "id": "k"}).to_string()).await;
    let (_, stats) = b.get("/v1/stats").await;
    let held: u64 =
        stats["shards"].as_array().unwrap().iter().map(|s| s["history_bytes"].as_u64().unwrap()).sum();
    assert!(held > 0);
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut last = String::new();
    for _ in 0..200 {
        let (_, text) = b.get_text("/metrics").await;
        if value(&text, "switchyard_history_bytes") == held as f64
            && value(&text, "switchyard_latency_seconds_count") >= 100.0
        {
            assert_eq!(value(&text, "switchyard_history_events"), 101.0);
            assert_eq!(value(&text, "switchyard_duplicate_publishes_total"), 1.0);
            b.stop().await;
            return;
        }
        last = text;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("metrics never caught up with the shards: {last}");
}
