//! One client WebSocket connection, living on its user's shard.
//!
//! A connection is two shard-local tasks sharing an `Rc<Conn>`:
//! - the **writer** owns the socket's write half. It sleeps until frames are
//!   queued, then takes everything queued (up to [`MAX_BATCH`] frames) and
//!   writes it with one vectored write: a lone frame goes out at once, a
//!   backlog goes out many frames per syscall. It records publish→write
//!   latency, and when it ends it deregisters the connection.
//! - the **reader** owns the read half (fastwebsockets, in its own task since
//!   `read_frame` is not cancel-safe). It answers app-level pings, refuses
//!   anything else with an `error` frame, enforces the 4 KiB message limit
//!   (1009) and stamps `last_recv` for the idle timeout.
//!
//! Closing is a state on the connection ([`CloseMode`]): `Now` drops what is
//! queued and sends a close frame; `AfterFlush` (shutdown) writes what is
//! queued first. Everything here runs on one thread, so state is in
//! `Cell`/`RefCell`, with no locks or atomics beyond the shard's counters.

pub mod queue;
pub mod sse_reader;
pub mod transport;

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::task::AbortHandle;

use crate::protocol::{self, ClientMessage, Priority, UserId};
use crate::wsframe::{self, Frame as Wire};
pub use queue::{Enqueued, Limits, OutQueue, Outbound};
pub use transport::{HandedSocket, ReadSide, WriteSide};

/// Most frames one batch carries: as many as one write call takes.
pub const MAX_BATCH: usize = transport::MAX_FRAMES_PER_WRITE;
/// Most bytes one batch carries, so one connection cannot hog its shard.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Largest client message accepted (contract §3); larger closes with 1009.
pub const MAX_CLIENT_MESSAGE: usize = 4096;
/// Largest message an echo connection (`--echo-path`) takes: the Autobahn
/// TestSuite's biggest case sends 16 MiB.
pub const MAX_ECHO_MESSAGE: usize = 16 << 20;
/// Longest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// How long a close frame may take to write before the socket is dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a connection is being closed.
#[derive(Debug, Clone)]
pub enum CloseMode {
    /// Drop queued events, write this close frame (if any), then end.
    Now(Option<Wire>),
    /// Write queued frames first, then the close frame; give up at the deadline.
    AfterFlush(Wire, Instant),
}

/// What is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A user's WebSocket (`/ws`).
    WebSocket,
    /// A user's Server-Sent Events stream (`/sse`).
    Sse,
    /// An `--echo-path` WebSocket (conformance aid).
    Echo,
}

/// The shard-local state of one connection.
pub struct Conn {
    /// Slab key on the shard.
    pub key: usize,
    /// The `conn` id reported in `welcome`.
    pub id: String,
    pub user: UserId,
    /// An `--echo-path` connection: data frames are echoed, no events.
    pub echo: bool,
    /// A `GET /sse` stream: frames are SSE messages, the client sends nothing.
    pub sse: bool,
    queue: RefCell<OutQueue>,
    closing: RefCell<Option<CloseMode>>,
    /// The writer task's waker, when it sleeps.
    waker: RefCell<Option<Waker>>,
    /// Last time the client sent anything (frame or pong).
    pub last_recv: Cell<Instant>,
    /// When the next protocol ping is due.
    pub next_ping: Cell<Instant>,
    /// While a resume replay is being written: the next seq it writes. The
    /// writer reads replayed events straight from the user's history, as
    /// fast as the client reads them (outside `--max-queue` and shedding);
    /// live events published meanwhile are read from there too, in order.
    pub replay_next: Cell<Option<u64>>,
    /// Cluster mode: registered, but its user's state is still being read
    /// from Redis; it gets no events until its `welcome` is queued.
    pub pending: Cell<bool>,
    reader: RefCell<Option<AbortHandle>>,
}

