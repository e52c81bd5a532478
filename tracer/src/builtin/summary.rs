//! `--summary`: per probe calls, total, mean, min and max time and share of the time, as
//! `strace -c` prints its table, sorted by total.

use super::{grand_total, LatencyStats, Row};
use std::fmt::Write;

fn secs(ns: u64) -> String {
    format!("{:.6}", ns as f64 / 1e9)
}

fn usecs(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e3)
}

fn percent(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

/// The line under the header and above the total, as wide as each column.
fn rule() -> String {
    format!(
        "{} {} {} {} {} {}  {}\n",
        "-".repeat(6),
        "-".repeat(11),
        "-".repeat(9),
        "-".repeat(12),
        "-".repeat(12),
        "-".repeat(12),
        "-".repeat(16)
    )
}

/// The table, of the probes called (as `strace -c` shows the system calls made, the
/// others summed up in a line after it); probes whose returns are not probed come last
/// with their hits only.
pub fn text(rows: &[Row]) -> String {
    let total = grand_total(rows);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:>11} {:>9} {:>12} {:>12} {:>12}  probe",
        "% time", "seconds", "calls", "usecs/call", "min usecs", "max usecs"
    );
    let rule = rule();
    out.push_str(&rule);
    let mut calls = 0u64;
    let mut idle = 0;
    for r in rows {
        match &r.stats {
            Some(s) if s.count == 0 => idle += 1,
            Some(s) => {
                calls += s.count;
                let _ = writeln!(
                    out,
                    "{:>6.2} {:>11} {:>9} {:>12} {:>12} {:>12}  {}",
                    percent(s.total_ns, total),
                    secs(s.total_ns),
                    s.count,
                    usecs(s.mean_ns()),
                    usecs(s.min_ns),
                    usecs(s.max_ns),
                    r.name
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{:>6} {:>11} {:>9} {:>12} {:>12} {:>12}  {} (entries only: calls are hits)",
                    "-", "-", r.hits, "-", "-", "-", r.name
                );
            }
        }
    }
    out.push_str(&rule);
    let _ = writeln!(
        out,
        "{:>6.2} {:>11} {:>9} {:>12} {:>12} {:>12}  total",
        if total == 0 { 0.0 } else { 100.0 },
        secs(total),
        calls,
        "",
        "",
        ""
    );
    if idle > 0 {
        let _ = writeln!(out, "({idle} probe(s) not called)");
    }
    out
}

/// The summary's fields of one probe, into its JSON object.
pub fn json_fields(v: &mut serde_json::Value, s: &LatencyStats, total: u64) {
    v["total_ns"] = s.total_ns.into();
    v["mean_ns"] = s.mean_ns().into();
    v["min_ns"] = s.min_ns.into();
    v["max_ns"] = s.max_ns.into();
    v["percent"] = ((percent(s.total_ns, total) * 100.0).round() / 100.0).into();
}
