//! Unit tests of the analysis and the rewrites, on code assembled at a fixed address.

use super::*;
use crate::emitter::CallEncoding;
use iced_x86::code_asm::*;
use iced_x86::{MemoryOperand, Mnemonic, Register};

const BASE: u64 = 0x7f12_3456_0000;
const GIB: u64 = 1 << 30;

fn assemble(base: u64, build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a);
    a.assemble(base).unwrap()
}

fn entry(bytes: &[u8], size: Option<u64>) -> Result<Stolen, Refusal> {
    let mem = SliceMemory { base: BASE, bytes };
    let func = Function {
        address: BASE,
        size,
    };
    analyze(&func, BASE, ProbeKind::Entry, &mem)
}

fn sized(bytes: &[u8]) -> Result<Stolen, Refusal> {
    entry(bytes, Some(bytes.len() as u64))
}

/// An offset probe at the start of the function `bytes` (its size known).
fn offset_at_start(bytes: &[u8]) -> Result<Stolen, Refusal> {
    let mem = SliceMemory { base: BASE, bytes };
    let func = Function {
        address: BASE,
        size: Some(bytes.len() as u64),
    };
    analyze(&func, BASE, ProbeKind::Offset, &mem)
}

/// `code` with a RIP-relative memory operand at the absolute address `target`
/// (`CodeAssembler` takes a plain address as an absolute operand).
fn rip_rel(a: &mut CodeAssembler, code: Code, reg: Option<Register>, target: u64) {
    let m = MemoryOperand::with_base_displ(Register::RIP, target as i64);
    let ins = match reg {
        Some(r) => Instruction::with2(code, r, m),
        None => Instruction::with1(code, m),
    };
    a.add_instruction(ins.unwrap()).unwrap();
}

fn decode_all(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
        .into_iter()
        .collect()
}

/// The 12-byte leaf Frida refuses: `lea rax,[rsi+rsi]; xor rax,rdi; add rax,7; ret`.
const LEAF: [u8; 12] = [
    0x48, 0x8d, 0x04, 0x36, 0x48, 0x31, 0xf8, 0x48, 0x83, 0xc0, 0x07, 0xc3,
];

#[test]
fn twelve_byte_leaf_steals_lea_and_xor() {
    let s = sized(&LEAF).unwrap();
    assert_eq!(s.site, BASE);
    assert_eq!(s.len, 7);
    assert_eq!(s.original, LEAF[..7]);
    assert_eq!(s.instructions.len(), 2);
    assert!(!s.skipped_endbr64);
    let r = relocate(&s, BASE + GIB).unwrap();
    assert_eq!(r.bytes, LEAF[..7]);
    assert_eq!(r.resume, BASE + 7);
    assert_eq!(r.instruction_offsets, vec![0, 4]);
    assert!(r.falls_through);
    // Unknown size: the window scan gives the same answer.
    assert_eq!(entry(&LEAF, None).unwrap().len, 7);
}

#[test]
fn endbr64_stays_in_place() {
    let code = assemble(BASE, |a| {
        a.endbr64().unwrap();
        a.push(rbp).unwrap();
        a.mov(rbp, rsp).unwrap();
        a.mov(eax, edi).unwrap();
        a.pop(rbp).unwrap();
        a.ret().unwrap();
    });
    let s = sized(&code).unwrap();
    assert!(s.skipped_endbr64);
    assert_eq!(s.site, BASE + 4);
    // push rbp (1) + mov rbp,rsp (3) + mov eax,edi (2)
    assert_eq!(s.len, 6);
    assert_eq!(s.original, code[4..10]);
    // An offset probe at the function start does not skip it.
    let o = offset_at_start(&code).unwrap();
    assert_eq!((o.site, o.len), (BASE, 5));
}

