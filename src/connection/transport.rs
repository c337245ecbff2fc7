//! The byte stream under a client connection: plain TCP, or TLS (rustls).
//!
//! The listener accepts the socket, runs the TLS handshake (if any) and reads
//! the request head on the I/O runtime, then hands the socket to the user's
//! shard as a [`HandedSocket`], which is `Send`. The shard re-registers the
//! TCP socket with its own runtime ([`HandedSocket::adopt`]) and splits it
//! into the [`ReadSide`] and [`WriteSide`] its two connection tasks own.
//!
//! Plain sockets split with tokio's owned halves. A TLS session is one state
//! machine for both directions, so its halves share it through an
//! `Rc<RefCell<_>>`: both tasks run on the shard's one thread and a poll never
//! re-enters another, so a borrow lasts exactly one poll and no lock is taken.
//! Everything here is I/O plumbing: no protocol logic, no shard state.
//!
//! Queued frames leave a plain socket through [`WriteSide::poll_write_frames`]:
//! several small frames are copied into one thread-local buffer and written
//! with one `write`. Linux copies a `writev` iovec by iovec, and for ~300-byte
//! frames that per-segment copy cost more than the whole memcpy (PERFORMANCE
//! entry 22). The copy is made only once the socket is writable, so a writer
//! blocked on a slow client copies nothing however often it is woken.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::ready;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A TLS session over a [`Socket`].
pub type TlsStream = tokio_rustls::server::TlsStream<Socket>;

/// A TCP socket that can move between runtimes while a TLS session sits on
/// top of it: [`Socket::detach`] on the listener, [`Socket::attach`] on the shard.
#[derive(Debug)]
pub enum Socket {
    /// Registered with the current runtime's reactor: usable.
    Live(TcpStream),
    /// Between runtimes (non-blocking std socket): not usable until attached.
    Moving(std::net::TcpStream),
    /// A failed move left nothing behind.
    Gone,
}

impl Socket {
    /// Deregisters the socket from this runtime so it can cross threads.
    pub fn detach(&mut self) -> io::Result<()> {
        match std::mem::replace(self, Socket::Gone) {
            Socket::Live(t) => *self = Socket::Moving(t.into_std()?),
            other => *self = other,
        }
        Ok(())
    }

    /// Registers the socket with the calling thread's runtime.
    pub fn attach(&mut self) -> io::Result<()> {
        match std::mem::replace(self, Socket::Gone) {
            Socket::Moving(s) => *self = Socket::Live(TcpStream::from_std(s)?),
            other => *self = other,
        }
        Ok(())
    }

    fn live(&mut self) -> io::Result<&mut TcpStream> {
        match self {
            Socket::Live(t) => Ok(t),
            _ => Err(io::Error::new(io::ErrorKind::NotConnected, "socket is between runtimes")),
        }
    }
}

