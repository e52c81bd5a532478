//! Trampoline code generation.
//!
//! The rule every trampoline keeps: at entry and at return it leaves every register and
//! the stack at and above `rsp` exactly as the original code would have, except what a
//! handler deliberately changes through its context. Only the flags may change, and only
//! at a call boundary (function entry and return); at an offset probe they are kept too.
//! A caller of a function it binds locally (GCC's `-fipa-ra`) may keep values in any
//! call-clobbered register across the call, pass values in any register, and call with
//! `rsp` not 16-byte aligned (`-fipa-stack-alignment`): nothing may be assumed free or
//! aligned. Scratch registers are saved below `rsp`, which at a function entry is the
//! callee's red zone, not yet used, and after a return the dead callee frame; at an
//! offset probe the red zone is live and skipped. Frames are aligned at run time.
//!
//! An entry trampoline, reached by the `jmp rel32` written over a probe site:
//!
//! ```text
//! [inline counting fast path, probes without handlers]
//! mov [rsp-16], rbx ; mov rbx, rsp ; the site's rsp, kept across the call
//! lea rsp, [rsp-FRAME-16] ; and rsp, -64
//! save rax rcx rdx rsi rdi r8-r11, the vector state (see below) ; ctx.rsp, ctx.xmm
//! movabs rdi, probe ; mov rsi, rsp
//! call on_entry                 ; rel32 / [rip+slot] / abs32 / abs64, by reach
//! restore them ; mov rsp, rbx ; mov rbx, [rsp-16]
//! <relocated stolen instructions>
//! jmp  site+len                 ; always rel32: the block is near the site
//! ```
//!
//! Vector registers: the Rust code called (the agent, and handlers, which may run
//! anything: `f32::mul_add` calls libm's `fmaf`, VEX-encoded, which zeroes the upper half
//! of `ymm0`; glibc's string functions end in `vzeroupper`) may change any of `xmm0-15`
//! and, through VEX code, the upper halves of `ymm0-15`. On a CPU with AVX-512, glibc
//! picks EVEX and AVX-512 variants of `memcpy`, `memset`, `strlen`, `memcmp`..., which
//! use `ymm16-31`/`zmm16-31` and the mask registers `k0-7`; and a caller built with
//! `-mavx512f -fipa-ra` keeps values in all of `zmm0-31` and in `k` registers across a call
//! to a function it knows touches none. So the general paths save what the OS enabled
//! ([`Vectors`]): all of `zmm0-31` (`vmovdqa64`) and `k0-7` (`kmovq`) with AVX-512, all of
//! `ymm0-15` (`vmovdqu`) with AVX, `xmm0-15` otherwise. A VEX `ymm` load would zero bits
//! 256-511 of a `zmm`: with AVX-512 every restore, the context's registers included, is
//! EVEX. Legacy-SSE instructions (`movaps`, and the agent's own code, compiled for
//! baseline x86-64) leave the upper halves alone.
//!
//! The exit trampoline is shared by all exit probes. A probed function returns into it
//! with `rsp` one above its return slot, aligned or not; it saves every call-clobbered
//! register, calls `on_exit`, which hands back the real return address, restores and
//! jumps there.
//!
//! Probes whose handlers are a pack's do not go through the agent's Rust code: the
//! trampoline keeps the guard, count and panic flag inline and calls the handler through
//! the probe's slot (`emit_pack_entry`, and the inline exit path of `emit_fast_entry` for
//! exit probes). What the Rust code may change does not apply there: the slot holds the
//! handler's shim, or its stub (`emit_pack_stub`, `emit_pack_direct_stub`) saving the
//! vector registers `crate::clobbers` found the handler's code can write.

use crate::clobbers::Saves;
use crate::dispatch::{self, Probe};
use crate::emitter::{CallEncoding, EmitError, Emitter, Label};
use crate::jit::JitError;
use crate::relocator::{self, Relocated, Stolen};
use crate::thread_state::layout as tl;
use iced_x86::code_asm::*;
use probes::abi::shared::{flags, Counts, ProbeCounters, Shard};
use probes::context::{entry_layout as el, exit_layout as xl, offset_layout as ol};
use std::mem::offset_of;

/// What the entry trampoline emission produced.
#[derive(Debug, Clone)]
pub struct EntryTrampoline {
    /// How the trampoline reaches `on_entry`.
    pub encoding: CallEncoding,
    /// The relocated instructions, at their new address.
    pub relocated: Relocated,
}

pub(crate) const GPRS: [AsmRegister64; 8] = [rdi, rsi, rdx, rcx, r8, r9, rax, r10];

/// Emit an entry trampoline for `probe` at the emitter's address.
pub fn emit_entry(
    e: &mut Emitter,
    probe: *const Probe,
    stolen: &Stolen,
    path: EntryPath,
    v: Vectors,
) -> Result<EntryTrampoline, JitError> {
    let tail = e.label();
    let mut cold = None;
    let encoding = match path {
        EntryPath::Fast(f) => {
            emit_fast_entry(e, probe, f, tail)?;
            emit_entry_general(e, probe, v)?
        }
        EntryPath::Pack(p) => {
            let (encoding, skipped) = emit_pack_entry(e, probe, p)?;
            cold = Some((p, skipped));
            encoding
        }
        EntryPath::General => emit_entry_general(e, probe, v)?,
    };
    e.bind(tail);
    let relocated = emit_stolen(e, stolen)?;
    // The pack path's rare cases go after the relocated code, so that its hit path
    // falls through into it: one taken jump less per hit.
    if let Some((p, skipped)) = cold {
        emit_pack_entry_skipped(e, p, skipped, tail)?;
    }
    Ok(EntryTrampoline {
        encoding,
        relocated,
    })
}

const XMMS: [AsmRegisterXmm; 16] = [
    xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14,
    xmm15,
];

const YMMS: [AsmRegisterYmm; 16] = [
    ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14,
    ymm15,
];

const ZMMS: [AsmRegisterZmm; 32] = [
    zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13, zmm14,
    zmm15, zmm16, zmm17, zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26, zmm27,
    zmm28, zmm29, zmm30, zmm31,
];

const KS: [AsmRegisterK; 8] = [k0, k1, k2, k3, k4, k5, k6, k7];

/// The vector state the OS enabled (XCR0), which decides what trampolines keep across
/// the code they call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    /// `xmm0-15`.
    Sse,
    /// `ymm0-15`.
    Avx,
    /// `zmm0-31` and `k0-7`. `bw`: the CPU has AVX512BW, whose masks are 64 bits wide
    /// (else 16: `kmovw`).
    Avx512 { bw: bool },
}

impl Vectors {
    pub fn avx512(self) -> bool {
        matches!(self, Vectors::Avx512 { .. })
    }

    /// Bytes one register of 0-15 takes when kept in full.
    fn width(self) -> i32 {
        match self {
            Vectors::Sse => 16,
            Vectors::Avx => 32,
            Vectors::Avx512 { .. } => 64,
        }
    }
}

/// Where the general paths keep `rbx` below the site's `rsp` (above the frame): at an
/// entry `[rsp-8]` is free too, after a return it receives the real return address.
const RBX_SLOT: i32 = -16;

/// Bytes of the AVX-512 save area: `zmm0-31`, then `k0-7` (8 bytes each).
const AVX512_AREA: usize = 32 * 64 + 8 * 8;

/// The size of a general-path frame whose layout takes `base` bytes: with AVX-512 the
/// `zmm` and `k` registers are kept above it, 64-byte aligned, instead of in its `ymm`
/// area.
pub(crate) fn frame_size(base: usize, v: Vectors) -> usize {
    match v {
        Vectors::Avx512 { .. } => base.next_multiple_of(64) + AVX512_AREA,
        _ => base,
    }
}

/// Open a general-path frame of `frame` bytes: `rbx` (callee-saved, so the Rust code
/// keeps it) holds the site's `rsp` and its own value waits below that `rsp`, above the
/// frame; `rsp` is aligned to 64 at run time (the `zmm` saves), whatever it was.
/// Restoring `rsp` from a register rather than from memory keeps loads off the chain of
/// `rsp` values.
pub(crate) fn open_frame(a: &mut CodeAssembler, frame: usize) -> Result<(), iced_x86::IcedError> {
    a.mov(qword_ptr(rsp + RBX_SLOT), rbx)?;
    a.mov(rbx, rsp)?;
    a.lea(rsp, qword_ptr(rsp - (frame as i32 - RBX_SLOT)))?;
    a.and(rsp, -64)
}

