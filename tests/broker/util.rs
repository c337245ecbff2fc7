//! Shared helpers: start a real broker on ephemeral loopback ports, talk to it
//! with independent clients (tokio-tungstenite for WebSockets, hyper's client
//! for HTTP). Every wait is bounded.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use switchyard::{Config, Running};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(30);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A broker running in this process on ephemeral loopback ports.
pub struct TestBroker {
    pub client: SocketAddr,
    pub api: SocketAddr,
    pub running: Option<Running>,
    pub api_key: Option<String>,
}

impl TestBroker {
    pub fn start() -> Self {
        Self::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config::for_tests();
        f(&mut cfg);
        let api_key = cfg.api_key.clone();
        let running = switchyard::start(cfg).expect("broker starts");
        TestBroker { client: running.client_addr, api: running.api_addr, running: Some(running), api_key }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.client, query)
    }

    /// Connects as `user` (dev mode) and returns the socket and its welcome frame.
    pub async fn connect(&self, user: &str) -> (Ws, Value) {
        self.connect_query(&format!("user={user}")).await
    }

    pub async fn connect_query(&self, query: &str) -> (Ws, Value) {
        connect_welcomed(&self.ws_url(query)).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
        self.request("POST", path, body.into(), self.api_key.as_deref()).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, Bytes::new(), self.api_key.as_deref()).await
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let (status, _, body) = http(self.api, "GET", path, Bytes::new(), self.api_key.as_deref()).await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request("DELETE", path, Bytes::new(), self.api_key.as_deref()).await
    }

    pub async fn request(&self, method: &str, path: &str, body: Bytes, key: Option<&str>) -> (u16, Value) {
        let (status, _, body) = http(self.api, method, path, body, key).await;
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, v)
    }

    /// Publishes one event and returns the response body (asserting 200).
    pub async fn publish(&self, user: &str, event: &str, data: Value) -> Value {
        let body = serde_json::json!({"user": user, "event": event, "data": data});
        let (status, v) = self.post("/v1/publish", body.to_string()).await;
        assert_eq!(status, 200, "publish failed: {v}");
        v
    }

    pub async fn publish_prio(&self, user: &str, prio: &str, data: Value) -> Value {
        let body = serde_json::json!({"user": user, "event": "e", "data": data, "priority": prio});
        let (status, v) = self.post("/v1/publish", body.to_string()).await;
        assert_eq!(status, 200, "publish failed: {v}");
        v
    }

    /// Shuts down and waits for the shards (off the async runtime).
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            tokio::task::spawn_blocking(move || r.shutdown()).await.expect("shutdown");
        }
    }
}

/// Opens a WebSocket to `url` (bounded) and reads its first frame, which
/// must be the `welcome`.
pub async fn connect_welcomed(url: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade accepted");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "first frame is welcome: {welcome}");
    (ws, welcome)
}

/// One HTTP/1.1 request with hyper's client. Returns status, headers, body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Bytes,
    key: Option<&str>,
) -> (u16, hyper::HeaderMap, Bytes) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(body)).expect("request builds");
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("response in time")
        .expect("http request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, headers, body)
}

/// Next data frame (text or binary); protocol pings are answered by
/// tungstenite and skipped. The whole wait, pings included, is bounded by [`WAIT`].
pub async fn next_data<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Message {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("valid frame");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Next text frame as JSON.
pub async fn next_json<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Value {
    match next_data(ws).await {
        Message::Text(t) => serde_json::from_str(&t).expect("JSON frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Reads `n` event frames.
pub async fn next_events<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    n: usize,
) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = next_json(ws).await;
        if v["type"] == "event" {
            out.push(v);
        }
    }
    out
}

/// Waits (bounded by [`WAIT`] overall) for the close frame and returns its code.
pub async fn close_code(ws: &mut Ws) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => return u16::from(code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string())).await.expect("send");
}

pub fn close_frame(code: u16) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: "".into() }))
}

/// Sends a raw HTTP request to the client listener; returns status and body.
pub async fn raw_upgrade(addr: SocketAddr, path: &str, extra_headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("response in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Current unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Starts the binary with JSON logs; returns the child and its two addresses.
pub fn spawn_binary(extra: &[&str]) -> (std::process::Child, String, String) {
    spawn_logged(loopback_broker(extra))
}

/// The binary on ephemeral loopback ports, with `extra` flags.
pub fn loopback_broker(extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]).args(extra);
    cmd
}

