//! Preparing many probes in one batch, in process: where the agent's time and memory go
//! when the tracer asks for 10,000 probes at once.
//!
//! `cargo bench -p agent --bench prepare_scale [-- N]`
//!
//! Builds a shared library of N (default 10,000) small functions from C source, loads
//! it, and prepares a counting entry probe on every function the way
//! `api::tracer_agent_prepare` does (one neighbour scan for the batch, then each probe).
//! Prints the time of the scan and of the probes, microseconds per probe, the trampoline
//! code per probe (allocator bytes, with and without the relocated instructions) and the
//! agent's heap and mapping growth per probe. Then commits them all and calls every
//! function once: each count must be exactly 1.

#[path = "../examples/libc_census.rs"]
#[allow(dead_code)]
mod census;

use agent::interceptor::{Interceptor, ProbeRequest};
use agent::relocator::Function;
use object::{Object, ObjectSymbol};
use std::time::Instant;

const SOURCE_HEAD: &str = "#include <stdint.h>\n";

fn source(n: usize) -> String {
    let mut s = String::from(SOURCE_HEAD);
    for i in 0..n {
        s += &format!(
            "__attribute__((noinline)) int g{i:05}(int x) {{ return x * 3 + {i} + 1; }}\n"
        );
    }
    s
}

/// (name, address offset, size) of every `gNNNNN` in the library.
fn symbols(path: &std::path::Path) -> Vec<(String, u64, u64)> {
    let data = std::fs::read(path).expect("read the library");
    let file = object::File::parse(&*data).expect("parse the library");
    let mut v: Vec<_> = file
        .dynamic_symbols()
        .filter_map(|s| {
            let name = s.name().ok()?;
            (name.starts_with('g') && name.len() == 6 && s.size() > 0)
                .then(|| (name.to_string(), s.address(), s.size()))
        })
        .collect();
    v.sort();
    v
}

/// The parts of preparing on their own: analysing each site (reading, decoding, the
/// safety checks, with the batch's neighbour scan) and re-encoding its instructions.
fn phases(what: &str, functions: &[Function]) {
    use agent::relocator::{
        analyze_with, relocate, BatchMemory, NeighbourIndex, ProbeKind, SelfMemory,
    };
    let n = functions.len() as f64;
    let t = Instant::now();
    let index = NeighbourIndex::build(functions, &SelfMemory);
    let scan = t.elapsed();
    let mem = BatchMemory {
        index: &index,
        inner: &SelfMemory,
    };
    let t = Instant::now();
    let stolen: Vec<_> = functions
        .iter()
        .filter_map(|f| analyze_with(f, f.address, ProbeKind::Entry, &mem, Some(&index)).ok())
        .collect();
    let analyse = t.elapsed();
    let t = Instant::now();
    for s in &stolen {
        let _ = relocate(s, s.site + 0x1000_0000);
    }
    let reloc = t.elapsed();
    println!(
        "{what}, {n} functions, alone, us per probe: neighbour scan {:.2}, analyse {:.2}, \
         relocate {:.2}",
        scan.as_secs_f64() * 1e6 / n,
        analyse.as_secs_f64() * 1e6 / n,
        reloc.as_secs_f64() * 1e6 / n
    );
}

/// Bytes of the heap in use (glibc's `mallinfo2`).
fn heap() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.uordblks as u64
}

/// The mapped and heap bytes of this process (`VmRSS` of /proc/self/status, in bytes).
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tests::temp_dir("prepare-scale");
    let src = dir.path().join("gen.c");
    std::fs::write(&src, source(n)).unwrap();
    let lib = dir.path().join("libgen.so");
    let out = std::process::Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let syms = symbols(&lib);
    assert_eq!(syms.len(), n);
    let path = std::ffi::CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: dlopen of a library built above, whose functions only compute.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null(), "dlopen failed");
    let first = std::ffi::CString::new(syms[0].0.as_str()).unwrap();
    // SAFETY: a symbol of the library just loaded.
    let base = unsafe { libc::dlsym(handle, first.as_ptr()) } as u64 - syms[0].1;
    let functions: Vec<Function> = syms
        .iter()
        .map(|&(_, a, s)| Function {
            address: base + a,
            size: Some(s),
        })
        .collect();

    phases("generated", &functions);
    let libc: Vec<Function> = census::libc_functions(false)
        .expect("libc functions")
        .functions
        .iter()
        .map(|&(_, address, size)| Function { address, size })
        .collect();
    phases("libc", &libc);
    let mut i = Interceptor::new(n + 16).unwrap();
    // The first probe pays one-time costs (iced's tables, the TSC calibration, the
    // first chunk): prepare one probe elsewhere first, as a warmed-up agent would.
    let warm = ProbeRequest::entry(rss as *const () as u64, None);
    let _ = i.prepare(&warm);
    let rss0 = rss();
    let heap0 = heap();
    let code0 = i.allocator().stats().code_bytes;
    let t0 = Instant::now();
    i.plan_batch(&functions);
    let scan = t0.elapsed();
    let mut ids = Vec::with_capacity(n);
    let mut relocated = 0u64;
    for f in &functions {
        let p = i
            .prepare(&ProbeRequest::entry(f.address, f.size))
            .expect("prepare");
        relocated += p.stolen_len as u64;
        ids.push(p);
    }
    i.end_batch();
    let total = t0.elapsed();
    let code = i.allocator().stats().code_bytes - code0;
    let grown = rss().saturating_sub(rss0);
    let heap_grown = heap().saturating_sub(heap0);
    println!("probes: {n}");
    println!(
        "neighbour scan: {:.1} ms; prepare total: {:.1} ms, {:.2} us per probe",
        scan.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "trampoline code per probe: {:.1} bytes ({:.1} with the relocated instructions, \
         which are about their original length)",
        (code - relocated) as f64 / n as f64,
        code as f64 / n as f64
    );
    println!(
        "agent memory per probe: heap in use {} bytes (the probe, its records, its reuse \
         key); RSS growth {} bytes (trampolines, counter lines, heap pages not reused)",
        heap_grown / n as u64,
        grown / n as u64
    );

    for p in &ids {
        i.commit_in_process(p).expect("commit");
    }
    for (k, (name, _, _)) in syms.iter().enumerate() {
        let c = std::ffi::CString::new(name.as_str()).unwrap();
        // SAFETY: a function of the library, `int f(int)`.
        let f: extern "C" fn(i32) -> i32 =
            unsafe { std::mem::transmute(libc::dlsym(handle, c.as_ptr())) };
        assert_eq!(
            f(k as i32),
            k as i32 * 3 + k as i32 + 1,
            "{name} computes the same"
        );
    }
    let wrong = ids.iter().filter(|p| i.counters(p.id).hits() != 1).count();
    assert_eq!(wrong, 0, "probes whose count is not exactly 1");
    println!("every probe counted its one call exactly");
}
