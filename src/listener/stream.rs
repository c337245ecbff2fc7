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
//! and none of it is applied) and applies each message before reading the
//! next. The writer sends replies, pings every `--ping-interval`, closes a
//! publisher that sent nothing (no frame, no pong) for `--idle-timeout`
//! (4002), and at shutdown sends 1001 while the reader goes on applying
//! every message that arrives before the publisher's answering close — so
//! the closing handshake tells the publisher exactly what was taken.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketRead, WebSocketWrite};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Chain, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch;
use crate::listener::readcap::ReadCap;
use crate::listener::reply::error;
use crate::listener::watchdog::{Slot, Tracked};
use crate::publish;
use crate::shared::Shared;

type Io = TokioIo<Upgraded>;

/// Largest stream message: a full batch of maximum-size items, capped.
fn max_message(shared: &Shared) -> usize {
    batch::MAX_ITEMS.saturating_mul(shared.config.max_payload).min(64 << 20)
}

/// How long the writer may take to send a close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the reader asks the writer to send.
enum Out {
    Text(String),
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
    Plain(WebSocketRead<ReadCap<Chain<Cursor<Bytes>, OwnedReadHalf>>>, WebSocketWrite<OwnedWriteHalf>),
    Shared(WebSocketRead<ReadCap<ReadHalf<Io>>>, WebSocketWrite<WriteHalf<Io>>),
}

fn split(ws: fastwebsockets::WebSocket<Io>) -> Halves {
    match ws.into_inner().into_inner().downcast::<TokioIo<Tracked<TcpStream>>>() {
        Ok(parts) => {
            let (r, w) = parts.io.into_inner().into_inner().into_split();
            let read = ReadCap::new(Cursor::new(parts.read_buf).chain(r));
            let (rd, wr) = fastwebsockets::after_handshake_split(read, w, Role::Server);
            Halves::Plain(rd, wr)
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            let (rd, wr) = fastwebsockets::after_handshake_split(ReadCap::new(r), w, Role::Server);
            Halves::Shared(rd, wr)
        }
    }
}

async fn run<R, W>(
    mut rd: WebSocketRead<R>,
    wr: WebSocketWrite<W>,
    shared: &Shared,
    acks: bool,
    shutdown: CancellationToken,
) where
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

/// Reads, reassembles and applies messages until the stream ends.
async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: WebSocketRead<R>,
    shared: &Shared,
    acks: bool,
    tx: mpsc::Sender<Out>,
    start: tokio::time::Instant,
    last_recv: &AtomicU64,
) {
    let cap = max_message(shared);
    let mut partial: Option<(OpCode, Vec<u8>)> = None;
    loop {
        let obligated = tx.clone();
        let mut send = move |f: Frame<'_>| {
            let _ = obligated.try_send(Out::Control(f.opcode, f.payload.to_vec()));
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        };
        let frame = match rd.read_frame(&mut send).await {
            Ok(f) => f,
            Err(fastwebsockets::WebSocketError::FrameTooLarge) => {
                let _ = tx.send(Out::Close(1009, "message over the batch limit")).await;
                return;
            }
            Err(fastwebsockets::WebSocketError::InvalidUTF8) => {
                let _ = tx.send(Out::Close(1007, "invalid UTF-8")).await;
                return;
            }
            Err(_) => return,
        };
        // Relaxed: a timestamp read by the writer on the same task.
        last_recv.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        // A whole message is used where fastwebsockets read it (no copy);
        // only a fragmented one is gathered into a buffer of its own.
        let gathered: Vec<u8>;
        let (op, message): (OpCode, &[u8]) = match frame.opcode {
            OpCode::Close => return,
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Text | OpCode::Binary if partial.is_some() => {
                let _ = tx.send(Out::Close(1002, "new message inside a fragmented one")).await;
                return;
            }
            OpCode::Text | OpCode::Binary if frame.fin => (frame.opcode, &frame.payload),
            OpCode::Text | OpCode::Binary => {
                partial = Some((frame.opcode, frame.payload.to_vec()));
                continue;
            }
            OpCode::Continuation => {
                let Some((op, mut buf)) = partial.take() else {
                    let _ = tx.send(Out::Close(1002, "continuation without a message")).await;
                    return;
                };
                if buf.len() + frame.payload.len() > cap {
                    let _ = tx.send(Out::Close(1009, "message over the batch limit")).await;
                    return;
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    partial = Some((op, buf));
                    continue;
                }
                gathered = buf;
                (op, &gathered)
            }
        };
        let replies = match op {
            OpCode::Text => {
                if std::str::from_utf8(message).is_err() {
                    let _ = tx.send(Out::Close(1007, "invalid UTF-8")).await;
                    return;
                }
                match handle_message(shared, message, acks).await {
                    Ok(replies) => replies,
                    Err(()) => {
                        let _ = tx.send(Out::Close(1009, "more than 1000 items in one message")).await;
                        return;
                    }
                }
            }
            _ => vec![serde_json::json!({
                "type": "error", "code": "bad_request", "message": "send publish objects as text frames", "index": 0
            })
            .to_string()],
        };
        for r in replies {
            if tx.send(Out::Text(r)).await.is_err() {
                return;
            }
        }
    }
}

/// Sends replies and pings; closes idle publishers and, at shutdown, sends
/// 1001 (the reader keeps applying until the publisher answers it).
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: WebSocketWrite<W>,
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
                let f = Frame::close(1001, b"server shutting down");
                if tokio::time::timeout(CLOSE_WRITE_TIMEOUT, wr.write_frame(f)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let frame = match &out {
            _ if close_sent && !matches!(out, Out::Text(_)) => continue, // one close per stream
            Out::Text(t) => Frame::text(Payload::Borrowed(t.as_bytes())),
            Out::Control(OpCode::Close, payload) => Frame::close_raw(Payload::Borrowed(payload)),
            Out::Control(OpCode::Pong, payload) => Frame::pong(Payload::Borrowed(payload)),
            Out::Control(OpCode::Ping, _) => Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[])),
            Out::Control(..) => continue,
            Out::Close(code, reason) => Frame::close(*code, reason.as_bytes()),
        };
        let is_close = frame.opcode == OpCode::Close;
        let written = tokio::time::timeout(
            if is_close { CLOSE_WRITE_TIMEOUT } else { cfg.idle_timeout },
            wr.write_frame(frame),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) || is_close {
            return;
        }
    }
}

/// Applies one message's items; returns the frames to send back, or `Err`
/// when it holds more items than a batch may.
async fn handle_message(shared: &Shared, payload: &[u8], acks: bool) -> Result<Vec<String>, ()> {
    let items = match batch::split(payload) {
        Ok(items) => items,
        Err(e) if e.code == "too_many_items" => return Err(()),
        Err(e) => {
            shared.api_errors.count(e.code);
            let err = serde_json::json!({"type": "error", "code": e.code, "message": e.message, "index": 0});
            return Ok(vec![err.to_string()]);
        }
    };
    let results = publish::publish_items(shared, &items, acks, publish::Admission::Wait).await;
    if acks {
        let mut ack = String::with_capacity(32 + 32 * results.len());
        ack.push_str("{\"type\":\"ack\",\"results\":");
        publish::write_results(&mut ack, &results);
        ack.push('}');
        return Ok(vec![ack]);
    }
    Ok(results
        .iter()
        .enumerate()
        .filter_map(|(index, r)| {
            let e = r.as_ref().err()?;
            let err = serde_json::json!({
                "type": "error", "code": e.code(), "message": e.to_string(), "index": index
            });
            Some(err.to_string())
        })
        .collect())
}
