//! Handlers that re-enter the probed function, and handlers that panic.
//!
//! A nested hit on the same thread while a handler runs must run only the original code
//! (counted in `skipped`); a panicking handler must be contained, counted, and disable
//! its probe while the function keeps computing the right results.

use agent::interceptor::{Interceptor, ProbeRequest};
use probes::abi::shared::flags;
use probes::{EntryContext, ExitContext};
use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

global_asm!(
    ".text",
    // (2b ^ a) + 7, one copy per test so probes do not collide.
    ".globl re_leaf_a",
    "re_leaf_a:",
    "lea rax, [rsi+rsi]",
    "xor rax, rdi",
    "add rax, 7",
    "ret",
    "re_leaf_a_end:",
    ".globl re_leaf_b",
    "re_leaf_b:",
    "lea rax, [rsi+rsi]",
    "xor rax, rdi",
    "add rax, 7",
    "ret",
    "re_leaf_b_end:",
    ".globl re_leaf_c",
    "re_leaf_c:",
    "lea rax, [rsi+rsi]",
    "xor rax, rdi",
    "add rax, 7",
    "ret",
    "re_leaf_c_end:",
    ".globl re_leaf_d",
    "re_leaf_d:",
    "lea rax, [rsi+rsi]",
    "xor rax, rdi",
    "add rax, 7",
    "ret",
    "re_leaf_d_end:",
);

extern "C" {
    fn re_leaf_a(a: u64, b: u64) -> u64;
    fn re_leaf_b(a: u64, b: u64) -> u64;
    fn re_leaf_c(a: u64, b: u64) -> u64;
    fn re_leaf_d(a: u64, b: u64) -> u64;
    static re_leaf_a_end: u8;
    static re_leaf_b_end: u8;
    static re_leaf_c_end: u8;
    static re_leaf_d_end: u8;
}

static INTERCEPTOR: Mutex<Option<Interceptor>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Interceptor) -> R) -> R {
    let mut g = INTERCEPTOR.lock().unwrap();
    let i = g.get_or_insert_with(|| Interceptor::new(64).unwrap());
    f(i)
}

fn install(req: ProbeRequest) -> u32 {
    with(|i| {
        let p = i.prepare(&req).expect("prepare");
        i.commit_in_process(&p).expect("commit");
        p.id
    })
}

/// (hits, exits, skipped, panics, flags)
fn counters(id: u32) -> (u64, u64, u64, u64, u32) {
    with(|i| {
        let c = i.counters(id);
        (c.hits(), c.exits(), c.skipped(), c.panics(), c.flags())
    })
}

fn expected(a: u64, b: u64) -> u64 {
    ((b * 2) ^ a) + 7
}

fn size(start: *const (), end: *const u8) -> (u64, Option<u64>) {
    (start as u64, Some(end as u64 - start as u64))
}

static NESTED_A: AtomicU64 = AtomicU64::new(0);

fn entry_calls_itself(ctx: &mut EntryContext) {
    // SAFETY: calling the assembly function with its signature.
    let r = unsafe { re_leaf_a(ctx.arg(1), ctx.arg(0)) };
    NESTED_A.fetch_add(r, SeqCst);
}

#[test]
fn entry_handler_calling_the_probed_function_runs_the_original() {
    let (a, s) = size(re_leaf_a as *const (), std::ptr::addr_of!(re_leaf_a_end));
    let id = install(ProbeRequest::entry(a, s).on_entry(entry_calls_itself));
    let mut want_nested = 0;
    for i in 0..50u64 {
        // SAFETY: calling the assembly function with its signature.
        assert_eq!(unsafe { re_leaf_a(i, i + 3) }, expected(i, i + 3));
        want_nested += expected(i + 3, i);
    }
    // Each outer hit ran the handler; each nested call ran only the original code.
    assert_eq!(NESTED_A.load(SeqCst), want_nested);
    let (hits, _, skipped, panics, _) = counters(id);
    assert_eq!((hits, skipped, panics), (50, 50, 0));
}

