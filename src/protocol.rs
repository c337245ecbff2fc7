//! The wire vocabulary of switchyard: identifiers, priorities, the publish
//! object publishers send, and the JSON frames clients receive.
//!
//! Everything that comes from the network is validated here, once, into typed
//! values (`UserId`, `EventName`, `Priority`, [`PreparedEvent`]). Past this
//! module nothing re-checks them. Outgoing event frames are encoded here exactly
//! once per (user, seq) into a buffer that already carries the WebSocket header,
//! so every connection of the user shares the same bytes.
//!
//! This module owns no state and touches no other module's state.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::jsonscan;
use crate::redact::Redactor;
use crate::wsframe::{self, Frame};

/// Longest user ID accepted, in bytes (contract §3).
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest event name accepted, in bytes (contract §4).
pub const MAX_EVENT_NAME_LEN: usize = 64;

/// A validated user ID: 1–128 bytes of `[A-Za-z0-9._:@-]`.
///
/// Cheap to clone, and free to make when short: an ID of up to 23 bytes (the
/// common case) is stored inline (`SmolStr`), so parsing one per published
/// event allocates nothing and a clone (the user map's key, a budget entry,
/// a command) is a copy, not an atomic reference count; a longer one shares
/// one `Arc<str>` allocation between its clones.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(smol_str::SmolStr);

impl UserId {
    /// Validates `raw` as a user ID.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_USER_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'));
        if ok {
            Ok(UserId(smol_str::SmolStr::new(raw)))
        } else {
            Err(InvalidInput::new("invalid_user", "user IDs are 1-128 bytes of [A-Za-z0-9._:@-]"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates an event name: 1–64 bytes of `[A-Za-z0-9._:-]`.
pub fn validate_event_name(raw: &str) -> Result<(), InvalidInput> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_EVENT_NAME_LEN
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad_event_name())
    }
}

/// The refusal of an event name that breaks [`validate_event_name`]'s rule.
fn bad_event_name() -> InvalidInput {
    InvalidInput::new("invalid_event", "event names are 1-64 bytes of [A-Za-z0-9._:-]")
}

/// Delivery priority of an event. The discriminant indexes per-priority arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        match raw {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(InvalidInput::new("invalid_priority", "priority must be one of high, normal, low")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A rejected input: a stable machine-readable code and a human message.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct InvalidInput {
    pub code: &'static str,
    pub message: String,
}

impl InvalidInput {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        InvalidInput { code, message: message.into() }
    }
}

/// The part of an event that is the same for every target user: validated,
/// redacted and with `data` serialised once.
///
/// Name and data are kept as the frame text they become,
/// `,"event":"NAME","data":DATA,"priority":"P","ts":`, in one `Bytes`:
/// each user's frame is that text between its seq and its ts, so encoding
/// a frame is a few copies and no piece is allocated on its own. Cloning
/// shares that text by its reference count (the commands of a multi-user
/// publish or a broadcast), so a single-user event needs no `Arc` around it.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    body: Bytes,
    /// The name's length; it starts right after `,"event":"`.
    name_len: u8,
    /// `data`'s length; it starts right after the name's `","data":`.
    data_len: u32,
    pub priority: Priority,
}

/// The fixed text around an event's name, data and priority in its frame.
const BEFORE_NAME: &[u8] = b",\"event\":\"";
const BEFORE_DATA: &[u8] = b"\",\"data\":";
const BEFORE_PRIORITY: &[u8] = b",\"priority\":\"";
const BEFORE_TS: &[u8] = b"\",\"ts\":";

impl PreparedEvent {
    /// `name` must be a valid event name ([`validate_event_name`]: at most
    /// 64 bytes, nothing to escape) and `data` one JSON value.
    pub fn new(name: &str, data: &[u8], priority: Priority) -> Result<PreparedEvent, InvalidInput> {
        let name_len = u8::try_from(name.len()).map_err(|_| bad_event_name())?;
        let data_len = u32::try_from(data.len())
            .map_err(|_| InvalidInput::new("payload_too_large", "\"data\" is over 4 GiB"))?;
        let p = priority.as_str().as_bytes();
        let parts = [BEFORE_NAME, name.as_bytes(), BEFORE_DATA, data, BEFORE_PRIORITY, p, BEFORE_TS];
        let mut body = Vec::with_capacity(parts.iter().map(|s| s.len()).sum());
        for part in parts {
            body.extend_from_slice(part);
        }
        Ok(PreparedEvent { body: Bytes::from(body), name_len, data_len, priority })
    }

