//! MiniDebugInfo: a program stripped the way Fedora-style distributions do it, with the
//! local function symbols kept in an xz-compressed ELF in `.gnu_debugdata`. A static
//! function present only there must still resolve, in the file and in the running
//! process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tracer::spec::{resolve, ProbeSpec};
use tracer::symbols::{ElfSymbols, SymbolCache, SymbolSource};

const PROG_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
static __attribute__((noinline)) int hidden_helper(int x) { return x * 13 + 7; }
__attribute__((noinline)) int exported_fn(int x) { return hidden_helper(x) + 1; }
int main(void) {
    printf("hidden_helper %p\n", (void *)&hidden_helper);
    printf("exported_fn %p\n", (void *)&exported_fn);
    printf("done %d\n", exported_fn(3));
    fflush(stdout);
    sleep(1000);
    return 0;
}
"#;

/// The steps of gdb's "MiniDebugInfo" documentation and Fedora's find-debuginfo:
/// keep the function symbols that `.dynsym` lacks in a debug-only copy, strip the
/// program, and embed the xz-compressed copy as `.gnu_debugdata`.
const MINIDEBUG_SH: &str = r#"
set -eu
f="$1"
nm -D "$f" --format=posix --defined-only | awk '{ print $1 }' | sort > dynsyms
nm "$f" --format=posix --defined-only | awk '{ if ($2 == "T" || $2 == "t") print $1 }' | sort > funcsyms
comm -13 dynsyms funcsyms > keep_symbols
objcopy --only-keep-debug "$f" mini_debuginfo
objcopy -S --remove-section .gdb_index --remove-section .comment --keep-symbols=keep_symbols mini_debuginfo mini_debuginfo
strip --strip-all -R .comment "$f"
rm -f mini_debuginfo.xz
xz mini_debuginfo
objcopy --add-section .gnu_debugdata=mini_debuginfo.xz "$f"
"#;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool_exists(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn sh(dir: &Path, script: &str, args: &[&str]) {
    let out = Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "script failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_minidebug(dir: &Path) -> PathBuf {
    for tool in ["cc", "nm", "objcopy", "strip", "xz", "comm", "awk"] {
        assert!(
            tool_exists(tool),
            "{tool} is needed to build the MiniDebugInfo test program (apt-get install -y xz-utils binutils)"
        );
    }
    std::fs::write(dir.join("prog.c"), PROG_C).unwrap();
    // -rdynamic exports exported_fn in .dynsym, as a library's API would be.
    sh(dir, "cc -O1 -fPIE -pie -rdynamic -o prog prog.c", &[]);
    sh(dir, MINIDEBUG_SH, &["prog"]);
    dir.join("prog")
}

#[test]
fn static_function_only_in_gnu_debugdata_resolves() {
    let dir = tests::temp_dir("minidebug");
    let prog = build_minidebug(dir.path());

    // The stripped file has no .symtab, and nm can no longer see the static function.
    let elf = ElfSymbols::read(&prog).unwrap();
    assert!(!elf.has_symtab, "strip left a .symtab");
    assert!(elf.has_debugdata);
    assert!(elf.warnings().is_empty(), "{:?}", elf.warnings());
    let nm = Command::new("nm").arg(&prog).output().unwrap();
    assert!(!String::from_utf8_lossy(&nm.stdout).contains("hidden_helper"));

    let hidden: Vec<_> = elf.functions_named("hidden_helper").collect();
    assert_eq!(hidden.len(), 1);
    assert_eq!(hidden[0].source, SymbolSource::DebugData);
    assert!(hidden[0].size > 0);
    let exported: Vec<_> = elf.functions_named("exported_fn").collect();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0].source, SymbolSource::Dynsym);

    // In the running process, at the address the program prints.
    let mut child = Command::new(&prog).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Running(child);
    let mut printed = std::collections::HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let (name, value) = line.split_once(' ').unwrap();
        if name == "done" {
            break;
        }
        let v = u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
        printed.insert(name.to_string(), v);
    }
    let pm = SymbolCache::new().process(child.0.id() as i32).unwrap();
    let spec = ProbeSpec::parse("main:hidden_*").unwrap();
    let v = resolve(&spec, &pm).unwrap();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].symbol, "hidden_helper");
    assert_eq!(v[0].address, printed["hidden_helper"]);
    assert_eq!(v[0].size, hidden[0].size);
    let v = resolve(&ProbeSpec::parse("main:exported_fn").unwrap(), &pm).unwrap();
    assert_eq!(v[0].address, printed["exported_fn"]);
    let (_, f) = pm.symbol_containing(printed["hidden_helper"] + 1).unwrap();
    assert_eq!(f.name(), "hidden_helper");
}

#[test]
fn corrupt_gnu_debugdata_is_a_warning_not_a_failure() {
    let dir = tests::temp_dir("minidebug-bad");
    let prog = build_minidebug(dir.path());
    // Replace the section with bytes that are not xz.
    std::fs::write(dir.path().join("junk"), b"not xz at all").unwrap();
    sh(
        dir.path(),
        "objcopy --update-section .gnu_debugdata=junk prog",
        &[],
    );
    let elf = ElfSymbols::read(&prog).unwrap();
    assert!(elf.has_debugdata);
    assert_eq!(elf.warnings().len(), 1);
    assert!(elf.warnings()[0].contains("xz"), "{}", elf.warnings()[0]);
    assert_eq!(elf.functions_named("hidden_helper").count(), 0);
    assert_eq!(elf.functions_named("exported_fn").count(), 1);
}

/// What Debian ships: reported, and checked only where it is certain. Debian's libc has
/// `.dynsym` only (no `.symtab`, no `.gnu_debugdata`), so IFUNC implementations such as
/// `__strlen_avx2` have no symbol there.
#[test]
fn system_libc_tables() {
    let path = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
    if !path.exists() {
        eprintln!("no {} here; nothing to check", path.display());
        return;
    }
    let elf = ElfSymbols::read(path).unwrap();
    eprintln!(
        "{}: .symtab {}, .gnu_debugdata {}, {} functions",
        path.display(),
        elf.has_symtab,
        elf.has_debugdata,
        elf.functions().len()
    );
    let readelf = Command::new("readelf").args(["-SW"]).arg(path).output();
    if let Ok(out) = readelf {
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(elf.has_symtab, text.contains(" .symtab "));
        assert_eq!(elf.has_debugdata, text.contains(" .gnu_debugdata "));
    }
    let malloc: Vec<_> = elf.functions_named("malloc").collect();
    assert_eq!(malloc.len(), 1);
    assert!(malloc[0].names.iter().any(|n| n == "__libc_malloc"));
    let strlen: Vec<_> = elf.functions_named("strlen").collect();
    assert!(strlen[0].is_ifunc);
    // The old memcpy version is kept apart from the default one.
    let old: Vec<_> = elf.functions_named("memcpy@GLIBC_2.2.5").collect();
    let new: Vec<_> = elf.functions_named("memcpy").collect();
    assert_eq!((old.len(), new.len()), (1, 1));
    assert_ne!(old[0].value, new[0].value);
}
