//! Sessions after sessions on one process: probe slots and trampolines are reused, the
//! counter region grows when a session needs more, and patches left by a tracer that was
//! SIGKILLed are adopted by the next session and restored when it detaches.
//!
//! The target is a generated library of N small functions and a driver whose threads
//! call each of them K times per "go K" line on stdin, counting their own calls: every
//! session's hits must equal what the program says it called while the probes were live.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

/// `libmany.so` with `n` probeable functions `m00000`.. (7 bytes each at -O2: `lea`,
/// `add`, `ret`), and `many` driving it.
fn build_many(dir: &Path, n: usize) -> PathBuf {
    let mut lib = String::from("#include <stdint.h>\n");
    for i in 0..n {
        lib.push_str(&format!(
            "__attribute__((noinline)) int m{i:05}(int x) {{ return x * 3 + {i} + 1; }}\n"
        ));
    }
    lib.push_str("int (*const many_table[])(int) = {\n");
    for i in 0..n {
        lib.push_str(&format!("m{i:05},\n"));
    }
    lib.push_str(&format!(
        "}};
uint64_t many_calls;
/* Calls each function k times, counting every call. */
int64_t many_run(int k) {{
    int64_t s = 0;
    for (int r = 0; r < k; r++)
        for (int i = 0; i < {n}; i++) {{
            s = s * 31 + many_table[i](r + i);
            __atomic_add_fetch(&many_calls, 1, __ATOMIC_RELAXED);
        }}
    return s;
}}
"
    ));
    cc(dir, "libmany.so", &lib, &["-O2", "-shared", "-fPIC"]);
    let main = r#"
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
extern uint64_t many_calls;
int64_t many_run(int k);
static int k;
static int64_t sums[THREADS];
static void *work(void *p) {
    sums[(intptr_t)p] = many_run(k);
    return 0;
}
/* "go K": THREADS threads each call every function K times, printed as
 * "done CALLS SUM"; "stop" (or EOF): "end TOTAL". Between rounds only the main thread
 * exists, blocked reading stdin. */
int main(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) && strncmp(line, "go ", 3) == 0) {
        uint64_t before = many_calls;
        pthread_t th[THREADS];
        int64_t s = 0;
        k = atoi(line + 3);
        for (intptr_t i = 0; i < THREADS; i++)
            pthread_create(&th[i], 0, work, (void *)i);
        for (int i = 0; i < THREADS; i++) {
            pthread_join(th[i], 0);
            s = s * 7 + sums[i];
        }
        printf("done %llu %lld\n", (unsigned long long)(many_calls - before), (long long)s);
        fflush(stdout);
    }
    printf("end %llu\n", (unsigned long long)many_calls);
    return 0;
}
"#;
    cc(
        dir,
        "many",
        main,
        &[
            "-O2",
            "-pthread",
            &format!("-DTHREADS={THREADS}"),
            "-L.",
            "-lmany",
            "-Wl,-rpath,$ORIGIN",
        ],
    )
}

/// Threads `many` runs per round, each calling every function K times.
const THREADS: u64 = 4;

/// A running `many`.
struct Many(Target);

impl Many {
    fn start(exe: &Path) -> Many {
        let mut t = Target::spawn(exe, &[]);
        assert_eq!(t.line(), "ready");
        Many(t)
    }

    /// One round of `k` calls of each function; returns the program's line
    /// `done CALLS SUM`.
    fn go(&mut self, k: u64) -> String {
        let i = self.0.stdin.as_mut().expect("stdin");
        writeln!(i, "go {k}").expect("write to target");
        i.flush().expect("flush");
        let l = self.0.line();
        assert!(
            l.starts_with("done "),
            "unexpected line from the target: {l:?}"
        );
        l
    }

