//! Register-exact trampolines: a probed function sees every register exactly as its
//! caller left it, and the caller finds every register as the function left it.
//!
//! GCC's interprocedural register allocation (`-fipa-ra`) lets a caller keep values in
//! call-clobbered registers across a call to a function it knows does not touch them, and
//! `-fipa-stack-alignment` lets it call with `rsp` not 16-byte aligned. So a trampoline
//! may change nothing but the flags at a call boundary (and nothing at all at an offset).
//!
//! The caller (`reg_call`, assembly) loads every general-purpose register, xmm0-15, the
//! upper halves of ymm0-15 (when the CPU has AVX), bits 256-511 of zmm0-15, zmm16-31 and
//! k0-7 (when it has AVX-512: a caller built with `-mavx512f -fipa-ra` keeps values there
//! across calls) and two stack slots above its `rsp` with known values, calls the probed
//! function with `rsp` aligned as the ABI says or 8 off, and records everything after the
//! return. Each probed function (assembly) records what it sees on entry into its own
//! static and returns without changing anything.

use agent::clobbers::Saves;
use agent::interceptor::{Interceptor, PackHandlers, ProbeRequest};
use agent::relocator::Function;
use probes::abi::shared::ProbeKind;
use probes::context::OffsetContext;
use probes::{EntryContext, ExitContext};
use std::arch::global_asm;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

