//! `switchyard-load`: opens client connections and publisher streams against
//! a running broker, publishes on an open-loop schedule, and checks every
//! event (delivered to every connection of its user, to no one else, once,
//! in order). Latency is measured from each event's *intended* send time, so
//! a stalled broker cannot hide its stall (coordinated omission, as wrk2).

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use switchyard::config::parse_duration;
use switchyard_load::check::{ConnCheck, Totals, MAX_SOURCES};
use switchyard_load::sse::SseConn;
use switchyard_load::trace::{self, Planned, TraceEvent};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Parser)]
#[command(name = "switchyard-load", version, about = "Load generator and delivery checker for switchyard")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish at a fixed rate to random users and check every delivery.
    Run(RunArgs),
    /// Replay a recorded trace across many users and check every delivery.
    Replay(ReplayArgs),
    /// Measure the kernel's delivery ceiling: a stand-in server with no broker
    /// logic writes pre-encoded frames to N clients, `--batch` per writev.
    Ceiling(CeilingArgs),
}

#[derive(Args)]
struct CeilingArgs {
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Frames per write call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct Common {
    /// The broker's client listener; for a cluster, a comma-separated list
    /// of nodes: client i connects to node i mod N, and a client that
    /// reconnects (churn, or dropped) goes to the next node.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    target: String,
    /// The broker's API listener; for a cluster, a comma-separated list:
    /// publisher p uses node p mod N (figures are read from the first).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    api: String,
    /// Mint HS256 client tokens with this secret (else dev mode, ?user=).
    #[arg(long)]
    jwt_secret: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    #[arg(long, default_value_t = 100)]
    users: usize,
    #[arg(long, default_value_t = 1)]
    conns_per_user: usize,
    /// Publisher streams (/v1/stream).
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Reconnects per second across all connections; each resumes with since.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Fraction of connections that read slowly (their shed events do not fail the run).
    #[arg(long, default_value_t = 0.0)]
    slow_readers: f64,
    /// Spread client sockets over this many loopback source addresses (127.0.0.1..N).
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// How long to wait for the last deliveries after publishing ends.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Write the latency distribution (.hgrm).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write a JSON summary.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Client runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Publishers give every event an idempotency `id`; a frame not acked
    /// within this time (or a stream that fails) is sent again, with every
    /// frame after it, on a new stream. The checks then prove the broker
    /// applied each event exactly once.
    #[arg(long, value_parser = parse_duration)]
    retry_timeout: Option<Duration>,
    /// Pace sub-millisecond gaps by spinning the last stretch before each
    /// event's time (else events due within a millisecond go out together).
    /// Spinning costs the generator a core: use it when a core is spare.
    #[arg(long)]
    spin_pacing: bool,
    /// Publish this long before the measured window: latency (client and
    /// broker histograms) and CPU figures cover only what follows it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// The broker's PID on this machine: its CPU use over the measured
    /// window is reported (cores), beside the generator's own.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Write the broker's own latency histogram (GET /debug/histograms,
    /// reset when the measured window starts) to this file.
    #[arg(long)]
    broker_hgrm: Option<PathBuf>,
    /// How clients connect: WebSocket (`/ws`), Server-Sent Events (`/sse`,
    /// resuming through `Last-Event-ID`), or a mix (every other connection).
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// What is under load: switchyard, or nats-server measured the same way
    /// (`--target ws://` its WebSocket listener, `--api nats://HOST:PORT` its
    /// client port; fire-and-forget publishers; no churn).
    #[arg(long, value_enum, default_value = "switchyard")]
    peer: Peer,
    /// switchyard: publisher streams without acks (fire-and-forget, as NATS
    /// publishers are); events count as sent once written.
    #[arg(long)]
    no_acks: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Peer {
    Switchyard,
    Nats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Ws,
    Sse,
    Mix,
}

impl Transport {
    /// Whether connection `index` uses SSE.
    fn sse_for(self, index: usize) -> bool {
        match self {
            Transport::Ws => false,
            Transport::Sse => true,
            Transport::Mix => index % 2 == 1,
        }
    }
}

/// A client connection over either transport.
enum Conn {
    Ws(Box<Ws>),
    Sse(SseConn),
    Nats(Box<switchyard_load::nats::NatsConn>),
}

impl Conn {
    /// The next text message (a WebSocket text frame, an SSE message's data);
    /// `None` when the connection ended.
    async fn next_text(&mut self) -> Option<String> {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Some(t.to_string()),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            },
            Conn::Sse(s) => s.next().await.map(|m| m.data),
            Conn::Nats(n) => n.next().await,
        }
    }

