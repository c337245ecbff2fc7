//! A shard's share of `--history-memory`: the bytes its users' histories
//! hold together, and the order their events were stored in, so that past
//! the budget the oldest events go first, whichever user holds them.
//!
//! The order is kept lazily: an entry is written per stored event, and is
//! stale once its event has left the history for another reason (the
//! per-user limits, the TTL, the user's state being dropped). Stale entries
//! are skipped when met at the front and compacted away when they outnumber
//! live ones, so the order costs O(1) amortised per event and at most about
//! three entries per held event.
//!
//! Pure bookkeeping: it owns no history; the reactor asks it what to evict.

use std::collections::VecDeque;

use crate::protocol::UserId;

/// One stored event, by owner.
#[derive(Debug, Clone)]
pub struct Stored {
    pub user: UserId,
    /// Which state of the user (a user dropped and recreated starts at seq 1 again).
    pub incarnation: u64,
    pub seq: u64,
}

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    held: usize,
    /// Events held across the shard's histories.
    events: usize,
    order: VecDeque<Stored>,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget { limit, held: 0, events: 0, order: VecDeque::new() }
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
        self.order.pop_front()
    }

    /// Drops stale entries once they outnumber the held events (plus
    /// slack), keeping the order's memory proportional to what is held.
    pub fn compact(&mut self, is_live: impl Fn(&Stored) -> bool) {
        if self.order.len() <= 2 * self.events + 1024 {
            return;
        }
        self.order.retain(is_live);
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
        for seq in 1..=5000 {
            b.stored(Stored { user: u.clone(), incarnation: 1, seq });
        }
        b.adjust((0, 0), (0, 9));
        b.compact(|s| s.seq > 4991);
        assert_eq!(b.order.len(), 9);
        assert_eq!(b.pop_oldest().map(|s| s.seq), Some(4992));
    }
}