global_asm!(
    ".text",
    // Record every register into the `Regs` at symbol `s`, touching nothing but the flags
    // (and `rax`, restored from the record).
    ".macro REG_RECORD s",
    "mov qword ptr [rip+\\s+0], rax",
    "mov qword ptr [rip+\\s+8], rbx",
    "mov qword ptr [rip+\\s+16], rcx",
    "mov qword ptr [rip+\\s+24], rdx",
    "mov qword ptr [rip+\\s+32], rsi",
    "mov qword ptr [rip+\\s+40], rdi",
    "mov qword ptr [rip+\\s+48], rbp",
    "mov qword ptr [rip+\\s+56], rsp",
    "mov qword ptr [rip+\\s+64], r8",
    "mov qword ptr [rip+\\s+72], r9",
    "mov qword ptr [rip+\\s+80], r10",
    "mov qword ptr [rip+\\s+88], r11",
    "mov qword ptr [rip+\\s+96], r12",
    "mov qword ptr [rip+\\s+104], r13",
    "mov qword ptr [rip+\\s+112], r14",
    "mov qword ptr [rip+\\s+120], r15",
    "pushfq",
    "pop qword ptr [rip+\\s+144]",
    "mov rax, qword ptr [rsp+8]",
    "mov qword ptr [rip+\\s+128], rax",
    "mov rax, qword ptr [rsp+16]",
    "mov qword ptr [rip+\\s+136], rax",
    "mov rax, qword ptr [rip+\\s]",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movdqu xmmword ptr [rip+\\s+160+16*\\i], xmm\\i",
    ".endr",
    "cmp byte ptr [rip+reg_have_avx], 0",
    "je 77f",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vextractf128 xmmword ptr [rip+\\s+416+16*\\i], ymm\\i, 1",
    ".endr",
    "cmp byte ptr [rip+reg_have_avx512], 0",
    "je 77f",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vextracti64x4 ymmword ptr [rip+\\s+672+32*\\i], zmm\\i, 1",
    ".endr",
    ".irp i, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "vmovdqu64 zmmword ptr [rip+\\s+672+512+64*(\\i-16)], zmm\\i",
    ".endr",
    ".irp i, 0,1,2,3,4,5,6,7",
    "kmovq qword ptr [rip+\\s+672+1536+8*\\i], k\\i",
    ".endr",
    "77:",
    ".endm",
    // A probed function: a 5-byte nop for the probe to steal (nothing to relocate), then
    // record and return.
    ".macro REG_BODY name",
    ".globl \\name",
    "\\name:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "REG_RECORD \\name\\()_seen",
    "ret",
    ".globl \\name\\()_end",
    "\\name\\()_end:",
    ".pushsection .bss",
    ".p2align 4",
    ".globl \\name\\()_seen",
    "\\name\\()_seen:",
    ".zero 2272",
    ".popsection",
    ".endm",
    "REG_BODY reg_entry",
    "REG_BODY reg_entry_exit",
    "REG_BODY reg_fresh_thread",
    "REG_BODY reg_handler",
    "REG_BODY reg_handlers_both",
    "REG_BODY reg_nested_count",
    "REG_BODY reg_nested_count_exit",
    "REG_BODY reg_nested_handler",
    "REG_BODY reg_outer",
    "REG_BODY reg_callee",
    "REG_BODY reg_far",
    "REG_BODY reg_pack_plain",
    "REG_BODY reg_pack_sse",
    "REG_BODY reg_pack_vex",
    "REG_BODY reg_pack_vzeroupper",
    "REG_BODY reg_pack_opaque",
    "REG_BODY reg_pack_exit",
    "REG_BODY reg_pack_exit_only",
    "REG_BODY reg_pack_gprs",
    "REG_BODY reg_pack_evex",
    "REG_BODY reg_pack_libc",
    "REG_BODY reg_pack_exit_evex",
    // The probe steals a `call`: what reg_callee sees must be what the caller set.
    ".globl reg_stolen_call",
    "reg_stolen_call:",
    "call reg_callee",
    "ret",
    ".globl reg_stolen_call_end",
    "reg_stolen_call_end:",
    // Offset probe: flags set to a known value before the site must survive it too.
    ".globl reg_offset",
    "reg_offset:",
    "push qword ptr [rip+reg_flags_in]",
    "popfq",
    ".globl reg_offset_site",
    "reg_offset_site:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "REG_RECORD reg_offset_seen",
    "cld",
    "ret",
    ".globl reg_offset_end",
    "reg_offset_end:",
    ".pushsection .bss",
    ".p2align 4",
    ".globl reg_offset_seen",
    "reg_offset_seen:",
    ".zero 2272",
    ".popsection",
    // reg_call(frame): see `Frame`. At the call, [rsp] and [rsp+8] hold the two stack
    // values, [rsp+16] the frame, [rsp+24] the rsp to restore, [rsp+32] the target.
    ".globl reg_call",
    "reg_call:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rax, rsp",
    "and rsp, -16",
    "sub rsp, 48",
    "sub rsp, qword ptr [rdi+1352]",
    "mov qword ptr [rsp+24], rax",
    "mov qword ptr [rsp+16], rdi",
    "mov rax, qword ptr [rdi+1344]",
    "mov qword ptr [rsp+32], rax",
    "mov rax, qword ptr [rdi+128]",
    "mov qword ptr [rsp], rax",
    "mov rax, qword ptr [rdi+136]",
    "mov qword ptr [rsp+8], rax",
    "mov qword ptr [rdi+56], rsp",
    "cmp qword ptr [rdi+1360], 0",
    "je 2f",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movdqu xmm\\i, xmmword ptr [rdi+160+16*\\i]",
    "vinsertf128 ymm\\i, ymm\\i, xmmword ptr [rdi+416+16*\\i], 1",
    ".endr",
    "jmp 3f",
    "2:",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movdqu xmm\\i, xmmword ptr [rdi+160+16*\\i]",
    ".endr",
    "3:",
    "cmp qword ptr [rdi+1368], 0",
    "je 6f",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vinserti64x4 zmm\\i, zmm\\i, ymmword ptr [rdi+1376+32*\\i], 1",
    ".endr",
    ".irp i, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "vmovdqu64 zmm\\i, zmmword ptr [rdi+1376+512+64*(\\i-16)]",
    ".endr",
    ".irp i, 0,1,2,3,4,5,6,7",
    "kmovq k\\i, qword ptr [rdi+1376+1536+8*\\i]",
    ".endr",
    "6:",
    "mov rax, qword ptr [rdi+0]",
    "mov rbx, qword ptr [rdi+8]",
    "mov rcx, qword ptr [rdi+16]",
    "mov rdx, qword ptr [rdi+24]",
    "mov rsi, qword ptr [rdi+32]",
    "mov rbp, qword ptr [rdi+48]",
    "mov r8, qword ptr [rdi+64]",
    "mov r9, qword ptr [rdi+72]",
    "mov r10, qword ptr [rdi+80]",
    "mov r11, qword ptr [rdi+88]",
    "mov r12, qword ptr [rdi+96]",
    "mov r13, qword ptr [rdi+104]",
    "mov r14, qword ptr [rdi+112]",
    "mov r15, qword ptr [rdi+120]",
    "mov rdi, qword ptr [rdi+40]",
    "call qword ptr [rsp+32]",
    "mov qword ptr [rsp-8], rax",
    "mov rax, qword ptr [rsp+16]",
    "mov qword ptr [rax+680], rbx",
    "mov qword ptr [rax+688], rcx",
    "mov qword ptr [rax+696], rdx",
    "mov qword ptr [rax+704], rsi",
    "mov qword ptr [rax+712], rdi",
    "mov qword ptr [rax+720], rbp",
    "mov qword ptr [rax+728], rsp",
    "mov qword ptr [rax+736], r8",
    "mov qword ptr [rax+744], r9",
    "mov qword ptr [rax+752], r10",
    "mov qword ptr [rax+760], r11",
    "mov qword ptr [rax+768], r12",
    "mov qword ptr [rax+776], r13",
    "mov qword ptr [rax+784], r14",
    "mov qword ptr [rax+792], r15",
    "mov rcx, qword ptr [rsp-8]",
    "mov qword ptr [rax+672], rcx",
    "mov rcx, qword ptr [rsp]",
    "mov qword ptr [rax+672+128], rcx",
    "mov rcx, qword ptr [rsp+8]",
    "mov qword ptr [rax+672+136], rcx",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "movdqu xmmword ptr [rax+672+160+16*\\i], xmm\\i",
    ".endr",
    "cmp qword ptr [rax+1360], 0",
    "je 4f",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vextractf128 xmmword ptr [rax+672+416+16*\\i], ymm\\i, 1",
    ".endr",
    "cmp qword ptr [rax+1368], 0",
    "je 5f",
    ".irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "vextracti64x4 ymmword ptr [rax+2976+32*\\i], zmm\\i, 1",
    ".endr",
    ".irp i, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "vmovdqu64 zmmword ptr [rax+2976+512+64*(\\i-16)], zmm\\i",
    ".endr",
    ".irp i, 0,1,2,3,4,5,6,7",
    "kmovq qword ptr [rax+2976+1536+8*\\i], k\\i",
    ".endr",
    "5:",
    "vzeroupper",
    "4:",
    "mov rsp, qword ptr [rsp+24]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".data",
    ".globl reg_have_avx",
    "reg_have_avx:",
    ".byte 0",
    ".globl reg_have_avx512",
    "reg_have_avx512:",
    ".byte 0",
    ".p2align 3",
    // CF PF AF ZF SF DF OF and the always-one bit 1.
    ".globl reg_flags_in",
    "reg_flags_in:",
    ".quad 0xcd7",
    ".text",
);

