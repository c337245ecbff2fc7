//! A connection's outbound queue: a control lane plus three priority lanes,
//! and the slow-consumer policy (contract §6).
//!
//! Invariants:
//! - at most `max_frames` event frames are queued, and event frames plus
//!   control frames hold at most `max_bytes` when an event is admitted; the
//!   control lane is bounded on its own by [`MAX_CONTROL`] frames and
//!   `control_bytes`, so a stalled client's memory is bounded;
//! - frames leave control first, then `high`, `normal`, `low`; FIFO within a
//!   lane, so a user's events stay in seq order within a priority;
//! - when full (by count or bytes), queued `low` events are shed (oldest
//!   first) to make room, then queued `normal` ones; a `low`/`normal` event
//!   that shedding lower lanes cannot make room for is itself shed and nothing
//!   else is; a `high` that finds no room that way overflows (the caller
//!   closes with 1013).
//!
//! Pure data structure: no I/O, no clocks; owned by one connection on one shard.

use std::collections::VecDeque;
use std::time::Instant;

use crate::protocol::Priority;
use crate::wsframe::Frame;

/// Control frames (handshake, welcome, pongs, errors, pings) a connection may
/// have waiting. A client that floods requests without reading our answers
/// hits this and is closed with 1008.
pub const MAX_CONTROL: usize = 256;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The complete frame bytes (shared across connections for events).
    pub frame: Frame,
    /// When the publish was accepted; `None` for control frames.
    pub accepted: Option<Instant>,
    pub priority: Priority,
}

impl AsRef<[u8]> for Outbound {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// What happened to an event offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued, after shedding this many older events of each priority
    /// (indexed by [`Priority::index`]).
    Queued { shed: [u32; 3] },
    /// Not queued: the event itself was shed.
    Shed,
    /// A `high` event found no room even after shedding every lower event:
    /// close with 1013.
    Overflow,
    /// Not queued here: the connection is still writing a resume replay and
    /// will read this event from the history after the ones before it.
    Deferred,
}

/// A connection's queue bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-queue`: event frames.
    pub max_frames: usize,
    /// `--max-queue-bytes`: event and control bytes, checked when an event is offered.
    pub max_bytes: usize,
    /// Bytes the control lane alone may hold.
    pub control_bytes: usize,
}

#[derive(Debug, Default)]
struct Lane {
    frames: VecDeque<Outbound>,
    bytes: usize,
}

#[derive(Debug)]
pub struct OutQueue {
    control: VecDeque<Frame>,
    control_bytes: usize,
    lanes: [Lane; 3],
    events: usize,
    event_bytes: usize,
    limits: Limits,
}

impl OutQueue {
    pub fn new(limits: Limits) -> Self {
        OutQueue {
            control: VecDeque::new(),
            control_bytes: 0,
            lanes: Default::default(),
            events: 0,
            event_bytes: 0,
            limits: Limits { max_frames: limits.max_frames.max(1), ..limits },
        }
    }

    /// Event frames queued (control frames not counted).
    pub fn depth(&self) -> usize {
        self.events
    }

    /// At least half of either limit is taken: the shard ends its pass so
    /// this connection is written before more is queued for it (a burst
    /// applied in one pass can then never shed events for a client that
    /// keeps up).
    pub fn half_full(&self) -> bool {
        self.events * 2 >= self.limits.max_frames || self.bytes() * 2 >= self.limits.max_bytes
    }

    /// Bytes queued, control frames included.
    pub fn bytes(&self) -> usize {
        self.event_bytes + self.control_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0 && self.control.is_empty()
    }

    /// Queues a control frame; `false` when the control lane is full.
    pub fn push_control(&mut self, frame: Frame) -> bool {
        if self.control.len() >= MAX_CONTROL || self.control_bytes + frame.len() > self.limits.control_bytes {
            return false;
        }
        self.control_bytes += frame.len();
        self.control.push_back(frame);
        true
    }

