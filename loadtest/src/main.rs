//! `switchyard-load`: opens client connections and publisher streams against
//! a running broker, publishes on an open-loop schedule, and checks every
//! event (delivered to every connection of its user, to no one else, once,
//! in order). Latency is measured from each event's *intended* send time, so
//! a stalled broker cannot hide its stall (coordinated omission, as wrk2).

mod args;
mod clients;
mod http;
mod priority;
mod publishers;
mod report;
mod shared;
mod window;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use switchyard_load::check::{Totals, MAX_SOURCES};
use switchyard_load::trace::{self};

use crate::args::{parse_mix, Cli, Cmd, Common, Peer, Plan, Transport};
use crate::clients::{client_task, connect_retrying};
use crate::http::broker_shed;
use crate::publishers::{
    broadcaster_task, connect_stream, nats_publisher_task, publisher_task, schedule, Outgoing,
};
use crate::report::{progress_task, report};
use crate::shared::{node_list, Run};
use crate::window::{broker_histogram, measure_window, report_window};

/// The broker's allocator: the generator allocates per frame read, and
/// glibc's malloc was ~8% of its CPU at 100 users, max rate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Cmd::Relay(a) => {
            raise_fd_limit();
            return switchyard_load::relay::run(a.listen, a.api_listen);
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
    // On a worker, not on this thread: at `--rate max` the schedule feeds
    // the publisher tasks from here, and a feed on another thread than the
    // tasks it wakes costs a futex wake and a context switch per hand-off
    // (7% of the generator's CPU at 100 users, max rate).
    //
    // At a fixed rate or a trace's times, publishers run on a runtime and
    // thread of their own: on the clients' runtime a send waited behind
    // every client task woken before it, and a burst of deliveries made
    // events leave milliseconds late (send lag p99.9 ~5 ms at 5,000 users,
    // 30k/s), which counted as the broker's latency.
    let paced = !matches!(plan, Plan::Rate { per_sec: None, .. });
    let publishing = match paced {
        true => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("publishers")
                .on_thread_start(|| {
                    priority::enter(priority::Role::Publishers);
                })
                .enable_all()
                .build()?,
        ),
        false => None,
    };
    let handle = publishing.as_ref().map_or_else(|| rt.handle().clone(), |p| p.handle().clone());
    let ok = rt.block_on(async { tokio::spawn(run(common, plan, handle)).await })??;
    drop(publishing);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// Waits until every connection has what its user was sent, less what the
