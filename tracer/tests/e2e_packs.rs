//! Probe packs end to end: the example packs and a test pack built with cargo, loaded by
//! `tracer run --pack` and `tracer attach --pack` into a C program built here, which
//! counts what it does itself; bad packs refused with the target untouched.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const TARGET_C: &str = include_str!("programs/pack_target.c");

fn testpack() -> PathBuf {
    build_pack(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/packs/testpack"),
        "testpack",
        &[],
    )
}

fn build_program(dir: &Path) -> PathBuf {
    cc(dir, "pack_target", TARGET_C, &["-pie", "-fPIE"])
}

/// `key=value` from the program's result line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .unwrap()
}

/// The map named `name` among the JSON output lines.
fn map<'a>(lines: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|v| v["map"] == name)
        .unwrap_or_else(|| panic!("no map {name} in {lines:?}"))
}

fn hash_value(m: &serde_json::Value, key: &str) -> u64 {
    m["data"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == key)
        .and_then(|e| e["value"].as_u64())
        .unwrap_or_else(|| panic!("no key {key} in {m}"))
}

fn hash_sum(m: &serde_json::Value) -> u64 {
    m["data"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["value"].as_u64().unwrap())
        .sum()
}

fn hist_sum(m: &serde_json::Value) -> u64 {
    m["data"]["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum()
}

/// `tracer run --json -o FILE ARGS -- program PROGRAM_ARGS`, checked to exit 0 with the
/// program's stdout as an untraced run prints it; returns the output lines and stdout.
fn run_json(
    dir: &Path,
    program: &Path,
    tracer_args: &[&str],
    program_args: &[&str],
) -> (Vec<serde_json::Value>, String) {
    let plain = Command::new(program).args(program_args).output().unwrap();
    let out_file = dir.join("out.json");
    let mut args = vec!["run", "--json", "-o", out_file.to_str().unwrap()];
    args.extend_from_slice(tracer_args);
    args.push("--");
    args.push(program.to_str().unwrap());
    args.extend_from_slice(program_args);
    let out = tracer_output(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tracer failed: {err}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // Fault injection changes what the program sees, by design.
    if !tracer_args.iter().any(|a| a.contains("faults")) {
        assert_eq!(
            out.stdout, plain.stdout,
            "traced stdout differs; stderr: {err}"
        );
    }
    let text = std::fs::read_to_string(&out_file).unwrap();
    (json_lines(&text), stdout)
}

/// `tracer attach PID --json ARGS` on the program started with `wait`: returns the
/// program's result line and tracer's output lines once the program exited.
fn attach_json(
    program: &Path,
    tracer_args: &[&str],
    program_args: &[&str],
) -> (String, Vec<serde_json::Value>) {
    let mut args: Vec<&str> = program_args.to_vec();
    args.push("wait");
    let mut t = Target::spawn(program, &args);
    assert_eq!(t.line(), "ready");
    let r = attach_session(&mut t, tracer_args, false);
    assert!(t.finish().1);
    r
}

/// One `tracer attach --json` session on `t` (started with `wait`): probes live, one
/// round of the program's work, then the session ends: by SIGINT to tracer when
/// `interrupt`, else by the program's exit (sent "stop"). Returns the program's result
/// line and tracer's JSON lines.
fn attach_session(
    t: &mut Target,
    tracer_args: &[&str],
    interrupt: bool,
) -> (String, Vec<serde_json::Value>) {
    let pid = t.pid().to_string();
    let mut tr = tracer()
        .args(["attach", &pid, "--json"])
        .args(tracer_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let events = read_all(tr.stdout.take().unwrap());
    let mut err = BufReader::new(tr.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        assert!(err.read_line(&mut l).unwrap() > 0, "tracer ended: {seen}");
        seen.push_str(&l);
        if l.contains("live in") {
            break;
        }
    }
    let stdin = t.stdin.as_mut().unwrap();
    stdin.write_all(b"go\n").unwrap();
    let result = t.line();
    if interrupt {
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(tr.id() as i32, libc::SIGINT) };
    } else {
        t.stdin.as_mut().unwrap().write_all(b"stop\n").unwrap();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(tr.wait().unwrap().success(), "tracer failed: {seen}{rest}");
    let lines = (events.join().unwrap() + &seen + &rest)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (result, lines)
}

/// Everything `r` gives until its end, read by a thread (so that a pipe never fills).
fn read_all(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        s
    })
}

/// The mallocs example: its size hash map holds exactly the program's own 300 mallocs
/// of 12345 bytes; the histogram, the hash map and the tracer's counter agree on every
/// malloc call seen, entries and returns alike.
fn check_mallocs(lines: &[serde_json::Value]) {
    assert_eq!(hash_value(map(lines, "BY_SIZE"), "12345"), 300);
    let hits = num(report(lines, "libc:malloc"), "hits");
    assert!(hits >= 300);
    assert_eq!(num(report(lines, "libc:malloc"), "exits"), hits);
    assert_eq!(hist_sum(map(lines, "SIZES")), hits);
    assert_eq!(hash_sum(map(lines, "BY_SIZE")), hits);
    assert_eq!(map(lines, "FAILS")["data"]["value"], 0);
}

#[test]
fn mallocs_under_run_counts_the_programs_own_mallocs() {
    let dir = temp_dir("pack-mallocs-run");
    let program = build_program(dir.path());
    let so = example_pack("mallocs");
    // `-p` probes beside the pack's; the one on the pack's own function gives way.
    let (lines, _) = run_json(
        dir.path(),
        &program,
        &[
            "--pack",
            so.to_str().unwrap(),
            "-p",
            "libc:malloc",
            "-p",
            "libc:free",
        ],
        &["300", "0", "0", "0"],
    );
    // Read after the program exited: the maps live in memory the tracer mapped.
    check_mallocs(&lines);
    let probes: Vec<_> = lines.iter().filter_map(|v| v["probe"].as_str()).collect();
    assert_eq!(probes, ["libc:malloc", "libc:free"]);
    assert!(num(report(&lines, "libc:free"), "hits") >= 300);
}

#[test]
fn mallocs_under_attach_counts_the_programs_own_mallocs() {
    let dir = temp_dir("pack-mallocs-attach");
    let program = build_program(dir.path());
    let so = example_pack("mallocs");
    let (result, lines) = attach_json(
        &program,
        &["--pack", so.to_str().unwrap()],
        &["300", "0", "0", "0"],
    );
    assert_eq!(field(&result, "mallocs"), 300);
    check_mallocs(&lines);
}

/// Sessions in a row on one process with the same pack: later ones reuse the pack, its
/// region (emptied) and its probe, so the process does not grow; each counts exactly the
/// program's work in its window.
#[test]
fn mallocs_twice_in_one_process_counts_each_window() {
    let dir = temp_dir("pack-mallocs-twice");
    let program = build_program(dir.path());
    let so = example_pack("mallocs");
    let mut t = Target::spawn(&program, &["300", "0", "0", "0", "wait"]);
    assert_eq!(t.line(), "ready");
    let maps_file = format!("/proc/{}/maps", t.pid());
    // The program's own heap may grow or shrink; every other mapping must stay.
    let mappings = || {
        std::fs::read_to_string(&maps_file)
            .unwrap()
            .lines()
            .filter(|l| !l.ends_with("[heap]"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut after_first = None;
    for _ in 0..3 {
        let (result, lines) = attach_session(&mut t, &["--pack", so.to_str().unwrap()], true);
        assert_eq!(field(&result, "mallocs"), 300);
        check_mallocs(&lines);
        let now = mappings();
        assert_eq!(
            after_first.get_or_insert_with(|| now.clone()),
            &now,
            "the process grew"
        );
    }
    assert_eq!(tracer_pid(t.pid()), 0);
    let (last, ok) = t.finish();
    assert!(ok && last.is_empty(), "{last}");
}

/// The faults example on a program that counts its own failed calls and checks errno:
/// of 300 consecutive rounds of `malloc` then `open`, exactly 100 of each fail (every
/// third call, wherever the pack's count started), every failure with the errno the C
/// library's contract gives (ENOMEM, ENOENT), and no descriptor leaks.
#[test]
fn faults_make_every_third_malloc_and_open_fail_with_errno_under_run_and_attach() {
    let dir = temp_dir("pack-faults");
    let program = cc(
        dir.path(),
        "faults_target",
        include_str!("programs/faults_target.c"),
        &["-pie", "-fPIE"],
    );
    let so = example_pack("faults");
    let check = |result: &str, lines: &[serde_json::Value]| {
        assert_eq!(field(result, "rounds"), 300, "{result}");
        for (failures, errno) in [("malloc_failures", "enomem"), ("open_failures", "enoent")] {
            assert_eq!(field(result, failures), 100, "{result}");
            assert_eq!(field(result, errno), 100, "{result}");
        }
        assert_eq!(field(result, "leaked_fd"), 0, "{result}");
        let value = |name| map(lines, name)["data"]["value"].as_u64().unwrap();
        assert_eq!(
            value("MALLOC_CALLS"),
            num(report(lines, "libc:malloc"), "exits")
        );
        assert_eq!(value("OPEN_CALLS"), num(report(lines, "libc:open"), "hits"));
        assert!(value("MALLOC_FAILED") >= 100);
        assert!(value("OPEN_FAILED") >= 100);
    };
    let (lines, stdout) = run_json(
        dir.path(),
        &program,
        &["--pack", so.to_str().unwrap()],
        &["300"],
    );
    check(stdout.lines().nth(1).unwrap(), &lines);

    let (result, lines) = attach_json(&program, &["--pack", so.to_str().unwrap()], &["300"]);
    check(&result, &lines);
}

/// Given the crate directory, tracer builds the pack itself; one handler pair on a glob
/// sees each function under its own name.
#[test]
fn latency_built_from_its_directory_keys_each_function_by_name() {
    let dir = temp_dir("pack-latency");
    let program = build_program(dir.path());
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/latency");
    let (lines, _) = run_json(
        dir.path(),
        &program,
        &["--pack", crate_dir.to_str().unwrap()],
        &["0", "40", "0", "0"],
    );
    // 40 callocs, and one for the program's own array.
    assert_eq!(hash_value(map(&lines, "CALLS"), "\"libc:calloc\""), 41);
    let by_fn = map(&lines, "BY_FUNCTION");
    let calloc_returns: u64 = by_fn["data"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["key"].as_str().unwrap().starts_with("\"libc:calloc 2^"))
        .map(|e| e["value"].as_u64().unwrap())
        .sum();
    assert_eq!(calloc_returns, 41);
    assert_eq!(hist_sum(map(&lines, "LATENCY_NS")), hash_sum(by_fn));
}

/// The README's walk-through, step by step: `tracer new`, the latency example copied
/// over its `src/lib.rs`, its one spec line changed, run with `tracer run --pack DIR`.
#[test]
fn the_readme_walk_through_new_copy_change_one_line_run() {
    let dir = temp_dir("pack-walk");
    let program = build_program(dir.path());
    let out = tracer()
        .args(["new", "mylat"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = dir.path().join("mylat/src/lib.rs");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/latency/src/lib.rs");
    let text = std::fs::read_to_string(example).unwrap();
    assert_eq!(
        text.matches("\"libc:*alloc\"").count(),
        1,
        "one line to change"
    );
    std::fs::write(&lib, text.replace("\"libc:*alloc\"", "\"libc:calloc\"")).unwrap();
    let crate_dir = dir.path().join("mylat");
    let (lines, _) = run_json(
        dir.path(),
        &program,
        &["--pack", crate_dir.to_str().unwrap()],
        &["0", "40", "0", "0"],
    );
    let calls = map(&lines, "CALLS");
    assert_eq!(hash_value(calls, "\"libc:calloc\""), 41);
    assert_eq!(hash_sum(calls), 41, "only calloc is probed: {calls}");
    let probes: Vec<_> = lines.iter().filter_map(|v| v["probe"].as_str()).collect();
    assert_eq!(probes, ["libc:calloc"]);
}

/// Every event the handler emitted is either received (and printed once) or counted as
/// dropped; a handler that panics disables its probe, counted, and the program's output
/// is that of an untraced run (checked in `run_json`).
#[test]
fn events_are_accounted_for_and_a_panicking_handler_is_disabled() {
    let dir = temp_dir("pack-events");
    let program = build_program(dir.path());
    let so = testpack();
    const TICKS: u64 = 60_000;
    let ticks = TICKS.to_string();
    let (lines, _) = run_json(
        dir.path(),
        &program,
        &["--pack", so.to_str().unwrap()],
        &["0", "0", &ticks, "50"],
    );
    let events: Vec<_> = lines.iter().filter(|v| v.get("event").is_some()).collect();
    let summary = lines
        .iter()
        .find_map(|v| v.get("events"))
        .expect("events summary");
    let received = summary["received"].as_u64().unwrap();
    let dropped = summary["dropped"].as_u64().unwrap();
    assert_eq!(received, events.len() as u64);
    assert_eq!(received + dropped, TICKS, "{summary}");
    assert_eq!(summary["bad"], 0, "{summary}");
    for (i, e) in events.iter().enumerate().take(100) {
        // In order, named after the probe as resolved.
        assert_eq!(e["event"], format!("tick {i} at main:tick"));
    }
    assert_eq!(map(&lines, "TICKS")["data"]["value"], TICKS);
    assert_eq!(num(report(&lines, "main:tick"), "hits"), TICKS);
    let boom = report(&lines, "main:boom");
    assert_eq!(num(boom, "panics"), 1, "{boom}");
    assert_eq!(num(boom, "hits"), 1, "{boom}");
}

/// Events print live, one line each, on stdout (here shared with the program's own
/// lines), the report on stderr once the events are done; with `--json -o FILE` both go
/// to the file, every line a JSON object whose `type` says what it is, every event
/// before the report.
#[test]
fn events_go_to_stdout_one_per_line_and_the_report_after_them() {
    let dir = temp_dir("pack-streams");
    let program = build_program(dir.path());
    let so = testpack();
    let prog = program.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--pack", so.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", prog, "0", "0", "200", "0"]);
        let out = tracer_output(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), err)
    };
    let ticks: Vec<String> = (0..200).map(|i| format!("tick {i} at main:tick")).collect();

    let (stdout, stderr) = run(&[]);
    let (program_lines, events): (Vec<&str>, Vec<&str>) =
        stdout.lines().partition(|l| !l.starts_with("tick "));
    assert_eq!(events, ticks, "{stdout}");
    assert_eq!(program_lines.len(), 2, "{stdout}");
    assert!(!stderr.lines().any(|l| l.starts_with("tick ")), "{stderr}");
    let report_at = |what: &str| {
        stderr
            .find(what)
            .unwrap_or_else(|| panic!("no {what:?}: {stderr}"))
    };
    assert!(report_at("@TICKS: 200") < report_at("events: 200 received, 0 dropped"));
    assert!(report_at("events: 200 received") < report_at("main:tick"));

    let (stdout, stderr) = run(&["--json"]);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 200);
    assert!(events.iter().all(|e| e["type"] == "event"), "{stdout}");
    for l in stderr.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            ["map", "events", "probe"].contains(&v["type"].as_str().unwrap()),
            "{l}"
        );
    }

    let file = dir.path().join("out.json");
    let (stdout, _) = run(&["--json", "-o", file.to_str().unwrap()]);
    assert_eq!(stdout.lines().count(), 2, "events went to stdout: {stdout}");
    let lines = json_lines(&std::fs::read_to_string(&file).unwrap());
    let types: Vec<&str> = lines.iter().map(|v| v["type"].as_str().unwrap()).collect();
    let first_other = types.iter().position(|&t| t != "event").unwrap();
    assert_eq!(first_other, 200, "{types:?}");
    let rest = &types[first_other..];
    assert_eq!(
        rest,
        ["map", "map", "events", "probe", "probe"],
        "{types:?}"
    );
    for (e, want) in lines.iter().zip(&ticks) {
        assert_eq!(e["event"], *want);
    }
}

