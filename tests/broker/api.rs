//! The publish API: `users`, batch (array and NDJSON), broadcast, the
//! publisher stream with and without acks, and the API key.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test]
async fn users_array_publishes_to_each() {
    let b = TestBroker::with(|c| c.shards = 2);
    let (mut a, _) = b.connect("alice").await;
    let (mut c, _) = b.connect("carol").await;
    let body = json!({"users": ["alice", "bob", "carol"], "event": "agent_started", "data": {"k": 1}});
    let (status, v) = b.post("/v1/publish", body.to_string()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["results"],
        json!([
            {"user": "alice", "seq": 1, "delivered": 1},
            {"user": "bob", "seq": 1, "delivered": 0},
            {"user": "carol", "seq": 1, "delivered": 1},
        ])
    );
    assert_eq!(next_json(&mut a).await["data"]["k"], 1);
    assert_eq!(next_json(&mut c).await["data"]["k"], 1);
    b.stop().await;
}

#[tokio::test]
async fn batch_array_with_one_bad_item() {
    let b = TestBroker::start();
    let (mut ws, _) = b.connect("u").await;
    let body =
        r#"[{"user":"u","event":"one"},{"user":"u","event":"bad name!"},{"user":"u","event":"three"}]"#;
    let (status, v) = b.post("/v1/publish/batch", body).await;
    assert_eq!(status, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[0], json!({"seq": 1, "delivered": 1}));
    assert_eq!(r[1]["error"]["code"], "invalid_event");
    assert_eq!(r[2], json!({"seq": 2, "delivered": 1}));
    let evs = next_events(&mut ws, 2).await;
    assert_eq!(evs[0]["event"], "one");
    assert_eq!(evs[1]["event"], "three");
    b.stop().await;
}

#[tokio::test]
async fn batch_ndjson_with_one_bad_item() {
    let b = TestBroker::start();
    let body = "{\"user\":\"n\",\"event\":\"a\"}\n{not json\n{\"user\":\"n\",\"event\":\"b\",\"priority\":\"low\"}\n";
    let (status, v) = b.post("/v1/publish/batch", body).await;
    assert_eq!(status, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["seq"], 1);
    assert_eq!(r[1]["error"]["code"], "invalid_json");
    assert_eq!(r[2]["seq"], 2);
    let (_, info) = b.get("/v1/users/n").await;
    assert_eq!(info["history"], 2);
    b.stop().await;
}

#[tokio::test]
async fn batch_refuses_a_malformed_array_and_too_many_items() {
    let b = TestBroker::start();
    let (status, v) = b.post("/v1/publish/batch", "[{\"user\":\"u\"").await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "invalid_json");
    let many = format!("[{}]", vec![r#"{"user":"u","event":"e"}"#; 1001].join(","));
    let (status, v) = b.post("/v1/publish/batch", many).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "too_many_items");
    let (_, info) = b.get("/v1/users/u").await;
    assert_eq!(info["seq"], 0, "nothing applied");
    b.stop().await;
}

#[tokio::test]
async fn broadcast_reaches_every_connected_user() {
    let b = TestBroker::with(|c| c.shards = 3);
    let mut socks = Vec::new();
    for i in 0..6 {
        let (ws, _) = b.connect(&format!("b{i}")).await;
        socks.push(ws);
    }
    let (_extra, _) = b.connect("b0").await;
    b.publish("offline", "e", Value::Null).await; // has state, no connection
    let (status, v) =
        b.post("/v1/broadcast", json!({"event": "maintenance", "data": {"in": "5m"}}).to_string()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"users": 6, "delivered": 7}));
    for ws in socks.iter_mut() {
        let ev = next_json(ws).await;
        assert_eq!(ev["event"], "maintenance");
        assert_eq!(ev["seq"], 1);
    }
    b.stop().await;
}

#[tokio::test]
async fn stream_with_acks() {
    let b = TestBroker::start();
    let (mut client, _) = b.connect("s").await;
    let mut pubs = stream(&b, "?acks=1").await;
    let frame = "{\"user\":\"s\",\"event\":\"a\"}\n{\"user\":\"s\",\"event\":\"b\",\"priority\":\"nope\"}\n{\"user\":\"s\",\"event\":\"c\"}";
    pubs.send(Message::text(frame)).await.unwrap();
    let ack = next_json(&mut pubs).await;
    assert_eq!(ack["type"], "ack");
    let r = ack["results"].as_array().unwrap();
    assert_eq!(r[0], json!({"seq": 1, "delivered": 1}));
    assert_eq!(r[1]["error"]["code"], "invalid_priority");
    assert_eq!(r[2], json!({"seq": 2, "delivered": 1}));
    let evs = next_events(&mut client, 2).await;
    assert_eq!((evs[0]["event"].clone(), evs[1]["event"].clone()), (json!("a"), json!("c")));
    b.stop().await;
}

