//! `--hist`, `--summary` and `--interval`, end to end: a C program calls a sleeping
//! function and a spinning one a known number of times (from one or four threads) and
//! says how many calls it made and how long its threads ran; the tracer's figures must
//! have exactly those calls, buckets that add up to them, the sleeping function first,
//! and no more time than the program's own clock saw.

mod common;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const LATENCY_C: &str = include_str!("programs/latency.c");
/// The sleep of each slow call, in microseconds.
const SLOW_US: u64 = 2000;

fn build(dir: &Path) -> PathBuf {
    cc(dir, "latency", LATENCY_C, &["-pthread"])
}

/// What the program says it did: (slow calls, fast calls, sum of its threads' run time).
fn said(stdout: &str) -> (u64, u64, u64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("slow="))
        .unwrap_or_else(|| panic!("no result line in {stdout:?}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .parse()
            .expect("number")
    };
    (field("slow="), field("fast="), field("elapsed_ns="))
}

/// `tracer run ARGS -p main:slow_call -p main:fast_call -- latency THREADS SLOW FAST`,
/// its `-o` file and the program's (slow, fast, elapsed).
fn run(dir: &Path, args: &[&str], threads: u32, slow: u32, fast: u32) -> (String, (u64, u64, u64)) {
    run_env(dir, args, threads, slow, fast, &[])
}

/// [`run`] with extra environment for the program.
fn run_env(
    dir: &Path,
    args: &[&str],
    threads: u32,
    slow: u32,
    fast: u32,
    env: &[(&str, &str)],
) -> (String, (u64, u64, u64)) {
    let exe = build(dir);
    let out_file = dir.join("out");
    let out = tracer()
        .arg("run")
        .args(args)
        .args(["-p", "main:slow_call", "-p", "main:fast_call", "-o"])
        .arg(&out_file)
        .arg("--")
        .arg(&exe)
        .args([threads, slow, fast].map(|n| n.to_string()))
        .arg(SLOW_US.to_string())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run tracer");
    assert_success(&out);
    let text = std::fs::read_to_string(&out_file).expect("read -o file");
    (text, said(&String::from_utf8_lossy(&out.stdout)))
}

/// The checks every summary must pass, against what the program said.
fn check_summary(objs: &[serde_json::Value], slow: u64, fast: u64, elapsed_ns: u64) {
    assert_eq!(objs.len(), 2, "{objs:?}");
    assert!(objs.iter().all(|o| o["type"] == "latency"), "{objs:?}");
    // Sorted by total: the sleeping function first.
    assert_eq!(objs[0]["probe"], "main:slow_call", "{objs:?}");
    assert_eq!(objs[1]["probe"], "main:fast_call", "{objs:?}");
    let s = report(objs, "main:slow_call");
    let f = report(objs, "main:fast_call");
    assert_eq!(num(s, "calls"), slow, "{s}");
    assert_eq!(num(s, "hits"), slow, "{s}");
    assert_eq!(num(f, "calls"), fast, "{f}");
    assert_eq!(num(f, "hits"), fast, "{f}");
    for o in [s, f] {
        let (min, mean, max) = (num(o, "min_ns"), num(o, "mean_ns"), num(o, "max_ns"));
        assert!(min <= mean && mean <= max, "{o}");
        assert_eq!(mean, num(o, "total_ns") / num(o, "calls"), "{o}");
    }
    // nanosleep sleeps at least what it is asked; 1 % for the TSC-to-ns conversion.
    assert!(num(s, "min_ns") >= SLOW_US * 1000 * 99 / 100, "{s}");
    // Every timed call lies inside the program's own measured window.
    let timed = num(s, "total_ns") + num(f, "total_ns");
    assert!(
        timed <= elapsed_ns,
        "timed {timed} ns, program ran {elapsed_ns} ns"
    );
    let share = s["percent"].as_f64().unwrap() + f["percent"].as_f64().unwrap();
    assert!((share - 100.0).abs() < 0.1, "{objs:?}");
}

