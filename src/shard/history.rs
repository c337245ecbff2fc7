//! A user's event history: the last `--history-size` encoded event frames,
//! at most `--history-bytes` of them, each kept at most `--history-ttl`, for
//! resume.
//!
//! Frames are the same refcounted buffers the connections were sent, so a
//! held event costs one [`Frame`] handle plus its share of the buffer. The
//! byte count of a held event is its frame plus the bookkeeping around it
//! ([`HELD_OVERHEAD`]); the shard sums these into its share of
//! `--history-memory` ([`super::budget`]).
//!
//! Invariant: held seqs are contiguous (appended in order, dropped only from
//! the front), which is what makes [`History::plan_replay`] O(1).

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::protocol::Priority;
use crate::wsframe::Frame;

/// Bytes a held event costs beyond its frame: the `Held` slot itself plus
/// the shard's eviction-order entry and the buffer's refcount header.
pub const HELD_OVERHEAD: usize = std::mem::size_of::<Held>() + 64;

/// One held event.
#[derive(Debug, Clone)]
pub struct Held {
    pub seq: u64,
    pub frame: Frame,
    pub priority: Priority,
    pub at: Instant,
    /// With `--data-dir`: the log segment holding this event's record (0 otherwise).
    pub seg: u64,
}

impl Held {
    /// What this event counts against the byte limits.
    pub fn cost(&self) -> usize {
        self.frame.len() + HELD_OVERHEAD
    }
}

/// Outcome of a resume request against the history.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Every event after `since` is held: replay from this seq (if it is
    /// above the latest, there is nothing to replay).
    From(u64),
    /// Some event after `since` has left the history (or `since` is ahead of
    /// the user's seq): nothing is replayed.
    Impossible,
}

/// The per-user limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub events: usize,
    pub bytes: usize,
}

#[derive(Debug, Default)]
pub struct History {
    events: VecDeque<Held>,
    bytes: usize,
    /// Shared with the shard's eviction order once it asks ([`History::front`]).
    front: Option<Front>,
}

/// A history's oldest held seq, shared with the shard's eviction order
/// ([`super::budget`]) so that it can tell a stale entry from a live one
/// without finding the user: reads `u64::MAX` once nothing is held or the
/// history is gone. One shared cell per user, not per event.
#[derive(Debug, Clone)]
pub struct Front(Rc<Cell<u64>>);

impl Front {
    /// A front reading `seq` (`None`: nothing held).
    pub(crate) fn new(seq: Option<u64>) -> Front {
        let f = Front(Rc::new(Cell::new(0)));
        f.set(seq);
        f
    }

    fn set(&self, seq: Option<u64>) {
        self.0.set(seq.unwrap_or(u64::MAX));
    }

    /// Whether the event `seq` is still held.
    pub fn holds(&self, seq: u64) -> bool {
        self.0.get() <= seq
    }

    /// Whether the event `seq` is the oldest held.
    pub fn is_oldest(&self, seq: u64) -> bool {
        self.0.get() == seq
    }
}

impl Drop for History {
    fn drop(&mut self) {
        if let Some(f) = &self.front {
            f.set(None);
        }
    }
}

impl History {
    /// The shared view of this history's oldest seq (made on first use).
    pub fn front(&mut self) -> Front {
        let first = self.first_seq();
        self.front.get_or_insert_with(|| Front::new(first)).clone()
    }

    /// Tells the shared view, if there is one, that the oldest seq changed.
    fn sync_front(&self) {
        if let Some(f) = &self.front {
            f.set(self.first_seq());
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes held (frames plus overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Seq of the oldest held event.
    pub fn first_seq(&self) -> Option<u64> {
        self.events.front().map(|h| h.seq)
    }

    /// Appends an event, dropping the oldest beyond the limits. An event
    /// larger than the byte limit on its own is not held at all.
    pub fn push(&mut self, held: Held, limits: Limits) {
        let cost = held.cost();
        if limits.events == 0 || cost > limits.bytes {
            self.clear();
            return;
        }
        while self.events.len() >= limits.events || self.bytes + cost > limits.bytes {
            if self.pop_front().is_none() {
                break;
            }
        }
        self.bytes += cost;
        self.events.push_back(held);
        if self.events.len() == 1 {
            self.sync_front();
        }
    }

    /// Drops the oldest event.
    pub fn pop_front(&mut self) -> Option<Held> {
        let h = self.events.pop_front()?;
        self.bytes -= h.cost();
        self.sync_front();
        Some(h)
    }

    /// Drops everything (a held event can no longer be kept contiguous).
    pub fn clear(&mut self) {
        self.events.clear();
        self.bytes = 0;
        self.sync_front();
    }

    /// Drops events older than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        while self.events.front().is_some_and(|f| now.duration_since(f.at) >= ttl) {
            self.pop_front();
        }
    }

    /// Decides what resuming after `since` replays, given the user's latest seq.
    pub fn plan_replay(&self, since: u64, latest: u64) -> Replay {
        if since > latest {
            return Replay::Impossible;
        }
        if since == latest {
            return Replay::From(latest + 1);
        }
        // Held seqs are contiguous, so the replay is complete iff the oldest
        // held seq is <= since + 1.
        match self.events.front() {
            Some(front) if front.seq <= since + 1 => Replay::From(since + 1),
            _ => Replay::Impossible,
        }
    }

    /// Every held event, oldest first (to move them between log segments).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        self.events.iter_mut()
    }