pub(crate) fn close_frame(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(rsp, rbx)?;
    a.mov(rbx, qword_ptr(rsp + RBX_SLOT))
}

/// Save every vector register the called Rust code may change: with AVX-512 all of
/// `zmm0-31` and `k0-7` above the frame's layout of `base` bytes (see [`frame_size`]),
/// else all of `ymm0-15` at `rsp + area` (32-byte aligned) when the OS enabled AVX, else
/// `xmm0-15`; then copy the registers the handler's context shows, `(register, offset)`,
/// into it.
pub(crate) fn save_vectors(
    a: &mut CodeAssembler,
    v: Vectors,
    area: usize,
    base: usize,
    ctx: &[(usize, usize)],
) -> Result<(), iced_x86::IcedError> {
    match v {
        Vectors::Avx512 { bw } => {
            let z = base.next_multiple_of(64);
            for (i, r) in ZMMS.iter().enumerate() {
                a.vmovdqa64(zmmword_ptr(rsp + z + 64 * i), *r)?;
            }
            for (i, k) in KS.iter().enumerate() {
                let at = rsp + z + 32 * 64 + 8 * i;
                if bw {
                    a.kmovq(qword_ptr(at), *k)?;
                } else {
                    a.kmovw(word_ptr(at), *k)?;
                }
            }
        }
        Vectors::Avx => {
            for (i, r) in YMMS.iter().enumerate() {
                a.vmovdqu(ymmword_ptr(rsp + area + 32 * i), *r)?;
            }
        }
        Vectors::Sse => {
            for (i, r) in XMMS.iter().enumerate() {
                a.movaps(xmmword_ptr(rsp + area + 16 * i), *r)?;
            }
        }
    }
    for &(r, off) in ctx {
        if v == Vectors::Sse {
            a.movaps(xmmword_ptr(rsp + off), XMMS[r])?;
        } else {
            a.vmovaps(xmmword_ptr(rsp + off), XMMS[r])?;
        }
    }
    Ok(())
}

/// Undo [`save_vectors`], taking the context's registers from the context (a handler may
/// have changed them) and the rest, upper halves included, from the save area.
pub(crate) fn restore_vectors(
    a: &mut CodeAssembler,
    v: Vectors,
    area: usize,
    base: usize,
    ctx: &[(usize, usize)],
) -> Result<(), iced_x86::IcedError> {
    match v {
        Vectors::Avx512 { bw } => {
            let z = base.next_multiple_of(64);
            for (i, r) in ZMMS.iter().enumerate() {
                a.vmovdqa64(*r, zmmword_ptr(rsp + z + 64 * i))?;
            }
            for (i, k) in KS.iter().enumerate() {
                let at = rsp + z + 32 * 64 + 8 * i;
                if bw {
                    a.kmovq(*k, qword_ptr(at))?;
                } else {
                    a.kmovw(*k, word_ptr(at))?;
                }
            }
        }
        Vectors::Avx => {
            for (i, r) in YMMS.iter().enumerate() {
                a.vmovdqu(*r, ymmword_ptr(rsp + area + 32 * i))?;
            }
        }
        Vectors::Sse => {
            for (i, r) in XMMS.iter().enumerate() {
                a.movaps(*r, xmmword_ptr(rsp + area + 16 * i))?;
            }
        }
    }
    // The lower 128 bits only: the rest was just restored (an EVEX insert keeps bits
    // 256-511, a VEX one would zero them).
    for &(r, off) in ctx {
        match v {
            Vectors::Avx512 { .. } => {
                a.vinserti32x4(ZMMS[r], ZMMS[r], xmmword_ptr(rsp + off), 0)?
            }
            Vectors::Avx => a.vinsertf128(YMMS[r], YMMS[r], xmmword_ptr(rsp + off), 0)?,
            Vectors::Sse => a.movaps(XMMS[r], xmmword_ptr(rsp + off))?,
        }
    }
    Ok(())
}

/// The vector registers in the entry context, with their offsets.
pub(crate) const ENTRY_CTX_XMM: [(usize, usize); 8] = [
    (0, el::XMM),
    (1, el::XMM + 16),
    (2, el::XMM + 32),
    (3, el::XMM + 48),
    (4, el::XMM + 64),
    (5, el::XMM + 80),
    (6, el::XMM + 96),
    (7, el::XMM + 112),
];

/// The general entry path: every call-clobbered register saved in a frame aligned at run
/// time (the context the handler sees, `r11`, the vector registers), then `on_entry`.
/// Ends with every register and `rsp` as at the site, the vector state `v` in full.
fn emit_entry_general(
    e: &mut Emitter,
    probe: *const Probe,
    v: Vectors,
) -> Result<CallEncoding, EmitError> {
    e.asm(|a| {
        open_frame(a, frame_size(el::FRAME, v))?;
        a.mov(qword_ptr(rsp + el::RSP), rbx)?;
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(qword_ptr(rsp + el::GPRS + 8 * i), *r)?;
        }
        a.mov(qword_ptr(rsp + el::R11), r11)?;
        save_vectors(a, v, el::VECTORS, el::FRAME, &ENTRY_CTX_XMM)?;
        a.mov(rdi, probe as u64)?;
        a.mov(rsi, rsp)
    })?;
    let on_entry = dispatch::on_entry as *const () as u64;
    let encoding = e.call(on_entry)?;
    e.asm(|a| {
        restore_vectors(a, v, el::VECTORS, el::FRAME, &ENTRY_CTX_XMM)?;
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(*r, qword_ptr(rsp + el::GPRS + 8 * i))?;
        }
        a.mov(r11, qword_ptr(rsp + el::R11))?;
        close_frame(a)
    })?;
    Ok(encoding)
}

/// The call-clobbered registers besides `rax rdx` (in the context), in the order of
/// `exit_layout::GPRS`.
const EXIT_GPRS: [AsmRegister64; 7] = [rcx, rsi, rdi, r8, r9, r10, r11];

/// The vector registers in the exit context, with their offsets.
const EXIT_CTX_XMM: [(usize, usize); 2] = [(0, xl::XMM0), (1, xl::XMM1)];

/// Emit the shared exit trampoline; returns how it reaches `on_exit`. It keeps the
/// vector state `v` in full.
pub fn emit_exit(e: &mut Emitter, tls: Option<i32>, v: Vectors) -> Result<CallEncoding, EmitError> {
    if let Some(tls) = tls {
        let general = e.label();
        emit_fast_exit(e, tls, general)?;
        e.bind(general);
    }
    e.asm(|a| {
        // rsp is one above the popped return slot, [rsp-8], where the real return
        // address goes at the end (rbx's value waits right below it).
        open_frame(a, frame_size(xl::FRAME, v))?;
        a.mov(qword_ptr(rsp + xl::RAX), rax)?;
        a.mov(qword_ptr(rsp + xl::RDX), rdx)?;
        for (i, r) in EXIT_GPRS.iter().enumerate() {
            a.mov(qword_ptr(rsp + xl::GPRS + 8 * i), *r)?;
        }
        save_vectors(a, v, xl::VECTORS, xl::FRAME, &EXIT_CTX_XMM)?;
        a.mov(rdi, rsp)?;
        a.lea(rsi, qword_ptr(rbx - 8))
    })?;
    let on_exit = dispatch::on_exit as *const () as u64;
    let encoding = e.call(on_exit)?;
    e.asm(|a| {
        a.mov(qword_ptr(rbx - 8), rax)?;
        restore_vectors(a, v, xl::VECTORS, xl::FRAME, &EXIT_CTX_XMM)?;
        a.mov(rax, qword_ptr(rsp + xl::RAX))?;
        a.mov(rdx, qword_ptr(rsp + xl::RDX))?;
        for (i, r) in EXIT_GPRS.iter().enumerate() {
            a.mov(*r, qword_ptr(rsp + xl::GPRS + 8 * i))?;
        }
        close_frame(a)?;
        // An indirect jump rather than `ret`: the probed function's own `ret` already
        // consumed the return-stack-buffer entry of its call, so a second `ret` would
        // mispredict every time, while this jump's target is predicted from history.
        // The slot is 8 bytes below rsp, inside the red zone, which signal delivery
        // skips.
        a.jmp(qword_ptr(rsp - 8))
    })?;
    Ok(encoding)
}

