//! The pack of bench/compare.sh's "tracer with a pack handler" row: a Rust handler run at
//! every call of lib_fn, counting it in a shared-memory map (the count the row checks).
use probes::prelude::*;

#[map]
static CALLS: Counter = Counter::new();

#[entry("libtiny:lib_fn")]
fn lib_fn(_ctx: &mut EntryCtx) {
    CALLS.inc();
}