/// Messages sent back to back are submitted before earlier ones are
/// applied; their acks still come back one per message, in message order,
/// with each user's seqs in publish order (users spread over two shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_stream_messages_are_answered_in_order() {
    const MESSAGES: u64 = 60;
    const PER_MESSAGE: u64 = 20;
    let b = TestBroker::with(|c| c.shards = 2);
    let mut pubs = stream(&b, "?acks=1").await;
    for m in 0..MESSAGES {
        let lines: Vec<String> = (0..PER_MESSAGE)
            .map(|i| json!({"user": format!("p{}", i % 4), "event": "e", "data": [m, i]}).to_string())
            .collect();
        pubs.send(Message::text(lines.join("\n"))).await.unwrap();
    }
    let mut last = [0u64; 4];
    for m in 0..MESSAGES {
        let ack = next_json(&mut pubs).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let results = ack["results"].as_array().unwrap();
        assert_eq!(results.len() as u64, PER_MESSAGE, "message {m}: {ack}");
        for (i, r) in results.iter().enumerate() {
            let seq = r["seq"].as_u64().unwrap_or_else(|| panic!("message {m} item {i}: {r}"));
            assert_eq!(seq, last[i % 4] + 1, "message {m} item {i}: seqs in publish order");
            last[i % 4] = seq;
        }
    }
    assert_eq!(last, [MESSAGES * PER_MESSAGE / 4; 4]);
    b.stop().await;
}

/// Messages that reach the broker in one write are applied as one batch:
/// each still gets its own reply, in order, whatever it holds (items, a
/// bad item, a binary frame, a fragmented message), and the publisher's
/// close is answered only after all of them.
#[tokio::test]
async fn a_burst_of_stream_messages_is_answered_message_by_message_then_closed() {
    use tokio::io::AsyncWriteExt;
    let b = TestBroker::start();
    let (mut client, _) = b.connect("burst").await;
    let mut s = tokio::net::TcpStream::connect(b.api).await.unwrap();
    let mut out = stream_upgrade_head(b.api_key.as_deref());
    let event = |n: u64| json!({"user": "burst", "event": "e", "data": n}).to_string();
    out.extend(masked_frame(0x1, event(1).as_bytes()));
    out.extend(masked_frame(0x1, format!("{}\n{}", event(2), event(3)).as_bytes()));
    out.extend(masked_frame(0x1, b"{\"user\":\"burst\"}"));
    out.extend(masked_frame(0x2, event(99).as_bytes()));
    let whole = event(4);
    let (first, rest) = whole.as_bytes().split_at(10);
    let mut fragment = masked_frame(0x1, first);
    fragment[0] &= 0x7f; // not FIN: a continuation follows
    out.extend(fragment);
    out.extend(masked_frame(0x0, rest));
    out.extend(masked_frame(0x1, event(5).as_bytes()));
    out.extend(masked_frame(0x8, &1000u16.to_be_bytes()));
    s.write_all(&out).await.unwrap();
    let (head, frames) = raw_read_to_end(s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let replies: Vec<Value> =
        frames.iter().filter(|(op, _)| *op == 0x1).map(|(_, p)| serde_json::from_slice(p).unwrap()).collect();
    let seqs = |r: &Value| -> Vec<Option<u64>> {
        r["results"].as_array().map_or(Vec::new(), |a| a.iter().map(|x| x["seq"].as_u64()).collect())
    };
    assert_eq!(replies.len(), 6, "one reply per message: {replies:?}");
    assert_eq!(seqs(&replies[0]), [Some(1)]);
    assert_eq!(seqs(&replies[1]), [Some(2), Some(3)]);
    assert_eq!(replies[2]["results"][0]["error"]["code"], "missing_field", "{}", replies[2]);
    assert_eq!((&replies[3]["type"], &replies[3]["code"]), (&json!("error"), &json!("bad_request")));
    assert_eq!(seqs(&replies[4]), [Some(4)], "the fragmented message");
    assert_eq!(seqs(&replies[5]), [Some(5)]);
    let last = frames.last().expect("frames");
    assert_eq!((last.0, &last.1[..]), (0x8, &1000u16.to_be_bytes()[..]), "the close echo comes last");
    let evs = next_events(&mut client, 5).await;
    assert_eq!(evs.iter().map(|e| e["data"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    b.stop().await;
}

#[tokio::test]
async fn a_stream_frame_sent_with_the_upgrade_request_is_applied() {
    let b = TestBroker::start();
    let (mut client, _) = b.connect("early").await;
    let mut s = tokio::net::TcpStream::connect(b.api).await.unwrap();
    let body = json!({"user": "early", "event": "first"}).to_string();
    let got = stream_publish_raw(&mut s, b.api_key.as_deref(), &body).await;
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(got.contains("{\"type\":\"ack\",\"results\":[{\"seq\":1,\"delivered\":1}]}"), "{got}");
    assert_eq!(next_events(&mut client, 1).await[0]["event"], "first");
    b.stop().await;
}

#[tokio::test]
async fn stream_without_acks_reports_only_failures() {
    let b = TestBroker::start();
    let (mut client, _) = b.connect("q").await;
    let mut pubs = stream(&b, "").await;
    for i in 0..50 {
        pubs.send(Message::text(json!({"user": "q", "event": "tick", "data": i}).to_string())).await.unwrap();
    }
    pubs.send(Message::text("{\"user\":\"q\",\"event\":\"ok\"}\n{\"user\":\"q\"}")).await.unwrap();
    let err = next_json(&mut pubs).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "missing_field");
    assert_eq!(err["index"], 1);
    let evs = next_events(&mut client, 51).await;
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=51).collect::<Vec<_>>());
    assert_eq!(evs[50]["event"], "ok");
    // No other frame came back on the publisher stream.
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), pubs.next()).await;
    assert!(quiet.is_err(), "only failures are reported: {quiet:?}");
    b.stop().await;
}

