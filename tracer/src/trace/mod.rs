//! The call tracer (`--trace`, `--chrome-trace`, `--perfetto`): the agent's built-in
//! entry and exit actions (`agent::builtin::trace`) write a record per event into an
//! event ring in shared memory; a thread here drains it while the target runs detached,
//! matches entries with returns per thread and writes the calls out.
//!
//! Arguments are decoded from, in this order: the DWARF of the probed object
//! ([`dwarf`]), the shipped libc prototypes ([`prototypes`]), else the first 3 integer
//! registers in hex; `--args N` forces N raw registers.

pub mod calls;
pub mod chrome;
pub mod dwarf;
pub mod json_lines;
pub mod perfetto;
pub mod prototypes;
pub mod record;
pub mod signature;
pub mod text;

use crate::pack::pace::{drain_until, note, Drain};
use crate::pack::region::SharedRegion;
use crate::pack::ring::{Consumer, Drained};
use crate::session::{AgentCall, Builtin, Session, SessionError};
use crate::spec::ResolvedProbe;
use crate::symbols::ProcessModules;
use calls::{Calls, Fanout, Output, ProbeInfo};
use probes::trace::{StartResult, MASK_SLOTS, START_SYMBOL};
use signature::Signature;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default ring: 4 MiB, about 37,000 calls' records before the tracer must drain.
pub const RING_BYTES: usize = 4 << 20;

/// What was asked on the command line.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Print one line per call.
    pub lines: bool,
    /// Those lines, and the summary at the end, as JSON objects (`--json`).
    pub json: bool,
    /// Show this many raw integer registers instead of decoding.
    pub raw_args: Option<usize>,
    pub chrome: Option<PathBuf>,
    pub perfetto: Option<PathBuf>,
    pub ring_bytes: usize,
}

impl Options {
    pub fn wanted(&self) -> bool {
        self.lines || self.chrome.is_some() || self.perfetto.is_some()
    }
}

