//! A shard's side of the disk engine (`--data-dir`): its log, the records
//! it writes as users are created, published to and dropped, what it reads
//! back at start, and — with `--fsync always` — the work held until its
//! batch is on stable storage (replies, history, fan-out), so nothing is
//! answered or delivered before it is durable (contract §10).
//!
//! With `--fsync <duration>` or `never` nothing is held: events are applied
//! at once and the log is synced by policy; an unclean stop then gives every
//! restored user a new epoch.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::config::Fsync;
use crate::engine::log::{Log, Record, Recovered, SyncPolicy};
use crate::engine::records::{self, Entry};
use crate::protocol::Priority;
use crate::shard::{BroadcastOutcome, Delivery};
use crate::wsframe::Frame;

/// Work waiting for its batch to be durable.
pub enum Deferred {
    /// An event with its seq assigned: store, fan out, answer.
    Event {
        user: crate::protocol::UserId,
        seq: u64,
        /// The log segment its record is in.
        seg: u64,
        frame: Frame,
        priority: Priority,
        accepted: Instant,
        reply: Option<crate::acks::Ack>,
    },
    /// The answer to a duplicate publish (its original may be in this batch).
    Reply { reply: crate::acks::Ack, delivery: Delivery },
    /// A shard's broadcast answer.
    Broadcast { reply: oneshot::Sender<BroadcastOutcome>, outcome: BroadcastOutcome },
}

/// One user as read back from the log.
#[derive(Debug, Default)]
pub struct RestoredUser {
    pub epoch: String,
    pub seq: u64,
    /// Unix ms of the user's last record.
    pub last_ms: u64,
    /// seq → `(publish unix ms, priority, frame)`; records moved forward
    /// from a reclaimed segment come later in the log than newer events.
    pub events: std::collections::BTreeMap<u64, (u64, Priority, Frame)>,
    /// Idempotency keys: id → `(seq, accepted unix ms)`.
    pub keys: HashMap<String, (u64, u64)>,
}

pub struct Persist {
    pub log: Log,
    /// Whether replies and deliveries wait for the sync (`--fsync always`).
    pub hold: bool,
    held: VecDeque<(u64, Deferred)>,
}

impl Persist {
    /// Opens (and recovers) shard `id`'s log under `dir`.
    pub fn open(
        dir: &Path,
        id: usize,
        fsync: Fsync,
        segment_bytes: u64,
    ) -> std::io::Result<(Persist, Recovered)> {
        let policy = match fsync {
            Fsync::Always => SyncPolicy::Always,
            Fsync::Every(d) => SyncPolicy::Every(d),
            Fsync::Never => SyncPolicy::Never,
        };
        let (log, recovered) =
            Log::open(&dir.join(format!("shard-{id}")), segment_bytes, policy, &format!("sync-{id}"))?;
        Ok((Persist { log, hold: fsync == Fsync::Always, held: VecDeque::new() }, recovered))
    }

    /// Logs a user's epoch; returns the segment it went to.
    pub fn epoch(&mut self, user: &str, epoch: &str, at_ms: u64) -> u64 {
        self.log.append(records::KIND_EPOCH, &records::epoch(user, epoch, at_ms)).segment
    }

    /// Logs an event; returns the segment it went to.
    pub fn event(
        &mut self,
        user: &str,
        seq: u64,
        at_ms: u64,
        priority: Priority,
        id: Option<&str>,
        frame: &[u8],
    ) -> u64 {
        self.log.append(records::KIND_EVENT, &records::event(user, seq, at_ms, priority, id, frame)).segment
    }

    /// Logs an idempotency key on its own; returns the segment it went to.
    pub fn key(&mut self, user: &str, id: &str, seq: u64, at_ms: u64) -> u64 {
        self.log.append(records::KIND_KEY, &records::key(user, id, seq, at_ms)).segment
    }

    pub fn dropped(&mut self, user: &str) {
        self.log.append(records::KIND_DROP, &records::drop_user(user));
    }