    async fn close(&mut self) {
        match self {
            Conn::Ws(ws) => {
                let _ = SinkExt::close(ws).await;
            }
            Conn::Sse(s) => s.close().await,
            Conn::Nats(n) => n.close().await,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Events per second, or `max`.
    #[arg(long, default_value = "1000")]
    rate: String,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Share of high:normal:low events, e.g. 1:8:1.
    #[arg(long, default_value = "0:1:0")]
    priority_mix: String,
    /// Broadcast every event (POST /v1/broadcast) instead of publishing it to
    /// one random user. `--publishers` broadcasters (at most 8) take turns;
    /// each sends one request at a time, so its own broadcasts stay ordered.
    #[arg(long, conflicts_with = "churn")]
    broadcast: bool,
}

#[derive(Args)]
struct ReplayArgs {
    #[command(flatten)]
    common: Common,
    /// The trace to replay (see loadtest/traces/README.md).
    trace: PathBuf,
    /// Time scaling: 2 replays twice as fast.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Users start at random offsets within this window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    stagger: Duration,
}

/// What to publish, in time order.
enum Plan {
    Rate { per_sec: Option<f64>, duration: Duration, payload: usize, mix: [u32; 3], broadcast: bool },
    Trace { events: Vec<TraceEvent>, planned: Vec<Planned> },
}

const PRIORITIES: [&str; 3] = ["high", "normal", "low"];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (common, plan) = match cli.cmd {
        Cmd::Ceiling(a) => {
            raise_fd_limit();
            let c = switchyard_load::ceiling::run(a.conns, a.batch, a.payload, a.duration)?;
            println!(
                "ceiling: conns={} batch={} payload={}B frames={} in {:.2}s = {:.0} frames/s",
                c.conns, c.batch, c.payload, c.frames, c.seconds, c.frames_per_s
            );
            if let Some(path) = a.json {
                std::fs::write(&path, serde_json::to_string_pretty(&c)?)?;
            }
            return Ok(());
        }
        Cmd::Run(a) => {
            let per_sec = if a.rate == "max" {
                None
            } else {
                let r: f64 = a.rate.parse().map_err(|_| anyhow!("--rate must be a number or max"))?;
                if r <= 0.0 {
                    bail!("--rate must be positive");
                }
                Some(r)
            };
            let mix = parse_mix(&a.priority_mix)?;
            let plan =
                Plan::Rate { per_sec, duration: a.duration, payload: a.payload, mix, broadcast: a.broadcast };
            (a.common, plan)
        }
        Cmd::Replay(a) => {
            let text = std::fs::read_to_string(&a.trace)
                .with_context(|| format!("reading trace {}", a.trace.display()))?;
            let events = trace::parse(&text)?;
            let planned = trace::schedule(&events, a.common.users, a.speed, a.stagger, 42);
            (a.common, Plan::Trace { events, planned })
        }
    };
    if common.users == 0 || common.conns_per_user == 0 || common.publishers == 0 {
        bail!("--users, --conns-per-user and --publishers must be positive");
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build()?;
    let ok = rt.block_on(run(common, plan))?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

fn parse_mix(raw: &str) -> anyhow::Result<[u32; 3]> {
    let parts: Vec<u32> = raw
        .split(':')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow!("--priority-mix is high:normal:low weights, e.g. 1:8:1"))?;
    match parts[..] {
        [h, n, l] if h + n + l > 0 => Ok([h, n, l]),
        _ => bail!("--priority-mix is high:normal:low weights, e.g. 1:8:1"),
    }
}

/// Plenty of sockets (root may raise the hard limit), else the hard limit.
fn raise_fd_limit() {
    switchyard::fdlimit::raise(1 << 20);
}

/// Shared run state.
struct Run {
    common: Common,
    start: Instant,
    /// Events the broker accepted, per user.
    sent: Vec<AtomicU64>,
    /// Broadcasts the broker accepted (owed to every connection).
    broadcasts: AtomicU64,
    received: AtomicU64,
    stop: AtomicBool,
    /// Fires when the run ends, so idle clients need no polling timer.
    stopped: tokio::sync::watch::Sender<bool>,
    resumes: AtomicU64,
    resume_failed: AtomicU64,
    /// Publisher streams replaced after an ack timeout or a failure.
    retries: AtomicU64,
    latency_tx: flume::Sender<Vec<u64>>,
    /// Microseconds after `start` at which the measured window opens (set
    /// when publishing starts); earlier events are not sampled for latency.
    measure_from_us: AtomicU64,
    /// The client listeners of the nodes (`--target`, split).
    targets: Vec<String>,
}

/// Splits a comma-separated listener list, without trailing slashes.
fn node_list(raw: &str) -> Vec<String> {
    raw.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).collect()
}

fn user_name(i: usize) -> String {
    format!("load-{i}")
}

async fn run(common: Common, plan: Plan) -> anyhow::Result<bool> {
    let targets = node_list(&common.target);
    let apis = node_list(&common.api);
    if targets.is_empty() || apis.is_empty() {
        bail!("--target and --api need at least one address each");
    }
    let api = apis[0].clone();
    if common.peer == Peer::Nats && (common.churn > 0.0 || common.transport != Transport::Ws) {
        bail!("--peer nats has no resume and no SSE: use --churn 0 and --transport ws");
    }
    let (latency_tx, latency_rx) = flume::unbounded::<Vec<u64>>();
    let run = Arc::new(Run {
        sent: (0..common.users).map(|_| AtomicU64::new(0)).collect(),
        broadcasts: AtomicU64::new(0),
        received: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        stopped: tokio::sync::watch::channel(false).0,
        resumes: AtomicU64::new(0),
        resume_failed: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        latency_tx,
        measure_from_us: AtomicU64::new(u64::MAX),
        start: Instant::now(),
        common: common.clone(),
        targets: targets.clone(),
    });
    let collector = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds");
        while let Ok(batch) = latency_rx.recv_async().await {
            for v in batch {
                let _ = h.record(v.clamp(1, 3_600_000_000));
            }
        }
        h
    });

    let shed_before = broker_shed(&apis, common.api_key.as_deref()).await?;

    // Connect every client before publishing.
    let total_conns = common.users * common.conns_per_user;
    let slow_every =
        if common.slow_readers > 0.0 { (1.0 / common.slow_readers).round().max(1.0) as usize } else { 0 };
    let mut conn_tasks = Vec::with_capacity(total_conns);
    let connect_start = Instant::now();
    for i in 0..total_conns {
        let user = i % common.users;
        let slow = slow_every > 0 && i % slow_every == 0;
        // A few tries: on a lossy link a handshake can be lost like anything else.
        let (ws, welcome) = connect_retrying(&targets[i % targets.len()], &common, user, i, None, 5)
            .await
            .with_context(|| format!("connecting client {i}"))?;
        conn_tasks.push(tokio::spawn(client_task(run.clone(), user, i, slow, ws, welcome)));
    }
    eprintln!("connected {total_conns} clients in {:.2}s", connect_start.elapsed().as_secs_f64());

    // Publishers: streams, or one broadcaster.
    let broadcasting = matches!(plan, Plan::Rate { broadcast: true, .. });
    let mut pub_txs = Vec::new();
    let mut pub_tasks = Vec::new();
    for _ in (0..common.publishers.min(MAX_SOURCES)).filter(|_| broadcasting) {
        // Short: one broadcast is a lot of work, and at rate=max whatever
        // waits here is still sent after the schedule ends.
        let (tx, rx) = flume::bounded::<Outgoing>(16);
        pub_tasks.push(tokio::spawn(broadcaster_task(
            run.clone(),
            apis[pub_tasks.len() % apis.len()].clone(),
            rx,
        )));
        pub_txs.push(tx);
    }
    for p in (0..common.publishers).filter(|_| !broadcasting && common.peer == Peer::Nats) {
        let (tx, rx) = flume::bounded::<Outgoing>(8192);
        let addr = apis[p % apis.len()].trim_start_matches("nats://").to_string();
        let publisher = switchyard_load::nats::NatsPublisher::connect(&addr).await?;
        pub_tasks.push(tokio::spawn(nats_publisher_task(run.clone(), publisher, rx)));
        pub_txs.push(tx);
    }
    for p in (0..common.publishers).filter(|_| !broadcasting && common.peer == Peer::Switchyard) {
        let (tx, rx) = flume::bounded::<Outgoing>(8192);
        let api = apis[p % apis.len()].clone();
        let ws = connect_stream(&api, common.api_key.as_deref(), !common.no_acks)
            .await
            .with_context(|| format!("publisher {p}"))?;
        pub_tasks.push(tokio::spawn(publisher_task(run.clone(), api, ws, rx)));
        pub_txs.push(tx);
    }

    let publish_start = Instant::now();
    let measure_start = publish_start + common.warmup;
    run.measure_from_us.store(measure_start.duration_since(run.start).as_micros() as u64, Ordering::Relaxed);
    let progress = tokio::spawn(progress_task(run.clone()));
    // The measured window: CPU of both processes and the broker's own
    // histogram (reset as it opens) are read at its edges.
    let window = tokio::spawn(measure_window(api.clone(), common.clone(), measure_start));
    let scheduled = schedule(&run, &plan, &pub_txs, publish_start).await;
    drop(pub_txs);
    for t in pub_tasks {
        t.await??;
    }
    let publish_elapsed = publish_start.elapsed();
    let opened = window.await??;
    let cpu = opened.close(&common);

    // Wait until every connection has what its user was sent, or the drain ends.
    let owed = |i: usize| {
        run.sent[i % common.users].load(Ordering::Relaxed) + run.broadcasts.load(Ordering::Relaxed)
    };
    let expected: u64 = (0..total_conns).map(owed).sum();
    let drain_deadline = Instant::now() + common.drain;
    while run.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivery_elapsed = publish_start.elapsed();
    let outstanding = expected.saturating_sub(run.received.load(Ordering::Relaxed));
    if outstanding > 0 {
        eprintln!(
            "drain window ({:?}) closed with {outstanding} deliveries outstanding; they count as lost",
            common.drain
        );
    }
    run.stop.store(true, Ordering::Relaxed);
    run.stopped.send_replace(true);
    progress.abort();

    let mut totals = Totals::default();
    for (i, t) in conn_tasks.into_iter().enumerate() {
        let check = t.await?;
        totals.add(&check, owed(i));
    }
    totals.sent = run.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum::<u64>()
        + run.broadcasts.load(Ordering::Relaxed);
    totals.rejected = scheduled.saturating_sub(totals.sent);
    totals.resumes = run.resumes.load(Ordering::Relaxed);
    totals.resume_failed = run.resume_failed.load(Ordering::Relaxed);
    totals.retried = run.retries.load(Ordering::Relaxed);
    let shed_after = broker_shed(&apis, common.api_key.as_deref()).await?;
    totals.settle(shed_after.saturating_sub(shed_before));
    drop(run);
    let hist = collector.await?;
    let broker_latency = broker_histogram(&api, &common).await?;
    report(&common, &totals, &hist, publish_elapsed, delivery_elapsed, &plan)?;
    report_window(&common, &cpu, broker_latency.as_ref())?;
    Ok(totals.ok())
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// The measured window as it opened: when, and both processes' CPU then.
struct Window {
    at: Instant,
    own: Option<f64>,
    broker: Option<f64>,
}