/// Flags checked at the offset probe (`reg_flags_in` without the reserved bit).
const FLAGS_CHECKED: u64 = 0xcd5;

/// Every register, as loaded, seen or found. Offsets are fixed by the assembly.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Regs {
    /// rax rbx rcx rdx rsi rdi rbp rsp r8 .. r15.
    gpr: [u64; 16],
    /// The two qwords above the caller's rsp (the callee's [rsp+8] and [rsp+16]).
    stack: [u64; 2],
    flags: u64,
    _pad: u64,
    xmm: [[u64; 2]; 16],
    /// Bits 128..255 of ymm0-15 (zero when the CPU has no AVX).
    ymm_hi: [[u64; 2]; 16],
}

const _: () = assert!(std::mem::size_of::<Regs>() == 672);

/// The AVX-512 state beyond `Regs` (all zero when the CPU has no AVX-512).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Avx512Regs {
    /// Bits 256..511 of zmm0-15.
    zmm_hi: [[u64; 4]; 16],
    zmm16: [[u64; 8]; 16],
    k: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<Avx512Regs>() == 1600);

/// What a recording function saw: its `_seen` static.
#[repr(C)]
struct Seen {
    regs: Regs,
    avx512: Avx512Regs,
}

const _: () = assert!(std::mem::size_of::<Seen>() == 2272);

#[repr(C)]
struct Frame {
    input: Regs,
    after: Regs,
    target: u64,
    /// 0: the callee is entered with rsp = 8 mod 16 (as the ABI says); 8: 0 mod 16.
    misalign: u64,
    avx: u64,
    avx512: u64,
    input512: Avx512Regs,
    after512: Avx512Regs,
}

const _: () = assert!(std::mem::offset_of!(Frame, target) == 1344);
const _: () = assert!(std::mem::offset_of!(Frame, avx) == 1360);
const _: () = assert!(std::mem::offset_of!(Frame, avx512) == 1368);
const _: () = assert!(std::mem::offset_of!(Frame, input512) == 1376);
const _: () = assert!(std::mem::offset_of!(Frame, after512) == 2976);

const NAMES: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];
const RSP: usize = 7;

extern "C" {
    fn reg_call(frame: *mut Frame);
    static mut reg_have_avx: u8;
    static mut reg_have_avx512: u8;
}

macro_rules! bodies {
    ($($name:ident, $end:ident, $seen:ident;)*) => {
        extern "C" {
            $(
                fn $name();
                static $end: u8;
                static $seen: Seen;
            )*
        }
    };
}

bodies! {
    reg_entry, reg_entry_end, reg_entry_seen;
    reg_entry_exit, reg_entry_exit_end, reg_entry_exit_seen;
    reg_fresh_thread, reg_fresh_thread_end, reg_fresh_thread_seen;
    reg_handler, reg_handler_end, reg_handler_seen;
    reg_handlers_both, reg_handlers_both_end, reg_handlers_both_seen;
    reg_nested_count, reg_nested_count_end, reg_nested_count_seen;
    reg_nested_count_exit, reg_nested_count_exit_end, reg_nested_count_exit_seen;
    reg_nested_handler, reg_nested_handler_end, reg_nested_handler_seen;
    reg_outer, reg_outer_end, reg_outer_seen;
    reg_offset, reg_offset_end, reg_offset_seen;
    reg_pack_plain, reg_pack_plain_end, reg_pack_plain_seen;
    reg_pack_sse, reg_pack_sse_end, reg_pack_sse_seen;
    reg_pack_vex, reg_pack_vex_end, reg_pack_vex_seen;
    reg_pack_vzeroupper, reg_pack_vzeroupper_end, reg_pack_vzeroupper_seen;
    reg_pack_opaque, reg_pack_opaque_end, reg_pack_opaque_seen;
    reg_pack_exit, reg_pack_exit_end, reg_pack_exit_seen;
    reg_pack_exit_only, reg_pack_exit_only_end, reg_pack_exit_only_seen;
    reg_pack_gprs, reg_pack_gprs_end, reg_pack_gprs_seen;
    reg_pack_evex, reg_pack_evex_end, reg_pack_evex_seen;
    reg_pack_libc, reg_pack_libc_end, reg_pack_libc_seen;
    reg_pack_exit_evex, reg_pack_exit_evex_end, reg_pack_exit_evex_seen;
}

extern "C" {
    fn reg_far();
    static reg_far_seen: Seen;
    static reg_callee_seen: Seen;
    fn reg_stolen_call();
    static reg_stolen_call_end: u8;
    static reg_offset_site: u8;
}

fn have_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

/// AVX-512 state to fill and check: `zmm0-31` and 64-bit `k` registers (`kmovq`, AVX512BW).
fn have_avx512() -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    let have = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw");
    if !have {
        SAID.call_once(|| {
            println!("no AVX-512F and AVX512BW on this CPU: zmm16-31 and k0-7 not checked")
        });
    }
    have
}

/// Distinct values for every register, different for every `seed`.
fn input(seed: u64) -> Regs {
    let v = |k: u64| (seed << 48) ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0101_0101;
    let mut r = Regs {
        gpr: [0; 16],
        stack: [v(100), v(101)],
        flags: 0,
        _pad: 0,
        xmm: [[0; 2]; 16],
        ymm_hi: [[0; 2]; 16],
    };
    for i in 0..16 {
        r.gpr[i] = v(i as u64 + 1);
        r.xmm[i] = [v(20 + 2 * i as u64), v(21 + 2 * i as u64)];
        if have_avx() {
            r.ymm_hi[i] = [v(60 + 2 * i as u64), v(61 + 2 * i as u64)];
        }
    }
    r
}

