//! Real-time scheduling for the generator's sending side at fixed rates.
//!
//! The pacing thread and the publishers' runtime thread share the
//! generator's core with the clients' runtime, which is busy whenever
//! deliveries arrive. In the normal class a thread that woke for a due
//! event waited for that thread's slice to end: events left up to ~5 ms
//! late (5,000 users, 30k/s), and that counted as the broker's latency. In
//! the real-time class (`SCHED_FIFO`) they run as soon as they wake.
//!
//! Rules that keep this safe (each learnt the hard way):
//! - The pacer and the publishers share one rank: they hand events over
//!   through flume, whose wakers sit behind a spin lock, and a thread
//!   spinning above the lock's holder on the same core never lets it run.
//!   At one rank neither preempts the other.
//! - They leave the class together: when the pacer falls behind (the
//!   generator is the bottleneck) both return to the normal class, so
//!   neither starves the clients nor spins on a lock the other holds from
//!   below.
//! - Nothing else shares a lock with them: their figures go to the run
//!   through atomics and a mutex taken once per publisher.
//!
//! Needs root or `CAP_SYS_NICE`; without, threads stay in the normal class
//! and the run says so once. Touches only the scheduling class of the
//! threads that enter here.

use std::sync::Mutex;

/// Which thread enters.
pub(crate) enum Role {
    Pacer,
    Publishers,
}

/// The publishers' threads in the real-time class (their TIDs).
static PUBLISHERS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Puts the calling thread in the real-time class; whether it took.
pub(crate) fn enter(role: Role) -> bool {
    if !set(0, libc::SCHED_FIFO, 1) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| eprintln!("note: no real-time priority for pacing (needs root or CAP_SYS_NICE)"));
        return false;
    }
    if let Role::Publishers = role {
        // SAFETY: gettid takes nothing and cannot fail.
        let tid = unsafe { libc::gettid() };
        PUBLISHERS.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
    }
    true
}

/// Returns the calling thread to the normal class.
pub(crate) fn leave_self() {
    set(0, libc::SCHED_OTHER, 0);
}

/// Returns the calling thread and every publishers' thread to the normal class.
pub(crate) fn leave_all() {
    leave_self();
    for tid in PUBLISHERS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        set(tid, libc::SCHED_OTHER, 0);
    }
}

/// Sets a thread's scheduling policy (`tid` 0: the calling thread); whether it took.
fn set(tid: libc::pid_t, policy: libc::c_int, rank: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: rank };
    // SAFETY: `param` is a valid sched_param that outlives the call; an
    // unknown or exited `tid` only makes the call fail.
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
}
