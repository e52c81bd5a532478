//! Probed functions whose stolen bytes end with an indirect `call` (`call *%rdi`,
//! `call *8(%rsp)`, `call *slot(%rip)` as `gcc -fno-plt` emits for calls into other
//! libraries): the callee must see the original return address, as unprobed, so that
//! `__builtin_return_address`, backtraces and C++ unwinding through the probed function
//! work; a `call` followed by more stolen bytes is refused with its reason.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// The probed functions, in assembly with their unwind information, so that their first
/// instructions are exactly these. `ic_inner`'s call is followed by more bytes the patch
/// would cover: it cannot be probed. `callee` is the C (or C++) function they call; the
/// label after each call is the return address it must see.
const FUNCTIONS: &str = r#"
__asm__(".text\n"
  ".globl ic_reg\n.type ic_reg, @function\nic_reg:\n.cfi_startproc\n"
  "  subq $8, %rsp\n.cfi_adjust_cfa_offset 8\n  call *%rdi\n"
  ".globl ic_reg_ret\nic_reg_ret:\n  addq $8, %rsp\n.cfi_adjust_cfa_offset -8\n  ret\n"
  ".cfi_endproc\n.size ic_reg, .-ic_reg\n"
  ".globl ic_stack\n.type ic_stack, @function\nic_stack:\n.cfi_startproc\n"
  "  pushq %rdi\n.cfi_adjust_cfa_offset 8\n  pushq $0\n.cfi_adjust_cfa_offset 8\n"
  "  call *8(%rsp)\n"
  ".globl ic_stack_ret\nic_stack_ret:\n  addq $16, %rsp\n.cfi_adjust_cfa_offset -16\n  ret\n"
  ".cfi_endproc\n.size ic_stack, .-ic_stack\n"
  ".globl ic_slot\n.type ic_slot, @function\nic_slot:\n.cfi_startproc\n"
  "  call *callee_slot(%rip)\n"
  ".globl ic_slot_ret\nic_slot_ret:\n  ret\n"
  ".cfi_endproc\n.size ic_slot, .-ic_slot\n"
  ".globl ic_inner\n.type ic_inner, @function\nic_inner:\n.cfi_startproc\n"
  "  call *%rdi\n"
  ".globl ic_inner_ret\nic_inner_ret:\n  nopl 0(%rax)\n  ret\n"
  ".cfi_endproc\n.size ic_inner, .-ic_inner\n"
  ".data\n.balign 8\ncallee_slot:\n  .quad callee\n.text\n");
"#;

const DECLARATIONS: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#ifdef __cplusplus
extern "C" {
#endif
long ic_reg(long (*)(void)), ic_stack(long (*)(void)), ic_slot(void),
    ic_inner(long (*)(void));
extern char ic_reg_ret[], ic_stack_ret[], ic_slot_ret[], ic_inner_ret[];
long callee(void);
#ifdef __cplusplus
}
#endif
static const void *expected;
static long calls, wrong;
"#;

/// Each function called N times; the callee counts the calls that come back to
/// somewhere else than the original code. Callees realign the stack: `ic_slot`,
/// `ic_stack` and `ic_inner` call with it misaligned.
const MAIN_C: &str = r#"
__attribute__((noinline, used, force_align_arg_pointer)) long callee(void) {
    calls++;
    if (__builtin_return_address(0) != expected)
        wrong++;
    return 1;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    for (int i = 0; i < n; i++) {
        expected = ic_reg_ret; ic_reg(callee);
        expected = ic_stack_ret; ic_stack(callee);
        expected = ic_slot_ret; ic_slot();
        expected = ic_inner_ret; ic_inner(callee);
    }
    printf("calls=%ld wrong=%ld\n", calls, wrong);
    return wrong != 0;
}
"#;

