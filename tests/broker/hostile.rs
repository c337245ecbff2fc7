//! Hostile clients: slow-loris upgrades, handshake floods, foreign origins,
//! oversized heads, connection floods. Each ends by showing a well-behaved
//! client is still served.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

async fn still_serving(b: &TestBroker) {
    let (mut ws, _) = b.connect("fine").await;
    b.publish("fine", "ok", json!(null)).await;
    assert_eq!(next_json(&mut ws).await["event"], "ok");
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("answer in time");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn slow_loris_upgrades_time_out_with_408() {
    let b = TestBroker::with(|c| c.handshake_timeout = Duration::from_millis(300));
    let mut s = TcpStream::connect(b.client).await.unwrap();
    s.write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\n").await.unwrap(); // never finishes
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn too_many_pending_handshakes_get_503() {
    let b = TestBroker::with(|c| {
        c.max_pending_handshakes = 4;
        c.handshake_timeout = Duration::from_secs(30);
    });
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(b.client).await.unwrap();
        s.write_all(b"GET /ws").await.unwrap();
        idle.push(s);
    }
    // The 5th socket is refused at once, while the 4 idle ones hold their slots.
    let mut refused = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(b.client).await.unwrap();
        let text = read_all(&mut s).await;
        if text.starts_with("HTTP/1.1 503") {
            assert!(text.contains("too_many_handshakes"), "{text}");
            refused = true;
            break;
        }
    }
    assert!(refused, "the handshake cap holds");
    drop(idle); // the slots free up
    let mut ok = false;
    for _ in 0..100 {
        if tokio_tungstenite::connect_async(b.ws_url("user=fine")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok);
    still_serving(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn foreign_origins_are_refused() {
    let b = TestBroker::with(|c| c.allowed_origins = vec!["https://app.example".into()]);
    let (status, body) = raw_upgrade(b.client, "/ws?user=x", "Origin: https://evil.example\r\n").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("forbidden_origin"));
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = b.ws_url("user=x").into_client_request().unwrap();
    req.headers_mut().insert("origin", "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok(), "the allowed origin gets in");
    still_serving(&b).await; // no Origin header: a non-browser client
    b.stop().await;
}

#[tokio::test]
async fn huge_headers_get_431() {
    let b = TestBroker::start();
    let big = format!("X-Junk: {}\r\n", "a".repeat(10_000));
    let (status, _) = raw_upgrade(b.client, "/ws?user=x", &big).await;
    assert_eq!(status, 431);
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, _) = raw_upgrade(b.client, "/ws?user=x", &many).await;
    assert_eq!(status, 431);
    still_serving(&b).await;
    b.stop().await;
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_leaves_nothing_behind() {
    const FLOOD: usize = 20_000;
    let (mut child, client, api) = spawn_binary(&["--history-ttl", "1s", "--shards", "2"]);
    let pid = child.id();
    let api: std::net::SocketAddr = api.parse().unwrap();
    let stats = || async move {
        let (_, _, body) = http(api, "GET", "/v1/stats", bytes::Bytes::new(), None).await;
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    // Warm up (first connection allocates per-thread state), then take the baseline.
    {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{client}/ws?user=warm")).await.unwrap();
        next_json(&mut ws).await;
    }
    let settle = |want_users: u64| async move {
        for _ in 0..1000 {
            let s = stats().await;
            if s["connections"] == 0 && s["users"].as_u64() == Some(want_users) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the broker did not settle");
    };
    settle(0).await;
    let (fd0, rss0) = (fd_count(pid), rss_kib(pid));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let url = format!("ws://{client}/ws?user=flood{}", i % 500);
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("flood connect");
            next_json(&mut ws).await;
            drop(ws);
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    settle(0).await; // every connection gone, every idle user swept
    let mut fds_back = false;
    for _ in 0..500 {
        if fd_count(pid) <= fd0 {
            fds_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fds_back, "file descriptors back to baseline: {} vs {fd0}", fd_count(pid));
    let rss1 = rss_kib(pid);
    // 20,000 leaked connections would hold > 160 MiB of read buffers alone.
    assert!(rss1 < rss0 + 32 * 1024, "memory back near baseline: {rss0} KiB → {rss1} KiB");
    // Still serving.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{client}/ws?user=after")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

use std::process::Command;
