//! Assembly: opens the data directory, binds the listeners, builds the
//! shared context ([`Shared`]), starts the shards and the I/O runtime, and
//! owns the shutdown order. The top of the house: nothing imports it but
//! `main`, `cli` and the tests.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::cluster::live::Live;
use crate::cluster::Engine;
use crate::config::Config;
use crate::engine::datadir::DataDir;
use crate::listener;
use crate::metrics::{ApiErrors, Latency};
use crate::redact::Redactor;
use crate::routing::{Router, RoutingTable};
use crate::shard::{self, ShardHandle};
pub use crate::shared::Shared;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot bind --listen {addr}: {source}")]
    BindClient { addr: SocketAddr, source: std::io::Error },
    #[error("cannot bind --api-listen {addr}: {source}")]
    BindApi { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the I/O runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start a shard thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::listener::tls::TlsError),
    #[error("cannot read random bits from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    DataDir(#[from] crate::engine::datadir::DataDirError),
    #[error("--data-dir is not set")]
    NoDataDir,
    #[error("--cluster: {0}")]
    Cluster(crate::cluster::EngineError),
    #[error("--data-dir {path}: it holds {found} shards' logs, but --shards is {want}; start with --shards {found}")]
    ShardCount { path: std::path::PathBuf, found: usize, want: usize },
}

impl StartError {
    /// The process exit status: 2 when a flag's value cannot be used (as
    /// for refused configurations), 1 when the environment failed us.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls(_)
            | StartError::DataDir(_)
            | StartError::ShardCount { .. }
            | StartError::NoDataDir => 2,
            StartError::BindClient { .. }
            | StartError::BindApi { .. }
            | StartError::Random(_)
            | StartError::Cluster(_)
            | StartError::Runtime(_)
            | StartError::Thread(_) => 1,
        }
    }
}

/// A started broker.
pub struct Running {
    pub client_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// Stops the listeners: no more accepts, publisher streams closed
    /// (1001), keep-alive connections closed after their request in flight.
    shutdown: CancellationToken,
    /// API connections still open (publisher streams included).
    api_open: listener::watchdog::OpenConnections,
    shards: Vec<JoinHandle<Option<Latency>>>,
    io: Option<tokio::runtime::Runtime>,
    /// The locked `--data-dir`, marked clean after the shards close their logs.
    data_dir: Option<DataDir>,
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// 64 bits from the OS RNG in base 36 (13 characters), then a `-`.
fn boot_id() -> Result<String, StartError> {
    let mut n = getrandom::u64().map_err(StartError::Random)?;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(14);
    for _ in 0..13 {
        out.push(ALPHABET[(n % 36) as usize] as char);
        n /= 36;
    }
    out.push('-');
    Ok(out)
}

/// Checks everything start-up checks beyond the flags themselves (the TLS
/// files, the data directory), without binding or starting anything:
/// `switchyard check-config`.
pub fn validate(config: &Config) -> Result<(), StartError> {
    config.tls.as_ref().map(listener::tls::acceptor).transpose()?;
    config.api_tls.as_ref().map(listener::tls::acceptor).transpose()?;
    if config.data.is_some() {
        drop(open_data_dir(config)?);
    }
    Ok(())
}

/// Opens and locks `--data-dir`, and reads (or, the first time, writes) its
/// routing: the shard count and the routing hash keys it was written with.
/// Each shard has its own log, so a user must hash to the same shard after a
/// restart; another `--shards` is refused.
fn open_data_dir(config: &Config) -> Result<(DataDir, [u64; 4]), StartError> {
    let Some(data) = &config.data else { return Err(StartError::NoDataDir) };
    let dir = DataDir::open(&data.dir)?;
    let file = data.dir.join("ROUTING");
    let not_writable = |source| {
        StartError::DataDir(crate::engine::datadir::DataDirError::NotWritable {
            path: data.dir.clone(),
            source,
        })
    };
    let parse = |text: &str| -> Option<(usize, [u64; 4])> {
        let mut lines = text.lines();
        let shards = lines.next()?.strip_prefix("shards=")?.parse().ok()?;
        let keys: Vec<u64> = lines
            .next()?
            .strip_prefix("keys=")?
            .split(',')
            .filter_map(|k| u64::from_str_radix(k, 16).ok())
            .collect();
        Some((shards, keys.try_into().ok()?))
    };
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let (found, keys) = parse(&text).ok_or_else(|| {
                not_writable(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "its ROUTING file is damaged",
                ))
            })?;
            if found != config.shards {
                return Err(StartError::ShardCount { path: data.dir.clone(), found, want: config.shards });
            }
            Ok((dir, keys))
        }
        Err(_) => {
            let mut keys = [0u64; 4];
            for k in &mut keys {
                *k = getrandom::u64().map_err(StartError::Random)?;
            }
            let text = format!(
                "shards={}\nkeys={:x},{:x},{:x},{:x}\n",
                config.shards, keys[0], keys[1], keys[2], keys[3]
            );
            let tmp = data.dir.join("ROUTING.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &file))
                .and_then(|()| crate::engine::datadir::sync_dir(&data.dir))
                .map_err(not_writable)?;
            Ok((dir, keys))
        }
    }
}

