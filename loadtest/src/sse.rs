//! A minimal Server-Sent Events client for `GET /sse`: sends the request
//! (with `Last-Event-ID` when resuming, as a browser's `EventSource` does),
//! checks the `200 text/event-stream` head, and yields each message's
//! `event` name and `data` line. Comments (pings) and `retry:` hints are
//! skipped; the broker's `event: close` ends the stream.

use std::time::Duration;

use anyhow::{anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One open stream.
pub struct SseConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the next scan for a message end starts.
    scanned: usize,
}

/// A message: its `event:` name and `data:` line.
pub struct Message {
    pub event: String,
    pub data: String,
}

impl SseConn {
    /// Sends `GET {path_and_query}` on `stream` and reads the response head.
    pub async fn open(
        mut stream: TcpStream,
        path_and_query: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut req =
            format!("GET {path_and_query} HTTP/1.1\r\nHost: switchyard\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(8192);
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .map_err(|_| anyhow!("no SSE response head within 10s"))??;
            if n == 0 {
                bail!("closed before the SSE response head");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            bail!("SSE refused: {}", head.lines().next().unwrap_or_default());
        }
        buf.drain(..end);
        Ok(SseConn { stream, buf, scanned: 0 })
    }

    /// The next message with an event name; `None` when the stream ends
    /// (EOF, error, or the broker's `close` message).
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.take_block() {
                match m {
                    Some(m) if m.event == "close" => return None,
                    Some(m) => return Some(m),
                    None => continue, // a comment or a retry hint
                }
            }
            self.buf.reserve(8192);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Takes one complete block off the buffer: `Some(Some(message))`,
    /// `Some(None)` for a block without an event, `None` when incomplete.
    fn take_block(&mut self) -> Option<Option<Message>> {
        let from = self.scanned.saturating_sub(1);
        let Some(p) = self.buf[from..].windows(2).position(|w| w == b"\n\n") else {
            self.scanned = self.buf.len();
            return None;
        };
        let end = from + p + 2;
        let block: Vec<u8> = self.buf.drain(..end).collect();
        self.scanned = 0;
        let text = String::from_utf8_lossy(&block);
        let (mut event, mut data) = (None, None);
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(v.to_string());
            }
        }
        Some(event.map(|event| Message { event, data: data.unwrap_or_default() }))
    }

    pub async fn close(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
