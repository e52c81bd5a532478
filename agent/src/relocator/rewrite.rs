//! Re-encoding the stolen instructions for the trampoline.
//!
//! Shaped like frida-gum's `gumx86relocator.c`: a cursor reads the stolen instructions
//! one at a time, [`classify`] names each one's class, and one `match` hands it to the
//! `rewrite_*` function for that class. The straight-line instructions and branches go
//! through iced-x86's block encoder in one pass, so that branches between stolen
//! instructions stay internal; a trailing `call`, direct or indirect, is written after
//! that block by hand.
//! The block is decoded again and checked before anything is returned.

use super::checks::{
    check_call, direct_target, ends_flow, is_call, is_rip_relative, rsp_displacement_after_push,
    Range,
};
use super::{Refusal, Relocated, Stolen};
use crate::emitter::{rel32_fits, CallEncoding};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Encoder, Instruction,
    InstructionBlock, MemoryOperand, OpKind, Register,
};
use std::collections::HashSet;

/// Margin for the growth of the re-encoded block (widened branches, `loop` expansions)
/// in the reachability pre-check; the exact check happens after encoding.
const BLOCK_SLACK: i64 = 1024;

/// How one stolen instruction is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Nothing in it depends on its address: encoded again unchanged.
    Plain,
    /// A memory operand relative to `rip`: the displacement changes, the absolute address
    /// stays.
    RipRelative,
    /// A direct `jmp`, `jcc`, `loop`, `jrcxz`, `xbegin`, or a `call` that is not last:
    /// same target, `rel8` widened; a target among the stolen instructions stays internal.
    Branch,
    /// A direct `call` ending the stolen bytes (`sub rsp, 8; call f`, common at -O1).
    /// Always last in practice: its five bytes cover the patch on their own.
    TrailingCall,
    /// An indirect `call` ending the stolen bytes (`call rax`, `call [rip+GOT]` as
    /// `gcc -fno-plt` emits, `call [rsp+8]`).
    TrailingIndirectCall,
    /// A `call` followed by more stolen instructions: its callee would return into the
    /// trampoline, and could not return to the original code (the address after the call
    /// is inside the patch). `analyze` refuses it.
    InnerCall,
}

/// The class of `ins`; `last` tells whether it ends the stolen bytes.
fn classify(ins: &Instruction, last: bool) -> Class {
    if is_call(ins) && !last {
        Class::InnerCall
    } else if last && ins.is_call_near() && ins.op0_kind() == OpKind::NearBranch64 {
        Class::TrailingCall
    } else if last && ins.code() == Code::Call_rm64 {
        Class::TrailingIndirectCall
    } else if direct_target(ins).is_some() {
        Class::Branch
    } else if is_rip_relative(ins) {
        Class::RipRelative
    } else {
        Class::Plain
    }
}

/// Re-encodes the stolen instructions to run at `new_ip`.
///
/// RIP-relative operands keep their absolute address, short branches are widened,
/// branches between stolen instructions stay internal, and a trailing `call` becomes a
/// `push` of its original return address and a jump (see `rewrite_trailing_call`); a
/// `call` before the last stolen instruction is refused. The caller appends the jump
/// back to `resume` when [`Relocated::falls_through`].
pub fn relocate(stolen: &Stolen, new_ip: u64) -> Result<Relocated, Refusal> {
    let mut w = Rewriter::new(stolen, new_ip);
    let n = stolen.instructions.len();
    for (i, ins) in stolen.instructions.iter().enumerate() {
        match classify(ins, i + 1 == n) {
            Class::Plain => w.rewrite_plain(ins),
            Class::RipRelative => w.rewrite_rip_relative(ins)?,
            Class::Branch => w.rewrite_branch(ins)?,
            Class::TrailingCall => w.rewrite_trailing_call(ins),
            Class::TrailingIndirectCall => w.rewrite_trailing_indirect_call(ins)?,
            Class::InnerCall => {
                return Err(Refusal::ReturnIntoStolen {
                    address: ins.ip(),
                    mnemonic: ins.mnemonic(),
                    returns_to: ins.next_ip(),
                })
            }
        }
    }
    w.finish()
}

