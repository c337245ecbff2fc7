//! The command connection to Redis: one multiplexed connection (or a
//! cluster connection) shared by every thread, which pipelines concurrent
//! calls on one socket, with a deadline on every call and the engine's
//! health kept up to date by what calls see.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, ServerErrorKind, Value};

use super::scripts::Script;
use super::EngineError;
use crate::config::RedisTarget;

/// Longest a call may take before it counts as failed (its outcome unknown).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to a single Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What the engine knows about Redis's reachability.
#[derive(Default)]
pub struct Health {
    /// The last call (or ping) reached Redis.
    up: AtomicBool,
    /// The Pub/Sub connection is subscribed.
    pubsub: AtomicBool,
    /// Round-trip time of the last ping, µs.
    pub rtt_us: AtomicU64,
    /// Calls that failed (unreachable, timed out, refused).
    pub failures: AtomicU64,
}

impl Health {
    pub fn is_up(&self) -> bool {
        // Relaxed: a hint for admission; a stale read only delays a 503 by one call.
        self.up.load(Ordering::Relaxed)
    }

    /// Commands and Pub/Sub both reach Redis: the node is ready.
    pub fn is_ready(&self) -> bool {
        self.is_up() && self.pubsub.load(Ordering::Relaxed)
    }

    pub fn set_pubsub(&self, up: bool) {
        self.pubsub.store(up, Ordering::Relaxed);
    }

    pub fn set(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!("Redis is reachable");
            } else {
                tracing::warn!("Redis is unreachable");
            }
        }
    }
}

impl Link {
    /// Connects; a single Redis is connected lazily (the node starts, and
    /// reports not ready, while Redis is down), a cluster needs a seed node
    /// up at start to learn its slots.
    pub async fn open(target: &RedisTarget) -> Result<Link, EngineError> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(EngineError::from_redis)?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CALL_TIMEOUT))
                    .set_response_timeout(Some(CALL_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let mgr =
                    ConnectionManager::new_lazy_with_config(client, cfg).map_err(EngineError::from_redis)?;
                Ok(Link::Single(mgr))
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .connection_timeout(CALL_TIMEOUT)
                    .response_timeout(CALL_TIMEOUT)
                    .retries(2)
                    .build()
                    .map_err(EngineError::from_redis)?;
                let conn = client.get_async_connection().await.map_err(EngineError::from_redis)?;
                Ok(Link::Cluster(conn))
            }
        }
    }

    /// Runs one command within [`CALL_TIMEOUT`], recording reachability.
    pub async fn call(&self, cmd: &Cmd, health: &Health) -> Result<Value, EngineError> {
        let r = match self.clone() {
            Link::Single(mut c) => tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<Value>(&mut c)).await,
            Link::Cluster(mut c) => {
                tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<Value>(&mut c)).await
            }
        };
        Self::settle(r, health)
    }

    /// Runs a pipeline as one request (so its commands run in order; in a
    /// Redis Cluster its keys must share a slot) within [`CALL_TIMEOUT`].
    /// Errors of single commands come back as `Value::ServerError` items.
    pub async fn pipeline(&self, pipe: &Pipeline, health: &Health) -> Result<Vec<Value>, EngineError> {
        let r = match self.clone() {
            Link::Single(mut c) => {
                tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<Vec<Value>>(&mut c)).await
            }
            Link::Cluster(mut c) => {
                tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<Vec<Value>>(&mut c)).await
            }
        };
        Self::settle(r, health)
    }

    /// Maps a call's outcome to the engine's errors and records reachability.
    fn settle<T>(
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        health: &Health,
    ) -> Result<T, EngineError> {
        let r = match r {
            Ok(r) => r.map_err(EngineError::from_redis),
            Err(_) => Err(EngineError::Unavailable("Redis did not answer in time".into())),
        };
        match &r {
            Ok(_) => health.set(true),
            Err(EngineError::Unavailable(_)) => {
                health.failures.fetch_add(1, Ordering::Relaxed);
                health.set(false);
            }
            Err(_) => {}
        }
        r
    }

    /// Runs a script by SHA, sending its body when Redis does not know it.
    pub async fn eval(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
        health: &Health,
    ) -> Result<Value, EngineError> {
        let build = |verb: &str, first: &str| {
            let mut c = redis::cmd(verb);
            c.arg(first).arg(keys.len());
            for k in keys {
                c.arg(*k);
            }
            for a in args {
                c.arg(*a);
            }
            c
        };
        match self.call(&build("EVALSHA", &script.sha), health).await {
            Err(EngineError::NoScript) => self.call(&build("EVAL", &script.body), health).await,
            other => other,
        }
    }

    /// Pings Redis; returns the round trip.
    pub async fn ping(&self, health: &Health) -> Result<Duration, EngineError> {
        let t = Instant::now();
        self.call(&redis::cmd("PING"), health).await?;
        let rtt = t.elapsed();
        health.rtt_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
        Ok(rtt)
    }
}

impl EngineError {
    pub(crate) fn from_redis(e: redis::RedisError) -> EngineError {
        match e.kind() {
            ErrorKind::Server(ServerErrorKind::NoScript) => EngineError::NoScript,
            ErrorKind::Server(_)
            | ErrorKind::Extension
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Parse => EngineError::Refused(e.to_string()),
            _ => EngineError::Unavailable(e.to_string()),
        }
    }
}
