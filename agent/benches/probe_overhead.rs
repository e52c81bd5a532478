//! Per-hit cost of probes: a 12-byte leaf called through a function pointer in a loop,
//! unprobed and under each kind of probe, in one run.
//!
//! `cargo bench -p agent --bench probe_overhead`
//!
//! Each configuration probes its own copy of the leaf (identical bytes, each aligned to
//! 64 bytes so placement does not differ). Rounds interleave the configurations; the
//! result is the median over rounds of ns/call, and the overhead is the probed median
//! minus the unprobed one.
//!
//! The "4 threads" rows run 4 threads at once, each calling its configuration's copy in
//! the same loop, and time each thread by its own CPU time (`CLOCK_THREAD_CPUTIME_ID`):
//! ns of CPU per call, comparable with the single-thread rows whatever the number of
//! cores, and blind to the time a thread waits for a core. Each such row is followed by
//! its overhead's ratio to the single-thread row of the same probe.

use agent::interceptor::{Interceptor, PackHandlers, ProbeRequest};
use probes::{EntryContext, ExitContext};
use std::arch::global_asm;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

macro_rules! leaf {
    ($name:literal) => {
        concat!(
            ".p2align 6\n",
            ".globl ",
            $name,
            "\n",
            $name,
            ":\n",
            "lea rax, [rsi+rsi]\n",
            "xor rax, rdi\n",
            "add rax, 7\n",
            "ret\n",
        )
    };
}

global_asm!(
    ".text",
    leaf!("po_plain"),
    leaf!("po_entry"),
    leaf!("po_entry_handler"),
    leaf!("po_exit"),
    leaf!("po_exit_handlers"),
    leaf!("po_pack_entry"),
    leaf!("po_pack_exit"),
    leaf!("po_pack_exit_time"),
    leaf!("po_plain_mt"),
    leaf!("po_entry_mt"),
    leaf!("po_exit_mt"),
    leaf!("po_latency"),
    leaf!("po_latency_mt"),
);

extern "C" {
    fn po_plain(a: u64, b: u64) -> u64;
    fn po_entry(a: u64, b: u64) -> u64;
    fn po_entry_handler(a: u64, b: u64) -> u64;
    fn po_exit(a: u64, b: u64) -> u64;
    fn po_exit_handlers(a: u64, b: u64) -> u64;
    fn po_pack_entry(a: u64, b: u64) -> u64;
    fn po_pack_exit(a: u64, b: u64) -> u64;
    fn po_pack_exit_time(a: u64, b: u64) -> u64;
    fn po_plain_mt(a: u64, b: u64) -> u64;
    fn po_entry_mt(a: u64, b: u64) -> u64;
    fn po_exit_mt(a: u64, b: u64) -> u64;
    fn po_latency(a: u64, b: u64) -> u64;
    fn po_latency_mt(a: u64, b: u64) -> u64;
}

type Leaf = unsafe extern "C" fn(u64, u64) -> u64;

static ENTRY_COUNT: AtomicU64 = AtomicU64::new(0);
static EXIT_COUNT: AtomicU64 = AtomicU64::new(0);

fn count_entry(_: &mut EntryContext) {
    // A plain load and store: the bench is single-threaded, and an RMW would measure
    // the handler rather than the probe.
    ENTRY_COUNT.store(ENTRY_COUNT.load(Relaxed) + 1, Relaxed);
}

fn count_exit(_: &mut ExitContext) {
    EXIT_COUNT.store(EXIT_COUNT.load(Relaxed) + 1, Relaxed);
}

