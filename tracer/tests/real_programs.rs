//! The CI subset of the real-program suite (`bench/real_programs.sh` runs them all):
//! programs from Debian packages and a C++ program built from source that throws, each
//! run untraced and under `tracer run -x -p 'libc:*' [-p 'main:*']`. Stdout, stderr (less
//! tracer's `tracer: ` lines) and exit status must be byte-identical, and the probes must
//! have been live and hit.
//!
//! `.ci/run` installs the packages.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const WORDFREQ_CC: &str = include_str!("../../tests/programs/wordfreq.cc");

/// Deterministic text input: numbers, words, hex, repeated lines.
fn text(dir: &Path) -> PathBuf {
    let t: String = (1..=8000u64)
        .map(|i| {
            format!(
                "{} word{} {:x} {}\n",
                (i * 7919) % 10007,
                i % 97,
                i,
                if i % 13 == 0 { "ipsum dolor" } else { "lorem" }
            )
        })
        .collect();
    let p = dir.join("text");
    std::fs::write(&p, t).unwrap();
    p
}

fn run_with_stdin(cmd: &mut Command, stdin: &Path) -> Output {
    cmd.stdin(Stdio::from(std::fs::File::open(stdin).unwrap()))
        .env("PYTHONHASHSEED", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn without_tracer_lines(stderr: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in stderr.split_inclusive(|&b| b == b'\n') {
        if !l.starts_with(b"tracer: ") {
            out.extend_from_slice(l);
        }
    }
    out
}

/// Runs `cmd` untraced and traced with `specs` and `-x`; asserts identical behaviour and
/// live, hit probes.
fn same_traced(dir: &Path, cmd: &[&str], stdin: &Path, specs: &[&str]) {
    assert!(
        Path::new(cmd[0]).exists(),
        "{} is missing: install its Debian package (.ci/run does)",
        cmd[0]
    );
    let plain = run_with_stdin(Command::new(cmd[0]).args(&cmd[1..]), stdin);
    let json = dir.join(format!(
        "{}.json",
        Path::new(cmd[0]).file_name().unwrap().to_string_lossy()
    ));
    let mut t = tracer();
    t.arg("run").arg("-x");
    for s in specs {
        t.args(["-p", s]);
    }
    t.arg("--json").arg("-o").arg(&json).arg("--").args(cmd);
    let traced = run_with_stdin(&mut t, stdin);
    let err = String::from_utf8_lossy(&traced.stderr);
    let tracer_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("tracer: ")).collect();
    let not_refusal: Vec<&&str> = tracer_lines
        .iter()
        .filter(|l| !l.contains("not probing") && !l.contains("note:"))
        .collect();
    assert_eq!(
        traced.status.code(),
        plain.status.code(),
        "{cmd:?}: exit status differs (traced {:?}, signal {:?}); tracer said {not_refusal:?}",
        traced.status,
        std::os::unix::process::ExitStatusExt::signal(&traced.status)
    );
    assert!(
        traced.stdout == plain.stdout,
        "{cmd:?}: stdout differs ({} bytes traced, {} untraced)",
        traced.stdout.len(),
        plain.stdout.len()
    );
    assert_eq!(
        String::from_utf8_lossy(&without_tracer_lines(&traced.stderr)),
        String::from_utf8_lossy(&plain.stderr),
        "{cmd:?}: stderr differs"
    );
    let reports: Vec<_> = json_lines(&std::fs::read_to_string(&json).unwrap())
        .into_iter()
        .filter(|r| r.get("refused").is_none())
        .collect();
    for s in specs {
        let module = s.split(':').next().unwrap();
        let prefix = format!("{module}:");
        assert!(
            reports
                .iter()
                .any(|r| r["probe"].as_str().unwrap().starts_with(&prefix)),
            "{cmd:?}: no probe of {s} was live"
        );
    }
    let hits: u64 = reports.iter().map(|r| num(r, "hits")).sum();
    assert!(hits > 0, "{cmd:?}: no hits at all");
}

#[test]
fn sqlite3_all_libc() {
    let dir = temp_dir("real-sqlite");
    let sql = dir.join("db.sql");
    std::fs::write(
        &sql,
        "create table t(id integer primary key, k text, v real);\n\
         with recursive n(i) as (select 1 union all select i + 1 from n where i < 5000)\n\
         insert into t select i, 'k' || (i % 101), i * 1.5 from n;\n\
         create index tk on t(k);\n\
         select k, count(*), printf('%.2f', sum(v)) from t group by k order by sum(v) desc limit 8;\n\
         select nosuchfunction(1);\n",
    )
    .unwrap();
    same_traced(&dir, &["/usr/bin/sqlite3", ":memory:"], &sql, &["libc:*"]);
}

#[test]
fn xz_all_libc() {
    let dir = temp_dir("real-xz");
    let input = text(&dir);
    same_traced(&dir, &["/usr/bin/xz", "-c", "-T1"], &input, &["libc:*"]);
}

#[test]
fn sort_all_libc_and_main() {
    let dir = temp_dir("real-sort");
    let input = text(&dir);
    same_traced(
        &dir,
        &["/usr/bin/sort", "-k2,2", "-k1n", "--parallel=1"],
        &input,
        &["libc:*", "main:*"],
    );
}

/// The C++ program that throws, with returns probed in libc only.
#[test]
fn cxx_throwing_all_libc() {
    let dir = temp_dir("real-cxx");
    let prog = cxx(&dir, "wordfreq", WORDFREQ_CC, &["-O2"]);
    let input = text(&dir);
    same_traced(&dir, &[prog.to_str().unwrap()], &input, &["libc:*"]);
}

#[test]

fn cxx_throwing_all_libc_and_main() {
    let dir = temp_dir("real-cxx-main");
    let prog = cxx(&dir, "wordfreq", WORDFREQ_CC, &["-O2"]);
    let input = text(&dir);
    same_traced(
        &dir,
        &[prog.to_str().unwrap()],
        &input,
        &["libc:*", "main:*"],
    );
}

/// Debian's python3.11 is a non-PIE executable exporting the whole C API.
#[test]

fn python3_non_pie_all_libc_and_main() {
    let dir = temp_dir("real-python");
    let script = dir.join("s.py");
    std::fs::write(
        &script,
        "import json, re, collections\n\
         words = open(0).read().split()\n\
         print(collections.Counter(w for w in words if re.fullmatch(r'word\\d+', w)).most_common(3))\n\
         print(json.dumps({'n': len(words)}), float('nan'), 0.1 + 0.2)\n",
    )
    .unwrap();
    let input = text(&dir);
    same_traced(
        &dir,
        &["/usr/bin/python3.11", script.to_str().unwrap()],
        &input,
        &["libc:*", "main:*"],
    );
}

#[test]

fn perl_all_libc_and_main() {
    let dir = temp_dir("real-perl");
    let input = text(&dir);
    same_traced(
        &dir,
        &[
            "/usr/bin/perl",
            "-e",
            "my %h; while (<STDIN>) { $h{$_}++ for split } printf \"%d\\n\", scalar keys %h; print \"$_\\n\" for (sort keys %h)[0..4];",
        ],
        &input,
        &["libc:*", "main:*"],
    );
}
