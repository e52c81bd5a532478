//! Handlers `agent/tests/registers.rs` runs as a pack's (built apart, as a user's pack
//! is), each writing a known set of vector registers, so that the stub made from the
//! analysis of its code must save exactly those for the probed code to see no change.
use probes::prelude::*;
use std::arch::asm;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Hits of every handler, for the test to check they ran (read through `regs_pack_hits`).
static HITS: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
pub extern "C" fn regs_pack_hits() -> u64 {
    HITS.load(Relaxed)
}

/// No vector register: the slot holds the shim itself.
#[entry("main:reg_pack_plain")]
fn plain(_ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
}

/// Legacy SSE: the low halves of xmm3 (kept in the entry context) and xmm12 (saved by
/// the stub); no upper half changes.
#[entry("main:reg_pack_sse")]
fn sse(ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: only clobbers the declared registers.
    unsafe {
        asm!("pcmpeqb xmm3, xmm3", "pcmpeqb xmm12, xmm12", out("xmm3") _, out("xmm12") _)
    };
    // The context keeps the argument registers too: a handler may change them.
    let a: u64 = ctx.arg(0);
    ctx.set_arg(0, a);
}

/// VEX: ymm5 in full and xmm13 (whose upper half a VEX write zeroes).
#[entry("main:reg_pack_vex")]
fn vex(_ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: only clobbers the declared registers; run only on a CPU with AVX.
    unsafe {
        asm!(
            "vpcmpeqb ymm5, ymm5, ymm5",
            "vpxor xmm13, xmm13, xmm13",
            out("xmm5") _,
            out("xmm13") _
        )
    };
}

/// `vzeroupper`: every upper half.
#[entry("main:reg_pack_vzeroupper")]
fn vzu(_ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: vzeroupper only changes the upper halves, which the compiler does not use
    // across this statement in baseline x86-64 code; run only on a CPU with AVX.
    unsafe { asm!("vzeroupper") };
}

static WORK: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn float_work(x: u64) -> u64 {
    let v: Vec<f64> = (0..16).map(|i| (x as f64 + i as f64).sqrt()).collect();
    v.iter().map(|a| a * 1.25).sum::<f64>() as u64
}

/// Reaches the allocator and libm through the PLT: arbitrary code, every register saved.
#[entry("main:reg_pack_opaque")]
fn opaque(ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    let f: fn(u64) -> u64 = std::hint::black_box(float_work);
    WORK.fetch_add(f(ctx.arg(1)), Relaxed);
}

/// Entry half of an exit probe: legacy SSE on xmm6 (kept in the entry context).
#[entry("main:reg_pack_exit")]
fn exit_entry(_ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: only clobbers the declared register.
    unsafe { asm!("pcmpeqb xmm6, xmm6", out("xmm6") _) };
}

/// Return half: xmm1 (in the exit context), xmm4 and xmm12 (legacy SSE: saved by the
/// stub, upper halves untouched), ymm7 (VEX: saved in full), and the time since the entry
/// (the timestamp counter read at entry and return).
#[exit("main:reg_pack_exit")]
fn exit_return(ctx: &mut ExitCtx) {
    if ctx.elapsed_ns() != u64::MAX {
        HITS.fetch_add(1, Relaxed);
    }
    // SAFETY: only clobbers the declared registers; run only on a CPU with AVX.
    unsafe {
        asm!(
            "pcmpeqb xmm1, xmm1",
            "pcmpeqb xmm4, xmm4",
            "pcmpeqb xmm12, xmm12",
            "vpcmpeqb ymm7, ymm7, ymm7",
            out("xmm1") _,
            out("xmm4") _,
            out("xmm12") _,
            out("xmm7") _,
        )
    };
}

/// A return handler only, writing no vector register and not reading the time.
#[exit("main:reg_pack_exit_only")]
fn exit_only(_ctx: &mut ExitCtx) {
    HITS.fetch_add(1, Relaxed);
}

/// Call-clobbered general-purpose registers written: the trampoline keeps them.
#[entry("main:reg_pack_gprs")]
fn gprs(_ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: only clobbers the declared registers.
    unsafe {
        asm!(
            "xor ecx, ecx",
            "xor edx, edx",
            "xor r8d, r8d",
            "xor r9d, r9d",
            "xor r10d, r10d",
            "xor r11d, r11d",
            "xor esi, esi",
            "xor edi, edi",
            out("rcx") _,
            out("rdx") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            out("rsi") _,
            out("rdi") _,
        )
    };
}

/// EVEX (run only on a CPU with AVX-512F and BW): xmm3 (an EVEX write zeroes bits
/// 128-511), ymm20 and zmm17 in full, the mask k2.
#[entry("main:reg_pack_evex")]
fn evex(_ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: the test runs this handler only where the CPU has AVX-512F and BW.
    unsafe { evex_writes() };
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn evex_writes() {
    // SAFETY: only clobbers the declared registers.
    unsafe {
        asm!(
            "vpxord xmm3, xmm3, xmm3",
            "vpternlogd ymm20, ymm20, ymm20, 0xff",
            "vpternlogd zmm17, zmm17, zmm17, 0xff",
            "kxnorq k2, k2, k2",
            out("xmm3") _,
            out("zmm20") _,
            out("zmm17") _,
            out("k2") _,
        )
    };
}

/// libc's string functions, reached through the GOT: on a CPU with AVX-512 glibc picks
/// EVEX and AVX-512 variants (ymm16-31, zmm16-31, k registers).
#[entry("main:reg_pack_libc")]
fn libc_strings(ctx: &mut EntryCtx) {
    HITS.fetch_add(1, Relaxed);
    let src = [ctx.arg::<u64>(0) as u8; 300];
    let mut dst = [0u8; 300];
    let n = std::hint::black_box(300usize);
    dst[..n].copy_from_slice(&src[..n]);
    let text = c"a string long enough for the vector loop of strlen, and more";
    let len = std::hint::black_box(text).to_bytes().len();
    WORK.fetch_add(dst[7] as u64 + len as u64, Relaxed);
}

/// A return handler writing EVEX state (run only on a CPU with AVX-512F and BW): xmm12
/// (bits 128-511 zeroed), zmm25, k6.
#[exit("main:reg_pack_exit_evex")]
fn exit_evex(_ctx: &mut ExitCtx) {
    HITS.fetch_add(1, Relaxed);
    // SAFETY: the test runs this handler only where the CPU has AVX-512F and BW.
    unsafe { exit_evex_writes() };
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn exit_evex_writes() {
    // SAFETY: only clobbers the declared registers.
    unsafe {
        asm!(
            "vpxord xmm12, xmm12, xmm12",
            "vpternlogd zmm25, zmm25, zmm25, 0xff",
            "kxnorq k6, k6, k6",
            out("xmm12") _,
            out("zmm25") _,
            out("k6") _,
        )
    };
}
