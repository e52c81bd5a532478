//! Pack counters and histograms add to their CPU's shard without `lock`, inside a
//! restartable sequence (`probes::percpu`): the totals stay exact with 8 threads on this
//! machine's CPUs while every thread takes a timer signal every 50 us, so critical
//! sections really are interrupted and restarted (counted); and with glibc's rseq
//! registration turned off (`GLIBC_TUNABLES=glibc.pthread.rseq=0`), where every add takes
//! the `lock` path to the shared shard.

use probes::pack::abi::{init_region, map_kind, plan, Plan, LOG2_BUCKETS, MAP_HEADER, SHARDS};
use probes::pack::maps::{Counter, Histogram, CPU_SHARDS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static HITS: Counter = Counter::new();
static SIZES: Histogram = Histogram::log2();

const THREADS: usize = 8;
const CALLS: u64 = 200_000;
/// Rounds at most before giving up on seeing a restarted section.
const MAX_ROUNDS: usize = 200;

static SIGNALS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Relaxed);
}

/// The region the agent would make for the two maps, the handles bound to it.
fn bind() -> (*mut u8, Plan) {
    let maps = [
        (map_kind::COUNTER, [0u64; 4]),
        (map_kind::HIST_LOG2, [0u64; 4]),
    ];
    let plan = plan(&maps, 4096).expect("plan");
    // SAFETY: a fresh anonymous mapping, zeroed and page-aligned, never unmapped.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            plan.total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as *mut u8;
    // SAFETY: `plan.total` zeroed bytes laid out by `plan`; the storage lives forever.
    unsafe {
        init_region(base, &plan, &maps);
        HITS.binding().bind(base.add(plan.maps[0]));
        SIZES.binding().bind(base.add(plan.maps[1]));
    }
    (base, plan)
}

fn word(base: *mut u8, at: usize) -> u64 {
    // SAFETY: inside the region, 8-aligned.
    unsafe { (*(base.add(at) as *const AtomicU64)).load(Relaxed) }
}

/// The counter's shards.
fn counter_shards(base: *mut u8, plan: &Plan) -> Vec<u64> {
    (0..SHARDS)
        .map(|s| word(base, plan.maps[0] + MAP_HEADER + 64 * s))
        .collect()
}

/// The histogram's buckets, summed over shards, and its shared shard's total.
fn histogram(base: *mut u8, plan: &Plan) -> (Vec<u64>, u64) {
    let shard = (LOG2_BUCKETS * 8 + 63) & !63;
    let at = |s: usize, b: usize| plan.maps[1] + MAP_HEADER + s * shard + 8 * b;
    let buckets = (0..LOG2_BUCKETS)
        .map(|b| (0..SHARDS).map(|s| word(base, at(s, b))).sum())
        .collect();
    let shared = (0..LOG2_BUCKETS)
        .map(|b| word(base, at(CPU_SHARDS as usize, b)))
        .sum();
    (buckets, shared)
}

/// A timer sending SIGUSR1 to the calling thread every 50 us.
fn signal_storm() -> libc::timer_t {
    // SAFETY: a zeroed sigevent filled as SIGEV_THREAD_ID wants; timer_create writes the
    // id; the interval is valid.
    unsafe {
        let mut ev: libc::sigevent = std::mem::zeroed();
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = libc::SIGUSR1;
        ev.sigev_notify_thread_id = libc::gettid();
        let mut timer: libc::timer_t = std::mem::zeroed();
        assert_eq!(
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer),
            0
        );
        let every = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000,
        };
        let spec = libc::itimerspec {
            it_interval: every,
            it_value: every,
        };
        assert_eq!(
            libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()),
            0
        );
        timer
    }
}

