//! Jump-table inference: where an indirect `jmp` can land, read from the switch tables
//! compilers emit, so that a table entry into the stolen bytes is refused.

use super::checks::Range;
use super::{Memory, Refusal};
use iced_x86::{Code, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};

/// Jump tables are read entry by entry while entries land in the function; this bounds
/// the walk for tables followed by data that happens to look like more entries.
const MAX_TABLE_ENTRIES: u64 = 4096;

/// How many instructions back from an indirect `jmp` the register definitions are traced.
const DEF_SEARCH_DEPTH: usize = 24;

/// Where an indirect jump can go, as far as it matters here.
///
/// Soundness argument. A `jmp reg`/`jmp [mem]` can land strictly inside the stolen bytes
/// only if an address strictly inside them exists somewhere as a value. Such a value can
/// come from:
/// 1. a RIP-relative `lea`/load in this function: refused function-wide by
///    `check_function` (any RIP-relative reference strictly inside the stolen bytes);
/// 2. a return address pushed by a stolen `call`: relocation re-encodes the call so the
///    pushed address is in the trampoline instead;
/// 3. a table of code addresses or offsets in data (switch tables, computed-goto
///    tables). Compilers index such tables with a register: an indexed load feeding the
///    jump. We recognise the PIC switch pattern (`lea rX,[rip+T]; movsxd rY,[rX+rZ*4];
///    add rY,rX; jmp rY`) and tables of absolute 8-byte pointers whose base is known,
///    and read their entries. Any other indexed load or `add` feeding the jump is a
///    table we do not understand: refused.
/// 4. values from other code (function pointers in structures, the GOT, arguments,
///    return values): a jump through them is a tail call to a function entry. C and
///    the usual compilers do not hand out addresses of labels inside another function
///    except through case 3's tables.
///
/// Register definitions are found by walking back linearly up to `DEF_SEARCH_DEPTH`
/// instructions; when no definition is found there, the value comes from further away
/// (an argument or an earlier computation), which is case 4 unless a table load is
/// involved, which would show as an indexed load or `add` near the jump.
pub(super) fn check_indirect_jump(
    all: &[Instruction],
    idx: usize,
    range: Range,
    body: Range,
    mem: &dyn Memory,
    info: &mut InstructionInfoFactory,
) -> Result<(), Refusal> {
    let jmp = &all[idx];
    let not_understood = || not_understood(jmp);
    match jmp.op0_kind() {
        OpKind::Memory => {
            if jmp.memory_index() == Register::None {
                // `jmp [rip+GOT]`, `jmp [reg+disp]`, `jmp [abs]`: a single pointer
                // slot, i.e. a tail call (case 4).
                return Ok(());
            }
            // `jmp [base + idx*8 (+disp)]`: a table of absolute pointers.
            let table = pointer_table(all, idx, info).ok_or_else(not_understood)?;
            check_pointer_table(jmp.ip(), table, range, body, mem)
        }
        OpKind::Register => {
            let reg = jmp.op0_register().full_register();
            match find_def(all, idx, reg, info) {
                None => Ok(()), // case 4: defined far away, no table nearby.
                Some((def_idx, Def::Write)) => {
                    check_register_source(all, idx, def_idx, range, body, mem, info)
                }
                Some((_, Def::Conditional)) => Err(not_understood()),
            }
        }
        _ => Err(not_understood()),
    }
}

/// `jmp reg` at `idx`, `reg` last written by `all[def_idx]`: where that value comes from.
fn check_register_source(
    all: &[Instruction],
    idx: usize,
    def_idx: usize,
    range: Range,
    body: Range,
    mem: &dyn Memory,
    info: &mut InstructionInfoFactory,
) -> Result<(), Refusal> {
    let jmp = &all[idx];
    let not_understood = || not_understood(jmp);
    let d = &all[def_idx];
    if d.mnemonic() == Mnemonic::Lea && d.is_ip_rel_memory_operand() {
        // A direct target materialised in a register; case 1 already refused it if it
        // points strictly inside the stolen bytes.
        return Ok(());
    }
    if d.mnemonic() == Mnemonic::Mov
        && d.op0_kind() == OpKind::Register
        && d.op1_kind() == OpKind::Memory
        && d.memory_index() != Register::None
    {
        // Loaded from an indexed table of absolute pointers.
        let table = pointer_table(all, def_idx, info).ok_or_else(not_understood)?;
        return check_pointer_table(jmp.ip(), table, range, body, mem);
    }
    if d.mnemonic() == Mnemonic::Add {
        return check_pic_switch(all, idx, def_idx, range, body, mem, info)
            .ok_or_else(not_understood)?;
    }
    if (0..d.op_count()).any(|i| d.op_kind(i) == OpKind::Memory)
        && d.memory_index() != Register::None
    {
        // Some other indexed load feeds the jump: a table we do not understand (case 3).
        return Err(not_understood());
    }
    Ok(())
}

enum Def {
    Write,
    Conditional,
}

/// The closest instruction before `idx` that writes `reg` (any part of it).
fn find_def(
    all: &[Instruction],
    idx: usize,
    reg: Register,
    info: &mut InstructionInfoFactory,
) -> Option<(usize, Def)> {
    let lo = idx.saturating_sub(DEF_SEARCH_DEPTH);
    for i in (lo..idx).rev() {
        let ins = &all[i];
        if ins.is_invalid() {
            return None;
        }
        let used = info.info(ins);
        for u in used.used_registers() {
            if u.register().full_register() != reg {
                continue;
            }
            match u.access() {
                OpAccess::Write | OpAccess::ReadWrite => return Some((i, Def::Write)),
                OpAccess::CondWrite | OpAccess::ReadCondWrite => {
                    return Some((i, Def::Conditional))
                }
                _ => {}
            }
        }
    }
    None
}

