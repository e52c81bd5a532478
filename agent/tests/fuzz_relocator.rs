//! Property tests ("fuzzing") of the relocator's decoder paths through its public API:
//! `analyze` and `relocate` on arbitrary bytes at arbitrary addresses, read through a
//! `Memory` that serves the fuzz bytes (with unreadable holes around them).
//!
//! Properties: never a panic; a refusal is a `Refusal` with a one-line message; what is
//! stolen covers at least the patch, is the bytes at the site, and decodes back to the
//! stolen instructions; relocated code decodes cleanly at its new address, with the same
//! instructions (count, order, mnemonics) at the reported offsets, and resumes where the
//! stolen bytes end; a trailing `call` becomes a `push` of its return address and a jump
//! to its callee.
//!
//! Case counts keep the whole fuzz set under a minute on a 2-core machine; set
//! `FUZZ_CASES=N` for a longer run (`bash bench/fuzz.sh` does).

use agent::relocator::{
    analyze, relocate, Function, Memory, ProbeKind, Refusal, SliceMemory, PATCH_LEN,
};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use proptest::prelude::*;

/// Encoded instructions that real prologues start with, so that cases get past the
/// first decode more often than random bytes do. Displacements are fuzzed separately.
const FRAGMENTS: &[&[u8]] = &[
    &[0xf3, 0x0f, 0x1e, 0xfa],       // endbr64
    &[0x55],                         // push rbp
    &[0x48, 0x89, 0xe5],             // mov rbp, rsp
    &[0x41, 0x57],                   // push r15
    &[0x53],                         // push rbx
    &[0x48, 0x83, 0xec, 0x28],       // sub rsp, 0x28
    &[0x31, 0xc0],                   // xor eax, eax
    &[0x48, 0x85, 0xff],             // test rdi, rdi
    &[0x48, 0x8d, 0x05],             // lea rax, [rip+disp32] (disp follows)
    &[0x48, 0x8b, 0x05],             // mov rax, [rip+disp32]
    &[0xff, 0x25],                   // jmp [rip+disp32]
    &[0xff, 0x15],                   // call [rip+disp32]
    &[0xe8],                         // call rel32
    &[0xe9],                         // jmp rel32
    &[0xeb],                         // jmp rel8
    &[0x74],                         // je rel8
    &[0x0f, 0x85],                   // jne rel32
    &[0xe3],                         // jrcxz rel8
    &[0xe2],                         // loop rel8
    &[0xc3],                         // ret
    &[0xcc],                         // int3
    &[0x0f, 0x0b],                   // ud2
    &[0x90],                         // nop
    &[0x0f, 0x1f, 0x44, 0x00, 0x00], // nop dword [rax+rax]
    &[0xff, 0xe0],                   // jmp rax
    &[0x48, 0x63, 0x04, 0x87],       // movsxd rax, [rdi+rax*4]
    &[0xc5, 0xf9, 0x6f, 0x05],       // vmovdqa xmm0, [rip+disp32]
    &[0x64, 0x48, 0x8b, 0x04, 0x25], // mov rax, fs:[disp32]
    &[0x0f, 0x05],                   // syscall
    &[0x66, 0x0f, 0x2e, 0x05],       // ucomisd xmm0, [rip+disp32]
    &[0xc7, 0xf8],                   // xbegin rel32
];

/// Function bytes: random noise, or fragments with random bytes (displacements,
/// immediates) between them.
fn code() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => (0..FRAGMENTS.len()).prop_map(|i| FRAGMENTS[i].to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 1..5),
    ];
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..48),
        3 => proptest::collection::vec(piece, 0..14).prop_map(|v| v.concat()),
    ]
}

/// Addresses: anywhere in 64 bits, near zero, near the top of user space, near the top
/// of the address space (where `address + len` overflows).
fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..0x1_0000,
        0x7fff_ffff_0000u64..0x8000_0000_0000,
        (u64::MAX - 0x1_0000)..=u64::MAX,
        0x5555_5555_0000u64..0x5555_5556_0000,
    ]
}

/// The symbol size: usually the real one, sometimes missing or nonsense.
#[derive(Debug, Clone)]
enum SizeChoice {
    Exact,
    Given(Option<u64>),
}