impl Conn {
    pub fn new(
        key: usize,
        id: String,
        user: UserId,
        kind: Kind,
        limits: Limits,
        now: Instant,
        ping: Duration,
    ) -> Self {
        Conn {
            key,
            id,
            user,
            echo: kind == Kind::Echo,
            sse: kind == Kind::Sse,
            queue: RefCell::new(OutQueue::new(limits)),
            closing: RefCell::new(None),
            waker: RefCell::new(None),
            last_recv: Cell::new(now),
            next_ping: Cell::new(now + ping),
            replay_next: Cell::new(None),
            pending: Cell::new(false),
            reader: RefCell::new(None),
        }
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn park(&self, cx: &Context<'_>) {
        let mut slot = self.waker.borrow_mut();
        match &*slot {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
    }

    /// Largest message this connection accepts.
    fn max_message(&self) -> usize {
        if self.echo {
            MAX_ECHO_MESSAGE
        } else {
            MAX_CLIENT_MESSAGE
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.borrow().is_some()
    }

    /// Event frames queued.
    pub fn depth(&self) -> usize {
        self.queue.borrow().depth()
    }

    /// Half of a queue limit is taken (see [`OutQueue::half_full`]).
    pub fn half_full(&self) -> bool {
        self.queue.borrow().half_full()
    }

    /// Bytes queued, control frames included.
    pub fn queued_bytes(&self) -> usize {
        self.queue.borrow().bytes()
    }

    /// Offers an event; the caller applies the outcome to its counters.
    pub fn push_event(&self, out: Outbound) -> Enqueued {
        if self.is_closing() {
            return Enqueued::Shed;
        }
        if self.replay_next.get().is_some() {
            self.wake();
            return Enqueued::Deferred;
        }
        let r = self.queue.borrow_mut().push_event(out);
        if matches!(r, Enqueued::Queued { .. }) {
            self.wake();
        }
        r
    }

    /// Starts writing a resume replay from `seq` (after what is queued now).
    pub fn start_replay(&self, seq: u64) {
        self.replay_next.set(Some(seq));
        self.wake();
    }

    /// Queues a control frame; a client that lets too many pile up is closed (1008).
    pub fn push_control(&self, frame: Wire) {
        if self.is_closing() {
            return;
        }
        let ok = self.queue.borrow_mut().push_control(frame);
        if ok {
            self.wake();
        } else {
            self.close_now(1008, "too many unanswered requests");
        }
    }

    /// The last frame this connection's transport sends when closing with `code`.
    fn close_frame(&self, code: u16, reason: &str) -> Wire {
        if self.sse {
            crate::sse::close(code, reason)
        } else {
            wsframe::close_frame(code, reason)
        }
    }

    /// A keep-alive for this connection's transport (WebSocket ping, SSE comment).
    pub fn ping_frame(&self) -> Wire {
        if self.sse {
            Wire::from(crate::sse::PING)
        } else {
            Wire::from(&[0x80 | wsframe::OP_PING, 0][..])
        }
    }

    /// Closes at once with `code`: queued events are dropped.
    pub fn close_now(&self, code: u16, reason: &str) {
        self.set_closing(CloseMode::Now(Some(self.close_frame(code, reason))));
    }

    /// The peer is gone: end without writing anything.
    pub fn abandon(&self) {
        self.set_closing(CloseMode::Now(None));
    }

    /// Closes with `code` after writing what is queued, giving up at `deadline`.
    pub fn close_after_flush(&self, code: u16, reason: &str, deadline: Instant) {
        self.set_closing(CloseMode::AfterFlush(self.close_frame(code, reason), deadline));
    }

    fn set_closing(&self, mode: CloseMode) {
        {
            let mut c = self.closing.borrow_mut();
            if matches!(*c, Some(CloseMode::Now(_))) {
                return; // already closing at once; keep the first reason
            }
            if matches!(mode, CloseMode::Now(_)) {
                self.queue.borrow_mut().clear_events();
            }
            *c = Some(mode);
        }
        self.wake();
    }

    pub fn set_reader(&self, handle: AbortHandle) {
        *self.reader.borrow_mut() = Some(handle);
    }

    fn stop_reader(&self) {
        if let Some(h) = self.reader.borrow_mut().take() {
            h.abort();
        }
    }
}

/// What a connection's writer needs from the shard that owns it. The
/// reactor implements it, so a connection never imports the reactor
/// (arrows point down).
pub trait Owner {
    /// Moves held events of a resume replay still being written into `batch`.
    fn fill_replay(&self, conn: &Conn, batch: &mut Vec<Outbound>, max_frames: usize, max_bytes: usize);
    /// A batch was written with `calls` write calls: counters and latency.
    fn written(&self, batch: &[Outbound], calls: u64);
    /// The connection's writer has ended: forget it.
    fn deregister(&self, conn: &Conn);
}

/// What the writer should do next.
enum Step {
    Write,
    Close(Option<Wire>),
}

/// The writer task: writes the `101` response (`greeting`) first, whatever
/// happens next, then runs until the connection closes and deregisters it.
pub async fn run_writer<O: Owner>(core: Rc<O>, conn: Rc<Conn>, mut sock: WriteSide, greeting: Bytes) {
    // Grows to the largest batch this connection has needed (idle ones stay tiny).
    let mut batch: Vec<Outbound> = Vec::new();
    // The greeting rides in the first batch (with `welcome`, in one write).
    let mut greeting =
        Some(Outbound { frame: Wire::from(&greeting[..]), accepted: None, priority: Priority::High });
    loop {
        batch.clear();
        // Whether this batch starts with the greeting (only the first does).
        let greets = greeting.is_some();
        batch.extend(greeting.take());
        let step = std::future::poll_fn(|cx| next_step(&*core, &conn, &mut batch, cx)).await;
        match step {
            Step::Write => {
                let deadline = match &*conn.closing.borrow() {
                    Some(CloseMode::AfterFlush(_, d)) => Some(*d),
                    _ => None,
                };
                let res = match deadline {
                    Some(d) => {
                        match tokio::time::timeout_at(d.into(), write_batch(&conn, &mut sock, &batch)).await {
                            Ok(r) => r,
                            Err(_) => Err(WriteFailed::Io),
                        }
                    }
                    None => write_batch(&conn, &mut sock, &batch).await,
                };
                match res {
                    Ok(calls) => core.written(&batch, calls),
                    Err(WriteFailed::Aborted { rest, untouched }) => {
                        let urgent = conn.closing.borrow().clone();
                        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
                            if greets && untouched {
                                // Closed before a byte went out: the `101`
                                // still rides ahead of the close frame.
                                sock.write_all(&batch[0].frame).await?;
                            }
                            if let Some(rest) = rest {
                                sock.write_all(&rest).await?;
                            }
                            if let Some(CloseMode::Now(Some(frame))) = urgent {
                                sock.write_all(&frame).await?;
                            }
                            sock.shutdown().await
                        })
                        .await;
                        break;
                    }
                    Err(WriteFailed::Io) => break,
                }
            }
            Step::Close(frame) => {
                if let Some(frame) = frame {
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
                        for o in &batch {
                            sock.write_all(&o.frame).await?; // the greeting, if still unwritten
                        }
                        sock.write_all(&frame).await?;
                        sock.shutdown().await
                    })
                    .await;
                }
                break;
            }
        }
    }
    conn.stop_reader();
    core.deregister(&conn);
}

