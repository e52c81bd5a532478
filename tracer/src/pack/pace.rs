//! When to read an event ring, when to sleep and when to stop: the one rule that both
//! the pack event thread (`live`) and the call tracer (`trace`) follow while the target
//! runs detached.
//!
//! Drain again at once while records come (there may be more behind them); after a short
//! wait when stopped at a record a producer is still writing; after `idle` when the ring
//! was empty. A record reserved and never committed blocks those behind it: after a while
//! it is taken as left by a thread that died in a handler and skipped. When told to stop,
//! drain once more and stop.

use super::ring::Drained;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the drain waits for a record a producer is still writing.
const PENDING_WAIT: Duration = Duration::from_micros(50);
/// How long a record may stay reserved and unfinished before it is skipped.
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// The same at the end, when a thread stopped inside a handler while the probes were
/// removed may still be finishing its record.
const STUCK_AT_END: Duration = Duration::from_millis(200);

/// One ring's reader, as the pacing rule drives it.
pub trait Drain {
    /// Read every committed record now in the ring and handle it.
    fn pass(&mut self) -> Drained;
    /// Skip the record reserved and never finished, and say so.
    fn skip_stuck(&mut self);
}

/// What to do after a pass.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Again,
    Wait(Duration),
    SkipStuck,
    Stop,
}

/// Drain `ring` until `stop` is set, then once more; sleep `idle` when it was empty.
pub fn drain_until(stop: &AtomicBool, idle: Duration, ring: &mut impl Drain) {
    let mut pacer = Pacer::new(idle);
    loop {
        let last = stop.load(Ordering::Acquire);
        let d = ring.pass();
        match pacer.next(&d, last, Instant::now()) {
            Step::Again => {}
            Step::Wait(t) => std::thread::sleep(t),
            Step::SkipStuck => {
                ring.skip_stuck();
                if last {
                    return;
                }
            }
            Step::Stop => return,
        }
    }
}

/// The rule's state: since when the drain has been stopped at one unfinished record.
struct Pacer {
    idle: Duration,
    pending_since: Option<Instant>,
}

impl Pacer {
    fn new(idle: Duration) -> Self {
        Pacer {
            idle,
            pending_since: None,
        }
    }

    /// The step after a pass that did `d`, `last` when told to stop before it.
    fn next(&mut self, d: &Drained, last: bool, now: Instant) -> Step {
        if !d.pending || d.records > 0 {
            // Caught up with a producer still writing: go on at once. Sleeping here
            // stalled the drain at every catch-up, and the producers dropped what the
            // ring could not hold meanwhile.
            self.pending_since = None;
            if d.pending {
                return Step::Again;
            }
            return match (last, d.records) {
                (true, _) => Step::Stop,
                (false, 0) => Step::Wait(self.idle),
                (false, _) => Step::Again,
            };
        }
        let since = *self.pending_since.get_or_insert(now);
        let limit = if last { STUCK_AT_END } else { STUCK_AFTER };
        if now.duration_since(since) > limit {
            self.pending_since = None;
            Step::SkipStuck
        } else {
            Step::Wait(PENDING_WAIT)
        }
    }
}

/// Keep the first few distinct problems, not one per record.
pub fn note(problems: &mut Vec<String>, p: String) {
    if problems.len() < 10 && !problems.contains(&p) {
        problems.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(records: u64, pending: bool) -> Drained {
        Drained {
            records,
            pending,
            ..Drained::default()
        }
    }

    const IDLE: Duration = Duration::from_millis(5);

    #[test]
    fn records_drain_again_at_once_and_empty_sleeps_idle() {
        let mut p = Pacer::new(IDLE);
        let t = Instant::now();
        assert_eq!(p.next(&drained(3, false), false, t), Step::Again);
        assert_eq!(p.next(&drained(0, false), false, t), Step::Wait(IDLE));
        assert_eq!(p.next(&drained(2, true), false, t), Step::Again);
    }

    #[test]
    fn the_last_pass_stops_unless_a_record_is_being_written() {
        let mut p = Pacer::new(IDLE);
        let t = Instant::now();
        assert_eq!(p.next(&drained(0, false), true, t), Step::Stop);
        assert_eq!(p.next(&drained(4, false), true, t), Step::Stop);
        assert_eq!(p.next(&drained(4, true), true, t), Step::Again);
        assert_eq!(p.next(&drained(0, true), true, t), Step::Wait(PENDING_WAIT));
    }

    #[test]
    fn an_unfinished_record_is_skipped_after_its_limit_and_the_clock_restarts() {
        let mut p = Pacer::new(IDLE);
        let t = Instant::now();
        assert_eq!(
            p.next(&drained(0, true), false, t),
            Step::Wait(PENDING_WAIT)
        );
        let almost = t + STUCK_AFTER;
        assert_eq!(
            p.next(&drained(0, true), false, almost),
            Step::Wait(PENDING_WAIT)
        );
        let past = almost + Duration::from_millis(1);
        assert_eq!(p.next(&drained(0, true), false, past), Step::SkipStuck);
        // A new wait starts from the next pass that stops at a record.
        assert_eq!(
            p.next(&drained(0, true), false, past + STUCK_AFTER),
            Step::Wait(PENDING_WAIT)
        );
    }

    #[test]
    fn at_the_end_an_unfinished_record_is_skipped_sooner() {
        let mut p = Pacer::new(IDLE);
        let t = Instant::now();
        assert_eq!(p.next(&drained(0, true), true, t), Step::Wait(PENDING_WAIT));
        let past = t + STUCK_AT_END + Duration::from_millis(1);
        assert_eq!(p.next(&drained(0, true), true, past), Step::SkipStuck);
    }

    #[test]
    fn records_arriving_reset_the_wait() {
        let mut p = Pacer::new(IDLE);
        let t = Instant::now();
        assert_eq!(
            p.next(&drained(0, true), false, t),
            Step::Wait(PENDING_WAIT)
        );
        assert_eq!(p.next(&drained(1, true), false, t), Step::Again);
        let later = t + STUCK_AFTER + Duration::from_millis(1);
        assert_eq!(
            p.next(&drained(0, true), false, later),
            Step::Wait(PENDING_WAIT)
        );
    }

    #[test]
    fn notes_keep_the_first_ten_distinct() {
        let mut v = Vec::new();
        for i in 0..30 {
            note(&mut v, format!("p{}", i % 12));
        }
        assert_eq!(v.len(), 10);
        assert_eq!(v[0], "p0");
    }
}
