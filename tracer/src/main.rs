//! The `tracer` command line.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracer::detached::{self, PidFd, SignalFd, Woke};
use tracer::launch::LaunchError;
use tracer::pack::descriptors::PackError;
use tracer::pack::live::Live;
use tracer::pack::load::Pack;
use tracer::session::SessionError;
use tracer::session::{PackRequest, Session};
use tracer::spec::{self, ProbeSpec, ResolvedProbe};
use tracer::spec::{ResolveError, SpecError};
use tracer::symbols::SymbolError;
use tracer::symbols::{ProcessModules, SymbolCache};
use tracer::threads::{self, AttachError, ExitStatus, Process};
use tracer::timings;

mod output;
mod report;

use output::{Sink, Ticker};
use report::running_report;

/// Why a command failed: a layer's error with its cause kept (`source()`), or a message
/// of the command line's own. Shown to users as one line.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Symbols(#[from] SymbolError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot create the output file {}: {source}; give -o a path in a writable directory", .path.display())]
    CreateOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    WriteOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A step of the command's own failed; `what` says which.
    #[error("{what}: {source}")]
    Step {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Options(#[from] OptionError),
    #[error(transparent)]
    Live(#[from] tracer::pack::live::LiveError),
    #[error(transparent)]
    Trace(#[from] tracer::trace::TraceError),
    #[error(transparent)]
    Scaffold(#[from] tracer::pack::scaffold::ScaffoldError),
    #[error("{0}")]
    Message(String),
}

/// Options that do not go together, or a value out of range: refused before any process
/// is touched.
#[derive(Debug, thiserror::Error)]
enum OptionError {
    #[error("--interval {0}: give a number of seconds of at least 0.01")]
    Interval(f64),
    #[error(
        "--hist and --summary time the -p probes and cannot be combined with \
         --pack (a pack keeps its own histograms: see examples/latency)"
    )]
    TimedWithPack,
    #[error(
        "--hist and --summary cannot be combined with --trace, --chrome-trace \
         or --perfetto (both time returns): run them one at a time"
    )]
    TimedWithTrace,
    #[error("--hist and --summary need probes: add -p SPEC")]
    TimedWithoutProbes,
    #[error("--follow does not carry {0} into the command's children yet: drop --follow")]
    FollowWith(&'static str),
    #[error("--args N goes with --trace (or --chrome-trace, --perfetto)")]
    ArgsWithoutTrace,
    #[error(
        "--trace, --chrome-trace and --perfetto run instead of a pack's handlers: \
         use them without --pack"
    )]
    TraceWithPack,
    #[error("{0} is an offset inside a function: tracing shows calls, give whole functions")]
    TraceOffset(String),
    #[error("--trace-ring {0} is not a power of two of at least 4096 bytes")]
    TraceRing(usize),
    #[error(
        "attach does not follow children (only those PID {0} starts from now on could \
         be): drop --follow, or start the command with tracer run"
    )]
    AttachFollow(i32),
}

/// `CliError::Step` for what failed, keeping the error as its source.
fn step<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> CliError {
    let what = what.into();
    move |e| CliError::Step {
        what,
        source: Box::new(e),
    }
}

impl From<String> for CliError {
    fn from(m: String) -> Self {
        CliError::Message(m)
    }
}

/// Dynamic probes for running native programs: count calls of any function, with no
/// ptrace stop per hit.
#[derive(Parser)]
#[command(name = "tracer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Launch CMD with probes live before main; exit with CMD's status.
    Run {
        #[command(flatten)]
        probes: ProbeArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Put probes in a running process; take them out on Ctrl-C, SIGTERM or --duration,
    /// or report when it exits.
    Attach {
        pid: i32,
        #[command(flatten)]
        probes: ProbeArgs,
        /// Detach after SECS seconds.
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
    },
    /// List the functions of a process or file that match, and whether each can be probed.
    List {
        /// A PID or the path of an ELF file.
        target: String,
        /// [MODULE:]SYMBOL with * and ? globs.
        pattern: Option<String>,
    },
    /// Write a new probe pack crate NAME (a cdylib using probes) in the current directory.
    New {
        /// The crate's name and directory.
        name: String,
    },
}

