//! The delivery checker: per logical connection, verifies that events arrive
//! once, in publish order, and only for the connection's own user.
//!
//! Every published event carries its target user (`u`) and a nonce (`n`)
//! that increases in publish order for that user (one publisher owns each
//! user). The broker's `seq` increases by one per user event. So, per
//! connection, with O(1) state:
//! - `u` ≠ the connection's user → misrouted;
//! - `seq` ≤ the last seq seen → duplicated;
//! - `n` < the last nonce seen (with a new seq) → reordered;
//! - events the user was sent but the connection never received → missing
//!   (lost, unless the broker accounted for them as shed).

use std::collections::BTreeSet;

/// Order lanes tracked: 3 priorities × up to [`MAX_SOURCES`] unordered sources.
pub const LANES: usize = 3 * MAX_SOURCES;
/// Most publishing sources whose events are checked for order separately.
pub const MAX_SOURCES: usize = 8;

/// Findings for one logical connection (it may reconnect many times).
///
/// Ordering is only promised within a priority (a `high` event overtakes
/// queued `normal`/`low` ones), so order is checked per priority lane, and
/// seqs are tracked as a contiguous floor plus the set received above it.
/// A client resumes from the floor, so a resume may legitimately re-deliver
/// events already received above it: those count as `replayed`, once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnCheck {
    pub received: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub misrouted: u64,
    /// Re-deliveries of already-received events caused by our own resume.
    pub replayed: u64,
    /// Every seq at or below the floor was received (or predates us).
    floor: u64,
    above: BTreeSet<u64>,
    lane_nonce: [Option<u64>; LANES],
    /// Highest seq received before the latest resume; re-deliveries up to it are expected once.
    replay_upto: u64,
    replay_seen: BTreeSet<u64>,
}

impl ConnCheck {
    /// Starts checking after the welcome's `seq` (events at or below it predate us).
    pub fn after(seq: u64) -> Self {
        ConnCheck { floor: seq, ..Default::default() }
    }

    /// The seq to resume from: everything at or below it was received.
    pub fn resume_point(&self) -> u64 {
        self.floor
    }

    /// Called when the connection resumes: lanes restart and re-deliveries are expected.
    pub fn resumed(&mut self) {
        self.replay_upto = self.above.last().copied().unwrap_or(self.floor).max(self.floor);
        self.replay_seen.clear();
        self.lane_nonce = [None; LANES];
    }

    /// Where a connection's missing seqs are (for the report of a failed
    /// run): the contiguous floor and the first seqs that arrived above it.
    pub fn gaps(&self) -> String {
        let above: Vec<u64> = self.above.iter().take(8).copied().collect();
        format!(
            "received {}, every seq to {} (or before it connected), then {above:?}",
            self.received, self.floor
        )
    }

    /// Checks one received event. `lane` is 0 high, 1 normal, 2 low, plus
    /// 3 × the publishing source when several sources have no order between
    /// them (concurrent broadcasters); lanes past [`LANES`] share the last.
    pub fn observe(&mut self, own_user: &str, event_user: &str, seq: u64, nonce: u64, lane: usize) {
        if event_user != own_user {
            self.misrouted += 1;
            return;
        }
        if seq <= self.floor || self.above.contains(&seq) {
            if seq <= self.replay_upto && self.replay_seen.insert(seq) {
                self.replayed += 1;
            } else {
                self.duplicated += 1;
            }
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        let lane = lane.min(LANES - 1);
        if self.lane_nonce[lane].is_some_and(|last| nonce < last) {
            self.reordered += 1;
        }
        self.lane_nonce[lane] = Some(nonce);
        self.received += 1;
    }
}

/// Totals over a run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Totals {
    /// Events accepted by the broker.
    pub sent: u64,
    /// Events the connections should have received (sent × connections of the user).
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub misrouted: u64,
    /// Missing deliveries the broker reported as shed (slow consumers).
    pub shed: u64,
    /// Publishes the broker refused (503/overloaded) and so never owed anyone.
    pub rejected: u64,
    pub resumes: u64,
    pub resume_failed: u64,
    /// Publisher streams replaced after an ack timeout or a failure (their
    /// unacked frames were sent again with the same ids).
    pub retried: u64,
}

