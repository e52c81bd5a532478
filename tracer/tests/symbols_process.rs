//! Symbols and spec resolution against real running processes: a PIE program linked to
//! a shared library, and a non-PIE program. The programs print the runtime addresses of
//! their functions; the resolved addresses must equal them, and sizes must equal what
//! `nm -S` reads from the files.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tracer::spec::{list, resolve, ProbeSpec, ResolveError};
use tracer::symbols::{ElfSymbols, SymbolCache, SymbolSource};

const LIB_C: &str = r#"
#include <stddef.h>
#include <string.h>
__attribute__((noinline)) int fn2(int x) { return x * 3 + 1; }
int fn2_alias(int x) __attribute__((alias("fn2")));
__attribute__((noinline)) int work_alpha(int x) { return x + 11; }
__attribute__((noinline)) int work_beta(int x) { return x * x + 2; }
__attribute__((noinline)) int work_gamma(int x) { return x - 5 + work_alpha(x); }

/* A GNU IFUNC with two static implementations, like glibc's string functions. */
static __attribute__((noinline)) size_t impl_fast(const char *s) { return strlen(s) + 0; }
static __attribute__((noinline)) size_t impl_slow(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static void *pick_impl(void) { return getenv_dummy() ? (void *)impl_slow : (void *)impl_fast; }
size_t my_len(const char *s) __attribute__((ifunc("pick_impl")));
"#;

const PROG_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
extern int fn2(int), work_alpha(int), work_beta(int), work_gamma(int);
__attribute__((noinline)) int fn(int x) { return fn2(x) + work_beta(x); }
static __attribute__((noinline)) int local_helper(int x) { return x ^ 0x55; }
int main(void) {
    printf("fn %p\n", (void *)&fn);
    printf("local_helper %p\n", (void *)&local_helper);
    printf("fn2 %p\n", (void *)&fn2);
    printf("work_alpha %p\n", (void *)&work_alpha);
    printf("work_beta %p\n", (void *)&work_beta);
    printf("work_gamma %p\n", (void *)&work_gamma);
    printf("malloc %p\n", dlsym(RTLD_DEFAULT, "malloc"));
    printf("my_len_impl %p\n", dlsym(RTLD_DEFAULT, "my_len"));
    printf("strlen_impl %p\n", dlsym(RTLD_DEFAULT, "strlen"));
    printf("done %d\n", fn(1) + local_helper(2) + work_gamma(3));
    fflush(stdout);
    sleep(1000);
    return 0;
}
"#;

const NOPIE_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) int np_one(int x) { return x * 7; }
static __attribute__((noinline)) int np_local(int x) { return x + 9; }
int main(void) {
    printf("np_one %p\n", (void *)&np_one);
    printf("np_local %p\n", (void *)&np_local);
    printf("done %d\n", np_one(1) + np_local(2));
    fflush(stdout);
    sleep(1000);
    return 0;
}
"#;

/// A child killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cc(args: &[&str]) {
    let out = Command::new("cc").args(args).output().expect("run cc");
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Start a program and read its `name 0xADDR` lines until `done`.
fn run(path: &Path) -> (Running, HashMap<String, u64>) {
    let mut child = Command::new(path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start test program");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut addrs = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let (name, value) = line.split_once(' ').unwrap();
        if name == "done" {
            return (running, addrs);
        }
        let hex = value.trim_start_matches("0x");
        addrs.insert(name.to_string(), u64::from_str_radix(hex, 16).unwrap());
    }
    panic!("test program exited before printing its addresses");
}

/// `nm -S` sizes of the defined functions of a file.
fn nm_sizes(path: &Path) -> HashMap<String, u64> {
    let out = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(path)
        .output()
        .expect("run nm");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && "TtWwi".contains(f[2]))
                .then(|| (f[3].to_string(), u64::from_str_radix(f[1], 16).unwrap()))
        })
        .collect()
}

fn build_pie(dir: &Path) -> PathBuf {
    let d = dir.display();
    // getenv_dummy stands for whatever a resolver inspects; it keeps both
    // implementations alive.
    let lib_src = format!(
        "#include <stdlib.h>\nstatic int getenv_dummy(void) {{ return getenv(\"TRACER_SLOW\") != 0; }}\n{LIB_C}"
    );
    std::fs::write(dir.join("libtarget.c"), lib_src).unwrap();
    std::fs::write(dir.join("prog.c"), PROG_C).unwrap();
    cc(&[
        "-O1",
        "-shared",
        "-fPIC",
        "-o",
        &format!("{d}/libtarget.so"),
        &format!("{d}/libtarget.c"),
    ]);
    cc(&[
        "-O1",
        "-fPIE",
        "-pie",
        "-o",
        &format!("{d}/prog"),
        &format!("{d}/prog.c"),
        &format!("-L{d}"),
        "-ltarget",
        &format!("-Wl,-rpath,{d}"),
        "-ldl",
    ]);
    dir.join("prog")
}

