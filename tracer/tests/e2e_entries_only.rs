//! Exit probes only where code is entered by `call` (issue #9, defect 2): `.cold`
//! fragments, process entry points and the unwinder's walk starts get their entries
//! probed and not their returns, with a note, and the programs compute what they
//! compute untraced.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn untraced(prog: &Path) -> Output {
    Command::new(prog).output().expect("run the program")
}

/// `tracer run -x -p SPEC --json -o FILE -- prog`: the run's output and the reports.
fn traced(prog: &Path, spec: &str, dir: &Path) -> (Output, Vec<serde_json::Value>) {
    let json = dir.join("report.json");
    let _ = std::fs::remove_file(&json);
    let out = tracer()
        .args(["run", "-x", "-v", "-p", spec, "--json", "-o"])
        .arg(&json)
        .arg("--")
        .arg(prog)
        .output()
        .expect("run tracer");
    // Refused probes have an object too, with no counts.
    let reports = std::fs::read_to_string(&json)
        .map(|t| json_lines(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.get("refused").is_none())
        .collect();
    (out, reports)
}

fn assert_same_run(plain: &Output, (out, _): &(Output, Vec<serde_json::Value>), what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), plain.status.code(), "{what}: {err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&plain.stdout),
        "{what}: {err}"
    );
}

fn notes(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("tracer: note: "))
        .map(str::to_string)
        .collect()
}

/// A C function whose rare branch GCC moved into `sum_checked.cold`, where `[rsp]` is
/// the caller's saved `rbx`: with an exit probe there the function popped a trampoline
/// address into the caller's `rbx` and the program crashed. The fragment is now probed
/// at entry only, every hit counted (the program counts them too), and `tracer list`
/// says so beforehand.
#[test]
fn cold_fragment_gets_entries_only() {
    let dir = temp_dir("cold");
    let prog = cc(&dir, "cold", COLD_C, &["-O2"]);
    let nm = Command::new("nm").arg(&prog).output().expect("nm");
    assert!(
        String::from_utf8_lossy(&nm.stdout).contains(" sum_checked.cold"),
        "the compiler emitted no .cold fragment: the test needs GCC -O2"
    );
    let plain = untraced(&prog);
    assert!(plain.status.success());
    let text = String::from_utf8_lossy(&plain.stdout).into_owned();
    let rare: u64 = text
        .trim()
        .rsplit("rare=")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {text:?}"));
    assert!(rare > 0);

    let run = traced(&prog, "main:sum_checked*", &dir);
    assert_same_run(&plain, &run, "-x -p main:sum_checked*");
    let cold = report(&run.1, "main:sum_checked.cold");
    assert_eq!(num(cold, "hits"), rare, "{cold}");
    assert_eq!(num(cold, "exits"), 0, "{cold}");
    let parent = report(&run.1, "main:sum_checked");
    assert_eq!(num(parent, "exits"), num(parent, "hits"), "{parent}");
    let n = notes(&run.0);
    assert!(
        n.iter()
            .any(|l| l.contains("main:sum_checked.cold") && l.contains(".cold fragment")),
        "{n:?}"
    );

    let out = tracer_output(&["list", prog.to_str().unwrap(), "sum_checked*"]);
    let rows = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = |name: &str| {
        rows.lines()
            .find(|l| l.starts_with(&format!("cold:{name}  ")))
            .unwrap_or_else(|| panic!("{name} not listed: {rows}"))
            .to_string()
    };
    assert!(
        row("sum_checked.cold")
            .ends_with("probeable (entries only: .cold fragment, entered by jmp)"),
        "{rows}"
    );
    assert!(row("sum_checked").ends_with("  probeable"), "{rows}");
}

