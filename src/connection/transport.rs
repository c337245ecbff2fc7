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

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
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
