//! A reader that hands over at most [`MAX_READ`] bytes per read.
//!
//! fastwebsockets reads a publisher stream into one `BytesMut` and asks for
//! as much as the buffer's spare capacity; when a frame straddles the end of
//! the buffer while more is buffered than consumed, `bytes` doubles the
//! buffer. A publisher that keeps megabytes in flight (its socket's whole
//! receive window) therefore grew each stream's buffer to tens of MiB —
//! memory the broker held on the publisher's behalf (heaptrack at 5,000
//! users, max rate: 40 MiB per stream, half the broker's RSS). Reading in
//! bounded steps keeps the buffer near twice one message plus one step,
//! and leaves the rest of the publisher's backlog in the kernel, where TCP
//! flow control holds it.
//!
//! Pure I/O adapter: touches nothing but the reader it wraps.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Bytes one read may return. Measured at 100 users, max rate, with acks
/// (medians of 3, interleaved): uncapped 881k deliveries/s at 247 MiB RSS;
/// 1 MiB 860k at 35 MiB; 256 KiB 839k; 64 KiB 814k at 31 MiB (more
/// syscalls per message). A stream's buffer stays near twice one message
/// plus this.
pub(crate) const MAX_READ: usize = 1 << 20;

/// Wraps `R`, capping each read at [`MAX_READ`] bytes.
pub(crate) struct ReadCap<R> {
    inner: R,
}

impl<R> ReadCap<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ReadCap<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() <= MAX_READ {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let mut step = buf.take(MAX_READ);
        let start = step.filled().as_ptr();
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut step))?;
        // The inner reader must fill `step` in place, not swap its buffer.
        debug_assert_eq!(start, step.filled().as_ptr());
        let n = step.filled().len();
        // SAFETY: `step` is `buf`'s unfilled region, and the inner reader
        // initialised and filled its first `n` bytes (the pattern of
        // tokio's own `Take`).
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn no_read_returns_more_than_the_cap_and_nothing_is_lost() {
        let data: Vec<u8> = (0..(3 * MAX_READ + 17)).map(|i| (i % 251) as u8).collect();
        let mut r = ReadCap::new(&data[..]);
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 4 * MAX_READ];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n <= MAX_READ, "a read returned {n} bytes");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn small_buffers_pass_through() {
        let data = b"hello world".to_vec();
        let mut r = ReadCap::new(&data[..]);
        let mut chunk = [0u8; 5];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 5);
        assert_eq!(&chunk, b"hello");
    }
}
