//! Refused probes in one line (issue #8, item 6): a glob's refusals are summed up by
//! reason on one line, `-v` lists them one per line, a probe named exactly keeps its
//! full reason, and `--json` carries one object per refused probe.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;

/// Three functions too short for the 5-byte jump, one whose loop branches back into its
/// first bytes, one ordinary function; each called 10 times.
const REFUSED_C: &str = r#"
#include <stdio.h>
__asm__(".text\n"
        ".globl fn_short1\n.type fn_short1, @function\nfn_short1:\n  xorl %eax, %eax\n  ret\n.size fn_short1, .-fn_short1\n"
        ".globl fn_short2\n.type fn_short2, @function\nfn_short2:\n  movb $2, %al\n  ret\n.size fn_short2, .-fn_short2\n"
        ".globl fn_short3\n.type fn_short3, @function\nfn_short3:\n  ret\n.size fn_short3, .-fn_short3\n"
        ".globl fn_loop\n.type fn_loop, @function\nfn_loop:\n  xorl %eax, %eax\n"
        "1:\n  addl $1, %eax\n  cmpl $10, %eax\n  jl 1b\n  ret\n.size fn_loop, .-fn_loop\n");
int fn_short1(void), fn_short2(void), fn_short3(void), fn_loop(void);
__attribute__((noipa)) int fn_good(int x) { return x * 7 + 1; }
int main(void) {
    long t = 0;
    for (int i = 0; i < 10; i++)
        t += fn_short1() + fn_short2() + fn_short3() + fn_loop() + fn_good(i);
    printf("ok %ld\n", t);
    return 0;
}
"#;

fn run(prog: &Path, args: &[&str]) -> Output {
    let out = tracer()
        .arg("run")
        .args(args)
        .arg("--")
        .arg(prog)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_success(&out);
    let plain = std::process::Command::new(prog).output().unwrap();
    assert_eq!(out.stdout, plain.stdout, "traced output differs");
    out
}

fn tracer_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("tracer: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn glob_refusals_in_one_line_and_listed_with_v() {
    let dir = temp_dir("refusals");
    let prog = cc(&dir, "refused", REFUSED_C, &["-O1"]);

    let out = run(&prog, &["-p", "main:fn_*"]);
    assert_eq!(
        tracer_lines(&out),
        ["tracer: 4 of 5 functions not probed (3 too short, 1 branches into its first bytes); -v lists them"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(&prog, &["-p", "main:fn_*", "-v"]);
    let lines = tracer_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for f in ["fn_short1", "fn_short2", "fn_short3", "fn_loop"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("tracer: not probing main:{f} at 0x"))),
            "{f}: {lines:?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("main:fn_loop") && l.contains("the patch would overwrite")),
        "{lines:?}"
    );

    // Named exactly: the reason in full, even next to a glob.
    let out = run(&prog, &["-p", "main:fn_short1", "-p", "main:fn_good"]);
    let lines = tracer_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("tracer: not probing main:fn_short1 at 0x")
            && lines[0].contains("only 3 bytes of the function remain"),
        "{lines:?}"
    );
}

#[test]
fn json_carries_the_refusals() {
    let dir = temp_dir("refusals-json");
    let prog = cc(&dir, "refused", REFUSED_C, &["-O1"]);
    let json = dir.join("r.json");
    run(
        &prog,
        &["-p", "main:fn_*", "--json", "-o", json.to_str().unwrap()],
    );
    let objects = json_lines(&std::fs::read_to_string(&json).unwrap());
    assert_eq!(objects.len(), 5, "{objects:?}");
    let good = report(&objects, "main:fn_good");
    assert_eq!(num(good, "hits"), 10, "{good}");
    assert!(good.get("refused").is_none(), "{good}");
    let refused: Vec<_> = objects
        .iter()
        .filter(|o| o.get("refused").is_some())
        .collect();
    assert_eq!(refused.len(), 4, "{objects:?}");
    let short2 = report(&objects, "main:fn_short2");
    assert!(
        short2["refused"]
            .as_str()
            .unwrap()
            .contains("bytes of the function remain"),
        "{short2}"
    );
    assert_eq!(short2["symbol"], "fn_short2");
    assert!(short2.get("hits").is_none(), "{short2}");
}

/// Entries-only notes of a glob are summed up too; their count is the number of
/// reports marked `entries_only`, and `-v` lists each.
#[test]
fn entries_only_notes_in_one_line() {
    let dir = temp_dir("entries-line");
    let prog = cc(&dir, "cold", COLD_C, &["-O2"]);
    let json = dir.join("e.json");
    let out = tracer()
        .args(["run", "-x", "-p", "main:*", "--json", "-o"])
        .arg(&json)
        .arg("--")
        .arg(&prog)
        .output()
        .unwrap();
    assert!(out.status.success());
    let reports = json_lines(&std::fs::read_to_string(&json).unwrap());
    let marked: Vec<_> = reports
        .iter()
        .filter(|r| r.get("entries_only").is_some())
        .collect();
    assert!(
        marked.len() >= 2,
        "_start and sum_checked.cold: {reports:?}"
    );
    let notes: Vec<_> = tracer_lines(&out)
        .into_iter()
        .filter(|l| l.starts_with("tracer: note: "))
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with(&format!(
            "tracer: note: {} functions get entries only, not returns (",
            marked.len()
        )) && notes[0].contains(" .cold fragment")
            && notes[0].contains(" process entry point")
            && notes[0].ends_with("); -v lists them"),
        "{notes:?}"
    );

    let out = tracer()
        .args(["run", "-x", "-v", "-p", "main:*", "--"])
        .arg(&prog)
        .output()
        .unwrap();
    let listed = tracer_lines(&out)
        .into_iter()
        .filter(|l| l.contains(": only entries are probed: "))
        .count();
    assert_eq!(listed, marked.len());
}

/// The program above ends at once under `tracer run`, 20 times: the tracer lets the agent's
/// thread go before the main thread, whose `exit_group` would otherwise kill it while it is
/// still stopped under the tracer, leaving a zombie only the tracer could reap (the run
/// then never ended, about one time in two).
#[test]
fn a_program_that_ends_at_once_ends_under_run() {
    let dir = temp_dir("quickexit");
    let prog = cc(&dir, "refused", REFUSED_C, &["-O1"]);
    for i in 0..20 {
        let mut child = tracer()
            .args(["run", "-p", "main:fn_*", "--"])
            .arg(&prog)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let ended = wait_until(std::time::Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !ended {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(ended, "run {i}: tracer run never ended");
        assert!(
            out.status.success(),
            "run {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("ok "),
            "run {i}"
        );
    }
}
