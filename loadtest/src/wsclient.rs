//! The receiving end of a WebSocket client, made for reading many small
//! server frames cheaply: the upgrade handshake, then frames parsed in place
//! from one read buffer and handed out as `Bytes` views of it.
//!
//! tokio-tungstenite zero-filled its read buffer before every socket read
//! and copied each frame out of it; at 100 users and max rate those two were
//! ~16% of the generator's CPU, at a point where the generator was close to
//! the limit of its core (it must never be what a run measures). Here a read
//! goes into spare capacity (no fill) and a message is a view of the buffer
//! (no copy); the buffer's space is reclaimed once the views are dropped.
//!
//! It speaks RFC 6455 as a client: server frames must be unmasked and carry
//! no extension bits; pings are answered, fragments reassembled, a close is
//! answered and ends the stream. Client frames (pongs, a close, NATS's
//! protocol lines) are masked. Plain TCP only, as the generator connects.
//! It touches only its own socket.

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use switchyard::wsframe::{self, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Spare room each socket read asks for: one broker write at 100 users is
/// ~11 KB (32 frames of ~340 B), so one read usually takes it whole.
const READ_ROOM: usize = 16 * 1024;

/// Longest response head accepted during the handshake.
const MAX_HEAD: usize = 16 * 1024;

/// Largest message accepted (the broker's own limits are far below this).
const MAX_MESSAGE: usize = 64 << 20;

const OP_CONTINUATION: u8 = 0x0;

/// One whole message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
}

/// A client WebSocket over plain TCP.
pub struct WsClient {
    stream: TcpStream,
    /// Bytes read and not yet handed out.
    buf: BytesMut,
    /// A fragmented message being reassembled: text or not, and its bytes.
    partial: Option<(bool, BytesMut)>,
    /// Control frames queued for the server (pongs, a close reply), written
    /// without waiting so that a read cancelled mid-way loses nothing.
    out: Vec<u8>,
    /// The server's close was seen (or the stream failed): nothing follows.
    ended: bool,
}