/// The 5-byte `jmp rel32` written at `site` to enter a trampoline at `target`.
pub fn patch_bytes(site: u64, target: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from(target.wrapping_sub(site + 5) as i64).ok()?;
    let mut p = [0xe9, 0, 0, 0, 0];
    p[1..].copy_from_slice(&rel.to_le_bytes());
    Some(p)
}

/// Which entry path a trampoline gets besides the general one.
#[derive(Clone, Copy, Debug)]
pub enum EntryPath {
    /// Counting inline, for probes without handlers.
    Fast(FastEntry),
    /// A pack handler called straight from the trampoline, for entry probes whose only
    /// handler is a pack's (see [`emit_pack_entry`]).
    Pack(PackEntry),
    /// Only the general path (into `dispatch::on_entry`).
    General,
}

/// What the direct pack-handler path needs.
#[derive(Clone, Copy, Debug)]
pub struct PackEntry {
    /// The thread state's offset from the thread pointer.
    pub tls: i32,
    pub counters: *const ProbeCounters,
    /// The `HitInfo` handed to the shim, one per probe, alive forever.
    pub hit: *const probes::pack::abi::HitInfo,
}

/// The low halves of the vector registers the direct pack path keeps itself (in the
/// entry context): a handler's stub need not save them again.
pub const PACK_ENTRY_KEEPS: u16 = 0x00ff;
/// The stub kind of a probe's `pack_entry_direct` slot (see [`emit_pack_direct_stub`]).
pub const PACK_ENTRY_DIRECT: u16 = 0;
/// The same for the exit context (`xmm0-1`); the exit path goes through the general
/// frame, which saves all of them anyway.
pub const PACK_EXIT_KEEPS: u16 = 0x0003;

/// The direct path of an entry probe whose only handler is a pack's: what
/// `dispatch::on_entry` and `run_shim` do (re-entrancy guard, enabled flag, sharded count,
/// the call, a panic disabling the probe), inline, with one call: to the probe's slot,
/// which holds the handler's stub (see [`emit_pack_stub`]). The stub saves the vector
/// registers the handler's code can write beyond `xmm0-7`; this path keeps every
/// call-clobbered GPR and `xmm0-7` in the entry context, which the handler sees and may
/// change, and reloads `xmm0-7` with legacy-SSE loads, which keep the upper halves.
/// Returns how the stub is reached (through the slot, `[rax+disp]`) and where the hit
/// path leaves for its rare cases, which the caller places after the relocated code (see
/// [`emit_pack_entry_skipped`]); the hit path itself falls through to what follows.
fn emit_pack_entry(
    e: &mut Emitter,
    probe: *const Probe,
    p: PackEntry,
) -> Result<(CallEncoding, PackSkipped), EmitError> {
    let skipped = e.label();
    let off = e.label();
    let busy = p.tls + tl::BUSY;
    // The guard is read straight through `fs`, before any register is borrowed.
    e.bytes(&cmp_fs_zero(busy));
    e.jcc_label(CC_NE, skipped);
    e.asm(|a| a.mov(qword_ptr(rsp + ENTRY_R11), r11))?;
    e.asm(|a| {
        a.mov(r11, p.counters as u64)?;
        a.test(byte_ptr(r11 + C_FLAGS), flags::ENABLED)
    })?;
    e.jcc_label(CC_E, off);
    emit_count(e, r11, C_HITS, SCRATCH_RAX, ENTRY_RAX)?;
    e.asm(|a| a.mov(r11, qword_ptr(rsp + ENTRY_R11)))?;
    emit_pack_entry_call(e, probe, p)?;
    Ok((CallEncoding::RipSlot, PackSkipped { skipped, off }))
}

/// Where [`emit_pack_entry`]'s hit path leaves for its rare cases: the thread is inside a
/// handler (`skipped`: count it), the probe is disabled (`off`, `r11` kept below `rsp`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackSkipped {
    skipped: Label,
    off: Label,
}

/// The rare cases of [`emit_pack_entry`], placed after the relocated code; both go back
/// to `tail` with every register as at the site.
fn emit_pack_entry_skipped(
    e: &mut Emitter,
    p: PackEntry,
    s: PackSkipped,
    tail: Label,
) -> Result<(), EmitError> {
    e.bind(s.skipped);
    e.asm(|a| a.mov(qword_ptr(rsp + ENTRY_R11), r11))?;
    e.asm(|a| {
        a.mov(r11, p.counters as u64)?;
        a.lock().inc(qword_ptr(r11 + C_SKIPPED))
    })?;
    e.bind(s.off);
    e.asm(|a| a.mov(r11, qword_ptr(rsp + ENTRY_R11)))?;
    e.jmp_label(tail);
    Ok(())
}

const P_PACK_ENTRY_DIRECT: i32 = offset_of!(Probe, pack_entry_direct) as i32;
const P_PACK_EXIT: i32 = offset_of!(Probe, pack_exit) as i32;
const P_PACK_EXIT_TIMED: i32 = offset_of!(Probe, pack_exit_timed) as i32;
const C_PANICS: i32 = offset_of!(ProbeCounters, panics) as i32;

/// With every register as at the site (`rsp` too), hit counted: call the entry handler
/// through the probe's direct slot with the entry context, under the re-entrancy guard,
/// and come back with every register as the handler's context says. The context's
/// general-purpose registers (and `r11`) are kept here, stores and loads being cheaper
/// than a call level; the slot holds the shim itself, or, when the handler uses the
/// float arguments or writes vector registers, its stub (see [`emit_pack_direct_stub`]).
fn emit_pack_entry_call(
    e: &mut Emitter,
    probe: *const Probe,
    p: PackEntry,
) -> Result<(), EmitError> {
    let busy = p.tls + tl::BUSY;
    e.asm(|a| {
        open_frame(a, el::FRAME)?;
        a.mov(qword_ptr(rsp + el::RSP), rbx)?;
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(qword_ptr(rsp + el::GPRS + 8 * i), *r)?;
        }
        a.mov(qword_ptr(rsp + el::R11), r11)
    })?;
    e.bytes(&mov_fs_imm(busy, 1));
    emit_shim_call(e, probe, p.hit, P_PACK_ENTRY_DIRECT, busy, p.counters)?;
    e.asm(|a| {
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(*r, qword_ptr(rsp + el::GPRS + 8 * i))?;
        }
        a.mov(r11, qword_ptr(rsp + el::R11))?;
        close_frame(a)
    })
}

/// What a direct stub does around a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectStub {
    /// Fill `xmm0-7` into the context before and reload their low halves after (the
    /// handler reads or writes the float arguments).
    pub floats: bool,
    /// Vector state to keep.
    pub vectors: Saves,
}

impl DirectStub {
    /// Nothing to do: the slot can hold the shim itself.
    pub fn bare(&self) -> bool {
        !self.floats && self.vectors.is_empty()
    }
}

/// A pack entry handler's stub for trampolines calling it directly (the probe's
/// `pack_entry_direct` slot), with the shim's own arguments: fills the context's float
/// arguments when the handler uses them, keeps the vector registers the handler's code
/// writes beyond those, calls the shim. Shared by every probe running the handler.
pub fn emit_pack_direct_stub(
    e: &mut Emitter,
    shim: u64,
    s: DirectStub,
    v: Vectors,
) -> Result<CallEncoding, EmitError> {
    // Entered 8 off a 16-byte boundary; `push rbx` aligns, the frame keeps it.
    let frame = (vector_set_bytes(s.vectors, v) + 15) & !15;
    e.asm(|a| {
        a.push(rbx)?;
        a.mov(rbx, rdi)?;
        if s.floats {
            for &(r, off) in &ENTRY_CTX_XMM {
                a.movaps(xmmword_ptr(rbx + off), XMMS[r])?;
            }
        }
        if frame > 0 {
            a.sub(rsp, frame)?;
        }
        store_vector_set(a, s.vectors, v)
    })?;
    let encoding = e.call(shim)?;
    e.asm(|a| {
        load_vector_set(a, s.vectors, v)?;
        if frame > 0 {
            a.add(rsp, frame)?;
        }
        // Legacy-SSE loads: the upper halves (bits 128-511) stay as they are (restored
        // above when the handler changes them).
        if s.floats {
            for &(r, off) in &ENTRY_CTX_XMM {
                a.movaps(XMMS[r], xmmword_ptr(rbx + off))?;
            }
        }
        a.pop(rbx)?;
        a.ret()
    })?;
    Ok(encoding)
}

