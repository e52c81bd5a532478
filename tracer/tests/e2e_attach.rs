//! `tracer attach` end to end: a running multi-threaded program, attached to and detached
//! from again and again, must compute exactly what it computes untraced.

mod common;
use common::*;
use std::process::Stdio;
use std::time::Duration;

/// Attach with `--duration`, return the JSON reports and tracer's stderr.
fn attach_json(pid: i32, dir: &std::path::Path, duration: &str) -> Vec<serde_json::Value> {
    let json = dir.join(format!("attach-{pid}.json"));
    let out = tracer_output(&[
        "attach",
        &pid.to_string(),
        "-p",
        "main:step",
        "--duration",
        duration,
        "--json",
        "-o",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "attach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&std::fs::read_to_string(&json).expect("read -o file"))
}

/// Four threads call `step` in tight loops. While attached, the first bytes of `step` are
/// patched; after each of 20 attach/detach cycles they are the original bytes again,
/// TracerPid is 0 and hits were counted; at the end the program's checksum equals an
/// untraced replay with the same iteration counts.
#[test]
fn attach_detach_20_times_keeps_checksum_and_code() {
    let dir = temp_dir("spin");
    let spin = cc(&dir, "spin", SPIN_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&spin, &[]);
    let first = t.line();
    let mut parts = first.split_whitespace();
    let pid: i32 = parts.next().unwrap().parse().unwrap();
    let step = hex(parts.next().expect("step address"));
    assert_eq!(pid, t.pid());
    let original = read_mem(pid, step, 16);

    // First cycle: watch the patch appear while tracer is attached.
    let json = dir.join("first.json");
    let child = tracer()
        .args(["attach", &pid.to_string(), "-p", "main:step", "--duration"])
        .args(["1.5", "--json", "-o", json.to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tracer");
    let patched = wait_until(Duration::from_secs(10), || {
        read_mem(pid, step, 16) != original
    });
    let out = child.wait_with_output().expect("wait tracer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(patched, "step was never patched while attached");
    let reports = json_lines(&std::fs::read_to_string(&json).unwrap());
    let mut total_hits = num(report(&reports, "main:step"), "hits");
    assert!(total_hits > 0);
    assert_eq!(read_mem(pid, step, 16), original, "code not restored");
    assert_eq!(tracer_pid(pid), 0);

    for i in 1..20 {
        let reports = attach_json(pid, &dir, "0.5");
        let r = report(&reports, "main:step");
        let hits = num(r, "hits");
        assert!(hits > 0, "cycle {i}: no hits: {r}");
        assert_eq!(num(r, "skipped"), 0, "cycle {i}: {r}");
        total_hits += hits;
        assert_eq!(read_mem(pid, step, 16), original, "cycle {i}: not restored");
        assert_eq!(tracer_pid(pid), 0, "cycle {i}: still traced");
    }

    let (last, ok) = t.finish();
    assert!(ok, "spin failed after the attaches: {last}");
    let f: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(f.len(), 7, "unexpected final line {last:?}");
    let iterations: u64 = f[1..5].iter().map(|n| n.parse::<u64>().unwrap()).sum();
    assert!(
        total_hits <= iterations,
        "{total_hits} hits for {iterations} calls"
    );

    let replay = std::process::Command::new(&spin)
        .arg("replay")
        .args(&f[1..5])
        .output()
        .expect("untraced replay");
    assert!(replay.status.success());
    assert_eq!(
        String::from_utf8_lossy(&replay.stdout).trim_end(),
        last,
        "traced checksum differs from the untraced replay"
    );
}
