//! The publishing side: the open-loop schedule, publisher streams (acks
//! read by a task of their own, retries with ids), broadcasters, and
//! nats-server publishers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::args::{Plan, PRIORITIES};
use crate::priority;
use crate::shared::{broadcast_source, ws_config, Run, Ws, EVERYONE};

/// One event handed to a publisher: what its publish object says, not
/// the object itself. The publisher writes the object straight into the
/// buffer that sends it (a stream frame, a NATS write, an HTTP body), so an
/// event costs no allocation of its own and is written once, not formatted
/// and then copied into the frame (at 100 users, max rate, that copy, the
/// frame's growth and the per-event string were a quarter of the
/// generator's CPU).
pub(crate) struct Outgoing {
    pub(crate) user: usize,
    /// When it was due, on the run's clock (the `t` in its data).
    pub(crate) intended_us: u64,
    nonce: u64,
    /// A broadcast object (no `user`).
    broadcast: bool,
    event: Label,
    priority: Label,
    /// Padding bytes in its data.
    pad: usize,
    /// It carries an idempotency `id` (`--retry-timeout`).
    with_id: bool,
}

/// An event's name or priority: a constant, or a trace's (shared by every
/// event of that trace line).
#[derive(Clone)]
enum Label {
    Fixed(&'static str),
    Shared(Arc<str>),
}

impl Label {
    fn as_str(&self) -> &str {
        match self {
            Label::Fixed(s) => s,
            Label::Shared(s) => s,
        }
    }
}

impl Outgoing {
    /// Appends its publish object to `s`, formatted directly, with no
    /// formatting machinery (names and events are plain ASCII with nothing
    /// to escape): JSON building is the load generator's hottest path at
    /// high rates. `names`: every user's name, by index.
    pub(crate) fn write_line(&self, names: &[String], s: &mut String) {
        let name = if self.broadcast { EVERYONE } else { names[self.user].as_str() };
        let mut n = itoa::Buffer::new();
        s.reserve(self.approx_len());
        s.push('{');
        if self.with_id {
            s.push_str("\"id\":\"e");
            s.push_str(n.format(self.nonce));
            s.push_str("\",");
        }
        if !self.broadcast {
            s.push_str("\"user\":\"");
            s.push_str(name);
            s.push_str("\",");
        }
        s.push_str("\"event\":\"");
        s.push_str(self.event.as_str());
        s.push_str("\",\"priority\":\"");
        s.push_str(self.priority.as_str());
        s.push_str("\",\"data\":{\"u\":\"");
        s.push_str(name);
        s.push_str("\",\"n\":");
        s.push_str(n.format(self.nonce));
        s.push_str(",\"t\":");
        s.push_str(n.format(self.intended_us));
        s.push_str(",\"p\":\"");
        // The padding in slices, not a char at a time (that was 7% of the
        // generator's CPU at 100 users, max rate).
        const XS: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
        let mut left = self.pad;
        while left > 0 {
            let n = left.min(XS.len());
            s.push_str(&XS[..n]);
            left -= n;
        }
        s.push_str("\"}}");
    }

    /// Its publish object's length in bytes, about (for sizing buffers).
    fn approx_len(&self) -> usize {
        LINE_OVERHEAD + self.pad
    }
}

/// Bytes of a publish object besides its padding, generously.
const LINE_OVERHEAD: usize = 192;

/// The open-loop schedule as a sequence of (due time, publisher slot,
/// event); at `--rate max` each event is due when it is made.
struct Feed<'a> {
    run: &'a Run,
    plan: &'a Plan,
    t0: Instant,
    /// Intended times are relative to `t0`; receivers measure against `run.start`.
    base_us: u64,
    nonce: u64,
    rng: fastrand::Rng,
    publishers: usize,
    /// The priority mix's total weight (a rate plan's).
    total_weight: u32,
    /// Publish objects carry an idempotency `id` (`--retry-timeout`).
    with_id: bool,
    /// At `--rate max`: the clock as last read, and events left to stamp
    /// with it ([`CLOCK_EVERY`]).
    clock: (Duration, u32),
    /// A trace's event names and priorities, by trace line.
    labels: Vec<(Label, Label)>,
}

