//! Prepare (without committing) an entry probe on every exported function of the libc
//! mapped in this process: every site is either prepared (trampoline JITed, patch
//! computed) or refused with a reason. Any other error is a bug.

#[path = "../examples/libc_census.rs"]
#[allow(dead_code)]
mod census;

use agent::interceptor::{Interceptor, PrepareError, ProbeRequest};
use object::read::elf::{ElfFile64, ProgramHeader, Sym};
use object::{elf, Endianness, Object, ObjectSymbol};
use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};

/// The libc.so.6 of this process: path and the address its lowest PT_LOAD is mapped at.
fn mapped_libc() -> (String, u64) {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: a code address in libc and a valid out-parameter.
    let ok = unsafe { libc::dladdr(libc::getpid as *const libc::c_void, &mut info) };
    assert!(ok != 0 && !info.dli_fname.is_null(), "dladdr failed");
    // SAFETY: dladdr returned a NUL-terminated name that lives as long as the mapping.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    (path, info.dli_fbase as u64)
}

/// Every exported function: (name, address, size). IFUNC symbols are resolved with
/// `dlsym`, which returns the implementation selected for this CPU, whose size is unknown.
fn libc_functions() -> Vec<(String, u64, Option<u64>)> {
    let (path, fbase) = mapped_libc();
    let data = std::fs::read(&path).unwrap();
    let file = ElfFile64::<Endianness>::parse(&*data).unwrap();
    let endian = file.endian();
    let first_vaddr = file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| p.p_vaddr(endian) & !0xfff)
        .min()
        .unwrap();
    let bias = fbase.wrapping_sub(first_vaddr);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for sym in file.dynamic_symbols() {
        let raw = sym.elf_symbol();
        if sym.is_undefined() || raw.st_size(endian) == 0 {
            continue;
        }
        let name = sym.name().unwrap_or("?").to_string();
        let (addr, size) = match raw.st_type() {
            elf::STT_FUNC => (
                bias.wrapping_add(raw.st_value(endian)),
                Some(raw.st_size(endian)),
            ),
            elf::STT_GNU_IFUNC => {
                let c = CString::new(name.as_str()).unwrap();
                // SAFETY: dlsym with a NUL-terminated name.
                let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
                if p.is_null() {
                    continue;
                }
                (p as u64, None)
            }
            _ => continue,
        };
        if seen.insert(addr) {
            out.push((name, addr, size));
        }
    }
    out.sort_by_key(|f| f.1);
    out
}

#[test]
fn prepare_an_entry_probe_on_every_libc_function() {
    let funcs = libc_functions();
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