/// Call the pack shim in the probe's `slot` with the context at `rsp` and `hit`, the
/// thread already marked busy; then clear the mark (`busy`: its offset from the thread
/// pointer) and disable the probe if the shim reports a panic.
fn emit_shim_call(
    e: &mut Emitter,
    probe: *const Probe,
    hit: *const probes::pack::abi::HitInfo,
    slot: i32,
    busy: i32,
    counters: *const ProbeCounters,
) -> Result<(), EmitError> {
    e.asm(|a| {
        a.mov(rdi, rsp)?;
        a.mov(rsi, hit as u64)?;
        a.mov(rax, probe as u64)?;
        a.call(qword_ptr(rax + slot))
    })?;
    e.bytes(&mov_fs_imm(busy, 0));
    emit_panic_check(e, counters)
}

/// After a shim returned `eax`: when it reports a panic (caught in the pack), disable
/// the probe and count, as `Probe::panicked` does. Clobbers `r11` and the flags.
fn emit_panic_check(e: &mut Emitter, counters: *const ProbeCounters) -> Result<(), EmitError> {
    let ok = e.label();
    e.asm(|a| a.cmp(eax, probes::pack::abi::SHIM_PANICKED as i32))?;
    e.jcc_label(CC_NE, ok);
    e.asm(|a| {
        a.mov(r11, counters as u64)?;
        a.lock().inc(qword_ptr(r11 + C_PANICS))?;
        a.lock()
            .and(dword_ptr(r11 + C_FLAGS), !flags::ENABLED as i32)?;
        a.lock()
            .or(dword_ptr(r11 + C_FLAGS), flags::DISABLED_BY_PANIC as i32)
    })?;
    e.bind(ok);
    Ok(())
}

/// Right after a pack exit probe's body returned into its trampoline (`rsp` one above
/// the popped return slot, every register as the body left it), its shadow entry on top
/// and the exit counted: pop the entry, call the return handler through the probe's slot
/// with the exit context (the time since the entry when the entry took it), and return
/// where the context says, every register as the context and the body left them.
fn emit_pack_exit_call(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    x: PackExit,
) -> Result<(), EmitError> {
    let untimed = e.label();
    let busy = f.tls + tl::BUSY;
    e.asm(save_exit_context)?;
    emit_exit_context_from_shadow(e, f.tls, x.id)?;
    // The entry took no timestamp: the handler does not read the time.
    e.jcc_label(CC_E, untimed);
    e.asm(|a| store_duration(a, x.tsc_scale))?;
    e.bind(untimed);
    e.asm(|a| a.mov(qword_ptr(r11 + tl::BUSY), 1))?;
    emit_shim_call(e, probe, x.hit, P_PACK_EXIT, busy, f.counters)?;
    e.asm(restore_exit_context_and_return)
}

const X_DURATION: i32 = offset_of!(probes::ExitContext, duration_ns) as i32;
const X_ENTRY_RSP: i32 = offset_of!(probes::ExitContext, entry_rsp) as i32;
const X_PROBE: i32 = offset_of!(probes::ExitContext, probe) as i32;

/// Open the exit context's frame and store what the body returned with into it.
fn save_exit_context(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    open_frame(a, xl::FRAME)?;
    a.mov(qword_ptr(rsp + xl::RAX), rax)?;
    a.mov(qword_ptr(rsp + xl::RDX), rdx)?;
    for (i, r) in EXIT_GPRS.iter().enumerate() {
        a.mov(qword_ptr(rsp + xl::GPRS + 8 * i), *r)?;
    }
    a.movaps(xmmword_ptr(rsp + xl::XMM0), xmm0)?;
    a.movaps(xmmword_ptr(rsp + xl::XMM1), xmm1)
}

/// Pop this thread's top shadow entry into the exit context (return address, entry
/// `rsp`, probe id, no duration yet), leaving `r11` = the thread's state, `rcx` = the
/// entry's timestamp and the flags of `test rcx, rcx` (zero: none taken).
fn emit_exit_context_from_shadow(e: &mut Emitter, tls: i32, id: u32) -> Result<(), EmitError> {
    e.bytes(&MOV_R11_FS0);
    e.asm(|a| {
        a.lea(r11, qword_ptr(r11 + tls))?;
        a.mov(rcx, qword_ptr(r11 + tl::DEPTH))?;
        a.dec(rcx)?;
        a.shl(rcx, tl::ENTRY_SHIFT)?;
        a.add(rcx, qword_ptr(r11 + tl::SHADOW))?;
        a.mov(rax, qword_ptr(rcx + tl::E_RETURN_ADDRESS))?;
        a.mov(qword_ptr(rsp + xl::RETURN_ADDRESS), rax)?;
        a.mov(rax, qword_ptr(rcx + tl::E_ENTRY_RSP))?;
        a.mov(qword_ptr(rsp + X_ENTRY_RSP), rax)?;
        a.mov(dword_ptr(rsp + X_PROBE), id)?;
        a.mov(qword_ptr(rsp + X_DURATION), 0)?;
        a.mov(qword_ptr(rcx + tl::E_ENTRY_RSP), 0)?;
        a.mov(rcx, qword_ptr(rcx + tl::E_TSC))?;
        // Read, and marked free, before it is released: a signal handler may push over
        // it from then on.
        a.dec(qword_ptr(r11 + tl::DEPTH))?;
        a.test(rcx, rcx)
    })
}

/// The time since the entry's timestamp (`rcx`), in ns, into the exit context.
/// Clobbers `rax`, `rdx` and the flags.
fn store_duration(a: &mut CodeAssembler, tsc_scale: u64) -> Result<(), iced_x86::IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, rcx)?;
    // ns = ticks * scale >> 32, as `dispatch::ticks_to_ns`.
    a.mov(rdx, tsc_scale)?;
    a.mul(rdx)?;
    a.shrd(rax, rdx, 32)?;
    a.mov(qword_ptr(rsp + X_DURATION), rax)
}

/// Back from the handler: every register as the context says, and return where it says
/// (the handler may redirect the return).
fn restore_exit_context_and_return(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    // The return address the handler left, into the popped slot, for the `ret` below.
    a.mov(rax, qword_ptr(rsp + xl::RETURN_ADDRESS))?;
    a.mov(qword_ptr(rbx - 8), rax)?;
    a.movaps(xmm0, xmmword_ptr(rsp + xl::XMM0))?;
    a.movaps(xmm1, xmmword_ptr(rsp + xl::XMM1))?;
    a.mov(rax, qword_ptr(rsp + xl::RAX))?;
    a.mov(rdx, qword_ptr(rsp + xl::RDX))?;
    for (i, r) in EXIT_GPRS.iter().enumerate() {
        a.mov(*r, qword_ptr(rsp + xl::GPRS + 8 * i))?;
    }
    close_frame(a)?;
    // Pops the caller's own return-stack entry: predicted.
    a.lea(rsp, qword_ptr(rsp + RET_SLOT))?;
    a.ret()
}

/// Bytes [`store_vector_set`] stores.
fn vector_set_bytes(s: Saves, v: Vectors) -> i32 {
    let s = s.for_state(v);
    v.width() * s.low.count_ones() as i32
        + 64 * s.zmm16.count_ones() as i32
        + 8 * s.masks.count_ones() as i32
}