/// At `--rate max` events are due when they are made, and the clock is
/// read once per this many of them: one read per event was 4% of the
/// generator's CPU against nats-server at 100 users, and 16 events take
/// well under a microsecond to make.
const CLOCK_EVERY: u32 = 16;

impl<'a> Feed<'a> {
    fn new(run: &'a Run, plan: &'a Plan, publishers: usize, t0: Instant) -> Self {
        let base_us = t0.duration_since(run.start).as_micros() as u64;
        let total_weight = match plan {
            Plan::Rate { mix, .. } => mix.iter().sum(),
            Plan::Trace { .. } => 0,
        };
        let with_id = run.common.retry_timeout.is_some();
        let rng = fastrand::Rng::with_seed(7);
        let clock = (Duration::ZERO, 0);
        let labels = match plan {
            Plan::Trace { events, .. } => events
                .iter()
                .map(|e| (Label::Shared(e.event.as_str().into()), Label::Shared(e.priority.as_str().into())))
                .collect(),
            Plan::Rate { .. } => Vec::new(),
        };
        Feed { run, plan, t0, base_us, nonce: 0, rng, publishers, total_weight, with_id, clock, labels }
    }
}

impl Iterator for Feed<'_> {
    type Item = (Instant, usize, Outgoing);

    fn next(&mut self) -> Option<Self::Item> {
        let with_id = self.with_id;
        let nonce = self.nonce;
        let item = match self.plan {
            Plan::Rate { per_sec, duration, payload, mix, broadcast } => {
                let intended = match per_sec {
                    Some(r) => Duration::from_secs_f64(nonce as f64 / r),
                    None => {
                        if self.clock.1 == 0 {
                            self.clock = (self.t0.elapsed(), CLOCK_EVERY);
                        }
                        self.clock.1 -= 1;
                        self.clock.0
                    }
                };
                if intended >= *duration + self.run.common.warmup {
                    return None;
                }
                let user = self.rng.usize(..self.run.common.users);
                let mut pick = self.rng.u32(..self.total_weight);
                let mut prio = 0;
                while pick >= mix[prio] {
                    pick -= mix[prio];
                    prio += 1;
                }
                let intended_us = self.base_us + intended.as_micros() as u64;
                // A user's events all go through one publisher (so they stay in
                // order); broadcasts rotate, and the checker orders each source.
                let slot = if *broadcast {
                    broadcast_source(nonce, self.publishers)
                } else {
                    user % self.publishers
                };
                let o = Outgoing {
                    user,
                    intended_us,
                    nonce,
                    broadcast: *broadcast,
                    event: Label::Fixed("load"),
                    priority: Label::Fixed(PRIORITIES[prio]),
                    pad: *payload,
                    with_id,
                };
                (self.t0 + intended, slot, o)
            }
            Plan::Trace { events, planned } => {
                let p = planned.get(nonce as usize)?;
                let (event, priority) = self.labels[p.event].clone();
                let o = Outgoing {
                    user: p.user,
                    intended_us: self.base_us + p.at.as_micros() as u64,
                    nonce,
                    broadcast: false,
                    event,
                    priority,
                    pad: events[p.event].bytes,
                    with_id,
                };
                (self.t0 + p.at, p.user % self.publishers, o)
            }
        };
        self.nonce += 1;
        Some(item)
    }
}