fn addrs_of(probes: &[tracer::spec::ResolvedProbe]) -> Vec<u64> {
    probes.iter().map(|p| p.address).collect()
}

#[test]
fn pie_program_and_shared_library() {
    let dir = tests::temp_dir("pie");
    let prog = build_pie(dir.path());
    let (child, printed) = run(&prog);
    let pid = child.0.id() as i32;

    let cache = SymbolCache::new();
    let pm = cache.process(pid).unwrap();
    assert!(pm.skipped.is_empty(), "{:?}", pm.skipped);
    assert_eq!(pm.main_name(), Some("prog"));
    let main = pm.main().unwrap();
    assert_ne!(main.bias, 0, "a PIE is loaded at a non-zero bias");

    let r = |s: &str| resolve(&ProbeSpec::parse(s).unwrap(), &pm);
    let one = |s: &str| {
        let v = r(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(v.len(), 1, "{s}: {v:?}");
        v.into_iter().next().unwrap()
    };

    let prog_sizes = nm_sizes(&prog);
    let lib_sizes = nm_sizes(&dir.path().join("libtarget.so"));

    let p = one("main:fn");
    assert_eq!(p.address, printed["fn"]);
    assert_eq!(p.size, prog_sizes["fn"]);
    assert!(p.module_path.ends_with("/prog"));
    assert_eq!(one("prog:fn").address, printed["fn"]);
    let p = one("main:local_helper");
    assert_eq!(p.address, printed["local_helper"]);
    assert_eq!(p.size, prog_sizes["local_helper"]);

    let p = one("libtarget:fn2");
    assert_eq!(p.address, printed["fn2"]);
    assert_eq!(p.size, lib_sizes["fn2"]);
    assert!(p.module_path.ends_with("/libtarget.so"));
    assert!(!p.is_ifunc);
    // The alias resolves to the same single address, under the name typed.
    let a = one("libtarget:fn2_alias");
    assert_eq!((a.address, a.symbol.as_str()), (p.address, "fn2_alias"));
    assert_eq!(addrs_of(&r("libtarget:fn2*").unwrap()), vec![p.address]);
    // No module part: searches everything.
    assert_eq!(one("fn2").address, printed["fn2"]);

    let globbed = r("libtarget:work_*").unwrap();
    let mut expect = vec![
        printed["work_alpha"],
        printed["work_beta"],
        printed["work_gamma"],
    ];
    expect.sort();
    assert_eq!(addrs_of(&globbed), expect);
    for g in &globbed {
        assert_eq!(g.size, lib_sizes[&g.symbol], "{}", g.symbol);
        assert_eq!(g.spec_text, "libtarget:work_*");
    }
    assert_eq!(
        addrs_of(&r("libtarget:work_?eta").unwrap()),
        vec![printed["work_beta"]]
    );

    let m = one("libc:malloc");
    assert_eq!(m.address, printed["malloc"]);
    assert!(m.size > 0);
    assert!(m.module_path.contains("libc"));

    // Offsets: inside is fine, at or past the end is an error naming the size.
    let size = lib_sizes["work_beta"];
    assert_eq!(
        one("libtarget:work_beta+1").address,
        printed["work_beta"] + 1
    );
    assert_eq!(
        one(&format!("libtarget:work_beta+{:#x}", size - 1)).offset,
        size - 1
    );
    match r(&format!("libtarget:work_beta+{size}")) {
        Err(e @ ResolveError::OffsetBeyondSize { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("{size} (")), "{msg}");
        }
        other => panic!("expected OffsetBeyondSize, got {other:?}"),
    }

    // IFUNCs: glibc's strlen and our own my_len are resolvers.
    let s = one("libc:strlen");
    assert!(s.is_ifunc);
    let my = one("libtarget:my_len");
    assert!(my.is_ifunc);
    // The implementation dlsym returned is a local function of the library.
    let (module, f) = pm.symbol_containing(printed["my_len_impl"]).unwrap();
    assert!(module.path.ends_with("/libtarget.so"));
    assert_eq!(f.address, printed["my_len_impl"]);
    assert_eq!(f.name(), "impl_fast");
    assert_eq!(f.size, lib_sizes["impl_fast"]);
    assert_eq!(f.source, SymbolSource::Symtab);
    // And an address inside a function finds that function.
    let (_, f) = pm.symbol_containing(printed["fn2"] + 1).unwrap();
    assert_eq!(f.address, printed["fn2"]);
    // glibc's strlen implementation is in libc's text, whatever its symbols say.
    let libc_mod = pm.module_containing(printed["strlen_impl"]).unwrap();
    assert!(libc_mod.name.starts_with("libc"));

    // Typos get suggestions.
    match r("libc:mallocc") {
        Err(e @ ResolveError::NoFunction { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("did you mean libc:malloc"), "{msg}");
        }
        other => panic!("expected NoFunction, got {other:?}"),
    }
    match r("libtarget:WORK_BETA") {
        Err(ResolveError::NoFunction { suggestions, .. }) => {
            assert_eq!(
                suggestions.first().map(String::as_str),
                Some("libtarget:work_beta")
            );
        }
        other => panic!("expected NoFunction, got {other:?}"),
    }
    match r("main:fnn") {
        Err(ResolveError::NoFunction { suggestions, .. }) => {
            assert!(
                suggestions.iter().any(|s| s == "main:fn"),
                "{suggestions:?}"
            );
        }
        other => panic!("expected NoFunction, got {other:?}"),
    }
    // An unknown module lists what is loaded.
    match r("libnothere:malloc") {
        Err(e @ ResolveError::NoModule { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("libtarget.so") && msg.contains("libc.so"),
                "{msg}"
            );
        }
        other => panic!("expected NoModule, got {other:?}"),
    }
    // The right name in the wrong module: say which module has it.
    match r("libc:fn2") {
        Err(ResolveError::NoFunction { suggestions, .. }) => {
            assert_eq!(
                suggestions.first().map(String::as_str),
                Some("libtarget.so:fn2")
            );
        }
        other => panic!("expected NoFunction, got {other:?}"),
    }

    // `tracer list` with a pattern.
    let listed = list(&pm, Some(&ProbeSpec::parse("libtarget:work_*").unwrap()));
    let mut listed: Vec<u64> = listed.iter().map(|(_, f, _)| f.address).collect();
    listed.sort();
    assert_eq!(listed, expect);
    assert!(list(&pm, None).len() > 1000);

    // The cache: a second attach re-uses every parsed file.
    let files = cache.len();
    let again = cache.process(pid).unwrap();
    assert_eq!(cache.len(), files);
    for (a, b) in pm.modules.iter().zip(&again.modules) {
        assert!(
            std::sync::Arc::ptr_eq(&a.elf, &b.elf),
            "{} re-parsed",
            a.path
        );
    }
    drop(child);
}

