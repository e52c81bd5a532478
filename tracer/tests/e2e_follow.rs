//! `tracer run` following the processes the command starts: exec'd programs get their
//! probes before `main`, forked children count on their own, each process is reported by
//! pid and command.

mod common;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const MALLOCS_C: &str = include_str!("programs/follow_mallocs.c");
const FORK_C: &str = include_str!("programs/follow_fork.c");
const CLEARENV_C: &str = include_str!("programs/follow_clearenv.c");

/// `follow_mallocs N [drain]`: exactly N calls of malloc, no stdio.
fn mallocs(dir: &Path) -> PathBuf {
    cc(dir, "follow_mallocs", MALLOCS_C, &[])
}

/// Runs `tracer run ARGS --json -o FILE -- CMD...` in `dir`; returns the output and the
/// JSON objects.
fn run_json(dir: &Path, args: &[&str], cmd: &[&str]) -> (std::process::Output, Vec<Value>) {
    let json = dir.join("out.json");
    let out = tracer()
        .current_dir(dir)
        .arg("run")
        .args(args)
        .arg("--json")
        .arg("-o")
        .arg(&json)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("run tracer");
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    (out, json_lines(&text))
}

/// The objects of probe `probe` in processes named `comm` that came by `origin`.
fn of<'a>(v: &'a [Value], comm: &str, origin: &str, probe: &str) -> Vec<&'a Value> {
    v.iter()
        .filter(|o| o["comm"] == comm && o["origin"] == origin && o["probe"] == probe)
        .collect()
}

