//! Golden tests of the relocator's rewrites, in the style of iced-x86's own tests: each
//! case lists the code as bytes beside their disassembly, before and after relocation,
//! one case per instruction class, then a refusal of each kind with its message.
//!
//! The listings are checked both ways: the input bytes must disassemble to the text
//! written beside them (so the case says what it tests), and the relocated bytes must
//! be exactly the expected ones, with the expected disassembly.

use agent::relocator::{analyze, relocate, Function, ProbeKind, Refusal, SliceMemory};
use iced_x86::{Code, Decoder, DecoderOptions, Formatter, IntelFormatter};

/// Where the function is mapped.
const BASE: u64 = 0x7f12_3456_0000;
/// Where the trampoline is, 256 MiB above.
const NEAR: u64 = BASE + 0x1000_0000;
/// A trampoline out of rel32 reach, 3 GiB below.
const FAR: u64 = BASE - 0xc000_0000;

/// `bytes ; disassembly` for each instruction of `code` at `ip`. The eight bytes after a
/// `jmp qword [rip+0]` are its target, shown as `dq`.
fn listing(code: &[u8], ip: u64) -> Vec<String> {
    let mut f = IntelFormatter::new();
    f.options_mut().set_hex_prefix("0x");
    f.options_mut().set_hex_suffix("");
    f.options_mut().set_uppercase_hex(false);
    f.options_mut().set_branch_leading_zeros(false);
    let mut out = Vec::new();
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    while d.can_decode() {
        let ins = d.decode();
        let start = (ins.ip() - ip) as usize;
        let bytes = &code[start..start + ins.len()];
        let mut text = String::new();
        f.format(&ins, &mut text);
        out.push(format!("{} ; {text}", hex(bytes)));
        if ins.code() == Code::Jmp_rm64 && ins.ip_rel_memory_address() == ins.next_ip() {
            let at = start + ins.len();
            let slot = &code[at..at + 8];
            let value = u64::from_le_bytes(slot.try_into().unwrap());
            out.push(format!("{} ; dq {value:#x}", hex(slot)));
            d.set_position(at + 8).unwrap();
            d.set_ip(ins.next_ip() + 8);
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The bytes of a golden listing, checked against the disassembly written beside them.
/// Lines from the first `; dd` on are data (a jump table), not decoded.
fn assemble(lines: &[&str], ip: u64) -> Vec<u8> {
    let to_bytes = |lines: &[&str]| -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| l.split(" ; ").next().unwrap().split(' '))
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect()
    };
    let split = lines
        .iter()
        .position(|l| l.contains("; dd "))
        .unwrap_or(lines.len());
    let (code, data) = lines.split_at(split);
    let mut bytes = to_bytes(code);
    assert_eq!(
        listing(&bytes, ip),
        code,
        "the input listing does not decode as written"
    );
    bytes.extend(to_bytes(data));
    bytes
}

/// Analyses an entry probe on the function `code` (its size known) at [`BASE`].
fn analyze_entry(code: &[u8]) -> Result<agent::relocator::Stolen, Refusal> {
    let mem = SliceMemory {
        base: BASE,
        bytes: code,
    };
    let f = Function {
        address: BASE,
        size: Some(code.len() as u64),
    };
    analyze(&f, BASE, ProbeKind::Entry, &mem)
}

/// Relocates the entry of `function` to `new_ip` and compares with `expected`; returns
/// whether the result falls through (the trampoline then appends the jump back).
fn golden(function: &[&str], new_ip: u64, expected: &[&str]) -> bool {
    let code = assemble(function, BASE);
    let stolen = analyze_entry(&code).unwrap();
    let r = relocate(&stolen, new_ip).unwrap();
    assert_eq!(listing(&r.bytes, new_ip), expected);
    r.falls_through
}

#[test]
fn rip_relative_load_keeps_its_absolute_address() {
    let falls = golden(
        &[
            "48 8b 05 f9 07 00 00 ; mov rax,[0x7f1234560800]",
            "48 03 c7 ; add rax,rdi",
            "c3 ; ret",
        ],
        NEAR,
        &["48 8b 05 f9 07 00 f0 ; mov rax,[0x7f1234560800]"],
    );
    assert!(falls);
}

#[test]
fn jcc_rel8_is_widened_to_rel32() {
    let falls = golden(
        &[
            "48 85 ff ; test rdi,rdi",
            "74 06 ; je short 0x7f123456000b",
            "b8 01 00 00 00 ; mov eax,1",
            "c3 ; ret",
            "b8 02 00 00 00 ; mov eax,2",
            "c3 ; ret",
        ],
        NEAR,
        &[
            "48 85 ff ; test rdi,rdi",
            "0f 84 02 00 00 f0 ; je 0x7f123456000b",
        ],
    );
    assert!(falls);
}

#[test]
fn jmp_rel8_becomes_jmp_rel32() {
    let falls = golden(
        &[
            "31 c0 ; xor eax,eax",
            "89 d1 ; mov ecx,edx",
            "eb 02 ; jmp short 0x7f1234560008",
            "90 ; nop",
            "90 ; nop",
            "c3 ; ret",
        ],
        NEAR,
        &[
            "31 c0 ; xor eax,eax",
            "89 d1 ; mov ecx,edx",
            "e9 ff ff ff ef ; jmp 0x7f1234560008",
        ],
    );
    assert!(!falls, "nothing runs after an unconditional jump");
}

#[test]
fn jmp_rel32_keeps_its_target() {
    let falls = golden(
        &["e9 fb 1f 00 00 ; jmp 0x7f1234562000"],
        NEAR,
        &["e9 fb 1f 00 f0 ; jmp 0x7f1234562000"],
    );
    assert!(!falls);
}

#[test]
fn call_rel32_at_the_end_pushes_the_original_return_address() {
    let function = [
        "53 ; push rbx",
        "e8 fa 4f 00 00 ; call 0x7f1234565000",
        "5b ; pop rbx",
        "c3 ; ret",
    ];
    // `f` returns to site + 6, in the original code, as it would unprobed.
    let falls = golden(
        &function,
        NEAR,
        &[
            "53 ; push rbx",
            "68 06 00 56 34 ; push 0x34560006",
            "c7 44 24 04 12 7f 00 00 ; mov dword ptr [rsp+4],0x7f12",
            "e9 ed 4f 00 f0 ; jmp 0x7f1234565000",
        ],
    );
    assert!(!falls);
    // Out of rel32 reach the jump goes through the pointer after it, still touching
    // no register.
    let falls = golden(
        &function,
        FAR,
        &[
            "53 ; push rbx",
            "68 06 00 56 34 ; push 0x34560006",
            "c7 44 24 04 12 7f 00 00 ; mov dword ptr [rsp+4],0x7f12",
            "ff 25 00 00 00 00 ; jmp qword ptr [0x7f1174560014]",
            "00 50 56 34 12 7f 00 00 ; dq 0x7f1234565000",
        ],
    );
    assert!(!falls);
}

/// A trailing indirect call (`call reg`, `call [mem]`, as `gcc -fno-plt` emits for calls
/// into other libraries) is rewritten like a direct one: `push` of the original return
/// address, then a `jmp` through the same operand, so that the callee returns into the
/// original code (its `__builtin_return_address`, backtraces and C++ unwinding see the
/// probed function, not the trampoline).
#[test]
fn indirect_call_at_the_end_pushes_the_original_return_address() {
    // A register operand is unchanged.
    let falls = golden(
        &[
            "48 83 ec 08 ; sub rsp,8",
            "ff d7 ; call rdi",
            "48 83 c4 08 ; add rsp,8",
            "c3 ; ret",
        ],
        NEAR,
        &[
            "48 83 ec 08 ; sub rsp,8",
            "68 06 00 56 34 ; push 0x34560006",
            "c7 44 24 04 12 7f 00 00 ; mov dword ptr [rsp+4],0x7f12",
            "ff e7 ; jmp rdi",
        ],
    );
    assert!(!falls);
    // A memory operand relative to rsp reads 8 bytes higher after the push.
    let falls = golden(
        &[
            "57 ; push rdi",
            "6a 00 ; push 0",
            "ff 54 24 08 ; call qword ptr [rsp+8]",
            "48 83 c4 10 ; add rsp,0x10",
            "c3 ; ret",
        ],
        NEAR,
        &[
            "57 ; push rdi",
            "6a 00 ; push 0",
            "68 07 00 56 34 ; push 0x34560007",
            "c7 44 24 04 12 7f 00 00 ; mov dword ptr [rsp+4],0x7f12",
            "ff 64 24 10 ; jmp qword ptr [rsp+0x10]",
        ],
    );
    assert!(!falls);
    // One relative to rip keeps its absolute address (the GOT slot).
    let falls = golden(
        &[
            "48 83 ec 08 ; sub rsp,8",
            "ff 15 f6 0f 00 00 ; call qword ptr [0x7f1234561000]",
            "48 83 c4 08 ; add rsp,8",
            "c3 ; ret",
        ],
        NEAR,
        &[
            "48 83 ec 08 ; sub rsp,8",
            "68 0a 00 56 34 ; push 0x3456000a",
            "c7 44 24 04 12 7f 00 00 ; mov dword ptr [rsp+4],0x7f12",
            "ff 25 e9 0f 00 f0 ; jmp qword ptr [0x7f1234561000]",
        ],
    );
    assert!(!falls);
}

#[test]
fn endbr64_is_kept_in_place() {
    let code = assemble(
        &[
            "f3 0f 1e fa ; endbr64",
            "55 ; push rbp",
            "48 89 e5 ; mov rbp,rsp",
            "89 f8 ; mov eax,edi",
            "5d ; pop rbp",
            "c3 ; ret",
        ],
        BASE,
    );
    let stolen = analyze_entry(&code).unwrap();
    assert_eq!(stolen.site, BASE + 4, "the patch goes after endbr64");
    let r = relocate(&stolen, NEAR).unwrap();
    assert_eq!(
        listing(&r.bytes, NEAR),
        [
            "55 ; push rbp",
            "48 89 e5 ; mov rbp,rsp",
            "89 f8 ; mov eax,edi"
        ]
    );
}

#[test]
fn branch_between_stolen_instructions_stays_internal() {
    let falls = golden(
        &[
            "85 ff ; test edi,edi",
            "74 00 ; je short 0x7f1234560004",
            "8d 47 01 ; lea eax,[rdi+1]",
            "c3 ; ret",
        ],
        NEAR,
        &[
            "85 ff ; test edi,edi",
            "74 00 ; je short 0x7f1244560004",
            "8d 47 01 ; lea eax,[rdi+1]",
        ],
    );
    assert!(falls);
}

/// The refusal of an entry probe on `function`, relocated to [`FAR`] if analysis
/// accepts it.
fn refusal(function: &[&str]) -> Refusal {
    let code = assemble(function, BASE);
    match analyze_entry(&code) {
        Err(r) => r,
        Ok(stolen) => relocate(&stolen, FAR).expect_err("expected a refusal"),
    }
}

#[test]
fn each_refusal_kind_with_its_message() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["8d 47 01 ; lea eax,[rdi+1]", "c3 ; ret"],
            "only 4 bytes of the function remain at 0x7f1234560000, fewer than the 5 the jump patch needs",
        ),
        (
            &["31 c0 ; xor eax,eax", "eb 10 ; jmp short 0x7f1234560014", "90 ; nop", "90 ; nop"],
            "the code at 0x7f1234560000 ends with `jmp` at 0x7f1234560002 after 4 bytes, fewer than the 5 the jump patch needs",
        ),
        (
            &[
                "31 c0 ; xor eax,eax",
                "83 c0 03 ; add eax,3",
                "ff cf ; dec edi",
                "75 f9 ; jne short 0x7f1234560002",
                "c3 ; ret",
            ],
            "the `jne` at 0x7f1234560007 goes to 0x7f1234560002, inside the bytes 0x7f1234560000..0x7f1234560005 the patch would overwrite",
        ),
        (
            &["48 8b 05 f9 ff ff ff ; mov rax,[0x7f1234560000]", "c3 ; ret"],
            "the `mov` at 0x7f1234560000 refers to 0x7f1234560000, inside the bytes the patch would overwrite",
        ),
        (
            &["e8 00 00 00 00 ; call 0x7f1234560005", "58 ; pop rax", "c3 ; ret"],
            "the `call` at 0x7f1234560000 cannot be moved to a trampoline: it calls the next instruction to learn its own address",
        ),
        (
            &[
                "53 ; push rbx",
                "5b ; pop rbx",
                "48 8b 04 be ; mov rax,[rsi+rdi*4]",
                "ff e0 ; jmp rax",
            ],
            "the indirect `jmp` at 0x7f1234560006 could land anywhere in the function, including inside the bytes the patch would overwrite",
        ),
        (
            &[
                "53 ; push rbx",
                "5b ; pop rbx",
                "48 63 05 0d 00 00 00 ; movsxd rax,[0x7f1234560016]",
                "48 8d 35 06 00 00 00 ; lea rsi,[0x7f1234560016]",
                "48 01 f0 ; add rax,rsi",
                "ff e0 ; jmp rax",
                "c3 ; ret",
                "ec ff ff ff ; dd -20",
            ],
            "entry 0 of the jump table at 0x7f1234560016 used by the jump at 0x7f1234560013 goes to 0x7f1234560002, inside the bytes the patch would overwrite",
        ),
        (
            &[
                "ff d0 ; call rax",
                "48 83 c4 08 ; add rsp,8",
                "c3 ; ret",
            ],
            "the `call` at 0x7f1234560000 returns to 0x7f1234560002, inside the bytes the patch would overwrite",
        ),
        (
            &[
                "48 83 ec 08 ; sub rsp,8",
                "ff 15 f6 0f 00 00 ; call qword ptr [0x7f1234561000]",
                "c3 ; ret",
            ],
            "the instruction at 0x7f1234560004 refers to 0x7f1234561000, out of 32-bit reach from the trampoline at 0x7f1174560000; the trampoline must be within 2 GiB of the code",
        ),
        (
            &["48 8b 05 f9 07 00 00 ; mov rax,[0x7f1234560800]", "c3 ; ret"],
            "the instruction at 0x7f1234560000 refers to 0x7f1234560800, out of 32-bit reach from the trampoline at 0x7f1174560000; the trampoline must be within 2 GiB of the code",
        ),
        (
            &["06 90 ; (bad)", "90 ; nop", "90 ; nop", "90 ; nop", "c3 ; ret"],
            "the bytes at 0x7f1234560000 (06 90 90 90 90 c3) are not a valid x86-64 instruction; is this really code?",
        ),
    ];
    for (function, message) in cases {
        assert_eq!(refusal(function).to_string(), *message, "{function:#?}");
    }
}

