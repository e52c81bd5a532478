//! Error paths: each is a typed error with a clear message, and the target is left as it was.
mod common;

use common::{cc, line, spawn, temp_dir};
use tracer::inject::{self, InjectError};
use tracer::threads::{attach, list_tasks, thread_state, tracer_pid, AttachError};

#[test]
fn no_such_pid() {
    // PIDs above pid_max (at most 2^22) never exist.
    let e = attach(0x7fff_fff0).unwrap_err();
    assert!(
        matches!(e, AttachError::NoSuchProcess { pid: 0x7fff_fff0 }),
        "{e}"
    );
    assert!(e.to_string().contains("no process with PID"), "{e}");
    assert!(matches!(
        attach(-5).unwrap_err(),
        AttachError::NoSuchProcess { .. }
    ));
}

/// The parent forks a child that makes the parent its tracer with PTRACE_TRACEME.
const TRACED: &str = r#"
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    int go[2]; pipe(go);
    pid_t c = fork();
    if (c == 0) {
        ptrace(PTRACE_TRACEME, 0, 0, 0);
        char b; read(go[0], &b, 1);
        _exit(0);
    }
    for (int i = 0; i < 100; i++) {
        char path[64]; snprintf(path, sizeof path, "/proc/%d/status", c);
        FILE *f = fopen(path, "r"); char l[256]; int traced = 0;
        while (f && fgets(l, sizeof l, f)) if (sscanf(l, "TracerPid: %d", &traced) == 1) break;
        if (f) fclose(f);
        if (traced) break;
        usleep(10000);
    }
    printf("%d\n", c); fflush(stdout);
    char b; read(0, &b, 1);  /* until the test closes our stdin */
    write(go[1], "x", 1);
    int st; waitpid(c, &st, 0);
    printf("child %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    return 0;
}
"#;

#[test]
fn target_already_traced_by_another_process() {
    let dir = temp_dir("traced");
    let exe = cc(&dir, "traced", TRACED, &[]);
    let mut cmd = std::process::Command::new(&exe);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut parent = cmd.spawn().unwrap();
    let mut out = std::io::BufReader::new(parent.stdout.take().unwrap());
    let child: i32 = line(&mut out).parse().unwrap();
    assert_eq!(tracer_pid(child).unwrap(), parent.id() as i32);
    let e = attach(child).unwrap_err();
    match &e {
        AttachError::AlreadyTraced { pid, tracer } => {
            assert_eq!((*pid, *tracer), (child, parent.id() as i32));
        }
        other => panic!("expected AlreadyTraced, got {other}"),
    }
    assert!(e.to_string().contains("already traced by PID"), "{e}");
    // Left alone: still traced by its parent, which can still finish it.
    assert_eq!(tracer_pid(child).unwrap(), parent.id() as i32);
    drop(parent.stdin.take());
    assert_eq!(line(&mut out), "child 0");
    assert!(parent.wait().unwrap().success());
}

const STATIC: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("ready\n"); fflush(stdout); for (int i = 0; i < 100; i++) usleep(10000); printf("done\n"); return 0; }
"#;

#[test]
fn statically_linked_target_cannot_be_injected_and_is_left_running() {
    let dir = temp_dir("static");
    // Needs the static libc (libc6-dev ships libc.a on Debian).
    let exe = cc(&dir, "static", STATIC, &["-static"]);
    let (mut child, mut out) = spawn(&exe, &[], &[]);
    assert_eq!(line(&mut out), "ready");
    let pid = child.id() as i32;
    let mut p = attach(pid).unwrap();
    let e = inject::inject(&mut p, tracer::agent_blob::agent_so()).unwrap_err();
    assert!(matches!(e, InjectError::StaticTarget { .. }), "{e}");
    assert!(e.to_string().contains("statically linked"), "{e}");
    p.detach().unwrap();
    assert_ne!(thread_state(pid, pid).unwrap(), 't');
    assert_eq!(line(&mut out), "done");
    assert!(child.wait().unwrap().success());
}

#[test]
fn target_exiting_is_reported_not_hung() {
    let dir = temp_dir("exit");
    let exe = cc(
        &dir,
        "quick",
        "#include <unistd.h>\nint main(void){usleep(300000);return 3;}",
        &[],
    );
    let (mut child, _out) = spawn(&exe, &[], &[]);
    let pid = child.id() as i32;
    let mut p = attach(pid).unwrap();
    p.resume_all().unwrap();
    // Attached as a non-parent-tracer: the exit is still reported to us.
    let status = loop {
        if let Some(s) = p.service(std::time::Duration::from_millis(50)).unwrap() {
            break s;
        }
    };
    assert_eq!(status, tracer::threads::ExitStatus::Code(3));
    let e = p.stop_all().unwrap_err();
    assert!(matches!(e, AttachError::Exited { .. }), "{e}");
    drop(p);
    // We are both its parent and its tracer: our wait already reaped it.
    assert!(child
        .try_wait()
        .is_err_and(|e| e.raw_os_error() == Some(libc::ECHILD)));
}

/// The only thread spins forever inside libc (on a spin lock nobody releases): it never
/// leaves libc nor sleeps, so no thread can be trusted to call pthread_create.
const SPINNING: &str = r#"
#include <pthread.h>
#include <stdio.h>
int main(void) {
    pthread_spinlock_t l; pthread_spin_init(&l, 0); pthread_spin_lock(&l);
    printf("ready\n"); fflush(stdout);
    pthread_spin_lock(&l);
    return 0;
}
"#;

#[test]
fn no_safe_thread_times_out_and_leaves_the_target_as_it_was() {
    let dir = temp_dir("nosafe");
    let exe = cc(&dir, "spinning", SPINNING, &["-pthread"]);
    let (child, mut out) = spawn(&exe, &[], &[]);
    // The program never ends by itself: kill it even when an assertion fails.
    let mut child = KillOnDrop(child);
    assert_eq!(line(&mut out), "ready");
    let pid = child.0.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(50));
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let fds_before = fd_list(pid);
    let mut p = attach(pid).unwrap();
    let t = std::time::Instant::now();
    let e = inject::inject_with_timeout(
        &mut p,
        tracer::agent_blob::agent_so(),
        "tracer-agent",
        std::time::Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(matches!(e, InjectError::NoSafeThread { .. }), "{e}");
    assert!(e.to_string().contains("nothing was changed"), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    p.detach().unwrap();
    let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert_eq!(
        maps_before, maps_after,
        "scratch page unmapped, nothing loaded"
    );
    assert_eq!(fds_before, fd_list(pid), "memfd closed again");
    assert_eq!(tracer_pid(pid).unwrap(), 0);
    let running = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        thread_state(pid, pid).unwrap() == 'R'
    });
    assert!(running, "back to spinning");
    assert_eq!(list_tasks(pid).unwrap(), vec![pid], "no thread was added");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fd_list(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
