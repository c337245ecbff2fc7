//! Command-line flags (clap, each with its `SWITCHYARD_*` env var) parsed raw
//! into [`Flags`], then validated into an immutable [`Config`].
//!
//! Validation refuses configurations that would be unsafe to run (an
//! anonymous client listener or an unauthenticated API on a non-loopback
//! address) with a [`ConfigError`] naming the flag; `main` turns that into
//! exit status 2, as clap does for malformed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use thiserror::Error;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// switchyard: a sharded, lock-free WebSocket event broker.
///
/// Every flag can also be set through the environment variable shown.
/// Durations are written like 500ms, 25s, 5m; sizes are bytes or take a
/// KiB/MiB suffix.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "switchyard",
    version,
    about,
    long_about = None,
    after_help = "Subcommands:\n  switchyard token --user ID [--ttl 1h] (--jwt-secret S | --jwt-secret-file F)\n      print an HS256 client token this broker accepts\n  switchyard check-config [flags]\n      validate flags and files as start-up does, exit 0 or 2, without listening"
)]
pub struct Flags {
    /// Client listener: GET /ws (WebSocket) and GET /healthz.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// API listener: /v1/*, /metrics, /debug/*.
    #[arg(long, env = "SWITCHYARD_API_LISTEN", default_value = "127.0.0.1:8081")]
    pub api_listen: SocketAddr,

    /// Number of shards (reactor threads); default: available cores.
    #[arg(long, env = "SWITCHYARD_SHARDS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: Option<u16>,

    /// Threads accepting on the listeners and running client handshakes (API
    /// connections are served on the shard threads).
    #[arg(long, env = "SWITCHYARD_IO_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,

    /// Slots in each shard's ring (an event or a command each); a full ring answers 503.
    #[arg(long, env = "SWITCHYARD_RING_CAPACITY", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    pub ring_capacity: u32,

    /// HS256 secret for client JWTs. Without a secret the broker runs in dev mode.
    #[arg(long, env = "SWITCHYARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// File holding the HS256 secret (trailing newline ignored).
    #[arg(long, env = "SWITCHYARD_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Allow dev mode (user from ?user=) on a non-loopback --listen.
    #[arg(long, env = "SWITCHYARD_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Bearer key required on /v1/*. Without it the API listener must be loopback.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Interval between server WebSocket pings.
    #[arg(long, env = "SWITCHYARD_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// Close (4002) a client that sent nothing for this long.
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Time a client has to send its complete upgrade request.
    #[arg(long, env = "SWITCHYARD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Most client sockets still in their handshake at once; more get 503 at once.
    #[arg(long, env = "SWITCHYARD_MAX_PENDING_HANDSHAKES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_pending_handshakes: u32,

    /// Comma-separated browser origins allowed to open /ws (exact match, e.g.
    /// https://app.example.com); `*` or unset allows any. Requests without an
    /// Origin header (non-browser clients) are always allowed.
    #[arg(long, env = "SWITCHYARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most client connections; further upgrades get 503.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most connections per user; a new one evicts the oldest (close 4001).
    #[arg(long, env = "SWITCHYARD_MAX_CONNS_PER_USER", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_conns_per_user: u32,

    /// Frames queued per connection before the slow-consumer policy applies.
    #[arg(long, env = "SWITCHYARD_MAX_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_queue: u32,

    /// Largest publish object accepted, as received.
    #[arg(long, env = "SWITCHYARD_MAX_PAYLOAD", default_value = "64KiB", value_parser = parse_size)]
    pub max_payload: usize,

    /// Bytes of queued frames per connection (control frames and error
    /// replies included) before the slow-consumer policy applies.
    #[arg(long, env = "SWITCHYARD_MAX_QUEUE_BYTES", default_value = "4MiB", value_parser = parse_size)]
    pub max_queue_bytes: usize,

    /// Events kept per user for resume.
    #[arg(long, env = "SWITCHYARD_HISTORY_SIZE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub history_size: u32,

    /// Bytes of encoded events kept per user for resume.
    #[arg(long, env = "SWITCHYARD_HISTORY_BYTES", default_value = "1MiB", value_parser = parse_size)]
    pub history_bytes: usize,

