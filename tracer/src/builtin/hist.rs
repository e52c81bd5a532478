//! `--hist`: a log2 histogram of call latency per probe, printed as bpftrace prints
//! `hist()` (the pack maps' printer), keyed by probe: `@ns[libc:malloc]:`.

use super::Row;
use crate::pack::report::histogram_text;
use probes::pack::abi::map_kind;

/// Every called probe's histogram, in the rows' order, a blank line between; the others
/// summed up in a line.
pub fn text(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut idle = 0;
    for r in rows {
        if r.stats.as_ref().is_some_and(|s| s.count == 0) {
            idle += 1;
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        match &r.stats {
            Some(s) => out.push_str(&histogram_text(
                &format!("ns[{}]", r.name),
                map_kind::HIST_LOG2,
                &[0; 4],
                &s.buckets,
            )),
            None => out.push_str(&format!(
                "@ns[{}]: returns not probed; {} hits\n",
                r.name, r.hits
            )),
        }
    }
    if idle > 0 {
        out.push_str(&format!("({idle} probe(s) not called)\n"));
    }
    out
}

/// The bounds of log2 bucket `b` in ns: `[lo, hi)`, hi None for the last.
pub fn bucket_bounds(b: usize) -> (u64, Option<u64>) {
    match b {
        0 => (0, Some(1)),
        64.. => (1 << 63, None),
        _ => (1 << (b - 1), Some(1 << b)),
    }
}

/// The non-empty buckets as `{"min_ns", "max_ns" (exclusive, null for the last), "count"}`.
pub fn buckets_json(buckets: &[u64]) -> serde_json::Value {
    buckets
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(b, &c)| {
            let (lo, hi) = bucket_bounds(b);
            serde_json::json!({ "min_ns": lo, "max_ns": hi, "count": c })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_match_the_agents_buckets() {
        for ns in [0u64, 1, 2, 3, 1000, 1 << 40, u64::MAX] {
            let (lo, hi) = bucket_bounds(probes::latency::bucket(ns));
            assert!(lo <= ns && hi.is_none_or(|h| ns < h), "{ns}");
        }
    }
}
