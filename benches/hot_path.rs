//! Criterion benches for the pieces of the hot path:
//! ring push/pop (1 and N producers), routing lookup while the table is
//! swapped, event frame encoding, publish parsing (one pass vs simd-json and
//! serde_json, and the load generator's object),
//! fan-out of one event to K connection queues, history append and replay.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchyard::connection::{OutQueue, Outbound};
use switchyard::protocol::{self, PreparedEvent, Priority, UserId};
use switchyard::redact::Redactor;
use switchyard::routing::{Router, RoutingTable};
use switchyard::shard::history::{Held, History};
use switchyard::shard::Ring;

/// The broker's allocator, so allocation costs what it costs in the binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    let r: Ring<u64> = Ring::new(1024);
    g.bench_function("push_pop_1_producer", |b| {
        b.iter(|| {
            let _ = r.push(black_box(7));
            black_box(r.pop())
        })
    });
    // N producers: 3 threads keep pushing while the measured thread pops.
    let shared = Arc::new(Ring::<u64>::new(65536));
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..3)
        .map(|_| {
            let (r, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if r.push(1).is_err() {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    g.bench_function("pop_with_3_producers", |b| {
        b.iter(|| loop {
            if let Some(v) = shared.pop() {
                break black_box(v);
            }
        })
    });
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.join();
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    let router = Arc::new(Router::new(RoutingTable::uniform(4)));
    let user = UserId::parse("user-12345").unwrap();
    g.bench_function("lookup", |b| b.iter(|| black_box(router.shard_for(black_box(&user)))));
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (router, stop) = (router.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 1;
            while !stop.load(Ordering::Relaxed) {
                router.swap(RoutingTable::uniform(n % 4 + 1));
                n += 1;
            }
        })
    };
    g.bench_function("lookup_while_swapping", |b| b.iter(|| black_box(router.shard_for(black_box(&user)))));
    stop.store(true, Ordering::Relaxed);
    let _ = swapper.join();
    g.finish();
}

fn event(bytes: usize) -> PreparedEvent {
    PreparedEvent::new(
        "agent_thinking",
        format!("{{\"text\":\"{}\"}}", "x".repeat(bytes)).as_bytes(),
        Priority::Normal,
    )
    .expect("a valid event")
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_event_frame");
    for size in [64usize, 512, 4096] {
        let ev = event(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| black_box(protocol::encode_event_frame(black_box(42), &ev, 1_764_000_000_123)))
        });
    }
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_publish");
    let redactor = Redactor::default();
    for size in [64usize, 512, 4096] {
        let raw = format!(
            r#"{{"user":"user-42","event":"tool_completed","priority":"normal","data":{{"tool":"search","ok":true,"text":"{}","n":[1,2,3]}}}}"#,
            "y".repeat(size)
        )
        .into_bytes();
        g.throughput(Throughput::Bytes(raw.len() as u64));
        // The broker's parser: one validating pass, data copied verbatim.
        g.bench_function(format!("one_pass/{size}B"), |b| {
            b.iter(|| black_box(protocol::parse_publish(black_box(&raw), &redactor).is_ok()))
        });
        // What it replaced: simd-json into a borrowed tree (in place, so on a
        // copy), fields read from the tree, data written back out.
        g.bench_function(format!("simd_json_tree/{size}B"), |b| {
            b.iter_batched(
                || raw.clone(),
                |mut buf| {
                    use simd_json::prelude::*;
                    let v = simd_json::to_borrowed_value(&mut buf).unwrap();
                    let user = UserId::parse(v["user"].as_str().unwrap()).unwrap();
                    protocol::validate_event_name(v["event"].as_str().unwrap()).unwrap();
                    let p = Priority::parse(v["priority"].as_str().unwrap()).unwrap();
                    let mut data = Vec::with_capacity(64);
                    v["data"].write(&mut data).unwrap();
                    black_box((user, p, data))
                },
                BatchSize::SmallInput,
            )
        });
        // The same validation done with serde_json, side by side.
        g.bench_function(format!("serde_json/{size}B"), |b| {
            b.iter_batched(
                || raw.clone(),
                |buf| {
                    let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
                    let user = UserId::parse(v["user"].as_str().unwrap()).unwrap();
                    protocol::validate_event_name(v["event"].as_str().unwrap()).unwrap();
                    let p = Priority::parse(v["priority"].as_str().unwrap()).unwrap();
                    let data = serde_json::to_vec(&v["data"]).unwrap();
                    black_box((user, p, data))
                },
                BatchSize::SmallInput,
            )
        });
    }
    // What `switchyard-load` publishes (200 B of padding): the end-to-end
    // figures' per-event parse.
    let load = format!(
        r#"{{"user":"load-42","event":"load","priority":"normal","data":{{"u":"load-42","n":123456,"t":98765432,"p":"{}"}}}}"#,
        "x".repeat(200)
    )
    .into_bytes();
    g.throughput(Throughput::Bytes(load.len() as u64));
    g.bench_function("one_pass/load_generator", |b| {
        b.iter(|| black_box(protocol::parse_publish(black_box(&load), &redactor).is_ok()))
    });
    g.finish();
}

