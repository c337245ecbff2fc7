//! Every bad input gets the contract's answer, and the broker keeps serving.

use serde_json::{json, Value};

use crate::util::*;

/// A fresh client still gets a freshly published event.
async fn still_serving(b: &TestBroker) {
    let user = format!("probe-{}", fastrand::u32(..));
    let (mut ws, _) = b.connect(&user).await;
    b.publish(&user, "probe", json!(1)).await;
    assert_eq!(next_json(&mut ws).await["event"], "probe");
}

#[tokio::test]
async fn publish_rejections() {
    let b = TestBroker::with(|c| c.max_payload = 1024);
    let big = json!({"user": "u", "event": "e", "data": "x".repeat(2000)}).to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("invalid JSON", "{nope".into(), 400, "invalid_json"),
        ("not an object", "[1]".into(), 400, "invalid_json"),
        ("missing user", json!({"event": "e"}).to_string(), 400, "missing_field"),
        ("missing event", json!({"user": "u"}).to_string(), 400, "missing_field"),
        (
            "unknown priority",
            json!({"user": "u", "event": "e", "priority": "urgent"}).to_string(),
            400,
            "invalid_priority",
        ),
        ("bad user ID", json!({"user": "no spaces", "event": "e"}).to_string(), 400, "invalid_user"),
        ("bad event name", json!({"user": "u", "event": "x".repeat(65)}).to_string(), 400, "invalid_event"),
        ("oversize payload", big, 413, "payload_too_large"),
    ];
    for (what, body, status, code) in cases {
        let (got, v) = b.post("/v1/publish", body).await;
        assert_eq!(got, status, "{what}: {v}");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
    }
    // Nothing was stored for the target user.
    let (_, info) = b.get("/v1/users/u").await;
    assert_eq!(info["seq"], 0, "{info}");
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn unknown_client_frame_gets_an_error_frame_and_stays_open() {
    let b = TestBroker::start();
    let (mut ws, _) = b.connect("talker").await;
    send_text(&mut ws, r#"{"type":"subscribe","channel":"x"}"#).await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_request");
    send_text(&mut ws, "not json at all").await;
    assert_eq!(next_json(&mut ws).await["type"], "error");
    // App-level ping still works, and events still arrive on this connection.
    send_text(&mut ws, r#"{"type":"ping","id":7}"#).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": 7}));
    b.publish("talker", "after", Value::Null).await;
    assert_eq!(next_json(&mut ws).await["event"], "after");
    b.stop().await;
}

#[tokio::test]
async fn oversize_client_frame_closes_with_1009() {
    let b = TestBroker::start();
    let (mut ws, _) = b.connect("big").await;
    // Exactly 4096 bytes is allowed...
    let ok = format!(r#"{{"type":"ping","id":"{}"}}"#, "a".repeat(4096 - 23));
    assert_eq!(ok.len(), 4096);
    send_text(&mut ws, &ok).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    // ...one more byte is not.
    send_text(&mut ws, &"b".repeat(4097)).await;
    assert_eq!(close_code(&mut ws).await, 1009);
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn non_upgrade_and_garbage_requests_are_refused() {
    let b = TestBroker::start();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for req in [
        "GET /ws?user=u HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n",
        "\x16\x03\x01garbage\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(b.client).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 4"), "{req:?} → {text}");
        assert!(text.contains("{\"error\":"), "{text}");
    }
    let (status, _, v) = http(b.client, "GET", "/healthz", bytes::Bytes::new(), None).await;
    assert_eq!(status, 200);
    assert_eq!(&v[..], br#"{"status":"ok"}"#);
    still_serving(&b).await;
    b.stop().await;
}
