//! The peer under the same load: nats-server, measured side by side with
//! switchyard (`switchyard-load run --peer nats`). Clients subscribe to
//! their user's subject over nats-server's WebSocket listener, as browsers
//! would; publishers write `PUB` over its TCP listener, fire-and-forget
//! (NATS core has no per-message acknowledgement), batching whatever is
//! queued into one write, as the switchyard publishers batch stream frames.
//!
//! A message's payload is shaped like a switchyard event frame
//! (`{"type":"event","seq":…,"data":{"u","n","t"}}`) with a per-user seq the
//! scheduler assigns, so the same checker proves no loss, duplicate,
//! reorder or misroute.

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::wsclient::{Message, WsClient};

/// What a user's subject starts with (the user's name follows).
const SUBJECT_PREFIX: &str = "u.";

/// The subject a user's events are published on.
pub fn subject(user: &str) -> String {
    format!("{SUBJECT_PREFIX}{user}")
}

/// A subscriber over nats-server's WebSocket listener.
pub struct NatsConn {
    ws: WsClient,
    /// Protocol bytes received and not yet parsed (a message may span
    /// frames); usually a view of the last frame, so nothing is copied.
    buf: Bytes,
    /// Parsed payloads (views of the frames) not yet handed out.
    ready: std::collections::VecDeque<Bytes>,
}

impl NatsConn {
    /// Connects to `ws://host:port`, subscribes to `user`'s subject and
    /// waits for the server to confirm (PING → PONG), so nothing published
    /// after this returns is missed.
    pub async fn open(stream: TcpStream, url: &str, user: &str) -> anyhow::Result<NatsConn> {
        let ws = WsClient::connect(stream, url).await?;
        let mut c = NatsConn { ws, buf: Bytes::new(), ready: Default::default() };
        let hello = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {} 1\r\nPING\r\n",
            subject(user)
        );
        c.ws.send_binary(hello.as_bytes()).await?;
        loop {
            match c.read_more().await? {
                Some(Line::Pong) => return Ok(c),
                Some(_) => continue,
                None => bail!("nats-server closed before confirming the subscription"),
            }
        }
    }

    /// The next message payload; `None` when the connection ended.
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Some(p);
            }
            match self.read_more().await {
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    pub async fn close(&mut self) {
        self.ws.close().await;
    }

    /// Reads one frame and parses what it completes; a server PING's PONG
    /// is queued, written before the next read (so a read cancelled mid-way
    /// never loses the answer).
    async fn read_more(&mut self) -> anyhow::Result<Option<Line>> {
        let frame = match self.ws.next().await {
            Some(Message::Binary(b) | Message::Text(b)) => b,
            None => return Ok(None),
        };
        self.buf = if self.buf.is_empty() {
            frame
        } else {
            let mut joined = BytesMut::with_capacity(self.buf.len() + frame.len());
            joined.extend_from_slice(&self.buf);
            joined.extend_from_slice(&frame);
            joined.freeze()
        };
        let mut last = Line::Other;
        // Parsed from an offset and cut once: cutting per message would be
        // quadratic in a frame of thousands of messages.
        let mut off = 0;
        while let Some((line, used)) = parse(&self.buf[off..])? {
            match line {
                Parsed::Msg(at) => self.ready.push_back(self.buf.slice(off + at.start..off + at.end)),
                Parsed::Ping => self.ws.queue_binary(b"PONG\r\n"),
                Parsed::Pong => last = Line::Pong,
                Parsed::Other => {}
            }
            off += used;
        }
        self.buf = self.buf.slice(off..);
        Ok(Some(last))
    }
}

enum Line {
    Pong,
    Other,
}

enum Parsed {
    /// A message; its payload's place in the bytes parsed.
    Msg(std::ops::Range<usize>),
    Ping,
    Pong,
    Other,
}

/// Parses one protocol line (and a message's payload) from the front of
/// `buf`: the item and the bytes it used, or `None` when incomplete.
fn parse(buf: &[u8]) -> anyhow::Result<Option<(Parsed, usize)>> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else { return Ok(None) };
    let line = std::str::from_utf8(&buf[..eol]).context("non-UTF-8 protocol line")?;
    let after = eol + 2;
    let mut words = line.split_ascii_whitespace();
    match words.next().map(str::to_ascii_uppercase).as_deref() {
        Some("MSG") => {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let len: usize = line
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("bad MSG line {line:?}"))?;
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            Ok(Some((Parsed::Msg(after..after + len), after + len + 2)))
        }
        Some("PING") => Ok(Some((Parsed::Ping, after))),
        Some("PONG") => Ok(Some((Parsed::Pong, after))),
        Some("-ERR") => bail!("nats-server: {line}"),
        _ => Ok(Some((Parsed::Other, after))),
    }
}

/// A publisher over nats-server's TCP listener.
pub struct NatsPublisher {
    stream: TcpStream,
    out: Vec<u8>,
}

impl NatsPublisher {
    pub async fn connect(addr: &str) -> anyhow::Result<NatsPublisher> {
        let mut stream =
            TcpStream::connect(addr).await.with_context(|| format!("connecting to nats {addr}"))?;
        let _ = stream.set_nodelay(true);
        stream.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n").await?;
        Ok(NatsPublisher { stream, out: Vec::with_capacity(64 * 1024) })
    }

    /// Queues one `PUB` (written by [`flush`](Self::flush)) whose payload is
    /// the event frame of publish object `object` with `seq`:
    /// `{"type":"event","seq":S,` followed by the object's members. Written
    /// straight into the output buffer, with no allocation: at max rate this
    /// is once per event, and the generator must stay cheaper than the
    /// brokers it measures.
    pub fn queue_event(&mut self, user: &str, seq: u64, object: &str) {
        const HEAD: &str = "{\"type\":\"event\",\"seq\":";
        let members = object.strip_prefix('{').unwrap_or(object);
        let mut digits = itoa::Buffer::new();
        let seq = digits.format(seq);
        let len = HEAD.len() + seq.len() + 1 + members.len();
        let mut n = itoa::Buffer::new();
        for part in
            ["PUB ", SUBJECT_PREFIX, user, " ", n.format(len), "\r\n", HEAD, seq, ",", members, "\r\n"]
        {
            self.out.extend_from_slice(part.as_bytes());
        }
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Waits until the server has processed everything written (PING/PONG),
    /// reading and discarding anything else it sends.
    pub async fn sync(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        self.stream.write_all(b"PING\r\n").await?;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("nats-server closed the publisher connection");
            }
            seen.extend_from_slice(&chunk[..n]);
            if seen.windows(6).any(|w| w == b"PONG\r\n") {
                return Ok(());
            }
            if let Some(at) = seen.windows(4).position(|w| w == b"-ERR") {
                bail!("nats-server: {}", String::from_utf8_lossy(&seen[at..]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_split_anywhere_and_control_lines() {
        let wire = b"INFO {}\r\nMSG u.a 1 5\r\nhello\r\nPING\r\nMSG u.a 1 r.x 2\r\nhi\r\n";
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for &b in wire.iter() {
            buf.push(b);
            while let Some((p, used)) = parse(&buf).unwrap() {
                got.push(match p {
                    Parsed::Msg(at) => String::from_utf8(buf[at].to_vec()).unwrap(),
                    Parsed::Ping => "PING".into(),
                    Parsed::Pong => "PONG".into(),
                    Parsed::Other => "other".into(),
                });
                buf.drain(..used);
            }
        }
        assert_eq!(got, ["other", "hello", "PING", "hi"]);
        assert!(parse(b"-ERR 'Authorization Violation'\r\n").is_err());
    }
}