/// Feeds publishers on the open-loop schedule; returns events scheduled.
/// At `--rate max`, on the runtime (as fast as the publishers take them).
/// At a fixed rate or a trace's times, on a thread of its own that sleeps
/// until each event is due: tokio's timers tick in milliseconds, so paced
/// from the runtime, events would leave in bursts up to a millisecond late
/// and that lateness would count as latency. With `--spin-pacing` the
/// thread spins the last stretch instead of sleeping.
pub(crate) async fn schedule(
    run: &Arc<Run>,
    plan: Plan,
    pubs: Vec<flume::Sender<Outgoing>>,
    t0: Instant,
) -> (u64, Plan) {
    if matches!(plan, Plan::Rate { per_sec: None, .. }) {
        let mut sent = 0;
        for (_, slot, o) in Feed::new(run, &plan, pubs.len(), t0) {
            if pubs[slot].send_async(o).await.is_err() {
                break;
            }
            sent += 1;
        }
        return (sent, plan);
    }
    let run = run.clone();
    let paced = tokio::task::spawn_blocking(move || {
        precise_sleeps();
        let spin = run.common.spin_pacing;
        // A spinning thread must not be real-time: it would starve the core.
        let mut realtime = !spin && priority::enter(priority::Role::Pacer);
        let mut sent = 0;
        let mut woke = Instant::now();
        for (due, slot, o) in Feed::new(&run, &plan, pubs.len(), t0) {
            let now = Instant::now();
            if due > now {
                sleep_until(due.max(woke + PACE_QUANTUM), spin);
                woke = Instant::now();
            } else if realtime && now - due > BEHIND {
                // Never sleeping, a real-time pacer would starve the clients,
                // and real-time publishers would take its events one by one.
                realtime = false;
                priority::leave_all();
                eprintln!("note: pacing fell {BEHIND:?} behind: the generator is the bottleneck of this run; pacing at normal priority from here");
            }
            if pubs[slot].send(o).is_err() {
                break;
            }
            sent += 1;
        }
        if realtime {
            priority::leave_self(); // a blocking-pool thread: it may be reused
        }
        (sent, plan)
    });
    match paced.await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The pacing thread wakes at most this often: events due closer together
/// leave together, up to this late (and the lateness counts as latency),
/// so a publisher sends a few per frame instead of one frame per event.
const PACE_QUANTUM: Duration = Duration::from_micros(100);

/// Asks the kernel to wake this thread's sleeps within a microsecond of
/// their deadline (the default timer slack is 50 µs).
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and touches only
    // the calling thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000, 0, 0, 0);
    }
}

/// How far behind its schedule the pacer may fall before the sending side
/// gives up its real-time priority.
const BEHIND: Duration = Duration::from_millis(5);

/// Blocks the calling thread until `at`: sleeping, or with `spin` sleeping
/// until 50 µs before it and spinning the rest.
fn sleep_until(at: Instant, spin: bool) {
    const SPIN: Duration = Duration::from_micros(50);
    let now = Instant::now();
    if at <= now {
        return;
    }
    if !spin {
        std::thread::sleep(at - now);
        return;
    }
    if let Some(nap) = (at - now).checked_sub(SPIN) {
        std::thread::sleep(nap);
    }
    while Instant::now() < at {
        std::hint::spin_loop();
    }
}

/// A frame sent on a publisher stream and not yet acked.
pub(crate) struct Unacked {
    pub(crate) frame: String,
    pub(crate) users: Vec<usize>,
    pub(crate) sent_at: Instant,
}

/// How long a publisher keeps trying to open a new stream after a failure.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// How long a publisher giving up on a stream waits for the broker to
/// answer what it already read from it ([`fence`]).
const FENCE_FOR: Duration = Duration::from_secs(3);