/// Distinct values for the AVX-512 state, different for every `seed`; zero without it.
fn input512(seed: u64) -> Avx512Regs {
    let v = |k: u64| (seed << 48) ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0202_0202;
    let mut r = Avx512Regs {
        zmm_hi: [[0; 4]; 16],
        zmm16: [[0; 8]; 16],
        k: [0; 8],
    };
    if !have_avx512() {
        return r;
    }
    for i in 0..16 {
        for j in 0..4 {
            r.zmm_hi[i][j] = v(200 + 4 * i as u64 + j as u64);
        }
        for j in 0..8 {
            r.zmm16[i][j] = v(300 + 8 * i as u64 + j as u64);
        }
    }
    for i in 0..8 {
        r.k[i] = v(500 + i as u64);
    }
    r
}

/// What differs in the AVX-512 state, one line each.
fn diff512(what: &str, want: &Avx512Regs, got: &Avx512Regs) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..16 {
        if got.zmm_hi[i] != want.zmm_hi[i] {
            out.push(format!(
                "{what}: zmm{i} bits 256-511 are {:x?}, want {:x?}",
                got.zmm_hi[i], want.zmm_hi[i]
            ));
        }
        if got.zmm16[i] != want.zmm16[i] {
            out.push(format!(
                "{what}: zmm{} is {:x?}, want {:x?}",
                16 + i,
                got.zmm16[i],
                want.zmm16[i]
            ));
        }
    }
    for i in 0..8 {
        if got.k[i] != want.k[i] {
            out.push(format!(
                "{what}: k{i} is {:#x}, want {:#x}",
                got.k[i], want.k[i]
            ));
        }
    }
    out
}

/// What differs between what the caller set and what was seen, one line each.
fn diff(what: &str, want: &Regs, got: &Regs, rsp_delta: u64, stack: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let w = if i == RSP {
            want.gpr[i].wrapping_sub(rsp_delta)
        } else {
            want.gpr[i]
        };
        if got.gpr[i] != w {
            out.push(format!("{what}: {name} is {:#x}, want {w:#x}", got.gpr[i]));
        }
    }
    if stack && got.stack != want.stack {
        out.push(format!(
            "{what}: stack above rsp is {:x?}, want {:x?}",
            got.stack, want.stack
        ));
    }
    for i in 0..16 {
        if got.xmm[i] != want.xmm[i] {
            out.push(format!(
                "{what}: xmm{i} is {:x?}, want {:x?}",
                got.xmm[i], want.xmm[i]
            ));
        }
        if got.ymm_hi[i] != want.ymm_hi[i] {
            out.push(format!(
                "{what}: ymm{i} upper half is {:x?}, want {:x?}",
                got.ymm_hi[i], want.ymm_hi[i]
            ));
        }
    }
    out
}

/// Call `f` through `reg_call` with rsp as the ABI says and 8 off; `seen` is what the
/// function recorded. `rsp_delta`: how far below the caller's rsp the recording function
/// runs (8, or 16 through `reg_stolen_call`). Returns every difference.
fn check_calls(
    what: &str,
    f: unsafe extern "C" fn(),
    seen: *const Seen,
    rsp_delta: u64,
    seed: u64,
) -> Vec<String> {
    // SAFETY: single-byte flags read by the assembly.
    unsafe {
        std::ptr::addr_of_mut!(reg_have_avx).write_volatile(have_avx() as u8);
        std::ptr::addr_of_mut!(reg_have_avx512).write_volatile(have_avx512() as u8);
    }
    let mut out = Vec::new();
    for (k, misalign) in [0u64, 8, 0, 8].into_iter().enumerate() {
        let mut frame = Box::new(Frame {
            input: input(seed + k as u64),
            after: input(0),
            target: f as usize as u64,
            misalign,
            avx: have_avx() as u64,
            avx512: have_avx512() as u64,
            input512: input512(seed + k as u64),
            after512: input512(0),
        });
        // SAFETY: reg_call takes a frame and calls `target`, a recording function that
        // takes no arguments and returns nothing.
        unsafe { reg_call(&mut *frame) };
        // SAFETY: written by the recording function during the call just made.
        let seen = unsafe { std::ptr::read_volatile(seen) };
        let tag = format!("{what} (call {k}, rsp 8 off: {})", misalign != 0);
        let by_function = format!("{tag}, seen by the function");
        out.extend(diff(
            &by_function,
            &frame.input,
            &seen.regs,
            rsp_delta,
            rsp_delta == 8,
        ));
        out.extend(diff512(&by_function, &frame.input512, &seen.avx512));
        let by_caller = format!("{tag}, found by the caller after the return");
        out.extend(diff(&by_caller, &frame.input, &frame.after, 0, true));
        out.extend(diff512(&by_caller, &frame.input512, &frame.after512));
    }
    out
}

fn assert_exact(diffs: Vec<String>) {
    assert!(diffs.is_empty(), "registers changed:\n{}", diffs.join("\n"));
}