    fn fits(&self, extra_frames: usize, extra_bytes: usize) -> bool {
        self.events + extra_frames <= self.limits.max_frames
            && self.bytes() + extra_bytes <= self.limits.max_bytes
    }

    /// Offers an event frame, applying the slow-consumer policy.
    pub fn push_event(&mut self, out: Outbound) -> Enqueued {
        let p = out.priority;
        let len = out.frame.len();
        let mut shed = [0u32; 3];
        if !self.fits(1, len) {
            // Shedding may only take strictly lower priorities, lowest first.
            let victims: &[Priority] = match p {
                Priority::High => &[Priority::Low, Priority::Normal],
                Priority::Normal => &[Priority::Low],
                Priority::Low => &[],
            };
            let (lower_frames, lower_bytes) = victims.iter().fold((0, 0), |(f, b), v| {
                let lane = &self.lanes[v.index()];
                (f + lane.frames.len(), b + lane.bytes)
            });
            // Shed nothing unless shedding can make room.
            let possible = self.events - lower_frames < self.limits.max_frames
                && self.bytes() - lower_bytes + len <= self.limits.max_bytes;
            if !possible {
                return if p == Priority::High { Enqueued::Overflow } else { Enqueued::Shed };
            }
            for &v in victims {
                while !self.fits(1, len) {
                    let Some(old) = self.pop_lane(v.index()) else { break };
                    drop(old);
                    shed[v.index()] += 1;
                }
            }
        }
        let lane = &mut self.lanes[p.index()];
        lane.bytes += len;
        lane.frames.push_back(out);
        self.events += 1;
        self.event_bytes += len;
        Enqueued::Queued { shed }
    }

    fn pop_lane(&mut self, idx: usize) -> Option<Outbound> {
        let lane = &mut self.lanes[idx];
        let out = lane.frames.pop_front()?;
        lane.bytes -= out.frame.len();
        self.events -= 1;
        self.event_bytes -= out.frame.len();
        Some(out)
    }

    /// Moves every queued control frame (up to `max_frames` in `batch`) into `batch`.
    pub fn pop_control(&mut self, batch: &mut Vec<Outbound>, max_frames: usize) {
        while batch.len() < max_frames {
            let Some(frame) = self.control.pop_front() else { break };
            self.control_bytes -= frame.len();
            batch.push(Outbound { frame, accepted: None, priority: Priority::High });
        }
    }

    /// Moves up to `max_frames` frames (control first, then by priority) into
    /// `batch`, stopping early once `max_bytes` is reached.
    pub fn pop_batch(&mut self, batch: &mut Vec<Outbound>, max_frames: usize, max_bytes: usize) {
        let mut bytes: usize = batch.iter().map(|o| o.frame.len()).sum();
        while batch.len() < max_frames && bytes < max_bytes {
            if let Some(frame) = self.control.pop_front() {
                self.control_bytes -= frame.len();
                bytes += frame.len();
                batch.push(Outbound { frame, accepted: None, priority: Priority::High });
                continue;
            }
            let Some(idx) = self.lanes.iter().position(|l| !l.frames.is_empty()) else {
                break;
            };
            if let Some(out) = self.pop_lane(idx) {
                bytes += out.frame.len();
                batch.push(out);
            }
        }
    }

    /// Drops every queued event (the connection is closing); control frames stay.
    pub fn clear_events(&mut self) {
        for lane in &mut self.lanes {
            lane.frames.clear();
            lane.bytes = 0;
        }
        self.events = 0;
        self.event_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tag: u8, p: Priority) -> Outbound {
        Outbound { frame: Frame::from(vec![tag]), accepted: None, priority: p }
    }

    fn q(max_frames: usize) -> OutQueue {
        OutQueue::new(Limits { max_frames, max_bytes: usize::MAX / 4, control_bytes: usize::MAX / 4 })
    }

    const QUEUED: Enqueued = Enqueued::Queued { shed: [0; 3] };

