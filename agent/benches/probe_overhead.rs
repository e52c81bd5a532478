//! Per-hit cost of probes: a 12-byte leaf called through a function pointer in a loop,
//! unprobed and under each kind of probe, in one run.
//!
//! `cargo bench -p agent --bench probe_overhead`
//!
//! Each configuration probes its own copy of the leaf (identical bytes, each aligned to
//! 64 bytes so placement does not differ). Rounds interleave the configurations; the
//! result is the median over rounds of ns/call, and the overhead is the probed median
//! minus the unprobed one.

use agent::interceptor::{Interceptor, ProbeRequest};
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
);

extern "C" {
    fn po_plain(a: u64, b: u64) -> u64;
    fn po_entry(a: u64, b: u64) -> u64;
    fn po_entry_handler(a: u64, b: u64) -> u64;
    fn po_exit(a: u64, b: u64) -> u64;
    fn po_exit_handlers(a: u64, b: u64) -> u64;
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

const CALLS: u64 = 2_000_000;
const ROUNDS: usize = 15;

#[inline(never)]
fn run(f: Leaf) -> (f64, u64) {
    let f = black_box(f);
    let mut acc = 0u64;
    let t = Instant::now();
    for i in 0..CALLS {
        // SAFETY: every leaf has this signature and no preconditions.
        acc = acc.wrapping_add(unsafe { f(i, acc & 0xff) });
    }
    (t.elapsed().as_nanos() as f64 / CALLS as f64, acc)
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
    ];
    // The probed copies must compute what the plain one does.
    let (_, want) = run(po_plain);
    let mut times = vec![Vec::new(); configs.len()];
    for _ in 0..ROUNDS {
        for (k, (_, f, _)) in configs.iter().enumerate() {
            let (ns, acc) = run(*f);
            assert_eq!(acc, want, "{} computed a different result", configs[k].0);
            times[k].push(ns);
        }
    }
    let base = median(times[0].clone());
    println!(
        "{CALLS} calls per round, {ROUNDS} rounds, median ns/call (overhead = probed - unprobed)"
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
    for (name, got, want) in bad_counts {
        assert_eq!(got, want, "{name}: hits");
    }
    assert_eq!(ENTRY_COUNT.load(Relaxed), 2 * CALLS * ROUNDS as u64);
    assert_eq!(EXIT_COUNT.load(Relaxed), CALLS * ROUNDS as u64);
}
