//! Every call encoding executed for real, from near and from deliberately far code.

use agent::allocator::{Limits, NearAllocator, PAGE, REACH, USER_TOP};
use agent::emitter::{CallEncoding, Emitter, Policy};
use agent::jit::{place, Placed};
use iced_x86::code_asm::*;

const GIB: u64 = 1 << 30;

#[inline(never)]
extern "C" fn mix(a: u64, b: u64) -> u64 {
    a.wrapping_mul(3).wrapping_add(b)
}

fn addr_of_mix() -> u64 {
    mix as *const () as u64
}

type Mix = extern "C" fn(u64, u64) -> u64;

/// JIT `fn(a, b) { return target(a, b) + 1 }` with the given policy.
fn caller(
    alloc: &mut NearAllocator,
    near: &[u64],
    policy: Policy,
    target: u64,
) -> Placed<CallEncoding> {
    place(alloc, near, policy, |e| {
        // Keep rsp 16-byte aligned at the call: entry has rsp = 8 mod 16.
        e.asm(|a| a.sub(rsp, 8))?;
        let enc = e.call(target)?;
        e.asm(|a| {
            a.add(rsp, 8)?;
            a.add(rax, 1)?;
            a.ret()
        })?;
        Ok(enc)
    })
    .expect("jit")
}

fn run(p: &Placed<CallEncoding>) -> u64 {
    // SAFETY: the placed code is a complete SysV function of two u64 arguments.
    let f: Mix = unsafe { std::mem::transmute::<u64, Mix>(p.addr) };
    f(20, 2)
}

fn expected() -> u64 {
    mix(20, 2) + 1
}

/// An allocator that can only place code at least 5 GiB above `target` (more than 4 GiB
/// away, so neither rel32 nor any near placement is possible).
fn far_allocator(target: u64) -> NearAllocator {
    let min_addr = (target + 5 * GIB).next_multiple_of(PAGE);
    NearAllocator::with_limits(Limits {
        min_addr,
        max_addr: USER_TOP,
    })
    .unwrap()
}

#[test]
fn near_code_calls_with_rel32_and_every_forced_form() {
    let t = addr_of_mix();
    let mut alloc = NearAllocator::new().unwrap();
    let best = caller(&mut alloc, &[t], Policy::Best, t);
    assert_eq!(best.value, CallEncoding::Rel32);
    assert_eq!(best.counts.get(CallEncoding::Rel32), 1);
    assert_eq!(run(&best), expected());
    for enc in [CallEncoding::RipSlot, CallEncoding::Abs64] {
        let p = caller(&mut alloc, &[t], Policy::Force(enc), t);
        assert_eq!(p.value, enc);
        assert_eq!(run(&p), expected(), "{enc}");
    }
}

#[test]
fn far_code_gets_rip_slot_then_abs64() {
    let t = addr_of_mix();
    let mut alloc = far_allocator(t);
    let best = caller(&mut alloc, &[], Policy::Best, t);
    assert!(
        best.addr.abs_diff(t) > 4 * GIB,
        "{:#x} vs {t:#x}",
        best.addr
    );
    assert_eq!(best.value, CallEncoding::RipSlot);
    assert_eq!(run(&best), expected());
    assert!(matches!(
        place(&mut alloc, &[], Policy::Force(CallEncoding::Rel32), |e| Ok(
            e.call(t)?
        )),
        Err(agent::jit::JitError::Emit(_))
    ));
    let abs = caller(&mut alloc, &[], Policy::Force(CallEncoding::Abs64), t);
    assert_eq!(run(&abs), expected());
}

