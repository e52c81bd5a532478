//! `tracer run -x` on a program whose callers keep values in call-clobbered registers
//! across calls and call with `rsp` misaligned, as GCC's `-fipa-ra` and
//! `-fipa-stack-alignment` allow for functions that bind locally (issue #9, defect 1):
//! its output must be byte-identical to an untraced run.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const IPA_RA_C: &str = include_str!("../../tests/programs/ipa_ra.c");

/// `objdump -d` of `function` in `binary`, Intel syntax, one instruction per line.
fn disassemble(binary: &Path, function: &str) -> Vec<String> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(format!("--disassemble={function}"))
        .arg(binary)
        .output()
        .expect("objdump (binutils, installed with gcc)");
    assert!(out.status.success(), "objdump failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(":\t").map(|(_, i)| i.trim().to_string()))
        .collect()
}

/// The premise of the test, checked on the compiled code: `small` has no frame (so it
/// calls `tick` with rsp 8 off the ABI's alignment) and reads `rdi`, `rsi` and `rdx`
/// (its arguments) after that call without having saved them anywhere. Without this the
/// test would prove nothing.
fn assert_compiled_as_expected(binary: &Path) {
    let small = disassemble(binary, "small");
    assert!(
        small.first().is_some_and(|i| i.starts_with("call")),
        "small should call tick first, without a frame: {small:#?}"
    );
    let after: Vec<&String> = small.iter().skip(1).collect();
    for r in ["rdi", "rsi", "rdx"] {
        assert!(
            after.iter().any(|i| i.contains(r)),
            "small should use {r} after the call: {small:#?}"
        );
    }
    assert!(
        !small
            .iter()
            .any(|i| i.starts_with("push") || i.starts_with("mov    QWORD PTR [rsp")),
        "small should keep its arguments in their registers across calls: {small:#?}"
    );
}

/// `tracer run` (with `-x` when `exits`) on `binary N` with `specs`: the output must be the
/// untraced one; returns the report.
fn run_and_compare(
    binary: &Path,
    dir: &Path,
    specs: &[&str],
    n: u64,
    exits: bool,
) -> Vec<serde_json::Value> {
    let b = binary.to_str().unwrap();
    let n = n.to_string();
    let plain = Command::new(binary).arg(&n).output().expect("untraced run");
    assert!(plain.status.success());
    let json = dir.join("report.json");
    let mut args = vec!["run", "--json", "-o", json.to_str().unwrap()];
    if exits {
        args.push("-x");
    }
    for s in specs {
        args.extend(["-p", s]);
    }
    args.extend(["--", b, &n]);
    let out = tracer_output(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&plain.stdout),
        "traced output differs from the untraced one; stderr: {err}"
    );
    json_lines(&std::fs::read_to_string(&json).expect("read -o file"))
}

#[test]
fn callers_keeping_values_in_call_clobbered_registers_compute_the_same() {
    let dir = temp_dir("ipa-ra");
    let binary = cc(
        dir.path(),
        "ipa_ra",
        IPA_RA_C,
        &[
            "-O2",
            "-fipa-ra",
            "-fipa-stack-alignment",
            "-no-pie",
            "-fno-pie",
        ],
    );
    assert_compiled_as_expected(&binary);
    let n = 2000;
    // The functions of the program, entries and returns (the first hit maps the shadow
    // stack through the shared general path), then entries alone (the inline counting
    // trampoline, which calls nothing).
    let specs = [
        "main:tick",
        "main:tock",
        "main:grow",
        "main:mix",
        "main:small",
        "main:blend*",
        "main:main",
    ];
    for exits in [true, false] {
        let reports = run_and_compare(&binary, dir.path(), &specs, n, exits);
        for (probe, calls) in [
            ("main:tick", 3 * n),
            ("main:tock", 3 * n),
            ("main:grow", 3 * n),
            ("main:mix", n),
            ("main:small", n),
            ("main:main", 1),
        ] {
            let r = report(&reports, probe);
            assert_eq!(num(r, "hits"), calls, "{r}");
            if exits {
                assert_eq!(num(r, "exits"), calls, "{r}");
            }
        }
    }
    // Every function of the executable but `_start`, which is not entered by a call (its
    // `[rsp]` is argc, not a return address): exit-probing it is issue #9's defect 2.
    let list = tracer_output(&["list", binary.to_str().unwrap(), "*"]);
    assert!(list.status.success());
    let specs: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.split_once(':'))
        .map(|(_, name)| name)
        .filter(|&name| name != "_start")
        .map(|name| format!("main:{name}"))
        .collect();
    assert!(specs.len() >= 8, "{specs:?}");
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    run_and_compare(&binary, dir.path(), &specs, n, true);
    run_and_compare(&binary, dir.path(), &specs, n, false);
}
