//! RFC 6455 details the Autobahn run (scripts/autobahn) also covers, pinned
//! here so a regression shows up in `cargo test`: the `--echo-path`
//! conformance aid, and control frames over 125 bytes (Autobahn 7.3.6).

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test]
async fn echo_path_echoes_data_frames_without_auth_and_users_are_unaffected() {
    let b = TestBroker::with(|c| {
        c.echo_path = Some("/echo".into());
        c.jwt_secret = Some(b"secret".to_vec());
    });
    let url = format!("ws://{}/echo", b.client);
    let (mut echo, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("echo upgrade needs no token");
    echo.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_data(&mut echo).await, Message::text("hello"));
    // Larger than the 4 KiB client-message limit of /ws: the echo path takes it.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    echo.send(Message::binary(big.clone())).await.expect("send");
    assert_eq!(next_data(&mut echo).await, Message::binary(big));

    // /ws still requires a token, and a user still gets its events.
    let (status, _) = raw_upgrade(b.client, "/ws?user=alice", "").await;
    assert_eq!(status, 401);
    let stats = b.get("/v1/stats").await.1;
    assert_eq!(stats["connections"], 1, "the echo connection is counted: {stats}");
    echo.close(None).await.expect("close");
}

#[tokio::test]
async fn echo_path_is_off_by_default() {
    let b = TestBroker::start();
    let (status, body) = raw_upgrade(b.client, "/echo", "").await;
    assert_eq!(status, 404, "{body}");
    let (mut ws, _) = b.connect("alice").await;
    b.publish("alice", "agent_started", json!({})).await;
    assert_eq!(next_events(&mut ws, 1).await[0]["event"], "agent_started");
}

/// Sends one masked control frame with `payload` on a user connection and
/// expects close code 1002; another user is still served afterwards.
async fn control_frame_gets_1002(opcode: u8, payload: &[u8]) {
    let b = TestBroker::start();
    let mut s = raw_ws_silent(b.client, "user=alice").await;
    s.write_all(&masked_frame(opcode, payload)).await.expect("write");
    assert_eq!(raw_close_code(s).await, Some(1002));
    let (mut ws, _) = b.connect("bob").await;
    b.publish("bob", "agent_started", json!({})).await;
    assert_eq!(next_events(&mut ws, 1).await[0]["event"], "agent_started");
}

/// A close frame whose payload is over 125 bytes must be answered with 1002
/// (fastwebsockets would echo it back: Autobahn case 7.3.6).
#[tokio::test]
async fn oversized_close_frame_gets_1002() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[b'x'; 124]);
    control_frame_gets_1002(0x8, &payload).await;
}

#[tokio::test]
async fn oversized_pong_gets_1002() {
    control_frame_gets_1002(0xA, &[7u8; 126]).await;
}