/// Build `benches/bench_pack` (a cdylib apart from the agent, as a user's pack is), load
/// it, bind its maps to a fresh region as the agent does in a target, and return the
/// addresses of its entry shim and its exit shims (without, with `elapsed_ns`).
fn load_bench_pack() -> (u64, u64, u64) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/bench_pack");
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench_pack");
    let path = tests::build_pack_into(&dir, &target, "bench_pack", &[]);
    let so = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a pack built from this tree; its constructors are Rust std's.
    let lib = unsafe { libc::dlopen(so.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null());
    let counter = (probes::pack::abi::map_kind::COUNTER, [0u64; 4]);
    let region = agent::pack_region::create(&[counter, counter], 1 << 16).expect("region");
    // SAFETY: the pack declares these two maps in this order; the region is leaked below.
    unsafe {
        agent::pack_region::bind_pack(
            &region,
            lib,
            &[c"__tracer_map_ENTRIES", c"__tracer_map_EXITS"],
        )
    }
    .expect("bind");
    std::mem::forget(region);
    let sym = |n: &std::ffi::CStr| {
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(lib, n.as_ptr()) } as u64;
        assert_ne!(p, 0, "{n:?}");
        p
    };
    // What the tracer passes on from the descriptors when it loads a pack: what each
    // handler does not use of its context.
    for (shim, flags) in tests::pack_probe_flags(&path) {
        let shim = std::ffi::CString::new(shim).unwrap();
        agent::pack_loader::set_shim_flags(sym(&shim), flags);
    }
    (
        sym(c"__tracer_probe_on_entry"),
        sym(c"__tracer_probe_on_exit"),
        sym(c"__tracer_probe_on_exit_timed"),
    )
}

const CALLS: u64 = 2_000_000;
const ROUNDS: usize = 15;

#[inline(never)]
fn run(f: Leaf) -> (f64, u64) {
    let f = black_box(f);
    let mut acc = 0u64;
    let t = thread_cpu_ns();
    for i in 0..CALLS {
        // SAFETY: every leaf has this signature and no preconditions.
        acc = acc.wrapping_add(unsafe { f(i, acc & 0xff) });
    }
    ((thread_cpu_ns() - t) as f64 / CALLS as f64, acc)
}

const THREADS: usize = 4;

fn thread_cpu_ns() -> u128 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) },
        0
    );
    t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
}

/// What [`run_threads`] measured.
struct Threaded {
    /// CPU ns per call over all threads.
    ns: f64,
    /// How much of the time the threads ran at once: their CPU time over the wall time
    /// times the cores they could use. Contention between cores needs them to.
    overlap: f64,
    /// Every thread's result.
    accs: Vec<u64>,
}

