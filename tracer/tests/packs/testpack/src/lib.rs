//! A pack for the tests: an event per call of `tick`, and a handler that panics.
use probes::prelude::*;

#[map]
static TICKS: Counter = Counter::new();

#[entry("main:tick")]
fn tick(ctx: &mut EntryCtx) {
    TICKS.inc();
    emit!("tick {} at {}", ctx.arg::<u64>(0), ctx.probe_name());
}

#[entry("main:boom")]
fn boom(ctx: &mut EntryCtx) {
    if ctx.arg::<u64>(0) < u64::MAX {
        panic!("a handler bug");
    }
}
