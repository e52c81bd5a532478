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