#[test]
fn summary_has_exact_calls_and_the_slow_function_first() {
    let dir = temp_dir("lat-summary");
    let (text, (slow, fast, elapsed)) = run(&dir, &["--summary", "--json"], 1, 20, 500);
    assert_eq!((slow, fast), (20, 500));
    check_summary(&json_lines(&text), slow, fast, elapsed);
}

/// With --json, refused probes are listed after the timed ones, as in the counts report.
#[test]
fn summary_json_lists_refused_probes() {
    let dir = temp_dir("lat-refused");
    let (text, (slow, _, _)) = run(
        &dir,
        &["--summary", "--json", "-p", "main:main+0x1"],
        1,
        2,
        2,
    );
    let objs = json_lines(&text);
    assert_eq!(num(report(&objs, "main:slow_call"), "calls"), slow);
    let refused = report(&objs, "main:main+0x1");
    assert!(refused["refused"].is_string(), "{refused}");
}

#[test]
fn summary_text_is_sorted_by_total_with_a_total_line() {
    let dir = temp_dir("lat-summary-text");
    let (text, (slow, fast, _)) = run(&dir, &["--summary"], 1, 10, 300);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("% time"), "{text}");
    let row = |name: &str| {
        lines
            .iter()
            .position(|l| l.ends_with(name))
            .unwrap_or_else(|| panic!("no row for {name} in {text}"))
    };
    assert!(row("main:slow_call") < row("main:fast_call"), "{text}");
    let calls = |i: usize| lines[i].split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(calls(row("main:slow_call")), slow.to_string(), "{text}");
    assert_eq!(calls(row("main:fast_call")), fast.to_string(), "{text}");
    let total = lines.last().unwrap();
    assert!(total.ends_with("total"), "{text}");
    assert_eq!(calls(lines.len() - 1), (slow + fast).to_string(), "{text}");
}

/// Bucket bounds as the JSON gives them, and the counts.
fn buckets(o: &serde_json::Value) -> Vec<(u64, Option<u64>, u64)> {
    o["buckets"]
        .as_array()
        .unwrap_or_else(|| panic!("no buckets in {o}"))
        .iter()
        .map(|b| (num(b, "min_ns"), b["max_ns"].as_u64(), num(b, "count")))
        .collect()
}

#[test]
fn hist_buckets_add_up_to_the_calls() {
    let dir = temp_dir("lat-hist");
    let (text, (slow, fast, _)) = run(&dir, &["--hist", "--json"], 1, 12, 400);
    let objs = json_lines(&text);
    for (probe, calls) in [("main:slow_call", slow), ("main:fast_call", fast)] {
        let o = report(&objs, probe);
        assert_eq!(o["type"], "latency", "{o}");
        let b = buckets(o);
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), calls, "{o}");
        assert_eq!(num(o, "calls"), calls, "{o}");
    }
    // Each slow call slept at least SLOW_US: no bucket below the one holding 99 % of it.
    let floor = SLOW_US * 1000 * 99 / 100;
    for (lo, hi, _) in buckets(report(&objs, "main:slow_call")) {
        assert!(
            hi.is_none_or(|h| h > floor),
            "bucket [{lo}, {hi:?}) below {floor}"
        );
    }
}

#[test]
fn hist_text_is_bpftrace_like() {
    let dir = temp_dir("lat-hist-text");
    let (text, (slow, _, _)) = run(&dir, &["--hist"], 1, 6, 50);
    assert!(text.starts_with("@ns[main:slow_call]:\n"), "{text}");
    assert!(text.contains("\n@ns[main:fast_call]:\n"), "{text}");
    let slow_part = text.split("\n\n").next().unwrap();
    let counted: u64 = slow_part
        .lines()
        .skip(1)
        .map(|l| {
            let (_, rest) = l.split_once(')').expect("[lo, hi) label");
            rest.split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(counted, slow, "{text}");
}

#[test]
fn four_threads_are_counted_and_timed_exactly() {
    four_threads("lat-threads", &[]);
}

/// Without glibc's rseq registration the latency slots have one shard per probe.
#[test]
fn four_threads_are_counted_and_timed_exactly_without_rseq() {
    four_threads(
        "lat-threads-norseq",
        &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
    );
}

fn four_threads(tag: &str, env: &[(&str, &str)]) {
    let dir = temp_dir(tag);
    let (text, (slow, fast, elapsed)) =
        run_env(&dir, &["--summary", "--hist", "--json"], 4, 15, 20_000, env);
    assert_eq!((slow, fast), (60, 80_000));
    let objs = json_lines(&text);
    check_summary(&objs, slow, fast, elapsed);
    for o in &objs {
        let b = buckets(o);
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), num(o, "calls"), "{o}");
    }
}

