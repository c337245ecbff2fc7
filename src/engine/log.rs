//! One shard's append-only log: checksummed records in numbered segment
//! files, group-committed (one batch per reactor pass) and written and
//! synced on a thread of its own, so the reactor never blocks on the disk.
//!
//! On disk a record is `len: u32 LE | crc32: u32 LE | kind: u8 | payload`,
//! where `crc32` (IEEE) covers `kind` and the payload. Segments are
//! `NNNNNNNNNNNNNNNNNNNN.log` (the index, zero-padded) and roll at a size;
//! a segment nothing holds any more is deleted by the syncer. The log does
//! not know what records mean: kinds and payloads are the engine's.
//!
//! Recovery ([`recover`]) reads every segment in order and stops at the first
//! record that is torn (cut short) or fails its checksum: that segment is
//! truncated there and every later segment removed, so what remains is a
//! clean prefix of what was written. With `--fsync always` nothing after
//! that point was ever acknowledged.
//!
//! Why our own log and not a crate: the reactor needs exactly "append to a
//! buffer during a pass, hand the buffer to a syncer, learn when it is
//! durable", with no lock or sync on its thread; the history is read from
//! memory, so an index on disk is dead weight. Measured against redb and
//! fjall doing the same group commit (`benches/log_vs_kv.rs`, PERFORMANCE.md):
//! 1.55× fjall and 2.1× redb at 256 records per batch, even with fjall at 64,
//! and fjall 1.6× faster at one record per batch only because it syncs on the
//! calling thread, which the reactor may not do.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

/// Bytes before a record's payload.
pub const HEADER: usize = 9;
/// Largest payload a record may carry (a full event frame fits many times).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// When the syncer makes written batches durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `fdatasync` after every batch, before it counts as done.
    Always,
    /// At most this long after a batch is written.
    Every(Duration),
    /// Left to the operating system.
    Never,
}

/// Where a record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub segment: u64,
    pub offset: u64,
}

/// A record read back at recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub payload: Vec<u8>,
    pub pos: Pos,
}

/// Where recovery cut the log, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub at: Pos,
    /// Bytes dropped (the rest of that segment plus every later one).
    pub dropped: u64,
    pub reason: &'static str,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub records: Vec<Record>,
    pub truncated: Option<Truncation>,
    /// Segment indexes present after recovery, oldest first.
    pub segments: Vec<u64>,
    /// Bytes in the last segment (where appends continue).
    pub tail_len: u64,
}

fn segment_name(index: u64) -> String {
    format!("{index:020}.log")
}

