//! Cost of finding one function of libc by name in a fresh mapping of the file, as a later
//! attach does (`-p libc:malloc`, then the entries-only check at its address): through
//! `.gnu.hash` (what happens for a `.dynsym`-only file) against reading the whole tables
//! (what a glob, `tracer list` or a file with `.symtab` needs), and the mapping alone.
//!
//! `cargo bench -p tracer --bench symbols`
//!
//! Each row is the median of the rounds, with min-max; each round parses a fresh mapping,
//! so page faults on the file's pages count, as in the tracer.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;
use tracer::symbols::{map_file, ElfSymbols, SymbolCache};

const ROUNDS: usize = 301;

/// Median, min and max in microseconds of `f` run once per round.
fn time(mut f: impl FnMut()) -> (f64, f64, f64) {
    let mut v: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let pm = SymbolCache::new()
        .process(std::process::id() as i32)
        .unwrap();
    let libc = pm
        .modules
        .iter()
        .find(|m| m.name.starts_with("libc.so"))
        .expect("libc mapped");
    let path = Path::new(&libc.path);
    let parsed = || ElfSymbols::parse_mapped(map_file(path).unwrap(), path).unwrap();
    let rows: [(&str, &dyn Fn()); 3] = [
        ("map and parse the headers only", &|| {
            black_box(parsed());
        }),
        (
            "malloc by name, then its address (.gnu.hash when dynsym-only)",
            &|| {
                let e = parsed();
                let f = e.functions_named("malloc").next().unwrap();
                black_box(e.function_containing(f.value));
            },
        ),
        ("whole tables read (functions())", &|| {
            black_box(parsed().functions().len());
        }),
    ];
    println!(
        "{} (.symtab: {}, .gnu_debugdata: {}), {ROUNDS} rounds, us:",
        libc.path, libc.elf.has_symtab, libc.elf.has_debugdata
    );
    for (name, f) in rows {
        let (m, lo, hi) = time(f);
        println!("  {name:64} {m:8.1} ({lo:.1}-{hi:.1})");
    }
}
