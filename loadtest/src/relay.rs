//! A relay with no broker logic: the floor beside the brokers.
//!
//! It speaks just enough of switchyard's protocol for this load generator —
//! a client WebSocket on `/ws?user=…` gets a welcome, a publisher stream on
//! `/v1/stream` sends NDJSON publish objects, `/v1/stats` answers — and in
//! between does only what any relay must: read a frame, find the user,
//! number the event, write it to that user's connections. No JSON parser,
//! no history, one thread, and written to be as cheap per delivery as we
//! know how: client frames are unmasked in the read buffer, each event is
//! appended (header and all) to its connections' output buffers, and at
//! the end of each read every connection with output gets one
//! non-blocking write straight from the publisher's task; only what the
//! kernel refuses waits for a writer task. So at max rate it shows the
//! most deliveries per second this machine, its kernel and the generator
//! leave room for, and at fixed rates the latency floor.
//!
//! It trusts its input to be the generator's own lines (fixed field order,
//! nothing to escape); it is a measuring instrument, not a server.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::Context as _;
use memchr::memmem::Finder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::ws_config;
use switchyard::wsframe::{put_frame, put_header, OP_CLOSE, OP_TEXT};

/// Largest client message the relay takes (the generator's are ≤ ~1 MiB).
const MAX_MESSAGE: usize = 16 << 20;
/// Read size for a publisher stream.
const READ_CHUNK: usize = 256 << 10;

/// One client connection: what is waiting to be written, and the socket.
struct Conn {
    stream: TcpStream,
    out: RefCell<Vec<u8>>,
    /// Its writer task is waiting for the socket to take the rest.
    parked: Notify,
    dead: Cell<bool>,
}

impl Conn {
    /// Writes as much of `out` as the socket takes now; `true` when empty.
    fn flush_now(&self) -> bool {
        let mut out = self.out.borrow_mut();
        let mut done = 0;
        while done < out.len() {
            match self.stream.try_write(&out[done..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        out.drain(..done);
        out.is_empty()
    }
}

/// One user: the last sequence number given and the live connections.
#[derive(Default)]
struct User {
    seq: u64,
    conns: Vec<Rc<Conn>>,
}

#[derive(Default)]
struct Relay {
    users: RefCell<HashMap<Box<[u8]>, User, BuildHasherDefault<Fnv>>>,
    finders: Finders,
    /// Connections given output since the last flush.
    dirty: RefCell<Vec<Rc<Conn>>>,
    /// One event's frame payload, reused.
    scratch: RefCell<Vec<u8>>,
}

/// Binds both listeners, prints `relay listening client=… api=…` and serves
/// until the process is killed. Runs on the calling thread.
pub fn run(listen: SocketAddr, api_listen: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let clients = TcpListener::bind(listen).await.context("binding the client listener")?;
        let api = TcpListener::bind(api_listen).await.context("binding the API listener")?;
        println!("relay listening client={} api={}", clients.local_addr()?, api.local_addr()?);
        let relay = Rc::new(Relay::default());
        tokio::task::spawn_local(accept_clients(clients, relay.clone()));
        accept_api(api, relay).await
    })
}

async fn accept_clients(listener: TcpListener, relay: Rc<Relay>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(client(stream, relay.clone()));
    }
}

/// A client connection: welcome, then a writer for what a flush left over;
/// its reader notices the close.
async fn client(stream: TcpStream, relay: Rc<Relay>) {
    let Some((stream, query)) = accept(stream).await else { return };
    let Some(user) = query.split('&').find_map(|kv| kv.strip_prefix("user=")).map(str::to_string) else {
        return;
    };
    let welcome = format!(
        r#"{{"type":"welcome","user":"{user}","conn":"relay","epoch":"relay","seq":0,"recovered":false,"ping_ms":25000}}"#
    );
    let mut out = Vec::with_capacity(4096);
    put_frame(&mut out, OP_TEXT, welcome.as_bytes());
    let conn =
        Rc::new(Conn { stream, out: RefCell::new(out), parked: Notify::new(), dead: Cell::new(false) });
    relay
        .users
        .borrow_mut()
        .entry(user.into_bytes().into_boxed_slice())
        .or_default()
        .conns
        .push(conn.clone());
    tokio::task::spawn_local(read_until_close(conn.clone()));
    loop {
        while !conn.flush_now() {
            if conn.dead.get() || conn.stream.writable().await.is_err() {
                conn.dead.set(true);
                return;
            }
        }
        if conn.dead.get() {
            return;
        }
        conn.parked.notified().await;
    }
}