const QUEUE_LIMITS: switchyard::connection::Limits =
    switchyard::connection::Limits { max_frames: 1024, max_bytes: 4 << 20, control_bytes: 4 << 20 };
const HISTORY_LIMITS: switchyard::shard::history::Limits =
    switchyard::shard::history::Limits { events: 128, bytes: 1 << 20 };

fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("fan_out");
    let frame = protocol::encode_event_frame(1, &event(128), 0);
    for k in [1usize, 8, 64] {
        g.throughput(Throughput::Elements(k as u64));
        g.bench_function(format!("{k}_queues"), |b| {
            let mut queues: Vec<OutQueue> = (0..k).map(|_| OutQueue::new(QUEUE_LIMITS)).collect();
            let mut sink = Vec::with_capacity(64);
            let now = Instant::now();
            b.iter(|| {
                for q in queues.iter_mut() {
                    q.push_event(Outbound {
                        frame: frame.clone(),
                        accepted: Some(now),
                        priority: Priority::Normal,
                    });
                }
                // Drain so the queues stay in steady state.
                for q in queues.iter_mut() {
                    q.pop_batch(&mut sink, 64, usize::MAX);
                    sink.clear();
                }
            })
        });
    }
    g.finish();
}

fn history(c: &mut Criterion) {
    let mut g = c.benchmark_group("history");
    let frame = protocol::encode_event_frame(1, &event(128), 0);
    let now = Instant::now();
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_128_cap", |b| {
        let mut h = History::default();
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            h.push(
                Held { seq, frame: frame.clone(), priority: Priority::Normal, at: now, seg: 0 },
                HISTORY_LIMITS,
            );
        })
    });
    let mut h = History::default();
    for seq in 1..=128 {
        h.push(
            Held { seq, frame: frame.clone(), priority: Priority::Normal, at: now, seg: 0 },
            HISTORY_LIMITS,
        );
    }
    g.throughput(Throughput::Elements(64));
    g.bench_function("replay_64_of_128", |b| {
        let mut q = OutQueue::new(QUEUE_LIMITS);
        let mut sink = Vec::with_capacity(64);
        b.iter(|| {
            if let switchyard::shard::history::Replay::From(first) = h.plan_replay(64, 128) {
                for seq in first..=128 {
                    if let Some(e) = h.get_seq(seq) {
                        q.push_event(Outbound {
                            frame: e.frame.clone(),
                            accepted: None,
                            priority: e.priority,
                        });
                    }
                }
            }
            q.pop_batch(&mut sink, 64, usize::MAX);
            sink.clear();
        })
    });
    g.finish();
}

criterion_group!(benches, ring, routing, encode, parse, fan_out, history);
criterion_main!(benches);