#[derive(Args)]
struct ProbeArgs {
    /// [MODULE:]SYMBOL[+OFFSET], * and ? globs in both parts; repeatable.
    #[arg(
        short,
        long = "probe",
        value_name = "SPEC",
        required_unless_present = "pack"
    )]
    probe: Vec<String>,
    /// A probe pack: its crate directory (built with cargo) or its .so. Its handlers run
    /// at the probes it declares; its events print as they arrive, its maps at the end.
    #[arg(long, value_name = "DIR_OR_SO")]
    pack: Option<PathBuf>,
    /// Probe returns too.
    #[arg(short = 'x', long)]
    exit: bool,
    /// Machine output: JSON lines, each with a "type": "event" (live), then "map",
    /// "events" (the summary), "probe" and "refused".
    #[arg(long)]
    json: bool,
    /// Write the report there instead of stderr, and a pack's events (else on stdout)
    /// before it.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// List every refused probe and entries-only note, one per line, instead of one
    /// summary line each.
    #[arg(short, long)]
    verbose: bool,
    /// Print one line per call as it happens, with its decoded arguments, return value
    /// and duration, indented by call depth per thread (returns are probed too).
    #[arg(long)]
    trace: bool,
    /// Show N raw integer argument registers (0 to 6) instead of decoded arguments.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=6))]
    args: Option<u8>,
    /// Write every call to FILE in the Chrome trace-event JSON format (chrome://tracing,
    /// Perfetto UI, speedscope).
    #[arg(long, value_name = "FILE")]
    chrome_trace: Option<PathBuf>,
    /// Write every call to FILE in Perfetto's protobuf trace format (TrackEvent).
    #[arg(long, value_name = "FILE")]
    perfetto: Option<PathBuf>,
    /// Size of the trace's event ring in the target (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = tracer::trace::RING_BYTES)]
    trace_ring: usize,
    /// Print where the time went (start-up, symbols, stop, agent, prepare, patch, detach,
    /// removal) to stderr at the end, measured with the monotonic clock.
    #[arg(long)]
    timings: bool,
    /// Time every call of the -p probes (entry to return) and print a log2 histogram of
    /// their latency per probe, as bpftrace's hist().
    #[arg(long)]
    hist: bool,
    /// Time every call of the -p probes and print, per probe, calls, total, mean, min and
    /// max time and share of the time, sorted by total (as strace -c).
    #[arg(long)]
    summary: bool,
    /// Also print the running figures (the counts, or --hist/--summary) every SECS
    /// seconds while the target runs.
    #[arg(long, value_name = "SECS")]
    interval: Option<f64>,
    /// `run`: probe every process the command starts too (fork and exec), each reported
    /// by pid and command. The default for `run` (not with --pack).
    #[arg(short = 'f', long, overrides_with = "no_follow")]
    follow: bool,
    /// `run`: probe the launched program only.
    #[arg(long, overrides_with = "follow")]
    no_follow: bool,
}

impl ProbeArgs {
    /// Whether calls are timed in the target.
    fn timed(&self) -> bool {
        self.hist || self.summary
    }

    /// `--interval` checked: a positive number of seconds.
    fn interval(&self) -> Result<Option<Duration>, OptionError> {
        match self.interval {
            None => Ok(None),
            Some(s) if s.is_finite() && s >= 0.01 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(OptionError::Interval(s)),
        }
    }

    /// What the built-in options cannot be combined with, before any process is touched.
    fn check_builtins(&self) -> Result<(), OptionError> {
        self.interval()?;
        if self.timed() && self.pack.is_some() {
            return Err(OptionError::TimedWithPack);
        }
        if self.timed() && (self.trace || self.chrome_trace.is_some() || self.perfetto.is_some()) {
            return Err(OptionError::TimedWithTrace);
        }
        if self.timed() && self.probe.is_empty() {
            return Err(OptionError::TimedWithoutProbes);
        }
        Ok(())
    }

    /// Whether `run` follows the command's children: by default, except with what is
    /// not carried into them yet.
    fn follow_children(&self) -> Result<bool, OptionError> {
        let traced = self.trace || self.chrome_trace.is_some() || self.perfetto.is_some();
        let alone = if self.pack.is_some() {
            Some("a probe pack")
        } else if self.timed() || self.interval.is_some() {
            Some("--hist, --summary or --interval")
        } else if traced {
            Some("--trace, --chrome-trace or --perfetto")
        } else {
            None
        };
        match (alone, self.follow) {
            (Some(what), true) => Err(OptionError::FollowWith(what)),
            (Some(_), false) => Ok(false),
            (None, _) => Ok(!self.no_follow),
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracer::child_events::block_for_the_process();
    let cli = Cli::parse();
    let show_timings = match &cli.command {
        Command::Run { probes, .. } | Command::Attach { probes, .. } => probes.timings,
        _ => false,
    };
    timings::set_enabled(show_timings);
    let r = match cli.command {
        Command::Run { probes, cmd } => run(&probes, &cmd),
        Command::Attach {
            pid,
            probes,
            duration,
        } => attach(pid, &probes, duration),
        Command::List { target, pattern } => list(&target, pattern.as_deref()),
        Command::New { name } => new_pack(&name),
    };
    if show_timings {
        eprint!("tracer: {}", timings::render(start));
    }
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "tracer: {}",
                tracer::names::demangle_in_text(&e.to_string())
            );
            ExitCode::from(1)
        }
    }
}