#[test]
fn non_pie_program() {
    let dir = tests::temp_dir("nopie");
    let d = dir.path().display();
    std::fs::write(dir.path().join("np.c"), NOPIE_C).unwrap();
    cc(&[
        "-O1",
        "-fno-pie",
        "-no-pie",
        "-o",
        &format!("{d}/np"),
        &format!("{d}/np.c"),
    ]);
    let prog = dir.path().join("np");
    let (child, printed) = run(&prog);
    let pm = SymbolCache::new().process(child.0.id() as i32).unwrap();
    let main = pm.main().unwrap();
    assert_eq!(main.bias, 0);
    assert!(!main.elf.is_dyn);
    let sizes = nm_sizes(&prog);
    for name in ["np_one", "np_local"] {
        let v = resolve(&ProbeSpec::parse(&format!("main:{name}")).unwrap(), &pm).unwrap();
        assert_eq!(addrs_of(&v), vec![printed[name]], "{name}");
        assert_eq!(v[0].size, sizes[name], "{name}");
    }
    // The same names through the file on disk, for `tracer list PATH`.
    let file = SymbolCache::new().file(&prog).unwrap();
    let v = resolve(&ProbeSpec::parse("main:np_one").unwrap(), &file).unwrap();
    assert_eq!(addrs_of(&v), vec![printed["np_one"]]);
    drop(child);
}

#[test]
fn file_on_disk_uses_link_time_addresses() {
    let dir = tests::temp_dir("file");
    let prog = build_pie(dir.path());
    let lib = dir.path().join("libtarget.so");
    let pm = SymbolCache::new().file(&lib).unwrap();
    assert_eq!(pm.modules[0].name, "libtarget.so");
    let v = resolve(&ProbeSpec::parse("libtarget:work_*").unwrap(), &pm).unwrap();
    assert_eq!(v.len(), 3);
    let elf = ElfSymbols::read(&lib).unwrap();
    let nm = Command::new("nm").arg(&lib).output().unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    for p in &v {
        let line = nm
            .lines()
            .find(|l| l.ends_with(&format!(" {}", p.symbol)))
            .unwrap();
        let value = u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap();
        assert_eq!(p.address, value, "{}", p.symbol);
        assert!(elf.functions_named(&p.symbol).any(|f| f.value == value));
    }
    // A non-ELF file is refused with a clear error.
    let err = SymbolCache::new()
        .file(&dir.path().join("prog.c"))
        .unwrap_err();
    assert!(err.to_string().contains("not a 64-bit ELF"), "{err}");
    let _ = prog;
}