/// A process that refused packs leave exactly as it was: nothing loaded, not traced, and
/// it computes what it computes untraced.
fn assert_refused_untouched(pack: &Path, needles: &[&str]) {
    let dir = temp_dir("pack-refused");
    let program = build_program(dir.path());
    let mut t = Target::spawn(&program, &["300", "0", "10", "10", "wait"]);
    assert_eq!(t.line(), "ready");
    let maps_before = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    let out = tracer_output(&[
        "attach",
        &t.pid().to_string(),
        "--pack",
        pack.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, needles);
    let maps_after = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    assert_eq!(maps_before, maps_after, "the target's mappings changed");
    assert_eq!(tracer_pid(t.pid()), 0);
    t.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let result = t.line();
    let plain = Command::new(&program)
        .args(["300", "0", "10", "10"])
        .output()
        .unwrap();
    assert_eq!(
        result,
        String::from_utf8_lossy(&plain.stdout)
            .lines()
            .nth(1)
            .unwrap()
    );
    assert!(t.finish().1);
}

#[test]
fn a_pack_with_another_abi_version_is_refused_with_the_target_untouched() {
    let dir = temp_dir("pack-abi");
    let mut bytes = std::fs::read(testpack()).unwrap();
    // Every descriptor: magic "TPK\0" then the ABI version.
    let mut magic = b"TPK\0".to_vec();
    magic.extend_from_slice(&probes::pack::abi::ABI_VERSION.to_le_bytes());
    let mut n = 0;
    for i in 0..bytes.len() - 8 {
        if bytes[i..i + 8] == magic[..] {
            bytes[i + 4..i + 8].copy_from_slice(&99u32.to_le_bytes());
            n += 1;
        }
    }
    assert!(n >= 2);
    let bad = dir.path().join("libold.so");
    std::fs::write(&bad, bytes).unwrap();
    assert_refused_untouched(&bad, &["ABI v99", "rebuild"]);
}

#[test]
fn a_plain_library_is_refused_as_not_a_pack_with_the_target_untouched() {
    let dir = temp_dir("pack-plain");
    let lib = cc(
        dir.path(),
        "libplain.so",
        LIBTARGET_C,
        &["-shared", "-fPIC"],
    );
    assert_refused_untouched(&lib, &["not a probe pack"]);
}

/// `tracer run` with a bad pack refuses before launching anything.
#[test]
fn run_refuses_a_bad_pack_before_launching() {
    let dir = temp_dir("pack-run-refused");
    let lib = cc(
        dir.path(),
        "libplain.so",
        LIBTARGET_C,
        &["-shared", "-fPIC"],
    );
    let marker = dir.path().join("launched");
    let out = tracer_output(&[
        "run",
        "--pack",
        lib.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &format!("touch {}", marker.display()),
    ]);
    assert_one_line_error(&out, &["not a probe pack"]);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!marker.exists(), "the command ran");
}

