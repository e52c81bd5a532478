//! Where `run` and `attach` write: the report sink (a file or stderr, with pack events
//! to the file or stdout) and the `--interval` ticker. Part of the command-line binary.
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracer::session::{ProbeReport, Session};

use crate::report::{latency_report, render};
use crate::{CliError, ProbeArgs};

/// Where the report goes. A file is created before anything touches a process, so that a
/// path that cannot be written costs neither a run nor its results.
pub(crate) enum Sink {
    File(std::fs::File, PathBuf),
    Stderr,
}

impl Sink {
    pub(crate) fn open(args: &ProbeArgs) -> Result<Sink, CliError> {
        match &args.output {
            None => Ok(Sink::Stderr),
            Some(p) => std::fs::File::create(p)
                .map(|f| Sink::File(f, p.clone()))
                .map_err(|source| CliError::CreateOutput {
                    path: p.clone(),
                    source,
                }),
        }
    }

    /// Where a pack's events go as they arrive, one line each: the output file (before
    /// the report, which is written once the event thread has stopped), else stdout, so
    /// that they can be piped on while the report and tracer's notes stay on stderr.
    pub(crate) fn events(&self) -> Result<Box<dyn Write + Send>, CliError> {
        match self {
            Sink::File(f, p) => f
                .try_clone()
                .map(|f| Box::new(f) as Box<dyn Write + Send>)
                .map_err(|source| CliError::WriteOutput {
                    path: p.clone(),
                    source,
                }),
            Sink::Stderr => Ok(Box::new(std::io::stdout())),
        }
    }

    /// Where `--trace` lines go as calls return: the output file (before the report),
    /// else stderr, as ltrace's and strace's do: under `tracer run` stdout is the
    /// program's, and `tracer run --trace -- CMD > out` must leave `out` as CMD wrote it.
    pub(crate) fn trace_lines(&self) -> Result<Box<dyn Write + Send>, CliError> {
        match self {
            Sink::File(..) => self.events(),
            Sink::Stderr => Ok(Box::new(std::io::stderr())),
        }
    }

    /// Write the pack's maps (already rendered), then the per-probe report (or the
    /// latency views asked for).
    pub(crate) fn write(
        &mut self,
        args: &ProbeArgs,
        maps: &str,
        session: &Session,
        who: Option<(i32, &str)>,
    ) -> Result<(), CliError> {
        let mut report = match args.timed() {
            // With --json, the refused probes follow as in the counts report.
            true if args.json => {
                latency_report(args, session, None) + &render(args, &[], session, who)
            }
            true => latency_report(args, session, None),
            false => render(args, &session.report(), session, who),
        };
        if args.interval.is_some() && !args.json {
            // Told apart from the running reports above it.
            report.insert_str(0, "--- final ---\n");
        }
        self.write_text(&(maps.to_string() + &report))
    }

    /// The report of every process followed.
    pub(crate) fn write_followed(
        &mut self,
        args: &ProbeArgs,
        reg: &tracer::follow::Registry,
    ) -> Result<(), CliError> {
        let table =
            |r: &[ProbeReport], s: &Session, who: Option<(i32, &str)>| render(args, r, s, who);
        self.write_text(&tracer::follow::render(reg, args.json, &table))
    }

    pub(crate) fn write_text(&mut self, text: &str) -> Result<(), CliError> {
        match self {
            Sink::File(f, p) => {
                f.write_all(text.as_bytes())
                    .map_err(|source| CliError::WriteOutput {
                        path: p.clone(),
                        source,
                    })
            }
            Sink::Stderr => Ok(std::io::stderr().write_all(text.as_bytes())?),
        }
    }
}

/// When `--interval` reports are due, counted from the start of the wait.
pub(crate) struct Ticker {
    every: Option<Duration>,
    start: Instant,
    fired: u64,
}

impl Ticker {
    pub(crate) fn new(every: Option<Duration>) -> Ticker {
        Ticker {
            every,
            start: Instant::now(),
            fired: 0,
        }
    }

    /// The time of the next report, if any.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.every
            .map(|d| self.start + d.saturating_mul(self.fired as u32 + 1))
    }

    /// Print the report that is due (number, time since the start); one that fell behind
    /// is not printed twice.
    pub(crate) fn fire(
        &mut self,
        f: &mut dyn FnMut(u64, Duration) -> Result<(), CliError>,
    ) -> Result<(), CliError> {
        let Some(every) = self.every else {
            return Ok(());
        };
        let at = self.start.elapsed();
        self.fired = (at.as_nanos() / every.as_nanos().max(1)) as u64;
        f(self.fired, at)
    }
}
