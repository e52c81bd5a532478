//! The general entry path shared by handler-less exit probes (`agent::shared_general`):
//! each probe reaches the one stub and the stub finds that probe, and the probe's own
//! code is small. (Registers across the stub: `registers.rs`, whose fresh-thread case
//! takes it.)

use agent::interceptor::{Interceptor, ProbeRequest};
use std::arch::global_asm;

global_asm!(
    ".text",
    // a * 3 + 1 and a * 3 + 2, each 7 bytes before its ret.
    ".globl sg_leaf_a",
    "sg_leaf_a:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 1",
    "ret",
    ".globl sg_leaf_b",
    "sg_leaf_b:",
    "lea rax, [rdi+rdi*2]",
    "add rax, 2",
    "ret",
);

extern "C" {
    fn sg_leaf_a(a: u64) -> u64;
    fn sg_leaf_b(a: u64) -> u64;
}

#[test]
fn each_probe_reaches_the_shared_stub_as_itself() {
    let mut i = Interceptor::new(16).unwrap();
    let a = i
        .prepare(&ProbeRequest::entry(sg_leaf_a as *const () as u64, Some(8)).with_exit())
        .unwrap();
    let b = i
        .prepare(&ProbeRequest::entry(sg_leaf_b as *const () as u64, Some(8)).with_exit())
        .unwrap();
    // The general path (every register and vector register saved around the call, about
    // 600 bytes) is not in the probes' code any more: what is left is the inline fast
    // path of entries and returns.
    for p in [&a, &b] {
        assert!(
            p.code_len - p.relocated_len < 600,
            "{} bytes of trampoline code",
            p.code_len
        );
    }
    i.commit_in_process(&a).unwrap();
    i.commit_in_process(&b).unwrap();
    // A new thread has no shadow stack: its first hit takes the general path, through
    // the stub, for whichever probe it hits first.
    let t1 = std::thread::spawn(|| {
        // SAFETY: the leaves only compute.
        unsafe { (sg_leaf_b(5), sg_leaf_a(5)) }
    });
    let t2 = std::thread::spawn(|| {
        // SAFETY: as above.
        unsafe { (sg_leaf_a(7), sg_leaf_b(7)) }
    });
    assert_eq!(t1.join().unwrap(), (17, 16));
    assert_eq!(t2.join().unwrap(), (22, 23));
    for p in [&a, &b] {
        let c = i.counters(p.id);
        assert_eq!(
            (c.hits(), c.exits(), c.lost_exits()),
            (2, 2, 0),
            "probe {}",
            p.id
        );
    }
}
