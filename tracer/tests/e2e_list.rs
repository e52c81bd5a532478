//! `tracer list` end to end: the functions of an ELF file or of a live process that match
//! a pattern, with whether each can be probed.

mod common;
use common::*;

fn list(args: &[&str]) -> Vec<String> {
    let mut a = vec!["list"];
    a.extend_from_slice(args);
    let out = tracer_output(&a);
    assert!(
        out.status.success(),
        "tracer list {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `tracer list PATH PATTERN` prints exactly the matching functions of the file, at
/// file addresses, refusing the 3-byte one; a pattern matching nothing is an error.
#[test]
fn list_file() {
    let dir = temp_dir("listfile");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let e = exe.to_str().unwrap();

    let good = list(&[e, "go*"]);
    assert_eq!(good.len(), 1, "{good:?}");
    assert!(good[0].starts_with("tiny:good  0x"), "{good:?}");
    assert!(good[0].ends_with("probeable"), "{good:?}");
    // A PIE's file addresses are small; a live process's are not.
    let addr = hex(good[0].split_whitespace().nth(1).unwrap());
    assert!(addr < 0x10_0000, "{good:?}");

    let tiny = list(&[e, "t?ny"]);
    assert_eq!(tiny.len(), 1, "{tiny:?}");
    assert!(
        tiny[0].contains("tiny:tiny") && tiny[0].contains("size 3") && tiny[0].contains("refused"),
        "{tiny:?}"
    );

    build_target(&dir);
    let lib = dir.join("libtarget.so");
    let work = list(&[lib.to_str().unwrap(), "w*k"]);
    assert_eq!(work.len(), 1, "{work:?}");
    assert!(work[0].starts_with("libtarget.so:work  0x"), "{work:?}");

    let out = tracer_output(&["list", e, "zzz*"]);
    assert_one_line_error(&out, &["zzz*"]);
}

/// `tracer list PID PATTERN` prints the matching functions of the executable and its
/// libraries at their run-time addresses, without disturbing the process.
#[test]
fn list_pid() {
    let dir = temp_dir("listpid");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    let first = t.line();
    let f: Vec<&str> = first.split_whitespace().collect();
    let (tiny, good) = (hex(f[1]), hex(f[2]));
    let pid = t.pid().to_string();

    let main = list(&[&pid, "main:*"]);
    let find = |name: &str| {
        main.iter()
            .find(|l| l.starts_with(&format!("tiny:{name}  ")))
            .unwrap_or_else(|| panic!("{name} not listed: {main:?}"))
    };
    assert!(
        find("good").contains(&format!("{good:#x}")) && find("good").ends_with("probeable"),
        "{main:?}"
    );
    assert!(
        find("tiny").contains(&format!("{tiny:#x}")) && find("tiny").contains("refused"),
        "{main:?}"
    );
    find("main");
    assert!(
        !main.iter().any(|l| l.contains("malloc")),
        "libc leaked into main:*: {main:?}"
    );

    let malloc = list(&[&pid, "libc:mallo?"]);
    assert_eq!(malloc.len(), 1, "{malloc:?}");
    assert!(malloc[0].starts_with("libc.so.6:malloc  0x7"), "{malloc:?}");

    assert_eq!(tracer_pid(t.pid()), 0);
    let (last, ok) = t.finish();
    assert!(ok && last == "ok 1", "target disturbed: {last:?}");
}

/// A statically linked process cannot load the agent, so `attach` refuses it; `tracer
/// list PID` says the same for every function instead of "probeable".
#[test]
fn list_static_process_says_what_attach_says() {
    let dir = temp_dir("liststatic");
    let exe = cc(&dir, "tiny_static", TINY_C, &["-static", "-pthread"]);
    let mut t = Target::spawn(&exe, &[]);
    t.line();
    let pid = t.pid().to_string();

    let rows = list(&[&pid, "main:good"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let attach = tracer_output(&["attach", "-p", "main:good", &pid]);
    let refusal = assert_one_line_error(&attach, &["statically linked"]);
    let why = refusal.trim_start_matches("tracer: ");
    assert!(
        rows[0].ends_with(&format!("refused: {why}")),
        "list: {rows:?}, attach: {refusal}"
    );
    let (last, ok) = t.finish();
    assert!(ok && last.starts_with("ok "), "target disturbed: {last:?}");
}

const IFUNC_C: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int twice_impl(int x) { return x * 2 + (x > 1000 ? x / 3 : 0); }
static int (*resolve_twice(void))(int) { return twice_impl; }
int twice(int) __attribute__((ifunc("resolve_twice")));
int main(void) {
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    printf("ok %d\n", twice(21));
    return 0;
}
"#;

/// An IFUNC row has a verdict: for a process, that of the implementation the loader
/// picked (where the probe lands); for a file, that it is resolved at attach time.
#[test]
fn list_gives_ifunc_rows_a_verdict() {
    let dir = temp_dir("listifunc");
    let exe = cc(&dir, "ifunc", IFUNC_C, &["-pie", "-fPIE"]);
    let file_rows = list(&[exe.to_str().unwrap(), "twice"]);
    assert_eq!(file_rows.len(), 1, "{file_rows:?}");
    assert!(
        file_rows[0].ends_with("resolved at attach time"),
        "{file_rows:?}"
    );

    let mut t = Target::spawn(&exe, &[]);
    assert_eq!(t.line(), "ready");
    let pid = t.pid().to_string();
    let rows = list(&[&pid, "main:twice*"]);
    let row = |name: &str| {
        rows.iter()
            .find(|l| l.starts_with(&format!("ifunc:{name}  ")))
            .unwrap_or_else(|| panic!("{name} not listed: {rows:?}"))
            .clone()
    };
    let impl_row = row("twice_impl");
    let impl_addr = impl_row.split_whitespace().nth(1).unwrap().to_string();
    assert!(impl_row.ends_with("  probeable"), "{rows:?}");
    assert!(
        row("twice").ends_with("ifunc, lands on twice_impl: probeable"),
        "{rows:?} (twice_impl at {impl_addr})"
    );
    let (last, ok) = t.finish();
    assert!(ok && last == "ok 42", "target disturbed: {last:?}");
}

/// A kernel thread and a zombie exist but run no program: list and attach say which,
/// not "no process with PID".
#[test]
fn kernel_threads_and_zombies_are_named() {
    // A zombie: a child of this test that exited and was not waited for.
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let zpid = child.id() as i32;
    let stat = || std::fs::read_to_string(format!("/proc/{zpid}/stat")).unwrap_or_default();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || stat()
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))),
        "the child never became a zombie: {}",
        stat()
    );
    let z = zpid.to_string();
    for args in [vec!["list", &z], vec!["attach", "-p", "libc:malloc", &z]] {
        let out = tracer_output(&args);
        assert_one_line_error(&out, &[&format!("PID {zpid}"), "zombie", "reap"]);
    }
    let _ = child.wait();

    // A kernel thread, if this PID namespace shows one (kthreadd is PID 2 on a host).
    let kthread = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let flags: u64 = s
                        .rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(7)?
                        .parse()
                        .ok()?;
                    Some(flags & 0x0020_0000 != 0)
                })
                .unwrap_or(false)
        });
    if let Some(k) = kthread {
        let k = k.to_string();
        for args in [vec!["list", &k], vec!["attach", "-p", "libc:malloc", &k]] {
            let out = tracer_output(&args);
            assert_one_line_error(&out, &[&format!("PID {k}"), "kernel thread"]);
        }
    }
}

