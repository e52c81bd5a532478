//! From resolved probes to prepare requests, and from the agent's results to installed
//! probes: which sites there are (the pack's and `-p`'s), what kind each probe is, which
//! results are refused for overlapping another, and the agent's own unwinder hooks.

use super::{label, Installed, NotInstalled, PackRequest, SessionError};
use crate::probeable;
use crate::spec::ResolvedProbe;
use crate::symbols::ProcessModules;
use crate::timings;
use probes::abi::remote::{status, PrepareRequest, PrepareResult};
use probes::ProbeKind;

/// Why `p` gets its entries probed and not its returns, if it does (see
/// [`probeable::entries_only`]); any alias of the function counts.
fn entries_only(modules: &ProcessModules, p: &ResolvedProbe) -> Option<&'static str> {
    let by_name = probeable::entries_only(std::slice::from_ref(&p.symbol), false);
    by_name.or_else(|| {
        modules
            .module_containing(p.address)
            .and_then(|m| probeable::entries_only_at(m, p.address))
    })
}

/// A site to probe: the resolved probe, and the pack's shims there (entry, exit; 0 for
/// none).
pub(super) type Site<'a> = (&'a ResolvedProbe, u64, u64);

/// Every site: the pack's first, then the `-p` probes, which get `actions` (a built-in's
/// entry and exit shims, 0 for none). A `-p` probe of code the pack probes gives way
/// (the pack's probe counts its hits too): its label is returned apart, for a note.
pub(super) fn sites<'a>(
    pack: Option<&PackRequest<'a>>,
    shims: &[u64],
    probes: &'a [ResolvedProbe],
    modules: &ProcessModules,
    actions: (u64, u64),
) -> (Vec<Site<'a>>, Vec<String>) {
    let mut all: Vec<(&ResolvedProbe, u64, u64)> = Vec::new();
    if let Some(pr) = pack {
        let shim = |i: Option<usize>| i.map_or(0, |i| shims[i]);
        for s in pr.sites {
            all.push((&s.probe, shim(s.entry), shim(s.exit)));
        }
    }
    let mut pack_counts = Vec::new();
    // A set, not a scan of `all`: with 10,000 probes the scan was a third of the attach.
    let pack_sites: std::collections::HashSet<u64> = all.iter().map(|q| q.0.address).collect();
    for p in probes {
        if pack_sites.contains(&p.address) {
            pack_counts.push(label(p, modules));
        } else {
            all.push((p, actions.0, actions.1));
        }
    }
    (all, pack_counts)
}

/// The names of the IFUNC sites, in order, as the target's loader knows them.
pub(super) fn ifunc_names<'a>(sites: &[Site<'a>]) -> Vec<&'a str> {
    sites
        .iter()
        .filter(|p| p.0.is_ifunc)
        .map(|p| p.0.symbol.split('@').next().unwrap_or(&p.0.symbol))
        .collect()
}

/// The requests for the agent, with what the session reports about them.
pub(super) struct Requests<'a> {
    pub requests: Vec<PrepareRequest>,
    /// Each request's label and probe, in the same order.
    pub labels: Vec<(String, &'a ResolvedProbe)>,
    pub refused: Vec<NotInstalled>,
    pub notes: Vec<String>,
}

impl Requests<'_> {
    /// Whether any probe watches returns (the agent's unwinder hooks are then needed).
    pub fn any_exit(&self) -> bool {
        self.requests
            .iter()
            .any(|r| r.kind == ProbeKind::Exit as u32)
    }
}

/// A request per site. `ifuncs` holds where the target's loader resolved each IFUNC site,
/// in order (0: not resolved, refused); `pack_counts` are the `-p` probes that gave way
/// to the pack's. `latency_shim` (0 for none) times the returns of function probes that
/// have no other shim.
pub(super) fn requests<'a>(
    sites: &[Site<'a>],
    ifuncs: Vec<u64>,
    modules: &ProcessModules,
    exit: bool,
    pack_counts: Vec<String>,
    latency_shim: u64,
) -> Requests<'a> {
    let mut ifuncs = ifuncs.into_iter();
    let mut requests = Vec::new();
    let mut labels = Vec::new();
    let mut refused = Vec::new();
    let mut notes: Vec<String> = pack_counts
        .into_iter()
        .map(|l| format!("{l}: probed by the pack, whose probe counts its hits"))
        .collect();
    for &(p, entry_shim, mut exit_shim) in sites {
        let l = label(p, modules);
        let Some((function, size)) = function_of(p, &mut ifuncs, modules) else {
            refused.push(NotInstalled {
                label: l,
                address: p.address,
                reason: format!(
                    "the target's loader does not resolve the IFUNC {}",
                    p.symbol
                ),
            });
            continue;
        };
        if latency_shim != 0 && entry_shim == 0 && exit_shim == 0 && p.offset == 0 {
            exit_shim = latency_shim;
        }
        let (kind, exit_shim) = kind_of(p, modules, exit, exit_shim, &l, &mut notes);
        let mut req = PrepareRequest {
            function,
            size,
            offset: p.offset,
            kind: kind as u32,
            entry_shim,
            exit_shim,
            ..PrepareRequest::default()
        };
        req.set_label(&l);
        requests.push(req);
        labels.push((l, p));
    }
    Requests {
        requests,
        labels,
        refused,
        notes,
    }
}

