//! Publish results without a channel per event: one [`Acks`] block per
//! publish request (a `/v1/publish`, a batch, a stream frame) holds a result
//! slot per event, and each event's command carries an [`Ack`] — the block
//! and its slot index. The shard fills the slot; the publisher awaits the
//! whole block once. One allocation per request instead of one oneshot
//! channel (and its wake) per event. A fire-and-forget stream, which needs no
//! result per event, has one slot per shard instead, answered by a fence
//! command pushed after its events. A batch command (a stream message's
//! events for one shard) carries one [`BatchAcks`] for all its events
//! instead of an [`Ack`] each: one counter update and one reference per
//! batch, each event's slot filled in place.
//!
//! An [`Ack`] (or [`BatchAcks`]) dropped unanswered (its command was dropped at shutdown)
//! marks its slot failed, so a waiter never hangs on it, as a dropped
//! oneshot sender would end its receiver.
//!
//! Memory orderings: a slot is written (Relaxed) before its `remaining`
//! decrement (AcqRel); the waiter reads `remaining == 0` with Acquire before
//! reading slots, so every slot write happens-before the read.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;

/// What a shard answers for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    pub seq: u64,
    /// Live connections the event was queued to.
    pub delivered: u32,
    /// The publish's `id` was already accepted: `seq` is the first one's,
    /// and nothing was published.
    pub duplicate: bool,
}

const FILLED: u64 = 1 << 63;
const DUPLICATE: u64 = 1 << 62;

/// One event's result: `seq`, and `meta` = FILLED | DUPLICATE | delivered
/// (0 while unanswered or after its [`Ack`] was dropped).
#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    meta: AtomicU64,
}

/// The result block of one publish request.
pub struct Acks {
    slots: Box<[Slot]>,
    /// Acks still out, plus one while the request is being submitted.
    remaining: AtomicUsize,
    waker: AtomicWaker,
}

impl Acks {
    /// A block for up to `n` events; hand out [`Acks::ack`]s, then [`Acks::seal`].
    pub fn new(n: usize) -> Arc<Acks> {
        Arc::new(Acks {
            slots: (0..n).map(|_| Slot::default()).collect(),
            remaining: AtomicUsize::new(1),
            waker: AtomicWaker::new(),
        })
    }

    /// The answer handle for slot `index` (each index at most once).
    pub fn ack(self: &Arc<Self>, index: usize) -> Ack {
        self.remaining.fetch_add(1, Ordering::Relaxed);
        self.handle(index)
    }

    /// The answers for `count` slots carried by one batch command: one
    /// counter update and one reference for all of them, instead of one
    /// [`Ack`] each.
    pub fn batch(self: &Arc<Self>, count: usize) -> BatchAcks {
        self.remaining.fetch_add(count, Ordering::Relaxed);
        BatchAcks { acks: self.clone(), owed: count }
    }

    /// Submission is over: no more acks will be handed out.
    pub fn seal(&self) {
        self.finish(1);
    }

