//! Delivery guarantees (contract §5, §6): history, resume, priority lanes,
//! slow consumers, write coalescing, sanitisation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

fn seqs(evs: &[Value]) -> Vec<u64> {
    evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// Publishes `n` events to `user` in one batch call.
async fn publish_many(b: &TestBroker, user: &str, n: usize, prio: &str, pad: usize) {
    let pad = "x".repeat(pad);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let body: Vec<String> = chunk
            .iter()
            .map(|i| {
                json!({"user": user, "event": "bulk", "priority": prio, "data": {"i": i, "pad": pad}})
                    .to_string()
            })
            .collect();
        let (status, v) = b.post("/v1/publish/batch", body.join("\n")).await;
        assert_eq!(status, 200, "{v}");
        for r in v["results"].as_array().unwrap() {
            assert!(r.get("seq").is_some(), "publishers only ever see success here: {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_under_load_is_gap_and_duplicate_free() {
    const USERS: usize = 50;
    const RECONNECTS_PER_USER: usize = 20; // 1,000 in total
    let b = Arc::new(TestBroker::with(|c| {
        c.shards = 2;
        c.history_size = 1024;
        c.max_queue = 1024;
    }));
    let done = Arc::new(AtomicBool::new(false));
    // Publisher: a steady stream of events to random users until every client is done.
    let publisher = {
        let (b, done) = (b.clone(), done.clone());
        tokio::spawn(async move {
            let url = format!("ws://{}/v1/stream", b.api);
            let (mut pubs, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut rng = fastrand::Rng::with_seed(3);
            let mut sent = 0u64;
            // Paced (~5,000 events/s) so that clients, not the history, are the bottleneck.
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(2));
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let lines: Vec<String> = (0..10)
                    .map(|_| json!({"user": format!("r{}", rng.usize(..USERS)), "event": "tick"}).to_string())
                    .collect();
                pubs.send(Message::text(lines.join("\n"))).await.unwrap();
                sent += 10;
            }
            // Closing marker per user, after everything else (same stream, so in order).
            let lines: Vec<String> =
                (0..USERS).map(|u| json!({"user": format!("r{u}"), "event": "end"}).to_string()).collect();
            pubs.send(Message::text(lines.join("\n"))).await.unwrap();
            sent
        })
    };
    // Each client tells us when it has done its share of reconnects.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(USERS);
    let mut clients = Vec::new();
    for u in 0..USERS {
        let (b, done_tx) = (b.clone(), done_tx.clone());
        clients.push(tokio::spawn(async move {
            let user = format!("r{u}");
            let (mut ws, w) = b.connect(&user).await;
            let first = w["seq"].as_u64().unwrap();
            let mut epoch = w["epoch"].as_str().unwrap().to_string();
            let mut got = Vec::new();
            let mut reconnects = 0;
            let mut rng = fastrand::Rng::with_seed(u as u64);
            loop {
                let ev = next_json(&mut ws).await;
                if ev["type"] != "event" {
                    continue;
                }
                let last = ev["seq"].as_u64().unwrap();
                got.push(last);
                if ev["event"] == "end" {
                    break;
                }
                if reconnects < RECONNECTS_PER_USER && rng.u8(..3) == 0 {
                    drop(ws);
                    let (nws, w) = b.connect_query(&format!("user={user}&since={last}&epoch={epoch}")).await;
                    assert_eq!(w["recovered"], true, "resume after {last}: {w}");
                    epoch = w["epoch"].as_str().unwrap().to_string();
                    ws = nws;
                    reconnects += 1;
                    if reconnects == RECONNECTS_PER_USER {
                        let _ = done_tx.send(()).await;
                    }
                }
            }
            (first, got, reconnects)
        }));
    }
    drop(done_tx);
    for _ in 0..USERS {
        tokio::time::timeout(std::time::Duration::from_secs(60), done_rx.recv())
            .await
            .expect("clients finish their reconnects in time")
            .expect("a client finished");
    }
    done.store(true, Ordering::Relaxed);
    let published = publisher.await.unwrap();
    assert!(published > 0);
    let mut total_reconnects = 0;
    for (u, c) in clients.into_iter().enumerate() {
        let (first, got, reconnects) = c.await.unwrap();
        let want: Vec<u64> = (first + 1..=*got.last().unwrap()).collect();
        assert_eq!(got, want, "user r{u}: gap-free and duplicate-free");
        total_reconnects += reconnects;
    }
    assert_eq!(total_reconnects, USERS * RECONNECTS_PER_USER);
}

#[tokio::test]
async fn resume_is_refused_when_history_moved_on_or_epoch_is_wrong() {
    let b = TestBroker::with(|c| c.history_size = 4);
    let (_ws, w) = b.connect("h").await;
    let epoch = w["epoch"].as_str().unwrap().to_string();
    for i in 0..10 {
        b.publish("h", "e", json!(i)).await;
    }
    // Held: 7..=10. since=2 needs 3.. → impossible, nothing replayed.
    let (mut ws, w) = b.connect_query(&format!("user=h&since=2&epoch={epoch}")).await;
    assert_eq!(w["recovered"], false);
    assert_eq!(w["seq"], 10);
    b.publish("h", "live", json!(null)).await;
    let ev = next_json(&mut ws).await;
    assert_eq!((ev["seq"].clone(), ev["event"].clone()), (json!(11), json!("live")), "no partial replay");
    // since=8 with the right epoch → 9..=11.
    let (mut ws, w) = b.connect_query(&format!("user=h&since=8&epoch={epoch}")).await;
    assert_eq!(w["recovered"], true);
    assert_eq!(seqs(&next_events(&mut ws, 3).await), vec![9, 10, 11]);
    // Wrong epoch → refused, nothing replayed.
    let (mut ws, w) = b.connect_query("user=h&since=8&epoch=bogus").await;
    assert_eq!(w["recovered"], false);
    b.publish("h", "live2", json!(null)).await;
    assert_eq!(next_json(&mut ws).await["seq"], 12);
    // since without epoch means the current epoch.
    let (mut ws, w) = b.connect_query("user=h&since=10").await;
    assert_eq!(w["recovered"], true);
    assert_eq!(seqs(&next_events(&mut ws, 2).await), vec![11, 12]);
    b.stop().await;
}

#[tokio::test]
async fn offline_publish_then_since_zero_replays_everything() {
    let b = TestBroker::start();
    for i in 0..3 {
        let r = b.publish("late", "e", json!(i)).await;
        assert_eq!(r["delivered"], 0, "no connection yet, still kept");
    }
    let (mut ws, w) = b.connect_query("user=late&since=0").await;
    assert_eq!(w["recovered"], true);
    assert_eq!(w["seq"], 3);
    let evs = next_events(&mut ws, 3).await;
    assert_eq!(seqs(&evs), vec![1, 2, 3]);
    assert_eq!(evs[2]["data"], 2);
    // No since: live only.
    let (mut live, w) = b.connect("late").await;
    assert!(w.get("recovered").is_none());
    b.publish("late", "now", json!(null)).await;
    assert_eq!(next_json(&mut live).await["seq"], 4);
    b.stop().await;
}

#[tokio::test]
async fn history_and_idle_users_expire_after_the_ttl() {
    let b = TestBroker::with(|c| c.history_ttl = std::time::Duration::from_millis(200));
    b.publish("ttl", "e", json!(1)).await;
    let (_, info) = b.get("/v1/users/ttl").await;
    let old_epoch = info["epoch"].as_str().unwrap().to_string();
    assert_eq!(info["history"], 1);
    // Wait (bounded) for the sweep to drop the idle user's state.
    let mut swept = false;
    for _ in 0..200 {
        let (_, info) = b.get("/v1/users/ttl").await;
        if info["seq"] == 0 {
            swept = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(swept, "the idle user was swept");
    let (_, w) = b.connect_query(&format!("user=ttl&since=1&epoch={old_epoch}")).await;
    assert_eq!(w["recovered"], false, "the old epoch is gone");
    assert_ne!(w["epoch"], json!(old_epoch), "a swept user gets a new epoch");
    assert_eq!(b.publish("ttl", "e", json!(2)).await["seq"], 1, "seq starts again at 1");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_hurts_no_one_and_is_bounded() {
    const MAX_QUEUE: usize = 64;
    let b = TestBroker::with(|c| {
        c.shards = 1; // the stalled and the healthy user share a shard
        c.max_queue = MAX_QUEUE;
        c.history_size = 32;
    });
    let (mut stalled, _) = b.connect("stalled").await; // never read until the end
    let (mut healthy, _) = b.connect("healthy").await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 1000 {
            let ev = next_json(&mut healthy).await;
            got.push(ev["seq"].as_u64().unwrap());
        }
        got
    });
    // 10,000 events of ~1 KiB to the stalled client (far past socket buffers),
    // interleaved with 1,000 to the healthy one.
    for round in 0..10 {
        publish_many(&b, "stalled", 1000, if round % 2 == 0 { "normal" } else { "low" }, 1024).await;
        publish_many(&b, "healthy", 100, "normal", 16).await;
    }
    assert_eq!(reader.await.unwrap(), (1..=1000).collect::<Vec<_>>(), "the healthy user got everything");
    let (_, info) = b.get("/v1/users/stalled").await;
    let queued = info["queued"][0].as_u64().unwrap();
    assert!(queued <= MAX_QUEUE as u64, "queue bounded: {info}");
    let (_, stats) = b.get("/v1/stats").await;
    let shed = &stats["events"]["shed_by_priority"];
    assert!(shed["normal"].as_u64().unwrap() + shed["low"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["shards"][0]["max_queue_depth"].as_u64().unwrap() <= MAX_QUEUE as u64);
    // Fill the queue with high events: the first high that finds only highs closes it (1013).
    publish_many(&b, "stalled", MAX_QUEUE + 1, "high", 1024).await;
    let (_, stats) = b.get("/v1/stats").await;
    assert_eq!(stats["slow_consumers_closed"], 1, "{stats}");
    assert_eq!(stats["events"]["shed_by_priority"]["high"], 1, "{stats}");
    // The stalled client, reading at last, finds the 1013 after what was already in flight.
    assert_eq!(close_code(&mut stalled).await, 1013);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_overtakes_queued_normal() {
    let b = TestBroker::with(|c| {
        c.max_queue = 4096;
        c.max_queue_bytes = 64 << 20;
        c.history_size = 16;
    });
    let (mut ws, _) = b.connect("lanes").await;
    // Stall: publish far more normal data than the socket buffers hold.
    publish_many(&b, "lanes", 3000, "normal", 4096).await;
    let r = b.publish_prio("lanes", "high", json!("urgent")).await;
    let high_seq = r["seq"].as_u64().unwrap();
    assert_eq!(high_seq, 3001);
    // Resume reading.
    let evs = next_events(&mut ws, 3001).await;
    let pos = evs.iter().position(|e| e["priority"] == "high").unwrap();
    assert!(pos < 3000, "the high event was written before queued normal ones (at {pos})");
    let normals: Vec<u64> =
        evs.iter().filter(|e| e["priority"] == "normal").map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(normals, (1..=3000).collect::<Vec<_>>(), "normal lane kept its order and lost nothing");
    b.stop().await;
}

#[tokio::test]
async fn a_backlog_goes_out_many_frames_per_write() {
    let b = TestBroker::with(|c| c.shards = 1);
    let (mut ws, _) = b.connect("burst").await;
    // One batch reaches the shard as one burst of 1,000 commands: the shard
    // queues them (256 per pass) before the writer runs, so a backlog is
    // waiting each time the writer flushes.
    publish_many(&b, "burst", 1000, "normal", 64).await;
    let evs = next_events(&mut ws, 1000).await;
    assert_eq!(seqs(&evs), (1..=1000).collect::<Vec<_>>());
    let (_, stats) = b.get("/v1/stats").await;
    let frames = stats["frames_written"].as_f64().unwrap();
    let calls = stats["write_calls"].as_f64().unwrap();
    assert!(frames >= 1000.0);
    assert!(
        calls * 8.0 <= frames,
        "under backlog one write carries many frames: {frames} frames in {calls} writes"
    );
    assert_eq!(stats["frames_per_write"].as_f64().unwrap(), frames / calls);
    b.stop().await;
}

#[tokio::test]
async fn redacted_keys_never_reach_clients_or_history() {
    let b = TestBroker::with(|c| c.redact_keys = vec!["api_key".into(), "authorization".into()]);
    let (mut ws, _) = b.connect("agent").await;
    let data = json!({
        "tool": "http",
        "args": {"url": "https://x", "api_key": "sk-live-1", "headers": [{"Authorization": "Bearer s3cr3t"}]},
        "api_key": "sk-live-2",
    });
    b.publish("agent", "tool_executing", data).await;
    let ev = next_json(&mut ws).await;
    let text = ev.to_string();
    assert!(!text.contains("sk-live") && !text.contains("s3cr3t"), "{text}");
    assert_eq!(ev["data"]["args"]["url"], "https://x");
    // Replay from history is redacted too.
    let (mut again, _) = b.connect_query("user=agent&since=0").await;
    let replayed = next_json(&mut again).await.to_string();
    assert!(!replayed.contains("sk-live") && !replayed.contains("s3cr3t"), "{replayed}");
    b.stop().await;
}

#[tokio::test]
async fn bad_event_name_stores_nothing() {
    let b = TestBroker::start();
    let (mut ws, _) = b.connect("named").await;
    let (status, v) = b.post("/v1/publish", json!({"user": "named", "event": "has space"}).to_string()).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "invalid_event");
    let (_, info) = b.get("/v1/users/named").await;
    assert_eq!((info["seq"].clone(), info["history"].clone()), (json!(0), json!(0)));
    b.publish("named", "ok", json!(null)).await;
    assert_eq!(next_json(&mut ws).await["seq"], 1, "the refused event never reached the client");
    b.stop().await;
}

/// Regression: a burst bigger than `--max-queue` applied by the shard in one
/// pass used to overflow the queue of a client that keeps up, shedding events
/// it would have read. A pass now ends once a connection's queue is half full.
#[tokio::test]
async fn regression_burst_over_max_queue_is_not_shed_for_a_reader() {
    let b = TestBroker::with(|c| {
        c.max_queue = 16;
        c.history_size = 8;
    });
    let (mut ws, _) = b.connect("reader").await;
    publish_many(&b, "reader", 200, "normal", 8).await;
    assert_eq!(seqs(&next_events(&mut ws, 200).await), (1..=200).collect::<Vec<_>>());
    let (_, stats) = b.get("/v1/stats").await;
    assert_eq!(stats["events"]["shed"], 0, "{stats}");
    b.stop().await;
}

/// The same burst through a publisher stream with acks: its events reach
/// the shard as one batch command, which a pass that fills the reader's
/// queue to half stops inside and the next passes finish, in order, with
/// nothing shed and every item acked once.
#[tokio::test]
async fn a_stream_message_bigger_than_half_the_queue_is_applied_over_several_passes() {
    let b = TestBroker::with(|c| {
        c.max_queue = 16;
        c.history_size = 8;
    });
    let (mut ws, _) = b.connect("reader").await;
    let mut pubs = stream(&b, "?acks=1").await;
    let lines: Vec<String> =
        (0..300).map(|i| json!({"user": "reader", "event": "bulk", "data": {"i": i}}).to_string()).collect();
    pubs.send(Message::text(lines.join("\n"))).await.unwrap();
    let ack = next_json(&mut pubs).await;
    let acked: Vec<u64> =
        ack["results"].as_array().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(acked, (1..=300).collect::<Vec<_>>(), "{ack}");
    let evs = next_events(&mut ws, 300).await;
    assert_eq!(seqs(&evs), (1..=300).collect::<Vec<_>>());
    let data: Vec<u64> = evs.iter().map(|e| e["data"]["i"].as_u64().unwrap()).collect();
    assert_eq!(data, (0..300).collect::<Vec<_>>());
    let (_, stats) = b.get("/v1/stats").await;
    assert_eq!(stats["events"]["shed"], 0, "{stats}");
    b.stop().await;
}
