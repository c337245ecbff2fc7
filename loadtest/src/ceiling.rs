//! `switchyard-load ceiling`: the kernel's delivery ceiling on this machine,
//! with no broker logic, for quoting broker throughput as a ratio.
//!
//! A stand-in server (one thread, one current-thread runtime, like one shard)
//! accepts `conns` WebSocket clients, then writes a pre-encoded event frame
//! to them round-robin as fast as it can, `batch` frames per `writev`.
//! The clients read and count whole frames (header parsing only).

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Result of one ceiling run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ceiling {
    pub conns: usize,
    pub batch: usize,
    pub payload: usize,
    pub frames: u64,
    pub seconds: f64,
    pub frames_per_s: f64,
}

/// A text frame carrying a realistic event of `payload` data bytes.
fn frame(payload: usize) -> Vec<u8> {
    let body = format!(
        "{{\"type\":\"event\",\"seq\":1,\"event\":\"load\",\"data\":{{\"p\":\"{}\"}},\"priority\":\"normal\",\"ts\":1}}",
        "x".repeat(payload)
    );
    switchyard::wsframe::text_frame(body.as_bytes()).to_vec()
}

/// Runs the ceiling measurement.
pub fn run(conns: usize, batch: usize, payload: usize, duration: Duration) -> anyhow::Result<Ceiling> {
    let batch = batch.clamp(1, 1024);
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server =
        std::thread::Builder::new().name("ceiling-server".into()).spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(serve(std_listener, conns, batch, payload, server_stop))
        })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let counted = Arc::new(AtomicU64::new(0));
    let result = rt.block_on(async {
        let mut readers = Vec::with_capacity(conns);
        for _ in 0..conns {
            let mut s = TcpStream::connect(addr).await.context("connect to the ceiling server")?;
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
            readers.push(s);
        }
        let start = Instant::now();
        let tasks: Vec<_> = readers.into_iter().map(|s| tokio::spawn(count_frames(s, counted.clone()))).collect();
        tokio::time::sleep(duration).await;
        let frames = counted.load(Ordering::Relaxed);
        let seconds = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
        }
        Ok::<_, anyhow::Error>(Ceiling { conns, batch, payload, frames, seconds, frames_per_s: frames as f64 / seconds })
    });
    stop.store(true, Ordering::Relaxed);
    server.join().map_err(|_| anyhow!("ceiling server panicked"))??;
    result
}

async fn serve(
    l: std::net::TcpListener,
    conns: usize,
    batch: usize,
    payload: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let l = TcpListener::from_std(l)?;
    let mut socks = Vec::with_capacity(conns);
    while socks.len() < conns {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        let mut buf = vec![0u8; 1024];
        let mut n = 0;
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            let r = s.read(&mut buf[n..]).await?;
            if r == 0 {
                return Err(anyhow!("client left during handshake"));
            }
            n += r;
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n").await?;
        socks.push(s);
    }
    let f = frame(payload);
    let slices: Vec<IoSlice<'_>> = (0..batch).map(|_| IoSlice::new(&f)).collect();
    let total = f.len() * batch;
    while !stop.load(Ordering::Relaxed) {
        for s in socks.iter_mut() {
            // Whole batches only, so frames never tear: wait for room, then write all of it.
            let mut written = 0;
            while written < total {
                if written == 0 {
                    s.writable().await?;
                    match s.try_write_vectored(&slices) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    // Finish a partial batch byte-exactly.
                    let (mut frame_idx, mut off) = (written / f.len(), written % f.len());
                    while frame_idx < batch {
                        let n = s.write(&f[off..]).await?;
                        off += n;
                        written += n;
                        if off == f.len() {
                            frame_idx += 1;
                            off = 0;
                        }
                    }
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    Ok(())
}

/// Reads a stream of server frames, counting complete ones.
async fn count_frames(mut s: TcpStream, counted: Arc<AtomicU64>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut end = 0usize;
    // Skip the 101 response head.
    let mut start = loop {
        let n = s.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
        if let Some(p) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    loop {
        let mut frames = 0;
        loop {
            let avail = &buf[start..end];
            if avail.len() < 2 {
                break;
            }
            let (hdr, len) = match avail[1] & 0x7f {
                126 if avail.len() >= 4 => (4, u16::from_be_bytes([avail[2], avail[3]]) as usize),
                127 if avail.len() >= 10 => (10, u64::from_be_bytes(avail[2..10].try_into()?) as usize),
                126 | 127 => break,
                n => (2, n as usize),
            };
            if avail.len() < hdr + len {
                break;
            }
            start += hdr + len;
            frames += 1;
        }
        counted.fetch_add(frames, Ordering::Relaxed);
        if start == end {
            start = 0;
            end = 0;
        } else if start > buf.len() / 2 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let n = s.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}
