//! `GET /v1/stream`: a publisher WebSocket for high rates.
//!
//! Each text message is one publish object or NDJSON of up to 1,000. With
//! `?acks=1` every message is answered with `{"type":"ack","results":[...]}`
//! (items as in a batch); without acks only failures come back, as
//! `{"type":"error","code","message","index"}`. Items of one message are
//! submitted in order before any reply is awaited, so a message costs one
//! ring push per item and the stream never waits on a shard without acks.
//!
//! The stream is a reader and a writer in one task. The reader reassembles
//! fragmented messages up to the batch limit (1,000 items and
//! `--max-payload` × 1,000 bytes, fragments included; more closes with 1009
//! and none of it is applied) and applies messages in order, each batch
//! before it reads on. A batch is the next message plus every further one
//! already read off the socket (up to [`GATHER_BYTES`]): a publisher's
//! backlog after a stall is applied as one publish and answered with one
//! write, not a reactor round trip and a `write` per message — replies stay
//! one per message, in order. The writer encodes replies itself
//! ([`wsframe`]) and writes everything queued at once; it pings every
//! `--ping-interval`, closes a publisher that sent nothing (no frame, no
//! pong) for `--idle-timeout` (4002), and at shutdown sends 1001 while the
//! reader goes on applying every message that arrives before the
//! publisher's answering close — so the closing handshake tells the
//! publisher exactly what was taken.

use std::convert::Infallible;
use std::io::Cursor;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead};
use futures_util::{FutureExt, Stream, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Chain, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch;
use crate::listener::readcap::ReadCap;
use crate::listener::reply::error;
use crate::listener::watchdog::{Slot, Tracked};
use crate::publish::{self, PublishError, Published};
use crate::shared::Shared;
use crate::wsframe;

type Io = TokioIo<Upgraded>;

/// Largest stream message: a full batch of maximum-size items, capped.
fn max_message(shared: &Shared) -> usize {
    batch::MAX_ITEMS.saturating_mul(shared.config.max_payload).min(64 << 20)
}

/// How long the writer may take to send a close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A batch stops taking further already-read messages once it holds this
/// many bytes (one message of a max-rate publisher is larger: it is applied
/// alone, as before batching) ...
const GATHER_BYTES: usize = 64 << 10;
/// ... or this many messages.
const GATHER_MESSAGES: usize = 256;

/// What the reader asks the writer to send.
enum Out {
    /// Text replies, in order.
    Replies(Vec<String>),
    /// A control frame fastwebsockets obliges us to send (pong, close echo).
    Control(OpCode, Vec<u8>),
    /// Close with this code and reason, then stop.
    Close(u16, &'static str),
}

/// Answers the upgrade and spawns the stream's task (which keeps `slot`).
pub fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    slot: Slot,
    shutdown: CancellationToken,
) -> Response<Full<Bytes>> {
    let acks = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "acks=1" || p == "acks=true"));
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(v) => v,
        Err(e) => {
            return error(426, "upgrade_required", &format!("GET /v1/stream needs a WebSocket upgrade: {e}"))
        }
    };
    tokio::spawn(async move {
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "publisher stream upgrade failed");
                return;
            }
        };
        match split(ws) {
            Halves::Plain(rd, wr) => run(rd, wr, &shared, acks, shutdown).await,
            Halves::Shared(rd, wr) => run(rd, wr, &shared, acks, shutdown).await,
        }
        drop(slot);
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// The stream's two halves: a plain TCP socket splits into tokio's owned
/// halves (no lock: the reader and writer share nothing but the socket); a
/// TLS session is one state machine and shares it through tokio's `split`
/// (a mutex, uncontended: both halves are polled by the same task).
enum Halves {
    /// The read half replays first the bytes hyper read past the upgrade
    /// request, then reads the socket.
    Plain(WebSocketRead<ReadCap<Chain<Cursor<Bytes>, OwnedReadHalf>>>, OwnedWriteHalf),
    Shared(WebSocketRead<ReadCap<ReadHalf<Io>>>, WriteHalf<Io>),
}

/// fastwebsockets' frame reader over `read`. Its writer comes only in a
/// pair and writes a frame per call, so ours is dropped: replies are
/// encoded with [`wsframe`] and written many to a syscall.
fn reader<R: AsyncRead + Unpin>(read: R) -> WebSocketRead<R> {
    fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server).0
}

fn split(ws: fastwebsockets::WebSocket<Io>) -> Halves {
    match ws.into_inner().into_inner().downcast::<TokioIo<Tracked<TcpStream>>>() {
        Ok(parts) => {
            let (r, w) = parts.io.into_inner().into_inner().into_split();
            Halves::Plain(reader(ReadCap::new(Cursor::new(parts.read_buf).chain(r))), w)
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            Halves::Shared(reader(ReadCap::new(r)), w)
        }
    }
}