static NESTED_B: AtomicU64 = AtomicU64::new(0);

fn exit_calls_itself(ctx: &mut ExitContext) {
    // SAFETY: calling the assembly function with its signature.
    let r = unsafe { re_leaf_b(ctx.retval(), 1) };
    NESTED_B.fetch_add(r, SeqCst);
}

fn entry_calls_itself_b(ctx: &mut EntryContext) {
    // SAFETY: calling the assembly function with its signature.
    let r = unsafe { re_leaf_b(ctx.arg(0), 0) };
    NESTED_B.fetch_add(r, SeqCst);
}

#[test]
fn exit_handler_calling_the_probed_function_runs_the_original() {
    let (a, s) = size(re_leaf_b as *const (), std::ptr::addr_of!(re_leaf_b_end));
    let id = install(
        ProbeRequest::entry(a, s)
            .on_entry(entry_calls_itself_b)
            .on_exit(exit_calls_itself),
    );
    let mut want = 0;
    for i in 0..50u64 {
        // SAFETY: calling the assembly function with its signature.
        assert_eq!(unsafe { re_leaf_b(i, 2 * i) }, expected(i, 2 * i));
        want += expected(i, 0) + expected(expected(i, 2 * i), 1);
    }
    assert_eq!(NESTED_B.load(SeqCst), want);
    let (hits, exits, skipped, panics, _) = counters(id);
    // Two nested calls per outer call, one from each handler, neither redirected.
    assert_eq!((hits, exits, skipped, panics), (50, 50, 100, 0));
}

static PANIC_RUNS: AtomicU64 = AtomicU64::new(0);

fn panicking_entry(ctx: &mut EntryContext) {
    PANIC_RUNS.fetch_add(1, SeqCst);
    if ctx.arg(0) == 3 {
        panic!("handler panics on purpose at a == 3");
    }
}

#[test]
fn panicking_entry_handler_is_contained_and_disables_the_probe() {
    let (a, s) = size(re_leaf_c as *const (), std::ptr::addr_of!(re_leaf_c_end));
    let id = install(ProbeRequest::entry(a, s).on_entry(panicking_entry));
    for i in 0..10u64 {
        // SAFETY: calling the assembly function with its signature.
        assert_eq!(unsafe { re_leaf_c(i, 5) }, expected(i, 5));
    }
    // Calls 0..=3 ran the handler; the panic at 3 disabled the probe.
    assert_eq!(PANIC_RUNS.load(SeqCst), 4);
    let (hits, _, skipped, panics, f) = counters(id);
    assert_eq!((hits, skipped, panics), (4, 0, 1));
    assert_eq!(f & flags::ENABLED, 0);
    assert_ne!(f & flags::DISABLED_BY_PANIC, 0);
}

static EXIT_PANIC_RUNS: AtomicU64 = AtomicU64::new(0);

fn panicking_exit(ctx: &mut ExitContext) {
    EXIT_PANIC_RUNS.fetch_add(1, SeqCst);
    if ctx.retval() == expected(2, 1) {
        panic!("exit handler panics on purpose");
    }
}

#[test]
fn panicking_exit_handler_is_contained_and_returns_correctly() {
    let (a, s) = size(re_leaf_d as *const (), std::ptr::addr_of!(re_leaf_d_end));
    let id = install(ProbeRequest::entry(a, s).on_exit(panicking_exit));
    for i in 0..10u64 {
        // SAFETY: calling the assembly function with its signature.
        assert_eq!(unsafe { re_leaf_d(i, 1) }, expected(i, 1));
    }
    assert_eq!(EXIT_PANIC_RUNS.load(SeqCst), 3);
    let (hits, exits, _, panics, f) = counters(id);
    assert_eq!((hits, exits, panics), (3, 3, 1));
    assert_eq!(f & flags::ENABLED, 0);
    assert_ne!(f & flags::DISABLED_BY_PANIC, 0);
}
