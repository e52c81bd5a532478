//! Counters sharded per CPU (see `agent::shared`): exact totals with many threads, on
//! every counting path, after the threads exited; and each hit counted in the shard of
//! the CPU it ran on, which is what keeps threads on different CPUs off one line.

use agent::interceptor::{Interceptor, ProbeRequest};
use agent::shared::sharding;
use probes::abi::shared::Counts;
use probes::{EntryContext, ExitContext};
use std::arch::global_asm;
use std::sync::Mutex;

macro_rules! leaf {
    ($name:literal) => {
        concat!(
            ".p2align 4\n",
            ".globl ",
            $name,
            "\n",
            $name,
            ":\n",
            "lea rax, [rdi+1]\n",
            "nop dword ptr [rax]\n",
            "ret\n",
        )
    };
}

global_asm!(
    ".text",
    leaf!("sh_entry"),
    leaf!("sh_exit"),
    leaf!("sh_entry_handler"),
    leaf!("sh_exit_handler"),
    leaf!("sh_pin_entry"),
    leaf!("sh_pin_exit"),
    leaf!("sh_pin_handlers"),
);

extern "C" {
    fn sh_entry(x: u64) -> u64;
    fn sh_exit(x: u64) -> u64;
    fn sh_entry_handler(x: u64) -> u64;
    fn sh_exit_handler(x: u64) -> u64;
    fn sh_pin_entry(x: u64) -> u64;
    fn sh_pin_exit(x: u64) -> u64;
    fn sh_pin_handlers(x: u64) -> u64;
}

type Leaf = unsafe extern "C" fn(u64) -> u64;

fn addr(f: Leaf) -> u64 {
    f as *const () as u64
}

static INTERCEPTOR: Mutex<Option<Interceptor>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Interceptor) -> R) -> R {
    let mut g = INTERCEPTOR.lock().unwrap();
    f(g.get_or_insert_with(|| Interceptor::new(16).expect("interceptor")))
}

fn install(req: ProbeRequest) -> u32 {
    with(|i| {
        let p = i.prepare(&req).expect("prepare");
        i.commit_in_process(&p).expect("commit");
        p.id
    })
}

fn counts<R>(id: u32, f: impl FnOnce(Counts<'_>) -> R) -> R {
    with(|i| f(i.counters(id)))
}

fn nothing(_: &mut EntryContext) {}
fn nothing_at_exit(_: &mut ExitContext) {}

/// `calls` calls of `f`, checking what it computes.
fn call(f: Leaf, calls: u64) {
    let mut x = 0;
    for _ in 0..calls {
        // SAFETY: every leaf has this signature and no preconditions.
        x = unsafe { f(x) };
    }
    assert_eq!(x, calls);
}

/// Hits and exits of every counting path, 8 threads at once: the totals are the calls
/// the threads made, read after they all exited.
#[test]
fn eight_threads_count_exactly_on_every_path() {
    const THREADS: u64 = 8;
    const CALLS: u64 = 100_000;
    let probes = [
        (
            sh_entry as Leaf,
            install(ProbeRequest::entry(addr(sh_entry), Some(8))),
            false,
        ),
        (
            sh_exit as Leaf,
            install(ProbeRequest::entry(addr(sh_exit), Some(8)).with_exit()),
            true,
        ),
        (
            sh_entry_handler as Leaf,
            install(ProbeRequest::entry(addr(sh_entry_handler), Some(8)).on_entry(nothing)),
            false,
        ),
        (
            sh_exit_handler as Leaf,
            install(ProbeRequest::entry(addr(sh_exit_handler), Some(8)).on_exit(nothing_at_exit)),
            true,
        ),
    ];
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                for (f, _, _) in probes {
                    call(f, CALLS);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (_, id, exits) in probes {
        counts(id, |c| {
            assert_eq!(c.hits(), THREADS * CALLS, "probe {id}: hits");
            assert_eq!(
                c.exits(),
                if exits { THREADS * CALLS } else { 0 },
                "probe {id}: exits"
            );
            assert_eq!((c.skipped(), c.lost_exits()), (0, 0), "probe {id}");
            if sharding().is_some() {
                // Every hit went to a shard, none to the shared first line.
                assert_eq!(c.line.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
                assert_eq!(c.line.exits.load(std::sync::atomic::Ordering::Relaxed), 0);
            }
        });
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
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
        .collect()
}

fn pin_to(cpu: usize) {
    // SAFETY: as in `allowed_cpus`; the set names one CPU the process may use.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// Per shard (hits, exits).
fn per_shard(id: u32) -> Vec<(u64, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    counts(id, |c| {
        c.shards
            .iter()
            .map(|s| (s.hits.load(Relaxed), s.exits.load(Relaxed)))
            .collect()
    })
}

/// A thread pinned to each CPU in turn counts in that CPU's shard, on the inline paths
/// (entry, entry+exit) and on the handler paths: the CPU number read from the rseq area
/// is the one the thread runs on.
#[test]
fn a_thread_pinned_to_a_cpu_counts_in_that_cpus_shard() {
    let Some(s) = sharding() else {
        eprintln!("glibc registered no rseq area here: counters are not sharded");
        return;
    };
    const CALLS: u64 = 1000;
    let ids = [
        (
            sh_pin_entry as Leaf,
            install(ProbeRequest::entry(addr(sh_pin_entry), Some(8))),
            0,
        ),
        (
            sh_pin_exit as Leaf,
            install(ProbeRequest::entry(addr(sh_pin_exit), Some(8)).with_exit()),
            CALLS,
        ),
        (
            sh_pin_handlers as Leaf,
            install(
                ProbeRequest::entry(addr(sh_pin_handlers), Some(8))
                    .on_entry(nothing)
                    .on_exit(nothing_at_exit),
            ),
            CALLS,
        ),
    ];
    for cpu in allowed_cpus() {
        for &(f, id, exits) in &ids {
            let before = per_shard(id);
            std::thread::spawn(move || {
                pin_to(cpu);
                call(f, CALLS);
            })
            .join()
            .unwrap();
            let after = per_shard(id);
            let shard = cpu & s.mask() as usize;
            for (k, (b, a)) in before.iter().zip(&after).enumerate() {
                let want = if k == shard {
                    (b.0 + CALLS, b.1 + exits)
                } else {
                    *b
                };
                assert_eq!(*a, want, "probe {id}, thread on CPU {cpu}: shard {k}");
            }
        }
    }
}
