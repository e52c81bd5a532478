//! Counter slots and trampolines across sessions, in process: the shared region grows
//! without moving counters, a repeated request gets its probe back with zeroed counters,
//! and patches written from outside (as the tracer does) are found and read through.

use agent::interceptor::{write_self_code, Interceptor, ProbeRequest};
use agent::shared::{SharedRegion, MAX_CAPACITY};
use probes::abi::shared::SharedHeader;
use std::arch::global_asm;
use std::sync::atomic::Ordering::SeqCst;

global_asm!(
    ".text",
    // a * 3 + 1, one copy per use so probes do not collide.
    ".globl slot_leaf_a",
    "slot_leaf_a:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
    ".globl slot_leaf_b",
    "slot_leaf_b:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
    ".globl slot_leaf_c",
    "slot_leaf_c:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
);

extern "C" {
    fn slot_leaf_a(a: u64) -> u64;
    fn slot_leaf_b(a: u64) -> u64;
    fn slot_leaf_c(a: u64) -> u64;
}

fn memfd_len(r: &SharedRegion) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", r.fd()))
        .expect("stat the memfd")
        .len()
}

#[test]
fn the_region_grows_and_counters_stay_put() {
    let mut r = SharedRegion::create(2).expect("create");
    assert_eq!(
        memfd_len(&r),
        SharedHeader::region_size(2, r.shards()) as u64
    );
    let first = r.counters(0).line as *const _ as usize;
    let ids: Vec<usize> = (0..5).map(|_| r.claim().expect("claim")).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    assert!(r.capacity() >= 5);
    assert_eq!(r.header().capacity as usize, r.capacity());
    assert_eq!(
        memfd_len(&r),
        SharedHeader::region_size(r.capacity(), r.shards()) as u64
    );
    assert_eq!(
        r.counters(0).line as *const _ as usize,
        first,
        "slot 0 moved"
    );
    // The grown part is backed: writing there does not fault, and reads back.
    // Every shard of the slot too; a reset zeroes them all.
    let c = r.counters(4);
    c.line.hits.store(40, SeqCst);
    for s in c.shards {
        s.hits.store(1, SeqCst);
        s.exits.store(1, SeqCst);
    }
    let shards = r.shards() as u64;
    assert_eq!((c.hits(), c.exits()), (40 + shards, shards));
    r.reset(4);
    assert_eq!((c.hits(), c.exits()), (0, 0));
}

#[test]
fn the_region_stops_at_its_maximum() {
    let mut r = SharedRegion::create(MAX_CAPACITY / 2).expect("create");
    for k in 0..MAX_CAPACITY {
        assert_eq!(r.claim().expect("claim"), k);
    }
    assert!(r.claim().is_err(), "claimed more than MAX_CAPACITY slots");
    assert_eq!(r.capacity(), MAX_CAPACITY);
    assert_eq!(
        memfd_len(&r),
        SharedHeader::region_size(MAX_CAPACITY, r.shards()) as u64
    );
}

fn req(f: unsafe extern "C" fn(u64) -> u64) -> ProbeRequest {
    ProbeRequest::entry(f as usize as u64, Some(8))
}

/// Two sessions of the same three probes on an interceptor made for one: the second gets
/// the same slots and trampolines, counts only its own calls, and nothing grows.
#[test]
fn a_repeated_request_reuses_its_probe_with_zeroed_counters() {
    let mut i = Interceptor::new(1).expect("interceptor");
    let fns = [slot_leaf_a, slot_leaf_b];
    let mut first = Vec::new();
    for f in fns {
        let (p, reused) = i.prepare_reusing(&req(f)).expect("prepare");
        assert!(!reused);
        i.commit_in_process(&p).expect("commit");
        first.push(p);
    }
    for k in 0..3 {
        // SAFETY: probed leaf functions keep their contract.
        assert_eq!(unsafe { slot_leaf_a(k) }, k * 3 + 1);
    }
    assert_eq!(i.counters(first[0].id).hits(), 3);
    for p in &first {
        i.revert_in_process(p).expect("revert");
    }
    let prepared = i.prepared().len();
    let capacity = i.shared().capacity();
    for (f, old) in fns.into_iter().zip(&first) {
        let (p, reused) = i.prepare_reusing(&req(f)).expect("prepare again");
        assert!(reused);
        assert_eq!(
            (p.id, p.trampoline, p.patch),
            (old.id, old.trampoline, old.patch)
        );
        assert_eq!(i.counters(p.id).hits(), 0, "counters not zeroed");
        i.commit_in_process(&p).expect("commit again");
    }
    assert_eq!(
        i.prepared().len(),
        prepared,
        "a repeated request made a new probe"
    );
    assert_eq!(i.shared().capacity(), capacity);
    // SAFETY: as above.
    assert_eq!(unsafe { slot_leaf_b(5) }, 16);
    assert_eq!(i.counters(first[0].id).hits(), 0);
    assert_eq!(i.counters(first[1].id).hits(), 1);
    for p in &first {
        i.revert_in_process(p).expect("revert");
    }
}