/// Fills `batch` (which may already hold the greeting) or says how to close:
/// control frames first, then a resume replay still being written (read
/// from the history), then queued events.
fn next_step<O: Owner>(core: &O, conn: &Conn, batch: &mut Vec<Outbound>, cx: &mut Context<'_>) -> Poll<Step> {
    if let Some(CloseMode::Now(frame)) = &*conn.closing.borrow() {
        // Queued frames are skipped; only the greeting still in `batch` goes first.
        return Poll::Ready(Step::Close(frame.clone()));
    }
    let mut q = conn.queue.borrow_mut();
    if conn.replay_next.get().is_some() {
        q.pop_control(batch, MAX_BATCH);
        core.fill_replay(conn, batch, MAX_BATCH, MAX_BATCH_BYTES);
    }
    if !q.is_empty() || !batch.is_empty() {
        if conn.replay_next.get().is_none() {
            q.pop_batch(batch, MAX_BATCH, MAX_BATCH_BYTES);
        }
        return Poll::Ready(Step::Write);
    }
    if let Some(CloseMode::AfterFlush(frame, _)) = &*conn.closing.borrow() {
        return Poll::Ready(Step::Close(Some(frame.clone())));
    }
    drop(q);
    conn.park(cx);
    Poll::Pending
}

/// The write failed, or the connection was told to close mid-write.
#[derive(Debug)]
enum WriteFailed {
    /// The socket is unusable.
    Io,
    /// Closed with [`CloseMode::Now`] mid-batch; `rest` is the unwritten tail
    /// of a frame that was partly written (it must go out before the close
    /// frame, or the client would see a torn frame).
    /// `untouched`: not a byte of the batch was written.
    Aborted { rest: Option<Wire>, untouched: bool },
}

