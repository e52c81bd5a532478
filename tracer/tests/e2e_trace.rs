//! `--trace`, `--chrome-trace` and `--perfetto` end to end: a C program built with `-g`
//! whose calls and arguments are known (`programs/calls.c`), traced through the agent's
//! event ring.

mod common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CALLS_C: &str = include_str!("programs/calls.c");

fn build_calls(dir: &Path) -> PathBuf {
    cc(dir, "calls", CALLS_C, &["-O0", "-pthread"])
}

/// A trace line split into its thread, its time in ns and its body without the duration.
#[derive(Debug)]
struct Line {
    tid: u32,
    ns: u64,
    body: String,
    has_duration: bool,
}

fn parse_line(l: &str) -> Option<Line> {
    let rest = l.strip_prefix('[')?;
    let (tid, rest) = rest.split_once("] ")?;
    let (secs, body) = rest.split_once(' ')?;
    let (s, frac) = secs.split_once('.')?;
    let ns = s.parse::<u64>().ok()? * 1_000_000_000 + frac.parse::<u64>().ok()? * 1000;
    let (body, has_duration) = match body.rfind(" <") {
        Some(i) if body.ends_with(" us>") || body.ends_with(" ms>") || body.ends_with(" s>") => {
            (&body[..i], true)
        }
        _ => (body, false),
    };
    Some(Line {
        tid: tid.parse().ok()?,
        ns,
        body: body.to_string(),
        has_duration,
    })
}

fn trace_lines(text: &str) -> Vec<Line> {
    text.lines().filter_map(parse_line).collect()
}