/// CPU used over the window, in cores.
struct WindowCpu {
    seconds: f64,
    generator_cores: Option<f64>,
    broker_cores: Option<f64>,
}

impl Window {
    fn close(self, common: &Common) -> WindowCpu {
        let seconds = self.at.elapsed().as_secs_f64().max(1e-9);
        let per = |before: Option<f64>, now: Option<f64>| Some((now? - before?) / seconds);
        let broker_now = common.broker_pid.and_then(|p| cpu_seconds(&p.to_string()));
        WindowCpu {
            seconds,
            generator_cores: per(self.own, cpu_seconds("self")),
            broker_cores: per(self.broker, broker_now),
        }
    }
}

/// Waits for the window to open (after `--warmup`), resets the broker's
/// histogram then (when asked for it), and samples CPU.
async fn measure_window(api: String, common: Common, at: Instant) -> anyhow::Result<Window> {
    tokio::time::sleep_until(at.into()).await;
    if common.broker_hgrm.is_some() && common.peer == Peer::Switchyard {
        http_get_text(&api, "/debug/histograms?reset=1", common.api_key.as_deref()).await?;
    }
    Ok(Window {
        at: Instant::now(),
        own: cpu_seconds("self"),
        broker: common.broker_pid.and_then(|p| cpu_seconds(&p.to_string())),
    })
}

