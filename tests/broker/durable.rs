//! `--data-dir` (contract §10) against the real binary: a clean restart
//! keeps epochs, seqs, history and idempotency keys; `kill -9` under
//! `--fsync always` loses no acknowledged event; `kill -9` under `--fsync
//! never` gives new epochs; a torn or corrupt log tail is survived; a locked
//! directory is refused; `--history-ttl` counts the downtime.

use std::process::{Child, Command};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

struct Node {
    child: Child,
    client: String,
    api: std::net::SocketAddr,
}

fn start(dir: &std::path::Path, extra: &[&str]) -> Node {
    let d = dir.display().to_string();
    let mut args = vec!["--data-dir", d.as_str()];
    if !extra.contains(&"--shards") {
        args.extend_from_slice(&["--shards", "2"]);
    }
    args.extend_from_slice(extra);
    let (child, client, api) = spawn_binary(&args);
    Node { child, client, api: api.parse().unwrap() }
}

impl Node {
    async fn publish(&self, body: Value) -> Value {
        let (status, _, b) =
            http(self.api, "POST", "/v1/publish", bytes::Bytes::from(body.to_string()), None).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn connect(&self, query: &str) -> (Ws, Value) {
        connect_welcomed(&format!("ws://{}/ws?{query}", self.client)).await
    }

    /// SIGTERM (or `signal`), and the exit status.
    fn stop(mut self, signal: &str) -> Option<i32> {
        Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap().code()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_epochs_seqs_history_and_idempotency_keys() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(dir.path(), &[]);
    let (_, w) = n.connect("user=keep").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    for i in 1..=10 {
        n.publish(json!({"user": "keep", "event": "e", "data": {"i": i}, "id": format!("k{i}")})).await;
    }
    assert_eq!(n.stop("-TERM"), Some(0));
    let n = start(dir.path(), &[]);
    let (mut ws, w) = n.connect(&format!("user=keep&since=3&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "{w}");
    assert_eq!(w["epoch"], epoch);
    assert_eq!(w["seq"], 10);
    let evs = next_events(&mut ws, 7).await;
    assert_eq!(
        evs.iter().map(|e| e["data"]["i"].as_u64().unwrap()).collect::<Vec<_>>(),
        (4..=10).collect::<Vec<_>>()
    );
    // The next publish continues the seq; a retried key is still a duplicate.
    assert_eq!(n.publish(json!({"user": "keep", "event": "e", "data": {"i": 11}})).await["seq"], 11);
    let dup = n.publish(json!({"user": "keep", "event": "e", "id": "k5"})).await;
    assert_eq!((dup["seq"].as_u64(), dup["duplicate"].as_bool()), (Some(5), Some(true)));
    // The store's figures (published on the shards' heartbeat, within a second).
    let mut stats = Value::Null;
    for _ in 0..300 {
        let (_, _, body) = http(n.api, "GET", "/v1/stats", bytes::Bytes::new(), None).await;
        stats = serde_json::from_slice(&body).unwrap();
        if stats["store"]["fsyncs"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stats["store"]["fsyncs"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["store"]["bytes"].as_u64().unwrap() > 0, "{stats}");
    // The sync latency is a Prometheus histogram whose count is the syncs done.
    let (_, _, text) = http(n.api, "GET", "/metrics", bytes::Bytes::new(), None).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid metrics");
    let count: f64 = text
        .lines()
        .filter(|l| l.starts_with("switchyard_store_fsync_seconds_count{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(text.contains("switchyard_store_fsync_seconds_bucket{shard=\"0\",le=\"+Inf\"}"), "{text}");
    // Stats read after the scrape: the scrape's figures are a heartbeat old
    // and syncs only grow, so the histogram can never count more.
    let (_, _, later) = http(n.api, "GET", "/v1/stats", bytes::Bytes::new(), None).await;
    let later: Value = serde_json::from_slice(&later).unwrap();
    let fsyncs: u64 =
        later["shards"].as_array().unwrap().iter().map(|s| s["store"]["fsyncs"].as_u64().unwrap()).sum();
    assert!(count >= 1.0 && count <= fsyncs as f64 + 0.5, "histogram count {count} vs {fsyncs} syncs");
    assert_eq!(n.stop("-TERM"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_fsync_always_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    // History deep enough for all a release build publishes before the
    // kill (~1,200 events per user in 700 ms), so resuming from 0 is
    // always possible and only the log decides what comes back.
    const KEEP: &[&str] = &["--history-size", "100000"];
    let n = start(dir.path(), KEEP);
    const USERS: usize = 20;
    let mut epochs = Vec::new();
    for u in 0..USERS {
        epochs.push(n.connect(&format!("user=k{u}")).await.1["epoch"].as_str().unwrap().to_string());
    }
    let url = format!("ws://{}/v1/stream?acks=1", n.api);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    // Publish frames of 10 events until the broker dies; remember every ack.
    let pid = n.child.id();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    });
    let mut acked: Vec<Vec<(u64, u64)>> = vec![Vec::new(); USERS];
    let mut nonce = 0u64;
    'run: loop {
        let items: Vec<(usize, u64)> =
            (0..10).map(|i| ((nonce as usize + i) % USERS, nonce + i as u64)).collect();
        nonce += 10;
        let frame = items
            .iter()
            .map(|(u, k)| json!({"user": format!("k{u}"), "event": "e", "data": k}).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        if tx.send(Message::text(frame)).await.is_err() {
            break;
        }
        loop {
            match tokio::time::timeout(WAIT, rx.next()).await.expect("an ack or the end") {
                Some(Ok(Message::Text(t))) => {
                    let ack: Value = serde_json::from_str(&t).unwrap();
                    for ((u, k), r) in items.iter().zip(ack["results"].as_array().unwrap()) {
                        acked[*u].push((r["seq"].as_u64().unwrap(), *k));
                    }
                    break;
                }
                Some(Ok(_)) => continue,
                _ => break 'run,
            }
        }
    }
    killer.await.unwrap();
    let mut n = n;
    let _ = n.child.wait();
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(total > 100, "the run acknowledged events before the kill ({total})");
    let n = start(dir.path(), KEEP);
    for u in 0..USERS {
        let (mut ws, w) = n.connect(&format!("user=k{u}&since=0&epoch={}", epochs[u])).await;
        assert_eq!(w["recovered"], true, "user k{u}: {w}");
        assert_eq!(w["epoch"], epochs[u], "the epoch is kept: every acked event is on disk");
        let held = w["seq"].as_u64().unwrap() as usize;
        assert!(held >= acked[u].len(), "k{u}: {held} held, {} acked", acked[u].len());
        let evs = next_events(&mut ws, held).await;
        for (seq, k) in &acked[u] {
            let e = &evs[*seq as usize - 1];
            assert_eq!((e["seq"].as_u64(), e["data"].as_u64()), (Some(*seq), Some(*k)), "k{u} seq {seq}");
        }
    }
    assert_eq!(n.stop("-TERM"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_fsync_never_gives_new_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(dir.path(), &["--fsync", "never"]);
    let (_, w) = n.connect("user=nv").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    for i in 0..5 {
        n.publish(json!({"user": "nv", "event": "e", "data": i})).await;
    }
    // A clean stop writes every record; the kill -9 after the restart is the unclean one.
    assert_eq!(n.stop("-TERM"), Some(0));
    let n = start(dir.path(), &["--fsync", "never"]);
    let (_, w) = n.connect(&format!("user=nv&since=5&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "a clean stop keeps the epoch even with --fsync never");
    assert_eq!(n.stop("-KILL"), None);
    let n = start(dir.path(), &["--fsync", "never"]);
    let (_, w) = n.connect(&format!("user=nv&since=5&epoch={epoch}")).await;
    assert_eq!(w["recovered"], false, "after a crash the old epoch cannot be trusted: {w}");
    assert_ne!(w["epoch"], epoch);
    assert_eq!(n.stop("-TERM"), Some(0));
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let shard = dir.join("shard-0");
    let mut segs: Vec<_> = std::fs::read_dir(&shard).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    segs.pop().expect("a segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_or_corrupt_log_tail_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(dir.path(), &["--shards", "1"]);
    let (_, w) = n.connect("user=tt").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    for i in 0..5 {
        n.publish(json!({"user": "tt", "event": "e", "data": i})).await;
    }
    assert_eq!(n.stop("-TERM"), Some(0));
    // A torn tail: half a record after the last good one.
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let good = bytes.len();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&seg, &bytes).unwrap();
    let n = start(dir.path(), &["--shards", "1"]);
    let (mut ws, w) = n.connect(&format!("user=tt&since=2&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "a torn tail was never acknowledged: {w}");
    assert_eq!(next_events(&mut ws, 3).await[2]["data"], 4);
    assert_eq!(n.stop("-TERM"), Some(0));
    let after = std::fs::read(&seg).unwrap();
    assert_ne!(after.get(good..good + 7), Some(&[200u8, 0, 0, 0, 1, 2, 3][..]), "the torn bytes were cut");
    // Corruption inside the log: the broker starts, the damaged user gets a new epoch.
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let n = start(dir.path(), &["--shards", "1"]);
    let (_, w) = n.connect(&format!("user=tt&since=2&epoch={epoch}")).await;
    assert_eq!(w["recovered"], false, "{w}");
    n.publish(json!({"user": "tt", "event": "after", "data": null})).await;
    assert_eq!(n.stop("-TERM"), Some(0));
}

#[test]
fn a_locked_data_dir_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &[]);
    let d = dir.path().display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--data-dir", &d, "--shards", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--data-dir") && err.contains("another running broker"), "{err}");
    // A different shard count than the data was written with is refused too.
    assert_eq!(first.stop("-TERM"), Some(0));
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--data-dir", &d, "--shards", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shards"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_ttl_counts_the_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(dir.path(), &["--history-ttl", "2s"]);
    let (_, w) = n.connect("user=ttl").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    n.publish(json!({"user": "ttl", "event": "e"})).await;
    n.publish(json!({"user": "fresh", "event": "e"})).await;
    assert_eq!(n.stop("-TERM"), Some(0));
    // The downtime itself is what is tested: it outlasts the TTL.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let n = start(dir.path(), &["--history-ttl", "2s"]);
    let (_, w) = n.connect(&format!("user=ttl&since=0&epoch={epoch}")).await;
    assert_eq!(w["recovered"], false, "{w}");
    assert_eq!(w["seq"], 0, "the user's state expired while the broker was down");
    assert_ne!(w["epoch"], epoch);
    assert_eq!(n.stop("-TERM"), Some(0));
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map_or(0, |d| d.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_use_stays_bounded_under_a_long_run_with_a_small_history() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB segments, 20 events per user, a 25 ms housekeeping tick.
    let flags =
        ["--shards", "1", "--history-size", "20", "--segment-size", "64KiB", "--ping-interval", "100ms"];
    let n = start(dir.path(), &flags);
    let pad = "x".repeat(900);
    let mut epochs = std::collections::HashMap::new();
    for u in 0..10 {
        epochs.insert(u, n.connect(&format!("user=d{u}")).await.1["epoch"].as_str().unwrap().to_string());
    }
    // ~4 MiB logged in all: 40 batches of 100 events of ~1 KiB over 10 users.
    for b in 0..40 {
        let items: Vec<String> = (0..100)
            .map(|i| {
                json!({"user": format!("d{}", i % 10), "event": "e", "data": {"b": b, "i": i, "p": pad}})
                    .to_string()
            })
            .collect();
        let (status, _, _) = http(
            n.api,
            "POST",
            "/v1/publish/batch",
            bytes::Bytes::from(format!("[{}]", items.join(","))),
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    // Held: 10 users x 20 events x ~1.1 KiB = ~220 KiB. Reclaimed segments
    // keep the log near that (plus two 64 KiB segments), far below 4 MiB.
    let shard_dir = dir.path().join("shard-0");
    let mut bytes = u64::MAX;
    for _ in 0..500 {
        bytes = dir_bytes(&shard_dir);
        if bytes < 1024 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(bytes < 1024 * 1024, "log bounded: {bytes} bytes for ~4 MiB published");
    assert_eq!(n.stop("-TERM"), Some(0));
    // Nothing held was lost by reclaiming: every user resumes its last 20 events.
    let n = start(dir.path(), &flags);
    for u in 0..10 {
        let (mut ws, w) = n.connect(&format!("user=d{u}&since=380&epoch={}", epochs[&u])).await;
        assert_eq!((w["recovered"].as_bool(), w["seq"].as_u64()), (Some(true), Some(400)), "d{u}: {w}");
        let evs = next_events(&mut ws, 20).await;
        assert_eq!(evs[19]["data"]["b"], 39);
        assert_eq!(evs[0]["seq"], 381);
    }
    assert_eq!(n.stop("-TERM"), Some(0));
}

// The failpoint exists only in builds with debug assertions, and the
// broker binary is built with the same profile as this test: in a release
// build the broker would never die and the test would wait forever.
#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_answered_or_delivered_before_its_sync() {
    // A test-build failpoint kills the broker after a batch is written and
    // before it is synced: the event in it must not have been answered nor
    // delivered, while every event answered before it survives the restart.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
            &d,
            "--shards",
            "1",
        ])
        .env("SWITCHYARD_FAILPOINT", "kill-before-fsync")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["fields"]["message"] == "switchyard listening" {
                    let _ = tx.send((
                        v["fields"]["client"].as_str().unwrap().to_string(),
                        v["fields"]["api"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    });
    let (client, api) = rx.recv_timeout(WAIT).unwrap();
    let n = Node { child, client, api: api.parse().unwrap() };
    let (mut ws, w) = n.connect("user=fp").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    for i in 1..=3 {
        assert_eq!(n.publish(json!({"user": "fp", "event": "e", "data": i})).await["seq"], i);
    }
    assert_eq!(next_events(&mut ws, 3).await[2]["data"], 3);
    let body = json!({"user": "fp", "event": "e", "data": "failpoint:kill-before-fsync"}).to_string();
    let api_addr = n.api;
    let answer = tokio::spawn(async move {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let req = hyper::Request::post(format!("http://{api_addr}/v1/publish"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        tokio::time::timeout(WAIT, client.request(req))
            .await
            .expect("answered or failed in time")
            .map(|r| r.status().as_u16())
    });
    let mut n = n;
    let status = n.child.wait().unwrap();
    assert!(!status.success(), "the failpoint killed the broker");
    assert!(answer.await.unwrap().is_err(), "the publish in the unsynced batch was never answered");
    // The client was never sent it: its stream ends with nothing after event 3.
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("the socket ends") {
            Some(Ok(Message::Text(t))) => panic!("delivered before its sync: {t}"),
            Some(Ok(_)) => continue,
            _ => break,
        }
    }
    // Every answered event is there after the restart.
    let n = start(dir.path(), &["--shards", "1"]);
    let (mut ws, w) = n.connect(&format!("user=fp&since=0&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "{w}");
    let evs = next_events(&mut ws, 3).await;
    assert_eq!(evs.iter().map(|e| e["data"].clone()).collect::<Vec<_>>(), vec![json!(1), json!(2), json!(3)]);
    assert_eq!(n.stop("-TERM"), Some(0));
}