/// broker reports it shed (a slow consumer's dropped events never arrive),
/// or until `--drain` ends. Returns how long after `publish_start` the last
/// delivery arrived (to within the 20 ms poll): the delivery rate is taken
/// over that, not over time spent waiting for events that were shed.
async fn drain(
    run: &Run,
    common: &Common,
    apis: &[String],
    expected: u64,
    shed_before: u64,
    publish_start: Instant,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + common.drain;
    let mut seen = run.received.load(Ordering::Relaxed);
    let mut last_arrival = Instant::now();
    let mut next_shed_check = Instant::now();
    let mut shed = 0;
    while seen + shed < expected {
        if Instant::now() >= deadline {
            let outstanding = expected - seen - shed;
            eprintln!(
                "drain window ({:?}) closed with {outstanding} deliveries neither received nor shed; they count as lost",
                common.drain
            );
            break;
        }
        if Instant::now() >= next_shed_check {
            shed = broker_shed(apis, common.api_key.as_deref()).await?.saturating_sub(shed_before);
            next_shed_check = Instant::now() + Duration::from_millis(500);
            continue;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now_seen = run.received.load(Ordering::Relaxed);
        if now_seen != seen {
            seen = now_seen;
            last_arrival = Instant::now();
        }
    }
    Ok(last_arrival.duration_since(publish_start))
}

/// Plenty of sockets (root may raise the hard limit), else the hard limit.
fn raise_fd_limit() {
    switchyard::fdlimit::raise(1 << 20);
    // Where THP is `always`, a page fault that zeroes a 2 MiB huge page would
    // stall a client task and count as the broker's latency.
    switchyard::hugepages::disable();
}

/// Gathers latency samples (µs) into a histogram until every sender is gone.
async fn collect(samples: flume::Receiver<Vec<u64>>) -> Histogram<u64> {
    let mut h = shared::latency_histogram();
    while let Ok(batch) = samples.recv_async().await {
        for v in batch {
            shared::record_latency(&mut h, v);
        }
    }
    h
}

/// `publishing`: the runtime publishers connect and run on.
async fn run(common: Common, plan: Plan, publishing: tokio::runtime::Handle) -> anyhow::Result<bool> {
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
        send_lag: std::sync::Mutex::new(shared::latency_histogram()),
        measure_from_us: AtomicU64::new(u64::MAX),
        start: Instant::now(),
        common: common.clone(),
        targets: targets.clone(),
        names: (0..common.users).map(shared::user_name).collect(),
    });
    let collector = tokio::spawn(collect(latency_rx));

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
        pub_tasks.push(publishing.spawn(broadcaster_task(
            run.clone(),
            apis[pub_tasks.len() % apis.len()].clone(),
            rx,
        )));
        pub_txs.push(tx);
    }
    for p in (0..common.publishers).filter(|_| !broadcasting && common.peer == Peer::Nats) {
        let (tx, rx) = flume::bounded::<Outgoing>(8192);
        let addr = apis[p % apis.len()].trim_start_matches("nats://").to_string();
        // Connected there too, so its socket is that runtime's to poll.
        let publisher = publishing
            .spawn(async move { switchyard_load::nats::NatsPublisher::connect(&addr).await })
            .await??;
        pub_tasks.push(publishing.spawn(nats_publisher_task(run.clone(), publisher, rx)));
        pub_txs.push(tx);
    }
    for p in (0..common.publishers).filter(|_| !broadcasting && common.peer == Peer::Switchyard) {
        let (tx, rx) = flume::bounded::<Outgoing>(8192);
        let api = apis[p % apis.len()].clone();
        let (url, key, acks) = (api.clone(), common.api_key.clone(), !common.no_acks);
        let ws = publishing
            .spawn(async move { connect_stream(&url, key.as_deref(), acks).await })
            .await?
            .with_context(|| format!("publisher {p}"))?;
        pub_tasks.push(publishing.spawn(publisher_task(run.clone(), api, ws, rx)));
        pub_txs.push(tx);
    }

    let publish_start = Instant::now();
    let measure_start = publish_start + common.warmup;
    run.measure_from_us.store(measure_start.duration_since(run.start).as_micros() as u64, Ordering::Relaxed);
    let progress = tokio::spawn(progress_task(run.clone()));
    // The measured window: CPU of both processes and the broker's own
    // histogram (reset as it opens) are read at its edges.
    let window = tokio::spawn(measure_window(api.clone(), common.clone(), measure_start));
    let (scheduled, plan) = schedule(&run, plan, pub_txs, publish_start).await;
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
    let delivery_elapsed = drain(&run, &common, &apis, expected, shed_before, publish_start).await?;
    run.stop.store(true, Ordering::Relaxed);
    run.stopped.send_replace(true);
    progress.abort();

    let mut totals = Totals::default();
    let mut short_conns = 0;
    for (i, t) in conn_tasks.into_iter().enumerate() {
        let check = t.await?;
        if check.received < owed(i) && short_conns < 10 {
            short_conns += 1;
            let user = shared::user_name(i % common.users);
            eprintln!("connection {i} (user {user}, sent {}) is short: {}", owed(i), check.gaps());
        }
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
    // Every publisher has ended and merged its own.
    let send_lag = std::mem::replace(
        &mut *run.send_lag.lock().unwrap_or_else(|e| e.into_inner()),
        shared::latency_histogram(),
    );
    drop(run);
    let hist = collector.await?;
    let broker_latency = broker_histogram(&api, &common).await?;
    report(&common, &totals, (&hist, &send_lag), publish_elapsed, delivery_elapsed, &plan)?;
    report_window(&common, &cpu, broker_latency.as_ref())?;
    Ok(totals.ok())
}