/// The broker's latency histogram over the window, written to `--broker-hgrm`;
/// returns its percentiles line for the report.
async fn broker_histogram(api: &str, common: &Common) -> anyhow::Result<Option<String>> {
    let Some(path) = common.broker_hgrm.as_ref().filter(|_| common.peer == Peer::Switchyard) else {
        return Ok(None);
    };
    let text = http_get_text(api, "/debug/histograms", common.api_key.as_deref()).await?;
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path.display().to_string()))
}

fn report_window(common: &Common, cpu: &WindowCpu, broker_hgrm: Option<&String>) -> anyhow::Result<()> {
    let fmt = |c: Option<f64>| c.map_or("n/a".to_string(), |c| format!("{c:.2}"));
    println!(
        "  window      {:.1}s measured (after {:?} warm-up); CPU cores: generator {}, broker {}",
        cpu.seconds,
        common.warmup,
        fmt(cpu.generator_cores),
        fmt(cpu.broker_cores)
    );
    if let Some(path) = broker_hgrm {
        println!("  broker      latency histogram over the window: {path}");
    }
    if let Some(path) = &common.json {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        v["window_s"] = json!(cpu.seconds);
        v["generator_cpu_cores"] = json!(cpu.generator_cores);
        v["broker_cpu_cores"] = json!(cpu.broker_cores);
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// One event handed to a publisher.
struct Outgoing {
    user: usize,
    line: String,
}

/// The `u` of a broadcast event's data: owed to every connection.
const EVERYONE: &str = "*";

/// Which broadcaster sends the broadcast with this nonce.
fn broadcast_source(nonce: u64, sources: usize) -> usize {
    (nonce % sources.clamp(1, MAX_SOURCES) as u64) as usize
}

/// One publish object (or, for `user == None`, broadcast object).
/// Formatted directly (names and events are plain ASCII with nothing to
/// escape): JSON building is the load generator's hottest path at high rates.
fn event_line(
    user: Option<usize>,
    nonce: u64,
    intended_us: u64,
    event: &str,
    priority: &str,
    pad: usize,
    with_id: bool,
) -> String {
    let name = user.map_or_else(|| EVERYONE.to_string(), user_name);
    let mut s = String::with_capacity(128 + pad);
    s.push('{');
    if with_id {
        s.push_str(&format!("\"id\":\"e{nonce}\","));
    }
    if user.is_some() {
        s.push_str("\"user\":\"");
        s.push_str(&name);
        s.push_str("\",");
    }
    s.push_str("\"event\":\"");
    s.push_str(event);
    s.push_str("\",\"priority\":\"");
    s.push_str(priority);
    s.push_str("\",\"data\":{\"u\":\"");
    s.push_str(&name);
    s.push_str(&format!("\",\"n\":{nonce},\"t\":{intended_us},\"p\":\""));
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}}");
    s
}