impl WsClient {
    /// Upgrades `stream` to a WebSocket for `url` (`ws://host:port/path?query`)
    /// and checks the server's answer, including its accept key.
    pub async fn connect(mut stream: TcpStream, url: &str) -> anyhow::Result<WsClient> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| anyhow!("not a ws:// URL: {url}"))?;
        let (host, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(READ_ROOM);
        let head_len = loop {
            if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEAD {
                bail!("handshake response head over {MAX_HEAD} bytes");
            }
            buf.reserve(READ_ROOM);
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("closed during the WebSocket handshake");
            }
        };
        let head = buf.split_to(head_len);
        check_upgrade(&head, &derive_accept_key(key.as_bytes()))?;
        Ok(WsClient { stream, buf, partial: None, out: Vec::new(), ended: false })
    }

    /// The next text or binary message; `None` once the stream ended (a
    /// close, the socket's end or a protocol error). Cancel-safe: a read
    /// dropped before it completes leaves every byte where it was.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            self.write_queued();
            match self.next_buffered() {
                Ok(Some(m)) => return Some(m),
                Ok(None) if self.ended => return None,
                Ok(None) => {}
                Err(_) => {
                    self.ended = true;
                    return None;
                }
            }
            self.buf.reserve(READ_ROOM);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    self.ended = true;
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// Sends one binary message and waits until it is written.
    pub async fn send_binary(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        queue_frame(&mut self.out, OP_BINARY, payload);
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Queues a binary message, written before the next read (or by
    /// [`send_binary`](Self::send_binary)); for replies a reader owes.
    pub fn queue_binary(&mut self, payload: &[u8]) {
        queue_frame(&mut self.out, OP_BINARY, payload);
    }

    /// Sends a close (1000) and shuts the write side; bounded by the caller.
    pub async fn close(&mut self) {
        if !self.ended {
            queue_frame(&mut self.out, OP_CLOSE, &1000u16.to_be_bytes());
        }
        let _ = self.stream.write_all(&self.out).await;
        self.out.clear();
        let _ = self.stream.shutdown().await;
        self.ended = true;
    }

    /// Writes what is queued as far as the socket takes it now.
    fn write_queued(&mut self) {
        while !self.out.is_empty() {
            match self.stream.try_write(&self.out) {
                Ok(n) if n > 0 => {
                    self.out.drain(..n);
                }
                _ => return,
            }
        }
    }

    /// The next whole message already in the buffer, answering control
    /// frames on the way; `Ok(None)` when more bytes are needed.
    fn next_buffered(&mut self) -> anyhow::Result<Option<Message>> {
        while !self.ended {
            let Some(header) = FrameHeader::parse(&self.buf)? else { return Ok(None) };
            let total = header.len + header.payload;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            let mut frame = self.buf.split_to(total);
            frame.advance(header.len);
            if let Some(m) = self.take(header.fin, header.opcode, frame)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Acts on one frame; a message when it completes one.
    fn take(&mut self, fin: bool, opcode: u8, payload: BytesMut) -> anyhow::Result<Option<Message>> {
        match opcode {
            OP_TEXT | OP_BINARY if self.partial.is_some() => bail!("new message inside a fragmented one"),
            OP_TEXT | OP_BINARY if fin => Ok(Some(message(opcode == OP_TEXT, payload.freeze()))),
            OP_TEXT | OP_BINARY => {
                self.partial = Some((opcode == OP_TEXT, payload));
                Ok(None)
            }
            OP_CONTINUATION => {
                let (text, mut whole) = self.partial.take().ok_or_else(|| anyhow!("stray continuation"))?;
                if whole.len() + payload.len() > MAX_MESSAGE {
                    bail!("message over {MAX_MESSAGE} bytes");
                }
                whole.extend_from_slice(&payload);
                if fin {
                    return Ok(Some(message(text, whole.freeze())));
                }
                self.partial = Some((text, whole));
                Ok(None)
            }
            OP_PING => {
                queue_frame(&mut self.out, OP_PONG, &payload);
                Ok(None)
            }
            OP_PONG => Ok(None),
            OP_CLOSE => {
                queue_frame(&mut self.out, OP_CLOSE, payload.get(..2).unwrap_or_default());
                self.write_queued();
                self.ended = true;
                Ok(None)
            }
            other => bail!("unknown opcode {other:#x}"),
        }
    }
}

fn message(text: bool, payload: Bytes) -> Message {
    if text {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

/// Checks a handshake response head: status 101 and the expected accept key.
fn check_upgrade(head: &[u8], accept: &str) -> anyhow::Result<()> {
    let head = std::str::from_utf8(head).context("non-UTF-8 handshake response")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        bail!("upgrade refused: {status}");
    }
    let got = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim());
    if got != Some(accept) {
        bail!("wrong Sec-WebSocket-Accept: {got:?}");
    }
    Ok(())
}

/// A server frame's header: its length, the payload's length, FIN and opcode.
#[derive(Debug, PartialEq, Eq)]
struct FrameHeader {
    len: usize,
    payload: usize,
    fin: bool,
    opcode: u8,
}

impl FrameHeader {
    /// The header at the front of `b`; `None` until it is all there.
    fn parse(b: &[u8]) -> anyhow::Result<Option<FrameHeader>> {
        let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else { return Ok(None) };
        if b0 & 0x70 != 0 {
            bail!("reserved bits set without an extension");
        }
        if b1 & 0x80 != 0 {
            bail!("a server frame is masked");
        }
        let (len, payload) = match b1 & 0x7f {
            126 => match b.get(2..4) {
                Some(n) => (4, usize::from(u16::from_be_bytes([n[0], n[1]]))),
                None => return Ok(None),
            },
            127 => match b.get(2..10) {
                Some(n) => {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(n);
                    (10, usize::try_from(u64::from_be_bytes(word)).unwrap_or(usize::MAX))
                }
                None => return Ok(None),
            },
            n => (2, usize::from(n)),
        };
        if payload > MAX_MESSAGE {
            bail!("frame over {MAX_MESSAGE} bytes");
        }
        let opcode = b0 & 0x0f;
        if opcode >= OP_CLOSE && (payload > 125 || b0 & 0x80 == 0) {
            bail!("control frame fragmented or over 125 bytes");
        }
        Ok(Some(FrameHeader { len, payload, fin: b0 & 0x80 != 0, opcode }))
    }
}

/// Appends one masked client frame (FIN set) to `out`: the broker's frame
/// header with the mask bit set, the key, and the masked payload.
fn queue_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let at = out.len();
    wsframe::put_header(out, opcode, payload.len());
    out[at + 1] |= 0x80;
    let mask = fastrand::u32(..).to_be_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        wsframe::put_frame(&mut f, opcode, payload);
        if !fin {
            f[0] &= 0x7f;
        }
        f
    }

    /// Reads frames through a real socket pair: every length form, split
    /// across reads at every byte, fragments, a ping answered with a pong,
    /// and a close answered and ending the stream.
    #[tokio::test]
    async fn reads_what_a_server_writes_and_answers_control_frames() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let big = vec![b'y'; 70_000];
        let mid = vec![b'z'; 300];
        let mut wire = Vec::new();
        wire.extend(server_frame(true, OP_TEXT, b"hi"));
        wire.extend(server_frame(true, OP_PING, b"p"));
        wire.extend(server_frame(true, OP_BINARY, &mid));
        wire.extend(server_frame(false, OP_TEXT, b"frag"));
        wire.extend(server_frame(true, OP_PING, b""));
        wire.extend(server_frame(true, OP_CONTINUATION, b"mented"));
        wire.extend(server_frame(true, OP_TEXT, &big));
        wire.extend(server_frame(true, OP_CLOSE, &1000u16.to_be_bytes()));
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await?;
                head.push(byte[0]);
            }
            let head = String::from_utf8(head)?;
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .ok_or_else(|| anyhow!("no key"))?;
            let reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            s.write_all(reply.as_bytes()).await?;
            for b in &wire {
                s.write_all(std::slice::from_ref(b)).await?;
            }
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            anyhow::Ok(back)
        });
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut ws = WsClient::connect(stream, &format!("ws://{addr}/ws?user=a")).await?;
        let mut got = Vec::new();
        while let Some(m) = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await? {
            got.push(m);
        }
        assert_eq!(
            got,
            [
                Message::Text(Bytes::from_static(b"hi")),
                Message::Binary(Bytes::from(mid)),
                Message::Text(Bytes::from_static(b"fragmented")),
                Message::Text(Bytes::from(big)),
            ]
        );
        ws.close().await;
        let back = tokio::time::timeout(std::time::Duration::from_secs(10), server).await???;
        // Two pongs (payloads "p" and "") and the close reply, all masked.
        let mut frames = Vec::new();
        let mut rest = &back[..];
        while rest.len() >= 6 {
            let n = usize::from(rest[1] & 0x7f);
            assert_eq!(rest[1] & 0x80, 0x80, "client frames are masked");
            let mask = &rest[2..6];
            let payload: Vec<u8> = rest[6..6 + n].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            frames.push((rest[0], payload));
            rest = &rest[6 + n..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            frames,
            [(0x80 | OP_PONG, b"p".to_vec()), (0x80 | OP_PONG, vec![]), (0x80 | OP_CLOSE, vec![0x03, 0xe8])]
        );
        Ok(())
    }

    #[test]
    fn refuses_what_a_server_must_not_send() {
        for bad in [vec![0x81, 0x82, 0, 0, 0, 0], vec![0xC1, 0], vec![0x09, 0], vec![0x89, 126, 0, 126]] {
            assert!(FrameHeader::parse(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(FrameHeader::parse(&[0x81]).ok(), Some(None));
        assert_eq!(FrameHeader::parse(&[0x82, 127, 0, 0]).ok(), Some(None));
        assert!(check_upgrade(b"HTTP/1.1 400 Bad Request\r\n\r\n", "k").is_err());
        assert!(check_upgrade(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: j\r\n\r\n", "k").is_err());
        assert!(check_upgrade(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: k\r\n\r\n", "k").is_ok());
    }
}
