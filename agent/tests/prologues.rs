//! Probes on hand-written prologues, one per class, installed in this process.
//!
//! The functions are assembled into this test binary so their bytes are exactly those
//! written here. Each is called unprobed, then probed (entry, exit), and must compute the
//! same results; handlers observe and change arguments and return values.

use agent::interceptor::{Interceptor, PrepareError, ProbeRequest};
use agent::relocator::Refusal;
use probes::abi::shared::ProbeKind;
use probes::context::OffsetContext;
use probes::{EntryContext, ExitContext, Xmm};
use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

global_asm!(
    ".text",
    // The 12-byte leaf Frida refuses: (a + a... ) = (b*2 ^ a) + 7
    ".globl t_leaf12",
    "t_leaf12:",
    "lea rax, [rsi+rsi]",
    "xor rax, rdi",
    "add rax, 7",
    "ret",
    "t_leaf12_end:",
    // RIP-relative load in the first 5 bytes.
    ".globl t_riprel",
    "t_riprel:",
    "mov rax, qword ptr [rip + t_data]",
    "add rax, rdi",
    "ret",
    "t_riprel_end:",
    // RIP-relative lea in the first 5 bytes.
    ".globl t_riplea",
    "t_riplea:",
    "lea rax, [rip + t_data]",
    "mov rax, qword ptr [rax+8]",
    "add rax, rdi",
    "ret",
    "t_riplea_end:",
    // jcc rel8 in the first 5 bytes.
    ".globl t_jcc",
    "t_jcc:",
    "test rdi, rdi",
    "jz 2f",
    "lea rax, [rdi+1]",
    "ret",
    "2:",
    "mov rax, -1",
    "ret",
    "t_jcc_end:",
    // call rel32 first.
    ".globl t_call",
    "t_call:",
    "call t_helper",
    "add rax, rdi",
    "ret",
    "t_call_end:",
    "t_helper:",
    "mov rax, 1000",
    "ret",
    // endbr64 first.
    ".globl t_endbr",
    "t_endbr:",
    "endbr64",
    "mov rax, rdi",
    "imul rax, rax, 3",
    "ret",
    "t_endbr_end:",
    // Too short: 3 bytes.
    ".globl t_tiny",
    "t_tiny:",
    "xor eax, eax",
    "ret",
    "t_tiny_end:",
    "int3",
    "int3",
    "int3",
    "int3",
    "int3",
    "int3",
    "int3",
    "int3",
    // A loop jumping back strictly inside the first 5 bytes.
    ".globl t_backjump",
    "t_backjump:",
    "xor eax, eax",
    "3:",
    "add rax, rdi",
    "dec rsi",
    "jnz 3b",
    "ret",
    "t_backjump_end:",
    // A jump table (switch) whose cases lie after the stolen bytes.
    ".globl t_switch",
    "t_switch:",
    "cmp rdi, 3",
    "ja 5f",
    "lea rax, [rip + 6f]",
    "movsxd rdx, dword ptr [rax+rdi*4]",
    "add rdx, rax",
    "jmp rdx",
    "4:",
    "mov rax, 10",
    "ret",
    "41:",
    "mov rax, 11",
    "ret",
    "42:",
    "mov rax, 12",
    "ret",
    "43:",
    ".globl t_switch_case3",
    "t_switch_case3:",
    "mov rax, 13",
    "ret",
    "5:",
    "mov rax, 99",
    "ret",
    "t_switch_end:",
    ".section .rodata",
    ".p2align 2",
    "6:",
    ".long 4b-6b",
    ".long 41b-6b",
    ".long 42b-6b",
    ".long 43b-6b",
    ".text",
    // 8 integer and 4 float arguments: sum of ints + trunc(sum of floats).
    ".globl t_args",
    "t_args:",
    "mov rax, rdi",
    "add rax, rsi",
    "add rax, rdx",
    "add rax, rcx",
    "add rax, r8",
    "add rax, r9",
    "add rax, qword ptr [rsp+8]",
    "add rax, qword ptr [rsp+16]",
    ".globl t_args_floats",
    "t_args_floats:",
    "addsd xmm0, xmm1",
    "addsd xmm0, xmm2",
    "addsd xmm0, xmm3",
    "cvttsd2si rcx, xmm0",
    "add rax, rcx",
    "ret",
    "t_args_end:",
    // A tail call (the jmp after the stolen bytes) between two probed functions.
    ".globl t_tail_outer",
    "t_tail_outer:",
    "lea rax, [rdi+rdi*2]",
    "mov rdi, rax",
    "jmp t_tail_inner",
    "t_tail_outer_end:",
    ".globl t_tail_inner",
    "t_tail_inner:",
    "lea rax, [rdi+1]",
    "nop",
    "nop",
    "ret",
    "t_tail_inner_end:",
    // A tail call that is itself among the stolen bytes.
    ".globl t_tail_outer2",
    "t_tail_outer2:",
    "add rdi, 2",
    "jmp t_tail_inner2",
    "t_tail_outer2_end:",
    ".globl t_tail_inner2",
    "t_tail_inner2:",
    "lea rax, [rdi+rdi]",
    "nop",
    "nop",
    "ret",
    "t_tail_inner2_end:",
    // Two copies of a + 1 for the multi-threaded counting test.
    ".globl t_mt1",
    "t_mt1:",
    "lea rax, [rdi+1]",
    "nop",
    "nop",
    "ret",
    "t_mt1_end:",
    ".globl t_mt2",
    "t_mt2:",
    "lea rax, [rdi+1]",
    "nop",
    "nop",
    "ret",
    "t_mt2_end:",
    // 5a + b.
    ".globl t_mod",
    "t_mod:",
    "lea rax, [rdi+rdi*4]",
    "add rax, rsi",
    "ret",
    "t_mod_end:",
    // Returns a double: a * 2.5.
    ".globl t_fret",
    "t_fret:",
    "cvtsi2sd xmm0, rdi",
    "mulsd xmm0, qword ptr [rip + t_two_and_half]",
    "ret",
    "t_fret_end:",
    ".section .data",
    ".p2align 3",
    "t_data:",
    ".quad 4000",
    ".quad 5000",
    "t_two_and_half:",
    ".double 2.5",
    ".text",
);

