//! The shard reactor: the loop that drains the ring and applies commands to
//! the state the shard owns ([`ShardCore`]): users (seq, epoch, history,
//! connection list) and the connection slab.
//!
//! Data path on the shard: pop `Publish` → bump the user's seq → encode the
//! frame once → append it to the history → offer the same [`Frame`] to each of
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
use std::task::Poll;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::acks::Answer;
use crate::connection::{self, Conn, Enqueued, Outbound};
use crate::metrics::{bump, Latency};
use crate::protocol::{self, PreparedEvent, Priority, UserId, Welcome};
use crate::shard::budget::{Budget, Stored};
use crate::shard::history::{self, Held, History, Replay};
use crate::shard::idempotency::Keys;
use crate::shard::persist::{Deferred, Persist};
use crate::shard::{
    AttachCmd, BatchAcks, BroadcastOutcome, Command, Delivery, Peer, PublishCmd, Resume, ShardHandle,
    ShardSnapshot, UserInfo,
};
use crate::shared::Shared;
use crate::wsframe::Frame;
use tokio::sync::oneshot;

mod remote;

/// Whether a user's local state follows Redis (cluster mode; always `Ready`
/// on a single node).
enum SyncState {
    Ready,
    /// Its state is being read from Redis; live messages wait here.
    Syncing(Vec<remote::Parked>),
}

/// Most commands applied before the reactor yields so writers can flush. A
/// pass also ends as soon as one connection's queue is half full, so a burst
/// applied in one pass can never overflow the queue of a client that keeps
/// up. Long passes are what make writes carry many frames: at 100 users and
/// saturation, 256 commands per pass gave 4.8 frames per write and 2,048
/// gave 27 (PERFORMANCE.md).
const MAX_PASS: usize = 4096;

/// One user's state on its shard.
struct UserState {
    /// The last seq assigned.
    seq: u64,
    /// The last seq stored and fanned out: behind `seq` only while, with
    /// `--fsync always`, events wait for their sync. Welcomes and resumes
    /// speak of this one.
    applied: u64,
    /// Changes whenever this user's history is lost (new state = new epoch).
    epoch: Rc<str>,
    /// Tells this state of the user from an earlier one in eviction entries.
    incarnation: u64,
    /// With `--data-dir`: the log segment holding this state's epoch record.
    epoch_seg: u64,
    history: History,
    /// Idempotency keys accepted for this user.
    keys: Keys,
    /// Slab keys of live connections, oldest first.
    conns: Vec<usize>,
    /// Last publish or disconnect; an idle user is swept `history_ttl` after it.
    touched: Instant,
    sync: SyncState,
}

impl UserState {
    /// A state at `seq` (0 for a new one) with nothing held and no connection.
    fn new(incarnation: u64, (epoch, epoch_seg): (Rc<str>, u64), seq: u64, touched: Instant) -> Self {
        UserState {
            seq,
            applied: seq,
            epoch,
            incarnation,
            epoch_seg,
            history: History::default(),
            keys: Keys::default(),
            conns: Vec::new(),
            touched,
            sync: SyncState::Ready,
        }
    }
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
    /// The disk engine, with `--data-dir`.
    persist: Option<RefCell<Persist>>,
    /// Cluster mode: gap fills decided while the user map was borrowed.
    pending_catch_ups: RefCell<Vec<(UserId, u64, Arc<crate::cluster::Engine>)>>,
    /// Cluster mode: users whose history Redis lost part of, found while
    /// the user map was borrowed.
    regressions: RefCell<Vec<(UserId, String)>>,
    /// Cluster mode: histories grew while the user map was borrowed.
    enforce_budget_later: Cell<bool>,
    /// A connection's queue reached half of a limit during this pass.
    pass_full: Cell<bool>,
    /// Commands (a batch's events one each) this pass may still apply.
    pass_left: Cell<usize>,
    /// The rest of a batch command a full pass stopped in: applied first in
    /// the next pass, before anything else is taken from the ring.
    carry: RefCell<Option<Carried>>,
    /// The time the current pass began: publishes stamp history entries and
    /// new users with it (one clock read per pass, not per event; TTLs are
    /// coarser than a pass).
    pass_clock: Cell<Instant>,
}

/// The rest of a batch command a pass stopped in, with the answers it owes.
struct Carried {
    events: std::vec::IntoIter<PublishCmd>,
    acks: Option<BatchAcks>,
}