/// Reads a client's frames until it closes (answering its close frame); the
/// generator sends nothing else.
async fn read_until_close(conn: Rc<Conn>) {
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    loop {
        if conn.stream.readable().await.is_err() {
            break;
        }
        match conn.stream.try_read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
        if let Some(Frame { opcode: OP_CLOSE, .. }) = next_frame(&mut buf[..have]) {
            let mut out = conn.out.borrow_mut();
            put_frame(&mut out, OP_CLOSE, &[0x03, 0xe8]);
            drop(out);
            conn.parked.notify_one();
            break;
        }
        if have == buf.len() {
            have = 0; // nothing but a close matters here
        }
    }
    conn.dead.set(true);
    conn.parked.notify_one();
}

async fn accept_api(listener: TcpListener, relay: Rc<Relay>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(api(stream, relay.clone()));
    }
}

/// An API connection: a publisher stream, or one plain `GET`.
async fn api(mut stream: TcpStream, relay: Rc<Relay>) {
    let mut head = [0u8; 1024];
    let Ok(n) = stream.peek(&mut head).await else { return };
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    if head.starts_with("GET /v1/stream") {
        publisher(stream, relay).await;
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

/// A publisher stream: each line of each message is relayed to its user's
/// connections; with `?acks=1`, each message is answered with its events'
/// seqs. Connections given output are flushed once per read.
async fn publisher(stream: TcpStream, relay: Rc<Relay>) {
    let Some((mut stream, query)) = accept(stream).await else { return };
    let acks = query.split('&').any(|p| p == "acks=1");
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut message: Vec<u8> = Vec::new();
    let mut reply: Vec<u8> = Vec::new();
    let mut results = String::new();
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut used = 0;
        while let Some(f) = next_frame(&mut buf[used..]) {
            let payload = &buf[used + f.start..used + f.end];
            used += f.end;
            if f.opcode == OP_CLOSE {
                relay.flush(); // what this read queued still goes out
                return;
            }
            message.extend_from_slice(payload);
            if !f.fin {
                continue;
            }
            results.clear();
            for line in message.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let seq = relay.line(line);
                if acks {
                    if !results.is_empty() {
                        results.push(',');
                    }
                    match seq {
                        Some(s) => {
                            results.push_str(r#"{"seq":"#);
                            results.push_str(itoa::Buffer::new().format(s));
                            results.push('}');
                        }
                        None => results.push_str("{}"),
                    }
                }
            }
            message.clear();
            if acks {
                let ack = format!(r#"{{"type":"ack","results":[{results}]}}"#);
                put_frame(&mut reply, OP_TEXT, ack.as_bytes());
            }
        }
        buf.drain(..used);
        if buf.len() > MAX_MESSAGE || message.len() > MAX_MESSAGE {
            return;
        }
        relay.flush();
        if !reply.is_empty() {
            if stream.write_all(&reply).await.is_err() {
                return;
            }
            reply.clear();
        }
    }
}

impl Relay {
    /// Numbers one publish object and queues its frame on its user's
    /// connections; the event's seq, or `None` for a line it cannot read.
    /// The generator writes its members in a fixed order (`id`, `user`,
    /// `event`, `priority`, `data` last), so each is looked for after the one
    /// before.
    fn line(&self, line: &[u8]) -> Option<u64> {
        let (user, at) = field(line, 0, &self.finders.user)?;
        let (event, at) = field(line, at, &self.finders.event).unwrap_or((b"event", at));
        let (priority, at) = field(line, at, &self.finders.priority).unwrap_or((b"normal", at));
        let data = line.get(at..)?;
        let data = data.get(self.finders.data.find(data)? + 7..data.len() - 1)?;
        let mut users = self.users.borrow_mut();
        let u = match users.get_mut(user) {
            Some(u) => u,
            None => users.entry(user.into()).or_default(),
        };
        u.seq += 1;
        let mut p = self.scratch.borrow_mut();
        p.clear();
        p.extend_from_slice(br#"{"type":"event","seq":"#);
        p.extend_from_slice(itoa::Buffer::new().format(u.seq).as_bytes());
        for part in
            [&br#","event":""#[..], event, br#"","priority":""#, priority, br#"","data":"#, data, b"}"]
        {
            p.extend_from_slice(part);
        }
        u.conns.retain(|c| !c.dead.get());
        let mut dirty = self.dirty.borrow_mut();
        for c in &u.conns {
            let mut out = c.out.borrow_mut();
            if out.is_empty() {
                dirty.push(c.clone());
            }
            put_header(&mut out, OP_TEXT, p.len());
            out.extend_from_slice(&p);
        }
        Some(u.seq)
    }

    /// One write per connection given output; what the socket does not
    /// take now goes to the connection's writer task.
    fn flush(&self) {
        // A write touches only its connection's buffer, never this list.
        for c in self.dirty.borrow_mut().drain(..) {
            if !c.flush_now() {
                c.parked.notify_one();
            }
        }
    }
}

/// One client frame found at the start of a read buffer: its payload's
/// range (unmasked in place) and where the next frame starts.
struct Frame {
    fin: bool,
    opcode: u8,
    start: usize,
    end: usize,
}

/// Parses and unmasks the frame at the start of `b`, if it is all there.
fn next_frame(b: &mut [u8]) -> Option<Frame> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let mask: Option<[u8; 4]> = if masked {
        let m = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let end = at.checked_add(len)?;
    let payload = b.get_mut(at..end)?;
    if let Some(m) = mask {
        unmask(payload, m);
    }
    Some(Frame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, start: at, end })
}

/// XORs `payload` with the 4-byte `mask`, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    let done = payload.len() & !7;
    for (i, x) in payload[done..].iter_mut().enumerate() {
        *x ^= mask[i & 3];
    }
}

/// Answers a WebSocket upgrade; the socket and the request's query string.
/// (The client sends nothing before it reads the 101, so the handshake
/// leaves no frame bytes behind in tungstenite's buffer.)
// The callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
async fn accept(stream: TcpStream) -> Option<(TcpStream, String)> {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let mut query = String::new();
    let capture = |req: &Request, resp: Response| {
        query = req.uri().query().unwrap_or_default().to_string();
        Ok(resp)
    };
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, capture, Some(ws_config())).await.ok()?;
    Some((ws.into_inner(), query))
}

/// The string value after `key`, looked for from `from` (up to the next
/// quote), and where it ends.
fn field<'a>(line: &'a [u8], from: usize, key: &Finder<'static>) -> Option<(&'a [u8], usize)> {
    let start = from + key.find(line.get(from..)?)? + key.needle().len();
    let len = memchr::memchr(b'"', line.get(start..)?)?;
    Some((&line[start..start + len], start + len))
}

