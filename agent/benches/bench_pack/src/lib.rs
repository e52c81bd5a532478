//! The handlers `probe_overhead` measures as a pack's: built apart from the agent, as a
//! user's pack is. Each counts its hits (a sharded counter in the shared region).
use probes::prelude::*;

#[map]
static ENTRIES: Counter = Counter::new();
#[map]
static EXITS: Counter = Counter::new();

#[entry("main:po_pack_entry")]
fn on_entry(_ctx: &mut EntryCtx) {
    ENTRIES.inc();
}

#[exit("main:po_pack_exit")]
fn on_exit(_ctx: &mut ExitCtx) {
    EXITS.inc();
}

/// As `on_exit`, reading the time since the entry: the probe reads the timestamp counter
/// at entry and return for it.
#[exit("main:po_pack_exit_time")]
fn on_exit_timed(ctx: &mut ExitCtx) {
    if ctx.elapsed_ns() != u64::MAX {
        EXITS.inc();
    }
}