/// Where an event's result goes: its own [`Ack`], else its slot in the
/// batch carrying it (`batch`), else nowhere.
fn answer_for<'a>(p: &mut PublishCmd, batch: Option<&'a mut BatchAcks>) -> Answer<'a> {
    match (p.reply.take(), batch) {
        (Some(ack), _) => Answer::Ack(ack),
        (None, Some(acks)) => Answer::Batch(acks, p.slot as usize),
        (None, None) => Answer::None,
    }
}

impl ShardCore {
    fn new(id: usize, shared: Arc<Shared>, persist: Option<Persist>) -> Self {
        ShardCore {
            id,
            users: RefCell::new(HashMap::default()),
            conns: RefCell::new(Slab::new()),
            latency: RefCell::new(Latency::default()),
            next_conn: Cell::new(0),
            incarnation: Cell::new(0),
            draining: Cell::new(false),
            budget: RefCell::new(Budget::new(shared.config.history_memory / shared.config.shards.max(1))),
            persist: persist.map(RefCell::new),
            pending_catch_ups: RefCell::new(Vec::new()),
            regressions: RefCell::new(Vec::new()),
            enforce_budget_later: Cell::new(false),
            pass_full: Cell::new(false),
            pass_left: Cell::new(MAX_PASS),
            carry: RefCell::new(None),
            pass_clock: Cell::new(Instant::now()),
            shared,
        }
    }

    pub fn handle(&self) -> &ShardHandle {
        &self.shared.shards[self.id]
    }

    fn new_user(&self, user: &UserId, now: Instant) -> UserState {
        let (n, epoch) = self.next_incarnation();
        bump(&self.handle().metrics.users, 1);
        let epoch_seg = self
            .persist
            .as_ref()
            .map_or(0, |p| p.borrow_mut().epoch(user.as_str(), &epoch, protocol::unix_ms()));
        UserState::new(n, (epoch, epoch_seg), 0, now)
    }

    /// A new state's incarnation number and its (never repeating) epoch.
    fn next_incarnation(&self) -> (u64, Rc<str>) {
        let n = self.incarnation.get() + 1;
        self.incarnation.set(n);
        (n, format!("{}{}.{}", self.shared.boot, self.id, radix36(n)).into())
    }