/// Tests share the interceptor and the recording statics: one at a time.
static LOCK: Mutex<()> = Mutex::new(());
static INTERCEPTOR: Mutex<Option<Interceptor>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Interceptor) -> R) -> R {
    let mut g = INTERCEPTOR.lock().unwrap_or_else(|e| e.into_inner());
    let i = g.get_or_insert_with(|| Interceptor::new(64).unwrap());
    f(i)
}

fn function(start: unsafe extern "C" fn(), end: *const u8) -> Function {
    Function {
        address: start as usize as u64,
        size: Some(end as u64 - start as usize as u64),
    }
}

fn install(req: ProbeRequest) -> u32 {
    with(|i| {
        let p = i.prepare(&req).expect("prepare");
        i.commit_in_process(&p).expect("commit");
        p.id
    })
}

fn entry(start: unsafe extern "C" fn(), end: *const u8) -> ProbeRequest {
    let f = function(start, end);
    ProbeRequest::entry(f.address, f.size)
}

/// (hits, exits, skipped)
fn counts(id: u32) -> (u64, u64, u64) {
    with(|i| {
        let c = i.counters(id);
        (c.hits(), c.exits(), c.skipped())
    })
}

static FLOAT_SINK: AtomicU64 = AtomicU64::new(0);

/// Float work that tempts the compiler into many vector registers.
fn float_work(x: u64) {
    let mut v = [0f64; 16];
    for (i, a) in v.iter_mut().enumerate() {
        *a = black_box((x % 1000) as f64 + i as f64).sqrt();
    }
    let s: f64 = black_box(&v).iter().map(|a| a * 1.25 + 0.5).sum();
    let t: f32 = black_box(&v)
        .iter()
        .map(|a| (*a as f32).mul_add(0.5, 1.0))
        .sum();
    FLOAT_SINK.fetch_add((s + t as f64) as u64, SeqCst);
    libc_strings(x);
    if have_avx512() {
        // SAFETY: the CPU has AVX-512F and BW.
        unsafe { clobber_avx512() };
    }
}

/// String functions the agent's and handlers' code reaches in libc: on a CPU with
/// AVX-512 glibc picks EVEX and AVX-512 variants, which write ymm16-31, zmm16-31 and k
/// registers.
fn libc_strings(x: u64) {
    let src = [x as u8; 300];
    let mut dst = [0u8; 300];
    let text = c"a string long enough for the vector loop of strlen, and more";
    // SAFETY: buffers of 300 bytes and a NUL-terminated string.
    let (n, c) = unsafe {
        libc::memcpy(dst.as_mut_ptr().cast(), src.as_ptr().cast(), black_box(300));
        let n = libc::strlen(black_box(text.as_ptr()));
        (
            n,
            libc::memcmp(dst.as_ptr().cast(), src.as_ptr().cast(), 300),
        )
    };
    FLOAT_SINK.fetch_add(n as u64 + c as u64 + dst[7] as u64, SeqCst);
}

/// Write AVX-512 state directly, whatever libc picks: bits 256-511 of zmm0 and zmm15,
/// zmm16 and zmm31, k1 and k7 (k0 cannot be named in Rust's `asm!`; `strlen` writes it).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn clobber_avx512() {
    // SAFETY: only the declared registers change.
    unsafe {
        std::arch::asm!(
            "vpternlogd zmm0, zmm0, zmm0, 0xff",
            "vpternlogd zmm15, zmm15, zmm15, 0xff",
            "vpternlogd zmm16, zmm16, zmm16, 0xff",
            "vpternlogd zmm31, zmm31, zmm31, 0xff",
            "kxnorq k1, k1, k1",
            "kxnorq k7, k7, k7",
            out("zmm0") _,
            out("zmm15") _,
            out("zmm16") _,
            out("zmm31") _,
            out("k1") _,
            out("k7") _,
        )
    };
}

fn float_entry(ctx: &mut EntryContext) {
    float_work(ctx.rdi ^ ctx.r10);
}

fn float_exit(ctx: &mut ExitContext) {
    float_work(ctx.rax ^ ctx.xmm1.0[0]);
}

fn float_offset(ctx: &mut OffsetContext) {
    float_work(ctx.r11 ^ ctx.xmm(15).0[0]);
}

#[test]
fn entry_count_only_changes_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let id = install(entry(reg_entry, unsafe { &reg_entry_end }));
    assert_exact(check_calls(
        "entry, counting",
        reg_entry,
        unsafe { &reg_entry_seen },
        8,
        1,
    ));
    assert_eq!(counts(id).0, 4);
}

#[test]
fn entry_and_exit_count_only_change_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let id = install(entry(reg_entry_exit, unsafe { &reg_entry_exit_end }).with_exit());
    // Twice: the first call of this thread maps the shadow stack on the general path.
    for seed in [2, 3] {
        assert_exact(check_calls(
            "entry+exit, counting",
            reg_entry_exit,
            unsafe { &reg_entry_exit_seen },
            8,
            seed,
        ));
    }
    assert_eq!(counts(id), (8, 8, 0));
}

#[test]
fn fast_path_falling_back_on_a_fresh_thread_changes_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let id = install(entry(reg_fresh_thread, unsafe { &reg_fresh_thread_end }).with_exit());
    // A new thread has no shadow stack yet: its first hit takes the general path, which
    // maps it; the calls after that take the inline path.
    let diffs = std::thread::spawn(|| {
        check_calls(
            "entry+exit, counting, fresh thread",
            reg_fresh_thread,
            unsafe { &reg_fresh_thread_seen },
            8,
            4,
        )
    })
    .join()
    .unwrap();
    assert_exact(diffs);
    assert_eq!(counts(id), (4, 4, 0));
}