extern "C" {
    fn t_leaf12(a: u64, b: u64) -> u64;
    fn t_riprel(a: u64) -> u64;
    fn t_riplea(a: u64) -> u64;
    fn t_jcc(a: u64) -> u64;
    fn t_call(a: u64) -> u64;
    fn t_endbr(a: u64) -> u64;
    fn t_tiny(a: u64) -> u64;
    fn t_backjump(a: u64, n: u64) -> u64;
    fn t_switch(a: u64) -> u64;
    #[allow(clippy::too_many_arguments)]
    fn t_args(
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        e: u64,
        f: u64,
        g: u64,
        h: u64,
        x: f64,
        y: f64,
        z: f64,
        w: f64,
    ) -> u64;
    fn t_fret(a: u64) -> f64;
    fn t_mod(a: u64, b: u64) -> u64;
    fn t_mt1(a: u64) -> u64;
    static t_switch_case3: u8;
    static t_args_floats: u8;
    fn t_tail_outer(a: u64) -> u64;
    fn t_tail_outer2(a: u64) -> u64;
    static t_tail_outer_end: u8;
    static t_tail_inner_end: u8;
    static t_tail_outer2_end: u8;
    static t_tail_inner2_end: u8;
    fn t_tail_inner(a: u64) -> u64;
    fn t_tail_inner2(a: u64) -> u64;
    fn t_mt2(a: u64) -> u64;
    static t_mt1_end: u8;
    static t_mt2_end: u8;
    static t_mod_end: u8;
    static t_leaf12_end: u8;
    static t_riprel_end: u8;
    static t_riplea_end: u8;
    static t_jcc_end: u8;
    static t_call_end: u8;
    static t_endbr_end: u8;
    static t_tiny_end: u8;
    static t_backjump_end: u8;
    static t_switch_end: u8;
    static t_args_end: u8;
    static t_fret_end: u8;
}

/// Probes in one process share the interceptor; tests run in parallel threads.
static INTERCEPTOR: Mutex<Option<Interceptor>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Interceptor) -> R) -> R {
    let mut g = INTERCEPTOR.lock().unwrap();
    let i = g.get_or_insert_with(|| Interceptor::new(1024).unwrap());
    f(i)
}

fn func(start: *const (), end: *const u8) -> (u64, u64) {
    let s = start as u64;
    (s, end as u64 - s)
}

/// Prepare and commit; returns the probe id.
fn install(req: ProbeRequest) -> Result<u32, PrepareError> {
    with(|i| {
        let p = i.prepare(&req)?;
        i.commit_in_process(&p).unwrap();
        Ok(p.id)
    })
}

