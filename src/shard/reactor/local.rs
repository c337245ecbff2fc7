//! Inline publishing: a publisher stream served by a shard thread applies
//! the events of that shard's own users directly to its [`ShardCore`],
//! instead of pushing them into the shard's own ring and waiting for the
//! reactor's next pass. With `--shards 1` no event crosses a ring at all.
//!
//! The rules a ring pass keeps hold here too: events are applied in the
//! order given; a run of inline events is a pass of its own (one clock
//! read, one group commit with `--data-dir`), and it ends — so the thread
//! can yield to the writers — once a connection's queue is half full or
//! [`MAX_PASS`](super::MAX_PASS) events were applied. Replies with `--fsync always` still
//! wait for the sync, as from the ring.
//!
//! It touches the core only between `.await`s of its caller: each call is
//! synchronous and leaves no `RefCell` borrowed.

use std::cell::RefCell;
use std::rc::Rc;

use super::ShardCore;
use crate::acks::{Ack, Answer, Delivery};
use crate::shard::persist::Deferred;
use crate::shard::PublishCmd;
use crate::shared::Shared;

thread_local! {
    /// The core of the shard this thread runs, while its reactor runs.
    static CORE: RefCell<Option<Rc<ShardCore>>> = const { RefCell::new(None) };
}

/// Makes `core` the thread's own shard until the guard is dropped.
pub(super) fn install(core: &Rc<ShardCore>) -> Installed {
    CORE.with(|c| *c.borrow_mut() = Some(core.clone()));
    Installed
}

/// Clears the thread's shard when the reactor stops.
pub(super) struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        // At thread exit the slot may already be gone: then so is the core.
        let _ = CORE.try_with(|c| c.borrow_mut().take());
    }
}

/// The shard the calling thread runs, when it runs one of `shared`'s.
pub fn local_shard(shared: &Shared) -> Option<LocalShard> {
    CORE.with(|c| {
        let c = c.borrow();
        let core = c.as_ref().filter(|core| std::ptr::eq(&*core.shared, shared))?;
        Some(LocalShard { id: core.id, shared: shared as *const Shared as usize })
    })
}

/// A token for the thread's own shard (it is `Send`, as publisher tasks
/// must be: each call finds the core on the calling thread again, and does
/// nothing where that is not this shard — a task that moved threads).
#[derive(Debug, Clone, Copy)]
pub struct LocalShard {
    id: usize,
    /// The broker's address, only compared.
    shared: usize,
}

impl LocalShard {
    /// The shard's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Runs `f` on the core, when the calling thread runs this shard.
    fn with<R>(&self, f: impl FnOnce(&ShardCore) -> R) -> Option<R> {
        CORE.with(|c| {
            let c = c.borrow();
            let core = c.as_ref().filter(|core| {
                core.id == self.id && &*core.shared as *const Shared as usize == self.shared
            })?;
            Some(f(core))
        })
    }

    /// Starts a run of inline events (a pass of its own).
    pub fn begin(&self) {
        self.with(|core| core.start_pass());
    }

    /// Applies one event of this shard's users, answering `answer`; hands
    /// the event back (to go through the ring) when the calling thread does
    /// not run this shard.
    #[must_use]
    pub fn publish(&self, cmd: PublishCmd, answer: Answer<'_>) -> Option<PublishCmd> {
        let mut cmd = Some(cmd);
        self.with(|core| {
            core.pass_left.set(core.pass_left.get().saturating_sub(1));
            if let Some(cmd) = cmd.take() {
                core.publish(cmd, answer);
            }
        });
        cmd
    }

    /// Whether the run should end so that the writers can flush: a queue is
    /// half full, or the run is as long as a reactor pass may be.
    pub fn should_yield(&self) -> bool {
        self.with(|core| core.pass_full.get() || core.pass_left.get() == 0).unwrap_or(false)
    }

    /// Answers `ack` once everything applied before it is durable (at once
    /// without `--fsync always`), as a fence command does; hands it back
    /// when the calling thread does not run this shard.
    pub fn fence(&self, ack: Ack) -> Result<(), Ack> {
        let mut ack = Some(ack);
        self.with(|core| {
            if let Some(reply) = ack.take() {
                let delivery = Delivery { seq: 0, delivered: 0, duplicate: false };
                core.answer_after_sync(Deferred::Reply { reply, delivery });
            }
        });
        ack.map_or(Ok(()), Err)
    }

    /// Ends the run: its group commit (with `--data-dir`).
    pub fn end(&self) {
        self.with(|core| core.commit_pass());
    }
}