const LEADER_EXITS_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) int worker_step(int x) { return x * 5 + 1; }
static void *worker(void *arg) {
    char line[16];
    printf("ready\n");
    fflush(stdout);
    fgets(line, sizeof line, stdin);
    printf("ok %d\n", worker_step(8));
    fflush(stdout);
    return arg;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, worker, 0);
    pthread_exit(0);
}
"#;

/// A process whose main thread called `pthread_exit` shows the zombie state on its
/// PID while its other threads run the program: it is listed, not called a zombie.
#[test]
fn a_process_whose_main_thread_exited_is_no_zombie() {
    let dir = temp_dir("leader");
    let exe = cc(&dir, "leader", LEADER_EXITS_C, &["-pthread"]);
    let mut t = Target::spawn(&exe, &[]);
    assert_eq!(t.line(), "ready");
    let pid = t.pid();
    let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || stat()
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))),
        "the main thread never exited: {}",
        stat()
    );
    let rows = list(&[&pid.to_string(), "main:worker_step"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].ends_with("  probeable"), "{rows:?}");
    let (last, ok) = t.finish();
    assert!(ok && last == "ok 41", "target disturbed: {last:?}");
}

const LIBIFUNC_C: &str = r#"
__attribute__((noinline)) int thrice_impl(int x) { return x * 3 + (x > 1000 ? x / 7 : 0); }
static int (*resolve_thrice(void))(int) { return thrice_impl; }
int thrice(int) __attribute__((ifunc("resolve_thrice")));
"#;

const USE_IFUNC_C: &str = r#"
#include <stdio.h>
int thrice(int);
int main(void) {
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    printf("ok %d\n", thrice(14));
    return 0;
}
"#;

/// An IFUNC of a library that the library itself never calls has no IRELATIVE slot;
/// the program importing it, bound at load time (`-z now`), holds the implementation in
/// its GOT: that is where the probe lands, and what `list` says.
#[test]
fn list_finds_an_imported_ifunc_through_the_importer() {
    let dir = temp_dir("listifunc2");
    cc(&dir, "libifunc.so", LIBIFUNC_C, &["-shared", "-fPIC"]);
    let exe = cc(
        &dir,
        "useifunc",
        USE_IFUNC_C,
        &["-L.", "-lifunc", "-Wl,-rpath,$ORIGIN", "-Wl,-z,now"],
    );
    let mut t = Target::spawn(&exe, &[]);
    assert_eq!(t.line(), "ready");
    let rows = list(&[&t.pid().to_string(), "libifunc:thrice"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].ends_with("ifunc, lands on thrice_impl: probeable"),
        "{rows:?}"
    );
    let (last, ok) = t.finish();
    assert!(ok && last == "ok 42", "target disturbed: {last:?}");
}

/// The agent a session leaves loaded is the tracer's own code: after an attach, `list
/// PID '*:*'` does not show it and a spec naming its functions matches nothing (a probe
/// there would run the trampolines' own code from a trampoline).
#[test]
fn the_agent_is_never_listed_nor_probed() {
    let dir = temp_dir("listagent");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    t.line();
    let pid = t.pid().to_string();
    let out = tracer_output(&["attach", &pid, "-p", "libc:malloc", "--duration", "0"]);
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("tracer-agent"), "agent not loaded: {maps}");

    let all = list(&[&pid, "*:*"]);
    assert!(all.iter().any(|l| l.starts_with("libc.so.6:malloc ")));
    let agent: Vec<&String> = all.iter().filter(|l| l.contains("tracer-agent")).collect();
    assert!(
        agent.is_empty(),
        "agent listed ({} rows), first: {:?}",
        agent.len(),
        agent.first()
    );

    let out = tracer_output(&["attach", &pid, "-p", "*:tracer_agent_*", "--duration", "0"]);
    assert_one_line_error(&out, &["tracer_agent_"]);

    let (last, ok) = t.finish();
    assert!(ok && last == "ok 1", "target disturbed: {last:?}");
}
