//! The disk engine's write path against two well-kept crates doing the same
//! job: per reactor pass, a batch of event records made durable with one
//! sync, then the next pass (the `--fsync always` group commit). Measures
//! records/s and the time from a batch's commit to its durability.
//!
//! - `switchyard log`: `engine::log::Log`, `SyncPolicy::Always` (append into
//!   a buffer, hand it to the syncer thread, wait until it says done).
//! - `redb`: one write transaction per batch (redb commits are durable).
//! - `fjall`: one `WriteBatch` per batch, then `persist(SyncData)`.
//!
//! `cargo bench --bench log_vs_kv` runs the full comparison (results for
//! PERFORMANCE.md); under `cargo test` (CI) it runs a few batches only.

use std::time::{Duration, Instant};

use switchyard::engine::log::{Log, SyncPolicy};

const RECORD: usize = 300; // an agent event frame with its bookkeeping

struct Result {
    name: &'static str,
    records_per_s: f64,
    p50_us: u64,
    p99_us: u64,
}

fn summarize(
    name: &'static str,
    batches: usize,
    per_batch: usize,
    took: Duration,
    mut lat: Vec<u64>,
) -> Result {
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    Result {
        name,
        records_per_s: (batches * per_batch) as f64 / took.as_secs_f64(),
        p50_us: at(0.5),
        p99_us: at(0.99),
    }
}

fn ours(dir: &std::path::Path, batches: usize, per_batch: usize) -> Result {
    let (mut log, _) = Log::open(dir, 64 << 20, SyncPolicy::Always, "bench-sync").expect("open");
    let payload = vec![7u8; RECORD];
    let mut lat = Vec::with_capacity(batches);
    let t0 = Instant::now();
    for _ in 0..batches {
        for _ in 0..per_batch {
            log.append(2, &payload);
        }
        let t = Instant::now();
        let b = log.commit().expect("a batch");
        while log.done() < b {
            std::hint::spin_loop();
        }
        lat.push(t.elapsed().as_micros() as u64);
    }
    let took = t0.elapsed();
    log.close().expect("close");
    summarize("switchyard log", batches, per_batch, took, lat)
}

/// Runs `batches` batches through `write`, which gets each batch's keys and
/// the record payload and makes them durable; a batch's latency is the whole
/// call (the key-value stores insert and commit in one step).
fn timed(
    name: &'static str,
    batches: usize,
    per_batch: usize,
    mut write: impl FnMut(std::ops::Range<u64>, &[u8]),
) -> Result {
    let payload = vec![7u8; RECORD];
    let mut lat = Vec::with_capacity(batches);
    let t0 = Instant::now();
    for b in 0..batches as u64 {
        let first = b * per_batch as u64 + 1;
        let t = Instant::now();
        write(first..first + per_batch as u64, &payload);
        lat.push(t.elapsed().as_micros() as u64);
    }
    summarize(name, batches, per_batch, t0.elapsed(), lat)
}

fn redb(dir: &std::path::Path, batches: usize, per_batch: usize) -> Result {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
    let db = redb::Database::create(dir.join("events.redb")).expect("create");
    timed("redb", batches, per_batch, |keys, payload| {
        let tx = db.begin_write().expect("tx");
        {
            let mut table = tx.open_table(TABLE).expect("table");
            for key in keys {
                table.insert(key, payload).expect("insert");
            }
        }
        tx.commit().expect("commit");
    })
}

fn fjall(dir: &std::path::Path, batches: usize, per_batch: usize) -> Result {
    let db = fjall::Database::builder(dir).open().expect("open");
    let ks = db.keyspace("events", fjall::KeyspaceCreateOptions::default).expect("keyspace");
    timed("fjall", batches, per_batch, |keys, payload| {
        let mut batch = db.batch();
        for key in keys {
            batch.insert(&ks, key.to_be_bytes(), payload);
        }
        batch.commit().expect("commit");
        db.persist(fjall::PersistMode::SyncData).expect("persist");
    })
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` runs this as a quick smoke.
    let full = std::env::args().any(|a| a == "--bench");
    let (batches, sizes): (usize, &[usize]) = if full { (2000, &[1, 64, 256]) } else { (5, &[16]) };
    let base =
        std::env::var("LOG_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    println!("| records per batch | engine | records/s | commit→durable p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    for &per_batch in sizes {
        for run in [ours, redb, fjall] {
            let dir = tempfile::tempdir_in(&base).expect("tempdir");
            let r = run(dir.path(), batches, per_batch);
            println!("| {per_batch} | {} | {:.0} | {} | {} |", r.name, r.records_per_s, r.p50_us, r.p99_us);
        }
    }
}