    /// The event's name.
    pub fn name(&self) -> &str {
        let at = BEFORE_NAME.len();
        // Written from a `&str` in `new`, on ASCII boundaries.
        std::str::from_utf8(&self.body[at..at + usize::from(self.name_len)]).unwrap_or_default()
    }

    /// `data` as compact JSON text (`null` when absent).
    pub fn data(&self) -> &[u8] {
        let at = BEFORE_NAME.len() + usize::from(self.name_len) + BEFORE_DATA.len();
        &self.body[at..at + self.data_len as usize]
    }

    /// The frame text between an event's seq and its ts.
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// Who a publish object addresses.
#[derive(Debug)]
pub enum Target {
    One(UserId),
    Many(Vec<UserId>),
}

/// A validated publish object.
#[derive(Debug)]
pub struct PublishRequest {
    pub target: Target,
    pub event: PreparedEvent,
    /// The idempotency key (`id`), if the publisher gave one.
    pub id: Option<Arc<str>>,
}

/// Longest idempotency key accepted, in bytes (contract §4).
pub const MAX_ID_LEN: usize = 128;

/// Validates an idempotency key: 1–128 bytes of `[A-Za-z0-9._:@-]`.
pub fn parse_idempotency_key(raw: &str) -> Result<Arc<str>, InvalidInput> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_ID_LEN
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'));
    if ok {
        Ok(Arc::from(raw))
    } else {
        Err(InvalidInput::new("invalid_id", "\"id\" must be 1-128 bytes of [A-Za-z0-9._:@-]"))
    }
}

/// A validated broadcast object (a publish object without a target).
#[derive(Debug)]
pub struct BroadcastRequest {
    pub event: PreparedEvent,
}

/// Most users one publish object may address.
pub const MAX_USERS_PER_PUBLISH: usize = 1000;

/// Parses and validates one publish object in one pass over its bytes
/// ([`jsonscan`]): no document tree, and `data` is copied verbatim from the
/// input (only when `--redact-keys` could match inside it is `data` parsed,
/// redacted and written again).
pub fn parse_publish(raw: &[u8], redactor: &Redactor) -> Result<PublishRequest, InvalidInput> {
    let f = Fields::scan(raw, "a publish object must be a JSON object")?;
    let target = match (&f.user, &f.users) {
        (Some(_), Some(_)) => {
            return Err(InvalidInput::new("invalid_user", "give either \"user\" or \"users\", not both"))
        }
        (Some(u), None) => match u {
            jsonscan::Value::String(s) => Target::One(UserId::parse(s)?),
            _ => return Err(InvalidInput::new("invalid_user", "\"user\" must be a string")),
        },
        (None, Some(list)) => Target::Many(user_list(list)?),
        (None, None) => {
            return Err(InvalidInput::new("missing_field", "a publish object needs \"user\" or \"users\""))
        }
    };
    let id = match &f.id {
        None => None,
        Some(jsonscan::Value::String(s)) => Some(parse_idempotency_key(s)?),
        Some(_) => return Err(InvalidInput::new("invalid_id", "\"id\" must be a string")),
    };
    let event = event_of(raw, &f, redactor)?;
    Ok(PublishRequest { target, event, id })
}

/// Parses and validates a broadcast object.
pub fn parse_broadcast(raw: &[u8], redactor: &Redactor) -> Result<BroadcastRequest, InvalidInput> {
    let f = Fields::scan(raw, "a broadcast object must be a JSON object")?;
    Ok(BroadcastRequest { event: event_of(raw, &f, redactor)? })
}