/// Where the probe's function starts, and its size. For an IFUNC, the implementation the
/// target's loader chose (the next of `ifuncs`); `None` when it chose none.
fn function_of(
    p: &ResolvedProbe,
    ifuncs: &mut impl Iterator<Item = u64>,
    modules: &ProcessModules,
) -> Option<(u64, u64)> {
    if !p.is_ifunc {
        return Some((p.address - p.offset, p.size));
    }
    match ifuncs.next().unwrap_or(0) {
        0 => None,
        addr => {
            // The implementation's own symbol, when a table has it, gives its size;
            // otherwise the relocator scans a bounded window.
            let size = modules
                .symbol_containing(addr)
                .filter(|(_, f)| f.address == addr)
                .map(|(_, f)| f.size)
                .unwrap_or(0);
            Some((addr, size))
        }
    }
}

/// The probe's kind and its exit shim: a function whose returns cannot be probed gets
/// its entries only, with a note saying why.
fn kind_of(
    p: &ResolvedProbe,
    modules: &ProcessModules,
    exit: bool,
    mut exit_shim: u64,
    l: &str,
    notes: &mut Vec<String>,
) -> (ProbeKind, u64) {
    let wants_exit = exit || exit_shim != 0;
    let entries_only = if wants_exit && p.offset == 0 {
        entries_only(modules, p)
    } else {
        None
    };
    if let Some(why) = entries_only {
        notes.push(format!("{l}: only entries are probed: {why}"));
        exit_shim = 0;
    }
    let kind = if p.offset != 0 {
        ProbeKind::Offset
    } else if wants_exit && entries_only.is_none() {
        ProbeKind::Exit
    } else {
        ProbeKind::Entry
    };
    (kind, exit_shim)
}

/// The prepared results as installed probes. A refused one, or one whose patch would
/// overlap another's (this session's, or one an earlier tracer left), goes to
/// `all.refused`; a probe an earlier tracer left at the same site is taken over (it
/// leaves `adopted`).
pub(super) fn collect(
    results: &[PrepareResult],
    all: &mut Requests<'_>,
    adopted: &mut Vec<PrepareResult>,
) -> Result<Vec<Installed>, SessionError> {
    let mut installed: Vec<Installed> = Vec::new();
    // Installed patches by start, for the overlap check (they never overlap each other).
    let mut by_site: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for ((r, (l, p)), req) in results.iter().zip(&all.labels).zip(&all.requests) {
        if let Some((address, reason)) = refusal(r, req, &by_site, &installed, adopted) {
            all.refused.push(NotInstalled {
                label: l.clone(),
                address,
                reason,
            });
            continue;
        }
        by_site.insert(r.site, installed.len());
        installed.push(Installed::from_result(
            r,
            l.clone(),
            p.module_path.clone(),
            p.symbol.clone(),
        )?);
    }
    Ok(installed)
}

/// Why the prepared result `r` (of `req`) is not installed, and the address to report;
/// None when it is. `by_site` indexes `installed` by site. A site an earlier tracer left
/// patched is simply taken over (it leaves `adopted`).
fn refusal(
    r: &PrepareResult,
    req: &PrepareRequest,
    by_site: &std::collections::BTreeMap<u64, usize>,
    installed: &[Installed],
    adopted: &mut Vec<PrepareResult>,
) -> Option<(u64, String)> {
    if r.status != status::PREPARED {
        return Some((req.function + req.offset, r.message()));
    }
    // Two probes whose patched ranges overlap would write one jump into the
    // other (an IFUNC named both ways, an offset inside another probe's stolen
    // bytes): the first one stays, the other is refused.
    let end = r.site + r.stolen_len as u64;
    if let Some(other) = overlapping(by_site, installed, r.site, end) {
        let reason = if other.site == r.site {
            format!("the same code as {} is already probed", other.label)
        } else {
            format!(
                "its patch would overlap that of {} at {:#x}",
                other.label, other.site
            )
        };
        return Some((r.site, reason));
    }
    // A probe whose patch would overlap an earlier tracer's without being the same site
    // is refused.
    adopted.retain(|a| a.site != r.site);
    let a = adopted
        .iter()
        .find(|a| r.site < a.site + a.stolen_len as u64 && a.site < end)?;
    Some((
        r.site,
        format!(
            "its patch would overlap that of a probe an earlier tracer left at {:#x}",
            a.site
        ),
    ))
}