    fn calls(done: &str) -> u64 {
        done.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

/// A `tracer attach` running in the background, probes live.
struct Attached {
    child: Child,
    stderr: BufReader<std::process::ChildStderr>,
    json: PathBuf,
    /// Its stderr up to the "live" line.
    said: String,
}

impl Attached {
    fn start(pid: i32, dir: &Path, tag: &str, args: &[&str]) -> Attached {
        let json = dir.join(format!("{tag}.json"));
        let mut child = tracer()
            .args(["attach", &pid.to_string(), "--json", "-o"])
            .arg(&json)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tracer");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut said = String::new();
        loop {
            let mut l = String::new();
            if stderr.read_line(&mut l).expect("read tracer stderr") == 0 {
                let st = child.wait().expect("wait tracer");
                panic!("{tag}: tracer ended ({st}) before its probes were live: {said}");
            }
            said.push_str(&l);
            if l.contains("live in") {
                break;
            }
        }
        Attached {
            child,
            stderr,
            json,
            said,
        }
    }

    /// Ctrl-C: detach, then the reports.
    fn detach(mut self) -> Vec<serde_json::Value> {
        // SAFETY: kill() of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let st = self.child.wait().expect("wait tracer");
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stderr, &mut rest);
        assert!(st.success(), "tracer failed ({st}): {}{rest}", self.said);
        json_lines(&std::fs::read_to_string(&self.json).expect("read -o file"))
    }

    /// SIGKILL: the tracer dies with its probes live.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL tracer");
        self.child.wait().expect("wait tracer");
    }
}

/// Every probe reported hit exactly `k` times (and returned `k` times with `-x`).
fn assert_hits(reports: &[serde_json::Value], n: usize, k: u64, exits: bool, what: &str) {
    assert_eq!(reports.len(), n, "{what}: {n} probes expected");
    for r in reports {
        assert_eq!(num(r, "hits"), k, "{what}: {r}");
        assert_eq!(num(r, "skipped"), 0, "{what}: {r}");
        if exits {
            assert_eq!(num(r, "exits"), k, "{what}: {r}");
        }
    }
}

/// The executable mappings of `libmany.so` in `pid` hold the same bytes as the file.
fn assert_text_as_in_file(pid: i32, lib: &Path, what: &str) {
    if let Some(d) = text_difference(pid, "/libmany.so") {
        panic!("{what}: {d}");
    }
    assert!(lib.exists());
}

/// Where the executable mappings of the object whose path ends with `name` in `pid`
/// first differ from its file.
fn text_difference(pid: i32, name: &str) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut seen = 0;
    for l in maps.lines().filter(|l| l.ends_with(name)) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if !f[1].contains('x') {
            continue;
        }
        let file = std::fs::read(f[5]).expect("read the mapped file");
        let (start, end) = f[0].split_once('-').unwrap();
        let (start, end) = (hex(start), hex(end));
        let off = usize::from_str_radix(f[2], 16).unwrap();
        let len = ((end - start) as usize).min(file.len() - off);
        let now = read_mem(pid, start, len);
        if let Some(k) = (0..len).find(|&k| now[k] != file[off + k]) {
            return Some(format!(
                "{} differs from its file at {:#x}: {:02x?} instead of {:02x?}",
                f[5],
                start + k as u64,
                &now[k..(k + 8).min(len)],
                &file[off + k..(off + k + 8).min(off + len)]
            ));
        }
        seen += len;
    }
    assert!(seen > 0, "no executable mapping of {name}");
    None
}

/// Bytes of the agent's code (trampolines: its `tracer-code` memfds' mappings, both
/// views, since the agent closes those descriptors once mapped) and of its shared
/// counters memfd (found through its fd table) in `pid`.
fn agent_memory(pid: i32) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let code = maps
        .lines()
        .filter(|l| l.contains("/memfd:tracer-code"))
        .map(|l| {
            let range = l.split(' ').next().expect("range");
            let (a, b) = range.split_once('-').expect("start-end");
            u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap()
        })
        .sum();
    let mut shared = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read fd table") {
        let path = e.expect("fd entry").path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if target.to_string_lossy().starts_with("/memfd:tracer-shared") {
            shared += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        }
    }
    (code, shared)
}

/// 100 sessions of 58 probes on one process: each counts exactly the calls made while it
/// was live (slots reused and zeroed, none exhausted), the agent's trampolines and
/// counters take no more memory after the last session than after the first, and the
/// program computes what an untraced copy computes.
#[test]
fn hundred_sessions_of_58_probes_reuse_their_slots() {
    let dir = temp_dir("sessions58");
    let exe = build_many(&dir, 58);
    let mut t = Many::start(&exe);
    let mut reference = Many::start(&exe);
    let pid = t.0.pid();
    let mut after_first = (0, 0);
    for cycle in 0..100u64 {
        let k = 1 + cycle % 7;
        let a = Attached::start(pid, &dir, &format!("c{cycle}"), &["-p", "libmany:m0*"]);
        let done = t.go(k);
        assert_eq!(Many::calls(&done), 58 * THREADS * k);
        assert_eq!(done, reference.go(k), "cycle {cycle}: computed differently");
        let reports = a.detach();
        assert_hits(&reports, 58, THREADS * k, false, &format!("cycle {cycle}"));
        if cycle == 0 {
            after_first = agent_memory(pid);
            assert!(after_first.0 > 0 && after_first.1 > 0, "{after_first:?}");
        }
    }
    assert_eq!(
        agent_memory(pid),
        after_first,
        "trampoline and counter memory (bytes) grew from the first session to the last"
    );
    assert_text_as_in_file(pid, &dir.join("libmany.so"), "after 100 sessions");
    assert_eq!(t.0.finish(), reference.0.finish());
}