/// Counts an ack: its frame leaves `pending`, its applied items are sent.
fn take_ack(
    run: &Run,
    pending: &mut std::collections::VecDeque<Unacked>,
    applied: Vec<bool>,
) -> anyhow::Result<()> {
    let acked = pending.pop_front().ok_or_else(|| anyhow!("an ack for no frame"))?;
    for (u, ok) in acked.users.iter().zip(applied) {
        if ok {
            run.sent[*u].fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Before a retry: closes the stream being given up and takes its acks
/// until the broker's close echo, which it sends only after answering
/// everything read before the close (or until [`FENCE_FOR`]). Without this
/// fence, a frame the broker had read but not yet applied could be applied
/// after the frames resent on the new stream: when the resent copy was
/// refused (overloaded), the late original arrived out of order (cluster
/// mode, 2 ms retry timeout, a loaded machine: 31 events reordered).
/// Frames answered here are not resent; past the bound, the rest are.
async fn fence(
    run: &Run,
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    acks: &mut tokio::sync::mpsc::UnboundedReceiver<Result<Vec<bool>, ReplyError>>,
    pending: &mut std::collections::VecDeque<Unacked>,
) -> anyhow::Result<()> {
    let drained = tokio::time::timeout(FENCE_FOR, async {
        let _ = sink.close().await;
        loop {
            match acks.recv().await {
                Some(Ok(applied)) => take_ack(run, pending, applied)?,
                Some(Err(ReplyError::Unexpected(e))) => return Err(e),
                Some(Err(ReplyError::Stream(_))) | None => return anyhow::Ok(()),
            }
        }
    })
    .await;
    drained.unwrap_or(Ok(()))
}

/// One publisher stream: batches queued events into NDJSON frames and counts
/// acks. With `--retry-timeout`, a frame not acked in time (or a failed
/// stream) makes it give the stream up ([`fence`]), open a new one and send
/// every frame still unanswered again, in order; the events' ids make the
/// broker apply each once.
pub(crate) async fn publisher_task(
    run: Arc<Run>,
    api: String,
    first: Ws,
    rx: flume::Receiver<Outgoing>,
) -> anyhow::Result<()> {
    let retry = run.common.retry_timeout;
    let mut lag = SendLag::new(&run);
    let mut pending: std::collections::VecDeque<Unacked> = std::collections::VecDeque::new();
    let mut next_ws = Some(first);
    let mut input_done = false;
    loop {
        let ws = match next_ws.take() {
            Some(ws) => ws,
            None => reconnect_stream(&api, run.common.api_key.as_deref(), !run.common.no_acks).await?,
        };
        let (mut sink, stream) = ws.split();
        // Replies are read by a task of their own, so they keep being read
        // while a send waits for socket room: a publisher that stopped
        // reading acks whenever it blocked on a send would stall the broker's
        // reply writer and, with it, its own stream (both sides' buffers full).
        let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(read_replies(stream, acks_tx));
        let _stop_reader = tokio_util::task::AbortOnDropHandle::new(reader);
        let failure = 'stream: {
            for u in pending.iter_mut() {
                if let Err(e) = sink.send(Message::text(u.frame.clone())).await {
                    break 'stream anyhow!("publisher resend: {e}");
                }
                u.sent_at = Instant::now();
            }
            loop {
                if input_done && pending.is_empty() {
                    let _ = sink.close().await;
                    return Ok(());
                }
                let ack_due = pending.front().zip(retry).map(|(u, r)| u.sent_at + r);
                tokio::select! {
                    o = rx.recv_async(), if !input_done => match o {
                        Ok(first) => {
                            let (frame, users, due) = next_frame(&run, first, &rx);
                            if run.common.no_acks {
                                // Fire-and-forget: written is sent (the broker
                                // reports a refused item with an error frame).
                                if let Err(e) = sink.send(Message::text(frame)).await {
                                    return Err(anyhow!("publisher send: {e}"));
                                }
                                lag.written(due.iter().copied());
                                for u in &users {
                                    run.sent[*u].fetch_add(1, Ordering::Relaxed);
                                }
                                continue;
                            }
                            // Only a stream that may be retried keeps its
                            // frames to send again (a copy per frame).
                            let kept = if retry.is_some() { frame.clone() } else { String::new() };
                            if let Err(e) = sink.send(Message::text(frame)).await {
                                pending.push_back(Unacked { frame: kept, users, sent_at: Instant::now() });
                                break 'stream anyhow!("publisher send: {e}");
                            }
                            lag.written(due.iter().copied());
                            pending.push_back(Unacked { frame: kept, users, sent_at: Instant::now() });
                        }
                        Err(_) => input_done = true,
                    },
                    m = acks.recv() => match m {
                        Some(Ok(applied)) => take_ack(&run, &mut pending, applied)?,
                        Some(Err(ReplyError::Unexpected(e))) => return Err(e),
                        Some(Err(ReplyError::Stream(e))) => break 'stream e,
                        None => break 'stream anyhow!("publisher stream closed"),
                    },
                    _ = tokio::time::sleep_until(ack_due.unwrap_or_else(Instant::now).into()), if ack_due.is_some() => {
                        break 'stream anyhow!("no ack within --retry-timeout");
                    }
                }
            }
        };
        if retry.is_none() {
            return Err(failure);
        }
        fence(&run, &mut sink, &mut acks, &mut pending).await?;
        run.retries.fetch_add(1, Ordering::Relaxed);
        eprintln!("publisher: {failure}; resending {} frames on a new stream", pending.len());
    }
}

/// A publisher stream's ack: which items were applied (those with a seq).
#[derive(serde::Deserialize)]
struct AckFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    results: Vec<AckItem>,
}

#[derive(serde::Deserialize)]
struct AckItem {
    seq: Option<u64>,
}

/// Why a publisher stream's replies stopped.
pub(crate) enum ReplyError {
    /// A reply the generator does not understand: the run fails.
    Unexpected(anyhow::Error),
    /// The stream failed or closed: reconnect (with `--retry-timeout`).
    Stream(anyhow::Error),
}

/// Reads a publisher stream's acks: for each, which items were applied.
pub(crate) async fn read_replies(
    mut stream: futures_util::stream::SplitStream<Ws>,
    out: tokio::sync::mpsc::UnboundedSender<Result<Vec<bool>, ReplyError>>,
) {
    let end = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                // Typed and borrowed (a `Value` tree per ack cost the
                // generator several % of its CPU at max rate).
                let applied = serde_json::from_str::<AckFrame>(&t)
                    .ok()
                    .filter(|a| a.ty == "ack")
                    .map(|a| a.results.iter().map(|r| r.seq.is_some()).collect())
                    .ok_or_else(|| ReplyError::Unexpected(anyhow!("unexpected reply {t}")));
                let failed = applied.is_err();
                if out.send(applied).is_err() || failed {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break anyhow!("publisher stream failed: {e}"),
            None => break anyhow!("publisher stream closed"),
        }
    };
    let _ = out.send(Err(ReplyError::Stream(end)));
}