/// A patch written from outside the interceptor (the tracer's way, and what a killed
/// tracer leaves) is found by `refresh_live`, and preparing another kind of probe at that
/// site sees the function's real bytes, not the jump.
#[test]
fn patches_written_from_outside_are_found_and_read_through() {
    let mut i = Interceptor::new(4).expect("interceptor");
    let (entry, _) = i.prepare_reusing(&req(slot_leaf_c)).expect("prepare");
    i.refresh_live();
    assert!(i.live().is_empty());
    write_self_code(entry.site, &entry.patch).expect("patch");
    i.refresh_live();
    let live = i.live();
    assert_eq!(live.len(), 1);
    assert_eq!((live[0].site, live[0].id), (entry.site, entry.id));
    let (exit, reused) = i
        .prepare_reusing(&req(slot_leaf_c).with_exit())
        .expect("prepare an exit probe at a patched site");
    assert!(!reused, "another kind is another probe");
    assert_eq!(
        exit.original, entry.original,
        "analysed the jump, not the code"
    );
    assert_ne!(exit.trampoline, entry.trampoline);
    // The exit probe takes the site over, then the code is restored.
    write_self_code(exit.site, &exit.patch).expect("take over");
    i.enable(exit.id);
    // SAFETY: probed leaf function keeps its contract.
    assert_eq!(unsafe { slot_leaf_c(2) }, 7);
    assert_eq!(i.counters(exit.id).hits(), 1);
    assert_eq!(i.counters(exit.id).exits(), 1);
    i.refresh_live();
    assert_eq!(i.live()[0].id, exit.id);
    write_self_code(exit.site, &exit.original).expect("restore");
    i.refresh_live();
    assert!(i.live().is_empty());
}

/// Code replaced at the same address (a library unloaded and another loaded there) is
/// prepared anew, never run through the trampoline made for the old code.
#[test]
fn new_code_at_a_known_address_is_not_reused() {
    // lea rax, [rdi+rdi*2]; add rax, 1; ret  then  lea rax, [rdi+rdi*4]; add rax, 2; ret
    const OLD: [u8; 9] = [0x48, 0x8d, 0x04, 0x7f, 0x48, 0x83, 0xc0, 0x01, 0xc3];
    const NEW: [u8; 9] = [0x48, 0x8d, 0x04, 0xbf, 0x48, 0x83, 0xc0, 0x02, 0xc3];
    // SAFETY: a fresh private anonymous mapping, ours alone.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    let addr = page as u64;
    write_self_code(addr, &OLD).expect("write code");
    // SAFETY: `addr` holds a complete leaf function of this signature.
    let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(page) };
    let mut i = Interceptor::new(4).expect("interceptor");
    let r = ProbeRequest::entry(addr, Some(OLD.len() as u64));
    let (old, _) = i.prepare_reusing(&r).expect("prepare");
    i.commit_in_process(&old).expect("commit");
    assert_eq!(f(2), 7);
    i.revert_in_process(&old).expect("revert");

    write_self_code(addr, &NEW).expect("replace code");
    let (new, reused) = i.prepare_reusing(&r).expect("prepare again");
    assert!(!reused, "the probe of the old code was reused");
    assert_ne!(new.trampoline, old.trampoline);
    i.commit_in_process(&new).expect("commit");
    assert_eq!(f(2), 12, "ran the old code");
    assert_eq!(i.counters(new.id).hits(), 1);
    i.revert_in_process(&new).expect("revert");
    // Same code again: reused.
    let (again, reused) = i.prepare_reusing(&r).expect("prepare a third time");
    assert!(reused);
    assert_eq!(again.trampoline, new.trampoline);
}
