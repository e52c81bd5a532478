//! The `tracer` command line.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracer::session::{ProbeReport, Session};
use tracer::spec::{self, ProbeSpec, ResolvedProbe};
use tracer::symbols::{ProcessModules, SymbolCache};
use tracer::threads::{self, ExitStatus, Process};

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
    /// Attach to a running process; detach on Ctrl-C, --duration, or when it exits.
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
    #[arg(short, long = "probe", value_name = "SPEC", required = true)]
    probe: Vec<String>,
    /// Probe returns too.
    #[arg(short = 'x', long)]
    exit: bool,
    /// Machine output: one JSON object per probe.
    #[arg(long)]
    json: bool,
    /// Write the output there instead of stderr.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tracer: {e}");
            ExitCode::from(1)
        }
    }
}

fn new_pack(name: &str) -> Result<ExitCode, String> {
    let dir = tracer::pack::scaffold::new_pack(std::path::Path::new("."), name)?;
    println!(
        "created {}: edit src/lib.rs, then `cargo build --release` there",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolve every spec; all must match something.
fn resolve(specs: &[String], modules: &ProcessModules) -> Result<Vec<ResolvedProbe>, String> {
    let mut out: Vec<ResolvedProbe> = Vec::new();
    for s in specs {
        for p in spec::resolve_str(s, modules)? {
            if !out.iter().any(|q| q.address == p.address) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn install(proc: &mut Process, args: &ProbeArgs) -> Result<Session, String> {
    let modules = SymbolCache::global()
        .process(proc.pid())
        .map_err(|e| e.to_string())?;
    let probes = resolve(&args.probe, &modules)?;
    let session =
        Session::install(proc, &modules, &probes, args.exit).map_err(|e| e.to_string())?;
    for n in session.notes() {
        eprintln!("tracer: note: {n}");
    }
    for r in session.refused() {
        eprintln!(
            "tracer: not probing {} at {:#x}: {}",
            r.label, r.address, r.reason
        );
    }
    Ok(session)
}

fn run(args: &ProbeArgs, cmd: &[String]) -> Result<ExitCode, String> {
    let mut proc = tracer::launch::launch(&cmd[0], &cmd[1..]).map_err(|e| e.to_string())?;
    let session = match install(&mut proc, args) {
        Ok(s) => s,
        Err(e) => {
            proc.kill();
            return Err(e);
        }
    };
    // Ctrl-C reaches the whole foreground group: let the program decide what it means,
    // and report when it ends.
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = proc.wait_exit().map_err(|e| e.to_string())?;
    if let Some(first) = proc.execs().first() {
        // The probes were in the program image that exec replaced.
        eprintln!(
            "tracer: note: {} exec'd {first}; the counts cover the program before that \
             (probes do not follow exec yet: run {first} directly)",
            cmd[0]
        );
    }
    output(args, &session.report())?;
    Ok(match status {
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
    })
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn attach(pid: i32, args: &ProbeArgs, duration: Option<f64>) -> Result<ExitCode, String> {
    let mut proc = threads::attach(pid).map_err(|e| e.to_string())?;
    let mut session = match install(&mut proc, args) {
        Ok(s) => s,
        Err(e) => {
            let _ = proc.detach();
            return Err(e);
        }
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let n = session.installed().len();
    eprintln!("tracer: {n} probe(s) live in {pid}; Ctrl-C to detach");
    proc.resume_all().map_err(|e| e.to_string())?;
    let deadline = duration.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut exited = None;
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        match proc.service(Duration::from_millis(50)) {
            Ok(Some(st)) => {
                exited = Some(st);
                break;
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if let Some(st) = exited {
        eprintln!("tracer: process {pid} ended ({st})");
    } else {
        session.remove(&mut proc).map_err(|e| e.to_string())?;
        proc.detach().map_err(|e| e.to_string())?;
    }
    output(args, &session.report())?;
    Ok(ExitCode::SUCCESS)
}

fn output(args: &ProbeArgs, reports: &[ProbeReport]) -> Result<(), String> {
    let mut text = String::new();
    if args.json {
        for r in reports {
            let mut v = serde_json::json!({
                "probe": r.label,
                "module": r.module,
                "symbol": r.symbol,
                "address": format!("{:#x}", r.address),
                "hits": r.hits,
                "skipped": r.skipped,
                "encoding": r.encoding.name(),
            });
            if args.exit {
                v["exits"] = r.exits.into();
                v["lost_exits"] = r.lost_exits.into();
            }
            if r.panics > 0 {
                v["panics"] = r.panics.into();
            }
            text.push_str(&v.to_string());
            text.push('\n');
        }
    } else {
        let w = reports
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(5)
            .max(5);
        text.push_str(&format!(
            "{:<w$}  {:>18}  {:>12}{}  {:>8}  encoding\n",
            "probe",
            "address",
            "hits",
            if args.exit { "         exits" } else { "" },
            "skipped"
        ));
        for r in reports {
            let exits = if args.exit {
                format!("  {:>12}", r.exits)
            } else {
                String::new()
            };
            text.push_str(&format!(
                "{:<w$}  {:>#18x}  {:>12}{exits}  {:>8}  {}\n",
                r.label, r.address, r.hits, r.skipped, r.encoding
            ));
        }
    }
    match &args.output {
        Some(p) => {
            std::fs::write(p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
        }
        None => std::io::stderr()
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string()),
    }
}

fn list(target: &str, pattern: Option<&str>) -> Result<ExitCode, String> {
    let modules = match target.parse::<i32>() {
        Ok(pid) => SymbolCache::global().process(pid),
        Err(_) => SymbolCache::global().file(std::path::Path::new(target)),
    }
    .map_err(|e| e.to_string())?;
    let spec = pattern
        .map(ProbeSpec::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let found = spec::list(&modules, spec.as_ref());
    if found.is_empty() {
        return Err(match pattern {
            Some(p) => format!("no function matches '{p}'"),
            None => "no functions found".into(),
        });
    }
    let pid = target.parse::<i32>().ok();
    let proc_mem = pid.map(tracer::probeable::ProcMemory::open).transpose();
    let proc_mem = proc_mem.map_err(|e| format!("cannot read the memory of {target}: {e}"))?;
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut out = std::io::stdout().lock();
    for (m, f, name) in found {
        let verdict = if f.is_ifunc {
            "ifunc: probes the implementation the loader picks".to_string()
        } else {
            let r = match &proc_mem {
                Some(mem) => tracer::probeable::check(mem, f.address, f.size),
                None => {
                    let bytes = files
                        .entry(m.path.clone())
                        .or_insert_with(|| tracer::probeable::module_bytes(m).unwrap_or_default());
                    let mem = tracer::probeable::FileMemory::new(bytes, &m.elf.segments, m.bias);
                    tracer::probeable::check(&mem, f.address, f.size)
                }
            };
            match r {
                Ok(()) => "probeable".to_string(),
                Err(why) => format!("refused: {why}"),
            }
        };
        let _ = writeln!(
            out,
            "{}:{}  {:#x}  size {}  {verdict}",
            m.name, name, f.address, f.size,
        );
    }
    Ok(ExitCode::SUCCESS)
}