#[test]
fn rip_relative_operands_keep_their_absolute_address() {
    let data = BASE + 0x800;
    let code = assemble(BASE, |a| {
        rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), data);
        rip_rel(a, Code::Lea_r64_m, Some(Register::RCX), data + 8);
        a.add(rax, rcx).unwrap();
        a.ret().unwrap();
    });
    let s = sized(&code).unwrap();
    assert_eq!(s.len, 7); // mov rax,[rip+X] alone covers the patch
    let first = decode_all(&code, BASE)[0];
    assert!(first.is_ip_rel_memory_operand());
    for new_ip in [BASE + GIB, BASE - GIB] {
        let r = relocate(&s, new_ip).unwrap();
        let out = decode_all(&r.bytes, new_ip);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].memory_base(), Register::RIP);
        assert_eq!(out[0].ip_rel_memory_address(), data);
        assert_ne!(r.bytes, s.original, "the displacement must change");
    }
    // lea first (7 bytes too): same absolute address.
    let code = assemble(BASE, |a| {
        rip_rel(a, Code::Lea_r64_m, Some(Register::RAX), data);
        a.ret().unwrap();
    });
    let s = sized(&code).unwrap();
    let r = relocate(&s, BASE + GIB).unwrap();
    assert_eq!(
        decode_all(&r.bytes, BASE + GIB)[0].ip_rel_memory_address(),
        data
    );
}

#[test]
fn short_jcc_is_widened_with_the_same_target() {
    let code = assemble(BASE, |a| {
        let mut l = a.create_label();
        a.test(rdi, rdi).unwrap();
        a.je(l).unwrap();
        a.mov(eax, 1).unwrap();
        a.ret().unwrap();
        a.set_label(&mut l).unwrap();
        a.mov(eax, 2).unwrap();
        a.ret().unwrap();
    });
    let ins = decode_all(&code, BASE);
    assert_eq!(ins[1].code(), Code::Je_rel8_64);
    let target_ip = ins[1].near_branch_target();
    let s = sized(&code).unwrap();
    assert_eq!(s.len, 5);
    let new_ip = BASE + GIB;
    let r = relocate(&s, new_ip).unwrap();
    let out = decode_all(&r.bytes, new_ip);
    assert_eq!(out[1].code(), Code::Je_rel32_64);
    assert_eq!(out[1].near_branch_target(), target_ip);
}

#[test]
fn trailing_call_pushes_the_original_return_address_and_jumps() {
    let callee = BASE + 0x5000;
    let code = assemble(BASE, |a| {
        a.xor(eax, eax).unwrap();
        a.call(callee).unwrap();
        a.add(rax, 1).unwrap();
        a.ret().unwrap();
    });
    let s = sized(&code).unwrap();
    assert_eq!(s.len, 7);
    let new_ip = BASE - GIB;
    let r = relocate(&s, new_ip).unwrap();
    let out = decode_all(&r.bytes, new_ip);
    let codes: Vec<Code> = out.iter().map(|i| i.code()).collect();
    assert_eq!(
        codes,
        [
            Code::Xor_rm32_r32,
            Code::Pushq_imm32,
            Code::Mov_rm32_imm32,
            Code::Jmp_rel32_64
        ]
    );
    // The pushed value is the original return address, `site + 7`, in two halves.
    let resume = BASE + 7;
    assert_eq!(
        out[1].immediate32() as i32 as i64 as u64 & 0xffff_ffff,
        resume & 0xffff_ffff
    );
    assert_eq!(u64::from(out[2].immediate32()), resume >> 32);
    assert_eq!(out[3].near_branch_target(), callee);
    assert_eq!(r.instruction_offsets, vec![0, 2]);
    assert_eq!(r.call_jump, Some(CallEncoding::Rel32));
    assert!(!r.falls_through);
}

#[test]
fn branch_between_stolen_instructions_stays_internal() {
    // test edi,edi; je next; lea eax,[rdi+1]; ret
    let code = [0x85, 0xff, 0x74, 0x00, 0x8d, 0x47, 0x01, 0xc3];
    let s = sized(&code).unwrap();
    assert_eq!(s.len, 7);
    let new_ip = BASE + GIB;
    let r = relocate(&s, new_ip).unwrap();
    let out = decode_all(&r.bytes, new_ip);
    let je = out.iter().find(|i| i.mnemonic() == Mnemonic::Je).unwrap();
    assert_eq!(
        je.near_branch_target(),
        new_ip + u64::from(r.instruction_offsets[2])
    );
}

