//! The Redis engine (`--cluster`): every node started with the same Redis
//! and prefix is one broker. Redis holds each user's seq, epoch, history,
//! idempotency keys and live-connection list; its Pub/Sub carries events
//! between nodes.
//!
//! What it owns: the command link ([`link`]), the scripts that change a
//! user's state atomically ([`scripts`]), key names ([`keys`]) and the
//! subscriber ([`live`]). It knows nothing about sockets or shards: the
//! publish path calls [`Engine::publish`], a shard calls [`Engine::sync`] when
//! a connection arrives or a gap shows, and decoded Pub/Sub messages go to
//! a [`live::Sink`] the broker supplies.
//!
//! Client crate: `redis` (redis-rs), the most used and maintained Rust
//! client, with a multiplexed connection that pipelines concurrent calls
//! on one socket (so concurrent publishes share round trips), async Pub/Sub,
//! Redis Cluster support and rustls; `fred` would do too, but carries its
//! own runtime layer we do not need.

pub mod keys;
pub mod link;
pub mod live;
pub mod scripts;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, RedisTarget};
use crate::protocol::{Priority, UserId};
use keys::Keys;
use link::{Health, Link};
use scripts::Scripts;

/// How often a node pings Redis and marks itself alive.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// A node not heard from for this long is gone (its connections no longer count).
const NODE_ALIVE_MS: u64 = 5_000;

/// Why the engine could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Redis could not be reached or did not answer in time: the outcome of
    /// a write is unknown.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error.
    #[error("Redis refused the call: {0}")]
    Refused(String),
    /// Redis does not know the script (handled inside [`link`]).
    #[error("script not loaded")]
    NoScript,
    /// Redis answered something the engine cannot read.
    #[error("unexpected reply from Redis: {0}")]
    Reply(&'static str),
}

/// An event as the publish path hands it to the engine.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    /// The event JSON after its seq: `,"event":…,"ts":…}`.
    pub tail: &'a [u8],
    pub priority: Priority,
    /// When the publish was accepted, unix µs (for cross-node latency).
    pub at_us: u64,
}

/// One event for one user, as [`Engine::publish_many`] takes it.
pub struct PublishItem<'a> {
    pub user: &'a UserId,
    pub ev: Outgoing<'a>,
    pub id: Option<&'a str>,
}

/// What the publish script did.
#[derive(Debug, Clone, Copy)]
pub struct Assigned {
    pub seq: u64,
    pub duplicate: bool,
    /// Nodes that received the event on the user's channel.
    pub nodes: u32,
}

/// One event read back from a user's history.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub priority: Priority,
    pub at_us: u64,
    pub body: Bytes,
}

/// A user's state as read by [`Engine::sync`].
#[derive(Debug)]
pub struct Synced {
    pub epoch: Arc<str>,
    pub seq: u64,
    /// Held events from the requested seq on, in order (may start later if
    /// history was trimmed).
    pub events: Vec<StoredEvent>,
}

/// `GET /v1/users/{id}` across the cluster.
#[derive(Debug, Clone)]
pub struct UserFigures {
    pub epoch: String,
    pub seq: u64,
    pub history: u64,
    /// Redis's own estimate of the history's memory (`MEMORY USAGE`).
    pub history_bytes: u64,
    /// Live connections on nodes that are alive.
    pub connections: u64,
}

/// The engine: one per node, shared by every thread.
pub struct Engine {
    link: Link,
    keys: Keys,
    scripts: Scripts,
    pub node_id: String,
    pub health: Arc<Health>,
    maxlen: String,
    ttl_ms: String,
    max_conns: String,
    /// Prefix of the epochs this node creates (the process's boot id).
    boot: String,
    epochs: AtomicU64,
    nodes_seen: AtomicU64,
    /// Redis is known to hold the scripts (reset by any failure).
    scripts_loaded: std::sync::atomic::AtomicBool,
    requests: mpsc::UnboundedSender<live::Request>,
}

/// The parts the subscriber task needs, handed out once at start.
pub struct Subscriber {
    clients: Vec<redis::Client>,
    keys: Keys,
    health: Arc<Health>,
    requests: mpsc::UnboundedReceiver<live::Request>,
}