    /// Bytes of history across all users; past it the oldest events are evicted.
    #[arg(long, env = "SWITCHYARD_HISTORY_MEMORY", default_value = "1GiB", value_parser = parse_size)]
    pub history_memory: usize,

    /// How long events are kept, and how long an idle user's state lives.
    #[arg(long, env = "SWITCHYARD_HISTORY_TTL", default_value = "300s", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// How long shutdown waits for queued frames to flush.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Comma-separated keys removed from event data at any depth.
    #[arg(long, env = "SWITCHYARD_REDACT_KEYS", value_delimiter = ',')]
    pub redact_keys: Vec<String>,

    /// Directory for .hgrm dumps (SIGUSR1 and shutdown).
    #[arg(long, env = "SWITCHYARD_HIST_DIR")]
    pub hist_dir: Option<PathBuf>,

    /// Also append an interval log (.hlog) to --hist-dir at this interval.
    #[arg(long, env = "SWITCHYARD_HIST_INTERVAL", value_parser = parse_duration)]
    pub hist_interval: Option<Duration>,

    /// Conformance aid, off by default: a WebSocket upgrade to this path (e.g.
    /// /echo) gets no auth and no events; its data frames are echoed back on
    /// the same connection stack clients use (for the Autobahn TestSuite).
    /// Messages up to 16 MiB are accepted there.
    #[arg(long, env = "SWITCHYARD_ECHO_PATH")]
    pub echo_path: Option<String>,

    /// PEM certificate chain for the client listener; with --tls-key, clients connect with wss://.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for --tls-cert.
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Keep every user's seq, epoch, history and idempotency keys on disk in
    /// this directory (created if missing), so a restart loses nothing.
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// With --data-dir: `always` (answer and deliver only after fsync;
    /// group-committed), a duration such as `100ms` (fsync at least that
    /// often), or `never` (leave it to the OS). Default: always.
    #[arg(long, env = "SWITCHYARD_FSYNC", value_parser = parse_fsync)]
    pub fsync: Option<Fsync>,

    /// With --data-dir: size at which a shard's log starts a new segment file.
    #[arg(long, env = "SWITCHYARD_SEGMENT_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub segment_size: usize,

    /// Allow --echo-path on a non-loopback --listen (it needs no auth and
    /// takes 16 MiB messages, so it is refused there by default).
    #[arg(long, env = "SWITCHYARD_ALLOW_PUBLIC_ECHO")]
    pub allow_public_echo: bool,

    /// Most API connections (keep-alive and publisher streams) open at once;
    /// more get 503 at once.
    #[arg(long, env = "SWITCHYARD_API_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub api_max_connections: u32,

    /// PEM certificate chain for the API listener; with --api-tls-key, it serves https:// and wss://.
    #[arg(long, env = "SWITCHYARD_API_TLS_CERT", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,

    /// PEM private key for --api-tls-cert.
    #[arg(long, env = "SWITCHYARD_API_TLS_KEY", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,

    /// Run as one node of a cluster on Redis: `redis://[user:pass@]HOST:PORT[/DB]`,
    /// `rediss://` for TLS, or `redis+cluster://H1:P1,H2:P2,...` for a Redis
    /// Cluster. Redis then holds every user's seq, epoch, history and
    /// idempotency keys, and its Pub/Sub carries events between nodes.
    #[arg(long, env = "SWITCHYARD_CLUSTER")]
    pub cluster: Option<String>,

    /// With --cluster: the prefix of every Redis key and channel; nodes with
    /// the same URL and prefix are one broker.
    #[arg(long, env = "SWITCHYARD_CLUSTER_PREFIX", default_value = "sy")]
    pub cluster_prefix: String,

    /// With --cluster: this node's name (letters, digits, `.`, `_`, `-`; up to
    /// 64). Default: generated at start.
    #[arg(long, env = "SWITCHYARD_NODE_ID")]
    pub node_id: Option<String>,

    /// Log format: pretty or json (level from RUST_LOG).
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
}

/// When the disk engine syncs (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Every(Duration),
    Never,
}