fn new_pack(name: &str) -> Result<ExitCode, CliError> {
    let dir = tracer::pack::scaffold::new_pack(std::path::Path::new("."), name)?;
    println!(
        "created {0}: edit {0}/src/lib.rs, then run it: tracer run --pack {0} -- PROGRAM",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolve every spec; all must match something.
fn resolve(specs: &[String], modules: &ProcessModules) -> Result<Vec<ResolvedProbe>, CliError> {
    let mut out: Vec<ResolvedProbe> = Vec::new();
    // A set, not a scan of `out`: 10,000 probes took 40 ms of comparisons.
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        for p in spec::resolve_str(s, modules)? {
            if seen.insert(p.address) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The pack of `--pack`, built and read before any process is touched.
fn open_pack(args: &ProbeArgs) -> Result<Option<Pack>, CliError> {
    args.pack
        .as_deref()
        .map(tracer::pack::load::open)
        .transpose()
        .map_err(CliError::from)
}

/// What `--trace`, `--chrome-trace` and `--perfetto` ask for, checked; None without them.
fn trace_options(args: &ProbeArgs) -> Result<Option<tracer::trace::Options>, OptionError> {
    let opts = tracer::trace::Options {
        lines: args.trace,
        json: args.json,
        raw_args: args.args.map(usize::from),
        chrome: args.chrome_trace.clone(),
        perfetto: args.perfetto.clone(),
        ring_bytes: args.trace_ring,
    };
    if !opts.wanted() {
        if args.args.is_some() {
            return Err(OptionError::ArgsWithoutTrace);
        }
        return Ok(None);
    }
    if args.pack.is_some() {
        return Err(OptionError::TraceWithPack);
    }
    if let Some(s) = args
        .probe
        .iter()
        .find(|s| ProbeSpec::parse(s).is_ok_and(|p| p.offset != 0))
    {
        return Err(OptionError::TraceOffset(s.clone()));
    }
    if !args.trace_ring.is_power_of_two() || args.trace_ring < 4096 {
        return Err(OptionError::TraceRing(args.trace_ring));
    }
    Ok(Some(opts))
}

/// Following children: a spec may name functions of a program the command starts
/// (`-p 'libfoo:*' -- sh -c ./prog`), so one that matches nothing in the launched program
/// is a note. When none matches anything there, that is an error if some spec's module
/// is loaded but no function of it matches (a typo: `libfoo:wrk`, with suggestions), and
/// a note again if only their modules are missing (the command is a shell or a
/// wrapper): the session then only follows.
fn resolve_some(
    specs: &[String],
    modules: &ProcessModules,
) -> Result<Vec<ResolvedProbe>, CliError> {
    let mut out: Vec<ResolvedProbe> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut unmatched = Vec::new();
    for s in specs {
        ProbeSpec::parse(s)?;
        match spec::resolve_str(s, modules) {
            Ok(v) => out.extend(v.into_iter().filter(|p| seen.insert(p.address))),
            Err(e) => unmatched.push((s, e)),
        }
    }
    if out.is_empty() {
        if let Some(i) = unmatched
            .iter()
            .position(|(_, e)| !matches!(e, spec::ResolveError::NoModule { .. }))
        {
            return Err(unmatched.swap_remove(i).1.into());
        }
    }
    for (s, e) in unmatched {
        eprintln!(
            "tracer: note: {s} matches nothing in the launched program ({e}); it is tried in \
             every program that program starts"
        );
    }
    Ok(out)
}

fn install(
    proc: &mut Process,
    args: &ProbeArgs,
    pack: Option<&Pack>,
    sink: &Sink,
    mut tracing: Option<tracer::trace::Tracer>,
    follow: bool,
) -> Result<(Session, Option<tracer::trace::Running>), CliError> {
    let modules = timings::time("symbol loading", || {
        SymbolCache::global().process(proc.pid())
    })?;
    let probes = timings::time("spec resolution", || match follow {
        true => resolve_some(&args.probe, &modules),
        false => resolve(&args.probe, &modules),
    })?;
    let sites = pack_sites(pack, &modules)?;
    let pack_request = pack.map(|pack| PackRequest {
        pack,
        sites: &sites,
    });
    let rss_before = args.timings.then(|| timings::rss_kib(proc.pid())).flatten();
    let builtin = tracing
        .as_mut()
        .map(|t| t as &mut dyn tracer::session::Builtin);
    let session = Session::install_with(
        proc,
        &modules,
        &probes,
        args.exit,
        pack_request,
        args.timed(),
        builtin,
    )?;
    record_rss_added(proc.pid(), rss_before, &session);
    let lines = timings::time("refusal summary", || {
        refusal_lines(&session, &probes, &modules, args.verbose)
    });
    for line in lines {
        eprintln!("tracer: {line}");
    }
    let running = match tracing {
        Some(t) => Some(t.go(proc.pid(), &session, &probes, &modules, sink.trace_lines()?)?),
        None => None,
    };
    Ok((session, running))
}

/// Where the pack's probes go in this process (none without a pack), its notes said.
fn pack_sites(
    pack: Option<&Pack>,
    modules: &ProcessModules,
) -> Result<Vec<tracer::pack::load::PackSite>, CliError> {
    let Some(p) = pack else {
        return Ok(Vec::new());
    };
    let (sites, notes) = tracer::pack::load::resolve(p, modules)?;
    for n in notes {
        eprintln!("tracer: note: {n}");
    }
    Ok(sites)
}

/// For `--timings`: what the session added to the target's resident memory.
fn record_rss_added(pid: i32, rss_before: Option<u64>, session: &Session) {
    // Only with `--timings` (`rss_before` is None otherwise): each read walks the
    // target's page tables.
    if let Some(added) = timings::rss_growth_kib(pid, rss_before) {
        let n = session.installed().len().max(1) as u64;
        timings::figure("target RSS added (KiB)", added);
        timings::figure("target RSS added per probe (bytes)", added * 1024 / n);
    }
}

/// `label: only entries are probed: why` notes, as (label, why).
fn entries_only_notes(session: &Session) -> impl Iterator<Item = (&str, &str)> {
    session
        .notes()
        .iter()
        .filter_map(|n| n.split_once(": only entries are probed: "))
}

/// What to say about refused probes and entries-only notes: one line each for those the
/// user named exactly (no glob) and with `-v`; otherwise a line of counts by reason for
/// each kind (a single one is said in full).
fn refusal_lines(
    session: &Session,
    probes: &[ResolvedProbe],
    modules: &ProcessModules,
    verbose: bool,
) -> Vec<String> {
    let exact = exact_labels(probes, modules);
    let in_full = |label: &str| verbose || exact.contains(label);
    let mut lines = note_lines(session, &in_full);
    // A pack's probes are resolved from its descriptors, not from `-p`.
    let asked = probes
        .len()
        .max(session.installed().len() + session.refused().len());
    lines.extend(refused_lines(session, &in_full, asked));
    lines
}

/// The labels of the probes that come from a spec with no glob.
fn exact_labels(
    probes: &[ResolvedProbe],
    modules: &ProcessModules,
) -> std::collections::HashSet<String> {
    probes
        .iter()
        .filter(|p| {
            ProbeSpec::parse(&p.spec_text).is_ok_and(|s| {
                !spec::is_glob(&s.symbol) && !s.module.as_deref().is_some_and(spec::is_glob)
            })
        })
        .map(|p| tracer::session::label(p, modules))
        .collect()
}

fn shown(t: &str) -> String {
    tracer::names::demangle_in_text(t).into_owned()
}

/// The session's notes: each in full, except entries-only notes of probes not to be
/// said `in_full`, which are summed by reason (a single one said in full).
fn note_lines(session: &Session, in_full: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut summed_notes = Vec::new();
    for n in session.notes() {
        match n.split_once(": only entries are probed: ") {
            Some((l, why)) if !in_full(l) => summed_notes.push(why),
            _ => lines.push(format!("note: {}", shown(n))),
        }
    }
    match summed_notes.as_slice() {
        [] => {}
        [_] => lines.extend(
            entries_only_notes(session)
                .filter(|(l, _)| !in_full(l))
                .map(|(l, why)| format!("note: {}: only entries are probed: {why}", shown(l))),
        ),
        whys => lines.push(format!(
            "note: {}",
            tracer::refusals::entries_only_line(whys)
        )),
    }
    lines
}

/// The refused probes: each said `in_full` on its line, the others summed by reason (a
/// single one said in full) out of `asked` probes.
fn refused_lines(session: &Session, in_full: &dyn Fn(&str) -> bool, asked: usize) -> Vec<String> {
    let one = |r: &tracer::session::NotInstalled| {
        format!(
            "not probing {} at {:#x}: {}",
            shown(&r.label),
            r.address,
            shown(&r.reason)
        )
    };
    let mut lines = Vec::new();
    let mut summed = Vec::new();
    for r in session.refused() {
        if in_full(&r.label) {
            lines.push(one(r));
        } else {
            summed.push(r);
        }
    }
    match summed.as_slice() {
        [] => {}
        [r] => lines.push(one(r)),
        many => {
            let reasons: Vec<&str> = many.iter().map(|r| r.reason.as_str()).collect();
            lines.push(tracer::refusals::refusals_line(&reasons, asked));
        }
    }
    lines
}

/// Signals that ask `tracer run` to end: passed on to the program, which decides what
/// they mean; tracer reports when it has ended. Those a terminal sends (Ctrl-C, Ctrl-\,
/// hang-up) reach the program by themselves and are not sent twice.
const FORWARDED: &[i32] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn run(args: &ProbeArgs, cmd: &[String]) -> Result<ExitCode, CliError> {
    args.check_builtins()?;
    let tracing = trace_options(args)?
        .map(tracer::trace::Tracer::new)
        .transpose()?;
    let follow = args.follow_children()?;
    let mut sink = Sink::open(args)?;
    let pack = open_pack(args)?;
    // Blocked before the launch, so that one arriving during set-up is passed on too.
    let signals = SignalFd::block(FORWARDED).map_err(step("cannot block signals"))?;
    let mut proc = timings::time("process start-up", || {
        tracer::launch::launch(&cmd[0], &cmd[1..])
    })?;
    let (session, traced, live, pidfd) =
        match install_launched(&mut proc, args, pack, &sink, tracing, follow) {
            Ok(s) => s,
            Err(e) => {
                proc.kill();
                return Err(e);
            }
        };
    let pid = proc.pid();
    let image = detached::comm(pid);
    let (session, follower) = start_following(&mut proc, session, args, follow);
    // The program runs untraced from here: signals reach it directly.
    if let Err(e) = timings::time("detach", || proc.detach()) {
        kill_and_reap(pid);
        return Err(e.into());
    }
    let mut ticker = Ticker::new(args.interval()?);
    let (status, image_at_end) =
        wait_child(
            pid,
            &pidfd,
            &signals,
            &mut ticker,
            &mut |k, at| match &session {
                Some(s) => sink.write_text(&running_report(args, s, k, at)),
                None => Ok(()),
            },
        )?;
    let followed = follower.map(tracer::follow::Follower::finish);
    note_exec(&cmd[0], pid, image.clone(), image_at_end, followed.as_ref());
    let maps = finish_outputs(traced, live);
    let who = (pid, image.unwrap_or_default());
    timings::time("report", || match (&followed, &session) {
        (Some(reg), _) => sink.write_followed(args, reg),
        (None, Some(session)) => sink.write(args, &maps, session, Some((who.0, &who.1))),
        (None, None) => Ok(()),
    })?;
    drop(signals);
    Ok(exit_like(status))
}

/// The launched program's probes in place, its pack's events flowing and a pidfd to wait
/// on; the caller kills the program when this fails.
fn install_launched(
    proc: &mut Process,
    args: &ProbeArgs,
    pack: Option<Pack>,
    sink: &Sink,
    tracing: Option<tracer::trace::Tracer>,
    follow: bool,
) -> Result<Installed, CliError> {
    let (session, traced) = install(proc, args, pack.as_ref(), sink, tracing, follow)?;
    let live = start_live(proc, &session, pack, args, sink)?;
    let pid = proc.pid();
    let pidfd = PidFd::open(pid).map_err(step(format!("cannot open a pidfd for PID {pid}")))?;
    Ok((session, traced, live, pidfd))
}

/// What a session set up: the probes, the trace being recorded, the pack's event thread,
/// and the pidfd that says when the target ends.
type Installed = (Session, Option<tracer::trace::Running>, Option<Live>, PidFd);

/// Stops the trace and the pack's event thread; what they leave for the report (the
/// pack's maps, the trace's summary), rendered.
fn finish_outputs(traced: Option<tracer::trace::Running>, live: Option<Live>) -> String {
    traced
        .map(tracer::trace::Running::finish)
        .unwrap_or_default()
        + &live.map(Live::finish).unwrap_or_default()
}

/// Says when the program exec'd another one whose calls the counts do not cover.
fn note_exec(
    command: &str,
    pid: i32,
    image: Option<String>,
    image_at_end: Option<String>,
    followed: Option<&tracer::follow::Registry>,
) {
    let (Some(first), Some(last)) = (image, image_at_end) else {
        return;
    };
    if followed.is_some_and(|r| !r.exec_of(pid)) && first != last {
        eprintln!(
            "tracer: note: {command} exec'd {last}, which did not check in (a static program, or \
             one started without the LD_PRELOAD and TRACER_FOLLOW tracer set); the counts \
             cover the program before that"
        );
    } else if followed.is_none() && first != last {
        // The probes were in the program image that exec replaced.
        eprintln!(
            "tracer: note: {command} exec'd {last}; the counts cover the program before that \
             (probes do not follow exec yet: run {last} directly)"
        );
    }
}

/// tracer's own exit: the program's code, or the same signal, so shells see what the
/// program did.
fn exit_like(status: ExitStatus) -> ExitCode {
    match status {
        ExitStatus::Code(c) => ExitCode::from(c as u8),
        ExitStatus::Signal(s) => {
            // Die the same way, so shells see what the program did.
            // SAFETY: restoring the default action and raising the signal on ourselves.
            unsafe {
                libc::signal(s, libc::SIG_DFL);
                libc::raise(s);
            }
            ExitCode::from(128 + s as u8)
        }
    }
}

/// With `follow`, have the launched program (stopped, probes in) pass the agent on to its
/// children, and serve their check-ins; the session then belongs to the follower. Without
/// it, or when following cannot start (said in a note), the session is returned.
fn start_following(
    proc: &mut Process,
    session: Session,
    args: &ProbeArgs,
    follow: bool,
) -> (Option<Session>, Option<tracer::follow::Follower>) {
    if !follow {
        return (Some(session), None);
    }
    let opts = tracer::follow::Options {
        specs: args.probe.clone(),
        exit: args.exit,
    };
    match tracer::follow::Follower::start(proc, session, opts) {
        Ok(f) => (None, Some(f)),
        Err(failed) => {
            let (s, e) = *failed;
            eprintln!("tracer: note: not following the command's children: {e}");
            (Some(s), None)
        }
    }
}

/// Waits in the kernel for our detached child to end, passing on the signals that ask
/// tracer to end. Returns how it ended and the name of the program image it ran last
/// (read from the zombie, before reaping it).
fn wait_child(
    pid: i32,
    pidfd: &PidFd,
    signals: &SignalFd,
    ticker: &mut Ticker,
    tick: &mut dyn FnMut(u64, Duration) -> Result<(), CliError>,
) -> Result<(ExitStatus, Option<String>), CliError> {
    loop {
        match detached::wait(pidfd, signals, ticker.next()) {
            Ok(Woke::Ended) => break,
            Ok(Woke::Deadline) => ticker.fire(tick)?,
            Ok(Woke::Signal(r)) if !r.from_terminal => {
                // SAFETY: kill with our own unreaped child's pid.
                unsafe { libc::kill(pid, r.signal) };
            }
            Ok(_) => {}
            Err(e) => return Err(step(format!("waiting for PID {pid} failed"))(e)),
        }
    }
    let image = detached::comm(pid);
    let status = loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, c)) => break ExitStatus::Code(c),
            Ok(WaitStatus::Signaled(_, s, _)) => break ExitStatus::Signal(s as i32),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(step(format!("waiting for PID {pid} failed"))(e)),
        }
    };
    Ok((status, image))
}