#[derive(Debug, Clone)]
struct Case {
    before: Vec<u8>,
    code: Vec<u8>,
    after: Vec<u8>,
    base: u64,
    size: Option<u64>,
    offset_probe: Option<u64>,
    new_ip_delta: i64,
    new_ip_anywhere: Option<u64>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        code(),
        code(),
        code(),
        address(),
        prop_oneof![
            4 => Just(SizeChoice::Exact),
            2 => Just(SizeChoice::Given(None)),
            1 => Just(SizeChoice::Given(Some(u64::MAX))),
            1 => Just(SizeChoice::Given(Some(0))),
            1 => (0u64..80).prop_map(|s| SizeChoice::Given(Some(s))),
            1 => any::<u64>().prop_map(|s| SizeChoice::Given(Some(s))),
        ],
        proptest::option::weighted(0.3, 0u64..48),
        prop_oneof![
            -0x1000i64..0x1000,
            -(3i64 << 30)..(3i64 << 30),
            (i32::MAX as i64 - 0x2000)..(i32::MAX as i64 + 0x2000),
        ],
        proptest::option::weighted(0.1, any::<u64>()),
    )
        .prop_map(
            |(before, code, after, base, size, offset_probe, new_ip_delta, new_ip_anywhere)| Case {
                size: match size {
                    SizeChoice::Exact => Some(code.len() as u64),
                    SizeChoice::Given(s) => s,
                },
                before,
                code,
                after,
                base,
                offset_probe,
                new_ip_delta,
                new_ip_anywhere,
            },
        )
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let func_addr = c.base;
    let mem_base = func_addr.wrapping_sub(c.before.len() as u64);
    if mem_base > func_addr {
        return Ok(()); // the neighbourhood would wrap below zero
    }
    let bytes = [c.before.as_slice(), &c.code, &c.after].concat();
    if mem_base.checked_add(bytes.len() as u64).is_none() {
        return Ok(()); // the test's memory would wrap past the top
    }
    // The fuzz bytes mapped at `mem_base`; everything else is unreadable.
    let mem = SliceMemory {
        base: mem_base,
        bytes: &bytes,
    };
    let func = Function {
        address: func_addr,
        size: c.size,
    };
    let (kind, site) = match c.offset_probe {
        None => (ProbeKind::Entry, func_addr),
        Some(o) => (ProbeKind::Offset, func_addr.wrapping_add(o)),
    };
    let stolen = match analyze(&func, site, kind, &mem) {
        Ok(s) => s,
        Err(r) => {
            REACHED.with(|x| {
                *x.borrow_mut()
                    .analyze_refused
                    .entry(variant(&r))
                    .or_default() += 1
            });
            return check_refusal(&r);
        }
    };

    // What is stolen: at least the patch, contiguous instructions from the site, the
    // bytes that are really there.
    prop_assert!(stolen.len >= PATCH_LEN);
    prop_assert_eq!(stolen.original.len(), stolen.len);
    let mut at_site = vec![0u8; stolen.len];
    prop_assert!(mem.read(stolen.site, &mut at_site));
    prop_assert_eq!(&at_site, &stolen.original);
    match kind {
        ProbeKind::Entry | ProbeKind::Exit => prop_assert_eq!(
            stolen.site,
            func_addr + if stolen.skipped_endbr64 { 4 } else { 0 }
        ),
        ProbeKind::Offset => prop_assert_eq!(stolen.site, site),
    }
    let mut ip = stolen.site;
    for ins in &stolen.instructions {
        prop_assert_eq!(ins.ip(), ip);
        prop_assert!(!ins.is_invalid());
        ip += ins.len() as u64;
    }
    prop_assert_eq!(ip, stolen.resume());
    let redecoded = decode(&stolen.original, stolen.site);
    prop_assert_eq!(mnemonics(&redecoded), mnemonics(&stolen.instructions));

    let new_ip = c
        .new_ip_anywhere
        .unwrap_or_else(|| stolen.site.wrapping_add_signed(c.new_ip_delta));
    match relocate(&stolen, new_ip) {
        Ok(r) => {
            REACHED.with(|x| x.borrow_mut().relocated += 1);
            check_relocated(&stolen, &r, new_ip)
        }
        Err(r) => {
            REACHED.with(|x| {
                *x.borrow_mut()
                    .relocate_refused
                    .entry(variant(&r))
                    .or_default() += 1
            });
            check_refusal(&r)
        }
    }
}

fn check_refusal(r: &Refusal) -> Result<(), TestCaseError> {
    let msg = r.to_string();
    prop_assert!(!msg.is_empty());
    prop_assert!(!msg.contains('\n'), "refusal is not one line: {msg:?}");
    Ok(())
}

