//! Cluster mode (contract §11) against real `redis-server` processes and
//! real switchyard nodes (the binary), all on loopback: cross-node order
//! and isolation, resume on another node, the cluster-wide connection
//! limit, delete, broadcast and idempotency, Redis stopped and restarted,
//! Redis flushed, a node killed with `kill -9`, and a Redis Cluster.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::redis_util::{free_port, resp_cmd, Redis};
use crate::util::*;

/// One switchyard node.
pub struct Node {
    child: Option<Child>,
    pub client: String,
    pub api: std::net::SocketAddr,
}

impl Node {
    pub fn start(url: &str, extra: &[&str]) -> Node {
        Self::start_env(url, extra, &[])
    }

    /// [`Node::start`] with extra environment variables.
    pub fn start_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut args = vec!["--cluster", url, "--shards", "2"];
        args.extend_from_slice(extra);
        let mut cmd = loopback_broker(&args);
        cmd.envs(env.iter().copied());
        let (child, client, api) = spawn_logged(cmd);
        let node = Node { child: Some(child), client, api: api.parse().unwrap() };
        node.wait_ready_blocking();
        node
    }

    /// Waits (bounded) until `/readyz` says 200: Redis reached by commands and Pub/Sub.
    fn wait_ready_blocking(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + WAIT;
        loop {
            let mut s = std::net::TcpStream::connect(&self.client).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(Instant::now() < deadline, "node never became ready: {buf}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn publish(&self, body: Value) -> (u16, Value) {
        let (status, _, b) =
            http(self.api, "POST", "/v1/publish", bytes::Bytes::from(body.to_string()), None).await;
        (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    pub async fn publish_ok(&self, user: &str, i: u64) -> Value {
        let (status, v) = self.publish(json!({"user": user, "event": "e", "data": {"i": i}})).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    pub async fn request(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let (status, _, b) = http(self.api, method, path, bytes::Bytes::from(body.to_string()), None).await;
        (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// Connects (waiting for the node to be ready) and returns the welcome.
    pub async fn connect(&self, query: &str) -> (Ws, Value) {
        self.wait_ready().await;
        connect_welcomed(&format!("ws://{}/ws?{query}", self.client)).await
    }

    /// Connects as a client does after a 1012: a connection closed with 1012
    /// before its welcome (the node is still renewing the user's epoch) is
    /// tried again, a bounded number of times. Returns the welcome.
    pub async fn resume_after_1012(&self, query: &str) -> Value {
        self.wait_ready().await;
        for _ in 0..100 {
            let url = format!("ws://{}/ws?{query}", self.client);
            let (mut ws, _) =
                tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
            match tokio::time::timeout(WAIT, ws.next()).await.expect("a first frame in time") {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    let w: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(w["type"], "welcome", "{w}");
                    return w;
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))))
                    if u16::from(f.code) == 1012 =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("expected a welcome or a 1012 close, got {other:?}"),
            }
        }
        panic!("still closed with 1012 after 100 tries");
    }

    pub async fn readyz(&self) -> u16 {
        let addr: std::net::SocketAddr = self.client.parse().unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    pub async fn healthz(&self) -> u16 {
        let (status, _) = raw_get(&self.client, "/healthz").await;
        status
    }

    /// Waits (bounded) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while self.readyz().await != 200 {
            assert!(Instant::now() < deadline, "node never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn raw_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), text)
}

/// A Redis and two nodes on it.
async fn redis_and_two_nodes() -> (Redis, Node, Node) {
    let redis = Redis::start().await;
    let (a, b) = (Node::start(&redis.url(), &[]), Node::start(&redis.url(), &[]));
    (redis, a, b)
}

/// Connects `user` on `on`, publishes events 1..=n through `via` and reads
/// them; returns the socket and the user's epoch.
async fn seeded(on: &Node, via: &Node, user: &str, n: u64) -> (Ws, String) {
    let (mut ws, w) = on.connect(&format!("user={user}")).await;
    for i in 1..=n {
        via.publish_ok(user, i).await;
    }
    assert_eq!(seqs(&next_events(&mut ws, n as usize).await), (1..=n).collect::<Vec<_>>());
    (ws, w["epoch"].as_str().unwrap().to_string())
}

fn data_i(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["data"]["i"].as_u64().unwrap()).collect()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_on_one_node_reach_the_users_connections_on_every_node_in_order_and_no_one_else() {
    let redis = Redis::start().await;
    let (a, b) = (Node::start(&redis.url(), &[]), Node::start(&redis.url(), &[]));
    let (mut on_a, _) = a.connect("user=alice").await;
    let (mut on_b, _) = b.connect("user=alice").await;
    let (mut bob, _) = b.connect("user=bob").await;
    for i in 1..=100 {
        let node = if i % 2 == 0 { &a } else { &b };
        let r = node.publish_ok("alice", i).await;
        assert_eq!(r["seq"], i, "seq is assigned cluster-wide: {r}");
        assert_eq!(r["delivered"], 2, "both nodes hold a connection of alice: {r}");
    }
    b.publish_ok("bob", 1000).await;
    for ws in [&mut on_a, &mut on_b] {
        let evs = next_events(ws, 100).await;
        assert_eq!(data_i(&evs), (1..=100).collect::<Vec<_>>());
        assert_eq!(seqs(&evs), (1..=100).collect::<Vec<_>>());
    }
    let evs = next_events(&mut bob, 1).await;
    assert_eq!(data_i(&evs), vec![1000], "bob gets only his own event");
    // And alice got nothing of bob's: her next event is her own 101st.
    a.publish_ok("alice", 101).await;
    assert_eq!(data_i(&next_events(&mut on_b, 1).await), vec![101]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_from_the_history_in_redis() {
    let redis = Redis::start().await;
    let (a, b) = (Node::start(&redis.url(), &[]), Node::start(&redis.url(), &[]));
    let (mut ws, w) = a.connect("user=carol").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    for i in 1..=5 {
        a.publish_ok("carol", i).await;
    }
    assert_eq!(data_i(&next_events(&mut ws, 5).await), vec![1, 2, 3, 4, 5]);
    drop(ws);
    for i in 6..=10 {
        a.publish_ok("carol", i).await;
    }
    let (mut ws, w) = b.connect(&format!("user=carol&since=5&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "{w}");
    assert_eq!(w["epoch"], epoch.as_str());
    assert_eq!(w["seq"], 10);
    assert_eq!(data_i(&next_events(&mut ws, 5).await), vec![6, 7, 8, 9, 10]);
    a.publish_ok("carol", 11).await;
    assert_eq!(seqs(&next_events(&mut ws, 1).await), vec![11], "live after the replay, no gap");
    // A wrong epoch is not recovered.
    let (_, w) = b.connect("user=carol&since=5&epoch=nope").await;
    assert_eq!(w["recovered"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_delete_broadcast_and_idempotency_hold_across_nodes() {
    let redis = Redis::start().await;
    let a = Node::start(&redis.url(), &["--max-conns-per-user", "2"]);
    let b = Node::start(&redis.url(), &["--max-conns-per-user", "2"]);
    let (mut first, _) = a.connect("user=dave").await;
    let (mut second, _) = b.connect("user=dave").await;
    let (mut third, _) = a.connect("user=dave").await;
    assert_eq!(close_code(&mut first).await, 4001, "the oldest connection, anywhere, is evicted");
    let (status, info) = b.request("GET", "/v1/users/dave", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(info["connections"], 2, "{info}");

    // Idempotency: the same id through two nodes is one event.
    let (s1, r1) = a.publish(json!({"user": "dave", "event": "e", "data": {"i": 1}, "id": "once"})).await;
    let (s2, r2) = b.publish(json!({"user": "dave", "event": "e", "data": {"i": 1}, "id": "once"})).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(r2["seq"], r1["seq"]);
    assert_eq!(r2["duplicate"], true, "{r2}");

    // Broadcast: every node answers; a user on two nodes gets it once per connection, one seq.
    let (mut erin, _) = b.connect("user=erin").await;
    let (status, r) = a.request("POST", "/v1/broadcast", json!({"event": "all", "data": {"i": 99}})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["nodes"], 2, "{r}");
    let e_second = next_events(&mut second, 2).await;
    let e_third = next_events(&mut third, 2).await;
    assert_eq!(data_i(&e_second), vec![1, 99]);
    assert_eq!(seqs(&e_second), seqs(&e_third), "one seq for the broadcast across dave's nodes");
    assert_eq!(data_i(&next_events(&mut erin, 1).await), vec![99]);
    let (_, info) = a.request("GET", "/v1/users/dave", Value::Null).await;
    assert_eq!(info["seq"], 2, "the broadcast took one seq for dave, not one per node: {info}");

    // Delete on one node closes the user's connections on both.
    let (status, r) = b.request("DELETE", "/v1/users/dave", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(r["closed"], 2, "{r}");
    assert_eq!(close_code(&mut second).await, 4000);
    assert_eq!(close_code(&mut third).await, 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_publishes_and_upgrades_get_503_live_connections_stay_and_nothing_is_missed_after()
{
    let (mut redis, a, b) = redis_and_two_nodes().await;
    let (mut ws, _) = seeded(&a, &b, "fay", 5).await;

    redis.stop();
    let deadline = Instant::now() + WAIT;
    let (status, headers, body) = loop {
        let r = http(
            b.api,
            "POST",
            "/v1/publish",
            json!({"user": "fay", "event": "e", "data": {"i": 0}}).to_string().into(),
            None,
        )
        .await;
        if r.0 == 503 || Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(status, 503);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "engine_unavailable", "{v}");
    assert!(headers.contains_key("retry-after"));
    let deadline = Instant::now() + WAIT;
    while a.readyz().await != 503 {
        assert!(Instant::now() < deadline, "/readyz never said 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.healthz().await, 200, "/healthz stays 200: the process is alive");
    let (status, body) = raw_upgrade(a.client.parse().unwrap(), "/ws?user=gil", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("engine_unavailable"), "{body}");

    redis.restart().await;
    a.wait_ready().await;
    b.wait_ready().await;
    for i in 6..=10 {
        // Until the node's command link has reconnected, 503s are expected: retry with the same id.
        let deadline = Instant::now() + WAIT;
        loop {
            let (s, v) = b
                .publish(json!({"user": "fay", "event": "e", "data": {"i": i}, "id": format!("f{i}")}))
                .await;
            if s == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "publishes never came back: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let evs = next_events(&mut ws, 5).await;
    assert_eq!(data_i(&evs), vec![6, 7, 8, 9, 10], "the live connection survived, with no gap");
    assert_eq!(seqs(&evs), vec![6, 7, 8, 9, 10], "AOF kept the seq across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_its_data_users_get_a_new_epoch_and_no_epoch_seq_pair_repeats() {
    let (redis, a, b) = redis_and_two_nodes().await;
    let (mut ws, old_epoch) = seeded(&a, &b, "hal", 3).await;
    assert!(redis.cmd(&["FLUSHALL"]).await.starts_with("+OK"));
    let r = b.publish_ok("hal", 4).await;
    assert_eq!(r["seq"], 1, "a lost state starts over at seq 1: {r}");
    assert_eq!(close_code(&mut ws).await, 1012, "the old-epoch connection is closed so its client resumes");
    let (mut ws, w) = b.connect(&format!("user=hal&since=3&epoch={old_epoch}")).await;
    assert_eq!(w["recovered"], false, "{w}");
    let new_epoch = w["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(w["seq"], 1);
    b.publish_ok("hal", 5).await;
    let e = next_events(&mut ws, 1).await;
    assert_eq!((seqs(&e), data_i(&e)), (vec![2], vec![5]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_loses_nothing_acknowledged_its_clients_resume_elsewhere() {
    let redis = Redis::start().await;
    let mut a = Node::start(&redis.url(), &[]);
    let b = Node::start(&redis.url(), &[]);
    let (mut on_a, w) = a.connect("user=ivy").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    let mut acked = Vec::new();
    let mut seen = Vec::new();
    for i in 1..=200u64 {
        if i == 100 {
            // Read what arrived so far, then kill the node the client is on.
            seen.extend(seqs(&next_events(&mut on_a, acked.len()).await));
            a.kill9();
        }
        let node = if i < 100 && i % 2 == 0 { &a } else { &b };
        let (s, v) = node.publish(json!({"user": "ivy", "event": "e", "data": {"i": i}})).await;
        if s == 200 {
            acked.push(v["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(acked.len(), 200, "every publish went to a live node");
    let last = *seen.last().unwrap();
    let (mut ws, w) = b.connect(&format!("user=ivy&since={last}&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "{w}");
    let rest = next_events(&mut ws, 200 - seen.len()).await;
    seen.extend(seqs(&rest));
    assert_eq!(seen, acked, "every acknowledged event exactly once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_masters_serves_two_nodes() {
    let mut masters = Vec::new();
    for _ in 0..3 {
        masters
            .push(Redis::start_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]).await);
    }
    let addrs: Vec<String> = masters.iter().map(|r| format!("127.0.0.1:{}", r.port)).collect();
    let status = Command::new(std::env::var("SWITCHYARD_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into()))
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("redis-cli");
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    loop {
        let info = resp_cmd(masters[0].port, &["CLUSTER", "INFO"]).await.unwrap_or_default();
        if info.contains("cluster_state:ok") {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster never became ok: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("redis+cluster://{}", addrs.join(","));
    let (a, b) = (Node::start(&url, &[]), Node::start(&url, &[]));
    let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let mut conns = Vec::new();
    for u in users {
        let (ws, w) = b.connect(&format!("user={u}")).await;
        conns.push((ws, w["epoch"].as_str().unwrap().to_string()));
    }
    for i in 1..=20 {
        for u in users {
            a.publish_ok(u, i).await;
        }
    }
    for (ws, _) in conns.iter_mut() {
        assert_eq!(data_i(&next_events(ws, 20).await), (1..=20).collect::<Vec<_>>());
    }
    // Resume on the other node, from history spread over the cluster's slots.
    let epoch = conns[0].1.clone();
    let (mut ws, w) = a.connect(&format!("user=u1&since=15&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true, "{w}");
    assert_eq!(seqs(&next_events(&mut ws, 5).await), vec![16, 17, 18, 19, 20]);
    let _ = free_port();
    drop(ws.next());
}

/// Runs Debian's `promtool check metrics` (or `$SWITCHYARD_PROMTOOL`) on an exposition.
fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(std::env::var("SWITCHYARD_PROMTOOL").unwrap_or_else(|_| "promtool".into()))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (install Debian's prometheus or set SWITCHYARD_PROMTOOL)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_histograms_labelled_by_node_that_add_up_across_nodes_and_pass_promtool() {
    let redis = Redis::start().await;
    let a = Node::start(&redis.url(), &["--node-id", "node-a"]);
    let b = Node::start(&redis.url(), &["--node-id", "node-b"]);
    let (mut on_a, _) = a.connect("user=mia").await;
    let (mut on_b, _) = b.connect("user=mia").await;
    for i in 1..=50 {
        a.publish_ok("mia", i).await;
    }
    next_events(&mut on_a, 50).await;
    next_events(&mut on_b, 50).await;
    // Sum the latency counts over both nodes once both shards have published their figures.
    let count = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("switchyard_latency_seconds_count{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + WAIT;
    let (text_a, text_b) = loop {
        let (_, _, ta) = http(a.api, "GET", "/metrics", bytes::Bytes::new(), None).await;
        let (_, _, tb) = http(b.api, "GET", "/metrics", bytes::Bytes::new(), None).await;
        let (ta, tb) = (String::from_utf8(ta.to_vec()).unwrap(), String::from_utf8(tb.to_vec()).unwrap());
        if count(&ta) + count(&tb) >= 100.0 || Instant::now() > deadline {
            break (ta, tb);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(count(&text_a) + count(&text_b), 100.0, "50 events × 2 nodes' connections");
    for (text, node) in [(&text_a, "node-a"), (&text_b, "node-b")] {
        let (ok, report) = promtool_check(text);
        assert!(ok, "promtool check metrics: {report}");
        assert!(text.contains("# TYPE switchyard_latency_seconds histogram"));
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.contains(&format!("node=\"{node}\"")), "every sample names its node: {line}");
        }
        // Buckets are cumulative and end at the count.
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_latency_seconds_bucket{") && l.contains("priority=\"normal\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(buckets.last().copied(), Some(50.0));
        assert!(text.contains("switchyard_cluster_nodes_seen{"), "cluster figures are exported");
    }
}

/// Makes Redis forget a user's last `n` events the way a crash under
/// `appendfsync everysec` can: the seq counter and the stream go back.
async fn lose_last_events(redis: &Redis, user: &str, seq: u64, n: u64) {
    let meta = format!("sy:{{{user}}}:m");
    let stream = format!("sy:{{{user}}}:s");
    assert!(redis.cmd(&["HSET", &meta, "s", &(seq - n).to_string()]).await.starts_with(':'));
    for q in seq - n + 1..=seq {
        redis.cmd(&["XDEL", &stream, &format!("{q}-0")]).await;
    }
    let top = format!("{}-0", seq - n);
    assert!(redis.cmd(&["XSETID", &stream, &top]).await.starts_with("+OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_acknowledged_writes_the_user_gets_a_new_epoch_instead_of_reused_seqs() {
    let (redis, a, b) = redis_and_two_nodes().await;
    // A node that delivered seqs Redis no longer has notices the reassigned seq.
    let (mut ws, old) = seeded(&a, &b, "kim", 5).await;
    lose_last_events(&redis, "kim", 5, 2).await;
    let r = b.publish_ok("kim", 6).await;
    assert_eq!(r["seq"], 4, "Redis reassigned seq 4: {r}");
    assert_eq!(close_code(&mut ws).await, 1012, "the node saw a different event at seq 4");
    let w = a.resume_after_1012(&format!("user=kim&since=5&epoch={old}")).await;
    assert_eq!(w["recovered"], false, "{w}");
    assert_ne!(w["epoch"], old.as_str(), "a new epoch, so no (epoch, seq) is reused");

    // A client that saw seqs Redis no longer has, resuming on a node with no copy.
    let (ws, old) = seeded(&b, &b, "lou", 5).await;
    drop(ws);
    lose_last_events(&redis, "lou", 5, 2).await;
    // Wait until b has dropped lou's copy (its last connection closed).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, st) = b.request("GET", "/v1/stats", Value::Null).await;
        if st["users"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = a.client.clone();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?user=lou&since=5&epoch={old}"))
            .await
            .expect("upgrade");
    assert_eq!(close_code(&mut ws).await, 1012, "the client is ahead of Redis: resume");
    let w = a.resume_after_1012(&format!("user=lou&since=5&epoch={old}")).await;
    assert_eq!(w["recovered"], false, "{w}");
    assert_ne!(w["epoch"], old.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_pubsub_connection_fills_the_gap_from_history_without_closing_anyone() {
    let redis = Redis::start().await;
    let a = Node::start(&redis.url(), &["--node-id", "gap-a"]);
    let b = Node::start(&redis.url(), &["--node-id", "gap-b"]);
    let (mut ws, _) = a.connect("user=nia").await;
    b.publish_ok("nia", 1).await;
    assert_eq!(seqs(&next_events(&mut ws, 1).await), vec![1]);
    // Cut every Pub/Sub connection (node a's included). Events 2..=15 then
    // reach Redis with no Pub/Sub message at all (as if published while the
    // connection was gone), so node a can only get them from the stream —
    // by its catch-up after resubscribing, or by the gap event 16 shows,
    // whichever comes first — and 16..=30 are published as usual.
    assert!(redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await.starts_with(':'));
    for i in 2..=15 {
        assert_eq!(append_silently(&redis, "nia", i).await, i);
    }
    for i in 16..=30 {
        b.publish_ok("nia", i).await;
    }
    let evs = next_events(&mut ws, 29).await;
    assert_eq!(seqs(&evs), (2..=30).collect::<Vec<_>>(), "in order, none missing, none twice");
    assert_eq!(data_i(&evs), (2..=30).collect::<Vec<_>>());
    // Live again after the catch-up.
    b.publish_ok("nia", 31).await;
    assert_eq!(seqs(&next_events(&mut ws, 1).await), vec![31]);
    let (_, st) = a.request("GET", "/v1/stats", Value::Null).await;
    assert_eq!(st["cluster"]["node"], "gap-a", "{st}");
    assert_eq!(st["cluster"]["resync_closed"], 0, "nobody was closed: {st}");
    assert!(st["cluster"]["catch_ups"].as_u64().unwrap() >= 1, "the gap was read from history: {st}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, st) = a.request("GET", "/v1/stats", Value::Null).await;
        if st["cluster"]["nodes_seen"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "node a never saw node b: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Appends an event to a user's history in Redis the way the publish
/// script does, but without its Pub/Sub message (as if that were lost).
async fn append_silently(redis: &Redis, user: &str, i: u64) -> u64 {
    let meta = format!("sy:{{{user}}}:m");
    let stream = format!("sy:{{{user}}}:s");
    let reply = redis.cmd(&["HINCRBY", &meta, "s", "1"]).await;
    let seq: u64 = reply.trim().trim_start_matches(':').parse().expect("HINCRBY answers a number");
    let body = format!(r#"{{"type":"event","seq":{seq},"event":"lost","data":{{"i":{i}}},"ts":0}}"#);
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let id = format!("{seq}-0");
    let r = redis.cmd(&["XADD", &stream, &id, "p", "normal", "t", &at.to_string(), "b", &body]).await;
    assert!(r.starts_with('$'), "XADD: {r}");
    seq
}

/// A live connection must get the events a gap read finds, not only have
/// them stored: found by `scripts/cluster-smoke` under churn, where a
/// connection's read of the stream could overtake the Pub/Sub messages of
/// the same events, which were then dropped as already applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_gap_read_finds_reach_the_users_live_connections_in_order() {
    let (redis, a, b) = redis_and_two_nodes().await;
    let (mut ws, _) = seeded(&a, &b, "ola", 2).await;
    let (mut other, _) = a.connect("user=ola").await;
    assert_eq!(append_silently(&redis, "ola", 3).await, 3);
    assert_eq!(append_silently(&redis, "ola", 4).await, 4);
    // Seq 5's message is ahead of what node a applied: a gap, read from Redis.
    assert_eq!(b.publish_ok("ola", 5).await["seq"], 5);
    for conn in [&mut ws, &mut other] {
        let evs = next_events(conn, 3).await;
        assert_eq!(seqs(&evs), vec![3, 4, 5], "in order, none missing");
        assert_eq!(data_i(&evs), vec![3, 4, 5]);
    }
    // Live again, nothing twice.
    b.publish_ok("ola", 6).await;
    assert_eq!(seqs(&next_events(&mut ws, 1).await), vec![6]);
    let (_, st) = a.request("GET", "/v1/stats", Value::Null).await;
    assert_eq!(st["cluster"]["resync_closed"], 0, "nobody was closed: {st}");
}

/// `rediss://`: nodes reach Redis on its TLS port and verify its
/// certificate against the trust store (here `SSL_CERT_FILE` names the
/// test's self-signed certificate, as a deployment would name its CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_talks_to_redis_over_tls() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let tls_port = free_port().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &cert,
        "--tls-auth-clients",
        "no",
    ])
    .await;
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let env = [("SSL_CERT_FILE", cert.as_str())];
    let (a, b) = (Node::start_env(&url, &[], &env), Node::start_env(&url, &[], &env));
    let (mut ws, _) = a.connect("user=tls").await;
    for i in 1..=3 {
        b.publish_ok("tls", i).await;
    }
    assert_eq!(data_i(&next_events(&mut ws, 3).await), vec![1, 2, 3]);
    // The nodes' connections are all on the TLS port; only this one is plain.
    let clients = redis.cmd(&["CLIENT", "LIST"]).await;
    let on = |port: &str| clients.matches(&format!("laddr=127.0.0.1:{port} ")).count();
    assert!(on(&tls_port) >= 4, "two nodes' command and Pub/Sub connections: {clients}");
    assert_eq!(on(&redis.port.to_string()), 1, "{clients}");
}