/// The live socket, pinned; or the poll ends with the error.
macro_rules! live {
    ($socket:expr) => {
        match $socket.live() {
            Ok(t) => Pin::new(t),
            Err(e) => return Poll::Ready(Err(e)),
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        live!(self.get_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        live!(self.get_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        live!(self.get_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        live!(self.get_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        live!(self.get_mut()).poll_shutdown(cx)
    }
}

/// A client socket on its way from the listener to a shard.
#[derive(Debug)]
pub enum HandedSocket {
    Plain(std::net::TcpStream),
    /// The TLS session, its [`Socket`] detached.
    Tls(Box<TlsStream>),
}

impl HandedSocket {
    /// Registers the socket with the calling (shard) runtime and splits it.
    pub fn adopt(self) -> io::Result<(ReadSide, WriteSide)> {
        match self {
            HandedSocket::Plain(s) => {
                let stream = TcpStream::from_std(s)?;
                let _ = stream.set_nodelay(true);
                let (r, w) = stream.into_split();
                Ok((ReadSide::Plain(r), WriteSide::Plain(w)))
            }
            HandedSocket::Tls(mut tls) => {
                let socket = tls.get_mut().0;
                socket.attach()?;
                let _ = socket.live()?.set_nodelay(true);
                let shared = Rc::new(RefCell::new(*tls));
                Ok((ReadSide::Tls(shared.clone()), WriteSide::Tls(shared)))
            }
        }
    }
}

/// The connection reader's half.
pub enum ReadSide {
    Plain(OwnedReadHalf),
    Tls(Rc<RefCell<TlsStream>>),
}

impl ReadSide {
    /// Waits until reading would make progress, without a read buffer.
    ///
    /// On plain TCP this peeks one byte (it consumes nothing and, unlike a
    /// readiness flag, cannot be stale). A TLS session may already hold
    /// decrypted bytes the socket no longer shows, so it reports ready at
    /// once and the reader keeps its buffer.
    pub async fn ready(&mut self) -> io::Result<()> {
        match self {
            ReadSide::Plain(r) => r.peek(&mut [0u8; 1]).await.map(|_| ()),
            ReadSide::Tls(_) => Ok(()),
        }
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Tls(t) => Pin::new(&mut *t.borrow_mut()).poll_read(cx, buf),
        }
    }
}

/// The connection writer's half. Writers must flush after writing: a TLS
/// session may hold encrypted bytes the socket would not take yet.
pub enum WriteSide {
    Plain(OwnedWriteHalf),
    Tls(Rc<RefCell<TlsStream>>),
}

/// Most frames one write call takes (Linux's IOV_MAX is 1024; 64 already
/// amortises the call ~64×).
pub const MAX_FRAMES_PER_WRITE: usize = 64;

/// Most bytes one gathered write copies: a loopback segment's worth; larger
/// frames go out as they are, without a copy.
const GATHER_MAX: usize = 64 * 1024;

thread_local! {
    /// The shard thread's gather buffer: filled and written within one poll,
    /// so the thread's writers share it (grows to [`GATHER_MAX`] at most).
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl WriteSide {
    /// Writes from `frames` (the first [`MAX_FRAMES_PER_WRITE`] at most, the
    /// first one from byte `off`), as much as the socket takes in one call;
    /// returns the bytes written. See the module doc for why plain sockets gather.
    pub fn poll_write_frames<F: AsRef<[u8]>>(
        &mut self,
        cx: &mut Context<'_>,
        frames: &[F],
        off: usize,
    ) -> Poll<io::Result<usize>> {
        let frames = &frames[..frames.len().min(MAX_FRAMES_PER_WRITE)];
        let Some((first, rest)) = frames.split_first() else {
            return Poll::Ready(Ok(0));
        };
        let first = &first.as_ref()[off..];
        match self {
            WriteSide::Plain(w) => loop {
                let stream: &TcpStream = w.as_ref();
                ready!(stream.poll_write_ready(cx))?;
                let res = match rest.first() {
                    Some(next) if first.len() + next.as_ref().len() <= GATHER_MAX => gathered(w, first, rest),
                    _ => w.try_write(first),
                };
                match res {
                    // Readiness is now cleared: the next turn registers for it.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return Poll::Ready(r),
                }
            },
            WriteSide::Tls(t) => {
                let mut slices = [IoSlice::new(&[]); MAX_FRAMES_PER_WRITE];
                slices[0] = IoSlice::new(first);
                for (slot, f) in slices[1..].iter_mut().zip(rest) {
                    *slot = IoSlice::new(f.as_ref());
                }
                Pin::new(&mut *t.borrow_mut()).poll_write_vectored(cx, &slices[..frames.len()])
            }
        }
    }
}

/// Copies `first` and as many of `rest` as fit in [`GATHER_MAX`] into the
/// thread's gather buffer and writes it to `w` (one `try_write`).
fn gathered<F: AsRef<[u8]>>(w: &OwnedWriteHalf, first: &[u8], rest: &[F]) -> io::Result<usize> {
    GATHER.with(|g| {
        let mut buf = g.borrow_mut();
        buf.clear();
        buf.extend_from_slice(first);
        for f in rest {
            let f = f.as_ref();
            if buf.len() + f.len() > GATHER_MAX {
                break;
            }
            buf.extend_from_slice(f);
        }
        w.try_write(&buf)
    })
}

impl AsyncWrite for WriteSide {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteSide::Tls(t) => Pin::new(&mut *t.borrow_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteSide::Tls(t) => Pin::new(&mut *t.borrow_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteSide::Tls(t) => Pin::new(&mut *t.borrow_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteSide::Tls(t) => Pin::new(&mut *t.borrow_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Frames of mixed sizes (small ones gathered, some larger than
    /// [`GATHER_MAX`]), far more than the socket buffers hold, so writes end
    /// mid-frame and resume from an offset.
    fn frames() -> Vec<Vec<u8>> {
        (0..3000u32)
            .map(|i| {
                let len = match i % 7 {
                    0 => 1 + (i as usize * 131) % 90_000,
                    _ => 1 + (i as usize * 17) % 600,
                };
                (0..len).map(|j| (i as usize + j) as u8).collect()
            })
            .collect()
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_across_partial_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr);
        let (server, client) = tokio::join!(listener.accept(), client);
        let (_read, write) = server.expect("accept").0.into_split();
        let mut sock = WriteSide::Plain(write);
        let frames = frames();
        let expected: Vec<u8> = frames.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.expect("connect").read_to_end(&mut got).await.expect("read");
            got
        });
        let (mut idx, mut off, mut calls, mut partial) = (0usize, 0usize, 0u32, 0u32);
        while idx < frames.len() {
            let n = std::future::poll_fn(|cx| sock.poll_write_frames(cx, &frames[idx..], off))
                .await
                .expect("write");
            assert!(n > 0);
            calls += 1;
            crate::connection::advance(&frames, &mut idx, &mut off, n);
            if off > 0 {
                partial += 1;
            }
        }
        drop(sock);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
        // Small frames were gathered (fewer calls than frames), and some
        // writes ended mid-frame, so the offset path ran.
        assert!((calls as usize) < frames.len(), "{calls} calls for {} frames", frames.len());
        assert!(partial > 0, "no write ended mid-frame");
    }
}