fn check_relocated(
    stolen: &agent::relocator::Stolen,
    r: &agent::relocator::Relocated,
    new_ip: u64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.new_ip, new_ip);
    prop_assert_eq!(r.resume, stolen.resume());
    prop_assert_eq!(r.instruction_offsets.len(), stolen.instructions.len());
    // A trailing call, direct or indirect, is rewritten as `push; mov; jmp`: checked on
    // its own, the rest as the block before it.
    let last = stolen.instructions.last().unwrap();
    let (n, end) = match (r.call_jump, last.code()) {
        (Some(_), _) => {
            let off = *r.instruction_offsets.last().unwrap() as usize;
            prop_assert_eq!(last.mnemonic(), Mnemonic::Call);
            check_trailing_call(
                &r.bytes[off..],
                new_ip.wrapping_add(off as u64),
                stolen.resume(),
                last.near_branch_target(),
            )?;
            (stolen.instructions.len() - 1, off)
        }
        (None, Code::Call_rm64) => {
            let off = *r.instruction_offsets.last().unwrap() as usize;
            check_trailing_indirect_call(
                &r.bytes[off..],
                new_ip.wrapping_add(off as u64),
                stolen.resume(),
                last,
            )?;
            (stolen.instructions.len() - 1, off)
        }
        (None, _) => {
            prop_assert!(
                stolen
                    .instructions
                    .iter()
                    .all(|i| i.mnemonic() != Mnemonic::Call),
                "a stolen call was not rewritten"
            );
            (stolen.instructions.len(), r.bytes.len())
        }
    };
    let (instructions, offsets) = (&stolen.instructions[..n], &r.instruction_offsets[..n]);
    let bytes = &r.bytes[..end];
    let out = decode(bytes, new_ip);
    prop_assert!(
        out.iter().all(|i| !i.is_invalid()),
        "relocated bytes do not decode"
    );
    prop_assert_eq!(
        out.iter().map(|i| i.len()).sum::<usize>(),
        bytes.len(),
        "decoded lengths do not add up"
    );
    let expanded = offsets.contains(&u32::MAX);
    if !expanded {
        prop_assert_eq!(out.len(), instructions.len(), "instruction count changed");
    } else {
        prop_assert!(out.len() > instructions.len());
    }
    // Each stolen instruction sits at its reported offset, in order, as the same
    // instruction (a widened jcc or jmp keeps its mnemonic).
    let mut last = None;
    for (orig, &off) in instructions.iter().zip(offsets) {
        if off == u32::MAX {
            prop_assert!(
                matches!(
                    orig.mnemonic(),
                    Mnemonic::Jrcxz
                        | Mnemonic::Jecxz
                        | Mnemonic::Loop
                        | Mnemonic::Loope
                        | Mnemonic::Loopne
                ),
                "{:?} was expanded",
                orig.mnemonic()
            );
            continue;
        }
        prop_assert!((off as usize) < bytes.len());
        prop_assert!(last.is_none_or(|l| off > l), "offsets not increasing");
        last = Some(off);
        let at = new_ip.wrapping_add(off as u64);
        let new = out.iter().find(|i| i.ip() == at);
        prop_assert!(new.is_some(), "no instruction starts at offset {off}");
        let new = new.unwrap();
        prop_assert_eq!(new.mnemonic(), orig.mnemonic());
        prop_assert!(new.len() >= 1 && new.len() <= 15);
    }
    // Growth is bounded: rel8 branches widen to rel32, `loop`/`jrcxz` become a hop over
    // a `jmp rel32`; nothing else grows.
    prop_assert!(bytes.len() <= stolen.len + 12 * stolen.instructions.len());
    Ok(())
}

/// `push imm32; mov dword [rsp+4], imm32` pushing `resume`, at the start of `out`.
fn check_push_resume(out: &[Instruction], resume: u64) -> Result<(), TestCaseError> {
    prop_assert!(out.len() >= 3, "{out:?}");
    prop_assert_eq!(out[0].code(), Code::Pushq_imm32);
    prop_assert_eq!(out[0].immediate32(), resume as u32);
    prop_assert_eq!(out[1].code(), Code::Mov_rm32_imm32);
    prop_assert_eq!(out[1].memory_base(), Register::RSP);
    prop_assert_eq!(out[1].memory_displacement64(), 4);
    prop_assert_eq!(out[1].immediate32(), (resume >> 32) as u32);
    Ok(())
}