/// A process first probed at 10 sites, then 3 times at 10,000: the counter region grows
/// past its first size, then the same 10,000 slots serve each later session. Then a
/// tracer is killed with the 10,000 live, and the next session adopts and restores them.
#[test]
fn three_sessions_of_10000_probes_on_a_generated_library() {
    const N: usize = 10_000;
    let dir = temp_dir("sessions10k");
    let exe = build_many(&dir, N);
    let mut t = Many::start(&exe);
    let pid = t.0.pid();

    let a = Attached::start(pid, &dir, "small", &["-p", "libmany:m0000?"]);
    t.go(2);
    assert_hits(&a.detach(), 10, THREADS * 2, false, "10 probes");

    for cycle in 0..3u64 {
        let k = cycle + 1;
        let a = Attached::start(pid, &dir, &format!("big{cycle}"), &["-p", "libmany:m0*"]);
        let done = t.go(k);
        assert_eq!(Many::calls(&done), N as u64 * THREADS * k);
        let reports = a.detach();
        assert_hits(
            &reports,
            N,
            THREADS * k,
            false,
            &format!("session {cycle} of {N}"),
        );
    }
    assert_text_as_in_file(pid, &dir.join("libmany.so"), "after 3 sessions");

    // 10,000 patches left by a killed tracer are all adopted, and all restored.
    let a = Attached::start(pid, &dir, "killed", &["-p", "libmany:m0*"]);
    a.kill();
    assert!(wait_until(Duration::from_secs(10), || tracer_pid(pid) == 0));
    let a = Attached::start(pid, &dir, "adopting", &["-p", "libmany:m0000?"]);
    assert!(
        a.said.contains(&format!("adopted {N} probe(s)")),
        "{}",
        a.said
    );
    t.go(2);
    assert_hits(&a.detach(), 10, THREADS * 2, false, "after adopting 10,000");
    assert_text_as_in_file(pid, &dir.join("libmany.so"), "after the adopting session");
    let (last, ok) = t.0.finish();
    assert!(ok, "{last}");
}

/// A few patches left by a killed tracer (no more than the agent lists in its prepare
/// call, `LIVE_CAP_WITH_PREPARE`) are adopted in the same remote call that prepares the
/// next session's probes: all of them, once, counted exactly, and restored at its detach.
#[test]
fn a_few_patches_of_a_killed_tracer_are_adopted_with_the_prepare_call() {
    let dir = temp_dir("killed-few");
    let exe = build_many(&dir, 12);
    let lib = dir.join("libmany.so");
    let mut t = Many::start(&exe);
    let mut reference = Many::start(&exe);
    let pid = t.0.pid();

    let a = Attached::start(pid, &dir, "killed", &["-p", "libmany:m0*"]);
    assert_eq!(t.go(3), reference.go(3));
    a.kill();
    assert!(
        wait_until(Duration::from_secs(10), || tracer_pid(pid) == 0),
        "target still traced after its tracer died"
    );
    assert!(
        text_difference(pid, "/libmany.so").is_some(),
        "the killed tracer's patches are not in the code"
    );

    let a = Attached::start(pid, &dir, "adopting", &["-p", "libmany:m0000?"]);
    let notes: Vec<&str> = a.said.lines().filter(|l| l.contains("adopted")).collect();
    assert_eq!(notes.len(), 1, "{}", a.said);
    assert!(
        notes[0].contains("adopted 12 probe(s) left by an earlier tracer"),
        "{}",
        a.said
    );
    assert_eq!(t.go(4), reference.go(4));
    assert_hits(&a.detach(), 10, THREADS * 4, false, "taken-over probes");
    assert_text_as_in_file(pid, &lib, "after the adopting session");

    let a = Attached::start(pid, &dir, "after", &["-p", "libmany:m0*"]);
    assert!(!a.said.contains("adopted"), "{}", a.said);
    assert_eq!(t.go(5), reference.go(5));
    assert_hits(&a.detach(), 12, THREADS * 5, false, "after adoption");
    assert_text_as_in_file(pid, &lib, "at the end");
    assert_eq!(t.0.finish(), reference.0.finish());
}

