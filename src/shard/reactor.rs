//! The shard reactor: the loop that drains the ring and applies commands to
//! the state the shard owns ([`ShardCore`]): users (seq, epoch, history,
//! connection list) and the connection slab.
//!
//! Data path on the shard: pop `Publish` → bump the user's seq → encode the
//! frame once → append it to the history → offer the same `Bytes` to each of
//! the user's connections (slow-consumer policy applies per connection) →
//! wake their writers. Commands are applied in ring order, which is what
//! keeps a user's events in order and makes resume gap-free: an attach is
//! applied between two publishes, never during one.
//!
//! Everything here is `!Send` and lives on the shard thread; `RefCell`
//! borrows never span an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use tokio_util::sync::CancellationToken;

use crate::broker::Shared;
use crate::connection::{self, Conn, Enqueued, Outbound};
use crate::metrics::{bump, Latency};
use crate::protocol::{self, PreparedEvent, UserId, Welcome};
use crate::shard::history::{Held, History, Replay};
use crate::shard::{
    AttachCmd, BroadcastOutcome, Command, Delivery, Peer, PublishCmd, Resume, ShardHandle, ShardSnapshot,
    UserInfo,
};

/// Most commands applied before the reactor yields so writers can flush.
/// Also capped at half of `--max-queue`, so that a burst applied in one pass
/// can never overflow the queue of a client that keeps up.
const MAX_PASS: usize = 256;

/// One user's state on its shard.
struct UserState {
    seq: u64,
    /// Changes whenever this user's history is lost (new state = new epoch).
    epoch: Rc<str>,
    history: History,
    /// Slab keys of live connections, oldest first.
    conns: Vec<usize>,
    /// Last publish or disconnect; an idle user is swept `history_ttl` after it.
    touched: Instant,
}

/// The state a shard owns.
pub struct ShardCore {
    pub id: usize,
    pub shared: Arc<Shared>,
    users: RefCell<HashMap<UserId, UserState, ahash::RandomState>>,
    conns: RefCell<Slab<Rc<Conn>>>,
    pub latency: RefCell<Latency>,
    next_conn: Cell<u64>,
    incarnation: Cell<u64>,
    draining: Cell<bool>,
}

impl ShardCore {
    fn new(id: usize, shared: Arc<Shared>) -> Self {
        ShardCore {
            id,
            shared,
            users: RefCell::new(HashMap::default()),
            conns: RefCell::new(Slab::new()),
            latency: RefCell::new(Latency::default()),
            next_conn: Cell::new(0),
            incarnation: Cell::new(0),
            draining: Cell::new(false),
        }
    }

    pub fn handle(&self) -> &ShardHandle {
        &self.shared.shards[self.id]
    }

    fn new_user(&self, now: Instant) -> UserState {
        let n = self.incarnation.get() + 1;
        self.incarnation.set(n);
        bump(&self.handle().metrics.users, 1);
        UserState {
            seq: 0,
            epoch: format!("{}{}.{}", self.shared.boot, self.id, radix36(n)).into(),
            history: History::default(),
            conns: Vec::new(),
            touched: now,
        }
    }

