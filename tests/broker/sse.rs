//! `GET /sse` (contract §3a), read with a raw HTTP reader so the wire
//! format itself is checked: the response head, `retry:`, the welcome and
//! event messages with their ids, resume from `Last-Event-ID`, ping
//! comments, refusals with JSON bodies, and streams ended by eviction and
//! deletion.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// One parsed SSE message (or comment).
#[derive(Debug, Default)]
struct Msg {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    retry: Option<u64>,
    comment: bool,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().expect("a data line")).expect("JSON data")
    }
}

/// A raw SSE reader over one TCP connection.
struct Sse {
    s: TcpStream,
    buf: Vec<u8>,
    head: String,
}

/// Opens `GET /sse?{query}` with extra header lines; returns the reader, or
/// the refusal's status and body.
async fn open(addr: std::net::SocketAddr, query: &str, headers: &str) -> Result<Sse, (u16, String)> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req =
        format!("GET /sse?{query} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("head in time").expect("read");
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let rest = buf[end..].to_vec();
    if status != 200 {
        let mut body = rest;
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut body)).await;
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    Ok(Sse { s, buf: rest, head })
}

impl Sse {
    /// The next message or comment; `None` at EOF. Bounded by [`WAIT`].
    async fn next(&mut self) -> Option<Msg> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..p + 2).collect();
                let text = String::from_utf8(block).expect("UTF-8 stream");
                let mut m = Msg::default();
                for line in text.lines().filter(|l| !l.is_empty()) {
                    if line.starts_with(':') {
                        m.comment = true;
                        continue;
                    }
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    match field {
                        "id" => m.id = Some(value.to_string()),
                        "event" => m.event = Some(value.to_string()),
                        "data" => {
                            assert!(m.data.is_none(), "one data line per message: {text:?}");
                            m.data = Some(value.to_string())
                        }
                        "retry" => m.retry = value.parse().ok(),
                        other => panic!("unknown field {other:?} in {text:?}"),
                    }
                }
                return Some(m);
            }
            let mut chunk = [0u8; 8192];
            let n =
                tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await.expect("a message in time");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next message that is not a comment or a `retry:` hint.
    async fn next_message(&mut self) -> Option<Msg> {
        loop {
            let m = self.next().await?;
            if !m.comment && m.event.is_some() {
                return Some(m);
            }
        }
    }

    async fn welcome(&mut self) -> Value {
        let m = self.next_message().await.expect("welcome");
        assert_eq!(m.event.as_deref(), Some("welcome"));
        let w = m.json();
        assert_eq!(w["type"], "welcome");
        w
    }

    async fn events(&mut self, n: usize) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.next_message().await.expect("an event");
            let v = m.json();
            assert_eq!(m.event.as_deref(), v["event"].as_str(), "event: names the event");
            out.push((m.id.expect("events carry an id"), v));
        }
        out
    }
}

