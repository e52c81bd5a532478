//! Trampoline code generation.
//!
//! An entry trampoline, reached by the `jmp rel32` written over a probe site:
//!
//! ```text
//! sub  rsp, 200                 ; EntryContext; entry rsp = 8 mod 16, so now 0 mod 16
//! mov  [rsp+0..56], rdi rsi rdx rcx r8 r9 rax r10
//! movaps [rsp+64..], xmm0-7
//! lea  rax, [rsp+200] ; mov [rsp+192], rax    ; the site's rsp
//! movabs rdi, probe ; mov rsi, rsp
//! call on_entry                 ; rel32 / [rip+slot] / abs32 / abs64, by reach
//! restore xmm0-7 and the eight registers
//! lea  rsp, [rsp+200]           ; lea: flags untouched
//! <relocated stolen instructions>
//! jmp  site+len                 ; always rel32: the block is near the site
//! ```
//!
//! At a function entry, the SysV ABI leaves only the argument registers, `rax` (vector
//! count of variadic calls) and `r10` (static chain) live, plus `rsp` and the callee-saved
//! registers, which `on_entry` preserves as any function does; flags are dead.
//!
//! The exit trampoline is shared by all exit probes. A probed function returns into it
//! with `rsp` 16-byte aligned; it saves the return registers `rax rdx xmm0 xmm1`, calls
//! `on_exit`, which hands back the real return address, restores and jumps there.

use crate::dispatch::{self, Probe, EXIT_FRAME};
use crate::emitter::{CallEncoding, EmitError, Emitter, Label};
use crate::relocator::{self, Relocated, Stolen};
use crate::thread_state::layout as tl;
use iced_x86::code_asm::*;
use probes::context::{entry_layout as el, exit_layout as xl, offset_layout as ol};
use probes::shared::{flags, ProbeCounters};
use std::mem::offset_of;

/// Why a trampoline could not be generated.
#[derive(Debug)]
pub enum TrampolineError {
    Emit(EmitError),
    Relocate(relocator::Refusal),
}

impl From<EmitError> for TrampolineError {
    fn from(e: EmitError) -> Self {
        TrampolineError::Emit(e)
    }
}

/// What the entry trampoline emission produced.
#[derive(Debug, Clone)]
pub struct EntryTrampoline {
    /// How the trampoline reaches `on_entry`.
    pub encoding: CallEncoding,
    /// The relocated instructions, at their new address.
    pub relocated: Relocated,
}

const GPRS: [AsmRegister64; 8] = [rdi, rsi, rdx, rcx, r8, r9, rax, r10];

/// Emit an entry trampoline for `probe` at the emitter's address.
pub fn emit_entry(
    e: &mut Emitter,
    probe: *const Probe,
    stolen: &Stolen,
    fast: Option<FastEntry>,
) -> Result<Result<EntryTrampoline, relocator::Refusal>, EmitError> {
    let size = el::SIZE as i32;
    let tail = e.label();
    if let Some(f) = fast {
        emit_fast_entry(e, probe, f, tail)?;
    }
    e.asm(|a| {
        a.sub(rsp, size)?;
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(qword_ptr(rsp + el::GPRS + 8 * i), *r)?;
        }
        for (i, x) in XMMS.iter().enumerate() {
            a.movaps(xmmword_ptr(rsp + el::XMM + 16 * i), *x)?;
        }
        a.lea(rax, qword_ptr(rsp + size))?;
        a.mov(qword_ptr(rsp + el::RSP), rax)?;
        a.mov(rdi, probe as u64)?;
        a.mov(rsi, rsp)
    })?;
    let on_entry = dispatch::on_entry as *const () as u64;
    let encoding = e.call(on_entry)?;
    e.asm(|a| {
        for (i, x) in XMMS.iter().enumerate() {
            a.movaps(*x, xmmword_ptr(rsp + el::XMM + 16 * i))?;
        }
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(*r, qword_ptr(rsp + el::GPRS + 8 * i))?;
        }
        a.lea(rsp, qword_ptr(rsp + size))
    })?;
    e.bind(tail);
    let relocated = match emit_stolen(e, stolen)? {
        Ok(r) => r,
        Err(refusal) => return Ok(Err(refusal)),
    };
    Ok(Ok(EntryTrampoline {
        encoding,
        relocated,
    }))
}