    /// Holds `work` until everything appended so far is durable; gives it
    /// back when that is already so (nothing pending, the last batch done).
    pub fn hold(&mut self, work: Deferred) -> Option<Deferred> {
        // The batch that will carry this pass's records; with nothing pending,
        // the last batch committed (it may still be syncing).
        let batch = if self.log.has_pending() { self.log.next_batch() } else { self.log.next_batch() - 1 };
        if batch <= self.log.done() && self.held.is_empty() {
            return Some(work);
        }
        self.held.push_back((batch, work));
        None
    }

    /// Ends a pass: hands its records to the syncer.
    pub fn commit(&mut self) {
        self.log.commit();
    }

    /// The oldest segment that no longer takes appends, if there are at
    /// least `keep` such segments.
    pub fn reclaimable(&self, keep: usize) -> Option<u64> {
        let old = self.log.old_segments();
        (old.len() >= keep).then(|| old.first().copied()).flatten()
    }

    /// Takes the held work whose batch is durable, oldest first.
    pub fn take_durable(&mut self, done: u64) -> Vec<Deferred> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|(b, _)| *b <= done) {
            if let Some((_, w)) = self.held.pop_front() {
                out.push(w);
            }
        }
        out
    }

    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }
}

/// Rebuilds users from the log's records, in order: an epoch record sets the
/// user's epoch (creating the user), an event extends its history, a drop
/// forgets it. Undecodable records are skipped (counted).
pub fn replay(records: &[Record]) -> (HashMap<String, RestoredUser>, usize) {
    let mut users: HashMap<String, RestoredUser> = HashMap::new();
    let mut skipped = 0;
    for r in records {
        match records::decode(r.kind, &r.payload) {
            Some(Entry::Epoch { user, epoch, at_ms }) => {
                let u = users.entry(user).or_default();
                u.epoch = epoch;
                u.last_ms = u.last_ms.max(at_ms);
            }
            Some(Entry::Event { user, seq, at_ms, priority, id, frame }) => {
                let u = users.entry(user).or_default();
                u.seq = u.seq.max(seq);
                u.last_ms = u.last_ms.max(at_ms);
                if let Some(id) = id {
                    u.keys.insert(id, (seq, at_ms));
                }
                u.events.insert(seq, (at_ms, priority, Frame::from(frame)));
            }
            Some(Entry::Key { user, id, seq, at_ms }) => {
                let u = users.entry(user).or_default();
                u.keys.insert(id, (seq, at_ms));
            }
            Some(Entry::Drop { user }) => {
                users.remove(&user);
            }
            None => skipped += 1,
        }
    }
    // A user whose epoch record was lost cannot be trusted to continue.
    users.retain(|_, u| !u.epoch.is_empty());
    (users, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::log::Pos;

    fn rec(kind: u8, payload: Vec<u8>) -> Record {
        Record { kind, payload, pos: Pos { segment: 0, offset: 0 } }
    }

    #[test]
    fn replay_follows_epochs_events_and_drops_in_order() {
        let records = vec![
            rec(records::KIND_EPOCH, records::epoch("a", "e1", 10)),
            rec(records::KIND_EVENT, records::event("a", 1, 11, Priority::Normal, Some("k"), b"f1")),
            rec(records::KIND_EPOCH, records::epoch("b", "e2", 12)),
            rec(records::KIND_EVENT, records::event("b", 1, 13, Priority::High, None, b"g1")),
            rec(records::KIND_DROP, records::drop_user("b")),
            rec(records::KIND_EPOCH, records::epoch("b", "e3", 14)),
            rec(records::KIND_EVENT, records::event("a", 2, 15, Priority::Low, None, b"f2")),
            rec(99, vec![]),
        ];
        let (users, skipped) = replay(&records);
        assert_eq!(skipped, 1);
        let a = &users["a"];
        assert_eq!((a.epoch.as_str(), a.seq, a.last_ms, a.events.len()), ("e1", 2, 15, 2));
        assert_eq!(a.keys["k"], (1, 11));
        let b = &users["b"];
        assert_eq!((b.epoch.as_str(), b.seq, b.events.len()), ("e3", 0, 0), "dropped, then a new state");
    }
}
