//! Robustness regressions (issue 14): the API listener defends itself,
//! publishes are idempotent, history is sized for token streams and bounded
//! in memory, replays bypass the live queue, queues are bounded in bytes,
//! big batches are applied in steps, epochs are random, and shutdown loses
//! nothing accepted. Each test ends by showing a well-behaved client is
//! still served.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

/// A publish and a client both work.
async fn still_serving(b: &TestBroker) {
    let (mut ws, _) = b.connect("bystander").await;
    let r = b.publish("bystander", "ping", json!(1)).await;
    let ev = next_events(&mut ws, 1).await;
    assert_eq!(ev[0]["seq"], r["seq"]);
}

/// Reads until EOF; returns what arrived and how long it took.
async fn read_until_closed(s: &mut TcpStream) -> (String, Duration) {
    let t0 = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the broker closes the socket in time")
        .ok();
    (String::from_utf8_lossy(&buf).into_owned(), t0.elapsed())
}

async fn publisher_stream(b: &TestBroker, query: &str) -> Ws {
    let url = format!("ws://{}/v1/stream{}", b.api, query);
    let req = url.into_client_request().unwrap();
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await.unwrap().unwrap();
    ws
}

/// A masked client frame with an explicit FIN bit and opcode.
fn fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = masked_frame(opcode, payload);
    if !fin {
        f[0] &= 0x7f;
    }
    f
}

