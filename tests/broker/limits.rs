//! Connection limits: per-user eviction (4001) and --max-connections (503).

use serde_json::json;

use crate::util::*;

#[tokio::test]
async fn a_new_connection_evicts_the_users_oldest() {
    let b = TestBroker::with(|c| c.max_conns_per_user = 2);
    let (mut first, _) = b.connect("e").await;
    let (mut second, _) = b.connect("e").await;
    let (mut third, _) = b.connect("e").await;
    assert_eq!(close_code(&mut first).await, 4001);
    let r = b.publish("e", "after", json!(null)).await;
    assert_eq!(r["delivered"], 2);
    assert_eq!(next_json(&mut second).await["event"], "after");
    assert_eq!(next_json(&mut third).await["event"], "after");
    let (_, stats) = b.get("/v1/stats").await;
    assert_eq!(stats["evicted"], 1, "{stats}");
    b.stop().await;
}

#[tokio::test]
async fn max_connections_answers_503() {
    let b = TestBroker::with(|c| c.max_connections = 2);
    let (_a, _) = b.connect("m1").await;
    let (mut second, _) = b.connect("m2").await;
    let (status, body) = raw_upgrade(b.client, "/ws?user=m3", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    // Once a slot frees up, a new client gets in.
    second.close(None).await.unwrap();
    let mut admitted = None;
    for _ in 0..200 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(b.ws_url("user=m3")).await {
            admitted = Some(ws);
            break;
        }
        // Wait for the broker to notice the close: bounded retry, not a sleep-sync.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(admitted.is_some(), "a slot freed by a close is reusable");
    b.stop().await;
}

#[tokio::test]
async fn operator_can_drop_a_user() {
    let b = TestBroker::start();
    let (mut a, _) = b.connect("gone").await;
    let (mut c, _) = b.connect("gone").await;
    let (status, v) = b.delete("/v1/users/gone").await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"closed": 2}));
    assert_eq!(close_code(&mut a).await, 4000);
    assert_eq!(close_code(&mut c).await, 4000);
    let (_, v) = b.delete("/v1/users/nobody").await;
    assert_eq!(v, json!({"closed": 0}));
    b.stop().await;
}

#[tokio::test]
async fn silent_clients_are_closed_with_4002_and_ponging_ones_stay() {
    let b = TestBroker::with(|c| {
        c.ping_interval = std::time::Duration::from_millis(100);
        c.idle_timeout = std::time::Duration::from_millis(400);
    });
    // A client that reads (and so answers protocol pings) stays connected...
    let (mut alive, _) = b.connect("alive").await;
    // ...one that never reads never pongs, and is cut.
    let silent = raw_ws_silent(b.client, "user=silent").await;
    let keep_reading = tokio::spawn(async move {
        // Read (answering pings) until the first event arrives.
        let ev = next_json(&mut alive).await;
        (ev, alive)
    });
    // Only the silent one is closed: wait for its close while the other pongs.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, stats) = b.get("/v1/stats").await;
        if stats["connections"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the silent client was not cut: {stats}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(raw_close_code(silent).await, Some(4002));
    b.publish("alive", "still-here", json!(null)).await;
    let (ev, _alive) = keep_reading.await.unwrap();
    assert_eq!(ev["event"], "still-here", "the ponging client outlived several idle timeouts");
    b.stop().await;
}