impl Subscriber {
    /// Runs the node's Pub/Sub subscriber, feeding `sink`.
    pub async fn run(self, sink: Arc<dyn live::Sink>) {
        live::run(self.clients, self.keys, sink, self.requests, self.health).await
    }
}

impl Engine {
    /// Opens the engine for `config` (which must have `--cluster`).
    pub async fn open(config: &Config, boot: &str) -> Result<(Arc<Engine>, Subscriber), EngineError> {
        let cc = config.cluster.as_ref().ok_or(EngineError::Reply("no --cluster"))?;
        let link = Link::open(&cc.target).await?;
        let urls: Vec<&str> = match &cc.target {
            RedisTarget::Single(u) => vec![u.as_str()],
            RedisTarget::Cluster(nodes) => nodes.iter().map(String::as_str).collect(),
        };
        let clients = urls
            .into_iter()
            .map(|u| redis::Client::open(u).map_err(EngineError::from_redis))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let health = Arc::new(Health::default());
        let engine = Engine {
            link,
            keys: Keys::new(&cc.prefix),
            scripts: Scripts::default(),
            node_id: cc.node_id.clone(),
            health: health.clone(),
            maxlen: config.history_size.to_string(),
            ttl_ms: config.history_ttl.as_millis().max(1).to_string(),
            max_conns: config.max_conns_per_user.to_string(),
            boot: boot.to_string(),
            epochs: AtomicU64::new(0),
            nodes_seen: AtomicU64::new(0),
            scripts_loaded: std::sync::atomic::AtomicBool::new(false),
            requests: tx,
        };
        let sub = Subscriber { clients, keys: engine.keys.clone(), health, requests: rx };
        Ok((Arc::new(engine), sub))
    }

