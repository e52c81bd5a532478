//! The per-probe report of `run` and `attach`: the counts table or JSON lines, the latency
//! views, and the running reports of `--interval`. Part of the command-line binary.
use std::time::Duration;

use tracer::session::{ProbeReport, Session};

use crate::{entries_only_notes, ProbeArgs};

/// `--hist` and `--summary`, as text or JSON; `extra` goes into each JSON object.
pub(crate) fn latency_report(
    args: &ProbeArgs,
    session: &Session,
    extra: Option<serde_json::Value>,
) -> String {
    let rows = tracer::builtin::rows(session);
    tracer::builtin::render(&rows, args.hist, args.summary, args.json, extra.as_ref())
}

/// The figures so far, for `--interval`: the latency views or the counts, headed by the
/// interval's number and time (text), or with `"interval"` and `"elapsed_s"` in each
/// object (JSON).
pub(crate) fn running_report(args: &ProbeArgs, session: &Session, k: u64, at: Duration) -> String {
    let secs = (at.as_secs_f64() * 1000.0).round() / 1000.0;
    if args.json {
        let extra = serde_json::json!({ "interval": k, "elapsed_s": secs });
        if args.timed() {
            return latency_report(args, session, Some(extra));
        }
        let mut out = String::new();
        for line in render(args, &session.report(), session, None).lines() {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            if v.get("refused").is_some() {
                continue;
            }
            v["interval"] = k.into();
            v["elapsed_s"] = secs.into();
            out.push_str(&v.to_string());
            out.push('\n');
        }
        return out;
    }
    let body = match args.timed() {
        true => latency_report(args, session, None),
        false => render(args, &session.report(), session, None),
    };
    format!("--- interval {k}, {secs:.3} s ---\n{body}")
}

/// The report: a table, or with `--json` one object per probe (`"probe"` and `"symbol"`
/// as stored, mangled for C++ and Rust; `"name"` demangled; `"pid"` and `"comm"` of the
/// process when `who` names it), then one per refused probe (with `"refused"`: the reason).
pub(crate) fn render(
    args: &ProbeArgs,
    reports: &[ProbeReport],
    session: &Session,
    who: Option<(i32, &str)>,
) -> String {
    // A pack's return handlers count returns too.
    let exit = args.exit || reports.iter().any(|r| r.exits > 0);
    if !args.json {
        return table(reports, exit);
    }
    let entries_only: std::collections::HashMap<&str, &str> = entries_only_notes(session).collect();
    let mut text = String::new();
    for r in reports {
        let v = probe_json(r, exit, entries_only.get(r.label.as_str()).copied(), who);
        text.push_str(&v.to_string());
        text.push('\n');
    }
    for r in session.refused() {
        text.push_str(&refused_json(r).to_string());
        text.push('\n');
    }
    text
}

/// One probe's `--json` object.
fn probe_json(
    r: &ProbeReport,
    exit: bool,
    entries_only: Option<&str>,
    who: Option<(i32, &str)>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "type": "probe",
        "probe": r.label,
        "module": r.module,
        "symbol": r.symbol,
        "name": tracer::names::display(&r.symbol),
        "address": format!("{:#x}", r.address),
        "hits": r.hits,
        "skipped": r.skipped,
        "encoding": r.encoding.name(),
    });
    if exit {
        v["exits"] = r.exits.into();
        v["lost_exits"] = r.lost_exits.into();
    }
    if r.panics > 0 {
        v["panics"] = r.panics.into();
    }
    if let Some(s) = saves_json(r.saves, r.saves_avx512) {
        v["saves"] = s;
    }
    if let Some(why) = entries_only {
        v["entries_only"] = why.into();
    }
    if let Some((pid, comm)) = who {
        v["pid"] = pid.into();
        v["comm"] = comm.into();
    }
    v
}

/// One refused probe's `--json` object, with `"refused"`: the reason.
fn refused_json(r: &tracer::session::NotInstalled) -> serde_json::Value {
    let symbol = r.label.split_once(':').map_or(r.label.as_str(), |(_, s)| s);
    let symbol = symbol.rsplit_once("+0x").map_or(symbol, |(s, _)| s);
    serde_json::json!({
        "type": "refused",
        "probe": r.label,
        "symbol": symbol,
        "name": tracer::names::display(symbol),
        "address": format!("{:#x}", r.address),
        "refused": r.reason,
    })
}

/// The counts table, then a line per probe whose handler panicked.
fn table(reports: &[ProbeReport], exit: bool) -> String {
    let mut text = String::new();
    let labels: Vec<String> = reports
        .iter()
        .map(|r| tracer::names::demangle_in_text(&r.label).into_owned())
        .collect();
    let w = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    text.push_str(&format!(
        "{:<w$}  {:>18}  {:>12}{}  {:>8}  encoding\n",
        "probe",
        "address",
        "hits",
        if exit { "         exits" } else { "" },
        "skipped"
    ));
    for (r, label) in reports.iter().zip(&labels) {
        let exits = if exit {
            format!("  {:>12}", r.exits)
        } else {
            String::new()
        };
        text.push_str(&format!(
            "{:<w$}  {:>#18x}  {:>12}{exits}  {:>8}  {}\n",
            label, r.address, r.hits, r.skipped, r.encoding
        ));
    }
    for r in reports.iter().filter(|r| r.panics > 0) {
        text.push_str(&format!(
            "{}: disabled after its handler panicked ({} panic(s)); the program ran on\n",
            r.label, r.panics
        ));
    }
    let lost: u64 = reports.iter().map(|r| r.lost_exits).sum();
    if exit && lost > 0 {
        text.push_str(&format!(
            "note: {lost} return(s) not seen (counted as lost_exits in --json): calls left by \
             longjmp or an exception, or nested deeper than {} probed calls in one thread\n",
            agent::thread_state::SHADOW_CAPACITY
        ));
    }
    text
}

/// What `--json` says a pack probe saves around its handlers: `{"entry": "ymm5 ymm13",
/// "exit": "all"}` (vector registers; the general-purpose ones are always kept). With
/// AVX-512 the registers are named `zmm`, with the `zmm16-31` and `k` ones saved too.
fn saves_json(bits: u64, avx512_bits: u64) -> Option<serde_json::Value> {
    use probes::abi::shared::saves;
    let avx = std::arch::is_x86_feature_detected!("avx");
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    let describe = |shift: u32, avx512_shift: u32| {
        let b = (bits >> shift) as u16;
        if avx512 {
            let (zmm16, masks) = saves::avx512::unpack(avx512_bits, avx512_shift);
            saves::describe_avx512(b, zmm16, masks)
        } else {
            saves::describe(b, avx)
        }
    };
    let mut v = serde_json::Map::new();
    if bits & saves::HAS_ENTRY != 0 {
        let d = describe(saves::ENTRY_SHIFT, saves::avx512::ENTRY_SHIFT);
        v.insert("entry".into(), d.into());
    }
    if bits & saves::HAS_EXIT != 0 {
        let d = describe(saves::EXIT_SHIFT, saves::avx512::EXIT_SHIFT);
        v.insert("exit".into(), d.into());
    }
    (!v.is_empty()).then_some(serde_json::Value::Object(v))
}