/// The launched command itself counts only its own calls: what tracer's agent does in
/// it to start following (setting `LD_PRELOAD` and `TRACER_FOLLOW`, which allocates) is
/// not counted, as no agent work is.
#[test]
fn the_launched_program_counts_only_its_own_calls() {
    let dir = temp_dir("follow_own");
    mallocs(&dir);
    let (out, v) = run_json(&dir, &["-p", "libc:malloc"], &["./follow_mallocs", "7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mallocs 7\n");
    let progs = of(&v, "follow_mallocs", "launched", "libc:malloc");
    assert_eq!(progs.len(), 1, "{v:?}");
    assert_eq!(num(progs[0], "hits"), 7, "{v:?}");
}

/// `sh -c 'A | B'`: both programs of the pipeline are reported, each by its own pid,
/// with exactly the mallocs it made; the shell is reported as the command.
#[test]
fn pipeline_programs_are_each_reported_with_their_own_counts() {
    let dir = temp_dir("follow_pipe");
    mallocs(&dir);
    let (out, v) = run_json(
        &dir,
        &["-p", "libc:malloc"],
        &[
            "sh",
            "-c",
            "./follow_mallocs 11 | ./follow_mallocs 13 drain",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mallocs 13\n");
    let progs = of(&v, "follow_mallocs", "exec", "libc:malloc");
    let mut hits: Vec<u64> = progs.iter().map(|o| num(o, "hits")).collect();
    hits.sort_unstable();
    assert_eq!(hits, [11, 13], "{v:?}");
    let pids: std::collections::HashSet<u64> = progs.iter().map(|o| num(o, "pid")).collect();
    assert_eq!(pids.len(), 2, "{v:?}");
    let sh = v
        .iter()
        .find(|o| o["origin"] == "launched")
        .expect("the command");
    assert_eq!(sh["comm"], "sh");
    assert!(!pids.contains(&num(sh, "pid")));
}

/// A program forks 3 children, each calling `work` K times and returning through
/// `spawn` (its entry was in the parent: `-x` exit probes across fork); the parent calls
/// `work` P times. Each child's counters are its own, the parent's exclude them.
#[test]
fn forked_children_count_on_their_own_with_exit_probes() {
    let dir = temp_dir("follow_fork");
    cc(&dir, "follow_fork", FORK_C, &[]);
    let (out, v) = run_json(
        &dir,
        &["-x", "-p", "main:work", "-p", "main:spawn"],
        &["./follow_fork", "3", "7", "5"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = of(&v, "follow_fork", "launched", "main:work");
    assert_eq!(top.len(), 1, "{v:?}");
    let top_pid = num(top[0], "pid");
    assert_eq!((num(top[0], "hits"), num(top[0], "exits")), (5, 5));
    let spawn = of(&v, "follow_fork", "launched", "main:spawn");
    assert_eq!((num(spawn[0], "hits"), num(spawn[0], "exits")), (3, 3));
    let children = of(&v, "follow_fork", "fork", "main:work");
    assert_eq!(children.len(), 3, "{v:?}");
    for c in children {
        assert_eq!(num(c, "parent"), top_pid);
        assert_eq!((num(c, "hits"), num(c, "exits")), (7, 7), "{c}");
        let s = v
            .iter()
            .find(|o| o["pid"] == c["pid"] && o["probe"] == "main:spawn")
            .expect("spawn in the child");
        assert_eq!((num(s, "hits"), num(s, "exits")), (0, 1), "{s}");
    }
}

/// A child execs a program with another set of modules: a spec for a library only that
/// program loads is a note for the shell and probes it there; the exit status is the
/// command's.
#[test]
fn exec_of_a_program_with_other_modules_resolves_specs_again() {
    let dir = temp_dir("follow_modules");
    mallocs(&dir);
    build_target(&dir);
    let (out, v) = run_json(
        &dir,
        &["-p", "libc:malloc", "-p", "libtarget:work"],
        &["sh", "-c", "./follow_mallocs 3; ./target 100; exit 5"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("libtarget:work matches nothing in the launched program"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let calls: u64 = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("calls="))
        .expect("calls= from target")
        .parse()
        .unwrap();
    let work = of(&v, "target", "exec", "libtarget:work");
    assert_eq!(work.len(), 1, "{v:?}");
    assert_eq!(num(work[0], "hits"), calls);
    let m = of(&v, "follow_mallocs", "exec", "libc:malloc");
    assert_eq!(num(m[0], "hits"), 3);
    assert!(
        !v.iter()
            .any(|o| o["comm"] == "follow_mallocs" && o["probe"] == "libtarget:work"),
        "{v:?}"
    );
}

/// The command itself execs (`sh -c 'exec PROG'`): the new image in the same pid is
/// probed and reported after the shell's.
#[test]
fn exec_of_the_command_itself_is_followed() {
    let dir = temp_dir("follow_exec_top");
    mallocs(&dir);
    let (out, v) = run_json(
        &dir,
        &["-p", "libc:malloc"],
        &["sh", "-c", "exec ./follow_mallocs 9"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("exec'd"), "{err}");
    let sh = v.iter().find(|o| o["origin"] == "launched").expect("sh");
    let prog = of(&v, "follow_mallocs", "exec", "libc:malloc");
    assert_eq!(prog.len(), 1, "{v:?}");
    assert_eq!(prog[0]["pid"], sh["pid"]);
    assert_eq!(num(prog[0], "hits"), 9);
}

/// A program that clears its environment before exec loses the chain (documented): the
/// exec'd program runs untraced and normally, tracer says so and does not wait for it.
#[test]
fn cleared_environment_ends_the_chain_without_harm() {
    let dir = temp_dir("follow_clearenv");
    mallocs(&dir);
    cc(&dir, "follow_clearenv", CLEARENV_C, &[]);
    let (out, v) = run_json(
        &dir,
        &["-p", "libc:malloc"],
        &["./follow_clearenv", "./follow_mallocs", "4"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mallocs 4\n");
    assert!(err.contains("did not check in"), "{err}");
    assert!(v.iter().all(|o| o["origin"] == "launched"), "{v:?}");
}

/// tracer killed (SIGKILL) while the command runs: what the command starts afterwards
/// (exec'd programs with the agent preloaded, and their forks) runs normally, untraced,
/// and says nothing.
#[test]
fn children_run_normally_after_the_rendezvous_is_gone() {
    let dir = temp_dir("follow_gone");
    mallocs(&dir);
    cc(&dir, "follow_fork", FORK_C, &[]);
    let fifo = dir.join("go");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // The shell waits on the fifo in a builtin: nothing execs (no install is under way)
    // when tracer is killed.
    let script = "touch ready; read x < go; ./follow_mallocs 7 > out; ./follow_fork 2 3 3; \
                  echo done $? >> out";
    let mut t = tracer()
        .current_dir(&dir)
        .args([
            "run",
            "-p",
            "libc:malloc",
            "-p",
            "main:work",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tracer");
    assert!(
        wait_until(Duration::from_secs(30), || dir.join("ready").exists()),
        "the command never started"
    );
    t.kill().expect("kill tracer");
    t.wait().expect("reap tracer");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .and_then(|mut f| f.write_all(b"go\n"))
        .expect("release the shell");
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(
            dir.join("out")
        )
        .is_ok_and(|s| s.contains("done"))),
        "the command did not finish"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("out")).unwrap(),
        "mallocs 7\ndone 0\n"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut t.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("ld.so") && !err.contains("ERROR"), "{err}");
}

/// `--no-follow` probes the launched program only; `attach --follow` and `--follow` with a
/// pack are refused in one line.
#[test]
fn follow_flags() {
    let dir = temp_dir("follow_flags");
    mallocs(&dir);
    let (out, v) = run_json(
        &dir,
        &["--no-follow", "-p", "libc:malloc"],
        &["sh", "-c", "./follow_mallocs 3; true"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(v.iter().all(|o| o["comm"] == "sh"), "{v:?}");
    let out = tracer_output(&["attach", "--follow", "-p", "libc:malloc", "1"]);
    assert_one_line_error(&out, &["attach does not follow children"]);
    let out = tracer_output(&["run", "--follow", "--pack", "/nonexistent", "--", "true"]);
    assert_one_line_error(&out, &["--follow does not carry a probe pack"]);
}

/// tracer ends when the command ends: a followed program still running then has its
/// probes taken out, is reported as running, and goes on normally.
#[test]
fn processes_still_running_at_the_end_are_reported_and_let_go() {
    let dir = temp_dir("follow_running");
    let fifo = dir.join("go");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // The background shell touches `started` once its probes are in (it runs its script
    // only after checking in); the command waits for that in a builtin loop, then ends.
    // Its output goes elsewhere: tracer's pipes must close when tracer ends.
    let script = "sh -c 'touch started; read x < go; touch finished' >/dev/null 2>&1 & \
                  while [ ! -e started ]; do :; done";
    let (out, v) = run_json(&dir, &["-p", "libc:malloc"], &["sh", "-c", script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bg: Vec<&Value> = v
        .iter()
        .filter(|o| o["origin"] == "exec" && o["comm"] == "sh" && o["probe"] == "libc:malloc")
        .collect();
    assert_eq!(bg.len(), 1, "{v:?}");
    assert_eq!(bg[0]["running"], true, "{v:?}");
    let pid = num(bg[0], "pid") as i32;
    let released = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .and_then(|mut f| f.write_all(b"go\n"))
    };
    // The patch is a `jmp rel32` (0xe9) at the site: gone once the probes are out.
    let site = hex(bg[0]["address"].as_str().unwrap());
    let first = read_mem(pid, site, 1)[0];
    if tracer_pid(pid) != 0 || first == 0xe9 {
        released().expect("release the background shell");
        panic!("PID {pid} is still traced or patched ({first:#x} at {site:#x})");
    }
    released().expect("release the background shell");
    assert!(
        wait_until(Duration::from_secs(30), || dir.join("finished").exists()),
        "the background shell did not go on"
    );
}

const QUIET_C: &str = include_str!("programs/fork_quiet.c");

/// The report object of `probe` (a `run` or `attach` without following: one process).
fn probe_obj<'a>(v: &'a [Value], probe: &str) -> &'a Value {
    let found: Vec<&Value> = v.iter().filter(|o| o["probe"] == probe).collect();
    assert_eq!(found.len(), 1, "{probe} in {v:?}");
    found[0]
}

/// Without following, a forked child keeps its parent's trampolines but not its shared
/// memory: the parent's report holds the parent's own calls only. The parent calls
/// `work` 5 times; 3 children, forked inside `spawn` (so spawn's exit probe returns in
/// both processes), call it 400 times each.
#[test]
fn without_follow_children_stay_out_of_the_parents_counts() {
    let dir = temp_dir("quiet_run");
    cc(&dir, "fork_quiet", QUIET_C, &[]);
    let (out, v) = run_json(
        &dir,
        &["--no-follow", "-x", "-p", "main:work", "-p", "main:spawn"],
        &["./fork_quiet", "5", "3", "400"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    let work = probe_obj(&v, "main:work");
    assert_eq!((num(work, "hits"), num(work, "exits")), (5, 5), "{v:?}");
    let spawn = probe_obj(&v, "main:spawn");
    assert_eq!((num(spawn, "hits"), num(spawn, "exits")), (3, 3), "{v:?}");
}

/// The same with `--summary` (the latency region is the parent's own too).
#[test]
fn without_follow_children_stay_out_of_the_parents_summary() {
    let dir = temp_dir("quiet_summary");
    cc(&dir, "fork_quiet", QUIET_C, &[]);
    let (out, v) = run_json(
        &dir,
        &["--summary", "-p", "main:work", "-p", "main:spawn"],
        &["./fork_quiet", "5", "3", "400"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let work = probe_obj(&v, "main:work");
    assert_eq!((num(work, "calls"), num(work, "hits")), (5, 5), "{v:?}");
    let spawn = probe_obj(&v, "main:spawn");
    assert_eq!((num(spawn, "calls"), num(spawn, "hits")), (3, 3), "{v:?}");
}

/// `tracer attach` (which never follows) to the program before it forks, with `extra`
/// options; returns the report's objects.
fn attach_before_fork(tag: &str, extra: &[&str]) -> Vec<Value> {
    let dir = temp_dir(tag);
    let exe = cc(&dir, "fork_quiet", QUIET_C, &[]);
    let mut t = Target::spawn(&exe, &["5", "3", "400", "wait"]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().expect("pid");
    let work = hex(parts.next().expect("work address"));
    let json = dir.join("out.json");
    let mut child = tracer()
        .args(["attach", &pid.to_string(), "--json"])
        .args(extra)
        .args(["-p", "main:work", "-p", "main:spawn", "-o"])
        .arg(&json)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer attach");
    let patched = wait_until(Duration::from_secs(20), || {
        read_mem(pid, work, 1)[0] == 0xe9
    });
    if !patched {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait tracer");
        panic!(
            "work never patched: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(t.line(), "done");
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("wait tracer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tracer attach failed: {err}");
    let (_, ok) = t.finish();
    assert!(ok, "the program failed after the session");
    json_lines(&std::fs::read_to_string(&json).expect("read -o file"))
}

#[test]
fn attach_counts_exclude_children_forked_while_attached() {
    let v = attach_before_fork("quiet_attach", &["-x"]);
    let work = probe_obj(&v, "main:work");
    assert_eq!((num(work, "hits"), num(work, "exits")), (5, 5), "{v:?}");
    let spawn = probe_obj(&v, "main:spawn");
    assert_eq!((num(spawn, "hits"), num(spawn, "exits")), (3, 3), "{v:?}");
}

#[test]
fn attach_hist_excludes_children_forked_while_attached() {
    let v = attach_before_fork("quiet_attach_hist", &["--hist"]);
    let work = probe_obj(&v, "main:work");
    assert_eq!((num(work, "calls"), num(work, "hits")), (5, 5), "{v:?}");
    let spawn = probe_obj(&v, "main:spawn");
    assert_eq!((num(spawn, "calls"), num(spawn, "hits")), (3, 3), "{v:?}");
}

/// The README's `-p 'libtarget:*' -- sh -c ./prog`: the shell loads no such library, so
/// the spec matches nothing in the launched program; that is a note, the shell is
/// followed, and the program it starts gets the probe, its count its own.
#[test]
fn a_library_of_the_program_a_shell_starts() {
    let dir = temp_dir("follow-sh-lib");
    let lib = cc(
        &dir,
        "libshfollow.so",
        "int shlibfn(int x) { return x * 7 + 1; }\n",
        &["-shared", "-fPIC"],
    );
    let prog_src = "#include <stdio.h>\nint shlibfn(int);\nint main(void) { long s = 0; \
                    for (int i = 0; i < 1000; i++) s += shlibfn(i); printf(\"s=%ld\\n\", s); \
                    return 0; }\n";
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    let libdir = format!("-L{}", dir.display());
    let prog = cc(&dir, "shprog", prog_src, &[&libdir, "-lshfollow", &rpath]);
    assert!(lib.exists());
    let report = dir.join("report.json");
    let out = tracer_output(&[
        "run",
        "--json",
        "-o",
        report.to_str().unwrap(),
        "-p",
        "libshfollow:shlibfn",
        "--",
        "sh",
        "-c",
        prog.to_str().unwrap(),
    ]);
    assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "s=3497500\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("matches nothing in the launched program"),
        "{err}"
    );
    let text = std::fs::read_to_string(&report).unwrap();
    let hits: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "probe" && v["probe"] == "libshfollow:shlibfn")
        .map(|v| v["hits"].as_u64().unwrap())
        .collect();
    assert_eq!(hits, [1000], "{text}");
}