    /// A new epoch no node has used (this boot's random prefix, `r`, a counter).
    fn fresh_epoch(&self) -> String {
        // Relaxed: uniqueness needs only the atomic increment.
        let n = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}r{n}", self.boot)
    }

    /// The `<node>/<conn>` name of one of this node's connections.
    pub fn member(&self, conn: &str) -> String {
        format!("{}/{conn}", self.node_id)
    }

    /// The connection id in `member`, if it is one of this node's.
    pub fn local_conn<'a>(&self, member: &'a str) -> Option<&'a str> {
        member.strip_prefix(&self.node_id)?.strip_prefix('/')
    }

    /// Nodes heard from in the last few seconds (including this one).
    pub fn nodes_seen(&self) -> u64 {
        self.nodes_seen.load(Ordering::Relaxed)
    }

    /// Assigns the user's next seq, appends to history, records `id` and
    /// publishes to the user's channel, atomically.
    pub async fn publish(
        &self,
        user: &UserId,
        ev: &Outgoing<'_>,
        id: Option<&str>,
    ) -> Result<Assigned, EngineError> {
        let item = PublishItem { user, ev: *ev, id };
        self.publish_many(std::slice::from_ref(&item))
            .await
            .pop()
            .unwrap_or(Err(EngineError::Reply("no result")))
    }

    /// Publishes many events; results in the order given. Each user's
    /// events go as one pipeline (one request, run by Redis in order, in one
    /// hash slot), so a user's seqs follow the given order whatever the
    /// client library does with concurrent requests; different users'
    /// pipelines go out together and share round trips.
    pub async fn publish_many(&self, items: &[PublishItem<'_>]) -> Vec<Result<Assigned, EngineError>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut index: std::collections::HashMap<&UserId, usize> = std::collections::HashMap::new();
        for (i, it) in items.iter().enumerate() {
            let g = *index.entry(it.user).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        let calls = groups.iter().map(|g| self.publish_user(g.iter().map(|&i| &items[i]).collect()));
        let mut out: Vec<Result<Assigned, EngineError>> =
            (0..items.len()).map(|_| Err(EngineError::Reply("no result"))).collect();
        for (g, results) in groups.iter().zip(futures_util::future::join_all(calls).await) {
            for (&i, r) in g.iter().zip(results) {
                out[i] = r;
            }
        }
        out
    }

    /// One user's publishes as one pipeline. Scripts go by SHA once Redis is
    /// known to hold them; after a failure (Redis may have restarted and
    /// lost its script cache) by body until one succeeds, so a pipeline's
    /// commands never half-fail for a missing script. A `NOSCRIPT` anyway
    /// (an operator's `SCRIPT FLUSH`) is retried by body for those items.
    async fn publish_user(&self, items: Vec<&PublishItem<'_>>) -> Vec<Result<Assigned, EngineError>> {
        let by_body = !self.scripts_loaded.load(Ordering::Relaxed);
        let mut results = self.publish_pipeline(&items, by_body).await;
        let missing: Vec<usize> =
            (0..results.len()).filter(|&i| matches!(results[i], Err(EngineError::NoScript))).collect();
        if !missing.is_empty() {
            self.scripts_loaded.store(false, Ordering::Relaxed);
            let again: Vec<&PublishItem<'_>> = missing.iter().map(|&i| items[i]).collect();
            for (i, r) in missing.into_iter().zip(self.publish_pipeline(&again, true).await) {
                results[i] = r;
            }
        }
        if results.iter().any(|r| matches!(r, Err(EngineError::Unavailable(_)))) {
            self.scripts_loaded.store(false, Ordering::Relaxed);
        } else if by_body && results.iter().any(Result::is_ok) {
            self.scripts_loaded.store(true, Ordering::Relaxed);
        }
        results
    }

    async fn publish_pipeline(
        &self,
        items: &[&PublishItem<'_>],
        by_body: bool,
    ) -> Vec<Result<Assigned, EngineError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for it in items {
            pipe.add_command(self.publish_cmd(it, by_body));
        }
        match self.link.pipeline(&pipe, &self.health).await {
            Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
            Ok(values) if values.len() == items.len() => values.into_iter().map(assigned).collect(),
            Ok(_) => items.iter().map(|_| Err(EngineError::Reply("pipeline length"))).collect(),
        }
    }

    /// The publish script call for one item.
    fn publish_cmd(&self, it: &PublishItem<'_>, by_body: bool) -> redis::Cmd {
        let k = self.keys.user(it.user);
        let script = &self.scripts.publish;
        let mut c = redis::cmd(if by_body { "EVAL" } else { "EVALSHA" });
        c.arg(if by_body { &script.body } else { &script.sha }).arg(3).arg(k.meta).arg(k.stream).arg(k.ids);
        c.arg(self.keys.channel(it.user))
            .arg(&self.maxlen)
            .arg(&self.ttl_ms)
            .arg(self.fresh_epoch())
            .arg(it.id.unwrap_or(""))
            .arg(it.ev.tail)
            .arg(it.ev.priority.as_str())
            .arg(it.ev.at_us);
        c
    }

    /// Reads a user's epoch, seq and the held events from `from` on (none
    /// for `from == 0`); with `member`, first records it as a new live
    /// connection, evicting the oldest over `--max-conns-per-user`.
    pub async fn sync(&self, user: &UserId, from: u64, member: Option<&str>) -> Result<Synced, EngineError> {
        let k = self.keys.user(user);
        let channel = self.keys.channel(user);
        let epoch = self.fresh_epoch();
        let from = from.to_string();
        let args: [&[u8]; 6] = [
            epoch.as_bytes(),
            self.ttl_ms.as_bytes(),
            from.as_bytes(),
            member.unwrap_or("").as_bytes(),
            self.max_conns.as_bytes(),
            channel.as_bytes(),
        ];
        let v = self
            .link
            .eval(&self.scripts.sync, &[&k.meta, &k.stream, &k.ids, &k.conns], &args, &self.health)
            .await?;
        let mut parts = array(v, 4)?;
        let events = match std::mem::take(&mut parts[2]) {
            Value::Array(entries) => entries.into_iter().map(stored_event).collect::<Result<_, _>>()?,
            _ => return Err(EngineError::Reply("sync: events")),
        };
        Ok(Synced { epoch: text(&parts[0])?.into(), seq: int(&parts[1])?, events })
    }

    /// Starts a new epoch for a user whose history in Redis went back in time
    /// (a seq was seen that Redis no longer has), if it is still on `seen`.
    pub async fn renew_epoch(&self, user: &UserId, seen: &str) -> Result<(), EngineError> {
        let k = self.keys.user(user);
        let epoch = self.fresh_epoch();
        let args: [&[u8]; 3] = [seen.as_bytes(), epoch.as_bytes(), self.ttl_ms.as_bytes()];
        self.link
            .eval(&self.scripts.renew, &[&k.meta, &k.stream, &k.ids], &args, &self.health)
            .await
            .map(drop)
    }

    /// Forgets one of this node's connections (it closed).
    pub async fn leave(&self, user: &UserId, member: &str) -> Result<(), EngineError> {
        let mut c = redis::cmd("ZREM");
        c.arg(self.keys.user(user).conns).arg(member);
        self.link.call(&c, &self.health).await.map(drop)
    }

    /// Keeps users with live connections here from expiring, and re-adds
    /// their connections to their lists (which expire with them).
    pub async fn touch(&self, user: &UserId, members: &[String]) -> Result<(), EngineError> {
        let k = self.keys.user(user);
        let mut args: Vec<&[u8]> = vec![self.ttl_ms.as_bytes()];
        args.extend(members.iter().map(|m| m.as_bytes()));
        self.link
            .eval(&self.scripts.touch, &[&k.meta, &k.stream, &k.ids, &k.conns], &args, &self.health)
            .await
            .map(drop)
    }

    /// Closes a user's connections on every node (4000); returns how many
    /// were live on nodes that are alive.
    pub async fn drop_user(&self, user: &UserId) -> Result<u64, EngineError> {
        let k = self.keys.user(user);
        let channel = self.keys.channel(user);
        let v = self.link.eval(&self.scripts.drop, &[&k.conns], &[channel.as_bytes()], &self.health).await?;
        let members = strings(v)?;
        let alive = self.alive_nodes().await?;
        Ok(count_alive(&members, &alive))
    }

    /// A user's figures across the cluster; `None` for a user Redis does not know.
    pub async fn user_figures(&self, user: &UserId) -> Result<Option<UserFigures>, EngineError> {
        let k = self.keys.user(user);
        let mut meta = redis::cmd("HMGET");
        meta.arg(&k.meta).arg("e").arg("s");
        let m = array(self.link.call(&meta, &self.health).await?, 2)?;
        let Value::BulkString(epoch) = &m[0] else { return Ok(None) };
        let epoch = String::from_utf8_lossy(epoch).into_owned();
        let seq = int(&m[1])?;
        let mut xlen = redis::cmd("XLEN");
        xlen.arg(&k.stream);
        let history = int(&self.link.call(&xlen, &self.health).await?)?;
        let mut mem = redis::cmd("MEMORY");
        mem.arg("USAGE").arg(&k.stream);
        let history_bytes = int(&self.link.call(&mem, &self.health).await?).unwrap_or(0);
        let mut zr = redis::cmd("ZRANGE");
        zr.arg(&k.conns).arg(0).arg(-1);
        let members = strings(self.link.call(&zr, &self.health).await?)?;
        let connections = count_alive(&members, &self.alive_nodes().await?);
        Ok(Some(UserFigures { epoch, seq, history, history_bytes, connections }))
    }

    /// Asks every node to publish `tail` to its users with live connections;
    /// returns the nodes that received it.
    pub async fn broadcast(&self, tail: &[u8], priority: Priority, at_us: u64) -> Result<u64, EngineError> {
        let bid = self.fresh_epoch();
        let mut payload = format!("b|{bid}|{}|{at_us}|", priority.as_str()).into_bytes();
        payload.extend_from_slice(tail);
        let mut c = redis::cmd("PUBLISH");
        c.arg(self.keys.broadcast_channel()).arg(payload);
        int(&self.link.call(&c, &self.health).await?)
    }

    /// The idempotency key under which a node publishes broadcast `bid` to
    /// a user (so a user with connections on two nodes gets it once).
    pub fn broadcast_key(bid: &str) -> String {
        format!("broadcast:{bid}")
    }

    /// Subscribes to a user's channel; resolves once the subscription is in
    /// place (`false` if Pub/Sub is down).
    pub fn subscribe(&self, user: &UserId) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let _ = self.requests.send(live::Request::Subscribe(user.clone(), tx));
        rx
    }

    pub fn unsubscribe(&self, user: &UserId) {
        let _ = self.requests.send(live::Request::Unsubscribe(user.clone()));
    }

    /// Node ids heard from within [`NODE_ALIVE_MS`].
    async fn alive_nodes(&self) -> Result<HashSet<String>, EngineError> {
        let now = crate::protocol::unix_ms();
        let mut c = redis::cmd("ZRANGEBYSCORE");
        c.arg(self.keys.nodes()).arg(now.saturating_sub(NODE_ALIVE_MS)).arg("+inf");
        Ok(strings(self.link.call(&c, &self.health).await?)?.into_iter().collect())
    }

    /// Pings Redis and marks this node alive, every [`HEARTBEAT`], forever.
    pub async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.link.ping(&self.health).await {
                tracing::debug!(error = %e, "Redis ping failed");
                continue;
            }
            let now = crate::protocol::unix_ms();
            let mut add = redis::cmd("ZADD");
            add.arg(self.keys.nodes()).arg(now).arg(&self.node_id);
            let mut trim = redis::cmd("ZREMRANGEBYSCORE");
            trim.arg(self.keys.nodes()).arg("-inf").arg(now.saturating_sub(60_000));
            let _ = self.link.call(&add, &self.health).await;
            let _ = self.link.call(&trim, &self.health).await;
            if let Ok(nodes) = self.alive_nodes().await {
                self.nodes_seen.store(nodes.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// One publish script reply (`{epoch, seq, duplicate, receivers}`) or its error.
fn assigned(v: Value) -> Result<Assigned, EngineError> {
    if let Value::ServerError(e) = &v {
        return Err(match e.kind() {
            Some(redis::ServerErrorKind::NoScript) => EngineError::NoScript,
            _ => EngineError::Refused(e.to_string()),
        });
    }
    let parts = array(v, 4)?;
    Ok(Assigned { seq: int(&parts[1])?, duplicate: int(&parts[2])? == 1, nodes: int(&parts[3])? as u32 })
}

/// Members whose node is alive.
fn count_alive(members: &[String], alive: &HashSet<String>) -> u64 {
    members.iter().filter(|m| m.split_once('/').is_some_and(|(node, _)| alive.contains(node))).count() as u64
}

fn array(v: Value, at_least: usize) -> Result<Vec<Value>, EngineError> {
    match v {
        Value::Array(a) if a.len() >= at_least => Ok(a),
        _ => Err(EngineError::Reply("expected an array")),
    }
}

fn int(v: &Value) -> Result<u64, EngineError> {
    match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| EngineError::Reply("negative integer")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(EngineError::Reply("not an integer")),
        Value::Nil => Ok(0),
        _ => Err(EngineError::Reply("expected an integer")),
    }
}

fn text(v: &Value) -> Result<String, EngineError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| EngineError::Reply("not UTF-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        _ => Err(EngineError::Reply("expected a string")),
    }
}

fn strings(v: Value) -> Result<Vec<String>, EngineError> {
    match v {
        Value::Array(a) => a.iter().map(text).collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(EngineError::Reply("expected a list")),
    }
}

/// One XRANGE entry: `[ "<seq>-0", [ "p", prio, "t", at_us, "b", body ] ]`.
fn stored_event(entry: Value) -> Result<StoredEvent, EngineError> {
    let mut e = array(entry, 2)?;
    let id = text(&e[0])?;
    let seq = id.split('-').next().and_then(|s| s.parse().ok()).ok_or(EngineError::Reply("stream id"))?;
    let fields = array(std::mem::take(&mut e[1]), 6)?;
    let (mut priority, mut at_us, mut body) = (Priority::Normal, 0, Bytes::new());
    for pair in fields.chunks(2) {
        let (Value::BulkString(name), Some(value)) = (&pair[0], pair.get(1)) else { continue };
        match name.as_slice() {
            b"p" => priority = Priority::parse(&text(value)?).map_err(|_| EngineError::Reply("priority"))?,
            b"t" => at_us = int(value)?,
            b"b" => match value {
                Value::BulkString(b) => body = Bytes::from(b.clone()),
                _ => return Err(EngineError::Reply("body")),
            },
            _ => {}
        }
    }
    Ok(StoredEvent { seq, priority, at_us, body })
}
