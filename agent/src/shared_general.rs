//! One general entry path for every handler-less exit probe, instead of one each.
//!
//! A probe that counts entries and returns without a handler runs its inline fast path
//! (`trampoline::emit_fast_entry`) on nearly every hit; only a thread's first hit (its
//! shadow stack is not mapped yet), a full shadow stack or a tail call needs `on_entry`.
//! That rare path saves every call-clobbered register and vector register around the
//! call, 600 bytes of code that each such probe used to carry. Here it is emitted once
//! per agent, and each probe reaches it with a 6-byte call through a pointer kept after
//! its own code, next to the probe it is for:
//!
//! ```text
//! general:  call qword ptr [rip+slot]     ; pushes tail, in the callee's red zone
//! tail:     <relocated stolen instructions> ; jmp site+len
//! slot:     dq stub, probe
//! ```
//!
//! The stub finds the probe through its return address: the call's displacement sits in
//! the four bytes before it, so `slot = ret + disp32` and the probe is at `slot + 8`.
//!
//! ```text
//! stub:  <open a frame aligned at run time, rbx = rsp (the site's rsp - 8)>
//!        save rax rcx rdx rsi rdi r8-r11, the vector state (zmm0-31 k0-7, ymm0-15 or xmm0-15)
//!        ctx.rsp = rbx + 8 ; rdi = probe (as above) ; rsi = ctx
//!        call on_entry
//!        restore them ; close the frame
//!        ret                                ; to tail, every register as at the site
//! ```

use crate::dispatch::{self, Probe};
use crate::emitter::{CallEncoding, EmitError, Emitter};
use crate::jit::JitError;
use crate::relocator::Stolen;
use crate::trampoline::{
    close_frame, emit_fast_entry, emit_stolen, frame_size, open_frame, restore_vectors,
    save_vectors, EntryTrampoline, FastEntry, Vectors, ENTRY_CTX_XMM, GPRS,
};
use iced_x86::code_asm::*;
use probes::context::entry_layout as el;

/// Emit the shared stub, keeping the vector state `v` in full; returns how it reaches
/// `on_entry`.
pub fn emit_stub(e: &mut Emitter, v: Vectors) -> Result<CallEncoding, EmitError> {
    e.asm(|a| {
        open_frame(a, frame_size(el::FRAME, v))?;
        for (i, r) in GPRS.iter().enumerate() {
            a.mov(qword_ptr(rsp + el::GPRS + 8 * i), *r)?;
        }
        a.mov(qword_ptr(rsp + el::R11), r11)?;
        save_vectors(a, v, el::VECTORS, el::FRAME, &ENTRY_CTX_XMM)?;
        // The site's rsp is one above the return address the call pushed.
        a.lea(rax, qword_ptr(rbx + 8))?;
        a.mov(qword_ptr(rsp + el::RSP), rax)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.movsxd(rdi, dword_ptr(rax - 4))?;
        a.mov(rdi, qword_ptr(rax + rdi + 8))?;
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
        close_frame(a)?;
        a.ret()
    })?;
    Ok(encoding)
}

/// Emit the entry trampoline of a handler-less exit probe whose general path is the
/// shared `stub`: the inline fast path, the call to the stub, the relocated
/// instructions and the jump back, then the stub's address and the probe.
pub fn emit_entry(
    e: &mut Emitter,
    probe: *const Probe,
    stolen: &Stolen,
    fast: FastEntry,
    stub: u64,
) -> Result<EntryTrampoline, JitError> {
    let tail = e.label();
    let slot = e.label();
    emit_fast_entry(e, probe, fast, tail)?;
    // call qword ptr [rip+slot]
    e.bytes(&[0xff, 0x15]);
    e.disp32_label(slot);
    e.bind(tail);
    let relocated = emit_stolen(e, stolen)?;
    e.align(8, 0xcc);
    e.bind(slot);
    e.bytes(&stub.to_le_bytes());
    e.bytes(&(probe as u64).to_le_bytes());
    Ok(EntryTrampoline {
        encoding: CallEncoding::RipSlot,
        relocated,
    })
}