/// One nats-server publisher: writes each batch of queued events (up to
/// 1,000) as `PUB`s in one write, fire-and-forget; at the end, a PING/PONG
/// makes sure the server has read everything. Payloads are event frames
/// with a per-user seq (see `switchyard_load::nats`).
pub(crate) async fn nats_publisher_task(
    run: Arc<Run>,
    mut publisher: switchyard_load::nats::NatsPublisher,
    rx: flume::Receiver<Outgoing>,
) -> anyhow::Result<()> {
    let mut seqs: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
    let mut lag = SendLag::new(&run);
    let mut line = String::new();
    while let Ok(first) = rx.recv_async().await {
        let mut batch = vec![first];
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        for o in &batch {
            let seq = seqs.entry(o.user).or_insert(0);
            *seq += 1;
            // The publish object's fields plus type and seq: an event frame.
            line.clear();
            o.write_line(&run.names, &mut line);
            publisher.queue_event(&run.names[o.user], *seq, &line);
        }
        publisher.flush().await?;
        lag.written(batch.iter().map(|o| o.intended_us));
        for o in &batch {
            run.sent[o.user].fetch_add(1, Ordering::Relaxed);
        }
    }
    publisher.sync().await
}

/// Takes `first` and whatever else is queued (up to 1,000 events) as one
/// NDJSON frame, each object written straight into it (sized once for
/// what was queued); with its events' users and due times.
pub(crate) fn next_frame(
    run: &Run,
    first: Outgoing,
    rx: &flume::Receiver<Outgoing>,
) -> (String, Vec<usize>, Vec<u64>) {
    let queued = rx.len().min(999);
    let mut users = Vec::with_capacity(queued + 1);
    let mut due = Vec::with_capacity(queued + 1);
    let mut frame = String::with_capacity((queued + 1) * (first.approx_len() + 1));
    let mut next = Some(first);
    while let Some(o) = next.take() {
        if !users.is_empty() {
            frame.push('\n');
        }
        o.write_line(&run.names, &mut frame);
        users.push(o.user);
        due.push(o.intended_us);
        if users.len() < 1000 {
            next = rx.try_recv().ok();
        }
    }
    (frame, users, due)
}

/// Samples how late events leave the generator: from their due time to
/// their frame's write into the broker's socket (measured window only).
/// Beside the end-to-end latency, this is the generator's own share. Kept
/// per publisher and merged into the run's once, when the publisher ends.
pub(crate) struct SendLag<'a> {
    run: &'a Run,
    hist: Histogram<u64>,
}

impl<'a> SendLag<'a> {
    pub(crate) fn new(run: &'a Run) -> Self {
        SendLag { run, hist: crate::shared::latency_histogram() }
    }

    /// Records the events of a frame just written.
    pub(crate) fn written(&mut self, due: impl IntoIterator<Item = u64>) {
        let now = self.run.start.elapsed().as_micros() as u64;
        let from = self.run.measure_from_us.load(Ordering::Relaxed);
        for t in due.into_iter().filter(|&t| t >= from) {
            crate::shared::record_latency(&mut self.hist, now.saturating_sub(t));
        }
    }
}

