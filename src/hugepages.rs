//! Transparent huge pages, turned off for the process.
//!
//! The allocator (mimalloc) asks the kernel for transparent huge pages on
//! its arenas, and the first touch of each fresh 2 MiB region then faults it
//! in whole, zeroing 2 MiB inside one page fault. On the CI-class machine
//! that stalled the shard thread ~4.7 ms each time its memory grew, which
//! set the broker's p99.9 (PERFORMANCE.md, "What we changed"). With THP off,
//! memory is faulted in 4 KiB pages, a microsecond at a time. Used by the
//! broker's `main` and by the load generator (whose stalls would count as
//! latency); touches nothing but the process's THP flag.

/// Turns transparent huge pages off for every mapping of this process, the
/// allocator's existing arenas included. Returns whether the kernel agreed.
#[cfg(target_os = "linux")]
pub fn disable() -> bool {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

/// Elsewhere there is no such switch.
#[cfg(not(target_os = "linux"))]
pub fn disable() -> bool {
    false
}
