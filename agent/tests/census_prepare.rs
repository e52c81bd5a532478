//! Prepare (without committing) an entry probe on every exported function of the libc
//! mapped in this process: every site is either prepared (trampoline JITed, patch
//! computed) or refused with a reason. Any other error is a bug.

#[path = "../examples/libc_census.rs"]
#[allow(dead_code)]
mod census;

use agent::interceptor::{Interceptor, PrepareError, ProbeRequest};
use std::collections::BTreeMap;

#[test]
fn prepare_an_entry_probe_on_every_libc_function() {
    let funcs = census::libc_functions(true).unwrap().functions;
    assert!(funcs.len() > 1000, "only {} functions", funcs.len());
    let mut interceptor = Interceptor::new(funcs.len()).unwrap();
    let mut prepared = 0usize;
    let mut refused: BTreeMap<&'static str, (usize, Vec<String>)> = BTreeMap::new();
    let mut bugs = Vec::new();
    let mut ifuncs = 0;
    for (name, address, size) in &funcs {
        if size.is_none() {
            ifuncs += 1;
        }
        let req = ProbeRequest::entry(*address, *size);
        match interceptor.prepare(&req) {
            Ok(p) => {
                prepared += 1;
                // The patch is a jmp rel32 to the trampoline, and the site still holds
                // the original bytes: nothing was committed.
                assert_eq!(p.patch[0], 0xe9);
                let rel = i32::from_le_bytes(p.patch[1..].try_into().unwrap()) as i64;
                assert_eq!((p.site as i64 + 5 + rel) as u64, p.trampoline);
                // SAFETY: reading 5 bytes of mapped libc code.
                let now = unsafe { std::slice::from_raw_parts(p.site as *const u8, 5) };
                assert_eq!(now, &p.original[..]);
            }
            Err(PrepareError::Refused(r)) => {
                let e = refused.entry(census::reason(&r)).or_default();
                e.0 += 1;
                if e.1.len() < 3 {
                    e.1.push(format!("{name}: {r}"));
                }
            }
            Err(other) => bugs.push(format!("{name} at {address:#x}: {other}")),
        }
    }
    println!(
        "{} libc functions ({} IFUNCs resolved with dlsym): {} prepared ({:.1} %), {} refused",
        funcs.len(),
        ifuncs,
        prepared,
        100.0 * prepared as f64 / funcs.len() as f64,
        refused.values().map(|v| v.0).sum::<usize>()
    );
    for (reason, (n, examples)) in &refused {
        println!("  {reason:<24} {n:>5}");
        for e in examples {
            println!("      {e}");
        }
    }
    assert!(bugs.is_empty(), "errors other than refusals: {bugs:#?}");
    assert!(
        prepared * 100 >= funcs.len() * 90,
        "only {prepared} of {} prepared",
        funcs.len()
    );
}