fn install_handler() {
    // SAFETY: a handler that only bumps an atomic; SA_RESTART keeps the test's own
    // calls going.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// One round: 8 threads, each with its own signal storm, counting `CALLS` times each.
fn round(round: u64) {
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let timer = signal_storm();
                for i in 0..CALLS {
                    HITS.inc();
                    SIZES.record(i ^ round);
                }
                // SAFETY: the timer made above.
                unsafe { libc::timer_delete(timer) };
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The calling thread's rseq `rseq_cs` field: 0 outside a critical section.
fn rseq_cs() -> Option<u64> {
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: glibc's exported variables, set before main.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return None;
    }
    let v: u64;
    // SAFETY: the calling thread's rseq area, inside its TCB.
    unsafe {
        std::arch::asm!("mov {v}, qword ptr fs:[{o} + 8]", o = in(reg) off, v = out(reg) v,
            options(nostack, readonly, preserves_flags));
    }
    Some(v)
}

fn max_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        set
    };
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: the index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .max()
        .unwrap()
}

/// Runs rounds until a section was restarted (at most MAX_ROUNDS); returns the rounds.
fn run(stop_on_abort: bool) -> u64 {
    install_handler();
    let mut rounds = 0;
    while rounds < MAX_ROUNDS as u64 {
        round(rounds);
        rounds += 1;
        if !stop_on_abort || probes::percpu::aborts() > 0 {
            break;
        }
    }
    rounds
}

fn check_totals(base: *mut u8, plan: &Plan, rounds: u64) {
    let want = rounds * THREADS as u64 * CALLS;
    let shards = counter_shards(base, plan);
    assert_eq!(
        shards.iter().sum::<u64>(),
        want,
        "counter shards {shards:?}"
    );
    let (buckets, _) = histogram(base, plan);
    assert_eq!(buckets.iter().sum::<u64>(), want, "histogram total");
    // Every value recorded lands in its bucket: the same per-bucket totals as counted
    // here in the test.
    let mut expect = vec![0u64; LOG2_BUCKETS];
    for r in 0..rounds {
        for i in 0..CALLS {
            expect[(64 - (i ^ r).leading_zeros()) as usize] += THREADS as u64;
        }
    }
    assert_eq!(buckets, expect, "histogram buckets");
}

#[test]
fn exact_under_a_signal_storm_with_sections_restarted() {
    if std::env::var_os("PERCPU_NO_RSEQ_CHILD").is_some() {
        return without_rseq_child();
    }
    let Some(cs) = rseq_cs() else {
        eprintln!("glibc registered no rseq area here: only the lock path can be tested");
        return;
    };
    assert_eq!(cs, 0);
    let (base, plan) = bind();
    let rounds = run(true);
    check_totals(base, &plan, rounds);
    let aborts = probes::percpu::aborts();
    eprintln!(
        "{rounds} round(s), {} signals, {aborts} critical sections restarted",
        SIGNALS.load(Relaxed)
    );
    assert!(
        aborts > 0,
        "no critical section was restarted in {rounds} rounds"
    );
    // With a shard for every CPU, nothing took the shared, locked shard: the adds ran
    // inside sections.
    if max_cpu() < CPU_SHARDS as usize {
        assert_eq!(counter_shards(base, &plan)[CPU_SHARDS as usize], 0);
        assert_eq!(histogram(base, &plan).1, 0);
    }
    // Every section is disarmed once it committed, in this thread as in the others.
    assert_eq!(rseq_cs(), Some(0));
}

/// The same with glibc's rseq registration off, in a child process (tunables are read
/// at startup): exact, no section restarted, everything in the shared shard.
#[test]
fn exact_with_rseq_registration_off() {
    if std::env::var_os("PERCPU_NO_RSEQ_CHILD").is_some() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "exact_under_a_signal_storm_with_sections_restarted",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
        .env("PERCPU_NO_RSEQ_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stderr}");
    assert!(
        stderr.contains("lock path checked"),
        "the child did not run the check: {stderr}"
    );
}

fn without_rseq_child() {
    assert_eq!(rseq_cs(), None, "GLIBC_TUNABLES did not turn rseq off");
    let (base, plan) = bind();
    let rounds = run(false);
    check_totals(base, &plan, rounds);
    assert_eq!(probes::percpu::aborts(), 0);
    let shards = counter_shards(base, &plan);
    for (s, n) in shards.iter().enumerate() {
        if s != CPU_SHARDS as usize {
            assert_eq!(*n, 0, "shard {s} of {shards:?}");
        }
    }
    eprintln!("lock path checked: {shards:?}");
}
