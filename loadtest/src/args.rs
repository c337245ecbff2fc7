//! The generator's flags (clap) and what they parse into: the run's plan.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use switchyard::config::parse_duration;
use switchyard_load::trace::{Planned, TraceEvent};

#[derive(Parser)]
#[command(name = "switchyard-load", version, about = "Load generator and delivery checker for switchyard")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Publish at a fixed rate to random users and check every delivery.
    Run(RunArgs),
    /// Replay a recorded trace across many users and check every delivery.
    Replay(ReplayArgs),
    /// Measure the kernel's delivery ceiling: a stand-in server with no broker
    /// logic writes pre-encoded frames to N clients, `--batch` per writev.
    Ceiling(CeilingArgs),
    /// Serve as a relay with no broker logic (read, number, write) for this
    /// generator to run against: the floor beside the brokers (deliveries/s
    /// at max rate, latency at fixed rates).
    Relay(RelayArgs),
}

#[derive(Args)]
pub(crate) struct RelayArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) listen: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) api_listen: std::net::SocketAddr,
}

#[derive(Args)]
pub(crate) struct CeilingArgs {
    #[arg(long, default_value_t = 1000)]
    pub(crate) conns: usize,
    /// Frames per write call.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 128)]
    pub(crate) payload: usize,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub(crate) struct Common {
    /// The broker's client listener; for a cluster, a comma-separated list
    /// of nodes: client i connects to node i mod N, and a client that
    /// reconnects (churn, or dropped) goes to the next node.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub(crate) target: String,
    /// The broker's API listener; for a cluster, a comma-separated list:
    /// publisher p uses node p mod N (figures are read from the first).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub(crate) api: String,
    /// Mint HS256 client tokens with this secret (else dev mode, ?user=).
    #[arg(long)]
    pub(crate) jwt_secret: Option<String>,
    #[arg(long)]
    pub(crate) api_key: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub(crate) users: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) conns_per_user: usize,
    /// Publisher streams (/v1/stream).
    #[arg(long, default_value_t = 2)]
    pub(crate) publishers: usize,
    /// Reconnects per second across all connections; each resumes with since.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) churn: f64,
    /// Fraction of connections that read slowly (their shed events do not fail the run).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) slow_readers: f64,
    /// Spread client sockets over this many loopback source addresses (127.0.0.1..N).
    #[arg(long, default_value_t = 1)]
    pub(crate) source_ips: u8,
    /// How long to wait for the last deliveries after publishing ends (the
    /// wait ends sooner once arrivals plus the broker's reported shed cover
    /// everything sent).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) drain: Duration,
    /// Write the latency distribution (.hgrm).
    #[arg(long)]
    pub(crate) hgrm: Option<PathBuf>,
    /// Write a JSON summary.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Client runtime threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Publishers give every event an idempotency `id`; a frame not acked
    /// within this time (or a stream that fails) is sent again, with every
    /// frame after it, on a new stream. The checks then prove the broker
    /// applied each event exactly once.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) retry_timeout: Option<Duration>,
    /// At a fixed rate, spin the last 50 µs before each event's time on the
    /// pacing thread instead of sleeping to it (sleeps are accurate to tens
    /// of µs; spinning takes CPU the clients share).
    #[arg(long)]
    pub(crate) spin_pacing: bool,
    /// Publish this long before the measured window: latency (client and
    /// broker histograms) and CPU figures cover only what follows it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub(crate) warmup: Duration,
    /// The broker's PID on this machine: its CPU use over the measured
    /// window is reported (cores), beside the generator's own.
    #[arg(long)]
    pub(crate) broker_pid: Option<u32>,
    /// Write the broker's own latency histogram (GET /debug/histograms,
    /// reset when the measured window starts) to this file.
    #[arg(long)]
    pub(crate) broker_hgrm: Option<PathBuf>,
    /// How clients connect: WebSocket (`/ws`), Server-Sent Events (`/sse`,
    /// resuming through `Last-Event-ID`), or a mix (every other connection).
    #[arg(long, value_enum, default_value = "ws")]
    pub(crate) transport: Transport,
    /// What is under load: switchyard, or nats-server measured the same way
    /// (`--target ws://` its WebSocket listener, `--api nats://HOST:PORT` its
    /// client port; fire-and-forget publishers; no churn).
    #[arg(long, value_enum, default_value = "switchyard")]
    pub(crate) peer: Peer,
    /// switchyard: publisher streams without acks (fire-and-forget, as NATS
    /// publishers are); events count as sent once written.
    #[arg(long)]
    pub(crate) no_acks: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Peer {
    Switchyard,
    Nats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Transport {
    Ws,
    Sse,
    Mix,
}

impl Transport {
    /// Whether connection `index` uses SSE.
    pub(crate) fn sse_for(self, index: usize) -> bool {
        match self {
            Transport::Ws => false,
            Transport::Sse => true,
            Transport::Mix => index % 2 == 1,
        }
    }
}

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Events per second, or `max`.
    #[arg(long, default_value = "1000")]
    pub(crate) rate: String,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 128)]
    pub(crate) payload: usize,
    /// Share of high:normal:low events, e.g. 1:8:1.
    #[arg(long, default_value = "0:1:0")]
    pub(crate) priority_mix: String,
    /// Broadcast every event (POST /v1/broadcast) instead of publishing it to
    /// one random user. `--publishers` broadcasters (at most 8) take turns;
    /// each sends one request at a time, so its own broadcasts stay ordered.
    #[arg(long, conflicts_with = "churn")]
    pub(crate) broadcast: bool,
}

#[derive(Args)]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// The trace to replay (see loadtest/traces/README.md).
    pub(crate) trace: PathBuf,
    /// Time scaling: 2 replays twice as fast.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) speed: f64,
    /// Users start at random offsets within this window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) stagger: Duration,
}

/// What to publish, in time order.
pub(crate) enum Plan {
    Rate { per_sec: Option<f64>, duration: Duration, payload: usize, mix: [u32; 3], broadcast: bool },
    Trace { events: Vec<TraceEvent>, planned: Vec<Planned> },
}

pub(crate) const PRIORITIES: [&str; 3] = ["high", "normal", "low"];

pub(crate) fn parse_mix(raw: &str) -> anyhow::Result<[u32; 3]> {
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