async fn run<R, W>(mut rd: WebSocketRead<R>, wr: W, shared: &Shared, acks: bool, shutdown: CancellationToken)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    rd.set_auto_close(true);
    rd.set_auto_pong(true);
    // fastwebsockets refuses a frame when `len >= max`, so allow exactly the limit.
    rd.set_max_message_size(max_message(shared) + 1);
    let (tx, rx) = mpsc::channel::<Out>(16);
    let start = tokio::time::Instant::now();
    // Milliseconds after `start` of the last frame received (any kind).
    let last_recv = AtomicU64::new(0);
    let reader = read_loop(rd, shared, acks, tx, start, &last_recv);
    let writer = write_loop(wr, shared, rx, shutdown, start, &last_recv);
    tokio::pin!(reader, writer);
    tokio::select! {
        // The reader is done (close, EOF, error): let the writer send what
        // is queued (the close echo included); it ends when the channel does.
        _ = &mut reader => { let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, writer).await; }
        // The writer closed the stream (idle) or the socket failed.
        _ = &mut writer => {}
    }
}

/// One frame as read, its payload owned (fastwebsockets hands a frame's
/// bytes out of its buffer without a copy).
struct ReadFrame {
    fin: bool,
    op: OpCode,
    payload: BytesMut,
}

/// A frame read (or why none was), and the close frame owed in answer
/// when it was a close: the reader sends that after the replies to the
/// messages before it, so a publisher's close is answered only once all
/// it sent was.
type Read = (Result<ReadFrame, WebSocketError>, Option<Vec<u8>>);

/// The stream's frames. A stream keeps its pending read when `next()` is
/// dropped unfinished (fastwebsockets' `read_frame` future does not: it
/// takes a frame's header before it waits for the payload), which is what
/// lets the reader ask for a frame "only if already read" and wait for it
/// later. Pongs fastwebsockets owes go straight to the writer.
fn frames<R: AsyncRead + Unpin>(
    rd: WebSocketRead<R>,
    obligated: mpsc::Sender<Out>,
) -> impl Stream<Item = Read> {
    futures_util::stream::unfold((rd, obligated), |(mut rd, obligated)| async move {
        let mut echo = None;
        let mut send = |f: Frame<'_>| {
            match f.opcode {
                OpCode::Close => echo = Some(f.payload.to_vec()),
                op => drop(obligated.try_send(Out::Control(op, f.payload.to_vec()))),
            }
            std::future::ready(Ok::<(), Infallible>(()))
        };
        let read = rd.read_frame(&mut send).await.map(|f| ReadFrame {
            fin: f.fin,
            op: f.opcode,
            payload: match f.payload {
                Payload::Bytes(b) => b,
                other => BytesMut::from(&other[..]),
            },
        });
        Some(((read, echo), (rd, obligated)))
    })
}

/// One complete message.
struct Message {
    op: OpCode,
    bytes: BytesMut,
    /// Gathered from fragments: its UTF-8 is still to be checked
    /// (fastwebsockets checks unfragmented text frames itself).
    gathered: bool,
}

/// What a frame meant for the stream.
enum Step {
    Message(Message),
    /// Nothing to apply yet (a fragment, a ping, a pong).
    More,
    /// The stream ends.
    End(Ended),
}

/// How a stream ended: with this frame to send back (a close or its echo),
/// or with nothing to send.
struct Ended(Option<Out>);

/// Reassembles fragmented messages, up to `cap` bytes.
struct Assembler {
    cap: usize,
    partial: Option<(OpCode, BytesMut)>,
}

impl Assembler {
    fn feed(&mut self, read: Option<Read>) -> Step {
        let close = |code, reason| Step::End(Ended(Some(Out::Close(code, reason))));
        let f = match read {
            Some((_, Some(echo))) => return Step::End(Ended(Some(Out::Control(OpCode::Close, echo)))),
            Some((Ok(f), None)) => f,
            Some((Err(WebSocketError::FrameTooLarge), None)) => {
                return close(1009, "message over the batch limit")
            }
            Some((Err(WebSocketError::InvalidUTF8), None)) => return close(1007, "invalid UTF-8"),
            Some((Err(_), None)) | None => return Step::End(Ended(None)),
        };
        match f.op {
            OpCode::Close => Step::End(Ended(None)),
            OpCode::Ping | OpCode::Pong => Step::More,
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                close(1002, "new message inside a fragmented one")
            }
            OpCode::Text | OpCode::Binary if f.fin => {
                Step::Message(Message { op: f.op, bytes: f.payload, gathered: false })
            }
            OpCode::Text | OpCode::Binary => {
                self.partial = Some((f.op, f.payload));
                Step::More
            }
            OpCode::Continuation => {
                let Some((op, mut buf)) = self.partial.take() else {
                    return close(1002, "continuation without a message");
                };
                if buf.len() + f.payload.len() > self.cap {
                    return close(1009, "message over the batch limit");
                }
                buf.extend_from_slice(&f.payload);
                if !f.fin {
                    self.partial = Some((op, buf));
                    return Step::More;
                }
                Step::Message(Message { op, bytes: buf, gathered: true })
            }
        }
    }
}