/// One move of the pack stubs' save area at `rsp`: a register of `s`, in the order
/// registers 0-15 in full (`zmm` with AVX-512, `ymm` with AVX, else `xmm`), `zmm16-31`,
/// `k0-7`. `store`: into the area, else back from it.
fn move_vector_set(
    a: &mut CodeAssembler,
    s: Saves,
    v: Vectors,
    store: bool,
) -> Result<(), iced_x86::IcedError> {
    let s = s.for_state(v);
    let mut at = 0;
    for r in (0..16).filter(|i| s.low & (1 << i) != 0) {
        let m = rsp + at;
        match (v, store) {
            (Vectors::Avx512 { .. }, true) => a.vmovdqu64(zmmword_ptr(m), ZMMS[r])?,
            (Vectors::Avx512 { .. }, false) => a.vmovdqu64(ZMMS[r], zmmword_ptr(m))?,
            (Vectors::Avx, true) => a.vmovdqu(ymmword_ptr(m), YMMS[r])?,
            (Vectors::Avx, false) => a.vmovdqu(YMMS[r], ymmword_ptr(m))?,
            (Vectors::Sse, true) => a.movups(xmmword_ptr(m), XMMS[r])?,
            (Vectors::Sse, false) => a.movups(XMMS[r], xmmword_ptr(m))?,
        }
        at += v.width();
    }
    for r in (0..16).filter(|i| s.zmm16 & (1 << i) != 0) {
        let (m, z) = (rsp + at, ZMMS[16 + r]);
        if store {
            a.vmovdqu64(zmmword_ptr(m), z)?;
        } else {
            a.vmovdqu64(z, zmmword_ptr(m))?;
        }
        at += 64;
    }
    let bw = matches!(v, Vectors::Avx512 { bw: true });
    for r in (0..8).filter(|i| s.masks & (1 << i) != 0) {
        let (m, k) = (rsp + at, KS[r]);
        match (bw, store) {
            (true, true) => a.kmovq(qword_ptr(m), k)?,
            (true, false) => a.kmovq(k, qword_ptr(m))?,
            (false, true) => a.kmovw(word_ptr(m), k)?,
            (false, false) => a.kmovw(k, word_ptr(m))?,
        }
        at += 8;
    }
    Ok(())
}

/// Store the vector state `s` at `rsp` (the pack stubs' save area, of
/// [`vector_set_bytes`], sized by the caller).
fn store_vector_set(
    a: &mut CodeAssembler,
    s: Saves,
    v: Vectors,
) -> Result<(), iced_x86::IcedError> {
    move_vector_set(a, s, v, true)
}

/// Load back what [`store_vector_set`] stored.
fn load_vector_set(a: &mut CodeAssembler, s: Saves, v: Vectors) -> Result<(), iced_x86::IcedError> {
    move_vector_set(a, s, v, false)
}

/// A pack handler's stub, shared by every probe running the handler: saves the vector
/// state in `save` (see [`Saves`]), calls the shim, restores it. An ordinary function
/// with the shim's signature; the slots of probes hold it instead of the shim. `save`
/// comes from `crate::clobbers`: what the handler's code can write that its caller does
/// not keep itself.
pub fn emit_pack_stub(
    e: &mut Emitter,
    shim: u64,
    save: Saves,
    v: Vectors,
) -> Result<CallEncoding, EmitError> {
    // Entered with rsp 8 off a 16-byte boundary: the call below gets it aligned.
    let frame = 8 + ((vector_set_bytes(save, v) + 15) & !15);
    e.asm(|a| {
        a.sub(rsp, frame)?;
        store_vector_set(a, save, v)
    })?;
    let encoding = e.call(shim)?;
    e.asm(|a| {
        load_vector_set(a, save, v)?;
        a.add(rsp, frame)?;
        a.ret()
    })?;
    Ok(encoding)
}

/// What the inline fast path of a probe without handlers (or with only a pack's, for
/// exit probes: see [`PackExit`]) needs.
#[derive(Clone, Copy, Debug)]
pub struct FastEntry {
    /// The thread state's offset from the thread pointer.
    pub tls: i32,
    pub counters: *const ProbeCounters,
    /// The exit trampoline when returns are probed, else 0.
    pub exit_trampoline: u64,
    /// Exit probes whose handlers are a pack's: they run from this path too.
    pub pack: Option<PackExit>,
}

/// What an exit probe with pack handlers needs on the inline path.
#[derive(Clone, Copy, Debug)]
pub struct PackExit {
    /// The `HitInfo` handed to the shims, one per probe, alive forever.
    pub hit: *const probes::pack::abi::HitInfo,
    /// The probe's id, for `ExitContext::probe`.
    pub id: u32,
    /// `dispatch::tsc_scale()`: ns per timestamp tick, times 2^32.
    pub tsc_scale: u64,
}

/// `cmp qword ptr fs:[disp32], 0`.
fn cmp_fs_zero(disp: i32) -> [u8; 10] {
    let d = disp.to_le_bytes();
    [0x64, 0x48, 0x83, 0x3c, 0x25, d[0], d[1], d[2], d[3], 0]
}

/// `mov qword ptr fs:[disp32], imm` (sign-extended imm32).
fn mov_fs_imm(disp: i32, imm: i32) -> [u8; 13] {
    let (d, i) = (disp.to_le_bytes(), imm.to_le_bytes());
    [
        0x64, 0x48, 0xc7, 0x04, 0x25, d[0], d[1], d[2], d[3], i[0], i[1], i[2], i[3],
    ]
}

/// `mov r11, qword ptr fs:[0]`: the thread pointer.
const MOV_R11_FS0: [u8; 9] = [0x64, 0x4c, 0x8b, 0x1c, 0x25, 0, 0, 0, 0];

/// Condition nibbles for [`Emitter::jcc_label`].
const CC_E: u8 = 0x4;
const CC_NE: u8 = 0x5;
const CC_AE: u8 = 0x3;
const CC_BE: u8 = 0x6;

const C_HITS: i32 = offset_of!(ProbeCounters, hits) as i32;
const C_EXITS: i32 = offset_of!(ProbeCounters, exits) as i32;
const C_SKIPPED: i32 = offset_of!(ProbeCounters, skipped) as i32;
const C_FLAGS: i32 = offset_of!(ProbeCounters, flags) as i32;

/// Where shard `i` of a slot starts: `(i << SHARD_SHIFT) + SHARDS`, from its first line.
const SHARDS: i32 = std::mem::size_of::<ProbeCounters>() as i32;
const SHARD_SHIFT: u32 = 6;
const _: () = assert!(std::mem::size_of::<Shard>() == 1 << SHARD_SHIFT);
const _: () = assert!(offset_of!(Shard, hits) as i32 == C_HITS);
const _: () = assert!(offset_of!(Shard, exits) as i32 == C_EXITS);

/// A register the sharded count borrows.
#[derive(Clone, Copy)]
struct Scratch {
    r64: AsmRegister64,
    r32: AsmRegister32,
    /// Its number in ModRM.reg (0-7).
    num: u8,
}

const SCRATCH_RAX: Scratch = Scratch {
    r64: rax,
    r32: eax,
    num: 0,
};
const SCRATCH_RDX: Scratch = Scratch {
    r64: rdx,
    r32: edx,
    num: 2,
};

/// `mov r32, dword ptr fs:[disp32]` (absolute disp32 through a SIB byte, no base).
fn mov_r32_fs(num: u8, disp: i32) -> [u8; 8] {
    let d = disp.to_le_bytes();
    [0x64, 0x8b, (num & 7) << 3 | 4, 0x25, d[0], d[1], d[2], d[3]]
}

/// `lock inc` of the counter at `field` in the calling CPU's shard of the slot whose
/// first line `base` points at (see `crate::shared`), or of the first line's when the
/// process has no sharding. `scratch` is borrowed, kept at `[rsp + slot]`; only the
/// flags change.
fn emit_count(
    e: &mut Emitter,
    base: AsmRegister64,
    field: i32,
    scratch: Scratch,
    slot: i32,
) -> Result<(), EmitError> {
    let Some(s) = crate::shared::sharding() else {
        return e.asm(|a| a.lock().inc(qword_ptr(base + field)));
    };
    e.asm(|a| a.mov(qword_ptr(rsp + slot), scratch.r64))?;
    // The rseq cpu_id; a stale or negative value still picks a shard (masked), and the
    // locked increment keeps the total exact whichever it is.
    e.bytes(&mov_r32_fs(scratch.num, s.cpu_offset));
    e.asm(|a| {
        a.and(scratch.r32, s.mask() as i32)?;
        a.shl(scratch.r32, SHARD_SHIFT)?;
        a.lock()
            .inc(qword_ptr(base + scratch.r64 + (SHARDS + field)))?;
        a.mov(scratch.r64, qword_ptr(rsp + slot))
    })
}