    /// Applies one command; `Some(deadline)` when it was the shutdown.
    fn apply(self: &Rc<Self>, cmd: Command) -> Option<Instant> {
        self.pass_left.set(self.pass_left.get().saturating_sub(1));
        match cmd {
            Command::Shutdown { deadline } => return Some(deadline),
            Command::Publish(mut p) => {
                let answer = answer_for(&mut p, None);
                self.publish(p, answer);
            }
            Command::PublishBatch(batch) => {
                self.handle().ring.release(batch.events.len().saturating_sub(1));
                // Its first event was counted above, as a command.
                self.pass_left.set(self.pass_left.get() + 1);
                self.publish_run(Carried { events: batch.events.into_iter(), acks: batch.acks });
            }
            // With `--fsync always` after what came before is durable, as a reply would be.
            Command::Fence(reply) => self.answer_after_sync(Deferred::Reply {
                reply,
                delivery: Delivery { seq: 0, delivered: 0, duplicate: false },
            }),
            Command::Broadcast { event, accepted, ts_ms, reply } => {
                self.broadcast(&event, accepted, ts_ms, reply)
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
            Command::Live(msg) => {
                self.apply_live(msg);
                self.run_pending_catch_ups();
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

    /// A pass over the ring begins.
    fn start_pass(&self) {
        self.pass_full.set(false);
        self.pass_left.set(MAX_PASS);
        self.pass_clock.set(Instant::now());
    }

    /// Whether this pass may take another command from the ring: nothing is
    /// carried over, and the pass is neither long enough nor full.
    fn pass_open(&self) -> bool {
        self.pass_left.get() > 0 && !self.pass_full.get() && self.carry.borrow().is_none()
    }

    /// Applies a batch's events in order until the pass is over; the rest
    /// is carried to the next pass. (The batch's answers are finished when
    /// it is done: when `run` is dropped.)
    fn publish_run(&self, mut run: Carried) {
        while self.pass_left.get() > 0 && !self.pass_full.get() {
            let Some(mut p) = run.events.next() else { return };
            self.pass_left.set(self.pass_left.get() - 1);
            let answer = answer_for(&mut p, run.acks.as_mut());
            self.publish(p, answer);
        }
        if run.events.len() > 0 {
            *self.carry.borrow_mut() = Some(run);
        }
    }

    /// Applies what the last pass carried over, first in this one.
    fn apply_carry(&self) {
        let carried = self.carry.borrow_mut().take();
        if let Some(run) = carried {
            self.publish_run(run);
        }
    }

    fn publish(&self, p: PublishCmd, answer: Answer<'_>) {
        let now = self.pass_clock.get();
        let mut users = self.users.borrow_mut();
        let user = users.entry(p.user.clone()).or_insert_with(|| self.new_user(&p.user, now));
        if let Some(id) = &p.id {
            user.keys.expire(now, self.shared.config.history_ttl);
            if let Some(seq) = user.keys.get(id) {
                bump(&self.handle().metrics.duplicates, 1);
                if let Some(reply) = answer.detach() {
                    // The first publish may still be waiting for its sync.
                    self.answer_after_sync(Deferred::Reply {
                        reply,
                        delivery: Delivery { seq, delivered: 0, duplicate: true },
                    });
                }
                return;
            }
        }
        let (seq, frame, seg) = self.assign(&p.user, user, &p.event, p.ts_ms, p.id.as_deref(), now);
        if let Some(id) = p.id {
            user.keys.insert(id, seq, now, seg);
        }
        if let Some(persist) = self.holding() {
            let held = Deferred::Event {
                user: p.user,
                seq,
                seg,
                frame,
                priority: p.event.priority,
                accepted: p.accepted,
                reply: answer.detach(),
            };
            // A record was just appended, so this is always held.
            let _ = persist.borrow_mut().hold(held);
            return;
        }
        let delivered = self.apply_event(&p.user, user, (seq, seg), frame, p.event.priority, p.accepted, now);
        answer.send(Delivery { seq, delivered, duplicate: false });
        drop(users);
        self.enforce_budget();
    }

    /// The disk engine, when it holds work until the sync (`--fsync always`).
    fn holding(&self) -> Option<&RefCell<Persist>> {
        self.persist.as_ref().filter(|p| p.borrow().hold)
    }

    /// Applies held work whose batch is durable, in the order it was held.
    fn apply_durable(&self, done: u64) {
        let Some(persist) = &self.persist else { return };
        let work = persist.borrow_mut().take_durable(done);
        if work.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        for w in work {
            match w {
                Deferred::Event { user: id, seq, seg, frame, priority, accepted, reply } => {
                    let Some(user) = users.get_mut(&id) else { continue };
                    let delivered = self.apply_event(&id, user, (seq, seg), frame, priority, accepted, now);
                    if let Some(reply) = reply {
                        reply.send(Delivery { seq, delivered, duplicate: false });
                    }
                }
                Deferred::Reply { reply, delivery } => reply.send(delivery),
                Deferred::Broadcast { reply, outcome } => {
                    let _ = reply.send(outcome);
                }
            }
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
            if !s.front.is_oldest(s.seq) {
                continue; // stale: its event already left the history
            }
            let Some(u) = users.get_mut(&s.user) else { continue };
            if u.incarnation == s.incarnation && u.history.first_seq() == Some(s.seq) {
                let before = (u.history.bytes(), u.history.len());
                u.history.pop_front();
                budget.adjust(before, (u.history.bytes(), u.history.len()));
                bump(&self.handle().metrics.history_evicted, 1);
            }
        }
        budget.compact();
    }

    /// Appends an event to a user's history (within `--history-size` and
    /// `--history-bytes`) and enters it in the shard's eviction order.
    fn store_in_history(&self, user_id: &UserId, user: &mut UserState, held: Held) {
        let cfg = &self.shared.config;
        let seq = held.seq;
        let limits = history::Limits { events: cfg.history_size, bytes: cfg.history_bytes };
        self.with_history(user, |h| h.push(held, limits));
        if user.history.first_seq().is_some() {
            let front = user.history.front();
            let stored = Stored { user: user_id.clone(), incarnation: user.incarnation, seq, front };
            self.budget.borrow_mut().stored(stored);
        }
    }

    /// Runs `f` on a user's history and applies the change to the budget.
    fn with_history<R>(&self, user: &mut UserState, f: impl FnOnce(&mut History) -> R) -> R {
        let before = (user.history.bytes(), user.history.len());
        let r = f(&mut user.history);
        self.budget.borrow_mut().adjust(before, (user.history.bytes(), user.history.len()));
        r
    }
}

impl connection::Owner for ShardCore {
    /// Moves held events of a replay still being written into `batch`,
    /// as many as fit; ends the replay once it has reached the user's seq.
    /// A replay overtaken by the history's eviction skips the lost events
    /// (a seq gap, counted as shed, as a slow consumer's queue would).
    fn fill_replay(&self, conn: &Conn, batch: &mut Vec<Outbound>, max_frames: usize, max_bytes: usize) {
        let Some(mut next) = conn.replay_next.get() else { return };
        let users = self.users.borrow();
        let Some(u) = users.get(&conn.user) else {
            conn.replay_next.set(None);
            return;
        };
        let first = u.history.first_seq().unwrap_or(u.applied + 1);
        if next < first {
            bump(&self.handle().metrics.shed[Priority::Normal.index()], first - next);
            next = first;
        }
        let mut bytes: usize = batch.iter().map(|o| o.frame.len()).sum();
        while next <= u.applied && batch.len() < max_frames && bytes < max_bytes {
            let Some(h) = u.history.get_seq(next) else {
                next = u.applied + 1; // cannot happen: held seqs are contiguous up to the latest
                break;
            };
            let frame = if conn.sse { crate::sse::event(&u.epoch, h.seq, &h.frame) } else { h.frame.clone() };
            bytes += frame.len();
            batch.push(Outbound { frame, accepted: None, priority: h.priority });
            next += 1;
        }
        conn.replay_next.set((next <= u.applied).then_some(next));
    }

    fn written(&self, batch: &[Outbound], calls: u64) {
        let now = Instant::now();
        let m = &self.handle().metrics;
        bump(&m.write_calls, calls);
        bump(&m.frames_written, batch.len() as u64);
        let mut events = 0;
        let mut lat = self.latency.borrow_mut();
        for o in batch {
            if let Some(at) = o.accepted {
                events += 1;
                lat.record(o.priority, now.saturating_duration_since(at));
            }
        }
        bump(&m.delivered, events);
    }

    fn deregister(&self, conn: &Conn) {
        ShardCore::deregister(self, conn);
    }
}

impl ShardCore {
    /// Assigns the next seq and encodes the event's frame once; with a disk
    /// engine, logs it. Returns the seq, the frame and the log segment.
    fn assign(
        &self,
        user_id: &UserId,
        user: &mut UserState,
        ev: &PreparedEvent,
        ts_ms: u64,
        id: Option<&str>,
        now: Instant,
    ) -> (u64, Frame, u64) {
        user.seq += 1;
        user.touched = now;
        let frame = protocol::encode_event_frame(user.seq, ev, ts_ms);
        let seg = self
            .persist
            .as_ref()
            .map_or(0, |p| p.borrow_mut().event(user_id.as_str(), user.seq, ts_ms, ev.priority, id, &frame));
        (user.seq, frame, seg)
    }

    /// Stores an assigned event in the history and fans it out to the
    /// user's connections. Returns the number it was queued to.
    #[allow(clippy::too_many_arguments)]
    fn apply_event(
        &self,
        user_id: &UserId,
        user: &mut UserState,
        (seq, seg): (u64, u64),
        frame: Frame,
        priority: Priority,
        accepted: Instant,
        now: Instant,
    ) -> u32 {
        user.applied = seq;
        self.store_in_history(user_id, user, Held { seq, frame: frame.clone(), priority, at: now, seg });
        bump(&self.handle().metrics.published, 1);
        self.fan_out(user, seq, &frame, priority, accepted)
    }

    /// Queues a user's event to each of its live (non-pending) connections.
    /// Returns the number it was queued to.
    fn fan_out(
        &self,
        user: &UserState,
        seq: u64,
        frame: &Frame,
        priority: Priority,
        accepted: Instant,
    ) -> u32 {
        let m = &self.handle().metrics;
        let conns = self.conns.borrow();
        let mut delivered = 0;
        // Encoded once per transport that needs it, not once per connection.
        let mut sse_frame: Option<Frame> = None;
        for &key in &user.conns {
            let Some(conn) = conns.get(key).filter(|c| !c.pending.get()) else { continue };
            let wire = match conn.sse {
                true => sse_frame.get_or_insert_with(|| crate::sse::event(&user.epoch, seq, frame)).clone(),
                false => frame.clone(),
            };
            let out = Outbound { frame: wire, accepted: Some(accepted), priority };
            match conn.push_event(out) {
                Enqueued::Queued { shed } => {
                    delivered += 1;
                    if conn.half_full() {
                        self.pass_full.set(true);
                    }
                    for (counter, n) in m.shed.iter().zip(shed) {
                        if n > 0 {
                            bump(counter, n as u64);
                        }
                    }
                }
                Enqueued::Deferred => delivered += 1,
                Enqueued::Shed => bump(&m.shed[priority.index()], 1),
                Enqueued::Overflow => {
                    bump(&m.shed[priority.index()], 1);
                    bump(&m.slow_closed, 1);
                    conn.close_now(1013, "slow consumer: queue full of high-priority events");
                }
            }
        }
        delivered
    }

    /// Publishes `ev` to every user with a live connection; with `--fsync
    /// always` the answer (and every delivery) waits for the sync.
    fn broadcast(
        &self,
        ev: &PreparedEvent,
        accepted: Instant,
        ts_ms: u64,
        reply: oneshot::Sender<BroadcastOutcome>,
    ) {
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let mut out = BroadcastOutcome::default();
        let holding = self.holding();
        for (id, user) in users.iter_mut().filter(|(_, u)| !u.conns.is_empty()) {
            out.users += 1;
            let (seq, frame, seg) = self.assign(id, user, ev, ts_ms, None, now);
            if let Some(persist) = holding {
                out.delivered += user.conns.len() as u64;
                let held = Deferred::Event {
                    user: id.clone(),
                    seq,
                    seg,
                    frame,
                    priority: ev.priority,
                    accepted,
                    reply: None,
                };
                let _ = persist.borrow_mut().hold(held);
            } else {
                out.delivered +=
                    self.apply_event(id, user, (seq, seg), frame, ev.priority, accepted, now) as u64;
            }
        }
        drop(users);
        if holding.is_none() {
            self.enforce_budget();
        }
        self.answer_after_sync(Deferred::Broadcast { reply, outcome: out });
    }

    /// Sends an answer now, or with `--fsync always` once everything logged
    /// before it is synced.
    fn answer_after_sync(&self, answer: Deferred) {
        let now = match self.holding() {
            Some(persist) => persist.borrow_mut().hold(answer),
            None => Some(answer),
        };
        match now {
            Some(Deferred::Reply { reply, delivery }) => reply.send(delivery),
            Some(Deferred::Broadcast { reply, outcome }) => drop(reply.send(outcome)),
            Some(Deferred::Event { .. }) | None => {}
        }
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
            Peer::User { user, resume, sse } => match self.engine().cloned() {
                Some(engine) => self.attach_remote(&engine, user, resume, sse),
                None => self.attach_user(user, resume, sse),
            },
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
        let user = users.entry(user_id.clone()).or_insert_with(|| self.new_user(&user_id, now));
        self.with_history(user, |h| h.expire(now, cfg.history_ttl));

        // Per-user limit: evict the oldest connections (4001).
        while user.conns.len() >= cfg.max_conns_per_user {
            let oldest = user.conns.remove(0);
            if let Some(c) = self.conns.borrow().get(oldest) {
                bump(&self.handle().metrics.evicted, 1);
                c.close_now(4001, "evicted: too many connections for this user");
            }
        }

        let kind = if sse { connection::Kind::Sse } else { connection::Kind::WebSocket };
        let conn = self.register(user_id.clone(), kind);
        user.conns.push(conn.key);
        self.queue_welcome(&conn, user, resume.as_ref());
        conn
    }

    /// Queues a connection's `welcome` (the user's epoch and applied seq,
    /// and for a resume whether it is recovered), then starts the replay a
    /// recovered resume needs.
    fn queue_welcome(&self, conn: &Conn, user: &UserState, resume: Option<&Resume>) {
        let (recovered, replay_from) = match resume {
            None => (None, None),
            Some(r) if r.epoch.as_deref().is_some_and(|e| e != &*user.epoch) => (Some(false), None),
            Some(r) => match user.history.plan_replay(r.since, user.applied) {
                Replay::From(seq) => (Some(true), (seq <= user.applied).then_some(seq)),
                Replay::Impossible => (Some(false), None),
            },
        };
        let welcome = protocol::welcome_json(&Welcome {
            user: &conn.user,
            conn: &conn.id,
            epoch: &user.epoch,
            seq: user.applied,
            recovered,
            ping_ms: self.shared.config.ping_interval.as_millis() as u64,
        });
        conn.push_control(if conn.sse {
            crate::sse::message("welcome", welcome.as_bytes())
        } else {
            crate::wsframe::text_frame(welcome.as_bytes())
        });
        if let Some(seq) = replay_from {
            conn.start_replay(seq);
        }
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
        if !conn.echo {
            self.leave_remote(conn);
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
            seq: u.applied,
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
        if let Some(p) = &self.persist {
            let p = p.borrow();
            let (bytes, segments) = p.log.disk_usage();
            let (syncs, sync_us) = p.log.sync_stats();
            m.store_bytes.store(bytes, Relaxed);
            m.store_segments.store(segments as u64, Relaxed);
            m.store_syncs.store(syncs, Relaxed);
            m.store_sync_us.store(sync_us, Relaxed);
            for (slot, n) in m.store_sync_buckets.iter().zip(p.log.sync_histogram()) {
                slot.store(n, Relaxed);
            }
        }
        self.handle().latency.store(Arc::new(self.latency.borrow().clone()));
    }

    /// Expires history and forgets users with no connection and nothing
    /// touched for `history_ttl` (their next state gets a new epoch).
    fn sweep_users(&self, now: Instant) {
        let ttl = self.shared.config.history_ttl;
        let mut users = self.users.borrow_mut();
        let before = users.len();
        let mut budget = self.budget.borrow_mut();
        let mut persist = self.persist.as_ref().map(|p| p.borrow_mut());
        users.retain(|id, u| {
            let before = (u.history.bytes(), u.history.len());
            u.history.expire(now, ttl);
            u.keys.expire(now, ttl);
            // Never while events wait for their sync (`touched` is recent then anyway).
            let keep = !(u.conns.is_empty() && now.duration_since(u.touched) >= ttl && u.applied == u.seq);
            if !keep {
                if let Some(p) = persist.as_mut() {
                    p.dropped(id.as_str());
                }
            }
            let after = if keep { (u.history.bytes(), u.history.len()) } else { (0, 0) };
            budget.adjust(before, after);
            keep
        });
        let gone = (before - users.len()) as u64;
        if gone > 0 {
            self.handle().metrics.users.fetch_sub(gone, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reclaims the oldest log segment once two no longer take appends:
    /// whatever in it is still live (a user's epoch, held events, idempotency
    /// keys) is written again to the current segment, and the segment is
    /// deleted once that is durable (the syncer syncs before it deletes).
    /// Disk use so stays near what history holds, plus two segments.
    fn reclaim_segments(&self) {
        let Some(persist) = &self.persist else { return };
        let Some(old) = persist.borrow().reclaimable(2) else { return };
        if persist.borrow().has_held() {
            return; // events waiting for their sync are in no history yet
        }
        let clock = (Instant::now(), protocol::unix_ms());
        let mut users = self.users.borrow_mut();
        let mut p = persist.borrow_mut();
        let carried: u64 =
            users.iter_mut().map(|(id, u)| relog(&mut p, id, u, |seg| seg <= old, clock)).sum();
        p.commit();
        p.log.remove_segment(old);
        tracing::debug!(shard = self.id, segment = old, carried, "reclaimed a log segment");
    }

    /// Ends a pass: its log records go to the syncer as one batch.
    fn commit_pass(&self) {
        if let Some(p) = &self.persist {
            p.borrow_mut().commit();
        }
    }

    /// At shutdown: waits (until `deadline`) for held work to become durable
    /// and applies it, so everything accepted is delivered before the drain.
    async fn settle_held(&self, deadline: Instant) {
        let Some(p) = &self.persist else { return };
        while p.borrow().has_held() && Instant::now() < deadline && p.borrow().log.failed().is_none() {
            let done = p.borrow().log.done();
            self.apply_durable(done);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Syncs and closes the log; what was still held is durable then and is
    /// answered (its connections are mostly gone).
    fn close_store(&self) {
        let Some(p) = &self.persist else { return };
        let closed = p.borrow_mut().log.finish();
        match closed {
            Ok(()) => self.apply_durable(u64::MAX),
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "could not close the shard's log");
                bump(&self.handle().metrics.store_failed, 1);
            }
        }
    }

    /// Rebuilds this shard's users from its log at start. Users idle past
    /// `--history-ttl` during the downtime are not restored (their next
    /// state starts over); after an unclean stop without `--fsync always`,
    /// or when the log was damaged (not just cut short), every restored user
    /// gets a new epoch, since clients may have seen events that are gone.
    fn restore(&self, recovered: crate::engine::log::Recovered) {
        let Some(persist) = &self.persist else { return };
        let cfg = &self.shared.config;
        let fsync_always = cfg.data.as_ref().is_some_and(|d| d.fsync == crate::config::Fsync::Always);
        let damaged = recovered.truncated.as_ref().is_some_and(|t| !t.reason.starts_with("torn"));
        let fresh_epochs = damaged || (!self.shared.store_was_clean && !fsync_always);
        if let Some(t) = &recovered.truncated {
            tracing::warn!(
                shard = self.id,
                segment = t.at.segment,
                offset = t.at.offset,
                dropped_bytes = t.dropped,
                reason = t.reason,
                "cut the log's tail"
            );
        }
        let (restored, skipped) = super::persist::replay(&recovered.records);
        if skipped > 0 {
            tracing::warn!(shard = self.id, records = skipped, "skipped log records this build cannot read");
        }
        let now = Instant::now();
        let now_ms = protocol::unix_ms();
        let ttl_ms = cfg.history_ttl.as_millis() as u64;
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(now_ms.saturating_sub(ms))).unwrap_or(now);
        let mut users = self.users.borrow_mut();
        let mut count = 0;
        for (name, r) in restored {
            let Ok(id) = UserId::parse(&name) else { continue };
            if now_ms.saturating_sub(r.last_ms) >= ttl_ms {
                continue; // idle past its TTL while the broker was down
            }
            let (n, new_epoch) = self.next_incarnation();
            let epoch: Rc<str> = if fresh_epochs { new_epoch } else { r.epoch.as_str().into() };
            let mut user = UserState::new(n, (epoch, 0), r.seq, ago(r.last_ms));
            for (seq, (at_ms, priority, frame)) in r.events {
                if now_ms.saturating_sub(at_ms) < ttl_ms {
                    self.store_in_history(
                        &id,
                        &mut user,
                        Held { seq, frame, priority, at: ago(at_ms), seg: 0 },
                    );
                }
            }
            let mut keys: Vec<_> =
                r.keys.into_iter().filter(|(_, (_, at))| now_ms.saturating_sub(*at) < ttl_ms).collect();
            keys.sort_by_key(|(_, (_, at))| *at);
            for (key, (seq, at_ms)) in keys {
                user.keys.insert(key.into(), seq, ago(at_ms), 0);
            }
            // What was restored (a fresh epoch included) is written again to
            // the current segment, so older segments hold nothing live after
            // a restart and are reclaimed as the log grows.
            relog(&mut persist.borrow_mut(), &id, &mut user, |_| true, (now, now_ms));
            users.insert(id, user);
            count += 1;
        }
        bump(&self.handle().metrics.users, count);
        drop(users);
        self.commit_pass();
        self.enforce_budget();
        tracing::info!(shard = self.id, users = count, fresh_epochs, "restored from the data directory");
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

/// Writes again, to the log's current segment, what of a user's state lives
/// in segments `stale` selects — its epoch, held events and idempotency
/// keys — so those segments can be deleted. Times stay what they were (the
/// epoch record carries the user's last activity, so a restart does not
/// restart its TTL); `clock` is one (monotonic, unix ms) reading of now.
/// Returns the records written.
fn relog(
    p: &mut Persist,
    id: &UserId,
    u: &mut UserState,
    stale: impl Fn(u64) -> bool,
    clock: (Instant, u64),
) -> u64 {
    let (now, now_ms) = clock;
    let ms_of = |at: Instant| now_ms.saturating_sub(now.saturating_duration_since(at).as_millis() as u64);
    let mut written = 0;
    if stale(u.epoch_seg) {
        u.epoch_seg = p.epoch(id.as_str(), &u.epoch, ms_of(u.touched));
        written += 1;
    }
    for h in u.history.iter_mut().filter(|h| stale(h.seg)) {
        h.seg = p.event(id.as_str(), h.seq, ms_of(h.at), h.priority, None, &h.frame);
        written += 1;
    }
    for k in u.keys.iter_mut().filter(|k| stale(k.seg)) {
        k.seg = p.key(id.as_str(), &k.id, k.seq, ms_of(k.at));
        written += 1;
    }
    written
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
/// arrives and its connections have drained. Publishes the thread's runtime
/// on the shard's handle (the API listener spawns connections onto it) and
/// says so on `started`. With `--data-dir`, first opens
/// the shard's log and restores its users from it, and last closes the log
/// (synced).
pub fn run(id: usize, shared: Arc<Shared>, started: std::sync::mpsc::Sender<()>) -> std::io::Result<Latency> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    shared.shards[id].set_runtime(rt.handle().clone());
    let _ = started.send(());
    let local = tokio::task::LocalSet::new();
    let (persist, recovered) = match &shared.config.data {
        Some(d) => {
            let (p, r) = Persist::open(&d.dir, id, d.fsync, d.segment_size)?;
            (Some(p), Some(r))
        }
        None => (None, None),
    };
    let latency = local.block_on(&rt, async move {
        let core = Rc::new(ShardCore::new(id, shared, persist));
        if let Some(r) = recovered {
            core.restore(r);
        }
        tokio::task::spawn_local(housekeeping(core.clone()));
        if core.persist.is_some() {
            tokio::task::spawn_local(durability_pump(core.clone()));
        }
        let deadline = drain_ring(&core).await;
        core.settle_held(deadline).await;
        core.begin_drain(deadline);
        // Listeners are closed: wait for connections to flush and close,
        // bounded by the deadline (a stalled client cannot hold shutdown).
        // Late commands are still applied, so nobody waits on a dropped reply.
        while core.connection_count() > 0 && Instant::now() < deadline {
            core.start_pass();
            core.apply_carry();
            while core.carry.borrow().is_none() {
                let Some(cmd) = core.handle().ring.pop() else { break };
                core.apply(cmd);
                core.pass_left.set(MAX_PASS); // this loop takes all it finds
                core.pass_full.set(false);
            }
            core.commit_pass();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        core.close_store();
        core.latency.take()
    });
    Ok(latency)
}

/// Applies commands until the shutdown command; returns its drain deadline.
async fn drain_ring(core: &Rc<ShardCore>) -> Instant {
    let ring = &core.handle().ring;
    loop {
        if core.carry.borrow().is_none() {
            std::future::poll_fn(|cx| ring.poll_ready(cx)).await;
        }
        core.start_pass();
        core.apply_carry();
        while core.pass_open() {
            let Some(cmd) = ring.pop() else { break };
            if let Some(deadline) = core.apply(cmd) {
                core.commit_pass();
                return deadline;
            }
        }
        // One group commit per pass (a no-op without --data-dir).
        core.commit_pass();
        // Let the writers woken by this batch flush before taking more.
        tokio::task::yield_now().await;
    }
}

/// With `--fsync always`: applies held work as its batches become durable.
async fn durability_pump(core: Rc<ShardCore>) {
    let mut seen = 0;
    loop {
        let done = std::future::poll_fn(|cx| match &core.persist {
            Some(p) => p.borrow().log.poll_done(seen, cx),
            None => Poll::Pending,
        })
        .await;
        if let Some(e) = core.persist.as_ref().and_then(|p| p.borrow().log.failed().map(str::to_string)) {
            // Nothing more becomes durable: held publishes are never answered
            // (their publishers see 503 and retry with their ids elsewhere).
            tracing::error!(shard = core.id, error = %e, "the shard's log failed; publishes are no longer answered");
            bump(&core.handle().metrics.store_failed, 1);
            return;
        }
        seen = done;
        core.apply_durable(done);
    }
}

/// Heartbeats (pings, idle timeout) and the user sweep.
async fn housekeeping(core: Rc<ShardCore>) {
    let cfg = &core.shared.config;
    let tick = (cfg.ping_interval.min(cfg.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let sweep_every = (cfg.history_ttl / 8).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut last_sweep = Instant::now();
    // Cluster mode: users connected here are kept from expiring in Redis.
    let touch_every = (cfg.history_ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut last_touch = Instant::now();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        core.heartbeat(now);
        core.reclaim_segments();
        if now.duration_since(last_touch) >= touch_every {
            core.touch_remote();
            last_touch = now;
        }
        if now.duration_since(last_sweep) >= sweep_every {
            core.sweep_users(now);
            last_sweep = now;
        }
    }
}
