//! C++ and Rust names (issue #8, item 5): specs written with demangled names
//! (`main:ns::Parser::*`) probe the functions they name, every overload, and the hits
//! equal the calls the programs count themselves; output shows the names demangled,
//! JSON keeps the mangled symbol beside the demangled name, and `tracer list` lists
//! demangled names.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const NAMES_CC: &str = include_str!("programs/names.cc");

/// A Rust program built by the test: `rnames::parser::Parser::parse`, counted by the
/// program itself.
const RNAMES_RS: &str = r#"
use std::sync::atomic::{AtomicU64, Ordering};
static CALLS: AtomicU64 = AtomicU64::new(0);
mod parser {
    pub struct Parser { pub total: u64 }
    impl Parser {
        #[inline(never)]
        pub fn parse(&mut self, word: &str) -> u64 {
            super::CALLS.fetch_add(1, super::Ordering::Relaxed);
            self.total += std::hint::black_box(word).len() as u64 * 3 + 1;
            self.total
        }
    }
}
fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let mut p = parser::Parser { total: 0 };
    for i in 0..n { p.parse(if i % 2 == 0 { "even" } else { "odd" }); }
    println!("parse={} total={}", CALLS.load(Ordering::Relaxed), p.total);
}
"#;

/// The `key=N` counts a program prints.
fn counts(stdout: &[u8]) -> std::collections::HashMap<String, u64> {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// `tracer run -p SPEC... --json -o FILE -- prog args`: the program's counts and the
/// live probes' reports; the run must print what it prints untraced.
fn run_json(dir: &Path, prog: &Path, specs: &[&str], args: &[&str]) -> Vec<serde_json::Value> {
    let plain = Command::new(prog).args(args).output().unwrap();
    let json = dir.join("names.json");
    let mut t = tracer();
    t.arg("run");
    for s in specs {
        t.args(["-p", s]);
    }
    let out = t
        .arg("--json")
        .arg("-o")
        .arg(&json)
        .arg("--")
        .arg(prog)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{specs:?}: {err}");
    assert_eq!(out.stdout, plain.stdout, "{specs:?}: {err}");
    json_lines(&std::fs::read_to_string(&json).unwrap())
}

fn by_name<'a>(reports: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    reports
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no report named {name} in {reports:?}"))
}