/// The cursor's output so far.
struct Rewriter<'a> {
    stolen: &'a Stolen,
    new_ip: u64,
    /// Instructions for the block encoder, still at their original addresses (the
    /// encoder recognises internal branch targets by them).
    block: Vec<Instruction>,
    /// References outside the stolen bytes the block must keep: (instruction, target).
    externals: Vec<(u64, u64)>,
    /// A trailing `call`, written after the block.
    call: Option<Instruction>,
}

impl<'a> Rewriter<'a> {
    fn new(stolen: &'a Stolen, new_ip: u64) -> Self {
        Rewriter {
            stolen,
            new_ip,
            block: Vec::with_capacity(stolen.instructions.len()),
            externals: Vec::new(),
            call: None,
        }
    }

    fn rewrite_plain(&mut self, ins: &Instruction) {
        self.block.push(*ins);
    }

    fn rewrite_rip_relative(&mut self, ins: &Instruction) -> Result<(), Refusal> {
        self.keep_reference(ins.ip(), ins.ip_rel_memory_address())?;
        self.block.push(*ins);
        Ok(())
    }

    fn rewrite_branch(&mut self, ins: &Instruction) -> Result<(), Refusal> {
        let range = Range {
            start: self.stolen.site,
            end: self.stolen.resume(),
        };
        let target = ins.near_branch_target();
        if !range.contains(target) {
            self.keep_reference(ins.ip(), target)?;
        }
        self.block.push(*ins);
        Ok(())
    }

    /// A trailing `call f` becomes `push resume; jmp f` rather than a call from the
    /// trampoline: a call would push an address inside the trampoline, where unwinders
    /// (C++ exceptions, backtraces) find no unwind information and give up. `f` returns
    /// straight into the original code after the stolen bytes, as it would have unprobed,
    /// and sees every register as the original call would have left it (a locally bound
    /// callee may receive values in any register, `r11` included), so the jump touches
    /// no register whatever the distance.
    fn rewrite_trailing_call(&mut self, ins: &Instruction) {
        self.call = Some(*ins);
    }

    /// A trailing `call X` through a register or memory becomes `push resume; jmp X`, for
    /// the same reasons as [`rewrite_trailing_call`](Self::rewrite_trailing_call): the
    /// callee returns into the original code. `X` is read after the push: relative to
    /// `rsp` it is 8 bytes further, relative to `rip` it keeps its absolute address.
    fn rewrite_trailing_indirect_call(&mut self, ins: &Instruction) -> Result<(), Refusal> {
        // The forms the rewrite cannot express (`call rsp`, `[esp+X]`, ...), refused by
        // `analyze` already, for stolen instructions from elsewhere.
        let range = Range {
            start: self.stolen.site,
            end: self.stolen.resume(),
        };
        check_call(ins, range)?;
        if is_rip_relative(ins) {
            self.keep_reference(ins.ip(), ins.ip_rel_memory_address())?;
        }
        self.call = Some(*ins);
        Ok(())
    }

    /// Records a reference the block must keep, refusing early when no 32-bit
    /// displacement from the trampoline can reach it.
    fn keep_reference(&mut self, address: u64, target: u64) -> Result<(), Refusal> {
        let d = target.wrapping_sub(self.new_ip) as i64;
        if d < i32::MIN as i64 + BLOCK_SLACK || d > i32::MAX as i64 - BLOCK_SLACK {
            return Err(Refusal::TooFar {
                address,
                target,
                new_ip: self.new_ip,
            });
        }
        self.externals.push((address, target));
        Ok(())
    }

    fn finish(self) -> Result<Relocated, Refusal> {
        let (mut bytes, mut instruction_offsets) = self.encode_block()?;
        let mut call_jump = None;
        let falls_through = match self.call {
            Some(call) => {
                instruction_offsets.push(bytes.len() as u32);
                let at = self.new_ip + bytes.len() as u64;
                let resume = self.stolen.resume();
                if call.code() == Code::Call_rm64 {
                    bytes.extend(push_and_jump_through(at, resume, &call)?);
                } else {
                    let (tail, encoding) = push_and_jump(at, resume, call.near_branch_target());
                    bytes.extend_from_slice(&tail);
                    call_jump = Some(encoding);
                }
                false
            }
            None => !self.stolen.instructions.last().is_some_and(ends_flow),
        };
        Ok(Relocated {
            new_ip: self.new_ip,
            bytes,
            resume: self.stolen.resume(),
            instruction_offsets,
            falls_through,
            call_jump,
        })
    }