/// SIGKILL the tracer with 58 entry+exit probes live: the program keeps computing right
/// with them; the next session adopts them (says so once), takes over the 10 it asks for,
/// counts exactly, and at its detach every byte of the library is back.
#[test]
fn patches_of_a_killed_tracer_are_adopted_and_restored() {
    let dir = temp_dir("killed");
    let exe = build_many(&dir, 58);
    let lib = dir.join("libmany.so");
    let mut t = Many::start(&exe);
    let mut reference = Many::start(&exe);
    let pid = t.0.pid();

    let a = Attached::start(pid, &dir, "killed", &["-x", "-p", "libmany:m0*"]);
    assert_eq!(t.go(3), reference.go(3));
    a.kill();
    assert!(
        wait_until(Duration::from_secs(10), || tracer_pid(pid) == 0),
        "target still traced after its tracer died"
    );
    assert!(
        text_difference(pid, "/libmany.so").is_some(),
        "the killed tracer's patches are not in the code"
    );
    // Exit probes come with the agent's unwinder hooks (the agent itself loads
    // libgcc_s): left live too, adopted, not counted as the user's.
    assert!(
        text_difference(pid, "/libgcc_s.so.1").is_some(),
        "the unwinder hooks are not in the code"
    );
    // Orphaned probes still run, and the program computes what it computes untraced.
    assert_eq!(t.go(2), reference.go(2));

    let a = Attached::start(pid, &dir, "adopting", &["-p", "libmany:m0000?"]);
    let notes: Vec<&str> = a.said.lines().filter(|l| l.contains("adopted")).collect();
    assert_eq!(notes.len(), 1, "{}", a.said);
    assert!(
        notes[0].contains("adopted 58 probe(s) left by an earlier tracer"),
        "{}",
        a.said
    );
    assert_eq!(t.go(4), reference.go(4));
    assert_hits(&a.detach(), 10, THREADS * 4, false, "taken-over probes");
    assert_text_as_in_file(pid, &lib, "after the adopting session");
    assert_eq!(tracer_pid(pid), 0);

    // Nothing is left to adopt; the entry+exit probes of the killed session are reused
    // with their counters zeroed.
    let a = Attached::start(pid, &dir, "after", &["-x", "-p", "libmany:m0*"]);
    assert!(!a.said.contains("adopted"), "{}", a.said);
    assert_eq!(t.go(5), reference.go(5));
    assert_hits(&a.detach(), 58, THREADS * 5, true, "after adoption");
    assert_text_as_in_file(pid, &lib, "at the end");
    if let Some(d) = text_difference(pid, "/libgcc_s.so.1") {
        panic!("at the end: {d}");
    }
    assert_eq!(t.0.finish(), reference.0.finish());
}

