//! `tracer run` end to end: real programs launched with probes live before main.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;

/// Parses `calls=N main_calls=M result=R` printed by target.c.
fn counters(stdout: &[u8]) -> (u64, u64) {
    let s = String::from_utf8_lossy(stdout);
    let field = |k: &str| -> u64 {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {s:?}"))
            .parse()
            .expect("number")
    };
    (field("calls="), field("main_calls="))
}

/// Hits of `libtarget:work` equal the program's own call counter, the program's stdout
/// is byte-identical to an untraced run, nothing else goes to stdout, and exit code 3 is
/// forwarded.
#[test]
fn run_counts_hits_and_forwards_exit_code() {
    let dir = temp_dir("run");
    let target = build_target(&dir);
    let t = target.to_str().unwrap();

    let plain = std::process::Command::new(&target)
        .arg("5000")
        .output()
        .expect("untraced run");
    assert_eq!(plain.status.code(), Some(3));
    let (calls, _) = counters(&plain.stdout);
    assert_eq!(calls, 5000);

    let json = dir.join("out.json");
    let out = tracer_output(&[
        "run",
        "-p",
        "libtarget:work",
        "--json",
        "-o",
        json.to_str().unwrap(),
        "--",
        t,
        "5000",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {err}");
    assert_eq!(
        out.stdout, plain.stdout,
        "traced stdout differs; stderr: {err}"
    );

    let reports = json_lines(&std::fs::read_to_string(&json).expect("read -o file"));
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = report(&reports, "libtarget:work");
    assert_eq!(num(r, "hits"), calls, "{r}");
    assert_eq!(num(r, "skipped"), 0, "{r}");
    assert_eq!(r["symbol"], "work");
    assert!(
        r["module"].as_str().unwrap().ends_with("/libtarget.so"),
        "{r}"
    );
    assert!(hex(r["address"].as_str().unwrap()) != 0);
    assert!(r.get("exits").is_none(), "exits reported without -x: {r}");
}

/// A program killed by a signal makes tracer die of the same signal (the shell sees
/// what the program did), after the program's output and the report.
#[test]
fn run_forwards_death_by_signal() {
    let dir = temp_dir("sig");
    let target = build_target(&dir);
    let t = target.to_str().unwrap();

    let plain = std::process::Command::new(&target)
        .args(["300", "die"])
        .output()
        .expect("untraced run");
    assert_eq!(plain.status.signal(), Some(libc::SIGUSR1));

    let json = dir.join("out.json");
    let out = tracer_output(&[
        "run",
        "-p",
        "libtarget:work",
        "--json",
        "-o",
        json.to_str().unwrap(),
        "--",
        t,
        "300",
        "die",
    ]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGUSR1),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, plain.stdout);
    let reports = json_lines(&std::fs::read_to_string(&json).expect("report written"));
    assert_eq!(num(report(&reports, "libtarget:work"), "hits"), 300);
}

/// A probe in the PIE executable (more than 2 GiB from the agent and the libraries, so
/// the trampoline cannot reach the handler with rel32) and one in a shared library in
/// the same run, both with exit probes: hits match the program's counters and every
/// entry has its exit.
#[test]
fn run_main_and_library_probes_with_exits() {
    let dir = temp_dir("main");
    let target = build_target(&dir);
    let t = target.to_str().unwrap();

    let json = dir.join("out.json");
    let out = tracer_output(&[
        "run",
        "-x",
        "-p",
        "main:mainfn",
        "-p",
        "libtarget:work",
        "--json",
        "-o",
        json.to_str().unwrap(),
        "--",
        t,
        "4001",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {err}");
    let (calls, main_calls) = counters(&out.stdout);
    assert_eq!((calls, main_calls), (4001, 2001));

    let reports = json_lines(&std::fs::read_to_string(&json).expect("read -o file"));
    assert_eq!(reports.len(), 2, "{reports:?}");
    let m = report(&reports, "main:mainfn");
    let l = report(&reports, "libtarget:work");
    assert_eq!(num(m, "hits"), main_calls, "{m}");
    assert_eq!(num(l, "hits"), calls, "{l}");
    for r in [m, l] {
        assert_eq!(num(r, "exits"), num(r, "hits"), "{r}");
        assert_eq!(num(r, "lost_exits"), 0, "{r}");
        assert_eq!(num(r, "skipped"), 0, "{r}");
    }
    assert_eq!(m["module"].as_str(), target.to_str());

    let ma = hex(m["address"].as_str().unwrap());
    let la = hex(l["address"].as_str().unwrap());
    assert!(
        ma.abs_diff(la) > 1 << 32,
        "PIE executable unexpectedly near the libraries: {ma:#x} vs {la:#x}"
    );
    let enc = |r: &serde_json::Value| r["encoding"].as_str().unwrap().to_string();
    let known = ["rel32", "rip-slot", "abs32", "abs64"];
    assert!(known.contains(&enc(l).as_str()), "{l}");
    assert!(
        ["rip-slot", "abs32", "abs64"].contains(&enc(m).as_str()),
        "a far site needs a far call encoding: {m}"
    );
}

/// C++ exceptions thrown through exit-probed frames are still caught by their handlers
/// upstream (the agent's unwinder hooks put real return addresses back before the
/// unwinder walks the stack), the program's output is unchanged, and returns that did
/// happen are all counted.
#[test]
fn cxx_exceptions_through_exit_probes() {
    let dir = temp_dir("cxx");
    let prog = cxx(&dir, "exceptions", EXCEPTIONS_CC, &[]);
    let plain = std::process::Command::new(&prog).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "caught=1000 sum=6004000\n"
    );
    let json = dir.join("report.json");
    let traced = tracer()
        .args([
            "run",
            "-x",
            "-p",
            "main:middle",
            "-p",
            "main:thrower",
            "--json",
            "-o",
        ])
        .arg(&json)
        .arg("--")
        .arg(&prog)
        .output()
        .unwrap();
    assert_eq!(traced.status.code(), Some(0), "{traced:?}");
    assert_eq!(traced.stdout, plain.stdout);
    let reports = json_lines(&std::fs::read_to_string(&json).unwrap());
    for probe in ["main:middle", "main:thrower"] {
        let r = report(&reports, probe);
        assert_eq!(num(r, "hits"), 3000, "{r}");
        // One call in three throws: those frames never return.
        assert_eq!(num(r, "exits"), 2000, "{r}");
    }
}

/// Every exported libc function probed, entries and returns, under real programs that
/// sort, search, compress and archive: their output and status are those of untraced
/// runs. (qsort tail-calling qsort_r, setjmp returning twice and the like once broke it.)
#[test]
fn every_libc_function_probed_with_returns() {
    let dir = temp_dir("alllibc");
    let input = dir.join("input.txt");
    let text: String = (0..2000)
        .map(|i| format!("line {}\n", (i * 7919) % 2003))
        .collect();
    std::fs::write(&input, text).unwrap();
    let inp = input.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &["sort", inp],
        &["grep", "-c", "line 1", inp],
        &["gzip", "-c", inp],
        &["tar", "-cf", "-", "-C", dir.to_str().unwrap(), "input.txt"],
    ];
    for cmd in cases {
        let plain = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .unwrap();
        let json = dir.join("report.json");
        let traced = tracer()
            .args(["run", "-x", "-p", "libc:*", "--json", "-o"])
            .arg(&json)
            .arg("--")
            .args(cmd)
            .output()
            .unwrap();
        assert_eq!(traced.status.code(), plain.status.code(), "{cmd:?}");
        assert!(traced.stdout == plain.stdout, "{cmd:?}: output differs");
        let reports: Vec<_> = json_lines(&std::fs::read_to_string(&json).unwrap())
            .into_iter()
            .filter(|r| r.get("refused").is_none())
            .collect();
        assert!(
            reports.len() > 1500,
            "{cmd:?}: only {} probes",
            reports.len()
        );
        // How many libc calls a system program makes is its own business (gzip made
        // 72 on one machine, hundreds on another): only that it makes some is a fact.
        let total: u64 = reports.iter().map(|r| num(r, "hits")).sum();
        assert!(total > 0, "{cmd:?}: no hits at all");
        for f in ["libc:malloc", "libc:free", "libc:memchr", "libc:strlen"] {
            let r = report(&reports, f);
            assert_eq!(num(r, "exits"), num(r, "hits"), "{cmd:?}: {r}");
        }
    }
}

/// A command that execs another program (a wrapper script): the probes were in the first
/// program image, and the user is told so, by name.
#[test]
fn exec_is_reported() {
    let out = tracer()
        .args([
            "run",
            "--no-follow",
            "-p",
            "libc:malloc",
            "--",
            "sh",
            "-c",
            "exec true",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("exec'd") && l.contains("true") && l.contains("do not follow")),
        "{err}"
    );
}

/// `--timings` on `run`: every phase of a launch is named with a time in milliseconds,
/// the counts stay exact, and stdout stays the program's own.
#[test]
fn run_timings_name_every_phase() {
    let dir = temp_dir("run_timings");
    let target = build_target(&dir);
    let t = target.to_str().unwrap();
    let json = dir.join("out.json");
    let out = tracer_output(&[
        "run",
        "-p",
        "libtarget:work",
        "--timings",
        "--json",
        "-o",
        json.to_str().unwrap(),
        "--",
        t,
        "700",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {err}");
    let (calls, _) = counters(&out.stdout);
    assert_eq!(calls, 700);
    let reports = json_lines(&std::fs::read_to_string(&json).expect("read -o file"));
    assert_eq!(num(report(&reports, "libtarget:work"), "hits"), 700);
    for phase in [
        "process start-up",
        "symbol loading",
        "agent thread",
        "agent load (dlopen)",
        "agent init",
        "prepare (remote)",
        "patch",
        "detach",
        "wall clock of tracer",
    ] {
        let line = err
            .lines()
            .find(|l| l.trim_start().starts_with(phase))
            .unwrap_or_else(|| panic!("no {phase:?} line in {err}"));
        let ms: f64 = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no milliseconds in {line:?}"));
        assert!(ms >= 0.0, "{line}");
    }
    assert!(
        err.contains("target RSS added per probe (bytes): "),
        "{err}"
    );
}