/// The installed patch that `[site, end)` would overlap, if any: the one at the same
/// site, else the last one starting before `end` (the patches are disjoint, so no earlier
/// one can reach past it). Logarithmic: a linear scan per probe made 10,000 probes
/// quadratic.
fn overlapping<'i>(
    by_site: &std::collections::BTreeMap<u64, usize>,
    installed: &'i [Installed],
    site: u64,
    end: u64,
) -> Option<&'i Installed> {
    if let Some(&i) = by_site.get(&site) {
        return Some(&installed[i]);
    }
    let (_, &i) = by_site.range(..end).next_back()?;
    let o = &installed[i];
    (site < o.site + o.stolen_len).then_some(o)
}

/// Add the agent's unwinder hooks to the probes to patch (hidden from reports), unless
/// an earlier tracer's patch is already there.
pub(super) fn add_hooks(
    hooks: Vec<PrepareResult>,
    installed: &mut Vec<Installed>,
    refused: &mut Vec<NotInstalled>,
    adopted: &[PrepareResult],
) -> Result<(), SessionError> {
    for r in hooks {
        // Without the hook, an exception thrown while returns are probed aborts
        // the program: a probe the user asked for on the same code gives way.
        if let Some(i) = installed.iter().position(|p| p.site == r.site && !p.hidden) {
            let user = installed.remove(i);
            refused.push(NotInstalled {
                label: user.label,
                address: user.site,
                reason: "tracer's own exception hook sits there while returns are \
                         probed (-x); probe it without -x"
                    .into(),
            });
        }
        if !installed.iter().any(|p| p.site == r.site) && !adopted.iter().any(|a| a.site == r.site)
        {
            installed.push(Installed::from_result(
                &r,
                String::new(),
                String::new(),
                String::new(),
            )?);
            installed.last_mut().expect("pushed").hidden = true;
        }
    }
    Ok(())
}

/// For `--timings`: the mean distance between consecutive trampolines of this prepare
/// (code, relocated bytes, jump back and alignment padding; gaps over a page, between
/// chunks, left out).
pub(super) fn record_trampoline_spacing(results: &[PrepareResult]) {
    let mut t: Vec<u64> = results
        .iter()
        .filter(|r| r.status == status::PREPARED)
        .map(|r| r.trampoline)
        .collect();
    t.sort_unstable();
    t.dedup();
    let gaps: Vec<u64> = t
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|&g| g <= 4096)
        .collect();
    if !gaps.is_empty() {
        let mean = gaps.iter().sum::<u64>() / gaps.len() as u64;
        timings::figure("trampoline bytes per probe (mean spacing)", mean);
        timings::figure("trampolines measured", gaps.len() as u64 + 1);
    }
}

/// For `--timings`: the trampoline code made per new probe, its relocated instructions
/// aside (what a probe costs in code whatever it takes over), and what preparing added
/// to the target's resident memory per probe (trampolines, counters, the agent's
/// bookkeeping; the agent itself is loaded before).
pub(super) fn record_probe_memory(pid: i32, rss_before: Option<u64>, results: &[PrepareResult]) {
    let made: Vec<&PrepareResult> = results
        .iter()
        .filter(|r| r.status == status::PREPARED && r.code_len > 0)
        .collect();
    if !made.is_empty() {
        let code: u64 = made
            .iter()
            .map(|r| (r.code_len - r.relocated_len.min(r.code_len)) as u64)
            .sum();
        let relocated: u64 = made.iter().map(|r| r.relocated_len as u64).sum();
        let n = made.len() as u64;
        timings::figure(
            "trampoline code bytes per probe (relocated aside)",
            code / n,
        );
        timings::figure("relocated bytes per probe", relocated / n);
    }
    if let Some(added) = timings::rss_growth_kib(pid, rss_before) {
        let n = results.len().max(1) as u64;
        timings::figure(
            "target RSS added by prepare per probe (bytes)",
            added * 1024 / n,
        );
    }
}