/// [`THREADS`] threads, started together, each making `CALLS` calls of `f`.
fn run_threads(f: Leaf) -> Threaded {
    let start = std::sync::Barrier::new(THREADS + 1);
    let (per_thread, wall): (Vec<(u128, u64)>, u128) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let t0 = thread_cpu_ns();
                    let (_, acc) = run(f);
                    (thread_cpu_ns() - t0, acc)
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        let r = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (r, t.elapsed().as_nanos())
    });
    let cpu: u128 = per_thread.iter().map(|(ns, _)| ns).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(THREADS));
    Threaded {
        ns: cpu as f64 / (CALLS as f64 * THREADS as f64),
        overlap: cpu as f64 / (wall as f64 * cores as f64),
        accs: per_thread.into_iter().map(|(_, acc)| acc).collect(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut interceptor = Interceptor::new(16).expect("interceptor");
    let probe = |i: &mut Interceptor, f: Leaf, req: fn(ProbeRequest) -> ProbeRequest| {
        let p = i
            .prepare(&req(ProbeRequest::entry(f as usize as u64, Some(12))))
            .expect("prepare");
        i.commit_in_process(&p).expect("commit");
        (p.id, p.encoding)
    };
    let (pack_entry, pack_exit, pack_exit_timed) = load_bench_pack();
    let pack = |f: Leaf, entry: u64, exit: u64| {
        let mut r = ProbeRequest::entry(f as usize as u64, Some(12));
        if exit != 0 {
            r = r.with_exit();
        }
        r.pack = Some(PackHandlers {
            entry,
            exit,
            exit_timed: agent::pack_loader::shim_needs_time(exit),
            name: "main:po_pack",
        });
        r
    };
    let pack_probe = |i: &mut Interceptor, r: ProbeRequest| {
        let p = i.prepare(&r).expect("prepare");
        i.commit_in_process(&p).expect("commit");
        (p.id, p.encoding)
    };
    // `--hist`/`--summary`: the agent's latency shim in the exit slot, recording into the
    // region the tracer would map.
    assert!(!agent::builtin::latency::tracer_agent_latency(16).is_null());
    let latency_shim = agent::builtin::latency::tracer_agent_latency_exit as *const () as u64;
    let configs: Vec<(&str, Leaf, Option<(u32, _)>)> = vec![
        ("unprobed", po_plain as Leaf, None),
        (
            "entry, no handler",
            po_entry,
            Some(probe(&mut interceptor, po_entry, |r| r)),
        ),
        (
            "entry, counting handler",
            po_entry_handler,
            Some(probe(&mut interceptor, po_entry_handler, |r| {
                r.on_entry(count_entry)
            })),
        ),
        (
            "entry+exit, no handler",
            po_exit,
            Some(probe(&mut interceptor, po_exit, |r| r.with_exit())),
        ),
        (
            "entry+exit, both handlers",
            po_exit_handlers,
            Some(probe(&mut interceptor, po_exit_handlers, |r| {
                r.on_entry(count_entry).on_exit(count_exit)
            })),
        ),
        (
            "entry, pack handler",
            po_pack_entry,
            Some(pack_probe(
                &mut interceptor,
                pack(po_pack_entry, pack_entry, 0),
            )),
        ),
        (
            "entry+exit, pack handlers",
            po_pack_exit,
            Some(pack_probe(
                &mut interceptor,
                pack(po_pack_exit, pack_entry, pack_exit),
            )),
        ),
        (
            "entry+exit, --hist timing",
            po_latency,
            Some(pack_probe(
                &mut interceptor,
                pack(po_latency, 0, latency_shim),
            )),
        ),
        (
            "entry+exit, pack, elapsed",
            po_pack_exit_time,
            Some(pack_probe(
                &mut interceptor,
                pack(po_pack_exit_time, pack_entry, pack_exit_timed),
            )),
        ),
    ];
    // Configurations run by THREADS threads at once, with the single-thread row of the
    // same probe (for the ratio).
    let mt: Vec<(&str, Leaf, Option<(u32, _)>, usize)> = vec![
        ("unprobed, 4 threads", po_plain_mt as Leaf, None, 0),
        (
            "entry, no handler, 4 thr.",
            po_entry_mt,
            Some(probe(&mut interceptor, po_entry_mt, |r| r)),
            1,
        ),
        (
            "entry+exit, no h., 4 thr.",
            po_exit_mt,
            Some(probe(&mut interceptor, po_exit_mt, |r| r.with_exit())),
            3,
        ),
        (
            "--hist timing, 4 thr.",
            po_latency_mt,
            Some(pack_probe(
                &mut interceptor,
                pack(po_latency_mt, 0, latency_shim),
            )),
            7,
        ),
    ];
    // What the analysis of the pack's entry handler found, for the record.
    let stub = interceptor
        .pack_stub(pack_entry, agent::trampoline::PACK_ENTRY_DIRECT)
        .expect("stub")
        .clone();
    println!(
        "pack entry handler: writes {} ({} instructions analysed); its direct slot holds {}",
        stub.analysis.clobbers,
        stub.analysis.instructions,
        if stub.addr == pack_entry {
            "the shim itself"
        } else {
            "a stub"
        }
    );
    // The probed copies must compute what the plain one does.
    let (_, want) = run(po_plain);
    let mut times = vec![Vec::new(); configs.len()];
    let mut mt_times = vec![Vec::new(); mt.len()];
    let mut overlap = Vec::new();
    for _ in 0..ROUNDS {
        for (k, (_, f, _)) in configs.iter().enumerate() {
            let (ns, acc) = run(*f);
            assert_eq!(acc, want, "{} computed a different result", configs[k].0);
            times[k].push(ns);
        }
        for (k, (name, f, _, _)) in mt.iter().enumerate() {
            let r = run_threads(*f);
            assert!(
                r.accs.iter().all(|&a| a == want),
                "{name} computed a different result"
            );
            mt_times[k].push(r.ns);
            overlap.push(r.overlap);
        }
    }
    let base = median(times[0].clone());
    println!(
        "{CALLS} calls per round (per thread), {ROUNDS} rounds, median CPU ns/call \
         (overhead = probed - unprobed)"
    );
    println!(
        "| {:<27} | {:>8} | {:>8} | {:>10} |",
        "configuration", "ns/call", "overhead", "encoding"
    );
    println!("|{:-<29}|{:->10}|{:->10}|{:->12}|", "", "", "", "");
    let mut bad_counts = Vec::new();
    for (k, (name, _, p)) in configs.iter().enumerate() {
        let m = median(times[k].clone());
        let enc = p.map(|(_, e)| e.name()).unwrap_or("-");
        println!("| {name:<27} | {m:>8.2} | {:>8.2} | {enc:>10} |", m - base);
        if let Some((id, _)) = p {
            let c = interceptor.counters(*id);
            bad_counts.push((*name, c.hits(), CALLS * ROUNDS as u64));
        }
    }
    let mt_base = median(mt_times[0].clone());
    for (k, (name, _, p, single)) in mt.iter().enumerate() {
        let m = median(mt_times[k].clone());
        let enc = p.map(|(_, e)| e.name()).unwrap_or("-");
        println!(
            "| {name:<27} | {m:>8.2} | {:>8.2} | {enc:>10} |",
            m - mt_base
        );
        if let Some((id, _)) = p {
            let single_overhead = median(times[*single].clone()) - base;
            println!(
                "|   ratio to 1 thread         |          | {:>7.2}x |            |",
                (m - mt_base) / single_overhead
            );
            let c = interceptor.counters(*id);
            bad_counts.push((*name, c.hits(), CALLS * (ROUNDS * THREADS) as u64));
        }
    }
    println!(
        "{THREADS} threads ran at once {:.0}% of the time (median; contention needs them to)",
        100.0 * median(overlap)
    );
    // Every timed return recorded, none lost under threads.
    for (name, want) in [
        ("entry+exit, --hist timing", CALLS * ROUNDS as u64),
        ("--hist timing, 4 thr.", CALLS * (ROUNDS * THREADS) as u64),
    ] {
        let id = configs
            .iter()
            .map(|(n, _, p)| (*n, *p))
            .chain(mt.iter().map(|(n, _, p, _)| (*n, *p)))
            .find(|(n, _)| *n == name)
            .and_then(|(_, p)| p)
            .expect("latency row")
            .0;
        let (mut calls, mut in_buckets) = (0, 0);
        for shard in 0..probes::latency::MAX_SHARDS {
            let slot = agent::builtin::latency::slot(id, shard).expect("latency slot");
            if shard > 0 && std::ptr::eq(slot, agent::builtin::latency::slot(id, 0).unwrap()) {
                break; // fewer shards: the index wrapped around
            }
            calls += slot.count.load(Relaxed);
            in_buckets += slot.buckets.iter().map(|b| b.load(Relaxed)).sum::<u64>();
        }
        assert_eq!((calls, in_buckets), (want, want), "{name}: timed returns");
    }
    for (name, got, want) in bad_counts {
        assert_eq!(got, want, "{name}: hits");
    }
    assert_eq!(ENTRY_COUNT.load(Relaxed), 2 * CALLS * ROUNDS as u64);
    assert_eq!(EXIT_COUNT.load(Relaxed), CALLS * ROUNDS as u64);
}