/// Prepare and commit an offset probe `offset` bytes into the function at `address`.
fn install_offset(
    address: u64,
    size: u64,
    offset: u64,
    h: Option<fn(&mut OffsetContext)>,
) -> Result<u32, PrepareError> {
    let mut req = ProbeRequest::entry(address, Some(size));
    req.kind = ProbeKind::Offset;
    req.offset = offset;
    with(|i| {
        let p = i.prepare_offset(&req, h)?;
        i.commit_in_process(&p).unwrap();
        Ok(p.id)
    })
}

fn hits(id: u32) -> u64 {
    with(|i| i.counters(id).hits())
}

fn exits(id: u32) -> u64 {
    with(|i| i.counters(id).exits())
}

macro_rules! addr {
    ($f:ident, $end:ident) => {
        func($f as *const (), std::ptr::addr_of!($end))
    };
}

#[test]
fn leaf12_entry_counts_and_keeps_results() {
    let (a, size) = addr!(t_leaf12, t_leaf12_end);
    assert_eq!(size, 12);
    // SAFETY: calling the assembly functions with their documented signatures.
    let before: Vec<u64> = (0..100).map(|i| unsafe { t_leaf12(i, i * 7) }).collect();
    let id = install(ProbeRequest::entry(a, Some(size))).expect("leaf12 must be probeable");
    // SAFETY: as above.
    let after: Vec<u64> = (0..100).map(|i| unsafe { t_leaf12(i, i * 7) }).collect();
    assert_eq!(before, after);
    assert_eq!(hits(id), 100);
}

static SEEN: AtomicU64 = AtomicU64::new(0);

fn add_one_to_arg0(ctx: &mut EntryContext) {
    SEEN.store(ctx.arg(0), SeqCst);
    ctx.set_arg(0, ctx.arg(0) + 1);
}

#[test]
fn riprel_load_and_lea_relocate() {
    for (a, size, f) in [
        {
            let (a, s) = addr!(t_riprel, t_riprel_end);
            (a, s, t_riprel as unsafe extern "C" fn(u64) -> u64)
        },
        {
            let (a, s) = addr!(t_riplea, t_riplea_end);
            (a, s, t_riplea as unsafe extern "C" fn(u64) -> u64)
        },
    ] {
        // SAFETY: calling the assembly functions with their signatures.
        let before = unsafe { f(5) };
        let id = install(ProbeRequest::entry(a, Some(size))).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { f(5) }, before);
        assert_eq!(hits(id), 1);
    }
}

#[test]
fn jcc_rel8_in_the_stolen_bytes() {
    let (a, size) = addr!(t_jcc, t_jcc_end);
    let id = install(ProbeRequest::entry(a, Some(size))).unwrap();
    // SAFETY: calling the assembly function with its signature.
    unsafe {
        assert_eq!(t_jcc(0), u64::MAX);
        assert_eq!(t_jcc(41), 42);
    }
    assert_eq!(hits(id), 2);
}

#[test]
fn call_rel32_in_the_stolen_bytes() {
    let (a, size) = addr!(t_call, t_call_end);
    let id = install(ProbeRequest::entry(a, Some(size)).with_exit()).unwrap();
    // SAFETY: calling the assembly function with its signature.
    assert_eq!(unsafe { t_call(5) }, 1005);
    assert_eq!((hits(id), exits(id)), (1, 1));
}

#[test]
fn endbr64_stays_first() {
    let (a, size) = addr!(t_endbr, t_endbr_end);
    let id = install(ProbeRequest::entry(a, Some(size))).unwrap();
    // SAFETY: reading our own code.
    let first = unsafe { std::slice::from_raw_parts(a as *const u8, 5) };
    assert_eq!(&first[..4], &[0xf3, 0x0f, 0x1e, 0xfa]);
    assert_eq!(first[4], 0xe9);
    // SAFETY: calling the assembly function with its signature.
    assert_eq!(unsafe { t_endbr(7) }, 21);
    assert_eq!(hits(id), 1);
}