impl Drop for SendLag<'_> {
    fn drop(&mut self) {
        let mut all = self.run.send_lag.lock().unwrap_or_else(|e| e.into_inner());
        let _ = all.add(&self.hist);
    }
}

/// Opens a new publisher stream, retrying for up to [`RECONNECT_FOR`].
pub(crate) async fn reconnect_stream(api: &str, key: Option<&str>, acks: bool) -> anyhow::Result<Ws> {
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), connect_stream(api, key, acks)).await {
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) if Instant::now() >= deadline => return Err(e.context("reopening a publisher stream")),
            Err(_) if Instant::now() >= deadline => bail!("reopening a publisher stream timed out"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Broadcasts one at a time over a keep-alive HTTP/1.1 connection, so the
/// broker applies this broadcaster's events in schedule order; counts the
/// accepted ones.
pub(crate) async fn broadcaster_task(
    run: Arc<Run>,
    api: String,
    rx: flume::Receiver<Outgoing>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let host = api.trim_start_matches("http://").to_string();
    let stream = TcpStream::connect(&host).await.with_context(|| format!("connecting to {host}"))?;
    let _ = stream.set_nodelay(true);
    let mut conn = BufReader::new(stream);
    let auth =
        run.common.api_key.as_deref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let mut line = String::new();
    let mut body = String::new();
    while let Ok(o) = rx.recv_async().await {
        body.clear();
        o.write_line(&run.names, &mut body);
        let head = format!(
            "POST /v1/broadcast HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.get_mut().write_all(head.as_bytes()).await?;
        conn.get_mut().write_all(body.as_bytes()).await?;
        // Status line, headers (Content-Length), body.
        line.clear();
        conn.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut body_len = 0usize;
        loop {
            line.clear();
            if conn.read_line(&mut line).await? == 0 {
                bail!("broadcast connection closed");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    body_len = v.trim().parse().context("bad Content-Length")?;
                }
            }
        }
        let mut body = vec![0u8; body_len];
        conn.read_exact(&mut body).await?;
        if status == 200 {
            run.broadcasts.fetch_add(1, Ordering::Relaxed);
        } else if status != 503 {
            bail!("broadcast answered {status}: {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(())
}

pub(crate) async fn connect_stream(api: &str, key: Option<&str>, acks: bool) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let query = if acks { "?acks=1" } else { "" };
    let url = format!("{}/v1/stream{query}", api.replacen("http", "ws", 1));
    let mut req = url.into_client_request()?;
    if let Some(k) = key {
        req.headers_mut().insert("authorization", format!("Bearer {k}").parse()?);
    }
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true).await?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::{Label, Outgoing};

    fn outgoing(user: usize, broadcast: bool, with_id: bool) -> Outgoing {
        Outgoing {
            user,
            intended_us: 1_234,
            nonce: 42,
            broadcast,
            event: Label::Fixed("load"),
            priority: Label::Shared("high".into()),
            pad: 70,
            with_id,
        }
    }

    /// Each object is appended, whole and valid, after what the buffer
    /// already holds (a frame's earlier lines).
    #[test]
    fn objects_are_written_whole_after_what_the_buffer_holds() {
        let names = vec!["u0".to_string(), "u1".to_string()];
        let mut s = String::from("before\n");
        outgoing(1, false, true).write_line(&names, &mut s);
        let (before, line) = s.split_once('\n').expect("two parts");
        assert_eq!(before, "before");
        let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
        assert_eq!(v["user"], "u1");
        assert_eq!(v["id"], "e42");
        assert_eq!(v["event"], "load");
        assert_eq!(v["priority"], "high");
        assert_eq!(v["data"]["u"], "u1");
        assert_eq!(v["data"]["n"], 42);
        assert_eq!(v["data"]["t"], 1_234);
        assert_eq!(v["data"]["p"].as_str().map(str::len), Some(70));

        let mut b = String::new();
        outgoing(0, true, false).write_line(&names, &mut b);
        let v: serde_json::Value = serde_json::from_str(&b).expect("valid JSON");
        assert!(v.get("user").is_none() && v.get("id").is_none(), "{b}");
        assert_eq!(v["data"]["u"], "*");
    }
}