/// The timestamp counter, converted to nanoseconds since the probes went live: the target's
/// records carry raw counter values (reading a clock through libc in the target could hit
/// a probe), and the counter is the same on every CPU of this machine.
struct Clock {
    tsc0: u64,
    ns_per_tick: f64,
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc is available on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl Clock {
    fn start() -> (Instant, u64) {
        (Instant::now(), rdtsc())
    }

    /// Calibrated over at least 20 ms since `start` (the set-up usually took that long);
    /// time 0 is the counter's value `zero`.
    fn calibrated((t0, tsc0): (Instant, u64), zero: u64) -> Clock {
        let min = Duration::from_millis(20);
        if let Some(left) = min.checked_sub(t0.elapsed()) {
            std::thread::sleep(left);
        }
        let (ns, ticks) = (t0.elapsed().as_nanos() as f64, rdtsc().wrapping_sub(tsc0));
        Clock {
            tsc0: zero,
            ns_per_tick: ns / ticks.max(1) as f64,
        }
    }

    fn ns(&self, tsc: u64) -> u64 {
        (tsc.saturating_sub(self.tsc0) as f64 * self.ns_per_tick) as u64
    }
}

/// The tracer before the session is installed: it starts the agent's side.
pub struct Tracer {
    opts: Options,
    clock0: (Instant, u64),
    started: Option<StartResult>,
    chrome: Option<std::fs::File>,
    perfetto: Option<std::fs::File>,
}

/// Why a trace cannot be written or shown.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot create the trace file {}: {source}; give a path in a writable directory", .path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the trace was not started in the agent")]
    NotStarted,
    #[error(transparent)]
    Layout(#[from] probes::pack::abi::PlanError),
    #[error("cannot map the trace region {path}: {source}")]
    Map {
        path: String,
        source: crate::pack::region::RegionError,
    },
    #[error("cannot start the trace thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn create(path: &Option<PathBuf>) -> Result<Option<std::fs::File>, TraceError> {
    path.as_ref()
        .map(|p| {
            std::fs::File::create(p).map_err(|source| TraceError::Create {
                path: p.clone(),
                source,
            })
        })
        .transpose()
}

impl Tracer {
    /// Creates the trace files: call before touching the target, so that a path that
    /// cannot be written costs no run.
    pub fn new(opts: Options) -> Result<Tracer, TraceError> {
        Ok(Tracer {
            chrome: create(&opts.chrome)?,
            perfetto: create(&opts.perfetto)?,
            opts,
            clock0: Clock::start(),
            started: None,
        })
    }
}

impl Builtin for Tracer {
    fn start(&mut self, call: &mut AgentCall<'_>) -> Result<(u64, u64), SessionError> {
        let size = std::mem::size_of::<StartResult>();
        let (ok, bytes) = call(START_SYMBOL, &[], self.opts.ring_bytes as u64, size)?;
        if ok != 1 || bytes.len() < size {
            return Err(SessionError::Agent(
                "the agent could not create the trace region".into(),
            ));
        }
        // SAFETY: StartResult is plain old data and `bytes` holds one.
        let r = unsafe { (bytes.as_ptr() as *const StartResult).read_unaligned() };
        self.started = Some(r);
        Ok((r.entry_shim, r.exit_shim))
    }
}

/// The name shown for a symbol: demangled without its parameter list, no version.
fn shown_name(symbol: &str) -> String {
    let bare = symbol.split('@').next().unwrap_or(symbol);
    crate::names::demangle(bare).map_or_else(|| bare.to_string(), |d| d.short)
}

/// The signature of each probe (by label): DWARF, prototypes, raw.
fn signatures(
    probes: &[ResolvedProbe],
    modules: &ProcessModules,
    raw: Option<usize>,
) -> HashMap<String, Signature> {
    let mut out = HashMap::new();
    if let Some(n) = raw {
        for p in probes {
            out.insert(crate::session::label(p, modules), Signature::raw(n));
        }
        return out;
    }
    // Function addresses in each file, for its DWARF.
    let mut by_file: HashMap<&str, (u64, HashSet<u64>)> = HashMap::new();
    for p in probes.iter().filter(|p| !p.is_ifunc) {
        if let Some(m) = modules.module_containing(p.address) {
            let e = by_file.entry(&m.path).or_insert((m.bias, HashSet::new()));
            e.1.insert((p.address - p.offset).wrapping_sub(m.bias));
        }
    }
    let dwarf: HashMap<&str, HashMap<u64, Signature>> = by_file
        .iter()
        .map(|(path, (_, wanted))| (*path, dwarf::signatures(std::path::Path::new(path), wanted)))
        .collect();
    for p in probes {
        let from_dwarf = dwarf.get(p.module_path.as_str()).and_then(|sigs| {
            let bias = by_file.get(p.module_path.as_str())?.0;
            sigs.get(&(p.address - p.offset).wrapping_sub(bias))
                .cloned()
        });
        let sig = from_dwarf
            .or_else(|| prototypes::lookup(&p.symbol))
            .unwrap_or_else(|| Signature::raw(3));
        out.insert(crate::session::label(p, modules), sig);
    }
    out
}

/// A thread's name, for the traces.
fn comm(pid: i32, tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The name of every thread of `pid` now.
fn thread_names(pid: i32) -> HashMap<u32, String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tid| Some((tid, comm(pid, tid)?)))
        .collect()
}

struct Shared {
    region: SharedRegion,
    ring_offset: usize,
    ring_bytes: usize,
}

/// The drain thread and what it shares.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Summary>>,
    json: bool,
}

#[derive(Debug, Default)]
struct Summary {
    calls: u64,
    records: u64,
    dropped: u64,
    problems: Vec<String>,
}

