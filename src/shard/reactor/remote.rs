//! The shard's side of cluster mode (`--cluster`): the shard keeps, for each
//! user with a connection here, a local copy of the user's recent history
//! (a cache of the Redis stream, contiguous up to `applied`), and feeds it
//! only from Redis: Pub/Sub messages in seq order, and reads of the stream
//! when a connection arrives or a gap shows.
//!
//! Rules that keep delivery exact:
//! - A user's live messages are applied in seq order: one at `applied + 1`
//!   is delivered, one at or below `applied` is a duplicate and dropped, one
//!   further ahead (a lost message, or a subscription just made) parks the
//!   user in `Syncing` — later messages are buffered — while the stream is
//!   read from `applied + 1`; then the read and the buffer are applied in
//!   order. A gap the stream no longer covers (trimmed), or a new epoch
//!   (Redis lost the user's state), closes the user's connections with 1012
//!   so their clients resume and learn what was lost.
//! - A new connection is `pending` (no events) until the shard has
//!   subscribed to the user's channel and read the user's state; then it
//!   gets its `welcome` and, for a resume, a replay from the local history.
//! - The user's local state is dropped when its last connection here
//!   closes (and its channel unsubscribed): it is only a cache.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::live::Live;
use crate::cluster::{Engine, EngineError, Outgoing, StoredEvent, Synced};
use crate::connection::{self, Conn};
use crate::metrics::bump;
use crate::protocol::{Priority, UserId};
use crate::shard::history::Held;
use crate::shard::Resume;

use super::{ShardCore, SyncState, UserState};

/// Most live messages a syncing user buffers; past it the buffer is
/// dropped and the messages are read back from the stream instead.
const MAX_BUFFERED: usize = 10_000;

/// How long a gap fill keeps retrying an unreachable Redis before the
/// user's connections are closed (1012) to resume later.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(10);

/// What a gap read found.
enum GapRead {
    Read(Synced),
    /// Behind what was already delivered from Redis: Redis lost writes.
    Behind(Synced),
    /// Redis stayed unreachable for [`CATCH_UP_PATIENCE`].
    Failed(EngineError),
}

/// A live event waiting for its user's sync.
pub(super) struct Parked {
    epoch: Arc<str>,
    seq: u64,
    priority: Priority,
    at_us: u64,
    body: bytes::Bytes,
}

/// Converts a unix-µs acceptance time into this process's monotonic clock.
fn instant_of(at_us: u64, now: Instant) -> Instant {
    let age = crate::protocol::unix_us().saturating_sub(at_us);
    now.checked_sub(Duration::from_micros(age)).unwrap_or(now)
}

impl ShardCore {
    pub(super) fn engine(&self) -> Option<&Arc<Engine>> {
        self.shared.cluster.as_ref()
    }