#[test]
fn too_short_and_back_jump_are_refused_with_reasons() {
    let (a, size) = addr!(t_tiny, t_tiny_end);
    match install(ProbeRequest::entry(a, Some(size))) {
        Err(PrepareError::Refused(
            Refusal::FunctionTooShort { .. } | Refusal::EndsTooSoon { .. },
        )) => {}
        other => panic!("tiny: {other:?}"),
    }
    let (a, size) = addr!(t_backjump, t_backjump_end);
    match install(ProbeRequest::entry(a, Some(size))) {
        Err(PrepareError::Refused(Refusal::BranchIntoStolen { target, .. })) => {
            assert_eq!(target, a + 2)
        }
        other => panic!("backjump: {other:?}"),
    }
    // Nothing was written.
    // SAFETY: calling the assembly functions with their signatures.
    unsafe {
        assert_eq!(t_tiny(1), 0);
        assert_eq!(t_backjump(3, 4), 12);
    }
}

#[test]
fn jump_table_function() {
    let (a, size) = addr!(t_switch, t_switch_end);
    // SAFETY: calling the assembly function with its signature.
    let before: Vec<u64> = (0..6).map(|i| unsafe { t_switch(i) }).collect();
    let id = install(ProbeRequest::entry(a, Some(size)).with_exit()).unwrap();
    // SAFETY: as above.
    let after: Vec<u64> = (0..6).map(|i| unsafe { t_switch(i) }).collect();
    assert_eq!(before, vec![10, 11, 12, 13, 99, 99]);
    assert_eq!(before, after);
    assert_eq!((hits(id), exits(id)), (6, 6));
    // An offset probe on a case the jump table lands on.
    let case3 = std::ptr::addr_of!(t_switch_case3) as u64;
    let off = install_offset(a, size, case3 - a, None).unwrap();
    // SAFETY: as above.
    let again: Vec<u64> = (0..6).map(|i| unsafe { t_switch(i) }).collect();
    assert_eq!(again, before);
    assert_eq!(hits(off), 1);
    assert_eq!((hits(id), exits(id)), (12, 12));
}

static ARGS_SEEN: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn args_entry(ctx: &mut EntryContext) {
    let mut v: Vec<u64> = (0..8).map(|i| ctx.arg(i)).collect();
    v.extend((0..4).map(|i| ctx.float_arg(i) as u64));
    *ARGS_SEEN.lock().unwrap() = v;
    // Change an integer register argument, a stack argument and a float argument.
    ctx.set_arg(1, 100);
    ctx.set_arg(7, 1000);
    ctx.set_float_arg(3, 10000.0);
}

static RET_SEEN: AtomicU64 = AtomicU64::new(0);
static DURATION: AtomicU64 = AtomicU64::new(u64::MAX);

fn args_exit(ctx: &mut ExitContext) {
    RET_SEEN.store(ctx.retval(), SeqCst);
    DURATION.store(ctx.duration_ns, SeqCst);
    ctx.set_retval(ctx.retval() + 1);
}

#[test]
fn eight_int_and_four_float_arguments() {
    let (a, size) = addr!(t_args, t_args_end);
    // SAFETY: calling the assembly function with its signature.
    let call = || unsafe { t_args(1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.0, 3.0) };
    assert_eq!(call(), 36 + 7);
    let id = install(
        ProbeRequest::entry(a, Some(size))
            .on_entry(args_entry)
            .on_exit(args_exit),
    )
    .unwrap();
    let r = call();
    assert_eq!(
        *ARGS_SEEN.lock().unwrap(),
        vec![1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]
    );
    // 1+100+3+4+5+6+7+1000 + trunc(0.5+1.5+2+10000) = 1126 + 10004, then +1 at exit.
    assert_eq!(RET_SEEN.load(SeqCst), 1126 + 10004);
    assert_eq!(r, 1126 + 10004 + 1);
    assert!(DURATION.load(SeqCst) < 1_000_000_000);
    assert_eq!((hits(id), exits(id)), (1, 1));
    // An offset probe in the middle, where the float arguments are summed: it sees the
    // second one and replaces it.
    let floats = std::ptr::addr_of!(t_args_floats) as u64;
    let off = install_offset(a, size, floats - a, Some(floats_handler)).unwrap();
    let r = call();
    assert_eq!(XMM1_SEEN.load(SeqCst), 1.5f64.to_bits());
    // trunc(0.5 + 100 + 2 + 10000) instead of trunc(0.5 + 1.5 + 2 + 10000).
    assert_eq!(r, 1126 + 10102 + 1);
    assert_eq!(hits(off), 1);
    assert_eq!((hits(id), exits(id)), (2, 2));
}

static XMM1_SEEN: AtomicU64 = AtomicU64::new(0);

