//! Specs name what the user knows (issue #9, defect 9): the executable by the name it
//! was started under, and one function by one name whatever symbol versions alias it.

mod common;
use common::*;

/// The command is a symlink to the executable (`redis-server` -> `redis-check-rdb`
/// style): `MODULE` matches the name the user ran as well as the file's name.
#[test]
fn module_matches_the_symlink_the_program_was_run_as() {
    let dir = temp_dir("symlink");
    let target = build_target(&dir);
    let link = dir.join("mytool");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let json = dir.join("out.json");
    let run = |spec: &str| {
        tracer_output(&[
            "run",
            "-p",
            spec,
            "--json",
            "-o",
            json.to_str().unwrap(),
            "--",
            link.to_str().unwrap(),
            "4001",
        ])
    };
    for spec in ["mytool:mainfn", "target:mainfn", "main:mainfn"] {
        let out = run(spec);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{spec}: {err}");
        let reports = json_lines(&std::fs::read_to_string(&json).expect("report"));
        assert_eq!(num(report(&reports, "main:mainfn"), "hits"), 2001, "{spec}");
    }
    // Still only what the user could mean: not a library, not a prefix inside a word.
    let out = run("mytoo:mainfn");
    assert_one_line_error(&out, &["mytoo", "run as mytool"]);
}

const LIBVER_C: &str = r#"
__attribute__((noinline)) int ver_impl(int x) { return x * 3 + 1; }
__asm__(".symver ver_impl, ver@V1");
__asm__(".symver ver_impl, ver@@V2");
"#;

const VERMAP: &str = "V1 { global: ver; local: *; };\nV2 { global: ver; } V1;\n";

const USE_VER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int ver(int);
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10, s = 0;
    for (long i = 0; i < n; i++) s += ver((int)i);
    printf("calls=%ld sum=%ld\n", n, s);
    return 0;
}
"#;

/// `ver@V1` and `ver@@V2` are one function (one address): named either way, and both
/// ways at once, it is one probe, named by the default version's name.
#[test]
fn versioned_aliases_are_one_probe_under_the_default_name() {
    let dir = temp_dir("symver");
    std::fs::write(dir.join("ver.map"), VERMAP).unwrap();
    cc(
        &dir,
        "libver.so",
        LIBVER_C,
        &["-shared", "-fPIC", "-Wl,--version-script=ver.map"],
    );
    let prog = cc(
        &dir,
        "usever",
        USE_VER_C,
        &["-L.", "-lver", "-Wl,-rpath,$ORIGIN"],
    );
    let nm = std::process::Command::new("nm")
        .args(["-D", dir.join("libver.so").to_str().unwrap()])
        .output()
        .unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    assert!(nm.contains("ver@V1") && nm.contains("ver@@V2"), "{nm}");

    let lib = dir.join("libver.so");
    let out = tracer_output(&["list", lib.to_str().unwrap(), "ver@V1"]);
    let rows = String::from_utf8_lossy(&out.stdout);
    assert!(rows.starts_with("libver.so:ver  0x"), "{rows}");
    assert_eq!(rows.lines().count(), 1, "{rows}");

    let json = dir.join("out.json");
    let out = tracer_output(&[
        "run",
        "-p",
        "libver:ver@V1",
        "-p",
        "libver:ver",
        "-p",
        "libver:ver@*",
        "--json",
        "-o",
        json.to_str().unwrap(),
        "--",
        prog.to_str().unwrap(),
        "777",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("calls=777 "),
        "{err}"
    );
    let reports = json_lines(&std::fs::read_to_string(&json).expect("report"));
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = report(&reports, "libver:ver");
    assert_eq!(r["symbol"], "ver");
    assert_eq!(num(r, "hits"), 777, "{r}");
}

/// A spec that matches nothing because the selected module has no function symbols at
/// all (a stripped program, or the interpreter a script was started through) says so
/// instead of only suggesting other modules.
#[test]
fn a_module_without_function_symbols_is_named() {
    let dir = temp_dir("stripped");
    let prog = cc(&dir, "stripped", TINY_C, &["-pthread", "-s"]);
    let out = tracer_output(&["run", "-p", "main:*", "--", prog.to_str().unwrap()]);
    assert_one_line_error(
        &out,
        &["main:*", prog.to_str().unwrap(), "has no function symbols"],
    );
}
