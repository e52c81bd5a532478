//! Golden listings of the counting entry trampoline (`agent::counting_entry`), which is
//! written as bytes rather than assembled: each case gives the bytes beside their
//! disassembly, with and without counter shards, with a short and a long relocated
//! part, so that a changed byte shows as a changed instruction.

use agent::counting_entry::{self, CountingEntry};
use agent::emitter::Emitter;
use agent::relocator::{analyze, Function, ProbeKind, SliceMemory};
use agent::shared::Sharding;
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use probes::abi::shared::ProbeCounters;

/// Where the function is, and its trampoline 256 MiB above.
const BASE: u64 = 0x7f12_3456_0000;
const TRAMPOLINE: u64 = BASE + 0x1000_0000;
const COUNTERS: u64 = 0x7f00_1234_5000;

fn listing(code: &[u8], ip: u64) -> Vec<String> {
    let mut f = IntelFormatter::new();
    f.options_mut().set_hex_prefix("0x");
    f.options_mut().set_hex_suffix("");
    f.options_mut().set_uppercase_hex(false);
    f.options_mut().set_branch_leading_zeros(false);
    let mut out = Vec::new();
    for ins in Decoder::with_ip(64, code, ip, DecoderOptions::NONE) {
        let start = (ins.ip() - ip) as usize;
        let bytes: Vec<String> = code[start..start + ins.len()]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut text = String::new();
        f.format(&ins, &mut text);
        out.push(format!("{} ; {text}", bytes.join(" ")));
    }
    out
}

/// The trampoline for an entry probe on `function` (bytes), and the relocated length.
fn trampoline(function: &[u8], sharding: Option<Sharding>) -> (Vec<u8>, usize) {
    let mem = SliceMemory {
        base: BASE,
        bytes: function,
    };
    let f = Function {
        address: BASE,
        size: Some(function.len() as u64),
    };
    let stolen = analyze(&f, BASE, ProbeKind::Entry, &mem).unwrap();
    let mut e = Emitter::new(TRAMPOLINE);
    let c = CountingEntry {
        tls: -0x100,
        counters: COUNTERS as *const ProbeCounters,
        sharding,
    };
    let r = counting_entry::emit(&mut e, c, &stolen).unwrap().unwrap();
    (e.finish().unwrap(), r.bytes.len())
}

/// `lea eax, [rdi+rdi*2]; add eax, 7; ret` (gcc -O2 of `x * 3 + 7`).
const SMALL: [u8; 7] = [0x8d, 0x04, 0x7f, 0x83, 0xc0, 0x07, 0xc3];

const SHARDS: Sharding = Sharding {
    cpu_offset: -0x40,
    shards: 4,
};

#[test]
fn sharded_count() {
    let (code, relocated) = trampoline(&SMALL, Some(SHARDS));
    assert_eq!(
        listing(&code, TRAMPOLINE),
        [
            "50 ; push rax",
            "48 b8 00 50 34 12 00 7f 00 00 ; mov rax,0x7f0012345000",
            "64 48 83 3c 25 00 ff ff ff 00 ; cmp qword ptr fs:[0xffffffffffffff00],0",
            "75 28 ; jne short 0x7f124456003f",
            "f6 40 28 01 ; test byte ptr [rax+0x28],1",
            "74 16 ; je short 0x7f1244560033",
            "51 ; push rcx",
            "64 8b 0c 25 c0 ff ff ff ; mov ecx,fs:[0xffffffffffffffc0]",
            "83 e1 03 ; and ecx,3",
            "c1 e1 06 ; shl ecx,6",
            "f0 48 ff 44 08 40 ; lock inc qword ptr [rax+rcx+0x40]",
            "59 ; pop rcx",
            "58 ; pop rax",
            "8d 04 7f ; lea eax,[rdi+rdi*2]",
            "83 c0 07 ; add eax,7",
            "e9 c7 ff ff ef ; jmp 0x7f1234560006",
            "f0 48 ff 40 10 ; lock inc qword ptr [rax+0x10]",
            "eb ed ; jmp short 0x7f1244560033",
        ]
    );
    assert_eq!(
        code.len() - relocated,
        64,
        "code besides the relocated bytes"
    );
}

#[test]
fn unsharded_count() {
    let (code, relocated) = trampoline(&SMALL, None);
    assert_eq!(
        listing(&code, TRAMPOLINE),
        [
            "50 ; push rax",
            "48 b8 00 50 34 12 00 7f 00 00 ; mov rax,0x7f0012345000",
            "64 48 83 3c 25 00 ff ff ff 00 ; cmp qword ptr fs:[0xffffffffffffff00],0",
            "75 17 ; jne short 0x7f124456002e",
            "f6 40 28 01 ; test byte ptr [rax+0x28],1",
            "74 05 ; je short 0x7f1244560022",
            "f0 48 ff 40 00 ; lock inc qword ptr [rax]",
            "58 ; pop rax",
            "8d 04 7f ; lea eax,[rdi+rdi*2]",
            "83 c0 07 ; add eax,7",
            "e9 d8 ff ff ef ; jmp 0x7f1234560006",
            "f0 48 ff 40 10 ; lock inc qword ptr [rax+0x10]",
            "eb ed ; jmp short 0x7f1244560022",
        ]
    );
    assert_eq!(
        code.len() - relocated,
        47,
        "code besides the relocated bytes"
    );
}

/// A trailing `call` becomes `push; mov; jmp` that never falls through: no jump back,
/// `skipped` right after it.
#[test]
fn stolen_call_needs_no_jump_back() {
    // sub rsp, 8 ; call BASE+0x100 ; ...
    let mut f = vec![0x48, 0x83, 0xec, 0x08, 0xe8, 0xf7, 0x00, 0x00, 0x00];
    f.resize(0x110, 0xc3);
    let (code, relocated) = trampoline(&f, Some(SHARDS));
    assert_eq!(
        listing(&code, TRAMPOLINE),
        [
            "50 ; push rax",
            "48 b8 00 50 34 12 00 7f 00 00 ; mov rax,0x7f0012345000",
            "64 48 83 3c 25 00 ff ff ff 00 ; cmp qword ptr fs:[0xffffffffffffff00],0",
            "75 33 ; jne short 0x7f124456004a",
            "f6 40 28 01 ; test byte ptr [rax+0x28],1",
            "74 16 ; je short 0x7f1244560033",
            "51 ; push rcx",
            "64 8b 0c 25 c0 ff ff ff ; mov ecx,fs:[0xffffffffffffffc0]",
            "83 e1 03 ; and ecx,3",
            "c1 e1 06 ; shl ecx,6",
            "f0 48 ff 44 08 40 ; lock inc qword ptr [rax+rcx+0x40]",
            "59 ; pop rcx",
            "58 ; pop rax",
            "48 83 ec 08 ; sub rsp,8",
            "68 09 00 56 34 ; push 0x34560009",
            "c7 44 24 04 12 7f 00 00 ; mov dword ptr [rsp+4],0x7f12",
            "e9 b6 00 00 f0 ; jmp 0x7f1234560100",
            "f0 48 ff 40 10 ; lock inc qword ptr [rax+0x10]",
            "eb e2 ; jmp short 0x7f1244560033",
        ]
    );
    assert_eq!(code.len() - relocated, 59, "no jump back");
}