/// Where the fast paths keep the registers they borrow, below `rsp`. At a function entry
/// that is the callee's red zone, not yet used; after a return it is the dead callee
/// frame (`[rsp-8]` the popped return slot). Signal delivery skips 128 bytes below `rsp`.
const ENTRY_RAX: i32 = -8;
const ENTRY_RCX: i32 = -16;
const ENTRY_R11: i32 = -24;
const ENTRY_RDX: i32 = -32;
/// After a return: the real return address, then the borrowed registers.
const RET_SLOT: i32 = -8;
const RET_RCX: i32 = -16;
const RET_RDI: i32 = -24;
const RET_R11: i32 = -32;
const RET_RAX: i32 = -40;

/// The counting-only hot path of a probe with no handler, done inline: what
/// `dispatch::on_entry` does for such a probe, without calling anything. Counters use
/// `lock inc` on the CPU's shard: exact with any number of threads (see `dispatch::bump`).
///
/// It borrows `r11 rax` (and `rcx rdx` for exit probes), keeping their values below `rsp`,
/// and changes only the flags, dead at a function entry. Cases the fast path does not
/// handle (shadow stack not mapped yet or full) fall through to the general path, which
/// calls `on_entry`, with every register as at the site; `tail` is where the relocated
/// instructions start.
pub(crate) fn emit_fast_entry(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    tail: Label,
) -> Result<(), EmitError> {
    let general = e.label();
    let skipped = e.label();
    let counters = f.counters as u64;
    e.asm(|a| a.mov(qword_ptr(rsp + ENTRY_R11), r11))?;
    e.bytes(&MOV_R11_FS0);
    if f.exit_trampoline == 0 {
        let done = e.label();
        e.asm(|a| a.cmp(qword_ptr(r11 + f.tls + tl::BUSY), 0))?;
        e.jcc_label(CC_NE, skipped);
        e.asm(|a| {
            a.mov(r11, counters)?;
            a.test(byte_ptr(r11 + C_FLAGS), flags::ENABLED)
        })?;
        e.jcc_label(CC_E, done);
        emit_count(e, r11, C_HITS, SCRATCH_RAX, ENTRY_RAX)?;
        e.bind(done);
        e.asm(|a| a.mov(r11, qword_ptr(rsp + ENTRY_R11)))?;
        e.jmp_label(tail);
    } else {
        emit_fast_exit_entry(e, probe, f, tail, skipped, general)?;
    }
    e.bind(skipped);
    e.asm(|a| {
        a.mov(r11, counters)?;
        a.lock().inc(qword_ptr(r11 + C_SKIPPED))?;
        a.mov(r11, qword_ptr(rsp + ENTRY_R11))
    })?;
    e.jmp_label(tail);
    e.bind(general);
    Ok(())
}

/// The entry half of a handler-less exit probe's fast path: count, push the shadow
/// entry, then call the body (see [`emit_fast_call_and_return`]). With `r11` = the thread
/// pointer on entry (its own value saved); goes to `skipped` inside a handler, to
/// `general` when the shadow stack needs the Rust path, every register restored.
fn emit_fast_exit_entry(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    tail: Label,
    skipped: Label,
    general: Label,
) -> Result<(), EmitError> {
    let disabled = e.label();
    let restore_to_general = e.label();
    emit_guard_and_enabled(e, f, skipped, disabled)?;
    emit_shadow_slot(e, restore_to_general)?;
    // Take the entry before filling it: a signal handler that hits a probe from here on
    // pushes above it. (Filled first and taken after, a push in between wrote over it
    // and the call later returned to the handler's caller.) A free entry's `entry_rsp`
    // is 0 (see `thread_state::pop`) until the fill below sets it last, so a handler's
    // probe never takes this one for a frame abandoned by `longjmp`.
    e.asm(|a| a.inc(qword_ptr(r11 + tl::DEPTH)))?;
    emit_count(e, rcx, C_HITS, SCRATCH_RDX, ENTRY_RDX)?;
    emit_fill_shadow_entry(e, probe)?;
    if f.pack.is_some() {
        emit_entry_timestamp(e)?;
    }
    emit_fast_call_and_return(e, probe, f, tail)?;
    e.bind(restore_to_general);
    emit_restore_scratch(e)?;
    e.jmp_label(general);
    e.bind(disabled);
    emit_restore_scratch(e)?;
    e.jmp_label(tail);
    Ok(())
}

/// With `r11` = the thread pointer: `r11` = this thread's state, to `skipped` inside a
/// handler; `rax rcx` saved at their entry slots, `rcx` = the counters, to `disabled`
/// when the probe is.
fn emit_guard_and_enabled(
    e: &mut Emitter,
    f: FastEntry,
    skipped: Label,
    disabled: Label,
) -> Result<(), EmitError> {
    e.asm(|a| {
        a.lea(r11, qword_ptr(r11 + f.tls))?;
        a.cmp(qword_ptr(r11 + tl::BUSY), 0)
    })?;
    e.jcc_label(CC_NE, skipped);
    e.asm(|a| {
        a.mov(qword_ptr(rsp + ENTRY_RAX), rax)?;
        a.mov(qword_ptr(rsp + ENTRY_RCX), rcx)?;
        a.mov(rcx, f.counters as u64)?;
        a.test(byte_ptr(rcx + C_FLAGS), flags::ENABLED)
    })?;
    e.jcc_label(CC_E, disabled);
    Ok(())
}

/// With `r11` = the thread state: `rax` = the shadow entry this call will fill (at the
/// depth), or to `general` when the shadow stack is not mapped yet, full, or its top
/// entry says `on_entry` must decide.
fn emit_shadow_slot(e: &mut Emitter, general: Label) -> Result<(), EmitError> {
    let push = e.label();
    e.asm(|a| {
        a.mov(rax, qword_ptr(r11 + tl::DEPTH))?;
        a.cmp(rax, qword_ptr(r11 + tl::CAPACITY))
    })?;
    // Not mapped yet or full: `on_entry` maps it or counts the lost exit.
    e.jcc_label(CC_AE, general);
    e.asm(|a| {
        a.shl(rax, tl::ENTRY_SHIFT)?;
        a.add(rax, qword_ptr(r11 + tl::SHADOW))?;
        a.cmp(qword_ptr(r11 + tl::DEPTH), 0)
    })?;
    e.jcc_label(CC_E, push);
    // A top entry at or below this frame's slot was abandoned (longjmp), or this is a
    // tail call from its function: `on_entry` decides.
    e.asm(|a| a.cmp(qword_ptr(rax - 32 + tl::E_ENTRY_RSP), rsp))?;
    e.jcc_label(CC_BE, general);
    e.bind(push);
    Ok(())
}

/// Fill the shadow entry at `rax`, already taken: the return address, the probe (left
/// in `rcx`), no timestamp yet, and last the entry `rsp`, which makes it whole.
fn emit_fill_shadow_entry(e: &mut Emitter, probe: *const Probe) -> Result<(), EmitError> {
    e.asm(|a| {
        a.mov(rcx, qword_ptr(rsp))?;
        a.mov(qword_ptr(rax + tl::E_RETURN_ADDRESS), rcx)?;
        a.mov(rcx, probe as u64)?;
        a.mov(qword_ptr(rax + tl::E_PROBE), rcx)?;
        a.mov(qword_ptr(rax + tl::E_TSC), 0)?;
        a.mov(qword_ptr(rax + tl::E_ENTRY_RSP), rsp)
    })
}

/// With `rax` = the shadow entry and `rcx` = the probe: its timestamp, only for a return
/// handler that reads the time (the flag moves with hot swaps, so it is read at each
/// hit). Keeps `rax rdx`.
fn emit_entry_timestamp(e: &mut Emitter) -> Result<(), EmitError> {
    let untimed = e.label();
    e.asm(|a| a.cmp(byte_ptr(rcx + P_PACK_EXIT_TIMED), 0))?;
    e.jcc_label(CC_E, untimed);
    e.asm(|a| {
        a.mov(qword_ptr(rsp + ENTRY_RDX), rdx)?;
        a.mov(rcx, rax)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(qword_ptr(rcx + tl::E_TSC), rax)?;
        a.mov(rax, rcx)?;
        a.mov(rdx, qword_ptr(rsp + ENTRY_RDX))
    })?;
    e.bind(untimed);
    Ok(())
}

