//! A loaded pack seen from the tracer while the target runs: a thread drains the event
//! ring from the shared region (never through ptrace: the target runs detached) and
//! prints each event as it arrives; at the end the maps are read and printed.

use super::builds::Builds;
use super::descriptors::{plan_for, FormatDesc, PackInfo};
use super::format::decode;
use super::maps::read_maps;
use super::pace::{drain_until, note, Drain};
use super::region::SharedRegion;
use super::report::{map_json, map_text};
use super::ring::{Consumer, Drained};
use probes::pack::abi::{Plan, RING_BYTES};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the drain sleeps when the ring was empty.
const PERIOD: Duration = Duration::from_millis(5);

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
        let region = SharedRegion::open_agent(pid, fd, "tracer-pack", plan.total)
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

/// The event thread's reader: each record decoded with the pack's formats and printed.
struct Events<'a> {
    s: &'a Shared,
    consumer: Consumer,
    json: bool,
    out: Box<dyn Write + Send>,
    tally: Tally,
    /// Grows when a hot swap brings a build with other `emit!` sites (see `builds`).
    formats: BTreeMap<u32, FormatDesc>,
    builds: Builds,
}

/// Print events as they come until told to stop, then after a last drain.
fn drain_loop(s: &Shared, stop: &AtomicBool, json: bool, out: Box<dyn Write + Send>) -> Tally {
    let mut events = Events {
        s,
        consumer: Consumer::new(s.plan.ring_offset, s.plan.ring_bytes),
        json,
        out,
        tally: Tally::default(),
        formats: s.info.formats.clone(),
        builds: Builds::new(s.pid, &s.name),
    };
    drain_until(stop, PERIOD, &mut events);
    events.tally
}

impl Drain for Events<'_> {
    fn pass(&mut self) -> Drained {
        let mut lines = String::new();
        // At most one look at the target's builds per pass, whatever the ring holds.
        let mut looked = false;
        let Events {
            s,
            consumer,
            json,
            tally,
            formats,
            builds,
            ..
        } = self;
        let mut d = consumer.drain(s.region.view(), |payload| {
            if !looked && !known_format(payload, formats) {
                looked = true;
                if let Err(e) = builds.refresh(formats) {
                    note(&mut tally.problems, e);
                }
            }
            match decode(payload, formats) {
                Ok(ev) => {
                    tally.received += 1;
                    if *json {
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
        for p in std::mem::take(&mut d.problems) {
            note(&mut self.tally.problems, p);
        }
        if !lines.is_empty() {
            let _ = self.out.write_all(lines.as_bytes());
            let _ = self.out.flush();
        }
        d
    }

    fn skip_stuck(&mut self) {
        self.consumer.skip_stuck(self.s.region.view());
        self.tally.bad += 1;
        note(
            &mut self.tally.problems,
            "skipped an event a handler never finished".into(),
        );
    }
}

/// Whether the record's format id (its first 4 bytes) is one of `formats`; a record too
/// short to hold one is left to `decode` to report.
fn known_format(payload: &[u8], formats: &BTreeMap<u32, FormatDesc>) -> bool {
    payload
        .get(..4)
        .is_none_or(|b| formats.contains_key(&u32::from_le_bytes(b.try_into().expect("4 bytes"))))
}
