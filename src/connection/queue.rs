//! A connection's outbound queue: a control lane plus three priority lanes,
//! and the slow-consumer policy (contract §6).
//!
//! Invariants:
//! - at most `max` event frames are queued (the control lane is bounded
//!   separately by [`MAX_CONTROL`]), so a stalled client's memory is bounded;
//! - frames leave control first, then `high`, `normal`, `low`; FIFO within a
//!   lane, so a user's events stay in seq order within a priority;
//! - when full, a queued `low` is shed to make room, then a queued `normal`;
//!   a `low`/`normal` with nothing lower to shed is itself shed; a `high` that
//!   finds only `high` queued overflows (the caller closes with 1013).
//!
//! Pure data structure: no I/O, no clocks; owned by one connection on one shard.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::protocol::Priority;

/// Control frames (handshake, welcome, pongs, errors, pings) a connection may
/// have waiting. A client that floods requests without reading our answers
/// hits this and is closed with 1008.
pub const MAX_CONTROL: usize = 256;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The complete frame bytes (shared across connections for events).
    pub frame: Bytes,
    /// When the publish was accepted; `None` for control frames.
    pub accepted: Option<Instant>,
    pub priority: Priority,
}

/// What happened to an event offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued; nothing shed.
    Queued,
    /// Queued after shedding an older event of the given priority.
    QueuedShedding(Priority),
    /// Not queued: the event itself was shed.
    Shed,
    /// A `high` event found only `high` events queued: close with 1013.
    Overflow,
}

#[derive(Debug)]
pub struct OutQueue {
    control: VecDeque<Bytes>,
    lanes: [VecDeque<Outbound>; 3],
    events: usize,
    max: usize,
}

impl OutQueue {
    pub fn new(max: usize) -> Self {
        OutQueue {
            control: VecDeque::new(),
            lanes: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            events: 0,
            max: max.max(1),
        }
    }

    /// Event frames queued (control frames not counted).
    pub fn depth(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0 && self.control.is_empty()
    }

    /// Queues a control frame; `false` when the control lane is full.
    pub fn push_control(&mut self, frame: Bytes) -> bool {
        if self.control.len() >= MAX_CONTROL {
            return false;
        }
        self.control.push_back(frame);
        true
    }

    /// Offers an event frame, applying the slow-consumer policy.
    pub fn push_event(&mut self, out: Outbound) -> Enqueued {
        let p = out.priority;
        if self.events < self.max {
            self.lanes[p.index()].push_back(out);
            self.events += 1;
            return Enqueued::Queued;
        }
        // Full: shed the oldest queued event of a strictly lower priority,
        // lowest first.
        let victims: &[Priority] = match p {
            Priority::High => &[Priority::Low, Priority::Normal],
            Priority::Normal => &[Priority::Low],
            Priority::Low => &[],
        };
        for &v in victims {
            if self.lanes[v.index()].pop_front().is_some() {
                self.lanes[p.index()].push_back(out);
                return Enqueued::QueuedShedding(v);
            }
        }
        if p == Priority::High {
            Enqueued::Overflow
        } else {
            Enqueued::Shed
        }
    }

    /// Moves up to `max_frames` frames (control first, then by priority) into
    /// `batch`, stopping early once `max_bytes` is reached.
    pub fn pop_batch(&mut self, batch: &mut Vec<Outbound>, max_frames: usize, max_bytes: usize) {
        let mut bytes = 0;
        while batch.len() < max_frames && bytes < max_bytes {
            if let Some(frame) = self.control.pop_front() {
                bytes += frame.len();
                batch.push(Outbound { frame, accepted: None, priority: Priority::High });
                continue;
            }
            let Some(lane) = self.lanes.iter_mut().find(|l| !l.is_empty()) else {
                break;
            };
            if let Some(out) = lane.pop_front() {
                bytes += out.frame.len();
                self.events -= 1;
                batch.push(out);
            }
        }
    }

    /// Drops every queued event (the connection is closing); control frames stay.
    pub fn clear_events(&mut self) {
        for lane in &mut self.lanes {
            lane.clear();
        }
        self.events = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tag: u8, p: Priority) -> Outbound {
        Outbound { frame: Bytes::from(vec![tag]), accepted: None, priority: p }
    }

    fn drain(q: &mut OutQueue) -> Vec<u8> {
        let mut b = Vec::new();
        q.pop_batch(&mut b, usize::MAX, usize::MAX);
        b.iter().map(|o| o.frame[0]).collect()
    }

    #[test]
    fn high_overtakes_queued_normal_and_lanes_stay_fifo() {
        let mut q = OutQueue::new(10);
        q.push_event(ev(1, Priority::Normal));
        q.push_event(ev(2, Priority::Low));
        q.push_event(ev(3, Priority::Normal));
        q.push_event(ev(4, Priority::High));
        q.push_control(Bytes::from_static(&[0]));
        assert_eq!(drain(&mut q), vec![0, 4, 1, 3, 2]);
        assert!(q.is_empty());
    }

    #[test]
    fn shedding_follows_the_contract() {
        let mut q = OutQueue::new(2);
        assert_eq!(q.push_event(ev(1, Priority::Low)), Enqueued::Queued);
        assert_eq!(q.push_event(ev(2, Priority::Normal)), Enqueued::Queued);
        // A new low with only low/normal queued: nothing lower, so it is shed.
        assert_eq!(q.push_event(ev(3, Priority::Low)), Enqueued::Shed);
        // A new normal sheds the queued low.
        assert_eq!(q.push_event(ev(4, Priority::Normal)), Enqueued::QueuedShedding(Priority::Low));
        // A new normal with only normals queued is itself shed.
        assert_eq!(q.push_event(ev(5, Priority::Normal)), Enqueued::Shed);
        // A high sheds a normal (no low left).
        assert_eq!(q.push_event(ev(6, Priority::High)), Enqueued::QueuedShedding(Priority::Normal));
        assert_eq!(q.push_event(ev(7, Priority::High)), Enqueued::QueuedShedding(Priority::Normal));
        // Only highs queued: overflow.
        assert_eq!(q.push_event(ev(8, Priority::High)), Enqueued::Overflow);
        assert_eq!(q.depth(), 2);
        assert_eq!(drain(&mut q), vec![6, 7]);
    }

    #[test]
    fn batch_respects_limits() {
        let mut q = OutQueue::new(100);
        for i in 0..10 {
            q.push_event(ev(i, Priority::Normal));
        }
        let mut b = Vec::new();
        q.pop_batch(&mut b, 4, usize::MAX);
        assert_eq!(b.len(), 4);
        b.clear();
        q.pop_batch(&mut b, 100, 2);
        assert_eq!(b.len(), 2);
        assert_eq!(q.depth(), 4);
    }

    #[test]
    fn control_lane_is_bounded() {
        let mut q = OutQueue::new(1);
        for _ in 0..MAX_CONTROL {
            assert!(q.push_control(Bytes::new()));
        }
        assert!(!q.push_control(Bytes::new()));
    }
}