#[test]
fn entry_handler_changes_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let id = install(entry(reg_handler, unsafe { &reg_handler_end }).on_entry(float_entry));
    assert_exact(check_calls(
        "entry handler",
        reg_handler,
        unsafe { &reg_handler_seen },
        8,
        5,
    ));
    assert_eq!(counts(id).0, 4);
}

#[test]
fn entry_and_exit_handlers_change_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let id = install(
        entry(reg_handlers_both, unsafe { &reg_handlers_both_end })
            .on_entry(float_entry)
            .on_exit(float_exit),
    );
    assert_exact(check_calls(
        "entry+exit handlers",
        reg_handlers_both,
        unsafe { &reg_handlers_both_seen },
        8,
        6,
    ));
    assert_eq!(counts(id), (4, 4, 0));
}

#[test]
fn stolen_call_changes_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let id = install(entry(reg_stolen_call, unsafe { &reg_stolen_call_end }).with_exit());
    assert_exact(check_calls(
        "entry+exit, counting, over a stolen call",
        reg_stolen_call,
        unsafe { &reg_callee_seen },
        16,
        7,
    ));
    assert_eq!(counts(id), (4, 4, 0));
}

#[test]
fn offset_handler_changes_no_register_nor_flag() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let f = function(reg_offset, unsafe { &reg_offset_end });
    let req = ProbeRequest {
        offset: unsafe { &reg_offset_site as *const u8 as u64 } - f.address,
        function: f,
        kind: ProbeKind::Offset,
        on_entry: None,
        on_exit: None,
        pack: None,
    };
    let id = with(|i| {
        let p = i.prepare_offset(&req, Some(float_offset)).expect("prepare");
        i.commit_in_process(&p).expect("commit");
        p.id
    });
    assert_exact(check_calls(
        "offset handler",
        reg_offset,
        unsafe { &reg_offset_seen },
        8,
        8,
    ));
    let seen = unsafe { std::ptr::read_volatile(&reg_offset_seen) }.regs;
    assert_eq!(
        seen.flags & FLAGS_CHECKED,
        FLAGS_CHECKED,
        "flags at the offset probe: {:#x}",
        seen.flags
    );
    assert_eq!(counts(id).0, 4);
}

static NESTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Inside a handler every probe hit is skipped: its path must be exact too.
fn nested_calls(_: &mut EntryContext) {
    let mut d = Vec::new();
    // SAFETY: symbols from the assembly above.
    unsafe {
        d.extend(check_calls(
            "skipped entry, counting",
            reg_nested_count,
            &reg_nested_count_seen,
            8,
            9,
        ));
        d.extend(check_calls(
            "skipped entry+exit, counting",
            reg_nested_count_exit,
            &reg_nested_count_exit_seen,
            8,
            10,
        ));
        d.extend(check_calls(
            "skipped entry+exit handlers",
            reg_nested_handler,
            &reg_nested_handler_seen,
            8,
            11,
        ));
    }
    NESTED.lock().unwrap().extend(d);
}

#[test]
fn skipped_hits_inside_a_handler_change_no_register() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): symbols from the assembly above.
    let a = install(entry(reg_nested_count, unsafe { &reg_nested_count_end }));
    let b =
        install(entry(reg_nested_count_exit, unsafe { &reg_nested_count_exit_end }).with_exit());
    let c = install(
        entry(reg_nested_handler, unsafe { &reg_nested_handler_end })
            .on_entry(float_entry)
            .on_exit(float_exit),
    );
    let outer = install(entry(reg_outer, unsafe { &reg_outer_end }).on_entry(nested_calls));
    assert_exact(check_calls(
        "entry handler making nested calls",
        reg_outer,
        unsafe { &reg_outer_seen },
        8,
        12,
    ));
    assert_exact(std::mem::take(&mut *NESTED.lock().unwrap()));
    assert_eq!(counts(outer).0, 4);
    for id in [a, b, c] {
        assert_eq!(counts(id), (0, 0, 16));
    }
}

/// Jumps taken while the probed code owns every register (to a stolen call's target, to
/// the exit trampoline) use `Emitter::jmp_preserving`: from code more than 4 GiB away
/// it is `jmp [rip+0]` with the target inline, which must need no register either.
#[test]
fn far_jump_without_scratch_register_changes_no_register() {
    use agent::allocator::{Limits, NearAllocator, PAGE, USER_TOP};
    use agent::emitter::{CallEncoding, Policy};
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = reg_far as *const () as u64;
    let mut far = NearAllocator::with_limits(Limits {
        min_addr: (target + (5 << 30)).next_multiple_of(PAGE),
        max_addr: USER_TOP,
    })
    .unwrap();
    let thunk = agent::jit::place(&mut far, &[], Policy::Best, |e| {
        Ok(e.jmp_preserving(target)?)
    })
    .expect("place the thunk");
    assert_eq!(thunk.value, CallEncoding::RipSlot);
    // SAFETY: the thunk jumps to reg_far, so it is reg_far.
    let f: unsafe extern "C" fn() = unsafe { std::mem::transmute(thunk.addr) };
    // SAFETY: reg_far's record, from the assembly above.
    let diffs = check_calls("far jump", f, unsafe { &reg_far_seen }, 8, 13);
    assert_exact(diffs);
}

