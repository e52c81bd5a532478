//! Fault injection: every EVERY-th call of `malloc` and of `open` fails, so that a
//! program's error paths run. Change EVERY or the specs to fail other calls.
//!
//! A failure looks as the C library's contract says: `malloc` returns NULL with errno
//! `ENOMEM`; `open` returns -1 with errno `ENOENT`.
//!
//! - `malloc` is failed on return (`set_ret`), and errno set (`set_errno`): the memory it
//!   did allocate for that call is leaked (a test tool's trade-off).
//! - `open` is failed on entry, by pointing its path at one that cannot exist: the kernel
//!   refuses it and libc itself returns -1 and sets errno. Failing it on return instead
//!   would come too late: the file would already be open (a descriptor to close), and
//!   created or truncated when the flags said so.
use probes::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

const EVERY: u64 = 3;
const ENOMEM: i32 = 12;
/// A path in a directory that does not exist: `open` fails with ENOENT, whatever its flags
/// (`O_CREAT` cannot create a file there either).
static MISSING: &[u8] = b"/nonexistent-tracer-fault/file\0";

#[map]
static MALLOC_CALLS: Counter = Counter::new();
#[map]
static MALLOC_FAILED: Counter = Counter::new();
#[map]
static OPEN_CALLS: Counter = Counter::new();
#[map]
static OPEN_FAILED: Counter = Counter::new();

static MALLOC_SEEN: AtomicU64 = AtomicU64::new(0);
static OPEN_SEEN: AtomicU64 = AtomicU64::new(0);

/// Whether this call is an EVERY-th one of its function.
fn chosen(seen: &AtomicU64) -> bool {
    seen.fetch_add(1, Ordering::Relaxed) % EVERY == EVERY - 1
}

#[exit("libc:malloc")]
fn fail_malloc(ctx: &mut ExitCtx) {
    MALLOC_CALLS.inc();
    if chosen(&MALLOC_SEEN) {
        ctx.set_ret(0u64);
        ctx.set_errno(ENOMEM);
        MALLOC_FAILED.inc();
    }
}

#[entry("libc:open")]
fn fail_open(ctx: &mut EntryCtx) {
    OPEN_CALLS.inc();
    if chosen(&OPEN_SEEN) {
        ctx.set_arg(0, MISSING.as_ptr() as u64);
        OPEN_FAILED.inc();
    }
}