#[tokio::test]
async fn sse_stream_has_the_wire_format_welcome_and_events_with_ids() {
    let b = TestBroker::start();
    let mut s = open(b.client, "user=sse1", "Origin: https://app.example\r\n").await.expect("stream opens");
    assert!(s.head.contains("Content-Type: text/event-stream"), "{}", s.head);
    assert!(s.head.contains("X-Accel-Buffering: no"), "{}", s.head);
    assert!(s.head.contains("Access-Control-Allow-Origin: https://app.example"), "{}", s.head);
    let first = s.next().await.expect("retry hint");
    assert!(first.retry.is_some(), "a retry: field first: {first:?}");
    let w = s.welcome().await;
    assert_eq!(w["user"], "sse1");
    let epoch = w["epoch"].as_str().unwrap().to_string();
    b.publish("sse1", "agent_thinking", json!({"text": "line\nbreak"})).await;
    b.publish("sse1", "tool_executing", json!({"tool": "search"})).await;
    let evs = s.events(2).await;
    assert_eq!(evs[0].0, format!("{epoch}:1"));
    assert_eq!(evs[1].0, format!("{epoch}:2"));
    assert_eq!(evs[0].1["data"]["text"], "line\nbreak");
    assert_eq!(evs[1].1["type"], "event");
    assert_eq!(evs[1].1["seq"], 2);
    b.stop().await;
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_then_continues_live() {
    let b = TestBroker::start();
    let mut s = open(b.client, "user=sse2", "").await.unwrap();
    let epoch = s.welcome().await["epoch"].as_str().unwrap().to_string();
    b.publish("sse2", "e", json!(1)).await;
    let evs = s.events(1).await;
    let last_id = evs[0].0.clone();
    drop(s);
    for i in 2..=4 {
        b.publish("sse2", "e", json!(i)).await;
    }
    // As a browser's EventSource reconnects: the URL is unchanged, the id is in the header.
    let mut s = open(b.client, "user=sse2", &format!("Last-Event-ID: {last_id}\r\n")).await.unwrap();
    let w = s.welcome().await;
    assert_eq!(w["recovered"], true);
    assert_eq!(w["epoch"], epoch);
    let missed = s.events(3).await;
    assert_eq!(missed.iter().map(|(_, v)| v["data"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3, 4]);
    b.publish("sse2", "e", json!(5)).await;
    assert_eq!(s.events(1).await[0].0, format!("{epoch}:5"));
    // ?since=&epoch= works too; a foreign epoch is not recovered and replays nothing.
    let mut q = open(b.client, &format!("user=sse2&since=3&epoch={epoch}"), "").await.unwrap();
    assert_eq!(q.welcome().await["recovered"], true);
    assert_eq!(q.events(2).await[0].1["seq"], 4);
    let mut f = open(b.client, "user=sse2", "Last-Event-ID: someoneelse-0.1:2\r\n").await.unwrap();
    assert_eq!(f.welcome().await["recovered"], false);
    b.publish("sse2", "e", json!(6)).await;
    assert_eq!(f.events(1).await[0].1["seq"], 6, "live only after recovered:false");
    // A malformed id is a 400 with a JSON body.
    let (status, body) = open(b.client, "user=sse2", "Last-Event-ID: nonsense\r\n").await.err().unwrap();
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "bad_request");
    b.stop().await;
}

#[tokio::test]
async fn websocket_and_sse_connections_of_one_user_get_the_same_stream() {
    let b = TestBroker::start();
    let (mut ws, _) = b.connect("both").await;
    let mut s = open(b.client, "user=both", "").await.unwrap();
    s.welcome().await;
    for i in 0..50 {
        let prio = ["high", "normal", "low"][i % 3];
        b.publish_prio("both", prio, json!(i)).await;
    }
    let over_ws = next_events(&mut ws, 50).await;
    let over_sse: Vec<Value> = s.events(50).await.into_iter().map(|(_, v)| v).collect();
    assert_eq!(over_ws, over_sse, "the same JSON objects, in the same order");
    let (_, stats) = b.get("/v1/stats").await;
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["sse_connections"], 1);
    assert_eq!(stats["events"]["delivered"], 100, "both transports count in delivered");
    b.stop().await;
}

#[tokio::test]
async fn sse_refusals_are_http_errors_with_json_bodies() {
    let b = TestBroker::with(|c| c.jwt_secret = Some(b"secret".to_vec()));
    let (status, body) = open(b.client, "user=x", "").await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "unauthorized");
    b.stop().await;
    let b = TestBroker::start();
    let (status, body) = open(b.client, "user=bad%20user", "").await.err().unwrap();
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "invalid_user");
    b.stop().await;
    let b = TestBroker::with(|c| c.allowed_origins = vec!["https://ok.example".into()]);
    let (status, _) = open(b.client, "user=x", "Origin: https://evil.example\r\n").await.err().unwrap();
    assert_eq!(status, 403);
    b.stop().await;
}

#[tokio::test]
async fn sse_gets_ping_comments_and_is_not_closed_by_the_idle_timeout() {
    let b = TestBroker::with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(300);
    });
    let mut s = open(b.client, "user=quiet", "").await.unwrap();
    s.welcome().await;
    // Well past the idle timeout, with pings along the way, the stream is open.
    let mut comments = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        let m = s.next().await.expect("stream open");
        assert!(m.comment, "only pings while nothing is published: {m:?}");
        comments += 1;
    }
    assert!(comments >= 5, "{comments} ping comments");
    b.publish("quiet", "still_here", json!(null)).await;
    assert_eq!(s.events(1).await[0].1["event"], "still_here");
    b.stop().await;
}

#[tokio::test]
async fn eviction_and_deletion_end_sse_streams() {
    let b = TestBroker::with(|c| c.max_conns_per_user = 1);
    let mut first = open(b.client, "user=evict", "").await.unwrap();
    first.welcome().await;
    let mut second = open(b.client, "user=evict", "").await.unwrap();
    second.welcome().await;
    let close = first.next_message().await.expect("a close message");
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.json()["code"], 4001);
    assert!(first.next().await.is_none(), "then the stream ends");
    let (_, r) = b.delete("/v1/users/evict").await;
    assert_eq!(r["closed"], 1);
    let close = second.next_message().await.expect("a close message");
    assert_eq!(close.json()["code"], 4000);
    assert!(second.next().await.is_none());
    // The user is still served afterwards.
    let mut again = open(b.client, "user=evict", "").await.unwrap();
    again.welcome().await;
    b.publish("evict", "back", json!(null)).await;
    assert_eq!(again.events(1).await[0].1["event"], "back");
    b.stop().await;
}