/// Parses `always`, `never` or a duration.
pub fn parse_fsync(raw: &str) -> Result<Fsync, String> {
    match raw.trim() {
        "always" => Ok(Fsync::Always),
        "never" => Ok(Fsync::Never),
        other => match parse_duration(other) {
            Ok(d) if !d.is_zero() => Ok(Fsync::Every(d)),
            Ok(_) => Err("use always, never, or a duration above zero (e.g. 100ms)".into()),
            Err(_) => Err(format!("{other:?} is not always, never or a duration (e.g. 100ms)")),
        },
    }
}

/// A refused configuration, naming the flag responsible.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--listen {0} is not loopback and no --jwt-secret is set: dev mode would let anyone connect as any user; set --jwt-secret or pass --allow-anonymous")]
    AnonymousNonLoopback(SocketAddr),
    #[error("--api-listen {0} is not loopback and no --api-key is set: anyone could publish; set --api-key")]
    OpenApi(SocketAddr),
    #[error("--jwt-secret-file {path}: {source}")]
    SecretFile { path: PathBuf, source: std::io::Error },
    #[error("--jwt-secret must not be empty")]
    EmptySecret,
    #[error("--api-key must not be empty")]
    EmptyApiKey,
    #[error("--{flag} {value:?} is longer than the most it accepts ({max:?})")]
    TooLong { flag: &'static str, value: Duration, max: Duration },
    #[error("--fsync needs --data-dir (without it nothing is written to disk)")]
    FsyncWithoutDataDir,
    #[error("--segment-size must be between 64KiB and 1GiB")]
    SegmentSize,
    #[error("--max-payload {0} is over the most accepted (16 MiB)")]
    PayloadTooLarge(usize),
    #[error("--max-queue-bytes must be at least --max-payload plus 64 bytes, or no event could be queued")]
    QueueBytesBelowPayload,
    #[error("--echo-path on a non-loopback --listen {0}: echo connections need no auth and take 16 MiB messages; pass --allow-public-echo to allow it")]
    PublicEcho(SocketAddr),
    #[error(
        "--idle-timeout must be longer than --ping-interval, or idle clients are cut before they are pinged"
    )]
    IdleBeforePing,
    #[error("--{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error("--hist-interval needs --hist-dir")]
    IntervalWithoutDir,
    #[error("--echo-path {0:?} must start with '/' and not be /ws or /healthz")]
    EchoPath(String),
    #[error("--cluster {0:?}: {1}")]
    ClusterUrl(String, String),
    #[error("--data-dir and --cluster together: in cluster mode Redis is the store; drop one")]
    DataDirInCluster,
    #[error("--cluster-prefix {0:?} must be 1-64 letters, digits, '.', '_', '-' or ':'")]
    ClusterPrefix(String),
    #[error("--node-id {0:?} must be 1-64 letters, digits, '.', '_' or '-'")]
    NodeId(String),
    #[error("--{0} needs --cluster")]
    NeedsCluster(&'static str),
}

/// Largest `--max-payload` accepted: a batch holds 1,000 of them, and a
/// stream message is capped at 64 MiB.
const MAX_PAYLOAD_LIMIT: usize = 16 << 20;

/// Validated, immutable broker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub shards: usize,
    pub io_threads: usize,
    pub ring_capacity: usize,
    /// HS256 secret; `None` is dev mode.
    pub jwt_secret: Option<Vec<u8>>,
    pub api_key: Option<String>,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_pending_handshakes: usize,
    /// Lower-cased allowed origins; empty = any.
    pub allowed_origins: Vec<String>,
    pub max_connections: usize,
    pub max_conns_per_user: usize,
    pub max_queue: usize,
    pub max_queue_bytes: usize,
    pub max_payload: usize,
    pub history_size: usize,
    pub history_bytes: usize,
    pub history_memory: usize,
    pub api_max_connections: usize,
    pub history_ttl: Duration,
    pub drain_timeout: Duration,
    pub redact_keys: Vec<String>,
    pub hist_dir: Option<PathBuf>,
    pub hist_interval: Option<Duration>,
    /// Path whose upgrades are echo connections (conformance aid).
    pub echo_path: Option<String>,
    /// Certificate chain and key files for TLS on the client listener.
    pub tls: Option<TlsFiles>,
    /// Certificate chain and key files for TLS on the API listener.
    pub api_tls: Option<TlsFiles>,
    /// `--data-dir`, with its sync policy and segment size.
    pub data: Option<DataConfig>,
    /// `--cluster`: the Redis engine's settings.
    pub cluster: Option<ClusterConfig>,
    pub log_format: LogFormat,
}