fn kill_and_reap(pid: i32) {
    // SAFETY: kill with our own child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL));
}

/// Signals that end `tracer attach`: it then removes its probes, detaches and reports.
const STOPPING: &[i32] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn attach(pid: i32, args: &ProbeArgs, duration: Option<f64>) -> Result<ExitCode, CliError> {
    if args.follow {
        return Err(OptionError::AttachFollow(pid).into());
    }
    args.check_builtins()?;
    let tracing = trace_options(args)?
        .map(tracer::trace::Tracer::new)
        .transpose()?;
    // Here, not in `threads::attach`: taking probes out of a process the user stopped
    // meanwhile must still work.
    if let Some(what) = tracer::process_kind::stopped(pid) {
        return Err(what.into());
    }
    let mut sink = Sink::open(args)?;
    let pack = open_pack(args)?;
    if let Some(pack) = pack
        .as_ref()
        .filter(|_| tracer::session::other_session_live(pid))
    {
        return swap_pack(pid, pack);
    }
    // Blocked before attaching, so that one arriving during set-up ends the session as
    // soon as the probes are in place, in order.
    let signals = SignalFd::block(STOPPING).map_err(step("cannot block signals"))?;
    let proc = timings::time("seize and stop", || threads::attach(pid))?;
    let (mut proc, (mut session, traced, live, pidfd)) =
        install_attached(proc, args, pack, &sink, tracing)?;
    let n = session.installed().len();
    let say_live =
        || eprintln!("tracer: {n} probe(s) live in {pid}; Ctrl-C (or SIGTERM) to remove them");
    let deadline = duration.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    if stop_at_once(deadline, &signals)? {
        // `--duration 0`, or a signal during set-up: remove the probes while still
        // attached rather than detach and come back.
        say_live();
        let left = timings::time("removal", || session.remove(&mut proc))?;
        note_left_alone(pid, &left);
        timings::time("detach", || proc.detach())?;
    } else {
        // The probes count by themselves: the target runs untraced until we come back.
        timings::time("detach", || proc.detach())?;
        // Said once the target runs free: a tracer killed from here on (even SIGKILL)
        // leaves a running target whose probes the next attach adopts, while one killed
        // in the middle of a remote call (the detach's own clean-up is one) would leave a
        // thread about to trap.
        say_live();
        wait_and_remove(
            pid,
            &mut session,
            &pidfd,
            &signals,
            deadline,
            args,
            &mut sink,
        )?;
    }
    let maps = finish_outputs(traced, live);
    let comm = detached::comm(pid).unwrap_or_default();
    timings::time("report", || {
        sink.write(args, &maps, &session, Some((pid, &comm)))
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Whether the session ends before the target runs on: `--duration` already over, or a
/// stopping signal came during set-up.
fn stop_at_once(deadline: Option<Instant>, signals: &SignalFd) -> Result<bool, CliError> {
    Ok(deadline.is_some_and(|d| Instant::now() >= d)
        || signals
            .take()
            .map_err(step("cannot read signals"))?
            .is_some())
}

/// The attached target's probes in place, its pack's events flowing and a pidfd to wait
/// on; on failure the target is left as it was (probes removed, detached).
fn install_attached(
    mut proc: Process,
    args: &ProbeArgs,
    pack: Option<Pack>,
    sink: &Sink,
    tracing: Option<tracer::trace::Tracer>,
) -> Result<(Process, Installed), CliError> {
    let pid = proc.pid();
    let (mut session, traced) = match install(&mut proc, args, pack.as_ref(), sink, tracing, false)
    {
        Ok(s) => s,
        Err(e) => {
            let _ = proc.detach();
            return Err(e);
        }
    };
    let live = match start_live(&proc, &session, pack, args, sink) {
        Ok(l) => l,
        Err(e) => {
            session.remove(&mut proc)?;
            let _ = proc.detach();
            return Err(e);
        }
    };
    let pidfd = match PidFd::open(pid) {
        Ok(f) => f,
        Err(e) => {
            session.remove(&mut proc)?;
            let _ = proc.detach();
            return Err(step(format!("cannot open a pidfd for PID {pid}"))(e));
        }
    };
    Ok((proc, (session, traced, live, pidfd)))
}

/// Once the probes count in the detached target: waits for its end, a stopping signal or
/// the deadline, then attaches again to remove the probes (unless it ended).
fn wait_and_remove(
    pid: i32,
    session: &mut Session,
    pidfd: &PidFd,
    signals: &SignalFd,
    deadline: Option<Instant>,
    args: &ProbeArgs,
    sink: &mut Sink,
) -> Result<(), CliError> {
    let woke = wait_detached(
        pid,
        pidfd,
        signals,
        deadline,
        &mut |k, at| sink.write_text(&running_report(args, session, k, at)),
        args.interval()?,
    )?;
    let removed = woke != Woke::Ended
        && timings::time("removal (attach again, restore, detach)", || {
            remove_probes(pid, session, pidfd)
        })?;
    if !removed {
        eprintln!("tracer: process {pid} ended; the counts cover its whole run since attach");
    }
    Ok(())
}

/// Waits, detached, for the attached target to end, a stopping signal or the deadline,
/// printing the `--interval` reports meanwhile. Returns what woke it.
fn wait_detached(
    pid: i32,
    pidfd: &PidFd,
    signals: &SignalFd,
    deadline: Option<Instant>,
    tick: &mut dyn FnMut(u64, Duration) -> Result<(), CliError>,
    interval: Option<Duration>,
) -> Result<Woke, CliError> {
    let mut ticker = Ticker::new(interval);
    loop {
        let next = match (deadline, ticker.next()) {
            (Some(d), Some(t)) => Some(d.min(t)),
            (d, t) => d.or(t),
        };
        let woke = detached::wait(pidfd, signals, next)
            .map_err(step(format!("waiting for PID {pid} failed")))?;
        if woke == Woke::Deadline && deadline.is_none_or(|d| Instant::now() < d) {
            ticker.fire(tick)?;
            continue;
        }
        return Ok(woke);
    }
}

/// Hot swap: another tracer's session runs a pack in `pid`; replace its handlers by this
/// build's (same name, same maps), keeping its maps and its patches, and leave.
fn swap_pack(pid: i32, pack: &Pack) -> Result<ExitCode, CliError> {
    let mut proc = threads::attach(pid)?;
    let r = tracer::session::swap_pack(&mut proc, pack);
    let detached = proc.detach();
    let swapped = r?;
    detached?;
    eprintln!(
        "tracer: swapped in {} in process {pid}: {swapped} handler(s) replaced, maps kept; \
         the running session goes on and reports them",
        pack.info.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Map the loaded pack's shared region and start printing its events (to the output file,
/// or stdout), while the target is still stopped.
fn start_live(
    proc: &Process,
    session: &Session,
    pack: Option<Pack>,
    args: &ProbeArgs,
    sink: &Sink,
) -> Result<Option<Live>, CliError> {
    let (Some(pack), Some((fd, _))) = (pack, session.pack_region()) else {
        return Ok(None);
    };
    let events = sink.events()?;
    Ok(Live::start(proc.pid(), fd, &pack.name, pack.info, args.json, events).map(Some)?)
}

/// Attaches again (threads created meanwhile included), restores every patched byte with
/// every thread stopped, and detaches. Ok(false) when the process ended meanwhile.
fn remove_probes(pid: i32, session: &mut Session, pidfd: &PidFd) -> Result<bool, CliError> {
    let gone = || pidfd.ended().unwrap_or(false);
    let mut proc = match threads::attach(pid) {
        Ok(p) => p,
        Err(AttachError::NoSuchProcess { .. } | AttachError::Exited { .. }) => return Ok(false),
        Err(_) if gone() => return Ok(false),
        Err(e) => {
            return Err(step(
                "cannot attach again to remove the probes, which stay in place",
            )(e))
        }
    };
    match session.remove(&mut proc) {
        Ok(left) => note_left_alone(pid, &left),
        Err(_) if gone() => return Ok(false),
        Err(e) => return Err(step("cannot remove the probes")(e)),
    }
    match proc.detach() {
        Ok(()) => Ok(true),
        Err(_) if gone() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Says which probes were no longer in place when we came back to remove them.
fn note_left_alone(pid: i32, left: &[String]) {
    if left.is_empty() {
        return;
    }
    let mut names = left
        .iter()
        .take(5)
        .map(|l| tracer::names::demangle_in_text(l).into_owned())
        .collect::<Vec<_>>()
        .join(", ");
    if left.len() > 5 {
        names.push_str(&format!(" and {} more", left.len() - 5));
    }
    eprintln!(
        "tracer: note: the patches of {names} were no longer there (their library was \
         unloaded, by dlclose, or PID {pid} exec'd another program): calls after that, \
         also through the library loaded again, were not counted; that code was left as \
         it is"
    );
}

fn list(target: &str, pattern: Option<&str>) -> Result<ExitCode, CliError> {
    let pid = target.parse::<i32>().ok();
    if let Some(what) = pid.and_then(tracer::process_kind::not_a_program) {
        return Err(what.into());
    }
    if let Some(pid) = pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::path::Path::new(target).exists()
        {
            return Err(format!("no process with PID {pid}: check the PID (see `ps`)").into());
        }
    }
    let modules = match pid {
        Some(pid) => SymbolCache::global().process(pid),
        None => SymbolCache::global().file(std::path::Path::new(target)),
    }?;
    let spec = pattern.map(ProbeSpec::parse).transpose()?;
    let found = spec::list(&modules, spec.as_ref());
    if found.is_empty() {
        return Err(match pattern {
            Some(p) => format!("no function matches '{p}'").into(),
            None => "no functions found".to_string().into(),
        });
    }
    // What attach would refuse for the whole process, it refuses for every function.
    let whole_process = pid.and_then(|pid| match tracer::inject::libc_functions(pid) {
        Err(
            e @ (tracer::inject::InjectError::StaticTarget { .. }
            | tracer::inject::InjectError::NoDlopen { .. }),
        ) => Some(format!("refused: {e}")),
        _ => None,
    });
    let proc_mem = pid.map(tracer::probeable::ProcMemory::open).transpose();
    let proc_mem = proc_mem.map_err(step(format!("cannot read the memory of {target}")))?;
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut out = std::io::stdout().lock();
    for (m, f, name) in found {
        let verdict = match &whole_process {
            Some(v) => v.clone(),
            None => {
                let mut check = |address: u64, size: u64| match &proc_mem {
                    Some(mem) => tracer::probeable::check(mem, address, size),
                    None => {
                        let bytes = files.entry(m.path.clone()).or_insert_with(|| {
                            tracer::probeable::module_bytes(m).unwrap_or_default()
                        });
                        let mem =
                            tracer::probeable::FileMemory::new(bytes, &m.elf.segments, m.bias);
                        tracer::probeable::check(&mem, address, size)
                    }
                };
                function_verdict(&modules, m, &f, &mut check)
            }
        };
        let _ = writeln!(
            out,
            "{}:{}  {:#x}  size {}  {verdict}",
            m.name,
            m.elf.demangled(name).map_or(name, |d| d.full.as_str()),
            f.address,
            f.size,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The verdict `tracer list` shows for one function: what attach would do with a probe
/// there, and with `-x`.
fn function_verdict(
    modules: &ProcessModules,
    m: &tracer::symbols::Module,
    f: &tracer::symbols::Function<'_>,
    check: &mut dyn FnMut(u64, u64) -> Result<(), agent::relocator::Refusal>,
) -> String {
    let (module, address, size, via) = if f.is_ifunc {
        let resolved = modules
            .pid
            .and_then(|pid| tracer::probeable::ifunc_target(pid, modules, m, f.address, f.name()));
        let named = |a: u64| {
            modules
                .symbol_containing(a)
                .filter(|(_, imp)| imp.address == a)
        };
        match resolved.map(|a| (a, named(a))) {
            Some((a, Some((im, imp)))) => {
                (im, a, imp.size, format!("ifunc, lands on {}: ", imp.name()))
            }
            Some((a, None)) => {
                let im = modules.module_containing(a).unwrap_or(m);
                (im, a, 0, format!("ifunc, lands on {a:#x}: "))
            }
            None if modules.pid.is_some() => {
                return "ifunc: probes the implementation the target's loader picked, \
                        checked at attach time"
                    .into()
            }
            None => {
                return "ifunc: probes the implementation the loader picks, resolved at \
                        attach time"
                    .into()
            }
        }
    } else {
        (m, f.address, f.size, String::new())
    };
    let hooked = !f.is_ifunc && tracer::probeable::hooked_under_exit(f.names);
    match check(address, size) {
        Ok(()) => match tracer::probeable::entries_only_at(module, address) {
            Some(why) if hooked => format!(
                "{via}probeable without -x (with -x tracer's own exception hook takes its \
                 place; entries only: {why})"
            ),
            Some(why) => format!("{via}probeable (entries only: {why})"),
            None => format!("{via}probeable"),
        },
        Err(why) => format!("{via}refused: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{step, CliError};
    use std::error::Error;

    /// A failed step reads as one line naming the step and its cause, and the cause is
    /// kept as the source rather than flattened into text.
    #[test]
    fn a_failed_step_keeps_its_cause() {
        let e: CliError = step("cannot block signals")(nix::errno::Errno::EPERM);
        assert_eq!(
            e.to_string(),
            format!("cannot block signals: {}", nix::errno::Errno::EPERM)
        );
        let cause = e.source().expect("a source");
        assert_eq!(
            cause.downcast_ref::<nix::errno::Errno>(),
            Some(&nix::errno::Errno::EPERM)
        );
    }
}