#[test]
fn cxx_demangled_specs_count_the_programs_own_calls() {
    let dir = temp_dir("names-cxx");
    let prog = cxx(&dir, "names", NAMES_CC, &["-O1", "-pie", "-fPIE"]);
    let plain = Command::new(&prog).arg("60").output().unwrap();
    let own = counts(&plain.stdout);
    assert_eq!(own["parse_str"], 60, "{own:?}");

    // Every overload of every method of the class.
    let reports = run_json(&dir, &prog, &["main:ns::Parser::*"], &["60"]);
    assert_eq!(reports.len(), 2, "{reports:?}");
    let s = by_name(&reports, "ns::Parser::parse(char const*)");
    assert_eq!(num(s, "hits"), own["parse_str"], "{s}");
    assert_eq!(s["symbol"], "_ZN2ns6Parser5parseEPKc", "{s}");
    assert_eq!(s["probe"], "main:_ZN2ns6Parser5parseEPKc", "{s}");
    let i = by_name(&reports, "ns::Parser::parse(int)");
    assert_eq!(num(i, "hits"), own["parse_int"], "{i}");

    // One overload by its parameter list (whitespace not significant), a template
    // instance, and the mangled name as before.
    let reports = run_json(
        &dir,
        &prog,
        &[
            "main:ns::Parser::parse(char const *)",
            "main:ns::twice<int>",
            "main:_ZN2ns5twiceIdEET_S1_",
        ],
        &["60"],
    );
    assert_eq!(reports.len(), 3, "{reports:?}");
    assert_eq!(
        num(by_name(&reports, "ns::Parser::parse(char const*)"), "hits"),
        own["parse_str"]
    );
    assert_eq!(
        num(by_name(&reports, "ns::twice<int>(int)"), "hits"),
        own["twice_int"]
    );
    assert_eq!(
        num(by_name(&reports, "ns::twice<double>(double)"), "hits"),
        own["twice_double"]
    );

    // The table shows the demangled names.
    let out = tracer()
        .args(["run", "-p", "main:ns::twice*", "--"])
        .arg(&prog)
        .arg("60")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let row = |label: &str| {
        err.lines()
            .find(|l| l.starts_with(&format!("{label} ")))
            .unwrap_or_else(|| panic!("no row {label}: {err}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let int_row = row("main:ns::twice<int>(int)");
    assert_eq!(int_row[2], own["twice_int"].to_string(), "{err}");
    let double_row = row("main:ns::twice<double>(double)");
    assert_eq!(double_row[2], own["twice_double"].to_string(), "{err}");
    assert!(!err.contains("_Z"), "mangled names shown: {err}");
}

#[test]
fn cxx_list_shows_demangled_names() {
    let dir = temp_dir("names-list");
    let prog = cxx(&dir, "names", NAMES_CC, &["-O1"]);
    let out = tracer_output(&["list", prog.to_str().unwrap(), "ns::Parser::*"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{:?}", out);
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split("  ").next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "names:ns::Parser::parse(char const*)",
            "names:ns::Parser::parse(int)"
        ],
        "{text}"
    );
    assert!(text.lines().all(|l| l.ends_with("  probeable")), "{text}");
    // std::vector's members, named without spaces.
    let out = tracer_output(&[
        "list",
        prog.to_str().unwrap(),
        "std::vector<int,std::allocator<int>>::*",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{:?}", out);
    assert!(
        !text.is_empty()
            && text
                .lines()
                .all(|l| l.starts_with("names:std::vector<int, std::allocator<int> >::")),
        "{text}"
    );
}

#[test]
fn rust_demangled_specs_count_the_programs_own_calls() {
    let dir = temp_dir("names-rust");
    let src = dir.join("rnames.rs");
    std::fs::write(&src, RNAMES_RS).unwrap();
    let prog = dir.join("rnames");
    let st = Command::new("rustc")
        .args(["-O", "-C", "debuginfo=0", "--crate-name", "rnames", "-o"])
        .arg(&prog)
        .arg(&src)
        .status()
        .expect("run rustc");
    assert!(st.success());
    let plain = Command::new(&prog).arg("41").output().unwrap();
    let own = counts(&plain.stdout);
    assert_eq!(own["parse"], 41);

    let reports = run_json(&dir, &prog, &["main:rnames::parser::*"], &["41"]);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = by_name(&reports, "rnames::parser::Parser::parse");
    assert_eq!(num(r, "hits"), 41, "{r}");
    assert!(
        r["symbol"].as_str().unwrap().starts_with("_R")
            || r["symbol"].as_str().unwrap().starts_with("_ZN"),
        "{r}"
    );

    let out = tracer_output(&["list", prog.to_str().unwrap(), "rnames::parser::*"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.lines().count() == 1
            && text.starts_with("rnames:rnames::parser::Parser::parse  0x")
            && text.trim_end().ends_with("  probeable"),
        "{text}"
    );
}

/// Messages name C++ functions as users write them: suggestions for a misspelt
/// demangled spec, and the refusal of an exactly named probe.
#[test]
fn cxx_names_in_errors_and_refusals() {
    let dir = temp_dir("names-msgs");
    let prog = cxx(&dir, "names", NAMES_CC, &["-O1", "-pie", "-fPIE"]);
    let p = prog.to_str().unwrap();
    let out = tracer_output(&["run", "-p", "main:ns::Parsr::parse", "--", p, "3"]);
    assert_one_line_error(&out, &["did you mean main:ns::Parser::parse?"]);
    assert!(out.stdout.is_empty(), "the program ran anyway");

    // `+1` is inside twice<double>'s first instruction (its counter's `add`, longer than
    // one byte in any encoding).
    let out = tracer_output(&[
        "run",
        "-p",
        "main:ns::twice<double>+1",
        "-p",
        "main:ns::twice<int>",
        "--",
        p,
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("tracer: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("tracer: not probing main:ns::twice<double>(double)+0x1 at 0x")
            && lines[0].contains("instruction boundary"),
        "{err}"
    );
}
