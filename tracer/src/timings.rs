//! Where an attach's milliseconds go: phases timed with the monotonic clock, printed by
//! `--timings`.
//!
//! One recorder per tracer process (a static), so that the phases deep in the session and
//! injection code are timed without threading a parameter through every signature.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether `--timings` was asked for: figures that cost a read of the target's memory
/// map are taken only then.
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Phases in the order they were recorded; a phase recorded twice adds up.
static PHASES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

/// Adds `d` to `phase`.
pub fn add(phase: &'static str, d: Duration) {
    let mut v = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    match v.iter_mut().find(|(p, _)| *p == phase) {
        Some((_, t)) => *t += d,
        None => v.push((phase, d)),
    }
}

/// Runs `f`, adding the time it took to `phase`.
pub fn time<T>(phase: &'static str, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let r = f();
    add(phase, t0.elapsed());
    r
}

/// The phases recorded so far.
pub fn phases() -> Vec<(&'static str, Duration)> {
    PHASES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Extra figures reported with the phases (counts, bytes), in recording order.
static FIGURES: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// Records a figure such as the bytes of trampoline code.
pub fn figure(name: &'static str, value: u64) {
    let mut v = FIGURES.lock().unwrap_or_else(|e| e.into_inner());
    match v.iter_mut().find(|(n, _)| *n == name) {
        Some((_, x)) => *x = value,
        None => v.push((name, value)),
    }
}

/// Adds one to the figure `name` (a count of round trips, say).
pub fn count(name: &'static str) {
    let mut v = FIGURES.lock().unwrap_or_else(|e| e.into_inner());
    match v.iter_mut().find(|(n, _)| *n == name) {
        Some((_, x)) => *x += 1,
        None => v.push((name, 1)),
    }
}

/// The figures recorded so far.
pub fn figures() -> Vec<(&'static str, u64)> {
    FIGURES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The breakdown as lines: one per phase in milliseconds, the total of the phases, the
/// wall clock since `start`, and the figures.
pub fn render(start: Instant) -> String {
    let wall = start.elapsed();
    let phases = phases();
    // Indented phases are parts of the phase above them.
    let sum: Duration = phases
        .iter()
        .filter(|(p, _)| !p.starts_with(' '))
        .map(|(_, d)| *d)
        .sum();
    let mut out = String::from("timings (ms, monotonic clock):\n");
    for (p, d) in &phases {
        out += &format!("  {:<28} {:>9.3}\n", p, ms(*d));
    }
    out += &format!("  {:<28} {:>9.3}\n", "sum of the phases", ms(sum));
    out += &format!("  {:<28} {:>9.3}\n", "wall clock of tracer", ms(wall));
    for (n, v) in figures() {
        out += &format!("  {n}: {v}\n");
    }
    out
}

/// Resident memory of process `pid` in KiB (`Rss` of `/proc/PID/smaps_rollup`): what the
/// agent, its trampolines and counters and the patched (copied) code pages add.
pub fn rss_kib(pid: i32) -> Option<u64> {
    RSS_READS.with(|n| n.set(n.get() + 1));
    // A phase of its own: the kernel walks the target's page tables (0.05 to 0.1 ms a
    // read), which an attach without `--timings` does not do.
    let text = time("RSS reads (--timings only)", || {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
    })
    .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// How much the resident memory of `pid` grew since `before` (KiB), read only when there is
/// a `before`: the kernel walks every page table of the target for `smaps_rollup` (about
/// 0.2 ms for a small program), which an attach without `--timings` must not pay.
pub fn rss_growth_kib(pid: i32, before: Option<u64>) -> Option<u64> {
    let before = before?;
    Some(rss_kib(pid)?.saturating_sub(before))
}

thread_local! {
    /// `smaps_rollup` reads made by this thread (for the tests).
    static RSS_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a figure from before (no `--timings`), the growth is not asked of the
    /// kernel: an attach used to read `smaps_rollup` twice for nothing.
    #[test]
    fn rss_growth_reads_nothing_without_a_before() {
        let me = std::process::id() as i32;
        let reads = || RSS_READS.with(|n| n.get());
        let n0 = reads();
        assert_eq!(rss_growth_kib(me, None), None);
        assert_eq!(reads(), n0);
        let before = rss_kib(me).expect("our own smaps_rollup");
        assert!(rss_growth_kib(me, Some(before)).is_some());
        assert_eq!(reads(), n0 + 2);
    }

    #[test]
    fn a_phase_recorded_twice_adds_up_and_keeps_its_place() {
        add("t-first", Duration::from_millis(2));
        add("t-second", Duration::from_millis(1));
        add("t-first", Duration::from_millis(3));
        let p: Vec<_> = phases()
            .into_iter()
            .filter(|(n, _)| n.starts_with("t-"))
            .collect();
        assert_eq!(
            p,
            vec![
                ("t-first", Duration::from_millis(5)),
                ("t-second", Duration::from_millis(1))
            ]
        );
    }
}