/// Reload `rax rcx r11`, kept below `rsp` at the entry.
fn emit_restore_scratch(e: &mut Emitter) -> Result<(), EmitError> {
    e.asm(|a| {
        a.mov(rax, qword_ptr(rsp + ENTRY_RAX))?;
        a.mov(rcx, qword_ptr(rsp + ENTRY_RCX))?;
        a.mov(r11, qword_ptr(rsp + ENTRY_R11))
    })
}

/// The rest of a handler-less exit probe's fast path, once its shadow entry is pushed:
/// instead of overwriting the return address with the exit trampoline's (which the
/// function's `ret` would then mispredict, since the return stack buffer holds the
/// caller's address), drop it and *call* the function body. The body's `ret` comes back
/// here, predicted; the real return address is then put back and returned to, which pops
/// the caller's own return-stack entry, predicted too. The stack the body sees is exactly
/// the original one: its return slot holds our return point instead of the caller's
/// address, as with the exit trampoline (unwinder hooks and `on_exit` treat both alike).
fn emit_fast_call_and_return(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    tail: Label,
) -> Result<(), EmitError> {
    let general = e.label();
    emit_restore_scratch(e)?;
    if let Some(x) = f.pack {
        emit_pack_entry_if_any(e, probe, f, x)?;
    }
    emit_call_body(e, probe, tail)?;
    // The body returned: rsp is one above the return slot, every register may hold a
    // value the caller keeps or a result.
    emit_save_return_scratch(e)?;
    // Not this frame's entry on top (frames unwound past, a signal handler's frames):
    // the shared exit trampoline sorts it out, from the same state a `ret` into it
    // would leave.
    emit_own_top_entry(e, f.tls, general)?;
    e.asm(|a| a.mov(rdi, f.counters as u64))?;
    if let Some(x) = f.pack {
        emit_pack_exit_if_enabled(e, probe, f, x)?;
    }
    emit_count_exit_and_pop(e)?;
    emit_return_to_caller(e)?;
    e.bind(general);
    emit_restore_return_scratch(e)?;
    e.jmp_preserving(f.exit_trampoline)?;
    Ok(())
}

/// Call the pack's entry handler when the probe has one. Whether it has is read at each
/// hit: a later session may reuse this probe with handlers of another pack.
fn emit_pack_entry_if_any(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    x: PackExit,
) -> Result<(), EmitError> {
    let no_entry_handler = e.label();
    e.asm(|a| {
        a.mov(qword_ptr(rsp + ENTRY_R11), r11)?;
        a.mov(r11, probe as u64)?;
        a.cmp(qword_ptr(r11 + P_PACK_ENTRY_DIRECT), 0)?;
        a.mov(r11, qword_ptr(rsp + ENTRY_R11))
    })?;
    e.jcc_label(CC_E, no_entry_handler);
    let p = PackEntry {
        tls: f.tls,
        counters: f.counters,
        hit: x.hit,
    };
    emit_pack_entry_call(e, probe, p)?;
    e.bind(no_entry_handler);
    Ok(())
}

/// Drop the return address and call the body at `tail`; the probe's `return_point` is
/// where the body returns to.
fn emit_call_body(e: &mut Emitter, probe: *const Probe, tail: Label) -> Result<(), EmitError> {
    e.asm(|a| a.lea(rsp, qword_ptr(rsp + 8)))?;
    e.call_label(tail);
    // The unwinder hook recognises redirected slots by what they hold.
    // SAFETY: the probe is alive forever and not yet reachable from any trampoline.
    unsafe { &*probe }
        .return_point
        .store(e.ip(), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// With `rdi` = the counters: count the exit and run the pack's return handler when the
/// probe is enabled.
fn emit_pack_exit_if_enabled(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    x: PackExit,
) -> Result<(), EmitError> {
    let disabled = e.label();
    e.asm(|a| a.test(byte_ptr(rdi + C_FLAGS), flags::ENABLED))?;
    e.jcc_label(CC_E, disabled);
    emit_count(e, rdi, C_EXITS, SCRATCH_RAX, RET_RAX)?;
    emit_restore_return_scratch(e)?;
    emit_pack_exit_call(e, probe, f, x)?;
    e.bind(disabled);
    Ok(())
}

/// With `rcx` = the real return address: put it back in the popped slot, restore the
/// borrowed registers and return there.
fn emit_return_to_caller(e: &mut Emitter) -> Result<(), EmitError> {
    e.asm(|a| a.mov(qword_ptr(rsp + RET_SLOT), rcx))?;
    emit_restore_return_scratch(e)?;
    e.asm(|a| {
        a.lea(rsp, qword_ptr(rsp + RET_SLOT))?;
        a.ret()
    })
}

/// After a return, keep `rcx rdi r11` below `rsp` (the dead callee frame).
fn emit_save_return_scratch(e: &mut Emitter) -> Result<(), EmitError> {
    e.asm(|a| {
        a.mov(qword_ptr(rsp + RET_RCX), rcx)?;
        a.mov(qword_ptr(rsp + RET_RDI), rdi)?;
        a.mov(qword_ptr(rsp + RET_R11), r11)
    })
}

fn emit_restore_return_scratch(e: &mut Emitter) -> Result<(), EmitError> {
    e.asm(|a| {
        a.mov(rcx, qword_ptr(rsp + RET_RCX))?;
        a.mov(rdi, qword_ptr(rsp + RET_RDI))?;
        a.mov(r11, qword_ptr(rsp + RET_R11))
    })
}

/// With `rdi` = the probe's counters, `rcx` = its shadow entry (the top one) and `r11` =
/// the thread state: count the exit if the probe is enabled and pop the entry, leaving
/// the real return address in `rcx`.
fn emit_count_exit_and_pop(e: &mut Emitter) -> Result<(), EmitError> {
    let uncounted = e.label();
    e.asm(|a| a.test(byte_ptr(rdi + C_FLAGS), flags::ENABLED))?;
    e.jcc_label(CC_E, uncounted);
    emit_count(e, rdi, C_EXITS, SCRATCH_RAX, RET_RAX)?;
    e.bind(uncounted);
    e.asm(|a| {
        // Read the entry and mark it free before releasing it: a signal handler may
        // push over it from then on.
        a.mov(qword_ptr(rcx + tl::E_ENTRY_RSP), 0)?;
        a.mov(rcx, qword_ptr(rcx + tl::E_RETURN_ADDRESS))?;
        a.dec(qword_ptr(r11 + tl::DEPTH))
    })
}

/// Right after a probed function returned (`rsp` one above its return slot), with
/// `rcx rdi r11` saved: `r11` = this thread's state and `rcx` = the top shadow entry,
/// which must be this very frame's (its slot the one just popped) and the thread not
/// inside a handler; else to `general`. Clobbers `rdi` and the flags.
fn emit_own_top_entry(e: &mut Emitter, tls: i32, general: Label) -> Result<(), EmitError> {
    e.bytes(&MOV_R11_FS0);
    e.asm(|a| {
        a.lea(r11, qword_ptr(r11 + tls))?;
        a.cmp(qword_ptr(r11 + tl::BUSY), 0)
    })?;
    e.jcc_label(CC_NE, general);
    e.asm(|a| {
        a.mov(rcx, qword_ptr(r11 + tl::DEPTH))?;
        a.test(rcx, rcx)
    })?;
    e.jcc_label(CC_E, general);
    e.asm(|a| {
        a.dec(rcx)?;
        a.shl(rcx, tl::ENTRY_SHIFT)?;
        a.add(rcx, qword_ptr(r11 + tl::SHADOW))?;
        // The popped return slot.
        a.lea(rdi, qword_ptr(rsp + RET_SLOT))?;
        a.cmp(qword_ptr(rcx + tl::E_ENTRY_RSP), rdi)
    })?;
    e.jcc_label(CC_NE, general);
    Ok(())
}

/// The fast path of the shared exit trampoline: when the top shadow entry is this very
/// frame's and its probe has no exit handler, count and jump to the real return address.
/// It borrows `rcx rdi r11` (kept below `rsp`) and changes only the flags, dead at a
/// return. Anything else (frames unwound past, a handler to run, re-entrancy) goes to
/// `general`, the full path, with every register as the function left it.
fn emit_fast_exit(e: &mut Emitter, tls: i32, general: Label) -> Result<(), EmitError> {
    const P_COUNTERS: i32 = (offset_of!(Probe, counters) + offset_of!(Counts, line)) as i32;
    const P_ON_EXIT: i32 = offset_of!(Probe, on_exit) as i32;
    let restore_to_general = e.label();
    emit_save_return_scratch(e)?;
    emit_own_top_entry(e, tls, restore_to_general)?;
    e.asm(|a| {
        a.mov(rdi, qword_ptr(rcx + tl::E_PROBE))?;
        a.cmp(qword_ptr(rdi + P_ON_EXIT), 0)
    })?;
    e.jcc_label(CC_NE, restore_to_general);
    // A pack's return handler is read from its slot at each return.
    e.asm(|a| a.cmp(qword_ptr(rdi + P_PACK_EXIT), 0))?;
    e.jcc_label(CC_NE, restore_to_general);
    e.asm(|a| a.mov(rdi, qword_ptr(rdi + P_COUNTERS)))?;
    emit_count_exit_and_pop(e)?;
    e.asm(|a| a.mov(qword_ptr(rsp + RET_SLOT), rcx))?;
    emit_restore_return_scratch(e)?;
    e.asm(|a| a.jmp(qword_ptr(rsp + RET_SLOT)))?;
    e.bind(restore_to_general);
    emit_restore_return_scratch(e)?;
    e.jmp_label(general);
    Ok(())
}

/// The vector state the offset trampoline saves: what `xsave` needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveInfo {
    /// XCR0: the state components the OS enabled, all of which are saved.
    pub mask: u64,
    /// Bytes of the standard-format area for those components (CPUID 0xD.0 EBX).
    pub size: u32,
}

impl XsaveInfo {
    /// What this CPU and kernel use; None when the OS did not enable `xsave`.
    pub fn detect() -> Option<XsaveInfo> {
        use core::arch::x86_64::__cpuid_count;
        // CPUID.1:ECX bit 27 is OSXSAVE: xsave and xgetbv are usable.
        let leaf1 = __cpuid_count(1, 0);
        if leaf1.ecx & (1 << 27) == 0 {
            return None;
        }
        let (lo, hi): (u32, u32);
        // SAFETY: xgetbv with ecx = 0 reads XCR0, allowed at any privilege once OSXSAVE
        // is set, and has no side effects.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        let size = __cpuid_count(0xd, 0).ebx;
        Some(XsaveInfo {
            mask: (hi as u64) << 32 | lo as u64,
            size,
        })
    }

    /// Whether the OS enabled the AVX state (XCR0 bit 2).
    pub fn avx(&self) -> bool {
        self.mask & 4 != 0
    }

    /// The vector state the OS enabled: AVX-512 when XCR0 has the opmask, `ZMM_Hi256`
    /// and `Hi16_ZMM` components (bits 5-7).
    pub fn vectors(&self) -> Vectors {
        if self.avx() && self.mask & 0xe0 == 0xe0 {
            // CPUID.(7,0):EBX bit 30 is AVX512BW: 64-bit masks.
            let bw = core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 30) != 0;
            Vectors::Avx512 { bw }
        } else if self.avx() {
            Vectors::Avx
        } else {
            Vectors::Sse
        }
    }
}