/// A PIE C++ program that throws thousands of exceptions (std::stoi on bad input) and
/// uses std::map and std::ostringstream: every function of the executable, of
/// libstdc++ and of libgcc_s probed with returns leaves its output and status as
/// untraced. Before, `main:*` crashed it (the exit probe on `_start`, whose `[rsp]` is
/// argc) and `libgcc_s:*` aborted it (exit probes on `_Unwind_RaiseException` and
/// `_Unwind_Resume`, from whose return address the unwinder starts its walk).
#[test]
fn throwing_cxx_program_intact_under_exit_probes() {
    let dir = temp_dir("throwing");
    let prog = cxx(&dir, "throwing", THROWING_CC, &["-pie", "-fPIE"]);
    let plain = untraced(&prog);
    assert!(plain.status.success(), "{plain:?}");
    let text = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(text.contains("invalid=2858"), "{text}");

    let main = traced(&prog, "main:*", &dir);
    assert_same_run(&plain, &main, "-x -p main:*");
    let start = report(&main.1, "main:_start");
    assert_eq!((num(start, "hits"), num(start, "exits")), (1, 0), "{start}");
    assert!(
        notes(&main.0)
            .iter()
            .any(|l| l.contains("main:_start") && l.contains("entry point")),
        "{:?}",
        notes(&main.0)
    );

    let gcc = traced(&prog, "libgcc_s:*", &dir);
    assert_same_run(&plain, &gcc, "-x -p libgcc_s:*");
    let resume = report(&gcc.1, "libgcc_s:_Unwind_Resume");
    assert!(num(resume, "hits") > 0, "{resume}");
    assert_eq!(num(resume, "exits"), 0, "{resume}");
    // tracer's own hook for thrown exceptions keeps its place.
    let err = String::from_utf8_lossy(&gcc.0.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("libgcc_s:_Unwind_RaiseException") && l.contains("exception hook")),
        "{err}"
    );

    let stdcxx = traced(&prog, "libstdc++:*", &dir);
    assert_same_run(&plain, &stdcxx, "-x -p libstdc++:*");
}

/// glibc's `backtrace()` walks with `_Unwind_Backtrace` and `pthread_exit` unwinds with
/// `_Unwind_ForcedUnwind`: with an exit probe on the first, `backtrace()` found no frame
/// at all (the walk started at the exit trampoline). With every libgcc_s function
/// probed with returns the program's output is as untraced.
#[test]
fn backtrace_and_thread_exit_intact_under_exit_probes() {
    let dir = temp_dir("unwind");
    // libgcc_s linked in, so that it is loaded (and probed) before glibc dlopens it.
    let prog = cc(
        &dir,
        "unwind",
        UNWIND_C,
        &["-pthread", "-Wl,--no-as-needed", "-lgcc_s"],
    );
    let plain = untraced(&prog);
    assert!(plain.status.success(), "{plain:?}");
    let text = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(!text.starts_with("frames=0 "), "{text}");

    let run = traced(&prog, "libgcc_s:*", &dir);
    assert_same_run(&plain, &run, "-x -p libgcc_s:*");
    let bt = report(&run.1, "libgcc_s:_Unwind_Backtrace");
    assert!(num(bt, "hits") > 0, "{bt}");
    assert_eq!(num(bt, "exits"), 0, "{bt}");
}

/// `tracer list` on the unwinder library (this test process has libgcc_s loaded: Rust's
/// standard library unwinds with it) says which functions get entries only.
#[test]
fn list_shows_unwinder_entries_only() {
    let pid = std::process::id().to_string();
    let out = tracer_output(&["list", &pid, "libgcc_s:_Unwind_*"]);
    let rows = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = |f: &str| {
        rows.lines()
            .find(|l| l.contains(&format!(":{f}  ")))
            .unwrap_or_else(|| panic!("{f} not listed: {rows}"))
            .to_string()
    };
    assert!(
        row("_Unwind_RaiseException").contains("probeable without -x (with -x tracer's own"),
        "{rows}"
    );
    for f in ["_Unwind_RaiseException", "_Unwind_Resume"] {
        assert!(
            row(f).contains(
                "entries only: the unwinder starts its walk from this function's return \
                 address)"
            ),
            "{rows}"
        );
    }
    assert!(row("_Unwind_GetCFA").ends_with("  probeable"), "{rows}");
}