/// Pack handlers (entry and return, floating-point work inside) on the functions of a
/// program whose callers keep values in call-clobbered registers across them and call
/// them misaligned (see `e2e_registers.rs`): its output is that of an untraced run.
#[test]
fn pack_handlers_keep_every_register_of_ipa_ra_callers() {
    let dir = temp_dir("pack-ipa-ra");
    let binary = cc(
        dir.path(),
        "ipa_ra",
        include_str!("../../tests/programs/ipa_ra.c"),
        &[
            "-O2",
            "-fipa-ra",
            "-fipa-stack-alignment",
            "-no-pie",
            "-fno-pie",
        ],
    );
    let so = testpack();
    let (lines, _) = run_json(
        dir.path(),
        &binary,
        &[
            "--pack",
            so.to_str().unwrap(),
            "-x",
            "-p",
            "main:grow",
            "-p",
            "main:mix",
            "-p",
            "main:small",
        ],
        &["2000"],
    );
    for (probe, calls) in [
        ("main:tick", 6000),
        ("main:tock", 6000),
        ("main:small", 2000),
    ] {
        let r = report(&lines, probe);
        assert_eq!((num(r, "hits"), num(r, "exits")), (calls, calls), "{r}");
    }
    // What the handlers' stubs save is reported per probe (which registers depends on
    // the code the handlers reach, libm's included); counting probes have none.
    let saves = &report(&lines, "main:tick")["saves"];
    assert!(
        saves["entry"].is_string() && saves["exit"].is_string(),
        "{saves}"
    );
    assert!(report(&lines, "main:tock")["saves"]["exit"].is_string());
    assert!(report(&lines, "main:grow")["saves"].is_null());
    assert_eq!(hist_sum(map(&lines, "RETURNS")), 12000);
    assert_eq!(map(&lines, "TICKS")["data"]["value"], 6000);
}