fn segment_index(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

/// Appends one encoded record to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Decodes the records of one segment; stops at the first bad one and says
/// where and why.
fn scan(segment: u64, bytes: &[u8]) -> (Vec<Record>, Option<(u64, &'static str)>) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + HEADER) else {
            return (out, Some((at as u64, "torn record header")));
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let kind = head[8];
        if len > MAX_PAYLOAD {
            return (out, Some((at as u64, "record length out of range")));
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            return (out, Some((at as u64, "torn record")));
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(payload);
        if h.finalize() != crc {
            return (out, Some((at as u64, "checksum mismatch")));
        }
        out.push(Record { kind, payload: payload.to_vec(), pos: Pos { segment, offset: at as u64 } });
        at += HEADER + len;
    }
    (out, None)
}

/// Reads every segment of `dir` in order, cutting a torn or corrupt tail
/// (truncating that segment, removing later ones, syncing the directory).
pub fn recover(dir: &Path) -> io::Result<Recovered> {
    std::fs::create_dir_all(dir)?;
    let mut indexes: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_index(&e.file_name().to_string_lossy()))
        .collect();
    indexes.sort_unstable();
    let mut rec = Recovered::default();
    for (i, &index) in indexes.iter().enumerate() {
        let path = dir.join(segment_name(index));
        let bytes = std::fs::read(&path)?;
        let (records, bad) = scan(index, &bytes);
        rec.records.extend(records);
        rec.segments.push(index);
        rec.tail_len = bytes.len() as u64;
        if let Some((offset, reason)) = bad {
            let mut dropped = bytes.len() as u64 - offset;
            OpenOptions::new().write(true).open(&path)?.set_len(offset)?;
            File::open(&path)?.sync_all()?;
            for &later in &indexes[i + 1..] {
                let p = dir.join(segment_name(later));
                dropped += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(p)?;
            }
            crate::engine::datadir::sync_dir(dir)?;
            rec.tail_len = offset;
            rec.truncated = Some(Truncation { at: Pos { segment: index, offset }, dropped, reason });
            break;
        }
    }
    Ok(rec)
}

/// Upper bounds (µs) of the sync-latency buckets, as Prometheus `le` labels.
pub const SYNC_BUCKETS_US: [u64; 12] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// The syncer's progress, shared with the reactor.
#[derive(Debug, Default)]
struct Progress {
    /// Highest batch number that is done under the policy.
    done: AtomicU64,
    /// Woken when `done` moves.
    waker: AtomicWaker,
    /// The first I/O error, after which no batch completes.
    failed: OnceLock<String>,
    /// Batches made durable with a sync, and microseconds spent syncing.
    syncs: AtomicU64,
    sync_us: AtomicU64,
    /// Syncs by duration: `sync_buckets[i]` counts those that took at most
    /// `SYNC_BUCKETS_US[i]` (the last bucket is everything slower).
    sync_buckets: [AtomicU64; SYNC_BUCKETS_US.len() + 1],
}

enum Job {
    Batch { number: u64, chunks: Vec<(u64, Vec<u8>)> },
    Remove(u64),
    Stop,
}

/// The reactor's side of a shard's log.
pub struct Log {
    segment_bytes: u64,
    current: u64,
    current_len: u64,
    /// Bytes of every segment on disk (or about to be), by index.
    sizes: BTreeMap<u64, u64>,
    /// Records appended this pass, by segment.
    pending: Vec<(u64, Vec<u8>)>,
    next_batch: u64,
    jobs: flume::Sender<Job>,
    progress: Arc<Progress>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Log {
    /// Recovers `dir` and starts its syncer; appends continue after the
    /// recovered tail.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        policy: SyncPolicy,
        name: &str,
    ) -> io::Result<(Log, Recovered)> {
        let recovered = recover(dir)?;
        let current = recovered.segments.last().copied().unwrap_or(0);
        let (jobs, rx) = flume::unbounded();
        let progress = Arc::new(Progress::default());
        let thread = {
            let (dir, progress) = (dir.to_path_buf(), progress.clone());
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || syncer(dir, policy, rx, progress))?
        };
        let mut sizes = BTreeMap::new();
        for &index in &recovered.segments {
            let len = std::fs::metadata(dir.join(segment_name(index))).map(|m| m.len()).unwrap_or(0);
            sizes.insert(index, len);
        }
        let log = Log {
            segment_bytes: segment_bytes.max(HEADER as u64 + 1),
            current,
            current_len: recovered.tail_len,
            sizes,
            pending: Vec::new(),
            next_batch: 1,
            jobs,
            progress,
            thread: Some(thread),
        };
        Ok((log, recovered))
    }

    /// Buffers a record for this pass's batch; returns where it will be.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Pos {
        let size = (HEADER + payload.len()) as u64;
        if self.current_len > 0 && self.current_len + size > self.segment_bytes {
            self.current += 1;
            self.current_len = 0;
        }
        if self.pending.last().is_none_or(|(s, _)| *s != self.current) {
            self.pending.push((self.current, Vec::with_capacity(4096)));
        }
        let pos = Pos { segment: self.current, offset: self.current_len };
        if let Some((_, buf)) = self.pending.last_mut() {
            encode(buf, kind, payload);
        }
        self.current_len += size;
        *self.sizes.entry(self.current).or_insert(0) += size;
        pos
    }

    /// Whether records were appended since the last commit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The number the next [`Log::commit`] will give its batch.
    pub fn next_batch(&self) -> u64 {
        self.next_batch
    }

    /// Bytes on disk (counting what is being written) and segment files.
    pub fn disk_usage(&self) -> (u64, usize) {
        (self.sizes.values().sum(), self.sizes.len())
    }

    /// Hands this pass's records to the syncer as one batch; returns its
    /// number (compare with [`Log::done`]), or `None` if nothing was appended.
    pub fn commit(&mut self) -> Option<u64> {
        if self.pending.is_empty() {
            return None;
        }
        let number = self.next_batch;
        self.next_batch += 1;
        let chunks = std::mem::take(&mut self.pending);
        // The syncer only goes away with the log; a failed send is a failed batch.
        if self.jobs.send(Job::Batch { number, chunks }).is_err() {
            let _ = self.progress.failed.set("the log's syncer has stopped".into());
        }
        Some(number)
    }

    /// The highest batch number done under the policy (written, and synced
    /// with `Always`).
    pub fn done(&self) -> u64 {
        // Acquire: pairs with the syncer's Release store after the write/sync.
        self.progress.done.load(Ordering::Acquire)
    }

    /// Ready once `done()` has moved past `seen` (or the log failed).
    pub fn poll_done(&self, seen: u64, cx: &mut Context<'_>) -> Poll<u64> {
        self.progress.waker.register(cx.waker());
        let done = self.done();
        if done > seen || self.failed().is_some() {
            Poll::Ready(done)
        } else {
            Poll::Pending
        }
    }

    /// The first I/O error the syncer met, if any.
    pub fn failed(&self) -> Option<&str> {
        self.progress.failed.get().map(String::as_str)
    }

    /// Syncs done so far, and the microseconds they took in all.
    pub fn sync_stats(&self) -> (u64, u64) {
        (self.progress.syncs.load(Ordering::Relaxed), self.progress.sync_us.load(Ordering::Relaxed))
    }

    /// Segments that no longer take appends, oldest first.
    pub fn old_segments(&self) -> Vec<u64> {
        self.sizes.keys().copied().filter(|&s| s < self.current).collect()
    }

    /// Syncs per latency bucket (see [`SYNC_BUCKETS_US`]), not cumulative.
    pub fn sync_histogram(&self) -> [u64; SYNC_BUCKETS_US.len() + 1] {
        std::array::from_fn(|i| self.progress.sync_buckets[i].load(Ordering::Relaxed))
    }

    /// The segment appends go to now.
    pub fn current_segment(&self) -> u64 {
        self.current
    }

    /// Deletes a segment nothing holds any more (never the current one).
    pub fn remove_segment(&mut self, index: u64) {
        if index < self.current {
            self.sizes.remove(&index);
            let _ = self.jobs.send(Job::Remove(index));
        }
    }

    /// Commits what is pending, waits for the syncer to finish everything
    /// (syncing it whatever the policy) and stops it.
    pub fn close(mut self) -> io::Result<()> {
        self.finish()
    }

    /// [`Log::close`] for a log that cannot be moved out of its owner;
    /// nothing may be appended afterwards.
    pub fn finish(&mut self) -> io::Result<()> {
        self.commit();
        let _ = self.jobs.send(Job::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.failed() {
            Some(e) => Err(io::Error::other(e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.jobs.send(Job::Stop);
            let _ = t.join();
        }
    }
}

/// The syncer thread: writes batches in order, syncs per the policy,
/// publishes progress, removes released segments.
fn syncer(dir: PathBuf, policy: SyncPolicy, jobs: flume::Receiver<Job>, progress: Arc<Progress>) {
    let mut files: BTreeMap<u64, File> = BTreeMap::new();
    let mut written = 0u64; // highest batch written
    let mut last_sync = Instant::now();
    let fail = |e: io::Error| {
        let _ = progress.failed.set(e.to_string());
        progress.waker.wake();
    };
    let sync = |files: &BTreeMap<u64, File>| -> io::Result<()> {
        let t0 = Instant::now();
        for f in files.values() {
            f.sync_data()?;
        }
        let us = t0.elapsed().as_micros() as u64;
        progress.syncs.fetch_add(1, Ordering::Relaxed);
        progress.sync_us.fetch_add(us, Ordering::Relaxed);
        let bucket = SYNC_BUCKETS_US.iter().position(|&le| us <= le).unwrap_or(SYNC_BUCKETS_US.len());
        progress.sync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    loop {
        let job = match policy {
            SyncPolicy::Every(d) if written > progress.done.load(Ordering::Relaxed) => {
                match jobs.recv_timeout(d.saturating_sub(last_sync.elapsed())) {
                    Ok(j) => Some(j),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => Some(Job::Stop),
                }
            }
            _ => Some(jobs.recv().unwrap_or(Job::Stop)),
        };
        match job {
            Some(Job::Batch { number, chunks }) => {
                let mut new_segment = false;
                let result = chunks.iter().try_for_each(|(seg, bytes)| {
                    if !files.contains_key(seg) {
                        let f = OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(dir.join(segment_name(*seg)))?;
                        // Only the newest segment takes appends; older ones are synced and closed.
                        if let Some((_, older)) = files.pop_first() {
                            older.sync_data()?;
                        }
                        files.insert(*seg, f);
                        new_segment = true;
                    }
                    files.get_mut(seg).map_or(Ok(()), |f| f.write_all(bytes))
                });
                if let Err(e) = result {
                    fail(e);
                    continue;
                }
                if new_segment {
                    if let Err(e) = crate::engine::datadir::sync_dir(&dir) {
                        fail(e);
                        continue;
                    }
                }
                written = number;
                #[cfg(debug_assertions)]
                failpoint_kill_before_fsync(&chunks);
                if policy == SyncPolicy::Always {
                    if let Err(e) = sync(&files) {
                        fail(e);
                        continue;
                    }
                    last_sync = Instant::now();
                }
                if !matches!(policy, SyncPolicy::Every(_)) {
                    progress.done.store(written, Ordering::Release);
                    progress.waker.wake();
                }
            }
            Some(Job::Remove(index)) => {
                // Whatever was carried forward out of it must be durable first.
                if let Err(e) = sync(&files) {
                    fail(e);
                    continue;
                }
                files.remove(&index);
                if let Err(e) = std::fs::remove_file(dir.join(segment_name(index))) {
                    if e.kind() != io::ErrorKind::NotFound {
                        fail(e);
                    }
                }
            }
            Some(Job::Stop) => {
                if let Err(e) = sync(&files) {
                    fail(e);
                }
                progress.done.store(written, Ordering::Release);
                progress.waker.wake();
                return;
            }
            None => {}
        }
        if let SyncPolicy::Every(d) = policy {
            if written > progress.done.load(Ordering::Relaxed) && last_sync.elapsed() >= d {
                if let Err(e) = sync(&files) {
                    fail(e);
                    continue;
                }
                last_sync = Instant::now();
                progress.done.store(written, Ordering::Release);
                progress.waker.wake();
            }
        }
    }
}

/// Test builds only (debug assertions): with
/// `SWITCHYARD_FAILPOINT=kill-before-fsync`, a batch carrying the bytes
/// `failpoint:kill-before-fsync` kills the process after it is written and
/// before it is synced — what `kill -9` alone cannot aim at. The tests use
/// it to prove that nothing is answered or delivered before its sync.
#[cfg(debug_assertions)]
fn failpoint_kill_before_fsync(chunks: &[(u64, Vec<u8>)]) {
    const MARK: &[u8] = b"failpoint:kill-before-fsync";
    if std::env::var("SWITCHYARD_FAILPOINT").as_deref() != Ok("kill-before-fsync") {
        return;
    }
    if chunks.iter().any(|(_, b)| b.windows(MARK.len()).any(|w| w == MARK)) {
        eprintln!("failpoint kill-before-fsync: aborting between the write and the sync");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_done(log: &Log, batch: u64) {
        let t0 = Instant::now();
        while log.done() < batch {
            assert!(t0.elapsed() < Duration::from_secs(10), "batch {batch} not done");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn records_round_trip_across_segments_and_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, rec) = Log::open(tmp.path(), 100, SyncPolicy::Always, "t").unwrap();
        assert!(rec.records.is_empty());
        let mut positions = Vec::new();
        for i in 0..10u8 {
            positions.push(log.append(i % 3, &[i; 30]));
        }
        let b = log.commit().unwrap();
        wait_done(&log, b);
        assert!(log.current_segment() >= 3, "rolled at 100 bytes");
        let (syncs, _) = log.sync_stats();
        assert!(syncs >= 1);
        log.close().unwrap();
        let (mut log, rec) = Log::open(tmp.path(), 100, SyncPolicy::Always, "t").unwrap();
        assert_eq!(rec.records.len(), 10);
        assert!(rec.truncated.is_none());
        for (i, r) in rec.records.iter().enumerate() {
            assert_eq!(
                (r.kind, r.payload.as_slice(), r.pos),
                (i as u8 % 3, &vec![i as u8; 30][..], positions[i])
            );
        }
        // Appends continue after the recovered tail.
        log.append(9, b"after");
        log.close().unwrap();
        let rec = recover(tmp.path()).unwrap();
        assert_eq!(rec.records.last().unwrap().payload, b"after");
    }

    #[test]
    fn a_torn_tail_is_cut_and_later_segments_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(tmp.path(), 1 << 20, SyncPolicy::Always, "t").unwrap();
        for i in 0..5u8 {
            log.append(1, &[i; 10]);
        }
        log.close().unwrap();
        let seg = tmp.path().join(segment_name(0));
        let full = std::fs::read(&seg).unwrap();
        // A crash mid-write: the last record is cut short; a stray later segment exists.
        std::fs::write(&seg, &full[..full.len() - 4]).unwrap();
        std::fs::write(tmp.path().join(segment_name(1)), b"garbage").unwrap();
        let rec = recover(tmp.path()).unwrap();
        assert_eq!(rec.records.len(), 4);
        let t = rec.truncated.unwrap();
        assert_eq!(t.reason, "torn record");
        assert_eq!(t.at, Pos { segment: 0, offset: 4 * (HEADER as u64 + 10) });
        assert!(!tmp.path().join(segment_name(1)).exists());
        // Recovery is idempotent: the cut log reads clean.
        let again = recover(tmp.path()).unwrap();
        assert_eq!(again.records.len(), 4);
        assert!(again.truncated.is_none());
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum_and_ends_the_log_there() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(tmp.path(), 1 << 20, SyncPolicy::Never, "t").unwrap();
        for i in 0..5u8 {
            log.append(1, &[i; 10]);
        }
        log.close().unwrap();
        let seg = tmp.path().join(segment_name(0));
        let mut bytes = std::fs::read(&seg).unwrap();
        let second = HEADER + 10;
        bytes[second + HEADER + 3] ^= 0x40;
        std::fs::write(&seg, &bytes).unwrap();
        let rec = recover(tmp.path()).unwrap();
        assert_eq!(rec.records.len(), 1);
        assert_eq!(rec.truncated.unwrap().reason, "checksum mismatch");
    }

    #[test]
    fn an_interval_policy_syncs_without_new_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) =
            Log::open(tmp.path(), 1 << 20, SyncPolicy::Every(Duration::from_millis(20)), "t").unwrap();
        log.append(1, b"x");
        let b = log.commit().unwrap();
        wait_done(&log, b);
        assert_eq!(log.sync_stats().0, 1);
    }

    #[test]
    fn released_segments_are_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(tmp.path(), 50, SyncPolicy::Always, "t").unwrap();
        for _ in 0..4 {
            log.append(1, &[0; 30]);
            let b = log.commit().unwrap();
            wait_done(&log, b);
        }
        assert!(tmp.path().join(segment_name(0)).exists());
        log.remove_segment(0);
        log.remove_segment(log.current_segment()); // refused: appends go there
        log.close().unwrap();
        assert!(!tmp.path().join(segment_name(0)).exists());
        assert_eq!(recover(tmp.path()).unwrap().records.len(), 3);
    }
}
