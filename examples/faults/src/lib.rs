//! Fault injection: every EVERY-th call of `malloc` returns NULL, so that a program's
//! error paths run. The memory malloc did allocate for those calls is leaked (a test
//! tool's trade-off). Change EVERY or the spec to fail other calls.
use probes::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

const EVERY: u64 = 3;

#[map]
static CALLS: Counter = Counter::new();
#[map]
static FAILED: Counter = Counter::new();

static SEEN: AtomicU64 = AtomicU64::new(0);

#[exit("libc:malloc")]
fn fail_some(ctx: &mut ExitCtx) {
    CALLS.inc();
    if SEEN.fetch_add(1, Ordering::Relaxed) % EVERY == EVERY - 1 {
        ctx.set_ret(0u64);
        FAILED.inc();
    }
}
