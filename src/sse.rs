//! Server-Sent Events framing for `GET /sse` streams (contract §3a): the
//! response head, and the messages we write — the same JSON objects a
//! WebSocket client receives, framed as `text/event-stream` messages.
//!
//! An event's SSE message is built from its WebSocket frame (the JSON body
//! is the frame's payload), once per event for all of a user's SSE
//! connections, like the WebSocket frame is. Our JSON is compact (no raw
//! newlines), so every message has exactly one `data:` line.
//!
//! Pure encoding: no state, no I/O.

use bytes::Bytes;

use crate::wsframe::{self, Frame};

/// A comment line: keeps proxies from closing a quiet stream.
pub const PING: &[u8] = b": ping\n\n";

/// How long a browser waits before it reconnects a dropped stream (the
/// `retry:` field), in milliseconds.
pub const RETRY_MS: u64 = 1000;

/// The `200` response head and the `retry:` hint. `allow_origin` is the
/// request's `Origin` when it may read the stream (browsers need it for a
/// cross-origin `EventSource`).
pub fn head(allow_origin: Option<&str>) -> Bytes {
    let mut h = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache, no-transform\r\nX-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    if let Some(o) = allow_origin {
        h.push_str("Access-Control-Allow-Origin: ");
        h.push_str(o);
        h.push_str("\r\nVary: Origin\r\n");
    }
    h.push_str("\r\n");
    h.push_str(&format!("retry: {RETRY_MS}\n\n"));
    Bytes::from(h)
}

/// A message with an `event:` name and one `data:` line of JSON.
pub fn message(event: &str, json: &[u8]) -> Frame {
    encode(None, event, json)
}

/// One message: `id: <epoch>:<seq>` (if given), `event:`, `data:`.
fn encode(id: Option<(&str, u64)>, event: &str, json: &[u8]) -> Frame {
    wsframe::build(|out| put_message(out, id, event, json))
}

fn put_message(out: &mut Vec<u8>, id: Option<(&str, u64)>, event: &str, json: &[u8]) {
    if let Some((epoch, seq)) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(epoch.as_bytes());
        out.push(b':');
        out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// The last message of a stream the broker ends (eviction, deletion, slow
/// consumer, shutdown): `event: close` with the code a WebSocket would get.
pub fn close(code: u16, reason: &str) -> Frame {
    let json = serde_json::json!({"type": "close", "code": code, "reason": reason}).to_string();
    message("close", json.as_bytes())
}

/// The SSE message of an event, from its WebSocket frame:
/// `id: <epoch>:<seq>`, `event: <name>`, `data: <the frame's JSON>`.
pub fn event(epoch: &str, seq: u64, ws_frame: &[u8]) -> Frame {
    let json = wsframe::payload(ws_frame);
    encode(Some((epoch, seq)), event_name(json).unwrap_or("event"), json)
}

/// The `event` field of an event frame's JSON. Our encoder writes `type`
/// and `seq` first, and event names are validated to `[A-Za-z0-9._:-]`, so
/// the first `,"event":"` is the field and the name holds no quote.
fn event_name(json: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b",\"event\":\"";
    let at = json.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = json[at..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&json[at..at + len]).ok()
}

/// Parses a `Last-Event-ID` (`<epoch>:<seq>`) into the resume it asks for.
/// Epochs hold no `:`, user-chosen or not, so the last `:` splits.
pub fn parse_last_event_id(raw: &str) -> Option<(String, u64)> {
    let (epoch, seq) = raw.trim().rsplit_once(':')?;
    if epoch.is_empty() {
        return None;
    }
    Some((epoch.to_string(), seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_event_frame, PreparedEvent, Priority};

    #[test]
    fn an_event_message_carries_id_name_and_the_websocket_json() {
        let ev = PreparedEvent::new("tool_completed", b"{\"a\":\"x\\ny\"}", Priority::Normal).unwrap();
        let frame = encode_event_frame(42, &ev, 7);
        let msg = event("ep0-1.a", 42, &frame);
        let text = std::str::from_utf8(&msg).unwrap();
        let json = std::str::from_utf8(wsframe::payload(&frame)).unwrap();
        assert_eq!(text, format!("id: ep0-1.a:42\nevent: tool_completed\ndata: {json}\n\n"));
        assert_eq!(text.matches('\n').count(), 4, "one data line");
    }

    #[test]
    fn last_event_ids() {
        assert_eq!(parse_last_event_id("abc-0.1:17"), Some(("abc-0.1".to_string(), 17)));
        assert_eq!(parse_last_event_id(":17"), None);
        assert_eq!(parse_last_event_id("abc"), None);
        assert_eq!(parse_last_event_id("abc:x"), None);
    }
}
