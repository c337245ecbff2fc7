//! Client authentication rows of contract §3.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::util::*;

const SECRET: &[u8] = b"test-secret";

fn jwt_broker() -> TestBroker {
    TestBroker::with(|c| c.jwt_secret = Some(SECRET.to_vec()))
}

fn token(claims: serde_json::Value, key: &[u8]) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key)).unwrap()
}

/// An unsigned token (`alg: none`), built by hand since no library will.
fn none_token(claims: serde_json::Value) -> String {
    use base64::Engine;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{}.{}.", e.encode(br#"{"alg":"none","typ":"JWT"}"#), e.encode(claims.to_string()))
}

#[tokio::test]
async fn dev_mode_uses_the_query_user_and_checks_it() {
    let b = TestBroker::start();
    let (_ws, w) = b.connect("dev-user@x").await;
    assert_eq!(w["user"], "dev-user@x");
    let (status, body) = raw_upgrade(b.client, "/ws?user=bad%20user", "").await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid_user"), "{body}");
    let (status, _) = raw_upgrade(b.client, "/ws", "").await;
    assert_eq!(status, 400, "dev mode without ?user=");
    let long = "x".repeat(129);
    let (status, _) = raw_upgrade(b.client, &format!("/ws?user={long}"), "").await;
    assert_eq!(status, 400);
    b.stop().await;
}

#[tokio::test]
async fn jwt_valid_in_query_and_header() {
    let b = jwt_broker();
    let t = token(json!({"sub": "alice", "exp": now_secs() + 300}), SECRET);
    // The query user is ignored: the token decides.
    let (_ws, w) = b.connect_query(&format!("token={t}&user=mallory")).await;
    assert_eq!(w["user"], "alice");

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let h = token(json!({"sub": "hank", "exp": now_secs() + 300}), SECRET);
    let mut req = b.ws_url("token=garbage").into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {h}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("header token wins");
    assert_eq!(next_json(&mut ws).await["user"], "hank");
    b.stop().await;
}

#[tokio::test]
async fn jwt_rejections_are_401() {
    let b = jwt_broker();
    let now = now_secs();
    let cases = [
        ("expired", token(json!({"sub": "a", "exp": now - 3600}), SECRET)),
        ("bad signature", token(json!({"sub": "a", "exp": now + 300}), b"other-secret")),
        ("alg none", none_token(json!({"sub": "a", "exp": now + 300}))),
        ("missing exp", token(json!({"sub": "a"}), SECRET)),
        ("missing sub", token(json!({"exp": now + 300}), SECRET)),
        ("invalid sub", token(json!({"sub": "a b", "exp": now + 300}), SECRET)),
        ("not a token", "abc".to_string()),
    ];
    for (what, t) in cases {
        let (status, body) = raw_upgrade(b.client, &format!("/ws?token={t}"), "").await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body.contains("\"unauthorized\""), "{what}: {body}");
    }
    let (status, _) = raw_upgrade(b.client, "/ws?user=alice", "").await;
    assert_eq!(status, 401, "no token at all");
    // A bad header token is not rescued by a good query token.
    let good = token(json!({"sub": "a", "exp": now + 300}), SECRET);
    let (status, _) =
        raw_upgrade(b.client, &format!("/ws?token={good}"), "Authorization: Bearer nope\r\n").await;
    assert_eq!(status, 401, "the header wins even when it is bad");
    // Still serving well-behaved clients.
    let (_ws, w) = b.connect_query(&format!("token={good}")).await;
    assert_eq!(w["user"], "a");
    b.stop().await;
}