/// The value of `reg` just before `all[idx]` if it was set by `lea reg, [rip+X]`
/// (following register-to-register copies).
fn lea_value(
    all: &[Instruction],
    idx: usize,
    reg: Register,
    info: &mut InstructionInfoFactory,
) -> Option<u64> {
    let mut reg = reg.full_register();
    let mut idx = idx;
    for _ in 0..4 {
        let (i, Def::Write) = find_def(all, idx, reg, info)? else {
            return None;
        };
        let d = &all[i];
        if d.mnemonic() == Mnemonic::Lea && d.is_ip_rel_memory_operand() {
            return Some(d.ip_rel_memory_address());
        }
        if d.code() == Code::Mov_r64_rm64 || d.code() == Code::Mov_rm64_r64 {
            if d.op1_kind() != OpKind::Register {
                return None;
            }
            reg = d.op1_register().full_register();
            idx = i;
            continue;
        }
        return None;
    }
    None
}

/// The PIC switch: `lea rX,[rip+T]` ... `movsxd rY,dword [rX+rZ*4]` ... `add rY,rX` ...
/// `jmp rY` (either `add` operand order). Returns `None` if the pattern does not match.
fn check_pic_switch(
    all: &[Instruction],
    jmp_idx: usize,
    add_idx: usize,
    range: Range,
    body: Range,
    mem: &dyn Memory,
    info: &mut InstructionInfoFactory,
) -> Option<Result<(), Refusal>> {
    let add = &all[add_idx];
    if add.code() != Code::Add_r64_rm64 && add.code() != Code::Add_rm64_r64 {
        return None;
    }
    if add.op0_kind() != OpKind::Register || add.op1_kind() != OpKind::Register {
        return None;
    }
    let (a, b) = (add.op0_register(), add.op1_register());
    // One operand is the sign-extended entry, the other the table base from `lea`.
    for (entry_reg, base_reg) in [(a, b), (b, a)] {
        let Some(base) = lea_value(all, add_idx, base_reg, info) else {
            continue;
        };
        let Some((load_idx, Def::Write)) = find_def(all, add_idx, entry_reg, info) else {
            continue;
        };
        let load = &all[load_idx];
        let table = if load.code() == Code::Movsxd_r64_rm32 && load.is_ip_rel_memory_operand() {
            // A switch on a constant (`movsxd rY,[rip+T]`): entry 0 is the target.
            // Reading the following entries too can only add refusals.
            load.ip_rel_memory_address()
        } else if load.code() != Code::Movsxd_r64_rm32
            || load.op1_kind() != OpKind::Memory
            || load.memory_index_scale() != 4
            || load.memory_index() == Register::None
        {
            continue;
        } else {
            let table_base = match load.memory_base() {
                Register::None => 0,
                r => lea_value(all, load_idx, r, info)?,
            };
            table_base.wrapping_add(load.memory_displacement64())
        };
        return Some(check_offset_table(
            all[jmp_idx].ip(),
            table,
            base,
            range,
            body,
            mem,
        ));
    }
    None
}

/// Reads 32-bit offsets from `table` (target = `base + offset`) while they land in the
/// function, and refuses if one lands strictly inside the stolen bytes.
///
/// The table has no recorded length; the walk ends at the first entry that lands outside
/// the function or cannot be read. Entries past the real end of the table that happen to
/// land in the function can only add refusals, never hide one.
fn check_offset_table(
    jump: u64,
    table: u64,
    base: u64,
    range: Range,
    body: Range,
    mem: &dyn Memory,
) -> Result<(), Refusal> {
    check_table(jump, table, range, body, mem, |e: [u8; 4]| {
        base.wrapping_add(i32::from_le_bytes(e) as i64 as u64)
    })
}

/// The table of absolute pointers that the memory operand of `all[idx]` indexes as
/// `[base + index*8 (+disp)]`; `None` when the scale is not 8 or the base's value is not
/// known.
fn pointer_table(
    all: &[Instruction],
    idx: usize,
    info: &mut InstructionInfoFactory,
) -> Option<u64> {
    let ins = &all[idx];
    if ins.memory_index_scale() != 8 {
        return None;
    }
    let base = match ins.memory_base() {
        Register::None => 0,
        reg => lea_value(all, idx, reg, info)?,
    };
    Some(base.wrapping_add(ins.memory_displacement64()))
}

/// Same as [`check_offset_table`] for a table of absolute 8-byte code pointers.
fn check_pointer_table(
    jump: u64,
    table: u64,
    range: Range,
    body: Range,
    mem: &dyn Memory,
) -> Result<(), Refusal> {
    check_table(jump, table, range, body, mem, u64::from_le_bytes)
}

/// The walk of [`check_offset_table`] over entries of `N` bytes, each turned into its
/// target by `target_of`.
fn check_table<const N: usize>(
    jump: u64,
    table: u64,
    range: Range,
    body: Range,
    mem: &dyn Memory,
    target_of: impl Fn([u8; N]) -> u64,
) -> Result<(), Refusal> {
    for index in 0..MAX_TABLE_ENTRIES {
        let mut e = [0u8; N];
        if !mem.read(table.wrapping_add(index * N as u64), &mut e) {
            break;
        }
        let target = target_of(e);
        if !body.contains(target) {
            break;
        }
        if range.strictly_inside(target) {
            return Err(Refusal::JumpTableIntoStolen {
                jump,
                table,
                index,
                target,
            });
        }
    }
    Ok(())
}

/// The refusal for an indirect `jmp` whose targets cannot be told.
fn not_understood(jmp: &Instruction) -> Refusal {
    Refusal::IndirectJump {
        address: jmp.ip(),
        mnemonic: jmp.mnemonic(),
    }
}