/// A loop whose head is the function's first instruction: an offset probe there counts
/// each pass, as it should; an entry probe would count each pass as a call (and stack a
/// return per pass with `-x`), so it is refused, naming the jump.
#[test]
fn a_loop_back_to_the_site_is_fine_for_an_offset_probe_only() {
    let code = assemble(BASE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.dec(edi).unwrap();
        a.add(eax, 3).unwrap();
        a.test(edi, edi).unwrap();
        a.jne(top).unwrap();
        a.ret().unwrap();
    });
    assert!(offset_at_start(&code).is_ok());
    match sized(&code) {
        Err(Refusal::BranchIntoStolen {
            target,
            mnemonic: Mnemonic::Jne,
            ..
        }) => assert_eq!(target, BASE),
        other => panic!("{other:?}"),
    }
}

/// A function calling itself at its entry is a real call: fine for an entry probe.
#[test]
fn a_call_back_to_the_entry_is_fine() {
    let code = assemble(BASE, |a| {
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut top).unwrap();
        a.test(edi, edi).unwrap();
        a.je(done).unwrap();
        a.dec(edi).unwrap();
        a.call(top).unwrap();
        a.set_label(&mut done).unwrap();
        a.ret().unwrap();
    });
    assert!(sized(&code).is_ok(), "{:?}", sized(&code));
}

#[test]
fn back_jump_into_stolen_bytes_is_refused() {
    let code = assemble(BASE, |a| {
        let mut l = a.create_label();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut l).unwrap();
        a.add(eax, 3).unwrap();
        a.dec(edi).unwrap();
        a.jne(l).unwrap();
        a.ret().unwrap();
    });
    let inner = BASE + 2; // the `add` after the 2-byte `xor`
    match sized(&code) {
        Err(Refusal::BranchIntoStolen {
            target,
            mnemonic: Mnemonic::Jne,
            stolen_start,
            stolen_end,
            ..
        }) => {
            assert_eq!(target, inner);
            assert_eq!(stolen_start, BASE);
            assert!(stolen_end > inner);
        }
        other => panic!("{other:?}"),
    }
    // Without a known size the window scan finds it too.
    assert!(matches!(
        entry(&code, None),
        Err(Refusal::BranchIntoStolen { .. })
    ));
}

