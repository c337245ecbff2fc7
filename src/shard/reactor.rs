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
//! History is bounded three ways: per user by `--history-size` and
//! `--history-bytes` ([`History`]), and per shard by its share of
//! `--history-memory` ([`Budget`]), past which the shard's oldest events are
//! evicted first, whoever holds them.
//!
//! Shutdown reaches the shard as a ring command ([`Command::Shutdown`]),
//! behind every command pushed before it, so everything accepted is applied
//! before the connections drain; the hot loop polls no shared token.
//!
//! Everything here is `!Send` and lives on the shard thread; `RefCell`
//! borrows never span an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::broker::Shared;
use crate::connection::{self, Conn, Enqueued, Outbound};
use crate::metrics::{bump, Latency};
use crate::protocol::{self, PreparedEvent, Priority, UserId, Welcome};
use crate::shard::budget::{Budget, Stored};
use crate::shard::history::{self, Held, History, Replay};
use crate::shard::idempotency::Keys;
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
    /// Tells this state of the user from an earlier one in eviction entries.
    incarnation: u64,
    history: History,
    /// Idempotency keys accepted for this user.
    keys: Keys,
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
    /// This shard's share of `--history-memory`.
    budget: RefCell<Budget>,
}

impl ShardCore {
    fn new(id: usize, shared: Arc<Shared>) -> Self {
        ShardCore {
            id,
            users: RefCell::new(HashMap::default()),
            conns: RefCell::new(Slab::new()),
            latency: RefCell::new(Latency::default()),
            next_conn: Cell::new(0),
            incarnation: Cell::new(0),
            draining: Cell::new(false),
            budget: RefCell::new(Budget::new(shared.config.history_memory / shared.config.shards.max(1))),
            shared,
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
            incarnation: n,
            history: History::default(),
            keys: Keys::default(),
            conns: Vec::new(),
            touched: now,
        }
    }