/// The disk engine's settings.
#[derive(Debug, Clone)]
pub struct DataConfig {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub segment_size: u64,
}

/// Where a cluster's Redis is (`--cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis or Valkey: the URL as given (`redis://` or `rediss://`).
    Single(String),
    /// A Redis Cluster: one `redis://HOST:PORT` URL per seed node.
    Cluster(Vec<String>),
}

/// The Redis engine's settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub target: RedisTarget,
    /// `--cluster-prefix`.
    pub prefix: String,
    /// `--node-id`, or one generated at start.
    pub node_id: String,
}

/// Parses a `--cluster` URL.
pub fn parse_cluster_url(raw: &str) -> Result<RedisTarget, String> {
    let raw = raw.trim();
    if let Some(rest) = raw.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| format!("redis://{n}"))
            .collect();
        if nodes.is_empty() {
            return Err("redis+cluster:// needs at least one HOST:PORT".into());
        }
        for n in &nodes {
            check_host_port(&n["redis://".len()..])?;
        }
        return Ok(RedisTarget::Cluster(nodes));
    }
    let rest = raw
        .strip_prefix("redis://")
        .or_else(|| raw.strip_prefix("rediss://"))
        .ok_or("use redis://, rediss:// or redis+cluster://")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    check_host_port(host_port)?;
    Ok(RedisTarget::Single(raw.to_string()))
}

/// `HOST:PORT` with a non-empty host and a numeric port.
fn check_host_port(raw: &str) -> Result<(), String> {
    let (host, port) = raw.rsplit_once(':').ok_or_else(|| format!("{raw:?} has no :PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{raw:?} is not HOST:PORT"));
    }
    Ok(())
}

fn valid_name(raw: &str, extra: &[u8]) -> bool {
    (1..=64).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
}