/// The fields of an event frame the checker needs (borrowed, no allocation).
#[derive(serde::Deserialize)]
struct EventFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    #[serde(default)]
    seq: u64,
    #[serde(default, borrow)]
    priority: &'a str,
    #[serde(default, borrow)]
    data: Option<EventData<'a>>,
}

#[derive(serde::Deserialize)]
struct EventData<'a> {
    #[serde(borrow)]
    u: &'a str,
    n: u64,
    t: u64,
}

/// Feeds publishers on the open-loop schedule; returns events scheduled.
async fn schedule(run: &Run, plan: &Plan, pubs: &[flume::Sender<Outgoing>], t0: Instant) -> u64 {
    let users = run.common.users;
    // Receivers measure against `run.start`; intended times are relative to `t0`.
    let base_us = t0.duration_since(run.start).as_micros() as u64;
    let mut nonce = 0u64;
    let mut rng = fastrand::Rng::with_seed(7);
    match plan {
        Plan::Rate { per_sec, duration, payload, mix, broadcast } => {
            let total_w: u32 = mix.iter().sum();
            loop {
                let intended = match per_sec {
                    Some(r) => Duration::from_secs_f64(nonce as f64 / r),
                    None => t0.elapsed(),
                };
                if intended >= *duration + run.common.warmup {
                    break;
                }
                wait_until(t0 + intended, run.common.spin_pacing).await;
                let user = rng.usize(..users);
                let mut pick = rng.u32(..total_w);
                let mut prio = 0;
                while pick >= mix[prio] {
                    pick -= mix[prio];
                    prio += 1;
                }
                let intended_us = base_us + intended.as_micros() as u64;
                let target = (!broadcast).then_some(user);
                let with_id = run.common.retry_timeout.is_some();
                let line =
                    event_line(target, nonce, intended_us, "load", PRIORITIES[prio], *payload, with_id);
                // A user's events all go through one publisher (so they stay in
                // order); broadcasts rotate, and the checker orders each source.
                let slot = if *broadcast { broadcast_source(nonce, pubs.len()) } else { user % pubs.len() };
                nonce += 1;
                if pubs[slot].send_async(Outgoing { user, line }).await.is_err() {
                    break;
                }
            }
        }
        Plan::Trace { events, planned } => {
            for p in planned {
                wait_until(t0 + p.at, run.common.spin_pacing).await;
                let ev = &events[p.event];
                let intended_us = base_us + p.at.as_micros() as u64;
                let with_id = run.common.retry_timeout.is_some();
                let line =
                    event_line(Some(p.user), nonce, intended_us, &ev.event, &ev.priority, ev.bytes, with_id);
                nonce += 1;
                if pubs[p.user % pubs.len()].send_async(Outgoing { user: p.user, line }).await.is_err() {
                    break;
                }
            }
        }
    }
    nonce
}