    /// Encodes the block at `new_ip` and checks the result; returns the bytes and the
    /// offset of each instruction.
    fn encode_block(&self) -> Result<(Vec<u8>, Vec<u32>), Refusal> {
        if self.block.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if self
            .block
            .iter()
            .all(|i| classify(i, false) == Class::Plain)
        {
            return Ok(self.copy_plain());
        }
        let new_ip = self.new_ip;
        let result = BlockEncoder::encode(
            64,
            InstructionBlock::new(&self.block, new_ip),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS
                | BlockEncoderOptions::RETURN_RELOC_INFOS,
        )
        .map_err(|e| Refusal::EncodeFailed {
            new_ip,
            message: e.to_string(),
        })?;
        // A branch or call the encoder could not reach goes through an absolute 8-byte
        // slot after the code, which it reports as a reloc info. (An offset of u32::MAX
        // alone is not a sign of that: `jrcxz`/`loop` expanded into a short hop over a
        // `jmp rel32` also get it.)
        if !result.reloc_infos.is_empty()
            || result.new_instruction_offsets.len() != self.block.len()
        {
            let (address, target) = self
                .externals
                .first()
                .copied()
                .unwrap_or((self.stolen.site, self.stolen.site));
            return Err(Refusal::TooFar {
                address,
                target,
                new_ip,
            });
        }
        verify(
            self.stolen.site,
            new_ip,
            &result.code_buffer,
            &self.externals,
        )?;
        Ok((result.code_buffer, result.new_instruction_offsets))
    }
}

impl Rewriter<'_> {
    /// Instructions that do not depend on their address mean the same anywhere as they
    /// are: their own bytes, without a round through the block encoder (a third of the
    /// time to prepare a small function).
    fn copy_plain(&self) -> (Vec<u8>, Vec<u32>) {
        let mut offsets = Vec::with_capacity(self.block.len());
        let mut len = 0usize;
        for ins in &self.block {
            offsets.push(len as u32);
            len += ins.len();
        }
        (self.stolen.original[..len].to_vec(), offsets)
    }
}

/// `push resume` then `jmp target`, for code at `at`, touching no register (see
/// [`push_resume`]): `jmp rel32` when it reaches, else `jmp qword [rip+0]` with the
/// target in the eight bytes after it.
fn push_and_jump(at: u64, resume: u64, target: u64) -> (Vec<u8>, CallEncoding) {
    let (mut bytes, ip) = push_resume(at, resume);
    if rel32_fits(ip + 5, target) {
        bytes.push(0xe9);
        let rel = target.wrapping_sub(ip + 5) as i32;
        bytes.extend_from_slice(&rel.to_le_bytes());
        (bytes, CallEncoding::Rel32)
    } else {
        bytes.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        bytes.extend_from_slice(&target.to_le_bytes());
        (bytes, CallEncoding::RipSlot)
    }
}

/// `push resume` then the `jmp` through the operand of `call` (a `call r/m64`), for code
/// at `at`: a register operand as it is, a memory operand relative to `rsp` 8 bytes
/// further (past the pushed address), one relative to `rip` at the same absolute address.
fn push_and_jump_through(at: u64, resume: u64, call: &Instruction) -> Result<Vec<u8>, Refusal> {
    let (mut bytes, ip) = push_resume(at, resume);
    let mut jmp = *call;
    jmp.set_code(Code::Jmp_rm64);
    if jmp.op0_kind() == OpKind::Memory && jmp.memory_base() == Register::RSP {
        // `analyze` refused a displacement that does not fit.
        let displ = rsp_displacement_after_push(call).ok_or(Refusal::Unrelocatable {
            address: call.ip(),
            mnemonic: call.mnemonic(),
            reason: "its displacement from rsp is too large",
        })?;
        jmp.set_memory_displacement64(displ as i64 as u64);
        // In iced's terms a 64-bit address's 32-bit displacement is of size 8.
        jmp.set_memory_displ_size(if i8::try_from(displ).is_ok() { 1 } else { 8 });
    }
    let too_far = || Refusal::TooFar {
        address: call.ip(),
        target: call.ip_rel_memory_address(),
        new_ip: at,
    };
    let mut enc = Encoder::new(64);
    if let Err(e) = enc.encode(&jmp, ip) {
        return Err(if call.is_ip_rel_memory_operand() {
            too_far()
        } else {
            Refusal::EncodeFailed {
                new_ip: at,
                message: e.to_string(),
            }
        });
    }
    let tail = enc.take_buffer();
    // The encoder may pick a 32-bit address form (`[eip+X]`) for a low target: only the
    // same absolute address through `rip` is right.
    let back = Decoder::with_ip(64, &tail, ip, DecoderOptions::NONE).decode();
    if call.is_ip_rel_memory_operand()
        && (back.memory_base() != Register::RIP
            || back.ip_rel_memory_address() != call.ip_rel_memory_address())
    {
        return Err(too_far());
    }
    bytes.extend(tail);
    Ok(bytes)
}