/// Validates the cluster flags into a [`ClusterConfig`] (`None` without `--cluster`).
fn cluster_config(f: &Flags) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(url) = &f.cluster else {
        if f.node_id.is_some() {
            return Err(ConfigError::NeedsCluster("node-id"));
        }
        return Ok(None);
    };
    let target = parse_cluster_url(url).map_err(|e| ConfigError::ClusterUrl(url.clone(), e))?;
    if f.data_dir.is_some() {
        return Err(ConfigError::DataDirInCluster);
    }
    if !valid_name(&f.cluster_prefix, b":") {
        return Err(ConfigError::ClusterPrefix(f.cluster_prefix.clone()));
    }
    let node_id = match &f.node_id {
        Some(n) if valid_name(n, b"") => n.clone(),
        Some(n) => return Err(ConfigError::NodeId(n.clone())),
        None => {
            let mut raw = [0u8; 6];
            getrandom::fill(&mut raw).map_err(|e| ConfigError::NodeId(format!("<random: {e}>")))?;
            format!("n-{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    };
    Ok(Some(ClusterConfig { target, prefix: f.cluster_prefix.clone(), node_id }))
}

/// The PEM files named by `--tls-cert` and `--tls-key` (read at start-up).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The flags' common stem (`tls` or `api-tls`), for error messages.
    pub flag: &'static str,
}

impl Config {
    /// Validates raw flags into a configuration.
    pub fn from_flags(f: Flags) -> Result<Config, ConfigError> {
        let jwt_secret = match (&f.jwt_secret, &f.jwt_secret_file) {
            (Some(s), _) => Some(s.clone().into_bytes()),
            (None, Some(path)) => {
                let raw = std::fs::read(path)
                    .map_err(|source| ConfigError::SecretFile { path: path.clone(), source })?;
                let trimmed = raw.trim_ascii_end().to_vec();
                Some(trimmed)
            }
            (None, None) => None,
        };
        if jwt_secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(ConfigError::EmptySecret);
        }
        if f.api_key.as_ref().is_some_and(|k| k.is_empty()) {
            return Err(ConfigError::EmptyApiKey);
        }
        if jwt_secret.is_none() && !f.listen.ip().is_loopback() && !f.allow_anonymous {
            return Err(ConfigError::AnonymousNonLoopback(f.listen));
        }
        if f.api_key.is_none() && !f.api_listen.ip().is_loopback() {
            return Err(ConfigError::OpenApi(f.api_listen));
        }
        const HOUR: u64 = 3600;
        for (flag, d, max_secs, may_be_zero) in [
            ("ping-interval", f.ping_interval, HOUR, false),
            ("idle-timeout", f.idle_timeout, 24 * HOUR, false),
            ("handshake-timeout", f.handshake_timeout, 600, false),
            ("history-ttl", f.history_ttl, 30 * 24 * HOUR, false),
            ("drain-timeout", f.drain_timeout, HOUR, true),
            ("hist-interval", f.hist_interval.unwrap_or(Duration::from_secs(1)), 24 * HOUR, false),
        ] {
            if d.is_zero() && !may_be_zero {
                return Err(ConfigError::Zero { flag });
            }
            let max = Duration::from_secs(max_secs);
            if d > max {
                return Err(ConfigError::TooLong { flag, value: d, max });
            }
        }
        if f.max_queue_bytes < f.max_payload.saturating_add(64) {
            return Err(ConfigError::QueueBytesBelowPayload);
        }
        if f.history_memory == 0 {
            return Err(ConfigError::Zero { flag: "history-memory" });
        }
        if f.fsync.is_some() && f.data_dir.is_none() {
            return Err(ConfigError::FsyncWithoutDataDir);
        }
        if !(64 << 10..=1 << 30).contains(&f.segment_size) {
            return Err(ConfigError::SegmentSize);
        }
        if f.echo_path.is_some() && !f.listen.ip().is_loopback() && !f.allow_public_echo {
            return Err(ConfigError::PublicEcho(f.listen));
        }
        if f.max_connections == 0 {
            return Err(ConfigError::Zero { flag: "max-connections" });
        }
        if f.max_payload == 0 {
            return Err(ConfigError::Zero { flag: "max-payload" });
        }
        if f.max_payload > MAX_PAYLOAD_LIMIT {
            return Err(ConfigError::PayloadTooLarge(f.max_payload));
        }
        if f.idle_timeout <= f.ping_interval {
            return Err(ConfigError::IdleBeforePing);
        }
        if f.hist_interval.is_some() && f.hist_dir.is_none() {
            return Err(ConfigError::IntervalWithoutDir);
        }
        if let Some(p) = &f.echo_path {
            if !p.starts_with('/') || p.contains('?') || p == "/ws" || p == "/healthz" {
                return Err(ConfigError::EchoPath(p.clone()));
            }
        }
        let cluster = cluster_config(&f)?;
        let shards = match f.shards {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(Config {
            listen: f.listen,
            api_listen: f.api_listen,
            shards,
            io_threads: f.io_threads as usize,
            ring_capacity: f.ring_capacity as usize,
            jwt_secret,
            api_key: f.api_key,
            ping_interval: f.ping_interval,
            idle_timeout: f.idle_timeout,
            handshake_timeout: f.handshake_timeout,
            max_pending_handshakes: f.max_pending_handshakes as usize,
            allowed_origins: normalize_origins(f.allowed_origins),
            max_connections: f.max_connections,
            max_conns_per_user: f.max_conns_per_user as usize,
            max_queue: f.max_queue as usize,
            max_queue_bytes: f.max_queue_bytes,
            max_payload: f.max_payload,
            history_size: f.history_size as usize,
            history_bytes: f.history_bytes,
            history_memory: f.history_memory,
            api_max_connections: f.api_max_connections as usize,
            history_ttl: f.history_ttl,
            drain_timeout: f.drain_timeout,
            redact_keys: f.redact_keys,
            hist_dir: f.hist_dir,
            hist_interval: f.hist_interval,
            echo_path: f.echo_path,
            tls: f.tls_cert.zip(f.tls_key).map(|(cert, key)| TlsFiles { cert, key, flag: "tls" }),
            data: f.data_dir.map(|dir| DataConfig {
                dir,
                fsync: f.fsync.unwrap_or(Fsync::Always),
                segment_size: f.segment_size as u64,
            }),
            api_tls: f.api_tls_cert.zip(f.api_tls_key).map(|(cert, key)| TlsFiles {
                cert,
                key,
                flag: "api-tls",
            }),
            cluster,
            log_format: f.log_format,
        })
    }

    /// A configuration for tests and embedding: loopback, ephemeral ports, defaults otherwise.
    pub fn for_tests() -> Config {
        let flags =
            Flags::parse_from(["switchyard", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
        // Loopback and default values always validate.
        Config::from_flags(flags).unwrap_or_else(|e| unreachable!("default test config: {e}"))
    }
}

/// Lower-cases and trims origins; `*` anywhere means any origin (empty list).
fn normalize_origins(raw: Vec<String>) -> Vec<String> {
    let list: Vec<String> = raw
        .iter()
        .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
        .filter(|o| !o.is_empty())
        .collect();
    if list.iter().any(|o| o == "*") {
        Vec::new()
    } else {
        list
    }
}

/// Parses `500ms`, `25s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{raw:?} is not a duration (examples: 500ms, 25s, 5m)"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown duration unit {other:?} (use ms, s, m or h)")),
    };
    Ok(d)
}

/// Parses `65536`, `64KiB`, `1MiB` (also `KB`/`MB` as binary units).
pub fn parse_size(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: usize =
        num.parse().map_err(|_| format!("{raw:?} is not a size (examples: 65536, 64KiB, 1MiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1024,
        "MiB" | "MB" | "M" => 1024 * 1024,
        "GiB" | "GB" | "G" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{raw:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(extra: &[&str]) -> Flags {
        let mut args = vec!["switchyard"];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args).unwrap()
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("25s").unwrap(), Duration::from_secs(25));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("1TiB").is_err());
    }

    #[test]
    fn defaults_validate() {
        let c = Config::from_flags(flags(&[])).unwrap();
        assert_eq!(c.max_queue, 1024);
        assert_eq!(c.max_payload, 64 * 1024);
        assert!(c.jwt_secret.is_none());
    }

    #[test]
    fn refuses_unsafe_exposure() {
        let e = Config::from_flags(flags(&["--listen", "0.0.0.0:8080"])).unwrap_err();
        assert!(e.to_string().contains("--listen"));
        assert!(Config::from_flags(flags(&["--listen", "0.0.0.0:8080", "--allow-anonymous"])).is_ok());
        assert!(Config::from_flags(flags(&["--listen", "0.0.0.0:8080", "--jwt-secret", "s"])).is_ok());
        let e = Config::from_flags(flags(&["--api-listen", "0.0.0.0:8081"])).unwrap_err();
        assert!(e.to_string().contains("--api-listen"));
        assert!(Config::from_flags(flags(&["--api-listen", "0.0.0.0:8081", "--api-key", "k"])).is_ok());
    }

    #[test]
    fn regression_max_queue_64_alone_starts() {
        // History (1024) larger than the queue used to be refused.
        assert!(Config::from_flags(flags(&["--max-queue", "64"])).is_ok());
    }

    #[test]
    fn absurd_durations_are_refused_with_the_flag() {
        let e = Config::from_flags(flags(&["--history-ttl", "99999999999h"])).unwrap_err();
        assert!(e.to_string().contains("--history-ttl"), "{e}");
        let e = Config::from_flags(flags(&["--ping-interval", "2h", "--idle-timeout", "3h"])).unwrap_err();
        assert!(e.to_string().contains("--ping-interval"), "{e}");
    }

    #[test]
    fn public_echo_needs_explicit_permission() {
        let public = ["--listen", "0.0.0.0:0", "--allow-anonymous", "--echo-path", "/echo"];
        let e = Config::from_flags(flags(&public)).unwrap_err();
        assert!(e.to_string().contains("--allow-public-echo"), "{e}");
        let mut allowed = public.to_vec();
        allowed.push("--allow-public-echo");
        assert!(Config::from_flags(flags(&allowed)).is_ok());
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = Config::from_flags(flags(&["--echo-path", "/ws"])).unwrap_err();
        assert!(e.to_string().contains("--echo-path"), "{e}");
        assert!(Config::from_flags(flags(&["--echo-path", "/echo"])).is_ok());
        let e = Flags::try_parse_from(["switchyard", "--tls-cert", "c.pem"]).unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");
        let e = Flags::try_parse_from(["switchyard", "--ping-interval", "soon"]).unwrap_err();
        assert!(e.to_string().contains("--ping-interval"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }
}
