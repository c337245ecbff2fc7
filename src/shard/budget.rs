//! A shard's share of `--history-memory`: the bytes its users' histories
//! hold together, and the order their events were stored in, so that past
//! the budget the oldest events go first, whichever user holds them.
//!
//! The order is kept lazily: an entry is written per stored event, and is
//! stale once its event has left the history for another reason (the
//! per-user limits, the TTL, the user's state being dropped). Stale entries
//! are skipped when met at the front and compacted away when they outnumber
//! live ones, so the order costs O(1) amortised per event and at most about
//! three entries per held event. Compaction runs in steps of
//! [`COMPACT_STEP`] entries, one step per call: done at once, it held the
//! shard for ~12 ms at 5,000 users × 16 events (every ~80k publishes; the
//! end-to-end p99.9 at 30k/s was these stalls), and it grows with
//! `--history-size`.
//!
//! Pure bookkeeping: it owns no history; the reactor asks it what to evict.

use std::collections::VecDeque;

use crate::protocol::UserId;
use crate::shard::history::Front;

/// One stored event, by owner.
#[derive(Debug, Clone)]
pub struct Stored {
    pub user: UserId,
    /// Which state of the user (a user dropped and recreated starts at seq 1 again).
    pub incarnation: u64,
    pub seq: u64,
    /// The owning history's oldest seq: whether this entry is live is read
    /// here, so a compaction looks no user up.
    pub front: Front,
}

impl Stored {
    /// Whether its event is still held.
    pub fn is_live(&self) -> bool {
        self.front.holds(self.seq)
    }
}

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    held: usize,
    /// Events held across the shard's histories.
    events: usize,
    /// Entries in store order, oldest first (the unchecked part of a
    /// compaction in progress at the front).
    order: VecDeque<Stored>,
    /// A compaction in progress: the live entries it has checked, in order;
    /// all older than anything in `order`.
    swept: VecDeque<Stored>,
    /// Entries at the front of `order` the compaction in progress has yet
    /// to check (0: none in progress).
    unswept: usize,
}

/// Entries one compaction step checks; each stored event is followed by a
/// step, so a compaction outpaces the entries added while it runs.
pub const COMPACT_STEP: usize = 64;

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget { limit, held: 0, events: 0, order: VecDeque::new(), swept: VecDeque::new(), unswept: 0 }
    }

    /// Bytes held across the shard's histories.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn over(&self) -> bool {
        self.held > self.limit
    }

    /// Events held across the shard's histories.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Applies a change in some history's (bytes, events).
    pub fn adjust(&mut self, before: (usize, usize), after: (usize, usize)) {
        self.held = (self.held + after.0).saturating_sub(before.0);
        self.events = (self.events + after.1).saturating_sub(before.1);
    }

    /// Records that an event was stored.
    pub fn stored(&mut self, s: Stored) {
        self.order.push_back(s);
    }

    /// The oldest entry, removed (it may be stale: the caller checks).
    pub fn pop_oldest(&mut self) -> Option<Stored> {
        if let Some(s) = self.swept.pop_front() {
            return Some(s);
        }
        let s = self.order.pop_front()?;
        self.unswept = self.unswept.saturating_sub(1);
        Some(s)
    }

    /// Entries in the order, stale ones included.
    fn entries(&self) -> usize {
        self.order.len() + self.swept.len()
    }

    /// Drops stale entries once they outnumber the held events (plus
    /// slack), keeping the order's memory proportional to what is held.
    /// One step of it: a compaction starts once stale entries may outnumber
    /// live ones and checks [`COMPACT_STEP`] entries per call.
    pub fn compact(&mut self) {
        if self.unswept == 0 {
            if self.entries() <= 2 * self.events + 1024 {
                return;
            }
            self.unswept = self.order.len();
        }
        let step = self.unswept.min(COMPACT_STEP);
        for s in self.order.drain(..step) {
            if s.is_live() {
                self.swept.push_back(s);
            }
        }
        self.unswept -= step;
        if self.unswept == 0 {
            // Done: the checked entries go back in front of those stored since.
            self.swept.append(&mut self.order);
            std::mem::swap(&mut self.order, &mut self.swept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjust_tracks_growth_and_shrinkage() {
        let mut b = Budget::new(100);
        b.adjust((0, 0), (60, 1));
        b.adjust((10, 1), (70, 2)); // a history grew by 60 bytes, one event
        assert_eq!(b.held(), 120);
        assert_eq!(b.events(), 2);
        assert!(b.over());
        b.adjust((70, 2), (0, 0));
        assert_eq!(b.held(), 50);
        assert!(!b.over());
    }

    #[test]
    fn compaction_keeps_live_entries_in_order() {
        let mut b = Budget::new(0);
        let u = UserId::parse("u").unwrap();
        let front = Front::new(Some(4992)); // the history holds 4992..=5000
        for seq in 1..=5000 {
            b.stored(Stored { user: u.clone(), incarnation: 1, seq, front: front.clone() });
        }
        b.adjust((0, 0), (0, 9));
        for _ in 0..5000usize.div_ceil(COMPACT_STEP) {
            b.compact();
        }
        assert_eq!(b.entries(), 9);
        assert_eq!(b.pop_oldest().map(|s| s.seq), Some(4992));
    }

    #[test]
    fn a_compaction_in_steps_keeps_the_order_while_events_arrive_and_leave() {
        let mut b = Budget::new(0);
        let u = UserId::parse("u").unwrap();
        // Two of every three entries belong to histories that hold nothing
        // any more: only multiples of 3 (and what is stored later) are live.
        let (held, gone) = (Front::new(Some(1)), Front::new(None));
        let entry = |seq: u64| {
            let front = if seq.is_multiple_of(3) || seq > 3000 { held.clone() } else { gone.clone() };
            Stored { user: u.clone(), incarnation: 1, seq, front }
        };
        for seq in 1..=3000 {
            b.stored(entry(seq));
        }
        b.adjust((0, 0), (0, 500));
        b.compact();
        assert!(b.unswept > 0, "a compaction is in progress");
        let checks_per_step = COMPACT_STEP;
        assert_eq!(b.order.len() + b.swept.len(), 3000 - (checks_per_step - checks_per_step / 3));
        // Events keep arriving, and the oldest keep leaving, mid-compaction.
        let mut popped = Vec::new();
        let mut next = 3001;
        while b.unswept > 0 {
            b.stored(entry(next));
            next += 1;
            popped.extend(b.pop_oldest().map(|s| s.seq));
            b.compact();
        }
        let mut rest = Vec::new();
        while let Some(s) = b.pop_oldest() {
            rest.push(s.seq);
        }
        let all: Vec<u64> = popped.iter().chain(&rest).copied().collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "oldest first, always");
        // Nothing live was dropped: every multiple of 3 and every entry
        // stored during the compaction is there, unless popped.
        let kept: std::collections::HashSet<u64> = all.iter().copied().collect();
        assert!((1..next).filter(|s| s.is_multiple_of(3) || *s > 3000).all(|s| kept.contains(&s)));
        assert!(all.len() < 3000, "stale entries were dropped");
    }
}
