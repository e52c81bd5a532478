//! Printing maps at the end of a run: histograms as bpftrace prints `hist()` and
//! `lhist()`, hash maps sorted by value (top [`TOP`]), counters; or JSON.

use super::maps::{MapData, MapRead};
use probes::pack::abi::{map_kind, value_type};
use std::fmt::Write;

/// Hash map entries printed as text; `--json` prints all.
pub const TOP: usize = 20;
const BAR: usize = 52;

/// bpftrace's short power-of-two labels: 1K is 1024.
fn pow2_label(exp: u32) -> String {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let unit = (exp / 10) as usize;
    format!("{}{}", 1u64 << (exp % 10), UNITS[unit.min(6)])
}

/// `[lo, hi)` of log2 bucket `b` (bucket 0 holds 0, bucket k holds `[2^(k-1), 2^k)`).
fn log2_label(b: usize) -> String {
    match b {
        0 => "[0]".into(),
        1 => "[1]".into(),
        64 => format!("[{}, ...)", pow2_label(63)),
        _ => format!("[{}, {})", pow2_label(b as u32 - 1), pow2_label(b as u32)),
    }
}

fn linear_label(b: usize, params: &[u64; 4]) -> String {
    let [min, step, n, _] = *params;
    if b == 0 {
        format!("(..., {min})")
    } else if b as u64 > n {
        format!("[{}, ...)", min.saturating_add(step.saturating_mul(n)))
    } else {
        let lo = min.saturating_add(step.saturating_mul(b as u64 - 1));
        format!("[{lo}, {})", lo.saturating_add(step))
    }
}

/// The histogram lines, from the first non-empty bucket to the last.
pub fn histogram_text(name: &str, kind: u32, params: &[u64; 4], buckets: &[u64]) -> String {
    let mut out = format!("@{name}:\n");
    let Some(first) = buckets.iter().position(|&c| c > 0) else {
        out.push_str("(empty)\n");
        return out;
    };
    let last = buckets.iter().rposition(|&c| c > 0).unwrap_or(first);
    let max = buckets.iter().copied().max().unwrap_or(1).max(1);
    for (b, &count) in buckets.iter().enumerate().take(last + 1).skip(first) {
        let label = if kind == map_kind::HIST_LOG2 {
            log2_label(b)
        } else {
            linear_label(b, params)
        };
        let bar = ((count as u128 * BAR as u128) / max as u128) as usize;
        let _ = writeln!(
            out,
            "{label:<16}{count:>8} |{}{}|",
            "@".repeat(bar),
            " ".repeat(BAR - bar)
        );
    }
    out
}

/// A key or value printed by its declared type.
pub fn key_text(bytes: &[u8], ty: u64) -> String {
    let mut w = [0u8; 8];
    let n = bytes.len().min(8);
    w[..n].copy_from_slice(&bytes[..n]);
    let v = u64::from_le_bytes(w);
    match ty {
        value_type::UNSIGNED if bytes.len() <= 8 => v.to_string(),
        value_type::SIGNED if bytes.len() <= 8 => {
            let shift = 64 - 8 * n as u32;
            (((v << shift) as i64) >> shift).to_string()
        }
        _ => {
            let s = String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or(&[]));
            if bytes.iter().all(|&b| b == 0 || (0x20..0x7f).contains(&b)) && !s.is_empty() {
                format!("{s:?}")
            } else {
                bytes.iter().map(|b| format!("{b:02x}")).collect()
            }
        }
    }
}

fn value_text(v: u64, ty: u64) -> String {
    if ty == value_type::SIGNED {
        (v as i64).to_string()
    } else {
        v.to_string()
    }
}

fn value_json(v: u64, ty: u64) -> serde_json::Value {
    if ty == value_type::SIGNED {
        (v as i64).into()
    } else {
        v.into()
    }
}

/// Entries largest value first (ties by key bytes, so output is stable).
fn sorted(entries: &[(Vec<u8>, u64)], ty: u64) -> Vec<&(Vec<u8>, u64)> {
    let mut e: Vec<_> = entries.iter().collect();
    if ty == value_type::SIGNED {
        e.sort_by(|a, b| (b.1 as i64).cmp(&(a.1 as i64)).then(a.0.cmp(&b.0)));
    } else {
        e.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    e
}

/// One map as text.
pub fn map_text(m: &MapRead) -> String {
    let d = &m.desc;
    let mut out = match &m.data {
        MapData::Counter(v) => format!("@{}: {v}\n", d.name),
        MapData::Histogram(b) => histogram_text(&d.name, d.kind, &d.params, b),
        MapData::Hash { entries, drops } => {
            let mut out = format!("@{}:\n", d.name);
            let all = sorted(entries, d.params[3]);
            for (k, v) in all.iter().take(TOP) {
                let _ = writeln!(
                    out,
                    "@{}[{}]: {}",
                    d.name,
                    key_text(k, d.params[1]),
                    value_text(*v, d.params[3])
                );
            }
            if all.len() > TOP {
                let _ = writeln!(out, "... {} more keys (--json prints all)", all.len() - TOP);
            }
            if *drops > 0 {
                let _ = writeln!(
                    out,
                    "@{}: {drops} updates dropped, the map was full (raise its capacity)",
                    d.name
                );
            }
            out
        }
    };
    for p in &m.problems {
        let _ = writeln!(out, "warning: {p}");
    }
    out
}

/// One map as a JSON line: `"type": "map"` like every line of `--json` output says what
/// it is; the map's own type (counter, hash, ...) is its `"kind"`.
pub fn map_json(m: &MapRead) -> serde_json::Value {
    let d = &m.desc;
    let data = match &m.data {
        MapData::Counter(v) => serde_json::json!({ "value": v }),
        MapData::Histogram(b) => {
            let buckets: Vec<_> = b
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| {
                    let label = if d.kind == map_kind::HIST_LOG2 {
                        log2_label(i)
                    } else {
                        linear_label(i, &d.params)
                    };
                    serde_json::json!({ "bucket": label, "count": c })
                })
                .collect();
            serde_json::json!({ "buckets": buckets })
        }
        MapData::Hash { entries, drops } => {
            let e: Vec<_> = sorted(entries, d.params[3])
                .into_iter()
                .map(|(k, v)| serde_json::json!({ "key": key_text(k, d.params[1]), "value": value_json(*v, d.params[3]) }))
                .collect();
            serde_json::json!({ "entries": e, "drops": drops })
        }
    };
    serde_json::json!({ "type": "map", "map": d.name, "kind": d.kind_name(), "data": data, "problems": m.problems })
}
