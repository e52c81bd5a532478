//! Costs of the pack runtime, in one run: fault-free reads (with and without the pid
//! cache), map updates with and without per-thread shards under contention, and event
//! records per second through the ring to a bare consumer thread and to tracer's own
//! event thread (`pack::live`), every record accounted for.
//!
//! `cargo bench -p tracer --bench packs`
//!
//! Each row is the median of several rounds. Thread rows run 4 threads (the machine may
//! have fewer cores: ratios within one run are what to compare).

use probes::pack::abi::{self, Binding, Plan};
use probes::pack::emit::emit as emit_raw;
use probes::pack::ring::RING;
use probes::prelude::*;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;
use tracer::pack::descriptors::{FormatDesc, PackInfo};
use tracer::pack::format::parse_format;
use tracer::pack::live::Live;
use tracer::pack::ring::Consumer;
use tracer::pack::view::OwnedRegion;

const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per call of `f`, median over rounds.
fn ns_per(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for i in 0..iters {
                    f(i)
                }
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .collect(),
    )
}

/// ns per operation when `threads` threads each run `f` `iters` times at once.
fn ns_per_threaded(threads: usize, iters: u64, f: impl Fn(u64) + Send + Sync + 'static) -> f64 {
    let f = Arc::new(f);
    median(
        (0..ROUNDS)
            .map(|_| {
                let barrier = Arc::new(Barrier::new(threads + 1));
                let hs: Vec<_> = (0..threads)
                    .map(|_| {
                        let (f, b) = (f.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            b.wait();
                            for i in 0..iters {
                                f(i)
                            }
                        })
                    })
                    .collect();
                barrier.wait();
                let t = Instant::now();
                hs.into_iter().for_each(|h| h.join().unwrap());
                t.elapsed().as_nanos() as f64 / (iters * threads as u64) as f64
            })
            .collect(),
    )
}

fn bind(maps: &[(&Binding, u32, [u64; 4])], ring: usize) -> (OwnedRegion, Plan) {
    let kinds: Vec<_> = maps.iter().map(|m| (m.1, m.2)).collect();
    let plan = abi::plan(&kinds, ring).unwrap();
    let region = OwnedRegion::new(plan.total);
    // SAFETY: zeroed, aligned, plan.total bytes, kept alive (leaked) for the whole bench.
    unsafe {
        abi::init_region(region.as_ptr(), &plan, &kinds);
        for (m, off) in maps.iter().zip(&plan.maps) {
            m.0.bind(region.as_ptr().add(*off));
        }
        RING.attach(region.as_ptr().add(plan.ring_offset), plan.ring_bytes);
    }
    (region, plan)
}

static C: Counter = Counter::new();
static H: Histogram = Histogram::log2();
static M: HashMap<u64, u64, 4096> = HashMap::new();
static SHARED: AtomicU64 = AtomicU64::new(0);

/// Read rows, first as before the pid cache (no fork hook: `getpid` on every read), then
/// with it, in one run.
fn reads() {
    assert!(probes::fork::generation().is_none());
    println!("fault-free reads, pid asked at every read (no fork hook, as before the cache):");
    read_rows();
    probes::fork::watch();
    println!("fault-free reads, pid cached (fork hook registered, as in a pack):");
    read_rows();
    scale_rows();
}

fn read_rows() {
    let x = 42u64;
    let at = &x as *const u64 as u64;
    println!(
        "read::<u64> (mapped)          {:7.1} ns",
        ns_per(200_000, |_| {
            black_box(read::<u64>(black_box(at)));
        })
    );
    println!(
        "read::<u64> (unmapped)        {:7.1} ns",
        ns_per(200_000, |_| {
            black_box(read::<u64>(black_box(8)));
        })
    );
    let s = b"/usr/lib/x86_64-linux-gnu/libc.so.6\0";
    let sp = s.as_ptr() as u64;
    println!(
        "read_str (36 bytes)           {:7.1} ns",
        ns_per(200_000, |_| {
            black_box(read_str(black_box(sp), 256));
        })
    );
}

fn scale_rows() {
    let x = 42u64;
    let at = &x as *const u64 as u64;
    println!(
        "getpid syscall, for scale     {:7.1} ns",
        ns_per(200_000, |_| {
            black_box(unsafe { libc::syscall(libc::SYS_getpid) });
        })
    );
    println!(
        "plain load, for scale         {:7.1} ns",
        ns_per(200_000, |_| {
            black_box(unsafe { *(black_box(at) as *const u64) });
        })
    );
}

