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

#[map]
static RETURNS: Histogram = Histogram::log2();

/// Floating-point work in a return handler: the vector registers a caller may keep live
/// across a locally bound callee must survive it.
#[exit("main:t*ck")]
fn returns(ctx: &mut ExitCtx) {
    let x = ctx.elapsed_ns() as f64 + 0.5;
    RETURNS.record((x.sqrt() * 1.75).mul_add(3.0, 1.0) as u64);
}
