//! Built-in views computed in the target without writing a pack: call latency per probe
//! (`--hist`, `--summary`), printed at the end or every `--interval`.
pub mod hist;
pub mod latency;
pub mod summary;

use crate::session::Session;
use latency::LatencyStats;

/// One probe's line of a latency view.
#[derive(Clone, Debug)]
pub struct Row {
    /// `module:symbol[+offset]` as stored (mangled for C++ and Rust).
    pub probe: String,
    /// The same, demangled.
    pub name: String,
    /// Entries counted.
    pub hits: u64,
    /// None when its returns are not probed (entries only, offset probes).
    pub stats: Option<LatencyStats>,
}

/// The latency rows of every installed probe, sorted by total time, largest first (ties
/// by name); probes whose returns are not timed last.
pub fn rows(session: &Session) -> Vec<Row> {
    let Some(region) = session.latency() else {
        return Vec::new();
    };
    let entries_only: std::collections::HashSet<&str> = session
        .notes()
        .iter()
        .filter_map(|n| n.split_once(": only entries are probed: ").map(|(l, _)| l))
        .collect();
    let mut rows: Vec<Row> = session
        .installed()
        .into_iter()
        .zip(session.report())
        .map(|(p, r)| Row {
            name: crate::names::demangle_in_text(&p.label).into_owned(),
            probe: p.label.clone(),
            hits: r.hits,
            stats: (!entries_only.contains(p.label.as_str()) && !p.label.contains("+0x"))
                .then(|| region.read(p.id))
                .flatten(),
        })
        .collect();
    rows.sort_by(|a, b| {
        let total = |r: &Row| r.stats.as_ref().map(|s| s.total_ns);
        total(b).cmp(&total(a)).then_with(|| a.name.cmp(&b.name))
    });
    rows
}

/// `--hist` and/or `--summary` as text, or one JSON object per probe, `"type": "latency"`
/// (`extra` merged in:
/// the interval's number and time for a running report).
pub fn render(
    rows: &[Row],
    hist: bool,
    summary: bool,
    json: bool,
    extra: Option<&serde_json::Value>,
) -> String {
    if json {
        let total: u64 = grand_total(rows);
        let mut out = String::new();
        for r in rows {
            let mut v = serde_json::json!({ "type": "latency", "probe": r.probe, "name": r.name,
                "hits": r.hits });
            if let Some(s) = &r.stats {
                v["calls"] = s.count.into();
                if summary {
                    summary::json_fields(&mut v, s, total);
                }
                if hist {
                    v["buckets"] = hist::buckets_json(&s.buckets);
                }
            } else {
                v["timed"] = false.into();
            }
            if let Some(serde_json::Value::Object(m)) = extra {
                for (k, x) in m {
                    v[k] = x.clone();
                }
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
        return out;
    }
    let mut out = String::new();
    if summary {
        out.push_str(&summary::text(rows));
    }
    if hist {
        if summary {
            out.push('\n');
        }
        out.push_str(&hist::text(rows));
    }
    out
}

/// Time in every timed probe (nested probed calls count in each).
pub fn grand_total(rows: &[Row]) -> u64 {
    rows.iter()
        .filter_map(|r| r.stats.as_ref())
        .map(|s| s.total_ns)
        .fold(0u64, u64::saturating_add)
}
