//! A user's event history: the last `--history-size` encoded event frames,
//! each kept at most `--history-ttl`, for resume.
//!
//! Frames are the same refcounted buffers the connections were sent, so a
//! held event costs one `Bytes` handle plus its share of the buffer.
//! Worst case per user: `history_size × (max_payload + ~200 B)`; per shard:
//! that times the shard's users (bounded in practice by the TTL sweep).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::Priority;

/// One held event.
#[derive(Debug, Clone)]
pub struct Held {
    pub seq: u64,
    pub frame: Bytes,
    pub priority: Priority,
    pub at: Instant,
}

/// Outcome of a resume request against the history.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Every event after `since` is held: replay these (possibly none).
    Complete(Vec<usize>),
    /// Some event after `since` has left the history (or `since` is ahead of
    /// the user's seq): nothing is replayed.
    Impossible,
}

#[derive(Debug, Default)]
pub struct History {
    events: VecDeque<Held>,
}

impl History {
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Appends an event, dropping the oldest beyond `cap`.
    pub fn push(&mut self, held: Held, cap: usize) {
        if cap == 0 {
            return;
        }
        while self.events.len() >= cap {
            self.events.pop_front();
        }
        self.events.push_back(held);
    }

    /// Drops events older than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some(front) = self.events.front() {
            if now.duration_since(front.at) >= ttl {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }

    /// Decides what resuming after `since` replays, given the user's latest seq.
    pub fn plan_replay(&self, since: u64, latest: u64) -> Replay {
        if since > latest {
            return Replay::Impossible;
        }
        if since == latest {
            return Replay::Complete(Vec::new());
        }
        // Held seqs are contiguous (appended in order, dropped from the front),
        // so the replay is complete iff the oldest held seq is <= since + 1.
        match self.events.front() {
            Some(front) if front.seq <= since + 1 => {
                let start = (since + 1 - front.seq) as usize;
                Replay::Complete((start..self.events.len()).collect())
            }
            _ => Replay::Impossible,
        }
    }

    pub fn get(&self, idx: usize) -> Option<&Held> {
        self.events.get(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(seq: u64, at: Instant) -> Held {
        Held { seq, frame: Bytes::new(), priority: Priority::Normal, at }
    }

    #[test]
    fn replay_plans() {
        let now = Instant::now();
        let mut h = History::default();
        for s in 1..=10 {
            h.push(held(s, now), 4);
        }
        assert_eq!(h.len(), 4); // holds 7..=10
        assert_eq!(h.plan_replay(6, 10), Replay::Complete(vec![0, 1, 2, 3]));
        assert_eq!(h.plan_replay(8, 10), Replay::Complete(vec![2, 3]));
        assert_eq!(h.plan_replay(10, 10), Replay::Complete(vec![]));
        assert_eq!(h.plan_replay(5, 10), Replay::Impossible);
        assert_eq!(h.plan_replay(11, 10), Replay::Impossible);
        assert_eq!(History::default().plan_replay(0, 0), Replay::Complete(vec![]));
    }

    #[test]
    fn ttl_expiry_makes_old_resumes_impossible() {
        let t0 = Instant::now();
        let mut h = History::default();
        h.push(held(1, t0), 8);
        h.push(held(2, t0 + Duration::from_secs(10)), 8);
        h.expire(t0 + Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(h.len(), 1);
        assert_eq!(h.plan_replay(0, 2), Replay::Impossible);
        assert_eq!(h.plan_replay(1, 2), Replay::Complete(vec![0]));
    }
}