/// Reads, reassembles and applies messages until the stream ends.
async fn read_loop<R: AsyncRead + Unpin>(
    rd: WebSocketRead<R>,
    shared: &Shared,
    acks: bool,
    tx: mpsc::Sender<Out>,
    start: tokio::time::Instant,
    last_recv: &AtomicU64,
) {
    let frames = frames(rd, tx.clone());
    tokio::pin!(frames);
    let mut asm = Assembler { cap: max_message(shared), partial: None };
    let mut batch = Vec::new();
    // Relaxed: a timestamp read by the writer on the same task.
    let seen = || last_recv.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    loop {
        let mut end = loop {
            let read = frames.next().await;
            seen();
            match asm.feed(read) {
                Step::Message(m) => {
                    batch.push(m);
                    break None;
                }
                Step::More => continue,
                Step::End(ended) => break Some(ended),
            }
        };
        if end.is_none() {
            end = gather(frames.as_mut(), &mut asm, &mut batch, seen);
        }
        match apply(shared, &batch, acks, &tx).await {
            Flow::Go => batch.clear(),
            Flow::Gone => return,
            Flow::Close(code, reason) => end = Some(Ended(Some(Out::Close(code, reason)))),
        }
        if let Some(Ended(last)) = end {
            if let Some(frame) = last {
                let _ = tx.send(frame).await;
            }
            return;
        }
    }
}

/// Adds to `batch` every further message already read, without waiting,
/// up to [`GATHER_BYTES`] and [`GATHER_MESSAGES`]; `Some` when the stream
/// ended meanwhile.
fn gather<S>(
    mut frames: std::pin::Pin<&mut S>,
    asm: &mut Assembler,
    batch: &mut Vec<Message>,
    seen: impl Fn(),
) -> Option<Ended>
where
    S: Stream<Item = Read>,
{
    let mut bytes: usize = batch.iter().map(|m| m.bytes.len()).sum();
    while bytes < GATHER_BYTES && batch.len() < GATHER_MESSAGES {
        let read = frames.next().now_or_never()?;
        seen();
        match asm.feed(read) {
            Step::Message(m) => {
                bytes += m.bytes.len();
                batch.push(m);
            }
            Step::More => {}
            Step::End(ended) => return Some(ended),
        }
    }
    None
}