/// While a tracer's session is live (the tracer detached from the target and waits), a
/// second tracer neither takes its probes over nor removes them: it is refused in one
/// line naming the first tracer, and the first one's counts go on exactly.
#[test]
fn a_live_session_is_not_taken_over_by_another_tracer() {
    let dir = temp_dir("twotracers");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    let first_line = t.line();
    let good = hex(first_line.split_whitespace().nth(2).expect("GOOD address"));
    let original = read_mem(t.pid(), good, 5);
    let pid = t.pid().to_string();

    let first = Attached::start(t.pid(), &dir, "first", &["-p", "main:good"]);
    let patched = read_mem(t.pid(), good, 5);
    assert_ne!(patched, original, "first session did not patch");
    let out = tracer_output(&["attach", &pid, "-p", "main:good", "--duration", "0"]);
    let holder = format!("pid {}", first.child.id());
    assert_one_line_error(
        &out,
        &["already has live probes from another tracer", &holder],
    );
    assert_eq!(
        read_mem(t.pid(), good, 5),
        patched,
        "second tracer touched the patch"
    );

    // The first session still owns its probe: it counts and restores.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let reports = first.detach();
    let r = reports
        .iter()
        .find(|r| r["probe"] == "main:good")
        .expect("main:good reported");
    assert!(r["hits"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(read_mem(t.pid(), good, 5), original);
    let (last, ok) = t.finish();
    assert!(ok && last.starts_with("ok"), "target disturbed: {last:?}");
}

const FORK_CODE_C: &str = include_str!("programs/fork_code.c");

/// A line to `fork_code` and its answer.
fn ask(t: &mut Target, line: &str) -> String {
    let stdin = t.stdin.as_mut().expect("stdin");
    stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
    stdin.flush().unwrap();
    t.line()
}

/// The hits (and exits) of `probe` in a report.
fn hits_of(reports: &[serde_json::Value], probe: &str) -> (u64, u64) {
    let r = report(reports, probe);
    (num(r, "hits"), r["exits"].as_u64().unwrap_or(0))
}

/// A parent probed once (so its agent has trampoline chunks), then forked: the child
/// shares those chunks' pages with it. Sessions in both processes afterwards, the
/// parent probing `b` and the child `c`, in the order `parent_first` says, must each put
/// their code in memory of their own: both processes' sums stay those of the untraced
/// run, and each session counts exactly the calls of its own process.
fn sessions_in_parent_and_forked_child(tag: &str, parent_first: bool, extra: &[&str]) {
    const N: u64 = 1000;
    let dir = temp_dir(tag);
    let exe = cc(&dir, "fork_code", FORK_CODE_C, &[]);
    let mut t = Target::spawn(&exe, &[]);
    let parent: i32 = t.line().parse().expect("pid");
    let run = format!("run {N}");
    let untraced = ask(&mut t, &run);
    let sum = untraced
        .strip_prefix("sums ")
        .and_then(|s| s.strip_suffix(" -"))
        .unwrap_or_else(|| panic!("{untraced:?}"))
        .to_string();
    let both = format!("sums {sum} {sum}");

    let out = tracer_output(&[
        "attach",
        &parent.to_string(),
        "-p",
        "main:a",
        "--duration",
        "0.2",
    ]);
    assert_success(&out);
    assert_eq!(ask(&mut t, &run), untraced, "after the first session");
    let child: i32 = ask(&mut t, "fork")
        .strip_prefix("child ")
        .expect("child pid")
        .parse()
        .expect("child pid");
    assert_eq!(ask(&mut t, &run), both, "after the fork");

    let mut args_b = vec!["-p", "main:b"];
    let mut args_c = vec!["-p", "main:c"];
    args_b.extend_from_slice(extra);
    args_c.extend_from_slice(extra);
    let (in_parent, in_child) = if parent_first {
        let p = Attached::start(parent, &dir, "parent", &args_b);
        let c = Attached::start(child, &dir, "child", &args_c);
        (p, c)
    } else {
        let c = Attached::start(child, &dir, "child", &args_c);
        let p = Attached::start(parent, &dir, "parent", &args_b);
        (p, c)
    };
    let live = ask(&mut t, &run);
    let exits = extra.contains(&"-x");
    let want = (N, if exits { N } else { 0 });
    let from_parent = in_parent.detach();
    let from_child = in_child.detach();
    assert_eq!(
        live, both,
        "sums (parent, child) while both sessions were live"
    );
    assert_eq!(hits_of(&from_parent, "main:b"), want, "{from_parent:?}");
    assert_eq!(hits_of(&from_child, "main:c"), want, "{from_child:?}");
    assert_eq!(ask(&mut t, &run), both, "after both sessions");

    // Both processes again, after each other's sessions: the child reuses the
    // trampoline it inherited for `a`, the parent its own.
    for (pid, who) in [(parent, "parent"), (child, "child")] {
        let mut args = vec!["-p", "main:a", "-p", "main:d"];
        args.extend_from_slice(extra);
        let s = Attached::start(pid, &dir, who, &args);
        let live = ask(&mut t, &run);
        let reports = s.detach();
        assert_eq!(live, both, "sums during the {who}'s second session");
        assert_eq!(hits_of(&reports, "main:a"), want, "{who}: {reports:?}");
        assert_eq!(hits_of(&reports, "main:d"), want, "{who}: {reports:?}");
    }
    assert_eq!(ask(&mut t, "stop"), "bye 0");
    let st = t.child.wait().expect("wait");
    assert!(st.success(), "{st}");
}

#[test]
fn parent_then_forked_child_sessions_write_code_apart() {
    sessions_in_parent_and_forked_child("fork_code_pc", true, &[]);
}

#[test]
fn forked_child_then_parent_sessions_write_code_apart_with_exits() {
    sessions_in_parent_and_forked_child("fork_code_cp", false, &["-x"]);
}
