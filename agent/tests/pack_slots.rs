//! Pack handlers reached through a probe's slots, in process: the dispatcher calls the
//! shim with the probe's name, a return shim changes what the call returns, a shim that
//! reports a panic disables the probe, and a repeated request for pack handlers reuses
//! the probe (same slot, same trampoline) with the new shims written into its slots.

use agent::interceptor::{Interceptor, PackHandlers, ProbeRequest};
use probes::context::{EntryContext, ExitContext};
use probes::pack::abi::{HitInfo, SHIM_OK, SHIM_PANICKED};
use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

global_asm!(
    ".text",
    // a * 3 + 1, one copy per test so probes do not collide.
    ".globl pack_leaf_a",
    "pack_leaf_a:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
    ".globl pack_leaf_b",
    "pack_leaf_b:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
    ".globl pack_leaf_c",
    "pack_leaf_c:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
    ".globl pack_leaf_d",
    "pack_leaf_d:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
);

extern "C" {
    fn pack_leaf_a(a: u64) -> u64;
    fn pack_leaf_b(a: u64) -> u64;
    fn pack_leaf_c(a: u64) -> u64;
    fn pack_leaf_d(a: u64) -> u64;
}

static FIRST: AtomicU64 = AtomicU64::new(0);
static SECOND: AtomicU64 = AtomicU64::new(0);
static ARG: AtomicU64 = AtomicU64::new(0);
static NAME_OK: AtomicU64 = AtomicU64::new(0);
/// The tests share the agent's per-thread state and the shims' statics.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn name(hit: *const HitInfo) -> String {
    // SAFETY: the dispatcher passes a valid HitInfo whose name lives as long as the probe.
    let hit = unsafe { &*hit };
    // SAFETY: as above.
    let b = unsafe { std::slice::from_raw_parts(hit.name, hit.name_len) };
    String::from_utf8_lossy(b).into_owned()
}

unsafe extern "C" fn first_entry(ctx: *mut u8, hit: *const HitInfo) -> u32 {
    // SAFETY: an entry probe's shim gets an EntryContext.
    ARG.store(unsafe { (*(ctx as *mut EntryContext)).rdi }, SeqCst);
    if name(hit) == "test:leaf" {
        NAME_OK.fetch_add(1, SeqCst);
    }
    FIRST.fetch_add(1, SeqCst);
    SHIM_OK
}

unsafe extern "C" fn second_entry(_ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    SECOND.fetch_add(1, SeqCst);
    SHIM_OK
}

unsafe extern "C" fn forty_two(ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    // SAFETY: an exit probe's return shim gets an ExitContext.
    unsafe { (*(ctx as *mut ExitContext)).rax = 42 };
    SHIM_OK
}

unsafe extern "C" fn panicked(_ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    SHIM_PANICKED
}

fn request(f: unsafe extern "C" fn(u64) -> u64, entry: u64, exit: u64) -> ProbeRequest {
    let mut r = ProbeRequest::entry(f as usize as u64, Some(8));
    if exit != 0 {
        r = r.with_exit();
    }
    r.pack = Some(PackHandlers {
        entry,
        exit,
        exit_timed: true,
        name: "test:leaf",
    });
    r
}

#[test]
fn shims_run_from_the_slots_and_a_repeated_request_swaps_them_in_place() {
    let _g = ONE_AT_A_TIME.lock().unwrap();
    let mut i = Interceptor::new(4).expect("interceptor");
    let (p, reused) = i
        .prepare_reusing(&request(pack_leaf_a, first_entry as *const () as u64, 0))
        .expect("prepare");
    assert!(!reused);
    i.commit_in_process(&p).expect("commit");
    // SAFETY: the probed leaf keeps its contract.
    assert_eq!(unsafe { pack_leaf_a(7) }, 22);
    assert_eq!(
        (FIRST.load(SeqCst), ARG.load(SeqCst), NAME_OK.load(SeqCst)),
        (1, 7, 1)
    );
    i.revert_in_process(&p).expect("revert");

    let (q, reused) = i
        .prepare_reusing(&request(pack_leaf_a, second_entry as *const () as u64, 0))
        .expect("prepare again");
    assert!(reused);
    assert_eq!((q.id, q.trampoline), (p.id, p.trampoline));
    i.commit_in_process(&q).expect("commit again");
    // SAFETY: as above.
    assert_eq!(unsafe { pack_leaf_a(1) }, 4);
    assert_eq!((FIRST.load(SeqCst), SECOND.load(SeqCst)), (1, 1));
    assert_eq!(i.counters(q.id).hits(), 1);
    i.revert_in_process(&q).expect("revert");
}