    fn shed_one(p: Priority) -> Enqueued {
        let mut shed = [0; 3];
        shed[p.index()] = 1;
        Enqueued::Queued { shed }
    }

    fn drain(q: &mut OutQueue) -> Vec<u8> {
        let mut b = Vec::new();
        q.pop_batch(&mut b, usize::MAX, usize::MAX);
        b.iter().map(|o| o.frame[0]).collect()
    }

    #[test]
    fn high_overtakes_queued_normal_and_lanes_stay_fifo() {
        let mut q = q(10);
        q.push_event(ev(1, Priority::Normal));
        q.push_event(ev(2, Priority::Low));
        q.push_event(ev(3, Priority::Normal));
        q.push_event(ev(4, Priority::High));
        q.push_control(Frame::from(&[0u8][..]));
        assert_eq!(drain(&mut q), vec![0, 4, 1, 3, 2]);
        assert!(q.is_empty());
    }

    #[test]
    fn shedding_follows_the_contract() {
        let mut q = q(2);
        assert_eq!(q.push_event(ev(1, Priority::Low)), QUEUED);
        assert_eq!(q.push_event(ev(2, Priority::Normal)), QUEUED);
        // A new low with only low/normal queued: nothing lower, so it is shed.
        assert_eq!(q.push_event(ev(3, Priority::Low)), Enqueued::Shed);
        // A new normal sheds the queued low.
        assert_eq!(q.push_event(ev(4, Priority::Normal)), shed_one(Priority::Low));
        // A new normal with only normals queued is itself shed.
        assert_eq!(q.push_event(ev(5, Priority::Normal)), Enqueued::Shed);
        // A high sheds a normal (no low left).
        assert_eq!(q.push_event(ev(6, Priority::High)), shed_one(Priority::Normal));
        assert_eq!(q.push_event(ev(7, Priority::High)), shed_one(Priority::Normal));
        // Only highs queued: overflow.
        assert_eq!(q.push_event(ev(8, Priority::High)), Enqueued::Overflow);
        assert_eq!(q.depth(), 2);
        assert_eq!(drain(&mut q), vec![6, 7]);
    }

    #[test]
    fn batch_respects_limits() {
        let mut q = q(100);
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
    fn byte_limit_sheds_lower_lanes_and_counts_control_frames() {
        let ev = |tag: u8, len: usize, p| Outbound {
            frame: Frame::from(vec![tag; len]),
            accepted: None,
            priority: p,
        };
        let mut q = OutQueue::new(Limits { max_frames: 100, max_bytes: 100, control_bytes: 50 });
        assert!(q.push_control(Frame::from(vec![0; 20])));
        assert_eq!(q.push_event(ev(1, 30, Priority::Low)), QUEUED);
        assert_eq!(q.push_event(ev(2, 30, Priority::Low)), QUEUED);
        // 80 queued: a 40-byte normal sheds both lows (30 at a time) to fit.
        assert_eq!(q.push_event(ev(3, 40, Priority::Normal)), Enqueued::Queued { shed: [0, 0, 1] });
        assert_eq!(q.bytes(), 90);
        // A 45-byte normal cannot make room even by shedding the last low: shed itself.
        assert_eq!(q.push_event(ev(4, 45, Priority::Normal)), Enqueued::Shed);
        // A high that cannot fit even after shedding every normal overflows, shedding nothing.
        assert_eq!(q.push_event(ev(5, 90, Priority::High)), Enqueued::Overflow);
        assert_eq!(q.bytes(), 90);
        // The control lane has its own byte bound.
        assert!(!q.push_control(Frame::from(vec![0; 31])));
        assert_eq!(drain(&mut q), vec![0, 3, 2]);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn control_lane_is_bounded() {
        let mut q = q(1);
        for _ in 0..MAX_CONTROL {
            assert!(q.push_control(Frame::from(&[][..])));
        }
        assert!(!q.push_control(Frame::from(&[][..])));
    }
}