/// `push resume` for code at `at`, touching no register: `push imm32` pushes the
/// sign-extended low half and `mov dword [rsp+4], imm32` fixes the high one. Returns the
/// bytes and the address after them.
fn push_resume(at: u64, resume: u64) -> (Vec<u8>, u64) {
    let push = Instruction::with1(Code::Pushq_imm32, resume as u32 as i32);
    let fix_high = Instruction::with2(
        Code::Mov_rm32_imm32,
        MemoryOperand::with_base_displ(Register::RSP, 4),
        (resume >> 32) as u32,
    );
    let mut enc = Encoder::new(64);
    let mut ip = at;
    for ins in [push, fix_high] {
        let ins = ins.expect("valid operands for a fixed form");
        ip += enc.encode(&ins, ip).expect("encodable at any address") as u64;
    }
    (enc.take_buffer(), ip)
}

/// Decodes the re-encoded block and checks every reference it makes.
fn verify(site: u64, new_ip: u64, code: &[u8], externals: &[(u64, u64)]) -> Result<(), Refusal> {
    let out = Range {
        start: new_ip,
        end: new_ip + code.len() as u64,
    };
    let allowed: HashSet<u64> = externals.iter().map(|&(_, t)| t).collect();
    let decoded = decode_all(new_ip, code)?;
    let starts: HashSet<u64> = decoded.iter().map(|i| i.ip()).collect();
    let too_far = |target: u64| -> Refusal {
        // Attribute the problem to the original instruction it came from.
        let original = externals
            .iter()
            .find(|&&(_, t)| t == target)
            .map_or(site, |&(a, _)| a);
        Refusal::TooFar {
            address: original,
            target,
            new_ip,
        }
    };
    for ins in &decoded {
        if ins.memory_base() == Register::EIP {
            // A 32-bit address form: only correct if the trampoline is below 4 GiB.
            return Err(too_far(ins.ip_rel_memory_address()));
        }
        if is_rip_relative(ins) {
            let t = ins.ip_rel_memory_address();
            if out.contains(t) || !allowed.contains(&t) {
                // A pointer slot after the code, or a changed reference.
                return Err(too_far(t));
            }
        }
        if let Some(t) = direct_target(ins) {
            if !out.contains(t) {
                if !allowed.contains(&t) {
                    return Err(too_far(t));
                }
            } else if !starts.contains(&t) {
                return Err(Refusal::EncodeFailed {
                    new_ip,
                    message: format!(
                        "the re-encoded branch at {:#x} lands inside an instruction",
                        ins.ip()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Every instruction of `code` at `new_ip`, or a refusal at the first that does not
/// decode.
fn decode_all(new_ip: u64, code: &[u8]) -> Result<Vec<Instruction>, Refusal> {
    let mut decoder = Decoder::with_ip(64, code, new_ip, DecoderOptions::NONE);
    let mut decoded = Vec::new();
    while decoder.can_decode() {
        let ins = decoder.decode();
        if ins.is_invalid() {
            return Err(Refusal::EncodeFailed {
                new_ip,
                message: format!("the re-encoded bytes do not decode at {:#x}", ins.ip()),
            });
        }
        decoded.push(ins);
    }
    Ok(decoded)
}
