//! Launching programs stopped at their entry point; exit status and signals forwarded.
mod common;

use common::{cc, temp_dir};
use tracer::launch::{entry_point, launch, LaunchError};
use tracer::threads::{thread_state, ExitStatus};

const PROG: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static const char *out;
__attribute__((constructor)) static void ctor(int argc, char **argv) {
    out = argv[1];
    FILE *f = fopen(out, "a"); fputs("ctor\n", f); fclose(f);
}
int main(int argc, char **argv) {
    FILE *f = fopen(out, "a"); fprintf(f, "main %s\n", argv[2]); fclose(f);
    if (strcmp(argv[2], "kill") == 0) raise(SIGTERM);
    return atoi(argv[2]);
}
"#;

#[test]
fn launched_program_stops_at_entry_then_runs_to_its_exit_code() {
    let dir = temp_dir("launch");
    let exe = cc(&dir, "prog", PROG, &[]);
    let out = dir.join("out.txt");
    let mut p = launch(
        exe.to_str().unwrap(),
        &[out.to_str().unwrap().into(), "7".into()],
    )
    .unwrap();
    let pid = p.pid();
    assert_eq!(p.threads(), vec![pid]);
    assert_eq!(thread_state(pid, pid).unwrap(), 't');
    assert_eq!(
        p.regs(pid).unwrap().rip,
        entry_point(pid).unwrap(),
        "stopped at AT_ENTRY"
    );
    assert!(!out.exists(), "the program's constructor has not run yet");
    // Libraries are mapped and relocated already.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("libc.so.6"));
    // The entry int3 is gone: the original byte is back.
    let mut b = [0u8; 1];
    p.read_memory(entry_point(pid).unwrap(), &mut b).unwrap();
    assert_ne!(b[0], 0xcc);

    let status = p.wait_exit().unwrap();
    assert_eq!(status, ExitStatus::Code(7));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "ctor\nmain 7\n");
}

#[test]
fn launched_program_killed_by_a_signal_reports_it() {
    let dir = temp_dir("launchsig");
    let exe = cc(&dir, "prog", PROG, &[]);
    let out = dir.join("out.txt");
    let mut p = launch(
        exe.to_str().unwrap(),
        &[out.to_str().unwrap().into(), "kill".into()],
    )
    .unwrap();
    assert_eq!(p.wait_exit().unwrap(), ExitStatus::Signal(libc::SIGTERM));
}

#[test]
fn launch_finds_programs_in_path_and_injects_at_entry() {
    // `true` from $PATH, dynamically linked: inject a library while stopped at entry.
    let mut p = launch("true", &[]).unwrap();
    let dir = temp_dir("launchinj");
    let lib = cc(
        &dir,
        "libx.so",
        "int x_value(void) { return 1234; }",
        &["-shared", "-fPIC"],
    );
    let inj = tracer::inject::inject(&mut p, &std::fs::read(lib).unwrap()).unwrap();
    let f = tracer::inject::dlsym(&mut p, inj.handle, "x_value").unwrap();
    let pid = p.pid();
    let r =
        tracer::remote_call::call(&mut p, pid, f, &[], std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(r as u32, 1234);
    assert_eq!(p.wait_exit().unwrap(), ExitStatus::Code(0));
}

#[test]
fn missing_program_is_a_clear_error() {
    let e = launch("/nonexistent/tracer-test-program", &[]).unwrap_err();
    assert!(matches!(e, LaunchError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("not found"), "{e}");
    let e = launch("tracer-no-such-command-in-path", &[]).unwrap_err();
    assert!(matches!(e, LaunchError::NotFound { .. }), "{e}");
    let dir = temp_dir("noexec");
    let f = dir.join("data.txt");
    std::fs::write(&f, "not a program").unwrap();
    let e = launch(f.to_str().unwrap(), &[]).unwrap_err();
    assert!(matches!(e, LaunchError::NotExecutable { .. }), "{e}");
}