impl Tracer {
    /// Map the trace region, tell the agent which arguments are strings, and start the
    /// drain thread. Call after the session is installed, while the target is stopped.
    pub fn go(
        self,
        pid: i32,
        session: &Session,
        probes: &[ResolvedProbe],
        modules: &ProcessModules,
        lines: Box<dyn Write + Send>,
    ) -> Result<Running, TraceError> {
        let started = self.started.ok_or(TraceError::NotStarted)?;
        let layout = probes::trace::layout(self.opts.ring_bytes)?;
        let path = format!("/proc/{pid}/fd/{}", started.fd);
        let region = SharedRegion::open_agent(pid, started.fd, "tracer-pack", layout.total)
            .map_err(|source| TraceError::Map { path, source })?;
        let sigs = signatures(probes, modules, self.opts.raw_args);
        let infos = probe_infos(session, &sigs, &layout, &region);
        let process = comm(pid, pid as u32).unwrap_or_else(|| format!("process {pid}"));
        // Named now, while they exist (a short-lived thread may be gone by the time its
        // first records are read); threads created later inherit their creator's name
        // unless they set one, so the process's is the fallback.
        let known = thread_names(pid);
        let mut outs: Vec<Box<dyn Output>> = Vec::new();
        match (self.opts.lines, self.opts.json) {
            (true, true) => outs.push(Box::new(json_lines::JsonLines::new(lines, pid))),
            (true, false) => outs.push(Box::new(text::Text::new(lines))),
            (false, _) => {}
        }
        outs.extend(file_outputs(self.chrome, self.perfetto, pid, &process));
        let names = Names {
            pid,
            known,
            process,
        };
        let shared = Shared {
            region,
            ring_offset: layout.ring.ring_offset,
            ring_bytes: layout.ring.ring_bytes,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let clock0 = self.clock0;
        // Times count from here: the probes are in place, the target about to run on.
        let zero = rdtsc();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("trace".into())
                .spawn(move || {
                    let clock = Clock::calibrated(clock0, zero);
                    let calls = Calls::new(infos);
                    drain_loop(&shared, &stop, names, clock, calls, Fanout(outs))
                })
                .map_err(TraceError::Thread)?
        };
        Ok(Running {
            stop,
            thread: Some(thread),
            json: self.opts.json,
        })
    }
}

/// What the drain needs of each probe (name, signature, whether returns are probed),
/// by id; the string-argument mask of each written where the agent reads it.
fn probe_infos(
    session: &Session,
    sigs: &HashMap<String, Signature>,
    layout: &probes::trace::Layout,
    region: &SharedRegion,
) -> HashMap<u32, ProbeInfo> {
    let entries_only: HashSet<&str> = session
        .notes()
        .iter()
        .filter_map(|n| n.split_once(": only entries are probed: ").map(|(l, _)| l))
        .collect();
    let mut infos = HashMap::new();
    let view = region.view();
    for i in session.installed() {
        let Some(sig) = sigs.get(&i.label) else {
            continue;
        };
        if (i.id as usize) < MASK_SLOTS {
            let at = layout.masks + i.id as usize;
            // One byte in its word: read, change, store (the agent only reads).
            let word = at & !7;
            let mut w = view.u64(word).unwrap_or(0).to_le_bytes();
            w[at - word] = sig.string_mask();
            view.store(word, u64::from_le_bytes(w));
        }
        infos.insert(
            i.id,
            ProbeInfo {
                name: shown_name(&i.symbol),
                sig: sig.clone(),
                returns: !entries_only.contains(i.label.as_str()),
            },
        );
    }
    infos
}

/// The file outputs asked for (`--chrome-trace`, `--perfetto`), their headers written.
fn file_outputs(
    chrome: Option<std::fs::File>,
    perfetto: Option<std::fs::File>,
    pid: i32,
    process: &str,
) -> Vec<Box<dyn Output>> {
    let mut outs: Vec<Box<dyn Output>> = Vec::new();
    if let Some(f) = chrome {
        outs.push(Box::new(chrome::Chrome::start(f, pid, process)));
    }
    if let Some(f) = perfetto {
        outs.push(Box::new(perfetto::Perfetto::start(f, pid, process)));
    }
    outs
}