#[test]
fn targets_below_4_gib_get_abs32_from_far_code() {
    // A copy of `mix` placed below 4 GiB.
    let mut low = NearAllocator::with_limits(Limits {
        min_addr: Limits::current().min_addr,
        max_addr: 4 * GIB,
    })
    .unwrap();
    let copy = place(&mut low, &[], Policy::Best, |e| {
        Ok(e.asm(|a| {
            a.lea(rax, qword_ptr(rdi + rdi * 2))?;
            a.add(rax, rsi)?;
            a.ret()
        })?)
    })
    .unwrap();
    assert!(copy.addr + copy.len as u64 <= 4 * GIB);

    // From code more than 4 GiB away, with no literal pool: best is abs32.
    let mut far = far_allocator(copy.addr);
    let block = far.reserve(&[], 64).unwrap();
    let mut e = Emitter::new(block.addr);
    e.asm(|a| a.sub(rsp, 8)).unwrap();
    assert_eq!(e.call(copy.addr).unwrap(), CallEncoding::Abs32);
    e.asm(|a| {
        a.add(rsp, 8)?;
        a.add(rax, 1)?;
        a.ret()
    })
    .unwrap();
    let code = e.finish().unwrap();
    far.commit(block, &code);
    let p = Placed {
        addr: block.addr,
        len: code.len(),
        counts: Default::default(),
        value: CallEncoding::Abs32,
    };
    assert_eq!(run(&p), expected());

    // With the pool, forced abs32 still works and abs32 to a high target is refused.
    let forced = caller(&mut far, &[], Policy::Force(CallEncoding::Abs32), copy.addr);
    assert_eq!(run(&forced), expected());
    let high = addr_of_mix();
    if high > u32::MAX as u64 {
        assert!(
            place(&mut far, &[], Policy::Force(CallEncoding::Abs32), |e| Ok(
                e.call(high)?
            ))
            .is_err()
        );
    }
}

#[test]
fn jumps_reach_too() {
    // A tail-jumping thunk: jmp target with each encoding.
    let t = addr_of_mix();
    let mut near = NearAllocator::new().unwrap();
    let mut far = far_allocator(t);
    for enc in [
        CallEncoding::Rel32,
        CallEncoding::RipSlot,
        CallEncoding::Abs64,
    ] {
        let (alloc, near_t): (&mut NearAllocator, &[u64]) = if enc == CallEncoding::Rel32 {
            (&mut near, &[t])
        } else {
            (&mut far, &[])
        };
        let p = place(alloc, near_t, Policy::Force(enc), |e| Ok(e.jmp(t)?)).unwrap();
        // SAFETY: a thunk that tail-jumps to `mix`, so it is `mix`.
        let f: Mix = unsafe { std::mem::transmute::<u64, Mix>(p.addr) };
        assert_eq!(f(20, 2), mix(20, 2), "{enc}");
    }
}

#[test]
fn allocation_near_any_mapped_address_lands_in_range_or_says_why() {
    let maps = agent::maps::read_self().unwrap();
    let mut alloc = NearAllocator::new().unwrap();
    for m in &maps {
        if m.start >= USER_TOP {
            continue;
        }
        for target in [m.start, m.end - 1] {
            match alloc.reserve(&[target], 128) {
                Ok(b) => {
                    assert!(b.reaches(target), "{:#x} from {target:#x}", b.addr);
                    assert!(b.addr.abs_diff(target) <= REACH);
                    alloc.cancel(b);
                }
                Err(e) => panic!("near {target:#x} ({}): {e}", m.path),
            }
        }
    }
}

#[test]
fn no_mapping_is_ever_writable_and_executable() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string("/proc/self/maps").unwrap();
                for l in text.lines() {
                    let perms = l.split_whitespace().nth(1).unwrap_or("");
                    assert!(!perms.starts_with("rwx"), "rwx mapping seen: {l}");
                }
                reads += 1;
            }
            reads
        })
    };
    let t = addr_of_mix();
    let mut alloc = NearAllocator::new().unwrap();
    let mut far = far_allocator(t);
    for i in 0..2000 {
        let enc = CallEncoding::ALL[i % 4];
        let a = if enc == CallEncoding::Rel32 {
            &mut alloc
        } else {
            &mut far
        };
        let near: &[u64] = if enc == CallEncoding::Rel32 {
            &[t]
        } else {
            &[]
        };
        let target = if enc == CallEncoding::Abs32 {
            u32::MAX as u64
        } else {
            t
        };
        let p = caller(a, near, Policy::Force(enc), target);
        if enc != CallEncoding::Abs32 {
            assert_eq!(run(&p), expected());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads = watcher.join().expect("watcher saw an rwx mapping");
    assert!(reads > 0);
}
