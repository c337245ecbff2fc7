//! Server-side WebSocket frame encoding (RFC 6455 §5.2) for frames we write
//! ourselves, so that many queued frames can go out in one vectored write.
//!
//! Server frames are never masked, so one encoded frame is valid for every
//! connection: that is what lets an event be encoded once and shared.
//! Reading client frames is left to fastwebsockets.
//!
//! A frame the shard queues and keeps is a [`Frame`]: one allocation with a
//! non-atomic count, written straight into it from its parts
//! ([`from_parts`]: event frames) or built in a reused thread-local buffer
//! ([`build`]: frames assembled piece by piece).

use std::cell::RefCell;
use std::rc::Rc;

/// A complete encoded frame as a shard holds it: shared by a user's history
/// and every connection it is queued on, and never leaving the shard's
/// thread — so its count need not be atomic, and count and bytes share one
/// allocation (a shared `Bytes` costs two allocations and an atomic count).
pub type Frame = Rc<[u8]>;

thread_local! {
    /// Where frames are assembled before they get their exact-size allocation.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Most a frame may leave of [`SCRATCH`]'s capacity behind for reuse: an
/// occasional large frame does not pin its size on the thread.
const SCRATCH_KEEP: usize = 64 << 10;

/// A frame of exactly the bytes `fill` appends, assembled in a reused
/// thread-local buffer and copied once into its own allocation.
pub fn build(fill: impl FnOnce(&mut Vec<u8>)) -> Frame {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            fill(&mut buf);
            let frame = Frame::from(&buf[..]);
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            frame
        }
        // Only if `fill` itself builds a frame (none does): use a buffer of its own.
        Err(_) => {
            let mut buf = Vec::new();
            fill(&mut buf);
            Frame::from(buf)
        }
    })
}

/// Longest header a server frame can have (2 + 8 byte extended length).
pub const MAX_HEADER_LEN: usize = 10;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Appends a FIN frame header for `opcode` and a payload of `len` bytes.
pub fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    let (head, n) = header(opcode, len);
    out.extend_from_slice(&head[..n]);
}

/// A FIN frame header for `opcode` and a payload of `len` bytes: its
/// bytes, of which the first `n` are the header.
fn header(opcode: u8, len: usize) -> ([u8; MAX_HEADER_LEN], usize) {
    let mut head = [0u8; MAX_HEADER_LEN];
    head[0] = 0x80 | opcode;
    let n = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, n)
}

/// Appends a complete FIN frame with `opcode` and `payload`.
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    put_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// A complete frame with `opcode` and `payload`.
pub fn frame(opcode: u8, payload: &[u8]) -> Frame {
    from_parts(opcode, &[payload])
}

/// A complete frame with `opcode` whose payload is `parts`, one after the
/// other, written straight into its exact-size allocation: an event's
/// frame is copied once, not assembled in [`SCRATCH`] and copied again.
pub fn from_parts(opcode: u8, parts: &[&[u8]]) -> Frame {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let (head, n) = header(opcode, len);
    let head = &head[..n];
    let mut frame = Rc::<[u8]>::new_uninit_slice(n + len);
    let Some(out) = Rc::get_mut(&mut frame) else { unreachable!("a new Rc has no other owner") };
    let mut at = 0;
    for p in std::iter::once(head).chain(parts.iter().copied()) {
        out[at..at + p.len()].write_copy_of_slice(p);
        at += p.len();
    }
    assert_eq!(at, out.len(), "every byte of the frame is written");
    // SAFETY: the loop wrote `at` bytes from the start, one part after the
    // other, and `at` is the allocation's length (asserted above).
    unsafe { frame.assume_init() }
}

/// The payload of a complete server frame (unmasked, as we encode them).
pub fn payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or(&[])
}

/// A complete text frame.
pub fn text_frame(payload: &[u8]) -> Frame {
    frame(OP_TEXT, payload)
}

/// Appends a close frame with `code` and a UTF-8 `reason` (truncated at a
/// character boundary to fit a control frame's 125 bytes).
pub fn put_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut reason = &reason.as_bytes()[..reason.len().min(123)];
    while std::str::from_utf8(reason).is_err() {
        reason = &reason[..reason.len() - 1];
    }
    put_header(out, OP_CLOSE, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// A close frame with `code` and a UTF-8 `reason` (truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Frame {
    build(|out| put_close(out, code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame made of parts is the header and the parts, byte for byte,
    /// at every header size.
    #[test]
    fn frames_from_parts_are_header_and_parts() {
        for len in [0usize, 1, 125, 126, 65535, 65536] {
            let a = vec![b'a'; len / 2];
            let b = vec![b'b'; len - len / 2];
            let mut want = Vec::new();
            put_frame(&mut want, OP_TEXT, &[&a[..], &b[..]].concat());
            assert_eq!(&from_parts(OP_TEXT, &[&a, &[], &b])[..], &want[..], "len {len}");
        }
        assert_eq!(&frame(OP_BINARY, b"xy")[..], &[0x82, 2, b'x', b'y']);
    }

    #[test]
    fn header_lengths() {
        for (len, hdr) in [(0usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut v = Vec::new();
            put_header(&mut v, OP_TEXT, len);
            assert_eq!(v.len(), hdr, "len {len}");
            assert_eq!(v[0], 0x81);
        }
    }

    #[test]
    fn built_frames_are_exactly_what_was_appended() {
        let big = vec![7u8; SCRATCH_KEEP + 1];
        let long = text_frame(&big);
        assert_eq!(long.len(), 10 + big.len());
        assert_eq!(payload(&long), &big[..]);
        // The scratch buffer is reused (cleared) after a large frame.
        let short = text_frame(b"hi");
        assert_eq!(&short[..], b"\x81\x02hi");
        let nested = build(|out| {
            out.extend_from_slice(b"a");
            out.extend_from_slice(&text_frame(b"b"));
        });
        assert_eq!(&nested[..], b"a\x81\x01b");
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let f = close_frame(4001, "evicted");
        assert_eq!(f[0], 0x88);
        assert_eq!(f[1] as usize, 2 + 7);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4001);
        let long = close_frame(1000, &"é".repeat(100));
        assert!(long[1] <= 125);
    }
}
