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