/// Build `tests/regs_pack` (a cdylib apart from the agent, as a user's pack is), load it
/// and return its handle.
fn load_regs_pack() -> *mut libc::c_void {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regs_pack");
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("regs_pack");
    let path = tests::build_pack_into(&dir, &target, "regs_pack", &[]);
    let so = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a pack built from this tree; its constructors are Rust std's.
    let lib = unsafe { libc::dlopen(so.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null());
    // What the tracer passes on from the descriptors when it loads a pack.
    for (shim, flags) in tests::pack_probe_flags(&path) {
        let shim = std::ffi::CString::new(shim).unwrap();
        agent::pack_loader::set_shim_flags(symbol(lib, &shim), flags);
    }
    lib
}

fn symbol(lib: *mut libc::c_void, name: &std::ffi::CStr) -> u64 {
    // SAFETY: a live handle and a NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) } as u64;
    assert_ne!(p, 0, "{name:?}");
    p
}

/// What the analysis of a pack handler must find, as the stub's saves.
#[derive(Clone, Copy)]
enum Expect {
    /// Exactly these (with the CPU features the case needs).
    Saves(Saves),
    /// Code it cannot follow: every register.
    Full,
    /// Whatever it finds in code this test does not control (libc's).
    Any,
}

/// Registers 0-15 only.
fn low(bits: u16) -> Expect {
    Expect::Saves(Saves {
        low: bits,
        ..Saves::default()
    })
}

/// What a case needs of the CPU to run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    Avx,
    Avx512,
}

impl Needs {
    fn met(self) -> bool {
        match self {
            Needs::Nothing => true,
            Needs::Avx => have_avx(),
            Needs::Avx512 => have_avx512(),
        }
    }
}

/// (what, body, end, seen, shim, the stub's saves, what it needs of the CPU)
type PackCase = (
    &'static str,
    unsafe extern "C" fn(),
    *const u8,
    *const Seen,
    &'static std::ffi::CStr,
    Expect,
    Needs,
);
/// Pack handlers run straight from the trampoline through stubs that fill only what the
/// handler uses of its context (descriptor flags) and save only the registers the
/// handler's code writes: the analysis must find each one (legacy SSE low halves, VEX
/// writes that zero upper halves, `vzeroupper`), or the probed code sees the change;
/// code it cannot follow gets every register saved.
#[test]
fn pack_handlers_change_no_register_with_reduced_saves() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let lib = load_regs_pack();
    let hits = symbol(lib, c"regs_pack_hits");
    // SAFETY: the pack exports `regs_pack_hits` with this signature.
    let hits: extern "C" fn() -> u64 = unsafe { std::mem::transmute(hits) };
    // SAFETY (whole table): symbols from the assembly above.
    let cases: [PackCase; 8] = [
        (
            "plain",
            reg_pack_plain,
            unsafe { &reg_pack_plain_end },
            unsafe { &reg_pack_plain_seen },
            c"__tracer_probe_plain",
            low(0),
            Needs::Nothing,
        ),
        (
            "sse",
            reg_pack_sse,
            unsafe { &reg_pack_sse_end },
            unsafe { &reg_pack_sse_seen },
            c"__tracer_probe_sse",
            // xmm3 too: the handler uses no float argument, so the context does not
            // keep them.
            low(1 << 3 | 1 << 12),
            Needs::Nothing,
        ),
        (
            "gprs",
            reg_pack_gprs,
            unsafe { &reg_pack_gprs_end },
            unsafe { &reg_pack_gprs_seen },
            c"__tracer_probe_gprs",
            low(0),
            Needs::Nothing,
        ),
        (
            "vex",
            reg_pack_vex,
            unsafe { &reg_pack_vex_end },
            unsafe { &reg_pack_vex_seen },
            c"__tracer_probe_vex",
            low(1 << 5 | 1 << 13),
            Needs::Avx,
        ),
        (
            "vzeroupper",
            reg_pack_vzeroupper,
            unsafe { &reg_pack_vzeroupper_end },
            unsafe { &reg_pack_vzeroupper_seen },
            c"__tracer_probe_vzu",
            low(0xffff),
            Needs::Avx,
        ),
        (
            "opaque",
            reg_pack_opaque,
            unsafe { &reg_pack_opaque_end },
            unsafe { &reg_pack_opaque_seen },
            c"__tracer_probe_opaque",
            Expect::Full,
            Needs::Nothing,
        ),
        (
            "evex",
            reg_pack_evex,
            unsafe { &reg_pack_evex_end },
            unsafe { &reg_pack_evex_seen },
            c"__tracer_probe_evex",
            // xmm3: the handler uses no float argument, so the context does not keep it.
            Expect::Saves(Saves {
                low: 1 << 3,
                zmm16: 1 << (17 - 16) | 1 << (20 - 16),
                masks: 1 << 2,
            }),
            Needs::Avx512,
        ),
        (
            "libc",
            reg_pack_libc,
            unsafe { &reg_pack_libc_end },
            unsafe { &reg_pack_libc_seen },
            c"__tracer_probe_libc_strings",
            Expect::Any,
            Needs::Nothing,
        ),
    ];
    for (seed, (what, body, end, seen, shim, expect, needs)) in cases.into_iter().enumerate() {
        if !needs.met() {
            continue;
        }
        let shim = symbol(lib, shim);
        let mut req = entry(body, end);
        req.pack = Some(PackHandlers {
            entry: shim,
            exit: 0,
            exit_timed: false,
            name: "test:pack",
        });
        let id = install(req);
        let stub = with(|i| {
            i.pack_stub(shim, agent::trampoline::PACK_ENTRY_DIRECT)
                .expect("stub")
                .clone()
        });
        match expect {
            Expect::Saves(s) => {
                assert!(
                    !stub.analysis.clobbers.full,
                    "{what}: {:?}",
                    stub.analysis.reason
                );
                assert_eq!(stub.saves, s, "{what}: {}", stub.analysis.clobbers);
                let bare = stub.direct.is_some_and(|d| d.bare());
                assert_eq!(
                    stub.addr == shim,
                    s.is_empty() && bare,
                    "{what}: a stub only when needed"
                );
            }
            Expect::Full => assert!(
                stub.analysis.clobbers.full,
                "{what}: {}",
                stub.analysis.clobbers
            ),
            Expect::Any => println!(
                "{what}: the handler writes {} ({:?})",
                stub.analysis.clobbers, stub.analysis.reason
            ),
        }
        let before = hits();
        assert_exact(check_calls(
            &format!("entry, pack handler {what}"),
            body,
            seen,
            8,
            100 + seed as u64,
        ));
        assert_eq!(hits() - before, 4, "{what}: the handler ran at every call");
        assert_eq!(counts(id).0, 4);
        // Inside a handler of this thread (the guard read through `fs`): only the
        // original code runs, counted as skipped, every register as it was.
        agent::thread_state::current().busy = 1;
        let diffs = check_calls(
            &format!("entry, pack handler {what}, skipped"),
            body,
            seen,
            8,
            200 + seed as u64,
        );
        agent::thread_state::current().busy = 0;
        assert_exact(diffs);
        assert_eq!(
            hits() - before,
            4,
            "{what}: the handler did not run when skipped"
        );
        assert_eq!(counts(id), (4, 0, 4));
    }
}

