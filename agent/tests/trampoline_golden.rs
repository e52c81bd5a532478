//! Golden listings of the assembled trampolines (`agent::trampoline`): the inline fast
//! path of a counting probe, of a counting exit probe (which calls the function body),
//! the shared exit trampoline and the offset trampoline, each byte beside its
//! disassembly, so that a changed byte shows as a changed instruction.
//!
//! The counts are the unsharded ones: each test runs in a child of this binary started
//! with glibc's `rseq` registration off, so the listings do not depend on the CPU count
//! or on where glibc keeps `cpu_id` (the sharded count is `counting_entry_golden`'s).
//!
//! Addresses that differ from build to build (the agent's `on_entry`, `on_exit`,
//! `on_offset`, and the probe, which lives on the heap) are replaced by fixed markers
//! before the comparison; the trampoline sits far from the test binary, so every call
//! to the agent is a `movabs r11, target; call r11` whatever the layout.

use agent::dispatch::{self, Probe};
use agent::emitter::Emitter;
use agent::relocator::{analyze, Function, ProbeKind, SliceMemory, Stolen};
use agent::trampoline::{self, EntryPath, FastEntry, Vectors, XsaveInfo};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use probes::abi::shared::{Counts, ProbeCounters};
use std::sync::atomic::AtomicU64;

const BASE: u64 = 0x7f12_3456_0000;
const TRAMPOLINE: u64 = BASE + 0x1000_0000;
const COUNTERS: u64 = 0x7f00_1234_5000;
const EXIT_TRAMPOLINE: u64 = TRAMPOLINE + 0x800;
const TLS: i32 = -0x100;

/// What build-dependent addresses become in the listings.
const PROBE_MARK: u64 = 0x1111_1111_1111_1111;
const ON_ENTRY_MARK: u64 = 0x2222_2222_2222_2222;
const ON_EXIT_MARK: u64 = 0x3333_3333_3333_3333;
const ON_OFFSET_MARK: u64 = 0x4444_4444_4444_4444;

/// `lea eax, [rdi+rdi*2]; add eax, 7; ret` (gcc -O2 of `x * 3 + 7`).
const SMALL: [u8; 7] = [0x8d, 0x04, 0x7f, 0x83, 0xc0, 0x07, 0xc3];

fn stolen(kind: ProbeKind) -> Stolen {
    let mem = SliceMemory {
        base: BASE,
        bytes: &SMALL,
    };
    let f = Function {
        address: BASE,
        size: Some(SMALL.len() as u64),
    };
    analyze(&f, BASE, kind, &mem).unwrap()
}

fn probe() -> &'static Probe {
    let line: &'static ProbeCounters = Box::leak(Box::default());
    Box::leak(Box::new(Probe {
        counters: Counts { line, shards: &[] },
        on_entry: None,
        on_exit: None,
        exit_trampoline: 0,
        id: 0,
        on_offset: None,
        return_point: AtomicU64::new(0),
        pack_entry: AtomicU64::new(0),
        pack_entry_direct: AtomicU64::new(0),
        pack_exit: AtomicU64::new(0),
        pack_exit_timed: false.into(),
        name: "",
    }))
}

/// Replace every 8-byte occurrence of `from` in `code` with `to`.
fn mark(code: &mut [u8], from: u64, to: u64) {
    let (from, to) = (from.to_le_bytes(), to.to_le_bytes());
    for i in 0..code.len().saturating_sub(7) {
        if code[i..i + 8] == from {
            code[i..i + 8].copy_from_slice(&to);
        }
    }
}