    /// Registers a connection of a user in cluster mode: pending until the
    /// user's state is read from Redis ([`ShardCore::attached`]).
    pub(super) fn attach_remote(
        self: &Rc<Self>,
        engine: &Arc<Engine>,
        user_id: UserId,
        resume: Option<Resume>,
        sse: bool,
    ) -> Rc<Conn> {
        let now = Instant::now();
        let mut users = self.users.borrow_mut();
        let user = users.entry(user_id.clone()).or_insert_with(|| self.remote_user(now));
        let kind = if sse { connection::Kind::Sse } else { connection::Kind::WebSocket };
        let conn = self.register(user_id.clone(), kind);
        conn.pending.set(true);
        user.conns.push(conn.key);
        // Read from the earliest seq this connection or the local copy needs
        // — also while a gap read is in flight: a read of the seq alone would
        // look like a hole past what the live connections have, and close them.
        let local_next = (user.applied > 0).then_some(user.applied + 1);
        let resume_next = resume.as_ref().map(|r| r.since + 1);
        let from = match (local_next, resume_next) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => 0,
        };
        drop(users);
        let subscribed = engine.subscribe(&user_id);
        let (core, engine, c) = (self.clone(), engine.clone(), conn.clone());
        let member = engine.member(&conn.id);
        tokio::task::spawn_local(async move {
            let r = match subscribed.await {
                Ok(true) => engine.sync(&user_id, from, Some(&member)).await,
                _ => Err(EngineError::Unavailable("Pub/Sub is down".into())),
            };
            core.attached(&c, resume, r);
            core.run_pending_catch_ups();
        });
        conn
    }

    fn remote_user(&self, now: Instant) -> UserState {
        let (n, _) = self.next_incarnation();
        bump(&self.handle().metrics.users, 1);
        let mut u = UserState::new(n, ("".into(), 0), 0, now);
        u.sync = SyncState::Syncing(Vec::new());
        u
    }

    /// A pending connection's read came back: merge it, then queue the
    /// `welcome` (and a replay for a resume).
    fn attached(&self, conn: &Rc<Conn>, resume: Option<Resume>, r: Result<Synced, EngineError>) {
        if conn.is_closing() || !self.conns.borrow().contains(conn.key) {
            return;
        }
        let s = match r {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a user's state from Redis");
                conn.close_now(1012, "cluster engine unavailable; reconnect");
                return;
            }
        };
        let mut users = self.users.borrow_mut();
        let Some(user) = users.get_mut(&conn.user) else { return };
        // The client saw its seqs before it connected, so before this read:
        // a read behind them means Redis lost them. (The node's own copy is
        // no such witness here: it may hold events published after the read.)
        let client_ahead =
            resume.as_ref().is_some_and(|r| r.epoch.as_deref() == Some(&*s.epoch) && r.since > s.seq);
        if client_ahead {
            drop(users);
            self.history_regressed(&conn.user, &s.epoch);
            return;
        }
        self.reconcile(&conn.user, user, s);
        conn.pending.set(false);
        self.queue_welcome(conn, user, resume.as_ref());
        let parked = user.sync.take_parked();
        self.apply_parked(&conn.user, user, parked);
    }

    /// Redis has less of a user's history than was already seen (a restart
    /// that lost acknowledged writes): give the user a new epoch in Redis and
    /// close its connections here (1012), so clients resume and learn
    /// `recovered:false` instead of taking reassigned seqs as duplicates.
    fn history_regressed(&self, user_id: &UserId, epoch: &str) {
        tracing::warn!(user = %user_id.as_str(), "Redis lost part of a user's history; starting a new epoch");
        if let Some(u) = self.users.borrow().get(user_id) {
            let conns = self.conns.borrow();
            for c in u.conns.iter().filter_map(|k| conns.get(*k)) {
                bump(&self.handle().metrics.resync_closed, 1);
                c.close_now(1012, "the user's history was lost; resume");
            }
        }
        let Some(engine) = self.engine().cloned() else { return };
        let (user, epoch) = (user_id.clone(), epoch.to_string());
        tokio::task::spawn_local(async move {
            if let Err(e) = engine.renew_epoch(&user, &epoch).await {
                tracing::warn!(error = %e, "could not renew a user's epoch");
            }
        });
    }

    /// Merges a read of the user's state into the local copy. Closes the
    /// user's live (non-pending) connections with 1012 when the epoch
    /// changed or the stream no longer covers what they are missing.
    fn reconcile(&self, user_id: &UserId, user: &mut UserState, s: Synced) {
        let now = Instant::now();
        let fresh = *user.epoch != *s.epoch;
        if fresh {
            if !user.epoch.is_empty() {
                self.close_live(user, "the user's history was lost; resume");
            }
            user.epoch = Rc::from(&*s.epoch);
            self.with_history(user, |h| h.clear());
            user.applied = 0;
        }
        let contiguous = contiguous_tail(&s.events, s.seq);
        let first_fetched = contiguous.first().map_or(s.seq + 1, |e| e.seq);
        let local_first = user.history.first_seq().unwrap_or(user.applied + 1);
        // The read replaces the copy when it covers everything held here (or
        // nothing is held), or when a hole lies between the two — which the
        // live connections cannot get past, so they are closed to resume.
        let covers = user.applied == 0 && user.history.is_empty() || first_fetched <= local_first;
        let hole = !covers && first_fetched > user.applied + 1;
        // What the live connections have had (none are left after a new
        // epoch or a hole: they are closed).
        let live_had = (!fresh && !hole).then_some(user.applied);
        if hole {
            self.close_live(user, "missed events are no longer in history; resume");
        }
        if covers || hole {
            // Plus any local events newer than the read (none after a hole).
            let newer: Vec<Held> =
                (s.seq + 1..=user.applied).filter_map(|q| user.history.get_seq(q).cloned()).collect();
            self.with_history(user, |h| h.clear());
            for e in contiguous {
                self.store_in_history(user_id, user, held_of(e, now));
            }
            for h in newer {
                self.store_in_history(user_id, user, h);
            }
        } else {
            let after = user.applied;
            for e in contiguous.iter().filter(|e| e.seq > after) {
                user.applied = e.seq;
                self.store_in_history(user_id, user, held_of(e, now));
            }
        }
        user.applied = user.applied.max(s.seq);
        user.seq = user.applied;
        user.touched = now;
        if let Some(had) = live_had {
            self.deliver_read(user, had);
        }
    }

    /// Delivers to the live connections what a read added past `had`: a gap
    /// fill, or events a connection's read found before their Pub/Sub
    /// messages came (those are then dropped as already applied).
    fn deliver_read(&self, user: &UserState, had: u64) {
        for seq in had + 1..=user.applied {
            if let Some(h) = user.history.get_seq(seq) {
                self.fan_out(user, seq, &h.frame, h.priority, h.at);
            }
        }
    }

    /// Closes the user's connections that have had their `welcome` (1012).
    fn close_live(&self, user: &UserState, reason: &str) {
        let conns = self.conns.borrow();
        for c in user.conns.iter().filter_map(|k| conns.get(*k)).filter(|c| !c.pending.get()) {
            bump(&self.handle().metrics.resync_closed, 1);
            c.close_now(1012, reason);
        }
    }

    /// Applies one Pub/Sub message for this shard.
    pub(super) fn apply_live(self: &Rc<Self>, msg: Live) {
        let Some(engine) = self.engine().cloned() else { return };
        match msg {
            Live::Event { user, epoch, seq, priority, at_us, body } => {
                let mut users = self.users.borrow_mut();
                let Some(u) = users.get_mut(&user) else { return };
                let parked = Parked { epoch, seq, priority, at_us, body };
                if let SyncState::Syncing(buf) = &mut u.sync {
                    if buf.len() < MAX_BUFFERED {
                        buf.push(parked);
                    } else {
                        buf.clear();
                    }
                    return;
                }
                if let Some(gap) = self.apply_one(&user, u, parked) {
                    u.sync = SyncState::Syncing(vec![gap]);
                    let from = u.applied + 1;
                    drop(users);
                    self.catch_up(&engine, user, from);
                }
            }
            Live::Evict { user, members } => self.evict(&engine, &user, &members),
            Live::Drop { user } => {
                self.drop_user(&user);
            }
            Live::Broadcast { bid, priority, at_us, tail } => {
                self.broadcast_remote(&engine, &bid, priority, at_us, tail)
            }
            Live::Resync => {
                let mut users = self.users.borrow_mut();
                let mut todo = Vec::new();
                for (id, u) in users.iter_mut().filter(|(_, u)| matches!(u.sync, SyncState::Ready)) {
                    u.sync = SyncState::Syncing(Vec::new());
                    todo.push((id.clone(), u.applied + 1));
                }
                drop(users);
                for (id, from) in todo {
                    self.catch_up(&engine, id, from);
                }
            }
        }
    }

    /// Delivers one live event to a ready user in order; hands it back when
    /// it is ahead of the next seq (or of another epoch): a gap to fill.
    fn apply_one(&self, user_id: &UserId, u: &mut UserState, p: Parked) -> Option<Parked> {
        if *p.epoch != *u.epoch {
            return Some(p);
        }
        if p.seq <= u.applied {
            // Pub/Sub never repeats a message; an older seq is one a gap read
            // already delivered — unless its event differs from the one held,
            // which means Redis lost writes and reassigned that seq.
            let differs =
                u.history.get_seq(p.seq).is_some_and(|h| crate::wsframe::payload(&h.frame) != &p.body[..]);
            if differs {
                self.regressions.borrow_mut().push((user_id.clone(), p.epoch.to_string()));
            } else {
                bump(&self.handle().metrics.duplicates, 1);
            }
            return None;
        }
        if p.seq != u.applied + 1 {
            return Some(p);
        }
        let now = Instant::now();
        let frame = crate::wsframe::text_frame(&p.body);
        u.seq = p.seq;
        u.touched = now;
        self.apply_event(user_id, u, (p.seq, 0), frame, p.priority, instant_of(p.at_us, now), now);
        None
    }

    /// Applies parked events in order after a sync; a new gap starts another.
    fn apply_parked(&self, user_id: &UserId, u: &mut UserState, parked: Vec<Parked>) {
        u.sync = SyncState::Ready;
        let mut rest = parked.into_iter();
        while let Some(p) = rest.next() {
            if *p.epoch != *u.epoch {
                continue; // from before the epoch the sync found
            }
            if let Some(gap) = self.apply_one(user_id, u, p) {
                let mut buf = vec![gap];
                buf.extend(rest);
                u.sync = SyncState::Syncing(buf);
                let from = u.applied + 1;
                if let Some(engine) = self.engine().cloned() {
                    self.pending_catch_ups.borrow_mut().push((user_id.clone(), from, engine));
                }
                return;
            }
        }
        drop(rest);
        self.enforce_budget_later.set(true);
    }

    /// Reads the user's stream from `from` and applies it, then what was parked.
    fn catch_up(self: &Rc<Self>, engine: &Arc<Engine>, user: UserId, from: u64) {
        bump(&self.handle().metrics.catch_ups, 1);
        let (core, engine) = (self.clone(), engine.clone());
        tokio::task::spawn_local(async move {
            // Redis may be coming back (Pub/Sub resubscribed before the
            // command link reconnected): retry for a while before giving up.
            let deadline = Instant::now() + CATCH_UP_PATIENCE;
            let mut pause = Duration::from_millis(20);
            let r = loop {
                match engine.sync(&user, from, None).await {
                    // Delivered (so written to Redis) before this read began:
                    // a read behind it means Redis lost acknowledged writes.
                    Ok(s) if s.seq + 1 < from => break GapRead::Behind(s),
                    Err(EngineError::Unavailable(_)) if Instant::now() + pause < deadline => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                    Ok(s) => break GapRead::Read(s),
                    Err(e) => break GapRead::Failed(e),
                }
            };
            core.caught_up(&user, r);
        });
    }

    fn caught_up(self: &Rc<Self>, user_id: &UserId, r: GapRead) {
        let mut users = self.users.borrow_mut();
        let Some(u) = users.get_mut(user_id) else { return };
        match r {
            GapRead::Behind(s) if *u.epoch == *s.epoch => {
                drop(users);
                self.history_regressed(user_id, &s.epoch);
                return;
            }
            GapRead::Read(s) | GapRead::Behind(s) => {
                self.reconcile(user_id, u, s);
                let parked = u.sync.take_parked();
                self.apply_parked(user_id, u, parked);
            }
            GapRead::Failed(e) => {
                tracing::warn!(error = %e, "could not fill a gap from Redis; closing the user's connections");
                self.close_live(u, "cluster engine unavailable; resume");
                u.sync = SyncState::Ready;
            }
        }
        drop(users);
        self.run_pending_catch_ups();
    }

    /// Starts catch-ups decided while the user map was borrowed.
    pub(super) fn run_pending_catch_ups(self: &Rc<Self>) {
        let regressed = std::mem::take(&mut *self.regressions.borrow_mut());
        for (user, epoch) in regressed {
            self.history_regressed(&user, &epoch);
        }
        let todo = std::mem::take(&mut *self.pending_catch_ups.borrow_mut());
        for (user, from, engine) in todo {
            self.catch_up(&engine, user, from);
        }
        if self.enforce_budget_later.replace(false) {
            self.enforce_budget();
        }
    }

    /// Closes this node's connections named in `members` (4001).
    fn evict(&self, engine: &Engine, user: &UserId, members: &[String]) {
        let users = self.users.borrow();
        let Some(u) = users.get(user) else { return };
        let conns = self.conns.borrow();
        for m in members {
            let Some(id) = engine.local_conn(m) else { continue };
            if let Some(c) = u.conns.iter().filter_map(|k| conns.get(*k)).find(|c| c.id == id) {
                bump(&self.handle().metrics.evicted, 1);
                c.close_now(4001, "evicted: too many connections for this user");
            }
        }
    }

    /// Publishes a broadcast to each user with a connection here, under the
    /// broadcast's idempotency key, so a user connected to several nodes
    /// gets it once.
    fn broadcast_remote(
        &self,
        engine: &Arc<Engine>,
        bid: &str,
        priority: Priority,
        at_us: u64,
        tail: bytes::Bytes,
    ) {
        let users: Vec<UserId> = self
            .users
            .borrow()
            .iter()
            .filter(|(_, u)| !u.conns.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        if users.is_empty() {
            return;
        }
        let engine = engine.clone();
        let key = Engine::broadcast_key(bid);
        tokio::task::spawn_local(async move {
            let ev = Outgoing { tail: &tail, priority, at_us };
            let calls = users.iter().map(|u| engine.publish(u, &ev, Some(&key)));
            for r in futures_util::future::join_all(calls).await {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "a broadcast publish failed");
                }
            }
        });
    }

    /// A connection closed: forget it in Redis; past the user's last one
    /// here, unsubscribe and drop the local copy.
    pub(super) fn leave_remote(&self, conn: &Conn) {
        let Some(engine) = self.engine().cloned() else { return };
        let member = engine.member(&conn.id);
        let user = conn.user.clone();
        let mut users = self.users.borrow_mut();
        let last = users.get(&user).is_some_and(|u| u.conns.is_empty());
        if last {
            if let Some(mut u) = users.remove(&user) {
                self.with_history(&mut u, |h| h.clear());
                self.handle().metrics.users.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            engine.unsubscribe(&user);
        }
        drop(users);
        tokio::task::spawn_local(async move {
            let _ = engine.leave(&user, &member).await;
        });
    }

    /// Keeps users connected here from expiring in Redis.
    pub(super) fn touch_remote(&self) {
        let Some(engine) = self.engine().cloned() else { return };
        let conns = self.conns.borrow();
        let work: Vec<(UserId, Vec<String>)> = self
            .users
            .borrow()
            .iter()
            .filter(|(_, u)| !u.conns.is_empty())
            .map(|(id, u)| {
                let members =
                    u.conns.iter().filter_map(|k| conns.get(*k)).map(|c| engine.member(&c.id)).collect();
                (id.clone(), members)
            })
            .collect();
        if work.is_empty() {
            return;
        }
        tokio::task::spawn_local(async move {
            let calls = work.iter().map(|(u, m)| engine.touch(u, m));
            futures_util::future::join_all(calls).await;
        });
    }
}

/// The events of a read that run without a hole up to `seq` (a trimmed
/// stream may start late; anything before a hole is useless).
fn contiguous_tail(events: &[StoredEvent], seq: u64) -> &[StoredEvent] {
    let mut start = events.len();
    let mut expect = seq;
    for (i, e) in events.iter().enumerate().rev() {
        if e.seq != expect {
            break;
        }
        start = i;
        expect = expect.saturating_sub(1);
    }
    &events[start..]
}

fn held_of(e: &StoredEvent, now: Instant) -> Held {
    Held {
        seq: e.seq,
        frame: crate::wsframe::text_frame(&e.body),
        priority: e.priority,
        at: instant_of(e.at_us, now),
        seg: 0,
    }
}

impl SyncState {
    /// Takes the parked events (the state stays as it is).
    fn take_parked(&mut self) -> Vec<Parked> {
        match self {
            SyncState::Syncing(buf) => std::mem::take(buf),
            SyncState::Ready => Vec::new(),
        }
    }
}