/// The same, the callee throwing through the probed function to `main`, which catches.
const MAIN_CC: &str = r#"
extern "C" __attribute__((noinline, used, force_align_arg_pointer)) long callee(void) {
    calls++;
    if (__builtin_return_address(0) != expected)
        wrong++;
    throw 42;
}
template <class F> static long caught(F f) {
    try { f(); } catch (int) { return 1; }
    return 0;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    long c = 0;
    for (int i = 0; i < n; i++) {
        expected = ic_reg_ret; c += caught([] { ic_reg(callee); });
        expected = ic_stack_ret; c += caught([] { ic_stack(callee); });
        expected = ic_slot_ret; c += caught([] { ic_slot(); });
        expected = ic_inner_ret; c += caught([] { ic_inner(callee); });
    }
    printf("calls=%ld wrong=%ld caught=%ld\n", calls, wrong, c);
    return wrong != 0 || c != calls;
}
"#;

const N: u64 = 300;
const PROBED: [&str; 3] = ["main:ic_reg", "main:ic_stack", "main:ic_slot"];

/// `tracer run [-x] -p 'main:ic_*' --json -- prog N`: the output is the untraced run's,
/// the three probeable functions counted exactly (`exits`, when probed, as `returns`),
/// `ic_inner` refused for its call.
fn run_and_check(prog: &Path, exit: bool, returns: u64) {
    let plain = Command::new(prog).arg(N.to_string()).output().unwrap();
    assert_success(&plain);
    let dir = prog.parent().unwrap();
    let json = dir.join(format!("report-{exit}.json"));
    let mut cmd = tracer();
    cmd.arg("run");
    if exit {
        cmd.arg("-x");
    }
    let out = cmd
        .args(["-p", "main:ic_*", "--json", "-o"])
        .arg(&json)
        .arg("--")
        .arg(prog)
        .arg(N.to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "-x {exit}: {err}");
    assert_eq!(out.stdout, plain.stdout, "-x {exit}: {err}");
    let reports = json_lines(&std::fs::read_to_string(&json).unwrap());
    for probe in PROBED {
        let r = report(&reports, probe);
        assert_eq!(num(r, "hits"), N, "{r}");
        assert_eq!(num(r, "skipped"), 0, "{r}");
        if exit {
            assert_eq!(num(r, "exits"), returns, "{r}");
        }
    }
    let inner = report(&reports, "main:ic_inner");
    let reason = inner["refused"].as_str().unwrap_or_default();
    assert!(
        reason.contains("returns to")
            && reason.contains("inside the bytes the patch would overwrite"),
        "{inner}"
    );
}

#[test]
fn c_callee_sees_the_original_return_address() {
    let dir = temp_dir("indirect-calls");
    let source = format!("{DECLARATIONS}{FUNCTIONS}{MAIN_C}");
    let prog = cc(&dir, "indirect", &source, &["-O1", "-pie", "-fPIE"]);
    let plain = Command::new(&prog).arg(N.to_string()).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        format!("calls={} wrong=0\n", 4 * N)
    );
    run_and_check(&prog, false, 0);
    run_and_check(&prog, true, N);

    // What `tracer list` says of the function it cannot probe.
    let out = tracer_output(&["list", prog.to_str().unwrap(), "ic_inner"]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the `call` at ")
            && text.contains("returns to ")
            && text.contains("inside the bytes the patch would overwrite"),
        "{text}"
    );
}

#[test]
fn cxx_exception_unwinds_through_the_probed_function() {
    if Command::new("c++").arg("--version").output().is_err() {
        eprintln!("skipping: no C++ compiler (c++); .ci/run installs g++");
        return;
    }
    let dir = temp_dir("indirect-calls-cxx");
    let source = format!("{DECLARATIONS}{FUNCTIONS}{MAIN_CC}");
    let prog = cxx(&dir, "indirect", &source, &["-O1", "-pie", "-fPIE"]);
    let plain = Command::new(&prog).arg(N.to_string()).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        format!("calls={0} wrong=0 caught={0}\n", 4 * N)
    );
    // Every call throws: no probed frame returns.
    run_and_check(&prog, false, 0);
    run_and_check(&prog, true, 0);
}
