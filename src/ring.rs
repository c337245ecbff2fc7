//! A shard's inbox: a bounded lock-free MPSC ring of commands plus a wake-up.
//!
//! Any thread may push; only the owning shard pops. The queue is crossbeam's
//! `ArrayQueue` (a lock-free bounded array queue). In front of it sits an
//! admission counter, so a producer can reserve room for several commands at
//! once (a publish to many users across shards) and either get all of it or
//! none: that is what makes "nothing is half-applied" hold under 503.
//!
//! The wake-up is an `AtomicWaker`: the shard registers before it sleeps and a
//! producer's `wake` costs one atomic RMW when the shard is awake. No lock on
//! any path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

/// The ring is full: the caller answers 503 + Retry-After.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shard ring is full")]
pub struct RingFull;

pub struct Ring<T> {
    queue: ArrayQueue<T>,
    /// Slots reserved by producers: commands in the queue plus commands a
    /// holder of a [`Permit`] is about to push. Never exceeds the capacity, so
    /// a permitted push always finds room. Padded: every producer hits it.
    reserved: CachePadded<AtomicUsize>,
    waker: AtomicWaker,
}

/// Room for `n` commands in one ring, reserved. Pushes through a permit
/// wake the shard once, when the permit is dropped.
#[must_use = "an unused permit is released on drop"]
pub struct Permit<'a, T> {
    ring: &'a Ring<T>,
    left: usize,
    pushed: bool,
}

impl<T> Ring<T> {
    pub fn new(capacity: usize) -> Self {
        Ring {
            queue: ArrayQueue::new(capacity.max(1)),
            reserved: CachePadded::new(AtomicUsize::new(0)),
            waker: AtomicWaker::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Slots taken: events waiting (a batch command holds one per event),
    /// plus room producers have reserved and not yet filled.
    pub fn len(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Reserves room for `n` commands, or fails without reserving anything.
    pub fn reserve(&self, n: usize) -> Result<Permit<'_, T>, RingFull> {
        let cap = self.capacity();
        // Relaxed is enough: the counter only bounds occupancy; the queue's own
        // operations order the commands themselves.
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            if cur + n > cap {
                return Err(RingFull);
            }
            match self.reserved.compare_exchange_weak(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(Permit { ring: self, left: n, pushed: false }),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Pushes one command (reserve + push + wake).
    pub fn push(&self, cmd: T) -> Result<(), (RingFull, T)> {
        match self.reserve(1) {
            Ok(mut p) => {
                p.push(cmd);
                Ok(())
            }
            Err(e) => Err((e, cmd)),
        }
    }

    /// Consumer side: takes the next command.
    pub fn pop(&self) -> Option<T> {
        let cmd = self.queue.pop()?;
        self.reserved.fetch_sub(1, Ordering::Relaxed);
        Some(cmd)
    }

    /// Consumer side: gives back the slots a counted command held beyond
    /// the one [`Ring::pop`] gives back (see [`Permit::push_counted`]).
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.reserved.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Consumer side: `Ready` when a command is waiting, else registers the
    /// waker so the next push wakes the shard.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.queue.is_empty() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Re-check after registering: a push between the check and the
        // registration would otherwise be missed.
        if self.queue.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Wakes the consumer (used for out-of-band signals such as shutdown).
    pub fn wake(&self) {
        self.waker.wake();
    }
}

impl<T> Permit<'_, T> {
    /// Pushes one command into the reserved room (the shard is woken on drop).
    pub fn push(&mut self, cmd: T) {
        assert!(self.left > 0, "pushed more commands than reserved");
        self.left -= 1;
        if self.ring.queue.push(cmd).is_err() {
            // Unreachable: `reserved` never exceeds capacity, and this slot was reserved.
            unreachable!("ring push failed inside a reservation");
        }
        self.pushed = true;
    }
}

impl<T> Permit<'_, T> {
    /// Pushes one command that stands for `count` of the reserved slots (a
    /// batch of events: the ring's bound stays a bound on events). The
    /// consumer gives back all but one with [`Ring::release`].
    pub fn push_counted(&mut self, cmd: T, count: usize) {
        assert!(count >= 1 && self.left >= count, "pushed more than reserved");
        self.left -= count - 1;
        self.push(cmd);
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        if self.left > 0 {
            self.ring.reserved.fetch_sub(self.left, Ordering::Relaxed);
        }
        if self.pushed {
            self.ring.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reservation_is_all_or_nothing() {
        let r: Ring<u32> = Ring::new(4);
        let mut p = r.reserve(3).unwrap();
        assert!(r.reserve(2).is_err());
        p.push(1);
        drop(p); // releases the 2 unused slots
        let mut q = r.reserve(3).unwrap();
        q.push(2);
        q.push(3);
        q.push(4);
        assert!(r.push(5).is_err());
        assert_eq!(r.pop(), Some(1));
        assert!(r.push(5).is_ok());
    }

    #[test]
    fn a_counted_command_holds_its_slots_until_released() {
        let r: Ring<u32> = Ring::new(8);
        let mut p = r.reserve(6).unwrap();
        p.push_counted(1, 5);
        p.push(2);
        drop(p);
        assert_eq!(r.len(), 6);
        assert!(r.reserve(3).is_err(), "the batch's slots stay taken");
        assert_eq!(r.pop(), Some(1));
        assert!(r.reserve(4).is_err(), "until the consumer releases them");
        r.release(4);
        assert_eq!(r.len(), 1);
        assert!(r.reserve(7).is_ok());
    }

    #[test]
    fn many_producers_one_consumer_lose_nothing() {
        let r = Arc::new(Ring::<u64>::new(1024));
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let mut v = p << 32 | i;
                        loop {
                            match r.push(v) {
                                Ok(()) => break,
                                Err((_, back)) => {
                                    v = back;
                                    std::thread::yield_now();
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let mut next = [0u64; 4];
        let mut got = 0;
        while got < 40_000 {
            if let Some(v) = r.pop() {
                let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                assert_eq!(i, next[p], "per-producer FIFO");
                next[p] += 1;
                got += 1;
            } else {
                std::thread::yield_now();
            }
        }
        for p in producers {
            p.join().unwrap();
        }
    }
}