    /// The held event with this seq, if any.
    pub fn get_seq(&self, seq: u64) -> Option<&Held> {
        let front = self.events.front()?.seq;
        let idx = seq.checked_sub(front)?;
        self.events.get(usize::try_from(idx).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(seq: u64, at: Instant) -> Held {
        Held { seq, frame: Frame::from(&[][..]), priority: Priority::Normal, at, seg: 0 }
    }

    const ROOMY: usize = usize::MAX / 2;

    #[test]
    fn replay_plans() {
        let now = Instant::now();
        let mut h = History::default();
        for s in 1..=10 {
            h.push(held(s, now), Limits { events: 4, bytes: ROOMY });
        }
        assert_eq!(h.len(), 4); // holds 7..=10
        assert_eq!(h.plan_replay(6, 10), Replay::From(7));
        assert_eq!(h.plan_replay(8, 10), Replay::From(9));
        assert_eq!(h.plan_replay(10, 10), Replay::From(11));
        assert_eq!(h.plan_replay(5, 10), Replay::Impossible);
        assert_eq!(h.plan_replay(11, 10), Replay::Impossible);
        assert_eq!(History::default().plan_replay(0, 0), Replay::From(1));
        assert_eq!(h.get_seq(7).map(|e| e.seq), Some(7));
        assert!(h.get_seq(6).is_none());
        assert!(h.get_seq(11).is_none());
    }

    #[test]
    fn byte_limit_drops_oldest_and_counts_exactly() {
        let now = Instant::now();
        let mut h = History::default();
        let ev =
            |seq| Held { seq, frame: Frame::from(vec![0u8; 100]), priority: Priority::Low, at: now, seg: 0 };
        let limits = Limits { events: 1000, bytes: 3 * (100 + HELD_OVERHEAD) };
        for s in 1..=10 {
            h.push(ev(s), limits);
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_seq(), Some(8));
        assert_eq!(h.bytes(), 3 * (100 + HELD_OVERHEAD));
        // An event over the byte limit on its own empties the history
        // (keeping older ones would leave a hole before the latest seq).
        h.push(
            Held { seq: 11, frame: Frame::from(vec![0u8; 10_000]), priority: Priority::Low, at: now, seg: 0 },
            limits,
        );
        assert!(h.is_empty());
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn the_shared_front_follows_every_change_and_dies_with_the_history() {
        let now = Instant::now();
        let limits = Limits { events: 3, bytes: ROOMY };
        let mut h = History::default();
        let f = h.front();
        assert!(!f.holds(1), "nothing is held yet");
        for s in 1..=5 {
            h.push(held(s, now), limits);
        }
        assert!(f.is_oldest(3) && f.holds(5) && !f.holds(2));
        h.pop_front();
        assert!(f.is_oldest(4) && !f.holds(3));
        h.clear();
        assert!(!f.holds(5) && !f.is_oldest(5));
        h.push(held(6, now), limits);
        assert!(f.is_oldest(6));
        let late = h.front(); // the same cell, however often asked
        drop(h);
        assert!(!f.holds(6) && !late.holds(6), "a dropped history holds nothing");
    }

    #[test]
    fn ttl_expiry_makes_old_resumes_impossible() {
        let t0 = Instant::now();
        let mut h = History::default();
        h.push(held(1, t0), Limits { events: 8, bytes: ROOMY });
        h.push(held(2, t0 + Duration::from_secs(10)), Limits { events: 8, bytes: ROOMY });
        h.expire(t0 + Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(h.len(), 1);
        assert_eq!(h.plan_replay(0, 2), Replay::Impossible);
        assert_eq!(h.plan_replay(1, 2), Replay::From(2));
    }
}