    /// Applies one command; `Some(deadline)` when it was the shutdown.
    fn apply(self: &Rc<Self>, cmd: Command) -> Option<Instant> {
        match cmd {
            Command::Shutdown { deadline } => return Some(deadline),
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
        None
    }

    fn publish(&self, p: PublishCmd) {
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let user = users.entry(p.user.clone()).or_insert_with(|| self.new_user(now));
        if let Some(id) = &p.id {
            user.keys.expire(now, self.shared.config.history_ttl);
            if let Some(seq) = user.keys.get(id) {
                bump(&self.handle().metrics.duplicates, 1);
                if let Some(reply) = p.reply {
                    let _ = reply.send(Delivery { seq, delivered: 0, duplicate: true });
                }
                return;
            }
        }
        let delivered = self.deliver(&p.user, user, &p.event, p.accepted, p.ts_ms, now);
        if let Some(id) = p.id {
            user.keys.insert(id, user.seq, now);
        }
        if let Some(reply) = p.reply {
            let _ = reply.send(Delivery { seq: user.seq, delivered, duplicate: false });
        }
        drop(users);
        self.enforce_budget();
    }

    /// Evicts the shard's oldest held events while its histories are over
    /// their share of `--history-memory`.
    fn enforce_budget(&self) {
        let mut budget = self.budget.borrow_mut();
        let mut users = self.users.borrow_mut();
        while budget.over() {
            let Some(s) = budget.pop_oldest() else { break };
            let Some(u) = users.get_mut(&s.user) else { continue };
            if u.incarnation == s.incarnation && u.history.first_seq() == Some(s.seq) {
                let before = (u.history.bytes(), u.history.len());
                u.history.pop_front();
                budget.adjust(before, (u.history.bytes(), u.history.len()));
                bump(&self.handle().metrics.history_evicted, 1);
            }
        }
        budget.compact(|s| {
            users.get(&s.user).is_some_and(|u| {
                u.incarnation == s.incarnation && u.history.first_seq().is_some_and(|f| f <= s.seq)
            })
        });
    }

    /// Runs `f` on a user's history and applies the change to the budget.
    fn with_history<R>(&self, user: &mut UserState, f: impl FnOnce(&mut History) -> R) -> R {
        let before = (user.history.bytes(), user.history.len());
        let r = f(&mut user.history);
        self.budget.borrow_mut().adjust(before, (user.history.bytes(), user.history.len()));
        r
    }

    /// Moves held events of a replay still being written into `batch`,
    /// as many as fit; ends the replay once it has reached the user's seq.
    /// A replay overtaken by the history's eviction skips the lost events
    /// (a seq gap, counted as shed, as a slow consumer's queue would).
    pub fn fill_replay(&self, conn: &Conn, batch: &mut Vec<Outbound>, max_frames: usize, max_bytes: usize) {
        let Some(mut next) = conn.replay_next.get() else { return };
        let users = self.users.borrow();
        let Some(u) = users.get(&conn.user) else {
            conn.replay_next.set(None);
            return;
        };
        let first = u.history.first_seq().unwrap_or(u.seq + 1);
        if next < first {
            bump(&self.handle().metrics.shed[Priority::Normal.index()], first - next);
            next = first;
        }
        let mut bytes: usize = batch.iter().map(|o| o.frame.len()).sum();
        while next <= u.seq && batch.len() < max_frames && bytes < max_bytes {
            let Some(h) = u.history.get_seq(next) else {
                next = u.seq + 1; // cannot happen: held seqs are contiguous up to the latest
                break;
            };
            let frame = if conn.sse { crate::sse::event(&u.epoch, h.seq, &h.frame) } else { h.frame.clone() };
            bytes += frame.len();
            batch.push(Outbound { frame, accepted: None, priority: h.priority });
            next += 1;
        }
        conn.replay_next.set((next <= u.seq).then_some(next));
    }

    /// Assigns the next seq, stores and fans out one event. Returns the number
    /// of connections it was queued to.
    fn deliver(
        &self,
        user_id: &UserId,
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
        let held = Held { seq: user.seq, frame: frame.clone(), priority: ev.priority, at: now };
        let limits = history::Limits { events: cfg.history_size, bytes: cfg.history_bytes };
        self.with_history(user, |h| h.push(held, limits));
        if user.history.first_seq().is_some() {
            let stored = Stored { user: user_id.clone(), incarnation: user.incarnation, seq: user.seq };
            self.budget.borrow_mut().stored(stored);
        }
        bump(&m.published, 1);
        let conns = self.conns.borrow();
        let mut delivered = 0;
        // Encoded once per transport that needs it, not once per connection.
        let mut sse_frame: Option<bytes::Bytes> = None;
        for &key in &user.conns {
            let Some(conn) = conns.get(key) else { continue };
            let frame = if conn.sse {
                sse_frame.get_or_insert_with(|| crate::sse::event(&user.epoch, user.seq, &frame)).clone()
            } else {
                frame.clone()
            };
            let out = Outbound { frame, accepted: Some(accepted), priority: ev.priority };
            match conn.push_event(out) {
                Enqueued::Queued { shed } => {
                    delivered += 1;
                    for (counter, n) in m.shed.iter().zip(shed) {
                        if n > 0 {
                            bump(counter, n as u64);
                        }
                    }
                }
                Enqueued::Deferred => delivered += 1,
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
        for (id, user) in users.iter_mut().filter(|(_, u)| !u.conns.is_empty()) {
            out.users += 1;
            out.delivered += self.deliver(id, user, ev, accepted, ts_ms, now) as u64;
        }
        drop(users);
        self.enforce_budget();
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
            Peer::User { user, resume, sse } => self.attach_user(user, resume, sse),
            Peer::Echo => self.register(echo_user(), connection::Kind::Echo),
        };
        let reader = if conn.sse {
            tokio::task::spawn_local(connection::sse_reader::run(conn.clone(), read, a.leftover))
        } else {
            tokio::task::spawn_local(connection::run_reader(conn.clone(), read, a.leftover))
        };
        conn.set_reader(reader.abort_handle());
        tokio::task::spawn_local(connection::run_writer(self.clone(), conn, write, a.response));
    }

    /// Puts a new connection in the slab.
    fn register(&self, user: UserId, kind: connection::Kind) -> Rc<Conn> {
        let (echo, sse) = (kind == connection::Kind::Echo, kind == connection::Kind::Sse);
        let cfg = &self.shared.config;
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        let id = format!("c{}.{}", self.id, radix36(n));
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let limits = connection::Limits {
            max_frames: cfg.max_queue,
            max_bytes: cfg.max_queue_bytes,
            // An echo connection queues whole echoed messages as control frames.
            control_bytes: if echo {
                cfg.max_queue_bytes.max(2 * connection::MAX_ECHO_MESSAGE + 1024)
            } else {
                cfg.max_queue_bytes
            },
        };
        let conn = Rc::new(Conn::new(entry.key(), id, user, kind, limits, Instant::now(), cfg.ping_interval));
        entry.insert(conn.clone());
        bump(&self.handle().metrics.connections, 1);
        if sse {
            bump(&self.handle().metrics.sse_connections, 1);
        }
        conn
    }

    /// Registers a user's connection: evicts over the per-user limit, queues
    /// `welcome` and any resume replay.
    fn attach_user(&self, user_id: UserId, resume: Option<Resume>, sse: bool) -> Rc<Conn> {
        let cfg = &self.shared.config;
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let user = users.entry(user_id.clone()).or_insert_with(|| self.new_user(now));
        self.with_history(user, |h| h.expire(now, cfg.history_ttl));

        // Per-user limit: evict the oldest connections (4001).
        while user.conns.len() >= cfg.max_conns_per_user {
            let oldest = user.conns.remove(0);
            if let Some(c) = self.conns.borrow().get(oldest) {
                bump(&self.handle().metrics.evicted, 1);
                c.close_now(4001, "evicted: too many connections for this user");
            }
        }

        let (recovered, replay_from) = match &resume {
            None => (None, None),
            Some(r) if r.epoch.as_deref().is_some_and(|e| e != &*user.epoch) => (Some(false), None),
            Some(r) => match user.history.plan_replay(r.since, user.seq) {
                Replay::From(seq) => (Some(true), (seq <= user.seq).then_some(seq)),
                Replay::Impossible => (Some(false), None),
            },
        };

        let kind = if sse { connection::Kind::Sse } else { connection::Kind::WebSocket };
        let conn = self.register(user_id.clone(), kind);
        user.conns.push(conn.key);
        let welcome = protocol::welcome_json(&Welcome {
            user: &user_id,
            conn: &conn.id,
            epoch: &user.epoch,
            seq: user.seq,
            recovered,
            ping_ms: cfg.ping_interval.as_millis() as u64,
        });
        conn.push_control(if sse {
            crate::sse::message("welcome", welcome.as_bytes())
        } else {
            crate::wsframe::text_frame(welcome.as_bytes())
        });
        if let Some(seq) = replay_from {
            conn.start_replay(seq);
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
        if conn.sse {
            m.sse_connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
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
            history_bytes: u.history.bytes(),
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
            history_events: self.budget.borrow().events(),
            history_bytes: self.budget.borrow().held(),
        }
    }

    /// Pings connections that are due and closes the idle ones (4002);
    /// publishes the shard's gauges on the way (one walk serves both, so
    /// `/metrics` never makes a shard walk its connections).
    fn heartbeat(&self, now: Instant) {
        let cfg = &self.shared.config;
        let (mut queued, mut max_depth) = (0, 0);
        for (_, conn) in self.conns.borrow().iter() {
            let depth = conn.depth();
            queued += depth;
            max_depth = max_depth.max(depth);
            if conn.is_closing() {
                continue;
            }
            // An SSE client cannot send: it is never idle by that measure.
            if !conn.sse && now.duration_since(conn.last_recv.get()) >= cfg.idle_timeout {
                conn.close_now(4002, "idle timeout");
            } else if now >= conn.next_ping.get() {
                conn.next_ping.set(now + cfg.ping_interval);
                conn.push_control(conn.ping_frame());
            }
        }
        self.publish_gauges(queued, max_depth);
    }

    /// Stores the gauges and a copy of the latency histograms where
    /// `/metrics` reads them without asking the shard.
    fn publish_gauges(&self, queued: usize, max_depth: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.handle().metrics;
        let budget = self.budget.borrow();
        m.queued.store(queued as u64, Relaxed);
        m.max_queue_depth.store(max_depth as u64, Relaxed);
        m.history_bytes.store(budget.held() as u64, Relaxed);
        m.history_events.store(budget.events() as u64, Relaxed);
        self.handle().latency.store(Arc::new(self.latency.borrow().clone()));
    }

    /// Expires history and forgets users with no connection and nothing
    /// touched for `history_ttl` (their next state gets a new epoch).
    fn sweep_users(&self, now: Instant) {
        let ttl = self.shared.config.history_ttl;
        let mut users = self.users.borrow_mut();
        let before = users.len();
        let mut budget = self.budget.borrow_mut();
        users.retain(|_, u| {
            let before = (u.history.bytes(), u.history.len());
            u.history.expire(now, ttl);
            u.keys.expire(now, ttl);
            let keep = !(u.conns.is_empty() && now.duration_since(u.touched) >= ttl);
            let after = if keep { (u.history.bytes(), u.history.len()) } else { (0, 0) };
            budget.adjust(before, after);
            keep
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

/// Runs shard `id` on the current thread until a [`Command::Shutdown`]
/// arrives and its connections have drained.
pub fn run(id: usize, shared: Arc<Shared>) -> std::io::Result<Latency> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let latency = local.block_on(&rt, async move {
        let core = Rc::new(ShardCore::new(id, shared));
        tokio::task::spawn_local(housekeeping(core.clone()));
        let deadline = drain_ring(&core).await;
        core.begin_drain(deadline);
        // Listeners are closed: wait for connections to flush and close,
        // bounded by the deadline (a stalled client cannot hold shutdown).
        // Late commands are still applied, so nobody waits on a dropped reply.
        while core.connection_count() > 0 && Instant::now() < deadline {
            while let Some(cmd) = core.handle().ring.pop() {
                core.apply(cmd);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        core.latency.take()
    });
    Ok(latency)
}

/// Applies commands until the shutdown command; returns its drain deadline.
async fn drain_ring(core: &Rc<ShardCore>) -> Instant {
    let ring = &core.handle().ring;
    let pass = (core.shared.config.max_queue / 2).clamp(1, MAX_PASS);
    loop {
        std::future::poll_fn(|cx| ring.poll_ready(cx)).await;
        let mut n = 0;
        while let Some(cmd) = ring.pop() {
            if let Some(deadline) = core.apply(cmd) {
                return deadline;
            }
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