fn listing(mut code: Vec<u8>, probe: &Probe) -> Vec<String> {
    mark(&mut code, probe as *const Probe as u64, PROBE_MARK);
    mark(
        &mut code,
        dispatch::on_entry as *const () as u64,
        ON_ENTRY_MARK,
    );
    mark(
        &mut code,
        dispatch::on_exit as *const () as u64,
        ON_EXIT_MARK,
    );
    mark(
        &mut code,
        dispatch::on_offset as *const () as u64,
        ON_OFFSET_MARK,
    );
    let mut f = IntelFormatter::new();
    f.options_mut().set_hex_prefix("0x");
    f.options_mut().set_hex_suffix("");
    f.options_mut().set_uppercase_hex(false);
    f.options_mut().set_branch_leading_zeros(false);
    let mut out = Vec::new();
    for ins in Decoder::with_ip(64, &code, TRAMPOLINE, DecoderOptions::NONE) {
        let start = (ins.ip() - TRAMPOLINE) as usize;
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

fn fast_entry(exit_trampoline: u64) -> Vec<String> {
    let p = probe();
    let mut e = Emitter::new(TRAMPOLINE);
    let path = EntryPath::Fast(FastEntry {
        tls: TLS,
        counters: COUNTERS as *const ProbeCounters,
        exit_trampoline,
        pack: None,
    });
    let kind = if exit_trampoline == 0 {
        ProbeKind::Entry
    } else {
        ProbeKind::Exit
    };
    trampoline::emit_entry(&mut e, p, &stolen(kind), path, Vectors::Avx).unwrap();
    listing(e.finish().unwrap(), p)
}

/// Whether this is the child that emits: else run `test` in a child without `rseq`
/// (so without counter shards) and check that it passed.
fn in_child(test: &str) -> bool {
    if std::env::var_os("TRAMPOLINE_GOLDEN_CHILD").is_some() {
        assert!(
            agent::shared::sharding().is_none(),
            "the child runs without rseq"
        );
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("TRAMPOLINE_GOLDEN_CHILD", "1")
        .env("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{test} in a child:\n{text}");
    assert!(
        text.contains("1 passed"),
        "{test} did not run in the child:\n{text}"
    );
    false
}

/// Compare line by line so that a failure names the first differing instruction.
fn assert_listing(got: &[String], want: &[&str]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "instruction {i}");
    }
    assert_eq!(got.len(), want.len(), "instructions: {got:#?}");
}

#[test]
fn counting_entry_fast_path() {
    if !in_child("counting_entry_fast_path") {
        return;
    }
    assert_listing(&fast_entry(0), COUNTING_ENTRY);
}

#[test]
fn counting_exit_fast_path() {
    if !in_child("counting_exit_fast_path") {
        return;
    }
    assert_listing(&fast_entry(EXIT_TRAMPOLINE), COUNTING_EXIT);
}

#[test]
fn shared_exit_trampoline() {
    if !in_child("shared_exit_trampoline") {
        return;
    }
    let mut e = Emitter::new(TRAMPOLINE);
    trampoline::emit_exit(&mut e, Some(TLS), Vectors::Avx).unwrap();
    let p = probe();
    assert_listing(&listing(e.finish().unwrap(), p), SHARED_EXIT);
}

#[test]
fn offset_trampoline() {
    if !in_child("offset_trampoline") {
        return;
    }
    let p = probe();
    let mut e = Emitter::new(TRAMPOLINE);
    let xs = XsaveInfo {
        mask: 0x2e7,
        size: 0xa88,
    };
    trampoline::emit_offset(&mut e, p, &stolen(ProbeKind::Offset), xs).unwrap();
    assert_listing(&listing(e.finish().unwrap(), p), OFFSET);
}

const COUNTING_ENTRY: &[&str] = &[
    "4c 89 5c 24 e8 ; mov [rsp-0x18],r11",
    "64 4c 8b 1c 25 00 00 00 00 ; mov r11,fs:[0]",
    "49 83 bb 00 ff ff ff 00 ; cmp qword ptr [r11-0x100],0",
    "0f 85 23 00 00 00 ; jne 0x7f124456003f",
    "49 bb 00 50 34 12 00 7f 00 00 ; mov r11,0x7f0012345000",
    "41 f6 43 28 01 ; test byte ptr [r11+0x28],1",
    "0f 84 04 00 00 00 ; je 0x7f1244560035",
    "f0 49 ff 03 ; lock inc qword ptr [r11]",
    "4c 8b 5c 24 e8 ; mov r11,[rsp-0x18]",
    "e9 5d 02 00 00 ; jmp 0x7f124456029c",
    "49 bb 00 50 34 12 00 7f 00 00 ; mov r11,0x7f0012345000",
    "f0 49 ff 43 10 ; lock inc qword ptr [r11+0x10]",
    "4c 8b 5c 24 e8 ; mov r11,[rsp-0x18]",
    "e9 44 02 00 00 ; jmp 0x7f124456029c",
    "48 89 5c 24 f0 ; mov [rsp-0x10],rbx",
    "48 89 e3 ; mov rbx,rsp",
    "48 8d a4 24 10 fd ff ff ; lea rsp,[rsp-0x2f0]",
    "48 83 e4 c0 ; and rsp,0xffffffffffffffc0",
    "48 89 9c 24 c0 00 00 00 ; mov [rsp+0xc0],rbx",
    "48 89 3c 24 ; mov [rsp],rdi",
    "48 89 74 24 08 ; mov [rsp+8],rsi",
    "48 89 54 24 10 ; mov [rsp+0x10],rdx",
    "48 89 4c 24 18 ; mov [rsp+0x18],rcx",
    "4c 89 44 24 20 ; mov [rsp+0x20],r8",
    "4c 89 4c 24 28 ; mov [rsp+0x28],r9",
    "48 89 44 24 30 ; mov [rsp+0x30],rax",
    "4c 89 54 24 38 ; mov [rsp+0x38],r10",
    "4c 89 9c 24 c8 00 00 00 ; mov [rsp+0xc8],r11",
    "c5 fe 7f 84 24 e0 00 00 00 ; vmovdqu [rsp+0xe0],ymm0",
    "c5 fe 7f 8c 24 00 01 00 00 ; vmovdqu [rsp+0x100],ymm1",
    "c5 fe 7f 94 24 20 01 00 00 ; vmovdqu [rsp+0x120],ymm2",
    "c5 fe 7f 9c 24 40 01 00 00 ; vmovdqu [rsp+0x140],ymm3",
    "c5 fe 7f a4 24 60 01 00 00 ; vmovdqu [rsp+0x160],ymm4",
    "c5 fe 7f ac 24 80 01 00 00 ; vmovdqu [rsp+0x180],ymm5",
    "c5 fe 7f b4 24 a0 01 00 00 ; vmovdqu [rsp+0x1a0],ymm6",
    "c5 fe 7f bc 24 c0 01 00 00 ; vmovdqu [rsp+0x1c0],ymm7",
    "c5 7e 7f 84 24 e0 01 00 00 ; vmovdqu [rsp+0x1e0],ymm8",
    "c5 7e 7f 8c 24 00 02 00 00 ; vmovdqu [rsp+0x200],ymm9",
    "c5 7e 7f 94 24 20 02 00 00 ; vmovdqu [rsp+0x220],ymm10",
    "c5 7e 7f 9c 24 40 02 00 00 ; vmovdqu [rsp+0x240],ymm11",
    "c5 7e 7f a4 24 60 02 00 00 ; vmovdqu [rsp+0x260],ymm12",
    "c5 7e 7f ac 24 80 02 00 00 ; vmovdqu [rsp+0x280],ymm13",
    "c5 7e 7f b4 24 a0 02 00 00 ; vmovdqu [rsp+0x2a0],ymm14",
    "c5 7e 7f bc 24 c0 02 00 00 ; vmovdqu [rsp+0x2c0],ymm15",
    "c5 f8 29 44 24 40 ; vmovaps [rsp+0x40],xmm0",
    "c5 f8 29 4c 24 50 ; vmovaps [rsp+0x50],xmm1",
    "c5 f8 29 54 24 60 ; vmovaps [rsp+0x60],xmm2",
    "c5 f8 29 5c 24 70 ; vmovaps [rsp+0x70],xmm3",
    "c5 f8 29 a4 24 80 00 00 00 ; vmovaps [rsp+0x80],xmm4",
    "c5 f8 29 ac 24 90 00 00 00 ; vmovaps [rsp+0x90],xmm5",
    "c5 f8 29 b4 24 a0 00 00 00 ; vmovaps [rsp+0xa0],xmm6",
    "c5 f8 29 bc 24 b0 00 00 00 ; vmovaps [rsp+0xb0],xmm7",
    "48 bf 11 11 11 11 11 11 11 11 ; mov rdi,0x1111111111111111",
    "48 89 e6 ; mov rsi,rsp",
    "49 bb 22 22 22 22 22 22 22 22 ; mov r11,0x2222222222222222",
    "41 ff d3 ; call r11",
    "c5 fe 6f 84 24 e0 00 00 00 ; vmovdqu ymm0,[rsp+0xe0]",
    "c5 fe 6f 8c 24 00 01 00 00 ; vmovdqu ymm1,[rsp+0x100]",
    "c5 fe 6f 94 24 20 01 00 00 ; vmovdqu ymm2,[rsp+0x120]",
    "c5 fe 6f 9c 24 40 01 00 00 ; vmovdqu ymm3,[rsp+0x140]",
    "c5 fe 6f a4 24 60 01 00 00 ; vmovdqu ymm4,[rsp+0x160]",
    "c5 fe 6f ac 24 80 01 00 00 ; vmovdqu ymm5,[rsp+0x180]",
    "c5 fe 6f b4 24 a0 01 00 00 ; vmovdqu ymm6,[rsp+0x1a0]",
    "c5 fe 6f bc 24 c0 01 00 00 ; vmovdqu ymm7,[rsp+0x1c0]",
    "c5 7e 6f 84 24 e0 01 00 00 ; vmovdqu ymm8,[rsp+0x1e0]",
    "c5 7e 6f 8c 24 00 02 00 00 ; vmovdqu ymm9,[rsp+0x200]",
    "c5 7e 6f 94 24 20 02 00 00 ; vmovdqu ymm10,[rsp+0x220]",
    "c5 7e 6f 9c 24 40 02 00 00 ; vmovdqu ymm11,[rsp+0x240]",
    "c5 7e 6f a4 24 60 02 00 00 ; vmovdqu ymm12,[rsp+0x260]",
    "c5 7e 6f ac 24 80 02 00 00 ; vmovdqu ymm13,[rsp+0x280]",
    "c5 7e 6f b4 24 a0 02 00 00 ; vmovdqu ymm14,[rsp+0x2a0]",
    "c5 7e 6f bc 24 c0 02 00 00 ; vmovdqu ymm15,[rsp+0x2c0]",
    "c4 e3 7d 18 44 24 40 00 ; vinsertf128 ymm0,ymm0,[rsp+0x40],0",
    "c4 e3 75 18 4c 24 50 00 ; vinsertf128 ymm1,ymm1,[rsp+0x50],0",
    "c4 e3 6d 18 54 24 60 00 ; vinsertf128 ymm2,ymm2,[rsp+0x60],0",
    "c4 e3 65 18 5c 24 70 00 ; vinsertf128 ymm3,ymm3,[rsp+0x70],0",
    "c4 e3 5d 18 a4 24 80 00 00 00 00 ; vinsertf128 ymm4,ymm4,[rsp+0x80],0",
    "c4 e3 55 18 ac 24 90 00 00 00 00 ; vinsertf128 ymm5,ymm5,[rsp+0x90],0",
    "c4 e3 4d 18 b4 24 a0 00 00 00 00 ; vinsertf128 ymm6,ymm6,[rsp+0xa0],0",
    "c4 e3 45 18 bc 24 b0 00 00 00 00 ; vinsertf128 ymm7,ymm7,[rsp+0xb0],0",
    "48 8b 3c 24 ; mov rdi,[rsp]",
    "48 8b 74 24 08 ; mov rsi,[rsp+8]",
    "48 8b 54 24 10 ; mov rdx,[rsp+0x10]",
    "48 8b 4c 24 18 ; mov rcx,[rsp+0x18]",
    "4c 8b 44 24 20 ; mov r8,[rsp+0x20]",
    "4c 8b 4c 24 28 ; mov r9,[rsp+0x28]",
    "48 8b 44 24 30 ; mov rax,[rsp+0x30]",
    "4c 8b 54 24 38 ; mov r10,[rsp+0x38]",
    "4c 8b 9c 24 c8 00 00 00 ; mov r11,[rsp+0xc8]",
    "48 89 dc ; mov rsp,rbx",
    "48 8b 5c 24 f0 ; mov rbx,[rsp-0x10]",
    "8d 04 7f ; lea eax,[rdi+rdi*2]",
    "83 c0 07 ; add eax,7",
    "e9 5f fd ff ef ; jmp 0x7f1234560006",
];
const COUNTING_EXIT: &[&str] = &[
    "4c 89 5c 24 e8 ; mov [rsp-0x18],r11",
    "64 4c 8b 1c 25 00 00 00 00 ; mov r11,fs:[0]",
    "4d 8d 9b 00 ff ff ff ; lea r11,[r11-0x100]",
    "49 83 3b 00 ; cmp qword ptr [r11],0",
    "0f 85 59 01 00 00 ; jne 0x7f1244560178",
    "48 89 44 24 f8 ; mov [rsp-8],rax",
    "48 89 4c 24 f0 ; mov [rsp-0x10],rcx",
    "48 b9 00 50 34 12 00 7f 00 00 ; mov rcx,0x7f0012345000",
    "f6 41 28 01 ; test byte ptr [rcx+0x28],1",
    "0f 84 27 01 00 00 ; je 0x7f1244560164",
    "49 8b 43 10 ; mov rax,[r11+0x10]",
    "49 3b 43 18 ; cmp rax,[r11+0x18]",
    "0f 83 05 01 00 00 ; jae 0x7f1244560150",
    "48 c1 e0 05 ; shl rax,5",
    "49 03 43 08 ; add rax,[r11+8]",
    "49 83 7b 10 00 ; cmp qword ptr [r11+0x10],0",
    "0f 84 0a 00 00 00 ; je 0x7f1244560068",
    "48 39 60 e8 ; cmp [rax-0x18],rsp",
    "0f 86 e8 00 00 00 ; jbe 0x7f1244560150",
    "49 ff 43 10 ; inc qword ptr [r11+0x10]",
    "f0 48 ff 01 ; lock inc qword ptr [rcx]",
    "48 8b 0c 24 ; mov rcx,[rsp]",
    "48 89 08 ; mov [rax],rcx",
    "48 b9 11 11 11 11 11 11 11 11 ; mov rcx,0x1111111111111111",
    "48 89 48 10 ; mov [rax+0x10],rcx",
    "48 c7 40 18 00 00 00 00 ; mov qword ptr [rax+0x18],0",
    "48 89 60 08 ; mov [rax+8],rsp",
    "48 8b 44 24 f8 ; mov rax,[rsp-8]",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "4c 8b 5c 24 e8 ; mov r11,[rsp-0x18]",
    "48 8d 64 24 08 ; lea rsp,[rsp+8]",
    "e8 2b 03 00 00 ; call 0x7f12445603d5",
    "48 89 4c 24 f0 ; mov [rsp-0x10],rcx",
    "48 89 7c 24 e8 ; mov [rsp-0x18],rdi",
    "4c 89 5c 24 e0 ; mov [rsp-0x20],r11",
    "64 4c 8b 1c 25 00 00 00 00 ; mov r11,fs:[0]",
    "4d 8d 9b 00 ff ff ff ; lea r11,[r11-0x100]",
    "49 83 3b 00 ; cmp qword ptr [r11],0",
    "0f 85 69 00 00 00 ; jne 0x7f124456013c",
    "49 8b 4b 10 ; mov rcx,[r11+0x10]",
    "48 85 c9 ; test rcx,rcx",
    "0f 84 5c 00 00 00 ; je 0x7f124456013c",
    "48 ff c9 ; dec rcx",
    "48 c1 e1 05 ; shl rcx,5",
    "49 03 4b 08 ; add rcx,[r11+8]",
    "48 8d 7c 24 f8 ; lea rdi,[rsp-8]",
    "48 39 79 08 ; cmp [rcx+8],rdi",
    "0f 85 42 00 00 00 ; jne 0x7f124456013c",
    "48 bf 00 50 34 12 00 7f 00 00 ; mov rdi,0x7f0012345000",
    "f6 47 28 01 ; test byte ptr [rdi+0x28],1",
    "0f 84 05 00 00 00 ; je 0x7f1244560113",
    "f0 48 ff 47 08 ; lock inc qword ptr [rdi+8]",
    "48 c7 41 08 00 00 00 00 ; mov qword ptr [rcx+8],0",
    "48 8b 09 ; mov rcx,[rcx]",
    "49 ff 4b 10 ; dec qword ptr [r11+0x10]",
    "48 89 4c 24 f8 ; mov [rsp-8],rcx",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "48 8b 7c 24 e8 ; mov rdi,[rsp-0x18]",
    "4c 8b 5c 24 e0 ; mov r11,[rsp-0x20]",
    "48 8d 64 24 f8 ; lea rsp,[rsp-8]",
    "c3 ; ret",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "48 8b 7c 24 e8 ; mov rdi,[rsp-0x18]",
    "4c 8b 5c 24 e0 ; mov r11,[rsp-0x20]",
    "e9 b0 06 00 00 ; jmp 0x7f1244560800",
    "48 8b 44 24 f8 ; mov rax,[rsp-8]",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "4c 8b 5c 24 e8 ; mov r11,[rsp-0x18]",
    "e9 2d 00 00 00 ; jmp 0x7f1244560191",
    "48 8b 44 24 f8 ; mov rax,[rsp-8]",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "4c 8b 5c 24 e8 ; mov r11,[rsp-0x18]",
    "e9 5d 02 00 00 ; jmp 0x7f12445603d5",
    "49 bb 00 50 34 12 00 7f 00 00 ; mov r11,0x7f0012345000",
    "f0 49 ff 43 10 ; lock inc qword ptr [r11+0x10]",
    "4c 8b 5c 24 e8 ; mov r11,[rsp-0x18]",
    "e9 44 02 00 00 ; jmp 0x7f12445603d5",
    "48 89 5c 24 f0 ; mov [rsp-0x10],rbx",
    "48 89 e3 ; mov rbx,rsp",
    "48 8d a4 24 10 fd ff ff ; lea rsp,[rsp-0x2f0]",
    "48 83 e4 c0 ; and rsp,0xffffffffffffffc0",
    "48 89 9c 24 c0 00 00 00 ; mov [rsp+0xc0],rbx",
    "48 89 3c 24 ; mov [rsp],rdi",
    "48 89 74 24 08 ; mov [rsp+8],rsi",
    "48 89 54 24 10 ; mov [rsp+0x10],rdx",
    "48 89 4c 24 18 ; mov [rsp+0x18],rcx",
    "4c 89 44 24 20 ; mov [rsp+0x20],r8",
    "4c 89 4c 24 28 ; mov [rsp+0x28],r9",
    "48 89 44 24 30 ; mov [rsp+0x30],rax",
    "4c 89 54 24 38 ; mov [rsp+0x38],r10",
    "4c 89 9c 24 c8 00 00 00 ; mov [rsp+0xc8],r11",
    "c5 fe 7f 84 24 e0 00 00 00 ; vmovdqu [rsp+0xe0],ymm0",
    "c5 fe 7f 8c 24 00 01 00 00 ; vmovdqu [rsp+0x100],ymm1",
    "c5 fe 7f 94 24 20 01 00 00 ; vmovdqu [rsp+0x120],ymm2",
    "c5 fe 7f 9c 24 40 01 00 00 ; vmovdqu [rsp+0x140],ymm3",
    "c5 fe 7f a4 24 60 01 00 00 ; vmovdqu [rsp+0x160],ymm4",
    "c5 fe 7f ac 24 80 01 00 00 ; vmovdqu [rsp+0x180],ymm5",
    "c5 fe 7f b4 24 a0 01 00 00 ; vmovdqu [rsp+0x1a0],ymm6",
    "c5 fe 7f bc 24 c0 01 00 00 ; vmovdqu [rsp+0x1c0],ymm7",
    "c5 7e 7f 84 24 e0 01 00 00 ; vmovdqu [rsp+0x1e0],ymm8",
    "c5 7e 7f 8c 24 00 02 00 00 ; vmovdqu [rsp+0x200],ymm9",
    "c5 7e 7f 94 24 20 02 00 00 ; vmovdqu [rsp+0x220],ymm10",
    "c5 7e 7f 9c 24 40 02 00 00 ; vmovdqu [rsp+0x240],ymm11",
    "c5 7e 7f a4 24 60 02 00 00 ; vmovdqu [rsp+0x260],ymm12",
    "c5 7e 7f ac 24 80 02 00 00 ; vmovdqu [rsp+0x280],ymm13",
    "c5 7e 7f b4 24 a0 02 00 00 ; vmovdqu [rsp+0x2a0],ymm14",
    "c5 7e 7f bc 24 c0 02 00 00 ; vmovdqu [rsp+0x2c0],ymm15",
    "c5 f8 29 44 24 40 ; vmovaps [rsp+0x40],xmm0",
    "c5 f8 29 4c 24 50 ; vmovaps [rsp+0x50],xmm1",
    "c5 f8 29 54 24 60 ; vmovaps [rsp+0x60],xmm2",
    "c5 f8 29 5c 24 70 ; vmovaps [rsp+0x70],xmm3",
    "c5 f8 29 a4 24 80 00 00 00 ; vmovaps [rsp+0x80],xmm4",
    "c5 f8 29 ac 24 90 00 00 00 ; vmovaps [rsp+0x90],xmm5",
    "c5 f8 29 b4 24 a0 00 00 00 ; vmovaps [rsp+0xa0],xmm6",
    "c5 f8 29 bc 24 b0 00 00 00 ; vmovaps [rsp+0xb0],xmm7",
    "48 bf 11 11 11 11 11 11 11 11 ; mov rdi,0x1111111111111111",
    "48 89 e6 ; mov rsi,rsp",
    "49 bb 22 22 22 22 22 22 22 22 ; mov r11,0x2222222222222222",
    "41 ff d3 ; call r11",
    "c5 fe 6f 84 24 e0 00 00 00 ; vmovdqu ymm0,[rsp+0xe0]",
    "c5 fe 6f 8c 24 00 01 00 00 ; vmovdqu ymm1,[rsp+0x100]",
    "c5 fe 6f 94 24 20 01 00 00 ; vmovdqu ymm2,[rsp+0x120]",
    "c5 fe 6f 9c 24 40 01 00 00 ; vmovdqu ymm3,[rsp+0x140]",
    "c5 fe 6f a4 24 60 01 00 00 ; vmovdqu ymm4,[rsp+0x160]",
    "c5 fe 6f ac 24 80 01 00 00 ; vmovdqu ymm5,[rsp+0x180]",
    "c5 fe 6f b4 24 a0 01 00 00 ; vmovdqu ymm6,[rsp+0x1a0]",
    "c5 fe 6f bc 24 c0 01 00 00 ; vmovdqu ymm7,[rsp+0x1c0]",
    "c5 7e 6f 84 24 e0 01 00 00 ; vmovdqu ymm8,[rsp+0x1e0]",
    "c5 7e 6f 8c 24 00 02 00 00 ; vmovdqu ymm9,[rsp+0x200]",
    "c5 7e 6f 94 24 20 02 00 00 ; vmovdqu ymm10,[rsp+0x220]",
    "c5 7e 6f 9c 24 40 02 00 00 ; vmovdqu ymm11,[rsp+0x240]",
    "c5 7e 6f a4 24 60 02 00 00 ; vmovdqu ymm12,[rsp+0x260]",
    "c5 7e 6f ac 24 80 02 00 00 ; vmovdqu ymm13,[rsp+0x280]",
    "c5 7e 6f b4 24 a0 02 00 00 ; vmovdqu ymm14,[rsp+0x2a0]",
    "c5 7e 6f bc 24 c0 02 00 00 ; vmovdqu ymm15,[rsp+0x2c0]",
    "c4 e3 7d 18 44 24 40 00 ; vinsertf128 ymm0,ymm0,[rsp+0x40],0",
    "c4 e3 75 18 4c 24 50 00 ; vinsertf128 ymm1,ymm1,[rsp+0x50],0",
    "c4 e3 6d 18 54 24 60 00 ; vinsertf128 ymm2,ymm2,[rsp+0x60],0",
    "c4 e3 65 18 5c 24 70 00 ; vinsertf128 ymm3,ymm3,[rsp+0x70],0",
    "c4 e3 5d 18 a4 24 80 00 00 00 00 ; vinsertf128 ymm4,ymm4,[rsp+0x80],0",
    "c4 e3 55 18 ac 24 90 00 00 00 00 ; vinsertf128 ymm5,ymm5,[rsp+0x90],0",
    "c4 e3 4d 18 b4 24 a0 00 00 00 00 ; vinsertf128 ymm6,ymm6,[rsp+0xa0],0",
    "c4 e3 45 18 bc 24 b0 00 00 00 00 ; vinsertf128 ymm7,ymm7,[rsp+0xb0],0",
    "48 8b 3c 24 ; mov rdi,[rsp]",
    "48 8b 74 24 08 ; mov rsi,[rsp+8]",
    "48 8b 54 24 10 ; mov rdx,[rsp+0x10]",
    "48 8b 4c 24 18 ; mov rcx,[rsp+0x18]",
    "4c 8b 44 24 20 ; mov r8,[rsp+0x20]",
    "4c 8b 4c 24 28 ; mov r9,[rsp+0x28]",
    "48 8b 44 24 30 ; mov rax,[rsp+0x30]",
    "4c 8b 54 24 38 ; mov r10,[rsp+0x38]",
    "4c 8b 9c 24 c8 00 00 00 ; mov r11,[rsp+0xc8]",
    "48 89 dc ; mov rsp,rbx",
    "48 8b 5c 24 f0 ; mov rbx,[rsp-0x10]",
    "8d 04 7f ; lea eax,[rdi+rdi*2]",
    "83 c0 07 ; add eax,7",
    "e9 26 fc ff ef ; jmp 0x7f1234560006",
];
const SHARED_EXIT: &[&str] = &[
    "48 89 4c 24 f0 ; mov [rsp-0x10],rcx",
    "48 89 7c 24 e8 ; mov [rsp-0x18],rdi",
    "4c 89 5c 24 e0 ; mov [rsp-0x20],r11",
    "64 4c 8b 1c 25 00 00 00 00 ; mov r11,fs:[0]",
    "4d 8d 9b 00 ff ff ff ; lea r11,[r11-0x100]",
    "49 83 3b 00 ; cmp qword ptr [r11],0",
    "0f 85 7a 00 00 00 ; jne 0x7f12445600a3",
    "49 8b 4b 10 ; mov rcx,[r11+0x10]",
    "48 85 c9 ; test rcx,rcx",
    "0f 84 6d 00 00 00 ; je 0x7f12445600a3",
    "48 ff c9 ; dec rcx",
    "48 c1 e1 05 ; shl rcx,5",
    "49 03 4b 08 ; add rcx,[r11+8]",
    "48 8d 7c 24 f8 ; lea rdi,[rsp-8]",
    "48 39 79 08 ; cmp [rcx+8],rdi",
    "0f 85 53 00 00 00 ; jne 0x7f12445600a3",
    "48 8b 79 10 ; mov rdi,[rcx+0x10]",
    "48 83 7f 20 00 ; cmp qword ptr [rdi+0x20],0",
    "0f 85 44 00 00 00 ; jne 0x7f12445600a3",
    "48 83 7f 58 00 ; cmp qword ptr [rdi+0x58],0",
    "0f 85 39 00 00 00 ; jne 0x7f12445600a3",
    "48 8b 3f ; mov rdi,[rdi]",
    "f6 47 28 01 ; test byte ptr [rdi+0x28],1",
    "0f 84 05 00 00 00 ; je 0x7f124456007c",
    "f0 48 ff 47 08 ; lock inc qword ptr [rdi+8]",
    "48 c7 41 08 00 00 00 00 ; mov qword ptr [rcx+8],0",
    "48 8b 09 ; mov rcx,[rcx]",
    "49 ff 4b 10 ; dec qword ptr [r11+0x10]",
    "48 89 4c 24 f8 ; mov [rsp-8],rcx",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "48 8b 7c 24 e8 ; mov rdi,[rsp-0x18]",
    "4c 8b 5c 24 e0 ; mov r11,[rsp-0x20]",
    "ff 64 24 f8 ; jmp qword ptr [rsp-8]",
    "48 8b 4c 24 f0 ; mov rcx,[rsp-0x10]",
    "48 8b 7c 24 e8 ; mov rdi,[rsp-0x18]",
    "4c 8b 5c 24 e0 ; mov r11,[rsp-0x20]",
    "e9 00 00 00 00 ; jmp 0x7f12445600b7",
    "48 89 5c 24 f0 ; mov [rsp-0x10],rbx",
    "48 89 e3 ; mov rbx,rsp",
    "48 8d a4 24 50 fd ff ff ; lea rsp,[rsp-0x2b0]",
    "48 83 e4 c0 ; and rsp,0xffffffffffffffc0",
    "48 89 04 24 ; mov [rsp],rax",
    "48 89 54 24 08 ; mov [rsp+8],rdx",
    "48 89 4c 24 50 ; mov [rsp+0x50],rcx",
    "48 89 74 24 58 ; mov [rsp+0x58],rsi",
    "48 89 7c 24 60 ; mov [rsp+0x60],rdi",
    "4c 89 44 24 68 ; mov [rsp+0x68],r8",
    "4c 89 4c 24 70 ; mov [rsp+0x70],r9",
    "4c 89 54 24 78 ; mov [rsp+0x78],r10",
    "4c 89 9c 24 80 00 00 00 ; mov [rsp+0x80],r11",
    "c5 fe 7f 84 24 a0 00 00 00 ; vmovdqu [rsp+0xa0],ymm0",
    "c5 fe 7f 8c 24 c0 00 00 00 ; vmovdqu [rsp+0xc0],ymm1",
    "c5 fe 7f 94 24 e0 00 00 00 ; vmovdqu [rsp+0xe0],ymm2",
    "c5 fe 7f 9c 24 00 01 00 00 ; vmovdqu [rsp+0x100],ymm3",
    "c5 fe 7f a4 24 20 01 00 00 ; vmovdqu [rsp+0x120],ymm4",
    "c5 fe 7f ac 24 40 01 00 00 ; vmovdqu [rsp+0x140],ymm5",
    "c5 fe 7f b4 24 60 01 00 00 ; vmovdqu [rsp+0x160],ymm6",
    "c5 fe 7f bc 24 80 01 00 00 ; vmovdqu [rsp+0x180],ymm7",
    "c5 7e 7f 84 24 a0 01 00 00 ; vmovdqu [rsp+0x1a0],ymm8",
    "c5 7e 7f 8c 24 c0 01 00 00 ; vmovdqu [rsp+0x1c0],ymm9",
    "c5 7e 7f 94 24 e0 01 00 00 ; vmovdqu [rsp+0x1e0],ymm10",
    "c5 7e 7f 9c 24 00 02 00 00 ; vmovdqu [rsp+0x200],ymm11",
    "c5 7e 7f a4 24 20 02 00 00 ; vmovdqu [rsp+0x220],ymm12",
    "c5 7e 7f ac 24 40 02 00 00 ; vmovdqu [rsp+0x240],ymm13",
    "c5 7e 7f b4 24 60 02 00 00 ; vmovdqu [rsp+0x260],ymm14",
    "c5 7e 7f bc 24 80 02 00 00 ; vmovdqu [rsp+0x280],ymm15",
    "c5 f8 29 44 24 10 ; vmovaps [rsp+0x10],xmm0",
    "c5 f8 29 4c 24 20 ; vmovaps [rsp+0x20],xmm1",
    "48 89 e7 ; mov rdi,rsp",
    "48 8d 73 f8 ; lea rsi,[rbx-8]",
    "49 bb 33 33 33 33 33 33 33 33 ; mov r11,0x3333333333333333",
    "41 ff d3 ; call r11",
    "48 89 43 f8 ; mov [rbx-8],rax",
    "c5 fe 6f 84 24 a0 00 00 00 ; vmovdqu ymm0,[rsp+0xa0]",
    "c5 fe 6f 8c 24 c0 00 00 00 ; vmovdqu ymm1,[rsp+0xc0]",
    "c5 fe 6f 94 24 e0 00 00 00 ; vmovdqu ymm2,[rsp+0xe0]",
    "c5 fe 6f 9c 24 00 01 00 00 ; vmovdqu ymm3,[rsp+0x100]",
    "c5 fe 6f a4 24 20 01 00 00 ; vmovdqu ymm4,[rsp+0x120]",
    "c5 fe 6f ac 24 40 01 00 00 ; vmovdqu ymm5,[rsp+0x140]",
    "c5 fe 6f b4 24 60 01 00 00 ; vmovdqu ymm6,[rsp+0x160]",
    "c5 fe 6f bc 24 80 01 00 00 ; vmovdqu ymm7,[rsp+0x180]",
    "c5 7e 6f 84 24 a0 01 00 00 ; vmovdqu ymm8,[rsp+0x1a0]",
    "c5 7e 6f 8c 24 c0 01 00 00 ; vmovdqu ymm9,[rsp+0x1c0]",
    "c5 7e 6f 94 24 e0 01 00 00 ; vmovdqu ymm10,[rsp+0x1e0]",
    "c5 7e 6f 9c 24 00 02 00 00 ; vmovdqu ymm11,[rsp+0x200]",
    "c5 7e 6f a4 24 20 02 00 00 ; vmovdqu ymm12,[rsp+0x220]",
    "c5 7e 6f ac 24 40 02 00 00 ; vmovdqu ymm13,[rsp+0x240]",
    "c5 7e 6f b4 24 60 02 00 00 ; vmovdqu ymm14,[rsp+0x260]",
    "c5 7e 6f bc 24 80 02 00 00 ; vmovdqu ymm15,[rsp+0x280]",
    "c4 e3 7d 18 44 24 10 00 ; vinsertf128 ymm0,ymm0,[rsp+0x10],0",
    "c4 e3 75 18 4c 24 20 00 ; vinsertf128 ymm1,ymm1,[rsp+0x20],0",
    "48 8b 04 24 ; mov rax,[rsp]",
    "48 8b 54 24 08 ; mov rdx,[rsp+8]",
    "48 8b 4c 24 50 ; mov rcx,[rsp+0x50]",
    "48 8b 74 24 58 ; mov rsi,[rsp+0x58]",
    "48 8b 7c 24 60 ; mov rdi,[rsp+0x60]",
    "4c 8b 44 24 68 ; mov r8,[rsp+0x68]",
    "4c 8b 4c 24 70 ; mov r9,[rsp+0x70]",
    "4c 8b 54 24 78 ; mov r10,[rsp+0x78]",
    "4c 8b 9c 24 80 00 00 00 ; mov r11,[rsp+0x80]",
    "48 89 dc ; mov rsp,rbx",
    "48 8b 5c 24 f0 ; mov rbx,[rsp-0x10]",
    "ff 64 24 f8 ; jmp qword ptr [rsp-8]",
];
const OFFSET: &[&str] = &[
    "48 8d 64 24 80 ; lea rsp,[rsp-0x80]",
    "50 ; push rax",
    "50 ; push rax",
    "9c ; pushfq",
    "fc ; cld",
    "41 57 ; push r15",
    "41 56 ; push r14",
    "41 55 ; push r13",
    "41 54 ; push r12",
    "41 53 ; push r11",
    "41 52 ; push r10",
    "41 51 ; push r9",
    "41 50 ; push r8",
    "54 ; push rsp",
    "55 ; push rbp",
    "57 ; push rdi",
    "56 ; push rsi",
    "52 ; push rdx",
    "51 ; push rcx",
    "53 ; push rbx",
    "50 ; push rax",
    "48 89 e3 ; mov rbx,rsp",
    "48 8d 83 18 01 00 00 ; lea rax,[rbx+0x118]",
    "48 89 43 38 ; mov [rbx+0x38],rax",
    "48 b8 00 00 56 34 12 7f 00 00 ; mov rax,0x7f1234560000",
    "48 89 83 88 00 00 00 ; mov [rbx+0x88],rax",
    "48 8d a4 24 40 f5 ff ff ; lea rsp,[rsp-0xac0]",
    "48 83 e4 c0 ; and rsp,0xffffffffffffffc0",
    "48 89 a3 90 00 00 00 ; mov [rbx+0x90],rsp",
    "48 c7 84 24 00 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x200],0",
    "48 c7 84 24 08 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x208],0",
    "48 c7 84 24 10 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x210],0",
    "48 c7 84 24 18 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x218],0",
    "48 c7 84 24 20 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x220],0",
    "48 c7 84 24 28 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x228],0",
    "48 c7 84 24 30 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x230],0",
    "48 c7 84 24 38 02 00 00 00 00 00 00 ; mov qword ptr [rsp+0x238],0",
    "b8 e7 02 00 00 ; mov eax,0x2e7",
    "ba 00 00 00 00 ; mov edx,0",
    "48 0f ae 24 24 ; xsave64 [rsp]",
    "48 bf 11 11 11 11 11 11 11 11 ; mov rdi,0x1111111111111111",
    "48 89 de ; mov rsi,rbx",
    "49 bb 44 44 44 44 44 44 44 44 ; mov r11,0x4444444444444444",
    "41 ff d3 ; call r11",
    "b8 e7 02 00 00 ; mov eax,0x2e7",
    "ba 00 00 00 00 ; mov edx,0",
    "48 0f ae 2c 24 ; xrstor64 [rsp]",
    "48 89 dc ; mov rsp,rbx",
    "58 ; pop rax",
    "5b ; pop rbx",
    "59 ; pop rcx",
    "5a ; pop rdx",
    "5e ; pop rsi",
    "5f ; pop rdi",
    "5d ; pop rbp",
    "48 8d 64 24 08 ; lea rsp,[rsp+8]",
    "41 58 ; pop r8",
    "41 59 ; pop r9",
    "41 5a ; pop r10",
    "41 5b ; pop r11",
    "41 5c ; pop r12",
    "41 5d ; pop r13",
    "41 5e ; pop r14",
    "41 5f ; pop r15",
    "9d ; popfq",
    "48 8d a4 24 90 00 00 00 ; lea rsp,[rsp+0x90]",
    "8d 04 7f ; lea eax,[rdi+rdi*2]",
    "83 c0 07 ; add eax,7",
    "e9 e8 fe ff ef ; jmp 0x7f1234560006",
];