/// A fire-and-forget stream faster than its shard is slowed down through its
/// socket (the broker waits for ring room before reading on), not refused:
/// the bench at max rate got `overloaded` errors before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_acks_waits_for_a_full_ring_instead_of_refusing_items() {
    // Frames of 50 fit one reservation (half of 128), so only a full ring stops them.
    let b = TestBroker::with(|c| c.ring_capacity = 128);
    let (mut client, _) = b.connect("flood").await;
    let mut pubs = stream(&b, "").await;
    for f in 0..20 {
        let frame: Vec<String> =
            (0..50).map(|i| json!({"user": "flood", "event": "e", "data": f * 50 + i}).to_string()).collect();
        pubs.send(Message::text(frame.join("\n"))).await.unwrap();
    }
    let evs = next_events(&mut client, 1000).await;
    let data: Vec<u64> = evs.iter().map(|e| e["data"].as_u64().unwrap()).collect();
    assert_eq!(data, (0..1000).collect::<Vec<_>>(), "every item applied, in order");
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), pubs.next()).await;
    assert!(quiet.is_err(), "no item was refused: {quiet:?}");
    let _ = pubs.close(None).await;
    b.stop().await;
}

/// Without acks a stream waits on one fence per shard per message (not an
/// ack per item): messages whose items span several shards must each be
/// released by all of their fences, or the stream stalls after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_acks_spanning_shards_keeps_every_users_order() {
    let b = TestBroker::with(|c| c.shards = 4);
    let users: Vec<String> = (0..12).map(|u| format!("span-{u}")).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(b.connect(u).await.0);
    }
    let mut pubs = stream(&b, "").await;
    for f in 0..10 {
        let frame: Vec<String> = (0..120)
            .map(|i| json!({"user": users[i % users.len()], "event": "e", "data": f * 120 + i}).to_string())
            .collect();
        pubs.send(Message::text(frame.join("\n"))).await.unwrap();
    }
    for (u, client) in clients.iter_mut().enumerate() {
        let evs = next_events(client, 100).await;
        let data: Vec<u64> = evs.iter().map(|e| e["data"].as_u64().unwrap()).collect();
        let want: Vec<u64> = (0..1200).filter(|d| d % 120 % 12 == u as u64).collect();
        assert_eq!(data, want, "user {u}: every item, in order");
        let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    }
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), pubs.next()).await;
    assert!(quiet.is_err(), "nothing failed: {quiet:?}");
    let _ = pubs.close(None).await;
    b.stop().await;
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let b = TestBroker::with(|c| c.api_key = Some("k3y".into()));
    let body = bytes::Bytes::from(json!({"user": "u", "event": "e"}).to_string());
    let (status, v) = b.request("POST", "/v1/publish", body.clone(), None).await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (status, _) = b.request("POST", "/v1/publish", body.clone(), Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = b.request("GET", "/v1/stats", bytes::Bytes::new(), Some("k3y-longer")).await;
    assert_eq!(status, 401);
    let (status, v) = b.request("POST", "/v1/publish", body, Some("k3y")).await;
    assert_eq!(status, 200, "{v}");
    // The stream endpoint is behind the key too.
    let url = format!("ws://{}/v1/stream", b.api);
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    b.stop().await;
}

/// A repeated `id` inside one stream message (one batch command on the
/// shard) is answered as the duplicate of the first, beside items answered
/// in place, in one ack with every item in order.
#[tokio::test]
async fn a_repeated_id_within_one_stream_message_is_acked_as_a_duplicate() {
    let b = TestBroker::start();
    let (mut client, _) = b.connect("dup").await;
    let mut pubs = stream(&b, "?acks=1").await;
    let lines = [("a", 1), ("b", 2), ("a", 3), ("c", 4)]
        .iter()
        .map(|(id, n)| json!({"user": "dup", "event": "e", "id": id, "data": n}).to_string())
        .collect::<Vec<_>>();
    pubs.send(Message::text(lines.join("\n"))).await.unwrap();
    let ack = next_json(&mut pubs).await;
    let r = &ack["results"];
    assert_eq!(
        (r[0]["seq"].as_u64(), r[1]["seq"].as_u64(), r[3]["seq"].as_u64()),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!((r[2]["seq"].as_u64(), r[2]["duplicate"].as_bool()), (Some(1), Some(true)), "{ack}");
    let evs = next_events(&mut client, 3).await;
    assert_eq!(evs.iter().map(|e| e["data"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 4]);
    b.stop().await;
}