#[test]
fn refusals_about_the_site() {
    let code = assemble(
        &[
            "48 31 c0 ; xor rax,rax",
            "48 83 c0 01 ; add rax,1",
            "c3 ; ret",
        ],
        BASE,
    );
    let mem = SliceMemory {
        base: BASE,
        bytes: &code,
    };
    let f = Function {
        address: BASE,
        size: Some(code.len() as u64),
    };
    let cases = [
        (
            BASE + 3,
            ProbeKind::Entry,
            "an entry probe must be placed at the function start 0x7f1234560000, not at 0x7f1234560003; use an offset probe instead",
        ),
        (
            BASE + 5,
            ProbeKind::Offset,
            "the site 0x7f1234560005 is in the middle of the `add` instruction at 0x7f1234560003; choose an instruction boundary",
        ),
        (
            BASE + 8,
            ProbeKind::Offset,
            "the site 0x7f1234560008 is outside the function 0x7f1234560000..0x7f1234560008",
        ),
    ];
    for (site, kind, message) in cases {
        let r = analyze(&f, site, kind, &mem).unwrap_err();
        assert_eq!(r.to_string(), message);
    }
    let unmapped = Function {
        address: BASE - 0x1000,
        size: Some(16),
    };
    assert_eq!(
        analyze(&unmapped, BASE - 0x1000, ProbeKind::Entry, &mem)
            .unwrap_err()
            .to_string(),
        "cannot read 16 bytes of code at 0x7f123455f000: the address is not mapped readable in the target"
    );
}