const XMMS: [AsmRegisterXmm; 8] = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7];

/// Emit the shared exit trampoline; returns how it reaches `on_exit`.
pub fn emit_exit(e: &mut Emitter, tls: Option<i32>) -> Result<CallEncoding, EmitError> {
    let frame = EXIT_FRAME as i32;
    if let Some(tls) = tls {
        let general = e.label();
        emit_fast_exit(e, tls, general)?;
        e.bind(general);
    }
    e.asm(|a| {
        a.sub(rsp, frame)?;
        a.mov(qword_ptr(rsp + xl::RAX), rax)?;
        a.mov(qword_ptr(rsp + xl::RDX), rdx)?;
        a.movaps(xmmword_ptr(rsp + xl::XMM0), xmm0)?;
        a.movaps(xmmword_ptr(rsp + xl::XMM1), xmm1)?;
        a.mov(rdi, rsp)
    })?;
    let on_exit = dispatch::on_exit as *const () as u64;
    let encoding = e.call(on_exit)?;
    e.asm(|a| {
        a.mov(qword_ptr(rsp + frame - 8), rax)?;
        a.mov(rax, qword_ptr(rsp + xl::RAX))?;
        a.mov(rdx, qword_ptr(rsp + xl::RDX))?;
        a.movaps(xmm0, xmmword_ptr(rsp + xl::XMM0))?;
        a.movaps(xmm1, xmmword_ptr(rsp + xl::XMM1))?;
        a.lea(rsp, qword_ptr(rsp + frame))?;
        // An indirect jump rather than `ret`: the probed function's own `ret` already
        // consumed the return-stack-buffer entry of its call, so a second `ret` would
        // mispredict every time, while this jump's target is predicted from history.
        // The slot is now 8 bytes below rsp, inside the red zone, which signal
        // delivery skips.
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

/// What the inline fast path of a probe without handlers needs.
#[derive(Clone, Copy, Debug)]
pub struct FastEntry {
    /// The thread state's offset from the thread pointer.
    pub tls: i32,
    pub counters: *const ProbeCounters,
    /// The exit trampoline when returns are probed, else 0.
    pub exit_trampoline: u64,
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

/// The counting-only hot path of a probe with no handler, done inline: what
/// `dispatch::on_entry` does for such a probe, without saving the argument registers or
/// calling anything. Counters use `lock inc`: exact with any number of threads (see `dispatch::bump`).
///
/// At a function entry `r11` and the flags are dead (SysV: `r11` is a scratch register
/// that passes nothing), and everything below `rsp` is free (the callee's red zone, not
/// yet used), which holds `rax` and `rcx` while they serve as scratch. Cases the fast
/// path does not handle (shadow stack not mapped yet or full) fall through to the general
/// path, which calls `on_entry`; `tail` is where the relocated instructions start.
fn emit_fast_entry(
    e: &mut Emitter,
    probe: *const Probe,
    f: FastEntry,
    tail: Label,
) -> Result<(), EmitError> {
    let general = e.label();
    let skipped = e.label();
    let counters = f.counters as u64;
    e.bytes(&MOV_R11_FS0);
    if f.exit_trampoline == 0 {
        // Entries only: r11 alone suffices, nothing to save.
        e.asm(|a| a.cmp(qword_ptr(r11 + f.tls + tl::BUSY), 0))?;
        e.jcc_label(CC_NE, skipped);
        e.asm(|a| {
            a.mov(r11, counters)?;
            a.test(byte_ptr(r11 + C_FLAGS), flags::ENABLED)
        })?;
        e.jcc_label(CC_E, tail);
        e.asm(|a| a.lock().inc(qword_ptr(r11 + C_HITS)))?;
        e.jmp_label(tail);
    } else {
        emit_fast_exit_entry(e, probe, f, tail, skipped, general)?;
    }
    e.bind(skipped);
    e.asm(|a| {
        a.mov(r11, counters)?;
        a.lock().inc(qword_ptr(r11 + C_SKIPPED))
    })?;
    e.jmp_label(tail);
    e.bind(general);
    Ok(())
}

/// The entry half of a handler-less exit probe's fast path: count, push the shadow
/// entry, then call the body (see [`emit_fast_call_and_return`]). With `r11` = the thread
/// pointer on entry; goes to `skipped` inside a handler, to `general` when the shadow
/// stack needs the Rust path.
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
    let push = e.label();
    e.asm(|a| {
        a.lea(r11, qword_ptr(r11 + f.tls))?;
        a.cmp(qword_ptr(r11 + tl::BUSY), 0)
    })?;
    e.jcc_label(CC_NE, skipped);
    e.asm(|a| {
        a.mov(qword_ptr(rsp - 8), rax)?;
        a.mov(qword_ptr(rsp - 16), rcx)?;
        a.mov(rcx, f.counters as u64)?;
        a.test(byte_ptr(rcx + C_FLAGS), flags::ENABLED)
    })?;
    e.jcc_label(CC_E, disabled);
    e.asm(|a| {
        a.mov(rax, qword_ptr(r11 + tl::DEPTH))?;
        a.cmp(rax, qword_ptr(r11 + tl::CAPACITY))
    })?;
    // Not mapped yet or full: `on_entry` maps it or counts the lost exit.
    e.jcc_label(CC_AE, restore_to_general);
    e.asm(|a| {
        a.shl(rax, tl::ENTRY_SHIFT)?;
        a.add(rax, qword_ptr(r11 + tl::SHADOW))?;
        a.cmp(qword_ptr(r11 + tl::DEPTH), 0)
    })?;
    e.jcc_label(CC_E, push);
    // A top entry at or below this frame's slot was abandoned (longjmp), or this is a
    // tail call from its function: `on_entry` decides.
    e.asm(|a| a.cmp(qword_ptr(rax - 32 + tl::E_ENTRY_RSP), rsp))?;
    e.jcc_label(CC_BE, restore_to_general);
    e.bind(push);
    e.asm(|a| {
        a.lock().inc(qword_ptr(rcx + C_HITS))?;
        a.mov(rcx, qword_ptr(rsp))?;
        a.mov(qword_ptr(rax + tl::E_RETURN_ADDRESS), rcx)?;
        a.mov(qword_ptr(rax + tl::E_ENTRY_RSP), rsp)?;
        a.mov(rcx, probe as u64)?;
        a.mov(qword_ptr(rax + tl::E_PROBE), rcx)?;
        a.mov(qword_ptr(rax + tl::E_TSC), 0)?;
        // The entry is complete before it counts: a signal handler hitting a probe
        // in between pushes above it.
        a.inc(qword_ptr(r11 + tl::DEPTH))
    })?;
    emit_fast_call_and_return(e, probe, f, tail)?;
    e.bind(restore_to_general);
    emit_restore_scratch(e)?;
    e.jmp_label(general);
    e.bind(disabled);
    emit_restore_scratch(e)?;
    e.jmp_label(tail);
    Ok(())
}

/// Reload `rax` and `rcx`, kept below `rsp` (the red zone, free at a function entry).
fn emit_restore_scratch(e: &mut Emitter) -> Result<(), EmitError> {
    e.asm(|a| {
        a.mov(rax, qword_ptr(rsp - 8))?;
        a.mov(rcx, qword_ptr(rsp - 16))
    })
}

/// The rest of a handler-less exit probe's fast path, once its shadow entry is pushed:
/// instead of overwriting the return address with the exit trampoline's (which the
/// function's `ret` would then mispredict, since the return stack buffer holds the
/// caller's address), drop it and *call* the function body. The body's `ret` comes back
/// here, predicted; the real return address is then pushed and returned to, which pops
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
    e.asm(|a| a.lea(rsp, qword_ptr(rsp + 8)))?;
    e.call_label(tail);
    // The unwinder hook recognises redirected slots by what they hold.
    // SAFETY: the probe is alive forever and not yet reachable from any trampoline.
    unsafe { &*probe }
        .return_point
        .store(e.ip(), std::sync::atomic::Ordering::Relaxed);
    // The body returned: rsp is one above the return slot. `rcx rsi rdi r8-r11` and the
    // flags are dead; `rax rdx xmm0 xmm1` may hold the result.
    // Not this frame's entry on top (frames unwound past, a signal handler's frames):
    // the shared exit trampoline sorts it out, from the same state a `ret` into it
    // would leave.
    emit_own_top_entry(e, f.tls, general)?;
    e.asm(|a| a.mov(rsi, f.counters as u64))?;
    emit_count_exit_and_pop(e)?;
    e.asm(|a| {
        a.push(rcx)?;
        a.ret()
    })?;
    e.bind(general);
    e.jmp(f.exit_trampoline)?;
    Ok(())
}

/// With `rsi` = the probe's counters, `rcx` = its shadow entry (the top one) and `r11` =
/// the thread state: count the exit if the probe is enabled and pop the entry, leaving
/// the real return address in `rcx`.
fn emit_count_exit_and_pop(e: &mut Emitter) -> Result<(), EmitError> {
    let uncounted = e.label();
    e.asm(|a| a.test(byte_ptr(rsi + C_FLAGS), flags::ENABLED))?;
    e.jcc_label(CC_E, uncounted);
    e.asm(|a| a.lock().inc(qword_ptr(rsi + C_EXITS)))?;
    e.bind(uncounted);
    e.asm(|a| {
        // Read the entry before releasing it: a signal handler may push over it.
        a.mov(rcx, qword_ptr(rcx + tl::E_RETURN_ADDRESS))?;
        a.dec(qword_ptr(r11 + tl::DEPTH))
    })
}

/// Right after a probed function returned (`rsp` one above its return slot): `r11` = this
/// thread's state and `rcx` = the top shadow entry, which must be this very frame's (its
/// slot the one just popped) and the thread not inside a handler; else to `general`.
/// Clobbers `rsi` and the flags, dead at a return.
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
        a.lea(rsi, qword_ptr(rsp - 8))?;
        a.cmp(qword_ptr(rcx + tl::E_ENTRY_RSP), rsi)
    })?;
    e.jcc_label(CC_NE, general);
    Ok(())
}