#[test]
fn neighbour_entering_the_stolen_bytes_is_refused() {
    // Like glibc's `mempcpy: mov rax,rdi; add rax,rdx; jmp memcpy+3` right before
    // `memcpy: mov rax,rdi; cmp rdx,0x10; ...`.
    let memcpy = BASE + 0x10;
    let code = assemble(BASE, |a| {
        a.mov(rax, rdi).unwrap();
        a.add(rax, rdx).unwrap();
        a.jmp(memcpy + 3).unwrap();
        a.nops_with_size(0x10 - 8).unwrap();
        a.mov(rax, rdi).unwrap();
        a.cmp(rdx, 0x10).unwrap();
        a.ret().unwrap();
    });
    assert_eq!(decode_all(&code, BASE)[2].len(), 2);
    let mem = SliceMemory {
        base: BASE,
        bytes: &code,
    };
    let f = Function {
        address: memcpy,
        size: Some(code.len() as u64 - 0x10),
    };
    match analyze(&f, memcpy, ProbeKind::Entry, &mem) {
        Err(Refusal::BranchIntoStolen { from, target, .. }) => {
            assert_eq!((from, target), (BASE + 6, memcpy + 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tiny_function_is_refused() {
    // lea eax,[rdi+1]; ret
    let code = [0x8d, 0x47, 0x01, 0xc3];
    assert!(matches!(
        sized(&code),
        Err(Refusal::FunctionTooShort { available: 4, .. })
    ));
    // Unknown size, followed by padding: the `ret` stops the steal.
    let padded = [0x8d, 0x47, 0x01, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc];
    match entry(&padded, None) {
        Err(Refusal::EndsTooSoon {
            address,
            mnemonic: Mnemonic::Ret,
            covered: 4,
            ..
        }) => assert_eq!(address, BASE + 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn flow_enders_before_five_bytes_are_refused() {
    for (code, m) in [
        (vec![0x31, 0xc0, 0xeb, 0x10, 0x90, 0x90], Mnemonic::Jmp), // xor; jmp short
        (vec![0x31, 0xc0, 0x0f, 0x0b, 0x90, 0x90], Mnemonic::Ud2),
        (vec![0x31, 0xc0, 0xcc, 0x90, 0x90, 0x90], Mnemonic::Int3),
        (vec![0x31, 0xc0, 0xf4, 0x90, 0x90, 0x90], Mnemonic::Hlt),
        (vec![0x31, 0xc0, 0xff, 0xe0, 0x90, 0x90], Mnemonic::Jmp), // jmp rax
    ] {
        match sized(&code) {
            Err(Refusal::EndsTooSoon { mnemonic, .. }) => assert_eq!(mnemonic, m),
            other => panic!("{code:02x?}: {other:?}"),
        }
    }
}

#[test]
fn jmp_rel32_thunk_is_stolen_whole() {
    let target = BASE + 0x12345;
    let code = assemble(BASE, |a| a.jmp(target).unwrap());
    assert_eq!(code.len(), 5);
    let s = sized(&code).unwrap();
    let r = relocate(&s, BASE + GIB).unwrap();
    assert!(!r.falls_through);
    assert_eq!(
        decode_all(&r.bytes, BASE + GIB)[0].near_branch_target(),
        target
    );
}

#[test]
fn an_offset_inside_the_last_instruction_is_no_boundary() {
    // xor rax, rax; add rax, 1 (4 bytes, the function's last).
    let code = [0x48, 0x31, 0xc0, 0x48, 0x83, 0xc0, 0x01];
    let mem = SliceMemory {
        base: BASE,
        bytes: &code,
    };
    let f = Function {
        address: BASE,
        size: Some(code.len() as u64),
    };
    match analyze(&f, BASE + 5, ProbeKind::Offset, &mem) {
        Err(Refusal::NotInstructionBoundary {
            instruction,
            mnemonic: Mnemonic::Add,
            ..
        }) => assert_eq!(instruction, BASE + 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn offset_probes_need_an_instruction_boundary() {
    let mem = SliceMemory {
        base: BASE,
        bytes: &LEAF,
    };
    let f = Function {
        address: BASE,
        size: Some(12),
    };
    match analyze(&f, BASE + 2, ProbeKind::Offset, &mem) {
        Err(Refusal::NotInstructionBoundary {
            instruction,
            mnemonic: Mnemonic::Lea,
            ..
        }) => assert_eq!(instruction, BASE),
        other => panic!("{other:?}"),
    }
    // At the `xor`: xor (3) + add (4).
    let s = analyze(&f, BASE + 4, ProbeKind::Offset, &mem).unwrap();
    assert_eq!((s.site, s.len), (BASE + 4, 7));
    // At the `add`: `add` (4) + `ret` (1) cover exactly five bytes of the function.
    let s = analyze(&f, BASE + 7, ProbeKind::Offset, &mem).unwrap();
    assert_eq!((s.len, s.instructions.len()), (5, 2));
    assert!(!relocate(&s, BASE + GIB).unwrap().falls_through);
    // One byte further is inside `add`.
    assert!(matches!(
        analyze(&f, BASE + 8, ProbeKind::Offset, &mem),
        Err(Refusal::NotInstructionBoundary { .. })
    ));
    assert!(matches!(
        analyze(&f, BASE + 12, ProbeKind::Offset, &mem),
        Err(Refusal::SiteOutsideFunction { .. })
    ));
    assert!(matches!(
        analyze(&f, BASE + 4, ProbeKind::Entry, &mem),
        Err(Refusal::EntryNotAtFunctionStart { .. })
    ));
}

#[test]
fn undecodable_and_unreadable_are_refused() {
    // 0x06 (push es) does not exist in 64-bit mode.
    let code = [0x06, 0x90, 0x90, 0x90, 0x90, 0xc3];
    assert!(matches!(
        sized(&code),
        Err(Refusal::Undecodable { address: BASE, .. })
    ));
    let mem = SliceMemory {
        base: BASE,
        bytes: &LEAF,
    };
    let f = Function {
        address: BASE,
        size: Some(100),
    };
    assert!(matches!(
        analyze(&f, BASE, ProbeKind::Entry, &mem),
        Err(Refusal::Unreadable { .. })
    ));
    let f = Function {
        address: BASE,
        size: Some(u64::MAX),
    };
    assert!(matches!(
        analyze(&f, BASE, ProbeKind::Entry, &mem),
        Err(Refusal::Unreadable { .. })
    ));
    let f = Function {
        address: BASE - 0x1000,
        size: None,
    };
    assert!(matches!(
        analyze(&f, BASE - 0x1000, ProbeKind::Entry, &mem),
        Err(Refusal::Unreadable { .. })
    ));
}

/// `push rbx; mov rbx,rdi; BODY; pop rbx; ret` at `BASE`.
fn framed(body: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    assemble(BASE, |a| {
        a.push(rbx).unwrap();
        a.mov(rbx, rdi).unwrap();
        body(a);
        a.pop(rbx).unwrap();
        a.ret().unwrap();
    })
}

#[test]
fn references_into_stolen_bytes_are_refused() {
    // mov rax,[rip+site+2] inside the stolen bytes: reads code the patch changes.
    let code = assemble(BASE, |a| {
        rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), BASE + 2);
        a.ret().unwrap();
    });
    assert!(matches!(
        sized(&code),
        Err(Refusal::RipRelativeIntoStolen { target, .. }) if target == BASE + 2
    ));
    // Elsewhere in the function: lea of an address strictly inside.
    let code = framed(|a| {
        rip_rel(a, Code::Lea_r64_m, Some(Register::RAX), BASE + 1);
    });
    assert!(matches!(
        sized(&code),
        Err(Refusal::RipRelativeIntoStolen { target, .. }) if target == BASE + 1
    ));
    // ... but taking the function's own address is fine.
    let code = framed(|a| {
        rip_rel(a, Code::Lea_r64_m, Some(Register::RAX), BASE);
    });
    assert!(sized(&code).is_ok());
    // A call strictly inside the stolen bytes from later in the function.
    let code = framed(|a| {
        a.call(BASE + 1).unwrap();
    });
    assert!(matches!(
        sized(&code),
        Err(Refusal::BranchIntoStolen {
            mnemonic: Mnemonic::Call,
            ..
        })
    ));
    // The get-my-address idiom `call next; pop rax`.
    let code = [0xe8, 0, 0, 0, 0, 0x58, 0xc3];
    assert!(matches!(
        sized(&code),
        Err(Refusal::Unrelocatable {
            mnemonic: Mnemonic::Call,
            ..
        })
    ));
}

/// `lea rdx,[rip+T]; movsxd rax,[rdx+rdi*4]; add rax,rdx; jmp rax` with cases, and
/// the table after the code. `case_offset` chooses where case 0 goes.
fn switch(case0: Option<u64>) -> (Vec<u8>, u64) {
    let mut code = assemble(BASE, |a| {
        let mut table = a.create_label();
        a.push(rbx).unwrap();
        a.mov(ebx, edi).unwrap();
        a.lea(rdx, ptr(table)).unwrap();
        a.movsxd(rax, dword_ptr(rdx + rdi * 4)).unwrap();
        a.add(rax, rdx).unwrap();
        a.jmp(rax).unwrap();
        a.mov(eax, 1).unwrap();
        a.pop(rbx).unwrap();
        a.ret().unwrap();
        a.set_label(&mut table).unwrap();
        // Entry 0, entry 1, then something that is not an offset into the function.
        a.dd(&[0, 0, 0x4000_0000]).unwrap();
    });
    let table_ip = BASE + code.len() as u64 - 12;
    let ins = decode_all(&code[..code.len() - 12], BASE);
    let lea = ins.iter().find(|i| i.mnemonic() == Mnemonic::Lea).unwrap();
    assert_eq!(lea.ip_rel_memory_address(), table_ip);
    let case1 = ins
        .iter()
        .find(|i| i.code() == Code::Mov_r32_imm32)
        .unwrap()
        .ip();
    let entry = |t: u64| (t.wrapping_sub(table_ip) as i32).to_le_bytes();
    let n = code.len();
    code[n - 12..n - 8].copy_from_slice(&entry(case0.unwrap_or(case1)));
    code[n - 8..n - 4].copy_from_slice(&entry(case1));
    (code, table_ip)
}

#[test]
fn jump_tables_are_read() {
    let (code, _) = switch(None);
    assert!(sized(&code).is_ok(), "{:?}", sized(&code));
    let (code, table) = switch(Some(BASE + 1));
    match sized(&code) {
        Err(Refusal::JumpTableIntoStolen {
            table: t,
            index: 0,
            target,
            ..
        }) => {
            assert_eq!(t, table);
            assert_eq!(target, BASE + 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn constant_switch_is_read() {
    // movsxd rax,[rip+T]; lea rsi,[rip+T]; add rax,rsi; jmp rax; T: dd entry
    let table = BASE + 0x40;
    let build = |entry: u64| {
        let mut code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.pop(rbx).unwrap();
            rip_rel(a, Code::Movsxd_r64_rm32, Some(Register::RAX), table);
            rip_rel(a, Code::Lea_r64_m, Some(Register::RSI), table);
            a.add(rax, rsi).unwrap();
            a.jmp(rax).unwrap();
            a.ret().unwrap();
        });
        code.resize(0x40, 0xcc);
        code.extend_from_slice(&(entry.wrapping_sub(table) as i32).to_le_bytes());
        code
    };
    // An entry landing in the function but outside the stolen bytes (the padding).
    let ok = build(BASE + 0x3f);
    assert_eq!(decode_all(&ok, BASE)[5].mnemonic(), Mnemonic::Jmp);
    assert!(sized(&ok).is_ok(), "{:?}", sized(&ok));
    assert!(matches!(
        sized(&build(BASE + 2)),
        Err(Refusal::JumpTableIntoStolen { table: t, index: 0, .. }) if t == table
    ));
}

#[test]
fn pointer_tables_are_read() {
    // lea rdx,[rip+T]; jmp [rdx+rdi*8] (or through rax); T: dq entry, then a pointer
    // outside the function.
    let table = BASE + 0x40;
    let build = |entry: u64, through_rax: bool| {
        let mut code = assemble(BASE, |a| {
            a.push(rbx).unwrap();
            a.pop(rbx).unwrap();
            rip_rel(a, Code::Lea_r64_m, Some(Register::RDX), table);
            if through_rax {
                a.mov(rax, qword_ptr(rdx + rdi * 8)).unwrap();
                a.jmp(rax).unwrap();
            } else {
                a.jmp(qword_ptr(rdx + rdi * 8)).unwrap();
            }
            a.ret().unwrap();
        });
        code.resize(0x40, 0xcc);
        code.extend_from_slice(&entry.to_le_bytes());
        code.extend_from_slice(&0x4000_0000u64.to_le_bytes());
        code
    };
    for through_rax in [false, true] {
        let ok = build(BASE + 0x3f, through_rax);
        assert!(sized(&ok).is_ok(), "{:?}", sized(&ok));
        match sized(&build(BASE + 2, through_rax)) {
            Err(Refusal::JumpTableIntoStolen {
                table: t,
                index: 0,
                target,
                ..
            }) => assert_eq!((t, target), (table, BASE + 2)),
            other => panic!("through rax {through_rax}: {other:?}"),
        }
    }
}

#[test]
fn indirect_jumps() {
    // Tail call through a structure pointer: fine.
    let code = assemble(BASE, |a| {
        a.mov(rax, qword_ptr(rdi + 8)).unwrap();
        a.mov(rdi, rsi).unwrap();
        a.jmp(rax).unwrap();
    });
    assert!(sized(&code).is_ok());
    // Tail call through the GOT: fine.
    let code = assemble(BASE, |a| {
        a.mov(rdi, rsi).unwrap();
        a.add(rdi, 8).unwrap();
        rip_rel(a, Code::Jmp_rm64, None, BASE + 0x2000);
    });
    assert!(sized(&code).is_ok());
    // A computed jump that is not a recognised table: refused.
    let code = assemble(BASE, |a| {
        a.push(rbx).unwrap();
        a.pop(rbx).unwrap();
        a.mov(rax, qword_ptr(rsi + rdi * 4)).unwrap();
        a.jmp(rax).unwrap();
    });
    assert!(matches!(
        sized(&code),
        Err(Refusal::IndirectJump {
            mnemonic: Mnemonic::Jmp,
            ..
        })
    ));
    let code = assemble(BASE, |a| {
        a.push(rbx).unwrap();
        a.pop(rbx).unwrap();
        a.add(rax, rdi).unwrap();
        a.jmp(rax).unwrap();
    });
    assert!(matches!(sized(&code), Err(Refusal::IndirectJump { .. })));
}

#[test]
fn too_far_is_refused() {
    let data = BASE + 0x800;
    let code = assemble(BASE, |a| {
        rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), data);
        a.ret().unwrap();
    });
    let s = sized(&code).unwrap();
    match relocate(&s, BASE + 3 * GIB) {
        Err(Refusal::TooFar {
            address, target, ..
        }) => assert_eq!((address, target), (BASE, data)),
        other => panic!("{other:?}"),
    }
    let code = assemble(BASE, |a| {
        a.call(BASE + 0x5000).unwrap();
        a.ret().unwrap();
    });
    let s = sized(&code).unwrap();
    // A trailing call needs no reach: its jump goes through an inline pointer.
    let far = relocate(&s, BASE - 3 * GIB).unwrap();
    assert_eq!(far.call_jump, Some(CallEncoding::RipSlot));
    assert_eq!(
        far.bytes[far.bytes.len() - 8..],
        (BASE + 0x5000).to_le_bytes()
    );

    // A target below 4 GiB would let the encoder fall back to `[eip+X]`.
    let low = 0x4000_0000;
    let code = assemble(low, |a| {
        rip_rel(a, Code::Mov_r64_rm64, Some(Register::RAX), low + 0x800);
        a.ret().unwrap();
    });
    let mem = SliceMemory {
        base: low,
        bytes: &code,
    };
    let f = Function {
        address: low,
        size: Some(code.len() as u64),
    };
    let s = analyze(&f, low, ProbeKind::Entry, &mem).unwrap();
    assert!(matches!(
        relocate(&s, low + 3 * GIB),
        Err(Refusal::TooFar { .. })
    ));
    // No reference at all: any distance works.
    let s = sized(&LEAF).unwrap();
    assert!(relocate(&s, BASE + 100 * GIB).is_ok());
}

#[test]
fn refusals_read_as_sentences() {
    let e = sized(&[0x8d, 0x47, 0x01, 0xc3]).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("fewer than the 5"), "{text}");
}

#[test]
fn self_memory_reads_and_reports_unmapped() {
    let v = [1u8, 2, 3, 4];
    let mut b = [0u8; 4];
    assert!(SelfMemory.read(v.as_ptr() as u64, &mut b));
    assert_eq!(b, v);
    assert!(!SelfMemory.read(8, &mut b));
}

/// `sub rsp, 8` then `tail`, then `add rsp, 8; ret`.
fn after_sub_rsp(tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0x48, 0x83, 0xec, 0x08]; // sub rsp,8
    code.extend_from_slice(tail);
    code.extend_from_slice(&[0x48, 0x83, 0xc4, 0x08, 0xc3]); // add rsp,8 ; ret
    code
}

#[test]
fn trailing_call_through_rsp_reads_past_the_pushed_address() {
    // ff 54 24 78 ; call qword ptr [rsp+0x78]
    let s = sized(&after_sub_rsp(&[0xff, 0x54, 0x24, 0x78])).unwrap();
    let new_ip = BASE + GIB;
    let r = relocate(&s, new_ip).unwrap();
    let out = decode_all(&r.bytes, new_ip);
    let codes: Vec<Code> = out.iter().map(|i| i.code()).collect();
    assert_eq!(
        codes,
        [
            Code::Sub_rm64_imm8,
            Code::Pushq_imm32,
            Code::Mov_rm32_imm32,
            Code::Jmp_rm64
        ]
    );
    // ff a4 24 80 00 00 00 ; jmp qword ptr [rsp+0x80]: the displacement no longer fits
    // in a byte.
    assert_eq!(
        r.bytes[r.bytes.len() - 7..],
        [0xff, 0xa4, 0x24, 0x80, 0, 0, 0]
    );
    assert_eq!(out[3].memory_base(), Register::RSP);
    assert_eq!(out[3].memory_displacement64(), 0x80);
    assert_eq!(r.instruction_offsets, vec![0, 4]);
    assert_eq!(
        r.call_jump, None,
        "the jump goes through the call's own operand"
    );
    assert!(!r.falls_through);
}

#[test]
fn indirect_calls_the_rewrite_cannot_express_are_refused() {
    let cases: [(&[u8], &str); 4] = [
        // ff d4 ; call rsp
        (&[0xff, 0xd4], "it calls the stack pointer"),
        // 67 ff 54 24 08 ; call qword ptr [esp+8]
        (
            &[0x67, 0xff, 0x54, 0x24, 0x08],
            "a 32-bit address relative to esp is not supported",
        ),
        // ff 94 24 fc ff ff 7f ; call qword ptr [rsp+0x7ffffffc]
        (
            &[0xff, 0x94, 0x24, 0xfc, 0xff, 0xff, 0x7f],
            "its displacement from rsp is too large",
        ),
        // 48 ff 18 ; call far qword ptr [rax]
        (
            &[0x48, 0xff, 0x18],
            "only 64-bit near indirect calls are supported",
        ),
    ];
    for (tail, why) in cases {
        match sized(&after_sub_rsp(tail)) {
            Err(Refusal::Unrelocatable {
                address, reason, ..
            }) => assert_eq!((address, reason), (BASE + 4, why)),
            other => panic!("{tail:02x?}: {other:?}"),
        }
    }
}

#[test]
fn a_call_before_the_last_stolen_instruction_is_refused() {
    // ff d0 ; call rax      (returns to BASE+2, inside the patch)
    // 48 83 c4 08 ; add rsp,8
    // c3 ; ret
    let code = [0xff, 0xd0, 0x48, 0x83, 0xc4, 0x08, 0xc3];
    let expected = Refusal::ReturnIntoStolen {
        address: BASE,
        mnemonic: Mnemonic::Call,
        returns_to: BASE + 2,
    };
    assert_eq!(sized(&code).unwrap_err(), expected);
    // The same at an offset probe: 31 c0 ; xor eax,eax, then the call.
    let mut code = vec![0x31, 0xc0];
    code.extend_from_slice(&[0xff, 0xd0, 0x48, 0x83, 0xc4, 0x08, 0xc3]);
    let mem = SliceMemory {
        base: BASE,
        bytes: &code,
    };
    let func = Function {
        address: BASE,
        size: Some(code.len() as u64),
    };
    match analyze(&func, BASE + 2, ProbeKind::Offset, &mem) {
        Err(Refusal::ReturnIntoStolen { returns_to, .. }) => assert_eq!(returns_to, BASE + 4),
        other => panic!("{other:?}"),
    }
    // A stolen set built by hand is refused by the rewrite too.
    let mut s = sized(&after_sub_rsp(&[0xff, 0xd0])).unwrap();
    s.instructions.swap(0, 1);
    assert!(matches!(
        relocate(&s, BASE + GIB),
        Err(Refusal::ReturnIntoStolen { .. })
    ));
}