/// The members of a publish or broadcast object this module reads; a
/// repeated key keeps its last value (as `serde_json` does), and any other
/// member is validated and skipped.
#[derive(Default)]
struct Fields<'a> {
    user: Option<jsonscan::Value<'a>>,
    users: Option<jsonscan::Value<'a>>,
    id: Option<jsonscan::Value<'a>>,
    event: Option<jsonscan::Value<'a>>,
    priority: Option<jsonscan::Value<'a>>,
    /// Where `data`'s value is in the input.
    data: Option<Range<usize>>,
}

impl<'a> Fields<'a> {
    /// Scans `raw` (one pass, no list of members) and keeps the known members.
    fn scan(raw: &'a [u8], not_object: &'static str) -> Result<Fields<'a>, InvalidInput> {
        let mut f = Fields::default();
        let object = jsonscan::scan_with(raw, |m| match &*m.key {
            "user" => f.user = Some(m.value),
            "users" => f.users = Some(m.value),
            "id" => f.id = Some(m.value),
            "event" => f.event = Some(m.value),
            "priority" => f.priority = Some(m.value),
            "data" => f.data = Some(m.span),
            _ => {}
        })
        .map_err(|e| InvalidInput::new("invalid_json", format!("invalid JSON: {e}")))?;
        if object {
            Ok(f)
        } else {
            Err(InvalidInput::new("invalid_json", not_object))
        }
    }
}

/// `users`: 1-1000 strings, each a valid user ID; repeats dropped.
fn user_list(v: &jsonscan::Value<'_>) -> Result<Vec<UserId>, InvalidInput> {
    let jsonscan::Value::Strings(list) = v else {
        return Err(InvalidInput::new("invalid_user", "\"users\" must be an array of strings"));
    };
    if list.is_empty() || list.len() > MAX_USERS_PER_PUBLISH {
        return Err(InvalidInput::new(
            "invalid_user",
            format!("\"users\" must hold 1-{MAX_USERS_PER_PUBLISH} user IDs"),
        ));
    }
    let mut users = Vec::with_capacity(list.len());
    let mut seen = std::collections::HashSet::with_capacity_and_hasher(list.len(), ahash::RandomState::new());
    for s in list {
        if seen.insert(s.as_ref()) {
            users.push(UserId::parse(s)?);
        }
    }
    Ok(users)
}

/// Validates `event` and `priority`, and takes `data` (verbatim, or
/// redacted when a `--redact-keys` key could occur in it).
fn event_of(raw: &[u8], f: &Fields<'_>, redactor: &Redactor) -> Result<PreparedEvent, InvalidInput> {
    let name = match &f.event {
        Some(jsonscan::Value::String(s)) => s,
        Some(_) => return Err(InvalidInput::new("invalid_event", "\"event\" must be a string")),
        None => return Err(InvalidInput::new("missing_field", "\"event\" is required")),
    };
    validate_event_name(name)?;
    let priority = match &f.priority {
        None => Priority::Normal,
        Some(jsonscan::Value::String(s)) => Priority::parse(s)?,
        Some(_) => return Err(InvalidInput::new("invalid_priority", "\"priority\" must be a string")),
    };
    let data = match &f.data {
        None => Cow::Borrowed(&b"null"[..]),
        Some(span) => {
            let text = &raw[span.clone()];
            if redactor.may_match(text) {
                Cow::Owned(redacted(text, redactor)?)
            } else {
                Cow::Borrowed(text)
            }
        }
    };
    PreparedEvent::new(name, &data, priority)
}

/// `data` without the `--redact-keys` members, at any depth (rewritten
/// compactly by the scanner; numbers and escapes as the publisher wrote them).
fn redacted(text: &[u8], redactor: &Redactor) -> Result<Vec<u8>, InvalidInput> {
    jsonscan::without_keys(text, &|k| redactor.is_redacted(k))
        .map_err(|e| InvalidInput::new("invalid_json", format!("invalid JSON: {e}")))
}