impl Running {
    /// Drain what is left, close the outputs, and say what was traced.
    pub fn finish(mut self) -> String {
        self.stop.store(true, Ordering::Release);
        let s = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if self.json {
            let v = serde_json::json!({"type": "trace", "trace": {"calls": s.calls,
                "received": s.records, "dropped": s.dropped, "problems": s.problems}});
            return format!("{v}\n");
        }
        let mut text = format!(
            "trace: {} calls, {} events received, {} dropped (ring full)\n",
            s.calls, s.records, s.dropped
        );
        if s.dropped > 0 {
            text.push_str(
                "note: trace: a bigger ring (--trace-ring BYTES) or fewer probes loses fewer\n",
            );
        }
        for p in &s.problems {
            text.push_str(&format!("warning: trace: {p}\n"));
        }
        text
    }
}

/// How long the drain sleeps when the ring was empty.
const IDLE: Duration = Duration::from_millis(2);

/// Thread names: those read at the start, else read at first sight, else the process's.
struct Names {
    pid: i32,
    known: HashMap<u32, String>,
    process: String,
}

impl Names {
    fn of(&self, tid: u32) -> String {
        self.known
            .get(&tid)
            .cloned()
            .or_else(|| comm(self.pid, tid))
            .unwrap_or_else(|| self.process.clone())
    }
}

/// The trace thread's reader: each record matched into calls and written out.
struct Records<'a> {
    s: &'a Shared,
    consumer: Consumer,
    names: Names,
    clock: Clock,
    calls: Calls,
    out: Fanout,
    sum: Summary,
}

fn drain_loop(
    s: &Shared,
    stop: &AtomicBool,
    names: Names,
    clock: Clock,
    calls: Calls,
    out: Fanout,
) -> Summary {
    let mut records = Records {
        s,
        consumer: Consumer::new(s.ring_offset, s.ring_bytes),
        names,
        clock,
        calls,
        out,
        sum: Summary::default(),
    };
    drain_until(stop, IDLE, &mut records);
    let Records {
        mut calls,
        mut out,
        mut sum,
        ..
    } = records;
    sum.calls = calls.calls;
    calls.finish(&mut out);
    sum
}

impl Drain for Records<'_> {
    fn pass(&mut self) -> Drained {
        let view = self.s.region.view();
        let Records {
            consumer,
            names,
            clock,
            calls,
            out,
            sum,
            ..
        } = self;
        let mut d = consumer.drain(view, |payload| match record::decode(payload) {
            Ok(r) => {
                sum.records += 1;
                if calls.is_new_thread(r.tid) {
                    out.thread(r.tid, &names.of(r.tid));
                }
                calls.record(&r, clock.ns(r.tsc), out);
            }
            Err(e) => note(&mut sum.problems, e),
        });
        for p in std::mem::take(&mut d.problems) {
            note(&mut self.sum.problems, p);
        }
        self.note_dropped();
        self.out.batch_done(Instant::now());
        d
    }

    fn skip_stuck(&mut self) {
        self.consumer.skip_stuck(self.s.region.view());
        note(
            &mut self.sum.problems,
            "skipped an event an action never finished".into(),
        );
    }
}

impl Records<'_> {
    /// Say how many events the agent dropped since the last pass.
    fn note_dropped(&mut self) {
        let dropped = self.consumer.dropped(self.s.region.view());
        if dropped > self.sum.dropped {
            self.out.note(&format!(
                "tracer: {} events dropped (trace ring full: the tracer could not keep up)",
                dropped - self.sum.dropped
            ));
            self.sum.dropped = dropped;
        }
    }
}

/// A writer the tests of the outputs read back.
#[cfg(test)]
pub(crate) mod test_sink {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub(crate) struct Shared(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