#[test]
fn interval_prints_running_figures_then_the_final_ones() {
    let dir = temp_dir("lat-interval");
    let exe = build(&dir);
    // 25 slow calls of 20 ms each followed by 20 ms of untimed sleep: at least 1 s.
    let out = tracer()
        .args([
            "run",
            "--summary",
            "--interval",
            "0.2",
            "-p",
            "main:slow_call",
            "--",
        ])
        .arg(&exe)
        .args(["1", "25", "0", "20000"])
        .stdin(Stdio::null())
        .output()
        .expect("run tracer");
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let headers = err
        .lines()
        .filter(|l| l.starts_with("--- interval "))
        .count();
    assert!(headers >= 2, "{headers} interval reports: {err}");
    // The last report is the final one, with every call.
    let last = err.rsplit("--- final ---\n").next().unwrap();
    let row = last
        .lines()
        .rev()
        .find(|l| l.ends_with("main:slow_call"))
        .unwrap_or_else(|| panic!("no final row: {err}"));
    assert_eq!(row.split_whitespace().nth(2), Some("25"), "{err}");
    // Running figures never exceed the final ones and never go down.
    let mut before = 0;
    for part in err.split("--- interval ").skip(1) {
        // A probe not called yet has no row.
        let calls: u64 = part
            .lines()
            .find(|l| l.ends_with("main:slow_call"))
            .map_or(0, |row| {
                row.split_whitespace().nth(2).unwrap().parse().unwrap()
            });
        assert!(before <= calls && calls <= 25, "{err}");
        before = calls;
    }
}