#[tokio::test]
async fn regression_api_half_sent_head_is_closed_at_the_handshake_timeout() {
    let b = TestBroker::with(|c| c.handshake_timeout = Duration::from_millis(300));
    let mut s = TcpStream::connect(b.api).await.unwrap();
    s.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let (_, took) = read_until_closed(&mut s).await;
    assert!(took >= Duration::from_millis(250), "not before the timeout: {took:?}");
    // A socket that never sends a byte is closed the same way.
    let mut silent = TcpStream::connect(b.api).await.unwrap();
    read_until_closed(&mut silent).await;
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_idle_api_keepalive_is_closed_at_the_idle_timeout() {
    let b = TestBroker::with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(400);
    });
    let mut s = TcpStream::connect(b.api).await.unwrap();
    s.write_all(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (resp, took) = read_until_closed(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(took >= Duration::from_millis(350), "kept alive until idle: {took:?}");
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_api_connections_are_capped_with_503() {
    let b = TestBroker::with(|c| c.api_max_connections = 4);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(b.api).await.unwrap());
    }
    // Give the listener time to accept the four (each takes a slot at accept).
    let mut refused = None;
    for _ in 0..100 {
        let mut extra = TcpStream::connect(b.api).await.unwrap();
        let (resp, _) = read_until_closed(&mut extra).await;
        if resp.starts_with("HTTP/1.1 503") {
            refused = Some(resp);
            break;
        }
    }
    let resp = refused.expect("a connection over the cap is refused");
    assert!(resp.contains("too_many_connections"), "{resp}");
    assert!(resp.contains("Retry-After"), "{resp}");
    drop(held);
    // Slots come back as the held sockets close (until then a new socket
    // may still be refused: raw requests, so a refusal is not an error here).
    let mut ok = false;
    for _ in 0..200 {
        let mut s = TcpStream::connect(b.api).await.unwrap();
        let _ = s.write_all(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let (resp, _) = read_until_closed(&mut s).await;
        if resp.starts_with("HTTP/1.1 200") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "served again once the held connections closed");
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_requests_with_an_origin_are_refused_without_an_api_key() {
    let b = TestBroker::start();
    let mut s = TcpStream::connect(b.api).await.unwrap();
    let body = r#"{"user":"victim","event":"e"}"#;
    let req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (resp, _) = read_until_closed(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("forbidden_origin"), "{resp}");
    let (_, user) = b.get("/v1/users/victim").await;
    assert_eq!(user["seq"], 0, "nothing was published");
    still_serving(&b).await;
    b.stop().await;

    // With a key, the key is the credential: a page that has it may publish.
    let b = TestBroker::with(|c| c.api_key = Some("k".into()));
    let mut s = TcpStream::connect(b.api).await.unwrap();
    let req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nOrigin: https://ops.example\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (resp, _) = read_until_closed(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    b.stop().await;
}

#[tokio::test]
async fn regression_fragmented_stream_message_over_the_cap_closes_1009_and_applies_nothing() {
    // Cap: 1,000 × --max-payload = 100,000 bytes, fragments included.
    let b = TestBroker::with(|c| c.max_payload = 100);
    let line = format!("{}\n", json!({"user": "frag", "event": "e", "data": "x".repeat(40)}));
    let chunk = line.repeat(40_000 / line.len());
    // Each fragment is under the cap; together they are over it.
    let mut s = TcpStream::connect(b.api).await.unwrap();
    s.write_all(STREAM_UPGRADE).await.unwrap();
    s.write_all(&fragment(false, 0x1, chunk.as_bytes())).await.unwrap();
    s.write_all(&fragment(false, 0x0, chunk.as_bytes())).await.unwrap();
    s.write_all(&fragment(true, 0x0, chunk.as_bytes())).await.unwrap();
    assert_eq!(raw_close_code(s).await, Some(1009));
    let (_, user) = b.get("/v1/users/frag").await;
    assert_eq!(user["seq"], 0, "none of the message was applied");

    // More than 1,000 items in one message also closes with 1009.
    let mut ws = publisher_stream(&b, "?acks=1").await;
    let small = format!("{}\n", json!({"user": "many", "event": "e"}));
    ws.send(Message::text(small.repeat(1001))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);
    let (_, user) = b.get("/v1/users/many").await;
    assert_eq!(user["seq"], 0);
    still_serving(&b).await;
    b.stop().await;
}

/// A raw upgrade request for the publisher stream.
const STREAM_UPGRADE: &[u8] = b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn regression_idle_publisher_stream_is_pinged_then_closed_4002() {
    let b = TestBroker::with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(500);
    });
    // A publisher that answers pings (tungstenite does, while read) stays.
    let mut live = publisher_stream(&b, "?acks=1").await;
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(900) {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout(Duration::from_millis(50), live.next()).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 3, "server pings the publisher ({pings})");
    live.send(Message::text(json!({"user": "alive", "event": "e"}).to_string())).await.unwrap();
    assert_eq!(next_json(&mut live).await["type"], "ack");
    // A publisher that sends nothing, not even pongs, is closed with 4002.
    let mut s = TcpStream::connect(b.api).await.unwrap();
    s.write_all(STREAM_UPGRADE).await.unwrap();
    assert_eq!(raw_close_code(s).await, Some(4002));
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_a_retried_publish_with_an_id_is_applied_once() {
    let b = TestBroker::start();
    let (mut ws, _) = b.connect("idem").await;
    let body = json!({"user": "idem", "event": "e", "data": 1, "id": "req-1"}).to_string();
    let (s1, r1) = b.post("/v1/publish", body.clone()).await;
    assert_eq!((s1, r1["seq"].as_u64(), r1.get("duplicate")), (200, Some(1), None));
    // The retry, whatever its content: same seq, flagged, not published.
    let retry = json!({"user": "idem", "event": "other", "data": 2, "id": "req-1"}).to_string();
    let (s2, r2) = b.post("/v1/publish", retry).await;
    assert_eq!((s2, r2["seq"].as_u64(), r2["duplicate"].as_bool()), (200, Some(1), Some(true)));
    // In a batch, and on the stream with acks, the same key is a duplicate too.
    let batch = format!(
        "[{},{},{}]",
        json!({"user": "idem", "event": "e", "id": "req-1"}),
        json!({"user": "idem", "event": "e", "id": "req-2"}),
        json!({"user": "idem", "event": "e", "id": "req-2"})
    );
    let (_, br) = b.post("/v1/publish/batch", batch).await;
    let seqs: Vec<_> = br["results"].as_array().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 2]);
    assert_eq!(br["results"][0]["duplicate"], true);
    assert_eq!(br["results"][1].get("duplicate"), None);
    assert_eq!(br["results"][2]["duplicate"], true);
    let mut st = publisher_stream(&b, "?acks=1").await;
    st.send(Message::text(json!({"user": "idem", "event": "e", "id": "req-2"}).to_string())).await.unwrap();
    let ack = next_json(&mut st).await;
    assert_eq!(ack["results"][0]["seq"], 2);
    assert_eq!(ack["results"][0]["duplicate"], true);
    // The same key for another user is that user's own.
    let (_, other) =
        b.post("/v1/publish", json!({"user": "idem2", "event": "e", "id": "req-1"}).to_string()).await;
    assert_eq!(other.get("duplicate"), None);
    // A bad key is a 400 naming it.
    let (s, e) =
        b.post("/v1/publish", json!({"user": "idem", "event": "e", "id": "no spaces"}).to_string()).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("invalid_id")));
    // The client saw exactly two events.
    b.publish("idem", "marker", json!(null)).await;
    let evs = next_events(&mut ws, 3).await;
    assert_eq!(evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(evs[2]["event"], "marker");
    still_serving(&b).await;
    b.stop().await;
}