/// `push resume` then `jmp` through the operand of `call`, read after the push: the same
/// register, the same absolute address relative to `rip`, 8 more relative to `rsp`, any
/// other memory operand unchanged; nothing after it.
fn check_trailing_indirect_call(
    tail: &[u8],
    ip: u64,
    resume: u64,
    call: &Instruction,
) -> Result<(), TestCaseError> {
    let out = decode(tail, ip);
    check_push_resume(&out, resume)?;
    prop_assert_eq!(out.len(), 3, "{:?}", out);
    let jmp = &out[2];
    prop_assert_eq!(jmp.code(), Code::Jmp_rm64);
    prop_assert_eq!(jmp.next_ip(), ip + tail.len() as u64);
    prop_assert_eq!(jmp.op0_kind(), call.op0_kind());
    if call.op0_kind() == OpKind::Register {
        prop_assert_eq!(jmp.op0_register(), call.op0_register());
        return Ok(());
    }
    prop_assert_eq!(jmp.segment_prefix(), call.segment_prefix());
    if call.is_ip_rel_memory_operand() {
        prop_assert!(jmp.is_ip_rel_memory_operand());
        prop_assert_eq!(jmp.ip_rel_memory_address(), call.ip_rel_memory_address());
        return Ok(());
    }
    prop_assert_eq!(jmp.memory_base(), call.memory_base());
    prop_assert_eq!(jmp.memory_index(), call.memory_index());
    prop_assert_eq!(jmp.memory_index_scale(), call.memory_index_scale());
    let shift = if call.memory_base() == Register::RSP {
        8
    } else {
        0
    };
    prop_assert_eq!(
        jmp.memory_displacement64(),
        call.memory_displacement64().wrapping_add(shift)
    );
    Ok(())
}

/// `push imm32; mov dword [rsp+4], imm32; jmp` to `target`, rel32 or through the eight
/// bytes after a `jmp [rip+0]`, pushing `resume`.
fn check_trailing_call(
    tail: &[u8],
    ip: u64,
    resume: u64,
    target: u64,
) -> Result<(), TestCaseError> {
    let out = decode(tail, ip);
    check_push_resume(&out, resume)?;
    let jmp = &out[2];
    let jmp_end = (jmp.next_ip().wrapping_sub(ip)) as usize;
    match jmp.code() {
        Code::Jmp_rel32_64 => {
            prop_assert_eq!(jmp.near_branch_target(), target);
            prop_assert_eq!(jmp_end, tail.len());
        }
        Code::Jmp_rm64 => {
            prop_assert!(jmp.is_ip_rel_memory_operand());
            prop_assert_eq!(jmp.ip_rel_memory_address(), jmp.next_ip());
            prop_assert_eq!(&tail[jmp_end..], &target.to_le_bytes()[..]);
        }
        other => prop_assert!(false, "{other:?}"),
    }
    Ok(())
}

fn decode(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
        .into_iter()
        .collect()
}

fn mnemonics(v: &[Instruction]) -> Vec<Mnemonic> {
    v.iter().map(|i| i.mnemonic()).collect()
}

/// What the cases reached, so that a generator that stops reaching the relocator fails
/// the test instead of passing it vacuously.
#[derive(Default, Debug)]
struct Reached {
    analyze_refused: std::collections::BTreeMap<String, usize>,
    relocate_refused: std::collections::BTreeMap<String, usize>,
    relocated: usize,
}

thread_local! {
    static REACHED: std::cell::RefCell<Reached> = Default::default();
}

fn variant(r: &Refusal) -> String {
    format!("{r:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn analyze_and_relocate_arbitrary_code() {
    let mut runner = proptest::test_runner::TestRunner::new(tests::fuzz_cases(6000));
    let result = runner.run(&case(), |c| check(&c));
    let reached = REACHED.with(|r| std::mem::take(&mut *r.borrow_mut()));
    eprintln!("{reached:#?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(reached.relocated > 0, "no case was relocated: {reached:?}");
    assert!(
        reached.analyze_refused.len() >= 4,
        "too few kinds of refusal: {reached:?}"
    );
}

/// Found by this fuzzer (2026-11-30, `bash bench/fuzz.sh 50000`): a 21-byte function whose
/// bytes end at the last byte of the address space makes `analyze` panic with "attempt to
/// add with overflow" (`func.address + code.len()` in `analyze`, debug builds; release
/// builds wrap). No user-space code lives there, but a refusal, not a panic, is the
/// contract: such a size is refused as unreadable.
#[test]
fn function_ending_at_the_top_of_the_address_space() {
    let base = u64::MAX - 20;
    let bytes = [0u8; 21];
    let mem = SliceMemory {
        base,
        bytes: &bytes,
    };
    let func = Function {
        address: base,
        size: Some(21),
    };
    let r = std::panic::catch_unwind(|| analyze(&func, base, ProbeKind::Entry, &mem).map(|_| ()));
    assert!(r.is_ok(), "analyze panicked");
}