/// `tracer attach --summary --json --interval`: running objects carry their interval;
/// the final ones, read after SIGINT while the program waits, have its exact calls.
#[test]
fn attach_summary_is_exact_with_running_reports() {
    let dir = temp_dir("lat-attach");
    let exe = build(&dir);
    // 40 slow calls of 5 ms, each followed by 5 ms untimed: at least 400 ms of calls.
    let mut t = Target::spawn(&exe, &["1", "40", "1000", "5000", "wait"]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().expect("pid");
    let slow_call = hex(parts.next().expect("slow_call address"));
    let json = dir.join("out.json");
    let child = tracer()
        .args([
            "attach",
            &pid.to_string(),
            "--summary",
            "--json",
            "--interval",
            "0.1",
        ])
        .args(["-p", "main:slow_call", "-p", "main:fast_call", "-o"])
        .arg(&json)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer attach");
    assert!(
        wait_until(Duration::from_secs(20), || read_mem(pid, slow_call, 1)[0]
            == 0xe9),
        "slow_call never patched"
    );
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let (slow, fast, elapsed) = said(&t.line());
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("wait tracer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tracer attach failed: {err}");
    let objs = json_lines(&std::fs::read_to_string(&json).expect("read -o file"));
    let (running, last): (Vec<_>, Vec<_>) =
        objs.into_iter().partition(|o| o.get("interval").is_some());
    assert!(!running.is_empty(), "no running report: {err}");
    for o in &running {
        assert!(o["elapsed_s"].as_f64().is_some(), "{o}");
        assert!(
            num(o, "calls")
                <= if o["probe"] == "main:slow_call" {
                    slow
                } else {
                    fast
                }
        );
    }
    check_summary(&last, slow, fast, elapsed);
    let (_, ok) = t.finish();
    assert!(ok, "the program failed after the session");
}

#[test]
fn bad_builtin_options_are_one_line_errors() {
    let out = tracer_output(&["run", "--interval", "0", "-p", "libc:malloc", "--", "true"]);
    assert_one_line_error(&out, &["--interval 0", "at least 0.01"]);
    let out = tracer_output(&["attach", "1", "--interval", "nan", "-p", "libc:malloc"]);
    assert_one_line_error(&out, &["--interval"]);
    // Checked before the pack is even looked at.
    let out = tracer_output(&[
        "run",
        "--hist",
        "--pack",
        "/nonexistent/pack",
        "-p",
        "libc:malloc",
        "--",
        "true",
    ]);
    assert_one_line_error(&out, &["--hist", "--pack"]);
}

/// `--interval` without `--hist`/`--summary` prints the running counts: with `--json`,
/// one object per probe and interval, its hits never going down, then the final ones.
#[test]
fn interval_prints_running_counts_as_json() {
    let dir = temp_dir("lat-interval-counts");
    let exe = build(&dir);
    let out = tracer()
        .args([
            "run",
            "--json",
            "-x",
            "--interval",
            "0.2",
            "-p",
            "main:slow_call",
            "--",
        ])
        .arg(&exe)
        .args(["1", "25", "0", "20000"])
        .stdin(Stdio::null())
        .output()
        .expect("run tracer");
    assert_success(&out);
    let (slow, _, _) = said(&String::from_utf8_lossy(&out.stdout));
    let objs = json_objects(&String::from_utf8_lossy(&out.stderr));
    let (running, last): (Vec<_>, Vec<_>) =
        objs.into_iter().partition(|o| o.get("interval").is_some());
    assert!(running.len() >= 2, "{running:?}");
    let mut before = 0;
    for o in &running {
        assert!(before <= num(o, "hits") && num(o, "hits") <= slow, "{o}");
        before = num(o, "hits");
    }
    let r = report(&last, "main:slow_call");
    assert_eq!((num(r, "hits"), num(r, "exits")), (slow, slow), "{r}");
}

/// The JSON lines of `text`, leaving out tracer's own `tracer: ...` lines.
fn json_objects(text: &str) -> Vec<serde_json::Value> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    json_lines(&lines.join("\n"))
}

/// A second session in the same process starts from zero: the agent's region is reused
/// and emptied, not summed into.
#[test]
fn a_second_attach_starts_from_zero() {
    let dir = temp_dir("lat-again");
    let exe = build(&dir);
    let mut t = Target::spawn(&exe, &["1", "5", "100", "1000", "wait"]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().expect("pid");
    let slow_call = hex(parts.next().expect("slow_call address"));
    let attach = |extra: &[&str]| {
        tracer()
            .args(["attach", &pid.to_string(), "--summary", "--json"])
            .args(["-p", "main:slow_call", "-p", "main:fast_call"])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tracer attach")
    };
    let child = attach(&[]);
    assert!(
        wait_until(Duration::from_secs(20), || read_mem(pid, slow_call, 1)[0]
            == 0xe9),
        "slow_call never patched"
    );
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let (slow, fast, _) = said(&t.line());
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("wait tracer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let objs = json_objects(&err);
    assert_eq!(num(report(&objs, "main:slow_call"), "calls"), slow, "{err}");
    assert_eq!(num(report(&objs, "main:fast_call"), "calls"), fast, "{err}");
    // The program made all its calls: a new session sees none of them.
    let out = attach(&["--duration", "0.2"])
        .wait_with_output()
        .expect("wait tracer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let objs = json_objects(&err);
    for probe in ["main:slow_call", "main:fast_call"] {
        let o = report(&objs, probe);
        let got = (num(o, "calls"), num(o, "total_ns"), num(o, "max_ns"));
        assert_eq!(got, (0, 0, 0), "{o}");
    }
    let (_, ok) = t.finish();
    assert!(ok, "the program failed after the sessions");
}
