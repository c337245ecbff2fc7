//! What the disk engine writes into a shard's log, and reads back at start:
//! a user's new state (epoch), each event (with its seq, publish time,
//! priority, idempotency key and the encoded frame itself), and a user's
//! state being dropped. Pure encoding; the log checksums each record.

use crate::protocol::Priority;

pub const KIND_EPOCH: u8 = 1;
pub const KIND_EVENT: u8 = 2;
pub const KIND_DROP: u8 = 3;
pub const KIND_KEY: u8 = 4;

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A user's state starts (again) with this epoch, at seq 0.
    Epoch { user: String, epoch: String, at_ms: u64 },
    /// An event the user was given.
    Event { user: String, seq: u64, at_ms: u64, priority: Priority, id: Option<String>, frame: Vec<u8> },
    /// The user's state was dropped (idle past `--history-ttl`).
    Drop { user: String },
    /// An idempotency key, carried forward from a segment being reclaimed.
    Key { user: String, id: String, seq: u64, at_ms: u64 },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // User IDs, epochs and keys are at most 128 bytes (validated upstream).
    let b = &s.as_bytes()[..s.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn take_str(b: &mut &[u8]) -> Option<String> {
    let n = *take(b, 1)?.first()? as usize;
    String::from_utf8(take(b, n)?.to_vec()).ok()
}

fn take_u64(b: &mut &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
}

/// Encodes an epoch record's payload.
pub fn epoch(user: &str, epoch: &str, at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + user.len() + epoch.len() + 8);
    put_str(&mut out, user);
    put_str(&mut out, epoch);
    out.extend_from_slice(&at_ms.to_le_bytes());
    out
}

/// Encodes an event record's payload.
pub fn event(
    user: &str,
    seq: u64,
    at_ms: u64,
    priority: Priority,
    id: Option<&str>,
    frame: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + user.len() + id.map_or(0, str::len) + frame.len());
    put_str(&mut out, user);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.push(priority.index() as u8);
    put_str(&mut out, id.unwrap_or(""));
    out.extend_from_slice(frame);
    out
}

/// Encodes a key record's payload.
pub fn key(user: &str, id: &str, seq: u64, at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + user.len() + id.len());
    put_str(&mut out, user);
    put_str(&mut out, id);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&at_ms.to_le_bytes());
    out
}

/// Encodes a drop record's payload.
pub fn drop_user(user: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + user.len());
    put_str(&mut out, user);
    out
}

/// Decodes a record; `None` for a kind or layout this build does not know.
pub fn decode(kind: u8, mut b: &[u8]) -> Option<Entry> {
    let b = &mut b;
    match kind {
        KIND_EPOCH => Some(Entry::Epoch { user: take_str(b)?, epoch: take_str(b)?, at_ms: take_u64(b)? }),
        KIND_EVENT => {
            let user = take_str(b)?;
            let seq = take_u64(b)?;
            let at_ms = take_u64(b)?;
            let priority = *Priority::ALL.get(*take(b, 1)?.first()? as usize)?;
            let id = Some(take_str(b)?).filter(|s| !s.is_empty());
            Some(Entry::Event { user, seq, at_ms, priority, id, frame: b.to_vec() })
        }
        KIND_DROP => Some(Entry::Drop { user: take_str(b)? }),
        KIND_KEY => {
            Some(Entry::Key { user: take_str(b)?, id: take_str(b)?, seq: take_u64(b)?, at_ms: take_u64(b)? })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let e = event("u1", 42, 1_764_000_000_123, Priority::High, Some("req-1"), b"\x81\x02{}");
        assert_eq!(
            decode(KIND_EVENT, &e),
            Some(Entry::Event {
                user: "u1".into(),
                seq: 42,
                at_ms: 1_764_000_000_123,
                priority: Priority::High,
                id: Some("req-1".into()),
                frame: b"\x81\x02{}".to_vec()
            })
        );
        let n = event("u1", 1, 0, Priority::Low, None, b"");
        assert!(matches!(decode(KIND_EVENT, &n), Some(Entry::Event { id: None, .. })));
        assert_eq!(
            decode(KIND_EPOCH, &epoch("u1", "abc-0.1", 5)),
            Some(Entry::Epoch { user: "u1".into(), epoch: "abc-0.1".into(), at_ms: 5 })
        );
        assert_eq!(decode(KIND_DROP, &drop_user("u1")), Some(Entry::Drop { user: "u1".into() }));
        assert_eq!(
            decode(KIND_KEY, &key("u1", "k", 3, 9)),
            Some(Entry::Key { user: "u1".into(), id: "k".into(), seq: 3, at_ms: 9 })
        );
        assert_eq!(decode(KIND_EVENT, b"\x05ab"), None, "short payloads do not decode");
        assert_eq!(decode(99, b""), None);
    }
}
