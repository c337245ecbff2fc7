//! Assembly: binds the listeners, starts the shards and the I/O runtime, and
//! owns the broker-wide shared context ([`Shared`]) and the shutdown order.
//!
//! [`Shared`] is immutable after start except for atomics: the routing table
//! (an `ArcSwap`), the per-shard rings and counters, and the live-connection
//! count. It is what every thread holds an `Arc` of.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::listener;
use crate::metrics::{ApiErrors, Latency};
use crate::redact::Redactor;
use crate::routing::{Router, RoutingTable};
use crate::shard::{self, ShardHandle};

/// The broker-wide context shared by every thread.
pub struct Shared {
    pub config: Config,
    pub router: Router,
    /// Indexed by shard id.
    pub shards: Box<[ShardHandle]>,
    /// Client connections admitted (handed over or live), across shards:
    /// enforces `--max-connections` without asking the shards.
    live: AtomicUsize,
    /// 64 random bits from the operating system, drawn at start: the prefix
    /// of every user epoch, so a restart changes them all and an old epoch
    /// never matches new history (a shard and a per-shard counter follow,
    /// so no two states of a run share an epoch either).
    pub boot: String,
    pub redactor: Redactor,
    pub auth: Authenticator,
    pub api_errors: ApiErrors,
}

impl Shared {
    /// Admits one more client connection if under `--max-connections`.
    pub fn try_acquire_connection(&self) -> bool {
        // Relaxed: a counter bounding admissions; it orders nothing else.
        let prev = self.live.fetch_add(1, Ordering::Relaxed);
        if prev >= self.config.max_connections {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn release_connection(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

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
}

impl StartError {
    /// The process exit status: 2 when a flag's value cannot be used (as
    /// for refused configurations), 1 when the environment failed us.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls(_) => 2,
            StartError::BindClient { .. }
            | StartError::BindApi { .. }
            | StartError::Random(_)
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
    api_open: listener::api::OpenConnections,
    shards: Vec<JoinHandle<Option<Latency>>>,
    io: Option<tokio::runtime::Runtime>,
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
/// files), without binding or starting anything: `switchyard check-config`.
pub fn validate(config: &Config) -> Result<(), StartError> {
    config.tls.as_ref().map(listener::tls::acceptor).transpose()?;
    config.api_tls.as_ref().map(listener::tls::acceptor).transpose()?;
    Ok(())
}

/// Starts a broker: binds both listeners, spawns the shards and the I/O runtime.
pub fn start(config: Config) -> Result<Running, StartError> {
    let tls = config.tls.as_ref().map(listener::tls::acceptor).transpose()?;
    let api_tls = config.api_tls.as_ref().map(listener::tls::acceptor).transpose()?;
    let boot = boot_id()?;
    let client =
        bind(config.listen).map_err(|source| StartError::BindClient { addr: config.listen, source })?;
    let api =
        bind(config.api_listen).map_err(|source| StartError::BindApi { addr: config.api_listen, source })?;
    let client_addr = client.local_addr().map_err(StartError::Runtime)?;
    let api_addr = api.local_addr().map_err(StartError::Runtime)?;

    let shards: Box<[ShardHandle]> =
        (0..config.shards).map(|i| ShardHandle::new(i, config.ring_capacity)).collect();
    let shared = Arc::new(Shared {
        router: Router::new(RoutingTable::uniform(config.shards)),
        shards,
        live: AtomicUsize::new(0),
        boot,
        redactor: Redactor::new(config.redact_keys.clone()),
        auth: Authenticator::new(config.jwt_secret.as_deref()),
        api_errors: ApiErrors::default(),
        config,
    });
    let shutdown = CancellationToken::new();
    let api_open = listener::api::OpenConnections::new(shared.config.api_max_connections);

    let mut threads = Vec::with_capacity(shared.shards.len());
    for id in 0..shared.shards.len() {
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || match shard::reactor::run(id, shared) {
                Ok(latency) => Some(latency),
                Err(e) => {
                    tracing::error!(shard = id, error = %e, "shard failed to start");
                    None
                }
            })
            .map_err(StartError::Thread)?;
        threads.push(t);
    }

    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(shared.config.io_threads)
        .thread_name("io")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    {
        let _guard = io.enter();
        let client = tokio::net::TcpListener::from_std(client).map_err(StartError::Runtime)?;
        let api = tokio::net::TcpListener::from_std(api).map_err(StartError::Runtime)?;
        io.spawn(listener::client::serve(client, tls, shared.clone(), shutdown.clone()));
        io.spawn(listener::api::serve(api, api_tls, shared.clone(), api_open.clone(), shutdown.clone()));
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
    Ok(Running { client_addr, api_addr, shared, shutdown, api_open, shards: threads, io: Some(io) })
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
        for t in self.shards.drain(..) {
            if let Ok(Some(l)) = t.join() {
                merged.merge(&l);
            }
        }
        if let Some(io) = self.io.take() {
            io.shutdown_timeout(std::time::Duration::from_millis(500));
        }
        merged
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