/// The fast path of the shared exit trampoline: when the top shadow entry is this very
/// frame's and its probe has no exit handler, count and jump to the real return address
/// without saving anything. At a return `rcx rsi rdi r8-r11` and the flags are dead
/// (`rax rdx xmm0 xmm1` may hold the result and are left alone). Anything else (frames
/// unwound past, a handler to run, re-entrancy) goes to `general`, the full path.
fn emit_fast_exit(e: &mut Emitter, tls: i32, general: Label) -> Result<(), EmitError> {
    const P_COUNTERS: i32 = offset_of!(Probe, counters) as i32;
    const P_ON_EXIT: i32 = offset_of!(Probe, on_exit) as i32;
    emit_own_top_entry(e, tls, general)?;
    e.asm(|a| {
        a.mov(rdi, qword_ptr(rcx + tl::E_PROBE))?;
        a.cmp(qword_ptr(rdi + P_ON_EXIT), 0)
    })?;
    e.jcc_label(CC_NE, general);
    e.asm(|a| a.mov(rsi, qword_ptr(rdi + P_COUNTERS)))?;
    emit_count_exit_and_pop(e)?;
    e.asm(|a| a.jmp(rcx))?;
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
/// pushfq                        ; before anything touches the flags
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
) -> Result<Result<EntryTrampoline, relocator::Refusal>, EmitError> {
    let area = (xs.size as i32 + 63) & !63;
    let (mask_lo, mask_hi) = (xs.mask as u32, (xs.mask >> 32) as u32);
    e.asm(|a| {
        a.lea(rsp, qword_ptr(rsp - 128))?;
        a.push(rax)?;
        a.push(rax)?;
        a.pushfq()?;
        for r in PUSH_ORDER {
            a.push(r)?;
        }
        a.mov(rbx, rsp)?;
        a.lea(rax, qword_ptr(rbx + (ol::SIZE as i32 + 128)))?;
        a.mov(qword_ptr(rbx + ol::RSP as i32), rax)?;
        a.mov(rax, stolen.site)?;
        a.mov(qword_ptr(rbx + ol::RIP as i32), rax)?;
        a.lea(rsp, qword_ptr(rsp - area))?;
        a.and(rsp, -64)?;
        a.mov(qword_ptr(rbx + ol::XSAVE as i32), rsp)?;
        // xrstor faults on non-zero reserved header bytes, and xsave only writes
        // XSTATE_BV: clear the 64-byte header first.
        for i in 0..8 {
            a.mov(qword_ptr(rsp + (ol::XSAVE_XSTATE_BV as i32 + 8 * i)), 0)?;
        }
        a.mov(eax, mask_lo)?;
        a.mov(edx, mask_hi)?;
        a.xsave64(iced_x86::code_asm::ptr(rsp))?;
        a.mov(rdi, probe as u64)?;
        a.mov(rsi, rbx)
    })?;
    let on_offset = dispatch::on_offset as *const () as u64;
    let encoding = e.call(on_offset)?;
    e.asm(|a| {
        a.mov(eax, mask_lo)?;
        a.mov(edx, mask_hi)?;
        a.xrstor64(iced_x86::code_asm::ptr(rsp))?;
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
    })?;
    let relocated = match emit_stolen(e, stolen)? {
        Ok(r) => r,
        Err(refusal) => return Ok(Err(refusal)),
    };
    Ok(Ok(EntryTrampoline {
        encoding,
        relocated,
    }))
}