/// Unix time in milliseconds (an event's `ts`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now as unix µs (cluster mode stamps publishes with it, for cross-node latency).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The event JSON after its seq — `,"event":…,"data":…,"priority":…,"ts":…}` —
/// which the cluster's publish script completes with the seq Redis assigns.
pub fn event_tail(ev: &PreparedEvent, ts_ms: u64) -> Vec<u8> {
    let mut ts_buf = itoa::Buffer::new();
    [ev.body(), ts_buf.format(ts_ms).as_bytes(), b"}"].concat()
}

/// Encodes an `event` frame (WebSocket header included) for one user and seq.
///
/// One allocation, sized exactly; the result is shared by all of the user's
/// connections and by the user's history.
pub fn encode_event_frame(seq: u64, ev: &PreparedEvent, ts_ms: u64) -> Frame {
    let mut seq_buf = itoa::Buffer::new();
    let mut ts_buf = itoa::Buffer::new();
    let parts: [&[u8]; 5] = [
        b"{\"type\":\"event\",\"seq\":",
        seq_buf.format(seq).as_bytes(),
        ev.body(),
        ts_buf.format(ts_ms).as_bytes(),
        b"}",
    ];
    wsframe::from_parts(wsframe::OP_TEXT, &parts)
}

/// The `welcome` frame a connection receives first.
pub struct Welcome<'a> {
    pub user: &'a UserId,
    pub conn: &'a str,
    pub epoch: &'a str,
    pub seq: u64,
    pub recovered: Option<bool>,
    pub ping_ms: u64,
}

/// Encodes the `welcome` frame, WebSocket header included.
pub fn encode_welcome(w: &Welcome<'_>) -> Frame {
    wsframe::text_frame(welcome_json(w).as_bytes())
}

/// The `welcome` object as JSON text (framed by the caller's transport).
pub fn welcome_json(w: &Welcome<'_>) -> String {
    let mut v = serde_json::json!({
        "type": "welcome",
        "user": w.user.as_str(),
        "conn": w.conn,
        "epoch": w.epoch,
        "seq": w.seq,
        "ping_ms": w.ping_ms,
    });
    if let Some(r) = w.recovered {
        v["recovered"] = serde_json::Value::Bool(r);
    }
    v.to_string()
}

/// Encodes a `pong` answer to an application-level ping.
pub fn encode_pong(id: &serde_json::Value) -> Frame {
    let v = serde_json::json!({"type": "pong", "id": id});
    wsframe::text_frame(v.to_string().as_bytes())
}

/// Encodes an `error` frame sent to a client that sent something we do not accept.
pub fn encode_client_error(code: &str, message: &str) -> Frame {
    let v = serde_json::json!({"type": "error", "code": code, "message": message});
    wsframe::text_frame(v.to_string().as_bytes())
}

/// What a client may send us, decoded.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Ping(serde_json::Value),
}