#[test]
fn a_return_shim_changes_the_result_and_a_panicking_shim_disables_its_probe() {
    let _g = ONE_AT_A_TIME.lock().unwrap();
    let mut i = Interceptor::new(4).expect("interceptor");
    let p = i
        .prepare(&request(pack_leaf_b, 0, forty_two as *const () as u64))
        .expect("prepare");
    i.commit_in_process(&p).expect("commit");
    // The first call of a thread maps its shadow stack on the general path; the others
    // take the inline one.
    for k in 0..3 {
        // SAFETY: the probed leaf keeps its contract, but for the return the shim sets.
        assert_eq!(unsafe { pack_leaf_b(5 + k) }, 42);
    }
    assert_eq!(i.counters(p.id).exits(), 3);
    i.revert_in_process(&p).expect("revert");

    let (q, reused) = i
        .prepare_reusing(&request(pack_leaf_b, panicked as *const () as u64, 0))
        .expect("prepare");
    assert!(!reused, "an entry probe is not the exit probe above");
    i.commit_in_process(&q).expect("commit");
    for k in 0..3 {
        // SAFETY: as above.
        assert_eq!(unsafe { pack_leaf_b(k) }, k * 3 + 1);
    }
    let c = i.counters(q.id);
    assert_eq!((c.hits(), c.panics()), (1, 1), "disabled after the first");
    i.revert_in_process(&q).expect("revert");
}

static RETURNS: AtomicU64 = AtomicU64::new(0);
static ENTRIES_C: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count_entry(_ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    ENTRIES_C.fetch_add(1, SeqCst);
    SHIM_OK
}

unsafe extern "C" fn count_then_panic(_ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    if RETURNS.fetch_add(1, SeqCst) == 1 {
        SHIM_PANICKED
    } else {
        SHIM_OK
    }
}

/// On the inline exit path too, a return shim reporting a panic disables its probe: the
/// calls after it run unprobed (no entry handler, no return handler, no count).
#[test]
fn a_panicking_return_shim_disables_its_probe() {
    let _g = ONE_AT_A_TIME.lock().unwrap();
    let mut i = Interceptor::new(4).expect("interceptor");
    let p = i
        .prepare(&request(
            pack_leaf_c,
            count_entry as *const () as u64,
            count_then_panic as *const () as u64,
        ))
        .expect("prepare");
    i.commit_in_process(&p).expect("commit");
    for k in 0..5 {
        // SAFETY: the probed leaf keeps its contract.
        assert_eq!(unsafe { pack_leaf_c(k) }, k * 3 + 1);
    }
    let c = i.counters(p.id);
    assert_eq!((c.hits(), c.exits(), c.panics()), (2, 2, 1));
    assert_eq!(RETURNS.load(SeqCst), 2);
    assert_eq!(ENTRIES_C.load(SeqCst), 2);
    i.revert_in_process(&p).expect("revert");
}

static ENTRIES_D: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count_entry_d(_ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    ENTRIES_D.fetch_add(1, SeqCst);
    SHIM_OK
}

/// An exit probe made for a return handler alone, reused by a later session whose pack
/// has an entry handler too: the entry handler runs at every call (the inline path reads
/// whether there is one at each hit).
#[test]
fn a_reused_exit_probe_runs_an_entry_handler_it_had_none_of() {
    let _g = ONE_AT_A_TIME.lock().unwrap();
    let mut i = Interceptor::new(4).expect("interceptor");
    let (p, _) = i
        .prepare_reusing(&request(pack_leaf_d, 0, forty_two as *const () as u64))
        .expect("prepare");
    i.commit_in_process(&p).expect("commit");
    for k in 0..3 {
        // SAFETY: the probed leaf keeps its contract, but for the return the shim sets.
        assert_eq!(unsafe { pack_leaf_d(k) }, 42);
    }
    i.revert_in_process(&p).expect("revert");
    let (q, reused) = i
        .prepare_reusing(&request(
            pack_leaf_d,
            count_entry_d as *const () as u64,
            forty_two as *const () as u64,
        ))
        .expect("prepare again");
    assert!(reused);
    i.commit_in_process(&q).expect("commit again");
    for k in 0..3 {
        // SAFETY: as above.
        assert_eq!(unsafe { pack_leaf_d(k) }, 42);
    }
    assert_eq!(ENTRIES_D.load(SeqCst), 3);
    assert_eq!(i.counters(q.id).exits(), 3);
    i.revert_in_process(&q).expect("revert");
}