/// Exit probes with pack handlers run them from the inline exit path (entry handler,
/// shadow entry with or without a timestamp, the body called, the return handler through
/// a stub that saves what the handler writes beyond `xmm0-1`): the probed function and
/// its caller see no register change.
#[test]
fn pack_exit_handlers_change_no_register_with_reduced_saves() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let lib = load_regs_pack();
    // SAFETY: the pack exports `regs_pack_hits` with this signature.
    let hits: extern "C" fn() -> u64 =
        unsafe { std::mem::transmute(symbol(lib, c"regs_pack_hits")) };
    let exit_keeps = agent::trampoline::PACK_EXIT_KEEPS;
    // SAFETY (whole block): symbols from the assembly above.
    if have_avx() {
        let entry_shim = symbol(lib, c"__tracer_probe_exit_entry");
        let exit_shim = symbol(lib, c"__tracer_probe_exit_return");
        let mut req = entry(reg_pack_exit, unsafe { &reg_pack_exit_end }).with_exit();
        req.pack = Some(PackHandlers {
            entry: entry_shim,
            exit: exit_shim,
            exit_timed: true,
            name: "test:pack_exit",
        });
        let id = install(req);
        let stub = with(|i| i.pack_stub(exit_shim, exit_keeps).expect("stub").clone());
        assert_eq!(
            stub.saves.low,
            1 << 4 | 1 << 7 | 1 << 12,
            "{}",
            stub.analysis.clobbers
        );
        let before = hits();
        // Twice: the first call of this thread may map the shadow stack on the general
        // path.
        for seed in [200, 210] {
            assert_exact(check_calls(
                "entry+exit, pack handlers",
                reg_pack_exit,
                unsafe { &reg_pack_exit_seen },
                8,
                seed,
            ));
        }
        assert_eq!(hits() - before, 16, "both handlers ran at every call");
        assert_eq!(counts(id), (8, 8, 0));
    }
    let exit_shim = symbol(lib, c"__tracer_probe_exit_only");
    let mut req = entry(reg_pack_exit_only, unsafe { &reg_pack_exit_only_end }).with_exit();
    req.pack = Some(PackHandlers {
        entry: 0,
        exit: exit_shim,
        exit_timed: false,
        name: "test:pack_exit_only",
    });
    let id = install(req);
    let before = hits();
    for seed in [220, 230] {
        assert_exact(check_calls(
            "exit, pack handler",
            reg_pack_exit_only,
            unsafe { &reg_pack_exit_only_seen },
            8,
            seed,
        ));
    }
    assert_eq!(hits() - before, 8);
    assert_eq!(counts(id), (8, 8, 0));
    if !have_avx512() {
        return;
    }
    // A return handler writing EVEX state: its stub keeps zmm12 in full (beyond the
    // exit context's xmm0-1), zmm25 and k6.
    let exit_shim = symbol(lib, c"__tracer_probe_exit_evex");
    let mut req = entry(reg_pack_exit_evex, unsafe { &reg_pack_exit_evex_end }).with_exit();
    req.pack = Some(PackHandlers {
        entry: 0,
        exit: exit_shim,
        exit_timed: false,
        name: "test:pack_exit_evex",
    });
    let id = install(req);
    let stub = with(|i| i.pack_stub(exit_shim, exit_keeps).expect("stub").clone());
    let want = Saves {
        low: 1 << 12,
        zmm16: 1 << (25 - 16),
        masks: 1 << 6,
    };
    assert_eq!(stub.saves, want, "{}", stub.analysis.clobbers);
    let before = hits();
    for seed in [240, 250] {
        assert_exact(check_calls(
            "exit, pack handler writing EVEX state",
            reg_pack_exit_evex,
            unsafe { &reg_pack_exit_evex_seen },
            8,
            seed,
        ));
    }
    assert_eq!(hits() - before, 8);
    assert_eq!(counts(id), (8, 8, 0));
}