async fn publish_batch_to(b: &TestBroker, user: &str, n: usize, pad: usize) {
    let items: Vec<String> = (0..n)
        .map(|i| json!({"user": user, "event": "tok", "data": {"i": i, "p": "x".repeat(pad)}}).to_string())
        .collect();
    let (s, r) = b.post("/v1/publish/batch", format!("[{}]", items.join(","))).await;
    assert_eq!(s, 200, "{r}");
}

#[tokio::test]
async fn regression_default_history_survives_a_two_second_token_stream_gap() {
    // Defaults: 1,024 events. At ~100 small events a second, a client that
    // misses 10 seconds can still resume exactly (128 events could not).
    let b = TestBroker::start();
    let (ws, welcome) = b.connect("tokens").await;
    drop(ws);
    publish_batch_to(&b, "tokens", 1000, 20).await;
    let (mut ws, w) =
        b.connect_query(&format!("user=tokens&since=0&epoch={}", welcome["epoch"].as_str().unwrap())).await;
    assert_eq!(w["recovered"], true);
    let evs = next_events(&mut ws, 1000).await;
    assert_eq!(
        evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<_>>()
    );
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_history_bytes_and_memory_bound_what_is_held() {
    let b = TestBroker::with(|c| {
        c.shards = 1;
        c.history_bytes = 64 * 1024;
        c.history_memory = 256 * 1024;
    });
    // Per user: 64 KiB of ~1 KiB events holds far fewer than --history-size.
    publish_batch_to(&b, "bytes", 200, 1000).await;
    let (_, info) = b.get("/v1/users/bytes").await;
    let held = info["history"].as_u64().unwrap();
    assert!(held > 20 && held < 64, "history held by bytes: {info}");
    assert!(info["history_bytes"].as_u64().unwrap() <= 64 * 1024, "{info}");
    let (_, w) = b.connect_query("user=bytes&since=0").await;
    assert_eq!(w["recovered"], false, "seq 1 has left the history");
    // Across users: 256 KiB in all; eight users with ~55 KiB each evict the
    // oldest users' events first.
    for i in 0..8 {
        publish_batch_to(&b, &format!("mem{i}"), 50, 900).await;
    }
    let (_, stats) = b.get("/v1/stats").await;
    let shard = &stats["shards"][0];
    assert!(shard["history_bytes"].as_u64().unwrap() <= 256 * 1024, "{stats}");
    assert!(shard["history_evicted"].as_u64().unwrap() > 0, "{stats}");
    let (_, w0) = b.connect_query("user=mem0&since=0").await;
    assert_eq!(w0["recovered"], false, "the oldest user's events were evicted first");
    let (mut ws7, w7) = b.connect_query("user=mem7&since=0").await;
    assert_eq!(w7["recovered"], true, "the newest user's events are held");
    assert_eq!(next_events(&mut ws7, 50).await.len(), 50);
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_a_replay_bigger_than_max_queue_arrives_whole_then_live() {
    let b = TestBroker::with(|c| {
        c.max_queue = 8;
        c.history_size = 2000;
    });
    let (ws, welcome) = b.connect("replay").await;
    drop(ws);
    publish_batch_to(&b, "replay", 500, 100).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    let (mut ws, w) = b.connect_query(&format!("user=replay&since=0&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true);
    // Live events published during the replay follow it, in order.
    publish_batch_to(&b, "replay", 4, 10).await;
    let evs = next_events(&mut ws, 504).await;
    assert_eq!(
        evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        (1..=504).collect::<Vec<_>>()
    );
    let (_, stats) = b.get("/v1/stats").await;
    assert_eq!(stats["events"]["shed"], 0, "nothing shed: {stats}");
    // `since` above the latest seq cannot be a resume.
    let (_, ahead) = b.connect_query(&format!("user=replay&since=9999&epoch={epoch}")).await;
    assert_eq!(ahead["recovered"], false);
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_max_queue_bytes_sheds_for_a_stalled_client() {
    let b = TestBroker::with(|c| {
        c.max_queue = 100_000;
        c.max_queue_bytes = 256 * 1024;
    });
    let _stalled = raw_ws_silent(b.client, "user=stall").await;
    // ~8 MiB for a client that reads nothing: far more than socket buffers.
    for _ in 0..8 {
        publish_batch_to(&b, "stall", 1000, 1000).await;
    }
    let (_, info) = b.get("/v1/users/stall").await;
    let queued = info["queued"][0].as_u64().unwrap();
    assert!(queued * 1000 <= 256 * 1024, "queue bounded in bytes: {info}");
    let (_, stats) = b.get("/v1/stats").await;
    assert!(stats["events"]["shed"].as_u64().unwrap() > 0, "{stats}");
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_a_batch_larger_than_the_ring_is_applied_in_steps() {
    let b = TestBroker::with(|c| {
        c.ring_capacity = 16;
        c.shards = 2;
    });
    let (mut ws, _) = b.connect("steps").await;
    publish_batch_to(&b, "steps", 1000, 10).await;
    let evs = next_events(&mut ws, 1000).await;
    assert_eq!(
        evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<_>>()
    );
    // A `users` list wider than the ring, on the single-publish endpoint.
    let users: Vec<String> = (0..500).map(|i| format!("wide{i}")).collect();
    let (s, r) = b.post("/v1/publish", json!({"users": users, "event": "e"}).to_string()).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["results"].as_array().unwrap().len(), 500);
    assert!(r["results"].as_array().unwrap().iter().all(|x| x["seq"] == 1));
    // And on a stream without acks: nothing comes back, everything lands.
    let mut st = publisher_stream(&b, "").await;
    let lines: Vec<String> = (0..1000).map(|_| json!({"user": "steps", "event": "s"}).to_string()).collect();
    st.send(Message::text(lines.join("\n"))).await.unwrap();
    let evs = next_events(&mut ws, 1000).await;
    assert_eq!(evs.last().unwrap()["seq"], 2000);
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn regression_epochs_carry_64_random_bits_and_differ_per_start() {
    let a = TestBroker::start();
    let b = TestBroker::start();
    let (_, wa) = a.connect("u").await;
    let (_, wb) = b.connect("u").await;
    let (ea, eb) = (wa["epoch"].as_str().unwrap(), wb["epoch"].as_str().unwrap());
    assert_ne!(ea, eb);
    // 13 base-36 digits of OS randomness (>= 64 bits), then shard and counter.
    let random = ea.split('-').next().unwrap();
    assert_eq!(random.len(), 13, "{ea}");
    assert!(random.bytes().all(|c| c.is_ascii_alphanumeric()));
    still_serving(&a).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_shutdown_applies_every_frame_sent_before_the_close_answer() {
    let b = TestBroker::with(|c| c.drain_timeout = Duration::from_secs(10));
    let (mut client, _) = b.connect("drain").await;
    let st = publisher_stream(&b, "").await;
    let (mut tx, mut rx) = st.split();
    // Keep publishing until the server's 1001 arrives, then answer it.
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut closed = false;
        while !closed && sent < 200_000 {
            let line = json!({"user": "drain", "event": "e", "data": sent}).to_string();
            tx.send(Message::text(line)).await.expect("send");
            sent += 1;
            // Look for the server's close without blocking the sender long.
            if let Ok(Some(Ok(Message::Close(Some(c))))) =
                tokio::time::timeout(Duration::from_micros(50), rx.next()).await
            {
                assert_eq!(u16::from(c.code), 1001);
                closed = true;
            }
        }
        let _ = tx.send(close_frame(1000)).await;
        sent
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = b.running.as_ref().map(|r| r.shared.clone());
    assert!(running.is_some());
    let stop = tokio::spawn(b.stop());
    let sent = tokio::time::timeout(WAIT, sender).await.expect("sender ends").expect("sender");
    assert!(sent > 0);
    // The client gets every frame the publisher sent before answering the
    // close, in order, then 1001.
    let mut got = 0u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, client.next()).await.expect("in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["data"], got, "in order, none missing");
                got += 1;
            }
            Some(Ok(Message::Close(Some(c)))) => {
                assert_eq!(u16::from(c.code), 1001);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("client stream ended without 1001: {other:?}"),
        }
    }
    assert_eq!(got, sent, "every frame sent before the close answer was applied and delivered");
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_shutdown_answers_a_request_in_flight() {
    let b = TestBroker::with(|c| c.drain_timeout = Duration::from_secs(10));
    let body = json!({"user": "inflight", "event": "e"}).to_string();
    let mut s = TcpStream::connect(b.api).await.unwrap();
    let head = format!("POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stop = tokio::spawn(b.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(&body.as_bytes()[5..]).await.unwrap();
    let (resp, _) = read_until_closed(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"seq\":1"), "{resp}");
    stop.await.unwrap();
}