/// Waits until `at`. Without `spin`: sleeps if it is more than a millisecond
/// away, else returns at once (bursts go out back to back and the publisher
/// batches them). With `spin`: sleeps (timer resolution is a millisecond)
/// until just before it, then spins the last stretch (yielding, so clients
/// on this thread keep reading), so sub-millisecond gaps are paced.
async fn wait_until(at: Instant, spin: bool) {
    if !spin {
        if at > Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(at.into()).await;
        }
        return;
    }
    const SPIN: Duration = Duration::from_micros(1500);
    if let Some(sleep_to) = at.checked_sub(SPIN).filter(|t| *t > Instant::now()) {
        tokio::time::sleep_until(sleep_to.into()).await;
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// A frame sent on a publisher stream and not yet acked.
struct Unacked {
    frame: String,
    users: Vec<usize>,
    sent_at: Instant,
}

/// How long a publisher keeps trying to open a new stream after a failure.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// One publisher stream: batches queued events into NDJSON frames and counts
/// acks. With `--retry-timeout`, a frame not acked in time (or a failed
/// stream) makes it open a new stream and send every unacked frame again, in
/// order; the events' ids make the broker apply each once.
async fn publisher_task(
    run: Arc<Run>,
    api: String,
    first: Ws,
    rx: flume::Receiver<Outgoing>,
) -> anyhow::Result<()> {
    let retry = run.common.retry_timeout;
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
        let _stop_reader = AbortOnDrop(reader);
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
                            let (frame, users) = next_frame(first, &rx);
                            if run.common.no_acks {
                                // Fire-and-forget: written is sent (the broker
                                // reports a refused item with an error frame).
                                if let Err(e) = sink.send(Message::text(frame)).await {
                                    return Err(anyhow!("publisher send: {e}"));
                                }
                                for u in &users {
                                    run.sent[*u].fetch_add(1, Ordering::Relaxed);
                                }
                                continue;
                            }
                            if let Err(e) = sink.send(Message::text(frame.clone())).await {
                                pending.push_back(Unacked { frame, users, sent_at: Instant::now() });
                                break 'stream anyhow!("publisher send: {e}");
                            }
                            pending.push_back(Unacked { frame, users, sent_at: Instant::now() });
                        }
                        Err(_) => input_done = true,
                    },
                    m = acks.recv() => match m {
                        Some(Ok(applied)) => {
                            let acked = pending.pop_front().ok_or_else(|| anyhow!("an ack for no frame"))?;
                            for (u, ok) in acked.users.iter().zip(applied) {
                                if ok {
                                    run.sent[*u].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
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
        run.retries.fetch_add(1, Ordering::Relaxed);
        eprintln!("publisher: {failure}; resending {} frames on a new stream", pending.len());
    }
}

/// Why a publisher stream's replies stopped.
enum ReplyError {
    /// A reply the generator does not understand: the run fails.
    Unexpected(anyhow::Error),
    /// The stream failed or closed: reconnect (with `--retry-timeout`).
    Stream(anyhow::Error),
}

/// Reads a publisher stream's acks: for each, which items were applied.
async fn read_replies(
    mut stream: futures_util::stream::SplitStream<Ws>,
    out: tokio::sync::mpsc::UnboundedSender<Result<Vec<bool>, ReplyError>>,
) {
    let end = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                let applied = serde_json::from_str::<Value>(&t)
                    .ok()
                    .and_then(|ack| {
                        ack["results"].as_array().map(|rs| rs.iter().map(|r| r.get("seq").is_some()).collect())
                    })
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

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One nats-server publisher: writes each batch of queued events (up to
/// 1,000) as `PUB`s in one write, fire-and-forget; at the end, a PING/PONG
/// makes sure the server has read everything. Payloads are event frames
/// with a per-user seq (see `switchyard_load::nats`).
async fn nats_publisher_task(
    run: Arc<Run>,
    mut publisher: switchyard_load::nats::NatsPublisher,
    rx: flume::Receiver<Outgoing>,
) -> anyhow::Result<()> {
    let mut seqs: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
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
            let payload = format!("{{\"type\":\"event\",\"seq\":{seq},{}", &o.line[1..]);
            publisher.queue(&user_name(o.user), payload.as_bytes());
        }
        publisher.flush().await?;
        for o in &batch {
            run.sent[o.user].fetch_add(1, Ordering::Relaxed);
        }
    }
    publisher.sync().await
}

/// Takes `first` and whatever else is queued (up to 1,000 events) as one NDJSON frame.
fn next_frame(first: Outgoing, rx: &flume::Receiver<Outgoing>) -> (String, Vec<usize>) {
    let mut users = vec![first.user];
    let mut frame = first.line;
    while users.len() < 1000 {
        match rx.try_recv() {
            Ok(o) => {
                frame.push('\n');
                frame.push_str(&o.line);
                users.push(o.user);
            }
            Err(_) => break,
        }
    }
    (frame, users)
}

/// Opens a new publisher stream, retrying for up to [`RECONNECT_FOR`].
async fn reconnect_stream(api: &str, key: Option<&str>, acks: bool) -> anyhow::Result<Ws> {
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
async fn broadcaster_task(run: Arc<Run>, api: String, rx: flume::Receiver<Outgoing>) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let host = api.trim_start_matches("http://").to_string();
    let stream = TcpStream::connect(&host).await.with_context(|| format!("connecting to {host}"))?;
    let _ = stream.set_nodelay(true);
    let mut conn = BufReader::new(stream);
    let auth =
        run.common.api_key.as_deref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let mut line = String::new();
    while let Ok(o) = rx.recv_async().await {
        let head = format!(
            "POST /v1/broadcast HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            o.line.len()
        );
        conn.get_mut().write_all(head.as_bytes()).await?;
        conn.get_mut().write_all(o.line.as_bytes()).await?;
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

/// Client WebSocket settings. tungstenite zero-fills its whole read buffer
/// (128 KiB by default) before every socket read; with thousands of
/// connections each reading small frames that memset was 37% of the load
/// generator's CPU (perf), so the buffer is kept small.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024)
}

async fn connect_stream(api: &str, key: Option<&str>, acks: bool) -> anyhow::Result<Ws> {
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

fn mint_token(secret: &str, user: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Opens one client connection (optionally resuming) and reads its welcome.
async fn connect(
    target: &str,
    common: &Common,
    user: usize,
    index: usize,
    resume: Option<(u64, &str)>,
) -> anyhow::Result<(Conn, Value)> {
    let name = user_name(user);
    let sse = common.transport.sse_for(index);
    let path = if sse { "/sse" } else { "/ws" };
    let mut query = match &common.jwt_secret {
        Some(s) => format!("{path}?token={}", mint_token(s, &name)?),
        None => format!("{path}?user={name}"),
    };
    // WebSockets resume with since/epoch; SSE the way a browser does, with Last-Event-ID.
    let last_event_id = resume.filter(|_| sse).map(|(since, epoch)| format!("{epoch}:{since}"));
    if let Some((since, epoch)) = resume.filter(|_| !sse) {
        query.push_str(&format!("&since={since}&epoch={epoch}"));
    }
    let host = target.trim_start_matches("ws://");
    let addr: SocketAddr =
        tokio::net::lookup_host(host).await?.next().ok_or_else(|| anyhow!("cannot resolve {host}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if common.source_ips > 1 {
        let ip = Ipv4Addr::new(127, 0, 0, 1 + (index % common.source_ips as usize) as u8);
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    let _ = stream.set_nodelay(true);
    if common.peer == Peer::Nats {
        let conn = switchyard_load::nats::NatsConn::open(stream, target, &name).await?;
        return Ok((Conn::Nats(Box::new(conn)), json!({"type": "welcome", "seq": 0, "epoch": ""})));
    }
    let mut conn = if sse {
        Conn::Sse(SseConn::open(stream, &query, last_event_id.as_deref()).await?)
    } else {
        let url = format!("{target}{query}");
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(ws_config()),
        )
        .await?;
        Conn::Ws(Box::new(ws))
    };
    let welcome = match tokio::time::timeout(Duration::from_secs(10), conn.next_text()).await {
        Ok(Some(t)) => serde_json::from_str::<Value>(&t)?,
        Ok(None) => bail!("closed before welcome"),
        Err(_) => bail!("no welcome within 10s"),
    };
    if welcome["type"] != "welcome" {
        bail!("first frame was not welcome: {welcome}");
    }
    Ok((conn, welcome))
}

/// One logical client connection: reads, checks, records latency, churns.
async fn client_task(
    run: Arc<Run>,
    user: usize,
    index: usize,
    slow: bool,
    mut ws: Conn,
    welcome: Value,
) -> ConnCheck {
    let name = user_name(user);
    let mut epoch = welcome["epoch"].as_str().unwrap_or_default().to_string();
    let mut check = ConnCheck::after(welcome["seq"].as_u64().unwrap_or(0));
    let mut lat = Vec::with_capacity(256);
    let conns = (run.common.users * run.common.conns_per_user) as f64;
    let churn_mean = if run.common.churn > 0.0 { Some(conns / run.common.churn) } else { None };
    let next_churn = |rng: &mut fastrand::Rng| {
        churn_mean.map(|m| Instant::now() + Duration::from_secs_f64(-m * (1.0 - rng.f64()).ln()))
    };
    let mut rng = fastrand::Rng::with_seed(index as u64);
    let mut churn_at = next_churn(&mut rng);
    let mut stopped = run.stopped.subscribe();
    // Reconnects go to the next node each time (one node: the same one).
    let mut hops = 0;
    let mut next_target = || {
        hops += 1;
        run.targets[(index + hops) % run.targets.len()].clone()
    };
    loop {
        if run.stop.load(Ordering::Relaxed) {
            break;
        }
        let churn_sleep = async {
            match churn_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped.changed() => break,
            msg = ws.next_text() => match msg {
                Some(t) => {
                    let Ok(ev) = serde_json::from_str::<EventFrame<'_>>(&t) else { continue };
                    if ev.ty != "event" { continue }
                    let Some(d) = ev.data else { continue };
                    let lane = match ev.priority { "high" => 0, "low" => 2, _ => 1 };
                    let (own, lane) = if d.u == EVERYONE {
                        (EVERYONE, lane + 3 * broadcast_source(d.n, run.common.publishers))
                    } else {
                        (name.as_str(), lane)
                    };
                    check.observe(own, d.u, ev.seq, d.n, lane);
                    run.received.fetch_add(1, Ordering::Relaxed);
                    let now_us = run.start.elapsed().as_micros() as u64;
                    if d.t >= run.measure_from_us.load(Ordering::Relaxed) {
                        lat.push(now_us.saturating_sub(d.t));
                    }
                    if lat.len() == 256 {
                        let _ = run.latency_tx.send(std::mem::replace(&mut lat, Vec::with_capacity(256)));
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                None => {
                    // Dropped by the broker (e.g. 1013 for a slow reader): resume.
                    let target = next_target();
                    if !reconnect(&run, &target, user, index, &mut ws, &mut epoch, &mut check).await { break }
                }
            },
            _ = churn_sleep => {
                ws.close().await;
                let target = next_target();
                if !reconnect(&run, &target, user, index, &mut ws, &mut epoch, &mut check).await { break }
                churn_at = next_churn(&mut rng);
            }
        }
    }
    let _ = run.latency_tx.send(lat);
    ws.close().await;
    check
}

async fn reconnect(
    run: &Run,
    target: &str,
    user: usize,
    index: usize,
    ws: &mut Conn,
    epoch: &mut String,
    check: &mut ConnCheck,
) -> bool {
    match connect_retrying(target, &run.common, user, index, Some((check.resume_point(), epoch)), 50).await {
        Ok((new_ws, welcome)) => {
            run.resumes.fetch_add(1, Ordering::Relaxed);
            if welcome["recovered"] != true {
                run.resume_failed.fetch_add(1, Ordering::Relaxed);
            }
            *epoch = welcome["epoch"].as_str().unwrap_or_default().to_string();
            *ws = new_ws;
            check.resumed();
            true
        }
        Err(_) => {
            run.resume_failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// [`connect`], tried up to `attempts` times (each bounded to 10 s, 20 ms
/// apart); the last error if none succeeds.
async fn connect_retrying(
    target: &str,
    common: &Common,
    user: usize,
    index: usize,
    resume: Option<(u64, &str)>,
    attempts: usize,
) -> anyhow::Result<(Conn, Value)> {
    let mut last = anyhow!("no connection attempt");
    for _ in 0..attempts.max(1) {
        match tokio::time::timeout(Duration::from_secs(10), connect(target, common, user, index, resume))
            .await
        {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = e,
            Err(_) => last = anyhow!("no connection within 10 s"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last)
}

/// Live progress: an indicatif line redrawn in place on a terminal, plain
/// lines (one a second) otherwise, so logs stay readable.
async fn progress_task(run: Arc<Run>) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent: u64 = run.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        let recv = run.received.load(Ordering::Relaxed);
        let line = format!(
            "t={:>5.1}s sent={sent} received={recv} ({}/s) resumes={}",
            run.start.elapsed().as_secs_f64(),
            recv - last,
            run.resumes.load(Ordering::Relaxed)
        );
        last = recv;
        match &bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("{line}"),
        }
    }
}

/// The nodes' total shed count, from their /v1/stats (nats-server: none).
async fn broker_shed(apis: &[String], key: Option<&str>) -> anyhow::Result<u64> {
    let mut total = 0;
    for api in apis.iter().filter(|a| !a.starts_with("nats://")) {
        let v = http_get_json(api, "/v1/stats", key).await?;
        total += v["events"]["shed"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// A minimal HTTP/1.1 GET (the API listener is plain HTTP on loopback).
async fn http_get_json(api: &str, path: &str, key: Option<&str>) -> anyhow::Result<Value> {
    let body = http_get_text(api, path, key).await?;
    serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
}

/// One `GET` on the API listener (HTTP/1.1, connection closed); the body.
async fn http_get_text(api: &str, path: &str, key: Option<&str>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = api.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).await.with_context(|| format!("connecting to {host}"))?;
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("bad HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

fn report(
    common: &Common,
    t: &Totals,
    h: &Histogram<u64>,
    publish: Duration,
    delivery: Duration,
    plan: &Plan,
) -> anyhow::Result<()> {
    let pct = |q: f64| if h.is_empty() { 0 } else { h.value_at_quantile(q) };
    let delivered_per_s = t.received as f64 / delivery.as_secs_f64().max(1e-9);
    let sent_per_s = t.sent as f64 / publish.as_secs_f64().max(1e-9);
    let mode = match plan {
        Plan::Rate { per_sec, broadcast, .. } => format!(
            "{}rate={}",
            if *broadcast { "broadcast " } else { "" },
            per_sec.map_or("max".to_string(), |r| r.to_string())
        ),
        Plan::Trace { planned, .. } => format!("trace events={}", planned.len()),
    };
    println!(
        "switchyard-load: {mode} users={} conns={} publishers={}",
        common.users,
        common.users * common.conns_per_user,
        common.publishers
    );
    println!("  sent        {:>12}   ({sent_per_s:.0}/s)", t.sent);
    println!("  received    {:>12}   ({delivered_per_s:.0}/s delivered)", t.received);
    println!("  lost        {:>12}", t.lost);
    println!("  duplicated  {:>12}", t.duplicated);
    println!("  reordered   {:>12}", t.reordered);
    println!("  misrouted   {:>12}", t.misrouted);
    println!("  shed        {:>12}   (slow consumers, reported by the broker)", t.shed);
    println!("  rejected    {:>12}   (refused by the broker: overloaded)", t.rejected);
    println!("  resumes     {:>12}   (failed: {})", t.resumes, t.resume_failed);
    println!("  retried     {:>12}   (publisher streams replaced; frames resent with their ids)", t.retried);
    println!(
        "  latency µs  p50={} p90={} p99={} p99.9={} max={}  (from intended send time)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        h.max()
    );
    println!("  result      {}", if t.ok() { "OK" } else { "FAILED" });
    if let Some(path) = &common.hgrm {
        std::fs::write(path, switchyard::observe::hgrm(h))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.json {
        let mut v = serde_json::to_value(t)?;
        v["delivered_per_s"] = json!(delivered_per_s);
        v["sent_per_s"] = json!(sent_per_s);
        v["latency_us"] =
            json!({"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999), "max": h.max()});
        v["ok"] = json!(t.ok());
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