/// Runs tracer with `args` then `-- calls MODE...`, trace output to a file; returns the
/// file's text and tracer's output.
fn traced(
    dir: &Path,
    calls: &Path,
    args: &[&str],
    mode: &[&str],
) -> (String, std::process::Output) {
    let file = dir.join(format!("trace-{}.txt", mode.join("-")));
    let mut all: Vec<&str> = vec!["run"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", file.to_str().unwrap(), "--", calls.to_str().unwrap()]);
    all.extend_from_slice(mode);
    let out = tracer_output(&all);
    assert_success(&out);
    (std::fs::read_to_string(&file).expect("trace output"), out)
}

/// The program's own calls, exactly: parameter names and types from its DWARF (an `int`,
/// a `long`, a `double` in a vector register, a `const char *` read from its memory, an
/// `unsigned char`), return values, and the nesting of `add` inside `outer`.
#[test]
fn trace_shows_each_call_with_dwarf_arguments_nested() {
    let dir = temp_dir("trace-dwarf");
    let calls = build_calls(&dir);
    let plain = std::process::Command::new(&calls)
        .arg("seq")
        .output()
        .expect("untraced run");
    let (text, out) = traced(
        &dir,
        &calls,
        &[
            "--trace",
            "-p",
            "main:add",
            "-p",
            "main:outer",
            "-p",
            "main:scale",
            "-p",
            "main:greet",
        ],
        &["seq"],
    );
    assert_eq!(out.stdout, plain.stdout, "the program's output changed");
    let lines = trace_lines(&text);
    let bodies: Vec<&str> = lines.iter().map(|l| l.body.as_str()).collect();
    assert_eq!(
        bodies,
        [
            "add(a=2, b=3) = 5",
            "outer(n=10) {",
            "  add(a=10, b=1) = 11",
            "  add(a=10, b=2) = 12",
            "} outer = 23",
            "scale(v=-4, f=2.5) = -10",
            "greet(who=\"world\", times=2) = 10",
        ],
        "{text}"
    );
    // One thread (the program's main thread: its pid), times in order, a duration on
    // every line but the opening one.
    let pid = lines[0].tid;
    assert!(lines.iter().all(|l| l.tid == pid), "{text}");
    assert!(lines.windows(2).all(|w| w[0].ns <= w[1].ns), "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.has_duration != l.body.ends_with('{')),
        "{text}"
    );
    assert!(
        text.contains("trace: 6 calls, 12 events received, 0 dropped"),
        "{text}"
    );
}

/// `--trace --json`: every line of the output is a JSON object: the calls (one each,
/// when it returned, with arguments, return value, depth and times), the thread's name,
/// the trace summary and the probe records, whose hits equal the call records.
#[test]
fn trace_json_is_one_object_per_line() {
    let dir = temp_dir("trace-json");
    let calls = build_calls(&dir);
    let plain = std::process::Command::new(&calls)
        .arg("seq")
        .output()
        .expect("untraced run");
    let specs = ["main:add", "main:outer", "main:scale", "main:greet"];
    let mut args = vec!["--trace", "--json"];
    for s in &specs {
        args.extend_from_slice(&["-p", s]);
    }
    let (text, out) = traced(&dir, &calls, &args, &["seq"]);
    assert_eq!(out.stdout, plain.stdout, "the program's output changed");
    let objects: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of = |t: &'static str| objects.iter().filter(move |o| o["type"] == t);
    let seen: Vec<String> = of("call")
        .map(|o| {
            format!(
                "{}{}({}) = {}",
                "  ".repeat(o["depth"].as_u64().unwrap() as usize),
                o["name"].as_str().unwrap(),
                o["args"].as_str().unwrap(),
                o["ret"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            "add(a=2, b=3) = 5",
            "  add(a=10, b=1) = 11",
            "  add(a=10, b=2) = 12",
            "outer(n=10) = 23",
            "scale(v=-4, f=2.5) = -10",
            "greet(who=\"world\", times=2) = 10",
        ],
        "{text}"
    );
    // The nested calls lie inside outer's span.
    let call = |i: usize| of("call").nth(i).unwrap();
    let span = |o: &serde_json::Value| {
        let start = o["start_ns"].as_u64().unwrap();
        (start, start + o["dur_ns"].as_u64().unwrap())
    };
    let (o0, o1) = span(call(3));
    for i in [1, 2] {
        let (s, e) = span(call(i));
        assert!(o0 <= s && e <= o1, "{text}");
    }
    assert_eq!(of("thread").count(), 1, "{text}");
    let summary = of("trace").next().expect("a trace summary");
    assert_eq!(summary["trace"]["calls"], 6, "{text}");
    assert_eq!(summary["trace"]["dropped"], 0, "{text}");
    for s in &specs {
        let name = s.trim_start_matches("main:");
        let probe = of("probe")
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("no probe record for {s}: {text}"));
        let calls = of("call").filter(|o| o["name"] == name).count() as u64;
        assert_eq!(probe["hits"].as_u64(), Some(calls), "{s}: {text}");
    }
}

/// libc has no DWARF here: the shipped prototypes decode `open`'s path (copied by the
/// agent) and flags, and a wild pointer handed to `access` is shown as the pointer, the
/// program running on unharmed.
#[test]
fn trace_decodes_libc_strings_and_survives_a_wild_pointer() {
    let dir = temp_dir("trace-libc");
    let calls = build_calls(&dir);
    let plain = std::process::Command::new(&calls)
        .arg("seq")
        .output()
        .expect("untraced run");
    let (text, out) = traced(
        &dir,
        &calls,
        &["--trace", "-p", "libc:open", "-p", "libc:access"],
        &["seq"],
    );
    assert_eq!(out.stdout, plain.stdout);
    let bodies: Vec<String> = trace_lines(&text).into_iter().map(|l| l.body).collect();
    assert_eq!(
        bodies,
        [
            "open(\"/nonexistent/tracer-trace-test\", 0x0, ...) = -1",
            "access(0x10, 0) = -1",
        ],
        "{text}"
    );
}

/// `--args N` shows N raw registers in hex, and the return value in hex.
#[test]
fn args_n_forces_raw_registers() {
    let dir = temp_dir("trace-raw");
    let calls = build_calls(&dir);
    let (text, _) = traced(
        &dir,
        &calls,
        &["--trace", "--args", "2", "-p", "main:add"],
        &["seq"],
    );
    let bodies: Vec<String> = trace_lines(&text).into_iter().map(|l| l.body).collect();
    assert_eq!(
        bodies,
        [
            "add(0x2, 0x3) = 0x5",
            "add(0xa, 0x1) = 0xb",
            "add(0xa, 0x2) = 0xc"
        ],
        "{text}"
    );
}

/// Two threads: each line carries its thread, and each thread's calls come in its order.
#[test]
fn trace_follows_two_threads() {
    let dir = temp_dir("trace-threads");
    let calls = build_calls(&dir);
    let (text, out) = traced(&dir, &calls, &["--trace", "-p", "main:add"], &["threads"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "total=921\n");
    let mut by_tid: HashMap<u32, Vec<String>> = HashMap::new();
    for l in trace_lines(&text) {
        by_tid.entry(l.tid).or_default().push(l.body);
    }
    assert_eq!(by_tid.len(), 3, "{text}");
    let mut seqs: Vec<Vec<String>> = by_tid.into_values().collect();
    seqs.sort();
    let expect = |base: i32| -> Vec<String> {
        (0..3)
            .map(|i| format!("add(a={base}, b={i}) = {}", base + i))
            .collect()
    };
    assert_eq!(
        seqs,
        [
            expect(100),
            expect(200),
            vec!["add(a=7, b=8) = 15".to_string()]
        ],
        "{text}"
    );
}

/// A ring too small for the rate of calls: records are dropped, never blocking the
/// program, and every one of its calls' records is either printed or counted as dropped.
#[test]
fn trace_counts_what_it_drops_when_the_ring_overflows() {
    let dir = temp_dir("trace-drops");
    let calls = build_calls(&dir);
    let n = 200_000u64;
    let (text, out) = traced(
        &dir,
        &calls,
        &["--trace", "--trace-ring", "4096", "-p", "main:add"],
        &["many", &n.to_string()],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("sum={} calls={n}\n", n * (n + 1) / 2)
    );
    let summary = text
        .lines()
        .find_map(|l| l.strip_prefix("trace: "))
        .unwrap_or_else(|| panic!("no summary in {text}"));
    let nums: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    let (received, dropped) = (nums[1], nums[2]);
    assert_eq!(received + dropped, 2 * n, "{summary}");
    assert!(dropped > 0, "{summary}");
    // Said as it happened, in notes that add up to the total.
    let noted: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("tracer: ")?.split_once(" events dropped"))
        .map(|(k, _)| k.parse::<u64>().unwrap())
        .sum();
    assert_eq!(noted, dropped, "{text}");
    // `add` calls nothing: whatever records were lost, every line stays at depth 0 (the
    // records carry the thread's depth; without it a lost return would indent all that
    // follows).
    let lines = trace_lines(&text);
    assert!(lines.len() as u64 >= received / 2, "{} lines", lines.len());
    for l in &lines {
        assert!(
            l.body.starts_with("add(") || l.body.starts_with("... add = "),
            "{l:?}"
        );
    }
}

fn ns_of(v: &serde_json::Value) -> u64 {
    (v.as_f64().expect("number") * 1000.0).round() as u64
}

/// The Chrome JSON: one complete event per call with pid, tid, name, ts and dur, thread
/// names, and calls of a thread nested inside one another or apart, never overlapping.
#[test]
fn chrome_trace_has_complete_events_nested_per_thread() {
    let dir = temp_dir("trace-chrome");
    let calls = build_calls(&dir);
    let json = dir.join("trace.json");
    let out = tracer_output(&[
        "run",
        "--chrome-trace",
        json.to_str().unwrap(),
        "-p",
        "main:add",
        "-p",
        "main:outer",
        "-o",
        dir.join("report").to_str().unwrap(),
        "--",
        calls.to_str().unwrap(),
        "seq",
    ]);
    assert_success(&out);
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(
        text.trim_end().ends_with(']'),
        "a finished run closes the array"
    );
    let events: Vec<serde_json::Value> = serde_json::from_str(&text).expect("valid JSON");
    let complete: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let names: Vec<&str> = complete
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    // Written as calls end: the inner adds before outer.
    assert_eq!(names, ["add", "add", "add", "outer"], "{text}");
    let pid = complete[0]["pid"].as_i64().unwrap();
    assert!(
        complete.iter().all(|e| e["pid"] == pid && e["tid"] == pid),
        "{text}"
    );
    assert!(
        events.iter().any(|e| e["ph"] == "M"
            && e["name"] == "thread_name"
            && e["tid"] == pid
            && e["args"]["name"] == "calls"),
        "{text}"
    );
    let span = |e: &serde_json::Value| (ns_of(&e["ts"]), ns_of(&e["ts"]) + ns_of(&e["dur"]));
    let outer = span(complete[3]);
    for (k, e) in complete[..3].iter().enumerate() {
        let (s, end) = span(e);
        let inside = outer.0 <= s && end <= outer.1;
        assert_eq!(inside, k > 0, "add #{k} {:?} vs outer {outer:?}", (s, end));
    }
    assert_eq!(complete[1]["args"]["args"], "a=10, b=1");
    assert_eq!(complete[1]["args"]["return"], "11");
    // No two calls of the thread partly overlap.
    for a in &complete {
        for b in &complete {
            let ((s1, e1), (s2, e2)) = (span(a), span(b));
            assert!(e1 <= s2 || e2 <= s1 || (s1 <= s2 && e2 <= e1) || (s2 <= s1 && e1 <= e2));
        }
    }
}

/// A tracer killed in the middle of a run leaves a file that loads: the events written
/// so far, the array merely unterminated.
#[test]
fn chrome_trace_of_a_killed_run_loads() {
    let dir = temp_dir("trace-killed");
    let calls = build_calls(&dir);
    let json = dir.join("trace.json");
    let mut child = tracer()
        .args([
            "run",
            "--chrome-trace",
            json.to_str().unwrap(),
            "-p",
            "main:add",
            "--",
        ])
        .arg(&calls)
        .args(["many", "1000000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start tracer");
    let grew = wait_until(std::time::Duration::from_secs(60), || {
        std::fs::metadata(&json).is_ok_and(|m| m.len() > 100_000)
    });
    let tracer_pid = child.id() as i32;
    let target = std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children"))
        .unwrap_or_default();
    // SAFETY: kill with our own child's pid.
    unsafe { libc::kill(tracer_pid, libc::SIGKILL) };
    let _ = child.wait();
    for pid in target
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: the program tracer started for this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(grew, "the trace file did not grow");
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(!text.trim_end().ends_with(']'));
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&format!("{}]", text.trim_end())).expect("loads once closed");
    assert!(
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == "add")
            .count()
            > 100
    );
}

/// The Perfetto file, decoded with Perfetto's own message definitions (the
/// `perfetto_protos` crate, generated from its .proto files): a track per thread under
/// the process, and per call a slice begin and end on its thread's track, in time order.
#[test]
fn perfetto_trace_decodes_with_perfettos_definitions() {
    use perfetto_protos::trace::Trace;
    use perfetto_protos::track_event::track_event::Type;
    use protobuf::Message;
    let dir = temp_dir("trace-perfetto");
    let calls = build_calls(&dir);
    let file = dir.join("trace.pftrace");
    let out = tracer_output(&[
        "run",
        "--perfetto",
        file.to_str().unwrap(),
        "-p",
        "main:add",
        "-o",
        dir.join("report").to_str().unwrap(),
        "--",
        calls.to_str().unwrap(),
        "threads",
    ]);
    assert_success(&out);
    let trace = Trace::parse_from_bytes(&std::fs::read(&file).unwrap()).expect("decodes");
    let mut threads: HashMap<u64, i32> = HashMap::new();
    let mut process = None;
    let mut slices: HashMap<u64, Vec<(u64, Type, String)>> = HashMap::new();
    for p in &trace.packet {
        assert_eq!(p.trusted_packet_sequence_id(), 1);
        if p.has_track_descriptor() {
            let d = p.track_descriptor();
            if d.thread.is_some() {
                threads.insert(d.uuid(), d.thread.tid());
                assert_eq!(Some(d.parent_uuid()), process);
            } else if d.process.is_some() {
                process = Some(d.uuid());
                assert_eq!(d.process.process_name(), "calls");
            }
        }
        if p.has_track_event() {
            let e = p.track_event();
            slices.entry(e.track_uuid()).or_default().push((
                p.timestamp(),
                e.type_(),
                e.name().to_string(),
            ));
        }
    }
    assert_eq!(threads.len(), 3, "{threads:?}");
    let begins: usize = slices
        .values()
        .map(|v| v.iter().filter(|s| s.1 == Type::TYPE_SLICE_BEGIN).count())
        .sum();
    assert_eq!(begins, 7, "one slice per call of add");
    for (track, events) in &slices {
        assert!(threads.contains_key(track), "events on an undeclared track");
        assert!(events.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
        // Leaf calls: begin, end, begin, end...
        for pair in events.chunks(2) {
            assert_eq!(pair[0].1, Type::TYPE_SLICE_BEGIN);
            assert_eq!(pair[0].2, "add");
            assert_eq!(pair[1].1, Type::TYPE_SLICE_END);
        }
    }
}

/// What --trace cannot do is refused in one line before anything runs.
#[test]
fn trace_refuses_packs_offsets_and_stray_args() {
    let dir = temp_dir("trace-refuse");
    let calls = build_calls(&dir);
    let c = calls.to_str().unwrap();
    let out = tracer_output(&["run", "--trace", "--pack", "/nonexistent", "--", c, "seq"]);
    assert_one_line_error(&out, &["without --pack"]);
    let unwritable = dir.join("no/such/dir/trace.json");
    let out = tracer_output(&[
        "run",
        "--chrome-trace",
        unwritable.to_str().unwrap(),
        "-p",
        "main:add",
        "--",
        c,
        "seq",
    ]);
    assert_one_line_error(
        &out,
        &["cannot create the trace file", "writable directory"],
    );
    let out = tracer_output(&["run", "--trace", "-p", "main:add+0x4", "--", c, "seq"]);
    assert_one_line_error(&out, &["offset", "whole functions"]);
    let out = tracer_output(&["run", "--args", "2", "-p", "main:add", "--", c, "seq"]);
    assert_one_line_error(&out, &["--args N goes with --trace"]);
    let out = tracer_output(&[
        "run",
        "--trace",
        "--trace-ring",
        "5000",
        "-p",
        "main:add",
        "--",
        c,
    ]);
    assert_one_line_error(&out, &["--trace-ring 5000", "power of two"]);
}

/// A function probed at entry only (`_start`: no return address to take) is a line of
/// its own and an instant event, and `main` encloses the calls its thread makes.
#[test]
fn entries_only_functions_and_main_enclosing_its_calls() {
    let dir = temp_dir("trace-entries");
    let calls = build_calls(&dir);
    let json = dir.join("trace.json");
    let (text, _) = traced(
        &dir,
        &calls,
        &[
            "--trace",
            "--chrome-trace",
            json.to_str().unwrap(),
            "-p",
            "main:_start",
            "-p",
            "main:main",
            "-p",
            "main:add",
        ],
        &["threads"],
    );
    let lines = trace_lines(&text);
    let pid = lines
        .iter()
        .find(|l| l.body.starts_with("_start("))
        .expect("_start")
        .tid;
    let main_thread: Vec<&Line> = lines.iter().filter(|l| l.tid == pid).collect();
    assert_eq!(main_thread.len(), 4, "{text}");
    assert!(!main_thread[0].has_duration, "{text}");
    assert!(
        main_thread[1].body.starts_with("main(argc=2, argv=0x"),
        "{text}"
    );
    assert!(main_thread[1].body.ends_with(") {"), "{text}");
    assert_eq!(main_thread[2].body, "  add(a=7, b=8) = 15");
    assert_eq!(main_thread[3].body, "} main = 0");
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let instants: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "i").collect();
    assert_eq!(instants.len(), 1);
    assert_eq!(instants[0]["name"], "_start");
    // main's span holds every call of its own thread.
    let span = |e: &serde_json::Value| (ns_of(&e["ts"]), ns_of(&e["ts"]) + ns_of(&e["dur"]));
    let main = events
        .iter()
        .find(|e| e["name"] == "main")
        .expect("main event");
    let (s, e) = span(main);
    for add in events
        .iter()
        .filter(|e| e["name"] == "add" && e["tid"] == pid as i64)
    {
        let (a, b) = span(add);
        assert!(s <= a && b <= e);
    }
}

/// A child made by `fork` runs the probes it inherited, but `--trace` does not follow
/// children (as `ltrace`/`strace` without `-f`): the child writes into a private copy of
/// the trace region, so the parent's trace holds exactly the parent's two calls, under
/// its own id, and nothing of the child's.
#[test]
fn a_forked_childs_calls_stay_out_of_the_parents_trace() {
    let dir = temp_dir("trace-fork");
    let calls = build_calls(&dir);
    let (text, out) = traced(&dir, &calls, &["--trace", "-p", "main:add"], &["fork"]);
    let child: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("child=")
        .and_then(|c| c.parse().ok())
        .expect("child=PID");
    let lines = trace_lines(&text);
    let bodies: Vec<&str> = lines.iter().map(|l| l.body.as_str()).collect();
    assert_eq!(bodies, ["add(a=1, b=1) = 2", "add(a=3, b=3) = 6"], "{text}");
    assert_eq!(lines[0].tid, lines[1].tid, "{text}");
    assert_ne!(lines[0].tid, child, "{text}");
}

/// `outer` ends in a tail call (`jmp inner`, as GCC emits at -O2): `inner` runs on
/// `outer`'s frame, its entry at the same stack slot, and returns for both. The trace
/// still nests `inner` inside `outer`, each with its return value, nothing lost.
#[test]
fn a_tail_call_nests_inside_its_caller() {
    const TAIL_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int inner(int x) { return x * 3 + (x >> 2) * 5; }
int outer(int x);
/* outer(x) = inner(x + 1), by a jump that reuses outer's frame. */
__asm__(".text\n.globl outer\n.type outer, @function\nouter:\n"
        "  push %rbx\n  lea 1(%rdi), %ebx\n  mov %ebx, %edi\n  pop %rbx\n"
        "  jmp inner\n.size outer, .-outer\n");
int main(int argc, char **argv) {
    long s = 0;
    for (int i = 0; i < 2; i++) s += outer(i);
    printf("s=%ld\n", s);
    return 0;
}
"#;
    let dir = temp_dir("trace-tail");
    let tail = cc(&dir, "tail", TAIL_C, &["-O2", "-fno-inline"]);
    let file = dir.join("trace.txt");
    let out = tracer_output(&[
        "run",
        "--trace",
        "-p",
        "main:outer",
        "-p",
        "main:inner",
        "-o",
        file.to_str().unwrap(),
        "--",
        tail.to_str().unwrap(),
    ]);
    assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "s=9\n");
    let text = std::fs::read_to_string(&file).expect("trace output");
    let bodies: Vec<String> = trace_lines(&text).into_iter().map(|l| l.body).collect();
    assert_eq!(bodies.len(), 6, "{text}");
    for (call, x) in bodies.chunks(3).zip([0, 1]) {
        assert!(
            call[0].starts_with("outer(") && call[0].ends_with(" {"),
            "{text}"
        );
        assert_eq!(
            call[1],
            format!("  inner(x={}) = {}", x + 1, 3 * (x + 1)),
            "{text}"
        );
        assert_eq!(call[2], format!("}} outer = {:#x}", 3 * (x + 1)), "{text}");
    }
    assert!(!text.contains("not seen"), "{text}");
}

/// Without `-o`, trace lines go to stderr (as ltrace's do): the program's stdout is its
/// own, byte for byte, so `tracer run --trace -- CMD > out` leaves `out` as CMD wrote it.
#[test]
fn trace_lines_leave_the_programs_stdout_alone() {
    let dir = temp_dir("trace-stderr");
    let calls = build_calls(&dir);
    let plain = std::process::Command::new(&calls)
        .arg("seq")
        .output()
        .expect("untraced run");
    let out = tracer_output(&[
        "run",
        "--trace",
        "-p",
        "main:add",
        "--",
        calls.to_str().unwrap(),
        "seq",
    ]);
    assert_success(&out);
    assert_eq!(
        out.stdout, plain.stdout,
        "trace lines in the program's stdout"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("add(a=2, b=3) = 5"), "{err}");
}
