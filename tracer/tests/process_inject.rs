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

/// One thread spins in code mapped shared and read-only (as the agent's trampolines are):
/// `/proc/PID/mem` cannot write there, so a remote syscall must borrow another thread's
/// `rip` to create (and remove) the scratch page.
const SHARED_CODE: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
static void *spin(void *code) { ((void (*)(void))code)(); return 0; }
int main(void) {
    int fd = memfd_create("shared-code", 0);
    unsigned char loop[2] = {0xeb, 0xfe}; /* jmp . */
    if (write(fd, loop, 2) != 2 || ftruncate(fd, 4096)) return 1;
    void *code = mmap(0, 4096, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0);
    if (code == MAP_FAILED) return 1;
    pthread_t t;
    pthread_create(&t, 0, spin, code);
    printf("ready %p\n", code); fflush(stdout);
    for (;;) pause();
}
"#;

#[test]
fn remote_syscalls_work_when_a_thread_is_stopped_in_shared_code() {
    let dir = temp_dir("sharedcode");
    let exe = cc(&dir, "sharedcode", SHARED_CODE, &["-pthread"]);
    let (child, mut out) = spawn(&exe, &[], &[]);
    // The program never ends by itself: kill it even when an assertion fails.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = KillOnDrop(child);
    let ready = line(&mut out);
    let code = common::hex(ready.strip_prefix("ready ").unwrap());
    let pid = child.0.id() as i32;
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // The thread may not have reached the shared code yet when "ready" is printed.
    let (mut p, spinner) = (0..500)
        .find_map(|_| {
            let p = attach(pid).unwrap();
            let found = p.threads().into_iter().find(|&t| {
                p.regs(t)
                    .is_ok_and(|r| (code..code + 4096).contains(&r.rip))
            });
            match found {
                Some(t) => Some((p, t)),
                None => {
                    p.detach().unwrap();
                    std::thread::sleep(Duration::from_millis(10));
                    None
                }
            }
        })
        .expect("a thread stopped in the shared code");
    tracer::remote_call::ensure_scratch(&mut p, spinner).unwrap();
    let r = tracer::remote_call::syscall(&mut p, spinner, libc::SYS_getpid, &[]).unwrap();
    assert_eq!(r, pid as i64);
    p.detach().unwrap();
    let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert_eq!(maps_before, maps_after, "scratch page removed");
}