fn floats_handler(ctx: &mut OffsetContext) {
    XMM1_SEEN.store(ctx.xmm(1).0[0], SeqCst);
    let mut x = Xmm::default();
    x.set_f64(100.0);
    ctx.set_xmm(1, x);
}

fn fret_exit(ctx: &mut ExitContext) {
    ctx.set_float_retval(ctx.float_retval() * 2.0);
}

#[test]
fn float_return_value_is_writable() {
    let (a, size) = addr!(t_fret, t_fret_end);
    // SAFETY: calling the assembly function with its signature.
    assert_eq!(unsafe { t_fret(4) }, 10.0);
    install(ProbeRequest::entry(a, Some(size)).on_exit(fret_exit)).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { t_fret(4) }, 20.0);
}

#[test]
fn handler_sees_and_changes_arguments() {
    let (a, size) = addr!(t_mod, t_mod_end);
    // SAFETY: calling the assembly function with its signature.
    assert_eq!(unsafe { t_mod(3, 4) }, 19);
    install(ProbeRequest::entry(a, Some(size)).on_entry(add_one_to_arg0)).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { t_mod(3, 4) }, 24);
    assert_eq!(SEEN.load(SeqCst), 3);
}

fn nothing(_: &mut EntryContext) {}

/// Counts stay exact when several threads hit one probe at once, on the inline path of
/// handler-less probes (entry and exit) and on the path that calls a handler.
#[test]
fn counts_are_exact_across_threads() {
    const THREADS: u64 = 4;
    const CALLS: u64 = 200_000;
    let (a1, s1) = addr!(t_mt1, t_mt1_end);
    let (a2, s2) = addr!(t_mt2, t_mt2_end);
    let inline = install(ProbeRequest::entry(a1, Some(s1)).with_exit()).unwrap();
    let handler = install(ProbeRequest::entry(a2, Some(s2)).on_entry(nothing)).unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(|| {
                let mut x = 0;
                for _ in 0..CALLS {
                    // SAFETY: calling the assembly functions with their signatures.
                    x = unsafe { t_mt2(t_mt1(x)) };
                }
                x
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 2 * CALLS);
    }
    assert_eq!(hits(inline), THREADS * CALLS);
    assert_eq!(exits(inline), THREADS * CALLS);
    assert_eq!(hits(handler), THREADS * CALLS);
}

static TAIL_EXITS: AtomicU64 = AtomicU64::new(0);

fn tail_exit(ctx: &mut ExitContext) {
    TAIL_EXITS.fetch_add(ctx.retval(), SeqCst);
}

/// A probed function that tail-calls another probed function: both returns are seen,
/// in turn, and the results are unchanged; with the jmp after the stolen bytes and
/// among them, with inline (handler-less) and handler paths mixed.
#[test]
fn tail_calls_between_exit_probed_functions() {
    let (o, os) = addr!(t_tail_outer, t_tail_outer_end);
    let (i, is) = addr!(t_tail_inner, t_tail_inner_end);
    let outer = install(ProbeRequest::entry(o, Some(os)).with_exit()).unwrap();
    let inner = install(ProbeRequest::entry(i, Some(is)).with_exit()).unwrap();
    for x in 0..1000 {
        // SAFETY: calling the assembly functions with their signatures.
        assert_eq!(unsafe { t_tail_outer(x) }, 3 * x + 1);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { t_tail_inner(5) }, 6);
    assert_eq!((hits(outer), exits(outer)), (1000, 1000));
    assert_eq!((hits(inner), exits(inner)), (1001, 1001));

    let (o, os) = addr!(t_tail_outer2, t_tail_outer2_end);
    let (i, is) = addr!(t_tail_inner2, t_tail_inner2_end);
    let outer = install(ProbeRequest::entry(o, Some(os)).with_exit()).unwrap();
    let inner = install(ProbeRequest::entry(i, Some(is)).on_exit(tail_exit)).unwrap();
    let mut expected = 0;
    for x in 0..1000 {
        // SAFETY: as above.
        assert_eq!(unsafe { t_tail_outer2(x) }, 2 * (x + 2));
        expected += 2 * (x + 2);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { t_tail_inner2(5) }, 10);
    assert_eq!((hits(outer), exits(outer)), (1000, 1000));
    assert_eq!((hits(inner), exits(inner)), (1001, 1001));
    assert_eq!(TAIL_EXITS.load(SeqCst), expected + 10);
    let lost = with(|i| i.counters(outer).lost_exits());
    assert_eq!(lost, 0);
}
