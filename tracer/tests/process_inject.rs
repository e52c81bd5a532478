//! Injecting shared objects with the target's own dlopen, into busy multi-threaded programs.
mod common;

use std::time::Duration;

use common::{cc, line, spawn, temp_dir};
use tracer::inject::{self, InjectError};
use tracer::threads::attach;

const LIB: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int injected_flag;
__attribute__((constructor)) static void init(void) {
    injected_flag = 42;
    const char *p = getenv("TRACER_TEST_MARKER");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("loaded", f); fclose(f); } }
}
long triple_plus_flag(long x) { return 3 * x + injected_flag; }
"#;

/// Threads hammering malloc/free (so some are inside malloc when stopped) and a main thread
/// mostly asleep.
const BUSY: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static volatile int stop;
static void *churn(void *a) {
    (void)a;
    while (!stop) { char *p = malloc(100 + rand() % 4000); memset(p, 1, 100); free(p); }
    return 0;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 3;
    pthread_t t[8];
    for (int i = 0; i < n; i++) pthread_create(&t[i], 0, churn, 0);
    printf("ready\n"); fflush(stdout);
    for (int i = 0; i < 400; i++) usleep(10000);
    stop = 1;
    for (int i = 0; i < n; i++) pthread_join(t[i], 0);
    printf("done\n");
    return 0;
}
"#;

#[test]
fn inject_a_library_into_a_busy_program_then_call_it() {
    let dir = temp_dir("inject");
    let lib = cc(&dir, "libtest.so", LIB, &["-shared", "-fPIC"]);
    let exe = cc(&dir, "busy", BUSY, &["-pthread"]);
    let marker = dir.join("marker");
    let (mut child, mut out) = spawn(
        &exe,
        &["3"],
        &[("TRACER_TEST_MARKER", marker.to_str().unwrap())],
    );
    assert_eq!(line(&mut out), "ready");
    let pid = child.id() as i32;

    let mut p = attach(pid).unwrap();
    let bytes = std::fs::read(&lib).unwrap();
    let inj = inject::inject_named(&mut p, &bytes, "tracer-test-lib").unwrap();
    assert!(p.all_stopped(), "every thread stopped again after dlopen");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "loaded",
        "constructor ran"
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        inj.path_in_target.contains("tracer-test-lib"),
        "{}",
        inj.path_in_target
    );
    assert!(maps.contains(&inj.path_in_target));
    assert!(maps.contains(&format!("{:x}-", inj.base)));
    // The name the loader keeps (what debuggers open) is a file holding the library.
    assert_eq!(std::fs::read(&inj.path_in_target).unwrap(), bytes);
    // The memfd was closed again.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        assert!(
            !target.to_string_lossy().contains("memfd"),
            "leaked fd {target:?}"
        );
    }

    let f = inject::dlsym(&mut p, inj.handle, "triple_plus_flag").unwrap();
    assert!(f >= inj.base);
    let fns = inject::libc_functions(pid).unwrap();
    let r = inject::call_safely(&mut p, &fns, f, &[21], Duration::from_secs(5)).unwrap();
    assert_eq!(r, 63 + 42);

    let e = inject::dlsym(&mut p, inj.handle, "no_such_function").unwrap_err();
    assert!(matches!(e, InjectError::SymbolNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("undefined symbol"),
        "dlerror text included: {e}"
    );

    // Not an ELF file: dlopen fails and dlerror says why.
    let e = inject::inject(&mut p, &[b'x'; 4096]).unwrap_err();
    assert!(matches!(e, InjectError::DlopenFailed { .. }), "{e}");
    assert!(e.to_string().contains("ELF"), "{e}");
    // ... and the file written for it is gone again.
    let dir = std::path::Path::new(&inj.path_in_target).parent().unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        if f.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("tracer-lib-")
        {
            assert_ne!(std::fs::read(&f).ok(), Some(vec![b'x'; 4096]), "{f:?} left");
        }
    }

    p.detach().unwrap();
    assert_eq!(line(&mut out), "done");
    assert!(child.wait().unwrap().success());
}

#[test]
fn inject_the_real_agent_repeatedly() {
    let dir = temp_dir("agent");
    let exe = cc(&dir, "busy", BUSY, &["-pthread"]);
    let (mut child, mut out) = spawn(&exe, &["2"], &[]);
    assert_eq!(line(&mut out), "ready");
    let pid = child.id() as i32;
    let agent = tracer::agent_blob::agent_so();
    assert_eq!(&agent[..4], b"\x7fELF");
    let mut handles = Vec::new();
    for round in 0..3 {
        let mut p = attach(pid).unwrap();
        let inj = inject::inject_named(&mut p, agent, "tracer-agent").unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let starts = maps
            .lines()
            .filter(|l| l.ends_with(&inj.path_in_target) && l.contains(" 00000000 "))
            .count();
        assert_eq!(starts, 1, "round {round}: agent mapped once:\n{maps}");
        assert!(inj.handle != 0);
        handles.push(inj.handle);
        p.resume_all().unwrap();
        p.detach().unwrap();
    }
    // The same bytes are the same file: the loader hands back the loaded copy.
    assert!(handles.iter().all(|&h| h == handles[0]), "{handles:x?}");
    assert_eq!(line(&mut out), "done");
    assert!(child.wait().unwrap().success());
}
