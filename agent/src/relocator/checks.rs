//! The safety checks: nothing may reach strictly inside the stolen bytes, and every
//! stolen instruction must mean the same thing when run from the trampoline.

use super::jump_table::check_indirect_jump;
use super::memory::{read_back, read_window};
use super::{Function, Memory, Refusal, NEIGHBOUR_WINDOW};
use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpKind, Register,
};
use std::collections::HashSet;

/// Whether control never continues to the next instruction after `ins`.
pub(super) fn ends_flow(ins: &Instruction) -> bool {
    matches!(
        ins.flow_control(),
        FlowControl::Return | FlowControl::UnconditionalBranch | FlowControl::IndirectBranch
    ) || matches!(
        ins.mnemonic(),
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 | Mnemonic::Int3 | Mnemonic::Hlt
    )
}

/// The direct target of a near branch or call (`jmp`, `jcc`, `call`, `loop`, `jrcxz`,
/// `xbegin`), if `ins` is one.
pub(super) fn direct_target(ins: &Instruction) -> Option<u64> {
    (0..ins.op_count())
        .any(|i| {
            matches!(
                ins.op_kind(i),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        })
        .then(|| ins.near_branch_target())
}

/// Whether `ins` is a `call` of any form (not `syscall`, whose flow is also a call's).
pub(super) fn is_call(ins: &Instruction) -> bool {
    ins.is_call_near()
        || ins.is_call_near_indirect()
        || ins.is_call_far()
        || ins.is_call_far_indirect()
}

pub(super) fn is_rip_relative(ins: &Instruction) -> bool {
    ins.is_ip_rel_memory_operand()
}

/// The half-open stolen range, as a helper for the "strictly inside" checks.
#[derive(Clone, Copy)]
pub(super) struct Range {
    pub(super) start: u64,
    pub(super) end: u64,
}

impl Range {
    pub(super) fn contains(&self, a: u64) -> bool {
        self.start <= a && a < self.end
    }
    pub(super) fn strictly_inside(&self, a: u64) -> bool {
        self.start < a && a < self.end
    }
}

pub(super) fn undecodable(address: u64, code: &[u8], base: u64) -> Refusal {
    let off = (address - base) as usize;
    let bytes = code[off..code.len().min(off + 15)].to_vec();
    Refusal::Undecodable { address, bytes }
}

/// Checks on the stolen instructions themselves: that each one means the same thing
/// when executed from the trampoline.
pub(super) fn check_stolen(
    stolen: &[Instruction],
    range: Range,
    stolen_ips: &HashSet<u64>,
) -> Result<(), Refusal> {
    for ins in stolen {
        let unrelocatable = |reason| Refusal::Unrelocatable {
            address: ins.ip(),
            mnemonic: ins.mnemonic(),
            reason,
        };
        match ins.flow_control() {
            // Far transfers carry absolute selectors/offsets; they cannot appear in
            // 64-bit user code except as indirect forms, which need no relocation.
            FlowControl::Call | FlowControl::UnconditionalBranch
                if matches!(ins.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32) =>
            {
                return Err(unrelocatable("far direct branches are not supported"));
            }
            _ => {}
        }
        if let Some(target) = direct_target(ins) {
            if ins.flow_control() == FlowControl::Call {
                // A call whose target is the next instruction is the "get my own address"
                // idiom (`call 1f; 1: pop reg`): relocated, it would observe the
                // trampoline's address instead of the original one.
                if target == ins.next_ip() {
                    return Err(unrelocatable(
                        "it calls the next instruction to learn its own address",
                    ));
                }
                if range.strictly_inside(target) {
                    return Err(branch_into(ins, target, range));
                }
            } else if range.contains(target) && !stolen_ips.contains(&target) {
                // Internal branches are fine when they land on a stolen instruction:
                // the block encoder keeps them internal. Anything else would land in the
                // middle of a re-encoded instruction.
                return Err(branch_into(ins, target, range));
            }
        }
        check_call(ins, range)?;
        check_rip_relative(ins, range)?;
    }
    Ok(())
}

/// A stolen `call` must be the last stolen instruction, since its callee returns to
/// the next one, and an indirect one must have a form the rewrite (`push` of the
/// original return address, `jmp` through the same operand) can express.
pub(super) fn check_call(ins: &Instruction, range: Range) -> Result<(), Refusal> {
    if !is_call(ins) {
        return Ok(());
    }
    if range.strictly_inside(ins.next_ip()) {
        return Err(Refusal::ReturnIntoStolen {
            address: ins.ip(),
            mnemonic: ins.mnemonic(),
            returns_to: ins.next_ip(),
        });
    }
    if !(ins.is_call_near_indirect() || ins.is_call_far_indirect()) {
        return Ok(());
    }
    let unrelocatable = |reason| Refusal::Unrelocatable {
        address: ins.ip(),
        mnemonic: ins.mnemonic(),
        reason,
    };
    if ins.code() != Code::Call_rm64 {
        return Err(unrelocatable(
            "only 64-bit near indirect calls are supported",
        ));
    }
    match ins.op0_kind() {
        OpKind::Register if ins.op0_register() == Register::RSP => {
            Err(unrelocatable("it calls the stack pointer"))
        }
        OpKind::Memory if ins.memory_base() == Register::ESP => Err(unrelocatable(
            "a 32-bit address relative to esp is not supported",
        )),
        OpKind::Memory
            if ins.memory_base() == Register::RSP && rsp_displacement_after_push(ins).is_none() =>
        {
            Err(unrelocatable("its displacement from rsp is too large"))
        }
        _ => Ok(()),
    }
}

/// The displacement of `ins`'s memory operand, relative to `rsp`, once a return address
/// has been pushed: 8 more, if that still fits in 32 bits.
pub(super) fn rsp_displacement_after_push(ins: &Instruction) -> Option<i32> {
    i32::try_from(ins.memory_displacement64() as i64 + 8).ok()
}

/// The refusal for a direct branch or call from `ins` to `target`, inside the stolen
/// bytes.
pub(super) fn branch_into(ins: &Instruction, target: u64, range: Range) -> Refusal {
    Refusal::BranchIntoStolen {
        from: ins.ip(),
        mnemonic: ins.mnemonic(),
        target,
        stolen_start: range.start,
        stolen_end: range.end,
    }
}

/// The rule for RIP-relative operands, stolen or not: taking the address of the site
/// itself (`lea reg, [rip+site]`, e.g. to pass the function as a callback) is fine,
/// since calls through it reach the patch and re-encoding keeps the absolute value. Any
/// other reference into the stolen bytes either reads code the patch changes or
/// materialises an address inside it that could be jumped to.
pub(super) fn check_rip_relative(ins: &Instruction, range: Range) -> Result<(), Refusal> {
    if !is_rip_relative(ins) {
        return Ok(());
    }
    let target = ins.ip_rel_memory_address();
    let is_lea = ins.mnemonic() == Mnemonic::Lea;
    if range.strictly_inside(target) || (target == range.start && !is_lea) {
        return Err(Refusal::RipRelativeIntoStolen {
            address: ins.ip(),
            mnemonic: ins.mnemonic(),
            target,
        });
    }
    Ok(())
}

/// Checks on the whole function (or scan window): nothing else may reach strictly
/// inside the stolen bytes; and at an entry (`at_entry`), no jump of the function goes
/// back to its first instruction (a loop whose head is the entry, or a `jmp` to itself):
/// that would be safe, but every pass would run the probe as a new call, counting
/// iterations as calls and, with `-x`, stacking a return per pass.
pub(super) fn check_function(
    func: &Function,
    all: &[Instruction],
    range: Range,
    code_end: u64,
    mem: &dyn Memory,
    at_entry: bool,
) -> Result<(), Refusal> {
    let body = Range {
        start: func.address,
        end: code_end,
    };
    let mut info = InstructionInfoFactory::new();
    for (idx, ins) in all.iter().enumerate() {
        if ins.is_invalid() || range.contains(ins.ip()) {
            // Stolen instructions were checked by `check_stolen`. Undecodable bytes
            // elsewhere are data or padding in a linear sweep; they hold no branch.
            continue;
        }
        if let Some(target) = direct_target(ins) {
            let loops_to_entry =
                at_entry && !is_call(ins) && (func.address..=range.start).contains(&target);
            if range.strictly_inside(target) || loops_to_entry {
                return Err(branch_into(ins, target, range));
            }
        }
        check_rip_relative(ins, range)?;
        if ins.flow_control() == FlowControl::IndirectBranch {
            check_indirect_jump(all, idx, range, body, mem, &mut info)?;
        }
    }
    Ok(())
}

/// Best-effort scan of the code around the function for direct branches into the
/// stolen bytes.
///
/// Hand-written functions can have several entry points, and their neighbours jump
/// into them: in glibc 2.36 `__mempcpy_sse2_unaligned` ends with `jmp memcpy+3`, right
/// into the bytes an entry probe on `memcpy@GLIBC_2.2.5` steals. Compiler-split cold
/// parts (`foo.cold`) jump back into their function the same way. Neither shows up
/// inside the symbol's bounds. A linear sweep from an arbitrary address can decode a
/// few instructions out of step before it synchronises, so this can miss a branch; it
/// refuses more, never less, than the in-function checks alone.
pub(super) fn check_neighbours(
    start: u64,
    end: u64,
    range: Range,
    mem: &dyn Memory,
) -> Result<(), Refusal> {
    let after = Function {
        address: end,
        size: None,
    };
    let areas = [
        read_back(start, NEIGHBOUR_WINDOW, mem),
        read_window(&after, end.saturating_add(NEIGHBOUR_WINDOW), mem)
            .ok()
            .map(|c| (end, c)),
    ];
    for (address, code) in areas.into_iter().flatten() {
        let decoder = Decoder::with_ip(64, &code, address, DecoderOptions::NONE);
        for ins in decoder {
            if let Some(target) = direct_target(&ins) {
                if range.strictly_inside(target) {
                    return Err(branch_into(&ins, target, range));
                }
            }
        }
    }
    Ok(())
}
