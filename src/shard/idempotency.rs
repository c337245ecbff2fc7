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
    /// Keys in the order they were first accepted.
    order: VecDeque<Accepted>,
}

/// One accepted key.
#[derive(Debug)]
pub struct Accepted {
    pub id: Arc<str>,
    pub seq: u64,
    pub at: Instant,
    /// With `--data-dir`: the log segment holding the key's record (0 otherwise).
    pub seg: u64,
}

impl Keys {
    /// The seq a key was first accepted with.
    pub fn get(&self, id: &str) -> Option<u64> {
        self.seqs.get(id).copied()
    }

    /// Remembers a newly accepted key.
    pub fn insert(&mut self, id: Arc<str>, seq: u64, now: Instant, seg: u64) {
        if self.order.len() >= MAX_KEYS_PER_USER {
            if let Some(old) = self.order.pop_front() {
                self.seqs.remove(&old.id);
            }
        }
        self.seqs.insert(id.clone(), seq);
        self.order.push_back(Accepted { id, seq, at: now, seg });
    }

    /// Forgets keys accepted `ttl` or longer ago.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some(a) = self.order.front() {
            if now.duration_since(a.at) < ttl {
                break;
            }
            self.seqs.remove(&a.id);
            self.order.pop_front();
        }
    }

    /// Every remembered key, oldest first (to move them between log segments).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Accepted> {
        self.order.iter_mut()
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
        k.insert("a".into(), 1, t0, 0);
        k.insert("b".into(), 2, t0 + Duration::from_secs(5), 0);
        assert_eq!(k.get("a"), Some(1));
        k.expire(t0 + Duration::from_secs(6), Duration::from_secs(3));
        assert_eq!(k.get("a"), None);
        assert_eq!(k.get("b"), Some(2));
        for i in 0..MAX_KEYS_PER_USER as u64 {
            k.insert(format!("k{i}").into(), i, t0, 0);
        }
        assert_eq!(k.len(), MAX_KEYS_PER_USER);
        assert_eq!(k.get("b"), None);
    }
}