/// Starts a broker: binds both listeners, spawns the shards and the I/O runtime.
pub fn start(config: Config) -> Result<Running, StartError> {
    let tls = config.tls.as_ref().map(listener::tls::acceptor).transpose()?;
    let api_tls = config.api_tls.as_ref().map(listener::tls::acceptor).transpose()?;
    let boot = boot_id()?;
    let (data_dir, routing_keys) = match config.data {
        Some(_) => {
            let (d, k) = open_data_dir(&config)?;
            (Some(d), Some(k))
        }
        None => (None, None),
    };
    let store_was_clean = data_dir.as_ref().is_some_and(DataDir::was_clean);
    let client =
        bind(config.listen).map_err(|source| StartError::BindClient { addr: config.listen, source })?;
    let api =
        bind(config.api_listen).map_err(|source| StartError::BindApi { addr: config.api_listen, source })?;
    let client_addr = client.local_addr().map_err(StartError::Runtime)?;
    let api_addr = api.local_addr().map_err(StartError::Runtime)?;

    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads)
        .thread_name("io")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let (cluster, subscriber) = match &config.cluster {
        Some(_) => {
            let (engine, sub) = io.block_on(Engine::open(&config, &boot)).map_err(StartError::Cluster)?;
            (Some(engine), Some(sub))
        }
        None => (None, None),
    };

    let shards: Box<[ShardHandle]> =
        (0..config.shards).map(|i| ShardHandle::new(i, config.ring_capacity)).collect();
    let shared = Arc::new(Shared {
        cluster,
        router: match routing_keys {
            Some(keys) => Router::with_seed(RoutingTable::uniform(config.shards), keys),
            None => Router::new(RoutingTable::uniform(config.shards)),
        },
        shards,
        live: AtomicUsize::new(0),
        boot,
        redactor: Redactor::new(config.redact_keys.clone()),
        auth: Authenticator::new(config.jwt_secret.as_deref()),
        api_errors: ApiErrors::default(),
        store_was_clean,
        config,
    });
    let shutdown = CancellationToken::new();
    let api_open = listener::watchdog::OpenConnections::new(shared.config.api_max_connections);

    let mut threads = Vec::with_capacity(shared.shards.len());
    let (started_tx, started) = std::sync::mpsc::channel();
    for id in 0..shared.shards.len() {
        let (shared, started_tx) = (shared.clone(), started_tx.clone());
        let t = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || match shard::reactor::run(id, shared, started_tx) {
                Ok(latency) => Some(latency),
                Err(e) => {
                    tracing::error!(shard = id, error = %e, "shard failed to start");
                    None
                }
            })
            .map_err(StartError::Thread)?;
        threads.push(t);
    }
    drop(started_tx);
    // Every shard's runtime exists before the API listener hands it
    // connections (a shard that failed to build one has logged why).
    for _ in 0..threads.len() {
        if started.recv().is_err() {
            break;
        }
    }

    {
        let _guard = io.enter();
        let client = tokio::net::TcpListener::from_std(client).map_err(StartError::Runtime)?;
        let api = tokio::net::TcpListener::from_std(api).map_err(StartError::Runtime)?;
        io.spawn(listener::client::serve(client, tls, shared.clone(), shutdown.clone()));
        io.spawn(listener::api::serve(api, api_tls, shared.clone(), api_open.clone(), shutdown.clone()));
        if let (Some(engine), Some(sub)) = (&shared.cluster, subscriber) {
            io.spawn(engine.clone().heartbeat());
            io.spawn(sub.run(Arc::new(ShardSink(shared.clone()))));
            tracing::info!(node = %engine.node_id, "cluster mode: Redis holds every user's state");
        }
        if let (Some(dir), Some(every)) = (&shared.config.hist_dir, shared.config.hist_interval) {
            io.spawn(crate::histdump::interval_log(shared.clone(), dir.clone(), every, shutdown.clone()));
        }
    }
    if shared.auth.is_dev() {
        tracing::warn!("dev mode: no --jwt-secret, clients choose their user with ?user=");
    }
    tracing::info!(
        client = %client_addr,
        api = %api_addr,
        shards = shared.shards.len(),
        "switchyard listening"
    );
    Ok(Running { client_addr, api_addr, shared, shutdown, api_open, shards: threads, io: Some(io), data_dir })
}