fn maps() {
    println!("one thread:");
    println!(
        "  one shared atomic add       {:7.2} ns",
        ns_per(5_000_000, |_| {
            SHARED.fetch_add(1, Ordering::Relaxed);
        })
    );
    println!(
        "  Counter::inc                {:7.2} ns",
        ns_per(5_000_000, |_| C.inc())
    );
    println!(
        "  Histogram::record (log2)    {:7.2} ns",
        ns_per(5_000_000, |i| H.record(i))
    );
    println!(
        "  HashMap::add (64 keys)      {:7.2} ns",
        ns_per(5_000_000, |i| M.add(i & 63, 1))
    );
    println!("contention, 4 threads on one map (ns per update, wall time / total updates):");
    let shared = ns_per_threaded(4, 2_000_000, |_| {
        SHARED.fetch_add(1, Ordering::Relaxed);
    });
    let sharded = ns_per_threaded(4, 2_000_000, |_| C.inc());
    println!("  one shared atomic           {shared:7.2} ns");
    println!(
        "  Counter ({} shards)          {sharded:7.2} ns   ratio shared/sharded {:.2}",
        abi::SHARDS,
        shared / sharded
    );
    println!(
        "  Histogram::record           {:7.2} ns",
        ns_per_threaded(4, 2_000_000, |i| H.record(i))
    );
    println!(
        "  HashMap::add (64 keys)      {:7.2} ns",
        ns_per_threaded(4, 2_000_000, |i| M.add(i & 63, 1))
    );
}

