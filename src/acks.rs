//! Publish results without a channel per event: one [`Acks`] block per
//! publish request (a `/v1/publish`, a batch, a stream frame) holds a result
//! slot per event, and each event's command carries an [`Ack`] — the block
//! and its slot index. The shard fills the slot; the publisher awaits the
//! whole block once. One allocation per request instead of one oneshot
//! channel (and its wake) per event. A fire-and-forget stream, which needs no
//! result per event, has one slot per shard instead, answered by a fence
//! command pushed after its events.
//!
//! An [`Ack`] dropped unanswered (its command was dropped at shutdown)
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
        Ack { acks: self.clone(), index, done: false }
    }

    /// Submission is over: no more acks will be handed out.
    pub fn seal(&self) {
        self.finish_one();
    }

    fn finish_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
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
}

/// The right to answer one event of a request.
pub struct Ack {
    acks: Arc<Acks>,
    index: usize,
    done: bool,
}

impl Ack {
    pub fn send(mut self, d: Delivery) {
        if let Some(slot) = self.acks.slots.get(self.index) {
            slot.seq.store(d.seq, Ordering::Relaxed);
            let dup = if d.duplicate { DUPLICATE } else { 0 };
            slot.meta.store(FILLED | dup | u64::from(d.delivered), Ordering::Relaxed);
        }
        self.done = true;
        self.acks.finish_one();
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.done {
            self.acks.finish_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
