//! Server-side WebSocket frame encoding (RFC 6455 §5.2) for frames we write
//! ourselves, so that many queued frames can go out in one vectored write.
//!
//! Server frames are never masked, so one encoded frame is valid for every
//! connection: that is what lets an event be encoded once and shared.
//! Reading client frames is left to fastwebsockets.

use bytes::Bytes;

/// Longest header a server frame can have (2 + 8 byte extended length).
pub const MAX_HEADER_LEN: usize = 10;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Appends a FIN frame header for `opcode` and a payload of `len` bytes.
pub fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a complete FIN frame with `opcode` and `payload`.
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    put_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// A complete frame with `opcode` and `payload`.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER_LEN);
    put_frame(&mut out, opcode, payload);
    Bytes::from(out)
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
pub fn text_frame(payload: &[u8]) -> Bytes {
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
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut out = Vec::with_capacity(2 + 125);
    put_close(&mut out, code, reason);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn close_frame_carries_code_and_reason() {
        let f = close_frame(4001, "evicted");
        assert_eq!(f[0], 0x88);
        assert_eq!(f[1] as usize, 2 + 7);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4001);
        let long = close_frame(1000, &"é".repeat(100));
        assert!(long[1] <= 125);
    }
}