/// Registers in the order they are pushed, so that they land in [`OffsetContext`] order
/// (`rax` lowest). `rsp` is pushed as a placeholder and overwritten.
const PUSH_ORDER: [AsmRegister64; 16] = [
    r15, r14, r13, r12, r11, r10, r9, r8, rsp, rbp, rdi, rsi, rdx, rcx, rbx, rax,
];

/// Emit a full-context trampoline for an offset probe at the emitter's address.
///
/// ```text
/// lea rsp, [rsp-128]            ; the red zone may be live mid-function
/// push rax ; push rax           ; room for ctx.xsave and ctx.rip
/// pushfq ; cld                  ; before anything touches the flags
/// push r15 .. rax               ; OffsetContext, rax lowest
/// mov rbx, rsp                  ; the context, kept across the call (callee-saved)
/// fill ctx.rsp, ctx.rip
/// lea rsp, [rsp-size] ; and rsp, -64 ; zero the xsave header ; xsave64 [rsp]
/// call on_offset(probe, ctx)
/// xrstor64 [rsp] ; mov rsp, rbx
/// pop rax .. r15 (skipping rsp) ; popfq
/// lea rsp, [rsp+16+128]
/// <relocated instruction(s)> ; jmp back
/// ```
pub fn emit_offset(
    e: &mut Emitter,
    probe: *const Probe,
    stolen: &Stolen,
    xs: XsaveInfo,
) -> Result<EntryTrampoline, JitError> {
    e.asm(|a| {
        push_offset_context(a, stolen.site)?;
        save_xstate(a, xs)?;
        a.mov(rdi, probe as u64)?;
        a.mov(rsi, rbx)
    })?;
    let on_offset = dispatch::on_offset as *const () as u64;
    let encoding = e.call(on_offset)?;
    e.asm(|a| {
        restore_xstate(a, xs)?;
        pop_offset_context(a)
    })?;
    let relocated = emit_stolen(e, stolen)?;
    Ok(EntryTrampoline {
        encoding,
        relocated,
    })
}

/// Past the red zone, the [`OffsetContext`] of the probe at `site`, flags first; `rbx`
/// points at it.
fn push_offset_context(a: &mut CodeAssembler, site: u64) -> Result<(), iced_x86::IcedError> {
    a.lea(rsp, qword_ptr(rsp - 128))?;
    a.push(rax)?;
    a.push(rax)?;
    a.pushfq()?;
    // The ABI wants the direction flag clear in the Rust code called; popfq restores
    // the probed code's.
    a.cld()?;
    for r in PUSH_ORDER {
        a.push(r)?;
    }
    a.mov(rbx, rsp)?;
    a.lea(rax, qword_ptr(rbx + (ol::SIZE as i32 + 128)))?;
    a.mov(qword_ptr(rbx + ol::RSP as i32), rax)?;
    a.mov(rax, site)?;
    a.mov(qword_ptr(rbx + ol::RIP as i32), rax)
}

/// Below the context (`rbx`), the vector state in an `xsave` area aligned to 64, its
/// address in `ctx.xsave`.
fn save_xstate(a: &mut CodeAssembler, xs: XsaveInfo) -> Result<(), iced_x86::IcedError> {
    let area = (xs.size as i32 + 63) & !63;
    a.lea(rsp, qword_ptr(rsp - area))?;
    a.and(rsp, -64)?;
    a.mov(qword_ptr(rbx + ol::XSAVE as i32), rsp)?;
    // xrstor faults on non-zero reserved header bytes, and xsave only writes
    // XSTATE_BV: clear the 64-byte header first.
    for i in 0..8 {
        a.mov(qword_ptr(rsp + (ol::XSAVE_XSTATE_BV as i32 + 8 * i)), 0)?;
    }
    a.mov(eax, xs.mask as u32)?;
    a.mov(edx, (xs.mask >> 32) as u32)?;
    a.xsave64(iced_x86::code_asm::ptr(rsp))
}

fn restore_xstate(a: &mut CodeAssembler, xs: XsaveInfo) -> Result<(), iced_x86::IcedError> {
    a.mov(eax, xs.mask as u32)?;
    a.mov(edx, (xs.mask >> 32) as u32)?;
    a.xrstor64(iced_x86::code_asm::ptr(rsp))
}

/// Every register and the flags back from the context at `rbx` (as the handler left
/// them), `rsp` back to the site's.
fn pop_offset_context(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(rsp, rbx)?;
    for r in PUSH_ORDER.iter().rev() {
        if *r == rsp {
            a.lea(rsp, qword_ptr(rsp + 8))?;
        } else {
            a.pop(*r)?;
        }
    }
    a.popfq()?;
    a.lea(rsp, qword_ptr(rsp + (16 + 128)))
}

/// Emit the stolen instructions, as the relocator rewrites them for this address, and
/// the jump back to the original code when they fall through.
pub(crate) fn emit_stolen(e: &mut Emitter, stolen: &Stolen) -> Result<Relocated, JitError> {
    let relocated = relocator::relocate(stolen, e.ip())?;
    e.bytes(&relocated.bytes);
    if let Some(encoding) = relocated.call_jump {
        e.record(encoding);
    }
    if relocated.falls_through {
        e.branch_with(relocated.resume, false, CallEncoding::Rel32)?;
    }
    Ok(relocated)
}
