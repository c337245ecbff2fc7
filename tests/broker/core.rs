//! Core delivery: publish reaches every connection of its user, in order,
//! and no one else.

use std::collections::HashMap;

use serde_json::json;

use crate::util::*;

#[tokio::test]
async fn publish_reaches_the_users_connection() {
    let b = TestBroker::start();
    let (mut ws, welcome) = b.connect("u1").await;
    assert_eq!(welcome["user"], "u1");
    assert_eq!(welcome["seq"], 0);
    assert!(welcome.get("recovered").is_none(), "no since, no recovered: {welcome}");
    let r = b.publish("u1", "agent_thinking", json!({"text": "hi"})).await;
    assert_eq!(r, json!({"seq": 1, "delivered": 1}));
    let ev = next_json(&mut ws).await;
    assert_eq!(ev["type"], "event");
    assert_eq!(ev["seq"], 1);
    assert_eq!(ev["event"], "agent_thinking");
    assert_eq!(ev["data"], json!({"text": "hi"}));
    assert_eq!(ev["priority"], "normal");
    assert!(ev["ts"].as_u64().unwrap() > 1_700_000_000_000);
    b.stop().await;
}

#[tokio::test]
async fn isolation_across_shards() {
    let b = TestBroker::with(|c| c.shards = 4);
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut conns = Vec::new();
    for u in &users {
        for _ in 0..2 {
            let (ws, _) = b.connect(u).await;
            conns.push((u.clone(), ws));
        }
    }
    // 20 events to pseudo-random users (fixed seed so failures reproduce).
    let mut rng = fastrand::Rng::with_seed(7);
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    for n in 0..20 {
        let u = &users[rng.usize(..users.len())];
        let r = b.publish(u, "tool_executing", json!({"n": n, "for": u})).await;
        assert_eq!(r["delivered"], 2);
        expected.entry(u.clone()).or_default().push(r["seq"].as_u64().unwrap());
    }
    // A marker event to every user closes each stream: everything before it
    // must be exactly that user's events, once, in seq order.
    for u in &users {
        b.publish(u, "marker", json!({"for": u})).await;
    }
    for (u, ws) in conns.iter_mut() {
        let mut got = Vec::new();
        loop {
            let ev = next_json(ws).await;
            assert_eq!(ev["type"], "event");
            assert_eq!(ev["data"]["for"], json!(u), "misrouted event on {u}'s connection: {ev}");
            if ev["event"] == "marker" {
                break;
            }
            got.push(ev["seq"].as_u64().unwrap());
        }
        let want = expected.get(u.as_str()).cloned().unwrap_or_default();
        assert_eq!(got, want, "user {u} got exactly its events, in order");
    }
    b.stop().await;
}