/// Decodes one complete text message from a client.
pub fn parse_client_message(text: &[u8]) -> Result<ClientMessage, InvalidInput> {
    let v: serde_json::Value = serde_json::from_slice(text)
        .map_err(|_| InvalidInput::new("bad_request", "frames must be JSON objects"))?;
    match v.get("type").and_then(|t| t.as_str()) {
        Some("ping") => Ok(ClientMessage::Ping(v.get("id").cloned().unwrap_or(serde_json::Value::Null))),
        Some(other) => Err(InvalidInput::new(
            "bad_request",
            format!("unknown frame type {other:?}; only \"ping\" is accepted"),
        )),
        None => Err(InvalidInput::new("bad_request", "frames need a \"type\"; only \"ping\" is accepted")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor() -> Redactor {
        Redactor::new(Vec::new())
    }

    #[test]
    fn user_ids_follow_the_contract() {
        assert!(UserId::parse("u1").is_ok());
        assert!(UserId::parse("a.b_c:d@e-f").is_ok());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("é").is_err());
    }

    #[test]
    fn user_ids_are_the_same_key_stored_inline_or_shared() {
        use std::collections::HashMap;
        // Up to 23 bytes an ID is stored inline, past that in an `Arc`:
        // both must compare, hash and print as the text they came from.
        let lens = [1, 22, 23, 24, 25, 128];
        let mut map = HashMap::new();
        for len in lens {
            let text = "k".repeat(len - 1) + "z";
            let id = UserId::parse(&text).expect("valid");
            assert_eq!(id.as_str(), text);
            assert_eq!(id.clone(), id);
            map.insert(id, len);
        }
        for len in lens {
            let again = UserId::parse(&("k".repeat(len - 1) + "z")).expect("valid");
            assert_eq!(map.get(&again), Some(&len));
        }
        assert_eq!(map.len(), lens.len());
    }

    #[test]
    fn event_names_follow_the_contract() {
        assert!(validate_event_name("tool_executing").is_ok());
        assert!(validate_event_name(&"e".repeat(64)).is_ok());
        assert!(validate_event_name(&"e".repeat(65)).is_err());
        assert!(validate_event_name("a@b").is_err());
        assert!(validate_event_name("").is_err());
    }

    #[test]
    fn parses_a_full_publish_object() {
        let raw =
            br#"{"user":"u1","event":"agent_thinking","data":{"text":"hi"},"priority":"high"}"#.to_vec();
        let p = parse_publish(&raw, &redactor()).unwrap();
        assert!(matches!(p.target, Target::One(ref u) if u.as_str() == "u1"));
        assert_eq!(p.event.name(), "agent_thinking");
        assert_eq!(p.event.priority, Priority::High);
        assert_eq!(p.event.data(), br#"{"text":"hi"}"#);
    }

    #[test]
    fn data_defaults_to_null_and_priority_to_normal() {
        let raw = br#"{"users":["a","b","a"],"event":"e"}"#.to_vec();
        let p = parse_publish(&raw, &redactor()).unwrap();
        match p.target {
            Target::Many(u) => assert_eq!(u.len(), 2),
            _ => panic!("expected many"),
        }
        assert_eq!(p.event.data(), b"null");
        assert_eq!(p.event.priority, Priority::Normal);
    }

    #[test]
    fn rejects_bad_publish_objects() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "invalid_json"),
            (b"[]", "invalid_json"),
            (br#"{"event":"e"}"#, "missing_field"),
            (br#"{"user":"u"}"#, "missing_field"),
            (br#"{"user":"u","event":"e","priority":"urgent"}"#, "invalid_priority"),
            (br#"{"user":"bad user","event":"e"}"#, "invalid_user"),
            (br#"{"user":"u","event":"bad event"}"#, "invalid_event"),
            (br#"{"user":"u","users":["v"],"event":"e"}"#, "invalid_user"),
            (br#"{"users":[],"event":"e"}"#, "invalid_user"),
            (br#"{"user":"u","event":"e","id":""}"#, "invalid_id"),
            (br#"{"user":"u","event":"e","id":7}"#, "invalid_id"),
            (br#"{"user":"u","event":"e","id":"a b"}"#, "invalid_id"),
        ];
        for (raw, code) in cases {
            let buf = raw.to_vec();
            let err = parse_publish(&buf, &redactor()).unwrap_err();
            assert_eq!(err.code, *code, "input {:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn event_frame_is_a_complete_websocket_text_frame() {
        let ev = PreparedEvent::new("tool_completed", b"{\"ok\":true}", Priority::Low).unwrap();
        let frame = encode_event_frame(42, &ev, 1_764_000_000_123);
        assert_eq!(frame[0], 0x81);
        let len = frame[1] as usize;
        let body = &frame[2..];
        assert_eq!(body.len(), len);
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["event"], "tool_completed");
        assert_eq!(v["data"]["ok"], true);
        assert_eq!(v["priority"], "low");
        assert_eq!(v["ts"], 1_764_000_000_123u64);
    }

    #[test]
    fn client_messages() {
        assert_eq!(
            parse_client_message(br#"{"type":"ping","id":7}"#).unwrap(),
            ClientMessage::Ping(serde_json::json!(7))
        );
        assert!(parse_client_message(br#"{"type":"subscribe"}"#).is_err());
        assert!(parse_client_message(b"hello").is_err());
    }
}
