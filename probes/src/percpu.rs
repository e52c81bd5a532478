//! Adds to per-CPU counters without a `lock` prefix, under a restartable sequence.
//!
//! A `lock add` is a full barrier, and consecutive ones wait for each other: a pack
//! `Counter::inc` in a loop took 1.72 ns with `lock` against 1.24 ns here, a log2
//! `Histogram::record` 1.83 against 1.74 (`cargo bench -p tracer --bench packs`, first
//! rows, two runs each, 2026-12-01). A single add per probe hit costs the same either
//! way (`bench/probe_overhead.md`). A plain `add` to a word only the current CPU writes
//! is enough, provided the
//! thread is neither preempted nor moved to another CPU between reading its CPU number
//! and the add. The kernel's restartable sequences (`rseq(2)`) give exactly that: glibc
//! (>= 2.35) registers a `struct rseq` per thread at `fs:[__rseq_offset]`, whose
//! `cpu_id` (+4) the kernel keeps current and whose `rseq_cs` (+8) names the critical
//! section the thread is in. If the thread is preempted, migrated or gets a signal while
//! its instruction pointer is inside that section, the kernel moves it to the section's
//! abort address (which must follow the 4-byte signature glibc registered,
//! [`RSEQ_SIG`]) before it runs again; the abort code starts over.
//!
//! The sequence (librseq's `rseq_addv`, with the CPU number read inside the section):
//!
//! ```text
//! retry: lea t, [rip+cs] ; mov fs:[off+8], t   ; the section is armed
//! start: mov cpu, fs:[off+4]
//!        cmp cpu, cpus ; jae post               ; no shard of its own: not added
//!        add [base + cpu*stride], n             ; the commit, one instruction
//! post:  mov qword fs:[off+8], 0                ; disarmed
//! ...    sig ; abort: jmp retry                 ; out of line
//! ```
//!
//! The store arming the section is the last instruction before `start`, so no
//! interruption can fall between the two. The section is disarmed right after the
//! commit: the kernel reads `rseq_cs` at every preemption while it is set, and a
//! descriptor that went away (a pack unloaded) would get the thread a `SIGSEGV`.
//!
//! Every writer of a per-CPU word must go through such a section: a `lock add` to a word
//! another CPU adds to with a plain `add` can be lost. So a thread with no word of its
//! own (a CPU number at or past `cpus`, or -1 when glibc did not register rseq for it)
//! gets [`Fallback::Shared`] and adds with `lock` to a word no section writes; a process
//! whose glibc has no rseq at all gets [`Fallback::NoRseq`] (no section runs anywhere
//! in it, so any word may take a `lock add`).

/// The signature glibc registers on x86-64, which the kernel checks before an abort
/// address.
pub const RSEQ_SIG: u32 = 0x5305_3053;

/// What [`add`] returns when the process has no `__rseq_offset` (glibc < 2.35): no CPU
/// number reads as this.
const NO_RSEQ: u32 = 0xffff_fff0;

/// Why [`add`] did not add: the caller adds with `lock` instead, where the variant says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The thread's CPU has no word of its own (or rseq is off for the thread): add to a
    /// word that no critical section writes.
    Shared,
    /// The process's glibc has no rseq: no critical section runs in it.
    NoRseq,
}

/// Times a critical section of [`add`] was restarted by the kernel (the thread was
/// preempted, migrated or signalled inside it), in this copy of the crate: diagnostics
/// and tests.
pub fn aborts() -> u64 {
    ABORTS.load(core::sync::atomic::Ordering::Relaxed)
}

static ABORTS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The critical section, `$scale` turning the CPU number in `{t}` into a byte offset;
/// leaves the CPU number (or [`NO_RSEQ`]) in `$cpu`.
macro_rules! section {
    ($cpu:ident, $base:expr, $n:expr, $scale:literal, $($operand:tt)*) => {
        core::arch::asm!(
            ".weak __rseq_offset",
            "mov {off}, qword ptr [rip + __rseq_offset@GOTPCREL]",
            "test {off}, {off}",
            "jz 8f",
            "mov {off}, qword ptr [{off}]",
            // The descriptor: version, flags, start, length, abort.
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4f, 5f - 4f, 6f",
            ".popsection",
            "2:",
            "lea {t}, [rip + 3b]",
            "mov qword ptr fs:[{off} + 8], {t}",
            "4:",
            "mov {cpu:e}, dword ptr fs:[{off} + 4]",
            "cmp {cpu:e}, {cpus}",
            "jae 5f",
            "mov {t:e}, {cpu:e}",
            $scale,
            "add qword ptr [{base} + {t}], {n}",
            "5:",
            "mov qword ptr fs:[{off} + 8], 0",
            "7:",
            ".pushsection .text.unlikely.tracer_rseq_abort, \"ax\", @progbits",
            // `ud1 edi, [rip + sig]`: the signature as a disassemblable instruction.
            ".byte 0x0f, 0xb9, 0x3d",
            ".long {sig}",
            "6:",
            "lock inc qword ptr [rip + {aborts}]",
            "jmp 2b",
            "8:",
            "mov {cpu:e}, {none}",
            "jmp 7b",
            ".popsection",
            none = const NO_RSEQ,
            sig = const RSEQ_SIG,
            aborts = sym ABORTS,
            off = out(reg) _,
            t = out(reg) _,
            cpu = out(reg) $cpu,
            base = in(reg) $base,
            n = in(reg) $n,
            $($operand)*
            options(nostack),
        )
    };
}

fn outcome(cpu: u32, cpus: u32) -> Result<(), Fallback> {
    if cpu < cpus {
        Ok(())
    } else if cpu == NO_RSEQ {
        Err(Fallback::NoRseq)
    } else {
        Err(Fallback::Shared)
    }
}

/// Add `n` to the 8-byte word at `base + (cpu << SHIFT)` for the CPU the calling thread
/// runs on, when `cpu < CPUS`, with a plain `add` inside a restartable sequence; else
/// tell the caller where to add with `lock` instead.
///
/// # Safety
/// `base + (c << SHIFT)` for every `c < CPUS` is an 8-aligned word, mapped and writable
/// for as long as the process may run this, that only this module ever writes (besides
/// resets while nothing counts).
#[inline(always)]
pub unsafe fn add<const CPUS: u32, const SHIFT: u32>(
    base: *mut u8,
    n: u64,
) -> Result<(), Fallback> {
    let cpu: u32;
    // SAFETY: the caller vouches for the words; `fs:[off+4]` and `fs:[off+8]` are the
    // calling thread's rseq `cpu_id` and `rseq_cs` when glibc exports `__rseq_offset`
    // (with registration off `cpu_id` is -1 and nothing is added); the descriptor is
    // static and the section is disarmed before the asm ends.
    unsafe {
        section!(cpu, base, n, "shl {t:e}, {shift}", cpus = const CPUS, shift = const SHIFT,)
    };
    outcome(cpu, CPUS)
}

/// [`add`] with words `stride` bytes apart.
///
/// # Safety
/// As for [`add`], with `base + c * stride`.
#[inline(always)]
pub unsafe fn add_strided<const CPUS: u32>(
    base: *mut u8,
    stride: usize,
    n: u64,
) -> Result<(), Fallback> {
    let cpu: u32;
    // SAFETY: as in `add`.
    unsafe {
        section!(cpu, base, n, "imul {t}, {stride}", cpus = const CPUS, stride = in(reg) stride,)
    };
    outcome(cpu, CPUS)
}