impl Totals {
    /// Adds one connection's findings, given how many events its user was sent.
    pub fn add(&mut self, c: &ConnCheck, sent_to_user: u64) {
        self.expected += sent_to_user;
        self.received += c.received;
        self.duplicated += c.duplicated;
        self.reordered += c.reordered;
        self.misrouted += c.misrouted;
    }

    /// Splits missing deliveries into shed (as many as the broker reported) and lost.
    pub fn settle(&mut self, broker_shed: u64) {
        let missing = self.expected.saturating_sub(self.received);
        self.shed = missing.min(broker_shed);
        self.lost = missing - self.shed;
    }

    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.misrouted == 0
            && self.resume_failed == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(events: &[(&str, u64, u64, usize)]) -> ConnCheck {
        let mut c = ConnCheck::after(0);
        for (u, seq, n, lane) in events {
            c.observe("alice", u, *seq, *n, *lane);
        }
        c
    }

    fn settle(c: &ConnCheck, sent: u64, shed: u64) -> Totals {
        let mut t = Totals::default();
        t.add(c, sent);
        t.settle(shed);
        t
    }

    #[test]
    fn a_clean_stream_passes() {
        let c = feed(&[("alice", 1, 10, 1), ("alice", 2, 14, 1), ("alice", 3, 20, 1)]);
        assert_eq!((c.received, c.duplicated, c.reordered, c.misrouted), (3, 0, 0, 0));
        assert!(settle(&c, 3, 0).ok());
    }

    #[test]
    fn high_may_overtake_other_lanes() {
        let c = feed(&[("alice", 3, 30, 0), ("alice", 1, 10, 1), ("alice", 2, 20, 2)]);
        assert_eq!((c.received, c.duplicated, c.reordered), (3, 0, 0));
        assert_eq!(c.resume_point(), 3);
    }

    #[test]
    fn catches_loss() {
        let c = feed(&[("alice", 1, 10, 1), ("alice", 3, 20, 1)]);
        let t = settle(&c, 3, 0);
        assert_eq!(t.lost, 1);
        assert!(!t.ok());
        // The same gap, accounted for by the broker as shed, is not loss.
        let t = settle(&c, 3, 1);
        assert_eq!((t.lost, t.shed), (0, 1));
        assert!(t.ok());
        assert_eq!(settle(&feed(&[("alice", 1, 10, 1)]), 2, 0).lost, 1, "trailing loss");
    }

    #[test]
    fn catches_duplication() {
        let c = feed(&[("alice", 1, 10, 1), ("alice", 2, 11, 1), ("alice", 2, 11, 1)]);
        assert_eq!(c.duplicated, 1);
        assert!(!settle(&c, 2, 0).ok());
    }

    #[test]
    fn sources_are_ordered_separately() {
        const SOURCE_1: usize = 3; // normal lane (1) of source 1 is 1 + 3 * 1
        let mut c = ConnCheck::after(0);
        c.observe("*", "*", 1, 11, 1 + SOURCE_1); // source 1 ran ahead
        c.observe("*", "*", 2, 10, 1); // source 0: its own first event
        c.observe("*", "*", 3, 12, 1); // source 0 again, in order
        c.observe("*", "*", 4, 9, 1 + SOURCE_1); // source 1 went backwards
        assert_eq!((c.received, c.reordered), (4, 1));
    }

    #[test]
    fn catches_reordering_within_a_lane() {
        let c = feed(&[("alice", 1, 11, 1), ("alice", 2, 10, 1)]);
        assert_eq!(c.reordered, 1);
        assert!(!settle(&c, 2, 0).ok());
    }

    #[test]
    fn catches_misrouting() {
        let c = feed(&[("alice", 1, 10, 1), ("bob", 1, 12, 1)]);
        assert_eq!(c.misrouted, 1);
        assert!(!settle(&c, 1, 0).ok());
    }

    #[test]
    fn resume_replays_are_expected_once() {
        let mut c = feed(&[("alice", 2, 20, 0), ("alice", 1, 10, 1)]);
        c.observe("alice", "alice", 4, 40, 0); // high overtook 3
        assert_eq!(c.resume_point(), 2);
        c.resumed();
        c.observe("alice", "alice", 3, 30, 1);
        c.observe("alice", "alice", 4, 40, 0); // replayed: expected
        assert_eq!((c.replayed, c.duplicated, c.received), (1, 0, 4));
        c.observe("alice", "alice", 4, 40, 0); // a second copy is a duplicate
        assert_eq!(c.duplicated, 1);
    }
}
