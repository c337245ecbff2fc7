//! A user's idempotency keys: publish `id` → the seq it was given, held for
//! `--history-ttl`, so a publisher's retry is answered with the first seq
//! instead of publishing twice (contract §4).
//!
//! Bounded per user by [`MAX_KEYS_PER_USER`] (oldest forgotten first): a
//! retry comes seconds after its first try, not hundreds of thousands of
//! publishes later. Pure data; owned by one user's state on one shard.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most keys remembered per user.
pub const MAX_KEYS_PER_USER: usize = 65_536;

#[derive(Debug, Default)]
pub struct Keys {
    seqs: HashMap<Arc<str>, u64, ahash::RandomState>,
    /// Keys in the order they were first accepted, with when.
    order: VecDeque<(Arc<str>, Instant)>,
}

impl Keys {
    /// The seq a key was first accepted with.
    pub fn get(&self, id: &str) -> Option<u64> {
        self.seqs.get(id).copied()
    }

    /// Remembers a newly accepted key.
    pub fn insert(&mut self, id: Arc<str>, seq: u64, now: Instant) {
        if self.order.len() >= MAX_KEYS_PER_USER {
            if let Some((old, _)) = self.order.pop_front() {
                self.seqs.remove(&old);
            }
        }
        self.seqs.insert(id.clone(), seq);
        self.order.push_back((id, now));
    }

    /// Forgets keys accepted `ttl` or longer ago.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((id, at)) = self.order.front() {
            if now.duration_since(*at) < ttl {
                break;
            }
            self.seqs.remove(id);
            self.order.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut k = Keys::default();
        k.insert("a".into(), 1, t0);
        k.insert("b".into(), 2, t0 + Duration::from_secs(5));
        assert_eq!(k.get("a"), Some(1));
        k.expire(t0 + Duration::from_secs(6), Duration::from_secs(3));
        assert_eq!(k.get("a"), None);
        assert_eq!(k.get("b"), Some(2));
        for i in 0..MAX_KEYS_PER_USER as u64 {
            k.insert(format!("k{i}").into(), i, t0);
        }
        assert_eq!(k.len(), MAX_KEYS_PER_USER);
        assert_eq!(k.get("b"), None);
    }
}