    fn apply(self: &Rc<Self>, cmd: Command) {
        match cmd {
            Command::Publish(p) => self.publish(p),
            Command::Broadcast { event, accepted, ts_ms, reply } => {
                let _ = reply.send(self.broadcast(&event, accepted, ts_ms));
            }
            Command::Attach(a) => self.attach(*a),
            Command::UserInfo { user, reply } => {
                let _ = reply.send(self.user_info(&user));
            }
            Command::DropUser { user, reply } => {
                let _ = reply.send(self.drop_user(&user));
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Latency { reset, reply } => {
                let mut lat = self.latency.borrow_mut();
                let snap = Box::new(lat.clone());
                if reset {
                    lat.reset();
                }
                let _ = reply.send(snap);
            }
        }
    }

    fn publish(&self, p: PublishCmd) {
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let user = users.entry(p.user).or_insert_with(|| self.new_user(now));
        let delivered = self.deliver(user, &p.event, p.accepted, p.ts_ms, now);
        if let Some(reply) = p.reply {
            let _ = reply.send(Delivery { seq: user.seq, delivered });
        }
    }

    /// Assigns the next seq, stores and fans out one event. Returns the number
    /// of connections it was queued to.
    fn deliver(
        &self,
        user: &mut UserState,
        ev: &PreparedEvent,
        accepted: Instant,
        ts_ms: u64,
        now: Instant,
    ) -> u32 {
        let cfg = &self.shared.config;
        let m = &self.handle().metrics;
        user.seq += 1;
        user.touched = now;
        let frame = protocol::encode_event_frame(user.seq, ev, ts_ms);
        user.history.push(
            Held { seq: user.seq, frame: frame.clone(), priority: ev.priority, at: now },
            cfg.history_size,
        );
        bump(&m.published, 1);
        let conns = self.conns.borrow();
        let mut delivered = 0;
        for &key in &user.conns {
            let Some(conn) = conns.get(key) else { continue };
            let out = Outbound { frame: frame.clone(), accepted: Some(accepted), priority: ev.priority };
            match conn.push_event(out) {
                Enqueued::Queued => delivered += 1,
                Enqueued::QueuedShedding(victim) => {
                    delivered += 1;
                    bump(&m.shed[victim.index()], 1);
                }
                Enqueued::Shed => bump(&m.shed[ev.priority.index()], 1),
                Enqueued::Overflow => {
                    bump(&m.shed[ev.priority.index()], 1);
                    bump(&m.slow_closed, 1);
                    conn.close_now(1013, "slow consumer: queue full of high-priority events");
                }
            }
        }
        delivered
    }

    fn broadcast(&self, ev: &PreparedEvent, accepted: Instant, ts_ms: u64) -> BroadcastOutcome {
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let mut out = BroadcastOutcome::default();
        for user in users.values_mut().filter(|u| !u.conns.is_empty()) {
            out.users += 1;
            out.delivered += self.deliver(user, ev, accepted, ts_ms, now) as u64;
        }
        out
    }

    fn attach(self: &Rc<Self>, a: AttachCmd) {
        if self.draining.get() {
            self.shared.release_connection();
            return;
        }
        let (read, write) = match a.socket.adopt() {
            Ok(halves) => halves,
            Err(e) => {
                tracing::warn!(error = %e, "could not adopt a handed-over socket");
                self.shared.release_connection();
                return;
            }
        };
        let conn = match a.peer {
            Peer::User { user, resume } => self.attach_user(user, resume),
            Peer::Echo => self.register(echo_user(), true),
        };
        let reader = tokio::task::spawn_local(connection::run_reader(conn.clone(), read, a.leftover));
        conn.set_reader(reader.abort_handle());
        tokio::task::spawn_local(connection::run_writer(self.clone(), conn, write, a.response));
    }

    /// Puts a new connection in the slab.
    fn register(&self, user: UserId, echo: bool) -> Rc<Conn> {
        let cfg = &self.shared.config;
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        let id = format!("c{}.{}", self.id, radix36(n));
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let conn =
            Rc::new(Conn::new(entry.key(), id, user, echo, cfg.max_queue, Instant::now(), cfg.ping_interval));
        entry.insert(conn.clone());
        bump(&self.handle().metrics.connections, 1);
        conn
    }

    /// Registers a user's connection: evicts over the per-user limit, queues
    /// `welcome` and any resume replay.
    fn attach_user(&self, user_id: UserId, resume: Option<Resume>) -> Rc<Conn> {
        let cfg = &self.shared.config;
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let user = users.entry(user_id.clone()).or_insert_with(|| self.new_user(now));
        user.history.expire(now, cfg.history_ttl);

        // Per-user limit: evict the oldest connections (4001).
        while user.conns.len() >= cfg.max_conns_per_user {
            let oldest = user.conns.remove(0);
            if let Some(c) = self.conns.borrow().get(oldest) {
                bump(&self.handle().metrics.evicted, 1);
                c.close_now(4001, "evicted: too many connections for this user");
            }
        }

        let (recovered, replay) = match &resume {
            None => (None, Vec::new()),
            Some(r) if r.epoch.as_deref().is_some_and(|e| e != &*user.epoch) => (Some(false), Vec::new()),
            Some(r) => match user.history.plan_replay(r.since, user.seq) {
                Replay::Complete(idx) => (Some(true), idx),
                Replay::Impossible => (Some(false), Vec::new()),
            },
        };

        let conn = self.register(user_id.clone(), false);
        user.conns.push(conn.key);
        conn.push_control(protocol::encode_welcome(&Welcome {
            user: &user_id,
            conn: &conn.id,
            epoch: &user.epoch,
            seq: user.seq,
            recovered,
            ping_ms: cfg.ping_interval.as_millis() as u64,
        }));
        for idx in replay {
            if let Some(h) = user.history.get(idx) {
                // history_size <= max_queue (validated), so a replay always fits.
                conn.push_event(Outbound { frame: h.frame.clone(), accepted: None, priority: h.priority });
            }
        }
        conn
    }

    /// Removes a connection whose writer has ended.
    pub fn deregister(&self, conn: &Conn) {
        let now = Instant::now();
        if self.conns.borrow_mut().try_remove(conn.key).is_none() {
            return;
        }
        if let Some(user) = self.users.borrow_mut().get_mut(&conn.user).filter(|_| !conn.echo) {
            user.conns.retain(|&k| k != conn.key);
            user.touched = now;
        }
        let m = &self.handle().metrics;
        m.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.release_connection();
    }

    fn user_info(&self, user: &UserId) -> Option<UserInfo> {
        let users = self.users.borrow();
        let u = users.get(user)?;
        let conns = self.conns.borrow();
        Some(UserInfo {
            user: user.to_string(),
            connections: u.conns.len(),
            seq: u.seq,
            history: u.history.len(),
            epoch: u.epoch.to_string(),
            queued: u.conns.iter().filter_map(|k| conns.get(*k)).map(|c| c.depth()).collect(),
        })
    }

    fn drop_user(&self, user: &UserId) -> usize {
        let mut users = self.users.borrow_mut();
        let Some(u) = users.get_mut(user) else { return 0 };
        let conns = self.conns.borrow();
        let keys = std::mem::take(&mut u.conns);
        for k in &keys {
            if let Some(c) = conns.get(*k) {
                c.close_now(4000, "closed by operator");
            }
        }
        keys.len()
    }

    fn snapshot(&self) -> ShardSnapshot {
        let conns = self.conns.borrow();
        let users = self.users.borrow();
        let depths = conns.iter().map(|(_, c)| c.depth());
        let (queued, max_queue_depth) = depths.fold((0, 0), |(s, m), d| (s + d, m.max(d)));
        ShardSnapshot {
            shard: self.id,
            connections: conns.len(),
            users: users.len(),
            queued,
            max_queue_depth,
            history_events: users.values().map(|u| u.history.len()).sum(),
        }
    }

    /// Pings connections that are due and closes the idle ones (4002).
    fn heartbeat(&self, now: Instant) {
        let cfg = &self.shared.config;
        let ping = crate::wsframe::frame(crate::wsframe::OP_PING, b"");
        for (_, conn) in self.conns.borrow().iter() {
            if conn.is_closing() {
                continue;
            }
            if now.duration_since(conn.last_recv.get()) >= cfg.idle_timeout {
                conn.close_now(4002, "idle timeout");
            } else if now >= conn.next_ping.get() {
                conn.next_ping.set(now + cfg.ping_interval);
                conn.push_control(ping.clone());
            }
        }
    }

    /// Expires history and forgets users with no connection and nothing
    /// touched for `history_ttl` (their next state gets a new epoch).
    fn sweep_users(&self, now: Instant) {
        let ttl = self.shared.config.history_ttl;
        let mut users = self.users.borrow_mut();
        let before = users.len();
        users.retain(|_, u| {
            u.history.expire(now, ttl);
            !(u.conns.is_empty() && now.duration_since(u.touched) >= ttl)
        });
        let gone = (before - users.len()) as u64;
        if gone > 0 {
            self.handle().metrics.users.fetch_sub(gone, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn begin_drain(&self, deadline: Instant) {
        self.draining.set(true);
        for (_, conn) in self.conns.borrow().iter() {
            conn.close_after_flush(1001, "server shutting down", deadline);
        }
    }

    fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }
}

/// The placeholder user of echo connections (never in the user map).
fn echo_user() -> UserId {
    UserId::parse("echo").unwrap_or_else(|_| unreachable!("\"echo\" is a valid user ID"))
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Runs shard `id` on the current thread until `shutdown` fires and its
/// connections have drained.
pub fn run(id: usize, shared: Arc<Shared>, shutdown: CancellationToken) -> std::io::Result<Latency> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let latency = local.block_on(&rt, async move {
        let core = Rc::new(ShardCore::new(id, shared));
        tokio::task::spawn_local(housekeeping(core.clone()));
        drain_ring(&core, &shutdown).await;
        let deadline = Instant::now() + core.shared.config.drain_timeout;
        core.begin_drain(deadline);
        // Listeners are closed: wait for connections to flush and close,
        // bounded by the deadline (a stalled client cannot hold shutdown).
        while core.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        core.latency.take()
    });
    Ok(latency)
}

/// Applies commands until shutdown.
async fn drain_ring(core: &Rc<ShardCore>, shutdown: &CancellationToken) {
    let ring = &core.handle().ring;
    let pass = (core.shared.config.max_queue / 2).clamp(1, MAX_PASS);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = std::future::poll_fn(|cx| ring.poll_ready(cx)) => {}
        }
        let mut n = 0;
        while let Some(cmd) = ring.pop() {
            core.apply(cmd);
            n += 1;
            if n == pass {
                break;
            }
        }
        // Let the writers woken by this batch flush before taking more.
        tokio::task::yield_now().await;
    }
}

/// Heartbeats (pings, idle timeout) and the user sweep.
async fn housekeeping(core: Rc<ShardCore>) {
    let cfg = &core.shared.config;
    let tick = (cfg.ping_interval.min(cfg.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let sweep_every = (cfg.history_ttl / 8).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut last_sweep = Instant::now();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        core.heartbeat(now);
        if now.duration_since(last_sweep) >= sweep_every {
            core.sweep_users(now);
            last_sweep = now;
        }
    }
}
