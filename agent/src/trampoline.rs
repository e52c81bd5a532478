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
//! `on_exit`, which hands back the real return address, restores and returns there.

use crate::dispatch::{self, Probe, EXIT_FRAME};
use crate::emitter::{CallEncoding, EmitError, Emitter};
use crate::relocator::{self, Relocated, Stolen};
use iced_x86::code_asm::*;
use probes::context::{entry_layout as el, exit_layout as xl};

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
) -> Result<Result<EntryTrampoline, relocator::Refusal>, EmitError> {
    let size = el::SIZE as i32;
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
    let relocated = match relocator::relocate(stolen, e.ip()) {
        Ok(r) => r,
        Err(refusal) => return Ok(Err(refusal)),
    };
    e.bytes(&relocated.bytes);
    if relocated.falls_through {
        e.branch_with(relocated.resume, false, CallEncoding::Rel32)?;
    }
    Ok(Ok(EntryTrampoline {
        encoding,
        relocated,
    }))
}

const XMMS: [AsmRegisterXmm; 8] = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7];

/// Emit the shared exit trampoline; returns how it reaches `on_exit`.
pub fn emit_exit(e: &mut Emitter) -> Result<CallEncoding, EmitError> {
    let frame = EXIT_FRAME as i32;
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
        a.lea(rsp, qword_ptr(rsp + frame - 8))?;
        a.ret()
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
