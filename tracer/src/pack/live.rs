//! A loaded pack seen from the tracer while the target runs: a thread drains the event
//! ring from the shared region (never through ptrace: the target runs detached) and
//! prints each event as it arrives; at the end the maps are read and printed.

use super::builds::Builds;
use super::descriptors::{plan_for, FormatDesc, PackInfo};
use super::format::decode;
use super::maps::read_maps;
use super::region::SharedRegion;
use super::report::{map_json, map_text};
use super::ring::Consumer;
use probes::pack::abi::{Plan, RING_BYTES};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the drain sleeps when the ring was empty.
const PERIOD: Duration = Duration::from_millis(5);
/// How long it waits for a record a producer is still writing.
const PENDING_WAIT: Duration = Duration::from_micros(50);
/// How long a record may stay reserved and unfinished before it is taken as left by a
/// thread that died inside a handler and skipped.
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// The same at the end, when a thread stopped inside a handler while the probes were
/// removed may still be finishing its record.
const STUCK_AT_END: Duration = Duration::from_millis(200);

/// What the drain thread saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub received: u64,
    /// Records that could not be decoded, or reserved and never finished.
    pub bad: u64,
    pub problems: Vec<String>,
}

struct Shared {
    region: SharedRegion,
    info: PackInfo,
    plan: Plan,
    pid: i32,
    /// The pack's library name in the target (`pack-NAME`).
    name: String,
}

/// Why a pack's events cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Plan(#[from] probes::pack::abi::PlanError),
    #[error("cannot map the pack's shared region {path}: {source}")]
    Map {
        path: String,
        source: super::region::RegionError,
    },
    #[error("cannot start the event thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The pack's region, mapped, and the thread printing its events.
pub struct Live {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Tally>>,
    json: bool,
}

impl Live {
    /// Map the region the agent created (memfd `fd` in process `pid`) for the pack loaded
    /// there as `name` and start printing events to `out`. Call while the target still
    /// exists.
    pub fn start(
        pid: i32,
        fd: i32,
        name: &str,
        info: PackInfo,
        json: bool,
        out: Box<dyn Write + Send>,
    ) -> Result<Live, LiveError> {
        let plan = plan_for(&info, RING_BYTES)?;
        let path = format!("/proc/{pid}/fd/{fd}");
        let region = SharedRegion::open(std::path::Path::new(&path), plan.total)
            .map_err(|source| LiveError::Map { path, source })?;
        let shared = Arc::new(Shared {
            region,
            info,
            plan,
            pid,
            name: name.to_owned(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("pack-events".into())
                .spawn(move || drain_loop(&shared, &stop, json, out))
                .map_err(LiveError::Thread)?
        };
        Ok(Live {
            shared,
            stop,
            thread: Some(thread),
            json,
        })
    }

    /// Stop the event thread after a last drain; return the events summary and every map,
    /// as text or JSON lines.
    pub fn finish(mut self) -> String {
        self.stop.store(true, Ordering::Release);
        let tally = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let s = &self.shared;
        let view = s.region.view();
        let dropped = Consumer::new(s.plan.ring_offset, s.plan.ring_bytes).dropped(view);
        let maps = read_maps(view, &s.plan, &s.info.maps);
        let mut text = String::new();
        if self.json {
            for m in &maps {
                text.push_str(&map_json(m).to_string());
                text.push('\n');
            }
            let v = serde_json::json!({"type": "events", "events": {"received": tally.received, "dropped": dropped,
                "bad": tally.bad, "problems": tally.problems}});
            text.push_str(&v.to_string());
            text.push('\n');
        } else {
            for m in &maps {
                text.push_str(&map_text(m));
                text.push('\n');
            }
            if tally.received > 0 || dropped > 0 || !s.info.formats.is_empty() {
                text.push_str(&format!(
                    "events: {} received, {dropped} dropped (ring full)\n",
                    tally.received
                ));
            }
            for p in &tally.problems {
                text.push_str(&format!("warning: events: {p}\n"));
            }
        }
        text
    }
}

/// Drain until told to stop, then once more: again at once while records come, after
/// `PENDING_WAIT` when stopped at a record being written, after `PERIOD` when empty.
fn drain_loop(s: &Shared, stop: &AtomicBool, json: bool, mut out: Box<dyn Write + Send>) -> Tally {
    let mut consumer = Consumer::new(s.plan.ring_offset, s.plan.ring_bytes);
    let mut tally = Tally::default();
    let mut pending_since: Option<Instant> = None;
    // Grows when a hot swap brings a build with other `emit!` sites (see `builds`).
    let mut formats = s.info.formats.clone();
    let mut builds = Builds::new(s.pid, &s.name);
    loop {
        let last = stop.load(Ordering::Acquire);
        let view = s.region.view();
        let mut lines = String::new();
        // At most one look at the target's builds per pass, whatever the ring holds.
        let mut looked = false;
        let d = consumer.drain(view, |payload| {
            if !looked && !known_format(payload, &formats) {
                looked = true;
                if let Err(e) = builds.refresh(&mut formats) {
                    note(&mut tally.problems, e);
                }
            }
            match decode(payload, &formats) {
                Ok(ev) => {
                    tally.received += 1;
                    if json {
                        lines.push_str(&ev.to_json().to_string());
                    } else {
                        lines.push_str(&ev.render());
                    }
                    lines.push('\n');
                }
                Err(e) => {
                    tally.bad += 1;
                    note(&mut tally.problems, e);
                }
            }
        });
        for p in d.problems {
            note(&mut tally.problems, p);
        }
        if !lines.is_empty() {
            let _ = out.write_all(lines.as_bytes());
            let _ = out.flush();
        }
        // A record reserved and never committed blocks those behind it: after a while
        // it is taken as left by a thread that died in a handler, and skipped.
        if d.pending {
            if d.records > 0 {
                // Caught up with a producer still writing: go on at once. Sleeping a
                // period here stalled the drain at every catch-up, and the producers
                // dropped what the ring could not hold meanwhile.
                pending_since = None;
                continue;
            }
            let since = *pending_since.get_or_insert_with(Instant::now);
            let limit = if last { STUCK_AT_END } else { STUCK_AFTER };
            if since.elapsed() > limit {
                consumer.skip_stuck(view);
                tally.bad += 1;
                note(
                    &mut tally.problems,
                    "skipped an event a handler never finished".into(),
                );
                pending_since = None;
                if !last {
                    continue;
                }
            } else {
                std::thread::sleep(PENDING_WAIT);
                continue;
            }
        } else {
            pending_since = None;
        }
        if last {
            return tally;
        }
        // Records came: there may be more behind them, drain again at once.
        if d.records == 0 {
            std::thread::sleep(PERIOD);
        }
    }
}

/// Whether the record's format id (its first 4 bytes) is one of `formats`; a record too
/// short to hold one is left to `decode` to report.
fn known_format(payload: &[u8], formats: &BTreeMap<u32, FormatDesc>) -> bool {
    payload
        .get(..4)
        .is_none_or(|b| formats.contains_key(&u32::from_le_bytes(b.try_into().expect("4 bytes"))))
}

/// Keep the first few distinct problems, not one per record.
fn note(problems: &mut Vec<String>, p: String) {
    if problems.len() < 10 && !problems.contains(&p) {
        problems.push(p);
    }
}