#[test]
fn deleted_and_replaced_library_still_resolves() {
    let dir = tests::temp_dir("deleted");
    let prog = build_pie(dir.path());
    let (child, printed) = run(&prog);
    let lib = dir.path().join("libtarget.so");
    // Replace the library by something else at the same path: the mapped inode, not
    // the path, must be read.
    std::fs::remove_file(&lib).unwrap();
    std::fs::write(&lib, b"not the library").unwrap();
    let pm = SymbolCache::new().process(child.0.id() as i32).unwrap();
    assert!(pm.skipped.is_empty(), "{:?}", pm.skipped);
    let m = pm
        .modules
        .iter()
        .find(|m| m.name == "libtarget.so")
        .unwrap();
    assert!(m.deleted);
    let v = resolve(&ProbeSpec::parse("libtarget:fn2").unwrap(), &pm).unwrap();
    assert_eq!(addrs_of(&v), vec![printed["fn2"]]);
    drop(child);
}

const DLMOPEN_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    void *a = dlopen(argv[1], RTLD_NOW);
    void *b = dlmopen(LM_ID_NEWLM, argv[1], RTLD_NOW);
    if (!a || !b) { printf("error %s\n", dlerror()); return 1; }
    printf("first %p\n", dlsym(a, "fn2"));
    printf("second %p\n", dlsym(b, "fn2"));
    printf("done 0\n");
    fflush(stdout);
    sleep(1000);
    return 0;
}
"#;

#[test]
fn library_loaded_twice_with_dlmopen_gives_two_probes() {
    let dir = tests::temp_dir("dlmopen");
    build_pie(dir.path());
    let d = dir.path().display();
    std::fs::write(dir.path().join("dlm.c"), DLMOPEN_C).unwrap();
    cc(&[
        "-O1",
        "-o",
        &format!("{d}/dlm"),
        &format!("{d}/dlm.c"),
        "-ldl",
    ]);
    let lib = dir.path().join("libtarget.so");
    let mut child = Command::new(dir.path().join("dlm"))
        .arg(&lib)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Running(child);
    let mut printed = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let (name, value) = line.split_once(' ').unwrap();
        assert_ne!(name, "error", "{line}");
        if name == "done" {
            break;
        }
        let v = u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
        printed.insert(name.to_string(), v);
    }
    let pm = SymbolCache::new().process(child.0.id() as i32).unwrap();
    let v = resolve(&ProbeSpec::parse("libtarget:fn2").unwrap(), &pm).unwrap();
    let mut expect = vec![printed["first"], printed["second"]];
    expect.sort();
    assert_ne!(expect[0], expect[1]);
    assert_eq!(addrs_of(&v), expect);
    drop(child);
}

#[test]
fn thousand_specs_and_twenty_attaches() {
    let dir = tests::temp_dir("scale");
    let prog = build_pie(dir.path());
    let (child, _) = run(&prog);
    let pid = child.0.id() as i32;
    let cache = SymbolCache::new();
    let t = std::time::Instant::now();
    let pm = cache.process(pid).unwrap();
    let first = t.elapsed();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let again = cache.process(pid).unwrap();
        assert_eq!(again.modules.len(), pm.modules.len());
    }
    let twenty = t.elapsed();
    let files = cache.len();
    assert_eq!(files, pm.modules.len());

    let libc = pm
        .modules
        .iter()
        .find(|m| m.name.starts_with("libc."))
        .unwrap();
    let wanted: Vec<(String, u64)> = libc
        .functions()
        .filter(|f| !f.name().contains('@'))
        .take(1000)
        .map(|f| (format!("libc:{}", f.name()), f.address))
        .collect();
    assert_eq!(wanted.len(), 1000);
    let t = std::time::Instant::now();
    for (text, address) in &wanted {
        let v = resolve(&ProbeSpec::parse(text).unwrap(), &pm).unwrap();
        assert!(v.iter().any(|p| p.address == *address), "{text}");
    }
    let resolving = t.elapsed();
    eprintln!(
        "first attach {first:?}, 20 cached attaches {twenty:?}, 1000 specs resolved in {resolving:?}"
    );
    drop(child);
}