/// The member keys a line is searched for, built once.
struct Finders {
    user: Finder<'static>,
    event: Finder<'static>,
    priority: Finder<'static>,
    data: Finder<'static>,
}

impl Default for Finders {
    fn default() -> Self {
        Finders {
            user: Finder::new(b"\"user\":\""),
            event: Finder::new(b"\"event\":\""),
            priority: Finder::new(b"\"priority\":\""),
            data: Finder::new(b"\"data\":"),
        }
    }
}

/// FNV-1a: user IDs are short, and the relay is the only one hashing them.
#[derive(Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_are_unmasked_in_place_and_found_whole_only() {
        // RFC 6455 §5.7's masked "Hello".
        let mut b = vec![0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58, 0x88];
        assert!(next_frame(&mut b[..8]).is_none(), "a partial frame is not taken");
        let f = next_frame(&mut b).expect("a whole frame");
        assert!(f.fin);
        assert_eq!(f.opcode, OP_TEXT);
        assert_eq!(&b[f.start..f.end], b"Hello");
        assert_eq!(f.end, 11);
    }

    #[test]
    fn word_wise_unmasking_matches_the_byte_rule_at_every_length() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..40 {
            let plain: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(31)).collect();
            let mut fast = plain.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = plain.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }

    #[test]
    fn members_are_found_in_the_generators_order() {
        let f = Finders::default();
        let line =
            br#"{"id":"e1","user":"load-1","event":"load","priority":"high","data":{"u":"load-1","p":"x"}}"#;
        let (user, at) = field(line, 0, &f.user).expect("user");
        assert_eq!(user, b"load-1");
        let (event, at) = field(line, at, &f.event).expect("event");
        assert_eq!(event, b"load");
        let (priority, _) = field(line, at, &f.priority).expect("priority");
        assert_eq!(priority, b"high");
        assert!(field(br#"{"event":"x"}"#, 0, &f.user).is_none(), "a line without a user is refused");
    }
}