/// [`spawn_binary`] for tests that measure RSS: the allocator (mimalloc)
/// returns freed pages to the OS at once instead of keeping them for reuse
/// until the thread that owns them allocates again, so RSS shows the
/// memory the broker still holds rather than pages it has freed.
pub fn spawn_binary_measuring_rss(extra: &[&str]) -> (std::process::Child, String, String) {
    let mut cmd = loopback_broker(extra);
    cmd.env("MIMALLOC_PURGE_DELAY", "0");
    spawn_logged(cmd)
}

/// Starts a broker command (flags given by the caller) with JSON logs;
/// returns the child and the two addresses it logs.
pub fn spawn_logged(cmd: std::process::Command) -> (std::process::Child, String, String) {
    spawn_reading_logs(cmd, true)
}

/// [`spawn_logged`], but the read end of the broker's stderr is closed once
/// the addresses are logged: a log collector that went away.
pub fn spawn_then_close_stderr(cmd: std::process::Command) -> (std::process::Child, String, String) {
    spawn_reading_logs(cmd, false)
}

fn spawn_reading_logs(mut cmd: std::process::Command, keep: bool) -> (std::process::Child, String, String) {
    let mut child = cmd
        .args(["--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn broker");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                panic!("a log line that is not JSON: {line}");
            };
            if v["fields"]["message"] == "switchyard listening" {
                let _ = tx.send((
                    v["fields"]["client"].as_str().unwrap_or_default().to_string(),
                    v["fields"]["api"].as_str().unwrap_or_default().to_string(),
                ));
                if !keep {
                    return; // the read end of the pipe is dropped here
                }
            }
        }
    });
    let (client, api) = rx.recv_timeout(WAIT).expect("broker logs its addresses");
    (child, client, api)
}

/// Opens a WebSocket with a hand-written handshake and returns the raw socket
/// without reading anything: a client that never reads and never answers pings.
pub async fn raw_ws_silent(addr: SocketAddr, query: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    s
}

/// Reads a raw server stream to its end and returns the close code it carried.
pub async fn raw_close_code(s: TcpStream) -> Option<u16> {
    let (_, frames) = raw_read_to_end(s).await;
    let (_, close) = frames.iter().find(|(op, p)| *op == 0x8 && p.len() >= 2)?;
    Some(u16::from_be_bytes([close[0], close[1]]))
}

/// Reads a raw server stream to its end: the HTTP head, then every whole
/// server (unmasked) frame after it as (opcode, payload).
pub async fn raw_read_to_end(mut s: TcpStream) -> (String, Vec<(u8, Vec<u8>)>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("stream ends in time");
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        return (String::from_utf8_lossy(&buf).into_owned(), Vec::new());
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut frames = Vec::new();
    let mut i = end;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (hdr, len) = match buf[i + 1] & 0x7f {
            126 if i + 4 <= buf.len() => (4, u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize),
            127 if i + 10 <= buf.len() => {
                (10, u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize)
            }
            126 | 127 => break,
            n => (2, n as usize),
        };
        let Some(payload) = buf.get(i + hdr..i + hdr + len) else { break };
        frames.push((op, payload.to_vec()));
        i += hdr + len;
    }
    (head, frames)
}

/// A masked client frame (FIN set) as a browser would send it.
pub fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A publisher stream (`/v1/stream` + `query`), with the API key if any.
pub async fn stream(b: &TestBroker, query: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://{}/v1/stream{}", b.api, query);
    let mut req = url.into_client_request().unwrap();
    if let Some(k) = &b.api_key {
        req.headers_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await.unwrap().unwrap();
    ws
}

/// A hand-written publisher-stream upgrade request (`?acks=1`), to which
/// raw client frames can be appended and sent in the same write.
pub fn stream_upgrade_head(api_key: Option<&str>) -> Vec<u8> {
    let auth = api_key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!(
        "GET /v1/stream?acks=1 HTTP/1.1\r\nHost: localhost\r\n{auth}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes()
}

/// Sends a publisher-stream upgrade (`?acks=1`) and one publish frame in a
/// single write — the frame arrives in the same packet as the request head,
/// so the broker must hand the bytes it read past the head to the stream —
/// and returns everything read up to and including the ack.
pub async fn stream_publish_raw<S>(s: &mut S, api_key: Option<&str>, body: &str) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = stream_upgrade_head(api_key);
    out.extend_from_slice(&masked_frame(0x1, body.as_bytes()));
    s.write_all(&out).await.expect("write");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&got).contains("\"type\":\"ack\"") {
        let mut chunk = [0u8; 4096];
        let n =
            tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("ack in time").expect("read");
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}
