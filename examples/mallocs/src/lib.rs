//! Allocation sizes, failures and slow calls of `malloc` (the example of issue #7).
use probes::prelude::*;

#[map]
static SIZES: Histogram = Histogram::log2();
#[map]
static BY_SIZE: HashMap<u64, u64, 4096> = HashMap::new();
#[map]
static FAILS: Counter = Counter::new();

#[entry("libc:malloc")]
fn malloc(ctx: &mut EntryCtx) {
    let size: u64 = ctx.arg(0);
    SIZES.record(size);
    BY_SIZE.add(size, 1);
}

#[exit("libc:malloc")]
fn malloc_ret(ctx: &mut ExitCtx) {
    if ctx.ret::<u64>() == 0 {
        FAILS.inc();
    }
    if ctx.elapsed_ns() > 10_000 {
        emit!("slow malloc: {} ns, tid {}", ctx.elapsed_ns(), ctx.tid());
    }
}

#[at("main:parse_header+0x1c")]
fn mid(ctx: &mut FullCtx) {
    emit!("rbx={:#x}", ctx.rbx);
}
