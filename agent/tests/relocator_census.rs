//! The libc census as a test, plus real execution of relocated libc prologues.

#[path = "../examples/libc_census.rs"]
#[allow(dead_code)]
mod census;

use agent::relocator::{analyze, relocate, Function, ProbeKind, SelfMemory};
use std::ffi::CString;

#[test]
fn libc_census_has_no_unexpected_refusal() {
    let c = census::run().expect("census");
    c.print();
    assert!(
        c.functions > 1000,
        "too few functions found: {}",
        c.functions
    );
    assert_eq!(c.relocated + c.refused_total(), c.functions);
    assert!(
        c.unexpected().is_empty(),
        "refusals that indicate a bug: {:?}",
        c.unexpected()
    );
    // A prologue relocator that refuses much of libc is not doing its job.
    assert!(
        c.relocated * 100 >= c.functions * 90,
        "only {} of {} relocated",
        c.relocated,
        c.functions
    );
}

const PAGE: usize = 4096;

/// An RW-then-RX anonymous page at a free address near `hint`.
struct Page(u64);

impl Page {
    fn near(hint: u64) -> Page {
        for i in 0..256u64 {
            let want = (hint & !0xfff) + i * 0x10_0000;
            // SAFETY: anonymous mapping; MAP_FIXED_NOREPLACE never replaces memory in use.
            let p = unsafe {
                libc::mmap(
                    want as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                if p as u64 == want {
                    return Page(want);
                }
                // SAFETY: the mapping we just made, at the wrong place (old kernel).
                unsafe { libc::munmap(p, PAGE) };
            }
        }
        panic!("no free page near {hint:#x}");
    }

    fn fill_and_seal(&self, bytes: &[u8]) {
        assert!(bytes.len() <= PAGE);
        // SAFETY: our own page, still RW, nothing runs from it yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0 as *mut u8, bytes.len()) };
        // SAFETY: our own page.
        let r = unsafe {
            libc::mprotect(
                self.0 as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        assert_eq!(r, 0);
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our own page, no code runs from it any more.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, PAGE) };
    }
}

type Fn3 = extern "C" fn(u64, u64, u64) -> u64;

fn lookup(name: &str) -> u64 {
    let c = CString::new(name).unwrap();
    // SAFETY: dlsym with a valid NUL-terminated name; for an IFUNC it returns the
    // implementation selected for this CPU.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
    assert!(!p.is_null(), "{name} not found");
    p as u64
}

/// Relocates the entry of the libc function `name` to a trampoline (its relocated
/// prologue + a jump back into libc) and returns the trampoline, or None if refused.
fn trampoline(name: &str) -> Option<(u64, Page)> {
    let addr = lookup(name);
    // dlsym gives no size: this exercises the bounded-window analysis.
    let f = Function {
        address: addr,
        size: None,
    };
    let stolen = match analyze(&f, addr, ProbeKind::Entry, &SelfMemory) {
        Ok(s) => s,
        Err(e) => {
            println!("{name}: refused: {e}");
            return None;
        }
    };
    let page = Page::near(addr.saturating_sub(0x1000_0000));
    let r = relocate(&stolen, page.0).unwrap();
    let mut bytes = r.bytes.clone();
    let from = page.0 + bytes.len() as u64 + 5;
    let rel = i32::try_from(r.resume.wrapping_sub(from) as i64).unwrap();
    bytes.push(0xe9);
    bytes.extend_from_slice(&rel.to_le_bytes());
    page.fill_and_seal(&bytes);
    println!(
        "{name}: stole {} bytes, trampoline {:#x}",
        stolen.len, page.0
    );
    Some((page.0, page))
}

fn call(addr: u64, a: u64, b: u64, c: u64) -> u64 {
    // SAFETY: `addr` is a trampoline running a libc function's relocated prologue and
    // then the rest of it; the callers pass arguments of that function's C signature.
    let f: Fn3 = unsafe { std::mem::transmute::<usize, Fn3>(addr as usize) };
    f(a, b, c)
}

#[test]
fn relocated_libc_prologues_run() {
    let s = CString::new("relocated prologues, for real").unwrap();
    let sp = s.as_ptr() as u64;
    let mut ran = 0;
    if let Some((t, _page)) = trampoline("strlen") {
        assert_eq!(call(t, sp, 0, 0), 29);
        ran += 1;
    }
    if let Some((t, _page)) = trampoline("strchr") {
        assert_eq!(call(t, sp, b'p' as u64, 0), sp + 10);
        assert_eq!(call(t, sp, b'Z' as u64, 0), 0);
        ran += 1;
    }
    if let Some((t, _page)) = trampoline("memchr") {
        assert_eq!(call(t, sp, b',' as u64, 29), sp + 19);
        ran += 1;
    }
    if let Some((t, _page)) = trampoline("toupper") {
        assert_eq!(call(t, b'q' as u64, 0, 0), b'Q' as u64);
        assert_eq!(call(t, b'7' as u64, 0, 0), b'7' as u64);
        ran += 1;
    }
    if let Some((t, _page)) = trampoline("labs") {
        assert_eq!(call(t, (-42i64) as u64, 0, 0), 42);
        ran += 1;
    }
    if let Some((t, _page)) = trampoline("strtol") {
        let n = CString::new("  -12345xyz").unwrap();
        assert_eq!(call(t, n.as_ptr() as u64, 0, 10) as i64, -12345);
        ran += 1;
    }
    assert!(
        ran >= 4,
        "only {ran} of the chosen libc functions could be relocated"
    );
}

/// Preparing many probes in one batch scans their neighbourhoods once
/// (`NeighbourIndex`) and reads their code from that scan (`BatchMemory`): every libc
/// function, with and without a known size, gets the same verdict (the same stolen
/// bytes, or the same refusal) as when analysed alone.
#[test]
fn batch_analysis_of_libc_matches_analysis_one_by_one() {
    use agent::relocator::{analyze_with, BatchMemory, NeighbourIndex};
    let libc = census::libc_functions(true).expect("libc functions");
    let functions: Vec<Function> = libc
        .functions
        .iter()
        .map(|&(_, address, size)| Function { address, size })
        .collect();
    let index = NeighbourIndex::build(&functions, &SelfMemory);
    let batch = BatchMemory {
        index: &index,
        inner: &SelfMemory,
    };
    let mut differ = Vec::new();
    for (f, (name, _, _)) in functions.iter().zip(&libc.functions) {
        let verdict = |r: Result<agent::relocator::Stolen, agent::relocator::Refusal>| {
            r.map(|s| (s.site, s.original))
        };
        let alone = verdict(analyze(f, f.address, ProbeKind::Entry, &SelfMemory));
        let batched = verdict(analyze_with(
            f,
            f.address,
            ProbeKind::Entry,
            &batch,
            Some(&index),
        ));
        if alone != batched {
            differ.push(format!("{name}: alone {alone:?}, batched {batched:?}"));
        }
    }
    assert!(functions.len() > 1000, "{} functions", functions.len());
    assert!(
        differ.is_empty(),
        "{} differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}