/// Records per second from `producers` threads emitting 16-byte records (two u64) to a
/// consumer thread; checks received + dropped = emitted.
fn ring_rate(
    plan: &Plan,
    region: &'static OwnedRegion,
    producers: usize,
    per: u64,
) -> (f64, f64, u64, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
    let dropped_before = c.dropped(region.view());
    let consumer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut received = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let d = c.drain(region.view(), |p| {
                    black_box(p);
                });
                received += d.records;
                if finished && !d.pending && d.records == 0 {
                    return (received, c.dropped(region.view()));
                }
            }
        })
    };
    let t = Instant::now();
    let hs: Vec<_> = (0..producers)
        .map(|_| {
            std::thread::spawn(move || {
                for i in 0..per {
                    emit!("{} {}", i, i ^ 5);
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    let secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Release);
    let (received, dropped) = consumer.join().unwrap();
    let emitted = producers as u64 * per;
    assert_eq!(
        received + dropped - dropped_before,
        emitted,
        "a record is unaccounted for"
    );
    (
        emitted as f64 / secs / 1e6,
        received as f64 / secs / 1e6,
        received,
        dropped - dropped_before,
    )
}

/// Each side alone: fill the empty ring from one thread, then drain it from one thread.
fn ring_sides(plan: &Plan, region: &'static OwnedRegion) {
    let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
    c.drain(region.view(), |_| {});
    let fits = (plan.ring_bytes / 40) as u64;
    let (mut fill, mut drain) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let ok = (0..fits).filter(|&i| emit!("{} {}", i, i ^ 5)).count() as u64;
        fill.push(ok as f64 / t.elapsed().as_secs_f64() / 1e6);
        let t = Instant::now();
        let d = c.drain(region.view(), |p| {
            black_box(p);
        });
        drain.push(d.records as f64 / t.elapsed().as_secs_f64() / 1e6);
        assert_eq!(d.records, ok);
    }
    println!(
        "  producer alone (ring never full): {:6.1} M records/s",
        median(fill)
    );
    println!(
        "  consumer alone (draining a full ring): {:6.1} M records/s",
        median(drain)
    );
}

fn ring(plan: &Plan, region: &'static OwnedRegion) {
    println!("events: 16-byte records (emit!(\"{{}} {{}}\", a, b), 40 bytes in the ring), consumer thread draining:");
    for producers in [1, 4] {
        let per = 4_000_000 / producers as u64;
        let runs: Vec<_> = (0..5)
            .map(|_| ring_rate(plan, region, producers, per))
            .collect();
        let rate = median(runs.iter().map(|r| r.0).collect());
        let delivered = median(runs.iter().map(|r| r.1).collect());
        let (recv, drop) = runs.iter().fold((0, 0), |a, r| (a.0 + r.2, a.1 + r.3));
        println!(
            "  {producers} producer(s): {rate:6.1} M records/s emitted, {delivered:6.1} M/s received; over 5 runs {recv} received + {drop} dropped = emitted ({:.1}% dropped)",
            100.0 * drop as f64 / (recv + drop) as f64
        );
    }
}

/// Records per second from `producers` threads emitting 16-byte records to tracer's own
/// event thread (`pack::live`: the drain loop a session runs, formatting every record as
/// text, written to a sink), on a ring of the size sessions use; checks received +
/// dropped = emitted from the session's own summary. With `offered` (records per second,
/// all threads together) each producer paces itself to its share, as a program emitting
/// steadily would.
fn live_rate(producers: usize, per: u64, offered: Option<f64>) -> (f64, u64, u64) {
    let region = agent::pack_region::create(&[], abi::RING_BYTES).expect("region");
    // SAFETY: the ring's storage is this region, never unmapped (leaked below); no
    // producer runs while it is rebound.
    unsafe { region.bind_ring(&RING) };
    let fd = region.fd;
    std::mem::forget(region);
    let text = "{} {}";
    let format = FormatDesc {
        id: 7,
        file: "bench.rs".into(),
        line: 1,
        nargs: 2,
        text: text.into(),
        pieces: parse_format(text).unwrap(),
    };
    let info = PackInfo {
        path: "bench".into(),
        probes: Vec::new(),
        maps: Vec::new(),
        formats: [(7, format)].into_iter().collect(),
        has_ring: true,
    };
    let live = Live::start(
        std::process::id() as i32,
        fd,
        "pack-bench",
        info,
        false,
        Box::new(std::io::sink()),
    )
    .expect("live");
    let t = Instant::now();
    let hs: Vec<_> = (0..producers)
        .map(|_| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let share = offered.map(|r| r / producers as f64);
                for i in 0..per {
                    emit_raw(7, &[&i, &(i ^ 5)]);
                    if let Some(r) = share.filter(|_| i % 64 == 63) {
                        while start.elapsed().as_secs_f64() < (i + 1) as f64 / r {
                            std::hint::spin_loop();
                        }
                    }
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    let secs = t.elapsed().as_secs_f64();
    let summary = live.finish();
    assert!(!summary.contains("warning"), "{summary}");
    let line = summary
        .lines()
        .find(|l| l.starts_with("events: "))
        .expect("events line");
    let mut words = line.split_whitespace();
    let received: u64 = words.nth(1).unwrap().parse().unwrap();
    let dropped: u64 = words.nth(1).unwrap().parse().unwrap();
    assert_eq!(
        received + dropped,
        producers as u64 * per,
        "a record is unaccounted for: {line}"
    );
    (received as f64 / secs / 1e6, received, dropped)
}

fn live(producers_list: &[usize]) {
    println!(
        "events through tracer's event thread (pack::live, {} KiB ring, text formatting):",
        abi::RING_BYTES / 1024
    );
    for &producers in producers_list {
        let per = 4_000_000 / producers as u64;
        let runs: Vec<_> = (0..5).map(|_| live_rate(producers, per, None)).collect();
        let delivered = median(runs.iter().map(|r| r.0).collect());
        let (recv, drop) = runs.iter().fold((0, 0), |a, r| (a.0 + r.1, a.1 + r.2));
        println!(
            "  {producers} producer(s): {delivered:6.1} M/s received; over 5 runs {recv} received + {drop} dropped = emitted ({:.1}% dropped)",
            100.0 * drop as f64 / (recv + drop) as f64
        );
    }
    println!("  paced producers (offered rate, all threads together), 1 M records per run:");
    for &producers in producers_list {
        for offered in [0.5e6, 1e6, 2e6] {
            let per = 1_000_000 / producers as u64;
            let runs: Vec<_> = (0..3)
                .map(|_| live_rate(producers, per, Some(offered)))
                .collect();
            let (recv, drop) = runs.iter().fold((0, 0), |a, r| (a.0 + r.1, a.1 + r.2));
            println!(
                "  {producers} producer(s) at {:.1} M/s: over 3 runs {recv} received + {drop} dropped = emitted ({:.1}% dropped)",
                offered / 1e6,
                100.0 * drop as f64 / (recv + drop) as f64
            );
        }
    }
}

fn main() {
    let (region, plan) = bind(
        &[
            (C.binding(), C.map_kind(), C.map_params()),
            (H.binding(), H.map_kind(), H.map_params()),
            (M.binding(), M.map_kind(), M.map_params()),
        ],
        1 << 22,
    );
    let region: &'static OwnedRegion = Box::leak(Box::new(region));
    reads();
    maps();
    ring(&plan, region);
    ring_sides(&plan, region);
    live(&[1, 4]);
}
