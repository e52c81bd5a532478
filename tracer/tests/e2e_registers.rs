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

const AVX512_C: &str = include_str!("../../tests/programs/avx512.c");

/// The registers an Intel-syntax instruction line names, operand by operand (`zmm1{k2}`
/// gives `zmm1` and `k2`); the first operand first.
fn operands(line: &str) -> Vec<Vec<String>> {
    let ops = line.split_once(char::is_whitespace).map_or("", |(_, o)| o);
    ops.split(',')
        .map(|op| {
            op.split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// Whether, after the instruction at `from`, `reg` is read before anything writes it
/// (until `to`): then it held a value across what ran before `from`. A write is the
/// register as an instruction's whole first operand, a read any other mention.
fn read_before_written(f: &[String], from: usize, to: usize, reg: &str) -> bool {
    for i in &f[from + 1..to] {
        let ops = operands(i);
        let Some((first, rest)) = ops.split_first() else {
            continue;
        };
        let mask = first.iter().skip(1).any(|r| r == reg);
        if mask || rest.iter().flatten().any(|r| r == reg) {
            return true;
        }
        if first.first().is_some_and(|r| r == reg) {
            return false;
        }
    }
    false
}

/// The premise of the AVX-512 test, checked on the compiled code: `sum512` keeps a value
/// in a register of `zmm16-31` and in a mask register across its call to `tick` (read
/// after the call before anything writes it).
fn assert_keeps_avx512_state_across_calls(binary: &Path) {
    let f = disassemble(binary, "sum512");
    let calls: Vec<usize> = (0..f.len()).filter(|&i| f[i].starts_with("call")).collect();
    assert!(
        calls.len() >= 2,
        "sum512 should call tick and first: {f:#?}"
    );
    let (call, next) = (calls[0], calls[1]);
    let zmm: Vec<String> = (16..32)
        .map(|n| format!("zmm{n}"))
        .filter(|r| read_before_written(&f, call, next, r))
        .collect();
    let k: Vec<String> = (1..8)
        .map(|n| format!("k{n}"))
        .filter(|r| read_before_written(&f, call, next, r))
        .collect();
    assert!(
        !zmm.is_empty() && !k.is_empty(),
        "sum512 should keep zmm16-31 and k registers live across its call to tick: {f:#?}"
    );
}

/// `tracer run ARGS -- binary n`: exit status 0 and the untraced output, byte for byte;
/// returns the report (`-o` file).
fn traced_output_is_untraced(binary: &Path, dir: &Path, args: &[&str], n: u64) -> String {
    let n = n.to_string();
    let plain = Command::new(binary).arg(&n).output().expect("untraced run");
    assert!(plain.status.success());
    let report = dir.join("report.txt");
    let mut all = vec!["run", "-o", report.to_str().unwrap()];
    all.extend(args);
    all.extend(["--", binary.to_str().unwrap(), &n]);
    let out = tracer_output(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: stderr: {err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&plain.stdout),
        "{args:?}: traced output differs from the untraced one; stderr: {err}"
    );
    std::fs::read_to_string(&report).expect("read -o file")
}

/// Whether the CPU runs the AVX-512 program (built with -mavx512f -mavx512vl); says so
/// when it does not.
fn have_avx512() -> bool {
    let have = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl");
    if !have {
        println!("no AVX-512F and AVX512VL on this CPU: AVX-512 callers not tested");
    }
    have
}

fn build_avx512(dir: &Path) -> std::path::PathBuf {
    let binary = cc(
        dir,
        "avx512",
        AVX512_C,
        &[
            "-g",
            "-O2",
            "-mavx512f",
            "-mavx512vl",
            "-fipa-ra",
            "-no-pie",
            "-fno-pie",
        ],
    );
    assert_keeps_avx512_state_across_calls(&binary);
    binary
}

/// A caller built with `-mavx512f -fipa-ra` keeps values in zmm16-31, in the upper halves
/// of zmm0-15 and in k registers across calls to leaves that touch no vector register;
/// every action that calls code from the probes (the general paths of exit counting,
/// `--trace`, `--hist`, a pack's handlers, which reach glibc's EVEX and AVX-512 string
/// functions) must leave that state as it was.
#[test]
fn callers_keeping_avx512_state_across_calls_compute_the_same() {
    if !have_avx512() {
        return;
    }
    let dir = temp_dir("avx512");
    let binary = build_avx512(dir.path());
    let n = 3000;
    let pack = build_pack(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/packs/testpack"),
        "testpack",
        &[],
    );
    let runs: [&[&str]; 6] = [
        // Entries counted inline: nothing is called.
        &["-p", "main:tick", "-p", "main:first*"],
        // Returns too: a thread's first hit runs the general path (into the agent).
        &["-x", "-p", "main:tick", "-p", "main:first*"],
        &["--trace", "-p", "main:tick", "-p", "main:first*"],
        &["--hist", "-p", "main:tick", "-p", "main:first*"],
        &["--summary", "-p", "main:tick"],
        // An entry handler formatting an event, a return handler doing float work.
        &["--pack", pack.to_str().unwrap()],
    ];
    for args in runs {
        let report = traced_output_is_untraced(&binary, dir.path(), args, n);
        if args[0] == "--pack" {
            assert!(report.contains(&format!("@TICKS: {n}")), "{report}");
        }
    }
}

/// `tracer attach` to the AVX-512 program while it runs its loop, AVX-512 state live: the
/// thread tracer borrows to load the agent, the probes' general paths (`-x`), `--trace`,
/// and the detach leave the result as an untraced run of as many rounds computes it.
#[test]
fn attaching_to_a_caller_keeping_avx512_state_changes_nothing() {
    if !have_avx512() {
        return;
    }
    let dir = temp_dir("avx512-attach");
    let binary = build_avx512(dir.path());
    let mut t = Target::spawn(&binary, &["-", "1000"]);
    assert_eq!(t.line(), "running");
    let pid = t.pid().to_string();
    for args in [
        &["-x", "-p", "main:tick", "-p", "main:first*"][..],
        &["--trace", "-p", "main:first*"],
        &["--hist", "-p", "main:tick"],
    ] {
        let report = dir.join("report.txt");
        let mut all = vec!["attach", "--duration", "1", "-o", report.to_str().unwrap()];
        all.extend(args);
        all.push(&pid);
        let out = tracer_output(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: stderr: {err}");
        let report = std::fs::read_to_string(&report).expect("read -o file");
        assert!(report.contains("main:"), "{args:?}: {report}");
    }
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(t.pid(), libc::SIGUSR1) }, 0);
    let traced = t.line();
    assert!(t.child.wait().expect("wait").success());
    let rounds = traced
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rounds="))
        .unwrap_or_else(|| panic!("no rounds in {traced:?}"));
    let plain = Command::new(&binary)
        .args(["1000", rounds])
        .output()
        .expect("untraced run");
    assert!(plain.status.success());
    assert_eq!(
        traced,
        String::from_utf8_lossy(&plain.stdout).trim_end(),
        "the attached run computed something else than an untraced one of as many rounds"
    );
}