/// Emit the stolen instructions and the jump back to the original code.
///
/// A direct `call` ending the stolen bytes (`sub rsp, 8; call f`, common at -O1) is not
/// re-encoded as a call: that would push an address inside the trampoline, where
/// unwinders (C++ exceptions, backtraces) find no unwind information and give up. It
/// becomes `movabs r11, resume; push r11; jmp f`, so `f` returns straight into the
/// original code right after the stolen bytes, as it would have unprobed. `r11` is free
/// at a call: the callee may clobber it and nothing passes values in it.
fn emit_stolen(
    e: &mut Emitter,
    stolen: &Stolen,
) -> Result<Result<Relocated, relocator::Refusal>, EmitError> {
    let last_is_call = stolen
        .instructions
        .last()
        .is_some_and(|i| i.is_call_near() && i.op0_kind() == iced_x86::OpKind::NearBranch64);
    if !last_is_call {
        let relocated = match relocator::relocate(stolen, e.ip()) {
            Ok(r) => r,
            Err(refusal) => return Ok(Err(refusal)),
        };
        e.bytes(&relocated.bytes);
        if relocated.falls_through {
            e.branch_with(relocated.resume, false, CallEncoding::Rel32)?;
        }
        return Ok(Ok(relocated));
    }
    let call = *stolen.instructions.last().expect("checked above");
    let head_len = (call.ip() - stolen.site) as usize;
    let new_ip = e.ip();
    let mut relocated = if head_len == 0 {
        Relocated {
            new_ip,
            bytes: Vec::new(),
            resume: stolen.resume(),
            instruction_offsets: Vec::new(),
            falls_through: true,
        }
    } else {
        let head = Stolen {
            len: head_len,
            original: stolen.original[..head_len].to_vec(),
            instructions: stolen.instructions[..stolen.instructions.len() - 1].to_vec(),
            ..stolen.clone()
        };
        match relocator::relocate(&head, new_ip) {
            Ok(r) => r,
            Err(refusal) => return Ok(Err(refusal)),
        }
    };
    e.bytes(&relocated.bytes);
    relocated.instruction_offsets.push((e.ip() - new_ip) as u32);
    let resume = stolen.resume();
    e.asm(|a| {
        a.mov(r11, resume)?;
        a.push(r11)
    })?;
    e.jmp(call.near_branch_target())?;
    relocated.resume = resume;
    relocated.falls_through = false;
    Ok(Ok(relocated))
}
