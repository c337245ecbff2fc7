//! A relay with no broker logic: the latency floor beside the brokers.
//!
//! It speaks just enough of switchyard's protocol for this load generator —
//! a client WebSocket on `/ws?user=…` gets a welcome, a publisher stream on
//! `/v1/stream` sends NDJSON publish objects, `/v1/stats` answers — and in
//! between does only what any relay must: read a frame, find the user,
//! number the event, write it to that user's connections. No JSON parser,
//! no history, no queues beyond a channel per connection, one thread.
//!
//! It trusts its input to be the generator's own lines (fixed field order,
//! nothing to escape); it is a measuring instrument, not a server. Run
//! against it with the same generator and the same flags, it shows how much
//! of an end-to-end figure the machine, the kernel and the generator leave
//! for a broker to spend.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use crate::ws_config;

/// One user: the last sequence number given and the live connections.
#[derive(Default)]
struct User {
    seq: u64,
    conns: Vec<mpsc::UnboundedSender<Message>>,
}

type Users = Rc<RefCell<HashMap<String, User>>>;

/// Binds both listeners, prints `relay listening client=… api=…` and serves
/// until the process is killed. Runs on the calling thread.
pub fn run(listen: SocketAddr, api_listen: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let clients = TcpListener::bind(listen).await.context("binding the client listener")?;
        let api = TcpListener::bind(api_listen).await.context("binding the API listener")?;
        println!("relay listening client={} api={}", clients.local_addr()?, api.local_addr()?);
        let users: Users = Rc::default();
        tokio::task::spawn_local(accept_clients(clients, users.clone()));
        accept_api(api, users).await
    })
}

async fn accept_clients(listener: TcpListener, users: Users) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(client(stream, users.clone()));
    }
}

/// A client connection: welcome, then a writer fed by the publishers.
async fn client(stream: TcpStream, users: Users) {
    let Some((ws, query)) = accept(stream).await else { return };
    let Some(user) = query.split('&').find_map(|kv| kv.strip_prefix("user=")).map(str::to_string) else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let welcome = format!(
        r#"{{"type":"welcome","user":"{user}","conn":"relay","epoch":"relay","seq":0,"recovered":false,"ping_ms":25000}}"#
    );
    if sink.send(Message::text(welcome)).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    users.borrow_mut().entry(user).or_default().conns.push(tx);
    // Reads only to notice the close; the generator sends nothing else.
    tokio::task::spawn_local(async move { while let Some(Ok(_)) = stream.next().await {} });
    while let Some(first) = rx.recv().await {
        // Whatever else is queued goes out in the same flush.
        if sink.feed(first).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if sink.feed(more).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

async fn accept_api(listener: TcpListener, users: Users) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(api(stream, users.clone()));
    }
}

/// An API connection: a publisher stream, or one plain `GET`.
async fn api(mut stream: TcpStream, users: Users) {
    let mut head = [0u8; 1024];
    let Ok(n) = stream.peek(&mut head).await else { return };
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    if head.starts_with("GET /v1/stream") {
        publisher(stream, users).await;
        return;
    }
    // Drain the request head, answer, close.
    let mut buf = vec![0u8; 4096];
    let _ = stream.read(&mut buf).await;
    let (status, body) = if head.starts_with("GET /v1/stats") {
        ("200 OK", r#"{"events":{"shed":0}}"#)
    } else {
        (
            "404 Not Found",
            r#"{"error":{"code":"not_found","message":"the relay serves /v1/stream and /v1/stats"}}"#,
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
}

/// A publisher stream: each line is relayed to its user's connections;
/// with `?acks=1`, each message is answered with its events' seqs.
async fn publisher(stream: TcpStream, users: Users) {
    let Some((ws, query)) = accept(stream).await else { return };
    let acks = query.split('&').any(|p| p == "acks=1");
    let (mut sink, mut stream) = ws.split();
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let mut seqs = Vec::new();
        for line in text.as_str().split('\n').filter(|l| !l.is_empty()) {
            seqs.push(relay_line(line, &users));
        }
        if acks {
            let results: Vec<String> =
                seqs.iter().map(|s| s.map_or("{}".to_string(), |s| format!(r#"{{"seq":{s}}}"#))).collect();
            let ack = format!(r#"{{"type":"ack","results":[{}]}}"#, results.join(","));
            if sink.send(Message::text(ack)).await.is_err() {
                return;
            }
        }
    }
}

/// Numbers one publish object and queues it to its user's connections;
/// the event's seq, or `None` for a line it cannot read.
fn relay_line(line: &str, users: &Users) -> Option<u64> {
    let user = field(line, "\"user\":\"")?;
    let event = field(line, "\"event\":\"").unwrap_or("event");
    let priority = field(line, "\"priority\":\"").unwrap_or("normal");
    let data = line.find("\"data\":").map(|i| &line[i + 7..line.len() - 1])?;
    let mut users = users.borrow_mut();
    let u = users.entry(user.to_string()).or_default();
    u.seq += 1;
    let frame = format!(
        r#"{{"type":"event","seq":{},"event":"{event}","priority":"{priority}","data":{data}}}"#,
        u.seq
    );
    let msg = Message::text(frame);
    u.conns.retain(|c| c.send(msg.clone()).is_ok());
    Some(u.seq)
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Answers a WebSocket upgrade; the socket and the request's query string.
// The callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
async fn accept(stream: TcpStream) -> Option<(Ws, String)> {
    let mut query = String::new();
    let capture = |req: &Request, resp: Response| {
        query = req.uri().query().unwrap_or_default().to_string();
        Ok(resp)
    };
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, capture, Some(ws_config())).await.ok()?;
    Some((ws, query))
}

/// The string value after `key` (up to the next quote).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generator_line_is_numbered_per_user_and_keeps_its_data_verbatim() {
        let users: Users = Rc::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        users.borrow_mut().entry("load-1".into()).or_default().conns.push(tx);
        let line = r#"{"user":"load-1","event":"load","priority":"high","data":{"u":"load-1","n":7,"t":99,"p":"xx"}}"#;
        assert_eq!(relay_line(line, &users), Some(1));
        assert_eq!(relay_line(line, &users), Some(2));
        let Ok(Message::Text(first)) = rx.try_recv() else { panic!("nothing relayed") };
        assert_eq!(
            first.as_str(),
            r#"{"type":"event","seq":1,"event":"load","priority":"high","data":{"u":"load-1","n":7,"t":99,"p":"xx"}}"#
        );
        assert_eq!(relay_line(r#"{"event":"x"}"#, &users), None, "a line without a user is refused");
    }
}