/// Writes every frame in `batch`, using as few vectored writes as the kernel
/// allows. Returns the number of write calls. Aborts if the connection is
/// closed with [`CloseMode::Now`] while waiting for the socket.
async fn write_batch(conn: &Conn, sock: &mut WriteSide, batch: &[Outbound]) -> Result<u64, WriteFailed> {
    // Progress: frames before `idx` are written, and `off` bytes of frame `idx`.
    let (mut idx, mut off) = (0usize, 0usize);
    let mut calls = 0;
    while idx < batch.len() {
        let n = std::future::poll_fn(|cx| {
            if matches!(&*conn.closing.borrow(), Some(CloseMode::Now(_))) {
                let rest = (off > 0).then(|| Wire::from(&batch[idx].frame[off..]));
                return Poll::Ready(Err(WriteFailed::Aborted { rest, untouched: idx == 0 && off == 0 }));
            }
            match sock.poll_write_frames(cx, &batch[idx..], off) {
                Poll::Pending => {
                    conn.park(cx);
                    Poll::Pending
                }
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(WriteFailed::Io)),
                Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
            }
        })
        .await?;
        calls += 1;
        advance(batch, &mut idx, &mut off, n);
    }
    // A TLS session may still hold encrypted bytes; plain TCP holds none.
    std::future::poll_fn(|cx| match Pin::new(&mut *sock).poll_flush(cx) {
        Poll::Ready(r) => Poll::Ready(r.map_err(|_| WriteFailed::Io)),
        // The frames are whole inside the session: nothing is torn.
        Poll::Pending if matches!(&*conn.closing.borrow(), Some(CloseMode::Now(_))) => {
            Poll::Ready(Err(WriteFailed::Aborted { rest: None, untouched: false }))
        }
        Poll::Pending => {
            conn.park(cx);
            Poll::Pending
        }
    })
    .await?;
    Ok(calls)
}

/// Moves the write position `(idx, off)` in `batch` forward by `n` bytes.
fn advance<F: AsRef<[u8]>>(batch: &[F], idx: &mut usize, off: &mut usize, n: usize) {
    let mut left = n;
    while left > 0 && *idx < batch.len() {
        let remaining = batch[*idx].as_ref().len() - *off;
        if left >= remaining {
            left -= remaining;
            *idx += 1;
            *off = 0;
        } else {
            *off += left;
            left = 0;
        }
    }
}

/// Bytes a frame of `payload_len` occupies on the wire when sent by a client
/// (client frames are always masked: 4 bytes of key).
fn client_frame_len(payload_len: usize) -> u64 {
    let ext = if payload_len < 126 {
        0
    } else if payload_len <= u16::MAX as usize {
        2
    } else {
        8
    };
    (2 + ext + 4 + payload_len) as u64
}

/// The read half as fastwebsockets sees it: first any bytes the listener
/// already read past the request head, then the socket; counts every byte
/// handed over, so the reader knows when fastwebsockets' buffer is empty.
struct Counted<'a> {
    inner: &'a mut ReadSide,
    prefix: Bytes,
    total: Rc<Cell<u64>>,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            this.total.set(this.total.get() + n as u64);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.total.set(this.total.get() + (buf.filled().len() - before) as u64);
        }
        r
    }
}

/// The reader task: runs until the client closes, errs, or the writer stops it.
///
/// Clients of this broker rarely send anything, so the reader holds no read
/// buffer while idle: it waits for the socket to become readable, only then
/// builds a fastwebsockets reader (which allocates its 8 KiB buffer), and
/// drops it again as soon as every byte it was handed has been consumed as
/// whole frames.
pub async fn run_reader(conn: Rc<Conn>, mut read: ReadSide, mut leftover: Bytes) {
    let mut fragments: Option<(OpCode, Vec<u8>)> = None;
    loop {
        // Wait (without a buffer) until at least one byte is there: `peek`
        // consumes nothing, and unlike readiness it cannot be stale.
        if leftover.is_empty() && read.ready().await.is_err() {
            conn.abandon();
            return;
        }
        let total = Rc::new(Cell::new(0u64));
        let counted =
            Counted { inner: &mut read, prefix: std::mem::take(&mut leftover), total: total.clone() };
        let (mut ws, _) =
            fastwebsockets::after_handshake_split(counted, tokio::io::sink(), fastwebsockets::Role::Server);
        ws.set_auto_close(true);
        // Pings are answered here, so that every frame read is seen and counted.
        ws.set_auto_pong(false);
        // fastwebsockets rejects a frame when `len >= max`, so allow exactly the limit.
        ws.set_max_message_size(conn.max_message() + 1);
        let mut consumed = 0u64;
        loop {
            let obligated = conn.clone();
            let mut send = move |mut frame: Frame<'_>| {
                let mut buf = Vec::with_capacity(frame.payload.len() + wsframe::MAX_HEADER_LEN);
                let bytes = Wire::from(frame.write(&mut buf));
                if frame.opcode == OpCode::Close && frame.payload.len() > MAX_CONTROL_PAYLOAD {
                    // fastwebsockets would echo it; RFC 6455 §5.5 makes it a protocol error.
                    obligated.close_now(1002, "control frame over 125 bytes");
                } else if frame.opcode == OpCode::Close {
                    obligated.set_closing(CloseMode::Now(Some(bytes)));
                } else {
                    obligated.push_control(bytes);
                }
                std::future::ready(Ok::<(), std::convert::Infallible>(()))
            };
            let frame = match ws.read_frame(&mut send).await {
                Ok(f) => f,
                Err(e) => {
                    close_for_read_error(&conn, e);
                    return;
                }
            };
            conn.last_recv.set(Instant::now());
            consumed += client_frame_len(frame.payload.len());
            if !handle_frame(&conn, &mut fragments, frame) {
                return;
            }
            match consumed.cmp(&total.get()) {
                std::cmp::Ordering::Equal => break, // buffer empty: drop it while idle
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Greater => {
                    // Only an unmasked client frame makes the count run ahead.
                    conn.close_now(1002, "client frames must be masked");
                    return;
                }
            }
        }
    }
}