    /// Resolves once every ack handed out is answered or dropped (after [`Acks::seal`]).
    pub async fn settled(&self) {
        poll_fn(|cx| {
            if self.remaining.load(Ordering::Acquire) == 0 {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.remaining.load(Ordering::Acquire) == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Slot `index`'s answer, once settled; `None` if its ack was dropped.
    pub fn get(&self, index: usize) -> Option<Delivery> {
        let slot = self.slots.get(index)?;
        let meta = slot.meta.load(Ordering::Relaxed);
        (meta & FILLED != 0).then(|| Delivery {
            seq: slot.seq.load(Ordering::Relaxed),
            delivered: meta as u32,
            duplicate: meta & DUPLICATE != 0,
        })
    }

    /// Writes slot `index`'s answer (its ack is finished separately).
    fn fill(&self, index: usize, d: Delivery) {
        if let Some(slot) = self.slots.get(index) {
            slot.seq.store(d.seq, Ordering::Relaxed);
            let dup = if d.duplicate { DUPLICATE } else { 0 };
            slot.meta.store(FILLED | dup | u64::from(d.delivered), Ordering::Relaxed);
        }
    }

    /// `n` acks are answered or dropped; the last wakes the waiter.
    fn finish(&self, n: usize) {
        if n > 0 && self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            self.waker.wake();
        }
    }

    /// The handle for slot `index`, already counted in `remaining`.
    fn handle(self: &Arc<Self>, index: usize) -> Ack {
        Ack { acks: self.clone(), index: slot_u32(index), done: false }
    }
}

/// The right to answer one event of a request.
pub struct Ack {
    acks: Arc<Acks>,
    /// See [`slot_u32`].
    index: u32,
    done: bool,
}

impl Ack {
    pub fn send(mut self, d: Delivery) {
        self.acks.fill(self.index as usize, d);
        self.done = true;
        self.acks.finish(1);
    }
}

/// A slot index as commands carry it (an [`Ack`]'s, a batch event's):
/// slots stay under 1,000 items × 1,000 users, and a `u32` keeps commands
/// small; one past it names no slot, so it would only read as failed.
pub(crate) fn slot_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

/// The answers owed for the events of one batch command (see
/// [`Acks::batch`]): each slot is answered in place, or handed out as an
/// [`Ack`] of its own for an answer that must wait; whatever is still owed
/// is finished at once when the batch is done — or dropped, in which case
/// its unanswered slots read as failed, as a dropped [`Ack`]'s do.
pub struct BatchAcks {
    acks: Arc<Acks>,
    owed: usize,
}

impl BatchAcks {
    /// Answers slot `index` now.
    pub fn send(&mut self, index: usize, d: Delivery) {
        self.acks.fill(index, d);
    }

    /// Slot `index` as an [`Ack`] of its own, for an answer given later;
    /// the batch no longer owes it.
    pub fn detach(&mut self, index: usize) -> Ack {
        self.owed = self.owed.saturating_sub(1);
        self.acks.handle(index)
    }
}

/// Where one event's result goes, as the shard applies it.
pub enum Answer<'a> {
    /// Nowhere: no result was asked for.
    None,
    /// An [`Ack`] of its own.
    Ack(Ack),
    /// Slot `.1` of the batch answers `.0`.
    Batch(&'a mut BatchAcks, usize),
}

impl Answer<'_> {
    pub fn send(self, d: Delivery) {
        match self {
            Answer::None => {}
            Answer::Ack(a) => a.send(d),
            Answer::Batch(b, i) => b.send(i, d),
        }
    }

    /// As an [`Ack`] of its own, for an answer given later.
    pub fn detach(self) -> Option<Ack> {
        match self {
            Answer::None => None,
            Answer::Ack(a) => Some(a),
            Answer::Batch(b, i) => Some(b.detach(i)),
        }
    }
}

impl Drop for BatchAcks {
    fn drop(&mut self) {
        self.acks.finish(self.owed);
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.done {
            self.acks.finish(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_settles_once_done_with_its_detached_acks_answered_and_the_rest_failed() {
        let acks = Acks::new(4);
        let mut batch = acks.batch(3);
        acks.seal();
        batch.send(0, Delivery { seq: 1, delivered: 1, duplicate: false });
        let later = batch.detach(1);
        assert!(futures_util::FutureExt::now_or_never(acks.settled()).is_none());
        drop(batch); // slot 2 was never reached
        assert!(futures_util::FutureExt::now_or_never(acks.settled()).is_none(), "the detached ack is out");
        later.send(Delivery { seq: 2, delivered: 0, duplicate: true });
        assert!(futures_util::FutureExt::now_or_never(acks.settled()).is_some());
        assert_eq!(acks.get(0), Some(Delivery { seq: 1, delivered: 1, duplicate: false }));
        assert_eq!(acks.get(1), Some(Delivery { seq: 2, delivered: 0, duplicate: true }));
        assert_eq!(acks.get(2), None, "an unreached slot reads as failed");
    }

    #[test]
    fn settles_when_every_ack_is_answered_or_dropped_and_keeps_each_answer() {
        let acks = Acks::new(3);
        let (a, b, c) = (acks.ack(0), acks.ack(1), acks.ack(2));
        acks.seal();
        let waiter = {
            let acks = acks.clone();
            std::thread::spawn(move || futures_util::FutureExt::now_or_never(acks.settled()).is_some())
        };
        assert!(!waiter.join().unwrap(), "not settled while acks are out");
        let t = std::thread::spawn(move || {
            b.send(Delivery { seq: 7, delivered: 2, duplicate: true });
            drop(c);
        });
        t.join().unwrap();
        a.send(Delivery { seq: 5, delivered: u32::MAX, duplicate: false });
        assert!(futures_util::FutureExt::now_or_never(acks.settled()).is_some());
        assert_eq!(acks.get(0), Some(Delivery { seq: 5, delivered: u32::MAX, duplicate: false }));
        assert_eq!(acks.get(1), Some(Delivery { seq: 7, delivered: 2, duplicate: true }));
        assert_eq!(acks.get(2), None, "a dropped ack is a failed slot");
    }

    #[test]
    fn a_sealed_block_without_acks_is_settled_at_once() {
        let acks = Acks::new(0);
        acks.seal();
        assert!(futures_util::FutureExt::now_or_never(acks.settled()).is_some());
    }
}
