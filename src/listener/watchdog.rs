//! Bounds how many API connections may be open ([`OpenConnections`],
//! `--api-max-connections`) and how long one may hold a socket without
//! using it:
//! the first request head must arrive within `--handshake-timeout` of the
//! accept, and a keep-alive connection with no request in flight is closed
//! after `--idle-timeout` without traffic (contract §4).
//!
//! [`Tracked`] wraps the connection's I/O and stamps every byte moved;
//! [`Activity`] holds the stamps and the in-flight count the HTTP service
//! keeps. Atomics only because hyper's connection future must be `Send`;
//! one task touches them.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The API connections open at once, bounded by `--api-max-connections`.
/// A connection holds a [`Slot`] from accept until its socket closes
/// (a publisher stream keeps its connection's slot).
#[derive(Clone)]
pub struct OpenConnections {
    slots: Arc<Semaphore>,
    max: u32,
}

/// One open API connection's place.
pub type Slot = Arc<OwnedSemaphorePermit>;

impl OpenConnections {
    pub fn new(max: usize) -> Self {
        let max = u32::try_from(max).unwrap_or(u32::MAX).min(Semaphore::MAX_PERMITS as u32);
        OpenConnections { slots: Arc::new(Semaphore::new(max as usize)), max }
    }

    pub(crate) fn try_open(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(Arc::new)
    }

    /// Resolves once every API connection has closed.
    pub async fn all_closed(&self) {
        let _ = self.slots.acquire_many(self.max).await;
    }
}

/// When a connection last did something, and whether it is busy.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last byte read or written.
    last_ms: AtomicU64,
    /// Requests started so far, and those not yet answered.
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// Marks one request as in flight until dropped.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        // Relaxed: the watchdog reads these on the same task; no data is published through them.
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A request head was parsed: the connection is busy until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// Whether the connection has overstayed: no first head by
    /// `start + head_timeout`, or idle (nothing in flight) for `idle_timeout`.
    pub fn expired(&self, now: Instant, head_timeout: Duration, idle_timeout: Duration) -> bool {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        if self.started.load(Ordering::Relaxed) == 0 {
            return now >= self.start + head_timeout;
        }
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last) >= idle_timeout
    }
}

/// An I/O object that stamps its [`Activity`] on every byte moved.
pub struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> Tracked<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }

    /// The I/O object, no longer tracked (after an upgrade).
    pub fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn head_then_idle_deadlines() {
        let a = Activity::new();
        let (head, idle) = (Duration::from_secs(2), Duration::from_secs(5));
        assert!(!a.expired(Instant::now(), head, idle));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(a.expired(Instant::now(), head, idle), "no head within the head timeout");
        let busy = a.begin_request();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!a.expired(Instant::now(), head, idle), "a request in flight is never idle");
        drop(busy);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!a.expired(Instant::now(), head, idle));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(a.expired(Instant::now(), head, idle), "idle keep-alive past the idle timeout");
    }
}