/// Build the hot swap pack with `feature` (none for v1) and keep a copy of its library
/// in `dir/NAME/libhotswap.so` (the builds share one output path).
fn hotswap_build(dir: &Path, name: &str, feature: Option<&str>) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/packs/hotswap");
    let built = build_pack(&crate_dir, "hotswap", feature.as_slice());
    let copy = dir.join(name).join("libhotswap.so");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(built, &copy).unwrap();
    copy
}

/// While 4 threads call the probed function nonstop, a second `tracer attach --pack`
/// with a new build of the running pack swaps its handler in: a build that changes the
/// maps is refused first; after the swap the running session's map holds, under the
/// two versions, exactly the calls the program made, no hit lost or counted twice. The
/// new build's events have a format the running session did not start with: it prints
/// them (read from the build now mapped in the target), and the old build's still.
#[test]
fn a_new_build_is_swapped_in_under_load_without_losing_or_doubling_a_hit() {
    let dir = temp_dir("pack-hotswap");
    let v1 = hotswap_build(dir.path(), "v1", None);
    let v2 = hotswap_build(dir.path(), "v2", Some("v2"));
    let v3 = hotswap_build(dir.path(), "v3", Some("v3"));
    let program = cc(
        dir.path(),
        "hot_target",
        include_str!("programs/hot_target.c"),
        &["-pie", "-fPIE", "-pthread"],
    );
    let mut t = Target::spawn(&program, &[]);
    assert_eq!(t.line(), "ready");
    let pid = t.pid().to_string();
    let mut first = tracer()
        .args(["attach", &pid, "--json", "--pack", v1.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Events, live, one JSON line each on stdout.
    let (tx, events) = std::sync::mpsc::channel::<serde_json::Value>();
    let out = BufReader::new(first.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for l in out.lines() {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            assert_eq!(v["type"], "event", "{v}");
            let _ = tx.send(v);
        }
    });
    let mut err = BufReader::new(first.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("live in") {
        let mut l = String::new();
        assert!(err.read_line(&mut l).unwrap() > 0, "tracer ended: {seen}");
        seen.push_str(&l);
    }
    let stdin = t.stdin.as_mut().unwrap();
    stdin.write_all(b"go\n").unwrap();
    assert_eq!(t.line(), "running");
    let mut printed = Vec::new();
    let until = |text: &str, printed: &mut Vec<serde_json::Value>| {
        while !printed
            .iter()
            .any(|e| e["event"].as_str().unwrap().starts_with(text))
        {
            // A bound against a hang, not a timing assertion: events come every ms.
            let e = events.recv_timeout(Duration::from_secs(60));
            printed.push(e.unwrap_or_else(|_| {
                let last = printed.last();
                panic!(
                    "no {text:?} event in {} printed, the last {last:?}",
                    printed.len()
                )
            }));
        }
    };
    until("v1 hit ", &mut printed);

    let refused = tracer_output(&["attach", &pid, "--pack", v3.to_str().unwrap()]);
    assert_one_line_error(&refused, &["changes its maps", "refused"]);
    let swapped = tracer_output(&["attach", &pid, "--pack", v2.to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&swapped.stderr);
    assert!(swapped.status.success(), "{msg}");
    assert!(msg.contains("1 handler(s) replaced"), "{msg}");
    until("v2 hit ", &mut printed);

    t.stdin.as_mut().unwrap().write_all(b"stop\n").unwrap();
    let total = field(&t.line(), "total");
    assert!(t.child.wait().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(first.wait().unwrap().success(), "{seen}{rest}");
    reader.join().unwrap();
    printed.extend(events.try_iter());
    let lines: Vec<serde_json::Value> = rest
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let m = map(&lines, "BY_VERSION");
    let v1_hits = hash_value(m, "1");
    let v2_hits = hash_value(m, "2");
    assert!(v2_hits >= 4000, "{m}");
    assert_eq!(v1_hits + v2_hits, total, "{m}");
    assert_eq!(num(report(&lines, "main:hot"), "hits"), total);
    // Every record either printed with its own build's format, or dropped; none unknown.
    let summary = lines
        .iter()
        .find(|v| v["type"] == "events")
        .expect("summary");
    assert_eq!(summary["events"]["bad"], 0, "{summary}");
    assert_eq!(
        summary["events"]["received"].as_u64().unwrap(),
        printed.len() as u64
    );
    for e in &printed {
        let text = e["event"].as_str().unwrap();
        let n = e["args"][0].as_u64().unwrap();
        assert_eq!(n % 1024, 0, "{e}");
        match e["format"].as_str().unwrap() {
            "v1 hit {}" => assert_eq!(text, format!("v1 hit {n}")),
            "v2 hit {} of build {}" => assert_eq!(text, format!("v2 hit {n} of build 2")),
            other => panic!("format {other:?}"),
        }
    }
}

/// A forked child keeps the pack's handlers (copied memory) but writes into a private
/// copy of the pack's maps and ring: the parent's maps hold the parent's own mallocs
/// only. The parent mallocs 12345 bytes 30 times after forking 3 children that each
/// malloc them 200 times.
#[test]
fn a_forked_childs_mallocs_stay_out_of_the_parents_maps() {
    const FORKS_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
void *volatile kept;
static void mallocs(int n)
{
    for (int i = 0; i < n; i++) {
        kept = malloc(12345);
        free(kept);
    }
}
int main(void)
{
    for (int c = 0; c < 3; c++)
        if (fork() == 0) {
            mallocs(200);
            _exit(0);
        }
    mallocs(30);
    while (wait(NULL) > 0) {
    }
    printf("done\n");
    return 0;
}
"#;
    let dir = temp_dir("pack-fork");
    let program = cc(dir.path(), "pack_forks", FORKS_C, &[]);
    let so = example_pack("mallocs");
    let (lines, stdout) = run_json(
        dir.path(),
        &program,
        &["--pack", so.to_str().unwrap(), "-p", "libc:malloc"],
        &[],
    );
    assert_eq!(stdout, "done\n");
    assert_eq!(hash_value(map(&lines, "BY_SIZE"), "12345"), 30, "{lines:?}");
    let hits = num(report(&lines, "libc:malloc"), "hits");
    assert_eq!(num(report(&lines, "libc:malloc"), "exits"), hits);
    assert_eq!(hist_sum(map(&lines, "SIZES")), hits, "{lines:?}");
    assert_eq!(hash_sum(map(&lines, "BY_SIZE")), hits, "{lines:?}");
}