impl Running {
    /// A token that, when cancelled, starts the shutdown sequence.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The contract's shutdown (§8), blocking, within `--drain-timeout`:
    /// stop accepting; close publisher streams with 1001, applying every
    /// frame sent before the publisher answered the close; answer HTTP
    /// requests in flight; then (behind every accepted publish, in each
    /// ring) tell the shards to flush and close their connections with 1001.
    /// Returns the shards' final latency histograms, merged.
    pub fn shutdown(mut self) -> Latency {
        self.shutdown.cancel();
        let deadline = std::time::Instant::now() + self.shared.config.drain_timeout;
        if let Some(io) = &self.io {
            let open = self.api_open.clone();
            io.block_on(async move {
                let _ = tokio::time::timeout_at(deadline.into(), open.all_closed()).await;
            });
        }
        // Shards flush for at least a moment even if the API used all the time.
        let floor =
            std::time::Instant::now() + self.shared.config.drain_timeout.min(Duration::from_millis(200));
        stop_shards(&self.shared, deadline.max(floor));
        let mut merged = Latency::default();
        let mut all_closed = true;
        for t in self.shards.drain(..) {
            match t.join() {
                Ok(Some(l)) => merged.merge(&l),
                _ => all_closed = false,
            }
        }
        let store_failed =
            self.shared.shards.iter().any(|h| crate::metrics::read(&h.metrics.store_failed) > 0);
        if let Some(dir) = self.data_dir.take() {
            if all_closed && !store_failed {
                if let Err(e) = dir.mark_clean() {
                    tracing::error!(error = %e, "could not mark the data directory clean");
                }
            } else {
                tracing::warn!("a shard's log did not close cleanly: the next start counts as after a crash");
            }
        }
        if let Some(io) = self.io.take() {
            io.shutdown_timeout(std::time::Duration::from_millis(500));
        }
        merged
    }
}

/// Hands Pub/Sub messages to the shards: a user's to the user's shard, a
/// broadcast or a resync to every shard (all or none: room is reserved in
/// every ring first).
struct ShardSink(Arc<Shared>);

impl crate::cluster::live::Sink for ShardSink {
    fn deliver(&self, msg: Live) -> Result<(), Live> {
        let shared = &self.0;
        let user = match &msg {
            Live::Event { user, .. } | Live::Evict { user, .. } | Live::Drop { user } => Some(user),
            Live::Broadcast { .. } | Live::Resync => None,
        };
        if let Some(user) = user {
            let s = shared.router.shard_for(user);
            return match shared.shards[s].reserve(1) {
                Ok(mut permit) => {
                    permit.push(shard::Command::Live(msg));
                    Ok(())
                }
                Err(_) => Err(msg),
            };
        }
        let mut permits = Vec::with_capacity(shared.shards.len());
        for h in shared.shards.iter() {
            match h.reserve(1) {
                Ok(p) => permits.push(p),
                Err(_) => return Err(msg),
            }
        }
        for mut p in permits {
            let copy = match &msg {
                Live::Broadcast { bid, priority, at_us, tail } => Live::Broadcast {
                    bid: bid.clone(),
                    priority: *priority,
                    at_us: *at_us,
                    tail: tail.clone(),
                },
                _ => Live::Resync,
            };
            p.push(shard::Command::Live(copy));
        }
        Ok(())
    }
}

/// Pushes [`shard::Command::Shutdown`] into every ring (retrying briefly
/// while a ring is full, since it must get in behind what is there).
fn stop_shards(shared: &Shared, deadline: std::time::Instant) {
    for h in shared.shards.iter() {
        let mut cmd = shard::Command::Shutdown { deadline };
        for _ in 0..10_000 {
            match h.ring.push(cmd) {
                Ok(()) => break,
                Err((_, back)) => {
                    cmd = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.shards.is_empty() {
            stop_shards(&self.shared, std::time::Instant::now());
        }
        self.shutdown.cancel();
        if let Some(io) = self.io.take() {
            io.shutdown_background();
        }
    }
}