/// What the reader does after a batch.
enum Flow {
    Go,
    /// The writer is gone.
    Gone,
    /// A message broke the stream's rules: the ones before it were applied.
    Close(u16, &'static str),
}

/// What a message of a batch is answered with.
enum Answer {
    /// Its items, a range of the batch's.
    Items(Range<usize>),
    /// One error frame (the message was not applied).
    Refused(String),
}

/// Applies a batch's messages in order as one publish, then sends each
/// message's replies, in order, in one hand-over to the writer.
async fn apply(shared: &Shared, batch: &[Message], acks: bool, tx: &mpsc::Sender<Out>) -> Flow {
    let mut items = Vec::new();
    let mut answers = Vec::with_capacity(batch.len());
    let mut flow = Flow::Go;
    for m in batch {
        if m.op != OpCode::Text {
            answers.push(Answer::Refused(error_frame(
                "bad_request",
                "send publish objects as text frames",
                0,
            )));
            continue;
        }
        if m.gathered && std::str::from_utf8(&m.bytes).is_err() {
            flow = Flow::Close(1007, "invalid UTF-8");
            break;
        }
        match batch::split(&m.bytes) {
            Ok(its) => {
                let from = items.len();
                items.extend(its);
                answers.push(Answer::Items(from..items.len()));
            }
            Err(e) if e.code == "too_many_items" => {
                flow = Flow::Close(1009, "more than 1000 items in one message");
                break;
            }
            Err(e) => {
                shared.api_errors.count(e.code);
                answers.push(Answer::Refused(error_frame(e.code, &e.message, 0)));
            }
        }
    }
    let results = match items.is_empty() {
        true => Vec::new(),
        false => publish::publish_items(shared, &items, acks, publish::Admission::Wait).await,
    };
    let mut replies = Vec::new();
    for answer in answers {
        match answer {
            Answer::Refused(frame) => replies.push(frame),
            Answer::Items(range) => replies.extend(answer_items(&results[range], acks)),
        }
    }
    if !replies.is_empty() && tx.send(Out::Replies(replies)).await.is_err() {
        return Flow::Gone;
    }
    flow
}

/// A message's replies: its ack, or (fire-and-forget) an error frame per
/// refused item.
fn answer_items(results: &[Result<Published, PublishError>], acks: bool) -> Vec<String> {
    if acks {
        let mut ack = String::with_capacity(32 + 32 * results.len());
        ack.push_str("{\"type\":\"ack\",\"results\":");
        publish::write_results(&mut ack, results);
        ack.push('}');
        return vec![ack];
    }
    results
        .iter()
        .enumerate()
        .filter_map(|(index, r)| r.as_ref().err().map(|e| error_frame(e.code(), &e.to_string(), index)))
        .collect()
}

/// `{"type":"error",...}` for the item at `index` of a message.
fn error_frame(code: &str, message: &str, index: usize) -> String {
    serde_json::json!({"type": "error", "code": code, "message": message, "index": index}).to_string()
}

/// Sends replies and pings; closes idle publishers and, at shutdown, sends
/// 1001 (the reader keeps applying until the publisher answers it).
/// Everything queued when it wakes goes out in one write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    shared: &Shared,
    mut rx: mpsc::Receiver<Out>,
    shutdown: CancellationToken,
    start: tokio::time::Instant,
    last_recv: &AtomicU64,
) {
    let cfg = &shared.config;
    let mut ping = tokio::time::interval_at(start + cfg.ping_interval, cfg.ping_interval);
    let idle_check = (cfg.idle_timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    let mut idle = tokio::time::interval_at(start + idle_check, idle_check);
    let mut close_sent = false;
    let mut buf = Vec::with_capacity(4096);
    // Registered once, not per reply: the token's waiter list is behind a mutex.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let out = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = ping.tick(), if !close_sent => Out::Control(OpCode::Ping, Vec::new()),
            _ = idle.tick() => {
                let last = start + Duration::from_millis(last_recv.load(Ordering::Relaxed));
                if last.elapsed() < cfg.idle_timeout {
                    continue;
                }
                if close_sent {
                    return; // the publisher never answered our close
                }
                Out::Close(4002, "idle timeout")
            }
            _ = &mut cancelled, if !close_sent => {
                close_sent = true;
                buf.clear();
                wsframe::put_close(&mut buf, 1001, "server shutting down");
                if !matches!(tokio::time::timeout(CLOSE_WRITE_TIMEOUT, send(&mut wr, &buf)).await, Ok(Ok(()))) {
                    return;
                }
                continue;
            }
        };
        buf.clear();
        let mut closing = encode(&mut buf, out, close_sent);
        while !closing {
            match rx.try_recv() {
                Ok(out) => closing = encode(&mut buf, out, close_sent),
                Err(_) => break,
            }
        }
        if buf.is_empty() {
            continue;
        }
        let limit = if closing { CLOSE_WRITE_TIMEOUT } else { cfg.idle_timeout };
        let written = tokio::time::timeout(limit, send(&mut wr, &buf)).await;
        if !matches!(written, Ok(Ok(()))) || closing {
            return;
        }
    }
}

/// Appends `out`'s frames to `buf`; true when it was a close (the last
/// frame the writer sends). After our own close (shutdown) only replies
/// still go out.
fn encode(buf: &mut Vec<u8>, out: Out, close_sent: bool) -> bool {
    match out {
        Out::Replies(replies) => {
            for r in &replies {
                wsframe::put_frame(buf, wsframe::OP_TEXT, r.as_bytes());
            }
            false
        }
        _ if close_sent => false,
        Out::Control(OpCode::Close, payload) => {
            wsframe::put_frame(buf, wsframe::OP_CLOSE, &payload);
            true
        }
        Out::Control(OpCode::Pong, payload) => {
            wsframe::put_frame(buf, wsframe::OP_PONG, &payload);
            false
        }
        Out::Control(OpCode::Ping, _) => {
            wsframe::put_frame(buf, wsframe::OP_PING, &[]);
            false
        }
        Out::Control(..) => false,
        Out::Close(code, reason) => {
            wsframe::put_close(buf, code, reason);
            true
        }
    }
}

/// Writes `bytes` and flushes (a TLS session may hold them otherwise).
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}