/// Applies one client frame. Returns false when the connection must stop reading.
fn handle_frame(conn: &Conn, fragments: &mut Option<(OpCode, Vec<u8>)>, frame: Frame<'_>) -> bool {
    match frame.opcode {
        OpCode::Close => return false, // the answer is already queued
        OpCode::Ping => conn.push_control(wsframe::frame(wsframe::OP_PONG, &frame.payload)),
        OpCode::Pong if frame.payload.len() > MAX_CONTROL_PAYLOAD => {
            conn.close_now(1002, "control frame over 125 bytes");
            return false;
        }
        OpCode::Pong => {}
        OpCode::Text | OpCode::Binary => {
            if fragments.is_some() {
                conn.close_now(1002, "new message inside a fragmented one");
                return false;
            }
            if frame.fin {
                handle_message(conn, frame.opcode, &frame.payload);
            } else {
                *fragments = Some((frame.opcode, frame.payload.to_vec()));
            }
        }
        OpCode::Continuation => {
            let Some((op, mut buf)) = fragments.take() else {
                conn.close_now(1002, "continuation without a message");
                return false;
            };
            if buf.len() + frame.payload.len() > conn.max_message() {
                conn.close_now(1009, "message too big");
                return false;
            }
            buf.extend_from_slice(&frame.payload);
            if frame.fin {
                if op == OpCode::Text && std::str::from_utf8(&buf).is_err() {
                    conn.close_now(1007, "invalid UTF-8");
                    return false;
                }
                handle_message(conn, op, &buf);
            } else {
                *fragments = Some((op, buf));
            }
        }
    }
    true
}

fn close_for_read_error(conn: &Conn, e: WebSocketError) {
    match e {
        WebSocketError::FrameTooLarge => conn.close_now(1009, "message too big"),
        WebSocketError::InvalidUTF8 => conn.close_now(1007, "invalid UTF-8"),
        WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) | WebSocketError::ConnectionClosed => {
            conn.abandon()
        }
        WebSocketError::SendError(_) => conn.abandon(),
        _ => {
            // Protocol violations: reserved bits, bad opcodes, fragmented
            // control frames, oversized pings, bad close frames.
            if !conn.is_closing() {
                conn.close_now(1002, "protocol error");
            }
        }
    }
}

fn handle_message(conn: &Conn, op: OpCode, payload: &[u8]) {
    if conn.echo {
        let code = if op == OpCode::Binary { wsframe::OP_BINARY } else { wsframe::OP_TEXT };
        conn.push_control(wsframe::frame(code, payload));
        return;
    }
    if op == OpCode::Binary {
        conn.push_control(protocol::encode_client_error(
            "bad_request",
            "binary frames are not accepted; send JSON text",
        ));
        return;
    }
    match protocol::parse_client_message(payload) {
        Ok(ClientMessage::Ping(id)) => conn.push_control(protocol::encode_pong(&id)),
        Err(e) => conn.push_control(protocol::encode_client_error(e.code, &e.message)),
    }
}
